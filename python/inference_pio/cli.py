"""python -m inference_pio {generate, chat, info, quantize}: the command line over LLM."""
import argparse
import dataclasses
import sys
import typing

from . import dtypes, runtime


# Help for the SamplingParams fields' flags; a field without an entry still gets a flag (its type
# read from the dataclass), with generic help.
_HELP = {
    "max_tokens": "new tokens at most",
    "temperature": "0 is greedy",
    "top_k": "keep the k most probable tokens (0: off)",
    "top_p": "nucleus mass to keep (1: off)",
    "min_p": "drop tokens below min_p * max prob (0: off)",
    "typical_p": "locally typical sampling: mass of the most typical tokens to keep (1: off)",
    "seed": "seed for reproducible sampling",
    "stop_token_ids": "also stop at this token id (repeatable)",
    "stop": "stop when the new text contains this string, which is not printed (repeatable; "
            "$'\\n' in bash for a newline)",
    "include_stop_str_in_output": "print the stop string that ended the output",
    "ignore_eos": "do not stop at end-of-sequence tokens",
    "skip_special_tokens": "leave special tokens out of the text",
    "n": "independent samples of the prompt, printed one after the other (default 1)",
    "min_tokens": "new tokens before an end or stop token may end the output",
    "repetition_penalty": "divide (multiply, when negative) the logits of tokens already in the "
                          "prompt or output by this (transformers' semantics; 1: off)",
    "presence_penalty": "subtract this from the logits of tokens already generated (OpenAI's; 0: off)",
    "frequency_penalty": "subtract this times a token's count so far from its logit (OpenAI's; 0: off)",
    "no_repeat_ngram_size": "never generate an n-gram of this size twice (0: off)",
    "logit_bias": "ID=BIAS: add BIAS to token ID's logit (repeatable, or comma-separated pairs)",
    "logprobs": "after the text, each token's log-probability and this many alternatives' "
                "(generate with one sample; from the model's raw distribution)",
}
_FLAGS = {"stop_token_ids": ["--stop-token-id", "--stop-token-ids"]}  # the singular is the old name
_ITEMS = {"stop_token_ids": int, "stop": str}  # element type of the list fields
_CLI_DEFAULTS = {"temperature": 0.7}  # the command line samples by default; max_tokens: per command
_NOT_IN_CHAT = {"n"}  # a chat goes on with one reply


def _logit_bias(text):
    """{token id: bias} of "ID=BIAS[,ID=BIAS...]"."""
    out = {}
    for pair in text.split(","):
        tid, sep, bias = pair.partition("=")
        try:
            out[int(tid)] = float(bias)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected ID=BIAS pairs, got {pair!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"expected ID=BIAS pairs, got {pair!r}")
    return out


def _kinds(tp):
    """The types annotation `tp` allows, None left out."""
    return [k for k in typing.get_args(tp) or (tp,) if k is not type(None)]


def _convert(tp):
    """A function from flag text to a value of annotation `tp` (int, float, str, bool, or a
    union of them such as int | None or bool | str)."""
    kinds = _kinds(tp)
    if kinds in ([int], [float], [str]):
        return kinds[0]

    def convert(text):  # first kind that reads the text: "true"/"false", then int, float, str
        if bool in kinds and text.lower() in ("true", "false"):
            return text.lower() == "true"
        for kind in (int, float, str):
            if kind in kinds:
                try:
                    return kind(text)
                except ValueError:
                    pass
        raise argparse.ArgumentTypeError(f"invalid value {text!r}")
    convert.__name__ = "value"
    return convert


def _field_flag(f, tp):
    """(option strings, add_argument keyword arguments) of SamplingParams field `f`, annotated
    `tp` (evaluated). Every flag defaults to None: only the flags given are passed on, the
    dataclass defaults the others. A bool field is a switch; a list field a repeatable flag; a
    dict field (logit_bias) takes ID=BIAS pairs."""
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kw = {"dest": f.name, "default": None, "help": _HELP.get(f.name, f"SamplingParams.{f.name}")}
    if isinstance(default, bool) and set(_kinds(tp)) <= {bool}:
        kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
    elif f.name == "logit_bias" or isinstance(default, dict):
        kw.update(action="append", type=_logit_bias, metavar="ID=BIAS")
    elif isinstance(default, list):
        item = _ITEMS.get(f.name) or (typing.get_args(tp) or (str,))[0]
        kw.update(action="append", type=item, metavar="ID" if item is int else "TEXT")
    else:
        kw["type"] = _convert(tp)
        if f.name not in _HELP and default is not None:
            kw["help"] += f" (default {default})"
    return _FLAGS.get(f.name, ["--" + f.name.replace("_", "-")]), kw


def _sampling_args(p, max_tokens, skip=()):
    """A flag per SamplingParams field (fields added later get theirs with no change here)."""
    from .engine import SamplingParams
    g = p.add_argument_group("sampling")
    types = typing.get_type_hints(SamplingParams)
    for f in dataclasses.fields(SamplingParams):
        if f.name in skip:
            continue
        flags, kw = _field_flag(f, types[f.name])
        if f.name == "max_tokens" or f.name in _CLI_DEFAULTS:
            kw["default"] = max_tokens if f.name == "max_tokens" else _CLI_DEFAULTS[f.name]
            kw["help"] = _HELP[f.name] + f" (default {kw['default']})"
        g.add_argument(*flags, **kw)


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
    """The SamplingParams of the flags given (the others keep the dataclass defaults)."""
    from .engine import SamplingParams
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams)
              if getattr(args, f.name, None) is not None}
    if "logit_bias" in kwargs:  # one dict per flag: later pairs win
        kwargs["logit_bias"] = {k: v for d in kwargs["logit_bias"] for k, v in d.items()}
    return SamplingParams(**kwargs)


def _load(args):
    from .demo import demo_model_path
    from .engine import LLM
    if args.threads:
        runtime.set_num_threads(args.threads)
    model = args.model if args.model is not None else demo_model_path()
    return LLM(model, device=args.device, dtype=args.dtype, quantization=args.quantization,
               max_model_len=args.max_model_len, progress=sys.stderr.isatty(), kv_cache_dtype=args.kv_cache_dtype)


def _stream(llm, prompt, params, out):
    """Writes the completion as it comes (a stop string is held back until resolved, never
    written); returns its text. With --logprobs, a table of them follows the text (_write_logprobs)."""
    text, logprobs = [], []
    for delta in llm.stream(prompt, params):
        out.write(delta.text)
        out.flush()
        text.append(delta.text)
        logprobs.append(delta.logprobs)
    if params.logprobs is not None:
        _write_logprobs(llm, logprobs, out)
    return "".join(text)


def _write_logprobs(llm, entries, out):
    """After the text: a line per generated token, its text (repr), id and logprob, then the
    alternatives asked for, "id logprob" each."""
    piece = (lambda t: repr(llm.tokenizer.decode([t]))) if llm.tokenizer else (lambda t: "")
    out.write("\n[logprobs]")
    for entry in entries:
        (tid, lp), *alts = entry.items()
        out.write(f"\n{piece(tid)} {tid} {lp:.4f}" + "".join(f" | {t} {v:.4f}" for t, v in alts))


def _stream_samples(llm, prompt, params, out):
    """Writes the n samples one after the other, each under a "[sample i]" line and ended by a
    newline. They run together: the one being written streams, the others' text waits for its
    turn."""
    n = params.n
    waiting, done, turn = [[] for _ in range(n)], [False] * n, 0
    out.write("[sample 0]\n")

    def advance():
        nonlocal turn
        while turn < n and done[turn]:
            out.write("\n")
            turn += 1
            if turn < n:
                out.write(f"[sample {turn}]\n" + "".join(waiting[turn]))
    for delta in llm.stream(prompt, params):
        i = delta.sample_index
        (out.write if i == turn else waiting[i].append)(delta.text)
        done[i] = delta.finish_reason is not None
        advance()
        out.flush()
    done = [True] * n  # max_tokens 0: no deltas at all
    advance()


def _beam_args(p):
    g = p.add_argument_group("beam search (with --num-beams; the sampling flags other than "
                             "--max-tokens, --min-tokens, --stop-token-id and --ignore-eos do not apply)")
    g.add_argument("--num-beams", type=int, default=None, help="run a beam search with this many beams")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="a hypothesis scores sum(log-probs) / length ** this (default 1)")
    g.add_argument("--early-stopping", type=_early_stopping, default=False, metavar="true|false|never",
                   help="transformers' early_stopping (default false)")
    g.add_argument("--num-return-sequences", type=int, default=1, help="hypotheses printed, best first")


def _early_stopping(text):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text == "never":
        return text
    raise argparse.ArgumentTypeError(f"expected true, false or never, got {text!r}")


def _beam_params(args, params):
    """BeamSearchParams of the beam flags and the sampling flags that apply to a beam search."""
    from .engine import BeamSearchParams
    return BeamSearchParams(num_beams=args.num_beams, max_tokens=params.max_tokens,
                            min_tokens=params.min_tokens, length_penalty=args.length_penalty,
                            early_stopping=args.early_stopping, num_return_sequences=args.num_return_sequences,
                            stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos,
                            skip_special_tokens=params.skip_special_tokens)


def _print_beams(llm, prompt, params, out):
    """Writes a beam search's hypotheses, best first, each under a "[beam i, score S]" line."""
    for i, h in enumerate(llm.beam_search(prompt, params)[0].hypotheses):
        out.write(f"[beam {i}, score {h.score:.4f}]\n{h.text}\n")


def cmd_generate(args):
    params = _params(args)  # bad flags fail before the model loads
    beams = _beam_params(args, params) if args.num_beams is not None else None
    llm = _load(args)
    prompt = args.prompt
    if args.chat_template:
        prompt = llm.apply_chat_template([{"role": "user", "content": prompt}])
    if beams is not None:
        _print_beams(llm, prompt, beams, sys.stdout)
    elif params.n > 1:
        _stream_samples(llm, prompt, params, sys.stdout)
    else:
        _stream(llm, prompt, params, sys.stdout)
        sys.stdout.write("\n")
    return 0


def cmd_chat(args):
    params = _params(args)
    llm = _load(args)
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
    _beam_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat",
                       description="Chat with a model in the terminal. /reset starts over, /exit quits.")
    _model_args(p)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--no-think", action="store_true", help="pass enable_thinking=False to the template (Qwen3)")
    _sampling_args(p, max_tokens=512, skip=_NOT_IN_CHAT)
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
