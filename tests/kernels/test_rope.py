"""to_rope: rotary position embedding of x [T, H, D].

Oracle: written like HF's apply_rotary_pos_emb, in float64 from the same float32 angles:
    angle = float32(pos) * inv_freq                  (a float32 product, as HF computes it)
    emb = cat(angle, angle); cos = cos(emb) * s; sin = sin(emb) * s      (float64 from here on)
    out[..., :R] = x_r * cos + rotate_half(x_r) * sin,  rotate_half(v) = cat(-v2, v1)
    out[..., R:] = x[..., R:]
where x_r = x[..., :R], de-interleaved first (cat(x_r[0::2], x_r[1::2])) in the interleaved
(GLM) form: that is HF 5.0's de-interleave-then-rotate-half, which writes the slice the way
to_rope does.

Tolerances (per element; u = 2^-24): the kernel rounds cos and sin to f32 (u each), multiplies
by the f32 attention scaling (u, plus u for rounding the scaling itself), takes two f32
products (u each) and one sum (u of the result). With mag = |x_r cos| + |rotate_half(x_r) sin|
that is |err| <= 4u mag + u |ref|; we allow 6u mag (3.6e-7 of the magnitude), plus for f16/bf16
out one rounding u_out |ref| (2^-11, 2^-8) and half the f16 subnormal spacing. Dims >= R are
exact copies (or one rounding when out's dtype differs).

Every numeric test runs on the best SIMD path and the forced scalar path (`simd` fixture).
"""
import pytest
import torch

import inference_pio as ip
from inference_pio import ops, runtime
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, from_torch, hf_inv_freq, randn, rope_ref, strided, to_torch, assert_within


U32 = 2.0 ** -24
U_OUT = {ip.float32: 0.0, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY_OUT = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}


def null(t):
    return ip.ffi.NULL if t is None else t._desc


def c_rope(out, x, pos, inv, R, interleaved=0, scaling=1.0):
    check(ip.lib.to_rope(null(out), null(x), null(pos), null(inv), R, interleaved, scaling))


def assert_close(out, ref, mag, out_dtype):
    got = to_torch(out).to(torch.float64)
    assert tuple(got.shape) == tuple(ref.shape)
    acc = 6 * U32 * mag
    tol = acc + U_OUT[out_dtype] * (ref.abs() + acc) + TINY_OUT[out_dtype]
    assert_within(got, ref, tol)


def positions(T, gen, dtype=torch.int64):
    """Unsorted positions, with 0, a large one (100000) and one above 2^24 (float32(pos) rounds)."""
    p = torch.randint(0, 5000, (T,), generator=gen, dtype=torch.int64)
    special = [0, 100_000, 20_000_001, 1]
    p[: min(T, len(special))] = torch.tensor(special[:T])
    return p[torch.randperm(T, generator=gen)].to(dtype)


def run(gen, T, H, D, R, interleaved, in_place=False, x_dtype=ip.float32, out_dtype=None, scaling=1.0,
        pos_dtype=torch.int64, theta=10000.0):
    out_dtype = out_dtype or x_dtype
    x, x64 = randn(T, H, D, dtype=x_dtype, gen=gen)
    pos = positions(T, gen, pos_dtype)
    inv = hf_inv_freq(R, theta)
    out = x if in_place else ip.Tensor.full((T, H, D), float("nan"), dtype=out_dtype)
    res = ops.rope(x, from_torch(pos), from_torch(inv), R, interleaved=interleaved, attention_scaling=scaling,
                   out=out)
    assert res is out
    ref, mag = rope_ref(x64, pos, inv, R, interleaved, scaling)
    assert_close(out, ref, mag, out_dtype)


@pytest.mark.parametrize("D,R", [(64, 64), (128, 64), (40, 18), (8, 2), (130, 34), (16, 16)], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in_place"])
def test_rope_modes(simd, gen, D, R, interleaved, in_place):
    """Full and partial rotary (R < D: dims >= R unchanged), widths with and without an 8-lane
    tail, both forms, in place and out of place."""
    run(gen, 7, 3, D, R, interleaved, in_place)


@pytest.mark.parametrize("T,H", [(1, 1), (1, 16), (33, 2), (300, 4)], ids=str)
def test_rope_sizes(simd, gen, T, H):
    """Decode (T = 1), odd T, and 300 x 4 x 64 (over the per-thread threshold: threaded)."""
    run(gen, T, H, 64, 64, False, theta=1e6)
    run(gen, T, H, 64, 32, True, in_place=True)


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rope_dtypes(simd, gen, x_dtype, interleaved):
    """Every x/out dtype mix, int32 and int64 positions, and a YaRN-like attention scaling."""
    for out_dtype in FLOAT_DTYPES:
        run(gen, 5, 3, 48, 32, interleaved, x_dtype=x_dtype, out_dtype=out_dtype, scaling=1.3,
            pos_dtype=torch.int32)
    run(gen, 5, 3, 48, 48, interleaved, in_place=True, x_dtype=x_dtype, scaling=0.75)


@pytest.mark.parametrize("kind", ["x_transposed", "x_head_slice", "x_sliced", "out_strided", "in_place_strided",
                                  "pos_strided", "inv_strided"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rope_layouts(simd, gen, kind, interleaved):
    T, H, D, R = 6, 4, 40, 24
    x, x64 = randn(T, H, D, gen=gen)
    pos = positions(T, gen)
    inv = hf_inv_freq(R)
    pos_t, inv_t = from_torch(pos), from_torch(inv)
    out = ip.Tensor.full((T, H, D), float("nan"))
    if kind == "x_transposed":  # last-dim stride H: stored as [T, D, H]
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "x_head_slice":  # the q heads of a fused qkv projection [T, 3H, D]
        qkv = ip.Tensor.zeros(T, 3 * H, D)
        qkv[:, :H, :] = x
        x = qkv[:, :H, :]
    elif kind == "x_sliced":
        x = strided(x, "sliced")
    elif kind == "out_strided":
        out = ip.Tensor.full((T, D, H), float("nan")).transpose(1, 2)
    elif kind == "in_place_strided":
        x = strided(x, "sliced")
        out = x
    elif kind == "pos_strided":
        wide = ip.Tensor.zeros(2 * T, dtype=ip.int64)
        pos_t = wide[::2]
        pos_t.copy_(from_torch(pos))
    elif kind == "inv_strided":
        wide = ip.Tensor.zeros(R, dtype=ip.float32)
        inv_t = wide[1::2]
        inv_t.copy_(from_torch(inv))
    ops.rope(x, pos_t, inv_t, R, interleaved=interleaved, out=out)
    ref, mag = rope_ref(x64, pos, inv, R, interleaved, 1.0)
    assert_close(out, ref, mag, ip.float32)


def test_rope_simd_paths_agree(gen):
    """No FMA in the rotation: the AVX2 and scalar paths give the same bits."""
    if runtime.simd_level(detected=True) == "scalar":
        pytest.skip("no vector path on this CPU")
    x, _ = randn(9, 5, 72, dtype=ip.bfloat16, gen=gen)
    pos, inv = from_torch(positions(9, gen)), from_torch(hf_inv_freq(56))
    before = runtime.simd_level()
    fast = [to_torch(ops.rope(x, pos, inv, 56, interleaved=i, attention_scaling=1.1)) for i in (False, True)]
    runtime.set_simd_level("scalar")
    try:
        slow = [to_torch(ops.rope(x, pos, inv, 56, interleaved=i, attention_scaling=1.1)) for i in (False, True)]
    finally:
        runtime.set_simd_level(before)
    for a, b in zip(fast, slow):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_rope_empty():
    inv = from_torch(hf_inv_freq(8))
    x = ip.Tensor.zeros(0, 2, 8)
    assert ops.rope(x, ip.Tensor.zeros(0, dtype=ip.int64), inv).shape == (0, 2, 8)
    x = ip.Tensor.zeros(3, 0, 8)
    assert ops.rope(x, ip.Tensor.zeros(3, dtype=ip.int32), inv).shape == (3, 0, 8)


def test_rope_errors():
    T, H, D = 3, 2, 8
    x, out = ip.Tensor.zeros(T, H, D), ip.Tensor.zeros(T, H, D)
    pos, inv = ip.Tensor.zeros(T, dtype=ip.int64), ip.Tensor.zeros(D // 2)
    for args, name in [((None, x, pos, inv), "out"), ((out, None, pos, inv), "x"), ((out, x, None, inv), "positions"),
                       ((out, x, pos, None), "inv_freq")]:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_rope: {name} is NULL"):
            c_rope(*args, D)
    with pytest.raises(ip.DTypeError, match="to_rope: positions has dtype float32, expected one of: int32, int64"):
        c_rope(out, x, ip.Tensor.zeros(T), inv, D)
    with pytest.raises(ip.DTypeError, match="to_rope: inv_freq has dtype bfloat16, expected one of: float32$"):
        c_rope(out, x, pos, ip.Tensor.zeros(D // 2, dtype=ip.bfloat16), D)
    with pytest.raises(ip.DTypeError, match="to_rope: x has dtype int32"):
        c_rope(out, ip.Tensor.zeros(T, H, D, dtype=ip.int32), pos, inv, D)
    with pytest.raises(ip.DTypeError, match="to_rope: out has dtype int64"):
        c_rope(ip.Tensor.zeros(T, H, D, dtype=ip.int64), x, pos, inv, D)
    with pytest.raises(ip.ShapeError, match=r"to_rope: x \[T, H, D\] must have 3 dimensions, got 2"):
        c_rope(ip.Tensor.zeros(T, D), ip.Tensor.zeros(T, D), pos, inv, D)
    with pytest.raises(ip.ShapeError, match=r"to_rope: positions \[T\] must have 1 dimensions, got 2"):
        c_rope(out, x, ip.Tensor.zeros(T, 1, dtype=ip.int64), inv, D)
    with pytest.raises(ip.ShapeError, match=r"to_rope: out has shape \[3, 2, 6\] but x has shape \[3, 2, 8\]"):
        c_rope(ip.Tensor.zeros(T, H, 6), x, pos, inv, D)
    with pytest.raises(ip.ShapeError, match="to_rope: positions has 4 entries but x has T = 3 tokens"):
        c_rope(out, x, ip.Tensor.zeros(4, dtype=ip.int64), inv, D)
    for R in [0, -2, 7, 10]:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_rope: rotary_dim must be even and in 1..D = 8, got {R}"):
            c_rope(out, x, pos, inv, R)
    with pytest.raises(ip.ShapeError, match="to_rope: inv_freq has 4 entries, expected rotary_dim / 2 = 3"):
        c_rope(out, x, pos, inv, 6)
    with pytest.raises(ip.InvalidArgumentError, match="to_rope: interleaved must be 0 or 1, got 2"):
        c_rope(out, x, pos, inv, D, 2)
    for s in [float("nan"), float("inf")]:
        with pytest.raises(ip.InvalidArgumentError, match="to_rope: attention_scaling must be finite"):
            c_rope(out, x, pos, inv, D, 0, s)
    small = ip.Tensor.zeros(4)
    with pytest.raises(ip.BoundsError, match="to_rope: x needs 192 bytes"):
        c_rope(out, ip.Tensor(small.storage, (T, H, D), (H * D, D, 1), ip.float32), pos, inv, D)
    with pytest.raises(ip.BoundsError, match="to_rope: positions needs 24 bytes"):
        c_rope(out, x, ip.Tensor(small.storage, (T,), (1,), ip.int64), inv, D)
    buf = ip.Tensor.zeros(T * H * D + 1)
    with pytest.raises(ip.InvalidArgumentError, match="to_rope: out overlaps x in memory but is not the same view"):
        c_rope(buf[1:].view(T, H, D), buf[:-1].view(T, H, D), pos, inv, D)
    with pytest.raises(ip.InvalidArgumentError, match="to_rope: out overlaps inv_freq"):
        c_rope(buf[:-1].view(T, H, D), x, pos, buf[:4], D)
    with pytest.raises(ip.InvalidArgumentError, match="to_rope: out is written but some of its elements share memory"):
        c_rope(ip.Tensor.zeros(H, D).expand(T, H, D), x, pos, inv, D)
    cuda = ip.lib.TO_CUDA
    with pytest.raises(ip.DeviceError, match="to_rope: tensors are on different devices"):
        check(ip.lib.to_rope(out._desc, x._desc, with_device(pos, cuda), inv._desc, D, 0, 1.0))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_rope(*(with_device(t, cuda) for t in (out, x, pos, inv)), D, 0, 1.0))


def with_device(t, device, index=63):
    """A copy of t's descriptor claiming another device (the data pointer is never used)."""
    d = ip.ffi.new("to_tensor *")
    d[0] = t._desc[0]
    d.device, d.device_index = device, index
    return d


# ============================================================================ rms_norm_rope
# to_rms_norm_rope: per-head RMSNorm then the rotation, the normalised head kept in f32.
#
# Exact: it must equal to_rms_norm into an f32 tensor followed by to_rope into out, bit for bit
# (same sum of squares, same rinv, same (v * rinv) * w, same rotation), for every dtype mix and
# on both SIMD paths. With the intermediate in x's dtype (what an unfused f16/bf16 model does) it
# differs by that one rounding: |y err| <= u_x |y| moves each output by at most u_x mag, and both
# results are rounded into out (u_out |ref| each).
#
# Against float64 (y = x / sqrt(mean(x^2) + eps) * w, then rope_ref on y): the norm is within 4u
# relative (test_norm.py's bound), which the rotation carries as 4u mag; with the rotation's own
# 6u mag, 10u mag in all, plus the rounding into out.
#


def c_norm_rope(out, x, w, eps, pos, inv, R, interleaved=0, scaling=1.0):
    check(ip.lib.to_rms_norm_rope(null(out), null(x), null(w), eps, null(pos), null(inv), R, interleaved, scaling))


def rms64(x64, w64, eps):
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * w64


def bits(t):
    tt = to_torch(t)
    return tt.view(torch.int32 if tt.dtype == torch.float32 else torch.int16)


def unfused(x, w, eps, pos, inv, R, interleaved, scaling, out_dtype, mid_dtype=ip.float32):
    """rms_norm into a mid_dtype tensor, then rope into a new out_dtype tensor."""
    y = ops.rms_norm(x, w, eps, out=ip.Tensor.empty(x.shape, dtype=mid_dtype))
    return ops.rope(y, pos, inv, R, interleaved=interleaved, attention_scaling=scaling,
                    out=ip.Tensor.empty(x.shape, dtype=out_dtype))


def norm_rope_case(gen, T, H, D, R, interleaved, x_dtype=ip.float32, w_dtype=ip.float32, out_dtype=None,
                   scaling=1.0, pos_dtype=torch.int64, eps=1e-6, in_place=False):
    """The fused op on random data, checked bit for bit against the unfused pair and within the
    float64 bound; returns (x, w, pos, inv, out) for further checks."""
    out_dtype = out_dtype or x_dtype
    x, x64 = randn(T, H, D, dtype=x_dtype, gen=gen, scale=3.0)
    w, w64 = randn(D, dtype=w_dtype, gen=gen)
    p = positions(T, gen, pos_dtype)
    pos, inv = from_torch(p), from_torch(hf_inv_freq(R))
    want = unfused(x, w, eps, pos, inv, R, interleaved, scaling, out_dtype)
    if in_place:
        out = x.clone()
        res = ops.rms_norm_rope(out, w, eps, pos, inv, interleaved, R, scaling, out=out)
    else:
        out = ip.Tensor.full((T, H, D), float("nan"), dtype=out_dtype)
        res = ops.rms_norm_rope(x, w, eps, pos, inv, interleaved, R, scaling, out=out)
    assert res is out
    assert torch.equal(bits(out), bits(want)), "fused differs from rms_norm (f32) + rope"
    ref, mag = rope_ref(rms64(x64, w64, eps), p, hf_inv_freq(R), R, interleaved, scaling)
    got = to_torch(out).to(torch.float64)
    acc = 10 * U32 * mag
    assert_within(got, ref, acc + U_OUT[out_dtype] * (ref.abs() + acc) + TINY_OUT[out_dtype])
    return x, w, pos, inv, out


@pytest.mark.parametrize("T,H,D,R", [(7, 3, 64, 64), (5, 5, 128, 64), (3, 1, 18, 6), (9, 7, 130, 34), (1, 1, 2, 2),
                                     (1, 16, 128, 128), (2, 3, 1030, 64), (300, 4, 64, 64)], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rms_norm_rope_shapes(simd, gen, T, H, D, R, interleaved):
    """Odd T and H, D with and without an 8-lane tail, partial rotary (R < D: dims >= R are the
    normalised values), D over the norm's 512-element chunk (the chunked double sum), decode
    (T = 1) and 300 x 4 x 64 (threaded)."""
    norm_rope_case(gen, T, H, D, R, interleaved)


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rms_norm_rope_dtypes(simd, gen, x_dtype, interleaved):
    """Every x / weight / out dtype, int32 and int64 positions, a YaRN-like scaling, in place."""
    for w_dtype in FLOAT_DTYPES:
        for out_dtype in FLOAT_DTYPES:
            norm_rope_case(gen, 5, 3, 48, 32, interleaved, x_dtype, w_dtype, out_dtype, scaling=1.3,
                           pos_dtype=torch.int32)
    norm_rope_case(gen, 5, 3, 48, 48, interleaved, x_dtype, ip.bfloat16, scaling=0.75, in_place=True)
    norm_rope_case(gen, 3, 5, 40, 24, interleaved, x_dtype, x_dtype, in_place=True, eps=0.5)


@pytest.mark.parametrize("x_dtype", [ip.float16, ip.bfloat16], ids=lambda d: NAMES[d])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rms_norm_rope_vs_rounded_intermediate(simd, gen, x_dtype, interleaved):
    """What an unfused f16/bf16 model computes (the normalised q rounded to x's dtype before the
    rope) is within that one rounding; dims >= R see the same single rounding: equal."""
    T, H, D, R, s = 6, 5, 96, 64, 1.2
    x, _ = randn(T, H, D, dtype=x_dtype, gen=gen, scale=2.0)
    w, _ = randn(D, dtype=x_dtype, gen=gen)
    pos, inv = from_torch(positions(T, gen)), from_torch(hf_inv_freq(R))
    got = ops.rms_norm_rope(x, w, 1e-6, pos, inv, interleaved, R, s)
    rounded = to_torch(unfused(x, w, 1e-6, pos, inv, R, interleaved, s, x_dtype, mid_dtype=x_dtype)).double()
    y = to_torch(ops.rms_norm(x, w, 1e-6, out=ip.Tensor.empty((T, H, D)))).double()
    yr, half = y[..., :R], R // 2
    a, b = (yr[..., 0::2], yr[..., 1::2]) if interleaved else (yr[..., :half], yr[..., half:])
    mag = torch.cat([a.abs() + b.abs()] * 2, -1) * s
    g = to_torch(got).double()
    u = U_OUT[x_dtype]
    assert_within(g[..., :R], rounded[..., :R], u * mag + 2 * u * g[..., :R].abs() + TINY_OUT[x_dtype])
    assert torch.equal(bits(got)[..., R:], to_torch(ops.rms_norm(x, w, 1e-6)).view(torch.int16)[..., R:])
    assert not torch.equal(bits(got), to_torch(ops.rms_norm(x, w, 1e-6)).view(torch.int16))  # it did rotate


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in_place"])
def test_rms_norm_rope_qkv_views(simd, gen, interleaved, in_place):
    """q and k as head slices of a fused qkv projection [T, (Hq + 2 Hkv) D] (row stride
    (Hq + 2 Hkv) D, k at an offset), the way Qwen3's attention calls it; in place leaves v and
    the other projection untouched."""
    T, Hq, Hkv, D = 5, 6, 2, 64
    qkv, _ = randn(T, (Hq + 2 * Hkv) * D, dtype=ip.bfloat16, gen=gen)
    before = to_torch(qkv).clone()
    heads = qkv.view(T, Hq + 2 * Hkv, D)
    q, k = heads[:, :Hq], heads[:, Hq:Hq + Hkv]
    assert q.strides == ((Hq + 2 * Hkv) * D, D, 1)
    pos, inv = from_torch(positions(T, gen, torch.int32)), from_torch(hf_inv_freq(D))
    wq, _ = randn(D, dtype=ip.bfloat16, gen=gen)
    wk, _ = randn(D, dtype=ip.bfloat16, gen=gen)
    want_q = unfused(q.contiguous(), wq, 1e-6, pos, inv, D, interleaved, 1.0, ip.bfloat16)
    want_k = unfused(k.contiguous(), wk, 1e-6, pos, inv, D, interleaved, 1.0, ip.bfloat16)
    if in_place:
        ops.rms_norm_rope(q, wq, 1e-6, pos, inv, interleaved, out=q)
        ops.rms_norm_rope(k, wk, 1e-6, pos, inv, interleaved, out=k)
        got_q, got_k = q, k
        after = to_torch(qkv).view(T, Hq + 2 * Hkv, D)
        assert torch.equal(after[:, Hq + Hkv:].view(torch.int16),
                           before.view(T, Hq + 2 * Hkv, D)[:, Hq + Hkv:].view(torch.int16))
    else:
        got_q = ops.rms_norm_rope(q, wq, 1e-6, pos, inv, interleaved)
        got_k = ops.rms_norm_rope(k, wk, 1e-6, pos, inv, interleaved)
        assert torch.equal(to_torch(qkv).view(torch.int16), before.view(torch.int16))
    assert torch.equal(bits(got_q), bits(want_q))
    assert torch.equal(bits(got_k), bits(want_k))


@pytest.mark.parametrize("kind", ["x_transposed", "x_sliced", "out_strided", "in_place_strided", "w_strided",
                                  "w_broadcast", "pos_strided"])
def test_rms_norm_rope_layouts(simd, gen, kind):
    T, H, D, R = 6, 4, 40, 24
    x, _ = randn(T, H, D, gen=gen)
    w, _ = randn(D, gen=gen)
    pos, inv = from_torch(positions(T, gen)), from_torch(hf_inv_freq(R))
    want = unfused(x, w, 1e-5, pos, inv, R, True, 1.0, ip.float32)
    out = ip.Tensor.full((T, H, D), float("nan"))
    if kind == "x_transposed":  # last-dim stride H
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif kind == "x_sliced":
        x = strided(x, "sliced")
    elif kind == "out_strided":
        out = ip.Tensor.full((T, D, H), float("nan")).transpose(1, 2)
    elif kind == "in_place_strided":
        x = strided(x, "sliced")
        out = x
    elif kind == "w_strided":
        wide = ip.Tensor.zeros(2 * D)
        wide[1::2].copy_(w)
        w = wide[1::2]
    elif kind == "w_broadcast":
        w = ip.Tensor.full((1,), 0.625).expand(D)
        want = unfused(x, w, 1e-5, pos, inv, R, True, 1.0, ip.float32)
    elif kind == "pos_strided":
        wide = ip.Tensor.zeros(2 * T, dtype=ip.int64)
        wide[::2].copy_(pos)
        pos = wide[::2]
    assert ops.rms_norm_rope(x, w, 1e-5, pos, inv, True, R, out=out) is out
    assert torch.equal(bits(out), bits(want))


def test_rms_norm_rope_default_rotary_dim_and_zero_rows(gen):
    """rotary_dim defaults to D; a head of zeros stays zero (rinv = 1/sqrt(eps), finite)."""
    x, _ = randn(3, 2, 16, gen=gen)
    x[1, 1, :] = 0.0
    w, _ = randn(16, gen=gen)
    pos, inv = from_torch(positions(3, gen)), from_torch(hf_inv_freq(16))
    got = ops.rms_norm_rope(x, w, 1e-6, pos, inv)
    assert got.shape == (3, 2, 16) and got.dtype == ip.float32
    assert torch.equal(bits(got), bits(unfused(x, w, 1e-6, pos, inv, 16, False, 1.0, ip.float32)))
    assert not to_torch(got)[1, 1].any()


def test_rms_norm_rope_empty():
    inv, w = from_torch(hf_inv_freq(8)), ip.Tensor.zeros(8)
    x = ip.Tensor.zeros(0, 2, 8)
    assert ops.rms_norm_rope(x, w, 1e-6, ip.Tensor.zeros(0, dtype=ip.int64), inv).shape == (0, 2, 8)
    x = ip.Tensor.zeros(3, 0, 8)
    assert ops.rms_norm_rope(x, w, 1e-6, ip.Tensor.zeros(3, dtype=ip.int32), inv).shape == (3, 0, 8)


def test_rms_norm_rope_errors():
    T, H, D = 3, 2, 8
    op = "to_rms_norm_rope"
    x, out, w = ip.Tensor.zeros(T, H, D), ip.Tensor.zeros(T, H, D), ip.Tensor.full((D,), 1.0)
    pos, inv = ip.Tensor.zeros(T, dtype=ip.int64), ip.Tensor.zeros(D // 2)
    for args, name in [((None, x, w, pos, inv), "out"), ((out, None, w, pos, inv), "x"),
                       ((out, x, None, pos, inv), "weight"), ((out, x, w, None, inv), "positions"),
                       ((out, x, w, pos, None), "inv_freq")]:
        o, xx, ww, pp, ii = args
        with pytest.raises(ip.InvalidArgumentError, match=f"{op}: {name} is NULL"):
            c_norm_rope(o, xx, ww, 1e-6, pp, ii, D)
    # the rope's checks, named after this op
    with pytest.raises(ip.DTypeError, match=f"{op}: positions has dtype float32, expected one of: int32, int64"):
        c_norm_rope(out, x, w, 1e-6, ip.Tensor.zeros(T), inv, D)
    with pytest.raises(ip.DTypeError, match=f"{op}: x has dtype int32"):
        c_norm_rope(out, ip.Tensor.zeros(T, H, D, dtype=ip.int32), w, 1e-6, pos, inv, D)
    with pytest.raises(ip.ShapeError, match=rf"{op}: x \[T, H, D\] must have 3 dimensions, got 2"):
        c_norm_rope(ip.Tensor.zeros(T, D), ip.Tensor.zeros(T, D), w, 1e-6, pos, inv, D)
    with pytest.raises(ip.ShapeError, match=rf"{op}: out has shape \[3, 2, 6\] but x has shape \[3, 2, 8\]"):
        c_norm_rope(ip.Tensor.zeros(T, H, 6), x, w, 1e-6, pos, inv, D)
    with pytest.raises(ip.ShapeError, match=f"{op}: positions has 4 entries but x has T = 3 tokens"):
        c_norm_rope(out, x, w, 1e-6, ip.Tensor.zeros(4, dtype=ip.int64), inv, D)
    for R in [0, 7, 10]:
        with pytest.raises(ip.InvalidArgumentError, match=f"{op}: rotary_dim must be even and in 1..D = 8, got {R}"):
            c_norm_rope(out, x, w, 1e-6, pos, inv, R)
    with pytest.raises(ip.ShapeError, match=f"{op}: inv_freq has 4 entries, expected rotary_dim / 2 = 3"):
        c_norm_rope(out, x, w, 1e-6, pos, inv, 6)
    with pytest.raises(ip.InvalidArgumentError, match=f"{op}: interleaved must be 0 or 1, got 2"):
        c_norm_rope(out, x, w, 1e-6, pos, inv, D, 2)
    with pytest.raises(ip.InvalidArgumentError, match=f"{op}: attention_scaling must be finite"):
        c_norm_rope(out, x, w, 1e-6, pos, inv, D, 0, float("inf"))
    # the norm's checks
    with pytest.raises(ip.DTypeError, match=f"{op}: weight has dtype int32"):
        c_norm_rope(out, x, ip.Tensor.zeros(D, dtype=ip.int32), 1e-6, pos, inv, D)
    with pytest.raises(ip.ShapeError, match=rf"{op}: weight \[d\] must have 1 dimensions, got 3"):
        c_norm_rope(out, x, ip.Tensor.full((1, 1, D), 1.0), 1e-6, pos, inv, D)
    with pytest.raises(ip.ShapeError, match=rf"{op}: weight has 1 rows but x has H = 2 heads"):
        c_norm_rope(out, x, ip.Tensor.full((1, D), 1.0), 1e-6, pos, inv, D)
    with pytest.raises(ip.ShapeError, match=rf"{op}: weight has shape \[6\] but the last dimension of x is 8"):
        c_norm_rope(out, x, ip.Tensor.full((6,), 1.0), 1e-6, pos, inv, D)
    for eps in [-1e-6, float("nan"), float("inf")]:
        with pytest.raises(ip.InvalidArgumentError, match=f"{op}: eps must be finite and >= 0"):
            c_norm_rope(out, x, w, eps, pos, inv, D)
    small = ip.Tensor.zeros(4)
    with pytest.raises(ip.BoundsError, match=f"{op}: weight needs 32 bytes"):
        c_norm_rope(out, x, ip.Tensor(small.storage, (D,), (1,), ip.float32), 1e-6, pos, inv, D)
    # aliasing
    buf = ip.Tensor.zeros(T * H * D + 1)
    with pytest.raises(ip.InvalidArgumentError, match=f"{op}: out overlaps x in memory but is not the same view"):
        c_norm_rope(buf[1:].view(T, H, D), buf[:-1].view(T, H, D), w, 1e-6, pos, inv, D)
    with pytest.raises(ip.InvalidArgumentError, match=f"{op}: out overlaps weight"):
        c_norm_rope(buf[:-1].view(T, H, D), x, buf[:D], 1e-6, pos, inv, D)
    with pytest.raises(ip.InvalidArgumentError, match=f"{op}: out overlaps inv_freq"):
        c_norm_rope(buf[:-1].view(T, H, D), x, w, 1e-6, pos, buf[:4], D)
    with pytest.raises(ip.InvalidArgumentError, match=f"{op}: out is written but some of its elements share memory"):
        c_norm_rope(ip.Tensor.zeros(H, D).expand(T, H, D), x, w, 1e-6, pos, inv, D)
    # devices
    cuda = ip.lib.TO_CUDA
    with pytest.raises(ip.DeviceError, match=f"{op}: tensors are on different devices"):
        check(ip.lib.to_rms_norm_rope(out._desc, x._desc, with_device(w, cuda), 1e-6, pos._desc, inv._desc,
                                      D, 0, 1.0))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_rms_norm_rope(*(with_device(t, cuda) for t in (out, x, w)), 1e-6,
                                      *(with_device(t, cuda) for t in (pos, inv)), D, 0, 1.0))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rms_norm_rope_per_head_weight(device, gen, interleaved):
    """A weight [H, D] normalises each head with its own row: q's and k's heads of a stacked qkv
    product in one call give what two calls with their own [D] weights give (on the CPU and, with
    the `device` fixture, on a GPU)."""
    T, hq, hkv, D = 5, 4, 2, 64
    qkv = from_torch(torch.randn(T, (hq + 2 * hkv) * D, generator=gen)).to(device)
    gq = from_torch(torch.randn(D, generator=gen)).to(device)
    gk = from_torch(torch.randn(D, generator=gen)).to(device)
    pos = ip.tensor([3, 0, 17, 900, 5], dtype=ip.int32).to(device)
    inv = ip.tensor([1.0 / 10000 ** (2 * i / D) for i in range(D // 2)]).to(device)
    heads = qkv.unflatten(1, (hq + 2 * hkv, D))
    stacked = ip.Tensor.empty(hq + hkv, D, device=device)
    ops.copy(stacked.narrow(0, 0, hq), gq.expand(hq, D))
    ops.copy(stacked.narrow(0, hq, hkv), gk.expand(hkv, D))
    got = ops.rms_norm_rope(heads.narrow(1, 0, hq + hkv), stacked, 1e-6, pos, inv, interleaved=interleaved)
    want_q = ops.rms_norm_rope(heads.narrow(1, 0, hq), gq, 1e-6, pos, inv, interleaved=interleaved)
    want_k = ops.rms_norm_rope(heads.narrow(1, hq, hkv), gk, 1e-6, pos, inv, interleaved=interleaved)
    assert torch.equal(to_torch(got)[:, :hq], to_torch(want_q))
    assert torch.equal(to_torch(got)[:, hq:], to_torch(want_k))
    with pytest.raises(ip.ShapeError, match="weight has 5 rows but x has H = 6 heads"):
        ops.rms_norm_rope(heads.narrow(1, 0, hq + hkv), ip.Tensor.zeros(5, D, device=device), 1e-6, pos, inv)
