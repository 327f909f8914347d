"""to_rope_kv_attention: an attention layer's rotation of q and k (optionally after the per-head
RMSNorm), the cache write of k and v, and paged attention of the rotated q heads, in one call.

qk is only read: the op rotates its heads into a temporary of qk's dtype, stores that's k heads
and v, and attends with its q heads.

Oracles:
  - the two ops it is defined as, to_rope_kv_store into a fresh tensor of qk's dtype (not in
    place), then to_paged_attention of that tensor's first Hq heads (both proven against float64
    in test_rope.py, test_rope_kv_store.py and test_attention.py), on fresh copies of the same
    inputs: out and both caches whole must be their bits exactly, and qk (the whole stacked qkv
    buffer) must be unchanged, bit for bit;
  - for f32, a float64 reference of the whole layer: y = x (or x / sqrt(mean(x^2) + eps) * w),
    rotated from the same float32 angles as test_rope.py's oracle, the new keys and values put at
    their positions in a float64 copy of the cache, then causal softmax(q k^T * scale) v.
Tolerance against the float64 reference (u = 2^-24):
  - the rotated heads: 6u mag without the norm, 10u mag with it (test_rope.py's bounds; mag the
    sum of the rotation's term magnitudes); call that E per element: E_q for q's heads, E_k for
    the new keys (0 for keys already cached, which are read exactly). The new keys are checked
    in the (f32) k cache against that bound, the values stored exactly;
  - out: test_attention.py's bound (2 E_s + (2 L + 120) u) mag over the values the kernel reads,
    with the score error E_s grown by what the inputs' errors can move a score,
    |scale| sum_d (E_q |k| + |q| E_k + E_q E_k), the largest over the keys a row sees.
A missed, extra or misplaced key moves out by about |v| / L, far outside that.

The inputs are the engine's: positions[t] = p, the token's position, and slot_mapping[t] the slot
block_tables gives p (the op's precondition); blocks handed out shuffled, block_tables padded with
ids that must never be read (-1, 10^6), cache rows no sequence owns holding NaN (a stray read shows
in out), the others random.

Every numeric test runs on the best SIMD path and the forced scalar path (`simd` fixture).
"""
import pytest
import torch

import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import check

from helpers import (FLOAT_DTYPES, TORCH_DTYPES, assert_bits_equal, assert_within, bits, from_torch, hf_inv_freq,
                     on_cuda, paged_attention_ref, rope_ref, to_torch)

U32 = 2.0 ** -24
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}
NORMS = [None, "row", "heads"]  # no norm (to_rope), a weight [D], a weight per head [H, D]
OTHER = {ip.float32: ip.bfloat16, ip.float16: ip.float32, ip.bfloat16: ip.float16}


class Case:
    """One call's inputs, seqs = [(queries, context), ...] sharing a paged cache; `fresh` gives new
    copies of what the op writes. layout "stacked": qk and v head slices of one [T, Hq + 2 Hkv, D]
    buffer, as Attention holds them; "apart": tensors of their own."""

    def __init__(self, gen, seqs, Hq, Hkv, D, R=None, bs=4, dtype=ip.float32, cache_dtype=None, norm=None,
                 w_dtype=ip.float32, interleaved=False, scaling=1.0, layout="stacked", index_dtype=torch.int64,
                 eps=1e-6, spare=2):
        self.seqs, self.Hq, self.Hkv, self.D, self.bs, self.layout = seqs, Hq, Hkv, D, bs, layout
        self.R, self.interleaved, self.scaling, self.eps = R or D, interleaved, scaling, eps
        self.scale, self.dtype = D ** -0.5, dtype
        H, T = Hq + Hkv, sum(n for n, _ in seqs)
        self.T = T
        per_seq = [-(-L // bs) for _, L in seqs]
        self.num_blocks = nb = sum(per_seq) + spare
        perm = torch.randperm(nb, generator=gen)
        bt = torch.full((len(seqs), max(per_seq, default=0) + 1), -1, dtype=torch.int64)
        bt[:, -1] = 10 ** 6
        owned = torch.zeros(nb, bs, dtype=torch.bool)
        pos, used = [torch.zeros(0, dtype=torch.int64)], 0
        for s, ((n, L), k) in enumerate(zip(seqs, per_seq)):
            assert 0 <= n <= L
            bt[s, :k] = perm[used:used + k]
            used += k
            p = torch.arange(L)
            owned[bt[s, p // bs], p % bs] = True
            pos.append(torch.arange(L - n, L))
        self.spare_blocks = perm[used:]
        self.pos = torch.cat(pos)
        seq_of = torch.cat([torch.zeros(0, dtype=torch.int64)] + [torch.full((n,), s) for s, (n, _) in enumerate(seqs)])
        self.slots = bt[seq_of, self.pos // bs] * bs + self.pos % bs if T else torch.zeros(0, dtype=torch.int64)
        self.bt = bt
        self.cu = torch.tensor([0] + [sum(n for n, _ in seqs[:s + 1]) for s in range(len(seqs))])
        self.ctx = torch.tensor([L for _, L in seqs], dtype=torch.int64)
        ct = TORCH_DTYPES[cache_dtype or dtype]
        self.kc0 = torch.randn(nb, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
        self.vc0 = torch.randn(nb, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
        self.kc0[~owned], self.vc0[~owned] = float("nan"), float("nan")
        xt = TORCH_DTYPES[dtype]
        self.buf0 = (torch.randn(T, H + Hkv, D, generator=gen, dtype=torch.float64) * 2).to(xt)
        self.w0 = None
        if norm is not None:
            shape = (D,) if norm == "row" else (H, D)
            self.w0 = torch.randn(*shape, generator=gen, dtype=torch.float64).to(TORCH_DTYPES[w_dtype])
        self.inv0 = hf_inv_freq(self.R)
        idx = lambda x: from_torch(x.to(index_dtype))  # noqa: E731
        self.positions, self.slot_mapping = idx(self.pos), idx(self.slots)
        self.cu_t, self.ctx_t, self.bt_t = idx(self.cu), idx(self.ctx), idx(bt)
        self.inv = from_torch(self.inv0)
        self.w = from_torch(self.w0) if self.w0 is not None else None

    def fresh(self):
        """(qk, v, k_cache, v_cache, whole): new copies; `whole` the buffer compared in full after."""
        H = self.Hq + self.Hkv
        kc, vc, buf = from_torch(self.kc0), from_torch(self.vc0), from_torch(self.buf0)
        if self.layout == "stacked":
            return buf.narrow(1, 0, H), buf.narrow(1, H, self.Hkv), kc, vc, buf
        qk = from_torch(self.buf0[:, :H])
        return qk, from_torch(self.buf0[:, H:]), kc, vc, qk

    def kwargs(self):
        return dict(norm_weight=self.w, eps=self.eps, interleaved=self.interleaved, rotary_dim=self.R,
                    attention_scaling=self.scaling)

    def run(self, fused, out_dtype=None):
        """(out, k_cache, v_cache, whole) after the fused op or the two separate ops (the rotation
        into a fresh contiguous tensor of qk's dtype, then attention of its q heads)."""
        qk, v, kc, vc, whole = self.fresh()
        out = ip.Tensor.full((self.T, self.Hq, self.D), float("nan"), dtype=out_dtype or qk.dtype)
        batch = (self.cu_t, self.ctx_t, self.bt_t, self.scale)
        if fused:
            res = ops.rope_kv_attention(qk, self.positions, self.inv, v, kc, vc, self.slot_mapping, *batch,
                                        out=out, **self.kwargs())
            assert res is out
        else:
            tmp = ip.Tensor.full(qk.shape, float("nan"), dtype=qk.dtype)
            ops.rope_kv_store(qk, self.positions, self.inv, v, kc, vc, self.slot_mapping, out=tmp, **self.kwargs())
            ops.paged_attention(tmp.narrow(1, 0, self.Hq), kc, vc, *batch, out=out)
        return out, kc, vc, whole

    def check_same(self, **kw):
        """The fused op against the separate ops, bit for bit, and qk (the whole buffer it is part
        of) unchanged by it; returns the fused op's results."""
        got, want = self.run(True, **kw), self.run(False, **kw)
        for name, g, w in zip(["out", "k_cache", "v_cache"], got, want):
            assert_bits_equal(g, w, name)
        assert torch.equal(bits(got[3]), bits(from_torch(self.whole0()))), "the op wrote qk (or its buffer)"
        return got

    def whole0(self):
        """The buffer `fresh` returns as `whole`, before any call (torch)."""
        return self.buf0 if self.layout == "stacked" else self.buf0[:, :self.Hq + self.Hkv]

    def check_reference(self, results):
        """f32 results within the bounds of the module docstring of the float64 layer."""
        out, kc, vc, _ = results
        Hq, Hkv, D, H = self.Hq, self.Hkv, self.D, self.Hq + self.Hkv
        x64 = self.buf0[:, :H].to(torch.float64)
        y64 = x64
        if self.w0 is not None:
            y64 = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + self.eps) * self.w0.to(torch.float64)
        ref, mag = rope_ref(y64, self.pos, self.inv0, self.R, self.interleaved, self.scaling)
        E = (10 if self.w0 is not None else 6) * U32 * mag
        # the cache the reference attends over: the old rows, then this step's keys and values
        kc64 = self.kc0.to(torch.float64).view(-1, Hkv, D).clone()
        vc64 = self.vc0.to(torch.float64).view(-1, Hkv, D).clone()
        ek = torch.zeros_like(kc64)
        kc64[self.slots], ek[self.slots] = ref[:, Hq:], E[:, Hq:]
        vc64[self.slots] = self.buf0[:, H:].to(torch.float64)
        want, tol = paged_attention_ref(self.seqs, self.cu, self.bt, self.bs, ref[:, :Hq], E[:, :Hq],
                                        kc64, ek, vc64, self.scale)
        assert_within(to_torch(out).to(torch.float64), want, tol + 2.0 ** -150)
        # and the caches: the rotated new keys (f32) within E_k of the float64 rotation, v exactly,
        # at the slots; every other row as it was
        got_k = to_torch(kc).view(-1, Hkv, D)
        assert got_k.dtype == torch.float32
        assert_within(got_k[self.slots].to(torch.float64), ref[:, Hq:], E[:, Hq:])
        want_k, want_v = self.kc0.clone().view(-1, Hkv, D), self.vc0.clone().view(-1, Hkv, D)
        want_k[self.slots] = got_k[self.slots]
        want_v[self.slots] = self.buf0[:, H:].to(want_v.dtype)
        assert torch.equal(bits(kc), want_k.view(kc.shape).view(bits(kc).dtype))
        assert torch.equal(bits(vc), want_v.view(vc.shape).view(bits(vc).dtype))


# decode, prefill, chunked prefill, a sequence without queries, contexts crossing blocks of 4
MIXED = [(1, 1), (1, 37), (6, 6), (0, 5), (3, 13), (1, 8), (2, 9)]


# ============================================================================== equal bits

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("norm", NORMS, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_equals_separate_ops(simd, gen, dtype, norm, interleaved):
    """A mixed batch in the model's stacked layout (GQA, odd head size, partial rotary, a scaling),
    caches and weights of another dtype, out of yet another (and of qk's); qk's buffer unchanged;
    against float64 when everything is f32."""
    case = Case(gen, MIXED, 6, 2, 40, 24, norm=norm, w_dtype=OTHER[dtype], interleaved=interleaved, scaling=1.3,
                dtype=dtype, cache_dtype=OTHER[dtype])
    case.check_same(out_dtype=OTHER[OTHER[dtype]])
    case.check_same()
    f32 = Case(gen, MIXED, 6, 2, 40, 24, norm=norm, interleaved=interleaved, scaling=1.3)
    f32.check_reference(f32.check_same())


@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_gqa(simd, gen, G, norm):
    """Every GQA ratio, with one and with three kv heads, odd head sizes, rotate-half and interleaved,
    full and partial rotary; against float64."""
    for Hkv, D, R, interleaved in [(1, 36, 36, False), (3, 18, 8, True)]:
        case = Case(gen, MIXED, G * Hkv, Hkv, D, R, norm=norm, interleaved=interleaved)
        case.check_reference(case.check_same())


@pytest.mark.parametrize("bs", [1, 4, 16])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=NAMES.get)
def test_decode_batches(simd, gen, bs, dtype):
    """Decode steps: one query per sequence, contexts on both sides of block edges, and a batch of one
    sequence with one query (the GPU's one-kernel case)."""
    lens = [1, bs - 1 or 1, bs, bs + 1, 2 * bs + 1, 100, 7]
    for seqs in ([(1, L) for L in lens], [(1, 57)]):
        case = Case(gen, seqs, 8, 2, 64, bs=bs, norm="heads", dtype=dtype)
        results = case.check_same()
        if dtype == ip.float32:
            case.check_reference(results)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_apart_and_index_dtypes(simd, gen, index_dtype):
    """qk and v tensors of their own, int32 and int64 index tensors, a long prefill (threaded)."""
    case = Case(gen, [(70, 70), (1, 300), (4, 40)], 4, 2, 64, 32, bs=16, layout="apart", index_dtype=index_dtype,
                norm="row")
    case.check_reference(case.check_same())


def test_empty(simd, gen):
    """No tokens (sequences without queries, or none at all): nothing written."""
    for seqs in ([(0, 5), (0, 0)], []):
        case = Case(gen, seqs, 4, 2, 8)
        out, kc, vc, _ = case.check_same()
        assert out.shape == (0, 4, 8)
        assert torch.equal(bits(kc), bits(from_torch(case.kc0)))


def test_out_default(gen):
    """Without out: a new [T, Hq, D] tensor of qk's dtype, the two ops' bits; qk left as it was."""
    case = Case(gen, [(2, 5), (1, 3)], 4, 2, 16, dtype=ip.bfloat16)
    qk, v, kc, vc, whole = case.fresh()
    before = bits(whole).clone()
    out = ops.rope_kv_attention(qk, case.positions, case.inv, v, kc, vc, case.slot_mapping, case.cu_t, case.ctx_t,
                                case.bt_t, case.scale)
    assert out.shape == (3, 4, 16) and out.dtype == ip.bfloat16
    assert torch.equal(bits(whole), before)
    want, kc_want, vc_want, _ = case.run(False)
    assert_bits_equal(out, want, "out")
    assert_bits_equal(kc, kc_want, "k_cache")
    assert_bits_equal(vc, vc_want, "v_cache")


# ================================================================================== errors

def c_call(out, qk, w, pos, inv, R, v, kc, vc, slots, cu, ctx, bt, eps=1e-6, interleaved=0, scaling=1.0, scale=0.5):
    null = lambda t: ip.ffi.NULL if t is None else (t if isinstance(t, ip.ffi.CData) else t._desc)  # noqa: E731
    check(ip.lib.to_rope_kv_attention(null(out), null(qk), null(w), eps, null(pos), null(inv), R, interleaved,
                                      scaling, null(v), null(kc), null(vc), null(slots), null(cu), null(ctx),
                                      null(bt), scale))


def i64(*values):
    return ip.tensor(list(values), dtype=ip.int64)


class Small:
    """A valid call's arguments, seqs [(1, 3), (2, 6), (1, 1)], Hq 4, Hkv 2, D 8, blocks of 2 (table
    rows [0, 1], [2, 3, 4], [5]; blocks 6 and 7 spare): token 2 is sequence 1's second query, at
    position 5, slot 9."""
    T, Hq, Hkv, D, nb, bs = 4, 4, 2, 8, 8, 2

    def __init__(self, gen):
        T, H, Hkv, D = self.T, self.Hq + self.Hkv, self.Hkv, self.D
        buf = from_torch(torch.randn(T, H + Hkv, D, generator=gen))
        self.args = dict(
            out=ip.Tensor.full((T, self.Hq, D), 7.0), qk=buf.narrow(1, 0, H),
            w=ip.Tensor.full((D,), 1.0), pos=i64(2, 4, 5, 0), inv=from_torch(hf_inv_freq(D)), R=D,
            v=buf.narrow(1, H, Hkv), kc=from_torch(torch.randn(self.nb, self.bs, Hkv, D, generator=gen)),
            vc=from_torch(torch.randn(self.nb, self.bs, Hkv, D, generator=gen)), slots=i64(2, 8, 9, 10),
            cu=i64(0, 1, 3, 4), ctx=i64(3, 6, 1), bt=i64(0, 1, -1, 2, 3, 4, 5, 10 ** 6, -1).view(3, 3))
        self.buf = buf

    def snapshot(self):
        a = self.args
        return [bits(t).clone() for t in (a["out"], self.buf, a["kc"], a["vc"])]

    def fails(self, exc, message, **changed):
        """The call with some arguments changed raises exc matching message and writes nothing."""
        before = self.snapshot()
        with pytest.raises(exc, match=message):
            c_call(**{**self.args, **changed})
        for b, a in zip(before, self.snapshot()):
            assert torch.equal(a, b), "the failed call wrote something"


def test_valid_small(gen):
    """Small's call is valid, with the norm or without; it writes out and the caches, never qk's
    buffer."""
    for w in ("keep", None):
        s = Small(gen)
        args = s.args if w == "keep" else {**s.args, "w": None}
        out, buf, kc, vc = s.snapshot()
        c_call(**args)
        after = s.snapshot()
        assert torch.equal(after[1], buf), "the op wrote qk's buffer"
        assert not torch.equal(after[0], out) and not torch.equal(after[2], kc) and not torch.equal(after[3], vc)


def test_errors(gen):
    s = Small(gen)
    T, Hq, Hkv, D, nb, bs, H = s.T, s.Hq, s.Hkv, s.D, s.nb, s.bs, s.Hq + s.Hkv
    op = "to_rope_kv_attention"
    for name, key in [("out", "out"), ("qk", "qk"), ("positions", "pos"),
                      ("inv_freq", "inv"), ("v", "v"), ("k_cache", "kc"), ("v_cache", "vc"),
                      ("slot_mapping", "slots"), ("cu_seqlens_q", "cu"), ("context_lens", "ctx"),
                      ("block_tables", "bt")]:
        s.fails(ip.InvalidArgumentError, f"{op}: {name} is NULL", **{key: None})
    # to_rope_kv_store's checks in the in-place form (its out is qk), then to_paged_attention's (its
    # q is qk's first Hq heads)
    R = "to_rope_kv_store: "
    s.fails(ip.DTypeError, R + "out has dtype int32", qk=ip.Tensor.zeros(T, H, D, dtype=ip.int32))
    # qk passes out's checks too (never written, but the in-place form's): no element reached twice
    s.fails(ip.InvalidArgumentError, R + "out is written but some of its elements share memory",
            qk=ip.Tensor.zeros(T, 1, D).expand(T, H, D))
    s.fails(ip.ShapeError, R + "positions has 3 entries but qk has T = 4 tokens", pos=i64(0, 1, 2))
    s.fails(ip.InvalidArgumentError, R + "rotary_dim must be even and in 1..D = 8, got 7", R=7)
    s.fails(ip.ShapeError, R + "weight has 3 rows but qk has H = 6 heads", w=ip.Tensor.full((3, D), 1.0))
    s.fails(ip.ShapeError, R + "qk has 6 heads, fewer than the caches' Hkv = 7",
            kc=ip.Tensor.zeros(nb, bs, 7, D), vc=ip.Tensor.zeros(nb, bs, 7, D))
    s.fails(ip.ShapeError, R + "qk has head size D = 8 but the caches have D = 4",
            kc=ip.Tensor.zeros(nb, bs, Hkv, 4), vc=ip.Tensor.zeros(nb, bs, Hkv, 4))
    s.fails(ip.DTypeError, R + "k_cache has dtype float32 but v_cache has dtype bfloat16",
            vc=ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.bfloat16))
    s.fails(ip.ShapeError, R + r"k \(the last Hkv heads of out\) has shape \[4, 2, 8\] but v has shape \[4, 1, 8\]",
            v=ip.Tensor.zeros(T, 1, D))
    s.fails(ip.ShapeError, R + r"slot_mapping has 3 entries but k \(the last Hkv heads of out\) has T = 4",
            slots=i64(2, 8, 9))
    A = "to_paged_attention: "
    s.fails(ip.ShapeError, A + r"out has shape \[4, 3, 8\] but q has shape \[4, 4, 8\]", out=ip.Tensor.zeros(T, 3, D))
    s.fails(ip.DTypeError, A + "out has dtype int32", out=ip.Tensor.zeros(T, Hq, D, dtype=ip.int32))
    s.fails(ip.ShapeError, A + "q has Hq = 3 heads, not a multiple of the caches' Hkv = 2",
            qk=ip.Tensor.zeros(T, 5, D), out=ip.Tensor.zeros(T, 3, D), w=ip.Tensor.full((5, D), 1.0))
    s.fails(ip.ShapeError, A + r"cu_seqlens_q has 3 entries, expected S \+ 1 = 4", cu=i64(0, 1, 4))
    s.fails(ip.ShapeError, A + "block_tables has 2 rows but context_lens has S = 3 sequences",
            bt=i64(0, 1, 2, 3).view(2, 2))
    s.fails(ip.DTypeError, A + "context_lens has dtype float32", ctx=ip.Tensor.zeros(3))
    s.fails(ip.InvalidArgumentError, A + "scale must be finite", scale=float("nan"))
    # devices
    s.fails(ip.DeviceError, R + "tensors are on different devices", kc=on_cuda(s.args["kc"]), vc=on_cuda(s.args["vc"]))
    s.fails(ip.DeviceError, A + "tensors are on different devices", out=on_cuda(s.args["out"]))
    s.fails(ip.DeviceError, A + "tensors are on different devices", bt=on_cuda(s.args["bt"]))


def test_out_aliasing(gen):
    """out is written last: it may overlap none of the other arguments (not even qk's k heads, which
    to_paged_attention's checks do not see)."""
    s = Small(gen)
    T, Hq, Hkv, D, H = s.T, s.Hq, s.Hkv, s.D, s.Hq + s.Hkv
    op = "to_rope_kv_attention: "
    n = T * Hq * D
    big = ip.Tensor.zeros(4 * n)

    def at(offset, shape, dtype=ip.float32):  # a view of big's memory from element `offset`
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1]
        return ip.Tensor(big.storage, shape, strides, dtype, offset=4 * offset)

    out = at(0, (T, Hq, D))
    # qk stored head-major: its q heads are its first T * Hq * D elements, out sits on its k heads
    qk = at(0, (H, T, D)).transpose(0, 1)
    s.fails(ip.InvalidArgumentError, op + "out overlaps qk in memory", out=at(n, (T, Hq, D)), qk=qk)
    s.fails(ip.InvalidArgumentError, "to_paged_attention: out overlaps q in memory", out=at(8, (T, Hq, D)), qk=qk)
    s.fails(ip.InvalidArgumentError, "to_paged_attention: out overlaps q in memory", out=s.args["qk"].narrow(1, 0, Hq))
    s.fails(ip.InvalidArgumentError, "to_paged_attention: out overlaps q in memory", out=out, qk=at(n - 8, (T, H, D)))
    s.fails(ip.InvalidArgumentError, op + "out overlaps v in memory", out=out, v=at(n - 8, (T, Hkv, D)))
    s.fails(ip.InvalidArgumentError, op + "out overlaps positions in memory", out=out, pos=at(n - 2, (T,), ip.int64))
    s.fails(ip.InvalidArgumentError, op + "out overlaps inv_freq in memory", out=out, inv=at(n - 1, (D // 2,)))
    s.fails(ip.InvalidArgumentError, op + "out overlaps slot_mapping in memory", out=out, slots=at(1, (T,), ip.int32))
    s.fails(ip.InvalidArgumentError, op + "out overlaps norm_weight in memory", out=out, w=at(3, (D,)))
    kc = s.args["kc"]
    s.fails(ip.InvalidArgumentError, "to_paged_attention: out overlaps k_cache in memory",
            out=ip.Tensor(kc.storage, (T, Hq, D), (Hq * D, D, 1), ip.float32))
    s.fails(ip.InvalidArgumentError, "to_paged_attention: out overlaps v_cache in memory",
            out=ip.Tensor(s.args["vc"].storage, (T, Hq, D), (Hq * D, D, 1), ip.float32))


def test_bad_batch_writes_nothing(gen):
    """The batch's values, checked (to_paged_attention's messages) before anything is written."""
    s = Small(gen)
    A = "to_paged_attention: "
    s.fails(ip.InvalidArgumentError, A + r"cu_seqlens_q\[0\] = 1, expected 0", cu=i64(1, 1, 3, 4))
    s.fails(ip.InvalidArgumentError, A + r"cu_seqlens_q\[2\] = 0 is less than cu_seqlens_q\[1\] = 1",
            cu=i64(0, 1, 0, 4))
    s.fails(ip.BoundsError, A + r"cu_seqlens_q\[2\] = 5 is past T = 4", cu=i64(0, 1, 5, 4))
    s.fails(ip.InvalidArgumentError, A + r"cu_seqlens_q\[3\] = 3, expected T = 4", cu=i64(0, 1, 3, 3))
    s.fails(ip.InvalidArgumentError, A + r"context_lens\[1\] = 1 is less than the 2 queries of sequence 1",
            ctx=i64(3, 1, 1))
    s.fails(ip.BoundsError, A + r"context_lens\[1\] = 7 needs 4 blocks of 2 but block_tables has 3", ctx=i64(3, 7, 1))
    s.fails(ip.BoundsError, A + r"block_tables\[1, 1\] = 8 is outside \[0, 8\)",
            bt=i64(0, 1, -1, 2, 8, 4, 5, 10 ** 6, -1).view(3, 3))
    s.fails(ip.BoundsError, A + r"block_tables\[2, 0\] = -1 is outside",
            bt=i64(0, 1, -1, 2, 3, 4, -1, 5, -1).view(3, 3))
    # and the slots' values (to_rope_kv_store's messages)
    R = "to_rope_kv_store: "
    s.fails(ip.BoundsError, R + r"slot_mapping\[1\] = 16 is not below num_blocks \* block_size = 16",
            slots=i64(2, 16, 9, 10))
    s.fails(ip.InvalidArgumentError, R + r"slot_mapping\[1\] and slot_mapping\[3\] are both slot 10",
            slots=i64(2, 10, 9, 10))


def test_slot_not_its_positions_writes_nothing(gen):
    """The precondition: token 2 (sequence 1's second query, position 5, slot 9) given another slot,
    each kind a caller could get wrong; and two tokens' slots swapped (the first one named)."""
    s = Small(gen)
    msg = r"to_rope_kv_attention: slot_mapping\[{}\] = {} is not the slot {} that block_tables gives its position"
    # a spare block's slots, position 0 of the same sequence (an old row), a row of another sequence
    # (in its context, or past it), padding
    for slot in [12, 15, 4, 0, 11, -1]:
        s.fails(ip.InvalidArgumentError, msg.format(2, slot, 9) + r" \(5, of sequence 1\); nothing was written",
                slots=i64(2, 8, slot, 10))
    s.fails(ip.InvalidArgumentError, msg.format(1, 9, 8), slots=i64(2, 9, 8, 10))
    s.fails(ip.InvalidArgumentError, msg.format(3, 11, 10) + r" \(0, of sequence 2\)", slots=i64(2, 8, 9, 11))
    # positions are the rotation's alone: they need not be the attention positions
    c_call(**{**s.args, "pos": i64(9, 9, 9, 9)})


def test_read_only(gen):
    """Read-only caches are refused; a read-only qk (and v) is fine: the op never writes them."""
    case = Case(gen, [(1, 3)], 2, 1, 8, layout="apart")
    qk, v, kc, vc, _ = case.fresh()
    ro = ip.Tensor.frombuffer(bytes(kc), ip.float32, kc.shape)
    for caches in [(ro, vc), (kc, ro)]:
        with pytest.raises(ValueError, match="read-only"):
            ops.rope_kv_attention(qk, case.positions, case.inv, v, *caches, case.slot_mapping, case.cu_t, case.ctx_t,
                                  case.bt_t, case.scale)
    qk_ro = ip.Tensor.frombuffer(bytes(qk), qk.dtype, qk.shape)
    v_ro = ip.Tensor.frombuffer(bytes(v), v.dtype, v.shape)
    out = ops.rope_kv_attention(qk_ro, case.positions, case.inv, v_ro, kc, vc, case.slot_mapping, case.cu_t,
                                case.ctx_t, case.bt_t, case.scale)
    want, kc_want, vc_want, _ = case.run(False)
    assert_bits_equal(out, want, "out")
    assert_bits_equal(kc, kc_want, "k_cache")
    assert_bits_equal(vc, vc_want, "v_cache")
