/* attention.h - the CPU kernels behind to_kv_cache_store and to_paged_attention. */
#ifndef TO_CPU_ATTENTION_H
#define TO_CPU_ATTENTION_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* k_cache/v_cache slot slot_mapping[t] <- k[t], v[t] (see tensor_ops.h). Arguments arrive
 * validated by csrc/ops/attention.c, slot values included (each < num_blocks * block_size, the
 * non-negative ones distinct); the caches are contiguous, of one dtype, and overlap nothing. */
int to_cpu_kv_cache_store(const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *k,
                          const to_tensor *v, const to_tensor *slot_mapping);

/* Causal attention of q [T, Hq, D] over the paged cache into out (see tensor_ops.h). Arguments
 * arrive validated by csrc/ops/attention.c, index values included: every block id the kernel
 * reads is in range, context_lens[s] >= the query count of s. Fails only when scratch memory
 * cannot be had. */
int to_cpu_paged_attention(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache,
                           const to_tensor *v_cache, const to_tensor *cu_seqlens_q,
                           const to_tensor *context_lens, const to_tensor *block_tables, double scale);

#pragma GCC visibility pop

#endif
