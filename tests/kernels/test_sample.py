"""to_sample: one token per row of logits (greedy, or temperature / top-k / top-p / min-p and an
inverse-CDF draw with a given uniform).

The reference follows the header's rule in float64 on the exact logit values: sort all tokens by
decreasing logit (lower index first on ties), p ~ exp((x - max) / T), keep the top_k prefix, then
the top_p prefix (a token stays while the mass before it is < top_p * the top_k mass), then the
tokens with p >= min_p * max p, and draw the first kept token whose cumulative mass exceeds
uniform * the kept mass.

The library computes p in f32 (scaled logits, exp) and sums masses in fixed point, so its
cumulative masses differ from the reference's by a relative ~1e-6. A draw may therefore
legitimately land on a neighbour of the reference's token only when the uniform lies within EPS
(relative to the kept mass) of the boundary between them; `check_draw` accepts exactly that and
nothing else. Tests that need the exact token pick uniforms at the middle of wide CDF intervals.
"""
import math

import pytest
import torch

import inference_pio as ip
from inference_pio import ops, runtime
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, TORCH_DTYPES, from_torch, on_cuda, strided

DT_IDS = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}
EPS = 2e-5  # relative CDF slack for f32 probabilities (~1e-6 error) against the float64 reference
V_QWEN = 151936


def _null(t):
    return ip.ffi.NULL if t is None else t._desc


def c_sample(out, logits, temperature, top_k, top_p, min_p, uniform):
    check(ip.lib.to_sample(*(_null(t) for t in (out, logits, temperature, top_k, top_p, min_p, uniform))))


def f32(v):
    """v rounded to float32 (what the op sees)."""
    return torch.tensor(v, dtype=torch.float32).item()


class Params:
    """Per-row parameters as lists (values already rounded to what the tensors hold)."""

    def __init__(self, B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, uniform=0.5):
        def full(v):
            return [f32(x) for x in v] if isinstance(v, (list, tuple)) else [f32(v)] * B
        self.temperature, self.top_p, self.min_p, self.uniform = map(full, (temperature, top_p, min_p, uniform))
        self.top_k = list(top_k) if isinstance(top_k, (list, tuple)) else [top_k] * B

    def tensors(self):
        return (ip.tensor(self.temperature, dtype=ip.float32), ip.tensor(self.top_k, dtype=ip.int32),
                ip.tensor(self.top_p, dtype=ip.float32), ip.tensor(self.min_p, dtype=ip.float32),
                ip.tensor(self.uniform, dtype=ip.float32))

    def row(self, r):
        return self.temperature[r], self.top_k[r], self.top_p[r], self.min_p[r]


def run(x, params, out=None):
    out = ip.Tensor.empty(x.shape[0], dtype=ip.int64) if out is None else out
    c_sample(out, x, *params.tensors())
    return out.tolist()


# ------------------------------------------------------------------ reference

def ref_order(x):
    """All token ids by decreasing logit, lower index first on ties, and their p / max p."""
    order = torch.sort(x, descending=True, stable=True).indices
    return order


def reference(x, T, k, p, mp):
    """(order, e, lk, s_k, L): the full order, e = p / max p along it, the top_k length (with the
    tokens tied with the top_k-th, as transformers keeps them), the top_k mass and the kept
    length L (float64)."""
    order = ref_order(x)
    xs = x[order]
    e = torch.exp((xs - xs[0]) / T)
    V = x.numel()
    lk = V if k <= 0 or k >= V else int((xs >= xs[k - 1]).sum())
    c = torch.cumsum(e[:lk], 0)
    s_k = float(c[-1])
    L = lk
    if p < 1:
        L = int(((c - e[:lk]) < p * s_k).sum())  # mass before each token < p * s_k: a prefix
    if mp > 0:
        L = min(L, int((e >= mp).sum()))
    return order, e, lk, s_k, L


def ref_draw(x, T, k, p, mp, u):
    if T <= 0:
        return int(ref_order(x)[0])
    order, e, _, _, L = reference(x, T, k, p, mp)
    c = torch.cumsum(e[:L], 0)
    j = int((c <= u * float(c[-1])).sum())
    return int(order[min(j, L - 1)])


def check_draw(got, x, T, k, p, mp, u, eps=EPS, where=""):
    """got must be the reference's draw, or a token the draw reaches within eps of a boundary
    (its CDF interval within eps of u, and kept under the filters loosened by eps)."""
    expect = ref_draw(x, T, k, p, mp, u)
    if got == expect:
        return
    msg = f"{where}: got token {got}, reference {expect} (T={T}, top_k={k}, top_p={p}, min_p={mp}, u={u})"
    assert T > 0, msg
    order, e, lk, s_k, L = reference(x, T, k, p, mp)
    pos = (order == got).nonzero()
    assert pos.numel() == 1, msg
    j = int(pos[0])
    c = torch.cumsum(e[:lk], 0)
    before, after = float(c[j] - e[j]) if j < lk else math.inf, float(c[j]) if j < lk else math.inf
    assert j < lk, msg + " (outside top_k)"
    assert p >= 1 or before < (p + eps) * s_k, msg + " (outside top_p)"
    assert mp <= 0 or float(e[j]) >= mp * (1 - eps), msg + " (below min_p)"
    assert float(e[j]) > 0, msg + " (zero probability)"
    K = float(c[L - 1])
    assert before / K - eps <= u <= after / K + eps, msg + f" (u outside [{before / K}, {after / K}] +- eps)"


def check_rows(got, ref, params, eps=EPS):
    for r in range(len(got)):
        check_draw(got[r], ref[r], *params.row(r), params.uniform[r], eps=eps, where=f"row {r}")


def mid_uniforms(x, T, k, p, mp, count, gen, min_width=1e-3):
    """Up to `count` (uniform, token) pairs with the uniform at the middle of a kept token's CDF
    interval that is at least min_width wide (relative): the draw is unambiguous."""
    order, e, _, _, L = reference(x, T, k, p, mp)
    c = torch.cumsum(e[:L], 0)
    K = float(c[-1])
    lo, hi = (c - e[:L]) / K, c / K
    wide = ((hi - lo) >= min_width).nonzero().flatten()
    pick = wide[torch.randperm(wide.numel(), generator=gen)[:count]]
    return [(f32(float((lo[j] + hi[j]) / 2)), int(order[j])) for j in pick]


def make_logits(B, V, dtype, gen, scale=2.0, kind="randn"):
    """(ours [B, V], float64 torch copy of the exact values)."""
    if kind == "randn":
        ref = torch.randn(B, V, generator=gen, dtype=torch.float64) * scale
    elif kind == "ties":  # a few integer levels: many exact ties
        ref = torch.randint(-3, 2, (B, V), generator=gen).to(torch.float64)
    elif kind == "neginf":  # randn with about 40% -inf (masked tokens)
        ref = torch.randn(B, V, generator=gen, dtype=torch.float64) * scale
        ref[torch.rand(B, V, generator=gen) < 0.4] = -math.inf
        ref[:, (torch.arange(B) * 7) % V] = 1.0  # each row keeps a finite logit
    ref = ref.to(TORCH_DTYPES[dtype])
    return from_torch(ref), ref.to(torch.float64)


# ------------------------------------------------------------------ correctness

FILTERS = {
    "plain": dict(),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.05),
    "all": dict(top_k=20, top_p=0.9, min_p=0.02, temperature=0.7),
    "big_top_k": dict(top_k=3000, top_p=0.95),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("V", [1, 7, 1000, 4099])
@pytest.mark.parametrize("filt", list(FILTERS))
def test_sample_random(simd, gen, dtype, V, filt):
    B = 12
    x, ref = make_logits(B, V, dtype, gen)
    u = torch.rand(B, generator=gen).tolist()
    u[0], u[1] = 0.0, f32(1 - 2 ** -24)  # the ends of [0, 1)
    params = Params(B, uniform=u, **FILTERS[filt])
    check_rows(run(x, params), ref, params)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("filt", ["plain", "top_k", "top_p", "min_p", "all"])
def test_sample_exact_midpoints(simd, gen, dtype, filt):
    """Uniforms at the middle of wide CDF intervals: exactly the reference's token."""
    V = 300
    x1, ref1 = make_logits(1, V, dtype, gen, scale=3.0)
    kw = FILTERS[filt]
    T, k, p, mp = (f32(kw.get("temperature", 1.0)), kw.get("top_k", 0), f32(kw.get("top_p", 1.0)),
                   f32(kw.get("min_p", 0.0)))
    pairs = mid_uniforms(ref1[0], T, k, p, mp, 16, gen)
    assert pairs
    B = len(pairs)
    x = x1.expand(B, V)  # one row for every draw (stride 0 over the rows)
    params = Params(B, temperature=T, top_k=k, top_p=p, min_p=mp, uniform=[u for u, _ in pairs])
    assert run(x, params) == [t for _, t in pairs]


def test_sample_qwen_vocab(simd, gen):
    """Full-vocabulary rows (bf16 and f32), greedy and sampled rows mixed, every filter."""
    for dtype in (ip.bfloat16, ip.float32):
        B = 6
        x, ref = make_logits(B, V_QWEN, dtype, gen, scale=3.0)
        params = Params(B, temperature=[0.0, 1.0, 0.8, 1.2, 0.6, 1.0], top_k=[0, 0, 50, 0, 5000, 0],
                        top_p=[1.0, 0.9, 0.9, 1.0, 0.8, 0.95], min_p=[0.0, 0.0, 0.0, 0.01, 0.0, 0.001],
                        uniform=torch.rand(B, generator=gen).tolist())
        check_rows(run(x, params), ref, params)


@pytest.mark.parametrize("kind", ["transposed", "sliced"])
def test_sample_strided(simd, gen, kind):
    B, V = 5, 257
    for dtype in FLOAT_DTYPES:
        x, ref = make_logits(B, V, dtype, gen)
        params = Params(B, temperature=[1.0, 0.0, 0.5, 2.0, 1.0], top_k=[0, 0, 10, 0, 300],
                        top_p=[0.9, 1.0, 1.0, 0.7, 1.0], min_p=[0.0, 0.0, 0.1, 0.0, 0.0],
                        uniform=torch.rand(B, generator=gen).tolist())
        backing = ip.Tensor.full((B, 2), -7, dtype=ip.int64)
        out = backing[:, 1]  # a strided output
        got = run(strided(x, kind), params, out=out)
        check_rows(got, ref, params)
        assert backing[:, 0].tolist() == [-7] * B
    # strided parameter tensors: every other element of a wider buffer
    x, ref = make_logits(B, V, ip.float32, gen)
    params = Params(B, top_k=[0, 3, 0, 40, 0], top_p=0.85, uniform=torch.rand(B, generator=gen).tolist())
    wide = []
    for t in params.tensors():
        w = ip.Tensor.zeros((2 * B,), dtype=t.dtype)
        w[::2].copy_(t)
        wide.append(w[::2])
    out = ip.Tensor.empty(B, dtype=ip.int64)
    c_sample(out, x, *wide)
    check_rows(out.tolist(), ref, params)


def test_sample_greedy_mixed(simd, gen):
    """Greedy rows (temperature <= 0) are the argmax, first index on ties, whatever the other
    parameters say; sampled rows in the same batch are unaffected."""
    B, V = 8, 999
    x, ref = make_logits(B, V, ip.bfloat16, gen, kind="ties")  # ties at the max: lowest index
    temps = [0.0, 1.0, -1.0, 0.5, 0.0, 3.0, -0.0, 1.0]
    params = Params(B, temperature=temps, top_k=[1, 5, 0, 0, 7, 0, 2, 0], top_p=[0.5, 1.0, 0.1, 0.9, 1, 1, 1, 0.3],
                    min_p=[1.0, 0, 0, 0.5, 0, 0, 0, 0], uniform=torch.rand(B, generator=gen).tolist())
    got = run(x, params)
    check_rows(got, ref, params)
    for r in (0, 2, 4, 6):
        assert got[r] == int(torch.nonzero(ref[r] == ref[r].max())[0])


def test_sample_ties(simd):
    """Tied logits share the mass equally and are ordered by index: the draw walks them in
    index order, whatever the filter."""
    row = [0.0, 2.0, 1.0, 2.0, 2.0, 1.0, -1.0, 2.0]  # four tokens tie at the max: 1, 3, 4, 7
    x = ip.tensor([row] * 8)
    ref = torch.tensor([row] * 8, dtype=torch.float64)
    # T tiny: the four maxima hold all the mass, a quarter each
    params = Params(8, temperature=1e-3, uniform=[0.0, 0.2, 0.3, 0.45, 0.55, 0.7, 0.8, 0.99])
    assert run(x, params) == [1, 1, 3, 3, 4, 4, 7, 7]
    check_rows(run(x, params), ref, params)
    # top_k = 2 falls inside the tie: every token tied with the 2nd is kept (transformers' rule)
    params = Params(8, top_k=2, uniform=[0.1, 0.3, 0.45, 0.55, 0.7, 0.9, 0.0, 0.999])
    assert run(x, params) == run(x, Params(8, top_k=4, uniform=params.uniform))
    # top_k = 5 cuts inside the tie at 1.0 (tokens 2 and 5): both kept
    params = Params(8, top_k=5, temperature=0.5, uniform=[0.0, 0.3, 0.7, 0.95, 0.97, 0.98, 0.99, 0.999])
    got = run(x, params)
    check_rows(got, ref, params)
    assert 5 in got
    # min_p = 1 keeps exactly the tokens tied at the max
    params = Params(8, min_p=1.0, uniform=[0.1, 0.3, 0.45, 0.55, 0.7, 0.9, 0.0, 0.999])
    assert run(x, params) == [1, 3, 3, 4, 4, 7, 1, 7]
    # top_k = 1 keeps the tokens tied at the max
    assert run(x, Params(8, top_k=1, uniform=[0.1, 0.3, 0.6, 0.9] * 2)) == [1, 3, 4, 7] * 2
    # a row without ties: top_k = 1 is greedy among the sampled rows
    assert run(ip.tensor([[0.0, 3.0, 1.0, 2.0]] * 2), Params(2, top_k=1, uniform=0.99)) == [1, 1]


def test_sample_top_p_rule(simd):
    """Probabilities 0.5, 0.3, 0.2 (temperature 1 on their logs): top_p 0.45 keeps the first
    (the most probable is always kept), 0.55 the first two (mass before the second, 0.5, is
    < 0.55), 0.85 all three."""
    row = [math.log(0.3), math.log(0.5), math.log(0.2)]
    x = ip.tensor([row] * 6)
    for p, kept in [(0.45, [1]), (0.55, [1, 0]), (0.85, [1, 0, 2]), (1.0, [1, 0, 2]), (5.0, [1, 0, 2])]:
        masses = [[0.5, 0.3, 0.2][[1, 0, 2].index(t)] for t in kept]
        total, cum, us, expect = sum(masses), 0.0, [], []
        for t, m in zip(kept, masses):
            us.append((cum + m / 2) / total)
            expect.append(t)
            cum += m
        n = len(us)
        got = run(x[:n], Params(n, top_p=p, uniform=us))
        assert got == expect, (p, got, expect)


def test_sample_neginf(simd, gen):
    """-inf logits have no probability and are never drawn, even at uniform ~ 1, and even when
    the filters would otherwise keep them."""
    for dtype in FLOAT_DTYPES:
        B, V = 10, 500
        x, ref = make_logits(B, V, dtype, gen, kind="neginf")
        u = torch.rand(B, generator=gen).tolist()
        u[:3] = [0.0, f32(1 - 2 ** -24), f32(0.999999)]
        params = Params(B, top_k=[0, 0, 0, 450, 3, 0, 0, 0, 499, 0], top_p=[1.0] * 5 + [0.99, 0.5, 1, 1, 1],
                        min_p=[0.0] * 7 + [1e-6, 0, 0.0], temperature=[1, 1, 100, 1, 1, 1, 1, 1, 50, 0], uniform=u)
        got = run(x, params)
        check_rows(got, ref, params)
        for r in range(B):
            assert ref[r, got[r]] != -math.inf
    # a single finite logit among -inf: always that one
    row = [-math.inf] * 9
    row[6] = -3.0
    assert run(ip.tensor([row] * 3), Params(3, uniform=[0.0, 0.5, f32(1 - 2 ** -24)])) == [6, 6, 6]


@pytest.mark.parametrize("T", [1e-3, 0.05, 100.0, 1e4])
def test_sample_extreme_temperatures(simd, gen, T):
    B, V = 16, 3001
    x, ref = make_logits(B, V, ip.float32, gen, scale=3.0)
    u = torch.rand(B, generator=gen).tolist()
    u[:4] = [0.0, 1e-7, f32(1 - 2 ** -24), 0.9999]
    params = Params(B, temperature=T, top_k=[0, 0, 0, 0, 10, 100, 0, 0] * 2,
                    top_p=[1.0, 0.9, 1.0, 0.5] * 4, min_p=[0.0, 0.0, 0.3, 0.0] * 4, uniform=u)
    check_rows(run(x, params), ref, params)


def test_sample_uniform_extremes(simd, gen):
    """uniform 0 draws the most probable kept token; uniform just below 1 the last kept one
    with any mass (the reference tells which)."""
    B, V = 8, 2000
    x, ref = make_logits(B, V, ip.float16, gen)
    for u in (0.0, f32(1 - 2 ** -24)):
        params = Params(B, top_k=[0, 30, 0, 0] * 2, top_p=[1.0, 1.0, 0.7, 0.9] * 2, min_p=[0, 0, 0, 0.05] * 2, uniform=u)
        got = run(x, params)
        check_rows(got, ref, params)
        if u == 0:
            assert got == [int(ref_order(ref[r])[0]) for r in range(B)]


def test_sample_chi_square(gen):
    """Many draws with random uniforms (fixed seed) from one processed distribution: the
    empirical frequencies match it.

    Pearson's statistic over the kept tokens (bins with expected count < 5 merged) has df = bins - 1
    and, under the right distribution, mean df and variance 2 df. The bound df + 7 sqrt(2 df) is
    7 standard deviations out in the normal approximation; the chi-square's heavier right tail puts
    the real false-alarm rate for df ~ 20..60 below 1e-6 (e.g. P(chi2_30 > 84) ~ 1e-6), while a
    wrong filter or an off-by-one in the inverse CDF moves the statistic by thousands. Tokens the
    filters drop must never be drawn."""
    seed = torch.Generator().manual_seed(1234)
    V, N = 80, 40000
    row = torch.randn(V, generator=seed, dtype=torch.float64) * 1.5
    x1 = from_torch(row.to(torch.float32)[None])
    exact = row.to(torch.float32).to(torch.float64)
    for T, k, p, mp in [(1.0, 0, 1.0, 0.0), (0.8, 40, 0.9, 0.01), (1.3, 0, 0.7, 0.0), (0.6, 0, 1.0, 0.02)]:
        order, e, _, _, L = reference(exact, f32(T), k, f32(p), f32(mp))
        probs = e[:L] / e[:L].sum()
        u = torch.rand(N, generator=seed, dtype=torch.float32)
        params = Params(N, temperature=T, top_k=k, top_p=p, min_p=mp, uniform=u.tolist())
        got = torch.tensor(run(x1.expand(N, V), params))
        kept = set(order[:L].tolist())
        assert set(got.tolist()) <= kept
        counts = torch.bincount(got, minlength=V)[order[:L]].to(torch.float64)
        expected = probs * N
        # merge the small-expectation tail (the order is by decreasing probability)
        big = int((expected >= 5).sum())
        obs = torch.cat([counts[:big], counts[big:].sum().reshape(1)]) if big < L else counts
        exp = torch.cat([expected[:big], expected[big:].sum().reshape(1)]) if big < L else expected
        if exp[-1] < 5 and exp.numel() > 1:  # a tiny merged tail joins the last real bin
            obs = torch.cat([obs[:-2], obs[-2:].sum().reshape(1)])
            exp = torch.cat([exp[:-2], exp[-2:].sum().reshape(1)])
        df = exp.numel() - 1
        stat = float(((obs - exp) ** 2 / exp).sum())
        assert df >= 1
        assert stat < df + 7 * math.sqrt(2 * df), (T, k, p, mp, stat, df)


def test_sample_threads_independent(gen):
    """The same tokens with 1 and 2 threads (rows are split differently between threads)."""
    B, V = 32, 20000
    x, ref = make_logits(B, V, ip.bfloat16, gen)
    params = Params(B, temperature=[0.0, 1.0, 0.7, 1.5] * 8, top_k=[0, 0, 50, 3000] * 8,
                    top_p=[1.0, 0.9, 0.95, 0.8] * 8, min_p=[0, 0, 0.01, 0] * 8,
                    uniform=torch.rand(B, generator=gen).tolist())
    before = runtime.num_threads()
    try:
        runtime.set_num_threads(1)
        one = run(x, params)
        runtime.set_num_threads(2)
        two = run(x, params)
    finally:
        runtime.set_num_threads(before)
    assert one == two
    check_rows(one, ref, params)


def test_sample_wrapper(gen):
    B, V = 4, 50
    x, ref = make_logits(B, V, ip.float32, gen)
    params = Params(B, temperature=[0.0, 1.0, 1.0, 0.5], top_k=[0, 5, 0, 0], top_p=[1, 1, 0.5, 1],
                    uniform=torch.rand(B, generator=gen).tolist())
    out = ops.sample(x, *params.tensors())
    assert out.shape == (B,) and out.dtype is ip.int64
    check_rows(out.tolist(), ref, params)
    mine = ip.Tensor.empty(B, dtype=ip.int64)
    assert ops.sample(x, *params.tensors(), out=mine) is mine and mine.tolist() == out.tolist()
    empty = ops.sample(ip.Tensor.empty(0, V), *Params(0).tensors())  # no rows: nothing to do
    assert empty.shape == (0,)


# ------------------------------------------------------------------ errors

def test_sample_bad_logits(simd):
    ok = [0.0, 1.0, 2.0]
    for bad, what in [([0.0, math.nan, 1.0], "holds NaN"), ([0.0, math.inf, 1.0], r"holds \+inf"),
                      ([-math.inf] * 3, "is all -inf")]:
        for temp in (1.0, 0.0):  # greedy rows are checked too
            x = ip.tensor([ok, ok, bad, bad])
            with pytest.raises(ip.InvalidArgumentError, match=f"to_sample: logits row 2 {what}"):
                run(x, Params(4, temperature=temp))


def test_sample_bad_values():
    x = ip.Tensor.zeros(3, 5)
    cases = [
        (dict(temperature=[1, math.nan, 1]), r"temperature\[1\] = nan is not finite"),
        (dict(temperature=[1, 1, math.inf]), r"temperature\[2\] = inf is not finite"),
        (dict(top_p=[0.0, 1, 1]), r"top_p\[0\] = 0 must be > 0"),
        (dict(top_p=[1, -0.5, 1]), r"top_p\[1\] = -0.5 must be > 0"),
        (dict(top_p=[1, 1, math.nan]), r"top_p\[2\] = nan"),
        (dict(top_p=[1, math.inf, 1]), r"top_p\[1\] = inf must be > 0 and finite"),
        (dict(min_p=[0, -0.1, 0]), r"min_p\[1\] = -0.1 is outside \[0, 1\]"),
        (dict(min_p=[0, 0, 1.5]), r"min_p\[2\] = 1.5 is outside"),
        (dict(min_p=[math.nan, 0, 0]), r"min_p\[0\] = nan"),
        (dict(uniform=[0.5, 1.0, 0.5]), r"uniform\[1\] = 1 is outside \[0, 1\)"),
        (dict(uniform=[-1e-9, 0.5, 0.5]), r"uniform\[0\] = -1e-09 is outside"),
        (dict(uniform=[0.5, 0.5, math.nan]), r"uniform\[2\] = nan"),
        (dict(temperature=[0, 0, 0], uniform=[0.5, 2.0, 0.5]), r"uniform\[1\] = 2"),  # greedy rows too
    ]
    for kw, msg in cases:
        with pytest.raises(ip.InvalidArgumentError, match="to_sample: " + msg):
            run(x, Params(3, **kw))


def test_sample_bad_tensors():
    x = ip.Tensor.zeros(3, 5)
    out = ip.Tensor.empty(3, dtype=ip.int64)
    t, k, p, mp, u = Params(3).tensors()
    args = dict(out=out, logits=x, temperature=t, top_k=k, top_p=p, min_p=mp, uniform=u)
    names = list(args)

    def call(**over):
        a = dict(args, **over)
        c_sample(*(a[n] for n in names))

    for name in names:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_sample: {name} is NULL"):
            call(**{name: None})
    with pytest.raises(ip.DTypeError, match="to_sample: logits has dtype int32, expected one of: float32, float16, bfloat16"):
        call(logits=ip.Tensor.zeros(3, 5, dtype=ip.int32))
    with pytest.raises(ip.DTypeError, match="to_sample: out has dtype int32, expected one of: int64"):
        call(out=ip.Tensor.empty(3, dtype=ip.int32))
    for name, wrong, expect in [("temperature", ip.float16, "float32"), ("top_k", ip.int64, "int32"),
                                ("top_p", ip.float64 if hasattr(ip, "float64") else ip.int32, "float32"),
                                ("min_p", ip.bfloat16, "float32"), ("uniform", ip.int32, "float32")]:
        with pytest.raises(ip.DTypeError, match=f"to_sample: {name} has dtype .* expected one of: {expect}$"):
            call(**{name: ip.Tensor.zeros(3, dtype=wrong)})
    with pytest.raises(ip.ShapeError, match="to_sample: logits must have 2 dimensions, got 1"):
        call(logits=ip.Tensor.zeros(5))
    with pytest.raises(ip.ShapeError, match="to_sample: logits must have 2 dimensions, got 3"):
        call(logits=ip.Tensor.zeros(3, 1, 5))
    with pytest.raises(ip.ShapeError, match=r"to_sample: logits has shape \[3, 0\]: rows need at least one token"):
        call(logits=ip.Tensor.zeros(3, 0))
    for name, dtype in [("out", ip.int64), ("temperature", ip.float32), ("top_k", ip.int32), ("top_p", ip.float32),
                        ("min_p", ip.float32), ("uniform", ip.float32)]:
        with pytest.raises(ip.ShapeError, match=rf"to_sample: {name} has shape \[4\] but logits has shape \[3, 5\]: expected \[3\]"):
            call(**{name: ip.Tensor.zeros(4, dtype=dtype)})
        with pytest.raises(ip.ShapeError, match=rf"to_sample: {name} has shape \[3, 1\]"):
            call(**{name: ip.Tensor.zeros(3, 1, dtype=dtype)})
    short = ip.Tensor(ip.Tensor.empty(2).storage, (3, 5), (5, 1), ip.float32)
    with pytest.raises(ip.BoundsError, match="to_sample: logits needs 60 bytes"):
        call(logits=short)
    with pytest.raises(ip.InvalidArgumentError, match="to_sample: out is written but some of its elements share memory"):
        call(out=ip.Tensor.empty(1, dtype=ip.int64).expand(3))
    with pytest.raises(ip.InvalidArgumentError, match="to_sample: out overlaps logits in memory"):
        call(out=ip.Tensor(x.storage, (3,), (1,), ip.int64))
    k64 = ip.Tensor.zeros(6, dtype=ip.int32)
    with pytest.raises(ip.InvalidArgumentError, match="to_sample: out overlaps top_k in memory"):
        call(out=ip.Tensor(k64.storage, (3,), (1,), ip.int64), top_k=k64[:3])


def test_sample_devices():
    x, out = ip.Tensor.zeros(3, 4), ip.Tensor.empty(3, dtype=ip.int64)
    t, k, p, mp, u = Params(3).tensors()
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_sample(*(on_cuda(a) for a in (out, x, t, k, p, mp, u))))
    with pytest.raises(ip.DeviceError, match="to_sample: tensors are on different devices"):
        check(ip.lib.to_sample(out._desc, on_cuda(x), t._desc, k._desc, p._desc, mp._desc, u._desc))
