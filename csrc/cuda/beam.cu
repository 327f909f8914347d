// beam.cu - to_beam_topk on a GPU: one beam-search step's candidates computed where the logits
// are, so only the [G, K] scores and ids cross to the host.
//
// Semantics are to_cpu_beam_topk's (csrc/cpu/beam.c): the same values ((x - m) - ln s) + score
// in f32 operations (s summed in f64; CUDA's expf and log differ from libm's in the last bit
// sometimes, so a value may differ from the CPU's by an ulp or so and two candidates that close
// may swap), ranked by the same 64-bit keys: order_key(value) << 32 | ~(b * V + t), a larger key
// a better candidate, unique within a group.
//
// Two kernels, per launch of up to kMaxGroups groups / kMaxRows rows (the groups' rows, beam
// scores and suppressed ids travel in the arguments):
//  1. rows_kernel, one block per (beam row, group): the row's max and sum of exponentials
//     (checking the logits: NaN, +inf or a row of only -inf is recorded in the GPU's error word,
//     TO_GPU_ERR_BEAM_LOGITS, and its keys are left 0), then its kr = min(k, V) best keys by
//     radix selection: the key of rank kr - 1 is found 8 bits at a time from the top (a 256-bin
//     histogram of the next digit over the keys sharing the digits chosen so far; once that digit
//     holds a single key, one more pass finds it), the keys at or above it are gathered in shared
//     memory and bitonic-sorted, and written to a workspace;
//  2. groups_kernel, one block per group: the same selection over the group's rows * kr keys in
//     the workspace gives its k best, written out with -inf / -1 past k.
#include "cuda/select.cuh"

#include <math.h>

namespace {

constexpr int kMaxGroups = 32;  // groups per launch
constexpr int kMaxRows = 256;   // beam rows per launch (a group has at most this many)
constexpr int kMaxSup = 128;    // suppressed ids per launch (a group has at most this many)
constexpr int kMaxK = 1024;     // keys sorted in shared memory (8 KB)

struct Group {
    int first, rows, k, kr; // logits rows first .. first + rows - 1; k wanted; kr = min(k, V) per row
    int score0;             // its rows' beam scores: row_scores[score0 ..]
    int sup0, nsup;         // its suppressed ids: sup[sup0 .. sup0 + nsup)
    int out_row;            // its row of scores / ids
    int64_t ws0;            // its rows' keys: ws[ws0 + b * kr ..]
};

struct BeamArgs {
    const char *logits;
    int64_t row_stride, col_stride, V;
    int dtype, num_groups;
    float *scores;
    int64_t *ids;
    int64_t sc_stride0, sc_stride1, id_stride0, id_stride1, K;
    uint64_t *ws;
    unsigned long long *err;
    Group g[kMaxGroups];
    float row_scores[kMaxRows];
    int32_t sup[kMaxSup];
};
static_assert(sizeof(BeamArgs) <= 4096, "kernel arguments are limited to 4 KB");

__device__ __forceinline__ float key_value(uint64_t key) {
    uint32_t k = (uint32_t)(key >> 32);
    return __uint_as_float((k & 0x80000000u) ? k & 0x7fffffffu : ~k);
}

// The m (<= kMaxK) largest of key_of(0 .. n-1), largest first, into buf (every thread sees them
// after the call). Keys are unique; should they not be (the zeroed keys of a bad row), at most m
// are kept.
template <typename KeyFn>
__device__ void top_sorted(const KeyFn &key_of, int64_t n, int m, uint64_t *buf, SelectShared &sh) {
    const uint64_t lo = select_rank(key_of, n, m - 1, sh);
    if (threadIdx.x == 0)
        sh.count = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        uint64_t key = key_of(j);
        if (key >= lo) {
            int pos = atomicAdd(&sh.count, 1);
            if (pos < m)
                buf[pos] = key;
        }
    }
    int p = 1;
    while (p < m)
        p <<= 1;
    __syncthreads();
    for (int i = min(sh.count, m) + threadIdx.x; i < p; i += blockDim.x)
        buf[i] = 0; // sorts last
    __syncthreads();
    bitonic_sort_desc(buf, p);
}

__device__ __forceinline__ float logit(const BeamArgs &a, int64_t row, int64_t j) {
    return to_load(a.logits, a.dtype, row * a.row_stride + j * a.col_stride);
}

// grid (beam row, group): a row's kr best keys into the workspace
__global__ void rows_kernel(BeamArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ uint64_t buf[kMaxK];
    __shared__ SelectShared sh;
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const Group &g = a.g[blockIdx.y];
    const int b = blockIdx.x;
    if (b >= g.rows)
        return;
    const int64_t row = g.first + b, V = a.V;
    uint64_t *out = a.ws + g.ws0 + (int64_t)b * g.kr;

    float m = -INFINITY;
    int nan = 0;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        float x = logit(a, row, j);
        m = fmaxf(m, x);
        nan |= x != x;
    }
    m = to_block_max(m, fscratch);
    nan = __syncthreads_or(nan);
    if (nan || m == INFINITY || m == -INFINITY) {
        if (threadIdx.x == 0)
            to_gpu_error(a.err, TO_GPU_ERR_BEAM_LOGITS, row, nan ? 1 : m == INFINITY ? 2 : 3, 0);
        for (int i = threadIdx.x; i < g.kr; i += blockDim.x)
            out[i] = 0;
        return;
    }
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
        s += (double)expf(__fsub_rn(logit(a, row, j), m));
    s = to_block_sum_double(s, dscratch);
    const float ls = (float)log(s), score = a.row_scores[g.score0 + b];
    const uint32_t flat0 = (uint32_t)b * (uint32_t)V;
    auto key_of = [&](int64_t j) -> uint64_t {
        float v = __fadd_rn(__fsub_rn(__fsub_rn(logit(a, row, j), m), ls), score);
        for (int q = 0; q < g.nsup; q++)
            if (a.sup[g.sup0 + q] == j)
                v = -INFINITY;
        return (uint64_t)order_key(v) << 32 | (uint32_t)~(flat0 + (uint32_t)j);
    };
    top_sorted(key_of, V, g.kr, buf, sh);
    for (int i = threadIdx.x; i < g.kr; i += blockDim.x)
        out[i] = buf[i];
}

// grid (group): the group's k best among its rows' keys, written out
__global__ void groups_kernel(BeamArgs a) {
    to_pdl_wait();
    to_pdl_trigger();
    __shared__ uint64_t buf[kMaxK];
    __shared__ SelectShared sh;
    const Group &g = a.g[blockIdx.x];
    const uint64_t *keys = a.ws + g.ws0;
    auto key_of = [&](int64_t j) -> uint64_t { return keys[j]; };
    top_sorted(key_of, (int64_t)g.rows * g.kr, g.k, buf, sh);
    float *sc = a.scores + g.out_row * a.sc_stride0;
    int64_t *id = a.ids + g.out_row * a.id_stride0;
    for (int64_t j = threadIdx.x; j < a.K; j += blockDim.x) {
        sc[j * a.sc_stride1] = j < g.k ? key_value(buf[j]) : -INFINITY;
        id[j * a.id_stride1] = j < g.k ? (int64_t)(uint32_t)~(uint32_t)buf[j] : -1;
    }
}

int64_t at2(const to_tensor *t, int64_t i, int64_t j) {
    const int64_t o = i * t->strides[0] + j * t->strides[1];
    return t->dtype == TO_I32 ? (int64_t)((const int32_t *)t->data)[o] : ((const int64_t *)t->data)[o];
}

} // namespace

extern "C" int to_cuda_beam_topk(const to_tensor *scores, const to_tensor *ids, const to_tensor *logits,
                                 const to_tensor *beam_scores, const to_tensor *groups,
                                 const to_tensor *suppress) {
    const int dev = logits->device_index;
    cudaStream_t stream = to_cuda_stream(dev);
    if (!stream)
        return TO_ERR_CUDA;
    unsigned long long *err = to_cuda_error_word(dev);
    if (!err)
        return TO_ERR_CUDA;
    const int64_t G = groups->shape[0], V = logits->shape[1], M = suppress ? suppress->shape[1] : 0;
    int64_t nkeys = 0;
    for (int64_t g = 0; g < G; g++)
        nkeys += at2(groups, g, 1) * (at2(groups, g, 2) < V ? at2(groups, g, 2) : V);
    uint64_t *ws = NULL;
    TO_TRY(to_cuda_alloc(dev, nkeys * (int64_t)sizeof(uint64_t), (void **)&ws));

    BeamArgs a = {};
    a.logits = (const char *)logits->data;
    a.row_stride = logits->strides[0];
    a.col_stride = logits->strides[1];
    a.V = V;
    a.dtype = logits->dtype;
    a.scores = (float *)scores->data;
    a.ids = (int64_t *)ids->data;
    a.sc_stride0 = scores->strides[0];
    a.sc_stride1 = scores->strides[1];
    a.id_stride0 = ids->strides[0];
    a.id_stride1 = ids->strides[1];
    a.K = scores->shape[1];
    a.ws = ws;
    a.err = err;
    // a long row is several passes of one block: many threads for it
    const int threads = V >= 16384 ? 1024 : V >= 2048 ? 512 : 128;
    int status = TO_OK;
    int64_t key = 0;
    for (int64_t g0 = 0; g0 < G && status == TO_OK;) {
        int ng = 0, nrows = 0, nsup = 0, max_rows = 0;
        for (; g0 + ng < G && ng < kMaxGroups; ng++) {
            const int64_t g = g0 + ng, first = at2(groups, g, 0), rows = at2(groups, g, 1), k = at2(groups, g, 2);
            int gs = 0;
            for (int64_t q = 0; q < M; q++)
                gs += at2(suppress, g, q) >= 0;
            if (nrows + rows > kMaxRows || nsup + gs > kMaxSup)
                break; // the next launch takes it
            Group &gr = a.g[ng];
            gr.first = (int)first;
            gr.rows = (int)rows;
            gr.k = (int)k;
            gr.kr = (int)(k < V ? k : V);
            gr.score0 = nrows;
            gr.sup0 = nsup;
            gr.nsup = gs;
            gr.out_row = (int)g;
            gr.ws0 = key;
            for (int64_t r = 0; r < rows; r++)
                a.row_scores[nrows + r] = ((const float *)beam_scores->data)[(first + r) * beam_scores->strides[0]];
            for (int64_t q = 0; q < M; q++)
                if (at2(suppress, g, q) >= 0)
                    a.sup[nsup++] = (int32_t)at2(suppress, g, q);
            nrows += (int)rows;
            max_rows = rows > max_rows ? (int)rows : max_rows;
            key += rows * gr.kr;
        }
        a.num_groups = ng;
        to_launch(rows_kernel, dim3((unsigned)max_rows, (unsigned)ng), dim3(threads), 0, stream, a);
        status = to_cuda_check_launch("to_beam_topk");
        if (status == TO_OK) {
            to_launch(groups_kernel, dim3((unsigned)ng), dim3(256), 0, stream, a);
            status = to_cuda_check_launch("to_beam_topk");
        }
        g0 += ng;
    }
    to_cuda_free(dev, ws); // stream-ordered: reused only by later work
    return status;
}
