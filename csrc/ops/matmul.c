/* matmul.c - to_matmul, to_matmul_add, to_rms_norm_matmul and to_rms_norm_swiglu: validation and
 * device dispatch.
 * Everything about the arguments is checked here, so the kernels in cpu/matmul.c may trust
 * shapes, strides and dtypes. The fused forms exist for the GPU, where each is one kernel
 * in the decode step (csrc/cuda/matmul.cu); the CPU composes them from its kernels through an
 * f32 intermediate, which gives the same values as the separate ops. */
#include "internal.h"
#include "cpu/matmul.h"
#include "cpu/qmatmul.h"
#include "cuda/cuda_ops.h"

#include "cpu/elementwise.h"
#include "cpu/norm.h"

#include <string.h>

/* swiglu: w's rows interleave gate and up (N even) and out is [M, N / 2] (to_rms_norm_swiglu). */
static int check_matmul(const char *op, const to_tensor *out, const to_tensor *x, const to_tensor *w,
                        const to_tensor *bias, int swiglu) {
    TO_TRY(to_check_tensor(out, op, "out"));
    TO_TRY(to_check_tensor(x, op, "x"));
    TO_TRY(to_check_tensor(w, op, "w"));
    if (bias)
        TO_TRY(to_check_tensor(bias, op, "bias"));

    /* Block-quantized dtypes are weight formats: only w may have one (x is quantized to 8 bits
     * inside the kernel, out and bias stay float). */
    if (to_is_quantized(x->dtype) || to_is_quantized(out->dtype))
        return to_fail(TO_ERR_DTYPE, "%s: %s is %s, but block-quantized dtypes are only for w; x and "
                       "out must be f32, f16 or bf16", op, to_is_quantized(x->dtype) ? "x" : "out",
                       to_dtype_name(to_is_quantized(x->dtype) ? x->dtype : out->dtype));
    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, op, "out"));
    TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, op, "x"));
    TO_TRY(to_check_dtype(w, TO_FLOAT_DTYPES | TO_QUANT_DTYPES | TO_X8_DTYPES, op, "w"));
    if (bias)
        TO_TRY(to_check_dtype(bias, TO_FLOAT_DTYPES, op, "bias"));

    TO_TRY(to_check_ndim(x, 2, op, "x [M, K]"));
    TO_TRY(to_check_ndim(w, 2, op, "w [N, K]"));
    TO_TRY(to_check_ndim(out, 2, op, "out [M, N]"));
    if (bias)
        TO_TRY(to_check_ndim(bias, 1, op, "bias [N]"));

    /* bias may be NULL, which also ends the argument list */
    TO_TRY(to_check_same_device(op, out, x, w, bias, (const to_tensor *)NULL));

    int64_t M = x->shape[0], K = x->shape[1], N = w->shape[0];
    if (w->shape[1] != K)
        return to_fail(TO_ERR_SHAPE, "%s: x is [%lld, %lld] but w is [%lld, %lld]: the inner "
                       "dimensions (K) differ (w is [N, K] = [out_features, in_features])", op,
                       (long long)M, (long long)K, (long long)N, (long long)w->shape[1]);
    if (swiglu && N % 2)
        return to_fail(TO_ERR_SHAPE, "%s: w has N = %lld rows, but its rows must pair gate and up (N even)",
                       op, (long long)N);
    const int64_t cols = swiglu ? N / 2 : N;
    if (out->shape[0] != M || out->shape[1] != cols)
        return to_fail(TO_ERR_SHAPE, "%s: out has shape [%lld, %lld], expected [M, %s] = [%lld, %lld]", op,
                       (long long)out->shape[0], (long long)out->shape[1], swiglu ? "N / 2" : "N",
                       (long long)M, (long long)cols);
    if (bias && bias->shape[0] != N)
        return to_fail(TO_ERR_SHAPE, "%s: bias has shape [%lld], expected [N] = [%lld]", op,
                       (long long)bias->shape[0], (long long)N);

    /* Quantized weights are read whole blocks at a time along K (to_check_tensor has already
     * required this of w's own shape when it is not empty; say it in matmul's terms). */
    int bs = to_dtype_block_size(w->dtype);
    if (bs > 1 && K % bs)
        return to_fail(TO_ERR_SHAPE, "%s: w is %s, whose blocks hold %d elements, but K = %lld is not "
                       "a multiple of %d", op, to_dtype_name(w->dtype), bs, (long long)K, bs);

    /* The kernels read weight rows and write output rows as contiguous runs. A stride does not
     * matter along a dimension of one element. */
    if (K > 1 && w->strides[1] != 1)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: w must have unit stride in its last dimension, "
                       "got stride %lld (make it contiguous first)", op, (long long)w->strides[1]);
    if (cols > 1 && out->strides[1] != 1)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: out must have unit stride in its last "
                       "dimension, got stride %lld", op, (long long)out->strides[1]);
    /* Threads write different rows at once; rows that share elements would race. */
    if (M > 1 && cols > 0 && out->strides[0] < cols)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: out rows overlap (row stride %lld < %s = %lld)", op,
                       (long long)out->strides[0], swiglu ? "N / 2" : "N", (long long)cols);
    /* out is written while x, w and bias are still being read: no shared memory at all */
    TO_TRY(to_check_no_alias(out, x, 0, op, "out", "x"));
    TO_TRY(to_check_no_alias(out, w, 0, op, "out", "w"));
    if (bias)
        TO_TRY(to_check_no_alias(out, bias, 0, op, "out", "bias"));

    if (out->device == TO_CUDA && to_is_x8(w->dtype))
        return to_fail(TO_ERR_UNSUPPORTED, "%s: w is %s, a CPU layout; convert it to %s for a "
                       "GPU", op, to_dtype_name(w->dtype), to_dtype_name(to_x8_base(w->dtype)));
    return TO_OK;
}

static int cpu_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias) {
    return to_is_quantized(w->dtype) ? to_cpu_qmatmul(out, x, w, bias) : to_cpu_matmul(out, x, w, bias);
}

/* A contiguous f32 [rows, cols] intermediate on the CPU (to_host_free(t->data) after use). */
static int cpu_temp(to_tensor *t, int64_t rows, int64_t cols, const char *op) {
    memset(t, 0, sizeof *t);
    t->dtype = TO_F32;
    t->device = TO_CPU;
    t->ndim = 2;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->strides[0] = cols;
    t->strides[1] = 1;
    t->nbytes = rows * cols * (int64_t)sizeof(float);
    t->data = to_host_alloc((size_t)(t->nbytes ? t->nbytes : 1));
    if (!t->data)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "%s: no memory for a [%lld, %lld] f32 intermediate", op,
                       (long long)rows, (long long)cols);
    return TO_OK;
}

int to_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias) {
    const char *op = "to_matmul";
    TO_TRY(check_matmul(op, out, x, w, bias, 0));
    if (out->device == TO_CUDA)
        return to_cuda_matmul(out, x, w, bias, NULL, 0.0, TO_MM_STORE);
    return cpu_matmul(out, x, w, bias);
}

int to_matmul_add(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias) {
    const char *op = "to_matmul_add";
    TO_TRY(check_matmul(op, out, x, w, bias, 0));
    if (out->device == TO_CUDA)
        return to_cuda_matmul(out, x, w, bias, NULL, 0.0, TO_MM_ADD);
    to_tensor prod;
    TO_TRY(cpu_temp(&prod, out->shape[0], out->shape[1], op));
    int status = cpu_matmul(&prod, x, w, bias);
    if (status == TO_OK)
        status = to_cpu_elementwise(out, out, &prod, TO_EW_ADD, 1.0f);
    to_host_free(prod.data);
    return status;
}

/* The norm's checks, shared by the two normalising forms. */
static int check_norm(const char *op, const to_tensor *out, const to_tensor *x, const to_tensor *norm_weight,
                      double eps) {
    TO_TRY(to_check_norm_weight(op, norm_weight, x->shape[1], eps));
    TO_TRY(to_check_same_device(op, out, norm_weight, (const to_tensor *)NULL));
    return to_check_no_alias(out, norm_weight, 0, op, "out", "norm_weight");
}

/* rms_norm(x) into a CPU f32 intermediate, then its product with w into `prod` (out's own
 * arguments when prod is out). */
static int cpu_norm_matmul(const char *op, const to_tensor *prod, const to_tensor *x,
                           const to_tensor *norm_weight, double eps, const to_tensor *w,
                           const to_tensor *bias) {
    to_tensor normed;
    TO_TRY(cpu_temp(&normed, x->shape[0], x->shape[1], op));
    int status = to_cpu_rms_norm(&normed, NULL, x, norm_weight, eps);
    if (status == TO_OK)
        status = cpu_matmul(prod, &normed, w, bias);
    to_host_free(normed.data);
    return status;
}

int to_rms_norm_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *norm_weight, double eps,
                       const to_tensor *w, const to_tensor *bias) {
    const char *op = "to_rms_norm_matmul";
    TO_TRY(check_matmul(op, out, x, w, bias, 0));
    TO_TRY(check_norm(op, out, x, norm_weight, eps));
    if (out->device == TO_CUDA)
        return to_cuda_matmul(out, x, w, bias, norm_weight, eps, TO_MM_STORE);
    return cpu_norm_matmul(op, out, x, norm_weight, eps, w, bias);
}

int to_rms_norm_swiglu(const to_tensor *out, const to_tensor *x, const to_tensor *norm_weight, double eps,
                       const to_tensor *w, const to_tensor *bias) {
    const char *op = "to_rms_norm_swiglu";
    TO_TRY(check_matmul(op, out, x, w, bias, 1));
    TO_TRY(check_norm(op, out, x, norm_weight, eps));
    if (out->device == TO_CUDA)
        return to_cuda_matmul(out, x, w, bias, norm_weight, eps, TO_MM_SWIGLU);
    to_tensor prod;
    TO_TRY(cpu_temp(&prod, x->shape[0], w->shape[0], op));
    int status = cpu_norm_matmul(op, &prod, x, norm_weight, eps, w, bias);
    if (status == TO_OK) { /* gate: the even columns, up: the odd ones */
        to_tensor gate = prod, up = prod;
        gate.shape[1] = up.shape[1] = w->shape[0] / 2;
        gate.strides[1] = up.strides[1] = 2;
        up.data = (char *)prod.data + sizeof(float);
        status = to_cpu_elementwise(out, &gate, &up, TO_EW_SILU_MUL, 1.0f);
    }
    to_host_free(prod.data);
    return status;
}
