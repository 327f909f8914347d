"""The tokenizer files of a Hugging Face checkpoint folder, read together: tokenizer.json (the
BPE model), tokenizer_config.json (special tokens, the chat template) and chat_template.jinja
(which, as in transformers, takes precedence over the config's template)."""
import json
import os

from .bpe import Tokenizer, TokenizerError
from .chat_template import ChatTemplate


def _token_text(value):
    """A special token as tokenizer_config writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"malformed {path}: {e}") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"malformed {path}: not a JSON object")
    return obj


class CheckpointTokenizer:
    """encode/decode plus the checkpoint's chat template and special tokens."""

    def __init__(self, folder):
        folder = os.fspath(folder)
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise TokenizerError(f"{folder} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(path)
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        self.config = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.chat_template = self._load_template(folder)

    def _load_template(self, folder):
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                return ChatTemplate(f.read())
        source = self.config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        return ChatTemplate(source) if isinstance(source, str) else None

    @property
    def eos_token_id(self):
        return None if self.eos_token is None else self.tokenizer.token_to_id(self.eos_token)

    def encode(self, text, add_special_tokens=True):
        return self.tokenizer.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode(ids, skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens=False):
        return self.tokenizer.incremental_decoder(skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None, **kwargs):
        """The prompt text for a conversation, as transformers' apply_chat_template(tokenize=False)
        renders it: the special tokens are visible to the template, and extra keyword arguments
        (enable_thinking=False, ...) are passed through."""
        if self.chat_template is None:
            raise TokenizerError("this checkpoint has no chat template (tokenizer_config.json "
                                 "chat_template or chat_template.jinja)")
        specials = {k: _token_text(v) for k, v in self.config.items()
                    if k.endswith("_token") and _token_text(v) is not None}
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, **{**specials, **kwargs})
