/* check.c - validation of tensor descriptors, shared by every op. */
#include "internal.h"

#include <stdarg.h>
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
    int64_t numel = 1, last = 0;
    for (int i = 0; i < t->ndim; i++) {
        /* the 2^40 cap keeps the byte arithmetic below from overflowing */
        if (t->shape[i] < 0 || t->strides[i] < 0 || t->shape[i] > (1LL << 40) ||
            t->strides[i] > (1LL << 40))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s has a negative or huge shape or "
                           "stride in dim %d", op, name, i);
        numel *= t->shape[i];
        if (t->shape[i] > 0)
            last += (t->shape[i] - 1) * t->strides[i];
    }
    if (numel == 0)
        return TO_OK;
    if (!t->data)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s has a NULL data pointer", op, name);
    int64_t need = (last + 1) * to_dtype_size(t->dtype);
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

static void shape_str(const to_tensor *t, char *buf, size_t size) {
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
    shape_str(a, sa, sizeof sa);
    shape_str(b, sb, sizeof sb);
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
    return status;
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
