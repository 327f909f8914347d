/* rope.c - to_rope and to_rms_norm_rope: validation and device dispatch (the kernels and their
 * formulas are in csrc/cpu/rope.c).
 *
 * Positions may be any int32/int64 values, in any order (negative ones too: the angle is just
 * float(pos) * inv_freq). out may be exactly x's view (in place); any other overlap of out with
 * x, positions, inv_freq (or weight) is refused.
 *
 * HF parity: cos/sin and the rotation are f32 whatever x's dtype, rounded once into out. On its
 * bf16 path transformers rounds cos/sin to bf16 and does each multiply and add of the rotation
 * in bf16 (models reference section 1.4), so bf16 results differ from HF's by bf16 roundings;
 * f32 results match HF's f32 ones (same f32 angles, correctly rounded cos/sin, same operation
 * order, no FMA). to_rms_norm_rope keeps the normalised head in f32 between the two steps, so
 * HF's bf16 rounding of q_norm's output is skipped too (one rounding fewer, never more).
 */
#include "internal.h"
#include "cuda/cuda_ops.h"
#include "cpu/rope.h"

#include <math.h>

/* Everything to_rope checks (for both ops: `op` names the caller in the messages). */
static int check_rope_args(const char *op, const to_tensor *out, const to_tensor *x,
                           const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                           int interleaved, double attention_scaling) {
    TO_TRY(to_check_tensor(out, op, "out"));
    TO_TRY(to_check_tensor(x, op, "x"));
    TO_TRY(to_check_tensor(positions, op, "positions"));
    TO_TRY(to_check_tensor(inv_freq, op, "inv_freq"));

    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, op, "out"));
    TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, op, "x"));
    TO_TRY(to_check_dtype(positions, TO_INDEX_DTYPES, op, "positions"));
    TO_TRY(to_check_dtype(inv_freq, TO_MASK(TO_F32), op, "inv_freq"));

    TO_TRY(to_check_ndim(x, 3, op, "x [T, H, D]"));
    TO_TRY(to_check_ndim(positions, 1, op, "positions [T]"));
    TO_TRY(to_check_ndim(inv_freq, 1, op, "inv_freq [rotary_dim / 2]"));
    TO_TRY(to_check_same_shape(out, x, op, "out", "x"));

    int64_t T = x->shape[0], D = x->shape[2];
    if (positions->shape[0] != T)
        return to_fail(TO_ERR_SHAPE, "%s: positions has %lld entries but x has T = %lld tokens", op,
                       (long long)positions->shape[0], (long long)T);
    if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > D)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: rotary_dim must be even and in 1..D = %lld, "
                       "got %d", op, (long long)D, rotary_dim);
    if (inv_freq->shape[0] != rotary_dim / 2)
        return to_fail(TO_ERR_SHAPE, "%s: inv_freq has %lld entries, expected rotary_dim / 2 = %d", op,
                       (long long)inv_freq->shape[0], rotary_dim / 2);
    if (interleaved != 0 && interleaved != 1)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: interleaved must be 0 or 1, got %d", op, interleaved);
    if (!isfinite(attention_scaling))
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: attention_scaling must be finite, got %g", op,
                       attention_scaling);

    TO_TRY(to_check_same_device(op, out, x, positions, inv_freq, (const to_tensor *)NULL));
    TO_TRY(to_check_writable(out, op, "out"));
    TO_TRY(to_check_no_alias(out, x, 1, op, "out", "x"));
    TO_TRY(to_check_no_alias(out, positions, 0, op, "out", "positions"));
    TO_TRY(to_check_no_alias(out, inv_freq, 0, op, "out", "inv_freq"));
    return TO_OK;
}

int to_rope(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
            const to_tensor *inv_freq, int rotary_dim, int interleaved, double attention_scaling) {
    TO_TRY(check_rope_args("to_rope", out, x, positions, inv_freq, rotary_dim, interleaved,
                           attention_scaling));
    if (out->device == TO_CUDA)
        return to_cuda_rope(out, x, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
    return to_cpu_rope(out, x, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
}

int to_rms_norm_rope(const to_tensor *out, const to_tensor *x, const to_tensor *weight, double eps,
                     const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                     int interleaved, double attention_scaling) {
    const char *op = "to_rms_norm_rope";
    TO_TRY(check_rope_args(op, out, x, positions, inv_freq, rotary_dim, interleaved, attention_scaling));
    /* weight [D] for every head, or [H, D]: a weight per head (q's and k's norms in one call) */
    if (weight && weight->ndim == 2) {
        if (weight->shape[0] != x->shape[1])
            return to_fail(TO_ERR_SHAPE, "%s: weight has %lld rows but x has H = %lld heads (a per-head "
                           "weight is [H, D])", op, (long long)weight->shape[0], (long long)x->shape[1]);
        to_tensor row = *weight; /* one head's weight, for the checks of a [D] weight */
        row.ndim = 1;
        row.shape[0] = weight->shape[1];
        row.strides[0] = weight->strides[1];
        TO_TRY(to_check_tensor(weight, op, "weight"));
        TO_TRY(to_check_norm_weight(op, &row, x->shape[2], eps));
    } else {
        TO_TRY(to_check_norm_weight(op, weight, x->shape[2], eps));
    }
    TO_TRY(to_check_same_device(op, out, weight, (const to_tensor *)NULL));
    TO_TRY(to_check_no_alias(out, weight, 0, op, "out", "weight"));
    if (out->device == TO_CUDA)
        return to_cuda_rms_norm_rope(out, x, weight, eps, positions, inv_freq, rotary_dim, interleaved,
                                     attention_scaling);
    return to_cpu_rms_norm_rope(out, x, weight, eps, positions, inv_freq, rotary_dim, interleaved,
                                attention_scaling);
}
