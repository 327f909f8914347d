/* rope.h - the CPU kernels behind to_rope and to_rms_norm_rope. */
#ifndef TO_CPU_ROPE_H
#define TO_CPU_ROPE_H

#include "internal.h"

#pragma GCC visibility push(hidden)

/* Rotary embedding of x [T, H, D] into out [T, H, D] (see to_rope in tensor_ops.h).
 * Arguments arrive validated by csrc/ops/rope.c: CPU tensors; x and out float dtypes of one
 * shape, out free of self-overlap and either exactly x's view (in place) or disjoint from it;
 * positions [T] i32/i64; inv_freq [rotary_dim / 2] f32; rotary_dim even, 0 < rotary_dim <= D;
 * attention_scaling finite. Fails only when scratch memory cannot be had. */
int to_cpu_rope(const to_tensor *out, const to_tensor *x, const to_tensor *positions,
                const to_tensor *inv_freq, int rotary_dim, int interleaved, double attention_scaling);

/* Per-head RMSNorm of x [T, H, D] by weight [D] (any float dtype), then the rotation above, the
 * normalised head held in f32 in between (see to_rms_norm_rope in tensor_ops.h). Arguments as
 * for to_cpu_rope, validated by csrc/ops/rope.c, plus weight [D] disjoint from out and eps >= 0,
 * finite. Fails only when scratch memory cannot be had. */
int to_cpu_rms_norm_rope(const to_tensor *out, const to_tensor *x, const to_tensor *weight, double eps,
                         const to_tensor *positions, const to_tensor *inv_freq, int rotary_dim,
                         int interleaved, double attention_scaling);

#pragma GCC visibility pop

#endif
