/* rope.c - to_rope, to_rms_norm_rope, to_rope_kv_store and to_rope_kv_attention: validation and
 * device dispatch (the kernels and their formulas are in csrc/cpu/rope.c; the store's and
 * attention's in csrc/cpu/attention.c).
 *
 * Positions may be any int32/int64 values, in any order (negative ones too: the angle is just
 * float(pos) * inv_freq). out may be exactly x's view (in place); any other overlap of out with
 * x, positions, inv_freq (or weight) is refused.
 *
 * HF parity: cos/sin and the rotation are f32 whatever x's dtype, rounded once into out. On its
 * bf16 path transformers rounds cos/sin to bf16 and does each multiply and add of the rotation
 * in bf16 (models reference section 1.4), so bf16 results differ from HF's by bf16 roundings;
 * f32 results match HF's f32 ones (same f32 angles, correctly rounded cos/sin, same operation
 * order, no FMA). to_rms_norm_rope keeps the normalised head in f32 between the two steps, so
 * HF's bf16 rounding of q_norm's output is skipped too (one rounding fewer, never more).
 *
 * to_rope_kv_store is either op followed by to_kv_cache_store of out's last Hkv heads and v,
 * validated as those ops are (their checks are shared, named after it) plus what fusing them
 * needs: the caches overlap none of the rotation's tensors, and out overlaps neither v nor the
 * slots (v beside qk in one stacked qkv product, interleaved row by row, shares no element and
 * is accepted). On the CPU the slots are checked before anything is written, then the two ops'
 * kernels run one after the other (the same bits as the two calls); on a GPU one kernel does both.
 *
 * to_rope_kv_attention is to_rope_kv_store into a temporary followed by to_paged_attention over
 * the q heads of that temporary. qk is read, never written (on a GPU every block of the fused
 * kernel reads qk's q heads, so none may write them back). The rotated heads are a temporary of
 * qk's dtype and shape: per-thread scratch on the CPU, a workspace or registers / shared memory on
 * a GPU; so q and k are rounded to qk's dtype, as the separate ops would pass them on. It is
 * checked by both ops' check functions (their messages name them: to_rope_kv_store's in its
 * in-place form, out = qk, to_paged_attention's with q the first Hq heads of qk) plus out's
 * overlaps and the fused GPU kernel's precondition (each token's slot is its position's;
 * tensor_ops.h says why). On the CPU all values are checked before anything is written, then the
 * ops' kernels run in turn, the rotation into the scratch.
 */
#include "internal.h"
#include "cuda/cuda_ops.h"
#include "cpu/rope.h"
#include "cpu/attention.h"
#include "cpu/embedding.h" /* to_load_index */

#include <math.h>
#include <stdio.h>

/* Everything to_rope checks (for every op: `op` names the caller in the messages, `xname` its x). */
static int check_rope_args(const char *op, const to_tensor *out, const to_tensor *x, const char *xname,
                           const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                           int interleaved, double attention_scaling) {
    char xshape[32];
    snprintf(xshape, sizeof xshape, "%s [T, H, D]", xname);
    TO_TRY(to_check_tensor(out, op, "out"));
    TO_TRY(to_check_tensor(x, op, xname));
    TO_TRY(to_check_tensor(positions, op, "positions"));
    TO_TRY(to_check_tensor(inv_freq, op, "inv_freq"));

    TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, op, "out"));
    TO_TRY(to_check_dtype(x, TO_FLOAT_DTYPES, op, xname));
    TO_TRY(to_check_dtype(positions, TO_INDEX_DTYPES, op, "positions"));
    TO_TRY(to_check_dtype(inv_freq, TO_MASK(TO_F32), op, "inv_freq"));

    TO_TRY(to_check_ndim(x, 3, op, xshape));
    TO_TRY(to_check_ndim(positions, 1, op, "positions [T]"));
    TO_TRY(to_check_ndim(inv_freq, 1, op, "inv_freq [rotary_dim / 2]"));
    TO_TRY(to_check_same_shape(out, x, op, "out", xname));

    int64_t T = x->shape[0], D = x->shape[2];
    if (positions->shape[0] != T)
        return to_fail(TO_ERR_SHAPE, "%s: positions has %lld entries but %s has T = %lld tokens", op,
                       (long long)positions->shape[0], xname, (long long)T);
    if (rotary_dim <= 0 || rotary_dim % 2 != 0 || rotary_dim > D)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: rotary_dim must be even and in 1..D = %lld, "
                       "got %d", op, (long long)D, rotary_dim);
    if (inv_freq->shape[0] != rotary_dim / 2)
        return to_fail(TO_ERR_SHAPE, "%s: inv_freq has %lld entries, expected rotary_dim / 2 = %d", op,
                       (long long)inv_freq->shape[0], rotary_dim / 2);
    if (interleaved != 0 && interleaved != 1)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: interleaved must be 0 or 1, got %d", op, interleaved);
    if (!isfinite(attention_scaling))
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: attention_scaling must be finite, got %g", op,
                       attention_scaling);

    TO_TRY(to_check_same_device(op, out, x, positions, inv_freq, (const to_tensor *)NULL));
    TO_TRY(to_check_writable(out, op, "out"));
    TO_TRY(to_check_no_alias(out, x, 1, op, "out", xname));
    TO_TRY(to_check_no_alias(out, positions, 0, op, "out", "positions"));
    TO_TRY(to_check_no_alias(out, inv_freq, 0, op, "out", "inv_freq"));
    return TO_OK;
}

int to_rope(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
            const to_tensor *inv_freq, int rotary_dim, int interleaved, double attention_scaling) {
    TO_TRY(check_rope_args("to_rope", out, x, "x", positions, inv_freq, rotary_dim, interleaved,
                           attention_scaling));
    if (out->device == TO_CUDA)
        return to_cuda_rope(out, x, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
    return to_cpu_rope(out, x, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
}

/* The norm's weight: [D] for every head, or [H, D], a weight per head (q's and k's norms in one
 * call); on out's device and disjoint from it. */
static int check_norm_weight(const char *op, const to_tensor *out, const to_tensor *x, const char *xname,
                             const to_tensor *weight, double eps) {
    if (weight && weight->ndim == 2) {
        if (weight->shape[0] != x->shape[1])
            return to_fail(TO_ERR_SHAPE, "%s: weight has %lld rows but %s has H = %lld heads (a per-head "
                           "weight is [H, D])", op, (long long)weight->shape[0], xname, (long long)x->shape[1]);
        to_tensor row = *weight; /* one head's weight, for the checks of a [D] weight */
        row.ndim = 1;
        row.shape[0] = weight->shape[1];
        row.strides[0] = weight->strides[1];
        TO_TRY(to_check_tensor(weight, op, "weight"));
        TO_TRY(to_check_norm_weight(op, &row, x->shape[2], eps));
    } else {
        TO_TRY(to_check_norm_weight(op, weight, x->shape[2], eps));
    }
    TO_TRY(to_check_same_device(op, out, weight, (const to_tensor *)NULL));
    return to_check_no_alias(out, weight, 0, op, "out", "weight");
}

int to_rms_norm_rope(const to_tensor *out, const to_tensor *x, const to_tensor *weight, double eps,
                     const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                     int interleaved, double attention_scaling) {
    const char *op = "to_rms_norm_rope";
    TO_TRY(check_rope_args(op, out, x, "x", positions, inv_freq, rotary_dim, interleaved, attention_scaling));
    TO_TRY(check_norm_weight(op, out, x, "x", weight, eps));
    if (out->device == TO_CUDA)
        return to_cuda_rms_norm_rope(out, x, weight, eps, positions, inv_freq, rotary_dim, interleaved,
                                     attention_scaling);
    return to_cpu_rms_norm_rope(out, x, weight, eps, positions, inv_freq, rotary_dim, interleaved,
                                attention_scaling);
}

/* ========================================================================= to_rope_kv_store */

/* heads start .. start + n - 1 of t [T, H, D] (in range: checked by the caller), a view */
static to_tensor narrow_heads(const to_tensor *t, int64_t start, int64_t n) {
    to_tensor v = *t;
    int64_t skip = start * t->strides[1];
    if (n > 0 && to_numel(t) > 0) { /* (an empty view keeps t's pointer: nothing is addressed) */
        v.data = to_elem_ptr(t->data, t->dtype, skip);
        v.nbytes = t->nbytes - to_dtype_bytes(t->dtype, skip);
    }
    v.shape[1] = n;
    return v;
}

/* k: the last Hkv heads of out [T, H, D] (H >= Hkv checked) */
static to_tensor k_heads(const to_tensor *out, int64_t Hkv) {
    return narrow_heads(out, out->shape[1] - Hkv, Hkv);
}

int to_check_rope_kv_store(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                           const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                           int interleaved, double attention_scaling, const to_tensor *v,
                           const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *slot_mapping) {
    const char *op = "to_rope_kv_store";
    /* the rotation's checks (qk is the x of to_rope / to_rms_norm_rope) */
    TO_TRY(check_rope_args(op, out, qk, "qk", positions, inv_freq, rotary_dim, interleaved, attention_scaling));
    if (norm_weight)
        TO_TRY(check_norm_weight(op, out, qk, "qk", norm_weight, eps));
    /* the store's, with k the last Hkv heads of out */
    TO_TRY(to_check_kv_caches(op, k_cache, v_cache));
    int64_t Hkv = k_cache->shape[2], D = k_cache->shape[3];
    if (qk->shape[1] < Hkv)
        return to_fail(TO_ERR_SHAPE, "%s: qk has %lld heads, fewer than the caches' Hkv = %lld (k is "
                       "its last Hkv heads)", op, (long long)qk->shape[1], (long long)Hkv);
    if (qk->shape[2] != D)
        return to_fail(TO_ERR_SHAPE, "%s: qk has head size D = %lld but the caches have D = %lld", op,
                       (long long)qk->shape[2], (long long)D);
    to_tensor k = k_heads(out, Hkv);
    TO_TRY(to_check_kv_store(op, k_cache, v_cache, &k, "k (the last Hkv heads of out)", v, slot_mapping));
    /* what one op writes must not overlap what the other reads or writes: the caches none of the
     * rotation's tensors, out neither v (beside it in a stacked qkv product is fine) nor the slots */
    const to_tensor *read[] = {out, qk, positions, inv_freq, norm_weight};
    const char *names[] = {"out", "qk", "positions", "inv_freq", "weight"};
    for (int i = 0; i < 5 && read[i]; i++) {
        TO_TRY(to_check_no_alias(k_cache, read[i], 0, op, "k_cache", names[i]));
        TO_TRY(to_check_no_alias(v_cache, read[i], 0, op, "v_cache", names[i]));
    }
    if (!to_rows_disjoint(out, v))
        TO_TRY(to_check_no_alias(out, v, 0, op, "out", "v"));
    return to_check_no_alias(out, slot_mapping, 0, op, "out", "slot_mapping");
}

/* The CPU kernels of to_rope_kv_store, every value already checked: the rotation into out, then
 * the store of its k heads. */
static int cpu_rope_kv_store(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                             const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                             int interleaved, double attention_scaling, const to_tensor *v,
                             const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *slot_mapping) {
    if (norm_weight)
        TO_TRY(to_cpu_rms_norm_rope(out, qk, norm_weight, eps, positions, inv_freq, rotary_dim, interleaved,
                                    attention_scaling));
    else
        TO_TRY(to_cpu_rope(out, qk, positions, inv_freq, rotary_dim, interleaved, attention_scaling));
    to_tensor k = k_heads(out, k_cache->shape[2]);
    return to_cpu_kv_cache_store(k_cache, v_cache, &k, v, slot_mapping);
}

int to_rope_kv_store(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                     const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim, int interleaved,
                     double attention_scaling, const to_tensor *v, const to_tensor *k_cache,
                     const to_tensor *v_cache, const to_tensor *slot_mapping) {
    TO_TRY(to_check_rope_kv_store(out, qk, norm_weight, eps, positions, inv_freq, rotary_dim, interleaved,
                                  attention_scaling, v, k_cache, v_cache, slot_mapping));
    if (out->device == TO_CUDA) /* one kernel; it checks the slots (cuda_ops.h) */
        return to_cuda_rope_kv_store(out, qk, norm_weight, eps, positions, inv_freq, rotary_dim,
                                     interleaved, attention_scaling, v, k_cache, v_cache, slot_mapping);
    /* the CPU: the two ops' kernels one after the other, every value checked before either writes */
    TO_TRY(to_check_kv_slots("to_rope_kv_store", slot_mapping, k_cache->shape[0] * k_cache->shape[1]));
    return cpu_rope_kv_store(out, qk, norm_weight, eps, positions, inv_freq, rotary_dim, interleaved,
                             attention_scaling, v, k_cache, v_cache, slot_mapping);
}

/* ===================================================================== to_rope_kv_attention */

/* The fused GPU kernel's precondition, on the host: token t, the i-th of the nq queries of
 * sequence s, is written to the slot of its position p = context_lens[s] - nq + i in that
 * sequence's blocks (the batch's values already checked, so every lookup is in range). */
static int check_slots_match_positions(const char *op, const to_tensor *slot_mapping, const to_tensor *cu,
                                       const to_tensor *ctx, const to_tensor *bt, int64_t block_size) {
    for (int64_t s = 0; s < ctx->shape[0]; s++) {
        int64_t first = to_load_index(cu->data, cu->dtype, s * cu->strides[0]);
        int64_t nq = to_load_index(cu->data, cu->dtype, (s + 1) * cu->strides[0]) - first;
        int64_t len = to_load_index(ctx->data, ctx->dtype, s * ctx->strides[0]);
        for (int64_t i = 0; i < nq; i++) {
            int64_t t = first + i, p = len - nq + i;
            int64_t block = to_load_index(bt->data, bt->dtype,
                                          s * bt->strides[0] + p / block_size * bt->strides[1]);
            int64_t want = block * block_size + p % block_size;
            int64_t slot = to_load_index(slot_mapping->data, slot_mapping->dtype, t * slot_mapping->strides[0]);
            if (slot != want)
                return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: slot_mapping[%lld] = %lld is not the slot %lld "
                               "that block_tables gives its position (%lld, of sequence %lld); nothing was "
                               "written", op, (long long)t, (long long)slot, (long long)want, (long long)p,
                               (long long)s);
        }
    }
    return TO_OK;
}

int to_rope_kv_attention(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                         const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim, int interleaved,
                         double attention_scaling, const to_tensor *v, const to_tensor *k_cache,
                         const to_tensor *v_cache, const to_tensor *slot_mapping, const to_tensor *cu_seqlens_q,
                         const to_tensor *context_lens, const to_tensor *block_tables, double scale) {
    const char *op = "to_rope_kv_attention";
    /* NULL and malformed descriptors named as this op's arguments (the checks below name their ops') */
    const to_tensor *args[] = {out, qk, positions, inv_freq, v, k_cache, v_cache, slot_mapping,
                               cu_seqlens_q, context_lens, block_tables};
    const char *names[] = {"out", "qk", "positions", "inv_freq", "v", "k_cache", "v_cache",
                           "slot_mapping", "cu_seqlens_q", "context_lens", "block_tables"};
    for (int i = 0; i < 11; i++)
        TO_TRY(to_check_tensor(args[i], op, names[i]));
    /* the two ops' checks. to_rope_kv_store's in its in-place form (out = qk): the temporary the
     * heads are rotated into has qk's shape and dtype, and the checks of out against v, the slots
     * and the caches are then qk's. (So qk must also pass the writability check of an out, no
     * element reached twice, though it is never written.) to_paged_attention's with q the first
     * Hq heads of qk: the temporary's q heads have their shape and dtype. */
    TO_TRY(to_check_rope_kv_store(qk, qk, norm_weight, eps, positions, inv_freq, rotary_dim, interleaved,
                                  attention_scaling, v, k_cache, v_cache, slot_mapping));
    int64_t T = qk->shape[0], H = qk->shape[1], D = qk->shape[2], Hkv = k_cache->shape[2];
    to_tensor qv = narrow_heads(qk, 0, H - Hkv);
    TO_TRY(to_check_paged_attention(out, &qv, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale));
    /* out, written last, overlaps nothing the first op reads (the caches: checked above) */
    const to_tensor *read[] = {qk, v, positions, inv_freq, slot_mapping, norm_weight};
    const char *read_names[] = {"qk", "v", "positions", "inv_freq", "slot_mapping", "norm_weight"};
    for (int i = 0; i < 6 && read[i]; i++)
        TO_TRY(to_check_no_alias(out, read[i], 0, op, "out", read_names[i]));

    if (out->device == TO_CUDA) /* the kernels check the values (cuda_ops.h) */
        return to_cuda_rope_kv_attention(out, qk, norm_weight, eps, positions, inv_freq, rotary_dim, interleaved,
                                         attention_scaling, v, k_cache, v_cache, slot_mapping, cu_seqlens_q,
                                         context_lens, block_tables, scale);
    /* the CPU: every value checked before anything is written, then the two ops' kernels */
    int64_t num_blocks = k_cache->shape[0], block_size = k_cache->shape[1];
    TO_TRY(to_check_kv_slots("to_rope_kv_store", slot_mapping, num_blocks * block_size));
    TO_TRY(to_check_attention_batch(cu_seqlens_q, context_lens, block_tables, T, num_blocks, block_size));
    TO_TRY(check_slots_match_positions(op, slot_mapping, cu_seqlens_q, context_lens, block_tables, block_size));
    /* the rotated heads: a contiguous [T, H, D] of qk's dtype in this thread's scratch slot 2 (the
     * rope, store and attention CPU kernels use slots 0 and 1 only) */
    to_tensor rot = *qk;
    rot.nbytes = to_dtype_bytes(qk->dtype, T * H * D);
    rot.strides[0] = H * D, rot.strides[1] = D, rot.strides[2] = 1;
    rot.data = to_scratch(2, rot.nbytes > 0 ? (size_t)rot.nbytes : 1);
    if (!rot.data)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "%s: no memory for the %lld rotated heads", op, (long long)(T * H));
    TO_TRY(cpu_rope_kv_store(&rot, qk, norm_weight, eps, positions, inv_freq, rotary_dim, interleaved,
                             attention_scaling, v, k_cache, v_cache, slot_mapping));
    to_tensor q = narrow_heads(&rot, 0, H - Hkv);
    return to_cpu_paged_attention(out, &q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale);
}
