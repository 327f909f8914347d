/* dtype.c - dtype facts and conversions between a buffer of any dtype and f32 rows. */
#include "internal.h"

#include <math.h>
#include <immintrin.h>

/* elements and bytes per block; a plain dtype is a block of one element */
static const int block_sizes[TO_DTYPE_COUNT] = {1, 1, 1, 1, 1, 1, 1, 32, 32, 32, 256, 256, 32, 32, 32};
static const int block_bytes[TO_DTYPE_COUNT] = {4, 2, 2, 1, 4, 8, 1, 34, 18, 20, 144, 210, 18, 20, 34};
static const char *const dtype_names[TO_DTYPE_COUNT] = {
    "float32", "float16", "bfloat16", "int8", "int32", "int64", "uint8",
    "q8_0",    "q4_0",    "q4_1",     "q4_k", "q6_k", "q4_0x8", "q4_1x8", "q8_0x8"};

int to_dtype_block_size(int dtype) { return dtype >= 0 && dtype < TO_DTYPE_COUNT ? block_sizes[dtype] : 0; }

int to_dtype_block_bytes(int dtype) { return dtype >= 0 && dtype < TO_DTYPE_COUNT ? block_bytes[dtype] : 0; }

int to_dtype_size(int dtype) { return to_dtype_block_size(dtype) == 1 ? block_bytes[dtype] : 0; }

const char *to_dtype_name(int dtype) {
    return dtype >= 0 && dtype < TO_DTYPE_COUNT ? dtype_names[dtype] : "unknown";
}

/* IEEE half <-> single, exact for every value (subnormals, inf, NaN), round to nearest even.
 * The F16C instructions used by the AVX2 paths give the same bits. */
float to_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0); /* inf / quiet NaN */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    union { uint32_t u; float f; } v = {bits};
    return v.f;
}

uint16_t to_f32_to_f16(float f) {
    union { float f; uint32_t u; } v = {f};
    uint32_t sign = (v.u >> 16) & 0x8000u, a = v.u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (a < 0x33000000u) /* below half the smallest subnormal: zero */
            return (uint16_t)sign;
        uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14 .. 24 */
        uint32_t half = m >> shift, rem = m & ((1u << shift) - 1u), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1u)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t r = a - 0x38000000u; /* rebias exponent 127 -> 15 */
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

static float load_one(const void *p, int dtype, int64_t i) {
    switch (dtype) {
    case TO_F32: return ((const float *)p)[i];
    case TO_F16: return to_f16_to_f32(((const uint16_t *)p)[i]);
    case TO_BF16: return to_bf16_to_f32(((const uint16_t *)p)[i]);
    case TO_I8: return (float)((const int8_t *)p)[i];
    case TO_I32: return (float)((const int32_t *)p)[i];
    case TO_I64: return (float)((const int64_t *)p)[i];
    case TO_U8: return (float)((const uint8_t *)p)[i];
    }
    return 0.0f;
}

/* float -> integer truncates toward zero (as C casts and torch do) and saturates at the range;
 * NaN gives 0. Shared with the int64 fill, hence double. */
int64_t to_double_to_i64(double x) {
    if (x != x)
        return 0;
    double r = trunc(x);
    if (r >= 9223372036854775808.0) /* 2^63: the first double above INT64_MAX */
        return INT64_MAX;
    if (r < -9223372036854775808.0)
        return INT64_MIN;
    return (int64_t)r;
}

static int64_t trunc_clamp(float x, int64_t lo, int64_t hi) {
    int64_t v = to_double_to_i64(x);
    return v < lo ? lo : v > hi ? hi : v;
}

static void store_one(void *p, int dtype, int64_t i, float x) {
    switch (dtype) {
    case TO_F32: ((float *)p)[i] = x; break;
    case TO_F16: ((uint16_t *)p)[i] = to_f32_to_f16(x); break;
    case TO_BF16: ((uint16_t *)p)[i] = to_f32_to_bf16(x); break;
    case TO_I8: ((int8_t *)p)[i] = (int8_t)trunc_clamp(x, -128, 127); break;
    case TO_I32: ((int32_t *)p)[i] = (int32_t)trunc_clamp(x, INT32_MIN, INT32_MAX); break;
    case TO_I64: ((int64_t *)p)[i] = to_double_to_i64(x); break;
    case TO_U8: ((uint8_t *)p)[i] = (uint8_t)trunc_clamp(x, 0, 255); break;
    }
}

TO_TARGET_AVX2 static int64_t load_contig_avx2(float *dst, const void *src, int dtype, int64_t n) {
    int64_t i = 0;
    if (dtype == TO_BF16) {
        for (; i + 8 <= n; i += 8) {
            __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
        }
    } else if (dtype == TO_F16) {
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + i))));
    }
    return i;
}

void to_load_f32(float *dst, const void *src, int dtype, int64_t n, int64_t stride) {
    int64_t i = 0;
    if (stride == 1) {
        if (dtype == TO_F32) {
            memcpy(dst, src, (size_t)n * sizeof(float));
            return;
        }
        if (to_simd() >= TO_SIMD_AVX2)
            i = load_contig_avx2(dst, src, dtype, n);
    }
    for (; i < n; i++)
        dst[i] = load_one(src, dtype, i * stride);
}

TO_TARGET_AVX2 static int64_t store_contig_avx2(void *dst, int dtype, const float *src, int64_t n) {
    int64_t i = 0;
    if (dtype == TO_F16) {
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)((uint16_t *)dst + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    } else if (dtype == TO_BF16) {
        const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
        for (; i + 8 <= n; i += 8) {
            __m256 x = _mm256_loadu_ps(src + i);
            __m256i u = _mm256_castps_si256(x);
            __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
            /* NaN lanes keep their top bits, made quiet, as the scalar path does */
            __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            __m256i qnan = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
            r = _mm256_srli_epi32(_mm256_blendv_epi8(r, qnan, nan), 16);
            __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            _mm_storeu_si128((__m128i *)((uint16_t *)dst + i), packed);
        }
    }
    return i;
}

void to_store_f32(void *dst, int dtype, const float *src, int64_t n, int64_t stride) {
    int64_t i = 0;
    if (stride == 1) {
        if (dtype == TO_F32) {
            if (dst != src)
                memmove(dst, src, (size_t)n * sizeof(float));
            return;
        }
        if (to_simd() >= TO_SIMD_AVX2)
            i = store_contig_avx2(dst, dtype, src, n);
    }
    for (; i < n; i++)
        store_one(dst, dtype, i * stride, src[i]);
}
