"""Overlapped decode (LLMEngine(overlap=...)): a decode step launched before the one before it is
read back. On the CPU overlap=True runs the same code path (the read back is immediate); on a GPU
the same tests run with the overlap that "auto" turns on. Whatever the engine does ahead, each
request gets exactly the tokens, finish reasons and texts of the synchronous engine: sequences
that finish at different steps (max_tokens, EOS, stop ids, the context length), greedy and seeded
sampling in one batch, requests added while others decode, aborts, preemption."""
import pytest

from inference_pio import LLM, SamplingParams
from inference_pio.engine.sequence import PLACEHOLDER, Sequence, Status

from checkpoints import qwen3_model, save_hf, save_qwen_tokenizer

# different prompt lengths; greedy and seeded rows of every kind of filter
PROMPTS = [[5, 9, 2], [17] * 11, [3, 1, 4, 1, 5, 9, 2, 6], [250, 7], list(range(30, 50)), [8] * 5]
KINDS = [dict(temperature=0), dict(temperature=0.9, seed=1), dict(temperature=0.7, top_k=20, seed=2),
         dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=4), dict(temperature=0.8, min_p=0.05, seed=5)]


def drive(llm, requests, aborts=None):
    """Steps llm's engine until it is idle. requests: [(prompt, SamplingParams, call)], each added
    before step() call number `call`; aborts: {call: [request index]}, aborted before that call.
    Checks that every request's events are its completion, in order, finishing it last, and that
    nothing is left behind; returns ({index: (completion ids, finish reason)}, whether a step was
    ever left in flight between calls)."""
    eng, aborts = llm.engine, aborts or {}
    seqs, events, call, overlapped = {}, {}, 0, False
    while len(seqs) < len(requests) or eng.has_unfinished():
        for i, (prompt, params, at) in enumerate(requests):
            if at == call:
                seqs[i] = eng.add_request(prompt, params)
        for i in aborts.get(call, ()):
            eng.abort(seqs[i])
        for seq, tid in eng.step():
            assert seq.status is not Status.FINISHED or seq.finish_reason != "abort"
            events.setdefault(seq.request_id, []).append((tid, seq.finish_reason))
        if eng._inflight is not None:
            overlapped = True
            assert eng.has_unfinished()
        call += 1
    out = {}
    for i, seq in seqs.items():
        got = events.get(seq.request_id, [])
        assert [t for t, _ in got] == seq.completion_ids
        reasons = [r for _, r in got]
        if seq.finish_reason == "abort":
            assert reasons == [None] * len(got)
        else:
            assert reasons == [None] * (len(got) - 1) + [seq.finish_reason]
        assert seq.num_pending == 0 and PLACEHOLDER not in seq.token_ids and seq.block_table == []
        out[i] = (seq.completion_ids, seq.finish_reason)
    assert eng._inflight is None and eng.blocks.num_free == eng.blocks.num_blocks
    return out, overlapped


def count_decode_rows(llm):
    """llm with the rows of its decode graph runs counted in llm.decode_rows."""
    graphs, run = llm.engine.graphs, llm.engine.graphs.run
    llm.decode_rows = 0

    def counted(scheduled, *args):
        llm.decode_rows += len(scheduled)
        return run(scheduled, *args)
    graphs.run = counted
    return llm


def both(folder, device, requests, aborts=None, **kwargs):
    """drive() with overlap off, then on: the two results (asserted equal) and the two LLMs
    (with their decode rows counted)."""
    llms = [count_decode_rows(LLM(folder, device=device, dtype="float32", overlap=o, **kwargs))
            for o in (False, True)]
    (sync, sync_flight), (over, over_flight) = (drive(llm, requests, aborts) for llm in llms)
    assert not sync_flight and over_flight  # the overlapped path really ran
    assert over == sync
    return sync, llms


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(plain folder, folder whose generation config names an EOS token, reference completions):
    the EOS is a token that request 1 samples at its 7th step in the reference run (24 tokens
    of each request, no stops, overlap off)."""
    model = qwen3_model(seed=5)
    plain = save_hf(model, tmp_path_factory.mktemp("overlap-plain"))
    params = [SamplingParams(max_tokens=24, **k) for k in KINDS]
    ref = [o.token_ids for o in LLM(plain, dtype="float32", overlap=False).generate(PROMPTS, params)]
    with_eos = save_hf(model, tmp_path_factory.mktemp("overlap-eos"), generation={"eos_token_id": ref[1][6]})
    return plain, with_eos, ref


def test_finishing_at_different_steps(folders, device):
    """max_tokens, the EOS of the generation config, stop ids and ignore_eos in one batch: the
    sequences finish at different steps, so the steps launched ahead carry finished rows."""
    _, folder, ref = folders
    extra = [dict(max_tokens=9), dict(max_tokens=24), dict(max_tokens=17, stop_token_ids=[ref[2][10]]),
             dict(max_tokens=24, ignore_eos=True), dict(max_tokens=13),
             dict(max_tokens=24, ignore_eos=True, stop_token_ids=[ref[5][3]])]
    requests = [(p, SamplingParams(**k, **e), 0) for p, k, e in zip(PROMPTS, KINDS, extra)]
    out, (sync, over) = both(folder, device, requests)
    reasons = [r for _, r in out.values()]
    assert reasons.count("stop") >= 2 and reasons.count("length") >= 2
    assert len({len(ids) for ids, _ in out.values()}) >= 4
    assert over.decode_rows > sync.decode_rows  # a row of the step launched behind a stop token


def test_seeded_and_greedy_long_run(folders, device):
    plain, _, ref = folders
    requests = [(p, SamplingParams(max_tokens=24, **k), 0) for p, k in zip(PROMPTS, KINDS)]
    out, (sync, over) = both(plain, device, requests)
    if device == "cpu":  # the same draws as the reference run (per-request generators)
        assert [ids for ids, _ in out.values()] == ref
    # finishing by length is known ahead: no step is launched behind it, no row is wasted
    assert over.decode_rows == sync.decode_rows


def test_requests_added_while_others_decode(folders, device):
    plain, _, _ = folders
    calls = [0, 0, 2, 5, 6, 11]
    requests = [(p, SamplingParams(max_tokens=6 + 3 * i, **k), at)
                for i, (p, k, at) in enumerate(zip(PROMPTS, KINDS, calls))]
    both(plain, device, requests)


def test_abort_while_a_step_is_in_flight(folders, device):
    plain, _, _ = folders
    requests = [(p, SamplingParams(max_tokens=20, **k), 0) for p, k in zip(PROMPTS, KINDS)]
    out, _ = both(plain, device, requests, aborts={4: [1], 7: [3, 0]})
    assert [out[i][1] for i in (0, 1, 3)] == ["abort"] * 3
    assert 0 < len(out[1][0]) < len(out[0][0]) < 20


def test_abort_everything_in_flight(folders):
    """A step in flight keeps the engine unfinished after its sequences are aborted; reading it
    back reports nothing."""
    llm = LLM(folders[0], dtype="float32", overlap=True)
    eng = llm.engine
    seqs = [eng.add_request(p, SamplingParams(max_tokens=10, temperature=0)) for p in PROMPTS[:3]]
    eng.step()  # prefill
    first = eng.step()  # launches decode steps 1 and 2, reports step 1
    assert [s for s, _ in first] == seqs and eng._inflight is not None
    for s in seqs:
        eng.abort(s)
        assert len(s.completion_ids) == 2 and s.num_pending == 0
    assert eng.has_unfinished() and eng.step() == [] and not eng.has_unfinished()
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_tight_cache_preemption_and_context_length(folders, device):
    """Blocks run short (the step is not launched ahead; the synchronous step preempts) and
    sequences end at the context length."""
    plain, _, _ = folders
    requests = [(p, SamplingParams(max_tokens=40, **k), 0) for p, k in zip(PROMPTS[:5], KINDS)]
    out, llms = both(plain, device, requests, kv_cache_tokens=64, max_model_len=40, block_size=4,
                     max_num_batched_tokens=16, max_num_seqs=4)
    assert all(llm.engine.scheduler.num_preemptions > 0 for llm in llms)
    assert llms[0].engine.scheduler.num_preemptions == llms[1].engine.scheduler.num_preemptions
    assert [len(PROMPTS[i]) + len(ids) for i, (ids, _) in out.items()].count(40) >= 2


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("overlap-tok")
    oracle = save_qwen_tokenizer(folder)
    save_hf(qwen3_model(seed=7), folder, generation={"eos_token_id": oracle.token_to_id("<|im_end|>")})
    return folder


def test_generate_and_stream_texts(with_tokenizer, device):
    prompts = ["Hello there", "the quick brown fox jumps", "数学 😀 ok"]
    params = [SamplingParams(max_tokens=m, temperature=t, seed=s)
              for m, t, s in ((12, 0, None), (20, 0.9, 3), (7, 1.0, 8))]
    sync, over = (LLM(with_tokenizer, device=device, dtype="float32", overlap=o) for o in (False, True))
    a, b = sync.generate(prompts, params), over.generate(prompts, params)
    assert [(o.token_ids, o.text, o.finish_reason) for o in b] == [(o.token_ids, o.text, o.finish_reason) for o in a]
    for prompt, p in zip(prompts, params):
        deltas = [list(llm.stream(prompt, p)) for llm in (sync, over)]
        assert deltas[1] == deltas[0] and len(deltas[0]) > 1
        assert over.engine._inflight is None and not over.engine.has_unfinished()
    # a stream closed early aborts its request and leaves no step in flight
    stream = over.stream(prompts[1], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    for _ in range(4):
        next(stream)
    stream.close()
    assert over.engine._inflight is None and not over.engine.has_unfinished()
    assert over.engine.blocks.num_free == over.engine.blocks.num_blocks


def test_auto_is_on_for_a_gpu(folders, device):
    assert LLM(folders[0], device=device, dtype="float32").engine.overlap is (device != "cpu")


def test_overlap_option(folders):
    plain = folders[0]
    assert LLM(plain).engine.overlap is False  # "auto" is off on the CPU
    assert LLM(plain, overlap=True).engine.overlap is True
    with pytest.raises(ValueError, match="overlap needs the decode graphs"):
        LLM(plain, enforce_eager=True, overlap=True)
    with pytest.raises(ValueError, match="overlap must be"):
        LLM(plain, overlap="yes")


def test_sequence_placeholders():
    seq = Sequence(0, [1, 2, 3], SamplingParams(max_tokens=3, stop_token_ids=[9]), ())
    seq.num_computed = 2
    seq.append_placeholder()
    seq.append_placeholder()
    assert seq.num_tokens == 5 and seq.num_pending == 2 and seq.completion_ids == []
    seq.fill(4, max_len=100)
    assert seq.token_ids == [1, 2, 3, 4, PLACEHOLDER] and seq.completion_ids == [4]
    seq.fill(9, max_len=100)  # a stop id
    assert seq.status is Status.FINISHED and seq.finish_reason == "stop"
    assert seq.completion_ids == [4, 9] and seq.num_pending == 0
    # the length limits count the tokens up to the one filled in, not the placeholders after it
    seq = Sequence(1, [1, 2], SamplingParams(max_tokens=5), ())
    seq.append_placeholder()
    assert not seq.at_length_limit(max_len=4) and seq.at_length_limit(max_len=3)
    seq.append_placeholder()
    seq.append_placeholder()
    seq.fill(7, max_len=3)
    assert seq.finish_reason == "length" and seq.token_ids == [1, 2, 7] and seq.num_pending == 0
    seq = Sequence(2, [1], SamplingParams(max_tokens=2), ())
    seq.append(4, max_len=10)
    seq.append_placeholder()
    assert seq.at_length_limit(max_len=10)
