/* sample.c - one token per row of logits: the logits processors (bias, repetition / presence /
 * frequency penalties, the n-gram block), then greedy, or temperature / top-k / top-p / min-p /
 * typical-p and an inverse-CDF draw with a caller-supplied uniform; and the raw logprobs.
 *
 * Arithmetic (what "p" and "mass" are, exactly):
 *  - The row is read as f32 (exact from f16/bf16). A row with processors is copied and the copy
 *    rewritten in f32, token by token (processors below); the rest reads that copy. m = its max.
 *    A token's scaled distance from the max is w = (m - x) * (1 / temperature) in f32 (>= 0;
 *    +inf for a -inf logit), and its unnormalised probability e = exp(-w) in f32 (1 for the max;
 *    taken as 0 when w > 87, i.e. p < 1.6e-38 * max p). Normalising is never needed: every rule
 *    compares ratios.
 *  - The order: decreasing logit, lower index first on ties. This is the order of decreasing p
 *    in exact arithmetic; ordering by the logit (exact input) rather than by the rounded p keeps
 *    the order free of ties that rounding would invent.
 *  - Masses are summed as integers: q = trunc(e * 2^45), so every partial sum is exact and the
 *    same in any order (a token with p < 2^-45 * max p has no mass and is never drawn).
 *  - Kept prefix length L = min(L_k, L_p, L_m): L_k = top_k, extended over the tokens tied with
 *    the top_k-th (or V); L_p = the first position whose inclusive mass >= top_p * mass(L_k)
 *    (compared in double; V when top_p >= 1); L_m = the number of tokens with w <= -ln(min_p)
 *    (V when min_p = 0). Every one of these is a prefix of the order because w grows along it.
 *  - typical_p < 1 then keeps a segment of that prefix: with c = the mean of w under the kept
 *    masses (-log p - H = w - c exactly, p renormalised over the kept tokens), the tokens with
 *    |w - c| <= s*, s* the smallest |w - c| of a kept token such that the tokens at or below it
 *    hold >= typical_p of the kept mass. |w - c| falls then grows along the order, so they are
 *    a contiguous segment. c is computed from exact integer sums (sum of q * round(w * 2^24) in
 *    128 bits) so that it does not depend on the order of the sum (the GPU gets the same c).
 *  - The draw: the first position of the kept segment whose inclusive mass within it exceeds
 *    uniform * (its mass), in double.
 *
 * Finding positions without a full sort:
 *  - top_k <= 2048 (and < V): a min-heap of the k best (logit, index) keys filled by a vector
 *    threshold scan, as in reduce.c's top-k, then sorted: about one streaming pass. The scan
 *    counts the tokens left out that tie with the heap's root; only when some do is the row
 *    scanned again for them.
 *  - otherwise: one pass computes w, e and a bucket b = min(trunc(w * scale), 2047) per token
 *    (scale spreads w's range over the buckets; buckets grow along the order) and per-bucket
 *    counts and masses. Each position query walks the bucket totals to the bucket holding the
 *    answer, gathers that bucket's tokens (a vector scan of the stored bucket ids) and sorts
 *    only them. Random-normal logits put a few hundred tokens in a bucket; a pathological row
 *    (e.g. all logits equal) puts all of them in one and costs one sort of the row. Tokens tied
 *    in value share a bucket (same w), so top_k's ties are found in the bucket of the top_k-th.
 *  - typical_p: the kept tokens' (|w - c|, q) pairs and a weighted quickselect for s*.
 *
 * Processors (transformers' order, see to_sample_pipeline in tensor_ops.h), on the f32 copy:
 * the bias entries added in list order; the repetition penalty once per distinct history token;
 * x -= frequency * count + presence for each distinct generated token (f32: frequency * count,
 * plus presence, subtracted); -inf for each token that would complete an n-gram of the history.
 * Distinct tokens and counts come from a per-thread array of V counters that is never cleared
 * as a whole: each use first zeroes the entries of the tokens it is about to count.
 *
 * Logprobs are the raw row's: log(sum exp(x - m)) summed in double over f32 exp (the polynomial
 * below), before any processor; top_ids / top_logprobs come from to_cpu_topk on the raw rows.
 *
 * Greedy rows (temperature <= 0): the first index of the max.
 * Rows are independent and each is done by one thread, start to end: results never depend on
 * the thread count. The scalar and AVX2 paths compute e with one polynomial, bit for bit. */
#include "cpu/sample.h"
#include "cpu/heap.h"
#include "cpu/order_key.h"
#include "cpu/reduce.h"

#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#define NB 2048          /* buckets of the general path */
#define HEAP_MAX_K 2048  /* largest top_k done with the heap */
#define W_MAX 87.0f      /* e = 0 beyond */
#define QSCALE 0x1p45    /* fixed-point scale of masses */

static inline uint64_t mass_q(float e) { return (uint64_t)((double)e * QSCALE); }
/* e^-w for w >= 0: the AVX2 path's polynomial (exp_neg_avx2 below) one lane at a time, with the
 * same constants, operations and fused multiply-adds, so every path here (and the GPU's,
 * csrc/cuda/sample.cu) gives the same e bit for bit; 0 for w > W_MAX, +inf included. */
static inline float exp_neg_scalar(float w) {
    float z = 0.0f - fminf(w, W_MAX);
    float nf = rintf(z * 1.44269504088896341f);
    float r = fmaf(-nf, 0.693359375f, z);
    r = fmaf(-nf, -2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r + 1.0f);
    union { uint32_t u; float f; } pow2 = {(uint32_t)((int)nf + 127) << 23};
    return w > W_MAX ? 0.0f : p * pow2.f;
}

/* e^-w for w >= 0 (Cephes' expf polynomial); 0 for w > W_MAX, +inf included. Not simd_avx2.h's
 * exp_avx2: the masses must be the GPU's bit for bit (csrc/cuda/sample.cu's exp_neg follows this
 * operation order), and that one rounds its last steps in another order. */
TO_TARGET_AVX2 static inline __m256 exp_neg_avx2(__m256 w) {
    __m256 big = _mm256_cmp_ps(w, _mm256_set1_ps(W_MAX), _CMP_GT_OQ);
    __m256 z = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_min_ps(w, _mm256_set1_ps(W_MAX)));
    __m256 nf = _mm256_round_ps(_mm256_mul_ps(z, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), z);
    r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(big, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2)));
}


static int cmp_desc(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* ============================================================== pass 1: max, min, NaN */

typedef struct {
    float max, min;
    int nan;
} stats_t;

static void stats_scalar(const float *x, int64_t n, stats_t *s) {
    float mx = -INFINITY, mn = INFINITY;
    int nan = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        nan |= v != v;
        mx = v > mx ? v : mx;
        mn = v < mn ? v : mn;
    }
    s->max = mx;
    s->min = mn;
    s->nan = nan;
}

TO_TARGET_AVX2 static void stats_avx2(const float *x, int64_t n, stats_t *s) {
    __m256 mx = _mm256_set1_ps(-INFINITY), mn = _mm256_set1_ps(INFINITY), nan = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        mx = _mm256_max_ps(mx, v);
        mn = _mm256_min_ps(mn, v);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    stats_scalar(x + i, n - i, s);
    float lx[8], ln[8];
    _mm256_storeu_ps(lx, mx);
    _mm256_storeu_ps(ln, mn);
    for (int l = 0; l < 8; l++) {
        s->max = lx[l] > s->max ? lx[l] : s->max;
        s->min = ln[l] < s->min ? ln[l] : s->min;
    }
    s->nan |= _mm256_movemask_ps(nan) != 0;
}

/* The first i >= from with x[i] == v (n if none): the greedy token, and top_k's ties. */
static int64_t find_scalar(const float *x, int64_t from, int64_t n, float v) {
    int64_t i = from;
    while (i < n && x[i] != v)
        i++;
    return i;
}

TO_TARGET_AVX2 static int64_t find_avx2(const float *x, int64_t from, int64_t n, float v) {
    const __m256 vv = _mm256_set1_ps(v);
    int64_t i = from;
    for (; i + 8 <= n; i += 8) {
        unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vv, _CMP_EQ_OQ));
        if (m)
            return i + __builtin_ctz(m);
    }
    return find_scalar(x, i, n, v);
}

static inline int64_t find_value(const float *x, int64_t from, int64_t n, float v, int simd) {
    return simd >= TO_SIMD_AVX2 ? find_avx2(x, from, n, v) : find_scalar(x, from, n, v);
}

static void row_stats(const float *x, int64_t n, int simd, stats_t *s) {
    if (simd >= TO_SIMD_AVX2)
        stats_avx2(x, n, s);
    else
        stats_scalar(x, n, s);
}

/* ============================================================== top_k <= HEAP_MAX_K: a heap */

typedef struct {
    uint64_t *heap;
    int64_t k, count;
    float threshold; /* logit of the root once full: only a larger one can enter */
    int64_t ties;    /* tokens left out whose logit equals the root's (top_k keeps them too) */
} heap_t;

static inline float root_value(const heap_t *st) {
    union { uint32_t u; float f; } b;
    uint32_t k = (uint32_t)(st->heap[0] >> 32);
    b.u = (k & 0x80000000u) ? k & 0x7fffffffu : ~k;
    return b.f;
}

static inline void offer(heap_t *st, float v, int64_t i) {
    uint64_t key = make_key(v, i);
    if (st->count < st->k) {
        st->heap[st->count] = key;
        heap_sift_up(st->heap, st->count++);
        if (st->count == st->k)
            st->threshold = root_value(st);
    } else if (key > st->heap[0]) {
        float old = st->threshold;
        st->heap[0] = key;
        heap_sift_down(st->heap, st->k, 0);
        st->threshold = root_value(st);
        /* the root only grows: the evicted one ties with the new root, or everything left out
         * (all at most the old root) is below it */
        st->ties = st->threshold == old ? st->ties + 1 : 0;
    } else {
        st->ties += v == st->threshold; /* a later index of the root's value */
    }
}

/* Values arrive in increasing index order: with a full heap only v > threshold can enter, and
 * v == threshold is a tie left out. */
static void select_scalar(heap_t *st, const float *p, int64_t n) {
    int64_t j = 0;
    for (; j < n && st->count < st->k; j++)
        offer(st, p[j], j);
    for (float t = st->threshold; j < n; j++)
        if (p[j] >= t) {
            offer(st, p[j], j);
            t = st->threshold;
        }
}

TO_TARGET_AVX2 static void select_avx2(heap_t *st, const float *p, int64_t n) {
    int64_t j = 0;
    for (; j < n && st->count < st->k; j++)
        offer(st, p[j], j);
    float thr = st->threshold;
    __m256 t = _mm256_set1_ps(thr);
    for (; j + 32 <= n; j += 32) {
        unsigned m0 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), t, _CMP_GE_OQ));
        unsigned m1 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 8), t, _CMP_GE_OQ));
        unsigned m2 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 16), t, _CMP_GE_OQ));
        unsigned m3 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 24), t, _CMP_GE_OQ));
        uint32_t mask = m0 | m1 << 8 | m2 << 16 | m3 << 24;
        if (!mask)
            continue;
        do {
            int l = __builtin_ctz(mask);
            mask &= mask - 1;
            if (p[j + l] >= thr) {
                offer(st, p[j + l], j + l);
                thr = st->threshold;
            }
        } while (mask);
        t = _mm256_set1_ps(thr);
    }
    for (; j < n; j++)
        if (p[j] >= thr) {
            offer(st, p[j], j);
            thr = st->threshold;
        }
}

/* Parameters of one sampled row. */
typedef struct {
    float m, inv_t, top_p, typical, u, thr_w; /* thr_w: keep w <= thr_w (min_p) */
    int64_t lk;                               /* top_k prefix length before its ties, 1..V */
} row_params;

/* What a sampled row keeps: the tokens whose keys lie in [lo, hi] (a segment of the order). */
typedef struct {
    uint64_t lo, hi;
} kept_t;

/* ============================================================== typical_p */

/* A kept token for typical_p: s = w, then |w - c|; its mass and key. */
typedef struct {
    double s;
    uint64_t q, key;
} pair_t;

typedef struct {
    uint64_t lo, hi;        /* the band's keys */
    uint64_t mass, before;  /* its mass, and the mass of the kept tokens before it */
} band_t;

static inline void swap_pairs(pair_t *a, pair_t *b) {
    pair_t t = *a;
    *a = *b;
    *b = t;
}

static inline double median3(double a, double b, double c) {
    return a < b ? (b < c ? b : a < c ? c : a) : (a < c ? a : b < c ? c : b);
}

/* The smallest s of a[0 .. n) such that the pairs with s' <= s hold mass >= target (compared in
 * double): a weighted quickselect (three-way partitions around a median of three); reorders a.
 * +inf when even all of them do not reach it. */
static double weighted_quantile(pair_t *a, int64_t n, double target) {
    uint64_t acc = 0; /* mass of the pairs known to lie below a[lo .. hi) */
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        double piv = median3(a[lo].s, a[lo + (hi - lo) / 2].s, a[hi - 1].s);
        int64_t lt = lo, i = lo, gt = hi;
        uint64_t ml = 0, me = 0;
        while (i < gt) {
            if (a[i].s < piv) {
                ml += a[i].q;
                swap_pairs(&a[lt++], &a[i++]);
            } else if (a[i].s > piv) {
                swap_pairs(&a[i], &a[--gt]);
            } else {
                me += a[i].q;
                i++;
            }
        }
        if ((double)(acc + ml) >= target) {
            hi = lt;
        } else if ((double)(acc + ml + me) >= target) {
            return piv;
        } else {
            acc += ml + me;
            lo = gt;
        }
    }
    return INFINITY;
}

/* c = the mean of w under the masses q: sum q * round(w * 2^24) / sum q, the sums exact (128-bit
 * integers), so c does not depend on their order (csrc/cuda/sample.cu computes the same value).
 * Tokens without mass have w <= 87 or none: their terms are 0. */
static double typical_center(const pair_t *a, int64_t n) {
    unsigned __int128 s1 = 0;
    uint64_t z = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!a[i].q)
            continue;
        z += a[i].q;
        s1 += (unsigned __int128)a[i].q * (uint64_t)nearbyint(a[i].s * 0x1p24);
    }
    double num = (double)(uint64_t)(s1 >> 64) * 0x1p64 + (double)(uint64_t)s1;
    return num * 0x1p-24 / (double)z;
}

/* The typical band of the kept tokens a[0 .. n) (s = w on entry; reordered): see the top. */
static band_t typical_band(pair_t *a, int64_t n, float typical) {
    double c = typical_center(a, n);
    uint64_t z = 0;
    for (int64_t i = 0; i < n; i++) {
        a[i].s = fabs(a[i].s - c);
        z += a[i].q;
    }
    double s = weighted_quantile(a, n, (double)typical * (double)z);
    band_t b = {UINT64_MAX, 0, 0, 0};
    for (int64_t i = 0; i < n; i++)
        if (a[i].s <= s) {
            b.mass += a[i].q;
            b.lo = a[i].key < b.lo ? a[i].key : b.lo;
            b.hi = a[i].key > b.hi ? a[i].key : b.hi;
        }
    for (int64_t i = 0; i < n; i++)
        if (a[i].key > b.hi)
            b.before += a[i].q;
    return b;
}

/* ============================================================== the heap path */

static int64_t sample_heap(const float *xs, int64_t n, const row_params *rp, uint64_t *heap, float *e,
                           pair_t *pairs, int simd, kept_t *kept) {
    int64_t k = rp->lk;
    heap_t st = {heap, k, 0, INFINITY, 0};
    if (simd >= TO_SIMD_AVX2)
        select_avx2(&st, xs, n);
    else
        select_scalar(&st, xs, n);
    for (int64_t j = k - 1; j > 0; j--) { /* heap sort: best first */
        uint64_t t = heap[0];
        heap[0] = heap[j];
        heap[j] = t;
        heap_sift_down(heap, j, 0);
    }
    if (st.ties) { /* the tokens tied with the k-th come after it, by index */
        int64_t i = key_index(heap[k - 1]);
        const float vk = xs[i];
        for (int64_t left = st.ties; left > 0; left--) {
            i = find_value(xs, i + 1, n, vk, simd);
            if (i >= n) /* not reached: the count is exact */
                break;
            heap[k++] = make_key(vk, i);
        }
    }
    uint64_t sk = 0;
    int64_t lm = 0;
    for (int64_t j = 0; j < k; j++) {
        float w = (rp->m - xs[key_index(heap[j])]) * rp->inv_t;
        e[j] = exp_neg_scalar(w);
        sk += mass_q(e[j]);
        lm += w <= rp->thr_w;
    }
    int64_t l = k < lm ? k : lm;
    if (rp->top_p < 1.0f) {
        double target = (double)rp->top_p * (double)sk;
        uint64_t c = 0;
        for (int64_t j = 0; j < l; j++) {
            c += mass_q(e[j]);
            if ((double)c >= target) {
                l = j + 1;
                break;
            }
        }
    }
    kept->lo = heap[l - 1];
    kept->hi = UINT64_MAX;
    uint64_t total = 0;
    if (rp->typical < 1.0f) {
        for (int64_t j = 0; j < l; j++) {
            pairs[j].s = (rp->m - xs[key_index(heap[j])]) * rp->inv_t;
            pairs[j].q = mass_q(e[j]);
            pairs[j].key = heap[j];
        }
        band_t b = typical_band(pairs, l, rp->typical);
        kept->lo = b.lo;
        kept->hi = b.hi;
        total = b.mass;
    } else {
        for (int64_t j = 0; j < l; j++)
            total += mass_q(e[j]);
    }
    double target = (double)rp->u * (double)total;
    uint64_t c = 0;
    for (int64_t j = 0; j < l; j++) {
        if (heap[j] < kept->lo || heap[j] > kept->hi)
            continue;
        c += mass_q(e[j]);
        if ((double)c > target)
            return key_index(heap[j]);
    }
    return key_index(kept->lo); /* not reached: c = total > target at the last kept token */
}

/* ============================================================== the general path: buckets */

typedef struct {
    const float *xs, *e;
    const uint16_t *bid;
    uint64_t *keys; /* the loaded bucket's keys, best first */
    int64_t n, loaded, nloaded;
    float mins; /* the row's smallest logit */
    int simd;
    int64_t *cnt;   /* [NB] */
    uint64_t *mass; /* [NB] */
    uint64_t total;
} gen_t;

/* w, e and bucket of xs[i0 .. i0 + n), counts and masses added; returns how many have w <= thr_w. */
static int64_t hist_scalar(gen_t *g, float *e, uint16_t *bid, const row_params *rp, float scale, int64_t i0, int64_t n) {
    int64_t lm = 0;
    for (int64_t i = i0; i < i0 + n; i++) {
        float w = (rp->m - g->xs[i]) * rp->inv_t, bw = w * scale;
        int b = bw < (float)(NB - 1) ? (int)bw : NB - 1;
        e[i] = exp_neg_scalar(w);
        bid[i] = (uint16_t)b;
        g->cnt[b]++;
        g->mass[b] += mass_q(e[i]);
        lm += w <= rp->thr_w;
    }
    return lm;
}

TO_TARGET_AVX2 static int64_t hist_avx2(gen_t *g, float *e, uint16_t *bid, const row_params *rp, float scale) {
    const __m256 vm = _mm256_set1_ps(rp->m), vt = _mm256_set1_ps(rp->inv_t), vs = _mm256_set1_ps(scale);
    const __m256 vtop = _mm256_set1_ps((float)(NB - 1)), vthr = _mm256_set1_ps(rp->thr_w);
    int32_t b32[256];
    int64_t lm = 0, n = g->n, i0 = 0;
    for (; i0 + 256 <= n; i0 += 256) {
        for (int j = 0; j < 256; j += 8) {
            __m256 w = _mm256_mul_ps(_mm256_sub_ps(vm, _mm256_loadu_ps(g->xs + i0 + j)), vt);
            _mm256_storeu_ps(e + i0 + j, exp_neg_avx2(w));
            __m256i b = _mm256_cvttps_epi32(_mm256_min_ps(_mm256_mul_ps(w, vs), vtop));
            _mm256_storeu_si256((__m256i *)(b32 + j), b);
            lm += __builtin_popcount((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(w, vthr, _CMP_LE_OQ)));
        }
        for (int j = 0; j < 256; j++) {
            int b = b32[j];
            bid[i0 + j] = (uint16_t)b;
            g->cnt[b]++;
            g->mass[b] += mass_q(e[i0 + j]);
        }
    }
    return lm + hist_scalar(g, e, bid, rp, scale, i0, n - i0);
}

/* The tokens of bucket b into g->keys, best first. */
static void load_scalar(gen_t *g, int b) {
    int64_t m = 0;
    for (int64_t i = 0; i < g->n; i++)
        if (g->bid[i] == b)
            g->keys[m++] = make_key(g->xs[i], i);
    g->nloaded = m;
}

TO_TARGET_AVX2 static void load_avx2(gen_t *g, int b) {
    const __m256i vb = _mm256_set1_epi16((short)b);
    int64_t m = 0, i = 0;
    for (; i + 16 <= g->n; i += 16) {
        unsigned mask = (unsigned)_mm256_movemask_epi8(
            _mm256_cmpeq_epi16(_mm256_loadu_si256((const __m256i *)(g->bid + i)), vb));
        while (mask) {
            int l = __builtin_ctz(mask) / 2;
            mask &= ~(3u << (2 * l));
            g->keys[m++] = make_key(g->xs[i + l], i + l);
        }
    }
    for (; i < g->n; i++)
        if (g->bid[i] == b)
            g->keys[m++] = make_key(g->xs[i], i);
    g->nloaded = m;
}

static void load_bucket(gen_t *g, int b) {
    if (g->loaded == b)
        return;
    if (g->simd >= TO_SIMD_AVX2)
        load_avx2(g, b);
    else
        load_scalar(g, b);
    qsort(g->keys, (size_t)g->nloaded, sizeof(uint64_t), cmp_desc);
    g->loaded = b;
}

static inline uint64_t key_mass(const gen_t *g, uint64_t key) { return mass_q(g->e[key_index(key)]); }

/* The bucket holding position `pos` of the order (1 <= pos <= V), loaded; *c, *s = the count and
 * mass of the buckets before it. */
static int bucket_of(gen_t *g, int64_t pos, int64_t *c, uint64_t *s) {
    *c = 0;
    *s = 0;
    for (int b = 0; b < NB; b++) {
        if (*c + g->cnt[b] >= pos) {
            load_bucket(g, b);
            return b;
        }
        *c += g->cnt[b];
        *s += g->mass[b];
    }
    return -1; /* not reached: the counts add up to V */
}

/* The mass of the first n tokens of the order (1 <= n <= V). */
static uint64_t mass_of_prefix(gen_t *g, int64_t n) {
    if (n == g->n)
        return g->total;
    int64_t c;
    uint64_t s;
    bucket_of(g, n, &c, &s);
    for (int64_t j = 0; j < n - c; j++)
        s += key_mass(g, g->keys[j]);
    return s;
}

/* The key at position pos of the order (1 <= pos <= V). */
static uint64_t key_at(gen_t *g, int64_t pos) {
    int64_t c;
    uint64_t s;
    bucket_of(g, pos, &c, &s);
    return g->keys[pos - c - 1];
}

/* top_k's prefix length lk extended over the tokens tied with the lk-th (1 <= lk < V); *mass = the
 * mass of the extended prefix. Ties share w, hence the bucket. */
static int64_t prefix_with_ties(gen_t *g, int64_t lk, uint64_t *mass) {
    int64_t c;
    uint64_t s;
    bucket_of(g, lk, &c, &s);
    int64_t j = lk - c - 1;
    float v = g->xs[key_index(g->keys[j])];
    for (int64_t t = 0; t <= j; t++)
        s += key_mass(g, g->keys[t]);
    while (j + 1 < g->nloaded && g->xs[key_index(g->keys[j + 1])] == v)
        s += key_mass(g, g->keys[++j]);
    *mass = s;
    return c + j + 1;
}

/* Whether running mass s reaches the goal: s - base >= target (strict: >), compared in double. */
static inline int reaches(uint64_t s, uint64_t base, double target, int strict) {
    return s >= base && (strict ? (double)(s - base) > target : (double)(s - base) >= target);
}

/* The first position j (1-based) whose inclusive mass s reaches the goal; *index = its token.
 * The goal must be reached by the total. */
static int64_t first_reaching(gen_t *g, uint64_t base, double target, int strict, int64_t *index) {
    int64_t c = 0;
    uint64_t s = 0;
    for (int b = 0; b < NB; b++) {
        uint64_t next = s + g->mass[b];
        if (reaches(next, base, target, strict)) {
            load_bucket(g, b);
            for (int64_t j = 0; j < g->nloaded; j++) {
                s += key_mass(g, g->keys[j]);
                if (reaches(s, base, target, strict)) {
                    *index = key_index(g->keys[j]);
                    return c + j + 1;
                }
            }
            break; /* not reached: the bucket's masses add up to next */
        }
        c += g->cnt[b];
        s = next;
    }
    *index = g->n - 1;
    return g->n;
}

static int64_t sample_general(gen_t *g, float *e, uint16_t *bid, const row_params *rp, pair_t *pairs,
                              kept_t *kept, int want_kept) {
    memset(g->cnt, 0, NB * sizeof(int64_t));
    memset(g->mass, 0, NB * sizeof(uint64_t));
    g->e = e;
    g->bid = bid;
    g->loaded = -1;
    /* spread w's range (up to W_MAX, beyond which e = 0) over the buckets */
    float wmax = (rp->m - g->mins) * rp->inv_t;
    float scale = wmax > 0 ? (float)NB / (wmax < W_MAX ? wmax : W_MAX) : 1.0f;
    int64_t lm = g->simd >= TO_SIMD_AVX2 ? hist_avx2(g, e, bid, rp, scale)
                                         : hist_scalar(g, e, bid, rp, scale, 0, g->n);
    g->total = 0;
    for (int b = 0; b < NB; b++)
        g->total += g->mass[b];
    int64_t idx, lk = rp->lk;
    uint64_t sk = g->total;
    if (lk < g->n && (rp->top_p < 1.0f || lk < lm)) /* else min_p cuts first: top_k's ties do not matter */
        lk = prefix_with_ties(g, lk, &sk);
    int64_t l = lk < lm ? lk : lm;
    if (rp->top_p < 1.0f) {
        int64_t lp = first_reaching(g, 0, (double)rp->top_p * (double)sk, 0, &idx);
        l = lp < l ? lp : l;
    }
    kept->hi = UINT64_MAX;
    kept->lo = want_kept || rp->typical < 1.0f ? key_at(g, l) : 0;
    if (rp->typical < 1.0f) {
        int64_t np = 0;
        for (int64_t i = 0; i < g->n; i++) {
            uint64_t key = make_key(g->xs[i], i);
            if (key >= kept->lo) {
                pairs[np].s = (rp->m - g->xs[i]) * rp->inv_t;
                pairs[np].q = mass_q(e[i]);
                pairs[np++].key = key;
            }
        }
        band_t b = typical_band(pairs, np, rp->typical);
        kept->lo = b.lo;
        kept->hi = b.hi;
        first_reaching(g, b.before, (double)rp->u * (double)b.mass, 1, &idx);
        return idx;
    }
    uint64_t total = mass_of_prefix(g, l);
    first_reaching(g, 0, (double)rp->u * (double)total, 1, &idx);
    return idx;
}

/* ============================================================== processors */

/* Row r's processors (q) on x, a copy of its logits; cnt: V counters of any content. */
static void apply_processors(float *x, const to_sample_params *p, const to_sample_proc *q, uint32_t *cnt) {
    for (int64_t j = q->bias0; j < q->bias0 + q->nbias; j++)
        x[to_sample_i32(p->bias_ids, j, 0)] += to_sample_f32(p->bias_values, j, 0.0f);
    const to_tensor *h = p->history;
    const int64_t h0 = q->hist0, h1 = q->hist0 + q->nhist, g0 = q->hist0 + q->nprompt;
    if (q->rep != 1.0f) { /* each distinct token of the history once */
        for (int64_t t = h0; t < h1; t++)
            cnt[to_sample_i32(h, t, 0)] = 0;
        for (int64_t t = h0; t < h1; t++) {
            int32_t id = to_sample_i32(h, t, 0);
            if (!cnt[id]) {
                cnt[id] = 1;
                x[id] = x[id] < 0 ? x[id] * q->rep : x[id] / q->rep;
            }
        }
    }
    if (q->presence != 0.0f || q->frequency != 0.0f) { /* distinct generated tokens, with counts */
        for (int64_t t = g0; t < h1; t++)
            cnt[to_sample_i32(h, t, 0)] = 0;
        for (int64_t t = g0; t < h1; t++)
            cnt[to_sample_i32(h, t, 0)]++;
        for (int64_t t = g0; t < h1; t++) {
            int32_t id = to_sample_i32(h, t, 0);
            if (cnt[id]) {
                x[id] -= q->frequency * (float)cnt[id] + q->presence;
                cnt[id] = 0;
            }
        }
    }
    const int64_t ng = q->ngram;
    if (ng > 0 && q->nhist >= ng) { /* windows whose first ng - 1 tokens are the last ng - 1 */
        const int64_t suffix = h1 - (ng - 1);
        for (int64_t i = h0; i + ng <= h1; i++) {
            int64_t t = 0;
            while (t < ng - 1 && to_sample_i32(h, i + t, 0) == to_sample_i32(h, suffix + t, 0))
                t++;
            if (t == ng - 1)
                x[to_sample_i32(h, i + ng - 1, 0)] = -INFINITY;
        }
    }
}

/* ============================================================== logprobs */

/* log(sum over the row of exp(x - m)), m the row's max. */
static double log_sum_exp_scalar(const float *xs, int64_t n, float m) {
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += exp_neg_scalar(m - xs[i]);
    return log(s);
}

TO_TARGET_AVX2 static double log_sum_exp_avx2(const float *xs, int64_t n, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256d acc = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) { /* 8 terms per lane in f32, then into double */
        __m256 s = _mm256_setzero_ps();
        for (int j = 0; j < 64; j += 8)
            s = _mm256_add_ps(s, exp_neg_avx2(_mm256_sub_ps(vm, _mm256_loadu_ps(xs + i + j))));
        acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_castps256_ps128(s)));
        acc = _mm256_add_pd(acc, _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, acc);
    double s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (; i < n; i++)
        s += exp_neg_scalar(m - xs[i]);
    return log(s);
}

/* ============================================================== rows */

struct sample_job {
    const to_sample_plan *pl;
    int simd;
    atomic_llong bad; /* lowest bad row * 8 + what (TO_SAMPLE_BAD_*); LLONG_MAX when none */
    atomic_int oom;
};

static void note_bad(struct sample_job *job, int64_t r, int kind) {
    long long v = (long long)r * 8 + kind, cur = atomic_load(&job->bad);
    while (v < cur && !atomic_compare_exchange_weak(&job->bad, &cur, v))
        ;
}

static int bad_kind(const stats_t *s) {
    return s->nan ? TO_SAMPLE_BAD_NAN : s->max == INFINITY ? TO_SAMPLE_BAD_POSINF
           : s->max == -INFINITY ? TO_SAMPLE_BAD_ALL_NEGINF : 0;
}

/* Row r as f32: in place for unit-stride f32, else converted into buf. */
static const float *row_f32(const to_tensor *x, int64_t r, float *buf) {
    const char *row = to_elem_ptr(x->data, x->dtype, r * x->strides[0]);
    if (x->dtype == TO_F32 && x->strides[1] == 1)
        return (const float *)row;
    to_load_f32(buf, row, x->dtype, x->shape[1], x->strides[1]);
    return buf;
}

/* min_p's bound on w: the largest float f with f <= -ln(min_p) (+inf when off) */
static float min_p_bound(float min_p) {
    if (!(min_p > 0))
        return INFINITY;
    double d = -log((double)min_p);
    float f = (float)d;
    return (double)f > d ? nextafterf(f, 0.0f) : f;
}

/* processed[r] = what the row keeps, scaled; the processed logits for a greedy row (t <= 0). */
static void write_processed(const to_tensor *pr, int64_t r, const float *xs, int64_t n, const kept_t *kept, float t) {
    float *dst = (float *)pr->data + r * pr->strides[0];
    const int64_t sd = pr->strides[1];
    if (t <= 0) {
        for (int64_t i = 0; i < n; i++)
            dst[i * sd] = xs[i];
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        uint64_t key = make_key(xs[i], i);
        dst[i * sd] = key >= kept->lo && key <= kept->hi ? xs[i] / t : -INFINITY;
    }
}

static void sample_rows(void *arg, int64_t begin, int64_t end) {
    struct sample_job *job = arg;
    const to_sample_plan *pl = job->pl;
    const to_sample_params *p = &pl->p;
    const to_tensor *x = pl->logits;
    const int64_t n = pl->vocab;
    const size_t cnt_at = ((size_t)n * sizeof(uint16_t) + 63) & ~(size_t)63;
    const size_t keys_bytes = (size_t)n * sizeof(uint64_t) + NB * (sizeof(int64_t) + sizeof(uint64_t));
    float *ebuf = to_scratch(0, (size_t)n * sizeof(float));
    char *small = to_scratch(1, cnt_at + (pl->any_proc ? (size_t)n * sizeof(uint32_t) : 0));
    float *xbuf = to_scratch(2, (size_t)n * sizeof(float) * (pl->any_proc ? 2 : 1));
    char *big = to_scratch(3, keys_bytes + (pl->any_typical ? (size_t)n * sizeof(pair_t) : 0));
    if (!ebuf || !small || !xbuf || !big) {
        atomic_store(&job->oom, 1);
        return;
    }
    uint16_t *bid = (uint16_t *)small;
    uint32_t *cnt = (uint32_t *)(small + cnt_at);
    float *pbuf = xbuf + n;
    pair_t *pairs = (pair_t *)(big + keys_bytes);
    gen_t g = {0};
    g.n = n;
    g.simd = job->simd;
    g.cnt = (int64_t *)big;
    g.mass = (uint64_t *)(big + NB * sizeof(int64_t));
    g.keys = (uint64_t *)(big + NB * (sizeof(int64_t) + sizeof(uint64_t)));
    for (int64_t r = begin; r < end; r++) {
        const float *raw = row_f32(x, r, xbuf), *xs = raw;
        stats_t s;
        row_stats(raw, n, job->simd, &s);
        int bad = bad_kind(&s);
        if (bad) {
            note_bad(job, r, bad);
            continue;
        }
        const float raw_max = s.max;
        double lse = 0; /* log(sum exp(raw - raw_max)) */
        if (pl->logprobs || pl->ntop)
            lse = job->simd >= TO_SIMD_AVX2 ? log_sum_exp_avx2(raw, n, raw_max) : log_sum_exp_scalar(raw, n, raw_max);
        to_sample_proc q = to_sample_row_proc(p, r);
        if (pl->any_proc && to_sample_proc_active(&q)) {
            memcpy(pbuf, raw, (size_t)n * sizeof(float));
            apply_processors(pbuf, p, &q, cnt);
            xs = pbuf;
            row_stats(xs, n, job->simd, &s);
            bad = bad_kind(&s);
            if (bad) {
                note_bad(job, r, bad + 3);
                continue;
            }
        }
        int64_t token = 0;
        kept_t kept = {0, UINT64_MAX};
        float t = to_sample_f32(p->temperature, r, 0);
        if (t <= 0) {
            token = find_value(xs, 0, n, s.max, job->simd);
        } else {
            row_params rp;
            rp.m = s.max;
            rp.inv_t = 1.0f / t;
            rp.top_p = to_sample_f32(p->top_p, r, 1);
            rp.typical = to_sample_f32(p->typical_p, r, 1);
            rp.u = to_sample_f32(p->uniform, r, 0);
            rp.thr_w = min_p_bound(to_sample_f32(p->min_p, r, 0));
            int32_t k = to_sample_i32(p->top_k, r, 0);
            rp.lk = k <= 0 || k >= n ? n : k;
            if (rp.lk < n && rp.lk <= HEAP_MAX_K) {
                token = sample_heap(xs, n, &rp, g.keys, ebuf, pairs, job->simd, &kept);
            } else {
                g.xs = xs;
                g.mins = s.min;
                token = sample_general(&g, ebuf, bid, &rp, pairs, &kept, pl->processed != NULL);
            }
        }
        if (pl->processed)
            write_processed(pl->processed, r, xs, n, &kept, t);
        ((int64_t *)pl->out->data)[r * pl->out->strides[0]] = token;
        if (pl->logprobs)
            ((float *)pl->logprobs->data)[r * pl->logprobs->strides[0]] =
                (float)((double)raw[token] - (double)raw_max - lse);
        for (int64_t j = 0; j < pl->ntop; j++) { /* the raw top values, made logprobs */
            const to_tensor *tl = pl->top_logprobs;
            float *v = (float *)tl->data + r * tl->strides[0] + j * tl->strides[1];
            *v = (float)((double)*v - (double)raw_max - lse);
        }
    }
}

int to_cpu_sample(const to_sample_plan *pl) {
    int64_t rows = pl->rows, n = pl->vocab;
    if (rows == 0)
        return TO_OK;
    if (pl->ntop) /* the raw values first: the rows turn them into logprobs */
        TO_TRY(to_cpu_topk(pl->top_logprobs, pl->top_ids, pl->logits, pl->ntop));
    struct sample_job job = {pl, to_simd(), LLONG_MAX, 0};
    to_parallel_for(rows, n >= 32768 ? 1 : 32768 / n, sample_rows, &job);
    if (atomic_load(&job.oom))
        return to_fail(TO_ERR_OUT_OF_MEMORY, "%s: no memory for rows of %lld logits", pl->op, (long long)n);
    long long bad = atomic_load(&job.bad);
    if (bad != LLONG_MAX)
        return to_sample_bad_row(pl->op, bad / 8, (int)(bad % 8), "");
    return TO_OK;
}
