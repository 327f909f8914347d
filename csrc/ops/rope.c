/* rope.c - to_rope: validation and device dispatch (the kernel and its formulas are in
 * csrc/cpu/rope.c).
 *
 * Positions may be any int32/int64 values, in any order (negative ones too: the angle is just
 * float(pos) * inv_freq). out may be exactly x's view (in place); any other overlap of out with
 * x, positions or inv_freq is refused.
 *
 * HF parity: cos/sin and the rotation are f32 whatever x's dtype, rounded once into out. On its
 * bf16 path transformers rounds cos/sin to bf16 and does each multiply and add of the rotation
 * in bf16 (models reference section 1.4), so bf16 results differ from HF's by bf16 roundings;
 * f32 results match HF's f32 ones (same f32 angles, correctly rounded cos/sin, same operation
 * order, no FMA).
 */
#include "internal.h"
#include "cuda/cuda_ops.h"
#include "cpu/rope.h"

#include <math.h>

#define OP "to_rope"

int to_rope(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
            const to_tensor *inv_freq, int rotary_dim, int interleaved, double attention_scaling) {
    TO_TRY(to_check_tensor(out, OP, "out"));
    TO_TRY(to_check_tensor(x, OP, "x"));
    TO_TRY(to_check_tensor(positions, OP, "positions"));
    TO_TRY(to_check_tensor(inv_freq, OP, "inv_freq"));

    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, OP, "out"));
    TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, OP, "x"));
    TO_TRY(to_check_dtype(positions, TO_INDEX_DTYPES, OP, "positions"));
    TO_TRY(to_check_dtype(inv_freq, TO_MASK(TO_F32), OP, "inv_freq"));

    TO_TRY(to_check_ndim(x, 3, OP, "x [T, H, D]"));
    TO_TRY(to_check_ndim(positions, 1, OP, "positions [T]"));
    TO_TRY(to_check_ndim(inv_freq, 1, OP, "inv_freq [rotary_dim / 2]"));
    TO_TRY(to_check_same_shape(out, x, OP, "out", "x"));

    int64_t T = x->shape[0], D = x->shape[2];
    if (positions->shape[0] != T)
        return to_fail(TO_ERR_SHAPE, OP ": positions has %lld entries but x has T = %lld tokens",
                       (long long)positions->shape[0], (long long)T);
    if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > D)
        return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": rotary_dim must be even and in 1..D = %lld, "
                       "got %d", (long long)D, rotary_dim);
    if (inv_freq->shape[0] != rotary_dim / 2)
        return to_fail(TO_ERR_SHAPE, OP ": inv_freq has %lld entries, expected rotary_dim / 2 = %d",
                       (long long)inv_freq->shape[0], rotary_dim / 2);
    if (interleaved != 0 && interleaved != 1)
        return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": interleaved must be 0 or 1, got %d", interleaved);
    if (!isfinite(attention_scaling))
        return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": attention_scaling must be finite, got %g",
                       attention_scaling);

    TO_TRY(to_check_same_device(OP, out, x, positions, inv_freq, (const to_tensor *)NULL));
    TO_TRY(to_check_writable(out, OP, "out"));
    TO_TRY(to_check_no_alias(out, x, 1, OP, "out", "x"));
    TO_TRY(to_check_no_alias(out, positions, 0, OP, "out", "positions"));
    TO_TRY(to_check_no_alias(out, inv_freq, 0, OP, "out", "inv_freq"));
    if (out->device == TO_CUDA)
        return to_cuda_rope(out, x, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
    return to_cpu_rope(out, x, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
}
