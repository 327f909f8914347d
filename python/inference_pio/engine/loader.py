"""Checkpoint -> model instance with its weights. A checkpoint is a Hugging Face folder
(config.json + safetensors) or a GGUF file (its metadata read as a config.json, its tensor names
mapped to checkpoint names). The registry picks the model file from the config, the model is
built with uninitialised parameters, and the checkpoint's tensors replace them. A tensor already
in the wanted dtype (or block-quantized) is used in place from the memory map (no copy, no load
time); others are converted once, or quantized when `quantization` asks for it."""
import os

from .. import dtypes, ops
from ..io import CheckpointError, CheckpointWeights, load_hf_config
from ..io.gguf import GGUFFile
from ..io.gguf_arch import hf_config, hf_name
from ..nn import Linear
from ..progress import ProgressBar
from ..tensor import parse_device
from ..quantize import QuantizedWeights
from inference_pio.models import model_class

_DTYPE_NAMES = {"float32": dtypes.float32, "bfloat16": dtypes.bfloat16, "float16": dtypes.float16}


def resolve_dtype(dtype, config):
    """The weights' dtype: "auto" takes the checkpoint's own (config torch_dtype/dtype) if it is a
    float type, else float32; or one of float32, bfloat16, float16."""
    if dtype in (None, "auto"):
        return _DTYPE_NAMES.get(config.get("dtype", config.get("torch_dtype")), dtypes.float32)
    d = dtypes.get_dtype(dtype)
    if d not in _DTYPE_NAMES.values():
        raise ValueError(f"dtype must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return d


class GGUFWeights:
    """The tensors of a GGUF file under their checkpoint names, the interface load_weights takes
    (names(), [name]). A tensor without a known checkpoint name keeps its GGUF name, so it is
    reported as an unexpected weight."""

    def __init__(self, gguf):
        self.file, self.folder = gguf, gguf.path
        self._gguf_names = {hf_name(n) or n: n for n in gguf.names()}

    def names(self):
        return sorted(self._gguf_names)

    def __getitem__(self, name):
        return self.file.get(self._gguf_names[name])


def gguf_dtype(gguf, dtype):
    """The float dtype of a GGUF model's non-quantized weights and KV cache: with "auto", the
    token embedding's dtype when it is a float type, else float32 (quantized files)."""
    if dtype not in (None, "auto"):
        return resolve_dtype(dtype, {})
    stored = gguf.get("token_embd.weight").dtype if "token_embd.weight" in gguf else dtypes.float32
    return stored if stored in _DTYPE_NAMES.values() else dtypes.float32


def checkpoint_config(path):
    """The config.json dict of a checkpoint folder, or the one a GGUF file's metadata makes."""
    path = os.fspath(path)
    if os.path.isfile(path):
        with GGUFFile(path) as gguf:
            return hf_config(gguf.metadata, gguf.names(), path)
    return load_hf_config(path)


def open_checkpoint(path, dtype="auto"):
    """(config dict, weights, weights' dtype) of a checkpoint folder or GGUF file."""
    if os.path.isfile(path):
        gguf = GGUFFile(path)
        return hf_config(gguf.metadata, gguf.names(), path), GGUFWeights(gguf), gguf_dtype(gguf, dtype)
    if not os.path.isdir(path):
        raise CheckpointError(path, "no such checkpoint folder or GGUF file")
    config = load_hf_config(path)
    return config, CheckpointWeights(path), resolve_dtype(dtype, config)


def load_model(path, dtype="auto", device="cpu", progress=None, quantization=None):
    """(model, config dict) for the checkpoint folder or GGUF file `path`. quantization: None,
    or a block type ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k") the float matrices are quantized
    to as they load (see quantize.py for which tensors)."""
    path = os.fspath(path)
    config, weights, wdtype = open_checkpoint(path, dtype)
    cls = model_class(config)
    try:
        cfg = cls.config_class.from_hf(config)
    except ValueError as e:
        where = path if os.path.isfile(path) else os.path.join(path, "config.json")
        raise CheckpointError(where, str(e)) from None
    model = cls(cfg, wdtype, device)
    model.checkpoint = weights  # keeps the memory maps the parameters view alive
    if quantization is not None:
        weights = QuantizedWeights(weights, quantization)
    load_weights(model, weights, progress)
    stack_qk_norms(model)
    if parse_device(device)[0] != parse_device("cpu")[0]:
        fuse_projections(model)
    interleave_rows(model, getattr(weights, "file", None))
    return model, config


def fuse_projections(model):
    """Stacks the weights of projections that read the same input (q/k/v, gate/up) into one
    product each. On a GPU, where a decode step's time goes to kernel launches, that is three
    fewer launches per layer. The CPU keeps the checkpoint's tensors: there a product costs one
    thread-pool dispatch, and the stacked copy would sit in memory beside the mapped file."""
    for _, m in list(model.named_modules()):
        fuse = getattr(type(m), "fuse_projections", None)
        if fuse is not None:
            fuse(m)


def stack_qk_norms(model):
    """Makes each attention layer's per-head q/k norm weight (layers.Attention.stack_qk_norms) now,
    so the first forward, which may be recorded into a graph, finds it made."""
    for _, m in list(model.named_modules()):
        stack = getattr(type(m), "stack_qk_norms", None)
        if stack is not None:
            stack(m)


def load_weights(model, weights, progress=None):
    params = dict(model.named_parameters())
    pairs = []
    for name in weights.names():
        ours = model.checkpoint_name(name)
        if ours is None:
            continue
        if ours not in params:
            raise CheckpointError(weights.folder, f"unexpected weight {name!r}: "
                                  f"{type(model).__name__} has no such parameter")
        pairs.append((ours, name))
    missing = sorted(set(params) - {ours for ours, _ in pairs})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(weights.folder, f"missing weights: {shown}")

    bar = ProgressBar(sum(params[o].nbytes for o, _ in pairs), "loading weights", enabled=progress)

    def tensors():
        for ours, name in pairs:
            w = weights[name]
            if not w.dtype.is_float:
                raise CheckpointError(weights.folder, f"weight {name!r} has dtype {w.dtype.name}, "
                                      "expected a float type")
            if tuple(w.shape) != params[ours].shape:
                raise CheckpointError(weights.folder, f"weight {name!r} has shape {list(w.shape)}, "
                                      f"expected {list(params[ours].shape)}")
            yield ours, w
            bar.update(params[ours].nbytes)

    model.load_weights(tensors())
    bar.close()


def interleave_rows(model, source=None):
    """Gives each CPU matmul weight in q4_0, q4_1 or q8_0 with a multiple of 8 rows (the Linear
    projections, and a tied embedding that is also the output head) the row-interleaved layout
    q4_0x8 / q4_1x8 / q8_0x8, which the CPU matmul reads about twice as fast (one instruction
    serves 8 rows); a tied embedding's lookups gather their row from it. The same blocks in
    another order: a copy of the same size replaces the memory-mapped tensor, whose pages the
    mapped file `source` (GGUFFile) then releases, so memory holds the weights once."""
    owners = [m for _, m in model.named_modules() if isinstance(m, Linear)]
    head = getattr(model, "head", None)
    if head is not None and not isinstance(head, Linear):
        owners.append(head)
    plain = {p: x for x, p in dtypes.ROW_INTERLEAVED.items()}
    for m in owners:
        w = m.weight
        if w is not None and not w.is_cuda and w.dtype in plain and w.ndim == 2 and w.shape[0] % 8 == 0:
            m.weight = ops.quantize(w, plain[w.dtype])
            if source is not None:
                source.release(w)
