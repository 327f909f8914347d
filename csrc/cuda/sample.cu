// sample.cu - to_sample on the GPU: one token per row of logits, computed where the logits are,
// so only the chosen ids ([B] int64) ever cross to the host.
//
// Semantics are to_cpu_sample's (csrc/cpu/sample.c), operation for operation:
//  - m = the row's max; w = (m - x) * (1 / temperature) in f32 (1 / temperature taken on the host,
//    the CPU's division); e = exp(-w) by the CPU's AVX2 polynomial (exp_neg_avx2: Cephes' expf,
//    same constants, same operation order, its FMAs as __fmaf_rn and every other step an explicitly
//    rounded __fmul_rn / __fadd_rn so nvcc contracts nothing), 0 for w > 87; masses
//    q = trunc(e * 2^45) as u64. So e is bit-identical to the CPU's AVX2 path wherever that path
//    uses the polynomial (its general path, in whole blocks of 256 tokens); the CPU's scalar path,
//    its top_k heap path and the row tails use libm's expf, which differs from the polynomial in
//    the last bit of e for ~15-35% of a row's tokens, so a draw sitting within ~1e-9 (relative)
//    of a CDF boundary may differ there (see tests/cuda/test_cuda_sample.py).
//  - The order (decreasing logit, lower index first on ties), the kept prefix
//    L = min(L_k, L_p, L_m) and the draw (first position whose inclusive mass > u * mass(L)) are
//    the CPU's, with the same double comparisons; min_p's bound on w (-ln(min_p) rounded down to
//    f32) is computed on the host with the CPU's libm calls.
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
//    are gathered, sorted and walked. Queries: top_k's rank (only when it matters), top_p's mass,
//    the draw. Random logits: usually two passes per query; a row of 151,936 logits costs about 4
//    passes with no filters and up to 8 with top_k and top_p.
//
// Parameters: validated on the host by csrc/ops/sample.c (they are host tensors) and reduced here,
// on the host, to per-row values that travel inside the kernel's arguments (kRowsPerLaunch rows
// per launch): no copy, no allocation, no synchronisation.
//
// Bad logits (NaN, +inf, a row of only -inf): nothing waits for the GPU, so the kernel writes -1 to
// that row's out and records TO_GPU_ERR_LOGITS in the GPU's error word; the next call that
// synchronises with the GPU (copying out to the host, say) raises it, naming the row (the first
// recorded when several rows are bad).
#include "cuda/common.cuh"

#include <math.h>

namespace {

constexpr int kRowsPerLaunch = 128; // 24 bytes each in the kernel's arguments (limit 4 KB)
constexpr int kBits0 = 11;          // level 0 of the selection: 2048 bins, kept for the row
constexpr int kBins0 = 1 << kBits0;
constexpr int kDigitBits = 10;      // later levels: 1024 bins
constexpr int kGather = 1024;       // a bin this small is sorted outright
constexpr float kWMax = 87.0f;      // e = 0 beyond (as on the CPU)

// Per-row values, prepared on the host.
struct RowParams {
    float inv_t;  // 1 / temperature; 0 marks a greedy row
    float top_p;  // >= 1: off
    float u;      // the draw, in [0, 1)
    float thr_w;  // keep w <= thr_w (min_p); +inf: off
    int64_t lk;   // top_k prefix length, 1..V
};

struct SampleArgs {
    const void *logits;
    int64_t row_stride, col_stride, n; // logits [rows, n], strides in elements
    int64_t *out;
    int64_t out_stride;
    int64_t row0; // the row of blockIdx.x == 0 (launches cover kRowsPerLaunch rows each)
    unsigned long long *err;
    int vshift, ib;
    RowParams rows[kRowsPerLaunch];
};

// What a row reports in the error word's b.
enum { kBadNaN = 1, kBadPosInf = 2, kBadAllNegInf = 3 };

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
struct Goal {
    enum { kCount, kMassAtLeast, kMassAbove } kind;
    uint64_t need;  // kCount: count >= need
    double target;  // mass compared as (double)mass, as on the CPU
    __device__ bool reached(uint64_t c, uint64_t s) const {
        return kind == kCount ? c >= need : kind == kMassAtLeast ? (double)s >= target : (double)s > target;
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
    int ngather;
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

// A position in the order: its key, the count and mass of the keys before it, and its own mass.
struct Pick {
    uint64_t key, c, s, q;
};

// The first key of the order at which the running count or mass reaches `goal`.
template <typename T>
__device__ Pick select(const Row<T> &row, Shared &sh, const Goal &goal, uint64_t best) {
    const int kb = 32 - row.vshift + row.ib; // key bits
    find_bin(sh.cnt0, sh.mass0, kBins0, goal, 0, 0, sh.scan);
    if (sh.scan.bin < 0) // not reached for the goals to_sample asks (their targets are below the mass)
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

// ===================================================================================== the kernel

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
    bool nan = false, pinf = false;
    for (int64_t j = threadIdx.x; j < row.n; j += blockDim.x) {
        float v = row.at(j);
        nan |= v != v;
        pinf |= v == INFINITY;
        uint64_t key = row.key(v, j);
        best = key > best ? key : best;
    }
    nan = __syncthreads_or(nan);
    pinf = __syncthreads_or(pinf);
    best = block_max_u64(best, sh.red);
    const int64_t top = row.index(best);
    row.m = row.at(top);
    if (nan || pinf || row.m == -INFINITY) {
        if (threadIdx.x == 0) {
            *out = -1;
            to_gpu_error(a.err, TO_GPU_ERR_LOGITS, r, nan ? kBadNaN : pinf ? kBadPosInf : kBadAllNegInf, 0);
        }
        return;
    }
    if (rp.inv_t <= 0.0f) { // greedy
        if (threadIdx.x == 0)
            *out = top;
        return;
    }

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

    // the kept prefix as (length, mass): the shortest of top_k's, top_p's and min_p's
    uint64_t len = sh.lm_c, kept = sh.lm_s, sk = sh.total;
    const uint64_t lk = (uint64_t)rp.lk;
    if (lk < (uint64_t)row.n && (rp.top_p < 1.0f || lk < len)) {
        Goal g = {Goal::kCount, lk, 0.0};
        Pick k = select(row, sh, g, best);
        sk = k.s + k.q;
        if (lk < len) {
            len = lk;
            kept = sk;
        }
    }
    if (rp.top_p < 1.0f) {
        Goal g = {Goal::kMassAtLeast, 0, (double)rp.top_p * (double)sk};
        Pick p = select(row, sh, g, best);
        if (p.c + 1 < len) {
            len = p.c + 1;
            kept = p.s + p.q;
        }
    }
    Goal g = {Goal::kMassAbove, 0, (double)rp.u * (double)kept};
    Pick d = select(row, sh, g, best);
    if (threadIdx.x == 0)
        *out = row.index(d.key);
}

// ===================================================================================== host side

float f32_at(const to_tensor *t, int64_t r) { return ((const float *)t->data)[r * t->strides[0]]; }

// Row r's values, derived exactly as to_cpu_sample derives them (same libm calls, on the host).
RowParams row_params(const to_tensor *temperature, const to_tensor *top_k, const to_tensor *top_p,
                     const to_tensor *min_p, const to_tensor *uniform, int64_t r, int64_t n) {
    RowParams p;
    float t = f32_at(temperature, r);
    p.inv_t = t > 0 ? 1.0f / t : 0.0f;
    p.top_p = f32_at(top_p, r);
    p.u = f32_at(uniform, r);
    float mp = f32_at(min_p, r);
    p.thr_w = INFINITY;
    if (mp > 0) { // the largest float f with f <= -ln(min_p)
        double d = -log((double)mp);
        p.thr_w = (float)d;
        if ((double)p.thr_w > d)
            p.thr_w = nextafterf(p.thr_w, 0.0f);
    }
    int32_t k = ((const int32_t *)top_k->data)[r * top_k->strides[0]];
    p.lk = k <= 0 || k >= n ? n : k;
    return p;
}

}  // namespace

extern "C" int to_cuda_sample(const to_tensor *out, const to_tensor *logits, const to_tensor *temperature,
                              const to_tensor *top_k, const to_tensor *top_p, const to_tensor *min_p,
                              const to_tensor *uniform) {
    const int64_t rows = logits->shape[0], n = logits->shape[1];
    if (rows == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(logits->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    unsigned long long *err = to_cuda_error_word(logits->device_index);
    if (!err)
        return TO_ERR_CUDA;
    SampleArgs a = {};
    a.logits = logits->data;
    a.row_stride = logits->strides[0];
    a.col_stride = logits->strides[1];
    a.n = n;
    a.out = (int64_t *)out->data;
    a.out_stride = out->strides[0];
    a.err = err;
    a.vshift = logits->dtype == TO_F32 ? 0 : logits->dtype == TO_F16 ? 13 : 16; // f16: 10 mantissa bits
    a.ib = 0;
    while (a.ib < 64 && ((uint64_t)(n - 1) >> a.ib) != 0)
        a.ib++;
    // a long row is many passes of one block: give it many threads
    const int threads = n >= 16384 ? 1024 : n >= 2048 ? 256 : 128;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerLaunch) {
        const int count = (int)(rows - r0 < kRowsPerLaunch ? rows - r0 : kRowsPerLaunch);
        a.row0 = r0;
        for (int i = 0; i < count; i++)
            a.rows[i] = row_params(temperature, top_k, top_p, min_p, uniform, r0 + i, n);
        if (logits->dtype == TO_F32)
            to_launch(sample_kernel<float>, count, threads, 0, stream, a);
        else if (logits->dtype == TO_F16)
            to_launch(sample_kernel<__half>, count, threads, 0, stream, a);
        else
            to_launch(sample_kernel<__nv_bfloat16>, count, threads, 0, stream, a);
        TO_TRY(to_cuda_check_launch("to_sample"));
    }
    return TO_OK;
}
