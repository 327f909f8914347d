"""The plugin interface: every registered model file is reachable as a plugin with
initialize(**kwargs) / load_model(config=None) / infer(data) / cleanup() / supports_config(config).
A plugin is a thin adapter over LLM, not a second implementation.

    plugin = get_plugin("Qwen3ForCausalLM")
    plugin.initialize(model="path/to/Qwen3-0.6B", dtype="bfloat16")
    plugin.load_model()
    plugin.infer({"prompt": "Hello", "max_tokens": 8, "temperature": 0})
    plugin.cleanup()
"""
import os

from .engine import LLM, SamplingParams
from .engine.loader import checkpoint_config
from inference_pio.models import model_class, registered, supported_architectures, UnsupportedModelError

_SAMPLING_FIELDS = set(SamplingParams.__dataclass_fields__)


class ModelPlugin:
    def __init__(self, name):
        self.name, self.model_class = name, registered(name)
        self.options, self.llm = {}, None

    def supports_config(self, config):
        """True when this plugin's model file serves the checkpoint (a config.json dict, a
        checkpoint folder or a GGUF file)."""
        if isinstance(config, (str, os.PathLike)):
            config = checkpoint_config(config)
        try:
            return model_class(config) is self.model_class
        except (UnsupportedModelError, ValueError):
            return False

    def initialize(self, **kwargs):
        """Stores LLM options (model=folder, device, dtype, max_model_len, ...) for load_model."""
        self.options.update(kwargs)
        return True

    def load_model(self, config=None):
        """Loads the checkpoint: `config` is a folder path, or a dict of LLM options merged over
        initialize's; returns the LLM."""
        options = dict(self.options)
        if isinstance(config, dict):
            options.update(config)
        elif config is not None:
            options["model"] = config
        if "model" not in options:
            raise ValueError("load_model needs a checkpoint: initialize(model=PATH) or load_model(PATH)")
        path = options.pop("model")
        if not self.supports_config(path):
            raise UnsupportedModelError(f"{path} is not a {self.name} checkpoint")
        self.llm = LLM(path, **options)
        return self.llm

    def infer(self, data):
        """Generates for `data`: a prompt (text or token ids), a dict {"prompt": ...} or
        {"messages": [...]} with sampling fields beside it (max_tokens, temperature, ...), or a
        list of such dicts. Returns a RequestOutput, or a list for a list."""
        if self.llm is None:
            raise RuntimeError("infer before load_model")
        if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
            return [self.infer(d) for d in data]
        if not isinstance(data, dict):
            return self.llm.generate(data, SamplingParams())[0]
        unknown = set(data) - _SAMPLING_FIELDS - {"prompt", "messages", "tools", "chat_template_kwargs"}
        if unknown:
            raise ValueError(f"unknown request fields: {', '.join(sorted(unknown))}")
        params = SamplingParams(**{k: v for k, v in data.items() if k in _SAMPLING_FIELDS})
        if "messages" in data:
            return self.llm.chat(data["messages"], params, tools=data.get("tools"),
                                 **data.get("chat_template_kwargs", {}))
        if "prompt" not in data:
            raise ValueError("a request needs 'prompt' or 'messages'")
        return self.llm.generate(data["prompt"], params)[0]

    def cleanup(self):
        """Drops the model and its KV cache."""
        self.llm = None
        return True


def get_plugin(name):
    """A fresh plugin for a registered architecture name (e.g. "Qwen3ForCausalLM" or "qwen3")."""
    return ModelPlugin(name)


def plugin_for(path):
    """The plugin for a checkpoint folder or GGUF file, chosen by its config, initialised with it."""
    plugin = ModelPlugin(model_class(checkpoint_config(path)).__name__)
    plugin.initialize(model=path)
    return plugin


def available_plugins():
    return supported_architectures()
