/* sample.h - the CPU kernel behind to_sample. */
#ifndef TO_CPU_SAMPLE_H
#define TO_CPU_SAMPLE_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* out[r] = the token drawn for row r of logits [B, V] (see to_sample in tensor_ops.h and
 * csrc/cpu/sample.c for the exact arithmetic). Arguments arrive validated by csrc/ops/sample.c:
 * CPU tensors, V >= 1, parameters [B] with valid values. Checks the logits as it reads them:
 * NaN, +inf, or a row of only -inf fails (TO_ERR_INVALID_ARGUMENT naming the lowest such row;
 * out is then unspecified). */
int to_cpu_sample(const to_tensor *out, const to_tensor *logits, const to_tensor *temperature,
                  const to_tensor *top_k, const to_tensor *top_p, const to_tensor *min_p,
                  const to_tensor *uniform);

#pragma GCC visibility pop

#endif
