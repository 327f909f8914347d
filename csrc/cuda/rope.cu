// rope.cu - rotary position embedding of x [T, H, D] (to_rope; formulas in csrc/cpu/rope.c), and
// the same after a per-head RMSNorm (to_rms_norm_rope).
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
// once into shared memory; each warp then handles one head.
//
// to_rope: a head's rotary slice is loaded whole into the warp's shared buffer before anything
// is written, which out == x (in place) needs in the interleaved form (out[i + R/2] is an input
// of pair (i + R/2) / 2). Dims >= R are converted from x to out's dtype unless out is x itself.
//
// to_rms_norm_rope: the warp holds its head in registers from the load to the store (lane l the
// pairs l + 32 k and the dims R + l + 32 k), so x is read once and out written once. The norm is
// to_rms_norm's arithmetic (csrc/cuda/norm.cu): squares summed in double (in another order than
// the CPU, so rinv may rarely round an ulp apart), rinv = float(1 / sqrt(ss / D + eps)),
// y = (v * rinv) * w in f32; the rotation above then reads y, and dims >= R are y.
//
// to_rope_kv_store: either kernel with the cache store switched on (a.kv.Hkv > 0), so a decode
// layer's rotation and cache write are one launch. The warp of one of the last Hkv heads (k's)
// writes each value it stores into out to the head's cache row too, rounded to out's dtype first:
// exactly what to_kv_cache_store would read back from out, so the caches get the separate ops'
// bits. The grid has Hkv more heads: the warps past the H rotated ones copy v's heads to their
// rows (the same conversion as kv_store_kernel). Slots are checked as to_kv_cache_store's kernel
// checks them (kv_store.cuh); a bad one is recorded once per token, by v's first head.
#include "cuda/rope.cuh"

namespace {

constexpr int kMaxWarps = 4;                 // heads per block
constexpr size_t kDefaultSmem = 48 * 1024;   // dynamic shared memory without opting in
constexpr int kMaxPerLane = 16;              // fused: pairs (and dims >= R) per lane in registers


// Where the warp of head h of token t stores the head's values in the k cache: the element offset
// of its row, or -1 (not a k head, no store, or a token without a slot).
__device__ __forceinline__ int64_t k_row(const RopeArgs &a, int64_t t, int64_t h) {
    const int64_t kh = h - (a.H - a.kv.Hkv);
    if (a.kv.Hkv == 0 || kh < 0)
        return -1;
    const int64_t slot = kv_slot(a.kv, t, false); // reported by v's first head (copy_v_head)
    return slot < 0 ? -1 : kv_row(a.kv, slot, kh);
}

// out[i] = r (oo: the head's offset in out), and r into the k cache row krow (>= 0) as out holds it
__device__ __forceinline__ void put(const RopeArgs &a, int64_t oo, int64_t krow, int64_t i, float r) {
    to_store(a.out.data, a.out.dtype, oo + i * a.out.strides[2], r);
    if (krow >= 0)
        to_store(a.kv.k_cache, a.kv.cache_dtype, krow + i, to_round(a.out.dtype, r));
}

// The warp of v's head hv of token t: the head to its cache row.
__device__ void copy_v_head(const RopeArgs &a, int64_t t, int64_t hv, int lane) {
    const int64_t slot = kv_slot(a.kv, t, hv == 0 && lane == 0);
    if (slot < 0)
        return;
    const int64_t row = kv_row(a.kv, slot, hv);
    constexpr int U = 8; // loads in flight per lane (to_load_n)
    for (int64_t d0 = lane; d0 < a.D; d0 += 32 * U) {
        int64_t off[U];
        bool in[U];
        float v[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t d = d0 + 32 * u;
            in[u] = d < a.D;
            off[u] = t * a.kv.vs0 + hv * a.kv.vs1 + d * a.kv.vs2;
        }
        to_load_n(a.kv.v, a.kv.v_dtype, off, in, v);
#pragma unroll
        for (int u = 0; u < U; u++)
            if (in[u])
                to_store(a.kv.v_cache, a.kv.cache_dtype, row + d0 + 32 * u, v[u]);
    }
}

__global__ void rope_kernel(RopeArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    extern __shared__ float smem[];
    const int64_t half = a.R / 2;
    float *cs = smem, *sn = smem + half;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *v = smem + 2 * half + (int64_t)warp * a.R; // this warp's copy of the head's rotary slice

    const int64_t t = blockIdx.x;
    const int64_t h = (int64_t)blockIdx.y * a.warps + warp;
    if ((int64_t)blockIdx.y * a.warps < a.H) // (block-uniform: blocks of v's heads alone skip it)
        cos_sin_table(a, t, cs, sn);
    if (h >= a.H) { // no more block-wide barriers below
        if (h < a.H + a.kv.Hkv)
            copy_v_head(a, t, h - a.H, lane);
        return;
    }
    const int64_t sx = a.x.strides[2];
    const int64_t xo = t * a.x.strides[0] + h * a.x.strides[1];
    const int64_t oo = t * a.out.strides[0] + h * a.out.strides[1];
    const int64_t krow = k_row(a, t, h);

    for (int64_t i = lane; i < a.R; i += 32)
        v[i] = to_load(a.x.data, a.x.dtype, xo + i * sx);
    __syncwarp();
    for (int64_t i = lane; i < half; i += 32) {
        float x0 = a.interleaved ? v[2 * i] : v[i];
        float x1 = a.interleaved ? v[2 * i + 1] : v[i + half];
        float r0 = __fsub_rn(__fmul_rn(x0, cs[i]), __fmul_rn(x1, sn[i]));
        float r1 = __fadd_rn(__fmul_rn(x1, cs[i]), __fmul_rn(x0, sn[i]));
        put(a, oo, krow, i, r0);
        put(a, oo, krow, i + half, r1);
    }
    if (a.in_place && krow < 0)
        return; // dims >= R are already there
    for (int64_t i = a.R + lane; i < a.D; i += 32) {
        const float y = to_load(a.x.data, a.x.dtype, xo + i * sx);
        if (!a.in_place)
            to_store(a.out.data, a.out.dtype, oo + i * a.out.strides[2], y);
        if (krow >= 0) // (in place y is out's value already: the rounding changes nothing)
            to_store(a.kv.k_cache, a.kv.cache_dtype, krow + i, to_round(a.out.dtype, y));
    }
}

// N: pairs (and dims >= R) per lane, at least ceil(R/2 / 32) and ceil((D - R) / 32)
template <int N>
__global__ void rms_norm_rope_kernel(RopeArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    extern __shared__ float smem[];
    float *cs = smem, *sn = smem + a.R / 2;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    const int64_t t = blockIdx.x;
    const int64_t h = (int64_t)blockIdx.y * a.warps + warp;
    const int64_t sx = a.x.strides[2], sw = a.weight.strides[a.weight.ndim - 1];
    const int64_t wo = a.weight.ndim == 2 ? h * a.weight.strides[0] : 0; // a per-head weight's row
    const int64_t xo = t * a.x.strides[0] + h * a.x.strides[1];

    // The head's values and the norm's weights (rope_head_layout; zeros where missing), all
    // loaded before the cos/sin table is built.
    float v[3 * N], w[3 * N];
    if (h < a.H) {
        int64_t e[3 * N], xoff[3 * N], woff[3 * N];
        bool in[3 * N];
        rope_head_layout<N>(a.D, a.R, a.interleaved, lane, e, in);
#pragma unroll
        for (int m = 0; m < 3 * N; m++) {
            xoff[m] = xo + e[m] * sx;
            woff[m] = wo + e[m] * sw;
        }
        to_load_n(a.x.data, a.x.dtype, xoff, in, v);
        to_load_n(a.weight.data, a.weight.dtype, woff, in, w);
    }
    if ((int64_t)blockIdx.y * a.warps < a.H) // (block-uniform: blocks of v's heads alone skip it)
        cos_sin_table(a, t, cs, sn);
    if (h >= a.H) { // whole warps leave: the shuffles below always have all 32 lanes
        if (h < a.H + a.kv.Hkv)
            copy_v_head(a, t, h - a.H, lane);
        return;
    }
    const int64_t krow = k_row(a, t, h);
    const int64_t oo = t * a.out.strides[0] + h * a.out.strides[1];
    // (every lane has read its part of the head before any lane writes: out may be x)
    norm_rope_head<N>(v, w, true, a.eps, a.D, a.R, lane, cs, sn,
                      [&](int64_t i, float r) { put(a, oo, krow, i, r); });
}

// grid (T, head groups of a.warps: x's H heads, then v's Hkv when storing), or an error when the
// grid limits are exceeded
int rope_grid(const char *op, const RopeArgs &a, dim3 *grid) {
    if (a.T > INT32_MAX)
        return to_fail(TO_ERR_UNSUPPORTED, "%s: %lld tokens (at most 2^31 - 1 per call on the GPU)", op,
                       (long long)a.T);
    int64_t groups = to_ceil_div(a.H + a.kv.Hkv, a.warps);
    if (groups > 65535)
        return to_fail(TO_ERR_UNSUPPORTED, "%s: %lld heads (at most %lld per call on the GPU)", op,
                       (long long)(a.H + a.kv.Hkv), (long long)65535 * a.warps);
    *grid = dim3((unsigned)a.T, (unsigned)groups);
    return TO_OK;
}

// rope_kernel: the rotation alone (a.kv.Hkv may switch the store on)
int launch_rope(const char *op, RopeArgs &a, int dev, cudaStream_t stream) {
    // shared memory: the cos and sin tables (R floats together) and one R-float slice per warp;
    // fewer warps for a wide slice, and beyond the default 48 KB opt in to more
    int warps = kMaxWarps;
    while (warps > 1 && (size_t)(1 + warps) * a.R * sizeof(float) > kDefaultSmem)
        warps--;
    size_t smem = (size_t)(1 + warps) * a.R * sizeof(float);
    if (smem > kDefaultSmem) {
        int limit = 0;
        cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
        if (smem > (size_t)limit)
            return to_fail(TO_ERR_UNSUPPORTED, "%s: rotary_dim %lld needs %zu bytes of shared memory "
                           "per block on the GPU (at most %d available)", op, (long long)a.R, smem, limit);
        cudaFuncSetAttribute(rope_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    }
    a.warps = warps;
    dim3 grid;
    TO_TRY(rope_grid(op, a, &grid));
    to_launch(rope_kernel, grid, dim3(warps * 32), smem, stream, a);
    return to_cuda_check_launch(op);
}

// rms_norm_rope_kernel: the norm (a.weight) and the rotation (a.kv.Hkv may switch the store on)
int launch_rms_norm_rope(const char *op, RopeArgs &a, cudaStream_t stream) {
    int64_t per_lane = to_ceil_div(a.R / 2, 32), rest = to_ceil_div(a.D - a.R, 32);
    per_lane = per_lane > rest ? per_lane : rest;
    if (per_lane > kMaxPerLane)
        return to_fail(TO_ERR_UNSUPPORTED, "%s: head dim %lld with rotary_dim %lld is too wide for the GPU "
                       "kernel (rotary_dim / 2 and D - rotary_dim at most %d each)", op, (long long)a.D,
                       (long long)a.R, 32 * kMaxPerLane);
    // a warp per head, up to kMaxWarps heads of one token per block sharing its cos/sin table
    const int64_t heads = a.H + a.kv.Hkv;
    a.warps = heads < kMaxWarps ? (int)heads : kMaxWarps;
    dim3 grid, block(a.warps * 32);
    TO_TRY(rope_grid(op, a, &grid));
    size_t smem = (size_t)a.R * sizeof(float); // cos and sin, R/2 each
    if (per_lane <= 1)
        to_launch(rms_norm_rope_kernel<1>, grid, block, smem, stream, a);
    else if (per_lane <= 2)
        to_launch(rms_norm_rope_kernel<2>, grid, block, smem, stream, a);
    else if (per_lane <= 4)
        to_launch(rms_norm_rope_kernel<4>, grid, block, smem, stream, a);
    else if (per_lane <= 8)
        to_launch(rms_norm_rope_kernel<8>, grid, block, smem, stream, a);
    else
        to_launch(rms_norm_rope_kernel<16>, grid, block, smem, stream, a);
    return to_cuda_check_launch(op);
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
    RopeArgs a = rope_args(out, x, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
    return launch_rope("to_rope", a, out->device_index, stream);
}

extern "C" int to_cuda_rms_norm_rope(const to_tensor *out, const to_tensor *x, const to_tensor *weight,
                                     double eps, const to_tensor *positions, const to_tensor *inv_freq,
                                     int rotary_dim, int interleaved, double attention_scaling) {
    if (to_numel(x) == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    RopeArgs a = rope_args(out, x, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
    a.weight = to_view(weight);
    a.eps = eps;
    return launch_rms_norm_rope("to_rms_norm_rope", a, stream);
}

extern "C" int to_cuda_rope_kv_store(const to_tensor *out, const to_tensor *qk, const to_tensor *weight,
                                     double eps, const to_tensor *positions, const to_tensor *inv_freq,
                                     int rotary_dim, int interleaved, double attention_scaling,
                                     const to_tensor *v, const to_tensor *k_cache, const to_tensor *v_cache,
                                     const to_tensor *slot_mapping) {
    const char *op = "to_rope_kv_store";
    if (to_numel(qk) == 0) // (then T or Hkv is 0 too: nothing to store)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    RopeArgs a = rope_args(out, qk, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
    TO_TRY(kv_store_init(&a.kv, k_cache, v_cache, v, slot_mapping, TO_GPU_ERR_ROPE_KV_SLOT));
    if (!weight)
        return launch_rope(op, a, out->device_index, stream);
    a.weight = to_view(weight);
    a.eps = eps;
    return launch_rms_norm_rope(op, a, stream);
}
