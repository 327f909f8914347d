// kv_copy.cu - to_kv_copy_blocks on a GPU: copy-on-write of paged KV cache blocks.
//
// One launch copies every pair of up to kMaxCaches caches: block (pair, cache) of the grid moves
// one cache block, in 16-byte words where the caches and the block size allow it. The ids were
// checked on the host (csrc/ops/kv_copy.c: in range, the pairs independent) and travel in the
// launch's arguments with the caches' addresses, so nothing is uploaded or waited for. The launch
// is queued on the caches' stream like every op: it copies after the writes queued before it
// (the previous step's keys and values) and before the step that writes the copies.
#include "cuda/common.cuh"

namespace {

constexpr int kMaxCaches = 64; // a model's k and v of 32 layers per launch
constexpr int kMaxPairs = 256;

struct CopyArgs {
    char *cache[kMaxCaches];
    int32_t src[kMaxPairs], dst[kMaxPairs];
    int64_t block_bytes;
};
static_assert(sizeof(CopyArgs) <= 4096, "kernel arguments are limited to 4 KB");

// grid (pairs, caches): block (i, c) copies block src[i] of cache c onto its block dst[i]
template <typename Word>
__global__ void copy_blocks_kernel(CopyArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    const int64_t n = a.block_bytes / (int64_t)sizeof(Word);
    const Word *s = (const Word *)(a.cache[blockIdx.y] + (int64_t)a.src[blockIdx.x] * a.block_bytes);
    Word *d = (Word *)(a.cache[blockIdx.y] + (int64_t)a.dst[blockIdx.x] * a.block_bytes);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x)
        d[i] = s[i];
}

// element i of a CPU i32/i64 tensor [P]
int64_t id_at(const to_tensor *t, int64_t i) {
    return t->dtype == TO_I32 ? (int64_t)((const int32_t *)t->data)[i * t->strides[0]]
                              : ((const int64_t *)t->data)[i * t->strides[0]];
}

} // namespace

extern "C" int to_cuda_kv_copy_blocks(const to_tensor *caches, int num_caches, const to_tensor *src,
                                      const to_tensor *dst) {
    const to_tensor *c0 = &caches[0];
    if (c0->shape[0] > INT32_MAX)
        return to_fail(TO_ERR_UNSUPPORTED, "to_kv_copy_blocks: caches of %lld blocks (at most 2^31 - 1 "
                       "on a GPU)", (long long)c0->shape[0]);
    cudaStream_t stream = to_cuda_stream(c0->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    CopyArgs a = {};
    a.block_bytes = to_dtype_bytes(c0->dtype, to_numel(c0) / c0->shape[0]);
    // the widest word that every cache's start and the block size are multiples of
    uintptr_t align = (uintptr_t)a.block_bytes;
    for (int c = 0; c < num_caches; c++)
        align |= (uintptr_t)caches[c].data;
    const int word = align % 16 == 0 ? 16 : align % 4 == 0 ? 4 : 1;
    const int threads = a.block_bytes / word >= 1024 ? 256 : 64;
    const int64_t P = src->shape[0];
    for (int c0i = 0; c0i < num_caches; c0i += kMaxCaches) {
        const int nc = num_caches - c0i < kMaxCaches ? num_caches - c0i : kMaxCaches;
        for (int c = 0; c < nc; c++)
            a.cache[c] = (char *)caches[c0i + c].data;
        for (int64_t p0 = 0; p0 < P; p0 += kMaxPairs) {
            const int np = (int)(P - p0 < kMaxPairs ? P - p0 : kMaxPairs);
            for (int i = 0; i < np; i++) {
                a.src[i] = (int32_t)id_at(src, p0 + i);
                a.dst[i] = (int32_t)id_at(dst, p0 + i);
            }
            dim3 grid((unsigned)np, (unsigned)nc);
            if (word == 16)
                to_launch(copy_blocks_kernel<uint4>, grid, dim3(threads), 0, stream, a);
            else if (word == 4)
                to_launch(copy_blocks_kernel<uint32_t>, grid, dim3(threads), 0, stream, a);
            else
                to_launch(copy_blocks_kernel<uint8_t>, grid, dim3(threads), 0, stream, a);
            TO_TRY(to_cuda_check_launch("to_kv_copy_blocks"));
        }
    }
    return TO_OK;
}
