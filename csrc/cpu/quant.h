/* quant.h - GGML-compatible weight blocks (byte-for-byte the layouts GGUF files store) and the
 * row conversions between them and f32. Every quantized dtype is a run of these blocks along a
 * row; see TO_Q8_0 .. TO_Q6_K in tensor_ops.h. */
#ifndef TO_CPU_QUANT_H
#define TO_CPU_QUANT_H

#include "internal.h"

#pragma GCC visibility push(hidden)

#define TO_QK 32   /* elements per block of Q8_0, Q4_0, Q4_1 */
#define TO_QK_K 256 /* elements per super-block of the k-quants */

typedef struct {
    uint16_t d;      /* f16 scale */
    int8_t qs[TO_QK];
} to_block_q8_0;

/* element j < 16 is the low nibble of qs[j], element j + 16 its high nibble */
typedef struct {
    uint16_t d;      /* f16: x = d * (q - 8) */
    uint8_t qs[TO_QK / 2];
} to_block_q4_0;

typedef struct {
    uint16_t d, m;   /* f16: x = d * q + m */
    uint8_t qs[TO_QK / 2];
} to_block_q4_1;

/* 8 sub-blocks of 32; sub-block j has a 6-bit scale and a 6-bit min packed in `scales`
 * (GGML's get_scale_min_k4 layout); x = d * sc_j * q - dmin * m_j. Nibbles: each 64-element
 * pair of sub-blocks (2i, 2i+1) takes 32 bytes of qs, low nibbles for 2i, high for 2i+1. */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[TO_QK_K / 2];
} to_block_q4_k;

/* 16 sub-blocks of 16 with an i8 scale each; 6-bit quants q in [0, 64), x = d * sc * (q - 32):
 * low 4 bits in ql, high 2 bits in qh (GGML's dequantize_row_q6_K order). */
typedef struct {
    uint8_t ql[TO_QK_K / 2];
    uint8_t qh[TO_QK_K / 4];
    int8_t scales[TO_QK_K / 16];
    uint16_t d;
} to_block_q6_k;

/* Q4_0_X8 / Q4_1_X8 / Q8_0_X8: block b of rows 8g .. 8g+7 as one group (see TO_Q4_0_X8).
 * qs[32 j + 4 r + t] is byte 4 j + t of row r's quants, so a 32-byte load at 32 j holds 4 bytes
 * of each row. */
typedef struct {
    uint16_t d[8];
    uint8_t qs[8 * TO_QK / 2];
} to_block_q4_0x8;

typedef struct {
    uint16_t d[8], m[8];
    uint8_t qs[8 * TO_QK / 2];
} to_block_q4_1x8;

typedef struct {
    uint16_t d[8];
    int8_t qs[8 * TO_QK];
} to_block_q8_0x8;

_Static_assert(sizeof(to_block_q8_0) == 34, "q8_0 block");
_Static_assert(sizeof(to_block_q4_0) == 18, "q4_0 block");
_Static_assert(sizeof(to_block_q4_1) == 20, "q4_1 block");
_Static_assert(sizeof(to_block_q4_k) == 144, "q4_k block");
_Static_assert(sizeof(to_block_q6_k) == 210, "q6_k block");
_Static_assert(sizeof(to_block_q4_0x8) == 8 * 18, "q4_0x8 group");
_Static_assert(sizeof(to_block_q4_1x8) == 8 * 20, "q4_1x8 group");
_Static_assert(sizeof(to_block_q8_0x8) == 8 * 34, "q8_0x8 group");

/* dst[0..n) = the n elements (a whole number of blocks) that start at block `src` */
void to_dequantize_row(int dtype, const void *src, float *dst, int64_t n);
/* n floats (a whole number of blocks) into blocks of `dtype` at dst */
void to_quantize_row(int dtype, const float *src, void *dst, int64_t n);
/* dst[i * so] = src[i * sx] for i < n, converted through f32: any two dtypes but integer <->
 * quantized (integers go through f32, so only exactly where f32 holds them). A quantized side
 * has stride 1 and n is a whole number of its blocks; a quantized dst is quantized anew. */
void to_convert_span(void *dst, int dto, int64_t so, const void *src, int dtx, int64_t sx, int64_t n);

#pragma GCC visibility pop

#endif
