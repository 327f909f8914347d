/* moe.c - to_gather_by_value and to_scatter_add_by_index (MoE routing): validation and device
 * dispatch. Everything but the index values is checked here; the CPU kernels check those (that
 * needs their data) before they write anything. Written tensors must not reach one element twice
 * and must not overlap any other argument. */
#include "internal.h"
#include "cpu/moe.h"

#define GATHER "to_gather_by_value"

int to_gather_by_value(const to_tensor *rows, const to_tensor *order, const to_tensor *offsets,
                       const to_tensor *x, const to_tensor *values, int num_values) {
    TO_TRY(to_check_tensor(order, GATHER, "order"));
    TO_TRY(to_check_tensor(offsets, GATHER, "offsets"));
    TO_TRY(to_check_tensor(values, GATHER, "values"));
    if (rows) {
        TO_TRY(to_check_tensor(rows, GATHER, "rows"));
        if (!x)
            return to_fail(TO_ERR_INVALID_ARGUMENT, GATHER ": rows is given but x is NULL (rows "
                           "are gathered from x)");
    }
    if (x)
        TO_TRY(to_check_tensor(x, GATHER, "x"));

    TO_TRY(to_check_dtype(values, TO_INDEX_DTYPES, GATHER, "values"));
    TO_TRY(to_check_dtype(order, TO_INDEX_DTYPES, GATHER, "order"));
    TO_TRY(to_check_dtype(offsets, TO_INDEX_DTYPES, GATHER, "offsets"));
    /* rows are copied as bytes; a conversion on the way is only done between float dtypes */
    if (rows && rows->dtype != x->dtype) {
        TO_TRY(to_check_dtype(rows, TO_FLOAT_DTYPES, GATHER, "rows (x has another dtype)"));
        TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, GATHER, "x (rows has another dtype)"));
    }

    TO_TRY(to_check_ndim(values, 2, GATHER, "values [T, k]"));
    TO_TRY(to_check_ndim(order, 1, GATHER, "order [T*k]"));
    TO_TRY(to_check_ndim(offsets, 1, GATHER, "offsets [num_values + 1]"));
    if (rows)
        TO_TRY(to_check_ndim(rows, 2, GATHER, "rows [T*k, D]"));
    if (x)
        TO_TRY(to_check_ndim(x, 2, GATHER, "x [T, D]"));

    TO_TRY(to_check_same_device(GATHER, values, order, offsets, (const to_tensor *)NULL));
    if (rows)
        TO_TRY(to_check_same_device(GATHER, values, rows, (const to_tensor *)NULL));
    if (x)
        TO_TRY(to_check_same_device(GATHER, values, x, (const to_tensor *)NULL));

    if (num_values < 0)
        return to_fail(TO_ERR_INVALID_ARGUMENT, GATHER ": num_values = %d is negative", num_values);
    int64_t T = values->shape[0], k = values->shape[1], n = T * k;
    if (order->shape[0] != n)
        return to_fail(TO_ERR_SHAPE, GATHER ": order has %lld entries, expected T*k = %lld * %lld "
                       "= %lld (one per element of values)", (long long)order->shape[0],
                       (long long)T, (long long)k, (long long)n);
    if (offsets->shape[0] != (int64_t)num_values + 1)
        return to_fail(TO_ERR_SHAPE, GATHER ": offsets has %lld entries, expected num_values + 1 "
                       "= %lld", (long long)offsets->shape[0], (long long)num_values + 1);
    if (x && x->shape[0] != T)
        return to_fail(TO_ERR_SHAPE, GATHER ": x has %lld rows but values has T = %lld",
                       (long long)x->shape[0], (long long)T);
    if (rows && (rows->shape[0] != n || rows->shape[1] != x->shape[1]))
        return to_fail(TO_ERR_SHAPE, GATHER ": rows has shape [%lld, %lld], expected [T*k, D] = "
                       "[%lld, %lld]", (long long)rows->shape[0], (long long)rows->shape[1],
                       (long long)n, (long long)x->shape[1]);
    /* order holds ids up to T*k - 1, offsets up to T*k */
    if (order->dtype == TO_I32 && n - 1 > INT32_MAX)
        return to_fail(TO_ERR_DTYPE, GATHER ": %lld assignments need int64 order", (long long)n);
    if (offsets->dtype == TO_I32 && n > INT32_MAX)
        return to_fail(TO_ERR_DTYPE, GATHER ": %lld assignments need int64 offsets", (long long)n);
    /* the outputs must not reach one element twice, nor overlap the inputs or each other */
    TO_TRY(to_check_writable(order, GATHER, "order"));
    TO_TRY(to_check_writable(offsets, GATHER, "offsets"));
    TO_TRY(to_check_no_alias(order, values, 0, GATHER, "order", "values"));
    TO_TRY(to_check_no_alias(offsets, values, 0, GATHER, "offsets", "values"));
    TO_TRY(to_check_no_alias(order, offsets, 0, GATHER, "order", "offsets"));
    if (rows) {
        TO_TRY(to_check_writable(rows, GATHER, "rows"));
        TO_TRY(to_check_no_alias(rows, x, 0, GATHER, "rows", "x"));
        TO_TRY(to_check_no_alias(rows, values, 0, GATHER, "rows", "values"));
        TO_TRY(to_check_no_alias(rows, order, 0, GATHER, "rows", "order"));
        TO_TRY(to_check_no_alias(rows, offsets, 0, GATHER, "rows", "offsets"));
    }
    if (x) {
        TO_TRY(to_check_no_alias(order, x, 0, GATHER, "order", "x"));
        TO_TRY(to_check_no_alias(offsets, x, 0, GATHER, "offsets", "x"));
    }

    TO_TRY(to_require_cpu(values, GATHER));
    return to_cpu_gather_by_value(rows, order, offsets, x, values, num_values);
}

#define SCATTER "to_scatter_add_by_index"

int to_scatter_add_by_index(const to_tensor *out, const to_tensor *src, const to_tensor *index,
                            const to_tensor *weight) {
    TO_TRY(to_check_tensor(out, SCATTER, "out"));
    TO_TRY(to_check_tensor(src, SCATTER, "src"));
    TO_TRY(to_check_tensor(index, SCATTER, "index"));
    if (weight)
        TO_TRY(to_check_tensor(weight, SCATTER, "weight"));

    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, SCATTER, "out"));
    TO_TRY(to_check_dtype(src, TO_FLOAT_DTYPES, SCATTER, "src"));
    TO_TRY(to_check_dtype(index, TO_INDEX_DTYPES, SCATTER, "index"));
    if (weight)
        TO_TRY(to_check_dtype(weight, TO_MASK(TO_F32), SCATTER, "weight"));

    TO_TRY(to_check_ndim(out, 2, SCATTER, "out [T, D]"));
    TO_TRY(to_check_ndim(src, 2, SCATTER, "src [N, D]"));
    TO_TRY(to_check_ndim(index, 1, SCATTER, "index [N]"));
    if (weight)
        TO_TRY(to_check_ndim(weight, 1, SCATTER, "weight [N]"));

    /* weight may be NULL, which also ends the argument list */
    TO_TRY(to_check_same_device(SCATTER, out, src, index, weight, (const to_tensor *)NULL));

    int64_t N = src->shape[0], D = out->shape[1];
    if (src->shape[1] != D)
        return to_fail(TO_ERR_SHAPE, SCATTER ": src has rows of %lld values but out has rows of %lld",
                       (long long)src->shape[1], (long long)D);
    if (index->shape[0] != N)
        return to_fail(TO_ERR_SHAPE, SCATTER ": index has %lld entries but src has N = %lld rows",
                       (long long)index->shape[0], (long long)N);
    if (weight && weight->shape[0] != N)
        return to_fail(TO_ERR_SHAPE, SCATTER ": weight has %lld entries but src has N = %lld rows",
                       (long long)weight->shape[0], (long long)N);
    /* out is read and written in place; it must not reach one element twice nor overlap the
     * other arguments (a source row could otherwise change while it is being added) */
    TO_TRY(to_check_writable(out, SCATTER, "out"));
    TO_TRY(to_check_no_alias(out, src, 0, SCATTER, "out", "src"));
    TO_TRY(to_check_no_alias(out, index, 0, SCATTER, "out", "index"));
    if (weight)
        TO_TRY(to_check_no_alias(out, weight, 0, SCATTER, "out", "weight"));

    TO_TRY(to_require_cpu(out, SCATTER));
    return to_cpu_scatter_add_by_index(out, src, index, weight);
}
