// gemm_sm90.cu - the Hopper tensor-core GEMM for prefill (to_cuda_gemm_sm90, matmul.cuh):
// out[M, N] = x[M, K] . w[N, K]^T (+ bias[N]), x and w both bf16 or both f16, f32 accumulation,
// out f32, f16 or bf16 (bias added in f32, then one rounding, as store_out does).
//
// How it works (sm_90a only: wgmma):
//
//  - Output tiles of 128 x BN (BN = 256, or 128 when 256-wide tiles would leave SMs idle), K in
//    steps of 64: one step of a tile row is 64 16-bit elements = 128 bytes, exactly the width of
//    the 128-byte swizzle, so each operand tile in shared memory is a stack of 8-row x 128-byte
//    swizzle atoms (1024 bytes each), as TMA writes it and as wgmma reads it.
//  - 384 threads. Warps 0-3 and 4-7 are two consumer warpgroups; each computes 64 rows of the tile
//    with wgmma.mma_async m64nBNk16, A (x, K-major) and B (w, K-major: w is [N, K] row-major, which
//    is what x . w^T wants, so nothing is transposed) both read from shared memory through matrix
//    descriptors, the accumulators in registers (BN / 2 floats per thread). Warps 8-11 are the
//    producer warpgroup: one thread issues the TMA loads (cp.async.bulk.tensor.2d) of the x and w
//    tiles into a ring of STAGES shared-memory stages. setmaxnreg moves registers from the producer
//    (40 per thread) to the consumers (232; 128 accumulators at BN = 256). (A lone producer warp
//    would not do: 9 warps spread 3/2/2/2 over the SM's 4 register files cap a thread at 168.)
//  - Two mbarriers per stage: full[s], armed by the producer with the stage's byte count and
//    completed by the TMA engine; empty[s], on which each of the 8 consumer warps arrives once the
//    wgmmas that read stage s have completed (one wgmma group is kept in flight, so stage s is
//    released while stage s + 1 is being multiplied).
//  - Persistent: min(tiles, SMs) blocks walk the tiles, 16 row tiles (2048 rows) at a time for L2
//    reuse of w; the producer runs ahead into the next tile while the consumers store the last.
//  - Split K for small grids (prefill of a few rows, narrow N): a cluster of S = 2, 4 or 8 blocks
//    shares one output tile, each multiplying 1/S of K. Afterwards each block leaves the partial
//    sums of the columns it does not own in its (now idle) stage memory, and every block adds
//    those of its own columns from the other blocks' shared memory (distributed shared memory),
//    then stores them. No workspace and no second kernel, and the sum is in a fixed order.
//  - Epilogue: bias, rounding to out's dtype, then through shared memory and TMA stores (whole
//    128-byte rows of 16-row boxes, clipped to M x N by the engine) when out's base and row pitch
//    are 16-byte aligned, else straight from the registers (rows < M, columns < N).
//    Out-of-range rows and columns of partial tiles and the K tail come in as zeros from TMA.
//
// TMA needs 16-byte aligned bases and row pitches, so other layouts (and non-Hopper GPUs, builds
// without sm_90a code) return 0 and matmul.cu's own kernels run instead.
#include "cuda/common.cuh"
#include "cuda/matmul.cuh"

#include <cudaTypedefs.h> // CUtensorMap and the type of cuTensorMapEncodeTiled (no libcuda link)

#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if !defined(TO_HAVE_SM90A) // csrc/build.py defines it when sm_90a is among the targets

int to_cuda_gemm_sm90(const MatmulArgs &, int, cudaStream_t) { return 0; }

#else

namespace {

constexpr int BM = 128;                 // rows of x per tile (two consumer warpgroups of 64)
constexpr int BK = 64;                  // k per stage: 128 bytes of 16-bit elements (the swizzle width)
constexpr int CONSUMER_WARPS = 8;
constexpr int THREADS = 32 * CONSUMER_WARPS + 128; // + the producer warpgroup
constexpr int PIPE_BYTES = 192 * 1024;  // the stage ring (of 227 KB of shared memory per block)
constexpr int EPI_BYTES = CONSUMER_WARPS * 4096; // per consumer warp two 2 KB boxes of out (epilogue)

template <int BN> struct Tile {
    static constexpr int A_BYTES = BM * BK * 2; // 16 KB of x
    static constexpr int B_BYTES = BN * BK * 2; // 32 KB (BN 256) or 16 KB (BN 128) of w
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    static constexpr int STAGES = PIPE_BYTES / STAGE_BYTES; // 4 or 6
    // + the epilogue's boxes, 2 mbarriers per stage, slack to align the ring to 1024 bytes (the
    // swizzle atom): 230464 or 230496 bytes of the 232448 a block may have
    static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + EPI_BYTES + 16 * STAGES + 1024;
    static_assert(STAGES * STAGE_BYTES == PIPE_BYTES, "stages fill the ring");
    static_assert(SMEM_BYTES <= 232448, "more shared memory than a Hopper block may have");
    static_assert(BN / 2 * 256 * 4 <= PIPE_BYTES, "split-K partial sums fit the ring");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) // device code of the sm_90a image only

constexpr int BAND = 16; // row tiles walked together (tile order, for L2 reuse)
// Registers per thread after setmaxnreg: the block starts with 65536 / 384 = 168 (rounded down to
// a multiple of 8) each; the producer gives back what its one busy thread does not need, the
// consumers take it for the accumulators (128 x 40 + 256 x 232 = 64512).
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;

// Which row tile and column tile the t-th tile is: bands of BAND row tiles, within a band the
// row tile fastest, so the blocks running at one time share a few w tiles (and all of x's band).
__device__ __forceinline__ void tile_coords(int t, int num_m, int num_n, int &mt, int &nt) {
    int band = t / (BAND * num_n), first = band * BAND;
    int rows = min(BAND, num_m - first), r = t - first * num_n;
    mt = first + r % rows;
    nt = r / rows;
}

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

// ---- mbarriers ----

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// One arrival that also announces `bytes` of TMA traffic to come (the producer arming full[s]).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// Waits until the phase of parity `parity` has completed. A fresh barrier is in phase 0, and
// the phase "before" it (parity 1) counts as completed: the producer's first pass over the
// empty barriers (waiting for parity 1) does not block.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{ .reg .pred p;\n"
                     "  mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "  selp.u32 %0, 1, 0, p; }"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
    } while (!done);
}

// ---- TMA ----

// The box at (k, row) of the tensor `map` into shared memory at dst, completing `bar` by its bytes.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap *map, uint32_t bar, int k, int row) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
                 "l"((uint64_t)map), "r"(k), "r"(row), "r"(bar)
                 : "memory");
}

// The box at (col, row) of `map` from shared memory at src (TMA store; out-of-range parts of the
// box are not written), as one bulk group of this thread.
__device__ __forceinline__ void tma_store(const CUtensorMap *map, uint32_t src, int col, int row) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"((uint64_t)map),
                 "r"(src), "r"(col), "r"(row)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Waits until at most N of this thread's bulk groups still read their shared memory / are not done.
template <int N> __device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
template <int N> __device__ __forceinline__ void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

// ---- wgmma ----

// Shared-memory matrix descriptor of a K-major operand in 128-byte swizzle: rows of 64 elements
// (128 bytes), 8-row atoms 1024 bytes apart (stride byte offset), the leading byte offset unused
// for this layout (1 by convention), base offset 0 (the atoms are 1024-byte aligned), swizzle
// mode 1 (128B) in bits 62-63. Addresses are in 16-byte units. The k-th 16-element slice of the
// 64-element rows starts 32 k bytes further, i.e. descriptor + 2 k: the swizzle is applied by the
// hardware to the final address bits, so the same XOR TMA used finds the right chunks.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 | (uint64_t)1 << 62;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Marks the accumulators as written here, so the compiler cannot move their reads (the
// epilogue) above the wgmma.wait_group that makes them valid.
template <int R> __device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
    for (int i = 0; i < R; i++)
        asm volatile("" : "+f"(d[i])::"memory");
}

// The accumulator lists of the wgmma statements: the register text and the "+f" operands.
#define ACC_TEXT_64                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
    "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "  \
    "%59, %60, %61, %62, %63}"
#define ACC_TEXT_128                                                                                  \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
    "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, "  \
    "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, "  \
    "%59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, "  \
    "%78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, "  \
    "%97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, "    \
    "%113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define ACC8(i) \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define ACC_OPS_64 ACC8(0), ACC8(8), ACC8(16), ACC8(24), ACC8(32), ACC8(40), ACC8(48), ACC8(56)
#define ACC_OPS_128 ACC_OPS_64, ACC8(64), ACC8(72), ACC8(80), ACC8(88), ACC8(96), ACC8(104), ACC8(112), ACC8(120)

// d (+)= A . B^T over one k16 slice, for the warpgroup: A 64 x 16 and B BN x 16 in shared memory
// (descriptors da, db), both K-major (trans flags 0), scales 1. accumulate == 0 overwrites d (the
// first slice of a tile), so the accumulators need no zeroing.
template <int BN, bool F16>
__device__ __forceinline__ void wgmma(float (&d)[BN / 2], uint64_t da, uint64_t db, uint32_t accumulate) {
    if constexpr (BN == 256 && F16)
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " ACC_TEXT_128 ", %128, %129, p, 1, 1, 0, 0; }"
                     : ACC_OPS_128 : "l"(da), "l"(db), "r"(accumulate));
    else if constexpr (BN == 256)
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " ACC_TEXT_128 ", %128, %129, p, 1, 1, 0, 0; }"
                     : ACC_OPS_128 : "l"(da), "l"(db), "r"(accumulate));
    else if constexpr (BN == 128 && F16)
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %66, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " ACC_TEXT_64 ", %64, %65, p, 1, 1, 0, 0; }"
                     : ACC_OPS_64 : "l"(da), "l"(db), "r"(accumulate));
    else
        asm volatile("{ .reg .pred p; setp.ne.b32 p, %66, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ACC_TEXT_64 ", %64, %65, p, 1, 1, 0, 0; }"
                     : ACC_OPS_64 : "l"(da), "l"(db), "r"(accumulate));
}

#undef ACC_TEXT_64
#undef ACC_TEXT_128
#undef ACC8
#undef ACC_OPS_64
#undef ACC_OPS_128

// ---- clusters (split K) ----

__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// Every thread of every block of the cluster; releases this thread's earlier shared-memory writes
// to, and acquires the others' for, the accesses after it.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\n"
                 "barrier.cluster.wait.acquire;" ::: "memory");
}

// The address of the same shared-memory location in block `rank` of the cluster, and a load there.
__device__ __forceinline__ uint32_t cluster_map(uint32_t addr, uint32_t rank) {
    uint32_t r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}

__device__ __forceinline__ float cluster_load(uint32_t addr) {
    float v;
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
    return v;
}

// ---- epilogue ----

__device__ __forceinline__ void put1(float *p, float v) { *p = v; }
__device__ __forceinline__ void put1(__half *p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void put1(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void put2(float *p, float v0, float v1) { *(float2 *)p = make_float2(v0, v1); }
__device__ __forceinline__ void put2(__half *p, float v0, float v1) { *(__half2 *)p = __floats2half2_rn(v0, v1); }
__device__ __forceinline__ void put2(__nv_bfloat16 *p, float v0, float v1) {
    *(__nv_bfloat162 *)p = __floats2bfloat162_rn(v0, v1);
}

// bias[i] as f32 (bias is f32, f16 or bf16: csrc/ops/matmul.c), without to_load's full switch,
// which would be inlined 2 x BN / 8 times per output dtype.
__device__ __forceinline__ float bias_at(const MatmulArgs &a, int64_t n) {
    const int64_t i = n * a.bs0;
    if (a.bias_dt == TO_F32)
        return ((const float *)a.bias)[i];
    const unsigned short raw = ((const unsigned short *)a.bias)[i];
    return a.bias_dt == TO_F16 ? __half2float(__ushort_as_half(raw)) : __uint_as_float((uint32_t)raw << 16);
}

// With split K, block `rank` of the cluster finishes the column groups j (8 columns each) with
// owner(j) == rank: a contiguous 1/S of the tile's columns.
template <int BN, int S> __device__ __forceinline__ int owner(int j) { return j * S / (BN / 8); }

// Stores the tile at (m0, n0) from the accumulators of consumer thread `tid` (0-255): the
// m64nNk16 layout puts d[4j + 2h + e] of thread t at row 16 (t / 32) + (t % 32) / 4 + 8 h of its
// warpgroup's 64 rows and column 8 j + 2 (t % 4) + e. Pairs of columns go out as one store when
// `vec2` (out's base and row pitch allow it).
template <typename T, int BN, int S>
__device__ __forceinline__ void store_tile(const MatmulArgs &a, const float (&d)[BN / 2], int64_t m0, int64_t n0,
                                           int tid, int rank, bool vec2) {
    const int64_t row = m0 + 64 * (tid / 128) + 16 * (tid / 32 % 4) + tid % 32 / 4;
    const int64_t col = n0 + 2 * (tid % 4);
    T *out = (T *)a.out;
#pragma unroll
    for (int j = 0; j < BN / 8; j++) {
        const int64_t n = col + 8 * j;
        if ((S > 1 && owner<BN, S>(j) != rank) || n >= a.N)
            continue;
        const bool two = n + 1 < a.N;
        float b0 = 0.0f, b1 = 0.0f;
        if (a.bias) {
            b0 = bias_at(a, n);
            if (two)
                b1 = bias_at(a, n + 1);
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t m = row + 8 * h;
            if (m >= a.M)
                continue;
            float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
            if (a.bias) { // (not + 0.0f without a bias: that would turn -0 into +0)
                v0 += b0;
                v1 += b1;
            }
            T *p = out + m * a.os0 + n;
            if (vec2 && two) {
                put2(p, v0, v1);
            } else {
                put1(p, v0);
                if (two)
                    put1(p + 1, v1);
            }
        }
    }
}

// The same through shared memory and TMA stores (out 16-byte aligned with a 16-byte multiple row
// pitch): fragments written to scattered rows make every store instruction touch 8 rows' cache
// lines, while a TMA store writes whole rows of a box. Each warp owns 16 rows of the tile and two
// 2 KB boxes of 16 rows x 128 bytes (32 f32 or 64 16-bit columns) at `box` (shared address, 1024
// aligned), filled alternately: box `count` % 2 is rewritten only after the store issued from it
// two boxes ago has read it. The boxes use the 128-byte swizzle (16-byte chunk c of row r at
// chunk c ^ (r % 8)), so the 8 rows of one fragment store hit different banks; the tensor map
// unswizzles. TMA clips rows >= M and columns >= N; boxes wholly outside are skipped.
template <typename T, int BN>
__device__ __forceinline__ void store_tile_tma(const MatmulArgs &a, const float (&d)[BN / 2], const CUtensorMap *map,
                                               int m0, int n0, int warp_row, int lane, uint8_t *box, uint32_t box_s,
                                               uint32_t &count) {
    constexpr int CW = 128 / sizeof(T); // columns per box
    const int r = lane / 4, q = lane % 4;
#pragma unroll
    for (int c = 0; c < BN / CW; c++) {
        if (m0 + warp_row >= a.M || n0 + c * CW >= a.N)
            continue; // (uniform over the warp)
        if (lane == 0)
            bulk_wait_read<1>(); // (the issuing lane waits; the warp then follows it)
        __syncwarp();
        const int buf = (count & 1) * 2048;
#pragma unroll
        for (int jj = 0; jj < CW / 8; jj++) {
            const int j = c * (CW / 8) + jj;
            const int64_t n = n0 + 8 * j + 2 * q;
            float b0 = 0.0f, b1 = 0.0f;
            if (a.bias) {
                if (n < a.N)
                    b0 = bias_at(a, n);
                if (n + 1 < a.N)
                    b1 = bias_at(a, n + 1);
            }
            const int byte = (8 * jj + 2 * q) * (int)sizeof(T); // in the box row
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float v0 = d[4 * j + 2 * h], v1 = d[4 * j + 2 * h + 1];
                if (a.bias) {
                    v0 += b0;
                    v1 += b1;
                }
                // row r + 8 h, whose swizzle phase is (r + 8 h) % 8 = r
                put2((T *)(box + buf + (r + 8 * h) * 128 + ((byte / 16) ^ r) * 16 + byte % 16), v0, v1);
            }
        }
        // the generic-proxy writes above are read next by the TMA engine (the async proxy)
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        __syncwarp();
        if (lane == 0)
            tma_store(map, box_s + buf, n0 + c * CW, m0 + warp_row);
        count++;
    }
}

#endif // __CUDA_ARCH_FEAT_SM90_ALL

// ---- the kernel ----

// tmx: x as a [M, K] tensor map (box 64 x 128), tmw: w as [N, K] (box 64 x BN), both with 128-byte
// swizzle; tmo: out as [M, N] (box 128 bytes x 16 rows, 128-byte swizzle) when tma_out, else
// unused (out is stored directly, in pairs of columns when vec2). With S > 1 the grid is exactly
// tiles x S blocks, one tile per cluster (the split-K reduction reuses the stage memory, which a
// next tile's loads would overwrite).
//
// The cluster shape is an attribute of the kernel (to_launch sets no launch-time one); images for
// GPUs before sm_90, which know no clusters, get none (they are never launched).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define CLUSTER_OF(s)
#else
#define CLUSTER_OF(s) __cluster_dims__(s, 1, 1)
#endif

template <int BN, int S, bool F16>
__global__ void __launch_bounds__(THREADS, 1) CLUSTER_OF(S)
    gemm_sm90_kernel(const __grid_constant__ CUtensorMap tmx, const __grid_constant__ CUtensorMap tmw,
                     const __grid_constant__ CUtensorMap tmo, MatmulArgs a, int vec2, int tma_out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using TL = Tile<BN>;
    constexpr int STAGES = TL::STAGES;
    extern __shared__ uint8_t smem_raw[];
    // The ring starts at the first 1024-byte boundary (the swizzle pattern repeats every 1024
    // bytes and TMA and wgmma both take it from the address bits); the epilogue's boxes and the
    // mbarriers follow it.
    const uint32_t ring = (smem_addr(smem_raw) + 1023) & ~1023u;
    const uint32_t epi = ring + STAGES * TL::STAGE_BYTES; // 4 KB per consumer warp
    const uint32_t full0 = epi + EPI_BYTES;               // full[s] at full0 + 8 s
    const uint32_t empty0 = full0 + 8 * STAGES;           // empty[s] at empty0 + 8 s
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(full0 + 8 * s, 1);                // the producer's arrive_expect_tx (+ bytes)
            mbar_init(empty0 + 8 * s, CONSUMER_WARPS); // one arrival per consumer warp
        }
        // make the initialised barriers visible to the TMA engine (the async proxy)
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    if (warp == CONSUMER_WARPS && lane == 0) { // the tensor maps are kernel parameters: no wait needed
        asm volatile("prefetch.tensormap [%0];" ::"l"((uint64_t)&tmx) : "memory");
        asm volatile("prefetch.tensormap [%0];" ::"l"((uint64_t)&tmw) : "memory");
        if (tma_out)
            asm volatile("prefetch.tensormap [%0];" ::"l"((uint64_t)&tmo) : "memory");
    }
    __syncthreads();
    to_pdl_wait(); // x (and out) may belong to the kernel before this one

    const int num_m = (int)((a.M + BM - 1) / BM), num_n = (int)((a.N + BN - 1) / BN);
    const int tiles = num_m * num_n;
    const int kblocks = (int)((a.K + BK - 1) / BK);
    const int rank = S > 1 ? (int)cluster_rank() : 0;
    // this block's k steps (the host makes S <= kblocks, so none is empty)
    const int kb0 = kblocks * rank / S, kb1 = kblocks * (rank + 1) / S;
    const int first = blockIdx.x / S, step = gridDim.x / S;

    if (warp >= CONSUMER_WARPS) {
        // ---- producer warpgroup: one thread issues every load; the registers go to the consumers
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(PRODUCER_REGS));
        if (warp == CONSUMER_WARPS && lane == 0) {
            int stage = 0;
            uint32_t phase = 0;
            for (int t = first; t < tiles; t += step) {
                int mt, nt;
                tile_coords(t, num_m, num_n, mt, nt);
                for (int kb = kb0; kb < kb1; kb++) {
                    mbar_wait(empty0 + 8 * stage, phase ^ 1); // the consumers are done with it
                    const uint32_t full = full0 + 8 * stage, dst = ring + stage * TL::STAGE_BYTES;
                    // full box bytes even where TMA zero-fills past M, N or K
                    mbar_arrive_expect_tx(full, TL::STAGE_BYTES);
                    tma_load(dst, &tmx, full, kb * BK, mt * BM);
                    tma_load(dst + TL::A_BYTES, &tmw, full, kb * BK, nt * BN);
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                }
            }
        }
        __syncwarp();
        to_pdl_trigger();
        if constexpr (S > 1) { // the consumers' two cluster barriers count every thread
            cluster_sync();
            cluster_sync();
        }
    } else {
        // ---- consumers: warpgroup wg computes rows 64 wg .. 64 wg + 63 of each tile ----
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(CONSUMER_REGS));
        const int tid = threadIdx.x, wg = warp / 4;
        float d[BN / 2];
        int stage = 0;
        uint32_t phase = 0, boxes = 0;
        for (int t = first; t < tiles; t += step) {
            int mt, nt;
            tile_coords(t, num_m, num_n, mt, nt);
            int prev = 0;
            for (int kb = kb0; kb < kb1; kb++) {
                mbar_wait(full0 + 8 * stage, phase); // the TMA bytes of this stage have landed
                const uint32_t st = ring + stage * TL::STAGE_BYTES;
                const uint64_t da = sw128_desc(st + wg * 64 * 128), db = sw128_desc(st + TL::A_BYTES);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 16; kk++)
                    wgmma<BN, F16>(d, da + 2 * kk, db + 2 * kk, kb > kb0 || kk > 0);
                wgmma_commit();
                // keep this step's group in flight; the previous one has finished reading its stage
                wgmma_wait<1>();
                if (kb > kb0 && lane == 0)
                    mbar_arrive(empty0 + 8 * prev);
                prev = stage;
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
            }
            wgmma_wait<0>();
            fence_regs(d);
            if (lane == 0)
                mbar_arrive(empty0 + 8 * prev);
            if (t + step >= tiles)
                to_pdl_trigger(); // this block's last tile: only the stores are left

            if constexpr (S > 1) {
                // Both warpgroups have finished reading the stages (and every TMA write into them
                // has completed: each was waited for), so the ring holds the partial sums now:
                // d[i] of thread tid at float i * 256 + tid.
                asm volatile("bar.sync 1, 256;" ::: "memory");
                float *part = (float *)(smem_raw + (ring - smem_addr(smem_raw)));
#pragma unroll
                for (int j = 0; j < BN / 8; j++)
                    if (owner<BN, S>(j) != rank)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            part[(4 * j + e) * 256 + tid] = d[4 * j + e];
                cluster_sync();
                for (int q = 1; q < S; q++) {
                    const uint32_t other = cluster_map(ring, (rank + q) % S);
#pragma unroll
                    for (int j = 0; j < BN / 8; j++)
                        if (owner<BN, S>(j) == rank)
#pragma unroll
                            for (int e = 0; e < 4; e++)
                                d[4 * j + e] += cluster_load(other + 4 * ((4 * j + e) * 256 + tid));
                }
                cluster_sync(); // no block leaves (freeing its shared memory) while another reads it
            }

            const int m0 = mt * BM, n0 = nt * BN;
            if (S == 1 && tma_out) { // (a split's blocks each own too few columns for whole boxes)
                const int warp_row = 64 * wg + 16 * (warp % 4);
                uint8_t *box = smem_raw + (epi - smem_addr(smem_raw)) + 4096 * warp;
                const uint32_t box_s = epi + 4096 * warp;
                switch (a.out_dt) {
                case TO_F32: store_tile_tma<float, BN>(a, d, &tmo, m0, n0, warp_row, lane, box, box_s, boxes); break;
                case TO_F16: store_tile_tma<__half, BN>(a, d, &tmo, m0, n0, warp_row, lane, box, box_s, boxes); break;
                default: store_tile_tma<__nv_bfloat16, BN>(a, d, &tmo, m0, n0, warp_row, lane, box, box_s, boxes); break;
                }
            } else {
                switch (a.out_dt) {
                case TO_F32: store_tile<float, BN, S>(a, d, m0, n0, tid, rank, vec2); break;
                case TO_F16: store_tile<__half, BN, S>(a, d, m0, n0, tid, rank, vec2); break;
                default: store_tile<__nv_bfloat16, BN, S>(a, d, m0, n0, tid, rank, vec2); break;
                }
            }
        }
        if (tma_out && lane == 0)
            bulk_wait<0>(); // the stores are done (and done reading this block's shared memory)
    }
#elif defined(__CUDA_ARCH__)
    // Only the sm_90a image does anything; the host never launches another (it checks for a 9.x
    // GPU and a build with sm_90a), so reaching this is a build mistake: fail loudly.
    __trap();
#endif
}

// ---- host side ----

// SMs of GPU `dev` if it is a compute capability 9.x part with enough shared memory per block
// for this kernel, else 0. Asked once per GPU.
int hopper_sms(int dev) {
    static std::atomic<int> known[64]; // 0: not asked yet, -1: no, > 0: the SM count
    if (dev < 0 || dev >= 64)
        return 0;
    int v = known[dev].load(std::memory_order_relaxed);
    if (v == 0) {
        int major = 0, sms = 0, smem = 0;
        bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
                  cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess;
        if (!ok)
            cudaGetLastError(); // not a launch error for the caller to find
        v = ok && major == 9 && sms > 0 && smem >= Tile<256>::SMEM_BYTES && smem >= Tile<128>::SMEM_BYTES ? sms : -1;
        known[dev].store(v, std::memory_order_relaxed);
    }
    return v > 0 ? v : 0;
}

// cuTensorMapEncodeTiled from the driver, through the runtime (so nothing links libcuda), or NULL.
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
    static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void *p = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) !=
                cudaSuccess ||
            q != cudaDriverEntryPointSuccess) {
            cudaGetLastError();
            p = nullptr;
        }
        return (PFN_cuTensorMapEncodeTiled_v12000)p;
    }();
    return fn;
}

// A [rows, cols] matrix of dtype dt, rows `pitch` bytes apart, moved in boxes of 128 bytes of
// columns x box_rows rows with 128-byte swizzle; out-of-range elements read as zero (and are not
// written by stores).
bool make_map(CUtensorMap *map, int dt, const void *base, int64_t rows, int64_t cols, int64_t pitch, int box_rows) {
    const CUtensorMapDataType type = dt == TO_F32   ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                     : dt == TO_F16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                    : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)pitch};
    cuuint32_t box[2] = {(cuuint32_t)(dt == TO_F32 ? 32 : 64), (cuuint32_t)box_rows};
    cuuint32_t elem_strides[2] = {1, 1};
    return encode_fn()(map, type, 2, const_cast<void *>(base), dims, strides, box, elem_strides,
                       CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                       CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

struct Plan {
    int bn, split;
};

// Tile width and split: the least estimated time, in units of one 128 x 128 x 64 step at full
// rate, of waves x (steps per tile x cost per step + a fixed cost for the pipeline fill and the
// epilogue). 256-wide tiles do more per byte of shared memory read (1.15 -> 1.0 per 128 columns)
// but half as many of them may leave SMs idle; splitting K over S blocks (one wave of 128-wide
// tiles only) shortens each tile's run when the tiles alone cannot fill the GPU. The constants
// are estimates, not measurements: INFERENCE_PIO_GEMM_SM90=BN,S overrides the choice (tuning,
// tests; BN,S,0 also stores out directly instead of through TMA), INFERENCE_PIO_GEMM_SM90=0 turns
// this GEMM off.
Plan choose_plan(int64_t M, int64_t N, int64_t K, int sms) {
    const int64_t kb = (K + BK - 1) / BK, num_m = (M + BM - 1) / BM;
    const int64_t t256 = num_m * ((N + 255) / 256), t128 = num_m * ((N + 127) / 128);
    auto waves = [&](int64_t blocks) { return (double)((blocks + sms - 1) / sms); };
    Plan best = {256, 1};
    double cost = waves(t256) * (kb * 2.0 + 4.0);
    double c = waves(t128) * (kb * 1.15 + 3.0);
    if (c < cost)
        best = {128, 1}, cost = c;
    for (int s = 2; s <= 8; s *= 2) {
        if (s > kb || t128 * s > sms)
            break;
        c = (double)((kb + s - 1) / s) * 1.15 + 4.0; // + the cluster's reduction
        if (c < cost)
            best = {128, s}, cost = c;
    }
    return best;
}

// The tensor maps and flags of one product.
struct Maps {
    CUtensorMap x, w, out;
    int vec2, tma_out;
};

template <int BN, int S, bool F16>
cudaError_t launch(const Maps &m, const MatmulArgs &a, int blocks, int dev, cudaStream_t stream) {
    auto kernel = gemm_sm90_kernel<BN, S, F16>;
    static std::atomic<uint64_t> ready{0}; // bit d: the shared-memory limit is raised on GPU d
    if (!(ready.load(std::memory_order_relaxed) >> dev & 1)) {
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile<BN>::SMEM_BYTES);
        if (err != cudaSuccess)
            return err;
        ready.fetch_or(1ull << dev, std::memory_order_relaxed);
    }
    return to_launch(kernel, dim3((unsigned)blocks), dim3(THREADS), (size_t)Tile<BN>::SMEM_BYTES, stream, m.x, m.w,
                     m.out, a, m.vec2, m.tma_out);
}

template <bool F16>
cudaError_t launch_plan(Plan p, const Maps &m, const MatmulArgs &a, int blocks, int dev, cudaStream_t stream) {
    if (p.bn == 256)
        return launch<256, 1, F16>(m, a, blocks, dev, stream);
    switch (p.split) {
    case 2: return launch<128, 2, F16>(m, a, blocks, dev, stream);
    case 4: return launch<128, 4, F16>(m, a, blocks, dev, stream);
    case 8: return launch<128, 8, F16>(m, a, blocks, dev, stream);
    default: return launch<128, 1, F16>(m, a, blocks, dev, stream);
    }
}

} // namespace

int to_cuda_gemm_sm90(const MatmulArgs &a, int device_index, cudaStream_t stream) {
    const char *env = getenv("INFERENCE_PIO_GEMM_SM90");
    if (env && strcmp(env, "0") == 0)
        return 0;
    const bool f16 = a.x_dt == TO_F16;
    if (a.w_quant || a.x_dt != a.w_dt || (a.x_dt != TO_BF16 && !f16))
        return 0;
    auto is_float = [](int dt) { return dt == TO_F32 || dt == TO_F16 || dt == TO_BF16; };
    if (!is_float(a.out_dt) || (a.bias && !is_float(a.bias_dt)))
        return 0;
    // (sizes below 2^30: TMA coordinates and tile counts are 32-bit)
    if (a.M < 1 || a.N < 1 || a.K < 8 || a.K % 8 != 0 || a.xs1 != 1 || a.M >= (1 << 30) || a.N >= (1 << 30) ||
        a.K >= (1 << 30))
        return 0;
    // TMA: 16-byte aligned bases and row pitches, rows that do not overlap (the pitch of a single
    // row is never followed, so any valid value stands in for it)
    const int64_t x_pitch = a.M > 1 ? a.xs0 * 2 : a.K * 2, w_pitch = a.N > 1 ? a.w_row_bytes : a.K * 2;
    if ((uintptr_t)a.x % 16 != 0 || (uintptr_t)a.w % 16 != 0 || x_pitch % 16 != 0 || w_pitch % 16 != 0 ||
        x_pitch < a.K * 2 || w_pitch < a.K * 2)
        return 0;
    const int sms = hopper_sms(device_index);
    if (sms == 0 || !encode_fn())
        return 0;

    const int64_t kblocks = (a.K + BK - 1) / BK;
    Plan p = choose_plan(a.M, a.N, a.K, sms);
    int bn = 0, split = 0, tma_store = 1;
    if (env && sscanf(env, "%d,%d,%d", &bn, &split, &tma_store) >= 2 && (bn == 128 || bn == 256) &&
        (split == 1 || split == 2 || split == 4 || split == 8) && (bn == 128 || split == 1)) {
        p = {bn, split};
        while (p.split > kblocks) // every block of a cluster needs a k step
            p.split /= 2;
    }

    Maps m;
    memset(&m, 0, sizeof m);
    if (!make_map(&m.x, a.x_dt, a.x, a.M, a.K, x_pitch, BM) || !make_map(&m.w, a.w_dt, a.w, a.N, a.K, w_pitch, p.bn))
        return 0;
    // out through TMA stores when its base and row pitch allow (and the tile is not split)
    const int out_bytes = a.out_dt == TO_F32 ? 4 : 2;
    const int64_t out_pitch = a.M > 1 ? a.os0 * out_bytes : a.N * out_bytes;
    m.tma_out = tma_store && p.split == 1 && (uintptr_t)a.out % 16 == 0 && out_pitch % 16 == 0 &&
                out_pitch >= a.N * out_bytes && make_map(&m.out, a.out_dt, a.out, a.M, a.N, out_pitch, 16);
    m.vec2 = (uintptr_t)a.out % (2 * out_bytes) == 0 && (a.M == 1 || a.os0 % 2 == 0);

    const int64_t tiles = ((a.M + BM - 1) / BM) * ((a.N + p.bn - 1) / p.bn);
    if (tiles * p.split > INT_MAX)
        return 0;
    // persistent blocks without a split; with one, a cluster per tile
    const int blocks = (int)(p.split > 1 ? tiles * p.split : (tiles < sms ? tiles : sms));

    cudaError_t err = f16 ? launch_plan<true>(p, m, a, blocks, device_index, stream)
                          : launch_plan<false>(p, m, a, blocks, device_index, stream);
    if (err == cudaErrorInvalidDeviceFunction || err == cudaErrorNoKernelImageForDevice) {
        cudaGetLastError(); // no image for this GPU after all: let the caller's kernels run
        return 0;
    }
    return 1; // any other launch error stays for to_cuda_check_launch
}

#endif // TO_HAVE_SM90A
