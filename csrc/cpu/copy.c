/* copy.c - strided copy with dtype conversion, and fill.
 * Work is split by rows (all dimensions but the last). Same-dtype rows move bytes; integer to
 * integer goes through int64 (exact); everything else converts through an f32 row. */
#include "cpu/cpu_ops.h"

#include <math.h>

static int is_int(int dtype) { return dtype == TO_I8 || dtype == TO_I32 || dtype == TO_I64 || dtype == TO_U8; }

static int64_t load_i64(const void *p, int dtype, int64_t i) {
    switch (dtype) {
    case TO_I8: return ((const int8_t *)p)[i];
    case TO_I32: return ((const int32_t *)p)[i];
    case TO_I64: return ((const int64_t *)p)[i];
    default: return ((const uint8_t *)p)[i];
    }
}

/* integer narrowing saturates, like the float -> integer path */
static void store_i64(void *p, int dtype, int64_t i, int64_t v) {
    switch (dtype) {
    case TO_I8: ((int8_t *)p)[i] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v); break;
    case TO_I32: ((int32_t *)p)[i] = (int32_t)(v < INT32_MIN ? INT32_MIN : v > INT32_MAX ? INT32_MAX : v); break;
    case TO_I64: ((int64_t *)p)[i] = v; break;
    default: ((uint8_t *)p)[i] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v); break;
    }
}

#define CHUNK 1024 /* elements converted per pass through an f32 row on the stack */

/* Copies len elements from src (stride sx) to dst (stride so), converting dtype. */
static void copy_span(char *dst, int dto, int64_t so, const char *src, int dtx, int64_t sx, int64_t len) {
    int size = to_dtype_size(dtx);
    if (dtx == dto) {
        if (so == 1 && sx == 1) {
            memmove(dst, src, (size_t)(len * size));
        } else {
            for (int64_t i = 0; i < len; i++)
                memcpy(dst + i * so * size, src + i * sx * size, (size_t)size);
        }
    } else if (is_int(dtx) && is_int(dto)) {
        for (int64_t i = 0; i < len; i++)
            store_i64(dst, dto, i * so, load_i64(src, dtx, i * sx));
    } else {
        float tmp[CHUNK];
        for (int64_t i = 0; i < len; i += CHUNK) {
            int64_t n = len - i < CHUNK ? len - i : CHUNK;
            to_load_f32(tmp, src + i * sx * size, dtx, n, sx);
            to_store_f32(dst + i * so * to_dtype_size(dto), dto, tmp, n, so);
        }
    }
}

struct copy_job {
    const to_tensor *out, *x;
};

/* both contiguous: [begin, end) is a range of elements */
static void copy_flat(void *arg, int64_t begin, int64_t end) {
    const struct copy_job *job = arg;
    copy_span(to_elem_ptr(job->out->data, job->out->dtype, begin), job->out->dtype, 1,
              to_elem_ptr(job->x->data, job->x->dtype, begin), job->x->dtype, 1, end - begin);
}

/* strided: [begin, end) is a range of rows */
static void copy_rows(void *arg, int64_t begin, int64_t end) {
    const struct copy_job *job = arg;
    const to_tensor *out = job->out, *x = job->x;
    for (int64_t r = begin; r < end; r++)
        copy_span(to_elem_ptr(out->data, out->dtype, to_row_offset(out, r)), out->dtype,
                  to_row_stride_last(out), to_elem_ptr(x->data, x->dtype, to_row_offset(x, r)),
                  x->dtype, to_row_stride_last(x), to_row_len(out));
}

int to_cpu_copy(const to_tensor *out, const to_tensor *x) {
    struct copy_job job = {out, x};
    if (to_is_contiguous(out) && to_is_contiguous(x))
        to_parallel_for(to_numel(out), 1 << 16, copy_flat, &job);
    else
        to_parallel_for(to_num_rows(out), 64, copy_rows, &job);
    return TO_OK;
}

struct fill_job {
    const to_tensor *out;
    unsigned char pattern[8]; /* one element of the fill value in out's dtype */
};

static void fill_rows(void *arg, int64_t begin, int64_t end) {
    const struct fill_job *job = arg;
    const to_tensor *out = job->out;
    int size = to_dtype_size(out->dtype);
    int64_t n = to_row_len(out), s = to_row_stride_last(out);
    for (int64_t r = begin; r < end; r++) {
        char *dst = to_elem_ptr(out->data, out->dtype, to_row_offset(out, r));
        for (int64_t i = 0; i < n; i++)
            memcpy(dst + i * s * size, job->pattern, (size_t)size);
    }
}

int to_cpu_fill(const to_tensor *out, double value) {
    struct fill_job job = {out, {0}};
    if (is_int(out->dtype)) {
        store_i64(job.pattern, out->dtype, 0, to_double_to_i64(value));
    } else {
        float f = (float)value;
        to_store_f32(job.pattern, out->dtype, &f, 1, 1);
    }
    to_parallel_for(to_num_rows(out), 64, fill_rows, &job);
    return TO_OK;
}
