/* kv_copy.c - to_kv_copy_blocks: validation and device dispatch.
 *
 * The copy-on-write step of shared KV cache blocks (beam search forks a sequence, and both the
 * parent and the child then write their next token into the block they share: one of them first
 * takes a private copy). The block ids are CPU tensors: the block manager that chose them lives
 * on the host, their values are checked here before anything is written, and a GPU run takes
 * them in its launch's arguments (no upload, no wait). Checked: every cache (contiguous, one
 * dtype and shape, one device, writable, none overlapping another: a copy into one must not
 * change another's source), src and dst (i32/i64 [P], CPU), and every id: in [0, num_blocks),
 * src[i] != dst[i], the dst ids distinct and none of them also a src (the pairs are then
 * independent and run in any order, in parallel on a GPU). */
#include "internal.h"
#include "cpu/embedding.h"
#include "cpu/kv_copy.h"
#include "cuda/cuda_ops.h"

#include <stdio.h>
#include <stdlib.h>

#define OP "to_kv_copy_blocks"

static int check_ids(const to_tensor *t, const char *name) {
    TO_TRY(to_check_tensor(t, OP, name));
    TO_TRY(to_check_dtype(t, TO_INDEX_DTYPES, OP, name));
    TO_TRY(to_check_ndim(t, 1, OP, name));
    if (t->device != TO_CPU)
        return to_fail(TO_ERR_DEVICE, OP ": %s is on cuda:%d but the block ids must be a CPU tensor "
                       "(their values are checked and read on the host), whatever the caches' device",
                       name, t->device_index);
    return TO_OK;
}

static int64_t id_at(const to_tensor *t, int64_t i) { return to_load_index(t->data, t->dtype, i * t->strides[0]); }

static int check_caches(const to_tensor *caches, int n) {
    const to_tensor *c0 = &caches[0];
    for (int c = 0; c < n; c++) {
        const to_tensor *t = &caches[c];
        char name[32];
        snprintf(name, sizeof name, "caches[%d]", c);
        TO_TRY(to_check_tensor(t, OP, name));
        TO_TRY(to_check_dtype(t, TO_PLAIN_DTYPES, OP, name));
        if (t->ndim < 1)
            return to_fail(TO_ERR_SHAPE, OP ": %s is 0-d: a cache is [num_blocks, ...]", name);
        if (!to_is_contiguous(t))
            return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": %s is not contiguous (a block must be one "
                           "run of memory)", name);
        if (t->dtype != c0->dtype)
            return to_fail(TO_ERR_DTYPE, OP ": %s is %s but caches[0] is %s: all caches have one dtype",
                           name, to_dtype_name(t->dtype), to_dtype_name(c0->dtype));
        int same = t->ndim == c0->ndim;
        for (int d = 0; same && d < t->ndim; d++)
            same = t->shape[d] == c0->shape[d];
        if (!same) {
            char s[160], s0[160];
            to_shape_str(t, s, sizeof s);
            to_shape_str(c0, s0, sizeof s0);
            return to_fail(TO_ERR_SHAPE, OP ": %s has shape %s but caches[0] has shape %s: all caches "
                           "have one shape", name, s, s0);
        }
        if (t->device != c0->device || t->device_index != c0->device_index)
            return to_fail(TO_ERR_DEVICE, OP ": %s is on another device than caches[0]", name);
        TO_TRY(to_check_writable(t, OP, name));
        for (int o = 0; o < c; o++)
            if (to_spans_overlap(t, &caches[o]))
                return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": caches[%d] and caches[%d] overlap", o, c);
    }
    return c0->device == TO_CUDA ? to_check_gpu_visible(c0, OP) : TO_OK;
}

/* ids in range and pairs independent (see the top of the file) */
static int check_pairs(const to_tensor *src, const to_tensor *dst, int64_t num_blocks) {
    int64_t P = src->shape[0];
    unsigned char *role = calloc((size_t)num_blocks, 1); /* bit 0: a src, bit 1: a dst */
    if (!role)
        return to_fail(TO_ERR_OUT_OF_MEMORY, OP ": no memory to check %lld block ids", (long long)P);
    int status = TO_OK;
    for (int64_t i = 0; i < P && status == TO_OK; i++) {
        int64_t s = id_at(src, i), d = id_at(dst, i);
        if (s < 0 || s >= num_blocks)
            status = to_fail(TO_ERR_BOUNDS, OP ": src[%lld] = %lld is outside [0, %lld) (the caches' "
                             "blocks)", (long long)i, (long long)s, (long long)num_blocks);
        else if (d < 0 || d >= num_blocks)
            status = to_fail(TO_ERR_BOUNDS, OP ": dst[%lld] = %lld is outside [0, %lld) (the caches' "
                             "blocks)", (long long)i, (long long)d, (long long)num_blocks);
        else if (s == d)
            status = to_fail(TO_ERR_INVALID_ARGUMENT, OP ": src[%lld] = dst[%lld] = %lld: a block copied "
                             "onto itself", (long long)i, (long long)i, (long long)s);
        else if (role[d] & 2)
            status = to_fail(TO_ERR_INVALID_ARGUMENT, OP ": dst[%lld] = %lld appears twice in dst (two "
                             "copies into one block)", (long long)i, (long long)d);
        else
            role[s] |= 1, role[d] |= 2;
    }
    for (int64_t i = 0; i < P && status == TO_OK; i++)
        if (role[id_at(dst, i)] & 1)
            status = to_fail(TO_ERR_INVALID_ARGUMENT, OP ": block %lld is both a src and a dst (dst[%lld]): "
                             "the result would depend on the order of the copies",
                             (long long)id_at(dst, i), (long long)i);
    free(role);
    return status;
}

int to_kv_copy_blocks(const to_tensor *caches, int num_caches, const to_tensor *src, const to_tensor *dst) {
    if (!caches || num_caches < 1)
        return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": needs at least one cache, got %d%s", num_caches,
                       caches ? "" : " (caches is NULL)");
    TO_TRY(check_ids(src, "src"));
    TO_TRY(check_ids(dst, "dst"));
    if (src->shape[0] != dst->shape[0])
        return to_fail(TO_ERR_SHAPE, OP ": src has %lld ids but dst has %lld: one dst per src",
                       (long long)src->shape[0], (long long)dst->shape[0]);
    TO_TRY(check_caches(caches, num_caches));
    int64_t num_blocks = caches[0].shape[0];
    TO_TRY(check_pairs(src, dst, num_blocks));
    if (src->shape[0] == 0 || to_numel(&caches[0]) == 0)
        return TO_OK;
    if (caches[0].device == TO_CUDA)
        return to_cuda_kv_copy_blocks(caches, num_caches, src, dst);
    return to_cpu_kv_copy_blocks(caches, num_caches, src, dst);
}
