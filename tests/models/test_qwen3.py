"""Qwen3 against transformers (CPU torch, eager attention) on tiny random-weight checkpoints
written with save_pretrained and loaded by our loader like real ones.

Tolerances, per position of the logits (relative L2 error ||ours - ref|| / ||ref||):
- float32: 1e-4 (the issue's bound). Both sides compute in f32; only summation order differs.
- bfloat16: our bf16 path keeps bf16 weights and KV cache but computes in f32, so it is compared
  with transformers in f32 on the same bf16-rounded weights and must be within 2e-2 there; the
  error left is the KV cache's bf16 rounding. transformers' own bf16 run (bf16 activations too)
  is further from that reference than we are, which the test also checks.
- decode vs prefill, chunked vs whole, batched vs alone: same math in another order: 1e-5.
Each of these runs on the CPU and, where a GPU is visible, on the GPU (the `device` fixture):
the GPU's float32 path is plain f32 arithmetic too (no TF32), so the same bounds hold.
"""
import copy

import pytest
import torch

import inference_pio as ip
from inference_pio import LLM, SamplingParams

from checkpoints import qwen3_model, save_hf, save_qwen_tokenizer
from helpers import from_torch, to_torch

CONFIGS = {
    # GQA 2:1, head_dim 16 (= hidden / heads), tied embeddings
    "gqa2-tied": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=96, num_hidden_layers=2, tie_word_embeddings=True),
    # GQA 4:1, odd hidden size, head_dim 24 != hidden / heads, untied head, 3 layers
    "gqa4-untied-odd": dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=1,
                            head_dim=24, intermediate_size=72, num_hidden_layers=3,
                            tie_word_embeddings=False, vocab_size=257),
    # MHA, head_dim 32 with hidden 48 / 3 heads, large rope theta
    "mha-wide-head": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                          head_dim=32, intermediate_size=100, num_hidden_layers=2,
                          rope_theta=1e6, vocab_size=300),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def ckpt(request, tmp_path_factory):
    """(HF model in float32, checkpoint folder saved in float32)."""
    model = qwen3_model(seed=len(request.param), **CONFIGS[request.param])
    folder = save_hf(model, tmp_path_factory.mktemp(request.param))
    return model, folder


def rel_errors(ours, ref):
    """Relative L2 error of each row (position)."""
    ours, ref = ours.to(torch.float64), ref.to(torch.float64)
    return ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].to(torch.float32)


def random_ids(n, vocab, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_f32_every_position(ckpt, device):
    model, folder = ckpt
    llm = LLM(folder, device=device, dtype="float32")
    ids = random_ids(37, model.config.vocab_size, 1)
    ours = to_torch(llm.logits(ids))
    assert ours.shape == (37, model.config.vocab_size)
    errs = rel_errors(ours, hf_logits(model, ids))
    assert max(errs) <= 1e-4, errs


def test_logits_bf16(ckpt, device):
    model, folder = ckpt
    ids = random_ids(29, model.config.vocab_size, 2)
    ours = to_torch(LLM(folder, device=device, dtype="bfloat16").logits(ids))
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16))
    ref = hf_logits(rounded, ids)
    errs = rel_errors(ours, ref)
    hf_bf16 = hf_logits(rounded.to(torch.bfloat16), ids)
    hf_errs = rel_errors(hf_bf16, ref)
    assert max(errs) <= 2e-2, errs
    assert sum(errs) <= sum(hf_errs), (errs, hf_errs)


def test_logits_f16(ckpt, device):
    """float16 weights and KV cache (f32 compute) against transformers in f32 on the same
    f16-rounded weights: f16 keeps 3 more mantissa bits than bf16, so 4e-3."""
    model, folder = ckpt
    ids = random_ids(21, model.config.vocab_size, 6)
    ours = to_torch(LLM(folder, device=device, dtype="float16").logits(ids))
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.float16))
    errs = rel_errors(ours, hf_logits(rounded, ids))
    assert max(errs) <= 4e-3, errs


def test_greedy_32_tokens_match_generate(ckpt, device):
    model, folder = ckpt
    prompt = random_ids(6, model.config.vocab_size, 3)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    out = LLM(folder, device=device, dtype="float32").generate(prompt, SamplingParams(max_tokens=32, temperature=0))
    assert out[0].token_ids == ref
    assert out[0].finish_reason == "length" and out[0].prompt_token_ids == prompt


def test_decode_and_chunked_prefill_equal_prefill(ckpt, device):
    model, folder = ckpt
    ids = random_ids(23, model.config.vocab_size, 4)
    whole = to_torch(LLM(folder, device=device, dtype="float32").logits(ids))
    for chunk in (1, 5):  # chunk 1 is token-by-token decode over the paged cache
        part = to_torch(LLM(folder, device=device, dtype="float32", max_num_batched_tokens=chunk, block_size=4).logits(ids))
        assert max(rel_errors(part, whole)) <= 1e-5, chunk


def test_batch_equals_single(ckpt, device):
    model, folder = ckpt
    vocab = model.config.vocab_size
    prompts = [random_ids(n, vocab, 10 + n) for n in (1, 9, 17, 4)]
    params = SamplingParams(max_tokens=12, temperature=0)
    llm = LLM(folder, device=device, dtype="float32", block_size=4, max_num_batched_tokens=16)
    together = llm.generate(prompts, params)
    for p, out in zip(prompts, together):
        assert llm.generate(p, params)[0].token_ids == out.token_ids


def test_mixed_batch_logits(ckpt, device):
    """One forward holding a decode step, a prefill chunk and a whole prefill gives each
    sequence's rows as computed alone."""
    from inference_pio.engine.batch import ForwardBatch
    from inference_pio.engine.sequence import Sequence

    model, folder = ckpt
    llm = LLM(folder, device=device, dtype="float32", block_size=4)
    eng = llm.engine
    vocab = model.config.vocab_size
    a, b, c = (random_ids(n, vocab, 20 + n) for n in (11, 14, 6))
    seqs = [Sequence(i, p, SamplingParams(), ()) for i, p in enumerate((a, b, c))]
    # a: all but its last token already in the cache; b: its first 5 tokens
    for seq, done in zip(seqs[:2], (10, 5)):
        eng.blocks.allocate(seq, done)
        eng.model(ForwardBatch([(seq, done)], eng.blocks, eng.kv_cache, device))
        seq.num_computed = done
    work = [(seqs[0], 1), (seqs[1], 9), (seqs[2], 6)]
    for seq, n in work:
        eng.blocks.allocate(seq, n)
    got = to_torch(eng.model(ForwardBatch(work, eng.blocks, eng.kv_cache, device, logits_for="all")))
    want = torch.cat([to_torch(llm.logits(a))[10:], to_torch(llm.logits(b))[5:], to_torch(llm.logits(c))])
    assert max(rel_errors(got, want)) <= 1e-5


def test_qk_norm_weight_follows_the_norms(ckpt, device):
    """The per-head q/k norm weight that the fused rotation and cache store reads
    (Attention.stack_qk_norms, made at load time) follows the norms: a q_norm weight loaded anew
    after a forward is used by the next one; norms of different eps (never in practice, but HF
    takes one per module) fall back to q's heads alone, then k's with the store. Both against
    transformers with the same changes."""
    model, folder = ckpt
    llm = LLM(folder, device=device, dtype="float32")
    ids = random_ids(13, model.config.vocab_size, 8)
    attn0 = llm.model.model.layers[0].self_attn
    assert "qk_norm_heads" in attn0._buffers
    llm.logits(ids)
    ref = copy.deepcopy(model)
    new_w = torch.randn(model.config.head_dim, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref.model.layers[0].self_attn.q_norm.weight.copy_(new_w)
    llm.model.load_weights([("model.layers.0.self_attn.q_norm.weight", from_torch(new_w))], strict=False)
    assert max(rel_errors(to_torch(llm.logits(ids)), hf_logits(ref, ids))) <= 1e-4
    for theirs, ours in zip(ref.model.layers, llm.model.model.layers):
        theirs.self_attn.k_norm.variance_epsilon = 0.5
        ours.self_attn.k_norm.eps = 0.5
    assert attn0.stack_qk_norms() is None
    assert max(rel_errors(to_torch(llm.logits(ids)), hf_logits(ref, ids))) <= 1e-4


def test_sharded_and_bf16_checkpoints(tmp_path):
    model = qwen3_model(**CONFIGS["gqa2-tied"])
    ids = random_ids(12, model.config.vocab_size, 5)
    single = to_torch(LLM(save_hf(model, tmp_path / "one"), dtype="float32").logits(ids))
    sharded = save_hf(model, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert torch.equal(to_torch(LLM(sharded, dtype="float32").logits(ids)), single)
    # a bf16 checkpoint loads as bf16 by default ("auto"), its tensors used in place
    bf16 = LLM(save_hf(model, tmp_path / "bf16", dtype=torch.bfloat16))
    assert bf16.model.dtype == ip.bfloat16
    w = bf16.model.model.layers[0].mlp.up_proj.weight
    assert w.readonly  # a view of the read-only memory map, not a copy
    converted = LLM(tmp_path / "one", dtype="bfloat16")
    assert torch.equal(to_torch(bf16.logits(ids)), to_torch(converted.logits(ids)))


# ---- tokenizer, chat template, text in and out ----

@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-tok")
    oracle = save_qwen_tokenizer(folder)
    model = qwen3_model(**CONFIGS["gqa2-tied"])
    im_end = oracle.token_to_id("<|im_end|>")
    save_hf(model, folder, generation={"eos_token_id": [im_end, oracle.token_to_id("<|endoftext|>")]})
    return model, folder, oracle


CHATS = [
    [{"role": "user", "content": "Hi! What's 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "数学 😀"},
     {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nOK."}, {"role": "user", "content": "More"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"tools": TOOLS}])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_matches_transformers(with_tokenizer, chat, kwargs):
    from transformers import AutoTokenizer
    _, folder, _ = with_tokenizer
    hf = AutoTokenizer.from_pretrained(folder)
    llm = LLM(folder, dtype="float32")
    want = hf.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=True, **kwargs)
    assert llm.apply_chat_template(CHATS[chat], **kwargs) == want
    assert llm.tokenizer.encode(want) == hf(want, add_special_tokens=False)["input_ids"]


def test_text_generation_and_chat(with_tokenizer):
    model, folder, oracle = with_tokenizer
    llm = LLM(folder, dtype="float32")
    assert set(llm.eos_token_ids) == {oracle.token_to_id("<|im_end|>"), oracle.token_to_id("<|endoftext|>")}
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, skip_special_tokens=False)
    prompt = "The quick brown fox"
    out = llm.generate(prompt, params)[0]
    ids = oracle.encode(prompt).ids
    assert out.prompt_token_ids == ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == ref
    assert out.text == oracle.decode(ref, skip_special_tokens=False)
    # streaming gives the same tokens, and text deltas that add up to the same text
    deltas = list(llm.stream(prompt, params))
    assert [d.token_id for d in deltas] == ref
    assert "".join(d.text for d in deltas) == out.text
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    # chat renders the template and generates from it
    reply = llm.chat(CHATS[0], params, enable_thinking=False)
    prompt_text = llm.apply_chat_template(CHATS[0], enable_thinking=False)
    assert reply.token_ids == llm.generate(prompt_text, params)[0].token_ids


def test_stops_at_eos_and_stop_ids(with_tokenizer):
    _, folder, _ = with_tokenizer
    llm = LLM(folder, dtype="float32")
    free = llm.generate([5, 6, 7], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    out = llm.generate([5, 6, 7], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop], ignore_eos=True))[0]
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"


# ---- sampling ----

def test_seeded_sampling_reproducible(ckpt):
    model, folder = ckpt
    llm = LLM(folder, dtype="float32")
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a = llm.generate([1, 2, 3], p)[0].token_ids
    # same seed, batched with other requests: same tokens
    b = llm.generate([[1, 2, 3], [4, 5]], [p, SamplingParams(max_tokens=5, temperature=0.7)])[0].token_ids
    assert a == b and len(a) == 16
    others = {tuple(llm.generate([1, 2, 3], SamplingParams(max_tokens=16, temperature=1.0, seed=s))[0].token_ids)
              for s in range(4)}
    assert len(others) > 1


# ---- bad input ----

def test_prompt_errors(ckpt):
    model, folder = ckpt
    llm = LLM(folder, dtype="float32", max_model_len=16)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, model.config.vocab_size]], SamplingParams())
    with pytest.raises(ValueError, match="too long"):
        llm.generate(list(range(16)), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text needs a tokenizer")
    # the context limit ends generation with "length"
    out = llm.generate(list(range(10)), SamplingParams(max_tokens=100, temperature=0))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    assert llm.generate([1], SamplingParams(max_tokens=0))[0].token_ids == []


def test_fused_projections_same_logits(ckpt):
    """The q/k/v and gate/up stacking the loader does on GPUs (loader.fuse_projections) gives
    the same logits: applied here on the CPU, against the checkpoint's separate projections."""
    from inference_pio.engine.loader import fuse_projections
    model, folder = ckpt
    llm = LLM(folder, dtype="float32")
    ids = random_ids(19, model.config.vocab_size, 7)
    before = to_torch(llm.logits(ids))
    fuse_projections(llm.model)
    layer = llm.model.model.layers[0]
    assert "qkv_proj" in layer.self_attn._modules and "gate_up_proj" in layer.mlp._modules
    assert "q_proj" not in layer.self_attn._modules
    assert max(rel_errors(to_torch(llm.logits(ids)), before)) <= 1e-6
