/* simd_avx2.h - horizontal reductions of AVX2 registers, shared by the kernels that end a
 * vector loop with one value per row (matmul, qmatmul, attention). */
#ifndef TO_CPU_SIMD_AVX2_H
#define TO_CPU_SIMD_AVX2_H

#include "internal.h"

#include <immintrin.h>

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

#endif
