/* sample.c - to_sample: validation and device dispatch.
 *
 * Devices: out and logits on one device (the CPU, or a GPU, where csrc/cuda/sample.cu samples);
 * the five parameter tensors always on the CPU. They are a few bytes per row that the host has
 * just made (the engine's per-request settings and draws) and their values are checked here,
 * before any work, which needs them on the host; a GPU run then receives them inside its kernel's
 * arguments, so nothing is copied or waited for and only the chosen ids are left on the GPU.
 *
 * Checked here, before any work: every tensor (dtype, rank, [B] shapes, bounds, devices, out
 * writable and overlapping no input) and every parameter value of every row, greedy rows
 * included (a batch carries one set of values per row whatever the row does with them):
 *   temperature finite, and <= 0 (greedy) or large enough that 1 / temperature is finite in f32
 *   (> ~2.9e-39; below that the scaled logits would be 0 * inf = NaN); top_k any int32;
 *   top_p > 0 and finite (>= 1: off); min_p in [0, 1]; uniform in [0, 1).
 * The logits themselves are checked by the kernel as it reads them (NaN, +inf, or a row of only
 * -inf is an error naming the row: the lowest such row on the CPU; on a GPU the error is
 * recorded, that row's out set to -1, and the next call that synchronises with the GPU raises it,
 * see csrc/cuda/sample.cu). */
#include "internal.h"
#include "cpu/sample.h"
#include "cuda/cuda_ops.h"

#include <math.h>
#include <stdio.h>

#define OP "to_sample"

static int check_param(const to_tensor *t, const char *name, int dtype, const to_tensor *logits) {
    TO_TRY(to_check_dtype(t, TO_MASK(dtype), OP, name));
    if (t->ndim != 1 || t->shape[0] != logits->shape[0]) {
        char st[160], sl[160];
        to_shape_str(t, st, sizeof st);
        to_shape_str(logits, sl, sizeof sl);
        return to_fail(TO_ERR_SHAPE, OP ": %s has shape %s but logits has shape %s: expected [%lld]",
                       name, st, sl, (long long)logits->shape[0]);
    }
    return TO_OK;
}

static float f32_at(const to_tensor *t, int64_t r) { return ((const float *)t->data)[r * t->strides[0]]; }

int to_sample(const to_tensor *out, const to_tensor *logits, const to_tensor *temperature,
              const to_tensor *top_k, const to_tensor *top_p, const to_tensor *min_p,
              const to_tensor *uniform) {
    const to_tensor *all[7] = {out, logits, temperature, top_k, top_p, min_p, uniform};
    const char *names[7] = {"out", "logits", "temperature", "top_k", "top_p", "min_p", "uniform"};
    for (int i = 0; i < 7; i++)
        TO_TRY(to_check_tensor(all[i], OP, names[i]));
    TO_TRY(to_check_dtype(logits, TO_FLOAT_DTYPES, OP, "logits"));
    TO_TRY(to_check_dtype(out, TO_MASK(TO_I64), OP, "out"));
    TO_TRY(to_check_same_device(OP, out, logits, (const to_tensor *)NULL));
    for (int i = 2; i < 7; i++)
        if (all[i]->device != TO_CPU)
            return to_fail(TO_ERR_DEVICE, OP ": %s is on cuda:%d but the parameters must be CPU tensors "
                           "(their values are checked and read on the host), whatever the logits' device",
                           names[i], all[i]->device_index);
    TO_TRY(to_check_ndim(logits, 2, OP, "logits"));
    int64_t rows = logits->shape[0], vocab = logits->shape[1];
    if (vocab < 1)
        return to_fail(TO_ERR_SHAPE, OP ": logits has shape [%lld, 0]: rows need at least one token",
                       (long long)rows);
    if (vocab - 1 > (int64_t)UINT32_MAX)
        return to_fail(TO_ERR_UNSUPPORTED, OP ": rows of %lld logits (at most 2^32 supported)",
                       (long long)vocab);
    TO_TRY(check_param(out, "out", TO_I64, logits));
    TO_TRY(check_param(temperature, "temperature", TO_F32, logits));
    TO_TRY(check_param(top_k, "top_k", TO_I32, logits));
    TO_TRY(check_param(top_p, "top_p", TO_F32, logits));
    TO_TRY(check_param(min_p, "min_p", TO_F32, logits));
    TO_TRY(check_param(uniform, "uniform", TO_F32, logits));
    TO_TRY(to_check_writable(out, OP, "out"));
    for (int i = 1; i < 7; i++)
        TO_TRY(to_check_no_alias(out, all[i], 0, OP, "out", names[i]));

    for (int64_t r = 0; r < rows; r++) {
        float t = f32_at(temperature, r), p = f32_at(top_p, r), m = f32_at(min_p, r), u = f32_at(uniform, r);
        if (!isfinite(t))
            return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": temperature[%lld] = %g is not finite",
                           (long long)r, (double)t);
        if (t > 0 && isinf(1.0f / t))
            return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": temperature[%lld] = %g is too small (1 / "
                           "temperature overflows float32; use 0 for greedy)", (long long)r, (double)t);
        if (!(p > 0) || !isfinite(p))
            return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": top_p[%lld] = %g must be > 0 and finite "
                           "(>= 1 keeps all)", (long long)r, (double)p);
        if (!(m >= 0 && m <= 1))
            return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": min_p[%lld] = %g is outside [0, 1]",
                           (long long)r, (double)m);
        if (!(u >= 0 && u < 1))
            return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": uniform[%lld] = %g is outside [0, 1)",
                           (long long)r, (double)u);
    }
    if (logits->device == TO_CUDA)
        return to_cuda_sample(out, logits, temperature, top_k, top_p, min_p, uniform);
    return to_cpu_sample(out, logits, temperature, top_k, top_p, min_p, uniform);
}
