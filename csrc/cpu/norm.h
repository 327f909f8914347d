/* norm.h - the CPU kernels behind to_rms_norm and to_add_rms_norm. */
#ifndef TO_CPU_NORM_H
#define TO_CPU_NORM_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* Per row r of the last dimension (length d):
 *   residual == NULL:  out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight
 *   residual != NULL:  residual[r] += x[r] (stored, rounded, in residual's dtype), then the same
 *                      with the stored residual row in place of x[r].
 * Arguments arrive validated by csrc/ops/norm.c: CPU tensors of float dtypes, out (and residual)
 * of x's shape, weight [d], eps >= 0 and finite; written tensors free of self-overlap, out at most
 * exactly x's view, residual disjoint from out and weight and at most exactly x's view. */
int to_cpu_rms_norm(const to_tensor *out, const to_tensor *residual, const to_tensor *x,
                    const to_tensor *weight, double eps);

/* sum of v[i]^2 in double, in the order every CPU norm uses (to_rms_norm_rope too, so the two
 * give the same rinv): avx2 selects the vector path, whose order differs from the scalar one. */
double to_cpu_sumsq(const float *v, int64_t n, int avx2);

#pragma GCC visibility pop

#endif
