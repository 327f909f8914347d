"""python -m inference_pio: generate, chat and info on a tiny checkpoint, in-process (main(argv))
and once as a real subprocess."""
import subprocess
import sys

import pytest

from inference_pio import LLM, SamplingParams
from inference_pio.cli import main

from checkpoints import qwen3_model, save_hf, save_qwen_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    save_qwen_tokenizer(folder)
    model = qwen3_model()
    save_hf(model, folder)
    return folder, model


def test_generate_streams_the_completion(ckpt, capsys):
    folder, _ = ckpt
    assert main(["generate", "--model", str(folder), "--prompt", "The quick", "--max-tokens", "12",
                 "--temperature", "0", "--ignore-eos", "--dtype", "float32"]) == 0
    want = LLM(folder, dtype="float32").generate(
        "The quick", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].text
    assert capsys.readouterr().out == want + "\n"


def test_chat_repl(ckpt, capsys, monkeypatch):
    folder, _ = ckpt
    lines = iter(["Hello there", "/reset", "Hi again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", str(folder), "--max-tokens", "6", "--temperature", "0",
                 "--ignore-eos", "--dtype", "float32", "--no-think"]) == 0
    out = capsys.readouterr()
    llm = LLM(folder, dtype="float32")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first = llm.chat([{"role": "user", "content": "Hello there"}], params, enable_thinking=False).text
    again = llm.chat([{"role": "user", "content": "Hi again"}], params, enable_thinking=False).text
    # /reset forgot the first exchange, so the second reply is a fresh conversation's
    assert out.out == f"{first}\n{again}\n"
    assert "conversation cleared" in out.err


def test_chat_ends_on_eof(ckpt, monkeypatch):
    folder, _ = ckpt

    def eof(prompt=""):
        raise EOFError
    monkeypatch.setattr("builtins.input", eof)
    assert main(["chat", "--model", str(folder)]) == 0


def test_info(ckpt, capsys):
    folder, model = ckpt
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in model.parameters())
    assert f"parameters         {n:,}" in out
    assert "Qwen3ForCausalLM (qwen3)" in out and "float32" in out
    c = model.config
    kv_mib = 1000 * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 / 2 ** 20
    assert f"{kv_mib:,.1f} MiB per 1,000 tokens as float32" in out
    assert main(["info", str(folder), "--dtype", "bfloat16"]) == 0
    assert f"{n * 2 / 2 ** 20:,.1f} MiB (float tensors as bfloat16)" in capsys.readouterr().out


def test_bad_model_is_one_line_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such checkpoint folder" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", ["generate", "chat", "info"])
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "inference_pio", command, "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: python -m inference_pio " + command)


# ---- sampling flags: one per SamplingParams field ----

def _dests(command):
    from inference_pio.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest for a in sub.choices[command]._actions}


def test_a_flag_for_every_sampling_field():
    import dataclasses
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert fields <= _dests("generate")
    assert fields - {"n"} <= _dests("chat") and "n" not in _dests("chat")


def test_flags_to_sampling_params():
    from inference_pio.cli import _params, build_parser
    args = build_parser().parse_args(
        ["generate", "--prompt", "x", "--stop", "\n\n", "--stop", "END", "--stop-token-id", "5",
         "--stop-token-ids", "9", "--n", "3", "--include-stop-str-in-output", "--no-skip-special-tokens",
         "--seed", "11", "--top-k", "40", "--min-p", "0.1"])
    p = _params(args)
    assert p.stop == ["\n\n", "END"] and p.stop_token_ids == [5, 9] and p.n == 3 and p.seed == 11
    assert p.include_stop_str_in_output and not p.skip_special_tokens and p.top_k == 40 and p.min_p == 0.1
    assert p.temperature == 0.7 and p.max_tokens == 128 and p.top_p == 1.0 and not p.ignore_eos
    # flags not given keep the dataclass defaults
    d = _params(build_parser().parse_args(["chat", "--temperature", "0"]))
    assert d == SamplingParams(max_tokens=512, temperature=0)


def test_flags_of_fields_added_elsewhere():
    """Fields the other branches add (penalties, logit_bias, logprobs, beam options) get flags
    from their annotations and defaults: shown on a stand-in dataclass."""
    import argparse
    import dataclasses
    import typing
    from inference_pio.cli import _field_flag, _logit_bias

    @dataclasses.dataclass
    class Params:
        repetition_penalty: float = 1.0
        no_repeat_ngram_size: int = 0
        logit_bias: dict = dataclasses.field(default_factory=dict)
        logprobs: int | None = None
        early_stopping: bool | str = False
        use_beam: bool = False
        tags: list[int] = dataclasses.field(default_factory=list)

    parser = argparse.ArgumentParser()
    hints = typing.get_type_hints(Params)
    for f in dataclasses.fields(Params):
        flags, kw = _field_flag(f, hints[f.name])
        parser.add_argument(*flags, **kw)
    args = parser.parse_args(["--repetition-penalty", "1.3", "--no-repeat-ngram-size", "3", "--logit-bias",
                              "5=-100,7=2.5", "--logit-bias", "9=1", "--logprobs", "2", "--early-stopping",
                              "never", "--use-beam", "--tags", "4", "--tags", "6"])
    assert (args.repetition_penalty, args.no_repeat_ngram_size, args.logprobs) == (1.3, 3, 2)
    assert args.logit_bias == [{5: -100.0, 7: 2.5}, {9: 1.0}]
    assert args.early_stopping == "never" and args.use_beam is True and args.tags == [4, 6]
    assert parser.parse_args(["--early-stopping", "True"]).early_stopping is True
    assert parser.parse_args([]).repetition_penalty is None  # not given: the dataclass default
    for bad in ("5", "x=1", "5=y", "5=1,"):
        with pytest.raises(argparse.ArgumentTypeError, match="ID=BIAS"):
            _logit_bias(bad)


def test_generate_stop_string_and_n(ckpt, capsys):
    folder, _ = ckpt
    llm = LLM(folder, dtype="float32")
    base = ["generate", "--model", str(folder), "--prompt", "The quick", "--dtype", "float32", "--ignore-eos"]
    free = llm.generate("The quick", SamplingParams(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True))[0]
    stop = next(c for c in free.text[3:] if c.strip() and c != "\ufffd")  # a character it prints
    assert main(base + ["--max-tokens", "12", "--temperature", "0.9", "--seed", "3", "--stop", stop]) == 0
    want = llm.generate("The quick", SamplingParams(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True,
                                                   stop=stop))[0]
    assert want.finish_reason == "stop" and capsys.readouterr().out == want.text + "\n"
    assert stop not in want.text
    # --n: each sample under its own header, in order
    assert main(base + ["--max-tokens", "6", "--seed", "5", "--n", "3", "--temperature", "1"]) == 0
    outs = llm.generate("The quick", SamplingParams(max_tokens=6, temperature=1, seed=5, n=3, ignore_eos=True))[0]
    assert capsys.readouterr().out == "".join(f"[sample {o.index}]\n{o.text}\n" for o in outs.outputs)
    assert main(base + ["--max-tokens", "0", "--n", "2"]) == 0
    assert capsys.readouterr().out == "[sample 0]\n\n[sample 1]\n\n"


def test_generate_prints_logprobs(ckpt, capsys):
    folder, _ = ckpt
    assert main(["generate", "--model", str(folder), "--prompt", "The quick", "--max-tokens", "4",
                 "--temperature", "0", "--ignore-eos", "--dtype", "float32", "--logprobs", "2"]) == 0
    llm = LLM(folder, dtype="float32")
    out = llm.generate("The quick", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2))[0]
    lines = capsys.readouterr().out.split("\n")
    assert lines[0] == out.text and lines[1] == "[logprobs]" and len(lines) == 2 + 4 + 1
    for line, entry in zip(lines[2:], out.logprobs):
        (tid, lp), *alts = entry.items()
        assert line == (f"{llm.tokenizer.decode([tid])!r} {tid} {lp:.4f}"
                        + "".join(f" | {t} {v:.4f}" for t, v in alts))


def test_generate_beam_search(ckpt, capsys):
    from inference_pio import BeamSearchParams
    folder, _ = ckpt
    assert main(["generate", "--model", str(folder), "--prompt", "The quick", "--dtype", "float32",
                 "--max-tokens", "5", "--num-beams", "3", "--num-return-sequences", "2",
                 "--length-penalty", "0.5", "--early-stopping", "never", "--ignore-eos"]) == 0
    want = LLM(folder, dtype="float32").beam_search("The quick", BeamSearchParams(
        num_beams=3, max_tokens=5, num_return_sequences=2, length_penalty=0.5, early_stopping="never",
        ignore_eos=True))[0]
    assert capsys.readouterr().out == "".join(f"[beam {i}, score {h.score:.4f}]\n{h.text}\n"
                                              for i, h in enumerate(want.hypotheses))
    with pytest.raises(SystemExit):  # argparse's usage error
        main(["generate", "--model", str(folder), "--prompt", "x", "--num-beams", "2", "--early-stopping", "maybe"])
    assert "expected true, false or never, got 'maybe'" in capsys.readouterr().err


def test_bad_sampling_flag_is_one_line_error(ckpt, capsys):
    folder, _ = ckpt
    assert main(["generate", "--model", str(folder), "--prompt", "x", "--n", "0"]) == 1
    err = capsys.readouterr().err
    assert err == "error: SamplingParams.n must be an integer >= 1, got 0\n"


def test_samples_written_in_order():
    """Samples that finish out of order are still written one after the other, each whole."""
    import io
    from inference_pio import StreamDelta
    from inference_pio.cli import _stream_samples

    class Fake:
        def stream(self, prompt, params):
            for i, text, done in [(1, "b1", False), (0, "a1", False), (2, "c1", "stop"), (1, "b2", "length"),
                                  (0, "a2", "length")]:
                yield StreamDelta(0, text, done or None, None, 0, i)

    out = io.StringIO()
    _stream_samples(Fake(), "p", SamplingParams(n=3), out)
    assert out.getvalue() == "[sample 0]\na1a2\n[sample 1]\nb1b2\n[sample 2]\nc1\n"
