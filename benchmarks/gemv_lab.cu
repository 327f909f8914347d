// gemv_lab.cu - decode GEMV variants measured on a layer chain (a development tool, not part of
// the library). Build and run on a GPU:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/gemv_lab benchmarks/gemv_lab.cu && /tmp/gemv_lab
// For each Qwen3 shape set (0.6B: 28 layers, 4B: 36 layers) the four decode products of every
// layer (qkv with the input norm, o_proj added into the residual, gate_up with the norm, down
// added) are captured in one CUDA graph over distinct weights (so they stream from DRAM as in the
// model), and the replay time per layer is reported for each kernel variant, with and without an
// L2 prefetch node per layer.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <vector>
#include <math.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

struct Args {
    const char *w;
    int64_t row_bytes;
    const float *x;
    const __nv_bfloat16 *g; // norm weight or NULL
    float *out;
    int N, K;
    float eps;
    int add; // out += product
};

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" :::); }
__device__ __forceinline__ void prefetch_l2(const void *p, uint32_t bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}
__device__ __forceinline__ float wsum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ void unpack(uint4 raw, float v[8]) {
    const __nv_bfloat16 *t = (const __nv_bfloat16 *)&raw;
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = __bfloat162float(t[i]);
}

// The warps' sums reduced (KSPLIT warps per row group meeting in shared memory), normalised, and
// stored (or added) by lane 0 of the group's first warp.
template <int R, int KSPLIT, bool NORM>
__device__ __forceinline__ void finish_rows(const Args &a, float (&acc)[R], float ss, float (*part_acc)[R + 1],
                                            int warp, int lane, int64_t n0, const bool (&ok)[R]) {
    const int part = warp % KSPLIT;
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = wsum(acc[r]);
    if (NORM) ss = wsum(ss);
    if (KSPLIT > 1) {
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < R; r++) part_acc[warp][r] = acc[r];
            part_acc[warp][R] = ss;
        }
        __syncthreads();
        if (part != 0) return;
#pragma unroll
        for (int r = 0; r < R; r++) {
            acc[r] = 0.0f;
            for (int p = 0; p < KSPLIT; p++) acc[r] += part_acc[warp + p][r];
        }
        ss = 0.0f;
        for (int p = 0; p < KSPLIT; p++) ss += part_acc[warp + p][R];
    }
    if (lane == 0 && part == 0) {
        float rinv = NORM ? (float)(1.0 / sqrt((double)ss / a.K + a.eps)) : 1.0f;
#pragma unroll
        for (int r = 0; r < R; r++)
            if (ok[r]) {
                float v = acc[r] * rinv;
                a.out[n0 + r] = a.add ? a.out[n0 + r] + v : v;
            }
    }
}

// R weight rows per warp, G 16-byte loads per row per lane in flight, KSPLIT warps per row group.
template <int R, int G, int KSPLIT, bool NORM>
__global__ void __launch_bounds__(256) gemv_rows(Args a) {
    constexpr int WARPS = 8, UNITS = WARPS / KSPLIT;
    __shared__ float part_acc[WARPS][R + 1];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, part = warp % KSPLIT;
    int64_t n0 = ((int64_t)blockIdx.x * UNITS + warp / KSPLIT) * R;
    int nvec = a.K / 8;
    const uint4 *rows[R];
    bool ok[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        ok[r] = n0 + r < a.N;
        rows[r] = (const uint4 *)(a.w + (ok[r] ? n0 + r : 0) * a.row_bytes);
    }
    if (part == 0 && lane < R && n0 + lane < a.N)
        prefetch_l2(a.w + (n0 + lane) * a.row_bytes, (uint32_t)nvec * 16);
    pdl_wait();
    pdl_trigger();
    float acc[R], ss = 0.0f;
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;
    const int stride = 32 * KSPLIT;
    for (int j = part * 32 + lane; j < nvec; j += G * stride) {
        uint4 wv[G][R];
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int r = 0; r < R; r++)
                wv[g][r] = j + g * stride < nvec && ok[r] ? __ldg(rows[r] + j + g * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int g = 0; g < G; g++) {
            int jj = j + g * stride;
            if (jj >= nvec) break;
            const float4 *xp = (const float4 *)a.x + 2 * jj;
            float4 x0 = xp[0], x1 = xp[1];
            float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
            if constexpr (NORM) {
                float gv[8];
                unpack(__ldg((const uint4 *)a.g + jj), gv);
#pragma unroll
                for (int e = 0; e < 8; e++) { ss += xv[e] * xv[e]; xv[e] *= gv[e]; }
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                float wf[8];
                unpack(wv[g][r], wf);
#pragma unroll
                for (int e = 0; e < 8; e++) acc[r] += wf[e] * xv[e];
            }
        }
    }
    finish_rows<R, KSPLIT, NORM>(a, acc, ss, part_acc, warp, lane, n0, ok);
}


// The library's kernel before the fifth pass (x consumed four values at a time, 64-bit indices;
// BENCHMARKS.md), kept as the correctness reference and the baseline of the timings.
#define GV_GROUP 4
template <int KSPLIT, bool NORM>
__global__ void __launch_bounds__(256) gemv_base(Args a) {
    constexpr int ROWS = 8 / KSPLIT;
    __shared__ float partial[8][2];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, part = warp % KSPLIT;
    int64_t n = (int64_t)blockIdx.x * ROWS + warp / KSPLIT;
    bool active = n < a.N;
    const uint4 *wrow = (const uint4 *)(a.w + (active ? n : 0) * a.row_bytes);
    int64_t nvec = a.K / 8;
    if (active && lane == 0 && part == 0) prefetch_l2(wrow, (uint32_t)(nvec * 16));
    pdl_wait();
    pdl_trigger();
    const int64_t stride = 32 * KSPLIT, j0 = part * 32 + lane;
    auto load_group = [&](uint4 g[GV_GROUP], int64_t j) {
#pragma unroll
        for (int i = 0; i < GV_GROUP; i++)
            g[i] = active && j + i * stride < nvec ? __ldg(wrow + j + i * stride) : make_uint4(0, 0, 0, 0);
    };
    float acc = 0.0f, ss = 0.0f;
    uint4 cur[GV_GROUP], nxt[GV_GROUP];
    load_group(cur, j0);
    for (int64_t j = j0; j < nvec; j += GV_GROUP * stride) {
        load_group(nxt, j + GV_GROUP * stride);
#pragma unroll
        for (int i = 0; i < GV_GROUP; i++) {
            int64_t k = (j + i * stride) * 8;
            if (k >= a.K) break;
            float wv[8], gv[8];
            unpack(cur[i], wv);
            if constexpr (NORM) unpack(__ldg((const uint4 *)a.g + k / 8), gv);
            const float4 *xr = (const float4 *)(a.x + k);
#pragma unroll
            for (int q = 0; q < 2; q++) {
                float4 x4 = xr[q];
                float xv[4] = {x4.x, x4.y, x4.z, x4.w};
                if constexpr (NORM) {
#pragma unroll
                    for (int e = 0; e < 4; e++) { ss += xv[e] * xv[e]; xv[e] *= gv[4 * q + e]; }
                }
                acc += wv[4 * q] * xv[0] + wv[4 * q + 1] * xv[1] + wv[4 * q + 2] * xv[2] + wv[4 * q + 3] * xv[3];
            }
        }
#pragma unroll
        for (int i = 0; i < GV_GROUP; i++) cur[i] = nxt[i];
    }
    acc = wsum(acc);
    if (NORM) ss = wsum(ss);
    if (KSPLIT > 1) {
        if (lane == 0) partial[warp][0] = acc, partial[warp][1] = ss;
        __syncthreads();
        if (part == 0 && lane == 0) {
            acc = ss = 0.0f;
            for (int p = 0; p < KSPLIT; p++) acc += partial[warp + p][0], ss += partial[warp + p][1];
        }
    }
    if (active && part == 0 && lane == 0) {
        float v = NORM ? acc * (float)(1.0 / sqrt((double)ss / a.K + a.eps)) : acc;
        a.out[n] = a.add ? a.out[n] + v : v;
    }
}


// ---- TMA-fed GEMV: the block's rows are one contiguous byte range, streamed into a ring of
// shared-memory stages by a producer warp with 1D bulk copies (issued before the PDL wait: the
// weights do not depend on earlier kernels); 8 consumer warps each take a contiguous eighth of a
// stage (whole 512-byte pieces of one row: K % 256 == 0), x (times g) staged once in shared f32.
__device__ __forceinline__ uint32_t saddr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mb_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mb_expect(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mb_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mb_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{ .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}
__device__ __forceinline__ void bulk_load(uint32_t dst, const void *src, uint32_t bytes, uint32_t bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, 256;" ::: "memory"); }

constexpr int TMA_CONSUMERS = 8;

template <int NSTAGE, int STAGE, bool NORM>
__global__ void __launch_bounds__(32 * (TMA_CONSUMERS + 1), 1) gemv_tma(Args a) {
    extern __shared__ __align__(128) char smem[];
    char *stages = smem;                                          // NSTAGE x STAGE bytes
    uint64_t *bars = (uint64_t *)(smem + NSTAGE * STAGE);          // full[NSTAGE], empty[NSTAGE]
    float *red = (float *)(bars + 2 * NSTAGE);                    // 8 partial sums of squares
    float *xs = red + 8;                                          // K floats
    float *rowacc = xs + a.K;                                     // the block's rows
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int64_t r0 = (int64_t)blockIdx.x * a.N / gridDim.x, r1 = (int64_t)(blockIdx.x + 1) * a.N / gridDim.x;
    const int64_t total = (r1 - r0) * a.row_bytes;
    const int nchunks = (int)((total + STAGE - 1) / STAGE);
    const char *src = a.w + r0 * a.row_bytes;
    if (tid == 0) {
        for (int s = 0; s < NSTAGE; s++) {
            mb_init(saddr(bars + s), 1);
            mb_init(saddr(bars + NSTAGE + s), TMA_CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (warp == TMA_CONSUMERS) { // the producer
        if (lane == 0)
            for (int c = 0; c < nchunks; c++) {
                int s = c % NSTAGE;
                mb_wait(saddr(bars + NSTAGE + s), ((c / NSTAGE) & 1) ^ 1);
                uint32_t bytes = (uint32_t)(total - (int64_t)c * STAGE < STAGE ? total - (int64_t)c * STAGE : STAGE);
                mb_expect(saddr(bars + s), bytes);
                bulk_load(saddr(stages + s * STAGE), src + (int64_t)c * STAGE, bytes, saddr(bars + s));
            }
        pdl_wait();
        pdl_trigger();
        return;
    }
    pdl_wait();
    pdl_trigger();
    float ss = 0.0f;
    for (int k = tid * 4; k < a.K; k += 256 * 4) {
        float4 xv = *(const float4 *)(a.x + k);
        if (NORM) {
            ss += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
            const __nv_bfloat16 *g = a.g + k;
            xv.x *= __bfloat162float(g[0]), xv.y *= __bfloat162float(g[1]), xv.z *= __bfloat162float(g[2]), xv.w *= __bfloat162float(g[3]);
        }
        *(float4 *)(xs + k) = xv;
    }
    for (int r = tid; r < r1 - r0; r += 256) rowacc[r] = 0.0f;
    if (NORM) {
        ss = wsum(ss);
        if (lane == 0) red[warp] = ss;
    }
    consumers_sync();
    const int rvec = (int)(a.row_bytes / 16);
    constexpr int SV = STAGE / 16, WV = SV / TMA_CONSUMERS; // vectors per stage, per warp
    int cur = -1;
    float acc = 0.0f;
    for (int c = 0; c < nchunks; c++) {
        int s = c % NSTAGE;
        mb_wait(saddr(bars + s), (c / NSTAGE) & 1);
        const int64_t bytes = total - (int64_t)c * STAGE < STAGE ? total - (int64_t)c * STAGE : STAGE;
        const int nv = (int)(bytes / 16);
        const uint4 *st = (const uint4 *)(stages + s * STAGE);
#pragma unroll
        for (int j = 0; j < WV / 32; j++) {
            int i = warp * WV + j * 32; // warp-uniform piece of 32 vectors
            if (i >= nv) break;
            int64_t v = (int64_t)c * SV + i;
            int row = (int)(v / rvec), kk = (int)(v % rvec) * 8 + lane * 8;
            if (row != cur) {
                if (cur >= 0) {
                    float t = wsum(acc);
                    if (lane == 0) atomicAdd(rowacc + cur, t);
                }
                cur = row;
                acc = 0.0f;
            }
            float wf[8];
            unpack(st[i + lane], wf);
            float4 x0 = *(const float4 *)(xs + kk), x1 = *(const float4 *)(xs + kk + 4);
            acc += wf[0] * x0.x + wf[1] * x0.y + wf[2] * x0.z + wf[3] * x0.w + wf[4] * x1.x + wf[5] * x1.y + wf[6] * x1.z + wf[7] * x1.w;
        }
        __syncwarp();
        if (lane == 0) mb_arrive(saddr(bars + NSTAGE + s));
    }
    if (cur >= 0) {
        float t = wsum(acc);
        if (lane == 0) atomicAdd(rowacc + cur, t);
    }
    consumers_sync();
    float rinv = 1.0f;
    if (NORM) {
        float t = 0.0f;
        for (int i = 0; i < 8; i++) t += red[i];
        rinv = (float)(1.0 / sqrt((double)t / a.K + a.eps));
    }
    for (int r = tid; r < r1 - r0; r += 256) {
        float v = rowacc[r] * rinv;
        a.out[r0 + r] = a.add ? a.out[r0 + r] + v : v;
    }
}

// Prefetches up to four byte ranges into L2: 32 KB per request, spread over the grid.
struct Ranges { const char *p[4]; int64_t bytes[4]; };
__global__ void prefetch_kernel(Ranges r) {
    pdl_wait();
    pdl_trigger();
    const int64_t chunk = 32768;
    int64_t nthreads = (int64_t)gridDim.x * blockDim.x, t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (int s = 0; s < 4; s++) {
        if (!r.p[s]) continue;
        for (int64_t off = t * chunk; off < r.bytes[s]; off += nthreads * chunk)
            prefetch_l2(r.p[s] + off, (uint32_t)(r.bytes[s] - off < chunk ? r.bytes[s] - off : chunk));
    }
}

static bool g_pdl = true;

template <typename... P>
static void launch(void (*k)(P...), int grid, int block, cudaStream_t s, Args a) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(block);
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = g_pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, k, a));
}

static int g_sms = 132;

// Variant id: 0 = base; otherwise R, G; ksplit chosen for >= target blocks.
struct Variant { const char *name; int kind, R, G, target; };

template <int R, int G, bool NORM>
static void launch_rows(const Args &a, int target, cudaStream_t s) {
    int units = (a.N + R - 1) / R, ks = 1;
    while (ks < 8 && (units * ks + 7) / 8 < target * g_sms && a.K / 8 >= 32 * G * ks) ks *= 2;
    int grid = (units * ks + 7) / 8;
    switch (ks) {
    case 1: launch(gemv_rows<R, G, 1, NORM>, grid, 256, s, a); break;
    case 2: launch(gemv_rows<R, G, 2, NORM>, grid, 256, s, a); break;
    case 4: launch(gemv_rows<R, G, 4, NORM>, grid, 256, s, a); break;
    default: launch(gemv_rows<R, G, 8, NORM>, grid, 256, s, a); break;
    }
}


template <int NSTAGE, int STAGE, bool NORM>
static void launch_tma(const Args &a, int per_sm, cudaStream_t s) {
    int grid = per_sm * g_sms;
    if (grid > a.N) grid = a.N;
    int rows_max = (a.N + grid - 1) / grid;
    size_t smem = (size_t)NSTAGE * STAGE + 16 * NSTAGE + 32 + (size_t)a.K * 4 + (size_t)rows_max * 4;
    static bool set = false;
    if (!set) {
        CK(cudaFuncSetAttribute(gemv_tma<NSTAGE, STAGE, NORM>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
        set = true;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(32 * (TMA_CONSUMERS + 1));
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = g_pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, gemv_tma<NSTAGE, STAGE, NORM>, a));
}

template <bool NORM>
static void launch_base(const Args &a, cudaStream_t s) {
    int ks = 1, want = 2 * g_sms;
    while (ks < 8 && (a.N * ks + 7) / 8 < want && a.K / 8 >= 32 * 2 * ks) ks *= 2;
    int grid = (a.N * ks + 7) / 8;
    switch (ks) {
    case 1: launch(gemv_base<1, NORM>, grid, 256, s, a); break;
    case 2: launch(gemv_base<2, NORM>, grid, 256, s, a); break;
    case 4: launch(gemv_base<4, NORM>, grid, 256, s, a); break;
    default: launch(gemv_base<8, NORM>, grid, 256, s, a); break;
    }
}


template <bool NORM>
static void run_variant(const Variant &v, const Args &a, cudaStream_t s) {
    if (v.kind == 0) { launch_base<NORM>(a, s); return; }
    if (v.kind == 2) {
        if (v.R == 4 && v.G == 16) launch_tma<4, 16384, NORM>(a, v.target, s);
        else if (v.R == 8 && v.G == 16) launch_tma<8, 16384, NORM>(a, v.target, s);
        else if (v.R == 4 && v.G == 32) launch_tma<4, 32768, NORM>(a, v.target, s);
        else if (v.R == 6 && v.G == 8) launch_tma<6, 8192, NORM>(a, v.target, s);
        else if (v.R == 12 && v.G == 8) launch_tma<12, 8192, NORM>(a, v.target, s);
        else { printf("no tma variant\n"); exit(1); }
        return;
    }
#define RG(r, g) if (v.R == r && v.G == g) { launch_rows<r, g, NORM>(a, v.target, s); return; }
    RG(1, 4) RG(1, 8) RG(2, 2) RG(2, 4) RG(4, 1) RG(4, 2) RG(4, 4) RG(8, 1) RG(8, 2)
#undef RG
    printf("no variant %d %d\n", v.R, v.G);
    exit(1);
}

struct Shape { int N, K; bool norm; };

// The time of one replay of `graph` in microseconds (after three warm-up replays; mean of 20).
static double replay_us(cudaGraph_t graph, cudaStream_t s) {
    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 3; i++) CK(cudaGraphLaunch(exec, s));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const int reps = 20;
    CK(cudaEventRecord(e0, s));
    for (int i = 0; i < reps; i++) CK(cudaGraphLaunch(exec, s));
    CK(cudaEventRecord(e1, s));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaGraphExecDestroy(exec));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return ms * 1000.0 / reps;
}

__global__ void fill_kernel(__nv_bfloat16 *p, int64_t n, uint32_t seed) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
        p[i] = __float2bfloat16(((int)(h % 2001) - 1000) * 1e-4f);
    }
}

int main(int argc, char **argv) {
    CK(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, 0));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    struct Model { const char *name; int layers; Shape sh[4]; };
    Model models[2] = {
        {"0.6B", 28, {{4096, 1024, true}, {1024, 2048, false}, {6144, 1024, true}, {1024, 3072, false}}},
        {"4B", 36, {{6144, 2560, true}, {2560, 4096, false}, {19456, 2560, true}, {2560, 9728, false}}},
    };
    Variant variants[] = {
        {"base", 0, 1, 4, 2},
        {"R1G4 t2", 1, 1, 4, 2}, {"R1G8 t2", 1, 1, 8, 2},
        {"R2G2 t2", 1, 2, 2, 2}, {"R2G4 t2", 1, 2, 4, 2},
        {"R4G1 t2", 1, 4, 1, 2}, {"R4G2 t2", 1, 4, 2, 2}, {"R4G4 t2", 1, 4, 4, 2},
        {"R8G1 t2", 1, 8, 1, 2}, {"R8G2 t2", 1, 8, 2, 2},
        {"R2G4 t4", 1, 2, 4, 4}, {"R4G2 t4", 1, 4, 2, 4},
        {"tma4x16 1", 2, 4, 16, 1}, {"tma4x16 2", 2, 4, 16, 2}, {"tma8x16 1", 2, 8, 16, 1},
        {"tma4x32 1", 2, 4, 32, 1}, {"tma6x8 2", 2, 6, 8, 2}, {"tma12x8 1", 2, 12, 8, 1},
    };
    const int nv = sizeof variants / sizeof variants[0];
    float *x, *xbig, *outs;
    __nv_bfloat16 *g;
    CK(cudaMalloc(&x, 16 * 1024 * 4));
    CK(cudaMalloc(&xbig, 16 * 1024 * 4));
    CK(cudaMalloc(&outs, 4 * 32768 * 4));
    CK(cudaMalloc(&g, 16384 * 2));
    fill_kernel<<<64, 256>>>(g, 16384, 7);
    {
        std::vector<float> h(16 * 1024);
        for (size_t i = 0; i < h.size(); i++) h[i] = (float)((i * 37) % 101) / 101.0f - 0.5f;
        CK(cudaMemcpy(x, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(xbig, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    }
    for (auto &m : models) {
        // weights: layer l, matrix i
        std::vector<char *> w(m.layers * 4);
        double layer_bytes = 0;
        for (int i = 0; i < 4; i++) layer_bytes += (double)m.sh[i].N * m.sh[i].K * 2;
        for (int l = 0; l < m.layers; l++)
            for (int i = 0; i < 4; i++) {
                size_t bytes = (size_t)m.sh[i].N * m.sh[i].K * 2;
                CK(cudaMalloc(&w[l * 4 + i], bytes));
                fill_kernel<<<1024, 256>>>((__nv_bfloat16 *)w[l * 4 + i], bytes / 2, l * 4 + i);
            }
        CK(cudaDeviceSynchronize());
        // correctness: every variant against the base kernel, each shape of layer 0
        for (int i = 0; i < 4; i++) {
            std::vector<float> ref(m.sh[i].N), got(m.sh[i].N);
            for (int vi = 0; vi < nv; vi++) {
                Args a = {};
                a.w = w[i];
                a.row_bytes = (int64_t)m.sh[i].K * 2;
                a.x = x;
                a.g = m.sh[i].norm ? g : nullptr;
                a.out = outs + 3 * 32768;
                a.N = m.sh[i].N;
                a.K = m.sh[i].K;
                a.eps = 1e-6f;
                a.add = 0;
                if (m.sh[i].norm) run_variant<true>(variants[vi], a, s);
                else run_variant<false>(variants[vi], a, s);
                CK(cudaStreamSynchronize(s));
                CK(cudaMemcpy(vi ? got.data() : ref.data(), a.out, a.N * 4, cudaMemcpyDeviceToHost));
                if (vi) {
                    double md = 0, mr = 0;
                    for (int n = 0; n < a.N; n++) md = fmax(md, fabs(got[n] - ref[n])), mr = fmax(mr, fabs(ref[n]));
                    if (md > 1e-4 * mr + 1e-6) printf("MISMATCH %s shape %d: max diff %g (max |ref| %g)\n", variants[vi].name, i, md, mr);
                }
            }
        }
        printf("== %s: %d layers, %.1f MB of weights per layer\n", m.name, m.layers, layer_bytes / 1e6);
        for (int mode = 0; mode < 3; mode++) { // 0: chain, 1: chain + prefetch node per layer, 2: chain without PDL
            g_pdl = mode != 2;
            for (int vi = 0; vi < nv; vi++) {
                const Variant &v = variants[vi];
                cudaGraph_t graph;
                CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
                for (int l = 0; l < m.layers; l++) {
                    if (mode == 1) { // this layer's o/gate_up/down and the next layer's qkv
                        cudaLaunchConfig_t cfg = {};
                        cfg.gridDim = dim3(g_sms);
                        cfg.blockDim = dim3(32);
                        cfg.stream = s;
                        cudaLaunchAttribute attr[1];
                        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                        attr[0].val.programmaticStreamSerializationAllowed = 1;
                        cfg.attrs = attr;
                        cfg.numAttrs = 1;
                        Ranges rg = {};
                        for (int i = 1; i < 4; i++)
                            rg.p[i - 1] = w[l * 4 + i], rg.bytes[i - 1] = (int64_t)m.sh[i].N * m.sh[i].K * 2;
                        if (l + 1 < m.layers)
                            rg.p[3] = w[(l + 1) * 4], rg.bytes[3] = (int64_t)m.sh[0].N * m.sh[0].K * 2;
                        CK(cudaLaunchKernelEx(&cfg, prefetch_kernel, rg));
                    }
                    for (int i = 0; i < 4; i++) {
                        Args a = {};
                        a.w = w[l * 4 + i];
                        a.row_bytes = (int64_t)m.sh[i].K * 2;
                        a.x = i % 2 ? xbig : x;
                        a.g = m.sh[i].norm ? g : nullptr;
                        a.out = outs + i * 32768;
                        a.N = m.sh[i].N;
                        a.K = m.sh[i].K;
                        a.eps = 1e-6f;
                        a.add = i % 2;
                        if (m.sh[i].norm) run_variant<true>(v, a, s);
                        else run_variant<false>(v, a, s);
                    }
                }
                CK(cudaStreamEndCapture(s, &graph));
                double per_layer_us = replay_us(graph, s) / m.layers;
                printf("%-10s mode %d  %7.2f us/layer  %6.0f GB/s\n", v.name, mode, per_layer_us,
                       layer_bytes / (per_layer_us * 1e-6) / 1e9);
                CK(cudaGraphDestroy(graph));
            }
        }
        // each product alone, over all layers' copies (cold): us per product and GB/s
        g_pdl = true;
        for (int i = 0; i < 4; i++) {
            double bytes = (double)m.sh[i].N * m.sh[i].K * 2;
            for (int vi = 0; vi < nv; vi++) {
                const Variant &v = variants[vi];
                cudaGraph_t graph;
                CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
                for (int l = 0; l < m.layers; l++) {
                    Args a = {};
                    a.w = w[l * 4 + i];
                    a.row_bytes = (int64_t)m.sh[i].K * 2;
                    a.x = x;
                    a.g = m.sh[i].norm ? g : nullptr;
                    a.out = outs;
                    a.N = m.sh[i].N;
                    a.K = m.sh[i].K;
                    a.eps = 1e-6f;
                    a.add = i % 2;
                    if (m.sh[i].norm) run_variant<true>(v, a, s);
                    else run_variant<false>(v, a, s);
                }
                CK(cudaStreamEndCapture(s, &graph));
                double us = replay_us(graph, s) / m.layers;
                printf("  %5d x %5d%s %-10s %7.2f us  %6.0f GB/s\n", m.sh[i].N, m.sh[i].K, m.sh[i].norm ? " norm" : "     ",
                       v.name, us, bytes / (us * 1e-6) / 1e9);
                CK(cudaGraphDestroy(graph));
            }
        }
        for (char *p : w) CK(cudaFree(p));
    }
    // the device copy bandwidth, for the roofline
    {
        size_t bytes = 1ull << 30;
        char *a, *b;
        CK(cudaMalloc(&a, bytes));
        CK(cudaMalloc(&b, bytes));
        CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s));
        cudaEvent_t e0, e1;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        CK(cudaEventRecord(e0, s));
        for (int i = 0; i < 5; i++) CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s));
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        printf("device copy: %.0f GB/s (read + write)\n", 2.0 * bytes * 5 / (ms * 1e-3) / 1e9);
    }
    return 0;
}
