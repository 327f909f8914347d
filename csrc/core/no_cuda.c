/* no_cuda.c - the CUDA entry points of a build without nvcc: no GPUs, clear errors. */
#include "internal.h"

static int no_cuda(const char *what) {
    return to_fail(TO_ERR_DEVICE, "%s: this build of libtensor_ops has no CUDA support "
                   "(rebuild where nvcc is on the PATH)", what);
}

int to_cuda_compiled(void) { return 0; }

int to_cuda_count(int *out) {
    *out = 0;
    return TO_OK;
}

int to_cuda_alloc(int device_index, int64_t nbytes, void **out) {
    (void)device_index, (void)nbytes;
    *out = NULL;
    return no_cuda("to_alloc");
}

int to_cuda_free(int device_index, void *ptr) {
    (void)device_index, (void)ptr;
    return no_cuda("to_free");
}

int to_cuda_sync(int device_index) {
    (void)device_index;
    return no_cuda("to_cuda_synchronize");
}

int to_cuda_memcpy(int device_index, void *dst, const void *src, int64_t nbytes, int kind) {
    (void)device_index, (void)dst, (void)src, (void)nbytes, (void)kind;
    return no_cuda("to_copy");
}
