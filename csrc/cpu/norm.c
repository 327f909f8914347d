/* norm.c - RMS normalisation (and the fused residual add before it) over the last dimension.
 *
 * Two passes over each row, CHUNK elements at a time through f32 stack buffers:
 *   1. (fused form: residual += x, stored in residual's dtype and read back, so the norm sees the
 *      rounded stored value) the sum of squares, in double: f32 squares are exact in double and
 *      a long f32 sum would lose up to ~d * 6e-8 relative;
 *   2. y = (v * rinv) * w in f32, rinv = (float)(1 / sqrt(sum / d + eps)), rounded once into out.
 * The second pass reads the row again (from L1/L2 for usual widths) instead of keeping it in a
 * heap buffer, so there is no allocation and out == x works: each chunk is read before written.
 */
#include "cpu/norm.h"

#include <immintrin.h>
#include <math.h>

#define CHUNK 512
#define MIN_WORK_PER_THREAD 16384 /* elements per thread, so small norms stay on one thread */

static double sumsq_scalar(const float *v, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += (double)v[i] * v[i];
    return s;
}

TO_TARGET_AVX2 static double sumsq_avx2(const float *v, int64_t n) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(v + i);
        __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
        s0 = _mm256_fmadd_pd(lo, lo, s0); /* the square is exact in double, so FMA changes nothing */
        s1 = _mm256_fmadd_pd(hi, hi, s1);
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]) + sumsq_scalar(v + i, n - i);
}

double to_cpu_sumsq(const float *v, int64_t n, int avx2) {
    return avx2 ? sumsq_avx2(v, n) : sumsq_scalar(v, n);
}

/* o = (v * rinv) * w: two f32 roundings, in this order on both paths (HF multiplies x by the
 * rsqrt first, then by the weight) */
static void scale_scalar(float *o, const float *v, const float *w, float rinv, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        o[i] = (v[i] * rinv) * w[i];
}

TO_TARGET_AVX2 static void scale_avx2(float *o, const float *v, const float *w, float rinv, int64_t n) {
    __m256 r = _mm256_set1_ps(rinv);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i), r), _mm256_loadu_ps(w + i)));
    scale_scalar(o + i, v + i, w + i, rinv, n - i);
}

typedef struct {
    const to_tensor *out, *residual, *x, *weight;
    double eps;
    int avx2;
} norm_job;

static void norm_rows(void *arg, int64_t begin, int64_t end) {
    const norm_job *job = arg;
    const to_tensor *out = job->out, *res = job->residual, *x = job->x, *w = job->weight;
    const int64_t d = to_row_len(x), sx = to_row_stride_last(x), so = to_row_stride_last(out);
    const int64_t sw = w->strides[0], sr = res ? to_row_stride_last(res) : 0;
    const int xsz = to_dtype_size(x->dtype), osz = to_dtype_size(out->dtype), wsz = to_dtype_size(w->dtype);
    const int rsz = res ? to_dtype_size(res->dtype) : 0;
    float fv[CHUNK], fx[CHUNK], fw[CHUNK];
    for (int64_t r = begin; r < end; r++) {
        const char *xr = to_elem_ptr(x->data, x->dtype, to_row_offset(x, r));
        char *rr = res ? to_elem_ptr(res->data, res->dtype, to_row_offset(res, r)) : NULL;
        char *orow = to_elem_ptr(out->data, out->dtype, to_row_offset(out, r));
        /* the row the norm reads: the updated residual, or x */
        const char *vr = res ? rr : xr;
        const int vdt = res ? res->dtype : x->dtype;
        const int64_t sv = res ? sr : sx, vsz = res ? rsz : xsz;

        double ss = 0.0;
        for (int64_t i = 0; i < d; i += CHUNK) {
            int64_t c = d - i < CHUNK ? d - i : CHUNK;
            if (res) {
                to_load_f32(fv, rr + i * sr * rsz, res->dtype, c, sr);
                to_load_f32(fx, xr + i * sx * xsz, x->dtype, c, sx);
                for (int64_t j = 0; j < c; j++)
                    fv[j] += fx[j];
                to_store_f32(rr + i * sr * rsz, res->dtype, fv, c, sr);
                if (res->dtype != TO_F32) /* read back what was stored: the rounded value */
                    to_load_f32(fv, rr + i * sr * rsz, res->dtype, c, sr);
            } else {
                to_load_f32(fv, xr + i * sx * xsz, x->dtype, c, sx);
            }
            ss += to_cpu_sumsq(fv, c, job->avx2);
        }
        float rinv = (float)(1.0 / sqrt(ss / (double)d + job->eps));

        for (int64_t i = 0; i < d; i += CHUNK) {
            int64_t c = d - i < CHUNK ? d - i : CHUNK;
            to_load_f32(fv, vr + i * sv * vsz, vdt, c, sv);
            to_load_f32(fw, (const char *)w->data + i * sw * wsz, w->dtype, c, sw);
            if (job->avx2)
                scale_avx2(fv, fv, fw, rinv, c);
            else
                scale_scalar(fv, fv, fw, rinv, c);
            to_store_f32(orow + i * so * osz, out->dtype, fv, c, so);
        }
    }
}

int to_cpu_rms_norm(const to_tensor *out, const to_tensor *residual, const to_tensor *x,
                    const to_tensor *weight, double eps) {
    if (to_numel(x) == 0)
        return TO_OK;
    norm_job job = {out, residual, x, weight, eps, to_simd() >= TO_SIMD_AVX2};
    int64_t d = to_row_len(x);
    to_parallel_for(to_num_rows(x), MIN_WORK_PER_THREAD / d + 1, norm_rows, &job);
    return TO_OK;
}
