"""Tokenizers: byte-level BPE loaded from Hugging Face tokenizer.json (Qwen2/Qwen3, GPT-2 style)."""
from .bpe import IncrementalDecoder, Tokenizer, TokenizerError

__all__ = ["IncrementalDecoder", "Tokenizer", "TokenizerError"]
