"""Qwen3 end-to-end CPU benchmark: random weights with the real Qwen3-0.6B shapes in bf16,
batch 1, a 128-token prompt then 128 decoded tokens (greedy, no early stop), ours beside
transformers on torch CPU in the same run, plus tokenizer encode throughput beside `tokenizers`.

    python benchmarks/bench_qwen3.py [--threads 2] [--reps 3] [--json out.json]

What is measured and how
  * The checkpoint is made once with transformers (Qwen3ForCausalLM, the real 0.6B config,
    random init, bf16, save_pretrained) and cached under --dir.
  * Each engine runs in its own child process, so its load time and peak RSS (VmHWM; for
    ours this includes the memory-mapped weight pages it touched) are its own.
  * Prefill: time to the first token of a 128-token prompt (one forward + head + argmax).
    Decode: the next 127 tokens, time per token. Median over --reps repeats of the whole
    generation (the first repeat warms up nothing extra: weights are read from the map as in
    real use). transformers: model(prompt) for prefill, generate(max_new_tokens=128,
    min_new_tokens=128, do_sample=False) minus that for decode (its default dynamic cache,
    eager mode); torch threads = ours.
  * Roofline: decode tok/s <= bandwidth / weight bytes per token, with weight bytes = every
    matrix read once per token (the tied embedding is read in full as the head; the embedding
    lookup itself reads one row). Shown against the copy bandwidth (read + write, the project's
    convention, see BENCHMARKS.md) and the read-only bandwidth (torch.sum), both measured in
    this run by bench_kernels.bench_copy.
  * Tokenizer: a byte-level BPE tokenizer in Qwen's layout (NFC + Qwen split regex +
    ByteLevel) is trained with `tokenizers` to 32k tokens on this Python's standard library
    sources, then both tokenizers encode the same 1 MB of text (code and prose, with CJK and
    emoji); MB/s, single thread for both (ours is pure Python).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))
# Children run with the environment as launched, not with the OMP_WAIT_POLICY=PASSIVE that
# bench_kernels sets for its in-process torch runs: transformers' many short decode ops would
# pay for passive waiting.
LAUNCH_ENV = dict(os.environ)

QWEN3_06B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=40960,
                 attention_bias=False, use_sliding_window=False, bos_token_id=151643,
                 eos_token_id=151645)
PROMPT, NEW = 128, 128


def make_checkpoint(folder):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_06B)).to(torch.bfloat16)
    model.save_pretrained(folder)


def weight_bytes_per_token(cfg, itemsize=2):
    h, i, L, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["head_dim"]
    qkvo = h * d * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    per_layer = qkvo + 3 * h * i + 2 * h + 2 * d
    return itemsize * (L * per_layer + h + cfg["vocab_size"] * h)


def prompt_ids():
    import random
    rng = random.Random(0)
    return [rng.randrange(1000, 150000) for _ in range(PROMPT)]


def run_ours(folder, threads, reps):
    from inference_pio import LLM, SamplingParams, runtime
    runtime.set_num_threads(threads)
    t0 = time.perf_counter()
    llm = LLM(folder, dtype="bfloat16", max_model_len=1024, kv_cache_tokens=1024)
    load = time.perf_counter() - t0
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    prefill, decode = [], []
    for _ in range(reps):
        stamps, t0 = [], time.perf_counter()
        for _ in llm.stream(prompt_ids(), params):
            stamps.append(time.perf_counter())
        prefill.append(stamps[0] - t0)
        decode.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return load, prefill, decode


def run_transformers(folder, threads, reps):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    load = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids()])
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids)
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           pad_token_id=0)
            total = time.perf_counter() - t0
            prefill.append(t_prefill)
            decode.append((total - t_prefill) / (NEW - 1))
    return load, prefill, decode


def peak_rss():
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited from the
    parent across fork + exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(engine, folder, threads, reps):
    fn = run_ours if engine == "ours" else run_transformers
    load, prefill, decode = fn(folder, threads, reps)
    rss = peak_rss()
    print(json.dumps({"load_s": load, "prefill_s": prefill, "decode_s_per_token": decode,
                      "peak_rss_bytes": rss}))


def measure(engine, folder, threads, reps):
    out = subprocess.run([sys.executable, __file__, "--child", engine, "--dir", str(folder),
                          "--threads", str(threads), "--reps", str(reps)],
                         capture_output=True, text=True, check=False, env=LAUNCH_ENV)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} run failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["prefill_tok_s"] = PROMPT / statistics.median(r["prefill_s"])
    r["decode_tok_s"] = 1.0 / statistics.median(r["decode_s_per_token"])
    return r


def tokenizer_corpus():
    import sysconfig
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    extra = ("数学是研究数量、结构以及空间等概念的一门学科。日本語のテキスト。한국어 문장. "
             "Emoji 😀🎉👩‍💻 café naïve — “quotes” 1,000,000 3.14159\n") * 200
    return text[:4_000_000], (text[4_000_000:5_000_000] + extra)[:1_000_000]


def bench_tokenizer(workdir):
    import tokenizers
    from tokenizers import Regex, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pt
    from tokenizers.trainers import BpeTrainer

    from inference_pio.tokenizer import Tokenizer
    from inference_pio.tokenizer.pretokenize import QWEN2_PATTERN

    path = workdir / "tokenizer-32k.json"
    train, sample = tokenizer_corpus()
    if not path.exists():
        tok = tokenizers.Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                         pt.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(train.splitlines(keepends=True),
                                BpeTrainer(vocab_size=32000, initial_alphabet=pt.ByteLevel.alphabet(),
                                           show_progress=False))
        tok.save(str(path))
    oracle = tokenizers.Tokenizer.from_file(str(path))
    ours = Tokenizer.from_file(str(path))
    os.environ["RAYON_NUM_THREADS"] = "1"
    lines = sample.splitlines(keepends=True)
    chunks = ["".join(lines[i:i + 50]) for i in range(0, len(lines), 50)]
    nbytes = len(sample.encode("utf-8"))
    t0 = time.perf_counter()
    theirs = [oracle.encode(c, add_special_tokens=False).ids for c in chunks]
    t_theirs = time.perf_counter() - t0
    t0 = time.perf_counter()
    mine = [ours.encode(c) for c in chunks]
    t_ours = time.perf_counter() - t0
    assert mine == theirs, "tokenizers disagree"
    return {"bytes": nbytes, "ours_MBps": nbytes / t_ours / 1e6, "tokenizers_MBps": nbytes / t_theirs / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/inference-pio-bench/qwen3-0.6b-random")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--child", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    folder = Path(args.dir)
    if args.child:
        return child(args.child, folder, args.threads, args.reps)

    import torch
    from bench_kernels import bench_copy, cpu_name
    from inference_pio import runtime

    folder.mkdir(parents=True, exist_ok=True)
    make_checkpoint(folder)
    runtime.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    bw = bench_copy(512 << 20, reps=5)
    copy_bw, read_bw = bw["copy_read_write_GBps"] * 1e9, bw["sum_read_GBps_torch"] * 1e9
    wbytes = weight_bytes_per_token(QWEN3_06B)
    result = {"cpu": cpu_name(), "threads": args.threads, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "weight_bytes_per_token": wbytes, "copy_GBps": copy_bw / 1e9, "read_GBps": read_bw / 1e9,
              "roofline_copy_tok_s": copy_bw / wbytes, "roofline_read_tok_s": read_bw / wbytes}
    print(f"{result['cpu']}, {args.threads} threads. Qwen3-0.6B shapes, bf16, batch 1, "
          f"{PROMPT}-token prompt + {NEW} tokens.")
    print(f"weights read per token {wbytes / 1e9:.3f} GB; copy {copy_bw / 1e9:.1f} GB/s (read+write), "
          f"read-only {read_bw / 1e9:.1f} GB/s -> roofline {result['roofline_copy_tok_s']:.1f} / "
          f"{result['roofline_read_tok_s']:.1f} tok/s")
    engines = ["ours"] + ([] if args.skip_transformers else ["transformers"])
    for name in engines:
        r = result[name] = measure(name, folder, args.threads, args.reps)
        print(f"{name:>13}: prefill {r['prefill_tok_s']:7.1f} tok/s, decode {r['decode_tok_s']:6.2f} tok/s "
              f"({100 * r['decode_tok_s'] / result['roofline_copy_tok_s']:.0f}% of copy roofline, "
              f"{100 * r['decode_tok_s'] / result['roofline_read_tok_s']:.0f}% of read roofline), "
              f"load {r['load_s']:.2f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    if "transformers" in result:
        o, t = result["ours"], result["transformers"]
        print(f"ours / transformers: prefill {o['prefill_tok_s'] / t['prefill_tok_s']:.2f}x, "
              f"decode {o['decode_tok_s'] / t['decode_tok_s']:.2f}x")
    tk = result["tokenizer"] = bench_tokenizer(folder.parent)
    print(f"tokenizer encode ({tk['bytes'] / 1e6:.1f} MB, 1 thread): ours {tk['ours_MBps']:.2f} MB/s, "
          f"tokenizers {tk['tokenizers_MBps']:.2f} MB/s ({tk['ours_MBps'] / tk['tokenizers_MBps']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
