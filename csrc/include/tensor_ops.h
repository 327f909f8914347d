/*
 * tensor_ops.h - the one public C API of libtensor_ops.
 *
 * Conventions
 *  - Every symbol starts with `to_` (types, functions) or `TO_` (constants).
 *  - Every function returns a to_status. TO_OK is 0; on failure a message for the
 *    calling thread is available from to_last_error() until its next failing call.
 *  - Tensors are passed as `const to_tensor *` descriptors. Strides are counted in
 *    elements, never negative; a stride of 0 broadcasts. `nbytes` is how many bytes
 *    may be touched starting at `data`: every call checks that the largest offset
 *    its shape and strides reach lies inside it.
 *  - Outputs come first in the argument list. Outputs must not overlap inputs unless
 *    a function says it may work in place.
 *  - Ops dispatch on the tensors' device inside the library; all tensors of one call
 *    must be on the same device (only to_copy moves data between devices).
 *
 * The part between the CDEF markers is read by cffi (python/inference_pio/_ffi_build.py):
 * keep it free of preprocessor expressions other than plain integer #defines.
 */
#ifndef TENSOR_OPS_H
#define TENSOR_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF-BEGIN */
#define TO_MAX_DIMS 8

typedef enum {
    TO_OK = 0,
    TO_ERR_INVALID_ARGUMENT = 1, /* null pointer, bad rank, bad parameter value */
    TO_ERR_DTYPE = 2,            /* a dtype the op does not take, or mismatched dtypes */
    TO_ERR_SHAPE = 3,            /* shapes that do not fit together */
    TO_ERR_BOUNDS = 4,           /* buffer too small for shape/strides, index out of range */
    TO_ERR_DEVICE = 5,           /* wrong or mixed devices, no such GPU */
    TO_ERR_OUT_OF_MEMORY = 6,
    TO_ERR_UNSUPPORTED = 7,      /* valid request this build or device cannot serve */
    TO_ERR_CUDA = 8,             /* an error reported by the CUDA runtime */
    TO_ERR_INTERNAL = 9
} to_status;

typedef enum {
    TO_F32 = 0,
    TO_F16 = 1,
    TO_BF16 = 2,
    TO_I8 = 3,
    TO_I32 = 4,
    TO_I64 = 5,
    TO_U8 = 6,
    /* Block-quantized weight types, bit-compatible with GGML's blocks of the same names.
     * A tensor of one of these has a logical shape in elements; its last dimension has unit
     * stride and is a whole number of blocks, and every other stride is a whole number of
     * blocks, so element offsets map to bytes as offset / block_size * block_bytes. */
    TO_Q8_0 = 7,  /* 32 elements: f16 scale d, 32 x i8 q; x = d * q */
    TO_Q4_0 = 8,  /* 32 elements: f16 d, 16 bytes of nibbles; x = d * (q - 8) */
    TO_Q4_1 = 9,  /* 32 elements: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m */
    TO_Q4_K = 10, /* 256 elements: f16 d, f16 dmin, 12 bytes of 6-bit sub-scales/mins, 128 bytes of nibbles */
    TO_Q6_K = 11, /* 256 elements: 128 bytes low nibbles, 64 bytes high 2 bits, 16 x i8 scales, f16 d */
    /* Q4_0 / Q4_1 / Q8_0 with the blocks of each 8 rows interleaved, the layout the CPU matmul
     * reads fastest (one vector instruction serves 8 rows). Only a contiguous 2-D [N, K] tensor
     * with N a multiple of 8; rows 8g .. 8g+7 take the bytes they take in the plain type, as
     * K / 32 groups of 8 blocks: the 8 f16 d (Q4_1: then the 8 f16 m), then the 8 rows' quant
     * bytes (16 each for Q4, 32 for Q8_0) in which the 32 bytes at 32 j hold bytes 4 j .. 4 j + 3
     * of each row, row by row. to_copy converts between each and its plain type; to_matmul
     * takes them as w, to_embedding as a table. */
    TO_Q4_0_X8 = 12,
    TO_Q4_1_X8 = 13,
    TO_Q8_0_X8 = 14,
    TO_DTYPE_COUNT = 15
} to_dtype;

typedef enum {
    TO_CPU = 0,
    TO_CUDA = 1
} to_device;

typedef enum {
    TO_SIMD_SCALAR = 0, /* portable C, no vector extensions beyond the baseline ABI */
    TO_SIMD_AVX2 = 1,   /* AVX2 + FMA + F16C */
    TO_SIMD_AVX512 = 2  /* AVX-512 F/BW/VL (+ AVX2 paths where no AVX-512 one exists) */
} to_simd_level;

typedef struct to_tensor {
    void *data;          /* address of element [0, 0, ...] */
    int64_t nbytes;      /* bytes addressable from data */
    int32_t dtype;       /* to_dtype */
    int32_t device;      /* to_device */
    int32_t device_index;
    int32_t ndim;        /* 0 .. TO_MAX_DIMS */
    int64_t shape[TO_MAX_DIMS];
    int64_t strides[TO_MAX_DIMS];
} to_tensor;

/* ---- errors and library facts ---- */
const char *to_last_error(void);
const char *to_status_name(int status);
const char *to_dtype_name(int dtype);
int to_dtype_size(int dtype);                   /* bytes per element; 0 if unknown or block-quantized */
int to_dtype_block_size(int dtype);             /* elements per block: 1 for plain dtypes, 0 if unknown */
int to_dtype_block_bytes(int dtype);            /* bytes per block (= to_dtype_size for plain dtypes) */
int to_version(void);                           /* major * 10000 + minor * 100 + patch */

/* ---- CPU features and threads ---- */
int to_simd_detected(void);                     /* best level this CPU and build support */
int to_simd_active(void);                       /* level kernels use now */
int to_set_simd(int level);                     /* force a level <= detected (tests) */
int to_num_threads(void);
int to_set_num_threads(int n);                  /* resizes the persistent pool */

/* ---- memory ---- */
/* Host memory is 64-byte aligned. Device memory comes from a caching allocator. */
int to_alloc(int device, int device_index, int64_t nbytes, void **out);
int to_free(int device, int device_index, void *ptr);
int to_cuda_device_count(int *out);             /* 0 when no driver/GPU or no CUDA build */
int to_cuda_available(void);                    /* 1 if this build has CUDA code compiled in */
int to_cuda_synchronize(int device_index);
/* CUDA graphs of one GPU's stream: between to_cuda_graph_begin and to_cuda_graph_end the ops on
 * that GPU are recorded, not run (so they must not wait for the GPU: no copies to or from the
 * host in between); to_cuda_graph_launch replays them on the same buffers, to_cuda_graph_destroy
 * frees the graph. GPU memory freed while recording stays reserved for the graph until it is
 * destroyed (a recorded kernel may still use it). */
int to_cuda_graph_begin(int device_index);
int to_cuda_graph_end(int device_index, void **graph);
int to_cuda_graph_launch(void *graph);
int to_cuda_graph_destroy(void *graph);
/* Reading a small result (a decode step's sampled ids) back without waiting for the GPU to go
 * idle. to_readback_start queues a copy of src's bytes (any dtype, contiguous) to pinned host
 * memory on its GPU's stream, behind the work queued there, and returns a handle at once; the
 * caller may then queue more work (the next step). to_readback_wait(handle, dst, nbytes) blocks
 * until that copy alone has landed (not the work queued after it), copies the bytes to dst
 * (nbytes must be src's size in bytes, the handle stays live if it is not) and releases the
 * handle. An error a GPU kernel recorded before the copy (a bad index, a bad logits row in
 * to_sample: see "lookups and reductions") is returned by that wait, with dst filled all the
 * same; one recorded after it, by a later wait or synchronising call; each error once.
 * to_readback_release gives a handle back unread (NULL: nothing to do). A CPU src is copied by
 * the start call, and its wait returns at once. A handle is used once: waiting on or releasing a
 * handle that is not live is TO_ERR_INVALID_ARGUMENT, not a crash (as far as a freed address is
 * not reused by a later handle). No start while src's GPU records a graph. Thread-safe. */
int to_readback_start(const to_tensor *src, void **handle);
int to_readback_wait(void *handle, void *dst, int64_t nbytes);
int to_readback_release(void *handle);

/* ---- copies and element-wise ops ---- */
/* out = x converted to out's dtype; any strides; x and out may be on different devices
 * (host<->device copies need contiguous tensors of the same dtype). A quantized dtype on either
 * side: float -> blocks quantizes (GGML's reference rounding), blocks -> float dequantizes
 * (bit-exact with GGML), blocks -> blocks of another type goes through f32; integers do not
 * convert to or from blocks. */
int to_copy(const to_tensor *out, const to_tensor *x);
int to_fill(const to_tensor *out, double value);
/* out = a + b, out = a * b: same shapes (broadcast by passing stride-0 views). In place allowed. */
int to_add(const to_tensor *out, const to_tensor *a, const to_tensor *b);
int to_mul(const to_tensor *out, const to_tensor *a, const to_tensor *b);
/* out = x * scale */
int to_scale(const to_tensor *out, const to_tensor *x, double scale);
/* out[..., i] = silu(gate[..., i]) * up[..., i]; silu(z) = z / (1 + exp(-z)) */
int to_silu_mul(const to_tensor *out, const to_tensor *gate, const to_tensor *up);
/* softmax over the last dimension, computed in f32 */
int to_softmax(const to_tensor *out, const to_tensor *x);

/* ---- normalisation ---- */
/* out = x / sqrt(mean(x^2) + eps) * weight, over the last dimension; weight [d] */
int to_rms_norm(const to_tensor *out, const to_tensor *x, const to_tensor *weight, double eps);
/* residual += x (in place, in residual's dtype); out = rms_norm(residual) * weight */
int to_add_rms_norm(const to_tensor *out, const to_tensor *residual, const to_tensor *x,
                    const to_tensor *weight, double eps);

/* ---- rotary embedding ---- */
/* x: [T, H, D] (any float dtype, any strides), positions: [T] i32/i64, inv_freq: [R/2] f32
 * with R = rotary_dim <= D, even. angle = float(pos) * inv_freq[i]; cos and sin are multiplied
 * by attention_scaling. Rotate-half (NeoX) pairs (i, i + R/2); interleaved pairs (2i, 2i+1)
 * and writes the rotated slice de-interleaved (HF's GLM form). Dims >= R are copied.
 * out may be x (in place). */
int to_rope(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
            const to_tensor *inv_freq, int rotary_dim, int interleaved, double attention_scaling);
/* Per-head RMSNorm then rotary embedding in one pass (Qwen3's q_norm/k_norm before RoPE):
 * y = x[t, h, :] / sqrt(mean(x[t, h, :]^2) + eps) * weight as to_rms_norm computes it (weight [D],
 * any float dtype, or [H, D]: a weight per head, so q's and k's heads, adjacent in a stacked qkv
 * product, take one call), then to_rope's rotation of y; dims >= R are y, not x. The intermediate y is
 * kept in f32, so the result equals to_rms_norm into an f32 tensor followed by to_rope into out,
 * bit for bit on the CPU. Arguments as to_rope's plus weight and eps; out may be x (in place).
 * On a GPU, rotary_dim / 2 and D - rotary_dim are at most 512 each. */
int to_rms_norm_rope(const to_tensor *out, const to_tensor *x, const to_tensor *weight, double eps,
                     const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                     int interleaved, double attention_scaling);
/* The rotation of an attention layer's q and k heads and the cache write of its k and v in one
 * call (one kernel on a GPU): to_rms_norm_rope (norm_weight [D] or [H, D] given; `weight` in the
 * messages) or to_rope (norm_weight NULL, eps unused) of qk [T, H, D] into out (out == qk: in
 * place), then the last Hkv heads of the result (k) and v [T, Hkv, D] stored at slot_mapping[t]
 * of k_cache / v_cache exactly as to_kv_cache_store does (same checks, same negative-slot skip,
 * same bad-slot recording on a GPU). Hkv comes from the caches [num_blocks, block_size, Hkv, D];
 * H >= Hkv (q's heads, then k's: H = Hq + Hkv). The results are the separate ops' bit for bit.
 * The caches must not overlap any other argument, nor out v or slot_mapping, except that v may
 * sit beside qk in one stacked qkv buffer (rows interleaved, no element shared). On the CPU every
 * slot is checked before anything is written. See to_kv_cache_store below for the cache layout. */
int to_rope_kv_store(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                     const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim, int interleaved,
                     double attention_scaling, const to_tensor *v, const to_tensor *k_cache,
                     const to_tensor *v_cache, const to_tensor *slot_mapping);
/* An attention layer from the rotation to its output in one call (a decode step of one sequence
 * is one kernel on a GPU). qk [T, H, D] is read, never written: its heads are rotated (and
 * normalised) exactly as to_rope_kv_store would, into a temporary of qk's dtype and shape (scratch
 * memory on the CPU; a workspace, or registers and shared memory, on a GPU), the last Hkv heads of
 * that and v stored at slot_mapping, then paged attention of its first Hq = H - Hkv heads written
 * to out [T, Hq, D]. out and both caches get the bits of to_rope_kv_store(tmp, qk, norm_weight,
 * eps, positions, inv_freq, rotary_dim, interleaved, attention_scaling, v, k_cache, v_cache,
 * slot_mapping) then to_paged_attention(out, q, k_cache, v_cache, cu_seqlens_q, context_lens,
 * block_tables, scale), with tmp a fresh contiguous tensor of qk's dtype and q its first Hq heads:
 * q and k are rounded to qk's dtype, as the separate ops would pass them on. (qk is not written
 * because on a GPU every block of the one kernel reads qk's q heads: writing them back would race.)
 * Checked as the two ops check their arguments (those messages name them and their arguments:
 * to_rope_kv_store's in its in-place form, out = qk, so qk must also pass out's checks, e.g. no
 * element reached twice; to_paged_attention's q is qk's first Hq heads), plus: out overlaps no
 * other argument, and every token has the slot of its position: token t, the i-th of the nq
 * queries of sequence s, needs slot_mapping[t] == block_tables[s][p / block_size] * block_size +
 * p % block_size with p = context_lens[s] - nq + i (so no negative, padding slots).
 * That is what the GPU kernel needs: it writes each new key and value into the cache and reads
 * them back in the same block, which is the two ops' result only when the slot written is the
 * one attention reads for that position. On the CPU every value (the slots, the batch, this
 * precondition) is checked before anything is written; a violation is TO_ERR_INVALID_ARGUMENT
 * naming t, the slot given and the slot expected. On a GPU the one kernel runs for T == 1 and
 * S == 1 (Hq / Hkv <= 8, 16-byte aligned cache rows, sm_90): it checks the precondition and, on a
 * violation, stores nothing, leaves out unwritten and records the error (TO_ERR_INVALID_ARGUMENT)
 * for the next synchronisation, as index errors are (below). Other shapes run the two ops'
 * kernels (the rotation into a workspace), which check the slots and the batch as those ops do but
 * not this precondition. */
int to_rope_kv_attention(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                         const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim, int interleaved,
                         double attention_scaling, const to_tensor *v, const to_tensor *k_cache,
                         const to_tensor *v_cache, const to_tensor *slot_mapping, const to_tensor *cu_seqlens_q,
                         const to_tensor *context_lens, const to_tensor *block_tables, double scale);

/* ---- matrix products ---- */
/* out[M, N] = x[M, K] . w[N, K]^T  (weights in the checkpoint's [out, in] layout).
 * x, out: f32, f16 or bf16; w: those or a block-quantized type (q8_0, q4_0, q4_1, q4_k, q6_k,
 * q4_0x8, q4_1x8, q8_0x8), read in place: each x row is then quantized to 8 bits per block and the block dot products
 * run in integers (as GGML does; relative error ~0.5 % per dot product). Accumulation in f32.
 * w and out need unit stride in their last dimension; x may have any strides. bias [N]
 * optional (NULL). On a GPU, more than 8 rows of x against bf16/f16 w run on the tensor cores,
 * which take x rounded to w's dtype (once, as the frameworks' 16-bit paths do); f32 w and fewer
 * rows keep x in f32. */
int to_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias);
/* out += x . w^T (+ bias), arguments as to_matmul: the product added into out, which is read
 * once (a residual stream updated by a projection). The sum is formed in f32 and rounded once
 * to out's dtype. */
int to_matmul_add(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias);
/* out = rms_norm(x; norm_weight, eps) . w^T (+ bias): to_rms_norm then to_matmul (the same values
 * on the CPU), where a GPU decode product forms rinv * sum_k w[k] x[k] g[k] as it reads x instead
 * of normalising in a kernel of its own (other roundings, ~1e-7 relative); norm_weight [K],
 * arguments otherwise as to_matmul. */
int to_rms_norm_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *norm_weight, double eps,
                       const to_tensor *w, const to_tensor *bias);
/* The gated MLP's first half: with p = rms_norm(x; norm_weight, eps) . w^T (+ bias) as
 * to_rms_norm_matmul computes it (in f32), whose columns interleave gate and up (w's rows: gate
 * row i at 2i, up row i at 2i + 1; N even), out[M, N / 2] = silu(p[:, 2i]) * p[:, 2i + 1], the
 * arithmetic of to_silu_mul. One kernel on a GPU for few rows. */
int to_rms_norm_swiglu(const to_tensor *out, const to_tensor *x, const to_tensor *norm_weight, double eps,
                       const to_tensor *w, const to_tensor *bias);

/* ---- lookups and reductions ----
 * Index values on a GPU (embedding ids, to_kv_cache_store's slots, to_paged_attention's batch)
 * are checked by the kernels that follow them, so no op waits for the GPU: a bad value is
 * skipped (its row or token is not written; a bad attention batch writes nothing) and recorded,
 * and the next call that waits for that GPU (a copy to the host, to_cuda_synchronize) returns
 * TO_ERR_BOUNDS naming the op, the position and the value. Duplicate cache slots are not
 * detected on a GPU (one of the writes wins). */
/* out[t, :] = table[ids[t], :]; ids i32/i64 in [0, rows). A quantized table is dequantized
 * into a float out. */
int to_embedding(const to_tensor *out, const to_tensor *table, const to_tensor *ids);
/* out[r] = index of the largest value of row r (first one on ties); out i64 [rows] */
int to_argmax(const to_tensor *out, const to_tensor *x);
/* values/indices [rows, k]: the k largest of each row, descending, lower index first on ties.
 * values has x's dtype or f32; indices i32 or i64. */
int to_topk(const to_tensor *values, const to_tensor *indices, const to_tensor *x, int k);

/* ---- attention over a paged KV cache ---- */
/* The cache of one layer is k_cache, v_cache [num_blocks, block_size, Hkv, D] (f32, f16 or
 * bf16, both of one dtype, contiguous, block_size >= 1). Cache slot s is row s % block_size of
 * block s / block_size. Both ops check every index value before they write anything.
 *
 * Stores the new tokens' keys and values: k, v [T, Hkv, D] (any float dtype, any strides) go
 * to slots slot_mapping[t] (i32/i64 [T]); a negative slot skips its token (padding). Slots
 * must be distinct and < num_blocks * block_size. */
int to_kv_cache_store(const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *k,
                      const to_tensor *v, const to_tensor *slot_mapping);
/* Causal attention for a flat batch of S sequences (prefill, chunked prefill and decode alike):
 *   out, q [T, Hq, D] (float dtypes, any strides); Hq a multiple of Hkv (GQA: query head h reads
 *     kv head h / (Hq / Hkv));
 *   cu_seqlens_q [S + 1] i32/i64: sequence s owns query rows cu_seqlens_q[s] .. cu_seqlens_q[s+1]
 *     (non-decreasing, from 0 to T);
 *   context_lens [S] i32/i64: tokens of sequence s in the cache, the new ones included (>= its
 *     query count). Its i-th of n queries sits at position context_lens[s] - n + i and attends
 *     to cache positions 0 .. that position;
 *   block_tables [S, max_blocks] i32/i64: block_tables[s][j] holds positions j*block_size ..
 *     (j+1)*block_size - 1 of sequence s; entries past the context are not read.
 *   out = softmax(q k^T * scale) v per head, softmax and accumulation in f32. */
int to_paged_attention(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache,
                       const to_tensor *v_cache, const to_tensor *cu_seqlens_q,
                       const to_tensor *context_lens, const to_tensor *block_tables, double scale);

/* ---- sampling ---- */
/* One token per row of logits [B, V] (f32, f16 or bf16, any strides) into out [B] i64.
 * Per row (all parameter tensors [B], f32 or i32 as named):
 *   temperature f32: <= 0 picks the argmax (lowest index on ties) and ignores the rest;
 *   otherwise p = softmax(logits / temperature), then
 *   top_k i32: keep the top_k most probable tokens and every token tied with the top_k-th
 *     (transformers' TopKLogitsWarper; <= 0 or >= V: all);
 *   top_p f32: of those, in order of decreasing p, keep a token while the mass of the kept
 *     tokens before it is < top_p times the mass of all top_k kept (transformers' rule: the
 *     smallest prefix reaching top_p; >= 1: all; the most probable token is always kept);
 *   min_p f32: drop tokens with p < min_p * max p (<= 0: none);
 *   uniform f32 in [0, 1): the draw. Kept tokens are ordered by decreasing p (lower index first
 *     on ties); the chosen one is the first whose cumulative kept mass exceeds
 *     uniform * (total kept mass). Results depend only on the inputs, never on threads.
 * "Decreasing p" is decreasing logit (exact, before any rounding); p is computed in f32 and masses
 * are summed exactly in fixed point (2^-45 of max p), so a token below that never gets drawn.
 * Every row's values must be valid, greedy rows included: temperature finite (and, if positive,
 * at least ~2.9e-39, so that 1/temperature is finite in f32), top_p > 0 and finite, min_p in
 * [0, 1], uniform in [0, 1); logits may be -inf (never drawn) but not NaN or +inf, and not all
 * -inf in a row (errors name the lowest bad row on the CPU; out is then unspecified).
 * out and logits are on one device (the CPU or a GPU); the five parameter tensors are always CPU
 * tensors, checked and read on the host (a GPU run takes their values in its launch, so only the
 * ids move). On a GPU a bad logits row is not reported by this call: that row's out is set to -1
 * and the next call that synchronises with the GPU (a copy of out to the host) raises the error,
 * naming one bad row. */
int to_sample(const to_tensor *out, const to_tensor *logits, const to_tensor *temperature,
              const to_tensor *top_k, const to_tensor *top_p, const to_tensor *min_p,
              const to_tensor *uniform);

/* The whole sampling pipeline of a decode step (to_sample_pipeline). Every tensor here is a CPU
 * tensor, whatever the logits' device: the values are checked on the host before any work (a GPU
 * run then uploads the token lists without waiting). Per-row tensors are [B]; NULL means "off"
 * for every row. */
typedef struct to_sample_params {
    const to_tensor *temperature, *top_k, *top_p, *min_p, *uniform; /* as to_sample; required */
    const to_tensor *typical_p;          /* f32: transformers' TypicalLogitsWarper (>= 1: off) */
    const to_tensor *repetition_penalty; /* f32 > 0 (1: off) */
    const to_tensor *presence_penalty;   /* f32, finite (0: off) */
    const to_tensor *frequency_penalty;  /* f32, finite (0: off) */
    const to_tensor *no_repeat_ngram;    /* i32 >= 0 (0: off) */
    /* token histories, CSR: row r's is history[history_offsets[r] : history_offsets[r + 1]]
     * (i32 ids in [0, V); offsets i32 [B + 1], non-decreasing, within [0, H]), whose first
     * prompt_lens[r] tokens (i32 [B]) are its prompt and the rest its generated tokens. Needed by
     * (and only by) the penalties and the n-gram block. */
    const to_tensor *history, *history_offsets, *prompt_lens;
    /* additive bias, CSR: logits[r, bias_ids[j]] += bias_values[j] for j in bias_offsets[r] ..
     * bias_offsets[r + 1] (ids i32 in [0, V), repeats added in order; values f32, finite or -inf:
     * -inf bans a token) */
    const to_tensor *bias_ids, *bias_offsets, *bias_values;
} to_sample_params;

/* One token per row, as to_sample, after the logits processors, in transformers' order
 * (generation/utils.py _get_logits_processor) applied to a copy of the row (logits is never
 * written):
 *   1. bias (SequenceBiasLogitsProcessor with one-token sequences: logit_bias, bans);
 *   2. repetition_penalty over the whole history, each distinct token once
 *      (RepetitionPenaltyLogitsProcessor: x < 0 ? x * penalty : x / penalty);
 *   3. presence / frequency penalties over the generated tokens (OpenAI: x -= frequency * count
 *      + presence * (count > 0); not in transformers, applied after the repetition penalty as
 *      vLLM does);
 *   4. no_repeat_ngram: -inf for every token that would complete an n-gram already in the history
 *      (NoRepeatNGramLogitsProcessor);
 * then greedy rows take the argmax; sampled rows go through temperature, top_k, top_p, min_p
 * (to_sample's rules) and typical_p: of the kept tokens, with p renormalised over them and
 * H = -sum p log p, keep those with |-log p - H| <= s, s the smallest such bound whose tokens
 * hold at least typical_p of the kept mass (TypicalLogitsWarper, min_tokens_to_keep = 1), and
 * draw as to_sample does among what is kept.
 * Outputs (all on the logits' device; NULL: not wanted):
 *   out i64 [B]: the tokens (required);
 *   logprobs f32 [B]: log_softmax of the row's raw logits (before any processor: vLLM's default
 *     and what OpenAI-style servers report) at the chosen token;
 *   top_ids i64 [B, N], top_logprobs f32 [B, N] (both or neither, 0 <= N <= V): the N largest
 *     raw log-probabilities of each row, decreasing, lower index first on ties;
 *   processed f32 [B, V]: the row after the processors and warpers, as transformers' chain
 *     leaves its scores: kept tokens hold (processed logit) / temperature, the others -inf;
 *     greedy rows hold the processed logits (no warper applies to them).
 * A row is checked before its processors (as to_sample checks it) and after them: a processor
 * may not make it NaN or +inf (overflow) or all -inf (every token banned); errors name the row. */
int to_sample_pipeline(const to_tensor *out, const to_tensor *logprobs, const to_tensor *top_ids,
                       const to_tensor *top_logprobs, const to_tensor *processed,
                       const to_tensor *logits, const to_sample_params *params);

/* ---- MoE routing ---- */
/* Groups the (token, slot) assignments of values [T, k] (i32/i64 expert ids in [0, num_values))
 * by value, stably:
 *   order   [T*k]            i32/i64: assignment ids a = t*k + j, sorted by value
 *   offsets [num_values + 1] i32/i64: rows of value e are order[offsets[e] : offsets[e+1]]
 *   rows    [T*k, D] (optional, may be NULL): rows[i] = x[order[i] / k], x [T, D]  */
int to_gather_by_value(const to_tensor *rows, const to_tensor *order, const to_tensor *offsets,
                       const to_tensor *x, const to_tensor *values, int num_values);
/* out[index[i], :] += weight[i] * src[i, :]; out [T, D], src [N, D], index [N] i32/i64,
 * weight [N] f32 (optional, NULL means 1). Deterministic: contributions to a row are added
 * in increasing i. */
int to_scatter_add_by_index(const to_tensor *out, const to_tensor *src, const to_tensor *index,
                            const to_tensor *weight);

/* ---- paged KV cache sharing and beam search ---- */
/* Copy-on-write of paged KV cache blocks: for every pair i and every cache c,
 * block dst[i] of caches[c] becomes a copy of its block src[i] (caches[c] viewed as
 * [num_blocks, ...]: a block is one index of dimension 0). caches: an array of num_caches >= 1
 * descriptors (a model's k and v cache of every layer: one call copies a block of all of them),
 * each contiguous, of one dtype and one shape, on one device, none overlapping another. src, dst
 * [P] i32/i64 are CPU tensors whatever the caches' device (their values are checked on the host
 * and, on a GPU, travel in the launch's arguments: one launch copies all pairs of up to 64 caches):
 * every id in [0, num_blocks), src[i] != dst[i], the dst ids distinct and none of them among the
 * src ids (so the pairs may be copied in any order); a src may repeat (one block copied for
 * several sharers). Runs in the caches' stream order on a GPU (after the writes queued before it,
 * before the reads queued after it). P = 0 does nothing. */
int to_kv_copy_blocks(const to_tensor *caches, int num_caches, const to_tensor *src, const to_tensor *dst);
/* One beam-search step's candidates for G groups of logits rows (each group: the live beams of one
 * request). Group g is groups[g] = (first, rows, k) (groups: [G, 3] i32/i64 CPU tensor): it owns logits
 * rows first .. first + rows - 1 of logits [R, V] (f32, f16 or bf16, any strides), and row
 * first + b is its beam b, whose running score (sum of log-probabilities so far) is
 * beam_scores[first + b] (beam_scores [R] f32 CPU tensor, finite where read). Each candidate
 * (beam b, token t) has
 *   value = ((x - m) - ln s) + beam_scores[first + b]   (f32 operations in that order)
 * with x the logit, m the row's max and s = sum over the row of exp(x - m) (exp in f32, summed in
 * f64, ln s rounded to f32): the log-softmax plus the beam's score. suppress (NULL, or [G, M]
 * i32/i64 CPU tensor): ids whose value is -inf in every row of group g (negative entries unused;
 * others < V) - the end tokens of a request still below its minimum length.
 * Out: scores [G, K] f32 and ids [G, K] i64 on the logits' device; row g holds the group's k best
 * candidates, best first: larger value first, and of equal values the lower flat index
 * b * V + t, which ids[g, j] holds (beam = id / V, token = id % V); scores[g, j] its value (a
 * -0.0 comes out as +0.0). Entries j >= k are -inf and -1. 1 <= k <= min(K, rows * V); rows * V
 * <= 2^32. Logits must not be NaN or +inf, nor a row all -inf (an error naming the row; on a GPU
 * the error is recorded and raised by the next call that synchronises with it, and that call's
 * outputs are unspecified). On a GPU a group has at most 256 rows, k <= 1024 and 128 suppressed ids. */
int to_beam_topk(const to_tensor *scores, const to_tensor *ids, const to_tensor *logits,
                 const to_tensor *beam_scores, const to_tensor *groups, const to_tensor *suppress);
/* CDEF-END */

#ifdef __cplusplus
}
#endif

#endif /* TENSOR_OPS_H */
