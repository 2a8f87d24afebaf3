/*
 * A small pool of worker threads that sleep (on a condition variable) between parallel
 * regions. BLAS keeps threads of its own; workers that spin between regions, as an OpenMP
 * runtime does by default, take the cores BLAS needs next (measured: a training step 4x
 * slower), so the pool waits passively. Chunks are dealt out statically, so which thread
 * runs a chunk never depends on timing.
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* sched_getaffinity */
#endif

#include "threads.h"
#include "sagd_kernels.h"

#include <stdint.h>

#if defined(_WIN32)
#include <windows.h>
typedef CRITICAL_SECTION lock_t;
typedef CONDITION_VARIABLE cond_t;
#define LOCK_INIT(m) InitializeCriticalSection(m)
#define LOCK(m) EnterCriticalSection(m)
#define TRYLOCK(m) TryEnterCriticalSection(m)
#define UNLOCK(m) LeaveCriticalSection(m)
#define COND_INIT(c) InitializeConditionVariable(c)
#define COND_WAIT(c, m) SleepConditionVariableCS(c, m, INFINITE)
#define COND_SIGNAL(c) WakeConditionVariable(c)
#define COND_BROADCAST(c) WakeAllConditionVariable(c)
#else
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
typedef pthread_mutex_t lock_t;
typedef pthread_cond_t cond_t;
#define LOCK_INIT(m) pthread_mutex_init(m, NULL)
#define LOCK(m) pthread_mutex_lock(m)
#define TRYLOCK(m) (pthread_mutex_trylock(m) == 0)
#define UNLOCK(m) pthread_mutex_unlock(m)
#define COND_INIT(c) pthread_cond_init(c, NULL)
#define COND_WAIT(c, m) pthread_cond_wait(c, m)
#define COND_SIGNAL(c) pthread_cond_signal(c)
#define COND_BROADCAST(c) pthread_cond_broadcast(c)
#endif

static struct {
    int ready;                  /* locks and conditions initialised */
    lock_t busy;                /* held by the caller of a parallel region */
    lock_t lock;                /* guards everything below */
    cond_t wake;                /* workers wait here for a new region */
    cond_t done;                /* the caller waits here for the workers */
    int workers;                /* worker threads started (threads 1 .. workers) */
    unsigned long generation;   /* counts regions; a change means "new work" */
    int pending;                /* workers still running the current region */
    unsigned long seen[SAGD_MAX_THREADS]; /* the last region each worker looked at */
    sagd_chunk_fn fn;
    void *ctx;
    long n_chunks;
    int n_threads;
} pool;

static int wanted = 0; /* threads asked for; 0: one per available core */
static int cores = 1;  /* available cores, read once by sagd_threads_init */

static int available_cores(void)
{
#if defined(_WIN32)
    SYSTEM_INFO si;
    GetSystemInfo(&si);
    return (int)si.dwNumberOfProcessors;
#else
#if defined(__linux__) && defined(CPU_COUNT)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
#endif
    {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        return n > 0 ? (int)n : 1;
    }
#endif
}

void sagd_set_threads(int n) { wanted = n > 0 ? n : 0; }

int sagd_get_threads(void)
{
    int n = wanted > 0 ? wanted : cores;
    return n < SAGD_MAX_THREADS ? n : SAGD_MAX_THREADS;
}

static void run_share(int thread, int n_threads)
{
    long c;
    for (c = thread; c < pool.n_chunks; c += n_threads)
        pool.fn(pool.ctx, c, thread);
}

#if defined(_WIN32)
static DWORD WINAPI worker(LPVOID arg)
#else
static void *worker(void *arg)
#endif
{
    const int me = (int)(intptr_t)arg;
    LOCK(&pool.lock);
    for (;;) {
        /* seen[me] was set when the worker was started, so a region published before this
           thread first took the lock is not missed */
        while (pool.generation == pool.seen[me])
            COND_WAIT(&pool.wake, &pool.lock);
        pool.seen[me] = pool.generation;
        if (me < pool.n_threads) {
            int n = pool.n_threads;
            UNLOCK(&pool.lock);
            run_share(me, n);
            LOCK(&pool.lock);
            if (--pool.pending == 0)
                COND_SIGNAL(&pool.done);
        }
    }
#if defined(_WIN32)
    return 0;
#else
    return NULL;
#endif
}

/* Start workers until there are n; returns how many run. Called with pool.lock held. */
static int start_workers(int n)
{
    while (pool.workers < n) {
        intptr_t id = pool.workers + 1;
        pool.seen[id] = pool.generation;
#if defined(_WIN32)
        HANDLE h = CreateThread(NULL, 0, worker, (LPVOID)id, 0, NULL);
        if (h == NULL)
            break;
        CloseHandle(h);
#else
        pthread_t t;
        pthread_attr_t attr;
        int failed;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        failed = pthread_create(&t, &attr, worker, (void *)id);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
#endif
        pool.workers++;
    }
    return pool.workers;
}

#if !defined(_WIN32)
/* A forked child has only the thread that forked: forget the parent's workers. */
static void after_fork_in_child(void)
{
    LOCK_INIT(&pool.busy);
    LOCK_INIT(&pool.lock);
    COND_INIT(&pool.wake);
    COND_INIT(&pool.done);
    pool.workers = 0;
    pool.pending = 0;
}
#endif

void sagd_threads_init(void)
{
    if (pool.ready)
        return;
    cores = available_cores();
    LOCK_INIT(&pool.busy);
    LOCK_INIT(&pool.lock);
    COND_INIT(&pool.wake);
    COND_INIT(&pool.done);
#if !defined(_WIN32)
    pthread_atfork(NULL, NULL, after_fork_in_child);
#endif
    pool.ready = 1;
}

void sagd_parallel(long n_chunks, sagd_chunk_fn fn, void *ctx)
{
    sagd_parallel_upto(n_chunks, SAGD_MAX_THREADS, fn, ctx);
}

void sagd_parallel_upto(long n_chunks, int max_threads, sagd_chunk_fn fn, void *ctx)
{
    int n = sagd_get_threads();
    long c;
    if (n > max_threads)
        n = max_threads;
    if (n > n_chunks)
        n = (int)n_chunks;
    if (n <= 1 || !pool.ready || !TRYLOCK(&pool.busy)) {
        for (c = 0; c < n_chunks; c++)
            fn(ctx, c, 0);
        return;
    }
    LOCK(&pool.lock);
    n = 1 + (start_workers(n - 1) < n - 1 ? pool.workers : n - 1);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_chunks = n_chunks;
    pool.n_threads = n;
    pool.pending = n - 1;
    pool.generation++;
    COND_BROADCAST(&pool.wake);
    UNLOCK(&pool.lock);

    run_share(0, n);

    LOCK(&pool.lock);
    while (pool.pending > 0)
        COND_WAIT(&pool.done, &pool.lock);
    UNLOCK(&pool.lock);
    UNLOCK(&pool.busy);
}
