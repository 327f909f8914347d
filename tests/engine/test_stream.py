"""llm.stream: a delta per generated token; text that could still be the start of a stop string is
held back until resolved (and never sent when it becomes one), a multi-byte character is sent
whole once its last byte arrives, and one sample's delta texts add up to its generate() text.
Several prompts (and n samples) stream together, each delta tagged with its prompt and sample.
Chosen tokens (the `script` fixture) pin the boundaries; synchronous and overlapped decode alike."""
import pytest

from inference_pio import LLM, SamplingParams, StreamDelta

from conftest import byte_token


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def llm(request, tok_folder):
    return LLM(tok_folder[0], dtype="float32", overlap=request.param)


def chars(llm, text):
    """One single-byte token per byte of text."""
    return [byte_token(llm.tokenizer, b) for b in text.encode()]


def test_held_back_until_resolved(llm, script):
    ids = chars(llm, "zabxabc") + chars(llm, "!!")
    script[tuple(llm.tokenizer.encode("Hi"))] = ids
    deltas = list(llm.stream("Hi", SamplingParams(max_tokens=20, stop=["abc", "bd", "xyz"])))
    # "a", "ab": maybe "abc"; "x": maybe "xyz"; "ab" again, then "c" completes "abc": never sent
    assert [d.text for d in deltas] == ["z", "", "", "ab", "x", "", ""]
    assert [d.token_id for d in deltas] == ids[:7]
    assert deltas[-1] == StreamDelta(ids[6], "", "stop", "abc")
    assert all(d.finish_reason is None and d.stop_reason is None for d in deltas[:-1])
    # held text that cannot become a stop string is released as soon as that is known...
    deltas = list(llm.stream("Hi", SamplingParams(max_tokens=4, stop="abz")))
    assert [d.text for d in deltas] == ["z", "", "", "abx"]
    # ...and at the end (length), whatever it could have become
    deltas = list(llm.stream("Hi", SamplingParams(max_tokens=3, stop="abz")))
    assert [d.text for d in deltas] == ["z", "", "ab"] and deltas[-1].finish_reason == "length"


@pytest.mark.parametrize("stop,include", [("fox", False), ("ck b", True), (["own", "n f"], False),
                                          ("😀", False), ("数学", True), ("é n", False), ("nope", False)])
def test_deltas_add_up_to_generate(llm, script, stop, include):
    text = "The quick brown fox. Café naïve 😀 数学!"
    for ids in (llm.tokenizer.encode(text), chars(llm, text)):  # BPE tokens, then single bytes
        script[tuple(llm.tokenizer.encode("Hi"))] = ids
        params = SamplingParams(max_tokens=len(ids), stop=stop, include_stop_str_in_output=include)
        out = llm.generate("Hi", params)[0]
        deltas = list(llm.stream("Hi", params))
        assert [d.token_id for d in deltas] == out.token_ids
        assert "".join(d.text for d in deltas) == out.text
        assert deltas[-1].finish_reason == out.finish_reason and deltas[-1].stop_reason == out.stop_reason
        assert not any("\ufffd" in d.text for d in deltas)  # never a broken character
        stops = [stop] if isinstance(stop, str) else stop
        if not include:
            assert not any(s in out.text for s in stops)
        assert out.finish_reason == ("length" if stop == "nope" else "stop")
        if stop == "nope":
            assert out.text == text


def test_bytes_of_a_character_send_it_once(llm, script):
    ids = chars(llm, "a数😀")
    script[tuple(llm.tokenizer.encode("Hi"))] = ids
    deltas = list(llm.stream("Hi", SamplingParams(max_tokens=len(ids))))
    assert [d.text for d in deltas] == ["a", "", "", "数", "", "", "", "😀"]


def test_several_prompts_and_samples(llm, script):
    tok = llm.tokenizer
    prompts = ["Hi", "Hello there", [5, 6, 7]]
    texts = ["one two three", "alpha beta gamma delta", "x y z"]
    for p, t in zip(prompts, texts):
        script[tuple(tok.encode(p) if isinstance(p, str) else p)] = tok.encode(t)
    script[(tuple(tok.encode("Hello there")), 1)] = tok.encode("alpha omega beta")
    params = [SamplingParams(max_tokens=30, stop="three"),
              SamplingParams(max_tokens=30, stop=" beta", n=2),
              SamplingParams(max_tokens=3)]
    deltas = list(llm.stream(prompts, params))
    outs = llm.generate(prompts, params)
    got = {}
    for d in deltas:
        got.setdefault((d.prompt_index, d.sample_index), []).append(d)
    assert sorted(got) == [(0, 0), (1, 0), (1, 1), (2, 0)]
    for (p, i), ds in got.items():
        out = outs[p].outputs[i]
        assert [d.token_id for d in ds] == out.token_ids and "".join(d.text for d in ds) == out.text
        assert [d.finish_reason for d in ds] == [None] * (len(ds) - 1) + [out.finish_reason]
    want = [["one two "], ["alpha", "alpha omega"], [tok.decode(tok.encode("x y z")[:3])]]
    assert [[o.text for o in out.outputs] for out in outs] == want
    # run together: every request's first token comes before any request's last
    firsts = [deltas.index(ds[0]) for ds in got.values()]
    lasts = [deltas.index(ds[-1]) for ds in got.values()]
    assert max(firsts) < min(lasts)
    # one prompt given as a list of ids is one prompt, not a list of prompts
    assert {d.prompt_index for d in llm.stream([5, 6, 7], SamplingParams(max_tokens=2))} == {0}


def test_closing_early_aborts_everything(llm, script):
    tok = llm.tokenizer
    script[tuple(tok.encode("Hi"))] = tok.encode("one two three four five")
    stream = llm.stream(["Hi", "Hi"], SamplingParams(max_tokens=20, n=2, stop="zz"))
    for _ in range(5):
        next(stream)
    stream.close()
    eng = llm.engine
    assert eng._inflight is None and not eng.has_unfinished() and eng.blocks.num_free == eng.blocks.num_blocks


def test_sampled_n_stream_matches_generate(tok_folder, device):
    """The model's own seeded samples: the n samples' streams are generate's outputs, and the
    overlapped engine streams exactly what the synchronous one does."""
    sync, over = (LLM(tok_folder[0], device=device, dtype="float32", overlap=o) for o in (False, True))
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=5, n=3, ignore_eos=True)
    out = sync.generate("the quick brown fox", params)[0]
    deltas = list(sync.stream("the quick brown fox", params))
    assert deltas == list(over.stream("the quick brown fox", params))
    for i, sample in enumerate(out.outputs):
        mine = [d for d in deltas if d.sample_index == i]
        assert [d.token_id for d in mine] == sample.token_ids and "".join(d.text for d in mine) == sample.text


@pytest.mark.parametrize("overlap", [False, True])
def test_stream_carries_the_logprobs_generate_reports(tok_folder, overlap):
    """With SamplingParams.logprobs, each delta holds its token's entry of the output's logprobs."""
    llm = LLM(tok_folder[0], dtype="float32", overlap=overlap)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=3, logprobs=2, ignore_eos=True)
    out = llm.generate("the quick brown fox", params)[0]
    deltas = list(llm.stream("the quick brown fox", params))
    assert [d.token_id for d in deltas] == out.token_ids
    assert [d.logprobs for d in deltas] == out.logprobs
    assert all(next(iter(d.logprobs)) == d.token_id and len(d.logprobs) >= 2 for d in deltas)
    plain = list(llm.stream("the quick brown fox", SamplingParams(max_tokens=2, ignore_eos=True)))
    assert all(d.logprobs is None for d in plain)
