/* beam.c - to_beam_topk: validation and device dispatch.
 *
 * Devices: scores, ids and logits on one device (the CPU, or a GPU where csrc/cuda/beam.cu runs
 * the step); beam_scores, groups and suppress always on the CPU: a few values per beam that the
 * host has just made (the engine's beam states), checked here before any work and, on a GPU,
 * carried in the launch's arguments, so only the candidates ([G, K] scores and ids) are left on
 * the GPU to be read back.
 *
 * Checked here: every tensor (dtype, rank, shapes, bounds, devices, outputs writable and
 * overlapping nothing), and every value read on the host: each group's rows inside logits, its
 * k in [1, min(K, rows * V)], rows * V <= 2^32 (the flat index is 32 bits of a key), the scores of
 * its rows finite, its suppressed ids < V; on a GPU at most 256 rows, k <= 1024 and 128 suppressed
 * ids per group (what one launch carries).
 * The logits are checked by the kernels as they read them (csrc/cpu/beam.c, csrc/cuda/beam.cu). */
#include "internal.h"
#include "cpu/beam.h"
#include "cpu/embedding.h"
#include "cuda/cuda_ops.h"

#include <math.h>
#include <stdio.h>

#define OP "to_beam_topk"

static int host_tensor(const to_tensor *t, const char *name) {
    if (t->device != TO_CPU)
        return to_fail(TO_ERR_DEVICE, OP ": %s is on cuda:%d but must be a CPU tensor (its values are "
                       "checked and read on the host), whatever the logits' device", name, t->device_index);
    return TO_OK;
}

static int shape_error(const to_tensor *t, const char *name, const char *expected) {
    char s[160];
    to_shape_str(t, s, sizeof s);
    return to_fail(TO_ERR_SHAPE, OP ": %s has shape %s, expected %s", name, s, expected);
}

static int64_t at2(const to_tensor *t, int64_t i, int64_t j) {
    return to_load_index(t->data, t->dtype, i * t->strides[0] + j * t->strides[1]);
}

static int check_groups(const to_tensor *groups, const to_tensor *beam_scores, const to_tensor *suppress,
                        int64_t R, int64_t V, int64_t K, int on_gpu) {
    for (int64_t g = 0; g < groups->shape[0]; g++) {
        int64_t first = at2(groups, g, 0), rows = at2(groups, g, 1), k = at2(groups, g, 2);
        if (first < 0 || rows < 1 || first > R - rows)
            return to_fail(TO_ERR_BOUNDS, OP ": group %lld = (first %lld, rows %lld): its rows must be "
                           "at least one and inside logits' %lld rows", (long long)g, (long long)first,
                           (long long)rows, (long long)R);
        if (rows > ((int64_t)1 << 32) / V)
            return to_fail(TO_ERR_UNSUPPORTED, OP ": group %lld has %lld rows of %lld logits: more than "
                           "2^32 candidates", (long long)g, (long long)rows, (long long)V);
        if (k < 1 || k > K || k > rows * V)
            return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": group %lld asks for k = %lld candidates: k must "
                           "be in [1, %lld] (scores has %lld columns, the group %lld rows of %lld)",
                           (long long)g, (long long)k, (long long)(K < rows * V ? K : rows * V),
                           (long long)K, (long long)rows, (long long)V);
        if (on_gpu && (rows > 256 || k > 1024))
            return to_fail(TO_ERR_UNSUPPORTED, OP ": group %lld has %lld rows and k = %lld: on a GPU a "
                           "group has at most 256 rows and k <= 1024", (long long)g, (long long)rows,
                           (long long)k);
        for (int64_t r = first; r < first + rows; r++) {
            float s = ((const float *)beam_scores->data)[r * beam_scores->strides[0]];
            if (!isfinite(s))
                return to_fail(TO_ERR_INVALID_ARGUMENT, OP ": beam_scores[%lld] = %g (group %lld) is not "
                               "finite", (long long)r, (double)s, (long long)g);
        }
        int64_t used = 0;
        for (int64_t q = 0; suppress && q < suppress->shape[1]; q++) {
            int64_t t = at2(suppress, g, q);
            if (t >= V)
                return to_fail(TO_ERR_BOUNDS, OP ": suppress[%lld, %lld] = %lld is not below the %lld "
                               "logits of a row (negative entries are unused)", (long long)g,
                               (long long)q, (long long)t, (long long)V);
            used += t >= 0;
        }
        if (on_gpu && used > 128)
            return to_fail(TO_ERR_UNSUPPORTED, OP ": group %lld suppresses %lld ids: on a GPU at most 128",
                           (long long)g, (long long)used);
    }
    return TO_OK;
}

int to_beam_topk(const to_tensor *scores, const to_tensor *ids, const to_tensor *logits,
                 const to_tensor *beam_scores, const to_tensor *groups, const to_tensor *suppress) {
    const to_tensor *all[6] = {scores, ids, logits, beam_scores, groups, suppress};
    const char *names[6] = {"scores", "ids", "logits", "beam_scores", "groups", "suppress"};
    for (int i = 0; i < 6; i++)
        if (all[i] || i < 5)
            TO_TRY(to_check_tensor(all[i], OP, names[i]));
    TO_TRY(to_check_dtype(scores, TO_MASK(TO_F32), OP, "scores"));
    TO_TRY(to_check_dtype(ids, TO_MASK(TO_I64), OP, "ids"));
    TO_TRY(to_check_dtype(logits, TO_FLOAT_DTYPES, OP, "logits"));
    TO_TRY(to_check_dtype(beam_scores, TO_MASK(TO_F32), OP, "beam_scores"));
    TO_TRY(to_check_dtype(groups, TO_INDEX_DTYPES, OP, "groups"));
    if (suppress)
        TO_TRY(to_check_dtype(suppress, TO_INDEX_DTYPES, OP, "suppress"));
    TO_TRY(to_check_same_device(OP, scores, ids, logits, (const to_tensor *)NULL));
    for (int i = 3; i < 6; i++)
        if (all[i])
            TO_TRY(host_tensor(all[i], names[i]));

    TO_TRY(to_check_ndim(logits, 2, OP, "logits"));
    const int64_t R = logits->shape[0], V = logits->shape[1];
    if (V < 1)
        return to_fail(TO_ERR_SHAPE, OP ": logits has shape [%lld, 0]: rows need at least one token",
                       (long long)R);
    char want[96];
    if (groups->ndim != 2 || groups->shape[1] != 3)
        return shape_error(groups, "groups", "[G, 3] (first row, rows, k of each group)");
    const int64_t G = groups->shape[0];
    snprintf(want, sizeof want, "[%lld, K] (one row per group)", (long long)G);
    if (scores->ndim != 2 || scores->shape[0] != G)
        return shape_error(scores, "scores", want);
    if (ids->ndim != 2 || ids->shape[0] != G || ids->shape[1] != scores->shape[1]) {
        snprintf(want, sizeof want, "[%lld, %lld] (scores' shape)", (long long)G, (long long)scores->shape[1]);
        return shape_error(ids, "ids", want);
    }
    snprintf(want, sizeof want, "[%lld] (one per logits row)", (long long)R);
    if (beam_scores->ndim != 1 || beam_scores->shape[0] != R)
        return shape_error(beam_scores, "beam_scores", want);
    snprintf(want, sizeof want, "[%lld, M] (one row per group)", (long long)G);
    if (suppress && (suppress->ndim != 2 || suppress->shape[0] != G))
        return shape_error(suppress, "suppress", want);

    TO_TRY(to_check_writable(scores, OP, "scores"));
    TO_TRY(to_check_writable(ids, OP, "ids"));
    TO_TRY(to_check_no_alias(scores, ids, 0, OP, "scores", "ids"));
    for (int i = 2; i < 6; i++)
        if (all[i]) {
            TO_TRY(to_check_no_alias(scores, all[i], 0, OP, "scores", names[i]));
            TO_TRY(to_check_no_alias(ids, all[i], 0, OP, "ids", names[i]));
        }
    TO_TRY(check_groups(groups, beam_scores, suppress, R, V, scores->shape[1], logits->device == TO_CUDA));
    if (G == 0)
        return TO_OK;
    if (logits->device == TO_CUDA)
        return to_cuda_beam_topk(scores, ids, logits, beam_scores, groups, suppress);
    return to_cpu_beam_topk(scores, ids, logits, beam_scores, groups, suppress);
}
