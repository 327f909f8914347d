// attention.cu - the paged KV cache on the GPU: storing new keys/values, and causal attention
// over the cache for a flat varlen batch (prefill, chunked prefill and decode in one call).
//
// Semantics are csrc/cpu/attention.c's (see its top comment and tensor_ops.h): sequence s owns
// query rows cu_seqlens_q[s] .. cu_seqlens_q[s+1]; its i-th of n queries sits at position
// context_lens[s] - n + i and sees cache positions 0 .. that position; query head h reads kv
// head h / G (G = Hq / Hkv); softmax and accumulation in f32.
//
// The host never reads the batch's values (they live on the GPU; reading them would
// synchronise), so the launch sizes are upper bounds from the shapes, and a tiny planning
// kernel turns the values into a work list on the device:
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
// (to_cuda_stream), so whoever gets the block next uses it only after these kernels are done.
#include "cuda/common.cuh"

#include <math.h>

namespace {

// ------------------------------------------------------------------------------- kv_cache_store

constexpr int kStoreThreads = 128;

struct StoreArgs {
    char *k_cache, *v_cache;
    int cache_dtype;
    const char *k, *v;
    int k_dtype, v_dtype;
    int64_t ks0, ks1, ks2, vs0, vs1, vs2;
    const char *slots;
    int slot_dtype;
    int64_t slot_stride;
    int Hkv, D;
    int64_t num_slots;       // num_blocks * block_size
    unsigned long long *err; // the GPU's error word (common.cuh)
};

// One block per token: its Hkv * D key and value elements go to row `slot` of the caches
// (contiguous, so the row starts at slot * Hkv * D), converted (round to nearest even) by
// to_store. Consecutive threads take consecutive d: coalesced cache writes, and coalesced reads
// whenever k/v rows are contiguous.
__global__ void __launch_bounds__(kStoreThreads) kv_store_kernel(StoreArgs a) {
    const int64_t t = blockIdx.x;
    const int64_t slot = to_load_index_dev(a.slots, a.slot_dtype, t * a.slot_stride);
    if (slot < 0)
        return; // padding token
    if (slot >= a.num_slots) { // skipped and reported, never written out of bounds
        if (threadIdx.x == 0)
            to_gpu_error(a.err, TO_GPU_ERR_SLOT, t, slot, a.num_slots);
        return;
    }
    const int64_t n = (int64_t)a.Hkv * a.D, row = slot * n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        int64_t h = i / a.D, d = i % a.D;
        float kx = to_load(a.k, a.k_dtype, t * a.ks0 + h * a.ks1 + d * a.ks2);
        float vx = to_load(a.v, a.v_dtype, t * a.vs0 + h * a.vs1 + d * a.vs2);
        to_store(a.k_cache, a.cache_dtype, row + i, kx);
        to_store(a.v_cache, a.cache_dtype, row + i, vx);
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
};

// ---- planning ----

struct SeqPlan {
    int tiles, nsplit, seglen, nslots;
};

// What is wrong with sequence s's part of the batch (a TO_GPU_BATCH_* code, 0 if nothing), and
// the offending value: the checks the CPU op makes on the host (csrc/ops/attention.c,
// check_batch), made here so that no tile ever reads out of bounds.
__device__ int check_sequence(const AttnArgs &a, int s, int64_t *value) {
    int64_t b = to_load_index_dev(a.cu, a.cu_dtype, (int64_t)s * a.cu_stride);
    int64_t e = to_load_index_dev(a.cu, a.cu_dtype, (int64_t)(s + 1) * a.cu_stride);
    int64_t len = to_load_index_dev(a.ctx, a.ctx_dtype, (int64_t)s * a.ctx_stride);
    *value = e;
    if ((s == 0 && b != 0) || b < 0 || e < b || e > a.T || (s == a.S - 1 && e != a.T))
        return TO_GPU_BATCH_CU;
    *value = len;
    if (len < e - b)
        return TO_GPU_BATCH_CONTEXT;
    int64_t blocks = len / a.block_size + (len % a.block_size != 0);
    if (blocks > a.max_blocks || len > INT32_MAX)
        return TO_GPU_BATCH_TABLE;
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
    attn_kernel<DMAX, T><<<grid, kThreads, smem, stream>>>(a);
    return TO_OK;
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
    a.k_cache = (char *)k_cache->data;
    a.v_cache = (char *)v_cache->data;
    a.cache_dtype = k_cache->dtype;
    a.k = (const char *)k->data;
    a.v = (const char *)v->data;
    a.k_dtype = k->dtype;
    a.v_dtype = v->dtype;
    a.ks0 = k->strides[0], a.ks1 = k->strides[1], a.ks2 = k->strides[2];
    a.vs0 = v->strides[0], a.vs1 = v->strides[1], a.vs2 = v->strides[2];
    a.slots = (const char *)slot_mapping->data;
    a.slot_dtype = slot_mapping->dtype;
    a.slot_stride = slot_mapping->strides[0];
    a.Hkv = (int)Hkv;
    a.D = (int)D;
    a.num_slots = k_cache->shape[0] * k_cache->shape[1];
    if (!(a.err = to_cuda_error_word(k_cache->device_index)))
        return TO_ERR_CUDA;
    kv_store_kernel<<<(unsigned)T, kStoreThreads, 0, stream>>>(a);
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

    // Segments per split sequence: enough (sequence, kv head, segment) blocks for about four per
    // multiprocessor when the batch alone has fewer, never more segments than SEG_MIN-key pieces
    // of the longest possible context.
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms < 1)
        sms = 132;
    const int64_t max_len = max_blocks * bs;
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

    AttnArgs a;
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
    a.S = (int)S, a.Hq = (int)Hq, a.Hkv = (int)Hkv, a.G = (int)G, a.D = (int)D, a.block_size = (int)bs;
    a.T = T, a.num_blocks = k_cache->shape[0], a.max_blocks = max_blocks;
    if (!(a.err = to_cuda_error_word(dev)))
        return TO_ERR_CUDA;
    a.qscale = (float)scale * kLog2e;
    a.nsplit_max = (int)nsplit_max;
    const int64_t esz = to_dtype_size(k_cache->dtype);
    a.vec = (D * esz) % 16 == 0 && (uintptr_t)k_cache->data % 16 == 0 && (uintptr_t)v_cache->data % 16 == 0;
    a.seq_info = (int4 *)ws;
    a.total = (int *)((char *)ws + total_off);
    a.slots = (int2 *)((char *)ws + slots_off);
    a.n_slots = (int)n_slots;
    a.part = (float *)((char *)ws + part_off);

    plan_kernel<<<1, kPlanThreads, 0, stream>>>(a);
    dim3 grid((unsigned)tile_bound, (unsigned)Hkv);
    int status = D <= 64 ? launch_attn_dtype<64>(a, k_cache->dtype, grid, stream)
               : D <= 128 ? launch_attn_dtype<128>(a, k_cache->dtype, grid, stream)
                          : launch_attn_dtype<256>(a, k_cache->dtype, grid, stream);
    if (status == TO_OK && n_slots > 0)
        merge_kernel<<<dim3((unsigned)n_slots, (unsigned)Hq), 32, 0, stream>>>(a);
    // back to the cache: the next user of this block is ordered after these kernels on the stream
    to_cuda_free(dev, ws);
    TO_TRY(status);
    return to_cuda_check_launch("to_paged_attention");
}

}  // extern "C"
