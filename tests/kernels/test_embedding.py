"""to_embedding: out[t, :] = table[ids[t], :].

A lookup moves data and rounds at most once (when out's dtype differs from the table's), so every
comparison here is exact: against torch's own indexing followed by torch's .to() (round to nearest
even), bit for bit. Both SIMD paths run (the conversions have AVX2 variants)."""
import pytest
import torch


import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, TORCH_DTYPES, from_torch, randn, strided, to_torch, on_cuda

INDEX_DTYPES = (ip.int32, ip.int64)


def c_embedding(out, table, ids):
    """The C function itself, with None passed as NULL."""
    check(ip.lib.to_embedding(*(ip.ffi.NULL if t is None else t._desc for t in (out, table, ids))))


def random_ids(n, V, dtype, gen):
    ref = torch.randint(0, V, (n,), generator=gen)
    return from_torch(ref.to(TORCH_DTYPES[dtype])), ref


def bits(t):
    """A torch tensor's raw bits, so float results compare exactly (and -0.0 != 0.0)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("table_dtype", FLOAT_DTYPES, ids=lambda d: f"table_{d.name}")
@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=lambda d: f"out_{d.name}")
@pytest.mark.parametrize("V,D,T,ids_dtype", [(1, 1, 1, ip.int64), (7, 33, 5, ip.int32),
                                             (1000, 64, 37, ip.int64), (50, 1003, 100, ip.int32)],
                         ids=["1x1", "7x33", "1000x64", "50x1003"])
def test_matches_reference(simd, gen, table_dtype, out_dtype, ids_dtype, V, D, T):
    table, _ = randn(V, D, dtype=table_dtype, gen=gen)
    ids, ids_ref = random_ids(T, V, ids_dtype, gen)
    out = ip.Tensor.empty(T, D, dtype=out_dtype)
    c_embedding(out, table, ids)
    expect = to_torch(table)[ids_ref].to(TORCH_DTYPES[out_dtype])
    assert torch.equal(bits(to_torch(out)), bits(expect))


@pytest.mark.parametrize("dtype", [ip.int8, ip.uint8, ip.int32, ip.int64, ip.float16], ids=lambda d: d.name)
def test_same_dtype_moves_bytes(simd, gen, dtype):
    """Any dtype is looked up as bytes when out has the table's dtype (integers included)."""
    V, D, T = 11, 9, 40
    raw = torch.randint(-(2 ** 62), 2 ** 62, (V, D), generator=gen)
    ref = raw.to(TORCH_DTYPES[dtype]) if dtype is not ip.float16 else raw.to(torch.int16).view(torch.float16)
    table = from_torch(ref)
    ids, ids_ref = random_ids(T, V, ip.int64, gen)
    out = ops.embedding(table, ids)
    assert out.dtype is dtype
    assert torch.equal(bits(to_torch(out)), bits(ref[ids_ref]))


def test_nan_inf_and_edge_ids(simd):
    """Special values survive a conversion, and the first and last rows are reachable."""
    nan, inf = float("nan"), float("inf")
    table = ip.tensor([[nan, inf, -inf, -0.0], [1e-40, 65520.0, 3.0, 70000.0], [1.0, 2.0, 3.0, 4.0]])
    ids = ip.tensor([2, 0, 1, 2], dtype=ip.int32)
    out = ip.Tensor.empty(4, 4, dtype=ip.float16)
    c_embedding(out, table, ids)
    expect = to_torch(table)[torch.tensor([2, 0, 1, 2])].to(torch.float16)
    got = to_torch(out)
    assert torch.equal(got.isnan(), expect.isnan())
    mask = ~expect.isnan()
    assert torch.equal(bits(got)[mask], bits(expect)[mask])


@pytest.mark.parametrize("table_kind,ids_kind,out_kind", [
    ("transposed", "contiguous", "contiguous"), ("sliced", "sliced", "transposed"),
    ("broadcast", "contiguous", "sliced"), ("contiguous", "broadcast", "transposed"),
    ("transposed", "sliced", "sliced"), ("sliced", "broadcast", "contiguous")])
def test_strided_views(simd, gen, table_kind, ids_kind, out_kind):
    V, D, T = 13, 21, 17
    table, _ = randn(V, D, dtype=ip.bfloat16, gen=gen)
    if table_kind == "broadcast":  # every row the same: stride 0 over the rows
        table = table[3:4].expand(V, D)
    elif table_kind != "contiguous":
        table = strided(table, table_kind)
    ids, ids_ref = random_ids(2 * T, V, ip.int64, gen)
    if ids_kind == "sliced":
        ids, ids_ref = ids[::2], ids_ref[::2]
    elif ids_kind == "broadcast":
        ids, ids_ref = ids[5:6].expand(T), ids_ref[5:6].expand(T)
    else:
        ids, ids_ref = ids[:T], ids_ref[:T]
    if out_kind == "transposed":
        backing = ip.Tensor.zeros(D, T, dtype=ip.float32)
        out = backing.T
    elif out_kind == "sliced":
        backing = ip.Tensor.zeros(T, 3 * D, dtype=ip.float32)
        out = backing[:, 1::3]
    else:
        backing = out = ip.Tensor.zeros(T, D, dtype=ip.float32)
    c_embedding(out, table, ids)
    expect = to_torch(table.contiguous())[ids_ref].to(torch.float32)
    assert torch.equal(to_torch(out), expect)
    if out_kind == "sliced":  # the columns between the view's were left alone
        untouched = to_torch(backing)
        assert torch.equal(untouched[:, 0::3], torch.zeros(T, D))
        assert torch.equal(untouched[:, 2::3], torch.zeros(T, D))


def test_python_wrapper_any_ids_shape(gen):
    table, _ = randn(30, 8, dtype=ip.float32, gen=gen)
    ref_ids = torch.randint(0, 30, (3, 4), generator=gen)
    out = ops.embedding(table, from_torch(ref_ids))
    assert out.shape == (3, 4, 8)
    assert torch.equal(to_torch(out), to_torch(table)[ref_ids])
    scalar = ops.embedding(table, ip.tensor(7))
    assert scalar.shape == (8,)
    assert torch.equal(to_torch(scalar), to_torch(table)[7])


def test_many_rows_threaded(gen):
    """Enough rows that the work is split over the thread pool."""
    V, D, T = 500, 512, 2000
    table, _ = randn(V, D, dtype=ip.float32, gen=gen)
    ids, ids_ref = random_ids(T, V, ip.int32, gen)
    out = ip.Tensor.empty(T, D, dtype=ip.bfloat16)
    c_embedding(out, table, ids)
    assert torch.equal(bits(to_torch(out)), bits(to_torch(table)[ids_ref].to(torch.bfloat16)))


def test_empty():
    table = ip.Tensor.zeros(4, 3)
    out = ip.Tensor.empty(0, 3)
    c_embedding(out, table, ip.Tensor.empty(0, dtype=ip.int64))
    out = ip.Tensor.empty(2, 0)
    c_embedding(out, ip.Tensor.empty(4, 0), ip.tensor([0, 3]))
    assert out.shape == (2, 0)


# ---- errors ----

@pytest.mark.parametrize("bad", [-1, 10, 2 ** 40])
@pytest.mark.parametrize("ids_dtype", INDEX_DTYPES, ids=lambda d: d.name)
def test_id_out_of_range_writes_nothing(bad, ids_dtype):
    if ids_dtype is ip.int32 and bad >= 2 ** 31:
        bad = 2 ** 31 - 1
    table = ip.Tensor.full((10, 4), 1.0)
    ids = ip.tensor([0, 9, 3, bad, 5], dtype=ids_dtype)
    out = ip.Tensor.full((5, 4), -7.0)
    with pytest.raises(ip.BoundsError, match=rf"to_embedding: ids\[3\] = {bad} is outside \[0, 10\)"):
        c_embedding(out, table, ids)
    # every id is checked before the first row is written
    assert out.tolist() == [[-7.0] * 4] * 5


def test_wrong_dtypes():
    table, out = ip.Tensor.zeros(4, 3), ip.Tensor.empty(2, 3)
    with pytest.raises(ip.DTypeError, match="ids has dtype float32, expected one of: int32, int64"):
        c_embedding(out, table, ip.tensor([0.0, 1.0]))
    with pytest.raises(ip.DTypeError, match="ids has dtype uint8"):
        c_embedding(out, table, ip.tensor([0, 1], dtype=ip.uint8))
    # a conversion is only made between float dtypes
    with pytest.raises(ip.DTypeError, match="table .out has another dtype. has dtype int32"):
        c_embedding(out, ip.Tensor.zeros(4, 3, dtype=ip.int32), ip.tensor([0, 1]))
    with pytest.raises(ip.DTypeError, match="out .table has another dtype. has dtype int8"):
        c_embedding(ip.Tensor.empty(2, 3, dtype=ip.int8), table, ip.tensor([0, 1]))


def test_wrong_shapes():
    table, ids = ip.Tensor.zeros(4, 3), ip.tensor([0, 1])
    with pytest.raises(ip.ShapeError, match=r"table \[V, D\] must have 2 dimensions, got 1"):
        c_embedding(ip.Tensor.empty(2, 3), ip.Tensor.zeros(12), ids)
    with pytest.raises(ip.ShapeError, match=r"ids \[T\] must have 1 dimensions, got 2"):
        c_embedding(ip.Tensor.empty(2, 3), table, ip.tensor([[0, 1]]))
    with pytest.raises(ip.ShapeError, match=r"out \[T, D\] must have 2 dimensions, got 3"):
        c_embedding(ip.Tensor.empty(1, 2, 3), table, ids)
    with pytest.raises(ip.ShapeError, match=r"out has shape \[2, 4\], expected \[T, D\] = \[2, 3\]"):
        c_embedding(ip.Tensor.empty(2, 4), table, ids)
    with pytest.raises(ip.ShapeError, match=r"out has shape \[3, 3\], expected \[T, D\] = \[2, 3\]"):
        c_embedding(ip.Tensor.empty(3, 3), table, ids)


def test_bad_buffers_and_null():
    table, ids, out = ip.Tensor.zeros(4, 3), ip.tensor([0, 1]), ip.Tensor.empty(2, 3)
    small = ip.Tensor.empty(5)
    short_table = ip.Tensor(small.storage, (4, 3), (3, 1), ip.float32)
    with pytest.raises(ip.BoundsError, match="to_embedding: table needs 48 bytes .* holds 20"):
        c_embedding(out, short_table, ids)
    short_out = ip.Tensor(small.storage, (2, 3), (3, 1), ip.float32)
    with pytest.raises(ip.BoundsError, match="to_embedding: out needs 24 bytes"):
        c_embedding(short_out, table, ids)
    for args, name in [((None, table, ids), "out"), ((out, None, ids), "table"), ((out, table, None), "ids")]:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_embedding: {name} is NULL"):
            c_embedding(*args)
    with pytest.raises(ip.InvalidArgumentError, match="to_embedding: out is written but some of its elements share memory"):
        c_embedding(ip.Tensor.empty(1, 3).expand(2, 3), table, ids)
    with pytest.raises(ip.InvalidArgumentError, match="to_embedding: out overlaps table in memory"):
        c_embedding(table[2:4], table, ids)  # a lookup cannot work in place
    with pytest.raises(ip.InvalidArgumentError, match="to_embedding: out overlaps ids in memory"):
        c_embedding(ip.Tensor(ids.storage, (2, 1), (1, 1), ip.int64), ip.Tensor.zeros(4, 1, dtype=ip.int64), ids)


def test_devices():
    table, ids, out = ip.Tensor.zeros(4, 3), ip.tensor([0, 1]), ip.Tensor.empty(2, 3)
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_embedding(on_cuda(out), on_cuda(table), on_cuda(ids)))
    with pytest.raises(ip.DeviceError, match="to_embedding: tensors are on different devices"):
        check(ip.lib.to_embedding(out._desc, on_cuda(table), ids._desc))
