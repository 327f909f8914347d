"""The sampling pipeline through the engine: SamplingParams' processors and logprobs on a tiny
random Qwen3 checkpoint.

- Greedy decoding with each processor equals transformers' generate(do_sample=False, ...) with
  the same processor (repetition_penalty, no_repeat_ngram_size, min_new_tokens, sequence_bias;
  presence / frequency penalties, which transformers lacks, as an extra LogitsProcessor of
  OpenAI's formula appended to generate's list: it runs after the n-gram block and min_new_tokens
  there, which commutes with them since their -inf absorbs the subtraction).
- Logprobs of a greedy run equal log_softmax of llm.logits rows (float64 reference).
- Seeded runs are reproducible, whatever else is batched; different seeds differ.
- The overlapped decode (overlap=True, on the CPU the same code path) gives the synchronous
  engine's outputs with processors on, and never launches a step behind one whose rows read
  their histories.
Each runs on the CPU and, where a GPU is visible, on the GPU (the `device` fixture).
"""
import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from inference_pio import LLM, SamplingParams

from checkpoints import qwen3_model, save_hf

PROMPTS = [[5, 9, 2, 7], [17, 3] * 5, [3, 1, 4, 1, 5, 9, 2, 6], [250, 7], list(range(30, 44))]


class PresenceFrequency(LogitsProcessor):
    """OpenAI's presence / frequency penalties over the tokens after the prompt (float32)."""

    def __init__(self, prompt_len, presence, frequency):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for b in range(scores.shape[0]):
            gen = input_ids[b, self.prompt_len:]
            if gen.numel() == 0:
                continue
            counts = torch.bincount(gen, minlength=scores.shape[1])
            for t in counts.nonzero().flatten().tolist():
                pen = torch.tensor(self.frequency, dtype=torch.float32) * float(counts[t]) + torch.tensor(self.presence)
                scores[b, t] = scores[b, t] - pen
        return scores


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = qwen3_model(seed=11)
    return model, save_hf(model, tmp_path_factory.mktemp("sampling"))


def hf_greedy(model, prompt, n, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def f32(v):
    return torch.tensor(v, dtype=torch.float32).item()


GREEDY_CASES = {
    "repetition-1.4": dict(ours=dict(repetition_penalty=1.4), hf=dict(repetition_penalty=1.4)),
    "repetition-0.7": dict(ours=dict(repetition_penalty=0.7), hf=dict(repetition_penalty=0.7)),
    "ngram-2": dict(ours=dict(no_repeat_ngram_size=2), hf=dict(no_repeat_ngram_size=2)),
    "ngram-1": dict(ours=dict(no_repeat_ngram_size=1), hf=dict(no_repeat_ngram_size=1)),
    "ngram-3+repetition": dict(ours=dict(no_repeat_ngram_size=3, repetition_penalty=1.2),
                               hf=dict(no_repeat_ngram_size=3, repetition_penalty=1.2)),
    "bias": dict(ours=dict(logit_bias={7: 2.5, 9: -math.inf, 40: -1.0}),
                 hf=dict(sequence_bias=[[[7], 2.5], [[9], -math.inf], [[40], -1.0]])),
    "presence-frequency": dict(ours=dict(presence_penalty=0.8, frequency_penalty=0.6), pf=(0.8, 0.6)),
    "everything": dict(ours=dict(repetition_penalty=1.1, no_repeat_ngram_size=2, presence_penalty=-0.5,
                                 frequency_penalty=0.3, logit_bias={3: 1.0}),
                       hf=dict(repetition_penalty=1.1, no_repeat_ngram_size=2, sequence_bias=[[[3], 1.0]]),
                       pf=(-0.5, 0.3)),
}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_processors_match_generate(ckpt, device, case):
    model, folder = ckpt
    spec = GREEDY_CASES[case]
    llm = LLM(folder, device=device, dtype="float32")
    n = 24
    plain = llm.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0))
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=n, temperature=0, **spec["ours"]))
    changed = 0
    for prompt, out, base in zip(PROMPTS, outs, plain):
        extra = {}
        if "pf" in spec:
            pres, freq = map(f32, spec["pf"])
            extra["logits_processor"] = LogitsProcessorList([PresenceFrequency(len(prompt), pres, freq)])
        ref = hf_greedy(model, prompt, n, eos_token_id=None, **spec.get("hf", {}), **extra)
        assert out.token_ids == ref, prompt
        changed += out.token_ids != base.token_ids
    assert changed >= 2  # the processor matters on these prompts
    if "ngram-1" == case:  # no token twice, the prompt's included
        for prompt, out in zip(PROMPTS, outs):
            assert len(set(prompt + out.token_ids)) == len(set(prompt)) + len(out.token_ids)


@pytest.fixture(scope="module")
def with_eos(ckpt, tmp_path_factory):
    """A folder whose generation config names as EOS the token plain greedy decoding of
    PROMPTS[0] produces 4th (so min_tokens has something to hold back)."""
    model, folder = ckpt
    ref = hf_greedy(model, PROMPTS[0], 8, eos_token_id=None)
    eos = ref[3]
    return model, save_hf(model, tmp_path_factory.mktemp("sampling-eos"), generation={"eos_token_id": eos}), eos


@pytest.mark.parametrize("min_tokens", [0, 2, 6, 15])
def test_min_tokens_match_generate(with_eos, device, min_tokens):
    model, folder, eos = with_eos
    llm = LLM(folder, device=device, dtype="float32")
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0, min_tokens=min_tokens))[0]
    ref = hf_greedy(model, PROMPTS[0], 20, eos_token_id=eos, min_new_tokens=min_tokens)
    assert out.token_ids == ref
    assert eos not in out.token_ids[:min_tokens]
    if min_tokens <= 3:
        assert out.token_ids[-1] == eos and out.finish_reason == "stop" and len(out.token_ids) == 4
    # stop_token_ids are held back too; with ignore_eos the EOS is not
    stop = out.token_ids[0]
    held = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, min_tokens=3,
                                                    stop_token_ids=[stop], ignore_eos=True))[0]
    assert stop not in held.token_ids[:3] and held.finish_reason in ("stop", "length")


def test_min_tokens_sampled(with_eos, device):
    """Sampled rows never draw EOS or a stop id before min_tokens."""
    _, folder, eos = with_eos
    llm = LLM(folder, device=device, dtype="float32")
    params = [SamplingParams(max_tokens=12, temperature=1.5, seed=s, min_tokens=8, stop_token_ids=[5, 9]) for s in range(12)]
    for out in llm.generate([PROMPTS[0]] * 12, params):
        assert not {eos, 5, 9} & set(out.token_ids[:8])
        assert len(out.token_ids) >= 8


def test_logprobs_of_greedy_equal_log_softmax(ckpt, device):
    _, folder = ckpt
    llm = LLM(folder, device=device, dtype="float32")
    for N in (0, 5):
        params = SamplingParams(max_tokens=10, temperature=0, logprobs=N, repetition_penalty=1.3)
        for prompt in PROMPTS[:3]:
            out = llm.generate(prompt, params)[0]
            assert len(out.logprobs) == len(out.token_ids) == 10
            rows = torch.log_softmax(torch.tensor(llm.logits(prompt + out.token_ids[:-1]).tolist(), dtype=torch.float64), 1)
            rows = rows[len(prompt) - 1:]
            total = 0.0
            for i, (tid, entry) in enumerate(zip(out.token_ids, out.logprobs)):
                keys = list(entry)
                assert keys[0] == tid
                assert abs(entry[tid] - float(rows[i, tid])) < 1e-4
                total += entry[tid]
                order = torch.sort(rows[i], descending=True, stable=True).indices[:N].tolist()
                assert set(keys) == {tid} | set(order)
                for t in order:
                    assert abs(entry[t] - float(rows[i, t])) < 1e-4
            assert abs(out.cumulative_logprob - total) < 1e-9
    plain = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))[0]
    assert plain.logprobs is None and plain.cumulative_logprob is None
    none = llm.generate(PROMPTS[0], SamplingParams(max_tokens=0, logprobs=3))[0]
    assert none.token_ids == [] and none.logprobs == [] and none.cumulative_logprob == 0.0


def test_seeded_reproducible(ckpt, device):
    """The same seed gives the same tokens alone and batched with others; other seeds differ."""
    _, folder = ckpt
    llm = LLM(folder, device=device, dtype="float32")
    kinds = [dict(temperature=0.9, top_p=0.9), dict(temperature=1.2, typical_p=0.8, repetition_penalty=1.2),
             dict(temperature=1.0, top_k=30, presence_penalty=0.5, frequency_penalty=0.5, no_repeat_ngram_size=2),
             dict(temperature=0.8, min_p=0.05, logit_bias={4: 3.0}, logprobs=2)]
    for k in kinds:
        p = SamplingParams(max_tokens=16, seed=1234, **k)
        alone = llm.generate(PROMPTS[2], p)[0]
        again = llm.generate(PROMPTS[2], p)[0]
        batched = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[4]],
                               [SamplingParams(max_tokens=9, temperature=1.0, seed=5), p, SamplingParams(max_tokens=20)])[1]
        assert alone.token_ids == again.token_ids == batched.token_ids
        assert alone.logprobs == again.logprobs
        if alone.logprobs is not None:  # batched logits may round differently (other rows in the matmuls)
            for x, y in zip(alone.logprobs, batched.logprobs):
                assert list(x) == list(y) and all(abs(x[t] - y[t]) < 1e-5 for t in x)
        others = {tuple(llm.generate(PROMPTS[2], SamplingParams(max_tokens=16, seed=s, **k))[0].token_ids)
                  for s in range(5)}
        assert len(others) >= 3


def _drive(llm, prompts, params):
    """Steps llm's engine until idle; (outputs as (ids, logprobs, finish reason), whether a step was
    ever left in flight between calls)."""
    eng = llm.engine
    seqs = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    flight = False
    while eng.has_unfinished():
        eng.step()
        flight |= eng._inflight is not None
    return [(s.completion_ids, s.logprobs, s.finish_reason) for s in seqs], flight


@pytest.mark.parametrize("history", [False, True])
def test_overlap_equals_synchronous(with_eos, device, history):
    """Processors and logprobs with the overlapped decode: the synchronous outputs. Without a
    history-reading processor the steps overlap; with one in the batch they never do."""
    _, folder, eos = with_eos
    params = [SamplingParams(max_tokens=14, temperature=0, min_tokens=6),
              SamplingParams(max_tokens=12, temperature=0.9, seed=3, logit_bias={11: 4.0, 12: -math.inf}),
              SamplingParams(max_tokens=15, temperature=0, logprobs=3),
              SamplingParams(max_tokens=13, temperature=1.1, seed=8, typical_p=0.7, logprobs=1, min_tokens=2),
              SamplingParams(max_tokens=10, temperature=0.7, seed=9, top_k=40)]
    if history:
        params[4] = SamplingParams(max_tokens=16, temperature=0.7, seed=9, repetition_penalty=1.3,
                                   no_repeat_ngram_size=2, ignore_eos=True)  # the last to finish
    sync, over = (LLM(folder, device=device, dtype="float32", overlap=o) for o in (False, True))
    (a, fa), (b, fb) = _drive(sync, PROMPTS, params), _drive(over, PROMPTS, params)
    assert b == a and not fa
    assert fb is not history
    assert a[0][0][:6].count(eos) == 0


def test_params_validation():
    for kw, msg in [(dict(typical_p=0.0), "typical_p must be in"), (dict(typical_p=1.5), "typical_p"),
                    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
                    (dict(repetition_penalty=math.inf), "repetition_penalty"),
                    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
                    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(frequency_penalty=math.nan), "frequency"),
                    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
                    (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size"),
                    (dict(min_tokens=20), r"min_tokens must be an integer in \[0, max_tokens = 16\]"),
                    (dict(min_tokens=-1), "min_tokens"), (dict(logprobs=-1), "logprobs must be None or an integer >= 0"),
                    (dict(logprobs=True), "logprobs"), (dict(logit_bias=[1, 2]), "logit_bias must be a dict"),
                    (dict(logit_bias={-1: 1.0}), "logit_bias .*has key -1: token ids must be integers >= 0"),
                    (dict(logit_bias={"x": 1.0}), "logit_bias has key 'x'"),
                    (dict(logit_bias={3: math.inf}), "logit_bias has value inf for token 3: biases must be finite or -inf"),
                    (dict(logit_bias={3: math.nan}), "logit_bias has value nan")]:
        with pytest.raises(ValueError, match="SamplingParams." + msg):
            SamplingParams(**kw)
    p = SamplingParams(logit_bias={"5": 1.5, 5: 0.5, 7: -math.inf})  # JSON keys are strings
    assert p.logit_bias == {5: 2.0, 7: -math.inf}
    assert not SamplingParams().needs_history and SamplingParams(no_repeat_ngram_size=2).needs_history


def test_vocab_checked_at_add_request(ckpt):
    _, folder = ckpt
    llm = LLM(folder, dtype="float32")
    vocab = llm.model.config.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias token id {vocab} is outside the vocabulary"):
        llm.generate([1, 2], SamplingParams(logit_bias={vocab: 1.0}))
    with pytest.raises(ValueError, match="logprobs = 1000 asks for more alternatives than the vocabulary has"):
        llm.generate([1, 2], SamplingParams(logprobs=1000))
    assert not llm.engine.has_unfinished()


def test_history_cache():
    """The sampler's int32 copy of a sequence's tokens follows appends, and starts afresh when the
    sequence is given another list (a copy or a fork) or its tokens change under it."""
    from inference_pio.engine.sampler import _history
    from inference_pio.engine.sequence import Sequence
    seq = Sequence(0, [4, 5, 6], SamplingParams(repetition_penalty=1.2), ())
    assert list(_history(seq)) == [4, 5, 6]
    first = _history(seq)
    seq.append(7, 100)
    assert _history(seq) is first and list(first) == [4, 5, 6, 7]
    seq.token_ids = [4, 5, 9, 7]  # same length and last token, another list
    assert list(_history(seq)) == [4, 5, 9, 7]
    seq.token_ids[-1] = 8  # the last token changed in place
    assert list(_history(seq)) == [4, 5, 9, 8]
