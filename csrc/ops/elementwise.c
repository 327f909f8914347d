/* elementwise.c - to_add, to_mul, to_scale, to_silu_mul, to_softmax: validation and device
 * dispatch.
 *
 * Aliasing rule of these ops (checked by core/check.c's to_check_writable/to_check_no_alias): out may be exactly the view of an input (same pointer, dtype,
 * shape and strides: the op then works in place, since every element is read before it is
 * written), otherwise out must not touch any byte an input reaches. Partial overlaps (a shifted
 * or interleaved view of the same buffer) are refused rather than given an order-dependent
 * result. out must not address one element twice (no stride-0 dimension of size > 1).
 *
 * The header does not promise an in-place to_softmax, but its kernel reads every chunk of a row
 * before writing it, so the same rule (exact view allowed) applies there too. */
#include "internal.h"
#include "cuda/cuda_ops.h"
#include "cpu/elementwise.h"

#include <stdint.h>


/* ---- the ops ---- */

static int run_elementwise(const to_tensor *out, const to_tensor *a, const to_tensor *b, int op, float scale) {
    if (out->device == TO_CUDA)
        return to_cuda_elementwise(out, a, b, op, scale);
    return to_cpu_elementwise(out, a, b, op, scale);
}

/* Checks shared by the elementwise ops; b may be NULL (to_scale). */
static int check_elementwise(const char *op, const to_tensor *out, const char *aname,
                             const to_tensor *a, const char *bname, const to_tensor *b) {
    TO_TRY(to_check_tensor(out, op, "out"));
    TO_TRY(to_check_tensor(a, op, aname));
    if (bname)
        TO_TRY(to_check_tensor(b, op, bname));
    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, op, "out"));
    TO_TRY(to_check_dtype(a, TO_FLOAT_DTYPES, op, aname));
    if (bname) {
        TO_TRY(to_check_dtype(b, TO_FLOAT_DTYPES, op, bname));
        TO_TRY(to_check_same_shape(a, b, op, aname, bname));
    }
    TO_TRY(to_check_same_shape(out, a, op, "out", aname));
    TO_TRY(to_check_same_device(op, out, a, bname ? b : NULL, (const to_tensor *)NULL));
    TO_TRY(to_check_writable(out, op, "out"));
    TO_TRY(to_check_no_alias(out, a, 1, op, "out", aname));
    if (bname)
        TO_TRY(to_check_no_alias(out, b, 1, op, "out", bname));
    return TO_OK;
}

int to_add(const to_tensor *out, const to_tensor *a, const to_tensor *b) {
    TO_TRY(check_elementwise("to_add", out, "a", a, "b", b));
    return run_elementwise(out, a, b, TO_EW_ADD, 0.0f);
}

int to_mul(const to_tensor *out, const to_tensor *a, const to_tensor *b) {
    TO_TRY(check_elementwise("to_mul", out, "a", a, "b", b));
    return run_elementwise(out, a, b, TO_EW_MUL, 0.0f);
}

/* The factor is rounded to f32 and the product taken in f32, as torch does for a float tensor
 * times a Python number (its "opmath" type is float). Any double is accepted: a factor beyond
 * the f32 range becomes +-inf, NaN gives NaN, as IEEE arithmetic says. */
int to_scale(const to_tensor *out, const to_tensor *x, double scale) {
    TO_TRY(check_elementwise("to_scale", out, "x", x, NULL, NULL));
    return run_elementwise(out, x, NULL, TO_EW_SCALE, (float)scale);
}

int to_silu_mul(const to_tensor *out, const to_tensor *gate, const to_tensor *up) {
    TO_TRY(check_elementwise("to_silu_mul", out, "gate", gate, "up", up));
    return run_elementwise(out, gate, up, TO_EW_SILU_MUL, 0.0f);
}

/* Softmax over the last dimension (a 0-d tensor is one row of one element), in f32 with the row
 * maximum subtracted. Rows follow IEEE arithmetic as torch.softmax does: -inf entries get 0; a
 * row whose entries are all -inf, or that holds a NaN or +inf, comes out all NaN. */
int to_softmax(const to_tensor *out, const to_tensor *x) {
    TO_TRY(check_elementwise("to_softmax", out, "x", x, NULL, NULL));
    return out->device == TO_CUDA ? to_cuda_softmax(out, x) : to_cpu_softmax(out, x);
}
