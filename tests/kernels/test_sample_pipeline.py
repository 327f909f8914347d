"""to_sample_pipeline: the logits processors, the warpers, the draw and the logprobs, against
transformers' own processor classes (the oracle) and float64 references.

The kept set and values. Each row's `processed` output (the scores as transformers' chain leaves
them: processed logit / temperature where kept, -inf elsewhere) is compared with the chain of
transformers' LogitsProcessor / LogitsWarper classes applied in generate's order to the same
float32 logits (presence / frequency penalties, which transformers lacks, by the same float32
operations in torch between the repetition penalty and the n-gram block). The values must be
identical: every processor is the same float32 operation on both sides (x + bias, x * or /
penalty, x - (frequency * count + presence), x / temperature), so the tolerance is zero. The kept
sets must be identical too, except where a decision is not determined at float32 precision:
top_p and typical_p compare cumulative float32 sums with the threshold (transformers sums
probabilities in float32 in its own order; we sum exact fixed-point masses), and min_p compares
float32 probability ratios. A float64 reference of the warpers (`ref_warp`) measures how far each
decision is from its threshold; rows whose parameters put one within TOL (2e-5 of the
normalised mass, or a top_p threshold inside a run of tied logits, which transformers orders by
its unstable sort) are drawn again, so every compared row is unambiguous, and must then match
transformers and the float64 reference exactly.
"""
import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    TypicalLogitsWarper)

import inference_pio as ip
from inference_pio import ops, runtime

from helpers import FLOAT_DTYPES, TORCH_DTYPES, from_torch, to_torch

TOL = 2e-5
V_QWEN = 151936


def f32(v):
    return torch.tensor(v, dtype=torch.float32).item()


# ------------------------------------------------------------------ rows and the op

class Row:
    """One row's parameters (Python values, floats already rounded to float32)."""

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, uniform=0.5,
                 rep=1.0, presence=0.0, frequency=0.0, ngram=0, history=(), prompt_len=0, bias=()):
        self.temperature, self.top_p, self.min_p, self.typical_p, self.uniform = map(
            f32, (temperature, top_p, min_p, typical_p, uniform))
        self.rep, self.presence, self.frequency = map(f32, (rep, presence, frequency))
        self.top_k, self.ngram = int(top_k), int(ngram)
        self.history, self.prompt_len = list(history), int(prompt_len)
        self.bias = [(int(t), f32(v)) for t, v in bias]

    def __repr__(self):
        return "Row(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "history") + \
            f", history[{len(self.history)}])"


def tensors(rows):
    """sample_pipeline's arguments for rows (every optional tensor given)."""
    def f(vals):
        return ip.tensor(vals, dtype=ip.float32)

    def i(vals):
        return ip.tensor(vals, dtype=ip.int32)
    hist, hoff, bids, bvals, boff = [], [0], [], [], [0]
    for r in rows:
        hist += r.history
        hoff.append(len(hist))
        bids += [t for t, _ in r.bias]
        bvals += [v for _, v in r.bias]
        boff.append(len(bids))
    args = (f([r.temperature for r in rows]), i([r.top_k for r in rows]), f([r.top_p for r in rows]),
            f([r.min_p for r in rows]), f([r.uniform for r in rows]))
    kw = dict(typical_p=f([r.typical_p for r in rows]), repetition_penalty=f([r.rep for r in rows]),
              presence_penalty=f([r.presence for r in rows]), frequency_penalty=f([r.frequency for r in rows]),
              no_repeat_ngram=i([r.ngram for r in rows]), history=i(hist), history_offsets=i(hoff),
              prompt_lens=i([r.prompt_len for r in rows]), bias_ids=i(bids), bias_offsets=i(boff),
              bias_values=f(bvals))
    return args, kw


def run(x, rows, **kw):
    args, opt = tensors(rows)
    return ops.sample_pipeline(x, *args, **opt, **kw)


# ------------------------------------------------------------------ the oracle

def hf_processors(row, ids, scores):
    """transformers' processors, in generate's order, on one row: scores [1, V] float32."""
    if row.bias:  # OpenAI's logit_bias: added to the logit, in list order, in float32 (the
        # ids are distinct; transformers' SequenceBiasLogitsProcessor adds the same, but versions
        # before 5.23 refuse token id 0)
        scores = scores.clone()
        for t, v in row.bias:
            scores[0, t] += v
    if row.rep != 1.0 and row.history:
        scores = RepetitionPenaltyLogitsProcessor(row.rep)(ids, scores)
    gen = row.history[row.prompt_len:]
    if (row.presence or row.frequency) and gen:  # OpenAI's formula, in float32 as the op does it
        scores = scores.clone()
        counts = torch.bincount(torch.tensor(gen), minlength=scores.shape[1])
        for t in counts.nonzero().flatten().tolist():
            pen = torch.tensor(row.frequency, dtype=torch.float32) * float(counts[t]) + torch.tensor(row.presence)
            scores[0, t] = scores[0, t] - pen
    if row.ngram and len(row.history) >= row.ngram:
        scores = NoRepeatNGramLogitsProcessor(row.ngram)(ids, scores)
    return scores


def hf_warpers(row, ids, scores):
    """generate's warpers (do_sample=True, min_tokens_to_keep=1) on one row."""
    if row.temperature != 1.0:
        scores = TemperatureLogitsWarper(row.temperature)(ids, scores)
    if 0 < row.top_k:
        scores = TopKLogitsWarper(top_k=row.top_k, min_tokens_to_keep=1)(ids, scores)
    if row.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=row.top_p, min_tokens_to_keep=1)(ids, scores)
    if row.min_p > 0:
        scores = MinPLogitsWarper(min_p=row.min_p, min_tokens_to_keep=1)(ids, scores)
    if row.typical_p < 1.0:
        scores = TypicalLogitsWarper(mass=row.typical_p, min_tokens_to_keep=1)(ids, scores)
    return scores


def hf_row(row, x32):
    """(processed logits before the warpers, the chain's output): float32 [V] each."""
    ids = torch.tensor([row.history or [0]], dtype=torch.long)
    z = hf_processors(row, ids, x32[None].clone())
    out = z if row.temperature <= 0 else hf_warpers(row, ids, z.clone())
    return z[0], out[0]


def ref_warp(z, row):
    """The warpers in float64 on processed logits z (float64 of float32 values): (kept mask,
    whether a decision lies within TOL of its threshold)."""
    V = z.numel()
    s = z / row.temperature
    keep = torch.ones(V, dtype=torch.bool)
    amb = False

    def probs():
        return torch.softmax(torch.where(keep, s, -math.inf), 0)
    if 0 < row.top_k < V:
        keep &= s >= torch.sort(s, descending=True).values[row.top_k - 1]
    if row.top_p < 1:
        pr = probs()
        order = torch.sort(pr, descending=True, stable=True).indices
        ps = pr[order]
        before = torch.cumsum(ps, 0) - ps
        kp = before < row.top_p
        live = ps > 0
        amb |= bool(((before - row.top_p).abs() < TOL)[live].any())
        L = int(kp.sum())
        if L < V and ps[L] > 0 and s[order[L]] == s[order[L - 1]]:
            amb = True  # the threshold falls inside a run of tied logits
        keep[order[L:]] = False
    if row.min_p > 0:
        pr = probs()
        ratio = pr / pr.max()
        amb |= bool(((ratio - row.min_p).abs() < TOL)[pr > 0].any())
        keep &= ratio >= row.min_p
    if row.typical_p < 1:
        logp = torch.log_softmax(torch.where(keep, s, -math.inf), 0)
        pr = logp.exp()
        ent = -(logp * pr).nansum()
        sh = (-logp - ent).abs()
        order = torch.sort(sh, stable=True).indices
        cum = torch.cumsum(pr[order], 0)
        last = min(int((cum < row.typical_p).sum()), V - 1)
        sstar = sh[order[last]]
        amb |= bool(((cum - row.typical_p).abs() < TOL)[pr[order] > 0].any())
        amb |= bool((((sh - sstar).abs() < TOL * max(1.0, float(sstar))) & (sh != sstar) & (pr > 0)).any())
        keep &= sh <= sstar
    return keep, amb


def compare_rows(x, rows, got):
    """The op's processed rows (got, float32 [B, V] torch) against transformers' chain and the
    float64 warpers, row by row; the chosen ids (checked by the caller) lie in the kept sets."""
    x32 = to_torch(x.to(dtype=ip.float32))
    for r, row in enumerate(rows):
        z, want = hf_row(row, x32[r])
        where = f"row {r}: {row}"
        mine = got[r]
        assert torch.equal(torch.isinf(mine) & (mine < 0), torch.isinf(want) & (want < 0)), \
            where + f": kept sets differ at {(torch.isinf(mine) != torch.isinf(want)).nonzero().flatten().tolist()[:10]}"
        kept = ~torch.isinf(want) | (want > 0)
        assert torch.equal(mine[kept], want[kept]), where + ": kept values differ"
        if row.temperature > 0:
            ref_keep, amb = ref_warp(z.to(torch.float64), row)
            assert not amb
            finite = ~(torch.isinf(z) & (z < 0))
            assert torch.equal(ref_keep & finite, ~torch.isinf(mine) & finite), where + ": float64 reference differs"


def draw_rows(gen, V, n, sampled=True, processors=True, warpers=True, big_k=False):
    """n random rows for logits of V tokens (histories of random ids, repeats likely)."""
    rows = []
    for _ in range(n):
        def r():
            return float(torch.rand((), generator=gen))

        def ri(lo, hi):
            return int(torch.randint(lo, hi, (), generator=gen))
        kw = {}
        if processors:
            H = ri(0, 40)
            pool = torch.randint(0, V, (max(3, V // 50),), generator=gen)  # a small pool: repeats
            hist = pool[torch.randint(0, pool.numel(), (H,), generator=gen)].tolist()
            kw.update(history=hist, prompt_len=ri(0, H + 1))
            if r() < 0.7:
                kw["rep"] = [0.5, 0.9, 1.3, 2.0][ri(0, 4)]
            if r() < 0.6:
                kw["presence"] = 4 * r() - 2
            if r() < 0.6:
                kw["frequency"] = 4 * r() - 2
            if r() < 0.5:
                kw["ngram"] = ri(1, 4)
            if r() < 0.5:
                kw["bias"] = [(ri(0, V), [-math.inf, 5 * r() - 2.5, 100.0][ri(0, 3)]) for _ in range(ri(1, 5))]
                kw["bias"] = list({t: v for t, v in kw["bias"]}.items())  # distinct ids, as a dict gives
        if sampled:
            kw["temperature"] = [0.5, 0.8, 1.0, 1.7][ri(0, 4)]
            if warpers:
                if r() < 0.5:
                    kw["top_k"] = ri(1, V + 3) if not big_k else ri(2049, V + 3)
                if r() < 0.5:
                    kw["top_p"] = 0.3 + 0.69 * r()
                if r() < 0.4:
                    kw["min_p"] = 0.2 * r()
                if r() < 0.5:
                    kw["typical_p"] = 0.2 + 0.79 * r()
            kw["uniform"] = min(r(), 0.9999)
        rows.append(Row(**kw))
    return rows


def keep_a_token(rows, V):
    """rows without their -inf biases, and without the n-gram block on a tiny vocabulary: bans
    and the block could otherwise take every token of a row (an error, not a sample)."""
    for r in rows:
        r.bias = [(t, v) for t, v in r.bias if v != -math.inf]
        if V < 50:
            r.ngram = 0
    return rows


def unambiguous(x, rows, gen, V, **draw):
    """rows, each drawn again (up to 50 times) while its processors ban every token or ref_warp
    finds a decision within TOL."""
    x32 = to_torch(x.to(dtype=ip.float32))
    out = []
    for r, row in enumerate(rows):
        for _ in range(50):
            z = hf_row(row, x32[r])[0]
            if bool((z > -math.inf).any()) and (
                    row.temperature <= 0 or not ref_warp(z.to(torch.float64), row)[1]):
                break
            row = draw_rows(gen, V, 1, **draw)[0]
        else:
            pytest.fail(f"no unambiguous parameters for row {r}")
        out.append(row)
    return out


def make_logits(B, V, dtype, gen, kind="randn"):
    if kind == "randn":
        t = torch.randn(B, V, generator=gen, dtype=torch.float64) * 2.5
    elif kind == "ties":  # few levels: ties everywhere, top_k cutting inside them
        t = torch.randint(-4, 3, (B, V), generator=gen).to(torch.float64) * 0.75
    elif kind == "neginf":  # about a third masked
        t = torch.randn(B, V, generator=gen, dtype=torch.float64) * 2.5
        t[torch.rand(B, V, generator=gen) < 0.35] = -math.inf
        t[:, 0] = 1.0
    return from_torch(t.to(TORCH_DTYPES[dtype]))


def check_ids_kept(res, rows):
    proc = to_torch(res.processed)
    for r, (tok, row) in enumerate(zip(res.ids.tolist(), rows)):
        assert proc[r, tok] > -math.inf, f"row {r}: token {tok} was not kept"
        if row.temperature <= 0:
            assert tok == int(torch.argmax(proc[r])), f"row {r}: greedy picks the first max"


# ------------------------------------------------------------------ processors against transformers

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("V", [7, 257, 1001])
@pytest.mark.parametrize("kind", ["randn", "ties", "neginf"])
def test_processors_greedy(simd, gen, dtype, V, kind):
    """Greedy rows: the processors alone (bias, repetition / presence / frequency penalties,
    n-gram block) exactly as transformers' classes leave the scores, and the argmax of that."""
    B = 9
    x = make_logits(B, V, dtype, gen, kind)
    rows = unambiguous(x, draw_rows(gen, V, B, sampled=False), gen, V, sampled=False)
    rows[0] = Row()  # no processor at all
    res = run(x, rows, processed=True)
    compare_rows(x, rows, to_torch(res.processed))
    check_ids_kept(res, rows)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("V", [7, 257, 1001, 4099])
@pytest.mark.parametrize("kind", ["randn", "ties", "neginf"])
def test_warpers(simd, gen, dtype, V, kind):
    """Sampled rows without processors: temperature, top_k (ties included), top_p, min_p and
    typical_p in generate's order, each row its own combination."""
    B = 10
    x = make_logits(B, V, dtype, gen, kind)
    rows = unambiguous(x, draw_rows(gen, V, B, processors=False), gen, V, processors=False)
    res = run(x, rows, processed=True)
    compare_rows(x, rows, to_torch(res.processed))
    check_ids_kept(res, rows)


@pytest.mark.parametrize("V", [257, 4099])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_processors_and_warpers(simd, gen, V, kind):
    """Everything at once, greedy and sampled rows mixed in one batch."""
    B = 12
    x = make_logits(B, V, ip.float32, gen, kind)
    rows = draw_rows(gen, V, B)
    rows[::3] = draw_rows(gen, V, len(rows[::3]), sampled=False)
    rows = unambiguous(x, rows, gen, V)
    res = run(x, rows, processed=True)
    compare_rows(x, rows, to_torch(res.processed))
    check_ids_kept(res, rows)


@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_general_path(simd, gen, kind):
    """top_k off or above 2048 (the bucketed path, not the heap), typical_p and the penalties
    over a Qwen-sized vocabulary."""
    B, V = 4, V_QWEN
    x = make_logits(B, V, ip.bfloat16, gen, kind)
    rows = unambiguous(x, draw_rows(gen, V, B, big_k=True), gen, V, big_k=True)
    rows[0].typical_p = f32(0.9)
    rows[0].temperature = f32(1.0)
    rows = unambiguous(x, rows, gen, V, big_k=True)
    res = run(x, rows, processed=True)
    compare_rows(x, rows, to_torch(res.processed))
    check_ids_kept(res, rows)


def test_typical_single_warper(simd, gen):
    """typical_p alone and with each filter before it, on both paths (heap: top_k <= 2048)."""
    V = 3001
    x = make_logits(8, V, ip.float32, gen)
    base = [dict(), dict(top_k=50), dict(top_k=2500), dict(top_p=0.9), dict(min_p=0.01),
            dict(top_k=200, top_p=0.8), dict(temperature=0.6), dict(temperature=1.5)]
    rows = [Row(**dict(dict(temperature=1.0, typical_p=0.2 + 0.09 * i, uniform=0.37), **b)) for i, b in enumerate(base)]
    x32 = to_torch(x)
    for r, row in enumerate(rows):  # nudge the thresholds off ambiguous values
        for _ in range(100):
            if not ref_warp(x32[r].to(torch.float64), row)[1]:
                break
            row.typical_p = f32(row.typical_p + 0.003)
            row.top_p = f32(min(1.0, row.top_p + 0.001))
            row.min_p = f32(row.min_p * 1.01)
        else:
            pytest.fail(f"row {r}: no unambiguous thresholds")
    res = run(x, rows, processed=True)
    compare_rows(x, rows, to_torch(res.processed))
    check_ids_kept(res, rows)


def test_repetition_penalty_semantics(simd):
    """Negative logits multiplied, positive divided, zero unchanged, each distinct token once
    however often it repeats; prompt tokens count (transformers' semantics)."""
    x = ip.tensor([[2.0, -2.0, 0.0, 3.0, -1.0, 1.0]])
    row = Row(rep=2.0, history=[0, 1, 2, 0, 0, 1], prompt_len=4)
    got = to_torch(run(x, [row], processed=True).processed)[0].tolist()
    assert got == [1.0, -4.0, 0.0, 3.0, -1.0, 1.0]


def test_presence_frequency_openai(simd, gen):
    """x -= frequency * count + presence * (count > 0) over the generated tokens only, against a
    plain-Python float64 reference of OpenAI's formula."""
    V, B = 301, 8
    x = make_logits(B, V, ip.float32, gen)
    rows = []
    for r in range(B):
        H = int(torch.randint(5, 60, (), generator=gen))
        hist = torch.randint(0, 12, (H,), generator=gen).tolist()
        rows.append(Row(presence=4 * float(torch.rand((), generator=gen)) - 2,
                        frequency=4 * float(torch.rand((), generator=gen)) - 2,
                        history=hist, prompt_len=int(torch.randint(0, H, (), generator=gen))))
    got = to_torch(run(x, rows, processed=True).processed).to(torch.float64)
    xs = to_torch(x).to(torch.float64)
    for r, row in enumerate(rows):
        ref = xs[r].tolist()
        gen_ids = row.history[row.prompt_len:]
        for t in set(gen_ids):
            c = gen_ids.count(t)
            ref[t] -= row.frequency * c + row.presence * (c > 0)
        ref = torch.tensor(ref, dtype=torch.float64)
        assert torch.allclose(got[r], ref, rtol=1e-6, atol=1e-6), r
        untouched = [t for t in range(V) if t not in gen_ids]
        assert torch.equal(got[r, untouched], xs[r, untouched])  # prompt-only tokens: no penalty


def test_logit_bias(simd, gen):
    """Bias entries added (repeats add up, in order), -inf bans, against plain Python."""
    V = 50
    x = make_logits(3, V, ip.float32, gen)
    rows = [Row(bias=[(3, 1.5), (7, -2.25), (3, 0.5)]), Row(temperature=1.0, bias=[(0, -math.inf), (49, 30.0)]),
            Row(bias=[(t, -math.inf) for t in range(V) if t != 17])]
    res = run(x, rows, processed=True)
    got, xs = to_torch(res.processed), to_torch(x)
    ref0 = xs[0].clone()
    ref0[3] = ref0[3] + 1.5 + 0.5
    ref0[7] -= 2.25
    assert torch.equal(got[0], ref0)
    assert got[1, 0] == -math.inf and res.ids.tolist()[1] == 49  # +30 dominates the draw
    assert res.ids.tolist()[2] == 17  # everything else banned


def test_ngram_semantics(simd):
    """n = 1 bans every history token; n = 2 bans what followed earlier occurrences of the last
    token; an n-gram longer than the history bans nothing."""
    x = ip.Tensor.zeros(4, 10)
    hist = [1, 2, 3, 1, 4, 1]
    rows = [Row(ngram=1, history=hist), Row(ngram=2, history=hist), Row(ngram=3, history=hist + [2]),
            Row(ngram=8, history=hist)]
    got = to_torch(run(x, rows, processed=True).processed)
    banned = [sorted(torch.isinf(g).nonzero().flatten().tolist()) for g in got]
    assert banned == [[1, 2, 3, 4], [2, 4], [3], []]


# ------------------------------------------------------------------ the draw

def test_chi_square_with_processors(gen):
    """Many draws (fixed seed) from one row with processors and warpers: the empirical frequencies
    match softmax of transformers' processed scores (Pearson's statistic, as in test_sample.py:
    bound df + 7 sqrt(2 df)); dropped tokens are never drawn."""
    seed = torch.Generator().manual_seed(4321)
    V, N = 90, 40000
    x1 = make_logits(1, V, ip.float32, seed)
    hist = torch.randint(0, 30, (25,), generator=seed).tolist()
    row = Row(temperature=0.9, top_k=60, top_p=0.95, typical_p=0.97, rep=1.3, presence=0.4, frequency=0.3,
              ngram=2, history=hist, prompt_len=10, bias=[(5, 1.0), (6, -math.inf)])
    assert not ref_warp(hf_row(row, to_torch(x1)[0])[0].to(torch.float64), row)[1]
    _, want = hf_row(row, to_torch(x1)[0])
    probs = torch.softmax(want.to(torch.float64), 0)
    u = torch.rand(N, generator=seed, dtype=torch.float32).tolist()
    rows = [Row(**{**vars(row), "uniform": min(v, 0.9999)}) for v in u]
    for rr in rows:
        rr.bias = row.bias
    got = torch.tensor(run(x1.expand(N, V), rows).ids.tolist())
    kept = set((probs > 0).nonzero().flatten().tolist())
    assert set(got.tolist()) <= kept
    order = torch.sort(probs, descending=True).indices[:len(kept)]
    counts = torch.bincount(got, minlength=V)[order].to(torch.float64)
    expected = probs[order] * N
    big = int((expected >= 5).sum())
    obs = torch.cat([counts[:big], counts[big:].sum().reshape(1)]) if big < len(kept) else counts
    exp = torch.cat([expected[:big], expected[big:].sum().reshape(1)]) if big < len(kept) else expected
    if exp[-1] < 5 and exp.numel() > 1:
        obs = torch.cat([obs[:-2], obs[-2:].sum().reshape(1)])
        exp = torch.cat([exp[:-2], exp[-2:].sum().reshape(1)])
    df = exp.numel() - 1
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert df >= 5 and stat < df + 7 * math.sqrt(2 * df), (stat, df)


def test_draw_reproducible_and_thread_independent(gen):
    """The same inputs give the same ids, with 1 and 2 threads, and the scalar and native paths."""
    B, V = 24, 20000
    x = make_logits(B, V, ip.bfloat16, gen)
    rows = draw_rows(gen, V, B)
    before, level = runtime.num_threads(), runtime.simd_level()
    try:
        runtime.set_num_threads(1)
        one = run(x, rows).ids.tolist()
        runtime.set_num_threads(2)
        two = run(x, rows).ids.tolist()
        runtime.set_simd_level("scalar")
        scalar = run(x, rows).ids.tolist()
    finally:
        runtime.set_num_threads(before)
        runtime.set_simd_level(level)
    assert one == two == scalar


def test_matches_to_sample_without_processors(simd, gen):
    """With no processor and no typical_p, to_sample_pipeline draws what to_sample draws."""
    B, V = 16, 3000
    x = make_logits(B, V, ip.float16, gen)
    rows = draw_rows(gen, V, B, processors=False)
    for r in rows:
        r.typical_p = 1.0
    args, _ = tensors(rows)
    assert run(x, rows).ids.tolist() == ops.sample(x, *args).tolist()


# ------------------------------------------------------------------ logprobs

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("V", [5, 999, V_QWEN])
def test_logprobs(simd, gen, dtype, V):
    """The chosen token's logprob and the N best, from the raw logits (not the processed ones),
    against float64 log_softmax; the N best by decreasing value, lower index first on ties."""
    B = 6
    x = make_logits(B, V, dtype, gen, "ties" if V == 999 else "randn")
    rows = keep_a_token(draw_rows(gen, V, B), V)
    N = min(V, 7)
    res = run(x, rows, logprobs=True, num_top=N)
    raw = to_torch(x.to(dtype=ip.float32)).to(torch.float64)
    ref = torch.log_softmax(raw, 1)
    ids = res.ids.tolist()
    lp = torch.tensor(res.logprobs.tolist(), dtype=torch.float64)
    want = ref[torch.arange(B), ids]
    assert torch.allclose(lp, want, rtol=2e-6, atol=2e-6)
    top_ids = res.top_ids.tolist()
    top_lp = torch.tensor(res.top_logprobs.tolist(), dtype=torch.float64)
    for r in range(B):
        order = torch.sort(raw[r], descending=True, stable=True).indices[:N].tolist()
        assert top_ids[r] == order
        assert torch.allclose(top_lp[r], ref[r, order], rtol=2e-6, atol=2e-6)


def test_logprobs_neginf_and_greedy(simd):
    x = ip.tensor([[0.0, -math.inf, 1.0, -math.inf], [-math.inf, -math.inf, -math.inf, 2.0]])
    res = run(x, [Row(), Row(temperature=1.0)], logprobs=True, num_top=4)
    assert res.ids.tolist() == [2, 3]
    lp = res.top_logprobs.tolist()
    assert lp[1][0] == 0.0 and lp[1][1:] == [-math.inf] * 3
    assert res.top_ids.tolist()[1] == [3, 0, 1, 2]
    assert abs(res.logprobs.tolist()[0] - (1 - math.log(1 + math.e))) < 1e-6


# ------------------------------------------------------------------ errors

def test_bad_values():
    x = ip.Tensor.zeros(2, 6)

    def call(**over):
        rows = [Row(), Row()]
        for k, v in over.items():
            if k in ("history_offsets", "bias_offsets", "prompt_lens", "bias_values", "history", "bias_ids"):
                continue
            setattr(rows[1], k, v)
        args, kw = tensors(rows)
        for k in ("history_offsets", "bias_offsets", "prompt_lens", "bias_values", "history", "bias_ids"):
            if k in over:
                kw[k] = over[k]
        ops.sample_pipeline(x, *args, **kw)
    I, F = (lambda v: ip.tensor(v, dtype=ip.int32)), (lambda v: ip.tensor(v, dtype=ip.float32))
    cases = [
        (dict(typical_p=0.0), r"typical_p\[1\] = 0 must be > 0 and finite"),
        (dict(typical_p=math.nan), r"typical_p\[1\] = nan"),
        (dict(rep=0.0), r"repetition_penalty\[1\] = 0 must be > 0 and finite"),
        (dict(rep=-1.0), r"repetition_penalty\[1\] = -1"),
        (dict(rep=math.inf), r"repetition_penalty\[1\] = inf"),
        (dict(presence=math.nan), r"presence_penalty\[1\] = nan is not finite"),
        (dict(frequency=-math.inf), r"frequency_penalty\[1\] = -inf is not finite"),
        (dict(ngram=-1), r"no_repeat_ngram\[1\] = -1 is negative"),
        (dict(history=I([1, 2]), history_offsets=I([0, 2, 1])),
         r"history_offsets\[2\] = 1: offsets must be non-decreasing within \[0, 2\] \(the length of history\), but it is below the one before"),
        (dict(history_offsets=I([0, 0, 5])), r"history_offsets\[2\] = 5: offsets must be non-decreasing within \[0, 0\]"),
        (dict(history=I([1, 2]), history_offsets=I([0, 1, 2]), prompt_lens=I([0, 2])), r"prompt_lens\[1\] = 2 is outside \[0, 1\]"),
        (dict(history=I([1, 6]), history_offsets=I([0, 1, 2])), r"history\[1\] = 6 is not a token id \(outside \[0, 6\)"),
        (dict(history=I([-1, 0]), history_offsets=I([0, 1, 2])), r"history\[0\] = -1 is not a token id"),
        (dict(bias_ids=I([9]), bias_values=F([1.0]), bias_offsets=I([0, 0, 1])), r"bias_ids\[0\] = 9 is not a token id"),
        (dict(bias_ids=I([1]), bias_values=F([math.inf]), bias_offsets=I([0, 0, 1])), r"bias_values\[0\] = inf must be finite or -inf"),
        (dict(bias_ids=I([1]), bias_values=F([math.nan]), bias_offsets=I([0, 0, 1])), r"bias_values\[0\] = nan"),
    ]
    for kw, msg in cases:
        with pytest.raises((ip.InvalidArgumentError, ip.BoundsError), match="to_sample_pipeline: " + msg):
            call(**kw)
    # a penalty without histories
    args, _ = tensors([Row(), Row()])
    with pytest.raises(ip.InvalidArgumentError, match=r"row 1 has a repetition penalty but history is NULL"):
        ops.sample_pipeline(x, *args, repetition_penalty=F([1.0, 1.2]))
    with pytest.raises(ip.InvalidArgumentError, match=r"row 0 has a no_repeat_ngram size but history is NULL"):
        ops.sample_pipeline(x, *args, no_repeat_ngram=I([2, 0]))


def test_bad_rows_after_processors(simd):
    """A processor may not leave a row NaN, +inf or all -inf: errors name the row."""
    x = ip.tensor([[0.0, 1.0, 2.0]] * 3)
    with pytest.raises(ip.InvalidArgumentError, match=r"to_sample_pipeline: logits row 1 is all -inf after its processors"):
        run(x, [Row(), Row(bias=[(0, -math.inf), (1, -math.inf), (2, -math.inf)]), Row()])
    with pytest.raises(ip.InvalidArgumentError, match=r"to_sample_pipeline: logits row 2 holds \+inf after its processors"):
        run(x, [Row(), Row(), Row(bias=[(2, 3e38), (2, 3e38)], temperature=1.0)])
    with pytest.raises(ip.InvalidArgumentError, match=r"to_sample_pipeline: logits row 0 holds \+inf after its processors"):
        run(x, [Row(rep=1e-39, history=[2]), Row(), Row()])
    bad = ip.tensor([[0.0, math.nan, 1.0]] * 2)  # the raw row is checked first
    with pytest.raises(ip.InvalidArgumentError, match=r"to_sample_pipeline: logits row 0 holds NaN$"):
        run(bad, [Row(bias=[(1, 1.0)]), Row()])


def test_bad_tensors():
    x = ip.Tensor.zeros(3, 5)
    rows = [Row()] * 3
    args, kw = tensors(rows)
    I, F = (lambda v: ip.tensor(v, dtype=ip.int32)), (lambda v: ip.tensor(v, dtype=ip.float32))
    out = ip.Tensor.empty(3, dtype=ip.int64)

    def call(out=out, logprobs=None, top_ids=None, top_logprobs=None, processed=None, logits=x, **over):
        p = ip.ffi.new("to_sample_params *")
        names = ("temperature", "top_k", "top_p", "min_p", "uniform")
        for n, t in list(zip(names, args)) + list(kw.items()):
            t = over.get(n, t)
            setattr(p, n, t._desc if t is not None else ip.ffi.NULL)
        d = [t._desc if t is not None else ip.ffi.NULL for t in (out, logprobs, top_ids, top_logprobs, processed, logits)]
        ip._lib.check(ip.lib.to_sample_pipeline(*d, p))

    call()  # all fine
    with pytest.raises(ip.InvalidArgumentError, match="to_sample_pipeline: params is NULL"):
        ip._lib.check(ip.lib.to_sample_pipeline(out._desc, ip.ffi.NULL, ip.ffi.NULL, ip.ffi.NULL, ip.ffi.NULL,
                                                x._desc, ip.ffi.NULL))
    with pytest.raises(ip.InvalidArgumentError, match="to_sample_pipeline: history, history_offsets and prompt_lens "
                       "come together: prompt_lens is NULL but history is not"):
        call(prompt_lens=None)
    with pytest.raises(ip.InvalidArgumentError, match="bias_ids, bias_offsets and bias_values come together: "
                       "bias_ids is NULL but bias_offsets is not"):
        call(bias_ids=None)
    with pytest.raises(ip.ShapeError, match=r"history_offsets has shape \[3\] but logits has shape \[3, 5\] "
                       r"\(one offset per row, and one more\): expected \[4\]"):
        call(history_offsets=I([0, 0, 0]))
    with pytest.raises(ip.ShapeError, match=r"bias_values has shape \[1\] but bias_ids has 0 entries: expected \[0\]"):
        call(bias_values=F([1.0]))
    with pytest.raises(ip.ShapeError, match=r"typical_p has shape \[2\] but logits has shape \[3, 5\]: expected \[3\]"):
        call(typical_p=F([1.0, 1.0]))
    with pytest.raises(ip.DTypeError, match="no_repeat_ngram has dtype float32, expected one of: int32"):
        call(no_repeat_ngram=F([0.0] * 3))
    with pytest.raises(ip.DTypeError, match="history has dtype int64, expected one of: int32"):
        call(history=ip.Tensor.zeros(0, dtype=ip.int64))
    with pytest.raises(ip.ShapeError, match=r"history has shape \[0, 1\]: expected one dimension"):
        call(history=ip.Tensor.zeros(0, 1, dtype=ip.int32))
    # outputs
    with pytest.raises(ip.DTypeError, match="logprobs has dtype float16, expected one of: float32"):
        call(logprobs=ip.Tensor.empty(3, dtype=ip.float16))
    with pytest.raises(ip.ShapeError, match=r"logprobs has shape \[4\] but logits has shape \[3, 5\]: expected \[3\]"):
        call(logprobs=ip.Tensor.empty(4))
    with pytest.raises(ip.InvalidArgumentError, match="top_ids and top_logprobs come together: top_logprobs is NULL"):
        call(top_ids=ip.Tensor.empty(3, 2, dtype=ip.int64))
    with pytest.raises(ip.ShapeError, match=r"top_ids has shape \[3, 2\] and top_logprobs \[3, 3\]"):
        call(top_ids=ip.Tensor.empty(3, 2, dtype=ip.int64), top_logprobs=ip.Tensor.empty(3, 3))
    with pytest.raises(ip.ShapeError, match=r"top_ids has shape \[3, 6\] and top_logprobs \[3, 6\]: .* N <= 5"):
        call(top_ids=ip.Tensor.empty(3, 6, dtype=ip.int64), top_logprobs=ip.Tensor.empty(3, 6))
    with pytest.raises(ip.ShapeError, match=r"top_logprobs has shape \[2, 2\] but logits has shape \[3, 5\]: expected \[3, N\]"):
        call(top_ids=ip.Tensor.empty(3, 2, dtype=ip.int64), top_logprobs=ip.Tensor.empty(2, 2))
    with pytest.raises(ip.ShapeError, match=r"processed has shape \[3, 4\] but logits has shape \[3, 5\]: expected \[3, 5\]"):
        call(processed=ip.Tensor.empty(3, 4))
    with pytest.raises(ip.InvalidArgumentError, match="processed overlaps logits in memory"):
        call(processed=x)
    lp = ip.Tensor.empty(3)
    with pytest.raises(ip.InvalidArgumentError, match="top_logprobs overlaps logprobs in memory"):
        call(logprobs=lp, top_ids=ip.Tensor.empty(3, 1, dtype=ip.int64), top_logprobs=lp.view(3, 1))
    with pytest.raises(ip.InvalidArgumentError, match="logprobs overlaps temperature in memory"):
        call(logprobs=args[0])
    with pytest.raises(ip.InvalidArgumentError, match="processed is written but some of its elements share memory"):
        call(processed=ip.Tensor.empty(1, 5).expand(3, 5))
    # the wrapper refuses unknown keywords
    with pytest.raises(TypeError, match="unknown parameter 'repetition'"):
        ops.sample_pipeline(x, *args, repetition=None)
