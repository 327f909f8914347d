/* qmatmul.h - the CPU kernels behind to_matmul when the weights are block-quantized. */
#ifndef TO_CPU_QMATMUL_H
#define TO_CPU_QMATMUL_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* out[M, N] = x[M, K] . w[N, K]^T (+ bias[N]) with w in Q8_0, Q4_0, Q4_1, Q4_K or Q6_K, read
 * in place. Arguments arrive validated by csrc/ops/matmul.c: CPU tensors; x, out, bias float
 * (f32/f16/bf16), x any strides; w rank 2 with K a whole number of blocks and rows a whole number
 * of blocks apart; out with unit stride in its last dimension and rows that do not overlap.
 * Each row of x is quantized to 8 bits per call (see qmatmul.c for what that costs). */
int to_cpu_qmatmul(const to_tensor *out, const to_tensor *x, const to_tensor *w, const to_tensor *bias);

/* ---- shared by qmatmul.c and qmatmul_x8.c ---- */
#define TO_QX_ROWS 4 /* rows of x per panel (and per micro-kernel) */

/* x quantized for 32-element weight blocks: TO_QX_ROWS rows interleaved, 160 bytes */
typedef struct {
    float ds[TO_QX_ROWS][2]; /* per row: d, and s = d * sum(q) (side by side: one f16 pair of a
                              * Q4_1 block, (d_w, m_w), times (d_x, s_x) gives both products) */
    int8_t q[TO_QX_ROWS][32];
} to_qx32;

/* res[i][r] = row i < xr of the panel x (nb blocks) times weight row r of the group of 8 rows
 * at w (an X8 type: nb groups of 8 blocks). */
void to_qx8_tile(int wtype, int xr, const char *w, const to_qx32 *x, int64_t nb, int simd,
                 float res[TO_QX_ROWS][8]);

/* Row `row` of the X8 tensor w (nb blocks per row) as plain blocks of its base type at `plain`. */
void to_x8_gather_row(int wtype, const char *w, int64_t row, int64_t nb, char *plain);

/* out = x converted between a Q4_0 / Q4_1 / Q8_0 tensor and its X8 form (either way): contiguous
 * 2-D CPU tensors of one shape with a multiple of 8 rows, validated by to_copy. */
int to_cpu_repack(const to_tensor *out, const to_tensor *x);

#pragma GCC visibility pop

#endif
