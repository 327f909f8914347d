/* sample.c - to_sample and to_sample_pipeline: validation and device dispatch.
 *
 * Devices: out (and the other outputs) and logits on one device (the CPU, or a GPU, where
 * csrc/cuda/sample.cu samples); every parameter tensor always on the CPU. They are a few bytes
 * per row (and the rows' token lists) that the host has just made (the engine's per-request
 * settings, histories and draws) and their values are checked here, before any work, which needs
 * them on the host; a GPU run then receives the per-row values inside its kernel's arguments and
 * the token lists by an upload that does not wait, so only the outputs are left on the GPU.
 *
 * Checked here, before any work: every tensor (dtype, rank, shapes, bounds, devices, outputs
 * writable and overlapping no input nor each other) and every parameter value of every row,
 * greedy rows included (a batch carries one set of values per row whatever the row does with
 * them):
 *   temperature finite, and <= 0 (greedy) or large enough that 1 / temperature is finite in f32
 *   (> ~2.9e-39; below that the scaled logits would be 0 * inf = NaN); top_k any int32;
 *   top_p and typical_p > 0 and finite (>= 1: off); min_p in [0, 1]; uniform in [0, 1);
 *   repetition_penalty > 0 and finite; presence and frequency penalties finite; no_repeat_ngram
 *   >= 0; CSR offsets non-decreasing within their lists, prompt_lens within their rows, every
 *   token id in [0, V), bias values finite or -inf; a row with a penalty or an n-gram size needs
 *   the histories.
 * The logits themselves are checked by the kernel as it reads them (NaN, +inf, or a row of only
 * -inf is an error naming the row, also after the row's processors: the lowest such row on the
 * CPU; on a GPU the error is recorded, that row's out set to -1, and the next call that
 * synchronises with the GPU raises it, see csrc/cuda/sample.cu). */
#include "internal.h"
#include "cpu/sample.h"
#include "cuda/cuda_ops.h"

#include <math.h>
#include <stdio.h>

/* t is 1-D of length n with the given dtype (what = how the length is explained). */
static int check_vec(const char *op, const to_tensor *t, const char *name, int dtype, int64_t n, const char *what) {
    TO_TRY(to_check_tensor(t, op, name));
    TO_TRY(to_check_dtype(t, TO_MASK(dtype), op, name));
    if (t->ndim != 1 || (n >= 0 && t->shape[0] != n)) {
        char st[160];
        to_shape_str(t, st, sizeof st);
        if (n < 0)
            return to_fail(TO_ERR_SHAPE, "%s: %s has shape %s: expected one dimension", op, name, st);
        return to_fail(TO_ERR_SHAPE, "%s: %s has shape %s but %s: expected [%lld]", op, name, st, what,
                       (long long)n);
    }
    if (t->device != TO_CPU)
        return to_fail(TO_ERR_DEVICE, "%s: %s is on cuda:%d but the parameters must be CPU tensors "
                       "(their values are checked and read on the host), whatever the logits' device",
                       op, name, t->device_index);
    return TO_OK;
}

/* A per-row parameter: [B] on the CPU. */
static int check_param(const char *op, const to_tensor *t, const char *name, int dtype, const to_tensor *logits) {
    char sl[160], what[200];
    to_shape_str(logits, sl, sizeof sl);
    snprintf(what, sizeof what, "logits has shape %s", sl);
    return check_vec(op, t, name, dtype, logits->shape[0], what);
}

/* An output on the logits' device: [d0] (ndim 1) or [d0, d1] (ndim 2; d1 < 0: any). */
static int check_output(const char *op, const to_tensor *t, const char *name, int dtype, const to_tensor *logits,
                        int ndim, int64_t d0, int64_t d1) {
    TO_TRY(to_check_tensor(t, op, name));
    TO_TRY(to_check_dtype(t, TO_MASK(dtype), op, name));
    TO_TRY(to_check_same_device(op, t, logits, (const to_tensor *)NULL));
    if (t->ndim != ndim || t->shape[0] != d0 || (ndim == 2 && d1 >= 0 && t->shape[1] != d1)) {
        char st[160], sl[160], want[64];
        to_shape_str(t, st, sizeof st);
        to_shape_str(logits, sl, sizeof sl);
        if (ndim == 1)
            snprintf(want, sizeof want, "[%lld]", (long long)d0);
        else if (d1 >= 0)
            snprintf(want, sizeof want, "[%lld, %lld]", (long long)d0, (long long)d1);
        else
            snprintf(want, sizeof want, "[%lld, N]", (long long)d0);
        return to_fail(TO_ERR_SHAPE, "%s: %s has shape %s but logits has shape %s: expected %s", op, name, st, sl, want);
    }
    return to_check_writable(t, op, name);
}

/* offsets [rows + 1] into a list of `len` entries: non-decreasing within [0, len]. */
static int check_offsets(const char *op, const to_tensor *off, const char *name, int64_t rows, int64_t len,
                         const char *list) {
    int64_t prev = 0;
    for (int64_t r = 0; r <= rows; r++) {
        int64_t v = to_sample_i32(off, r, 0);
        if (v < prev || v > len)
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s[%lld] = %lld: offsets must be non-decreasing "
                           "within [0, %lld] (the length of %s)%s", op, name, (long long)r, (long long)v,
                           (long long)len, list, v < prev && r > 0 ? ", but it is below the one before" : "");
        prev = v;
    }
    return TO_OK;
}

/* Every id of list[0 .. len) in [0, vocab). */
static int check_ids(const char *op, const to_tensor *list, const char *name, int64_t len, int64_t vocab) {
    for (int64_t i = 0; i < len; i++) {
        int32_t id = to_sample_i32(list, i, 0);
        if (id < 0 || id >= vocab)
            return to_fail(TO_ERR_BOUNDS, "%s: %s[%lld] = %d is not a token id (outside [0, %lld), the "
                           "logits' vocabulary)", op, name, (long long)i, id, (long long)vocab);
    }
    return TO_OK;
}

static int check_values(to_sample_plan *pl) {
    const char *op = pl->op;
    const to_sample_params *p = &pl->p;
    for (int64_t r = 0; r < pl->rows; r++) {
        float t = to_sample_f32(p->temperature, r, 0), tp = to_sample_f32(p->top_p, r, 0);
        float m = to_sample_f32(p->min_p, r, 0), u = to_sample_f32(p->uniform, r, 0);
        float ty = to_sample_f32(p->typical_p, r, 1), rep = to_sample_f32(p->repetition_penalty, r, 1);
        float pres = to_sample_f32(p->presence_penalty, r, 0), freq = to_sample_f32(p->frequency_penalty, r, 0);
        int32_t ngram = to_sample_i32(p->no_repeat_ngram, r, 0);
        long long rr = (long long)r;
        if (!isfinite(t))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: temperature[%lld] = %g is not finite", op, rr, (double)t);
        if (t > 0 && isinf(1.0f / t))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: temperature[%lld] = %g is too small (1 / "
                           "temperature overflows float32; use 0 for greedy)", op, rr, (double)t);
        if (!(tp > 0) || !isfinite(tp))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: top_p[%lld] = %g must be > 0 and finite "
                           "(>= 1 keeps all)", op, rr, (double)tp);
        if (!(m >= 0 && m <= 1))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: min_p[%lld] = %g is outside [0, 1]", op, rr, (double)m);
        if (!(u >= 0 && u < 1))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: uniform[%lld] = %g is outside [0, 1)", op, rr, (double)u);
        if (!(ty > 0) || !isfinite(ty))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: typical_p[%lld] = %g must be > 0 and finite "
                           "(>= 1 keeps all)", op, rr, (double)ty);
        if (!(rep > 0) || !isfinite(rep))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: repetition_penalty[%lld] = %g must be > 0 and "
                           "finite (1: off)", op, rr, (double)rep);
        if (!isfinite(pres))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: presence_penalty[%lld] = %g is not finite", op, rr, (double)pres);
        if (!isfinite(freq))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: frequency_penalty[%lld] = %g is not finite", op, rr, (double)freq);
        if (ngram < 0)
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: no_repeat_ngram[%lld] = %d is negative (0: off)", op, rr, ngram);
        if (!p->history && (rep != 1.0f || pres != 0.0f || freq != 0.0f || ngram > 0))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: row %lld has a %s but history is NULL (penalties "
                           "and the n-gram block act on the rows' token histories)", op, rr,
                           rep != 1.0f ? "repetition penalty" : pres != 0.0f ? "presence penalty"
                           : freq != 0.0f ? "frequency penalty" : "no_repeat_ngram size");
        if (t > 0 && ty < 1)
            pl->any_typical = 1;
    }
    if (p->history) {
        int64_t len = p->history->shape[0];
        TO_TRY(check_offsets(op, p->history_offsets, "history_offsets", pl->rows, len, "history"));
        for (int64_t r = 0; r < pl->rows; r++) {
            int64_t n = to_sample_i32(p->history_offsets, r + 1, 0) - to_sample_i32(p->history_offsets, r, 0);
            int32_t np = to_sample_i32(p->prompt_lens, r, 0);
            if (np < 0 || np > n)
                return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: prompt_lens[%lld] = %d is outside [0, %lld] "
                               "(the length of row %lld's history)", op, (long long)r, np, (long long)n, (long long)r);
        }
        TO_TRY(check_ids(op, p->history, "history", len, pl->vocab));
    }
    if (p->bias_ids) {
        int64_t len = p->bias_ids->shape[0];
        TO_TRY(check_offsets(op, p->bias_offsets, "bias_offsets", pl->rows, len, "bias_ids"));
        TO_TRY(check_ids(op, p->bias_ids, "bias_ids", len, pl->vocab));
        for (int64_t i = 0; i < len; i++) {
            float b = to_sample_f32(p->bias_values, i, 0);
            if (b != b || b == INFINITY)
                return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: bias_values[%lld] = %g must be finite or -inf",
                               op, (long long)i, (double)b);
        }
    }
    for (int64_t r = 0; r < pl->rows; r++) {
        to_sample_proc q = to_sample_row_proc(p, r);
        pl->any_proc |= to_sample_proc_active(&q);
    }
    return TO_OK;
}

/* A CSR trio: all three tensors or none. */
static int check_csr(const char *op, const to_tensor *list, const to_tensor *offsets, const to_tensor *third,
                     const char *nl, const char *no, const char *nt, int third_dtype, int third_per_row,
                     const to_tensor *logits) {
    if (!list && !offsets && !third)
        return TO_OK;
    if (!list || !offsets || !third)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: %s, %s and %s come together: %s is NULL but %s is not",
                       op, nl, no, nt, !list ? nl : !offsets ? no : nt, list ? nl : offsets ? no : nt);
    char sl[160], what[200];
    to_shape_str(logits, sl, sizeof sl);
    snprintf(what, sizeof what, "logits has shape %s (one offset per row, and one more)", sl);
    TO_TRY(check_vec(op, list, nl, TO_I32, -1, NULL));
    TO_TRY(check_vec(op, offsets, no, TO_I32, logits->shape[0] + 1, what));
    if (third_per_row)
        return check_param(op, third, nt, third_dtype, logits);
    char sz[200];
    snprintf(sz, sizeof sz, "%s has %lld entries", nl, (long long)list->shape[0]);
    return check_vec(op, third, nt, third_dtype, list->shape[0], sz);
}

static int sample_checked(to_sample_plan *pl) {
    const char *op = pl->op;
    const to_tensor *logits = pl->logits, *out = pl->out;
    const to_sample_params *p = &pl->p;
    TO_TRY(to_check_tensor(out, op, "out"));
    TO_TRY(to_check_tensor(logits, op, "logits"));
    const to_tensor *req[5] = {p->temperature, p->top_k, p->top_p, p->min_p, p->uniform};
    const char *req_names[5] = {"temperature", "top_k", "top_p", "min_p", "uniform"};
    for (int i = 0; i < 5; i++)
        TO_TRY(to_check_tensor(req[i], op, req_names[i]));
    TO_TRY(to_check_dtype(logits, TO_FLOAT_DTYPES, op, "logits"));
    TO_TRY(to_check_dtype(out, TO_MASK(TO_I64), op, "out"));
    TO_TRY(to_check_same_device(op, out, logits, (const to_tensor *)NULL));
    for (int i = 0; i < 5; i++)
        if (req[i]->device != TO_CPU)
            return to_fail(TO_ERR_DEVICE, "%s: %s is on cuda:%d but the parameters must be CPU tensors "
                           "(their values are checked and read on the host), whatever the logits' device",
                           op, req_names[i], req[i]->device_index);
    TO_TRY(to_check_ndim(logits, 2, op, "logits"));
    int64_t rows = logits->shape[0], vocab = logits->shape[1];
    pl->rows = rows;
    pl->vocab = vocab;
    if (vocab < 1)
        return to_fail(TO_ERR_SHAPE, "%s: logits has shape [%lld, 0]: rows need at least one token", op, (long long)rows);
    if (vocab - 1 > (int64_t)UINT32_MAX)
        return to_fail(TO_ERR_UNSUPPORTED, "%s: rows of %lld logits (at most 2^32 supported)", op, (long long)vocab);
    TO_TRY(check_output(op, out, "out", TO_I64, logits, 1, rows, 0));
    TO_TRY(check_param(op, p->temperature, "temperature", TO_F32, logits));
    TO_TRY(check_param(op, p->top_k, "top_k", TO_I32, logits));
    TO_TRY(check_param(op, p->top_p, "top_p", TO_F32, logits));
    TO_TRY(check_param(op, p->min_p, "min_p", TO_F32, logits));
    TO_TRY(check_param(op, p->uniform, "uniform", TO_F32, logits));
    const to_tensor *opt[5] = {p->typical_p, p->repetition_penalty, p->presence_penalty, p->frequency_penalty,
                               p->no_repeat_ngram};
    const char *opt_names[5] = {"typical_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                                "no_repeat_ngram"};
    for (int i = 0; i < 5; i++)
        if (opt[i])
            TO_TRY(check_param(op, opt[i], opt_names[i], i == 4 ? TO_I32 : TO_F32, logits));
    TO_TRY(check_csr(op, p->history, p->history_offsets, p->prompt_lens, "history", "history_offsets",
                     "prompt_lens", TO_I32, 1, logits));
    TO_TRY(check_csr(op, p->bias_ids, p->bias_offsets, p->bias_values, "bias_ids", "bias_offsets",
                     "bias_values", TO_F32, 0, logits));

    /* the optional outputs */
    if (pl->logprobs)
        TO_TRY(check_output(op, pl->logprobs, "logprobs", TO_F32, logits, 1, rows, 0));
    if (!pl->top_ids != !pl->top_logprobs)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: top_ids and top_logprobs come together: %s is NULL but %s is not",
                       op, pl->top_ids ? "top_logprobs" : "top_ids", pl->top_ids ? "top_ids" : "top_logprobs");
    if (pl->top_ids) {
        TO_TRY(check_output(op, pl->top_ids, "top_ids", TO_I64, logits, 2, rows, -1));
        TO_TRY(check_output(op, pl->top_logprobs, "top_logprobs", TO_F32, logits, 2, rows, -1));
        pl->ntop = pl->top_ids->shape[1];
        if (pl->top_logprobs->shape[1] != pl->ntop || pl->ntop > vocab) {
            char a[160], b[160];
            to_shape_str(pl->top_ids, a, sizeof a);
            to_shape_str(pl->top_logprobs, b, sizeof b);
            return to_fail(TO_ERR_SHAPE, "%s: top_ids has shape %s and top_logprobs %s: they need one shape "
                           "[%lld, N] with N <= %lld (the vocabulary)", op, a, b, (long long)rows, (long long)vocab);
        }
    }
    if (pl->processed)
        TO_TRY(check_output(op, pl->processed, "processed", TO_F32, logits, 2, rows, vocab));

    /* no output overlaps an input or another output */
    const to_tensor *outs[5] = {out, pl->logprobs, pl->top_ids, pl->top_logprobs, pl->processed};
    const char *out_names[5] = {"out", "logprobs", "top_ids", "top_logprobs", "processed"};
    const to_tensor *ins[17] = {logits, p->temperature, p->top_k, p->top_p, p->min_p, p->uniform, p->typical_p,
                                p->repetition_penalty, p->presence_penalty, p->frequency_penalty,
                                p->no_repeat_ngram, p->history, p->history_offsets, p->prompt_lens,
                                p->bias_ids, p->bias_offsets, p->bias_values};
    const char *in_names[17] = {"logits", "temperature", "top_k", "top_p", "min_p", "uniform", "typical_p",
                                "repetition_penalty", "presence_penalty", "frequency_penalty", "no_repeat_ngram",
                                "history", "history_offsets", "prompt_lens", "bias_ids", "bias_offsets",
                                "bias_values"};
    for (int i = 0; i < 5; i++) {
        if (!outs[i])
            continue;
        for (int j = 0; j < 17; j++)
            if (ins[j])
                TO_TRY(to_check_no_alias(outs[i], ins[j], 0, op, out_names[i], in_names[j]));
        for (int j = 0; j < i; j++)
            if (outs[j])
                TO_TRY(to_check_no_alias(outs[i], outs[j], 0, op, out_names[i], out_names[j]));
    }

    TO_TRY(check_values(pl));
    if (logits->device == TO_CUDA)
        return to_cuda_sample(pl);
    return to_cpu_sample(pl);
}

int to_sample(const to_tensor *out, const to_tensor *logits, const to_tensor *temperature,
              const to_tensor *top_k, const to_tensor *top_p, const to_tensor *min_p,
              const to_tensor *uniform) {
    to_sample_plan pl = {0};
    pl.op = "to_sample";
    pl.out = out;
    pl.logits = logits;
    pl.p.temperature = temperature;
    pl.p.top_k = top_k;
    pl.p.top_p = top_p;
    pl.p.min_p = min_p;
    pl.p.uniform = uniform;
    return sample_checked(&pl);
}

int to_sample_pipeline(const to_tensor *out, const to_tensor *logprobs, const to_tensor *top_ids,
                       const to_tensor *top_logprobs, const to_tensor *processed,
                       const to_tensor *logits, const to_sample_params *params) {
    const char *op = "to_sample_pipeline";
    if (!params)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: params is NULL", op);
    to_sample_plan pl = {0};
    pl.op = op;
    pl.out = out;
    pl.logprobs = logprobs;
    pl.top_ids = top_ids;
    pl.top_logprobs = top_logprobs;
    pl.processed = processed;
    pl.logits = logits;
    pl.p = *params;
    return sample_checked(&pl);
}

int to_sample_bad_row(const char *op, int64_t r, int kind, const char *where) {
    static const char *what[] = {"is bad", "holds NaN", "holds +inf (logits must be finite or -inf)",
                                 "is all -inf (no token has a probability)",
                                 "holds NaN after its processors (penalties or bias)",
                                 "holds +inf after its processors (a penalty or bias overflowed float32)",
                                 "is all -inf after its processors (bias, bans and the n-gram block leave no token)"};
    return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: logits row %lld %s%s", op, (long long)r,
                   what[kind >= 1 && kind <= 6 ? kind : 0], where ? where : "");
}
