/* sagd's worker threads (internal to kernels/). */
#ifndef SAGD_THREADS_H
#define SAGD_THREADS_H

/* Work on chunk `chunk` as thread `thread` (0 .. threads - 1). */
typedef void (*sagd_chunk_fn)(void *ctx, long chunk, int thread);

#include <stdint.h>

/* Most threads a parallel region uses (sizes per-thread partial results). */
#define SAGD_MAX_THREADS 64

/* The reduction of a region's per-thread counts, summed in a fixed order. */
static inline int64_t sagd_sum_partials(const int64_t partial[SAGD_MAX_THREADS])
{
    int64_t s = 0;
    int t;
    for (t = 0; t < SAGD_MAX_THREADS; t++)
        s += partial[t];
    return s;
}

/*
 * fn(ctx, c, t) for every chunk c in [0, n_chunks), chunk c on thread c % T, where
 * T = min(sagd_get_threads(), n_chunks). The calling thread is thread 0. Returns when all
 * chunks are done. If another call is already using the pool, this one runs inline.
 */
void sagd_parallel(long n_chunks, sagd_chunk_fn fn, void *ctx);

/* sagd_parallel on at most max_threads threads. */
void sagd_parallel_upto(long n_chunks, int max_threads, sagd_chunk_fn fn, void *ctx);

#endif
