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


def hf_inv_freq(R, theta=10000.0):
    """inv_freq as transformers computes it, in float32 (torch.float32 tensor [R/2])."""
    return 1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.int64).to(torch.float32) / R))


def rope_ref(x64, pos, inv32, R, interleaved, scaling):
    """The rotation's float64 oracle: (reference, magnitude) [T, H, D] of x64 [T, H, D] at
    positions pos (a torch int tensor [T]) with inv32 float32 [R/2]: angles float32(pos) * inv_freq
    in float32 as transformers makes them, everything after in float64; magnitude is the sum of
    the absolute terms (what an error bound scales with)."""
    ang = pos.to(torch.float32)[:, None] * inv32[None, :]
    emb = torch.cat([ang, ang], -1).to(torch.float64)
    cos, sin = (torch.cos(emb) * scaling)[:, None, :], (torch.sin(emb) * scaling)[:, None, :]
    xr = x64[..., :R]
    if interleaved:
        xr = torch.cat([xr[..., 0::2], xr[..., 1::2]], -1)
    rot = torch.cat([-xr[..., R // 2:], xr[..., :R // 2]], -1)
    ref = torch.cat([xr * cos + rot * sin, x64[..., R:]], -1)
    mag = torch.cat([(xr * cos).abs() + (rot * sin).abs(), x64[..., R:].abs()], -1)
    return ref, mag


def paged_attention_ref(seqs, cu, bt, bs, q, eq, kc, ek, vc, scale):
    """Causal attention's float64 oracle over a paged cache, with its error bound: (want, tol)
    [T, Hq, D]. seqs [(queries, context)] own q rows cu[s] .. cu[s + 1] (q [T, Hq, D] float64,
    each element known to within eq); the cache rows kc, vc [slots, Hkv, D] float64 (kc's within
    ek), sequence s's keys at rows bt[s, p // bs] * bs + p % bs. tol: test_attention's f32 bound
    (the scores to (D + 2) u, softmax and sum (2 L + 120) u) plus how far eq and ek can move a
    score, twice (the max and the sum), times sum_l w_l |v_l|."""
    T, Hq, D = q.shape
    G = Hq // kc.shape[1]
    U32 = 2.0 ** -24
    want = torch.zeros(T, Hq, D, dtype=torch.float64)
    tol = torch.zeros_like(want)
    for s, (n, L) in enumerate(seqs):
        if n == 0:
            continue
        p = torch.arange(L)
        rows = bt[s, p // bs] * bs + p % bs
        K, EK, V = (t[rows].repeat_interleave(G, 1) for t in (kc, ek, vc))  # [L, Hq, D]
        r = slice(int(cu[s]), int(cu[s + 1]))
        qs, es = q[r], eq[r]
        hidden = (p[None, :] > torch.arange(L - n, L)[:, None])[:, None, :]  # [n, 1, L]: key past the query
        w = (torch.einsum("nhd,lhd->nhl", qs, K) * scale).masked_fill(hidden, float("-inf")).softmax(-1)
        e_s = abs(scale) * ((D + 2) * U32 * torch.einsum("nhd,lhd->nhl", qs.abs(), K.abs())
                            + torch.einsum("nhd,lhd->nhl", es, K.abs() + EK)
                            + torch.einsum("nhd,lhd->nhl", qs.abs(), EK))
        e_s = e_s.masked_fill(hidden, 0).amax(-1, keepdim=True)
        want[r] = torch.einsum("nhl,lhd->nhd", w, V)
        tol[r] = (2 * e_s + (2 * L + 120) * U32) * torch.einsum("nhl,lhd->nhd", w, V.abs())
    return want, tol
