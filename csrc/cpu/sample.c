/* sample.c - one token per row of logits: greedy, or temperature / top-k / top-p / min-p and an
 * inverse-CDF draw with a caller-supplied uniform.
 *
 * Arithmetic (what "p" and "mass" are, exactly):
 *  - The row is read as f32 (exact from f16/bf16). m = its max. A token's scaled distance from
 *    the max is w = (m - x) * (1 / temperature) in f32 (>= 0; +inf for a -inf logit), and its
 *    unnormalised probability e = exp(-w) in f32 (1 for the max; taken as 0 when w > 87, i.e.
 *    p < 1.6e-38 * max p). Normalising is never needed: every rule compares ratios.
 *  - The order: decreasing logit, lower index first on ties. This is the order of decreasing p
 *    in exact arithmetic; ordering by the logit (exact input) rather than by the rounded p keeps
 *    the order free of ties that rounding would invent.
 *  - Masses are summed as integers: q = trunc(e * 2^45), so every partial sum is exact and the
 *    same in any order (a token with p < 2^-45 * max p has no mass and is never drawn).
 *  - Kept prefix length L = min(L_k, L_p, L_m): L_k = top_k (or V); L_p = the first position
 *    whose inclusive mass >= top_p * mass(L_k) (compared in double; V when top_p >= 1); L_m =
 *    the number of tokens with w <= -ln(min_p) (V when min_p = 0). Every one of these is a
 *    prefix of the order because w grows along it.
 *  - The draw: the first position whose inclusive mass > uniform * mass(L) (in double).
 *
 * Finding positions without a full sort:
 *  - top_k <= 2048 (and < V): a min-heap of the k best (logit, index) keys filled by a vector
 *    threshold scan, as in reduce.c's top-k, then sorted: about one streaming pass.
 *  - otherwise: one pass computes w, e and a bucket b = min(trunc(w * scale), 2047) per token
 *    (scale spreads w's range over the buckets; buckets grow along the order) and per-bucket
 *    counts and masses. Each position query walks the bucket totals to the bucket holding the
 *    answer, gathers that bucket's tokens (a vector scan of the stored bucket ids) and sorts
 *    only them. Random-normal logits put a few hundred tokens in a bucket; a pathological row
 *    (e.g. all logits equal) puts all of them in one and costs one sort of the row.
 *
 * Greedy rows (temperature <= 0): the first index of the max.
 * Rows are independent and each is done by one thread, start to end: results never depend on
 * the thread count. The scalar and AVX2 paths compute e with one polynomial, bit for bit. */
#include "cpu/sample.h"
#include "cpu/heap.h"

#include <immintrin.h>
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

/* 64-bit keys ordered like the ranking (larger logit first, then lower index), as in reduce.c;
 * the logits hold no NaN here. */
static inline uint32_t order_key(float v) {
    union { float f; uint32_t u; } b = {v};
    if (b.u == 0x80000000u) /* -0.0 ties with +0.0 */
        b.u = 0;
    return (b.u & 0x80000000u) ? ~b.u : b.u | 0x80000000u;
}
static inline uint64_t make_key(float v, int64_t i) { return (uint64_t)order_key(v) << 32 | (uint32_t)~(uint32_t)i; }
static inline int64_t key_index(uint64_t key) { return (int64_t)(uint32_t)~(uint32_t)key; }

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

/* ============================================================== top_k <= HEAP_MAX_K: a heap */

typedef struct {
    uint64_t *heap;
    int64_t k, count;
    float threshold; /* logit of the root once full: only a larger one can enter */
} heap_t;

static inline void offer(heap_t *st, float v, int64_t i) {
    uint64_t key = make_key(v, i);
    if (st->count < st->k) {
        st->heap[st->count] = key;
        heap_sift_up(st->heap, st->count++);
    } else if (key > st->heap[0]) {
        st->heap[0] = key;
        heap_sift_down(st->heap, st->k, 0);
    } else {
        return;
    }
    if (st->count == st->k) {
        union { uint32_t u; float f; } b;
        uint32_t k = (uint32_t)(st->heap[0] >> 32);
        b.u = (k & 0x80000000u) ? k & 0x7fffffffu : ~k;
        st->threshold = b.f;
    }
}

/* Values arrive in increasing index order: with a full heap only v > threshold can enter. */
static void select_scalar(heap_t *st, const float *p, int64_t n) {
    int64_t j = 0;
    for (; j < n && st->count < st->k; j++)
        offer(st, p[j], j);
    for (float t = st->threshold; j < n; j++)
        if (p[j] > t) {
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
        unsigned m0 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), t, _CMP_GT_OQ));
        unsigned m1 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 8), t, _CMP_GT_OQ));
        unsigned m2 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 16), t, _CMP_GT_OQ));
        unsigned m3 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 24), t, _CMP_GT_OQ));
        uint32_t mask = m0 | m1 << 8 | m2 << 16 | m3 << 24;
        if (!mask)
            continue;
        do {
            int l = __builtin_ctz(mask);
            mask &= mask - 1;
            if (p[j + l] > thr) {
                offer(st, p[j + l], j + l);
                thr = st->threshold;
            }
        } while (mask);
        t = _mm256_set1_ps(thr);
    }
    for (; j < n; j++)
        if (p[j] > thr) {
            offer(st, p[j], j);
            thr = st->threshold;
        }
}

/* Parameters of one sampled row. */
typedef struct {
    float m, inv_t, top_p, u, thr_w; /* thr_w: keep w <= thr_w (min_p) */
    int64_t lk;                      /* top_k prefix length, 1..V */
} row_params;

static int64_t sample_heap(const float *xs, int64_t n, const row_params *rp, uint64_t *heap, float *e, int simd) {
    int64_t k = rp->lk;
    heap_t st = {heap, k, 0, INFINITY};
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
    uint64_t kept = 0;
    for (int64_t j = 0; j < l; j++)
        kept += mass_q(e[j]);
    double target = (double)rp->u * (double)kept;
    uint64_t c = 0;
    for (int64_t j = 0; j < l; j++) {
        c += mass_q(e[j]);
        if ((double)c > target)
            return key_index(heap[j]);
    }
    return key_index(heap[l - 1]); /* not reached: c = kept > target at j = l - 1 */
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

/* e^-w for w >= 0 (Cephes' expf polynomial); 0 for w > W_MAX, +inf included. */
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

/* The mass of the first n tokens of the order (1 <= n <= V). */
static uint64_t mass_of_prefix(gen_t *g, int64_t n) {
    if (n == g->n)
        return g->total;
    int64_t c = 0;
    uint64_t s = 0;
    for (int b = 0; b < NB; b++) {
        if (c + g->cnt[b] >= n) {
            load_bucket(g, b);
            for (int64_t j = 0; j < n - c; j++)
                s += key_mass(g, g->keys[j]);
            return s;
        }
        c += g->cnt[b];
        s += g->mass[b];
    }
    return s;
}

/* The first position j (1-based) whose inclusive mass s has s >= target (strict: s > target);
 * *index = its token. target must be below the total (or equal, not strict). */
static int64_t first_reaching(gen_t *g, double target, int strict, int64_t *index) {
    int64_t c = 0;
    uint64_t s = 0;
    for (int b = 0; b < NB; b++) {
        uint64_t next = s + g->mass[b];
        if (strict ? (double)next > target : (double)next >= target) {
            load_bucket(g, b);
            for (int64_t j = 0; j < g->nloaded; j++) {
                s += key_mass(g, g->keys[j]);
                if (strict ? (double)s > target : (double)s >= target) {
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

static int64_t sample_general(gen_t *g, float *e, uint16_t *bid, const row_params *rp) {
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
    int64_t idx, l = rp->lk < lm ? rp->lk : lm;
    if (rp->top_p < 1.0f) {
        uint64_t sk = mass_of_prefix(g, rp->lk);
        int64_t lp = first_reaching(g, (double)rp->top_p * (double)sk, 0, &idx);
        l = lp < l ? lp : l;
    }
    uint64_t kept = mass_of_prefix(g, l);
    first_reaching(g, (double)rp->u * (double)kept, 1, &idx);
    return idx;
}

/* ============================================================== rows */

struct sample_job {
    const to_tensor *out, *logits, *temperature, *top_k, *top_p, *min_p, *uniform;
    int simd;
    atomic_llong bad_row; /* lowest row with bad logits (rows when none) */
    atomic_int oom;
};

static void note_bad(struct sample_job *job, int64_t r) {
    long long cur = atomic_load(&job->bad_row);
    while (r < cur && !atomic_compare_exchange_weak(&job->bad_row, &cur, r))
        ;
}

static float f32_at(const to_tensor *t, int64_t r) { return ((const float *)t->data)[r * t->strides[0]]; }

/* Row r as f32: in place for unit-stride f32, else converted into buf. */
static const float *row_f32(const to_tensor *x, int64_t r, float *buf) {
    const char *row = to_elem_ptr(x->data, x->dtype, r * x->strides[0]);
    if (x->dtype == TO_F32 && x->strides[1] == 1)
        return (const float *)row;
    to_load_f32(buf, row, x->dtype, x->shape[1], x->strides[1]);
    return buf;
}

static void sample_rows(void *arg, int64_t begin, int64_t end) {
    struct sample_job *job = arg;
    const to_tensor *x = job->logits;
    int64_t n = x->shape[1];
    float *ebuf = to_scratch(0, (size_t)n * sizeof(float));
    uint16_t *bid = to_scratch(1, (size_t)n * sizeof(uint16_t));
    float *xbuf = to_scratch(2, (size_t)n * sizeof(float));
    char *big = to_scratch(3, (size_t)n * sizeof(uint64_t) + NB * (sizeof(int64_t) + sizeof(uint64_t)));
    if (!ebuf || !bid || !xbuf || !big) {
        atomic_store(&job->oom, 1);
        return;
    }
    gen_t g = {0};
    g.n = n;
    g.simd = job->simd;
    g.cnt = (int64_t *)big;
    g.mass = (uint64_t *)(big + NB * sizeof(int64_t));
    g.keys = (uint64_t *)(big + NB * (sizeof(int64_t) + sizeof(uint64_t)));
    for (int64_t r = begin; r < end; r++) {
        const float *xs = row_f32(x, r, xbuf);
        stats_t s;
        if (job->simd >= TO_SIMD_AVX2)
            stats_avx2(xs, n, &s);
        else
            stats_scalar(xs, n, &s);
        if (s.nan || s.max == INFINITY || s.max == -INFINITY) {
            note_bad(job, r);
            continue;
        }
        int64_t token = 0;
        float t = f32_at(job->temperature, r);
        if (t <= 0) {
            while (xs[token] != s.max)
                token++;
        } else {
            row_params rp;
            rp.m = s.max;
            rp.inv_t = 1.0f / t;
            rp.top_p = f32_at(job->top_p, r);
            rp.u = f32_at(job->uniform, r);
            float min_p = f32_at(job->min_p, r);
            rp.thr_w = INFINITY;
            if (min_p > 0) { /* the largest float f with f <= -ln(min_p) */
                double d = -log((double)min_p);
                rp.thr_w = (float)d;
                if ((double)rp.thr_w > d)
                    rp.thr_w = nextafterf(rp.thr_w, 0.0f);
            }
            int32_t k = ((const int32_t *)job->top_k->data)[r * job->top_k->strides[0]];
            rp.lk = k <= 0 || k >= n ? n : k;
            if (rp.lk < n && rp.lk <= HEAP_MAX_K) {
                token = sample_heap(xs, n, &rp, g.keys, ebuf, job->simd);
            } else {
                g.xs = xs;
                g.mins = s.min;
                token = sample_general(&g, ebuf, bid, &rp);
            }
        }
        const to_tensor *out = job->out;
        ((int64_t *)out->data)[r * out->strides[0]] = token;
    }
}

int to_cpu_sample(const to_tensor *out, const to_tensor *logits, const to_tensor *temperature,
                  const to_tensor *top_k, const to_tensor *top_p, const to_tensor *min_p,
                  const to_tensor *uniform) {
    int64_t rows = logits->shape[0], n = logits->shape[1];
    if (rows == 0)
        return TO_OK;
    struct sample_job job = {out, logits, temperature, top_k, top_p, min_p, uniform, to_simd(), rows, 0};
    to_parallel_for(rows, n >= 32768 ? 1 : 32768 / n, sample_rows, &job);
    if (atomic_load(&job.oom))
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_sample: no memory for rows of %lld logits", (long long)n);
    int64_t r = atomic_load(&job.bad_row);
    if (r < rows) {
        float *buf = to_host_alloc((size_t)n * sizeof(float));
        if (!buf)
            return to_fail(TO_ERR_OUT_OF_MEMORY, "to_sample: logits row %lld holds NaN, +inf or only -inf", (long long)r);
        stats_t s;
        stats_scalar(row_f32(logits, r, buf), n, &s);
        to_host_free(buf);
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_sample: logits row %lld %s", (long long)r,
                       s.nan ? "holds NaN" : s.max == INFINITY ? "holds +inf (logits must be finite or -inf)"
                                                              : "is all -inf (no token has a probability)");
    }
    return TO_OK;
}
