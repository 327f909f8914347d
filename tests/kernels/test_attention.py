"""to_kv_cache_store and to_paged_attention: the paged KV cache.

kv_cache_store only moves data: the written slots must hold exactly torch's rounding of k and v
to the cache dtype (round to nearest even, the same from every source dtype since f32 holds f16
and bf16 exactly), and every other byte of the caches must be unchanged.

paged_attention is checked against a float64 oracle: per sequence, the context's keys and values
gathered from the blocks, then plain causal softmax(q k^T * scale) v with the GQA head mapping,
from the same (rounded) q and cache values. Per output element the kernel's error is bounded,
with u = 2^-24, L the context length, mag = sum_j w_j |v_j| (w the exact softmax weights) and
E_s = (D + 2) u |scale| max_j sum_d |q_d k_jd| (over the keys the row sees) the score error bound
(an f32 dot product of D terms, the rounding of q * scale and of scale itself):
  - the weights: a score error shifts w_j by a relative 2 E_s at most (its own and the max's);
    exp(s - m) adds u |s - m| for the rounding of s - m (<= 88u where the weight is not ~0) and
    a few u for exp itself (expf, or the AVX2 polynomial at ~2 ulp); the sum of the weights
    adds L u; so the weights' part is (2 E_s + (L + 100) u) mag;
  - sum_j p_j v_j in f32: L u mag; the rescales by exp(m_old - m_new) and the final 1 / l: a
    few u each (covered by the slack in 120);
so |err| <= (2 E_s + (2 L + 120) u) mag, plus for an f16/bf16 out one rounding: 2^-11 / 2^-8 of
|ref| (and half the f16 subnormal spacing). That is a worst-case bound (measured errors are a few
hundred times smaller) yet a missed or extra key (a weight of ~1/L) lies far outside it.

Every numeric test runs on the best SIMD path and the forced scalar path (`simd` fixture).
"""
import math

import pytest
import torch

import inference_pio as ip
from inference_pio import ops, runtime
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, TORCH_DTYPES, assert_within, from_torch, to_torch

U32 = 2.0 ** -24
U_OUT = {ip.float32: 0.0, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY_OUT = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16", ip.int32: "i32", ip.int64: "i64"}


def null(t):
    return ip.ffi.NULL if t is None else t._desc


def with_device(t, device, index=63):
    """A copy of t's descriptor claiming another device (the data pointer is never used)."""
    d = ip.ffi.new("to_tensor *")
    d[0] = t._desc[0]
    d.device, d.device_index = device, index
    return d


def bits(t):
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


class Batch:
    """A paged cache and a batch of S sequences, seqs = [(queries, context), ...]: blocks handed
    out in a random order, block_tables padded with ids that must never be read (-1, 10^6), cache
    rows past each context and unused blocks filled with NaN (a read of one shows up as NaN)."""

    def __init__(self, gen, seqs, Hq, Hkv, D, bs, cache_dtype=ip.float32, q_dtype=ip.float32,
                 index_dtype=torch.int64, spare=2, scale=None):
        self.seqs, self.Hq, self.Hkv, self.D, self.bs = seqs, Hq, Hkv, D, bs
        self.scale = 1.0 / math.sqrt(D) if scale is None else scale
        per_seq = [-(-L // bs) for _, L in seqs]
        num_blocks = sum(per_seq) + spare
        max_blocks = max(per_seq, default=0) + 1
        perm = torch.randperm(num_blocks, generator=gen)
        bt = torch.full((len(seqs), max_blocks), -1, dtype=torch.int64)
        bt[:, -1] = 10 ** 6
        ct = TORCH_DTYPES[cache_dtype]
        kc = torch.randn(num_blocks, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
        vc = torch.randn(num_blocks, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
        unused = torch.ones(num_blocks, bs, dtype=torch.bool)
        used = 0
        for s, ((n, L), nb) in enumerate(zip(seqs, per_seq)):
            assert 0 <= n <= L
            bt[s, :nb] = perm[used:used + nb]
            used += nb
            for p in range(L):
                unused[bt[s, p // bs], p % bs] = False
        kc[unused], vc[unused] = float("nan"), float("nan")
        self.kc64, self.vc64 = kc.to(torch.float64), vc.to(torch.float64)
        self.bt = bt
        T = sum(n for n, _ in seqs)
        q = torch.randn(T, Hq, D, generator=gen, dtype=torch.float64).to(TORCH_DTYPES[q_dtype])
        self.q64 = q.to(torch.float64)
        self.cu = torch.tensor([0] + [sum(n for n, _ in seqs[:s + 1]) for s in range(len(seqs))])
        self.ctx = torch.tensor([L for _, L in seqs], dtype=torch.int64)
        self.q, self.k_cache, self.v_cache = from_torch(q), from_torch(kc), from_torch(vc)
        self.cu_t = from_torch(self.cu.to(index_dtype))
        self.ctx_t = from_torch(self.ctx.to(index_dtype))
        self.bt_t = from_torch(bt.to(index_dtype))

    def run(self, q=None, out=None):
        return ops.paged_attention(self.q if q is None else q, self.k_cache, self.v_cache, self.cu_t, self.ctx_t,
                                   self.bt_t, self.scale, out=out)

    def reference(self):
        """(ref, tol before the out rounding), float64 [T, Hq, D]."""
        T, Hq, D = self.q64.shape
        G = self.Hq // self.Hkv
        ref, tol = torch.zeros(T, Hq, D, dtype=torch.float64), torch.zeros(T, Hq, D, dtype=torch.float64)
        for s, (n, L) in enumerate(self.seqs):
            if n == 0:
                continue
            pos = torch.arange(L)
            blocks, rows = self.bt[s][pos // self.bs], pos % self.bs
            K = self.kc64[blocks, rows].repeat_interleave(G, 1)  # [L, Hq, D]
            V = self.vc64[blocks, rows].repeat_interleave(G, 1)
            Q = self.q64[self.cu[s]:self.cu[s + 1]]  # [n, Hq, D]
            hidden = pos[None, :] > torch.arange(L - n, L)[:, None]  # [n, L]: key past the query
            scores = torch.einsum("nhd,lhd->nhl", Q, K) * self.scale
            w = scores.masked_fill(hidden[:, None, :], float("-inf")).softmax(-1)
            absdot = (torch.einsum("nhd,lhd->nhl", Q.abs(), K.abs()) * abs(self.scale)).masked_fill(hidden[:, None, :], 0)
            e_s = (D + 2) * U32 * absdot.amax(-1, keepdim=True)
            mag = torch.einsum("nhl,lhd->nhd", w, V.abs())
            ref[self.cu[s]:self.cu[s + 1]] = torch.einsum("nhl,lhd->nhd", w, V)
            tol[self.cu[s]:self.cu[s + 1]] = (2 * e_s + (2 * L + 120) * U32) * mag
        return ref, tol

    def check(self, out):
        ref, tol = self.reference()
        got = to_torch(out).to(torch.float64)
        assert tuple(got.shape) == tuple(ref.shape)
        tol = tol + U_OUT[out.dtype] * (ref.abs() + tol) + TINY_OUT[out.dtype]
        assert_within(got, ref, tol)


# ===================================================================== paged_attention: numbers

# (queries, context): decode, prefill, chunked prefill, an empty sequence in the middle
MIXED = [(1, 1), (1, 37), (20, 20), (0, 5), (13, 50), (1, 64), (33, 33)]


@pytest.mark.parametrize("cache_dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("q_dtype", FLOAT_DTYPES, ids=NAMES.get)
def test_attention_mixed_batch(simd, gen, cache_dtype, q_dtype):
    """Sequences of every kind in one call, every cache and q dtype (out has q's dtype)."""
    b = Batch(gen, MIXED, 8, 2, 40, 4, cache_dtype=cache_dtype, q_dtype=q_dtype)
    out = b.run()
    assert out.dtype == q_dtype and out.shape == (b.q.shape)
    b.check(out)


@pytest.mark.parametrize("D", [8, 36, 40, 64, 128])
@pytest.mark.parametrize("bs", [1, 4, 16])
def test_attention_heads(simd, gen, D, bs):
    """MHA, GQA ratios 2 and 4, MQA; head sizes with and without an 8-lane tail; block sizes."""
    for Hq, Hkv in [(3, 3), (4, 2), (8, 2), (4, 1)]:
        b = Batch(gen, [(1, 9), (6, 6), (3, 19), (0, 0)], Hq, Hkv, D, bs, cache_dtype=ip.bfloat16)
        b.check(b.run())


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_attention_decode(simd, gen, index_dtype):
    """Decode batches: one query per sequence, contexts from 1 to a few tiles; and a long one with
    Llama-like heads (threaded)."""
    b = Batch(gen, [(1, L) for L in [1, 2, 31, 32, 33, 100, 7]], 8, 4, 64, 16, cache_dtype=ip.float16,
              index_dtype=index_dtype)
    b.check(b.run())
    b = Batch(gen, [(1, 300), (1, 257)], 16, 8, 128, 16, cache_dtype=ip.bfloat16, q_dtype=ip.bfloat16,
              index_dtype=index_dtype)
    b.check(b.run())


@pytest.mark.parametrize("cache_dtype", FLOAT_DTYPES, ids=NAMES.get)
def test_attention_prefill(simd, gen, cache_dtype):
    """Prefill (queries == context) and chunked prefill (context > queries), long enough to span
    several key tiles and several query chunks per sequence."""
    b = Batch(gen, [(70, 70)], 4, 2, 64, 16, cache_dtype=cache_dtype)
    b.check(b.run())
    b = Batch(gen, [(40, 100), (5, 64), (65, 97)], 8, 8, 48, 4, cache_dtype=cache_dtype)
    b.check(b.run())


def test_attention_scale(simd, gen):
    """Other scales, a negative one included (the max runs over the scaled scores)."""
    for scale in [1.0, 0.03, -0.2, 0.0]:
        b = Batch(gen, [(3, 10), (1, 40)], 4, 2, 16, 4, scale=scale)
        b.check(b.run())


@pytest.mark.parametrize("kind", ["q_head_slice", "q_transposed", "q_sliced", "out_strided", "out_f32",
                                  "index_strided"])
def test_attention_layouts(simd, gen, kind):
    """q as a view (the q heads of a fused qkv projection, a transposed or every-other-element
    last dimension), a strided out, out of another dtype than q, strided index tensors."""
    T, Hq, D = 12, 4, 24
    b = Batch(gen, [(4, 9), (8, 8)], Hq, 2, D, 4, q_dtype=ip.bfloat16)
    q, out = b.q, None
    if kind == "q_head_slice":
        qkv = ip.Tensor.zeros(T, 2 * Hq, D, dtype=ip.bfloat16)
        qkv[:, :Hq, :] = b.q
        q = qkv[:, :Hq, :]
    elif kind == "q_transposed":
        q = b.q.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "q_sliced":
        wide = ip.Tensor.zeros(T, Hq, 2 * D, dtype=ip.bfloat16)
        q = wide[..., 1::2]
        q.copy_(b.q)
    elif kind == "out_strided":
        out = ip.Tensor.full((T, D, Hq), float("nan"), dtype=ip.bfloat16).transpose(1, 2)
    elif kind == "out_f32":
        out = ip.Tensor.full((T, Hq, D), float("nan"), dtype=ip.float32)
    elif kind == "index_strided":
        for name in ("cu_t", "ctx_t"):
            t = getattr(b, name)
            wide = ip.Tensor.zeros(2 * t.shape[0], dtype=t.dtype)
            wide[::2].copy_(t)
            setattr(b, name, wide[::2])
        b.bt_t = b.bt_t.transpose(0, 1).contiguous().transpose(0, 1)
    res = b.run(q=q, out=out)
    assert out is None or res is out
    b.check(res)


def test_attention_empty(simd, gen):
    """T = 0 (no sequences, or sequences without queries), and empty heads."""
    b = Batch(gen, [(0, 3), (0, 0)], 4, 2, 8, 4)
    assert b.run().shape == (0, 4, 8)
    b = Batch(gen, [], 4, 2, 8, 4)
    assert b.run().shape == (0, 4, 8)
    kc = ip.Tensor.zeros(2, 4, 0, 8)
    cu, ctx = from_torch(torch.tensor([0, 2])), from_torch(torch.tensor([5]))
    bt = from_torch(torch.tensor([[0, 1]]))
    out = ops.paged_attention(ip.Tensor.zeros(2, 0, 8), kc, kc.clone(), cu, ctx, bt, 1.0)
    assert out.shape == (2, 0, 8)


def test_attention_threads(gen):
    """The same bits with 1, 2 and 3 threads (the work split changes with the thread count)."""
    b = Batch(gen, [(1, 200), (50, 80), (1, 33), (17, 17)], 8, 2, 64, 16, cache_dtype=ip.bfloat16)
    before = runtime.num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            runtime.set_num_threads(n)
            results.append(bits(to_torch(b.run())))
    finally:
        runtime.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    b.check(b.run())


def test_attention_reads_only_its_blocks(simd, gen):
    """Rows past each context and unused blocks hold NaN in every Batch; here also the rows of
    other sequences' blocks that come later in the cache: the output is finite."""
    b = Batch(gen, [(2, 5), (1, 3)], 2, 1, 16, 8)
    out = to_torch(b.run())
    assert torch.isfinite(out).all()
    b.check(b.run())


# ========================================================================== kv_cache_store

def cache_pair(gen, num_blocks, bs, Hkv, D, dtype):
    ct = TORCH_DTYPES[dtype]
    kc = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(ct)
    vc = torch.randn(num_blocks, bs, Hkv, D, generator=gen).to(ct)
    return kc, vc, from_torch(kc), from_torch(vc)


@pytest.mark.parametrize("cache_dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("kv_dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_store(simd, gen, cache_dtype, kv_dtype, index_dtype):
    """Exactly the mapped slots change, to k/v rounded to the cache dtype; negative slots skip."""
    nb, bs, Hkv, D, T = 6, 4, 3, 20, 9
    kc, vc, k_cache, v_cache = cache_pair(gen, nb, bs, Hkv, D, cache_dtype)
    k = torch.randn(T, Hkv, D, generator=gen).to(TORCH_DTYPES[kv_dtype])
    v = torch.randn(T, Hkv, D, generator=gen).to(TORCH_DTYPES[kv_dtype])
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    slots[[2, 5]] = torch.tensor([-1, -7])
    ops.kv_cache_store(k_cache, v_cache, from_torch(k), from_torch(v), from_torch(slots.to(index_dtype)))
    ek, ev = kc.clone().view(nb * bs, Hkv, D), vc.clone().view(nb * bs, Hkv, D)
    keep = slots >= 0
    ek[slots[keep]] = k[keep].to(kc.dtype)
    ev[slots[keep]] = v[keep].to(vc.dtype)
    assert torch.equal(bits(to_torch(k_cache)), bits(ek.view(kc.shape)))
    assert torch.equal(bits(to_torch(v_cache)), bits(ev.view(vc.shape)))


def test_store_layouts(simd, gen):
    """k and v as strided views (k transposed in its last two dims, v every other element); a
    threaded size; T = 0; all slots negative."""
    nb, bs, Hkv, D, T = 40, 16, 2, 64, 500
    kc, vc, k_cache, v_cache = cache_pair(gen, nb, bs, Hkv, D, ip.bfloat16)
    k = torch.randn(T, Hkv, D, generator=gen)
    v = torch.randn(T, Hkv, D, generator=gen)
    kt = from_torch(k).transpose(1, 2).contiguous().transpose(1, 2)
    wide = ip.Tensor.zeros(T, Hkv, 2 * D)
    vt = wide[..., ::2]
    vt.copy_(from_torch(v))
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    ops.kv_cache_store(k_cache, v_cache, kt, vt, from_torch(slots))
    ek, ev = kc.clone().view(nb * bs, Hkv, D), vc.clone().view(nb * bs, Hkv, D)
    ek[slots], ev[slots] = k.to(torch.bfloat16), v.to(torch.bfloat16)
    assert torch.equal(bits(to_torch(k_cache)), bits(ek.view(kc.shape)))
    assert torch.equal(bits(to_torch(v_cache)), bits(ev.view(vc.shape)))
    before = bits(to_torch(k_cache))
    ops.kv_cache_store(k_cache, v_cache, ip.Tensor.zeros(0, Hkv, D), ip.Tensor.zeros(0, Hkv, D),
                       ip.Tensor.zeros(0, dtype=ip.int64))
    ops.kv_cache_store(k_cache, v_cache, kt[:3], vt[:3], from_torch(torch.tensor([-1, -2, -3])))
    assert torch.equal(bits(to_torch(k_cache)), before)


def test_store_then_attend(simd, gen):
    """The serving loop: prefill two sequences into the cache, decode one more token each, attend;
    matches the oracle on the same values."""
    nb, bs, Hq, Hkv, D = 12, 4, 4, 2, 32
    k_cache, v_cache = ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.bfloat16), ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.bfloat16)
    bt = torch.tensor([[7, 2, 9, 0], [4, 11, 1, 5]])
    lens = [10, 6]
    allk = [torch.randn(L + 1, Hkv, D, generator=gen) for L in lens]
    allv = [torch.randn(L + 1, Hkv, D, generator=gen) for L in lens]

    def slots_of(s, positions):
        return [int(bt[s, p // bs]) * bs + p % bs for p in positions]

    # prefill
    k = torch.cat([allk[s][:L] for s, L in enumerate(lens)])
    v = torch.cat([allv[s][:L] for s, L in enumerate(lens)])
    slots = torch.tensor(slots_of(0, range(10)) + slots_of(1, range(6)))
    ops.kv_cache_store(k_cache, v_cache, from_torch(k), from_torch(v), from_torch(slots))
    # decode step: one token each, plus a padding token
    k = torch.stack([allk[0][10], allk[1][6], torch.zeros(Hkv, D)])
    v = torch.stack([allv[0][10], allv[1][6], torch.zeros(Hkv, D)])
    slots = torch.tensor(slots_of(0, [10]) + slots_of(1, [6]) + [-1])
    ops.kv_cache_store(k_cache, v_cache, from_torch(k), from_torch(v), from_torch(slots))

    q = torch.randn(2, Hq, D, generator=gen)
    out = ops.paged_attention(from_torch(q), k_cache, v_cache, from_torch(torch.tensor([0, 1, 2])),
                              from_torch(torch.tensor([11, 7])), from_torch(bt), 0.125)
    G = Hq // Hkv
    for s in range(2):
        K = allk[s].to(torch.bfloat16).double().repeat_interleave(G, 1)
        V = allv[s].to(torch.bfloat16).double().repeat_interleave(G, 1)
        w = (torch.einsum("hd,lhd->hl", q[s].double(), K) * 0.125).softmax(-1)
        ref = torch.einsum("hl,lhd->hd", w, V)
        assert torch.allclose(to_torch(out)[s].double(), ref, rtol=1e-5, atol=1e-5)


# ================================================================================== errors

def c_store(kc, vc, k, v, slots):
    check(ip.lib.to_kv_cache_store(null(kc), null(vc), null(k), null(v), null(slots)))


def c_attn(out, q, kc, vc, cu, ctx, bt, scale=1.0):
    check(ip.lib.to_paged_attention(null(out), null(q), null(kc), null(vc), null(cu), null(ctx), null(bt), scale))


def i64(*values):
    return from_torch(torch.tensor(values, dtype=torch.int64))


def test_store_errors():
    nb, bs, Hkv, D, T = 4, 2, 2, 8, 3
    kc, vc = ip.Tensor.zeros(nb, bs, Hkv, D), ip.Tensor.zeros(nb, bs, Hkv, D)
    k, v = ip.Tensor.zeros(T, Hkv, D), ip.Tensor.zeros(T, Hkv, D)
    slots = i64(0, 5, -1)
    args = [kc, vc, k, v, slots]
    for i, name in enumerate(["k_cache", "v_cache", "k", "v", "slot_mapping"]):
        with pytest.raises(ip.InvalidArgumentError, match=f"to_kv_cache_store: {name} is NULL"):
            c_store(*args[:i], None, *args[i + 1:])

    def fails(exc, pattern, kc=kc, vc=vc, k=k, v=v, slots=slots):
        with pytest.raises(exc, match=pattern):
            c_store(kc, vc, k, v, slots)

    fails(ip.DTypeError, "to_kv_cache_store: k_cache has dtype int32, expected one of: float32, float16, bfloat16",
          kc=ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.int32))
    fails(ip.DTypeError, "to_kv_cache_store: v_cache has dtype uint8", vc=ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.uint8))
    fails(ip.DTypeError, "to_kv_cache_store: k has dtype int64", k=ip.Tensor.zeros(T, Hkv, D, dtype=ip.int64))
    fails(ip.DTypeError, "to_kv_cache_store: v has dtype int8", v=ip.Tensor.zeros(T, Hkv, D, dtype=ip.int8))
    fails(ip.DTypeError, "to_kv_cache_store: slot_mapping has dtype float32, expected one of: int32, int64",
          slots=ip.Tensor.zeros(T))
    fails(ip.DTypeError, "to_kv_cache_store: k_cache has dtype float32 but v_cache has dtype bfloat16",
          vc=ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.bfloat16))
    fails(ip.ShapeError, r"to_kv_cache_store: k_cache \[num_blocks, block_size, Hkv, D\] must have 4 dimensions, got 3",
          kc=ip.Tensor.zeros(nb * bs, Hkv, D))
    fails(ip.ShapeError, r"to_kv_cache_store: k_cache has shape \[4, 2, 2, 8\] but v_cache has shape \[4, 2, 2, 6\]",
          vc=ip.Tensor.zeros(nb, bs, Hkv, 6))
    fails(ip.InvalidArgumentError, "to_kv_cache_store: k_cache must be contiguous",
          kc=ip.Tensor.zeros(nb, bs, D, Hkv).transpose(2, 3))
    fails(ip.InvalidArgumentError, "to_kv_cache_store: v_cache must be contiguous",
          vc=ip.Tensor.zeros(nb, bs, Hkv, 2 * D)[..., ::2])
    fails(ip.ShapeError, "to_kv_cache_store: the caches have block_size 0", kc=ip.Tensor.zeros(nb, 0, Hkv, D),
          vc=ip.Tensor.zeros(nb, 0, Hkv, D))
    fails(ip.ShapeError, r"to_kv_cache_store: k \[T, Hkv, D\] must have 3 dimensions, got 2",
          k=ip.Tensor.zeros(T, Hkv * D), v=ip.Tensor.zeros(T, Hkv * D))
    fails(ip.ShapeError, r"to_kv_cache_store: k has shape \[3, 2, 8\] but v has shape \[2, 2, 8\]",
          v=ip.Tensor.zeros(2, Hkv, D))
    fails(ip.ShapeError, r"to_kv_cache_store: k has rows of \[1, 8\] but the caches hold \[Hkv, D\] = \[2, 8\]",
          k=ip.Tensor.zeros(T, 1, D), v=ip.Tensor.zeros(T, 1, D))
    fails(ip.ShapeError, r"to_kv_cache_store: slot_mapping \[T\] must have 1 dimensions, got 2",
          slots=ip.Tensor.zeros(T, 1, dtype=ip.int64))
    fails(ip.ShapeError, "to_kv_cache_store: slot_mapping has 2 entries but k has T = 3 tokens", slots=i64(0, 1))
    fails(ip.BoundsError, "to_kv_cache_store: k needs 192 bytes",
          k=ip.Tensor(ip.Tensor.zeros(T).storage, (T, Hkv, D), (Hkv * D, D, 1), ip.float32))

    # slot values; nothing is written when one is bad
    kv = ip.Tensor.full((T, Hkv, D), 1.0)
    for bad, exc, pattern in [
            ((0, 8, 1), ip.BoundsError, r"to_kv_cache_store: slot_mapping\[1\] = 8 is not below num_blocks \* "
                                        r"block_size = 8"),
            ((0, 1, 2 ** 40), ip.BoundsError, r"slot_mapping\[2\] = 1099511627776 is not below"),
            ((5, 3, 5), ip.InvalidArgumentError, r"to_kv_cache_store: slot_mapping\[0\] and slot_mapping\[2\] are "
                                                 r"both slot 5 \(slots must be distinct\)"),
            ((-1, 4, 4), ip.InvalidArgumentError, r"slot_mapping\[1\] and slot_mapping\[2\] are both slot 4")]:
        with pytest.raises(exc, match=pattern):
            ops.kv_cache_store(kc, vc, kv, kv, i64(*bad))
        assert not to_torch(kc).any() and not to_torch(vc).any()
    ops.kv_cache_store(kc, vc, kv, kv, i64(-1, 4, -1))  # repeated negatives are fine

    # aliasing: the caches are written
    buf = ip.Tensor.zeros(nb * bs * Hkv * D + T * Hkv * D)
    kc_view = buf[:nb * bs * Hkv * D].view(nb, bs, Hkv, D)
    fails(ip.InvalidArgumentError, "to_kv_cache_store: k_cache overlaps v_cache in memory", vc=kc)
    fails(ip.InvalidArgumentError, "to_kv_cache_store: k_cache overlaps k in memory",
          kc=kc_view, k=buf[-T * Hkv * D - 8:-8].view(T, Hkv, D))
    fails(ip.InvalidArgumentError, "to_kv_cache_store: v_cache overlaps v in memory",
          vc=kc_view, v=buf[8:8 + T * Hkv * D].view(T, Hkv, D))
    fails(ip.InvalidArgumentError, "to_kv_cache_store: k_cache overlaps slot_mapping in memory",
          slots=ip.Tensor(kc.storage, (T,), (1,), ip.int64))

    cuda = ip.lib.TO_CUDA
    with pytest.raises(ip.DeviceError, match="to_kv_cache_store: tensors are on different devices"):
        check(ip.lib.to_kv_cache_store(kc._desc, vc._desc, k._desc, v._desc, with_device(slots, cuda)))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_kv_cache_store(*(with_device(t, cuda) for t in (kc, vc, k, v, slots))))


def test_attention_errors():
    nb, bs, Hkv, D, Hq, T = 4, 2, 2, 8, 4, 3
    kc, vc = ip.Tensor.zeros(nb, bs, Hkv, D), ip.Tensor.zeros(nb, bs, Hkv, D)
    q, out = ip.Tensor.zeros(T, Hq, D), ip.Tensor.zeros(T, Hq, D)
    cu, ctx, bt = i64(0, 2, 3), i64(3, 1), from_torch(torch.tensor([[1, 2], [0, -1]]))
    c_attn(out, q, kc, vc, cu, ctx, bt)  # valid
    args = [out, q, kc, vc, cu, ctx, bt]
    names = ["out", "q", "k_cache", "v_cache", "cu_seqlens_q", "context_lens", "block_tables"]
    for i, name in enumerate(names):
        with pytest.raises(ip.InvalidArgumentError, match=f"to_paged_attention: {name} is NULL"):
            c_attn(*args[:i], None, *args[i + 1:])

    def fails(exc, pattern, out=out, q=q, kc=kc, vc=vc, cu=cu, ctx=ctx, bt=bt, scale=1.0):
        with pytest.raises(exc, match=pattern):
            c_attn(out, q, kc, vc, cu, ctx, bt, scale)

    A = "to_paged_attention: "
    fails(ip.DTypeError, A + "out has dtype int32, expected one of: float32, float16, bfloat16",
          out=ip.Tensor.zeros(T, Hq, D, dtype=ip.int32))
    fails(ip.DTypeError, A + "q has dtype int8", q=ip.Tensor.zeros(T, Hq, D, dtype=ip.int8))
    fails(ip.DTypeError, A + "k_cache has dtype int64", kc=ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.int64))
    fails(ip.DTypeError, A + "k_cache has dtype float32 but v_cache has dtype float16",
          vc=ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.float16))
    fails(ip.DTypeError, A + "cu_seqlens_q has dtype float32, expected one of: int32, int64", cu=ip.Tensor.zeros(3))
    fails(ip.DTypeError, A + "context_lens has dtype bfloat16", ctx=ip.Tensor.zeros(2, dtype=ip.bfloat16))
    fails(ip.DTypeError, A + "block_tables has dtype uint8", bt=ip.Tensor.zeros(2, 2, dtype=ip.uint8))
    fails(ip.ShapeError, r"to_paged_attention: q \[T, Hq, D\] must have 3 dimensions, got 2",
          q=ip.Tensor.zeros(T, Hq * D), out=ip.Tensor.zeros(T, Hq * D))
    fails(ip.ShapeError, r"to_paged_attention: out has shape \[3, 4, 6\] but q has shape \[3, 4, 8\]",
          out=ip.Tensor.zeros(T, Hq, 6))
    fails(ip.ShapeError, r"to_paged_attention: v_cache \[num_blocks, block_size, Hkv, D\] must have 4 dimensions",
          vc=ip.Tensor.zeros(nb * bs, Hkv, D))
    fails(ip.InvalidArgumentError, A + "k_cache must be contiguous", kc=ip.Tensor.zeros(bs, nb, Hkv, D).transpose(0, 1))
    fails(ip.ShapeError, r"to_paged_attention: cu_seqlens_q \[S \+ 1\] must have 1 dimensions, got 2",
          cu=ip.Tensor.zeros(3, 1, dtype=ip.int64))
    fails(ip.ShapeError, r"to_paged_attention: context_lens \[S\] must have 1 dimensions, got 0",
          ctx=ip.Tensor.zeros(dtype=ip.int64))
    fails(ip.ShapeError, r"to_paged_attention: block_tables \[S, max_blocks\] must have 2 dimensions, got 1",
          bt=i64(1, 2))
    fails(ip.ShapeError, A + "q has head size D = 4 but the caches have D = 8",
          q=ip.Tensor.zeros(T, Hq, 4), out=ip.Tensor.zeros(T, Hq, 4))
    fails(ip.ShapeError, A + "q has Hq = 3 heads, not a multiple of the caches' Hkv = 2",
          q=ip.Tensor.zeros(T, 3, D), out=ip.Tensor.zeros(T, 3, D))
    fails(ip.ShapeError, A + "q has Hq = 4 heads, not a multiple of the caches' Hkv = 0",
          kc=ip.Tensor.zeros(nb, bs, 0, D), vc=ip.Tensor.zeros(nb, bs, 0, D))
    fails(ip.ShapeError, r"to_paged_attention: cu_seqlens_q has 2 entries, expected S \+ 1 = 3 \(context_lens has "
          r"S = 2\)", cu=i64(0, 3))
    fails(ip.ShapeError, A + "block_tables has 1 rows but context_lens has S = 2 sequences", bt=i64(0, 1).view(1, 2))
    for s in [float("nan"), float("inf")]:
        fails(ip.InvalidArgumentError, A + "scale must be finite", scale=s)
    fails(ip.BoundsError, A + "q needs 384 bytes", q=ip.Tensor(ip.Tensor.zeros(T).storage, (T, Hq, D), (Hq * D, D, 1),
                                                                ip.float32))

    # index values
    fails(ip.InvalidArgumentError, r"to_paged_attention: cu_seqlens_q\[0\] = 1, expected 0", cu=i64(1, 2, 3))
    fails(ip.InvalidArgumentError, r"to_paged_attention: cu_seqlens_q\[2\] = 1 is less than cu_seqlens_q\[1\] = 2 "
          r"\(it must be non-decreasing\)", cu=i64(0, 2, 1))
    fails(ip.BoundsError, r"to_paged_attention: cu_seqlens_q\[1\] = 9 is past T = 3", cu=i64(0, 9, 3))
    fails(ip.InvalidArgumentError, r"to_paged_attention: cu_seqlens_q\[2\] = 2, expected T = 3", cu=i64(0, 1, 2))
    fails(ip.InvalidArgumentError, r"to_paged_attention: context_lens\[1\] = 0 is less than the 1 queries of "
          r"sequence 1", ctx=i64(3, 0))
    fails(ip.InvalidArgumentError, r"context_lens\[0\] = -1 is less than the 0 queries of sequence 0",
          cu=i64(0, 0, 3), ctx=i64(-1, 3), bt=i64(0, 1, 2, 3).view(2, 2))
    fails(ip.BoundsError, r"to_paged_attention: context_lens\[0\] = 5 needs 3 blocks of 2 but block_tables has 2 "
          r"per sequence", ctx=i64(5, 1))
    fails(ip.BoundsError, r"to_paged_attention: block_tables\[0, 1\] = 4 is outside \[0, 4\) \(num_blocks",
          bt=i64(1, 4, 0, 0).view(2, 2))
    fails(ip.BoundsError, r"to_paged_attention: block_tables\[1, 0\] = -1 is outside \[0, 4\)",
          bt=i64(1, 2, -1, 0).view(2, 2))

    # aliasing: out is written
    fails(ip.InvalidArgumentError, A + "out overlaps q in memory, which this op does not allow", out=q)
    cache_like = ip.Tensor(kc.storage, (T, Hq, D), (Hq * D, D, 1), ip.float32)
    fails(ip.InvalidArgumentError, A + "out overlaps k_cache in memory", out=cache_like)
    fails(ip.InvalidArgumentError, A + "out overlaps v_cache in memory", out=ip.Tensor(vc.storage, (T, Hq, D),
                                                                                       (Hq * D, D, 1), ip.float32))
    fails(ip.InvalidArgumentError, A + "out overlaps block_tables in memory",
          out=ip.Tensor(bt.storage, (1, 1, 1), (1, 1, 1), ip.float32), q=ip.Tensor.zeros(1, 1, 1),
          kc=ip.Tensor.zeros(1, 1, 1, 1), vc=ip.Tensor.zeros(1, 1, 1, 1))
    fails(ip.InvalidArgumentError, A + "out is written but some of its elements share memory",
          out=ip.Tensor.zeros(Hq, D).expand(T, Hq, D))

    cuda = ip.lib.TO_CUDA
    with pytest.raises(ip.DeviceError, match=A + "tensors are on different devices"):
        check(ip.lib.to_paged_attention(out._desc, q._desc, kc._desc, with_device(vc, cuda), cu._desc, ctx._desc,
                                        bt._desc, 1.0))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_paged_attention(*(with_device(t, cuda) for t in args), 1.0))


# ============================================================= paged_attention: split decode

# Sequences of up to 4 queries are split by keys into segments (64 keys doubled until at most
# 16 segments) that are merged at the end; longer ones are chunked by queries.
SPLIT_SEQS = [(1, 63), (1, 64), (1, 65), (1, 150), (2, 129), (3, 300), (4, 4), (4, 1100), (5, 200)]


@pytest.mark.parametrize("cache_dtype", FLOAT_DTYPES, ids=NAMES.get)
def test_attention_split_segments(simd, gen, cache_dtype):
    """Contexts around the segment boundaries, 1 to 4 queries (split) and 5 (chunked)."""
    b = Batch(gen, SPLIT_SEQS, 4, 2, 48, 16, cache_dtype=cache_dtype)
    b.check(b.run())


def test_attention_long_decode(simd, gen):
    """One decode query over 4096 keys (16 segments of 256), the model's shapes."""
    b = Batch(gen, [(1, 4096)], 16, 8, 128, 16, cache_dtype=ip.bfloat16)
    b.check(b.run())


def test_attention_decode_batch(simd, gen):
    """32 decode sequences of assorted lengths in one call."""
    lens = torch.randint(1, 600, (32,), generator=gen).tolist()
    b = Batch(gen, [(1, L) for L in lens], 16, 8, 128, 16, cache_dtype=ip.bfloat16)
    b.check(b.run())


@pytest.mark.parametrize("D", [8, 24, 40, 136])
def test_attention_bf16_head_sizes(simd, gen, D):
    """Head sizes around the AVX2 bf16 path's groups of 16 (and 8, and leftovers)."""
    b = Batch(gen, [(1, 70), (6, 40)], 4, 2, D, 16, cache_dtype=ip.bfloat16)
    b.check(b.run())


def test_attention_split_threads_and_batch(gen):
    """Split rows give the same bits with 1, 2 and 3 threads, and alone or in a batch."""
    seqs = [(1, 1000), (2, 300), (1, 70), (30, 30)]
    b = Batch(gen, seqs, 8, 4, 64, 16, cache_dtype=ip.bfloat16)
    before = runtime.num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            runtime.set_num_threads(n)
            results.append(bits(to_torch(b.run())))
    finally:
        runtime.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    # the first sequence alone: the same cache rows, q rows and block table row
    one = ops.paged_attention(from_torch(to_torch(b.q)[:1].clone()), b.k_cache, b.v_cache,
                              from_torch(torch.tensor([0, 1])), from_torch(b.ctx[:1].clone()),
                              from_torch(b.bt[:1].clone()), b.scale)
    assert torch.equal(bits(to_torch(one))[0], results[0][0])
    b.check(b.run())
