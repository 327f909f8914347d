"""Model files, one per architecture, installed as inference_pio.models.

Each file declares a config dataclass read from config.json, its layers on top of
inference_pio.nn and inference_pio.layers, and registers its class under the checkpoint's
architecture names with @register. `model_class(config)` picks the file for a config.json.
"""
from inference_pio.io.hf_config import architecture

_REGISTRY = {}


class UnsupportedModelError(ValueError):
    """A checkpoint whose architecture no model file implements."""


def register(*names):
    """Class decorator: the model class serves configs whose `architectures[0]` or `model_type`
    is one of `names`."""
    def wrap(cls):
        for name in names:
            if name in _REGISTRY and _REGISTRY[name] is not cls:
                raise ValueError(f"architecture {name!r} is registered twice")
            _REGISTRY[name] = cls
        return cls
    return wrap


def supported_architectures():
    return sorted(_REGISTRY)


def registered(name):
    """The class registered under an architecture name or model_type."""
    if name not in _REGISTRY:
        raise UnsupportedModelError(f"no model registered as {name!r}; registered: "
                                    f"{', '.join(supported_architectures())}")
    return _REGISTRY[name]


def model_class(config):
    """The registered class for a config.json dict: by architectures[0], else by model_type."""
    arch, model_type = architecture(config)
    for name in (arch, model_type):
        if name in _REGISTRY:
            return _REGISTRY[name]
    shown = " / ".join(repr(n) for n in (arch, model_type) if n)
    raise UnsupportedModelError(f"unsupported architecture {shown}; supported: "
                                f"{', '.join(supported_architectures())}")


# Model files register themselves on import.
from . import llama, qwen3  # noqa: E402,F401
