/* copy.c - to_copy and to_fill: validation and device dispatch. */
#include "internal.h"
#include "cpu/cpu_ops.h"
#include "cpu/qmatmul.h"
#include "cuda/cuda_ops.h"

int to_copy(const to_tensor *out, const to_tensor *x) {
    TO_TRY(to_check_tensor(out, "to_copy", "out"));
    TO_TRY(to_check_tensor(x, "to_copy", "x"));
    TO_TRY(to_check_same_shape(out, x, "to_copy", "out", "x"));
    if (to_numel(out) == 0)
        return TO_OK;
    if ((to_is_x8(out->dtype) || to_is_x8(x->dtype)) && out->dtype != x->dtype) {
        /* The row-interleaved layouts are made from and read back into their plain type only. */
        int x8 = to_is_x8(out->dtype) ? out->dtype : x->dtype;
        if ((to_is_x8(out->dtype) ? x->dtype : out->dtype) != to_x8_base(x8))
            return to_fail(TO_ERR_DTYPE, "to_copy: cannot convert %s to %s: %s converts only to and "
                           "from %s", to_dtype_name(x->dtype), to_dtype_name(out->dtype),
                           to_dtype_name(x8), to_dtype_name(to_x8_base(x8)));
        if (!to_is_contiguous(out) || !to_is_contiguous(x))
            return to_fail(TO_ERR_INVALID_ARGUMENT, "to_copy: converting to or from %s needs "
                           "contiguous tensors", to_dtype_name(x8));
        TO_TRY(to_check_no_alias(out, x, 0, "to_copy", "out", "x"));
        TO_TRY(to_require_cpu(out, "to_copy"));
        TO_TRY(to_require_cpu(x, "to_copy"));
        return to_cpu_repack(out, x);
    }
    if ((to_is_quantized(out->dtype) || to_is_quantized(x->dtype)) && out->dtype != x->dtype) {
        /* Blocks are made from and read into f32 rows: the other side must be a float (or
         * quantized) dtype; integers would only reach the blocks through a lossy float. */
        const unsigned coded = TO_FLOAT_DTYPES | TO_QUANT_DTYPES;
        if (!(coded & TO_MASK(out->dtype)) || !(coded & TO_MASK(x->dtype)))
            return to_fail(TO_ERR_DTYPE, "to_copy: cannot convert %s to %s: quantized dtypes convert "
                           "only to and from float32, float16, bfloat16 and other quantized dtypes",
                           to_dtype_name(x->dtype), to_dtype_name(out->dtype));
        /* each chunk of a row is read whole before its blocks are written, but a (de)quantized
         * row is a different number of bytes, so an overlap would overwrite unread input */
        TO_TRY(to_check_no_alias(out, x, 0, "to_copy", "out", "x"));
        TO_TRY(to_check_writable(out, "to_copy", "out"));
    }
    if (out->device == TO_CPU && x->device == TO_CPU)
        return to_cpu_copy(out, x);
    if (out->device == TO_CUDA && x->device == TO_CUDA && out->device_index == x->device_index &&
        (out->dtype != x->dtype || !to_is_contiguous(out) || !to_is_contiguous(x))) {
        /* on one GPU: strided and converting copies run there */
        if (to_is_x8(x->dtype) || to_is_x8(out->dtype) || (to_is_quantized(out->dtype) && out->dtype != x->dtype))
            return to_fail(TO_ERR_UNSUPPORTED, "to_copy: on a GPU, block-quantized tensors are "
                           "dequantized and copied, not quantized or repacked (do that on the CPU)");
        TO_TRY(to_check_gpu_visible(out, "to_copy"));
        TO_TRY(to_check_writable(out, "to_copy", "out"));
        TO_TRY(to_check_no_alias(out, x, 1, "to_copy", "out", "x"));
        return to_cuda_copy(out, x);
    }
    /* Between the host and a GPU (or two GPUs) bytes move as they are: same dtype, contiguous,
     * one memcpy. */
    if (out->dtype != x->dtype || !to_is_contiguous(out) || !to_is_contiguous(x))
        return to_fail(TO_ERR_UNSUPPORTED, "to_copy: copies to or from a GPU need the same dtype "
                       "on both sides and contiguous tensors (convert on one side first)");
    int64_t nbytes = to_dtype_bytes(x->dtype, to_numel(x));
    if (out->device == TO_CUDA && x->device == TO_CPU)
        return to_cuda_memcpy(out->device_index, out->data, x->data, nbytes, 0);
    if (out->device == TO_CPU && x->device == TO_CUDA)
        return to_cuda_memcpy(x->device_index, out->data, x->data, nbytes, 1);
    if (out->device_index != x->device_index)
        return to_fail(TO_ERR_UNSUPPORTED, "to_copy: copies between two GPUs go through the host");
    TO_TRY(to_check_writable(out, "to_copy", "out"));
    TO_TRY(to_check_no_alias(out, x, 1, "to_copy", "out", "x"));
    return to_cuda_memcpy(out->device_index, out->data, x->data, nbytes, 2);
}

int to_fill(const to_tensor *out, double value) {
    TO_TRY(to_check_tensor(out, "to_fill", "out"));
    TO_TRY(to_check_dtype(out, TO_PLAIN_DTYPES, "to_fill", "out"));
    if (out->device == TO_CUDA) {
        TO_TRY(to_check_gpu_visible(out, "to_fill"));
        TO_TRY(to_check_writable(out, "to_fill", "out"));
        return to_cuda_fill(out, value);
    }
    return to_cpu_fill(out, value);
}
