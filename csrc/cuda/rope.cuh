// rope.cuh - the rotation's arguments and its per-head arithmetic (formulas: rope.cu's top
// comment), shared by rope.cu's kernels and the decode attention that rotates its own q and k
// (to_rope_kv_attention, attention.cu).
#pragma once

#include "cuda/common.cuh"
#include "cuda/kv_store.cuh"

struct RopeArgs {
    TensorView out, x, positions, inv_freq, weight; // weight: the norm's (data null: no norm)
    int64_t T, H, D, R;
    int interleaved, in_place, warps;
    float scaling;
    double eps;
    KvStore kv; // kv.Hkv > 0: out's last Hkv heads and v's go to the caches (to_rope_kv_store)
};

// The arguments every op shares (no norm, no store).
inline RopeArgs rope_args(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
                          const to_tensor *inv_freq, int rotary_dim, int interleaved, double attention_scaling) {
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
    return a;
}

// Pair i's scaled cos and sin at position pos (inv: inv_freq[i]): the angle in f32, cos/sin in
// double rounded to f32, then scaled in f32.
__device__ __forceinline__ void rope_cos_sin(float pos, float inv, float scaling, float *c, float *s) {
    const float angle = __fmul_rn(pos, inv);
    double cd, sd;
    sincos((double)angle, &sd, &cd);
    *c = __fmul_rn((float)cd, scaling);
    *s = __fmul_rn((float)sd, scaling);
}

// inv_freq[i], and token t's position as a float
__device__ __forceinline__ float rope_inv_freq(const RopeArgs &a, int64_t i) {
    return ((const float *)a.inv_freq.data)[i * a.inv_freq.strides[0]];
}
__device__ __forceinline__ float rope_position(const RopeArgs &a, int64_t t) {
    return (float)to_load_index_dev(a.positions.data, a.positions.dtype, t * a.positions.strides[0]);
}

// cs, sn [R/2] in shared memory: token t's scaled cos/sin, computed by the whole block.
__device__ __forceinline__ void cos_sin_table(const RopeArgs &a, int64_t t, float *cs, float *sn) {
    const float pos = rope_position(a, t);
    for (int64_t i = threadIdx.x; i < a.R / 2; i += blockDim.x)
        rope_cos_sin(pos, rope_inv_freq(a, i), a.scaling, cs + i, sn + i);
    __syncthreads();
}

// A head as one warp holds it for the norm and the rotation (N per lane, lane l): e[k] is the
// first member of pair i = l + 32 k (i rotate-half, 2i interleaved), e[N + k] its partner
// (i + R/2, 2i + 1), e[2N + k] the dim R + i (dims >= R are not rotated); in[] whether each is
// inside the head. N must be at least ceil(R/2 / 32) and ceil((D - R) / 32).
template <int N>
__device__ __forceinline__ void rope_head_layout(int64_t D, int64_t R, bool interleaved, int lane,
                                                 int64_t (&e)[3 * N], bool (&in)[3 * N]) {
    const int64_t half = R / 2, step = interleaved ? 2 : 1, other = interleaved ? 1 : half;
#pragma unroll
    for (int k = 0; k < N; k++) {
        const int64_t i = lane + 32 * k, j = R + i;
        e[k] = i * step;
        e[N + k] = i * step + other;
        e[2 * N + k] = j;
        in[k] = in[N + k] = i < half;
        in[2 * N + k] = j < D;
    }
}

// The norm (when `norm`: rinv from the squares summed in double, y = (v * rinv) * w in f32) and
// the rotation of a head held in that layout (zeros where not in the head), by the whole warp:
// put(i, r) for every output dim i (rotated pairs at i and i + R/2, then dims >= R), r not yet
// rounded. Every lane has its values before any put (the caller may write where they were read).
template <int N, typename Put>
__device__ __forceinline__ void norm_rope_head(const float (&v)[3 * N], const float (&w)[3 * N], bool norm,
                                               double eps, int64_t D, int64_t R, int lane, const float *cs,
                                               const float *sn, Put put) {
    const int64_t half = R / 2;
    const float *v0 = v, *v1 = v + N, *vr = v + 2 * N;
    float rinv = 1.0f;
    if (norm) {
        double ss = 0.0;
#pragma unroll
        for (int k = 0; k < N; k++) // squares are exact in double; the zeros of missing elements add nothing
            ss += (double)v0[k] * v0[k] + (double)v1[k] * v1[k] + (double)vr[k] * vr[k];
        ss = to_warp_sum_double(ss);
        rinv = (float)(1.0 / sqrt(ss / (double)D + eps));
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < N; k++) {
        const int64_t i = lane + 32 * k, j = R + i;
        if (i < half) {
            const float y0 = norm ? __fmul_rn(__fmul_rn(v0[k], rinv), w[k]) : v0[k];
            const float y1 = norm ? __fmul_rn(__fmul_rn(v1[k], rinv), w[N + k]) : v1[k];
            put(i, __fsub_rn(__fmul_rn(y0, cs[i]), __fmul_rn(y1, sn[i])));
            put(i + half, __fadd_rn(__fmul_rn(y1, cs[i]), __fmul_rn(y0, sn[i])));
        }
        if (j < D)
            put(j, norm ? __fmul_rn(__fmul_rn(vr[k], rinv), w[2 * N + k]) : vr[k]);
    }
}
