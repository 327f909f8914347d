"""Tokenizers: byte-level BPE loaded from Hugging Face tokenizer.json (Qwen2/Qwen3, GPT-2 style) or
from GGUF metadata, and the model's own chat template rendered by a Jinja subset of our own."""
from .bpe import IncrementalDecoder, Tokenizer, TokenizerError
from .chat_template import ChatTemplate, TemplateError
from .checkpoint import CheckpointTokenizer, ModelTokenizer
from .gguf import GGUFTokenizer

__all__ = ["ChatTemplate", "CheckpointTokenizer", "GGUFTokenizer", "IncrementalDecoder",
           "ModelTokenizer", "TemplateError", "Tokenizer", "TokenizerError"]
