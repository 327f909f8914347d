"""The Python Tensor layer (python/inference_pio/tensor.py): construction, borrowing buffers
without copying, views that share memory, the buffer protocol, conversion, and the errors for
shapes, indices and read-only data. Plain-Python references only: these are bookkeeping checks."""
import array
import gc
import struct

import pytest

import inference_pio as ip


def addr(t):
    return t.data_ptr()


# ---- construction ----

def test_tensor_from_nested_lists():
    t = ip.tensor([[1, 2, 3], [4, 5, 6]])
    assert t.shape == (2, 3) and t.dtype is ip.int64 and t.strides == (3, 1)
    assert t.tolist() == [[1, 2, 3], [4, 5, 6]]
    f = ip.tensor([[1, 2.5], (3, 4)])  # tuples too; any float makes it float32
    assert f.dtype is ip.float32 and f.tolist() == [[1.0, 2.5], [3.0, 4.0]]
    s = ip.tensor(3.5)
    assert s.shape == () and s.ndim == 0 and s.item() == 3.5 and s.tolist() == 3.5
    assert ip.tensor([]).shape == (0,) and ip.tensor([]).tolist() == []
    assert ip.tensor([[], []]).shape == (2, 0) and ip.tensor([[], []]).tolist() == [[], []]
    assert ip.tensor([[[1], [2]]]).shape == (1, 2, 1)


@pytest.mark.parametrize("dtype", [ip.float32, ip.float16, ip.bfloat16, ip.int8, ip.int32, ip.int64, ip.uint8])
def test_tensor_every_dtype(dtype):
    values = [[0, 1, 2], [3, 100, 7]]
    t = ip.tensor(values, dtype=dtype)
    assert t.dtype is dtype and t.element_size() == dtype.itemsize and t.nbytes == 6 * dtype.itemsize
    assert t.tolist() == values  # small integers are exact in every dtype
    by_name = ip.tensor(values, dtype=dtype.name)
    assert by_name.dtype is dtype and by_name.tolist() == values


def test_tensor_conversions_on_construction():
    assert ip.tensor([1.1], dtype=ip.bfloat16).tolist() == [1.1015625]  # rounded to bf16
    assert ip.tensor([300, -300], dtype=ip.int8).tolist() == [127, -128]  # saturates
    assert ip.tensor([1.0, 2.0], dtype="half").dtype is ip.float16
    copy = ip.tensor(ip.tensor([1, 2]), dtype=ip.float32)  # from a Tensor: a converted copy
    assert copy.dtype is ip.float32 and copy.tolist() == [1.0, 2.0]


def test_tensor_construction_errors():
    with pytest.raises(ValueError, match="ragged"):
        ip.tensor([[1, 2], [3]])
    with pytest.raises(ValueError, match="ragged"):
        ip.tensor([[1, 2], 3])
    with pytest.raises(TypeError, match="float values given for integer dtype int32"):
        ip.tensor([1.5], dtype=ip.int32)
    with pytest.raises(TypeError, match="cannot make a int64 tensor"):
        ip.tensor([2 ** 63])
    with pytest.raises(TypeError, match="unknown dtype 'float8'"):
        ip.tensor([1.0], dtype="float8")
    with pytest.raises(ValueError, match="negative dimension"):
        ip.Tensor.empty(2, -1)
    with pytest.raises(ValueError, match="negative dimension"):
        ip.Tensor.zeros((3, -2))
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        ip.Tensor.empty(2, device="gpu")


def test_ragged_scalar_then_list():
    for data in ([1, [2]], [[1], [[2]]], [[1, 2], [3, [4]]], [[[1]], [2]]):
        with pytest.raises(ValueError, match="ragged"):
            ip.tensor(data)


def test_empty_zeros_full():
    e = ip.Tensor.empty(2, 3, dtype=ip.int32)
    assert e.shape == (2, 3) and e.is_contiguous() and e.device == "cpu" and not e.is_cuda
    assert ip.Tensor.zeros((2, 2), dtype=ip.bfloat16).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert ip.Tensor.full((3,), 2.5, dtype=ip.float16).tolist() == [2.5] * 3
    assert ip.Tensor.full((), 7, dtype=ip.uint8).item() == 7
    assert ip.Tensor.empty(0, 5).numel() == 0
    assert addr(ip.Tensor.empty(1000)) % 64 == 0  # host memory is 64-byte aligned


def test_facts_and_repr():
    t = ip.tensor([[1, 2], [3, 4], [5, 6]], dtype=ip.int8)
    assert (t.ndim, t.numel(), t.nbytes, len(t), t.size(), t.size(-1), t.size(0)) == (2, 6, 6, 3, (3, 2), 2, 3)
    assert repr(t) == "Tensor(shape=[3, 2], dtype=int8, device=cpu, data=[[1, 2], [3, 4], [5, 6]])"
    assert repr(ip.Tensor.zeros(5, 5)) == "Tensor(shape=[5, 5], dtype=float32, device=cpu)"
    with pytest.raises(TypeError, match="len\\(\\) of a 0-d tensor"):
        len(ip.tensor(1.0))
    with pytest.raises(IndexError, match="dimension 2 out of range"):
        t.size(2)


# ---- borrowed buffers ----

def test_frombuffer_is_zero_copy():
    buf = bytearray(struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
    t = ip.Tensor.frombuffer(buf, ip.float32)
    assert t.shape == (4,) and not t.readonly and t.tolist() == [1.0, 2.0, 3.0, 4.0]
    buf[0:4] = struct.pack("<f", 9.0)  # the tensor sees writes to the buffer...
    assert t.tolist()[0] == 9.0
    t[1:3].fill_(-1.0)  # ...and the buffer sees writes through the tensor
    assert struct.unpack("<4f", buf) == (9.0, -1.0, -1.0, 4.0)
    with pytest.raises(BufferError):  # the buffer is exported while the tensor lives
        buf.extend(b"0000")


def test_frombuffer_shape_offset_and_other_buffers():
    buf = bytearray(range(32))
    t = ip.Tensor.frombuffer(buf, ip.uint8, shape=(2, 3), offset=4)
    assert t.tolist() == [[4, 5, 6], [7, 8, 9]]
    a = array.array("i", [10, 20, 30])
    ta = ip.Tensor.frombuffer(a, ip.int32)
    ta[0] = 11
    assert a[0] == 11
    mv = memoryview(bytearray(16))[4:]
    assert ip.Tensor.frombuffer(mv, ip.int32).shape == (3,)
    assert ip.Tensor.frombuffer(bytearray(0), ip.float32).shape == (0,)


def test_frombuffer_keeps_the_buffer_alive():
    t = ip.Tensor.frombuffer(bytearray(struct.pack("<2q", 5, 6)), ip.int64)
    gc.collect()  # the bytearray has no other reference
    assert t.tolist() == [5, 6]


def test_frombuffer_read_only():
    data = struct.pack("<3i", 1, 2, 3)
    t = ip.Tensor.frombuffer(data, ip.int32)
    assert t.readonly and t.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="read-only"):
        t.fill_(0)
    with pytest.raises(ValueError, match="read-only"):
        t[0] = 5
    with pytest.raises(ValueError, match="read-only"):
        t.copy_(ip.tensor([0, 0, 0], dtype=ip.int32))
    assert t[1:].readonly  # views of it too
    m = memoryview(t)
    assert m.readonly
    with pytest.raises(TypeError):
        m[0] = 9
    c = t.clone()  # a copy is writable
    c.fill_(0)
    assert not c.readonly and c.tolist() == [0, 0, 0] and t.tolist() == [1, 2, 3]
    w = ip.Tensor.frombuffer(data, ip.int32, copy=True)
    assert not w.readonly and addr(w) != addr(t)


def test_frombuffer_errors():
    with pytest.raises(ValueError, match="not a whole number of float32 elements"):
        ip.Tensor.frombuffer(bytearray(6), ip.float32)
    with pytest.raises(ValueError, match=r"shape \(2, 2\) of float32 needs 16 bytes, the buffer has 12"):
        ip.Tensor.frombuffer(bytearray(12), ip.float32, shape=(2, 2))
    with pytest.raises(ValueError, match="offset 20 outside a buffer of 16 bytes"):
        ip.Tensor.frombuffer(bytearray(16), ip.uint8, offset=20)
    with pytest.raises(ValueError, match="offset -1 outside"):
        ip.Tensor.frombuffer(bytearray(16), ip.uint8, offset=-1)
    with pytest.raises(ValueError, match="needs 8 bytes, the buffer has 4"):
        ip.Tensor.frombuffer(bytearray(8), ip.int32, shape=(2,), offset=4)
    with pytest.raises(BufferError):
        ip.Tensor.frombuffer(memoryview(bytearray(32))[::2], ip.uint8)  # not contiguous


# ---- views share memory ----

def base_3x4(dtype=ip.int32):
    return ip.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], dtype=dtype)


def test_reshape_and_view_share_memory():
    t = base_3x4()
    v = t.view(2, 6)
    assert v.shape == (2, 6) and addr(v) == addr(t)
    v[1, 0] = 100  # element 6 of the flat data
    assert t.tolist()[1][2] == 100
    assert t.view(-1, 3).shape == (4, 3) and t.reshape(12).strides == (1,) and t.flatten().shape == (12,)
    assert addr(t.reshape(4, 3)) == addr(t)
    nc = t.T
    r = nc.reshape(12)  # not contiguous: reshape copies
    assert r.tolist() == [0, 4, 8, 1, 5, 9, 2, 100, 10, 3, 7, 11] and addr(r) != addr(t)
    with pytest.raises(ValueError, match="view\\(\\) needs a contiguous tensor"):
        nc.view(12)
    with pytest.raises(ValueError, match="cannot reshape"):
        t.view(5, -1)
    with pytest.raises(ValueError, match=r"cannot reshape \[3, 4\] \(12 elements\) into \[5, 2\]"):
        t.reshape(5, 2)
    with pytest.raises(ValueError, match="only one dimension can be -1"):
        t.view(-1, -1)


def test_transpose_permute_share_memory():
    t = base_3x4()
    tt = t.T
    assert tt.shape == (4, 3) and tt.strides == (1, 4) and addr(tt) == addr(t) and not tt.is_contiguous()
    assert tt.tolist() == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    tt[3, 0] = -3
    assert t.tolist()[0][3] == -3
    c = ip.Tensor.zeros(2, 3, 4)
    p = c.permute(2, 0, 1)
    assert p.shape == (4, 2, 3) and p.strides == (1, 12, 4) and addr(p) == addr(c)
    assert c.permute((1, 2, 0)).shape == (3, 4, 2) and c.transpose(0, -1).shape == (4, 3, 2)
    with pytest.raises(ValueError, match="is not a permutation"):
        c.permute(0, 0, 1)
    with pytest.raises(IndexError, match="dimension 3 out of range"):
        c.transpose(0, 3)
    with pytest.raises(ValueError, match="T needs a 2-d tensor"):
        c.T


def test_slicing_shares_memory():
    t = base_3x4()
    s = t[1:, ::2]
    assert s.shape == (2, 2) and s.strides == (4, 2) and s.tolist() == [[4, 6], [8, 10]]
    assert addr(s) == addr(t) + 4 * 4
    s.fill_(0)
    assert t.tolist() == [[0, 1, 2, 3], [0, 5, 0, 7], [0, 9, 0, 11]]
    assert t[-1].tolist() == [0, 9, 0, 11] and t[0, -1].item() == 3 and t[:, 1].tolist() == [1, 5, 9]
    assert t[..., 1].tolist() == [1, 5, 9] and t[1, ...].tolist() == [0, 5, 0, 7]
    assert t[None].shape == (1, 3, 4) and t[:, None, 1].shape == (3, 1)
    assert t[1:1].shape == (0, 4) and t[5:].shape == (0, 4) and t[:, 10:].tolist() == [[], [], []]
    assert t[::2, 1:3].tolist() == [[1, 2], [9, 0]]
    with pytest.raises(IndexError, match="index 3 out of range for dimension 0 of size 3"):
        t[3]
    with pytest.raises(IndexError, match="index -5 out of range for dimension 1"):
        t[0, -5]
    with pytest.raises(IndexError, match="too many indices"):
        t[0, 0, 0]
    with pytest.raises(IndexError, match="only one Ellipsis"):
        t[..., ...]
    with pytest.raises(ValueError, match="positive step"):
        t[::-1]


def test_unflatten_of_a_column_slice_is_a_view():
    t = base_3x4()
    u = t.narrow(1, 0, 4).unflatten(1, (2, 2))
    assert u.shape == (3, 2, 2) and u.strides == (4, 2, 1) and addr(u) == addr(t)
    v = t.narrow(1, 2, 2).unflatten(1, (1, 2))  # a strided view, as q/k/v of a fused product
    assert v.shape == (3, 1, 2) and v.strides == (4, 2, 1) and addr(v) == addr(t) + 8
    assert v.tolist() == [[[2, 3]], [[6, 7]], [[10, 11]]]
    assert t.unflatten(-1, (4,)).shape == (3, 4)
    with pytest.raises(ValueError, match="unflatten"):
        t.unflatten(1, (3, 2))


def test_narrow_unsqueeze_squeeze_share_memory():
    t = base_3x4()
    n = t.narrow(1, 1, 2)
    assert n.tolist() == [[1, 2], [5, 6], [9, 10]] and addr(n) == addr(t) + 4
    n[0, 0] = 50
    assert t.tolist()[0][1] == 50
    u = t.unsqueeze(1)
    assert u.shape == (3, 1, 4) and addr(u) == addr(t)
    assert t.unsqueeze(-1).shape == (3, 4, 1) and t.unsqueeze(0).shape == (1, 3, 4)
    sq = u.squeeze(1)
    assert sq.shape == (3, 4) and sq.strides == (4, 1)
    sq[2, 3] = 77
    assert t.tolist()[2][3] == 77
    assert ip.tensor(5).unsqueeze(0).shape == (1,)
    with pytest.raises(IndexError, match="narrow"):
        t.narrow(0, 2, 2)
    with pytest.raises(IndexError, match="unsqueeze dimension out of range"):
        t.unsqueeze(3)
    with pytest.raises(ValueError, match="cannot squeeze dimension 0 of size 3"):
        t.squeeze(0)


def test_expand_is_a_stride_0_view():
    row = ip.tensor([[1, 2, 3]], dtype=ip.int32)
    e = row.expand(4, 3)
    assert e.shape == (4, 3) and e.strides == (0, 1) and addr(e) == addr(row)
    assert e.tolist() == [[1, 2, 3]] * 4
    row[0, 1] = 20
    assert e.tolist() == [[1, 20, 3]] * 4  # one element seen four times
    assert row.expand(-1, 3).shape == (1, 3) and row.expand(2, 4, 3).strides == (0, 0, 1)
    assert ip.tensor(7).expand(3).tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match=r"cannot expand \[1, 3\] to \[2, 4\]"):
        row.expand(2, 4)
    with pytest.raises(ValueError, match="fewer dimensions"):
        row.expand(3)
    with pytest.raises(ValueError, match="-1 is not allowed for a new leading dimension"):
        row.expand(-1, 1, 3)


def test_views_keep_storage_alive():
    t = ip.Tensor.full((1000,), 3.0)
    v = t[10:20]
    del t
    gc.collect()
    assert v.tolist() == [3.0] * 10


def test_clone_contiguous_are_copies():
    t = base_3x4()
    assert t.contiguous() is t
    c = t.clone()
    c.fill_(0)
    assert t.tolist()[1] == [4, 5, 6, 7]
    tc = t.T.contiguous()
    assert tc.is_contiguous() and tc.strides == (3, 1) and tc.tolist() == t.T.tolist() and addr(tc) != addr(t)


# ---- buffer protocol ----

def test_memoryview_of_contiguous():
    t = ip.tensor([[1.5, 2.5], [3.5, 4.5]], dtype=ip.float32)
    m = memoryview(t)
    assert (m.format, m.itemsize, m.ndim, m.shape, m.strides, m.readonly) == ("f", 4, 2, (2, 2), (8, 4), False)
    assert m.c_contiguous and m.tolist() == [[1.5, 2.5], [3.5, 4.5]]
    assert bytes(t) == struct.pack("<4f", 1.5, 2.5, 3.5, 4.5)
    m[1, 0] = -1.0  # writable: writes land in the tensor
    assert t.tolist()[1][0] == -1.0


def test_memoryview_with_strides():
    t = base_3x4(ip.int64)
    m = memoryview(t.T)
    assert m.shape == (4, 3) and m.strides == (8, 32) and m.format == "q" and not m.c_contiguous
    assert m.tolist() == t.T.tolist()
    assert bytes(t.T) == struct.pack("<12q", *[v for row in t.T.tolist() for v in row])  # logical order
    e = memoryview(t[1:2].expand(3, 4))
    assert e.strides == (0, 8) and e.tolist() == [[4, 5, 6, 7]] * 3
    s = memoryview(t[:, 1::2])
    assert s.strides == (32, 16) and s.tolist() == [[1, 3], [5, 7], [9, 11]]
    assert memoryview(ip.tensor(2.0)).shape == () and memoryview(ip.tensor(2.0)).tolist() == 2.0


def test_memoryview_formats():
    expect = {ip.float32: "f", ip.float16: "e", ip.bfloat16: "H", ip.int8: "b", ip.int32: "i",
              ip.int64: "q", ip.uint8: "B"}
    for dtype, fmt in expect.items():
        m = memoryview(ip.tensor([1, 2], dtype=dtype))
        assert m.format == fmt and m.itemsize == dtype.itemsize
    # bf16 shows its raw bit patterns; f16 its IEEE half bytes (struct reads them, memoryview
    # itself cannot unpack "e")
    assert memoryview(ip.tensor([1.0, -2.0], dtype=ip.bfloat16)).tolist() == [0x3F80, 0xC000]
    assert struct.unpack("<2e", memoryview(ip.tensor([1.0, -2.0], dtype=ip.float16))) == (1.0, -2.0)


# ---- conversion ----

def test_to_dtype():
    t = ip.tensor([1.7, -2.7, 300.0])
    assert t.to(dtype=ip.float32) is t and t.to("cpu") is t  # nothing to do: the same tensor
    assert t.to(dtype=ip.int32).tolist() == [1, -2, 300]
    assert t.to(dtype="u8").tolist() == [1, 0, 255]
    assert t.to(dtype=ip.bfloat16).tolist() == [1.703125, -2.703125, 300.0]
    h = t.to(dtype=ip.float16)
    assert h.dtype is ip.float16 and h.float().dtype is ip.float32 and h.float().tolist() == [1.7001953125, -2.69921875, 300.0]
    v = base_3x4().T.to(dtype=ip.float32)  # a strided source converts to a contiguous tensor
    assert v.is_contiguous() and v.tolist() == [[0.0, 4.0, 8.0], [1.0, 5.0, 9.0], [2.0, 6.0, 10.0], [3.0, 7.0, 11.0]]
    with pytest.raises(TypeError, match="unknown dtype"):
        t.to(dtype="complex64")


def test_tolist_and_item():
    assert ip.tensor([[0.5, 1.5]], dtype=ip.bfloat16).T.tolist() == [[0.5], [1.5]]
    assert ip.tensor([7], dtype=ip.uint8).item() == 7
    assert ip.tensor([[2.5]], dtype=ip.float16).item() == 2.5
    assert ip.Tensor.empty(2, 0, 3).tolist() == [[], []]
    with pytest.raises(ValueError, match="item\\(\\) needs exactly one element, the tensor has 2"):
        ip.tensor([1, 2]).item()
