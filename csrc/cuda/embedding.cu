// embedding.cu - table row lookup (to_embedding; semantics in csrc/cpu/embedding.c).
//
// out[t, :] = table[ids[t], :]. The ids were checked against the table on the host already.
//   - same dtype: elements moved as bits (any plain dtype, so integers and NaN payloads survive);
//   - float table into another float out: through f32, rounded to nearest even like to_store_f32;
//   - block-quantized table (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K): each element dequantized exactly as
//     csrc/cpu/quant.c does (the same products and sums in the same order, each rounded to f32,
//     never fused: __fmul_rn/__fadd_rn), so the rows are bit-identical to the CPU's.
// Grid: blocks take output rows; the threads of a block take the row's columns.
#include "cuda/common.cuh"
#include "cuda/quant.cuh"

namespace {

constexpr int kQK = 32;   // elements per block of Q8_0, Q4_0, Q4_1
constexpr int kQKK = 256; // elements per super-block of Q4_K, Q6_K
constexpr int kConvertLoads = 16; // a converted row's loads in flight per thread

struct EmbeddingArgs {
    TensorView out, table, ids;
    int64_t T, D;
    int quantized;           // table is block-quantized: rows dequantized
    int64_t table_row_bytes; // quantized table: bytes between rows (table strides are in elements)
    int elem_size;           // same-dtype copy: bytes per element (0: converted through f32)
    int64_t V;               // the table's rows
    unsigned long long *err; // the GPU's error word (common.cuh)
};

// Element e of the block-quantized row starting at `row` (blocks of bs elements, bb bytes).
__device__ __forceinline__ float dequant_row_element(int dtype, const uint8_t *row, int64_t e) {
    const int bs = dtype == TO_Q4_K || dtype == TO_Q6_K ? kQKK : kQK;
    const int bb = dtype == TO_Q8_0 ? 34 : dtype == TO_Q4_0 ? 18 : dtype == TO_Q4_1 ? 20 : dtype == TO_Q4_K ? 144 : 210;
    return to_dequant_element(dtype, row + (e / bs) * bb, (int)(e % bs));
}

__global__ void embedding_kernel(EmbeddingArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    const int64_t so = a.out.strides[1], st = a.table.strides[1];
    const bool same = a.elem_size > 0;
    for (int64_t t = blockIdx.x; t < a.T; t += gridDim.x) {
        const int64_t id = to_load_index_dev(a.ids.data, a.ids.dtype, t * a.ids.strides[0]);
        if (id < 0 || id >= a.V) { // skipped and reported, never read out of bounds
            if (threadIdx.x == 0)
                to_gpu_error(a.err, TO_GPU_ERR_EMBEDDING_ID, t, id, a.V);
            continue;
        }
        const int64_t oo = t * a.out.strides[0];
        if (a.quantized) {
            const uint8_t *row = (const uint8_t *)a.table.data + id * a.table_row_bytes;
            for (int64_t j = threadIdx.x; j < a.D; j += blockDim.x)
                to_store(a.out.data, a.out.dtype, oo + j * so, dequant_row_element(a.table.dtype, row, j));
        } else if (same) {
            const int64_t to = id * a.table.strides[0];
            for (int64_t j = threadIdx.x; j < a.D; j += blockDim.x) {
                int64_t dst = oo + j * so, src = to + j * st;
                switch (a.elem_size) {
                case 1: ((uint8_t *)a.out.data)[dst] = ((const uint8_t *)a.table.data)[src]; break;
                case 2: ((uint16_t *)a.out.data)[dst] = ((const uint16_t *)a.table.data)[src]; break;
                case 4: ((uint32_t *)a.out.data)[dst] = ((const uint32_t *)a.table.data)[src]; break;
                default: ((uint64_t *)a.out.data)[dst] = ((const uint64_t *)a.table.data)[src]; break;
                }
            }
        } else { // kConvertLoads elements per thread loaded before any is stored: one trip to memory
                 // for a row of up to blockDim.x * kConvertLoads elements (a store could alias the
                 // table, so the compiler kept each load after the store before it: a Qwen3-4B row
                 // took ten trips, 8 us)
            const int64_t to = id * a.table.strides[0];
            for (int64_t j0 = threadIdx.x; j0 < a.D; j0 += (int64_t)blockDim.x * kConvertLoads) {
                float v[kConvertLoads];
#pragma unroll
                for (int u = 0; u < kConvertLoads; u++) {
                    const int64_t j = j0 + (int64_t)u * blockDim.x;
                    v[u] = j < a.D ? to_load(a.table.data, a.table.dtype, to + j * st) : 0.0f;
                }
#pragma unroll
                for (int u = 0; u < kConvertLoads; u++) {
                    const int64_t j = j0 + (int64_t)u * blockDim.x;
                    if (j < a.D)
                        to_store(a.out.data, a.out.dtype, oo + j * so, v[u]);
                }
            }
        }
    }
}

}  // namespace

extern "C" int to_cuda_embedding(const to_tensor *out, const to_tensor *table, const to_tensor *ids) {
    int64_t T = out->shape[0], D = out->shape[1];
    if (T == 0 || D == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    EmbeddingArgs a = {};
    a.out = to_view(out);
    a.table = to_view(table);
    a.ids = to_view(ids);
    a.T = T;
    a.D = D;
    a.V = table->shape[0];
    if (!(a.err = to_cuda_error_word(out->device_index)))
        return TO_ERR_CUDA;
    a.quantized = to_is_quantized(table->dtype);
    a.table_row_bytes = 0;
    a.elem_size = 0;
    if (a.quantized) {
        // rows of whole blocks, contiguous within a row (as the CPU reads them); the row stride is
        // in elements, a whole number of blocks
        a.table_row_bytes = to_dtype_bytes(table->dtype, table->strides[0]);
    } else if (table->dtype == out->dtype) {
        a.elem_size = to_dtype_size(table->dtype);
    }
    int threads = D >= 512 ? 256 : D >= 128 ? 128 : 64;
    int64_t blocks = T < (1 << 30) ? T : (1 << 30);
    to_launch(embedding_kernel, (unsigned)blocks, threads, 0, stream, a);
    return to_cuda_check_launch("to_embedding");
}
