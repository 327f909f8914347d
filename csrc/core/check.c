/* check.c - validation of tensor descriptors, shared by every op. */
#include "internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

int to_check_tensor(const to_tensor *t, const char *op, const char *name) {
    if (!t)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s is NULL", op, name);
    if (t->dtype < 0 || t->dtype >= TO_DTYPE_COUNT)
        return to_fail(TO_ERR_DTYPE, "%s: %s has unknown dtype %d", op, name, t->dtype);
    if (t->device != TO_CPU && t->device != TO_CUDA)
        return to_fail(TO_ERR_DEVICE, "%s: %s has unknown device %d", op, name, t->device);
    if (t->ndim < 0 || t->ndim > TO_MAX_DIMS)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s has rank %d (0..%d allowed)", op, name,
                       t->ndim, TO_MAX_DIMS);
    int empty = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0 || t->strides[i] < 0)
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s has a negative shape or stride in dim %d",
                           op, name, i);
        empty |= t->shape[i] == 0;
    }
    if (empty)
        return TO_OK; /* no element is ever touched */
    int bs = to_dtype_block_size(t->dtype);
    if (bs > 1) { /* quantized: whole blocks along a unit-stride last dimension */
        if (t->ndim == 0 || t->strides[t->ndim - 1] != 1 || t->shape[t->ndim - 1] % bs)
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s is %s: its last dimension needs unit stride "
                           "and a multiple of %d elements", op, name, to_dtype_name(t->dtype), bs);
        for (int i = 0; i < t->ndim - 1; i++)
            if (t->shape[i] > 1 && t->strides[i] % bs)
                return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s is %s: stride %lld of dim %d is not a "
                               "whole number of %d-element blocks", op, name, to_dtype_name(t->dtype),
                               (long long)t->strides[i], i, bs);
        if (to_is_x8(t->dtype) && (t->ndim != 2 || t->shape[0] % TO_X8_ROWS || !to_is_contiguous(t)))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s is %s, which interleaves the blocks of "
                           "every %d rows: it must be a contiguous 2-D tensor with a multiple of %d "
                           "rows", op, name, to_dtype_name(t->dtype), TO_X8_ROWS, TO_X8_ROWS);
    }
    /* bytes from data to the end of the farthest element, refusing what overflows int64 */
    int64_t need = 0, reach;
    int overflow = 0;
    for (int i = 0; i < t->ndim; i++) {
        overflow |= __builtin_mul_overflow(t->shape[i] - 1, t->strides[i], &reach);
        overflow |= __builtin_add_overflow(need, reach, &need);
    }
    overflow |= __builtin_add_overflow(need, 1, &need);
    overflow |= __builtin_mul_overflow(need / bs, (int64_t)to_dtype_block_bytes(t->dtype), &need);
    if (overflow)
        return to_fail(TO_ERR_BOUNDS, "%s: %s has a shape and strides whose extent overflows 64 bits",
                       op, name);
    if (!t->data)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s has a NULL data pointer", op, name);
    if (t->nbytes < need)
        return to_fail(TO_ERR_BOUNDS, "%s: %s needs %lld bytes for its shape and strides but its "
                       "buffer holds %lld", op, name, (long long)need, (long long)t->nbytes);
    return TO_OK;
}

int to_check_dtype(const to_tensor *t, unsigned mask, const char *op, const char *name) {
    if (mask & TO_MASK(t->dtype))
        return TO_OK;
    char allowed[128] = "";
    for (int d = 0; d < TO_DTYPE_COUNT; d++)
        if (mask & TO_MASK(d)) {
            if (allowed[0])
                strcat(allowed, ", ");
            strcat(allowed, to_dtype_name(d));
        }
    return to_fail(TO_ERR_DTYPE, "%s: %s has dtype %s, expected one of: %s", op, name,
                   to_dtype_name(t->dtype), allowed);
}

int to_check_ndim(const to_tensor *t, int ndim, const char *op, const char *name) {
    if (t->ndim == ndim)
        return TO_OK;
    return to_fail(TO_ERR_SHAPE, "%s: %s must have %d dimensions, got %d", op, name, ndim, t->ndim);
}

void to_shape_str(const to_tensor *t, char *buf, size_t size) {
    size_t n = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < t->ndim && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (n < size)
        snprintf(buf + n, size - n, "]");
}

int to_check_same_shape(const to_tensor *a, const to_tensor *b, const char *op, const char *na,
                        const char *nb) {
    int same = a->ndim == b->ndim;
    for (int i = 0; same && i < a->ndim; i++)
        same = a->shape[i] == b->shape[i];
    if (same)
        return TO_OK;
    char sa[160], sb[160];
    to_shape_str(a, sa, sizeof sa);
    to_shape_str(b, sb, sizeof sb);
    return to_fail(TO_ERR_SHAPE, "%s: %s has shape %s but %s has shape %s", op, na, sa, nb, sb);
}

int to_check_same_device(const char *op, const to_tensor *first, ...) {
    va_list ap;
    va_start(ap, first);
    const to_tensor *t;
    int status = TO_OK;
    while ((t = va_arg(ap, const to_tensor *)) != NULL) {
        if (t->device != first->device || t->device_index != first->device_index) {
            status = to_fail(TO_ERR_DEVICE, "%s: tensors are on different devices (%s:%d and %s:%d)",
                             op, first->device == TO_CPU ? "cpu" : "cuda", first->device_index,
                             t->device == TO_CPU ? "cpu" : "cuda", t->device_index);
            break;
        }
    }
    va_end(ap);
    return status == TO_OK ? to_check_gpu_visible(first, op) : status;
}

int to_check_gpu_visible(const to_tensor *t, const char *op) {
    if (t->device != TO_CUDA)
        return TO_OK;
    int n = 0;
    to_cuda_count(&n);
    if (t->device_index >= 0 && t->device_index < n)
        return TO_OK;
    return to_fail(TO_ERR_DEVICE, "%s: no GPU with index %d (%d visible)", op, t->device_index, n);
}

int to_require_cpu(const to_tensor *t, const char *op) {
    if (t->device == TO_CPU)
        return TO_OK;
    return to_fail(TO_ERR_UNSUPPORTED, "%s: no CUDA kernel for this op yet; use a CPU tensor", op);
}

int64_t to_numel(const to_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

int to_is_contiguous(const to_tensor *t) {
    int64_t expect = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->strides[i] != expect)
            return 0;
        expect *= t->shape[i];
    }
    return 1;
}

int64_t to_num_rows(const to_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i + 1 < t->ndim; i++)
        n *= t->shape[i];
    return n;
}

int64_t to_row_len(const to_tensor *t) { return t->ndim ? t->shape[t->ndim - 1] : 1; }

int64_t to_row_stride_last(const to_tensor *t) { return t->ndim ? t->strides[t->ndim - 1] : 1; }

int64_t to_row_offset(const to_tensor *t, int64_t row) {
    int64_t off = 0;
    for (int i = t->ndim - 2; i >= 0; i--) {
        int64_t n = t->shape[i];
        off += (row % n) * t->strides[i];
        row /= n;
    }
    return off;
}

/* ---- aliasing: a written tensor may share memory with an input only as exactly its view ---- */

/* [lo, hi): the bytes t reaches (hi == lo when t is empty) */
static void byte_span(const to_tensor *t, uintptr_t *lo, uintptr_t *hi) {
    int64_t last = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 0) {
            *lo = *hi = (uintptr_t)t->data;
            return;
        }
        last += (t->shape[i] - 1) * t->strides[i];
    }
    *lo = (uintptr_t)t->data;
    *hi = *lo + (uintptr_t)to_dtype_bytes(t->dtype, last + 1);
}

int to_same_view(const to_tensor *a, const to_tensor *b) {
    if (a->data != b->data || a->dtype != b->dtype || a->ndim != b->ndim || a->device != b->device ||
        a->device_index != b->device_index)
        return 0;
    for (int i = 0; i < a->ndim; i++) {
        if (a->shape[i] != b->shape[i])
            return 0;
        if (a->shape[i] > 1 && a->strides[i] != b->strides[i])
            return 0;
    }
    return 1;
}

int to_spans_overlap(const to_tensor *a, const to_tensor *b) {
    if (a->device != b->device || a->device_index != b->device_index)
        return 0;
    uintptr_t alo, ahi, blo, bhi;
    byte_span(a, &alo, &ahi);
    byte_span(b, &blo, &bhi);
    if (alo == ahi || blo == bhi)
        return 0;
    return alo < bhi && blo < ahi;
}

int to_check_writable(const to_tensor *t, const char *op, const char *name) {
    /* Dimensions longer than one, by increasing stride (insertion sort of at most 8). No element
     * is reached twice if each stride steps past the largest offset the smaller dims reach. */
    int64_t shape[TO_MAX_DIMS], stride[TO_MAX_DIMS];
    int n = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 0)
            return TO_OK; /* empty: nothing is written */
        if (t->shape[i] == 1)
            continue;
        int j = n++;
        while (j > 0 && stride[j - 1] > t->strides[i]) {
            stride[j] = stride[j - 1];
            shape[j] = shape[j - 1];
            j--;
        }
        stride[j] = t->strides[i];
        shape[j] = t->shape[i];
    }
    int64_t reach = 0;
    for (int i = 0; i < n; i++) {
        if (stride[i] <= reach)
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s is written but some of its elements "
                           "share memory (a stride-0 broadcast dimension or overlapping strides); "
                           "pass a tensor with distinct elements", op, name);
        reach += stride[i] * (shape[i] - 1);
    }
    return TO_OK;
}

int to_check_no_alias(const to_tensor *w, const to_tensor *r, int allow_same_view, const char *op,
                      const char *wname, const char *rname) {
    if (!to_spans_overlap(w, r))
        return TO_OK;
    if (allow_same_view && to_same_view(w, r))
        return TO_OK;
    if (allow_same_view)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s overlaps %s in memory but is not the same "
                       "view (working in place needs exactly the same data pointer, dtype, shape "
                       "and strides)", op, wname, rname);
    return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s overlaps %s in memory, which this op does not "
                   "allow", op, wname, rname);
}

/* bytes one index of dimension 0 of t reaches, from its first (0 when t is empty) */
static int64_t row_reach(const to_tensor *t) {
    int64_t last = 0;
    for (int i = 1; i < t->ndim; i++) {
        if (t->shape[i] == 0)
            return 0;
        last += (t->shape[i] - 1) * t->strides[i];
    }
    return (last + 1) * to_dtype_size(t->dtype);
}

int to_rows_disjoint(const to_tensor *a, const to_tensor *b) {
    if (a->ndim < 1 || b->ndim < 1)
        return 0;
    /* a's rows cover [k P, k P + ra), b's [d + m P, d + m P + rb) with d = (b - a) mod P: no
     * element is shared when, within one period, b's row sits after a's and ends by the next */
    const int64_t period = a->strides[0] * to_dtype_size(a->dtype); /* 0 for block types */
    if (period <= 0 || b->strides[0] * to_dtype_size(b->dtype) != period)
        return 0;
    const int64_t ra = row_reach(a), rb = row_reach(b);
    int64_t d = (int64_t)((uintptr_t)b->data - (uintptr_t)a->data) % period;
    if (d < 0)
        d += period;
    return ra <= d && d + rb <= period;
}

int to_check_norm_weight(const char *op, const to_tensor *weight, int64_t d, double eps) {
    TO_TRY(to_check_tensor(weight, op, "weight"));
    TO_TRY(to_check_dtype(weight, TO_FLOAT_DTYPES, op, "weight"));
    TO_TRY(to_check_ndim(weight, 1, op, "weight [d]"));
    if (weight->shape[0] != d)
        return to_fail(TO_ERR_SHAPE, "%s: weight has shape [%lld] but the last dimension of x is %lld",
                       op, (long long)weight->shape[0], (long long)d);
    if (!(eps >= 0.0) || isinf(eps)) /* !(>=) also catches NaN */
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: eps must be finite and >= 0, got %g", op, eps);
    return TO_OK;
}
