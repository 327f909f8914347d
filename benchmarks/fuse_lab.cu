// fuse_lab.cu - what folding the qkv product into the batch-1 decode attention would save (a
// development tool, not part of the library). Build and run on a GPU:
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/fuse_lab benchmarks/fuse_lab.cu && /tmp/fuse_lab
// Qwen3-0.6B shapes (28 layers; hidden 1024, 16 q heads and 8 kv heads of 128, MLP 3072), bf16
// weights distinct per layer (streamed from DRAM, as in the model), f32 activations; no norms.
// Every layer is down, qkv, attention, o_proj, gate_up, each reading what the one before wrote,
// all launched early (programmatic dependent launch) and captured in one CUDA graph:
//   separate  the qkv product is a GEMV kernel (the library's form: two rows per warp, four 16-byte
//             loads per row per lane in flight, the first group before the wait) writing q, k and
//             v; the attention stand-in (8 clusters of 16 blocks, one per kv head, as the library
//             runs the 0.6B attention) loads its kv head's 512 values of them;
//   fused     no qkv kernel: each block of the stand-in copies its 32 rows of the qkv weights (64
//             KB) into shared memory before its wait, computes those rows' products after it, and
//             sends them to every block of its cluster (distributed shared memory, then the
//             cluster barrier);
//   fused, loaded after the wait   the same with the copy issued after the wait;
//   fused, in registers    each thread loads its share of the block's rows (32 16-byte vectors)
//             into registers before the wait, and x straight from global memory after it.
// The stand-in's own work after it has its 512 values is the same in every form (sums, partials
// sent through the cluster, a barrier, 16 outputs per block), so the difference between the forms
// is what the fusion would save a layer: the qkv kernel's boundary and its store and reload of q,
// k and v, against a product phase inside the attention and a second cluster barrier.
#include "lab.cuh"

#include <cooperative_groups.h>
#include <math.h>
#include <stdint.h>
#include <vector>

namespace cg = cooperative_groups;

constexpr int kLayers = 28, kHidden = 1024, kHq = 16, kHkv = 8, kD = 128, kInter = 3072;
constexpr int kQkv = (kHq + 2 * kHkv) * kD; // 4096 rows
constexpr int kCluster = 16;                // blocks per kv head
constexpr int kGroupRows = (kHq / kHkv + 2) * kD; // 512 qkv rows per kv head
constexpr int kBlockRows = kGroupRows / kCluster; // 32 per block
constexpr int kAttnThreads = 128;

// ---- the products: y[N] = W[N, K] x, two rows per warp, ks warps per row pair ----
struct Prod {
    const uint4 *w; // [N][K / 8]
    const float *x;
    float *y;
    int N, K, ks;
};

__global__ void __launch_bounds__(256, 4) prod_kernel(const __grid_constant__ Prod p) {
    __shared__ float sPart[8][2];
    pdl_trigger();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int unit = blockIdx.x * 8 + warp, part = unit % p.ks;
    const int64_t n0 = (int64_t)(unit / p.ks) * 2;
    const bool ok = n0 < p.N;
    const int nvec = p.K / 8, stride = 32 * p.ks;
    uint4 w[4][2];
    auto load = [&](int j0) {
#pragma unroll
        for (int g = 0; g < 4; g++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int j = j0 + g * stride;
                w[g][r] = ok && j < nvec ? __ldcs(p.w + (n0 + r) * nvec + j) : make_uint4(0, 0, 0, 0);
            }
    };
    const int first = part * 32 + lane;
    load(first);
    pdl_wait();
    float acc[2] = {0.0f, 0.0f};
    for (int j0 = first; j0 < nvec; j0 += 4 * stride) {
        if (j0 != first)
            load(j0);
#pragma unroll
        for (int g = 0; g < 4; g++)
            if (j0 + g * stride < nvec)
#pragma unroll
                for (int r = 0; r < 2; r++)
                    acc[r] += dot8(w[g][r], p.x + 8 * (j0 + g * stride));
    }
    acc[0] = wsum(acc[0]);
    acc[1] = wsum(acc[1]);
    if (p.ks > 1) {
        if (lane == 0)
            sPart[warp][0] = acc[0], sPart[warp][1] = acc[1];
        __syncthreads();
        if (part == 0)
            for (int r = 0; r < 2; r++) {
                float t = 0.0f;
                for (int q = 0; q < p.ks; q++)
                    t += sPart[warp + q][r];
                acc[r] = t;
            }
    }
    if (ok && part == 0 && lane == 0)
        p.y[n0] = acc[0], p.y[n0 + 1] = acc[1];
}

// ---- the attention stand-in ----
struct Attn {
    const uint4 *wqkv; // fused: this layer's qkv weights [4096][128]
    const float *h;    // fused: the product's input [1024]
    const float *qkv;  // separate: q, k, v [4096]
    float *out;        // [16 heads][128]
};

// Row i (0 .. 512) of kv head g's list: its two q heads, its k head, its v head
__device__ __forceinline__ int qkv_row(int g, int i) {
    const int G = kHq / kHkv;
    return i < G * kD ? g * G * kD + i : i < (G + 1) * kD ? kHq * kD + g * kD + (i - G * kD)
                                                          : (kHq + kHkv) * kD + g * kD + (i - (G + 1) * kD);
}

// FORM: 0 separate, 1 fused (weights copied before the wait), 2 fused (copied after it), 3 fused
// (weights in registers)
template <int FORM>
__global__ void __launch_bounds__(kAttnThreads, 1) attn_kernel(const __grid_constant__ Attn a) {
    extern __shared__ __align__(16) uint4 sW[];         // fused: [32 rows][128 vectors]
    __shared__ __align__(16) float sX[kHidden];          // fused: the product's input
    __shared__ float sIn[kGroupRows];                    // the kv head's 512 values
    __shared__ float sInbox[kCluster][kAttnThreads / kCluster];
    cg::cluster_group cluster = cg::this_cluster();
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = blockIdx.x / kCluster, j = (int)cluster.block_rank();
    const int row0 = qkv_row(g, j * kBlockRows); // the block's 32 rows are consecutive
    auto copy_rows = [&] {
        const uint4 *src = a.wqkv + (int64_t)row0 * (kHidden / 8);
        for (int i = tid; i < kBlockRows * kHidden / 8; i += kAttnThreads) {
            const uint32_t dst = (uint32_t)__cvta_generic_to_shared(sW + i);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src + i) : "memory");
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    constexpr int kRowsPerWarp = kBlockRows / (kAttnThreads / 32), kCols = kHidden / 8 / 32;
    uint4 wr[FORM == 3 ? kRowsPerWarp : 1][kCols]; // FORM 3: warp w's rows 8w .. 8w + 8, lane's columns
    if (FORM == 1)
        copy_rows();
    if (FORM == 3)
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; r++)
#pragma unroll
            for (int c = 0; c < kCols; c++)
                wr[r][c] = a.wqkv[(int64_t)(row0 + warp * kRowsPerWarp + r) * (kHidden / 8) + lane + 32 * c];
    pdl_wait();
    if (FORM == 0) { // the kv head's values, written by the qkv kernel
#pragma unroll
        for (int u = 0; u < kGroupRows / kAttnThreads; u++)
            sIn[tid + u * kAttnThreads] = a.qkv[qkv_row(g, tid + u * kAttnThreads)];
        __syncthreads();
    } else {
        if (FORM == 2)
            copy_rows();
        if (FORM != 3) {
            for (int i = tid; i < kHidden / 4; i += kAttnThreads)
                reinterpret_cast<float4 *>(sX)[i] = reinterpret_cast<const float4 *>(a.h)[i];
            asm volatile("cp.async.wait_all;" ::: "memory");
            __syncthreads();
        }
        // warp w: rows 8w .. 8w + 8 of the block's 32; lanes over 16-byte columns
        float v[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; r++) {
            const uint4 *w = sW + (warp * kRowsPerWarp + r) * (kHidden / 8);
            float acc = 0.0f;
#pragma unroll
            for (int c = 0; c < kCols; c++)
                acc += FORM == 3 ? dot8(wr[r][c], a.h + 8 * (lane + 32 * c))
                                 : dot8(w[lane + 32 * c], sX + 8 * (lane + 32 * c));
            v[r] = wsum(acc);
        }
        // to every block of the cluster: lane k < 16 writes the warp's 8 values into block k
        if (lane < kCluster) {
            float *to = cluster.map_shared_rank(sIn, lane);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; r++)
                to[j * kBlockRows + warp * kRowsPerWarp + r] = v[r];
        }
        cluster.sync();
    }
    pdl_trigger(); // (the library's attention allows the next launch once its first loads are in)
    // the stand-in's work: a partial per thread, sent to block tid % 16, merged there
    float s = 0.0f;
#pragma unroll
    for (int u = 0; u < kGroupRows / kAttnThreads; u++)
        s += sIn[tid + u * kAttnThreads] * (1.0f / 32); // (keeps the chain's values finite)
    *cluster.map_shared_rank(&sInbox[j][tid / kCluster], tid % kCluster) = s;
    cluster.sync();
    if (tid < kAttnThreads / kCluster) {
        float t = 0.0f;
        for (int q = 0; q < kCluster; q++)
            t += sInbox[q][tid];
        a.out[g * (kHq / kHkv) * kD + j * (kAttnThreads / kCluster) + tid] = t;
    }
}

// ---- launches ----
static void launch_prod(const Prod &p, cudaStream_t st) {
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = pdl_config(dim3((p.N / 2 * p.ks + 7) / 8), dim3(256), 0, st, attr);
    CK(cudaLaunchKernelEx(&cfg, prod_kernel, p));
}

template <int FORM>
static void launch_attn(const Attn &a, cudaStream_t st) {
    const size_t smem = FORM == 1 || FORM == 2 ? (size_t)kBlockRows * kHidden * 2 : 0;
    static bool once = false;
    if (!once) {
        CK(cudaFuncSetAttribute(attn_kernel<FORM>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
        CK(cudaFuncSetAttribute(attn_kernel<FORM>, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024));
        once = true;
    }
    cudaLaunchAttribute attr[2];
    cudaLaunchConfig_t cfg = pdl_config(dim3(kHkv * kCluster), dim3(kAttnThreads), smem, st, attr);
    attr[1].id = cudaLaunchAttributeClusterDimension;
    attr[1].val.clusterDim.x = kCluster;
    attr[1].val.clusterDim.y = 1;
    attr[1].val.clusterDim.z = 1;
    cfg.numAttrs = 2;
    CK(cudaLaunchKernelEx(&cfg, attn_kernel<FORM>, a));
}

int main() {
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    // per layer: down [1024][3072], qkv [4096][1024], o_proj [1024][2048], gate_up [6144][1024]
    const int64_t per_layer = (int64_t)kHidden * kInter + (int64_t)kQkv * kHidden + (int64_t)kHidden * kHq * kD +
                              (int64_t)2 * kInter * kHidden; // elements
    __nv_bfloat16 *w;
    CK(cudaMalloc(&w, per_layer * kLayers * 2));
    {   // random values of variance 1 / K (each product keeps its input's scale), so that a wrong
        // form would show in the check value
        std::vector<__nv_bfloat16> host(per_layer * kLayers);
        const int64_t sizes[4] = {(int64_t)kHidden * kInter, (int64_t)kQkv * kHidden, (int64_t)kHidden * kHq * kD,
                                  (int64_t)2 * kInter * kHidden};
        const int ks[4] = {kInter, kHidden, kHq * kD, kHidden};
        uint32_t r = 12345;
        int64_t i = 0;
        for (int l = 0; l < kLayers; l++)
            for (int m = 0; m < 4; m++)
                for (int64_t e = 0; e < sizes[m]; e++, i++) {
                    r = r * 1664525u + 1013904223u;
                    host[i] = __float2bfloat16(((r >> 9) / 8388608.0f - 0.5f) * 2.0f * sqrtf(3.0f / ks[m]));
                }
        CK(cudaMemcpy(w, host.data(), host.size() * 2, cudaMemcpyHostToDevice));
    }
    float *act; // h [1024], qkv [4096], attn [2048], mlp [6144]
    CK(cudaMalloc(&act, (kHidden + kQkv + kHq * kD + 2 * kInter) * sizeof(float)));
    float *h = act, *qkv = h + kHidden, *attn = qkv + kQkv, *mlp = attn + kHq * kD;
    const char *names[] = {"separate (qkv kernel, then the attention)", "fused (weights copied before the wait)",
                           "fused (weights copied after the wait)", "fused (weights in registers)"};
    float first_out[4];
    for (int pass = 0; pass < 2; pass++)
        for (int form = 0; form < 4; form++) {
            // the first layer's down reads mlp: ones; everything else zero
            CK(cudaMemset(act, 0, (kHidden + kQkv + kHq * kD + 2 * kInter) * sizeof(float)));
            CK(cudaMemcpy(mlp, std::vector<float>(kInter, 1.0f).data(), kInter * 4, cudaMemcpyHostToDevice));
            cudaGraph_t graph;
            CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
            const __nv_bfloat16 *lw = w;
            for (int l = 0; l < kLayers; l++) {
                const uint4 *down = (const uint4 *)lw, *wqkv = (const uint4 *)(lw + (int64_t)kHidden * kInter);
                const uint4 *o = (const uint4 *)(lw + (int64_t)kHidden * kInter + (int64_t)kQkv * kHidden);
                const uint4 *gu = (const uint4 *)(lw + (int64_t)kHidden * kInter + (int64_t)kQkv * kHidden +
                                                  (int64_t)kHidden * kHq * kD);
                lw += per_layer;
                // ks as the library picks them for these shapes
                launch_prod(Prod{down, mlp, h, kHidden, kInter, 4}, st);
                Attn a{wqkv, h, qkv, attn};
                if (form == 0) {
                    launch_prod(Prod{wqkv, h, qkv, kQkv, kHidden, 2}, st);
                    launch_attn<0>(a, st);
                } else if (form == 1) {
                    launch_attn<1>(a, st);
                } else if (form == 2) {
                    launch_attn<2>(a, st);
                } else {
                    launch_attn<3>(a, st);
                }
                launch_prod(Prod{o, attn, h, kHidden, kHq * kD, 4}, st);
                launch_prod(Prod{gu, h, mlp, 2 * kInter, kHidden, 1}, st);
            }
            CK(cudaStreamEndCapture(st, &graph));
            cudaGraphExec_t exec;
            CK(cudaGraphInstantiate(&exec, graph, 0));
            CK(cudaGraphLaunch(exec, st)); // one step from h = 0.01: the forms must agree
            float out;
            CK(cudaMemcpyAsync(&out, attn + 777, 4, cudaMemcpyDeviceToHost, st));
            CK(cudaStreamSynchronize(st));
            if (pass == 0)
                first_out[form] = out;
            const float us = replay_us(exec, st, 20);
            printf("%-48s %8.1f us per step, %5.2f us per layer (check value %.6g)\n", names[form], us, us / kLayers,
                   first_out[form]);
            CK(cudaGraphExecDestroy(exec));
            CK(cudaGraphDestroy(graph));
        }
    return 0;
}
