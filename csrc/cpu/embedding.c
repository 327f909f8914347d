/* embedding.c - table row lookup, and the index helpers shared with the MoE kernels.
 *
 * A lookup is pure data movement: rows of the same dtype are copied as bytes (memcpy when both
 * rows are contiguous), rows of different float dtypes go through a small f32 buffer on the
 * stack (to_convert_span: to_load_f32/to_store_f32, which have their own AVX2 paths), and rows
 * of a quantized table are dequantized into that buffer (cpu/quant.c). Threads take
 * ranges of output rows. Every id is checked before the first row is written, so a bad id leaves
 * out untouched. */
#include "cpu/embedding.h"
#include "cpu/qmatmul.h"
#include "cpu/quant.h"

#include <stdatomic.h>
#include <stdio.h>

/* "[3]" or "[2, 5]": the position of element (row r, column j) of t in its own dimensions. */
static void format_position(char *buf, size_t size, const to_tensor *t, int64_t r, int64_t j) {
    int64_t idx[TO_MAX_DIMS] = {0};
    if (t->ndim > 0)
        idx[t->ndim - 1] = j;
    for (int d = t->ndim - 2; d >= 0; d--) {
        idx[d] = r % t->shape[d];
        r /= t->shape[d];
    }
    size_t n = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < t->ndim && n < size; d++)
        n += (size_t)snprintf(buf + n, size - n, d ? ", %lld" : "%lld", (long long)idx[d]);
    if (n < size)
        snprintf(buf + n, size - n, "]");
}

int to_cpu_check_indices(const to_tensor *ids, int64_t limit, const char *op, const char *name,
                         const char *what) {
    int64_t rows = to_num_rows(ids), len = to_row_len(ids), s = to_row_stride_last(ids);
    for (int64_t r = 0; r < rows; r++) {
        int64_t off = to_row_offset(ids, r);
        for (int64_t j = 0; j < len; j++) {
            int64_t v = to_load_index(ids->data, ids->dtype, off + j * s);
            if (v < 0 || v >= limit) {
                char pos[200];
                format_position(pos, sizeof pos, ids, r, j);
                return to_fail(TO_ERR_BOUNDS, "%s: %s%s = %lld is outside [0, %lld) (%s)", op, name,
                               pos, (long long)v, (long long)limit, what);
            }
        }
    }
    return TO_OK;
}

void to_cpu_copy_row(void *dst, int dto, int64_t so, const void *src, int dtx, int64_t sx, int64_t n) {
    int xsize = to_dtype_size(dtx);
    if (dto == dtx) {
        if (so == 1 && sx == 1) {
            memcpy(dst, src, (size_t)to_dtype_bytes(dtx, n));
            return;
        }
        /* strided: one element at a time, by size, so the loop has no memcpy calls */
        switch (xsize) {
        case 1:
            for (int64_t i = 0; i < n; i++)
                ((uint8_t *)dst)[i * so] = ((const uint8_t *)src)[i * sx];
            break;
        case 2:
            for (int64_t i = 0; i < n; i++)
                ((uint16_t *)dst)[i * so] = ((const uint16_t *)src)[i * sx];
            break;
        case 4:
            for (int64_t i = 0; i < n; i++)
                ((uint32_t *)dst)[i * so] = ((const uint32_t *)src)[i * sx];
            break;
        default:
            for (int64_t i = 0; i < n; i++)
                ((uint64_t *)dst)[i * so] = ((const uint64_t *)src)[i * sx];
            break;
        }
        return;
    }
    to_convert_span(dst, dto, so, src, dtx, sx, n); /* a quantized src is dequantized */
}

struct embedding_job {
    const to_tensor *out, *table, *ids;
    atomic_int failed;
};

static void embedding_rows(void *arg, int64_t begin, int64_t end) {
    struct embedding_job *job = arg;
    const to_tensor *out = job->out, *table = job->table, *ids = job->ids;
    int64_t D = table->shape[1];
    /* a row-interleaved table's row is first gathered into the plain blocks of its base type */
    int dt = to_is_x8(table->dtype) ? to_x8_base(table->dtype) : table->dtype;
    char *plain = NULL;
    if (dt != table->dtype && !(plain = to_scratch(2, (size_t)to_dtype_bytes(dt, D)))) {
        atomic_store(&job->failed, 1);
        return;
    }
    for (int64_t t = begin; t < end; t++) {
        int64_t id = to_load_index(ids->data, ids->dtype, t * ids->strides[0]);
        char *orow = to_elem_ptr(out->data, out->dtype, t * out->strides[0]);
        if (plain) {
            to_x8_gather_row(table->dtype, table->data, id, D / TO_QK, plain);
            to_cpu_copy_row(orow, out->dtype, out->strides[1], plain, dt, 1, D);
        } else {
            to_cpu_copy_row(orow, out->dtype, out->strides[1], to_elem_ptr(table->data, table->dtype, id * table->strides[0]),
                            table->dtype, table->strides[1], D);
        }
    }
}

int to_cpu_embedding(const to_tensor *out, const to_tensor *table, const to_tensor *ids) {
    TO_TRY(to_cpu_check_indices(ids, table->shape[0], "to_embedding", "ids", "the table's rows"));
    int64_t T = out->shape[0], D = out->shape[1];
    if (T == 0 || D == 0)
        return TO_OK;
    /* a thread is worth waking for about 64 KB of output */
    int64_t row_bytes = D * to_dtype_size(out->dtype);
    int64_t min_rows = row_bytes >= 65536 ? 1 : 65536 / row_bytes;
    struct embedding_job job = {out, table, ids, 0};
    to_parallel_for(T, min_rows, embedding_rows, &job);
    if (atomic_load(&job.failed))
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_embedding: out of memory for a table row");
    return TO_OK;
}
