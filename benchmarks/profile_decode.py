"""Where a decode step's time goes: runs a prompt through the engine so the batch-1 decode step
is captured (engine/graphs.py), then replays that step calling each recorded library call on its
own and timing it, summed per kind of call (matmuls per weight shape and dtype).

    python benchmarks/profile_decode.py [--model PATH] [--threads 2] [--steps 50]

--model defaults to the demo model. Timing each call adds ~1 us per call; the plain replay time
is printed beside the sum for comparison."""
import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def label(fn, args):
    from inference_pio import dtypes
    if fn.__name__ == "to_matmul":
        w = args[2]
        return f"matmul [{w.shape[0]}, {w.shape[1]}] {dtypes.BY_CODE[w.dtype].name}"
    return fn.__name__


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--context", type=int, default=256, help="tokens in the cache when timing")
    ap.add_argument("--kv-cache-dtype", default="auto")
    args = ap.parse_args()

    from inference_pio import LLM, SamplingParams, runtime
    from inference_pio.demo import demo_model_path
    runtime.set_num_threads(args.threads)
    llm = LLM(args.model or demo_model_path(), max_model_len=args.context + 8, kv_cache_tokens=args.context + 8,
              kv_cache_dtype=args.kv_cache_dtype)
    prompt = list(range(100, 100 + args.context // 2))
    for _ in llm.stream(prompt, SamplingParams(max_tokens=args.context // 2, temperature=0, ignore_eos=True)):
        pass
    graph = llm.engine.graphs._graphs[1][0]
    totals, counts = collections.Counter(), collections.Counter()
    for _ in range(args.steps):
        for fn, call_args in graph._calls:
            t0 = time.perf_counter()
            fn(*call_args)
            dt = time.perf_counter() - t0
            key = label(fn, call_args)
            totals[key] += dt
            counts[key] += 1
    t0 = time.perf_counter()
    for _ in range(args.steps):
        graph.replay()
    replay = (time.perf_counter() - t0) / args.steps
    print(f"{len(graph)} library calls per step; replay {1e3 * replay:.2f} ms/step, "
          f"timed one by one {1e3 * sum(totals.values()) / args.steps:.2f} ms/step")
    for key, t in totals.most_common():
        print(f"{key:<36} {1e3 * t / args.steps:7.3f} ms/step {1e6 * t / counts[key]:8.1f} us/call")


if __name__ == "__main__":
    main()
