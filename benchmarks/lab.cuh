// lab.cuh - the few helpers the development labs (benchmarks/*_lab.cu) share: error checks, the
// programmatic-dependent-launch instructions, a warp sum and an 8-wide bf16 dot product.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" :::); }
__device__ __forceinline__ float wsum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// w's 8 bf16 values times x[0 .. 8] (16-byte aligned)
__device__ __forceinline__ float dot8(uint4 w, const float *x) {
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&w;
    const float4 a = *(const float4 *)x, b = *(const float4 *)(x + 4);
    float2 f0 = __bfloat1622float2(h[0]), f1 = __bfloat1622float2(h[1]), f2 = __bfloat1622float2(h[2]),
           f3 = __bfloat1622float2(h[3]);
    return f0.x * a.x + f0.y * a.y + f1.x * a.z + f1.y * a.w + f2.x * b.x + f2.y * b.y + f3.x * b.z + f3.y * b.w;
}

// A launch configuration that may start before the kernel ahead of it completes (programmatic
// dependent launch), as the library's launches do. attrs: room for the attributes (the first is
// set here; a caller may add more and raise numAttrs).
static inline cudaLaunchConfig_t pdl_config(dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                                            cudaLaunchAttribute *attrs) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    attrs[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attrs;
    cfg.numAttrs = 1;
    return cfg;
}

// µs per replay of g: the best of five rounds of `reps` back-to-back replays, after five more
static inline float replay_us(cudaGraphExec_t g, cudaStream_t st, int reps) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < 5; i++)
        CK(cudaGraphLaunch(g, st));
    float best = 1e30f;
    for (int round = 0; round < 5; round++) {
        CK(cudaEventRecord(a, st));
        for (int i = 0; i < reps; i++)
            CK(cudaGraphLaunch(g, st));
        CK(cudaEventRecord(b, st));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        best = ms * 1000.0f / reps < best ? ms * 1000.0f / reps : best;
    }
    CK(cudaEventDestroy(a));
    CK(cudaEventDestroy(b));
    return best;
}
