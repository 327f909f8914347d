"""Reading a Hugging Face config.json as a plain dict, plus the few lookups whose spelling
differs between transformers releases (kept here so model files need not know)."""
import json
import os

from .safetensors import CheckpointError

CONFIG_FILE = "config.json"
DEFAULT_ROPE_THETA = 10000.0


def load_hf_config(folder_or_file):
    """The dict in config.json (given its folder or the file itself)."""
    path = os.fspath(folder_or_file)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(path, "no such config file") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"config is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, "config is not a JSON object")
    return config


def architecture(config):
    """(architectures[0] or None, model_type or None): what picks the model file. A config saved
    from a bare config object has no "architectures", so model_type alone must do then."""
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and archs
                                  and all(isinstance(a, str) for a in archs)):
        raise ValueError(f"config 'architectures' {archs!r} is not a list of class names")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ValueError(f"config 'model_type' {model_type!r} is not a string")
    arch = archs[0] if archs else None
    if arch is None and model_type is None:
        raise ValueError("config has neither 'architectures' nor 'model_type': "
                         "cannot tell which model it describes")
    return arch, model_type


def rope_theta(config):
    """The RoPE base. transformers 5.x writes it into "rope_parameters"; older configs (and
    most published checkpoints) keep a top-level "rope_theta". Absent means 10000."""
    params = config.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"config 'rope_parameters' {params!r} is not an object")
        if "rope_theta" in params:
            return _theta(params["rope_theta"])
    if "rope_theta" in config:
        return _theta(config["rope_theta"])
    return DEFAULT_ROPE_THETA


def _theta(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"config rope_theta {value!r} is not a positive number")
    return float(value)


_REQUIRED = object()


def field(config, name, kind, default=_REQUIRED):
    """config[name] checked to be of `kind` (int, float, bool or str; an int is accepted for a
    float), or `default` when absent or null. A missing required field or a value of the wrong
    kind raises ValueError naming the field."""
    value = config.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"config.json has no {name!r}")
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"config.json {name!r} is {value!r}, expected {kind.__name__}")
    if kind is int and value <= 0 and default is _REQUIRED:
        raise ValueError(f"config.json {name!r} must be positive, got {value}")
    return value


def rope_type(config):
    """The rope_type of rope_parameters or the legacy rope_scaling: "default" unless either
    names another (a legacy rope_scaling beside a 5.x default rope_parameters still counts)."""
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if isinstance(params, dict):
            kind = params.get("rope_type", params.get("type"))
            if kind not in (None, "default"):
                return kind
    return "default"


def eos_token_ids(*sources):
    """The union of the eos_token_id entries (an int or a list) of config.json and
    generation_config.json dicts, in first-seen order."""
    ids = []
    for src in sources:
        value = (src or {}).get("eos_token_id")
        for tid in value if isinstance(value, list) else [value]:
            if isinstance(tid, int) and not isinstance(tid, bool) and tid not in ids:
                ids.append(tid)
    return ids
