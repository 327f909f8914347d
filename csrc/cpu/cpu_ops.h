/* cpu_ops.h - the CPU kernels behind the public ops. Arguments arrive validated by csrc/ops/. */
#ifndef TO_CPU_OPS_H
#define TO_CPU_OPS_H

#include "internal.h"

#pragma GCC visibility push(hidden)

int to_cpu_copy(const to_tensor *out, const to_tensor *x);
int to_cpu_fill(const to_tensor *out, double value);

#pragma GCC visibility pop

#endif
