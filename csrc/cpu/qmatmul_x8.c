/* qmatmul_x8.c - the matmul micro-kernel for Q4_0 / Q4_1 / Q8_0 weights whose blocks are
 * interleaved by 8 rows (TO_Q4_0_X8, TO_Q4_1_X8, TO_Q8_0_X8), the conversion into and out of
 * that layout, and the lookup of one row (embedding tables).
 *
 * Why the layout. With plain blocks every weight row is a dot product of its own: each
 * 32-weight block costs unpacking, an f16 scale converted and broadcast, an integer dot summed
 * to one lane group, and its conversion to f32, about 10-11 vector instructions per block per
 * row. Decode on a small AVX2 machine was bound by those instructions, not by memory. With 8
 * rows interleaved, 32-bit lane r of a register belongs to weight row r: 4 bytes of x broadcast
 * to every lane times 4 quant bytes of each row (maddubs, pairs summed by madd), then one
 * conversion, one scale product and an FMA or two serve all 8 rows: about 4.5 (Q4) or 5.5
 * (Q8_0) instructions per block per row, and the 8 results come out in one register, with no
 * horizontal sum. (llama.cpp repacks Q4_0 for its CPU backend in the same spirit; this layout
 * and code are our own.)
 *
 * Arithmetic. x is quantized exactly as for the plain types (qmatmul.c: 32-blocks with d_x and
 * s_x = d_x * sum(q_x)), so a row's result equals the plain kernel's up to the order of f32
 * additions. Per block and row: isum = sum over 32 elements of nibble * q_x in integers, then
 * acc += (d_w d_x) isum (+ m_w s_x for Q4_1, + (-8 d_w) s_x for Q4_0). The 16-bit partial sums cannot
 * overflow: each Q4 maddubs lane is at most 2 * 15 * 127 = 3810 in size, and 8 of them are summed
 * (30480 < 32767) before madd widens them to 32 bits (Q8_0's, up to 2 * 128 * 127, are widened
 * one by one).
 */
#include "cpu/qmatmul.h"
#include "cpu/quant.h"

#include <immintrin.h>

/* Software prefetch distance in the weight stream when one or two rows of x use each block
 * (decode). Measured on the 2-core Zen VM in decode of SmolLM2 Q4_1, alternating rounds: none
 * 1.00, 512 bytes 1.06x, 1024 1.10x, 2048 1.11x (medians of 8; rounds vary +-20 %). */
#define PF_BYTES 1024

static inline int is_q41(int wt) { return wt == TO_Q4_1_X8; }
/* bytes of one group of 8 blocks; where its quants start; quant bytes per row and block */
static inline int group_bytes(int wt) {
    return wt == TO_Q8_0_X8 ? (int)sizeof(to_block_q8_0x8)
         : is_q41(wt)       ? (int)sizeof(to_block_q4_1x8)
                            : (int)sizeof(to_block_q4_0x8);
}
static inline int quants_at(int wt) { return is_q41(wt) ? 32 : 16; }
static inline int quant_bytes(int wt) { return wt == TO_Q8_0_X8 ? 32 : 16; }

static inline uint16_t rd16(const void *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline int32_t rd32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---- conversion: plain row-major blocks <-> groups of 8 rows ---- */

typedef struct {
    const char *src;
    char *dst;
    int64_t nb; /* blocks per row */
    int wt;     /* the X8 dtype */
    int to_x8;  /* 1: plain -> X8, 0: X8 -> plain */
} repack_job;

/* n bytes between a plain block and its group, in the direction of the conversion */
static inline void move(int to_x8, char *plain, char *grp, int n) {
    if (to_x8)
        memcpy(grp, plain, (size_t)n);
    else
        memcpy(plain, grp, (size_t)n);
}

/* Moves row r's block between its plain form at `plain` and its group at `grp`. */
static void move_block(int wt, int to_x8, char *plain, char *grp, int r) {
    const int head = is_q41(wt) ? 4 : 2; /* d (and m) before a plain block's quants */
    move(to_x8, plain, grp + 2 * r, 2);
    if (is_q41(wt))
        move(to_x8, plain + 2, grp + 16 + 2 * r, 2);
    for (int j = 0; j < quant_bytes(wt) / 4; j++)
        move(to_x8, plain + head + 4 * j, grp + quants_at(wt) + 32 * j + 4 * r, 4);
}

static void repack_groups(void *arg, int64_t begin, int64_t end) {
    const repack_job *job = arg;
    const int64_t bb = to_dtype_block_bytes(job->wt), gb = group_bytes(job->wt);
    char *plain = (char *)(job->to_x8 ? job->src : job->dst);
    char *x8 = job->to_x8 ? job->dst : (char *)job->src;
    for (int64_t g = begin; g < end; g++)
        for (int64_t b = 0; b < job->nb; b++)
            for (int r = 0; r < 8; r++)
                move_block(job->wt, job->to_x8, plain + ((8 * g + r) * job->nb + b) * bb,
                           x8 + (g * job->nb + b) * gb, r);
}

void to_x8_gather_row(int wtype, const char *w, int64_t row, int64_t nb, char *plain) {
    const int64_t bb = to_dtype_block_bytes(wtype), gb = group_bytes(wtype);
    const char *grp = w + row / 8 * nb * gb;
    for (int64_t b = 0; b < nb; b++)
        move_block(wtype, 0, plain + b * bb, (char *)grp + b * gb, (int)(row % 8));
}

int to_cpu_repack(const to_tensor *out, const to_tensor *x) {
    repack_job job = {x->data, out->data, x->shape[1] / TO_QK, 0, to_is_x8(out->dtype)};
    job.wt = job.to_x8 ? out->dtype : x->dtype;
    to_parallel_for(x->shape[0] / 8, 16, repack_groups, &job);
    return TO_OK;
}

/* ---- the micro-kernels: xr rows of x times one group of 8 weight rows, all nb blocks ---- */

static void tile_scalar(int wt, int xr, const char *w, const to_qx32 *x, int64_t nb, float res[TO_QX_ROWS][8]) {
    const int gb = group_bytes(wt), qb = quant_bytes(wt);
    for (int r = 0; r < 8; r++) {
        for (int i = 0; i < xr; i++) {
            float acc = 0.0f, off = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const char *g = w + b * gb, *qs = g + quants_at(wt);
                const int8_t *xq = x[b].q[i];
                int isum = 0;
                for (int k = 0; k < qb; k++) { /* byte k of row r */
                    int byte = qs[32 * (k / 4) + 4 * r + k % 4];
                    if (wt == TO_Q8_0_X8)
                        isum += (int8_t)byte * xq[k];
                    else
                        isum += (byte & 15) * xq[k] + ((byte >> 4) & 15) * xq[k + 16];
                }
                float dw = to_f16_to_f32(rd16(g + 2 * r));
                acc += dw * x[b].ds[i][0] * (float)isum;
                off += (is_q41(wt) ? to_f16_to_f32(rd16(g + 16 + 2 * r)) : dw) * x[b].ds[i][1];
            }
            res[i][r] = wt == TO_Q8_0_X8 ? acc : is_q41(wt) ? acc + off : acc - 8.0f * off;
        }
    }
}

/* s32[i] lane r += the integer dot of row r's quants in group g with row i of the x block xb.
 * Q4: 4 bytes of each row (8 nibbles) per 32-byte load; the 16-bit sums of all 32 elements fit
 * (see the top) and are widened once. Q8_0: signed weights, so maddubs takes |w| and x with w's
 * sign; two of its 16-bit sums could overflow, so each is widened at once. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
dots_avx2(int wt, int XR, const char *g, const to_qx32 *xb, __m256i s32[TO_QX_ROWS]) {
    const __m256i ones = _mm256_set1_epi16(1);
    const char *qs = g + quants_at(wt);
    if (wt == TO_Q8_0_X8) {
        for (int j = 0; j < 8; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
            __m256i av = _mm256_sign_epi8(v, v);
            for (int i = 0; i < XR; i++) {
                __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(rd32(xb->q[i] + 4 * j)), v);
                s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(_mm256_maddubs_epi16(av, xv), ones));
            }
        }
        return;
    }
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i s16[TO_QX_ROWS];
    for (int i = 0; i < XR; i++)
        s16[i] = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        /* lane r: bytes 4j .. 4j+3 of row r, whose low nibbles are elements 4j .. 4j+3 and high
         * nibbles elements 16 + 4j .. 16 + 4j + 3 */
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * j));
        __m256i lo = _mm256_and_si256(v, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int i = 0; i < XR; i++) {
            __m256i xl = _mm256_set1_epi32(rd32(xb->q[i] + 4 * j));
            __m256i xh = _mm256_set1_epi32(rd32(xb->q[i] + 16 + 4 * j));
            s16[i] = _mm256_add_epi16(s16[i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                                               _mm256_maddubs_epi16(hi, xh)));
        }
    }
    for (int i = 0; i < XR; i++)
        s32[i] = _mm256_madd_epi16(s16[i], ones);
}

/* Inlined with constant XR and weight type, so the loops unroll and the accumulators stay in
 * registers. The offsets (Q4_1's m, Q4_0's -8 d) go to accumulators of their own: one FMA
 * chain per block each instead of two in a row. */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
tile_avx2(int wt, int XR, const char *w, const to_qx32 *x, int64_t nb, float res[TO_QX_ROWS][8]) {
    const int gb = group_bytes(wt);
    __m256 acc[TO_QX_ROWS], off[TO_QX_ROWS];
    for (int i = 0; i < XR; i++)
        acc[i] = off[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const char *g = w + b * gb;
        const to_qx32 *xb = x + b;
        if (XR <= 2) /* decode: few rows of x per weight byte, so the stream needs help */
            for (int o = 0; o < gb; o += 64)
                _mm_prefetch(g + PF_BYTES + o, _MM_HINT_T0);
        __m256i s32[TO_QX_ROWS];
        for (int i = 0; i < XR; i++)
            s32[i] = _mm256_setzero_si256();
        dots_avx2(wt, XR, g, xb, s32);
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        for (int i = 0; i < XR; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_broadcast_ss(&xb->ds[i][0])),
                                     _mm256_cvtepi32_ps(s32[i]), acc[i]);
        if (wt != TO_Q8_0_X8) {
            __m256 m = is_q41(wt) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 16)))
                                  : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
            for (int i = 0; i < XR; i++)
                off[i] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(&xb->ds[i][1]), off[i]);
        }
    }
    for (int i = 0; i < XR; i++)
        _mm256_storeu_ps(res[i], _mm256_add_ps(acc[i], off[i]));
}

TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
tile_rows_avx2(int wt, int xr, const char *w, const to_qx32 *x, int64_t nb, float res[TO_QX_ROWS][8]) {
    switch (xr) {
    case 1: tile_avx2(wt, 1, w, x, nb, res); break;
    case 2: tile_avx2(wt, 2, w, x, nb, res); break;
    case 3: tile_avx2(wt, 3, w, x, nb, res); break;
    default: tile_avx2(wt, 4, w, x, nb, res); break;
    }
}

/* one specialised copy per (weight type, rows of x) */
TO_TARGET_AVX2 static void tile_type_avx2(int wt, int xr, const char *w, const to_qx32 *x, int64_t nb,
                                          float res[TO_QX_ROWS][8]) {
    switch (wt) {
    case TO_Q4_0_X8: tile_rows_avx2(TO_Q4_0_X8, xr, w, x, nb, res); break;
    case TO_Q4_1_X8: tile_rows_avx2(TO_Q4_1_X8, xr, w, x, nb, res); break;
    default: tile_rows_avx2(TO_Q8_0_X8, xr, w, x, nb, res); break;
    }
}

void to_qx8_tile(int wtype, int xr, const char *w, const to_qx32 *x, int64_t nb, int simd,
                 float res[TO_QX_ROWS][8]) {
    if (simd >= TO_SIMD_AVX2)
        tile_type_avx2(wtype, xr, w, x, nb, res);
    else
        tile_scalar(wtype, xr, w, x, nb, res);
}
