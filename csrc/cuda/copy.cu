// copy.cu - to_copy and to_fill on one GPU.
//
// Every kernel is a grid-stride loop over the elements (or bytes) of out in row-major logical
// order, with int64 indices. When both tensors are contiguous the logical index is the memory
// index; otherwise to_offset turns it into each tensor's element offset (stride 0 included).
//
// The results are the CPU's bit for bit (csrc/cpu/copy.c, csrc/core/dtype.c, csrc/cpu/quant.c):
//  - same dtype: the bytes move as they are (NaN payloads included);
//  - integer -> integer: through int64, saturating when narrowing;
//  - anything else goes through one f32 value: integers convert to f32 rounding to nearest even,
//    f32 -> f16/bf16 rounds to nearest even (a NaN stays a quiet NaN keeping its top payload
//    bits, as the CPU's converters do), f32 -> integer truncates toward zero and saturates,
//    NaN gives 0;
//  - block-quantized x: each element is decoded from its block with the CPU's f32 operations in
//    the CPU's order, each rounded separately (__fmul_rn/__fadd_rn: nvcc would otherwise fuse
//    a multiply and an add into an FMA, which the CPU build (-ffp-contract=off) never does).
#include "cuda/common.cuh"
#include "cuda/quant.cuh"

#include <math.h>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16; // grid-stride loops cover the rest

int blocks_for(int64_t n) { return (int)(to_ceil_div(n, kThreads) < kMaxBlocks ? to_ceil_div(n, kThreads) : kMaxBlocks); }

__device__ __forceinline__ bool is_int(int dtype) {
    return dtype == TO_I8 || dtype == TO_I32 || dtype == TO_I64 || dtype == TO_U8;
}

__device__ __forceinline__ int dtype_size(int dtype) {
    switch (dtype) {
    case TO_F32: case TO_I32: return 4;
    case TO_F16: case TO_BF16: return 2;
    case TO_I64: return 8;
    default: return 1; // i8, u8
    }
}

// ---- f16 / bf16 <-> f32 exactly as csrc/core/dtype.c (the intrinsics agree on every value
// but NaN, whose bits the hardware makes canonical while the CPU keeps the payload) ----


__device__ __forceinline__ uint16_t f32_to_f16_bits(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) // NaN: quiet, top payload bits kept
        return (uint16_t)(((u >> 16) & 0x8000u) | 0x7e00u | ((u >> 13) & 0x3ffu));
    return __half_as_ushort(__float2half_rn(f));
}

__device__ __forceinline__ float bf16_bits_to_f32(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

__device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u); // round to nearest even
    return (uint16_t)(u >> 16);
}

// ---- element loads and stores (i: element index into base) ----

__device__ __forceinline__ float load_f32(const char *base, int dtype, int64_t i) {
    switch (dtype) {
    case TO_F16: return f16_bits_to_f32(((const uint16_t *)base)[i]);
    case TO_BF16: return bf16_bits_to_f32(((const uint16_t *)base)[i]);
    default: return to_load(base, dtype, i); // f32 as is, integers rounded to nearest even
    }
}

__device__ __forceinline__ int64_t load_i64(const char *base, int dtype, int64_t i) {
    switch (dtype) {
    case TO_I8: return ((const int8_t *)base)[i];
    case TO_I32: return ((const int32_t *)base)[i];
    case TO_I64: return ((const int64_t *)base)[i];
    default: return ((const uint8_t *)base)[i];
    }
}

// integer narrowing saturates
__device__ __forceinline__ void store_i64(char *base, int dtype, int64_t i, int64_t v) {
    switch (dtype) {
    case TO_I8: ((int8_t *)base)[i] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v); break;
    case TO_I32: ((int32_t *)base)[i] = (int32_t)(v < INT32_MIN ? INT32_MIN : v > INT32_MAX ? INT32_MAX : v); break;
    case TO_I64: ((int64_t *)base)[i] = v; break;
    default: ((uint8_t *)base)[i] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); break;
    }
}

// to_double_to_i64: truncation toward zero, saturating at the int64 range, NaN -> 0
__device__ __forceinline__ int64_t float_to_i64(float f) {
    double x = (double)f;
    if (x != x)
        return 0;
    double r = trunc(x);
    if (r >= 9223372036854775808.0)
        return INT64_MAX;
    if (r < -9223372036854775808.0)
        return INT64_MIN;
    return (int64_t)r;
}

__device__ __forceinline__ void store_f32(char *base, int dtype, int64_t i, float x) {
    switch (dtype) {
    case TO_F32: ((float *)base)[i] = x; break;
    case TO_F16: ((uint16_t *)base)[i] = f32_to_f16_bits(x); break;
    case TO_BF16: ((uint16_t *)base)[i] = f32_to_bf16_bits(x); break;
    default: store_i64(base, dtype, i, float_to_i64(x)); break; // saturation as the CPU's trunc_clamp
    }
}

// One element of x (at element xo) into out (at element oo), any two plain dtypes.
__device__ __forceinline__ void copy_element(const TensorView &out, int64_t oo, const TensorView &x, int64_t xo) {
    if (out.dtype == x.dtype) {
        switch (dtype_size(x.dtype)) {
        case 1: ((uint8_t *)out.data)[oo] = ((const uint8_t *)x.data)[xo]; break;
        case 2: ((uint16_t *)out.data)[oo] = ((const uint16_t *)x.data)[xo]; break;
        case 4: ((uint32_t *)out.data)[oo] = ((const uint32_t *)x.data)[xo]; break;
        default: ((uint64_t *)out.data)[oo] = ((const uint64_t *)x.data)[xo]; break;
        }
    } else if (is_int(out.dtype) && is_int(x.dtype)) {
        store_i64(out.data, out.dtype, oo, load_i64(x.data, x.dtype, xo));
    } else {
        store_f32(out.data, out.dtype, oo, load_f32(x.data, x.dtype, xo));
    }
}

// The dtype switches inside depend only on kernel arguments, so every thread takes the same
// branch; kContiguous drops the offset arithmetic when both tensors are dense.
template <bool kContiguous>
__global__ void copy_plain_kernel(TensorView out, TensorView x, int64_t n) {
    to_pdl_wait();
    to_pdl_trigger();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t oo = kContiguous ? i : to_offset(out, i);
        int64_t xo = kContiguous ? i : to_offset(x, i);
        copy_element(out, oo, x, xo);
    }
}

// ---- block-quantized x ----

// out (a float dtype) = the values of quantized x. x's element offsets are block-aligned at
// every row start and its last dimension has stride 1, so offset / bs picks the block and
// offset % bs the element in it. Neighbouring threads read neighbouring bytes of one block.
template <bool kContiguous>
__global__ void dequant_kernel(TensorView out, TensorView x, int block_size, int block_bytes, int64_t n) {
    to_pdl_wait();
    to_pdl_trigger();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t xo = kContiguous ? i : to_offset(x, i);
        int64_t oo = kContiguous ? i : to_offset(out, i);
        const uint8_t *blk = (const uint8_t *)x.data + (xo / block_size) * block_bytes;
        store_f32(out.data, out.dtype, oo, to_dequant_element(x.dtype, blk, (int)(xo % block_size)));
    }
}

// Same-dtype quantized copy of strided tensors: whole blocks move as bytes. Byte i of the
// flattened blocks is byte i % block_bytes of block i / block_bytes, whose first element is
// element (i / block_bytes) * block_size in logical order.
__global__ void copy_blocks_kernel(TensorView out, TensorView x, int block_size, int block_bytes, int64_t nbytes) {
    to_pdl_wait();
    to_pdl_trigger();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nbytes; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = i / block_bytes, first = b * block_size;
        int64_t xb = to_offset(x, first) / block_size, ob = to_offset(out, first) / block_size;
        int byte = (int)(i % block_bytes);
        ((uint8_t *)out.data)[ob * block_bytes + byte] = ((const uint8_t *)x.data)[xb * block_bytes + byte];
    }
}

// ---- fill ----

// Every element of out = the bits `pattern` (an element of out's dtype, prepared on the host).
template <typename T>
__global__ void fill_kernel(TensorView out, T pattern, int64_t n, bool contiguous) {
    to_pdl_wait();
    to_pdl_trigger();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        ((T *)out.data)[contiguous ? i : to_offset(out, i)] = pattern;
}

template <typename T>
void launch_fill(const to_tensor *out, const unsigned char *pattern, int64_t n, cudaStream_t stream) {
    T value;
    memcpy(&value, pattern, sizeof(T));
    to_launch(fill_kernel<T>, blocks_for(n), kThreads, 0, stream, to_view(out), value, n, to_is_contiguous(out) != 0);
}

bool host_is_int(int dtype) { return dtype == TO_I8 || dtype == TO_I32 || dtype == TO_I64 || dtype == TO_U8; }

} // namespace

extern "C" {

int to_cuda_copy(const to_tensor *out, const to_tensor *x) {
    int64_t n = to_numel(out);
    if (n == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    bool contiguous = to_is_contiguous(out) && to_is_contiguous(x);
    TensorView ov = to_view(out), xv = to_view(x);
    int bs = to_dtype_block_size(x->dtype), bb = to_dtype_block_bytes(x->dtype);
    if (bs > 1 && out->dtype == x->dtype) {
        if (contiguous) // whole blocks, one run of bytes
            cudaMemcpyAsync(out->data, x->data, (size_t)to_dtype_bytes(x->dtype, n), cudaMemcpyDeviceToDevice, stream);
        else
            to_launch(copy_blocks_kernel, blocks_for(n / bs * bb), kThreads, 0, stream, ov, xv, bs, bb, n / bs * bb);
    } else if (bs > 1) {
        if (to_is_quantized(out->dtype) || !(TO_FLOAT_DTYPES & TO_MASK(out->dtype)))
            return to_fail(TO_ERR_UNSUPPORTED, "to_copy: on a GPU, %s dequantizes only into float32, "
                           "float16 or bfloat16", to_dtype_name(x->dtype));
        if (contiguous)
            to_launch(dequant_kernel<true>, blocks_for(n), kThreads, 0, stream, ov, xv, bs, bb, n);
        else
            to_launch(dequant_kernel<false>, blocks_for(n), kThreads, 0, stream, ov, xv, bs, bb, n);
    } else if (to_is_quantized(out->dtype)) {
        return to_fail(TO_ERR_UNSUPPORTED, "to_copy: on a GPU, tensors are not quantized (do that on the CPU)");
    } else if (contiguous) {
        to_launch(copy_plain_kernel<true>, blocks_for(n), kThreads, 0, stream, ov, xv, n);
    } else {
        to_launch(copy_plain_kernel<false>, blocks_for(n), kThreads, 0, stream, ov, xv, n);
    }
    return to_cuda_check_launch("to_copy");
}

int to_cuda_fill(const to_tensor *out, double value) {
    int64_t n = to_numel(out);
    if (n == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    // the element's bits, made on the host exactly as to_cpu_fill makes them: integers from the
    // double (truncated, saturated), floats through f32
    unsigned char pattern[8] = {0};
    if (host_is_int(out->dtype)) {
        int64_t v = to_double_to_i64(value);
        switch (out->dtype) {
        case TO_I8: { int8_t t = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v); memcpy(pattern, &t, 1); break; }
        case TO_I32: { int32_t t = (int32_t)(v < INT32_MIN ? INT32_MIN : v > INT32_MAX ? INT32_MAX : v); memcpy(pattern, &t, 4); break; }
        case TO_I64: memcpy(pattern, &v, 8); break;
        default: { uint8_t t = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); memcpy(pattern, &t, 1); break; }
        }
    } else {
        float f = (float)value;
        to_store_f32(pattern, out->dtype, &f, 1, 1);
    }
    switch (to_dtype_size(out->dtype)) {
    case 1: launch_fill<uint8_t>(out, pattern, n, stream); break;
    case 2: launch_fill<uint16_t>(out, pattern, n, stream); break;
    case 4: launch_fill<uint32_t>(out, pattern, n, stream); break;
    case 8: launch_fill<uint64_t>(out, pattern, n, stream); break;
    default: return to_fail(TO_ERR_DTYPE, "to_fill: %s is not a plain dtype", to_dtype_name(out->dtype));
    }
    return to_cuda_check_launch("to_fill");
}

} // extern "C"
