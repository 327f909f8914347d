"""Asynchronous reads of GPU results (to_readback_*, Tensor.tolist_async): the copy is queued on
the GPU's stream behind the work before it, so later work (the next decode step) neither waits
for it nor changes what it reads; its wait raises an error a GPU kernel recorded before the copy
(a bad index, a bad logits row in to_sample), and every error is raised once, whichever of the
reads and synchronising calls comes to it first."""
import math

import pytest
import torch

import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import check
from inference_pio.graph import CudaGraph

from helpers import TORCH_DTYPES, from_torch, to_torch

pytestmark = pytest.mark.skipif(ip.cuda_device_count() == 0,
                                reason="no GPU visible (CUDA not built in, or no driver/device)")


def random_tensor(shape, dtype, gen, device="cuda"):
    if dtype.is_float:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
    else:
        info = torch.iinfo(TORCH_DTYPES[dtype])
        x = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64)
    return from_torch(x.to(TORCH_DTYPES[dtype]), device)


def ints(values, dtype=torch.int64):
    return from_torch(torch.tensor(values, dtype=dtype), "cuda")


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES), ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(1,), (13,), (3, 7), (), (0,), (5000,)])  # 5000: past the first pinned size
def test_read_equals_tolist(gen, dtype, shape):
    t = random_tensor(shape, dtype, gen)
    assert t.tolist_async().result() == t.cpu().tolist()


def test_later_work_does_not_change_the_read(gen):
    """Work queued after the start (here, writes to the very tensor read, and a large product)
    runs after the copy."""
    x = random_tensor((257,), ip.int64, gen)
    expected = to_torch(x).tolist()
    read = x.tolist_async()
    x.fill_(7)
    a = random_tensor((512, 512), ip.float32, gen)
    for _ in range(8):
        a = ops.scale(ops.matmul(a, a), 1e-4)  # shrinks: no overflow
    assert read.result() == expected
    assert x.tolist() == [7] * 257


def test_many_reads_in_flight_in_any_order(gen):
    ts = [random_tensor((n,), ip.int32, gen) for n in (1, 9, 100, 2000, 3)]
    expected = [t.cpu().tolist() for t in ts]
    reads = [t.tolist_async() for t in ts]
    for t in ts:
        t.fill_(0)
    for i in (3, 0, 4, 2, 1):
        assert reads[i].result() == expected[i]
    # released unread, then the pool's reads are used again
    for r in [t.tolist_async() for t in ts]:
        r.release()
    assert [t.tolist_async().result() for t in ts] == [[0] * len(e) for e in expected]


def bad_embedding(gen):
    """Queues a lookup of a bad id (recorded on the GPU, not raised)."""
    table = from_torch(torch.randn(10, 6, generator=gen), "cuda")
    return ops.embedding(table, ints([3, 99]))


def test_error_before_the_start_is_raised_by_its_wait(gen):
    out = bad_embedding(gen)
    read = out.tolist_async()
    with pytest.raises(ip.BoundsError, match=r"to_embedding: ids\[1\] = 99 is outside \[0, 10\)"):
        read.result()
    with pytest.raises(ip.BoundsError):  # the read keeps its error
        read.result()
    check(ip.lib.to_cuda_synchronize(0))  # raised once
    assert len(out.tolist_async().result()) == 2


def test_error_after_the_start_is_raised_by_the_next_wait(gen):
    x = ints([1, 2, 3])
    read = x.tolist_async()
    bad_embedding(gen)  # queued after the read's copy
    assert read.result() == [1, 2, 3]
    with pytest.raises(ip.BoundsError, match=r"ids\[1\] = 99"):
        x.tolist_async().result()
    assert x.tolist_async().result() == [1, 2, 3]


def test_each_error_is_raised_once(gen):
    x = ints([4, 5])
    bad_embedding(gen)
    first, second = x.tolist_async(), x.tolist_async()  # both copies see the error
    with pytest.raises(ip.BoundsError):
        first.result()
    assert second.result() == [4, 5]
    assert x.tolist() == [4, 5]
    # a synchronising copy that comes to it first raises it; the read started before does not
    bad_embedding(gen)
    read = x.tolist_async()
    with pytest.raises(ip.BoundsError):
        x.cpu()
    assert read.result() == [4, 5]


def test_released_read_leaves_its_error_for_later(gen):
    x = ints([6])
    bad_embedding(gen)
    x.tolist_async().release()
    with pytest.raises(ip.BoundsError, match=r"ids\[1\] = 99"):
        check(ip.lib.to_cuda_synchronize(0))


def test_bad_logits_row_is_raised_by_the_read_of_the_ids():
    rows = [[0.0, 1.0, 2.0], [0.0, math.nan, 1.0], [3.0, 1.0, 0.0]]
    logits = ip.tensor(rows).to("cuda")
    params = [ip.tensor(v, dtype=d) for v, d in (([1.0] * 3, ip.float32), ([0] * 3, ip.int32),
                                                ([1.0] * 3, ip.float32), ([0.0] * 3, ip.float32),
                                                ([0.5] * 3, ip.float32))]
    ids = ops.sample(logits, *params)
    read = ids.tolist_async()
    with pytest.raises(ip.InvalidArgumentError, match="to_sample: logits row 1 holds NaN"):
        read.result()
    assert ids.tolist()[1] == -1  # raised once; the bad row's id is -1


def test_no_read_while_recording_a_graph(gen):
    x = random_tensor((8,), ip.int64, gen)
    with pytest.raises(ip.InvalidArgumentError, match="cuda:0 is recording a graph"):
        CudaGraph.capture(lambda: (x.fill_(1), x.tolist_async()), 0)
    assert x.tolist_async().result() == x.cpu().tolist()
