/* order_key.h - 64-bit sort keys for top-k style selections (reduce.c's topk, sample.c, beam.c).
 * A key's unsigned order is the ranking: the high half is the value mapped to an unsigned integer
 * that grows with it (NaN mapped above +inf, -0.0 onto +0.0), the low half the complement of the
 * index (a lower index makes a larger key). One integer compare instead of a NaN-aware float
 * compare. */
#ifndef TO_CPU_ORDER_KEY_H
#define TO_CPU_ORDER_KEY_H

#include <math.h>
#include <stdint.h>

static inline uint32_t order_key(float v) {
    union { float f; uint32_t u; } b = {v};
    if (v != v)
        return UINT32_MAX;
    if (b.u == 0x80000000u) /* -0.0 ties with +0.0 */
        b.u = 0;
    return (b.u & 0x80000000u) ? ~b.u : b.u | 0x80000000u;
}

/* the value a key came from (+0.0 for either zero; NaN for the NaN key) */
static inline float key_value(uint64_t key) {
    uint32_t k = (uint32_t)(key >> 32);
    union { uint32_t u; float f; } b = {(k & 0x80000000u) ? k & 0x7fffffffu : ~k};
    return k == UINT32_MAX ? NAN : b.f;
}

static inline uint64_t make_key(float v, int64_t i) { return (uint64_t)order_key(v) << 32 | (uint32_t)~(uint32_t)i; }

static inline int64_t key_index(uint64_t key) { return (int64_t)(uint32_t)~(uint32_t)key; }

#endif
