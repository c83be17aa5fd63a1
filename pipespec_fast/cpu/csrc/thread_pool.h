/* The process-wide worker pool of the CPU kernels (thread_pool.c). */
#ifndef PIPESPEC_THREAD_POOL_H
#define PIPESPEC_THREAD_POOL_H

/* One part of a job: t in [0, parts). */
typedef void (*pool_task)(void *arg, int t, int parts);

/* Run task(arg, t, parts) for every t in [0, parts) (part 0 on the calling thread) and return
 * when all have finished. parts <= 1 runs task(arg, 0, 1) inline. */
void pool_run(pool_task task, void *arg, int parts);

/* Part t of parts of count items: the contiguous range [*begin, *end) (a static split). */
static inline void pool_part(int count, int t, int parts, int *begin, int *end) {
    *begin = (int)((long long)count * t / parts);
    *end = (int)((long long)count * (t + 1) / parts);
}

#endif
