"""GPU memory and copies (each op family's GPU kernels have their own tests in tests/cuda). Runs where a GPU is
visible (the lent H200 via `make test-gpu`); elsewhere each test skips, saying why."""
import gc

import pytest
import torch

import inference_pio as ip
from inference_pio import ops
from inference_pio.graph import CudaGraph
from helpers import FLOAT_DTYPES, from_torch, to_torch

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (ip.int8, ip.int32, ip.int64, ip.uint8))
def test_round_trip_host_device_host(dtype, gen):
    ref = (torch.randn(37, 129, generator=gen) * 50).to(torch.float32)
    x = from_torch(ref).to(dtype=dtype)
    back = x.to("cuda").to("cpu")
    assert back.dtype is dtype and back.device == "cpu"
    assert torch.equal(to_torch(back), to_torch(x))


def test_strided_and_converting_copies_go_through_the_host_side(gen):
    ref = torch.randn(8, 16, generator=gen)
    x = from_torch(ref)
    on_gpu = x.T.to("cuda", dtype=ip.bfloat16)  # transposed + converted before the transfer
    assert on_gpu.shape == (16, 8) and on_gpu.is_contiguous()
    assert torch.equal(to_torch(on_gpu.cpu()), ref.T.to(torch.bfloat16))


def test_caching_allocator_reuses_freed_blocks():
    gc.collect()  # blocks of earlier tests' garbage freed now, not between a and b
    a = ip.Tensor.empty(1 << 20, device="cuda")
    ptr = a.data_ptr()
    del a
    gc.collect()
    b = ip.Tensor.empty(1 << 20, device="cuda")
    assert b.data_ptr() == ptr


def test_bad_device_index_and_misplaced_sampling_parameters_are_clear_errors():
    with pytest.raises(ip.DeviceError, match="no GPU with index 99"):
        ip.Tensor.empty(4, device="cuda:99")
    # sampling on a GPU takes its parameters as CPU tensors (they travel in the launch)
    logits = ip.Tensor.zeros(2, 8, device="cuda")
    f = ip.Tensor.full((2,), 0.5, device="cuda")
    with pytest.raises(ip.DeviceError, match="temperature is on cuda:0 but the parameters must be CPU tensors"):
        ip.ops.sample(logits, f, ip.Tensor.zeros(2, dtype=ip.int32, device="cuda"), f, f, f)


def test_a_graph_dropped_while_another_records(gen):
    """A garbage collection can run in the middle of a recorded forward and drop an older graph:
    destroying it waits for the stream, which would invalidate the recording, so it is put off
    until the recording ends, and both graphs' work stays right."""
    ref = torch.randn(1000, generator=gen)
    x, y = from_torch(ref, "cuda"), ip.Tensor.empty(1000, device="cuda")
    old = CudaGraph.capture(lambda: ops.add(x, x, out=y), 0)
    old.replay()
    assert torch.equal(to_torch(y.cpu()), ref + ref)
    z = ip.Tensor.empty(1000, device="cuda")

    def forward():
        nonlocal old
        z.fill_(2.0)
        old = None  # the last reference: destroyed here, in the middle of the recording
        return ops.add(z, x, out=z)
    graph = CudaGraph.capture(forward, 0)
    assert torch.equal(to_torch(graph.replay().cpu()), ref + 2.0)
    assert torch.equal(to_torch(ip.Tensor.full((3,), 1.0, device="cuda").cpu()), torch.ones(3))


def test_a_failed_recording_leaves_the_next_ops_working(gen):
    """An op that waits for the GPU fails while a graph records (a copy to the host does); the
    recording ends with that error, and the error is not raised again by later ops."""
    x = from_torch(torch.randn(10, generator=gen), "cuda")
    y = ip.Tensor.empty(10, device="cuda")
    with pytest.raises(ip.CudaError, match="to_copy"):
        CudaGraph.capture(lambda: x.cpu(), 0)
    assert torch.equal(to_torch(ip.Tensor.full((3,), 1.0, device="cuda").cpu()), torch.ones(3))
    assert torch.equal(to_torch(y.copy_(x).cpu()), to_torch(x.cpu()))
