/* kv_copy.c - copy-on-write of paged KV cache blocks: one memcpy per (pair, cache). The pairs
 * are independent (no block is both a src and a dst: csrc/ops/kv_copy.c), so the copies are
 * split over threads in any order. */
#include "cpu/kv_copy.h"
#include "cpu/embedding.h"

struct kv_copy_job {
    const to_tensor *caches, *src, *dst;
    int num_caches;
    int64_t block_bytes;
};

/* [begin, end) ranges over pair * num_caches + cache */
static void copy_items(void *arg, int64_t begin, int64_t end) {
    const struct kv_copy_job *job = arg;
    for (int64_t it = begin; it < end; it++) {
        int64_t i = it / job->num_caches;
        const to_tensor *c = &job->caches[it % job->num_caches];
        int64_t s = to_load_index(job->src->data, job->src->dtype, i * job->src->strides[0]);
        int64_t d = to_load_index(job->dst->data, job->dst->dtype, i * job->dst->strides[0]);
        char *base = c->data;
        memcpy(base + d * job->block_bytes, base + s * job->block_bytes, (size_t)job->block_bytes);
    }
}

int to_cpu_kv_copy_blocks(const to_tensor *caches, int num_caches, const to_tensor *src, const to_tensor *dst) {
    const to_tensor *c0 = &caches[0];
    struct kv_copy_job job = {caches, src, dst, num_caches,
                              to_dtype_bytes(c0->dtype, to_numel(c0) / c0->shape[0])};
    /* a thread is worth waking for about 256 KB of copying */
    int64_t per = (1 << 18) / (job.block_bytes > 0 ? job.block_bytes : 1);
    to_parallel_for(src->shape[0] * num_caches, per > 0 ? per : 1, copy_items, &job);
    return TO_OK;
}
