/* qmatmul.c - out[M, N] = x[M, K] . w[N, K]^T (+ bias) with block-quantized weights, read in
 * place (never dequantized into a copy).
 *
 * How (the scheme llama.cpp uses on CPUs, written afresh here):
 *  1. Every row of x is quantized once per call to 8-bit blocks matching the weight's block size:
 *     - 32-element blocks (for Q8_0, Q4_0, Q4_1 weights): f32 scale d = max|x| / 127, i8 quants
 *       q = rint(x / d), and s = d * sum(q), which carries the weight's offset term (Q4_1's
 *       min m: sum(m * d q) = m * s; Q4_0's -8: -8 d_w s).
 *     - 256-element blocks (for Q4_K, Q6_K): f32 scale, i8 quants, and the i16 sums of each 16
 *       quants (the k-quants' per-sub-block offsets need them: Q4_K's mins, Q6_K's -32).
 *     Rows are stored in panels of PR rows interleaved per block, so a micro-kernel working on
 *     several rows of x reads one contiguous stream.
 *  2. Each (weight block, x block) pair is an exact integer dot product (AVX2: unsigned weight
 *     nibbles or |w| times signed x bytes with _mm256_maddubs_epi16, pairs summed to i32 with
 *     _mm256_madd_epi16), scaled by d_w * d_x and accumulated in f32. For the k-quants the
 *     integer sub-block scales are applied in integers (madd against the scales), so one
 *     conversion to f32 per 256 elements suffices.
 *  3. Work: threads split the weight rows (N), WR = 2 rows at a time; each pair of weight rows
 *     (in L1) is dotted with every panel of x rows, PR = 4 rows per micro-kernel, so an unpacked
 *     weight block serves up to 4 x rows and an x block 2 weight rows while in registers.
 *     Decode (M = 1) is the same loop with a 1-row panel: it streams the weights once, in
 *     memory order, split over threads. For many rows, x is walked in chunks that fit in L2.
 *     Q4_0 / Q4_1 weights repacked 8 rows at a time (TO_Q4_0_X8, TO_Q4_1_X8) go through the
 *     same loop a group of 8 rows at a time, with qmatmul_x8.c's micro-kernel.
 *
 * Accuracy. Quantizing x costs at most d_x / 2 = max|x_block| / 254 per element of x (round to
 * nearest), so |error| <= sum_k |w_k| max|x_block(k)| / 254 for each output. Measured on
 * Gaussian x (K = 1536): ||out - x w^T|| / ||x w^T|| = 0.53% with 32-blocks (Q8_0/Q4_0/Q4_1
 * weights) and 0.70-0.74% with 256-blocks (Q4_K/Q6_K: one scale over more elements sees a larger
 * maximum), as llama.cpp's Q8_0 / Q8_K activations do; small beside what 4-bit weights already
 * cost. Everything after the quantization is exact integer arithmetic per block plus f32
 * accumulation of the per-block results (against the same quantized x in float64, the error is
 * ~1e-7 relative). An inf or NaN in x spoils the outputs of its row only.
 *
 * The scalar path (to_simd() == TO_SIMD_SCALAR) computes the same quantities with the same
 * quantized x; it differs only in the order of the f32 additions.
 */
#include "cpu/matmul.h"
#include "cpu/qmatmul.h"
#include "cpu/quant.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>

#define PR TO_QX_ROWS
#define WR 2 /* weight rows per micro-kernel */
/* x panels per chunk: the quantized x a thread walks once per pair of weight rows stays in L2 */
#define X_CHUNK_BYTES (192 << 10)
/* Software prefetch distance in a Q8_0 weight stream when few rows of x use each block
 * (decode): on Zen 3 (one thread, weights from DRAM) it took Q8_0 from ~5.5 to ~10.5 GB/s;
 * longer distances (768, 1536, or the next pair of rows) gained less. The other types carry
 * fewer bytes per unit of work, are compute bound at one thread, and measured no gain (Q4_0
 * perhaps a loss), so they rely on the hardware prefetcher. */
#define PF_BYTES 384
/* below this many weight bytes per thread, a second thread costs more than it saves */
#define MIN_WBYTES_PER_THREAD (12 << 10)

typedef to_qx32 qx32; /* x for 32-element weight blocks (qmatmul.h) */

/* x quantized for 256-element weight super-blocks: PR rows interleaved, 1168 bytes */
typedef struct {
    float d[PR];
    int16_t bsum[PR][16]; /* sum of each 16 quants */
    int8_t q[PR][TO_QK_K];
} qx256;

typedef struct {
    int64_t M, N, K;
    int wtype;
    const char *w;
    int64_t wrow;      /* bytes from one weight row to the next */
    int64_t nb;        /* weight blocks per row */
    int unit;          /* weight rows per unit of work: WR, or TO_X8_ROWS for the X8 types */
    const char *x;     /* x[m, k] at x + (m * xs0 + k * xs1) * xsize */
    int64_t xs0, xs1;
    int x_dt, xsize;
    char *qx;          /* quantized x: panels of nb blocks */
    int64_t xblk;      /* bytes per quantized x block (qx32 or qx256) */
    int64_t panels;
    int64_t chunk;     /* panels per chunk */
    char *out;
    int64_t os0;
    int out_dt, osize;
    const float *bias;
    int simd;
    atomic_int failed;
} qmm_problem;

static inline int is_k_quant(int dt) { return dt == TO_Q4_K || dt == TO_Q6_K; }

static inline void store_elem(char *row, int dt, int64_t n, float v) {
    if (dt == TO_F32)
        ((float *)row)[n] = v;
    else if (dt == TO_BF16)
        ((uint16_t *)row)[n] = to_f32_to_bf16(v);
    else
        ((uint16_t *)row)[n] = to_f32_to_f16(v);
}

static inline uint16_t rd16(const void *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* =====================================================================================
 * Quantizing rows of x. Both paths compute d = amax / 127 and q = rint(x * (1 / d)) in f32
 * with round-to-nearest-even, so they give the same bytes (tests rely on that).
 * ===================================================================================== */

/* d = max|x| / 127 and id = 1 / d (0 when d is 0). A block holding an inf or NaN gets d = NaN
 * and id = 0 (all quants 0), so the outputs of its row come out NaN, as the dense matmul's
 * would, instead of the bad value silently dropping out of the maximum. */
static void block_scale_scalar(const float *src, int n, float *d, float *id) {
    float amax = 0.0f;
    int bad = 0;
    for (int k = 0; k < n; k++) {
        float a = fabsf(src[k]);
        bad |= !(a <= 3.4028234664e38f); /* NaN or inf */
        amax = a > amax ? a : amax;
    }
    *d = bad ? NAN : amax / 127.0f;
    *id = bad || *d == 0.0f ? 0.0f : 1.0f / *d;
}

static void quant32_scalar(const float *src, qx32 *dst, int r, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, src += TO_QK) {
        float d, id;
        block_scale_scalar(src, TO_QK, &d, &id);
        int sum = 0;
        for (int k = 0; k < TO_QK; k++) {
            int q = id != 0.0f ? (int)lrintf(src[k] * id) : 0;
            dst[b].q[r][k] = (int8_t)q;
            sum += q;
        }
        dst[b].ds[r][0] = d;
        dst[b].ds[r][1] = d * (float)sum;
    }
}

static void quant256_scalar(const float *src, qx256 *dst, int r, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, src += TO_QK_K) {
        float d, id;
        block_scale_scalar(src, TO_QK_K, &d, &id);
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int k = 16 * g; k < 16 * g + 16; k++) {
                int q = id != 0.0f ? (int)lrintf(src[k] * id) : 0;
                dst[b].q[r][k] = (int8_t)q;
                sum += q;
            }
            dst[b].bsum[r][g] = (int16_t)sum;
        }
        dst[b].d[r] = d;
    }
}

/* 32 floats -> 32 i8 quants at dst (with scale id); returns the 4 vectors of i32 quants in v */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
quant32_bytes_avx2(const float *src, __m256 id, int8_t *dst, __m256i v[4]) {
    for (int i = 0; i < 4; i++) /* cvtps rounds to nearest even, like lrintf */
        v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + 8 * i), id));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    /* the packs work within 128-bit lanes: put the 4-byte groups back in order */
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)dst, p);
}

/* block_scale_scalar's d and id (the same values) for n floats, n a multiple of 8. */
TO_TARGET_AVX2 static inline void block_scale_avx2(const float *src, int n, float *d, float *id) {
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.4028234664e38f);
    __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int k = 0; k < n; k += 8) {
        __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(src + k));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ)); /* NaN or inf */
        m = _mm256_max_ps(m, a);
    }
    float amax = hmax_avx2(m);
    int isbad = _mm256_movemask_ps(bad) != 0;
    *d = isbad ? NAN : amax / 127.0f;
    *id = isbad || *d == 0.0f ? 0.0f : 1.0f / *d;
}

TO_TARGET_AVX2 static void quant32_avx2(const float *src, qx32 *dst, int r, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, src += TO_QK) {
        float d, id;
        block_scale_avx2(src, TO_QK, &d, &id);
        __m256i v[4];
        quant32_bytes_avx2(src, _mm256_set1_ps(id), dst[b].q[r], v);
        int sum = hsum_i32_avx2(_mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3])));
        dst[b].ds[r][0] = d;
        dst[b].ds[r][1] = d * (float)sum;
    }
}

TO_TARGET_AVX2 static void quant256_avx2(const float *src, qx256 *dst, int r, int64_t nb) {
    for (int64_t b = 0; b < nb; b++, src += TO_QK_K) {
        float d, id;
        block_scale_avx2(src, TO_QK_K, &d, &id);
        __m256 idv = _mm256_set1_ps(id);
        for (int c = 0; c < TO_QK_K / 32; c++) {
            __m256i v[4];
            quant32_bytes_avx2(src + 32 * c, idv, dst[b].q[r] + 32 * c, v);
            dst[b].bsum[r][2 * c] = (int16_t)hsum_i32_avx2(_mm256_add_epi32(v[0], v[1]));
            dst[b].bsum[r][2 * c + 1] = (int16_t)hsum_i32_avx2(_mm256_add_epi32(v[2], v[3]));
        }
        dst[b].d[r] = d;
    }
}

/* Quantizes rows [begin, end) of x into their panels. */
static void quantize_rows(void *arg, int64_t begin, int64_t end) {
    qmm_problem *p = arg;
    const int64_t K = p->K;
    float *tmp = NULL;
    if (!(p->x_dt == TO_F32 && (p->xs1 == 1 || K == 1))) {
        tmp = to_scratch(3, (size_t)K * sizeof(float));
        if (!tmp) {
            atomic_store(&p->failed, 1);
            return;
        }
    }
    for (int64_t m = begin; m < end; m++) {
        const char *xrow = p->x + m * p->xs0 * p->xsize;
        const float *src = (const float *)xrow;
        if (tmp) {
            to_load_f32(tmp, xrow, p->x_dt, K, p->xs1);
            src = tmp;
        }
        char *panel = p->qx + (m / PR) * p->nb * p->xblk;
        int r = (int)(m % PR);
        int avx2 = p->simd >= TO_SIMD_AVX2;
        if (is_k_quant(p->wtype))
            (avx2 ? quant256_avx2 : quant256_scalar)(src, (qx256 *)panel, r, p->nb);
        else
            (avx2 ? quant32_avx2 : quant32_scalar)(src, (qx32 *)panel, r, p->nb);
    }
}

/* =====================================================================================
 * Scalar dot products: one weight row with row r of a panel, all blocks.
 * ===================================================================================== */

static float dot32_scalar(int wt, const char *w, const qx32 *x, int r, int64_t nb) {
    float acc = 0.0f, off = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *xq = x[b].q[r];
        int isum = 0;
        float dw;
        if (wt == TO_Q8_0) {
            const to_block_q8_0 *blk = (const to_block_q8_0 *)w + b;
            for (int k = 0; k < TO_QK; k++)
                isum += blk->qs[k] * xq[k];
            dw = to_f16_to_f32(blk->d);
        } else {
            const uint8_t *qs;
            if (wt == TO_Q4_0) {
                const to_block_q4_0 *blk = (const to_block_q4_0 *)w + b;
                qs = blk->qs;
                dw = to_f16_to_f32(blk->d);
                off += dw * x[b].ds[r][1]; /* times -8 below */
            } else {
                const to_block_q4_1 *blk = (const to_block_q4_1 *)w + b;
                qs = blk->qs;
                dw = to_f16_to_f32(blk->d);
                off += to_f16_to_f32(blk->m) * x[b].ds[r][1];
            }
            for (int k = 0; k < TO_QK / 2; k++)
                isum += (qs[k] & 15) * xq[k] + (qs[k] >> 4) * xq[k + TO_QK / 2];
        }
        acc += dw * x[b].ds[r][0] * (float)isum;
    }
    return wt == TO_Q4_0 ? acc - 8.0f * off : acc + off;
}

/* The 6-bit scale and min of sub-block j of a Q4_K block (GGML's packing). */
static inline void q4k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static float dot_q4k_scalar(const char *w, const qx256 *x, int r, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const to_block_q4_k *blk = (const to_block_q4_k *)w + b;
        const int8_t *xq = x[b].q[r];
        int isum = 0, msum = 0;
        for (int j = 0; j < 8; j++) { /* sub-block j: nibbles of qs[32 * (j / 2) ..] */
            int sc, m, dot = 0;
            q4k_scale_min(blk->scales, j, &sc, &m);
            const uint8_t *qs = blk->qs + 32 * (j / 2);
            int shift = 4 * (j & 1);
            for (int k = 0; k < 32; k++)
                dot += ((qs[k] >> shift) & 15) * xq[32 * j + k];
            isum += sc * dot;
            msum += m * (x[b].bsum[r][2 * j] + x[b].bsum[r][2 * j + 1]);
        }
        float dx = x[b].d[r];
        acc += to_f16_to_f32(blk->d) * dx * (float)isum - to_f16_to_f32(blk->dmin) * dx * (float)msum;
    }
    return acc;
}

static float dot_q6k_scalar(const char *w, const qx256 *x, int r, int64_t nb) {
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const to_block_q6_k *blk = (const to_block_q6_k *)w + b;
        const int8_t *xq = x[b].q[r];
        int isum = 0;
        for (int h = 0; h < 2; h++) { /* halves of 128: ql 64 bytes, qh 32 bytes, 8 scales */
            const uint8_t *ql = blk->ql + 64 * h, *qh = blk->qh + 32 * h;
            const int8_t *sc = blk->scales + 8 * h, *xh = xq + 128 * h;
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q0 = (ql[l] & 15) | ((qh[l] & 3) << 4);
                int q1 = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                int q2 = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                int q3 = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                isum += sc[is] * q0 * xh[l] + sc[is + 2] * q1 * xh[l + 32] + sc[is + 4] * q2 * xh[l + 64] +
                        sc[is + 6] * q3 * xh[l + 96];
            }
        }
        for (int g = 0; g < 16; g++) /* the -32 of every quant */
            isum -= 32 * blk->scales[g] * x[b].bsum[r][g];
        acc += to_f16_to_f32(blk->d) * x[b].d[r] * (float)isum;
    }
    return acc;
}

static void tile_scalar(const qmm_problem *p, int xr, int nw, const char *w, const char *x, float res[PR][8]) {
    for (int j = 0; j < nw; j++) {
        const char *wj = w + j * p->wrow;
        for (int i = 0; i < xr; i++) {
            if (p->wtype == TO_Q4_K)
                res[i][j] = dot_q4k_scalar(wj, (const qx256 *)x, i, p->nb);
            else if (p->wtype == TO_Q6_K)
                res[i][j] = dot_q6k_scalar(wj, (const qx256 *)x, i, p->nb);
            else
                res[i][j] = dot32_scalar(p->wtype, wj, (const qx32 *)x, i, p->nb);
        }
    }
}

/* =====================================================================================
 * AVX2 micro-kernels: XR rows of x (a panel) x NW weight rows, all blocks of K. Always inlined
 * with constant XR, NW and weight type, so the loops unroll and the XR * NW accumulators stay
 * in registers.
 * ===================================================================================== */

/* The 32 quants of a 32-element weight block as bytes: Q8_0 signed, Q4 nibbles 0..15 (element
 * j < 16 is the low nibble of byte j, element j + 16 its high nibble). The 16 nibble bytes are
 * loaded into both 128-bit lanes (a broadcast load costs no ALU work) and the high lane shifted
 * right by 4 (a 64-bit shift: the bits it moves across bytes land in the masked-off half). */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m256i unpack32_avx2(int wt, const char *blk) {
    if (wt == TO_Q8_0)
        return _mm256_loadu_si256((const __m256i *)(blk + 2));
    __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(blk + (wt == TO_Q4_1 ? 4 : 2))));
    both = _mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4));
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* The two f16 values at p (a block's d and m, or d and dmin) as f32 lanes 0 and 1. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m128 f16x2_avx2(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(v));
}

/* The f16 value at p as f32 lane 0 (reads 2 bytes only: Q6_K's d ends its block). */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m128 f16x1_avx2(const void *p) {
    return _mm_cvtph_ps(_mm_cvtsi32_si128(rd16(p)));
}

/* Prefetches the lines holding bytes [PF_BYTES, PF_BYTES + len) past p into L1. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void prefetch_ahead(const void *p, int len) {
    for (int o = 0; o < len; o += 64)
        _mm_prefetch((const char *)p + PF_BYTES + o, _MM_HINT_T0);
}

/* The per-row offset terms of the Q4 types: sum over blocks of m_w s_x (Q4_1) or -8 d_w s_x
 * (Q4_0), for XR rows of x and NW weight rows, added to res. x's (d, s) pairs of two rows times
 * (d_w, m_w, d_w, m_w) (Q4_1) or d_w (Q4_0) put them in the odd lanes. Fused into the main loop
 * for one or two rows of x; a pass of its own for more, where the main loop has no registers
 * to spare (sharing them made the compiler keep these sums in memory: a store-to-load chain
 * through every block). */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m128 q4_head_avx2(int wt, const char *blk) {
    if (wt == TO_Q4_1)
        return _mm_castpd_ps(_mm_movedup_pd(_mm_castps_pd(f16x2_avx2(blk))));
    return _mm_broadcastss_ps(f16x1_avx2(blk));
}

TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
add_offsets_avx2(int wt, int XR, int NW, const __m128 off[2][WR], float res[PR][8]) {
    for (int j = 0; j < NW; j++) {
        float o[2][4];
        _mm_storeu_ps(o[0], off[0][j]);
        _mm_storeu_ps(o[1], off[1][j]);
        for (int i = 0; i < XR; i++)
            res[i][j] += (wt == TO_Q4_0 ? -8.0f : 1.0f) * o[i / 2][2 * (i % 2) + 1];
    }
}

TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
offsets32_avx2(int wt, int XR, int NW, const char *w, int64_t wrow, const qx32 *x, int64_t nb,
               float res[PR][8]) {
    const int bb = wt == TO_Q4_0 ? 18 : 20;
    __m128 off[2][WR];
    for (int j = 0; j < NW; j++)
        off[0][j] = off[1][j] = _mm_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const __m128 ds01 = _mm_loadu_ps(x[b].ds[0]), ds23 = _mm_loadu_ps(x[b].ds[2]);
        for (int j = 0; j < NW; j++) {
            __m128 h = q4_head_avx2(wt, w + j * wrow + b * bb);
            off[0][j] = _mm_fmadd_ps(h, ds01, off[0][j]);
            off[1][j] = _mm_fmadd_ps(h, ds23, off[1][j]);
        }
    }
    add_offsets_avx2(wt, XR, NW, (const __m128(*)[WR])off, res);
}

TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
tile32_avx2(int wt, int XR, int NW, const char *w, int64_t wrow, const qx32 *x, int64_t nb,
            float res[PR][8]) {
    const int bb = wt == TO_Q8_0 ? 34 : wt == TO_Q4_0 ? 18 : 20;
    const int fused = wt != TO_Q8_0 && XR <= 2; /* offsets in this loop (see offsets32_avx2) */
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[PR][WR];
    __m128 off[2][WR];
    for (int j = 0; j < NW; j++) {
        off[0][j] = off[1][j] = _mm_setzero_ps();
        for (int i = 0; i < XR; i++)
            acc[i][j] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const qx32 *xb = x + b;
        const __m128 ds01 = _mm_loadu_ps(xb->ds[0]);
        const __m128 ds23 = XR > 2 ? _mm_loadu_ps(xb->ds[2]) : ds01;
        for (int j = 0; j < NW; j++) {
            const char *blk = w + j * wrow + b * bb;
            if (wt == TO_Q8_0 && XR <= 2) /* blocks are under a line: one per block covers all */
                prefetch_ahead(blk, 1);
            __m256i wq = unpack32_avx2(wt, blk);
            /* d_w d_x of each row in the even lanes of p01 (rows 0, 1) and p23 (rows 2, 3); with
             * one row only lane 0 matters, so the f16 pair (d, m) is used as loaded */
            __m128 h;
            if (fused)
                h = XR == 1 && wt == TO_Q4_1 ? f16x2_avx2(blk) : q4_head_avx2(wt, blk);
            else
                h = XR == 1 ? f16x1_avx2(blk) : _mm_broadcastss_ps(f16x1_avx2(blk));
            __m128 p01 = _mm_mul_ps(h, ds01);
            __m128 p23 = XR > 2 ? _mm_mul_ps(h, ds23) : p01;
            if (fused)
                off[0][j] = _mm_add_ps(off[0][j], p01);
            /* Each row's scale in all 8 lanes: from a register for one row; for more, stored and
             * broadcast back from memory (a load each instead of a shuffle each: the vector ALUs
             * are the bottleneck of the multi-row kernel, the load ports are not). */
            __m256 scale[PR];
            if (XR == 1) {
                scale[0] = _mm256_broadcastss_ps(p01);
            } else {
                float sc[8] __attribute__((aligned(32)));
                _mm_store_ps(sc, p01);
                if (XR > 2)
                    _mm_store_ps(sc + 4, p23);
                for (int i = 0; i < XR; i++)
                    scale[i] = _mm256_broadcast_ss(sc + 2 * i);
            }
            /* maddubs multiplies unsigned by signed bytes: Q8_0 goes as |w| times x with w's sign */
            __m256i wu = wt == TO_Q8_0 ? _mm256_sign_epi8(wq, wq) : wq;
            for (int i = 0; i < XR; i++) {
                __m256i xq = _mm256_loadu_si256((const __m256i *)xb->q[i]);
                if (wt == TO_Q8_0)
                    xq = _mm256_sign_epi8(xq, wq);
                __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xq), ones);
                acc[i][j] = _mm256_fmadd_ps(scale[i], _mm256_cvtepi32_ps(dot), acc[i][j]);
            }
        }
    }
    for (int j = 0; j < NW; j++)
        for (int i = 0; i < XR; i++)
            res[i][j] = hsum_avx2(acc[i][j]);
    if (fused)
        add_offsets_avx2(wt, XR, NW, (const __m128(*)[WR])off, res);
    else if (wt != TO_Q8_0)
        offsets32_avx2(wt, XR, NW, w, wrow, x, nb, res);
}

/* pshufb controls for picking 16-bit words out of a register of scales: word j in both 128-bit
 * lanes (Q4_K: one sub-block's scale for 32 quants), or word j in the low lane and j + 1 in the
 * high one (Q6_K: 16-element sub-blocks, two per 32 quants). Constant-folded for constant j. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m128i word_ctrl(int j) {
    return _mm_set1_epi16((short)((2 * j + 1) << 8 | 2 * j));
}

TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m256i pick_same_avx2(__m256i words, int j) {
    return _mm256_shuffle_epi8(words, _mm256_broadcastsi128_si256(word_ctrl(j)));
}

TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m256i pick_pair_avx2(__m256i words, int j) {
    return _mm256_shuffle_epi8(words, _mm256_setr_m128i(word_ctrl(j), word_ctrl(j + 1)));
}

/* The eight 6-bit scales (bytes 0..7) and mins (bytes 8..15) of a Q4_K block, unpacked in
 * vector registers. With u0, u1, u2 the three 32-bit words of `scales` (GGML's packing):
 *   scales 0..3 = u0 & 0x3f..,  scales 4..7 = (u2 & 0x0f..)        | ((u0 >> 6) & 0x03..) << 4
 *   mins   0..3 = u1 & 0x3f..,  mins   4..7 = ((u2 >> 4) & 0x0f..) | ((u1 >> 6) & 0x03..) << 4
 * computed as one 4-lane expression over (u0, u2, u1, u2) and (u0, u0, u1, u1). Reads 16
 * bytes: the 4 after `scales` are the block's first quants. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) __m128i q4k_scales_mins_avx2(const uint8_t *scales) {
    __m128i u = _mm_loadu_si128((const __m128i *)scales);
    __m128i a = _mm_shuffle_epi32(u, _MM_SHUFFLE(2, 1, 2, 0));
    __m128i b = _mm_shuffle_epi32(u, _MM_SHUFFLE(1, 1, 0, 0));
    __m128i lowbits = _mm_and_si128(_mm_srlv_epi32(a, _mm_setr_epi32(0, 0, 0, 4)),
                                    _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    __m128i highbits = _mm_and_si128(_mm_srli_epi32(b, 6), _mm_setr_epi32(0, 0x03030303, 0, 0x03030303));
    return _mm_or_si128(lowbits, _mm_slli_epi32(highbits, 4));
}

TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
tile_q4k_avx2(int XR, int NW, const char *w, int64_t wrow, const qx256 *x, int64_t nb, float res[PR][8]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc[PR][WR];
    for (int j = 0; j < NW; j++)
        for (int i = 0; i < XR; i++)
            acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const qx256 *xb = x + b;
        const __m128 dx = _mm_loadu_ps(xb->d);
        for (int j = 0; j < NW; j++) {
            const to_block_q4_k *blk = (const to_block_q4_k *)(w + j * wrow) + b;
            __m128i sm = q4k_scales_mins_avx2(blk->scales); /* 8 scales, then 8 mins */
            __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            /* each min twice: it applies to two 16-element sums of x */
            __m256i mn16 = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(sm, sm));
            __m128 dd = f16x2_avx2(blk); /* d, dmin */
            float sd[PR] __attribute__((aligned(16))), sm_[PR] __attribute__((aligned(16)));
            _mm_store_ps(sd, _mm_mul_ps(_mm_broadcastss_ps(dd), dx));
            _mm_store_ps(sm_, _mm_mul_ps(_mm_permute_ps(dd, 0x55), dx));
            __m256i isum[PR];
            for (int i = 0; i < XR; i++)
                isum[i] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) { /* 64 elements: sub-blocks 2c (low nibbles), 2c+1 (high) */
                __m256i q = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c));
                __m256i lo = _mm256_and_si256(q, low4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
                __m256i s_lo = pick_same_avx2(sc16, 2 * c);
                __m256i s_hi = pick_same_avx2(sc16, 2 * c + 1);
                for (int i = 0; i < XR; i++) {
                    const int8_t *xq = xb->q[i] + 64 * c;
                    __m256i a = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xq)), s_lo);
                    __m256i h = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xq + 32))), s_hi);
                    isum[i] = _mm256_add_epi32(isum[i], _mm256_add_epi32(a, h));
                }
            }
            for (int i = 0; i < XR; i++) {
                __m256i mins = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsum[i]), mn16);
                acc[i][j] = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + i), _mm256_cvtepi32_ps(isum[i]), acc[i][j]);
                acc[i][j] = _mm256_fnmadd_ps(_mm256_broadcast_ss(sm_ + i), _mm256_cvtepi32_ps(mins), acc[i][j]);
            }
        }
    }
    for (int j = 0; j < NW; j++)
        for (int i = 0; i < XR; i++)
            res[i][j] = hsum_avx2(acc[i][j]);
}

TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
tile_q6k_avx2(int XR, int NW, const char *w, int64_t wrow, const qx256 *x, int64_t nb, float res[PR][8]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc[PR][WR];
    for (int j = 0; j < NW; j++)
        for (int i = 0; i < XR; i++)
            acc[i][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const qx256 *xb = x + b;
        const __m128 dx = _mm_loadu_ps(xb->d);
        for (int j = 0; j < NW; j++) {
            const to_block_q6_k *blk = (const to_block_q6_k *)(w + j * wrow) + b;
            float sd[PR] __attribute__((aligned(16)));
            _mm_store_ps(sd, _mm_mul_ps(_mm_broadcastss_ps(f16x1_avx2(&blk->d)), dx));
            __m128i sc8 = _mm_loadu_si128((const __m128i *)blk->scales);
            __m256i isum[PR];
            /* the -32 of every quant: -32 * sum_g scale_g * (sum of x's quants in group g) */
            __m256i sc_all = _mm256_cvtepi8_epi16(sc8);
            for (int i = 0; i < XR; i++)
                isum[i] = _mm256_slli_epi32(
                    _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)xb->bsum[i]), sc_all), 5);
            for (int i = 0; i < XR; i++)
                isum[i] = _mm256_sub_epi32(_mm256_setzero_si256(), isum[i]);
            for (int h = 0; h < 2; h++) { /* halves of 128 elements */
                /* this half's 8 scales as i16 in both lanes (no byte shift by 8 * h: its count must be an
                 * immediate, and h is one only where the loop is unrolled) */
                __m128i half = h == 0 ? sc8 : _mm_unpackhi_epi64(sc8, sc8);
                __m256i s16 = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(half));
                __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * h));
                __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk->ql + 64 * h + 32));
                __m256i hb = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
                __m256i q[4]; /* 6-bit quants of elements 32k .. 32k + 31 of this half */
                q[0] = _mm256_or_si256(_mm256_and_si256(l0, low4),
                                       _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(0x03)), 4));
                q[1] = _mm256_or_si256(_mm256_and_si256(l1, low4),
                                       _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(0x0C)), 2));
                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                                       _mm256_and_si256(hb, _mm256_set1_epi8(0x30)));
                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                       _mm256_srli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8((char)0xC0)), 2));
                for (int k = 0; k < 4; k++) {
                    __m256i s = pick_pair_avx2(s16, 2 * k);
                    for (int i = 0; i < XR; i++) {
                        __m256i xq = _mm256_loadu_si256((const __m256i *)(xb->q[i] + 128 * h + 32 * k));
                        isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(_mm256_maddubs_epi16(q[k], xq), s));
                    }
                }
            }
            for (int i = 0; i < XR; i++)
                acc[i][j] = _mm256_fmadd_ps(_mm256_broadcast_ss(sd + i), _mm256_cvtepi32_ps(isum[i]), acc[i][j]);
        }
    }
    for (int j = 0; j < NW; j++)
        for (int i = 0; i < XR; i++)
            res[i][j] = hsum_avx2(acc[i][j]);
}

/* One specialised copy per (weight type, rows of x, weight rows). */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
tile_type_avx2(int wt, int XR, int NW, const char *w, int64_t wrow, const char *x, int64_t nb,
               float res[PR][8]) {
    switch (wt) {
    case TO_Q4_K: tile_q4k_avx2(XR, NW, w, wrow, (const qx256 *)x, nb, res); break;
    case TO_Q6_K: tile_q6k_avx2(XR, NW, w, wrow, (const qx256 *)x, nb, res); break;
    case TO_Q4_1: tile32_avx2(TO_Q4_1, XR, NW, w, wrow, (const qx32 *)x, nb, res); break;
    case TO_Q4_0: tile32_avx2(TO_Q4_0, XR, NW, w, wrow, (const qx32 *)x, nb, res); break;
    default: tile32_avx2(TO_Q8_0, XR, NW, w, wrow, (const qx32 *)x, nb, res); break;
    }
}

TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
tile_nw_avx2(int wt, int XR, int nw, const char *w, int64_t wrow, const char *x, int64_t nb, float res[PR][8]) {
    if (nw == 2)
        tile_type_avx2(wt, XR, 2, w, wrow, x, nb, res);
    else
        tile_type_avx2(wt, XR, 1, w, wrow, x, nb, res);
}

TO_TARGET_AVX2 static void tile_avx2(int wt, int xr, int nw, const char *w, int64_t wrow, const char *x,
                                     int64_t nb, float res[PR][8]) {
    switch (xr) {
    case 1: tile_nw_avx2(wt, 1, nw, w, wrow, x, nb, res); break;
    case 2: tile_nw_avx2(wt, 2, nw, w, wrow, x, nb, res); break;
    case 3: tile_nw_avx2(wt, 3, nw, w, wrow, x, nb, res); break;
    default: tile_nw_avx2(wt, 4, nw, w, wrow, x, nb, res); break;
    }
}

/* =====================================================================================
 * Driver
 * ===================================================================================== */

/* Weight rows [unit * begin, unit * end) (clipped to N) times every row of x. A unit is the WR
 * rows of a micro-kernel, or the group of 8 rows of the X8 types. */
static void qmm_range(void *arg, int64_t begin, int64_t end) {
    qmm_problem *p = arg;
    const int64_t n1 = p->unit * end < p->N ? p->unit * end : p->N;
    const int64_t pbytes = p->nb * p->xblk;
    float res[PR][8];
    for (int64_t c0 = 0; c0 < p->panels; c0 += p->chunk) {
        int64_t c1 = c0 + p->chunk < p->panels ? c0 + p->chunk : p->panels;
        for (int64_t n = p->unit * begin; n < n1; n += p->unit) {
            int nw = n1 - n < p->unit ? (int)(n1 - n) : p->unit;
            const char *w = p->w + n * p->wrow;
            for (int64_t pi = c0; pi < c1; pi++) {
                int64_t m0 = pi * PR;
                int xr = p->M - m0 < PR ? (int)(p->M - m0) : PR;
                const char *x = p->qx + pi * pbytes;
                if (to_is_x8(p->wtype))
                    to_qx8_tile(p->wtype, xr, w, (const qx32 *)x, p->nb, p->simd, res);
                else if (p->simd >= TO_SIMD_AVX2)
                    tile_avx2(p->wtype, xr, nw, w, p->wrow, x, p->nb, res);
                else
                    tile_scalar(p, xr, nw, w, x, res);
                for (int i = 0; i < xr; i++) {
                    char *orow = p->out + (m0 + i) * p->os0 * p->osize;
                    for (int j = 0; j < nw; j++)
                        store_elem(orow, p->out_dt, n + j, res[i][j] + (p->bias ? p->bias[n + j] : 0.0f));
                }
            }
        }
    }
}

int to_cpu_qmatmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias) {
    qmm_problem p;
    memset(&p, 0, sizeof p);
    p.M = x->shape[0];
    p.K = x->shape[1];
    p.N = w->shape[0];
    if (p.M == 0 || p.N == 0)
        return TO_OK;
    p.wtype = w->dtype;
    p.w = w->data;
    p.wrow = to_dtype_bytes(w->dtype, w->strides[0]);
    p.nb = p.K / to_dtype_block_size(w->dtype);
    p.x = x->data;
    p.xs0 = x->strides[0];
    p.xs1 = x->strides[1];
    p.x_dt = x->dtype;
    p.xsize = to_dtype_size(x->dtype);
    p.out = out->data;
    p.os0 = out->strides[0];
    p.out_dt = out->dtype;
    p.osize = to_dtype_size(out->dtype);
    p.simd = to_simd();
    atomic_init(&p.failed, 0);

    TO_TRY(to_cpu_matmul_bias(out, bias, p.K, &p.bias));
    if (p.K == 0) /* no blocks: out = bias (or 0) */
        return TO_OK;

    p.xblk = is_k_quant(p.wtype) ? (int64_t)sizeof(qx256) : (int64_t)sizeof(qx32);
    p.panels = (p.M + PR - 1) / PR;
    int64_t pbytes = p.nb * p.xblk;
    p.chunk = X_CHUNK_BYTES / pbytes > 0 ? X_CHUNK_BYTES / pbytes : 1;
    p.qx = to_scratch(0, (size_t)(p.panels * pbytes));
    if (!p.qx)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_matmul: out of memory for %lld quantized rows of x",
                       (long long)p.M);

    /* rows past M in the last panel are never used, but keep them defined */
    if (p.M % PR)
        memset(p.qx + (p.panels - 1) * pbytes, 0, (size_t)pbytes);
    /* a few rows are quicker to quantize here than to hand out */
    to_parallel_for(p.M, p.M * p.K <= (1 << 15) ? p.M : 4, quantize_rows, &p);
    if (atomic_load(&p.failed))
        return to_fail(TO_ERR_OUT_OF_MEMORY, "to_matmul: out of memory for converting rows of x");

    p.unit = to_is_x8(p.wtype) ? TO_X8_ROWS : WR;
    int64_t units = (p.N + p.unit - 1) / p.unit;
    int64_t unit_bytes = p.unit * to_dtype_bytes(p.wtype, p.K);
    to_parallel_for(units, MIN_WBYTES_PER_THREAD / unit_bytes + 1, qmm_range, &p);
    return TO_OK;
}
