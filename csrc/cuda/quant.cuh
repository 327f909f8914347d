// quant.cuh - GGML block dequantization on the GPU, element by element, with exactly the f32
// arithmetic of csrc/cpu/quant.c (no fused multiply-adds: __fmul_rn / __fadd_rn), shared by the
// copy (dequantize) and embedding (quantized tables) kernels. (matmul.cu reads 4 values at a time
// its own way, for speed, with the same arithmetic.)
#pragma once

#include "cuda/common.cuh"

// f16 bits -> f32 exactly as csrc/core/dtype.c does (the intrinsic agrees on every value but NaN,
// whose bits the hardware makes canonical while the CPU keeps the payload)
__device__ __forceinline__ float f16_bits_to_f32(uint16_t h) {
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) // NaN: payload kept, made quiet
        return __uint_as_float(((uint32_t)(h & 0x8000u) << 16) | 0x7fc00000u | ((uint32_t)(h & 0x3ffu) << 13));
    return __half2float(__ushort_as_half(h));
}

// bytes of a little-endian f16 field (blocks are packed at 18-, 20-, 34-byte strides: read
// bytes rather than rely on alignment)
__device__ __forceinline__ float to_f16_at(const uint8_t *p) {
    return f16_bits_to_f32((uint16_t)(p[0] | (p[1] << 8)));
}

// The 6-bit scale and min of sub-block sb of a Q4_K block from its 12 packed bytes s (GGML's
// get_scale_min_k4).
__device__ __forceinline__ void to_q4k_scale_min(const uint8_t *s, int sb, int *sc, int *m) {
    if (sb < 4) {
        *sc = s[sb] & 63;
        *m = s[sb + 4] & 63;
    } else {
        *sc = (s[sb + 4] & 0xF) | ((s[sb - 4] >> 6) << 4);
        *m = (s[sb + 4] >> 4) | ((s[sb] >> 6) << 4);
    }
}

// Element j of the block at blk, as csrc/cpu/quant.c computes it (layouts in cpu/quant.h).
__device__ inline float to_dequant_element(int dtype, const uint8_t *blk, int j) {
    switch (dtype) {
    case TO_Q8_0: { // d, qs[32]: d * q
        return __fmul_rn(to_f16_at(blk), (float)(int8_t)blk[2 + j]);
    }
    case TO_Q4_0: { // d, qs[16]: element j < 16 the low nibble of qs[j], j >= 16 the high one of qs[j - 16]
        int q = j < 16 ? (blk[2 + j] & 0xF) : (blk[2 + j - 16] >> 4);
        return __fmul_rn(to_f16_at(blk), (float)(q - 8));
    }
    case TO_Q4_1: { // d, m, qs[16]: (d * q) + m
        int q = j < 16 ? (blk[4 + j] & 0xF) : (blk[4 + j - 16] >> 4);
        return __fadd_rn(__fmul_rn(to_f16_at(blk), (float)q), to_f16_at(blk + 2));
    }
    case TO_Q4_K: { // d, dmin, scales[12], qs[128]: (d * sc) * q - (dmin * m) per sub-block of 32
        const uint8_t *s = blk + 4, *qs = blk + 16;
        int sb = j / 32, l = j % 32, sc, m;
        to_q4k_scale_min(s, sb, &sc, &m);
        float d1 = __fmul_rn(to_f16_at(blk), (float)sc), m1 = __fmul_rn(to_f16_at(blk + 2), (float)m);
        int q = (qs[32 * (sb / 2) + l] >> (sb & 1 ? 4 : 0)) & 0xF;
        return __fsub_rn(__fmul_rn(d1, (float)q), m1);
    }
    case TO_Q6_K: { // ql[128], qh[64], scales[16] (i8), d: (d * sc) * (q - 32)
        const uint8_t *ql = blk, *qh = blk + 128;
        int h = j >> 7, k = (j >> 5) & 3, l = j & 31;
        int lo = (ql[64 * h + 32 * (k & 1) + l] >> (k & 2 ? 4 : 0)) & 0xF;
        int hi = (qh[32 * h + l] >> (2 * k)) & 3;
        float sc = (float)(int8_t)blk[192 + j / 16];
        return __fmul_rn(__fmul_rn(to_f16_at(blk + 208), sc), (float)((lo | (hi << 4)) - 32));
    }
    }
    return 0.0f;
}
