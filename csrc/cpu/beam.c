/* beam.c - one beam-search step's candidates (to_beam_topk; the rule is in tensor_ops.h).
 *
 * A candidate is ranked by one 64-bit key: the high half is its value mapped to an unsigned
 * integer that grows with it (-0.0 onto +0.0; values are never NaN), the low half the complement
 * of its flat index b * V + t within the group, so a larger key is a better candidate and no two
 * candidates of a group share a key.
 *
 * Two phases:
 *  1. each (group, beam row) on its own (rows of all groups split over threads): the row's max m
 *     and the sum s of exp(x - m) (checking the logits as they go; exp is libm's expf, or on AVX2
 *     elementwise.c's polynomial, within 2 ulp), then one pass keeping the row's best
 *     kr = min(k, V) in a binary min-heap of keys. The value ((x - m) - ln s) + score never
 *     decreases as the logit x grows, so once the heap is full only a logit above the root's can
 *     enter (tokens come in index order, so an equal value loses its tie): most of the row is one
 *     compare per logit, and only those few get their value. The kept keys are heap-sorted, best
 *     first.
 *  2. each group: its k best among its rows' kr best each (the group's k best are among those),
 *     by the same heap, written out. */
#include "cpu/beam.h"
#include "cpu/embedding.h"
#include "cpu/heap.h"
#include "cpu/order_key.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>

#define CHUNK 2048 /* values per chunk: 8 KB of f32 on the stack */


/* A min-heap of the best `k` keys so far (the root is the worst of them). */
typedef struct {
    uint64_t *heap;
    int64_t k, count;
} best_t;

static inline void offer(best_t *b, uint64_t key) {
    if (b->count < b->k) {
        b->heap[b->count] = key;
        heap_sift_up(b->heap, b->count++);
    } else if (key > b->heap[0]) {
        b->heap[0] = key;
        heap_sift_down(b->heap, b->k, 0);
    }
}

/* heap sort: moving the smallest key to the end each time leaves the best first */
static void sort_best_first(uint64_t *heap, int64_t n) {
    for (int64_t m = n - 1; m > 0; m--) {
        uint64_t e = heap[0];
        heap[0] = heap[m];
        heap[m] = e;
        heap_sift_down(heap, m, 0);
    }
}

struct beam_job {
    const to_tensor *logits, *beam_scores, *groups, *suppress;
    int64_t V;
    int64_t *item_group, *item_beam; /* per (group, beam row) item: its group and beam */
    int64_t *item_key0;              /* where its kr keys go in `keys` */
    int64_t *group_key0;             /* where a group's rows' keys start */
    uint64_t *keys;
    atomic_llong bad;                /* lowest bad logits row * 4 + what is wrong with it (1 NaN,
                                        2 +inf, 3 all -inf); LLONG_MAX: none */
    atomic_int no_memory;
    int simd;
};

static int64_t group_field(const to_tensor *groups, int64_t g, int f) {
    return to_load_index(groups->data, groups->dtype, g * groups->strides[0] + f * groups->strides[1]);
}

static int64_t kept_per_row(const struct beam_job *job, int64_t g) {
    int64_t k = group_field(job->groups, g, 2);
    return k < job->V ? k : job->V;
}

/* Keeps the lowest bad row, whatever the threads' timing: row * 4 + kind in one atomic minimum. */
static void report_bad(struct beam_job *job, int64_t row, int kind) {
    long long want = (long long)row * 4 + kind, cur = atomic_load(&job->bad);
    while (want < cur && !atomic_compare_exchange_weak(&job->bad, &cur, want))
        ;
}

/* values [j, j + n) of a row as f32 (in place for an f32 row of unit stride) */
static const float *chunk_at(const char *row, int dtype, int64_t stride, int64_t j, int64_t n, float *buf) {
    if (dtype == TO_F32 && stride == 1)
        return (const float *)row + j;
    to_load_f32(buf, row + j * stride * to_dtype_size(dtype), dtype, n, stride);
    return buf;
}

static double exp_sum_scalar(const float *p, int64_t n, float m) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += (double)expf(p[i] - m);
    return s;
}

/* m and ln s of a row (see the top of the file); 0 when the row is bad (reported) */
static int row_lse(struct beam_job *job, const char *row, int64_t r, float *m_out, float *ls_out) {
    const to_tensor *x = job->logits;
    const int64_t V = job->V, sx = x->strides[1];
    float buf[CHUNK];
    float m = -INFINITY;
    int nan = 0;
    for (int64_t j = 0; j < V; j += CHUNK) {
        int64_t n = V - j < CHUNK ? V - j : CHUNK;
        const float *p = chunk_at(row, x->dtype, sx, j, n, buf);
        for (int64_t i = 0; i < n; i++) {
            m = p[i] > m ? p[i] : m;
            nan |= p[i] != p[i];
        }
    }
    if (nan || m == INFINITY || m == -INFINITY) {
        report_bad(job, r, nan ? 1 : m == INFINITY ? 2 : 3);
        return 0;
    }
    double s = 0.0;
    for (int64_t j = 0; j < V; j += CHUNK) {
        int64_t n = V - j < CHUNK ? V - j : CHUNK;
        const float *p = chunk_at(row, x->dtype, sx, j, n, buf);
        s += job->simd >= TO_SIMD_AVX2 ? exp_sum_avx2(p, n, m) : exp_sum_scalar(p, n, m);
    }
    *m_out = m;
    *ls_out = (float)log(s);
    return 1;
}

/* The value of token t of a row, -inf when the group suppresses it. */
static inline float value_of(const struct beam_job *job, int64_t g, float x, float m, float ls, float score,
                             int64_t t) {
    const to_tensor *sup = job->suppress;
    for (int64_t q = 0; sup && q < sup->shape[1]; q++)
        if (to_load_index(sup->data, sup->dtype, g * sup->strides[0] + q * sup->strides[1]) == t)
            return -INFINITY;
    return ((x - m) - ls) + score;
}

/* phase 1: [begin, end) is a range of (group, beam row) items */
static void beam_rows(void *arg, int64_t begin, int64_t end) {
    struct beam_job *job = arg;
    const to_tensor *x = job->logits;
    const int64_t V = job->V, sx = x->strides[1];
    float buf[CHUNK];
    for (int64_t it = begin; it < end; it++) {
        const int64_t g = job->item_group[it], b = job->item_beam[it];
        const int64_t r = group_field(job->groups, g, 0) + b, kr = kept_per_row(job, g);
        uint64_t *heap = to_scratch(0, (size_t)kr * sizeof(uint64_t));
        if (!heap) {
            atomic_store(&job->no_memory, 1);
            return;
        }
        const char *row = to_elem_ptr(x->data, x->dtype, r * x->strides[0]);
        float m, ls;
        if (!row_lse(job, row, r, &m, &ls))
            continue;
        const float score = ((const float *)job->beam_scores->data)[r * job->beam_scores->strides[0]];
        const int64_t flat0 = b * V;
        /* The value is a non-decreasing function of the logit, so once the heap is full a token
         * whose logit is not above the root's cannot have a larger value, nor an equal one with a
         * lower index: only logits above x_root need their value (unless the root is -inf: a
         * suppressed token, whose logit says nothing). */
        best_t best = {heap, kr, 0};
        float x_root = -INFINITY;
        for (int64_t j = 0; j < V; j += CHUNK) {
            int64_t n = V - j < CHUNK ? V - j : CHUNK;
            const float *p = chunk_at(row, x->dtype, sx, j, n, buf);
            int64_t i = 0;
            for (; i < n && best.count < kr; i++)
                offer(&best, make_key(value_of(job, g, p[i], m, ls, score, j + i), flat0 + j + i));
            if (best.count < kr)
                continue;
            for (;;) {
                if (key_value(heap[0]) != -INFINITY) {
                    int64_t t = key_index(heap[0]) - flat0;
                    to_load_f32(&x_root, row + t * sx * to_dtype_size(x->dtype), x->dtype, 1, 1);
                } else {
                    x_root = -INFINITY;
                }
                while (i < n && !(p[i] > x_root))
                    i++;
                if (i == n)
                    break;
                offer(&best, make_key(value_of(job, g, p[i], m, ls, score, j + i), flat0 + j + i));
                i++;
            }
        }
        sort_best_first(heap, kr);
        memcpy(job->keys + job->item_key0[it], heap, (size_t)kr * sizeof(uint64_t));
    }
}

/* phase 2: [begin, end) is a range of groups */
static void beam_groups(void *arg, int64_t begin, int64_t end) {
    struct beam_job *job = arg;
    for (int64_t g = begin; g < end; g++) {
        const int64_t rows = group_field(job->groups, g, 1), k = group_field(job->groups, g, 2);
        const int64_t n = rows * kept_per_row(job, g);
        uint64_t *heap = to_scratch(0, (size_t)k * sizeof(uint64_t));
        if (!heap) {
            atomic_store(&job->no_memory, 1);
            return;
        }
        best_t best = {heap, k, 0};
        const uint64_t *keys = job->keys + job->group_key0[g];
        for (int64_t i = 0; i < n; i++)
            offer(&best, keys[i]);
        sort_best_first(heap, k);
        /* the group's k best, in place of its rows' (rows * kr >= k of them, all read above) */
        memcpy(job->keys + job->group_key0[g], heap, (size_t)k * sizeof(uint64_t));
    }
}

int to_cpu_beam_topk(const to_tensor *scores, const to_tensor *ids, const to_tensor *logits,
                     const to_tensor *beam_scores, const to_tensor *groups, const to_tensor *suppress) {
    const int64_t G = groups->shape[0], K = scores->shape[1];
    struct beam_job job = {0};
    job.logits = logits, job.beam_scores = beam_scores, job.groups = groups, job.suppress = suppress;
    job.V = logits->shape[1];
    job.simd = to_simd();
    atomic_init(&job.bad, LLONG_MAX);
    atomic_init(&job.no_memory, 0);
    int64_t items = 0, nkeys = 0;
    for (int64_t g = 0; g < G; g++) {
        items += group_field(groups, g, 1);
        nkeys += group_field(groups, g, 1) * kept_per_row(&job, g);
    }
    job.item_group = to_host_alloc((size_t)(3 * items + G) * sizeof(int64_t) + 1);
    job.keys = to_host_alloc((size_t)nkeys * sizeof(uint64_t) + 1);
    if (!job.item_group || !job.keys) {
        to_host_free(job.item_group);
        to_host_free(job.keys);
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_beam_topk: no memory for %lld candidates", (long long)nkeys);
    }
    job.item_beam = job.item_group + items;
    job.item_key0 = job.item_beam + items;
    job.group_key0 = job.item_key0 + items;
    for (int64_t g = 0, it = 0, key = 0; g < G; g++) {
        const int64_t rows = group_field(groups, g, 1), kr = kept_per_row(&job, g);
        job.group_key0[g] = key;
        for (int64_t b = 0; b < rows; b++, it++, key += kr) {
            job.item_group[it] = g;
            job.item_beam[it] = b;
            job.item_key0[it] = key;
        }
    }
    /* a thread is worth waking for about 32K logits */
    int64_t V = job.V;
    to_parallel_for(items, V >= 32768 ? 1 : 32768 / V, beam_rows, &job);
    int status = TO_OK;
    if (atomic_load(&job.no_memory)) {
        status = to_fail(TO_ERR_OUT_OF_MEMORY, "to_beam_topk: no memory for a heap of candidates");
    } else if (atomic_load(&job.bad) != LLONG_MAX) {
        static const char *what[] = {"is bad", "holds NaN", "holds +inf (logits must be finite or -inf)",
                                     "is all -inf (no token has a probability)"};
        long long bad = atomic_load(&job.bad);
        status = to_fail(TO_ERR_INVALID_ARGUMENT, "to_beam_topk: logits row %lld %s", bad / 4, what[bad % 4]);
    } else {
        to_parallel_for(G, 64, beam_groups, &job);
        if (atomic_load(&job.no_memory))
            status = to_fail(TO_ERR_OUT_OF_MEMORY, "to_beam_topk: no memory for a heap of candidates");
    }
    for (int64_t g = 0; g < G && status == TO_OK; g++) {
        const int64_t k = group_field(groups, g, 2);
        const uint64_t *best = job.keys + job.group_key0[g];
        float *sc = (float *)scores->data + g * scores->strides[0];
        int64_t *id = (int64_t *)ids->data + g * ids->strides[0];
        for (int64_t j = 0; j < K; j++) {
            sc[j * scores->strides[1]] = j < k ? key_value(best[j]) : -INFINITY;
            id[j * ids->strides[1]] = j < k ? key_index(best[j]) : -1;
        }
    }
    to_host_free(job.item_group);
    to_host_free(job.keys);
    return status;
}
