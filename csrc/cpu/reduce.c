/* reduce.c - argmax and top-k over the last dimension.
 *
 * Rows are read in chunks of CHUNK values as f32: an f32 row with unit stride is read in place,
 * anything else (f16, bf16, strided) is converted into a buffer on the stack first. Threads take
 * ranges of rows.
 *
 * Ranking (shared by both ops): NaN is larger than every number, as in torch, and ties (equal
 * values, or two NaNs) go to the lower index. -0.0 and +0.0 are equal.
 *
 * argmax keeps, per AVX2 lane, the largest value seen and the index where it first appeared
 * (updated on strictly greater only, so the first occurrence stays); the lanes are then merged
 * by value and, among equal values, by lowest index. A NaN anywhere in a chunk sends that chunk
 * to the scalar loop, which stops at the first NaN.
 *
 * top-k keeps the k best entries seen so far in a binary heap whose root is the worst of them
 * (entries are 64-bit keys ordered like the ranking, see below). Once k entries are in, a value
 * can only enter if it is greater than the root's value (an equal one comes later, so it loses
 * the tie) or a NaN, so the scan is mostly a vector compare of 32 values against that threshold;
 * only the rare lanes that pass go to the heap (about k ln(n/k) of them for values in random
 * order). A 151936-wide vocabulary row with k ~ 100 is thus about one streaming pass, where a
 * full sort would be n log n. */
#include "cpu/reduce.h"
#include "cpu/heap.h"
#include "cpu/order_key.h"

#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>

#define CHUNK 2048 /* values per chunk: 8 KB of f32 on the stack */

static inline int is_nan(float v) { return v != v; }

/* Values [j, j + m) of a row as f32: in place when the row is f32 with unit stride. */
static const float *row_chunk(const char *row, int dtype, int64_t stride, int64_t j, int64_t m, float *buf) {
    if (dtype == TO_F32 && stride == 1)
        return (const float *)row + j;
    to_load_f32(buf, row + j * stride * to_dtype_size(dtype), dtype, m, stride);
    return buf;
}

/* element offset of the i-th element of t in flat (row-major) order */
static int64_t flat_offset(const to_tensor *t, int64_t i) {
    int64_t off = 0;
    for (int d = t->ndim - 1; d >= 0; d--) {
        off += (i % t->shape[d]) * t->strides[d];
        i /= t->shape[d];
    }
    return off;
}

/* ===================================================================================== argmax */

/* Running result of a row: the best value so far and its index. Starting from (-inf, 0) is
 * right: if no value is greater than -inf, every value is -inf and index 0 is the first one. */
typedef struct {
    float v;
    int64_t i;
} best_t;

static void argmax_chunk_scalar(best_t *b, const float *p, int64_t n, int64_t base) {
    if (is_nan(b->v))
        return; /* the first NaN already won */
    for (int64_t j = 0; j < n; j++) {
        float v = p[j];
        if (v > b->v) {
            b->v = v;
            b->i = base + j;
        } else if (is_nan(v)) {
            b->v = v;
            b->i = base + j;
            return;
        }
    }
}

TO_TARGET_AVX2 static void argmax_chunk_avx2(best_t *b, const float *p, int64_t n, int64_t base) {
    if (is_nan(b->v))
        return;
    if (n < 16) {
        argmax_chunk_scalar(b, p, n, base);
        return;
    }
    __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i step = _mm256_set1_epi32(8);
    __m256 vbest = _mm256_loadu_ps(p);
    __m256i vidx = idx;
    __m256 nan = _mm256_cmp_ps(vbest, vbest, _CMP_UNORD_Q);
    int64_t j = 8;
    for (; j + 8 <= n; j += 8) {
        idx = _mm256_add_epi32(idx, step);
        __m256 v = _mm256_loadu_ps(p + j);
        __m256 gt = _mm256_cmp_ps(v, vbest, _CMP_GT_OQ);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        vbest = _mm256_blendv_ps(vbest, v, gt);
        vidx = _mm256_blendv_epi8(vidx, idx, _mm256_castps_si256(gt));
    }
    if (_mm256_movemask_ps(nan)) {
        argmax_chunk_scalar(b, p, n, base); /* a NaN outranks everything: find the first one */
        return;
    }
    float lv[8];
    int32_t li[8];
    _mm256_storeu_ps(lv, vbest);
    _mm256_storeu_si256((__m256i *)li, vidx);
    float m = lv[0];
    for (int l = 1; l < 8; l++)
        m = lv[l] > m ? lv[l] : m;
    int32_t mi = INT32_MAX;
    for (int l = 0; l < 8; l++)
        if (lv[l] == m && li[l] < mi)
            mi = li[l];
    if (m > b->v) {
        b->v = m;
        b->i = base + mi;
    }
    argmax_chunk_scalar(b, p + j, n - j, base + j); /* the last n % 8 values */
}

struct argmax_job {
    const to_tensor *out, *x;
    int simd;
};

static void argmax_rows(void *arg, int64_t begin, int64_t end) {
    const struct argmax_job *job = arg;
    const to_tensor *x = job->x;
    int64_t n = to_row_len(x), s = to_row_stride_last(x);
    float buf[CHUNK];
    for (int64_t r = begin; r < end; r++) {
        const char *row = to_elem_ptr(x->data, x->dtype, to_row_offset(x, r));
        best_t b = {-INFINITY, 0};
        for (int64_t j = 0; j < n && !is_nan(b.v); j += CHUNK) {
            int64_t m = n - j < CHUNK ? n - j : CHUNK;
            const float *p = row_chunk(row, x->dtype, s, j, m, buf);
            if (job->simd >= TO_SIMD_AVX2)
                argmax_chunk_avx2(&b, p, m, j);
            else
                argmax_chunk_scalar(&b, p, m, j);
        }
        ((int64_t *)job->out->data)[flat_offset(job->out, r)] = b.i;
    }
}

int to_cpu_argmax(const to_tensor *out, const to_tensor *x) {
    int64_t rows = to_num_rows(x), n = to_row_len(x);
    if (rows == 0 || n == 0)
        return TO_OK;
    struct argmax_job job = {out, x, to_simd()};
    /* a thread is worth waking for about 32K values */
    to_parallel_for(rows, n >= 32768 ? 1 : 32768 / n, argmax_rows, &job);
    return TO_OK;
}

/* ===================================================================================== top-k */

/* An entry of the heap is one 64-bit key (order_key.h); the values written out are read back
 * from x at the chosen indices, so -0.0 and NaN payloads come out unchanged. */

/* A min-heap: the root is the smallest key, the worst of the k kept. */
typedef struct {
    uint64_t *heap;
    int64_t k, count;
    float threshold; /* value of the root once the heap is full (NaN: nothing can enter) */
} topk_state;

static inline void offer(topk_state *st, float v, int64_t i) {
    uint64_t key = make_key(v, i);
    if (st->count < st->k) {
        st->heap[st->count] = key;
        heap_sift_up(st->heap, st->count++);
        if (st->count == st->k)
            st->threshold = key_value(st->heap[0]);
    } else if (key > st->heap[0]) {
        st->heap[0] = key;
        heap_sift_down(st->heap, st->k, 0);
        st->threshold = key_value(st->heap[0]);
    }
}

/* Values arrive in increasing index order, so with a full heap only a value above the root's
 * value, or a NaN, can enter (an equal value comes later and loses the tie): !(v <= threshold)
 * is exactly that test. A NaN threshold means the heap holds k NaNs, which nothing later beats. */
static void topk_chunk_scalar(topk_state *st, const float *p, int64_t n, int64_t base) {
    int64_t j = 0;
    for (; j < n && st->count < st->k; j++)
        offer(st, p[j], base + j);
    float t = st->threshold; /* a local copy: st could alias p as far as the compiler knows */
    for (; j < n && !is_nan(t); j++)
        if (!(p[j] <= t)) {
            offer(st, p[j], base + j);
            t = st->threshold;
        }
}

TO_TARGET_AVX2 static void topk_chunk_avx2(topk_state *st, const float *p, int64_t n, int64_t base) {
    int64_t j = 0;
    for (; j < n && st->count < st->k; j++)
        offer(st, p[j], base + j);
    float thr = st->threshold;
    __m256 t = _mm256_set1_ps(thr);
    for (; j + 32 <= n && !is_nan(thr); j += 32) {
        /* 32 values against the threshold at once: NLE_UQ is "greater, or unordered (NaN)" */
        unsigned m0 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), t, _CMP_NLE_UQ));
        unsigned m1 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 8), t, _CMP_NLE_UQ));
        unsigned m2 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 16), t, _CMP_NLE_UQ));
        unsigned m3 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 24), t, _CMP_NLE_UQ));
        uint32_t mask = m0 | m1 << 8 | m2 << 16 | m3 << 24;
        if (!mask)
            continue;
        /* the rare candidates, in index order, each against the threshold as it rises */
        do {
            int l = __builtin_ctz(mask);
            mask &= mask - 1;
            if (!(p[j + l] <= thr)) {
                offer(st, p[j + l], base + j + l);
                thr = st->threshold;
            }
        } while (mask);
        t = _mm256_set1_ps(thr);
    }
    topk_chunk_scalar(st, p + j, n - j, base + j);
}

struct topk_job {
    const to_tensor *values, *indices, *x;
    int64_t k;
    int simd;
    atomic_int failed; /* a thread could not get scratch memory for its heap */
};

static void topk_rows(void *arg, int64_t begin, int64_t end) {
    struct topk_job *job = arg;
    const to_tensor *x = job->x, *values = job->values, *indices = job->indices;
    int64_t n = to_row_len(x), s = to_row_stride_last(x), k = job->k;
    uint64_t *heap = to_scratch(0, (size_t)k * sizeof(uint64_t));
    if (!heap) {
        atomic_store(&job->failed, 1);
        return;
    }
    float buf[CHUNK];
    for (int64_t r = begin; r < end; r++) {
        const char *row = to_elem_ptr(x->data, x->dtype, to_row_offset(x, r));
        topk_state st = {heap, k, 0, NAN};
        for (int64_t j = 0; j < n; j += CHUNK) {
            int64_t m = n - j < CHUNK ? n - j : CHUNK;
            const float *p = row_chunk(row, x->dtype, s, j, m, buf);
            if (job->simd >= TO_SIMD_AVX2)
                topk_chunk_avx2(&st, p, m, j);
            else
                topk_chunk_scalar(&st, p, m, j);
        }
        /* heap sort: moving the smallest key to the end each time leaves the best first */
        for (int64_t m = k - 1; m > 0; m--) {
            uint64_t e = heap[0];
            heap[0] = heap[m];
            heap[m] = e;
            heap_sift_down(heap, m, 0);
        }
        char *vrow = to_elem_ptr(values->data, values->dtype, to_row_offset(values, r));
        int64_t vs = to_row_stride_last(values);
        int64_t ioff = to_row_offset(indices, r), is = to_row_stride_last(indices);
        for (int64_t j = 0; j < k; j++) {
            int64_t i = key_index(heap[j]);
            float v;
            to_load_f32(&v, row + i * s * to_dtype_size(x->dtype), x->dtype, 1, 1);
            to_store_f32(to_elem_ptr(vrow, values->dtype, j * vs), values->dtype, &v, 1, 1);
            if (indices->dtype == TO_I32)
                ((int32_t *)indices->data)[ioff + j * is] = (int32_t)i;
            else
                ((int64_t *)indices->data)[ioff + j * is] = i;
        }
    }
}

int to_cpu_topk(const to_tensor *values, const to_tensor *indices, const to_tensor *x, int64_t k) {
    int64_t rows = to_num_rows(x), n = to_row_len(x);
    if (rows == 0 || n == 0)
        return TO_OK;
    struct topk_job job = {values, indices, x, k, to_simd(), 0};
    to_parallel_for(rows, n >= 32768 ? 1 : 32768 / n, topk_rows, &job);
    if (atomic_load(&job.failed))
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_topk: no memory for a heap of %lld entries", (long long)k);
    return TO_OK;
}
