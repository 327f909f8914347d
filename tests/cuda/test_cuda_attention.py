"""to_kv_cache_store and to_paged_attention on the GPU (csrc/cuda/attention.cu).

Oracle: per sequence, the context's keys and values gathered from the cache blocks through the
block table, then plain causal softmax(q k^T * scale) v in float64 with the GQA head mapping,
from the same (rounded) q and cache values; plus agreement with our CPU op on the same inputs.

Tolerance per output element (as tests/kernels/test_attention.py derives it for the CPU), with
u = 2^-24, L the context length, mag = sum_j w_j |v_j| and E_s = (D + 2) u |scale| max_j
sum_d |q_d k_jd|:  |err| <= (2 E_s + (2 L + 120) u) mag, plus one rounding of an f16/bf16 out.
The GPU differs from the CPU in ways inside that bound: q is pre-multiplied by scale * log2(e)
(one more rounding per q element) and the weights are exp2f of base-2 scores; split
(flash-decoding) rows add one more rescale and one more sum over segments.

The caches of bf16/f16 hold values already rounded to their dtype, so the oracle sees exactly
what the kernel reads: the cache dtype changes the inputs, not the tolerance.

Batches build their blocks in a shuffled order, pad block_tables with ids that must never be
read (-1, 10^6), and fill cache rows past each context and unused blocks with NaN, so a read of
a key the kernel must not see shows up as NaN.
"""
import math

import pytest
import torch

import inference_pio as ip
from inference_pio import ops

from helpers import FLOAT_DTYPES, TORCH_DTYPES, assert_within, from_torch, to_torch

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")

U32 = 2.0 ** -24
U_OUT = {ip.float32: 0.0, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY_OUT = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}


class Batch:
    """A paged cache and a batch of sequences seqs = [(queries, context), ...], on the host
    (ours and float64 torch) and on the GPU. block_tables has one padding column past the longest
    context, or `width` columns if that is more (as the engine's, sized for the longest context
    it allows: the decode path cuts as many segments as that could need)."""

    def __init__(self, gen, seqs, Hq, Hkv, D, bs, cache_dtype=ip.float32, q_dtype=ip.float32,
                 index_dtype=torch.int64, spare=2, scale=None, width=0):
        self.seqs, self.Hq, self.Hkv, self.D, self.bs = seqs, Hq, Hkv, D, bs
        self.scale = 1.0 / math.sqrt(D) if scale is None else scale
        per_seq = [-(-L // bs) for _, L in seqs]
        num_blocks = sum(per_seq) + spare
        max_blocks = max(max(per_seq, default=0) + 1, width)
        perm = torch.randperm(num_blocks, generator=gen)  # shuffled, non-contiguous block tables
        bt = torch.full((len(seqs), max_blocks), -1, dtype=torch.int64)
        bt[:, -1] = 10 ** 6
        ct = TORCH_DTYPES[cache_dtype]
        kc = torch.randn(num_blocks, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
        vc = torch.randn(num_blocks, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
        unused = torch.ones(num_blocks, bs, dtype=torch.bool)
        used = 0
        for s, ((n, L), nb) in enumerate(zip(seqs, per_seq)):
            bt[s, :nb] = perm[used:used + nb]
            used += nb
            pos = torch.arange(L)
            unused[bt[s, pos // bs], pos % bs] = False
        kc[unused], vc[unused] = float("nan"), float("nan")
        self.kc64, self.vc64, self.bt = kc.to(torch.float64), vc.to(torch.float64), bt
        T = sum(n for n, _ in seqs)
        q = torch.randn(T, Hq, D, generator=gen, dtype=torch.float64).to(TORCH_DTYPES[q_dtype])
        self.q64 = q.to(torch.float64)
        self.cu = torch.tensor([0] + [sum(n for n, _ in seqs[:s + 1]) for s in range(len(seqs))])
        self.ctx = torch.tensor([L for _, L in seqs], dtype=torch.int64)
        # host tensors (for the CPU op) and their GPU copies
        self.host = [from_torch(q), from_torch(kc), from_torch(vc), from_torch(self.cu.to(index_dtype)),
                     from_torch(self.ctx.to(index_dtype)), from_torch(bt.to(index_dtype))]
        self.dev = [t.to("cuda") for t in self.host]

    def run(self, q=None, out=None):
        """The GPU op (q and out: GPU tensors or None), its result brought back to the host."""
        q_d, kc, vc, cu, ctx, bt = self.dev
        res = ops.paged_attention(q_d if q is None else q, kc, vc, cu, ctx, bt, self.scale, out=out)
        assert res.device != "cpu"
        return res.cpu()

    def run_cpu(self):
        q, kc, vc, cu, ctx, bt = self.host
        return ops.paged_attention(q, kc, vc, cu, ctx, bt, self.scale)

    def reference(self):
        """(ref, tol before the out rounding), float64 [T, Hq, D]."""
        T, Hq, D = self.q64.shape
        Hkv, G = self.Hkv, self.Hq // self.Hkv
        ref, tol = torch.zeros(T, Hq, D, dtype=torch.float64), torch.zeros(T, Hq, D, dtype=torch.float64)
        for s, (n, L) in enumerate(self.seqs):
            if n == 0:
                continue
            pos = torch.arange(L)
            blocks, rows = self.bt[s][pos // self.bs], pos % self.bs
            K = self.kc64[blocks, rows]  # [L, Hkv, D]; query head k * G + g reads kv head k
            V = self.vc64[blocks, rows]
            Q = self.q64[self.cu[s]:self.cu[s + 1]].reshape(n, Hkv, G, D)
            hidden = (pos[None, :] > torch.arange(L - n, L)[:, None])[:, None, None, :]  # key past the query
            scores = torch.einsum("nkgd,lkd->nkgl", Q, K) * self.scale
            w = scores.masked_fill(hidden, float("-inf")).softmax(-1)
            absdot = (torch.einsum("nkgd,lkd->nkgl", Q.abs(), K.abs()) * abs(self.scale)).masked_fill(hidden, 0)
            e_s = (D + 2) * U32 * absdot.amax(-1, keepdim=True)
            mag = torch.einsum("nkgl,lkd->nkgd", w, V.abs())
            ref[self.cu[s]:self.cu[s + 1]] = torch.einsum("nkgl,lkd->nkgd", w, V).reshape(n, Hq, D)
            tol[self.cu[s]:self.cu[s + 1]] = ((2 * e_s + (2 * L + 120) * U32) * mag).reshape(n, Hq, D)
        return ref, tol

    def check(self, out, against_cpu=True):
        """out (host) against the float64 oracle, and against our CPU op within twice the bound
        (both are within it of the oracle)."""
        ref, tol = self.reference()
        got = to_torch(out).to(torch.float64)
        assert tuple(got.shape) == tuple(ref.shape)
        tol = tol + U_OUT[out.dtype] * (ref.abs() + tol) + TINY_OUT[out.dtype]
        assert_within(got, ref, tol)
        if against_cpu:
            cpu = to_torch(self.run_cpu()).to(torch.float64)
            assert_within(got, cpu, 2 * tol)


# ====================================================================== paged_attention: decode

DECODE_LENS = [1, 17, 300, 2049]


@pytest.mark.parametrize("cache_dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (8, 4), (8, 2), (16, 2)], ids=["g1", "g2", "g4", "g8"])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_batch(gen, cache_dtype, Hq, Hkv, D):
    """One query per sequence, contexts of 1, 17, 300, 2049 keys (several split segments for the
    long ones), every GQA ratio, every cache dtype."""
    b = Batch(gen, [(1, L) for L in DECODE_LENS], Hq, Hkv, D, 16, cache_dtype=cache_dtype)
    b.check(b.run())


@pytest.mark.parametrize("L", [1, 33, 128, 129, 1000, 4097])
def test_decode_single_sequence(gen, L):
    """Batch of one: the context split into as many segments as fill the GPU (merged by the last
    segment to finish)."""
    b = Batch(gen, [(1, L)], 32, 8, 128, 16, cache_dtype=ip.bfloat16, q_dtype=ip.bfloat16)
    b.check(b.run())


@pytest.mark.parametrize("nq", [2, 3, 4])
def test_decode_few_queries(gen, nq):
    """Short multi-query steps (speculative / tiny chunks) are split too: the earlier queries see
    fewer keys, so the last segment may hold none of theirs (m = -inf partials)."""
    b = Batch(gen, [(nq, 700), (nq, nq), (nq, 129)], 8, 2, 64, 16, cache_dtype=ip.float16)
    b.check(b.run())


def test_decode_large_batch(gen):
    """Many sequences: no split (one block per sequence and kv head already fills the GPU)."""
    lens = [int(x) for x in torch.randint(1, 400, (300,), generator=gen)]
    b = Batch(gen, [(1, L) for L in lens], 8, 2, 128, 16, cache_dtype=ip.bfloat16, q_dtype=ip.bfloat16)
    b.check(b.run(), against_cpu=False)


# ======================================================== paged_attention: the decode path
# A batch with no more query rows than sequences (T <= S: decode steps) takes decode_kernel: a block
# per (sequence, kv head, key segment) holding the whole GQA group. The host picks, from shapes
# alone (the H200 has 132 multiprocessors, 3 blocks each for G <= 4): S * Hkv <= 198 -> the context
# is cut into segments, and the last segment of each (sequence, kv head) to finish merges them, in
# the same launch ("split"); else S > 64 -> one segment, still merged that way ("many"); else every
# block writes its own rows after checking the whole batch ("direct"). Merging launches count
# arrivals in counters that each launch must leave at zero: the tests that run one twice in a row,
# or replay a graph, would see a counter left over. The cases below reach all three modes; each is
# checked against the float64 oracle and against our CPU op.

DECODE_S = {1: 2, 3: 4, 32: 8}  # S -> Hkv: split, split, direct


def decode_lens(gen, S):
    """Contexts of very different lengths: short ones, the 32-key segment edges, long ones cut into
    many segments longer than the shortest."""
    if S == 1:
        return [int(torch.randint(3000, 5001, (1,), generator=gen))]
    if S == 3:
        return [1, 700, 5000]
    lens = [int(x) for x in torch.randint(1, 400, (S,), generator=gen)]
    lens[:6] = [1, 31, 32, 33, 2113, 4999]
    return lens


@pytest.mark.parametrize("S", sorted(DECODE_S))
@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_path(gen, S, G, D):
    """One query per sequence, every GQA ratio and both common head sizes; block size, cache dtype
    and q dtype vary with the case (every combination of them appears across the cases)."""
    i = sorted(DECODE_S).index(S) + [1, 2, 4, 8].index(G) + D // 64
    bs = (1, 16, 32)[i % 3]
    cache_dtype, q_dtype = FLOAT_DTYPES[(i // 3) % 3], FLOAT_DTYPES[(i + 1) % 3]
    Hkv = DECODE_S[S]
    b = Batch(gen, [(1, L) for L in decode_lens(gen, S)], Hkv * G, Hkv, D, bs,
              cache_dtype=cache_dtype, q_dtype=q_dtype)
    out = b.run()
    assert out.dtype == q_dtype
    b.check(out)


@pytest.mark.parametrize("L", [1, 31, 32, 33, 127, 128, 129, 512, 513, 8191])
def test_decode_segment_edges(gen, L):
    """Batch of one (on the H200: a cluster of 16 segments of at least 32 keys per kv head):
    contexts at the edges of a segment, of a 128-key run of table lookups, and of the shortest
    segments covering it all (512 = 16 * 32: one more key makes every segment 64 long, and the
    table entries the blocks load before they know the length are the wrong ones)."""
    b = Batch(gen, [(1, L)], 16, 8, 128, 16, cache_dtype=ip.bfloat16, q_dtype=ip.bfloat16)
    b.check(b.run())


@pytest.mark.parametrize("Hq,Hkv,D", [(32, 2, 128), (9, 3, 64), (4, 4, 64)], ids=["g16", "g3", "g1"])
def test_decode_path_several_queries(gen, Hq, Hkv, D):
    """T <= S does not mean one query each: sequences without queries and some with several (the
    rows of a block are then done in passes, each query seeing its own causal prefix); G = 16 needs
    two passes per query."""
    seqs = [(0, 10), (3, 200), (0, 7), (1, 1), (0, 0), (2, 3000), (0, 64)]
    b = Batch(gen, seqs, Hq, Hkv, D, 16, cache_dtype=ip.bfloat16)
    b.check(b.run())


@pytest.mark.parametrize("D", [8, 36, 40, 80, 96, 256])
@pytest.mark.parametrize("cache_dtype", [ip.float32, ip.bfloat16], ids=NAMES.get)
def test_decode_path_head_sizes(gen, D, cache_dtype):
    """Head sizes padded inside 64/128/256, rows that are no whole 16-byte pieces (36 bf16: loaded
    element by element), and 256 (two 16-byte pieces per lane for f32)."""
    b = Batch(gen, [(1, 50), (1, 700), (1, 3)], 8, 2, D, 16, cache_dtype=cache_dtype)
    b.check(b.run())


@pytest.mark.parametrize("kind", ["q_head_slice", "q_transposed", "out_strided", "out_f32"])
def test_decode_path_layouts(gen, kind):
    """As test_layouts, on the decode path."""
    b = Batch(gen, [(1, 9), (1, 300), (1, 30)], 8, 2, 64, 16, q_dtype=ip.bfloat16)
    T, Hq, D = b.q64.shape
    q_host, q, out = b.host[0], None, None
    if kind == "q_head_slice":
        qkv = ip.Tensor.zeros(T, 2 * Hq, D, dtype=ip.bfloat16)
        qkv[:, :Hq, :] = q_host
        q = qkv.to("cuda")[:, :Hq, :]
    elif kind == "q_transposed":
        q = q_host.to("cuda").transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "out_strided":
        out = ip.Tensor.zeros(T, Hq, 2 * D, dtype=ip.bfloat16, device="cuda")[:, :, ::2]
    else:
        out = ip.Tensor.zeros(T, Hq, D, dtype=ip.float32, device="cuda")
    got = b.run(q=q, out=out)
    b.check(got, against_cpu=kind != "out_f32")


def test_decode_path_deterministic(gen):
    """Same bits twice: segments merged in order (whichever block is the last to finish), groups
    combined in order."""
    for seqs, Hkv in (([(1, 3000)], 4), ([(1, L) for L in range(100, 4100, 100)], 8)):
        b = Batch(gen, seqs, 4 * Hkv, Hkv, 128, 16, cache_dtype=ip.bfloat16)
        assert torch.equal(to_torch(b.run()), to_torch(b.run()))


@pytest.mark.parametrize("mode,S,Hkv", [("single", 1, 4), ("split", 3, 2), ("direct", 40, 8), ("many", 70, 4),
                                         ("late", 1000, 1)])
@pytest.mark.parametrize("field,message", [
    ("block", "block_tables holds a block outside"),
    ("short", "context_lens is less than its queries"),
    ("long", "context_lens needs more blocks than block_tables has"),
    ("cu", "cu_seqlens_q is not non-decreasing from 0 to T"),
])
def test_decode_path_bad_batch_writes_nothing(gen, mode, S, Hkv, field, message):
    """Bad metadata on the decode path: reported as before (the lowest bad sequence, at the next
    synchronisation), and not one row of out written, in each of the three modes, and in the
    merging one where most segments finish before the checking block ("late": they check the
    batch themselves); "single" is a cluster whose segments check their own table entries (the bad
    one in the second segment), the verdict taken as they merge; the GPU works on."""
    length = (lambda s: 1 + (7 * s) % 40) if mode == "late" else (lambda s: 50 + 7 * s)
    b = Batch(gen, [(1, length(s)) for s in range(S)], 2 * Hkv, Hkv, 64, 16)
    q, kc, vc = b.dev[:3]
    cu, ctx, bt = b.cu.clone(), b.ctx.clone(), b.bt.clone()
    bad = S // 2
    if field == "block" and S == 1:
        bt[0, 3] = kc.shape[0]  # keys 48 and 49: the second 32-key segment's
    elif field == "block":
        bt[bad, 1] = kc.shape[0]
        bt[S - 1, 0] = -1  # a later bad sequence: not the one named
    elif field == "short":
        ctx[bad] = 0
        ctx[S - 1] = 0
    elif field == "long":
        ctx[bad] = bt.shape[1] * b.bs + 1
    else:
        cu[bad + 1] = cu[bad] - 1
    out = from_torch(torch.full(tuple(b.q64.shape), 7.0), "cuda")
    ops.paged_attention(q, kc, vc, from_torch(cu, "cuda"), from_torch(ctx, "cuda"), from_torch(bt, "cuda"),
                        b.scale, out=out)
    with pytest.raises(ip.BoundsError, match=f"to_paged_attention: sequence {bad}: {message}"):
        out.cpu()
    assert torch.equal(to_torch(out), torch.full(tuple(b.q64.shape), 7.0))
    b.check(b.run(), against_cpu=False)
    # and twice in a row (the bad launch left its counters at zero too)
    b.check(b.run(), against_cpu=False)


def test_decode_path_in_cuda_graph(gen):
    """Recorded once in a CUDA graph, replayed with other context lengths and block tables of the
    same shapes (as the engine does with a table as wide as the longest context it allows): what
    the host decided from shapes holds for any values, and the workspace stays the graph's."""
    from inference_pio.graph import CudaGraph

    S, Hq, Hkv, D, bs, width = 3, 16, 8, 128, 16, 320
    nb = S * width
    kc = torch.randn(nb, bs, Hkv, D, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    vc = torch.randn(nb, bs, Hkv, D, generator=gen, dtype=torch.float64).to(torch.bfloat16)
    q = torch.randn(S, Hq, D, generator=gen, dtype=torch.float64).float()
    cu = torch.arange(S + 1, dtype=torch.int32)
    host = [from_torch(t) for t in (q, kc, vc, cu)]
    dev = [t.to("cuda") for t in host]
    ctx_d = from_torch(torch.ones(S, dtype=torch.int32), "cuda")
    bt_d = from_torch(torch.zeros(S, width, dtype=torch.int32), "cuda")

    # two launches in the graph, back to back: the second starts from the counters the first left
    graph = CudaGraph.capture(lambda: (ops.paged_attention(*dev, ctx_d, bt_d, 1 / math.sqrt(D)),
                                       ops.paged_attention(*dev, ctx_d, bt_d, 1 / math.sqrt(D))))
    for lens in ([5, 300, 1], [5000, 2, 700], [33, 1056, 1057], [1, 1, 1], [140, 141, 139]):
        ctx = torch.tensor(lens, dtype=torch.int32)
        bt = torch.randperm(nb, generator=gen)[:S * width].reshape(S, width).to(torch.int32)
        ctx_d.copy_(from_torch(ctx))
        bt_d.copy_(from_torch(bt))
        first, second = (to_torch(t.cpu()) for t in graph.replay())
        want = to_torch(ops.paged_attention(*host, from_torch(ctx), from_torch(bt), 1 / math.sqrt(D))).double()
        assert_within(first.double(), want, 1e-5 + 1e-5 * want.abs())
        assert torch.equal(first, second)


# The merging modes, each with a batch that lands there on the H200: "split" is Qwen3-0.6B's decode
# step (batch 1, Hq 16, Hkv 8, D 128, bf16, a context of ~140: clusters of 16 segments, 5 of them
# used, merged in shared memory); "split3" merges the segments of three sequences through memory;
# "many" has one segment per sequence and a checking block; "late" has so many sequences with
# short contexts that the checking block is still busy when most segments finish, so they check
# the batch themselves.
MERGE_MODES = {
    "split": dict(seqs=[(1, 141)], Hq=16, Hkv=8, D=128, width=256),
    "split3": dict(seqs=[(1, 140), (1, 3000), (1, 7)], Hq=16, Hkv=8, D=128),
    "many": dict(seqs=[(1, 20 + 13 * s) for s in range(70)], Hq=8, Hkv=4, D=64),
    "late": dict(seqs=[(1, 1 + (7 * s) % 40) for s in range(1000)], Hq=2, Hkv=1, D=64),
}


def fill(t, value):
    """Every element of the GPU tensor t set to value (through a host copy)."""
    t.copy_(from_torch(torch.full(tuple(t.shape), value, dtype=TORCH_DTYPES[t.dtype])))


@pytest.mark.parametrize("mode", sorted(MERGE_MODES))
def test_decode_merge_repeats_bits(gen, mode):
    """The same merging decode three times in a row (launches queued back to back, each into an
    out filled with NaN), then recorded in a graph and replayed 3 times (out refilled with NaN
    before each), then once more eagerly: the same bits every time, and right. Counters left
    nonzero by one launch would leave the next one's rows unmerged (NaN) or merged too early."""
    from inference_pio.graph import CudaGraph

    m = MERGE_MODES[mode]
    b = Batch(gen, m["seqs"], m["Hq"], m["Hkv"], m["D"], 16, cache_dtype=ip.bfloat16, q_dtype=ip.bfloat16,
              width=m.get("width", 0))
    q, kc, vc, cu, ctx, bt = b.dev
    shape = tuple(b.q64.shape)
    outs = [ip.Tensor.zeros(*shape, dtype=ip.bfloat16, device="cuda") for _ in range(3)]
    for out in outs:
        fill(out, float("nan"))
    for out in outs:  # no synchronisation in between
        ops.paged_attention(q, kc, vc, cu, ctx, bt, b.scale, out=out)
    first = to_torch(outs[0].cpu())
    for out in outs[1:]:
        assert torch.equal(to_torch(out.cpu()), first)
    b.check(outs[0], against_cpu=mode != "late")

    graph_out = outs[1]
    graph = CudaGraph.capture(lambda: ops.paged_attention(q, kc, vc, cu, ctx, bt, b.scale, out=graph_out))
    for _ in range(3):
        fill(graph_out, float("nan"))
        graph.replay()
        assert torch.equal(to_torch(graph_out.cpu()), first)
    # and an eager launch after the replays
    fill(outs[2], float("nan"))
    ops.paged_attention(q, kc, vc, cu, ctx, bt, b.scale, out=outs[2])
    assert torch.equal(to_torch(outs[2].cpu()), first)


def test_decode_merge_counters_grow_while_recording(gen):
    """A graph whose merging launch needs more arrival counters than any launch before it in this
    process (600 sequences x 16 kv heads = 9600 pairs; the first array holds 4096): they are made
    while the graph is recorded, zeroed at once (not by a node of the graph), and every replay,
    and an eager launch after, gives the same, right bits."""
    from inference_pio.graph import CudaGraph

    lens = [int(x) for x in torch.randint(1, 31, (600,), generator=gen)]
    b = Batch(gen, [(1, L) for L in lens], 16, 16, 16, 32)
    q, kc, vc, cu, ctx, bt = b.dev
    out = ip.Tensor.zeros(*tuple(b.q64.shape), dtype=ip.float32, device="cuda")
    graph = CudaGraph.capture(lambda: ops.paged_attention(q, kc, vc, cu, ctx, bt, b.scale, out=out))
    results = []
    for _ in range(3):
        fill(out, float("nan"))
        graph.replay()
        results.append(to_torch(out.cpu()))
    b.check(out)
    eager = b.run()
    for r in results:
        assert torch.equal(r, to_torch(eager))


# ===================================================================== paged_attention: prefill

@pytest.mark.parametrize("cache_dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("bs", [16, 32])
def test_prefill_batch(gen, cache_dtype, bs):
    """Several sequences of many queries: whole prompts and chunked prefill (the queries the last
    part of a longer context), an empty sequence in the middle, tiles spanning sequences' ends."""
    seqs = [(70, 70), (40, 100), (0, 5), (5, 64), (129, 300), (33, 33)]
    b = Batch(gen, seqs, 8, 2, 128, bs, cache_dtype=cache_dtype)
    b.check(b.run())


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (8, 2), (16, 2), (64, 1)], ids=["g1", "g2", "g4", "g8", "g64"])
@pytest.mark.parametrize("D", [64, 128, 80, 96, 40, 36, 256])
def test_heads(gen, Hq, Hkv, D):
    """GQA ratios (MQA with 64 heads: rows of one group over several tiles); head sizes of the
    fast path, padded ones (80, 96, 40 inside a 128 or 64 tile), one without 16-byte rows for a
    bf16 cache (36: the element-by-element loads) and 256."""
    b = Batch(gen, [(1, 50), (6, 6), (3, 90), (0, 0), (20, 45)], Hq, Hkv, D, 16, cache_dtype=ip.bfloat16)
    b.check(b.run())


@pytest.mark.parametrize("cache_dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("q_dtype", FLOAT_DTYPES, ids=NAMES.get)
def test_dtypes_mixed_batch(gen, cache_dtype, q_dtype):
    """Decode, prefill and chunked prefill in one call, every q (= out) and cache dtype."""
    b = Batch(gen, [(1, 1), (1, 37), (20, 20), (0, 5), (13, 50), (1, 640), (33, 33)], 8, 2, 64, 16,
              cache_dtype=cache_dtype, q_dtype=q_dtype)
    out = b.run()
    assert out.dtype == q_dtype
    b.check(out)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_index_dtypes_and_scales(gen, index_dtype):
    for scale in [1.0, 0.03, -0.2, 0.0]:
        b = Batch(gen, [(3, 10), (1, 400), (40, 40)], 4, 2, 64, 16, index_dtype=index_dtype, scale=scale)
        b.check(b.run())


@pytest.mark.parametrize("kind", ["q_head_slice", "q_transposed", "out_strided", "out_f32"])
def test_layouts(gen, kind):
    """q as a view (the q heads of a fused qkv projection, a transposed last dimension), a strided
    out, out of another dtype than q."""
    b = Batch(gen, [(4, 9), (1, 300), (30, 30)], 8, 2, 64, 16, q_dtype=ip.bfloat16)
    T, Hq, D = b.q64.shape
    q_host, out = b.host[0], None
    if kind == "q_head_slice":
        qkv = ip.Tensor.zeros(T, 2 * Hq, D, dtype=ip.bfloat16)
        qkv[:, :Hq, :] = q_host
        q = qkv.to("cuda")[:, :Hq, :]
    elif kind == "q_transposed":
        q = q_host.to("cuda").transpose(1, 2).contiguous().transpose(1, 2)
    else:
        q = None
    if kind == "out_strided":
        out = ip.Tensor.zeros(T, Hq, 2 * D, dtype=ip.bfloat16, device="cuda")[:, :, ::2]
    elif kind == "out_f32":
        out = ip.Tensor.zeros(T, Hq, D, dtype=ip.float32, device="cuda")
    if q is not None:
        assert not q.is_contiguous()
    got = b.run(q=q, out=out)
    b.check(got, against_cpu=kind != "out_f32")


def test_empty(gen):
    """No queries at all, and sequences without queries: nothing written, no error."""
    b = Batch(gen, [(0, 5), (0, 0)], 4, 2, 64, 16)
    assert b.run().shape == (0, 4, 64)
    b = Batch(gen, [(0, 40), (2, 3), (0, 0)], 4, 2, 64, 16)
    b.check(b.run())


def test_deterministic(gen):
    """The same call twice gives the same bits (segments merged in order, no atomics)."""
    b = Batch(gen, [(1, 3000), (50, 200), (2, 900)], 16, 4, 128, 16, cache_dtype=ip.bfloat16)
    assert torch.equal(to_torch(b.run()), to_torch(b.run()))


# ============================================================================== kv_cache_store

@pytest.mark.parametrize("cache_dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("kv_dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_store(gen, cache_dtype, kv_dtype, index_dtype):
    """Every (k/v, cache) dtype pair: the written slots hold torch's rounding (nearest even),
    padding tokens (-1) write nothing, every other byte unchanged; and the CPU op agrees bit for
    bit."""
    nb, bs, Hkv, D, T = 6, 16, 2, 64, 11
    ct, kt = TORCH_DTYPES[cache_dtype], TORCH_DTYPES[kv_dtype]
    kc0 = torch.randn(nb, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
    vc0 = torch.randn(nb, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
    k = (torch.randn(T, Hkv, D, generator=gen, dtype=torch.float64) * 3).to(kt)
    v = (torch.randn(T, Hkv, D, generator=gen, dtype=torch.float64) * 3).to(kt)
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    slots[[2, 7]] = -1
    kc, vc = from_torch(kc0).to("cuda"), from_torch(vc0).to("cuda")
    sm = from_torch(slots.to(index_dtype))
    ops.kv_cache_store(kc, vc, from_torch(k).to("cuda"), from_torch(v).to("cuda"), sm.to("cuda"))
    want_k, want_v = kc0.clone().view(-1, Hkv, D), vc0.clone().view(-1, Hkv, D)
    keep = slots >= 0
    want_k[slots[keep]] = k[keep].to(ct)
    want_v[slots[keep]] = v[keep].to(ct)
    assert torch.equal(to_torch(kc.cpu()).view(-1, Hkv, D), want_k)
    assert torch.equal(to_torch(vc.cpu()).view(-1, Hkv, D), want_v)
    # the CPU op on the same inputs
    kc_h, vc_h = from_torch(kc0), from_torch(vc0)
    ops.kv_cache_store(kc_h, vc_h, from_torch(k), from_torch(v), sm)
    assert torch.equal(to_torch(kc_h), to_torch(kc.cpu()))
    assert torch.equal(to_torch(vc_h), to_torch(vc.cpu()))


def test_store_strided_inputs(gen):
    """k and v as views (a fused qkv projection's slices, transposed last dimensions)."""
    nb, bs, Hkv, D, T = 4, 32, 2, 96, 9
    kc = ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.bfloat16, device="cuda")
    vc = ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.bfloat16, device="cuda")
    kv = torch.randn(T, 3 * Hkv, D, generator=gen)
    fused = from_torch(kv).to("cuda")
    k = fused[:, Hkv:2 * Hkv, :]
    v = fused[:, 2 * Hkv:, :].transpose(1, 2).contiguous().transpose(1, 2)
    slots = torch.tensor([5, -1, 0, 127, 64, 33, -1, 1, 100])
    ops.kv_cache_store(kc, vc, k, v, from_torch(slots).to("cuda"))
    got_k, got_v = to_torch(kc.cpu()).view(-1, Hkv, D), to_torch(vc.cpu()).view(-1, Hkv, D)
    keep = slots >= 0
    assert torch.equal(got_k[slots[keep]], kv[keep, Hkv:2 * Hkv].to(torch.bfloat16))
    assert torch.equal(got_v[slots[keep]], kv[keep, 2 * Hkv:].to(torch.bfloat16))
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert not got_k[untouched].any() and not got_v[untouched].any()


def test_store_then_attend(gen):
    """A prefill written with kv_cache_store, then a decode step: the engine's sequence of calls,
    all on the GPU, against the oracle on the gathered cache."""
    Hq, Hkv, D, bs, L = 8, 2, 128, 16, 77
    nb = 8
    kc = ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.float16, device="cuda")
    vc = ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.float16, device="cuda")
    blocks = torch.randperm(nb, generator=gen)[:-(-L // bs)]
    pos = torch.arange(L)
    slots = blocks[pos // bs] * bs + pos % bs
    k = torch.randn(L, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(L, Hkv, D, generator=gen, dtype=torch.float64)
    ops.kv_cache_store(kc, vc, from_torch(k.float()).to("cuda"), from_torch(v.float()).to("cuda"),
                       from_torch(slots).to("cuda"))
    q = torch.randn(1, Hq, D, generator=gen, dtype=torch.float64).float()
    bt = blocks[None, :]
    out = ops.paged_attention(from_torch(q).to("cuda"), kc, vc, from_torch(torch.tensor([0, 1])).to("cuda"),
                              from_torch(torch.tensor([L])).to("cuda"), from_torch(bt).to("cuda"),
                              1 / math.sqrt(D)).cpu()
    K = k.half().double().repeat_interleave(Hq // Hkv, 1)
    V = v.half().double().repeat_interleave(Hq // Hkv, 1)
    w = (torch.einsum("hd,lhd->hl", q.double()[0], K) / math.sqrt(D)).softmax(-1)
    ref = torch.einsum("hl,lhd->hd", w, V)[None]
    assert_within(to_torch(out).double(), ref, torch.full_like(ref, 1e-5) + 1e-5 * ref.abs())
