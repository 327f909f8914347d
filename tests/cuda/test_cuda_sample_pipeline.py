"""to_sample_pipeline on a GPU (csrc/cuda/sample.cu) against the CPU on the same inputs.

The GPU runs the CPU's operations: the processors in the same float32 operations and order
(process_kernel), e = exp(-w) by the CPU's polynomial bit for bit, the same integer masses, the
same prefixes (top_k's ties included), typical_p's centre from the same exact 128-bit sums and
its threshold as the same order statistic, the same double comparisons. So the ids and the
processed rows must be identical (processed values bit for bit, -inf where the CPU drops a
token). Logprobs are sums of exponentials in another order: within 2e-6 of the CPU's.
The CPU itself is checked against transformers in tests/kernels/test_sample_pipeline.py.
"""
import math

import pytest
import torch

import inference_pio as ip
from inference_pio import ops

from helpers import FLOAT_DTYPES, to_torch
from kernels.test_sample_pipeline import Row, draw_rows, keep_a_token, make_logits, tensors

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")

V_QWEN = 151936


def both(x, rows, **kw):
    """The op on the CPU (x) and on the GPU (a copy of x): the two SampleResults."""
    args, opt = tensors(rows)
    return (ops.sample_pipeline(x, *args, **opt, **kw), ops.sample_pipeline(x.to("cuda"), *args, **opt, **kw))


def check_same(cpu, gpu):
    assert gpu.ids.tolist() == cpu.ids.tolist()
    if cpu.processed is not None:
        a, b = to_torch(cpu.processed), to_torch(gpu.processed.cpu())
        assert torch.equal(a, b), f"processed rows differ at {(a != b).nonzero()[:5].tolist()}"
    if cpu.logprobs is not None:
        a, b = torch.tensor(cpu.logprobs.tolist()), torch.tensor(gpu.logprobs.tolist())
        assert torch.allclose(a, b, rtol=2e-6, atol=2e-6)
    if cpu.top_ids is not None:
        assert gpu.top_ids.tolist() == cpu.top_ids.tolist()
        a, b = torch.tensor(cpu.top_logprobs.tolist()), torch.tensor(gpu.top_logprobs.tolist())
        assert torch.allclose(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("B", [1, 33])
@pytest.mark.parametrize("V", [7, 1000, 4096, V_QWEN])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("kind", ["randn", "ties", "neginf"])
def test_gpu_matches_cpu(gen, dtype, V, B, kind):
    """Processors, warpers (typical_p and top_k's ties included), greedy rows mixed in, logprobs."""
    x = make_logits(B, V, dtype, gen, kind)
    rows = draw_rows(gen, V, B)
    rows[::4] = draw_rows(gen, V, len(rows[::4]), sampled=False)
    keep_a_token(rows, V)
    cpu, gpu = both(x, rows, processed=True, logprobs=True, num_top=min(V, 5))
    check_same(cpu, gpu)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: d.name)
def test_warpers_only_and_plain(gen, dtype):
    """No processor (the raw logits go to sample_kernel directly), and to_sample itself."""
    B, V = 40, 5000
    x = make_logits(B, V, dtype, gen)
    rows = draw_rows(gen, V, B, processors=False)
    check_same(*both(x, rows, processed=True))
    for r in rows:
        r.typical_p = 1.0
    args, _ = tensors(rows)
    assert ops.sample(x.to("cuda"), *args).tolist() == ops.sample(x, *args).tolist()


def test_typical_on_both_paths(gen):
    """typical_p after each filter, rows long enough for many radix passes."""
    V = V_QWEN
    x = make_logits(8, V, ip.float32, gen)
    base = [dict(), dict(top_k=50), dict(top_k=5000), dict(top_p=0.9), dict(min_p=0.01),
            dict(top_k=200, top_p=0.8), dict(temperature=0.6), dict(temperature=1.5)]
    rows = [Row(**dict(dict(temperature=1.0, typical_p=0.2 + 0.09 * i, uniform=0.37), **b)) for i, b in enumerate(base)]
    check_same(*both(x, rows, processed=True))


def test_many_rows_span_launches(gen):
    """More rows than one launch carries, with processors."""
    B, V = 200, 300
    x = make_logits(B, V, ip.bfloat16, gen)
    rows = keep_a_token(draw_rows(gen, V, B), V)
    check_same(*both(x, rows, processed=True, logprobs=True))


def test_long_histories(gen):
    """Histories of thousands of tokens with many repeats (the counters' atomics), every penalty."""
    B, V = 6, V_QWEN
    x = make_logits(B, V, ip.bfloat16, gen)
    rows = []
    for r in range(B):
        hist = torch.randint(0, 3000, (4000,), generator=gen).tolist()
        rows.append(Row(temperature=[0.0, 1.0][r % 2], top_p=0.9, rep=1.2, presence=0.5, frequency=0.3,
                        ngram=[0, 1, 2, 3, 4, 2][r], history=hist, prompt_len=1000, uniform=0.6))
    check_same(*both(x, rows, processed=True, logprobs=True, num_top=3))


def test_bad_rows_raise_at_the_next_synchronisation():
    x = ip.tensor([[0.0, 1.0, 2.0]] * 3).to("cuda")
    args, kw = tensors([Row(), Row(bias=[(0, -math.inf), (1, -math.inf), (2, -math.inf)]), Row()])
    res = ops.sample_pipeline(x, *args, **kw)
    with pytest.raises(ip.InvalidArgumentError, match=r"to_sample_pipeline: logits row 1 is all -inf after its "
                       r"processors .*\(found on the GPU"):
        res.ids.tolist()
    assert res.ids.tolist()[1] == -1
    # the raw row is reported as such; only row 0 is bad (of several bad rows the GPU reports the
    # first to be found, which depends on the blocks' timing)
    bad = ip.tensor([[0.0, math.nan, 1.0], [0.0, 1.0, 2.0]]).to("cuda")
    args, kw = tensors([Row(bias=[(1, 1.0)]), Row()])
    res = ops.sample_pipeline(bad, *args, **kw)
    with pytest.raises(ip.InvalidArgumentError, match=r"to_sample_pipeline: logits row 0 holds NaN \(found on the GPU"):
        res.ids.tolist()


def test_parameters_stay_on_the_host():
    x = ip.Tensor.zeros(2, 5, device="cuda")
    args, kw = tensors([Row(), Row()])
    kw["history"] = kw["history"].to("cuda")
    with pytest.raises(ip.DeviceError, match="to_sample_pipeline: history is on cuda:0 but the parameters must be CPU"):
        ops.sample_pipeline(x, *args, **kw)


def test_engine_on_gpu_matches_cpu(gen, tmp_path):
    """Greedy generation with processors and logprobs through LLM: the CPU's tokens, logprobs
    within 1e-4 (the two devices' f32 logits differ in their last bits)."""
    from checkpoints import qwen3_model, save_hf
    from inference_pio import LLM, SamplingParams
    folder = save_hf(qwen3_model(seed=4), tmp_path)
    prompts = [[5, 9, 14], [100, 3], [42] * 7]
    params = [SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3, logprobs=3),
              SamplingParams(max_tokens=12, temperature=0, no_repeat_ngram_size=2, presence_penalty=0.5),
              SamplingParams(max_tokens=12, temperature=0, logit_bias={7: 3.0}, min_tokens=4, logprobs=0)]
    outs = {d: LLM(folder, device=d, dtype="float32").generate(prompts, params) for d in ("cpu", "cuda")}
    for a, b in zip(outs["cpu"], outs["cuda"]):
        assert a.token_ids == b.token_ids
        if a.logprobs is not None:
            for x, y in zip(a.logprobs, b.logprobs):
                assert list(x) == list(y) and all(abs(x[t] - y[t]) < 1e-4 for t in x)
