"""GPU to_copy / to_fill / add / mul / scale / silu_mul / softmax (csrc/cuda/copy.cu,
csrc/cuda/elementwise.cu) against the CPU ops on the same inputs.

The CPU ops are proven against float64 oracles in tests/kernels; here the GPU must give:
  - bit-identical results for copies and dtype conversions (NaN payloads included: the GPU keeps
    them as the CPU's converters do), fills, dequantization of every block type, and add / mul /
    scale (one IEEE operation each, never fused);
  - for silu_mul and softmax, which use each side's own exp, results within a few f32 ulp
    (SILU_RTOL / SOFTMAX_RTOL relative, widened to one ulp of f16/bf16 outputs), with NaN and
    infinities in the same places.
Inputs are drawn freshly each run (the seed is printed on failure), at odd sizes and through
transposed, sliced and stride-0 (expanded) views. Runs where a GPU is visible; elsewhere skips."""
import ctypes

import pytest
import torch

import inference_pio as ip
from inference_pio import dtypes as dt

from helpers import TORCH_DTYPES, assert_within, from_torch, to_torch

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")

PLAIN = (ip.float32, ip.float16, ip.bfloat16, ip.int8, ip.int32, ip.int64, ip.uint8)
FLOATS = (ip.float32, ip.float16, ip.bfloat16)
QUANTS = (dt.q8_0, dt.q4_0, dt.q4_1, dt.q4_k, dt.q6_k)
INTS = {ip.int8: (-128, 127), ip.uint8: (0, 255), ip.int32: (-2 ** 31, 2 ** 31 - 1),
        ip.int64: (-2 ** 63, 2 ** 63 - 1)}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SHAPE = (5, 9, 37)  # the logical shape of the strided views
SIZES = (1, 7, 33, 1000, 4099)
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
# byte offsets of the f16 scale fields in each block (kept finite in random blocks: a NaN scale
# would give NaNs whose payload x86 and the GPU pick differently)
SCALE_FIELDS = {dt.q8_0: (0,), dt.q4_0: (0,), dt.q4_1: (0, 2), dt.q4_k: (0, 2), dt.q6_k: (208,)}
SILU_RTOL = 2e-6      # f32: each side's exp within 2 ulp, then one division and two products
SOFTMAX_RTOL = 2e-6   # f32: two exps, a double sum, one reciprocal and one product
ULP = {ip.float32: 0.0, ip.float16: 2.0 ** -10, ip.bfloat16: 2.0 ** -7}  # relative, one output ulp
# absolute, near zero: the CPU's vector exp flushes results below FLT_MIN to 0, CUDA's expf gives
# the subnormal (silu of z < -87, softmax entries e^(x - m) < 1.2e-38)
TINY = {ip.float32: 1e-35, ip.float16: 2.0 ** -24, ip.bfloat16: 1e-35}


# ---- helpers ----

def bits(t):
    """t's values (any device, any layout) as a torch integer tensor of its bits, or the bytes
    of a quantized t: equal bits compare equal even for NaN."""
    c = t.cpu().contiguous()
    if c.dtype.is_quantized:
        return ctypes.string_at(c.data_ptr(), c.nbytes) if c.numel() else b""
    x = to_torch(c)
    return x.view(BITS[x.element_size()])


def assert_same_bits(got, expect, nan_payloads=True):
    """got's bits equal expect's; with nan_payloads=False a NaN matches any NaN (arithmetic that
    makes a NaN, e.g. inf - inf, gives x86's default NaN on the CPU and a canonical one on the GPU)."""
    assert got.shape == expect.shape and got.dtype is expect.dtype
    g, e = bits(got), bits(expect)
    if isinstance(g, bytes):
        assert g == e, "quantized bytes differ"
        return
    bad = g != e
    if not nan_payloads and bad.any() and got.dtype in FLOATS:
        gv = to_torch(got.cpu().contiguous()).to(torch.float32)
        ev = to_torch(expect.cpu().contiguous()).to(torch.float32)
        bad &= ~(torch.isnan(gv) & torch.isnan(ev))
    if bad.any():
        i = tuple(int(v) for v in torch.nonzero(bad)[0])
        gv, ev = to_torch(got.cpu().contiguous()), to_torch(expect.cpu().contiguous())
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} elements differ; first at {i}: "
                             f"got {gv[i].item()!r} ({int(g[i]):#x}), expected {ev[i].item()!r} ({int(e[i]):#x})")


def assert_close(got, expect, rtol):
    """|got - expect| <= (rtol + one ulp of the dtype) |expect| + tiny, NaN where NaN, infinities
    equal (both read as float64)."""
    assert got.shape == expect.shape and got.dtype is expect.dtype
    g = to_torch(got.cpu().contiguous()).to(torch.float64)
    e = to_torch(expect.cpu().contiguous()).to(torch.float64)
    assert torch.equal(torch.isnan(g), torch.isnan(e)), "NaN in different places"
    assert torch.equal(torch.isinf(g), torch.isinf(e)) and torch.equal(g[torch.isinf(e)], e[torch.isinf(e)]), \
        "infinities differ"
    ok = torch.isfinite(e)
    tol = e[ok].abs() * (rtol + ULP[got.dtype]) + TINY[got.dtype]
    assert_within(g[ok], e[ok], tol)


def draw(dtype, n, gen):
    """n values of a plain dtype (a 1-d CPU tensor of ours) worth converting: for floats every kind
    of bit pattern (NaN payloads, subnormals, infinities, huge), for integers the whole range and
    its edges."""
    if dtype in (ip.float16, ip.bfloat16):
        raw = torch.randint(-2 ** 15, 2 ** 15, (n,), generator=gen, dtype=torch.int32).to(torch.int16)
        return from_torch(raw.view(TORCH_DTYPES[dtype]))
    if dtype is ip.float32:
        special = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.5, -2.5, 127.5, 128.0, -128.9, -129.0, 255.9,
                                256.0, 65504.0, 65520.0, 2.0 ** 31, -2.0 ** 31, 2.0 ** 63, -2.0 ** 63,
                                3e38, float("inf"), float("-inf"), float("nan"), 1e-40, 2.0 ** -25])
        wide = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-8, 12, (n,), generator=gen)
        rand_bits = torch.randint(0, 2 ** 32, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
        pick = torch.rand(n, generator=gen) < 0.3
        x = torch.where(pick, rand_bits.view(torch.float32), wide.to(torch.float32))
        x[:min(n, len(special))] = special[:n]
        return from_torch(x)
    lo, hi = INTS[dtype]
    x = torch.randint(lo, hi, (n,), generator=gen, dtype=torch.int64)
    edges = torch.tensor([lo, hi, 0, -1 if lo < 0 else 1, 127, 128, 255, 256, 2 ** 24 + 1, 65520], dtype=torch.int64)
    edges = edges.clamp(lo, hi)
    x[:min(n, len(edges))] = edges[:n]
    return from_torch(x.to(TORCH_DTYPES[dtype]))


def base_shape(shape, kind):
    """The shape of the buffer whose layout(buffer, kind, shape) view has the 3-d `shape`."""
    a, b, c = shape
    return {"contiguous": (a, b, c), "transposed": (c, b, a), "sliced": (a, 2 * b, c + 1),
            "expanded": (a, 1, c)}[kind]


def layout(t, kind, shape):
    """A `shape` view of the buffer t (of base_shape(shape, kind)): the same call on a CPU tensor
    and on its GPU copy gives the same view of the same values."""
    if kind == "contiguous":
        return t
    if kind == "transposed":
        return t.transpose(0, 2)
    if kind == "sliced":  # row stride 2, offset 1 along the last dimension
        return t[:, ::2, 1:]
    if kind == "expanded":  # stride 0 in the middle dimension
        return t.expand(*shape)
    raise ValueError(kind)


def strided_empty(shape, dtype, device):
    """An uninitialised non-contiguous tensor of `shape`: every other element of a wider buffer."""
    wide = ip.Tensor.zeros(tuple(shape[:-1]) + (2 * shape[-1],), dtype=dtype, device=device)
    return wide[..., ::2]


def gpu(t):
    return t.to("cuda")


# ---- copy: every pair of plain dtypes ----

@pytest.mark.parametrize("src", PLAIN, ids=str)
@pytest.mark.parametrize("dst", PLAIN, ids=str)
def test_copy_every_dtype_pair_contiguous(gen, src, dst):
    for n in SIZES:
        x = draw(src, n, gen)
        got = ip.Tensor.empty((n,), dtype=dst, device="cuda").copy_(gpu(x))
        assert got.device.startswith("cuda")
        assert_same_bits(got, ip.Tensor.empty((n,), dtype=dst).copy_(x))


@pytest.mark.parametrize("src", PLAIN, ids=str)
@pytest.mark.parametrize("dst", PLAIN, ids=str)
def test_copy_every_dtype_pair_strided(gen, src, dst):
    for kind in LAYOUTS:
        bshape = base_shape(SHAPE, kind)
        x = draw(src, bshape[0] * bshape[1] * bshape[2], gen).view(*bshape)
        v, vg = layout(x, kind, SHAPE), layout(gpu(x), kind, SHAPE)
        expect = ip.Tensor.empty(v.shape, dtype=dst).copy_(v)
        # into a contiguous out, and into a strided one
        assert_same_bits(ip.Tensor.empty(v.shape, dtype=dst, device="cuda").copy_(vg), expect)
        assert_same_bits(strided_empty(v.shape, dst, "cuda").copy_(vg), expect)


def test_copy_large_uses_grid_stride_loops(gen):
    n = (1 << 24) + 4099  # more elements than one launch's grid covers
    x = from_torch(torch.randn(n, generator=gen) * 1000)
    xg = gpu(x)
    for dst in (ip.bfloat16, ip.int32):
        assert_same_bits(ip.Tensor.empty((n,), dtype=dst, device="cuda").copy_(xg),
                         ip.Tensor.empty((n,), dtype=dst).copy_(x))
    # strided (a broadcast copy, then a transposed view converted): the to_offset paths
    wide_g = ip.Tensor.empty((2, n), device="cuda").copy_(xg.view(1, n).expand(2, n))
    wide = ip.Tensor.empty((2, n)).copy_(x.view(1, n).expand(2, n))
    assert_same_bits(wide_g, wide)
    v, vg = wide.transpose(0, 1), wide_g.transpose(0, 1)
    assert_same_bits(ip.Tensor.empty(vg.shape, dtype=ip.float16, device="cuda").copy_(vg),
                     ip.Tensor.empty(v.shape, dtype=ip.float16).copy_(v))


def test_copy_empty_and_zero_dim():
    for src in (ip.float32, ip.int64):
        x = ip.Tensor.empty((0, 5), dtype=src, device="cuda")
        out = ip.Tensor.empty((0, 5), dtype=ip.bfloat16, device="cuda").copy_(x)
        assert out.shape == (0, 5) and out.numel() == 0
        ip.Tensor.empty((0, 5), dtype=ip.bfloat16, device="cuda").transpose(0, 1).copy_(x.transpose(0, 1))
    x = ip.Tensor.full((), -3.75, device="cuda")
    assert ip.Tensor.empty((), dtype=ip.int8, device="cuda").copy_(x).cpu().item() == -3


def test_same_gpu_copy_is_queued(gen):
    """A contiguous copy of one dtype on one GPU is queued on its stream like a kernel (the host
    does not wait for it): recorded in a CUDA graph, each replay copies the source's bytes of that
    moment; a destination overlapping its source is refused."""
    from inference_pio.graph import CudaGraph

    n = 4099
    src = ip.Tensor.empty((n,), dtype=ip.bfloat16, device="cuda")
    dst = ip.Tensor.empty((n,), dtype=ip.bfloat16, device="cuda")
    graph = CudaGraph.capture(lambda: dst.copy_(src))
    for _ in range(2):
        x = torch.randn(n, generator=gen, dtype=torch.float64).to(torch.bfloat16)
        src.copy_(from_torch(x))
        graph.replay()
        assert torch.equal(to_torch(dst.cpu()), x)
    both = ip.Tensor.empty((2 * n,), dtype=ip.float32, device="cuda")
    with pytest.raises(ip.InvalidArgumentError, match="to_copy: out overlaps x in memory"):
        both.narrow(0, 1, n).copy_(both.narrow(0, 0, n))


# ---- fill ----

FILL_VALUES = (0.0, -0.0, 1.5, -2.7, 300.9, -1e10, 1e30, 65520.0, 2.0 ** 63, -2.0 ** 64, 1e-40,
               float("nan"), float("inf"), float("-inf"))


@pytest.mark.parametrize("dtype", PLAIN, ids=str)
def test_fill(dtype):
    for value in FILL_VALUES:
        for n in SIZES:
            got = ip.Tensor.empty((n,), dtype=dtype, device="cuda").fill_(value)
            assert_same_bits(got, ip.Tensor.empty((n,), dtype=dtype).fill_(value))
        # a strided view: the elements between must stay untouched
        wide_g = ip.Tensor.zeros(3, 7, 66, dtype=dtype, device="cuda")
        wide = ip.Tensor.zeros(3, 7, 66, dtype=dtype)
        wide_g[:, 1:, ::2].fill_(value)
        wide[:, 1:, ::2].fill_(value)
        assert_same_bits(wide_g, wide)
        wide_g.transpose(0, 2).fill_(value)  # a permuted view covering everything
        assert_same_bits(wide_g, ip.Tensor.empty(wide.shape, dtype=dtype).fill_(value))
    ip.Tensor.empty((4, 0), dtype=dtype, device="cuda").fill_(1.0)


# ---- dequantization ----

def random_blocks(dtype, rows, nblocks, gen):
    """Our CPU tensor [rows, nblocks * block_size] of random blocks whose f16 scales are finite
    (random magnitudes and signs, some 0 and some subnormal): every quant and scale bit pattern."""
    b = torch.randint(0, 256, (rows, nblocks, dtype.block_bytes), generator=gen, dtype=torch.int32).to(torch.uint8)
    for off in SCALE_FIELDS[dtype]:
        h = torch.randint(0, 0x7C00, (rows, nblocks), generator=gen, dtype=torch.int32)  # exponent < 31
        h[torch.rand(rows, nblocks, generator=gen) < 0.1] = 0
        sub = torch.rand(rows, nblocks, generator=gen) < 0.1
        h[sub] &= 0x3FF
        h |= (torch.rand(rows, nblocks, generator=gen) < 0.5).to(torch.int32) << 15
        b[:, :, off] = (h & 0xFF).to(torch.uint8)
        b[:, :, off + 1] = (h >> 8).to(torch.uint8)
    raw = bytes(b.reshape(-1).tolist())
    return ip.Tensor.frombuffer(raw, dtype, (rows, nblocks * dtype.block_size), copy=True)


@pytest.mark.parametrize("qtype", QUANTS, ids=str)
@pytest.mark.parametrize("out_dtype", FLOATS, ids=str)
def test_dequantize_random_blocks(gen, qtype, out_dtype):
    for rows, nblocks in ((1, 1), (3, 7), (33, 5)):
        q = random_blocks(qtype, rows, nblocks, gen)
        got = ip.ops.dequantize(gpu(q), out_dtype)
        assert got.device.startswith("cuda")
        assert_same_bits(got, ip.ops.dequantize(q, out_dtype))


@pytest.mark.parametrize("qtype", QUANTS, ids=str)
def test_dequantize_quantized_weights_and_views(gen, qtype):
    bs = qtype.block_size
    x = from_torch(torch.randn(6, 5, 4 * bs, generator=gen) * 10.0 ** torch.randint(-3, 4, (6, 5, 1), generator=gen))
    q = ip.ops.quantize(x, qtype)  # on the CPU: the GPU does not quantize
    qg = gpu(q)
    views = (lambda t: t, lambda t: t[::2], lambda t: t[:, 1:4, bs:3 * bs], lambda t: t.transpose(0, 1),
             lambda t: t[:, :1].expand(6, 5, 4 * bs))
    for view in views:
        v, vg = view(q), view(qg)
        for out_dtype in FLOATS:
            expect = ip.ops.dequantize(v, out_dtype)
            assert_same_bits(ip.ops.dequantize(vg, out_dtype), expect)
            # into a transposed out
            out = ip.Tensor.empty(v.shape[::-1], dtype=out_dtype, device="cuda").permute(*range(v.ndim - 1, -1, -1))
            assert_same_bits(ip.ops.dequantize(vg, out_dtype, out=out), expect)


@pytest.mark.parametrize("qtype", QUANTS, ids=str)
def test_quantized_same_dtype_strided_copy_moves_blocks(gen, qtype):
    bs = qtype.block_size
    q = random_blocks(qtype, 9, 6, gen)
    qg = gpu(q)
    for view in (lambda t: t[::2], lambda t: t[1:, 2 * bs:5 * bs], lambda t: t[::3, bs:]):
        v, vg = view(q), view(qg)
        got = ip.Tensor.empty(vg.shape, dtype=qtype, device="cuda").copy_(vg)
        assert_same_bits(got, ip.Tensor.empty(v.shape, dtype=qtype).copy_(v))
        # into a strided quantized out: every other row of a taller buffer
        tall_q = ip.ops.quantize(ip.Tensor.zeros(2 * v.shape[0], v.shape[1]), qtype).to("cuda")
        tall_q[::2].copy_(vg)
        assert_same_bits(tall_q[::2], ip.Tensor.empty(v.shape, dtype=qtype).copy_(v))
        assert_same_bits(tall_q[1::2], ip.ops.quantize(ip.Tensor.zeros(*v.shape), qtype))


def test_gpu_refuses_to_quantize(gen):
    x = gpu(from_torch(torch.randn(2, 64, generator=gen)))
    with pytest.raises(ip.UnsupportedError):
        ip.ops.quantize(x, dt.q8_0)


# ---- add / mul / scale: bit-identical ----

def binary(name, a, b, out=None):
    return getattr(ip.ops, name)(a, b, out=out)


def floats(shape, dtype, gen, specials=True):
    """Our CPU tensor of random floats over many magnitudes (plus infinities and zeros)."""
    n = 1
    for s in shape:
        n *= s
    x = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 7, (n,), generator=gen)
    if specials and n >= 8:
        x[:6] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3e38, 1e-40])
    return from_torch(x.to(TORCH_DTYPES[dtype]).reshape(shape))


@pytest.mark.parametrize("name", ("add", "mul"))
@pytest.mark.parametrize("dtypes", ((ip.float32,) * 3, (ip.float16,) * 3, (ip.bfloat16,) * 3,
                                    (ip.float16, ip.bfloat16, ip.float32), (ip.float32, ip.float32, ip.bfloat16)),
                         ids=lambda d: "-".join(map(str, d)))
def test_binary_sizes_and_dtypes(gen, name, dtypes):
    da, db, do = dtypes
    for n in SIZES + ((1 << 24) + 33,):
        if n > 5000 and da is not ip.float32:
            continue
        a, b = floats((n,), da, gen), floats((n,), db, gen)
        expect = binary(name, a, b, out=ip.Tensor.empty((n,), dtype=do))
        got = binary(name, gpu(a), gpu(b), out=ip.Tensor.empty((n,), dtype=do, device="cuda"))
        assert_same_bits(got, expect, nan_payloads=False)


@pytest.mark.parametrize("name", ("add", "mul"))
@pytest.mark.parametrize("kind_a", LAYOUTS)
@pytest.mark.parametrize("kind_b", LAYOUTS)
def test_binary_layouts(gen, name, kind_a, kind_b):
    a, b = floats(base_shape(SHAPE, kind_a), ip.float32, gen), floats(base_shape(SHAPE, kind_b), ip.float16, gen)
    va, vb = layout(a, kind_a, SHAPE), layout(b, kind_b, SHAPE)
    vga, vgb = layout(gpu(a), kind_a, SHAPE), layout(gpu(b), kind_b, SHAPE)
    expect = binary(name, va, vb)
    assert_same_bits(binary(name, vga, vgb), expect, nan_payloads=False)
    assert_same_bits(binary(name, vga, vgb, out=strided_empty(SHAPE, ip.float32, "cuda")), expect,
                     nan_payloads=False)


@pytest.mark.parametrize("name", ("add", "mul"))
def test_binary_broadcast_and_in_place(gen, name):
    a, b = floats((7, 33, 19), ip.float32, gen), floats((33, 1), ip.bfloat16, gen)
    ag, bg = gpu(a), gpu(b)
    expect = binary(name, a, b)
    assert_same_bits(binary(name, ag, bg), expect, nan_payloads=False)  # b expands: stride 0
    assert binary(name, ag, bg, out=ag) is ag  # in place: out is a
    assert_same_bits(ag, expect, nan_payloads=False)
    # in place through a transposed view
    a, b = floats((6, 35), ip.float16, gen), floats((35, 6), ip.float16, gen)
    ag = gpu(a)
    vt = ag.transpose(0, 1)
    binary(name, vt, gpu(b), out=vt)
    assert_same_bits(vt, binary(name, a.transpose(0, 1), b), nan_payloads=False)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_scale(gen, dtype):
    for factor in (0.5, -3.7, 1e30, 0.0, 1e-30, float("inf")):
        for n in SIZES:
            x = floats((n,), dtype, gen, specials=False)
            assert_same_bits(ip.ops.scale(gpu(x), factor), ip.ops.scale(x, factor), nan_payloads=False)
        for kind in LAYOUTS:
            x = floats(base_shape(SHAPE, kind), dtype, gen)
            assert_same_bits(ip.ops.scale(layout(gpu(x), kind, SHAPE), factor),
                             ip.ops.scale(layout(x, kind, SHAPE), factor), nan_payloads=False)
        xg = gpu(x)
        ip.ops.scale(xg, factor, out=xg)  # in place
        assert_same_bits(xg, ip.ops.scale(x, factor), nan_payloads=False)


def test_elementwise_empty_and_zero_dim():
    e = ip.Tensor.empty((3, 0), device="cuda")
    for out in (ip.ops.add(e, e), ip.ops.mul(e, e), ip.ops.scale(e, 2.0), ip.ops.silu_mul(e, e), ip.ops.softmax(e)):
        assert out.shape == (3, 0)
    s = ip.Tensor.full((), 3.0, device="cuda")
    assert ip.ops.add(s, s).cpu().item() == 6.0
    assert ip.ops.softmax(s).cpu().item() == 1.0


# ---- silu_mul: within a few ulp ----

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_silu_mul(gen, dtype):
    for n in SIZES:
        g = from_torch((torch.randn(n, generator=gen) * 8).to(TORCH_DTYPES[dtype]))
        u = floats((n,), dtype, gen, specials=False)
        assert_close(ip.ops.silu_mul(gpu(g), gpu(u)), ip.ops.silu_mul(g, u), SILU_RTOL)
    # specials: silu(-inf) = NaN (-inf * 0), silu(inf) = inf, huge negative -> -0
    g = from_torch(torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 100.0, -100.0,
                                 -1e30, 1e30, 1e-40, -88.0, 20.0]).to(TORCH_DTYPES[dtype]))
    u = from_torch(torch.full((12,), 1.5).to(TORCH_DTYPES[dtype]))
    assert_close(ip.ops.silu_mul(gpu(g), gpu(u)), ip.ops.silu_mul(g, u), SILU_RTOL)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_silu_mul_layouts_and_in_place(gen, kind):
    g = from_torch(torch.randn(*base_shape(SHAPE, kind), generator=gen) * 6)
    u = floats(base_shape(SHAPE, "sliced"), ip.bfloat16, gen, specials=False)
    vg, vu = layout(gpu(g), kind, SHAPE), layout(gpu(u), "sliced", SHAPE)
    expect = ip.ops.silu_mul(layout(g, kind, SHAPE), layout(u, "sliced", SHAPE))
    assert_close(ip.ops.silu_mul(vg, vu), expect, SILU_RTOL)
    assert_close(ip.ops.silu_mul(vg, vu, out=strided_empty(SHAPE, ip.float32, "cuda")), expect, SILU_RTOL)
    if kind != "expanded":  # an expanded view is not writable
        ip.ops.silu_mul(vg, vu, out=vg)
        assert_close(vg, expect, SILU_RTOL)


# ---- softmax: within a few ulp; -inf, NaN and +inf rows as the CPU ----

@pytest.mark.parametrize("shape", ((1,), (7,), (4, 33), (3, 1000), (2, 4099), (2, 3, 513), (2, 9000), (1, 40000),
                                   (300, 5)))
def test_softmax_sizes(gen, shape):
    x = from_torch(torch.randn(*shape, generator=gen) * 6)
    assert_close(ip.ops.softmax(gpu(x)), ip.ops.softmax(x), SOFTMAX_RTOL)


@pytest.mark.parametrize("dx", FLOATS, ids=str)
@pytest.mark.parametrize("do", FLOATS, ids=str)
def test_softmax_dtypes(gen, dx, do):
    x = from_torch((torch.randn(6, 777, generator=gen) * 4).to(TORCH_DTYPES[dx]))
    expect = ip.ops.softmax(x, out=ip.Tensor.empty(x.shape, dtype=do))
    assert_close(ip.ops.softmax(gpu(x), out=ip.Tensor.empty(x.shape, dtype=do, device="cuda")), expect, SOFTMAX_RTOL)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("last", (37, 1500))
def test_softmax_layouts_and_in_place(gen, kind, last):
    shape = (3, 11, last)
    x = from_torch(torch.randn(*base_shape(shape, kind), generator=gen) * 5)
    v, vg = layout(x, kind, shape), layout(gpu(x), kind, shape)
    expect = ip.ops.softmax(v)
    assert_close(ip.ops.softmax(vg), expect, SOFTMAX_RTOL)
    assert_close(ip.ops.softmax(vg, out=strided_empty(v.shape, ip.float32, "cuda")), expect, SOFTMAX_RTOL)
    if kind != "expanded":
        ip.ops.softmax(vg, out=vg)  # in place
        assert_close(vg, expect, SOFTMAX_RTOL)


@pytest.mark.parametrize("n", (5, 700, 9000))
def test_softmax_infinities_and_nan(gen, n):
    x = torch.randn(6, n, generator=gen) * 3
    x[0, ::3] = float("-inf")     # -inf entries -> 0, the rest a normal softmax
    x[1, :] = float("-inf")       # all -inf -> all NaN
    x[2, n // 2] = float("nan")   # a NaN -> all NaN
    x[3, n - 1] = float("inf")    # +inf -> all NaN
    x[4, :] = float("-inf")
    x[4, 0] = float("nan")        # NaN among -inf -> all NaN
    x[5, :] = 88.0                # equal large values: uniform
    x = from_torch(x)
    got, expect = ip.ops.softmax(gpu(x)), ip.ops.softmax(x)
    assert_close(got, expect, SOFTMAX_RTOL)
    g = to_torch(got.cpu())
    assert (g[0, ::3] == 0).all() and torch.isnan(g[1:5]).all()
