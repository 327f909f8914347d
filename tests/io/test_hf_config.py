"""config.json reading against configs written by transformers' save_pretrained, and the
legacy / 5.x spellings of rope_theta."""
import json

import pytest
import torch

from inference_pio.io import CheckpointError, architecture, load_hf_config, rope_theta

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, vocab_size=64)


def _save(tmp_path, name, theta):
    import transformers
    config = getattr(transformers, f"{name}Config")(rope_theta=theta, **TINY)
    torch.manual_seed(0)
    getattr(transformers, f"{name}ForCausalLM")(config).save_pretrained(tmp_path)
    return config


@pytest.mark.parametrize("name, model_type, theta", [("Qwen3", "qwen3", 1000000.0),
                                                     ("Llama", "llama", 500000.0)])
def test_transformers_configs(tmp_path, name, model_type, theta):
    config = _save(tmp_path, name, theta)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    for source in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        assert load_hf_config(source) == on_disk
    cfg = load_hf_config(tmp_path)
    assert architecture(cfg) == (f"{name}ForCausalLM", model_type)
    assert rope_theta(cfg) == theta == config.rope_parameters["rope_theta"]
    assert cfg["hidden_size"] == 32 and cfg["num_key_value_heads"] == 2


def test_config_saved_without_a_model_has_only_model_type(tmp_path):
    from transformers import LlamaConfig
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    cfg = load_hf_config(tmp_path)
    assert architecture(cfg) == (None, "llama")
    assert rope_theta(cfg) == 10000.0


@pytest.mark.parametrize("cfg, theta", [
    ({"rope_theta": 1000000}, 1000000.0),                                    # legacy, int
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e6}}, 5e6),  # transformers 5.x
    ({"rope_parameters": {"rope_type": "default"}, "rope_theta": 7e5}, 7e5),  # theta only on top
    ({"rope_parameters": {"rope_theta": 2e5}, "rope_theta": 9e9}, 2e5),       # 5.x wins
    ({}, 10000.0),
    ({"rope_parameters": None}, 10000.0),
])
def test_rope_theta_spellings(cfg, theta):
    got = rope_theta(cfg)
    assert got == theta and isinstance(got, float)


@pytest.mark.parametrize("cfg, fragment", [
    ({"rope_theta": "big"}, "not a positive number"),
    ({"rope_theta": 0}, "not a positive number"),
    ({"rope_theta": True}, "not a positive number"),
    ({"rope_parameters": [1]}, "'rope_parameters' .* not an object"),
])
def test_rope_theta_errors(cfg, fragment):
    with pytest.raises(ValueError, match=fragment):
        rope_theta(cfg)


@pytest.mark.parametrize("cfg, expected", [
    ({"architectures": ["Qwen3MoeForCausalLM", "Other"], "model_type": "qwen3_moe"},
     ("Qwen3MoeForCausalLM", "qwen3_moe")),
    ({"architectures": ["LlamaForCausalLM"]}, ("LlamaForCausalLM", None)),
    ({"architectures": None, "model_type": "llama"}, (None, "llama")),
])
def test_architecture(cfg, expected):
    assert architecture(cfg) == expected


@pytest.mark.parametrize("cfg, fragment", [
    ({}, "neither 'architectures' nor 'model_type'"),
    ({"architectures": [], "model_type": "llama"}, "not a list of class names"),
    ({"architectures": "LlamaForCausalLM"}, "not a list of class names"),
    ({"architectures": [3]}, "not a list of class names"),
    ({"model_type": 3}, "'model_type' 3 is not a string"),
])
def test_architecture_errors(cfg, fragment):
    with pytest.raises(ValueError, match=fragment):
        architecture(cfg)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such config file") as e:
        load_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    with pytest.raises(CheckpointError, match="no such config file"):
        load_hf_config(tmp_path / "nowhere" / "config.json")


@pytest.mark.parametrize("text, fragment", [
    (b"{\"model_type\": ", "not valid JSON"),
    (b"\xff{}", "not valid JSON"),
    (b"[\"llama\"]", "not a JSON object"),
    (b"null", "not a JSON object"),
])
def test_bad_config(tmp_path, text, fragment):
    path = tmp_path / "config.json"
    path.write_bytes(text)
    with pytest.raises(CheckpointError, match=fragment) as e:
        load_hf_config(tmp_path)
    assert str(path) in str(e.value)
