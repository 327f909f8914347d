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

/* to_rope_kv_attention from C: the same bytes as to_rope_kv_store into a fresh tensor (rot) then
 * to_paged_attention of its q heads, on copies, and qk left as it was; NULL and garbage
 * descriptors refused naming the argument; a slot that is not its position's refused with nothing
 * written. One sequence: 2 cached tokens and 2 new ones (positions 2 and 3), blocks of 2, its
 * table [3, 1]: the new tokens' slots are 2 and 3 (block 1). */
enum { RKA_T = 2, RKA_HQ = 2, RKA_HKV = 1, RKA_H = 3, RKA_D = 4, RKA_NB = 4, RKA_BS = 2 };
struct rka {
    float qk[RKA_T * RKA_H * RKA_D], v[RKA_T * RKA_HKV * RKA_D], out[RKA_T * RKA_HQ * RKA_D];
    float kc[RKA_NB * RKA_BS * RKA_HKV * RKA_D], vc[RKA_NB * RKA_BS * RKA_HKV * RKA_D];
};
static float rka_rot[RKA_T * RKA_H * RKA_D]; /* the two ops' rotated heads */

static int rope_kv_attention_call(struct rka *m, int fused, const int64_t *slots_values) {
    int64_t qk_shape[3] = {RKA_T, RKA_H, RKA_D}, v_shape[3] = {RKA_T, RKA_HKV, RKA_D};
    int64_t out_shape[3] = {RKA_T, RKA_HQ, RKA_D}, cache_shape[4] = {RKA_NB, RKA_BS, RKA_HKV, RKA_D};
    int64_t n_t[1] = {RKA_T}, n_inv[1] = {RKA_D / 2}, n_cu[1] = {2}, n_ctx[1] = {1}, bt_shape[2] = {1, 2};
    static float inv[RKA_D / 2] = {1.0f, 0.01f};
    static int64_t pos[RKA_T] = {2, 3}, cu[2] = {0, RKA_T}, ctx[1] = {4}, bt[2] = {3, 1};
    int64_t slots[RKA_T];
    memcpy(slots, slots_values, sizeof slots);
    to_tensor qk = make(m->qk, TO_F32, 3, qk_shape), v = make(m->v, TO_F32, 3, v_shape);
    to_tensor out = make(m->out, TO_F32, 3, out_shape), kc = make(m->kc, TO_F32, 4, cache_shape);
    to_tensor vc = make(m->vc, TO_F32, 4, cache_shape), tinv = make(inv, TO_F32, 1, n_inv);
    to_tensor tpos = make(pos, TO_I64, 1, n_t), tslots = make(slots, TO_I64, 1, n_t);
    to_tensor tcu = make(cu, TO_I64, 1, n_cu), tctx = make(ctx, TO_I64, 1, n_ctx), tbt = make(bt, TO_I64, 2, bt_shape);
    if (fused)
        return to_rope_kv_attention(&out, &qk, NULL, 0.0, &tpos, &tinv, RKA_D, 0, 1.0, &v, &kc, &vc, &tslots, &tcu,
                                    &tctx, &tbt, 0.5);
    to_tensor rot = make(rka_rot, TO_F32, 3, qk_shape);
    int status = to_rope_kv_store(&rot, &qk, NULL, 0.0, &tpos, &tinv, RKA_D, 0, 1.0, &v, &kc, &vc, &tslots);
    to_tensor q = rot; /* the first Hq heads of the rotated heads */
    q.shape[1] = RKA_HQ;
    return status ? status : to_paged_attention(&out, &q, &kc, &vc, &tcu, &tctx, &tbt, 0.5);
}

static void test_rope_kv_attention(void) {
    static struct rka a, b;
    srand(11);
    float *all = (float *)&a;
    for (size_t i = 0; i < sizeof a / sizeof(float); i++)
        all[i] = (float)rand() / RAND_MAX - 0.5f;
    b = a;
    const int64_t good[RKA_T] = {2, 3}, bad[RKA_T] = {2, 4};
    EXPECT(rope_kv_attention_call(&a, 1, good) == TO_OK, "rope_kv_attention: %s", to_last_error());
    EXPECT(rope_kv_attention_call(&b, 0, good) == TO_OK, "the two ops: %s", to_last_error());
    EXPECT(memcmp(&a, &b, sizeof a) == 0, "rope_kv_attention differs from the two ops (or wrote qk)");
    EXPECT(memcmp(a.qk, rka_rot, sizeof a.qk) != 0, "the rotation changed nothing");

    b = a;
    EXPECT(rope_kv_attention_call(&a, 1, bad) == TO_ERR_INVALID_ARGUMENT &&
           strstr(to_last_error(), "to_rope_kv_attention: slot_mapping[1] = 4 is not the slot 3") != NULL,
           "slot not its position's: %s", to_last_error());
    EXPECT(memcmp(&a, &b, sizeof a) == 0, "a refused call wrote something");

    int64_t shape[3] = {RKA_T, RKA_HQ, RKA_D};
    to_tensor t = make(a.out, TO_F32, 3, shape), garbage = t;
    EXPECT(to_rope_kv_attention(NULL, &t, NULL, 0.0, &t, &t, RKA_D, 0, 1.0, &t, &t, &t, &t, &t, &t, &t, 0.5) ==
               TO_ERR_INVALID_ARGUMENT && strstr(to_last_error(), "to_rope_kv_attention: out is NULL"),
           "NULL out: %s", to_last_error());
    EXPECT(to_rope_kv_attention(&t, NULL, NULL, 0.0, &t, &t, RKA_D, 0, 1.0, &t, &t, &t, &t, &t, &t, &t, 0.5) ==
               TO_ERR_INVALID_ARGUMENT && strstr(to_last_error(), "to_rope_kv_attention: qk is NULL"),
           "NULL qk: %s", to_last_error());
    EXPECT(to_rope_kv_attention(&t, &t, NULL, 0.0, &t, &t, RKA_D, 0, 1.0, &t, &t, &t, &t, &t, &t, NULL, 0.5) ==
               TO_ERR_INVALID_ARGUMENT && strstr(to_last_error(), "block_tables is NULL"),
           "NULL block_tables: %s", to_last_error());
    garbage.dtype = 42;
    EXPECT(to_rope_kv_attention(&t, &garbage, NULL, 0.0, &t, &t, RKA_D, 0, 1.0, &t, &t, &t, &t, &t, &t, &t, 0.5) ==
               TO_ERR_DTYPE, "unknown dtype: %s", to_last_error());
    garbage = t;
    garbage.ndim = 9;
    EXPECT(to_rope_kv_attention(&t, &t, NULL, 0.0, &t, &t, RKA_D, 0, 1.0, &t, &t, &t, &garbage, &t, &t, &t, 0.5) ==
               TO_ERR_INVALID_ARGUMENT, "rank too large: %s", to_last_error());
    garbage = t;
    garbage.nbytes = 4;
    EXPECT(to_rope_kv_attention(&t, &t, NULL, 0.0, &t, &t, RKA_D, 0, 1.0, &t, &t, &garbage, &t, &t, &t, &t, 0.5) ==
               TO_ERR_BOUNDS, "too-small buffer: %s", to_last_error());
    EXPECT(memcmp(&a, &b, sizeof a) == 0, "a refused call wrote something");
}

int main(void) {
    test_facts();
    test_rope_kv_attention();
    test_alloc_copy();
    test_validation();
    test_matmul();
    test_thread_local_error();
    test_readback();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
