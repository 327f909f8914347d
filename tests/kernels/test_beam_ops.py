"""The two ops under beam search: to_kv_copy_blocks (copy-on-write of shared paged KV cache
blocks) and to_beam_topk (a beam step's candidates: log-softmax plus the beam's score, the k best
of a group's rows).

to_kv_copy_blocks moves bytes, so it is checked bit for bit against torch indexing on every KV
cache dtype. to_beam_topk's values are f32 operations on the logits except exp and ln, which the
reference takes from torch (float64 sums of float32 differences, as the op sums in f64): values
agree to a few ulps, and the reference's ranking is the op's wherever no two candidates are that
close. Exact ties (equal logits, equal rows) are built so that both sides compute bitwise equal
values: there the lower flat index must come first."""
import math
import re

import pytest
import torch

import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import TensorOpsError

from helpers import FLOAT_DTYPES, TORCH_DTYPES, from_torch, on_cuda, strided, to_torch

DT_IDS = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}


# ================================================================ to_kv_copy_blocks

def caches_of(n, shape, dtype, gen):
    ref = [torch.randn(*shape, generator=gen).to(TORCH_DTYPES[dtype]) for _ in range(n)]
    return [from_torch(r) for r in ref], ref


def ids(values, dtype=ip.int32):
    return ip.tensor(list(values), dtype=dtype) if values else ip.Tensor.empty(0, dtype=dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("id_dtype", [ip.int32, ip.int64], ids=["i32", "i64"])
def test_kv_copy_blocks_matches_indexing(dtype, id_dtype, gen):
    # 2 x 3 layers of [num_blocks, block_size, Hkv, D] caches, odd sizes; one src copied twice
    caches, ref = caches_of(6, (11, 5, 3, 7), dtype, gen)
    src, dst = [4, 4, 0, 9], [1, 7, 10, 3]
    ops.kv_copy_blocks(caches, ids(src, id_dtype), ids(dst, id_dtype))
    for c, r in zip(caches, ref):
        r[dst] = r[src].clone()
        assert torch.equal(to_torch(c).view(torch.int16 if r.element_size() == 2 else torch.int32),
                           r.view(torch.int16 if r.element_size() == 2 else torch.int32))


def test_kv_copy_blocks_many_pairs_and_caches(gen):
    # more pairs than a GPU launch carries (256) and more caches (64): the same result
    caches, ref = caches_of(70, (600, 2, 1, 3), ip.float32, gen)
    perm = torch.randperm(600, generator=gen).tolist()
    src, dst = perm[:300], perm[300:]
    ops.kv_copy_blocks(caches, ids(src), ids(dst))
    for c, r in zip(caches, ref):
        r[dst] = r[src].clone()
        assert torch.equal(to_torch(c), r)


def test_kv_copy_blocks_no_pairs_changes_nothing(gen):
    caches, ref = caches_of(2, (4, 3, 2, 2), ip.bfloat16, gen)
    ops.kv_copy_blocks(caches, ids([]), ids([]))
    for c, r in zip(caches, ref):
        assert torch.equal(to_torch(c), r)


@pytest.mark.parametrize("src,dst,what", [
    ([0, 5], [1, 2], "src[1] = 5 is outside [0, 5)"),
    ([-1], [1], "src[0] = -1 is outside"),
    ([0], [5], "dst[0] = 5 is outside [0, 5)"),
    ([2], [2], "src[0] = dst[0] = 2"),
    ([0, 1], [3, 3], "dst[1] = 3 appears twice"),
    ([0, 3], [3, 4], "block 3 is both a src and a dst"),
])
def test_kv_copy_blocks_rejects_bad_ids(src, dst, what, gen):
    caches, ref = caches_of(2, (5, 2, 1, 4), ip.float16, gen)
    with pytest.raises(TensorOpsError, match=re.escape(what)):
        ops.kv_copy_blocks(caches, ids(src), ids(dst))
    for c, r in zip(caches, ref):  # checked before anything was written
        assert torch.equal(to_torch(c), r)


def test_kv_copy_blocks_rejects_bad_tensors(gen):
    (a, b), _ = caches_of(2, (5, 2, 1, 4), ip.float32, gen)
    s, d = ids([0]), ids([1])
    with pytest.raises(TensorOpsError, match="src has 1 ids but dst has 2"):
        ops.kv_copy_blocks([a], s, ids([1, 2]))
    with pytest.raises(TensorOpsError, match="caches\\[1\\] has shape \\[6, 2, 1, 4\\]"):
        ops.kv_copy_blocks([a, ip.Tensor.empty(6, 2, 1, 4)], s, d)
    with pytest.raises(TensorOpsError, match="caches\\[1\\] is float16 but caches\\[0\\] is float32"):
        ops.kv_copy_blocks([a, ip.Tensor.empty(5, 2, 1, 4, dtype=ip.float16)], s, d)
    with pytest.raises(TensorOpsError, match="not contiguous"):
        ops.kv_copy_blocks([ip.Tensor.empty(5, 4, 2).transpose(1, 2)], s, d)
    with pytest.raises(TensorOpsError, match="caches\\[0\\] and caches\\[1\\] overlap"):
        ops.kv_copy_blocks([a, a], s, d)
    with pytest.raises(TensorOpsError, match="needs at least one cache"):
        ops.kv_copy_blocks([], s, d)
    with pytest.raises(TensorOpsError, match="src"):
        ops.kv_copy_blocks([a, b], ip.tensor([0.0]), d)
    # the ids are host values whatever the caches' device
    descs = ip.ffi.new("to_tensor[]", 1)
    descs[0] = a._desc[0]
    with pytest.raises(TensorOpsError, match="src is on cuda:63 but the block ids must be a CPU tensor"):
        ip._lib.check(ip.lib.to_kv_copy_blocks(descs, 1, on_cuda(s), d._desc))


# ================================================================ to_beam_topk

def f32(x):
    return torch.tensor(x, dtype=torch.float32)


def reference_values(logits, scores, first, rows, suppress=()):
    """float32 values [rows * V] of a group's candidates, flat b * V + t (the op's formula with
    torch's exp and log)."""
    x = to_torch(logits).float()[first:first + rows]
    m = x.max(dim=1, keepdim=True).values
    d = x - m
    ls = torch.log(torch.exp(d.double()).sum(dim=1, keepdim=True)).float()
    v = (d - ls) + torch.tensor(scores[first:first + rows], dtype=torch.float32)[:, None]
    for t in suppress:
        if t >= 0:
            v[:, t] = -math.inf
    return v.reshape(-1)


def check_group(got_scores, got_ids, ref, k):
    """got_*: one output row (lists); ref: reference values [rows * V] (float32)."""
    K = len(got_ids)
    assert got_ids[k:] == [-1] * (K - k) and all(s == -math.inf for s in got_scores[k:])
    sc, fl = got_scores[:k], got_ids[:k]
    assert len(set(fl)) == k and all(0 <= i < ref.numel() for i in fl)
    for j in range(k - 1):  # best first; equal values by flat index
        assert sc[j] > sc[j + 1] or (sc[j] == sc[j + 1] and fl[j] < fl[j + 1]), (j, sc[j:j + 2], fl[j:j + 2])
    r = ref.double()
    finite = r[torch.isfinite(r)]
    tol = 4 * 2.0 ** -23 * max(1.0, float(finite.abs().max()) if finite.numel() else 1.0)
    for s, i in zip(sc, fl):  # each value is its candidate's
        assert s == r[i] or abs(s - float(r[i])) <= tol, (i, s, float(r[i]))
    # a top-k: nothing left out beats the k-th by more than the tolerance
    rest = r.clone()
    rest[fl] = -math.inf
    assert float(rest.max()) <= sc[-1] + 2 * tol
    # where no two candidates near the top are that close, exactly the reference's order
    order = sorted(range(r.numel()), key=lambda i: (-float(r[i]), i))[:k + 1]
    vals = [float(r[i]) for i in order]
    gaps = [a - b for a, b in zip(vals, vals[1:]) if math.isfinite(a)]
    if all(g > 4 * tol for g in gaps):
        assert fl == order[:k]


def run_topk(logits, beam_scores, groups, K, suppress=None):
    g = ip.tensor([list(x) for x in groups], dtype=ip.int32) if groups else ip.Tensor.empty(0, 3, dtype=ip.int32)
    sup = None
    if suppress is not None:
        width = max(len(s) for s in suppress)
        sup = ip.tensor([list(s) + [-1] * (width - len(s)) for s in suppress], dtype=ip.int64)
    s, i = ops.beam_topk(logits, ip.tensor(beam_scores, dtype=ip.float32), g, K, sup)
    return s.tolist(), i.tolist()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_beam_topk_against_reference(dtype, layout, gen, simd):
    R, V = 9, 1003
    x = (torch.randn(R, V, generator=gen) * 3).to(TORCH_DTYPES[dtype])
    logits = from_torch(x)
    if layout != "contiguous":
        logits = strided(logits, layout)
    beam_scores = (torch.rand(R, generator=gen) * -20).tolist()
    # groups of different sizes, one starting past row 0 with a gap before it, k = 2 * rows-ish
    groups = [(0, 1, 2), (1, 4, 8), (6, 3, 7), (5, 1, 1)]
    K = 9
    scores, flat = run_topk(logits, beam_scores, groups, K)
    for g, (first, rows, k) in enumerate(groups):
        check_group(scores[g], flat[g], reference_values(logits, beam_scores, first, rows), k)


def test_beam_topk_qwen_vocabulary(gen, simd):
    # the real vocabulary: rows of 151,936 logits, many chunks, a k of 16 over 8 beams
    R, V = 8, 151936
    x = torch.randn(R, V, generator=gen) * 4
    logits = from_torch(x)
    beam_scores = (torch.rand(R, generator=gen) * -5).tolist()
    scores, flat = run_topk(logits, beam_scores, [(0, 8, 16)], 16)
    check_group(scores[0], flat[0], reference_values(logits, beam_scores, 0, 8), 16)


def test_beam_topk_k_above_row_length_and_padding(gen):
    # V = 5 < k: every row gives all its tokens; K wider than every k: -inf / -1 padding
    x = torch.randn(4, 5, generator=gen)
    logits = from_torch(x)
    beam_scores = [0.0, -1.5, -0.25, -3.0]
    groups = [(0, 3, 12), (3, 1, 5), (1, 2, 3)]
    scores, flat = run_topk(logits, beam_scores, groups, 16)
    for g, (first, rows, k) in enumerate(groups):
        check_group(scores[g], flat[g], reference_values(logits, beam_scores, first, rows), k)


def test_beam_topk_exact_ties_go_to_the_lower_flat_index():
    # two identical rows with the same score (beams that just forked) and tied logits in a row:
    # equal values, bit for bit, ordered by b * V + t
    V = 40
    row = torch.linspace(-3, 3, V)
    row[7] = row[31] = row[19] = 5.0  # the three best, tied
    row[2] = row[30] = 4.0
    x = torch.stack([row, row])
    scores, flat = run_topk(from_torch(x), [-1.25, -1.25], [(0, 2, 8)], 8)
    assert flat[0] == [7, 19, 31, V + 7, V + 19, V + 31, 2, 30]
    assert scores[0][0] == scores[0][5] and scores[0][5] > scores[0][6]


def test_beam_topk_suppressed_ids_are_minus_inf(gen):
    x = torch.randn(3, 50, generator=gen)
    x[:, 11] = 20.0  # the best token of every row, unless suppressed
    x[:, 4] = 19.0
    logits = from_torch(x)
    beam_scores = [0.0, -0.5, -1.0]
    # group 0 suppresses 11 (and has an unused entry); group 1 suppresses nothing
    scores, flat = run_topk(logits, beam_scores, [(0, 2, 4), (2, 1, 3)], 4, suppress=[[11, -1], [-1, -1]])
    check_group(scores[0], flat[0], reference_values(logits, beam_scores, 0, 2, [11]), 4)
    check_group(scores[1], flat[1], reference_values(logits, beam_scores, 2, 1), 3)
    assert 11 not in flat[0] and 50 + 11 not in flat[0] and flat[1][0] == 11
    # all of a tiny row suppressed but one: the suppressed ones still come, last, at -inf
    y = from_torch(torch.tensor([[1.0, 2.0, 3.0]]))
    scores, flat = run_topk(y, [0.0], [(0, 1, 3)], 3, suppress=[[0, 2]])
    assert flat[0] == [1, 0, 2] and scores[0][1] == scores[0][2] == -math.inf


def test_beam_topk_minus_inf_logits(gen):
    x = torch.randn(2, 30, generator=gen)
    x[0, :25] = -math.inf  # a row with few finite logits: its -inf candidates rank last
    logits = from_torch(x)
    scores, flat = run_topk(logits, [0.0, -2.0], [(0, 2, 10)], 10)
    check_group(scores[0], flat[0], reference_values(logits, [0.0, -2.0], 0, 2), 10)


def test_beam_topk_no_groups():
    s, i = ops.beam_topk(ip.Tensor.zeros(3, 4), ip.Tensor.zeros(3), ip.Tensor.empty(0, 3, dtype=ip.int32), 2)
    assert s.shape == (0, 2) and i.shape == (0, 2)


@pytest.mark.parametrize("bad,what", [
    (math.nan, "logits row 2 holds NaN"),
    (math.inf, "logits row 2 holds \\+inf"),
    ("row", "logits row 2 is all -inf"),
])
def test_beam_topk_rejects_bad_logits(bad, what):
    x = torch.randn(4, 9)
    if bad == "row":
        x[2] = -math.inf
        x[3] = -math.inf
    else:
        x[2, 5] = bad
        x[3, 1] = bad
    with pytest.raises(TensorOpsError, match=what):
        run_topk(from_torch(x), [0.0] * 4, [(0, 1, 2), (1, 3, 4)], 4)


def test_beam_topk_rejects_bad_arguments():
    lg = ip.Tensor.zeros(4, 6)
    bs = ip.Tensor.zeros(4)
    g = ip.tensor([[0, 2, 3]], dtype=ip.int32)

    def call(logits=lg, beam_scores=bs, groups=g, k=4, suppress=None, scores=None, out_ids=None):
        return ops.beam_topk(logits, beam_scores, groups, k, suppress, scores, out_ids)

    for groups, what in [([[3, 2, 3]], "inside logits' 4 rows"), ([[0, 0, 1]], "its rows must be at least one"),
                         ([[-1, 1, 1]], "first -1"), ([[0, 2, 5]], "k = 5 candidates: k must be in \\[1, 4\\]"),
                         ([[0, 1, 7]], "k = 7"), ([[0, 1, 0]], "k = 0")]:
        with pytest.raises(TensorOpsError, match=what):
            call(groups=ip.tensor(groups, dtype=ip.int32), k=4 if "k = 5" in what else 8)
    with pytest.raises(TensorOpsError, match="beam_scores\\[1\\] = nan"):
        call(beam_scores=ip.tensor([0.0, math.nan, 0.0, 0.0]))
    with pytest.raises(TensorOpsError, match="suppress\\[0, 1\\] = 6 is not below"):
        call(suppress=ip.tensor([[-1, 6]], dtype=ip.int32))
    with pytest.raises(TensorOpsError, match="groups has shape \\[1, 2\\]"):
        call(groups=ip.tensor([[0, 2]], dtype=ip.int32))
    with pytest.raises(TensorOpsError, match="beam_scores has shape \\[3\\]"):
        call(beam_scores=ip.Tensor.zeros(3))
    with pytest.raises(TensorOpsError, match="ids has shape \\[1, 3\\]"):
        call(out_ids=ip.Tensor.empty(1, 3, dtype=ip.int64))
    with pytest.raises(TensorOpsError, match="scores"):
        call(scores=ip.Tensor.empty(1, 4, dtype=ip.float16))
    with pytest.raises(TensorOpsError, match="logits"):
        call(logits=ip.Tensor.zeros(4, 6, dtype=ip.int32))
    with pytest.raises(TensorOpsError, match="rows need at least one token"):
        call(logits=ip.Tensor.zeros(4, 0))
    # the parameters are host values whatever the logits' device
    s, i = ip.Tensor.empty(1, 4), ip.Tensor.empty(1, 4, dtype=ip.int64)
    with pytest.raises(TensorOpsError, match="groups is on cuda:63 but must be a CPU tensor"):
        ip._lib.check(ip.lib.to_beam_topk(s._desc, i._desc, lg._desc, bs._desc, on_cuda(g), ip.ffi.NULL))
    # outputs overlapping an input
    both = ip.Tensor.empty(2, 4)
    with pytest.raises(TensorOpsError, match="overlap"):
        call(scores=both[0:1], logits=both.view(4, 2), k=4, groups=ip.tensor([[0, 2, 3]], dtype=ip.int32))
