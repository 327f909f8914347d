"""Quantized-weight matmul benchmark: to_matmul with q4_1 / q8_0 / q4_k weights on the shapes of
SmolLM2-135M (Q4_1 layers, Q8_0 head) and Qwen3-0.6B (Q8_0 and Q4_K), beside the f32 dense
matmul of the same shape.

    python benchmarks/bench_qmatmul.py [--threads 2] [--quick] [--json out.json]

What is measured and how
  * M = 1 (decode): GB/s of weights read (quantized bytes / time). Every call reads a different
    copy of the weights from a ring of copies at least 4x this machine's L3, so weights come from
    DRAM as in a real decode step. The f32 column is the dense GEMV of the same shape, also from
    a ring; its GB/s counts f32 bytes (4 per weight), so compare time, not GB/s, for speed.
  * M = 128 (prefill): GFLOP/s = 2 M N K / time, weights in cache (compute bound).
  * The SmolLM2 model sweep: the 30 layers' 7 matmuls (each layer its own weights) plus the
    Q8_0 head, in order, as one decode step (96.6 MB of weights) - ms per token spent in matmuls
    and the tok/s that would allow - and the same at M = 128 (prefill tok/s of the matmuls).
Timed through the compiled to_matmul entry point (cffi, descriptors built once). Rounds
alternate between the variants and the median is kept: the machine is shared and noisy, so
compare ratios and repeat.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import numpy as np  # noqa: E402

import inference_pio as ip  # noqa: E402
from inference_pio import runtime  # noqa: E402
from inference_pio._lib import check, ffi, lib  # noqa: E402

CACHE_BYTES = 32 << 20
BLOCK = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (256, 144), "q6_k": (256, 210)}
# byte offsets of the f16 scale fields in each block, and a sane range for them
F16_FIELDS = {"q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q4_k": [0, 2], "q6_k": [208]}

SMOL = [("q", 576, 576), ("k", 576, 192), ("v", 576, 192), ("o", 576, 576),
        ("gate", 576, 1536), ("up", 576, 1536), ("down", 1536, 576)]  # (name, K, N)
SMOL_HEAD = ("head", 576, 49152)
QWEN = [("q", 1024, 2048), ("kv", 1024, 1024), ("o", 2048, 1024), ("gate/up", 1024, 3072),
        ("down", 3072, 1024)]


def random_blocks(rng, wtype, N, K):
    """Random GGML blocks of this type with f16 scales in [1e-3, 4e-3), as a uint8 array."""
    bs, bb = BLOCK[wtype]
    raw = rng.integers(0, 256, (N, K // bs, bb), dtype=np.uint8)
    for off in F16_FIELDS[wtype]:
        raw[:, :, off:off + 2] = rng.uniform(1e-3, 4e-3, (N, K // bs)).astype(np.float16).view(np.uint8).reshape(N, K // bs, 2)
    return raw.reshape(N, -1)


def weights(rng, wtype, N, K):
    if wtype == "f32":
        arr = rng.standard_normal((N, K), dtype=np.float32)
        return arr, ip.Tensor.frombuffer(arr, "float32", shape=(N, K))
    arr = random_blocks(rng, wtype, N, K)
    return arr, ip.Tensor.frombuffer(arr, wtype, shape=(N, K))


def wbytes(wtype, N, K):
    return N * K * 4 if wtype == "f32" else N * (K // BLOCK[wtype][0]) * BLOCK[wtype][1]


def time_alternating(fns, min_time, rounds=5, min_calls=3):
    """Median seconds per call of each fn(i) (i: a running counter), rounds alternating."""
    counter = 0
    for fn in fns.values():
        fn(counter)
        counter += 1
    per = {k: [] for k in fns}
    for r in range(rounds):
        items = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for name, fn in items:
            calls, t0 = 0, time.perf_counter()
            while True:
                fn(counter)
                counter += 1
                calls += 1
                el = time.perf_counter() - t0
                if calls >= min_calls and el >= min_time / rounds:
                    break
            per[name].append(el / calls)
    return {k: statistics.median(v) for k, v in per.items()}


def matmul_fn(out, x, ws):
    od, xd = out._desc, x._desc
    wd = [w._desc for w in ws]
    n = len(wd)

    def fn(i):
        if lib.to_matmul(od, xd, wd[i % n], ffi.NULL):
            check(1)
    return fn


def bench_shape(rng, M, K, N, wtype, min_time, keep):
    """Seconds per call for (wtype, f32 dense), weights from a ring (M = 1) or cached (M > 1)."""
    fns = {}
    for t in (wtype, "f32"):
        copies = max(1, -(-4 * CACHE_BYTES // wbytes(t, N, K))) if M == 1 else 1
        arrs = [weights(rng, t, N, K) for _ in range(copies)]
        keep.append(arrs)
        x = ip.Tensor.frombuffer(rng.standard_normal((M, K), dtype=np.float32), "float32", shape=(M, K))
        out = ip.Tensor.empty(M, N)
        keep.append((x, out))
        fns[t] = matmul_fn(out, x, [a[1] for a in arrs])
    return time_alternating(fns, min_time)


def model_sweep(rng, M, min_time, keep):
    """One pass over SmolLM2-135M's matmuls (30 layers of Q4_1 + the Q8_0 head)."""
    calls = []
    total = 0
    for _ in range(30):
        for _, K, N in SMOL:
            arr, w = weights(rng, "q4_1", N, K)
            x = ip.Tensor.frombuffer(rng.standard_normal((M, K), dtype=np.float32), "float32", shape=(M, K))
            out = ip.Tensor.empty(M, N)
            keep.append((arr, w, x, out))
            calls.append((out._desc, x._desc, w._desc))
            total += wbytes("q4_1", N, K)
    _, K, N = SMOL_HEAD
    arr, w = weights(rng, "q8_0", N, K)
    x = ip.Tensor.frombuffer(rng.standard_normal((M, K), dtype=np.float32), "float32", shape=(M, K))
    out = ip.Tensor.empty(M, N)
    keep.append((arr, w, x, out))
    calls.append((out._desc, x._desc, w._desc))
    total += wbytes("q8_0", N, K)

    def step(i):
        for o, x, w in calls:
            if lib.to_matmul(o, x, w, ffi.NULL):
                check(1)
    t = time_alternating({"step": step}, min_time, rounds=5, min_calls=2)["step"]
    return t, total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="shorter timings (noisier)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--only", choices=["shapes", "model"], help="run one part only")
    args = ap.parse_args()
    runtime.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    mt = 0.3 if args.quick else 1.0
    res = {"threads": args.threads, "simd": runtime.simd_level(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "loadavg": os.getloadavg()[0], "shapes": [], "model": {}}
    print(f"{args.threads} threads, SIMD {res['simd']}, load average {res['loadavg']:.2f}")
    if args.only != "model":
        cases = [("SmolLM2", n, K, N, "q4_1") for n, K, N in SMOL if n not in ("v", "up")]
        cases.append(("SmolLM2", "head", SMOL_HEAD[1], SMOL_HEAD[2], "q8_0"))
        cases += [("Qwen3-0.6B", n, K, N, t) for t in ("q8_0", "q4_k") for n, K, N in QWEN]
        print(f"\n{'model':<11}{'matrix':<8}{'K':>5}{'N':>7} {'wtype':<5}| {'M=1 GB/s':>8} {'us':>7} "
              f"{'f32 us':>7} {'speedup':>7} | {'M=128 GFLOP/s':>13} {'f32 GFLOP/s':>11} {'ratio':>6}")
        for model, name, K, N, wt in cases:
            keep = []
            t1 = bench_shape(rng, 1, K, N, wt, mt, keep)
            t128 = bench_shape(rng, 128, K, N, wt, mt, keep)
            flop = 2.0 * 128 * N * K
            r = {"model": model, "matrix": name, "K": K, "N": N, "wtype": wt,
                 "m1_GBps": wbytes(wt, N, K) / t1[wt] / 1e9, "m1_us": t1[wt] * 1e6, "m1_f32_us": t1["f32"] * 1e6,
                 "m128_GFLOPs": flop / t128[wt] / 1e9, "m128_f32_GFLOPs": flop / t128["f32"] / 1e9}
            res["shapes"].append(r)
            print(f"{model:<11}{name:<8}{K:>5}{N:>7} {wt:<5}| {r['m1_GBps']:>8.2f} {r['m1_us']:>7.1f} "
                  f"{r['m1_f32_us']:>7.1f} {r['m1_f32_us'] / r['m1_us']:>6.2f}x | {r['m128_GFLOPs']:>13.1f} "
                  f"{r['m128_f32_GFLOPs']:>11.1f} {r['m128_GFLOPs'] / r['m128_f32_GFLOPs']:>5.2f}x")
            del keep
    if args.only != "shapes":
        keep = []
        t, total = model_sweep(rng, 1, 2 * mt, keep)
        res["model"]["decode"] = {"ms": t * 1e3, "weight_MB": total / 1e6, "GBps": total / t / 1e9}
        print(f"\nSmolLM2-135M Q4_1 matmuls of one decode step (30 layers + Q8_0 head, {total / 1e6:.1f} MB): "
              f"{t * 1e3:.2f} ms = {1 / t:.0f} tok/s if nothing else ran ({total / t / 1e9:.1f} GB/s)")
        del keep
        keep = []
        t, total = model_sweep(rng, 128, 2 * mt, keep)
        res["model"]["prefill128"] = {"ms": t * 1e3}
        print(f"SmolLM2-135M matmuls of a 128-token prefill: {t * 1e3:.1f} ms = {128 / t:.0f} tok/s")
        del keep
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
