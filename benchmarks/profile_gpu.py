"""Where a GPU decode step goes: the CUDA kernels of a few decode steps of a Qwen3-shaped
random-weight model (bench_gpu's checkpoint), traced with torch.profiler (CUPTI sees every kernel
launched in the process, ours included, inside CUDA graphs too), summed per kernel name.

    python benchmarks/profile_gpu.py [--model 0.6b] [--steps 8] [--batch 1] [--eager]
"""
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
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile
    from inference_pio import LLM, SamplingParams
    folder = Path(args.dir) / f"qwen3-{args.model}"
    make_checkpoint(folder, MODELS[args.model])
    llm = LLM(folder, device="cuda", dtype="bfloat16", max_model_len=1024,
              kv_cache_tokens=max(4096, 256 * args.batch), enforce_eager=args.eager)
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
    if not args.eager:  # the GPU's own time per decode step: the step's graph replayed back to back
        import inference_pio as ip
        graph, _ = llm.engine.graphs._graphs[args.batch]
        for _ in range(5):
            graph.replay()
        ip.lib.to_cuda_synchronize(0)
        t0 = time.perf_counter()
        for _ in range(100):
            graph.replay()
        ip.lib.to_cuda_synchronize(0)
        step = (time.perf_counter() - t0) / 100
        print(f"decode step graph replay: {step * 1e6:.0f} us ({1 / step:.0f} steps/s); "
              f"whole steps above: {wall / (args.steps + 1) * 1e6:.0f} us each")


if __name__ == "__main__":
    main()
