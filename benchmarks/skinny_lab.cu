// skinny_lab.cu - how fast bf16 weights stream into SMs under the access patterns a batched-decode
// product can use (a development tool, not part of the library). Build and run on a GPU:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/skinny_lab benchmarks/skinny_lab.cu && /tmp/skinny_lab
// A work unit is 16 weight rows x a slice of K, one per warp, 8 warps per block. Patterns:
//   mma:  what mma.sync's A operand wants straight from global memory: lane (g, t) loads 16 bytes
//         of rows g and g + 8 at k = t * 8 + 32 c (64 contiguous bytes per row per instruction);
//   gemv: each instruction reads 512 contiguous bytes of one row (lane l at k = 8 l + 256 c);
//   async: the unit's rows copied into a per-warp shared-memory ring with cp.async, 512 bytes
//         of one row per instruction, then read back in the mma layout.
// Loads in flight per lane: W (register window) or the ring depth. Each product's weights come
// from a ring of copies larger than the L2; GB/s counts weight bytes once.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <vector>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

struct Args {
    const char *w;
    int N, K, slice; // unit: 16 rows x slice k
    unsigned *sink;
};

__device__ __forceinline__ unsigned mix(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

template <int W> __global__ void __launch_bounds__(256) mma_pattern(Args a) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int slices = a.K / a.slice;
    const int unit = blockIdx.x * 8 + warp;
    const int group = unit / slices, s = unit % slices;
    if (group * 16 >= a.N)
        return;
    const char *r0 = a.w + ((int64_t)(group * 16 + g) * a.K + s * a.slice + t * 8) * 2;
    const char *r8 = r0 + (int64_t)8 * a.K * 2;
    const int chunks = a.slice / 32;
    unsigned acc = 0;
    for (int c0 = 0; c0 < chunks; c0 += W) {
        uint4 v[W][2];
#pragma unroll
        for (int u = 0; u < W; u++)
            if (c0 + u < chunks) {
                v[u][0] = __ldg((const uint4 *)(r0 + (c0 + u) * 64));
                v[u][1] = __ldg((const uint4 *)(r8 + (c0 + u) * 64));
            }
#pragma unroll
        for (int u = 0; u < W; u++)
            if (c0 + u < chunks)
                acc ^= mix(v[u][0]) ^ mix(v[u][1]);
    }
    if (acc == 0x12345678u)
        a.sink[0] = acc;
}

template <int W> __global__ void __launch_bounds__(256) gemv_pattern(Args a) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int slices = a.K / a.slice;
    const int unit = blockIdx.x * 8 + warp;
    const int group = unit / slices, s = unit % slices;
    if (group * 16 >= a.N)
        return;
    const int per_row = a.slice / 256; // 512-byte pieces per row
    const int total = 16 * per_row;
    unsigned acc = 0;
    for (int i0 = 0; i0 < total; i0 += W) {
        uint4 v[W];
#pragma unroll
        for (int u = 0; u < W; u++)
            if (i0 + u < total) {
                const int i = i0 + u, r = i / per_row, c = i % per_row;
                v[u] = __ldg((const uint4 *)(a.w + ((int64_t)(group * 16 + r) * a.K + s * a.slice + c * 256 + lane * 8) * 2));
            }
#pragma unroll
        for (int u = 0; u < W; u++)
            if (i0 + u < total)
                acc ^= mix(v[u]);
    }
    if (acc == 0x12345678u)
        a.sink[0] = acc;
}

__device__ __forceinline__ void cp16(void *smem, const void *gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// per warp: a ring of S stages, each 16 rows x 256 k (512 bytes per row, + 16 bytes of padding)
template <int S> __global__ void __launch_bounds__(256) async_pattern(Args a) {
    extern __shared__ __align__(16) char smem[];
    constexpr int ROWB = 512 + 16, STAGE = 16 * ROWB;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    char *ring = smem + warp * S * STAGE;
    const int slices = a.K / a.slice;
    const int unit = blockIdx.x * 8 + warp;
    const int group = unit / slices, s = unit % slices;
    if (group * 16 >= a.N)
        return;
    const char *base = a.w + ((int64_t)(group * 16) * a.K + s * a.slice) * 2;
    const int steps = a.slice / 256;
    auto issue = [&](int step) {
        char *dst = ring + (step % S) * STAGE;
#pragma unroll
        for (int r = 0; r < 16; r++)
            cp16(dst + r * ROWB + lane * 16, base + ((int64_t)r * a.K + step * 256 + lane * 8) * 2);
    };
#pragma unroll
    for (int i = 0; i < S - 1; i++) {
        if (i < steps)
            issue(i);
        cp_commit();
    }
    unsigned acc = 0;
    for (int step = 0; step < steps; step++) {
        if (step + S - 1 < steps)
            issue(step + S - 1);
        cp_commit();
        cp_wait<S - 1>();
        __syncwarp();
        const char *st = ring + (step % S) * STAGE;
#pragma unroll
        for (int c = 0; c < 8; c++) // 8 chunks of 32 k: rows g and g + 8 in the mma layout
            acc ^= mix(*(const uint4 *)(st + g * ROWB + c * 64 + t * 16)) ^
                   mix(*(const uint4 *)(st + (g + 8) * ROWB + c * 64 + t * 16));
        __syncwarp();
    }
    if (acc == 0x12345678u)
        a.sink[0] = acc;
}

template <typename F> float time_us(F launch, int reps) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < 5; i++)
        launch(i);
    CK(cudaEventRecord(e0));
    for (int i = 0; i < reps; i++)
        launch(i);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1000 / reps;
}

int main() {
    struct Shape { const char *name; int N, K; } shapes[] = {
        {"0.6B qkv 4096x1024", 4096, 1024}, {"0.6B o_proj 1024x2048", 1024, 2048}, {"0.6B down 1024x3072", 1024, 3072},
        {"4B gate_up 19456x2560", 19456, 2560}, {"4B down 2560x9728", 2560, 9728}};
    unsigned *sink;
    CK(cudaMalloc(&sink, 4));
    for (auto sh : shapes) {
        const size_t bytes = (size_t)sh.N * sh.K * 2;
        const int copies = (int)((256u << 20) / bytes) + 1;
        std::vector<char *> ring(copies);
        for (auto &p : ring) {
            CK(cudaMalloc(&p, bytes));
            CK(cudaMemset(p, 1, bytes));
        }
        printf("%s (%d copies)\n", sh.name, copies);
        for (int slice : {256, 512, 1024, 2048}) {
            if (sh.K % slice)
                continue;
            const int units = sh.N / 16 * (sh.K / slice), blocks = (units + 7) / 8;
            auto run = [&](auto kernel, size_t smem) {
                if (smem > 48 * 1024)
                    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
                float us = time_us([&](int i) {
                    Args a{ring[i % copies], sh.N, sh.K, slice, sink};
                    kernel<<<blocks, 256, smem>>>(a);
                }, 60);
                CK(cudaGetLastError());
                return us;
            };
            float m4 = run(mma_pattern<4>, 0), m8 = run(mma_pattern<8>, 0), m16 = run(mma_pattern<16>, 0);
            float g4 = run(gemv_pattern<4>, 0), g8 = run(gemv_pattern<8>, 0);
            float a2 = run(async_pattern<2>, 8 * 2 * 16 * 528), a3 = run(async_pattern<3>, 8 * 3 * 16 * 528);
            auto gbs = [&](float us) { return bytes / (us * 1e-6) / 1e9; };
            printf("  slice %4d blocks %5d | mma W4 %6.1f us %5.0f GB/s  W8 %6.1f %5.0f  W16 %6.1f %5.0f | gemv W4 %6.1f %5.0f  W8 %6.1f %5.0f | async S2 %6.1f %5.0f  S3 %6.1f %5.0f\n",
                   slice, blocks, m4, gbs(m4), m8, gbs(m8), m16, gbs(m16), g4, gbs(g4), g8, gbs(g8), a2, gbs(a2), a3, gbs(a3));
        }
        for (auto p : ring)
            CK(cudaFree(p));
    }
    return 0;
}
