"""Llama (SmolLM2, Llama 2/3 without rope scaling): the pre-norm decoder every dense model here
builds on: grouped-query attention with rotary positions, a SwiGLU MLP, RMSNorm before each.
Qwen3 (qwen3.py) is this decoder plus per-head q/k norms.
Math and names: shared/reference/models-dense-moe.md sections 1 and 5."""
from dataclasses import dataclass

from inference_pio import dtypes, ops
from inference_pio.tensor import Tensor
from inference_pio.io.hf_config import field, rope_theta, rope_type
from inference_pio.layers import Attention, GatedMLP, final_logits, rope_inv_freq
from inference_pio.nn import Embedding, Linear, Module, ModuleList, RMSNorm

from . import register


@dataclass
class LlamaConfig:
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
    # GGUF files of llama store q/k rows permuted for adjacent-pair rotation (section 6.3):
    # such weights are used as stored, with the interleaved rotation.
    rope_interleaved: bool = False

    @classmethod
    def from_hf(cls, config):
        if rope_type(config) != "default":
            raise ValueError(f"rope type {rope_type(config)!r} is not supported (only the default)")
        if field(config, "mlp_bias", bool, False):
            raise ValueError("mlp_bias is not supported")
        heads = field(config, "num_attention_heads", int)
        hidden = field(config, "hidden_size", int)
        return cls(
            vocab_size=field(config, "vocab_size", int),
            hidden_size=hidden,
            intermediate_size=field(config, "intermediate_size", int),
            num_hidden_layers=field(config, "num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=field(config, "num_key_value_heads", int, heads),
            head_dim=field(config, "head_dim", int, hidden // heads),
            rms_norm_eps=field(config, "rms_norm_eps", float, 1e-6),
            rope_theta=rope_theta(config),
            tie_word_embeddings=field(config, "tie_word_embeddings", bool, False),
            max_position_embeddings=field(config, "max_position_embeddings", int, 2048),
            attention_bias=field(config, "attention_bias", bool, False),
            rope_interleaved=field(config, "rope_interleaved", bool, False),
        )


class DecoderLayer(Module):
    qk_norm = False  # Qwen3's layer sets True: per-head RMSNorm of q and k before the rotation

    def __init__(self, cfg, index, inv_freq, dtype, device):
        super().__init__()
        self.self_attn = Attention(index, cfg.hidden_size, cfg.num_attention_heads,
                                   cfg.num_key_value_heads, cfg.head_dim, inv_freq,
                                   qk_norm_eps=cfg.rms_norm_eps if self.qk_norm else None,
                                   bias=cfg.attention_bias, rope_interleaved=cfg.rope_interleaved,
                                   dtype=dtype, device=device)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, residual, batch):
        """Adds this layer's attention, then its MLP, into the residual stream [T, hidden]."""
        self.self_attn(residual, self.input_layernorm, batch)
        self.mlp(residual, self.post_attention_layernorm)


class Model(Module):
    def __init__(self, cfg, layer_cls, dtype, device):
        super().__init__()
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = ModuleList(layer_cls(cfg, i, inv_freq, dtype, device)
                                 for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


@register("LlamaForCausalLM", "llama")
class LlamaForCausalLM(Module):
    config_class = LlamaConfig
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

    @property
    def head(self):
        """The module whose weight the output head multiplies: lm_head, or the tied embedding."""
        return self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head

    def checkpoint_name(self, name):
        """Our parameter name for a checkpoint tensor name; None to skip it (a tied head's
        duplicate lm_head.weight, which some files store anyway)."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None
        return name

    def forward(self, batch):
        """Logits (float32 [L, vocab]) of the batch's rows `batch.logits_indices`."""
        # The residual stream and activations are float32 whatever the weights' dtype: the
        # weights dominate memory traffic, and f32 activations keep bf16 models accurate.
        residual = Tensor.empty((batch.num_tokens, self.config.hidden_size), device=self.device)
        self.model.embed_tokens(batch.token_ids, out=residual)
        for layer in self.model.layers:
            layer(residual, batch)
        return final_logits(residual, self.model.norm, batch.logits_indices, self.head.weight)
