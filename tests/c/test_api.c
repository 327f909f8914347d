/* test_api.c - libtensor_ops used straight from C through tensor_ops.h: descriptors, status
 * codes, the thread-local error message, copies with conversion, a matmul against a naive
 * loop, and argument validation. Prints "N passed, N failed" and exits non-zero on failure. */
#include "tensor_ops.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int passed, failed;

#define EXPECT(cond, ...)                                      \
    do {                                                       \
        if (cond) {                                            \
            passed++;                                          \
        } else {                                               \
            failed++;                                          \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);        \
            printf(__VA_ARGS__);                               \
            printf("\n");                                      \
        }                                                      \
    } while (0)

static to_tensor make(void *data, int dtype, int ndim, const int64_t *shape) {
    to_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.dtype = dtype;
    t.device = TO_CPU;
    t.ndim = ndim;
    int64_t stride = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        t.shape[i] = shape[i];
        t.strides[i] = stride;
        stride *= shape[i];
    }
    t.nbytes = stride * to_dtype_size(dtype);
    return t;
}

static void test_facts(void) {
    EXPECT(to_version() > 0, "version");
    EXPECT(to_dtype_size(TO_F32) == 4 && to_dtype_size(TO_BF16) == 2 && to_dtype_size(TO_I64) == 8, "sizes");
    EXPECT(to_dtype_size(99) == 0, "unknown dtype size");
    EXPECT(strcmp(to_dtype_name(TO_BF16), "bfloat16") == 0, "dtype name");
    EXPECT(to_num_threads() >= 1, "threads");
    int n = -1;
    EXPECT(to_cuda_device_count(&n) == TO_OK && n >= 0, "cuda count");
    EXPECT(to_cuda_device_count(NULL) == TO_ERR_INVALID_ARGUMENT, "cuda count NULL");
    EXPECT(to_simd_active() <= to_simd_detected(), "simd levels");
    EXPECT(to_set_simd(to_simd_detected() + 1) == TO_ERR_INVALID_ARGUMENT, "simd above detected");
}

static void test_alloc_copy(void) {
    void *p = NULL, *q = &q;
    EXPECT(to_alloc(TO_CPU, 0, 1000, &p) == TO_OK && p && ((uintptr_t)p % 64) == 0, "aligned alloc");
    EXPECT(to_alloc(TO_CPU, 0, -1, &q) == TO_ERR_INVALID_ARGUMENT && q == NULL, "negative alloc");
    int64_t shape[2] = {3, 5};
    float src[15], back[15];
    uint16_t half[15];
    for (int i = 0; i < 15; i++)
        src[i] = (float)i * 0.25f - 1.0f; /* exactly representable in bf16 */
    to_tensor a = make(src, TO_F32, 2, shape), h = make(half, TO_BF16, 2, shape), b = make(back, TO_F32, 2, shape);
    EXPECT(to_copy(&h, &a) == TO_OK && to_copy(&b, &h) == TO_OK, "copy: %s", to_last_error());
    EXPECT(memcmp(src, back, sizeof src) == 0, "f32 -> bf16 -> f32 round trip");
    /* transposed view: out[j][i] = a[i][j] */
    to_tensor at = a;
    at.shape[0] = 5, at.shape[1] = 3, at.strides[0] = 1, at.strides[1] = 5;
    int64_t tshape[2] = {5, 3};
    float tr[15];
    to_tensor t = make(tr, TO_F32, 2, tshape);
    EXPECT(to_copy(&t, &at) == TO_OK && tr[1] == src[5] && tr[3] == src[1], "strided copy");
    EXPECT(to_fill(&b, 2.5) == TO_OK && back[14] == 2.5f, "fill");
    to_free(TO_CPU, 0, p);
}

static void test_validation(void) {
    int64_t shape[2] = {4, 4};
    float buf[16];
    to_tensor a = make(buf, TO_F32, 2, shape), b = a;
    EXPECT(to_copy(NULL, &a) == TO_ERR_INVALID_ARGUMENT, "NULL out");
    EXPECT(strstr(to_last_error(), "out is NULL") != NULL, "message names the argument: %s", to_last_error());
    b.nbytes = 60; /* one float short */
    EXPECT(to_copy(&b, &a) == TO_ERR_BOUNDS, "too-small buffer");
    b = a;
    b.data = NULL;
    EXPECT(to_copy(&b, &a) == TO_ERR_INVALID_ARGUMENT, "NULL data");
    b = a;
    b.dtype = 42;
    EXPECT(to_copy(&b, &a) == TO_ERR_DTYPE, "unknown dtype");
    b = a;
    b.ndim = 9;
    EXPECT(to_copy(&b, &a) == TO_ERR_INVALID_ARGUMENT, "rank too large");
    b = a;
    b.strides[0] = -1;
    EXPECT(to_copy(&b, &a) == TO_ERR_INVALID_ARGUMENT, "negative stride");
    b = a;
    b.shape[1] = 3;
    EXPECT(to_copy(&b, &a) == TO_ERR_SHAPE, "shape mismatch");
    b = a;
    b.device = TO_CUDA;
    int status = to_copy(&b, &a);
    EXPECT(status == TO_ERR_DEVICE || status == TO_ERR_UNSUPPORTED || status == TO_ERR_CUDA,
           "device without GPU: %d %s", status, to_last_error());
}

static void test_matmul(void) {
    enum { M = 5, K = 37, N = 9 };
    float x[M * K], w[N * K], out[M * N];
    uint16_t wb[N * K];
    srand(7);
    for (int i = 0; i < M * K; i++)
        x[i] = (float)rand() / RAND_MAX - 0.5f;
    for (int i = 0; i < N * K; i++)
        w[i] = (float)rand() / RAND_MAX - 0.5f;
    int64_t sx[2] = {M, K}, sw[2] = {N, K}, so[2] = {M, N};
    to_tensor tx = make(x, TO_F32, 2, sx), tw = make(w, TO_F32, 2, sw), to = make(out, TO_F32, 2, so);
    to_tensor twb = make(wb, TO_BF16, 2, sw);
    for (int pass = 0; pass < 2; pass++) {
        to_tensor *weights = pass ? &twb : &tw;
        if (pass) {
            EXPECT(to_copy(&twb, &tw) == TO_OK, "to bf16");
            EXPECT(to_copy(&tw, &twb) == TO_OK, "back to f32 (rounded weights)");
        }
        EXPECT(to_matmul(&to, &tx, weights, NULL) == TO_OK, "matmul: %s", to_last_error());
        double worst = 0;
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) {
                double ref = 0;
                for (int k = 0; k < K; k++)
                    ref += (double)x[m * K + k] * w[n * K + k];
                worst = fmax(worst, fabs(ref - out[m * N + n]));
            }
        EXPECT(worst < 1e-5, "matmul %s error %g", pass ? "bf16" : "f32", worst);
    }
    to_tensor bad = tw;
    bad.shape[1] = K - 1;
    EXPECT(to_matmul(&to, &tx, &bad, NULL) == TO_ERR_SHAPE, "matmul K mismatch: %s", to_last_error());
}

/* The error message is per thread: a failure on one thread leaves another's message alone. */
static void *fail_in_thread(void *arg) {
    (void)arg;
    to_copy(NULL, NULL);
    return NULL;
}

static void test_thread_local_error(void) {
    int64_t shape[1] = {4};
    float buf[4];
    to_tensor a = make(buf, TO_F32, 1, shape), b = a;
    b.nbytes = 4;
    to_copy(&b, &a);
    char before[256];
    snprintf(before, sizeof before, "%s", to_last_error());
    pthread_t th;
    pthread_create(&th, NULL, fail_in_thread, NULL);
    pthread_join(th, NULL);
    EXPECT(strcmp(before, to_last_error()) == 0, "message changed by another thread");
}

/* Reads of a CPU tensor through the asynchronous read-back calls: the bytes as they were at the
 * start, handles used once, stale handles refused. Run under ASan (--sanitize) for leaks. */
static void test_readback(void) {
    int64_t shape[1] = {7};
    int64_t src[7], dst[7];
    for (int i = 0; i < 7; i++)
        src[i] = (int64_t)rand() << 20 ^ rand();
    to_tensor t = make(src, TO_I64, 1, shape);
    void *h = NULL, *h2 = NULL;
    EXPECT(to_readback_start(&t, &h) == TO_OK && h, "readback start");
    EXPECT(to_readback_start(&t, &h2) == TO_OK && h2 && h2 != h, "second live readback");
    int64_t first = src[0];
    src[0] = ~first; /* the CPU bytes were taken at the start */
    EXPECT(to_readback_wait(h, dst, 8 * 6) == TO_ERR_INVALID_ARGUMENT, "readback nbytes mismatch");
    EXPECT(to_readback_wait(h, dst, sizeof dst) == TO_OK && dst[0] == first &&
           memcmp(dst + 1, src + 1, 6 * sizeof *dst) == 0, "readback bytes");
    EXPECT(to_readback_wait(h2, NULL, sizeof dst) == TO_ERR_INVALID_ARGUMENT, "readback NULL dst");
    EXPECT(to_readback_release(h2) == TO_OK, "readback release");
    EXPECT(to_readback_release(h2) == TO_ERR_INVALID_ARGUMENT && strstr(to_last_error(), "not a live handle"),
           "readback double release: %s", to_last_error());
    EXPECT(to_readback_wait(h, dst, sizeof dst) == TO_ERR_INVALID_ARGUMENT, "readback double wait");
    EXPECT(to_readback_release(NULL) == TO_OK, "readback release NULL");
    EXPECT(to_readback_start(&t, NULL) == TO_ERR_INVALID_ARGUMENT, "readback NULL handle");
    to_tensor gap = t;
    gap.shape[0] = 3;
    gap.strides[0] = 2;
    h = &h;
    EXPECT(to_readback_start(&gap, &h) == TO_ERR_INVALID_ARGUMENT && h == NULL, "readback strided src");
}

int main(void) {
    test_facts();
    test_alloc_copy();
    test_validation();
    test_matmul();
    test_thread_local_error();
    test_readback();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
