// select.cuh - radix selection of a rank among 64-bit keys, and a block-wide bitonic sort:
// the top-k of reduce.cu and the beam candidates of beam.cu. Keys are order_key(value) << 32 |
// a tie-breaking index, so the larger key is the larger value (or the same value, lower index).
#pragma once

#include "cuda/common.cuh"

namespace {

constexpr int kBins = 256; // radix digit of 8 bits

// The value's rank as an unsigned integer (as order_key in csrc/cpu/reduce.c; NaN the largest).
__device__ __forceinline__ uint32_t order_key(float v) {
    if (v != v)
        return 0xffffffffu;
    uint32_t u = __float_as_uint(v);
    if (u == 0x80000000u) // -0.0 ties with +0.0
        u = 0;
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

struct SelectShared {
    uint32_t hist[kBins];
    uint64_t found; // the selected key
    int digit;      // the digit chosen in this pass
    int64_t rank;   // the wanted rank within the keys that share the chosen digits
    int64_t in_bin; // how many keys share the chosen digits
    int count;      // keys gathered so far (by the caller)
};

// The key of descending rank `rank` (0: the largest) among key_of(0 .. n-1). Called by the whole
// block; every thread gets the result.
template <typename KeyFn>
__device__ uint64_t select_rank(const KeyFn &key_of, int64_t n, int64_t rank, SelectShared &sh) {
    uint64_t prefix = 0, mask = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < kBins; b += blockDim.x)
            sh.hist[b] = 0;
        __syncthreads();
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            uint64_t key = key_of(j);
            if ((key & mask) == prefix)
                atomicAdd(&sh.hist[(key >> shift) & 0xff], 1u);
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // lane l holds bins 255 - 8l down to 248 - 8l; an inclusive scan over the lanes gives
            // the keys in higher bins
            const int lane = threadIdx.x;
            uint32_t counts[8], sum = 0;
            for (int i = 0; i < 8; i++) {
                counts[i] = sh.hist[kBins - 1 - 8 * lane - i];
                sum += counts[i];
            }
            uint32_t incl = sum;
            for (int o = 1; o < 32; o <<= 1) {
                uint32_t up = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o)
                    incl += up;
            }
            const int64_t before = (int64_t)(incl - sum);
            if (before <= rank && rank < (int64_t)incl) { // exactly one lane holds the rank
                int64_t r = rank - before;
                for (int i = 0; i < 8; i++) {
                    if (r < (int64_t)counts[i]) {
                        sh.digit = kBins - 1 - 8 * lane - i;
                        sh.rank = r;
                        sh.in_bin = counts[i];
                        break;
                    }
                    r -= counts[i];
                }
            }
        }
        __syncthreads();
        prefix |= (uint64_t)sh.digit << shift;
        mask |= (uint64_t)0xff << shift;
        rank = sh.rank;
        const int64_t in_bin = sh.in_bin;
        __syncthreads(); // sh.digit / rank / in_bin are rewritten by the next pass
        if (shift == 0)
            return prefix;
        if (in_bin == 1) { // a single key has these leading digits: one pass finds it
            for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
                uint64_t key = key_of(j);
                if ((key & mask) == prefix)
                    sh.found = key;
            }
            __syncthreads();
            const uint64_t found = sh.found;
            __syncthreads();
            return found;
        }
    }
    return prefix; // not reached
}

// buf[0 .. p) sorted largest first (p a power of two)
__device__ void bitonic_sort_desc(uint64_t *buf, int p) {
    for (int size = 2; size <= p; size <<= 1) {
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < p / 2; i += blockDim.x) {
                int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
                bool desc = (lo & size) == 0; // the final merge (size == p) is descending throughout
                uint64_t a = buf[lo], b = buf[hi];
                if ((a < b) == desc) {
                    buf[lo] = b;
                    buf[hi] = a;
                }
            }
            __syncthreads();
        }
    }
}

} // namespace
