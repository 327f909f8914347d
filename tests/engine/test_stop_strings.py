"""Stop strings (SamplingParams.stop): a sequence stops at the token whose text completes a stop
string, wherever the token boundaries fall (across tokens, inside one, in the middle of a
multi-byte character's bytes); its text ends before the string (or after it, with
include_stop_str_in_output), its token_ids keep the tokens that completed it, finish_reason is
"stop" and stop_reason the string. Checked exhaustively on the decision itself (Sequence, against
a byte-offset oracle), then through the engine with chosen tokens, synchronous and overlapped,
and with the model's own seeded samples (overlapped outputs equal to the synchronous engine's)."""
import pytest

from inference_pio import LLM, CompletionOutput, SamplingParams
from inference_pio.engine.sequence import OutputText, Sequence, Status

from conftest import byte_token

ASCII = "The quick brown fox jumps over the lazy dog."
MIXED = "Café naïve 😀 数学!"  # 2-, 3- and 4-byte characters, some split over byte tokens


@pytest.fixture(scope="module")
def tok(tok_folder):
    return LLM(tok_folder[0], dtype="float32").tokenizer


def oracle(tok, ids, stops, include=False):
    """(token ids kept, text) for output ids stopped by `stops`, from byte offsets: the stop
    string that ends first in the full text (the longest on a tie) is completed by the token
    holding the last byte of its last character."""
    text = tok.decode(ids)
    found = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not found:
        return ids, text
    end, _, s = min(found)
    need = len(text[:end].encode())
    k, got = 0, 0
    while got < need:
        got += len(tok.tokenizer.token_bytes(ids[k]))
        k += 1
    return ids[:k], text[:end if include else end - len(s)]


def decide(tok, ids, **kw):
    """Feeds ids one by one to a Sequence as the engine does (max_tokens: all of them): (its
    completion ids, its text, finish_reason, stop_reason)."""
    params = SamplingParams(**{"max_tokens": len(ids), **kw})
    seq = Sequence(0, [1], params, (), output=OutputText.make(tok.incremental_decoder, params))
    for t in ids:
        seq.append(t, max_len=1000)
        if seq.status is Status.FINISHED:
            break
    return seq.completion_ids, seq.output.text, seq.finish_reason, seq.stop_reason


@pytest.mark.parametrize("text", [ASCII, MIXED])
@pytest.mark.parametrize("include", [False, True])
def test_every_stop_string_against_the_oracle(tok, text, include):
    ids = tok.encode(text)
    cases = {text[i:i + n] for n in (1, 2, 3, 5) for i in range(len(text) - n + 1)}
    for stop in sorted(cases):
        got_ids, got_text, reason, which = decide(tok, ids, stop=stop, include_stop_str_in_output=include)
        assert (got_ids, got_text) == oracle(tok, ids, [stop], include), stop
        assert reason == "stop" and which == stop
    # two stop strings: the one that ends first wins, whichever order they are given in
    for a, b in [("fox", "quick b"), ("brown", "own fox"), ("lazy", "z"), ("数学", "学")]:
        if a in text and b in text:
            for stops in ([a, b], [b, a]):
                got_ids, got_text, _, which = decide(tok, ids, stop=stops, include_stop_str_in_output=include)
                want_ids, want_text = oracle(tok, ids, stops, include)
                assert (got_ids, got_text) == (want_ids, want_text)
                assert which == min(stops, key=lambda s: (text.find(s) + len(s), -len(s)))


def test_byte_tokens_of_one_character(tok):
    """A character whose bytes are separate tokens completes at its last byte: not before."""
    ids = tok.encode(MIXED)
    emoji = [t for t in ids if tok.tokenizer.token_bytes(t) in (b" \xf0\x9f", b"\x98", b"\x80")]
    assert len(emoji) == 3  # " \xf0\x9f" + "\x98" + "\x80" (the fixture tokenizer's split)
    got_ids, text, reason, stop = decide(tok, ids, stop="😀")
    assert got_ids == ids[:ids.index(emoji[2]) + 1] and text == "Café naïve " and stop == "😀"
    # three byte tokens: the character (and a stop string ending in it) exists at the third
    ids = [byte_token(tok, b) for b in "a数b".encode()]
    assert decide(tok, ids, stop="数")[:2] == (ids[:4], "a")
    assert decide(tok, ids, stop="数b")[:2] == (ids, "a")
    assert decide(tok, ids, stop="a数", include_stop_str_in_output=True)[:2] == (ids[:4], "a数")


def test_unfinished_and_invalid_bytes(tok):
    """Without a stop the text is the tokenizer's decode of the ids, broken bytes included."""
    ids = [byte_token(tok, b) for b in b"ab\xe6\x95xy\xe6"]
    got_ids, text, reason, stop = decide(tok, ids, stop="zz")
    assert got_ids == ids and text == tok.decode(ids) == "ab\ufffdxy\ufffd" and reason == "length"
    assert stop is None
    # U+FFFD of a broken character is text like any other
    assert decide(tok, ids, stop="\ufffdx")[1] == "ab"


def test_settled_holds_back_a_possible_stop(tok):
    params = SamplingParams(stop=["abc", "bd", "xyz"])
    out = OutputText.make(tok.incremental_decoder, params)
    seen = []
    for ch in "zabxab":
        out.add(byte_token(tok, ord(ch)))
        seen.append(out.text[:out.settled()])
    # "ab" could become "abc", "b" could become "bd", "x" "xyz": each waits until it cannot
    assert seen == ["z", "z", "z", "zabx"[:3], "zabx", "zabx"]
    assert out.add(byte_token(tok, ord("c"))) == "abc" and out.text == "zabx" and out.settled() == 4


# ---- through the engine, with chosen tokens ----

@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def llm(request, tok_folder):
    return LLM(tok_folder[0], dtype="float32", overlap=request.param)


def writes(llm, script, text, prompt="Hello", **kw):
    """(the ids of text, generate's output) when the model writes text after prompt."""
    ids = llm.tokenizer.encode(text)
    script[tuple(llm.tokenizer.encode(prompt))] = ids + [byte_token(llm.tokenizer, ord("#"))]
    params = SamplingParams(**{"max_tokens": 60, **kw})
    return ids, llm.generate(prompt, params)[0]


def test_stop_across_tokens(llm, script):
    ids, out = writes(llm, script, ASCII, stop="ck br")  # "c", "k", " ", "b", "r": five tokens
    want_ids, want_text = oracle(llm.tokenizer, ids, ["ck br"])
    assert out.text == want_text == "The qui" and out.token_ids == want_ids
    assert out.finish_reason == "stop" and out.stop_reason == "ck br"
    assert out.outputs == [CompletionOutput(0, "The qui", want_ids, "stop", "ck br")]
    _, out = writes(llm, script, ASCII, stop=["nope", "ck br"], include_stop_str_in_output=True)
    assert out.text == "The quick br" and out.token_ids == want_ids


def test_stop_inside_the_first_token(llm, script):
    ids, out = writes(llm, script, " the lazy", stop="th")  # " the" is one token
    assert ids[0] == llm.tokenizer.encode(" the")[0] and out.token_ids == ids[:1]
    assert out.text == " " and out.finish_reason == "stop"
    _, out = writes(llm, script, " the lazy", stop="he", include_stop_str_in_output=True, max_tokens=1)
    assert out.text == " the" and out.finish_reason == "stop"  # the stop string outranks max_tokens


def test_multibyte_stop(llm, script):
    ids, out = writes(llm, script, MIXED, stop="数")
    assert (out.token_ids, out.text) == oracle(llm.tokenizer, ids, ["数"]) and out.text == "Café naïve 😀 "
    assert out.stop_reason == "数"


def test_prompt_suffix_does_not_stop(llm, script):
    """Only generated text counts: a prompt ending in the stop string does not stop at once."""
    ids, out = writes(llm, script, ASCII, prompt="so quick", stop="quick")
    assert out.text == "The " and out.token_ids == oracle(llm.tokenizer, ids, ["quick"])[0]
    _, out = writes(llm, script, "lazy dog", prompt="the fox", stop="fox", max_tokens=6)
    assert out.finish_reason == "length" and out.stop_reason is None and len(out.token_ids) == 6


def test_stop_token_ids_and_eos_reasons(llm, script):
    tok = llm.tokenizer
    stop_id = tok.encode(" ")[0]
    ids, out = writes(llm, script, ASCII, stop_token_ids=[stop_id], stop="lazy")
    assert out.token_ids == ids[:ids.index(stop_id) + 1] and out.text == "The "
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    eos = llm.eos_token_ids[0]
    script[tuple(tok.encode("Hi"))] = tok.encode("so then") + [eos]
    out = llm.generate("Hi", SamplingParams(max_tokens=30, stop="zzz"))[0]
    assert out.finish_reason == "stop" and out.stop_reason is None and out.token_ids[-1] == eos
    assert out.text == "so then"


def test_special_tokens_and_stop_strings(llm, script):
    """Stop strings match the text as returned: special tokens count only when kept."""
    tok = llm.tokenizer
    start = tok.encode("<|im_start|>")
    assert len(start) == 1
    script[tuple(tok.encode("Hi"))] = tok.encode("ab") + start + tok.encode("cd")
    kept = llm.generate("Hi", SamplingParams(max_tokens=8, stop="b<|im_start|>c", skip_special_tokens=False))[0]
    assert kept.text == "a" and kept.finish_reason == "stop"
    skipped = llm.generate("Hi", SamplingParams(max_tokens=8, stop="bc"))[0]
    assert skipped.text == "a" and len(skipped.token_ids) == 4  # "a" "b" <|im_start|> "c"


def test_stop_strings_need_a_tokenizer(tmp_path):
    from checkpoints import qwen3_model, save_hf
    llm = LLM(save_hf(qwen3_model(), tmp_path), dtype="float32")
    with pytest.raises(ValueError, match="stop strings need the model's tokenizer"):
        llm.generate([1, 2], SamplingParams(stop="x"))
    assert not llm.engine.has_unfinished()


def test_params_validation():
    assert SamplingParams(stop="ab").stop == ["ab"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    for bad in ("", [""], [1], ["a", None]):
        with pytest.raises(ValueError, match="SamplingParams.stop"):
            SamplingParams(stop=bad)
    with pytest.raises(ValueError, match="include_stop_str_in_output"):
        SamplingParams(include_stop_str_in_output=1)


# ---- the model's own tokens: overlapped decode equals the synchronous engine ----

PROMPTS = ["Hello there", "the quick brown fox jumps", "数学 😀 ok", "def encode(self"]


def test_overlap_equals_sync_on_sampled_text(tok_folder, device):
    """Stop strings taken from the reference run, each spanning two tokens of a sample, in one
    batch with requests that end otherwise: the overlapped engine (which has launched the next
    step when a stop string is found) returns exactly what the synchronous one does."""
    folder = tok_folder[0]
    sync, over = (LLM(folder, device=device, dtype="float32", overlap=o) for o in (False, True))
    rows = {}
    for llm in (sync, over):  # decode rows run, to see the steps launched behind a stop
        def counted(scheduled, *args, run=llm.engine.graphs.run, llm=llm):
            rows[llm] = rows.get(llm, 0) + len(scheduled)
            return run(scheduled, *args)
        llm.engine.graphs.run = counted
    free = [SamplingParams(max_tokens=24, temperature=1.0, seed=10 + i, ignore_eos=True) for i in range(4)]
    stops = []
    for prompt, p in zip(PROMPTS, free):
        texts = [d.text for d in sync.stream(prompt, p)]
        k = next(k for k in range(3, len(texts) - 1) if texts[k] and texts[k + 1])
        stops.append((texts[k][-1] + texts[k + 1][0], k))
    params = [SamplingParams(max_tokens=24, temperature=1.0, seed=10 + i, ignore_eos=True, stop=s)
              for i, (s, _) in enumerate(stops)]
    params[3] = SamplingParams(max_tokens=24, temperature=1.0, seed=13, ignore_eos=True)  # ends by length
    rows.clear()
    a, b = sync.generate(PROMPTS, params), over.generate(PROMPTS, params)
    assert rows[over] > rows[sync]  # the overlapped path ran, and dropped tokens past a stop
    assert [(o.prompt_token_ids, o.outputs) for o in a] == [(o.prompt_token_ids, o.outputs) for o in b]
    for out, (stop, k) in list(zip(a, stops))[:3]:
        assert out.finish_reason == "stop" and out.stop_reason == stop and stop not in out.text
        assert len(out.token_ids) <= k + 2
    assert a[3].finish_reason == "length" and len(a[3].token_ids) == 24
    for prompt, p in zip(PROMPTS, params):
        assert list(sync.stream(prompt, p)) == list(over.stream(prompt, p))
    assert over.engine._inflight is None and over.engine.blocks.num_free == over.engine.blocks.num_blocks
