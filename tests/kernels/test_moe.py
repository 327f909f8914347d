"""MoE routing: to_gather_by_value (group token slots by expert) and to_scatter_add_by_index
(add expert outputs back into token rows), and a full MoE layer round trip.

gather_by_value only sorts and moves data: order/offsets must equal a stable sort in plain Python
exactly, and the gathered rows must be bit-identical to x's rows (or to torch's rounding of them
when rows has another dtype).

scatter_add_by_index computes out[r] = out[r] + sum_i w_i * src_i (i in increasing order) in f32,
one rounding per product and per addition, then one rounding into out's dtype. Against a float64
reference the error of an element is bounded by the textbook bound for recursive summation,
    |err| <= (m + 1) * 2^-24 * (|out_r| + sum_i |w_i * src_i|)      (m = contributions to row r)
plus, for f16/bf16 outputs, half an ulp of the result: 2^-11 (f16) or 2^-8 (bf16) relative.
The tests use that bound with a factor 2 of slack, per element."""
import pytest
import torch


import inference_pio as ip
from inference_pio import ops, runtime
from inference_pio._lib import check

from helpers import FLOAT_DTYPES, TORCH_DTYPES, from_torch, randn, to_torch, on_cuda

DT_IDS = {ip.float32: "f32", ip.float16: "f16", ip.bfloat16: "bf16", ip.int32: "i32", ip.int64: "i64"}
ROUNDING = {ip.float32: 2.0 ** -24, ip.float16: 2.0 ** -11, ip.bfloat16: 2.0 ** -8}  # relative


def _null(t):
    return ip.ffi.NULL if t is None else t._desc


def c_gather(rows, order, offsets, x, values, num_values):
    check(ip.lib.to_gather_by_value(_null(rows), _null(order), _null(offsets), _null(x), _null(values), num_values))


def c_scatter(out, src, index, weight):
    check(ip.lib.to_scatter_add_by_index(_null(out), _null(src), _null(index), _null(weight)))


def ref_routing(values, num_values):
    """Plain Python: the stable grouping of assignment ids a = t*k + j by value."""
    flat = [v for row in values for v in row]
    order = sorted(range(len(flat)), key=lambda a: flat[a])  # sorted() is stable
    counts = [0] * (num_values + 1)
    for v in flat:
        counts[v + 1] += 1
    for e in range(num_values):
        counts[e + 1] += counts[e]
    return order, counts


def bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ============================================================================ gather_by_value

@pytest.mark.parametrize("T,k,E", [(1, 1, 1), (1, 8, 64), (7, 2, 5), (33, 4, 60), (300, 8, 128)])
@pytest.mark.parametrize("index_dtype", [ip.int32, ip.int64], ids=DT_IDS.get)
def test_gather(gen, T, k, E, index_dtype):
    ref_values = torch.randint(0, E, (T, k), generator=gen)
    values = from_torch(ref_values.to(TORCH_DTYPES[index_dtype]))
    x, ref_x = randn(T, 37, dtype=ip.bfloat16, gen=gen)
    order = ip.Tensor.empty(T * k, dtype=index_dtype)
    offsets = ip.Tensor.empty(E + 1, dtype=index_dtype)
    rows = ip.Tensor.empty(T * k, 37, dtype=ip.bfloat16)
    c_gather(rows, order, offsets, x, values, E)
    expect_order, expect_offsets = ref_routing(ref_values.tolist(), E)
    assert order.tolist() == expect_order
    assert offsets.tolist() == expect_offsets
    assert torch.equal(bits(to_torch(rows)), bits(to_torch(x)[torch.tensor(expect_order) // k]))


@pytest.mark.parametrize("x_dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("rows_dtype", FLOAT_DTYPES, ids=DT_IDS.get)
def test_gather_rows_convert(simd, gen, x_dtype, rows_dtype):
    T, k, E, D = 40, 3, 9, 70
    ref_values = torch.randint(0, E, (T, k), generator=gen)
    x, _ = randn(T, D, dtype=x_dtype, gen=gen, scale=100.0)
    order, offsets, _ = ops.gather_by_value(from_torch(ref_values), E)  # rows=NULL path
    rows = ip.Tensor.empty(T * k, D, dtype=rows_dtype)
    c_gather(rows, ip.Tensor.empty(T * k, dtype=ip.int64), ip.Tensor.empty(E + 1, dtype=ip.int64), x,
             from_torch(ref_values), E)
    expect = to_torch(x)[torch.tensor(order.tolist()) // k].to(TORCH_DTYPES[rows_dtype])
    assert torch.equal(bits(to_torch(rows)), bits(expect))
    assert (order.tolist(), offsets.tolist()) == ref_routing(ref_values.tolist(), E)


def test_gather_strided_and_threaded(gen):
    """Transposed values, strided order/offsets/rows outputs; enough rows to use the pool."""
    T, k, E, D = 500, 8, 16, 200
    ref_values = torch.randint(0, E, (T, k), generator=gen)
    values = from_torch(ref_values.t().contiguous()).T  # [T, k] with strides (1, T)
    x, _ = randn(T, D, dtype=ip.float32, gen=gen)
    x = x.T.contiguous().T  # column-major x
    obacking = ip.Tensor.full((2 * T * k,), -3, dtype=ip.int64)
    fbacking = ip.Tensor.full((3 * (E + 1),), -3, dtype=ip.int32)
    rbacking = ip.Tensor.zeros(T * k, 2 * D, dtype=ip.float16)
    order, offsets, rows = obacking[1::2], fbacking[::3], rbacking[:, ::2]
    c_gather(rows, order, offsets, x, values, E)
    expect_order, expect_offsets = ref_routing(ref_values.tolist(), E)
    assert order.tolist() == expect_order and offsets.tolist() == expect_offsets
    assert obacking[0::2].tolist() == [-3] * (T * k)
    assert fbacking[1::3].tolist() == [-3] * (E + 1)
    expect_rows = to_torch(x.contiguous())[torch.tensor(expect_order) // k].to(torch.float16)
    assert torch.equal(bits(to_torch(rows)), bits(expect_rows))
    assert not to_torch(rbacking)[:, 1::2].any()


def test_gather_empty_experts_and_no_tokens():
    values = ip.tensor([[3, 3], [0, 3]])
    order, offsets, rows = ops.gather_by_value(values, 6)
    assert order.tolist() == [2, 0, 1, 3] and offsets.tolist() == [0, 1, 1, 1, 4, 4, 4] and rows is None
    order, offsets, rows = ops.gather_by_value(ip.Tensor.empty(0, 4, dtype=ip.int64), 3, x=ip.Tensor.empty(0, 5))
    assert order.tolist() == [] and offsets.tolist() == [0, 0, 0, 0] and rows.shape == (0, 5)


def test_gather_errors():
    values = ip.tensor([[0, 1], [2, 9]])
    order, offsets = ip.Tensor.full((4,), -1, dtype=ip.int64), ip.Tensor.full((5,), -1, dtype=ip.int64)
    x, rows = ip.Tensor.zeros(2, 3), ip.Tensor.full((4, 3), 5.0)
    with pytest.raises(ip.BoundsError, match=r"to_gather_by_value: values\[1, 1\] = 9 is outside \[0, 4\)"):
        c_gather(rows, order, offsets, x, values, 4)
    # every value is checked before anything is written
    assert order.tolist() == [-1] * 4 and offsets.tolist() == [-1] * 5 and rows.tolist() == [[5.0] * 3] * 4
    with pytest.raises(ip.BoundsError, match=r"values\[0, 0\] = -1"):
        c_gather(None, order, offsets, None, ip.tensor([[-1, 0], [1, 1]]), 4)
    values = ip.tensor([[0, 1], [2, 3]])
    with pytest.raises(ip.InvalidArgumentError, match="num_values = -2 is negative"):
        c_gather(None, order, ip.Tensor.empty(0, dtype=ip.int64), None, values, -2)
    with pytest.raises(ip.ShapeError, match=r"order has 3 entries, expected T\*k = 2 \* 2 = 4"):
        c_gather(None, ip.Tensor.empty(3, dtype=ip.int64), offsets, None, values, 4)
    with pytest.raises(ip.ShapeError, match=r"offsets has 4 entries, expected num_values \+ 1 = 5"):
        c_gather(None, order, ip.Tensor.empty(4, dtype=ip.int64), None, values, 4)
    with pytest.raises(ip.ShapeError, match=r"x has 3 rows but values has T = 2"):
        c_gather(ip.Tensor.empty(4, 3), order, offsets, ip.Tensor.zeros(3, 3), values, 4)
    with pytest.raises(ip.ShapeError, match=r"rows has shape \[4, 2\], expected \[T\*k, D\] = \[4, 3\]"):
        c_gather(ip.Tensor.empty(4, 2), order, offsets, x, values, 4)
    with pytest.raises(ip.ShapeError, match=r"values \[T, k\] must have 2 dimensions, got 1"):
        c_gather(None, order, offsets, None, ip.tensor([0, 1, 2, 3]), 4)
    with pytest.raises(ip.InvalidArgumentError, match="rows is given but x is NULL"):
        c_gather(rows, order, offsets, None, values, 4)
    with pytest.raises(ip.DTypeError, match="values has dtype float32, expected one of: int32, int64"):
        c_gather(None, order, offsets, None, ip.tensor([[0.0, 1.0], [2.0, 3.0]]), 4)
    with pytest.raises(ip.DTypeError, match="order has dtype uint8"):
        c_gather(None, ip.Tensor.empty(4, dtype=ip.uint8), offsets, None, values, 4)
    with pytest.raises(ip.DTypeError, match=r"rows \(x has another dtype\) has dtype int32"):
        c_gather(ip.Tensor.empty(4, 3, dtype=ip.int32), order, offsets, x, values, 4)
    for args, name in [((None, None, offsets, None, values), "order"), ((None, order, None, None, values), "offsets"),
                       ((None, order, offsets, None, None), "values")]:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_gather_by_value: {name} is NULL"):
            c_gather(*args, 4)
    short = ip.Tensor(ip.Tensor.empty(1, dtype=ip.int64).storage, (4,), (1,), ip.int64)
    with pytest.raises(ip.BoundsError, match="order needs 32 bytes .* holds 8"):
        c_gather(None, short, offsets, None, values, 4)
    with pytest.raises(ip.InvalidArgumentError, match="order is written but some of its elements share memory"):
        c_gather(None, ip.Tensor.empty(1, dtype=ip.int64).expand(4), offsets, None, values, 4)
    both = ip.Tensor.empty(9, dtype=ip.int64)
    with pytest.raises(ip.InvalidArgumentError, match="order overlaps offsets in memory"):
        c_gather(None, both[:4], both[3:8], None, values, 4)
    with pytest.raises(ip.InvalidArgumentError, match="order overlaps values in memory"):
        c_gather(None, values.view(4), offsets, None, values, 4)
    with pytest.raises(ip.InvalidArgumentError, match="rows overlaps x in memory"):
        big = ip.Tensor.zeros(4, 3)
        c_gather(big, order, offsets, big[2:4], values, 4)  # x is the last two rows of rows
    # more assignments than int32 can count (stride-0 views: validation refuses before reading)
    n = 2 ** 31 + 1
    many = ip.Tensor.zeros(1, 1, dtype=ip.int32).expand(n, 1)
    with pytest.raises(ip.DTypeError, match="2147483649 assignments need int64 order"):
        c_gather(None, ip.Tensor.zeros(1, dtype=ip.int32).expand(n), offsets, None, many, 4)
    with pytest.raises(ip.DTypeError, match="2147483649 assignments need int64 offsets"):
        c_gather(None, ip.Tensor.zeros(1, dtype=ip.int64).expand(n), ip.Tensor.empty(5, dtype=ip.int32), None, many, 4)


# ============================================================================ scatter_add_by_index

def ref_scatter(out0, src, index, weight):
    """float64 loop; also returns the per-element error bound (see the module docstring)."""
    out = out0.clone()
    mag = out0.abs().clone()
    count = torch.zeros(out0.shape[0], dtype=torch.float64)
    for i, r in enumerate(index.tolist()):
        w = 1.0 if weight is None else float(weight[i])
        out[r] += w * src[i]
        mag[r] += (w * src[i]).abs()
        count[r] += 1
    return out, mag, count


def check_scatter(got, out0, src, index, weight, dtype):
    expect, mag, count = ref_scatter(out0, src, index, weight)
    bound = 2 * ((count[:, None] + 1) * 2.0 ** -24 * mag + ROUNDING[dtype] * expect.abs()) + 1e-30
    err = (to_torch(got).to(torch.float64) - expect).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("src_dtype", FLOAT_DTYPES, ids=DT_IDS.get)
def test_scatter_dtypes(simd, gen, out_dtype, src_dtype):
    T, N, D = 11, 40, 45
    out, out0 = randn(T, D, dtype=out_dtype, gen=gen)
    src, ref_src = randn(N, D, dtype=src_dtype, gen=gen)
    ref_index = torch.randint(0, T, (N,), generator=gen)
    ref_w = torch.rand(N, generator=gen, dtype=torch.float64).to(torch.float32)
    c_scatter(out, src, from_torch(ref_index.to(torch.int32)), from_torch(ref_w))
    check_scatter(out, out0, ref_src, ref_index, ref_w.to(torch.float64), out_dtype)


@pytest.mark.parametrize("T,N,D", [(1, 1, 1), (1, 8, 33), (7, 7, 1000), (64, 512, 300), (300, 2400, 64)])
def test_scatter_sizes_no_weight(simd, gen, T, N, D):
    out, out0 = randn(T, D, dtype=ip.float32, gen=gen)
    src, ref_src = randn(N, D, dtype=ip.float32, gen=gen)
    ref_index = torch.randint(0, T, (N,), generator=gen)
    ops.scatter_add_by_index(out, src, from_torch(ref_index))
    check_scatter(out, out0, ref_src, ref_index, None, ip.float32)


def test_scatter_strided(simd, gen):
    T, N, D = 9, 50, 77
    out, out0 = randn(T, D, dtype=ip.bfloat16, gen=gen)
    out = out.T.contiguous().T  # column-major out
    src, ref_src = randn(N, D, dtype=ip.float32, gen=gen)
    wide = ip.Tensor.zeros(N, 2 * D)
    wide[:, 1::2] = src
    src = wide[:, 1::2]
    ref_index = torch.randint(0, T, (2 * N,), generator=gen)
    index = from_torch(ref_index)[::2]
    ref_w = torch.randn(3 * N, generator=gen).to(torch.float32)
    weight = from_torch(ref_w)[::3]
    c_scatter(out, src, index, weight)
    check_scatter(out, out0, ref_src, ref_index[::2], ref_w[::3].to(torch.float64), ip.bfloat16)
    # a broadcast source row (stride 0) is fine: every contribution is the same row
    out2, out0 = randn(T, D, dtype=ip.float32, gen=gen)
    row, ref_row = randn(1, D, dtype=ip.float32, gen=gen)
    c_scatter(out2, row.expand(N, D), index, None)
    check_scatter(out2, out0, ref_row.expand(N, D), ref_index[::2], None, ip.float32)


def test_scatter_deterministic_and_same_on_both_paths(gen):
    """Bit-identical results whatever the thread count and SIMD path: contributions to a row are
    added in increasing i, multiply then add (no FMA) on both paths."""
    T, N, D = 32, 512, 1024
    out0, _ = randn(T, D, dtype=ip.float32, gen=gen)
    src, _ = randn(N, D, dtype=ip.float32, gen=gen, scale=1000.0)
    index = from_torch(torch.randint(0, 4, (N,), generator=gen))  # heavy collisions
    weight, _ = randn(N, dtype=ip.float32, gen=gen)
    before_simd, before_threads = runtime.simd_level(), runtime.num_threads()
    results = []
    try:
        for level, threads in [(before_simd, before_threads), (before_simd, 1), ("scalar", before_threads)]:
            runtime.set_simd_level(level)
            runtime.set_num_threads(threads)
            out = out0.clone()
            c_scatter(out, src, index, weight)
            results.append(bytes(out))
    finally:
        runtime.set_simd_level(before_simd)
        runtime.set_num_threads(before_threads)
    assert results[0] == results[1] == results[2]


def test_scatter_untouched_rows_and_empty():
    out = ip.Tensor.full((4, 3), 2.0)
    c_scatter(out, ip.tensor([[1.0, 2.0, 3.0]]), ip.tensor([2], dtype=ip.int32), ip.tensor([0.5]))
    assert out.tolist() == [[2.0] * 3, [2.0] * 3, [2.5, 3.0, 3.5], [2.0] * 3]
    c_scatter(out, ip.Tensor.empty(0, 3), ip.Tensor.empty(0, dtype=ip.int64), None)
    c_scatter(ip.Tensor.empty(0, 3), ip.Tensor.empty(0, 3), ip.Tensor.empty(0, dtype=ip.int64), None)
    assert out.tolist()[0] == [2.0] * 3


def test_scatter_errors():
    out, src = ip.Tensor.full((4, 3), 1.0), ip.Tensor.zeros(3, 3)
    index, weight = ip.tensor([0, 1, 2]), ip.tensor([1.0, 1.0, 1.0])
    with pytest.raises(ip.BoundsError, match=r"to_scatter_add_by_index: index\[2\] = 4 is outside \[0, 4\)"):
        c_scatter(out, ip.Tensor.full((3, 3), 5.0), ip.tensor([3, 0, 4]), weight)
    assert out.tolist() == [[1.0] * 3] * 4  # nothing was added
    with pytest.raises(ip.BoundsError, match=r"index\[0\] = -1"):
        c_scatter(out, src, ip.tensor([-1, 0, 0], dtype=ip.int32), None)
    with pytest.raises(ip.DTypeError, match="weight has dtype bfloat16, expected one of: float32"):
        c_scatter(out, src, index, ip.tensor([1.0, 1.0, 1.0], dtype=ip.bfloat16))
    with pytest.raises(ip.DTypeError, match="out has dtype int32"):
        c_scatter(ip.Tensor.zeros(4, 3, dtype=ip.int32), src, index, None)
    with pytest.raises(ip.DTypeError, match="src has dtype int8"):
        c_scatter(out, ip.Tensor.zeros(3, 3, dtype=ip.int8), index, None)
    with pytest.raises(ip.DTypeError, match="index has dtype float32"):
        c_scatter(out, src, weight, None)
    with pytest.raises(ip.ShapeError, match="src has rows of 2 values but out has rows of 3"):
        c_scatter(out, ip.Tensor.zeros(3, 2), index, None)
    with pytest.raises(ip.ShapeError, match="index has 2 entries but src has N = 3 rows"):
        c_scatter(out, src, ip.tensor([0, 1]), None)
    with pytest.raises(ip.ShapeError, match="weight has 4 entries but src has N = 3 rows"):
        c_scatter(out, src, index, ip.tensor([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ip.ShapeError, match=r"out \[T, D\] must have 2 dimensions, got 1"):
        c_scatter(ip.Tensor.zeros(12), src, index, None)
    with pytest.raises(ip.ShapeError, match=r"weight \[N\] must have 1 dimensions, got 2"):
        c_scatter(out, src, index, ip.Tensor.zeros(3, 1))
    for args, name in [((None, src, index), "out"), ((out, None, index), "src"), ((out, src, None), "index")]:
        with pytest.raises(ip.InvalidArgumentError, match=f"to_scatter_add_by_index: {name} is NULL"):
            c_scatter(*args, None)
    short = ip.Tensor(ip.Tensor.empty(2).storage, (3, 3), (3, 1), ip.float32)
    with pytest.raises(ip.BoundsError, match="src needs 36 bytes .* holds 8"):
        c_scatter(out, short, index, None)
    with pytest.raises(ip.InvalidArgumentError, match="out is written but some of its elements share memory"):
        c_scatter(ip.Tensor.zeros(1, 3).expand(4, 3), src, index, None)
    with pytest.raises(ip.InvalidArgumentError, match="to_scatter_add_by_index: out overlaps src in memory"):
        c_scatter(out[:3], out[1:4], index, None)
    with pytest.raises(ip.InvalidArgumentError, match="out overlaps weight in memory"):
        c_scatter(out, src, index, ip.Tensor(out.storage, (3,), (1,), ip.float32))


def test_devices():
    values, order, offsets = ip.tensor([[0, 1]]), ip.Tensor.empty(2, dtype=ip.int64), ip.Tensor.empty(3, dtype=ip.int64)
    x, rows = ip.Tensor.zeros(1, 4), ip.Tensor.empty(2, 4)
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_gather_by_value(on_cuda(rows), on_cuda(order), on_cuda(offsets), on_cuda(x),
                                        on_cuda(values), 2))
    with pytest.raises(ip.DeviceError, match="to_gather_by_value: tensors are on different devices"):
        check(ip.lib.to_gather_by_value(rows._desc, order._desc, offsets._desc, on_cuda(x), values._desc, 2))
    out, src, index = ip.Tensor.zeros(2, 4), ip.Tensor.zeros(2, 4), ip.tensor([0, 1])
    with pytest.raises(ip.DeviceError, match="no GPU with index 63"):
        check(ip.lib.to_scatter_add_by_index(on_cuda(out), on_cuda(src), on_cuda(index), ip.ffi.NULL))
    with pytest.raises(ip.DeviceError, match="to_scatter_add_by_index: tensors are on different devices"):
        check(ip.lib.to_scatter_add_by_index(out._desc, src._desc, index._desc, on_cuda(ip.tensor([1.0, 1.0]))))


# ============================================================================ round trip

@pytest.mark.parametrize("dtype", [ip.float32, ip.bfloat16], ids=DT_IDS.get)
def test_moe_round_trip(simd, gen, dtype):
    """A MoE layer's routing: router logits -> top-k experts (to_topk) -> softmax weights ->
    rows grouped by expert (to_gather_by_value) -> a per-expert linear map -> weighted sum back
    into token rows (to_scatter_add_by_index), against the straightforward float64 loop
        out[t] = sum_j w[t, j] * (x[t] @ W[e[t, j]].T)."""
    T, D, H, E, k = 37, 48, 40, 8, 3
    x, ref_x = randn(T, D, dtype=dtype, gen=gen)
    logits, ref_logits = randn(T, E, dtype=ip.float32, gen=gen)
    W = torch.randn(E, H, D, generator=gen, dtype=torch.float64) / D ** 0.5

    top_values, experts = ops.topk(logits, k)
    ref_top, ref_experts = torch.sort(ref_logits, dim=-1, descending=True, stable=True)
    assert experts.tolist() == ref_experts[:, :k].tolist()
    w = torch.softmax(ref_top[:, :k], dim=-1)  # router weights, float64

    order, offsets, rows = ops.gather_by_value(experts, E, x=x)
    order_t, offsets_l = torch.tensor(order.tolist()), offsets.tolist()
    # the per-expert transform, applied to each expert's contiguous block of gathered rows
    rows_t = to_torch(rows).to(torch.float64)
    y = torch.empty(T * k, H, dtype=torch.float64)
    for e in range(E):
        a, b = offsets_l[e], offsets_l[e + 1]
        assert (ref_experts[:, :k].reshape(-1)[order_t[a:b]] == e).all()
        y[a:b] = rows_t[a:b] @ W[e].T
    y_ours = from_torch(y.to(TORCH_DTYPES[dtype]))
    # each gathered row goes back to token order[i] // k with the weight of its slot
    slot_w = from_torch(w.reshape(-1)[order_t].to(torch.float32))
    out = ip.Tensor.zeros(T, H, dtype=dtype)
    c_scatter(out, y_ours, from_torch(order_t // k), slot_w)

    expect = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            expect[t] += w[t, j] * (ref_x[t] @ W[ref_experts[t, j]].T)
    # error sources: y rounded to dtype (rel. ROUNDING), weights rounded to f32 (2^-24), the
    # f32 sum of k terms, then out rounded to dtype; sized on the sum of |terms| of each element
    mag = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            mag[t] += (w[t, j] * (ref_x[t] @ W[ref_experts[t, j]].T)).abs()
    bound = 2 * ((ROUNDING[dtype] + (k + 2) * 2.0 ** -24) * mag + ROUNDING[dtype] * expect.abs())
    err = (to_torch(out).to(torch.float64) - expect).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"
