// matmul.cuh - what matmul.cu (GEMV, small GEMMs), gemv_quant.cu (the decode GEMV for
// block-quantized weights) and gemm_sm90.cu (the Hopper tensor-core GEMM for prefill) share: the
// argument block of one product, the output stores and the L2 prefetch.
#pragma once

#include "cuda/common.cuh"

struct MatmulArgs {
    int64_t M, N, K;
    const char *x;      // x[m, k] at element m * xs0 + k * xs1
    int64_t xs0, xs1;
    int x_dt;
    const char *w;      // row n starts at byte n * w_row_bytes
    int64_t w_row_bytes;
    int w_dt;
    bool w_quant;       // block-quantized w
    char *out;          // out[m, n] at element m * os0 + n
    int64_t os0;
    int out_dt;
    const char *bias;   // bias[n] at element n * bs0, or NULL
    int64_t bs0;
    int bias_dt;
    bool accumulate;    // out += the product (to_matmul_add)
    bool swiglu;        // rows interleave gate and up: out[m, n / 2] = silu(gate) * up (to_rms_norm_swiglu)
    const char *norm_w; // the streaming GEMVs only: x rows RMS-normalised first with the weight
    int norm_dt;        //   norm_w [K] (contiguous, 16-byte aligned) and norm_eps; NULL: no norm
    double norm_eps;
    bool early_loads;   // decode products: first weight loads before to_pdl_wait (gemv_early_loads)
};

// Whether the decode products (gemv_stream_kernel, gemm_skinny.cu) issue their first weight loads
// before waiting for the previous kernel: yes unless INFERENCE_PIO_GEMV_EARLY=0 (read once, like
// INFERENCE_PIO_PDL: not a getenv per product on the eager path). A run-time flag rather than
// unconditional code on purpose: see matmul.cu.
inline bool gemv_early_loads() {
    static const bool early = to_env_switch("INFERENCE_PIO_GEMV_EARLY");
    return early;
}

// out[m, n] = acc (+ bias) (+ old, out[m, n] before, when accumulating), rounded once to out's
// dtype; bias and old already loaded (store_out loads them itself).
__device__ __forceinline__ void store_sum(const MatmulArgs &a, int64_t m, int64_t n, float acc, float bias,
                                          float old) {
    if (a.bias)
        acc += bias;
    if (a.accumulate)
        acc = old + acc;
    to_store(a.out, a.out_dt, m * a.os0 + n, acc);
}

// out[m, n] = acc (+ bias[n]) (+ out[m, n] when accumulating), rounded once to out's dtype.
__device__ __forceinline__ void store_out(const MatmulArgs &a, int64_t m, int64_t n, float acc) {
    store_sum(a, m, n, acc, a.bias ? to_load(a.bias, a.bias_dt, n * a.bs0) : 0.0f,
              a.accumulate ? to_load(a.out, a.out_dt, m * a.os0 + n) : 0.0f);
}

// The SwiGLU epilogue of a row pair (gate row n, up row n + 1, n even): each dot gets its bias
// (bg, bu, already loaded; 0 without one), then out[m, n / 2] = silu(gate) * up, the arithmetic
// of to_silu_mul.
__device__ __forceinline__ void store_swiglu_sum(const MatmulArgs &a, int64_t m, int64_t n, float gate, float up,
                                                 float bg, float bu) {
    if (a.bias) {
        gate += bg;
        up += bu;
    }
    to_store(a.out, a.out_dt, m * a.os0 + n / 2, __fmul_rn(to_silu(gate), up));
}

// The same, loading the biases itself (as store_out does).
__device__ __forceinline__ void store_swiglu(const MatmulArgs &a, int64_t m, int64_t n, float gate, float up) {
    store_swiglu_sum(a, m, n, gate, up, a.bias ? to_load(a.bias, a.bias_dt, n * a.bs0) : 0.0f,
                     a.bias ? to_load(a.bias, a.bias_dt, (n + 1) * a.bs0) : 0.0f);
}

// What the streaming GEMVs' epilogue adds to rows n0 .. n0 + R of each of x's M rows: bias[n] and,
// accumulating, out[m, n]. The storing lane loads them right after the wait, so that their trip to
// memory overlaps the dot products instead of following them (H200, decode-step graph replay, one
// build with the old order as a switch: 4B 3,141-3,143 -> 3,036-3,039 us, 0.6B 842-844 ->
// 820-828; in isolation 4B's o_proj to_matmul_add 9.1 -> 7.4 us, down 18.6 -> 16.2).
template <int MR, int R> struct RowsAddends {
    float bias[R], old[MR][R];
    __device__ __forceinline__ void load(const MatmulArgs &a, int64_t n0, const bool (&ok)[R]) {
#pragma unroll
        for (int r = 0; r < R; r++)
            bias[r] = a.bias && ok[r] ? to_load(a.bias, a.bias_dt, (n0 + r) * a.bs0) : 0.0f;
#pragma unroll
        for (int m = 0; m < MR; m++)
#pragma unroll
            for (int r = 0; r < R; r++)
                old[m][r] = a.accumulate && ok[r] && m < a.M ? to_load(a.out, a.out_dt, m * a.os0 + n0 + r) : 0.0f;
    }
};

// One element of a float dtype as f32.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// VEC consecutive elements k.. of a float vector (f32/f16/bf16, unit stride, 16-byte aligned
// base, k a multiple of VEC) as f32: one 16-byte load for 16-bit values and VEC = 8.
template <int VEC> __device__ __forceinline__ void load_vec_f32(const char *base, int dtype, int64_t k, float v[VEC]) {
    if (dtype == TO_F32) {
#pragma unroll
        for (int q = 0; q < VEC / 4; q++) {
            float4 t = __ldg((const float4 *)base + k / 4 + q);
            v[4 * q] = t.x, v[4 * q + 1] = t.y, v[4 * q + 2] = t.z, v[4 * q + 3] = t.w;
        }
        return;
    }
    uint32_t raw[VEC / 2];
    if constexpr (VEC == 8) {
        uint4 t = __ldg((const uint4 *)base + k / 8);
        raw[0] = t.x, raw[1] = t.y, raw[2] = t.z, raw[3] = t.w;
    } else {
        uint2 t = __ldg((const uint2 *)base + k / 4);
        raw[0] = t.x, raw[1] = t.y;
    }
    const __nv_bfloat16 *b = (const __nv_bfloat16 *)raw;
    const __half *h = (const __half *)raw;
#pragma unroll
    for (int i = 0; i < VEC; i++)
        v[i] = dtype == TO_BF16 ? __bfloat162float(b[i]) : __half2float(h[i]);
}

// Async copies (sm_80+; gemv_quant.cu, gemm_skinny.cu): 16 bytes global -> shared without
// registers, in commit groups. Earlier GPUs copy through a register at once (the same results,
// without the overlap).
__device__ __forceinline__ void cp16(void *smem, const void *gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
#else
    *(uint4 *)smem = __ldg((const uint4 *)gmem);
#endif
}

__device__ __forceinline__ void cp_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N of this thread's commit groups are still pending.
template <int N> __device__ __forceinline__ void cp_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Asks the L2 to fetch [p, p + bytes) (16-byte aligned, a multiple of 16 bytes) ahead of the loads:
// the quantized GEMV issues it for its weight rows before to_pdl_wait() (safe whatever the
// previous kernel writes: the L2 is coherent), so the DRAM latency overlaps that kernel's tail.
// (The float GEMV and the batched-decode product no longer do: matmul.cu and gemm_skinny.cu say
// why; for the quantized GEMV, dropping it measured 1-2 % slower for Q8_0.) sm_90+; a no-op
// before.
__device__ __forceinline__ void prefetch_l2(const void *p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// The decode GEMV for block-quantized w (gemv_quant.cu): M <= 8, x f32 with unit stride and
// 16-byte aligned rows, any whole-block K, with every epilogue of MatmulArgs (bias, accumulate,
// the norm when a.norm_w is set, swiglu). Returns 1 when it launched the product on `stream`, 0
// when the case is not one it handles (the caller falls back; INFERENCE_PIO_GEMV_QUANT=0 makes it
// always 0, =1/2/4 forces the number of warps per row pair). Launch errors are left for
// to_cuda_check_launch.
__attribute__((visibility("hidden"))) int to_cuda_gemv_quant(const MatmulArgs &a, int device_index,
                                                             cudaStream_t stream);

// The end of a streaming GEMV whose warps each own R rows (gemv_stream_kernel, gemv_quant.cu):
// each warp's dots (and, with the norm, sums of squares) reduced over its lanes; with ksplit > 1
// warps per row group (adjacent warps, part = warp % ksplit) the parts summed in order through
// `partial` by part 0 (every thread of the block must call this: it has a barrier then); then
// lane 0 of part 0 stores its rows: store_sum of rinv * dot with add's bias and old out, or the
// SwiGLU pair (rows n0, n0 + 1) with add's biases.
template <int MR, int R, bool NORM>
__device__ __forceinline__ void gemv_rows_finish(const MatmulArgs &a, float (&acc)[MR][R], float (&ss)[MR],
                                                 float (*partial)[MR][R + 1], int ksplit, int warp, int lane,
                                                 int64_t n0, const bool (&ok)[R], const RowsAddends<MR, R> &add) {
    const int part = warp % ksplit;
#pragma unroll
    for (int m = 0; m < MR; m++) {
#pragma unroll
        for (int r = 0; r < R; r++)
            acc[m][r] = to_warp_sum(acc[m][r]);
        if constexpr (NORM)
            ss[m] = to_warp_sum(ss[m]);
    }
    if (ksplit > 1) {
        if (lane == 0)
#pragma unroll
            for (int m = 0; m < MR; m++) {
#pragma unroll
                for (int r = 0; r < R; r++)
                    partial[warp][m][r] = acc[m][r];
                partial[warp][m][R] = ss[m];
            }
        __syncthreads();
        if (part == 0 && lane == 0)
#pragma unroll
            for (int m = 0; m < MR; m++) {
#pragma unroll
                for (int r = 0; r < R; r++) {
                    acc[m][r] = 0.0f;
                    for (int p = 0; p < ksplit; p++)
                        acc[m][r] += partial[warp + p][m][r];
                }
                ss[m] = 0.0f;
                for (int p = 0; p < ksplit; p++)
                    ss[m] += partial[warp + p][m][R];
            }
    }
    if (part != 0 || lane != 0)
        return;
#pragma unroll
    for (int m = 0; m < MR; m++) {
        if (m >= a.M)
            break;
        const float rinv = NORM ? (float)(1.0 / sqrt((double)ss[m] / (double)a.K + a.norm_eps)) : 1.0f;
        if (a.swiglu) { // rows n0, n0 + 1 are gate and up of output column n0 / 2 (N is even)
            if (ok[0])
                store_swiglu_sum(a, m, n0, acc[m][0] * rinv, acc[m][1] * rinv, add.bias[0], add.bias[1]);
            continue;
        }
#pragma unroll
        for (int r = 0; r < R; r++)
            if (ok[r])
                store_sum(a, m, n0 + r, acc[m][r] * rinv, add.bias[r], add.old[m][r]);
    }
}

// The batched-decode product (gemm_skinny.cu): 1..64 rows of x (f32/f16/bf16, unit stride, 16-byte
// aligned rows) against bf16/f16 w (16-byte aligned rows) with K a multiple of 64, every epilogue of
// MatmulArgs (the norm only against bf16 w). Returns 1 when it launched the product on `stream`,
// 0 when the case is not one it handles (INFERENCE_PIO_GEMM_SKINNY=0 makes it always 0); launch
// errors are left for to_cuda_check_launch.
__attribute__((visibility("hidden"))) int to_cuda_gemm_skinny(const MatmulArgs &a, int device_index,
                                                              cudaStream_t stream);

// The Hopper GEMM (gemm_sm90.cu): x and w both bf16 or both f16, out overwritten (a.accumulate
// is not read). Returns 1 when it launched the product on `stream`, 0 when this GPU, build or
// shape is not one it handles (the caller then uses its own kernels); launch errors are left for
// to_cuda_check_launch.
__attribute__((visibility("hidden"))) int to_cuda_gemm_sm90(const MatmulArgs &a, int device_index,
                                                            cudaStream_t stream);
