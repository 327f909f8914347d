"""to_matmul with block-quantized weights: out[M, N] = x[M, K] . w[N, K]^T (+ bias[N]), w in
q8_0 / q4_0 / q4_1 / q4_k / q6_k, or q4_0x8 / q4_1x8 / q8_0x8 (the same blocks interleaved by 8
rows), read in place; x, out and bias float.

The kernel quantizes each row of x to 8 bits (32-element blocks for q8_0/q4_0/q4_1 weights,
256-element blocks for the k-quants): d = max|x_block| / 127 in f32, q = rint(x * (1 / d)) in
f32 (round half to even). Then every (weight block, x block) product is an exact integer dot
product, scaled and accumulated in f32.

Weights: q8_0, q4_0 and q4_1 are quantized from random normal values with gguf (the GGML
reference implementation in numpy); q4_k and q6_k (which gguf cannot quantize) are random block
bytes with sane f16 scales. w_deq = gguf.quants.dequantize(w) (float32, exact up to gguf's own
f32 rounding of d * q + m).

Two oracles, both in float64:
 (a) tight: the same activation quantization done in numpy (bit-identical quants and scales), then
     ref_a = (d_x q_x) @ w_deq^T (+ bias). What is left is f32 arithmetic: per block the products
     d_w * d_x, the conversion of large integer sums and the f32 accumulation over nb blocks
     (and 8 vector lanes). With A = sum_k |d_x q_x|_k * (|w_k - o_k| + |o_k|) (+ |bias|), o_k the
     block's offset (Q4_1's m, Q4_0's -8 d, Q4_K's -dmin m_j, Q6_K's -32 d sc_j: the kernel sums
     the scaled part and the offset part separately, so each counts at full size), we allow
         acc = (8 + 2 * min(nb, 2 sqrt(nb))) * 2^-24 * A
     (as in test_matmul.py: the worst case for tiny nb, the probabilistic sqrt(n) bound beyond,
     with a few extra roundings per block and gguf's own f32 rounding of w_deq), plus one
     rounding to out's dtype.
 (b) end to end: ref_b = x @ w_deq^T (+ bias) with x unquantized. Rounding x to its 8-bit grid
     moves each element by at most d_x / 2 (= max|x_block| / 254), so, rigorously,
         |got - ref_b| <= sum_k |w_k| * d_x(k) * (1/2 + 1e-4) + acc + out rounding
     (the 1e-4 covers the f32 rounding of x * (1 / d)). Typical size on random data: the
     relative error ||got - ref_b|| / ||ref_b|| is ~0.5% for 32-blocks and ~0.7% for
     256-blocks; we also assert it stays below 2% (3% when out is bf16) wherever there are at
     least 100 outputs to average over.
"""
import ctypes
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize, quantize

import inference_pio as ip
from inference_pio._lib import TensorOpsError, check

from helpers import FLOAT_DTYPES, from_torch, randn, strided, to_torch

U32 = 2.0 ** -24
U_OUT = {ip.float32: 2.0 ** -24, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY_OUT = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}

WTYPES = ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]
GGML = {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1, "q4_k": GT.Q4_K, "q6_k": GT.Q6_K}
BLOCK = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (256, 144), "q6_k": (256, 210)}
# bytes of each block holding quants (zeroed to read off the block's offset o_k)
QUANT_BYTES = {"q8_0": (2, 34), "q4_0": (2, 18), "q4_1": (4, 20), "q4_k": (16, 144), "q6_k": (0, 192)}


def c_matmul(out, x, w, bias=None):
    check(ip.lib.to_matmul(*(ip.ffi.NULL if t is None else t._desc for t in (out, x, w, bias))))


def f16_field(rng, shape, lo, hi):
    """Random positive f16 values in [lo, hi) as raw uint16 bytes."""
    return rng.uniform(lo, hi, shape).astype(np.float16).view(np.uint8).reshape(shape + (2,))


def make_raw(rng, wtype, N, K):
    """Raw GGML block bytes [N, K / bs * bb] for random weights of this type."""
    bs, bb = BLOCK[wtype]
    if wtype in ("q8_0", "q4_0", "q4_1"):
        w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
        if wtype == "q4_1":
            w += rng.uniform(-0.02, 0.02, (N, K // bs, 1)).repeat(bs, -1).reshape(N, K).astype(np.float32)
        return quantize(w, GGML[wtype])
    nb = K // bs
    raw = rng.integers(0, 256, (N, nb, bb), dtype=np.uint8)
    if wtype == "q4_k":
        raw[:, :, 0:2] = f16_field(rng, (N, nb), 1e-3, 4e-3)  # d
        raw[:, :, 2:4] = f16_field(rng, (N, nb), 1e-3, 4e-3)  # dmin
    else:
        raw[:, :, 208:210] = f16_field(rng, (N, nb), 1e-4, 4e-4)  # d (scales are random i8)
    return raw.reshape(N, nb * bb)


def make_w(rng, wtype, N, K):
    """(our tensor, w_deq float64 [N, K], block offsets o float64 [N, K])."""
    raw = make_raw(rng, wtype, N, K)
    wdeq = dequantize(raw, GGML[wtype]).astype(np.float64).reshape(N, K)
    bs, bb = BLOCK[wtype]
    zero = raw.reshape(N, K // bs, bb).copy()
    a, b = QUANT_BYTES[wtype]
    zero[:, :, a:b] = 0
    off = dequantize(zero.reshape(N, -1), GGML[wtype]).astype(np.float64).reshape(N, K)
    t = ip.Tensor.frombuffer(raw.tobytes(), wtype, shape=(N, K))
    return t, wdeq, off


def quantize_x(x64, bs):
    """The kernel's activation quantization, in f32 numpy: (d [M, nb, 1], q [M, nb, bs])."""
    M, K = x64.shape
    xf = x64.astype(np.float32).reshape(M, K // bs, bs)
    amax = np.abs(xf).max(-1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(xf * inv)
    assert q.dtype == np.float32 and np.abs(q).max(initial=0) <= 127
    return d, q


def out_values(out):
    return to_torch(out).to(torch.float64).numpy()


def check_result(got, x64, wtype, wdeq, off, b64, out_dtype):
    M, K = x64.shape
    bs = BLOCK[wtype][0]
    nb = K // bs
    d, q = quantize_x(x64, bs)
    xq = (d.astype(np.float64) * q).reshape(M, K)
    ref_a = xq @ wdeq.T
    mag = np.abs(xq) @ (np.abs(wdeq - off) + np.abs(off)).T
    ref_b = x64 @ wdeq.T
    d_k = np.broadcast_to(d.astype(np.float64), (M, nb, bs)).reshape(M, K)  # each x element's step
    xerr = (d_k * (0.5 + 1e-4)) @ np.abs(wdeq).T
    if b64 is not None:
        ref_a, ref_b, mag = ref_a + b64, ref_b + b64, mag + np.abs(b64)
    acc = (8 + 2 * min(nb, 2 * math.sqrt(nb))) * U32 * mag
    u, tiny = U_OUT[out_dtype], TINY_OUT[out_dtype]
    tol_a = acc + u * (np.abs(ref_a) + acc) + tiny
    assert_within(got, ref_a, tol_a, "(a) same activation quantization")
    tol_b = acc + xerr + u * (np.abs(ref_b) + acc + xerr) + tiny
    assert_within(got, ref_b, tol_b, "(b) unquantized x")
    # (c) a statistic over all outputs (needs enough of them to mean anything): rounding x to its
    # 8-bit grid errs by at most d / 2 per element, about uniformly, so the error vector's expected
    # squared norm is sum_n sum_k w_nk^2 d_k^2 / 12. Its norm must stay within 5x that model's
    # (plus the accumulation's and the output's rounding): even an error that is one common mode
    # (one normal draw) passes but for a chance below 1e-6, while a wrong scale or a lost block is
    # far outside it. (A fixed 2 % bound failed for about 1 draw in 300 of a single-block K.)
    norm = np.linalg.norm(ref_b)
    if got.size >= 100 and norm > 0:
        model = np.sqrt(np.sum((d_k ** 2 / 12) @ (wdeq ** 2).T))
        rel, bound = np.linalg.norm(got - ref_b) / norm, (5 * model + np.linalg.norm(acc)) / norm + 2 * u
        assert rel < bound, f"(c) relative error {rel:.4f} above the quantization model's {bound:.4f}"


def assert_within(got, ref, tol, what):
    err = np.abs(got - ref)
    bad = ~(err <= tol)
    if bad.any():
        i = tuple(int(v) for v in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} elements outside tolerance; first at "
                             f"{i}: got {got[i]!r}, expected {ref[i]!r}, tol {tol[i]:.3g}")


def make_x(gen, M, K, dtype, kind):
    if kind == "contiguous":
        return randn(M, K, dtype=dtype, gen=gen)
    if kind in ("transposed", "sliced"):
        x, x64 = randn(M, K, dtype=dtype, gen=gen)
        return strided(x, kind), x64
    if kind == "rows":  # every third row of a taller buffer
        big, big64 = randn(3 * M, K, dtype=dtype, gen=gen)
        return big[::3], big64[::3]
    raise ValueError(kind)


def run_case(gen, wtype, M, K, N, x_dtype=ip.float32, out_dtype=ip.float32, with_bias=False,
             x_kind="contiguous"):
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    w, wdeq, off = make_w(rng, wtype, N, K)
    x, x64 = make_x(gen, M, K, x_dtype, x_kind)
    b, b64 = randn(N, dtype=ip.float32, gen=gen, scale=0.1) if with_bias else (None, None)
    out = ip.Tensor.full((M, N), float("nan"), dtype=out_dtype)  # every element must be written
    c_matmul(out, x, w, b)
    check_result(out_values(out), x64.numpy(), wtype, wdeq, off,
                 None if b64 is None else b64.numpy(), out_dtype)


# ---- numerics ----

SIZES_M = (1, 2, 3, 5, 8, 17, 64)
SIZES_N = (1, 7, 33, 100)
BLOCKS = {32: (1, 3, 18, 48), 256: (1, 2, 6)}  # K in blocks, rotating over the cases
SHAPES = [(wt, M, N) for wt in WTYPES for M in SIZES_M for N in SIZES_N]


@pytest.mark.parametrize("wtype,M,N", SHAPES, ids=[f"{wt}-M{M}-N{N}" for wt, M, N in SHAPES])
def test_shapes(simd, gen, wtype, M, N):
    """Odd M (panels of 4 rows of x, ragged last panel) and N (pairs of weight rows, an odd last
    one), K over several block counts, x dtype and bias rotating over the cases."""
    i = SHAPES.index((wtype, M, N))
    bs = BLOCK[wtype][0]
    K = bs * BLOCKS[bs][i % len(BLOCKS[bs])]
    run_case(gen, wtype, M, K, N, x_dtype=FLOAT_DTYPES[i % 3], with_bias=i % 2 == 0)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=lambda d: "o" + NAMES[d])
@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=lambda d: "x" + NAMES[d])
@pytest.mark.parametrize("wtype", WTYPES)
def test_dtypes(simd, gen, wtype, x_dtype, out_dtype, with_bias):
    K = 2 * BLOCK[wtype][0] if BLOCK[wtype][0] == 256 else 96
    run_case(gen, wtype, 3, K, 13, x_dtype, out_dtype, with_bias)


@pytest.mark.parametrize("M", [2, 9])
@pytest.mark.parametrize("kind", ["transposed", "sliced", "rows"])
@pytest.mark.parametrize("wtype", ["q4_1", "q4_k", "q6_k"])
def test_strided_x(simd, gen, wtype, M, kind):
    run_case(gen, wtype, M, 512, 21, ip.bfloat16, ip.float32, with_bias=True, x_kind=kind)


@pytest.mark.parametrize("wtype", WTYPES)
def test_prefill_chunks(simd, gen, wtype):
    """Enough rows that x is walked in two chunks of panels (192 KB of quantized x each)."""
    run_case(gen, wtype, 130, 1536, 37, ip.float32, ip.float32, with_bias=True)


@pytest.mark.parametrize("wtype", WTYPES)
def test_weight_row_slice(simd, gen, wtype):
    """w as every other row of a taller quantized matrix (rows two row-lengths apart)."""
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    N, K = 9, 2 * BLOCK[wtype][0]
    big, wdeq, off = make_w(rng, wtype, 2 * N, K)
    w = big[::2]
    x, x64 = randn(5, K, gen=gen)
    out = ip.Tensor.empty(5, N)
    c_matmul(out, x, w)
    check_result(out_values(out), x64.numpy(), wtype, wdeq[::2], off[::2], None, ip.float32)


def test_zero_rows_of_x(simd, gen):
    """An all-zero row of x (scale 0) gives exactly the bias."""
    rng = np.random.default_rng(1)
    w, _, _ = make_w(rng, "q4_1", 7, 64)
    x = ip.Tensor.zeros(3, 64)
    b, b64 = randn(7, gen=gen)
    out = ip.Tensor.empty(3, 7)
    c_matmul(out, x, w, b)
    assert np.array_equal(out_values(out), np.broadcast_to(b64.numpy(), (3, 7)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("wtype", ["q8_0", "q4_1", "q4_k"])
@pytest.mark.parametrize("M", [1, 6])
def test_nonfinite_x_spoils_its_row_only(simd, gen, wtype, M, bad):
    """A NaN or inf in x makes its output row NaN (it must not drop out of the block maximum
    silently); the other rows are untouched."""
    rng = np.random.default_rng(7)
    K, N = 2 * BLOCK[wtype][0], 9
    w, wdeq, off = make_w(rng, wtype, N, K)
    xt = torch.randn(M, K, generator=gen, dtype=torch.float64).float()
    xt[M - 1, 5] = bad
    x = from_torch(xt)
    out = ip.Tensor.empty(M, N)
    c_matmul(out, x, w)
    got = out_values(out)
    assert np.isnan(got[M - 1]).all()
    if M > 1:
        check_result(got[:M - 1], xt[:M - 1].double().numpy(), wtype, wdeq, off, None, ip.float32)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_empty_k(with_bias):
    """K = 0: no blocks at all; out is the bias (or zeros)."""
    w = ip.Tensor.frombuffer(bytearray(8), "q4_k", shape=(3, 0))
    b = ip.Tensor.full((3,), 2.5) if with_bias else None
    out = ip.Tensor.full((2, 3), float("nan"))
    c_matmul(out, ip.Tensor.zeros(2, 0), w, b)
    assert np.array_equal(out_values(out), np.full((2, 3), 2.5 if with_bias else 0.0))


@pytest.mark.parametrize("M", [1, 3, 70])
def test_same_bits_for_any_thread_count(gen, M):
    rng = np.random.default_rng(2)
    w, _, _ = make_w(rng, "q4_k", 301, 512)
    x, _ = randn(M, 512, dtype=ip.bfloat16, gen=gen)
    before = ip.num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            ip.set_num_threads(n)
            out = ip.Tensor.empty(M, 301)
            c_matmul(out, x, w)
            results.append(out_values(out))
    finally:
        ip.set_num_threads(before)
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


# ---- errors ----

def test_quantized_x_or_out_refused():
    rng = np.random.default_rng(3)
    w, _, _ = make_w(rng, "q8_0", 4, 64)
    xq, _, _ = make_w(rng, "q8_0", 2, 64)
    with pytest.raises(TensorOpsError, match="block-quantized dtypes are only for w"):
        c_matmul(ip.Tensor.empty(2, 4), xq, w)
    outq, _, _ = make_w(rng, "q8_0", 2, 32)
    x = ip.Tensor.zeros(2, 64)
    w32, _, _ = make_w(rng, "q8_0", 32, 64)
    with pytest.raises(TensorOpsError, match="block-quantized dtypes are only for w"):
        c_matmul(outq, x, w32)


def test_k_mismatch_refused():
    rng = np.random.default_rng(4)
    w, _, _ = make_w(rng, "q4_k", 4, 256)
    with pytest.raises(TensorOpsError, match="inner dimensions"):
        c_matmul(ip.Tensor.empty(2, 4), ip.Tensor.zeros(2, 255), w)
    with pytest.raises(TensorOpsError, match="inner dimensions"):
        c_matmul(ip.Tensor.empty(2, 4), ip.Tensor.zeros(2, 512), w)


def test_quantized_bias_refused():
    rng = np.random.default_rng(5)
    w, _, _ = make_w(rng, "q4_0", 32, 32)
    b, _, _ = make_w(rng, "q4_0", 1, 32)
    with pytest.raises(TensorOpsError, match="bias"):
        c_matmul(ip.Tensor.empty(2, 32), ip.Tensor.zeros(2, 32), w, b.reshape(32))


def test_short_weight_buffer_refused():
    """A weight descriptor whose buffer holds fewer bytes than its blocks need."""
    rng = np.random.default_rng(6)
    raw = make_raw(rng, "q4_1", 4, 64)
    with pytest.raises(ValueError):
        ip.Tensor.frombuffer(raw.tobytes()[:-1], "q4_1", shape=(4, 64))
    w = ip.Tensor.frombuffer(raw.tobytes(), "q4_1", shape=(4, 64))
    d = ip.ffi.new("to_tensor *")
    d[0] = w._desc[0]
    d.nbytes -= 1
    out, x = ip.Tensor.empty(1, 4), ip.Tensor.zeros(1, 64)
    with pytest.raises(TensorOpsError, match="needs 160 bytes"):
        check(ip.lib.to_matmul(out._desc, x._desc, d, ip.ffi.NULL))


# ---- q4_0x8 / q4_1x8 / q8_0x8: q4_0 / q4_1 / q8_0 blocks interleaved by 8 rows ----

X8 = ["q4_0x8", "q4_1x8", "q8_0x8"]


def plain_of(x8):
    return x8[:4]


def tensor_bytes(t):
    return np.frombuffer(ctypes.string_at(t.data_ptr(), t.nbytes), dtype=np.uint8)


def x8_layout(raw, x8, N, K):
    """The documented layout, built independently in numpy from the plain blocks [N, K/32 * bb]:
    per group of 8 rows and block b, the 8 rows' f16 d (q4_1: then their 8 m), then the quant
    bytes, in which byte 32 j + 4 r + t is byte 4 j + t of row r's (16 of nibbles, or 32)."""
    bb, head = BLOCK[plain_of(x8)][1], (4 if x8 == "q4_1x8" else 2)
    G, nb = N // 8, K // 32
    blocks = raw.reshape(G, 8, nb, bb).transpose(0, 2, 1, 3)  # [G, nb, row r, bytes]
    parts = [blocks[..., 0:2].reshape(G, nb, 16)]
    if x8 == "q4_1x8":
        parts.append(blocks[..., 2:4].reshape(G, nb, 16))
    qb = bb - head
    quants = blocks[..., head:].reshape(G, nb, 8, qb // 4, 4).transpose(0, 1, 3, 2, 4)  # [G, nb, j, r, t]
    parts.append(quants.reshape(G, nb, 8 * qb))
    return np.concatenate(parts, axis=-1).reshape(-1)


def make_w_x8(rng, x8, N, K):
    w, wdeq, off = make_w(rng, plain_of(x8), N, K)
    return ip.ops.quantize(w, x8), wdeq, off


@pytest.mark.parametrize("x8", X8)
def test_x8_layout_and_round_trip(x8):
    """Repacking puts every byte where the layout says; unpacking gives the plain blocks back
    bit for bit; dequantizing either gives gguf's values."""
    rng = np.random.default_rng(11)
    N, K = 24, 96
    raw = make_raw(rng, plain_of(x8), N, K)
    w = ip.Tensor.frombuffer(raw.tobytes(), plain_of(x8), shape=(N, K))
    packed = ip.ops.quantize(w, x8)
    assert packed.dtype.name == x8 and packed.shape == (N, K) and packed.nbytes == w.nbytes
    assert np.array_equal(tensor_bytes(packed), x8_layout(raw, x8, N, K))
    assert np.array_equal(tensor_bytes(ip.ops.quantize(packed, plain_of(x8))), raw.reshape(-1))
    ref = dequantize(raw, GGML[plain_of(x8)]).reshape(N, K)
    assert np.array_equal(out_values(ip.ops.dequantize(packed)), ref)


X8_SHAPES = [(x8, M, N) for x8 in X8 for M in (1, 2, 3, 5, 17, 64) for N in (8, 24, 104)]


@pytest.mark.parametrize("x8,M,N", X8_SHAPES, ids=[f"{x}-M{M}-N{N}" for x, M, N in X8_SHAPES])
def test_x8_shapes(simd, gen, x8, M, N):
    """Against the same two oracles as the plain types: ragged panels of x, one to 13 groups of
    8 weight rows, K over several block counts, x dtype and bias rotating."""
    i = X8_SHAPES.index((x8, M, N))
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    K = 32 * BLOCKS[32][i % len(BLOCKS[32])]
    w, wdeq, off = make_w_x8(rng, x8, N, K)
    x, x64 = make_x(gen, M, K, FLOAT_DTYPES[i % 3], "rows" if i % 4 == 3 else "contiguous")
    b, b64 = randn(N, dtype=ip.float32, gen=gen, scale=0.1) if i % 2 == 0 else (None, None)
    out = ip.Tensor.full((M, N), float("nan"), dtype=FLOAT_DTYPES[(i + 1) % 3])
    c_matmul(out, x, w, b)
    check_result(out_values(out), x64.numpy(), plain_of(x8), wdeq, off,
                 None if b64 is None else b64.numpy(), out.dtype)


@pytest.mark.parametrize("x8", X8)
def test_x8_prefill_chunks_and_threads(gen, x8):
    """x walked in two chunks of panels; the same bits with 1, 2 or 3 threads."""
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    w, wdeq, off = make_w_x8(rng, x8, 40, 1536)
    x, x64 = randn(130, 1536, gen=gen)
    before, results = ip.num_threads(), []
    try:
        for n in (1, 2, 3):
            ip.set_num_threads(n)
            out = ip.Tensor.empty(130, 40)
            c_matmul(out, x, w)
            results.append(out_values(out))
    finally:
        ip.set_num_threads(before)
    check_result(results[0], x64.numpy(), plain_of(x8), wdeq, off, None, ip.float32)
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_x8_from_floats_and_to_other_types():
    """ops.quantize reaches and leaves an interleaved type through its plain type."""
    rng = np.random.default_rng(12)
    a = rng.standard_normal((16, 64)).astype(np.float32)
    f = ip.Tensor.frombuffer(a.tobytes(), ip.float32, (16, 64), copy=True)
    via_plain = ip.ops.dequantize(ip.ops.quantize(f, "q4_1"))
    packed = ip.ops.quantize(f, "q4_1x8")
    assert np.array_equal(out_values(ip.ops.dequantize(packed)), out_values(via_plain))
    other = ip.ops.quantize(packed, "q4_0x8")
    assert np.array_equal(out_values(ip.ops.dequantize(other)),
                          out_values(ip.ops.dequantize(ip.ops.quantize(via_plain, "q4_0"))))


def test_x8_misuse_refused():
    rng = np.random.default_rng(13)
    raw = make_raw(rng, "q4_1", 16, 64)
    with pytest.raises(TensorOpsError, match="multiple of 8 rows"):
        ip.ops.quantize(ip.Tensor.frombuffer(raw[:12].tobytes(), "q4_1", shape=(12, 64)), "q4_1x8")
    packed = ip.ops.quantize(ip.Tensor.frombuffer(raw.tobytes(), "q4_1", shape=(16, 64)), "q4_1x8")
    with pytest.raises(TensorOpsError, match="multiple of 8 rows"):  # a view of 4 rows
        c_matmul(ip.Tensor.empty(1, 4), ip.Tensor.zeros(1, 64), packed[:4])
    for target in ("float32", "q8_0", "q4_0", "q8_0x8"):  # each converts to its plain type only
        out = ip.Tensor.empty(16, 64, dtype=target)
        with pytest.raises(TensorOpsError, match="q4_1x8 converts only to and from q4_1|q8_0x8 converts only to and from q8_0"):
            check(ip.lib.to_copy(out._desc, packed._desc))
    with pytest.raises(TensorOpsError, match="expected one of"):
        check(ip.lib.to_fill(packed._desc, 0.0))


@pytest.mark.parametrize("x8", X8)
def test_x8_embedding_rows(x8):
    """An interleaved table (a tied embedding that is also the head) looks its rows up as the
    plain table does: the same dequantized values, for every row of a group."""
    rng = np.random.default_rng(14)
    raw = make_raw(rng, plain_of(x8), 24, 64)
    plain = ip.Tensor.frombuffer(raw.tobytes(), plain_of(x8), shape=(24, 64))
    packed = ip.ops.quantize(plain, x8)
    ids = ip.Tensor.frombuffer(np.array([0, 7, 8, 23, 13, 7], np.int64).tobytes(), ip.int64, (6,))
    assert np.array_equal(out_values(ip.ops.embedding(packed, ids)), out_values(ip.ops.embedding(plain, ids)))
    with pytest.raises(TensorOpsError, match="outside"):
        ip.ops.embedding(packed, ip.Tensor.frombuffer(np.array([24], np.int64).tobytes(), ip.int64, (1,)))
