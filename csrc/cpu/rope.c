/* rope.c - rotary position embedding of x [T, H, D], in the rotate-half (NeoX) and the
 * interleaved (GLM) forms, optionally after a per-head RMSNorm (to_rms_norm_rope); see the
 * models reference section 1.4.
 *
 * Work is split by tokens: a token's cos/sin (R/2 pairs of them) are computed once and used for
 * all its H heads. Per the HF formula:
 *   angle_i = float(pos) * inv_freq[i]                 f32 product
 *   c_i = float(cos(angle_i)) * float(scaling)         cos/sin in double, rounded to f32, then
 *   s_i = float(sin(angle_i)) * float(scaling)         scaled in f32 (torch's f32 tensor * float)
 * rotate-half:  out[i] = x[i] c_i - x[i + R/2] s_i,   out[i + R/2] = x[i + R/2] c_i + x[i] s_i
 * interleaved:  out[i] = x[2i] c_i - x[2i+1] s_i,     out[i + R/2] = x[2i+1] c_i + x[2i] s_i
 * each product and sum rounded in f32 (no FMA, so both SIMD paths give the same bits, which are
 * HF's f32 bits when its cos/sin match). Double cos/sin make the tables accurate for any
 * position (torch's f32 cos of an angle of 1e5 radians is accurate too, so parity holds).
 *
 * Each head's rotated slice is loaded whole into an f32 buffer before anything is written,
 * which out == x (in place) needs in the interleaved form (out[i + R/2] is input of pair
 * (i + R/2) / 2). Dims >= R are converted from x to out's dtype unless out is x itself.
 *
 * The fused norm loads the whole head into that buffer and normalises it there with
 * to_rms_norm's arithmetic (csrc/cpu/norm.c): the sum of squares in double, in the same order
 * (per CHUNK, the same SIMD lanes), rinv = float(1 / sqrt(ss / D + eps)), y = (v * rinv) * w.
 * The rotation then reads y, and dims >= R are y's, so the result is rms_norm into f32 then rope
 * bit for bit, on either SIMD path.
 */
#include "cpu/rope.h"
#include "cpu/norm.h"

#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>

#define CHUNK 512 /* also the norm's summation chunk: must equal csrc/cpu/norm.c's CHUNK */
#define MIN_WORK_PER_THREAD 16384 /* elements per thread */

typedef struct {
    const to_tensor *out, *x, *positions, *inv_freq;
    const to_tensor *weight; /* NULL: rope only; else each head is RMS-normalised first */
    double eps;
    int64_t R;
    int interleaved, in_place, avx2;
    float scaling;
    atomic_int failed; /* a thread could not get its scratch memory */
} rope_job;

/* o[0 .. R) from v[0 .. R) and the tables c, s [R/2] */
static void rotate_scalar(float *o, const float *v, const float *c, const float *s, int64_t half,
                          int interleaved, int64_t i) {
    for (; i < half; i++) {
        float a = interleaved ? v[2 * i] : v[i], b = interleaved ? v[2 * i + 1] : v[i + half];
        o[i] = a * c[i] - b * s[i];
        o[i + half] = b * c[i] + a * s[i];
    }
}

TO_TARGET_AVX2 static void rotate_avx2(float *o, const float *v, const float *c, const float *s, int64_t half,
                                       int interleaved) {
    int64_t i = 0;
    for (; i + 8 <= half; i += 8) {
        __m256 a, b;
        if (interleaved) {
            /* v[2i .. 2i+16) -> a = the 8 even members, b = the 8 odd ones. shuffle_ps works per
             * 128-bit lane ([v0 v2 v8 v10 | v4 v6 v12 v14]); the 64-bit permute restores order. */
            __m256 lo = _mm256_loadu_ps(v + 2 * i), hi = _mm256_loadu_ps(v + 2 * i + 8);
            a = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xd8));
            b = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xdd)), 0xd8));
        } else {
            a = _mm256_loadu_ps(v + i);
            b = _mm256_loadu_ps(v + i + half);
        }
        __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
        _mm256_storeu_ps(o + i, _mm256_sub_ps(_mm256_mul_ps(a, cv), _mm256_mul_ps(b, sv)));
        _mm256_storeu_ps(o + i + half, _mm256_add_ps(_mm256_mul_ps(b, cv), _mm256_mul_ps(a, sv)));
    }
    rotate_scalar(o, v, c, s, half, interleaved, i);
}

/* v = (v * rinv) * w: two f32 roundings per element, the same bits on both paths */
static void scale_scalar(float *v, const float *w, float rinv, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        v[i] = (v[i] * rinv) * w[i];
}

TO_TARGET_AVX2 static void scale_avx2(float *v, const float *w, float rinv, int64_t n) {
    __m256 r = _mm256_set1_ps(rinv);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i), r), _mm256_loadu_ps(w + i)));
    scale_scalar(v + i, w + i, rinv, n - i);
}

/* v[0 .. d) RMS-normalised in place by w [d], as to_rms_norm computes a row */
static void rms_normalize(float *v, const float *w, int64_t d, double eps, int avx2) {
    double ss = 0.0;
    for (int64_t i = 0; i < d; i += CHUNK) {
        int64_t c = d - i < CHUNK ? d - i : CHUNK;
        ss += to_cpu_sumsq(v + i, c, avx2);
    }
    float rinv = (float)(1.0 / sqrt(ss / (double)d + eps));
    if (avx2)
        scale_avx2(v, w, rinv, d);
    else
        scale_scalar(v, w, rinv, d);
}

static int64_t position_at(const to_tensor *p, int64_t t) {
    int64_t off = t * p->strides[0];
    return p->dtype == TO_I32 ? ((const int32_t *)p->data)[off] : ((const int64_t *)p->data)[off];
}

static void rope_tokens(void *arg, int64_t begin, int64_t end) {
    rope_job *job = arg;
    const to_tensor *out = job->out, *x = job->x, *w = job->weight;
    const int64_t H = x->shape[1], D = x->shape[2], R = job->R, half = R / 2;
    const int xsz = to_dtype_size(x->dtype), osz = to_dtype_size(out->dtype);
    const int64_t sx = x->strides[2], so = out->strides[2];
    /* what a head reads: its rotary slice, or (norm) the whole head, normalised in place */
    const int64_t vlen = w ? D : R;
    /* scratch: inv_freq, cos, sin [half each], the rotated slice [R], the head [vlen] and
     * (norm) the weight [D] */
    float *inv = to_scratch(0, (size_t)(3 * half + R + vlen + (w ? D : 0)) * sizeof(float));
    if (!inv) {
        atomic_store(&job->failed, 1);
        return;
    }
    float *cs = inv + half, *sn = cs + half, *vout = sn + half, *v = vout + R, *wf = v + vlen;
    to_load_f32(inv, job->inv_freq->data, TO_F32, half, job->inv_freq->strides[0]);
    const int per_head = w && w->ndim == 2; /* [H, D]: each head's own weight row */
    if (w && !per_head)
        to_load_f32(wf, w->data, w->dtype, D, w->strides[0]);

    for (int64_t t = begin; t < end; t++) {
        float pos = (float)position_at(job->positions, t);
        for (int64_t i = 0; i < half; i++) {
            float angle = pos * inv[i];
            cs[i] = (float)cos((double)angle) * job->scaling;
            sn[i] = (float)sin((double)angle) * job->scaling;
        }
        for (int64_t h = 0; h < H; h++) {
            const char *xr = to_elem_ptr(x->data, x->dtype, t * x->strides[0] + h * x->strides[1]);
            char *orow = to_elem_ptr(out->data, out->dtype, t * out->strides[0] + h * out->strides[1]);
            to_load_f32(v, xr, x->dtype, vlen, sx);
            if (per_head)
                to_load_f32(wf, to_elem_ptr(w->data, w->dtype, h * w->strides[0]), w->dtype, D, w->strides[1]);
            if (w)
                rms_normalize(v, wf, D, job->eps, job->avx2);
            if (job->avx2)
                rotate_avx2(vout, v, cs, sn, half, job->interleaved);
            else
                rotate_scalar(vout, v, cs, sn, half, job->interleaved, 0);
            to_store_f32(orow, out->dtype, vout, R, so);
            if (w) { /* dims >= R: the normalised values */
                to_store_f32(orow + R * so * osz, out->dtype, v + R, D - R, so);
                continue;
            }
            if (job->in_place)
                continue; /* dims >= R are already there */
            float buf[CHUNK];
            for (int64_t i = R; i < D; i += CHUNK) {
                int64_t c = D - i < CHUNK ? D - i : CHUNK;
                to_load_f32(buf, xr + i * sx * xsz, x->dtype, c, sx);
                to_store_f32(orow + i * so * osz, out->dtype, buf, c, so);
            }
        }
    }
}

/* both ops: weight NULL for the rope alone */
static int run_rope(const char *op, const to_tensor *out, const to_tensor *x, const to_tensor *weight,
                    double eps, const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                    int interleaved, double attention_scaling) {
    if (to_numel(x) == 0)
        return TO_OK;
    rope_job job = {.out = out, .x = x, .positions = positions, .inv_freq = inv_freq, .weight = weight,
                    .eps = eps, .R = rotary_dim, .interleaved = interleaved != 0,
                    /* out is x: the data of dims >= R is already in place */
                    .in_place = to_same_view(out, x),
                    .avx2 = to_simd() >= TO_SIMD_AVX2, .scaling = (float)attention_scaling};
    atomic_init(&job.failed, 0);
    int64_t per_token = x->shape[1] * x->shape[2];
    to_parallel_for(x->shape[0], MIN_WORK_PER_THREAD / per_token + 1, rope_tokens, &job);
    if (atomic_load(&job.failed))
        return to_fail(TO_ERR_OUT_OF_MEMORY, "%s: out of memory for the per-thread buffers "
                       "(head dim %lld)", op, (long long)x->shape[2]);
    return TO_OK;
}

int to_cpu_rope(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
                const to_tensor *inv_freq, int rotary_dim, int interleaved, double attention_scaling) {
    return run_rope("to_rope", out, x, NULL, 0.0, positions, inv_freq, rotary_dim, interleaved,
                    attention_scaling);
}

int to_cpu_rms_norm_rope(const to_tensor *out, const to_tensor *x, const to_tensor *weight, double eps,
                         const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                         int interleaved, double attention_scaling) {
    return run_rope("to_rms_norm_rope", out, x, weight, eps, positions, inv_freq, rotary_dim,
                    interleaved, attention_scaling);
}
