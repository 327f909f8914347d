/* qmatmul_x8.c - the matmul micro-kernel for Q4_0 / Q4_1 weights whose blocks are interleaved
 * by 8 rows (TO_Q4_0_X8, TO_Q4_1_X8), and the conversion into and out of that layout.
 *
 * Why the layout. With plain blocks every weight row is a dot product of its own: each
 * 32-weight block costs unpacking, an f16 scale converted and broadcast, an integer dot summed
 * to one lane group, and its conversion to f32, about 11 vector instructions per block per row.
 * Decode on a small AVX2 machine was bound by those instructions, not by memory. With 8 rows
 * interleaved, 32-bit lane r of a register belongs to weight row r: 4 bytes of x broadcast to
 * every lane times 4 nibble bytes of each row (maddubs, pairs summed by madd), then one
 * conversion, one scale product and two FMAs serve all 8 rows: about 4.5 instructions per block
 * per row, and the 8 results come out in one register, with no horizontal sum. (llama.cpp
 * repacks Q4_0 for its CPU backend in the same spirit; this layout and code are our own.)
 *
 * Arithmetic. x is quantized exactly as for the plain types (qmatmul.c: 32-blocks with d_x and
 * s_x = d_x * sum(q_x)), so a row's result equals the plain kernel's up to the order of f32
 * additions. Per block and row: isum = sum over 32 elements of nibble * q_x in integers, then
 * acc += (d_w d_x) isum + m_w s_x (Q4_1) or + (-8 d_w) s_x (Q4_0). The 16-bit partial sums cannot
 * overflow: each maddubs lane is at most 2 * 15 * 127 = 3810 in size, and 8 of them are summed
 * (30480 < 32767) before madd widens them to 32 bits.
 */
#include "cpu/qmatmul.h"
#include "cpu/quant.h"

#include <immintrin.h>

/* Software prefetch distance in the weight stream when one or two rows of x use each block
 * (decode). Measured on the 2-core Zen VM in decode of SmolLM2 Q4_1, alternating rounds: none
 * 1.00, 512 bytes 1.06x, 1024 1.10x, 2048 1.11x (medians of 8; rounds vary +-20 %). */
#define PF_BYTES 1024

static inline int is_q41(int wt) { return wt == TO_Q4_1_X8; }
/* bytes of one group of 8 blocks, and where its nibbles start */
static inline int group_bytes(int wt) { return is_q41(wt) ? (int)sizeof(to_block_q4_1x8) : (int)sizeof(to_block_q4_0x8); }
static inline int nibbles_at(int wt) { return is_q41(wt) ? 32 : 16; }

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
    const int head = is_q41(wt) ? 4 : 2; /* d (and m) before a plain block's nibbles */
    move(to_x8, plain, grp + 2 * r, 2);
    if (is_q41(wt))
        move(to_x8, plain + 2, grp + 16 + 2 * r, 2);
    for (int j = 0; j < 4; j++)
        move(to_x8, plain + head + 4 * j, grp + nibbles_at(wt) + 32 * j + 4 * r, 4);
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

int to_cpu_repack(const to_tensor *out, const to_tensor *x) {
    repack_job job = {x->data, out->data, x->shape[1] / TO_QK, 0, to_is_x8(out->dtype)};
    job.wt = job.to_x8 ? out->dtype : x->dtype;
    to_parallel_for(x->shape[0] / 8, 16, repack_groups, &job);
    return TO_OK;
}

/* ---- the micro-kernels: xr rows of x times one group of 8 weight rows, all nb blocks ---- */

static void tile_scalar(int wt, int xr, const char *w, const to_qx32 *x, int64_t nb, float res[TO_QX_ROWS][8]) {
    const int q41 = is_q41(wt), gb = group_bytes(wt);
    for (int r = 0; r < 8; r++) {
        for (int i = 0; i < xr; i++) {
            float acc = 0.0f, off = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const char *g = w + b * gb;
                const uint8_t *qs = (const uint8_t *)g + nibbles_at(wt);
                const int8_t *xq = x[b].q[i];
                int isum = 0;
                for (int k = 0; k < 16; k++) {
                    uint8_t byte = qs[32 * (k / 4) + 4 * r + k % 4];
                    isum += (byte & 15) * xq[k] + (byte >> 4) * xq[k + 16];
                }
                float dw = to_f16_to_f32(rd16(g + 2 * r));
                acc += dw * x[b].ds[i][0] * (float)isum;
                off += (q41 ? to_f16_to_f32(rd16(g + 16 + 2 * r)) : dw) * x[b].ds[i][1];
            }
            res[i][r] = q41 ? acc + off : acc - 8.0f * off;
        }
    }
}

/* Inlined with constant XR and weight type, so the loops unroll and the accumulators stay in
 * registers (XR = 4: 4 f32 and 4 i16 accumulators, the nibbles and a broadcast x). */
TO_TARGET_AVX2 static inline __attribute__((always_inline)) void
tile_avx2(int wt, int XR, const char *w, const to_qx32 *x, int64_t nb, float res[TO_QX_ROWS][8]) {
    const int gb = group_bytes(wt), qo = nibbles_at(wt);
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[TO_QX_ROWS], off[TO_QX_ROWS];
    for (int i = 0; i < XR; i++)
        acc[i] = off[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const char *g = w + b * gb;
        const to_qx32 *xb = x + b;
        if (XR <= 2) /* decode: few rows of x per weight byte, so the stream needs help */
            for (int o = 0; o < gb; o += 64)
                _mm_prefetch(g + PF_BYTES + o, _MM_HINT_T0);
        __m256i s16[TO_QX_ROWS];
        for (int i = 0; i < XR; i++)
            s16[i] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            /* lane r: bytes 4j .. 4j+3 of row r, whose low nibbles are elements 4j .. 4j+3 and
             * high nibbles elements 16 + 4j .. 16 + 4j + 3 */
            __m256i v = _mm256_loadu_si256((const __m256i *)(g + qo + 32 * j));
            __m256i lo = _mm256_and_si256(v, low4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            for (int i = 0; i < XR; i++) {
                __m256i xl = _mm256_set1_epi32(rd32(xb->q[i] + 4 * j));
                __m256i xh = _mm256_set1_epi32(rd32(xb->q[i] + 16 + 4 * j));
                s16[i] = _mm256_add_epi16(s16[i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl),
                                                                   _mm256_maddubs_epi16(hi, xh)));
            }
        }
        __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)g));
        __m256 m = is_q41(wt) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(g + 16)))
                              : _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
        for (int i = 0; i < XR; i++) {
            __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16[i], ones));
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_broadcast_ss(&xb->ds[i][0])), isum, acc[i]);
            off[i] = _mm256_fmadd_ps(m, _mm256_broadcast_ss(&xb->ds[i][1]), off[i]);
        }
    }
    for (int i = 0; i < XR; i++)
        _mm256_storeu_ps(res[i], _mm256_add_ps(acc[i], off[i]));
}

TO_TARGET_AVX2 static void tile_type_avx2(int wt, int xr, const char *w, const to_qx32 *x, int64_t nb,
                                          float res[TO_QX_ROWS][8]) {
    int q41 = is_q41(wt);
    switch (xr) {
    case 1: q41 ? tile_avx2(TO_Q4_1_X8, 1, w, x, nb, res) : tile_avx2(TO_Q4_0_X8, 1, w, x, nb, res); break;
    case 2: q41 ? tile_avx2(TO_Q4_1_X8, 2, w, x, nb, res) : tile_avx2(TO_Q4_0_X8, 2, w, x, nb, res); break;
    case 3: q41 ? tile_avx2(TO_Q4_1_X8, 3, w, x, nb, res) : tile_avx2(TO_Q4_0_X8, 3, w, x, nb, res); break;
    default: q41 ? tile_avx2(TO_Q4_1_X8, 4, w, x, nb, res) : tile_avx2(TO_Q4_0_X8, 4, w, x, nb, res); break;
    }
}

void to_qx8_tile(int wtype, int xr, const char *w, const to_qx32 *x, int64_t nb, int simd,
                 float res[TO_QX_ROWS][8]) {
    if (simd >= TO_SIMD_AVX2)
        tile_type_avx2(wtype, xr, w, x, nb, res);
    else
        tile_scalar(wtype, xr, w, x, nb, res);
}
