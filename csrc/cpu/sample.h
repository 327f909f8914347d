/* sample.h - the CPU kernel behind to_sample and to_sample_pipeline, and the validated form of a
 * call that csrc/ops/sample.c hands to it and to the GPU's (csrc/cuda/sample.cu). */
#ifndef TO_CPU_SAMPLE_H
#define TO_CPU_SAMPLE_H

#include "internal.h"

#pragma GCC visibility push(hidden)
#ifdef __cplusplus
extern "C" { /* also included by the CUDA sources (cuda_ops.h) */
#endif

/* A call whose every tensor and value was checked by csrc/ops/sample.c (see to_sample_pipeline
 * in tensor_ops.h): logits [rows, vocab] (vocab >= 1) and the outputs on one device, p's tensors
 * on the CPU with valid values, optional ones NULL when off. to_sample is the same call with
 * only p's five to_sample fields set and no optional output. */
typedef struct {
    const char *op; /* the public op's name, for error messages */
    const to_tensor *out, *logprobs, *top_ids, *top_logprobs, *processed, *logits;
    to_sample_params p;
    int64_t rows, vocab;
    int64_t ntop;    /* N of top_ids / top_logprobs (0 without them) */
    int any_proc;    /* some row has a processor that changes its logits (to_sample_row_proc) */
    int any_typical; /* some sampled row has typical_p < 1 */
} to_sample_plan;

/* Element i of a 1-D f32 / i32 tensor, or `off` when the tensor is NULL. */
static inline float to_sample_f32(const to_tensor *t, int64_t i, float off) {
    return t ? ((const float *)t->data)[i * t->strides[0]] : off;
}
static inline int32_t to_sample_i32(const to_tensor *t, int64_t i, int32_t off) {
    return t ? ((const int32_t *)t->data)[i * t->strides[0]] : off;
}

/* Row r's processors: what a kernel needs to rewrite its logits. */
typedef struct {
    int64_t hist0, nhist, nprompt; /* history[hist0 .. hist0 + nhist), the first nprompt the prompt */
    int64_t bias0, nbias;          /* bias_ids / bias_values [bias0 .. bias0 + nbias) */
    float rep, presence, frequency;
    int32_t ngram;
} to_sample_proc;

static inline to_sample_proc to_sample_row_proc(const to_sample_params *p, int64_t r) {
    to_sample_proc q;
    q.hist0 = to_sample_i32(p->history_offsets, r, 0);
    q.nhist = p->history ? to_sample_i32(p->history_offsets, r + 1, 0) - q.hist0 : 0;
    q.nprompt = to_sample_i32(p->prompt_lens, r, 0);
    q.bias0 = to_sample_i32(p->bias_offsets, r, 0);
    q.nbias = p->bias_ids ? to_sample_i32(p->bias_offsets, r + 1, 0) - q.bias0 : 0;
    q.rep = to_sample_f32(p->repetition_penalty, r, 1.0f);
    q.presence = to_sample_f32(p->presence_penalty, r, 0.0f);
    q.frequency = to_sample_f32(p->frequency_penalty, r, 0.0f);
    q.ngram = to_sample_i32(p->no_repeat_ngram, r, 0);
    return q;
}

/* Whether the processors change anything: a bias, a penalty with a history to act on, or an
 * n-gram size the history is long enough for. */
static inline int to_sample_proc_active(const to_sample_proc *q) {
    int hist_penalty = q->rep != 1.0f || (q->nhist > q->nprompt && (q->presence != 0.0f || q->frequency != 0.0f));
    return q->nbias > 0 || (q->nhist > 0 && hist_penalty) || (q->ngram > 0 && q->nhist >= q->ngram);
}

/* What went wrong in a row, as kernels report it (the GPU's error word carries it too). */
enum {
    TO_SAMPLE_BAD_NAN = 1,         /* the logits hold NaN */
    TO_SAMPLE_BAD_POSINF = 2,      /* +inf */
    TO_SAMPLE_BAD_ALL_NEGINF = 3,  /* only -inf */
    TO_SAMPLE_BAD_PROC_NAN = 4,    /* the same three after the row's processors */
    TO_SAMPLE_BAD_PROC_POSINF = 5,
    TO_SAMPLE_BAD_PROC_NEGINF = 6,
};
/* The message for row r gone bad by `kind`, as this call's error. */
int to_sample_bad_row(const char *op, int64_t r, int kind, const char *where);

/* Runs a validated call on the CPU. Checks the logits as it reads them (before and after a row's
 * processors): a bad row fails (TO_ERR_INVALID_ARGUMENT naming the lowest such row; the outputs
 * are then unspecified). */
int to_cpu_sample(const to_sample_plan *plan);

#ifdef __cplusplus
}
#endif
#pragma GCC visibility pop

#endif
