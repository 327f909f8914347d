/* matmul.c - to_matmul: validation and device dispatch.
 * Everything about the arguments is checked here, so the kernels in cpu/matmul.c may trust
 * shapes, strides and dtypes. */
#include "internal.h"
#include "cpu/matmul.h"
#include "cpu/qmatmul.h"
#include "cuda/cuda_ops.h"

#define OP "to_matmul"

int to_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias) {
    TO_TRY(to_check_tensor(out, OP, "out"));
    TO_TRY(to_check_tensor(x, OP, "x"));
    TO_TRY(to_check_tensor(w, OP, "w"));
    if (bias)
        TO_TRY(to_check_tensor(bias, OP, "bias"));

    /* Block-quantized dtypes are weight formats: only w may have one (x is quantized to 8 bits
     * inside the kernel, out and bias stay float). */
    if (to_is_quantized(x->dtype) || to_is_quantized(out->dtype))
        return to_fail(TO_ERR_DTYPE, OP ": %s is %s, but block-quantized dtypes are only for w; x and "
                       "out must be f32, f16 or bf16", to_is_quantized(x->dtype) ? "x" : "out",
                       to_dtype_name(to_is_quantized(x->dtype) ? x->dtype : out->dtype));
    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, OP, "out"));
    TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, OP, "x"));
    TO_TRY(to_check_dtype(w, TO_FLOAT_DTYPES | TO_QUANT_DTYPES | TO_X8_DTYPES, OP, "w"));
    if (bias)
        TO_TRY(to_check_dtype(bias, TO_FLOAT_DTYPES, OP, "bias"));

    TO_TRY(to_check_ndim(x, 2, OP, "x [M, K]"));
    TO_TRY(to_check_ndim(w, 2, OP, "w [N, K]"));
    TO_TRY(to_check_ndim(out, 2, OP, "out [M, N]"));
    if (bias)
        TO_TRY(to_check_ndim(bias, 1, OP, "bias [N]"));

    /* bias may be NULL, which also ends the argument list */
    TO_TRY(to_check_same_device(OP, out, x, w, bias, (const to_tensor *)NULL));

    int64_t M = x->shape[0], K = x->shape[1], N = w->shape[0];
    if (w->shape[1] != K)
        return to_fail(TO_ERR_SHAPE, OP ": x is [%lld, %lld] but w is [%lld, %lld]: the inner "
                       "dimensions (K) differ (w is [N, K] = [out_features, in_features])",
                       (long long)M, (long long)K, (long long)N, (long long)w->shape[1]);
    if (out->shape[0] != M || out->shape[1] != N)
        return to_fail(TO_ERR_SHAPE, OP ": out has shape [%lld, %lld], expected [M, N] = [%lld, %lld]",
                       (long long)out->shape[0], (long long)out->shape[1], (long long)M, (long long)N);
    if (bias && bias->shape[0] != N)
        return to_fail(TO_ERR_SHAPE, OP ": bias has shape [%lld], expected [N] = [%lld]",
                       (long long)bias->shape[0], (long long)N);

    /* Quantized weights are read whole blocks at a time along K (to_check_tensor has already
     * required this of w's own shape when it is not empty; say it in matmul's terms). */
    int bs = to_dtype_block_size(w->dtype);
    if (bs > 1 && K % bs)
        return to_fail(TO_ERR_SHAPE, OP ": w is %s, whose blocks hold %d elements, but K = %lld is not "
                       "a multiple of %d", to_dtype_name(w->dtype), bs, (long long)K, bs);

    /* The kernels read weight rows and write output rows as contiguous runs. A stride does not
     * matter along a dimension of one element. */
    if (K > 1 && w->strides[1] != 1)
        return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": w must have unit stride in its last dimension, "
                       "got stride %lld (make it contiguous first)", (long long)w->strides[1]);
    if (N > 1 && out->strides[1] != 1)
        return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": out must have unit stride in its last "
                       "dimension, got stride %lld", (long long)out->strides[1]);
    /* Threads write different rows at once; rows that share elements would race. */
    if (M > 1 && N > 0 && out->strides[0] < N)
        return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": out rows overlap (row stride %lld < N = %lld)",
                       (long long)out->strides[0], (long long)N);
    /* out is written while x, w and bias are still being read: no shared memory at all */
    TO_TRY(to_check_no_alias(out, x, 0, OP, "out", "x"));
    TO_TRY(to_check_no_alias(out, w, 0, OP, "out", "w"));
    if (bias)
        TO_TRY(to_check_no_alias(out, bias, 0, OP, "out", "bias"));

    if (out->device == TO_CUDA) {
        if (to_is_x8(w->dtype))
            return to_fail(TO_ERR_UNSUPPORTED, OP ": w is %s, a CPU layout; convert it to %s for a "
                           "GPU", to_dtype_name(w->dtype), to_dtype_name(to_x8_base(w->dtype)));
        return to_cuda_matmul(out, x, w, bias);
    }
    if (bs > 1)
        return to_cpu_qmatmul(out, x, w, bias);
    return to_cpu_matmul(out, x, w, bias);
}
