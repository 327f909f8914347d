"""to_copy and to_fill: conversions between every pair of dtypes, strided and broadcast views.

The rules checked (tensor_ops.h, csrc/cpu/copy.c, csrc/core/dtype.c):
  - float -> float: round to nearest even, bit-exact against torch's .to() (NaN compared as
    NaN: payloads and the NaN torch picks for bf16 differ by design), on every f16 and bf16 bit
    pattern and on f32 values chosen to hit ties, subnormals, overflow and the infinities;
  - integer -> float: bit-exact against torch's .to() (which also rounds through f32);
  - float -> integer: truncate toward zero, saturate at the target's range, NaN -> 0;
  - integer -> integer: exact, saturating when narrowing.
The f16/bf16 conversions have AVX2 variants (F16C, integer rounding), so everything runs on the
native path and on the forced scalar one (the `simd` fixture); contiguous data of more than 8
elements goes through the vector loops, strided data through the scalar ones.
Every comparison is exact: a copy has no tolerance."""
import functools
import math

import pytest
import torch


import inference_pio as ip
from inference_pio import runtime
from inference_pio._lib import check

from helpers import TORCH_DTYPES, from_torch, to_torch

ALL = (ip.float32, ip.float16, ip.bfloat16, ip.int8, ip.int32, ip.int64, ip.uint8)
FLOATS = (ip.float32, ip.float16, ip.bfloat16)
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16", ip.int8: "i8", ip.int32: "i32",
         ip.int64: "i64", ip.uint8: "u8"}
INT_RANGE = {ip.int8: (-128, 127), ip.uint8: (0, 255), ip.int32: (-2 ** 31, 2 ** 31 - 1),
             ip.int64: (-2 ** 63, 2 ** 63 - 1)}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def c_copy(out, x):
    check(ip.lib.to_copy(ip.ffi.NULL if out is None else out._desc, ip.ffi.NULL if x is None else x._desc))


def c_fill(out, value):
    check(ip.lib.to_fill(ip.ffi.NULL if out is None else out._desc, value))


def f32_from_bits(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


@functools.lru_cache(maxsize=None)
def source(dtype):
    """A 1-d torch tensor of `dtype` with the values worth converting from it (odd length)."""
    g = torch.Generator().manual_seed(1234)
    if dtype in (ip.float16, ip.bfloat16):  # every bit pattern: NaNs, subnormals, infinities
        return torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(TORCH_DTYPES[dtype])
    if dtype in (ip.int8, ip.uint8):  # every value
        return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(TORCH_DTYPES[dtype])
    if dtype is ip.float32:
        special = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 0.7, -0.7, 1.5, -1.5, 2.5, 126.9, 127.5, 128.0,
                   -128.9, -129.0, 255.9, 256.0, -0.999, 1e-40, -1e-45, 1e-30, 6e-8, 3e-8, 2.0 ** -25,
                   3 * 2.0 ** -25, 2.0 ** -25 * (1 + 2.0 ** -20), 2.0 ** -14, 2.0 ** -14 * (1 - 2.0 ** -11),
                   65504.0, 65519.99, 65520.0, -65520.0, 1e5, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,
                   2147483520.0, 2.0 ** 31, -2.0 ** 31, -2.0 ** 31 - 256, 2.0 ** 62, -2.0 ** 62,
                   2.0 ** 63 - 2.0 ** 39, -2.0 ** 63, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]
        tie_bits = [0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000, 0x7F7FFFFF, 0x00008000, 0x00018000]
        parts = [torch.tensor(special, dtype=torch.float32), f32_from_bits(tie_bits),
                 torch.randn(3001, generator=g) * 10.0 ** torch.randint(-8, 9, (3001,), generator=g)]
        rand = torch.randint(0, 2 ** 32, (5003,), generator=g)
        parts.append(f32_from_bits(rand.tolist()))  # random bits: NaN payloads, subnormals, huge
        bf16_ties = (rand[:1999] & ~0xFFFF) | 0x8000  # exactly halfway between two bf16 values
        parts.append(f32_from_bits(bf16_ties.tolist()))
        exp = torch.randint(103, 143, (1999,), generator=g)  # f16 normal and subnormal range
        f16_ties = (rand[:1999] & 0x807FE000) | (exp << 23) | 0x1000  # halfway between two f16
        parts.append(f32_from_bits(f16_ties.tolist()))
        return torch.cat(parts)
    if dtype is ip.int32:
        edges = [-2 ** 31, -2 ** 31 + 1, -2 ** 24 - 1, -129, -128, -1, 0, 1, 127, 128, 255, 256, 2049,
                 65504, 65519, 65520, 65535, 2 ** 24 + 1, 2 ** 24 + 3, 2 ** 31 - 1]
        return torch.cat([torch.tensor(edges, dtype=torch.int32),
                          torch.randint(-2 ** 31, 2 ** 31, (1001,), generator=g, dtype=torch.int64).to(torch.int32)])
    edges = [-2 ** 63, -2 ** 63 + 1, -2 ** 53 - 1, -2 ** 31 - 1, -2 ** 31, -129, -1, 0, 1, 255, 256,
             2 ** 31 - 1, 2 ** 31, 2 ** 32 + 1, 2 ** 53 + 1, 2 ** 62 + 2 ** 40 + 1, 2 ** 63 - 1024, 2 ** 63 - 1]
    return torch.cat([torch.tensor(edges, dtype=torch.int64),
                      torch.randint(-2 ** 62, 2 ** 62, (1001,), generator=g) * 2])


def expected(src, dst_dtype):
    """What converting the torch tensor src to dst_dtype must give, as a torch tensor."""
    target = TORCH_DTYPES[dst_dtype]
    if dst_dtype in FLOATS:  # torch rounds to nearest even, as the library must
        return src.to(target)
    lo, hi = INT_RANGE[dst_dtype]
    if src.is_floating_point():
        v = src.to(torch.float64)
        t = torch.where(v.isnan(), torch.zeros_like(v), torch.trunc(v))
        r = t.clamp(-2.0 ** 63, 2.0 ** 63 - 1024).to(torch.int64)  # exact inside the range
        r = torch.where(t >= 2.0 ** 63, torch.full_like(r, 2 ** 63 - 1), r)
        return r.clamp(lo, hi).to(target)
    return src.to(torch.int64).clamp(lo, hi).to(target)


def assert_same(got, expect):
    """Exact equality; for floats bit for bit (so -0.0 != 0.0), NaN only as NaN."""
    assert got.dtype == expect.dtype and got.shape == expect.shape
    if not got.is_floating_point():
        assert torch.equal(got, expect)
        return
    nan = expect.isnan()
    assert torch.equal(got.isnan(), nan)
    gb, eb = got.reshape(-1).view(BITS[got.element_size()]), expect.reshape(-1).view(BITS[got.element_size()])
    bad = (gb != eb) & ~nan.reshape(-1)
    assert not bad.any(), (f"{int(bad.sum())} mismatches, first at {int(bad.nonzero()[0])}: "
                           f"got {got.reshape(-1)[bad][:4].tolist()} expected {expect.reshape(-1)[bad][:4].tolist()}")


@pytest.mark.parametrize("src_dtype", ALL, ids=NAMES.get)
@pytest.mark.parametrize("dst_dtype", ALL, ids=NAMES.get)
def test_every_dtype_pair(simd, src_dtype, dst_dtype):
    src = source(src_dtype)
    out = ip.Tensor.empty(src.shape[0], dtype=dst_dtype)
    c_copy(out, from_torch(src))
    assert_same(to_torch(out), expected(src, dst_dtype))


@pytest.mark.parametrize("dtype", [ip.float16, ip.bfloat16], ids=NAMES.get)
def test_simd_and_scalar_paths_agree_bitwise(dtype):
    """The vector and scalar conversions give the same bits, NaN payloads included, both ways
    (f16/bf16 -> f32 of every pattern, and f32 -> f16/bf16 of the f32 source values)."""
    before = runtime.simd_level()
    results = []
    try:
        for level in (before, "scalar"):
            runtime.set_simd_level(level)
            wide = ip.Tensor.empty(65536, dtype=ip.float32)
            c_copy(wide, from_torch(source(dtype)))
            narrow = ip.Tensor.empty(source(ip.float32).shape[0], dtype=dtype)
            c_copy(narrow, from_torch(source(ip.float32)))
            results.append((bytes(wide), bytes(narrow)))
    finally:
        runtime.set_simd_level(before)
    assert results[0] == results[1]


@pytest.mark.parametrize("src_dtype,dst_dtype", [(ip.float32, ip.float16), (ip.float32, ip.bfloat16),
                                                 (ip.float16, ip.float32), (ip.bfloat16, ip.float32),
                                                 (ip.float16, ip.bfloat16), (ip.float32, ip.int8)],
                         ids=lambda d: NAMES[d])
def test_vector_tails(simd, src_dtype, dst_dtype):
    """Lengths around the 8-wide vector loop: the tail elements convert the same way."""
    src = source(src_dtype)[:40]
    for n in (1, 7, 8, 9, 15, 16, 17, 33):
        out = ip.Tensor.empty(n, dtype=dst_dtype)
        c_copy(out, from_torch(src[:n]))
        assert_same(to_torch(out), expected(src[:n], dst_dtype))


def test_special_values_spelled_out(simd):
    """A readable sample of the rules, independent of torch."""
    x = ip.tensor([65519.0, 65520.0, -70000.0, 2.0 ** -25, 3 * 2.0 ** -25, 1 + 2.0 ** -11, math.inf, math.nan])
    assert ip.Tensor.empty(8, dtype=ip.float16).copy_(x).tolist()[:7] == [65504.0, math.inf, -math.inf, 0.0,
                                                                          2.0 ** -23, 1.0, math.inf]
    y = ip.tensor([-2.7, -0.5, 0.5, 2.7, 300.0, -300.0, math.nan, math.inf, -math.inf])
    assert ip.Tensor.empty(9, dtype=ip.int8).copy_(y).tolist() == [-2, 0, 0, 2, 127, -128, 0, 127, -128]
    assert ip.Tensor.empty(9, dtype=ip.uint8).copy_(y).tolist() == [0, 0, 0, 2, 255, 0, 0, 255, 0]
    assert ip.Tensor.empty(3, dtype=ip.int32).copy_(ip.tensor([3e9, -3e9, -2.0 ** 31])).tolist() == \
        [2 ** 31 - 1, -2 ** 31, -2 ** 31]
    z = ip.tensor([-1, 256, 2 ** 40, -2 ** 40, 127])
    assert ip.Tensor.empty(5, dtype=ip.uint8).copy_(z).tolist() == [0, 255, 255, 0, 127]
    assert ip.Tensor.empty(5, dtype=ip.int32).copy_(z).tolist() == [-1, 256, 2 ** 31 - 1, -2 ** 31, 127]
    assert ip.Tensor.empty(5, dtype=ip.int8).copy_(ip.tensor([200, 255, 0, 127, 128], dtype=ip.uint8)).tolist() \
        == [127, 127, 0, 127, 127]


def test_float_to_int64_saturates_at_int64_max():
    x = ip.tensor([1e19, math.inf, 2.0 ** 63], dtype=ip.float32)
    assert ip.Tensor.empty(3, dtype=ip.int64).copy_(x).tolist() == [2 ** 63 - 1] * 3


# ---- strided and broadcast views ----

@pytest.mark.parametrize("src_dtype,dst_dtype", [(ip.float32, ip.bfloat16), (ip.bfloat16, ip.float16),
                                                 (ip.float16, ip.int32), (ip.int64, ip.int8),
                                                 (ip.uint8, ip.float32), (ip.int32, ip.int32),
                                                 (ip.bfloat16, ip.bfloat16), (ip.int8, ip.int8),
                                                 (ip.int64, ip.int64)],
                         ids=lambda d: NAMES[d])
@pytest.mark.parametrize("kind", ["transposed", "sliced", "broadcast_rows", "broadcast_cols", "permuted"])
def test_strided_source(simd, src_dtype, dst_dtype, kind):
    full = source(src_dtype).repeat(4)  # at least 1024 values
    if kind == "transposed":  # [13, 31] read column by column
        ref = full[:13 * 31].reshape(31, 13).t()
        x = from_torch(full[:13 * 31]).view(31, 13).T
    elif kind == "sliced":  # every third element of each row, rows every other row
        ref = full[:20 * 45].reshape(20, 45)[::2, 1::3]
        x = from_torch(full[:20 * 45]).view(20, 45)[::2, 1::3]
    elif kind == "broadcast_rows":  # one row repeated: stride 0 over rows
        ref = full[:37].reshape(1, 37).expand(9, 37)
        x = from_torch(full[:37]).view(1, 37).expand(9, 37)
    elif kind == "broadcast_cols":  # one column repeated: stride 0 along the row
        ref = full[:9].reshape(9, 1).expand(9, 37)
        x = from_torch(full[:9]).view(9, 1).expand(9, 37)
    else:  # a 3-d permutation
        ref = full[:5 * 6 * 7].reshape(5, 6, 7).permute(2, 0, 1)
        x = from_torch(full[:5 * 6 * 7]).view(5, 6, 7).permute(2, 0, 1)
    out = ip.Tensor.empty(*ref.shape, dtype=dst_dtype)
    c_copy(out, x)
    assert_same(to_torch(out), expected(ref.contiguous(), dst_dtype))


@pytest.mark.parametrize("src_dtype,dst_dtype", [(ip.float32, ip.float16), (ip.bfloat16, ip.float32),
                                                 (ip.int32, ip.uint8), (ip.float16, ip.float16),
                                                 (ip.int64, ip.int64)], ids=lambda d: NAMES[d])
@pytest.mark.parametrize("kind", ["sliced", "transposed"])
def test_strided_destination(simd, src_dtype, dst_dtype, kind):
    src = source(src_dtype).repeat(2)[:17 * 23].reshape(17, 23)
    sentinel = 7
    if kind == "sliced":
        backing = ip.Tensor.full((17, 3 * 23), sentinel, dtype=dst_dtype)
        out = backing[:, 1::3]
    else:
        backing = ip.Tensor.full((23, 17), sentinel, dtype=dst_dtype)
        out = backing.T
    c_copy(out, from_torch(src))
    assert_same(to_torch(out.contiguous()), expected(src, dst_dtype))
    if kind == "sliced":  # the elements between the view's were left alone
        rest = to_torch(backing)
        assert (rest[:, 0::3] == sentinel).all() and (rest[:, 2::3] == sentinel).all()


def test_large_copies_are_threaded_and_right(simd, gen):
    """Big enough for the pool: contiguous (split by elements) and strided (split by rows)."""
    src = torch.randn(300, 1001, generator=gen)
    out = ip.Tensor.empty(300, 1001, dtype=ip.bfloat16)
    c_copy(out, from_torch(src))
    assert_same(to_torch(out), src.to(torch.bfloat16))
    out_t = ip.Tensor.empty(1001, 300, dtype=ip.float16)
    c_copy(out_t, from_torch(src).T)
    assert_same(to_torch(out_t), src.t().to(torch.float16))


def test_0d_and_empty():
    out = ip.Tensor.empty((), dtype=ip.int32)
    c_copy(out, ip.tensor(-7.9))
    assert out.item() == -7
    c_copy(ip.Tensor.empty(0, 5, dtype=ip.bfloat16), ip.Tensor.empty(0, 5))
    c_copy(ip.Tensor.empty(3, 0), ip.Tensor.empty(3, 0, dtype=ip.int8))


def test_python_copy_broadcasts_and_setitem():
    t = ip.Tensor.zeros(3, 4, dtype=ip.int32)
    t.copy_(ip.tensor([1.9, -2.9, 3.5, 4.0]))  # a row broadcast over the rows, converted
    assert t.tolist() == [[1, -2, 3, 4]] * 3
    t[1] = ip.tensor([9, 8, 7, 6], dtype=ip.int64)
    t[:, 0] = 100
    assert t.tolist() == [[100, -2, 3, 4], [100, 8, 7, 6], [100, -2, 3, 4]]
    with pytest.raises(ValueError, match="cannot expand"):
        t.copy_(ip.Tensor.zeros(5))


# ---- fill ----

FILL_VALUES = [0.0, -0.0, 1.5, -2.7, 0.1, 300.0, -300.0, 65519.0, 65520.0, 1e-8, 1e10, -1e10,
               3.0e38, 1e39, 2.0 ** 53 + 2, math.inf, -math.inf, math.nan, 1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8]


def fill_expected(value, dtype):
    if dtype in FLOATS:  # the value is made an f32 first, then rounded into the dtype
        return torch.tensor([value], dtype=torch.float64).to(torch.float32).to(TORCH_DTYPES[dtype])
    lo, hi = INT_RANGE[dtype]
    v = 0 if math.isnan(value) else (hi if value == math.inf else lo if value == -math.inf else math.trunc(value))
    return torch.tensor([min(max(v, lo), hi)], dtype=TORCH_DTYPES[dtype])


@pytest.mark.parametrize("dtype", ALL, ids=NAMES.get)
def test_fill_every_dtype(simd, dtype):
    for value in FILL_VALUES:
        out = ip.Tensor.empty(37, dtype=dtype)
        c_fill(out, value)
        assert_same(to_torch(out), fill_expected(value, dtype).expand(37))


def test_fill_int64_near_the_limit():
    out = ip.Tensor.empty(2, dtype=ip.int64)
    c_fill(out, 9.21e18)
    assert out.tolist() == [9210000000000000000] * 2


@pytest.mark.parametrize("dtype", [ip.float32, ip.bfloat16, ip.int8, ip.int64], ids=NAMES.get)
def test_fill_views(dtype):
    backing = ip.Tensor.zeros(40, 30, dtype=dtype)
    backing[:, 1::3].fill_(5)  # strided columns
    backing.T[2].fill_(-3)  # one column through a transposed view
    expect = torch.zeros(40, 30, dtype=TORCH_DTYPES[dtype])
    expect[:, 1::3] = 5
    expect[:, 2] = -3
    assert torch.equal(to_torch(backing), expect)
    scalar = ip.Tensor.empty((), dtype=dtype)
    c_fill(scalar, 2.0)
    assert scalar.item() == 2
    c_fill(ip.Tensor.empty(0, 4, dtype=dtype), 1.0)
    big = ip.Tensor.empty(700, 1000, dtype=dtype)  # many rows: split over the pool
    c_fill(big, 1.0)
    assert torch.equal(to_torch(big), torch.ones(700, 1000, dtype=TORCH_DTYPES[dtype]))


def test_fill_read_only_tensor():
    t = ip.Tensor.frombuffer(bytes(16), ip.float32)
    with pytest.raises(ValueError, match="read-only"):
        t.fill_(1.0)
    assert t.tolist() == [0.0] * 4


# ---- errors ----

def descriptor(**fields):
    """A raw to_tensor over a real 64-byte buffer: a valid [4, 4] f32 tensor unless fields change it."""
    buf = ip.ffi.new("float[16]")
    d = ip.ffi.new("to_tensor *")
    d.data, d.nbytes, d.dtype, d.device, d.ndim = buf, 64, ip.lib.TO_F32, ip.lib.TO_CPU, 2
    d.shape[0], d.shape[1], d.strides[0], d.strides[1] = 4, 4, 4, 1
    for name, value in fields.items():
        if name in ("shape", "strides"):
            for i, v in enumerate(value):
                getattr(d, name)[i] = v
        else:
            setattr(d, name, value)
    return d, buf


def test_copy_errors():
    good, _buf = descriptor()
    cases = [
        (dict(dtype=42), ip.DTypeError, "to_copy: x has unknown dtype 42"),
        (dict(device=7), ip.DeviceError, "to_copy: x has unknown device 7"),
        (dict(ndim=9), ip.InvalidArgumentError, r"to_copy: x has rank 9 \(0..8 allowed\)"),
        (dict(strides=[-4, 1]), ip.InvalidArgumentError, "x has a negative shape or stride in dim 0"),
        (dict(shape=[4, -1]), ip.InvalidArgumentError, "x has a negative shape or stride in dim 1"),
        (dict(data=ip.ffi.NULL), ip.InvalidArgumentError, "x has a NULL data pointer"),
        (dict(nbytes=60), ip.BoundsError, "x needs 64 bytes for its shape and strides but its buffer holds 60"),
        (dict(strides=[5, 1]), ip.BoundsError, "x needs 76 bytes"),
    ]
    for fields, error, message in cases:
        bad, _keep = descriptor(**fields)
        status = ip.lib.to_copy(good, bad)
        with pytest.raises(error, match=message):
            check(status)
    with pytest.raises(ip.ShapeError, match=r"to_copy: out has shape \[2, 3\] but x has shape \[3, 2\]"):
        c_copy(ip.Tensor.empty(2, 3), ip.Tensor.zeros(3, 2))
    with pytest.raises(ip.InvalidArgumentError, match="to_copy: out is NULL"):
        c_copy(None, ip.Tensor.zeros(3))
    with pytest.raises(ip.InvalidArgumentError, match="to_copy: x is NULL"):
        c_copy(ip.Tensor.zeros(3), None)
    short = ip.Tensor(ip.Tensor.empty(2).storage, (3,), (1,), ip.float32)
    with pytest.raises(ip.BoundsError, match="to_copy: out needs 12 bytes .* holds 8"):
        c_copy(short, ip.Tensor.zeros(3))
    gpu, _keep = descriptor(device=ip.lib.TO_CUDA, device_index=63)  # fails before touching any GPU
    with pytest.raises(ip.UnsupportedError, match="need the same dtype on both sides"):
        check(ip.lib.to_copy(gpu, ip.Tensor.zeros(4, 4, dtype=ip.bfloat16)._desc))


def test_overflowing_view_is_refused_not_a_crash():
    """(shape - 1) * stride beyond int64 once wrapped around and passed the nbytes check; it must
    be refused. Run in a child process so a regression shows as a failure, not a dead suite."""
    code = (
        "import inference_pio as ip\n"
        "buf = ip.ffi.new('float[16]')\n"
        "for shape, stride in [(2 ** 40, 2 ** 40), (2 ** 62, 4), (3, 2 ** 62)]:\n"
        "    d = ip.ffi.new('to_tensor *')\n"
        "    d.data, d.nbytes, d.dtype, d.device, d.ndim = buf, 64, ip.lib.TO_F32, ip.lib.TO_CPU, 1\n"
        "    d.shape[0], d.strides[0] = shape, stride\n"
        "    print(ip.lib.to_fill(d, 1.0), ip.ffi.string(ip.lib.to_last_error()).decode())\n")
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert line.startswith("4 to_fill: out has a shape and strides whose extent overflows 64 bits"), line


def test_fill_errors():
    with pytest.raises(ip.InvalidArgumentError, match="to_fill: out is NULL"):
        c_fill(None, 1.0)
    short = ip.Tensor(ip.Tensor.empty(2).storage, (3,), (1,), ip.float32)
    with pytest.raises(ip.BoundsError, match="to_fill: out needs 12 bytes"):
        c_fill(short, 1.0)
    bad, _keep = descriptor(dtype=-1)
    with pytest.raises(ip.DTypeError, match="to_fill: out has unknown dtype -1"):
        check(ip.lib.to_fill(bad, 0.0))
    gpu, _keep = descriptor(device=ip.lib.TO_CUDA, device_index=63)  # a GPU no machine has
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_fill(gpu, 0.0))
