"""GGUF export and load for tiny random llama and qwen3 checkpoints: our `quantize` writes the HF
folder as a GGUF file, our loader reads it back, and the logits match the folder's.

Bounds (relative L2 error of each position's logits):
- f32 export: 1e-5 (same weights; llama's q/k rows are permuted and rotated interleaved, which
  only reorders sums). f16 export: 5e-3 (f16 weights against f32).
- quantized exports are compared with transformers running the *dequantized* weights of the
  same file (gguf's own dequantizer), so what remains is our 8-bit activation quantization
  (as llama.cpp's): measured 2.2-4.3 % on these random models, QUANT_BOUND = 6 %.
- LLM(folder, quantization=T) quantizes exactly as the export does: identical logits.
"""
import numpy as np
import pytest
import torch

from inference_pio import LLM
from inference_pio.export import export_gguf

from checkpoints import llama_model, qwen3_model, save_hf, save_qwen_tokenizer
from helpers import to_torch

gguf = pytest.importorskip("gguf")

QUANT_BOUND = 0.06
MODELS = {
    "llama": lambda: llama_model(seed=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=96, num_hidden_layers=2, vocab_size=320),
    # rows of 256: the k-quants apply without falling back to q8_0
    "qwen3": lambda: qwen3_model(seed=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=64, intermediate_size=512, num_hidden_layers=2,
                                 tie_word_embeddings=False, vocab_size=320),
}


@pytest.fixture(scope="module", params=list(MODELS))
def ckpt(request, tmp_path_factory):
    model = MODELS[request.param]()
    folder = save_hf(model, tmp_path_factory.mktemp(request.param))
    save_qwen_tokenizer(folder)
    return request.param, model, folder


def rel_errors(ours, ref):
    ours, ref = ours.to(torch.float64), ref.to(torch.float64)
    return ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()


def ids_for(model, n=23, seed=5):
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind,bound", [("f32", 1e-5), ("f16", 5e-3)])
def test_float_export_round_trip(ckpt, tmp_path, kind, bound):
    arch, model, folder = ckpt
    path = export_gguf(folder, tmp_path / f"{arch}-{kind}.gguf", kind)
    ids = ids_for(model)
    ref = to_torch(LLM(folder, dtype="float32").logits(ids))
    ours = to_torch(LLM(path, dtype="float32").logits(ids))
    assert max(rel_errors(ours, ref)) <= bound


def _dequantized_reference(model, path, arch):
    """transformers' model with every weight replaced by gguf's dequantization of our file
    (llama q/k rows permuted back to the HF layout)."""
    import copy
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    ref = copy.deepcopy(model)
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    from inference_pio.io.gguf_arch import gguf_name
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            t = by_name[gguf_name(name)]
            w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            w = w.reshape(p.shape)
            if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
                heads = w.shape[0] // hd
                w = w.reshape(heads, hd // 2, 2, -1).transpose(1, 2).reshape(p.shape)
            p.copy_(w)
    return ref


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q4_k", "q6_k"])
def test_quantized_export(ckpt, tmp_path, qtype):
    arch, model, folder = ckpt
    path = export_gguf(folder, tmp_path / f"{arch}-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(str(path))  # gguf's reader accepts the file
    kinds = {t.tensor_type.name.lower() for t in reader.tensors}
    assert qtype in kinds or (qtype in ("q4_k", "q6_k") and "q8_0" in kinds)
    ids = ids_for(model)
    llm = LLM(path)
    ours = to_torch(llm.logits(ids))
    with torch.no_grad():
        ref = _dequantized_reference(model, path, arch)(torch.tensor([ids])).logits[0]
    assert max(rel_errors(ours, ref)) <= QUANT_BOUND
    # quantization on load makes the same weights as the export
    same = to_torch(LLM(folder, quantization=qtype).logits(ids))
    assert torch.equal(same, ours)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_interleaved_rows_match_plain_blocks(ckpt, qtype):
    """On the CPU, loading gives the projections the 8-row interleaved layout, and the token
    embedding too where it is tied (it is then the head); the logits equal the plain blocks'
    up to f32 summation order."""
    from inference_pio import dtypes, ops
    arch, model, folder = ckpt
    # a float32 cache: f16 rounding of keys and values would magnify the summation-order change
    llm = LLM(folder, quantization=qtype, kv_cache_dtype="float32")
    assert llm.model.model.layers[0].mlp.up_proj.weight.dtype.name == qtype + "x8"
    tied = llm.model.config.tie_word_embeddings
    assert llm.model.model.embed_tokens.weight.dtype.name == qtype + ("x8" if tied else "")
    ids = ids_for(model)
    interleaved = to_torch(llm.logits(ids))
    for _, m in llm.model.named_modules():
        if getattr(m, "weight", None) is not None and m.weight.dtype in dtypes.ROW_INTERLEAVED:
            m.weight = ops.quantize(m.weight, dtypes.ROW_INTERLEAVED[m.weight.dtype])
    assert max(rel_errors(interleaved, to_torch(llm.logits(ids)))) <= 1e-5


def test_exported_tokenizer_and_template(ckpt, tmp_path):
    arch, model, folder = ckpt
    path = export_gguf(folder, tmp_path / f"{arch}-tok.gguf", "q8_0")
    a, b = LLM(folder), LLM(path)
    text = "Hello world! 12345 <|im_start|>user\nx<|im_end|> 你好 🙂"
    assert b.tokenizer.encode(text) == a.tokenizer.encode(text)
    chat = [{"role": "user", "content": "Hi there"}]
    assert b.apply_chat_template(chat) == a.apply_chat_template(chat)
    assert set(a.eos_token_ids) <= set(b.eos_token_ids)


def test_requantize_gguf_to_gguf(ckpt, tmp_path):
    arch, model, folder = ckpt
    f16 = export_gguf(folder, tmp_path / "a.gguf", "f16")
    q8 = export_gguf(f16, tmp_path / "b.gguf", "q8_0")
    ids = ids_for(model)
    # float32 for the unquantized tensors and KV cache, as the q8_0 file's "auto" gives
    direct = to_torch(LLM(f16, dtype="float32", quantization="q8_0").logits(ids))
    assert torch.equal(to_torch(LLM(q8).logits(ids)), direct)


def test_quantize_cli_and_info(ckpt, tmp_path, capsys):
    from inference_pio.cli import main
    arch, model, folder = ckpt
    dst = tmp_path / "cli.gguf"
    assert main(["quantize", str(folder), str(dst), "--type", "q4_0"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "q4_0" in out and arch in out.lower()


def test_quantize_errors(ckpt, tmp_path, capsys):
    from inference_pio.cli import main
    arch, model, folder = ckpt
    assert main(["quantize", str(folder), str(folder), "--type", "q8_0"]) == 1
    assert "differ" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(folder), str(tmp_path / "x.gguf"), "--type", "q5_k"])
    with pytest.raises(ValueError, match="unknown quantization"):
        LLM(folder, quantization="q3_k")
