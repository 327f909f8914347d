"""Qwen3 dense (Qwen3-0.6B ... Qwen3-4B-Instruct-2507): a pre-norm decoder with grouped-query
attention, per-head RMSNorm on q and k before the rotary embedding, and a SwiGLU MLP.
Math and names: shared/reference/models-dense-moe.md section 2."""
from dataclasses import dataclass

from inference_pio import dtypes, ops
from inference_pio.tensor import Tensor
from inference_pio.io.hf_config import field, rope_theta, rope_type
from inference_pio.layers import Attention, GatedMLP, final_hidden, rope_inv_freq
from inference_pio.nn import Embedding, Linear, Module, ModuleList, RMSNorm

from . import register


@dataclass
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    attention_bias: bool

    @classmethod
    def from_hf(cls, config):
        if rope_type(config) != "default":
            raise ValueError(f"rope type {rope_type(config)!r} is not supported (only the default)")
        if field(config, "use_sliding_window", bool, False):
            raise ValueError("sliding-window attention is not supported")
        heads = field(config, "num_attention_heads", int)
        return cls(
            vocab_size=field(config, "vocab_size", int),
            hidden_size=field(config, "hidden_size", int),
            intermediate_size=field(config, "intermediate_size", int),
            num_hidden_layers=field(config, "num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=field(config, "num_key_value_heads", int, heads),
            head_dim=field(config, "head_dim", int, 128),  # transformers' default, not hidden/heads
            rms_norm_eps=field(config, "rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta(config),
            tie_word_embeddings=field(config, "tie_word_embeddings", bool, False),
            max_position_embeddings=field(config, "max_position_embeddings", int, 32768),
            attention_bias=field(config, "attention_bias", bool, False),
        )


class DecoderLayer(Module):
    qk_norm = True  # Qwen3's per-head q_norm/k_norm; a Llama-style layer sets False

    def __init__(self, cfg, index, inv_freq, dtype, device):
        super().__init__()
        self.self_attn = Attention(index, cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.num_key_value_heads, cfg.head_dim, inv_freq,
                                   qk_norm_eps=cfg.rms_norm_eps if self.qk_norm else None, bias=cfg.attention_bias,
                                   dtype=dtype, device=device)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, residual, delta, batch):
        """residual += delta (the previous layer's MLP output; None for the first layer), then
        this layer's attention is added in; returns this layer's MLP output, not yet added."""
        if delta is None:
            x = self.input_layernorm(residual)
        else:
            x = self.input_layernorm(delta, residual=residual, out=delta)
        attn = self.self_attn(x, batch)
        x = self.post_attention_layernorm(attn, residual=residual, out=attn)
        return self.mlp(x)


class Model(Module):
    def __init__(self, cfg, layer_cls, dtype, device):
        super().__init__()
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = ModuleList(layer_cls(cfg, i, inv_freq, dtype, device)
                                 for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


@register("Qwen3ForCausalLM", "qwen3")
class Qwen3ForCausalLM(Module):
    config_class = Qwen3Config
    layer_class = DecoderLayer

    def __init__(self, cfg, dtype=dtypes.float32, device="cpu"):
        super().__init__()
        self.config, self.dtype, self.device = cfg, dtypes.get_dtype(dtype), device
        self.model = Model(cfg, self.layer_class, self.dtype, device)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=self.dtype, device=device)

    @property
    def kv_cache_spec(self):
        """(layers, kv heads, head dim) of the KV cache this model needs."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.head_dim

    def checkpoint_name(self, name):
        """Our parameter name for a checkpoint tensor name; None to skip it (a tied head's
        duplicate lm_head.weight, which some Qwen3 files store anyway)."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        return name

    def forward(self, batch):
        """Logits (float32 [L, vocab]) of the batch's rows `batch.logits_indices`."""
        # The residual stream and activations are float32 whatever the weights' dtype: the
        # weights dominate memory traffic, and f32 activations keep bf16 models accurate.
        residual = Tensor.empty((batch.num_tokens, self.config.hidden_size), device=self.device)
        self.model.embed_tokens(batch.token_ids, out=residual)
        delta = None
        for layer in self.model.layers:
            delta = layer(residual, delta, batch)
        h = final_hidden(residual, delta, self.model.norm, batch.logits_indices)
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return ops.matmul(h, head, out_dtype=dtypes.float32)
