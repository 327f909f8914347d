// rope.cu - rotary position embedding of x [T, H, D] (to_rope; formulas in csrc/cpu/rope.c).
//
// The CPU's arithmetic, step for step:
//   angle_i = float(pos) * inv_freq[i]                   f32 product
//   c_i = float(cos(angle_i)) * float(scaling)           cos/sin in double, rounded to f32, then
//   s_i = float(sin(angle_i)) * float(scaling)           scaled in f32
//   rotate-half:  out[i] = a c_i - b s_i, out[i + R/2] = b c_i + a s_i, (a, b) = (x[i], x[i + R/2])
//   interleaved:  the same with (a, b) = (x[2i], x[2i + 1]), written de-interleaved like that
// each product and sum rounded in f32 (__fmul_rn/__fsub_rn/__fadd_rn: no FMA contraction). The
// double cos/sin of CUDA and of the C library are both within about an ulp of double, so after
// rounding to f32 they agree except in the rare case of a value right at an f32 rounding
// boundary: results match the CPU bit for bit almost always, within an f32 ulp of cos/sin always.
// Double cos/sin (with CUDA's full range reduction) stay accurate for any position.
//
// Grid: one block per (token, group of heads). The block computes the token's cos/sin table
// once into shared memory; each warp then rotates one head. A head's rotary slice is loaded
// whole into the warp's shared buffer before anything is written, which out == x (in place)
// needs in the interleaved form (out[i + R/2] is an input of pair (i + R/2) / 2). Dims >= R are
// converted from x to out's dtype unless out is x itself.
#include "cuda/common.cuh"

namespace {

constexpr int kMaxWarps = 4;                 // heads per block
constexpr size_t kDefaultSmem = 48 * 1024;   // dynamic shared memory without opting in

struct RopeArgs {
    TensorView out, x, positions, inv_freq;
    int64_t T, H, D, R;
    int interleaved, in_place, warps;
    float scaling;
};

__global__ void rope_kernel(RopeArgs a) {
    extern __shared__ float smem[];
    const int64_t half = a.R / 2;
    float *cs = smem, *sn = smem + half;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *v = smem + 2 * half + (int64_t)warp * a.R; // this warp's copy of the head's rotary slice

    const int64_t t = blockIdx.x;
    const float pos = (float)to_load_index_dev(a.positions.data, a.positions.dtype, t * a.positions.strides[0]);
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
        float inv = ((const float *)a.inv_freq.data)[i * a.inv_freq.strides[0]];
        float angle = __fmul_rn(pos, inv);
        double c, s;
        sincos((double)angle, &s, &c);
        cs[i] = __fmul_rn((float)c, a.scaling);
        sn[i] = __fmul_rn((float)s, a.scaling);
    }
    __syncthreads();

    const int64_t h = (int64_t)blockIdx.y * a.warps + warp;
    if (h >= a.H)
        return; // no more block-wide barriers below
    const int64_t sx = a.x.strides[2], so = a.out.strides[2];
    const int64_t xo = t * a.x.strides[0] + h * a.x.strides[1];
    const int64_t oo = t * a.out.strides[0] + h * a.out.strides[1];

    for (int64_t i = lane; i < a.R; i += 32)
        v[i] = to_load(a.x.data, a.x.dtype, xo + i * sx);
    __syncwarp();
    for (int64_t i = lane; i < half; i += 32) {
        float x0 = a.interleaved ? v[2 * i] : v[i];
        float x1 = a.interleaved ? v[2 * i + 1] : v[i + half];
        float r0 = __fsub_rn(__fmul_rn(x0, cs[i]), __fmul_rn(x1, sn[i]));
        float r1 = __fadd_rn(__fmul_rn(x1, cs[i]), __fmul_rn(x0, sn[i]));
        to_store(a.out.data, a.out.dtype, oo + i * so, r0);
        to_store(a.out.data, a.out.dtype, oo + (i + half) * so, r1);
    }
    if (a.in_place)
        return; // dims >= R are already there
    for (int64_t i = a.R + lane; i < a.D; i += 32)
        to_store(a.out.data, a.out.dtype, oo + i * so, to_load(a.x.data, a.x.dtype, xo + i * sx));
}

}  // namespace

extern "C" int to_cuda_rope(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
                            const to_tensor *inv_freq, int rotary_dim, int interleaved,
                            double attention_scaling) {
    if (to_numel(x) == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    RopeArgs a = {};
    a.out = to_view(out);
    a.x = to_view(x);
    a.positions = to_view(positions);
    a.inv_freq = to_view(inv_freq);
    a.T = x->shape[0];
    a.H = x->shape[1];
    a.D = x->shape[2];
    a.R = rotary_dim;
    a.interleaved = interleaved != 0;
    a.in_place = to_same_view(out, x);
    a.scaling = (float)attention_scaling;

    // shared memory: the cos and sin tables (R floats together) and one R-float slice per warp;
    // fewer warps for a wide slice, and beyond the default 48 KB opt in to more
    int warps = kMaxWarps;
    while (warps > 1 && (size_t)(1 + warps) * a.R * sizeof(float) > kDefaultSmem)
        warps--;
    size_t smem = (size_t)(1 + warps) * a.R * sizeof(float);
    if (smem > kDefaultSmem) {
        int limit = 0;
        cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, out->device_index);
        if (smem > (size_t)limit)
            return to_fail(TO_ERR_UNSUPPORTED, "to_rope: rotary_dim %d needs %zu bytes of shared "
                           "memory per block on the GPU (at most %d available)", rotary_dim, smem, limit);
        cudaFuncSetAttribute(rope_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    }
    a.warps = warps;
    if (a.T > INT32_MAX)
        return to_fail(TO_ERR_UNSUPPORTED, "to_rope: %lld tokens (at most 2^31 - 1 per call on the GPU)",
                       (long long)a.T);
    int64_t groups = to_ceil_div(a.H, warps);
    if (groups > 65535)
        return to_fail(TO_ERR_UNSUPPORTED, "to_rope: %lld heads (at most %lld per call on the GPU)",
                       (long long)a.H, (long long)65535 * warps);
    dim3 grid((unsigned)a.T, (unsigned)groups);
    rope_kernel<<<grid, warps * 32, smem, stream>>>(a);
    return to_cuda_check_launch("to_rope");
}
