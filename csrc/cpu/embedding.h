/* embedding.h - the CPU kernel behind to_embedding, and the index helpers it shares with the
 * MoE routing kernels (cpu/moe.c): reading an i32/i64 index tensor, checking every index is in
 * range before anything is written, and copying one row between (possibly different) dtypes. */
#ifndef TO_CPU_EMBEDDING_H
#define TO_CPU_EMBEDDING_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* Element `offset` (in elements) of an i32 or i64 buffer, as int64. */
static inline int64_t to_load_index(const void *base, int dtype, int64_t offset) {
    return dtype == TO_I32 ? (int64_t)((const int32_t *)base)[offset] : ((const int64_t *)base)[offset];
}

static inline void to_store_index(void *base, int dtype, int64_t offset, int64_t v) {
    if (dtype == TO_I32)
        ((int32_t *)base)[offset] = (int32_t)v;
    else
        ((int64_t *)base)[offset] = v;
}

/* TO_OK when every element of the i32/i64 tensor `ids` (any rank, any strides) lies in
 * [0, limit); otherwise a TO_ERR_BOUNDS error naming the first bad element's position and value,
 * e.g. "to_embedding: ids[3] = 70000 is outside [0, 32000) (the table's rows)". `what` says
 * what the limit is. */
int to_cpu_check_indices(const to_tensor *ids, int64_t limit, const char *op, const char *name,
                         const char *what);

/* dst[i * so] = src[i * sx] for i < n. Same dtype: the bytes are moved; otherwise the values go
 * through f32 (rounding to nearest even into f16/bf16): dst is a float dtype, src a float or
 * quantized one (a quantized src is a contiguous run of whole blocks, sx = 1). */
void to_cpu_copy_row(void *dst, int dto, int64_t so, const void *src, int dtx, int64_t sx, int64_t n);

/* out[t, :] = table[ids[t], :]. Validated by csrc/ops/embedding.c except the id values, which
 * this checks first (nothing is written when one is out of range). */
int to_cpu_embedding(const to_tensor *out, const to_tensor *table, const to_tensor *ids);

#pragma GCC visibility pop

#endif
