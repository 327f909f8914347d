// device.cu - GPUs: count, a caching allocator, copies and synchronisation.
//
// The caching allocator keeps freed blocks in per-device free lists bucketed by rounded size,
// so steady-state decode never calls cudaMalloc/cudaFree (both synchronise the device).
// Sizes round up to 512 bytes below 1 MiB and to 2 MiB above, which bounds the waste while
// letting a freed block serve later requests of nearby sizes.
#include "cuda/common.cuh"

#include <cuda_runtime.h>
#include <stdlib.h>

#include <atomic>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr int kMaxDevices = 64;

struct DeviceCache {
    std::multimap<size_t, void *> free_blocks;    // size -> block
    std::unordered_map<void *, size_t> live_sizes; // block -> size, for blocks handed out
};

std::mutex cache_lock;
DeviceCache caches[kMaxDevices];
cudaStream_t streams[kMaxDevices]; // created on first use, never destroyed
std::mutex stream_lock;

int cuda_fail(cudaError_t err, const char *what) {
    return to_fail(TO_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

size_t round_size(int64_t nbytes) {
    size_t n = nbytes > 0 ? (size_t)nbytes : 1;
    size_t unit = n < (1u << 20) ? 512 : (2u << 20);
    return (n + unit - 1) / unit * unit;
}

int check_device(int device_index, const char *what) {
    int count = 0;
    to_cuda_count(&count);
    if (device_index < 0 || device_index >= count || device_index >= kMaxDevices)
        return to_fail(TO_ERR_DEVICE, "%s: no GPU with index %d (%d visible)", what, device_index, count);
    cudaError_t err = cudaSetDevice(device_index);
    return err == cudaSuccess ? TO_OK : cuda_fail(err, what);
}

// Returns every cached block of a device to the driver (used when cudaMalloc fails).
void release_cached(int device_index) {
    for (auto &kv : caches[device_index].free_blocks)
        cudaFree(kv.second);
    caches[device_index].free_blocks.clear();
}

}  // namespace

cudaStream_t to_cuda_stream(int device_index) {
    if (check_device(device_index, "cuda stream") != TO_OK)
        return nullptr;
    std::lock_guard<std::mutex> guard(stream_lock);
    if (!streams[device_index]) {
        cudaError_t err = cudaStreamCreateWithFlags(&streams[device_index], cudaStreamNonBlocking);
        if (err != cudaSuccess) {
            cuda_fail(err, "cudaStreamCreate");
            streams[device_index] = nullptr;
        }
    }
    return streams[device_index];
}

int to_cuda_check_launch(const char *op) {
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? TO_OK : cuda_fail(err, op);
}

extern "C" {

int to_cuda_compiled(void) { return 1; }

int to_cuda_count(int *out) {
    // Asked before every GPU op: counted once (GPUs do not come and go while a process runs).
    static std::atomic<int> count{-1};
    int n = count.load();
    if (n < 0) {
        // No driver or no GPU: report zero devices rather than an error.
        if (cudaGetDeviceCount(&n) != cudaSuccess) {
            cudaGetLastError();
            n = 0;
        }
        count.store(n);
    }
    *out = n;
    return TO_OK;
}

int to_cuda_alloc(int device_index, int64_t nbytes, void **out) {
    *out = nullptr;
    TO_TRY(check_device(device_index, "to_alloc"));
    size_t size = round_size(nbytes);
    std::lock_guard<std::mutex> guard(cache_lock);
    DeviceCache &cache = caches[device_index];
    auto it = cache.free_blocks.lower_bound(size);
    // reuse a cached block unless it is more than twice what was asked for; of the blocks of
    // that size, the one freed last (its memory is likeliest still in the GPU's L2)
    if (it != cache.free_blocks.end() && it->first <= 2 * size) {
        it = std::prev(cache.free_blocks.upper_bound(it->first));
        *out = it->second;
        cache.live_sizes[it->second] = it->first;
        cache.free_blocks.erase(it);
        return TO_OK;
    }
    void *p = nullptr;
    cudaError_t err = cudaMalloc(&p, size);
    if (err == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        release_cached(device_index);
        err = cudaMalloc(&p, size);
    }
    if (err != cudaSuccess) {
        cudaGetLastError();
        return to_fail(err == cudaErrorMemoryAllocation ? TO_ERR_OUT_OF_MEMORY : TO_ERR_CUDA,
                       "to_alloc: cannot allocate %lld bytes on cuda:%d: %s", (long long)nbytes,
                       device_index, cudaGetErrorString(err));
    }
    cache.live_sizes[p] = size;
    *out = p;
    return TO_OK;
}

int to_cuda_free(int device_index, void *ptr) {
    if (device_index < 0 || device_index >= kMaxDevices)
        return to_fail(TO_ERR_DEVICE, "to_free: no GPU with index %d", device_index);
    std::lock_guard<std::mutex> guard(cache_lock);
    DeviceCache &cache = caches[device_index];
    auto it = cache.live_sizes.find(ptr);
    if (it == cache.live_sizes.end())
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_free: %p was not allocated by to_alloc on cuda:%d",
                       ptr, device_index);
    cache.free_blocks.emplace(it->second, ptr);
    cache.live_sizes.erase(it);
    return TO_OK;
}

int to_cuda_sync(int device_index) {
    TO_TRY(check_device(device_index, "to_cuda_synchronize"));
    cudaError_t err = cudaDeviceSynchronize();
    return err == cudaSuccess ? TO_OK : cuda_fail(err, "to_cuda_synchronize");
}

int to_cuda_fetch(const to_tensor *t, to_tensor *host, void **buf) {
    *host = *t;
    *buf = nullptr;
    // the bytes from data to the farthest element (t is validated: non-negative strides)
    int64_t last = 0;
    for (int i = 0; i < t->ndim; i++)
        last += t->shape[i] > 0 ? (t->shape[i] - 1) * t->strides[i] : 0;
    int64_t nbytes = to_numel(t) ? to_dtype_bytes(t->dtype, last + 1) : 0;
    *buf = malloc(nbytes > 0 ? (size_t)nbytes : 1);
    if (!*buf)
        return to_fail(TO_ERR_OUT_OF_MEMORY, "cannot copy %lld bytes of a GPU tensor to the host",
                       (long long)nbytes);
    if (nbytes > 0)
        TO_TRY(to_cuda_memcpy(t->device_index, *buf, t->data, nbytes, 1));
    host->data = *buf;
    host->nbytes = nbytes;
    host->device = TO_CPU;
    host->device_index = 0;
    return TO_OK;
}

int to_cuda_memcpy(int device_index, void *dst, const void *src, int64_t nbytes, int kind) {
    TO_TRY(check_device(device_index, "to_copy"));
    static const cudaMemcpyKind kinds[] = {cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost,
                                           cudaMemcpyDeviceToDevice};
    if (kind < 0 || kind > 2)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_copy: bad copy kind %d", kind);
    // On the GPU's stream, after the kernels queued there, and finished before returning: the
    // host buffer may be reused (or read) as soon as we return.
    cudaStream_t stream = to_cuda_stream(device_index);
    if (!stream)
        return TO_ERR_CUDA;
    cudaError_t err = cudaMemcpyAsync(dst, src, (size_t)nbytes, kinds[kind], stream);
    if (err == cudaSuccess)
        err = cudaStreamSynchronize(stream);
    return err == cudaSuccess ? TO_OK : cuda_fail(err, "to_copy");
}

}  // extern "C"
