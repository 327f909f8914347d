/* moe.h - the CPU kernels behind the MoE routing ops to_gather_by_value and
 * to_scatter_add_by_index. Arguments arrive validated by csrc/ops/moe.c (CPU tensors, dtypes,
 * ranks and shapes); the index values are checked here, before anything is written. */
#ifndef TO_CPU_MOE_H
#define TO_CPU_MOE_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* values [T, k]; order [T*k]; offsets [num_values + 1]; rows [T*k, D] and x [T, D], or rows NULL. */
int to_cpu_gather_by_value(const to_tensor *rows, const to_tensor *order, const to_tensor *offsets,
                           const to_tensor *x, const to_tensor *values, int64_t num_values);

/* out [T, D] += weight[i] * src [N, D] rows at index [N]; weight [N] f32 or NULL. */
int to_cpu_scatter_add_by_index(const to_tensor *out, const to_tensor *src, const to_tensor *index,
                                const to_tensor *weight);

#pragma GCC visibility pop

#endif
