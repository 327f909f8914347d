// gemm_skinny.cu - the product of 9..64 rows of x with bf16/f16 weights (batched decode):
// out[M, N] = x[M, K] . w[N, K]^T with every epilogue of MatmulArgs (bias, accumulate, SwiGLU,
// and for bf16 weights the RMS norm of to_rms_norm_matmul).
//
// Why a kernel of its own: at 32 rows a product still does only 32 multiply-adds per weight it
// loads, so like the GEMV its time is the weight stream, and it must read w once, at full
// bandwidth, from many SMs. The tiled GEMMs (64- and 128-row tiles) leave most of each tile empty
// and give a decode-sized N too few blocks to keep enough bytes in flight.
//
// Tensor cores, fed straight from 16-byte weight loads: the weights are the A operand of
// mma.sync m16n8k16 (16 weight rows x 16 k) and x is B (16 k x 8 rows of x). That instruction
// gives lane (g = lane / 4, t = lane % 4) A's columns 2t, 2t+1, 2t+8, 2t+9 of rows g and g+8, and
// B's rows 2t, 2t+1, 2t+8, 2t+9 of column g. A dot product does not care which physical column a
// k lands in as long as A and B agree, so lane t takes the eight consecutive k's t*8 .. t*8+7 of
// each 32-wide chunk: the first four are step 0's, the next four step 1's. Then its A operand of
// two mma steps is one 16-byte load per weight row, and its B operand one 16-byte shared-memory
// load per 8 rows of x.
//
// Work: a block owns 64 weight rows (4 groups of 16) and a range of K, which it takes in slabs of
// 256 k; its 8 warps are the 4 row groups x the 2 halves of each slab. Each warp issues its first
// slab's weight loads before waiting for the previous kernel (weights never depend on it) and the
// next slab's before its mma's on this one, while the block copies x's slab after next into a
// shared-memory buffer with cp.async (two buffers; with the norm, the norm weight's slab too and
// each row's sum of squares gathered from the staged values). Weights are loaded evict-first
// (ld.global.cs: read once per step, they should not push the activations and the KV cache out
// of the L2) and, as in the float GEMV (matmul.cu), not prefetched into the L2 (H200, bench_gpu.py
// 0.6B batch 32, one build with both as switches: 12,059-12,071 tok/s before, 12,549 after).
// When N alone gives too few blocks to fill the GPU, K is split further over a thread-block
// cluster (sm_90, up to 8 blocks, no more than stay resident at once), whose partial sums meet
// through distributed shared memory: each block of the cluster finishes a slice of the 64 rows,
// summing the partials in block order (deterministic: the same inputs give the same bits), and
// stores them through the epilogue.
// Shapes it does not win are left to the tiled GEMMs (launch_skinny says which and why), measured
// with benchmarks/bench_gpu_kernels.py; benchmarks/skinny_lab.cu measures the weight stream alone.
//
// Rounding: x (x g with the norm) is rounded once to T, as the other tensor-core paths do;
// products and sums are f32; with the norm, rinv = 1 / sqrt(mean(x^2) + eps) scales the f32 sums.
#include "cuda/common.cuh"
#include "cuda/matmul.cuh"

#include <cooperative_groups.h>
#include <mutex>
#include <stdlib.h>

namespace cg = cooperative_groups;

constexpr int SK_ROWS = 64;                         // weight rows per block
constexpr int SK_GROUPS = SK_ROWS / 16;             // row groups (the mma's 16 A rows)
constexpr int SK_PARTS = 2;                         // warps sharing a row group, each half the k range
constexpr int SK_THREADS = 32 * SK_GROUPS * SK_PARTS;
constexpr int SK_CHUNK = 32;                        // k per 16-byte load of each of 4 lanes
constexpr int SK_WINDOW = 4;                        // chunks of loads each warp keeps in flight
constexpr int SK_SLAB = SK_PARTS * SK_WINDOW * SK_CHUNK; // k's of x staged at a time (a window per warp)
constexpr int SK_CLUSTER_MAX = 8;                   // the portable cluster size
constexpr int SK_PAD = 4;                           // floats after each row of partials (spreads banks)
constexpr int SK_MAX_ROWS = 64;                     // rows of x (8 per mma column tile, 8 tiles)

// Two f32 as one register of two T (the lower k in the low half), rounded to nearest.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&v;
}

// d += A . B for one m16n8k16 step (A: 4 registers, B: 2, d: f32).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap(); // the host launches these kernels only from sm_80 code
#endif
}

// Shared memory: two slab buffers, each x's rows [MT * 8][stride bytes] over SK_SLAB k's as x
// holds them (f32, or 16-bit of w's dtype), copied in without registers (cp.async) and converted
// as the mma's read them, and the norm weight's raw values over the same k's; the slab after next
// is copied into a buffer once every warp is done with it. After the products the same bytes hold
// the partial sums f32 [SK_PARTS][MT * 8][SK_ROWS + SK_PAD]. Then the sums of squares of x's rows.
struct SkinnyLayout {
    int stride;     // bytes per staged row: the 8 lanes of a quarter warp, reading 16 bytes each from
                    // rows g and g + 1, then hit different banks (16 more than a multiple of 128 for
                    // f32 rows, which lanes read 32 bytes apart, 64 more for 16-bit rows, 16 apart)
    int slab_bytes; // one buffer: the rows, then SK_SLAB norm weights (up to 4 bytes each)
    size_t squares_at, bytes;
    __host__ __device__ SkinnyLayout(int rows, bool x_f32) {
        stride = SK_SLAB * (x_f32 ? 4 : 2) + (x_f32 ? 16 : 64);
        slab_bytes = rows * stride + SK_SLAB * 4;
        const size_t partials = sizeof(float) * SK_PARTS * rows * (SK_ROWS + SK_PAD);
        squares_at = 2 * (size_t)slab_bytes > partials ? 2 * (size_t)slab_bytes : partials;
        bytes = squares_at + sizeof(float) * rows;
    }
};

// B of the two mma steps of one chunk for this lane: x[row][k .. k + 7] (k = t * 8 in the chunk)
// at p, times the norm weights (raw values of dtype gdt) at g when NORM, rounded to T in pairs.
template <typename T, bool XF32, bool NORM>
__device__ __forceinline__ uint4 load_b(const char *p, const char *g, int gdt) {
    float v[8];
    if constexpr (XF32) {
        const float4 lo = *(const float4 *)p, hi = *(const float4 *)(p + 16);
        v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    } else {
        const uint4 raw = *(const uint4 *)p;
        if constexpr (!NORM)
            return raw; // already T
        const T *e = (const T *)&raw;
#pragma unroll
        for (int i = 0; i < 8; i++)
            v[i] = to_f32(e[i]);
    }
    if constexpr (NORM) {
        float gv[8];
        if (gdt == TO_F32) {
            const float4 g0 = *(const float4 *)g, g1 = *(const float4 *)(g + 16);
            gv[0] = g0.x, gv[1] = g0.y, gv[2] = g0.z, gv[3] = g0.w, gv[4] = g1.x, gv[5] = g1.y, gv[6] = g1.z, gv[7] = g1.w;
        } else {
            const uint4 raw = *(const uint4 *)g;
#pragma unroll
            for (int i = 0; i < 8; i++)
                gv[i] = gdt == TO_BF16 ? to_f32(((const __nv_bfloat16 *)&raw)[i]) : to_f32(((const __half *)&raw)[i]);
        }
#pragma unroll
        for (int i = 0; i < 8; i++)
            v[i] *= gv[i];
    }
    return make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]), pack2<T>(v[6], v[7]));
}

// kb: the k range of one block (a multiple of SK_PARTS * SK_CHUNK); ks: blocks per cluster, which
// split K (grid.x = row tiles x ks, a cluster's blocks consecutive). XF32: x is f32 (else w's T).
template <typename T, int MT, bool XF32, bool NORM>
__global__ void __launch_bounds__(SK_THREADS) gemm_skinny_kernel(const __grid_constant__ MatmulArgs a, int kb, int ks) {
    constexpr int MR = MT * 8, PR = SK_ROWS + SK_PAD, XB = XF32 ? 4 : 2;
    extern __shared__ __align__(16) char smem[];
    const SkinnyLayout L(MR, XF32);
    float *partial = (float *)smem, *squares = (float *)(smem + L.squares_at);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int group = warp % SK_GROUPS, part = warp / SK_GROUPS;
    const int rank = (int)(blockIdx.x % ks);
    const int64_t n0 = (int64_t)(blockIdx.x / ks) * SK_ROWS, k0 = (int64_t)rank * kb;
    const int slabs = (kb + SK_SLAB - 1) / SK_SLAB;
    const int gbytes = NORM ? (a.norm_dt == TO_F32 ? 4 : 2) : 0;
    // slab s: k's [k0 + s * SK_SLAB, + len), this warp's half [part * len / 2, + len / 2) of them
    auto slab_len = [&](int s) { return kb - s * SK_SLAB < SK_SLAB ? kb - s * SK_SLAB : SK_SLAB; };

    // rows g and g + 8 of the warp's group (a row past N reads row N - 1 and is not stored)
    const char *wrow[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int64_t n = n0 + group * 16 + g + 8 * r;
        n = n < a.N ? n : a.N - 1;
        wrow[r] = a.w + n * a.w_row_bytes + (k0 + t * 8) * (int64_t)sizeof(T);
    }
    auto load_weights = [&](int s, uint4 (&v)[SK_WINDOW][2]) { // the warp's chunks of slab s
        const int half = slab_len(s) / 2;
#pragma unroll
        for (int u = 0; u < SK_WINDOW; u++)
            if (u * SK_CHUNK < half)
#pragma unroll
                for (int r = 0; r < 2; r++)
                    v[u][r] = __ldcs((const uint4 *)(wrow[r] + (int64_t)(s * SK_SLAB + part * half + u * SK_CHUNK) * sizeof(T)));
    };
    auto stage = [&](int s) { // slab s of x (rows past M: zeros) and of the norm weight, into buffer s % 2
        char *buf = smem + (s % 2) * L.slab_bytes;
        const int len = slab_len(s), pieces = len * XB / 16;
        for (int i = threadIdx.x; i < MR * pieces; i += SK_THREADS) {
            const int m = i / pieces, q = i % pieces;
            char *dst = buf + m * L.stride + q * 16;
            if (m < a.M)
                cp16(dst, a.x + (m * a.xs0 + k0 + s * SK_SLAB) * XB + q * 16);
            else
                *(uint4 *)dst = make_uint4(0, 0, 0, 0);
        }
        if constexpr (NORM)
            for (int i = threadIdx.x; i < len * gbytes / 16; i += SK_THREADS)
                cp16(buf + MR * L.stride + i * 16, a.norm_w + (k0 + s * SK_SLAB) * gbytes + i * 16);
        cp_commit();
    };

    uint4 win[SK_WINDOW][2];
    if (a.early_loads) // (a run-time flag, as in gemv_stream_kernel: matmul.cu says why)
        load_weights(0, win);
    to_pdl_trigger(); // the next kernel may start loading its weights while this one works
    to_pdl_wait();
    if (!a.early_loads)
        load_weights(0, win);
    stage(0);
    if (slabs > 1)
        stage(1);
    else
        cp_commit(); // (an empty group: one group per slab keeps the waits below uniform)

    constexpr int TPR = SK_THREADS / MR; // NORM: lanes summing squares of each row
    float acc[MT][4] = {}, sq = 0.0f;
    for (int s = 0; s < slabs; s++) {
        uint4 next[SK_WINDOW][2];
        if (s + 1 < slabs)
            load_weights(s + 1, next);
        cp_wait<1>(); // this thread's copies of slab s have landed
        __syncthreads(); // everyone's have
        const char *buf = smem + (s % 2) * L.slab_bytes;
        const int len = slab_len(s), half = len / 2;
        if constexpr (NORM) {
            const char *row = buf + (threadIdx.x / TPR) * L.stride;
            for (int k = threadIdx.x % TPR; k < len; k += TPR) {
                const float v = XF32 ? ((const float *)row)[k] : to_f32(((const T *)row)[k]);
                sq += v * v;
            }
        }
        const char *xb = buf + g * L.stride + (part * half + t * 8) * XB;
        const char *gb = buf + MR * L.stride + (part * half + t * 8) * gbytes;
#pragma unroll
        for (int u = 0; u < SK_WINDOW; u++) {
            if (u * SK_CHUNK >= half)
                break;
            const uint4 w0 = win[u][0], w8 = win[u][1]; // rows g and g + 8, k's t*8 .. t*8+7
#pragma unroll
            for (int j = 0; j < MT; j++) {
                const uint4 b = load_b<T, XF32, NORM>(xb + (j * 8 * L.stride + u * SK_CHUNK * XB),
                                                      gb + u * SK_CHUNK * gbytes, a.norm_dt);
                mma_16816<T>(acc[j], w0.x, w8.x, w0.y, w8.y, b.x, b.y);
                mma_16816<T>(acc[j], w0.z, w8.z, w0.w, w8.w, b.z, b.w);
            }
        }
#pragma unroll
        for (int u = 0; u < SK_WINDOW; u++)
            win[u][0] = next[u][0], win[u][1] = next[u][1];
        __syncthreads(); // buffer s % 2 is free
        if (s + 2 < slabs)
            stage(s + 2);
        else
            cp_commit();
    }
    if constexpr (NORM) {
#pragma unroll
        for (int o = TPR / 2; o > 0; o /= 2)
            sq += __shfl_xor_sync(0xffffffffu, sq, o);
        if (threadIdx.x % TPR == 0)
            squares[threadIdx.x / TPR] = sq;
    }

    // acc[j]: rows (group * 16 + g, + 8) x columns 8j + 2t, 8j + 2t + 1 of x, over the slab buffers
    // (every warp is past its last read of them: the loop ends with a barrier)
    float *mine = partial + part * MR * PR;
    const int r0 = group * 16 + g;
#pragma unroll
    for (int j = 0; j < MT; j++) {
        const int m = 8 * j + 2 * t;
        mine[m * PR + r0] = acc[j][0];
        mine[(m + 1) * PR + r0] = acc[j][1];
        mine[m * PR + r0 + 8] = acc[j][2];
        mine[(m + 1) * PR + r0 + 8] = acc[j][3];
    }

    // Finish rows [rank * rows, + rows) of the tile: the partials of every block of the cluster
    // (both parts of each), all loads issued before the sums, which run in block order; then the
    // norm's scale and the epilogue.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cg::cluster_group cluster = cg::this_cluster();
    auto of_block = [&](float *p, int b) { return ks == 1 ? p : cluster.map_shared_rank(p, b); };
    if (ks > 1)
        cluster.sync();
    else
        __syncthreads();
#else
    auto of_block = [](float *p, int) { return p; }; // no clusters before sm_90: the host keeps ks = 1
    __syncthreads();
#endif
    const int rows = SK_ROWS / ks, step = a.swiglu ? 2 : 1, per_m = rows / step;
    for (int i = threadIdx.x; i < per_m * MR; i += SK_THREADS) {
        const int m = i / per_m, r = rank * rows + (i % per_m) * step;
        const int64_t n = n0 + r;
        if (m >= a.M || n >= a.N)
            continue;
        float v[SK_CLUSTER_MAX][SK_PARTS][2], sq[SK_CLUSTER_MAX];
#pragma unroll
        for (int b = 0; b < SK_CLUSTER_MAX; b++) {
            if (b >= ks)
                break;
            const float *p = of_block(partial, b);
#pragma unroll
            for (int h = 0; h < SK_PARTS; h++) {
                v[b][h][0] = p[(h * MR + m) * PR + r];
                v[b][h][1] = step == 2 ? p[(h * MR + m) * PR + r + 1] : 0.0f;
            }
            if constexpr (NORM)
                sq[b] = of_block(squares, b)[m];
        }
        float dot[2] = {0.0f, 0.0f}, ss = 0.0f;
#pragma unroll
        for (int b = 0; b < SK_CLUSTER_MAX; b++) {
            if (b >= ks)
                break;
#pragma unroll
            for (int h = 0; h < SK_PARTS; h++)
                dot[0] += v[b][h][0], dot[1] += v[b][h][1];
            if constexpr (NORM)
                ss += sq[b];
        }
        const float rinv = NORM ? (float)(1.0 / sqrt((double)ss / (double)a.K + a.norm_eps)) : 1.0f;
        if (a.swiglu) // rows n, n + 1 are gate and up of output column n / 2
            store_swiglu(a, m, n, dot[0] * rinv, dot[1] * rinv);
        else
            store_out(a, m, n, dot[0] * rinv);
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (ks > 1)
        cluster.sync(); // no block's shared memory goes away while another still reads it
#endif
}

// What a kernel instance can do on GPU dev, found at its first launch there: whether it has the
// code to run (mma: sm_80; clusters: sm_90 code on an sm_90 GPU), its raised shared-memory
// limit, and per cluster size 2^i the blocks the GPU holds at once (-1: not asked yet).
struct SkinnyCaps {
    bool mma = false, clusters = false;
    size_t smem_max = 0;
    int64_t resident[4] = {-1, -1, -1, -1};
};

template <typename T, int MT, bool XF32, bool NORM> static SkinnyCaps &skinny_caps(int dev) {
    static SkinnyCaps caps[64];
    static bool known[64];
    SkinnyCaps &c = caps[dev];
    if (known[dev])
        return c;
    known[dev] = true;
    auto kernel = gemm_skinny_kernel<T, MT, XF32, NORM>;
    int optin = 0, major = 0;
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, kernel) == cudaSuccess &&
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin - (int)fa.sharedSizeBytes) == cudaSuccess) {
        c.mma = fa.binaryVersion >= 80;
        c.clusters = fa.binaryVersion >= 90 && major >= 9;
        c.smem_max = (size_t)(optin - fa.sharedSizeBytes);
    }
    cudaGetLastError(); // a refused query is an answer, not an error for the next check
    return c;
}

// Blocks of the kernel resident at once on GPU dev in clusters of 2^i blocks (i = 1 .. 3), each
// with `smem` bytes (the same for every launch of one instance); asked once, then kept.
template <typename T, int MT, bool XF32, bool NORM>
static int64_t skinny_resident(SkinnyCaps &c, int i, size_t smem) {
    if (c.resident[i] < 0) {
        const unsigned ks = 1u << i;
        c.resident[i] = (int64_t)to_max_active_clusters(gemm_skinny_kernel<T, MT, XF32, NORM>, ks, SK_THREADS, smem) * ks;
        cudaGetLastError(); // a refused query is an answer, not an error for the next check
    }
    return c.resident[i];
}

template <typename T, int MT, bool XF32, bool NORM>
static int launch_skinny(const MatmulArgs &a, int dev, cudaStream_t stream) {
    if (dev < 0 || dev >= 64)
        return 0;
    static std::mutex lock; // the caches below
    std::lock_guard<std::mutex> guard(lock);
    SkinnyCaps &c = skinny_caps<T, MT, XF32, NORM>(dev);
    if (!c.mma)
        return 0;
    // The K split: as many blocks per cluster as keep every block resident at once (a cluster's
    // blocks wait for each other, so a second wave of clusters costs a whole extra pass), up to
    // the first that gives every SM a block. A tiled GEMM takes an N that gives several blocks per
    // SM on its own. (H200, Qwen3 shapes at 32 rows: a split past one wave was up to 2x slower;
    // the 151936-row head took 2x the tiled GEMM's time here.)
    const SkinnyLayout L(MT * 8, XF32);
    const int64_t tiles = to_ceil_div(a.N, SK_ROWS), units = a.K / (SK_PARTS * SK_CHUNK);
    const int64_t sms = to_cuda_sm_count(dev);
    if (L.bytes > c.smem_max || tiles > 4 * sms)
        return 0;
    int ks = 1;
    for (int i = 1; i < 4 && tiles * ks < sms; i++) {
        const int split = 1 << i;
        if (!c.clusters || units % split != 0 || tiles * split > skinny_resident<T, MT, XF32, NORM>(c, i, L.bytes))
            break;
        ks = split;
    }
    // Past 4 slabs per block the slabs' barriers and the one-slab weight window leave too few bytes
    // in flight (Qwen3-4B's 2560- and 9728-long rows ran 1.1-1.5x slower than the tiled GEMM).
    if (a.K / ks > 4 * SK_SLAB)
        return 0;
    ToLaunchOptions opt;
    opt.cluster = (unsigned)ks;
    to_launch_with(opt, gemm_skinny_kernel<T, MT, XF32, NORM>, dim3((unsigned)(tiles * ks)), dim3(SK_THREADS),
                   L.bytes, stream, a, (int)(a.K / ks), ks);
    return 1;
}

template <typename T, bool XF32, bool NORM> static int launch_skinny_rows(const MatmulArgs &a, int dev, cudaStream_t stream) {
    if (a.M <= 16)
        return launch_skinny<T, 2, XF32, NORM>(a, dev, stream);
    if (a.M <= 32)
        return launch_skinny<T, 4, XF32, NORM>(a, dev, stream);
    return launch_skinny<T, 8, XF32, NORM>(a, dev, stream);
}

template <typename T, bool NORM> static int launch_skinny_x(const MatmulArgs &a, int dev, cudaStream_t stream) {
    return a.x_dt == TO_F32 ? launch_skinny_rows<T, true, NORM>(a, dev, stream)
                            : launch_skinny_rows<T, false, NORM>(a, dev, stream);
}

int to_cuda_gemm_skinny(const MatmulArgs &a, int dev, cudaStream_t stream) {
    const char *env = getenv("INFERENCE_PIO_GEMM_SKINNY"); // read each time: tests and benchmarks switch it
    const bool enabled = !(env && env[0] == '0');
    const int xbytes = a.x_dt == TO_F32 ? 4 : 2;
    const bool x_ok = (a.x_dt == TO_F32 || a.x_dt == a.w_dt) && a.xs1 == 1 && (uintptr_t)a.x % 16 == 0 &&
                      a.xs0 * xbytes % 16 == 0;
    const bool w_ok = (a.w_dt == TO_BF16 || a.w_dt == TO_F16) && (uintptr_t)a.w % 16 == 0 && a.w_row_bytes % 16 == 0;
    // the norm only against bf16 weights: x g is rounded to T before rinv scales the dots, and only
    // bf16 has the range for any x g (f16 tops out at 65504)
    const bool norm_ok = !a.norm_w || a.w_dt == TO_BF16;
    if (!enabled || a.M < 1 || a.M > SK_MAX_ROWS || a.K % (SK_PARTS * SK_CHUNK) != 0 || !x_ok || !w_ok || !norm_ok)
        return 0;
    MatmulArgs b = a;
    b.early_loads = gemv_early_loads();
    if (b.w_dt == TO_F16)
        return launch_skinny_x<__half, false>(b, dev, stream);
    return b.norm_w ? launch_skinny_x<__nv_bfloat16, true>(b, dev, stream)
                    : launch_skinny_x<__nv_bfloat16, false>(b, dev, stream);
}
