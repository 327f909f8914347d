"""Layers shared by the model files: rotary frequencies, attention over the paged KV cache and
the gated MLP. A model file composes these with nn's Linear/Embedding/RMSNorm; it never talks
to the cache or the batch layout itself.

Every forward here takes `batch`, the flat varlen batch the engine builds (engine/batch.py):
token rows [T] of any number of sequences, with the metadata attention needs to find each
sequence's cached keys and values.
"""
import struct

from . import dtypes, ops
from .nn import Linear, Module, RMSNorm
from .tensor import Tensor, tensor


def _f32(x):
    """x rounded to float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def rope_inv_freq(rotary_dim, theta):
    """inv_freq[i] = 1 / theta^(2i / rotary_dim) as transformers computes it, in float32: the
    exponent is a float32 quotient and the power and reciprocal are rounded to float32 (torch's
    powf may differ from this correctly rounded power by an ulp: an angle error of ~1e-7 relative)."""
    out = []
    for i in range(0, rotary_dim, 2):
        exponent = _f32(_f32(float(i)) / _f32(float(rotary_dim)))
        out.append(_f32(1.0 / _f32(theta ** exponent)))
    return tensor(out, dtype=dtypes.float32)


class Attention(Module):
    """Grouped-query self-attention with rotary positions, in the checkpoint layout Llama, Qwen2
    and Qwen3 share (q_proj, k_proj, v_proj, o_proj; Qwen3 adds per-head q_norm and k_norm,
    applied before the rotation). Keys and values of this step are stored at the batch's slots,
    then every query attends causally to its sequence's cached context, so prefill, chunked
    prefill and decode are the same call."""

    def __init__(self, layer_index, hidden_size, num_heads, num_kv_heads, head_dim, inv_freq,
                 qk_norm_eps=None, bias=False, rope_interleaved=False, dtype=dtypes.float32,
                 device="cpu"):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of "
                             f"num_key_value_heads {num_kv_heads}")
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        # Interleaved: q/k rows stored for adjacent-pair rotation (llama GGUF files). Rotating
        # q and k the same way gives the same scores, so the weights are used as stored.
        self.rope_interleaved = rope_interleaved
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=bias, dtype=dtype, device=device)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias, dtype=dtype, device=device)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias, dtype=dtype, device=device)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, dtype=dtype, device=device)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype=dtype, device=device)
        self.register_buffer("inv_freq", inv_freq)
        self.rotary_dim = 2 * inv_freq.shape[0]  # partial rotary: a shorter inv_freq than head_dim / 2

    def fuse_projections(self):
        """Replaces q_proj, k_proj and v_proj by one qkv_proj (their weights stacked), so the
        three products are one kernel (done on GPUs, where launches are what a decode step costs)."""
        fused = Linear.concat([self.q_proj, self.k_proj, self.v_proj])
        if fused is None:
            return
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused

    def stack_qk_norms(self):
        """The q/k norms' weights stacked per head, qk_norm_heads [Hq + Hkv, D] (q_norm's for each
        q head, then k_norm's for each k head): q's and k's heads, adjacent in the projection, are
        then normalised, rotated and k stored by one call. Made when the norms' weights are loaded
        (the loader calls this, rather than a forward that may be a graph's capture) and made again
        whenever either weight tensor is replaced (load_weights, .to()). Returns it; None without
        q/k norms, or when their eps differ (never in practice)."""
        if "q_norm" not in self._modules or self.q_norm.eps != self.k_norm.eps:
            return None
        wq, wk = self.q_norm.weight, self.k_norm.weight
        src = self.__dict__.get("_qk_norm_src")
        if src is None or src[0] is not wq or src[1] is not wk:
            hq, hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
            heads = Tensor.empty(hq + hkv, D, dtype=wq.dtype, device=wq.device)
            ops.copy(heads.narrow(0, 0, hq), wq.expand(hq, D))
            ops.copy(heads.narrow(0, hq, hkv), wk.expand(hkv, D))
            self.register_buffer("qk_norm_heads", heads)
            self._qk_norm_src = (wq, wk)
        return self.qk_norm_heads

    def project_qkv(self, residual, norm):
        """The heads [T, Hq + 2 Hkv, D] of the rows norm(residual): q's heads, then k's, then
        v's, side by side. One normalising product when the projections are fused, else the norm
        and three products written into one buffer."""
        T, D = residual.shape[0], self.head_dim
        if "qkv_proj" in self._modules:
            p = self.qkv_proj
            qkv = ops.rms_norm_matmul(residual, norm.weight, norm.eps, p.weight, p.bias)
        else:
            x = norm(residual)
            qkv = Tensor.empty(T, (self.num_heads + 2 * self.num_kv_heads) * D, device=x.storage.device)
            col = 0
            for p in (self.q_proj, self.k_proj, self.v_proj):
                p(x, out=qkv.narrow(1, col, p.out_features))
                col += p.out_features
        return qkv.unflatten(1, (qkv.shape[1] // D, D))

    def forward(self, residual, norm, batch):
        """residual += attention over the rows norm(residual) (residual [T, hidden], in place)."""
        T, hq, hkv = residual.shape[0], self.num_heads, self.num_kv_heads
        heads = self.project_qkv(residual, norm)
        q, v = heads.narrow(1, 0, hq), heads.narrow(1, hq + hkv, hkv)
        qk = heads.narrow(1, 0, hq + hkv)  # q's and k's heads: rotated alike, k stored
        k_cache, v_cache = batch.kv_cache.layer(self.layer_index)
        store = (batch.positions, self.inv_freq, v, k_cache, v_cache, batch.slot_mapping)
        attend = (batch.cu_seqlens_q, batch.context_lens, batch.block_tables, self.scale)
        rope = dict(interleaved=self.rope_interleaved, rotary_dim=self.rotary_dim)
        # the rotation, the store and attention in one call (qk only read: the rotated heads are
        # the op's temporary; the batch gives each token the slot of its position, as it requires)
        if "q_norm" not in self._modules:  # Llama
            attn = ops.rope_kv_attention(qk, *store, *attend, **rope)
        elif (w := self.stack_qk_norms()) is not None:  # Qwen3: both norms too, one weight per head
            attn = ops.rope_kv_attention(qk, *store, *attend, norm_weight=w, eps=self.q_norm.eps, **rope)
        else:  # q/k norms of different eps: q's heads alone, then k's with the store, then attention
            k = heads.narrow(1, hq, hkv)
            ops.rms_norm_rope(q, self.q_norm.weight, self.q_norm.eps, batch.positions, self.inv_freq, out=q, **rope)
            ops.rope_kv_store(k, *store, norm_weight=self.k_norm.weight, eps=self.k_norm.eps, out=k, **rope)
            attn = ops.paged_attention(q, k_cache, v_cache, *attend)
        ops.matmul_add(residual, attn.view(T, hq * self.head_dim), self.o_proj.weight, self.o_proj.bias)


class GatedMLP(Module):
    """down(silu(gate(x)) * up(x)), the SwiGLU MLP of Llama, Qwen and GLM."""

    def __init__(self, hidden_size, intermediate_size, dtype, device="cpu"):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, dtype=dtype, device=device)
        self.up_proj = Linear(hidden_size, intermediate_size, dtype=dtype, device=device)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype=dtype, device=device)

    def fuse_projections(self):
        """Replaces gate_proj and up_proj by one gate_up_proj, their rows interleaved (gate row i
        at 2i, up row i at 2i + 1), so that the norm, both products and the activation are one
        op, ops.rms_norm_swiglu (one kernel on a GPU in decode)."""
        fused = Linear.interleave([self.gate_proj, self.up_proj])
        if fused is not None:
            del self.gate_proj, self.up_proj
            self.gate_up_proj = fused

    def forward(self, residual, norm):
        """residual += down(silu(gate(x)) * up(x)) for the rows x = norm(residual), in place."""
        if "gate_up_proj" in self._modules:
            p = self.gate_up_proj
            act = ops.rms_norm_swiglu(residual, norm.weight, norm.eps, p.weight, p.bias)
        else:
            x = norm(residual)
            act = self.gate_proj(x)
            ops.silu_mul(act, self.up_proj(x), out=act)
        ops.matmul_add(residual, act, self.down_proj.weight)


def final_logits(residual, norm, indices, head_weight):
    """Float32 logits of the rows `indices` [L] of the residual stream (usually one row per
    sequence): the final norm and the output head in one op (on a GPU one kernel for few rows:
    the norm kernel before it cost a decode step ~7 us on Qwen3-0.6B, ~13 on 4B). Where every row
    is wanted (a decode step: L = T, and the indices rise, so they are 0 .. T - 1) the rows are
    not gathered first."""
    rows = residual if indices.numel() == residual.shape[0] else ops.embedding(residual, indices)
    return ops.rms_norm_matmul(rows, norm.weight, norm.eps, head_weight)


__all__ = ["Attention", "GatedMLP", "final_logits", "rope_inv_freq"]
