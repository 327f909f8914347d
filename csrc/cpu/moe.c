/* moe.c - MoE routing: group token assignments by expert, and add expert outputs back.
 *
 * gather_by_value is a stable counting sort of the T*k assignments by their value (expert id):
 * count per value, prefix sums into offsets, then walk the assignments in order and drop each
 * into its value's next free slot. It is O(T*k + num_values) and serial (a few thousand entries
 * even for a long prefill); only the optional row gather, which moves T*k rows of D values, is
 * spread over threads.
 *
 * scatter_add_by_index first groups the contributions by destination row (the same stable
 * counting sort, so each row's list is in increasing i). Then every touched row is loaded once
 * into f32, gets its contributions added in that order, and is rounded back to out's dtype once:
 * deterministic, and a bf16 output is rounded once per row instead of once per contribution.
 * Threads split the columns D, never the rows, so no two threads touch the same element
 * whatever the indices are. */
#include "cpu/moe.h"
#include "cpu/embedding.h"

#include <immintrin.h>

#define CHUNK 512 /* columns per pass: two 2 KB f32 buffers on the stack */

/* ============================================================================ gather_by_value */

struct gather_job {
    const to_tensor *rows, *order, *x;
    int64_t k;
};

static void gather_rows(void *arg, int64_t begin, int64_t end) {
    const struct gather_job *job = arg;
    const to_tensor *rows = job->rows, *order = job->order, *x = job->x;
    int64_t D = x->shape[1];
    for (int64_t i = begin; i < end; i++) {
        int64_t t = to_load_index(order->data, order->dtype, i * order->strides[0]) / job->k;
        to_cpu_copy_row(to_elem_ptr(rows->data, rows->dtype, i * rows->strides[0]), rows->dtype,
                        rows->strides[1], to_elem_ptr(x->data, x->dtype, t * x->strides[0]), x->dtype,
                        x->strides[1], D);
    }
}

int to_cpu_gather_by_value(const to_tensor *rows, const to_tensor *order, const to_tensor *offsets,
                           const to_tensor *x, const to_tensor *values, int64_t num_values) {
    TO_TRY(to_cpu_check_indices(values, num_values, "to_gather_by_value", "values",
                                "num_values, the number of distinct values"));
    int64_t T = values->shape[0], k = values->shape[1];
    int64_t *next = to_scratch(1, (size_t)(num_values + 1) * sizeof(int64_t));
    if (!next)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_gather_by_value: no memory for %lld counters",
                       (long long)num_values + 1);

    /* next[e + 1] = how many assignments have value e; prefix sums make next[e] the start of
     * value e's range, which is offsets[e] */
    memset(next, 0, (size_t)(num_values + 1) * sizeof(int64_t));
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++)
            next[to_load_index(values->data, values->dtype, t * values->strides[0] + j * values->strides[1]) + 1]++;
    for (int64_t e = 0; e < num_values; e++)
        next[e + 1] += next[e];
    for (int64_t e = 0; e <= num_values; e++)
        to_store_index(offsets->data, offsets->dtype, e * offsets->strides[0], next[e]);

    /* assignments in increasing a = t * k + j: each value's range fills in order (stable) */
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int64_t e = to_load_index(values->data, values->dtype, t * values->strides[0] + j * values->strides[1]);
            to_store_index(order->data, order->dtype, next[e]++ * order->strides[0], t * k + j);
        }

    if (rows && T * k > 0 && x->shape[1] > 0) {
        int64_t row_bytes = x->shape[1] * to_dtype_size(rows->dtype);
        struct gather_job job = {rows, order, x, k};
        to_parallel_for(T * k, row_bytes >= 65536 ? 1 : 65536 / row_bytes, gather_rows, &job);
    }
    return TO_OK;
}

/* ====================================================================== scatter_add_by_index */

/* acc[j] += w * s[j]. Multiply, then add (no FMA), so both paths give the same bits. */
static void axpy_scalar(float *acc, const float *s, float w, int64_t n) {
    for (int64_t j = 0; j < n; j++)
        acc[j] = acc[j] + w * s[j];
}

TO_TARGET_AVX2 static void axpy_avx2(float *acc, const float *s, float w, int64_t n) {
    __m256 vw = _mm256_set1_ps(w);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), _mm256_mul_ps(vw, _mm256_loadu_ps(s + j))));
    for (; j < n; j++)
        acc[j] = acc[j] + w * s[j];
}

struct scatter_job {
    const to_tensor *out, *src, *index, *weight;
    const int64_t *start; /* [T + 1]: row r's contributions are list[start[r] : start[r + 1]] */
    const int64_t *list;  /* [N]: contribution ids i, grouped by row, increasing within a row */
    int simd;
};

static void scatter_cols(void *arg, int64_t c0, int64_t c1) {
    const struct scatter_job *job = arg;
    const to_tensor *out = job->out, *src = job->src, *weight = job->weight;
    int64_t T = out->shape[0];
    int64_t os0 = out->strides[0], os1 = out->strides[1], ss0 = src->strides[0], ss1 = src->strides[1];
    int direct = src->dtype == TO_F32 && ss1 == 1; /* f32 source rows are read in place */
    float acc[CHUNK], tmp[CHUNK];
    for (int64_t c = c0; c < c1; c += CHUNK) {
        int64_t m = c1 - c < CHUNK ? c1 - c : CHUNK;
        for (int64_t r = 0; r < T; r++) {
            int64_t p = job->start[r], p_end = job->start[r + 1];
            if (p == p_end)
                continue;
            char *orow = to_elem_ptr(out->data, out->dtype, r * os0 + c * os1);
            to_load_f32(acc, orow, out->dtype, m, os1);
            for (; p < p_end; p++) {
                int64_t i = job->list[p];
                const char *srow = to_elem_ptr(src->data, src->dtype, i * ss0 + c * ss1);
                const float *s = (const float *)srow;
                if (!direct) {
                    to_load_f32(tmp, srow, src->dtype, m, ss1);
                    s = tmp;
                }
                float w = weight ? ((const float *)weight->data)[i * weight->strides[0]] : 1.0f;
                if (job->simd >= TO_SIMD_AVX2)
                    axpy_avx2(acc, s, w, m);
                else
                    axpy_scalar(acc, s, w, m);
            }
            to_store_f32(orow, out->dtype, acc, m, os1);
        }
    }
}

int to_cpu_scatter_add_by_index(const to_tensor *out, const to_tensor *src, const to_tensor *index,
                                const to_tensor *weight) {
    int64_t T = out->shape[0], D = out->shape[1], N = src->shape[0];
    TO_TRY(to_cpu_check_indices(index, T, "to_scatter_add_by_index", "index", "the rows of out"));
    if (N == 0 || D == 0)
        return TO_OK;
    int64_t *start = to_scratch(2, (size_t)(T + 1 + N) * sizeof(int64_t));
    if (!start)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_scatter_add_by_index: no memory to group %lld "
                       "contributions", (long long)N);
    int64_t *list = start + T + 1;

    /* stable counting sort of the contributions by destination row */
    memset(start, 0, (size_t)(T + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < N; i++)
        start[to_load_index(index->data, index->dtype, i * index->strides[0]) + 1]++;
    for (int64_t r = 0; r < T; r++)
        start[r + 1] += start[r];
    /* place, using start[r] as row r's cursor; afterwards start[r] has moved to the old
     * start[r + 1], so shifting everything right by one restores the starts */
    for (int64_t i = 0; i < N; i++)
        list[start[to_load_index(index->data, index->dtype, i * index->strides[0])]++] = i;
    for (int64_t r = T; r > 0; r--)
        start[r] = start[r - 1];
    start[0] = 0;

    struct scatter_job job = {out, src, index, weight, start, list, to_simd()};
    /* a thread is worth waking for about 32K multiply-adds */
    int64_t min_cols = N >= 32768 / 64 ? 64 : 32768 / N;
    to_parallel_for(D, min_cols, scatter_cols, &job);
    return TO_OK;
}
