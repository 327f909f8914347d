"""What each kernel of a GPU decode step costs inside a CUDA graph: every op captured --repeat
times back to back into one graph (as a decode step's graph holds them), the graph replayed, and
the time per op reported; the products beside the device copy bandwidth. The first row, a
one-element fill, is the floor one graph node costs. Each product's calls cycle through a ring of
copies of its weight larger than the L2, so the weights come from DRAM. The products run for each --rows count of x
rows: 1 (one sequence's decode: the streaming GEMV) and 32 (a batch of 32 decoding together: the
tensor-core GEMMs); GB/s counts the weight bytes only.

The layer products also run with GGUF block weights (--quant, default q8_0 and q4_k): random
normal weights quantized on the CPU (ops.quantize) and uploaded as a ring of copies larger than
the L2 (the calls cycle through them, so the weights come from DRAM), each in the form the decode
step uses (normalising qkv and gate_up, accumulating o_proj and down: csrc/cuda/gemv_quant.cu),
then plain, and plain through the first-pass GEMV (INFERENCE_PIO_GEMV_QUANT=0, "old") for
comparison. GB/s counts the quantized weight bytes.

    python benchmarks/bench_gpu_kernels.py [--model 0.6b|4b] [--repeat 100] [--rows 1,32] [--quant q8_0,q4_k]
    INFERENCE_PIO_PDL=0 python benchmarks/bench_gpu_kernels.py   # without programmatic launches
"""
import argparse
import math
import os
import random
import time

import numpy as np

import inference_pio as ip
from inference_pio import ops
from inference_pio.graph import CudaGraph

SHAPES = {  # hidden, q heads, kv heads, head dim, intermediate, vocab
    "0.6b": (1024, 16, 8, 128, 3072, 151936),
    "4b": (2560, 32, 8, 128, 9728, 151936),
}


def sync():
    ip.lib.to_cuda_synchronize(0)


def per_op_us(fn, repeat, rounds=5):
    graph = CudaGraph.capture(lambda: [fn() for _ in range(repeat)][-1])
    graph.replay()
    sync()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        graph.replay()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best / repeat * 1e6


def randn(*shape, dtype="float32"):
    r = random.Random(sum(shape))
    t = ip.tensor([r.gauss(0, 1) for _ in range(math.prod(shape))], dtype="float32")
    return t.view(*shape).to("cuda", dtype=dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.6b")
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--rows", default="1,32", help="x rows of the products, comma-separated")
    ap.add_argument("--quant", default="q8_0,q4_k", help="block types of the layer products ('' for none)")
    args = ap.parse_args()
    H, hq, hkv, D, I, V = SHAPES[args.model]
    n = args.repeat
    one = ip.Tensor.empty(1, device="cuda")
    x = randn(1, H)
    g = randn(H, dtype="bfloat16")
    rows = []
    rows.append(("fill, 1 element (graph node floor)", per_op_us(lambda: one.fill_(1.0), n), 0))
    rows.append((f"rms_norm [1, {H}]", per_op_us(lambda: ops.rms_norm(x, g, 1e-6), n), 0))
    gu = randn(1, 2 * I)
    rows.append((f"silu_mul [1, {I}] of a stacked gate|up", per_op_us(
        lambda: ops.silu_mul(gu.narrow(1, 0, I), gu.narrow(1, I, I)), n), 0))
    qkv = randn(1, (hq + 2 * hkv) * D)
    q = qkv.narrow(1, 0, hq * D).unflatten(1, (hq, D))
    pos = ip.tensor([100], dtype="int32").to("cuda")
    inv = ip.tensor([1.0 / 10000 ** (2 * i / D) for i in range(D // 2)]).to("cuda")
    gd = randn(D, dtype="bfloat16")
    rows.append((f"rms_norm_rope q [1, {hq}, {D}]", per_op_us(
        lambda: ops.rms_norm_rope(q, gd, 1e-6, pos, inv, out=q), n), 0))
    # a Qwen3 layer's q/k norms, rotation and cache write: two launches, or one
    qk = qkv.narrow(1, 0, (hq + hkv) * D).unflatten(1, (hq + hkv, D))
    k, v = qk.narrow(1, hq, hkv), qkv.narrow(1, (hq + hkv) * D, hkv * D).unflatten(1, (hkv, D))
    gh = randn(hq + hkv, D, dtype="bfloat16")
    kc, vc = (ip.Tensor.zeros(64, 16, hkv, D, dtype="bfloat16", device="cuda") for _ in range(2))
    slot = ip.tensor([100], dtype="int32").to("cuda")
    rows.append((f"rms_norm_rope qk [1, {hq + hkv}, {D}] + kv_cache_store", per_op_us(
        lambda: (ops.rms_norm_rope(qk, gh, 1e-6, pos, inv, out=qk), ops.kv_cache_store(kc, vc, k, v, slot)), n), 0))
    rows.append(("rope_kv_store, the same in one launch", per_op_us(
        lambda: ops.rope_kv_store(qk, pos, inv, v, kc, vc, slot, norm_weight=gh, eps=1e-6, out=qk), n), 0))
    products = (("qkv", (hq + 2 * hkv) * D, H, "norm"), ("qkv", (hq + 2 * hkv) * D, H, "plain"),
                ("o_proj", H, hq * D, "add"), ("o_proj", H, hq * D, "plain"),
                ("gate_up", 2 * I, H, "swiglu"), ("down", H, I, "add"), ("lm_head", V, H, "plain"))
    for M in (int(v) for v in args.rows.split(",")):
        for name, N, K, kind in products:
            # values do not matter: every copy of the ring holds 0.01
            next_w, copies = weight_ring(lambda: ip.Tensor.full((N, K), 0.01, dtype="bfloat16", device="cuda"), 2 * N * K)
            xk = randn(M, K)
            if kind == "norm":
                fn = lambda next_w=next_w, xk=xk, gk=randn(K, dtype="bfloat16"): ops.rms_norm_matmul(xk, gk, 1e-6, next_w())
            elif kind == "swiglu":
                fn = lambda next_w=next_w, xk=xk, gk=randn(K, dtype="bfloat16"): ops.rms_norm_swiglu(xk, gk, 1e-6, next_w())
            elif kind == "add":
                out = ip.Tensor.zeros(M, N, device="cuda")
                fn = lambda next_w=next_w, xk=xk, out=out: ops.matmul_add(out, xk, next_w())
            else:
                out = ip.Tensor.empty(M, N, device="cuda")
                fn = lambda next_w=next_w, xk=xk, out=out: ops.matmul(xk, next_w(), out=out)
            us = per_op_us(fn, max(copies, n if N * K < 1 << 26 else max(4, n // 10)))
            rows.append((f"{name} [{N} x {K}] bf16 ({kind}), M {M}", us, 2 * N * K / (us * 1e-6) / 1e9))
    layers = (("qkv", (hq + 2 * hkv) * D, H, "norm"), ("o_proj", H, hq * D, "add"),
              ("gate_up", 2 * I, H, "swiglu"), ("down", H, I, "add"))
    for wtype in filter(None, args.quant.split(",")):
        for name, N, K, kind in layers:
            rows += quant_rows(wtype, name, N, K, kind, n)
    print(f"{'op':56s} {'us/op':>8s} {'GB/s':>8s}")
    for name, us, gbs in rows:
        print(f"{name:56s} {us:8.2f} {gbs:8.0f}" if gbs else f"{name:56s} {us:8.2f}")


RING_BYTES = 192 << 20  # weight copies cycled through per product: ~4x the H200's L2, so weights come from DRAM


def weight_ring(make, nbytes):
    """(next_w, copies): enough copies of a weight (make() makes one of nbytes) to fill RING_BYTES,
    and a function handing them out in turn, so each captured call reads its weight from DRAM as a
    decode step reads each layer's own weights."""
    ring = [make() for _ in range(max(1, math.ceil(RING_BYTES / nbytes)))]
    turn = [0]

    def next_w():
        turn[0] += 1
        return ring[turn[0] % len(ring)]
    return next_w, len(ring)


def quantized_weight(wtype, N, K):
    """Normal weights (scale 0.02) quantized to wtype on the CPU: a CPU tensor [N, K]."""
    arr = np.random.default_rng(N + K).standard_normal((N, K), dtype=np.float32) * 0.02
    return ops.quantize(ip.Tensor.frombuffer(arr, "float32", shape=(N, K)), wtype)


def quant_rows(wtype, name, N, K, kind, n):
    """The product of x [1, K] with a wtype weight [N, K]: in its decode-step form, plain, and plain
    through the first-pass GEMV (INFERENCE_PIO_GEMV_QUANT=0, read when the graph is captured).
    Successive calls take successive copies of the weight from a ring larger than the L2, as a
    decode step takes each layer's own weights."""
    host = quantized_weight(wtype, N, K)
    nbytes = host.nbytes
    next_w, copies = weight_ring(lambda: host.to("cuda"), nbytes)
    xk, gk, out = randn(1, K), randn(K, dtype="bfloat16"), ip.Tensor.zeros(1, N, device="cuda")

    forms = {"norm": lambda: ops.rms_norm_matmul(xk, gk, 1e-6, next_w()),
             "swiglu": lambda: ops.rms_norm_swiglu(xk, gk, 1e-6, next_w()),
             "add": lambda: ops.matmul_add(out, xk, next_w()), "plain": lambda: ops.matmul(xk, next_w())}
    rows = []
    for label, fn, env in ((kind, forms[kind], None), ("plain", forms["plain"], None),
                           ("plain, old", forms["plain"], "0")):
        before = os.environ.get("INFERENCE_PIO_GEMV_QUANT")
        if env is not None:
            os.environ["INFERENCE_PIO_GEMV_QUANT"] = env
        try:
            # every copy at least once; the old kernel is ~20x slower: fewer repeats keep its graph short
            us = per_op_us(fn, max(copies, n if env is None else max(4, n // 10)))
        finally:
            if env is not None:
                if before is None:
                    del os.environ["INFERENCE_PIO_GEMV_QUANT"]
                else:
                    os.environ["INFERENCE_PIO_GEMV_QUANT"] = before
        rows.append((f"{name} [{N} x {K}] {wtype} ({label})", us, nbytes / (us * 1e-6) / 1e9))
    return rows


if __name__ == "__main__":
    main()
