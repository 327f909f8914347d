// elementwise.cu - add, mul, scale, silu_mul and softmax on one GPU.
//
// Values load into f32 (to_load), are computed in f32 and stored back rounding to nearest even
// (to_store), as the CPU kernels (csrc/cpu/elementwise.c) do. add, mul and scale are one IEEE
// operation each (__fadd_rn/__fmul_rn, never fused), so they give the CPU's bits for every
// non-NaN result. silu and softmax use CUDA's expf (within 2 ulp), not the CPU's exp, so they
// agree with it to a few ulp rather than bit for bit.
//
// out may be exactly the view of an input (in place): each element is read by the thread that
// then writes it, after every read of it, so no order between threads matters.
#include "cuda/common.cuh"
#include "cpu/elementwise.h"

#include <math.h>

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16; // grid-stride loops cover the rest

int blocks_for(int64_t n) { return (int)(to_ceil_div(n, kThreads) < kMaxBlocks ? to_ceil_div(n, kThreads) : kMaxBlocks); }

// ---- add / mul / scale / silu_mul ----

// b.data is NULL for scale. The op switch depends only on arguments: every thread takes the same
// branch. kContiguous: every operand dense, so the logical index is the memory index.
template <bool kContiguous>
__global__ void elementwise_kernel(TensorView out, TensorView a, TensorView b, int op, float scale, int64_t n) {
    to_pdl_wait();
    to_pdl_trigger();
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float x = to_load(a.data, a.dtype, kContiguous ? i : to_offset(a, i));
        float y = op == TO_EW_SCALE ? scale : to_load(b.data, b.dtype, kContiguous ? i : to_offset(b, i));
        float r;
        switch (op) {
        case TO_EW_ADD: r = __fadd_rn(x, y); break;
        case TO_EW_SILU_MUL: r = __fmul_rn(to_silu(x), y); break;
        default: r = __fmul_rn(x, y); break; // mul, scale
        }
        to_store(out.data, out.dtype, kContiguous ? i : to_offset(out, i), r);
    }
}

// ---- softmax ----

// Softmax of rows of length n: a warp per row (kWarp, short rows, several rows per block) or a
// block per row. Three passes over the row, as the CPU does: the maximum m (NaN never compares
// greater, so it is skipped here and poisons the sum instead), the sum of e^(x - m) in double,
// then e^(x - m) * (1 / sum) into out. A row whose maximum is -inf (all -inf, or NaN) is all
// NaN; a +inf gives inf - inf = NaN in the sum, so its row is all NaN too.
template <bool kWarp>
__global__ void softmax_kernel(TensorView out, TensorView x, int64_t rows, int64_t n) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const int tid = kWarp ? threadIdx.x % 32 : threadIdx.x;
    const int nthreads = kWarp ? 32 : blockDim.x;
    const int64_t groups = kWarp ? blockDim.x / 32 : 1; // rows a block works on at once
    const int64_t sx = x.ndim > 0 ? x.strides[x.ndim - 1] : 0, so = out.ndim > 0 ? out.strides[out.ndim - 1] : 0;
    int64_t first = blockIdx.x * groups + (kWarp ? threadIdx.x / 32 : 0);
    for (int64_t r = first; r < rows; r += gridDim.x * groups) {
        const int64_t xr = to_offset(x, r * n), orow = to_offset(out, r * n); // element 0 of the row

        float m = -INFINITY;
        for (int64_t k = tid; k < n; k += nthreads) {
            float v = to_load(x.data, x.dtype, xr + k * sx);
            if (v > m)
                m = v;
        }
        m = kWarp ? to_warp_max(m) : to_block_max(m, fscratch);

        if (m == -INFINITY) { // e^(x - m) is e^NaN: the whole row is NaN, as in torch
            for (int64_t k = tid; k < n; k += nthreads)
                to_store(out.data, out.dtype, orow + k * so, NAN);
            continue; // m is the same in every thread of the group, so all of it continues
        }

        double s = 0.0;
        for (int64_t k = tid; k < n; k += nthreads)
            s += (double)expf(__fsub_rn(to_load(x.data, x.dtype, xr + k * sx), m));
        s = kWarp ? to_warp_sum_double(s) : to_block_sum_double(s, dscratch);

        // sum >= 1 (the maximum contributes e^0) unless NaN/inf crept in, which then spreads
        float inv = (float)(1.0 / s);
        for (int64_t k = tid; k < n; k += nthreads) {
            float e = expf(__fsub_rn(to_load(x.data, x.dtype, xr + k * sx), m));
            to_store(out.data, out.dtype, orow + k * so, __fmul_rn(e, inv));
        }
    }
}

} // namespace

extern "C" {

int to_cuda_elementwise(const to_tensor *out, const to_tensor *a, const to_tensor *b, int op, float scale) {
    int64_t n = to_numel(out);
    if (n == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    TensorView bv = {};
    bv.dtype = TO_F32; // unused for scale
    if (op != TO_EW_SCALE)
        bv = to_view(b);
    bool contiguous = to_is_contiguous(out) && to_is_contiguous(a) && (op == TO_EW_SCALE || to_is_contiguous(b));
    if (contiguous)
        to_launch(elementwise_kernel<true>, blocks_for(n), kThreads, 0, stream, to_view(out), to_view(a), bv, op, scale, n);
    else
        to_launch(elementwise_kernel<false>, blocks_for(n), kThreads, 0, stream, to_view(out), to_view(a), bv, op, scale, n);
    static const char *const names[] = {"to_add", "to_mul", "to_scale", "to_silu_mul"};
    return to_cuda_check_launch(op >= 0 && op < 4 ? names[op] : "to_elementwise");
}

int to_cuda_softmax(const to_tensor *out, const to_tensor *x) {
    if (to_numel(out) == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    int64_t rows = to_num_rows(x), n = to_row_len(x);
    if (n <= 512) {
        // a warp per row (each lane at most 16 elements), 8 rows per block
        int64_t blocks = to_ceil_div(rows, kThreads / 32);
        to_launch(softmax_kernel<true>, (int)(blocks < kMaxBlocks ? blocks : kMaxBlocks), kThreads, 0, stream, to_view(out), to_view(x), rows, n);
    } else {
        // a block per row: 1024 threads for long rows (a vocabulary), fewer for shorter ones
        int threads = n >= 8192 ? 1024 : n >= 2048 ? 512 : 256;
        to_launch(softmax_kernel<false>, (int)(rows < kMaxBlocks ? rows : kMaxBlocks), threads, 0, stream, to_view(out), to_view(x), rows, n);
    }
    return to_cuda_check_launch("to_softmax");
}

} // extern "C"
