"""What decode attention costs inside a model's decode step on the GPU (BENCHMARKS.md, CUDA sixth
and thirteenth passes). Three tools:

    python benchmarks/attention_in_model.py replay [--model 0.6b] [--attention-twice]
        The decode step's CUDA graph (batch 1, ~270 keys of context) replayed 5 x 100 times, µs
        per step. --attention-twice runs every layer's attention twice (the second call on the
        same inputs, its code and data hot): the difference / layers is what a hot attention
        adds to a step.

    python benchmarks/attention_in_model.py patch OUT.cu
        Writes a copy of csrc/cuda/attention.cu whose decode_kernel (cluster mode: batch-1 decode)
        has thread 0 of every block record %globaltimer at each point (POINTS below; a device
        array, read back by to_cuda_attn_trace). Build a library from it and put it in place of the package's:
            cp -r csrc /tmp/t/ && python benchmarks/attention_in_model.py patch /tmp/t/csrc/cuda/attention.cu
            (cd /tmp/t && python csrc/build.py --out /tmp/t/lib.so --build-dir /tmp/t/obj --cuda 1)
            cp /tmp/t/lib.so python/inference_pio/libtensor_ops.so

    python benchmarks/attention_in_model.py trace [--model 0.6b | --bench-heads 32 --context 150]
        With that library: the phases of the last decode attention launched, in the model (the
        last layer of a decode step) or alone (bench_gpu_attention's inputs with the model's
        table width, strided q and a 256-block pool), as µs after the first wait release (min,
        median and max over the blocks).
"""
import argparse
import ctypes
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))

# The instrumentation of the decode kernel's cluster mode (batch-1 decode; the fused kernel of a
# model's step): (anchor in attention.cu, text put after it, or before it when the entry ends with
# True). Thread 0 of every block stamps %globaltimer at each point:
POINTS = ["entry", "wait released", "first loads in (fused)", "q/k normalised and rotated (fused)",
          "table rows in shared memory", "k and v stored (the token's segment)", "keys done",
          "partials sent", "at the cluster barrier", "past the cluster barrier", "merged and stored"]
TRACE_DEFS = """
__device__ unsigned long long g_trace[4096][16]; // per block: a globaltimer stamp per point
__device__ __forceinline__ void tr(int p) {
    if (threadIdx.x == 0 && blockIdx.x < 4096) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        g_trace[blockIdx.x][p] = t;
    }
}
"""
PATCHES = [
    ("namespace {\n", TRACE_DEFS),
    ("    const int tid = threadIdx.x;\n    to_pdl_wait(); // q, the cache",
     "    tr(0);\n    if (threadIdx.x == 0 && blockIdx.x < 4096) for (int i = 2; i < 16; i++) g_trace[blockIdx.x][i] = 0;\n",
     True),
    ("                   // used by the launch before this one)\n", "    tr(1);\n"),
    ("    const bool head_bad = check_sequence_head(a, s, &sm, &value) != 0;\n",
     "    if (FUSED) { __syncthreads(); tr(2); }\n"),
    ("        fused_heads<DMAX, RMAX>(a, g, owner, tok, fsm);\n", "        tr(3);\n"),
    ("            sRow[0][tid] = lookup(k_begin + tid, k_stop);\n            __syncthreads();\n", "            tr(4);\n"),
    ("                fused_store<DMAX, RMAX>(a, row, fsm, &sSegBad);\n            }\n", "            tr(5);\n"),
    ("        // combine the groups: M = max m_g", "        tr(6);\n", True),
    ("        if (a.cluster)\n            cluster_merge<DMAX, RMAX>(", "        tr(7);\n", True),
    ("    cluster.sync();\n    bool bad = false;\n", "    tr(8);\n", True),
    ("    cluster.sync();\n    bool bad = false;\n", "    tr(9);\n"),
    ("    if (!last_pass)\n        cluster.sync();\n#endif\n}", "    tr(10);\n", True),
    ('extern "C" {\n', "int to_cuda_attn_trace(void *host) {\n"
     "    cudaDeviceSynchronize();\n    return (int)cudaMemcpyFromSymbol(host, g_trace, sizeof(g_trace));\n}\n"),
]


def patch(out):
    src = (HERE.parent / "csrc" / "cuda" / "attention.cu").read_text()
    for anchor, text, *before in PATCHES:
        if src.count(anchor) != 1:
            sys.exit(f"attention.cu has changed: the anchor {anchor.strip()[:60]!r} is not there exactly once")
        src = src.replace(anchor, text + anchor if before else anchor + text)
    Path(out).write_text(src)
    print(f"wrote {out}")


def make_llm(model, attention_twice):
    from bench_gpu import MODELS, make_checkpoint
    from inference_pio import LLM
    import inference_pio.layers as layers
    if attention_twice:  # every layer's attention, then the same call again over its output
        import inference_pio.ops as ops

        class Twice:
            def __getattr__(self, name):
                return getattr(ops, name)

            @staticmethod
            def paged_attention(*args, **kw):
                out = ops.paged_attention(*args, **kw)
                return ops.paged_attention(*args, **dict(kw, out=out))

            @staticmethod
            def rope_kv_attention(*args, **kw):  # (storing the same k and v again changes nothing)
                out = ops.rope_kv_attention(*args, **kw)
                return ops.rope_kv_attention(*args, **dict(kw, out=out))
        layers.ops = Twice()
    folder = Path("/tmp/inference-pio-gpu") / f"qwen3-{model}"
    make_checkpoint(folder, MODELS[model])
    return LLM(folder, device="cuda", dtype="bfloat16", max_model_len=1024, kv_cache_tokens=4096)


def generate(llm, tokens):
    from bench_gpu import prompt
    from inference_pio import SamplingParams
    llm.generate([prompt(128, 0)], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))


def replay(args):
    from profile_gpu import graph_replay_us
    llm = make_llm(args.model, args.attention_twice)
    generate(llm, 140)
    graph, _ = llm.engine.graphs._graphs[1]
    rounds = [graph_replay_us(graph) for _ in range(5)]
    twice = " (attention twice)" if args.attention_twice else ""
    print(f"{args.model}{twice}: decode step graph replay, us per step: " + " ".join(f"{r:.0f}" for r in rounds))


def print_phases(lib, label):
    """Each point's time over the blocks that reached it, in µs after the first block's wait was
    released: the minimum, the median, and the maximum (the slowest block, which the cluster
    barrier and the next kernel wait for)."""
    buf = (ctypes.c_uint64 * (4096 * 16))()
    lib.to_cuda_attn_trace(buf)
    rows = [[buf[b * 16 + p] for p in range(len(POINTS))] for b in range(4096)]
    rows = [r for r in rows if r[0]]
    base = min(r[1] for r in rows if r[1])
    print(f"{label}: {len(rows)} blocks; µs after the first wait release (min / median / max)")
    for p, name in enumerate(POINTS):
        ts = [(r[p] - base) / 1e3 for r in rows if r[p]]
        if ts:
            print(f"  {name:38s} {len(ts):4d} blocks {min(ts):7.2f} {statistics.median(ts):7.2f} {max(ts):7.2f}")


def trace(args):
    import inference_pio as ip
    lib = ctypes.CDLL(os.path.join(os.path.dirname(ip.__file__), "libtensor_ops.so"))
    if not hasattr(lib, "to_cuda_attn_trace"):
        sys.exit("the installed library is not the traced build (see `patch` above)")
    if args.bench_heads:
        from inference_pio import ops
        from bench_gpu_attention import inputs, per_op_us
        ctx, hq = args.context, args.bench_heads
        sets = [inputs(1, -(-ctx // 16), 16, hq, 8, 128, ctx, 64, True, 256) for _ in range(40)]
        out = ip.Tensor.empty(1, hq, 128, device="cuda")
        step = iter(range(1 << 30))

        def op():
            q, k_cache, v_cache, cu, lens, tables = sets[next(step) % len(sets)]
            return ops.paged_attention(q, k_cache, v_cache, cu, lens, tables, 128 ** -0.5, out=out)
        print(f"alone: {per_op_us(op, 200):.2f} us per op (a graph of 200)")
        print_phases(lib, f"alone, {hq} q heads, {ctx} keys")
    else:
        llm = make_llm(args.model, args.attention_twice)
        generate(llm, 16)
        generate(llm, 120)
        print_phases(lib, f"{args.model}, the last layer of a decode step")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("replay")
    p.add_argument("--model", default="0.6b")
    p.add_argument("--attention-twice", action="store_true")
    p = sub.add_parser("patch")
    p.add_argument("out")
    p = sub.add_parser("trace")
    p.add_argument("--model", default="0.6b")
    p.add_argument("--attention-twice", action="store_true")
    p.add_argument("--bench-heads", type=int, default=0)
    p.add_argument("--context", type=int, default=150)
    args = ap.parse_args()
    {"replay": replay, "patch": lambda a: patch(a.out), "trace": trace}[args.cmd](args)


if __name__ == "__main__":
    main()
