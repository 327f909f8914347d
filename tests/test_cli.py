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
