/* embedding.c - to_embedding: validation and device dispatch.
 * Everything but the id values is checked here; the CPU kernel checks the ids (that needs their
 * data) before it writes anything. out must not overlap table or ids. */
#include "internal.h"
#include "cpu/embedding.h"
#include "cuda/cuda_ops.h"

#define OP "to_embedding"

int to_embedding(const to_tensor *out, const to_tensor *table, const to_tensor *ids) {
    TO_TRY(to_check_tensor(out, OP, "out"));
    TO_TRY(to_check_tensor(table, OP, "table"));
    TO_TRY(to_check_tensor(ids, OP, "ids"));

    TO_TRY(to_check_dtype(ids, TO_INDEX_DTYPES, OP, "ids"));
    TO_TRY(to_check_dtype(out, TO_PLAIN_DTYPES, OP, "out"));
    /* Any plain dtype is looked up as bytes; a conversion on the way is only done from floats or
     * quantized blocks to floats (an integer table converted through f32 would not be exact). A
     * quantized table (GGUF token embeddings) is dequantized row by row. */
    if (out->dtype != table->dtype) {
        TO_TRY(to_check_dtype(table, TO_FLOAT_DTYPES | TO_QUANT_DTYPES | TO_X8_DTYPES, OP,
                              "table (out has another dtype)"));
        TO_TRY(to_check_dtype(out, TO_FLOAT_DTYPES, OP, "out (table has another dtype)"));
    }

    TO_TRY(to_check_ndim(table, 2, OP, "table [V, D]"));
    TO_TRY(to_check_ndim(ids, 1, OP, "ids [T]"));
    TO_TRY(to_check_ndim(out, 2, OP, "out [T, D]"));
    TO_TRY(to_check_same_device(OP, out, table, ids, (const to_tensor *)NULL));

    int64_t T = ids->shape[0], D = table->shape[1];
    if (out->shape[0] != T || out->shape[1] != D)
        return to_fail(TO_ERR_SHAPE, OP ": out has shape [%lld, %lld], expected [T, D] = [%lld, %lld] "
                       "(ids has %lld entries, table rows have %lld values)",
                       (long long)out->shape[0], (long long)out->shape[1], (long long)T, (long long)D,
                       (long long)T, (long long)D);
    /* Threads write different rows: out must not reach one element twice, nor any input byte
     * (a lookup cannot work in place). */
    TO_TRY(to_check_writable(out, OP, "out"));
    TO_TRY(to_check_no_alias(out, table, 0, OP, "out", "table"));
    TO_TRY(to_check_no_alias(out, ids, 0, OP, "out", "ids"));

    if (out->device == TO_CUDA) {
        if (to_is_x8(table->dtype))
            return to_fail(TO_ERR_UNSUPPORTED, OP ": table is %s, a CPU layout", to_dtype_name(table->dtype));
        return to_cuda_embedding(out, table, ids); /* the kernel checks the ids (cuda_ops.h) */
    }
    return to_cpu_embedding(out, table, ids);
}
