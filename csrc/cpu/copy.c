/* copy.c - strided copy with dtype conversion, and fill.
 * Work is split by rows (all dimensions but the last), or by whole blocks when both tensors are
 * contiguous. Same-dtype rows move bytes (block-quantized ones as whole blocks); integer to
 * integer goes through int64 (exact); everything else converts through an f32 row, which
 * dequantizes a quantized source and quantizes into a quantized destination (cpu/quant.c). */
#include "cpu/cpu_ops.h"
#include "cpu/quant.h"

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

/* Copies len elements from src (stride sx) to dst (stride so), converting dtype. A quantized side
 * has stride 1 and len is a whole number of its blocks (to_check_tensor's rule for its rows). */
static void copy_span(char *dst, int dto, int64_t so, const char *src, int dtx, int64_t sx, int64_t len) {
    if (dtx == dto) {
        int size = to_dtype_size(dtx);
        if (so == 1 && sx == 1) { /* whole blocks for quantized dtypes */
            memmove(dst, src, (size_t)to_dtype_bytes(dtx, len));
        } else {
            for (int64_t i = 0; i < len; i++)
                memcpy(dst + i * so * size, src + i * sx * size, (size_t)size);
        }
    } else if (is_int(dtx) && is_int(dto)) {
        for (int64_t i = 0; i < len; i++)
            store_i64(dst, dto, i * so, load_i64(src, dtx, i * sx));
    } else {
        to_convert_span(dst, dto, so, src, dtx, sx, len);
    }
}

struct copy_job {
    const to_tensor *out, *x;
    int64_t unit; /* elements per work item of copy_flat: the larger block size of the two */
};

/* both contiguous: [begin, end) is a range of units (whole blocks of both dtypes) */
static void copy_flat(void *arg, int64_t begin, int64_t end) {
    const struct copy_job *job = arg;
    int64_t first = begin * job->unit, len = (end - begin) * job->unit;
    copy_span(to_elem_ptr(job->out->data, job->out->dtype, first), job->out->dtype, 1,
              to_elem_ptr(job->x->data, job->x->dtype, first), job->x->dtype, 1, len);
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
    int bo = to_dtype_block_size(out->dtype), bx = to_dtype_block_size(x->dtype);
    struct copy_job job = {out, x, bo > bx ? bo : bx}; /* 256 is a multiple of 32 */
    /* (de)quantizing costs far more per element than moving bytes: smaller pieces per thread */
    int coding = out->dtype != x->dtype && (bo > 1 || bx > 1);
    int64_t min_flat = coding ? 1 << 12 : 1 << 16;
    if (to_is_contiguous(out) && to_is_contiguous(x))
        to_parallel_for(to_numel(out) / job.unit, (min_flat + job.unit - 1) / job.unit, copy_flat, &job);
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
