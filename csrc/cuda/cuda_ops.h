/* cuda_ops.h - the CUDA kernels behind the public ops, one entry per op family, mirroring the
 * CPU ones (csrc/cpu). Arguments arrive validated by csrc/ops/ exactly as for the CPU: shapes,
 * dtypes, strides, aliasing. The values of index tensors (ids, slots, block tables) live on the
 * GPU and are checked there by the kernels that follow them, which skip a bad one and record it
 * (common.cuh, "index values checked on the GPU"): no op waits for the GPU. Every tensor is on the same GPU
 * (device_index), and each entry launches its work on that GPU's stream (to_cuda_stream in
 * common.cuh) without synchronising, and returns TO_OK or a TO_ERR_CUDA error naming the op
 * when a launch fails. Semantics and dtype rules are the CPU kernels': see each op's comment
 * in tensor_ops.h and its csrc/cpu counterpart.
 *
 * A build without nvcc links csrc/core/no_cuda.c instead, whose entries fail with a clear
 * "no CUDA support in this build" error. */
#ifndef TO_CUDA_OPS_H
#define TO_CUDA_OPS_H

#include "internal.h"
#include "cpu/sample.h" /* to_sample_plan */

#ifdef __cplusplus
extern "C" {
#endif
#pragma GCC visibility push(hidden)

/* ---- copy.cu ---- */
/* out = x on one GPU, any strides, converting between any two plain dtypes as to_cpu_copy does
 * (floats round to nearest even; float -> integer truncates and saturates; NaN -> 0), and
 * block-quantized x dequantized into a float out (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; rows contiguous).
 * Same-dtype quantized copies move whole blocks. */
int to_cuda_copy(const to_tensor *out, const to_tensor *x);
/* every element of a plain-dtype out = value (converted as to_cpu_fill does) */
int to_cuda_fill(const to_tensor *out, double value);

/* ---- elementwise.cu ---- */
/* op: TO_EW_ADD / MUL / SCALE / SILU_MUL (csrc/cpu/elementwise.h), computed in f32; a and b of
 * out's shape with any strides (0 allowed), out exactly an input's view or disjoint. */
int to_cuda_elementwise(const to_tensor *out, const to_tensor *a, const to_tensor *b, int op, float scale);
int to_cuda_softmax(const to_tensor *out, const to_tensor *x);

/* ---- norm.cu ---- */
/* as to_cpu_rms_norm: residual NULL, or residual += x in place first and the sum normalised */
int to_cuda_rms_norm(const to_tensor *out, const to_tensor *residual, const to_tensor *x,
                     const to_tensor *weight, double eps);

/* ---- rope.cu ---- */
int to_cuda_rope(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
                 const to_tensor *inv_freq, int rotary_dim, int interleaved, double attention_scaling);
/* as to_cpu_rms_norm_rope; TO_ERR_UNSUPPORTED when rotary_dim / 2 or D - rotary_dim is over 512
 * (one warp holds the head in registers) */
int to_cuda_rms_norm_rope(const to_tensor *out, const to_tensor *x, const to_tensor *weight, double eps,
                          const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                          int interleaved, double attention_scaling);
/* as to_cpu_rms_norm_rope (weight given) or to_cpu_rope (weight NULL) then to_cpu_kv_cache_store
 * of out's last Hkv heads and v, in one launch; the slots are checked by the kernel, a bad one
 * recorded (TO_GPU_ERR_ROPE_KV_SLOT) and its token's k and v not stored (out is still written).
 * With a weight, the register limit of to_cuda_rms_norm_rope. */
int to_cuda_rope_kv_store(const to_tensor *out, const to_tensor *qk, const to_tensor *weight, double eps,
                          const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                          int interleaved, double attention_scaling, const to_tensor *v,
                          const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *slot_mapping);

/* ---- embedding.cu ---- */
int to_cuda_embedding(const to_tensor *out, const to_tensor *table, const to_tensor *ids);

/* ---- reduce.cu ---- */
int to_cuda_argmax(const to_tensor *out, const to_tensor *x);
int to_cuda_topk(const to_tensor *values, const to_tensor *indices, const to_tensor *x, int k);

/* ---- matmul.cu ---- */
/* out[M, N] = x[M, K] . w[N, K]^T (+ bias), w float (f32/f16/bf16) or block-quantized (Q8_0,
 * Q4_0, Q4_1, Q4_K, Q6_K; the X8 layouts are CPU-only and never reach here), f32 accumulation. */
enum { TO_MM_STORE = 0, TO_MM_ADD = 1, TO_MM_SWIGLU = 2 };
int to_cuda_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias,
                   const to_tensor *norm_weight, double eps, int epilogue);
/* With norm_weight (not NULL): x's rows are first normalised as to_rms_norm does (to_rms_norm_matmul).
 * epilogue: TO_MM_STORE out = the product; TO_MM_ADD out += it (to_matmul_add); TO_MM_SWIGLU
 * (w's rows interleave gate and up, out is [M, N / 2]) out = silu(gate) * up (to_rms_norm_swiglu). */

/* ---- attention.cu ---- */
int to_cuda_kv_cache_store(const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *k,
                           const to_tensor *v, const to_tensor *slot_mapping);
int to_cuda_paged_attention(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache,
                            const to_tensor *v_cache, const to_tensor *cu_seqlens_q,
                            const to_tensor *context_lens, const to_tensor *block_tables, double scale);
/* as to_rope_kv_store into a temporary of qk's dtype then to_paged_attention on its q heads, qk
 * only read (tensor_ops.h), arguments as the public op's: one kernel for a single sequence with a
 * single query (which checks that its slot is its position's, recording a violation and writing
 * nothing), else the two ops' kernels with the rotated heads in a workspace */
int to_cuda_rope_kv_attention(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                              const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                              int interleaved, double attention_scaling, const to_tensor *v,
                              const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *slot_mapping,
                              const to_tensor *cu_seqlens_q, const to_tensor *context_lens,
                              const to_tensor *block_tables, double scale);

/* ---- sample.cu ---- */
/* A validated to_sample / to_sample_pipeline call (csrc/cpu/sample.h) on a GPU: the same outputs
 * as to_cpu_sample for the same inputs (see csrc/cuda/sample.cu for where the two may differ);
 * the parameters are CPU tensors, checked on the host by csrc/ops/sample.c: their per-row values
 * travel in the kernels' arguments and the token lists are uploaded without waiting. */
int to_cuda_sample(const to_sample_plan *plan);

/* ---- kv_copy.cu ---- */
/* as to_cpu_kv_copy_blocks (csrc/cpu/kv_copy.h): the ids are CPU tensors checked on the host by
 * csrc/ops/kv_copy.c, whose values travel in the launch's arguments */
int to_cuda_kv_copy_blocks(const to_tensor *caches, int num_caches, const to_tensor *src, const to_tensor *dst);

/* ---- beam.cu ---- */
/* as to_cpu_beam_topk (csrc/cpu/beam.h), beam_scores, groups and suppress CPU tensors whose values
 * travel in the launches' arguments; bad logits are recorded (TO_GPU_ERR_BEAM_LOGITS) */
int to_cuda_beam_topk(const to_tensor *scores, const to_tensor *ids, const to_tensor *logits,
                      const to_tensor *beam_scores, const to_tensor *groups, const to_tensor *suppress);

#pragma GCC visibility pop
#ifdef __cplusplus
}
#endif

#endif
