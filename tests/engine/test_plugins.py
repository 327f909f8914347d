"""The plugin interface over the engine: every registered model is reachable through it."""
import pytest

from inference_pio import LLM, SamplingParams
from inference_pio.models import UnsupportedModelError, supported_architectures
from inference_pio.plugins import get_plugin, plugin_for

from checkpoints import qwen3_model, save_hf, save_qwen_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    save_qwen_tokenizer(folder)
    return save_hf(qwen3_model(), folder)


def test_every_registered_model_has_a_plugin():
    assert "Qwen3ForCausalLM" in supported_architectures() and "qwen3" in supported_architectures()
    for name in supported_architectures():
        assert get_plugin(name).model_class.__name__.endswith("ForCausalLM")
    with pytest.raises(UnsupportedModelError, match="no model registered as 'nope'"):
        get_plugin("nope")


def test_lifecycle(folder):
    plugin = get_plugin("Qwen3ForCausalLM")
    assert plugin.supports_config(folder)
    assert plugin.supports_config({"architectures": ["Qwen3ForCausalLM"]})
    assert not plugin.supports_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    with pytest.raises(RuntimeError, match="before load_model"):
        plugin.infer("hi")
    assert plugin.initialize(model=str(folder), dtype="float32") is True
    llm = plugin.load_model()
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = llm.generate("Hello", params)[0]
    got = plugin.infer({"prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert got.token_ids == want.token_ids and got.text == want.text
    chat = plugin.infer([{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                          "temperature": 0, "chat_template_kwargs": {"enable_thinking": False}}])
    assert chat[0].token_ids == llm.chat([{"role": "user", "content": "Hi"}],
                                         SamplingParams(max_tokens=3, temperature=0),
                                         enable_thinking=False).token_ids
    with pytest.raises(ValueError, match="unknown request fields: bogus"):
        plugin.infer({"prompt": "x", "bogus": 1})
    with pytest.raises(ValueError, match="max_tokens"):
        plugin.infer({"prompt": "x", "max_tokens": -1})
    assert plugin.cleanup() is True and plugin.llm is None


def test_plugin_for_folder(folder):
    plugin = plugin_for(folder)
    assert plugin.name == "Qwen3ForCausalLM"
    assert isinstance(plugin.load_model({"dtype": "float32"}), LLM)
    assert plugin.infer([1, 2, 3]).token_ids


def test_plugin_for_gguf_file(folder, tmp_path):
    from inference_pio.export import export_gguf
    path = export_gguf(folder, tmp_path / "model.gguf", "q8_0")
    plugin = plugin_for(path)
    assert plugin.name == "Qwen3ForCausalLM" and plugin.supports_config(path)
    assert not get_plugin("LlamaForCausalLM").supports_config(path)
    plugin.load_model()
    want = LLM(path).generate("Hello", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    got = plugin.infer({"prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert got.token_ids == want.token_ids and got.text == want.text
