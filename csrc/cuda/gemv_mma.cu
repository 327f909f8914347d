// gemv_mma.cu - to_cuda_gemv_mma (matmul.cuh): the tensor-core product for a few dozen rows of x
// (batched decode): out[M, N] = x[M, K] . w[N, K]^T (+ bias) (+ out), w bf16 or f16, M <= 64, in
// one kernel that streams the weights, with to_matmul_add's accumulation and to_rms_norm_matmul's
// norm fused in.
//
// Why a kernel of its own: at M <= 64 the product reads 2 N K bytes of weights for 2 M N K flops,
// at most 64 flops per byte, about half of what mma.sync does per byte of the H200's ~4.8 TB/s.
// So the time is the weight stream, and the Hopper GEMM's 128-row tiles (mostly padding at
// M = 32), the conversion of x and the intermediates of the fused forms are all overhead. Beyond
// 64 rows mma.sync would need more than its rate: the wgmma GEMM (gemm_sm90.cu) takes over.
//
// How it works:
//
//  - mma.sync.m16n8k16 (bf16/f16 in, f32 accumulators; sm_80 and later) with the WEIGHTS as the
//    A operand: an m16 tile is 16 weight rows, the n8 tiles are 8 rows of x each (MT = M / 8
//    rounded up, at most 8). A warp owns RT = 2 tiles (32 weight rows) and a range of K.
//  - The A fragments come straight from global memory into registers, one 16-byte load per row
//    per lane: a dot product does not care in which order its k terms are added, so inside each
//    32-wide piece of K the lane (g = lane / 4, t = lane % 4) takes elements 8t .. 8t+7 of rows g
//    and g + 8, and they serve as the fragment's k = {2t, 2t+1, 2t+8, 2t+9} of two k16 steps
//    (elements 8t + 4s .. 8t + 4s + 3 in step s). The B fragments (x^T, token g of an n8 tile)
//    use the same order, so they are one 16-byte shared-memory load of elements 8t .. 8t+7 of
//    that token's staged row. K is a multiple of 8, so a lane's 8 elements are all below K or
//    all past it (zeros): the K tail needs nothing else.
//  - Weight loads are double-buffered groups of G pieces (G x 2 x RT 16-byte loads per lane, the
//    next group loaded while this one is multiplied), bypassing L1; G = 2 at M <= 16, else 1
//    (the accumulators take the registers). On sm_90 the L2 is also asked to prefetch: a small
//    product's (<= 16 MB) whole block slice at once, a big one's rows two pieces ahead of each
//    warp's loads, the first of it before to_pdl_wait(), so the DRAM stream overlaps the previous
//    kernel's tail, the staging and the barriers without holding registers.
//  - A block is 8 warps: WT warps along N (32 WT rows) times KW = 8 / WT along K. x is staged
//    into shared memory a chunk of K at a time (KW x PPW pieces, converted -- and normalised -- to
//    w's dtype, rows 64 mod 128 bytes apart so the B loads are free of bank conflicts), shared by
//    all the block's warps; two barriers per chunk. The block's k parts are summed through shared
//    memory in a fixed order. 2 blocks per multiprocessor (128 registers per thread: above M = 32
//    the accumulators, a group of weights and the staging leave no spare, so there a chunk's
//    first group is loaded after its staging instead of before).
//  - When the row blocks alone cannot keep the GPU busy, K is also split over S blocks: each
//    writes its partial sums (fragment order, so the writes and reads are whole lines) to a
//    workspace, and the last block of a row block to arrive (an atomic counter per row block; the
//    last one sets it back to 0, so the counters are zeroed once per GPU and never again) adds
//    the S partials in split order -- deterministic, whichever block is last -- and stores.
//  - Epilogue: store_out (bias, out += when accumulating, one rounding to out's dtype).
//  - Norm (to_rms_norm_matmul): rinv_m = 1 / sqrt(mean_k x[m, k]^2 + eps) with the sum of squares
//    in double and xn = (x * rinv) * g, as norm.cu computes it, then rounded to w's dtype as
//    norm_then_matmul's intermediate is: the same values as the separate ops up to the order of the
//    double sum. Every block needs every row's rinv; on sm_90 the blocks come in clusters of 8,
//    each summing 1/8 of K and reading the others' sums through distributed shared memory (else
//    every block would read all of x: at 264 blocks, several times the weights' bytes); before
//    sm_90 each block sums all of K.
//
// The plan (WT, S and the chunk length) comes from a small cost model of the shapes (estimates,
// not measurements): INFERENCE_PIO_GEMV_MMA=WT,S forces one (tuning, tests),
// INFERENCE_PIO_GEMV_MMA=0 turns the kernel off.
#include "cuda/common.cuh"
#include "cuda/matmul.cuh"

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int RT = 2;         // m16 tiles (16 weight rows each) per warp
constexpr int MAX_ROWS = 64;  // rows of x: 8 n8 tiles
constexpr int CLUSTER = 8;    // blocks sharing the norm's sums of squares (sm_90)
constexpr int PPW_MAX = 16;   // pieces (32 k) per warp per chunk, at most

// Weight pieces per double-buffered group: as many as the registers allow (RT x MT x 4
// accumulators per lane; each piece is 4 x 16 bytes, twice over with the next group).
__host__ __device__ constexpr int group_pieces(int mt) { return mt <= 2 ? 2 : 1; }

struct Params {
    int wt, kw;          // warps along N (32 rows each) and along K; wt * kw = WARPS
    int splits;          // blocks along K per row block (S)
    int ppw;             // pieces per warp per chunk (a multiple of the group)
    int pf_all;          // the block's whole slice of w prefetched to L2 at the start
    int xvec;            // x read 16 bytes at a time (unit column stride, 16-byte aligned rows)
    int row_blocks;      // blocks of 32 wt weight rows
    int pieces;          // ceil(K / 32)
    float *ws;           // S > 1: partial sums, [row block][split][wt][RT MT 4][32 lanes]
    unsigned *arrivals;  // S > 1: one counter per row block, 0 between launches
};

// ---- device helpers ----

__device__ __forceinline__ void prefetch_l2(const void *p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// 16 bytes of weights, read once: not kept in L1 (which x's rows use). (volatile: not hoisted
// above to_pdl_wait, in case the kernel before wrote w.)
__device__ __forceinline__ uint4 load_w16(const void *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi); // .x (lo) in the low half
        return *reinterpret_cast<uint32_t *>(&h);
    }
};

template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};

// x[m, k .. k+7] as f32: one or two 16-byte loads when `vec`, else eight element loads (any
// strides). Plain loads: x was written by the kernel before (to_pdl_wait has made it visible).
__device__ __forceinline__ void load_x8(const MatmulArgs &a, bool vec, int64_t m, int64_t k, float v[8]) {
    const int64_t at = m * a.xs0 + k * a.xs1;
    if (vec && a.x_dt == TO_F32) {
        const float4 *p = (const float4 *)((const float *)a.x + at);
        const float4 lo = p[0], hi = p[1];
        v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
    } else if (vec) {
        const uint4 r = *(const uint4 *)((const uint16_t *)a.x + at);
        const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (a.x_dt == TO_BF16) {
                v[2 * i] = __uint_as_float(w[i] << 16);
                v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
            } else {
                v[2 * i] = __half2float(__ushort_as_half((unsigned short)(w[i] & 0xFFFF)));
                v[2 * i + 1] = __half2float(__ushort_as_half((unsigned short)(w[i] >> 16)));
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++)
            v[i] = to_load(a.x, a.x_dt, at + i * a.xs1);
    }
}

// norm_w[k .. k+7] as f32 (contiguous, any alignment: element loads, L1 hits after the first).
__device__ __forceinline__ void load_g8(const MatmulArgs &a, int k, float v[8]) {
    if (a.norm_dt == TO_F32) {
#pragma unroll
        for (int i = 0; i < 8; i++)
            v[i] = ((const float *)a.norm_w)[k + i];
    } else {
        const unsigned short *h = (const unsigned short *)a.norm_w + k;
#pragma unroll
        for (int i = 0; i < 8; i++)
            v[i] = a.norm_dt == TO_BF16 ? __uint_as_float((uint32_t)h[i] << 16) : __half2float(__ushort_as_half(h[i]));
    }
}

// ---- clusters (sm_90): the norm's sums of squares ----

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define HAVE_CLUSTERS 1
__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire;" ::: "memory"); }
// The double at shared address `p` in block `rank` of the cluster.
__device__ __forceinline__ double cluster_load_f64(const double *p, uint32_t rank) {
    uint32_t addr = (uint32_t)__cvta_generic_to_shared(p), remote;
    double v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
    asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(remote) : "memory");
    return v;
}
#else
#define HAVE_CLUSTERS 0
#endif

// rinv[m] for m < M into s_rinv (every thread sees it after the barrier at the end). CL: this
// block sums 1/CLUSTER of K and adds the cluster's sums in rank order (the same double in every
// block); it then arrives at the cluster barrier, and must wait on it before it exits (its
// s_ss is read by the others until they have all arrived).
template <bool CL>
__device__ __forceinline__ void norm_rinv(const MatmulArgs &a, const Params &p, double *s_ss, float *s_rinv) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t groups = a.K / 8; // of 8 elements
    int64_t g0 = 0, g1 = groups;
#if HAVE_CLUSTERS
    if constexpr (CL) {
        const uint32_t rank = cluster_rank();
        g0 = groups * rank / CLUSTER;
        g1 = groups * (rank + 1) / CLUSTER;
    }
#endif
    for (int m = warp; m < a.M; m += WARPS) {
        double ss = 0.0;
#pragma unroll 4
        for (int64_t i = g0 + lane; i < g1; i += 32) {
            float v[8];
            load_x8(a, p.xvec, m, 8 * i, v);
#pragma unroll
            for (int e = 0; e < 8; e++)
                ss += (double)v[e] * (double)v[e];
        }
        ss = to_warp_sum_double(ss);
        if (lane == 0)
            s_ss[m] = ss;
    }
#if HAVE_CLUSTERS
    if constexpr (CL) {
        cluster_arrive(); // (release: s_ss is written)
        cluster_wait();
        if (threadIdx.x < a.M) {
            double ss = 0.0;
            for (int r = 0; r < CLUSTER; r++)
                ss += cluster_load_f64(s_ss + threadIdx.x, (uint32_t)r);
            s_rinv[threadIdx.x] = (float)(1.0 / sqrt(ss / (double)a.K + a.norm_eps));
        }
        cluster_arrive(); // this block's remote reads are done; the matching wait is at the end
        __syncthreads();
        return;
    }
#endif
    __syncthreads();
    if (threadIdx.x < a.M)
        s_rinv[threadIdx.x] = (float)(1.0 / sqrt(s_ss[threadIdx.x] / (double)a.K + a.norm_eps));
    __syncthreads();
}

// Chunk [k0, k0 + 8 kc8) of x's rows (MT x 8 of them) into xs as T, x[m, k] at m * pitch + k - k0;
// zeros at m >= M and k >= kend (the K tail, and past the block's range). NORM: (x rinv) g first,
// rounded once. Thread i takes 8 consecutive k of one row: 16-byte stores, consecutive threads
// consecutive in a row. (The B loads read, per quarter warp, 64 bytes of each of two rows: the
// pitch, 32 (pieces per chunk | 1) elements, is 64 mod 128 bytes, which puts those in different
// banks.) SB items' loads are issued before their stores, to have a few in flight.
template <typename T, int MT, bool NORM>
__device__ __forceinline__ void stage_chunk(const MatmulArgs &a, const Params &p, uint16_t *xs, int pitch, int kc8,
                                            int k0, int kend, const float *s_rinv) {
    constexpr int SB = MT >= 6 ? 1 : 2; // (registers)
    const int items = 8 * MT * kc8;
    for (int i0 = threadIdx.x; i0 < items; i0 += SB * THREADS) {
        float v[SB][8];
#pragma unroll
        for (int b = 0; b < SB; b++) {
            const int i = i0 + b * THREADS, m = i / kc8;
            const int k = k0 + 8 * (i - m * kc8);
            if (i < items && m < a.M && k < kend) {
                load_x8(a, p.xvec, m, k, v[b]);
                if constexpr (NORM) {
                    const float r = s_rinv[m];
                    float gv[8];
                    load_g8(a, k, gv);
#pragma unroll
                    for (int e = 0; e < 8; e++)
                        v[b][e] = __fmul_rn(__fmul_rn(v[b][e], r), gv[e]);
                }
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++)
                    v[b][e] = 0.0f;
            }
        }
#pragma unroll
        for (int b = 0; b < SB; b++) {
            const int i = i0 + b * THREADS, m = i / kc8;
            if (i < items)
                *(uint4 *)(xs + m * pitch + 8 * (i - m * kc8)) =
                    make_uint4(Mma<T>::pack(v[b][0], v[b][1]), Mma<T>::pack(v[b][2], v[b][3]),
                               Mma<T>::pack(v[b][4], v[b][5]), Mma<T>::pack(v[b][6], v[b][7]));
        }
    }
}

// ---- the kernel ----
//
// Block b: row block rb = b / S (weight rows 32 WT rb ..), split s = b % S (pieces [q0, q1) of
// K); blocks past row_blocks x S only pad the grid to whole clusters. Warp w: rows 32 (w % WT)
// of the row block, k part w / WT of every chunk (pieces PPW (w / WT) .. of it).
template <typename T, int MT, bool NORM, bool CL>
__device__ __forceinline__ void gemv_mma_body(const MatmulArgs &a, const Params &p, uint8_t *smem, double *s_ss,
                                              float *s_rinv, unsigned *s_last) {
    constexpr int G = group_pieces(MT);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int wt = warp % p.wt, part = warp / p.wt;
    // (32-bit indices: the host keeps N, K and the grid below 2^31)
    const int blk = blockIdx.x;
    const bool work = blk < p.row_blocks * p.splits;
    const int rb = blk / p.splits, s = blk - rb * p.splits;
    const int bnr = 32 * p.wt;                 // rows of the row block
    const int n0 = rb * bnr, nw = n0 + 32 * wt; // first row of the block, of the warp
    const int q0 = (int)((int64_t)p.pieces * s / p.splits), q1 = (int)((int64_t)p.pieces * (s + 1) / p.splits);
    const int cp = p.kw * p.ppw;               // pieces per chunk
    const int nchunks = (q1 - q0 + cp - 1) / cp;
    const int kend = q1 * 32 < a.K ? q1 * 32 : (int)a.K;
    const int pitch = 32 * (cp | 1);
    const int gpc = p.ppw / G, ngroups = nchunks * gpc; // the warp's groups per chunk, in all
    uint16_t *xs = (uint16_t *)smem;

    // Group i of this warp: pieces first_piece(i) .. + G - 1 (some may be past q1).
    auto first_piece = [&](int i) {
        const int c = i / gpc;
        return q0 + c * cp + part * p.ppw + (i - c * gpc) * G;
    };
    // L2 prefetch (sm_90; nothing before): a small product's block slice all at once (one bulk
    // prefetch per row), a big one's group by group PF_GROUPS ahead of its loads (lane l: row
    // nw + l), so that what was prefetched is read before it could be evicted.
    constexpr int PF_GROUPS = 2 / G;
    auto prefetch_group = [&](int i) {
        const int q = first_piece(i), lo = 32 * q, end = 32 * (q + G);
        const int hi = end < kend ? end : kend;
        if (i < ngroups && hi > lo && nw + lane < a.N)
            prefetch_l2(a.w + (int64_t)(nw + lane) * a.w_row_bytes + 2 * lo, (uint32_t)(2 * (hi - lo)));
    };
    if (work && p.pf_all) {
        if (tid < bnr && n0 + tid < a.N && kend > 32 * q0)
            prefetch_l2(a.w + (int64_t)(n0 + tid) * a.w_row_bytes + 64 * q0, (uint32_t)(2 * (kend - 32 * q0)));
    } else if (work) {
        for (int i = 0; i < PF_GROUPS; i++)
            prefetch_group(i);
    }

    to_pdl_wait();
    to_pdl_trigger();

    if (!work && !CL)
        return;
    if constexpr (NORM)
        norm_rinv<CL>(a, p, s_ss, s_rinv); // (every block of a cluster takes part)

    float acc[RT][MT][4];
#pragma unroll
    for (int r = 0; r < RT; r++)
#pragma unroll
        for (int j = 0; j < MT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                acc[r][j][e] = 0.0f;

    if (work) {
        // This lane's rows: nw + g + 8 i, i = 2 r + h: g and g + 8 of each of the warp's tiles.
        // (One pointer, the others 8 rows apart from it: registers are what limits this kernel.)
        const char *wrow = a.w + (int64_t)(nw + g) * a.w_row_bytes;
        const int rows_left = (int)a.N - (nw + g); // row i exists if 8 i < rows_left
        auto load_group = [&](uint4 (&buf)[G][2 * RT], int i) {
            const int q_first = first_piece(i);
#pragma unroll
            for (int u = 0; u < G; u++) {
                const int q = q_first + u, k = q * 32 + 8 * t;
                const bool ok = q < q1 && k < a.K;
#pragma unroll
                for (int i2 = 0; i2 < 2 * RT; i2++)
                    buf[u][i2] = ok && 8 * i2 < rows_left ? load_w16(wrow + i2 * 8 * a.w_row_bytes + 2 * k)
                                                          : make_uint4(0, 0, 0, 0);
            }
        };
        auto compute = [&](const uint4 (&buf)[G][2 * RT], int i) {
            const int c = i / gpc, j0 = (i - c * gpc) * G;
#pragma unroll
            for (int u = 0; u < G; u++) {
                const int jl = part * p.ppw + j0 + u; // piece within the chunk
                if (q0 + c * cp + jl >= q1)
                    break; // (uniform)
                const uint16_t *xb = xs + g * pitch + jl * 32 + 8 * t;
#pragma unroll
                for (int j = 0; j < MT; j++) {
                    const uint4 b = *(const uint4 *)(xb + 8 * j * pitch);
#pragma unroll
                    for (int r = 0; r < RT; r++) {
                        const uint4 lo = buf[u][2 * r], hi = buf[u][2 * r + 1]; // rows g, g + 8
                        Mma<T>::run(acc[r][j], lo.x, hi.x, lo.y, hi.y, b.x, b.y); // k16 step 0
                        Mma<T>::run(acc[r][j], lo.z, hi.z, lo.w, hi.w, b.z, b.w); // k16 step 1
                    }
                }
            }
        };

        // The next group is loaded before the current one is used, across chunk boundaries too
        // (weights need no barrier), except at MT >= 6 (M > 32): there the 48 or 64 accumulators
        // leave too few registers to hold a group through the staging, so a chunk's first group
        // is loaded after it (an L2 hit on sm_90: it was prefetched).
        constexpr bool CARRY = MT <= 4;
        uint4 cur[G][2 * RT], nxt[G][2 * RT];
        if (CARRY)
            load_group(cur, 0);
        for (int c = 0; c < nchunks; c++) {
            __syncthreads(); // the previous chunk's x is read (or the norm's rinv is written)
            stage_chunk<T, MT, NORM>(a, p, xs, pitch, 4 * cp, (q0 + c * cp) * 32, kend, s_rinv);
            if (!CARRY)
                load_group(cur, c * gpc);
            __syncthreads();
            for (int jg = 0; jg < gpc; jg++) {
                const int i = c * gpc + jg;
                if (CARRY ? i + 1 < ngroups : jg + 1 < gpc)
                    load_group(nxt, i + 1);
                if (!p.pf_all)
                    prefetch_group(i + PF_GROUPS);
                compute(cur, i);
#pragma unroll
                for (int u = 0; u < G; u++)
#pragma unroll
                    for (int i2 = 0; i2 < 2 * RT; i2++)
                        cur[u][i2] = nxt[u][i2];
            }
        }

        // The k parts of the warp's tiles: parts 1.. leave their sums in shared memory (over x's
        // chunk, which is read no more), part 0 adds them in part order.
        constexpr int E = RT * MT * 4;
        if (p.kw > 1) {
            __syncthreads();
            float *red = (float *)smem;
            if (part > 0)
#pragma unroll
                for (int r = 0; r < RT; r++)
#pragma unroll
                    for (int j = 0; j < MT; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            red[(((part - 1) * p.wt + wt) * E + (r * MT + j) * 4 + e) * 32 + lane] = acc[r][j][e];
            __syncthreads();
            if (part == 0)
                for (int q = 1; q < p.kw; q++)
#pragma unroll
                    for (int r = 0; r < RT; r++)
#pragma unroll
                        for (int j = 0; j < MT; j++)
#pragma unroll
                            for (int e = 0; e < 4; e++)
                                acc[r][j][e] += red[(((q - 1) * p.wt + wt) * E + (r * MT + j) * 4 + e) * 32 + lane];
        }

        // Split K: partials out, and the last block of the row block adds all S in split order.
        bool store = part == 0;
        if (p.splits > 1) {
            float *mine = p.ws + (((int64_t)blk * p.wt + wt) * E) * 32 + lane;
            if (part == 0)
#pragma unroll
                for (int r = 0; r < RT; r++)
#pragma unroll
                    for (int j = 0; j < MT; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            __stcg(mine + ((r * MT + j) * 4 + e) * 32, acc[r][j][e]);
            // grid-sync's pattern: a barrier (every partial written), a fence by the thread that
            // counts (release), and after the count another fence (acquire) before the reads
            __syncthreads();
            if (tid == 0) {
                unsigned *count = p.arrivals + rb;
                __threadfence();
                const unsigned before = atomicAdd(count, 1u);
                *s_last = before == (unsigned)p.splits - 1;
                if (*s_last) {
                    __threadfence();
                    atomicExch(count, 0u); // every split has arrived: zero for the next launch
                }
            }
            __syncthreads();
            store = part == 0 && *s_last;
            if (store) {
                const float *first = p.ws + (((int64_t)rb * p.splits * p.wt + wt) * E) * 32 + lane;
#pragma unroll
                for (int r = 0; r < RT; r++)
#pragma unroll
                    for (int j = 0; j < MT; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            acc[r][j][e] = 0.0f;
                for (int s2 = 0; s2 < p.splits; s2++) {
                    const float *src = first + (int64_t)s2 * p.wt * E * 32;
#pragma unroll
                    for (int r = 0; r < RT; r++)
#pragma unroll
                        for (int j = 0; j < MT; j++)
#pragma unroll
                            for (int e = 0; e < 4; e++)
                                acc[r][j][e] += __ldcg(src + ((r * MT + j) * 4 + e) * 32);
                }
            }
        }

        // acc[r][j][2 h + e]: weight row nw + 16 r + 8 h + g, x row 8 j + 2 t + e.
        if (store)
#pragma unroll
            for (int r = 0; r < RT; r++)
#pragma unroll
                for (int j = 0; j < MT; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int n = nw + 16 * r + 8 * (e / 2) + g;
                        const int m = 8 * j + 2 * t + (e % 2);
                        if (n < a.N && m < a.M)
                            store_out(a, m, n, acc[r][j][e]);
                    }
    }
#if HAVE_CLUSTERS
    if constexpr (CL)
        cluster_wait(); // the others have read this block's s_ss
#endif
}

template <typename T, int MT>
__global__ void __launch_bounds__(THREADS, 2) gemv_mma_kernel(MatmulArgs a, Params p) {
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ unsigned s_last;
    gemv_mma_body<T, MT, false, false>(a, p, smem, nullptr, nullptr, &s_last);
}

// The norm's form: clusters of CLUSTER blocks on sm_90 (the attribute of the kernel; images for
// older GPUs get none and sum all of K in each block).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define CLUSTER_OF(s)
#else
#define CLUSTER_OF(s) __cluster_dims__(s, 1, 1)
#endif

template <typename T, int MT>
__global__ void __launch_bounds__(THREADS, 2) CLUSTER_OF(CLUSTER) gemv_mma_norm_kernel(MatmulArgs a, Params p) {
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ double s_ss[MAX_ROWS];
    __shared__ float s_rinv[MAX_ROWS];
    __shared__ unsigned s_last;
    gemv_mma_body<T, MT, true, HAVE_CLUSTERS != 0>(a, p, smem, s_ss, s_rinv, &s_last);
}

// ---- host side ----

struct DeviceInfo {
    int sms, major, smem_per_sm;
};

// Multiprocessors, compute capability and shared memory per multiprocessor of GPU `dev`.
DeviceInfo device_info(int dev) {
    static std::atomic<int> known[64][3];
    if (dev < 0 || dev >= 64)
        return {132, 9, 228 * 1024};
    if (known[dev][0].load(std::memory_order_relaxed) == 0) {
        int sms = 0, major = 0, smem = 0;
        if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess || sms <= 0) {
            cudaGetLastError();
            sms = 132, major = 9, smem = 228 * 1024;
        }
        known[dev][1].store(major, std::memory_order_relaxed);
        known[dev][2].store(smem, std::memory_order_relaxed);
        known[dev][0].store(sms, std::memory_order_relaxed);
    }
    return {known[dev][0].load(std::memory_order_relaxed), known[dev][1].load(std::memory_order_relaxed),
            known[dev][2].load(std::memory_order_relaxed)};
}

// Dynamic shared memory of a block: x's chunk (8 MT rows of pitch 32 (KW PPW | 1) elements, see
// stage_chunk), or the k parts' sums when larger.
int smem_bytes(int mt, int wt, int ppw) {
    const int kw = WARPS / wt;
    const int xs = 8 * mt * 32 * (kw * ppw | 1) * 2;
    const int red = (kw - 1) * wt * RT * mt * 4 * 32 * 4;
    return xs > red ? xs : red;
}

// Shared memory a block may take: two blocks per multiprocessor (the launch bounds), less the
// static part and the 1 KB the system reserves per block.
int smem_budget(const DeviceInfo &d) { return d.smem_per_sm / 2 - 2048; }

struct Plan {
    int wt, splits, ppw;
};

// Pieces per warp per chunk (a multiple of the group): the block's range in as few chunks of
// about equal length as PPW_MAX and the shared memory allow; 0 if not even one group fits.
int choose_ppw(int mt, int wt, int64_t pieces, int splits, int budget) {
    const int gp = group_pieces(mt), kw = WARPS / wt;
    const int64_t per_block = (pieces + splits - 1) / splits, per_warp = (per_block + kw - 1) / kw;
    for (int64_t chunks = (per_warp + PPW_MAX - 1) / PPW_MAX;; chunks++) {
        const int ppw = (int)(((per_warp + chunks - 1) / chunks + gp - 1) / gp * gp);
        if (smem_bytes(mt, wt, ppw) <= budget)
            return ppw;
        if (ppw <= gp)
            return 0;
    }
}

// Estimated seconds of a plan. Each weight byte costs the DRAM's time or its share of the L2's
// (the weights plus x staged once per row block, the norm's reads of x and the split partials
// written and read, all through the L2), and n blocks at once pull at most n x BW_BLOCK (a block
// has only so many loads in flight). Blocks run in waves of 2 per multiprocessor; the last,
// partial wave runs at its own rate. Plus a start-up latency per wave and the merge of splits.
// Estimates, not measurements (INFERENCE_PIO_GEMV_MMA=WT,S overrides).
double plan_seconds(const MatmulArgs &a, int mt, int wt, int splits, const DeviceInfo &d) {
    const double BW_DRAM = 4.0e12, BW_L2 = 8.0e12, BW_BLOCK = 30e9, T_WAVE = 1.0e-6, T_MERGE = 0.5e-6;
    const int64_t rows = 32 * wt, rbs = (a.N + rows - 1) / rows;
    int64_t blocks = rbs * splits;
    if (a.norm_w)
        blocks = (blocks + CLUSTER - 1) / CLUSTER * CLUSTER;
    const double M = (double)a.M, N = (double)a.N, K = (double)a.K;
    const double xb = a.x_dt == TO_F32 ? 4.0 : 2.0;
    const double W = 2.0 * N * K;
    const double X = (double)rbs * M * K * xb;
    const double R = a.norm_w ? (double)blocks * M * K * xb / (d.major >= 9 ? CLUSTER : 1) : 0.0;
    const double P = splits > 1 ? 2.0 * splits * (double)(rbs * rows) * 8.0 * mt * 4.0 : 0.0;
    const double per_byte = fmax(1.0 / BW_DRAM, (W + X + R + P) / W / BW_L2);
    auto rate = [&](int64_t n) { return fmin(1.0 / per_byte, (double)n * BW_BLOCK); };
    const int64_t slots = 2 * (int64_t)d.sms, full = blocks / slots, rem = blocks % slots;
    const double wb = W / (double)blocks;
    double t = (double)full * (double)slots * wb / rate(slots) + (rem ? (double)rem * wb / rate(rem) : 0.0);
    return t + (double)(full + (rem ? 1 : 0)) * T_WAVE + (splits > 1 ? T_MERGE : 0.0);
}

Plan choose_plan(const MatmulArgs &a, int mt, int64_t pieces, const DeviceInfo &d, int budget) {
    static const int SPLITS[] = {1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64};
    Plan best = {0, 0, 0};
    double best_t = INFINITY;
    for (int wt = WARPS; wt >= 1; wt /= 2) {
        const int kw = WARPS / wt;
        for (int splits : SPLITS) {
            if (splits > 1 && pieces / splits < kw) // every warp a piece at least
                break;
            const int ppw = choose_ppw(mt, wt, pieces, splits, budget);
            if (ppw == 0)
                continue;
            const double t = plan_seconds(a, mt, wt, splits, d);
            if (t < best_t)
                best = {wt, splits, ppw}, best_t = t;
        }
    }
    return best;
}

// The arrival counters of split launches on GPU `dev`: at least n unsigneds, all zero between
// launches. As attention.cu's decode_arrivals: one array per GPU serves every launch (they run one
// after another on the GPU's stream, and touch the counters only after to_pdl_wait), each launch
// leaves its counters at zero, so the array is zeroed once, when it is made (with cudaMalloc and a
// memset on a private stream the host waits for, in relaxed capture mode, so that growing it
// while a graph is being recorded neither becomes a graph node nor breaks the recording). It is
// never freed; a larger one is made when a launch needs more (the old one stays for the graphs
// that use it). Returns NULL if it cannot be made.
unsigned *arrivals(int dev, int64_t n) {
    constexpr int kMaxGpus = 64;
    static std::mutex lock;
    static unsigned *arrays[kMaxGpus];
    static int64_t sizes[kMaxGpus];
    static cudaStream_t zeroing[kMaxGpus];
    if (dev < 0 || dev >= kMaxGpus)
        return nullptr;
    std::lock_guard<std::mutex> guard(lock);
    if (sizes[dev] < n) {
        int64_t grown = 2 * sizes[dev] > n ? 2 * sizes[dev] : n;
        grown = grown > 4096 ? grown : 4096;
        const size_t bytes = (size_t)grown * sizeof(unsigned);
        cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
        cudaThreadExchangeStreamCaptureMode(&mode);
        void *p = nullptr;
        cudaError_t err = cudaMalloc(&p, bytes);
        if (err == cudaSuccess && !zeroing[dev])
            err = cudaStreamCreateWithFlags(&zeroing[dev], cudaStreamNonBlocking);
        if (err == cudaSuccess)
            err = cudaMemsetAsync(p, 0, bytes, zeroing[dev]);
        if (err == cudaSuccess)
            err = cudaStreamSynchronize(zeroing[dev]);
        cudaThreadExchangeStreamCaptureMode(&mode);
        if (err != cudaSuccess) {
            cudaGetLastError();
            return nullptr;
        }
        arrays[dev] = static_cast<unsigned *>(p);
        sizes[dev] = grown;
    }
    return arrays[dev];
}

template <typename T, int MT>
cudaError_t launch(const MatmulArgs &a, const Params &p, int64_t blocks, int smem, int budget, int dev,
                   cudaStream_t stream) {
    auto kernel = a.norm_w ? gemv_mma_norm_kernel<T, MT> : gemv_mma_kernel<T, MT>;
    // bit d: the dynamic shared-memory limit of this kernel is raised on GPU d (to the budget,
    // once); one word per kernel instantiation and form
    static std::atomic<uint64_t> ready[2];
    std::atomic<uint64_t> &bits = ready[a.norm_w ? 1 : 0];
    if (smem > 48 * 1024 && !(bits.load(std::memory_order_relaxed) >> dev & 1)) {
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, budget);
        if (err != cudaSuccess)
            return err;
        bits.fetch_or(1ull << dev, std::memory_order_relaxed);
    }
    return to_launch(kernel, dim3((unsigned)blocks), dim3(THREADS), (size_t)smem, stream, a, p);
}

template <typename T>
cudaError_t launch_rows(const MatmulArgs &a, const Params &p, int mt, int64_t blocks, int smem, int budget, int dev,
                        cudaStream_t stream) {
    switch (mt) {
    case 2: return launch<T, 2>(a, p, blocks, smem, budget, dev, stream);
    case 4: return launch<T, 4>(a, p, blocks, smem, budget, dev, stream);
    case 6: return launch<T, 6>(a, p, blocks, smem, budget, dev, stream);
    default: return launch<T, 8>(a, p, blocks, smem, budget, dev, stream);
    }
}

} // namespace

int to_cuda_gemv_mma(const MatmulArgs &a, int device_index, cudaStream_t stream) {
    const char *env = getenv("INFERENCE_PIO_GEMV_MMA");
    if (env && strcmp(env, "0") == 0)
        return 0;
    auto is_float = [](int dt) { return dt == TO_F32 || dt == TO_F16 || dt == TO_BF16; };
    if (a.M < 1 || a.M > MAX_ROWS || a.N < 1 || a.K < 8 || a.K % 8 != 0 || a.w_quant ||
        (a.w_dt != TO_BF16 && a.w_dt != TO_F16) || !is_float(a.x_dt) || !is_float(a.out_dt) ||
        (a.bias && !is_float(a.bias_dt)) || (a.norm_w && !is_float(a.norm_dt)))
        return 0;
    // 16-byte weight loads: aligned rows (a single row's pitch is never followed)
    if ((uintptr_t)a.w % 16 != 0 || (a.N > 1 && a.w_row_bytes % 16 != 0))
        return 0;
    // (the kernel indexes rows, k and blocks in 32 bits)
    if (a.N > (1 << 30) || a.K > (1 << 30))
        return 0;

    const DeviceInfo d = device_info(device_index);
    const int budget = smem_budget(d);
    const int mt = (int)((a.M + 7) / 8 + 1) / 2 * 2; // n8 tiles, rounded up to even: 2, 4, 6, 8
    const int64_t pieces = (a.K + 31) / 32;

    Plan plan = choose_plan(a, mt, pieces, d, budget);
    int wt = 0, splits = 0;
    if (env && sscanf(env, "%d,%d", &wt, &splits) == 2 && (wt == 1 || wt == 2 || wt == 4 || wt == 8) && splits >= 1) {
        const int kw = WARPS / wt;
        while (splits > 1 && pieces / splits < kw)
            splits--;
        const int ppw = choose_ppw(mt, wt, pieces, splits, budget);
        if (ppw > 0)
            plan = {wt, splits, ppw};
    }
    if (plan.wt == 0)
        return 0;

    Params p = {};
    p.wt = plan.wt;
    p.kw = WARPS / plan.wt;
    p.splits = plan.splits;
    p.ppw = plan.ppw;
    p.pieces = (int)pieces;
    p.row_blocks = (int)((a.N + 32 * p.wt - 1) / (32 * p.wt));
    while (p.splits > 1 && (int64_t)p.row_blocks * p.splits > INT_MAX - CLUSTER)
        p.splits /= 2; // (only a very wide product with a forced plan)
    const int xb = a.x_dt == TO_F32 ? 4 : 2;
    p.xvec = a.xs1 == 1 && (uintptr_t)a.x % 16 == 0 && (a.xs0 * xb) % 16 == 0;
    // L2 prefetch: a small product all at once (it fits the L2 with room to spare), a big one a
    // little ahead of use (so that what is prefetched is not evicted before it is read)
    p.pf_all = 2 * a.N * a.K <= ((int64_t)16 << 20);

    // Split K: the workspace of partials (from the caching allocator; the stream orders its next
    // user after this launch) and the counters. If either cannot be had, no split.
    void *ws = nullptr;
    if (p.splits > 1) {
        const int64_t floats = p.row_blocks * p.splits * p.wt * RT * mt * 4 * 32;
        p.arrivals = arrivals(device_index, p.row_blocks);
        if (!p.arrivals || to_cuda_alloc(device_index, floats * (int64_t)sizeof(float), &ws) != TO_OK) {
            ws = nullptr;
            p.splits = 1;
            p.ppw = choose_ppw(mt, p.wt, pieces, 1, budget);
        }
        p.ws = (float *)ws;
    }
    int64_t blocks = p.row_blocks * p.splits;
    if (a.norm_w)
        blocks = (blocks + CLUSTER - 1) / CLUSTER * CLUSTER; // whole clusters
    const int smem = smem_bytes(mt, p.wt, p.ppw);

    cudaError_t err = a.w_dt == TO_BF16
                          ? launch_rows<__nv_bfloat16>(a, p, mt, blocks, smem, budget, device_index, stream)
                          : launch_rows<__half>(a, p, mt, blocks, smem, budget, device_index, stream);
    if (ws)
        to_cuda_free(device_index, ws);
    if (err == cudaErrorInvalidDeviceFunction || err == cudaErrorNoKernelImageForDevice) {
        cudaGetLastError(); // no image for this GPU: let the caller's kernels run
        return 0;
    }
    return 1; // any other launch error stays for to_cuda_check_launch
}
