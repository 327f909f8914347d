"""to_rope_kv_attention on the GPU: one kernel for a decode step of one sequence (T = 1, S = 1,
G = Hq / Hkv <= 8, 16-byte aligned cache rows, sm_90), the two ops' kernels otherwise. qk is only
read: the rotated heads are a temporary (the one kernel's registers and shared memory, or the
fallback's workspace).

Oracles:
  - the two GPU ops it is defined as, rope_kv_store into a fresh tensor of qk's dtype (not in
    place) then paged_attention of that tensor's first Hq heads, on fresh GPU copies of the same
    inputs: out and both caches whole must be their bits exactly, and the whole stacked qkv buffer
    (qk among it) unchanged bit for bit, fused kernel or fallback alike;
  - a float64 reference of the whole layer (as tests/kernels/test_rope_kv_attention.py's), which
    both the GPU op and our CPU op must be within a bound of, so they are within twice it of each
    other. Per element of the rotated heads: E = 20u mag (the rotation on either device, norm
    included: test_rope.py's 6u / 10u widened by the GPU's cos/sin, which may round to the
    neighbouring f32, 2^-20 mag in tests/cuda/test_cuda_norm_rope_embedding_reduce.py) plus the
    rounding into qk's dtype, u_q |ref| (u = 2^-24; u_q = 2^-24, 2^-11, 2^-8 for f32, f16, bf16);
    a new key moves by that plus its rounding into the cache (its bound, checked on the cache's
    new rows), cached keys and all values are read exactly. out:
    test_attention.py's bound (2 E_s + (2 L + 120) u) mag over the values read, E_s grown by what
    the errors of q and the new keys can move a score (|scale| sum_d (E_q |k| + |q| E_k + E_q E_k)),
    plus one rounding into out's dtype.

Inputs are the engine's: positions[t] = p and slot_mapping[t] the slot block_tables gives p (the
op's precondition); blocks handed out shuffled; block_tables padded with ids never read (-1 and
10^6, or the engine's zeros), as wide as asked (the engine's is as wide as the longest context it
allows); cache rows no sequence owns hold NaN, so a stray read shows in out.

The precondition is checked on the GPU only by the one kernel: a violation there is recorded and
raised at the next synchronisation, naming to_rope_kv_attention, with nothing written. The
fallback's kernels check the slots and the batch as the two ops do, not this precondition (not
tested here).
"""
import pytest
import torch

import inference_pio as ip
from inference_pio import ops

from helpers import (FLOAT_DTYPES, TORCH_DTYPES, assert_bits_equal, assert_within, bits, from_torch,
                     paged_attention_ref, rope_ref, to_torch)

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")

U32 = 2.0 ** -24
U = {ip.float32: U32, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}
TINY = {ip.float32: 2.0 ** -150, ip.float16: 2.0 ** -25, ip.bfloat16: 2.0 ** -134}
NAMES = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16"}
NORMS = [None, "row", "heads"]  # no norm, a weight [D], a weight per head [H, D]


def assert_unchanged(got, before, what):
    """got (a host Tensor) has the bits of `before` (torch): the op did not write it."""
    assert torch.equal(bits(got), bits(from_torch(before))), f"{what} was written"


def inv_freq(R, theta=10000.0):
    return 1.0 / (theta ** (torch.arange(0, R, 2, dtype=torch.int64).to(torch.float32) / R))


class Layer:
    """One call's inputs for seqs = [(queries, context), ...] on a shared paged cache, on the host;
    `run` makes fresh copies on a device and calls the fused op or the two ops there. Cache rows no
    sequence owns hold `unowned` (None: random too)."""

    def __init__(self, gen, seqs, Hq, Hkv, D, R=None, bs=16, dtype=ip.bfloat16, cache_dtype=ip.bfloat16,
                 norm=None, interleaved=False, scaling=1.0, width=0, pad=(-1, 10 ** 6), eps=1e-6, spare=2,
                 unowned=float("nan")):
        self.seqs, self.Hq, self.Hkv, self.D, self.bs = seqs, Hq, Hkv, D, bs
        self.R, self.interleaved, self.scaling, self.eps = R or D, interleaved, scaling, eps
        self.scale, self.dtype, self.cache_dtype = D ** -0.5, dtype, cache_dtype
        H, T = Hq + Hkv, sum(n for n, _ in seqs)
        self.T = T
        per_seq = [-(-L // bs) for _, L in seqs]
        nb = sum(per_seq) + spare
        perm = torch.randperm(nb, generator=gen)  # shuffled block tables
        bt = torch.full((len(seqs), max(max(per_seq, default=0) + 1, width)), pad[0], dtype=torch.int64)
        bt[:, -1] = pad[1]
        owned = torch.zeros(nb, bs, dtype=torch.bool)
        pos, seq_of, used = [], [], 0
        for s, ((n, L), k) in enumerate(zip(seqs, per_seq)):
            bt[s, :k] = perm[used:used + k]
            used += k
            p = torch.arange(L)
            owned[bt[s, p // bs], p % bs] = True
            pos.append(torch.arange(L - n, L))
            seq_of.append(torch.full((n,), s))
        self.spare_slots = (perm[used:, None] * bs + torch.arange(bs)).flatten()
        self.pos = torch.cat(pos)
        self.slots = bt[torch.cat(seq_of), self.pos // bs] * bs + self.pos % bs
        self.bt = bt
        self.cu = torch.tensor([0] + [sum(n for n, _ in seqs[:s + 1]) for s in range(len(seqs))])
        self.ctx = torch.tensor([L for _, L in seqs], dtype=torch.int64)
        ct = TORCH_DTYPES[cache_dtype]
        self.kc0 = torch.randn(nb, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
        self.vc0 = torch.randn(nb, bs, Hkv, D, generator=gen, dtype=torch.float64).to(ct)
        if unowned is not None:
            self.kc0[~owned], self.vc0[~owned] = unowned, unowned
        self.buf0 = (torch.randn(T, H + Hkv, D, generator=gen, dtype=torch.float64) * 2).to(TORCH_DTYPES[dtype])
        self.w0 = None
        if norm is not None:
            self.w0 = torch.randn(*((D,) if norm == "row" else (H, D)), generator=gen, dtype=torch.float64).to(ct)
        self.inv0 = inv_freq(self.R)

    def inputs(self, device):
        """(positions, inv_freq, slot_mapping, cu_seqlens_q, context_lens, block_tables, norm weight)."""
        t = [from_torch(x, device) for x in (self.pos, self.inv0, self.slots, self.cu, self.ctx, self.bt)]
        return t + [from_torch(self.w0, device) if self.w0 is not None else None]

    def fresh(self, device):
        """(qk, v, k_cache, v_cache, buf): new copies of what the op reads and writes."""
        H = self.Hq + self.Hkv
        buf = from_torch(self.buf0, device)
        return buf.narrow(1, 0, H), buf.narrow(1, H, self.Hkv), from_torch(self.kc0, device), \
            from_torch(self.vc0, device), buf

    def call(self, fused, qk, v, kc, vc, out, inputs):
        """The fused op, or the two ops with the rotation into a fresh tensor of qk's dtype."""
        pos, inv, slots, cu, ctx, bt, w = inputs
        kw = dict(norm_weight=w, eps=self.eps, interleaved=self.interleaved, rotary_dim=self.R,
                  attention_scaling=self.scaling)
        if fused:
            return ops.rope_kv_attention(qk, pos, inv, v, kc, vc, slots, cu, ctx, bt, self.scale, out=out, **kw)
        tmp = ip.Tensor.full(qk.shape, float("nan"), dtype=qk.dtype, device=qk.storage.device)
        ops.rope_kv_store(qk, pos, inv, v, kc, vc, slots, out=tmp, **kw)
        return ops.paged_attention(tmp.narrow(1, 0, self.Hq), kc, vc, cu, ctx, bt, self.scale, out=out)

    def run(self, device, fused, out_dtype=None):
        """(out, k_cache, v_cache, buf) brought back to the host."""
        qk, v, kc, vc, buf = self.fresh(device)
        out = ip.Tensor.full((self.T, self.Hq, self.D), float("nan"), dtype=out_dtype or self.dtype, device=device)
        res = self.call(fused, qk, v, kc, vc, out, self.inputs(device))
        assert res is out
        return tuple(t.cpu() for t in (out, kc, vc, buf))

    def check_same(self, out_dtype=None):
        """The GPU op against the two GPU ops, bit for bit, and the qkv buffer (qk among it)
        unchanged by it; returns the GPU op's results."""
        got = self.run("cuda", True, out_dtype)
        want = self.run("cuda", False, out_dtype)
        for name, g, w in zip(["out", "k_cache", "v_cache"], got, want):
            assert_bits_equal(g, w, name)
        assert_unchanged(got[3], self.buf0, "the qkv buffer")
        return got

    def reference(self, out_dtype):
        """(want, tol) float64 [T, Hq, D] for out, and (k_ref, k_tol) [T, Hkv, D] for the new keys
        (the k cache's rows at the slots): the bounds of the module docstring."""
        Hq, Hkv, D, H = self.Hq, self.Hkv, self.D, self.Hq + self.Hkv
        y = self.buf0[:, :H].to(torch.float64)
        if self.w0 is not None:
            y = y / torch.sqrt((y * y).mean(-1, keepdim=True) + self.eps) * self.w0.to(torch.float64)
        ref, mag = rope_ref(y, self.pos, self.inv0, self.R, self.interleaved, self.scaling)
        E = 20 * U32 * mag + U[self.dtype] * ref.abs() + TINY[self.dtype]
        ct = TORCH_DTYPES[self.cache_dtype]
        kc = self.kc0.to(torch.float64).view(-1, Hkv, D).clone()
        vc = self.vc0.to(torch.float64).view(-1, Hkv, D).clone()
        ek = torch.zeros_like(kc)
        k_tol = E[:, Hq:] + U[self.cache_dtype] * (ref[:, Hq:].abs() + E[:, Hq:]) + TINY[self.cache_dtype]
        kc[self.slots], ek[self.slots] = ref[:, Hq:], k_tol
        vc[self.slots] = self.buf0[:, H:].to(ct).to(torch.float64)
        want, tol = paged_attention_ref(self.seqs, self.cu, self.bt, self.bs, ref[:, :Hq], E[:, :Hq], kc, ek, vc,
                                        self.scale)
        tol = tol + U[out_dtype] * (want.abs() + tol) + TINY[out_dtype]
        return (want, tol), (ref[:, Hq:], k_tol)


def one_token_config(i):
    """The i-th mix of head size, dtypes, norm, rotation form and rotary width: every value of each
    appears across consecutive i (D = 256 only with bf16)."""
    D = (64, 128, 256)[i % 3]
    cache_dtype = ip.bfloat16 if D == 256 else FLOAT_DTYPES[(i // 3) % 3]
    dtype = ip.bfloat16 if D == 256 else FLOAT_DTYPES[(i // 2 + 1) % 3]
    return dict(D=D, dtype=dtype, cache_dtype=cache_dtype, norm=NORMS[(i // 2) % 3], interleaved=bool(i % 2),
                R=D // 2 if (i // 5) % 2 else D)


CONTEXTS = [1, 5, 31, 32, 33, 100, 257, 1000, 4000]
GROUPS = [1, 2, 4, 8, 16]  # 16: past the one kernel's limit, the two ops' kernels


# ======================================================================= one sequence, one token

@pytest.mark.parametrize("L", CONTEXTS)
@pytest.mark.parametrize("bs", [16, 1])
@pytest.mark.parametrize("G", GROUPS, ids=lambda g: f"g{g}")
def test_one_token(gen, L, bs, G):
    """A decode step of one sequence (the one-kernel case) over contexts at and around block and
    segment edges, blocks of 16 and of 1, shuffled; every GQA ratio; the other parameters cycle
    (one_token_config); qk's buffer unchanged."""
    i = CONTEXTS.index(L) + 3 * [16, 1].index(bs) + GROUPS.index(G)
    for j in (i, i + 1):
        c = one_token_config(j)
        Hkv = (2, 1, 4)[j % 3]
        layer = Layer(gen, [(1, L)], G * Hkv, Hkv, c.pop("D"), bs=bs, **c)
        layer.check_same()


@pytest.mark.parametrize("D,cache_dtype", [(64, d) for d in FLOAT_DTYPES] + [(128, d) for d in FLOAT_DTYPES]
                         + [(256, ip.bfloat16)], ids=lambda v: NAMES.get(v, str(v)))
@pytest.mark.parametrize("norm", NORMS, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
def test_one_token_every_combination(gen, D, cache_dtype, norm, interleaved, partial):
    """Every head size / cache dtype / norm / rotation form / rotary width together, one token over
    257 keys (G = 4, Qwen3's shapes where D = 128); qk bf16, or f32 with an f32 cache."""
    dtype = ip.float32 if cache_dtype == ip.float32 else ip.bfloat16
    layer = Layer(gen, [(1, 257)], 4 * 2, 2, D, D // 2 if partial else D, dtype=dtype, cache_dtype=cache_dtype,
                  norm=norm, interleaved=interleaved, scaling=1.3 if partial else 1.0)
    layer.check_same()
    # an out of another dtype than qk
    layer.check_same(out_dtype=ip.float32 if dtype != ip.float32 else ip.bfloat16)


def test_one_token_model_shapes(gen):
    """Qwen3-0.6B's and 4B's decode step (Hq 16 / 32, Hkv 8, D 128, bf16, per-head norm weights) with the
    engine's block table (as wide as 4096 tokens need, padded with block 0)."""
    for Hq in (16, 32):
        for L in (1, 141, 2049):
            layer = Layer(gen, [(1, L)], Hq, 8, 128, norm="heads", width=256, pad=(0, 0))
            layer.check_same()


# ==================================================================== several sequences: fallback

BATCHES = {
    "decode3": [(1, 5), (1, 1000), (1, 33)],
    "chunk": [(3, 40)],  # S = 1, T = 3
    "one_query_two_seqs": [(0, 7), (1, 100)],  # T = 1, S = 2
    "mixed": [(1, 1), (20, 20), (0, 5), (13, 50), (1, 640)],
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("G", [1, 4, 16], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bs", [16, 1])
def test_several_sequences(gen, batch, G, bs):
    """Batches the one kernel does not take (the two ops' kernels run, the rotation into a
    workspace): the same bits as the two ops, qk's buffer unchanged."""
    i = sorted(BATCHES).index(batch) + [1, 4, 16].index(G) + bs
    for j in (i, i + 1):
        c = one_token_config(j)
        layer = Layer(gen, BATCHES[batch], G * 2, 2, c.pop("D"), bs=bs, **c)
        layer.check_same()


# ============================================================================= GPU against CPU

@pytest.mark.parametrize("seqs", [[(1, 1)], [(1, 257)], [(1, 4000)], BATCHES["mixed"]], ids=str)
@pytest.mark.parametrize("G", [2, 8], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("dtype", [ip.bfloat16, ip.float32], ids=NAMES.get)
def test_gpu_and_cpu_within_bound(gen, seqs, G, dtype):
    """The GPU op and the CPU op each within the float64 bound of the module docstring (out, and
    the new keys in the k cache), so within twice it of each other; the v cache exact on both, the
    k cache's other rows untouched, qk's buffer unchanged on both."""
    layer = Layer(gen, seqs, 2 * G, 2, 128, 64, dtype=dtype, cache_dtype=dtype, norm="heads", interleaved=True)
    (want, tol), (k_ref, k_tol) = layer.reference(dtype)
    gpu, cpu = layer.run("cuda", True), layer.run("cpu", True)
    Hkv, D = layer.Hkv, layer.D
    for out, kc, vc, buf in (gpu, cpu):
        assert_within(to_torch(out).to(torch.float64), want, tol)
        assert_within(to_torch(kc).to(torch.float64).view(-1, Hkv, D)[layer.slots], k_ref, k_tol)
        assert_unchanged(buf, layer.buf0, "the qkv buffer")
    assert_within(to_torch(gpu[0]).to(torch.float64), to_torch(cpu[0]).to(torch.float64), 2 * tol)
    assert_bits_equal(gpu[2], cpu[2], "v_cache")
    k_gpu, k_cpu = (to_torch(r[1]).to(torch.float64).view(-1, Hkv, D) for r in (gpu, cpu))
    new = torch.zeros(k_gpu.shape[0], dtype=torch.bool)
    new[layer.slots] = True
    assert torch.equal(k_gpu[~new].nan_to_num(7.0), k_cpu[~new].nan_to_num(7.0))
    assert torch.equal(k_gpu[~new].nan_to_num(7.0), layer.kc0.to(torch.float64).view(-1, Hkv, D)[~new].nan_to_num(7.0))
    assert_within(k_gpu[layer.slots], k_cpu[layer.slots], 2 * k_tol)


# ================================================================================== CUDA graphs

@pytest.mark.parametrize("seqs", [[(1, 9)], [(1, 9), (1, 300), (1, 40)]], ids=["one_token", "batch"])
def test_cuda_graph_replays_equal_eager(gen, seqs):
    """Recorded once (the engine's wide block table), replayed with other positions, slots, contexts
    and block tables of the same shapes written into the same tensors, the qkv buffer refreshed by a
    copy inside the graph (the projection's place): every replay gives the eager op's bits on the
    same values, out and caches, and leaves qk as the copy made it."""
    from inference_pio.graph import CudaGraph

    S, Hq, Hkv, D, bs, width = len(seqs), 16, 8, 128, 16, 256
    # a cache random throughout: the later steps' sequences own other blocks of it
    first = Layer(gen, seqs, Hq, Hkv, D, bs=bs, norm="heads", width=width, pad=(0, 0), spare=width * S, unowned=None)
    pos, inv, slots, cu, ctx, bt, w = first.inputs("cuda")
    src, _, _, _, _ = first.fresh("cuda")  # the step's qk before the rotation
    qk, v, kc, vc, buf = first.fresh("cuda")
    out = ip.Tensor.empty((S, Hq, D), dtype=ip.bfloat16, device="cuda")

    def step():
        qk.copy_(src)
        return first.call(True, qk, v, kc, vc, out, (pos, inv, slots, cu, ctx, bt, w))

    graph = CudaGraph.capture(step)
    for lens in ([9, 300, 40][:S], [1, 4000, 2][:S], [257, 33, 32][:S], [2049, 1, 1][:S]):
        # new values of the same shapes, in a layer sharing first's cache and qkv buffer
        layer = Layer(gen, [(1, L) for L in lens], Hq, Hkv, D, bs=bs, norm="heads", width=width, pad=(0, 0),
                      spare=width * S - sum(-(-L // bs) for L in lens))
        layer.kc0, layer.vc0, layer.buf0, layer.w0 = first.kc0, first.vc0, first.buf0, first.w0
        for t, new in zip((pos, slots, ctx, bt), (layer.pos, layer.slots, layer.ctx, layer.bt)):
            t.copy_(from_torch(new, "cuda"))
        kc.copy_(from_torch(first.kc0, "cuda"))
        vc.copy_(from_torch(first.vc0, "cuda"))
        out.fill_(float("nan"))
        graph.replay()
        got = tuple(t.cpu() for t in (out, kc, vc, buf))
        want = layer.run("cuda", True)
        for name, g, e in zip(["out", "k_cache", "v_cache"], got, want):
            assert_bits_equal(g, e, name)
        assert_unchanged(got[3], first.buf0, "the qkv buffer")


# ============================================================================ the precondition

@pytest.mark.parametrize("kind", ["spare", "old_position", "padding"])
def test_slot_not_its_positions_is_reported(gen, kind):
    """One token whose slot is not its position's (a row of an unused block, the row of an earlier
    position of its sequence, padding): the one kernel records it, the next synchronisation raises
    it naming to_rope_kv_attention, and out and the caches were not written (qk never is); the GPU
    works on."""
    layer = Layer(gen, [(1, 50)], 8, 2, 128, norm="heads")
    good = int(layer.slots[0])
    bad = {"spare": int(layer.spare_slots[3]), "old_position": int(layer.bt[0, 0]) * layer.bs + 7,
           "padding": -1}[kind]
    assert bad != good
    pos, inv, slots, cu, ctx, bt, w = layer.inputs("cuda")
    slots = from_torch(torch.tensor([bad]), "cuda")
    qk, v, kc, vc, buf = layer.fresh("cuda")
    out = ip.Tensor.full((1, 8, 128), 7.0, dtype=ip.bfloat16, device="cuda")
    layer.call(True, qk, v, kc, vc, out, (pos, inv, slots, cu, ctx, bt, w))
    with pytest.raises(ip.TensorOpsError, match=r"to_rope_kv_attention: slot_mapping\[0\] = "):
        out.cpu()
    assert torch.equal(to_torch(out), torch.full((1, 8, 128), 7.0, dtype=torch.bfloat16))
    assert_bits_equal(kc.cpu(), from_torch(layer.kc0), "k_cache")
    assert_bits_equal(vc.cpu(), from_torch(layer.vc0), "v_cache")
    assert_unchanged(buf.cpu(), layer.buf0, "the qkv buffer")
    # reported once; a good call right after gives the two ops' bits
    layer.check_same()


@pytest.mark.parametrize("kind", ["block", "context"])
def test_bad_batch_in_the_one_kernel(gen, kind):
    """A bad batch in the one kernel's case (T = S = 1): a block of the context outside the caches
    (not the token's own block), or a context shorter than its query. The next synchronisation
    raises attention's batch error, out was not written, qk never is; the GPU works on."""
    layer = Layer(gen, [(1, 50)], 8, 2, 128, norm="heads")
    pos, inv, slots, cu, ctx, bt, w = layer.inputs("cuda")
    if kind == "block":
        bad_bt = layer.bt.clone()
        bad_bt[0, 0] = 10 ** 6
        bt = from_torch(bad_bt, "cuda")
        message = r"to_paged_attention: sequence 0: block_tables holds a block outside"
    else:
        ctx = from_torch(torch.tensor([0], dtype=torch.int64), "cuda")
        message = r"to_paged_attention: sequence 0: context_lens is less than its queries"
    qk, v, kc, vc, buf = layer.fresh("cuda")
    out = ip.Tensor.full((1, 8, 128), 7.0, dtype=ip.bfloat16, device="cuda")
    layer.call(True, qk, v, kc, vc, out, (pos, inv, slots, cu, ctx, bt, w))
    with pytest.raises(ip.TensorOpsError, match=message):
        out.cpu()
    assert torch.equal(to_torch(out), torch.full((1, 8, 128), 7.0, dtype=torch.bfloat16))
    assert_unchanged(buf.cpu(), layer.buf0, "the qkv buffer")
    layer.check_same()
