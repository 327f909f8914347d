"""Beam search (LLM.beam_search, engine/beam_search.py) against transformers' own:
generate(num_beams, length_penalty, early_stopping, num_return_sequences, min_new_tokens,
eos_token_id, do_sample=False, return_dict_in_generate, output_scores) on a tiny random float32
Qwen3 checkpoint, each prompt alone on the transformers side and all prompts (of different
lengths) batched in one call on ours. Tokens must be identical and scores (transformers'
sequences_scores; for num_beams = 1, which transformers runs as greedy search, the same formula on
its logits) equal to float32 rounding.

The checkpoint's end token is one the model prefers (the 2nd most likely first token after the
first prompt), so hypotheses do end in it; each combination below is checked to have the stops
it is meant to have. Float ties would let the two sides order beams differently: with this seed
(1) and these prompts no two candidates come close (the same combinations also pass on seeds 0
and 1 with other end tokens; a tie would show as a mismatch, not pass silently).

The engine side is checked too: beams share their prompt's blocks (copy on write of the partly
filled last block only), nothing leaks, and a cache or a token budget too small for a request's
beams at once (preemption, beams waiting for their group, giving their blocks up) gives the same
hypotheses. Each runs on the CPU and, where a GPU is visible, on the GPU (the `device` fixture)."""
import pytest
import torch

from inference_pio import LLM, BeamSearchParams, SamplingParams

from checkpoints import qwen3_model, save_hf, save_qwen_tokenizer

SEED, EOS_RANK = 1, 1
PROMPTS = [[5, 9, 33], [100, 2, 71, 8, 250, 17], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 58]]

# name: (BeamSearchParams fields, what the hypotheses must show: "stop" some end in a stop token,
# "length" none does)
COMBOS = {
    "greedy": (dict(num_beams=1), "stop"),
    "2-beams": (dict(num_beams=2, num_return_sequences=2), "stop"),
    "lp2-early": (dict(num_beams=4, length_penalty=2.0, early_stopping=True, num_return_sequences=3), "stop"),
    "lp-neg-never": (dict(num_beams=4, length_penalty=-1.0, early_stopping="never", num_return_sequences=4), "stop"),
    "lp0": (dict(num_beams=3, length_penalty=0.0, num_return_sequences=2), "stop"),
    "lp1.5-never": (dict(num_beams=4, length_penalty=1.5, early_stopping="never", num_return_sequences=2), "length"),
    "min-tokens": (dict(num_beams=2, early_stopping=True, min_tokens=3, num_return_sequences=2), "stop"),
    "stop-ids": (dict(num_beams=3, stop_token_ids=["second"], num_return_sequences=3), "stop"),
    "ignore-eos": (dict(num_beams=4, ignore_eos=True, num_return_sequences=2, length_penalty=0.5), "length"),
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(HF model, folder, end token, another token the model likes)."""
    model = qwen3_model(seed=SEED)
    with torch.no_grad():
        first = model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    order = torch.argsort(first, descending=True).tolist()
    eos, second = order[EOS_RANK], order[EOS_RANK + 1]
    folder = save_hf(model, tmp_path_factory.mktemp("beam"), generation={"eos_token_id": eos})
    return model, folder, eos, second


def make_params(fields, second, **extra):
    fields = {"max_tokens": 10, **fields, **extra}
    if fields.get("stop_token_ids") == ["second"]:
        fields["stop_token_ids"] = [second]
    return BeamSearchParams(**fields)


def transformers_beams(model, prompt, p, eos):
    """[(token_ids, score)] of transformers' generate for one prompt, best first."""
    eos_ids = None if p.ignore_eos else [eos] + p.stop_token_ids
    with torch.no_grad():
        r = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           num_beams=p.num_beams, max_new_tokens=p.max_tokens, min_new_tokens=p.min_tokens or None,
                           length_penalty=p.length_penalty, early_stopping=p.early_stopping,
                           num_return_sequences=p.num_return_sequences, do_sample=False, output_scores=True,
                           output_logits=True, return_dict_in_generate=True, eos_token_id=eos_ids, pad_token_id=0)
    out = []
    for j in range(p.num_return_sequences):
        if p.num_beams > 1:  # beam_indices are -1 past a hypothesis' end
            n = int((r.beam_indices[j] >= 0).sum())
            score = float(r.sequences_scores[j])
        else:  # greedy search: the hypothesis' score from its logits
            n = r.sequences.shape[1] - len(prompt)
            logp = torch.stack([torch.log_softmax(x[0].double(), -1) for x in r.logits])
            toks = r.sequences[0, len(prompt):]
            score = float(logp[torch.arange(n), toks].sum() / n ** p.length_penalty)
        out.append((r.sequences[j, len(prompt):len(prompt) + n].tolist(), score))
    return out


def assert_same(ours, ref, p, stop_ids):
    assert [h.token_ids for h in ours.hypotheses] == [t for t, _ in ref]
    for h, (_, score) in zip(ours.hypotheses, ref):
        assert abs(h.score - score) <= 1e-4 * max(1.0, abs(score)), (h.score, score)
        assert h.finish_reason == ("stop" if h.token_ids[-1] in stop_ids else "length")
        assert len(h.token_ids) == p.max_tokens or h.finish_reason == "stop"


def assert_equivalent(a, b):
    """Two runs' outputs: the same hypotheses, scores equal to float32 rounding (on the CPU a
    batch of other rows, or another block size, may sum a row's logits in another order)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.prompt_token_ids == y.prompt_token_ids
        assert [(h.token_ids, h.text, h.finish_reason) for h in x.hypotheses] == \
            [(h.token_ids, h.text, h.finish_reason) for h in y.hypotheses]
        for hx, hy in zip(x.hypotheses, y.hypotheses):
            assert abs(hx.score - hy.score) <= 1e-5 * max(1.0, abs(hy.score))


def assert_idle(llm):
    """Nothing left in the engine: every block free, no request or copy pending."""
    e = llm.engine
    assert e.blocks.num_free == e.blocks.num_blocks and not any(e.blocks.ref_counts)
    assert not e.blocks.take_copies() and not e.scheduler.has_unfinished() and not e.beams.requests


@pytest.mark.parametrize("combo", list(COMBOS))
def test_matches_transformers(ckpt, device, combo):
    model, folder, eos, second = ckpt
    fields, shows = COMBOS[combo]
    p = make_params(fields, second)
    llm = LLM(folder, device=device, dtype="float32", block_size=4)
    outs = llm.beam_search(PROMPTS, p)
    stop_ids = set() if p.ignore_eos else {eos, *p.stop_token_ids}
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt and len(out.hypotheses) == p.num_return_sequences
        assert_same(out, transformers_beams(model, prompt, p, eos), p, stop_ids)
    reasons = {h.finish_reason for out in outs for h in out.hypotheses}
    assert (shows in reasons) and (shows == "stop" or reasons == {"length"})
    assert_idle(llm)


def test_prompts_alone_equal_prompts_batched(ckpt):
    # one prompt per call, each with its own parameters in one call: the same hypotheses
    _, folder, _, second = ckpt
    llm = LLM(folder, dtype="float32", block_size=4)
    params = [make_params(COMBOS[c][0], second) for c in ("lp2-early", "greedy", "stop-ids")]
    batched = llm.beam_search(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, batched):
        assert_equivalent(llm.beam_search(prompt, p), [out])
    assert_idle(llm)


class Spy:
    """Records, per beam search step of the engine, the blocks in use against what the live beams'
    tables would need unshared, and checks every copy-on-write as the block manager makes it."""

    def __init__(self, llm):
        self.llm, self.copies, self.forks, self.steps = llm, [], 0, []
        bm = llm.engine.blocks
        allocate, fork = bm.allocate, bm.fork

        def checked_allocate(seq, n):
            before, computed = list(seq.block_table), seq.num_computed
            pending = len(bm._copies)
            allocate(seq, n)
            for src, dst in bm._copies[pending:]:
                # only the block holding the last computed positions, partly filled, is copied
                j = before.index(src)
                assert j == computed // bm.block_size and computed % bm.block_size != 0
                assert seq.block_table[j] == dst
                self.copies.append((src, dst))

        def counted_fork(parent, child):
            self.forks += 1
            fork(parent, child)

        bm.allocate, bm.fork = checked_allocate, counted_fork
        step = llm.engine.step

        def recorded_step():
            events = step()
            beams = [s for r in llm.engine.beams.requests for s in r.live if s.block_table]
            used = bm.num_blocks - bm.num_free
            self.steps.append((used, sum(len(s.block_table) for s in beams)))
            return events

        llm.engine.step = recorded_step


def test_beams_share_blocks_copy_on_write(ckpt):
    _, folder, _, second = ckpt
    llm = LLM(folder, dtype="float32", block_size=4)
    spy = Spy(llm)
    p = make_params(COMBOS["lp2-early"][0], second)
    out = llm.beam_search(PROMPTS, p)
    assert spy.forks > 0 and spy.copies  # forks happened, and children wrote into shared blocks
    assert any(used < unshared for used, unshared in spy.steps)  # the prompts' blocks were shared
    assert all(used <= unshared for used, unshared in spy.steps if unshared)
    assert_equivalent(out, LLM(folder, dtype="float32", block_size=16).beam_search(PROMPTS, p))  # no sharing
    assert_idle(llm)


def test_small_cache_and_budget_give_the_same_hypotheses(ckpt):
    # a cache too small for the beams of both requests at once (preemption), a token budget
    # smaller than a request's beams (a group computed over several steps: beams wait for their
    # group), and both (waiting beams give their blocks up when nothing else fits)
    _, folder, _, second = ckpt
    p = make_params(COMBOS["ignore-eos"][0], second, max_tokens=14)
    want = LLM(folder, dtype="float32", block_size=4).beam_search(PROMPTS[1:], p)
    seen = []
    for tokens, budget in [(52, 64), (128, 3), (44, 3)]:
        llm = LLM(folder, dtype="float32", block_size=4, kv_cache_tokens=tokens, max_num_batched_tokens=budget,
                  max_model_len=32)
        assert_equivalent(llm.beam_search(PROMPTS[1:], p), want)
        beams = llm.engine.beams
        seen.append((llm.engine.scheduler.num_preemptions, beams.num_waits, beams.num_evictions))
        assert_idle(llm)
    assert seen[0][0] > 0 and seen[1][1] > 0 and seen[2][2] > 0, seen


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_with_sampled_requests(ckpt, overlap):
    # beam requests and sampled ones in the same engine steps: each as it is alone; with the
    # overlapped decode (on the CPU the same code path as on a GPU) no step is launched while a
    # beam search runs (its steps change the beams), and the sampled requests still overlap after
    _, folder, _, second = ckpt
    llm = LLM(folder, dtype="float32", block_size=4, overlap=overlap)
    launches = []
    launch = llm.engine._launch

    def recorded_launch(scheduled, token_ids=None):
        launches.append(bool(llm.engine.beams.requests) or any(q.beam is not None for q, _ in scheduled))
        return launch(scheduled, token_ids)

    llm.engine._launch = recorded_launch
    bp = make_params(COMBOS["2-beams"][0], second)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    seeded = SamplingParams(max_tokens=8, temperature=0.8, top_k=40, seed=7)
    want_beams = llm.beam_search(PROMPTS[:2], bp)
    want_greedy = llm.generate(PROMPTS[2], greedy)[0].token_ids
    want_seeded = llm.generate(PROMPTS[0], seeded)[0].token_ids
    e = llm.engine
    beams = [e.add_beam_request(PROMPTS[0], bp)]
    g = e.add_request(PROMPTS[2], greedy)
    beams.append(e.add_beam_request(PROMPTS[1], bp))
    s = e.add_request(PROMPTS[0], seeded)
    mixed_steps = 0
    while e.has_unfinished():
        live = [q for r in e.beams.requests for q in r.live]
        mixed_steps += bool(live) and any(not q.status.name == "FINISHED" for q in (g, s))
        e.step()
    assert mixed_steps > 0 and not any(launches)
    assert bool(launches) == overlap  # the sampled requests' own runs did overlap
    assert g.completion_ids == want_greedy and s.completion_ids == want_seeded
    for req, want in zip(beams, want_beams):
        assert [h[1] for h in req.hypotheses()] == [h.token_ids for h in want.hypotheses]
        for (score, _, _), h in zip(req.hypotheses(), want.hypotheses):
            assert abs(score - h.score) <= 1e-5 * max(1.0, abs(h.score))
    assert_idle(llm)


def test_interrupted_call_leaves_nothing_behind(ckpt):
    _, folder, _, second = ckpt
    llm = LLM(folder, dtype="float32", block_size=4)
    step, calls = llm.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step()

    llm.engine.step = failing_step
    with pytest.raises(KeyboardInterrupt):
        llm.beam_search(PROMPTS, make_params(COMBOS["lp0"][0], second))
    assert_idle(llm)
    llm.engine.step = step
    assert llm.beam_search(PROMPTS[0], make_params(COMBOS["lp0"][0], second))[0].hypotheses


def test_text_and_outputs(tmp_path):
    oracle = save_qwen_tokenizer(tmp_path)
    save_hf(qwen3_model(seed=SEED), tmp_path, generation={"eos_token_id": oracle.token_to_id("<|im_end|>")})
    llm = LLM(tmp_path, dtype="float32")
    out = llm.beam_search("The quick brown fox", BeamSearchParams(num_beams=3, max_tokens=6, num_return_sequences=2))
    assert len(out) == 1 and out[0].prompt_token_ids == oracle.encode("The quick brown fox").ids
    for h in out[0].hypotheses:
        assert h.text == llm.tokenizer.decode(h.token_ids, skip_special_tokens=True)
    best = out[0].hypotheses[0]
    assert (out[0].text, out[0].token_ids, out[0].score, out[0].finish_reason) == \
        (best.text, best.token_ids, best.score, best.finish_reason)
    assert out[0].hypotheses[0].score >= out[0].hypotheses[1].score


@pytest.mark.parametrize("fields,what", [
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2.0), "num_beams"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(length_penalty=True), "length_penalty"),
    (dict(early_stopping="always"), 'early_stopping must be True, False or "never"'),
    (dict(early_stopping=1), "early_stopping"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences must be an integer in \\[1, num_beams = 2\\]"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos must be True or False"),
])
def test_params_are_validated(fields, what):
    with pytest.raises(ValueError, match=what):
        BeamSearchParams(**fields)


def test_bad_requests(ckpt):
    _, folder, _, _ = ckpt
    llm = LLM(folder, dtype="float32", max_model_len=16)
    with pytest.raises(ValueError, match="empty"):
        llm.beam_search([[]], BeamSearchParams())
    with pytest.raises(ValueError, match="too long"):
        llm.beam_search(list(range(16)), BeamSearchParams())
    with pytest.raises(ValueError, match="one BeamSearchParams or a list of 2"):
        llm.beam_search([[1], [2]], [BeamSearchParams()])
    with pytest.raises(ValueError, match="one BeamSearchParams or a list of 1"):
        llm.beam_search([1, 2], SamplingParams())
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.engine.add_beam_request([1, 2], SamplingParams())
    # the context limit ends every hypothesis with "length"
    out = llm.beam_search(list(range(12)), BeamSearchParams(num_beams=2, max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert_idle(llm)
