// device.cu - GPUs: count, a caching allocator, copies and synchronisation.
//
// The caching allocator keeps freed blocks in per-device free lists bucketed by rounded size,
// so steady-state decode never calls cudaMalloc/cudaFree (both synchronise the device).
// Sizes round up to 512 bytes below 1 MiB and to 2 MiB above, which bounds the waste while
// letting a freed block serve later requests of nearby sizes.
#include "cuda/common.cuh"

#include <stdio.h>

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

// A recorded graph, instantiated, with the blocks it keeps from the free lists.
struct Graph {
    int device_index;
    cudaGraphExec_t exec;
    std::vector<std::pair<size_t, void *>> held;
};

struct DeviceCache {
    std::multimap<size_t, void *> free_blocks;    // size -> block
    std::unordered_map<void *, size_t> live_sizes; // block -> size, for blocks handed out
    // while a graph is being recorded: the blocks freed meanwhile, which its kernels may use
    bool recording = false;
    std::vector<std::pair<size_t, void *>> held;
    // graphs dropped while another is recorded (a garbage collection can run in the middle of a
    // forward): destroying waits for the stream, which would break the recording, so they go
    // when it ends
    std::vector<Graph *> dropped;
};

std::mutex cache_lock;
DeviceCache caches[kMaxDevices];
cudaStream_t streams[kMaxDevices]; // created on first use, never destroyed
std::mutex stream_lock;

int cuda_fail(cudaError_t err, const char *what) {
    // reported here, so cleared: the runtime would otherwise keep it as the last error and the
    // next launch's check (to_cuda_check_launch) would raise it again, for an op that worked
    // (sticky errors, a broken context, stay whatever this does)
    cudaGetLastError();
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

unsigned long long *to_cuda_error_word(int device_index) {
    static unsigned long long *words[kMaxDevices];
    if (check_device(device_index, "cuda error word") != TO_OK)
        return nullptr;
    std::lock_guard<std::mutex> guard(stream_lock);
    if (!words[device_index]) {
        void *p = nullptr;
        if (cudaMalloc(&p, 4 * sizeof(unsigned long long)) != cudaSuccess ||
            cudaMemset(p, 0, 4 * sizeof(unsigned long long)) != cudaSuccess) {
            cuda_fail(cudaGetLastError(), "cuda error word");
            return nullptr;
        }
        words[device_index] = static_cast<unsigned long long *>(p);
    }
    return words[device_index];
}

// Copies between pageable host memory and a GPU go through a pinned staging buffer per GPU, in
// chunks: a copy from or to pageable memory cost ~0.4 ms of host time each on the lent H200's
// sandbox (a decode step makes several), and large transfers run at pinned speed.
// Copies to the GPU do not wait: the source is in the staging buffer when the call returns, and
// the GPU reads it in stream order. The buffer is filled front to back (staging_used[] bytes
// are in flight) and only when the next chunk does not fit is the stream waited for and the
// buffer started again, so a decode step's handful of small uploads costs no synchronisation.
// A copy to the host waits (its caller reads the result), after which nothing is in flight.
constexpr size_t kStagingBytes = 8u << 20;
char *staging[kMaxDevices];
size_t staging_used[kMaxDevices];
std::mutex staging_lock; // one copy through a GPU's buffer at a time

static cudaError_t copy_through_staging(int device_index, cudaStream_t stream, void *dst, const void *src,
                                        int64_t nbytes, bool to_device) {
    std::lock_guard<std::mutex> guard(staging_lock);
    if (!staging[device_index]) {
        cudaError_t err = cudaHostAlloc(&staging[device_index], kStagingBytes, cudaHostAllocDefault);
        if (err != cudaSuccess) {
            staging[device_index] = nullptr;
            return err;
        }
        staging_used[device_index] = 0;
    }
    size_t &used = staging_used[device_index];
    for (int64_t off = 0; off < nbytes; off += (int64_t)kStagingBytes) {
        size_t n = (size_t)(nbytes - off < (int64_t)kStagingBytes ? nbytes - off : (int64_t)kStagingBytes);
        size_t at = (used + 15) / 16 * 16;
        if (!to_device || at + n > kStagingBytes) { // reuse from the start once the GPU is done with it
            cudaError_t err = cudaStreamSynchronize(stream);
            if (err != cudaSuccess)
                return err;
            at = 0;
        }
        char *stage = staging[device_index] + at;
        if (to_device)
            memcpy(stage, (const char *)src + off, n);
        cudaError_t err = cudaMemcpyAsync(to_device ? (char *)dst + off : stage,
                                          to_device ? stage : (const char *)src + off, n,
                                          to_device ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost, stream);
        if (err == cudaSuccess && !to_device)
            err = cudaStreamSynchronize(stream);
        if (err != cudaSuccess)
            return err;
        if (to_device) {
            used = at + n;
        } else {
            memcpy((char *)dst + off, stage, n);
            used = 0;
        }
    }
    return cudaSuccess;
}

// Times each GPU's error word was cleared (by take_error or a readback's wait). A readback
// copies the word along with its bytes; when its wait finds an error there but the word has been
// cleared since the read started, the clearing call has already reported that error (a recorded
// error stays in the word until cleared: the first one is kept), so it is not raised twice.
static std::atomic<unsigned long long> error_clears[kMaxDevices];

// The error a GPU recorded, w = the error word's 4 values (code, a, b, c), as this call's error.
static int gpu_error(const unsigned long long w[4]) {
    long long a = (long long)w[1], b = (long long)w[2], c = (long long)w[3];
    const char *pre = "a GPU op found a bad index (reported at the next synchronisation)";
    switch (w[0]) {
    case TO_GPU_ERR_EMBEDDING_ID:
        return to_fail(TO_ERR_BOUNDS, "%s: to_embedding: ids[%lld] = %lld is outside [0, %lld) (the "
                       "table's rows); its row was not written", pre, a, b, c);
    case TO_GPU_ERR_SLOT:
        return to_fail(TO_ERR_BOUNDS, "%s: to_kv_cache_store: slot_mapping[%lld] = %lld is not below "
                       "num_blocks * block_size = %lld; that token was not stored", pre, a, b, c);
    case TO_GPU_ERR_ROPE_KV_SLOT:
        return to_fail(TO_ERR_BOUNDS, "%s: to_rope_kv_store: slot_mapping[%lld] = %lld is not below "
                       "num_blocks * block_size = %lld; that token's k and v were not stored (its "
                       "heads were still rotated into out)", pre, a, b, c);
    case TO_GPU_ERR_ROPE_KV_ATTN_SLOT:
        return to_fail(TO_ERR_INVALID_ARGUMENT, "%s: to_rope_kv_attention: slot_mapping[%lld] = %lld is not the "
                       "slot %lld that block_tables gives its position; nothing was stored and out was not "
                       "written", pre, a, b, c);
    case TO_GPU_ERR_BATCH: {
        static const char *what[] = {"", "cu_seqlens_q is not non-decreasing from 0 to T there",
                                     "context_lens is less than its queries",
                                     "context_lens needs more blocks than block_tables has",
                                     "block_tables holds a block outside [0, num_blocks)"};
        return to_fail(TO_ERR_BOUNDS, "%s: to_paged_attention: sequence %lld: %s (value %lld); its "
                       "output rows were not written", pre, a, b >= 1 && b <= 4 ? what[b] : "bad batch", c);
    }
    case TO_GPU_ERR_LOGITS: { // the CPU's words for the same rows (to_sample_bad_row)
        char where[160];
        snprintf(where, sizeof where, " (found on the GPU, reported at the next synchronisation; out[%lld] "
                 "was set to -1)", a);
        return to_sample_bad_row(c ? "to_sample_pipeline" : "to_sample", a, (int)b, where);
    }
    case TO_GPU_ERR_BEAM_LOGITS: { // the CPU's words for the same rows
        static const char *what[] = {"is bad", "holds NaN", "holds +inf (logits must be finite or -inf)",
                                     "is all -inf (no token has a probability)"};
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_beam_topk: logits row %lld %s (found on the GPU, "
                       "reported at the next synchronisation; that call's candidates are unspecified)", a,
                       b >= 1 && b <= 3 ? what[b] : what[0]);
    }
    }
    return to_fail(TO_ERR_INTERNAL, "%s: unknown GPU error code %llu", pre, w[0]);
}

// Reads (and clears) the error word of a GPU after its stream has finished; an index error a
// kernel recorded becomes this call's error.
static int take_error(int device_index, cudaStream_t stream) {
    unsigned long long *word = to_cuda_error_word(device_index), w[4];
    if (!word)
        return TO_ERR_CUDA;
    cudaError_t err = copy_through_staging(device_index, stream, w, word, sizeof w, false);
    if (err != cudaSuccess)
        return cuda_fail(err, "reading the GPU's error word");
    if (w[0] == TO_GPU_ERR_NONE)
        return TO_OK;
    cudaMemsetAsync(word, 0, sizeof w, stream);
    error_clears[device_index]++;
    return gpu_error(w);
}

int to_cuda_sm_count(int device_index) {
    static int cached[64];
    if (device_index < 0 || device_index >= 64)
        return 132;
    if (!cached[device_index]) {
        int v = 0;
        if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device_index) != cudaSuccess || v <= 0)
            v = 132;
        cached[device_index] = v;
    }
    return cached[device_index];
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
    if (cache.recording)
        cache.held.emplace_back(it->second, ptr);
    else
        cache.free_blocks.emplace(it->second, ptr);
    cache.live_sizes.erase(it);
    return TO_OK;
}

int to_cuda_sync(int device_index) {
    TO_TRY(check_device(device_index, "to_cuda_synchronize"));
    cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess)
        return cuda_fail(err, "to_cuda_synchronize");
    cudaStream_t stream = to_cuda_stream(device_index);
    return stream ? take_error(device_index, stream) : TO_ERR_CUDA;
}


int to_cuda_memcpy(int device_index, void *dst, const void *src, int64_t nbytes, int kind) {
    TO_TRY(check_device(device_index, "to_copy"));
    if (kind < 0 || kind > 2)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_copy: bad copy kind %d", kind);
    // On the GPU's stream, after the kernels queued there. The host buffer may be reused (or
    // read) as soon as we return: a copy to the host has finished, one from it sits in the
    // staging buffer until the GPU takes it. A copy on the GPU is queued like a kernel: the host
    // does not wait for it, and a graph being recorded records it.
    cudaStream_t stream = to_cuda_stream(device_index);
    if (!stream)
        return TO_ERR_CUDA;
    cudaError_t err = cudaSuccess;
    if (kind == 2) {
        err = cudaMemcpyAsync(dst, src, (size_t)nbytes, cudaMemcpyDeviceToDevice, stream);
    } else {
        err = copy_through_staging(device_index, stream, dst, src, nbytes, kind == 0);
    }
    if (err != cudaSuccess)
        return cuda_fail(err, "to_copy");
    // a copy to the host is where results are looked at: errors the GPU's kernels recorded
    // since the last such point surface here
    return kind == 1 ? take_error(device_index, stream) : TO_OK;
}

int to_cuda_graph_begin(int device_index) {
    cudaStream_t stream = to_cuda_stream(device_index);
    // made now: recording must not allocate or clear them
    if (!stream || !to_cuda_error_word(device_index))
        return TO_ERR_CUDA;
    {
        std::lock_guard<std::mutex> guard(cache_lock);
        if (caches[device_index].recording)
            return to_fail(TO_ERR_INVALID_ARGUMENT, "to_cuda_graph_begin: cuda:%d is already recording",
                           device_index);
        caches[device_index].recording = true;
    }
    // relaxed: the caching allocator may still cudaMalloc while the ops are recorded
    cudaError_t err = cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed);
    if (err != cudaSuccess) {
        std::lock_guard<std::mutex> guard(cache_lock);
        caches[device_index].recording = false;
        return cuda_fail(err, "to_cuda_graph_begin");
    }
    return TO_OK;
}

int to_cuda_graph_end(int device_index, void **graph) {
    *graph = nullptr;
    cudaStream_t stream = to_cuda_stream(device_index);
    if (!stream)
        return TO_ERR_CUDA;
    Graph *g = new Graph{device_index, nullptr, {}};
    std::vector<Graph *> dropped;
    {
        std::lock_guard<std::mutex> guard(cache_lock);
        caches[device_index].recording = false;
        g->held.swap(caches[device_index].held);
        dropped.swap(caches[device_index].dropped);
    }
    cudaGraph_t recorded = nullptr;
    cudaError_t err = cudaStreamEndCapture(stream, &recorded);
    for (Graph *d : dropped)
        to_cuda_graph_destroy(d);
    if (err == cudaSuccess)
        err = cudaGraphInstantiate(&g->exec, recorded, 0);
    if (recorded)
        cudaGraphDestroy(recorded);
    if (err != cudaSuccess) {
        to_cuda_graph_destroy(g);
        return cuda_fail(err, "to_cuda_graph_end (an op that waits for the GPU was recorded?)");
    }
    *graph = g;
    return TO_OK;
}

int to_cuda_graph_launch(void *graph) {
    if (!graph)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_cuda_graph_launch: graph is NULL");
    Graph *g = static_cast<Graph *>(graph);
    cudaStream_t stream = to_cuda_stream(g->device_index);
    if (!stream)
        return TO_ERR_CUDA;
    cudaError_t err = cudaGraphLaunch(g->exec, stream);
    return err == cudaSuccess ? TO_OK : cuda_fail(err, "to_cuda_graph_launch");
}

int to_cuda_graph_destroy(void *graph) {
    if (!graph)
        return TO_OK;
    Graph *g = static_cast<Graph *>(graph);
    {
        std::lock_guard<std::mutex> guard(cache_lock);
        if (caches[g->device_index].recording) {
            caches[g->device_index].dropped.push_back(g);
            return TO_OK;
        }
    }
    // a launch may still be running: the held blocks go back once it is done
    cudaStream_t stream = to_cuda_stream(g->device_index);
    if (stream)
        cudaStreamSynchronize(stream);
    if (g->exec)
        cudaGraphExecDestroy(g->exec);
    {
        std::lock_guard<std::mutex> guard(cache_lock);
        for (auto &b : g->held)
            caches[g->device_index].free_blocks.emplace(b.first, b.second);
    }
    delete g;
    return TO_OK;
}

}  // extern "C"

// ---- asynchronous reads (to_readback_*) ----
// A read owns pinned host memory (the bytes, then a copy of the error word) and an event recorded
// on the GPU's stream behind both copies. Its wait blocks on that event alone, so the work queued
// after the start (the next decode step) keeps the GPU busy meanwhile. The memory is its own, not
// the staging buffer's: uploads queued while the read is in flight refill that buffer from the
// front. Reads that are done go back to a per-GPU pool, so steady decoding neither allocates
// pinned memory (slow, and it synchronises) nor creates events.
namespace {

constexpr size_t kWordBytes = 4 * sizeof(unsigned long long);

struct Readback {
    int device_index;
    cudaEvent_t done;
    char *pinned;              // [capacity]: the bytes, then the error word's copy at word_at
    size_t capacity, word_at;
    unsigned long long clears; // error_clears[device_index] when the read started
};

std::mutex readback_lock;
std::vector<Readback *> readback_pool[kMaxDevices];

Readback *pooled_read(int device_index) {
    std::lock_guard<std::mutex> guard(readback_lock);
    std::vector<Readback *> &pool = readback_pool[device_index];
    if (pool.empty())
        return new Readback{device_index, nullptr, nullptr, 0, 0, 0};
    Readback *rb = pool.back();
    pool.pop_back();
    return rb;
}

// A read given back may still be landing (released unread): the next start queues its copies
// behind it on the same stream, and growing its memory waits for it first.
void give_back(Readback *rb) {
    std::lock_guard<std::mutex> guard(readback_lock);
    readback_pool[rb->device_index].push_back(rb);
}

// Room for nbytes and the error word in rb's pinned memory.
cudaError_t reserve(Readback *rb, int64_t nbytes) {
    rb->word_at = ((size_t)nbytes + 15) / 16 * 16;
    size_t need = rb->word_at + kWordBytes;
    if (rb->capacity >= need)
        return cudaSuccess;
    if (rb->pinned) {
        cudaEventSynchronize(rb->done);
        cudaFreeHost(rb->pinned);
        rb->pinned = nullptr;
        rb->capacity = 0;
    }
    size_t cap = need < 4096 ? 4096 : need;
    cudaError_t err = cudaHostAlloc((void **)&rb->pinned, cap, cudaHostAllocDefault);
    if (err != cudaSuccess) {
        rb->pinned = nullptr;
        return err;
    }
    rb->capacity = cap;
    return cudaSuccess;
}

// The error in a finished read's copy of the error word, raised unless the word was cleared
// since the read started (whoever cleared it reported it). Clearing it here is queued behind the
// work started since the read: that work found the word set, so it recorded nothing (the first
// error is kept) and nothing is lost.
int read_error(const Readback *rb) {
    const unsigned long long *w = (const unsigned long long *)(rb->pinned + rb->word_at);
    if (w[0] == TO_GPU_ERR_NONE)
        return TO_OK;
    unsigned long long seen = rb->clears;
    if (!error_clears[rb->device_index].compare_exchange_strong(seen, seen + 1))
        return TO_OK;
    cudaStream_t stream = to_cuda_stream(rb->device_index);
    unsigned long long *word = to_cuda_error_word(rb->device_index);
    if (stream && word)
        cudaMemsetAsync(word, 0, kWordBytes, stream);
    unsigned long long copy[4] = {w[0], w[1], w[2], w[3]};
    return gpu_error(copy);
}

}  // namespace

extern "C" {

int to_cuda_readback_start(int device_index, const void *src, int64_t nbytes, void **out) {
    *out = nullptr;
    TO_TRY(check_device(device_index, "to_readback_start"));
    cudaStream_t stream = to_cuda_stream(device_index);
    unsigned long long *word = to_cuda_error_word(device_index);
    if (!stream || !word)
        return TO_ERR_CUDA;
    {
        std::lock_guard<std::mutex> guard(cache_lock);
        if (caches[device_index].recording)
            return to_fail(TO_ERR_INVALID_ARGUMENT, "to_readback_start: cuda:%d is recording a graph "
                           "(read its results after launching it)", device_index);
    }
    Readback *rb = pooled_read(device_index);
    cudaError_t err = rb->done ? cudaSuccess : cudaEventCreateWithFlags(&rb->done, cudaEventDisableTiming);
    if (err == cudaSuccess)
        err = reserve(rb, nbytes);
    // counted before the copy of the word is queued: a clear queued between the two would then
    // only defer an error in the copy to the next read, never report it twice
    rb->clears = error_clears[device_index].load();
    if (err == cudaSuccess && nbytes > 0)
        err = cudaMemcpyAsync(rb->pinned, src, (size_t)nbytes, cudaMemcpyDeviceToHost, stream);
    if (err == cudaSuccess)
        err = cudaMemcpyAsync(rb->pinned + rb->word_at, word, kWordBytes, cudaMemcpyDeviceToHost, stream);
    if (err == cudaSuccess)
        err = cudaEventRecord(rb->done, stream);
    if (err != cudaSuccess) {
        give_back(rb);
        return cuda_fail(err, "to_readback_start");
    }
    *out = rb;
    return TO_OK;
}

int to_cuda_readback_wait(void *read, void *dst, int64_t nbytes) {
    Readback *rb = static_cast<Readback *>(read);
    int status = check_device(rb->device_index, "to_readback_wait");
    if (status == TO_OK) {
        cudaError_t err = cudaEventSynchronize(rb->done);
        if (err != cudaSuccess) {
            status = cuda_fail(err, "to_readback_wait");
        } else {
            if (nbytes > 0)
                memcpy(dst, rb->pinned, (size_t)nbytes);
            status = read_error(rb);
        }
    }
    give_back(rb);
    return status;
}

void to_cuda_readback_release(void *read) { give_back(static_cast<Readback *>(read)); }

}  // extern "C"
