"""LLM(kv_cache_dtype=...): the paged KV cache in another float dtype than the weights."""
import pytest
import torch

from inference_pio import LLM

from checkpoints import qwen3_model, save_hf, save_qwen_tokenizer
from helpers import to_torch


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv")
    save_qwen_tokenizer(folder)
    save_hf(qwen3_model(), folder)
    return folder


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_kv_cache_dtype(folder, kv):
    """The cache holds kv; logits stay within that dtype's rounding of the float32 cache's, and
    greedy decoding goes through the same cache."""
    ids = [5, 17, 230, 9, 44, 3, 101]
    ref = to_torch(LLM(folder, dtype="float32").logits(ids)).double()
    llm = LLM(folder, dtype="float32", kv_cache_dtype=kv)
    assert llm.engine.kv_cache.dtype.name == kv
    got = to_torch(llm.logits(ids)).double()
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert 0 < rel <= {"float16": 2e-3, "bfloat16": 2e-2}[kv]
    assert len(llm.generate([ids], None)[0].token_ids) > 0


def test_kv_cache_dtype_refused(folder):
    with pytest.raises(ValueError, match="float32"):
        LLM(folder, kv_cache_dtype="int8")


@pytest.mark.parametrize("dtype,quantization,expected", [
    ("float32", None, "float32"), ("bfloat16", None, "bfloat16"),
    ("float32", "q8_0", "float16"),  # block-quantized matrices, float32 rest: llama.cpp's f16 cache
    ("bfloat16", "q4_0", "bfloat16")])
def test_auto_kv_cache_dtype(folder, dtype, quantization, expected):
    llm = LLM(folder, dtype=dtype, quantization=quantization)
    assert llm.engine.kv_cache.dtype.name == expected
