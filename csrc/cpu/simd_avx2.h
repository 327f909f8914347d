/* simd_avx2.h - horizontal reductions of AVX2 registers, shared by the kernels that end a
 * vector loop with one value per row (matmul, qmatmul, attention), and e^x for x <= 0 (softmax,
 * silu, beam search's log-softmax). */
#ifndef TO_CPU_SIMD_AVX2_H
#define TO_CPU_SIMD_AVX2_H

#include "internal.h"

#include <immintrin.h>
#include <math.h>

/* sum of the 8 floats: (0+4, 1+5, 2+6, 3+7) pairwise, then down to one */
TO_TARGET_AVX2 static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TO_TARGET_AVX2 static inline float hmax_avx2(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

TO_TARGET_AVX2 static inline int hsum_i32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

/* e^x for x <= 0 (or NaN). x = n ln2 + r with |r| <= ln2/2 (ln2 split in two constants so n ln2
 * is exact to f32 precision), e^r from the Cephes expf polynomial, 2^n built in the exponent
 * bits. Below ln(FLT_MIN) the true value is subnormal (< 1.2e-38): it is flushed to 0, which
 * keeps n >= -126 so 2^n stays a normal float. */
TO_TARGET_AVX2 static inline __m256 exp_avx2(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654475f); /* ln(FLT_MIN) */
    __m256 xc = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    /* e^r = 1 + (r + r^2 p): the small part first, so adding 1 is the only large rounding */
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
    y = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);            /* tiny: 0 */
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));     /* NaN stays NaN */
}

/* sum of e^(x[i] - m), x[i] <= m, in double. The tails go through the vector exp too (padded with -inf: e^-inf = 0), so every element of
 * a row sees the same exp. */
TO_TARGET_AVX2 static inline double exp_sum_avx2(const float *x, int64_t n, float m) {
    __m256 mv = _mm256_set1_ps(m);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    for (int64_t i = 0; i < n; i += 8) {
        __m256 v;
        if (i + 8 <= n) {
            v = _mm256_loadu_ps(x + i);
        } else {
            float t[8];
            for (int j = 0; j < 8; j++)
                t[j] = i + j < n ? x[i + j] : -INFINITY;
            v = _mm256_loadu_ps(t);
        }
        __m256 e = exp_avx2(_mm256_sub_ps(v, mv));
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

#endif
