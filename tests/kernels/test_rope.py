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

from helpers import FLOAT_DTYPES, from_torch, randn, strided, to_torch, assert_within


U32 = 2.0 ** -24
U_OUT = {ip.float32: 0.0, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY_OUT = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}


def null(t):
    return ip.ffi.NULL if t is None else t._desc


def c_rope(out, x, pos, inv, R, interleaved=0, scaling=1.0):
    check(ip.lib.to_rope(null(out), null(x), null(pos), null(inv), R, interleaved, scaling))


def hf_inv_freq(R, theta=10000.0):
    """inv_freq as transformers computes it, in float32 (torch.float32 tensor [R/2])."""
    return 1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.int64).to(torch.float32) / R))


def rope_ref(x64, pos, inv32, R, interleaved, scaling):
    """(reference, magnitude) float64 [T, H, D]; pos a torch int tensor [T], inv32 float32 [R/2]."""
    ang = pos.to(torch.float32)[:, None] * inv32[None, :]  # float32 product, like HF
    emb = torch.cat([ang, ang], -1).to(torch.float64)
    cos, sin = (torch.cos(emb) * scaling)[:, None, :], (torch.sin(emb) * scaling)[:, None, :]
    xr = x64[..., :R]
    if interleaved:
        xr = torch.cat([xr[..., 0::2], xr[..., 1::2]], -1)
    rot = torch.cat([-xr[..., R // 2:], xr[..., :R // 2]], -1)
    ref = torch.cat([xr * cos + rot * sin, x64[..., R:]], -1)
    mag = torch.cat([(xr * cos).abs() + (rot * sin).abs(), x64[..., R:].abs()], -1)
    return ref, mag


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
