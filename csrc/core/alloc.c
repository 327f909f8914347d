/* alloc.c - host and device memory behind one entry point. */
#include "internal.h"

#include <stdlib.h>

void *to_host_alloc(size_t nbytes) {
    void *p = NULL;
    /* round up so SIMD tails may read a whole vector past the last element */
    size_t size = (nbytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, size ? size : 64) != 0)
        return NULL;
    return p;
}

void to_host_free(void *p) { free(p); }

int to_alloc(int device, int device_index, int64_t nbytes, void **out) {
    if (!out)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_alloc: out is NULL");
    *out = NULL;
    if (nbytes < 0)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_alloc: negative size %lld", (long long)nbytes);
    if (device == TO_CPU) {
        *out = to_host_alloc((size_t)nbytes);
        if (!*out)
            return to_fail(TO_ERR_OUT_OF_MEMORY, "to_alloc: cannot allocate %lld bytes of host memory",
                           (long long)nbytes);
        return TO_OK;
    }
    if (device == TO_CUDA)
        return to_cuda_alloc(device_index, nbytes, out);
    return to_fail(TO_ERR_DEVICE, "to_alloc: unknown device %d", device);
}

int to_free(int device, int device_index, void *ptr) {
    if (!ptr)
        return TO_OK;
    if (device == TO_CPU) {
        to_host_free(ptr);
        return TO_OK;
    }
    if (device == TO_CUDA)
        return to_cuda_free(device_index, ptr);
    return to_fail(TO_ERR_DEVICE, "to_free: unknown device %d", device);
}

int to_cuda_device_count(int *out) {
    if (!out)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_cuda_device_count: out is NULL");
    return to_cuda_count(out);
}

int to_cuda_available(void) { return to_cuda_compiled(); }

int to_cuda_synchronize(int device_index) { return to_cuda_sync(device_index); }
