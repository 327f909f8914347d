/* error.c - status names and the thread-local error message. */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_error[512];

int to_fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

const char *to_last_error(void) { return last_error; }

const char *to_status_name(int status) {
    switch (status) {
    case TO_OK: return "ok";
    case TO_ERR_INVALID_ARGUMENT: return "invalid argument";
    case TO_ERR_DTYPE: return "dtype error";
    case TO_ERR_SHAPE: return "shape error";
    case TO_ERR_BOUNDS: return "out of bounds";
    case TO_ERR_DEVICE: return "device error";
    case TO_ERR_OUT_OF_MEMORY: return "out of memory";
    case TO_ERR_UNSUPPORTED: return "unsupported";
    case TO_ERR_CUDA: return "CUDA error";
    case TO_ERR_INTERNAL: return "internal error";
    default: return "unknown status";
    }
}

int to_version(void) { return 100; /* 0.1.0 */ }
