"""to_matmul on the GPU (csrc/cuda/matmul.cu): out[M, N] = x[M, K] . w[N, K]^T (+ bias[N]).

Oracle: torch float64 on exactly the values our tensors hold (inputs drawn in float64 and rounded
to their dtype first). Quantized w: its values are our CPU dequantization (ip.ops.dequantize,
GGML's arithmetic, which the GPU kernels repeat operation for operation), in float64. The GPU
keeps x in f32 (it does not quantize activations as the CPU path does), so quantized and float
weights get the same bound.

Tolerance per output element (u32 = 2^-24): every path accumulates in f32 (the tensor-core path
multiplies bf16/f16 pairs exactly and accumulates in f32 too), over n = K + 1 terms. With
A = sum_k |x_k w_k| + |b|,
    acc = min(n, 2 sqrt(n)) * u32 * A
(the worst case for tiny K, the probabilistic random-walk bound beyond: see
tests/kernels/test_matmul.py), plus one rounding to out's dtype:
    |got - ref| <= acc + u_out * (|ref| + acc) + tiny_out
with u_out = 2^-24 / 2^-11 / 2^-8 for f32 / f16 / bf16 and tiny_out half the subnormal spacing.

Paths: M <= 8 is the GEMV (one warp per weight row; for block-quantized w and an f32 x with unit
stride, the streaming kernel of csrc/cuda/gemv_quant.cu: see its section), 9 <= M <= 64 against
16-bit w the batched-decode product where its plan applies (csrc/cuda/gemm_skinny.cu: see its
section; it rounds x to w's dtype like the tiled GEMMs), M > 8 otherwise a tiled GEMM
(tensor cores when w is bf16 or f16: an x of another dtype is first rounded to w's, which the
reference repeats, see tensor_core_x; an f32 FMA tile otherwise); the shapes straddle both. On Hopper (a build
with sm_90a) bf16/f16 products that TMA can read go to the wgmma GEMM of csrc/cuda/gemm_sm90.cu:
see "the Hopper GEMM" below.
"""
import math

import numpy as np
import pytest
import torch

import inference_pio as ip
from inference_pio import ops

from helpers import FLOAT_DTYPES, TORCH_DTYPES, assert_within, from_torch, randn, to_torch

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")

U32 = 2.0 ** -24
U_OUT = {ip.float32: 2.0 ** -24, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY_OUT = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}
DTYPE_COMBOS = [(x, w, o) for x in FLOAT_DTYPES for w in FLOAT_DTYPES for o in FLOAT_DTYPES]

QTYPES = ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"]
BLOCK = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (256, 144), "q6_k": (256, 210)}


# ---- inputs ----

def f16_field(rng, shape, lo, hi):
    """Random positive f16 values in [lo, hi) as raw bytes, shape + (2,)."""
    return rng.uniform(lo, hi, shape).astype(np.float16).view(np.uint8).reshape(shape + (2,))


def make_qw(gen, wtype, N, K):
    """(our CPU tensor of block type wtype [N, K], its values float64 [N, K]). Q8_0/Q4_0/Q4_1 are
    quantized from normal values with gguf; Q4_K/Q6_K are random block bytes with sane f16
    scales (every bit pattern of their quants and sub-block scales is valid)."""
    from gguf import GGMLQuantizationType as GT
    from gguf.quants import quantize
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
    bs, bb = BLOCK[wtype]
    if wtype in ("q8_0", "q4_0", "q4_1"):
        w = rng.standard_normal((N, K)).astype(np.float32) * 0.05
        if wtype == "q4_1":
            w += rng.uniform(-0.02, 0.02, (N, K // bs, 1)).repeat(bs, -1).reshape(N, K).astype(np.float32)
        raw = quantize(w, {"q8_0": GT.Q8_0, "q4_0": GT.Q4_0, "q4_1": GT.Q4_1}[wtype])
    else:
        nb = K // bs
        raw = rng.integers(0, 256, (N, nb, bb), dtype=np.uint8)
        if wtype == "q4_k":
            raw[:, :, 0:2] = f16_field(rng, (N, nb), 1e-3, 4e-3)  # d
            raw[:, :, 2:4] = f16_field(rng, (N, nb), 1e-3, 4e-3)  # dmin
        else:
            raw[:, :, 208:210] = f16_field(rng, (N, nb), 1e-4, 4e-4)  # d
        raw = raw.reshape(N, nb * bb)
    t = ip.Tensor.frombuffer(np.ascontiguousarray(raw).tobytes(), wtype, shape=(N, K))
    w64 = to_torch(ops.dequantize(t)).to(torch.float64) if N * K else torch.zeros(N, K, dtype=torch.float64)
    return t, w64


def make_x(gen, M, K, dtype, kind):
    """x [M, K] on the GPU in the given layout (views made on the device: a host -> device
    transfer makes a tensor contiguous), and its float64 values."""
    if kind == "contiguous":
        x, x64 = randn(M, K, dtype=dtype, gen=gen)
        return x.to("cuda"), x64
    if kind == "transposed":  # column-major: strides (1, M)
        xt, xt64 = randn(K, M, dtype=dtype, gen=gen)
        return xt.to("cuda").T, xt64.T
    if kind == "sliced":  # every other column of a wider buffer: strides (2K, 2)
        wide, wide64 = randn(M, 2 * K, dtype=dtype, gen=gen)
        return wide.to("cuda")[:, ::2], wide64[:, ::2]
    if kind == "rows":  # every other row of a taller buffer: strides (2K, 1)
        big, big64 = randn(2 * M, K, dtype=dtype, gen=gen)
        return big.to("cuda")[::2], big64[::2]
    raise ValueError(kind)


def make_out(M, N, dtype):
    """A GPU out [M, N] full of NaN (every element must be written)."""
    return from_torch(torch.full((M, N), float("nan"), dtype=torch.float32)).to(dtype=dtype).to("cuda")


# ---- checking ----

def reference(x64, w64, b64):
    ref = x64 @ w64.T
    mag = x64.abs() @ w64.abs().T
    if b64 is not None:
        ref, mag = ref + b64, mag + b64.abs()
    return ref, mag


def assert_close(out, ref, mag, K, out_dtype):
    got = to_torch(out.cpu()).to(torch.float64)
    assert got.shape == ref.shape
    n = K + 1
    acc = min(n, 2.0 * math.sqrt(n)) * U32 * mag
    tol = acc + U_OUT[out_dtype] * (ref.abs() + acc) + TINY_OUT[out_dtype]
    assert_within(got, ref, tol)


def run_case(gen, M, K, N, x_dtype, w_dtype, out_dtype, with_bias, x_kind="contiguous", bias_dtype=None):
    x, x64 = make_x(gen, M, K, x_dtype, x_kind)
    if w_dtype in QTYPES:
        w, w64 = make_qw(gen, w_dtype, N, K)
    else:
        w, w64 = randn(N, K, dtype=w_dtype, gen=gen)
    b, b64 = randn(N, dtype=bias_dtype or out_dtype, gen=gen) if with_bias else (None, None)
    out = make_out(M, N, out_dtype)
    ops.matmul(x, w.to("cuda"), b.to("cuda") if b is not None else None, out=out)
    ref, mag = reference(tensor_core_x(x64, M, x_dtype, w_dtype), w64, b64)
    assert_close(out, ref, mag, K, out_dtype)


def tensor_core_x(x64, M, x_dtype, w_dtype):
    """The x values the product uses: more than 8 rows against 16-bit weights go to the tensor
    cores, which take x rounded to the weights' dtype (once, from x's own values)."""
    if M > 8 and w_dtype in (ip.bfloat16, ip.float16) and x_dtype != w_dtype:
        return x64.to(TORCH_DTYPES[w_dtype]).to(torch.float64)
    return x64


# ---- dtypes ----

@pytest.mark.parametrize("M", [3, 37], ids=["gemv", "gemm"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("x_dtype,w_dtype,out_dtype", DTYPE_COMBOS,
                         ids=[f"x{NAMES[x]}-w{NAMES[w]}-o{NAMES[o]}" for x, w, o in DTYPE_COMBOS])
def test_dtypes(gen, M, with_bias, x_dtype, w_dtype, out_dtype):
    """Every float combination of x, w and out, with and without a bias (of out's dtype)."""
    run_case(gen, M, 300, 45, x_dtype, w_dtype, out_dtype, with_bias)


@pytest.mark.parametrize("bias_dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_bias_dtypes(gen, bias_dtype):
    for M in (2, 20):
        run_case(gen, M, 64, 33, ip.bfloat16, ip.bfloat16, ip.float32, True, bias_dtype=bias_dtype)


# ---- shapes ----

SIZES_M = (1, 2, 3, 5, 8, 17, 64, 130)
SIZES_N = (1, 7, 33, 100, 257)
SIZES_K = (1, 31, 64, 1000)
SHAPES = [(M, K, N) for M in SIZES_M for K in SIZES_K for N in SIZES_N]


@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"M{M}-K{K}-N{N}" for M, K, N in SHAPES])
def test_shapes(gen, M, K, N):
    """Odd sizes around every edge (GEMV row groups 1/2/4/8, 64-wide GEMM tiles, 16-byte
    vectors of 4 or 8 elements, K steps of 16 and 32), the dtype combination and bias rotating."""
    i = SHAPES.index((M, K, N))
    x_dtype, w_dtype, out_dtype = DTYPE_COMBOS[(7 * i) % len(DTYPE_COMBOS)]
    run_case(gen, M, K, N, x_dtype, w_dtype, out_dtype, with_bias=i % 2 == 0)


@pytest.mark.parametrize("M", [1, 5, 130])
@pytest.mark.parametrize("wd", [ip.bfloat16, ip.float16, ip.float32], ids=lambda d: NAMES[d])
def test_tensor_core_and_vector_paths(gen, M, wd):
    """x and w of one dtype (the tensor-core GEMM for bf16/f16, 16-byte GEMV loads), K spanning
    several GEMV chunks of x (8192 / rows floats) and a ragged tail."""
    run_case(gen, M, 9000 + 3, 70, wd, wd, ip.float32, with_bias=True)


@pytest.mark.parametrize("M,K,N", [(0, 16, 5), (4, 16, 0), (20, 16, 0), (3, 0, 7), (20, 0, 7)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_empty(gen, M, K, N, with_bias):
    """M, N or K = 0: out = bias (or 0) when there is anything to write."""
    x, x64 = randn(M, K, dtype=ip.float32, gen=gen)
    w, w64 = randn(N, K, dtype=ip.bfloat16, gen=gen)
    b, b64 = randn(N, dtype=ip.float32, gen=gen) if with_bias else (None, None)
    out = ops.matmul(x.to("cuda"), w.to("cuda"), b.to("cuda") if b is not None else None)
    assert out.shape == (M, N) and out.device == x.to("cuda").device
    ref, _ = reference(tensor_core_x(x64, M, ip.float32, ip.bfloat16), w64, b64)
    assert torch.equal(to_torch(out.cpu()).to(torch.float64), ref)


# ---- layouts ----

@pytest.mark.parametrize("M", [2, 8, 37], ids=["gemv2", "gemv8", "gemm"])
@pytest.mark.parametrize("kind", ["transposed", "sliced", "rows"])
@pytest.mark.parametrize("dt", [ip.bfloat16, ip.float32], ids=lambda d: NAMES[d])
def test_strided_x(gen, M, kind, dt):
    run_case(gen, M, 70, 50, dt, dt, ip.float32, with_bias=True, x_kind=kind)


@pytest.mark.parametrize("M", [1, 3, 40], ids=["gemv1", "gemv3", "gemm"])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_out_row_slice(gen, M, out_dtype):
    """out as columns [3, 3 + N) of a wider buffer (rows N + 8 apart); the columns around it
    keep their values."""
    K, N = 65, 37
    x, x64 = randn(M, K, dtype=ip.bfloat16, gen=gen)
    w, w64 = randn(N, K, dtype=ip.bfloat16, gen=gen)
    b, b64 = randn(N, dtype=ip.float32, gen=gen)
    sentinel = torch.full((M, N + 8), 7.0, dtype=torch.float32)
    wide = from_torch(sentinel).to(dtype=out_dtype).to("cuda")
    ops.matmul(x.to("cuda"), w.to("cuda"), b.to("cuda"), out=wide[:, 3:3 + N])
    got = to_torch(wide.cpu()).to(torch.float64)
    assert (got[:, :3] == 7).all() and (got[:, 3 + N:] == 7).all()
    ref, mag = reference(x64, w64, b64)
    n = K + 1
    acc = min(n, 2.0 * math.sqrt(n)) * U32 * mag
    assert_within(got[:, 3:3 + N], ref, acc + U_OUT[out_dtype] * (ref.abs() + acc) + TINY_OUT[out_dtype])


def test_weight_row_slice(gen):
    """w rows further apart than K (a column slice of a wider weight, 16-byte aligned rows and
    not): the kernels follow w's row stride (the GEMV, the tiled GEMMs and, K = 128 with aligned
    rows, the batched-decode product; unaligned rows leave it to the others)."""
    N = 21
    for extra in (8, 3):  # 8 bf16 = 16 bytes keeps rows aligned for the vector loads; 3 does not
        for M, K in ((3, 40), (30, 40), (24, 128)):
            x, x64 = randn(M, K, dtype=ip.float32, gen=gen)
            wide, wide64 = randn(N, K + extra, dtype=ip.bfloat16, gen=gen)
            out = ops.matmul(x.to("cuda"), wide.to("cuda")[:, :K])
            ref, mag = reference(tensor_core_x(x64, M, ip.float32, ip.bfloat16), wide64[:, :K], None)
            assert_close(out, ref, mag, K, ip.float32)


# ---- quantized weights ----

@pytest.mark.parametrize("wtype", QTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 17, 64, 130])
def test_quantized(gen, wtype, M):
    bs = BLOCK[wtype][0]
    for N, K in ((7, bs), (33, 4 * bs), (100, 9 * bs if bs == 32 else 3 * bs)):
        x_dtype, out_dtype = FLOAT_DTYPES[M % 3], FLOAT_DTYPES[(M + N) % 3]
        run_case(gen, M, K, N, x_dtype, wtype, out_dtype, with_bias=N % 2 == 1)


@pytest.mark.parametrize("wtype", QTYPES)
@pytest.mark.parametrize("kind", ["transposed", "sliced"])
def test_quantized_strided_x(gen, wtype, kind):
    for M in (2, 20):
        run_case(gen, M, 512, 19, ip.float32, wtype, ip.float32, True, x_kind=kind)


@pytest.mark.parametrize("wtype", QTYPES)
def test_quantized_long_rows(gen, wtype):
    """K over several GEMV chunks of x (8192 floats at M = 1, 1024 at M = 8)."""
    for M in (1, 8, 12):
        run_case(gen, M, 9216 if BLOCK[wtype][0] == 256 else 8224, 9, ip.bfloat16, wtype, ip.float32, True)


# ---- quantized weights: the streaming GEMV (csrc/cuda/gemv_quant.cu) ----
#
# Up to 8 rows of an f32 x (unit stride, 16-byte aligned rows) against block-quantized w take the
# streaming kernel: row pairs per warp, each step's bytes copied into shared memory and decoded
# block by block. Its epilogues are checked here too: bias, to_matmul_add, the norm of
# to_rms_norm_matmul folded into the loop and the SwiGLU of to_rms_norm_swiglu. K covers one step
# and several, rows 16-byte aligned (K % 256 == 0 for Q8_0 / Q4_0 / Q4_1 / Q4_K) and not (32 * 37
# for the 32-element types; every Q6_K row here: 210 bytes per block); N is odd, so the last
# warp holds a single row. INFERENCE_PIO_GEMV_QUANT=1/2/4 forces the number of warps splitting
# each row pair (its steps taken in turn, the partial sums added in shared memory).

QGEMV_K = {32: (256, 768, 2560, 32 * 37), 256: (256, 768, 2560)}
QGEMV_CASES = [(w, M, K) for w in QTYPES for M in (1, 2, 3, 8) for K in QGEMV_K[BLOCK[w][0]]]
EPS = 1e-6


def qgemv_operands(gen, wtype, M, K, N, skip_rows=0):
    """x f32 [M, K] on the GPU, w [N, K] of wtype on the GPU (rows skip_rows.. of a taller
    weight when skip_rows > 0: a base that is not 16-byte aligned unless the rows are), and their
    float64 values."""
    x, x64 = randn(M, K, dtype=ip.float32, gen=gen, scale=2.0)
    w, w64 = make_qw(gen, wtype, N + skip_rows, K)
    wd = w.to("cuda")
    if skip_rows:
        wd, w64 = wd[skip_rows:], w64[skip_rows:]
    return x.to("cuda"), x64, wd, w64


def norm_reference(x64, g64, w64, b64, staged=None):
    """rms_norm(x) . w^T (+ b) in float64, its magnitude sum |normed| |w| (+ |b|) and the
    accumulated f32 error allowed: the dots' (x g rounded per term, then the sum, n = K + 1
    terms), the sum of squares' (half of it reaches rinv), and a few roundings (rinv, the
    product by rinv, the bias). staged: the torch dtype x g is rounded to (from its f32 value)
    before the product, as the batched product does; None: exact."""
    K = x64.shape[1]
    xg = x64 * g64
    if staged is not None:
        xg = xg.to(torch.float32).to(staged).to(torch.float64)
    normed = xg / torch.sqrt((x64 * x64).mean(dim=1, keepdim=True) + EPS)
    ref, mag = reference(normed, w64, b64)
    n = K + 1
    acc = (min(n, 2.0 * math.sqrt(n)) + 0.5 * min(K, 2.0 * math.sqrt(K)) + 4) * U32 * mag
    return ref, mag, acc


@pytest.mark.parametrize("wtype,M,K", QGEMV_CASES, ids=[f"{w}-M{M}-K{K}" for w, M, K in QGEMV_CASES])
def test_quant_gemv(gen, wtype, M, K):
    """The product with out of each float dtype and a bias (of out's dtype) or none."""
    i = QGEMV_CASES.index((wtype, M, K))
    run_case(gen, M, K, 37, ip.float32, wtype, FLOAT_DTYPES[i % 3], with_bias=i % 2 == 0)


@pytest.mark.parametrize("wtype", QTYPES)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_quant_gemv_accumulate(gen, wtype, M):
    """to_matmul_add: out += x . w^T + bias, formed in f32 and rounded once to out's dtype."""
    K = 32 * 37 if BLOCK[wtype][0] == 32 else 768
    for i, out_dtype in enumerate(FLOAT_DTYPES):
        x, x64, w, w64 = qgemv_operands(gen, wtype, M, K, 45)
        b, b64 = randn(45, dtype=ip.float32, gen=gen)
        old, old64 = randn(M, 45, dtype=out_dtype, gen=gen)
        out = old.to("cuda")
        assert ops.matmul_add(out, x, w, b.to("cuda") if i != 1 else None) is out
        ref, mag = reference(x64, w64, b64 if i != 1 else None)
        ref, mag = ref + old64, mag + old64.abs()
        assert_close(out, ref, mag, K + 1, out_dtype)


@pytest.mark.parametrize("wtype", QTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 8])
@pytest.mark.parametrize("K", [256, 2560])
def test_quant_gemv_norm(gen, wtype, M, K):
    """to_rms_norm_matmul: x's rows RMS-normalised inside the product (rinv from the sum of squares
    of the x values the dots read) with a norm weight of each float dtype, against the float64
    norm and product."""
    for i, g_dtype in enumerate(FLOAT_DTYPES):
        out_dtype = FLOAT_DTYPES[(i + M) % 3]
        x, x64, w, w64 = qgemv_operands(gen, wtype, M, K, 37)
        g, g64 = randn(K, dtype=g_dtype, gen=gen)
        b, b64 = randn(37, dtype=ip.float32, gen=gen) if i != 2 else (None, None)
        out = make_out(M, 37, out_dtype)
        ops.rms_norm_matmul(x, g.to("cuda"), EPS, w, b.to("cuda") if b is not None else None, out=out)
        ref, _, acc = norm_reference(x64, g64, w64, b64)
        got = to_torch(out.cpu()).to(torch.float64)
        assert_within(got, ref, acc + U_OUT[out_dtype] * (ref.abs() + acc) + TINY_OUT[out_dtype])


def silu64(z):
    return z / (1.0 + torch.exp(-z))


def assert_swiglu(out, p, mag, acc, out_dtype):
    """out = silu(gate) * up of the product p (gate and up its even and odd columns), each dot
    within acc (norm_reference's bound), carried through silu (slope at most 1.1) and the product,
    plus the activation's own few f32 roundings and out's."""
    tol_p = acc + U32 * (p.abs() + acc)  # the dots stay f32 until the activation
    gate, up, tg, tu = p[:, 0::2], p[:, 1::2], tol_p[:, 0::2], tol_p[:, 1::2]
    ref = silu64(gate) * up
    tol = 1.1 * (up.abs() + tu) * tg + (silu64(gate).abs() + 1.1 * tg) * tu + 8 * U32 * ref.abs()
    got = to_torch(out.cpu()).to(torch.float64)
    assert_within(got, ref, tol + U_OUT[out_dtype] * (ref.abs() + tol) + TINY_OUT[out_dtype])


@pytest.mark.parametrize("wtype", QTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 8])
def test_quant_gemv_swiglu(gen, wtype, M):
    """to_rms_norm_swiglu: w's rows interleave gate and up (19 pairs); out[m, i] = silu(gate) * up
    of the normalised product (with its bias), against float64: each dot within
    test_quant_gemv_norm's bound, carried through silu (slope at most 1.1) and the product, plus
    the activation's own few f32 roundings and out's. On the GPU too, within 1e-6 of the separate
    ops (rms_norm_matmul, then silu_mul of its even and odd columns)."""
    K = 32 * 37 if BLOCK[wtype][0] == 32 else 768
    for i, out_dtype in enumerate(FLOAT_DTYPES):
        x, x64, w, w64 = qgemv_operands(gen, wtype, M, K, 38)
        g, g64 = randn(K, dtype=ip.bfloat16, gen=gen)
        b, b64 = randn(38, dtype=ip.float32, gen=gen) if i != 1 else (None, None)
        bd, gd = (b.to("cuda") if b is not None else None), g.to("cuda")
        out = make_out(M, 19, out_dtype)
        ops.rms_norm_swiglu(x, gd, EPS, w, bd, out=out)
        assert_swiglu(out, *norm_reference(x64, g64, w64, b64), out_dtype)
        if out_dtype == ip.float32:
            prod = ops.rms_norm_matmul(x, gd, EPS, w, bd)
            pairs = prod.unflatten(1, (19, 2))
            sep = ops.silu_mul(pairs.narrow(2, 0, 1).reshape(M, 19), pairs.narrow(2, 1, 1).reshape(M, 19))
            a, s = to_torch(out.cpu()).double(), to_torch(sep.cpu()).double()
            assert float((a - s).norm() / s.norm().clamp_min(1e-300)) <= 1e-6


@pytest.mark.parametrize("split", ["1", "2", "4"])
@pytest.mark.parametrize("wtype", QTYPES)
def test_quant_gemv_split(gen, monkeypatch, wtype, split):
    """Each split of the row pairs over 1, 2 or 4 warps whatever the plan would pick: 75 blocks
    (of 32) in steps of 25 or 19, 13 (of 256) in steps of 7 or 4 and 1, and rows of 2 or 1 blocks,
    which leave warps of a split without a step; plain and normalised."""
    monkeypatch.setenv("INFERENCE_PIO_GEMV_QUANT", split)
    bs = BLOCK[wtype][0]
    for M, K in ((2, 75 * bs if bs == 32 else 13 * bs), (5, 2 * bs if bs == 32 else bs)):
        run_case(gen, M, K, 9, ip.float32, wtype, ip.float32, with_bias=True)
        x, x64, w, w64 = qgemv_operands(gen, wtype, M, K, 9)
        g, g64 = randn(K, dtype=ip.float32, gen=gen)
        out = make_out(M, 9, ip.float32)
        ops.rms_norm_matmul(x, g.to("cuda"), EPS, w, None, out=out)
        ref, _, acc = norm_reference(x64, g64, w64, None)
        assert_within(to_torch(out.cpu()).to(torch.float64), ref, acc + U32 * (ref.abs() + acc))


@pytest.mark.parametrize("wtype", QTYPES)
def test_quant_gemv_weight_view(gen, wtype):
    """w as rows 1.. and 3.. of a taller weight: its base is as (mis)aligned as its rows, and the
    kernel copies the 16-byte aligned span around each row's bytes."""
    K = 32 * 37 if BLOCK[wtype][0] == 32 else 768
    for skip in (1, 3):
        for M in (1, 4):
            x, x64, w, w64 = qgemv_operands(gen, wtype, M, K, 21, skip_rows=skip)
            out = ops.matmul(x, w)
            ref, mag = reference(x64, w64, None)
            assert_close(out, ref, mag, K, ip.float32)


# ---- the batched-decode product (csrc/cuda/gemm_skinny.cu) ----
#
# 9 to 64 rows of x (f32 or w's dtype, unit stride, 16-byte aligned rows) against bf16/f16 w with
# K a multiple of 64: tensor-core mma's fed straight from the weight stream, x rounded to w's
# dtype (tensor_core_x), every epilogue inside. Each block stages x through shared memory in
# 256-wide slabs and splits each slab over the 2 warps of a 16-row group; a cluster of blocks
# splits K further when N gives too few 64-row tiles. The shapes' plans on an H200: K = 64 and
# 192 one short slab; 960 three slabs and a 192-wide one; 1024 x 4096 two slabs in clusters of
# 2; 2560 x 136 clusters of 8 with a 256 + 64 slab pair; 9728 x 70 past 4 slabs per block (the
# tiled GEMM's). M covers each 8-row column tile count (2, 4, 8) and its edges; N leaves tiles
# part-empty.

SKINNY_M = (9, 16, 17, 32, 33, 64)
SKINNY_KN = ((64, 8), (192, 100), (960, 70), (1024, 4096), (2560, 136), (9728, 70))
SKINNY_CASES = [(M, K, N) for M in SKINNY_M for K, N in SKINNY_KN]
SKINNY_COMBOS = [(x, w, o) for x in FLOAT_DTYPES for w in (ip.bfloat16, ip.float16) for o in FLOAT_DTYPES]


@pytest.mark.parametrize("M,K,N", SKINNY_CASES, ids=[f"M{M}-K{K}-N{N}" for M, K, N in SKINNY_CASES])
def test_skinny_shapes(gen, M, K, N):
    """The product with the dtype combination, bias and x layout (contiguous, or every other row
    of a taller buffer) rotating."""
    i = SKINNY_CASES.index((M, K, N))
    x_dtype, w_dtype, out_dtype = SKINNY_COMBOS[(5 * i) % len(SKINNY_COMBOS)]
    run_case(gen, M, K, N, x_dtype, w_dtype, out_dtype, with_bias=i % 2 == 0,
             x_kind="rows" if i % 3 == 0 else "contiguous")


@pytest.mark.parametrize("M", [9, 32, 64])
@pytest.mark.parametrize("wd", [ip.bfloat16, ip.float16], ids=lambda d: NAMES[d])
def test_skinny_accumulate_and_out_window(gen, M, wd):
    """to_matmul_add into columns [3, 3 + N) of a wider out (rows N + 8 apart): old + x . w^T + b
    rounded once to out's dtype; the columns around it keep their values."""
    K, N = 1024, 200
    for out_dtype in FLOAT_DTYPES:
        x, x64 = randn(M, K, dtype=ip.float32, gen=gen)
        w, w64 = randn(N, K, dtype=wd, gen=gen)
        b, b64 = randn(N, dtype=ip.float32, gen=gen)
        old, old64 = randn(M, N + 8, dtype=out_dtype, gen=gen)
        wide = old.to("cuda")
        ops.matmul_add(wide[:, 3:3 + N], x.to("cuda"), w.to("cuda"), b.to("cuda"))
        got = to_torch(wide.cpu()).to(torch.float64)
        assert torch.equal(got[:, :3], old64[:, :3]) and torch.equal(got[:, 3 + N:], old64[:, 3 + N:])
        ref, mag = reference(tensor_core_x(x64, M, ip.float32, wd), w64, b64)
        ref, mag = ref + old64[:, 3:3 + N], mag + old64[:, 3:3 + N].abs()
        n = K + 2
        acc = min(n, 2.0 * math.sqrt(n)) * U32 * mag
        assert_within(got[:, 3:3 + N], ref, acc + U_OUT[out_dtype] * (ref.abs() + acc) + TINY_OUT[out_dtype])


@pytest.mark.parametrize("M", [9, 20, 40])
@pytest.mark.parametrize("K", [256, 2560])
def test_skinny_norm_and_swiglu(gen, M, K):
    """to_rms_norm_matmul and to_rms_norm_swiglu against bf16 w: x g is staged in bf16 (from its
    f32 value), the f32 dots scaled by rinv from x's own sum of squares; norm weights of each
    float dtype, out of each, a bias or none."""
    for i, g_dtype in enumerate(FLOAT_DTYPES):
        out_dtype = FLOAT_DTYPES[(i + M) % 3]
        x, x64 = randn(M, K, dtype=ip.float32, gen=gen, scale=2.0)
        w, w64 = randn(2 * 37, K, dtype=ip.bfloat16, gen=gen)
        g, g64 = randn(K, dtype=g_dtype, gen=gen)
        b, b64 = randn(2 * 37, dtype=ip.float32, gen=gen) if i != 2 else (None, None)
        xd, wd, gd, bd = x.to("cuda"), w.to("cuda"), g.to("cuda"), (b.to("cuda") if b is not None else None)
        expect = norm_reference(x64, g64, w64, b64, staged=torch.bfloat16)
        out = make_out(M, 2 * 37, out_dtype)
        ops.rms_norm_matmul(xd, gd, EPS, wd, bd, out=out)
        ref, _, acc = expect
        got = to_torch(out.cpu()).to(torch.float64)
        assert_within(got, ref, acc + U_OUT[out_dtype] * (ref.abs() + acc) + TINY_OUT[out_dtype])
        out = make_out(M, 37, out_dtype)
        ops.rms_norm_swiglu(xd, gd, EPS, wd, bd, out=out)
        assert_swiglu(out, *expect, out_dtype)


def test_skinny_is_deterministic_and_matches_the_tiled_gemm(gen, monkeypatch):
    """The same product twice gives the same bits (the cluster's partials meet in a fixed order);
    with the kernel switched off (INFERENCE_PIO_GEMM_SKINNY=0) the tiled GEMM forms the same dots
    of the same bf16 values in another order: within the f32 accumulation bound of each other."""
    M, K, N = 32, 2560, 1000
    x, x64 = randn(M, K, dtype=ip.float32, gen=gen)
    w, w64 = randn(N, K, dtype=ip.bfloat16, gen=gen)
    xd, wd = x.to("cuda"), w.to("cuda")
    first, second = to_torch(ops.matmul(xd, wd).cpu()), to_torch(ops.matmul(xd, wd).cpu())
    assert torch.equal(first, second)
    monkeypatch.setenv("INFERENCE_PIO_GEMM_SKINNY", "0")
    tiled = ops.matmul(xd, wd)
    _, mag = reference(tensor_core_x(x64, M, ip.float32, ip.bfloat16), w64, None)
    assert_close(tiled, first.to(torch.float64), 2 * mag, K, ip.float32)


# ---- decode shapes ----

@pytest.mark.parametrize("wd", ["bf16", "f16", "f32"] + QTYPES)
@pytest.mark.parametrize("N,K", [(1536, 576), (4096, 1024)])
def test_decode_shapes(gen, wd, N, K):
    """M = 1 at real model sizes (SmolLM2's MLP, a 4096 x 1024 projection)."""
    w_dtype = {"bf16": ip.bfloat16, "f16": ip.float16, "f32": ip.float32}.get(wd, wd)
    if w_dtype in QTYPES:
        K = -(-K // BLOCK[w_dtype][0]) * BLOCK[w_dtype][0]  # whole blocks (576 -> 768 for the k-quants)
    run_case(gen, 1, K, N, ip.bfloat16, w_dtype, ip.bfloat16, with_bias=False)
    run_case(gen, 1, K, N, ip.float32, w_dtype, ip.float32, with_bias=True)


# ---- the Hopper GEMM (csrc/cuda/gemm_sm90.cu) ----
#
# Taken on an H100/H200 when the library has sm_90a code, for x and w both bf16 or both f16 with a
# unit column stride, 16-byte aligned bases and row pitches and K a multiple of 8 (anything else
# falls back to the kernels above, so these cases pass either way: what they pin down is the
# Hopper path's results wherever it is taken). Tiles of 128 x 256 or 128 x 128, K in steps of 64,
# persistent blocks walking several tiles, or K split over a cluster of 2 to 8 blocks when the tiles
# alone would leave SMs idle; INFERENCE_PIO_GEMM_SM90=BN,S forces a plan. The tolerance is
# assert_close's: products of bf16/f16 pairs are exact and accumulate in f32 (a split adds at most
# 7 more f32 additions), then one rounding to out's dtype. Outputs start as NaN, so every element
# left unwritten fails; large cases compare a sample of rows with the float64 reference (the
# reference is the slow part) but check every element for NaN.

SM90_DTYPES = (ip.bfloat16, ip.float16)
TORCH16 = {ip.bfloat16: torch.bfloat16, ip.float16: torch.float16}
SM90_SHAPES = [(M, N, K) for M in (9, 100, 257, 2048) for N in (8, 200, 4096) for K in (64, 1000, 1024, 3072)]
SM90_KINDS = ("contiguous", "rows", "window")
REF_BUDGET = 2e8  # multiply-adds of the float64 reference per case; beyond it, a sample of rows


def randn16(gen, shape, dtype):
    """A normal torch tensor of dtype (bf16/f16), drawn in float32: four times faster than
    helpers.randn's float64 draws, which matters at 2048 x 3072."""
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(TORCH16[dtype])


def make_x16(gen, M, K, dtype, kind):
    """x [M, K] on the GPU in a layout TMA reads (rows 16-byte aligned, unit column stride), and its
    values as a torch tensor of dtype: contiguous; "rows": every other row of [2M, K] (pitch 2K);
    "window": columns [8, 8 + K) of [M, K + 24] (base 16 bytes in, pitch K + 24)."""
    if kind == "contiguous":
        t = randn16(gen, (M, K), dtype)
        return from_torch(t).to("cuda"), t
    if kind == "rows":
        t = randn16(gen, (2 * M, K), dtype)
        return from_torch(t).to("cuda")[::2], t[::2]
    if kind == "window":
        t = randn16(gen, (M, K + 24), dtype)
        return from_torch(t).to("cuda")[:, 8:8 + K], t[:, 8:8 + K]
    raise ValueError(kind)


def sample_rows(gen, M, N, K):
    """Every row when the reference is cheap, else the first, the last and random others."""
    n = max(8, int(REF_BUDGET // (N * K)))
    if n >= M:
        return torch.arange(M)
    return torch.unique(torch.cat([torch.tensor([0, M - 1]), torch.randperm(M, generator=gen)[:n - 2]]))


def tolerance(ref, mag, K, out_dtype):
    n = K + 1
    acc = min(n, 2.0 * math.sqrt(n)) * U32 * mag
    return acc + U_OUT[out_dtype] * (ref.abs() + acc) + TINY_OUT[out_dtype]


def run_sm90_case(gen, M, N, K, dtype, out_dtype, with_bias, x_kind="contiguous"):
    x, xt = make_x16(gen, M, K, dtype, x_kind)
    wt = randn16(gen, (N, K), dtype)
    b, b64 = randn(N, dtype=out_dtype, gen=gen) if with_bias else (None, None)
    out = make_out(M, N, out_dtype)
    ops.matmul(x, from_torch(wt).to("cuda"), b.to("cuda") if b is not None else None, out=out)
    got = to_torch(out.cpu()).to(torch.float64)
    assert not got.isnan().any(), f"{int(got.isnan().sum())} of {got.numel()} outputs never written"
    rows = sample_rows(gen, M, N, K)
    ref, mag = reference(xt[rows].to(torch.float64), wt.to(torch.float64), b64)
    assert_within(got[rows], ref, tolerance(ref, mag, K, out_dtype))


@pytest.mark.parametrize("M,N,K", SM90_SHAPES, ids=[f"M{M}-N{N}-K{K}" for M, N, K in SM90_SHAPES])
def test_sm90_shapes(gen, M, N, K):
    """Tile edges in M (9, 100, 257: partial 128-row tiles; 2048: several tiles per block), N (8 and
    200: partial tiles; 4096) and K (64: one step; 1000: a zero-filled tail; 3072), with the input
    dtype, out dtype, bias and x layout rotating so each meets every size."""
    i = SM90_SHAPES.index((M, N, K))
    dtype = SM90_DTYPES[(i // 4 + i) % 2]
    run_sm90_case(gen, M, N, K, dtype, FLOAT_DTYPES[i % 3], with_bias=(i // 3) % 2 == 0,
                  x_kind=SM90_KINDS[(i // 2) % 3])


@pytest.mark.parametrize("plan", ["128,1", "128,8"], ids=["tiles", "split"])
@pytest.mark.parametrize("dtype", SM90_DTYPES, ids=lambda d: NAMES[d])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_sm90_dtypes(gen, monkeypatch, plan, dtype, out_dtype, with_bias):
    """Every dtype combination, through both epilogues: whole tiles (out stored by TMA) and split K
    (each block of the cluster stores its columns from registers)."""
    monkeypatch.setenv("INFERENCE_PIO_GEMM_SM90", plan)
    run_sm90_case(gen, 257, 200, 1000, dtype, out_dtype, with_bias)


@pytest.mark.parametrize("bias_dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_sm90_bias_dtypes(gen, bias_dtype):
    M, N, K = 130, 136, 512  # (out rows 544 bytes apart: TMA-stored)
    xt, wt = randn16(gen, (M, K), ip.bfloat16), randn16(gen, (N, K), ip.bfloat16)
    b, b64 = randn(N, dtype=bias_dtype, gen=gen)
    out = make_out(M, N, ip.float32)
    ops.matmul(from_torch(xt).to("cuda"), from_torch(wt).to("cuda"), b.to("cuda"), out=out)
    ref, mag = reference(xt.to(torch.float64), wt.to(torch.float64), b64)
    assert_within(to_torch(out.cpu()).to(torch.float64), ref, tolerance(ref, mag, K, ip.float32))


SM90_PLANS = ["256,1", "128,1", "128,2", "128,4", "128,8", "256,1,0", "128,1,0"]


@pytest.mark.parametrize("plan", SM90_PLANS)
@pytest.mark.parametrize("dtype", SM90_DTYPES, ids=lambda d: NAMES[d])
def test_sm90_plans(gen, monkeypatch, plan, dtype):
    """Each kernel variant (tile width, split; ",0": out stored from registers rather than through
    TMA) whatever the heuristic would pick: 300 x 520 x 1000 (partial tiles on every side and a K
    tail; fewer tiles than SMs; f32 out, TMA-stored unless split) and 2048 x 2100 x 200 (more tiles
    than SMs: the persistent blocks carry the pipeline's stage and phase across tiles; the split
    clusters come in several waves, and S = 8 > 4 k steps is cut to 4; bf16 out rows 4200 bytes
    apart, too ragged for TMA, so stored from registers)."""
    monkeypatch.setenv("INFERENCE_PIO_GEMM_SM90", plan)
    run_sm90_case(gen, 300, 520, 1000, dtype, ip.float32, with_bias=True)
    run_sm90_case(gen, 2048, 2100, 200, dtype, ip.bfloat16, with_bias=False, x_kind="rows")


@pytest.mark.parametrize("plan", ["256,1", "128,4"], ids=["tiles", "split"])
@pytest.mark.parametrize("offset", [3, 2, 8], ids=["scalar", "pairs", "tma"])
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=lambda d: NAMES[d])
def test_sm90_out_window(gen, monkeypatch, plan, offset, out_dtype):
    """out as columns [offset, offset + N) of a wider buffer (rows N + 8 apart, a multiple of 16
    bytes): at offset 3 the column pairs are misaligned and stored one by one, at 2 stored as pairs,
    at 8 (16-byte aligned) through TMA unless the tile is split; the columns around keep their
    values. w is a column window of a wider weight too (rows K + 8 apart)."""
    monkeypatch.setenv("INFERENCE_PIO_GEMM_SM90", plan)
    M, N, K = 257, 200, 1024
    xt = randn16(gen, (M, K), ip.bfloat16)
    wide_w = randn16(gen, (N, K + 8), ip.bfloat16)
    b, b64 = randn(N, dtype=ip.float32, gen=gen)
    wide = from_torch(torch.full((M, N + 8), 7.0, dtype=torch.float32)).to(dtype=out_dtype).to("cuda")
    ops.matmul(from_torch(xt).to("cuda"), from_torch(wide_w).to("cuda")[:, :K], b.to("cuda"),
               out=wide[:, offset:offset + N])
    got = to_torch(wide.cpu()).to(torch.float64)
    assert (got[:, :offset] == 7).all() and (got[:, offset + N:] == 7).all()
    ref, mag = reference(xt.to(torch.float64), wide_w[:, :K].to(torch.float64), b64)
    assert_within(got[:, offset:offset + N], ref, tolerance(ref, mag, K, out_dtype))
