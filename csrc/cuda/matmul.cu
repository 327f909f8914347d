// matmul.cu - to_cuda_matmul: out[M, N] = x[M, K] . w[N, K]^T (+ bias[N]), accumulated in f32.
//
// x, out and bias are f32, f16 or bf16 in any combination (x with any strides, out rows
// out->strides[0] apart); w is f32/f16/bf16 or GGML blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) along
// K, with unit last stride and rows w->strides[0] elements apart. csrc/ops/matmul.c has checked
// all of that, so nothing is re-validated here.
//
// The kernels, chosen by M (rows of x):
//
//  - GEMV (M <= GEMV_MAX_ROWS = 8, decode). Reading w once is the whole cost, so one warp owns one
//    weight row and streams it (16-byte loads for float w when aligned; in-register
//    dequantization for block types), dotting each piece with all M rows of x at once. x is
//    converted to f32 into shared memory once per block, a chunk of K at a time, so any dtype and
//    any strides of x cost the same. Lanes read consecutive pieces of the row, so the warp's
//    loads are coalesced, and a warp shuffle reduces the 32 partial sums at the end.
//    (Decode's own forms take streaming kernels first: gemv_stream_kernel below for float w,
//    gemv_quant.cu for block-quantized w, both for an f32 x with unit stride.)
//    Quantized w is dequantized to exactly the f32 values csrc/cpu/quant.c gives, and x stays
//    f32: unlike the CPU path (which quantizes x to 8 bits), the GPU result is f32-accurate
//    against the dequantized weights.
//
//  - Batched decode (9 <= M <= 64, bf16/f16 w, K a multiple of 64, x with unit stride: the
//    decode step of a batch): gemm_skinny.cu, tensor cores fed straight from the weight stream,
//    with every epilogue of the GEMV inside, for the shapes its plan covers (see there).
//
//  - Tensor-core GEMM (M > 8, x and w both bf16 or both f16): 64x64 output tiles, K in steps of
//    32 through shared memory, WMMA 16x16x16 fragments with f32 accumulators (on Hopper the
//    wgmma GEMM of gemm_sm90.cu first).
//
//  - FMA GEMM (M > 8, every other combination: f32, mixed dtypes, quantized w): 64x64 output
//    tiles, K in steps of 16 through f32 shared-memory tiles (quantized w is dequantized while
//    the tile is loaded), 4x4 outputs per thread.
//
// Why 8: at M rows the GEMV does M FMAs per weight element it loads and keeps M accumulators
// per lane; up to ~8 rows it stays bound by the weight stream (the CPU path uses the same split).
// Beyond that the tiled kernels, which reuse each loaded weight for 64 rows, win.
#include "cuda/common.cuh"
#include "cuda/matmul.cuh"
#include "cuda/quant.cuh"
#include "cpu/elementwise.h"

#include <atomic>
#include <math.h>
#include <mma.h>
#include <string.h>

#define GEMV_MAX_ROWS 8
#define GEMV_WARPS 8                  // weight rows (one per warp) per GEMV block
#define GEMV_SMEM_FLOATS 8192         // x staging: 32 KB, MR rows of GEMV_SMEM_FLOATS / MR floats

// ---------------------------------------------------------------------------------------------
// Block-quantized weights: four consecutive elements k .. k+3 (k a multiple of 4) of a row that
// starts at `row`, as f32, with the operations of csrc/cpu/quant.c in the same order (so the
// values are identical). Blocks are only 2-byte aligned (34, 18 and 210 bytes long), so words
// are read as pairs of 16-bit halves.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float f16_at(const char *p) { return __half2float(*(const __half *)p); }

__device__ __forceinline__ uint32_t u32_at(const char *p) {
    const uint16_t *h = (const uint16_t *)p;
    return (uint32_t)h[0] | ((uint32_t)h[1] << 16);
}

struct Q8_0 {
    static constexpr int BS = 32, BB = 34;
    __device__ static void load4(const char *row, int64_t k, float v[4]) {
        const char *b = row + (k / BS) * BB;
        int j = (int)(k % BS);
        float d = f16_at(b);
        uint32_t q = u32_at(b + 2 + j);
#pragma unroll
        for (int i = 0; i < 4; i++)
            v[i] = d * (float)(int8_t)(q >> (8 * i));
    }
};

struct Q4_0 {
    static constexpr int BS = 32, BB = 18;
    __device__ static void load4(const char *row, int64_t k, float v[4]) {
        const char *b = row + (k / BS) * BB;
        int j = (int)(k % BS); // element j < 16: low nibble of qs[j]; else high nibble of qs[j - 16]
        float d = f16_at(b);
        uint32_t q = u32_at(b + 2 + (j & 15)) >> (j >= 16 ? 4 : 0);
#pragma unroll
        for (int i = 0; i < 4; i++)
            v[i] = d * (float)((int)((q >> (8 * i)) & 0xF) - 8);
    }
};

struct Q4_1 {
    static constexpr int BS = 32, BB = 20;
    __device__ static void load4(const char *row, int64_t k, float v[4]) {
        const char *b = row + (k / BS) * BB;
        int j = (int)(k % BS);
        float d = f16_at(b), m = f16_at(b + 2);
        uint32_t q = u32_at(b + 4 + (j & 15)) >> (j >= 16 ? 4 : 0);
#pragma unroll
        for (int i = 0; i < 4; i++)
            v[i] = __fadd_rn(__fmul_rn(d, (float)((q >> (8 * i)) & 0xF)), m);
    }
};

struct Q4_K {
    static constexpr int BS = 256, BB = 144;
    __device__ static void load4(const char *row, int64_t k, float v[4]) {
        const char *b = row + (k / BS) * BB;
        int j = (int)(k % BS), sb = j / 32, l = j % 32;
        const uint8_t *s = (const uint8_t *)b + 4; // 12 bytes of 6-bit scales and mins
        int sc, m;
        to_q4k_scale_min(s, sb, &sc, &m);
        float d1 = __fmul_rn(f16_at(b), (float)sc), m1 = __fmul_rn(f16_at(b + 2), (float)m);
        // sub-blocks 2i and 2i+1 share 32 bytes of qs: low nibbles for 2i, high for 2i+1
        uint32_t q = u32_at(b + 16 + 32 * (sb / 2) + l) >> (sb & 1 ? 4 : 0);
#pragma unroll
        for (int i = 0; i < 4; i++)
            v[i] = __fsub_rn(__fmul_rn(d1, (float)((q >> (8 * i)) & 0xF)), m1);
    }
};

struct Q6_K {
    static constexpr int BS = 256, BB = 210;
    __device__ static void load4(const char *row, int64_t k, float v[4]) {
        const char *b = row + (k / BS) * BB;
        // element e = 128 h + 32 c + l: low 4 bits in ql[64 h + 32 (c & 1) + l] (high nibble for
        // c >= 2), high 2 bits at bit 2c of qh[32 h + l]; scale scales[e / 16]
        int e = (int)(k % BS), h = e / 128, c = (e / 32) % 4, l = e % 32;
        uint32_t lo = u32_at(b + 64 * h + 32 * (c & 1) + l) >> (c & 2 ? 4 : 0);
        uint32_t hi = u32_at(b + 128 + 32 * h + l) >> (2 * c);
        float ds = __fmul_rn(f16_at(b + 208), (float)((const int8_t *)b)[192 + e / 16]);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int q = (int)((lo >> (8 * i)) & 0xF) | ((int)((hi >> (8 * i)) & 3) << 4);
            v[i] = __fmul_rn(ds, (float)(q - 32));
        }
    }
};

// The same, choosing the type at run time (the GEMM's tile loader; the branch is uniform).
__device__ __forceinline__ void dequant4(int dtype, const char *row, int64_t k, float v[4]) {
    switch (dtype) {
    case TO_Q8_0: Q8_0::load4(row, k, v); break;
    case TO_Q4_0: Q4_0::load4(row, k, v); break;
    case TO_Q4_1: Q4_1::load4(row, k, v); break;
    case TO_Q4_K: Q4_K::load4(row, k, v); break;
    case TO_Q6_K: Q6_K::load4(row, k, v); break;
    default: v[0] = v[1] = v[2] = v[3] = 0.0f; break;
    }
}

// ---------------------------------------------------------------------------------------------
// Float weights for the GEMV: VEC consecutive elements per lane per step. Vec: one 16-byte load
// (needs a 16-byte aligned row start); Scalar: one element (any alignment).
// ---------------------------------------------------------------------------------------------

template <typename T> struct FloatVec {
    static constexpr int VEC = 16 / sizeof(T);
    static constexpr bool QUANT = false;
    __device__ static void load(const char *row, int64_t k, float v[VEC]) {
        uint4 raw = __ldg((const uint4 *)((const T *)row + k));
        const T *t = (const T *)&raw;
#pragma unroll
        for (int i = 0; i < VEC; i++)
            v[i] = to_f32(t[i]);
    }
    __device__ static float load1(const char *row, int64_t k) { return to_f32(((const T *)row)[k]); }
};

template <typename T> struct FloatScalar {
    static constexpr int VEC = 1;
    static constexpr bool QUANT = false;
    __device__ static void load(const char *row, int64_t k, float v[1]) { v[0] = to_f32(((const T *)row)[k]); }
    __device__ static float load1(const char *row, int64_t k) { return to_f32(((const T *)row)[k]); }
};

template <class Q> struct Quant {
    static constexpr int VEC = 4;
    static constexpr bool QUANT = true;
    __device__ static void load(const char *row, int64_t k, float v[4]) { Q::load4(row, k, v); }
    __device__ static float load1(const char *, int64_t) { return 0.0f; } // never called: K is whole blocks
};

// ---------------------------------------------------------------------------------------------
// GEMV: MR >= M rows of x, one warp per weight row, GEMV_WARPS rows per block.
// ---------------------------------------------------------------------------------------------

// (The 4 in the launch bounds lets ptxas use up to 64 registers: left to itself it aimed at
// ~40 and spilled a few bytes in the Q4_K / Q4_0 kernels. 4 blocks of 32 KB still fit an SM.)
template <int MR, class W>
__global__ void __launch_bounds__(32 * GEMV_WARPS, 4) gemv_kernel(MatmulArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    constexpr int KC = GEMV_SMEM_FLOATS / MR; // k per staged chunk of x (a multiple of 256)
    constexpr int VEC = W::VEC;
    __shared__ __align__(16) float xs[MR * KC]; // x[m, k0 + kk] at xs[m * KC + kk], as f32
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int64_t n = (int64_t)blockIdx.x * GEMV_WARPS + warp;
    bool active = n < a.N; // idle warps still help stage x and meet the barriers
    const char *wrow = a.w + (active ? n : 0) * a.w_row_bytes;

    float acc[MR];
#pragma unroll
    for (int m = 0; m < MR; m++)
        acc[m] = 0.0f;

    for (int64_t k0 = 0; k0 < a.K; k0 += KC) {
        int kc = (int)min((int64_t)KC, a.K - k0);
        __syncthreads(); // the previous chunk is no longer being read
        for (int i = threadIdx.x; i < MR * kc; i += blockDim.x) {
            int m = i / kc, kk = i % kc;
            xs[m * KC + kk] = m < a.M ? to_load(a.x, a.x_dt, m * a.xs0 + (k0 + kk) * a.xs1) : 0.0f;
        }
        __syncthreads();
        if (!active)
            continue;

        // Main part: lane handles VEC consecutive elements, the warp 32 * VEC per step. k0 is a
        // multiple of KC, so 16-byte alignment of the row carries over to every step.
        int kv = kc / VEC * VEC;
#pragma unroll 2
        for (int k = lane * VEC; k < kv; k += 32 * VEC) {
            float wv[VEC];
            W::load(wrow, k0 + k, wv);
#pragma unroll
            for (int m = 0; m < MR; m++) {
                const float *xr = xs + m * KC + k;
                if constexpr (VEC % 4 == 0) {
#pragma unroll
                    for (int i = 0; i < VEC; i += 4) {
                        float4 xv = *(const float4 *)(xr + i);
                        acc[m] += wv[i] * xv.x + wv[i + 1] * xv.y + wv[i + 2] * xv.z + wv[i + 3] * xv.w;
                    }
                } else {
                    acc[m] += wv[0] * xr[0];
                }
            }
        }
        // Tail of a float row whose K is not a multiple of VEC (never for block types).
        if constexpr (!W::QUANT) {
            for (int k = kv + lane; k < kc; k += 32) {
                float wv = W::load1(wrow, k0 + k);
#pragma unroll
                for (int m = 0; m < MR; m++)
                    acc[m] += wv * xs[m * KC + k];
            }
        }
    }

    if (!active)
        return;
#pragma unroll
    for (int m = 0; m < MR; m++) {
        float s = to_warp_sum(acc[m]);
        if (lane == 0 && m < a.M)
            store_out(a, m, n, s);
    }
}

template <class W>
static void launch_gemv(const MatmulArgs &a, cudaStream_t stream) {
    dim3 grid((unsigned)to_ceil_div(a.N, GEMV_WARPS)), block(32 * GEMV_WARPS);
    if (a.M <= 1)
        to_launch(gemv_kernel<1, W>, grid, block, 0, stream, a);
    else if (a.M <= 2)
        to_launch(gemv_kernel<2, W>, grid, block, 0, stream, a);
    else if (a.M <= 4)
        to_launch(gemv_kernel<4, W>, grid, block, 0, stream, a);
    else
        to_launch(gemv_kernel<8, W>, grid, block, 0, stream, a);
}

template <typename T>
static void launch_gemv_float(const MatmulArgs &a, bool aligned16, cudaStream_t stream) {
    if (aligned16)
        launch_gemv<FloatVec<T>>(a, stream);
    else
        launch_gemv<FloatScalar<T>>(a, stream);
}

// ---------------------------------------------------------------------------------------------
// Streaming GEMV (decode's hot path): float w (f32/f16/bf16) with 16-byte aligned rows and K a
// multiple of the 16-byte vector, x f32 with unit stride and 16-byte aligned rows (the model's
// activations). Differences from gemv_kernel above, all aimed at having as many weight bytes in
// flight as early as possible, which is what a small GEMV's time is made of:
//  - before waiting for the previous kernel, each warp issues its first group of loads (weights:
//    nothing a kernel of the step writes), and the block lets the next kernel launch at once
//    (to_pdl_trigger first), so the DRAM latency of the first loads overlaps the previous
//    kernel's tail, and the next kernel's this one's (H200, decode step graph replay, same build:
//    0.6B 1,035-1,043 -> 943-945 us, 4B 3,738-3,751 -> 3,620 us). INFERENCE_PIO_GEMV_EARLY=0
//    turns it off. It is a run-time flag on purpose: built with the early loads unconditional, the
//    kernel measured no faster on the 0.6B shapes than without them (the compiler is free to sink
//    a read-only load past the wait, and apparently did). It no longer asks the L2 to prefetch
//    its whole rows as well: with the early launches, the blocks that became resident during the
//    decode attention flooded the DRAM queues with their rows, and the attention's own loads
//    waited behind them (H200, step graph replay, same build: 4B 3,255-3,262 -> 3,125-3,126 us,
//    0.6B 826 -> 820);
//  - a warp owns GV_ROWS consecutive rows and each lane issues GV_GROUP 16-byte loads of each
//    before using any (8 in flight per lane), and every x value it reads serves GV_ROWS rows;
//  - the weights are loaded evict-first (ld.global.cs): read once per step, they should not push
//    out of the L2 what is read again soon, the activations, the attention's lengths and tables,
//    the KV cache (H200, step graph replay, two builds on one machine: 0.6B 820 -> 802 us, 4B
//    3,133 -> 3,030);
//  - x is read straight from global memory (L1/L2 hits after the first warp), so there is no
//    staging pass and no barrier;
//  - what the epilogue adds (the bias, and for to_matmul_add out's old values) is loaded right
//    after the wait by the lane that stores (RowsAddends, matmul.cuh), not after the products;
//  - KSPLIT warps share a row pair (interleaved 16-byte columns) when N alone gives too few
//    blocks to cover the GPU, their partial sums meeting in shared memory.
// (Measured on the H200 over Qwen3-0.6B/4B layer shapes streamed from DRAM, benchmarks/
// gemv_lab.cu: 1, 2, 4, 8 rows per warp with 1-8 loads per row in flight; 2 x 4 was fastest or
// within 5 % of it everywhere, 4-29 % faster per layer than one row per warp with double-buffered
// groups of 4.)
// The epilogue is store_out, or with a.swiglu (rows interleaved gate, up, gate, up, ...) the
// SwiGLU activation of each row pair: out[m, n / 2] = silu(gate) * up.
// ---------------------------------------------------------------------------------------------

#define GV_ROWS 2  // weight rows per warp
#define GV_GROUP 4 // 16-byte loads per row per lane in flight

template <typename T> __device__ __forceinline__ void unpack16(uint4 raw, float v[16 / sizeof(T)]) {
    const T *t = (const T *)&raw;
#pragma unroll
    for (int i = 0; i < (int)(16 / sizeof(T)); i++)
        v[i] = to_f32(t[i]);
}

// NORM: 0 no norm; 1 the norm weight has w's dtype (read like the weights); 2 any float dtype.
// (For one row, 4 blocks per SM in the launch bounds hold the kernel to 64 registers: left alone,
// ptxas gave the norm variants 72-80, three blocks (24 warps) per SM, and fewer bytes in flight.
// Capped, they spill ~160 bytes (stored once, ~24 read back in the epilogue) and measured faster:
// decode step graph replay, one build with both forms, twice, H200: 0.6B 791-792 -> 780-781 us,
// 4B 2,958 -> 2,920. With more rows the cap spills 0.3-2.3 KB: not applied.)
template <int MR, typename T, int KSPLIT, int NORM>
__global__ void __launch_bounds__(32 * GEMV_WARPS, MR == 1 ? 4 : 1) gemv_stream_kernel(MatmulArgs a) {
    constexpr int VEC = 16 / sizeof(T);            // weights per 16-byte load
    constexpr int R = GV_ROWS, G = GV_GROUP;
    constexpr int UNITS = GEMV_WARPS / KSPLIT;     // row groups per block
    constexpr int stride = 32 * KSPLIT;            // the warps of a row group interleave by 32 vectors
    __shared__ float partial[GEMV_WARPS][MR][R + 1]; // KSPLIT > 1: each warp's dots and sum of squares
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, part = warp % KSPLIT;
    const int64_t n0 = ((int64_t)blockIdx.x * UNITS + warp / KSPLIT) * R;
    const int nvec = (int)(a.K / VEC);             // 16-byte vectors per row (< 2^28: the dispatch checks)
    const uint4 *rows[R];
    bool ok[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        ok[r] = n0 + r < a.N;
        rows[r] = (const uint4 *)(a.w + (ok[r] ? n0 + r : 0) * a.w_row_bytes);
    }
    if (a.early_loads)
        to_pdl_trigger();
    const int j0 = part * 32 + lane;
    uint4 wv[G][R];
    auto load_group = [&](int j) {
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int r = 0; r < R; r++)
                wv[g][r] = ok[r] && j + g * stride < nvec ? __ldcs(rows[r] + j + g * stride) : make_uint4(0, 0, 0, 0);
    };
    if (a.early_loads)
        load_group(j0);
    to_pdl_wait();
    if (!a.early_loads)
        to_pdl_trigger();
    RowsAddends<MR, R> add;
    if (part == 0 && lane == 0)
        add.load(a, n0, ok);

    // NORM (to_rms_norm_matmul): out = rinv * sum_k w[k] (x[k] g[k]) with rinv from the sum of
    // squares of x, which the warps of a row group gather from the x values they read anyway: the
    // norm costs no pass of its own and no barrier.
    // 32-bit indices and, per vector, all of its x values loaded before one fma chain per row:
    // 1.3x faster than 64-bit offsets with x consumed four values at a time (gemv_lab.cu, 4B
    // o_proj and down).
    float acc[MR][R] = {}, ss[MR] = {};
    for (int j = j0; j < nvec; j += G * stride) {
        if (j != j0 || !a.early_loads)
            load_group(j);
#pragma unroll
        for (int g = 0; g < G; g++) {
            const int jj = j + g * stride;
            if (jj >= nvec)
                break;
            float gv[VEC];
            if constexpr (NORM == 1)
                unpack16<T>(__ldg((const uint4 *)a.norm_w + jj), gv);
            else if constexpr (NORM == 2)
                load_vec_f32<VEC>(a.norm_w, a.norm_dt, (int64_t)jj * VEC, gv);
            float wf[R][VEC];
#pragma unroll
            for (int r = 0; r < R; r++)
                unpack16<T>(wv[g][r], wf[r]);
#pragma unroll
            for (int m = 0; m < MR; m++) {
                if (m >= a.M)
                    break;
                const float4 *xp = (const float4 *)((const float *)a.x + m * a.xs0) + jj * (VEC / 4);
                float xv[VEC];
#pragma unroll
                for (int q = 0; q < VEC / 4; q++) {
                    const float4 t = xp[q];
                    xv[4 * q] = t.x, xv[4 * q + 1] = t.y, xv[4 * q + 2] = t.z, xv[4 * q + 3] = t.w;
                }
                if constexpr (NORM != 0) {
#pragma unroll
                    for (int e = 0; e < VEC; e++) {
                        ss[m] += xv[e] * xv[e];
                        xv[e] *= gv[e];
                    }
                }
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int e = 0; e < VEC; e++)
                        acc[m][r] += wf[r][e] * xv[e];
            }
        }
    }

    gemv_rows_finish<MR, R, NORM != 0>(a, acc, ss, partial, KSPLIT, warp, lane, n0, ok, add);
}

// gemv_stream_kernel for a's norm (none, or its weight in w's dtype or another)
template <int MR, typename T, int KSPLIT>
static void (*stream_kernel(const MatmulArgs &a))(MatmulArgs) {
    if (!a.norm_w)
        return gemv_stream_kernel<MR, T, KSPLIT, 0>;
    return a.norm_dt == a.w_dt ? gemv_stream_kernel<MR, T, KSPLIT, 1> : gemv_stream_kernel<MR, T, KSPLIT, 2>;
}

template <int MR, typename T, int KSPLIT>
static void launch_stream(const MatmulArgs &args, cudaStream_t stream) {
    MatmulArgs a = args;
    a.early_loads = gemv_early_loads();
    const int64_t groups = to_ceil_div(a.N, GV_ROWS);
    dim3 grid((unsigned)to_ceil_div(groups * KSPLIT, GEMV_WARPS)), block(32 * GEMV_WARPS);
    to_launch(stream_kernel<MR, T, KSPLIT>(a), grid, block, 0, stream, a);
}

// Blocks of gemv_stream_kernel<MR, T, KSPLIT, a's norm> resident per multiprocessor (asked of the
// runtime once per kernel).
template <int MR, typename T, int KSPLIT>
static int stream_resident(const MatmulArgs &a) {
    static std::atomic<int> known[3];
    const int norm = !a.norm_w ? 0 : a.norm_dt == a.w_dt ? 1 : 2;
    int n = known[norm].load();
    if (!n) {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, stream_kernel<MR, T, KSPLIT>(a), 32 * GEMV_WARPS, 0)
            != cudaSuccess || n < 1)
            n = 1;
        cudaGetLastError(); // a refused query is an answer, not an error for the next check
        known[norm].store(n);
    }
    return n;
}

template <int MR, typename T>
static int stream_resident(const MatmulArgs &a, int ksplit) {
    switch (ksplit) {
    case 1: return stream_resident<MR, T, 1>(a);
    case 2: return stream_resident<MR, T, 2>(a);
    case 4: return stream_resident<MR, T, 4>(a);
    default: return stream_resident<MR, T, 8>(a);
    }
}

template <int MR, typename T>
static void launch_gemv_stream_rows(const MatmulArgs &a, int device_index, cudaStream_t stream) {
    // Split row groups over more warps while N alone gives fewer than ~2 blocks per SM (4 for rows
    // longer than 4096: more bytes in flight) and each lane keeps a whole group of loads. (H200,
    // decode shapes: 2 per SM was up to 1.6x faster than 4 for short rows, every block reading all
    // of x; for K = 9728, 4 per SM was 1.3x faster than 2.)
    constexpr int VEC = 16 / sizeof(T);
    const int sms = to_cuda_sm_count(device_index);
    const int64_t want = (a.K > 4096 ? 4 : 2) * (int64_t)sms;
    const int64_t groups = to_ceil_div(a.N, GV_ROWS);
    int ksplit = 1;
    while (ksplit < GEMV_WARPS && to_ceil_div(groups * ksplit, GEMV_WARPS) < want &&
           a.K / VEC >= 32 * GV_GROUP * ksplit)
        ksplit *= 2;
    // A product of more than one wave of blocks ends with a partial wave, which streams from few
    // SMs: where a finer split fills that last wave clearly better (and each lane still has a
    // whole group of loads per row), take it. (H200, 4B decode: gate_up 1 -> 2, down 4 -> 8; the
    // step 3,510-3,522 -> 3,326-3,329 us. INFERENCE_PIO_GEMV_BALANCE=0 turns it off.)
    static const bool balance = to_env_switch("INFERENCE_PIO_GEMV_BALANCE");
    auto last_wave = [&](int ks) { // how full the last wave of blocks is, 0 .. 1
        const double waves = (double)to_ceil_div(groups * ks, GEMV_WARPS) / (sms * stream_resident<MR, T>(a, ks));
        return waves >= 1.0 ? waves / ceil(waves) : -1.0;
    };
    double full = last_wave(ksplit);
    for (int ks = 2 * ksplit; balance && full > 0.0 && ks <= GEMV_WARPS && a.K / VEC >= 32 * GV_GROUP * ks; ks *= 2) {
        const double f = last_wave(ks);
        if (f > 1.02 * full) {
            full = f;
            ksplit = ks;
        }
    }
    switch (ksplit) {
    case 1: launch_stream<MR, T, 1>(a, stream); break;
    case 2: launch_stream<MR, T, 2>(a, stream); break;
    case 4: launch_stream<MR, T, 4>(a, stream); break;
    default: launch_stream<MR, T, 8>(a, stream); break;
    }
}

template <typename T>
static void launch_gemv_stream(const MatmulArgs &a, int device_index, cudaStream_t stream) {
    if (a.M <= 1)
        launch_gemv_stream_rows<1, T>(a, device_index, stream);
    else if (a.M <= 2)
        launch_gemv_stream_rows<2, T>(a, device_index, stream);
    else if (a.M <= 4)
        launch_gemv_stream_rows<4, T>(a, device_index, stream);
    else
        launch_gemv_stream_rows<8, T>(a, device_index, stream);
}

// ---------------------------------------------------------------------------------------------
// FMA GEMM: 64x64 tile of out per block of 256 threads (16x16, 4x4 outputs each), K in steps of
// 16 through f32 shared memory. Handles every dtype combination (x through to_load, quantized w
// dequantized while loading its tile).
// ---------------------------------------------------------------------------------------------

#define FG_BM 64
#define FG_BN 64
#define FG_BK 16

__global__ void __launch_bounds__(256) gemm_fma_kernel(MatmulArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    // k-major tiles so that a thread's 4 rows (or columns) are one float4; +4 pads the stores
    __shared__ __align__(16) float xt[FG_BK][FG_BM + 4];
    __shared__ __align__(16) float wt[FG_BK][FG_BN + 4];
    int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    int64_t m0 = (int64_t)blockIdx.y * FG_BM, n0 = (int64_t)blockIdx.x * FG_BN;

    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < a.K; k0 += FG_BK) {
        // x tile: 64 rows x 16 k, 4 elements per thread, consecutive threads along k
#pragma unroll
        for (int r = 0; r < 4; r++) {
            int i = tid + 256 * r, kk = i % FG_BK, mm = i / FG_BK;
            int64_t m = m0 + mm, k = k0 + kk;
            xt[kk][mm] = m < a.M && k < a.K ? to_load(a.x, a.x_dt, m * a.xs0 + k * a.xs1) : 0.0f;
        }
        // w tile: 64 rows x 16 k, 4 consecutive k per thread (one dequant4 for block types;
        // K is then a multiple of 32, so the 4 are all in range or all out)
        {
            int nn = tid / 4, kq = (tid % 4) * 4;
            int64_t n = n0 + nn, k = k0 + kq;
            float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (n < a.N) {
                const char *row = a.w + n * a.w_row_bytes;
                if (a.w_quant) {
                    if (k < a.K)
                        dequant4(a.w_dt, row, k, v);
                } else {
#pragma unroll
                    for (int j = 0; j < 4; j++)
                        if (k + j < a.K)
                            v[j] = to_load(row, a.w_dt, k + j);
                }
            }
#pragma unroll
            for (int j = 0; j < 4; j++)
                wt[kq + j][nn] = v[j];
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < FG_BK; kk++) {
            float4 xv = *(const float4 *)&xt[kk][ty * 4];
            float4 wv = *(const float4 *)&wt[kk][tx * 4];
            float xr[4] = {xv.x, xv.y, xv.z, xv.w}, wr[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    acc[i][j] += xr[i] * wr[j];
        }
        __syncthreads(); // the tiles are overwritten next step
    }

#pragma unroll
    for (int i = 0; i < 4; i++) {
        int64_t m = m0 + ty * 4 + i;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int64_t n = n0 + tx * 4 + j;
            if (m < a.M && n < a.N)
                store_out(a, m, n, acc[i][j]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMM (x and w both T = __half or both __nv_bfloat16): 64x64 tile per block of 128
// threads (4 warps, 32x32 each = 2x2 WMMA 16x16x16 fragments, f32 accumulators), K in steps of
// 32 through shared memory. Elements are copied as raw 16-bit values (no conversion needed);
// out of range ones are zero, so partial tiles in M, N and K need no special case.
// ---------------------------------------------------------------------------------------------

#define TC_BM 64
#define TC_BN 64
#define TC_BK 32
#define TC_LD (TC_BK + 8) // row pitch in elements: a multiple of 8 (WMMA), and off the banks' period

template <typename T>
__global__ void __launch_bounds__(128) gemm_tc_kernel(MatmulArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    using namespace nvcuda;
    __shared__ __align__(32) uint16_t xt[TC_BM * TC_LD]; // x[m0 + r, k0 + c] at r * TC_LD + c
    __shared__ __align__(32) uint16_t wt[TC_BN * TC_LD]; // w[n0 + r, k0 + c] at r * TC_LD + c
    __shared__ __align__(32) float ct[TC_BM * (TC_BN + 4)];
    int tid = threadIdx.x, warp = tid / 32;
    int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    int64_t m0 = (int64_t)blockIdx.y * TC_BM, n0 = (int64_t)blockIdx.x * TC_BN;
    const uint16_t *x = (const uint16_t *)a.x;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
            wmma::fill_fragment(acc[i][j], 0.0f);

    for (int64_t k0 = 0; k0 < a.K; k0 += TC_BK) {
        // 64 x 32 of each, 16 elements per thread, consecutive threads along k (coalesced when
        // the rows are contiguous)
#pragma unroll 4
        for (int r = 0; r < TC_BM * TC_BK / 128; r++) {
            int i = tid + 128 * r, c = i % TC_BK, row = i / TC_BK;
            int64_t k = k0 + c, m = m0 + row, n = n0 + row;
            xt[row * TC_LD + c] = m < a.M && k < a.K ? x[m * a.xs0 + k * a.xs1] : (uint16_t)0;
            wt[row * TC_LD + c] = n < a.N && k < a.K ? ((const uint16_t *)(a.w + n * a.w_row_bytes))[k]
                                                     : (uint16_t)0;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2]; // w^T: [k][n]
#pragma unroll
            for (int i = 0; i < 2; i++)
                wmma::load_matrix_sync(fa[i], (const T *)xt + (wm + 16 * i) * TC_LD + kk, TC_LD);
#pragma unroll
            for (int j = 0; j < 2; j++)
                wmma::load_matrix_sync(fb[j], (const T *)wt + (wn + 16 * j) * TC_LD + kk, TC_LD);
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int j = 0; j < 2; j++)
                    wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }

    // Through shared memory to apply bias, convert and clip to M x N.
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(ct + (wm + 16 * i) * (TC_BN + 4) + wn + 16 * j, acc[i][j], TC_BN + 4,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int i = tid; i < TC_BM * TC_BN; i += 128) {
        int r = i / TC_BN, c = i % TC_BN;
        int64_t m = m0 + r, n = n0 + c;
        if (m < a.M && n < a.N)
            store_out(a, m, n, ct[r * (TC_BN + 4) + c]);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry
// ---------------------------------------------------------------------------------------------

// A contiguous [rows, cols] intermediate of `dtype` on GPU `device_index`, from the caching
// allocator (freed right after the launches that use it: the stream orders any reuse after them).
static int gpu_temp(to_tensor *t, int device_index, int dtype, int64_t rows, int64_t cols) {
    memset(t, 0, sizeof *t);
    t->dtype = dtype;
    t->device = TO_CUDA;
    t->device_index = device_index;
    t->ndim = 2;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->strides[0] = cols;
    t->strides[1] = 1;
    t->nbytes = to_dtype_bytes(dtype, rows * cols);
    return to_cuda_alloc(device_index, t->nbytes, &t->data);
}

// x normalised into an intermediate by the norm kernel, then the product: the general case of
// to_rms_norm_matmul (many rows, or x or w not in the streaming GEMV's form). For many rows and
// 16-bit weights the intermediate is in the weights' dtype, as the tensor cores take it.
static int norm_then_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias,
                            const to_tensor *norm_weight, double eps, int epilogue) {
    bool tc = x->shape[0] > GEMV_MAX_ROWS && (w->dtype == TO_BF16 || w->dtype == TO_F16);
    to_tensor normed;
    TO_TRY(gpu_temp(&normed, out->device_index, tc ? w->dtype : TO_F32, x->shape[0], x->shape[1]));
    int status = to_cuda_rms_norm(&normed, NULL, x, norm_weight, eps);
    if (status == TO_OK)
        status = to_cuda_matmul(out, &normed, w, bias, NULL, 0.0, epilogue);
    to_cuda_free(out->device_index, normed.data);
    return status;
}

// The SwiGLU form where the GEMV's epilogue does not apply: the product of every row into an f32
// intermediate, then to_silu_mul of its even (gate) and odd (up) columns.
static int swiglu_through_temp(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias,
                               const to_tensor *norm_weight, double eps) {
    to_tensor prod;
    TO_TRY(gpu_temp(&prod, out->device_index, TO_F32, x->shape[0], w->shape[0]));
    int status = to_cuda_matmul(&prod, x, w, bias, norm_weight, eps, TO_MM_STORE);
    if (status == TO_OK) {
        to_tensor gate = prod, up = prod;
        gate.shape[1] = up.shape[1] = w->shape[0] / 2;
        gate.strides[1] = up.strides[1] = 2;
        up.data = (char *)prod.data + sizeof(float);
        status = to_cuda_elementwise(out, &gate, &up, TO_EW_SILU_MUL, 1.0f);
    }
    to_cuda_free(out->device_index, prod.data);
    return status;
}

// Many rows with 16-bit weights: the tensor-core GEMMs take x in the weights' dtype (f32
// activations are rounded to it once, as the frameworks' bf16 paths do), and they overwrite out,
// so a product added into out (to_matmul_add) is formed in an f32 intermediate and added after
// (the same two roundings as the CPU's composition). Returns -1 when neither applies.
static int tensor_core_forms(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias,
                             bool accumulate) {
    if (x->shape[0] <= GEMV_MAX_ROWS || (w->dtype != TO_BF16 && w->dtype != TO_F16))
        return -1;
    to_tensor t;
    int status;
    if (x->dtype != w->dtype) {
        TO_TRY(gpu_temp(&t, out->device_index, w->dtype, x->shape[0], x->shape[1]));
        status = to_cuda_copy(&t, x);
        if (status == TO_OK)
            status = to_cuda_matmul(out, &t, w, bias, NULL, 0.0, accumulate ? TO_MM_ADD : TO_MM_STORE);
    } else if (accumulate) {
        TO_TRY(gpu_temp(&t, out->device_index, TO_F32, x->shape[0], w->shape[0]));
        status = to_cuda_matmul(&t, x, w, bias, NULL, 0.0, TO_MM_STORE);
        if (status == TO_OK)
            status = to_cuda_elementwise(out, out, &t, TO_EW_ADD, 1.0f);
    } else {
        return -1;
    }
    to_cuda_free(out->device_index, t.data);
    return status;
}

extern "C" int to_cuda_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w,
                              const to_tensor *bias, const to_tensor *norm_weight, double eps,
                              int epilogue) {
    MatmulArgs a = {};
    a.M = x->shape[0];
    a.K = x->shape[1];
    a.N = w->shape[0];
    if (a.M == 0 || a.N == 0)
        return TO_OK; // nothing to write
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;

    a.x = (const char *)x->data;
    a.xs0 = x->strides[0];
    a.xs1 = x->strides[1];
    a.x_dt = x->dtype;
    a.w = (const char *)w->data;
    a.w_row_bytes = to_dtype_bytes(w->dtype, w->strides[0]); // a whole number of blocks
    a.w_dt = w->dtype;
    a.w_quant = to_is_quantized(w->dtype);
    a.out = (char *)out->data;
    a.os0 = out->strides[0];
    a.out_dt = out->dtype;
    a.bias = bias ? (const char *)bias->data : nullptr;
    a.bs0 = bias ? bias->strides[0] : 0;
    a.bias_dt = bias ? bias->dtype : TO_F32;
    a.accumulate = epilogue == TO_MM_ADD;
    a.swiglu = epilogue == TO_MM_SWIGLU;
    const char *op = a.swiglu ? "to_rms_norm_swiglu" : norm_weight ? "to_rms_norm_matmul"
                   : a.accumulate ? "to_matmul_add" : "to_matmul";

    // the fused norm of the streaming kernels reads its weight with 16-byte loads
    if (norm_weight && norm_weight->strides[0] == 1 && (uintptr_t)norm_weight->data % 16 == 0) {
        a.norm_w = (const char *)norm_weight->data;
        a.norm_dt = norm_weight->dtype;
        a.norm_eps = eps;
    }
    const bool norm_fits = !norm_weight || a.norm_w;
    if (a.M <= GEMV_MAX_ROWS && norm_fits) {
        // 16-byte loads need every row start 16-byte aligned (K itself may be anything: the
        // kernel finishes each chunk with scalar loads)
        bool aligned16 = (uintptr_t)a.w % 16 == 0 && (a.N == 1 || a.w_row_bytes % 16 == 0);
        bool x_streams = a.x_dt == TO_F32 && a.xs1 == 1 && (uintptr_t)a.x % 16 == 0 && (a.M == 1 || a.xs0 % 4 == 0);
        int vec = w->dtype == TO_F32 ? 4 : 8;
        bool streams = (w->dtype == TO_F32 || w->dtype == TO_F16 || w->dtype == TO_BF16) && aligned16 &&
                       x_streams && a.K % vec == 0 && a.K / vec <= UINT32_MAX / 16;
        if (streams) {
            switch (w->dtype) {
            case TO_F32: launch_gemv_stream<float>(a, out->device_index, stream); break;
            case TO_F16: launch_gemv_stream<__half>(a, out->device_index, stream); break;
            default: launch_gemv_stream<__nv_bfloat16>(a, out->device_index, stream); break;
            }
            return to_cuda_check_launch(op);
        }
        // block-quantized w: the streaming GEMV of gemv_quant.cu, fused forms included
        if (a.w_quant && to_cuda_gemv_quant(a, out->device_index, stream))
            return to_cuda_check_launch(op);
    }
    // batched decode with 16-bit w: tensor cores fed from the weight stream, fused forms included
    if (a.M > GEMV_MAX_ROWS && norm_fits && to_cuda_gemm_skinny(a, out->device_index, stream))
        return to_cuda_check_launch(op);
    if (a.swiglu)
        return swiglu_through_temp(out, x, w, bias, norm_weight, eps);
    if (norm_weight)
        return norm_then_matmul(out, x, w, bias, norm_weight, eps, epilogue);
    int status = tensor_core_forms(out, x, w, bias, a.accumulate);
    if (status >= 0)
        return status;

    if (a.M <= GEMV_MAX_ROWS) {
        bool aligned16 = (uintptr_t)a.w % 16 == 0 && (a.N == 1 || a.w_row_bytes % 16 == 0);
        switch (w->dtype) {
        case TO_F32: launch_gemv_float<float>(a, aligned16, stream); break;
        case TO_F16: launch_gemv_float<__half>(a, aligned16, stream); break;
        case TO_BF16: launch_gemv_float<__nv_bfloat16>(a, aligned16, stream); break;
        case TO_Q8_0: launch_gemv<Quant<Q8_0>>(a, stream); break;
        case TO_Q4_0: launch_gemv<Quant<Q4_0>>(a, stream); break;
        case TO_Q4_1: launch_gemv<Quant<Q4_1>>(a, stream); break;
        case TO_Q4_K: launch_gemv<Quant<Q4_K>>(a, stream); break;
        case TO_Q6_K: launch_gemv<Quant<Q6_K>>(a, stream); break;
        default: return to_fail(TO_ERR_UNSUPPORTED, "%s: w dtype %s has no CUDA kernel", op, to_dtype_name(w->dtype));
        }
        return to_cuda_check_launch(op);
    }

    if (x->dtype == w->dtype && (x->dtype == TO_BF16 || x->dtype == TO_F16) && !a.accumulate &&
        to_cuda_gemm_sm90(a, out->device_index, stream))
        return to_cuda_check_launch(op);
    // N along grid x (up to 2^31 - 1 tiles), M along grid y (65535 tiles of 64: M < 4.19M rows)
    dim3 grid_tc((unsigned)to_ceil_div(a.N, TC_BN), (unsigned)to_ceil_div(a.M, TC_BM));
    if (x->dtype == TO_BF16 && w->dtype == TO_BF16)
        to_launch(gemm_tc_kernel<__nv_bfloat16>, grid_tc, 128, 0, stream, a);
    else if (x->dtype == TO_F16 && w->dtype == TO_F16)
        to_launch(gemm_tc_kernel<__half>, grid_tc, 128, 0, stream, a);
    else {
        dim3 grid((unsigned)to_ceil_div(a.N, FG_BN), (unsigned)to_ceil_div(a.M, FG_BM));
        to_launch(gemm_fma_kernel, grid, 256, 0, stream, a);
    }
    return to_cuda_check_launch(op);
}
