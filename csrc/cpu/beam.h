/* beam.h - the CPU kernel behind to_beam_topk, and the 64-bit candidate keys it shares with the
 * GPU kernel's description (csrc/cuda/beam.cu computes the same keys). */
#ifndef TO_CPU_BEAM_H
#define TO_CPU_BEAM_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* Arguments arrive validated by csrc/ops/beam.c (shapes, dtypes, devices, group bounds, k,
 * beam scores finite, suppressed ids < V). Checks the logits as it reads them: NaN, +inf or a
 * row of only -inf fails (TO_ERR_INVALID_ARGUMENT naming the lowest such logits row; the
 * outputs are then unspecified). */
int to_cpu_beam_topk(const to_tensor *scores, const to_tensor *ids, const to_tensor *logits,
                     const to_tensor *beam_scores, const to_tensor *groups, const to_tensor *suppress);

#pragma GCC visibility pop

#endif
