// norm.cu - RMS normalisation over the last dimension, optionally fused with the residual add
// before it (to_rms_norm / to_add_rms_norm; semantics in csrc/ops/norm.c and csrc/cpu/norm.c).
//
// One block per row, two passes over the row, exactly the CPU's arithmetic:
//   1. (fused form) residual += x in f32, stored in residual's dtype and read back, so the norm
//      sees the rounded stored value; the sum of squares of the row in double (f32 squares are
//      exact in double, so only the summation order differs from the CPU: a few 1e-16 relative,
//      which almost never moves the f32 rinv below);
//   2. out = (v * rinv) * w, two f32 roundings in that order, rinv = (float)(1 / sqrt(ss/d + eps))
//      in double (IEEE division and square root on the GPU as on the CPU), rounded once to out.
// The mul-then-mul and the add use __fmul_rn/__fadd_rn so nvcc cannot contract anything.
//
// Aliasing (validated in csrc/ops/norm.c): out may be exactly x's view, residual may be exactly
// x's view. Element i of a row is handled by the same thread in both passes and the block
// reduction's __syncthreads separates them, so every element is read before it is written.
#include "cuda/common.cuh"

namespace {

// The value element i of the row rounds to when stored in `dtype` (what the CPU reads back).
__device__ __forceinline__ float round_to(int dtype, float v) {
    if (dtype == TO_F16)
        return __half2float(__float2half_rn(v));
    if (dtype == TO_BF16)
        return __bfloat162float(__float2bfloat16_rn(v));
    return v;
}

struct NormArgs {
    TensorView out, residual, x, weight;
    int64_t rows, d;
    int has_residual;
    double eps;
};

__global__ void rms_norm_kernel(NormArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ double scratch[32];
    const int64_t d = a.d;
    const int64_t sx = a.x.strides[a.x.ndim - 1], so = a.out.strides[a.out.ndim - 1];
    const int64_t sw = a.weight.strides[0];
    const int64_t sr = a.has_residual ? a.residual.strides[a.residual.ndim - 1] : 0;

    for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
        const int64_t xo = to_row_offset_dev(a.x, row), oo = to_row_offset_dev(a.out, row);
        const int64_t ro = a.has_residual ? to_row_offset_dev(a.residual, row) : 0;

        // pass 1: (residual update and) sum of squares
        double ss = 0.0;
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            float v = to_load(a.x.data, a.x.dtype, xo + i * sx);
            if (a.has_residual) {
                int64_t at = ro + i * sr;
                v = __fadd_rn(to_load(a.residual.data, a.residual.dtype, at), v);
                to_store(a.residual.data, a.residual.dtype, at, v);
                v = round_to(a.residual.dtype, v); // the stored value, as the CPU reads it back
            }
            ss += (double)v * (double)v;
        }
        ss = to_block_sum_double(ss, scratch);
        const float rinv = (float)(1.0 / sqrt(ss / (double)d + a.eps));

        // pass 2: out = (v * rinv) * w, reading the row again (the updated residual, or x)
        for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
            float v = a.has_residual ? to_load(a.residual.data, a.residual.dtype, ro + i * sr)
                                     : to_load(a.x.data, a.x.dtype, xo + i * sx);
            float w = to_load(a.weight.data, a.weight.dtype, i * sw);
            to_store(a.out.data, a.out.dtype, oo + i * so, __fmul_rn(__fmul_rn(v, rinv), w));
        }
        __syncthreads(); // scratch is reused by the next row's reduction
    }
}

}  // namespace

extern "C" int to_cuda_rms_norm(const to_tensor *out, const to_tensor *residual, const to_tensor *x,
                                const to_tensor *weight, double eps) {
    if (to_numel(x) == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    NormArgs a = {};
    a.out = to_view(out);
    a.x = to_view(x);
    a.weight = to_view(weight);
    a.has_residual = residual != NULL;
    a.residual = residual ? to_view(residual) : a.x;
    a.rows = to_num_rows(x);
    a.d = to_row_len(x);
    a.eps = eps;
    // enough threads that a long row is a few loads per thread; short rows waste little
    int threads = a.d >= 4096 ? 512 : a.d >= 1024 ? 256 : 128;
    int64_t blocks = a.rows < (1 << 30) ? a.rows : (1 << 30);
    to_launch(rms_norm_kernel, (unsigned)blocks, threads, 0, stream, a);
    return to_cuda_check_launch("to_rms_norm");
}
