"""Writing a checkpoint as a GGUF file: `python -m inference_pio quantize SRC DST --type T`.

SRC is a Hugging Face folder or a GGUF file; DST is a GGUF v3 file as llama.cpp's converter and
quantizer would write it: llama.cpp metadata keys, GGUF tensor names, llama q/k rows permuted
for adjacent-pair rotation, vectors (norms, biases) in F32, matrices in the block type chosen
by quantize.target_dtype (or F16/BF16/F32 for an unquantized export), the tokenizer and chat
template in the tokenizer.ggml.* keys. Tensors are converted one at a time while writing.
"""
import json
import os

from . import dtypes, ops
from .engine.loader import open_checkpoint
from .io.gguf import GGUFFile, GGUFWriter
from .io.gguf_arch import gguf_metadata, gguf_name, permute_rows_for_gguf
from .progress import ProgressBar
from .quantize import quant_type, target_dtype
from .tensor import tensor
from .tokenizer import CheckpointTokenizer, TokenizerError
from .tokenizer.pretokenize import QWEN2_PATTERN

# general.file_type values (llama.cpp's LLAMA_FTYPE) of the files we write
FILE_TYPES = {"float32": 0, "float16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k": 15,
              "q6_k": 18, "bfloat16": 32}
FLOAT_TYPES = {"f32": dtypes.float32, "f16": dtypes.float16, "bf16": dtypes.bfloat16}
EXPORT_TYPES = tuple(FLOAT_TYPES) + tuple(d.name for d in dtypes.QUANTIZED)

# tokenizer.ggml.token_type values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def export_gguf(src, dst, type_name, progress=None):
    """Writes the checkpoint `src` (folder or GGUF file) to the GGUF file `dst` with its matrices
    in `type_name` (one of EXPORT_TYPES). Returns dst."""
    if type_name not in EXPORT_TYPES:
        raise ValueError(f"unknown type {type_name!r}; choose one of {', '.join(EXPORT_TYPES)}")
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("the destination must differ from the source")
    config, weights, _ = open_checkpoint(src)
    if os.path.isfile(src):
        metadata = _copied_metadata(weights.file)
        permute = None  # a GGUF's q/k rows are already in GGUF order
    else:
        arch, metadata = gguf_metadata(config, src)
        metadata += tokenizer_metadata(src, config)
        permute = _llama_permutations(config) if arch == "llama" else None
    qtype = quant_type(type_name) if type_name not in FLOAT_TYPES else None
    metadata.append(("general.file_type", FILE_TYPES[(qtype or FLOAT_TYPES[type_name]).name], "UINT32"))
    if qtype is not None:
        metadata.append(("general.quantization_version", 2, "UINT32"))

    writer = GGUFWriter(dst)
    for key, value, vtype in metadata:
        if isinstance(value, list) and isinstance(vtype, str):  # ours name the element type
            writer.add(key, value, element_type=vtype)
        else:
            writer.add(key, value, vtype)
    names = [n for n in weights.names() if not (n == "lm_head.weight" and config.get("tie_word_embeddings"))]
    bar = ProgressBar(len(names), "writing tensors", enabled=progress)

    def converted(name):
        def produce():
            w = weights[name]
            if permute and name in permute:
                w = ops.embedding(w.float() if w.dtype.is_quantized else w, permute[name])
            bar.update(1)
            return _stored(w, qtype, FLOAT_TYPES.get(type_name))
        return produce

    for name in sorted(names, key=_gguf_order):
        shape = tuple(weights[name].shape)
        writer.add_tensor_lazy(gguf_name(name), shape, _stored_dtype(shape, qtype, FLOAT_TYPES.get(type_name)),
                               converted(name))
    writer.write()
    bar.close()
    return dst


def _stored_dtype(shape, qtype, float_type):
    """The dtype a tensor is written in: vectors F32 (as llama.cpp's converter), matrices in the
    block type target_dtype picks, or the float type (F32 where a matrix cannot be quantized)."""
    if len(shape) != 2:
        return dtypes.float32
    if qtype is None:
        return float_type
    return target_dtype(shape, qtype) or dtypes.float32


def _stored(w, qtype, float_type):
    dtype = _stored_dtype(w.shape, qtype, float_type)
    if w.dtype is dtype:
        return w.contiguous()
    if dtype.is_quantized:
        return ops.quantize(w.contiguous(), dtype)
    return w.to(dtype=dtype).contiguous()


def _gguf_order(name):
    """token_embd, the layers in order, then output_norm and output (llama.cpp's order)."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return (1, int(parts[2]), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def _llama_permutations(config):
    """{checkpoint name: row index tensor} for every llama q/k weight (and bias)."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    q = tensor(permute_rows_for_gguf(heads, head_dim), dtype=dtypes.int64)
    k = tensor(permute_rows_for_gguf(kv_heads, head_dim), dtype=dtypes.int64)
    out = {}
    for i in range(config["num_hidden_layers"]):
        for proj, rows in (("q_proj", q), ("k_proj", k)):
            for kind in ("weight", "bias"):
                out[f"model.layers.{i}.self_attn.{proj}.{kind}"] = rows
    return out


def _copied_metadata(gguf):
    """A GGUF source's metadata minus what the new file states itself."""
    skip = {"general.file_type", "general.quantization_version", "general.alignment"}
    return [(k, v, gguf.metadata_types[k]) for k, v in gguf.metadata.items() if k not in skip]


# ---- tokenizer.json -> tokenizer.ggml.* ----

def _pre_type(pre):
    """llama.cpp's name for a tokenizer.json pre_tokenizer we can reproduce."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == QWEN2_PATTERN:
        return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise TokenizerError(f"cannot name this pre-tokenizer for GGUF: {kinds}")


def tokenizer_metadata(folder, config):
    """tokenizer.ggml.* entries for an HF folder's tokenizer (none if it has no tokenizer.json)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    model = obj.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: only byte-level BPE tokenizers can be written to GGUF")
    token_of = {i: t for t, i in model.get("vocab", {}).items()}
    kinds = dict.fromkeys(token_of, NORMAL)
    for t in obj.get("added_tokens") or []:
        token_of[t["id"]] = t["content"]
        control = t.get("special") or (t["content"].startswith("<|") and t["content"].endswith("|>"))
        kinds[t["id"]] = CONTROL if control else USER_DEFINED
    n = max(config.get("vocab_size") or 0, max(token_of) + 1)
    # ids the tokenizer does not use (Qwen pads its embedding) get placeholders, as llama.cpp's do
    tokens = [token_of.get(i, f"[PAD{i}]") for i in range(n)]
    token_types = [kinds.get(i, UNUSED) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    entries = [("tokenizer.ggml.model", "gpt2", "STRING"),
               ("tokenizer.ggml.pre", _pre_type(obj.get("pre_tokenizer")), "STRING"),
               ("tokenizer.ggml.tokens", tokens, "STRING"),
               ("tokenizer.ggml.token_type", token_types, "INT32"),
               ("tokenizer.ggml.merges", merges, "STRING")]
    tok = CheckpointTokenizer(folder)
    for key, text in (("bos", tok.bos_token), ("eos", tok.eos_token),
                      ("padding", _config_token(tok.config, "pad_token"))):
        tid = tok.tokenizer.token_to_id(text) if text is not None else None
        if tid is not None:
            entries.append((f"tokenizer.ggml.{key}_token_id", tid, "UINT32"))
    entries.append(("tokenizer.ggml.add_bos_token", bool(tok.config.get("add_bos_token", False)), "BOOL"))
    if tok.chat_template is not None:
        entries.append(("tokenizer.chat_template", tok.chat_template.source, "STRING"))
    return entries


def _config_token(config, key):
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def main_quantize(args):
    """The quantize command."""
    export_gguf(args.src, args.dst, args.type, progress=True)
    with GGUFFile(args.dst) as f:
        size = os.path.getsize(args.dst)
        print(f"wrote {args.dst}: {len(f.names())} tensors, {size / 1e6:.1f} MB")
