"""Tiny byte-level BPE tokenizers trained with the `tokenizers` library (test-only), in the
layouts of the real checkpoints: Qwen2/Qwen3 (NFC + Split(Qwen regex) + ByteLevel) and GPT-2."""
import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, decoders, models, normalizers  # noqa: E402
from tokenizers import pre_tokenizers as pt  # noqa: E402
from tokenizers.trainers import BpeTrainer  # noqa: E402

from inference_pio.tokenizer.pretokenize import QWEN2_PATTERN  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
NON_SPECIAL = ["<think>", "</think>", "<tool_call>"]

TRAIN = """\
The quick brown fox jumps over the lazy dog. It's the dog's day; they're sure we've won, I'm told
you'll see he'd agree. DON'T SHOUT! Don'T mix CaSe's.
def encode(self, text: str) -> list[int]:
    if not text:\treturn []
    return [self.vocab[t] for t in text.split()]  # 1234567890
for (int i = 0; i < n; ++i) { x[i] = y[i] * 2.5f; }\r\n
    indented    line   with   runs     of spaces   \n\n\n
数学是研究数量、结构以及空间等概念的一门学科。日本語のテキストも少し。한국어 문장도.
Emoji: 😀😃🎉 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 ✔️ ❤️
Café naïve résumé coöperate — “quotes” ‘single’ «guillemets» … ½ ² ٣ ① Ⅻ
Numbers 3.14159 1,000,000 0x1F 2024-06-01 +44 (0) 20 7946 0958
Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย
"""


def train(pre_tokenizer, *, post_processor=None, vocab_size=700):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=pt.ByteLevel.alphabet(),
                         show_progress=False)
    tok.train_from_iterator(TRAIN.splitlines(keepends=True) * 3, trainer)
    tok.add_special_tokens(SPECIAL)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL])
    tok.add_tokens([AddedToken("café", normalized=True),  # matched after NFC
                    AddedToken("ok", lstrip=True, rstrip=True, normalized=False)])
    if post_processor is not None:
        tok.post_processor = post_processor
    return tok


def qwen_pre_tokenizer():
    return pt.Sequence([pt.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])
