"""The op functions: thin wrappers that allocate outputs and call libtensor_ops.

Every function takes an optional `out=` tensor to write into (no allocation on hot paths);
without it a new contiguous output is returned. Inputs may be any strided views; the library
validates dtypes, shapes, strides, devices and buffer sizes and raises a TensorOpsError
subclass with its message when something does not fit.
"""
from . import dtypes
from ._lib import check, ffi, lib
from .dtypes import get_dtype
from .tensor import Tensor

_NULL = ffi.NULL


def _out(out, shape, dtype, like):
    """`out` checked for writability, or a new tensor of shape/dtype on like's device."""
    if out is None:
        return Tensor.empty(shape, dtype=dtype, device=like.storage.device)
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a Tensor, got {type(out).__name__}")
    out._check_writable()
    return out


def _broadcast(a, b):
    """Both operands expanded (stride 0, no copy) to their common shape, numpy-style."""
    if not isinstance(b, Tensor):
        b = Tensor.full((), b, dtype=a.dtype, device=a.storage.device)
    if not isinstance(a, Tensor):
        a = Tensor.full((), a, dtype=b.dtype, device=b.storage.device)
    if a.shape == b.shape:
        return a, b
    n = max(a.ndim, b.ndim)
    sa, sb = (1,) * (n - a.ndim) + a.shape, (1,) * (n - b.ndim) + b.shape
    shape = []
    for x, y in zip(sa, sb):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"shapes {list(a.shape)} and {list(b.shape)} do not broadcast")
        shape.append(y if x == 1 else x)
    return a.expand(*shape), b.expand(*shape)


def copy(out, x):
    """out <- x, converting dtype (out and x have the same shape; x may broadcast)."""
    return out.copy_(x)


def cast(x, dtype):
    return x.to(dtype=dtype)


def quantize(x, dtype, out=None):
    """x (float32/float16/bfloat16, or another quantized dtype) as blocks of the quantized
    `dtype` (q8_0, q4_0, q4_1, q4_k, q6_k, or the row-interleaved q4_0x8, q4_1x8); x's last
    dimension is a whole number of blocks."""
    dtype = get_dtype(dtype)
    if not dtype.is_quantized:
        raise TypeError(f"quantize: {dtype.name} is not a quantized dtype")
    # the C library converts an interleaved type only to and from its plain type: go through it
    src_plain, dst_plain = dtypes.ROW_INTERLEAVED.get(x.dtype), dtypes.ROW_INTERLEAVED.get(dtype)
    if src_plain is not None and dtype not in (x.dtype, src_plain):
        x = quantize(x, src_plain)
    if dst_plain is not None and x.dtype not in (dtype, dst_plain):
        x = quantize(x, dst_plain)
    out = _out(out, x.shape, dtype, x)
    check(lib.to_copy(out._desc, x._desc))
    return out


def dequantize(x, dtype=dtypes.float32, out=None):
    """The values of quantized x as a float tensor (float32, float16 or bfloat16)."""
    dtype = get_dtype(dtype)
    if dtype.is_quantized or not dtype.is_float:
        raise TypeError(f"dequantize: {dtype.name} is not float32, float16 or bfloat16")
    if x.dtype in dtypes.ROW_INTERLEAVED:
        x = quantize(x, dtypes.ROW_INTERLEAVED[x.dtype])
    out = _out(out, x.shape, dtype, x)
    check(lib.to_copy(out._desc, x._desc))
    return out


def add(a, b, out=None):
    a, b = _broadcast(a, b)
    out = _out(out, a.shape, a.dtype, a)
    check(lib.to_add(out._desc, a._desc, b._desc))
    return out


def mul(a, b, out=None):
    a, b = _broadcast(a, b)
    out = _out(out, a.shape, a.dtype, a)
    check(lib.to_mul(out._desc, a._desc, b._desc))
    return out


def scale(x, factor, out=None):
    out = _out(out, x.shape, x.dtype, x)
    check(lib.to_scale(out._desc, x._desc, float(factor)))
    return out


def silu_mul(gate, up, out=None):
    """silu(gate) * up, the gated MLP's activation."""
    out = _out(out, gate.shape, gate.dtype, gate)
    check(lib.to_silu_mul(out._desc, gate._desc, up._desc))
    return out


def softmax(x, out=None):
    """Softmax over the last dimension (computed in float32)."""
    out = _out(out, x.shape, x.dtype, x)
    check(lib.to_softmax(out._desc, x._desc))
    return out


def rms_norm(x, weight, eps, out=None):
    out = _out(out, x.shape, x.dtype, x)
    check(lib.to_rms_norm(out._desc, x._desc, weight._desc, float(eps)))
    return out


def add_rms_norm(residual, x, weight, eps, out=None):
    """residual += x (in place); returns rms_norm(residual) * weight."""
    residual._check_writable()
    out = _out(out, residual.shape, x.dtype, residual)
    check(lib.to_add_rms_norm(out._desc, residual._desc, x._desc, weight._desc, float(eps)))
    return out


def rope(x, positions, inv_freq, rotary_dim=None, interleaved=False, attention_scaling=1.0, out=None):
    """Rotary embedding of x [T, H, D] at positions [T]; pass out=x to rotate in place."""
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    out = _out(out, x.shape, x.dtype, x)
    check(lib.to_rope(out._desc, x._desc, positions._desc, inv_freq._desc, int(rotary_dim),
                      int(bool(interleaved)), float(attention_scaling)))
    return out


def rms_norm_rope(x, weight, eps, positions, inv_freq, interleaved=False, rotary_dim=None,
                  attention_scaling=1.0, out=None):
    """rope(rms_norm(x, weight, eps), ...) in one pass over x [T, H, D] (weight [D]: the per-head
    norm, Qwen3's q_norm/k_norm); the normalised heads stay float32 in between. out=x works."""
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    out = _out(out, x.shape, x.dtype, x)
    check(lib.to_rms_norm_rope(out._desc, x._desc, weight._desc, float(eps), positions._desc, inv_freq._desc,
                               int(rotary_dim), int(bool(interleaved)), float(attention_scaling)))
    return out


def rope_kv_store(qk, positions, inv_freq, v, k_cache, v_cache, slot_mapping, norm_weight=None, eps=0.0,
                  interleaved=False, rotary_dim=None, attention_scaling=1.0, out=None):
    """An attention layer's rotation and cache write in one call (one kernel on a GPU): rope (or,
    with norm_weight [D] or [H, D], rms_norm_rope) of qk [T, H, D] (q's heads, then k's) into out,
    then out's last Hkv heads (k) and v [T, Hkv, D] stored at slot_mapping[t] of k_cache and
    v_cache as kv_cache_store does (Hkv from the caches' shape). The same values as the separate
    ops; out=qk works in place. Returns out."""
    rotary_dim = qk.shape[-1] if rotary_dim is None else rotary_dim
    out = _out(out, qk.shape, qk.dtype, qk)
    k_cache._check_writable()
    v_cache._check_writable()
    check(lib.to_rope_kv_store(out._desc, qk._desc, norm_weight._desc if norm_weight is not None else _NULL,
                               float(eps), positions._desc, inv_freq._desc, int(rotary_dim),
                               int(bool(interleaved)), float(attention_scaling), v._desc, k_cache._desc,
                               v_cache._desc, slot_mapping._desc))
    return out


def rope_kv_attention(qk, positions, inv_freq, v, k_cache, v_cache, slot_mapping, cu_seqlens_q, context_lens,
                      block_tables, scale, norm_weight=None, eps=0.0, interleaved=False, rotary_dim=None,
                      attention_scaling=1.0, out=None):
    """An attention layer from its rotation to its output in one call (one kernel on a GPU for a
    decode step of one sequence). qk [T, H, D] is only read: its heads are rotated (and normalised)
    as rope_kv_store would, into a temporary of qk's dtype (never into qk), the temporary's last
    Hkv heads and v stored at slot_mapping, then paged_attention of its first Hq = H - Hkv heads
    into out [T, Hq, D]: the bits of rope_kv_store(qk, ..., out=tmp) then paged_attention(tmp[:, :Hq],
    ...) with tmp a new tensor of qk's dtype. out defaults to a new tensor of qk's dtype. Each
    token's slot must be the one block_tables gives its position (context_lens[s] - nq + i for the
    i-th of sequence s's nq queries): no padding slots. Returns out."""
    rotary_dim = qk.shape[-1] if rotary_dim is None else rotary_dim
    shape = qk.shape  # [T, Hq, D]; for other ranks a placeholder, the library says what is wrong
    if qk.ndim == 3 and k_cache.ndim == 4:
        shape = (qk.shape[0], max(qk.shape[1] - k_cache.shape[2], 0), qk.shape[2])
    out = _out(out, shape, qk.dtype, qk)
    k_cache._check_writable()
    v_cache._check_writable()
    check(lib.to_rope_kv_attention(out._desc, qk._desc, norm_weight._desc if norm_weight is not None else _NULL,
                                   float(eps), positions._desc, inv_freq._desc, int(rotary_dim),
                                   int(bool(interleaved)), float(attention_scaling), v._desc, k_cache._desc,
                                   v_cache._desc, slot_mapping._desc, cu_seqlens_q._desc, context_lens._desc,
                                   block_tables._desc, float(scale)))
    return out


def matmul(x, w, bias=None, out=None, out_dtype=None):
    """x [..., K] @ w[N, K]^T (+ bias [N]) -> [..., N], accumulated in float32."""
    lead = x.shape[:-1]
    x2 = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    dtype = get_dtype(out_dtype) if out_dtype is not None else x.dtype
    out = _out(out, lead + (w.shape[0],) if w.ndim == 2 else lead, dtype, x)
    out2 = out if out.ndim == 2 else out.view(-1, out.shape[-1])
    check(lib.to_matmul(out2._desc, x2._desc, w._desc, bias._desc if bias is not None else _NULL))
    return out


def matmul_add(out, x, w, bias=None):
    """out += x [M, K] @ w[N, K]^T (+ bias) in place (a residual stream plus a projection)."""
    check(lib.to_matmul_add(out._desc, x._desc, w._desc, bias._desc if bias is not None else _NULL))
    return out


def rms_norm_matmul(x, norm_weight, eps, w, bias=None, out=None):
    """rms_norm(x, norm_weight, eps) [M, K] @ w[N, K]^T (+ bias) -> [M, N], as the two ops give it;
    on a GPU one kernel for few rows."""
    out = _out(out, (x.shape[0], w.shape[0]), x.dtype, x)
    check(lib.to_rms_norm_matmul(out._desc, x._desc, norm_weight._desc, float(eps), w._desc,
                                 bias._desc if bias is not None else _NULL))
    return out


def rms_norm_swiglu(x, norm_weight, eps, w, bias=None, out=None):
    """silu(gate) * up of the product p = rms_norm(x, norm_weight, eps) [M, K] @ w[N, K]^T (+ bias),
    whose columns interleave gate and up (gate at 2i, up at 2i + 1) -> [M, N / 2]; on a GPU one
    kernel for few rows."""
    out = _out(out, (x.shape[0], w.shape[0] // 2), x.dtype, x)
    check(lib.to_rms_norm_swiglu(out._desc, x._desc, norm_weight._desc, float(eps), w._desc,
                                 bias._desc if bias is not None else _NULL))
    return out


def embedding(table, ids, out=None):
    """Rows of table [V, D] picked by ids (int32/int64, any shape) -> ids.shape + [D]."""
    flat = ids.reshape(-1)
    dtype = dtypes.float32 if table.dtype.is_quantized else table.dtype  # looked-up rows are dequantized
    out = _out(out, ids.shape + (table.shape[-1],), dtype, table)
    out2 = out.view(-1, table.shape[-1]) if out.ndim != 2 else out
    check(lib.to_embedding(out2._desc, table._desc, flat._desc))
    return out


def argmax(x, out=None):
    """Index of the largest value along the last dimension (int64, shape x.shape[:-1])."""
    out = _out(out, x.shape[:-1], dtypes.int64, x)
    check(lib.to_argmax(out._desc, x._desc))
    return out


def topk(x, k, values=None, indices=None):
    """The k largest values of each row (descending) and their int64 indices."""
    shape = x.shape[:-1] + (k,)
    values = _out(values, shape, x.dtype, x)
    indices = _out(indices, shape, dtypes.int64, x)
    check(lib.to_topk(values._desc, indices._desc, x._desc, int(k)))
    return values, indices


def gather_by_value(values, num_values, x=None):
    """MoE routing: groups the assignments of values [T, k] (expert ids) by value.
    Returns (order [T*k] int64, offsets [num_values + 1] int64, rows [T*k, D] or None), where
    rows of expert e are order[offsets[e]:offsets[e+1]] and rows[i] = x[order[i] // k]."""
    n = values.numel()
    order = Tensor.empty((n,), dtype=dtypes.int64, device=values.storage.device)
    offsets = Tensor.empty((num_values + 1,), dtype=dtypes.int64, device=values.storage.device)
    rows = None
    if x is not None:
        rows = Tensor.empty((n, x.shape[-1]), dtype=x.dtype, device=x.storage.device)
    check(lib.to_gather_by_value(rows._desc if rows is not None else _NULL, order._desc, offsets._desc,
                                 x._desc if x is not None else _NULL, values._desc, int(num_values)))
    return order, offsets, rows


def scatter_add_by_index(out, src, index, weight=None):
    """out[index[i]] += weight[i] * src[i] (weight defaults to 1); returns out."""
    out._check_writable()
    check(lib.to_scatter_add_by_index(out._desc, src._desc, index._desc,
                                      weight._desc if weight is not None else _NULL))
    return out


def sample(logits, temperature, top_k, top_p, min_p, uniform, out=None):
    """One token per row of logits [B, V] (int64 [B]). Each parameter is a Tensor [B]:
    temperature f32 (<= 0: greedy), top_k i32 (<= 0: off), top_p f32 (>= 1: off), min_p f32
    (0: off) and uniform f32 in [0, 1), the draw (see to_sample in tensor_ops.h)."""
    out = _out(out, logits.shape[:1], dtypes.int64, logits)
    check(lib.to_sample(out._desc, logits._desc, temperature._desc, top_k._desc, top_p._desc,
                        min_p._desc, uniform._desc))
    return out


_SAMPLE_OPTIONAL = ("typical_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                    "no_repeat_ngram", "history", "history_offsets", "prompt_lens", "bias_ids",
                    "bias_offsets", "bias_values")


class SampleResult:
    """What sample_pipeline returns: ids (int64 [B]) and, when asked for, logprobs (float32 [B]),
    top_ids (int64 [B, N]), top_logprobs (float32 [B, N]) and processed (float32 [B, V]), all on
    the logits' device (None when not asked for)."""

    __slots__ = ("ids", "logprobs", "top_ids", "top_logprobs", "processed")

    def __init__(self, ids, logprobs=None, top_ids=None, top_logprobs=None, processed=None):
        self.ids, self.logprobs, self.top_ids = ids, logprobs, top_ids
        self.top_logprobs, self.processed = top_logprobs, processed


def sample_pipeline(logits, temperature, top_k, top_p, min_p, uniform, *, logprobs=False, num_top=0,
                    processed=False, out=None, **optional):
    """to_sample_pipeline (tensor_ops.h): one token per row of logits [B, V] after the logits
    processors and warpers. The five to_sample parameters are required (CPU Tensors [B]); the
    optional ones (keyword arguments, CPU Tensors, None: off) are typical_p, repetition_penalty,
    presence_penalty, frequency_penalty (f32 [B]), no_repeat_ngram (i32 [B]), the histories
    history / history_offsets / prompt_lens (i32 CSR) and the bias bias_ids / bias_offsets /
    bias_values (CSR). logprobs: also the chosen tokens' raw logprobs; num_top: also the num_top
    best raw logprobs per row; processed: also the processed logits rows. Returns a SampleResult."""
    unknown = set(optional) - set(_SAMPLE_OPTIONAL)
    if unknown:
        raise TypeError(f"sample_pipeline: unknown parameter {sorted(unknown)[0]!r}")
    B, dev = logits.shape[0], logits.storage.device
    res = SampleResult(_out(out, (B,), dtypes.int64, logits))
    if logprobs:
        res.logprobs = Tensor.empty((B,), dtype=dtypes.float32, device=dev)
    if num_top:
        res.top_ids = Tensor.empty((B, num_top), dtype=dtypes.int64, device=dev)
        res.top_logprobs = Tensor.empty((B, num_top), dtype=dtypes.float32, device=dev)
    if processed:
        res.processed = Tensor.empty((B, logits.shape[1]), dtype=dtypes.float32, device=dev)
    p = ffi.new("to_sample_params *")
    for name, t in [("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
                    ("uniform", uniform)] + [(n, optional.get(n)) for n in _SAMPLE_OPTIONAL]:
        setattr(p, name, t._desc if t is not None else _NULL)

    def desc(t):
        return t._desc if t is not None else _NULL
    check(lib.to_sample_pipeline(res.ids._desc, desc(res.logprobs), desc(res.top_ids), desc(res.top_logprobs),
                                 desc(res.processed), logits._desc, p))
    return res


def kv_cache_store(k_cache, v_cache, k, v, slot_mapping):
    """Paged KV cache write: k[t], v[t] ([T, Hkv, D]) go to slot slot_mapping[t] of k_cache and
    v_cache ([num_blocks, block_size, Hkv, D], contiguous; slot s is row s % block_size of block
    s // block_size). Negative slots skip their token. Writes in place, returns None."""
    k_cache._check_writable()
    v_cache._check_writable()
    check(lib.to_kv_cache_store(k_cache._desc, v_cache._desc, k._desc, v._desc, slot_mapping._desc))


def paged_attention(q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, out=None):
    """Causal attention of q [T, Hq, D] (S sequences packed; sequence s owns rows
    cu_seqlens_q[s]:cu_seqlens_q[s+1]) over the paged cache: sequence s has context_lens[s]
    tokens in the blocks block_tables[s] ([S, max_blocks]), its queries being the last ones.
    Returns out [T, Hq, D] (q's dtype unless out is given)."""
    out = _out(out, q.shape, q.dtype, q)
    check(lib.to_paged_attention(out._desc, q._desc, k_cache._desc, v_cache._desc, cu_seqlens_q._desc,
                                 context_lens._desc, block_tables._desc, float(scale)))
    return out


def kv_copy_blocks(caches, src, dst):
    """Copy-on-write of paged KV cache blocks: block dst[i] of every tensor of `caches` (each
    [num_blocks, ...], contiguous, one dtype, shape and device: a model's k and v caches) becomes
    a copy of its block src[i], all pairs and caches in one call (one launch on a GPU). src, dst:
    int32/int64 CPU tensors [P] (whatever the caches' device); ids in range, the dst ids distinct
    and none of them a src. Writes in place, returns None."""
    caches = list(caches)
    descs = ffi.new("to_tensor[]", max(1, len(caches)))
    for i, c in enumerate(caches):
        c._check_writable()
        descs[i] = c._desc[0]
    check(lib.to_kv_copy_blocks(descs if caches else _NULL, len(caches), src._desc, dst._desc))


def beam_topk(logits, beam_scores, groups, k, suppress=None, scores=None, ids=None):
    """One beam-search step's candidates: for each group (first row, rows, k_g) of groups [G, 3]
    (int32 CPU tensor) the k_g best (beam, token) continuations of its logits rows by log-softmax
    plus the beam's running score beam_scores[row] (float32 CPU tensor [rows of logits]), with
    the ids of suppress [G, M] (int CPU tensor, -1 unused) at -inf. Returns (scores [G, k] float32,
    ids [G, k] int64) on the logits' device, best first; ids hold beam * V + token (see
    to_beam_topk in tensor_ops.h); entries past a group's k_g are -inf and -1."""
    G = groups.shape[0]
    scores = _out(scores, (G, k), dtypes.float32, logits)
    ids = _out(ids, (G, k), dtypes.int64, logits)
    check(lib.to_beam_topk(scores._desc, ids._desc, logits._desc, beam_scores._desc, groups._desc,
                           suppress._desc if suppress is not None else _NULL))
    return scores, ids
