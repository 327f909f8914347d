"""Byte-level BPE against the Hugging Face `tokenizers` oracle.

Tokenizers are trained here with `tokenizers` itself (Qwen2-style: NFC + Split(Qwen regex) +
ByteLevel; GPT-2-style: ByteLevel(use_regex=true)), saved as tokenizer.json, loaded by ours, and
compared id for id on a fixed hard corpus plus random strings (fresh seed, printed).
"""
import json
import random
import sys
import time

import pytest

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, processors  # noqa: E402
from tokenizers import pre_tokenizers as pt  # noqa: E402

from bpe_training import qwen_pre_tokenizer, train as _train  # noqa: E402
from inference_pio.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from inference_pio.tokenizer.pretokenize import (GPT2_PATTERN, QWEN2_PATTERN,  # noqa: E402
                                                 WHITESPACE, char_class, split_gpt2, split_qwen2)


CORPUS = [
    "", " ", "  ", "\t", "\n", "\r\n", " \r\n ", "a", "Hello world", "Hello  world  ",
    "trailing spaces   ", "   leading", "tabs\t\tand\tspaces \t mixed",
    "line1\r\nline2\n\n\nline3\r",
    "x \n y", "x  \n\n  y", "  \n", "\n  x", "a\u3000b\u00a0c\u2028d\x85e", "sep\x1c\x1d\x1e\x1fx",
    "ctrl\x00\x01\x07\x08\x7f\x9b", "I'm, you're, he's, we've, they'll, I'd, don't",
    "I'M YOU'RE HE'S WE'VE THEY'LL I'D DON'T", "Mixed 'Re 'rE 'Ll 'lL 'S 'ſ 'x 'sa ''s",
    " 's 're", "def f(x):\n    return x ** 2  # square\n", "if (a&&b||!c) { return -1; }",
    "12345678901234567890", "3.14 and 2,718 and 1e-9", "½²٣①Ⅻ", "数学是研究数量、结构以及空间",
    "日本語 テキスト", "한국어", "😀😃🎉", "👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈", "✔️❤️", "e\u0301 cafe\u0301 A\u030a",
    "\u1e9b\u0323 \u212b \u2126", "ﬁﬂ ＡＢＣ １２３", "\U0001d400\U0001d7ce \U00010400",
    "\u105c0\u105c1 new letters", "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nreasoning</think>\n\nanswer", "word<|endoftext|>word", "<|im_start|><|im_end|>",
    "<|im_start", "<|im_end|><|im_end|>x", " <|endoftext|> ", "a<think>b</think>c",
    "<tool_call>{\"name\": \"f\"}</tool_call>", "  ok  then", "not ok", "café and cafe\u0301",
    "Ελληνικά русский עברית العربية हिन्दी ไทย", "— “quotes” ‘single’ …", "!!!???...;;;",
    "\u200b\u200c\u200d\ufeff", "\U0010fffd\U000e0001", "x" * 300, " " * 50 + "y", "\n" * 20,
]

POOL = (list("abcXYZ019 ' ' \t\n\r.,;!?-_(){}<>|") + list(WHITESPACE) +
        ["\x1c", "\x1f", "\x00", "\x7f", "ſ", "é", "e\u0301", "數", "字", "😀", "👩‍💻", "\u200d",
         "\ufe0f", "٣", "Ⅻ", "\u105c5", "\U00011f55", "'s", "'LL", "<|im_end|>", "<think>",
         "<|im_", "ok", "café", "\u0301"])


def random_strings(count):
    seed = random.SystemRandom().randrange(2**32)
    print(f"random seed {seed}")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if rng.random() < 0.3:  # any scalar value, surrogates excluded
            cps = [rng.randrange(0x110000) for _ in range(rng.randrange(1, 20))]
            out.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))
        else:
            out.append("".join(rng.choice(POOL) for _ in range(rng.randrange(1, 40))))
    return out


QWEN = "qwen"
GPT2 = "gpt2"
GPT2_PREFIX = "gpt2-prefix-template"


@pytest.fixture(scope="module", params=[QWEN, GPT2, GPT2_PREFIX])
def pair(request, tmp_path_factory):
    """(oracle, ours) for one tokenizer flavour, ours loaded from the saved tokenizer.json."""
    if request.param == QWEN:
        oracle = _train(qwen_pre_tokenizer())
    elif request.param == GPT2:
        oracle = _train(pt.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        template = processors.TemplateProcessing(single="<|im_start|> $A <|endoftext|>",
                                                 special_tokens=[("<|im_start|>", 701),
                                                                 ("<|endoftext|>", 700)])
        oracle = _train(pt.ByteLevel(add_prefix_space=True, use_regex=True),
                        post_processor=processors.Sequence([processors.ByteLevel(), template]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    oracle.save(str(path))
    return oracle, Tokenizer.from_file(str(path))


def test_special_token_ids_fixed(pair):
    oracle, ours = pair
    assert ours.token_to_id("<|endoftext|>") == oracle.token_to_id("<|endoftext|>") == 700
    assert ours.token_to_id("<|im_start|>") == 701  # the ids TemplateProcessing below relies on


def test_encode_corpus(pair):
    oracle, ours = pair
    for text in CORPUS:
        for add in (False, True):
            assert ours.encode(text, add_special_tokens=add) == \
                oracle.encode(text, add_special_tokens=add).ids, repr(text)


def test_encode_random(pair):
    oracle, ours = pair
    for text in random_strings(400):
        assert ours.encode(text, add_special_tokens=False) == \
            oracle.encode(text, add_special_tokens=False).ids, repr(text)


def test_decode_roundtrip(pair):
    oracle, ours = pair
    for text in CORPUS + random_strings(100):
        ids = oracle.encode(text, add_special_tokens=False).ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                oracle.decode(ids, skip_special_tokens=skip), repr(text)


def test_decode_random_ids(pair):
    """Arbitrary id streams, so many byte tokens form invalid UTF-8: U+FFFD placement must match
    the oracle's from_utf8_lossy, and ids past the vocabulary are skipped as the oracle does."""
    oracle, ours = pair
    rng = random.Random(random.SystemRandom().randrange(2**32))
    n = oracle.get_vocab_size()
    assert ours.vocab_size == n
    for _ in range(300):
        ids = [rng.randrange(n + 3) for _ in range(rng.randrange(1, 12))]
        for skip in (False, True):
            assert ours.decode(ids, skip) == oracle.decode(ids, skip_special_tokens=skip), ids
        dec = ours.incremental_decoder()
        assert "".join(dec.add(i) for i in ids) + dec.finish() == ours.decode(ids)


def test_incremental_decoder(pair):
    oracle, ours = pair
    for text in CORPUS + random_strings(100):
        ids = ours.encode(text, add_special_tokens=False)
        for skip in (False, True):
            dec = ours.incremental_decoder(skip_special_tokens=skip)
            deltas = [dec.add(i) for i in ids] + [dec.finish()]
            full = oracle.decode(ids, skip_special_tokens=skip)
            assert "".join(deltas) == full, repr(text)
            # A split character's bytes wait for the rest: no delta mangles them into U+FFFD, so
            # the text streamed so far is always a prefix of the final text.
            for k in range(len(deltas)):
                assert full.startswith("".join(deltas[:k + 1])), (repr(text), deltas)


def test_token_lookup(pair):
    oracle, ours = pair
    for tid in range(oracle.get_vocab_size()):
        assert ours.id_to_token(tid) == oracle.id_to_token(tid)
        assert ours.token_to_id(oracle.id_to_token(tid)) == tid
    assert ours.token_to_id("no such token") is None and ours.id_to_token(10**6) is None


def _qwen_dict(tmp_path_factory=None):
    tok = _train(qwen_pre_tokenizer())
    return json.loads(tok.to_str())


@pytest.fixture(scope="module")
def qwen_dict():
    return _qwen_dict()


def test_merges_as_strings(qwen_dict):
    """Older tokenizer.json files write each merge as one "a b" string."""
    d = json.loads(json.dumps(qwen_dict))
    assert isinstance(d["model"]["merges"][0], list)
    pairs = Tokenizer.from_dict(d)
    d["model"]["merges"] = [" ".join(m) for m in d["model"]["merges"]]
    strings = Tokenizer.from_dict(d)
    oracle = tokenizers.Tokenizer.from_str(json.dumps(d))
    for text in CORPUS:
        assert strings.encode(text) == pairs.encode(text) == oracle.encode(text).ids


@pytest.mark.parametrize("unk", [None, "!"])
def test_symbol_outside_vocab(qwen_dict, unk):
    """A byte missing from the vocabulary is dropped, or becomes unk_token when there is one."""
    d = json.loads(json.dumps(qwen_dict))
    gone = "ā"  # byte 0x01
    del d["model"]["vocab"][gone]
    d["model"]["merges"] = [m for m in d["model"]["merges"] if gone not in "".join(m)]
    d["model"]["unk_token"] = unk
    oracle = tokenizers.Tokenizer.from_str(json.dumps(d))
    ours = Tokenizer.from_dict(d)
    for text in ["\x01", "a\x01b", "x \x01\x01 y"]:
        assert ours.encode(text) == oracle.encode(text).ids, repr(text)


def test_ignore_merges(qwen_dict):
    """ignore_merges=true: a pre-token that is itself in the vocabulary is taken whole."""
    d = json.loads(json.dumps(qwen_dict))
    d["model"]["merges"] = [m for m in d["model"]["merges"] if "".join(m) != "Ġthe"]
    the = d["model"]["vocab"]["Ġthe"]  # now unreachable by merging
    for ignore in (False, True):
        d["model"]["ignore_merges"] = ignore
        oracle, ours = tokenizers.Tokenizer.from_str(json.dumps(d)), Tokenizer.from_dict(d)
        for text in CORPUS + ["in the theatre"]:
            assert ours.encode(text) == oracle.encode(text).ids, repr(text)
        assert (the in ours.encode("in the theatre")) == ignore


def test_long_words(pair):
    """Pre-tokens thousands of characters long (minified data, whitespace runs) stay fast."""
    oracle, ours = pair
    rng = random.Random(0)
    texts = ["".join(rng.choice("thequickbrownfoxQRZ") for _ in range(20000)),
             "the" * 7000, " " * 20000 + "x", "\t\n" * 5000, "1234567890" * 2000, "😀" * 5000]
    t0 = time.perf_counter()
    got = [ours.encode(t) for t in texts]
    assert time.perf_counter() - t0 < 10
    assert got == [oracle.encode(t).ids for t in texts]


def test_split_scanners_match_oracle_regex():
    """The hand-written scanners against onig running the very patterns (all planes sampled)."""
    oracles = {QWEN2_PATTERN: split_qwen2, GPT2_PATTERN: split_gpt2}
    strings = CORPUS + random_strings(1500)
    for pattern, ours in oracles.items():
        split = pt.Split(Regex(pattern), behavior="isolated")
        for text in strings:
            if text:
                assert ours(text) == [p for p, _ in split.pre_tokenize_str(text)], repr(text)


def test_char_classes_match_oracle():
    """\\s, \\p{L}, \\p{N} as onig sees them, for every scalar value (incl. letters newer than
    this Python's unicodedata and the \\x1c-\\x1f separators that str.isspace() calls space)."""
    chars = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    ours = {c: char_class(c) for c in chars}
    for cls, pattern in (("S", r"\s"), ("L", r"\p{L}"), ("N", r"\p{N}")):
        remove = pt.Split(Regex(pattern), behavior="removed")
        kept = set()
        for k in range(0, len(chars), 65536):
            for piece, _ in remove.pre_tokenize_str(chars[k:k + 65536]):
                kept.update(piece)
        wrong = [hex(ord(c)) for c in chars if (c not in kept) != (ours[c] == cls)]
        assert not wrong, (cls, wrong[:20])


def _break(d, path, value):
    d = json.loads(json.dumps(d))
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return d


@pytest.mark.parametrize("path, value, fragment", [
    (("model", "type"), "WordPiece", "unsupported model type 'WordPiece'"),
    (("normalizer",), {"type": "Lowercase"}, "unsupported normalizer 'Lowercase'"),
    (("pre_tokenizer",), {"type": "Whitespace"}, "needs ByteLevel last"),
    (("pre_tokenizer", "pretokenizers", 0), {"type": "Digits", "individual_digits": True},
     "unsupported pre_tokenizer 'Digits'"),
    (("pre_tokenizer", "pretokenizers", 0, "pattern"), {"Regex": r"\s+|\w+"},
     r"unsupported Split pattern '\\s+|\\w+'"),
    (("pre_tokenizer", "pretokenizers", 0, "behavior"), "Removed", "unsupported Split behavior"),
    (("decoder",), {"type": "WordPiece"}, "unsupported decoder 'WordPiece'"),
    (("post_processor",), {"type": "BertProcessing"}, "unsupported post_processor"),
    (("model", "byte_fallback"), True, "byte_fallback"),
    (("model", "merges"), [["Ġ", "no-such"]], "bad merge #0"),
    (("added_tokens", 0, "single_word"), True, "single_word"),
])
def test_unsupported(qwen_dict, path, value, fragment):
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dict(_break(qwen_dict, path, value))
    assert fragment in str(e.value)


def test_malformed_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE", ')
    with pytest.raises(TokenizerError, match="malformed tokenizer.json"):
        Tokenizer.from_file(str(bad))
    with pytest.raises(TokenizerError, match="JSON object"):
        Tokenizer.from_dict([1, 2])


@pytest.mark.parametrize("path, value", [(("added_tokens", 0), {"content": "<x>"}),
                                         (("model", "vocab"), [1, 2]),
                                         (("pre_tokenizer", "pretokenizers"), 7)])
def test_malformed_structure(qwen_dict, path, value):
    with pytest.raises(TokenizerError, match="malformed tokenizer.json"):
        Tokenizer.from_dict(_break(qwen_dict, path, value))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
