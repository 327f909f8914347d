"""to_matmul: out[M, N] = x[M, K] . w[N, K]^T (+ bias[N]), accumulated in float32.

Oracle: torch in float64 on the very values our tensors hold (inputs are drawn in float64 and
rounded to their dtype first, so the inputs are exact and only our arithmetic is measured).

Tolerances (derived, per output element; u = unit roundoff):
  * Accumulation in f32 (u32 = 2^-24) over n = K + 1 terms (K products and the bias). The
    worst-case bound for any summation order, FMA or not, is n * u32 * A with
    A = sum_k |x_k w_k| + |b|. Rounding errors of random data add up like a random walk
    (Higham & Mary, "A new approach to probabilistic rounding error analysis", 2019), giving
    lambda * sqrt(n) * u32 * A with a small lambda; we allow
        acc = min(n, 2 * sqrt(n)) * u32 * A
    (the rigorous bound for tiny K, 2 sqrt(n) beyond). Had the kernel accumulated in bf16 or
    f16, the error would be ~2^-8 A or ~2^-11 A, far outside this.
  * One rounding to out's dtype, to nearest: at most u_out * (|ref| + acc), with u_out = 2^-24
    (f32), 2^-11 (f16), 2^-8 (bf16), plus half the dtype's subnormal spacing for results that
    land in the subnormal range (matters for f16: 2^-25).
So |got - ref| <= acc + u_out * (|ref| + acc) + tiny_out, checked element-wise.

Every test runs on the best SIMD path and with the portable scalar path forced (the `simd`
fixture in conftest.py; the scalar path has the same semantics, a different summation order).
"""
import math

import pytest
import torch

import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, from_torch, randn, strided, to_torch, assert_within

U32 = 2.0 ** -24
U_OUT = {ip.float32: 2.0 ** -24, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY_OUT = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}
DTYPE_COMBOS = [(x, w, o) for x in FLOAT_DTYPES for w in FLOAT_DTYPES for o in FLOAT_DTYPES]


def c_matmul(out, x, w, bias=None):
    """The C function itself, with None passed as NULL."""
    check(ip.lib.to_matmul(*(ip.ffi.NULL if t is None else t._desc for t in (out, x, w, bias))))


def reference(x64, w64, b64):
    """(exact result, A = sum |x w| + |b|), both float64 [M, N]."""
    ref = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if b64 is not None:
        ref, mag = ref + b64, mag + b64.abs()
    return ref, mag


def assert_close(out, ref, mag, K, out_dtype):
    got = to_torch(out).to(torch.float64)
    assert got.shape == ref.shape
    n = K + 1
    acc = min(n, 2.0 * math.sqrt(n)) * U32 * mag
    tol = acc + U_OUT[out_dtype] * (ref.abs() + acc) + TINY_OUT[out_dtype]
    assert_within(got, ref, tol)


def run_case(gen, M, K, N, x_dtype, w_dtype, out_dtype, with_bias, x_kind="contiguous"):
    x, x64 = make_x(gen, M, K, x_dtype, x_kind)
    w, w64 = randn(N, K, dtype=w_dtype, gen=gen)
    b, b64 = randn(N, dtype=w_dtype, gen=gen) if with_bias else (None, None)
    out = ip.Tensor.full((M, N), float("nan"), dtype=out_dtype)  # every element must be written
    c_matmul(out, x, w, b)
    ref, mag = reference(x64, w64, b64)
    assert_close(out, ref, mag, K, out_dtype)


def make_x(gen, M, K, dtype, kind):
    """x [M, K] in the given layout, and its float64 values."""
    if kind == "contiguous":
        return randn(M, K, dtype=dtype, gen=gen)
    if kind in ("transposed", "sliced"):  # column-major; every other column of a wider buffer
        x, x64 = randn(M, K, dtype=dtype, gen=gen)
        return strided(x, kind), x64
    if kind == "rows":  # every third row of a taller buffer
        big, big64 = randn(3 * M, K, dtype=dtype, gen=gen)
        return big[::3], big64[::3]
    if kind == "broadcast_rows":  # one row repeated: stride 0 over M
        row, row64 = randn(1, K, dtype=dtype, gen=gen)
        return row.expand(M, K), row64.expand(M, K)
    if kind == "broadcast_cols":  # one value per row: stride 0 over K
        col, col64 = randn(M, 1, dtype=dtype, gen=gen)
        return col.expand(M, K), col64.expand(M, K)
    raise ValueError(kind)


# ---- numerics ----

SIZES_M = (1, 2, 3, 7, 9, 33, 130, 520)
SIZES_K = (1, 7, 33, 1031)
SIZES_N = (1, 7, 33, 1029)
SHAPES = [(M, K, N) for M in SIZES_M for K in SIZES_K for N in SIZES_N]


@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"M{M}-K{K}-N{N}" for M, K, N in SHAPES])
def test_shapes(simd, gen, M, K, N):
    """Odd sizes on both sides of every blocking edge (GEMV up to 8 rows in groups of 4, GEMM
    from 9 rows in 6x16 tiles, 8-wide vectors, K blocks of up to 256, N blocks of 256), with the
    dtype combination and bias rotating over the cases."""
    i = SHAPES.index((M, K, N))
    x_dtype, w_dtype, out_dtype = DTYPE_COMBOS[(7 * i) % len(DTYPE_COMBOS)]
    run_case(gen, M, K, N, x_dtype, w_dtype, out_dtype, with_bias=i % 2 == 0)


@pytest.mark.parametrize("M", [3, 37], ids=["gemv", "gemm"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("x_dtype,w_dtype,out_dtype", DTYPE_COMBOS,
                         ids=[f"x{NAMES[x]}-w{NAMES[w]}-o{NAMES[o]}" for x, w, o in DTYPE_COMBOS])
def test_dtypes(simd, gen, M, with_bias, x_dtype, w_dtype, out_dtype):
    """Every dtype combination of x, w and out, with and without a bias."""
    run_case(gen, M, 300, 45, x_dtype, w_dtype, out_dtype, with_bias)


def test_many_rows_in_chunks(simd, gen):
    """Enough rows that the GEMM packs x in two chunks (768 rows at most per chunk), with K
    over a dozen blocks."""
    run_case(gen, 800, 3000, 40, ip.bfloat16, ip.bfloat16, ip.float32, with_bias=True)


@pytest.mark.parametrize("M", [2, 37], ids=["gemv", "gemm"])
@pytest.mark.parametrize("kind", ["transposed", "sliced", "rows", "broadcast_rows", "broadcast_cols"])
def test_strided_x(simd, gen, M, kind):
    run_case(gen, M, 70, 50, ip.bfloat16, ip.bfloat16, ip.float32, with_bias=True, x_kind=kind)


@pytest.mark.parametrize("M", [3, 40], ids=["gemv", "gemm"])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_out_row_slice(simd, gen, M, out_dtype):
    """out as columns [3, 3 + N) of a wider buffer: rows N + 8 apart. The columns around it
    keep their values."""
    K, N = 65, 37
    x, x64 = randn(M, K, dtype=ip.float32, gen=gen)
    w, w64 = randn(N, K, dtype=ip.bfloat16, gen=gen)
    b, b64 = randn(N, dtype=ip.float32, gen=gen)
    backing = ip.Tensor.full((M, N + 8), 5.0, dtype=out_dtype)
    out = backing[:, 3:3 + N]
    assert out.strides == (N + 8, 1)
    c_matmul(out, x, w, b)
    ref, mag = reference(x64, w64, b64)
    assert_close(out, ref, mag, K, out_dtype)
    around = to_torch(backing).to(torch.float64)
    assert torch.equal(around[:, :3], torch.full((M, 3), 5.0, dtype=torch.float64))
    assert torch.equal(around[:, 3 + N:], torch.full((M, 5), 5.0, dtype=torch.float64))


def test_bias_strided(simd, gen):
    """bias may have any stride (here every other element, and stride 0)."""
    M, K, N = 9, 20, 30
    x, x64 = randn(M, K, dtype=ip.float32, gen=gen)
    w, w64 = randn(N, K, dtype=ip.float32, gen=gen)
    big, big64 = randn(2 * N, dtype=ip.float16, gen=gen)
    for b, b64 in [(big[::2], big64[::2]), (big[4:5].expand(N), big64[4:5].expand(N))]:
        out = ip.Tensor.empty(M, N)
        c_matmul(out, x, w, b)
        ref, mag = reference(x64, w64, b64)
        assert_close(out, ref, mag, K, ip.float32)


@pytest.mark.parametrize("M", [1, 5, 9, 200])
def test_nan_stays_in_its_row_and_column(simd, gen, M):
    """A NaN in x spoils only its output row; a NaN in w only its output column (zero padding
    inside the kernels must not spread it)."""
    K, N = 40, 35
    xt = torch.randn(M, K, generator=gen, dtype=torch.float64)
    wt = torch.randn(N, K, generator=gen, dtype=torch.float64)
    xt[M - 1, 3] = float("nan")
    wt[N - 1, 5] = float("nan")
    out = ip.Tensor.empty(M, N)
    c_matmul(out, from_torch(xt.float()), from_torch(wt.float()))
    nan = to_torch(out).isnan()
    expect = torch.zeros(M, N, dtype=torch.bool)
    expect[M - 1, :] = True
    expect[:, N - 1] = True
    assert torch.equal(nan, expect)


@pytest.mark.parametrize("M", [1, 3, 300])
def test_same_bits_for_any_thread_count(gen, M):
    """Each output element is summed in the same order whichever thread computes it."""
    K, N = 333, 777
    x, _ = randn(M, K, dtype=ip.bfloat16, gen=gen)
    w, _ = randn(N, K, dtype=ip.bfloat16, gen=gen)
    before = ip.num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            ip.set_num_threads(n)
            out = ip.Tensor.empty(M, N)
            c_matmul(out, x, w)
            results.append(to_torch(out))
    finally:
        ip.set_num_threads(before)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_python_wrapper(gen):
    """ops.matmul flattens leading dimensions and allocates out in x's dtype (or out_dtype)."""
    x, x64 = randn(2, 3, 16, dtype=ip.float32, gen=gen)
    w, w64 = randn(24, 16, dtype=ip.bfloat16, gen=gen)
    b, b64 = randn(24, dtype=ip.bfloat16, gen=gen)
    out = ops.matmul(x, w, bias=b)
    assert out.shape == (2, 3, 24) and out.dtype is ip.float32
    ref, mag = reference(x64.reshape(6, 16), w64, b64)
    assert_close(out.view(6, 24), ref, mag, 16, ip.float32)
    out16 = ops.matmul(x, w, out_dtype=ip.bfloat16)
    assert out16.dtype is ip.bfloat16 and out16.shape == (2, 3, 24)


# ---- empty shapes ----

@pytest.mark.parametrize("with_bias", [False, True])
def test_k_zero_gives_bias_or_zero(simd, with_bias):
    M, N = 6, 9
    x, w = ip.Tensor.empty(M, 0), ip.Tensor.empty(N, 0, dtype=ip.bfloat16)
    b = ip.tensor([float(i) for i in range(N)]) if with_bias else None
    out = ip.Tensor.full((M, N), 7.0, dtype=ip.float16)
    c_matmul(out, x, w, b)
    expect = [[float(i) for i in range(N)] if with_bias else [0.0] * N] * M
    assert out.tolist() == expect


def test_m_or_n_zero():
    c_matmul(ip.Tensor.empty(0, 5), ip.Tensor.empty(0, 3), ip.Tensor.zeros(5, 3))
    c_matmul(ip.Tensor.empty(4, 0), ip.Tensor.zeros(4, 3), ip.Tensor.empty(0, 3), ip.Tensor.empty(0))
    assert ops.matmul(ip.Tensor.zeros(0, 8), ip.Tensor.zeros(3, 8)).shape == (0, 3)


# ---- errors ----

def make(M=4, K=8, N=5):
    return ip.Tensor.empty(M, N), ip.Tensor.zeros(M, K), ip.Tensor.zeros(N, K), ip.Tensor.zeros(N)


@pytest.mark.parametrize("which", ["out", "x", "w", "bias"])
@pytest.mark.parametrize("dtype", [ip.int32, ip.int8, ip.int64, ip.uint8])
def test_wrong_dtype(which, dtype):
    args = dict(zip(("out", "x", "w", "bias"), make()))
    t = args[which]
    args[which] = ip.Tensor.zeros(*t.shape, dtype=dtype)
    with pytest.raises(ip.DTypeError, match=rf"to_matmul: {which} has dtype {dtype.name}, expected one of: "
                                           r"float32, float16, bfloat16"):
        c_matmul(args["out"], args["x"], args["w"], args["bias"])


def test_wrong_shapes():
    out, x, w, b = make(M=4, K=8, N=5)
    with pytest.raises(ip.ShapeError, match=r"to_matmul: x is \[4, 8\] but w is \[5, 9\]: the inner dimensions"):
        c_matmul(out, x, ip.Tensor.zeros(5, 9), b)
    with pytest.raises(ip.ShapeError, match=r"to_matmul: out has shape \[4, 6\], expected \[M, N\] = \[4, 5\]"):
        c_matmul(ip.Tensor.empty(4, 6), x, w, b)
    with pytest.raises(ip.ShapeError, match=r"to_matmul: out has shape \[3, 5\], expected \[M, N\] = \[4, 5\]"):
        c_matmul(ip.Tensor.empty(3, 5), x, w, b)
    with pytest.raises(ip.ShapeError, match=r"to_matmul: bias has shape \[4\], expected \[N\] = \[5\]"):
        c_matmul(out, x, w, ip.Tensor.zeros(4))


def test_wrong_rank():
    out, x, w, b = make(M=4, K=8, N=5)
    with pytest.raises(ip.ShapeError, match=r"to_matmul: x \[M, K\] must have 2 dimensions, got 3"):
        c_matmul(out, ip.Tensor.zeros(2, 2, 8), w, b)
    with pytest.raises(ip.ShapeError, match=r"to_matmul: x \[M, K\] must have 2 dimensions, got 1"):
        c_matmul(out, ip.Tensor.zeros(8), w, b)
    with pytest.raises(ip.ShapeError, match=r"to_matmul: w \[N, K\] must have 2 dimensions, got 3"):
        c_matmul(out, x, ip.Tensor.zeros(1, 5, 8), b)
    with pytest.raises(ip.ShapeError, match=r"to_matmul: out \[M, N\] must have 2 dimensions, got 1"):
        c_matmul(ip.Tensor.empty(20), x, w, b)
    with pytest.raises(ip.ShapeError, match=r"to_matmul: bias \[N\] must have 1 dimensions, got 2"):
        c_matmul(out, x, w, ip.Tensor.zeros(1, 5))


def test_bad_strides():
    out, x, w, b = make(M=4, K=8, N=5)
    with pytest.raises(ip.InvalidArgumentError, match="to_matmul: w must have unit stride in its last "
                                                      "dimension, got stride 5"):
        c_matmul(out, x, strided(w, "transposed"), b)
    with pytest.raises(ip.InvalidArgumentError, match="to_matmul: w must have unit stride .* got stride 2"):
        c_matmul(out, x, strided(w, "sliced"), b)
    with pytest.raises(ip.InvalidArgumentError, match="to_matmul: out must have unit stride in its last "
                                                      "dimension, got stride 4"):
        c_matmul(ip.Tensor.empty(5, 4).T, x, w, b)
    with pytest.raises(ip.InvalidArgumentError, match=r"to_matmul: out rows overlap \(row stride 0 < N = 5\)"):
        c_matmul(ip.Tensor.empty(1, 5).expand(4, 5), x, w, b)
    # out is written while the inputs are read: sharing memory with any of them is refused
    shared = ip.Tensor.zeros(4, 8)
    with pytest.raises(ip.InvalidArgumentError, match="to_matmul: out overlaps x in memory"):
        c_matmul(shared[:, :5], shared, w, b)
    with pytest.raises(ip.InvalidArgumentError, match="to_matmul: out overlaps w in memory"):
        c_matmul(ip.Tensor(w.storage, (4, 5), (8, 1), w.dtype), x, w, b)
    # a stride does not matter along a dimension of one element
    c_matmul(ip.Tensor.empty(4, 1), x, ip.Tensor(w.storage, (1, 8), (99, 1), w.dtype))
    c_matmul(ip.Tensor.empty(4, 1), ip.Tensor.zeros(4, 1), ip.Tensor(w.storage, (1, 1), (0, 7), w.dtype))


def test_bad_buffers_and_null():
    out, x, w, b = make(M=4, K=8, N=5)
    small = ip.Tensor.empty(10)
    with pytest.raises(ip.BoundsError, match="to_matmul: w needs 160 bytes for its shape and strides but "
                                             "its buffer holds 40"):
        c_matmul(out, x, ip.Tensor(small.storage, (5, 8), (8, 1), ip.float32), b)
    with pytest.raises(ip.BoundsError, match="to_matmul: x needs 128 bytes"):
        c_matmul(out, ip.Tensor(small.storage, (4, 8), (8, 1), ip.float32), w, b)
    with pytest.raises(ip.BoundsError, match="to_matmul: out needs 80 bytes"):
        c_matmul(ip.Tensor(small.storage, (4, 5), (5, 1), ip.float32), x, w, b)
    with pytest.raises(ip.BoundsError, match="to_matmul: bias needs"):
        c_matmul(out, x, w, ip.Tensor(small.storage, (5,), (3,), ip.float32))
    for args, name in [((None, x, w), "out"), ((out, None, w), "x"), ((out, x, None), "w")]:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_matmul: {name} is NULL"):
            c_matmul(*args)


def with_device(t, device, index=63):
    """A copy of t's descriptor claiming another device (the data pointer is never used)."""
    d = ip.ffi.new("to_tensor *")
    d[0] = t._desc[0]
    d.device, d.device_index = device, index
    return d


def test_devices():
    out, x, w, b = make()
    cuda = ip.lib.TO_CUDA
    with pytest.raises(ip.DeviceError, match="to_matmul: tensors are on different devices"):
        check(ip.lib.to_matmul(out._desc, x._desc, with_device(w, cuda), ip.ffi.NULL))
    with pytest.raises(ip.DeviceError, match="to_matmul: tensors are on different devices"):
        check(ip.lib.to_matmul(out._desc, x._desc, w._desc, with_device(b, cuda)))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_matmul(*(with_device(t, cuda) for t in (out, x, w, b))))
    with pytest.raises(ip.DeviceError, match="to_matmul: out has unknown device 7"):
        check(ip.lib.to_matmul(with_device(out, 7), x._desc, w._desc, ip.ffi.NULL))
