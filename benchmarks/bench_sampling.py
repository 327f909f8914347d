"""Per-step sampling cost: the logits rows of one decode step to the chosen ids, in microseconds.

    python benchmarks/bench_sampling.py [--devices cpu,cuda] [--batches 1,32] [--reps 30]
                                        [--threads N] [--json out.json]

Rows of Qwen3's 151,936-token vocabulary (random normal logits, scale 3; float32 on the CPU, where
the engine's logits are float32, bfloat16 and float32 on a GPU). Each history is 1,000 tokens
(500 prompt + 500 generated, drawn from 5,000 ids so that tokens repeat). Cases:
  greedy            ops.argmax (the engine's all-greedy fast path)
  top_p             to_sample: temperature 0.8, top_p 0.95
  top_p+penalties   to_sample_pipeline: the same plus repetition_penalty 1.1, presence 0.5 and
                    frequency 0.5 penalties over the histories
  +logprobs         the same plus the chosen token's logprob and the 5 best
  engine            engine.sampler for Sequences with those SamplingParams (top_p + penalties):
                    building the per-row inputs and histories in Python, the op, reading back
Each case is timed over --reps calls after 3 warm-up calls (a GPU is synchronised after each);
the median is reported. Beside it, the decode step of Qwen3-0.6B's shapes from BENCHMARKS.md
(CPU 2 threads: 56.5 ms; H200: 1,346 us), for scale.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch  # noqa: E402

import inference_pio as ip  # noqa: E402
from inference_pio import SamplingParams, ops, runtime  # noqa: E402
from inference_pio._lib import check, lib  # noqa: E402
from inference_pio.engine.sampler import Sampled, sample_ids  # noqa: E402
from inference_pio.engine.sequence import Sequence  # noqa: E402

V = 151936
HISTORY, PROMPT = 1000, 500
STEP_US = {"cpu": 56500.0, "cuda": 1346.0}  # Qwen3-0.6B decode step, BENCHMARKS.md


def from_torch(t):
    return ip.Tensor.frombuffer(t.contiguous().numpy().tobytes(), ip.float32, tuple(t.shape), copy=True)


def timed(fn, reps, device):
    def sync():
        if device != "cpu":
            check(lib.to_cuda_synchronize(0))
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def cases(B, device, dtype, gen):
    x = from_torch(torch.randn(B, V, generator=gen) * 3).to(device=device, dtype=dtype)

    def f(v):
        return ip.tensor([v] * B, dtype=ip.float32)
    base = (f(0.8), ip.tensor([0] * B, dtype=ip.int32), f(0.95), f(0.0),
            ip.tensor(torch.rand(B, generator=gen).mul(0.999).tolist(), dtype=ip.float32))
    hist = torch.randint(0, 5000, (B, HISTORY), generator=gen)
    pen = dict(repetition_penalty=f(1.1), presence_penalty=f(0.5), frequency_penalty=f(0.5),
               history=ip.tensor(hist.flatten().tolist(), dtype=ip.int32),
               history_offsets=ip.tensor([i * HISTORY for i in range(B + 1)], dtype=ip.int32),
               prompt_lens=ip.tensor([PROMPT] * B, dtype=ip.int32))
    params = SamplingParams(max_tokens=HISTORY, temperature=0.8, top_p=0.95, repetition_penalty=1.1,
                            presence_penalty=0.5, frequency_penalty=0.5, seed=1)
    seqs = []
    for b in range(B):
        s = Sequence(b, hist[b, :PROMPT].tolist(), params, ())
        s.token_ids += hist[b, PROMPT:].tolist()
        seqs.append(s)

    def engine():
        res = sample_ids(x, seqs)
        Sampled(res, seqs).result()
    return {
        "greedy": lambda: ops.argmax(x),
        "top_p": lambda: ops.sample(x, *base),
        "top_p+penalties": lambda: ops.sample_pipeline(x, *base, **pen),
        "+logprobs": lambda: ops.sample_pipeline(x, *base, **pen, logprobs=True, num_top=5),
        "engine": engine,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu,cuda")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        runtime.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    results = {"vocab": V, "history": HISTORY, "threads": runtime.num_threads(), "simd": runtime.simd_level(),
               "decode_step_us_qwen3_0.6b": STEP_US, "rows": []}
    for device in args.devices.split(","):
        if device == "cuda" and runtime.cuda_device_count() == 0:
            continue
        for dtype in ([ip.float32] if device == "cpu" else [ip.bfloat16, ip.float32]):
            for B in (int(b) for b in args.batches.split(",")):
                for name, fn in cases(B, device, dtype, gen).items():
                    us = timed(fn, args.reps, device)
                    row = dict(device=device, dtype=dtype.name, batch=B, case=name, us=round(us, 1),
                               us_per_row=round(us / B, 1), pct_of_step=round(100 * us / STEP_US[device], 2))
                    results["rows"].append(row)
                    print(f"{device:4} {dtype.name:8} B={B:<3} {name:16} {us:10.1f} us  ({us / B:8.1f} us/row, "
                          f"{row['pct_of_step']:5.2f} % of a 0.6B step)", file=sys.stderr)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
