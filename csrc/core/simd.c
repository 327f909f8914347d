/* simd.c - which vector instructions the kernels may use, chosen at run time.
 * The library is compiled for the baseline x86-64 ABI; kernels carry AVX2/AVX-512 variants
 * behind target attributes and ask to_simd() which one to run. INFERENCE_PIO_SIMD=scalar|avx2
 * or to_set_simd() lowers the level, so the portable path can be tested on any machine. */
#include "internal.h"

#include <stdlib.h>
#include <strings.h>

static int detected = -1;
static int active = -1;

static int detect(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
        return TO_SIMD_SCALAR;
    /* F16C has no __builtin_cpu_supports name in older compilers: every AVX2 CPU has it. */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return TO_SIMD_AVX512;
    return TO_SIMD_AVX2;
#else
    return TO_SIMD_SCALAR;
#endif
}

static void init(void) {
    if (detected >= 0)
        return;
    int d = detect();
    int a = d;
    const char *env = getenv("INFERENCE_PIO_SIMD");
    if (env && !strcasecmp(env, "scalar"))
        a = TO_SIMD_SCALAR;
    else if (env && !strcasecmp(env, "avx2") && d >= TO_SIMD_AVX2)
        a = TO_SIMD_AVX2;
    active = a;
    detected = d;
}

int to_simd(void) {
    if (active < 0)
        init();
    return active;
}

int to_simd_detected(void) {
    init();
    return detected;
}

int to_simd_active(void) { return to_simd(); }

int to_set_simd(int level) {
    init();
    if (level < TO_SIMD_SCALAR || level > detected)
        return to_fail(TO_ERR_INVALID_ARGUMENT,
                       "to_set_simd: level %d is not available (this CPU supports up to %d)", level,
                       detected);
    active = level;
    return TO_OK;
}
