/* reduce.c - to_argmax and to_topk: validation and device dispatch.
 * Both reduce the last dimension of x; the "rows" are all the other dimensions flattened. An
 * output holds one entry (argmax) or k entries (topk) per row and may be shaped like x's leading
 * dimensions (what the Python layer makes) or flat over the rows. Outputs must not reach one
 * element twice nor overlap x or each other. */
#include "internal.h"
#include "cuda/cuda_ops.h"
#include "cpu/reduce.h"

#include <stdio.h>

/* out has x's leading dimensions followed by `last` (last < 0: nothing follows), or is
 * [rows] / [rows, last]. */
static int fits_rows(const to_tensor *out, const to_tensor *x, int64_t last) {
    int lead = x->ndim > 0 ? x->ndim - 1 : 0, extra = last >= 0;
    if (out->ndim == lead + extra) {
        int same = 1;
        for (int d = 0; d < lead; d++)
            same &= out->shape[d] == x->shape[d];
        if (same && (!extra || out->shape[lead] == last))
            return 1;
    }
    return out->ndim == 1 + extra && out->shape[0] == to_num_rows(x) && (!extra || out->shape[1] == last);
}

#define ARGMAX "to_argmax"

int to_argmax(const to_tensor *out, const to_tensor *x) {
    TO_TRY(to_check_tensor(out, ARGMAX, "out"));
    TO_TRY(to_check_tensor(x, ARGMAX, "x"));
    TO_TRY(to_check_dtype(out, TO_MASK(TO_I64), ARGMAX, "out"));
    TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, ARGMAX, "x"));
    TO_TRY(to_check_same_device(ARGMAX, out, x, (const to_tensor *)NULL));

    int64_t rows = to_num_rows(x);
    if (rows > 0 && to_row_len(x) == 0)
        return to_fail(TO_ERR_INVALID_ARGUMENT, ARGMAX ": x has %lld rows of no elements (an "
                       "empty row has no largest value)", (long long)rows);
    if (!fits_rows(out, x, -1)) {
        char so[160], sx[160];
        to_shape_str(out, so, sizeof so);
        to_shape_str(x, sx, sizeof sx);
        return to_fail(TO_ERR_SHAPE, ARGMAX ": out has shape %s but x has shape %s: expected x's "
                       "shape without its last dimension, or [%lld]", so, sx, (long long)rows);
    }
    TO_TRY(to_check_writable(out, ARGMAX, "out"));
    TO_TRY(to_check_no_alias(out, x, 0, ARGMAX, "out", "x"));

    if (out->device == TO_CUDA)
        return to_cuda_argmax(out, x);
    return to_cpu_argmax(out, x);
}

#define TOPK "to_topk"

int to_topk(const to_tensor *values, const to_tensor *indices, const to_tensor *x, int k) {
    TO_TRY(to_check_tensor(values, TOPK, "values"));
    TO_TRY(to_check_tensor(indices, TOPK, "indices"));
    TO_TRY(to_check_tensor(x, TOPK, "x"));
    TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, TOPK, "x"));
    TO_TRY(to_check_dtype(values, TO_MASK(TO_F32) | TO_MASK(x->dtype), TOPK, "values"));
    TO_TRY(to_check_dtype(indices, TO_INDEX_DTYPES, TOPK, "indices"));
    TO_TRY(to_check_same_device(TOPK, values, indices, x, (const to_tensor *)NULL));

    if (x->ndim < 1)
        return to_fail(TO_ERR_SHAPE, TOPK ": x must have at least 1 dimension, got a 0-d tensor");
    int64_t n = to_row_len(x);
    if (k < 1 || k > n)
        return to_fail(TO_ERR_INVALID_ARGUMENT, TOPK ": k = %d is outside [1, %lld] (the length of "
                       "x's last dimension)", k, (long long)n);
    const to_tensor *outs[2] = {values, indices};
    const char *names[2] = {"values", "indices"};
    for (int i = 0; i < 2; i++) {
        if (!fits_rows(outs[i], x, k)) {
            char so[160], sx[160];
            to_shape_str(outs[i], so, sizeof so);
            to_shape_str(x, sx, sizeof sx);
            return to_fail(TO_ERR_SHAPE, TOPK ": %s has shape %s but x has shape %s and k = %d: "
                           "expected x's shape with its last dimension k, or [%lld, %d]", names[i],
                           so, sx, k, (long long)to_num_rows(x), k);
        }
        TO_TRY(to_check_writable(outs[i], TOPK, names[i]));
        TO_TRY(to_check_no_alias(outs[i], x, 0, TOPK, names[i], "x"));
    }
    TO_TRY(to_check_no_alias(values, indices, 0, TOPK, "values", "indices"));
    /* the kernel packs an index into 32 bits of its sort key */
    if (n - 1 > (int64_t)UINT32_MAX)
        return to_fail(TO_ERR_UNSUPPORTED, TOPK ": rows of %lld values (at most 2^32 supported)",
                       (long long)n);
    if (indices->dtype == TO_I32 && n - 1 > INT32_MAX)
        return to_fail(TO_ERR_DTYPE, TOPK ": rows of %lld values need int64 indices", (long long)n);

    if (x->device == TO_CUDA)
        return to_cuda_topk(values, indices, x, k);
    return to_cpu_topk(values, indices, x, k);
}
