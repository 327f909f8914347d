/* threads.c - the persistent thread pool and per-thread scratch memory.
 *
 * One pool per process. The calling thread is thread 0 and works too; nth - 1 workers wait
 * for the next job. A worker spins briefly after each job (decode steps issue jobs every few
 * microseconds, and waking a sleeping thread costs tens of them), then sleeps on a condition
 * variable. Jobs are serialised: a second caller waits for the first job to finish. */
#define _GNU_SOURCE
#include "internal.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#define MAX_THREADS 256
#define SPIN_ROUNDS 20000

static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER; /* guards the condition */
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static pthread_t workers[MAX_THREADS];
static int pool_size = 0; /* threads including the caller; 0 = not started */
static atomic_uint generation;
static atomic_int pending;
static atomic_int stopping;
static to_thread_fn job_fn;
static void *job_ctx;
static unsigned start_generation; /* the generation a new worker has already seen */
static _Thread_local int inside_pool;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *worker_main(void *arg) {
    int ith = (int)(intptr_t)arg;
    inside_pool = 1;
    /* Not atomic_load(&generation): a job published before this thread got here must run. */
    unsigned seen = start_generation;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&generation, memory_order_acquire) == seen) {
            if (++spins < SPIN_ROUNDS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&sleep_lock);
            while (atomic_load(&generation) == seen)
                pthread_cond_wait(&wake, &sleep_lock);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = atomic_load(&generation);
        if (atomic_load(&stopping))
            return NULL;
        job_fn(job_ctx, ith, pool_size);
        atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
    }
}

static int default_threads(void) {
    const char *env = getenv("INFERENCE_PIO_THREADS");
    if (env && atoi(env) > 0)
        return atoi(env);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static void publish(to_thread_fn fn, void *ctx) {
    job_fn = fn;
    job_ctx = ctx;
    atomic_store(&pending, pool_size - 1);
    pthread_mutex_lock(&sleep_lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
}

static void stop_pool(void) {
    if (pool_size > 1) {
        atomic_store(&stopping, 1);
        publish(NULL, NULL);
        for (int i = 1; i < pool_size; i++)
            pthread_join(workers[i], NULL);
        atomic_store(&stopping, 0);
    }
    pool_size = 0;
}

static int start_pool(int n) {
    if (n > MAX_THREADS)
        n = MAX_THREADS;
    pool_size = 1;
    start_generation = atomic_load(&generation);
    for (int i = 1; i < n; i++) {
        if (pthread_create(&workers[i], NULL, worker_main, (void *)(intptr_t)i) != 0)
            break;
        pool_size = i + 1;
    }
    return pool_size;
}

/* caller holds job_lock */
static void ensure_pool(void) {
    if (pool_size == 0)
        start_pool(default_threads());
}

int to_num_threads(void) {
    pthread_mutex_lock(&job_lock);
    ensure_pool();
    int n = pool_size;
    pthread_mutex_unlock(&job_lock);
    return n;
}

int to_set_num_threads(int n) {
    if (n < 1 || n > MAX_THREADS)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_set_num_threads: %d threads (1..%d allowed)", n,
                       MAX_THREADS);
    if (inside_pool)
        return to_fail(TO_ERR_INVALID_ARGUMENT, "to_set_num_threads: called from a pool thread");
    pthread_mutex_lock(&job_lock);
    stop_pool();
    int got = start_pool(n);
    pthread_mutex_unlock(&job_lock);
    if (got != n)
        return to_fail(TO_ERR_INTERNAL, "to_set_num_threads: could only start %d of %d threads", got, n);
    return TO_OK;
}

void to_parallel_run(to_thread_fn fn, void *ctx) {
    if (inside_pool) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&job_lock);
    ensure_pool();
    if (pool_size == 1) {
        fn(ctx, 0, 1);
        pthread_mutex_unlock(&job_lock);
        return;
    }
    publish(fn, ctx);
    inside_pool = 1;
    fn(ctx, 0, pool_size);
    inside_pool = 0;
    /* wait for the workers; yield when they take long (a worker may have been descheduled on an
     * oversubscribed machine, and spinning would keep it from running) */
    for (int spins = 0; atomic_load_explicit(&pending, memory_order_acquire) > 0; spins++) {
        if (spins < SPIN_ROUNDS)
            cpu_relax();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&job_lock);
}

struct range_job {
    to_range_fn fn;
    void *ctx;
    int64_t n;
    int64_t min_chunk;
};

static void run_range(void *arg, int ith, int nth) {
    const struct range_job *job = arg;
    int64_t parts = job->min_chunk > 0 ? (job->n + job->min_chunk - 1) / job->min_chunk : job->n;
    if (parts > nth)
        parts = nth;
    if (ith >= parts)
        return;
    int64_t begin = job->n * ith / parts, end = job->n * (ith + 1) / parts;
    if (begin < end)
        job->fn(job->ctx, begin, end);
}

void to_parallel_for(int64_t n, int64_t min_chunk, to_range_fn fn, void *ctx) {
    if (n <= 0)
        return;
    if (inside_pool || n <= min_chunk) {
        fn(ctx, 0, n);
        return;
    }
    struct range_job job = {fn, ctx, n, min_chunk};
    to_parallel_run(run_range, &job);
}

#define SCRATCH_SLOTS 4
static _Thread_local void *scratch_ptr[SCRATCH_SLOTS];
static _Thread_local size_t scratch_size[SCRATCH_SLOTS];

void *to_scratch(int slot, size_t nbytes) {
    if (slot < 0 || slot >= SCRATCH_SLOTS)
        return NULL;
    if (scratch_size[slot] < nbytes) {
        to_host_free(scratch_ptr[slot]);
        size_t size = nbytes + nbytes / 2 + 64; /* grow geometrically */
        scratch_ptr[slot] = to_host_alloc(size);
        scratch_size[slot] = scratch_ptr[slot] ? size : 0;
    }
    return scratch_ptr[slot];
}
