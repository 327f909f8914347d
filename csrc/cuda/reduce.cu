// reduce.cu - argmax and top-k over the last dimension (to_argmax / to_topk; semantics in
// csrc/cpu/reduce.c). One block per row; the rows are all other dimensions flattened.
//
// Ranking, as on the CPU: NaN is larger than every number (as in torch), -0.0 equals +0.0, and
// ties (equal values, or two NaNs) go to the lower index. Both kernels rank by the CPU's 64-bit
// key: the high half is the value mapped to an unsigned integer that grows with it (NaN above
// +inf, -0.0 onto +0.0), the low half the complement of the index, so a larger key is a better
// entry and no two entries of a row have the same key.
//
// argmax: each thread keeps the best key of its elements, then a block reduction; rows longer
// than kArgmaxChunk are split over blocks first (argmax_chunks_kernel, argmax_pick_kernel).
//
// top-k: the k best entries of a row are found by radix selection on the keys and then sorted in
// shared memory, in chunks of at most kChunk output positions so any k up to the row length
// works without a global workspace. For the chunk of ranks [s, s + m):
//   1. select: the key of rank s + m - 1 (rank 0 the largest), 8 bits at a time from the top:
//      a 256-bin histogram of the next digit over the keys that share the digits chosen so far
//      picks the digit holding the wanted rank; once that digit holds a single key, one more pass
//      finds it (random data usually needs 3 or 4 passes over the row, not 8);
//   2. collect: the keys in [that key, the previous chunk's lowest key) are exactly the m keys of
//      the chunk (keys are unique) and go to shared memory;
//   3. bitonic sort, largest first, and write values and indices.
// The usual calls (sampling with k <= a few hundred, MoE routing) are one chunk: a few streaming
// passes over the row. Values written out are read back from x at the chosen indices (bits moved
// unchanged when values has x's dtype), so -0.0 and NaN payloads come out as they are in x.
#include "cuda/select.cuh"

namespace {

constexpr int kChunk = 2048; // output positions sorted at once in shared memory (16 KB of keys)

struct RowArgs {
    TensorView x, out, values, indices;
    int64_t rows, n, sx; // rows, row length, stride of x's last dimension
    int k;
};

// The entry key of element j of a row. Real keys are never 0 (order_key(-inf) = 0x007fffff is the
// smallest), so 0 can pad a sort.
__device__ __forceinline__ uint64_t entry_key(const char *x, int dtype, int64_t row_off, int64_t sx, int64_t j) {
    float v = to_load(x, dtype, row_off + j * sx);
    return (uint64_t)order_key(v) << 32 | (uint32_t)~(uint32_t)j;
}

// ===================================================================================== argmax

// (key, index) pairs: the better one has the larger key, or the same key and the lower index
__device__ __forceinline__ void keep_better(uint32_t &key, int64_t &idx, uint32_t k2, int64_t i2) {
    if (k2 > key || (k2 == key && i2 < idx)) {
        key = k2;
        idx = i2;
    }
}

__global__ void argmax_kernel(RowArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ uint32_t skey[32];
    __shared__ int64_t sidx[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
        const int64_t xo = to_row_offset_dev(a.x, row);
        // key 0 is below every real key, so the first element always replaces it
        uint32_t key = 0;
        int64_t idx = INT64_MAX;
        for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
            uint32_t kj = order_key(to_load(a.x.data, a.x.dtype, xo + j * a.sx));
            if (kj > key) { // strictly: this thread's elements come in index order, keep the first
                key = kj;
                idx = j;
            }
        }
        for (int o = 16; o > 0; o >>= 1)
            keep_better(key, idx, __shfl_xor_sync(0xffffffffu, key, o), __shfl_xor_sync(0xffffffffu, idx, o));
        if (lane == 0) {
            skey[warp] = key;
            sidx[warp] = idx;
        }
        __syncthreads();
        if (warp == 0) {
            key = lane < nwarps ? skey[lane] : 0;
            idx = lane < nwarps ? sidx[lane] : INT64_MAX;
            for (int o = 16; o > 0; o >>= 1)
                keep_better(key, idx, __shfl_xor_sync(0xffffffffu, key, o), __shfl_xor_sync(0xffffffffu, idx, o));
            if (lane == 0)
                ((int64_t *)a.out.data)[to_offset(a.out, row)] = idx;
        }
        __syncthreads(); // skey/sidx are reused by the next row
    }
}

// A long row (a vocabulary of logits) is too much for one block: chunks of kArgmaxChunk
// elements go to blocks of their own, each leaves its best entry as one 64-bit key
// (order_key << 32 | ~index, so the larger key is the better entry, ties to the lower index), and
// a second kernel picks each row's best key.
constexpr int64_t kArgmaxChunk = 4096;

__global__ void argmax_chunks_kernel(RowArgs a, uint64_t *best, int64_t chunks) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ uint64_t sbest[32];
    const int64_t row = blockIdx.y, j0 = blockIdx.x * kArgmaxChunk;
    const int64_t j1 = min(j0 + kArgmaxChunk, a.n), xo = to_row_offset_dev(a.x, row);
    uint64_t key = 0;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
        uint64_t kj = (uint64_t)order_key(to_load(a.x.data, a.x.dtype, xo + j * a.sx)) << 32 | (uint32_t)~(uint32_t)j;
        key = kj > key ? kj : key;
    }
    for (int o = 16; o > 0; o >>= 1) {
        uint64_t other = __shfl_xor_sync(0xffffffffu, key, o);
        key = other > key ? other : key;
    }
    if (threadIdx.x % 32 == 0)
        sbest[threadIdx.x / 32] = key;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)blockDim.x / 32; w++)
            key = sbest[w] > key ? sbest[w] : key;
        best[row * chunks + blockIdx.x] = key;
    }
}

__global__ void argmax_pick_kernel(RowArgs a, const uint64_t *best, int64_t chunks) {
    to_pdl_wait();
    to_pdl_trigger();
    const int64_t row = blockIdx.x;
    uint64_t key = 0;
    for (int64_t c = threadIdx.x; c < chunks; c += 32)
        key = best[row * chunks + c] > key ? best[row * chunks + c] : key;
    for (int o = 16; o > 0; o >>= 1) {
        uint64_t other = __shfl_xor_sync(0xffffffffu, key, o);
        key = other > key ? other : key;
    }
    if (threadIdx.x == 0)
        ((int64_t *)a.out.data)[to_offset(a.out, row)] = (int64_t)(uint32_t)~(uint32_t)key;
}

// ===================================================================================== top-k

__global__ void topk_kernel(RowArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ uint64_t buf[kChunk];
    __shared__ SelectShared sh;
    const int64_t svals = a.values.strides[a.values.ndim - 1], sidx = a.indices.strides[a.indices.ndim - 1];
    const bool same_dtype = a.values.dtype == a.x.dtype;
    const int xsize = a.x.dtype == TO_F32 ? 4 : 2;

    for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
        const int64_t xo = to_row_offset_dev(a.x, row);
        const int64_t vo = to_row_offset_dev(a.values, row), io = to_row_offset_dev(a.indices, row);
        uint64_t upper = 0; // the previous chunk's lowest key (unused for the first chunk)
        for (int64_t s = 0; s < a.k; s += kChunk) {
            const int m = (int)(a.k - s < kChunk ? a.k - s : kChunk);
            const uint64_t lo = select_rank([&](int64_t j) { return entry_key(a.x.data, a.x.dtype, xo, a.sx, j); },
                                            a.n, s + m - 1, sh);

            // collect the chunk's m keys (any order) and pad to a power of two with 0 (sorts last)
            if (threadIdx.x == 0)
                sh.count = 0;
            __syncthreads();
            for (int64_t j = threadIdx.x; j < a.n; j += blockDim.x) {
                uint64_t key = entry_key(a.x.data, a.x.dtype, xo, a.sx, j);
                if (key >= lo && (s == 0 || key < upper))
                    buf[atomicAdd(&sh.count, 1)] = key;
            }
            int p = 1;
            while (p < m)
                p <<= 1;
            for (int i = m + threadIdx.x; i < p; i += blockDim.x)
                buf[i] = 0;
            __syncthreads();
            bitonic_sort_desc(buf, p);

            for (int i = threadIdx.x; i < m; i += blockDim.x) {
                int64_t j = (int64_t)(uint32_t)~(uint32_t)buf[i];
                int64_t pos = s + i, src = xo + j * a.sx;
                if (same_dtype && xsize == 4)
                    ((uint32_t *)a.values.data)[vo + pos * svals] = ((const uint32_t *)a.x.data)[src];
                else if (same_dtype)
                    ((uint16_t *)a.values.data)[vo + pos * svals] = ((const uint16_t *)a.x.data)[src];
                else // f32 values of an f16/bf16 row: exact
                    ((float *)a.values.data)[vo + pos * svals] = to_load(a.x.data, a.x.dtype, src);
                if (a.indices.dtype == TO_I32)
                    ((int32_t *)a.indices.data)[io + pos * sidx] = (int32_t)j;
                else
                    ((int64_t *)a.indices.data)[io + pos * sidx] = j;
            }
            upper = lo;
            __syncthreads(); // buf and sh are reused by the next chunk
        }
    }
}

}  // namespace

extern "C" int to_cuda_argmax(const to_tensor *out, const to_tensor *x) {
    int64_t rows = to_num_rows(x), n = to_row_len(x);
    if (rows == 0 || n == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(out->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    RowArgs a = {};
    a.x = to_view(x);
    a.out = to_view(out);
    a.rows = rows;
    a.n = n;
    a.sx = to_row_stride_last(x);
    a.k = 1;
    int64_t chunks = to_ceil_div(n, kArgmaxChunk);
    if (chunks > 1 && n <= UINT32_MAX && rows <= 65535) {
        uint64_t *best = NULL;
        TO_TRY(to_cuda_alloc(out->device_index, rows * chunks * (int64_t)sizeof(uint64_t), (void **)&best));
        to_launch(argmax_chunks_kernel, dim3((unsigned)chunks, (unsigned)rows), dim3(256), 0, stream, a, best, chunks);
        to_launch(argmax_pick_kernel, dim3((unsigned)rows), dim3(32), 0, stream, a, (const uint64_t *)best, chunks);
        to_cuda_free(out->device_index, best); // stream-ordered: reused only by later work
        return to_cuda_check_launch("to_argmax");
    }
    int threads = n >= 8192 ? 1024 : n >= 1024 ? 256 : 64;
    int64_t blocks = rows < (1 << 30) ? rows : (1 << 30);
    to_launch(argmax_kernel, (unsigned)blocks, threads, 0, stream, a);
    return to_cuda_check_launch("to_argmax");
}

extern "C" int to_cuda_topk(const to_tensor *values, const to_tensor *indices, const to_tensor *x, int k) {
    int64_t rows = to_num_rows(x), n = to_row_len(x);
    if (rows == 0 || n == 0)
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(values->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    RowArgs a = {};
    a.x = to_view(x);
    a.values = to_view(values);
    a.indices = to_view(indices);
    a.rows = rows;
    a.n = n;
    a.sx = to_row_stride_last(x);
    a.k = k;
    // a long row is several passes of one block: use many threads for it
    int threads = n >= 16384 ? 1024 : n >= 2048 ? 512 : 128;
    int64_t blocks = rows < (1 << 30) ? rows : (1 << 30);
    to_launch(topk_kernel, (unsigned)blocks, threads, 0, stream, a);
    return to_cuda_check_launch("to_topk");
}
