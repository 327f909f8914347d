/* attention.c - the paged KV cache: storing new keys/values, and causal attention over it.
 *
 * kv_cache_store copies each token's [Hkv, D] key and value rows into its slot (converting to
 * the cache dtype, rounding to nearest even). Slots are distinct (checked by the caller), so
 * threads split the tokens freely.
 *
 * paged_attention is flash-attention style: one pass over the context per query row, with an
 * online softmax in f32. For each row it keeps the running max m, the running sum l of
 * exp(s - m), and acc = sum exp(s - m) v; when a new key tile raises the max, l and acc are
 * rescaled by exp(m_old - m_new). At the end out = acc / l.
 *
 * Work items are (sequence, kv head, chunk of up to QB queries). An item handles the QB queries
 * times the G = Hq / Hkv query heads that share its kv head: R = QB * G rows. It walks the keys
 * from position 0 to its last query's position in tiles of KT keys; each key and value row of a
 * tile is read from the cache once and used for all R rows (for decode R = G: the GQA group;
 * for prefill many queries too). Rows whose position is below the tile see none of it and are
 * skipped; the causal mask inside a tile sets the weights of keys past a row's position to 0.
 *
 * Determinism: each row's arithmetic is the same sequence of operations whichever item and
 * thread compute it (tiles always start at key 0 and step by KT; a row's dot products and its
 * share of the V accumulation are per-row/per-element, never summed across rows; the way rows
 * and keys are grouped into register blocks does not change what is added to what in which
 * order). So QB may follow the thread count and results still do not.
 *
 * Decode is split by keys instead (flash-decoding): a sequence with at most SPLIT_MAX_Q queries
 * has too few rows per kv head to keep two threads busy, so its context is cut into segments
 * and each segment is one item covering every kv head (walking each cache block in address
 * order). A segment yields an unnormalised (acc, m, l) per row; the item that completes a
 * sequence merges its segments in segment order. The segment length depends on the context
 * length alone (segment_keys), so such a row too is computed the same way whatever the thread
 * count, the other sequences of the batch, or the order in which segments finish.
 *
 * The AVX2 path converts bf16/f16 cache rows to f32 on the fly inside the dot products and the
 * V accumulation, and computes the tile's exponentials 8 at a time (a Cephes-style polynomial,
 * ~2 ulp). The scalar path converts a tile to f32 first and uses expf; the two agree to f32
 * rounding, not bit for bit.
 */
#include "cpu/attention.h"
#include "cpu/embedding.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>

#define KT 32           /* keys per tile: a tile of K and of V (bf16, D = 128) is 8 KB each */
#define ROWS_TARGET 32  /* q rows per work item: every K/V element loaded is used this often */
#define ITEMS_PER_THREAD 4 /* below this many items per thread, chunks get fewer queries */
#define SPLIT_MAX_Q 4   /* sequences with this many queries or fewer are split by keys instead */
#define SEG_MIN 64      /* keys per segment of a split sequence, at least (a multiple of KT) */
#define MAX_SEGS 16     /* segments per split sequence, at most (longer contexts: longer ones) */

/* =========================================================================== kv_cache_store */

struct store_job {
    const to_tensor *kc, *vc, *k, *v, *slots;
};

static void store_tokens(void *arg, int64_t begin, int64_t end) {
    const struct store_job *job = arg;
    const to_tensor *kc = job->kc, *vc = job->vc, *k = job->k, *v = job->v;
    const int64_t Hkv = kc->shape[2], D = kc->shape[3];
    for (int64_t t = begin; t < end; t++) {
        int64_t slot = to_load_index(job->slots->data, job->slots->dtype, t * job->slots->strides[0]);
        if (slot < 0)
            continue; /* padding token */
        for (int64_t h = 0; h < Hkv; h++) {
            int64_t row = (slot * Hkv + h) * D; /* the caches are contiguous */
            to_cpu_copy_row(to_elem_ptr(kc->data, kc->dtype, row), kc->dtype, 1,
                            to_elem_ptr(k->data, k->dtype, t * k->strides[0] + h * k->strides[1]),
                            k->dtype, k->strides[2], D);
            to_cpu_copy_row(to_elem_ptr(vc->data, vc->dtype, row), vc->dtype, 1,
                            to_elem_ptr(v->data, v->dtype, t * v->strides[0] + h * v->strides[1]),
                            v->dtype, v->strides[2], D);
        }
    }
}

int to_cpu_kv_cache_store(const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *k,
                          const to_tensor *v, const to_tensor *slot_mapping) {
    int64_t T = k->shape[0], per_token = k->shape[1] * k->shape[2];
    if (T == 0 || per_token == 0)
        return TO_OK;
    struct store_job job = {k_cache, v_cache, k, v, slot_mapping};
    /* a thread is worth waking for about 64 KB of cache rows */
    int64_t bytes = 2 * per_token * to_dtype_size(k_cache->dtype);
    to_parallel_for(T, bytes >= 65536 ? 1 : 65536 / bytes, store_tokens, &job);
    return TO_OK;
}

/* ========================================================================== paged_attention */

/* Up to QB consecutive queries of one sequence. */
typedef struct {
    int64_t s;    /* sequence */
    int64_t t0;   /* row of q of the first query */
    int64_t nq;   /* queries */
    int64_t pos0; /* cache position of the first query; query i sits at pos0 + i */
} chunk;

/* One segment of keys [k_begin, k_end) of a sequence of up to SPLIT_MAX_Q queries, all kv
 * heads. */
typedef struct {
    int64_t s, t0, nq, pos0; /* as in chunk: the sequence's queries */
    int64_t seg, n_seg;      /* this segment's index, the sequence's segment count */
    int64_t k_begin, k_end;
    float *part;       /* the sequence's partials (n_seg > 1): [n_seg][Hkv * nq * G][D + 2] */
    atomic_int *left;  /* the sequence's segments not yet done (n_seg > 1) */
} split;

typedef struct {
    const to_tensor *out, *q, *bt;
    const char *kc, *vc; /* cache data */
    int dt;              /* cache dtype */
    int64_t Hkv, G, D, bs;
    int64_t row_bytes;   /* one kv head's row of the cache: D elements */
    float scale;
    const chunk *chunks;
    const split *splits;
    int64_t n_chunk_items, n_items, max_rows;
    int avx2;
    int even_odd;      /* q and acc rows in the even/odd layout (AVX2 with a bf16 cache) */
    atomic_llong next; /* next work item to take */
    atomic_int failed; /* a thread could not get its scratch memory */
} attn_job;

/* One item's state and the tile being worked on. Row r is query r / G, head r % G of the group. */
typedef struct {
    float *qs;  /* [R, D] q rows in f32, times scale */
    float *acc; /* [R, D] sum of exp(s - m) v */
    float *sc;  /* [R, KT] the tile's scores, then its weights exp(s - m) (0 where masked) */
    float *m, *l;
    float *kf, *vf; /* [KT, D] the tile in f32 (scalar path) */
    const char *const *kp, *const *vp; /* the tile's key and value rows in the cache */
    int64_t R, G, D, pos0;
    int64_t k0, kt; /* the tile: keys k0 .. k0 + kt - 1 */
    int64_t r0;     /* first row that sees the tile (rows below it sit before k0) */
    int dt;
} item_state;

/* Keys of the tile that row r sees (1..kt for r >= r0). */
static inline int64_t visible(const item_state *st, int64_t r) {
    int64_t n = st->pos0 + r / st->G - st->k0 + 1;
    return n < st->kt ? n : st->kt;
}

static inline float load_elem(const char *row, int dt, int64_t i) {
    if (dt == TO_BF16)
        return to_bf16_to_f32(((const uint16_t *)row)[i]);
    if (dt == TO_F16)
        return to_f16_to_f32(((const uint16_t *)row)[i]);
    return ((const float *)row)[i];
}

/* ---------------------------------------------------------------------------- scalar path */

static void tile_scalar(item_state *st) {
    const int64_t D = st->D, kt = st->kt;
    for (int64_t j = 0; j < kt; j++) {
        to_load_f32(st->kf + j * D, st->kp[j], st->dt, D, 1);
        to_load_f32(st->vf + j * D, st->vp[j], st->dt, D, 1);
    }
    for (int64_t r = st->r0; r < st->R; r++) {
        const float *q = st->qs + r * D;
        float *s = st->sc + r * KT, *acc = st->acc + r * D;
        int64_t lim = visible(st, r);
        float mx = -INFINITY;
        for (int64_t j = 0; j < lim; j++) {
            const float *k = st->kf + j * D;
            float dot = 0.0f;
            for (int64_t d = 0; d < D; d++)
                dot += q[d] * k[d];
            s[j] = dot;
            mx = dot > mx ? dot : mx;
        }
        float m_new = mx > st->m[r] ? mx : st->m[r];
        /* the first tile: nothing to rescale (and -inf - -inf would be NaN) */
        float alpha = st->m[r] == -INFINITY ? 0.0f : expf(st->m[r] - m_new), sum = 0.0f;
        for (int64_t j = 0; j < lim; j++) {
            s[j] = expf(s[j] - m_new);
            sum += s[j];
        }
        st->l[r] = st->l[r] * alpha + sum;
        st->m[r] = m_new;
        if (alpha != 1.0f)
            for (int64_t d = 0; d < D; d++)
                acc[d] *= alpha;
        for (int64_t j = 0; j < lim; j++) {
            const float *v = st->vf + j * D;
            for (int64_t d = 0; d < D; d++)
                acc[d] += s[j] * v[d];
        }
    }
}

/* ------------------------------------------------------------------------------ AVX2 path */

/* 8 cache values at p widened to f32: bf16 is the top half of an f32, f16 goes through F16C. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m256 load8(const char *p, int dt) {
    if (dt == TO_BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    if (dt == TO_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    return _mm256_loadu_ps((const float *)p);
}

/* 16 bf16 values at p as two f32 vectors with one load: the even elements (0, 2, .., 14: the
 * low halves of the 32-bit lanes, shifted up) and the odd ones (the high halves, masked). Half
 * the instructions of two load8 calls. The AVX2 path therefore keeps q and acc rows of a bf16
 * cache in the "even/odd layout": each full group of 16 elements stored as its 8 even elements,
 * then its 8 odd ones (to_even_odd); elements past the last full group stay in place. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void load16_bf16(const char *p, __m256 *even,
                                                                              __m256 *odd) {
    __m256i x = _mm256_loadu_si256((const __m256i *)p);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* exp(x) for x <= 0 (scores minus their max), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2,
 * exp(r) by a degree-7 polynomial, times 2^n built in the exponent bits. Inputs below -87 give
 * exp(-87) ~ 1.6e-38 instead of less (keeps 2^n a normal number); next to the row's largest
 * weight, 1, that is nothing. */
TO_TARGET_AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* Scores of NR rows (q rows D floats apart, from q) against NK keys (kp[0 .. NK)) into
 * s[r * KT + kk]. NR * NK accumulators of 8 lanes each run along D; each key vector is loaded
 * and widened once for the NR rows. Always inlined with constant dt, NR, NK. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
dots(int dt, int NR, int NK, const float *q, int64_t D, const char *const *kp, float *s) {
    const int64_t esz = dt == TO_F32 ? 4 : 2;
    __m256 acc[4][4];
    for (int r = 0; r < NR; r++)
        for (int kk = 0; kk < NK; kk++)
            acc[r][kk] = _mm256_setzero_ps();
    int64_t d = 0;
    if (dt == TO_BF16) /* 16 at a time, q in the even/odd layout (see load16_bf16) */
        for (; d + 16 <= D; d += 16)
            for (int kk = 0; kk < NK; kk++) {
                __m256 ke, ko;
                load16_bf16(kp[kk] + d * esz, &ke, &ko);
                for (int r = 0; r < NR; r++) {
                    acc[r][kk] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), ke, acc[r][kk]);
                    acc[r][kk] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d + 8), ko, acc[r][kk]);
                }
            }
    for (; d + 8 <= D; d += 8) {
        __m256 kv[4];
        for (int kk = 0; kk < NK; kk++)
            kv[kk] = load8(kp[kk] + d * esz, dt);
        for (int r = 0; r < NR; r++) {
            __m256 qv = _mm256_loadu_ps(q + r * D + d);
            for (int kk = 0; kk < NK; kk++)
                acc[r][kk] = _mm256_fmadd_ps(qv, kv[kk], acc[r][kk]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int kk = 0; kk < NK; kk++)
            s[r * KT + kk] = hsum_avx2(acc[r][kk]);
    /* D % 8 leftovers, in a loop of their own: inside the one above they made the compiler spill
     * acc to the stack and do their bookkeeping for every call, D % 8 == 0 or not */
    if (d < D)
        for (int r = 0; r < NR; r++)
            for (int kk = 0; kk < NK; kk++)
                for (int64_t i = d; i < D; i++)
                    s[r * KT + kk] += q[r * D + i] * load_elem(kp[kk], dt, i);
}

/* Scores of NR rows against keys 0 .. nk - 1, a few keys at a time (NR * NK <= 8 accumulators,
 * so the FMA chains hide the FMA latency), the last ones singly. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
dots_rows(int dt, int NR, const float *q, int64_t D, const char *const *kp, int64_t nk, float *s) {
    const int NK = 8 / (NR < 2 ? 2 : NR); /* 4 keys for 1 or 2 rows, 2 keys for 3 or 4 */
    int64_t j = 0;
    for (; j + NK <= nk; j += NK)
        dots(dt, NR, NK, q, D, kp + j, s + j);
    for (; j < nk; j++)
        dots(dt, NR, 1, q, D, kp + j, s + j);
}

/* acc[r * D + d0 .. + 8 NV) += sum over j < nk of p[r * KT + j] * v_j for NR rows: the NR * NV
 * accumulators stay in registers over all the keys; each value vector is loaded and widened
 * once for the NR rows. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
pv(int dt, int NR, int NV, float *acc, const float *p, int64_t D, const char *const *vp, int64_t nk,
   int64_t d0) {
    const int64_t esz = dt == TO_F32 ? 4 : 2;
    __m256 a[4][4];
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < NV; v++)
            a[r][v] = _mm256_loadu_ps(acc + r * D + d0 + 8 * v);
    for (int64_t j = 0; j < nk; j++) {
        __m256 vv[4];
        if (dt == TO_BF16 && NV % 2 == 0) /* acc in the even/odd layout */
            for (int v = 0; v < NV; v += 2)
                load16_bf16(vp[j] + (d0 + 8 * v) * esz, &vv[v], &vv[v + 1]);
        else
            for (int v = 0; v < NV; v++)
                vv[v] = load8(vp[j] + (d0 + 8 * v) * esz, dt);
        for (int r = 0; r < NR; r++) {
            __m256 w = _mm256_broadcast_ss(p + r * KT + j);
            for (int v = 0; v < NV; v++)
                a[r][v] = _mm256_fmadd_ps(w, vv[v], a[r][v]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < NV; v++)
            _mm256_storeu_ps(acc + r * D + d0 + 8 * v, a[r][v]);
}

/* acc += p v over keys 0 .. nk - 1 (a run of pv_rows), the columns a part at a time. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
pv_cols(int dt, int NR, float *acc, const float *p, int64_t D, const char *const *vp, int64_t nk) {
    const int NV = 8 / (NR < 2 ? 2 : NR); /* 4 vectors (32 columns) for 1 or 2 rows, else 2 */
    int64_t d = 0;
    for (; d + 8 * NV <= D; d += 8 * NV)
        pv(dt, NR, NV, acc, p, D, vp, nk, d);
    if (NV > 2) /* a last full group of 16 (bf16: in the even/odd layout, so not 8 + 8) */
        for (; d + 16 <= D; d += 16)
            pv(dt, NR, 2, acc, p, D, vp, nk, d);
    for (; d + 8 <= D; d += 8)
        pv(dt, NR, 1, acc, p, D, vp, nk, d);
    for (; d < D; d++) /* D % 8 leftovers */
        for (int r = 0; r < NR; r++)
            for (int64_t j = 0; j < nk; j++)
                acc[r * D + d] += p[r * KT + j] * load_elem(vp[j], dt, d);
}

/* The V accumulation of a tile in runs of PV_KEYS keys, each run done for every column before
 * the next: the accumulators cover a part of the columns at a time, so a run's value rows are
 * read once per part, and they must still be in L1 then. A tile's rows of one kv head are a
 * multiple of 2 KB apart (Hkv * D elements, blocks 32 KB-aligned), so they all fall into a few
 * L1 sets: a run of 8 rows (32 lines for D = 128 bf16) fits there, a tile of 32 does not. Each
 * accumulator still adds the keys in increasing order, so runs change no result. */
#define PV_KEYS 8
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
pv_rows(int dt, int NR, float *acc, const float *p, int64_t D, const char *const *vp, int64_t nk) {
    for (int64_t j = 0; j < nk; j += PV_KEYS)
        pv_cols(dt, NR, acc, p + j, D, vp + j, nk - j < PV_KEYS ? nk - j : PV_KEYS);
}

/* One function per (cache dtype, rows in a group) so dt and NR are constants in each. */
#define FOR_DT_NR(dt, nr, CALL)                                                                   \
    do {                                                                                          \
        if ((dt) == TO_BF16) {                                                                    \
            switch (nr) { case 1: CALL(TO_BF16, 1); break; case 2: CALL(TO_BF16, 2); break;       \
                          case 3: CALL(TO_BF16, 3); break; default: CALL(TO_BF16, 4); }           \
        } else if ((dt) == TO_F16) {                                                              \
            switch (nr) { case 1: CALL(TO_F16, 1); break; case 2: CALL(TO_F16, 2); break;         \
                          case 3: CALL(TO_F16, 3); break; default: CALL(TO_F16, 4); }             \
        } else {                                                                                  \
            switch (nr) { case 1: CALL(TO_F32, 1); break; case 2: CALL(TO_F32, 2); break;         \
                          case 3: CALL(TO_F32, 3); break; default: CALL(TO_F32, 4); }             \
        }                                                                                         \
    } while (0)

/* Online softmax step of row r over its scores s[0 .. kt): weights exp(s - m_new) into s (0 for
 * the keys past the row's position, and up to the next multiple of 8, which the V accumulation
 * of the row's group may read), l and acc rescaled to the new max. */
TO_TARGET_AVX2 static void softmax_row_avx2(item_state *st, int64_t r) {
    float *s = st->sc + r * KT, *acc = st->acc + r * st->D;
    const int64_t lim = visible(st, r), chunks = (st->kt + 7) / 8;
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), ninf = _mm256_set1_ps(-INFINITY);
    __m256 mx = ninf;
    for (int64_t c = 0; c < chunks; c++) {
        __m256 seen = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps((float)(8 * c))),
                                    _mm256_set1_ps((float)lim), _CMP_LT_OQ);
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + 8 * c), seen));
    }
    float m_old = st->m[r], m_new = hmax_avx2(mx);
    m_new = m_new > m_old ? m_new : m_old;
    float alpha = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
    __m256 sum = _mm256_setzero_ps(), mv = _mm256_set1_ps(m_new);
    for (int64_t c = 0; c < chunks; c++) {
        __m256 seen = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps((float)(8 * c))),
                                    _mm256_set1_ps((float)lim), _CMP_LT_OQ);
        __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + 8 * c), mv)), seen);
        _mm256_storeu_ps(s + 8 * c, p);
        sum = _mm256_add_ps(sum, p);
    }
    st->l[r] = st->l[r] * alpha + hsum_avx2(sum);
    st->m[r] = m_new;
    if (alpha != 1.0f) {
        const int64_t D = st->D;
        __m256 av = _mm256_set1_ps(alpha);
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), av));
        for (; d < D; d++)
            acc[d] *= alpha;
    }
}

TO_TARGET_AVX2 static void tile_avx2(item_state *st) {
    const int64_t D = st->D, R = st->R;
    const int dt = st->dt;
    for (int64_t r = st->r0; r < R; r += 4) {
        int nr = R - r < 4 ? (int)(R - r) : 4;
#define DOTS(DT, NR) dots_rows(DT, NR, st->qs + r * D, D, st->kp, visible(st, r + NR - 1), st->sc + r * KT)
        FOR_DT_NR(dt, nr, DOTS);
#undef DOTS
    }
    for (int64_t r = st->r0; r < R; r++)
        softmax_row_avx2(st, r);
    /* the group's last row sees the most keys; the others have weight 0 past their own */
    for (int64_t r = st->r0; r < R; r += 4) {
        int nr = R - r < 4 ? (int)(R - r) : 4;
#define PV(DT, NR) pv_rows(DT, NR, st->acc + r * D, st->sc + r * KT, D, st->vp, visible(st, r + NR - 1))
        FOR_DT_NR(dt, nr, PV);
#undef PV
    }
}

/* --------------------------------------------------------------------------------- driver */

/* The cache rows of positions k0 .. k0 + n - 1 of sequence s, kv head 0, into kp/vp (head g's
 * rows are g * D elements further). */
static void gather_rows(const attn_job *job, int64_t s, int64_t k0, int64_t n, const char **kp,
                        const char **vp) {
    const to_tensor *bt = job->bt;
    const int64_t bs = job->bs, slot_bytes = job->Hkv * job->row_bytes;
    const int64_t row0 = s * bt->strides[0];
    if (n <= 0)
        return; /* k0 may then be past the table */
    /* one 64-bit division for the run, not one per key: step through the block's slots, to the
     * next block when one is used up */
    int64_t bi = k0 / bs, in = k0 % bs;
    int64_t base = to_load_index(bt->data, bt->dtype, row0 + bi * bt->strides[1]) * bs;
    for (int64_t j = 0; j < n; j++) {
        if (in == bs) {
            bi++;
            in = 0;
            base = to_load_index(bt->data, bt->dtype, row0 + bi * bt->strides[1]) * bs;
        }
        int64_t off = (base + in) * slot_bytes;
        kp[j] = job->kc + off;
        vp[j] = job->vc + off;
        in++;
    }
}

/* How head_rows requests the rows it points at. */
enum { PF_NONE, PF_L2, PF_L1 };

/* kp/vp shifted to kv head g (from head 0's rows in kp0/vp0). With prefetch, their cache lines
 * are requested too: they are the next step's rows, which arrive while the current step is
 * computed. (Rows of one block are Hkv * D apart and the blocks anywhere, which the hardware
 * prefetcher does not run ahead of; without this decode waits on memory.) Decode (PF_L1) reads
 * every row once, straight from memory, and its steps are short: there the rows are fetched
 * all the way into L1 (with the first step's rows requested early, see run_split_item: a demo
 * model decode call with its cache cold went from ~52 to ~43 us on one thread, ~32 to ~26 on
 * two, on a Xeon); prefill (PF_L2) reuses each row across many queries and keeps L1 for
 * them. */
static void head_rows(const attn_job *job, const char *const *kp0, const char *const *vp0,
                      int64_t n, int64_t g, const char **kp, const char **vp, int prefetch) {
    const int64_t off = g * job->row_bytes;
    for (int64_t j = 0; j < n; j++) {
        kp[j] = kp0[j] + off;
        vp[j] = vp0[j] + off;
        if (prefetch == PF_L2)
            for (int64_t b = 0; b < job->row_bytes; b += 64) {
                __builtin_prefetch(kp[j] + b, 0, 2);
                __builtin_prefetch(vp[j] + b, 0, 2);
            }
        else if (prefetch == PF_L1)
            for (int64_t b = 0; b < job->row_bytes; b += 64) {
                __builtin_prefetch(kp[j] + b, 0, 3);
                __builtin_prefetch(vp[j] + b, 0, 3);
            }
    }
}

/* Row x of D floats into the even/odd layout (forward) or back (see load16_bf16). */
static void even_odd(float *x, int64_t D, int forward) {
    float tmp[16];
    for (int64_t d = 0; d + 16 <= D; d += 16) {
        memcpy(tmp, x + d, sizeof tmp);
        for (int i = 0; i < 8; i++) {
            if (forward) {
                x[d + i] = tmp[2 * i];
                x[d + 8 + i] = tmp[2 * i + 1];
            } else {
                x[d + 2 * i] = tmp[i];
                x[d + 2 * i + 1] = tmp[8 + i];
            }
        }
    }
}

/* Rows [0, R) of st (query t0 + r / G, q head g * G + r % G, for r in [0, R)) loaded, scaled,
 * with empty softmax state. */
static void start_rows(const attn_job *job, item_state *st, int64_t t0, int64_t g, int64_t R) {
    const to_tensor *q = job->q;
    const int64_t G = job->G, D = job->D;
    for (int64_t r = 0; r < R; r++) {
        int64_t t = t0 + r / G, h = g * G + r % G;
        float *qs = st->qs + r * D;
        to_load_f32(qs, to_elem_ptr(q->data, q->dtype, t * q->strides[0] + h * q->strides[1]),
                    q->dtype, D, q->strides[2]);
        for (int64_t d = 0; d < D; d++)
            qs[d] *= job->scale;
        if (job->even_odd)
            even_odd(qs, D, 1);
        memset(st->acc + r * D, 0, (size_t)D * sizeof(float));
        st->m[r] = -INFINITY;
        st->l[r] = 0.0f;
    }
}

/* out row of query t, q head h <- acc / l (acc is scaled in place). */
static void finish_row(const attn_job *job, float *acc, float l, int64_t t, int64_t h) {
    const to_tensor *out = job->out;
    const int64_t D = job->D;
    float inv = 1.0f / l;
    for (int64_t d = 0; d < D; d++)
        acc[d] *= inv;
    if (job->even_odd)
        even_odd(acc, D, 0);
    to_store_f32(to_elem_ptr(out->data, out->dtype, t * out->strides[0] + h * out->strides[1]),
                 out->dtype, acc, D, out->strides[2]);
}

/* Points st at keys k0 .. k0 + kt - 1 (rows kp/vp) and runs the tile on its rows. */
static void run_tile(const attn_job *job, item_state *st, int64_t k0, int64_t kt, const char **kp,
                     const char **vp) {
    st->k0 = k0;
    st->kt = kt;
    st->kp = kp;
    st->vp = vp;
    /* the first query that sees key k0 */
    st->r0 = (k0 > st->pos0 ? k0 - st->pos0 : 0) * st->G;
    if (st->r0 >= st->R)
        return;
    if (job->avx2)
        tile_avx2(st);
    else
        tile_scalar(st);
}

/* A prefill item: one kv head, a chunk of queries, keys 0 .. its last query's position. */
static void run_chunk_item(attn_job *job, item_state *st, const chunk *c, int64_t g) {
    const int64_t G = job->G, D = job->D, R = c->nq * G;
    st->R = R;
    st->pos0 = c->pos0;
    start_rows(job, st, c->t0, g, R);
    /* two sets of row pointers: the tile being computed and the next one, whose rows are
     * prefetched meanwhile */
    const char *base[2][KT], *rows[2][2][KT];
    const int64_t kv_end = c->pos0 + c->nq;
    int cur = 0;
    int64_t n = kv_end < KT ? kv_end : KT;
    gather_rows(job, c->s, 0, n, base[0], base[1]);
    head_rows(job, base[0], base[1], n, g, rows[0][0], rows[0][1], PF_NONE);
    for (int64_t k0 = 0; k0 < kv_end; k0 += KT) {
        if (k0 + KT < kv_end) {
            int64_t nn = kv_end - k0 - KT < KT ? kv_end - k0 - KT : KT;
            gather_rows(job, c->s, k0 + KT, nn, base[0], base[1]);
            head_rows(job, base[0], base[1], nn, g, rows[!cur][0], rows[!cur][1], PF_L2);
        }
        run_tile(job, st, k0, kv_end - k0 < KT ? kv_end - k0 : KT, rows[cur][0], rows[cur][1]);
        cur = !cur;
    }
    for (int64_t r = 0; r < R; r++)
        finish_row(job, st->acc + r * D, st->l[r], c->t0 + r / G, g * G + r % G);
}

static void merge_split(const attn_job *job, const split *sp, float *acc);

/* Rows of group g of a split item inside the item's arrays (all Hkv groups, R rows each). */
static void point_group(item_state *st, float *qs, float *acc, float *m, float *l, int64_t g) {
    st->qs = qs + g * st->R * st->D;
    st->acc = acc + g * st->R * st->D;
    st->m = m + g * st->R;
    st->l = l + g * st->R;
}

/* A split item: every kv head of one short-query sequence (decode), over one segment of its
 * keys. The tile loop is outside the head loop, so the item walks each block's rows in address
 * order (a position's rows of all heads are adjacent), and one head's step prefetches the
 * next's. With several segments the unnormalised (acc, m, l) go to the sequence's partials, and
 * the item that finishes the sequence's last segment merges them (merge_split). */
static void run_split_item(attn_job *job, item_state *st, const split *sp) {
    const int64_t G = job->G, D = job->D, Hkv = job->Hkv, R = sp->nq * G;
    float *qs = st->qs, *acc = st->acc, *m = st->m, *l = st->l;
    st->R = R;
    st->pos0 = sp->pos0;
    const char *base[2][2][KT], *rows[2][2][KT];
    int cur = 0; /* rows[cur]: the step being computed */
    int64_t k0 = sp->k_begin, kt = sp->k_end - k0 < KT ? sp->k_end - k0 : KT;
    /* the first step's rows are requested before the q rows are set up: they are on their way
     * meanwhile */
    gather_rows(job, sp->s, k0, kt, base[0][0], base[0][1]);
    head_rows(job, base[0][0], base[0][1], kt, 0, rows[0][0], rows[0][1], PF_L1);
    for (int64_t g = 0; g < Hkv; g++) {
        point_group(st, qs, acc, m, l, g);
        start_rows(job, st, sp->t0, g, R);
    }
    for (int tb = 0; k0 < sp->k_end; tb = !tb) {
        int64_t k1 = k0 + kt, kt1 = sp->k_end - k1 < KT ? sp->k_end - k1 : KT;
        if (k1 < sp->k_end)
            gather_rows(job, sp->s, k1, kt1, base[!tb][0], base[!tb][1]);
        for (int64_t g = 0; g < Hkv; g++) {
            /* the next step: head g + 1 of this tile, or head 0 of the next tile */
            if (g + 1 < Hkv)
                head_rows(job, base[tb][0], base[tb][1], kt, g + 1, rows[!cur][0], rows[!cur][1],
                          PF_L1);
            else if (k1 < sp->k_end)
                head_rows(job, base[!tb][0], base[!tb][1], kt1, 0, rows[!cur][0], rows[!cur][1],
                          PF_L1);
            point_group(st, qs, acc, m, l, g);
            run_tile(job, st, k0, kt, rows[cur][0], rows[cur][1]);
            cur = !cur;
        }
        k0 = k1;
        kt = kt1;
    }
    st->qs = qs, st->acc = acc, st->m = m, st->l = l;
    if (sp->n_seg == 1) {
        for (int64_t g = 0; g < Hkv; g++)
            for (int64_t r = 0; r < R; r++)
                finish_row(job, acc + (g * R + r) * D, l[g * R + r], sp->t0 + r / G, g * G + r % G);
        return;
    }
    /* partial row i = g * R + r: acc [D], then m, l */
    float *part = sp->part + sp->seg * Hkv * R * (D + 2);
    for (int64_t i = 0; i < Hkv * R; i++) {
        memcpy(part + i * (D + 2), acc + i * D, (size_t)D * sizeof(float));
        part[i * (D + 2) + D] = m[i];
        part[i * (D + 2) + D + 1] = l[i];
    }
    /* the last segment done merges; acq_rel: it sees the other segments' partials */
    if (atomic_fetch_sub_explicit(sp->left, 1, memory_order_acq_rel) == 1)
        merge_split(job, sp, acc);
}

/* out rows of a split sequence from its n_seg partials, combined in segment order (so the
 * result does not depend on which thread finished which segment, or when):
 *   m = max m_i, l = sum l_i exp(m_i - m), acc = sum acc_i exp(m_i - m), out = acc / l.
 * A segment after a query's position (only the last ones, for nq > 1) has m_i = -inf: skipped. */
static void merge_split(const attn_job *job, const split *sp, float *acc) {
    const int64_t G = job->G, D = job->D, R = sp->nq * G, rows = job->Hkv * R;
    const int64_t seg_floats = rows * (D + 2);
    for (int64_t i = 0; i < rows; i++) {
        const float *p0 = sp->part + i * (D + 2);
        float mx = -INFINITY, l = 0.0f;
        for (int64_t k = 0; k < sp->n_seg; k++) {
            float mk = p0[k * seg_floats + D];
            mx = mk > mx ? mk : mx;
        }
        memset(acc, 0, (size_t)D * sizeof(float));
        for (int64_t k = 0; k < sp->n_seg; k++) {
            const float *p = p0 + k * seg_floats;
            if (p[D] == -INFINITY)
                continue;
            float w = expf(p[D] - mx);
            l += p[D + 1] * w;
            for (int64_t d = 0; d < D; d++)
                acc[d] += p[d] * w;
        }
        finish_row(job, acc, l, sp->t0 + (i % R) / G, (i / R) * G + (i % R) % G);
    }
}

/* Each thread takes items from a shared counter until none are left: items differ a lot in cost
 * (context lengths, causal prefill chunks), and taking them one by one keeps the threads busy to
 * the end. Which thread runs an item does not change its result. Items [0, n_chunk_items) are
 * (chunk, kv head) pairs, the rest split items. */
static void attn_worker(void *arg, int ith, int nth) {
    attn_job *job = arg;
    const int64_t Rm = job->max_rows, D = job->D;
    (void)ith, (void)nth;
    size_t floats = (size_t)(2 * Rm * D + Rm * KT + 2 * Rm + 2 * KT * D);
    float *buf = to_scratch(0, floats * sizeof(float));
    if (!buf) {
        atomic_store(&job->failed, 1);
        return;
    }
    item_state st = {.qs = buf, .acc = buf + Rm * D, .sc = buf + 2 * Rm * D, .G = job->G, .D = D,
                     .dt = job->dt};
    st.m = st.sc + Rm * KT;
    st.l = st.m + Rm;
    st.kf = st.l + Rm;
    st.vf = st.kf + KT * D;
    /* score lanes past a tile's keys are read (and masked) by the vector softmax: keep them
     * initialised */
    memset(st.sc, 0, (size_t)(Rm * KT) * sizeof(float));
    float *qs = st.qs, *acc = st.acc, *m = st.m, *l = st.l;
    for (;;) {
        int64_t item = atomic_fetch_add(&job->next, 1);
        if (item >= job->n_items)
            break;
        st.qs = qs, st.acc = acc, st.m = m, st.l = l;
        if (item < job->n_chunk_items)
            run_chunk_item(job, &st, &job->chunks[item / job->Hkv], item % job->Hkv);
        else
            run_split_item(job, &st, &job->splits[item - job->n_chunk_items]);
    }
}

/* Sequences of up to SPLIT_MAX_Q queries (decode, short speculative or chunked steps) are
 * split items; the others are chunked by queries. A split sequence's segment length depends on
 * its context length only: SEG_MIN keys, doubled until there are at most MAX_SEGS segments.
 * Never on the thread count or the rest of the batch, so the segments, and with them the
 * arithmetic of every row, are the same however the call is run. */
static int64_t segment_keys(int64_t len) {
    int64_t seg = SEG_MIN;
    while ((len + seg - 1) / seg > MAX_SEGS)
        seg *= 2;
    return seg;
}

/* Chunks of up to qb queries of the sequences with more than SPLIT_MAX_Q queries: how many,
 * and (when list is not NULL) the list. Within a sequence the last chunk, which sees the most
 * keys, comes first, so the longest items start early. *work: (query, key) pairs of all
 * sequences. */
static int64_t make_chunks(const to_tensor *cu, const to_tensor *ctx, int64_t qb, chunk *list,
                           int64_t *work) {
    int64_t S = ctx->shape[0], n_chunks = 0, total = 0;
    for (int64_t s = 0; s < S; s++) {
        int64_t b = to_load_index(cu->data, cu->dtype, s * cu->strides[0]);
        int64_t n = to_load_index(cu->data, cu->dtype, (s + 1) * cu->strides[0]) - b;
        int64_t len = to_load_index(ctx->data, ctx->dtype, s * ctx->strides[0]);
        total += n * len;
        if (n <= SPLIT_MAX_Q)
            continue;
        for (int64_t i = (n - 1) / qb * qb; i >= 0; i -= qb) {
            int64_t nq = n - i < qb ? n - i : qb, pos0 = len - n + i;
            if (list)
                list[n_chunks] = (chunk){.s = s, .t0 = b + i, .nq = nq, .pos0 = pos0};
            n_chunks++;
        }
    }
    if (work)
        *work = total;
    return n_chunks;
}

/* The split items (when list is not NULL, filled in, with partials from part and countdowns
 * from left): how many; *part_floats, *n_multi: the partial floats and the sequences with more
 * than one segment. */
static int64_t make_splits(const attn_job *job, const to_tensor *cu, const to_tensor *ctx,
                           split *list, float *part, atomic_int *left, int64_t *part_floats,
                           int64_t *n_multi) {
    int64_t S = ctx->shape[0], n_items = 0, floats = 0, multi = 0;
    for (int64_t s = 0; s < S; s++) {
        int64_t b = to_load_index(cu->data, cu->dtype, s * cu->strides[0]);
        int64_t n = to_load_index(cu->data, cu->dtype, (s + 1) * cu->strides[0]) - b;
        if (n == 0 || n > SPLIT_MAX_Q)
            continue;
        int64_t len = to_load_index(ctx->data, ctx->dtype, s * ctx->strides[0]);
        int64_t seg = segment_keys(len), n_seg = (len + seg - 1) / seg;
        for (int64_t i = 0; list && i < n_seg; i++)
            list[n_items + i] = (split){.s = s, .t0 = b, .nq = n, .pos0 = len - n, .seg = i,
                                        .n_seg = n_seg, .k_begin = i * seg,
                                        .k_end = (i + 1) * seg < len ? (i + 1) * seg : len,
                                        .part = n_seg > 1 ? part + floats : NULL,
                                        .left = n_seg > 1 ? left + multi : NULL};
        n_items += n_seg;
        if (n_seg > 1) {
            if (left)
                atomic_init(&left[multi], (int)n_seg);
            floats += n_seg * job->Hkv * n * job->G * (job->D + 2);
            multi++;
        }
    }
    *part_floats = floats;
    *n_multi = multi;
    return n_items;
}

int to_cpu_paged_attention(const to_tensor *out, const to_tensor *q, const to_tensor *k_cache,
                           const to_tensor *v_cache, const to_tensor *cu_seqlens_q,
                           const to_tensor *context_lens, const to_tensor *block_tables, double scale) {
    const int64_t T = q->shape[0], Hq = q->shape[1], D = q->shape[2], Hkv = k_cache->shape[2];
    if (T == 0 || Hq == 0 || D == 0)
        return TO_OK;
    const int64_t G = Hq / Hkv;
    attn_job job = {.out = out, .q = q, .bt = block_tables, .kc = k_cache->data, .vc = v_cache->data,
                    .dt = k_cache->dtype, .Hkv = Hkv, .G = G, .D = D, .bs = k_cache->shape[1],
                    .row_bytes = D * to_dtype_size(k_cache->dtype), .scale = (float)scale,
                    .avx2 = to_simd() >= TO_SIMD_AVX2};
    job.even_odd = job.avx2 && job.dt == TO_BF16;
    int64_t part_floats, n_multi;
    int64_t n_splits = make_splits(&job, cu_seqlens_q, context_lens, NULL, NULL, NULL, &part_floats,
                                   &n_multi);
    /* Queries per chunk: enough rows per item to reuse each K/V row well, fewer when that would
     * leave threads without items (a short prefill). A row's arithmetic does not depend on its
     * chunk (see the top), so this may follow the thread count. */
    const int nth = to_num_threads();
    int64_t qb = ROWS_TARGET / G > 1 ? ROWS_TARGET / G : 1, work;
    int64_t n_chunks = make_chunks(cu_seqlens_q, context_lens, qb, NULL, &work);
    while (qb > 1 && n_chunks > 0 && n_chunks * Hkv + n_splits < ITEMS_PER_THREAD * nth) {
        qb /= 2;
        n_chunks = make_chunks(cu_seqlens_q, context_lens, qb, NULL, NULL);
    }
    /* one scratch block (the calling thread's; the workers only read and write through the
     * pointers): chunks, split items, partials, countdowns */
    size_t chunk_bytes = (size_t)n_chunks * sizeof(chunk), split_bytes = (size_t)n_splits * sizeof(split);
    size_t part_bytes = (size_t)part_floats * sizeof(float);
    size_t off_split = (chunk_bytes + 63) / 64 * 64, off_part = off_split + (split_bytes + 63) / 64 * 64;
    size_t off_left = off_part + (part_bytes + 63) / 64 * 64;
    char *mem = to_scratch(1, off_left + (size_t)n_multi * sizeof(atomic_int) + 1);
    if (!mem)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_paged_attention: no memory for %lld work chunks "
                       "and %lld split items", (long long)n_chunks, (long long)n_splits);
    chunk *chunks = (chunk *)mem;
    make_chunks(cu_seqlens_q, context_lens, qb, chunks, NULL);
    make_splits(&job, cu_seqlens_q, context_lens, (split *)(mem + off_split), (float *)(mem + off_part),
                (atomic_int *)(mem + off_left), &part_floats, &n_multi);
    job.chunks = chunks;
    job.splits = (const split *)(mem + off_split);
    job.n_chunk_items = n_chunks * Hkv;
    job.n_items = job.n_chunk_items + n_splits;
    /* a split item holds every kv head's rows */
    job.max_rows = qb * G > Hkv * SPLIT_MAX_Q * G || n_splits == 0 ? qb * G : Hkv * SPLIT_MAX_Q * G;
    atomic_init(&job.next, 0);
    atomic_init(&job.failed, 0);
    /* work counts (query row, key) pairs per kv head; below ~64K MACs in all, waking the other
     * threads costs more than it saves */
    if (job.n_items == 1 || work * Hq * D < 65536)
        attn_worker(&job, 0, 1);
    else
        to_parallel_run(attn_worker, &job);
    if (atomic_load(&job.failed))
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_paged_attention: out of memory for the per-thread "
                       "buffers (%lld rows of %lld)", (long long)job.max_rows, (long long)D);
    return TO_OK;
}
