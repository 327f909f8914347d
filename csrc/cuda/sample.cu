// sample.cu - to_sample and to_sample_pipeline on the GPU: one token per row of logits, computed
// where the logits are, so only the chosen ids ([B] int64, and the logprobs when asked) ever cross
// to the host.
//
// Semantics are to_cpu_sample's (csrc/cpu/sample.c), operation for operation:
//  - m = the row's max; w = (m - x) * (1 / temperature) in f32 (1 / temperature taken on the host,
//    the CPU's division); e = exp(-w) by the CPU's polynomial (exp_neg_avx2 / exp_neg_scalar:
//    Cephes' expf, same constants, same operation order, its FMAs as __fmaf_rn and every other
//    step an explicitly rounded __fmul_rn / __fadd_rn so nvcc contracts nothing), 0 for w > 87;
//    masses q = trunc(e * 2^45) as u64. e is bit-identical to the CPU's on every path.
//  - The order (decreasing logit, lower index first on ties), the kept prefix
//    L = min(L_k, L_p, L_m) with top_k's ties, typical_p's segment and the draw (first position of
//    the kept segment whose inclusive mass within it > u * its mass) are the CPU's, with the same
//    double comparisons; min_p's bound on w (-ln(min_p) rounded down to f32) is computed on the
//    host with the CPU's libm calls. typical_p's centre c comes from the same exact 128-bit
//    integer sums as on the CPU, and its threshold s* is the same order statistic, so the two
//    agree bit for bit.
//
// Processors (to_sample_pipeline): when some row has one, process_kernel first copies every row to
// an f32 scratch [B, V] (checking the raw rows as it reads them) and rewrites the rows that have
// processors there, in the CPU's order and float32 operations: the bias entries in list order (one
// thread: repeats add up in the CPU's order), the repetition penalty and presence / frequency
// penalties (distinct tokens and counts through a per-row scratch of V u32 counters of which only
// the history's entries are touched: zeroed, counted with integer atomics, then taken back with
// atomicExch, so each distinct token is rewritten once, by one thread), then the n-gram block
// (-inf stores). sample_kernel then reads the scratch. The histories and bias lists arrive on the
// host (csrc/ops/sample.c checked them) and are uploaded in one packed buffer through the GPU's
// staging copy, which does not wait.
//
// Positions in the order are found without sorting the row, by radix selection over 64-bit order
// keys, all in integers (counts and u64 masses are added with atomics, but integer sums do not
// depend on the order they happen in: results never depend on thread or block scheduling):
//  - key = (order_key(x) >> vshift) << ib | (2^ib - 1 - j): larger key = earlier in the order.
//    ib is the bit length of V - 1 and vshift drops the low bits of f16/bf16 values (always
//    equal, given the sign), so for a bf16 row of 151,936 logits a key has 16 + 18 bits; ties are
//    then split by the index bits right away.
//  - pass 1: the max key (the greedy token, and m) and the NaN / +inf / all -inf checks;
//  - pass 2 (the only pass computing e for every token): a histogram of the top 11 bits of the
//    keys holding each bin's token count and mass, kept for the whole row; also the count and
//    mass of the min_p prefix (w <= bound) and the total mass;
//  - each position query ("the first key where the running count, or mass, reaches a goal")
//    walks that histogram to the bin holding the answer, then refines the bin by 10 more bits
//    per pass (a histogram over the keys of that bin only) until it holds <= 1024 keys, which
//    are gathered, sorted and walked. Queries: top_k's rank (only when it matters; one more pass
//    counts its ties), top_p's mass, the draw. Random logits: usually two passes per query; a row
//    of 151,936 logits costs about 4 passes with no filters and up to 9 with top_k and top_p.
//  - typical_p: a pass for c (128-bit sums), 8 radix passes of 8 bits over the bit patterns of
//    |w - c| (non-negative doubles order as integers) for s*, a pass for the segment.
//
// A row's blocks. One SM walking a 151,936-logit row 4-9 times took ~575 us at batch 1 (H200), so
// a row is split over P blocks (grid (rows, P), blockIdx.y = the block's part; P = 1 when rows
// are many). Block p takes the elements j = p * T + t + k * P * T (T threads, t its thread) -
// coalesced, and every block of a row does the same number of loop trips up to one. Each pass's
// result - a histogram, counts, masses, a max - is a sum (or max) of integers, so the blocks add
// their shares up in any order and get the one-block result exactly: a block reduces in shared
// memory as before, adds its non-zero bins and values to the row's global copy with one atomic
// each, waits at the row's barrier, and reads the row's totals back into shared memory. Then
// every block makes the same decision (find_bin on the same histogram: redundant, identical), so
// all blocks of a row take the same branches and reach the same barriers in the same order; a
// row that stops early (bad logits, a greedy row after pass 1) stops in all its blocks at once.
// The gather (a bin's <= 1024 keys): each block collects its keys, reserves a range of the row's
// global key array with one atomic and copies them there; after the barrier every block loads
// all of them (in whatever order they landed) and sorts them, which makes the order canonical.
//  - The barrier: a u64 arrival counter per row and kernel that only grows. A block's thread 0
//    fences (its block's writes, ordered by __syncthreads, become visible: release), adds 1, and
//    spins until the count reaches (barriers passed + 1) * P, then fences again (acquire). The
//    row's totals are then read with ld.global.cg (L2). No reset between barriers is needed.
//  - The blocks of a row must be resident together or the barrier never opens: a launch with
//    P > 1 is cooperative (cudaLaunchAttributeCooperative), which the runtime refuses, rather
//    than hangs, when the grid cannot be resident at once; P is chosen so that it can
//    (rows * P <= blocks per SM (cudaOccupancyMaxActiveBlocksPerMultiprocessor) * SMs). It keeps
//    the programmatic-launch attribute (PDL): no CUDA document found says the two exclude each
//    other, and both wait safely - the blocks spin only after griddepcontrol.wait (the kernel
//    before has finished, so its blocks leave the SMs), and the next kernel starts only once
//    every block of this one has called griddepcontrol.launch_dependents (so all are resident).
//    Should a runtime refuse the pair, the launch is retried once without PDL and later
//    cooperative launches go without it (launch_rows).
//  - P: capacity / rows (fill the GPU about once), at most 64, and at most V / 2048 (one block's
//    pass over fewer logits costs less than a barrier, ~1-2 us, would save); P < 2 means 1 (no
//    barrier, no scratch, an ordinary launch). INFERENCE_PIO_SAMPLE_PARTS=k asks for k instead of V / 2048 (still
//    within 64 and the capacity): tests force the split on small rows with it.
//  - Scratch (one to_cuda_alloc per call, only when some kernel splits): a 128-byte head per row
//    (the barriers' counters and the first exchange's values), zeroed by a cudaMemsetAsync on
//    the stream before the first kernel (a CUDA graph replays it), then three exchange buffers
//    per row of a launch (values, 2048 bins, 1024 keys), used in turn: exchange g of a row uses
//    buffer g % 3 (exchange 0, pass 1's, uses the head), and while in it every block clears its
//    share of buffer (g + 1) % 3, which was last read in exchange g - 2, which every block left
//    before arriving at barrier g - 1. So no buffer needs zeroing beforehand, and the launches of
//    a call (kRowsPerLaunch rows each) reuse them: a launch touches memory only after
//    griddepcontrol.wait, when the one before has finished.
//  - process_kernel splits its copy of the rows the same way (one barrier: the row's NaN / +inf
//    / live flags), then part 0 alone runs the processors (they touch only the history's and the
//    bias list's tokens). logprob_kernel: each block's max and its sum of exponentials (in a fixed
//    order within the block) go to a slot per part; after each barrier the parts' slots are
//    combined in part order, so the result is deterministic for a given P.
//  - Errors: only part 0 of a row writes -1 and records the error, as the one block did before:
//    the error word keeps the first recorded (atomicCAS), whichever bad row gets there first.
//
// Parameters: validated on the host by csrc/ops/sample.c (they are host tensors) and reduced here,
// on the host, to per-row values that travel inside the kernel's arguments (kRowsPerLaunch rows
// per launch): no copy, no synchronisation (a split's scratch comes from the stream-ordered cache).
//
// Logprobs: top_ids / top_logprobs by to_cuda_topk on the raw logits, then logprob_kernel turns
// the values into logprobs and writes the chosen tokens' (the raw rows' log-sum-exp in double,
// reduced in a fixed order: deterministic, within ~1e-7 of the CPU's).
//
// Bad logits (NaN, +inf, a row of only -inf, before or after its processors): nothing waits for
// the GPU, so the kernel writes -1 to that row's out and records TO_GPU_ERR_LOGITS in the GPU's
// error word; the next call that synchronises with the GPU (copying out to the host, say) raises
// it, naming the row (the first recorded when several rows are bad).
#include "cuda/common.cuh"

#include <atomic>
#include <math.h>
#include <stddef.h>
#include <string.h>

namespace {

constexpr int kRowsPerLaunch = 80; // 40 bytes each in the kernel's arguments (limit 4 KB)
constexpr int kBits0 = 11;         // level 0 of the selection: 2048 bins, kept for the row
constexpr int kBins0 = 1 << kBits0;
constexpr int kDigitBits = 10;     // later levels: 1024 bins
constexpr int kGather = 1024;      // a bin this small is sorted outright
constexpr float kWMax = 87.0f;     // e = 0 beyond (as on the CPU)
constexpr int kMaxParts = 64;          // blocks per row, at most
constexpr int64_t kMinPerBlock = 2048; // logits per block, at least (unless INFERENCE_PIO_SAMPLE_PARTS)

// Per-row values, prepared on the host.
struct RowParams {
    float inv_t;   // 1 / temperature; 0 marks a greedy row
    float t;       // the temperature (processed rows are divided by it, as on the CPU)
    float top_p;   // >= 1: off
    float u;       // the draw, in [0, 1)
    float thr_w;   // keep w <= thr_w (min_p); +inf: off
    float typical; // >= 1: off
    int proc;      // the row went through its processors (its errors say so)
    int64_t lk;    // top_k prefix length before its ties, 1..V
};

// ===================================================================================== split rows

// A row's words that must start at zero, one per row of the call (cudaMemsetAsync before the
// first kernel). 128 bytes: rows spinning on their counters do not share a line.
struct alignas(128) RowHead {
    unsigned long long bar[3];   // arrivals at the barriers of process_kernel, sample_kernel, logprob_kernel
    unsigned long long proc[3];  // process_kernel's exchange (its flags)
    unsigned long long first[3]; // sample_kernel's exchange 0 (pass 1's flags and max key)
};

// One exchange of sample_kernel among a row's blocks: values and a histogram that every block
// adds its share to, and gathered keys. Three per row, used in turn (see open_exchange).
struct Exchange {
    unsigned long long vals[8];
    unsigned long long ngather, pad[7];
    uint32_t cnt[kBins0];
    unsigned long long mass[kBins0];
    unsigned long long keys[kGather]; // not cleared: only the ngather written are read
};
constexpr int kClearWords = (int)(offsetof(Exchange, keys) / 8); // the part cleared, in u64 words

// logprob_kernel's slots: each part's max, then its sum (written once each: nothing to clear)
struct LpSlots {
    float m[kMaxParts];
    double s[kMaxParts];
};

// This block's place in its row.
struct Part {
    int parts, part;         // the row's blocks (gridDim.y), this one (blockIdx.y)
    unsigned gen;            // barriers passed (the same in every block of the row)
    unsigned long long *bar; // the row's arrival counter for this kernel (NULL when parts == 1)
};

__device__ Part row_part(RowHead *heads, int64_t r, int kernel) {
    Part pt;
    pt.parts = (int)gridDim.y;
    pt.part = (int)blockIdx.y;
    pt.gen = 0;
    pt.bar = pt.parts > 1 ? &heads[r].bar[kernel] : nullptr;
    return pt;
}

// Waits until every block of the row has arrived here (as many times as this block). Called by
// every thread of the block; what the block wrote before is visible to the row's blocks after.
__device__ void row_barrier(Part &pt) {
    __syncthreads(); // the block's writes and atomics are done
    if (threadIdx.x == 0) {
        const unsigned long long target = (unsigned long long)(pt.gen + 1) * (unsigned)pt.parts;
        __threadfence(); // release: the block's writes before the arrival
        atomicAdd(pt.bar, 1ull);
        while (*(volatile unsigned long long *)pt.bar < target)
            __nanosleep(32);
        __threadfence(); // acquire: the other blocks' writes after it
    }
    __syncthreads();
    pt.gen++;
}

// ===================================================================================== arithmetic

__device__ __forceinline__ float load_f32(const float *p) { return *p; }
__device__ __forceinline__ float load_f32(const __half *p) { return __half2float(*p); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16 *p) { return __bfloat162float(*p); }

// exp(-w) for w >= 0 exactly as exp_neg_avx2 in csrc/cpu/sample.c computes it, lane for lane:
// fnmadd(a, b, c) = fma(-a, b, c), round_ps(nearest) = rintf, min_ps(w, 87) = fminf (87 for NaN).
__device__ __forceinline__ float exp_neg(float w) {
    float z = __fsub_rn(0.0f, fminf(w, kWMax));
    float nf = rintf(__fmul_rn(z, 1.44269504088896341f));
    float r = __fmaf_rn(-nf, 0.693359375f, z);
    r = __fmaf_rn(-nf, -2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = __fmaf_rn(p, r, 1.3981999507e-3f);
    p = __fmaf_rn(p, r, 8.3334519073e-3f);
    p = __fmaf_rn(p, r, 4.1665795894e-2f);
    p = __fmaf_rn(p, r, 1.6666665459e-1f);
    p = __fmaf_rn(p, r, 5.0000001201e-1f);
    p = __fmaf_rn(p, __fmul_rn(r, r), __fadd_rn(r, 1.0f));
    float pow2 = __int_as_float((__float2int_rn(nf) + 127) << 23); // nf in [-126, 0]: exact
    float e = __fmul_rn(p, pow2);
    return w > kWMax ? 0.0f : e;
}

// trunc(e * 2^45): e's fixed-point mass (mass_q on the CPU)
__device__ __forceinline__ uint64_t mass_q(float e) { return __double2ull_rz(__dmul_rn((double)e, 0x1p45)); }

// The value's rank as an unsigned integer (order_key in csrc/cpu/sample.c: -0.0 ties with +0.0).
__device__ __forceinline__ uint32_t order_key(float v) {
    uint32_t u = __float_as_uint(v);
    if (u == 0x80000000u)
        u = 0;
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

// A row as this block sees it: its elements, and its share of them (j = j0 + t + k * step).
template <typename T>
struct Row {
    const T *x;
    int64_t sx, n;
    int64_t j0, step; // part * blockDim.x, parts * blockDim.x
    int vshift, ib;
    uint64_t imask; // 2^ib - 1
    float m, inv_t;

    __device__ float at(int64_t j) const { return load_f32(x + j * sx); }
    __device__ uint64_t key(float v, int64_t j) const {
        return (uint64_t)(order_key(v) >> vshift) << ib | (imask - (uint64_t)j);
    }
    __device__ int64_t index(uint64_t key) const { return (int64_t)(imask - (key & imask)); }
    __device__ float w(float v) const { return __fmul_rn(__fsub_rn(m, v), inv_t); }
    __device__ uint64_t mass(float v) const { return mass_q(exp_neg(w(v))); }
};

// ===================================================================================== block tools

// "The running count, or mass, of the keys so far reaches the goal": monotone along the order.
// Masses are counted from `base` on (running masses below it do not reach).
struct Goal {
    enum { kCount, kMassAtLeast, kMassAbove } kind;
    uint64_t need;  // kCount: count >= need
    double target;  // mass - base compared as a double, as on the CPU
    uint64_t base;
    __device__ bool reached(uint64_t c, uint64_t s) const {
        if (kind == kCount)
            return c >= need;
        if (s < base)
            return false;
        double d = (double)(s - base);
        return kind == kMassAtLeast ? d >= target : d > target;
    }
};

struct Scan {
    unsigned long long wc[32], ws[32]; // per-warp totals
    int bin;                           // the result: the bin, and count and mass before it
    unsigned long long c, s;
};

struct Shared {
    uint32_t cnt0[kBins0]; // level 0, kept for the row
    unsigned long long mass0[kBins0];
    uint32_t cnt[kGather]; // a refining level, or the gathered keys' counts and masses
    unsigned long long mass[kGather];
    unsigned long long keys[kGather];
    Scan scan;
    unsigned long long vals[8]; // block_totals' results (then the row's)
    unsigned long long gather_at;
    int ngather;
};

__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
    for (int o = 16; o > 0; o >>= 1) {
        uint64_t other = __shfl_xor_sync(0xffffffffu, v, o);
        v = other > v ? other : v;
    }
    return v;
}

// The block's totals of K values per thread into vals[0 .. K) (shared): sums, or maxima where
// bit i of max_mask is set (flags are 0/1 values under a max: their OR). Ends with __syncthreads,
// so what the block wrote before (a histogram) is complete too. One reduction for all of a pass's
// values: three __syncthreads_or in a row (bar.red.or, one per flag) returned false for the third
// on the H200 although every thread's flag was true (sm_90a build; with a printf between them it
// did not), so flags go through here as well.
template <int K>
__device__ void block_totals(uint64_t (&v)[K], unsigned max_mask, unsigned long long *vals) {
    for (int i = 0; i < K; i++)
        v[i] = (max_mask >> i & 1u) ? warp_max_u64(v[i]) : warp_sum_u64(v[i]);
    __syncthreads(); // vals may still be read
    if (threadIdx.x < K)
        vals[threadIdx.x] = 0;
    __syncthreads();
    if (threadIdx.x % 32 == 0)
        for (int i = 0; i < K; i++) {
            if (!v[i])
                continue;
            if (max_mask >> i & 1u)
                atomicMax(&vals[i], (unsigned long long)v[i]);
            else
                atomicAdd(&vals[i], (unsigned long long)v[i]);
        }
    __syncthreads();
}

// The row's totals from the blocks' (P > 1): adds this block's k values (vals, as block_totals
// left them) into acc and its nb bins (cnt, mass in shared memory) into gcnt / gmass - one atomic
// per non-zero entry -, waits for the row's other blocks to have done the same, and reads the
// totals back into vals and the bins. Every block of the row ends with the same numbers.
__device__ void combine(Part &pt, unsigned long long *acc, unsigned long long *vals, int k, unsigned max_mask,
                        uint32_t *gcnt, unsigned long long *gmass, uint32_t *cnt, unsigned long long *mass,
                        int nb) {
    if (threadIdx.x < k && vals[threadIdx.x]) {
        if (max_mask >> threadIdx.x & 1u)
            atomicMax(&acc[threadIdx.x], vals[threadIdx.x]);
        else
            atomicAdd(&acc[threadIdx.x], vals[threadIdx.x]);
    }
    for (int i = threadIdx.x; i < nb; i += blockDim.x) {
        if (!cnt[i])
            continue;
        atomicAdd(&gcnt[i], cnt[i]);
        if (mass[i])
            atomicAdd(&gmass[i], mass[i]);
    }
    row_barrier(pt);
    if (threadIdx.x < k)
        vals[threadIdx.x] = __ldcg(&acc[threadIdx.x]);
    for (int i = threadIdx.x; i < nb; i += blockDim.x) {
        cnt[i] = __ldcg(&gcnt[i]);
        mass[i] = __ldcg(&gmass[i]);
    }
    __syncthreads();
}

// sample_kernel's exchanges: where each one's values and bins go.
struct Exchanges {
    unsigned long long *first; // exchange 0's values (the row's head, zeroed by the call)
    Exchange *ring;            // the row's three buffers
};

// The buffer of the row's exchange pt.gen; also clears this block's share of the next one's
// buffer, (gen + 1) % 3. That buffer was last read in exchange gen - 2, and every block left it
// before arriving at barrier gen - 1, which this block has passed; the clearing is done before
// this block arrives at barrier gen, after which the next exchange starts adding.
__device__ Exchange *open_exchange(const Part &pt, const Exchanges &ex) {
    unsigned long long *next = (unsigned long long *)(ex.ring + (pt.gen + 1) % 3);
    for (int i = pt.part * (int)blockDim.x + (int)threadIdx.x; i < kClearWords; i += pt.parts * (int)blockDim.x)
        next[i] = 0;
    return ex.ring + pt.gen % 3;
}

// The row's totals of the block's k values (sh.vals) and nb bins (cnt, mass; nb == 0 for none)
// into the same places; nothing to do for a row of one block. Exchange 0 (pass 1) carries
// values only: its buffer's bins have not been cleared.
__device__ void row_exchange(Part &pt, const Exchanges &ex, Shared &sh, int k, unsigned max_mask,
                             uint32_t *cnt = nullptr, unsigned long long *mass = nullptr, int nb = 0) {
    if (pt.parts == 1)
        return;
    Exchange *x = open_exchange(pt, ex);
    combine(pt, pt.gen == 0 ? ex.first : x->vals, sh.vals, k, max_mask, x->cnt, x->mass, cnt, mass, nb);
}

// The row's keys of a bin, each block having gathered its own into sh.keys[0 .. sh.ngather):
// returns how many, all of them in sh.keys of every block (in an order that depends on
// scheduling: the caller sorts them).
__device__ int row_gather(Part &pt, const Exchanges &ex, Shared &sh) {
    const int m = sh.ngather < kGather ? sh.ngather : kGather;
    if (pt.parts == 1)
        return m;
    Exchange *x = open_exchange(pt, ex);
    if (threadIdx.x == 0)
        sh.gather_at = atomicAdd(&x->ngather, (unsigned long long)m);
    __syncthreads();
    for (int i = threadIdx.x; i < m && sh.gather_at + i < (unsigned long long)kGather; i += blockDim.x)
        x->keys[sh.gather_at + i] = sh.keys[i];
    row_barrier(pt);
    const unsigned long long total = __ldcg(&x->ngather);
    const int all = total < (unsigned long long)kGather ? (int)total : kGather; // the bin's count: <= kGather
    for (int i = threadIdx.x; i < all; i += blockDim.x)
        sh.keys[i] = __ldcg(&x->keys[i]);
    __syncthreads();
    return all;
}

// Adds a token (count 1, mass q) to bin `bin` where `take`; the whole warp calls it together.
// When every taking lane hits one bin (ties, a vocabulary masked to -inf) the warp adds once.
__device__ __forceinline__ void add_to_bin(uint32_t *cnt, unsigned long long *mass, int bin, uint64_t q, bool take) {
    unsigned lanes = __ballot_sync(0xffffffffu, take);
    if (!lanes)
        return;
    int first = __shfl_sync(0xffffffffu, bin, __ffs(lanes) - 1);
    if (__all_sync(0xffffffffu, !take || bin == first)) {
        uint64_t s = warp_sum_u64(take ? q : 0);
        if (threadIdx.x % 32 == 0) {
            atomicAdd(&cnt[first], (uint32_t)__popc(lanes));
            if (s)
                atomicAdd(&mass[first], (unsigned long long)s);
        }
    } else if (take) {
        atomicAdd(&cnt[bin], 1u);
        if (q)
            atomicAdd(&mass[bin], (unsigned long long)q);
    }
}

// Walks bins nb-1 down to 0 (the order) from running totals (c0, s0) and finds the bin at which
// the goal is first reached: sh.bin (-1 if never), with the totals before it in sh.c, sh.s.
// Thread t takes the bins at walking positions [t * per, (t + 1) * per); an exclusive scan over
// the threads gives each its starting totals. Exactly one bin turns the goal true.
__device__ void find_bin(const uint32_t *cnt, const unsigned long long *mass, int nb, const Goal &goal,
                         uint64_t c0, uint64_t s0, Scan &sh) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int per = (nb + (int)blockDim.x - 1) / (int)blockDim.x, lo = threadIdx.x * per;
    const int hi = lo + per < nb ? lo + per : nb;
    uint64_t c = 0, s = 0;
    for (int p = lo; p < hi; p++) {
        c += cnt[nb - 1 - p];
        s += mass[nb - 1 - p];
    }
    uint64_t ic = c, is = s; // inclusive scan within the warp
    for (int o = 1; o < 32; o <<= 1) {
        uint64_t uc = __shfl_up_sync(0xffffffffu, ic, o), us = __shfl_up_sync(0xffffffffu, is, o);
        if (lane >= o) {
            ic += uc;
            is += us;
        }
    }
    __syncthreads(); // sh may still be read by the previous query
    if (lane == 31) {
        sh.wc[warp] = ic;
        sh.ws[warp] = is;
    }
    if (threadIdx.x == 0)
        sh.bin = -1;
    __syncthreads();
    uint64_t C = c0 + ic - c, S = s0 + is - s;
    for (int i = 0; i < warp; i++) {
        C += sh.wc[i];
        S += sh.ws[i];
    }
    bool before = goal.reached(C, S);
    for (int p = lo; p < hi && !before; p++) {
        int b = nb - 1 - p;
        uint64_t C2 = C + cnt[b], S2 = S + mass[b];
        if (goal.reached(C2, S2)) {
            sh.bin = b;
            sh.c = C;
            sh.s = S;
            break;
        }
        C = C2;
        S = S2;
    }
    __syncthreads();
}

// a[0 .. p) ascending (p a power of two, at most kGather)
__device__ void sort_ascending(unsigned long long *a, int p) {
    for (int size = 2; size <= p; size <<= 1) {
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < p / 2; i += blockDim.x) {
                int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
                bool up = (lo & size) == 0;
                unsigned long long x = a[lo], y = a[hi];
                if ((x > y) == up) {
                    a[lo] = y;
                    a[hi] = x;
                }
            }
            __syncthreads();
        }
    }
}

// The row's sums of (count, mass) over the tokens where pred(v, j, key) holds; every thread gets them.
template <typename T, typename Pred>
__device__ void count_mass(const Row<T> &row, Part &pt, const Exchanges &ex, Shared &sh, Pred pred,
                           uint64_t &count, uint64_t &mass) {
    uint64_t v[2] = {0, 0};
    for (int64_t j = row.j0 + threadIdx.x; j < row.n; j += row.step) {
        float x = row.at(j);
        if (pred(x, j, row.key(x, j))) {
            v[0]++;
            v[1] += row.mass(x);
        }
    }
    block_totals(v, 0u, sh.vals);
    row_exchange(pt, ex, sh, 2, 0u);
    count = sh.vals[0];
    mass = sh.vals[1];
}

// A position in the order: its key, the count and mass of the keys before it, and its own mass.
struct Pick {
    uint64_t key, c, s, q;
};

// The first key of the order at which the running count or mass reaches `goal`.
template <typename T>
__device__ Pick select(const Row<T> &row, Part &pt, const Exchanges &ex, Shared &sh, const Goal &goal,
                       uint64_t best) {
    const int kb = 32 - row.vshift + row.ib; // key bits
    find_bin(sh.cnt0, sh.mass0, kBins0, goal, 0, 0, sh.scan);
    if (sh.scan.bin < 0) // not reached for the goals asked (their targets are below the mass)
        return Pick{best, 0, 0, 0};
    uint64_t prefix = (uint64_t)sh.scan.bin, c = sh.scan.c, s = sh.scan.s;
    uint32_t in_bin = sh.cnt0[sh.scan.bin];
    int hi = kb - kBits0; // the key bits below `prefix`
    while (in_bin > kGather) {
        const int width = hi < kDigitBits ? hi : kDigitBits, shift = hi - width, nb = 1 << width;
        __syncthreads();
        for (int i = threadIdx.x; i < nb; i += blockDim.x) {
            sh.cnt[i] = 0;
            sh.mass[i] = 0;
        }
        __syncthreads();
        for (int64_t base = row.j0; base < row.n; base += row.step) {
            int64_t j = base + threadIdx.x;
            bool take = false;
            int bin = 0;
            uint64_t q = 0;
            if (j < row.n) {
                float v = row.at(j);
                uint64_t key = row.key(v, j);
                take = (key >> hi) == prefix;
                if (take) {
                    bin = (int)((key >> shift) & (uint64_t)(nb - 1));
                    q = row.mass(v);
                }
            }
            add_to_bin(sh.cnt, sh.mass, bin, q, take);
        }
        __syncthreads();
        row_exchange(pt, ex, sh, 0, 0u, sh.cnt, sh.mass, nb);
        find_bin(sh.cnt, sh.mass, nb, goal, c, s, sh.scan);
        if (sh.scan.bin < 0)
            return Pick{best, 0, 0, 0};
        prefix = prefix << width | (uint64_t)sh.scan.bin;
        c = sh.scan.c;
        s = sh.scan.s;
        in_bin = sh.cnt[sh.scan.bin];
        hi = shift;
    }
    // the bin's keys, sorted, walked one by one (as bins of one key each)
    __syncthreads();
    if (threadIdx.x == 0)
        sh.ngather = 0;
    __syncthreads();
    for (int64_t j = row.j0 + threadIdx.x; j < row.n; j += row.step) {
        uint64_t key = row.key(row.at(j), j);
        if ((key >> hi) == prefix) {
            int slot = atomicAdd(&sh.ngather, 1);
            if (slot < kGather)
                sh.keys[slot] = key;
        }
    }
    __syncthreads();
    const int m = row_gather(pt, ex, sh);
    int p = 1;
    while (p < m)
        p <<= 1;
    for (int i = m + threadIdx.x; i < p; i += blockDim.x)
        sh.keys[i] = 0; // below every real key: sorts first, walked last, count 0
    __syncthreads();
    sort_ascending(sh.keys, p);
    for (int i = threadIdx.x; i < p; i += blockDim.x) {
        uint64_t key = sh.keys[i];
        sh.cnt[i] = key != 0;
        sh.mass[i] = key ? row.mass(row.at(row.index(key))) : 0;
    }
    __syncthreads();
    find_bin(sh.cnt, sh.mass, p, goal, c, s, sh.scan);
    if (sh.scan.bin < 0)
        return Pick{best, 0, 0, 0};
    return Pick{sh.keys[sh.scan.bin], sh.scan.c, sh.scan.s, sh.mass[sh.scan.bin]};
}

// ===================================================================================== typical_p

// (hi, lo) += (bhi, blo) as one 128-bit integer
__device__ __forceinline__ void add128(uint64_t &hi, uint64_t &lo, uint64_t bhi, uint64_t blo) {
    lo += blo;
    hi += bhi + (lo < blo);
}

// c = the mean of w under the kept masses, as typical_center in csrc/cpu/sample.c: sum of
// q * round(w * 2^24) in 128 bits over the kept tokens, / z (their mass), in the CPU's doubles.
// The 128-bit sum crosses threads and blocks as three u64 sums: of each thread's low 32 bits,
// of its next 32 bits, and of its high word (each stays far below 2^64: at most 2^16 threads
// add < 2^32 each, and the high words add to < 2^30), put back together exactly at the end.
template <typename T, typename Kept>
__device__ double typical_center(const Row<T> &row, Part &pt, const Exchanges &ex, Shared &sh, Kept kept,
                                 uint64_t z) {
    uint64_t hi = 0, lo = 0;
    for (int64_t j = row.j0 + threadIdx.x; j < row.n; j += row.step) {
        float v = row.at(j);
        if (!kept(v, row.key(v, j)))
            continue;
        float w = row.w(v);
        uint64_t q = mass_q(exp_neg(w));
        if (!q)
            continue;
        uint64_t W = __double2ull_rn(__dmul_rn((double)w, 0x1p24));
        add128(hi, lo, __umul64hi(q, W), q * W);
    }
    uint64_t limbs[3] = {lo & 0xffffffffull, lo >> 32, hi};
    block_totals(limbs, 0u, sh.vals);
    row_exchange(pt, ex, sh, 3, 0u);
    const uint64_t l1 = sh.vals[1];
    lo = sh.vals[0];
    hi = sh.vals[2] + (l1 >> 32);
    add128(hi, lo, 0, l1 << 32);
    double num = __dadd_rn(__dmul_rn(__ull2double_rn(hi), 0x1p64), __ull2double_rn(lo));
    return __ddiv_rn(__dmul_rn(num, 0x1p-24), __ull2double_rn(z));
}

// |w - c| as the bits of a non-negative double (which order as unsigned integers)
template <typename T>
__device__ __forceinline__ uint64_t shifted_bits(const Row<T> &row, float v, double c) {
    return (uint64_t)__double_as_longlong(fabs(__dsub_rn((double)row.w(v), c)));
}

// s*: the smallest |w - c| of a kept token such that the kept tokens at or below it hold mass
// >= target (all ones, above every value, when none does), by 8 radix passes of 8 bits over
// the bit patterns, ascending (digit d in bin 255 - d, as find_bin walks bins downwards).
template <typename T, typename Kept>
__device__ uint64_t typical_threshold(const Row<T> &row, Part &pt, const Exchanges &ex, Shared &sh, Kept kept,
                                      double c, double target) {
    uint64_t prefix = 0, below = 0; // digits chosen so far; mass of the kept tokens below them
    Goal goal = {Goal::kMassAtLeast, 0, target, 0};
    for (int level = 0; level < 8; level++) {
        const int shift = 56 - 8 * level;
        __syncthreads();
        for (int i = threadIdx.x; i < 256; i += blockDim.x) {
            sh.cnt[i] = 0;
            sh.mass[i] = 0;
        }
        __syncthreads();
        for (int64_t base = row.j0; base < row.n; base += row.step) {
            int64_t j = base + threadIdx.x;
            bool take = false;
            int bin = 0;
            uint64_t q = 0;
            if (j < row.n) {
                float v = row.at(j);
                if (kept(v, row.key(v, j))) {
                    uint64_t bits = shifted_bits(row, v, c);
                    take = level == 0 || (bits >> (shift + 8)) == prefix;
                    bin = 255 - (int)((bits >> shift) & 255);
                    q = row.mass(v);
                }
            }
            add_to_bin(sh.cnt, sh.mass, bin, q, take);
        }
        __syncthreads();
        row_exchange(pt, ex, sh, 0, 0u, sh.cnt, sh.mass, 256);
        find_bin(sh.cnt, sh.mass, 256, goal, 0, below, sh.scan);
        if (sh.scan.bin < 0)
            return ~0ull;
        prefix = prefix << 8 | (uint64_t)(255 - sh.scan.bin);
        below = sh.scan.s;
    }
    return prefix;
}

// ===================================================================================== the kernels

// Copies every row into the f32 scratch and runs the processors of the rows that have some.
struct ProcRow {
    int64_t hist0, nhist, nprompt, bias0, nbias;
    float rep, presence, frequency;
    int32_t ngram, active;
};

struct ProcArgs {
    const void *logits;
    int64_t row_stride, col_stride, n;
    float *proc;   // [rows, n], contiguous
    uint32_t *cnt; // [rows, n] counters, or NULL when no row has a penalty
    const ProcRow *rows;
    const int32_t *hist, *bias_ids;
    const float *bias_values;
    int64_t *out;
    int64_t out_stride;
    unsigned long long *err;
    RowHead *heads; // [rows] when the rows are split (gridDim.y > 1)
    int pipeline;
};

template <typename T>
__global__ void __launch_bounds__(1024) process_kernel(const ProcArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    const int64_t r = blockIdx.x, n = a.n;
    Part pt = row_part(a.heads, r, 0);
    const T *x = (const T *)a.logits + r * a.row_stride;
    float *y = a.proc + r * n;
    __shared__ unsigned long long vals[3];
    uint64_t seen[3] = {0, 0, 0}; // NaN, +inf, a value above -inf (0 or 1 each, combined by max)
    for (int64_t j = (int64_t)pt.part * blockDim.x + threadIdx.x; j < n; j += (int64_t)pt.parts * blockDim.x) {
        float v = load_f32(x + j * a.col_stride);
        seen[0] |= v != v;
        seen[1] |= v == INFINITY;
        seen[2] |= v > -INFINITY;
        y[j] = v;
    }
    block_totals(seen, 7u, vals);
    if (pt.parts > 1) // the row's flags; after it, the whole row is copied (the processors read it)
        combine(pt, a.heads[r].proc, vals, 3, 7u, nullptr, nullptr, nullptr, nullptr, 0);
    const bool nan = vals[0], pinf = vals[1], live = vals[2];
    if (nan || pinf || !live) { // the raw row's error comes first (sample_kernel finds it again)
        if (pt.part == 0 && threadIdx.x == 0) {
            a.out[r * a.out_stride] = -1;
            to_gpu_error(a.err, TO_GPU_ERR_LOGITS, r, nan ? TO_SAMPLE_BAD_NAN : pinf ? TO_SAMPLE_BAD_POSINF
                         : TO_SAMPLE_BAD_ALL_NEGINF, a.pipeline);
        }
        return;
    }
    const ProcRow pr = a.rows[r];
    if (!pr.active || pt.part != 0) // the processors touch a few tokens: part 0 runs them alone
        return;
    if (threadIdx.x == 0) // in list order: repeats add up as on the CPU
        for (int64_t j = pr.bias0; j < pr.bias0 + pr.nbias; j++)
            y[a.bias_ids[j]] = __fadd_rn(y[a.bias_ids[j]], a.bias_values[j]);
    __syncthreads();
    const int64_t h0 = pr.hist0, h1 = pr.hist0 + pr.nhist, g0 = pr.hist0 + pr.nprompt;
    const bool rep = pr.rep != 1.0f, pf = pr.presence != 0.0f || pr.frequency != 0.0f;
    if ((rep && h1 > h0) || (pf && h1 > g0)) {
        uint32_t *c = a.cnt + r * n;
        const int64_t from = rep ? h0 : g0;
        for (int64_t t = from + threadIdx.x; t < h1; t += blockDim.x)
            c[a.hist[t]] = 0;
        __syncthreads();
        for (int64_t t = from + threadIdx.x; t < h1; t += blockDim.x) {
            if (rep)
                atomicOr(&c[a.hist[t]], 0x80000000u); // in the history
            if (pf && t >= g0)
                atomicAdd(&c[a.hist[t]], 1u); // generated, counted
        }
        __syncthreads();
        for (int64_t t = from + threadIdx.x; t < h1; t += blockDim.x) {
            const int32_t id = a.hist[t];
            const uint32_t got = atomicExch(&c[id], 0u); // one thread per distinct token
            if (!got)
                continue;
            float v = y[id];
            if (got & 0x80000000u)
                v = v < 0.0f ? __fmul_rn(v, pr.rep) : __fdiv_rn(v, pr.rep);
            const uint32_t count = got & 0x7fffffffu;
            if (count)
                v = __fsub_rn(v, __fadd_rn(__fmul_rn(pr.frequency, (float)count), pr.presence));
            y[id] = v;
        }
        __syncthreads();
    }
    const int64_t ng = pr.ngram;
    if (ng > 0 && pr.nhist >= ng) { // windows whose first ng - 1 tokens are the last ng - 1
        const int64_t suffix = h1 - (ng - 1);
        for (int64_t i = h0 + threadIdx.x; i + ng <= h1; i += blockDim.x) {
            int64_t t = 0;
            while (t < ng - 1 && a.hist[i + t] == a.hist[suffix + t])
                t++;
            if (t == ng - 1)
                y[a.hist[i + ng - 1]] = -INFINITY;
        }
    }
}

struct SampleArgs {
    const void *logits;
    int64_t row_stride, col_stride, n; // logits [rows, n], strides in elements
    int64_t *out;
    int64_t out_stride;
    float *processed; // [rows, n] or NULL
    int64_t proc_row_stride, proc_col_stride;
    int64_t row0; // the row of blockIdx.x == 0 (launches cover kRowsPerLaunch rows each)
    unsigned long long *err;
    RowHead *heads; // [all rows] and 3 Exchange per row of the launch, when split (gridDim.y > 1)
    Exchange *ring;
    int vshift, ib, pipeline;
    RowParams rows[kRowsPerLaunch];
};
static_assert(sizeof(SampleArgs) <= 4096, "kernel arguments are limited to 4 KB");

// What a row reports in the error word's b (TO_SAMPLE_BAD_* of csrc/cpu/sample.h); c = 1 for
// to_sample_pipeline, 0 for to_sample.

template <typename T>
__global__ void __launch_bounds__(1024) sample_kernel(const SampleArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ Shared sh;
    const int64_t r = a.row0 + blockIdx.x;
    const RowParams rp = a.rows[blockIdx.x];
    Part pt = row_part(a.heads, r, 1);
    Exchanges ex = {nullptr, nullptr};
    if (pt.parts > 1) {
        ex.first = a.heads[r].first;
        ex.ring = a.ring + 3 * blockIdx.x;
    }
    Row<T> row;
    row.x = (const T *)a.logits + r * a.row_stride;
    row.sx = a.col_stride;
    row.n = a.n;
    row.j0 = (int64_t)pt.part * blockDim.x;
    row.step = (int64_t)pt.parts * blockDim.x;
    row.vshift = a.vshift;
    row.ib = a.ib;
    row.imask = (1ull << a.ib) - 1;
    row.m = 0.0f;
    row.inv_t = rp.inv_t;
    int64_t *out = a.out + r * a.out_stride;
    const bool lead = pt.part == 0 && threadIdx.x == 0; // writes the row's token, or its error

    // pass 1: the max key (first index of the max), and the checks (exchange 0)
    uint64_t p1[3] = {0, 0, 0}; // NaN seen, +inf seen, the max key
    for (int64_t j = row.j0 + threadIdx.x; j < row.n; j += row.step) {
        float v = row.at(j);
        p1[0] |= v != v;
        p1[1] |= v == INFINITY;
        uint64_t key = row.key(v, j);
        p1[2] = key > p1[2] ? key : p1[2];
    }
    block_totals(p1, 7u, sh.vals);
    row_exchange(pt, ex, sh, 3, 7u);
    const bool nan = sh.vals[0], pinf = sh.vals[1];
    const uint64_t best = sh.vals[2];
    const int64_t top = row.index(best);
    row.m = row.at(top);
    if (nan || pinf || row.m == -INFINITY) { // the same in every block of the row: all stop here
        if (lead) {
            *out = -1;
            int bad = nan ? TO_SAMPLE_BAD_NAN : pinf ? TO_SAMPLE_BAD_POSINF : TO_SAMPLE_BAD_ALL_NEGINF;
            to_gpu_error(a.err, TO_GPU_ERR_LOGITS, r, bad + (rp.proc ? 3 : 0), a.pipeline);
        }
        return;
    }
    int64_t token = top;
    uint64_t lo = 0, hi = ~0ull; // sampled rows keep the keys in [lo, hi] with w <= thr_w
    if (rp.inv_t > 0.0f) {
        // pass 2: the level-0 histogram of counts and masses, the min_p prefix, the total mass
        const int shift0 = 32 - row.vshift + row.ib - kBits0;
        for (int i = threadIdx.x; i < kBins0; i += blockDim.x) {
            sh.cnt0[i] = 0;
            sh.mass0[i] = 0;
        }
        __syncthreads();
        uint64_t p2[3] = {0, 0, 0}; // the min_p prefix's count and mass, the total mass
        for (int64_t base = row.j0; base < row.n; base += row.step) {
            int64_t j = base + threadIdx.x;
            bool take = j < row.n;
            int bin = 0;
            uint64_t q = 0;
            if (take) {
                float v = row.at(j), w = row.w(v);
                q = mass_q(exp_neg(w));
                bin = (int)(row.key(v, j) >> shift0);
                p2[2] += q;
                if (w <= rp.thr_w) {
                    p2[0]++;
                    p2[1] += q;
                }
            }
            add_to_bin(sh.cnt0, sh.mass0, bin, q, take);
        }
        block_totals(p2, 0u, sh.vals);
        row_exchange(pt, ex, sh, 3, 0u, sh.cnt0, sh.mass0, kBins0);

        // the kept prefix as (length, mass): the shortest of top_k's (with its ties), top_p's and min_p's
        uint64_t len = sh.vals[0], kept = sh.vals[1], sk = sh.vals[2];
        const uint64_t lk = (uint64_t)rp.lk;
        if (lk < (uint64_t)row.n && (rp.top_p < 1.0f || lk < len)) {
            Goal g = {Goal::kCount, lk, 0.0, 0};
            const uint64_t vk = select(row, pt, ex, sh, g, best).key >> row.ib; // the top_k-th's value
            uint64_t kc;
            count_mass(row, pt, ex, sh, [&](float, int64_t, uint64_t key) { return (key >> row.ib) >= vk; }, kc, sk);
            lo = vk << row.ib;
            if (kc < len) {
                len = kc;
                kept = sk;
            }
        }
        if (rp.top_p < 1.0f) {
            Goal g = {Goal::kMassAtLeast, 0, (double)rp.top_p * (double)sk, 0};
            Pick p = select(row, pt, ex, sh, g, best);
            lo = p.key > lo ? p.key : lo;
            if (p.c + 1 < len) {
                len = p.c + 1;
                kept = p.s + p.q;
            }
        }
        Goal draw = {Goal::kMassAbove, 0, __dmul_rn((double)rp.u, (double)kept), 0};
        if (rp.typical < 1.0f) {
            const float thr = rp.thr_w;
            const uint64_t klo = lo;
            auto in_prefix = [&](float v, uint64_t key) { return key >= klo && row.w(v) <= thr; };
            const double c = typical_center(row, pt, ex, sh, in_prefix, kept);
            const uint64_t sstar = typical_threshold(row, pt, ex, sh, in_prefix, c,
                                                     __dmul_rn((double)rp.typical, (double)kept));
            // the segment: its mass, the mass before it, its keys (the lowest as a max of ~key)
            uint64_t seg[4] = {0, 0, 0, 0}; // segment mass, mass before it, ~lowest key, highest key
            for (int64_t j = row.j0 + threadIdx.x; j < row.n; j += row.step) {
                float v = row.at(j);
                uint64_t key = row.key(v, j);
                if (!in_prefix(v, key))
                    continue;
                uint64_t q = row.mass(v);
                if (shifted_bits(row, v, c) <= sstar) {
                    seg[0] += q;
                    seg[2] = ~key > seg[2] ? ~key : seg[2];
                    seg[3] = key > seg[3] ? key : seg[3];
                } else if ((double)row.w(v) < c) {
                    seg[1] += q; // ahead of the segment
                }
            }
            block_totals(seg, 0xcu, sh.vals);
            row_exchange(pt, ex, sh, 4, 0xcu);
            lo = ~sh.vals[2];
            hi = sh.vals[3];
            draw.base = sh.vals[1];
            draw.target = __dmul_rn((double)rp.u, (double)sh.vals[0]);
        }
        token = row.index(select(row, pt, ex, sh, draw, best).key);
    }
    if (a.processed) { // what the row keeps, scaled (a greedy row: the logits as processed)
        float *dst = a.processed + r * a.proc_row_stride;
        for (int64_t j = row.j0 + threadIdx.x; j < row.n; j += row.step) {
            float v = row.at(j), y = v;
            if (rp.inv_t > 0.0f) {
                uint64_t key = row.key(v, j);
                y = key >= lo && key <= hi && row.w(v) <= rp.thr_w ? __fdiv_rn(v, rp.t) : -INFINITY;
            }
            dst[j * a.proc_col_stride] = y;
        }
    }
    if (lead)
        *out = token;
}

// logprobs: the raw rows' log-sum-exp, the chosen tokens' logprobs, top values made logprobs.
struct LogprobArgs {
    const void *logits;
    int64_t row_stride, col_stride, n;
    const int64_t *out;
    int64_t out_stride;
    float *logprobs; // [rows] or NULL
    int64_t lp_stride;
    float *top; // [rows, ntop] raw values in, logprobs out; or NULL
    int64_t top_row_stride, top_col_stride, ntop;
    RowHead *heads; // [rows] and their slots, when split (gridDim.y > 1)
    LpSlots *slots;
};

template <typename T>
__global__ void __launch_bounds__(1024) logprob_kernel(const LogprobArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ double red[32];
    __shared__ float redf[32];
    const int64_t r = blockIdx.x;
    Part pt = row_part(a.heads, r, 2);
    const T *x = (const T *)a.logits + r * a.row_stride;
    const int64_t j0 = (int64_t)pt.part * blockDim.x + threadIdx.x, step = (int64_t)pt.parts * blockDim.x;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = (int)blockDim.x / 32;
    float m = -INFINITY;
    for (int64_t j = j0; j < a.n; j += step)
        m = fmaxf(m, load_f32(x + j * a.col_stride));
    for (int o = 16; o > 0; o >>= 1)
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0)
        redf[warp] = m;
    __syncthreads();
    m = redf[0];
    for (int i = 1; i < nw; i++)
        m = fmaxf(m, redf[i]);
    if (pt.parts > 1) { // the row's max from the parts' (exact in any order)
        if (threadIdx.x == 0)
            a.slots[r].m[pt.part] = m;
        row_barrier(pt);
        m = __ldcg(&a.slots[r].m[0]);
        for (int i = 1; i < pt.parts; i++)
            m = fmaxf(m, __ldcg(&a.slots[r].m[i]));
    }
    double s = 0.0;
    for (int64_t j = j0; j < a.n; j += step)
        s += (double)exp_neg(__fsub_rn(m, load_f32(x + j * a.col_stride)));
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0)
        red[warp] = s;
    __syncthreads();
    s = 0.0;
    for (int i = 0; i < nw; i++)
        s += red[i];
    if (pt.parts > 1) { // the parts' sums, added in part order (deterministic)
        if (threadIdx.x == 0)
            a.slots[r].s[pt.part] = s;
        row_barrier(pt);
        s = 0.0;
        for (int i = 0; i < pt.parts; i++)
            s += __ldcg(&a.slots[r].s[i]);
    }
    if (pt.part != 0)
        return;
    const double shift = (double)m + log(s); // logprob = x - m - log(s)
    if (threadIdx.x == 0 && a.logprobs) {
        int64_t tok = a.out[r * a.out_stride];
        a.logprobs[r * a.lp_stride] = tok >= 0 ? (float)((double)load_f32(x + tok * a.col_stride) - shift) : NAN;
    }
    for (int64_t j = threadIdx.x; j < a.ntop; j += blockDim.x) {
        float *v = a.top + r * a.top_row_stride + j * a.top_col_stride;
        *v = (float)((double)*v - shift);
    }
}

// ===================================================================================== host side

// min_p's bound on w, as min_p_bound in csrc/cpu/sample.c (the same libm calls, on the host)
float min_p_bound(float min_p) {
    if (!(min_p > 0))
        return INFINITY;
    double d = -log((double)min_p);
    float f = (float)d;
    return (double)f > d ? nextafterf(f, 0.0f) : f;
}

// Row r's values, derived exactly as to_cpu_sample derives them.
RowParams row_params(const to_sample_plan *pl, int64_t r, int proc) {
    const to_sample_params *p = &pl->p;
    RowParams rp;
    float t = to_sample_f32(p->temperature, r, 0);
    rp.inv_t = t > 0 ? 1.0f / t : 0.0f;
    rp.t = t;
    rp.top_p = to_sample_f32(p->top_p, r, 1);
    rp.u = to_sample_f32(p->uniform, r, 0);
    rp.thr_w = min_p_bound(to_sample_f32(p->min_p, r, 0));
    rp.typical = to_sample_f32(p->typical_p, r, 1);
    rp.proc = proc;
    int32_t k = to_sample_i32(p->top_k, r, 0);
    rp.lk = k <= 0 || k >= pl->vocab ? pl->vocab : k;
    return rp;
}

enum { kProcess = 0, kSample = 1, kLogprob = 2 }; // the kernels (and their RowHead::bar)

// Blocks of kernel `kind` (at `threads` threads, 128, 256 or 1024) the GPU holds at once: the
// blocks one SM holds times the SMs (asked once per GPU; the GPU is current). 0 if unknown.
template <typename T>
int resident(int kind, int dev, int threads) {
    static int cache[64][3][3];
    const int ti = threads >= 1024 ? 2 : threads >= 256 ? 1 : 0;
    int *c = dev >= 0 && dev < 64 ? &cache[dev][kind][ti] : nullptr;
    if (c && *c > 0)
        return *c;
    const void *fn = kind == kProcess ? (const void *)process_kernel<T>
                     : kind == kSample ? (const void *)sample_kernel<T> : (const void *)logprob_kernel<T>;
    int per_sm = 0, sms = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, threads, 0) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
        cudaGetLastError(); // (no image for this GPU: the launch reports it) one block per row
        return 0;
    }
    if (c)
        *c = per_sm * sms;
    return per_sm * sms;
}

// INFERENCE_PIO_SAMPLE_PARTS=k: k blocks per row whatever the row's length (within kMaxParts and
// the GPU's capacity), to test the split on small rows; 0 or unset: the rule below.
int forced_parts() {
    static const int k = [] {
        const char *v = getenv("INFERENCE_PIO_SAMPLE_PARTS");
        return v ? atoi(v) : 0;
    }();
    return k;
}

// Blocks per row for a launch of `rows` rows of n logits, given the blocks the GPU holds at once:
// enough to fill it about once, at most kMaxParts, and shares of at least kMinPerBlock logits
// (below that a barrier costs more than the share's pass). 1: no split.
int row_parts(int64_t rows, int64_t n, int capacity) {
    int64_t p = forced_parts() > 0 ? forced_parts() : n / kMinPerBlock;
    p = p < kMaxParts ? p : kMaxParts;
    const int64_t fit = rows > 0 ? capacity / rows : 0; // co-resident: rows * p <= capacity
    p = p < fit ? p : fit;
    return p >= 2 ? (int)p : 1;
}

// Cooperative launches with the programmatic attribute too, until a runtime refuses the pair.
std::atomic<bool> coop_pdl{true};

// kernel<<<(rows, parts), threads>>> on the stream, programmatic as to_launch makes every launch;
// with parts > 1 also cooperative: the runtime then refuses a grid whose blocks cannot all be
// resident at once (the row barrier would never open) instead of starting it. Returns the
// launch's error (callers go on to to_cuda_check_launch).
template <typename... Params, typename... Args>
cudaError_t launch_rows(void (*kernel)(Params...), int64_t rows, int parts, int threads, cudaStream_t stream,
                        const Args &...args) {
    const bool coop = parts > 1;
    auto go = [&](bool pdl) {
        ToLaunchOptions opt;
        opt.pdl = pdl;
        opt.cooperative = coop;
        return to_launch_with(opt, kernel, dim3((unsigned)rows, (unsigned)parts), dim3((unsigned)threads), 0,
                              stream, args...);
    };
    if (!coop || !to_pdl_enabled() || !coop_pdl.load())
        return go(to_pdl_enabled() && !coop);
    cudaError_t err = go(true);
    if (err == cudaSuccess)
        return err;
    cudaGetLastError(); // refused with both attributes: once more without PDL
    err = go(false);
    if (err == cudaSuccess) // the pair was the trouble: cooperative launches go without PDL from now
        coop_pdl.store(false);
    return err;
}

template <typename T>
void launch_sample(SampleArgs &a, int count, int parts, int threads, cudaStream_t stream) {
    launch_rows(sample_kernel<T>, count, parts, threads, stream, a);
}

template <typename T>
void launch_process(const ProcArgs &a, int64_t rows, int parts, int threads, cudaStream_t stream) {
    launch_rows(process_kernel<T>, rows, parts, threads, stream, a);
}

template <typename T>
void launch_logprobs(const LogprobArgs &a, int64_t rows, int parts, int threads, cudaStream_t stream) {
    launch_rows(logprob_kernel<T>, rows, parts, threads, stream, a);
}

#define DISPATCH(dtype, fn, ...)                                          \
    ((dtype) == TO_F32 ? fn<float>(__VA_ARGS__)                           \
     : (dtype) == TO_F16 ? fn<__half>(__VA_ARGS__) : fn<__nv_bfloat16>(__VA_ARGS__))

// Scratch of one call on the GPU, freed (stream-ordered: only later work reuses it) at the end.
struct Scratch {
    int dev;
    void *ptr[4];
    ~Scratch() {
        for (void *p : ptr)
            if (p)
                to_cuda_free(dev, p);
    }
};

// The processors' inputs packed for one upload: the rows' ProcRow, the histories, the bias lists.
// *host: the host buffer (freed by the caller), whose last rows bytes are the rows' processed flags.
int upload_processors(const to_sample_plan *pl, Scratch &scr, ProcArgs &pa, bool &counters, char *&host,
                      const char *&proc_flags) {
    const to_sample_params *p = &pl->p;
    const int64_t rows = pl->rows;
    const int64_t nh = p->history ? p->history->shape[0] : 0, nb = p->bias_ids ? p->bias_ids->shape[0] : 0;
    const size_t rows_bytes = (size_t)rows * sizeof(ProcRow), hist_at = (rows_bytes + 15) / 16 * 16;
    const size_t ids_at = hist_at + ((size_t)nh * 4 + 15) / 16 * 16, vals_at = ids_at + ((size_t)nb * 4 + 15) / 16 * 16;
    const size_t bytes = vals_at + (size_t)nb * 4;
    host = (char *)to_host_alloc(bytes + (size_t)rows);
    if (!host)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "%s: no host memory for the processors' inputs", pl->op);
    ProcRow *pr = (ProcRow *)host;
    char *flags = host + bytes;
    proc_flags = flags;
    counters = false;
    for (int64_t r = 0; r < rows; r++) {
        to_sample_proc q = to_sample_row_proc(p, r);
        pr[r] = ProcRow{q.hist0, q.nhist, q.nprompt, q.bias0, q.nbias, q.rep, q.presence, q.frequency,
                        q.ngram, to_sample_proc_active(&q)};
        flags[r] = (char)pr[r].active;
        counters |= pr[r].active && (q.rep != 1.0f || q.presence != 0.0f || q.frequency != 0.0f);
    }
    for (int64_t i = 0; i < nh; i++)
        ((int32_t *)(host + hist_at))[i] = to_sample_i32(p->history, i, 0);
    for (int64_t i = 0; i < nb; i++) {
        ((int32_t *)(host + ids_at))[i] = to_sample_i32(p->bias_ids, i, 0);
        ((float *)(host + vals_at))[i] = to_sample_f32(p->bias_values, i, 0.0f);
    }
    int st = to_cuda_alloc(scr.dev, (int64_t)bytes, &scr.ptr[0]);
    if (st == TO_OK) // through the staging buffer: the source may go once this returns
        st = to_cuda_memcpy(scr.dev, scr.ptr[0], host, (int64_t)bytes, 0);
    if (st != TO_OK)
        return st;
    char *dev = (char *)scr.ptr[0];
    pa.rows = (const ProcRow *)dev;
    pa.hist = (const int32_t *)(dev + hist_at);
    pa.bias_ids = (const int32_t *)(dev + ids_at);
    pa.bias_values = (const float *)(dev + vals_at);
    return TO_OK;
}

}  // namespace

extern "C" int to_cuda_sample(const to_sample_plan *pl) {
    const int64_t rows = pl->rows, n = pl->vocab;
    if (rows == 0)
        return TO_OK;
    const to_tensor *logits = pl->logits;
    const int dev = logits->device_index;
    cudaStream_t stream = to_cuda_stream(dev);
    if (!stream)
        return TO_ERR_CUDA;
    unsigned long long *err = to_cuda_error_word(dev);
    if (!err)
        return TO_ERR_CUDA;
    const int pipeline = strcmp(pl->op, "to_sample") != 0;
    if (pl->ntop) // the raw values first: logprob_kernel turns them into logprobs
        TO_TRY(to_cuda_topk(pl->top_logprobs, pl->top_ids, logits, (int)pl->ntop));
    // a long row is many passes of one block: give it many threads
    const int threads = n >= 16384 ? 1024 : n >= 2048 ? 256 : 128;

    // Blocks per row of each kernel (1: not split). sample_kernel's launches carry kRowsPerLaunch
    // rows each and the last one the fewest, so its rows are split the most.
    const bool want_lp = pl->logprobs || pl->ntop;
    const int sample_dtype = pl->any_proc ? TO_F32 : logits->dtype; // what sample_kernel reads
    const int parts_proc = pl->any_proc ? row_parts(rows, n, DISPATCH(logits->dtype, resident, kProcess, dev, threads)) : 1;
    const int cap_sample = DISPATCH(sample_dtype, resident, kSample, dev, threads);
    const int64_t last = rows - (rows - 1) / kRowsPerLaunch * kRowsPerLaunch;
    const int parts_last = row_parts(last, n, cap_sample);
    const int parts_lp = want_lp ? row_parts(rows, n, DISPATCH(logits->dtype, resident, kLogprob, dev, threads)) : 1;

    Scratch scr = {dev, {nullptr, nullptr, nullptr, nullptr}};
    RowHead *heads = nullptr;
    Exchange *ring = nullptr;
    LpSlots *slots = nullptr;
    if (parts_proc > 1 || parts_last > 1 || parts_lp > 1) { // the split's scratch, heads zeroed
        const size_t head_bytes = (size_t)rows * sizeof(RowHead), ring_at = (head_bytes + 255) / 256 * 256;
        const size_t ring_bytes = parts_last > 1 ? (size_t)(rows < kRowsPerLaunch ? rows : kRowsPerLaunch) * 3 * sizeof(Exchange) : 0;
        const size_t slots_at = ring_at + ring_bytes, slots_bytes = parts_lp > 1 ? (size_t)rows * sizeof(LpSlots) : 0;
        TO_TRY(to_cuda_alloc(dev, (int64_t)(slots_at + slots_bytes), &scr.ptr[3]));
        char *base = (char *)scr.ptr[3];
        heads = (RowHead *)base;
        ring = ring_bytes ? (Exchange *)(base + ring_at) : nullptr;
        slots = slots_bytes ? (LpSlots *)(base + slots_at) : nullptr;
        const cudaError_t e = cudaMemsetAsync(heads, 0, head_bytes, stream);
        if (e != cudaSuccess) {
            cudaGetLastError();
            return to_fail(TO_ERR_CUDA, "%s: %s (%s)", pl->op, cudaGetErrorString(e), cudaGetErrorName(e));
        }
    }

    char *host = nullptr;           // the upload's source, freed at the end
    const char *flags = nullptr;    // the rows that went through processors
    SampleArgs a = {};
    a.logits = logits->data;
    a.row_stride = logits->strides[0];
    a.col_stride = logits->strides[1];
    a.vshift = logits->dtype == TO_F32 ? 0 : logits->dtype == TO_F16 ? 13 : 16; // f16: 10 mantissa bits
    int dtype = logits->dtype;
    if (pl->any_proc) {
        ProcArgs pa = {};
        bool counters = false;
        int st = upload_processors(pl, scr, pa, counters, host, flags);
        if (st == TO_OK)
            st = to_cuda_alloc(dev, rows * n * (int64_t)sizeof(float), &scr.ptr[1]);
        if (st == TO_OK && counters)
            st = to_cuda_alloc(dev, rows * n * (int64_t)sizeof(uint32_t), &scr.ptr[2]);
        if (st != TO_OK) {
            to_host_free(host);
            return st;
        }
        pa.logits = logits->data;
        pa.row_stride = logits->strides[0];
        pa.col_stride = logits->strides[1];
        pa.n = n;
        pa.proc = (float *)scr.ptr[1];
        pa.cnt = (uint32_t *)scr.ptr[2];
        pa.out = (int64_t *)pl->out->data;
        pa.out_stride = pl->out->strides[0];
        pa.err = err;
        pa.heads = heads;
        pa.pipeline = pipeline;
        DISPATCH(dtype, launch_process, pa, rows, parts_proc, threads, stream);
        st = to_cuda_check_launch(pl->op);
        if (st != TO_OK) {
            to_host_free(host);
            return st;
        }
        a.logits = scr.ptr[1]; // the rows, processed, as f32
        a.row_stride = n;
        a.col_stride = 1;
        a.vshift = 0;
        dtype = TO_F32;
    }
    a.n = n;
    a.out = (int64_t *)pl->out->data;
    a.out_stride = pl->out->strides[0];
    if (pl->processed) {
        a.processed = (float *)pl->processed->data;
        a.proc_row_stride = pl->processed->strides[0];
        a.proc_col_stride = pl->processed->strides[1];
    }
    a.err = err;
    a.heads = heads;
    a.ring = ring;
    a.pipeline = pipeline;
    a.ib = 0;
    while (a.ib < 64 && ((uint64_t)(n - 1) >> a.ib) != 0)
        a.ib++;
    int st = TO_OK;
    for (int64_t r0 = 0; r0 < rows && st == TO_OK; r0 += kRowsPerLaunch) {
        const int count = (int)(rows - r0 < kRowsPerLaunch ? rows - r0 : kRowsPerLaunch);
        const int parts = row_parts(count, n, cap_sample); // <= parts_last: count >= last
        a.row0 = r0;
        for (int i = 0; i < count; i++)
            a.rows[i] = row_params(pl, r0 + i, flags ? flags[r0 + i] : 0);
        DISPATCH(dtype, launch_sample, a, count, parts, threads, stream);
        st = to_cuda_check_launch(pl->op);
    }
    to_host_free(host);
    TO_TRY(st);
    if (want_lp) {
        LogprobArgs la = {};
        la.logits = logits->data;
        la.row_stride = logits->strides[0];
        la.col_stride = logits->strides[1];
        la.n = n;
        la.out = (const int64_t *)pl->out->data;
        la.out_stride = pl->out->strides[0];
        if (pl->logprobs) {
            la.logprobs = (float *)pl->logprobs->data;
            la.lp_stride = pl->logprobs->strides[0];
        }
        if (pl->ntop) {
            la.top = (float *)pl->top_logprobs->data;
            la.top_row_stride = pl->top_logprobs->strides[0];
            la.top_col_stride = pl->top_logprobs->strides[1];
            la.ntop = pl->ntop;
        }
        la.heads = heads;
        la.slots = slots;
        DISPATCH(logits->dtype, launch_logprobs, la, rows, parts_lp, threads, stream);
        TO_TRY(to_cuda_check_launch(pl->op));
    }
    return TO_OK;
}
