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
// One block per row. Positions in the order are found without sorting the row, by radix
// selection over 64-bit order keys, all in integers (counts and u64 masses are added with
// atomics, but integer sums do not depend on the order they happen in: results never depend on
// thread scheduling):
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
// Parameters: validated on the host by csrc/ops/sample.c (they are host tensors) and reduced here,
// on the host, to per-row values that travel inside the kernel's arguments (kRowsPerLaunch rows
// per launch): no copy, no allocation, no synchronisation.
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

#include <math.h>
#include <string.h>

namespace {

constexpr int kRowsPerLaunch = 80; // 40 bytes each in the kernel's arguments (limit 4 KB)
constexpr int kBits0 = 11;         // level 0 of the selection: 2048 bins, kept for the row
constexpr int kBins0 = 1 << kBits0;
constexpr int kDigitBits = 10;     // later levels: 1024 bins
constexpr int kGather = 1024;      // a bin this small is sorted outright
constexpr float kWMax = 87.0f;     // e = 0 beyond (as on the CPU)

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

struct SampleArgs {
    const void *logits;
    int64_t row_stride, col_stride, n; // logits [rows, n], strides in elements
    int64_t *out;
    int64_t out_stride;
    float *processed; // [rows, n] or NULL
    int64_t proc_row_stride, proc_col_stride;
    int64_t row0; // the row of blockIdx.x == 0 (launches cover kRowsPerLaunch rows each)
    unsigned long long *err;
    int vshift, ib, pipeline;
    RowParams rows[kRowsPerLaunch];
};
static_assert(sizeof(SampleArgs) <= 4096, "kernel arguments are limited to 4 KB");

// What a row reports in the error word's b (TO_SAMPLE_BAD_* of csrc/cpu/sample.h); c = 1 for
// to_sample_pipeline, 0 for to_sample.

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

template <typename T>
struct Row {
    const T *x;
    int64_t sx, n;
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
    unsigned long long red[32];
    unsigned long long lm_c, lm_s, total;
    unsigned long long acc[4]; // count_mass / typical's sums
    int ngather;
    unsigned flags; // block_or's word
};

__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The block's largest value; every thread gets it.
__device__ uint64_t block_max_u64(uint64_t v, unsigned long long *red) {
    for (int o = 16; o > 0; o >>= 1) {
        uint64_t other = __shfl_xor_sync(0xffffffffu, v, o);
        v = other > v ? other : v;
    }
    __syncthreads(); // red may still be read
    if (threadIdx.x % 32 == 0)
        red[threadIdx.x / 32] = v;
    __syncthreads();
    v = 0;
    for (int i = 0; i < (int)blockDim.x / 32; i++)
        v = red[i] > v ? red[i] : v;
    return v;
}

// The OR of every thread's bits, for every thread. One reduction for all of a row's flags: three
// __syncthreads_or in a row (bar.red.or, one per flag) returned false for the third on the H200
// although every thread's flag was true (sm_90a build; with a printf between them it did not).
__device__ unsigned block_or(unsigned bits, unsigned *word) {
    bits = __reduce_or_sync(0xffffffffu, bits);
    __syncthreads(); // word may still be read
    if (threadIdx.x == 0)
        *word = 0;
    __syncthreads();
    if (threadIdx.x % 32 == 0 && bits)
        atomicOr(word, bits);
    __syncthreads();
    return *word;
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

// The block's sums of (count, mass) over the tokens where pred(v, j, key) holds; every thread gets them.
template <typename T, typename Pred>
__device__ void count_mass(const Row<T> &row, Shared &sh, Pred pred, uint64_t &count, uint64_t &mass) {
    uint64_t c = 0, s = 0;
    for (int64_t j = threadIdx.x; j < row.n; j += blockDim.x) {
        float v = row.at(j);
        if (pred(v, j, row.key(v, j))) {
            c++;
            s += row.mass(v);
        }
    }
    c = warp_sum_u64(c);
    s = warp_sum_u64(s);
    __syncthreads(); // acc may still be read
    if (threadIdx.x == 0)
        sh.acc[0] = sh.acc[1] = 0;
    __syncthreads();
    if (threadIdx.x % 32 == 0) {
        atomicAdd(&sh.acc[0], (unsigned long long)c);
        atomicAdd(&sh.acc[1], (unsigned long long)s);
    }
    __syncthreads();
    count = sh.acc[0];
    mass = sh.acc[1];
}

// A position in the order: its key, the count and mass of the keys before it, and its own mass.
struct Pick {
    uint64_t key, c, s, q;
};

// The first key of the order at which the running count or mass reaches `goal`.
template <typename T>
__device__ Pick select(const Row<T> &row, Shared &sh, const Goal &goal, uint64_t best) {
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
        for (int64_t base = 0; base < row.n; base += blockDim.x) {
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
    for (int64_t j = threadIdx.x; j < row.n; j += blockDim.x) {
        uint64_t key = row.key(row.at(j), j);
        if ((key >> hi) == prefix) {
            int slot = atomicAdd(&sh.ngather, 1);
            if (slot < kGather)
                sh.keys[slot] = key;
        }
    }
    __syncthreads();
    int m = sh.ngather < kGather ? sh.ngather : kGather, p = 1;
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
template <typename T, typename Kept>
__device__ double typical_center(const Row<T> &row, Shared &sh, Kept kept, uint64_t z) {
    uint64_t hi = 0, lo = 0;
    for (int64_t j = threadIdx.x; j < row.n; j += blockDim.x) {
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
    for (int o = 16; o > 0; o >>= 1)
        add128(hi, lo, __shfl_xor_sync(0xffffffffu, hi, o), __shfl_xor_sync(0xffffffffu, lo, o));
    __syncthreads(); // scan's words may still be read
    if (threadIdx.x % 32 == 0) {
        sh.scan.wc[threadIdx.x / 32] = hi;
        sh.scan.ws[threadIdx.x / 32] = lo;
    }
    __syncthreads();
    hi = lo = 0;
    for (int i = 0; i < (int)blockDim.x / 32; i++)
        add128(hi, lo, sh.scan.wc[i], sh.scan.ws[i]);
    __syncthreads();
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
__device__ uint64_t typical_threshold(const Row<T> &row, Shared &sh, Kept kept, double c, double target) {
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
        for (int64_t base = 0; base < row.n; base += blockDim.x) {
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
    int pipeline;
};

template <typename T>
__global__ void __launch_bounds__(1024) process_kernel(const ProcArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    const int64_t r = blockIdx.x, n = a.n;
    const T *x = (const T *)a.logits + r * a.row_stride;
    float *y = a.proc + r * n;
    __shared__ unsigned word;
    unsigned seen = 0; // 1: NaN, 2: +inf, 4: a value above -inf
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        float v = load_f32(x + j * a.col_stride);
        seen |= (v != v ? 1u : 0u) | (v == INFINITY ? 2u : 0u) | (v > -INFINITY ? 4u : 0u);
        y[j] = v;
    }
    seen = block_or(seen, &word);
    const bool nan = seen & 1u, pinf = seen & 2u, live = seen & 4u;
    if (nan || pinf || !live) { // the raw row's error comes first (sample_kernel finds it again)
        if (threadIdx.x == 0) {
            a.out[r * a.out_stride] = -1;
            to_gpu_error(a.err, TO_GPU_ERR_LOGITS, r, nan ? TO_SAMPLE_BAD_NAN : pinf ? TO_SAMPLE_BAD_POSINF
                         : TO_SAMPLE_BAD_ALL_NEGINF, a.pipeline);
        }
        return;
    }
    const ProcRow pr = a.rows[r];
    if (!pr.active)
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

template <typename T>
__global__ void __launch_bounds__(1024) sample_kernel(const SampleArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ Shared sh;
    const int64_t r = a.row0 + blockIdx.x;
    const RowParams rp = a.rows[blockIdx.x];
    Row<T> row;
    row.x = (const T *)a.logits + r * a.row_stride;
    row.sx = a.col_stride;
    row.n = a.n;
    row.vshift = a.vshift;
    row.ib = a.ib;
    row.imask = (1ull << a.ib) - 1;
    row.m = 0.0f;
    row.inv_t = rp.inv_t;
    int64_t *out = a.out + r * a.out_stride;

    // pass 1: the max key (first index of the max), and the checks
    uint64_t best = 0;
    unsigned seen = 0; // 1: NaN, 2: +inf
    for (int64_t j = threadIdx.x; j < row.n; j += blockDim.x) {
        float v = row.at(j);
        seen |= (v != v ? 1u : 0u) | (v == INFINITY ? 2u : 0u);
        uint64_t key = row.key(v, j);
        best = key > best ? key : best;
    }
    seen = block_or(seen, &sh.flags);
    const bool nan = seen & 1u, pinf = seen & 2u;
    best = block_max_u64(best, sh.red);
    const int64_t top = row.index(best);
    row.m = row.at(top);
    if (nan || pinf || row.m == -INFINITY) {
        if (threadIdx.x == 0) {
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
        if (threadIdx.x == 0)
            sh.lm_c = sh.lm_s = sh.total = 0;
        __syncthreads();
        uint64_t lm_c = 0, lm_s = 0, total = 0;
        for (int64_t base = 0; base < row.n; base += blockDim.x) {
            int64_t j = base + threadIdx.x;
            bool take = j < row.n;
            int bin = 0;
            uint64_t q = 0;
            if (take) {
                float v = row.at(j), w = row.w(v);
                q = mass_q(exp_neg(w));
                bin = (int)(row.key(v, j) >> shift0);
                total += q;
                if (w <= rp.thr_w) {
                    lm_c++;
                    lm_s += q;
                }
            }
            add_to_bin(sh.cnt0, sh.mass0, bin, q, take);
        }
        lm_c = warp_sum_u64(lm_c);
        lm_s = warp_sum_u64(lm_s);
        total = warp_sum_u64(total);
        if (threadIdx.x % 32 == 0) {
            atomicAdd(&sh.lm_c, (unsigned long long)lm_c);
            atomicAdd(&sh.lm_s, (unsigned long long)lm_s);
            atomicAdd(&sh.total, (unsigned long long)total);
        }
        __syncthreads();

        // the kept prefix as (length, mass): the shortest of top_k's (with its ties), top_p's and min_p's
        uint64_t len = sh.lm_c, kept = sh.lm_s, sk = sh.total;
        const uint64_t lk = (uint64_t)rp.lk;
        if (lk < (uint64_t)row.n && (rp.top_p < 1.0f || lk < len)) {
            Goal g = {Goal::kCount, lk, 0.0, 0};
            const uint64_t vk = select(row, sh, g, best).key >> row.ib; // the top_k-th's value
            uint64_t kc;
            count_mass(row, sh, [&](float, int64_t, uint64_t key) { return (key >> row.ib) >= vk; }, kc, sk);
            lo = vk << row.ib;
            if (kc < len) {
                len = kc;
                kept = sk;
            }
        }
        if (rp.top_p < 1.0f) {
            Goal g = {Goal::kMassAtLeast, 0, (double)rp.top_p * (double)sk, 0};
            Pick p = select(row, sh, g, best);
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
            const double c = typical_center(row, sh, in_prefix, kept);
            const uint64_t sstar = typical_threshold(row, sh, in_prefix, c,
                                                     __dmul_rn((double)rp.typical, (double)kept));
            // the segment: its mass, the mass before it, its keys
            uint64_t bmass = 0, before = 0, blo = ~0ull, bhi = 0;
            for (int64_t j = threadIdx.x; j < row.n; j += blockDim.x) {
                float v = row.at(j);
                uint64_t key = row.key(v, j);
                if (!in_prefix(v, key))
                    continue;
                uint64_t q = row.mass(v);
                if (shifted_bits(row, v, c) <= sstar) {
                    bmass += q;
                    blo = key < blo ? key : blo;
                    bhi = key > bhi ? key : bhi;
                } else if ((double)row.w(v) < c) {
                    before += q; // ahead of the segment
                }
            }
            bmass = warp_sum_u64(bmass);
            before = warp_sum_u64(before);
            for (int o = 16; o > 0; o >>= 1) {
                uint64_t l2 = __shfl_xor_sync(0xffffffffu, blo, o), h2 = __shfl_xor_sync(0xffffffffu, bhi, o);
                blo = l2 < blo ? l2 : blo;
                bhi = h2 > bhi ? h2 : bhi;
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                sh.acc[0] = sh.acc[1] = 0;
                sh.acc[2] = ~0ull;
                sh.acc[3] = 0;
            }
            __syncthreads();
            if (threadIdx.x % 32 == 0) {
                atomicAdd(&sh.acc[0], (unsigned long long)bmass);
                atomicAdd(&sh.acc[1], (unsigned long long)before);
                atomicMin(&sh.acc[2], (unsigned long long)blo);
                atomicMax(&sh.acc[3], (unsigned long long)bhi);
            }
            __syncthreads();
            lo = sh.acc[2];
            hi = sh.acc[3];
            draw.base = sh.acc[1];
            draw.target = __dmul_rn((double)rp.u, (double)sh.acc[0]);
        }
        token = row.index(select(row, sh, draw, best).key);
    }
    if (a.processed) { // what the row keeps, scaled (a greedy row: the logits as processed)
        float *dst = a.processed + r * a.proc_row_stride;
        for (int64_t j = threadIdx.x; j < row.n; j += blockDim.x) {
            float v = row.at(j), y = v;
            if (rp.inv_t > 0.0f) {
                uint64_t key = row.key(v, j);
                y = key >= lo && key <= hi && row.w(v) <= rp.thr_w ? __fdiv_rn(v, rp.t) : -INFINITY;
            }
            dst[j * a.proc_col_stride] = y;
        }
    }
    if (threadIdx.x == 0)
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
};

template <typename T>
__global__ void __launch_bounds__(1024) logprob_kernel(const LogprobArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ double red[32];
    __shared__ float redf[32];
    const int64_t r = blockIdx.x;
    const T *x = (const T *)a.logits + r * a.row_stride;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = (int)blockDim.x / 32;
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x)
        m = fmaxf(m, load_f32(x + j * a.col_stride));
    for (int o = 16; o > 0; o >>= 1)
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0)
        redf[warp] = m;
    __syncthreads();
    m = redf[0];
    for (int i = 1; i < nw; i++)
        m = fmaxf(m, redf[i]);
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x)
        s += (double)exp_neg(__fsub_rn(m, load_f32(x + j * a.col_stride)));
    for (int o = 16; o > 0; o >>= 1)
        s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0)
        red[warp] = s;
    __syncthreads();
    s = 0.0;
    for (int i = 0; i < nw; i++)
        s += red[i];
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

template <typename T>
void launch_sample(SampleArgs &a, int count, int threads, cudaStream_t stream) {
    to_launch(sample_kernel<T>, count, threads, 0, stream, a);
}

template <typename T>
void launch_process(const ProcArgs &a, int64_t rows, int threads, cudaStream_t stream) {
    to_launch(process_kernel<T>, (unsigned)rows, threads, 0, stream, a);
}

template <typename T>
void launch_logprobs(const LogprobArgs &a, int64_t rows, int threads, cudaStream_t stream) {
    to_launch(logprob_kernel<T>, (unsigned)rows, threads, 0, stream, a);
}

#define DISPATCH(dtype, fn, ...)                                          \
    ((dtype) == TO_F32 ? fn<float>(__VA_ARGS__)                           \
     : (dtype) == TO_F16 ? fn<__half>(__VA_ARGS__) : fn<__nv_bfloat16>(__VA_ARGS__))

// Scratch of one call on the GPU, freed (stream-ordered: only later work reuses it) at the end.
struct Scratch {
    int dev;
    void *ptr[3];
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

    Scratch scr = {dev, {nullptr, nullptr, nullptr}};
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
        pa.pipeline = pipeline;
        DISPATCH(dtype, launch_process, pa, rows, threads, stream);
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
    a.pipeline = pipeline;
    a.ib = 0;
    while (a.ib < 64 && ((uint64_t)(n - 1) >> a.ib) != 0)
        a.ib++;
    int st = TO_OK;
    for (int64_t r0 = 0; r0 < rows && st == TO_OK; r0 += kRowsPerLaunch) {
        const int count = (int)(rows - r0 < kRowsPerLaunch ? rows - r0 : kRowsPerLaunch);
        a.row0 = r0;
        for (int i = 0; i < count; i++)
            a.rows[i] = row_params(pl, r0 + i, flags ? flags[r0 + i] : 0);
        DISPATCH(dtype, launch_sample, a, count, threads, stream);
        st = to_cuda_check_launch(pl->op);
    }
    to_host_free(host);
    TO_TRY(st);
    if (pl->logprobs || pl->ntop) {
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
        DISPATCH(logits->dtype, launch_logprobs, la, rows, threads, stream);
        TO_TRY(to_cuda_check_launch(pl->op));
    }
    return TO_OK;
}
