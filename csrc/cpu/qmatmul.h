/* qmatmul.h - the CPU kernels behind to_matmul when the weights are block-quantized. */
#ifndef TO_CPU_QMATMUL_H
#define TO_CPU_QMATMUL_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* out[M, N] = x[M, K] . w[N, K]^T (+ bias[N]) with w in Q8_0, Q4_0, Q4_1, Q4_K or Q6_K, read
 * in place. Arguments arrive validated by csrc/ops/matmul.c: CPU tensors; x, out, bias float
 * (f32/f16/bf16), x any strides; w rank 2 with K a whole number of blocks and rows a whole number
 * of blocks apart; out with unit stride in its last dimension and rows that do not overlap.
 * Each row of x is quantized to 8 bits per call (see qmatmul.c for what that costs). */
int to_cpu_qmatmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias);

#pragma GCC visibility pop

#endif
