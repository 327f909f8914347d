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

/* Shared by the dense and quantized kernels: *bias_f32 = the bias as f32 in scratch buffer 1,
 * or NULL without one; when K = 0 (an empty sum) also writes every row of out as the bias (or
 * zeros), which is then the whole answer. */
int to_cpu_matmul_bias(const to_tensor *out, const to_tensor *bias, int64_t K, const float **bias_f32);

#pragma GCC visibility pop

#endif
