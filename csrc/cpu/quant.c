/* quant.c - rows of f32 <-> GGML-compatible blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K).
 *
 * Dequantization gives, for every element, exactly the f32 value GGML (and gguf-py's numpy
 * reference) computes: the same products and sums in the same order, each rounded to f32, never
 * fused (the build has -ffp-contract=off; the AVX2 twins use no FMA for the same reason), so the
 * scalar and AVX2 paths agree bit for bit:
 *   Q8_0  d * q          Q4_0  d * (q - 8)          Q4_1  (d * q) + m
 *   Q4_K  (d * sc) * q - (dmin * m)                  Q6_K  (d * sc) * (q - 32)
 *
 * Quantization of Q8_0, Q4_0 and Q4_1 follows GGML's reference quantizers step for step (scale
 * from the block's extremes in f32, its reciprocal, rounding of x * (1/d), then the scale rounded
 * to f16), so the blocks are byte-identical to theirs for finite inputs. Q8_0 rounds halves away
 * from zero (roundf), Q4_0 and Q4_1 add 8.5 / 0.5 and truncate.
 *
 * Q4_K and Q6_K have no single reference result; ours work in three steps per super-block:
 *  1. each sub-block gets a scale (and for Q4_K a min) by trying a few grids around the one that
 *     spans its values exactly, each followed by a weighted least-squares fit of scale and offset
 *     to the levels it gave; the fit with the smallest weighted error wins. Weights are
 *     rms(sub-block) + |x|, so the large values a grid clips cost more than small ones.
 *  2. the sub-block scales (and mins) are quantized to 6 bits (Q4_K) or int8 (Q6_K) against one
 *     f16 super-block scale chosen so the largest maps to the top of the range;
 *  3. each sub-block's integer scale is nudged by +-1 (and the min, for Q4_K) when that lowers its
 *     error with the final f16 scales, then the elements are rounded to those final steps.
 * Non-finite inputs give unspecified (but well-defined, never undefined-behaviour) blocks. */
#include "cpu/quant.h"

#include <float.h>
#include <immintrin.h>
#include <math.h>

/* x, already integral or to be truncated toward zero, as an int in [lo, hi]; NaN gives 0. Every
 * float -> int conversion goes through here so garbage inputs cannot reach an out-of-range cast. */
static inline int to_int_clamped(float x, int lo, int hi) {
    if (x != x)
        return 0;
    if (x <= (float)lo)
        return lo;
    if (x >= (float)hi)
        return hi;
    return (int)x;
}

/* A k-quant super-block scale: the f16 bits of the smallest half d >= 0 near v / levels with
 * v / d <= levels + 1/2, so the largest sub-block scale v still rounds to at most `levels` steps
 * (plain rounding to f16, coarse for small subnormal halves, could clip it). Saturates at the
 * largest finite half. */
static uint16_t f16_scale(float v, int levels) {
    float d = v / (float)levels;
    uint16_t h = to_f32_to_f16(d < 65504.0f ? d : 65504.0f);
    while (h < 0x7bffu && v > ((float)levels + 0.5f) * to_f16_to_f32(h))
        h++; /* the next half up (same sign, bits are ordered like the values) */
    return h;
}

/* Q4_K's twelve scale bytes: sub-blocks 0-3 keep 6-bit scale and min in the low bits of bytes
 * 0-3 and 4-7; sub-blocks 4-7 keep their low 4 bits in bytes 8-11 (scale low nibble, min high
 * nibble) and their top 2 bits in the top bits of bytes 0-3 (scale) and 4-7 (min). */
static inline void q4_k_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

static void q4_k_pack_scales(uint8_t *s, const int *sc, const int *m) {
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)(m[j] | ((m[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4));
    }
}

/* Q6_K element e = 128h + 32k + l (k < 4, l < 32): low 4 bits in ql[64h + 32(k & 1) + l] (low
 * nibble for k < 2, high for k >= 2), high 2 bits at bit 2k of qh[32h + l]; scale scales[e / 16]. */
static inline int q6_k_get(const to_block_q6_k *b, int e) {
    int h = e >> 7, k = (e >> 5) & 3, l = e & 31;
    int lo = (b->ql[64 * h + 32 * (k & 1) + l] >> (k & 2 ? 4 : 0)) & 0xF;
    int hi = (b->qh[32 * h + l] >> (2 * k)) & 3;
    return lo | (hi << 4);
}

/* ===================================================================================== *
 * dequantization, scalar
 * ===================================================================================== */

static void dequant_q8_0(const void *src, float *y, int64_t nb) {
    const to_block_q8_0 *b = src;
    for (int64_t i = 0; i < nb; i++, y += TO_QK) {
        float d = to_f16_to_f32(b[i].d);
        for (int j = 0; j < TO_QK; j++)
            y[j] = d * (float)b[i].qs[j];
    }
}

static void dequant_q4_0(const void *src, float *y, int64_t nb) {
    const to_block_q4_0 *b = src;
    for (int64_t i = 0; i < nb; i++, y += TO_QK) {
        float d = to_f16_to_f32(b[i].d);
        for (int j = 0; j < TO_QK / 2; j++) {
            y[j] = d * (float)((b[i].qs[j] & 0xF) - 8);
            y[j + TO_QK / 2] = d * (float)((b[i].qs[j] >> 4) - 8);
        }
    }
}

static void dequant_q4_1(const void *src, float *y, int64_t nb) {
    const to_block_q4_1 *b = src;
    for (int64_t i = 0; i < nb; i++, y += TO_QK) {
        float d = to_f16_to_f32(b[i].d), m = to_f16_to_f32(b[i].m);
        for (int j = 0; j < TO_QK / 2; j++) {
            y[j] = d * (float)(b[i].qs[j] & 0xF) + m;
            y[j + TO_QK / 2] = d * (float)(b[i].qs[j] >> 4) + m;
        }
    }
}

static void dequant_q4_k(const void *src, float *y, int64_t nb) {
    const to_block_q4_k *b = src;
    for (int64_t i = 0; i < nb; i++, y += TO_QK_K) {
        float d = to_f16_to_f32(b[i].d), dmin = to_f16_to_f32(b[i].dmin);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            q4_k_scale_min(b[i].scales, j, &sc, &m);
            float d1 = d * (float)sc, m1 = dmin * (float)m;
            const uint8_t *q = b[i].qs + 32 * (j / 2);
            int shift = j & 1 ? 4 : 0;
            for (int l = 0; l < 32; l++)
                y[32 * j + l] = d1 * (float)((q[l] >> shift) & 0xF) - m1;
        }
    }
}

static void dequant_q6_k(const void *src, float *y, int64_t nb) {
    const to_block_q6_k *b = src;
    for (int64_t i = 0; i < nb; i++, y += TO_QK_K) {
        float d = to_f16_to_f32(b[i].d);
        for (int e = 0; e < TO_QK_K; e++)
            y[e] = d * (float)b[i].scales[e / 16] * (float)(q6_k_get(&b[i], e) - 32);
    }
}

/* ===================================================================================== *
 * dequantization, AVX2: the same operations eight lanes at a time (mul and sub, no FMA)
 * ===================================================================================== */

/* eight signed bytes -> f32 lanes */
TO_TARGET_AVX2 static inline __m256 i8x8_to_ps(__m128i v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

TO_TARGET_AVX2 static void dequant_q8_0_avx2(const void *src, float *y, int64_t nb) {
    const to_block_q8_0 *b = src;
    for (int64_t i = 0; i < nb; i++, y += TO_QK) {
        __m256 d = _mm256_set1_ps(to_f16_to_f32(b[i].d));
        for (int j = 0; j < TO_QK; j += 8)
            _mm256_storeu_ps(y + j, _mm256_mul_ps(d, i8x8_to_ps(_mm_loadl_epi64((const __m128i *)(b[i].qs + j)))));
    }
}

/* 16 bytes of nibbles -> 32 values (low nibbles first, then high), each minus `bias` */
TO_TARGET_AVX2 static inline void unpack_nibbles16(const uint8_t *qs, int bias, __m128i *lo, __m128i *hi) {
    __m128i v = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0xF), b = _mm_set1_epi8((char)bias);
    *lo = _mm_sub_epi8(_mm_and_si128(v, mask), b);
    *hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), b);
}

TO_TARGET_AVX2 static void dequant_q4_0_avx2(const void *src, float *y, int64_t nb) {
    const to_block_q4_0 *b = src;
    for (int64_t i = 0; i < nb; i++, y += TO_QK) {
        __m256 d = _mm256_set1_ps(to_f16_to_f32(b[i].d));
        __m128i q[2];
        unpack_nibbles16(b[i].qs, 8, &q[0], &q[1]);
        for (int h = 0; h < 2; h++) {
            _mm256_storeu_ps(y + 16 * h, _mm256_mul_ps(d, i8x8_to_ps(q[h])));
            _mm256_storeu_ps(y + 16 * h + 8, _mm256_mul_ps(d, i8x8_to_ps(_mm_srli_si128(q[h], 8))));
        }
    }
}

TO_TARGET_AVX2 static void dequant_q4_1_avx2(const void *src, float *y, int64_t nb) {
    const to_block_q4_1 *b = src;
    for (int64_t i = 0; i < nb; i++, y += TO_QK) {
        __m256 d = _mm256_set1_ps(to_f16_to_f32(b[i].d)), m = _mm256_set1_ps(to_f16_to_f32(b[i].m));
        __m128i q[2];
        unpack_nibbles16(b[i].qs, 0, &q[0], &q[1]);
        for (int h = 0; h < 2; h++) {
            _mm256_storeu_ps(y + 16 * h, _mm256_add_ps(_mm256_mul_ps(d, i8x8_to_ps(q[h])), m));
            _mm256_storeu_ps(y + 16 * h + 8,
                             _mm256_add_ps(_mm256_mul_ps(d, i8x8_to_ps(_mm_srli_si128(q[h], 8))), m));
        }
    }
}

/* 32 values in four groups of eight: y = d1 * q - m1 */
TO_TARGET_AVX2 static inline void store32_affine(float *y, __m256i q, float d1, float m1) {
    __m256 d = _mm256_set1_ps(d1), m = _mm256_set1_ps(m1);
    __m128i half[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int h = 0; h < 2; h++) {
        _mm256_storeu_ps(y + 16 * h, _mm256_sub_ps(_mm256_mul_ps(d, i8x8_to_ps(half[h])), m));
        _mm256_storeu_ps(y + 16 * h + 8, _mm256_sub_ps(_mm256_mul_ps(d, i8x8_to_ps(_mm_srli_si128(half[h], 8))), m));
    }
}

TO_TARGET_AVX2 static void dequant_q4_k_avx2(const void *src, float *y, int64_t nb) {
    const to_block_q4_k *b = src;
    const __m256i mask = _mm256_set1_epi8(0xF);
    for (int64_t i = 0; i < nb; i++, y += TO_QK_K) {
        float d = to_f16_to_f32(b[i].d), dmin = to_f16_to_f32(b[i].dmin);
        for (int p = 0; p < 4; p++) { /* sub-blocks 2p (low nibbles) and 2p + 1 (high) */
            __m256i v = _mm256_loadu_si256((const __m256i *)(b[i].qs + 32 * p));
            __m256i q[2] = {_mm256_and_si256(v, mask), _mm256_and_si256(_mm256_srli_epi16(v, 4), mask)};
            for (int h = 0; h < 2; h++) {
                int sc, m;
                q4_k_scale_min(b[i].scales, 2 * p + h, &sc, &m);
                store32_affine(y + 64 * p + 32 * h, q[h], d * (float)sc, dmin * (float)m);
            }
        }
    }
}

TO_TARGET_AVX2 static void dequant_q6_k_avx2(const void *src, float *y, int64_t nb) {
    const to_block_q6_k *b = src;
    const __m256i m4 = _mm256_set1_epi8(0xF), m2 = _mm256_set1_epi8(3), bias = _mm256_set1_epi8(32);
    for (int64_t i = 0; i < nb; i++, y += TO_QK_K) {
        float d = to_f16_to_f32(b[i].d);
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b[i].ql + 64 * h));
            __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b[i].ql + 64 * h + 32));
            __m256i qh = _mm256_loadu_si256((const __m256i *)(b[i].qh + 32 * h));
            __m256i lo[4] = {_mm256_and_si256(ql0, m4), _mm256_and_si256(ql1, m4),
                             _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                             _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4)};
            for (int k = 0; k < 4; k++) {
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), m2);
                __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo[k], _mm256_slli_epi16(hi, 4)), bias);
                int e = 128 * h + 32 * k;
                /* two sub-blocks of 16, each with its own scale: y = (d * sc) * q */
                __m128i half[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
                for (int s = 0; s < 2; s++) {
                    __m256 ds = _mm256_set1_ps(d * (float)b[i].scales[(e >> 4) + s]);
                    _mm256_storeu_ps(y + e + 16 * s, _mm256_mul_ps(ds, i8x8_to_ps(half[s])));
                    _mm256_storeu_ps(y + e + 16 * s + 8, _mm256_mul_ps(ds, i8x8_to_ps(_mm_srli_si128(half[s], 8))));
                }
            }
        }
    }
}

/* ===================================================================================== *
 * quantization of the 32-element blocks (GGML's reference rules)
 * ===================================================================================== */

static void quant_block_q8_0(const float *x, to_block_q8_0 *y) {
    float amax = 0.0f;
    for (int j = 0; j < TO_QK; j++)
        amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = to_f32_to_f16(d);
    for (int j = 0; j < TO_QK; j++)
        y->qs[j] = (int8_t)to_int_clamped(roundf(x[j] * id), -128, 127);
}

static void quant_q8_0(const float *x, void *dst, int64_t nb) {
    for (int64_t i = 0; i < nb; i++)
        quant_block_q8_0(x + i * TO_QK, (to_block_q8_0 *)dst + i);
}

/* Q4_0: d = -(the value of largest magnitude, first one on ties) / 8, so that value maps to
 * level 0 and the other end gets one level fewer. */
static void quant_q4_0(const float *x, void *dst, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += TO_QK) {
        to_block_q4_0 *y = (to_block_q4_0 *)dst + i;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < TO_QK; j++)
            if (fabsf(x[j]) > amax) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        y->d = to_f32_to_f16(d);
        for (int j = 0; j < TO_QK / 2; j++) {
            int q0 = to_int_clamped(x[j] * id + 8.5f, 0, 15);
            int q1 = to_int_clamped(x[j + TO_QK / 2] * id + 8.5f, 0, 15);
            y->qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

static void quant_q4_1(const float *x, void *dst, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += TO_QK) {
        to_block_q4_1 *y = (to_block_q4_1 *)dst + i;
        float min = FLT_MAX, max = -FLT_MAX;
        for (int j = 0; j < TO_QK; j++) {
            min = fminf(min, x[j]);
            max = fmaxf(max, x[j]);
        }
        float d = (max - min) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        y->d = to_f32_to_f16(d);
        y->m = to_f32_to_f16(min);
        for (int j = 0; j < TO_QK / 2; j++) {
            int q0 = to_int_clamped((x[j] - min) * id + 0.5f, 0, 15);
            int q1 = to_int_clamped((x[j + TO_QK / 2] - min) * id + 0.5f, 0, 15);
            y->qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

/* Q8_0 eight lanes at a time; the same roundings as quant_block_q8_0, and roundf's halves away
 * from zero built exactly: trunc(|v|) + (fraction >= 0.5), sign put back. */
TO_TARGET_AVX2 static void quant_q8_0_avx2(const float *x, void *dst, int64_t nb) {
    const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = 0; i < nb; i++, x += TO_QK) {
        to_block_q8_0 *y = (to_block_q8_0 *)dst + i;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float d = _mm_cvtss_f32(m4) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        y->d = to_f32_to_f16(d);
        __m256i q[4];
        for (int k = 0; k < 4; k++) {
            __m256 s = _mm256_mul_ps(v[k], _mm256_set1_ps(id));
            __m256 a = _mm256_andnot_ps(sign, s);
            __m256 t = _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            t = _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(_mm256_sub_ps(a, t), half, _CMP_GE_OQ), one));
            q[k] = _mm256_cvttps_epi32(_mm256_or_ps(t, _mm256_and_ps(sign, s)));
        }
        /* packs work within 128-bit lanes: the permute puts the 32 bytes back in order */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)y->qs, _mm256_permutevar8x32_epi32(p, order));
    }
}

/* ===================================================================================== *
 * k-quants: sub-block fits, then the super-block's scales
 * ===================================================================================== */

/* Importance of each value of a sub-block of n: its rms plus the value's magnitude. */
static void sub_block_weights(const float *x, int n, float *w) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    float rms = sqrtf(ss / (float)n);
    for (int i = 0; i < n; i++)
        w[i] = rms + fabsf(x[i]);
}

/* Weighted least squares for x ~ s * q + b given the levels q (b <= 0: Q4_K stores -b as a
 * non-negative min; when the free optimum has b > 0 the fit is redone through the origin).
 * Returns 0 when the levels are all equal (no unique fit). */
static int fit_affine(const float *x, const float *w, const int *q, int n, float *s, float *b) {
    double sw = 0, swq = 0, swqq = 0, swx = 0, swqx = 0;
    for (int i = 0; i < n; i++) {
        sw += w[i];
        swq += w[i] * q[i];
        swqq += (double)w[i] * q[i] * q[i];
        swx += (double)w[i] * x[i];
        swqx += (double)w[i] * q[i] * x[i];
    }
    double det = sw * swqq - swq * swq;
    if (!(det > 0))
        return 0;
    double ss = (sw * swqx - swq * swx) / det, bb = (swqq * swx - swq * swqx) / det;
    if (bb > 0) {
        bb = 0;
        ss = swqx / swqq;
    }
    *s = (float)ss;
    *b = (float)bb;
    return 1;
}

static float weighted_error(const float *x, const float *w, const int *q, int n, float s, float b) {
    float err = 0.0f;
    for (int i = 0; i < n; i++) {
        float e = s * (float)q[i] + b - x[i];
        err += w[i] * e * e;
    }
    return err;
}

/* Q4_K step 1: scale s >= 0 and min m >= 0 of one sub-block of 32 with x ~ s * q - m, q in
 * [0, 15]. Grids of 15 +- 1 steps (in tenths) over [min(x, 0), max(x)] are each fitted. */
static void fit_scale_min(const float *x, const float *w, float *scale, float *min) {
    enum { N = 32, NMAX = 15 };
    float lo = 0.0f, hi = -FLT_MAX;
    for (int i = 0; i < N; i++) {
        lo = fminf(lo, x[i]);
        hi = fmaxf(hi, x[i]);
    }
    *scale = 0.0f;
    *min = -lo;
    if (!(hi > lo))
        return;
    float best = FLT_MAX;
    int q[N];
    for (int k = -10; k <= 10; k++) {
        float iscale = ((float)NMAX + 0.1f * (float)k) / (hi - lo);
        for (int i = 0; i < N; i++)
            q[i] = to_int_clamped(roundf((x[i] - lo) * iscale), 0, NMAX);
        float s = 1.0f / iscale, b = lo;
        if (!fit_affine(x, w, q, N, &s, &b) || s < 0.0f)
            s = 1.0f / iscale, b = lo;
        float err = weighted_error(x, w, q, N, s, b);
        if (err < best) {
            best = err;
            *scale = s;
            *min = -b;
        }
    }
}

/* Error of one Q4_K sub-block with final steps ds (scale) and dm (min), its levels into q. */
static float q4_k_requant(const float *x, const float *w, float ds, float dm, int *q) {
    float id = ds != 0.0f ? 1.0f / ds : 0.0f, err = 0.0f;
    for (int i = 0; i < 32; i++) {
        q[i] = to_int_clamped(roundf((x[i] + dm) * id), 0, 15);
        float e = ds * (float)q[i] - dm - x[i]; /* as the dequantizer computes it */
        err += w[i] * e * e;
    }
    return err;
}

/* the integer nearest v / unit in [0, hi] (0 when unit is 0) */
static int nearest_level(float v, float unit, int lo, int hi) {
    return unit > 0.0f ? to_int_clamped(roundf(v / unit), lo, hi) : 0;
}

static void quant_block_q4_k(const float *x, to_block_q4_k *y) {
    float w[TO_QK_K], scale[8], min[8], max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < 8; j++) {
        sub_block_weights(x + 32 * j, 32, w + 32 * j);
        fit_scale_min(x + 32 * j, w + 32 * j, &scale[j], &min[j]);
        max_scale = fmaxf(max_scale, scale[j]);
        max_min = fmaxf(max_min, min[j]);
    }
    y->d = f16_scale(max_scale, 63);
    y->dmin = f16_scale(max_min, 63);
    float d = to_f16_to_f32(y->d), dmin = to_f16_to_f32(y->dmin);
    int sc[8], m[8], q[32], best_q[32];
    for (int j = 0; j < 8; j++) {
        const float *xj = x + 32 * j, *wj = w + 32 * j;
        int sc0 = nearest_level(scale[j], d, 0, 63), m0 = nearest_level(min[j], dmin, 0, 63);
        float best = FLT_MAX; /* the start values stand when every error is NaN (NaN inputs) */
        sc[j] = sc0;
        m[j] = m0;
        memset(best_q, 0, sizeof best_q);
        for (int a = sc0 - 1; a <= sc0 + 1; a++)
            for (int c = m0 - 1; c <= m0 + 1; c++) {
                if (a < 0 || a > 63 || c < 0 || c > 63)
                    continue;
                float err = q4_k_requant(xj, wj, d * (float)a, dmin * (float)c, q);
                if (err < best) {
                    best = err;
                    sc[j] = a;
                    m[j] = c;
                    memcpy(best_q, q, sizeof q);
                }
            }
        for (int l = 0; l < 32; l++) { /* sub-block j: nibble (j & 1) of qs[32 (j / 2) + l] */
            uint8_t *p = &y->qs[32 * (j / 2) + l];
            *p = (uint8_t)(j & 1 ? (*p & 0x0F) | (best_q[l] << 4) : best_q[l]);
        }
    }
    q4_k_pack_scales(y->scales, sc, m);
}

/* Q6_K step 1: signed scale s of one sub-block of 16 with x ~ s * q, q in [-32, 31]. The value of
 * largest magnitude goes to -32 (the level the other side lacks) on the spanning grid; grids a
 * little coarser and finer (clipping it) are fitted too. */
static float fit_scale_sym(const float *x, const float *w) {
    enum { N = 16 };
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < N; i++)
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    if (amax == 0.0f)
        return 0.0f;
    float best = FLT_MAX, scale = max / -32.0f;
    int q[N];
    for (int k = -10; k <= 10; k++) {
        float iscale = -(32.0f + 0.1f * (float)k) / max;
        double swqx = 0, swqq = 0;
        for (int i = 0; i < N; i++) {
            q[i] = to_int_clamped(roundf(x[i] * iscale), -32, 31);
            swqx += (double)w[i] * q[i] * x[i];
            swqq += (double)w[i] * q[i] * q[i];
        }
        if (!(swqq > 0))
            continue;
        float s = (float)(swqx / swqq), err = weighted_error(x, w, q, N, s, 0.0f);
        if (err < best) {
            best = err;
            scale = s;
        }
    }
    return scale;
}

/* Error of one Q6_K sub-block with final step ds, its levels (minus 32) into q. */
static float q6_k_requant(const float *x, const float *w, float ds, int *q) {
    float id = ds != 0.0f ? 1.0f / ds : 0.0f, err = 0.0f;
    for (int i = 0; i < 16; i++) {
        q[i] = to_int_clamped(roundf(x[i] * id), -32, 31);
        float e = ds * (float)q[i] - x[i];
        err += w[i] * e * e;
    }
    return err;
}

static void quant_block_q6_k(const float *x, to_block_q6_k *y) {
    float w[TO_QK_K], scale[16], max = 0.0f;
    for (int j = 0; j < 16; j++) {
        sub_block_weights(x + 16 * j, 16, w + 16 * j);
        scale[j] = fit_scale_sym(x + 16 * j, w + 16 * j);
        if (fabsf(scale[j]) > fabsf(max))
            max = scale[j];
    }
    /* the sub-scale of largest magnitude becomes -128, so d is positive when max is negative */
    y->d = (uint16_t)(f16_scale(fabsf(max), 128) | (max > 0.0f ? 0x8000u : 0));
    float d = to_f16_to_f32(y->d), ad = fabsf(d);
    int q[TO_QK_K], tmp[16], best_q[16];
    memset(y->ql, 0, sizeof y->ql);
    memset(y->qh, 0, sizeof y->qh);
    for (int j = 0; j < 16; j++) {
        const float *xj = x + 16 * j, *wj = w + 16 * j;
        int s0 = ad > 0.0f ? to_int_clamped(roundf(scale[j] / d), -128, 127) : 0;
        float best = FLT_MAX; /* the start values stand when every error is NaN (NaN inputs) */
        int best_s = s0;
        memset(best_q, 0, sizeof best_q);
        for (int s = s0 - 1; s <= s0 + 1; s++) {
            if (s < -128 || s > 127)
                continue;
            float err = q6_k_requant(xj, wj, d * (float)s, tmp);
            if (err < best) {
                best = err;
                best_s = s;
                memcpy(best_q, tmp, sizeof best_q);
            }
        }
        y->scales[j] = (int8_t)best_s;
        for (int l = 0; l < 16; l++)
            q[16 * j + l] = best_q[l] + 32;
    }
    for (int e = 0; e < TO_QK_K; e++) { /* the layout of q6_k_get */
        int h = e >> 7, k = (e >> 5) & 3, l = e & 31;
        y->ql[64 * h + 32 * (k & 1) + l] |= (uint8_t)((q[e] & 0xF) << (k & 2 ? 4 : 0));
        y->qh[32 * h + l] |= (uint8_t)((q[e] >> 4) << (2 * k));
    }
}

static void quant_q4_k(const float *x, void *dst, int64_t nb) {
    for (int64_t i = 0; i < nb; i++)
        quant_block_q4_k(x + i * TO_QK_K, (to_block_q4_k *)dst + i);
}

static void quant_q6_k(const float *x, void *dst, int64_t nb) {
    for (int64_t i = 0; i < nb; i++)
        quant_block_q6_k(x + i * TO_QK_K, (to_block_q6_k *)dst + i);
}

/* ===================================================================================== *
 * dispatch
 * ===================================================================================== */

typedef void (*dequant_fn)(const void *src, float *dst, int64_t nb);
typedef void (*quant_fn)(const float *src, void *dst, int64_t nb);

struct quant_kernels {
    dequant_fn dequant, dequant_avx2;
    quant_fn quant, quant_avx2; /* quant_avx2 NULL: the scalar one serves both */
};

static const struct quant_kernels *kernels(int dtype) {
    static const struct quant_kernels q8_0 = {dequant_q8_0, dequant_q8_0_avx2, quant_q8_0, quant_q8_0_avx2};
    static const struct quant_kernels q4_0 = {dequant_q4_0, dequant_q4_0_avx2, quant_q4_0, NULL};
    static const struct quant_kernels q4_1 = {dequant_q4_1, dequant_q4_1_avx2, quant_q4_1, NULL};
    static const struct quant_kernels q4_k = {dequant_q4_k, dequant_q4_k_avx2, quant_q4_k, NULL};
    static const struct quant_kernels q6_k = {dequant_q6_k, dequant_q6_k_avx2, quant_q6_k, NULL};
    switch (dtype) {
    case TO_Q8_0: return &q8_0;
    case TO_Q4_0: return &q4_0;
    case TO_Q4_1: return &q4_1;
    case TO_Q4_K: return &q4_k;
    case TO_Q6_K: return &q6_k;
    }
    return NULL;
}

void to_dequantize_row(int dtype, const void *src, float *dst, int64_t n) {
    const struct quant_kernels *k = kernels(dtype);
    if (!k)
        return;
    int64_t nb = n / to_dtype_block_size(dtype);
    (to_simd() >= TO_SIMD_AVX2 ? k->dequant_avx2 : k->dequant)(src, dst, nb);
}

void to_quantize_row(int dtype, const float *src, void *dst, int64_t n) {
    const struct quant_kernels *k = kernels(dtype);
    if (!k)
        return;
    int64_t nb = n / to_dtype_block_size(dtype);
    (to_simd() >= TO_SIMD_AVX2 && k->quant_avx2 ? k->quant_avx2 : k->quant)(src, dst, nb);
}

/* ===================================================================================== *
 * spans of any two dtypes through f32
 * ===================================================================================== */

#define CHUNK 1024 /* elements per pass (4 KB of stack); a whole number of blocks of every dtype */

void to_convert_span(void *dst, int dto, int64_t so, const void *src, int dtx, int64_t sx, int64_t n) {
    float tmp[CHUNK];
    for (int64_t i = 0; i < n; i += CHUNK) {
        int64_t m = n - i < CHUNK ? n - i : CHUNK;
        const void *s = (const char *)src + to_dtype_bytes(dtx, i * sx);
        void *d = (char *)dst + to_dtype_bytes(dto, i * so);
        if (to_is_quantized(dtx))
            to_dequantize_row(dtx, s, tmp, m);
        else
            to_load_f32(tmp, s, dtx, m, sx);
        if (to_is_quantized(dto))
            to_quantize_row(dto, tmp, d, m);
        else
            to_store_f32(d, dto, tmp, m, so);
    }
}
