"""CPU kernel benchmark: memory bandwidth, matmul as GEMV (decode) and GEMM (prefill), beside
torch on the same shapes, thread count and data.

    python benchmarks/bench_kernels.py [--threads 2] [--json out.json] [--quick]

What is measured and how
  * copy bandwidth: a 512 MiB buffer copied into another (torch's copy_ and our to_copy, both
    with the same threads; the faster counts), counted as STREAM and CUDA's bandwidthTest count
    it: bytes read + bytes written per second (2 x buffer / time). This is the bandwidth every
    roofline in this project divides by (decode tok/s <= bandwidth / weight bytes per token).
    Also shown: read-only bandwidth (torch.sum over the same buffer), which a GEMV, reading
    weights and writing almost nothing, can approach.
  * GEMV: x [1, K] . w[N, K]^T with x, w, out in one dtype (bf16 or f32), reported as GB/s of
    weights read (N * K * itemsize / time). Every call reads a different copy of the weights
    from a ring of copies larger than the last-level cache, as decoding a model does, so the
    weights come from DRAM, not from cache.
  * GEMM: x [M, K] . w[N, K]^T for M = 128 and 512, reported as GFLOP/s (2 M N K / time).
Ours is timed through the compiled library's to_matmul entry point (cffi, descriptors built
once, so Python's per-call overhead is left out); torch through torch.nn.functional.linear.
Both run alternately within one process and the median of each is kept, so a noisy machine
shifts both alike: compare the ratios.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

# torch's OpenMP workers otherwise busy-wait after each call and, on a 2-core machine, slow down
# whichever of our kernels is timed next (measured: 10-15 % on bf16 GEMV). Passive waiting costs
# torch nothing at these millisecond-long calls.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import inference_pio as ip  # noqa: E402
from inference_pio import runtime  # noqa: E402
from inference_pio._lib import check, ffi, lib  # noqa: E402

TORCH = {ip.float32: torch.float32, ip.bfloat16: torch.bfloat16, ip.float16: torch.float16}
GEMV_SHAPES = [(1024, 3072), (3072, 1024), (1024, 151936), (2560, 9728)]  # (K, N)
GEMM_SHAPES = [(1024, 3072), (3072, 1024), (2560, 9728)]
GEMM_ROWS = [128, 512]
CACHE_BYTES = 32 << 20  # this machine's L3; the weight ring is at least 4x this


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def share(t, dtype):
    """Our Tensor over the memory of a contiguous torch tensor (no copy: both see one buffer)."""
    raw = t.contiguous().view(torch.uint8).reshape(-1).numpy()
    return ip.Tensor.frombuffer(raw, dtype, tuple(t.shape))


def time_pair(fns, min_time, min_calls=3, rounds=5):
    """Median seconds per call for each fn in `fns` (dict name -> fn(i)), measured in rounds that
    alternate between the functions. fn(i) gets a running call counter (for weight rings)."""
    counter = 0
    for fn in fns.values():  # warm up: page faults, scratch buffers, thread pools
        fn(counter)
        counter += 1
    per_call = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]
        for name, fn in order:
            calls, t0 = 0, time.perf_counter()
            while True:
                fn(counter)
                counter += 1
                calls += 1
                elapsed = time.perf_counter() - t0
                if calls >= min_calls and elapsed >= min_time / rounds:
                    break
            per_call[name].append(elapsed / calls)
    return {name: statistics.median(v) for name, v in per_call.items()}


def bench_copy(nbytes, reps):
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ours_src, ours_dst = share(src, ip.float32), share(dst, ip.float32)
    ours = lambda i: check(lib.to_copy(ours_dst._desc, ours_src._desc))  # noqa: E731
    theirs = lambda i: dst.copy_(src)  # noqa: E731
    t = time_pair({"ours": ours, "torch": theirs}, min_time=reps * 0.1, min_calls=reps)
    read = time_pair({"sum": lambda i: src.sum()}, min_time=reps * 0.05, min_calls=reps)["sum"]
    best = min(t.values())
    return {
        "buffer_bytes": nbytes,
        "copy_read_GBps": nbytes / best / 1e9,
        "copy_read_write_GBps": 2 * nbytes / best / 1e9,
        "copy_read_GBps_torch": nbytes / t["torch"] / 1e9,
        "copy_read_GBps_ours": nbytes / t["ours"] / 1e9,
        "sum_read_GBps_torch": nbytes / read / 1e9,
    }


def bench_gemv(K, N, dtype, min_time):
    tdt = TORCH[dtype]
    wbytes = N * K * dtype.itemsize
    copies = max(1, -(-4 * CACHE_BYTES // wbytes))  # ring of weights >= 4x L3
    base = torch.randn(N, K, dtype=torch.float32).to(tdt)
    ws = [base] + [base.clone() for _ in range(copies - 1)]
    x = torch.randn(1, K, dtype=torch.float32).to(tdt)
    out = torch.empty(1, N, dtype=tdt)
    ours_w = [share(w, dtype)._desc for w in ws]
    ours_x, ours_out = share(x, dtype)._desc, share(out, dtype)
    ours_out_d = ours_out._desc

    def ours(i):
        if lib.to_matmul(ours_out_d, ours_x, ours_w[i % copies], ffi.NULL):
            check(1)

    def theirs(i):
        F.linear(x, ws[i % copies])

    # the two agree (the same data): a cheap guard against benchmarking something broken
    ours(0)
    expect = F.linear(x.float(), ws[0].float())
    got = out.float()
    assert torch.allclose(got, expect, rtol=2e-2, atol=2e-2 * float(expect.abs().max())), "GEMV result mismatch"
    t = time_pair({"ours": ours, "torch": theirs}, min_time=min_time)
    return {"K": K, "N": N, "dtype": dtype.name, "weight_bytes": wbytes, "ring_copies": copies,
            "ours_GBps": wbytes / t["ours"] / 1e9, "torch_GBps": wbytes / t["torch"] / 1e9,
            "ours_ms": t["ours"] * 1e3, "torch_ms": t["torch"] * 1e3}


def bench_gemm(M, K, N, dtype, min_time):
    tdt = TORCH[dtype]
    w = torch.randn(N, K, dtype=torch.float32).to(tdt)
    x = torch.randn(M, K, dtype=torch.float32).to(tdt)
    out = torch.empty(M, N, dtype=tdt)
    ow, ox, oo = share(w, dtype)._desc, share(x, dtype)._desc, share(out, dtype)._desc

    def ours(i):
        if lib.to_matmul(oo, ox, ow, ffi.NULL):
            check(1)

    def theirs(i):
        F.linear(x, w)

    ours(0)
    expect = F.linear(x.float(), w.float())
    assert torch.allclose(out.float(), expect, rtol=2e-2, atol=2e-2 * float(expect.abs().max())), "GEMM result mismatch"
    t = time_pair({"ours": ours, "torch": theirs}, min_time=min_time, min_calls=1, rounds=3)
    flop = 2.0 * M * N * K
    return {"M": M, "K": K, "N": N, "dtype": dtype.name,
            "ours_GFLOPs": flop / t["ours"] / 1e9, "torch_GFLOPs": flop / t["torch"] / 1e9,
            "ours_ms": t["ours"] * 1e3, "torch_ms": t["torch"] * 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads for both libraries (default 2)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--quick", action="store_true", help="shorter timings (noisier)")
    args = ap.parse_args()

    runtime.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scale = 0.3 if args.quick else 1.0
    info = {"cpu": cpu_name(), "threads": args.threads, "simd": runtime.simd_level(),
            "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg_before": os.getloadavg()[0]}
    print(f"{info['cpu']}: {args.threads} threads, our SIMD level {info['simd']}, torch {info['torch']}, "
          f"load average {info['loadavg_before']:.2f}")

    copy = bench_copy(512 << 20, reps=3 if args.quick else 5)
    bw = copy["copy_read_write_GBps"]
    print(f"\ncopy of {copy['buffer_bytes'] >> 20} MiB: {bw:.2f} GB/s read+write (torch copy_ "
          f"{2 * copy['copy_read_GBps_torch']:.2f}, ours {2 * copy['copy_read_GBps_ours']:.2f}); "
          f"read-only (torch.sum) {copy['sum_read_GBps_torch']:.2f} GB/s")

    print("\nGEMV, M = 1 (GB/s of weights read; % of copy bandwidth; target bf16 >= 85%)")
    print(f"{'K':>6} {'N':>7} {'dtype':>9} {'ours GB/s':>10} {'torch GB/s':>11} {'ours/torch':>10} {'ours/copy':>10}")
    gemv = []
    for K, N in GEMV_SHAPES:
        for dtype in (ip.bfloat16, ip.float32):
            r = bench_gemv(K, N, dtype, min_time=1.0 * scale)
            r["ours_vs_copy"] = r["ours_GBps"] / bw
            r["ours_vs_torch"] = r["ours_GBps"] / r["torch_GBps"]
            gemv.append(r)
            print(f"{K:>6} {N:>7} {dtype.name:>9} {r['ours_GBps']:>10.2f} {r['torch_GBps']:>11.2f} "
                  f"{r['ours_vs_torch']:>9.2f}x {100 * r['ours_vs_copy']:>9.0f}%")

    print("\nGEMM (GFLOP/s; targets: f32 >= 0.8x torch, bf16 >= 1.0x torch)")
    print(f"{'M':>5} {'K':>6} {'N':>6} {'dtype':>9} {'ours':>8} {'torch':>8} {'ours/torch':>10}")
    gemm = []
    for M in GEMM_ROWS:
        for K, N in GEMM_SHAPES:
            for dtype in (ip.float32, ip.bfloat16):
                r = bench_gemm(M, K, N, dtype, min_time=1.5 * scale)
                r["ours_vs_torch"] = r["ours_GFLOPs"] / r["torch_GFLOPs"]
                gemm.append(r)
                print(f"{M:>5} {K:>6} {N:>6} {dtype.name:>9} {r['ours_GFLOPs']:>8.1f} {r['torch_GFLOPs']:>8.1f} "
                      f"{r['ours_vs_torch']:>9.2f}x")

    info["loadavg_after"] = os.getloadavg()[0]
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": info, "copy": copy, "gemv": gemv, "gemm": gemm}, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
