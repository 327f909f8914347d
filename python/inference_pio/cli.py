"""python -m inference_pio {generate, chat, info, quantize}: the command line over LLM."""
import argparse
import sys

from . import dtypes, runtime


def _sampling_args(p, max_tokens):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens at most (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass to keep (1: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob (0: off)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop-token-id", type=int, action="append", default=[], metavar="ID",
                   help="also stop at this token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")


def _model_args(p):
    p.add_argument("--model", default=None,
                   help="checkpoint folder (config.json, *.safetensors, tokenizer.json) or GGUF file "
                        "(default: the built-in demo model, SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights' dtype (default: the checkpoint's)")
    p.add_argument("--quantization", default=None, choices=[d.name for d in dtypes.QUANTIZED],
                   help="quantize the weight matrices to this block type as they load")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="KV cache dtype (default: float16 for block-quantized weights, else the weights')")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: min(model limit, 8192))")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")


def _params(args):
    from .engine import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                          stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos)


def _load(args):
    from .demo import demo_model_path
    from .engine import LLM
    if args.threads:
        runtime.set_num_threads(args.threads)
    model = args.model if args.model is not None else demo_model_path()
    return LLM(model, device=args.device, dtype=args.dtype, quantization=args.quantization,
               max_model_len=args.max_model_len, progress=sys.stderr.isatty(), kv_cache_dtype=args.kv_cache_dtype)


def _stream(llm, prompt, params, out):
    """Writes the completion as it comes; returns its text."""
    text = []
    for delta in llm.stream(prompt, params):
        out.write(delta.text)
        out.flush()
        text.append(delta.text)
    return "".join(text)


def cmd_generate(args):
    llm = _load(args)
    prompt = args.prompt
    if args.chat_template:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    _stream(llm, prompt, _params(args), sys.stdout)
    sys.stdout.write("\n")
    return 0


def cmd_chat(args):
    llm = _load(args)
    params = _params(args)
    extra = {"enable_thinking": False} if args.no_think else {}
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    print("chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.apply_chat_template(history, **extra)
        try:
            reply = _stream(llm, prompt, params, sys.stdout)
        except KeyboardInterrupt:  # stop this reply, keep the session
            reply = ""
            print("\n(interrupted)", file=sys.stderr)
        except ValueError as e:  # e.g. the conversation no longer fits the context
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})


def checkpoint_info(path, dtype="auto"):
    """Facts about a checkpoint folder or GGUF file, read from its config/metadata and tensor
    headers (the weights themselves are not read)."""
    from .engine.kv_cache import KVCache
    from .engine.loader import open_checkpoint
    from inference_pio.models import model_class

    config, weights, wdtype = open_checkpoint(path, dtype)
    cls = model_class(config)
    model = cls(cls.config_class.from_hf(config), wdtype)  # parameters allocated, never touched
    tensors = [weights[n] for n in weights.names()]
    stored = {t.dtype.name for t in tensors}
    # block-quantized weights stay as stored; float ones take the chosen dtype
    weight_bytes = sum(t.nbytes if t.dtype.is_quantized else t.numel() * wdtype.itemsize for t in tensors)
    layers, kv_heads, head_dim = model.kv_cache_spec
    return {
        "architecture": cls.__name__,
        "model_type": config.get("model_type"),
        "parameters": sum(t.numel() for t in tensors),
        "stored_dtypes": sorted(stored),
        "dtype": wdtype.name,
        "weight_bytes": weight_bytes,
        "kv_cache_bytes_per_1k_tokens": 1000 * KVCache.bytes_per_token(layers, kv_heads, head_dim, wdtype),
        "layers": layers,
        "max_position_embeddings": model.config.max_position_embeddings,
    }


def cmd_info(args):
    info = checkpoint_info(args.path, args.dtype)
    mib = 2.0 ** 20
    print(f"architecture       {info['architecture']} ({info['model_type']})")
    print(f"parameters         {info['parameters']:,}")
    print(f"stored dtype       {', '.join(info['stored_dtypes'])}")
    print(f"weights            {info['weight_bytes'] / mib:,.1f} MiB (float tensors as {info['dtype']})")
    print(f"KV cache           {info['kv_cache_bytes_per_1k_tokens'] / mib:,.1f} MiB per 1,000 tokens as {info['dtype']}")
    print(f"layers             {info['layers']}")
    print(f"context            {info['max_position_embeddings']:,} tokens")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m inference_pio",
                                     description="Inference-PIO: run LLM checkpoints on CPU or GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete a prompt, streaming the tokens",
                       description="Complete one prompt and stream the new text to stdout.")
    _model_args(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    _sampling_args(p, max_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with a model in the terminal. /reset starts over, /exit quits.")
    _model_args(p)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--no-think", action="store_true", help="pass enable_thinking=False to the template (Qwen3)")
    _sampling_args(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="describe a checkpoint: size, dtype, memory",
                       description="Architecture, parameter count, dtype and memory needs of a checkpoint.")
    p.add_argument("path", help="checkpoint folder or GGUF file")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype to size the weights and KV cache for (default: the checkpoint's)")
    p.set_defaults(func=cmd_info)

    from .export import EXPORT_TYPES
    p = sub.add_parser("quantize", help="write a checkpoint as a (quantized) GGUF file",
                       description="Convert a Hugging Face folder or a GGUF file into a GGUF file "
                                   "that llama.cpp and this engine load, its matrices in TYPE.")
    p.add_argument("src", help="checkpoint folder or GGUF file")
    p.add_argument("dst", help="GGUF file to write")
    p.add_argument("--type", required=True, choices=EXPORT_TYPES, help="block type (or float type) of the matrices")
    p.set_defaults(func=cmd_quantize)
    return parser


def cmd_quantize(args):
    from .export import main_quantize
    main_quantize(args)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:  # bad files or arguments: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
