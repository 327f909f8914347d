"""Qwen3 dense (Qwen3-0.6B ... Qwen3-4B-Instruct-2507): the Llama decoder (llama.py) with a
per-head RMSNorm on q and k before the rotary embedding, and head_dim a config field.
Math and names: shared/reference/models-dense-moe.md section 2."""
from dataclasses import dataclass

from inference_pio.io.hf_config import field

from . import register
from .llama import DecoderLayer, LlamaConfig, LlamaForCausalLM


@dataclass
class Qwen3Config(LlamaConfig):
    @classmethod
    def from_hf(cls, config):
        if field(config, "use_sliding_window", bool, False):
            raise ValueError("sliding-window attention is not supported")
        # transformers' Qwen3 defaults differ from Llama's: head_dim 128 (not hidden / heads).
        config = {"head_dim": 128, "max_position_embeddings": 32768, **config}
        return super().from_hf(config)


class Qwen3DecoderLayer(DecoderLayer):
    qk_norm = True


@register("Qwen3ForCausalLM", "qwen3")
class Qwen3ForCausalLM(LlamaForCausalLM):
    config_class = Qwen3Config
    layer_class = Qwen3DecoderLayer
