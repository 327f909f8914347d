// kv_store.cuh - writing new keys and values into the paged KV cache, shared by the kernels that
// do it: kv_store_kernel (to_kv_cache_store, attention.cu) and the rope kernels when they store
// the k heads they rotate (to_rope_kv_store, rope.cu).
//
// The caches [num_blocks, block_size, Hkv, D] are contiguous and of one dtype, so token t's head
// h of slot s starts at element (s * Hkv + h) * D. The slot is checked here, on the GPU (the host
// never reads slot_mapping; common.cuh, "index values checked on the GPU"): a negative one skips
// its token (padding), one past the caches is skipped and recorded. Values are converted to the
// cache dtype by to_store (round to nearest even).
#pragma once

#include "cuda/common.cuh"

struct KvStore {
    char *k_cache, *v_cache;
    int cache_dtype;
    const char *v; // v [T, Hkv, D], any strides
    int v_dtype;
    int64_t vs0, vs1, vs2;
    const char *slots;
    int slot_dtype;
    int64_t slot_stride;
    int Hkv, D;
    int64_t num_slots;       // num_blocks * block_size
    unsigned long long *err; // the GPU's error word
    int err_code;            // what a bad slot is recorded as (names the op)
};

// The store of v into the caches (validated tensors; k's source is the kernel's own business).
inline int kv_store_init(KvStore *s, const to_tensor *k_cache, const to_tensor *v_cache, const to_tensor *v,
                         const to_tensor *slot_mapping, int err_code) {
    s->k_cache = (char *)k_cache->data;
    s->v_cache = (char *)v_cache->data;
    s->cache_dtype = k_cache->dtype;
    s->v = (const char *)v->data;
    s->v_dtype = v->dtype;
    s->vs0 = v->strides[0], s->vs1 = v->strides[1], s->vs2 = v->strides[2];
    s->slots = (const char *)slot_mapping->data;
    s->slot_dtype = slot_mapping->dtype;
    s->slot_stride = slot_mapping->strides[0];
    s->Hkv = (int)k_cache->shape[2];
    s->D = (int)k_cache->shape[3];
    s->num_slots = k_cache->shape[0] * k_cache->shape[1];
    s->err_code = err_code;
    s->err = to_cuda_error_word(k_cache->device_index);
    return s->err ? TO_OK : TO_ERR_CUDA;
}

// Token t's slot, or -1 when it is not stored: a negative slot (padding), or one past the caches,
// which the thread with `report` set records (one thread per token suffices: the first error
// recorded is kept).
__device__ __forceinline__ int64_t kv_slot(const KvStore &s, int64_t t, bool report) {
    const int64_t slot = to_load_index_dev(s.slots, s.slot_dtype, t * s.slot_stride);
    if (slot >= s.num_slots) {
        if (report)
            to_gpu_error(s.err, s.err_code, t, slot, s.num_slots);
        return -1;
    }
    return slot < 0 ? -1 : slot;
}

// Element offset of head h of `slot` in either cache.
__device__ __forceinline__ int64_t kv_row(const KvStore &s, int64_t slot, int64_t h) {
    return (slot * s.Hkv + h) * s.D;
}

// v[t, h, d], as f32
__device__ __forceinline__ float kv_load_v(const KvStore &s, int64_t t, int64_t h, int64_t d) {
    return to_load(s.v, s.v_dtype, t * s.vs0 + h * s.vs1 + d * s.vs2);
}
