"""What a GGUF file's architecture means in Hugging Face terms, both ways: its metadata as a
config.json dict (so the model files read one kind of config), its tensor names as checkpoint
names, and the reverse for writing GGUF files llama.cpp loads.
Names and keys: shared/reference/models-dense-moe.md section 6."""
import os
import re

from .gguf import GGUFError
from .hf_config import field, rope_theta, rope_type

# GGUF general.architecture -> (HF architectures[0], model_type). The same pairs in reverse name
# the GGUF architecture an HF checkpoint is written as.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
GGUF_ARCH_OF_MODEL_TYPE = {model_type: arch for arch, (_, model_type) in ARCHITECTURES.items()}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_GLOBAL = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_HF_LAYER = {hf: g for g, hf in _LAYER_NAMES.items()}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")
_HF_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_name(gguf_name):
    """The checkpoint name of a GGUF tensor name, or None for one this mapping does not know
    (e.g. rope_freqs.weight, which llama.cpp writes for rope scaling)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def gguf_name(hf):
    """The GGUF tensor name of a checkpoint tensor name (ValueError for one without a GGUF name)."""
    if hf in _HF_GLOBAL:
        return _HF_GLOBAL[hf]
    m = _HF_LAYER_RE.fullmatch(hf)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    raise ValueError(f"no GGUF name for checkpoint tensor {hf!r}")


# ---- GGUF metadata -> config.json ----

def _get(meta, key, path, kind, default=None):
    value = meta.get(key, default)
    if value is None:
        raise GGUFError(path, f"metadata key {key!r} is missing")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GGUFError(path, f"metadata key {key!r} is {value!r}, expected {kind.__name__}")
    return value


def hf_config(meta, tensor_names, path):
    """A config.json dict for the model a GGUF file holds (metadata dict and tensor names)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(path, f"unsupported GGUF architecture {arch!r}; supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    cls_name, model_type = ARCHITECTURES[arch]

    def get(key, kind, default=None):
        return _get(meta, f"{arch}.{key}", path, kind, default)

    heads = get("attention.head_count", int)
    hidden = get("embedding_length", int)
    head_dim = get("attention.key_length", int, hidden // heads)
    if get("attention.value_length", int, head_dim) != head_dim:
        raise GGUFError(path, "attention.value_length differs from key_length: not supported")
    if get("rope.dimension_count", int, head_dim) != head_dim:
        raise GGUFError(path, "partial rotary embeddings (rope.dimension_count < head size) are "
                        "not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    config = {
        "architectures": [cls_name],
        "model_type": model_type,
        "vocab_size": get("vocab_size", int, len(tokens) if isinstance(tokens, list) else None),
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", int),
        "num_hidden_layers": get("block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", int, heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float),
        "rope_theta": get("rope.freq_base", float, 10000.0),
        "max_position_embeddings": get("context_length", int),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        # llama.cpp's converter permuted llama's q/k rows for adjacent-pair rotation
        "rope_interleaved": arch == "llama",
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling}  # the model file refuses what it lacks
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if isinstance(meta.get(name), int):
            config[key] = meta[name]
    return config


# ---- config.json -> GGUF metadata ----

def gguf_metadata(config, path):
    """(GGUF architecture, [(key, value, gguf value type name)]) describing an HF config.json
    dict the way llama.cpp's converter does; raises ValueError for what cannot be written."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCH_OF_MODEL_TYPE:
        raise ValueError(f"{path}: model_type {model_type!r} cannot be written as GGUF; "
                         f"supported: {', '.join(sorted(GGUF_ARCH_OF_MODEL_TYPE))}")
    if rope_type(config) != "default":
        raise ValueError(f"{path}: rope type {rope_type(config)!r} is not supported")
    arch = GGUF_ARCH_OF_MODEL_TYPE[model_type]
    heads = field(config, "num_attention_heads", int)
    hidden = field(config, "hidden_size", int)
    default_head_dim = 128 if model_type == "qwen3" else hidden // heads
    head_dim = field(config, "head_dim", int, default_head_dim)
    name = os.path.basename(os.path.normpath(path))
    u32, f32 = "UINT32", "FLOAT32"
    entries = [
        ("general.architecture", arch, "STRING"),
        ("general.name", name, "STRING"),
        (f"{arch}.vocab_size", field(config, "vocab_size", int), u32),
        (f"{arch}.context_length", field(config, "max_position_embeddings", int, 2048), u32),
        (f"{arch}.embedding_length", hidden, u32),
        (f"{arch}.block_count", field(config, "num_hidden_layers", int), u32),
        (f"{arch}.feed_forward_length", field(config, "intermediate_size", int), u32),
        (f"{arch}.attention.head_count", heads, u32),
        (f"{arch}.attention.head_count_kv", field(config, "num_key_value_heads", int, heads), u32),
        (f"{arch}.attention.key_length", head_dim, u32),
        (f"{arch}.attention.value_length", head_dim, u32),
        (f"{arch}.rope.dimension_count", head_dim, u32),
        (f"{arch}.rope.freq_base", rope_theta(config), f32),
        (f"{arch}.attention.layer_norm_rms_epsilon",
         field(config, "rms_norm_eps", float, 1e-6), f32),
    ]
    return arch, entries


def permute_rows_for_gguf(num_heads, head_dim):
    """Row order llama.cpp's converter gives llama q/k weights: GGUF row h*hd + 2j + s holds HF
    row h*hd + s*hd/2 + j (each head's rotate-half pairs made adjacent)."""
    half = head_dim // 2
    return [h * head_dim + s * half + j
            for h in range(num_heads) for j in range(half) for s in range(2)]
