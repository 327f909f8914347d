/* matmul.c - CPU kernels for out[M, N] = x[M, K] . w[N, K]^T (+ bias), accumulated in f32.
 *
 * Two regimes, chosen by the number of rows of x:
 *
 *  - GEMV (M <= GEMV_MAX_ROWS, i.e. decode). Reading the weights once is all the cost, so each
 *    thread streams a contiguous range of weight rows, in memory order, and dots each row with
 *    every row of x (up to GEMV_GROUP rows of x per pass, while the weight row is in L1: the
 *    weights come from memory once whatever M is). bf16/f16 weights are widened in registers.
 *
 *  - GEMM (more rows, i.e. prefill). Compute bound, done the BLIS way: x is packed into f32
 *    panels of MR rows ([k][MR] order), the weights into f32 panels of NR columns ([k][NR]
 *    order, converting bf16/f16 while packing), and a register-tiled MR x NR micro-kernel does
 *    broadcast-FMA updates. Blocking: KC values of k per packed block, so one weight micro-panel
 *    (KC x NR) sits in L1 while all MR-row panels of x stream past it; NC columns per packed
 *    weight block, so the block (KC x NC) sits in L2. x is packed once per chunk of rows by all
 *    threads together; then each thread takes its own range of columns (output features) and
 *    packs only the weights it needs.
 *
 * Every kernel has a portable C twin used when to_simd() says TO_SIMD_SCALAR, with the same
 * semantics (f32 accumulation, same blocking); only the order of the additions differs.
 */
#include "cpu/matmul.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>
#include <stdatomic.h>

/* Up to this many rows of x take the GEMV path: measured on Zen 3 with bf16 and f32 weights,
 * GEMV is faster up to 8 rows and the packed GEMM from about 12. */
#define GEMV_MAX_ROWS 8
#define GEMV_GROUP 4     /* rows of x per pass over a weight row (register budget) */
#define PF_BYTES 1024    /* software prefetch distance in a bf16/f16 weight stream */

#define MR 6            /* micro-tile rows (rows of x) */
#define NR 16           /* micro-tile columns (weight rows), two AVX2 vectors */
#define KC 256          /* k per packed block: a 16 KB weight micro-panel, in L1 */
#define NC 256          /* columns per packed weight block: 256 KB, in L2 */
#define MC_PANELS 12    /* x panels (72 rows, 72 KB) per pass over one weight micro-panel */
#define A_CHUNK_BYTES (16 << 20) /* packed x per chunk of rows, shared by all threads */

/* ---- the problem, flattened ---- */

typedef struct {
    int64_t M, N, K;
    const char *x; /* x[m, k] at x + (m * xs0 + k * xs1) * xsize */
    int64_t xs0, xs1;
    int x_dt, xsize;
    const char *w; /* w[n, k] at w + (n * ws0 + k) * wsize */
    int64_t ws0;
    int w_dt, wsize;
    char *out; /* out[m, n] at out + (m * os0 + n) * osize */
    int64_t os0;
    int out_dt, osize;
    const float *bias; /* f32 copy of the bias [N], or NULL */
    int simd;
    atomic_int failed; /* set by a thread that could not get its scratch memory */
} mm_problem;

static inline const char *w_row(const mm_problem *p, int64_t n) { return p->w + n * p->ws0 * p->wsize; }
static inline char *out_row(const mm_problem *p, int64_t m) { return p->out + m * p->os0 * p->osize; }

static inline float load_elem(const char *row, int dt, int64_t k) {
    if (dt == TO_F32)
        return ((const float *)row)[k];
    if (dt == TO_BF16)
        return to_bf16_to_f32(((const uint16_t *)row)[k]);
    return to_f16_to_f32(((const uint16_t *)row)[k]);
}

static inline void store_elem(char *row, int dt, int64_t n, float v) {
    if (dt == TO_F32)
        ((float *)row)[n] = v;
    else if (dt == TO_BF16)
        ((uint16_t *)row)[n] = to_f32_to_bf16(v);
    else
        ((uint16_t *)row)[n] = to_f32_to_f16(v);
}

/* =====================================================================================
 * GEMV: a few rows of x, converted to f32 up front (xf[m * K + k]).
 * ===================================================================================== */

typedef struct {
    mm_problem *p;
    const float *xf;
} gemv_job;

/* Writes res[m] (+ bias) to out[m0 + m, n]. */
static void gemv_store(const mm_problem *p, int64_t m0, int xr, int64_t n, const float *res) {
    for (int m = 0; m < xr; m++) {
        float v = res[m];
        if (p->bias)
            v += p->bias[n];
        store_elem(out_row(p, m0 + m), p->out_dt, n, v);
    }
}

static void gemv_range_scalar(const gemv_job *job, int64_t n0, int64_t n1) {
    const mm_problem *p = job->p;
    const int64_t K = p->K;
    for (int64_t n = n0; n < n1; n++) {
        const char *w = w_row(p, n);
        for (int64_t m0 = 0; m0 < p->M; m0 += GEMV_GROUP) {
            int xr = p->M - m0 < GEMV_GROUP ? (int)(p->M - m0) : GEMV_GROUP;
            const float *x = job->xf + m0 * K;
            float s[GEMV_GROUP] = {0.0f};
            for (int64_t k = 0; k < K; k++) {
                float wv = load_elem(w, p->w_dt, k);
                for (int m = 0; m < xr; m++)
                    s[m] += wv * x[m * K + k];
            }
            gemv_store(p, m0, xr, n, s);
        }
    }
}

/* 8 weights at p, widened to f32: bf16 is the top half of an f32, f16 goes through F16C. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m256 load8_avx2(const char *p, int dt) {
    if (dt == TO_BF16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    if (dt == TO_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    return _mm256_loadu_ps((const float *)p);
}

/* res[m] = dot(w, x row m) for XR rows of x (K floats apart), one weight row.
 *
 * One weight row at a time keeps the weights a single sequential stream through memory (the
 * rows of a matrix follow each other), which is what the hardware prefetcher follows best;
 * interleaving several rows measured slower. For 16-bit weights a software prefetch PF_BYTES
 * ahead gained ~5% on Zen 3; for f32 weights (twice the bytes per instruction) it lost ~15%,
 * so f32 relies on the hardware prefetcher alone. The prefetch is non-temporal (NTA): each
 * weight line is used once, and with T0 the 16-bit stream ran at ~0.90-0.95x the bytes per
 * second of f32 on Zen 3 (2 threads, weights from DRAM), with NTA at ~0.97-1.0x. (The
 * widening is not the limit: one 256-bit load widened by shift + mask, 2 ALU uops per 16
 * weights, measured the same as cvtepu16 + shift.)
 * U vectors of 8 along k are in flight per row of x, so XR * U independent FMA chains hide the
 * FMA latency (4 cycles, 2 per cycle). Always inlined with constant XR and dt, so the loops
 * unroll and the accumulators stay in registers. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
gemv_row_avx2(int dt, int XR, const char *w, const float *x, int64_t K, float *res) {
    const int U = XR <= 2 ? 4 : 2;
    const int64_t esz = dt == TO_F32 ? 4 : 2;
    __m256 acc[4][GEMV_GROUP];
    for (int u = 0; u < U; u++)
        for (int m = 0; m < XR; m++)
            acc[u][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
        if (dt != TO_F32) /* a step reads 64 (XR <= 2) or 32 bytes: a line or half */
            _mm_prefetch(w + k * esz + PF_BYTES, _MM_HINT_NTA);
        for (int u = 0; u < U; u++) {
            __m256 wv = load8_avx2(w + (k + 8 * u) * esz, dt);
            for (int m = 0; m < XR; m++)
                acc[u][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[u][m]);
        }
    }
    for (; k + 8 <= K; k += 8) {
        __m256 wv = load8_avx2(w + k * esz, dt);
        for (int m = 0; m < XR; m++)
            acc[0][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[0][m]);
    }
    for (int m = 0; m < XR; m++) {
        __m256 a = acc[0][m];
        for (int u = 1; u < U; u++)
            a = _mm256_add_ps(a, acc[u][m]);
        res[m] = hsum_avx2(a);
    }
    for (; k < K; k++) { /* K % 8 leftovers */
        float wv = load_elem(w, dt, k);
        for (int m = 0; m < XR; m++)
            res[m] += wv * x[m * K + k];
    }
}

/* One specialised copy of gemv_row_avx2 per (dtype, rows of x). */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
gemv_row_xr_avx2(int dt, int xr, const char *w, const float *x, int64_t K, float *res) {
    switch (xr) {
    case 1: gemv_row_avx2(dt, 1, w, x, K, res); break;
    case 2: gemv_row_avx2(dt, 2, w, x, K, res); break;
    case 3: gemv_row_avx2(dt, 3, w, x, K, res); break;
    default: gemv_row_avx2(dt, 4, w, x, K, res); break;
    }
}

TO_TARGET_AVX2 static void gemv_range_avx2(const gemv_job *job, int64_t n0, int64_t n1) {
    const mm_problem *p = job->p;
    const int64_t K = p->K;
    const int dt = p->w_dt;
    float res[GEMV_GROUP];
    for (int64_t n = n0; n < n1; n++) {
        const char *w = w_row(p, n);
        /* every group of rows of x passes over the weight row while it is in L1, so the
         * weights come from memory once whatever M is */
        for (int64_t m0 = 0; m0 < p->M; m0 += GEMV_GROUP) {
            int xr = p->M - m0 < GEMV_GROUP ? (int)(p->M - m0) : GEMV_GROUP;
            const float *x = job->xf + m0 * K;
            if (dt == TO_BF16)
                gemv_row_xr_avx2(TO_BF16, xr, w, x, K, res);
            else if (dt == TO_F16)
                gemv_row_xr_avx2(TO_F16, xr, w, x, K, res);
            else
                gemv_row_xr_avx2(TO_F32, xr, w, x, K, res);
            gemv_store(p, m0, xr, n, res);
        }
    }
}

static void gemv_range(void *arg, int64_t n0, int64_t n1) {
    const gemv_job *job = arg;
    if (job->p->simd >= TO_SIMD_AVX2)
        gemv_range_avx2(job, n0, n1);
    else
        gemv_range_scalar(job, n0, n1);
}

static int gemv(mm_problem *p) {
    const int64_t M = p->M, K = p->K;
    float *xf = to_scratch(0, (size_t)(M * K) * sizeof(float));
    if (!xf)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_matmul: out of memory for %lld x %lld f32 rows of x",
                       (long long)M, (long long)K);
    for (int64_t m = 0; m < M; m++)
        to_load_f32(xf + m * K, p->x + m * p->xs0 * p->xsize, p->x_dt, K, p->xs1);
    gemv_job job = {p, xf};
    /* at least ~64K weights per thread: below that waking a second thread costs more than it saves */
    int64_t min_rows = 65536 / K + 1;
    to_parallel_for(p->N, min_rows, gemv_range, &job);
    return TO_OK;
}

/* =====================================================================================
 * GEMM
 * ===================================================================================== */

/* Packed x for a chunk of rows: for each K block (starting at p0, kc long), for each panel of
 * MR rows, kc * MR floats in [k][MR] order. Block p0 starts at p0 * panels * MR, because every
 * earlier block is full. Rows past the end of x are zero. */
static inline float *a_panel(float *apack, int64_t panels, int64_t p0, int64_t kc, int64_t panel) {
    return apack + p0 * panels * MR + panel * kc * MR;
}

/* K is cut into blocks of equal size (a multiple of 8, for the vector packing) of at most KC. */
static inline int64_t k_block(int64_t K) {
    int64_t nb = (K + KC - 1) / KC;
    int64_t kb = (K + nb - 1) / nb;
    return (kb + 7) & ~(int64_t)7;
}

typedef struct {
    mm_problem *p;
    int64_t m0;     /* first row of x in this chunk */
    int64_t rows;   /* rows in this chunk */
    int64_t panels; /* ceil(rows / MR) */
    float *apack;
} gemm_job;

/* Packs x panels [begin, end) of the chunk. */
static void pack_a_range(void *arg, int64_t begin, int64_t end) {
    const gemm_job *job = arg;
    mm_problem *p = job->p;
    const int64_t K = p->K, kb = k_block(K);
    /* rows are first converted to f32 whole (to_load_f32 handles every stride and dtype), then
     * interleaved */
    float *tmp = to_scratch(3, (size_t)(MR * K) * sizeof(float));
    if (!tmp) {
        atomic_store(&p->failed, 1);
        return;
    }
    for (int64_t panel = begin; panel < end; panel++) {
        int64_t r0 = panel * MR;
        for (int i = 0; i < MR; i++) {
            if (r0 + i < job->rows)
                to_load_f32(tmp + i * K, p->x + (job->m0 + r0 + i) * p->xs0 * p->xsize, p->x_dt, K, p->xs1);
            else
                memset(tmp + i * K, 0, (size_t)K * sizeof(float));
        }
        for (int64_t p0 = 0; p0 < K; p0 += kb) {
            int64_t kc = K - p0 < kb ? K - p0 : kb;
            float *dst = a_panel(job->apack, job->panels, p0, kc, panel);
            for (int64_t k = 0; k < kc; k++)
                for (int i = 0; i < MR; i++)
                    dst[k * MR + i] = tmp[i * K + p0 + k];
        }
    }
}

/* Packs weight rows n .. n + NR - 1 (only `valid` of them exist; the rest are zero), k from p0,
 * kc of them, as dst[k * NR + r]. */
static void pack_b_scalar(float *dst, const mm_problem *p, int64_t n, int64_t valid, int64_t p0, int64_t kc) {
    for (int r = 0; r < NR; r++) {
        if (r < valid) {
            const char *w = w_row(p, n + r);
            for (int64_t k = 0; k < kc; k++)
                dst[k * NR + r] = load_elem(w, p->w_dt, p0 + k);
        } else {
            for (int64_t k = 0; k < kc; k++)
                dst[k * NR + r] = 0.0f;
        }
    }
}

/* 8x8 transpose: row i of the input becomes column i. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void transpose8_avx2(__m256 v[8]) {
    __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
    __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
    __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* pack_b_scalar for 8 existing rows (half a panel): 8x8 blocks are loaded along k (converted),
 * transposed in registers and stored along the panel's rows. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
pack_b8_avx2(int dt, float *dst, const mm_problem *p, int64_t n, int64_t p0, int64_t kc) {
    const int64_t esz = dt == TO_F32 ? 4 : 2;
    const char *rows[8];
    for (int i = 0; i < 8; i++)
        rows[i] = w_row(p, n + i) + p0 * esz;
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
        __m256 v[8];
        for (int i = 0; i < 8; i++)
            v[i] = load8_avx2(rows[i] + k * esz, dt);
        transpose8_avx2(v);
        for (int i = 0; i < 8; i++)
            _mm256_store_ps(dst + (k + i) * NR, v[i]);
    }
    for (; k < kc; k++)
        for (int i = 0; i < 8; i++)
            dst[k * NR + i] = load_elem(rows[i], dt, k);
}

TO_TARGET_AVX2 static void pack_b_avx2(float *dst, const mm_problem *p, int64_t n, int64_t valid,
                                       int64_t p0, int64_t kc) {
    if (valid < NR) { /* the ragged last panel: rare, keep it simple */
        pack_b_scalar(dst, p, n, valid, p0, kc);
        return;
    }
    for (int h = 0; h < NR; h += 8) {
        if (p->w_dt == TO_BF16)
            pack_b8_avx2(TO_BF16, dst + h, p, n + h, p0, kc);
        else if (p->w_dt == TO_F16)
            pack_b8_avx2(TO_F16, dst + h, p, n + h, p0, kc);
        else
            pack_b8_avx2(TO_F32, dst + h, p, n + h, p0, kc);
    }
}

/* c[MR x NR] (row stride ldc) = (accumulate ? c : 0) + a[kc x MR]^T . b[kc x NR]. */
static void kernel_scalar(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, int accumulate) {
    float acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            acc[i][j] = accumulate ? c[i * ldc + j] : 0.0f;
    for (int64_t k = 0; k < kc; k++, a += MR, b += NR)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++)
                acc[i][j] += a[i] * b[j];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            c[i * ldc + j] = acc[i][j];
}

/* The 6x16 AVX2 micro-kernel: 12 accumulators, 2 weight vectors, 1 broadcast = 15 of the 16
 * ymm registers. Per k: 2 loads + 6 broadcasts feed 12 FMAs, which keeps both FMA pipes busy. */
TO_TARGET_AVX2 static void kernel_avx2(int64_t kc, const float *a, const float *b, float *c, int64_t ldc,
                                       int accumulate) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++, a += MR, b += NR) {
        __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8), av;
        av = _mm256_broadcast_ss(a + 0);
        c00 = _mm256_fmadd_ps(av, b0, c00);
        c01 = _mm256_fmadd_ps(av, b1, c01);
        av = _mm256_broadcast_ss(a + 1);
        c10 = _mm256_fmadd_ps(av, b0, c10);
        c11 = _mm256_fmadd_ps(av, b1, c11);
        av = _mm256_broadcast_ss(a + 2);
        c20 = _mm256_fmadd_ps(av, b0, c20);
        c21 = _mm256_fmadd_ps(av, b1, c21);
        av = _mm256_broadcast_ss(a + 3);
        c30 = _mm256_fmadd_ps(av, b0, c30);
        c31 = _mm256_fmadd_ps(av, b1, c31);
        av = _mm256_broadcast_ss(a + 4);
        c40 = _mm256_fmadd_ps(av, b0, c40);
        c41 = _mm256_fmadd_ps(av, b1, c41);
        av = _mm256_broadcast_ss(a + 5);
        c50 = _mm256_fmadd_ps(av, b0, c50);
        c51 = _mm256_fmadd_ps(av, b1, c51);
    }
    __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    for (int i = 0; i < MR; i++) {
        float *ci = c + i * ldc;
        if (accumulate) {
            acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(ci));
            acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(ci + 8));
        }
        _mm256_storeu_ps(ci, acc[i][0]);
        _mm256_storeu_ps(ci + 8, acc[i][1]);
    }
}

/* One thread's share of a chunk: x panels [pm0, pm1) times weight panels [pn0, pn1). */
static void gemm_block(const gemm_job *job, int64_t pm0, int64_t pm1, int64_t pn0, int64_t pn1) {
    mm_problem *p = job->p;
    const int64_t K = p->K, N = p->N, kb = k_block(K);
    const int avx2 = p->simd >= TO_SIMD_AVX2;
    /* f32 accumulators for this thread's rows x NC columns: the result stays in f32 across
     * the K blocks and is converted to out's dtype once, at the end */
    float *cbuf = to_scratch(3, (size_t)((pm1 - pm0) * MR * NC) * sizeof(float));
    float *bpack = to_scratch(2, (size_t)(kb * NC) * sizeof(float));
    if (!cbuf || !bpack) {
        atomic_store(&p->failed, 1);
        return;
    }
    for (int64_t jc = pn0 * NR; jc < pn1 * NR; jc += NC) {
        int64_t nc = pn1 * NR - jc < NC ? pn1 * NR - jc : NC; /* a multiple of NR */
        for (int64_t p0 = 0; p0 < K; p0 += kb) {
            int64_t kc = K - p0 < kb ? K - p0 : kb;
            for (int64_t j = 0; j < nc; j += NR) {
                int64_t valid = N - (jc + j) < NR ? N - (jc + j) : NR;
                if (avx2)
                    pack_b_avx2(bpack + j * kc, p, jc + j, valid, p0, kc);
                else
                    pack_b_scalar(bpack + j * kc, p, jc + j, valid, p0, kc);
            }
            for (int64_t ic = pm0; ic < pm1; ic += MC_PANELS) {
                int64_t ie = ic + MC_PANELS < pm1 ? ic + MC_PANELS : pm1;
                for (int64_t j = 0; j < nc; j += NR) {
                    const float *b = bpack + j * kc;
                    for (int64_t i = ic; i < ie; i++) {
                        const float *a = a_panel(job->apack, job->panels, p0, kc, i);
                        float *c = cbuf + (i - pm0) * MR * NC + j;
                        if (avx2)
                            kernel_avx2(kc, a, b, c, NC, p0 > 0);
                        else
                            kernel_scalar(kc, a, b, c, NC, p0 > 0);
                    }
                }
            }
        }
        /* bias, conversion and the store of the finished columns */
        int64_t ncols = N - jc < nc ? N - jc : nc;
        int64_t rend = pm1 * MR < job->rows ? pm1 * MR : job->rows;
        for (int64_t r = pm0 * MR; r < rend; r++) {
            float *c = cbuf + (r - pm0 * MR) * NC;
            if (p->bias)
                for (int64_t j = 0; j < ncols; j++)
                    c[j] += p->bias[jc + j];
            to_store_f32(out_row(p, job->m0 + r) + jc * p->osize, p->out_dt, c, ncols, 1);
        }
    }
}

static void gemm_thread(void *arg, int ith, int nth) {
    const gemm_job *job = arg;
    const int64_t npn = (job->p->N + NR - 1) / NR;
    /* Split columns between threads (each packs only its own weights); only when there are
     * fewer weight panels than threads, split rows too. */
    int64_t tn = npn < nth ? npn : nth;
    int64_t tm = nth / tn < job->panels ? nth / tn : job->panels;
    if (ith >= tm * tn)
        return;
    int64_t it = ith / tn, jt = ith % tn;
    int64_t pm0 = job->panels * it / tm, pm1 = job->panels * (it + 1) / tm;
    int64_t pn0 = npn * jt / tn, pn1 = npn * (jt + 1) / tn;
    if (pm0 < pm1 && pn0 < pn1)
        gemm_block(job, pm0, pm1, pn0, pn1);
}

static int gemm(mm_problem *p) {
    const int64_t M = p->M, K = p->K;
    /* rows per chunk: packed x of a chunk within A_CHUNK_BYTES, but at least 8 panels */
    int64_t max_panels = A_CHUNK_BYTES / ((int64_t)MR * K * (int64_t)sizeof(float));
    if (max_panels < 8)
        max_panels = 8;
    if (max_panels > 128) /* bounds the per-thread f32 accumulators (rows x NC) too */
        max_panels = 128;
    int64_t total_panels = (M + MR - 1) / MR;
    int64_t nchunks = (total_panels + max_panels - 1) / max_panels;
    int64_t chunk_panels = (total_panels + nchunks - 1) / nchunks; /* even chunks */
    float *apack = to_scratch(0, (size_t)(chunk_panels * MR * K) * sizeof(float));
    if (!apack)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_matmul: out of memory for packing x (%lld x %lld)",
                       (long long)(chunk_panels * MR), (long long)K);
    for (int64_t m0 = 0; m0 < M; m0 += chunk_panels * MR) {
        int64_t rows = M - m0 < chunk_panels * MR ? M - m0 : chunk_panels * MR;
        gemm_job job = {p, m0, rows, (rows + MR - 1) / MR, apack};
        to_parallel_for(job.panels, 4, pack_a_range, &job);
        if (atomic_load(&p->failed))
            break;
        to_parallel_run(gemm_thread, &job);
        if (atomic_load(&p->failed))
            break;
    }
    if (atomic_load(&p->failed))
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_matmul: out of memory for per-thread packing buffers");
    return TO_OK;
}

/* ===================================================================================== */

int to_cpu_matmul_bias(const to_tensor *out, const to_tensor *bias, int64_t K, const float **bias_f32) {
    *bias_f32 = NULL;
    if (!bias && K)
        return TO_OK;
    int64_t M = out->shape[0], N = out->shape[1];
    float *bf = to_scratch(1, (size_t)N * sizeof(float));
    if (!bf)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_matmul: out of memory for the bias");
    if (bias)
        to_load_f32(bf, bias->data, bias->dtype, N, bias->strides[0]);
    else
        memset(bf, 0, (size_t)N * sizeof(float));
    if (K == 0) /* an empty sum: every row of out is the bias (or zeros) */
        for (int64_t m = 0; m < M; m++)
            to_store_f32(to_elem_ptr(out->data, out->dtype, m * out->strides[0]), out->dtype, bf, N, 1);
    *bias_f32 = bf;
    return TO_OK;
}

int to_cpu_matmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias) {
    mm_problem p;
    memset(&p, 0, sizeof p);
    p.M = x->shape[0];
    p.K = x->shape[1];
    p.N = w->shape[0];
    if (p.M == 0 || p.N == 0)
        return TO_OK;
    p.x = x->data;
    p.xs0 = x->strides[0];
    p.xs1 = x->strides[1];
    p.x_dt = x->dtype;
    p.xsize = to_dtype_size(x->dtype);
    p.w = w->data;
    p.ws0 = w->strides[0];
    p.w_dt = w->dtype;
    p.wsize = to_dtype_size(w->dtype);
    p.out = out->data;
    p.os0 = out->strides[0];
    p.out_dt = out->dtype;
    p.osize = to_dtype_size(out->dtype);
    p.simd = to_simd();
    atomic_init(&p.failed, 0);

    TO_TRY(to_cpu_matmul_bias(out, bias, p.K, &p.bias));
    if (p.K == 0)
        return TO_OK;
    if (p.M <= GEMV_MAX_ROWS)
        return gemv(&p);
    return gemm(&p);
}
