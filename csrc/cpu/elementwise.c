/* elementwise.c - CPU kernels for add, mul, scale, silu_mul and softmax.
 *
 * Every kernel walks rows (all dimensions but the last flattened; whole tensors at once when
 * every operand is contiguous), converts CHUNK elements at a time into f32 buffers on the stack
 * (to_load_f32 handles dtype and stride, stride 0 included), computes in f32, and converts back
 * into out (to_store_f32). A chunk is read completely before it is written, which is what makes
 * out == input (same view) safe. No heap memory, so no failure path after validation.
 *
 * exp: the scalar path uses libm's expf; the AVX2 path a Cody-Waite range reduction and the
 * Cephes degree-6 polynomial, within ~2 ulp (relative error < 3e-7) of the true value. Both
 * kernels that need it only take e^x of x <= 0 (softmax: x - max; silu: -|z|), so exp_avx2
 * (simd_avx2.h) is written for that domain and never overflows.
 */
#include "cpu/elementwise.h"
#include "cpu/simd_avx2.h"

#include <immintrin.h>
#include <math.h>

#define CHUNK 512                 /* elements per f32 stack buffer (2 KB) */
#define MIN_WORK_PER_THREAD 32768 /* elements: below this a thread costs more than it saves */

/* ===================================================================================== *
 * f32 compute loops: scalar and AVX2 twins. The AVX2 ones use no FMA where the scalar one has
 * separate roundings, so add, mul and scale give the same bits on both paths.
 * ===================================================================================== */

/* silu(z) = z / (1 + e^-z), written with e = e^-|z| <= 1 so no step overflows:
 * z >= 0: z / (1 + e);  z < 0: z e / (1 + e)   (multiply through by e^z).
 * Gives NaN for NaN and for z = -inf (-inf * 0), as z / (1 + e^-z) does in IEEE arithmetic. */
static inline float silu_scalar(float z) {
    float e = expf(-fabsf(z));
    float num = z >= 0.0f ? z : z * e;
    return num / (1.0f + e);
}

static void compute_scalar(int op, float *o, const float *a, const float *b, float scale, int64_t n) {
    switch (op) {
    case TO_EW_ADD:
        for (int64_t i = 0; i < n; i++)
            o[i] = a[i] + b[i];
        break;
    case TO_EW_MUL:
        for (int64_t i = 0; i < n; i++)
            o[i] = a[i] * b[i];
        break;
    case TO_EW_SCALE:
        for (int64_t i = 0; i < n; i++)
            o[i] = a[i] * scale;
        break;
    case TO_EW_SILU_MUL:
        for (int64_t i = 0; i < n; i++)
            o[i] = silu_scalar(a[i]) * b[i];
        break;
    }
}

TO_TARGET_AVX2 static inline __m256 silu_avx2(__m256 z) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    __m256 e = exp_avx2(_mm256_or_ps(z, sign)); /* e^-|z| */
    __m256 f = _mm256_blendv_ps(e, one, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ));
    return _mm256_div_ps(_mm256_mul_ps(z, f), _mm256_add_ps(one, e));
}

TO_TARGET_AVX2 static void compute_avx2(int op, float *o, const float *a, const float *b, float scale,
                                        int64_t n) {
    int64_t i = 0;
    switch (op) {
    case TO_EW_ADD:
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
        break;
    case TO_EW_MUL:
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
        break;
    case TO_EW_SCALE: {
        __m256 s = _mm256_set1_ps(scale);
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), s));
        break;
    }
    case TO_EW_SILU_MUL:
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(o + i, _mm256_mul_ps(silu_avx2(_mm256_loadu_ps(a + i)), _mm256_loadu_ps(b + i)));
        /* the tail goes through the same vector code, so every element sees the same exp */
        if (i < n) {
            float ta[8] = {0}, tb[8] = {0}, to[8];
            memcpy(ta, a + i, (size_t)(n - i) * sizeof(float));
            memcpy(tb, b + i, (size_t)(n - i) * sizeof(float));
            _mm256_storeu_ps(to, _mm256_mul_ps(silu_avx2(_mm256_loadu_ps(ta)), _mm256_loadu_ps(tb)));
            memcpy(o + i, to, (size_t)(n - i) * sizeof(float));
        }
        return;
    }
    compute_scalar(op, o + i, a + i, b ? b + i : NULL, scale, n - i);
}

/* ===================================================================================== *
 * add / mul / scale / silu_mul
 * ===================================================================================== */

typedef struct {
    const to_tensor *out, *a, *b; /* b is NULL for scale */
    int op;
    float scale;
    int avx2;
} ew_job;

/* n elements: out[i * so] = op(a[i * sa], b[i * sb]), pointers at element 0 of the span */
static void ew_span(const ew_job *job, char *o, int64_t so, const char *a, int64_t sa, const char *b,
                    int64_t sb, int64_t n) {
    float fa[CHUNK], fb[CHUNK], fo[CHUNK];
    int odt = job->out->dtype, adt = job->a->dtype, bdt = job->b ? job->b->dtype : TO_F32;
    int osz = to_dtype_size(odt), asz = to_dtype_size(adt), bsz = to_dtype_size(bdt);
    for (int64_t i = 0; i < n; i += CHUNK) {
        int64_t m = n - i < CHUNK ? n - i : CHUNK;
        to_load_f32(fa, a + i * sa * asz, adt, m, sa);
        if (b)
            to_load_f32(fb, b + i * sb * bsz, bdt, m, sb);
        if (job->avx2)
            compute_avx2(job->op, fo, fa, b ? fb : NULL, job->scale, m);
        else
            compute_scalar(job->op, fo, fa, b ? fb : NULL, job->scale, m);
        to_store_f32(o + i * so * osz, odt, fo, m, so);
    }
}

/* every operand contiguous: [begin, end) is a range of elements */
static void ew_flat(void *arg, int64_t begin, int64_t end) {
    const ew_job *job = arg;
    const to_tensor *out = job->out, *a = job->a, *b = job->b;
    ew_span(job, to_elem_ptr(out->data, out->dtype, begin), 1, to_elem_ptr(a->data, a->dtype, begin), 1,
            b ? to_elem_ptr(b->data, b->dtype, begin) : NULL, 1, end - begin);
}

/* strided: [begin, end) is a range of rows */
static void ew_rows(void *arg, int64_t begin, int64_t end) {
    const ew_job *job = arg;
    const to_tensor *out = job->out, *a = job->a, *b = job->b;
    for (int64_t r = begin; r < end; r++)
        ew_span(job, to_elem_ptr(out->data, out->dtype, to_row_offset(out, r)), to_row_stride_last(out),
                to_elem_ptr(a->data, a->dtype, to_row_offset(a, r)), to_row_stride_last(a),
                b ? to_elem_ptr(b->data, b->dtype, to_row_offset(b, r)) : NULL, b ? to_row_stride_last(b) : 0,
                to_row_len(out));
}

int to_cpu_elementwise(const to_tensor *out, const to_tensor *a, const to_tensor *b, int op, float scale) {
    int64_t numel = to_numel(out);
    if (numel == 0)
        return TO_OK;
    ew_job job = {out, a, b, op, scale, to_simd() >= TO_SIMD_AVX2};
    if (to_is_contiguous(out) && to_is_contiguous(a) && (!b || to_is_contiguous(b))) {
        to_parallel_for(numel, MIN_WORK_PER_THREAD, ew_flat, &job);
    } else {
        int64_t len = to_row_len(out);
        to_parallel_for(to_num_rows(out), MIN_WORK_PER_THREAD / (len > 0 ? len : 1) + 1, ew_rows, &job);
    }
    return TO_OK;
}

/* ===================================================================================== *
 * softmax: three passes over each row, CHUNK elements at a time (the row may be a whole
 * vocabulary, far bigger than any stack buffer): the maximum m; the sum of e^(x - m) in double
 * (a long f32 sum would lose ~1e-5 relative); then e^(x - m) again, times 1 / sum, into out.
 * Recomputing the exponentials is cheaper than a heap buffer the size of the row and keeps out
 * == x safe. Both passes compute e^(x - m) identically, so the outputs sum to 1 (to rounding).
 * ===================================================================================== */

static float max_scalar(const float *x, int64_t n, float m) {
    for (int64_t i = 0; i < n; i++)
        if (x[i] > m) /* NaN never compares greater: skipped here, it poisons the sum later */
            m = x[i];
    return m;
}

/* sum of e^(x[i] - m), in double */
static double exp_sum_scalar(const float *x, int64_t n, float m) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++)
        s += expf(x[i] - m);
    return s;
}

/* x[i] = e^(x[i] - m) * inv */
static void exp_scale_scalar(float *x, int64_t n, float m, float inv) {
    for (int64_t i = 0; i < n; i++)
        x[i] = expf(x[i] - m) * inv;
}

TO_TARGET_AVX2 static float max_avx2(const float *x, int64_t n, float m) {
    int64_t i = 0;
    if (n >= 8) {
        __m256 acc = _mm256_set1_ps(m);
        for (; i + 8 <= n; i += 8)
            acc = _mm256_max_ps(_mm256_loadu_ps(x + i), acc); /* a NaN in x yields acc: skipped */
        float lanes[8];
        _mm256_storeu_ps(lanes, acc);
        m = max_scalar(lanes, 8, m);
    }
    return max_scalar(x + i, n - i, m);
}

TO_TARGET_AVX2 static void exp_scale_avx2(float *x, int64_t n, float m, float inv) {
    __m256 mv = _mm256_set1_ps(m), iv = _mm256_set1_ps(inv);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_mul_ps(exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv)), iv));
    if (i < n) {
        float t[8] = {0};
        memcpy(t, x + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(t, _mm256_mul_ps(exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(t), mv)), iv));
        memcpy(x + i, t, (size_t)(n - i) * sizeof(float));
    }
}

typedef struct {
    const to_tensor *out, *x;
    int avx2;
} softmax_job;

static void softmax_rows(void *arg, int64_t begin, int64_t end) {
    const softmax_job *job = arg;
    const to_tensor *out = job->out, *x = job->x;
    int64_t n = to_row_len(x), sx = to_row_stride_last(x), so = to_row_stride_last(out);
    int xsz = to_dtype_size(x->dtype), osz = to_dtype_size(out->dtype);
    float buf[CHUNK];
    for (int64_t r = begin; r < end; r++) {
        const char *xr = to_elem_ptr(x->data, x->dtype, to_row_offset(x, r));
        char *orow = to_elem_ptr(out->data, out->dtype, to_row_offset(out, r));
        float m = -INFINITY;
        for (int64_t i = 0; i < n; i += CHUNK) {
            int64_t c = n - i < CHUNK ? n - i : CHUNK;
            to_load_f32(buf, xr + i * sx * xsz, x->dtype, c, sx);
            m = job->avx2 ? max_avx2(buf, c, m) : max_scalar(buf, c, m);
        }
        if (m == -INFINITY) {
            /* every entry -inf (or NaN): e^(x - m) is e^NaN, so the whole row is NaN, as in torch */
            for (int64_t i = 0; i < CHUNK; i++)
                buf[i] = NAN;
            for (int64_t i = 0; i < n; i += CHUNK)
                to_store_f32(orow + i * so * osz, out->dtype, buf, n - i < CHUNK ? n - i : CHUNK, so);
            continue;
        }
        double sum = 0.0;
        for (int64_t i = 0; i < n; i += CHUNK) {
            int64_t c = n - i < CHUNK ? n - i : CHUNK;
            to_load_f32(buf, xr + i * sx * xsz, x->dtype, c, sx);
            sum += job->avx2 ? exp_sum_avx2(buf, c, m) : exp_sum_scalar(buf, c, m);
        }
        /* sum >= 1 (the maximum contributes e^0) unless NaN/inf crept in, which then spreads */
        float inv = (float)(1.0 / sum);
        for (int64_t i = 0; i < n; i += CHUNK) {
            int64_t c = n - i < CHUNK ? n - i : CHUNK;
            to_load_f32(buf, xr + i * sx * xsz, x->dtype, c, sx);
            if (job->avx2)
                exp_scale_avx2(buf, c, m, inv);
            else
                exp_scale_scalar(buf, c, m, inv);
            to_store_f32(orow + i * so * osz, out->dtype, buf, c, so);
        }
    }
}

int to_cpu_softmax(const to_tensor *out, const to_tensor *x) {
    if (to_numel(out) == 0)
        return TO_OK;
    softmax_job job = {out, x, to_simd() >= TO_SIMD_AVX2};
    int64_t len = to_row_len(x);
    /* ~10 operations per element (three loads, two exps): a smaller work unit than plain adds */
    to_parallel_for(to_num_rows(x), MIN_WORK_PER_THREAD / 4 / (len > 0 ? len : 1) + 1, softmax_rows, &job);
    return TO_OK;
}
