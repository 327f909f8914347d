/* heap.h - a binary min-heap of 64-bit keys (the root is the smallest), shared by top-k
 * (reduce.c) and sampling (sample.c), whose keys order values with their indices. */
#ifndef TO_CPU_HEAP_H
#define TO_CPU_HEAP_H

#include <stdint.h>

/* Restores the heap after h[pos] was appended at the end. */
static inline void heap_sift_up(uint64_t *h, int64_t pos) {
    uint64_t e = h[pos];
    while (pos > 0) {
        int64_t parent = (pos - 1) / 2;
        if (h[parent] <= e)
            break;
        h[pos] = h[parent];
        pos = parent;
    }
    h[pos] = e;
}

/* Restores the heap h[0 .. n) after h[pos] was replaced by a larger key. */
static inline void heap_sift_down(uint64_t *h, int64_t n, int64_t pos) {
    uint64_t e = h[pos];
    for (;;) {
        int64_t c = 2 * pos + 1;
        if (c >= n)
            break;
        c += c + 1 < n && h[c + 1] < h[c];
        if (e <= h[c])
            break;
        h[pos] = h[c];
        pos = c;
    }
    h[pos] = e;
}

#endif
