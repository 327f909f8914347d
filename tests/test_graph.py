"""OpGraph: a forward's library calls recorded once and replayed on rewritten inputs."""
import pytest
import torch

import inference_pio as ip
from inference_pio import LLM, SamplingParams, ops
from inference_pio.graph import OpGraph

from checkpoints import qwen3_model, save_hf
from helpers import from_torch, to_torch


def test_replay_follows_inputs_rewritten_in_place():
    gen = torch.Generator().manual_seed(0)
    x = from_torch(torch.randn(3, 16, generator=gen))
    w = from_torch(torch.randn(24, 16, generator=gen))
    norm = from_torch(torch.rand(24, generator=gen) + 0.5)

    def forward():
        h = ops.matmul(x, w)
        return ops.rms_norm(ops.silu_mul(h, h), norm, 1e-6)

    graph = OpGraph.capture(forward)
    assert len(graph) == 3
    first = to_torch(graph.output).clone()
    assert torch.equal(first, to_torch(forward()))
    x.copy_(from_torch(torch.randn(3, 16, generator=gen)))  # new input, same buffer
    assert torch.equal(to_torch(graph.replay()), to_torch(forward()))
    assert not torch.equal(to_torch(graph.output), first)


def test_capture_does_not_nest_and_restores_the_library():
    with pytest.raises(RuntimeError, match="do not nest"):
        OpGraph.capture(lambda: OpGraph.capture(lambda: None))
    assert ops.lib is ip.lib


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf(qwen3_model(num_key_value_heads=1), tmp_path_factory.mktemp("graph"))


def test_graph_decode_equals_eager(folder, device):
    """Sequences of different lengths finish at different steps, so the batch size (and the
    graph replayed) changes along the way; sampling draws are seeded per request. On a GPU the
    graph is a CUDA graph (one launch per step)."""
    prompts = [[7] * 3, [1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 4], [11] * 20]
    params = [SamplingParams(max_tokens=m, temperature=t, seed=s)
              for m, t, s in ((5, 0, None), (17, 0.8, 3), (9, 1.0, 4), (12, 0, None))]
    eager = LLM(folder, device=device, dtype="float32", enforce_eager=True).generate(prompts, params)
    llm = LLM(folder, device=device, dtype="float32")
    graphed = llm.generate(prompts, params)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert llm.engine.graphs is not None and len(llm.engine.graphs._graphs) >= 2
