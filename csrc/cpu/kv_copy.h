/* kv_copy.h - the CPU kernel behind to_kv_copy_blocks. */
#ifndef TO_CPU_KV_COPY_H
#define TO_CPU_KV_COPY_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* Block dst[i] of every cache = its block src[i]. Arguments arrive validated by
 * csrc/ops/kv_copy.c: CPU caches of one dtype and shape, ids in range, the pairs independent. */
int to_cpu_kv_copy_blocks(const to_tensor *caches, int num_caches, const to_tensor *src, const to_tensor *dst);

#pragma GCC visibility pop

#endif
