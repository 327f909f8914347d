// gemv_quant.cu - to_cuda_gemv_quant: the decode GEMV out[M, N] = x[M, K] . w[N, K]^T for M <= 8
// and block-quantized w (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), streamed at close to memory bandwidth.
//
// What a small GEMV costs is reading w once, so everything here serves keeping many weight bytes
// in flight with few instructions per weight:
//  - A warp owns QV_ROWS = 2 consecutive rows (every x value it reads serves both) and walks them
//    in steps of whole blocks. Each step's bytes are copied, 16 bytes per lane per copy with
//    consecutive lanes on consecutive addresses (coalesced whatever the block size), into the
//    warp's own ring of QV_STAGES shared-memory buffers with cp.async: the copies of the next
//    steps are in flight while the lanes decode the current one, and they cost no registers.
//    Only __syncwarp orders the ring; there is no block-wide barrier in the loop.
//  - Blocks straddle 16-byte boundaries (34, 18, 20, 144 and 210 bytes), so the copies take the
//    16-byte aligned span around the step's bytes (its extra bytes share a 16-byte chunk with
//    the row's, so they lie in the same allocation: to_cuda_alloc rounds sizes up to 512 bytes)
//    and the lanes read whole blocks (or, for the 256-element k-quants, an eighth of one) out of
//    shared memory at any even byte offset, so rows and steps need no alignment (Q4_K, whose
//    blocks are 9 x 16 bytes, reads 16-byte words when its rows are aligned, as they are at any
//    K; the others funnel-shift aligned words).
//  - Before waiting for the previous kernel (to_pdl_wait) each warp asks the L2 to prefetch its
//    rows and starts the copies of its first steps, and the block lets the next kernel launch
//    (to_pdl_trigger first), so DRAM latency overlaps the previous kernel's tail and this one's.
//  - x is f32 with unit stride and 16-byte aligned rows (the model's activations), read straight
//    from global memory (L1/L2 hits after the first warp), 4 values per load.
//  - When N alone gives too few warps to fill the GPU, 2 or 4 warps of a block share a row pair
//    (taking its steps in turn) and add their partial sums in shared memory at the end.
//
// Dequantization gives exactly the f32 values of csrc/cpu/quant.c (GGML's arithmetic), element
// for element, with fewer instructions than the literal formula: a quant byte q becomes the f32
// f = 1 + q 2^-15 with one byte permute (bits 0x3F80qq00, no int-to-float conversion, which
// runs at 1/8 of the FMA rate), and where the scale times the quant is exact in f32 the scale's
// product is folded into one fma that still rounds only the exact result:
//   Q8_0  d * q         = fma(d 2^15, f, -d (2^15 + 128))  f from the byte q + 128 (q ^ 0x80)
//   Q4_0  d * (q - 8)   = fma(d 2^15, f, -d (2^15 + 8))    (high nibbles: 2^11, f = 1 + 16 q 2^-15)
//   Q4_1  (d * q) + m   = fma(d 2^15, f, -d 2^15) + m      (the product exact, then one rounding)
//   Q4_K  (d sc) q - (dmin m) = fma(d1 2^15, f, -d1 2^15) - m1
//   Q6_K  (d sc) (q - 32) = (d sc) * fma(f, 2^15, -(2^15 + 32))   (q - 32 exact, then one rounding)
// Each fma's exact value (d q, d (q - 8), d1 q, q - 32) needs at most 24 bits and each constant
// term (d (2^15 + 128): 11 + 9 bits) is exact, so the single rounding of the fma rounds nothing:
// the values are those of the separate multiplies and adds. (For finite scales; a NaN or inf f16
// scale, which no quantizer writes, gives NaN here where the CPU may give inf. A zero product may
// come out +0 where the CPU has -0, which no sum can tell apart.)
// x stays f32, so like matmul.cu's GEMV the result is f32-accurate against the dequantized w.
//
// Epilogues: store_out (bias, a.accumulate, any float out), the RMS norm of x's rows folded into
// the loop (a.norm_w: rinv from the sum of squares of the x values the dots read, as matmul.cu's
// gemv_stream_kernel does), and with a.swiglu the SwiGLU of each gate/up row pair (store_swiglu).
#include "cuda/common.cuh"
#include "cuda/matmul.cuh"

#include <stdio.h>
#include <string.h>

namespace {

#define QV_WARPS 4  // warps per block (KSPLIT divides it)
#define QV_ROWS 2   // weight rows per warp (a gate/up pair for the SwiGLU epilogue; the code assumes 2)
#define QV_STAGES 3 // steps per warp in flight: one being decoded, two being copied

// ---------------------------------------------------------------------------------------------
// Reading blocks out of shared memory. `base` is a 16-byte aligned buffer, `off` an even byte
// offset into it (blocks are 2-byte aligned at best).
// ---------------------------------------------------------------------------------------------

// N little-endian words at base + off: N + 1 aligned loads, each pair funnel-shifted by the
// misalignment (0 or 16 bits; a shift of 0 returns the first word).
template <int N> __device__ __forceinline__ void lds_words(const uint8_t *base, int off, uint32_t out[N]) {
    const uint32_t *w = (const uint32_t *)base + (off >> 2);
    const uint32_t sh = (uint32_t)(off & 3) * 8;
    uint32_t lo = w[0];
#pragma unroll
    for (int j = 0; j < N; j++) {
        const uint32_t hi = w[j + 1];
        out[j] = __funnelshift_r(lo, hi, sh);
        lo = hi;
    }
}

__device__ __forceinline__ uint32_t lds_u16(const uint8_t *base, int off) {
    return *(const uint16_t *)(base + off);
}

__device__ __forceinline__ float f16_bits(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

// 1 + (byte i of v) * 2^-15, exactly: the bits 0x3F80 bb 00 put together by one byte permute.
__device__ __forceinline__ float one_plus(uint32_t v, int i) {
    return __uint_as_float(__byte_perm(v, 0x3F800000u, 0x7604u | ((uint32_t)i << 4)));
}

// ---------------------------------------------------------------------------------------------
// The block types. A unit is what one lane decodes: a whole block of the 32-element types, an
// eighth (32 elements) of a k-quant super-block. Unit::load reads its quants and scales from
// shared memory; get4(c) gives the dequantized elements of its c-th group of four, which lie at
// element offset(t, c) .. + 3 of the block (t: the unit's index in its block).
//   BS, BB: elements and bytes per block; UPB: units per block; CHUNKS: groups of 4 per unit;
//   SB: the most blocks per step (SB * BB a multiple of 16, so the ring's buffers stay aligned).
// ---------------------------------------------------------------------------------------------

struct TQ8_0 {
    static constexpr int BS = 32, BB = 34, UPB = 1, CHUNKS = 8, SB = 32;
    __device__ static int offset(int, int c) { return 4 * c; }
    struct Unit {
        uint32_t q[8]; // qs[0..31], made unsigned (q + 128)
        float A, C;
        __device__ void load(const uint8_t *base, int off, int, bool) {
            const float d = f16_bits(lds_u16(base, off));
            lds_words<8>(base, off + 2, q);
            A = d * 32768.0f;         // exact: a power of two
            C = -(d * 32896.0f);      // d (2^15 + 2^7): 11 + 9 bits, exact
        }
        __device__ void get4(int c, float w[4]) const {
            const uint32_t u = q[c] ^ 0x80808080u;
#pragma unroll
            for (int i = 0; i < 4; i++)
                w[i] = fmaf(A, one_plus(u, i), C);
        }
    };
};

// Element j < 16: low nibble of qs[j]; j >= 16: high nibble of qs[j - 16].
struct TQ4_0 {
    static constexpr int BS = 32, BB = 18, UPB = 1, CHUNKS = 8, SB = 64;
    __device__ static int offset(int, int c) { return 4 * c; }
    struct Unit {
        uint32_t q[4];
        float Alo, Clo, Ahi, Chi;
        __device__ void load(const uint8_t *base, int off, int, bool) {
            const float d = f16_bits(lds_u16(base, off));
            lds_words<4>(base, off + 2, q);
            Alo = d * 32768.0f, Clo = -(d * 32776.0f); // d (2^15 + 8) = 8 d (2^12 + 1): 24 bits
            Ahi = d * 2048.0f, Chi = -(d * 2056.0f);   // d (2^11 + 8) = 8 d (2^8 + 1): 20 bits
        }
        __device__ void get4(int c, float w[4]) const {
            if (c < 4) {
                const uint32_t v = q[c] & 0x0F0F0F0Fu;
#pragma unroll
                for (int i = 0; i < 4; i++)
                    w[i] = fmaf(Alo, one_plus(v, i), Clo);
            } else { // the byte 16 q: f = 1 + q 2^-11
                const uint32_t v = q[c - 4] & 0xF0F0F0F0u;
#pragma unroll
                for (int i = 0; i < 4; i++)
                    w[i] = fmaf(Ahi, one_plus(v, i), Chi);
            }
        }
    };
};

struct TQ4_1 {
    static constexpr int BS = 32, BB = 20, UPB = 1, CHUNKS = 8, SB = 64;
    __device__ static int offset(int, int c) { return 4 * c; }
    struct Unit {
        uint32_t q[4];
        float Alo, Ahi, m;
        __device__ void load(const uint8_t *base, int off, int, bool) {
            uint32_t v[5];
            lds_words<5>(base, off, v); // d, m, qs[16]
            const float d = f16_bits(v[0] & 0xFFFF);
            m = f16_bits(v[0] >> 16);
#pragma unroll
            for (int j = 0; j < 4; j++)
                q[j] = v[j + 1];
            Alo = d * 32768.0f, Ahi = d * 2048.0f;
        }
        __device__ void get4(int c, float w[4]) const {
            const float A = c < 4 ? Alo : Ahi;
            const uint32_t v = q[c & 3] & (c < 4 ? 0x0F0F0F0Fu : 0xF0F0F0F0u);
#pragma unroll
            for (int i = 0; i < 4; i++)
                w[i] = __fadd_rn(fmaf(A, one_plus(v, i), -A), m); // (d * q) + m
        }
    };
};

// Unit t of a super-block: sub-block pair p = t / 2 (sub-blocks 2p and 2p + 1 share 32 bytes of
// qs, low nibbles for 2p, high for 2p + 1), half h = t % 2 of those bytes: elements
// 64p + 16h .. + 15 (low nibbles) and 64p + 32 + 16h .. + 15 (high nibbles).
struct TQ4_K {
    static constexpr int BS = 256, BB = 144, UPB = 8, CHUNKS = 8, SB = 8;
    __device__ static int offset(int t, int c) {
        return 64 * (t >> 1) + 16 * (t & 1) + (c < 4 ? 4 * c : 32 + 4 * (c - 4));
    }
    struct Unit {
        uint32_t q[4];
        float Alo, Mlo, Ahi, Mhi;
        __device__ void load(const uint8_t *base, int off, int t, bool aligned16) {
            const int p = t >> 1, qoff = off + 16 + 32 * p + 16 * (t & 1);
            uint32_t h[4]; // d, dmin, scales[12]
            if (aligned16) { // the step's first block (so every block and 16 qs bytes) 16-byte aligned
                const uint4 hv = *(const uint4 *)(base + off), qv = *(const uint4 *)(base + qoff);
                h[0] = hv.x, h[1] = hv.y, h[2] = hv.z, h[3] = hv.w;
                q[0] = qv.x, q[1] = qv.y, q[2] = qv.z, q[3] = qv.w;
            } else {
                lds_words<4>(base, off, h);
                lds_words<4>(base, qoff, q);
            }
            // The 6-bit scales and mins of sub-blocks 2p, 2p + 1 (to_q4k_scale_min), two bytes of
            // each at once: bytes 2 (p % 2) and 2 (p % 2) + 1 of the scale words moved to 0, 1.
            const uint32_t sh = 16 * (p & 1), s0 = h[1] >> sh, s1 = h[2] >> sh, s2 = h[3] >> sh;
            uint32_t sc, mn;
            if (p < 2) { // sub-blocks 0-3: low 6 bits of bytes 0-3 (scales) and 4-7 (mins)
                sc = s0 & 0x3F3F;
                mn = s1 & 0x3F3F;
            } else { // 4-7: low 4 bits in bytes 8-11 (scale low, min high nibble), top 2 in 0-7
                sc = (s2 & 0x0F0F) | ((s0 >> 2) & 0x3030);
                mn = ((s2 >> 4) & 0x0F0F) | ((s1 >> 2) & 0x3030);
            }
            const float d = f16_bits(h[0] & 0xFFFF), dmin = f16_bits(h[0] >> 16);
            const float d1lo = d * (float)(sc & 0xFF), d1hi = d * (float)(sc >> 8);
            Mlo = dmin * (float)(mn & 0xFF);
            Mhi = dmin * (float)(mn >> 8);
            Alo = d1lo * 32768.0f, Ahi = d1hi * 2048.0f;
        }
        __device__ void get4(int c, float w[4]) const {
            const float A = c < 4 ? Alo : Ahi, M = c < 4 ? Mlo : Mhi;
            const uint32_t v = q[c & 3] & (c < 4 ? 0x0F0F0F0Fu : 0xF0F0F0F0u);
#pragma unroll
            for (int i = 0; i < 4; i++)
                w[i] = __fsub_rn(fmaf(A, one_plus(v, i), -A), M); // (d * sc) * q - (dmin * m)
        }
    };
};

// Element e = 128 h + 32 c + l (c < 4, l < 32): low 4 bits in ql[64 h + 32 (c & 1) + l] (high
// nibble for c >= 2), high 2 bits at bit 2c of qh[32 h + l]; scale scales[e / 16] (i8); d at
// byte 208. Unit t: h = t / 4 and l in l0 .. l0 + 7 with l0 = 8 (t % 4), for each c: chunk
// 2c + g holds elements 128 h + 32 c + l0 + 4g .. + 3.
struct TQ6_K {
    static constexpr int BS = 256, BB = 210, UPB = 8, CHUNKS = 8, SB = 8;
    __device__ static int offset(int t, int c) { return 128 * (t >> 2) + 32 * (c >> 1) + 8 * (t & 3) + 4 * (c & 1); }
    struct Unit {
        uint32_t ql0[2], ql1[2], qh[2]; // ql[64h + l0 ..], ql[64h + 32 + l0 ..], qh[32h + l0 ..]
        float ds[4];                    // d * scales[8h + 2c + l0 / 16] for c = 0..3
        __device__ void load(const uint8_t *base, int off, int t, bool) {
            const int h = t >> 2, l0 = 8 * (t & 3);
            lds_words<2>(base, off + 64 * h + l0, ql0);
            lds_words<2>(base, off + 64 * h + 32 + l0, ql1);
            lds_words<2>(base, off + 128 + 32 * h + l0, qh);
            uint32_t s[2];
            lds_words<2>(base, off + 192 + 8 * h, s); // scales[8h .. 8h + 7]
            const float d = f16_bits(lds_u16(base, off + 208));
            const uint32_t sh = l0 >= 16 ? 8 : 0, a = s[0] >> sh, b = s[1] >> sh;
            ds[0] = d * (float)(int8_t)(a & 0xFF);
            ds[1] = d * (float)(int8_t)((a >> 16) & 0xFF);
            ds[2] = d * (float)(int8_t)(b & 0xFF);
            ds[3] = d * (float)(int8_t)((b >> 16) & 0xFF);
        }
        __device__ void get4(int ch, float w[4]) const {
            const int c = ch >> 1, g = ch & 1;
            const uint32_t lw = (c & 1) ? ql1[g] : ql0[g];
            const uint32_t lo = (c & 2) ? (lw >> 4) & 0x0F0F0F0Fu : lw & 0x0F0F0F0Fu;
            const uint32_t hb = c == 0 ? qh[g] << 4 : c == 1 ? qh[g] << 2 : c == 2 ? qh[g] : qh[g] >> 2;
            const uint32_t v = lo | (hb & 0x30303030u);
#pragma unroll
            for (int i = 0; i < 4; i++)
                w[i] = __fmul_rn(ds[c], fmaf(one_plus(v, i), 32768.0f, -32800.0f)); // (d * sc) * (q - 32)
        }
    };
};

// ---------------------------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void load4_f32(const char *base, int dtype, int64_t k, float v[4]) {
    if (dtype == TO_F32) {
        const float4 t = __ldg((const float4 *)((const float *)base + k));
        v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
        return;
    }
    const uint2 t = __ldg((const uint2 *)((const uint16_t *)base + k));
    const uint32_t raw[2] = {t.x, t.y};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint16_t bits = (uint16_t)(raw[i / 2] >> (16 * (i % 2)));
        v[i] = dtype == TO_BF16 ? __bfloat162float(__ushort_as_bfloat16(bits)) : __half2float(__ushort_as_half(bits));
    }
}

// MR >= a.M rows of x. ksplit warps (1, 2 or 4) share each row pair, taking its steps of sbr
// (at most Q::SB) blocks in turn.
template <class Q, int MR, bool NORM>
__global__ void __launch_bounds__(32 * QV_WARPS, 3) gemv_quant_kernel(MatmulArgs a, int ksplit, int sbr) {
    constexpr int R = QV_ROWS, S = QV_STAGES;
    // a step's bytes, their offset from 16-byte alignment before them (< 16) and slack for the
    // last word read
    constexpr int ROWBUF = Q::SB * Q::BB + 32;
    static_assert(Q::SB * Q::BB % 16 == 0, "16-byte aligned buffers");
    __shared__ __align__(16) uint8_t ring[QV_WARPS][S][R][ROWBUF];
    __shared__ float partial[QV_WARPS][MR][R + 1]; // ksplit > 1: each warp's dots and sum of squares

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, part = warp % ksplit;
    const int64_t n0 = ((int64_t)blockIdx.x * (QV_WARPS / ksplit) + warp / ksplit) * R;
    const int64_t nb = n0 < a.N ? a.K / Q::BS : 0; // blocks per row (none for a warp past the end)
    const char *rows[R];
    bool ok[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        ok[r] = n0 + r < a.N;
        rows[r] = a.w + (ok[r] ? n0 + r : 0) * a.w_row_bytes;
    }
    // where block b0 of row r starts in its buffer: its offset from 16-byte alignment (even)
    auto offset_of = [&](int r, int64_t b0) { return (int)((uintptr_t)(rows[r] + b0 * Q::BB) & 15); };
    if (part == 0 && lane < R && n0 + lane < a.N && nb > 0) { // lane r: row r (R = 2)
        const uintptr_t start = (uintptr_t)(lane ? rows[1] : rows[0]), from = start & ~(uintptr_t)15;
        const uintptr_t end = (start + (uintptr_t)(nb * Q::BB) + 15) & ~(uintptr_t)15;
        prefetch_l2((const void *)from, (uint32_t)(end - from));
    }

    to_pdl_trigger(); // the next kernel may start loading its weights while this one works

    // Copies of step s (blocks s * sbr ..) into stage st: the 16-byte aligned span around each
    // valid row's bytes, lane by lane. One commit group per call, empty or not, so the groups
    // pending always count steps.
    auto issue = [&](int64_t s, int st) {
        const int64_t b0 = s * sbr;
        if (b0 < nb) {
            const int nbs = (int)min((int64_t)sbr, nb - b0);
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (!ok[r])
                    continue;
                const int o = offset_of(r, b0);
                const char *from = rows[r] + b0 * Q::BB - o; // 16-byte aligned
                const int nv = (o + nbs * Q::BB + 15) >> 4;
                for (int v = lane; v < nv; v += 32)
                    cp16(&ring[warp][st][r][16 * v], from + 16 * v);
            }
        }
        cp_commit();
    };

    // the first steps' weights are in flight before the wait: they do not depend on earlier
    // kernels, so their DRAM latency overlaps the previous kernel's tail
#pragma unroll
    for (int i = 0; i < S - 1; i++)
        issue(part + (int64_t)i * ksplit, i);
    to_pdl_wait();
    RowsAddends<MR, R> add;
    if (part == 0 && lane == 0)
        add.load(a, n0, ok);

    float acc[MR][R] = {}, ss[MR] = {};
    int st = 0;
    for (int64_t s = part; s * sbr < nb; s += ksplit) {
        issue(s + (int64_t)(S - 1) * ksplit, st == 0 ? S - 1 : st - 1); // the stage decoded last time
        cp_wait<S - 1>(); // this lane's copies of step s have landed
        __syncwarp();     // and every lane's
        const int64_t b0 = s * sbr;
        const int units = (int)min((int64_t)sbr, nb - b0) * Q::UPB;
        int o[R];
#pragma unroll
        for (int r = 0; r < R; r++)
            o[r] = offset_of(r, b0);
        for (int u = lane; u < units; u += 32) {
            const int bi = u / Q::UPB, t = u % Q::UPB;
            const int64_t kb = (b0 + bi) * Q::BS;
            typename Q::Unit U[R];
#pragma unroll
            for (int r = 0; r < R; r++)
                U[r].load(&ring[warp][st][r][0], o[r] + bi * Q::BB, t, o[r] == 0);
#pragma unroll
            for (int c = 0; c < Q::CHUNKS; c++) {
                const int64_t k = kb + Q::offset(t, c);
                float g[4];
                if constexpr (NORM)
                    load4_f32(a.norm_w, a.norm_dt, k, g);
                float w[R][4];
#pragma unroll
                for (int r = 0; r < R; r++)
                    U[r].get4(c, w[r]);
#pragma unroll
                for (int m = 0; m < MR; m++) {
                    if (m >= a.M)
                        break;
                    const float4 x4 = __ldg((const float4 *)((const float *)a.x + m * a.xs0 + k));
                    float xv[4] = {x4.x, x4.y, x4.z, x4.w};
                    if constexpr (NORM) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            ss[m] += xv[e] * xv[e];
                            xv[e] *= g[e];
                        }
                    }
#pragma unroll
                    for (int r = 0; r < R; r++) // four fmas (the other rows and chunks give the ILP)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            acc[m][r] = fmaf(w[r][e], xv[e], acc[m][r]);
                }
            }
        }
        __syncwarp(); // every lane is done with stage st before it is refilled
        st = st + 1 == S ? 0 : st + 1;
    }
    cp_wait<0>(); // (only empty groups can be left, but leave nothing in flight)

    gemv_rows_finish<MR, R, NORM>(a, acc, ss, partial, ksplit, warp, lane, n0, ok, add);
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

using Kernel = void (*)(MatmulArgs, int, int);

// A kernel variant and how many of its blocks one SM holds at once (registers and shared memory
// decide; asked once per GPU; the GPU is current: to_cuda_stream made it so).
template <class Q, int MR, bool NORM> Kernel variant(int device_index, int *per_sm) {
    static int cached[64];
    int v = device_index >= 0 && device_index < 64 ? cached[device_index] : 0;
    if (!v) {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, gemv_quant_kernel<Q, MR, NORM>, 32 * QV_WARPS, 0) !=
                cudaSuccess || v <= 0) {
            cudaGetLastError(); // (no image for this GPU: the launch reports it)
            v = 2;
        }
        if (device_index >= 0 && device_index < 64)
            cached[device_index] = v;
    }
    *per_sm = v;
    return gemv_quant_kernel<Q, MR, NORM>;
}

template <class Q, int MR> Kernel variant_rows(const MatmulArgs &a, int device_index, int *per_sm) {
    return a.norm_w ? variant<Q, MR, true>(device_index, per_sm) : variant<Q, MR, false>(device_index, per_sm);
}

// The plan. ksplit warps per row pair (1, 2 or 4) when N alone leaves the GPU short of warps: the
// largest split whose grid still fits in one wave of resident blocks, while each part keeps at
// least 16 units (half a step's lanes) and two blocks. Then steps of at most Q::SB blocks, evened
// out so that the parts get the same number.
// INFERENCE_PIO_GEMV_QUANT=1, 2 or 4 forces ksplit (tests, tuning).
template <class Q> void launch_type(const MatmulArgs &a, int device_index, int forced_split, cudaStream_t stream) {
    int per_sm = 0;
    const Kernel kernel = a.M <= 1   ? variant_rows<Q, 1>(a, device_index, &per_sm)
                          : a.M <= 2 ? variant_rows<Q, 2>(a, device_index, &per_sm)
                          : a.M <= 4 ? variant_rows<Q, 4>(a, device_index, &per_sm)
                                     : variant_rows<Q, 8>(a, device_index, &per_sm);
    const int64_t nb = a.K / Q::BS, groups = to_ceil_div(a.N, QV_ROWS);
    int ksplit = 1;
    if (forced_split) {
        ksplit = forced_split;
    } else {
        const int64_t resident = (int64_t)per_sm * to_cuda_sm_count(device_index) * QV_WARPS; // warps
        while (ksplit < QV_WARPS && groups * 2 * ksplit <= resident && nb * Q::UPB >= 32 * ksplit &&
               nb >= 4 * ksplit)
            ksplit *= 2;
    }
    const int64_t steps = to_ceil_div(to_ceil_div(nb, Q::SB), ksplit) * ksplit;
    const int sbr = (int)min((int64_t)Q::SB, to_ceil_div(nb, steps));
    const dim3 grid((unsigned)to_ceil_div(groups * ksplit, QV_WARPS)), block(32 * QV_WARPS);
    to_launch(kernel, grid, block, 0, stream, a, ksplit, sbr);
}

} // namespace

int to_cuda_gemv_quant(const MatmulArgs &a, int device_index, cudaStream_t stream) {
    const char *env = getenv("INFERENCE_PIO_GEMV_QUANT");
    int forced_split = 0;
    if (env && env[0]) {
        if (strcmp(env, "0") == 0)
            return 0;
        if (sscanf(env, "%d", &forced_split) != 1 || (forced_split != 1 && forced_split != 2 && forced_split != 4))
            forced_split = 0;
    }
    if (!a.w_quant || a.M < 1 || a.M > 8 || a.N < 1 || a.K < 1)
        return 0;
    // x: f32 rows, unit stride, 16-byte aligned (4 values per load); w: blocks at even addresses
    // (rows are whole blocks of even size, so only the base can break it)
    if (a.x_dt != TO_F32 || a.xs1 != 1 || (uintptr_t)a.x % 16 != 0 || (a.M > 1 && a.xs0 % 4 != 0) ||
        (uintptr_t)a.w % 2 != 0 || a.w_row_bytes % 2 != 0)
        return 0;
    // the norm's weight: 4 values per load (16-byte aligned base; the caller passes it only
    // when it is contiguous)
    if (a.norm_w && (uintptr_t)a.norm_w % 16 != 0)
        return 0;
    switch (a.w_dt) {
    case TO_Q8_0: launch_type<TQ8_0>(a, device_index, forced_split, stream); break;
    case TO_Q4_0: launch_type<TQ4_0>(a, device_index, forced_split, stream); break;
    case TO_Q4_1: launch_type<TQ4_1>(a, device_index, forced_split, stream); break;
    case TO_Q4_K: launch_type<TQ4_K>(a, device_index, forced_split, stream); break;
    case TO_Q6_K: launch_type<TQ6_K>(a, device_index, forced_split, stream); break;
    default: return 0;
    }
    return 1;
}
