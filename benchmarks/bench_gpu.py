"""GPU benchmark (the lent H200): Qwen3 shapes with random bf16 weights, ours beside transformers
on the same GPU in the same run, each figure beside its roofline.

    python benchmarks/bench_gpu.py [--models 0.6b,4b] [--variants bf16,q8_0,q4_k] [--new 256]
                                   [--reps 3] [--compile] [--no-peers] [--no-gemm] [--json out.json] [--dir /tmp/inference-pio-gpu]

What is measured and how
  * Device copy bandwidth: a 1 GiB device-to-device to_copy, timed over repeats with a device
    synchronisation, as bytes read + written per second. Roofline for decode, the issue's
    convention: that bandwidth / (weight bytes per token), every matrix read once per token (the
    tied embedding read in full as the head). (A copy reads and writes: the read-only ceiling
    is about half, so this roofline is generous by up to 2x.)
  * Checkpoints: transformers' Qwen3ForCausalLM with the real config, random init on the GPU,
    bf16, save_pretrained under --dir (made once per machine).
  * Ours: LLM(folder, device="cuda", dtype="bfloat16"); a 128-token prompt, then --new greedy
    tokens ignoring EOS; prefill = time to the first streamed token, decode = time per token
    after it; median of --reps. Batch 32: 32 such prompts together, generated tokens per second.
    Prefill 2048: time to the first token of a 2048-token prompt.
  * Quantized decode: the same checkpoint quantized on load to q8_0 and q4_k (on the CPU, then
    copied), beside each one's own roofline.
  * transformers: the same checkpoint, bf16, eager attention, generate(min_new_tokens=new) with
    its dynamic cache, batch 1 and (eager only) the same 32 prompts at once; with --compile also
    cache_implementation="static", with which generate compiles the forward itself (slow to
    compile).
  * GEMM: ops.matmul at prefill shapes (M = 2048) in bf16 beside torch.matmul, TFLOP/s.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))
sys.path.insert(0, str(HERE))

from bench_qwen3 import QWEN3_06B, weight_bytes_per_token  # noqa: E402

QWEN3_4B = dict(QWEN3_06B, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=262144,
                rope_theta=5000000.0)
MODELS = {"0.6b": QWEN3_06B, "4b": QWEN3_4B}
PROMPT = 128


def make_checkpoint(folder, cfg):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(Qwen3Config(**cfg)).to(torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()


def prompt(n, seed=0):
    import random
    rng = random.Random(seed)
    return [rng.randrange(1000, 150000) for _ in range(n)]


def copy_bandwidth():
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    import inference_pio as ip
    n = 1 << 28  # floats
    a = ip.Tensor.zeros(n, device="cuda")
    b = ip.Tensor.empty(n, device="cuda")
    b.copy_(a)
    ip.lib.to_cuda_synchronize(0)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        b.copy_(a)
        ip.lib.to_cuda_synchronize(0)
        times.append(time.perf_counter() - t0)
    return 2 * 4 * n / min(times)


def run_ours(folder, new, reps, quantization=None):
    from inference_pio import LLM, SamplingParams
    llm = LLM(folder, device="cuda", dtype="bfloat16", quantization=quantization,
              max_model_len=4096, kv_cache_tokens=64 * 1024)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    prefill, decode = [], []
    for _ in range(reps):
        stamps, t0 = [], time.perf_counter()
        for _ in llm.stream(prompt(PROMPT), params):
            stamps.append(time.perf_counter())
        prefill.append(stamps[0] - t0)
        decode.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    out = {"prefill_tok_s": PROMPT / statistics.median(prefill), "decode_tok_s": 1 / statistics.median(decode)}
    if quantization is None:
        prompts = [prompt(PROMPT, seed) for seed in range(32)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        out["batch32_tok_s"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        long = prompt(2048, 7)
        llm.generate(long, one)
        t0 = time.perf_counter()
        llm.generate(long, one)
        out["prefill2048_tok_s"] = 2048 / (time.perf_counter() - t0)
    return out


class _Stamps:
    """A generate() streamer that only notes when each put arrives (the prompt first, then every
    new token once it is on the host): decode time per token without a second, differently
    shaped generate call (which would recompile a static-cache model)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        """generate's end-of-stream call: nothing is left to note."""


def run_transformers(folder, new, compiled):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                 attn_implementation="eager").cuda().eval()
    ids = torch.tensor([prompt(PROMPT)], device="cuda")
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if compiled:  # generate compiles the forward itself when the cache is static
        kw["cache_implementation"] = "static"
    with torch.inference_mode():
        for _ in range(2 if compiled else 1):  # warm-up (compilation), same shapes as timed
            model.generate(ids, **kw)
        stamps = _Stamps()
        model.generate(ids, streamer=stamps, **kw)
    t = stamps.times  # t[0]: the prompt, t[1]: the first new token, ..., t[-1]: the last
    out = {"decode_tok_s": (len(t) - 2) / (t[-1] - t[1])}
    if not compiled:  # batch 32: the same 32 prompts as ours, generated tokens per second
        batch = torch.tensor([prompt(PROMPT, seed) for seed in range(32)], device="cuda")
        with torch.inference_mode():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gen = model.generate(batch, attention_mask=torch.ones_like(batch), **kw)
            torch.cuda.synchronize()
        out["batch32_tok_s"] = (gen.shape[1] - PROMPT) * 32 / (time.perf_counter() - t0)
    del model
    torch.cuda.empty_cache()
    return out


def bench_gemm(shapes):
    """ops.matmul (bf16 x [M, K] times w [N, K]^T) beside torch.matmul, TFLOP/s."""
    import torch
    import inference_pio as ip
    rows = []
    for M, N, K in shapes:
        tx = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        tw = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        # the same random values in our tensors (through the host: bytes as they are)
        x, w = (ip.Tensor.frombuffer(t.cpu().view(torch.uint16).numpy().tobytes(), "bfloat16",
                                     tuple(t.shape), copy=True).to("cuda") for t in (tx, tw))
        out = ip.Tensor.empty(M, N, dtype="bfloat16", device="cuda")

        def timed(fn, sync):
            fn()
            sync()
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(10):
                    fn()
                sync()
                best = min(best, (time.perf_counter() - t0) / 10)
            return 2 * M * N * K / best / 1e12
        ours = timed(lambda: ip.ops.matmul(x, w, out=out), lambda: ip.lib.to_cuda_synchronize(0))
        theirs = timed(lambda: tx @ tw.T, torch.cuda.synchronize)
        rows.append({"M": M, "N": N, "K": K, "ours_tflops": ours, "torch_tflops": theirs})
        print(f"GEMM [{M}x{K}] x [{N}x{K}]^T bf16: ours {ours:6.1f} TFLOP/s, torch {theirs:6.1f} "
              f"({100 * ours / theirs:.0f} %)", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="0.6b,4b")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--variants", default="bf16,q8_0,q4_k")
    ap.add_argument("--dir", default="/tmp/inference-pio-gpu")
    ap.add_argument("--no-peers", action="store_true", help="skip transformers (quick iterations)")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM table")
    ap.add_argument("--json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    res = {"copy_GBps_read_write": bw / 1e9, "models": {}}
    print(f"device copy: {bw / 1e9:.0f} GB/s read + write", flush=True)
    for name in args.models.split(","):
        cfg = MODELS[name]
        folder = Path(args.dir) / f"qwen3-{name}"
        make_checkpoint(folder, cfg)
        r = res["models"][name] = {}
        for label, q, itemsize in (("bf16", None, 2), ("q8_0", "q8_0", 34 / 32), ("q4_k", "q4_k", 144 / 256)):
            if label not in args.variants.split(","):
                continue
            roof = bw / weight_bytes_per_token(cfg, itemsize)
            try:
                ours = run_ours(folder, args.new, args.reps, q)
            except Exception as e:  # a failure is reported, the other figures still come
                print(f"{name} {label}: ours failed: {e}", flush=True)
                continue
            ours["roofline_tok_s"] = roof
            r[label] = ours
            extra = "".join(f", {k} {v:.0f}" for k, v in ours.items() if k in ("batch32_tok_s", "prefill2048_tok_s"))
            print(f"Qwen3-{name} {label}: decode {ours['decode_tok_s']:.0f} tok/s "
                  f"({100 * ours['decode_tok_s'] / roof:.0f} % of roofline {roof:.0f}), prefill "
                  f"{ours['prefill_tok_s']:.0f} tok/s{extra}", flush=True)
        for compiled in () if args.no_peers else (False, True) if args.compile else (False,):
            key = "transformers_compiled" if compiled else "transformers_eager"
            try:
                r[key] = run_transformers(folder, args.new, compiled)
                extra = f", batch 32 {r[key]['batch32_tok_s']:.0f} tok/s" if "batch32_tok_s" in r[key] else ""
                print(f"Qwen3-{name} {key}: decode {r[key]['decode_tok_s']:.0f} tok/s{extra}", flush=True)
            except Exception as e:
                print(f"{name} {key} failed: {e}", flush=True)
    if not args.no_gemm:
        res["gemm"] = bench_gemm([(2048, 4096, 1024), (2048, 1024, 2048), (2048, 6144, 1024), (2048, 1024, 3072),
                              (2048, 6144, 2560), (2048, 2560, 4096), (2048, 19456, 2560), (2048, 2560, 9728),
                              (2048, 151936, 1024)])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
