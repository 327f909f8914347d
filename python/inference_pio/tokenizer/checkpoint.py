"""A model's tokenizer together with its special tokens and chat template (ModelTokenizer), and the
Hugging Face checkpoint folder flavour of it: tokenizer.json (the BPE model), tokenizer_config.json
(special tokens, the chat template) and chat_template.jinja (which, as in transformers, takes
precedence over the config's template). tokenizer.gguf builds the same interface from GGUF
metadata."""
import json
import os

from .bpe import Tokenizer, TokenizerError
from .chat_template import ChatTemplate


class ModelTokenizer:
    """encode/decode plus the model's chat template and special tokens, whatever file they came
    from. `special_tokens` maps names ("bos_token", "eos_token", ...) to token text: what the chat
    template sees, as transformers passes its special_tokens_map. `eos_token_ids` lists every id
    that ends a turn (eos, and eot where the model has a distinct one)."""

    _TEMPLATE_SOURCE = "the tokenizer files"  # named in the error when there is no template

    def __init__(self, tokenizer, special_tokens, chat_template, eos_token_id, eos_token_ids=None):
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens
        self.bos_token = special_tokens.get("bos_token")
        self.eos_token = special_tokens.get("eos_token")
        self.chat_template = chat_template
        self.eos_token_id = eos_token_id
        if eos_token_ids is None:
            eos_token_ids = [] if eos_token_id is None else [eos_token_id]
        self.eos_token_ids = eos_token_ids

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
            raise TokenizerError(f"this model has no chat template ({self._TEMPLATE_SOURCE})")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, **{**self.special_tokens, **kwargs})


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


def _load_template(folder, config):
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return ChatTemplate(f.read())
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    return ChatTemplate(source) if isinstance(source, str) else None


class CheckpointTokenizer(ModelTokenizer):
    """The tokenizer of a Hugging Face checkpoint folder."""

    _TEMPLATE_SOURCE = "tokenizer_config.json chat_template or chat_template.jinja"

    def __init__(self, folder):
        folder = os.fspath(folder)
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise TokenizerError(f"{folder} has no tokenizer.json")
        tokenizer = Tokenizer.from_file(path)
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        self.config = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
        specials = {k: _token_text(v) for k, v in self.config.items()
                    if k.endswith("_token") and _token_text(v) is not None}
        eos = specials.get("eos_token")
        super().__init__(tokenizer, specials, _load_template(folder, self.config),
                         eos_token_id=None if eos is None else tokenizer.token_to_id(eos))
