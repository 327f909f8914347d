"""The tokenizer a GGUF file describes in its metadata (llama.cpp's `tokenizer.ggml.*` keys and
`tokenizer.chat_template`), built from the metadata dict a GGUF reader returns.

Only byte-level BPE (`tokenizer.ggml.model` = "gpt2") is supported: the vocabularies of the models
we run (Qwen3, SmolLM2, GLM). Choices, and where they come from:

- Token types (`tokenizer.ggml.token_type`): as transformers' GGUF conversion does, control tokens
  (3) and the tokens named by the bos/eos/unknown/padding ids become special added tokens, and
  user-defined tokens (4, e.g. Qwen's <think>) plain added tokens; all are matched whole in the
  raw text before pre-tokenization, and skip_special_tokens drops the special ones. Such a token
  with characters outside the byte alphabet stays a plain vocabulary entry (transformers treats a
  control one as a llama.cpp mislabel). Other types (normal, unknown, unused placeholders, byte)
  are plain vocabulary entries.
- Pre-tokenizer (`tokenizer.ggml.pre`): the types in PRE_TOKENIZERS, as llama.cpp defines them.
  Where transformers' GGUF conversion differs we follow llama.cpp, because llama.cpp reproduces
  the model's original tokenizer.json: "smollm" splits digits individually first (transformers
  has no "smollm" entry and falls back to the plain GPT-2 regex, which differs on a whitespace
  run before a digit: "  1"), and "llama-bpe" takes a pre-token found whole in the vocabulary
  without merging (ignore_merges, as Llama 3's tokenizer.json says). "default" (and a missing key)
  is the GPT-2 regex, as transformers reads it. Any other type is refused: a silently different
  split would feed the model token sequences it never saw in training.
- BOS/EOS: added by encode(add_special_tokens=True) only where `tokenizer.ggml.add_bos_token` /
  `add_eos_token` are true (absent = false, as in transformers).
- The chat template sees bos_token, eos_token, unk_token and pad_token as the token texts of the
  metadata's ids, which is what transformers passes it.
"""
from .bpe import Tokenizer, TokenizerError
from .chat_template import ChatTemplate
from .checkpoint import ModelTokenizer
from .pretokenize import bytes_to_unicode, split_gpt2, split_llama3, split_qwen2, split_smollm

# tokenizer.ggml.pre -> (pre-tokenizer splits applied in turn, ignore_merges)
PRE_TOKENIZERS = {
    "default": ((split_gpt2,), False),
    "gpt2": ((split_gpt2,), False),
    "smollm": ((split_smollm,), False),
    "qwen2": ((split_qwen2,), False),
    "llama-bpe": ((split_llama3,), True),
}
CONTROL, USER_DEFINED = 3, 4
# The names the chat template sees, and the metadata key of each one's id.
_NAMED_TOKENS = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                 ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
_BYTE_ENCODER = bytes_to_unicode()
_ALPHABET = frozenset(_BYTE_ENCODER.values())


def _array(metadata, key, item_type, required=True):
    value = metadata.get(key)
    if value is None:
        if required:
            raise TokenizerError(f"GGUF metadata has no {key}")
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, item_type) for v in value):
        raise TokenizerError(f"GGUF metadata {key} must be an array of {item_type.__name__}")
    return value


def _token_id(metadata, name, vocab_size):
    tid = metadata.get(f"tokenizer.ggml.{name}")
    if tid is not None and (not isinstance(tid, int) or not 0 <= tid < vocab_size):
        raise TokenizerError(f"GGUF metadata tokenizer.ggml.{name}={tid!r} is not a token id "
                             f"(vocabulary of {vocab_size})")
    return tid


def _byte_spelling(token):
    # GGUF stores added tokens as their text ("<think>", but also "a\tb"); the vocabulary and the
    # merges spell every token in the byte alphabet, so text outside it is respelled by its bytes.
    if _ALPHABET.issuperset(token):
        return token
    return "".join(_BYTE_ENCODER[b] for b in token.encode("utf-8"))


def _token_types(metadata, n):
    types = _array(metadata, "tokenizer.ggml.token_type", int, required=False)
    if types is not None and len(types) != n:
        raise TokenizerError(f"GGUF metadata tokenizer.ggml.token_type has {len(types)} entries "
                             f"for {n} tokens")
    return types if types is not None else [1] * n  # absent: all normal, as llama.cpp reads it


def _added_tokens(tokens, types, vocab, named_ids):
    """Control, user-defined and named special (bos/eos/unk/pad) tokens as tokenizer.json
    added_tokens entries; the control and named ones are special. The id is the vocabulary's (the
    last of duplicate spellings), as when transformers adds them."""
    return [{"id": vocab[tok], "content": tok, "normalized": False,
             "special": kind == CONTROL or i in named_ids}
            for i, (tok, kind) in enumerate(zip(tokens, types))
            if (kind in (CONTROL, USER_DEFINED) or i in named_ids) and _ALPHABET.issuperset(tok)]


def _pre_tokenizer(metadata):
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; "
                             f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    return PRE_TOKENIZERS[pre]


def _template(metadata, ids):
    """The post-processor template: BOS / EOS around the text (None) where the metadata asks."""
    def wanted(name):
        if not metadata.get(f"tokenizer.ggml.add_{name}_token"):
            return []
        if ids[f"{name}_token_id"] is None:
            raise TokenizerError(f"GGUF metadata sets add_{name}_token but has no "
                                 f"tokenizer.ggml.{name}_token_id")
        return [ids[f"{name}_token_id"]]

    bos, eos = wanted("bos"), wanted("eos")
    return bos + [None] + eos if bos or eos else None


def _chat_template(metadata):
    source = metadata.get("tokenizer.chat_template")
    if source is not None and not isinstance(source, str):
        raise TokenizerError("GGUF metadata tokenizer.chat_template must be a string")
    return None if source is None else ChatTemplate(source)


def build_tokenizer(metadata):
    """(Tokenizer, {metadata id name: id or None}) from GGUF metadata."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"unsupported GGUF tokenizer model tokenizer.ggml.model={model!r}: "
                             f"only 'gpt2' (byte-level BPE)")
    tokens = _array(metadata, "tokenizer.ggml.tokens", str)
    merges = _array(metadata, "tokenizer.ggml.merges", str)
    types = _token_types(metadata, len(tokens))
    ids = {name: _token_id(metadata, name, len(tokens))
           for name in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id",
                        "eot_token_id", "eom_token_id")}
    named_ids = {ids[key] for _, key in _NAMED_TOKENS} - {None}
    splits, ignore_merges = _pre_tokenizer(metadata)
    vocab = {_byte_spelling(tok): i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(vocab, merges, splits=splits, ignore_merges=ignore_merges,
                          added_tokens=_added_tokens(tokens, types, vocab, named_ids),
                          template=_template(metadata, ids))
    return tokenizer, ids


class GGUFTokenizer(ModelTokenizer):
    """The tokenizer, special tokens and chat template of a GGUF file, from its metadata dict
    (key -> plain Python value, arrays as lists). eos_token_ids: eos, then eot and eom (llama.cpp's
    other end-of-generation ids) where present and distinct."""

    _TEMPLATE_SOURCE = "no tokenizer.chat_template in the GGUF metadata"

    def __init__(self, metadata):
        tokenizer, ids = build_tokenizer(metadata)
        tokens = metadata["tokenizer.ggml.tokens"]
        specials = {name: tokens[ids[key]] for name, key in _NAMED_TOKENS if ids[key] is not None}
        stops = [ids[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id")
                 if ids[k] is not None]
        super().__init__(tokenizer, specials, _chat_template(metadata), ids["eos_token_id"],
                         eos_token_ids=list(dict.fromkeys(stops)))
