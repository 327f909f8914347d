// chain_lab.cu - what a kernel boundary costs a decode step, against a grid barrier inside one
// persistent kernel (a development tool, not part of the library). Build and run on a GPU:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/chain_lab benchmarks/chain_lab.cu && /tmp/chain_lab
// For each Qwen3 shape set (0.6B: 28 layers, 4B: 36 layers) the four decode products of every
// layer (qkv, o_proj, gate_up, down; bf16 weights, distinct per layer so that they stream from
// DRAM as in the model) are chained: each product reads the vector the one before wrote. The same
// warp routine (two rows per warp, four 16-byte loads per row per lane in flight, the first group
// loaded before waiting for the product before) runs in these forms (kVariants), each captured in
// a CUDA graph:
//   kernels    one kernel per product, launched early (programmatic dependent launch), as the
//              library does; also with almost no bytes (K = 64: what the boundaries alone cost),
//              with the next product's weights prefetched into the L2 (bulk or per line, before
//              or after the block's work), and with the next launch allowed later than at once;
//   per layer  one persistent kernel per layer: the four products separated by grid barriers
//              (a counter per barrier), the layers' kernels launched early;
//   one kernel every product of the model in one persistent kernel, grid barriers between them;
//   smem       one kernel per product whose blocks copy all their rows into shared memory
//              (cp.async) before the wait (0.6B only: 4B's rows do not fit).
// It prints µs per layer beside the bytes' time at the measured device copy bandwidth.
// Results: BENCHMARKS.md, CUDA thirteenth pass.
#include "lab.cuh"

#include <stdint.h>
#include <vector>

constexpr int kWarps = 8;   // per block
constexpr int kRows = 2;    // weight rows per warp
constexpr int kGroup = 4;   // 16-byte loads per row per lane in flight
constexpr int kMaxStages = 4 * 36;

struct Stage {
    const uint4 *w; // [N][K] bf16
    const float *x; // [K]
    float *y;       // [N]
    int N, K, ks;   // ks: warps sharing a row pair (split K)
};
struct Chain {
    Stage st[kMaxStages];
    int first, count;   // the stages this launch runs
    int pf;             // product kernels: L2 prefetch of the next product's weights (see main)
    int trig;           // product kernels: where the next launch is allowed (see product_kernel)
    unsigned *arrived;  // per stage: blocks done (persistent kernels), zeroed before the replay
};

// A unit is a row pair and one of ks slices of K; a tile is a block's kWarps units.
__host__ __device__ __forceinline__ int tiles_of(const Stage &s) { return (s.N / kRows * s.ks + kWarps - 1) / kWarps; }

struct Preload { uint4 w[kGroup][kRows]; };

__device__ __forceinline__ void unit_coords(const Stage &s, int tile, int warp, int64_t *n0, int *part, bool *ok) {
    const int unit = tile * kWarps + warp;
    *n0 = (int64_t)(unit / s.ks) * kRows;
    *part = unit % s.ks;
    *ok = *n0 < s.N;
}

// A group of loads: rows n0 .. n0 + kRows, columns j0 + g * stride (16-byte vectors), zeros past K
__device__ __forceinline__ void load_group(const Stage &s, int64_t n0, bool ok, int j0, int stride, Preload &p) {
    const int nvec = s.K / 8;
#pragma unroll
    for (int g = 0; g < kGroup; g++)
#pragma unroll
        for (int r = 0; r < kRows; r++) {
            const int j = j0 + g * stride;
            p.w[g][r] = ok && j < nvec ? __ldcs(s.w + (n0 + r) * nvec + j) : make_uint4(0, 0, 0, 0);
        }
}

// The first group of this warp's loads of `tile` (nothing a stage writes: may precede the wait).
__device__ __forceinline__ void preload(const Stage &s, int tile, Preload &p) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int64_t n0;
    int part;
    bool ok;
    unit_coords(s, tile, warp, &n0, &part, &ok);
    load_group(s, n0, ok, part * 32 + lane, 32 * s.ks, p);
}

// The tile's products, from its preloaded first group; y written by the first warp of each unit.
__device__ __forceinline__ void run_tile(const Stage &s, int tile, Preload &p, float (*sPart)[kRows], bool trigger_after_loads = false) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int64_t n0;
    int part;
    bool ok;
    unit_coords(s, tile, warp, &n0, &part, &ok);
    const int nvec = s.K / 8, stride = 32 * s.ks;
    float acc[kRows] = {};
    for (int j0 = part * 32 + lane; j0 < nvec; j0 += kGroup * stride) {
        if (j0 != part * 32 + lane) // later groups: loaded here
            load_group(s, n0, ok, j0, stride, p);
#pragma unroll
        for (int g = 0; g < kGroup; g++) {
            const int j = j0 + g * stride;
            if (j < nvec)
#pragma unroll
                for (int r = 0; r < kRows; r++)
                    acc[r] += dot8(p.w[g][r], s.x + 8 * j);
        }
    }
    if (trigger_after_loads)
        pdl_trigger();
#pragma unroll
    for (int r = 0; r < kRows; r++)
        acc[r] = wsum(acc[r]);
    if (s.ks > 1) {
        __syncthreads();
        if (lane == 0)
#pragma unroll
            for (int r = 0; r < kRows; r++)
                sPart[warp][r] = acc[r];
        __syncthreads();
        if (part == 0)
#pragma unroll
            for (int r = 0; r < kRows; r++) {
                float t = 0.0f;
                for (int q = 0; q < s.ks; q++)
                    t += sPart[warp + q][r];
                acc[r] = t;
            }
    }
    if (ok && part == 0 && lane == 0)
#pragma unroll
        for (int r = 0; r < kRows; r++)
            s.y[n0 + r] = acc[r];
}

// This block's share of the next product's weights into the L2: one bulk prefetch per 16 KB
// (bulk), or one prefetch.global.L2 per 128-byte line (lines).
__device__ void prefetch_next(const Chain &c, bool bulk) {
    if (c.first + 1 >= kMaxStages || !c.st[c.first + 1].w)
        return;
    const Stage &n = c.st[c.first + 1];
    const int64_t bytes = (int64_t)n.N * n.K * 2, share = (bytes / gridDim.x + 127) / 128 * 128;
    const char *base = (const char *)n.w + share * blockIdx.x;
    const int64_t len = share * blockIdx.x + share <= bytes ? share : bytes - share * blockIdx.x;
    if (len <= 0)
        return;
    if (bulk) {
        for (int64_t o = threadIdx.x * 16384; o < len; o += blockDim.x * 16384) {
            const uint32_t b = (uint32_t)(len - o < 16384 ? len - o : 16384);
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(base + o), "r"(b) : "memory");
        }
    } else {
        for (int64_t o = threadIdx.x * 128; o < len; o += blockDim.x * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(base + o));
    }
}

// One product per launch (grid: its tiles). pf: 0 none; 1, 2 the next product's weights
// prefetched into the L2 after this block's work (bulk, lines); 3, 4 before it, after the wait.
// trig: the next launch allowed 0 at once; 1 after the wait; 2 once the block's weight loads are
// in (before its sums); 3 never (when the grid completes).
__global__ void __launch_bounds__(32 * kWarps) product_kernel(const __grid_constant__ Chain c) {
    __shared__ float sPart[kWarps][kRows];
    if (c.trig == 0)
        pdl_trigger();
    const Stage &s = c.st[c.first];
    Preload p;
    preload(s, blockIdx.x, p);
    pdl_wait();
    if (c.trig == 1)
        pdl_trigger();
    if (c.pf >= 3)
        prefetch_next(c, c.pf == 3);
    run_tile(s, blockIdx.x, p, sPart, c.trig == 2);
    if (c.pf == 1 || c.pf == 2)
        prefetch_next(c, c.pf == 1);
}

// Stages first .. first + count in one launch; the blocks loop over each stage's tiles, and wait
// at a grid barrier (the stage's counter) before reading the stage's x. A stage's first tile's
// loads are issued before its barrier.
__global__ void __launch_bounds__(32 * kWarps, 2) persistent_kernel(const __grid_constant__ Chain c) {
    __shared__ float sPart[kWarps][kRows];
    pdl_trigger();
    Preload p;
    for (int i = c.first; i < c.first + c.count; i++) {
        const Stage &s = c.st[i];
        const int tiles = tiles_of(s);
        if ((int)blockIdx.x < tiles)
            preload(s, blockIdx.x, p);
        if (i == c.first) {
            pdl_wait();
        } else { // every block of the grid has written stage i - 1
            if (threadIdx.x == 0) {
                const unsigned *ctr = c.arrived + i - 1;
                unsigned seen;
                do
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(ctr) : "memory");
                while (seen < gridDim.x);
            }
            __syncthreads();
        }
        for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
            if (t != (int)blockIdx.x)
                preload(s, t, p);
            run_tile(s, t, p, sPart);
        }
        if (i + 1 < c.first + c.count) {
            __syncthreads(); // the block's stores, before its arrival
            if (threadIdx.x == 0)
                asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c.arrived + i) : "memory");
        }
    }
}

// One product per launch, its weights preloaded into shared memory: each block copies its rows
// (a contiguous range) with 16-byte cp.async before the wait, then stages x in shared memory
// and each warp takes rows r = warp, warp + 8, ... (all of K: lanes over 16-byte columns).
__device__ __forceinline__ int rows_per_block(const Stage &s) { return (s.N + gridDim.x - 1) / gridDim.x; }

__global__ void __launch_bounds__(32 * kWarps) smem_kernel(const __grid_constant__ Chain c) {
    extern __shared__ uint4 sW[]; // [rows][K / 8], then x [K] floats
    pdl_trigger();
    const Stage &s = c.st[c.first];
    const int nvec = s.K / 8, rpb = rows_per_block(s);
    const int r0 = blockIdx.x * rpb, r1 = r0 + rpb < s.N ? r0 + rpb : s.N;
    const int total = r1 > r0 ? (r1 - r0) * nvec : 0;
    const uint4 *src = s.w + (int64_t)r0 * nvec;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const uint32_t dst = (uint32_t)__cvta_generic_to_shared(sW + i);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src + i) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    float *sX = (float *)(sW + rpb * nvec);
    pdl_wait();
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const float4 *xp = (const float4 *)s.x + 2 * i;
        *(float4 *)(sX + 8 * i) = xp[0];
        *(float4 *)(sX + 8 * i + 4) = xp[1];
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = r0 + warp; r < r1; r += 2 * kWarps) { // two rows per warp at a time
        const bool two = r + kWarps < r1;
        float a0 = 0.0f, a1 = 0.0f;
        const uint4 *w0 = sW + (r - r0) * nvec, *w1 = sW + (two ? r + kWarps - r0 : r - r0) * nvec;
        for (int j = lane; j < nvec; j += 32) {
            a0 += dot8(w0[j], sX + 8 * j);
            a1 += dot8(w1[j], sX + 8 * j);
        }
        a0 = wsum(a0);
        a1 = wsum(a1);
        if (lane == 0) {
            s.y[r] = a0;
            if (two)
                s.y[r + kWarps] = a1;
        }
    }
}

// One product per launch over a grid of a few blocks per multiprocessor (one wave, no partial
// last wave): the (row pair, 256-column chunk) items of the product are split evenly over all
// warps, each warp walking its contiguous range with four items' loads in flight (the first four
// before the wait). A row pair the warp covers whole is stored; one shared with a neighbouring warp
// is added in with atomicAdd (y zeroed before the replay: a lab shortcut, not deterministic).
__global__ void __launch_bounds__(32 * kWarps, 2) even_kernel(const __grid_constant__ Chain c) {
    pdl_trigger();
    const Stage &s = c.st[c.first];
    const int lane = threadIdx.x % 32, nvec = s.K / 8, chunks = nvec / 32;
    const int64_t items = (int64_t)(s.N / 2) * chunks, warps = (int64_t)gridDim.x * kWarps;
    const int64_t gw = (int64_t)blockIdx.x * kWarps + threadIdx.x / 32;
    const int64_t t0 = gw * items / warps, t1 = (gw + 1) * items / warps;
    uint4 w[4][2];
    auto load = [&](int64_t t0_) {
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int64_t t = t0_ + q;
            const int64_t u = t / chunks, j = (t % chunks) * 32 + lane;
            w[q][0] = w[q][1] = make_uint4(0, 0, 0, 0);
            if (t < t1) {
                w[q][0] = __ldcs(s.w + (2 * u) * nvec + j);
                w[q][1] = __ldcs(s.w + (2 * u + 1) * nvec + j);
            }
        }
    };
    load(t0);
    pdl_wait();
    float a0 = 0.0f, a1 = 0.0f;
    int64_t first = t0; // the first item of the current row pair in this warp's range
    for (int64_t tb = t0; tb < t1; tb += 4) {
        uint4 cur[4][2];
#pragma unroll
        for (int q = 0; q < 4; q++)
            cur[q][0] = w[q][0], cur[q][1] = w[q][1];
        if (tb + 4 < t1)
            load(tb + 4);
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int64_t t = tb + q;
            if (t >= t1)
                break;
            const int64_t u = t / chunks, j = (t % chunks) * 32 + lane;
            a0 += dot8(cur[q][0], s.x + 8 * j);
            a1 += dot8(cur[q][1], s.x + 8 * j);
            if (t + 1 == t1 || (t + 1) / chunks != u) { // the row pair ends here
                a0 = wsum(a0);
                a1 = wsum(a1);
                if (lane == 0) {
                    if (first == u * chunks && t == (u + 1) * chunks - 1) {
                        s.y[2 * u] = a0;
                        s.y[2 * u + 1] = a1;
                    } else {
                        atomicAdd(s.y + 2 * u, a0);
                        atomicAdd(s.y + 2 * u + 1, a1);
                    }
                }
                a0 = a1 = 0.0f;
                first = t + 1;
            }
        }
    }
}

// A launch allowed to start early (programmatic dependent launch), as the library's are
static void launch(void (*k)(Chain), int grid, cudaStream_t st, const Chain &c, size_t smem = 0) {
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = pdl_config(dim3(grid), dim3(32 * kWarps), smem, st, attr);
    CK(cudaLaunchKernelEx(&cfg, k, c));
}

// smem_kernel's shared memory: its rows' weights, then x in f32
static size_t smem_bytes(const Stage &s, int grid) {
    const int rpb = (s.N + grid - 1) / grid;
    return (size_t)rpb * s.K * 2 + (size_t)s.K * 4;
}

enum Kind { KERNELS, PER_LAYER, ONE_KERNEL, SMEM, EVEN };
struct Variant {
    const char *name;
    Kind kind;
    int per_sm;    // persistent and SMEM: blocks per multiprocessor
    bool tiny;     // K = 64: the chain with almost no bytes (what the boundaries alone cost)
    int pf, trig;  // KERNELS: Chain's pf and trig
};
const Variant kVariants[] = {
    {"kernels", KERNELS, 0, false, 0, 0},
    {"per layer (2 blocks/SM)", PER_LAYER, 2, false, 0, 0},
    {"per layer (1 block/SM)", PER_LAYER, 1, false, 0, 0},
    {"one kernel (2 blocks/SM)", ONE_KERNEL, 2, false, 0, 0},
    {"kernels, K = 64", KERNELS, 0, true, 0, 0},
    {"one kernel, K = 64", ONE_KERNEL, 2, true, 0, 0},
    {"kernels, next bulk-prefetched after", KERNELS, 0, false, 1, 0},
    {"kernels, next line-prefetched after", KERNELS, 0, false, 2, 0},
    {"kernels, next bulk-prefetched before", KERNELS, 0, false, 3, 0},
    {"kernels, next line-prefetched before", KERNELS, 0, false, 4, 0},
    {"kernels, trigger after the wait", KERNELS, 0, false, 0, 1},
    {"kernels, trigger after the loads", KERNELS, 0, false, 0, 2},
    {"kernels, no trigger", KERNELS, 0, false, 0, 3},
    {"smem-preloaded, 1 block/SM", SMEM, 1, false, 0, 0},
    {"smem-preloaded, 2 blocks/SM", SMEM, 2, false, 0, 0},
    {"smem-preloaded, 4 blocks/SM", SMEM, 4, false, 0, 0},
    {"even split, 1 block/SM", EVEN, 1, false, 0, 0},
    {"even split, 2 blocks/SM", EVEN, 2, false, 0, 0},
    {"kernels (again)", KERNELS, 0, false, 0, 0},
};

int main() {
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    // device copy bandwidth (read + write of 1 GiB)
    float copy_gbs;
    {
        const size_t n = 1ull << 30;
        void *a, *b;
        CK(cudaMalloc(&a, n));
        CK(cudaMalloc(&b, n));
        cudaEvent_t e0, e1;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, st));
        CK(cudaEventRecord(e0, st));
        for (int i = 0; i < 10; i++)
            CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        copy_gbs = 2.0f * n * 10 / (ms * 1e6f);
        CK(cudaFree(a));
        CK(cudaFree(b));
    }
    printf("%d SMs, device copy %.0f GB/s\n", sms, copy_gbs);

    struct Shape { const char *name; int layers, hidden, qkv, attn, inter; } shapes[] = {
        {"0.6B", 28, 1024, 4096, 2048, 3072}, {"4B", 36, 2560, 6144, 4096, 9728}};
    for (const Shape &sh : shapes) {
        const int dims[4][2] = {{sh.qkv, sh.hidden}, {sh.hidden, sh.attn}, {2 * sh.inter, sh.hidden}, {sh.hidden, sh.inter}};
        int64_t layer_bytes = 0;
        for (auto &d : dims)
            layer_bytes += (int64_t)d[0] * d[1] * 2;
        char *w;
        CK(cudaMalloc(&w, layer_bytes * sh.layers));
        CK(cudaMemset(w, 0, layer_bytes * sh.layers)); // zeros: the timing does not depend on values
        float *buf;
        const size_t buf_bytes = (size_t)(4 * sh.layers + 1) * 32768 * sizeof(float); // EVEN: a y per stage
        CK(cudaMalloc(&buf, buf_bytes));
        CK(cudaMemset(buf, 0, buf_bytes));
        unsigned *arrived;
        CK(cudaMalloc(&arrived, kMaxStages * sizeof(unsigned)));
        Chain c = {};
        c.arrived = arrived;
        const int n = 4 * sh.layers;
        char *at = w;
        for (int i = 0; i < n; i++) {
            Stage &s = c.st[i];
            s.N = dims[i % 4][0], s.K = dims[i % 4][1];
            s.w = (const uint4 *)at;
            at += (int64_t)s.N * s.K * 2;
            s.ks = 1; // split K until the units fill the GPU twice (8 warps a block)
            while (s.ks < 8 && (s.N / kRows) * s.ks < 2 * sms * kWarps && s.K / 8 >= 32 * kGroup * s.ks * 2)
                s.ks *= 2;
        }
        const double bytes_us = layer_bytes / (copy_gbs * 1e3);
        printf("%s: %d layers, %.1f MB of weights per layer (%.2f us at the copy bandwidth)\n", sh.name, sh.layers,
               layer_bytes / 1e6, bytes_us);
        CK(cudaFuncSetAttribute(smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
        for (const Variant &v : kVariants) {
            if (v.kind == SMEM && sh.hidden > 1024) // the 4B products do not fit in shared memory
                continue;
            c.pf = v.pf;
            c.trig = v.trig;
            for (int i = 0; i < n; i++) { // EVEN adds into a zeroed y of its own per stage
                c.st[i].K = v.tiny ? 64 : dims[i % 4][1];
                c.st[i].x = buf + (v.kind == EVEN ? i : i % 2) * 32768;
                c.st[i].y = buf + (v.kind == EVEN ? i + 1 : (i + 1) % 2) * 32768;
            }
            cudaGraph_t graph;
            CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
            CK(cudaMemsetAsync(arrived, 0, kMaxStages * sizeof(unsigned), st));
            if (v.kind == EVEN) // (in the time: ~5 us a step)
                CK(cudaMemsetAsync(buf, 0, buf_bytes, st));
            for (int i = 0; i < n;) {
                c.first = i;
                c.count = v.kind == PER_LAYER ? 4 : v.kind == ONE_KERNEL ? n : 1;
                if (v.kind == SMEM)
                    launch(smem_kernel, v.per_sm * sms, st, c, smem_bytes(c.st[i], v.per_sm * sms));
                else if (v.kind == EVEN)
                    launch(even_kernel, v.per_sm * sms, st, c);
                else if (v.kind == KERNELS)
                    launch(product_kernel, tiles_of(c.st[i]), st, c);
                else
                    launch(persistent_kernel, v.per_sm * sms, st, c);
                i += c.count;
            }
            CK(cudaStreamEndCapture(st, &graph));
            cudaGraphExec_t exec;
            CK(cudaGraphInstantiate(&exec, graph, 0));
            const float us = replay_us(exec, st, 20);
            printf("  %-40s %8.1f us per step, %6.2f us per layer (%.0f %% of the bytes' time)\n", v.name, us,
                   us / sh.layers, 100.0 * bytes_us * sh.layers / us);
            CK(cudaGraphExecDestroy(exec));
            CK(cudaGraphDestroy(graph));
        }
        CK(cudaFree(w));
        CK(cudaFree(buf));
        CK(cudaFree(arrived));
    }
    return 0;
}
