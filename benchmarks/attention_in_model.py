"""What decode attention costs inside a model's decode step on the GPU (BENCHMARKS.md, CUDA sixth
pass). Three tools:

    python benchmarks/attention_in_model.py replay [--model 0.6b] [--attention-twice]
        The decode step's CUDA graph (batch 1, ~270 keys of context) replayed 5 x 100 times, µs
        per step. --attention-twice runs every layer's attention twice (the second call on the
        same inputs, its code and data hot): the difference / layers is what a hot attention
        adds to a step.

    python benchmarks/attention_in_model.py patch OUT.cu
        Writes a copy of csrc/cuda/attention.cu whose decode_kernel has thread 0 of every block
        record %globaltimer and clock64 at each phase (a device array, read back by
        to_cuda_attn_trace). Build a library from it and put it in place of the package's:
            cp -r csrc /tmp/t/ && python benchmarks/attention_in_model.py patch /tmp/t/csrc/cuda/attention.cu
            (cd /tmp/t && python csrc/build.py --out /tmp/t/lib.so --build-dir /tmp/t/obj --cuda 1)
            cp /tmp/t/lib.so python/inference_pio/libtensor_ops.so

    python benchmarks/attention_in_model.py trace [--model 0.6b | --bench-heads 32 --context 150]
        With that library: the phases of the last decode attention launched, in the model (the
        last layer of a decode step) or alone (bench_gpu_attention's inputs with the model's
        table width, strided q and a 256-block pool), as µs medians over the blocks.
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

# The instrumentation: (anchor in attention.cu, text put after it, or before it when the text
# ends the entry with True). Points: 0 entry, 1 after the
# wait, 2 the lengths read (the checking block: the batch checked), 3 the keys walked, 4 the
# partials written (checking block: the verdict announced), 5 arrived, 6 the merge decided,
# 7 merged, 8 q in registers, 9 table entries in shared memory, 10 the first K/V loads in,
# 11 the merge's weights, 12 the merge's partials in.
TRACE_DEFS = """
__device__ unsigned long long g_trace[4096][32]; // per block: 16 globaltimer stamps, 16 clock64
unsigned g_last_grid;
__device__ __forceinline__ void tr(int p) {
    if (threadIdx.x == 0 && blockIdx.x < 4096) {
        unsigned long long t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        g_trace[blockIdx.x][p] = t;
        g_trace[blockIdx.x][16 + p] = clock64();
    }
}
"""
PATCHES = [
    ("namespace {\n", TRACE_DEFS),
    ("    to_pdl_trigger(); // the next kernel's blocks may take free SM room and prefetch its weights\n",
     "    if (threadIdx.x == 0 && blockIdx.x < 4096) for (int i = 0; i < 32; i++) g_trace[blockIdx.x][i] = 0;\n"
     "    tr(0);\n"),
    ("                   // used by the launch before this one)\n", "    tr(1);\n"),
    ("        announce_verdict(a, find_bad_sequence(a, sScan, &sBad));\n", "        tr(4);\n"),
    ("                                                           / segment_length(sm.len, a.splits))};\n", "    tr(2);\n"),
    ("            load_q<DMAX, T, RMAX>(a, b, g, r0, nr, q);\n",
     "        if (__float_as_uint(q[0][0]) != 0x7fc00001u) tr(8);\n"),
    ("            sRow[0][tid] = cache_row(a, entry, k_begin + tid, k_stop, g);\n            __syncthreads();\n",
     "            tr(9);\n"),
    ("                    // scores (base 2), reduced over the group's lanes; masked ones -inf\n",
     "                    if (kr[0][0].x != 0xdeadbeefu || vr[NK - 1][NC - 1].w != 0xdeadbeefu) tr(10);\n"),
    ("        // combine the groups: M = max m_g", "        tr(3);\n", True),
    ("                    a.ml[at] = make_float2(sM[0][r], sRowL[r]);\n            }\n        }\n    }\n", "    tr(4);\n"),
    ("            inv = 1.0f / to_warp_sum(w0 * x0.y + w1 * x1.y);\n", "            tr(11);\n"),
    ("        for (int u = 0; u < kMergeLoads; u++) {\n            const int i = i0 + u;\n",
     "            if (u == 0 && (v[0][0] != 12345.0f || v[kMergeLoads - 1][7] != 12345.0f)) tr(12);\n"),
    ("        sBefore = before;\n        sPair = pair;\n", "        tr(5);\n"),
    ("    const bool verdict = sBefore & kCheckerArrived;\n", "    tr(6);\n"),
    ("        merge_row(a, b + r / a.G, g0 + r % a.G, sRows.filled, verdict);\n", "    tr(7);\n"),
    ("int launch_decode_rows(const AttnArgs &a, unsigned blocks, cudaStream_t stream) {\n", "    g_last_grid = blocks;\n"),
    ('extern "C" {\n', "int to_cuda_attn_trace(void *host, unsigned *grid) {\n"
     "    cudaDeviceSynchronize();\n    *grid = g_last_grid;\n"
     "    return (int)cudaMemcpyFromSymbol(host, g_trace, sizeof(g_trace));\n}\n"),
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


def print_phases(lib, label, clock_mhz):
    buf, grid = (ctypes.c_uint64 * (4096 * 32))(), ctypes.c_uint()
    lib.to_cuda_attn_trace(buf, ctypes.byref(grid))
    n = min(grid.value, 4096)
    g = [[buf[b * 32 + p] for p in range(16)] for b in range(n)]
    c = [[buf[b * 32 + 16 + p] for p in range(16)] for b in range(n)]
    base = min(g[b][1] for b in range(n) if g[b][1])

    def us(b, i, j):  # block b, phase i to phase j, by its SM's clock
        return (c[b][j] - c[b][i]) / clock_mhz

    def med(xs):
        return f"{statistics.median(xs):5.2f}" if xs else "    -"
    active = [b for b in range(1, n) if g[b][3]]
    mergers = [b for b in range(1, n) if g[b][7]]
    print(f"{label}: grid {n}, {len(active)} segments with keys; the last block done "
          f"{(max(max(row) for row in g) - base) / 1e3:.2f} us after the first wait's release")
    phases = [("lengths and first entries", 1, 2), ("q", 2, 8), ("entries to shared memory", 8, 9),
              ("first K/V loads in", 9, 10), ("scores, softmax, acc", 10, 3), ("groups combined, partials", 3, 4),
              ("arrival", 4, 5)]
    for name, i, j in phases:
        print(f"  {name:28s} {med([us(b, i, j) for b in active])} us")
    for name, i, j in [("merge: decided", 5, 6), ("merge: weights", 6, 11), ("merge: partials in", 11, 12),
                       ("merge: out written", 12, 7)]:
        print(f"  {name:28s} {med([us(b, i, j) for b in mergers])} us")


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
        print_phases(lib, f"alone, {hq} q heads, {ctx} keys", args.clock_mhz)
    else:
        llm = make_llm(args.model, args.attention_twice)
        generate(llm, 16)
        generate(llm, 120)
        print_phases(lib, f"{args.model}, the last layer of a decode step", args.clock_mhz)


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
    p.add_argument("--clock-mhz", type=float, default=1980.0, help="the SM clock (nvidia-smi) for clock64")
    args = ap.parse_args()
    {"replay": replay, "patch": lambda a: patch(a.out), "trace": trace}[args.cmd](args)


if __name__ == "__main__":
    main()
