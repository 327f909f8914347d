"""to_readback_start / wait / release and Tensor.tolist_async on CPU tensors: the values are those
tolist() gives (read when the start call returns), and bad handles and arguments are clear errors,
never crashes. The GPU side (reads that do not wait for later work, errors the GPU recorded) is in
tests/cuda/test_cuda_readback.py."""
import pytest
import torch

import inference_pio as ip
from inference_pio import ffi, lib
from inference_pio._lib import check

from helpers import TORCH_DTYPES, from_torch, on_cuda, strided


def random_tensor(shape, dtype, gen):
    if dtype.is_float:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 100
    else:
        info = torch.iinfo(TORCH_DTYPES[dtype])
        x = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64)
    return from_torch(x.to(TORCH_DTYPES[dtype]))


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES), ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(13,), (3, 7), (), (0,), (2, 0, 5)])
def test_tolist_async_equals_tolist(gen, dtype, shape):
    t = random_tensor(shape, dtype, gen)
    expected = t.tolist()
    read = t.tolist_async()
    t.fill_(0)  # a CPU tensor is read when the start returns
    assert read.result() == expected
    assert read.result() == expected  # the result is kept


def test_tolist_async_of_a_strided_view(gen):
    t = random_tensor((5, 9), ip.int64, gen)
    view = strided(t, "sliced")
    assert view.tolist_async().result() == t.tolist()
    assert t[1:4, ::3].tolist_async().result() == t[1:4, ::3].tolist()


def test_tolist_async_of_a_quantized_tensor(gen):
    q = ip.ops.quantize(random_tensor((2, 64), ip.float32, gen), "q8_0")
    assert q.tolist_async().result() == q.tolist()


def start(t):
    handle = ffi.new("void **")
    check(lib.to_readback_start(t._desc, handle))
    return handle[0]


def test_the_c_calls(gen):
    t = random_tensor((11,), ip.int32, gen)
    handle = start(t)
    dst = bytearray(44)
    with pytest.raises(ip.InvalidArgumentError, match="nbytes is 40 but the tensor read back has 44 bytes"):
        check(lib.to_readback_wait(handle, ffi.from_buffer(dst), 40))
    with pytest.raises(ip.InvalidArgumentError, match="dst is NULL"):
        check(lib.to_readback_wait(handle, ffi.NULL, 44))
    with pytest.raises(ip.InvalidArgumentError, match="negative nbytes"):
        check(lib.to_readback_wait(handle, ffi.from_buffer(dst), -1))
    check(lib.to_readback_wait(handle, ffi.from_buffer(dst), 44))  # the handle lived on
    assert bytes(dst) == bytes(t)
    with pytest.raises(ip.InvalidArgumentError, match="not a live handle"):
        check(lib.to_readback_wait(handle, ffi.from_buffer(dst), 44))  # waited for already
    with pytest.raises(ip.InvalidArgumentError, match="not a live handle"):
        check(lib.to_readback_release(handle))
    handle = start(t)
    check(lib.to_readback_release(handle))
    with pytest.raises(ip.InvalidArgumentError, match="not a live handle"):
        check(lib.to_readback_wait(handle, ffi.from_buffer(dst), 44))
    made_up = ffi.cast("void *", 0x1000)
    with pytest.raises(ip.InvalidArgumentError, match="not a live handle"):
        check(lib.to_readback_release(made_up))
    check(lib.to_readback_release(ffi.NULL))  # nothing to do


def test_start_refuses_bad_arguments(gen):
    t = random_tensor((4, 6), ip.float32, gen)
    handle = ffi.new("void **")
    with pytest.raises(ip.InvalidArgumentError, match="handle is NULL"):
        check(lib.to_readback_start(t._desc, ffi.NULL))
    with pytest.raises(ip.InvalidArgumentError, match="src must be contiguous"):
        check(lib.to_readback_start(t.transpose(0, 1)._desc, handle))
    assert handle[0] == ffi.NULL
    with pytest.raises(ip.TensorOpsError, match="to_readback_start"):
        check(lib.to_readback_start(ffi.NULL, handle))
    with pytest.raises(ip.DeviceError, match="to_readback_start"):
        check(lib.to_readback_start(on_cuda(t), handle))  # no GPU 63 anywhere
    assert handle[0] == ffi.NULL


def test_many_live_handles_in_any_order(gen):
    ts = [random_tensor((n,), ip.int64, gen) for n in range(1, 9)]
    reads = [t.tolist_async() for t in ts]
    for i in (3, 0, 7, 1, 6, 2, 5, 4):
        assert reads[i].result() == ts[i].tolist()
    unread = [t.tolist_async() for t in ts]
    for r in unread[::2]:
        r.release()
    assert [r.result() for r in unread[1::2]] == [t.tolist() for t in ts[1::2]]
