/* reduce.h - the CPU kernels behind to_argmax and to_topk. */
#ifndef TO_CPU_REDUCE_H
#define TO_CPU_REDUCE_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* Both rank values the same way: NaN counts as larger than every number (as torch does), and
 * of two equal values (or two NaNs) the one with the lower index ranks first.
 * Arguments arrive validated by csrc/ops/reduce.c: CPU tensors, x f32/f16/bf16 with rows of at
 * least one element (or no rows), outputs shaped for x's rows. */

/* out[r] (i64, element r of out in flat order) = index of the largest value of row r of x. */
int to_cpu_argmax(const to_tensor *out, const to_tensor *x);

/* values[r, :] / indices[r, :] (row r of each, k elements) = the k best of row r of x, best
 * first. values: f32 or x's dtype; indices: i32 or i64. 1 <= k <= row length. */
int to_cpu_topk(const to_tensor *values, const to_tensor *indices, const to_tensor *x, int64_t k);

#pragma GCC visibility pop

#endif
