/*
 * One persistent pool of worker threads for the whole process, used by the matmuls and the fused
 * decoder layers instead of OpenMP.
 *
 * Why not OpenMP: libgomp keeps one thread team per calling thread, and once the process holds
 * more of its threads than it has cores (a stage worker's team beside the main thread's idle
 * one), every team drops to a ~100-iteration spin and parks on a futex between parallel
 * regions. A forward of the default target has ~150 of them: on this project's 2-core machines
 * a forward called from a stage worker thread took 12-15 ms instead of 7 ms from the main thread.
 * Here every caller shares one pool, whose workers spin for POOL_SPIN_NS after each job (the gap
 * between two regions of one forward) and then sleep on a futex.
 *
 * pool_run(fn, arg, T) runs fn(arg, t, T) for t = 0 .. T-1: part 0 on the caller, the others on
 * workers, and returns when all are done. One job at a time: a caller that finds the pool busy
 * (another stage's forward) runs all T parts itself, in order. Callers split work by t alone,
 * so results never depend on which thread ran a part.
 */

#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "thread_pool.h"

#define POOL_MAX 64          /* parts per job, at most */
#define POOL_SPIN_NS 200000L /* a worker spins this long for the next job, then sleeps */

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* held by the running job */
static int n_workers;                                         /* started (under pool_lock) */
static _Atomic uint32_t gen;     /* job generation: the futex word workers wait on */
static _Atomic int sleepers;     /* workers parked on the futex */
static _Atomic int pending;      /* workers that have not finished the current job */
static pool_task job_fn;         /* the current job (written before gen is bumped) */
static void *job_arg;
static int job_parts;
static uint32_t start_gen[POOL_MAX]; /* gen at each worker's creation */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Wait until gen differs from seen (spin, then sleep); returns the new gen. */
static uint32_t wait_for_job(uint32_t seen) {
    const long long deadline = now_ns() + POOL_SPIN_NS;
    for (unsigned i = 1;; ++i) {
        const uint32_t g = atomic_load_explicit(&gen, memory_order_acquire);
        if (g != seen) return g;
        cpu_relax();
        if ((i & 255) == 0 && now_ns() > deadline) break;
    }
    atomic_fetch_add(&sleepers, 1); /* seq_cst: pairs with the caller's bump-then-check */
    uint32_t g;
    while ((g = atomic_load(&gen)) == seen)
        syscall(SYS_futex, (uint32_t *)&gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
    atomic_fetch_sub(&sleepers, 1);
    return g;
}

static void *worker(void *p) {
    const int id = (int)(intptr_t)p; /* 1 .. POOL_MAX - 1: the part it runs */
    uint32_t seen = start_gen[id];
    for (;;) {
        seen = wait_for_job(seen);
        if (id < job_parts) job_fn(job_arg, id, job_parts);
        atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
    }
    return NULL;
}

/* Start workers up to `want` (under pool_lock); returns how many exist. */
static int grow(int want) {
    while (n_workers < want) {
        const int id = n_workers + 1;
        start_gen[id] = atomic_load(&gen);
        pthread_attr_t attr;
        pthread_t th;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&th, &attr, worker, (void *)(intptr_t)id);
        pthread_attr_destroy(&attr);
        if (rc != 0) break; /* fewer workers: the caller runs the rest of the parts */
        n_workers = id;
    }
    return n_workers;
}

/* A forked child has no workers (only the forking thread survives) and a fresh lock. */
static void after_fork_child(void) {
    pthread_mutex_init(&pool_lock, NULL);
    n_workers = 0;
    atomic_store(&sleepers, 0);
    atomic_store(&pending, 0);
}

static pthread_once_t once = PTHREAD_ONCE_INIT;
static void init_once(void) { pthread_atfork(NULL, NULL, after_fork_child); }

void pool_run(pool_task fn, void *arg, int parts) {
    if (parts > POOL_MAX) parts = POOL_MAX;
    if (parts <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_once(&once, init_once);
    if (pthread_mutex_trylock(&pool_lock) != 0) { /* busy: do every part here */
        for (int t = 0; t < parts; ++t) fn(arg, t, parts);
        return;
    }
    const int workers = grow(parts - 1);
    job_fn = fn;
    job_arg = arg;
    job_parts = parts;
    atomic_store(&pending, workers);
    atomic_fetch_add(&gen, 1); /* seq_cst: publishes the job, then checks for sleepers */
    if (atomic_load(&sleepers) > 0)
        syscall(SYS_futex, (uint32_t *)&gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    fn(arg, 0, parts);
    for (int t = workers + 1; t < parts; ++t) fn(arg, t, parts); /* parts without a worker */
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) cpu_relax();
    pthread_mutex_unlock(&pool_lock);
}
