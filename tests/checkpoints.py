"""Tiny random-weight checkpoints written by transformers' save_pretrained (test-only), loaded by
our loader exactly like a real checkpoint folder."""
import json
import pathlib

import torch

DATA = pathlib.Path(__file__).parent / "data"
QWEN3_TEMPLATE = (DATA / "qwen3_chat_template.jinja").read_text()


def perturb_norms(model, gen):
    """RMSNorm weights start as ones; random ones show that each is really applied."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def save_hf(model, folder, *, dtype=torch.float32, generation=None, max_shard_size=None):
    """save_pretrained in `dtype` (the config records it), plus a generation_config.json."""
    folder = pathlib.Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(folder, **kwargs)
    model.to(torch.float32)
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def qwen3_model(seed=0, **config):
    """A float32 eager Qwen3ForCausalLM with every config field set explicitly."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=512,
                attention_bias=False, use_sliding_window=False, initializer_range=0.1,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(config)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**base, attn_implementation="eager")).eval()
    perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def llama_model(seed=0, **config):
    """A float32 eager LlamaForCausalLM (SmolLM2's architecture) with the fields set explicitly."""
    from transformers import LlamaConfig, LlamaForCausalLM
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=512,
                attention_bias=False, mlp_bias=False, initializer_range=0.1,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    base.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**base, attn_implementation="eager")).eval()
    perturb_norms(model, torch.Generator().manual_seed(seed + 1))
    return model


def save_qwen_tokenizer(folder, template=QWEN3_TEMPLATE):
    """A Qwen-style tokenizer.json (trained here, ~310 tokens) and a tokenizer_config.json with
    the Qwen3 chat template and special tokens; returns the `tokenizers` oracle."""
    from bpe_training import qwen_pre_tokenizer, train
    oracle = train(qwen_pre_tokenizer(), vocab_size=300)
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    oracle.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": template,
              "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return oracle
