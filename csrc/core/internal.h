/*
 * internal.h - what the library's own files share and users never see.
 * Everything declared after the visibility pragma stays out of the shared library's
 * exported symbols, so internal helpers can share the public `to_` prefix.
 */
#ifndef TO_INTERNAL_H
#define TO_INTERNAL_H

#include "tensor_ops.h"

#include <stdint.h>
#include <string.h>

#pragma GCC visibility push(hidden)
#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors (core/error.c) ---- */
/* Records a printf-style message for the calling thread and returns status. */
int to_fail(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define TO_TRY(expr)                 \
    do {                             \
        int to_try_status_ = (expr); \
        if (to_try_status_ != TO_OK) \
            return to_try_status_;   \
    } while (0)

/* ---- tensor descriptors (core/check.c) ---- */
/* Bit masks of dtypes for to_check_dtype. */
#define TO_MASK(d) (1u << (d))
#define TO_FLOAT_DTYPES (TO_MASK(TO_F32) | TO_MASK(TO_F16) | TO_MASK(TO_BF16))
#define TO_INDEX_DTYPES (TO_MASK(TO_I32) | TO_MASK(TO_I64))
#define TO_QUANT_DTYPES (TO_MASK(TO_Q8_0) | TO_MASK(TO_Q4_0) | TO_MASK(TO_Q4_1) | TO_MASK(TO_Q4_K) | TO_MASK(TO_Q6_K))
/* GGML blocks with the rows interleaved by TO_X8_ROWS (see TO_Q4_0_X8) */
#define TO_X8_DTYPES (TO_MASK(TO_Q4_0_X8) | TO_MASK(TO_Q4_1_X8) | TO_MASK(TO_Q8_0_X8))
#define TO_X8_ROWS 8
#define TO_ALL_DTYPES ((1u << TO_DTYPE_COUNT) - 1u)
#define TO_PLAIN_DTYPES (TO_ALL_DTYPES & ~(TO_QUANT_DTYPES | TO_X8_DTYPES))

/* Non-null, known dtype and device, rank <= TO_MAX_DIMS, non-negative shape and strides, and
 * every reachable element inside nbytes. `op` and `name` go into the error message. */
int to_check_tensor(const to_tensor *t, const char *op, const char *name);
int to_check_dtype(const to_tensor *t, unsigned mask, const char *op, const char *name);
int to_check_ndim(const to_tensor *t, int ndim, const char *op, const char *name);
int to_check_same_shape(const to_tensor *a, const to_tensor *b, const char *op, const char *na,
                        const char *nb);
/* Every tensor of the NULL-terminated list is on the device of the first, and that device is
 * there (to_check_gpu_visible). */
int to_check_same_device(const char *op, const to_tensor *first, ...);
/* Error (TO_ERR_DEVICE) when t is on a GPU index that is not visible: no kernel is ever
 * launched on a descriptor that names a missing GPU. */
int to_check_gpu_visible(const to_tensor *t, const char *op);
/* "[2, 3]" into buf, for error messages. */
void to_shape_str(const to_tensor *t, char *buf, size_t size);
int64_t to_numel(const to_tensor *t);
int to_is_contiguous(const to_tensor *t);
/* Rows are all dimensions but the last flattened; a 0-d tensor is one row of one element. */
int64_t to_num_rows(const to_tensor *t);
int64_t to_row_len(const to_tensor *t);
int64_t to_row_stride_last(const to_tensor *t); /* stride of the last dimension (1 for 0-d) */
int64_t to_row_offset(const to_tensor *t, int64_t row); /* element offset of row `row` */
/* Aliasing. A tensor an op writes must not address one element twice, and may share memory
 * with an input only when it is exactly that input's view (then each element is read before
 * it is written, which every kernel guarantees). */
/* 1 when a and b are the same view: same device, data pointer, dtype, shape, and the same
 * strides in every dimension longer than one. */
int to_same_view(const to_tensor *a, const to_tensor *b);
/* 1 when the byte ranges that a and b reach intersect (conservative: interleaved views of one
 * buffer count as overlapping even if no element is shared). Empty tensors overlap nothing. */
int to_spans_overlap(const to_tensor *a, const to_tensor *b);
/* Error (TO_ERR_INVALID_ARGUMENT) when t, which the op writes, has two index tuples reaching
 * one element: a stride-0 dimension of size > 1, or strides that do not nest (conservative:
 * dimensions sorted by stride must each step past everything the smaller ones reach). */
int to_check_writable(const to_tensor *t, const char *op, const char *name);
/* Error (TO_ERR_INVALID_ARGUMENT) when written tensor w overlaps read tensor r, unless
 * allow_same_view and w is exactly r's view. */
int to_check_no_alias(const to_tensor *w, const to_tensor *r, int allow_same_view, const char *op,
                      const char *wname, const char *rname);
/* 1 when a and b, though their spans may overlap, share no element because they interleave row
 * by row: the same byte stride in dimension 0, and each index of dimension 0 of one lies in the
 * gap between two of the other's (the q/k heads and the v heads of one stacked qkv product). */
int to_rows_disjoint(const to_tensor *a, const to_tensor *b);
/* Error unless the tensor is on the CPU; used by ops with no CUDA kernel yet. */
int to_require_cpu(const to_tensor *t, const char *op);
/* An RMSNorm's weight [d] (float dtype, on x's device) for rows of length d, and eps finite >= 0. */
int to_check_norm_weight(const char *op, const to_tensor *weight, int64_t d, double eps);

/* ---- checks shared by ops of several files (csrc/ops) ---- */
/* attention.c: to_kv_cache_store's checks, `op` naming the caller. The cache pair alone: */
int to_check_kv_caches(const char *op, const to_tensor *k_cache, const to_tensor *v_cache);
/* everything to_kv_cache_store checks before the slot values (kname: what k is to the caller): */
int to_check_kv_store(const char *op, const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *k,
                      const char *kname, const to_tensor *v, const to_tensor *slot_mapping);
/* the slot values, on the host (CPU tensors): each < num_slots, the non-negative ones distinct */
int to_check_kv_slots(const char *op, const to_tensor *slot_mapping, int64_t num_slots);
/* to_paged_attention's checks, their messages naming it and its arguments whoever calls them:
 * everything but the index values; and (on the host) the values of cu_seqlens_q, context_lens and
 * block_tables for T query rows over caches of num_blocks blocks of block_size. */
int to_check_paged_attention(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache,
                             const to_tensor *v_cache, const to_tensor *cu_seqlens_q,
                             const to_tensor *context_lens, const to_tensor *block_tables, double scale);
int to_check_attention_batch(const to_tensor *cu_seqlens_q, const to_tensor *context_lens,
                             const to_tensor *block_tables, int64_t T, int64_t num_blocks, int64_t block_size);
/* rope.c: everything to_rope_kv_store checks before the slot values (messages naming it and its
 * arguments; to_rope_kv_attention calls it in the in-place form, out = its qk). */
int to_check_rope_kv_store(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                           const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                           int interleaved, double attention_scaling, const to_tensor *v,
                           const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *slot_mapping);

/* ---- dtypes (core/dtype.c) ---- */
static inline float to_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}
static inline uint16_t to_f32_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((v.u >> 16) | 0x40u);
    v.u += 0x7fffu + ((v.u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(v.u >> 16);
}
float to_f16_to_f32(uint16_t h);
uint16_t to_f32_to_f16(float f);
/* dst[i] = float(src[i * stride]) for i < n, any dtype. */
void to_load_f32(float *dst, const void *src, int dtype, int64_t n, int64_t stride);
/* dst[i * stride] = convert(src[i]) for i < n, any dtype (to integers: truncate, saturate). */
void to_store_f32(void *dst, int dtype, const float *src, int64_t n, int64_t stride);
/* Truncates toward zero, saturating at the int64 range; NaN gives 0. */
int64_t to_double_to_i64(double x);
/* Bytes that n elements of `dtype` occupy (n a whole number of blocks for quantized dtypes). */
static inline int64_t to_dtype_bytes(int dtype, int64_t n) {
    return n / to_dtype_block_size(dtype) * to_dtype_block_bytes(dtype);
}

static inline int to_is_quantized(int dtype) { return to_dtype_block_size(dtype) > 1; }

static inline int to_is_x8(int dtype) { return (TO_X8_DTYPES >> dtype) & 1u; }
/* the plain block type whose blocks an x8 type interleaves (Q4_0 for Q4_0_X8) */
static inline int to_x8_base(int dtype) {
    return dtype == TO_Q4_0_X8 ? TO_Q4_0 : dtype == TO_Q4_1_X8 ? TO_Q4_1 : TO_Q8_0;
}

/* Address of element `offset` (in elements, block-aligned for quantized dtypes) of a buffer. */
static inline void *to_elem_ptr(void *base, int dtype, int64_t offset) {
    return (char *)base + to_dtype_bytes(dtype, offset);
}

/* ---- CPU features (core/simd.c) ---- */
/* Level used by kernels now: detected, lowered by to_set_simd or INFERENCE_PIO_SIMD. */
int to_simd(void);
#define TO_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TO_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

/* ---- threads (core/threads.c) ---- */
/* Runs fn(ctx, ith, nth) once on each of nth threads (the caller is thread 0) and returns when
 * all are done. Called from inside a pool thread it runs fn(ctx, 0, 1) inline. */
typedef void (*to_thread_fn)(void *ctx, int ith, int nth);
void to_parallel_run(to_thread_fn fn, void *ctx);
/* Splits [0, n) into one contiguous range per thread, each at least min_chunk long (so small
 * work stays on one thread), and calls fn(ctx, begin, end) for each non-empty range. */
typedef void (*to_range_fn)(void *ctx, int64_t begin, int64_t end);
void to_parallel_for(int64_t n, int64_t min_chunk, to_range_fn fn, void *ctx);
/* Per-thread scratch memory, 64-byte aligned, kept between calls; slot 0..3 are independent.
 * Returns NULL only when memory runs out. */
void *to_scratch(int slot, size_t nbytes);

/* ---- host memory (core/alloc.c) ---- */
void *to_host_alloc(size_t nbytes); /* 64-byte aligned, NULL on failure */
void to_host_free(void *p);

/* ---- CUDA (csrc/cuda, or core/no_cuda.c when the build has none) ---- */
int to_cuda_alloc(int device_index, int64_t nbytes, void **out);
int to_cuda_free(int device_index, void *ptr);
int to_cuda_count(int *out);
int to_cuda_sync(int device_index);
/* Copies nbytes between contiguous buffers; kind: 0 host->device, 1 device->host, 2 device->device. */
int to_cuda_memcpy(int device_index, void *dst, const void *src, int64_t nbytes, int kind);
/* Asynchronous device->host reads behind to_readback_* (arguments checked by csrc/ops/readback.c):
 * start queues the copy of nbytes at src on the GPU's stream and hands back an opaque read;
 * wait blocks on that read alone, copies its bytes to dst, reports an error the GPU recorded
 * before it, and gives the read back; release gives it back unread. */
int to_cuda_readback_start(int device_index, const void *src, int64_t nbytes, void **out);
int to_cuda_readback_wait(void *read, void *dst, int64_t nbytes);
void to_cuda_readback_release(void *read);
int to_cuda_compiled(void);

#ifdef __cplusplus
}
#endif
#pragma GCC visibility pop

#endif
