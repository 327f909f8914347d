"""to_rms_norm and to_add_rms_norm.

Oracle: torch in float64 on the very values our tensors hold:
    ref = x / sqrt(mean(x^2) + eps) * weight            (over the last dimension)
and for the fused form, the residual as stored (rounded to its dtype) is what the norm reads.

Tolerances (per output element; u = 2^-24, the f32 unit roundoff):
  * The sum of squares is accumulated in double (relative error ~1e-16 * d, negligible), the
    reciprocal square root is rounded to f32 once (u), then y = (x * rinv) * w takes two f32
    roundings (2u): 3u in all; we allow 4u relative.
  * Rounding into an f16/bf16 out: u_out |ref| more (2^-11 f16, 2^-8 bf16), plus half the f16
    subnormal spacing (2^-25).
  * The fused residual: one f32 add, then (for f16/bf16) one rounding to the residual's dtype:
    u + u_out relative.
to_add_rms_norm must equal to_add followed by to_rms_norm bit for bit (same f32 add, the norm
reading the stored residual), which is tested exactly.

Every numeric test runs on the best SIMD path and the forced scalar path (`simd` fixture).
"""
import pytest
import torch

import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, randn, strided, to_torch, assert_within


U32 = 2.0 ** -24
RTOL = 4 * U32
U_OUT = {ip.float32: 0.0, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY_OUT = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}


def null(t):
    return ip.ffi.NULL if t is None else t._desc


def c_rms_norm(out, x, w, eps):
    check(ip.lib.to_rms_norm(null(out), null(x), null(w), eps))


def c_add_rms_norm(out, r, x, w, eps):
    check(ip.lib.to_add_rms_norm(null(out), null(r), null(x), null(w), eps))


def rms64(x64, w64, eps):
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * w64


def assert_close(out, ref, out_dtype, rtol=RTOL):
    got = to_torch(out).to(torch.float64)
    assert tuple(got.shape) == tuple(ref.shape)
    tol = rtol * ref.abs() + U_OUT[out_dtype] * ref.abs() * (1 + rtol) + TINY_OUT[out_dtype]
    assert_within(got, ref, tol)


def filled(shape, dtype):
    return ip.Tensor.full(shape, float("nan"), dtype=dtype)


def bits(t):
    """The raw bits of our tensor, for exact comparisons."""
    tt = to_torch(t)
    return tt.view(torch.int32 if tt.dtype == torch.float32 else torch.int16)


# ---------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 33), (5, 1031), (3, 4096), (40, 700), (2, 3, 64), (9,)],
                         ids=str)
def test_rms_norm_sizes(simd, gen, shape):
    """Odd widths (vector body + tail), rows wider than one CHUNK (512), 40 x 700 (over the
    per-thread threshold: the threaded path), a 3-d and a 1-d input."""
    x, x64 = randn(*shape, gen=gen, scale=2.0)
    w, w64 = randn(shape[-1], gen=gen)
    out = filled(shape, ip.float32)
    ops.rms_norm(x, w, 1e-6, out=out)
    assert_close(out, rms64(x64, w64, 1e-6), ip.float32)


@pytest.mark.parametrize("dx", FLOAT_DTYPES, ids=lambda d: NAMES[d])
@pytest.mark.parametrize("dw", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_rms_norm_dtypes(simd, gen, dx, dw):
    for do in FLOAT_DTYPES:
        x, x64 = randn(6, 517, dtype=dx, gen=gen)
        w, w64 = randn(517, dtype=dw, gen=gen)
        out = filled((6, 517), do)
        ops.rms_norm(x, w, 1e-5, out=out)
        assert_close(out, rms64(x64, w64, 1e-5), do)


@pytest.mark.parametrize("kind", ["x_transposed", "x_sliced", "x_broadcast", "out_transposed", "out_sliced",
                                  "w_sliced", "w_broadcast", "in_place"])
@pytest.mark.parametrize("dtype", [ip.float32, ip.bfloat16], ids=lambda d: NAMES[d])
def test_rms_norm_layouts(simd, gen, kind, dtype):
    rows, d = 13, 600
    x, x64 = randn(rows, d, dtype=dtype, gen=gen)
    w, w64 = randn(d, dtype=dtype, gen=gen)
    out = filled((rows, d), dtype)
    if kind in ("x_transposed", "x_sliced"):
        x = strided(x, kind[2:])
    elif kind == "x_broadcast":  # one row seen 13 times (stride 0 over rows)
        row, row64 = randn(d, dtype=dtype, gen=gen)
        x, x64 = row.expand(rows, d), row64.expand(rows, d)
    elif kind in ("out_transposed", "out_sliced"):
        out = strided(out, kind[4:])
    elif kind == "w_sliced":
        w = strided(w.view(1, d), "sliced")[0]
    elif kind == "w_broadcast":  # a weight of one value, stride 0
        w, w64 = ip.tensor(0.5, dtype=dtype).expand(d), torch.full((d,), 0.5, dtype=torch.float64)
    elif kind == "in_place":
        out = x
    res = ops.rms_norm(x, w, 1e-6, out=out)
    assert res is out
    assert_close(out, rms64(x64, w64, 1e-6), dtype)


def test_rms_norm_extremes(simd, gen):
    """A zero row gives zeros (eps > 0); huge and tiny rows neither overflow nor underflow (the
    sum of squares is in double: 1e25^2 is beyond f32, 1e-30^2 below it)."""
    x = ip.Tensor.zeros(2, 33)
    w = ip.Tensor.full((33,), 1.0)
    assert to_torch(ops.rms_norm(x, w, 1e-6)).eq(0).all()
    for scale, eps in [(1e25, 1e-6), (1e-30, 0.0), (1e-3, 0.0)]:
        x, x64 = randn(3, 257, gen=gen, scale=scale)
        w, w64 = randn(257, gen=gen)
        assert_close(ops.rms_norm(x, w, eps), rms64(x64, w64, eps), ip.float32)


def test_empty():
    w = ip.Tensor.zeros(5)
    assert ops.rms_norm(ip.Tensor.zeros(0, 5), w, 1e-6).shape == (0, 5)
    assert ops.rms_norm(ip.Tensor.zeros(3, 0), ip.Tensor.zeros(0), 1e-6).shape == (3, 0)
    r = ip.Tensor.zeros(0, 5)
    assert ops.add_rms_norm(r, ip.Tensor.zeros(0, 5), w, 1e-6).shape == (0, 5)


# ---------------------------------------------------------------- add_rms_norm


@pytest.mark.parametrize("dr", FLOAT_DTYPES, ids=lambda d: NAMES[d])
@pytest.mark.parametrize("dx", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_add_rms_norm(simd, gen, dr, dx):
    """Against float64 (the residual's add, then the norm of the stored residual), and bit for bit
    against to_add followed by to_rms_norm."""
    for do, dw in [(dx, dx), (ip.float32, ip.bfloat16), (ip.bfloat16, ip.float32)]:
        shape = (7, 1031)
        r, r64 = randn(*shape, dtype=dr, gen=gen, scale=3.0)
        x, x64 = randn(*shape, dtype=dx, gen=gen)
        w, w64 = randn(shape[-1], dtype=dw, gen=gen)
        r2 = r.clone()
        out = filled(shape, do)
        res = ops.add_rms_norm(r, x, w, 1e-6, out=out)
        assert res is out
        # the residual: one f32 add, rounded to its dtype
        assert_close(r, r64 + x64, dr, rtol=U32)
        # the norm of what was stored
        assert_close(out, rms64(to_torch(r).to(torch.float64), w64, 1e-6), do)
        # exactly add then rms_norm
        ops.add(r2, x, out=r2)
        out2 = ops.rms_norm(r2, w, 1e-6, out=filled(shape, do))
        assert torch.equal(bits(r), bits(r2))
        assert torch.equal(bits(out), bits(out2))


@pytest.mark.parametrize("kind", ["strided", "x_broadcast", "out_is_x", "residual_is_x", "threaded", "3d"])
def test_add_rms_norm_layouts(simd, gen, kind):
    shape = (64, 300) if kind == "threaded" else (2, 5, 40) if kind == "3d" else (9, 130)
    d = shape[-1]
    r, r64 = randn(*shape, dtype=ip.bfloat16, gen=gen)
    x, x64 = randn(*shape, gen=gen)
    w, w64 = randn(d, gen=gen)
    out = filled(shape, ip.float32)
    if kind == "strided":
        r, x, out = strided(r, "transposed"), strided(x, "sliced"), strided(out, "transposed")
    elif kind == "x_broadcast":
        row, row64 = randn(d, gen=gen)
        x, x64 = row.expand(*shape), row64.expand(*shape)
    elif kind == "out_is_x":
        out = x
    elif kind == "residual_is_x":  # residual += residual: doubles it, then the norm
        r, x, x64 = r.to(dtype=ip.float32), None, r64
    r_ref = to_torch(r.clone()).to(torch.float64)
    ops.add_rms_norm(r, r if x is None else x, w, 1e-6, out=out)
    assert_close(r, r_ref + x64, r.dtype, rtol=U32)
    assert_close(out, rms64(to_torch(r).to(torch.float64), w64, 1e-6), ip.float32)


# ---------------------------------------------------------------- errors


def test_rms_norm_errors():
    x, w, out = ip.Tensor.zeros(4, 8), ip.Tensor.zeros(8), ip.Tensor.zeros(4, 8)
    for args, name in [((None, x, w), "out"), ((out, None, w), "x"), ((out, x, None), "weight")]:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_rms_norm: {name} is NULL"):
            c_rms_norm(*args, 1e-6)
    i8 = ip.Tensor.zeros(4, 8, dtype=ip.int8)
    with pytest.raises(ip.DTypeError, match="to_rms_norm: x has dtype int8, expected one of: float32"):
        c_rms_norm(out, i8, w, 1e-6)
    with pytest.raises(ip.DTypeError, match="to_rms_norm: out has dtype int8"):
        c_rms_norm(i8, x, w, 1e-6)
    with pytest.raises(ip.DTypeError, match="to_rms_norm: weight has dtype int32"):
        c_rms_norm(out, x, ip.Tensor.zeros(8, dtype=ip.int32), 1e-6)
    with pytest.raises(ip.ShapeError, match=r"to_rms_norm: weight has shape \[9\] but the last dimension of x is 8"):
        c_rms_norm(out, x, ip.Tensor.zeros(9), 1e-6)
    with pytest.raises(ip.ShapeError, match=r"to_rms_norm: weight \[d\] must have 1 dimensions, got 2"):
        c_rms_norm(out, x, ip.Tensor.zeros(1, 8), 1e-6)
    with pytest.raises(ip.ShapeError, match="to_rms_norm: x must have at least 1 dimension"):
        c_rms_norm(ip.tensor(1.0), ip.tensor(1.0), ip.Tensor.zeros(1), 1e-6)
    with pytest.raises(ip.ShapeError, match=r"to_rms_norm: out has shape \[8, 4\] but x has shape \[4, 8\]"):
        c_rms_norm(ip.Tensor.zeros(8, 4), x, w, 1e-6)
    for eps in [-1e-6, float("nan"), float("inf")]:
        with pytest.raises(ip.InvalidArgumentError, match="to_rms_norm: eps must be finite and >= 0"):
            c_rms_norm(out, x, w, eps)
    small = ip.Tensor.zeros(8)
    with pytest.raises(ip.BoundsError, match="to_rms_norm: x needs 128 bytes"):
        c_rms_norm(out, ip.Tensor(small.storage, (4, 8), (8, 1), ip.float32), w, 1e-6)
    with pytest.raises(ip.BoundsError, match="to_rms_norm: weight needs 32 bytes"):
        c_rms_norm(out, x, ip.Tensor(ip.Tensor.zeros(4).storage, (8,), (1,), ip.float32), 1e-6)
    buf = ip.Tensor.zeros(40)
    with pytest.raises(ip.InvalidArgumentError, match="to_rms_norm: out overlaps x in memory but is not the same view"):
        c_rms_norm(buf[8:].view(4, 8), buf[:32].view(4, 8), w, 1e-6)
    with pytest.raises(ip.InvalidArgumentError, match="to_rms_norm: out overlaps weight"):
        c_rms_norm(buf[:32].view(4, 8), x, buf[24:32], 1e-6)
    with pytest.raises(ip.InvalidArgumentError, match="to_rms_norm: out is written but some of its elements share memory"):
        c_rms_norm(ip.Tensor.zeros(8).expand(4, 8), x, w, 1e-6)
    with pytest.raises(ip.DeviceError, match="to_rms_norm: tensors are on different devices"):
        check(ip.lib.to_rms_norm(out._desc, x._desc, with_device(w, ip.lib.TO_CUDA), 1e-6))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_rms_norm(*(with_device(t, ip.lib.TO_CUDA) for t in (out, x, w)), 1e-6))


def test_add_rms_norm_errors():
    r, x, w, out = ip.Tensor.zeros(4, 8), ip.Tensor.zeros(4, 8), ip.Tensor.zeros(8), ip.Tensor.zeros(4, 8)
    for args, name in [((None, r, x, w), "out"), ((out, None, x, w), "residual"), ((out, r, None, w), "x"),
                       ((out, r, x, None), "weight")]:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_add_rms_norm: {name} is NULL"):
            c_add_rms_norm(*args, 1e-6)
    with pytest.raises(ip.DTypeError, match="to_add_rms_norm: residual has dtype int64"):
        c_add_rms_norm(out, ip.Tensor.zeros(4, 8, dtype=ip.int64), x, w, 1e-6)
    with pytest.raises(ip.ShapeError, match=r"to_add_rms_norm: residual has shape \[4, 8\] but x has shape \[4, 9\]"):
        c_add_rms_norm(out, r, ip.Tensor.zeros(4, 9), w, 1e-6)
    with pytest.raises(ip.ShapeError, match=r"to_add_rms_norm: out has shape \[2, 8\] but residual has shape"):
        c_add_rms_norm(ip.Tensor.zeros(2, 8), r, x, w, 1e-6)
    with pytest.raises(ip.ShapeError, match=r"to_add_rms_norm: weight has shape \[4\]"):
        c_add_rms_norm(out, r, x, ip.Tensor.zeros(4), 1e-6)
    with pytest.raises(ip.InvalidArgumentError, match="to_add_rms_norm: eps must be finite"):
        c_add_rms_norm(out, r, x, w, -1.0)
    with pytest.raises(ip.BoundsError, match="to_add_rms_norm: residual needs 128 bytes"):
        c_add_rms_norm(out, ip.Tensor(ip.Tensor.zeros(3).storage, (4, 8), (8, 1), ip.float32), x, w, 1e-6)
    # residual is written: no broadcast residual, no sharing with out or weight
    with pytest.raises(ip.InvalidArgumentError, match="to_add_rms_norm: residual is written but some of its elements"):
        c_add_rms_norm(out, ip.Tensor.zeros(8).expand(4, 8), x, w, 1e-6)
    with pytest.raises(ip.InvalidArgumentError, match="to_add_rms_norm: out overlaps residual in memory, which this op does not allow"):
        c_add_rms_norm(r, r, x, w, 1e-6)
    buf = ip.Tensor.zeros(40)
    with pytest.raises(ip.InvalidArgumentError, match="to_add_rms_norm: residual overlaps weight"):
        c_add_rms_norm(out, buf[:32].view(4, 8), x, buf[24:32], 1e-6)
    with pytest.raises(ip.InvalidArgumentError, match="to_add_rms_norm: residual overlaps x in memory but is not the same view"):
        c_add_rms_norm(out, buf[:32].view(4, 8), buf[8:].view(4, 8), w, 1e-6)
    with pytest.raises(ip.InvalidArgumentError, match="to_add_rms_norm: out overlaps x in memory but is not"):
        c_add_rms_norm(buf[:32].view(4, 8), r, buf[8:].view(4, 8), w, 1e-6)
    cuda = ip.lib.TO_CUDA
    with pytest.raises(ip.DeviceError, match="to_add_rms_norm: tensors are on different devices"):
        check(ip.lib.to_add_rms_norm(out._desc, with_device(r, cuda), x._desc, w._desc, 1e-6))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_add_rms_norm(*(with_device(t, cuda) for t in (out, r, x, w)), 1e-6))


def with_device(t, device, index=63):
    """A copy of t's descriptor claiming another device (the data pointer is never used)."""
    d = ip.ffi.new("to_tensor *")
    d[0] = t._desc[0]
    d.device, d.device_index = device, index
    return d
