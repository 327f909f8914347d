"""Block-quantized dtypes (q8_0, q4_0, q4_1, q4_k, q6_k): to_copy in and out of them, lookups
from quantized tables, and ops.quantize / ops.dequantize (csrc/cpu/quant.c).

The oracle is gguf-py's numpy reference (gguf.quants), which mirrors GGML:
  - dequantization of every type is bit-exact against gguf.quants.dequantize, on random blocks
    (random bytes with finite f16 scales; negative, zero and subnormal scales included);
  - quantization to q8_0, q4_0 and q4_1 is byte-exact against gguf.quants.quantize, on random
    rows over 60 decades, zero and constant rows, rounding ties and argmax ties;
  - q4_k and q6_k have no reference quantizer: ours is held to a round-trip bound, and gguf's
    dequantizer must read our blocks to exactly the floats ours gives.
Every test runs on the best SIMD path and on the forced scalar one (the `simd` fixture), which
therefore give identical bits. Random data is drawn afresh each run (the seed is printed)."""
import ctypes
import os

import gguf
import numpy as np
import pytest
import torch

import inference_pio as ip
from inference_pio import dtypes as dt, ops
from inference_pio._lib import check

from helpers import on_cuda

# gguf warns when a scale overflows f16 (rows of 1e30): that inf is part of what is compared
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

Q = gguf.GGMLQuantizationType
GG = {dt.q8_0: Q.Q8_0, dt.q4_0: Q.Q4_0, dt.q4_1: Q.Q4_1, dt.q4_k: Q.Q4_K, dt.q6_k: Q.Q6_K}
QUANTS = tuple(GG)
GGML_QUANTIZED = (dt.q8_0, dt.q4_0, dt.q4_1)  # the ones gguf can quantize
FLOATS = (ip.float32, ip.float16, ip.bfloat16)
# byte offsets of the f16 scale fields in each block
SCALE_FIELDS = {dt.q8_0: (0,), dt.q4_0: (0,), dt.q4_1: (0, 2), dt.q4_k: (0, 2), dt.q6_k: (208,)}

# Round-trip bounds of our k-quant quantizers on Gaussian rows (measured over thousands of
# super-blocks: q4_k relative RMS 0.071, q6_k 0.017; worst element 0.06 / 0.016 of its sub-block's
# range on Gaussian data, 0.051 / 0.019 on uniform data).
REL_RMS = {dt.q4_k: 0.075, dt.q6_k: 0.019}
MAX_OF_RANGE = {dt.q4_k: 0.08, dt.q6_k: 0.03}
SUB_BLOCK = {dt.q4_k: 32, dt.q6_k: 16}


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"numpy seed {seed}")
    return np.random.default_rng(seed)


# ---- moving data between our tensors and numpy ----

def raw_blocks(t):
    """The bytes of quantized tensor t as a numpy uint8 array [rows, bytes per row]."""
    t = t.contiguous()
    data = np.frombuffer(ctypes.string_at(t.data_ptr(), t.nbytes), dtype=np.uint8)
    return data.reshape(-1, t.dtype.nbytes(t.shape[-1]))


def from_blocks(blocks, dtype, rows, cols):
    return ip.Tensor.frombuffer(np.ascontiguousarray(blocks).tobytes(), dtype, (rows, cols), copy=True)


def from_np(a, dtype=ip.float32):
    """Our tensor of numpy float32 array a, rounded to float dtype (to nearest even)."""
    t = ip.Tensor.frombuffer(np.ascontiguousarray(a, dtype=np.float32).tobytes(), ip.float32, a.shape, copy=True)
    return t if dtype is ip.float32 else t.to(dtype=dtype)


def to_np(t):
    """float32 numpy array of the values of our float tensor t (exact)."""
    return np.frombuffer(bytes(t.float().contiguous()), dtype=np.float32).reshape(t.shape)


def rounded(a, dtype):
    """float32 array a rounded to dtype and back (the oracle for f16/bf16 outputs)."""
    t = torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy
    return t.to({ip.float32: torch.float32, ip.float16: torch.float16, ip.bfloat16: torch.bfloat16}[dtype]).float().numpy()


def assert_bits(got, expect):
    got, expect = np.asarray(got, np.float32), np.asarray(expect, np.float32)
    assert got.shape == expect.shape
    bad = got.view(np.uint32) != expect.view(np.uint32)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise AssertionError(f"{int(bad.sum())} of {bad.size} differ; first at {i}: {got[i]!r} != {expect[i]!r}")


def random_blocks(rng, dtype, rows, nblocks):
    """Random blocks (uint8 [rows, nblocks * block_bytes]) whose f16 scales are finite: random
    magnitudes and signs, with every tenth scale 0 or -0 and some subnormal."""
    b = rng.integers(0, 256, (rows, nblocks, dtype.block_bytes), dtype=np.uint8)
    for off in SCALE_FIELDS[dtype]:
        h = rng.integers(0, 0x7C00, (rows, nblocks), dtype=np.uint16)  # exponent < 31: finite
        h[rng.random((rows, nblocks)) < 0.1] = 0
        h[rng.random((rows, nblocks)) < 0.1] &= 0x3FF  # subnormal
        h |= (rng.random((rows, nblocks)) < 0.5).astype(np.uint16) << 15
        b[:, :, off:off + 2] = h[..., None].view(np.uint8)
    return b.reshape(rows, -1)


def gg_dequant(blocks, dtype):
    return gguf.quants.dequantize(blocks, GG[dtype]).astype(np.float32)


# ---- dequantization ----

@pytest.mark.parametrize("dtype", QUANTS, ids=str)
@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
def test_dequantize_matches_gguf(simd, rng, dtype, out_dtype):
    rows, nblocks = 7, int(rng.integers(1, 6)) * 2 + 1  # an odd number of blocks per row
    blocks = random_blocks(rng, dtype, rows, nblocks)
    x = from_blocks(blocks, dtype, rows, nblocks * dtype.block_size)
    got = ops.dequantize(x, out_dtype)
    assert got.dtype is out_dtype and got.shape == x.shape
    assert_bits(to_np(got), rounded(gg_dequant(blocks, dtype), out_dtype))


@pytest.mark.parametrize("dtype", QUANTS, ids=str)
def test_dequantize_many_blocks_threaded(simd, rng, dtype):
    """A large contiguous tensor: the flat path splits it over threads by whole blocks."""
    rows, nblocks = 3, 4096 // dtype.block_size * 33
    blocks = random_blocks(rng, dtype, rows, nblocks)
    x = from_blocks(blocks, dtype, rows, nblocks * dtype.block_size)
    assert_bits(to_np(x.float()), gg_dequant(blocks, dtype))


@pytest.mark.parametrize("dtype", QUANTS, ids=str)
def test_dequantize_views(simd, rng, dtype):
    """Row-strided and block-column views of a quantized tensor, into strided float outputs."""
    bs = dtype.block_size
    blocks = random_blocks(rng, dtype, 6, 4)
    ref = gg_dequant(blocks, dtype)
    x = from_blocks(blocks, dtype, 6, 4 * bs)
    assert_bits(to_np(x[1::2].float()), ref[1::2])
    assert_bits(to_np(x[:, bs:3 * bs].float()), ref[:, bs:3 * bs])
    out = ip.Tensor.zeros(4 * bs, 6)  # transposed f32 output: stride 6 along the rows
    out.T.copy_(x)
    assert_bits(to_np(out).T, ref)
    wide = ip.Tensor.zeros(6, 8 * bs, dtype=ip.bfloat16)
    ops.dequantize(x, ip.bfloat16, out=wide[:, ::2])
    assert_bits(to_np(wide)[:, ::2], rounded(ref, ip.bfloat16))
    assert not to_np(wide)[:, 1::2].any()


# ---- quantization, the GGML reference types ----

def quant_rows(rng, nblocks):
    """float32 rows [n, nblocks * 32] worth quantizing: Gaussian rows scaled over 60 decades,
    uniform and one-signed rows, zero and constant rows, and blocks with ties."""
    K = nblocks * 32
    parts = [rng.standard_normal((24, K)) * 10.0 ** rng.uniform(-30, 30, (24, 1)),
             rng.uniform(-1, 3, (4, K)), -rng.uniform(0.5, 2, (2, K)), np.zeros((2, K)),
             np.full((2, K), 0.75), np.full((2, K), -3.1e-5)]
    ties = np.tile(np.array([127.0, 2.5, -3.5, 0.5, -0.5, 1.5, -126.5, 0.0] * 4), (1, nblocks))
    argmax_ties = np.tile(np.array([-4.0, 4.0, 1.0, -1.0, 3.9, -2.5, 0.25, 0.0] * 4), (1, nblocks))
    parts += [ties, argmax_ties, -argmax_ties]
    return np.concatenate(parts).astype(np.float32)


@pytest.mark.parametrize("dtype", GGML_QUANTIZED, ids=str)
def test_quantize_matches_gguf(simd, rng, dtype):
    x = quant_rows(rng, int(rng.integers(1, 6)) * 2 + 1)
    q = ops.quantize(from_np(x), dtype)
    assert q.dtype is dtype and q.shape == x.shape
    np.testing.assert_array_equal(raw_blocks(q), gguf.quants.quantize(x, GG[dtype]))


@pytest.mark.parametrize("dtype", GGML_QUANTIZED, ids=str)
@pytest.mark.parametrize("src_dtype", (ip.float16, ip.bfloat16), ids=str)
def test_quantize_from_half_sources(simd, rng, dtype, src_dtype):
    x = (rng.standard_normal((9, 96)) * 10.0 ** rng.uniform(-3, 3, (9, 1))).astype(np.float32)
    src = from_np(x, src_dtype)
    np.testing.assert_array_equal(raw_blocks(ops.quantize(src, dtype)),
                                  gguf.quants.quantize(to_np(src), GG[dtype]))


@pytest.mark.parametrize("dtype", GGML_QUANTIZED, ids=str)
def test_quantize_strided(simd, rng, dtype):
    """Row-strided and transposed float sources, a row-strided quantized destination, and a large
    contiguous tensor split over threads."""
    x = quant_rows(rng, 3)
    expect = gguf.quants.quantize(x, GG[dtype])
    wide = from_np(np.concatenate([x, x], axis=1))  # rows twice as long: a row stride of 2K
    np.testing.assert_array_equal(raw_blocks(ops.quantize(wide[:, :96], dtype)), expect)
    transposed = from_np(x.T.copy()).T  # last-dim stride n
    np.testing.assert_array_equal(raw_blocks(ops.quantize(transposed, dtype)), expect)
    backing = ip.Tensor.empty(2 * x.shape[0], 96, dtype=dtype)
    backing.copy_(ops.quantize(from_np(np.zeros((2 * x.shape[0], 96))), dtype))
    ops.quantize(from_np(x), dtype, out=backing[1::2])
    got = raw_blocks(backing)
    np.testing.assert_array_equal(got[1::2], expect)
    np.testing.assert_array_equal(got[0::2], gguf.quants.quantize(np.zeros((x.shape[0], 96), np.float32), GG[dtype]))
    big = (rng.standard_normal((5, 32 * 1001))).astype(np.float32)
    np.testing.assert_array_equal(raw_blocks(ops.quantize(from_np(big), dtype)), gguf.quants.quantize(big, GG[dtype]))


# ---- quantization, k-quants ----

def check_roundtrip(dtype, x):
    """Our blocks for x: gguf reads them to exactly our floats, within the stated bounds."""
    q = ops.quantize(from_np(x), dtype)
    back = to_np(q.float())
    assert_bits(back, gg_dequant(raw_blocks(q), dtype))
    err = np.abs(back.astype(np.float64) - x)
    sub = x.reshape(-1, SUB_BLOCK[dtype]).astype(np.float64)
    span = np.maximum(sub.max(axis=1), 0) - np.minimum(sub.min(axis=1), 0)  # levels include 0
    worst = (err.reshape(sub.shape).max(axis=1) / np.where(span > 0, span, 1)).max()
    assert worst <= MAX_OF_RANGE[dtype], f"an element is off by {worst:.4f} of its sub-block's range"
    return back


@pytest.mark.parametrize("dtype", (dt.q4_k, dt.q6_k), ids=str)
def test_kquant_roundtrip_gaussian(simd, rng, dtype):
    x = (rng.standard_normal((64, 1024)) * 10.0 ** rng.uniform(-3, 3, (64, 1))).astype(np.float32)
    back = check_roundtrip(dtype, x)
    mse = ((back.astype(np.float64) - x) ** 2).mean(axis=1) / (x.astype(np.float64) ** 2).mean(axis=1)
    rel = np.sqrt(mse.mean())  # rows have different scales: each row's error relative to its own RMS
    assert rel <= REL_RMS[dtype], f"relative RMS error {rel:.4f}"


@pytest.mark.parametrize("dtype", (dt.q4_k, dt.q6_k), ids=str)
def test_kquant_roundtrip_other_rows(simd, rng, dtype):
    K = 512
    x = np.concatenate([rng.uniform(-1, 3, (8, K)), -rng.uniform(1, 2, (2, K)), rng.uniform(1, 2, (2, K)),
                        np.full((2, K), 0.3), np.full((1, K), -7.0)]).astype(np.float32)
    check_roundtrip(dtype, x)
    zeros = np.zeros((2, K), np.float32)
    assert not to_np(ops.quantize(from_np(zeros), dtype).float()).any()
    sparse = np.zeros((4, K), np.float32)  # a few spikes: each is kept within the bound
    sparse[np.arange(4), rng.integers(0, K, 4)] = rng.uniform(1, 5, 4) * rng.choice([-1, 1], 4)
    back = to_np(ops.quantize(from_np(sparse), dtype).float())
    assert np.abs(back - sparse).max() <= MAX_OF_RANGE[dtype] * np.abs(sparse).max()


# ---- to_copy between quantized and float dtypes ----

@pytest.mark.parametrize("dtype", QUANTS, ids=str)
def test_copy_every_direction(simd, rng, dtype):
    K = 512  # two super-blocks, so every quantized dtype takes these rows
    x = (rng.standard_normal((5, K)) * 3).astype(np.float32)
    q = ops.quantize(from_np(x), dtype)
    deq = to_np(q.float())
    for f in FLOATS:  # float -> quantized is quantize(f32 value); quantized -> float rounds
        src = from_np(x, f)
        np.testing.assert_array_equal(raw_blocks(src.to(dtype=dtype)), raw_blocks(ops.quantize(src.float(), dtype)))
        assert_bits(to_np(q.to(dtype=f)), rounded(deq, f))
    same = q.clone()  # same dtype: bytes, also into a row-strided view
    np.testing.assert_array_equal(raw_blocks(same), raw_blocks(q))
    backing = ip.Tensor.empty(10, K, dtype=dtype)
    backing[::2].copy_(q)
    np.testing.assert_array_equal(raw_blocks(backing)[::2], raw_blocks(q))
    for other in QUANTS:  # quantized -> quantized goes through f32
        if other is not dtype:
            np.testing.assert_array_equal(raw_blocks(q.to(dtype=other)), raw_blocks(ops.quantize(from_np(deq), other)))
    assert_bits(np.array(q.tolist(), np.float32), deq)


# ---- embedding lookups from quantized tables ----

@pytest.mark.parametrize("dtype", QUANTS, ids=str)
@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
def test_embedding_quantized_table(simd, rng, dtype, out_dtype):
    V, D, T = 11, 3 * dtype.block_size, 19
    blocks = random_blocks(rng, dtype, V, 3)
    table = from_blocks(blocks, dtype, V, D)
    ids = rng.integers(0, V, T)
    ids[:3] = [V - 1, 0, V - 1]
    expect = rounded(gg_dequant(blocks, dtype)[ids], out_dtype)
    for id_dtype in (ip.int32, ip.int64):
        out = ops.embedding(table, ip.tensor(ids.tolist(), dtype=id_dtype), out=ip.Tensor.empty(T, D, dtype=out_dtype))
        assert_bits(to_np(out), expect)
    backing = ip.Tensor.zeros(T, 2 * D, dtype=out_dtype)  # strided out
    ops.embedding(table[::1], ip.tensor(ids.tolist()), out=backing[:, 1::2])
    assert_bits(to_np(backing)[:, 1::2], expect)
    assert not to_np(backing)[:, ::2].any()


def test_embedding_quantized_threaded(simd, rng):
    V, D, T = 64, 1024, 300
    blocks = random_blocks(rng, dt.q8_0, V, D // 32)
    ids = rng.integers(0, V, T)
    out = ops.embedding(from_blocks(blocks, dt.q8_0, V, D), ip.tensor(ids.tolist()),
                        out=ip.Tensor.empty(T, D, dtype=ip.float32))
    assert_bits(to_np(out), gg_dequant(blocks, dt.q8_0)[ids])


# ---- errors ----

def test_errors():
    x = ip.Tensor.zeros(2, 48)
    with pytest.raises(ip.InvalidArgumentError, match="to_copy: out is q8_0: its last dimension needs unit "
                       "stride and a multiple of 32 elements"):
        ops.quantize(x, dt.q8_0)
    with pytest.raises(ValueError, match="q4_k stores blocks of 256 elements"):
        ops.quantize(ip.Tensor.zeros(3, 32), dt.q4_k)
    with pytest.raises(ip.DTypeError, match="to_copy: cannot convert int8 to q8_0: quantized dtypes convert only "
                       "to and from float32, float16, bfloat16"):
        ops.quantize(ip.Tensor.zeros(2, 32, dtype=ip.int8), dt.q8_0)
    q = ops.quantize(ip.Tensor.zeros(2, 64), dt.q4_0)
    with pytest.raises(ip.DTypeError, match="to_copy: cannot convert q4_0 to int32"):
        ip.Tensor.empty(2, 64, dtype=ip.int32).copy_(q)
    with pytest.raises(TypeError, match="quantize: float16 is not a quantized dtype"):
        ops.quantize(ip.Tensor.zeros(2, 32), ip.float16)
    with pytest.raises(TypeError, match="dequantize: q8_0 is not float32"):
        ops.dequantize(q, dt.q8_0)
    with pytest.raises(TypeError, match="dequantize: int64 is not float32"):
        ops.dequantize(q, ip.int64)
    with pytest.raises(ip.InvalidArgumentError, match="to_copy: x is q4_0: its last dimension needs unit stride"):
        ops.dequantize(ops.quantize(ip.Tensor.zeros(32, 32), dt.q4_0).T)
    with pytest.raises(ip.InvalidArgumentError, match="to_copy: out is written but some of its elements share memory"):
        ip.Tensor.empty(1, 32, dtype=dt.q8_0).expand(4, 32).copy_(ip.Tensor.zeros(4, 32))
    # out overlapping x: one buffer seen as floats and as blocks
    buf = bytearray(4 * 64)
    f = ip.Tensor.frombuffer(buf, ip.float32, (2, 32))
    with pytest.raises(ip.InvalidArgumentError, match="to_copy: out overlaps x in memory"):
        ip.Tensor.frombuffer(buf, dt.q8_0, (2, 32)).copy_(f)
    with pytest.raises(ip.UnsupportedError, match="copies to or from a GPU need the same dtype"):
        check(ip.lib.to_copy(ip.Tensor.empty(2, 64)._desc, on_cuda(q)))


def test_embedding_errors():
    table = ops.quantize(ip.Tensor.zeros(4, 64), dt.q8_0)
    ids = ip.tensor([0, 3])
    with pytest.raises(ip.DTypeError, match="to_embedding: out has dtype q8_0, expected one of: float32, float16, "
                       "bfloat16, int8, int32, int64, uint8"):
        ops.embedding(table, ids, out=ip.Tensor.empty(2, 64, dtype=dt.q8_0))
    assert ops.embedding(table, ids).dtype is ip.float32  # the default out: dequantized rows
    with pytest.raises(ip.DTypeError, match="to_embedding: out .table has another dtype. has dtype int32"):
        ops.embedding(table, ids, out=ip.Tensor.empty(2, 64, dtype=ip.int32))
    with pytest.raises(ip.BoundsError, match=r"to_embedding: ids\[1\] = 4 is outside \[0, 4\)"):
        ops.embedding(table, ip.tensor([0, 4]), out=ip.Tensor.empty(2, 64))
