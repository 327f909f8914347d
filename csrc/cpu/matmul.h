/* matmul.h - the CPU matrix-product kernels behind to_matmul. */
#ifndef TO_CPU_MATMUL_H
#define TO_CPU_MATMUL_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* out[M, N] = x[M, K] . w[N, K]^T (+ bias[N]), accumulated in f32.
 * Arguments arrive validated by csrc/ops/matmul.c: CPU tensors; x, w, out rank 2 and bias rank 1
 * (or NULL), all f32/f16/bf16; shapes consistent; w and out with unit stride in the last
 * dimension (where it has more than one element); out rows not overlapping. */
int to_cpu_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias);

#pragma GCC visibility pop

#endif
