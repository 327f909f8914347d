/* no_cuda.c - the CUDA entry points of a build without nvcc: no GPUs, clear errors. */
#include "internal.h"
#include "cuda/cuda_ops.h"

static int no_cuda(const char *what) {
    return to_fail(TO_ERR_DEVICE, "%s: this build of libtensor_ops has no CUDA support "
                   "(rebuild where nvcc is on the PATH)", what);
}

int to_cuda_compiled(void) { return 0; }

int to_cuda_count(int *out) {
    *out = 0;
    return TO_OK;
}

int to_cuda_alloc(int device_index, int64_t nbytes, void **out) {
    (void)device_index, (void)nbytes;
    *out = NULL;
    return no_cuda("to_alloc");
}

int to_cuda_free(int device_index, void *ptr) {
    (void)device_index, (void)ptr;
    return no_cuda("to_free");
}

int to_cuda_sync(int device_index) {
    (void)device_index;
    return no_cuda("to_cuda_synchronize");
}

int to_cuda_memcpy(int device_index, void *dst, const void *src, int64_t nbytes, int kind) {
    (void)device_index, (void)dst, (void)src, (void)nbytes, (void)kind;
    return no_cuda("to_copy");
}

int to_cuda_readback_start(int device_index, const void *src, int64_t nbytes, void **out) {
    (void)device_index, (void)src, (void)nbytes;
    *out = NULL;
    return no_cuda("to_readback_start");
}

int to_cuda_readback_wait(void *read, void *dst, int64_t nbytes) {
    (void)read, (void)dst, (void)nbytes;
    return no_cuda("to_readback_wait");
}

void to_cuda_readback_release(void *read) { (void)read; }

/* ---- the op kernels (csrc/cuda/cuda_ops.h); csrc/ops never reaches these without a GPU
 * tensor, which this build cannot make, but they must link ---- */

int to_cuda_copy(const to_tensor *out, const to_tensor *x) { (void)out, (void)x; return no_cuda("to_copy"); }
int to_cuda_fill(const to_tensor *out, double value) { (void)out, (void)value; return no_cuda("to_fill"); }
int to_cuda_elementwise(const to_tensor *out, const to_tensor *a, const to_tensor *b, int op, float scale) {
    (void)out, (void)a, (void)b, (void)op, (void)scale;
    return no_cuda("elementwise op");
}
int to_cuda_softmax(const to_tensor *out, const to_tensor *x) { (void)out, (void)x; return no_cuda("to_softmax"); }
int to_cuda_rms_norm(const to_tensor *out, const to_tensor *residual, const to_tensor *x,
                     const to_tensor *weight, double eps) {
    (void)out, (void)residual, (void)x, (void)weight, (void)eps;
    return no_cuda("to_rms_norm");
}
int to_cuda_rope(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
                 const to_tensor *inv_freq, int rotary_dim, int interleaved, double attention_scaling) {
    (void)out, (void)x, (void)positions, (void)inv_freq, (void)rotary_dim, (void)interleaved,
        (void)attention_scaling;
    return no_cuda("to_rope");
}
int to_cuda_rms_norm_rope(const to_tensor *out, const to_tensor *x, const to_tensor *weight, double eps,
                          const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                          int interleaved, double attention_scaling) {
    (void)out, (void)x, (void)weight, (void)eps, (void)positions, (void)inv_freq, (void)rotary_dim,
        (void)interleaved, (void)attention_scaling;
    return no_cuda("to_rms_norm_rope");
}
int to_cuda_rope_kv_store(const to_tensor *out, const to_tensor *qk, const to_tensor *weight, double eps,
                          const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                          int interleaved, double attention_scaling, const to_tensor *v,
                          const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *slot_mapping) {
    (void)out, (void)qk, (void)weight, (void)eps, (void)positions, (void)inv_freq, (void)rotary_dim,
        (void)interleaved, (void)attention_scaling, (void)v, (void)k_cache, (void)v_cache, (void)slot_mapping;
    return no_cuda("to_rope_kv_store");
}
int to_cuda_embedding(const to_tensor *out, const to_tensor *table, const to_tensor *ids) {
    (void)out, (void)table, (void)ids;
    return no_cuda("to_embedding");
}
int to_cuda_argmax(const to_tensor *out, const to_tensor *x) { (void)out, (void)x; return no_cuda("to_argmax"); }
int to_cuda_topk(const to_tensor *values, const to_tensor *indices, const to_tensor *x, int k) {
    (void)values, (void)indices, (void)x, (void)k;
    return no_cuda("to_topk");
}
int to_cuda_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias,
                   const to_tensor *norm_weight, double eps, int accumulate) {
    (void)out, (void)x, (void)w, (void)bias, (void)norm_weight, (void)eps, (void)accumulate;
    return no_cuda("to_matmul");
}
int to_cuda_kv_cache_store(const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *k,
                           const to_tensor *v, const to_tensor *slot_mapping) {
    (void)k_cache, (void)v_cache, (void)k, (void)v, (void)slot_mapping;
    return no_cuda("to_kv_cache_store");
}
int to_cuda_paged_attention(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache,
                            const to_tensor *v_cache, const to_tensor *cu_seqlens_q,
                            const to_tensor *context_lens, const to_tensor *block_tables, double scale) {
    (void)out, (void)q, (void)k_cache, (void)v_cache, (void)cu_seqlens_q, (void)context_lens,
        (void)block_tables, (void)scale;
    return no_cuda("to_paged_attention");
}
int to_cuda_rope_kv_attention(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                              const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                              int interleaved, double attention_scaling, const to_tensor *v,
                              const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *slot_mapping,
                              const to_tensor *cu_seqlens_q, const to_tensor *context_lens,
                              const to_tensor *block_tables, double scale) {
    (void)out, (void)qk, (void)norm_weight, (void)eps, (void)positions, (void)inv_freq, (void)rotary_dim,
        (void)interleaved, (void)attention_scaling, (void)v, (void)k_cache, (void)v_cache, (void)slot_mapping,
        (void)cu_seqlens_q, (void)context_lens, (void)block_tables, (void)scale;
    return no_cuda("to_rope_kv_attention");
}

int to_cuda_sample(const to_sample_plan *plan) {
    return no_cuda(plan->op);
}
int to_cuda_kv_copy_blocks(const to_tensor *caches, int num_caches, const to_tensor *src, const to_tensor *dst) {
    (void)caches, (void)num_caches, (void)src, (void)dst;
    return no_cuda("to_kv_copy_blocks");
}
int to_cuda_beam_topk(const to_tensor *scores, const to_tensor *ids, const to_tensor *logits,
                      const to_tensor *beam_scores, const to_tensor *groups, const to_tensor *suppress) {
    (void)scores, (void)ids, (void)logits, (void)beam_scores, (void)groups, (void)suppress;
    return no_cuda("to_beam_topk");
}

int to_cuda_graph_begin(int device_index) { (void)device_index; return no_cuda("to_cuda_graph_begin"); }
int to_cuda_graph_end(int device_index, void **graph) {
    (void)device_index;
    *graph = NULL;
    return no_cuda("to_cuda_graph_end");
}
int to_cuda_graph_launch(void *graph) { (void)graph; return no_cuda("to_cuda_graph_launch"); }
int to_cuda_graph_destroy(void *graph) { (void)graph; return no_cuda("to_cuda_graph_destroy"); }
