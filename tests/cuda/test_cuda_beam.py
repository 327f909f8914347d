"""to_kv_copy_blocks and to_beam_topk on a GPU (csrc/cuda/kv_copy.cu, csrc/cuda/beam.cu) against
the CPU and torch indexing.

The block copy moves bytes: bit for bit, through each word width the kernel picks (16-byte, 4-byte
and byte copies, by the caches' alignment and block size) and across several launches (more than
64 caches or 256 pairs). The beam step computes the CPU's values except that CUDA's expf / log
may round differently in the last bit, so scores agree to a few ulps and the candidates exactly
wherever no two are that close (exact ties, built to be bitwise equal, must come in the same
order). The engine's beam search on a GPU is checked against transformers by
tests/engine/test_beam_search.py (its `device` fixture)."""
import math
import re

import pytest
import torch

import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import TensorOpsError

from helpers import FLOAT_DTYPES, TORCH_DTYPES, from_torch, to_torch

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")

DT_IDS = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}


def ids(values, dtype=ip.int32):
    return ip.tensor(list(values), dtype=dtype) if values else ip.Tensor.empty(0, dtype=dtype)


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("shape", [(13, 16, 2, 64), (9, 3, 1, 1), (7, 1, 1, 2)],
                         ids=["16-byte-words", "odd-bytes", "small-blocks"])
def test_kv_copy_blocks_on_gpu(dtype, shape, gen):
    ref = [torch.randn(*shape, generator=gen).to(TORCH_DTYPES[dtype]) for _ in range(4)]
    caches = [from_torch(r, "cuda") for r in ref]
    n = shape[0]
    src, dst = [n - 1, n - 1, 0], [2, 4, n - 2]
    ops.kv_copy_blocks(caches, ids(src), ids(dst, ip.int64))
    for c, r in zip(caches, ref):
        r[dst] = r[src].clone()
        assert torch.equal(bits(to_torch(c)), bits(r))


def test_kv_copy_blocks_several_launches(gen):
    # 70 caches (64 per launch) and 300 pairs (256 per launch)
    ref = [torch.randn(600, 2, 1, 8, generator=gen).to(torch.bfloat16) for _ in range(70)]
    caches = [from_torch(r, "cuda") for r in ref]
    perm = torch.randperm(600, generator=gen).tolist()
    src, dst = perm[:300], perm[300:]
    ops.kv_copy_blocks(caches, ids(src), ids(dst))
    for c, r in zip(caches, ref):
        r[dst] = r[src].clone()
        assert torch.equal(bits(to_torch(c)), bits(r))


def test_kv_copy_blocks_gpu_errors(gen):
    ref = [torch.randn(5, 4, 2, 8, generator=gen) for _ in range(2)]
    caches = [from_torch(r, "cuda") for r in ref]
    with pytest.raises(TensorOpsError, match=re.escape("block 3 is both a src and a dst")):
        ops.kv_copy_blocks(caches, ids([0, 3]), ids([3, 4]))
    with pytest.raises(TensorOpsError, match="src is on cuda:0 but the block ids must be a CPU tensor"):
        ops.kv_copy_blocks(caches, ids([0]).cuda(), ids([1]))
    with pytest.raises(TensorOpsError, match="another device"):
        ops.kv_copy_blocks([caches[0], from_torch(ref[1])], ids([0]), ids([1]))
    for c, r in zip(caches, ref):  # nothing written
        assert torch.equal(to_torch(c), r)


def topk_on(device, x, beam_scores, groups, K, suppress=None):
    g = ip.tensor([list(v) for v in groups], dtype=ip.int32)
    sup = None
    if suppress is not None:
        width = max(len(s) for s in suppress)
        sup = ip.tensor([list(s) + [-1] * (width - len(s)) for s in suppress], dtype=ip.int32)
    s, i = ops.beam_topk(from_torch(x, device), ip.tensor(beam_scores, dtype=ip.float32), g, K, sup)
    return s.tolist(), i.tolist()


def assert_like_cpu(x, beam_scores, groups, K, suppress=None):
    gs, gi = topk_on("cuda", x, beam_scores, groups, K, suppress)
    # the CPU's k + 1 best show how close the k-th is to the next
    V = x.shape[1]
    wider = [(f, r, min(k + 1, r * V)) for f, r, k in groups]
    cs, ci = topk_on("cpu", x, beam_scores, wider, K + 1, suppress)
    for g, (first, rows, k) in enumerate(groups):
        assert gi[g][k:] == [-1] * (K - k) and all(v == -math.inf for v in gs[g][k:])
        finite = [abs(v) for v in cs[g][:k] if math.isfinite(v)]
        tol = 8 * 2.0 ** -23 * max([1.0] + finite)
        for j in range(k):  # the same values, best first
            a, b = gs[g][j], cs[g][j]
            assert a == b or abs(a - b) <= tol, (g, j, a, b)
        # the same candidates in the same places, except where two are closer than the rounding
        # (equal logits of one row stay exact ties on both sides: one row's m and ln s are shared)
        n = wider[g][2]

        def close(j):
            gap, same_row = cs[g][j] - cs[g][j + 1], ci[g][j] // V == ci[g][j + 1] // V
            return gap <= 2 * tol and not (gap == 0 and same_row)

        loose = {i for j in range(n - 1) if close(j) for i in (j, j + 1)}
        for j in range(k):
            if j not in loose:
                assert gi[g][j] == ci[g][j], (g, j)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
def test_beam_topk_like_cpu(dtype, gen):
    R, V = 11, 3001
    x = (torch.randn(R, V, generator=gen) * 3).to(TORCH_DTYPES[dtype])
    beam_scores = (torch.rand(R, generator=gen) * -20).tolist()
    assert_like_cpu(x, beam_scores, [(0, 1, 2), (1, 4, 8), (6, 5, 15), (5, 1, 1)], 16)


def test_beam_topk_qwen_vocabulary_like_cpu(gen):
    x = torch.randn(16, 151936, generator=gen) * 4
    beam_scores = (torch.rand(16, generator=gen) * -5).tolist()
    assert_like_cpu(x, beam_scores, [(0, 8, 16), (8, 8, 24)], 24)


def test_beam_topk_many_groups_and_rows(gen):
    # more groups than one launch carries (32), and rows past 256 in all
    x = torch.randn(300, 64, generator=gen)
    beam_scores = (torch.rand(300, generator=gen) * -3).tolist()
    groups = [(10 * g, 10, 20) for g in range(30)] + [(0, 256, 1024)] + [(290, 3, 5)] * 5
    assert_like_cpu(x, beam_scores, groups, 1024)


def test_beam_topk_ties_suppress_and_small_rows_on_gpu(gen):
    V = 40
    row = torch.linspace(-3, 3, V)
    row[7] = row[31] = row[19] = 5.0  # equal values, bit for bit: ordered by b * V + t
    row[2] = row[30] = 4.0
    x = torch.stack([row, row])
    scores, flat = topk_on("cuda", x, [-1.25, -1.25], [(0, 2, 8)], 8)
    assert flat[0] == [7, 19, 31, V + 7, V + 19, V + 31, 2, 30]
    assert scores[0][0] == scores[0][5] and scores[0][5] > scores[0][6]
    y = torch.randn(3, 50, generator=gen)
    y[:, 11] = 20.0
    assert_like_cpu(y, [0.0, -0.5, -1.0], [(0, 2, 4), (2, 1, 3)], 4, suppress=[[11, -1], [-1, -1]])
    z = torch.randn(4, 5, generator=gen)
    assert_like_cpu(z, [0.0, -1.5, -0.25, -3.0], [(0, 3, 12), (3, 1, 5), (1, 2, 3)], 16)


@pytest.mark.parametrize("bad,what", [(math.nan, "holds NaN"), (math.inf, "holds \\+inf"), ("row", "is all -inf")])
def test_beam_topk_bad_logits_raised_at_sync(bad, what):
    x = torch.randn(4, 9)
    if bad == "row":
        x[2] = -math.inf
    else:
        x[2, 5] = bad
    s, i = ops.beam_topk(from_torch(x, "cuda"), ip.Tensor.zeros(4), ip.tensor([[0, 4, 4]], dtype=ip.int32), 4)
    with pytest.raises(TensorOpsError, match="to_beam_topk: logits row 2 " + what):
        s.tolist()
    # the error is reported once; the next call works
    s, i = ops.beam_topk(from_torch(torch.randn(4, 9), "cuda"), ip.Tensor.zeros(4),
                         ip.tensor([[0, 4, 4]], dtype=ip.int32), 4)
    assert len(i.tolist()[0]) == 4


def test_beam_topk_gpu_limits():
    x = from_torch(torch.randn(300, 8), "cuda")
    with pytest.raises(TensorOpsError, match="at most 256 rows"):
        ops.beam_topk(x, ip.Tensor.zeros(300), ip.tensor([[0, 257, 4]], dtype=ip.int32), 4)
    with pytest.raises(TensorOpsError, match="k <= 1024"):
        ops.beam_topk(x, ip.Tensor.zeros(300), ip.tensor([[0, 200, 1025]], dtype=ip.int32), 1025)
    with pytest.raises(TensorOpsError, match="beam_scores is on cuda:0 but must be a CPU tensor"):
        ops.beam_topk(x, ip.Tensor.zeros(300).cuda(), ip.tensor([[0, 2, 4]], dtype=ip.int32), 4)
