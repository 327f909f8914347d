"""Tokenizers: byte-level BPE loaded from Hugging Face tokenizer.json (Qwen2/Qwen3, GPT-2 style),
and the checkpoint's own chat template rendered by a Jinja subset of our own."""
from .bpe import IncrementalDecoder, Tokenizer, TokenizerError
from .chat_template import ChatTemplate, TemplateError
from .checkpoint import CheckpointTokenizer

__all__ = ["ChatTemplate", "CheckpointTokenizer", "IncrementalDecoder", "TemplateError", "Tokenizer", "TokenizerError"]
