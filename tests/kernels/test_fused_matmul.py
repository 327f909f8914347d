"""to_matmul_add (out += x . w^T + bias), to_rms_norm_matmul (rms_norm(x) . w^T + bias) and
to_rms_norm_swiglu (silu(gate) * up of that product, gate and up interleaved): the decode step's
fused forms, checked against the separate ops they stand for, on the CPU and (the
`device` fixture) on a GPU.

- CPU: both are composed from the plain kernels through an f32 intermediate, so they equal
  to_matmul then to_add / to_rms_norm then to_matmul bit for bit.
- GPU, 9 to 64 rows against bf16 weights (K a multiple of 64): the batched product
  (csrc/cuda/gemm_skinny.cu) takes the norm inside too, staging x g in bf16 and scaling the dots
  by rinv, where the separate ops round the normalised x: within one bf16 rounding of them.
- GPU, few rows: one streaming-GEMV kernel. matmul_add forms acc + bias + old out in f32 and
  rounds once (the separate ops round the product first: equal for an f32 out, within one
  rounding of out's dtype otherwise). rms_norm_matmul computes rinv * sum_k w (x g) with rinv
  from x's sum of squares gathered in f32 while the dot products read x: the same function as
  the separate ops with other roundings, relative 1e-6. Many rows (or other dtypes): the
  separate GPU kernels, composed inside the op: the same bound.
- rms_norm_swiglu: the CPU and the GPU's many-row path compose rms_norm_matmul into an f32
  intermediate and silu_mul of its even and odd columns: bit for bit the separate ops. The GPU's
  few-row path applies the activation in the GEMV's epilogue to the f32 dots rms_norm_matmul's
  kernel forms (the same arithmetic as silu_mul): within rms_norm_matmul's bound.
- All, against the CPU's separate ops on the same values: f32 accumulation-order bounds; on a
  GPU, more than 8 rows against 16-bit weights take x rounded to that dtype (tensor cores).
"""
import pytest
import torch

import inference_pio as ip
from inference_pio import ops

from helpers import randn, to_torch


def rel(got, ref):
    got, ref = to_torch(got).double(), to_torch(ref).double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def cpu_bound(device, M, wdtype, f32_bound):
    """Relative distance allowed from the CPU's f32 result: more than 8 rows against 16-bit
    weights run on a GPU's tensor cores, which take x rounded to the weights' dtype."""
    if device != "cpu" and M > 8 and wdtype != ip.float32:
        return 2 ** -8 if wdtype == ip.bfloat16 else 2 ** -11
    return f32_bound


@pytest.mark.parametrize("M", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("wdtype", [ip.float32, ip.bfloat16, ip.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_add_equals_matmul_then_add(device, gen, M, wdtype, bias):
    K, N = 264, 136
    x, _ = randn(M, K, gen=gen)
    w, _ = randn(N, K, dtype=wdtype, gen=gen)
    b = randn(N, gen=gen)[0] if bias else None
    old, _ = randn(M, N, gen=gen)
    x, w, old = x.to(device), w.to(device), old.to(device)
    b = b.to(device) if b is not None else None
    want = ops.add(old, ops.matmul(x, w, b))
    out = old.clone()
    assert ops.matmul_add(out, x, w, b) is out
    assert to_torch(out).equal(to_torch(want))  # f32 out: the same two roundings everywhere
    cpu = ops.add(old.cpu(), ops.matmul(x.cpu(), w.cpu(), b.cpu() if b is not None else None))
    assert rel(out, cpu) <= cpu_bound(device, M, wdtype, 1e-6)


@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 33])
@pytest.mark.parametrize("wdtype", [ip.float32, ip.bfloat16, ip.float16])
@pytest.mark.parametrize("gdtype", [ip.float32, ip.bfloat16])
def test_rms_norm_matmul_equals_norm_then_matmul(device, gen, M, wdtype, gdtype):
    K, N = 1024, 200
    x, _ = randn(M, K, gen=gen, scale=3.0)
    g, _ = randn(K, dtype=gdtype, gen=gen)
    w, _ = randn(N, K, dtype=wdtype, gen=gen)
    x, g, w = x.to(device), g.to(device), w.to(device)
    got = ops.rms_norm_matmul(x, g, 1e-6, w)
    want = ops.matmul(ops.rms_norm(x, g, 1e-6), w)
    assert got.shape == (M, N) and got.dtype == ip.float32
    if device == "cpu":
        assert to_torch(got).equal(to_torch(want))
    elif M > 8 and wdtype == ip.bfloat16:  # the batched product stages x g in bf16, not rms_norm(x)
        assert rel(got, want) <= 2 ** -8
    else:
        assert rel(got, want) <= 1e-6
    cpu = ops.matmul(ops.rms_norm(x.cpu(), g.cpu(), 1e-6), w.cpu())
    assert rel(got, cpu) <= cpu_bound(device, M, wdtype, 1e-5)


def test_rms_norm_matmul_strided_rows_and_bias(device, gen):
    """x rows a slice of a wider buffer (row stride > K), bias, a bf16 out."""
    M, K, N = 3, 512, 96
    wide, _ = randn(M, 2 * K, gen=gen)
    x = wide.to(device).narrow(1, K, K)
    g, _ = randn(K, gen=gen)
    w, _ = randn(N, K, dtype=ip.bfloat16, gen=gen)
    b, _ = randn(N, gen=gen)
    g, w, b = g.to(device), w.to(device), b.to(device)
    out = ip.Tensor.empty(M, N, dtype=ip.bfloat16, device=device)
    ops.rms_norm_matmul(x, g, 1e-5, w, b, out=out)
    want = ops.matmul(ops.rms_norm(x.contiguous(), g, 1e-5), w, b)
    assert rel(out, want) <= 2 ** -8


def swiglu_reference(x, g, eps, w, b=None):
    """rms_norm_matmul, then silu_mul of the even (gate) and odd (up) columns."""
    p = ops.rms_norm_matmul(x, g, eps, w, b)
    half = p.shape[1] // 2
    pairs = p.unflatten(1, (half, 2))  # [M, half, 2]: gate at [:, i, 0], up at [:, i, 1]
    return ops.silu_mul(pairs.narrow(2, 0, 1).reshape(p.shape[0], half), pairs.narrow(2, 1, 1).reshape(p.shape[0], half))


@pytest.mark.parametrize("M", [1, 2, 7, 9, 20])
@pytest.mark.parametrize("wdtype", [ip.float32, ip.bfloat16, ip.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_rms_norm_swiglu_equals_the_separate_ops(device, gen, M, wdtype, bias):
    K, N = 520, 2 * 77  # odd number of row pairs; K a multiple of 8 but not of 256
    x, _ = randn(M, K, gen=gen, scale=2.0)
    g, _ = randn(K, dtype=ip.bfloat16, gen=gen)
    w, _ = randn(N, K, dtype=wdtype, gen=gen)
    b = randn(N, gen=gen)[0].to(device) if bias else None
    x, g, w = x.to(device), g.to(device), w.to(device)
    got = ops.rms_norm_swiglu(x, g, 1e-6, w, b)
    want = swiglu_reference(x, g, 1e-6, w, b)
    assert got.shape == (M, N // 2) and got.dtype == ip.float32
    if device == "cpu" or M > 8:
        assert to_torch(got).equal(to_torch(want))
    else:
        assert rel(got, want) <= 1e-6
    cpu = swiglu_reference(x.cpu(), g.cpu(), 1e-6, w.cpu(), b.cpu() if b is not None else None)
    assert rel(got, cpu) <= cpu_bound(device, M, wdtype, 1e-5)


def test_rms_norm_swiglu_bf16_out_and_interleaved_linear(device, gen):
    """Linear.interleave builds the fused weight from gate and up; out may be bf16."""
    M, K, I = 2, 256, 48
    x, _ = randn(M, K, gen=gen)
    g, _ = randn(K, gen=gen)
    gate, up = ip.nn.Linear(K, I, dtype=ip.bfloat16), ip.nn.Linear(K, I, dtype=ip.bfloat16)
    gate.weight, up.weight = randn(I, K, dtype=ip.bfloat16, gen=gen)[0], randn(I, K, dtype=ip.bfloat16, gen=gen)[0]
    if device != "cpu":
        gate, up = gate.to(device), up.to(device)
    fused = ip.nn.Linear.interleave([gate, up])
    assert to_torch(fused.weight)[0::2].equal(to_torch(gate.weight)) and to_torch(fused.weight)[1::2].equal(to_torch(up.weight))
    x, g = x.to(device), g.to(device)
    out = ip.Tensor.empty(M, I, dtype=ip.bfloat16, device=device)
    ops.rms_norm_swiglu(x, g, 1e-5, fused.weight, out=out)
    normed = ops.rms_norm(x, g, 1e-5)
    want = ops.silu_mul(ops.matmul(normed, gate.weight), ops.matmul(normed, up.weight))
    assert rel(out, want) <= 2 ** -8


def test_errors_are_clear(device, gen):
    x = ip.Tensor.zeros(2, 8, device=device)
    w = ip.Tensor.zeros(4, 8, device=device)
    with pytest.raises(ip.ShapeError, match="to_rms_norm_matmul: weight has shape \\[7\\]"):
        ops.rms_norm_matmul(x, ip.Tensor.zeros(7, device=device), 1e-6, w)
    with pytest.raises(ip.InvalidArgumentError, match="to_rms_norm_matmul: eps must be finite"):
        ops.rms_norm_matmul(x, ip.Tensor.zeros(8, device=device), -1.0, w)
    with pytest.raises(ip.ShapeError, match="to_matmul_add: out has shape \\[2, 5\\]"):
        ops.matmul_add(ip.Tensor.zeros(2, 5, device=device), x, w)
    with pytest.raises(ip.ShapeError, match="to_matmul_add: x is \\[2, 8\\] but w is \\[4, 9\\]"):
        ops.matmul_add(ip.Tensor.zeros(2, 4, device=device), x, ip.Tensor.zeros(4, 9, device=device))
    g = ip.Tensor.zeros(8, device=device)
    with pytest.raises(ip.ShapeError, match="to_rms_norm_swiglu: w has N = 5 rows, but its rows must pair"):
        ops.rms_norm_swiglu(x, g, 1e-6, ip.Tensor.zeros(5, 8, device=device), out=ip.Tensor.zeros(2, 2, device=device))
    with pytest.raises(ip.ShapeError, match="to_rms_norm_swiglu: out has shape \\[2, 4\\], expected \\[M, N / 2\\]"):
        ops.rms_norm_swiglu(x, g, 1e-6, w, out=ip.Tensor.zeros(2, 4, device=device))
