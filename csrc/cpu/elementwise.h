/* elementwise.h - the CPU kernels behind to_add, to_mul, to_scale, to_silu_mul and to_softmax. */
#ifndef TO_CPU_ELEMENTWISE_H
#define TO_CPU_ELEMENTWISE_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* ---- kernels (arguments arrive validated by csrc/ops/elementwise.c) ---- */

typedef enum {
    TO_EW_ADD = 0,      /* out = a + b */
    TO_EW_MUL = 1,      /* out = a * b */
    TO_EW_SCALE = 2,    /* out = a * scale (b unused, may be NULL) */
    TO_EW_SILU_MUL = 3  /* out = silu(a) * b */
} to_ew_op;

/* Elementwise out = op(a, b), computed in f32. Validated: CPU tensors of float dtypes, a, b and
 * out of one shape (any strides, stride 0 allowed on a and b), out free of self-overlap and
 * either exactly the view of an input or disjoint from it. */
int to_cpu_elementwise(const to_tensor *out, const to_tensor *a, const to_tensor *b, int op, float scale);

/* Softmax over the last dimension in f32. Same guarantees for out and x as above. */
int to_cpu_softmax(const to_tensor *out, const to_tensor *x);

#pragma GCC visibility pop

#endif
