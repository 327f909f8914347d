"""Checkpoint folders that are broken in each documented way raise the documented error, naming
the file and the problem; nothing is half-loaded."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from inference_pio import LLM
from inference_pio.io import CheckpointError
from inference_pio.models import UnsupportedModelError
from inference_pio.tokenizer import TokenizerError

from checkpoints import qwen3_model, save_hf, save_qwen_tokenizer


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    save_qwen_tokenizer(folder)
    save_hf(qwen3_model(), folder)
    return folder


@pytest.fixture
def broken(good, tmp_path):
    """A fresh copy of the good checkpoint to break."""
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    return folder


def edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder, fn, name="config.json"):
    path = folder / name
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def test_good_loads(good):
    assert LLM(good).generate("Hi", None)[0].token_ids


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        LLM(tmp_path / "nowhere")


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no such config file"):
        LLM(broken)


def test_missing_weights_file(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        LLM(broken)


def test_unsupported_architecture(broken):
    def fn(cfg):
        cfg["architectures"], cfg["model_type"] = ["FooForCausalLM"], "foo"
    edit_config(broken, fn)
    with pytest.raises(UnsupportedModelError, match="'FooForCausalLM'.*supported: .*Qwen3ForCausalLM"):
        LLM(broken)


def test_config_field_missing_or_wrong(broken):
    edit_config(broken, lambda cfg: cfg.pop("hidden_size"))
    with pytest.raises(CheckpointError, match="no 'hidden_size'"):
        LLM(broken)
    edit_config(broken, lambda cfg: cfg.update(hidden_size="64"))
    with pytest.raises(CheckpointError, match="'hidden_size' is '64', expected int"):
        LLM(broken)


def test_unsupported_rope_scaling(broken):
    edit_config(broken, lambda cfg: cfg.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(CheckpointError, match="rope type 'yarn' is not supported"):
        LLM(broken)


def test_missing_weight(broken):
    edit_weights(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights: model\.layers\.1\.mlp\.up_proj\.weight"):
        LLM(broken)


def test_unexpected_weight(broken):
    edit_weights(broken, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="unexpected weight 'model.layers.0.extra.weight'"):
        LLM(broken)


def test_wrong_shape(broken):
    edit_weights(broken, lambda t: t.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight' has shape \[63\], expected \[64\]"):
        LLM(broken)


def test_wrong_dtype(broken):
    edit_weights(broken, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype int32, expected a float"):
        LLM(broken)


def test_tied_head_duplicate_is_ignored(good, broken):
    """Some Qwen3 files store lm_head.weight although the head is tied: accepted, not used."""
    edit_weights(broken, lambda t: t.update({"lm_head.weight": torch.zeros(320, 64)}))
    assert LLM(broken).logits([1, 2, 3]).tolist() == LLM(good).logits([1, 2, 3]).tolist()


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_safetensors(broken, cut):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(broken)


def test_malformed_safetensors_header(broken):
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json {{{"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(broken)


def test_malformed_generation_config(broken):
    (broken / "generation_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="generation_config.json.*not valid JSON"):
        LLM(broken)


def test_malformed_tokenizer(broken):
    (broken / "tokenizer.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        LLM(broken)
    (broken / "tokenizer.json").unlink()  # no tokenizer at all: ids still work, text does not
    llm = LLM(broken)
    assert llm.generate([1, 2], None)[0].token_ids
    with pytest.raises(ValueError, match="no tokenizer.json"):
        llm.generate("text")
