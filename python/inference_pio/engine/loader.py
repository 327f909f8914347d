"""Checkpoint folder -> model instance with its weights: the registry picks the model file from
config.json, the model is built with uninitialised parameters, and the checkpoint's tensors
replace them. A tensor already in the wanted dtype is used in place from the memory map (no
copy, no load time); others are converted once."""
import os

from .. import dtypes
from ..io import CheckpointError, CheckpointWeights, load_hf_config
from ..progress import ProgressBar
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


def load_model(path, dtype="auto", device="cpu", progress=None):
    """(model, config dict) for the checkpoint folder `path`."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(path, "no such checkpoint folder")
    config = load_hf_config(path)
    cls = model_class(config)
    try:
        cfg = cls.config_class.from_hf(config)
    except ValueError as e:
        raise CheckpointError(os.path.join(path, "config.json"), str(e)) from None
    model = cls(cfg, resolve_dtype(dtype, config), device)
    weights = CheckpointWeights(path)
    model.checkpoint = weights  # keeps the memory maps the parameters view alive
    load_weights(model, weights, progress)
    return model, config


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
