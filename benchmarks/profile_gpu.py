"""Where a GPU decode step goes: the CUDA kernels of a few decode steps of a Qwen3-shaped
random-weight model (bench_gpu's checkpoint), traced with torch.profiler (CUPTI sees every kernel
launched in the process, ours included, inside CUDA graphs too), summed per kernel name.

    python benchmarks/profile_gpu.py [--model 0.6b] [--steps 8] [--batch 1] [--eager] [--timeline]

--timeline also prints the last decode step kernel by kernel: its start from the step's first
kernel, its duration, the idle gap before it (negative: it overlapped the previous kernel,
programmatic dependent launch) and what it added to the step (its end past every earlier end),
then per kernel family the step's GPU time and the time it added. With programmatic launches the
durations overlap (a kernel's blocks wait for the previous kernel inside it), so "added" is the
figure that sums to the step.
"""
import json
import os
import tempfile
import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gpu import MODELS, make_checkpoint, prompt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="0.6b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--dir", default="/tmp/inference-pio-gpu")
    ap.add_argument("--timeline", action="store_true", help="print the last decode step's kernels in order")
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile
    from inference_pio import LLM, SamplingParams
    folder = Path(args.dir) / f"qwen3-{args.model}"
    make_checkpoint(folder, MODELS[args.model])
    # every prompt prefilled in one step, so every decode step after it holds the whole batch
    llm = LLM(folder, device="cuda", dtype="bfloat16", max_model_len=1024,
              kv_cache_tokens=max(4096, 256 * args.batch), enforce_eager=args.eager,
              max_num_seqs=max(32, args.batch), max_num_batched_tokens=max(512, 128 * args.batch))
    prompts = [prompt(128, seed) for seed in range(args.batch)]
    warm = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    llm.generate(prompts, warm)
    params = SamplingParams(max_tokens=args.steps + 1, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    print(f"{args.steps + 1} steps (a prefill and {args.steps} decode steps) in {wall * 1e3:.1f} ms wall")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    if args.timeline:
        print_timeline(prof)
    if not args.eager:  # the GPU's own time per decode step: the step's graph replayed back to back
        step = graph_replay_us(llm.engine.graphs._graphs[args.batch][0])
        print(f"decode step graph replay: {step:.0f} us ({1e6 / step:.0f} steps/s); "
              f"whole steps above: {wall / (args.steps + 1) * 1e6:.0f} us each")


def graph_replay_us(graph, replays=100):
    """µs per replay of a recorded step's CUDA graph, replayed back to back after 5 warm-up
    replays: the GPU's own time per step."""
    import inference_pio as ip
    for _ in range(5):
        graph.replay()
    ip.lib.to_cuda_synchronize(0)
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    ip.lib.to_cuda_synchronize(0)
    return (time.perf_counter() - t0) / replays * 1e6


def print_timeline(prof):
    """The last decode step's kernels in order (a step ends with the kernel that picks its tokens:
    argmax or sample)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    ends = [i for i, e in enumerate(kernels) if "argmax_pick" in e["name"] or "sample" in e["name"]]
    step = kernels[ends[-2] + 1:ends[-1] + 1]
    t0, prev_end = step[0]["ts"], step[0]["ts"]
    families = {}
    print(f"last decode step: {len(step)} kernels, {step[-1]['ts'] + step[-1]['dur'] - t0:.1f} us first start to last end")
    print(f"{'start':>9} {'dur':>7} {'gap':>6} {'added':>6}  kernel")
    for e in step:
        name = short_name(e["name"])
        end = e["ts"] + e["dur"]
        added = max(0.0, end - prev_end)
        print(f"{e['ts'] - t0:9.1f} {e['dur']:7.1f} {e['ts'] - prev_end:6.1f} {added:6.1f}  {name}")
        prev_end = max(prev_end, end)
        dur, add, n = families.get(name, (0.0, 0.0, 0))
        families[name] = (dur + e["dur"], add + added, n + 1)
    print("per kernel family (us per step: time, added, launches):")
    for name, (us, add, n) in sorted(families.items(), key=lambda kv: -kv[1][1]):
        print(f"  {us:8.1f} {add:8.1f} {n:4d}  {name}")


def short_name(name):
    """A kernel's name without namespaces and argument list (template arguments kept)."""
    name = name.replace("(anonymous namespace)::", "").replace("void ", "")
    i = name.find(">(")
    return name[:i + 1] if i >= 0 else name.split("(")[0]


if __name__ == "__main__":
    main()
