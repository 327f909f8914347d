"""GGUF / quantized CPU benchmark: the demo model (SmolLM2-135M-Instruct Q4_1) beside llama.cpp
(llama-cpp-python, the `bench` extra) in one run, and Qwen3-0.6B shapes quantized on load.

    python benchmarks/bench_gguf.py [--threads 2] [--reps 3] [--rounds 3] [--json out.json] [--skip-qwen3]

What is measured and how
  * Each engine runs in its own child process (see bench_qwen3.py) with the same thread count.
  * Prefill: a 128-token prompt (fixed English text, token ids from our tokenizer, fed to both
    engines as ids), time to its logits/first token. Decode: 128 greedy tokens, ignoring EOS,
    time per token after the first. Median over --reps repeats in each child. --rounds rounds
    run the two engines alternately; the ratios are per round, reported as median and range.
    llama.cpp: Llama(n_ctx=1024, n_batch=512, n_threads=T, logits_all=False); eval(prompt) for
    prefill, then eval([argmax]) per token for decode (its generate loop's work, greedy); a
    second instance with logits_all=True scores the perplexity text.
  * Perplexity of PPL_TEXT (benchmarks/data/perplexity.txt) in windows of 512 tokens, each
    scored whole (every position after the first predicts the next token), same ids for both.
  * Roofline: decode tok/s <= read bandwidth / bytes of weights read per token (every matrix
    once; the embedding table once more as the tied head; the lookup itself is one row), with
    read bandwidth measured in this run (bench_kernels.bench_copy, torch.sum).
  * Qwen3-0.6B shapes (random weights, bench_qwen3's cached checkpoint) at bf16, and quantized
    on load to q8_0 and q4_k: decode tok/s beside each one's own roofline.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Children run with the environment as launched: bench_kernels (imported for the bandwidth
# figure) sets OMP_WAIT_POLICY=PASSIVE for its torch runs, which would cripple llama.cpp's
# OpenMP threads (measured: 12-18 instead of 40-57 tok/s).
LAUNCH_ENV = dict(os.environ)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

PROMPT, NEW, WINDOW = 128, 128, 512
PPL_TEXT = HERE / "data" / "perplexity.txt"
QWEN3_DIR = "/tmp/inference-pio-bench/qwen3-0.6b-random"


def text_ids():
    """Token ids of the perplexity text (our tokenizer; identical to transformers' on this file,
    see tests/tokenizer/test_gguf_tokenizer.py)."""
    from inference_pio.demo import demo_model_path
    from inference_pio.io.gguf import GGUFFile
    from inference_pio.tokenizer import GGUFTokenizer
    with GGUFFile(demo_model_path()) as f:
        tok = GGUFTokenizer(f.metadata)
    return tok.encode(PPL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)


def log_softmax_nll(row, target):
    m = max(row)
    return math.log(sum(math.exp(v - m) for v in row)) + m - row[target]


def ppl_from_rows(rows_per_window, windows):
    nll, n = 0.0, 0
    for rows, ids in zip(rows_per_window, windows):
        for pos in range(len(ids) - 1):
            nll += log_softmax_nll(rows[pos], ids[pos + 1])
            n += 1
    return math.exp(nll / n)


def windows_of(ids):
    return [ids[i:i + WINDOW] for i in range(0, len(ids) - 1, WINDOW) if len(ids[i:i + WINDOW]) > 1]


# ---- engines (run in child processes) ----

def run_ours(path, ids, threads, reps, quantization=None, dtype="auto", ppl=True):
    from inference_pio import LLM, SamplingParams, runtime
    runtime.set_num_threads(threads)
    t0 = time.perf_counter()
    llm = LLM(path, dtype=dtype, quantization=quantization, max_model_len=1024, kv_cache_tokens=1024)
    load = time.perf_counter() - t0
    prompt = ids[:PROMPT]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    prefill, decode = [], []
    for _ in range(reps):
        stamps, t0 = [], time.perf_counter()
        for _ in llm.stream(prompt, params):
            stamps.append(time.perf_counter())
        prefill.append(stamps[0] - t0)
        decode.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    out = {"load_s": load, "prefill_s": prefill, "decode_s_per_token": decode,
           "peak_rss_bytes": peak_rss()}  # before the perplexity pass's Python lists of logits
    if ppl:
        wins = windows_of(ids)
        out["perplexity"] = ppl_from_rows([llm.logits(w).tolist() for w in wins], wins)
    return out


def run_llama_cpp(path, ids, threads, reps, ppl=True):
    from llama_cpp import Llama

    def load(logits_all):
        return Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads,
                     n_threads_batch=threads, logits_all=logits_all, verbose=False)
    t0 = time.perf_counter()
    llm = load(False)  # speed: logits of the last position only, as its generate loop does
    load_s = time.perf_counter() - t0
    prompt = ids[:PROMPT]
    prefill, decode = [], []
    for _ in range(reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(NEW - 1):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        decode.append((time.perf_counter() - t0) / (NEW - 1))
    out = {"load_s": load_s, "prefill_s": prefill, "decode_s_per_token": decode, "peak_rss_bytes": peak_rss()}
    if ppl:
        del llm
        llm = load(True)  # perplexity: logits of every position
        rows, wins = [], windows_of(ids)
        for w in wins:
            llm.reset()
            llm.eval(w)
            rows.append(llm.scores[:len(w)].tolist())
        out["perplexity"] = ppl_from_rows(rows, wins)
    return out


def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args):
    spec = json.loads(args.child)
    if spec["engine"] == "llama.cpp":
        r = run_llama_cpp(spec["path"], spec["ids"], args.threads, args.reps, spec.get("ppl", True))
    else:
        r = run_ours(spec["path"], spec["ids"], args.threads, args.reps, spec.get("quantization"),
                     spec.get("dtype", "auto"), spec.get("ppl", True))
    print(json.dumps(r))


def measure(spec, threads, reps, python=None):
    out = subprocess.run([python or sys.executable, __file__, "--child", json.dumps(spec),
                          "--threads", str(threads), "--reps", str(reps)],
                         capture_output=True, text=True, check=False, env=LAUNCH_ENV)
    if out.returncode != 0:
        raise RuntimeError(f"{spec['engine']} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["prefill_tok_s"] = PROMPT / statistics.median(r["prefill_s"])
    r["decode_tok_s"] = 1.0 / statistics.median(r["decode_s_per_token"])
    return r


# ---- weight bytes per token ----

def gguf_bytes_per_token(path):
    """Bytes read per decoded token: every tensor once (a tied embedding is read whole as the
    head; its lookup adds one row, not counted)."""
    from inference_pio.io.gguf import GGUFFile
    with GGUFFile(path) as f:
        return sum(f.tensor_info(n).nbytes for n in f.names())


def quantized_bytes_per_token(cfg, dtype):
    """Qwen3 shapes with every matrix in `dtype` (k-quant rows that are not multiples of 256
    fall back to q8_0 as quantize.target_dtype does) and f32 norms."""
    from inference_pio.quantize import target_dtype

    def size(rows, cols):
        d = target_dtype((rows, cols), dtype) if dtype.is_quantized else dtype
        return d.nbytes(rows * cols)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    layer = (size(nh * d, h) + 2 * size(nkv * d, h) + size(h, nh * d)
             + 2 * size(i, h) + size(h, i)) + 4 * (2 * h + 2 * d)
    return cfg["num_hidden_layers"] * layer + size(cfg["vocab_size"], h) + 4 * h


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both engines")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--llama-python", default=None,
                    help="Python interpreter that has llama-cpp-python (default: this one)")
    ap.add_argument("--skip-qwen3", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from bench_kernels import bench_copy, cpu_name
    from inference_pio import dtypes, runtime
    from inference_pio.demo import demo_model_path

    runtime.set_num_threads(args.threads)
    bw = bench_copy(512 << 20, reps=5)
    read_bw = bw["sum_read_GBps_torch"] * 1e9
    path = demo_model_path()
    wbytes = gguf_bytes_per_token(path)
    res = {"cpu": cpu_name(), "threads": args.threads, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "read_GBps": read_bw / 1e9, "smollm2": {"weight_bytes_per_token": wbytes,
                                                    "roofline_tok_s": read_bw / wbytes}}
    print(f"{res['cpu']}, {args.threads} threads; read bandwidth {read_bw / 1e9:.1f} GB/s")
    print(f"SmolLM2-135M-Instruct Q4_1: {wbytes / 1e6:.1f} MB per token -> roofline "
          f"{read_bw / wbytes:.0f} tok/s; {PROMPT}-token prompt, {NEW} greedy tokens")
    sm = res["smollm2"]
    ids = text_ids()  # children get the ids: the llama.cpp one need not import inference_pio
    # Rounds alternate the engines, so a slow spell of this shared machine hits both alike; the
    # ratio is taken within each round and its median reported (perplexity: first round only).
    sm["rounds"] = []
    for k in range(args.rounds):
        rnd = {}
        for name, py in (("ours", None), ("llama.cpp", args.llama_python)):
            spec = {"engine": name, "path": path, "ids": ids, "ppl": k == 0}
            r = rnd[name] = measure(spec, args.threads, args.reps, py)
            if k == 0:
                sm[name] = r
                print(f"{name:>10}: prefill {r['prefill_tok_s']:7.1f} tok/s, decode {r['decode_tok_s']:6.1f} "
                      f"tok/s ({100 * r['decode_tok_s'] / sm['roofline_tok_s']:.0f}% of roofline), perplexity "
                      f"{r['perplexity']:.4f}, load {r['load_s']:.2f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
        o, l = rnd["ours"], rnd["llama.cpp"]
        rnd["prefill_ratio"] = o["prefill_tok_s"] / l["prefill_tok_s"]
        rnd["decode_ratio"] = o["decode_tok_s"] / l["decode_tok_s"]
        sm["rounds"].append(rnd)
        print(f"  round {k + 1}: decode ours {o['decode_tok_s']:6.1f} / llama.cpp {l['decode_tok_s']:6.1f} tok/s "
              f"= {rnd['decode_ratio']:.2f}x; prefill {o['prefill_tok_s']:6.1f} / {l['prefill_tok_s']:6.1f} "
              f"= {rnd['prefill_ratio']:.2f}x")
    for key in ("prefill_ratio", "decode_ratio"):
        vals = [r[key] for r in sm["rounds"]]
        sm[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    o, l = sm["ours"], sm["llama.cpp"]
    print(f"ours / llama.cpp over {args.rounds} rounds (median, range): prefill "
          f"{sm['prefill_ratio']['median']:.2f}x ({sm['prefill_ratio']['min']:.2f}-{sm['prefill_ratio']['max']:.2f}), "
          f"decode {sm['decode_ratio']['median']:.2f}x ({sm['decode_ratio']['min']:.2f}-{sm['decode_ratio']['max']:.2f}), "
          f"perplexity {100 * (o['perplexity'] / l['perplexity'] - 1):+.2f}%")

    if not args.skip_qwen3 and Path(QWEN3_DIR, "config.json").exists():
        from bench_qwen3 import QWEN3_06B
        res["qwen3_0.6b"] = {}
        for label, spec in (("bf16", {"dtype": "bfloat16"}), ("q8_0", {"quantization": "q8_0"}),
                            ("q4_k", {"quantization": "q4_k"})):
            d = dtypes.get_dtype(spec.get("quantization") or "bfloat16")
            nbytes = quantized_bytes_per_token(QWEN3_06B, d)
            r = measure({"engine": "ours", "path": QWEN3_DIR, "ids": ids, "ppl": False, **spec},
                        args.threads, args.reps)
            r["weight_bytes_per_token"], r["roofline_tok_s"] = nbytes, read_bw / nbytes
            res["qwen3_0.6b"][label] = r
            print(f"Qwen3-0.6B shapes {label:>5}: {nbytes / 1e6:6.0f} MB/token, prefill "
                  f"{r['prefill_tok_s']:6.1f} tok/s, decode {r['decode_tok_s']:6.2f} tok/s "
                  f"({100 * r['decode_tok_s'] / r['roofline_tok_s']:.0f}% of its roofline "
                  f"{r['roofline_tok_s']:.1f}), load {r['load_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
