"""to_argmax and to_topk over the last dimension.

Both only compare values, never compute new ones, so the results are exact: indices must equal a
plain-Python reference, and top-k values must equal x's values (converted to f32 where values is
f32, which is exact from f16/bf16). The ranking both follow: NaN is larger than every number (as
in torch), ties (equal values, -0.0 == 0.0, or two NaNs) go to the lower index."""
import math

import pytest
import torch


import inference_pio as ip
from inference_pio import ops
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, TORCH_DTYPES, from_torch, to_torch, on_cuda

DT_IDS = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16", ip.int32: "i32", ip.int64: "i64"}


def _null(t):
    return ip.ffi.NULL if t is None else t._desc


def c_argmax(out, x):
    check(ip.lib.to_argmax(_null(out), _null(x)))


def c_topk(values, indices, x, k):
    check(ip.lib.to_topk(_null(values), _null(indices), _null(x), k))


def rank_key(v, i):
    """Sort key: NaN first, then larger values, then lower indices."""
    return (0, 0.0, i) if math.isnan(v) else (1, -v, i)


def ref_topk(rows, k):
    """[[(value, index), ...] per row]: the k best of each row in ranking order."""
    return [sorted(((v, i) for i, v in enumerate(row)), key=lambda p: rank_key(*p))[:k] for row in rows]


def ref_argmax(rows):
    return [min(range(len(row)), key=lambda i: rank_key(row[i], i)) for row in rows]


def make_x(rows, n, dtype, gen, kind):
    """A [rows, n] tensor (ours, float64 torch copy of its values) of one of these kinds:
    'randn' (distinct values), 'ties' (a few small integers: many ties), 'nan' (randn with NaNs
    and infinities sprinkled in), 'special' (constant rows: all -inf, all NaN, all equal, -0/0)."""
    if kind == "randn":
        ref = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    elif kind == "ties":
        ref = torch.randint(-2, 3, (rows, n), generator=gen).to(torch.float64)
    elif kind == "nan":
        ref = torch.randn(rows, n, generator=gen, dtype=torch.float64)
        pick = torch.rand(rows, n, generator=gen)
        ref[pick < 0.02] = float("nan")
        ref[(pick >= 0.02) & (pick < 0.04)] = float("inf")
        ref[(pick >= 0.04) & (pick < 0.06)] = -float("inf")
    else:
        fills = [-float("inf"), float("nan"), 2.5, -0.0, float("inf")]
        ref = torch.tensor([fills[r % len(fills)] for r in range(rows)], dtype=torch.float64)[:, None].repeat(1, n)
        if rows > 3 and n > 1:
            ref[3, n // 2] = 0.0  # -0.0 then +0.0: equal, so the first index wins
    ref = ref.to(TORCH_DTYPES[dtype])
    return from_torch(ref), ref.to(torch.float64)


def layout(x, kind):
    """x as a contiguous, transposed (column-major) or sliced (every other column) view."""
    if kind == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced":
        wide = ip.Tensor.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        view = wide[..., 1::2]
        view.copy_(x)
        return view
    return x


# ============================================================================ argmax

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (7, 33), (5, 1000), (2, 4099)])
@pytest.mark.parametrize("kind", ["randn", "ties", "nan", "special"])
def test_argmax(simd, gen, dtype, rows, n, kind):
    x, ref = make_x(rows, n, dtype, gen, kind)
    out = ip.Tensor.empty(rows, dtype=ip.int64)
    c_argmax(out, x)
    assert out.tolist() == ref_argmax(ref.tolist())


@pytest.mark.parametrize("kind", ["transposed", "sliced", "broadcast"])
def test_argmax_strided(simd, gen, kind):
    rows, n = 9, 300
    x, ref = make_x(rows, n, ip.bfloat16, gen, "ties")
    if kind == "broadcast":  # one row repeated (stride 0 over the rows)
        x, ref = x[4:5].expand(rows, n), ref[4:5].expand(rows, n)
    else:
        x = layout(x, kind)
    backing = ip.Tensor.full((rows, 3), -1, dtype=ip.int64)
    out = backing[:, 1]  # a strided output
    c_argmax(out, x)
    assert out.tolist() == ref_argmax(ref.tolist())
    assert backing[:, 0].tolist() == [-1] * rows and backing[:, 2].tolist() == [-1] * rows


def test_argmax_nan_position_in_vector_lanes(simd):
    """A NaN anywhere wins over anything, including +inf and a larger index's NaN, wherever it
    falls in the 8-wide lanes and chunks."""
    n = 5000
    for pos in [0, 1, 7, 8, 15, 2047, 2048, 2049, 4999]:
        row = [float(i % 97) for i in range(n)]
        row[pos] = float("nan")
        row[min(pos + 3, n - 1)] = float("nan") if pos + 3 < n else row[n - 1]
        row[(pos + 1000) % n] = float("inf")
        x = ip.tensor([row])
        out = ip.Tensor.empty(1, dtype=ip.int64)
        c_argmax(out, x)
        assert out.tolist() == [pos]


def test_argmax_output_shapes(gen):
    x, ref = make_x(6, 10, ip.float32, gen, "ties")
    x3, ref3 = x.view(2, 3, 10), ref.view(2, 3, 10)
    expect = ref_argmax(ref.tolist())
    out = ops.argmax(x3)  # x's leading dimensions
    assert out.shape == (2, 3) and out.tolist() == [expect[:3], expect[3:]]
    flat = ip.Tensor.empty(6, dtype=ip.int64)  # or flat over the rows
    c_argmax(flat, x3)
    assert flat.tolist() == expect
    one = ops.argmax(x[2])  # a 1-d x gives a 0-d index
    assert one.shape == () and one.item() == expect[2]
    scalar = ip.Tensor.empty(dtype=ip.int64)  # a 0-d x is one row of one element
    c_argmax(scalar, ip.tensor(3.0))
    assert scalar.item() == 0
    empty = ip.Tensor.empty(0, dtype=ip.int64)  # no rows: nothing to do
    c_argmax(empty, ip.Tensor.empty(0, 5))


def test_argmax_vocabulary_row(simd, gen):
    """A decode step's logits: one 151936-wide row, and a small batch of them, threaded."""
    for rows in (1, 4):
        x, ref = make_x(rows, 151936, ip.bfloat16, gen, "randn")
        out = ip.Tensor.empty(rows, dtype=ip.int64)
        c_argmax(out, x)
        assert out.tolist() == ref.argmax(dim=-1).tolist()  # distinct maxima: torch agrees


def test_argmax_errors():
    x = ip.Tensor.zeros(3, 4)
    out = ip.Tensor.empty(3, dtype=ip.int64)
    with pytest.raises(ip.DTypeError, match="to_argmax: out has dtype int32, expected one of: int64"):
        c_argmax(ip.Tensor.empty(3, dtype=ip.int32), x)
    with pytest.raises(ip.DTypeError, match="to_argmax: x has dtype int32, expected one of: float32, float16, bfloat16"):
        c_argmax(out, ip.Tensor.zeros(3, 4, dtype=ip.int32))
    with pytest.raises(ip.ShapeError, match=r"to_argmax: out has shape \[4\] but x has shape \[3, 4\]"):
        c_argmax(ip.Tensor.empty(4, dtype=ip.int64), x)
    with pytest.raises(ip.ShapeError, match=r"out has shape \[3, 1\] but x has shape \[3, 4\]"):
        c_argmax(ip.Tensor.empty(3, 1, dtype=ip.int64), x)
    with pytest.raises(ip.InvalidArgumentError, match="x has 3 rows of no elements"):
        c_argmax(out, ip.Tensor.empty(3, 0))
    with pytest.raises(ip.InvalidArgumentError, match="to_argmax: out is NULL"):
        c_argmax(None, x)
    with pytest.raises(ip.InvalidArgumentError, match="to_argmax: x is NULL"):
        c_argmax(out, None)
    short = ip.Tensor(ip.Tensor.empty(2).storage, (3, 4), (4, 1), ip.float32)
    with pytest.raises(ip.BoundsError, match="to_argmax: x needs 48 bytes for its shape and strides but its buffer holds 8"):
        c_argmax(out, short)
    with pytest.raises(ip.InvalidArgumentError, match="to_argmax: out is written but some of its elements share memory"):
        c_argmax(ip.Tensor.empty(1, dtype=ip.int64).expand(3), x)
    with pytest.raises(ip.InvalidArgumentError, match="to_argmax: out overlaps x in memory"):
        c_argmax(ip.Tensor(x.storage, (3,), (1,), ip.int64), x)


# ============================================================================ top-k

def check_topk(values, indices, ref, k):
    expect = ref_topk(ref.reshape(-1, ref.shape[-1]).tolist(), k)
    got_v = to_torch(values).to(torch.float64).reshape(-1, k).tolist()
    got_i = to_torch(indices).reshape(-1, k).tolist()
    assert got_i == [[i for _, i in row] for row in expect]
    for gv, row in zip(got_v, expect):
        for a, (b, _) in zip(gv, row):
            assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("rows,n,k", [(1, 1, 1), (3, 5, 5), (7, 33, 1), (7, 33, 7), (4, 1000, 100), (2, 4099, 37)])
@pytest.mark.parametrize("kind", ["randn", "ties", "nan", "special"])
def test_topk(simd, gen, dtype, rows, n, k, kind):
    x, ref = make_x(rows, n, dtype, gen, kind)
    values = ip.Tensor.empty(rows, k, dtype=dtype)
    indices = ip.Tensor.empty(rows, k, dtype=ip.int64)
    c_topk(values, indices, x, k)
    check_topk(values, indices, ref, k)


@pytest.mark.parametrize("values_dtype", ["x", ip.float32], ids=["x_dtype", "f32"])
@pytest.mark.parametrize("indices_dtype", [ip.int32, ip.int64], ids=DT_IDS.get)
def test_topk_output_dtypes(simd, gen, values_dtype, indices_dtype):
    x, ref = make_x(5, 300, ip.float16, gen, "nan")
    values = ip.Tensor.empty(5, 20, dtype=ip.float16 if values_dtype == "x" else values_dtype)
    indices = ip.Tensor.empty(5, 20, dtype=indices_dtype)
    c_topk(values, indices, x, 20)
    check_topk(values, indices, ref, 20)


@pytest.mark.parametrize("kind", ["transposed", "sliced", "broadcast"])
def test_topk_strided(simd, gen, kind):
    rows, n, k = 6, 500, 40
    x, ref = make_x(rows, n, ip.float32, gen, "ties")
    if kind == "broadcast":
        x, ref = x[2:3].expand(rows, n), ref[2:3].expand(rows, n)
    else:
        x = layout(x, kind)
    # outputs as views too: values transposed, indices every other column
    values = ip.Tensor.empty(k, rows).T
    ibacking = ip.Tensor.full((rows, 2 * k), -5, dtype=ip.int64)
    indices = ibacking[:, ::2]
    c_topk(values, indices, x, k)
    check_topk(values, indices, ref, k)
    assert ibacking[:, 1::2].tolist() == [[-5] * k] * rows


def test_topk_full_sort_and_shapes(gen):
    x, ref = make_x(6, 50, ip.bfloat16, gen, "nan")
    v, i = ops.topk(x.view(2, 3, 50), 50)  # k = n is a full sort; leading dims kept
    assert v.shape == (2, 3, 50) and i.shape == (2, 3, 50) and v.dtype is ip.bfloat16
    check_topk(v, i, ref, 50)
    v1, i1 = ops.topk(x[4], 3)  # a 1-d x gives [k]
    assert v1.shape == (3,)
    check_topk(v1, i1, ref[4:5], 3)
    flat_v, flat_i = ip.Tensor.empty(6, 2, dtype=ip.float32), ip.Tensor.empty(6, 2, dtype=ip.int32)
    c_topk(flat_v, flat_i, x.view(2, 3, 50), 2)  # or [rows, k]
    check_topk(flat_v, flat_i, ref, 2)
    c_topk(ip.Tensor.empty(0, 2), ip.Tensor.empty(0, 2, dtype=ip.int64), ip.Tensor.empty(0, 5), 2)


@pytest.mark.parametrize("k", [1, 50, 100])
def test_topk_vocabulary_row(simd, gen, k):
    """A 151936-wide vocabulary row (the sampler's case), in bf16, and a batch of 3 rows."""
    for rows in (1, 3):
        x, ref = make_x(rows, 151936, ip.bfloat16, gen, "randn")
        values = ip.Tensor.empty(rows, k, dtype=ip.float32)
        indices = ip.Tensor.empty(rows, k, dtype=ip.int64)
        c_topk(values, indices, x, k)
        # bf16 has ties among 151936 values: compare to torch's stable sort (same tie rule)
        sv, si = torch.sort(ref, dim=-1, descending=True, stable=True)
        assert to_torch(indices).tolist() == si[:, :k].tolist()
        assert to_torch(values).to(torch.float64).tolist() == sv[:, :k].tolist()


def test_topk_ascending_row_worst_case(simd):
    """Increasing values make every element enter the heap: still right."""
    n, k = 3000, 64
    x = ip.tensor([[float(i) for i in range(n)]])
    values, indices = ops.topk(x, k)
    assert indices.tolist() == [list(range(n - 1, n - 1 - k, -1))]
    assert values.tolist() == [[float(i) for i in range(n - 1, n - 1 - k, -1)]]


def test_topk_errors():
    x = ip.Tensor.zeros(3, 5)
    v, i = ip.Tensor.empty(3, 2), ip.Tensor.empty(3, 2, dtype=ip.int64)
    for k in (0, -1, 6):
        with pytest.raises(ip.InvalidArgumentError, match=rf"to_topk: k = {k} is outside \[1, 5\]"):
            c_topk(v, i, x, k)
    with pytest.raises(ip.DTypeError, match="to_topk: values has dtype float16, expected one of: float32"):
        c_topk(ip.Tensor.empty(3, 2, dtype=ip.float16), i, x, 2)
    with pytest.raises(ip.DTypeError, match="to_topk: indices has dtype float32, expected one of: int32, int64"):
        c_topk(v, ip.Tensor.empty(3, 2), x, 2)
    with pytest.raises(ip.DTypeError, match="to_topk: x has dtype int64"):
        c_topk(v, i, ip.Tensor.zeros(3, 5, dtype=ip.int64), 2)
    with pytest.raises(ip.ShapeError, match=r"to_topk: values has shape \[3, 3\] but x has shape \[3, 5\] and k = 2"):
        c_topk(ip.Tensor.empty(3, 3), i, x, 2)
    with pytest.raises(ip.ShapeError, match=r"to_topk: indices has shape \[2, 2\]"):
        c_topk(v, ip.Tensor.empty(2, 2, dtype=ip.int64), x, 2)
    with pytest.raises(ip.ShapeError, match="x must have at least 1 dimension"):
        c_topk(ip.Tensor.empty(1), ip.Tensor.empty(1, dtype=ip.int64), ip.tensor(1.0), 1)
    for args, name in [((None, i, x), "values"), ((v, None, x), "indices"), ((v, i, None), "x")]:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_topk: {name} is NULL"):
            c_topk(*args, 2)
    short = ip.Tensor(ip.Tensor.empty(1, dtype=ip.int64).storage, (3, 2), (2, 1), ip.int64)
    with pytest.raises(ip.BoundsError, match="to_topk: indices needs 48 bytes .* holds 8"):
        c_topk(v, short, x, 2)
    with pytest.raises(ip.InvalidArgumentError, match="to_topk: values is written but some of its elements share memory"):
        c_topk(ip.Tensor.empty(1, 2).expand(3, 2), i, x, 2)
    with pytest.raises(ip.InvalidArgumentError, match="to_topk: values overlaps x in memory"):
        c_topk(x[:, :2], i, x, 2)
    with pytest.raises(ip.InvalidArgumentError, match="to_topk: values overlaps indices in memory"):
        c_topk(ip.Tensor(i.storage, (3, 2), (2, 1), ip.float32), i, x, 2)
    # absurdly long rows, as stride-0 views of one element (nothing is read: validation refuses)
    one = ip.Tensor.zeros(1)
    with pytest.raises(ip.DTypeError, match="rows of 2147483649 values need int64 indices"):
        c_topk(ip.Tensor.empty(1, 1), ip.Tensor.empty(1, 1, dtype=ip.int32), one.view(1, 1).expand(1, 2 ** 31 + 1), 1)
    with pytest.raises(ip.UnsupportedError, match="rows of 4294967297 values"):
        c_topk(ip.Tensor.empty(1, 1), ip.Tensor.empty(1, 1, dtype=ip.int64), one.view(1, 1).expand(1, 2 ** 32 + 1), 1)


def test_devices():
    x, out = ip.Tensor.zeros(3, 4), ip.Tensor.empty(3, dtype=ip.int64)
    v, i = ip.Tensor.empty(3, 2), ip.Tensor.empty(3, 2, dtype=ip.int64)
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_argmax(on_cuda(out), on_cuda(x)))
    with pytest.raises(ip.DeviceError, match="to_argmax: tensors are on different devices"):
        check(ip.lib.to_argmax(out._desc, on_cuda(x)))
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_topk(on_cuda(v), on_cuda(i), on_cuda(x), 2))
    with pytest.raises(ip.DeviceError, match="to_topk: tensors are on different devices"):
        check(ip.lib.to_topk(v._desc, on_cuda(i), x._desc, 2))
