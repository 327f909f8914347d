"""Llama (SmolLM2's architecture) against transformers (CPU torch, eager attention) on tiny
random-weight checkpoints written with save_pretrained. Tolerances as in test_qwen3.py: float32
per-position relative L2 error <= 1e-4; greedy continuations identical."""
import pytest
import torch

from inference_pio import LLM, SamplingParams

from checkpoints import llama_model, save_hf
from helpers import from_torch, to_torch

CONFIGS = {
    # SmolLM2's proportions: GQA 3:1, head_dim = hidden / heads, tied embeddings
    "smol-like": dict(hidden_size=72, num_attention_heads=3, num_key_value_heads=1,
                      intermediate_size=160, num_hidden_layers=3),
    # MHA, untied head, odd vocabulary, explicit head_dim != hidden / heads
    "mha-untied": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                       intermediate_size=80, tie_word_embeddings=False, vocab_size=301),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory):
    model = llama_model(seed=len(request.param), **CONFIGS[request.param])
    return model, save_hf(model, tmp_path_factory.mktemp(request.param))


def rel_errors(ours, ref):
    ours, ref = ours.to(torch.float64), ref.to(torch.float64)
    return ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()


def random_ids(n, vocab, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_f32_every_position(ckpt, device):
    model, folder = ckpt
    ids = random_ids(41, model.config.vocab_size, 1)
    ours = to_torch(LLM(folder, device=device, dtype="float32").logits(ids))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    assert max(rel_errors(ours, ref)) <= 1e-4


def test_greedy_32_tokens_match_generate(ckpt, device):
    model, folder = ckpt
    prompt = random_ids(5, model.config.vocab_size, 3)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    out = LLM(folder, device=device, dtype="float32").generate(prompt, SamplingParams(max_tokens=32, temperature=0))
    assert out[0].token_ids == ref


def test_interleaved_rope_on_permuted_weights_gives_same_logits(ckpt, device):
    """llama GGUF files store q/k rows permuted for adjacent-pair rotation (reference 6.3):
    with rope_interleaved the permuted weights give the same logits as the HF layout."""
    model, folder = ckpt
    ids = random_ids(19, model.config.vocab_size, 7)
    ref = to_torch(LLM(folder, device=device, dtype="float32").logits(ids))

    llm = LLM(folder, device=device, dtype="float32")
    cfg = llm.model.config
    hd, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def permuted(rows, heads):  # each head's rows in adjacent-pair order
        return rows.reshape(heads, 2, hd // 2, -1).transpose(1, 2).reshape(heads * hd, -1)

    for layer in llm.model.model.layers:
        attn = layer.self_attn
        attn.rope_interleaved = True
        if "qkv_proj" in attn._modules:  # a GPU's stacked q/k/v (loader.fuse_projections)
            w = to_torch(attn.qkv_proj.weight)
            q, k = hq * hd, hkv * hd
            w = torch.cat([permuted(w[:q], hq), permuted(w[q:q + k], hkv), w[q + k:]])
            attn.qkv_proj.weight = from_torch(w.contiguous(), device)
            continue
        for proj, heads in ((attn.q_proj, hq), (attn.k_proj, hkv)):
            proj.weight = from_torch(permuted(to_torch(proj.weight), heads).contiguous(), device)
    assert max(rel_errors(to_torch(llm.logits(ids)), ref)) <= 1e-5
