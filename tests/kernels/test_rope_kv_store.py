"""to_rope_kv_store: an attention layer's rotation of q and k (optionally after the per-head
RMSNorm) and the cache write of k and v, in one call.

Oracle: the separate ops it fuses, to_rope or to_rms_norm_rope into out, then to_kv_cache_store
of out's last Hkv heads and v (both proven against float64 / torch in test_rope.py and
test_attention.py). The fused op must give exactly their bits: out, both caches whole (stored
slots and every byte around them), and the rest of a stacked qkv buffer. The fresh inputs come
in the model's layout (qk and v head slices of one [T, Hq + 2 Hkv, D] buffer) and others; the
caches start full of random values, so a write to a wrong place shows.

Every numeric test runs on the best SIMD path and the forced scalar path (`simd` fixture).
"""
import pytest
import torch

import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, assert_bits_equal, bits, from_torch, on_cuda, randn, to_torch

NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16", None: "none"}
NORMS = [None, "row", "heads"]  # no norm (to_rope), a weight [D], a weight per head [H, D]


def inv_freq(R, theta=10000.0):
    return from_torch(1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.int64).to(torch.float32) / R)))


class Inputs:
    """One call's random inputs, as CPU tensors; `fresh` gives new copies of the written ones.

    layout "stacked": qk and v are head slices of one [T, Hq + 2 Hkv, D] buffer, as Attention
    holds them (v of qk's dtype); "apart": qk [T, H, D] and v [T, Hkv, D] tensors of their own.
    The slots are distinct, a random subset of the caches' (some tokens padding, -1), and the
    caches hold random values (a stray or missing write changes bits)."""

    def __init__(self, gen, T, Hq, Hkv, D, dtype=ip.float32, v_dtype=None, cache_dtype=None,
                 layout="stacked", bs=4, slot_dtype=torch.int64, padding=True):
        self.T, self.Hq, self.Hkv, self.D, self.layout = T, Hq, Hkv, D, layout
        v_dtype, cache_dtype = v_dtype or dtype, cache_dtype or dtype
        if layout == "stacked":
            assert v_dtype == dtype
            self.buf, _ = randn(T, Hq + 2 * Hkv, D, dtype=dtype, gen=gen, scale=2.0)
        else:
            self.qk, _ = randn(T, Hq + Hkv, D, dtype=dtype, gen=gen, scale=2.0)
            self.v, _ = randn(T, Hkv, D, dtype=v_dtype, gen=gen, scale=2.0)
        nb = T // bs + 2
        slots = torch.randperm(nb * bs, generator=gen)[:T]
        if padding and T > 1:
            slots[torch.rand(T, generator=gen) < 0.3] = -1
            slots[T // 2] = -1 - int(torch.randint(0, 5, (1,), generator=gen))  # any negative skips
        self.slots_torch = slots
        self.slots = from_torch(slots.to(slot_dtype))
        self.k_cache, _ = randn(nb, bs, Hkv, D, dtype=cache_dtype, gen=gen)
        self.v_cache, _ = randn(nb, bs, Hkv, D, dtype=cache_dtype, gen=gen)

    def fresh(self, device="cpu"):
        """(qk, v, k_cache, v_cache, whole) new copies on device; `whole` the stacked buffer (or
        qk) that a test compares in full afterwards."""
        H = self.Hq + self.Hkv
        kc, vc = self.k_cache.clone().to(device), self.v_cache.clone().to(device)
        if self.layout == "stacked":
            buf = self.buf.clone().to(device)
            return buf.narrow(1, 0, H), buf.narrow(1, H, self.Hkv), kc, vc, buf
        qk = self.qk.clone().to(device)
        return qk, self.v.clone().to(device), kc, vc, qk


def run_pair(inp, pos, inv, R, interleaved=False, scaling=1.0, norm=None, w=None, eps=1e-6, in_place=False,
             out_dtype=None, device="cpu", out_layout="contiguous"):
    """The fused op and the separate ops on fresh copies of the same inputs; returns
    [(out, k_cache, v_cache, whole)] for (fused, separate)."""
    H = inp.Hq + inp.Hkv
    pos, inv, slots = pos.to(device), inv.to(device), inp.slots.to(device)
    w = w.to(device) if w is not None else None
    results = []
    for fused in (True, False):
        qk, v, kc, vc, whole = inp.fresh(device)
        if in_place:
            out = qk
        elif out_layout == "transposed":  # last-dim stride H
            out = ip.Tensor.full((inp.T, inp.D, H), float("nan"), dtype=out_dtype or qk.dtype,
                                 device=device).transpose(1, 2)
        else:
            out = ip.Tensor.full(qk.shape, float("nan"), dtype=out_dtype or qk.dtype, device=device)
        if fused:
            res = ops.rope_kv_store(qk, pos, inv, v, kc, vc, slots, norm_weight=w, eps=eps, interleaved=interleaved,
                                    rotary_dim=R, attention_scaling=scaling, out=out)
            assert res is out
        else:
            if w is None:
                ops.rope(qk, pos, inv, R, interleaved=interleaved, attention_scaling=scaling, out=out)
            else:
                ops.rms_norm_rope(qk, w, eps, pos, inv, interleaved, R, scaling, out=out)
            ops.kv_cache_store(kc, vc, out.narrow(1, H - inp.Hkv, inp.Hkv), v, slots)
        results.append((out, kc, vc, whole))
    return results


def assert_same(results):
    (out, kc, vc, whole), (out2, kc2, vc2, whole2) = results
    assert_bits_equal(out, out2, "out")
    assert_bits_equal(kc, kc2, "k_cache")
    assert_bits_equal(vc, vc2, "v_cache")
    assert_bits_equal(whole, whole2, "the qkv buffer")


def norm_weight(norm, H, D, gen, dtype=ip.float32):
    if norm is None:
        return None
    return randn(*((D,) if norm == "row" else (H, D)), dtype=dtype, gen=gen)[0]


def case(gen, T, Hq, Hkv, D, R, norm=None, w_dtype=ip.float32, interleaved=False, scaling=1.0, in_place=True,
         out_dtype=None, pos_dtype=torch.int64, device="cpu", **inputs):
    inp = Inputs(gen, T, Hq, Hkv, D, **inputs)
    pos = from_torch(torch.randint(-3, 40000, (T,), generator=gen).to(pos_dtype))
    w = norm_weight(norm, Hq + Hkv, D, gen, w_dtype)
    results = run_pair(inp, pos, inv_freq(R), R, interleaved, scaling, norm, w, in_place=in_place,
                       out_dtype=out_dtype, device=device)
    assert_same(results)
    return inp, results[0]


# ============================================================================== equal bits

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("norm", NORMS, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "out"])
def test_equals_separate_ops(simd, gen, dtype, norm, interleaved, in_place):
    """The model's call: qk and v head slices of a stacked qkv buffer (GQA, odd head counts),
    partial rotary, a scaling; in place (as Attention calls it) or into an out of another dtype."""
    other = {ip.float32: ip.bfloat16, ip.float16: ip.float32, ip.bfloat16: ip.float16}[dtype]
    case(gen, 7, 6, 2, 40, 24, norm, w_dtype=other, interleaved=interleaved, scaling=1.3, in_place=in_place,
         out_dtype=None if in_place else other, dtype=dtype, cache_dtype=other)


@pytest.mark.parametrize("T,Hq,Hkv,D,R", [(1, 1, 1, 2, 2), (1, 16, 8, 128, 128), (3, 3, 1, 18, 6), (9, 5, 5, 130, 34),
                                         (33, 8, 2, 64, 32), (300, 4, 2, 64, 64), (4, 0, 3, 16, 16), (2, 3, 0, 8, 8),
                                         (5, 2, 1, 1030, 64)], ids=str)
@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_shapes(simd, gen, T, Hq, Hkv, D, R, norm):
    """Decode (T = 1), MHA and GQA, odd T, H and D (with and without an 8-lane tail), partial
    rotary, 300 tokens (threaded), qk = k alone (Hq = 0: the k heads of a layer whose q and k norms
    differ), Hkv = 0 (nothing stored), D over the norm's 512-element chunk."""
    case(gen, T, Hq, Hkv, D, R, norm, interleaved=T % 2 == 0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=NAMES.get)
@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_dtypes(simd, gen, dtype, norm):
    """Every qk / v / cache dtype mix (qk and v apart), int32 and int64 slots and positions."""
    for v_dtype in FLOAT_DTYPES:
        for cache_dtype in FLOAT_DTYPES:
            case(gen, 5, 3, 1, 24, 16, norm, w_dtype=v_dtype, dtype=dtype, v_dtype=v_dtype, cache_dtype=cache_dtype,
                 layout="apart", slot_dtype=torch.int32, pos_dtype=torch.int32)
    case(gen, 5, 3, 1, 24, 16, norm, in_place=False, out_dtype=ip.float32, dtype=dtype, layout="apart",
         cache_dtype=ip.bfloat16)


@pytest.mark.parametrize("kind", ["out_transposed", "qk_transposed", "v_sliced", "slots_strided", "pos_strided"])
@pytest.mark.parametrize("norm", [None, "heads"], ids=str)
def test_layouts(simd, gen, kind, norm):
    """Strided out, qk, v, slot_mapping and positions."""
    T, Hq, Hkv, D, R = 6, 4, 2, 40, 24
    inp = Inputs(gen, T, Hq, Hkv, D, layout="apart", cache_dtype=ip.bfloat16)
    pos = from_torch(torch.randint(0, 5000, (T,), generator=gen))
    w = norm_weight(norm, Hq + Hkv, D, gen)
    if kind == "qk_transposed":
        inp.qk = inp.qk.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "v_sliced":
        wide = ip.Tensor.zeros(T, Hkv, 2 * D)
        wide[..., 1::2].copy_(inp.v)
        inp.v = wide[..., 1::2]
    elif kind == "slots_strided":
        wide = ip.Tensor.zeros(2 * T, dtype=ip.int64)
        wide[::2].copy_(inp.slots)
        inp.slots = wide[::2]
    elif kind == "pos_strided":
        wide = ip.Tensor.zeros(2 * T, dtype=ip.int64)
        wide[1::2].copy_(pos)
        pos = wide[1::2]
    results = run_pair(inp, pos, inv_freq(R), R, True, 1.0, norm, w, in_place=False,
                       out_layout="transposed" if kind == "out_transposed" else "contiguous")
    assert_same(results)


def test_what_is_stored(simd, gen):
    """Beyond equality with the separate ops: the stored rows are out's k heads and v converted to
    the cache dtype, tokens with a negative slot store nothing, the other slots keep their values,
    and v's heads in the qkv buffer are untouched."""
    T, Hq, Hkv, D = 9, 4, 2, 32
    inp, (out, kc, vc, buf) = case(gen, T, Hq, Hkv, D, D, "heads", dtype=ip.float32, cache_dtype=ip.bfloat16)
    slots = inp.slots_torch
    keep = slots >= 0
    assert 0 < int(keep.sum()) < T
    got_k, got_v = to_torch(kc).view(-1, Hkv, D), to_torch(vc).view(-1, Hkv, D)
    want_k, want_v = to_torch(inp.k_cache).view(-1, Hkv, D).clone(), to_torch(inp.v_cache).view(-1, Hkv, D).clone()
    want_k[slots[keep]] = to_torch(out)[keep, Hq:].to(torch.bfloat16)
    want_v[slots[keep]] = to_torch(inp.buf)[keep, Hq + Hkv:].to(torch.bfloat16)
    assert torch.equal(got_k.view(torch.int16), want_k.view(torch.int16))
    assert torch.equal(got_v.view(torch.int16), want_v.view(torch.int16))
    assert torch.equal(to_torch(buf)[:, Hq + Hkv:], to_torch(inp.buf)[:, Hq + Hkv:])
    assert not torch.equal(to_torch(buf)[:, :Hq + Hkv], to_torch(inp.buf)[:, :Hq + Hkv])  # rotated in place


def test_empty(gen):
    inp = Inputs(gen, 0, 2, 1, 8, layout="apart")
    qk, v, kc, vc, _ = inp.fresh()
    out = ops.rope_kv_store(qk, ip.Tensor.zeros(0, dtype=ip.int64), inv_freq(8), v, kc, vc, inp.slots)
    assert out.shape == (0, 3, 8)
    assert torch.equal(bits(kc), bits(inp.k_cache)) and torch.equal(bits(vc), bits(inp.v_cache))


# ================================================================================== errors

def c_call(out, qk, w, pos, inv, R, v, kc, vc, slots, eps=1e-6, interleaved=0, scaling=1.0):
    null = lambda t: ip.ffi.NULL if t is None else (t if isinstance(t, ip.ffi.CData) else t._desc)  # noqa: E731
    check(ip.lib.to_rope_kv_store(null(out), null(qk), null(w), eps, null(pos), null(inv), R, interleaved, scaling,
                                  null(v), null(kc), null(vc), null(slots)))


def test_errors():
    T, Hq, Hkv, D, nb, bs = 3, 2, 2, 8, 4, 2
    op = "to_rope_kv_store"
    qk, out, w = ip.Tensor.zeros(T, Hq + Hkv, D), ip.Tensor.zeros(T, Hq + Hkv, D), ip.Tensor.full((D,), 1.0)
    pos, inv = ip.Tensor.zeros(T, dtype=ip.int64), ip.Tensor.zeros(D // 2)
    v = ip.Tensor.zeros(T, Hkv, D)
    kc, vc = ip.Tensor.zeros(nb, bs, Hkv, D), ip.Tensor.zeros(nb, bs, Hkv, D)
    slots = ip.tensor([0, 5, -1], dtype=ip.int64)
    args = dict(out=out, qk=qk, w=w, pos=pos, inv=inv, R=D, v=v, kc=kc, vc=vc, slots=slots)

    def fails(exc, message, **changed):
        with pytest.raises(exc, match=message):
            c_call(**{**args, **changed})

    for name, key in [("out", "out"), ("qk", "qk"), ("positions", "pos"), ("inv_freq", "inv"), ("v", "v"),
                      ("k_cache", "kc"), ("v_cache", "vc"), ("slot_mapping", "slots")]:
        fails(ip.InvalidArgumentError, f"{op}: {name} is NULL", **{key: None})
    c_call(**{**args, "w": None})  # no norm: to_rope's part
    # the rotation's checks (qk is their x), the norm's
    fails(ip.DTypeError, f"{op}: qk has dtype int32", qk=ip.Tensor.zeros(T, Hq + Hkv, D, dtype=ip.int32))
    fails(ip.ShapeError, rf"{op}: out has shape \[3, 4, 6\] but qk has shape \[3, 4, 8\]", out=ip.Tensor.zeros(T, 4, 6))
    fails(ip.ShapeError, f"{op}: positions has 4 entries but qk has T = 3 tokens",
          pos=ip.Tensor.zeros(4, dtype=ip.int64))
    fails(ip.InvalidArgumentError, f"{op}: rotary_dim must be even and in 1..D = 8, got 7", R=7)
    fails(ip.ShapeError, f"{op}: inv_freq has 4 entries, expected rotary_dim / 2 = 3", R=6)
    fails(ip.ShapeError, rf"{op}: weight has 3 rows but qk has H = 4 heads", w=ip.Tensor.full((3, D), 1.0))
    fails(ip.ShapeError, rf"{op}: weight has shape \[6\] but the last dimension of x is 8", w=ip.Tensor.full((6,), 1.0))
    fails(ip.DTypeError, f"{op}: weight has dtype int32", w=ip.Tensor.zeros(D, dtype=ip.int32))
    for eps in [-1.0, float("nan")]:
        fails(ip.InvalidArgumentError, f"{op}: eps must be finite and >= 0", eps=eps)
    # the store's
    fails(ip.DTypeError, f"{op}: k_cache has dtype int32", kc=ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.int32))
    fails(ip.DTypeError, f"{op}: k_cache has dtype float32 but v_cache has dtype bfloat16",
          vc=ip.Tensor.zeros(nb, bs, Hkv, D, dtype=ip.bfloat16))
    fails(ip.ShapeError, rf"{op}: k_cache \[num_blocks, block_size, Hkv, D\] must have 4 dimensions, got 3",
          kc=ip.Tensor.zeros(nb, bs, Hkv * D))
    fails(ip.InvalidArgumentError, f"{op}: v_cache must be contiguous",
          vc=ip.Tensor.zeros(nb, bs, D, Hkv).transpose(2, 3))
    fails(ip.ShapeError, f"{op}: qk has 4 heads, fewer than the caches' Hkv = 5",
          kc=ip.Tensor.zeros(nb, bs, 5, D), vc=ip.Tensor.zeros(nb, bs, 5, D))
    fails(ip.ShapeError, f"{op}: qk has head size D = 8 but the caches have D = 4",
          kc=ip.Tensor.zeros(nb, bs, Hkv, 4), vc=ip.Tensor.zeros(nb, bs, Hkv, 4))
    fails(ip.DTypeError, f"{op}: v has dtype int8", v=ip.Tensor.zeros(T, Hkv, D, dtype=ip.int8))
    fails(ip.ShapeError, rf"{op}: k \(the last Hkv heads of out\) has shape \[3, 2, 8\] but v has shape \[3, 1, 8\]",
          v=ip.Tensor.zeros(T, 1, D))
    fails(ip.DTypeError, f"{op}: slot_mapping has dtype float32, expected one of: int32, int64",
          slots=ip.Tensor.zeros(T))
    fails(ip.ShapeError, rf"{op}: slot_mapping has 2 entries but k \(the last Hkv heads of out\) has T = 3 tokens",
          slots=ip.tensor([0, 1], dtype=ip.int64))
    small = ip.Tensor.zeros(4)
    fails(ip.BoundsError, f"{op}: v needs 192 bytes",
          v=ip.Tensor(small.storage, (T, Hkv, D), (Hkv * D, D, 1), ip.float32))
    # aliasing: the caches against everything, out against v and the slots
    fails(ip.InvalidArgumentError, f"{op}: k_cache overlaps v_cache in memory", vc=kc)
    big = ip.Tensor.zeros(nb * bs * Hkv * D + T * (Hq + Hkv) * D)
    kc_big = big.narrow(0, 0, nb * bs * Hkv * D).view(nb, bs, Hkv, D)
    fails(ip.InvalidArgumentError, f"{op}: k_cache overlaps qk in memory",
          kc=kc_big, qk=big.narrow(0, nb * bs * Hkv * D - 8, T * (Hq + Hkv) * D).view(T, Hq + Hkv, D))
    fails(ip.InvalidArgumentError, f"{op}: v_cache overlaps positions in memory",
          vc=kc_big, kc=ip.Tensor.zeros(nb, bs, Hkv, D),
          pos=ip.Tensor(big.storage, (T,), (1,), ip.int64))
    fails(ip.InvalidArgumentError, f"{op}: k_cache overlaps weight in memory", kc=kc_big, w=big.narrow(0, 8, D))
    fails(ip.InvalidArgumentError, f"{op}: v_cache overlaps inv_freq in memory", vc=kc_big,
          inv=big.narrow(0, 0, D // 2))
    fails(ip.InvalidArgumentError, rf"{op}: k_cache overlaps k \(the last Hkv heads of out\) in memory",
          kc=kc_big, out=big.narrow(0, 16, T * (Hq + Hkv) * D).view(T, Hq + Hkv, D))
    # out's q heads alone on the cache's last elements
    fails(ip.InvalidArgumentError, f"{op}: k_cache overlaps out in memory",
          kc=kc_big, out=big.narrow(0, nb * bs * Hkv * D - 8, T * (Hq + Hkv) * D).view(T, Hq + Hkv, D))
    heads = ip.Tensor.zeros(T, Hq + 2 * Hkv, D)
    # v overlapping out's heads (one head further along than the stacked layout has it)
    fails(ip.InvalidArgumentError, f"{op}: out overlaps v in memory", out=heads.narrow(1, 0, Hq + Hkv),
          qk=heads.narrow(1, 0, Hq + Hkv), v=heads.narrow(1, Hq + Hkv - 1, Hkv))
    # beside it in the stacked layout: accepted (no element shared)
    c_call(**{**args, "out": heads.narrow(1, 0, Hq + Hkv), "qk": heads.narrow(1, 0, Hq + Hkv),
              "v": heads.narrow(1, Hq + Hkv, Hkv)})
    ints = ip.Tensor.zeros(T * (Hq + Hkv) * D, dtype=ip.int32)
    fails(ip.InvalidArgumentError, f"{op}: out overlaps slot_mapping in memory",
          out=ip.Tensor(ints.storage, (T, Hq + Hkv, D), ((Hq + Hkv) * D, D, 1), ip.float32),
          slots=ip.Tensor(ints.storage, (T,), (1,), ip.int32))
    fails(ip.InvalidArgumentError, f"{op}: out overlaps qk in memory but is not the same view",
          out=heads.narrow(1, 1, Hq + Hkv), qk=heads.narrow(1, 0, Hq + Hkv))
    # devices
    fails(ip.DeviceError, f"{op}: tensors are on different devices", kc=on_cuda(kc), vc=on_cuda(vc))
    fails(ip.DeviceError, f"{op}: tensors are on different devices", v=on_cuda(v))


def test_bad_slots_write_nothing(gen):
    """On the CPU the slot values are checked before anything is written: a slot past the caches
    (BoundsError) or two tokens on one slot (InvalidArgumentError) leave out, qk and the caches
    as they were."""
    T, Hq, Hkv, D, nb, bs = 4, 2, 1, 8, 2, 3
    qk, _ = randn(T, Hq + Hkv, D, gen=gen)
    v, _ = randn(T, Hkv, D, gen=gen)
    pos, inv = ip.tensor([0, 1, 2, 3], dtype=ip.int32), inv_freq(D)
    for slots, exc, message in [
            ([0, 6, -1, 2], ip.BoundsError,
             r"to_rope_kv_store: slot_mapping\[1\] = 6 is not below num_blocks \* block_size = 6"),
            ([5, -1, 3, 5], ip.InvalidArgumentError,
             r"to_rope_kv_store: slot_mapping\[0\] and slot_mapping\[3\] are both slot 5")]:
        for w in [None, ip.Tensor.full((D,), 0.5)]:
            x = qk.clone()
            kc, vc = ip.Tensor.zeros(nb, bs, Hkv, D), ip.Tensor.zeros(nb, bs, Hkv, D)
            with pytest.raises(exc, match=message):
                ops.rope_kv_store(x, pos, inv, v, kc, vc, ip.tensor(slots, dtype=ip.int32), norm_weight=w, out=x)
            assert torch.equal(bits(x), bits(qk))
            assert not to_torch(kc).any() and not to_torch(vc).any()


def test_read_only_caches(gen):
    inp = Inputs(gen, 2, 1, 1, 8, layout="apart")
    qk, v, kc, vc, _ = inp.fresh()
    ro = ip.Tensor.frombuffer(bytes(kc), ip.float32, kc.shape)
    assert ro.readonly
    for caches in [(ro, vc), (kc, ro)]:
        with pytest.raises(ValueError, match="read-only"):
            ops.rope_kv_store(qk, ip.Tensor.zeros(2, dtype=ip.int64), inv_freq(8), v, *caches, inp.slots)


@pytest.mark.parametrize("norm", NORMS, ids=str)
def test_gpu_equals_separate_gpu_ops(device, gen, norm):
    """With the `device` fixture: on a GPU too the one kernel gives the separate kernels' bits."""
    case(gen, 5, 6, 2, 64, 64, norm, interleaved=True, device=device, dtype=ip.bfloat16, cache_dtype=ip.float16)
