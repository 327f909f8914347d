// attention.cu - the paged KV cache on the GPU: storing new keys/values, and causal attention
// over the cache for a flat varlen batch (prefill, chunked prefill and decode in one call); and
// to_rope_kv_attention, the two with the rotation before them.
//
// Semantics are csrc/cpu/attention.c's (see its top comment and tensor_ops.h): sequence s owns
// query rows cu_seqlens_q[s] .. cu_seqlens_q[s+1]; its i-th of n queries sits at position
// context_lens[s] - n + i and sees cache positions 0 .. that position; query head h reads kv
// head h / G (G = Hq / Hkv); softmax and accumulation in f32.
//
// The host never reads the batch's values (they live on the GPU; reading them would
// synchronise, and these ops are recorded into CUDA graphs), so every launch size comes from the
// shapes. Two paths, chosen by shapes (and the caches' alignment) alone:
//
//  - decode (T <= S: no more query rows than sequences, as in a decode step; cache rows of whole,
//    aligned 16-byte pieces, else the general path): decode_kernel alone, one block per
//    (sequence, kv head, key segment), no planning kernel and no merge kernel: when
//    segments must be combined, the last segment of each (sequence, kv head) to finish combines
//    them ("last block done": per-pair arrival counters that every launch leaves at zero, and a
//    batch verdict from one checking block). See "decode path" below.
//    to_rope_kv_attention runs the same kernel with the token's q/k norm, rotation and KV store
//    done inside it, for a batch of one sequence ("fused" below).
//  - general (anything else: prefill, chunked prefill, mixed batches, multi-query steps): a tiny
//    planning kernel turns the values into a work list on the device, then:
//
//  1. plan_kernel (one block) gives every sequence its tiles. A tile is up to RB rows of one
//     (sequence, kv head) pair, a row being (query i, head j of the GQA group), r = i * G + j.
//     Rows of one tile share every K/V element the tile loads, whichever mix of queries and heads
//     they are (decode: the G heads of the group; prefill: RB / G queries times the group).
//     Sequences of at most DEC_MAX_Q queries (decode, short speculative steps) are further split
//     by keys into segments ("flash-decoding"), so that a batch of one long sequence still fills
//     the GPU; the segment length depends only on the context length and nsplit_max.
//  2. attn_kernel: grid (tile bound, Hkv); a block finds its tile by binary search over the
//     sequences' first tiles and walks its keys in tiles of KT, with an online softmax (the
//     running max m, the running sum l of exp(s - m), acc = sum exp(s - m) v, rescaled when m
//     grows). Unsplit tiles write out = acc / l; split ones write (acc, m, l) partials.
//  3. merge_kernel combines a split query's partials in segment order (deterministic).
//
// Scores are kept in base 2: q is pre-multiplied by scale * log2(e) and exp2f is used, which is
// exp(q.k * scale - max) exactly up to f32 rounding.
//
// The planning data and the partials live in one workspace from the caching allocator, freed
// (returned to the cache) right after the launches: every op on this GPU runs on the one stream
// (to_cuda_stream), so whoever gets the block next uses it only after these kernels are done (a
// block freed while a graph is recorded stays reserved for that graph, device.cu). The decode
// path's arrival counters are the exception: one array per GPU that lives as long as the process
// (decode_arrivals below).
//
// Every kernel is launched with to_launch (programmatic dependent launch, common.cuh): it calls
// to_pdl_trigger() first, so the next kernel's blocks may become resident early, and
// to_pdl_wait() in every thread before it touches memory. (The fused decode kernel triggers a
// little later: see decode_segment.)
#include "cuda/common.cuh"
#include "cuda/kv_store.cuh"
#include "cuda/rope.cuh"

#include <cooperative_groups.h>
#include <math.h>

#include <mutex>

namespace {

// TO_OK, or the error of a launch that failed (cleared, so that later checks do not see it again)
int launched(cudaError_t err, const char *op) {
    if (err == cudaSuccess)
        return TO_OK;
    cudaGetLastError();
    return to_fail(TO_ERR_CUDA, "%s: kernel launch failed: %s (%s)", op, cudaGetErrorString(err), cudaGetErrorName(err));
}

// ------------------------------------------------------------------------------- kv_cache_store

constexpr int kStoreThreads = 128;

struct StoreArgs {
    KvStore kv; // the caches, v, the slots (kv_store.cuh)
    const char *k;
    int k_dtype;
    int64_t ks0, ks1, ks2;
};

// One block per token: its Hkv * D key and value elements go to row `slot` of the caches
// (contiguous, so the row starts at slot * Hkv * D), converted (round to nearest even) by
// to_store. Consecutive threads take consecutive d: coalesced cache writes, and coalesced reads
// whenever k/v rows are contiguous.
__global__ void __launch_bounds__(kStoreThreads) kv_store_kernel(StoreArgs a) {
    to_pdl_trigger();
    to_pdl_wait(); // k and v come from the kernels before
    const int64_t t = blockIdx.x;
    const int64_t slot = kv_slot(a.kv, t, threadIdx.x == 0); // bad ones skipped and reported
    if (slot < 0)
        return;
    const int64_t n = (int64_t)a.kv.Hkv * a.kv.D, row = kv_row(a.kv, slot, 0);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        int64_t h = i / a.kv.D, d = i % a.kv.D;
        float kx = to_load(a.k, a.k_dtype, t * a.ks0 + h * a.ks1 + d * a.ks2);
        float vx = kv_load_v(a.kv, t, h, d);
        to_store(a.kv.k_cache, a.kv.cache_dtype, row + i, kx);
        to_store(a.kv.v_cache, a.kv.cache_dtype, row + i, vx);
    }
}

// ------------------------------------------------------------------------------ paged_attention

constexpr int kThreads = 128;                  // 4 warps per attention block
constexpr int kWarps = kThreads / 32;
constexpr int RB = 32;                         // rows (query, head) per tile
constexpr int RPW = RB / kWarps;               // rows per warp: warp w owns rows w, w + 4, ...
constexpr int KT = 32;                         // keys per key tile: one per lane for the scores
constexpr int DEC_MAX_Q = 4;                   // sequences with at most this many queries split by keys
constexpr int SEG_MIN = 128;                   // keys per segment of a split sequence, at least
constexpr int MAX_SPLITS = 64;                 // segments per sequence, at most
constexpr int kPlanThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

struct AttnArgs {
    const char *q;
    int q_dtype;
    int64_t qs0, qs1, qs2;
    char *out;
    int out_dtype;
    int64_t os0, os1, os2;
    const void *k_cache, *v_cache;
    const char *cu, *ctx, *bt;
    int cu_dtype, ctx_dtype, bt_dtype;
    int64_t cu_stride, ctx_stride, bt_s0, bt_s1;
    int S, Hq, Hkv, G, D, block_size;
    int64_t T, num_blocks, max_blocks; // q's rows; the caches' blocks; block_tables' width
    unsigned long long *err;           // the GPU's error word (common.cuh)
    float qscale;   // scale * log2(e): scores in base 2
    int nsplit_max; // segments per split sequence, at most (1: no partials)
    int vec;        // cache rows can be read 16 bytes at a time (D * size % 16 == 0, aligned)
    // workspace
    int4 *seq_info; // per sequence: first tile, segments, segment length, first partial slot
    int *total;     // tiles in all
    int2 *slots;    // per partial slot (a split query): its q row t, or -1; its segments
    int n_slots;
    float *part;    // [n_slots][Hq][nsplit_max][D + 2]: acc, then m and l
                    // (decode path: [T][Hq][splits][D], acc only)
    // decode path (decode_kernel)
    int splits;     // key segments per (sequence, kv head): blocks in the grid
    int merge;      // 1: segments write partials; the last of each pair merges them, if the batch is good
    int cluster;    // 1: a pair's segments are one thread-block cluster, merged in shared memory (sm_90)
    float2 *ml;     // [T][Hq][splits]: each segment's (m, l)
    int *batch_ok;  // the checking block's verdict (workspace: written before it is announced)
    unsigned *arrivals; // [S][Hkv]: segments (and the checking block) done, zero between launches
    // fused (to_rope_kv_attention, decode path in cluster mode, T = S = 1): q and k come from
    // rope's x, normalised and rotated here, k and v stored here ("fused" below)
    int fused;
    RopeArgs rope;
};

// ---- planning ----

struct SeqPlan {
    int tiles, nsplit, seglen, nslots;
};

// What is wrong with sequence s's part of the batch (a TO_GPU_BATCH_* code, 0 if nothing), and
// the offending value: the checks the CPU op makes on the host (csrc/ops/attention.c,
// check_batch), made here so that no tile ever reads out of bounds.
//
// SeqMeta and check_sequence_head are the part without the block table's entries: the sequence's
// rows of q (b .. e), its context and the entries that context needs.
struct SeqMeta {
    int64_t b, e, len, blocks;
};

__device__ __forceinline__ int check_sequence_head(const AttnArgs &a, int s, SeqMeta *m, int64_t *value) {
    const int64_t b = to_load_index_dev(a.cu, a.cu_dtype, (int64_t)s * a.cu_stride);
    const int64_t e = to_load_index_dev(a.cu, a.cu_dtype, (int64_t)(s + 1) * a.cu_stride);
    const int64_t len = to_load_index_dev(a.ctx, a.ctx_dtype, (int64_t)s * a.ctx_stride);
    *m = SeqMeta{b, e, len, 0};
    *value = e;
    if ((s == 0 && b != 0) || b < 0 || e < b || e > a.T || (s == a.S - 1 && e != a.T))
        return TO_GPU_BATCH_CU;
    *value = len;
    if (len < e - b)
        return TO_GPU_BATCH_CONTEXT;
    m->blocks = len / a.block_size + (len % a.block_size != 0);
    if (m->blocks > a.max_blocks || len > INT32_MAX)
        return TO_GPU_BATCH_TABLE;
    return 0;
}

__device__ int check_sequence(const AttnArgs &a, int s, int64_t *value) {
    SeqMeta m;
    if (int what = check_sequence_head(a, s, &m, value))
        return what;
    const int64_t blocks = m.blocks;
    for (int64_t j = 0; j < blocks; j++) {
        *value = to_load_index_dev(a.bt, a.bt_dtype, (int64_t)s * a.bt_s0 + j * a.bt_s1);
        if (*value < 0 || *value >= a.num_blocks)
            return TO_GPU_BATCH_BLOCK;
    }
    return 0;
}

__device__ SeqPlan plan_sequence(const AttnArgs &a, int s) {
    SeqPlan p = {0, 1, 0, 0};
    int64_t b = to_load_index_dev(a.cu, a.cu_dtype, (int64_t)s * a.cu_stride);
    int64_t nq = to_load_index_dev(a.cu, a.cu_dtype, (int64_t)(s + 1) * a.cu_stride) - b;
    int64_t len = to_load_index_dev(a.ctx, a.ctx_dtype, (int64_t)s * a.ctx_stride);
    p.seglen = (int)len;
    if (nq <= 0)
        return p;
    int64_t row_tiles = (nq * a.G + RB - 1) / RB;
    if (nq <= DEC_MAX_Q && a.nsplit_max > 1) {
        // as many segments as nsplit_max allows, of at least SEG_MIN keys, a whole number of key
        // tiles each; recounted so that no segment is empty
        int64_t ns = (len + SEG_MIN - 1) / SEG_MIN;
        ns = ns < a.nsplit_max ? ns : a.nsplit_max;
        ns = ns > 1 ? ns : 1;
        int64_t seg = (len + ns - 1) / ns;
        seg = (seg + KT - 1) / KT * KT;
        ns = (len + seg - 1) / seg;
        p.nsplit = (int)ns;
        p.seglen = (int)seg;
        p.nslots = ns > 1 ? (int)nq : 0;
    }
    p.tiles = (int)(row_tiles * p.nsplit);
    return p;
}

// One block: each thread plans a contiguous run of sequences, a block scan turns the counts into
// offsets (first tile, first partial slot), and a second pass writes them out.
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(AttnArgs a) {
    __shared__ int scan_tiles[kPlanThreads], scan_slots[kPlanThreads];
    to_pdl_trigger();
    to_pdl_wait();
    const int tid = threadIdx.x;
    const int per = (a.S + kPlanThreads - 1) / kPlanThreads;
    const int s0 = tid * per < a.S ? tid * per : a.S, s1 = s0 + per < a.S ? s0 + per : a.S;
    // A batch with any inconsistent sequence gets no tiles at all (and is reported): sequences
    // planned around a bad one could overlap, and overrun the bounds the host sized things by.
    int bad = 0;
    for (int s = s0; s < s1; s++) {
        int64_t value;
        if (int what = check_sequence(a, s, &value)) {
            to_gpu_error(a.err, TO_GPU_ERR_BATCH, s, what, value);
            bad = 1;
        }
    }
    bad = __syncthreads_or(bad);
    int tiles = 0, nslots = 0;
    for (int s = s0; s < s1 && !bad; s++) {
        SeqPlan p = plan_sequence(a, s);
        tiles += p.tiles;
        nslots += p.nslots;
    }
    scan_tiles[tid] = tiles;
    scan_slots[tid] = nslots;
    __syncthreads();
    // Hillis-Steele inclusive scan (256 entries: 8 steps)
    for (int o = 1; o < kPlanThreads; o <<= 1) {
        int add_t = tid >= o ? scan_tiles[tid - o] : 0, add_s = tid >= o ? scan_slots[tid - o] : 0;
        __syncthreads();
        scan_tiles[tid] += add_t;
        scan_slots[tid] += add_s;
        __syncthreads();
    }
    int tile_off = scan_tiles[tid] - tiles, slot_off = scan_slots[tid] - nslots;
    for (int s = s0; s < s1; s++) {
        SeqPlan p = bad ? SeqPlan{0, 1, 0, 0} : plan_sequence(a, s);
        a.seq_info[s] = make_int4(tile_off, p.nsplit, p.seglen, slot_off);
        if (p.nslots > 0) {
            int b = (int)to_load_index_dev(a.cu, a.cu_dtype, (int64_t)s * a.cu_stride);
            for (int i = 0; i < p.nslots; i++)
                a.slots[slot_off + i] = make_int2(b + i, p.nsplit);
        }
        tile_off += p.tiles;
        slot_off += p.nslots;
    }
    if (tid == kPlanThreads - 1)
        *a.total = scan_tiles[tid];
    // slots past the used ones: nothing for the merge to do
    for (int i = scan_slots[kPlanThreads - 1] + tid; i < a.n_slots; i += kPlanThreads)
        a.slots[i] = make_int2(-1, 0);
}

// ---- the attention tile ----

__device__ __forceinline__ float cache_f32(float x) { return x; }
__device__ __forceinline__ float cache_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float cache_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// 16 bytes of cache elements (4 f32 or 8 f16/bf16) widened into dst[0 .. 16 / sizeof(T)).
template <typename T>
__device__ __forceinline__ void widen16(const uint4 &raw, float *dst) {
    const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < (int)(16 / sizeof(T)); i++)
        dst[i] = cache_f32(e[i]);
}

// Shared memory of a block (floats, dynamic): q rows, the K tile (rows padded by 4 floats so
// that lanes reading different keys' float4s fall in different banks), the V tile, the
// weights, and the cache row of each key of the tile.
template <int DMAX>
struct Smem {
    static constexpr int KS = DMAX + 4;
    static constexpr size_t q_off = 0;
    static constexpr size_t k_off = q_off + (size_t)RB * DMAX;
    static constexpr size_t v_off = k_off + (size_t)KT * KS;
    static constexpr size_t p_off = v_off + (size_t)KT * DMAX;
    static constexpr size_t row_off = p_off + (size_t)RB * KT; // int64 [KT], 8-byte aligned
    static constexpr size_t bytes = row_off * sizeof(float) + KT * sizeof(int64_t);
};

// One tile (blockIdx.x of the work list) of kv head blockIdx.y. DMAX: D rounded up to 64, 128
// or 256 (q and the K/V tiles are zero-padded to it, so the loops have fixed trip counts).
// T: the cache element type.
template <int DMAX, typename T>
__global__ void __launch_bounds__(kThreads) attn_kernel(AttnArgs a) {
    constexpr int ND = DMAX / 32;                 // acc elements per lane: d = lane + 32 c
    constexpr int VEC = 16 / (int)sizeof(T);      // cache elements per 16-byte load
    constexpr int KS = Smem<DMAX>::KS;
    extern __shared__ __align__(16) float smem[];
    float *sQ = smem + Smem<DMAX>::q_off;         // [RB][DMAX], times scale * log2(e)
    float *sK = smem + Smem<DMAX>::k_off;         // [KT][KS]
    float *sV = smem + Smem<DMAX>::v_off;         // [KT][DMAX]
    float *sP = smem + Smem<DMAX>::p_off;         // [RB][KT]: the tile's weights
    int64_t *sRow = reinterpret_cast<int64_t *>(smem + Smem<DMAX>::row_off); // [KT], -1: none

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int tile = blockIdx.x, g = blockIdx.y;
    to_pdl_trigger();
    to_pdl_wait(); // the plan kernel's work list
    if (tile >= *a.total)
        return; // the grid is an upper bound

    // the sequence: the last one whose first tile is <= tile (sequences without tiles share
    // their first tile with the next one, so they are never picked)
    int lo = 0, hi = a.S - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (a.seq_info[mid].x <= tile)
            lo = mid;
        else
            hi = mid - 1;
    }
    const int s = lo;
    const int4 info = a.seq_info[s];
    const int nsplit = info.y, seglen = info.z, slot0 = info.w;
    const int local = tile - info.x, split = local % nsplit, row_tile = local / nsplit;
    const int64_t b = to_load_index_dev(a.cu, a.cu_dtype, (int64_t)s * a.cu_stride);
    const int64_t nq = to_load_index_dev(a.cu, a.cu_dtype, (int64_t)(s + 1) * a.cu_stride) - b;
    const int64_t len = to_load_index_dev(a.ctx, a.ctx_dtype, (int64_t)s * a.ctx_stride);
    const int64_t pos0 = len - nq; // position of the first query
    const int G = a.G, D = a.D;
    const int r_begin = row_tile * RB;
    const int nrows = (int)(nq * G - r_begin < RB ? nq * G - r_begin : RB);

    // keys of this tile: its segment, up to the last row's position
    int64_t k_begin = (int64_t)split * seglen, k_end = k_begin + seglen;
    const int64_t last_pos = pos0 + (r_begin + nrows - 1) / G;
    k_end = k_end < len ? k_end : len;
    k_end = k_end < last_pos + 1 ? k_end : last_pos + 1;

    // q rows in f32, scaled, zero-padded past D and past nrows
    for (int i = tid; i < RB * DMAX; i += kThreads) {
        int r = i / DMAX, d = i % DMAX;
        float x = 0.0f;
        if (r < nrows && d < D) {
            int rr = r_begin + r;
            int64_t t = b + rr / G, h = (int64_t)g * G + rr % G;
            x = to_load(a.q, a.q_dtype, t * a.qs0 + h * a.qs1 + d * a.qs2) * a.qscale;
        }
        sQ[i] = x;
    }

    // this thread's rows (warp-wide: every lane keeps every row's m and l; lane owns acc
    // elements d = lane + 32 c), and their positions (-1: a padding row, which sees no key)
    float m[RPW], l[RPW], acc[RPW][ND];
    int pos[RPW]; // positions fit in int: the tile count bound on the host is an int
#pragma unroll
    for (int k = 0; k < RPW; k++) {
        int r = warp + kWarps * k;
        pos[k] = r < nrows ? (int)(pos0 + (r_begin + r) / G) : -1;
        m[k] = -INFINITY;
        l[k] = 0.0f;
#pragma unroll
        for (int c = 0; c < ND; c++)
            acc[k][c] = 0.0f;
    }
    const bool warp_active = warp < nrows; // its first row, warp, is the lowest it owns

    const T *kc = static_cast<const T *>(a.k_cache), *vc = static_cast<const T *>(a.v_cache);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += KT) {
        __syncthreads(); // the previous tile's sK/sV/sRow are no longer read (and sQ is written)
        if (tid < KT) {
            int64_t p = k0 + tid, row = -1;
            if (p < k_end) {
                int64_t blk = to_load_index_dev(a.bt, a.bt_dtype,
                                                (int64_t)s * a.bt_s0 + (p / a.block_size) * a.bt_s1);
                row = ((blk * a.block_size + p % a.block_size) * a.Hkv + g) * D;
            }
            sRow[tid] = row;
        }
        __syncthreads();
        // the K and V tiles in f32, zero past D and past k_end (a zero weight times a stale
        // NaN would still be NaN)
        if (a.vec) {
            // CHUNKS 16-byte pieces per tile, taken BATCH per thread at a time: the loads of a
            // batch are in flight together, and the staging registers stay few
            constexpr int CHUNKS = KT * DMAX / VEC, ITERS = (CHUNKS + kThreads - 1) / kThreads;
            constexpr int BATCH = ITERS < 4 ? ITERS : 4;
#pragma unroll 1
            for (int it0 = 0; it0 < ITERS; it0 += BATCH) {
                uint4 rk[BATCH], rv[BATCH];
#pragma unroll
                for (int u = 0; u < BATCH; u++) {
                    int idx = tid + (it0 + u) * kThreads, j = idx / (DMAX / VEC), d = idx % (DMAX / VEC) * VEC;
                    rk[u] = rv[u] = make_uint4(0, 0, 0, 0);
                    if (idx < CHUNKS && d < D && sRow[j] >= 0) {
                        rk[u] = __ldg(reinterpret_cast<const uint4 *>(kc + sRow[j] + d));
                        rv[u] = __ldg(reinterpret_cast<const uint4 *>(vc + sRow[j] + d));
                    }
                }
#pragma unroll
                for (int u = 0; u < BATCH; u++) {
                    int idx = tid + (it0 + u) * kThreads, j = idx / (DMAX / VEC), d = idx % (DMAX / VEC) * VEC;
                    if (idx < CHUNKS) {
                        float fk[VEC], fv[VEC];
                        widen16<T>(rk[u], fk);
                        widen16<T>(rv[u], fv);
#pragma unroll
                        for (int e = 0; e < VEC; e += 4) {
                            *reinterpret_cast<float4 *>(sK + j * KS + d + e) = make_float4(fk[e], fk[e + 1], fk[e + 2], fk[e + 3]);
                            *reinterpret_cast<float4 *>(sV + j * DMAX + d + e) = make_float4(fv[e], fv[e + 1], fv[e + 2], fv[e + 3]);
                        }
                    }
                }
            }
        } else { // any D: element by element
            for (int idx = tid; idx < KT * DMAX; idx += kThreads) {
                int j = idx / DMAX, d = idx % DMAX;
                int64_t row = sRow[j];
                float kx = 0.0f, vx = 0.0f;
                if (d < D && row >= 0) {
                    kx = cache_f32(kc[row + d]);
                    vx = cache_f32(vc[row + d]);
                }
                sK[j * KS + d] = kx;
                sV[j * DMAX + d] = vx;
            }
        }
        __syncthreads();
        if (!warp_active)
            continue; // a warp-uniform branch: no row of this warp exists

        // scores: lane j takes key k0 + j against the warp's RPW rows
        float sc[RPW];
#pragma unroll
        for (int k = 0; k < RPW; k++)
            sc[k] = 0.0f;
        const float *krow = sK + lane * KS;
#pragma unroll 4
        for (int d = 0; d < DMAX; d += 4) {
            float4 kv = *reinterpret_cast<const float4 *>(krow + d);
#pragma unroll
            for (int k = 0; k < RPW; k++) {
                // every lane reads the same q element: a broadcast
                float4 qv = *reinterpret_cast<const float4 *>(sQ + (warp + kWarps * k) * DMAX + d);
                sc[k] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
            }
        }

        // online softmax, one row at a time (the warp reduces over the tile's keys)
        const int key = (int)(k0 + lane);
#pragma unroll
        for (int k = 0; k < RPW; k++) {
            float x = key < (int)k_end && key <= pos[k] ? sc[k] : -INFINITY; // causal mask
            float m_new = fmaxf(m[k], to_warp_max(x));
            float p = 0.0f, alpha = 1.0f;
            if (m_new != -INFINITY) { // else the row has seen no key yet: nothing to add
                p = exp2f(x - m_new); // 0 where masked
                alpha = exp2f(m[k] - m_new); // 0 on the row's first keys (m = -inf)
            }
            l[k] = l[k] * alpha + to_warp_sum(p);
            m[k] = m_new;
#pragma unroll
            for (int c = 0; c < ND; c++)
                acc[k][c] *= alpha;
            sP[(warp + kWarps * k) * KT + lane] = p;
        }
        __syncwarp(); // the warp's weights are written before its lanes read each other's

        // acc += p v: lane owns d = lane + 32 c; each V element read once for the RPW rows
#pragma unroll 2
        for (int j = 0; j < KT; j += 4) {
            float4 pw[RPW];
#pragma unroll
            for (int k = 0; k < RPW; k++)
                pw[k] = *reinterpret_cast<const float4 *>(sP + (warp + kWarps * k) * KT + j);
#pragma unroll
            for (int jj = 0; jj < 4; jj++) {
                float vv[ND];
#pragma unroll
                for (int c = 0; c < ND; c++)
                    vv[c] = sV[(j + jj) * DMAX + lane + 32 * c];
#pragma unroll
                for (int k = 0; k < RPW; k++) {
                    float pk = jj == 0 ? pw[k].x : jj == 1 ? pw[k].y : jj == 2 ? pw[k].z : pw[k].w;
#pragma unroll
                    for (int c = 0; c < ND; c++)
                        acc[k][c] += pk * vv[c];
                }
            }
        }
        __syncwarp(); // sP is rewritten by the next tile
    }

    if (!warp_active)
        return;
    // results: out = acc / l, or the segment's partial (acc, m, l)
#pragma unroll
    for (int k = 0; k < RPW; k++) {
        int r = warp + kWarps * k;
        if (r >= nrows)
            continue;
        int rr = r_begin + r, qi = rr / G;
        int64_t t = b + qi, h = (int64_t)g * G + rr % G;
        if (nsplit == 1) {
            float inv = 1.0f / l[k]; // l >= 1: the row's own position is among its keys
#pragma unroll
            for (int c = 0; c < ND; c++) {
                int d = lane + 32 * c;
                if (d < D)
                    to_store(a.out, a.out_dtype, t * a.os0 + h * a.os1 + d * a.os2, acc[k][c] * inv);
            }
        } else {
            float *part = a.part + (((int64_t)(slot0 + qi) * a.Hq + h) * a.nsplit_max + split) * (D + 2);
#pragma unroll
            for (int c = 0; c < ND; c++) {
                int d = lane + 32 * c;
                if (d < D)
                    part[d] = acc[k][c];
            }
            if (lane == 0) {
                part[D] = m[k];
                part[D + 1] = l[k];
            }
        }
    }
}

// One block per partial slot (a query of a split sequence), a warp per head: combines the
// segments in segment order, m = max m_i, w_i = 2^(m_i - m), out = sum w_i acc_i / sum w_i l_i.
// A segment past a query's position (possible for the earlier queries of a multi-query step)
// has m_i = -inf and weight 0; segment 0 always holds key 0, so m is finite.
// One warp per (partial slot, q head): the slots of a decode batch are few (one per sequence),
// so a block per slot looping over the heads left the GPU idle and took ~14 us per call.
__global__ void __launch_bounds__(32) merge_kernel(AttnArgs a) {
    to_pdl_trigger();
    to_pdl_wait();
    const int2 slot = a.slots[blockIdx.x];
    if (slot.x < 0)
        return;
    const int64_t t = slot.x;
    const int ns = slot.y, D = a.D, lane = threadIdx.x;
    {
        const int h = blockIdx.y;
        const float *part = a.part + ((int64_t)blockIdx.x * a.Hq + h) * a.nsplit_max * (D + 2);
        float mx = -INFINITY;
        for (int i = lane; i < ns; i += 32)
            mx = fmaxf(mx, part[(int64_t)i * (D + 2) + D]);
        mx = to_warp_max(mx);
        float lsum = 0.0f;
        for (int i = 0; i < ns; i++) { // in order, every lane alike: a deterministic sum
            float mi = part[(int64_t)i * (D + 2) + D];
            if (mi != -INFINITY)
                lsum += part[(int64_t)i * (D + 2) + D + 1] * exp2f(mi - mx);
        }
        float inv = 1.0f / lsum;
        for (int d = lane; d < D; d += 32) {
            float acc = 0.0f;
            for (int i = 0; i < ns; i++) {
                float mi = part[(int64_t)i * (D + 2) + D];
                if (mi != -INFINITY)
                    acc += part[(int64_t)i * (D + 2) + d] * exp2f(mi - mx);
            }
            to_store(a.out, a.out_dtype, t * a.os0 + h * a.os1 + d * a.os2, acc * inv);
        }
    }
}

template <int DMAX, typename T>
int launch_attn(const AttnArgs &a, dim3 grid, cudaStream_t stream) {
    const size_t smem = Smem<DMAX>::bytes;
    // over 48 KB of dynamic shared memory needs the kernel's limit raised (a host-side
    // attribute, no synchronisation)
    cudaError_t err = cudaFuncSetAttribute(attn_kernel<DMAX, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess)
        return to_fail(TO_ERR_CUDA, "to_paged_attention: cannot give the kernel %zu bytes of shared memory: %s",
                       smem, cudaGetErrorString(err));
    return launched(to_launch(attn_kernel<DMAX, T>, grid, dim3(kThreads), smem, stream, a), "to_paged_attention");
}

template <int DMAX>
int launch_attn_dtype(const AttnArgs &a, int cache_dtype, dim3 grid, cudaStream_t stream) {
    switch (cache_dtype) {
    case TO_F32: return launch_attn<DMAX, float>(a, grid, stream);
    case TO_F16: return launch_attn<DMAX, __half>(a, grid, stream);
    case TO_BF16: return launch_attn<DMAX, __nv_bfloat16>(a, grid, stream);
    }
    return to_fail(TO_ERR_DTYPE, "to_paged_attention: cache dtype %s has no CUDA kernel", to_dtype_name(cache_dtype));
}

// ------------------------------------------------------------------------------------ decode path
//
// Used when the batch has no more query rows than sequences (T <= S, known from the shapes: one
// query per sequence in a decode step). No planning kernel: block (sequence s, kv head g, split)
// takes all nq * G query rows of s that read kv head g, so each K/V row is loaded once and used G
// times, and walks one segment of the context with them:
//  - lanes: a group of L lanes holds one key (16 bytes per lane per load), NG = 128 / L groups
//    take every NG-th key, NK keys per group per step with all their loads issued before any is
//    used; each lane keeps q and acc for its slice of d of every row in registers, and a group
//    reduces a score over its lanes with shuffles. Every group keeps its own online softmax over
//    the keys it saw; the groups are combined once, at the end, through shared memory. No
//    barrier inside a run of 128 keys.
//  - the cache rows of 128 keys at a time are looked up in the block table by one thread each
//    into shared memory; the next 128's entries are loaded while this run is worked on.
//  - segments: splits (from the host, shapes only: enough blocks for one full wave on the GPU)
//    cut the context into equal segments of a multiple of kSegMin keys, computed on the device
//    from the real length, so a short sequence uses few of them and the blocks past its context
//    exit at once. The first run's table entries are loaded together with the sequence's
//    lengths, guessing the shortest segment: a short context costs three dependent trips to
//    memory (lengths and entries, K/V, partials) before the merge.
//  - checks: "a bad batch writes nothing" needs every sequence checked before any row of out
//    is written. With one segment per sequence (and few sequences: "direct") every block checks
//    the whole batch before it writes its rows of out. With several segments and one sequence
//    on sm_90 ("cluster"), see below. Otherwise ("merge") the segments write
//    partials (acc, m, l) to a workspace, one extra block (block 0) checks the batch, and the
//    partials are merged in the same launch, see below. The error recorded is check_sequence's
//    for the lowest bad sequence, by the checking block alone.
//  - merge, "last block done": a (sequence s, kv head g) pair has splits + 1 parties, its
//    segments and the checking block, and one counter in a per-GPU array (decode_arrivals). A
//    segment writes its partials, then (after a __threadfence, so that whoever sees its count sees
//    them) adds 1; the checking block writes its verdict, then (after a fence) adds
//    kCheckerArrived to every pair's counter. The segment that brings the count of segments to
//    splits is the last one: after a fence it reads every segment's partials and merges them in
//    segment order, the very arithmetic of the merge kernel this replaced (deterministic, and
//    independent of which block happens to be last). It writes out only for a good batch: if the
//    checking block has arrived, its verdict says; if not (it is still busy: a batch of many
//    sequences), the merging block checks the batch itself (the same data, so the same answer)
//    rather than wait for it, since a block that waits for another may wait for one never
//    scheduled. (That costs a batch check in the blocks that finish first, where checking the
//    batch takes longer than a segment: many sequences with short contexts.) Whichever party
//    arrives last (the merging block or the checking block) sets the counter back to 0, so
//    every launch, and every replay of a graph, starts from zero: no memset per launch, and the
//    counters' array only needs zeroing once, when it is made.
//  - cluster (a batch of one sequence: batch-1 decode): the segments of a kv head are the blocks
//    of one thread-block cluster (at most kClusterMax, the largest of which the GPU holds every
//    kv head's at once). Each sends every block its partial of that block's share of the
//    outputs through distributed shared memory, and after a cluster barrier every block merges
//    its share (ClusterInbox, cluster_merge): no partials through the L2,
//    no fences, counters or checking block (BENCHMARKS.md, seventh pass: what it saves). Checks:
//    done in one pass, the sequence is checked on the way (its lengths by every block, its table
//    entries by the segment that looks them up, the verdict at the merge); in several (G > 8, or
//    several queries), by every block first, as "direct". (With more sequences the clusters
//    measured slower than the counters: every block checking the batch, and fewer clusters than
//    pairs resident at once.)
// Rows of one block beyond RMAX (a sequence with several queries, or G > 8) are done in passes of
// RMAX rows, each walking the segment again: correct for any batch, fast for decode.

constexpr int kDecThreads = 128;
constexpr int kDecRun = kDecThreads;  // keys whose cache rows are looked up together
constexpr int kSegMin = 32;           // keys per segment, at least (and a multiple of)
constexpr int kMaxSplits = 64;        // segments per sequence, at most (two per lane in the merge)
constexpr int kDirectMaxSeqs = 64;    // above this, one check block beats every block checking
constexpr int kClusterMax = 16;       // blocks per cluster, at most (16: a non-portable size)

template <int DMAX, typename T, int RMAX>
struct DecodeShape {
    static constexpr int VEC = 16 / (int)sizeof(T); // cache elements per 16-byte load
    static constexpr int PIECES = DMAX / VEC;       // 16-byte pieces of a (padded) row
    static constexpr int L = PIECES < 32 ? PIECES : 32; // lanes per key
    static constexpr int NC = PIECES / L;           // pieces per lane
    static constexpr int E = NC * VEC;              // elements of d per lane
    static constexpr int NG = kDecThreads / L;      // key groups per block
    // keys per group per step, all loaded before any is used: the more, the more bytes in flight
    // per thread (a long context is streamed at the rate latency allows), but q and acc already
    // take 2 * RMAX * E registers. Where registers allow, a shortest segment is one step (one
    // round trip to memory).
    static constexpr int NK_REG = (RMAX <= 2 ? 8 : RMAX == 4 ? 4 : 2) / NC;
    static constexpr int NK = NK_REG > 0 ? NK_REG : 1;
    static_assert(kDecRun % (NG * NK) == 0, "a run is a whole number of steps");
};

// Entry j of sequence s's row of block_tables, for key position p (-1 past the table's width: the
// position cannot be inside a valid context then).
__device__ __forceinline__ int64_t table_entry(const AttnArgs &a, int s, int64_t p) {
    const int64_t j = p / a.block_size;
    return j < a.max_blocks ? to_load_index_dev(a.bt, a.bt_dtype, (int64_t)s * a.bt_s0 + j * a.bt_s1) : -1;
}

// Element offset of key p's row of kv head g in the caches, or -1: past `stop`, or a block id
// outside the caches (never read; the batch check reports it).
__device__ __forceinline__ int64_t cache_row(const AttnArgs &a, int64_t entry, int64_t p, int64_t stop, int g) {
    if (p >= stop || entry < 0 || entry >= a.num_blocks)
        return -1;
    return ((entry * a.block_size + p % a.block_size) * a.Hkv + g) * a.D;
}

// The lowest sequence that check_sequence finds wrong, or -1; every thread of the block calls it
// and gets the answer. Runs of kDecThreads sequences: one thread checks a sequence's lengths, a
// block scan lays out the table entries their contexts need, and all threads check those, several
// loads in flight each. A batch of S sequences with contexts of n_s blocks costs sum n_s loads.
__device__ __noinline__ int find_bad_sequence(const AttnArgs &a, long long *scan, int *bad) {
    constexpr int U = 8; // entry loads in flight per thread
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    __syncthreads(); // scan and bad may still be read by a previous use
    if (tid == 0)
        *bad = INT32_MAX;
    __syncthreads();
    for (int s0 = 0; s0 < a.S; s0 += kDecThreads) {
        const int s = s0 + tid;
        long long n = 0;
        if (s < a.S) {
            SeqMeta m;
            int64_t value;
            if (check_sequence_head(a, s, &m, &value))
                atomicMin(bad, s);
            else
                n = m.blocks;
        }
        // inclusive scan of n: scan[i] = entries of sequences s0 .. s0 + i
        long long x = n;
        for (int o = 1; o < 32; o <<= 1) {
            long long y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o)
                x += y;
        }
        __syncthreads();
        scan[tid] = x;
        __syncthreads();
        long long before = 0;
        for (int w = 0; w < warp; w++)
            before += scan[w * 32 + 31];
        __syncthreads();
        scan[tid] = x + before;
        __syncthreads();
        const long long total = scan[kDecThreads - 1];
        for (long long base = 0; base < total; base += (long long)kDecThreads * U) {
            int64_t v[U];
            int sq[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const long long e = base + (long long)u * kDecThreads + tid;
                sq[u] = -1;
                v[u] = 0;
                if (e < total) {
                    int lo = 0, hi = kDecThreads - 1; // the first i with scan[i] > e
                    while (lo < hi) {
                        int mid = (lo + hi) / 2;
                        if (scan[mid] > e)
                            hi = mid;
                        else
                            lo = mid + 1;
                    }
                    const long long j = e - (lo > 0 ? scan[lo - 1] : 0);
                    sq[u] = s0 + lo;
                    v[u] = to_load_index_dev(a.bt, a.bt_dtype, (int64_t)sq[u] * a.bt_s0 + j * a.bt_s1);
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++)
                if (sq[u] >= 0 && (v[u] < 0 || v[u] >= a.num_blocks))
                    atomicMin(bad, sq[u]);
        }
        __syncthreads();
        if (*bad != INT32_MAX)
            break; // runs go in order: no lower sequence is bad
    }
    const int r = *bad; // read after the loop's last barrier
    return r == INT32_MAX ? -1 : r;
}

// Records sequence s's error as the planning kernel does (one thread calls it).
__device__ __noinline__ void report_bad_sequence(const AttnArgs &a, int s) {
    int64_t value;
    if (int what = check_sequence(a, s, &value))
        to_gpu_error(a.err, TO_GPU_ERR_BATCH, s, what, value);
}

// This lane's slice of q (times scale * log2 e) for query rows r0 .. r0 + RMAX of kv head g, the
// rows of sequence s starting at q row b: zeros past `nr` rows (padding rows see no key) and past
// D. All loads are issued together (to_load_n): one trip to memory.
template <int DMAX, typename T, int RMAX>
__device__ __forceinline__ void load_q(const AttnArgs &a, int64_t b, int g, int r0, int nr,
                                       float (&q)[RMAX][DecodeShape<DMAX, T, RMAX>::E]) {
    using Sh = DecodeShape<DMAX, T, RMAX>;
    constexpr int L = Sh::L, VEC = Sh::VEC, E = Sh::E;
    const int li = threadIdx.x % L, G = a.G;
    int64_t off[RMAX * E];
    bool in[RMAX * E];
#pragma unroll
    for (int r = 0; r < RMAX; r++)
#pragma unroll
        for (int i = 0; i < E; i++) {
            const int rr = r0 + r, d = (i / VEC * L + li) * VEC + i % VEC;
            const int64_t t = b + rr / G, h = (int64_t)g * G + rr % G;
            in[r * E + i] = r < nr && d < a.D;
            off[r * E + i] = t * a.qs0 + h * a.qs1 + d * a.qs2;
        }
    float v[RMAX * E];
    to_load_n(a.q, a.q_dtype, off, in, v);
#pragma unroll
    for (int r = 0; r < RMAX; r++)
#pragma unroll
        for (int i = 0; i < E; i++)
            q[r][i] = v[r * E + i] * a.qscale;
}

// What decode_segment tells the merge, in shared memory (nothing held in registers across it).
struct SegmentRows {
    int64_t first; // s's first query row
    int rows;      // its rows that read kv head g (nq * G, maybe 0); -1: s's own lengths are wrong
    int filled;    // segments that hold keys (the first ones; the rest are empty)
};

// Keys per segment of a context of len keys cut into `splits` (a multiple of kSegMin)
__device__ __forceinline__ int64_t segment_length(int64_t len, int splits) {
    const int64_t per = (len + splits - 1) / splits;
    return per <= kSegMin ? kSegMin : (per + kSegMin - 1) / kSegMin * kSegMin;
}

// ---- fused: the token's own heads (to_rope_kv_attention) ----
// A decode step of one sequence (T = S = 1: the token is row 0 of everything) in cluster mode
// normalises and rotates its own q and k, so that the layer's rotation, KV store and attention are
// one launch (BENCHMARKS.md, tenth pass). Every block of kv head g computes the token's G q heads
// (the same values in every segment: nothing is written back to qk, which every block reads). The
// segment that holds the token's position (the last filled one, the only block that reads that
// cache row) computes the k head too and stores k and v in the cache row that block_tables gives
// the position, once it has checked that slot_mapping names the same slot (else: the error,
// nothing stored, out not written). It then reads that row back like every other: in this mode
// cache rows are loaded through the L2 (ld.global.cg), since the read-only path (ld.global.nc) is
// not coherent with the launch's own writes. The values are the bits of rope.cu's kernels
// followed by the attention (the same arithmetic, rope.cuh; q and k rounded to qk's dtype, as
// the separate ops pass them on).
template <int DMAX, int RMAX>
struct FusedToken {
    static constexpr int J = ((RMAX + 1) * DMAX + kDecThreads - 1) / kDecThreads; // per thread
    static constexpr int JV = (DMAX + kDecThreads - 1) / kDecThreads;
    static constexpr int N = DMAX / 32; // rope_head_layout's N: R <= D <= DMAX
    float x[J], w[J]; // [item][DMAX] flattened: the G q heads of kv head g, then its k head
    float v[JV];      // v's head g, d = tid + kDecThreads j
    int64_t slot;     // slot_mapping[0]
    float pos, inv;   // positions[0], inv_freq[tid]
};

// Head h of qk for item `item` of kv head g's block: q heads g G .. g G + G - 1, then k's head g
__device__ __forceinline__ int64_t fused_head(const AttnArgs &a, int g, int item) {
    return item < a.G ? (int64_t)g * a.G + item : (int64_t)a.Hq + g;
}

// Everything the token's heads need, loaded together (issued with the sequence's lengths).
template <int DMAX, int RMAX>
__device__ __forceinline__ void fused_load(const AttnArgs &a, int g, FusedToken<DMAX, RMAX> &tok) {
    using F = FusedToken<DMAX, RMAX>;
    const RopeArgs &r = a.rope;
    const int tid = threadIdx.x;
    const int64_t sw = r.weight.ndim ? r.weight.strides[r.weight.ndim - 1] : 0;
    int64_t xoff[F::J], woff[F::J], voff[F::JV];
    bool in[F::J], vin[F::JV];
#pragma unroll
    for (int j = 0; j < F::J; j++) {
        const int idx = tid + kDecThreads * j, item = idx / DMAX, d = idx % DMAX;
        const int64_t h = fused_head(a, g, item);
        in[j] = item <= a.G && d < a.D;
        xoff[j] = h * r.x.strides[1] + d * r.x.strides[2];
        woff[j] = (r.weight.ndim == 2 ? h * r.weight.strides[0] : 0) + d * sw;
    }
#pragma unroll
    for (int j = 0; j < F::JV; j++) {
        const int d = tid + kDecThreads * j;
        vin[j] = d < a.D;
        voff[j] = g * r.kv.vs1 + d * r.kv.vs2;
    }
    to_load_n(r.x.data, r.x.dtype, xoff, in, tok.x);
    if (r.weight.data)
        to_load_n(r.weight.data, r.weight.dtype, woff, in, tok.w);
    to_load_n(r.kv.v, r.kv.v_dtype, voff, vin, tok.v);
    tok.slot = to_load_index_dev(r.kv.slots, r.kv.slot_dtype, 0);
    tok.pos = rope_position(r, 0);
    tok.inv = tid < r.R / 2 ? rope_inv_freq(r, tid) : 0.0f;
}

// Shared memory of the fused prologue (floats): the heads x [G + 1][DMAX] and their weights w
// (RMAX + 1 rows each), v's head [DMAX], cos and sin [DMAX / 2] each; and the token's slot.
template <int DMAX, int RMAX>
struct FusedSmem {
    static constexpr int FLOATS = (2 * RMAX + 4) * DMAX;
    float *x, *w, *v, *cs, *sn;
    int64_t *slot;
    __device__ FusedSmem(float *buf, int64_t *slot_) : slot(slot_) {
        x = buf, w = x + (RMAX + 1) * DMAX, v = w + (RMAX + 1) * DMAX, cs = v + DMAX, sn = cs + DMAX / 2;
    }
};

// The heads normalised and rotated, by a warp each, into sm.x (rounded to qk's dtype): the G q
// heads, and the k head in the owner, the only block that needs it. v's head and the slot go to
// sm too (nothing of tok is held in registers past this). Every thread calls it.
template <int DMAX, int RMAX>
__device__ __forceinline__ void fused_heads(const AttnArgs &a, int g, bool owner, const FusedToken<DMAX, RMAX> &tok,
                                            const FusedSmem<DMAX, RMAX> &sm) {
    using F = FusedToken<DMAX, RMAX>;
    constexpr int N = F::N;
    const RopeArgs &r = a.rope;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const bool norm = r.weight.data != nullptr;
    float *sX = sm.x, *sW = sm.w, *cs = sm.cs, *sn = sm.sn;
#pragma unroll
    for (int j = 0; j < F::J; j++) {
        const int idx = tid + kDecThreads * j;
        if (idx < (RMAX + 1) * DMAX) {
            sX[idx] = tok.x[j];
            sW[idx] = norm ? tok.w[j] : 0.0f;
        }
    }
#pragma unroll
    for (int j = 0; j < F::JV; j++)
        if (tid + kDecThreads * j < DMAX)
            sm.v[tid + kDecThreads * j] = tok.v[j];
    if (tid == 0)
        *sm.slot = tok.slot;
    if (tid < r.R / 2)
        rope_cos_sin(tok.pos, tok.inv, r.scaling, cs + tid, sn + tid);
    __syncthreads();
    const int items = owner ? a.G + 1 : a.G;
    for (int item = warp; item < items; item += kDecThreads / 32) { // warp-uniform
        int64_t e[3 * N];
        bool in[3 * N];
        rope_head_layout<N>(a.D, r.R, r.interleaved, lane, e, in);
        float *x = sX + item * DMAX;
        const float *w = sW + item * DMAX;
        float v[3 * N], wv[3 * N];
#pragma unroll
        for (int m = 0; m < 3 * N; m++) {
            v[m] = in[m] ? x[e[m]] : 0.0f;
            wv[m] = in[m] ? w[e[m]] : 0.0f;
        }
        norm_rope_head<N>(v, wv, norm, r.eps, a.D, r.R, lane, cs, sn,
                          [&](int64_t i, float y) { x[i] = to_round(r.x.dtype, y); });
    }
    __syncthreads();
}

// The owner stores the token's k (sm.x row G) and v at `row`, the cache row of its position (from
// the table; -1 for an entry outside the caches, which the lookup has marked bad), if slot_mapping
// names that slot; otherwise records the error and marks the segment bad (out is not written).
// Every thread of the block calls it; the barrier at the end orders the stores before the loads.
template <int DMAX, int RMAX>
__device__ __forceinline__ void fused_store(const AttnArgs &a, int64_t row, FusedSmem<DMAX, RMAX> sm, int *seg_bad) {
    const RopeArgs &r = a.rope;
    if (row >= 0) {
        const int64_t slot = row / ((int64_t)a.Hkv * a.D); // row = (slot Hkv + g) D, g < Hkv
        if (*sm.slot != slot) {
            if (threadIdx.x == 0) {
                to_gpu_error(a.err, TO_GPU_ERR_ROPE_KV_ATTN_SLOT, 0, *sm.slot, slot);
                *seg_bad = 1;
            }
        } else {
            const float *k = sm.x + a.G * DMAX;
            for (int d = threadIdx.x; d < a.D; d += kDecThreads) {
                to_store(r.kv.k_cache, r.kv.cache_dtype, row + d, k[d]);
                to_store(r.kv.v_cache, r.kv.cache_dtype, row + d, sm.v[d]);
            }
        }
    }
    __syncthreads();
}

// 16 bytes of a cache row: through the read-only path, or (fused) through the L2
__device__ __forceinline__ uint4 load_cache16(const void *p, bool coherent) {
    const uint4 *q = reinterpret_cast<const uint4 *>(p);
    return coherent ? __ldcg(q) : __ldg(q);
}

// Cluster mode's merge: block `split` of a kv head's cluster merges a share of each pass's nr * D
// outputs, per = ceil(nr * D / splits) of them (outputs split * per .. ). Every segment sends each
// block its partial of that block's share, its m and l of the pass's rows and whether it looked up
// a bad table entry, into slot j = its own rank of that block's inbox: stores to distributed
// shared memory, which need no round trip. After the cluster barrier each block merges from its
// own shared memory. (The first version had each block read the others' partials instead: those
// loads through the cluster took 3 of a 0.6B layer's 13 us of attention, 6 of 4B's 18.)
template <int DMAX, int RMAX>
struct ClusterInbox {
    float acc[RMAX * DMAX + kClusterMax]; // [splits][per]: slot j's values of this block's share
    float m[kClusterMax][RMAX], l[kClusterMax][RMAX];
    int bad[kClusterMax];
};

// This segment's m and l of rows 0 .. nr and its bad flag, to every block of the cluster (every
// thread calls it: thread i sends row i % RMAX to block i / RMAX).
template <int DMAX, int RMAX>
__device__ __forceinline__ void cluster_send_rows(ClusterInbox<DMAX, RMAX> *inbox, int split, int splits, int nr,
                                                  const float *m, const float *l, int bad) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    static_assert(kClusterMax * RMAX <= kDecThreads, "a thread per (block, row)");
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    const int dest = threadIdx.x / RMAX, r = threadIdx.x % RMAX;
    if (dest >= splits || r >= nr)
        return;
    ClusterInbox<DMAX, RMAX> *to = cluster.map_shared_rank(inbox, dest);
    to->m[split][r] = m[r];
    to->l[split][r] = l[r];
    if (r == 0)
        to->bad[split] = bad;
#endif
}

// This segment's partial x of output i (of n = nr * D) to the block whose share holds it.
template <int DMAX, int RMAX>
__device__ __forceinline__ void cluster_send(ClusterInbox<DMAX, RMAX> *inbox, int split, int splits, int n, int i,
                                             float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const int per = (n + splits - 1) / splits, dest = i / per;
    *cooperative_groups::this_cluster().map_shared_rank(&inbox->acc[split * per + i - dest * per], dest) = x;
#endif
}

// After the sends of a pass over rows r0 .. r0 + nr of sequence s (first q row b) and kv head g:
// the barrier, then block `split` merges its share from the first `filled` slots (the segments
// that hold keys) in slot order (deterministic) and writes it, unless a segment saw a bad entry
// (then rank 0 records the error and nothing is written). Before another pass, a second barrier
// keeps its sends from overwriting an inbox still being read. (Inlined, so that the inbox is read
// as shared memory and a's fields from the constant bank: as a called function, with generic
// loads, the merge of a 4B layer's attention took ~2 us.)
template <int DMAX, int RMAX>
__device__ __forceinline__ void cluster_merge(const AttnArgs &a, int s, int64_t b, int g, int r0, int nr, int split,
                                              int filled, const ClusterInbox<DMAX, RMAX> &inbox, bool last_pass) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    cluster.sync();
    bool bad = false;
#pragma unroll
    for (int j = 0; j < kClusterMax; j++)
        bad |= j < filled && inbox.bad[j] != 0;
    if (bad) {
        if (split == 0 && threadIdx.x == 0)
            report_bad_sequence(a, s);
    } else {
        const int D = a.D, n = nr * D, per = (n + a.splits - 1) / a.splits, first = split * per;
        const int end = min(n, first + per);
        for (int i = first + (int)threadIdx.x; i < end; i += kDecThreads) {
            const int r = i / D, d = i % D;
            float mj[kClusterMax], mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < kClusterMax; j++) {
                mj[j] = j < filled ? inbox.m[j][r] : -INFINITY;
                mx = fmaxf(mx, mj[j]);
            }
            float x = 0.0f, sum = 0.0f;
#pragma unroll
            for (int j = 0; j < kClusterMax; j++) {
                const float w = mj[j] == -INFINITY ? 0.0f : exp2f(mj[j] - mx);
                if (w != 0.0f) {
                    x += w * inbox.acc[j * per + i - first];
                    sum += w * inbox.l[j][r];
                }
            }
            const int rr = r0 + r;
            const int64_t t = b + rr / a.G, h = (int64_t)g * a.G + rr % a.G;
            to_store(a.out, a.out_dtype, t * a.os0 + h * a.os1 + d * a.os2, x / sum);
        }
    }
    if (!last_pass)
        cluster.sync();
#endif
}

// This block's segment (sequence s, kv head g, segment split, from blockIdx.x): with merging, its
// partials (acc, m, l) for every row of s that reads g; otherwise, once the whole batch checked
// good, those rows of out. Every thread of the block calls it; thread 0 fills *rows_out.
template <int DMAX, typename T, int RMAX, bool FUSED>
__device__ __forceinline__ void decode_segment(const AttnArgs &a, long long *sScan, int *sBad, SegmentRows *rows_out) {
    using Sh = DecodeShape<DMAX, T, RMAX>;
    constexpr int L = Sh::L, NC = Sh::NC, VEC = Sh::VEC, E = Sh::E, NG = Sh::NG, NK = Sh::NK;
    __shared__ int64_t sRow[2][kDecRun];             // cache rows of the current and next run
    // the groups' acc at the end; before the keys, the fused token's heads, weights and cos/sin
    constexpr int kAcc = NG * RMAX * DMAX, kFused = FusedSmem<DMAX, RMAX>::FLOATS;
    __shared__ __align__(16) float sBuf[kAcc > kFused ? kAcc : kFused];
    __shared__ int64_t sSlot;
    float (*sAcc)[RMAX][DMAX] = reinterpret_cast<float (*)[RMAX][DMAX]>(sBuf);
    const FusedSmem<DMAX, RMAX> fsm(sBuf, &sSlot);
    __shared__ float sM[NG][RMAX], sL[NG][RMAX], sRowL[RMAX];
    __shared__ int sSegBad;                          // a key's table entry is outside the caches
    __shared__ ClusterInbox<DMAX, RMAX> sInbox;      // cluster mode: what the segments send this block
    const int tid = threadIdx.x, li = tid % L, gi = tid / L;
    const int G = a.G, D = a.D;
    // (computed here, not in the kernel and passed in: that way ptxas spilled more registers
    // in the cases held to 168 of them, G = 2 and 4)
    const int id = (int)blockIdx.x - a.merge; // the host keeps the grid below 2^31 blocks
    const int split = id % a.splits, g = id / a.splits % a.Hkv, s = id / a.splits / a.Hkv;

    // The first run's table entries, guessing the shortest segment (right whenever the context is
    // at most splits * kSegMin keys), loaded together with the sequence's lengths.
    const int64_t guess0 = (int64_t)split * kSegMin;
    int64_t entry = table_entry(a, s, guess0 + tid);
    // So are the first pass's q rows, guessing one query per sequence (q row s: a decode step);
    // rows past q's end are zeros, never used (the guess is right only when they are padding).
    float q[RMAX][E];
    const bool q_guessed = !FUSED && s < a.T;
    if (q_guessed)
        load_q<DMAX, T, RMAX>(a, s, g, 0, (int)(a.T - s < RMAX ? (a.T - s) * G : RMAX), q);
    FusedToken<DMAX, RMAX> tok; // (fused: the token's heads instead)
    if (FUSED)
        fused_load<DMAX, RMAX>(a, g, tok);
    SeqMeta sm;
    int64_t value;
    const bool head_bad = check_sequence_head(a, s, &sm, &value) != 0;
    if (tid == 0)
        *rows_out = SegmentRows{sm.b, head_bad ? -1 : (int)((sm.e - sm.b) * G),
                                head_bad ? 0 : (int)((sm.len + segment_length(sm.len, a.splits) - 1)
                                                           / segment_length(sm.len, a.splits))};
    if (head_bad) { // nothing of s may be read
        if (!a.merge) {
            const int bad = find_bad_sequence(a, sScan, sBad);
            if (tid == 0 && bad >= 0)
                report_bad_sequence(a, bad);
        }
        return;
    }
    const int64_t nq = sm.e - sm.b, len = sm.len, b = sm.b;
    if (nq == 0)
        return;
    const int rows = (int)(nq * G); // the host bounds T * Hq by INT32_MAX
    // A cluster (one sequence) done in one pass checks it on the way: its head above, its table
    // entries as the segments look them up (sSegBad), the verdict taken at the merge.
    const bool checked_on_the_way = a.cluster && rows <= RMAX;
    if (tid == 0)
        sSegBad = 0;
    if (!a.merge && !checked_on_the_way && find_bad_sequence(a, sScan, sBad) >= 0) {
        if (tid == 0)
            report_bad_sequence(a, *sBad);
        return;
    }

    // this block's segment of the context
    const int64_t seglen = segment_length(len, a.splits);
    const int64_t k_begin = split * seglen, k_end = len < k_begin + seglen ? len : k_begin + seglen;
    const int filled = (int)((len + seglen - 1) / seglen); // segments holding keys: the first ones
    if (k_begin >= len && !a.cluster) { // past the context: an empty partial for the merge
        for (int i = tid; i < rows; i += kDecThreads) {
            const int64_t t = b + i / G, h = (int64_t)g * G + i % G;
            a.ml[(t * a.Hq + h) * a.splits + split] = make_float2(-INFINITY, 0.0f);
        }
        return;
    }
    const bool owner = FUSED && split == filled - 1; // holds the token's position, len - 1
    if (FUSED) {
        // The next kernel (the output projection) may launch only now, once this block's first
        // loads are in: launched at the start, its blocks' early weight loads delayed those loads
        // (H200, decode step graph replay, one build: 0.6B 803-808 -> 795-796 us, 4B 3,029 ->
        // 2,998; later, after the rotation, measured 810 and 3,032, after the keys 796 and 3,004).
        to_pdl_trigger();
        fused_heads<DMAX, RMAX>(a, g, owner, tok, fsm);
    }
    const int64_t pos0 = len - nq; // position of the first query
    const T *kc = static_cast<const T *>(a.k_cache), *vc = static_cast<const T *>(a.v_cache);
    // key p's cache row from this thread's table entry (-1 past stop); an entry outside the caches
    // marks the segment bad
    auto lookup = [&](int64_t p, int64_t stop) {
        const int64_t row = cache_row(a, entry, p, stop, g);
        if (row < 0 && p < stop)
            sSegBad = 1;
        return row;
    };

    for (int r0 = 0; r0 < rows; r0 += RMAX) {
        const int nr = rows - r0 < RMAX ? rows - r0 : RMAX;
        if (FUSED) { // one pass (nr = G): the rotated heads, scaled as load_q scales them
#pragma unroll
            for (int r = 0; r < RMAX; r++)
#pragma unroll
                for (int i = 0; i < E; i++) {
                    const int d = (i / VEC * L + li) * VEC + i % VEC;
                    q[r][i] = r < nr && d < D ? fsm.x[r * DMAX + d] * a.qscale : 0.0f;
                }
        } else if (!(r0 == 0 && q_guessed && b == s)) {
            load_q<DMAX, T, RMAX>(a, b, g, r0, nr, q);
        }
        int pos[RMAX]; // -1 for a padding row: it sees no key
#pragma unroll
        for (int r = 0; r < RMAX; r++)
            pos[r] = r < nr ? (int)(pos0 + (r0 + r) / G) : -1;
        // keys past the pass's last position are masked for all its rows
        const int64_t last = pos0 + (r0 + nr - 1) / G + 1;
        const int64_t k_stop = k_end < last ? k_end : last;

        float m[RMAX], l[RMAX], acc[RMAX][E];
#pragma unroll
        for (int r = 0; r < RMAX; r++) {
            m[r] = -INFINITY;
            l[r] = 0.0f;
#pragma unroll
            for (int e = 0; e < E; e++)
                acc[r][e] = 0.0f;
        }

        if (k_stop > k_begin) {
            if (!(r0 == 0 && k_begin == guess0))
                entry = table_entry(a, s, k_begin + tid);
            __syncthreads(); // sRow is no longer read by the previous pass
            sRow[0][tid] = lookup(k_begin + tid, k_stop);
            __syncthreads();
            if (owner) { // the token's row: looked up above, or (a segment past one run) here
                const int64_t p = len - 1;
                const int64_t row = p - k_begin < kDecRun ? sRow[0][p - k_begin]
                                                          : cache_row(a, table_entry(a, s, p), p, len, g);
                fused_store<DMAX, RMAX>(a, row, fsm, &sSegBad);
            }
            int buf = 0;
            for (int64_t c0 = k_begin; c0 < k_stop; c0 += kDecRun) {
                const int64_t c1 = c0 + kDecRun;
                if (c1 < k_stop) // the next run's entry, in flight while this one is worked on
                    entry = table_entry(a, s, c1 + tid);
                const int n = (int)(k_stop - c0 < kDecRun ? k_stop - c0 : kDecRun);
#pragma unroll 1
                for (int kb = 0; kb < n; kb += NG * NK) {
                    // keys kb + gi + NG k of the run: all their loads first, then the math
                    int64_t roff[NK];
                    uint4 kr[NK][NC], vr[NK][NC];
#pragma unroll
                    for (int k = 0; k < NK; k++)
                        roff[k] = sRow[buf][kb + gi + NG * k];
#pragma unroll
                    for (int k = 0; k < NK; k++)
#pragma unroll
                        for (int c = 0; c < NC; c++) {
                            const int d0 = (c * L + li) * VEC;
                            kr[k][c] = vr[k][c] = make_uint4(0, 0, 0, 0); // zero past D and k_stop
                            if (roff[k] >= 0 && d0 < D) {
                                kr[k][c] = load_cache16(kc + roff[k] + d0, FUSED);
                                vr[k][c] = load_cache16(vc + roff[k] + d0, FUSED);
                            }
                        }
                    // scores (base 2), reduced over the group's lanes; masked ones -inf
                    float sc[NK][RMAX];
#pragma unroll
                    for (int k = 0; k < NK; k++) {
                        float kf[E];
#pragma unroll
                        for (int c = 0; c < NC; c++)
                            widen16<T>(kr[k][c], kf + c * VEC);
                        const int64_t key = c0 + kb + gi + NG * k;
#pragma unroll
                        for (int r = 0; r < RMAX; r++) {
                            float x = 0.0f;
#pragma unroll
                            for (int e = 0; e < E; e++)
                                x += q[r][e] * kf[e];
#pragma unroll
                            for (int o = L / 2; o > 0; o >>= 1)
                                x += __shfl_xor_sync(0xffffffffu, x, o);
                            sc[k][r] = roff[k] >= 0 && key <= pos[r] ? x : -INFINITY;
                        }
                    }
                    // online softmax: the group's max moves to m_new, what it had is rescaled
#pragma unroll
                    for (int r = 0; r < RMAX; r++) {
                        float mx = m[r];
#pragma unroll
                        for (int k = 0; k < NK; k++)
                            mx = fmaxf(mx, sc[k][r]);
                        // nothing seen yet: any finite reference gives weights 0
                        const float ref = mx == -INFINITY ? 0.0f : mx;
                        const float alpha = exp2f(m[r] - ref);
                        l[r] *= alpha;
#pragma unroll
                        for (int e = 0; e < E; e++)
                            acc[r][e] *= alpha;
#pragma unroll
                        for (int k = 0; k < NK; k++) {
                            sc[k][r] = exp2f(sc[k][r] - ref);
                            l[r] += sc[k][r];
                        }
                        m[r] = mx;
                    }
#pragma unroll
                    for (int k = 0; k < NK; k++) {
                        float vf[E];
#pragma unroll
                        for (int c = 0; c < NC; c++)
                            widen16<T>(vr[k][c], vf + c * VEC);
#pragma unroll
                        for (int r = 0; r < RMAX; r++)
#pragma unroll
                            for (int e = 0; e < E; e++)
                                acc[r][e] += sc[k][r] * vf[e];
                    }
                }
                if (c1 < k_stop)
                    sRow[buf ^ 1][tid] = lookup(c1 + tid, k_stop);
                __syncthreads();
                buf ^= 1;
            }
        }

        // combine the groups: M = max m_g, w_g = 2^(m_g - M), acc = sum w_g acc_g, l = sum w_g l_g
        // (a group that saw no key has w_g = 0; a row no group saw keeps M = -inf, an empty partial)
        __syncthreads(); // sAcc, sM may still be read by the previous pass
        if (li == 0)
#pragma unroll
            for (int r = 0; r < RMAX; r++) {
                sM[gi][r] = m[r];
                sL[gi][r] = l[r];
            }
#pragma unroll
        for (int r = 0; r < RMAX; r++)
#pragma unroll
            for (int c = 0; c < NC; c++)
#pragma unroll
                for (int e = 0; e < VEC; e += 4)
                    *reinterpret_cast<float4 *>(&sAcc[gi][r][(c * L + li) * VEC + e]) =
                        make_float4(acc[r][c * VEC + e], acc[r][c * VEC + e + 1], acc[r][c * VEC + e + 2],
                                    acc[r][c * VEC + e + 3]);
        __syncthreads();
        if (tid < nr) {
            float mx = -INFINITY;
            for (int j = 0; j < NG; j++)
                mx = fmaxf(mx, sM[j][tid]);
            float lsum = 0.0f;
            for (int j = 0; j < NG; j++) {
                const float w = mx == -INFINITY ? 0.0f : exp2f(sM[j][tid] - mx);
                lsum += w * sL[j][tid];
                sL[j][tid] = w; // now the group's weight
            }
            sM[0][tid] = mx;
            sRowL[tid] = lsum;
        }
        __syncthreads();
        if (a.cluster)
            cluster_send_rows<DMAX, RMAX>(&sInbox, split, a.splits, nr, sM[0], sRowL, sSegBad);
        for (int i = tid; i < nr * D; i += kDecThreads) {
            const int r = i / D, d = i % D, rr = r0 + r;
            float x = 0.0f;
            for (int j = 0; j < NG; j++)
                x += sL[j][r] * sAcc[j][r][d];
            const int64_t t = b + rr / G, h = (int64_t)g * G + rr % G;
            if (a.cluster) { // the block's partial, merged by the cluster below
                cluster_send<DMAX, RMAX>(&sInbox, split, a.splits, nr * D, i, x);
            } else if (!a.merge) { // l >= 1: the row's own position is among its keys
                to_store(a.out, a.out_dtype, t * a.os0 + h * a.os1 + d * a.os2, x * (1.0f / sRowL[r]));
            } else {
                const int64_t at = (t * a.Hq + h) * a.splits + split;
                a.part[at * D + d] = x;
                if (d == 0)
                    a.ml[at] = make_float2(sM[0][r], sRowL[r]);
            }
        }
        if (a.cluster)
            cluster_merge<DMAX, RMAX>(a, s, b, g, r0, nr, split, filled, sInbox, r0 + RMAX >= rows);
    }
}

// One warp, for query row t and q head h: out = sum_i w_i acc_i / sum_i w_i l_i over the
// segments, w_i = 2^(m_i - max m), in segment order (deterministic). Only the first `filled`
// segments hold keys; the others are empty (m = -inf, weight 0) and are not read. Segment 0 holds
// key 0, so max m is finite. (The arithmetic of the separate merge kernel this replaced,
// unchanged: the same bits.) The other segments' partials were written by other blocks in this
// launch: read through L2 (__ldcg), after the acquiring fence of the arrival. Every (m, l) and the
// first kMergeLoads segments' acc are loaded together, before any is used: one trip to memory
// for up to kMergeLoads segments. With `verdict` the checking block's verdict decides whether
// out is written (loaded with the partials, used only at the stores); without it the caller knows
// the batch is good.
constexpr int kMergeLoads = 8; // segments whose acc loads are in flight together

__device__ __forceinline__ void merge_row(const AttnArgs &a, int64_t t, int64_t h, int filled, bool verdict) {
    const int lane = threadIdx.x % 32;
    const bool ok = !verdict || *(volatile const int *)a.batch_ok;
    const int64_t pair = t * a.Hq + h;
    const int ns = filled, D = a.D;
    const float2 *ml = a.ml + pair * a.splits;
    const float *part = a.part + pair * a.splits * D;
    const float2 none = make_float2(-INFINITY, 0.0f);
    const float2 x0 = lane < ns ? __ldcg(ml + lane) : none, x1 = lane + 32 < ns ? __ldcg(ml + lane + 32) : none;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}; // d = lane + 32 c, D <= 256
    float w0 = 0.0f, w1 = 0.0f, inv = 0.0f;
    for (int i0 = 0; i0 < ns; i0 += kMergeLoads) {
        float v[kMergeLoads][8];
#pragma unroll
        for (int u = 0; u < kMergeLoads; u++)
#pragma unroll
            for (int c = 0; c < 8; c++) { // an address always there (segment 0's); the value unused
                const int i = i0 + u, d = lane + 32 * c;
                v[u][c] = __ldcg(part + (i < ns && d < D ? (int64_t)i * D + d : 0));
            }
        if (i0 == 0) { // the weights, once the (m, l) loads are in
            const float mx = to_warp_max(fmaxf(x0.x, x1.x));
            w0 = x0.x == -INFINITY ? 0.0f : exp2f(x0.x - mx);
            w1 = x1.x == -INFINITY ? 0.0f : exp2f(x1.x - mx);
            inv = 1.0f / to_warp_sum(w0 * x0.y + w1 * x1.y);
        }
#pragma unroll
        for (int u = 0; u < kMergeLoads; u++) {
            const int i = i0 + u;
            float w = __shfl_sync(0xffffffffu, i < 32 ? w0 : w1, i % 32);
            w = i < ns ? w : 0.0f;
#pragma unroll
            for (int c = 0; c < 8; c++)
                acc[c] += w != 0.0f ? w * v[u][c] : 0.0f;
        }
    }
    if (!ok)
        return; // a bad batch: nothing written
#pragma unroll
    for (int c = 0; c < 8; c++) {
        const int d = lane + 32 * c;
        if (d < D)
            to_store(a.out, a.out_dtype, t * a.os0 + h * a.os1 + d * a.os2, acc[c] * inv);
    }
}

// Arrival counts (a.arrivals): a segment adds 1, the checking block kCheckerArrived; the low bits
// count segments (at most kMaxSplits).
constexpr unsigned kCheckerArrived = 1u << 16, kSegmentsArrived = kCheckerArrived - 1;

// Block 0 when merging, once it has checked the whole batch (bad: its lowest bad sequence, or -1):
// records the error, publishes the verdict, then arrives at every (sequence, kv head) pair. Where
// it is the last party of a pair (every segment came before it: that pair's merging block checked
// the batch itself), it sets the pair's counter back to 0.
__device__ void announce_verdict(const AttnArgs &a, int bad) {
    if (threadIdx.x == 0) {
        *a.batch_ok = bad < 0;
        if (bad >= 0)
            report_bad_sequence(a, bad);
    }
    __syncthreads();
    __threadfence(); // the verdict is visible to whoever sees one of the counts below
    constexpr int U = 8; // arrivals in flight per thread (a batch of many sequences has many pairs)
    const int pairs = a.S * a.Hkv; // the host keeps S * Hkv * splits below 2^31
    for (int i0 = 0; i0 < pairs; i0 += kDecThreads * U) {
        unsigned before[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = i0 + u * kDecThreads + (int)threadIdx.x;
            before[u] = i < pairs ? atomicAdd(a.arrivals + i, kCheckerArrived) : 0u;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int i = i0 + u * kDecThreads + (int)threadIdx.x;
            if (i < pairs && (before[u] & kSegmentsArrived) == (unsigned)a.splits)
                atomicExch(a.arrivals + i, 0u);
        }
    }
}

// Grid: splits * Hkv * S blocks, block index ((s * Hkv + g) * splits + split), plus block 0 (the
// batch check) in front when merging. DMAX: D rounded up to 64, 128 or 256; T: the cache
// element; RMAX: query rows per pass (G rounded up to a power of two, at most 8).
// (FUSED: a batch of one sequence, whose few blocks need not share a multiprocessor: no register
// cap, so the prologue does not push the key loop into spills.)
template <int DMAX, typename T, int RMAX, bool FUSED>
__global__ void __launch_bounds__(kDecThreads, FUSED ? 1 : RMAX >= 8 ? 2 : 3) decode_kernel(const __grid_constant__ AttnArgs a) {
    __shared__ long long sScan[kDecThreads];
    __shared__ int sBad;
    __shared__ SegmentRows sRows;
    __shared__ unsigned sBefore;
    __shared__ int sPair;

    if (!FUSED) // (the fused kernel triggers in decode_segment, once its first loads are in)
        to_pdl_trigger(); // the next kernel's blocks may take free SM room and prefetch its weights
    const int tid = threadIdx.x;
    to_pdl_wait(); // q, the cache and the batch are written by earlier work (and the counters
                   // used by the launch before this one)
    if (a.merge && blockIdx.x == 0) { // the checking block
        announce_verdict(a, find_bad_sequence(a, sScan, &sBad));
        return;
    }
    decode_segment<DMAX, T, RMAX, FUSED>(a, sScan, &sBad, &sRows);
    if (!a.merge)
        return;

    // This segment arrives (whatever it wrote, even nothing: every party of the pair must count).
    // The pattern of cooperative groups' grid sync: a barrier, so that every thread's partials
    // are written; a fence by the thread that counts (release); after the count, another fence
    // (acquire) before the block reads what the others wrote. (What the merge needs is read from
    // shared memory or recomputed: no register is held across decode_segment.)
    __syncthreads();
    if (tid == 0) {
        const int pair = ((int)blockIdx.x - 1) / a.splits; // s * Hkv + g
        unsigned *count = a.arrivals + pair;
        __threadfence();
        const unsigned before = atomicAdd(count, 1u);
        if ((before & kSegmentsArrived) == (unsigned)a.splits - 1) { // the last segment
            __threadfence();
            if (before & kCheckerArrived) // and the last party: zero for the next launch
                atomicExch(count, 0u);
        }
        sBefore = before;
        sPair = pair;
    }
    __syncthreads();
    if ((sBefore & kSegmentsArrived) != (unsigned)a.splits - 1 || sRows.rows <= 0)
        return; // another segment merges; or s has no rows (< 0: s is bad, nothing is written)
    // The checking block has not arrived yet (still checking a batch of many sequences): the same
    // check here, rather than wait for it. Only the checking block records the error.
    if (!(sBefore & kCheckerArrived) && find_bad_sequence(a, sScan, &sBad) >= 0)
        return; // a bad batch: nothing written
    const bool verdict = sBefore & kCheckerArrived;
    const int rows = sRows.rows;
    const int64_t b = sRows.first, g0 = (int64_t)(sPair % a.Hkv) * a.G; // first row, first q head
    for (int r = tid / 32; r < rows; r += kDecThreads / 32)
        merge_row(a, b + r / a.G, g0 + r % a.G, sRows.filled, verdict);
}

// The arrival counters of merging decode launches on GPU `dev` (decode_kernel): at least n
// unsigneds, all zero between launches. One array per GPU serves every launch, since they run one
// after another on the GPU's stream (to_cuda_stream; a launch's blocks touch the counters only
// after to_pdl_wait, so after the launch before has finished), and each launch leaves every
// counter it used at zero. So the array only needs zeroing once, when it is made; it is never
// freed, nor shrunk: a graph recorded with it keeps using it. When a launch needs more, a larger
// one is made (the old one stays, for the graphs that use it).
//
// Made with cudaMalloc rather than to_cuda_alloc, and zeroed at once on a stream of its own, with
// the host waiting: growing may happen while a graph is recorded (the engine records a decode
// step without running it first), where a memset on the GPU's stream would only become a node of
// the graph, run when the graph is (every replay, and not before the first one), so the launches
// in between (eager ones, or other graphs' replays) would see whatever the memory held. Off the
// GPU's stream, a block from the caching allocator could still be in use by work queued there
// (blocks are handed back as soon as their kernels are queued); fresh memory is not. Recording is
// relaxed (device.cu), and this thread is put in relaxed mode for the calls, so neither the
// allocation nor the wait on the private stream breaks the recording.
constexpr int kMaxGpus = 64;

int decode_arrivals(int dev, int64_t n, unsigned **out) {
    static std::mutex lock;
    static unsigned *arrays[kMaxGpus];
    static int64_t sizes[kMaxGpus];
    static cudaStream_t zeroing[kMaxGpus];
    if (dev < 0 || dev >= kMaxGpus)
        return to_fail(TO_ERR_DEVICE, "to_paged_attention: no GPU with index %d", dev);
    std::lock_guard<std::mutex> guard(lock);
    if (sizes[dev] < n) {
        int64_t grown = 2 * sizes[dev] > n ? 2 * sizes[dev] : n;
        grown = grown > 4096 ? grown : 4096;
        const size_t bytes = (size_t)grown * sizeof(unsigned);
        cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
        cudaThreadExchangeStreamCaptureMode(&mode);
        void *p = nullptr;
        cudaError_t err = cudaMalloc(&p, bytes);
        if (err == cudaSuccess && !zeroing[dev])
            err = cudaStreamCreateWithFlags(&zeroing[dev], cudaStreamNonBlocking);
        if (err == cudaSuccess)
            err = cudaMemsetAsync(p, 0, bytes, zeroing[dev]);
        if (err == cudaSuccess)
            err = cudaStreamSynchronize(zeroing[dev]);
        cudaThreadExchangeStreamCaptureMode(&mode);
        if (err != cudaSuccess) { // (a block made before the failure is not freed: that could
                                  // break a recording, for a few bytes)
            cudaGetLastError();
            return to_fail(err == cudaErrorMemoryAllocation ? TO_ERR_OUT_OF_MEMORY : TO_ERR_CUDA,
                           "to_paged_attention: cannot make %lld arrival counters on cuda:%d: %s",
                           (long long)grown, dev, cudaGetErrorString(err));
        }
        arrays[dev] = static_cast<unsigned *>(p);
        sizes[dev] = grown;
    }
    *out = arrays[dev];
    return TO_OK;
}

using DecodeKernel = void (*)(AttnArgs);

template <int DMAX, typename T, bool FUSED>
DecodeKernel decode_kernel_rows(int G) {
    switch (G == 1 ? 1 : G == 2 ? 2 : G <= 4 ? 4 : 8) {
    case 1: return decode_kernel<DMAX, T, 1, FUSED>;
    case 2: return decode_kernel<DMAX, T, 2, FUSED>;
    case 4: return decode_kernel<DMAX, T, 4, FUSED>;
    default: return decode_kernel<DMAX, T, 8, FUSED>;
    }
}

// decode_kernel for head size D, cache dtype and GQA group size G, fused or not (a template
// parameter rather than a flag: the fused prologue's registers cost the plain kernel spills in its
// key loop); null for a dtype without one
template <int DMAX, typename T>
DecodeKernel decode_kernel_fused(int G, bool fused) {
    return fused ? decode_kernel_rows<DMAX, T, true>(G) : decode_kernel_rows<DMAX, T, false>(G);
}

template <int DMAX>
DecodeKernel decode_kernel_for(int cache_dtype, int G, bool fused) {
    switch (cache_dtype) {
    case TO_F32: return decode_kernel_fused<DMAX, float>(G, fused);
    case TO_F16: return decode_kernel_fused<DMAX, __half>(G, fused);
    case TO_BF16: return decode_kernel_fused<DMAX, __nv_bfloat16>(G, fused);
    }
    return nullptr;
}

// The largest cluster size (a power of two, at most kClusterMax) with which GPU dev holds
// `clusters` clusters of `kernel` at once; 1 where there is none, or clusters are not available
// (before sm_90, or a library without sm_90 code for the kernel). Asked once per kernel, GPU and
// count; the answer is kept.
int decode_cluster_limit(DecodeKernel kernel, int dev, int clusters) {
    static std::mutex lock;
    static struct { DecodeKernel kernel; int dev, clusters, limit; } known[64];
    static int n_known;
    std::lock_guard<std::mutex> guard(lock);
    for (int i = 0; i < n_known; i++)
        if (known[i].kernel == kernel && known[i].dev == dev && known[i].clusters == clusters)
            return known[i].limit;
    // not stream work, but asked maybe while a graph is recorded: in relaxed mode (as device.cu)
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    int limit = 1, major = 0;
    cudaFuncAttributes fa;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess && major >= 9
        && cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.binaryVersion >= 90) {
        cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        for (int c = kClusterMax; c > 1 && limit == 1; c /= 2)
            if (to_max_active_clusters(kernel, (unsigned)c, kDecThreads, 0) >= clusters)
                limit = c;
    }
    cudaGetLastError(); // a refused query is an answer, not an error for the next check
    cudaThreadExchangeStreamCaptureMode(&mode);
    if (n_known < 64)
        known[n_known++] = {kernel, dev, clusters, limit};
    return limit;
}

// ---- host side ----

// Attention's arguments for these (validated) tensors: no path chosen, no workspace yet.
int attn_args(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache, const to_tensor *v_cache,
              const to_tensor *cu_seqlens_q, const to_tensor *context_lens, const to_tensor *block_tables,
              double scale, AttnArgs *args) {
    AttnArgs a = {};
    a.q = (const char *)q->data;
    a.q_dtype = q->dtype;
    a.qs0 = q->strides[0], a.qs1 = q->strides[1], a.qs2 = q->strides[2];
    a.out = (char *)out->data;
    a.out_dtype = out->dtype;
    a.os0 = out->strides[0], a.os1 = out->strides[1], a.os2 = out->strides[2];
    a.k_cache = k_cache->data;
    a.v_cache = v_cache->data;
    a.cu = (const char *)cu_seqlens_q->data;
    a.ctx = (const char *)context_lens->data;
    a.bt = (const char *)block_tables->data;
    a.cu_dtype = cu_seqlens_q->dtype;
    a.ctx_dtype = context_lens->dtype;
    a.bt_dtype = block_tables->dtype;
    a.cu_stride = cu_seqlens_q->strides[0];
    a.ctx_stride = context_lens->strides[0];
    a.bt_s0 = block_tables->strides[0];
    a.bt_s1 = block_tables->strides[1];
    a.T = q->shape[0], a.num_blocks = k_cache->shape[0], a.max_blocks = block_tables->shape[1];
    if (!(a.err = to_cuda_error_word(out->device_index)))
        return TO_ERR_CUDA;
    a.qscale = (float)scale * kLog2e;
    const int64_t D = q->shape[2], esz = to_dtype_size(k_cache->dtype);
    a.vec = (D * esz) % 16 == 0 && (uintptr_t)k_cache->data % 16 == 0 && (uintptr_t)v_cache->data % 16 == 0;
    *args = a;
    return TO_OK;
}

// The decode path's launch: its kernel, key segments per (sequence, kv head), mode and blocks.
struct DecodePlan {
    DecodeKernel kernel;
    int64_t splits, blocks;
    bool cluster, merge;
};

// The decode path for attention of T query rows and S sequences (Hq heads of D, the caches' Hkv,
// dtype and block size, block tables max_blocks wide) on GPU dev; plan->kernel stays null where it
// does not apply (more query rows than sequences, cache rows that are not whole 16-byte pieces,
// sizes past its indexing): then the general path runs. a.fused picks the fused kernel.
//
// Segments per (sequence, kv head): as many as keep the blocks within one wave of what the GPU
// holds at once (decode_kernel's launch bounds: 3 blocks per multiprocessor, 2 for G > 4), so that
// a long context is streamed by every multiprocessor; never more than kMaxSplits, nor more than
// kSegMin-key pieces of the longest context the table can hold. (Short contexts use only the
// first segments: the device cuts the real length, in pieces of at least kSegMin.) With one
// sequence, a kv head's segments are one cluster (cluster mode), rather than partials merged
// through memory by the last to finish.
int plan_decode(const AttnArgs &a, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int cache_dtype, int64_t bs,
                int dev, DecodePlan *plan) {
    *plan = DecodePlan{};
    const int64_t T = a.T, G = Hq / Hkv;
    if (!(T <= S && a.vec && T * Hq <= INT32_MAX && S <= INT32_MAX && Hkv <= INT32_MAX))
        return TO_OK;
    const DecodeKernel kernel = D <= 64 ? decode_kernel_for<64>(cache_dtype, (int)G, a.fused)
                              : D <= 128 ? decode_kernel_for<128>(cache_dtype, (int)G, a.fused)
                                         : decode_kernel_for<256>(cache_dtype, (int)G, a.fused);
    if (!kernel)
        return to_fail(TO_ERR_DTYPE, "to_paged_attention: cache dtype %s has no CUDA kernel",
                       to_dtype_name(cache_dtype));
    const int sms = to_cuda_sm_count(dev);
    const int64_t resident = (G > 4 ? 2 : 3) * (int64_t)sms;
    int64_t splits = 1;
    if (2 * S * Hkv <= resident) {
        splits = resident / (S * Hkv);
        int64_t cap = to_ceil_div(a.max_blocks * bs, kSegMin);
        cap = cap < kMaxSplits ? cap : kMaxSplits;
        splits = splits < cap ? splits : cap;
        splits = splits > 1 ? splits : 1;
    }
    bool cluster = false;
    if (splits > 1 && S == 1) {
        const int limit = decode_cluster_limit(kernel, dev, (int)Hkv);
        if (limit > 1) {
            splits = splits < limit ? splits : limit;
            cluster = true;
        }
    }
    const bool merge = !cluster && (splits > 1 || S > kDirectMaxSeqs);
    const int64_t blocks = S * Hkv * splits + (merge ? 1 : 0);
    if (blocks <= INT32_MAX)
        *plan = DecodePlan{kernel, splits, blocks, cluster, merge};
    return TO_OK;
}

// decode_kernel as planned (a: attn_args, plus the fused fields if any)
int launch_decode(AttnArgs &a, const DecodePlan &plan, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs,
                  int dev, cudaStream_t stream) {
    a.S = (int)S, a.Hq = (int)Hq, a.Hkv = (int)Hkv, a.G = (int)(Hq / Hkv), a.D = (int)D, a.block_size = (int)bs;
    a.splits = (int)plan.splits;
    a.merge = plan.merge;
    a.cluster = plan.cluster;
    // merging only: the arrival counters (S * Hkv, per GPU, kept), and a workspace of acc
    // [T][Hq][splits][D], (m, l) [T][Hq][splits] and the verdict
    void *ws = nullptr;
    if (plan.merge) {
        TO_TRY(decode_arrivals(dev, S * Hkv, &a.arrivals));
        const size_t n = (size_t)a.T * Hq * plan.splits;
        const size_t ml_off = (n * D * sizeof(float) + 15) / 16 * 16, ok_off = ml_off + n * sizeof(float2);
        TO_TRY(to_cuda_alloc(dev, (int64_t)(ok_off + 16), &ws));
        a.part = (float *)ws;
        a.ml = (float2 *)((char *)ws + ml_off);
        a.batch_ok = (int *)((char *)ws + ok_off);
    }
    ToLaunchOptions opt;
    opt.cluster = plan.cluster ? (unsigned)plan.splits : 1u;
    int status = launched(to_launch_with(opt, plan.kernel, dim3((unsigned)plan.blocks), dim3(kDecThreads), 0, stream, a),
                          "to_paged_attention");
    // back to the cache: the next user of this block is ordered after the kernel on the stream
    // (and one freed while a graph is recorded stays the graph's)
    if (ws)
        to_cuda_free(dev, ws);
    TO_TRY(status);
    return to_cuda_check_launch("to_paged_attention");
}

}  // namespace

extern "C" {

int to_cuda_kv_cache_store(const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *k,
                           const to_tensor *v, const to_tensor *slot_mapping) {
    const int64_t T = k->shape[0], Hkv = k->shape[1], D = k->shape[2];
    cudaStream_t stream = to_cuda_stream(k_cache->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    if (T == 0 || Hkv == 0 || D == 0)
        return TO_OK;
    StoreArgs a;
    TO_TRY(kv_store_init(&a.kv, k_cache, v_cache, v, slot_mapping, TO_GPU_ERR_SLOT));
    a.k = (const char *)k->data;
    a.k_dtype = k->dtype;
    a.ks0 = k->strides[0], a.ks1 = k->strides[1], a.ks2 = k->strides[2];
    TO_TRY(launched(to_launch(kv_store_kernel, dim3((unsigned)T), dim3(kStoreThreads), 0, stream, a),
                    "to_kv_cache_store"));
    return to_cuda_check_launch("to_kv_cache_store");
}

int to_cuda_paged_attention(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache,
                            const to_tensor *v_cache, const to_tensor *cu_seqlens_q,
                            const to_tensor *context_lens, const to_tensor *block_tables, double scale) {
    const int64_t T = q->shape[0], Hq = q->shape[1], D = q->shape[2];
    const int64_t Hkv = k_cache->shape[2], bs = k_cache->shape[1], S = context_lens->shape[0];
    const int64_t max_blocks = block_tables->shape[1];
    const int dev = out->device_index;
    if (T == 0 || Hq == 0 || D == 0)
        return TO_OK; // also covers S == 0 (T = cu_seqlens_q[S] = 0)
    if (D > 256)
        return to_fail(TO_ERR_UNSUPPORTED, "to_paged_attention: head size D = %lld has no CUDA kernel "
                       "(at most 256)", (long long)D);
    const int64_t G = Hq / Hkv;
    cudaStream_t stream = to_cuda_stream(dev);
    if (!stream)
        return TO_ERR_CUDA;
    const int sms = to_cuda_sm_count(dev);
    const int64_t max_len = max_blocks * bs; // the longest context block_tables can describe

    AttnArgs a;
    TO_TRY(attn_args(out, q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, &a));
    DecodePlan plan;
    TO_TRY(plan_decode(a, S, Hq, Hkv, D, k_cache->dtype, bs, dev, &plan));
    if (plan.kernel)
        return launch_decode(a, plan, S, Hq, Hkv, D, bs, dev, stream);

    // ---- general path: plan, tiles, merge ----
    // Segments per split sequence: enough (sequence, kv head, segment) blocks for about four per
    // multiprocessor when the batch alone has fewer, never more segments than SEG_MIN-key pieces
    // of the longest possible context.
    int64_t nsplit_max = to_ceil_div(4 * (int64_t)sms, S * Hkv);
    int64_t cap = to_ceil_div(max_len, SEG_MIN);
    cap = cap < MAX_SPLITS ? cap : MAX_SPLITS;
    nsplit_max = nsplit_max < cap ? nsplit_max : cap;
    nsplit_max = nsplit_max > 1 ? nsplit_max : 1;

    // Upper bounds: tiles (a sequence of n queries has ceil(n G / RB) row tiles, times its
    // segments if split) and partial slots (the queries of split sequences).
    const int64_t split_seqs = S < T ? S : T;
    const int64_t tile_bound = to_ceil_div(T * G, RB) + S
                             + (nsplit_max > 1 ? split_seqs * to_ceil_div(DEC_MAX_Q * G, RB) * nsplit_max : 0);
    const int64_t n_slots = nsplit_max > 1 ? (T < S * DEC_MAX_Q ? T : S * DEC_MAX_Q) : 0;
    if (tile_bound > INT32_MAX || T > INT32_MAX || Hkv > 65535 || Hq > 65535)
        return to_fail(TO_ERR_UNSUPPORTED, "to_paged_attention: batch too large for the CUDA kernel "
                       "(%lld tiles, %lld kv heads, %lld q heads)", (long long)tile_bound, (long long)Hkv, (long long)Hq);

    // workspace: seq_info int4 [S], total (16 bytes), slots int2 [n_slots], partials
    const size_t info_bytes = (size_t)S * sizeof(int4), total_off = info_bytes;
    const size_t slots_off = total_off + 16, part_off = (slots_off + (size_t)n_slots * sizeof(int2) + 15) / 16 * 16;
    const size_t ws_bytes = part_off + (size_t)n_slots * Hq * nsplit_max * (D + 2) * sizeof(float);
    void *ws = nullptr;
    TO_TRY(to_cuda_alloc(dev, (int64_t)ws_bytes, &ws));

    a.S = (int)S, a.Hq = (int)Hq, a.Hkv = (int)Hkv, a.G = (int)G, a.D = (int)D, a.block_size = (int)bs;
    a.nsplit_max = (int)nsplit_max;
    a.seq_info = (int4 *)ws;
    a.total = (int *)((char *)ws + total_off);
    a.slots = (int2 *)((char *)ws + slots_off);
    a.n_slots = (int)n_slots;
    a.part = (float *)((char *)ws + part_off);

    int status = launched(to_launch(plan_kernel, dim3(1), dim3(kPlanThreads), 0, stream, a), "to_paged_attention");
    dim3 grid((unsigned)tile_bound, (unsigned)Hkv);
    if (status == TO_OK)
        status = D <= 64 ? launch_attn_dtype<64>(a, k_cache->dtype, grid, stream)
               : D <= 128 ? launch_attn_dtype<128>(a, k_cache->dtype, grid, stream)
                          : launch_attn_dtype<256>(a, k_cache->dtype, grid, stream);
    if (status == TO_OK && n_slots > 0)
        status = launched(to_launch(merge_kernel, dim3((unsigned)n_slots, (unsigned)Hq), dim3(32), 0, stream, a),
                          "to_paged_attention");
    // back to the cache: the next user of this block is ordered after these kernels on the stream
    to_cuda_free(dev, ws);
    TO_TRY(status);
    return to_cuda_check_launch("to_paged_attention");
}

// One launch when decode_kernel's cluster mode runs a step of one sequence with one query row and
// a GQA group it does in one pass (T = S = 1, G <= 8: "fused" above); otherwise the two ops'
// launches, to_rope_kv_store's into a workspace, then attention from its q heads (and then the
// slots are not compared with the table: that comparison is the fused kernel's own need).
// INFERENCE_PIO_FUSED_ATTENTION=0 always takes the two launches (to measure the difference).
int to_cuda_rope_kv_attention(const to_tensor *out, const to_tensor *qk, const to_tensor *norm_weight, double eps,
                              const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                              int interleaved, double attention_scaling, const to_tensor *v,
                              const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *slot_mapping,
                              const to_tensor *cu_seqlens_q, const to_tensor *context_lens,
                              const to_tensor *block_tables, double scale) {
    const int64_t T = qk->shape[0], H = qk->shape[1], D = qk->shape[2], Hkv = k_cache->shape[2], Hq = H - Hkv;
    const int64_t S = context_lens->shape[0], bs = k_cache->shape[1];
    const int dev = out->device_index;
    if (T == 0 || Hq == 0 || D == 0)
        return TO_OK; // (T = 0: nothing to store either)
    cudaStream_t stream = to_cuda_stream(dev);
    if (!stream)
        return TO_ERR_CUDA;
    static const bool fuse = to_env_switch("INFERENCE_PIO_FUSED_ATTENTION");
    if (fuse && T == 1 && S == 1 && D <= 256 && Hq / Hkv <= 8) {
        AttnArgs a;
        TO_TRY(attn_args(out, qk, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale, &a));
        a.fused = 1;
        DecodePlan plan;
        TO_TRY(plan_decode(a, S, Hq, Hkv, D, k_cache->dtype, bs, dev, &plan));
        if (plan.kernel && plan.cluster) {
            a.rope = rope_args(qk, qk, positions, inv_freq, rotary_dim, interleaved, attention_scaling);
            if (norm_weight) {
                a.rope.weight = to_view(norm_weight);
                a.rope.eps = eps;
            }
            TO_TRY(kv_store_init(&a.rope.kv, k_cache, v_cache, v, slot_mapping, TO_GPU_ERR_ROPE_KV_ATTN_SLOT));
            return launch_decode(a, plan, S, Hq, Hkv, D, bs, dev, stream);
        }
    }
    // the rotated heads [T, H, D] in a workspace of qk's dtype, back to the cache once the
    // launches are queued (every later user of the block is ordered after them on the stream)
    to_tensor rot = *qk;
    rot.nbytes = T * H * D * to_dtype_size(qk->dtype);
    rot.strides[0] = H * D, rot.strides[1] = D, rot.strides[2] = 1;
    TO_TRY(to_cuda_alloc(dev, rot.nbytes, &rot.data));
    to_tensor q = rot; // attention's q: the first Hq heads
    q.shape[1] = Hq;
    int status = to_cuda_rope_kv_store(&rot, qk, norm_weight, eps, positions, inv_freq, rotary_dim, interleaved,
                                       attention_scaling, v, k_cache, v_cache, slot_mapping);
    if (status == TO_OK)
        status = to_cuda_paged_attention(out, &q, k_cache, v_cache, cu_seqlens_q, context_lens, block_tables, scale);
    to_cuda_free(dev, rot.data);
    return status;
}

}  // extern "C"
