/* norm.c - to_rms_norm and to_add_rms_norm: validation and device dispatch.
 *
 * What is computed, per row v of the last dimension (length d):
 *   y = v * rinv * weight,  rinv = 1 / sqrt(mean(v^2) + eps)
 * all in f32 (the mean of squares is summed in double and rinv rounded to f32 once, within an ulp
 * of HF's f32 torch.rsqrt), rounded ONCE into out's dtype. HF's Qwen3/Llama/GLM RMSNorm rounds
 * the normalised value to the activation dtype before multiplying by the weight
 * (w * bf16(x * rinv), see the models reference section 1.1). On f32 that is the same thing; for
 * bit-exact HF parity on the bf16 path a model layer can call this with a weight of ones and
 * out in bf16, then to_mul by the weight. The default here is the more accurate single rounding.
 *
 * to_add_rms_norm first stores residual += x in residual's dtype (rounding there), and the norm
 * reads that stored, rounded residual: the result equals to_add(residual, residual, x) followed
 * by to_rms_norm(out, residual, weight, eps) bit for bit.
 *
 * Aliasing: out may be exactly x's view (in place); residual is written, so it must not overlap
 * out or weight, and may overlap x only as exactly the same view (then residual doubles).
 * Any other overlap is refused.
 */
#include "internal.h"
#include "cuda/cuda_ops.h"
#include "cpu/norm.h"

#include <math.h>

/* x has at least the normalised dimension; weight [d] and eps as to_check_norm_weight wants */
static int check_norm_args(const char *op, const to_tensor *x, const to_tensor *weight, double eps) {
    if (x->ndim < 1)
        return to_fail(TO_ERR_SHAPE, "%s: x must have at least 1 dimension (the normalised one), "
                       "got a 0-d tensor", op);
    return to_check_norm_weight(op, weight, to_row_len(x), eps);
}

int to_rms_norm(const to_tensor *out, const to_tensor *x, const to_tensor *weight, double eps) {
    const char *op = "to_rms_norm";
    TO_TRY(to_check_tensor(out, op, "out"));
    TO_TRY(to_check_tensor(x, op, "x"));
    TO_TRY(to_check_tensor(weight, op, "weight"));
    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, op, "out"));
    TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, op, "x"));
    TO_TRY(to_check_dtype(weight, TO_FLOAT_DTYPES, op, "weight"));
    TO_TRY(check_norm_args(op, x, weight, eps));
    TO_TRY(to_check_same_shape(out, x, op, "out", "x"));
    TO_TRY(to_check_same_device(op, out, x, weight, (const to_tensor *)NULL));
    TO_TRY(to_check_writable(out, op, "out"));
    TO_TRY(to_check_no_alias(out, x, 1, op, "out", "x"));
    TO_TRY(to_check_no_alias(out, weight, 0, op, "out", "weight"));
    if (out->device == TO_CUDA)
        return to_cuda_rms_norm(out, NULL, x, weight, eps);
    return to_cpu_rms_norm(out, NULL, x, weight, eps);
}

int to_add_rms_norm(const to_tensor *out, const to_tensor *residual, const to_tensor *x,
                    const to_tensor *weight, double eps) {
    const char *op = "to_add_rms_norm";
    TO_TRY(to_check_tensor(out, op, "out"));
    TO_TRY(to_check_tensor(residual, op, "residual"));
    TO_TRY(to_check_tensor(x, op, "x"));
    TO_TRY(to_check_tensor(weight, op, "weight"));
    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, op, "out"));
    TO_TRY(to_check_dtype(residual, TO_FLOAT_DTYPES, op, "residual"));
    TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, op, "x"));
    TO_TRY(to_check_dtype(weight, TO_FLOAT_DTYPES, op, "weight"));
    TO_TRY(to_check_same_shape(residual, x, op, "residual", "x"));
    TO_TRY(check_norm_args(op, x, weight, eps));
    TO_TRY(to_check_same_shape(out, residual, op, "out", "residual"));
    TO_TRY(to_check_same_device(op, out, residual, x, weight, (const to_tensor *)NULL));
    TO_TRY(to_check_writable(out, op, "out"));
    TO_TRY(to_check_writable(residual, op, "residual"));
    TO_TRY(to_check_no_alias(out, residual, 0, op, "out", "residual"));
    TO_TRY(to_check_no_alias(out, x, 1, op, "out", "x"));
    TO_TRY(to_check_no_alias(out, weight, 0, op, "out", "weight"));
    TO_TRY(to_check_no_alias(residual, x, 1, op, "residual", "x"));
    TO_TRY(to_check_no_alias(residual, weight, 0, op, "residual", "weight"));
    if (out->device == TO_CUDA)
        return to_cuda_rms_norm(out, residual, x, weight, eps);
    return to_cpu_rms_norm(out, residual, x, weight, eps);
}
