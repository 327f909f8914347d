"""Module, parameter naming like checkpoint keys, load_weights, and the common layers against
torch's equivalents."""
import pytest
import torch

import inference_pio as ip
from inference_pio import nn
from helpers import from_torch, randn, to_torch


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim, eps=1e-6)
        self.q_proj = nn.Linear(dim, 2 * dim, bias=True)
        self.o_proj = nn.Linear(2 * dim, dim)


class Tiny(nn.Module):
    def __init__(self, vocab=11, dim=6, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.register_buffer("inv_freq", ip.Tensor.zeros(3))


def test_parameter_names_follow_checkpoint_keys():
    m = Tiny()
    names = [n for n, _ in m.named_parameters()]
    assert names == [
        "embed_tokens.weight",
        "layers.0.input_layernorm.weight", "layers.0.q_proj.weight", "layers.0.q_proj.bias", "layers.0.o_proj.weight",
        "layers.1.input_layernorm.weight", "layers.1.q_proj.weight", "layers.1.q_proj.bias", "layers.1.o_proj.weight",
        "norm.weight",
    ]
    assert "inv_freq" not in names  # buffers are not checkpoint weights
    assert m.num_parameters() == 11 * 6 + 2 * (6 + 12 * 6 + 12 + 6 * 12) + 6
    assert m.layers[1].o_proj.weight.shape == (6, 12)
    assert len(m.layers) == 2


def test_reassigning_an_attribute_moves_it_between_kinds():
    m = Block(4)
    m.o_proj = ip.Tensor.zeros(2)  # a module slot replaced by a tensor becomes a parameter
    assert "o_proj" in dict(m.named_parameters())
    m.o_proj = 3  # and a plain value is neither
    assert "o_proj" not in dict(m.named_parameters()) and m.o_proj == 3


def test_load_weights_replaces_matching_tensors_without_copy_and_converts_others():
    m = Tiny()
    weights = {n: ip.Tensor.full(p.shape, 0.5, dtype=p.dtype) for n, p in m.named_parameters()}
    weights["norm.weight"] = ip.Tensor.full((6,), 2.0, dtype=ip.bfloat16)  # converted to float32
    loaded = m.load_weights(weights.items())
    assert loaded == set(weights)
    assert m.embed_tokens.weight is weights["embed_tokens.weight"]  # used in place
    assert m.norm.weight.dtype is ip.float32 and m.norm.weight.tolist() == [2.0] * 6


def test_load_weights_errors_name_the_weight():
    m = Tiny()
    good = {n: ip.Tensor.zeros(p.shape) for n, p in m.named_parameters()}
    with pytest.raises(KeyError, match="unexpected weight 'layers.0.k_proj.weight'"):
        m.load_weights(list(good.items()) + [("layers.0.k_proj.weight", ip.Tensor.zeros(1))])
    with pytest.raises(ValueError, match=r"'norm.weight' has shape \[7\], expected \[6\]"):
        m.load_weights({**good, "norm.weight": ip.Tensor.zeros(7)}.items())
    partial = {k: v for k, v in good.items() if k != "layers.1.o_proj.weight"}
    with pytest.raises(KeyError, match="missing weights: layers.1.o_proj.weight"):
        Tiny().load_weights(partial.items())
    assert Tiny().load_weights(partial.items(), strict=False) == set(partial)


def test_module_to_converts_float_parameters_and_buffers():
    m = Tiny().to(dtype=ip.bfloat16)
    assert {p.dtype for p in m.parameters()} == {ip.bfloat16}
    assert m.inv_freq.dtype is ip.bfloat16


@pytest.mark.parametrize("dtype", [ip.float32, ip.bfloat16])
def test_layers_match_torch(dtype, gen):
    dim, vocab, rows = 33, 50, 7
    tol = 1e-5 if dtype is ip.float32 else 2e-2
    lin = nn.Linear(dim, 17, bias=True, dtype=dtype)
    w, w_ref = randn(17, dim, dtype=dtype, gen=gen)
    b, b_ref = randn(17, dtype=dtype, gen=gen)
    lin.load_weights([("weight", w), ("bias", b)])
    x, x_ref = randn(rows, dim, gen=gen)
    got = to_torch(lin(x)).double()
    ref = torch.nn.functional.linear(x_ref, w_ref, b_ref)
    assert (got - ref).norm() / ref.norm() < tol

    emb = nn.Embedding(vocab, dim, dtype=dtype)
    table, table_ref = randn(vocab, dim, dtype=dtype, gen=gen)
    emb.load_weights([("weight", table)])
    ids = torch.randint(0, vocab, (9,), generator=gen)
    assert torch.equal(to_torch(emb(from_torch(ids))).double(), table_ref[ids])

    norm = nn.RMSNorm(dim, eps=1e-5, dtype=dtype)
    nw, nw_ref = randn(dim, dtype=dtype, gen=gen)
    norm.load_weights([("weight", nw)])
    ref = x_ref / torch.sqrt(x_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * nw_ref
    assert (to_torch(norm(x)).double() - ref).norm() / ref.norm() < 1e-5

    residual, res_ref = randn(rows, dim, gen=gen)
    h, h_ref = randn(rows, dim, gen=gen)
    out = norm(h, residual=residual)
    res_ref = res_ref + h_ref
    ref = res_ref / torch.sqrt(res_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * nw_ref
    assert (to_torch(residual).double() - res_ref).abs().max() < 1e-6
    assert (to_torch(out).double() - ref).norm() / ref.norm() < 1e-5
