"""Decode attention on the GPU: one query per sequence over a paged cache of a given context,
Qwen3 head shapes (q heads, kv heads 8, head dim 128), bf16 cache, captured --repeat times in one
CUDA graph and replayed; µs per op and the GB/s of K/V read.

    python benchmarks/bench_gpu_attention.py [--heads 16] [--batch 1,32] [--context 128,512,2048,8192] [--cold] [--width 512]
        [--strided-q] [--pool 256]

What differs in a model's decode step, one switch each (to find what a model's attention pays that
this benchmark does not):
--width: block-table columns (a model's table is as wide as max_model_len allows, whatever the
context; default: just the context's blocks).
--strided-q: q is a view of a qkv row [S, (q heads + 2 kv heads) * D], as the model's is.
--pool: cache blocks in the pool (a model's pool is sized for many sequences; default: just the
context's), the sequences' blocks at its end.
--cold: the captured ops cycle over enough distinct caches, queries and tables (more than the
L2 holds) that each op reads them from DRAM, as a model's layer does after the weights streamed.
"""
import argparse
import time

import inference_pio as ip
from inference_pio import ops
from inference_pio.graph import CudaGraph


def per_op_us(fn, repeat, rounds=5):
    graph = CudaGraph.capture(lambda: [fn() for _ in range(repeat)][-1])
    graph.replay()
    ip.lib.to_cuda_synchronize(0)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        graph.replay()
        ip.lib.to_cuda_synchronize(0)
        best = min(best, time.perf_counter() - t0)
    return best / repeat * 1e6


def inputs(S, nblk, bs, hq, hkv, D, ctx, width, strided_q=False, pool=0):
    """One decode attention's q, caches, cu_seqlens, context lengths and block tables."""
    first = max(pool - S * nblk, 0)  # the sequences' blocks: the last of the pool
    k_cache = ip.Tensor.full((first + S * nblk, bs, hkv, D), 0.01, dtype="bfloat16", device="cuda")
    v_cache = ip.Tensor.full((first + S * nblk, bs, hkv, D), 0.02, dtype="bfloat16", device="cuda")
    if strided_q:
        q = ip.Tensor.full((S, (hq + 2 * hkv) * D), 0.1, device="cuda").narrow(1, 0, hq * D).unflatten(1, (hq, D))
    else:
        q = ip.Tensor.full((S, hq, D), 0.1, device="cuda")
    cu = ip.tensor(list(range(S + 1)), dtype="int32").to("cuda")
    lens = ip.tensor([ctx] * S, dtype="int32").to("cuda")
    width = max(width, nblk)  # columns past the context hold block 0: never read
    tables = ip.tensor([first + s * nblk + j if j < nblk else 0 for s in range(S) for j in range(width)],
                       dtype="int32").view(S, width).to("cuda")
    return q, k_cache, v_cache, cu, lens, tables


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--context", default="128,512,2048,8192")
    ap.add_argument("--repeat", type=int, default=100)
    ap.add_argument("--cold", action="store_true", help="every op reads its own cache from DRAM")
    ap.add_argument("--width", type=int, default=0, help="block-table columns (0: the context's blocks)")
    ap.add_argument("--strided-q", action="store_true", help="q a view of a qkv row, as in a model")
    ap.add_argument("--pool", type=int, default=0, help="cache blocks in the pool (0: the context's)")
    args = ap.parse_args()
    hq, hkv, D, bs = args.heads, 8, 128, 16
    for S in (int(b) for b in args.batch.split(",")):
        for ctx in (int(c) for c in args.context.split(",")):
            nblk = -(-ctx // bs)
            kv_bytes = 2 * S * nblk * bs * hkv * D * 2
            copies = min(args.repeat, -(-120 * 2**20 // kv_bytes)) if args.cold else 1
            sets = [inputs(S, nblk, bs, hq, hkv, D, ctx, args.width, args.strided_q, args.pool) for _ in range(copies)]
            out = ip.Tensor.empty(S, hq, D, device="cuda")
            step = iter(range(1 << 30))

            def op():
                q, k_cache, v_cache, cu, lens, tables = sets[next(step) % copies]
                return ops.paged_attention(q, k_cache, v_cache, cu, lens, tables, D ** -0.5, out=out)

            us = per_op_us(op, args.repeat)
            gbs = 2 * S * ctx * hkv * D * 2 / (us * 1e-6) / 1e9
            print(f"batch {S:3d} context {ctx:6d}: {us:8.2f} us  {gbs:7.0f} GB/s of K/V")


if __name__ == "__main__":
    main()
