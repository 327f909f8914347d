/* readback.c - to_readback_start / wait / release: validation, the live handles, the CPU path.
 *
 * A handle is a small host record, listed while live so that a wait or release can tell a live
 * handle from a stale, doubled or made-up pointer without touching the memory it points to.
 * A GPU read is device.cu's (an event and pinned memory, see to_cuda_readback_start); a CPU
 * tensor's bytes are copied into the record at start, so both kinds read the same to the caller
 * (the engine has one code path whatever the device). */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>

typedef struct readback {
    struct readback *next; /* the live list */
    int device;
    int64_t nbytes;
    void *gpu; /* device.cu's read (TO_CUDA) */
    /* TO_CPU: nbytes of data follow */
} readback;

static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static readback *live;

static void link_live(readback *h) {
    pthread_mutex_lock(&live_lock);
    h->next = live;
    live = h;
    pthread_mutex_unlock(&live_lock);
}

/* The live record at `handle`, taken off the list when nbytes (>= 0) matches its size or is -1
 * (a release); NULL with an error otherwise (the handle then stays as it was). */
static readback *take_live(void *handle, int64_t nbytes, const char *op) {
    readback *found = NULL;
    int64_t size = 0;
    pthread_mutex_lock(&live_lock);
    for (readback **p = &live; *p; p = &(*p)->next) {
        if (*p == handle) {
            found = *p;
            size = found->nbytes;
            if (nbytes < 0 || nbytes == size)
                *p = found->next;
            break;
        }
    }
    pthread_mutex_unlock(&live_lock);
    if (!found) {
        to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %p is not a live handle of to_readback_start (already "
                "waited for or released?)", op, handle);
        return NULL;
    }
    if (nbytes >= 0 && nbytes != size) {
        to_fail(TO_ERR_INVALID_ARGUMENT, "%s: nbytes is %lld but the tensor read back has %lld bytes",
                op, (long long)nbytes, (long long)size);
        return NULL;
    }
    return found;
}

int to_readback_start(const to_tensor *src, void **handle) {
    if (!handle)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_readback_start: handle is NULL");
    *handle = NULL;
    TO_TRY(to_check_tensor(src, "to_readback_start", "src"));
    if (!to_is_contiguous(src))
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_readback_start: src must be contiguous (copy it "
                       "into a contiguous tensor first)");
    if (src->device == TO_CUDA)
        TO_TRY(to_check_gpu_visible(src, "to_readback_start"));
    int64_t nbytes = to_dtype_bytes(src->dtype, to_numel(src));
    int cpu = src->device == TO_CPU;
    readback *h = malloc(sizeof *h + (cpu ? (size_t)nbytes : 0));
    if (!h)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_readback_start: out of host memory");
    h->device = src->device;
    h->nbytes = nbytes;
    h->gpu = NULL;
    if (cpu) {
        if (nbytes)
            memcpy(h + 1, src->data, (size_t)nbytes);
    } else {
        int status = to_cuda_readback_start(src->device_index, src->data, nbytes, &h->gpu);
        if (status != TO_OK) {
            free(h);
            return status;
        }
    }
    link_live(h);
    *handle = h;
    return TO_OK;
}

int to_readback_wait(void *handle, void *dst, int64_t nbytes) {
    if (nbytes > 0 && !dst)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_readback_wait: dst is NULL");
    if (nbytes < 0)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_readback_wait: negative nbytes %lld", (long long)nbytes);
    readback *h = take_live(handle, nbytes, "to_readback_wait");
    if (!h)
        return TO_ERR_INVALID_ARGUMENT;
    int status = TO_OK;
    if (h->device == TO_CPU) {
        if (nbytes)
            memcpy(dst, h + 1, (size_t)nbytes);
    } else {
        status = to_cuda_readback_wait(h->gpu, dst, nbytes);
    }
    free(h);
    return status;
}

int to_readback_release(void *handle) {
    if (!handle)
        return TO_OK;
    readback *h = take_live(handle, -1, "to_readback_release");
    if (!h)
        return TO_ERR_INVALID_ARGUMENT;
    if (h->device == TO_CUDA)
        to_cuda_readback_release(h->gpu);
    free(h);
    return TO_OK;
}
