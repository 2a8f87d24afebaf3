/*
 * A small pool of worker threads. Between parallel regions a worker first spins for a short
 * while (SPIN_US), then sleeps on a condition variable; the caller, once its own share is
 * done, waits for the workers the same way. A training step runs a dozen regions separated
 * by a few microseconds of Python, and waking a sleeping thread costs tens of microseconds
 * on a virtual machine (measured: a step of a small network 1.1 ms with sleeping workers,
 * 0.41 ms with spinning ones). The spin is bounded, so idle workers leave the cores to
 * others soon after; BLAS runs single-threaded inside sagd's regions (sagd/blas.py), so no
 * BLAS thread waits for a core a sagd worker spins on.
 * Chunks are dealt out statically, so which thread runs a chunk never depends on timing.
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
#define ATOMIC_LOAD(p) InterlockedCompareExchange((volatile LONG *)(p), 0, 0)
#define ATOMIC_INC(p) InterlockedIncrement((volatile LONG *)(p))
#define ATOMIC_DEC(p) InterlockedDecrement((volatile LONG *)(p))
#define CPU_RELAX() YieldProcessor()
static double now_us(void)
{
    LARGE_INTEGER t, f;
    QueryPerformanceCounter(&t);
    QueryPerformanceFrequency(&f);
    return 1e6 * (double)t.QuadPart / (double)f.QuadPart;
}
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
#define ATOMIC_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define ATOMIC_INC(p) __atomic_add_fetch((p), 1, __ATOMIC_ACQ_REL)
#define ATOMIC_DEC(p) __atomic_sub_fetch((p), 1, __ATOMIC_ACQ_REL)
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif
#include <time.h>
static double now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return 1e6 * (double)t.tv_sec + 1e-3 * (double)t.tv_nsec;
}
#endif

/* How long a thread spins before it sleeps: longer than the Python between two regions of
   a training step, short enough that an idle pool soon leaves the cores alone. */
#define SPIN_US 200.0

/* Spin until (*p == value) == want, for at most SPIN_US; returns whether it came true. */
static int spin_until(const long *p, long value, int want)
{
    double start = -1.0;
    int i;
    for (;;) {
        for (i = 0; i < 64; i++) {
            if ((ATOMIC_LOAD(p) == value) == want)
                return 1;
            CPU_RELAX();
        }
        if (start < 0.0)
            start = now_us();
        else if (now_us() - start > SPIN_US)
            return 0;
    }
}

static struct {
    int ready;                  /* locks and conditions initialised */
    lock_t busy;                /* held by the caller of a parallel region */
    lock_t lock;                /* with wake and done, for threads that sleep */
    cond_t wake;                /* workers sleep here waiting for work */
    cond_t done;                /* the caller sleeps here waiting for the workers */
    int workers;                /* worker threads started (threads 1 .. workers) */
    /* Worker w has work when posted[w] != taken[w]: only the workers of a region are posted
       to, so a worker never reads the job of a region it is not part of. */
    long posted[SAGD_MAX_THREADS];
    long taken[SAGD_MAX_THREADS];
    long pending;               /* workers still running the current region */
    sagd_chunk_fn fn;           /* the current region, written before its posts */
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
    for (;;) {
        if (!spin_until(&pool.posted[me], pool.taken[me], 0)) {
            LOCK(&pool.lock);
            while (ATOMIC_LOAD(&pool.posted[me]) == pool.taken[me])
                COND_WAIT(&pool.wake, &pool.lock);
            UNLOCK(&pool.lock);
        }
        pool.taken[me]++;
        run_share(me, pool.n_threads);
        if (ATOMIC_DEC(&pool.pending) == 0) { /* the caller may be asleep */
            LOCK(&pool.lock);
            COND_SIGNAL(&pool.done);
            UNLOCK(&pool.lock);
        }
    }
#if defined(_WIN32)
    return 0;
#else
    return NULL;
#endif
}

/* Start workers until there are n; returns how many run. Called holding pool.busy. */
static int start_workers(int n)
{
    while (pool.workers < n) {
        intptr_t id = pool.workers + 1;
        pool.taken[id] = pool.posted[id];
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
    int n = sagd_get_threads(), t;
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
    n = 1 + (start_workers(n - 1) < n - 1 ? pool.workers : n - 1);
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_chunks = n_chunks;
    pool.n_threads = n;
    pool.pending = n - 1;
    LOCK(&pool.lock);
    for (t = 1; t < n; t++)
        ATOMIC_INC(&pool.posted[t]); /* publishes the fields above to worker t */
    COND_BROADCAST(&pool.wake);
    UNLOCK(&pool.lock);

    run_share(0, n);

    if (!spin_until(&pool.pending, 0, 1)) {
        LOCK(&pool.lock);
        while (ATOMIC_LOAD(&pool.pending) != 0)
            COND_WAIT(&pool.done, &pool.lock);
        UNLOCK(&pool.lock);
    }
    UNLOCK(&pool.busy);
}
