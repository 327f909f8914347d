// attn_lab.cu - one fused decode-attention kernel per layer, measured on a layer chain (a
// development tool, not part of the library). Build and run on a GPU:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/attn_lab benchmarks/attn_lab.cu && /tmp/attn_lab
// (Its results: BENCHMARKS.md, CUDA seventh pass.)
//
// The question (BENCHMARKS.md, CUDA sixth pass): the library's decode attention costs ~16 µs of a
// 0.6B step even with its code and data hot, and the rope / KV-store kernel before it a few more,
// while the work itself is a few hundred KB. How much is left when one kernel does it all for a
// token: the q and k RMSNorm, the rotation, the KV cache write and the attention, its key
// segments merged through a thread-block cluster's distributed shared memory (no partials through
// the L2, no arrival counters, no checking block)?
//
// Method: for each shape set (Qwen3-0.6B: 16 q heads, 28 layers; 4B: 32 q heads, 36 layers; both
// 8 kv heads, head dim 128, bf16 caches of 16-token blocks, batch 1) and context, a CUDA graph of
// all layers, each a streaming kernel reading that layer's product bytes from DRAM (evicting the
// L2 as the model's GEMVs do) followed by the step under test, every launch programmatic
// (griddepcontrol). Reported per layer: the stream alone, and what each variant adds to it: an
// empty kernel (a launch's own cost in the chain), the unfused pair (rope_kernel, then the
// attention from its q: the library's two launches, with this file's cluster merge), and the fused
// kernel with 4, 8 or 16 blocks per cluster. Each is checked first against a plain reference
// kernel (out, with the cache rows it wrote).
//
// What the library's version would add: the batch checks (lengths, table entries: the general
// path's "a bad batch writes nothing"), several sequences and several queries per sequence, other
// dtypes and head sizes. Numerics here: rsqrtf and sincosf (the library matches the CPU's
// double-precision rotation), so the reference is a tolerance, not bits.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <vector>

namespace cg = cooperative_groups;
typedef __nv_bfloat16 bf16;

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(1); } } while (0)

constexpr int D = 128, BS = 16, THREADS = 128, GROUPS = 8, LANES = 16; // a key: 16 lanes x 8 values
constexpr int RUN = 128;        // keys whose cache rows are looked up together
constexpr int NK = 4;           // keys per group in flight
constexpr float kLog2e = 1.4426950408889634f;

struct LayerArgs {
    const bf16 *qkv;              // [(Hq + 2 Hkv) * D]: the token's q, k and v heads
    const bf16 *q_norm, *k_norm;  // [D]
    const float *inv_freq;        // [D / 2]
    bf16 *k_cache, *v_cache;      // [blocks][BS][Hkv][D]
    const int *table;             // the sequence's block table
    const int *len;               // its context, the new token included (read on the device)
    bf16 *out;                    // [Hq * D]
    float *qbuf;                  // [Hq * D]: q as the unfused pair passes it on (rope_kernel)
    int Hq, Hkv;
    float scale, eps;
};

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() { asm volatile("griddepcontrol.launch_dependents;" :::); }
__device__ __forceinline__ float wsum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// One head of the token (a warp): RMSNorm with weight w (when w), then the rotate-half rotation at
// position pos (when rotate); lane l holds d = 4 l .. 4 l + 3, its rotation partner is lane l ^ 16.
__device__ void head_values(const bf16 *x, const bf16 *w, const float *inv_freq, int pos, float eps,
                            bool rotate, float (&y)[4]) {
    const int lane = threadIdx.x % 32;
    const uint2 raw = *reinterpret_cast<const uint2 *>(x + 4 * lane);
    const bf16 *v = reinterpret_cast<const bf16 *>(&raw);
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        y[i] = __bfloat162float(v[i]);
        ss += y[i] * y[i];
    }
    if (w) {
        const float rinv = rsqrtf(wsum(ss) / D + eps);
        const uint2 wr = *reinterpret_cast<const uint2 *>(w + 4 * lane);
        const bf16 *wv = reinterpret_cast<const bf16 *>(&wr);
#pragma unroll
        for (int i = 0; i < 4; i++) y[i] = y[i] * rinv * __bfloat162float(wv[i]);
    }
    if (!rotate)
        return;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int d = 4 * lane + i, j = d % (D / 2);
        const float other = __shfl_xor_sync(0xffffffffu, y[i], 16);
        float s, c;
        sincosf((float)pos * inv_freq[j], &s, &c);
        y[i] = d < D / 2 ? y[i] * c - other * s : y[i] * c + other * s;
    }
}

// The token's heads of kv head g (a block per g; a warp per head, in turn): the group's G q heads
// (normed, rotated, scaled) to out_q, k (normed, rotated) and v to the new token's cache rows
// when `row` >= 0, and as the cache holds them to kn / vn (shared memory of the caller).
template <int G>
__device__ void token_heads(const LayerArgs &a, int g, int pos, int64_t row, float (*out_q)[D], float *kn, float *vn) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int item = warp; item < G + 2; item += THREADS / 32) {
        float y[4];
        if (item < G) {
            head_values(a.qkv + (g * G + item) * D, a.q_norm, a.inv_freq, pos, a.eps, true, y);
#pragma unroll
            for (int i = 0; i < 4; i++) out_q[item][4 * lane + i] = y[i] * a.scale * kLog2e;
        } else {
            const bool is_k = item == G;
            const bf16 *x = a.qkv + (a.Hq + (is_k ? 0 : a.Hkv) + g) * D;
            head_values(x, is_k ? a.k_norm : nullptr, a.inv_freq, pos, a.eps, is_k, y);
            float *dst = is_k ? kn : vn;
            bf16 *cache = is_k ? a.k_cache : a.v_cache;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                if (dst)
                    dst[4 * lane + i] = round_bf16(y[i]);
                if (row >= 0)
                    cache[row + 4 * lane + i] = __float2bfloat16_rn(y[i]);
            }
        }
    }
}

// The unfused pair's first kernel (what the library's to_rope_kv_store does): grid Hkv.
template <int G>
__global__ void __launch_bounds__(THREADS) rope_kernel(LayerArgs a) {
    pdl_trigger();
    pdl_wait();
    const int g = blockIdx.x, pos = *a.len - 1;
    const int64_t row = (((int64_t)a.table[pos / BS] * BS + pos % BS) * a.Hkv + g) * D;
    token_heads<G>(a, g, pos, row, reinterpret_cast<float (*)[D]>(a.qbuf + g * G * D), nullptr, nullptr);
}

// Grid (NS, Hkv), clusters of NS blocks along x: block `split` of kv head g takes keys
// [split * seg, (split + 1) * seg) of the context; the block whose segment holds the new token
// writes its k and v to the cache and uses them from shared memory. Every block leaves its
// partial (m, l, acc per q row) in shared memory; after the cluster barrier each block merges a
// slice of d for every row, reading the others' partials through distributed shared memory.
// ROPE false: the unfused pair's second kernel (q from a.qbuf, the new token from the cache, as
// rope_kernel left them).
template <int G, bool ROPE>
__global__ void __launch_bounds__(THREADS) fused_kernel(LayerArgs a) {
    __shared__ __align__(16) float sQ[G][D];       // q, normed, rotated, times scale * log2 e
    __shared__ __align__(16) float sKn[D], sVn[D]; // the new token's k and v (as the cache has them)
    __shared__ int64_t sRow[RUN];                  // cache rows of a run of keys
    __shared__ __align__(16) float sAcc[GROUPS][G][D];
    __shared__ float sM[GROUPS][G], sL[GROUPS][G];
    __shared__ float pM[G], pL[G];                 // the block's partial, read by the cluster
    __shared__ __align__(16) float pAcc[G][D];
    cg::cluster_group cluster = cg::this_cluster();
    const int NS = (int)cluster.num_blocks(), split = (int)cluster.block_rank(), g = blockIdx.y;
    const int tid = threadIdx.x, warp = tid / 32, gi = tid / LANES, li = tid % LANES;

    pdl_trigger();
    pdl_wait();
    const int len = *a.len, pos = len - 1;
    const int seg = ((len + NS - 1) / NS + 7) / 8 * 8;
    const int k0 = split * seg, k1 = min(len, k0 + seg);
    const bool owner = ROPE && k0 <= pos && pos < k1;   // the new token from sKn / sVn
    const int cached_end = ROPE ? min(k1, pos) : k1;

    if (ROPE) {
        const int64_t row = owner ? (((int64_t)a.table[pos / BS] * BS + pos % BS) * a.Hkv + g) * D : -1;
        token_heads<G>(a, g, pos, row, sQ, sKn, sVn);
    } else {
        for (int i = tid; i < G * D; i += THREADS)
            sQ[i / D][i % D] = a.qbuf[g * G * D + i];
    }
    __syncthreads();

    // this lane's slice of q, and its group's online softmax
    float q[G][8], m[G], l[G], acc[G][8];
#pragma unroll
    for (int r = 0; r < G; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            q[r][e] = sQ[r][li * 8 + e];
            acc[r][e] = 0.0f;
        }
    }
    // a key for the group (every lane of the warp calls it: the shuffles are warp-wide; a group
    // without a key here passes valid = false and changes nothing)
    auto add_key = [&](const float (&kf)[8], const float (&vf)[8], bool valid) {
#pragma unroll
        for (int r = 0; r < G; r++) {
            float s = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; e++) s += q[r][e] * kf[e];
#pragma unroll
            for (int o = LANES / 2; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            s = valid ? s : -INFINITY;
            const float mx = fmaxf(m[r], s), ref = mx == -INFINITY ? 0.0f : mx;
            const float alpha = exp2f(m[r] - ref), p = exp2f(s - ref);
            l[r] = l[r] * alpha + p;
#pragma unroll
            for (int e = 0; e < 8; e++) acc[r][e] = acc[r][e] * alpha + p * vf[e];
            m[r] = mx;
        }
    };
    for (int c0 = k0; c0 < cached_end; c0 += RUN) {
        const int n = min(RUN, cached_end - c0);
        __syncthreads(); // sRow is no longer read
        if (tid < n) {
            const int p = c0 + tid;
            sRow[tid] = (((int64_t)a.table[p / BS] * BS + p % BS) * a.Hkv + g) * D;
        }
        __syncthreads();
        for (int kb = 0; kb < n; kb += GROUPS * NK) {
            uint4 kr[NK], vr[NK];
#pragma unroll
            for (int k = 0; k < NK; k++) { // all loads first
                const int j = kb + gi + GROUPS * k;
                kr[k] = vr[k] = make_uint4(0, 0, 0, 0);
                if (j < n) {
                    kr[k] = *reinterpret_cast<const uint4 *>(a.k_cache + sRow[j] + li * 8);
                    vr[k] = *reinterpret_cast<const uint4 *>(a.v_cache + sRow[j] + li * 8);
                }
            }
#pragma unroll
            for (int k = 0; k < NK; k++) {
                float kf[8], vf[8];
                const bf16 *kb16 = reinterpret_cast<const bf16 *>(&kr[k]), *vb16 = reinterpret_cast<const bf16 *>(&vr[k]);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    kf[e] = __bfloat162float(kb16[e]);
                    vf[e] = __bfloat162float(vb16[e]);
                }
                add_key(kf, vf, kb + gi + GROUPS * k < n);
            }
        }
    }
    if (owner && warp == 0) { // the new token, by group 0 (the warp's other group passes)
        float kf[8], vf[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            kf[e] = sKn[li * 8 + e];
            vf[e] = sVn[li * 8 + e];
        }
        add_key(kf, vf, gi == 0);
    }

    // the groups combined into the block's partial
    if (li == 0)
#pragma unroll
        for (int r = 0; r < G; r++) {
            sM[gi][r] = m[r];
            sL[gi][r] = l[r];
        }
#pragma unroll
    for (int r = 0; r < G; r++)
#pragma unroll
        for (int e = 0; e < 8; e++) sAcc[gi][r][li * 8 + e] = acc[r][e];
    __syncthreads();
    for (int i = tid; i < G * D; i += THREADS) {
        const int r = i / D, d = i % D;
        float mx = -INFINITY;
        for (int j = 0; j < GROUPS; j++) mx = fmaxf(mx, sM[j][r]);
        float x = 0.0f, lsum = 0.0f;
        for (int j = 0; j < GROUPS; j++) {
            const float w = sM[j][r] == -INFINITY ? 0.0f : exp2f(sM[j][r] - mx);
            x += w * sAcc[j][r][d];
            lsum += w * sL[j][r];
        }
        pAcc[r][d] = x;
        if (d == 0) {
            pM[r] = mx;
            pL[r] = lsum;
        }
    }

    // the cluster's partials merged: block `split` writes d in [split * D / NS, (split + 1) * D / NS)
    cluster.sync();
    const int per = D / NS;
    for (int i = tid; i < G * per; i += THREADS) {
        const int r = i / per, d = split * per + i % per;
        float mx = -INFINITY;
        for (int b = 0; b < NS; b++) mx = fmaxf(mx, *cluster.map_shared_rank(&pM[r], b));
        float x = 0.0f, lsum = 0.0f;
        for (int b = 0; b < NS; b++) {
            const float mb = *cluster.map_shared_rank(&pM[r], b);
            const float w = mb == -INFINITY ? 0.0f : exp2f(mb - mx);
            x += w * *cluster.map_shared_rank(&pAcc[r][d], b);
            lsum += w * *cluster.map_shared_rank(&pL[r], b);
        }
        a.out[(g * G + r) * D + d] = __float2bfloat16_rn(x / lsum);
    }
    cluster.sync(); // the others' shared memory stays until every block has read it
}

// The plain reference: one block per q head, every key in order, f32 throughout (the cache's k
// and v of the new token as the fused kernel rounds them: it reads them back from the cache).
__global__ void reference_kernel(LayerArgs a, float *out) {
    __shared__ float q[D], p[4096 + 1];
    const int h = blockIdx.x, G = a.Hq / a.Hkv, g = h / G, len = *a.len, pos = len - 1;
    if (threadIdx.x < 32) {
        float y[4];
        head_values(a.qkv + h * D, a.q_norm, a.inv_freq, pos, a.eps, true, y);
        for (int i = 0; i < 4; i++) q[4 * threadIdx.x + i] = y[i] * a.scale;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < len; t += blockDim.x) {
        const int64_t row = (((int64_t)a.table[t / BS] * BS + t % BS) * a.Hkv + g) * D;
        float s = 0.0f;
        for (int d = 0; d < D; d++) s += q[d] * __bfloat162float(a.k_cache[row + d]);
        p[t] = s;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int t = 0; t < len; t++) mx = fmaxf(mx, p[t]);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float x = 0.0f, sum = 0.0f;
        for (int t = 0; t < len; t++) {
            const int64_t row = (((int64_t)a.table[t / BS] * BS + t % BS) * a.Hkv + g) * D;
            const float w = expf(p[t] - mx);
            x += w * __bfloat162float(a.v_cache[row + d]);
            sum += w;
        }
        out[h * D + d] = x / sum;
    }
}

// The layer's weight bytes read once (16-byte loads, 4 in flight per thread), as the GEMVs do.
__global__ void stream_kernel(const uint4 *w, int64_t n, unsigned *sink) {
    pdl_trigger();
    pdl_wait();
    unsigned x = 0;
    const int64_t step = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += 4 * step) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) v[u] = i + u * step < n ? __ldcs(w + i + u * step) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < 4; u++) x ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (x == 0x9e3779b9u)
        *sink = x; // never, in practice: keeps the loads
}

__global__ void empty_kernel(LayerArgs) {
    pdl_trigger();
    pdl_wait();
}

// ------------------------------------------------------------------------------------- host

static uint32_t rng = 12345;
static float urand() { // [-1, 1)
    rng = rng * 1664525u + 1013904223u;
    return (float)(rng >> 8) / (float)(1u << 23) - 1.0f;
}
template <typename T> static T *upload(const std::vector<T> &h) {
    T *p;
    CK(cudaMalloc(&p, h.size() * sizeof(T)));
    CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
}
static std::vector<bf16> random_bf16(size_t n, float scale) {
    std::vector<bf16> v(n);
    for (auto &x : v) x = __float2bfloat16_rn(urand() * scale);
    return v;
}

// One layer's inputs: the token's heads, the norms, caches of pool_blocks blocks (from `cache`,
// random values made once); set_context gives it a context.
static LayerArgs make_layer(int Hq, int Hkv, int pool_blocks, const std::vector<bf16> &cache) {
    LayerArgs a = {};
    a.Hq = Hq, a.Hkv = Hkv, a.scale = 1.0f / sqrtf((float)D), a.eps = 1e-6f;
    a.qkv = upload(random_bf16((size_t)(Hq + 2 * Hkv) * D, 1.0f));
    a.q_norm = upload(random_bf16(D, 1.0f));
    a.k_norm = upload(random_bf16(D, 1.0f));
    std::vector<float> inv(D / 2);
    for (int i = 0; i < D / 2; i++) inv[i] = powf(1e6f, -2.0f * i / D);
    a.inv_freq = upload(inv);
    a.k_cache = upload(cache);
    a.v_cache = upload(cache);
    std::vector<int> table(pool_blocks);
    for (int j = 0; j < pool_blocks; j++) table[j] = (int)((j * 7919 + 13) % pool_blocks); // a shuffle
    a.table = upload(table);
    a.len = upload(std::vector<int>{1});
    bf16 *out;
    CK(cudaMalloc(&out, (size_t)Hq * D * sizeof(bf16)));
    a.out = out;
    CK(cudaMalloc(&a.qbuf, (size_t)Hq * D * sizeof(float)));
    return a;
}

static void set_context(const LayerArgs &a, int ctx) {
    CK(cudaMemcpy((void *)a.len, &ctx, sizeof(int), cudaMemcpyHostToDevice));
}

// (an error, not an exit: a cluster size the GPU cannot schedule is reported and skipped)
template <int G, bool ROPE>
static cudaError_t launch_fused(const LayerArgs &a, int ns, cudaStream_t s) {
    static bool opted = false;
    if (!opted) {
        CK(cudaFuncSetAttribute(fused_kernel<G, ROPE>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
        opted = true;
    }
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = ns, attr[0].val.clusterDim.y = 1, attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(ns, a.Hkv);
    cfg.blockDim = dim3(THREADS);
    cfg.stream = s;
    cfg.attrs = attr;
    cfg.numAttrs = 2;
    return cudaLaunchKernelEx(&cfg, fused_kernel<G, ROPE>, a);
}

template <typename... P, typename... A>
static void launch_pdl(void (*k)(P...), dim3 grid, dim3 block, cudaStream_t s, A... args);

// the fused kernel, or (split) rope_kernel then the attention alone
static cudaError_t launch_attention(const LayerArgs &a, int ns, bool split, cudaStream_t s) {
    const bool g2 = a.Hq / a.Hkv == 2;
    if (!split)
        return g2 ? launch_fused<2, true>(a, ns, s) : launch_fused<4, true>(a, ns, s);
    launch_pdl(g2 ? rope_kernel<2> : rope_kernel<4>, dim3(a.Hkv), dim3(THREADS), s, a);
    return g2 ? launch_fused<2, false>(a, ns, s) : launch_fused<4, false>(a, ns, s);
}

template <typename... P, typename... A>
static void launch_pdl(void (*k)(P...), dim3 grid, dim3 block, cudaStream_t s, A... args) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid, cfg.blockDim = block, cfg.stream = s, cfg.attrs = attr, cfg.numAttrs = 1;
    CK(cudaLaunchKernelEx(&cfg, k, args...));
}

// max |fused - reference| over out, relative to the largest |reference|; -1 when the launch fails
static double check(const LayerArgs &a, int ns, bool split, cudaStream_t s) {
    float *ref;
    CK(cudaMalloc(&ref, (size_t)a.Hq * D * sizeof(float)));
    CK(cudaMemset(a.out, 0, (size_t)a.Hq * D * sizeof(bf16)));
    const cudaError_t e = launch_attention(a, ns, split, s); // writes the new token's k, v: the reference reads them back
    if (e != cudaSuccess) {
        printf(" [x%d: %s]", ns, cudaGetErrorString(e));
        cudaGetLastError();
        CK(cudaFree(ref));
        return -1;
    }
    reference_kernel<<<a.Hq, 128, 0, s>>>(a, ref);
    CK(cudaStreamSynchronize(s));
    std::vector<float> r((size_t)a.Hq * D);
    std::vector<bf16> o((size_t)a.Hq * D);
    CK(cudaMemcpy(r.data(), ref, r.size() * sizeof(float), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(o.data(), a.out, o.size() * sizeof(bf16), cudaMemcpyDeviceToHost));
    double err = 0, top = 0;
    for (size_t i = 0; i < r.size(); i++) {
        err = fmax(err, fabs((double)__bfloat162float(o[i]) - r[i]));
        top = fmax(top, fabs((double)r[i]));
    }
    CK(cudaFree(ref));
    return err / top;
}

static double replay_us(cudaGraph_t graph, cudaStream_t s, int layers) {
    cudaGraphExec_t exec;
    CK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 3; i++) CK(cudaGraphLaunch(exec, s));
    CK(cudaStreamSynchronize(s));
    double best = 1e30;
    for (int round = 0; round < 5; round++) {
        cudaEvent_t e0, e1;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        CK(cudaEventRecord(e0, s));
        for (int i = 0; i < 20; i++) CK(cudaGraphLaunch(exec, s));
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        best = fmin(best, ms * 1e3 / 20 / layers);
        CK(cudaEventDestroy(e0));
        CK(cudaEventDestroy(e1));
    }
    CK(cudaGraphExecDestroy(exec));
    return best;
}

int main() {
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned *sink;
    CK(cudaMalloc(&sink, sizeof(unsigned)));
    struct Shape { const char *name; int Hq, layers; int64_t layer_bytes; };
    const Shape shapes[] = {{"0.6B", 16, 28, 31457280}, {"4B", 32, 36, 201326592}};
    const int pool = 512, Hkv = 8; // blocks per layer: contexts up to 8,192 keys
    const std::vector<bf16> cache = random_bf16((size_t)pool * BS * Hkv * D, 1.0f);
    for (const Shape &sh : shapes) {
        const int64_t n16 = sh.layer_bytes / 16;
        uint4 *w;
        CK(cudaMalloc(&w, (size_t)sh.layer_bytes * sh.layers));
        CK(cudaMemset(w, 1, (size_t)sh.layer_bytes * sh.layers));
        std::vector<LayerArgs> layers;
        for (int i = 0; i < sh.layers; i++) layers.push_back(make_layer(sh.Hq, Hkv, pool, cache));
        for (int ctx : {150, 400, 1000, 4000}) {
            for (const LayerArgs &a : layers) set_context(a, ctx);
            printf("%s context %4d: max error / max |out|:", sh.name, ctx);
            bool ok[17] = {};
            for (int ns : {4, 8, 16}) {
                const double err = check(layers[0], ns, false, s);
                ok[ns] = err >= 0;
                if (ok[ns])
                    printf(" fused x%d %.1e", ns, err);
            }
            printf(", rope + attention x8 %.1e\n", check(layers[0], 8, true, s));
            // variants: stream alone, + an empty kernel, + the unfused pair (x8), + fused x4, x8, x16
            const char *names[] = {"", "empty kernel", "rope + attention x8", "fused x4", "fused x8", "fused x16"};
            double alone = 0;
            printf("  per layer: stream alone");
            for (int variant = 0; variant < 6; variant++) {
                const int ns = variant == 2 ? 8 : variant >= 3 ? 4 << (variant - 3) : 0;
                if (variant >= 3 && !ok[ns])
                    continue;
                cudaGraph_t graph;
                CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
                for (int i = 0; i < sh.layers; i++) {
                    launch_pdl(stream_kernel, dim3(132 * 4), dim3(256), s, (const uint4 *)(w + n16 * i), n16, sink);
                    if (variant == 1)
                        launch_pdl(empty_kernel, dim3(8), dim3(THREADS), s, layers[i]);
                    else if (ns)
                        CK(launch_attention(layers[i], ns, variant == 2, s));
                }
                CK(cudaStreamEndCapture(s, &graph));
                const double us = replay_us(graph, s, sh.layers);
                CK(cudaGraphDestroy(graph));
                if (variant == 0) {
                    alone = us;
                    printf(" %.2f us; added to it:", us);
                } else {
                    printf("%s %s %.2f", variant == 1 ? "" : ",", names[variant], us - alone);
                }
            }
            printf("\n");
        }
        for (LayerArgs &a : layers) {
            cudaFree((void *)a.qkv), cudaFree((void *)a.q_norm), cudaFree((void *)a.k_norm);
            cudaFree((void *)a.inv_freq), cudaFree(a.k_cache), cudaFree(a.v_cache);
            cudaFree((void *)a.table), cudaFree((void *)a.len), cudaFree(a.out), cudaFree(a.qbuf);
        }
        CK(cudaFree(w));
    }
    return 0;
}
