"""CUDA rms_norm / add_rms_norm, rope, embedding, argmax and topk against the CPU ops on the same
random inputs (the CPU ops are themselves proven against float64 oracles in tests/kernels).

Exact where the GPU does the CPU's arithmetic: embedding (byte copies, f32 conversions and the
dequantized quantized tables: same products and sums, no FMA), argmax and topk (comparisons
only; values are read back from x), and the residual that add_rms_norm stores (one f32 add).

Within a bound where they differ:
  rms_norm: the sum of squares is in double on both, in another order on the GPU, so the f32
    rinv may round one ulp apart in rare cases; then (v * rinv) * w moves by at most ~2 f32 ulps
    and the rounding into out may flip to the neighbour. Bound per element:
        |gpu - cpu| <= |cpu| (4 * 2^-23 + ulp_out) + tiny_out
    (ulp_out the relative spacing of out's dtype: 2^-23, 2^-10, 2^-7).
  rope: cos/sin are computed in double and rounded to f32 on both, but by CUDA's and the C
    library's cos/sin, which may round to neighbouring f32 values (|diff| <= 2^-24, cos and sin
    being at most 1). Each output is a c - b s (or b c + a s), so with mag = |a| + |b|:
        |gpu - cpu| <= mag * max(|scaling|, 1) * 2^-20 + |cpu| ulp_out + tiny_out
    Dims >= rotary_dim are copies: exact.
  rms_norm_rope: both steps' differences: the rinv of the norm may round an ulp apart (y moves by
    at most 2^-22 relative), then the rope's cos/sin difference, on the normalised head y (the
    CPU's rms_norm into f32). With mag = |a| + |b| of y's pairs (|y| for dims >= rotary_dim):
        |gpu - cpu| <= mag * max(|scaling|, 1) * 2^-20 + |cpu| ulp_out + tiny_out
"""
import pytest
import torch

import inference_pio as ip
from inference_pio import dtypes, ops

from helpers import FLOAT_DTYPES, TORCH_DTYPES, from_torch, randn, to_torch

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")

NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16", ip.int32: "i32", ip.int64: "i64",
         ip.int8: "i8", ip.uint8: "u8"}
ULP_OUT = {ip.float32: 2.0 ** -23, ip.float16: 2.0 ** -10, ip.bfloat16: 2.0 ** -7}
TINY_OUT = {ip.float32: 2.0 ** -149, ip.float16: 2.0 ** -24, ip.bfloat16: 2.0 ** -133}
LAYOUTS = ("contiguous", "transposed", "sliced")


def name(d):
    return NAMES.get(d, str(d))


def bits(t):
    """The raw bits of a torch tensor as integers (so -0.0, NaN payloads and exact values count)."""
    size = t.element_size()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size])


def placed(t, kind):
    """(cpu_view, gpu_view, fetch) holding t's values in the layout `kind` on both devices;
    fetch() is the GPU view's current contents as a CPU view of the same layout (read back
    through the contiguous backing buffer, so no strided GPU copy is involved)."""
    if kind == "contiguous":
        g = t.to("cuda")
        return t, g, lambda: g.cpu()
    if kind == "transposed":  # column-major last two dims
        back = t.transpose(-1, -2).contiguous()
        g = back.to("cuda")
        return back.transpose(-1, -2), g.transpose(-1, -2), lambda: g.cpu().transpose(-1, -2)
    if kind == "sliced":  # every other element of the last dim of a wider buffer
        wide = ip.Tensor.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., 1::2].copy_(t)
        g = wide.to("cuda")
        return wide[..., 1::2], g[..., 1::2], lambda: g.cpu()[..., 1::2]
    raise ValueError(kind)


def filled(shape, dtype, value=7.0):
    return ip.Tensor.full(shape, value, dtype=dtype)


def assert_bits_equal(got, ref):
    g, r = to_torch(got), to_torch(ref)
    assert g.shape == r.shape and g.dtype == r.dtype
    if g.is_floating_point():  # NaN payloads may differ between conversions; NaN-ness may not
        assert torch.equal(g.isnan(), r.isnan())
        keep = ~r.isnan()
        g, r = g[keep], r[keep]
    assert torch.equal(bits(g), bits(r)), "results differ"


def assert_within(got, ref, tol):
    g, r = to_torch(got).to(torch.float64), to_torch(ref).to(torch.float64)
    err = (g - r).abs()
    bad = ~(err <= tol)
    if bad.any():
        i = tuple(int(v) for v in torch.nonzero(bad)[0])
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} outside tolerance; first at {i}: "
                             f"gpu {float(g[i])!r}, cpu {float(r[i])!r}, tol {float(tol[i]):.3g}")


# ============================================================================ rms_norm

def norm_tol(ref, dtype):
    r = to_torch(ref).to(torch.float64)
    return r.abs() * (4 * 2.0 ** -23 + ULP_OUT[dtype]) + TINY_OUT[dtype]


@pytest.mark.parametrize("dx", FLOAT_DTYPES, ids=name)
@pytest.mark.parametrize("dw", FLOAT_DTYPES, ids=name)
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (3, 4099), (2, 16384), (2, 3, 7)], ids=str)
def test_rms_norm(gen, dx, dw, shape):
    x, _ = randn(*shape, dtype=dx, gen=gen, scale=3.0)
    w, _ = randn(shape[-1], dtype=dw, gen=gen)
    ref = ops.rms_norm(x, w, 1e-6)
    got = ops.rms_norm(x.to("cuda"), w.to("cuda"), 1e-6)
    assert got.device != "cpu"
    assert_within(got.cpu(), ref, norm_tol(ref, dx))


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("do", FLOAT_DTYPES, ids=name)
def test_rms_norm_layouts_and_out_dtype(gen, kind, do):
    shape = (129, 67)
    x, _ = randn(*shape, dtype=ip.bfloat16, gen=gen)
    w, _ = randn(shape[-1], dtype=ip.float32, gen=gen)
    xc, xg, _ = placed(x, kind)
    oc, og, fetch = placed(filled(shape, do), "transposed" if kind == "sliced" else kind)
    ops.rms_norm(xc, w, 1e-5, out=oc)
    ops.rms_norm(xg, w.to("cuda"), 1e-5, out=og)
    assert_within(fetch(), oc, norm_tol(oc, do))


def test_rms_norm_in_place_and_extremes(gen):
    """out is x; rows of zeros (rinv = 1/sqrt(eps)), huge and tiny magnitudes, a broadcast weight."""
    x64 = torch.randn(6, 257, generator=gen, dtype=torch.float64)
    x64[0] = 0.0
    x64[1] *= 1e30
    x64[2] *= 1e-30
    x64[3, 5] = 1e20
    x = from_torch(x64.to(torch.float32))
    w = ip.Tensor.full((1,), 0.5).expand(257)
    ref = ops.rms_norm(x, w, 1e-2)
    g = x.to("cuda")
    ops.rms_norm(g, ip.Tensor.full((1,), 0.5).to("cuda").expand(257), 1e-2, out=g)
    assert_within(g.cpu(), ref, norm_tol(ref, ip.float32))


@pytest.mark.parametrize("dr", FLOAT_DTYPES, ids=name)
@pytest.mark.parametrize("dx", FLOAT_DTYPES, ids=name)
def test_add_rms_norm(gen, dr, dx):
    shape = (7, 1031)
    r, _ = randn(*shape, dtype=dr, gen=gen, scale=3.0)
    x, _ = randn(*shape, dtype=dx, gen=gen)
    w, _ = randn(shape[-1], dtype=ip.bfloat16, gen=gen)
    rg = r.to("cuda")
    r_cpu = r.clone()
    ref = ops.add_rms_norm(r_cpu, x, w, 1e-6)
    got = ops.add_rms_norm(rg, x.to("cuda"), w.to("cuda"), 1e-6)
    assert_bits_equal(rg.cpu(), r_cpu)  # the stored residual: one f32 add, rounded to dr
    assert_within(got.cpu(), ref, norm_tol(ref, got.dtype))


@pytest.mark.parametrize("kind", ["strided", "out_is_x", "residual_is_x", "3d_long_rows"])
def test_add_rms_norm_layouts(gen, kind):
    shape = (2, 3, 8193) if kind == "3d_long_rows" else (9, 130)
    r, _ = randn(*shape, dtype=ip.bfloat16, gen=gen)
    x, _ = randn(*shape, dtype=ip.float32, gen=gen)
    w, _ = randn(shape[-1], dtype=ip.float32, gen=gen)
    wg = w.to("cuda")
    if kind == "strided":
        rc, rg, rfetch = placed(r, "transposed")
        xc, xg, _ = placed(x, "sliced")
        oc, og, ofetch = placed(filled(shape, ip.float16), "sliced")
        ops.add_rms_norm(rc, xc, w, 1e-6, out=oc)
        ops.add_rms_norm(rg, xg, wg, 1e-6, out=og)
        assert_bits_equal(rfetch(), rc)
        assert_within(ofetch(), oc, norm_tol(oc, ip.float16))
    elif kind == "out_is_x":
        rc, xc = r.clone(), x.clone()
        rg, xg = r.to("cuda"), x.to("cuda")
        ops.add_rms_norm(rc, xc, w, 1e-6, out=xc)
        ops.add_rms_norm(rg, xg, wg, 1e-6, out=xg)
        assert_bits_equal(rg.cpu(), rc)
        assert_within(xg.cpu(), xc, norm_tol(xc, ip.float32))
    elif kind == "residual_is_x":  # residual += residual (doubles it), then the norm
        rc = r.clone()
        rg = r.to("cuda")
        oc = ops.add_rms_norm(rc, rc, w, 1e-6)
        og = ops.add_rms_norm(rg, rg, wg, 1e-6)
        assert_bits_equal(rg.cpu(), rc)
        assert_within(og.cpu(), oc, norm_tol(oc, ip.bfloat16))
    else:
        rc, rg = r.clone(), r.to("cuda")
        oc = ops.add_rms_norm(rc, x, w, 1e-6)
        og = ops.add_rms_norm(rg, x.to("cuda"), wg, 1e-6)
        assert_bits_equal(rg.cpu(), rc)
        assert_within(og.cpu(), oc, norm_tol(oc, ip.bfloat16))


def test_rms_norm_empty():
    x = ip.Tensor.empty(0, 16, device="cuda")
    w = ip.Tensor.zeros(16).to("cuda")
    assert ops.rms_norm(x, w, 1e-6).shape == (0, 16)


# ============================================================================ rope

def inv_freq(R, theta=10000.0):
    return from_torch(1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.int64).to(torch.float32) / R)))


def rope_tol(x, ref, R, interleaved, scaling, dtype):
    """The per-element bound of the module docstring; x and ref are our CPU tensors."""
    x64 = to_torch(x).to(torch.float64)
    xr, half = x64[..., :R], R // 2
    a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
    m = a.abs() + b.abs()
    mag = torch.cat([m, m, torch.zeros_like(x64[..., R:])], -1)
    r = to_torch(ref).to(torch.float64)
    return mag * max(abs(scaling), 1.0) * 2.0 ** -20 + r.abs() * ULP_OUT[dtype] + TINY_OUT[dtype]


def random_positions(T, dtype, gen, high=40000):
    pos = torch.randint(0, high, (T,), generator=gen)
    pos[0] = 30000 if T > 1 else pos[0]
    return from_torch(pos.to(TORCH_DTYPES[dtype]))


def check_rope(x, pos, inv, R, interleaved, scaling, out_dtype=None, x_kind="contiguous", out_kind=None):
    """ops.rope on the CPU and on the GPU with x (and out) in the given layouts; rotated dims
    within the bound, copied dims exact."""
    out_dtype = out_dtype or x.dtype
    xc, xg, _ = placed(x, x_kind)
    oc, og, fetch = placed(filled(x.shape, out_dtype), out_kind or x_kind)
    ops.rope(xc, pos, inv, R, interleaved, scaling, out=oc)
    ops.rope(xg, pos.to("cuda"), inv.to("cuda"), R, interleaved, scaling, out=og)
    got = fetch()
    assert_within(got, oc, rope_tol(x, oc, R, interleaved, scaling, out_dtype))
    if R < x.shape[-1]:
        assert_bits_equal(got[..., R:], oc[..., R:])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=name)
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("T,H,D,R", [(1, 1, 2, 2), (7, 3, 64, 64), (5, 4, 128, 64), (3, 2, 130, 96),
                                     (129, 16, 128, 128), (2, 1, 256, 32)], ids=str)
def test_rope(gen, dtype, interleaved, T, H, D, R):
    x, _ = randn(T, H, D, dtype=dtype, gen=gen)
    for pos_dtype, scaling in [(ip.int64, 1.0), (ip.int32, 0.7071)]:
        check_rope(x, random_positions(T, pos_dtype, gen), inv_freq(R), R, interleaved, scaling)


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=name)
def test_rope_in_place(gen, interleaved, dtype):
    T, H, D, R = 9, 5, 80, 48
    x, _ = randn(T, H, D, dtype=dtype, gen=gen)
    pos = random_positions(T, ip.int64, gen)
    inv = inv_freq(R)
    xc, xg = x.clone(), x.to("cuda")
    ops.rope(xc, pos, inv, R, interleaved, 1.3, out=xc)
    ops.rope(xg, pos.to("cuda"), inv.to("cuda"), R, interleaved, 1.3, out=xg)
    got = xg.cpu()
    assert_within(got, xc, rope_tol(x, xc, R, interleaved, 1.3, dtype))
    assert_bits_equal(got[..., R:], xc[..., R:])


@pytest.mark.parametrize("x_kind,out_kind", [("transposed", "contiguous"), ("sliced", "transposed"),
                                             ("contiguous", "sliced")])
@pytest.mark.parametrize("interleaved", [0, 1])
def test_rope_strided_and_converting(gen, x_kind, out_kind, interleaved):
    T, H, D, R = 11, 6, 64, 32
    x, _ = randn(T, H, D, dtype=ip.bfloat16, gen=gen)
    pos = random_positions(T, ip.int32, gen)
    check_rope(x, pos, inv_freq(R), R, interleaved, 1.0, out_dtype=ip.float32, x_kind=x_kind, out_kind=out_kind)
    check_rope(x, pos, inv_freq(R), R, interleaved, 1.0, out_dtype=ip.float16, x_kind=x_kind, out_kind=out_kind)


def test_rope_large_negative_and_strided_positions(gen):
    T, H, D, R = 64, 2, 128, 128
    x, _ = randn(T, H, D, dtype=ip.float32, gen=gen)
    pos64 = torch.randint(-2 ** 40, 2 ** 40, (2 * T,), generator=gen)
    pos64[:8] = torch.tensor([0, 1, -1, 30000, 32767, 131071, 10 ** 6, -(10 ** 7)])
    pos = from_torch(pos64)[::2]  # stride 2
    xc, xg = x, x.to("cuda")
    oc = ops.rope(xc, pos, inv_freq(R, 1e6), R)
    og = ops.rope(xg, from_torch(pos64).to("cuda")[::2], inv_freq(R, 1e6).to("cuda"), R)
    assert_within(og.cpu(), oc, rope_tol(x, oc, R, 0, 1.0, ip.float32))


def test_rope_empty():
    x = ip.Tensor.empty(0, 2, 8, device="cuda")
    pos = ip.Tensor.empty(0, dtype=ip.int64, device="cuda")
    assert ops.rope(x, pos, inv_freq(8).to("cuda"), 8).shape == (0, 2, 8)


# ============================================================================ rms_norm_rope

def norm_rope_tol(y, ref, R, interleaved, scaling, dtype):
    """The bound of the module docstring; y the CPU's normalised head in f32, ref the CPU result."""
    y64 = to_torch(y).to(torch.float64)
    yr, half = y64[..., :R], R // 2
    a, b = (yr[..., 0::2], yr[..., 1::2]) if interleaved else (yr[..., :half], yr[..., half:])
    m = a.abs() + b.abs()
    mag = torch.cat([m, m, y64[..., R:].abs()], -1)
    r = to_torch(ref).to(torch.float64)
    return mag * max(abs(scaling), 1.0) * 2.0 ** -20 + r.abs() * ULP_OUT[dtype] + TINY_OUT[dtype]


def check_norm_rope(x, w, pos, inv, R, interleaved, scaling, eps=1e-6, out_dtype=None, x_kind="contiguous",
                    out_kind=None):
    """ops.rms_norm_rope on the CPU and on the GPU, x and out in the given layouts."""
    out_dtype = out_dtype or x.dtype
    xc, xg, _ = placed(x, x_kind)
    oc, og, fetch = placed(filled(x.shape, out_dtype), out_kind or x_kind)
    ops.rms_norm_rope(xc, w, eps, pos, inv, interleaved, R, scaling, out=oc)
    ops.rms_norm_rope(xg, w.to("cuda"), eps, pos.to("cuda"), inv.to("cuda"), interleaved, R, scaling, out=og)
    y = ops.rms_norm(x, w, eps, out=ip.Tensor.empty(x.shape, dtype=ip.float32))
    assert_within(fetch(), oc, norm_rope_tol(y, oc, R, interleaved, scaling, out_dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=name)
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("T,H,D,R", [(1, 1, 2, 2), (7, 3, 64, 64), (5, 5, 128, 64), (3, 2, 130, 96),
                                     (129, 16, 128, 128), (2, 1, 256, 32), (1, 40, 128, 128), (3, 7, 18, 6),
                                     (2, 3, 1024, 1024), (2, 3, 544, 32)], ids=str)
def test_rms_norm_rope(gen, dtype, interleaved, T, H, D, R):
    """Decode and prefill sizes, H not a multiple of the block's 4 heads, partial rotary, and the
    widest heads the registers hold (R / 2 = 512; D - R = 512)."""
    x, _ = randn(T, H, D, dtype=dtype, gen=gen, scale=3.0)
    for pos_dtype, scaling, w_dtype in [(ip.int64, 1.0, dtype), (ip.int32, 0.7071, ip.float32)]:
        w, _ = randn(D, dtype=w_dtype, gen=gen)
        check_norm_rope(x, w, random_positions(T, pos_dtype, gen), inv_freq(R), R, interleaved, scaling)


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=name)
def test_rms_norm_rope_qkv_in_place(gen, interleaved, dtype):
    """q and k normalised and rotated in place as head slices of a fused qkv [T, (Hq + 2 Hkv) D]
    (Qwen3's attention); v is left alone."""
    T, Hq, Hkv, D = 9, 8, 2, 128
    qkv, _ = randn(T, (Hq + 2 * Hkv) * D, dtype=dtype, gen=gen)
    wq, _ = randn(D, dtype=dtype, gen=gen)
    wk, _ = randn(D, dtype=dtype, gen=gen)
    pos = random_positions(T, ip.int64, gen)
    inv = inv_freq(D, 1e6)
    cpu, gpu = qkv.clone(), qkv.to("cuda")
    for t, p, i, wqd, wkd in [(cpu, pos, inv, wq, wk), (gpu, pos.to("cuda"), inv.to("cuda"), wq.to("cuda"), wk.to("cuda"))]:
        heads = t.view(T, Hq + 2 * Hkv, D)
        q, k = heads[:, :Hq], heads[:, Hq:Hq + Hkv]
        ops.rms_norm_rope(q, wqd, 1e-6, p, i, interleaved, out=q)
        ops.rms_norm_rope(k, wkd, 1e-6, p, i, interleaved, out=k)
    got = gpu.cpu().view(T, Hq + 2 * Hkv, D)
    ref = cpu.view(T, Hq + 2 * Hkv, D)
    orig = qkv.view(T, Hq + 2 * Hkv, D)
    for sl, w in [(slice(0, Hq), wq), (slice(Hq, Hq + Hkv), wk)]:
        y = ops.rms_norm(orig[:, sl].contiguous(), w, 1e-6, out=ip.Tensor.empty((T, sl.stop - sl.start, D)))
        assert_within(got[:, sl].contiguous(), ref[:, sl].contiguous(),
                      norm_rope_tol(y, ref[:, sl].contiguous(), D, interleaved, 1.0, dtype))
    assert_bits_equal(got[:, Hq + Hkv:].contiguous(), orig[:, Hq + Hkv:].contiguous())


@pytest.mark.parametrize("x_kind,out_kind", [("transposed", "contiguous"), ("sliced", "transposed"),
                                             ("contiguous", "sliced")])
@pytest.mark.parametrize("interleaved", [0, 1])
def test_rms_norm_rope_strided_and_converting(gen, x_kind, out_kind, interleaved):
    T, H, D, R = 11, 6, 64, 32
    x, _ = randn(T, H, D, dtype=ip.bfloat16, gen=gen)
    w, _ = randn(D, dtype=ip.bfloat16, gen=gen)
    pos = random_positions(T, ip.int32, gen)
    for out_dtype in FLOAT_DTYPES:
        check_norm_rope(x, w, pos, inv_freq(R), R, interleaved, 1.0, out_dtype=out_dtype, x_kind=x_kind,
                        out_kind=out_kind)


def test_rms_norm_rope_extremes_and_strided_positions(gen):
    """Heads of zeros (rinv = 1/sqrt(eps)), huge and tiny magnitudes, a large eps, a broadcast
    weight, positions far apart with stride 2."""
    T, H, D, R = 6, 3, 128, 64
    x64 = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    x64[0, 0] = 0.0
    x64[1, 1] *= 1e30
    x64[2, 2] *= 1e-30
    x = from_torch(x64.to(torch.float32))
    w = ip.Tensor.full((1,), 0.5).expand(D)
    pos64 = torch.randint(-2 ** 40, 2 ** 40, (2 * T,), generator=gen)
    pos = from_torch(pos64)[::2]
    oc = ops.rms_norm_rope(x, w, 1e-2, pos, inv_freq(R, 1e6), rotary_dim=R)
    og = ops.rms_norm_rope(x.to("cuda"), ip.Tensor.full((1,), 0.5).to("cuda").expand(D), 1e-2,
                           from_torch(pos64).to("cuda")[::2], inv_freq(R, 1e6).to("cuda"), rotary_dim=R)
    y = ops.rms_norm(x, w, 1e-2)
    assert_within(og.cpu(), oc, norm_rope_tol(y, oc, R, 0, 1.0, ip.float32))


def test_rms_norm_rope_too_wide_and_empty():
    x = ip.Tensor.empty(0, 2, 8, device="cuda")
    w, pos = ip.Tensor.full((8,), 1.0).to("cuda"), ip.Tensor.empty(0, dtype=ip.int64, device="cuda")
    assert ops.rms_norm_rope(x, w, 1e-6, pos, inv_freq(8).to("cuda")).shape == (0, 2, 8)
    x = ip.Tensor.zeros(2, 2, 1088).to("cuda")  # D - R = 1056 > 512
    w, pos = ip.Tensor.full((1088,), 1.0).to("cuda"), ip.Tensor.zeros(2, dtype=ip.int64).to("cuda")
    with pytest.raises(ip.UnsupportedError, match="to_rms_norm_rope: head dim 1088 with rotary_dim 32 is too wide"):
        ops.rms_norm_rope(x, w, 1e-6, pos, inv_freq(32).to("cuda"), rotary_dim=32)


# ============================================================================ rope_kv_store
# to_rope_kv_store: the rope (or rms_norm_rope) kernel with the cache store switched on, one
# launch. Against the separate GPU ops (rope / rms_norm_rope into out, then kv_cache_store of
# out's k heads and v): the same bits, out and both caches whole. Against the CPU op: out within
# the rope / rms_norm_rope bounds above, the v cache exact, the k cache's stored rows within out's
# bound plus one rounding into the cache dtype (the rows hold out's k heads), the rest exact.

def kv_inputs(gen, T, Hq, Hkv, D, dtype, cache_dtype, stacked, bs=4):
    """(qkv buffer or None, qk, v, k_cache, v_cache, slots) as CPU tensors; the slots distinct,
    some tokens padding (negative), the caches random."""
    if stacked:
        buf, _ = randn(T, Hq + 2 * Hkv, D, dtype=dtype, gen=gen, scale=2.0)
        qk, v = buf.narrow(1, 0, Hq + Hkv), buf.narrow(1, Hq + Hkv, Hkv)
    else:
        buf = None
        qk, _ = randn(T, Hq + Hkv, D, dtype=dtype, gen=gen, scale=2.0)
        v, _ = randn(T, Hkv, D, dtype=cache_dtype, gen=gen, scale=2.0)
    nb = T // bs + 2
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    if T > 2:
        slots[torch.rand(T, generator=gen) < 0.25] = -1
    kc, _ = randn(nb, bs, Hkv, D, dtype=cache_dtype, gen=gen)
    vc, _ = randn(nb, bs, Hkv, D, dtype=cache_dtype, gen=gen)
    return buf, qk, v, kc, vc, from_torch(slots)


def fused_and_separate_gpu(qk, v, kc, vc, slots, pos, inv, R, interleaved, scaling, w, eps, in_place, buf, out_dtype):
    """[(out, k_cache, v_cache, buffer)] on the GPU for (fused, separate), each on fresh copies."""
    H, Hkv = qk.shape[1], kc.shape[2]
    g = dict(pos=pos.to("cuda"), inv=inv.to("cuda"), slots=slots.to("cuda"), w=w.to("cuda") if w is not None else None)
    results = []
    for fused in (True, False):
        if buf is not None:
            b = buf.to("cuda")
            q, vv = b.narrow(1, 0, H), b.narrow(1, H, Hkv)
        else:
            b, q, vv = None, qk.to("cuda"), v.to("cuda")
        k_c, v_c = kc.to("cuda"), vc.to("cuda")
        out = q if in_place else ip.Tensor.full(q.shape, float("nan"), dtype=out_dtype, device="cuda")
        if fused:
            ops.rope_kv_store(q, g["pos"], g["inv"], vv, k_c, v_c, g["slots"], norm_weight=g["w"], eps=eps,
                              interleaved=interleaved, rotary_dim=R, attention_scaling=scaling, out=out)
        else:
            if w is None:
                ops.rope(q, g["pos"], g["inv"], R, interleaved, scaling, out=out)
            else:
                ops.rms_norm_rope(q, g["w"], eps, g["pos"], g["inv"], interleaved, R, scaling, out=out)
            ops.kv_cache_store(k_c, v_c, out.narrow(1, H - Hkv, Hkv), vv, g["slots"])
        results.append((out.cpu(), k_c.cpu(), v_c.cpu(), b.cpu() if b is not None else None))
    return results


@pytest.mark.parametrize("norm", [None, "row", "heads"], ids=str)
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("T,Hq,Hkv,D,R", [(1, 32, 8, 128, 128), (7, 6, 2, 64, 64), (3, 3, 1, 18, 6),
                                         (129, 16, 4, 128, 128), (2, 5, 5, 130, 34), (4, 0, 3, 16, 16),
                                         (3, 2, 1, 1024, 1024), (2, 3, 0, 8, 8)], ids=str)
def test_rope_kv_store(gen, norm, interleaved, T, Hq, Hkv, D, R):
    """Decode (Qwen3-4B's heads) and prefill sizes, odd heads and head sizes, partial rotary, the
    widest head the norm's registers hold, qk = k alone (Hq = 0), Hkv = 0 (no store); the model's
    stacked layout in place, and qk / v apart into an out of another dtype."""
    H = Hq + Hkv
    for dtype, cache_dtype, stacked, in_place, out_dtype, scaling in [
            (ip.bfloat16, ip.bfloat16, True, True, ip.bfloat16, 1.0),
            (ip.float32, ip.float16, False, False, ip.bfloat16, 0.7071),
            (ip.float16, ip.float32, False, True, ip.float16, 1.3)]:
        buf, qk, v, kc, vc, slots = kv_inputs(gen, T, Hq, Hkv, D, dtype, cache_dtype, stacked)
        w = None if norm is None else randn(*((D,) if norm == "row" else (H, D)), dtype=cache_dtype, gen=gen)[0]
        pos, inv, eps = random_positions(T, ip.int64, gen), inv_freq(R), 1e-6
        (out, k_c, v_c, b), (out2, k_c2, v_c2, b2) = fused_and_separate_gpu(
            qk, v, kc, vc, slots, pos, inv, R, interleaved, scaling, w, eps, in_place, buf, out_dtype)
        for got, want in [(out, out2), (k_c, k_c2), (v_c, v_c2)] + ([(b, b2)] if buf is not None else []):
            assert_bits_equal(got, want)
        # the CPU op on the same inputs
        q_c = qk.clone()
        out_c = q_c if in_place else ip.Tensor.full(qk.shape, float("nan"), dtype=out_dtype)
        kc_c, vc_c = kc.clone(), vc.clone()
        ops.rope_kv_store(q_c, pos, inv, v, kc_c, vc_c, slots, norm_weight=w, eps=eps, interleaved=interleaved,
                          rotary_dim=R, attention_scaling=scaling, out=out_c)
        if w is None:
            tol = rope_tol(qk, out_c, R, interleaved, scaling, out_dtype)
        else:
            y = ip.Tensor.empty(qk.shape, dtype=ip.float32)  # the normalised heads, each by its weight
            for h in range(H):
                wh = w if w.ndim == 1 else w.narrow(0, h, 1).view(D)
                ops.rms_norm(qk.narrow(1, h, 1), wh, eps, out=y.narrow(1, h, 1))
            tol = norm_rope_tol(y, out_c, R, interleaved, scaling, out_dtype)
        assert_within(out, out_c, tol)
        assert_bits_equal(v_c, vc_c)
        keep = to_torch(slots) >= 0
        if Hkv:
            rows = to_torch(slots)[keep]
            ref = to_torch(kc_c).to(torch.float64).view(-1, Hkv, D)
            k_tol = torch.zeros_like(ref)
            k_tol[rows] = tol[keep][:, H - Hkv:] + ref[rows].abs() * ULP_OUT[cache_dtype] + TINY_OUT[cache_dtype]
            assert_within(k_c.view(-1, Hkv, D), kc_c.view(-1, Hkv, D), k_tol)


# ============================================================================ embedding

def random_ids(T, V, dtype, gen):
    ids = torch.randint(0, V, (T,), generator=gen)
    ids[0] = V - 1
    if T > 1:
        ids[1] = 0
    return from_torch(ids.to(TORCH_DTYPES[dtype]))


@pytest.mark.parametrize("table_dtype,out_dtype", [(a, b) for a in FLOAT_DTYPES for b in FLOAT_DTYPES]
                         + [(ip.int8, ip.int8), (ip.int32, ip.int32), (ip.int64, ip.int64), (ip.uint8, ip.uint8)],
                         ids=lambda d: name(d))
@pytest.mark.parametrize("ids_dtype", [ip.int32, ip.int64], ids=name)
@pytest.mark.parametrize("V,D,T", [(1, 1, 1), (13, 7, 129), (1000, 4099, 3)], ids=str)
def test_embedding(gen, table_dtype, out_dtype, ids_dtype, V, D, T):
    if table_dtype.is_float:
        table, _ = randn(V, D, dtype=table_dtype, gen=gen, scale=100.0)
    else:
        raw = torch.randint(-128, 128, (V, D), generator=gen) * (2 ** 20 if table_dtype is ip.int64 else 1)
        if table_dtype is ip.uint8:
            raw = raw + 128
        table = from_torch(raw.to(TORCH_DTYPES[table_dtype]))
    ids = random_ids(T, V, ids_dtype, gen)
    out = ip.Tensor.empty(T, D, dtype=out_dtype)
    ops.embedding(table, ids, out=out)
    og = ip.Tensor.empty(T, D, dtype=out_dtype, device="cuda")
    ops.embedding(table.to("cuda"), ids.to("cuda"), out=og)
    assert_bits_equal(og.cpu(), out)


@pytest.mark.parametrize("table_kind,out_kind", [("transposed", "sliced"), ("sliced", "transposed"),
                                                 ("contiguous", "sliced")])
def test_embedding_strided(gen, table_kind, out_kind):
    V, D, T = 31, 65, 40
    table, _ = randn(V, D, dtype=ip.bfloat16, gen=gen)
    ids64 = torch.randint(0, V, (2 * T,), generator=gen)
    tc, tg, _ = placed(table, table_kind)
    oc, og, fetch = placed(filled((T, D), ip.float32), out_kind)
    ops.embedding(tc, from_torch(ids64)[::2], out=oc)
    ops.embedding(tg, from_torch(ids64).to("cuda")[::2], out=og)
    assert_bits_equal(fetch(), oc)


@pytest.mark.parametrize("qtype", [dtypes.q8_0, dtypes.q4_0, dtypes.q4_1, dtypes.q4_k, dtypes.q6_k], ids=str)
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=name)
def test_embedding_quantized(gen, qtype, out_dtype):
    """Rows of a quantized table dequantized bit for bit like the CPU (quant.c)."""
    V, D, T = 37, 768, 129
    src = torch.randn(V, D, generator=gen) * torch.logspace(-3, 2, V)[:, None]
    table = ops.quantize(from_torch(src), qtype)
    ids = random_ids(T, V, ip.int64, gen)
    oc, og, fetch = placed(filled((T, D), out_dtype), "sliced")
    ops.embedding(table, ids, out=oc)
    tg = table.to("cuda")
    ops.embedding(tg, ids.to("cuda"), out=og)
    assert_bits_equal(fetch(), oc)
    # a row-sliced table (row stride of two rows) and int32 ids
    ids32 = random_ids(T, (V + 1) // 2, ip.int32, gen)
    ref = ops.embedding(table[::2], ids32)
    got = ops.embedding(tg[::2], ids32.to("cuda"))
    assert got.dtype is ip.float32
    assert_bits_equal(got.cpu(), ref)


def test_embedding_empty():
    table = ip.Tensor.zeros(4, 3).to("cuda")
    assert ops.embedding(table, ip.Tensor.empty(0, dtype=ip.int64, device="cuda")).shape == (0, 3)


# ============================================================================ argmax / topk

def make_x(rows, n, dtype, gen, kind):
    """[rows, n] of one kind: 'randn' (distinct), 'ties' (small integers), 'nan' (NaN and +-inf
    sprinkled in), 'special' (constant rows: -inf, NaN, 2.5, -0.0 with one +0.0, inf)."""
    if kind == "randn":
        ref = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    elif kind == "ties":
        ref = torch.randint(-2, 3, (rows, n), generator=gen).to(torch.float64)
    elif kind == "nan":
        ref = torch.randn(rows, n, generator=gen, dtype=torch.float64)
        pick = torch.rand(rows, n, generator=gen)
        ref[pick < 0.02] = float("nan")
        ref[(pick >= 0.02) & (pick < 0.04)] = float("inf")
        ref[(pick >= 0.04) & (pick < 0.06)] = -float("inf")
    else:
        fills = [-float("inf"), float("nan"), 2.5, -0.0, float("inf")]
        ref = torch.tensor([fills[r % len(fills)] for r in range(rows)], dtype=torch.float64)[:, None].repeat(1, n)
        if rows > 3 and n > 1:
            ref[3, n // 2] = 0.0
    return from_torch(ref.to(TORCH_DTYPES[dtype]))


KINDS = ["randn", "ties", "nan", "special"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=name)
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (7, 129), (5, 4099), (2, 151936)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_argmax(gen, dtype, rows, n, kind):
    x = make_x(rows, n, dtype, gen, kind)
    ref = ops.argmax(x)
    got = ops.argmax(x.to("cuda"))
    assert torch.equal(to_torch(got.cpu()), to_torch(ref))


@pytest.mark.parametrize("kind", ["transposed", "sliced"])
def test_argmax_strided_and_shapes(gen, kind):
    x = make_x(12, 1000, ip.float16, gen, "ties")
    xc, xg, _ = placed(x, kind)
    assert torch.equal(to_torch(ops.argmax(xg).cpu()), to_torch(ops.argmax(xc)))
    x3 = make_x(6, 33, ip.float32, gen, "nan").view(2, 3, 33)
    got = ops.argmax(x3.to("cuda"))
    assert got.shape == (2, 3)
    assert torch.equal(to_torch(got.cpu()), to_torch(ops.argmax(x3)))
    one = make_x(1, 50, ip.bfloat16, gen, "randn").view(50)  # a 1-d x: a 0-d out
    assert torch.equal(to_torch(ops.argmax(one.to("cuda")).cpu()), to_torch(ops.argmax(one)))
    # a NaN late in a long row beats everything before it; the first of two NaNs wins
    t = torch.randn(3, 70000, generator=gen)
    t[0, 65000] = float("nan")
    t[1, 123], t[1, 60000] = float("nan"), float("nan")
    t[2, :] = 1.0
    x = from_torch(t)
    assert to_torch(ops.argmax(x.to("cuda")).cpu()).tolist() == [65000, 123, 0]


def check_topk(x, k, values_dtype=None, indices_dtype=ip.int64, x_kind="contiguous", out_kind="contiguous"):
    values_dtype = values_dtype or x.dtype
    lead = x.shape[:-1] + (k,)
    xc, xg, _ = placed(x, x_kind)
    vc, vg, vfetch = placed(ip.Tensor.zeros(lead, dtype=values_dtype), out_kind)
    ic, ig, ifetch = placed(ip.Tensor.zeros(lead, dtype=indices_dtype), out_kind)
    ops.topk(xc, k, values=vc, indices=ic)
    ops.topk(xg, k, values=vg, indices=ig)
    assert torch.equal(to_torch(ifetch()), to_torch(ic))
    assert_bits_equal(vfetch(), vc)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=name)
@pytest.mark.parametrize("rows,n,k", [(1, 1, 1), (3, 7, 7), (7, 129, 1), (7, 129, 50), (5, 4099, 4099),
                                      (3, 4099, 2048), (3, 4099, 2049), (2, 9000, 4097)], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_topk(gen, dtype, rows, n, k, kind):
    check_topk(make_x(rows, n, dtype, gen, kind), k)


@pytest.mark.parametrize("k", [1, 50, 1000])
@pytest.mark.parametrize("kind", ["randn", "ties", "nan"])
def test_topk_vocabulary_rows(gen, k, kind):
    check_topk(make_x(4, 151936, ip.bfloat16, gen, kind), k)


def test_topk_full_sort_of_a_vocabulary_row(gen):
    check_topk(make_x(1, 151936, ip.float32, gen, "ties"), 151936, indices_dtype=ip.int32)


@pytest.mark.parametrize("values_dtype", [None, ip.float32], ids=["x_dtype", "f32"])
@pytest.mark.parametrize("indices_dtype", [ip.int32, ip.int64], ids=name)
@pytest.mark.parametrize("x_kind,out_kind", [("transposed", "sliced"), ("sliced", "transposed")])
def test_topk_dtypes_and_strides(gen, values_dtype, indices_dtype, x_kind, out_kind):
    x = make_x(9, 301, ip.float16, gen, "nan")
    check_topk(x, 17, values_dtype, indices_dtype, x_kind, out_kind)


def test_topk_shapes_and_ascending_row(gen):
    x3 = make_x(6, 40, ip.float32, gen, "ties").view(2, 3, 40)
    vc, ic = ops.topk(x3, 5)
    vg, ig = ops.topk(x3.to("cuda"), 5)
    assert vg.shape == (2, 3, 5) and ig.shape == (2, 3, 5)
    assert torch.equal(to_torch(ig.cpu()), to_torch(ic))
    assert_bits_equal(vg.cpu(), vc)
    # every value enters the CPU heap in an ascending row; the GPU's selection does not care
    asc = from_torch(torch.arange(20000, dtype=torch.float32).view(1, 20000))
    check_topk(asc, 300)
    vals, idx = ops.topk(asc.to("cuda"), 3)
    assert to_torch(idx.cpu()).tolist() == [[19999, 19998, 19997]]


def test_reduce_empty():
    x = ip.Tensor.empty(0, 5, device="cuda")
    assert ops.argmax(x).shape == (0,)
    v, i = ops.topk(x, 2)
    assert v.shape == (0, 2) and i.shape == (0, 2)
