// common.cuh - what the CUDA kernel files share: the per-GPU stream, launch checking, element
// loads and stores of every plain dtype as f32, strided indexing, and warp/block reductions.
#pragma once

#include "internal.h"
#include "cuda/cuda_ops.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>
#include <utility>

// The stream every op of GPU `device_index` runs on (created on first use, non-blocking, so
// work on it is ordered only by itself; copies to and from the host use it too). Also makes
// that GPU current. NULL with an error recorded if the GPU cannot be reached.
cudaStream_t to_cuda_stream(int device_index);

// TO_OK, or a TO_ERR_CUDA error naming `op` if the last launch (or anything before it) failed.
int to_cuda_check_launch(const char *op);

// ---- index values checked on the GPU ----
// Kernels that follow indices (embedding ids, cache slots, block tables) check each value and,
// instead of reading or writing out of bounds, skip it and record the first bad one in a word
// of device memory per GPU. Nothing waits for this: the next call that synchronises with the
// GPU (a copy to the host, to_cuda_synchronize) reads the word and returns the error, naming the
// op and the index (device.cu, to_cuda_take_error). What was recorded: an error code and three
// numbers for its message.
enum {
    TO_GPU_ERR_NONE = 0,
    TO_GPU_ERR_EMBEDDING_ID = 1, // a = position in ids, b = the id, c = the table's rows
    TO_GPU_ERR_SLOT = 2,         // a = position in slot_mapping, b = the slot, c = slots in the caches
    TO_GPU_ERR_BATCH = 3,        // a = the sequence, b = what is wrong (TO_GPU_BATCH_*), c = a value
    TO_GPU_ERR_LOGITS = 4,       // to_sample: a = the row, b = what (TO_SAMPLE_BAD_*), c = 1 for to_sample_pipeline
    TO_GPU_ERR_ROPE_KV_SLOT = 5, // to_rope_kv_store: as TO_GPU_ERR_SLOT
    TO_GPU_ERR_BEAM_LOGITS = 6,  // to_beam_topk: a = the logits row, b = 1 NaN, 2 +inf, 3 all -inf
    TO_GPU_ERR_ROPE_KV_ATTN_SLOT = 7, // to_rope_kv_attention: a = the token, b = its slot, c = its position's
};
enum { TO_GPU_BATCH_CU = 1, TO_GPU_BATCH_CONTEXT = 2, TO_GPU_BATCH_TABLE = 3, TO_GPU_BATCH_BLOCK = 4 };

// The error word of GPU `device_index` (4 x u64: code, a, b, c), allocated zeroed on first use.
unsigned long long *to_cuda_error_word(int device_index);

// Multiprocessors of GPU device_index (asked once, then cached; 132 if the query fails).
__attribute__((visibility("hidden"))) int to_cuda_sm_count(int device_index);

__device__ __forceinline__ void to_gpu_error(unsigned long long *word, int code, long long a, long long b,
                                             long long c) {
    if (atomicCAS(word, 0ull, (unsigned long long)code) == 0ull) { // the first error is kept
        word[1] = (unsigned long long)a;
        word[2] = (unsigned long long)b;
        word[3] = (unsigned long long)c;
    }
}

// ---- shapes and strides, passed to kernels by value ----

struct TensorView {
    char *data;
    int dtype;
    int ndim;
    int64_t shape[TO_MAX_DIMS];
    int64_t strides[TO_MAX_DIMS]; // in elements
};

inline TensorView to_view(const to_tensor *t) {
    TensorView v;
    v.data = (char *)t->data;
    v.dtype = t->dtype;
    v.ndim = t->ndim;
    for (int i = 0; i < TO_MAX_DIMS; i++) {
        v.shape[i] = i < t->ndim ? t->shape[i] : 1;
        v.strides[i] = i < t->ndim ? t->strides[i] : 0;
    }
    return v;
}

// Element offset (in elements) of the i-th element in row-major logical order.
__device__ __forceinline__ int64_t to_offset(const TensorView &v, int64_t i) {
    int64_t off = 0;
    for (int d = v.ndim - 1; d >= 0; d--) {
        int64_t n = v.shape[d];
        off += (i % n) * v.strides[d];
        i /= n;
    }
    return off;
}

// Element offset of row `row` of v: the row-major index over all dimensions but the last.
__device__ __forceinline__ int64_t to_row_offset_dev(const TensorView &v, int64_t row) {
    int64_t off = 0;
    for (int d = v.ndim - 2; d >= 0; d--) {
        int64_t n = v.shape[d];
        off += (row % n) * v.strides[d];
        row /= n;
    }
    return off;
}

// ---- element access of the plain dtypes as f32 (rounding to nearest even on stores) ----

__device__ __forceinline__ float to_load(const char *base, int dtype, int64_t i) {
    switch (dtype) {
    case TO_F32: return ((const float *)base)[i];
    case TO_F16: return __half2float(((const __half *)base)[i]);
    case TO_BF16: return __bfloat162float(((const __nv_bfloat16 *)base)[i]);
    case TO_I8: return (float)((const int8_t *)base)[i];
    case TO_I32: return (float)((const int32_t *)base)[i];
    case TO_I64: return (float)((const int64_t *)base)[i];
    case TO_U8: return (float)((const uint8_t *)base)[i];
    }
    return 0.0f;
}

// N values of one float dtype (f32, f16, bf16), as to_load reads them, at element offsets off[i]
// where in[i] (0 where not): the dtype is switched on once and every load is issued before any
// is converted. (Loads through to_load one by one each wait for the one before: the switch
// between them keeps the compiler from moving the next load up, so N loads cost N trips to
// memory, not one.)
template <typename T, int N>
__device__ __forceinline__ void to_load_n_typed(const char *base, const int64_t (&off)[N], const bool (&in)[N],
                                                float (&out)[N]) {
    const T *p = reinterpret_cast<const T *>(base);
    T raw[N];
#pragma unroll
    for (int i = 0; i < N; i++)
        raw[i] = in[i] ? p[off[i]] : T(0.0f);
#pragma unroll
    for (int i = 0; i < N; i++)
        out[i] = (float)raw[i];
}

template <int N>
__device__ __forceinline__ void to_load_n(const char *base, int dtype, const int64_t (&off)[N], const bool (&in)[N],
                                          float (&out)[N]) {
    if (dtype == TO_BF16)
        to_load_n_typed<__nv_bfloat16, N>(base, off, in, out);
    else if (dtype == TO_F16)
        to_load_n_typed<__half, N>(base, off, in, out);
    else
        to_load_n_typed<float, N>(base, off, in, out);
}

__device__ __forceinline__ void to_store(char *base, int dtype, int64_t i, float x) {
    switch (dtype) {
    case TO_F32: ((float *)base)[i] = x; break;
    case TO_F16: ((__half *)base)[i] = __float2half_rn(x); break;
    case TO_BF16: ((__nv_bfloat16 *)base)[i] = __float2bfloat16_rn(x); break;
    default: break; // integer stores are the copy kernel's business (truncation, saturation)
    }
}

// x as to_store(dtype) stores it, read back (a float dtype): what a later to_load of it gives
__device__ __forceinline__ float to_round(int dtype, float x) {
    switch (dtype) {
    case TO_F16: return __half2float(__float2half_rn(x));
    case TO_BF16: return __bfloat162float(__float2bfloat16_rn(x));
    }
    return x;
}

__device__ __forceinline__ int64_t to_load_index_dev(const char *base, int dtype, int64_t i) {
    return dtype == TO_I32 ? (int64_t)((const int32_t *)base)[i] : ((const int64_t *)base)[i];
}

// ---- reductions ----

// silu(z) = z / (1 + e^-z) with e = e^-|z| <= 1 so no step overflows (the CPU's formula):
// z >= 0: z / (1 + e);  z < 0: z e / (1 + e). NaN for NaN and for z = -inf (-inf * 0).
__device__ __forceinline__ float to_silu(float z) {
    float e = expf(-fabsf(z));
    float num = z >= 0.0f ? z : __fmul_rn(z, e);
    return __fdiv_rn(num, __fadd_rn(1.0f, e));
}

__device__ __forceinline__ float to_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float to_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float to_block_sum(float v, float *scratch) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = to_warp_sum(v);
    __syncthreads(); // scratch may still be read from a previous call
    if (lane == 0)
        scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return to_warp_sum(v);
}

// In double, where the CPU sums in double too (softmax's exponentials, rms_norm's squares).
__device__ __forceinline__ double to_warp_sum_double(double v) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double to_block_sum_double(double v, double *scratch) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = to_warp_sum_double(v);
    __syncthreads(); // scratch may still be read from a previous call
    if (lane == 0)
        scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0;
    return to_warp_sum_double(v);
}

__device__ __forceinline__ float to_block_max(float v, float *scratch) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    v = to_warp_max(v);
    __syncthreads();
    if (lane == 0)
        scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -INFINITY;
    return to_warp_max(v);
}

inline int64_t to_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- programmatic dependent launch (Hopper) ----
// Every kernel is launched with to_launch, which lets it start while the kernel before it on the
// stream is still finishing (its blocks can be scheduled, and read what does not depend on that
// kernel: weights). Each kernel therefore calls to_pdl_wait() in every thread before its first
// access to memory an earlier kernel writes or reads, and before it writes anything; the wait
// returns once the previous kernel has completed and its writes are visible. Because every
// kernel waits, completion is transitive: when a kernel finishes, all before it have too.
// to_pdl_trigger() lets the next kernel launch once every block of this one has called it (or
// exited); kernels call it early, so the next one's blocks fill the SMs as this one's last wave
// drains. On GPUs before sm_90 both are no-ops and launches are ordinary stream order.
__device__ __forceinline__ void to_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void to_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A switch that is on unless the environment variable `name` starts with '0' (callers keep the
// answer in a static: read once per process, not per launch).
inline bool to_env_switch(const char *name) {
    const char *v = getenv(name);
    return !(v && v[0] == '0');
}

// Whether launches are programmatic (INFERENCE_PIO_PDL=0 turns it off, to measure its effect or
// to see each kernel's own time in a profiler: with it, a kernel's span includes its wait).
inline bool to_pdl_enabled() {
    static const bool enabled = to_env_switch("INFERENCE_PIO_PDL");
    return enabled;
}

// What a launch asks beyond its grid: programmatic (every launch, unless INFERENCE_PIO_PDL=0),
// its blocks grouped into thread-block clusters of `cluster` along x (sm_90; grid.x a multiple of
// it), cooperative (all blocks resident at once, or the runtime refuses the launch).
struct ToLaunchOptions {
    bool pdl = to_pdl_enabled();
    unsigned cluster = 1;
    bool cooperative = false;
};

// kernel<<<grid, block, smem, stream>>>(args...) with those options. Returns the launch's error
// (callers go on to to_cuda_check_launch as after <<<>>>).
template <typename... Params, typename... Args>
inline cudaError_t to_launch_with(ToLaunchOptions opt, void (*kernel)(Params...), dim3 grid, dim3 block,
                                  size_t smem, cudaStream_t stream, Args &&...args) {
    cudaLaunchAttribute attr[3];
    unsigned n = 0;
    if (opt.pdl) {
        attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (opt.cluster > 1) {
        attr[n].id = cudaLaunchAttributeClusterDimension;
        attr[n++].val.clusterDim = {opt.cluster, 1, 1};
    }
    if (opt.cooperative) {
        attr[n].id = cudaLaunchAttributeCooperative;
        attr[n++].val.cooperative = 1;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// Clusters of `cluster` blocks of kernel (`threads` each, `smem` bytes of dynamic shared memory)
// that the current GPU holds at once (cudaOccupancyMaxActiveClusters); 0 when the query fails
// (its error is left for the caller to clear).
template <typename... Params>
inline int to_max_active_clusters(void (*kernel)(Params...), unsigned cluster, unsigned threads, size_t smem) {
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim = {cluster, 1, 1};
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(cluster);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int held = 0;
    return cudaOccupancyMaxActiveClusters(&held, kernel, &cfg) == cudaSuccess ? held : 0;
}

// A programmatic dependent launch, as every kernel of the library is launched (see above).
template <typename... Params, typename... Args>
inline cudaError_t to_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                             cudaStream_t stream, Args &&...args) {
    return to_launch_with(ToLaunchOptions{}, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}
