"""to_add, to_mul, to_scale, to_silu_mul, to_softmax.

Oracle: torch in float64 on the very values our tensors hold (inputs are drawn in float64 and
rounded to their dtype first, so only our arithmetic and the output rounding are measured).

Tolerances (per output element; u = unit roundoff, 2^-24 for f32):
  * add, mul, scale: one f32 operation, then one rounding into out's dtype. With an f32 out that
    is a single rounding: |err| <= u |ref|; we allow 2u. The factor of scale is rounded to f32
    first (as torch does), so the reference multiplies by float32(scale).
  * silu_mul: exp (libm's expf on the scalar path, the AVX2 polynomial otherwise, both within
    ~2 ulp), an add, a division and two multiplies: measured worst case ~2.2e-7 relative over
    [-90, 30]; we allow 1e-6 relative (16u). Below z = ln(FLT_MIN) ~ -87.34 the true result is
    a subnormal-ish 1e-36 or less, which the AVX2 exp flushes to 0: absolute 1e-35 covers it.
  * softmax: exp as above per element, the sum in double, one multiply by the rounded 1/sum:
    measured ~1.5e-7 relative; we allow 1e-6 relative, plus u |x - max| for the rounding of the
    f32 subtraction x - max, which shifts the exponent (inherent to any f32 softmax).
  * Rounding into f16/bf16 out: u_out |ref| more, u_out = 2^-11 (f16), 2^-8 (bf16), plus half the
    f16 subnormal spacing (2^-25) for results that land there.
So |got - ref| <= rtol_f32 |ref| + u_out (|ref| + rtol_f32 |ref|) + tiny_out, element-wise.

Every numeric test runs on the best SIMD path and the forced scalar path (`simd` fixture).
"""
import math

import pytest
import torch

import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, from_torch, randn, strided, to_torch


U32 = 2.0 ** -24
U_OUT = {ip.float32: 0.0, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY_OUT = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
RTOL = {"add": 2 * U32, "mul": 2 * U32, "scale": 2 * U32, "silu_mul": 1e-6, "softmax": 1e-6}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}
DTYPE_COMBOS = [(a, b, o) for a in FLOAT_DTYPES for b in FLOAT_DTYPES for o in FLOAT_DTYPES]


def null(t):
    return ip.ffi.NULL if t is None else t._desc


def assert_close(out, ref, out_dtype, rtol, atol=0.0):
    """rtol: a number or a float64 tensor of ref's shape (element-wise relative tolerance)."""
    got = to_torch(out).to(torch.float64)
    assert tuple(got.shape) == tuple(ref.shape)
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan), "NaN in different places"
    inf = ref.isinf()
    assert torch.equal(got[inf], ref[inf]), "infinities differ"
    fin = ~(nan | inf)
    got, ref = got[fin], ref[fin]
    if isinstance(rtol, torch.Tensor):
        rtol = rtol.expand(fin.shape)[fin]
    tol = rtol * ref.abs() + U_OUT[out_dtype] * ref.abs() * (1 + rtol) + TINY_OUT[out_dtype] + atol
    err = (got - ref).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = int(torch.nonzero(bad)[0][0])
        worst = float((err / tol).max())
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} elements outside tolerance; first: got "
                             f"{float(got[i])!r}, expected {float(ref[i])!r}, tol {float(tol[i]):.3g} "
                             f"(worst {worst:.3g}x the tolerance)")


def filled(shape, dtype):
    """An output whose every element must be overwritten (NaN would show through)."""
    return ip.Tensor.full(shape, float("nan"), dtype=dtype)


def silu64(z):
    return z / (1 + torch.exp(-z))


REF = {
    "add": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "silu_mul": lambda a, b: silu64(a) * b,
}
BINARY = {"add": ops.add, "mul": ops.mul, "silu_mul": ops.silu_mul}


# ---------------------------------------------------------------- add / mul / silu_mul


@pytest.mark.parametrize("name", ["add", "mul", "silu_mul"])
def test_binary_dtypes(simd, gen, name):
    """Every input/output dtype mix, on a shape with a vector body and a tail (33 x 37)."""
    for da, db, do in DTYPE_COMBOS:
        a, a64 = randn(33, 37, dtype=da, gen=gen, scale=3.0)
        b, b64 = randn(33, 37, dtype=db, gen=gen)
        out = filled((33, 37), do)
        BINARY[name](a, b, out=out)
        assert_close(out, REF[name](a64, b64), do, RTOL[name])


@pytest.mark.parametrize("name", ["add", "mul", "silu_mul"])
@pytest.mark.parametrize("shape", [(1,), (7,), (33,), (1031,), (3, 1000), (70001,), (5, 3, 257)],
                         ids=str)
def test_binary_sizes(simd, gen, name, shape):
    """Odd sizes: single element, under one vector, over one CHUNK (512), and 70001 elements
    (over the 32768-per-thread threshold, so the threaded flat path runs)."""
    a, a64 = randn(*shape, gen=gen, scale=3.0)
    b, b64 = randn(*shape, gen=gen)
    out = filled(shape, ip.float32)
    BINARY[name](a, b, out=out)
    assert_close(out, REF[name](a64, b64), ip.float32, RTOL[name])


@pytest.mark.parametrize("name", ["add", "mul", "silu_mul"])
@pytest.mark.parametrize("kind_a,kind_b,kind_out", [
    ("transposed", "contiguous", "contiguous"),
    ("sliced", "transposed", "contiguous"),
    ("contiguous", "contiguous", "transposed"),
    ("sliced", "sliced", "sliced"),
])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_binary_strided(simd, gen, name, kind_a, kind_b, kind_out, dtype):
    """Non-contiguous inputs and outputs (the row path), with a 600-wide last dim (> CHUNK)."""
    shape = (9, 600)
    a, a64 = randn(*shape, dtype=dtype, gen=gen, scale=3.0)
    b, b64 = randn(*shape, dtype=dtype, gen=gen)
    if kind_a != "contiguous":
        a = strided(a, kind_a)
    if kind_b != "contiguous":
        b = strided(b, kind_b)
    out = filled(shape, dtype)
    if kind_out != "contiguous":
        out = strided(out, kind_out)
        out.fill_(float("nan"))
    BINARY[name](a, b, out=out)
    assert_close(out, REF[name](a64, b64), dtype, RTOL[name])


@pytest.mark.parametrize("name", ["add", "mul", "silu_mul"])
def test_binary_broadcast(simd, gen, name):
    """Stride-0 inputs: a row vector, a column vector, a 0-d scalar, and a 3-d expand.
    (ops.silu_mul does not broadcast by itself, so the operands are expanded here.)"""
    def run(a, b, shape):
        return BINARY[name](a.expand(*shape), b.expand(*shape))

    a, a64 = randn(17, 45, gen=gen, scale=3.0)
    row, row64 = randn(45, gen=gen)
    col, col64 = randn(17, 1, gen=gen)
    for b, b64 in [(row, row64), (col, col64)]:
        out = run(a, b, (17, 45))
        assert_close(out, REF[name](a64, b64), ip.float32, RTOL[name])
        out = run(b, a, (17, 45))
        assert_close(out, REF[name](b64, a64), ip.float32, RTOL[name])
    out = run(a, ip.tensor(0.75), (17, 45))
    assert_close(out, REF[name](a64, torch.tensor(0.75, dtype=torch.float64)), ip.float32, RTOL[name])
    # both operands broadcast: [4, 1, 45] x [3, 1] -> [4, 3, 45]
    x, x64 = randn(4, 1, 45, gen=gen)
    y, y64 = randn(3, 1, dtype=ip.bfloat16, gen=gen)
    out = run(x, y, (4, 3, 45))
    assert_close(out, REF[name](x64, y64), ip.float32, RTOL[name])


@pytest.mark.parametrize("name", ["add", "mul", "silu_mul"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_binary_in_place(simd, gen, name, dtype):
    """out is exactly a (or b): every element is read before it is written."""
    a, a64 = randn(13, 1029, dtype=dtype, gen=gen, scale=3.0)
    b, b64 = randn(13, 1029, dtype=dtype, gen=gen)
    res = BINARY[name](a, b, out=a)
    assert res is a
    assert_close(a, REF[name](a64, b64), dtype, RTOL[name])
    # in place into the second operand, on a non-contiguous view, with a broadcast first operand
    c, c64 = randn(1029, dtype=dtype, gen=gen, scale=3.0)
    bt = strided(b, "transposed")
    BINARY[name](c.expand(13, 1029), bt, out=bt)
    assert_close(bt, REF[name](c64, b64), dtype, RTOL[name])
    # a and b the same view too: out = op(a, a) in place
    d, d64 = randn(100, dtype=dtype, gen=gen)
    BINARY[name](d, d, out=d)
    assert_close(d, REF[name](d64, d64), dtype, RTOL[name])


def test_binary_simd_paths_agree(gen):
    """add and mul use no FMA and give the same bits on the AVX2 and the scalar path."""
    from inference_pio import runtime
    if runtime.simd_level(detected=True) == "scalar":
        pytest.skip("no vector path on this CPU")
    a, _ = randn(5, 333, gen=gen)
    b, _ = randn(5, 333, dtype=ip.bfloat16, gen=gen)
    before = runtime.simd_level()
    fast = [to_torch(f(a, b)) for f in (ops.add, ops.mul)] + [to_torch(ops.scale(a, 0.1))]
    runtime.set_simd_level("scalar")
    try:
        slow = [to_torch(f(a, b)) for f in (ops.add, ops.mul)] + [to_torch(ops.scale(a, 0.1))]
    finally:
        runtime.set_simd_level(before)
    for x, y in zip(fast, slow):
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))


def test_empty(simd):
    for shape in [(0,), (3, 0), (0, 5)]:
        a = ip.Tensor.empty(shape)
        for f in (ops.add, ops.mul, ops.silu_mul):
            assert f(a, a).shape == shape
        assert ops.scale(a, 2.0).shape == shape
        assert ops.softmax(a).shape == shape


def test_zero_dim(simd):
    a, b = ip.tensor(2.0), ip.tensor(-3.0)
    assert ops.add(a, b).item() == -1.0
    assert ops.mul(a, b).item() == -6.0
    assert ops.scale(a, 0.5).item() == 1.0
    assert ops.softmax(a).item() == 1.0
    assert math.isclose(ops.silu_mul(a, b).item(), -3.0 * 2.0 / (1.0 + math.exp(-2.0)), rel_tol=1e-6)


# ---------------------------------------------------------------- silu: the exp over a wide range


def test_silu_wide_range(simd):
    """silu against float64 from -120 to 120 (exp of every reduced-argument regime, through the
    underflow threshold), then the extremes: no NaN or inf where the result is finite."""
    z64 = torch.linspace(-120.0, 120.0, 240_001, dtype=torch.float64).to(torch.float32).to(torch.float64)
    z = from_torch(z64.to(torch.float32))
    ones = ip.Tensor.full(z.shape, 1.0)
    out = ops.silu_mul(z, ones)
    assert_close(out, silu64(z64), ip.float32, 1e-6, atol=1e-35)

    special = [-100.0, 100.0, -1e4, 1e4, -88.0, -87.0, -1e-30, 1e-30, 0.0, -0.0, 3.4e38, -3.4e38,
               float("inf"), float("-inf"), float("nan")]
    got = ops.silu_mul(ip.tensor(special), ip.Tensor.full((len(special),), 1.0)).tolist()
    expect = {100.0: 100.0, 1e4: 1e4, -1e4: 0.0, 3.4e38: 3.4e38, -3.4e38: 0.0, float("inf"): float("inf")}
    for z_, g in zip(special, got):
        if math.isnan(z_) or z_ == float("-inf"):
            # z / (1 + e^-z) is -inf / inf there: NaN, as in torch
            assert math.isnan(g), (z_, g)
            continue
        assert math.isfinite(g) or z_ == float("inf"), (z_, g)
        if z_ in expect:
            assert math.isclose(g, expect[z_], rel_tol=1e-6, abs_tol=0.0), (z_, g)
        else:
            ref = z_ / (1.0 + math.exp(-z_))
            assert math.isclose(g, ref, rel_tol=1e-6, abs_tol=1e-35), (z_, g, ref)


# ---------------------------------------------------------------- scale


@pytest.mark.parametrize("dx", FLOAT_DTYPES, ids=lambda d: NAMES[d])
@pytest.mark.parametrize("factor", [0.1, -2.5, 1.0 / 3.0, 0.0883883476])
def test_scale(simd, gen, dx, factor):
    f32 = float(torch.tensor(factor, dtype=torch.float32))  # the factor is rounded to f32 first
    for do in FLOAT_DTYPES:
        x, x64 = randn(7, 1001, dtype=dx, gen=gen)
        out = filled((7, 1001), do)
        ops.scale(x, factor, out=out)
        assert_close(out, x64 * f32, do, RTOL["scale"])
    # strided, in place
    xt = strided(x, "sliced")
    ops.scale(xt, factor, out=xt)
    assert_close(xt, x64 * f32, dx, RTOL["scale"])
    # a broadcast input (stride 0 in both dims)
    out = ops.scale(ip.tensor(1.5, dtype=dx).expand(3, 5), factor)
    assert_close(out, torch.full((3, 5), 1.5 * f32, dtype=torch.float64), dx, RTOL["scale"])


def test_scale_extremes():
    x = ip.tensor([1.0, -2.0, 0.0])
    got = ops.scale(x, 1e300).tolist()  # beyond f32: the factor is +inf
    assert got[0] == float("inf") and got[1] == float("-inf") and math.isnan(got[2])
    assert ops.scale(x, -0.0).tolist() == [-0.0, 0.0, -0.0]


# ---------------------------------------------------------------- softmax


def softmax64(x):
    return torch.softmax(x, dim=-1)


def softmax_rtol(x64):
    """RTOL["softmax"] plus the rounding of the f32 subtraction x - max, which is inherent to a
    float32 softmax (torch's does it too): up to u |x - max| absolute in the exponent, so that much
    relative in e^(x - max) (exact by Sterbenz when x and max are within a factor of two)."""
    finite = x64.masked_fill(~x64.isfinite(), 0.0)
    m = finite.max(dim=-1, keepdim=True).values
    return RTOL["softmax"] + U32 * (finite - m).abs()


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 33), (3, 1031), (2, 5000), (70, 513), (1, 40001),
                                   (2, 3, 19)], ids=str)
def test_softmax_sizes(simd, gen, shape):
    """Rows shorter and longer than one CHUNK (512), a vocabulary-sized single row, and 70 rows of
    513 (over the per-thread threshold: the threaded path); scale 8 gives logits far beyond
    e^88, so the max subtraction matters."""
    x, x64 = randn(*shape, gen=gen, scale=8.0)
    out = filled(shape, ip.float32)
    ops.softmax(x, out=out)
    ref = softmax64(x64)
    assert_close(out, ref, ip.float32, softmax_rtol(x64))
    sums = to_torch(out).to(torch.float64).sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dx", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_softmax_dtypes(simd, gen, dx):
    for do in FLOAT_DTYPES:
        x, x64 = randn(9, 777, dtype=dx, gen=gen, scale=4.0)
        out = filled((9, 777), do)
        ops.softmax(x, out=out)
        assert_close(out, softmax64(x64), do, softmax_rtol(x64))


@pytest.mark.parametrize("kind", ["transposed", "sliced", "broadcast", "out_transposed", "in_place"])
def test_softmax_layouts(simd, gen, kind):
    x, x64 = randn(11, 600, gen=gen, scale=4.0)
    out = None
    if kind in ("transposed", "sliced"):
        x = strided(x, kind)
    elif kind == "broadcast":  # one row, expanded to 11 rows by stride 0
        row, row64 = randn(600, gen=gen, scale=4.0)
        x, x64 = row.expand(11, 600), row64.expand(11, 600)
    elif kind == "out_transposed":
        out = strided(filled((11, 600), ip.float32), "transposed")
    elif kind == "in_place":
        out = x
    res = ops.softmax(x, out=out)
    assert_close(res, softmax64(x64), ip.float32, softmax_rtol(x64))


def test_softmax_infinities(simd):
    """Masked rows: -inf entries get exactly 0. A row of only -inf is NaN (every e^(x - max) is
    e^NaN), as torch gives; a NaN or +inf anywhere in the row makes the row NaN, as in torch."""
    inf, nan = float("inf"), float("nan")
    rows = [
        [0.5, -inf, 2.0, -inf, -1.0],
        [-inf, -inf, -inf, -inf, 3.0],
        [-inf] * 5,
        [1.0, nan, 2.0, 0.0, -inf],
        [1.0, inf, 2.0, 0.0, 0.0],
        [-inf, -inf, nan, -inf, -inf],
        [1e30, -1e30, 0.0, 1e30, 5.0],
    ]
    x = ip.tensor(rows)
    ref = softmax64(torch.tensor(rows, dtype=torch.float64))
    got = ops.softmax(x)
    assert_close(got, ref, ip.float32, RTOL["softmax"])
    g = got.tolist()
    assert g[0][1] == 0.0 and g[0][3] == 0.0 and g[1] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert all(math.isnan(v) for v in g[2] + g[3] + g[4] + g[5])
    # a fully masked row among many, long enough to take the vector loops and several chunks
    big = ip.Tensor.full((3, 1500), -inf)
    big[0, 7] = 1.0
    big[2, :] = 0.0
    g = to_torch(ops.softmax(big))
    assert g[0, 7] == 1.0 and float(g[0].sum()) == 1.0
    assert bool(g[1].isnan().all())
    assert torch.allclose(g[2].double(), torch.full((1500,), 1 / 1500, dtype=torch.float64), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- errors


def c_binary(fn, out, a, b):
    check(fn(null(out), null(a), null(b)))


@pytest.mark.parametrize("name", ["to_add", "to_mul", "to_silu_mul"])
def test_binary_errors(name):
    fn = getattr(ip.lib, name)
    an, bn = ("gate", "up") if name == "to_silu_mul" else ("a", "b")
    a, b, out = ip.Tensor.zeros(2, 3), ip.Tensor.zeros(2, 3), ip.Tensor.zeros(2, 3)
    for args, arg in [((None, a, b), "out"), ((out, None, b), an), ((out, a, None), bn)]:
        with pytest.raises(ip.InvalidArgumentError, match=f"{name}: {arg} is NULL"):
            c_binary(fn, *args)
    i32 = ip.Tensor.zeros(2, 3, dtype=ip.int32)
    with pytest.raises(ip.DTypeError, match=f"{name}: {an} has dtype int32, expected one of: float32"):
        c_binary(fn, out, i32, b)
    with pytest.raises(ip.DTypeError, match=f"{name}: {bn} has dtype int32"):
        c_binary(fn, out, a, i32)
    with pytest.raises(ip.DTypeError, match=f"{name}: out has dtype int32"):
        c_binary(fn, i32, a, b)
    with pytest.raises(ip.ShapeError, match=rf"{name}: {an} has shape \[2, 3\] but {bn} has shape \[3, 2\]"):
        c_binary(fn, out, a, ip.Tensor.zeros(3, 2))
    with pytest.raises(ip.ShapeError, match=rf"{name}: out has shape \[6\] but {an} has shape \[2, 3\]"):
        c_binary(fn, ip.Tensor.zeros(6), a, b)
    # a buffer too small for the shape and strides
    small = ip.Tensor.zeros(5)
    with pytest.raises(ip.BoundsError, match=f"{name}: {an} needs 24 bytes"):
        c_binary(fn, out, ip.Tensor(small.storage, (2, 3), (3, 1), ip.float32), b)
    with pytest.raises(ip.BoundsError, match=f"{name}: out needs 24 bytes"):
        c_binary(fn, ip.Tensor(small.storage, (2, 3), (3, 1), ip.float32), a, b)
    # devices
    with pytest.raises(ip.DeviceError, match=f"{name}: tensors are on different devices"):
        check(fn(out._desc, a._desc, with_device(b, ip.lib.TO_CUDA)))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(fn(*(with_device(t, ip.lib.TO_CUDA) for t in (out, a, b))))


@pytest.mark.parametrize("name", ["to_add", "to_mul", "to_silu_mul"])
def test_binary_overlap_errors(name):
    fn = getattr(ip.lib, name)
    buf = ip.Tensor.zeros(20)
    a, b = buf[0:10], ip.Tensor.zeros(10)
    # out shifted by one element against a: a partial overlap
    with pytest.raises(ip.InvalidArgumentError, match=f"{name}: out overlaps .* but is not the same view"):
        c_binary(fn, buf[1:11], a, b)
    # same memory, other dtype (reinterpreting bytes) is not the same view either
    half = ip.Tensor(buf.storage, (10,), (1,), ip.bfloat16)
    with pytest.raises(ip.InvalidArgumentError, match="not the same view"):
        c_binary(fn, half, a, b)
    # a written tensor with a stride-0 dimension would write one element many times
    with pytest.raises(ip.InvalidArgumentError, match=f"{name}: out is written but some of its elements share memory"):
        c_binary(fn, ip.Tensor.zeros(1).expand(10), a, b)
    with pytest.raises(ip.InvalidArgumentError, match="share memory"):
        c_binary(fn, ip.Tensor(buf.storage, (4, 4), (2, 1), ip.float32), ip.Tensor.zeros(4, 4), ip.Tensor.zeros(4, 4))


def test_scale_softmax_errors():
    x, out = ip.Tensor.zeros(4, 5), ip.Tensor.zeros(4, 5)
    with pytest.raises(ip.InvalidArgumentError, match="to_scale: out is NULL"):
        check(ip.lib.to_scale(ip.ffi.NULL, x._desc, 2.0))
    with pytest.raises(ip.InvalidArgumentError, match="to_scale: x is NULL"):
        check(ip.lib.to_scale(out._desc, ip.ffi.NULL, 2.0))
    with pytest.raises(ip.DTypeError, match="to_scale: x has dtype int64"):
        ops.scale(ip.Tensor.zeros(4, 5, dtype=ip.int64), 2.0, out=out)
    with pytest.raises(ip.ShapeError, match=r"to_scale: out has shape \[5, 4\] but x has shape \[4, 5\]"):
        ops.scale(x, 2.0, out=ip.Tensor.zeros(5, 4))
    with pytest.raises(ip.InvalidArgumentError, match="to_softmax: out is NULL"):
        check(ip.lib.to_softmax(ip.ffi.NULL, x._desc))
    with pytest.raises(ip.InvalidArgumentError, match="to_softmax: x is NULL"):
        check(ip.lib.to_softmax(out._desc, ip.ffi.NULL))
    with pytest.raises(ip.DTypeError, match="to_softmax: out has dtype uint8"):
        ops.softmax(x, out=ip.Tensor.zeros(4, 5, dtype=ip.uint8))
    with pytest.raises(ip.ShapeError, match=r"to_softmax: out has shape \[4, 6\]"):
        ops.softmax(x, out=ip.Tensor.zeros(4, 6))
    small = ip.Tensor.zeros(3)
    with pytest.raises(ip.BoundsError, match="to_softmax: x needs 80 bytes"):
        ops.softmax(ip.Tensor(small.storage, (4, 5), (5, 1), ip.float32), out=out)
    buf = ip.Tensor.zeros(21)
    with pytest.raises(ip.InvalidArgumentError, match="to_softmax: out overlaps x"):
        ops.softmax(buf[:20].view(4, 5), out=buf[1:].view(4, 5))
    with pytest.raises(ip.InvalidArgumentError, match="to_scale: out is written but some"):
        ops.scale(x, 2.0, out=ip.Tensor.zeros(5).expand(4, 5))
    cuda = ip.lib.TO_CUDA
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_scale(with_device(out, cuda), with_device(x, cuda), 2.0))
    with pytest.raises(ip.DeviceError, match="to_softmax: tensors are on different devices"):
        check(ip.lib.to_softmax(out._desc, with_device(x, cuda)))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_softmax(with_device(out, cuda), with_device(x, cuda)))


def with_device(t, device, index=63):
    """A copy of t's descriptor claiming another device (the data pointer is never used)."""
    d = ip.ffi.new("to_tensor *")
    d[0] = t._desc[0]
    d.device, d.device_index = device, index
    return d
