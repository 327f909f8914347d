"""Shared test helpers: moving data between our Tensor and torch (the test-only oracle)."""
import ctypes

import torch

import inference_pio as ip

TORCH_DTYPES = {
    ip.float32: torch.float32, ip.float16: torch.float16, ip.bfloat16: torch.bfloat16,
    ip.int8: torch.int8, ip.int32: torch.int32, ip.int64: torch.int64, ip.uint8: torch.uint8,
}
OUR_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_DTYPES = (ip.float32, ip.float16, ip.bfloat16)


def to_torch(t):
    """A torch copy of our tensor (same dtype and shape)."""
    c = t.cpu().contiguous()
    dtype = TORCH_DTYPES[c.dtype]
    if c.numel() == 0:
        return torch.empty(c.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(bytes(c)), dtype=torch.uint8)
    return raw.view(dtype).reshape(c.shape)


def from_torch(x, device="cpu"):
    """Our copy of a torch tensor (same dtype and shape, contiguous)."""
    x = x.detach().contiguous()
    nbytes = x.numel() * x.element_size()
    dtype = OUR_DTYPES[x.dtype]
    if nbytes == 0:
        return ip.Tensor.empty(tuple(x.shape), dtype=dtype, device=device)
    raw = bytes((ctypes.c_char * nbytes).from_address(x.data_ptr()))
    return ip.Tensor.frombuffer(raw, dtype, tuple(x.shape), copy=True).to(device)


def randn(*shape, dtype=ip.float32, gen=None, scale=1.0):
    """(ours, torch float64 reference) with the same values: drawn in float64, rounded to dtype."""
    ref = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    ref = ref.to(TORCH_DTYPES[dtype])
    return from_torch(ref), ref.to(torch.float64)


def strided(t, kind):
    """A non-contiguous view of our 2-d (or more) tensor t holding the same values:
    'transposed' (materialised transposed, then viewed back) or 'sliced' (every other column
    of a wider buffer)."""
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":
        wide = ip.Tensor.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    raise ValueError(kind)


def on_cuda(t):
    """A copy of t's descriptor marked as a tensor of GPU 63, which no machine here has (never
    dereferenced: the op must refuse it before launching anything)."""
    d = ip.ffi.new("to_tensor *")
    d[0] = t._desc[0]
    d.device = ip.lib.TO_CUDA
    d.device_index = 63
    return d


def assert_within(got, ref, tol):
    """Every |got - ref| <= tol elementwise (float64 torch tensors; NaN fails), else an
    AssertionError naming how many elements failed and the first one."""
    err = (got - ref).abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        i = tuple(int(v) for v in torch.nonzero(bad)[0])
        ratio = float(((err - tol) / tol.clamp_min(1e-300)).nan_to_num(float("inf")).max())
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} elements outside tolerance; first at {i}: "
                             f"got {float(got[i])!r}, expected {float(ref[i])!r}, tol {float(tol[i]):.3g} "
                             f"(worst excess {ratio:.3g}x)")


def bits(t):
    """The raw bits of a float tensor (ours or torch's) as a torch integer tensor, for exact
    comparisons (-0.0 differs from 0.0, NaNs compare by payload)."""
    tt = (to_torch(t) if isinstance(t, ip.Tensor) else t).contiguous()
    return tt.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tt.element_size()])


def assert_bits_equal(got, want, what, reference="the separate ops'"):
    """got and want (ours or torch's) of one shape and dtype with the same bits, else an
    AssertionError saying `what` differs from `reference`."""
    g, w = bits(got), bits(want)
    assert g.shape == w.shape and g.dtype == w.dtype, what
    assert torch.equal(g, w), f"{what} differs from {reference}"
