/* attention.c - to_kv_cache_store and to_paged_attention: validation and device dispatch (the
 * kernels are in csrc/cpu/attention.c).
 *
 * Everything is checked before anything is written, including the values of the index tensors
 * (slot_mapping, cu_seqlens_q, context_lens, block_tables): the kernels then read only cache rows
 * that exist and write only the slots and rows they own, whatever the caller passed. The index
 * values are read on the host, which is right while these ops are CPU only; a CUDA path will
 * need its own (device side) checks.
 *
 * Aliasing: the written tensors (the caches for the store, out for attention) must not overlap
 * any other argument; there is no in-place form.
 */
#include "internal.h"
#include "cuda/cuda_ops.h"
#include "cpu/attention.h"
#include "cpu/embedding.h" /* to_load_index */

#include <math.h>
#include <stdlib.h>

#define STORE "to_kv_cache_store"
#define ATTN "to_paged_attention"

/* Checks shared by both ops: the cache pair [num_blocks, block_size, Hkv, D], one dtype and shape,
 * contiguous (the kernels address rows by slot arithmetic), block_size >= 1. */
static int check_caches(const to_tensor *k_cache, const to_tensor *v_cache, const char *op) {
    TO_TRY(to_check_dtype(k_cache, TO_FLOAT_DTYPES, op, "k_cache"));
    TO_TRY(to_check_dtype(v_cache, TO_FLOAT_DTYPES, op, "v_cache"));
    TO_TRY(to_check_ndim(k_cache, 4, op, "k_cache [num_blocks, block_size, Hkv, D]"));
    TO_TRY(to_check_ndim(v_cache, 4, op, "v_cache [num_blocks, block_size, Hkv, D]"));
    TO_TRY(to_check_same_shape(k_cache, v_cache, op, "k_cache", "v_cache"));
    if (k_cache->dtype != v_cache->dtype)
        return to_fail(TO_ERR_DTYPE, "%s: k_cache has dtype %s but v_cache has dtype %s (the two "
                       "caches must have one dtype)", op, to_dtype_name(k_cache->dtype),
                       to_dtype_name(v_cache->dtype));
    if (!to_is_contiguous(k_cache))
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: k_cache must be contiguous", op);
    if (!to_is_contiguous(v_cache))
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: v_cache must be contiguous", op);
    if (k_cache->shape[1] < 1)
        return to_fail(TO_ERR_SHAPE, "%s: the caches have block_size 0 (dimension 1 of k_cache "
                       "must be at least 1)", op);
    return TO_OK;
}

/* ======================================================================== to_kv_cache_store */

typedef struct {
    int64_t slot, t;
} slot_entry;

static int cmp_slot(const void *a, const void *b) {
    const slot_entry *x = a, *y = b;
    if (x->slot != y->slot)
        return x->slot < y->slot ? -1 : 1;
    return x->t < y->t ? -1 : x->t > y->t;
}

/* Every slot < num_slots, and the non-negative ones distinct: the slots are sorted (with their
 * token index, for the message) and neighbours compared, O(T log T) whatever the cache size. */
int to_check_kv_slots(const char *op, const to_tensor *slot_mapping, int64_t num_slots) {
    int64_t T = slot_mapping->shape[0], n = 0;
    slot_entry *e = to_scratch(1, (size_t)(T > 0 ? T : 1) * sizeof(slot_entry));
    if (!e)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "%s: no memory to check %lld slots", op, (long long)T);
    for (int64_t t = 0; t < T; t++) {
        int64_t s = to_load_index(slot_mapping->data, slot_mapping->dtype, t * slot_mapping->strides[0]);
        if (s >= num_slots)
            return to_fail(TO_ERR_BOUNDS, "%s: slot_mapping[%lld] = %lld is not below num_blocks * "
                           "block_size = %lld (the caches' slots)", op, (long long)t, (long long)s,
                           (long long)num_slots);
        if (s >= 0)
            e[n++] = (slot_entry){s, t};
    }
    qsort(e, (size_t)n, sizeof *e, cmp_slot);
    for (int64_t i = 1; i < n; i++)
        if (e[i].slot == e[i - 1].slot)
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: slot_mapping[%lld] and slot_mapping[%lld] are "
                           "both slot %lld (slots must be distinct)", op, (long long)e[i - 1].t,
                           (long long)e[i].t, (long long)e[i].slot);
    return TO_OK;
}

int to_check_kv_caches(const char *op, const to_tensor *k_cache, const to_tensor *v_cache) {
    TO_TRY(to_check_tensor(k_cache, op, "k_cache"));
    TO_TRY(to_check_tensor(v_cache, op, "v_cache"));
    return check_caches(k_cache, v_cache, op);
}

/* Shared with to_rope_kv_store (csrc/ops/rope.c), whose k is a view of its out: `kname` says so
 * in the messages. */
int to_check_kv_store(const char *op, const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *k,
                      const char *kname, const to_tensor *v, const to_tensor *slot_mapping) {
    TO_TRY(to_check_tensor(k_cache, op, "k_cache"));
    TO_TRY(to_check_tensor(v_cache, op, "v_cache"));
    TO_TRY(to_check_tensor(k, op, kname));
    TO_TRY(to_check_tensor(v, op, "v"));
    TO_TRY(to_check_tensor(slot_mapping, op, "slot_mapping"));

    TO_TRY(check_caches(k_cache, v_cache, op));
    TO_TRY(to_check_dtype(k, TO_FLOAT_DTYPES, op, kname));
    TO_TRY(to_check_dtype(v, TO_FLOAT_DTYPES, op, "v"));
    TO_TRY(to_check_dtype(slot_mapping, TO_INDEX_DTYPES, op, "slot_mapping"));
    TO_TRY(to_check_ndim(k, 3, op, "k [T, Hkv, D]"));
    TO_TRY(to_check_ndim(v, 3, op, "v [T, Hkv, D]"));
    TO_TRY(to_check_ndim(slot_mapping, 1, op, "slot_mapping [T]"));
    TO_TRY(to_check_same_shape(k, v, op, kname, "v"));

    int64_t T = k->shape[0], Hkv = k_cache->shape[2], D = k_cache->shape[3];
    if (k->shape[1] != Hkv || k->shape[2] != D)
        return to_fail(TO_ERR_SHAPE, "%s: %s has rows of [%lld, %lld] but the caches hold [Hkv, D] = "
                       "[%lld, %lld]", op, kname, (long long)k->shape[1], (long long)k->shape[2],
                       (long long)Hkv, (long long)D);
    if (slot_mapping->shape[0] != T)
        return to_fail(TO_ERR_SHAPE, "%s: slot_mapping has %lld entries but %s has T = %lld tokens", op,
                       (long long)slot_mapping->shape[0], kname, (long long)T);

    TO_TRY(to_check_same_device(op, k_cache, v_cache, k, v, slot_mapping, (const to_tensor *)NULL));
    TO_TRY(to_check_writable(k_cache, op, "k_cache"));
    TO_TRY(to_check_writable(v_cache, op, "v_cache"));
    TO_TRY(to_check_no_alias(k_cache, v_cache, 0, op, "k_cache", "v_cache"));
    const to_tensor *inputs[] = {k, v, slot_mapping};
    const char *names[] = {kname, "v", "slot_mapping"};
    for (int i = 0; i < 3; i++) {
        TO_TRY(to_check_no_alias(k_cache, inputs[i], 0, op, "k_cache", names[i]));
        TO_TRY(to_check_no_alias(v_cache, inputs[i], 0, op, "v_cache", names[i]));
    }
    return TO_OK;
}

int to_kv_cache_store(const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *k,
                      const to_tensor *v, const to_tensor *slot_mapping) {
    TO_TRY(to_check_kv_store(STORE, k_cache, v_cache, k, "k", v, slot_mapping));
    if (k_cache->device == TO_CUDA) /* the kernel checks the slots (cuda_ops.h) */
        return to_cuda_kv_cache_store(k_cache, v_cache, k, v, slot_mapping);
    TO_TRY(to_check_kv_slots(STORE, slot_mapping, k_cache->shape[0] * k_cache->shape[1]));
    return to_cpu_kv_cache_store(k_cache, v_cache, k, v, slot_mapping);
}

/* ======================================================================= to_paged_attention */

/* The values of cu_seqlens_q, context_lens and block_tables (shapes already checked): sequence
 * boundaries from 0 to T, non-decreasing; each context at least its query count and covered by
 * its row of block_tables; every block id the kernel will read inside [0, num_blocks). */
int to_check_attention_batch(const to_tensor *cu, const to_tensor *ctx, const to_tensor *bt, int64_t T,
                             int64_t num_blocks, int64_t block_size) {
    int64_t S = ctx->shape[0], max_blocks = bt->shape[1];
    int64_t prev = to_load_index(cu->data, cu->dtype, 0);
    if (prev != 0)
        return to_fail(TO_ERR_INVALID_ARGUMENT, ATTN ": cu_seqlens_q[0] = %lld, expected 0",
                       (long long)prev);
    for (int64_t s = 0; s < S; s++) {
        int64_t next = to_load_index(cu->data, cu->dtype, (s + 1) * cu->strides[0]);
        if (next < prev)
            return to_fail(TO_ERR_INVALID_ARGUMENT, ATTN ": cu_seqlens_q[%lld] = %lld is less than "
                           "cu_seqlens_q[%lld] = %lld (it must be non-decreasing)", (long long)s + 1,
                           (long long)next, (long long)s, (long long)prev);
        if (next > T)
            return to_fail(TO_ERR_BOUNDS, ATTN ": cu_seqlens_q[%lld] = %lld is past T = %lld (q's "
                           "rows)", (long long)s + 1, (long long)next, (long long)T);
        int64_t n = next - prev, len = to_load_index(ctx->data, ctx->dtype, s * ctx->strides[0]);
        if (len < n)
            return to_fail(TO_ERR_INVALID_ARGUMENT, ATTN ": context_lens[%lld] = %lld is less than "
                           "the %lld queries of sequence %lld (the context includes them)",
                           (long long)s, (long long)len, (long long)n, (long long)s);
        /* len <= max_blocks * block_size, written so that it cannot overflow */
        int64_t blocks = len / block_size + (len % block_size != 0);
        if (blocks > max_blocks)
            return to_fail(TO_ERR_BOUNDS, ATTN ": context_lens[%lld] = %lld needs %lld blocks of "
                           "%lld but block_tables has %lld per sequence", (long long)s, (long long)len,
                           (long long)blocks, (long long)block_size, (long long)max_blocks);
        for (int64_t j = 0; j < blocks; j++) {
            int64_t b = to_load_index(bt->data, bt->dtype, s * bt->strides[0] + j * bt->strides[1]);
            if (b < 0 || b >= num_blocks)
                return to_fail(TO_ERR_BOUNDS, ATTN ": block_tables[%lld, %lld] = %lld is outside "
                               "[0, %lld) (num_blocks of the caches)", (long long)s, (long long)j,
                               (long long)b, (long long)num_blocks);
        }
        prev = next;
    }
    if (prev != T)
        return to_fail(TO_ERR_INVALID_ARGUMENT, ATTN ": cu_seqlens_q[%lld] = %lld, expected T = %lld "
                       "(q's rows)", (long long)S, (long long)prev, (long long)T);
    return TO_OK;
}

/* Everything but the index values; shared with to_rope_kv_attention (csrc/ops/rope.c), which
 * passes the first Hq heads of its qk as q (the messages name this op and its arguments). */
int to_check_paged_attention(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache,
                             const to_tensor *v_cache, const to_tensor *cu_seqlens_q,
                             const to_tensor *context_lens, const to_tensor *block_tables, double scale) {
    TO_TRY(to_check_tensor(out, ATTN, "out"));
    TO_TRY(to_check_tensor(q, ATTN, "q"));
    TO_TRY(to_check_tensor(k_cache, ATTN, "k_cache"));
    TO_TRY(to_check_tensor(v_cache, ATTN, "v_cache"));
    TO_TRY(to_check_tensor(cu_seqlens_q, ATTN, "cu_seqlens_q"));
    TO_TRY(to_check_tensor(context_lens, ATTN, "context_lens"));
    TO_TRY(to_check_tensor(block_tables, ATTN, "block_tables"));

    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, ATTN, "out"));
    TO_TRY(to_check_dtype(q, TO_FLOAT_DTYPES, ATTN, "q"));
    TO_TRY(check_caches(k_cache, v_cache, ATTN));
    TO_TRY(to_check_dtype(cu_seqlens_q, TO_INDEX_DTYPES, ATTN, "cu_seqlens_q"));
    TO_TRY(to_check_dtype(context_lens, TO_INDEX_DTYPES, ATTN, "context_lens"));
    TO_TRY(to_check_dtype(block_tables, TO_INDEX_DTYPES, ATTN, "block_tables"));

    TO_TRY(to_check_ndim(q, 3, ATTN, "q [T, Hq, D]"));
    TO_TRY(to_check_same_shape(out, q, ATTN, "out", "q"));
    TO_TRY(to_check_ndim(cu_seqlens_q, 1, ATTN, "cu_seqlens_q [S + 1]"));
    TO_TRY(to_check_ndim(context_lens, 1, ATTN, "context_lens [S]"));
    TO_TRY(to_check_ndim(block_tables, 2, ATTN, "block_tables [S, max_blocks]"));

    int64_t Hq = q->shape[1], D = q->shape[2];
    int64_t Hkv = k_cache->shape[2], S = context_lens->shape[0];
    if (k_cache->shape[3] != D)
        return to_fail(TO_ERR_SHAPE, ATTN ": q has head size D = %lld but the caches have D = %lld",
                       (long long)D, (long long)k_cache->shape[3]);
    if (Hkv == 0 ? Hq != 0 : Hq % Hkv != 0)
        return to_fail(TO_ERR_SHAPE, ATTN ": q has Hq = %lld heads, not a multiple of the caches' "
                       "Hkv = %lld", (long long)Hq, (long long)Hkv);
    if (cu_seqlens_q->shape[0] != S + 1)
        return to_fail(TO_ERR_SHAPE, ATTN ": cu_seqlens_q has %lld entries, expected S + 1 = %lld "
                       "(context_lens has S = %lld)", (long long)cu_seqlens_q->shape[0],
                       (long long)S + 1, (long long)S);
    if (block_tables->shape[0] != S)
        return to_fail(TO_ERR_SHAPE, ATTN ": block_tables has %lld rows but context_lens has S = "
                       "%lld sequences", (long long)block_tables->shape[0], (long long)S);
    if (!isfinite(scale))
        return to_fail(TO_ERR_INVALID_ARGUMENT, ATTN ": scale must be finite, got %g", scale);

    TO_TRY(to_check_same_device(ATTN, out, q, k_cache, v_cache, cu_seqlens_q, context_lens,
                                block_tables, (const to_tensor *)NULL));
    TO_TRY(to_check_writable(out, ATTN, "out"));
    const to_tensor *inputs[] = {q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables};
    const char *names[] = {"q", "k_cache", "v_cache", "cu_seqlens_q", "context_lens", "block_tables"};
    for (int i = 0; i < 6; i++)
        TO_TRY(to_check_no_alias(out, inputs[i], 0, ATTN, "out", names[i]));
    return TO_OK;
}

int to_paged_attention(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache,
                       const to_tensor *v_cache, const to_tensor *cu_seqlens_q,
                       const to_tensor *context_lens, const to_tensor *block_tables, double scale) {
    TO_TRY(to_check_paged_attention(out, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                    scale));
    if (out->device == TO_CUDA) /* the kernels check the batch's values (cuda_ops.h) */
        return to_cuda_paged_attention(out, q, k_cache, v_cache, cu_seqlens_q, context_lens,
                                       block_tables, scale);
    TO_TRY(to_check_attention_batch(cu_seqlens_q, context_lens, block_tables, q->shape[0],
                                    k_cache->shape[0], k_cache->shape[1]));
    return to_cpu_paged_attention(out, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables,
                                  scale);
}
