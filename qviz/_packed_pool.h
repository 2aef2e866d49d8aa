/* A small thread pool for the panel kernels, included by _packed_kernels.h, and the dispatch to
 * PyTorch's OpenMP team that replaces it when both share one OpenMP runtime (qviz_parallel_openmp).
 *
 * Why a pool rather than an OpenMP parallel-for of its own: its closing barrier waits for every thread
 * of the team, so when the machine is shared and one worker is preempted before it starts (a 2-core box with another busy
 * process), the call waits out the scheduler's time slice: measured 8 ms instead of 0.6 ms. Here the
 * calling thread takes tasks too and returns as soon as every task is *done*; a worker that wakes late
 * finds nothing left and goes back to sleep. Tasks are claimed with a compare-and-swap on a word that
 * holds the job's generation and the next task index, so a worker still holding an old job can never
 * claim a task of the next one (or touch its context).
 *
 * One job runs at a time; a caller that finds the pool busy (another Python thread in a kernel: the
 * GIL is released there) runs its tasks alone. Without POSIX threads everything runs on the caller.
 *
 * A worker can still be preempted while it holds a task, and then the caller waits for it. When that
 * wait passes QVIZ_STALL_NS the calls of the next 50 ms (QVIZ_BACKOFF_NS) run on the caller alone: on
 * a machine whose other cores are busy, one thread at full speed beats two that wait out each other's time slices
 * (measured: a 4096 x 4096 codebook GEMV took 0.2 ms or 5 ms at random with two threads, 0.25 ms with one).
 */
#ifndef QVIZ_PACKED_POOL_H
#define QVIZ_PACKED_POOL_H

typedef void (*qviz_task_fn)(void *ctx, long task);

/* Tasks are split into one home range per thread, each with its own claim counter: a thread runs its
 * own range first and then helps with what is left of the others'. Thread r gets the same tasks call
 * after call, so the weights it read last time are still in its L2 (a single claim counter handed the
 * tasks out in a different order each call: a 4096 x 4096 binary GEMV read its 2 MiB from L3 every
 * time, 44 us on a 2-core Xeon whose L2s hold 2 MiB each). First task of range r of `team`: */
static inline long qviz_range_start(int r, long tasks, int team) {
    return (long)((unsigned long long)tasks * (unsigned long long)r / (unsigned long long)team);
}

#if (defined(__unix__) || defined(__APPLE__)) && !defined(QVIZ_NO_POOL)
#define QVIZ_HAVE_POOL 1
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#define QVIZ_POOL_MAX 64 /* workers, at most */
#define QVIZ_STALL_NS 300000L /* a wait for workers this long (0.3 ms) counts as a stall */
#define QVIZ_BACKOFF_NS 50000000L /* after a stall, calls run on the caller alone for 50 ms */
#define QVIZ_GEN_SHIFT 40 /* claim word: generation << 40 | next task (tasks < 2^40) */

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_mutex_t busy; /* held by the caller of the running job */
    int workers;          /* started so far */
    int sleeping;
    pid_t pid;            /* workers belong to this process (a fork has none) */
    uint64_t gen;
    qviz_task_fn fn;
    void *ctx;
    long tasks;
    int allowed;          /* workers 0 .. allowed - 1 may join the current job */
    int team;             /* the job's home ranges: one per thread (the caller is thread 0, worker w is w + 1) */
    _Atomic long done;
    _Atomic long backoff_until; /* until then (qviz_now_ns) calls run on the caller alone: a worker stalled */
} qviz_pool_t;

static qviz_pool_t qviz_pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
                                .busy = PTHREAD_MUTEX_INITIALIZER};

/* The claim word of each home range (job generation << 40 | next task), a cache line each. */
typedef struct {
    _Alignas(64) _Atomic uint64_t word;
} qviz_claim_t;
static qviz_claim_t qviz_pool_claims[QVIZ_POOL_MAX + 1];

static inline void qviz_relax(void) {
#if QVIZ_X86
    _mm_pause();
#endif
}

/* The bits of a job's generation that its claim words carry. */
static inline uint64_t qviz_gen_tag(uint64_t gen) { return gen & ((1ULL << (64 - QVIZ_GEN_SHIFT)) - 1); }

/* Run tasks of job `gen` until none is left, thread `me`'s home range first; returns how many it ran. */
static long qviz_pool_drain(int me, uint64_t gen, qviz_task_fn fn, void *ctx, long tasks, int team) {
    const uint64_t tag = qviz_gen_tag(gen);
    long ran = 0;
    for (int s = 0; s < team; s++) {
        const int r = (me + s) % team;
        const long end = qviz_range_start(r + 1, tasks, team);
        _Atomic uint64_t *claim = &qviz_pool_claims[r].word;
        uint64_t c = atomic_load_explicit(claim, memory_order_acquire);
        for (;;) {
            if (c >> QVIZ_GEN_SHIFT != tag) return ran; /* a later job has begun: this one is done */
            const long t = (long)(c & ((1ULL << QVIZ_GEN_SHIFT) - 1));
            if (t >= end) break;
            if (!atomic_compare_exchange_weak_explicit(claim, &c, c + 1, memory_order_acq_rel, memory_order_acquire))
                continue;
            fn(ctx, t);
            atomic_fetch_add_explicit(&qviz_pool.done, 1, memory_order_release);
            ran++;
            c = atomic_load_explicit(claim, memory_order_acquire);
        }
    }
    return ran;
}

static void *qviz_pool_worker(void *arg) {
    const int me = (int)(intptr_t)arg;
    uint64_t seen = 0;
    for (;;) {
        /* a short spin catches back-to-back calls without a wake-up; then sleep */
        for (int spin = 0; spin < 4000; spin++) {
            if (__atomic_load_n(&qviz_pool.gen, __ATOMIC_ACQUIRE) != seen) break;
            qviz_relax();
        }
        pthread_mutex_lock(&qviz_pool.lock);
        while (qviz_pool.gen == seen) {
            qviz_pool.sleeping++;
            pthread_cond_wait(&qviz_pool.wake, &qviz_pool.lock);
            qviz_pool.sleeping--;
        }
        seen = qviz_pool.gen;
        const qviz_task_fn fn = qviz_pool.fn;
        void *ctx = qviz_pool.ctx;
        const long tasks = qviz_pool.tasks;
        const int join = me < qviz_pool.allowed, team = qviz_pool.team;
        pthread_mutex_unlock(&qviz_pool.lock);
        if (join) qviz_pool_drain(me + 1, seen, fn, ctx, tasks, team);
    }
    return NULL;
}

/* fn(ctx, t) for t < tasks on up to `threads` threads (the caller included). */
static long qviz_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* A stall: after the caller ran out of tasks it waited more than QVIZ_STALL_NS beyond two of its own
 * tasks' average time for the last ones to finish. Waiting up to a task's length is normal (the other
 * threads are finishing theirs; a codebook GEMM task takes milliseconds, and counting that as a stall
 * sent every call to one thread); much longer means a worker lost its core. */
static int qviz_stalled(long waited, long working, long ran) {
    return waited > QVIZ_STALL_NS + (ran > 0 ? 2 * (working / ran) : 0);
}

/* A time, not a number of calls: 64 calls on one thread after one stall made a 4 ms matmul run at one
 * thread's speed for a quarter of a second, and a benchmark's median with it. */
static void qviz_back_off(void) {
    atomic_store_explicit(&qviz_pool.backoff_until, qviz_now_ns() + QVIZ_BACKOFF_NS, memory_order_relaxed);
}

/* PyTorch's team. PyTorch's OpenMP workers spin for a while after each of its parallel regions; a qviz
 * call right after one (a model alternating PyTorch layers and qviz kernels) found the second core held
 * by a spinning worker, its own worker late, and ran at one thread's speed or worse (256x2048x2048
 * binary, 2 threads: 0.66 ms, against 0.50 ms on one). When qviz's OpenMP runtime is PyTorch's (the loader
 * reuses PyTorch's libgomp.so.1 for qviz, whatever other runtimes are mapped), a parallel region hands
 * the tasks to those very workers, awake already: 0.33-0.34 ms. qviz.packed turns this on at import
 * after checking that qviz binds to PyTorch's runtime (`qviz._dispatch.shares_pytorchs_openmp`). The
 * stall guard of the pool applies: thread 0 notes when no task is left, and a closing barrier that then waits for
 * a preempted worker longer than QVIZ_STALL_NS sends the next 50 ms of calls to the caller alone. */
#if QVIZ_HAVE_OPENMP
static int qviz_on_openmp; /* 1: parallel regions on the OpenMP team; 0: the pool */

static void qviz_child_after_fork(void) { qviz_on_openmp = 0; } /* libgomp's team does not survive a fork */

static void qviz_set_threading(int openmp) {
    static int registered;
    if (!registered && pthread_atfork(NULL, NULL, qviz_child_after_fork) == 0) registered = 1;
    qviz_on_openmp = openmp && registered;
}

static void qviz_parallel_openmp(qviz_task_fn fn, void *ctx, long tasks, int threads) {
    struct {
        _Alignas(64) _Atomic long next;
    } range[QVIZ_POOL_MAX + 1];
    for (int r = 0; r < threads; r++) atomic_init(&range[r].next, qviz_range_start(r, tasks, threads));
    const long started = qviz_now_ns();
    long drained = started, ran = 0;
#pragma omp parallel num_threads(threads)
    {
        const int me = omp_get_thread_num();
        long mine = 0;
        for (int s = 0; s < threads; s++) { /* its home range first, then what is left of the others' */
            const int r = (me + s) % threads;
            const long end = qviz_range_start(r + 1, tasks, threads);
            for (long t; (t = atomic_fetch_add_explicit(&range[r].next, 1, memory_order_relaxed)) < end; mine++)
                fn(ctx, t);
        }
        if (me == 0) drained = qviz_now_ns(), ran = mine;
    }
    if (qviz_stalled(qviz_now_ns() - drained, drained - started, ran))
        qviz_back_off();
}
#else
static void qviz_set_threading(int openmp) { (void)openmp; }
#endif

static int qviz_threading(void) {
#if QVIZ_HAVE_OPENMP
    return qviz_on_openmp;
#else
    return 0;
#endif
}

static void qviz_parallel(qviz_task_fn fn, void *ctx, long tasks, int threads) {
    if (threads > QVIZ_POOL_MAX + 1) threads = QVIZ_POOL_MAX + 1;
    if (threads <= 1 || tasks <= 1 || qviz_now_ns() < atomic_load_explicit(&qviz_pool.backoff_until,
                                                                            memory_order_relaxed)) {
        for (long t = 0; t < tasks; t++) fn(ctx, t);
        return;
    }
#if QVIZ_HAVE_OPENMP
    if (qviz_on_openmp) {
        qviz_parallel_openmp(fn, ctx, tasks, threads);
        return;
    }
#endif
    if (pthread_mutex_trylock(&qviz_pool.busy) != 0) {
        for (long t = 0; t < tasks; t++) fn(ctx, t);
        return;
    }
    pthread_mutex_lock(&qviz_pool.lock);
    if (qviz_pool.pid != getpid()) { /* first use, or a forked child: its parent's workers are not here */
        qviz_pool.pid = getpid();
        qviz_pool.workers = 0;
        qviz_pool.sleeping = 0;
    }
    while (qviz_pool.workers < threads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&th, &attr, qviz_pool_worker, (void *)(intptr_t)qviz_pool.workers);
        pthread_attr_destroy(&attr);
        if (failed) break; /* fewer workers: the caller does the rest */
        qviz_pool.workers++;
    }
    const uint64_t gen = qviz_pool.gen + 1;
    qviz_pool.fn = fn;
    qviz_pool.ctx = ctx;
    qviz_pool.tasks = tasks;
    qviz_pool.allowed = threads - 1;
    qviz_pool.team = threads;
    atomic_store_explicit(&qviz_pool.done, 0, memory_order_relaxed);
    for (int r = 0; r < threads; r++)
        atomic_store_explicit(&qviz_pool_claims[r].word,
                              qviz_gen_tag(gen) << QVIZ_GEN_SHIFT | (uint64_t)qviz_range_start(r, tasks, threads),
                              memory_order_release);
    __atomic_store_n(&qviz_pool.gen, gen, __ATOMIC_RELEASE);
    if (qviz_pool.sleeping) pthread_cond_broadcast(&qviz_pool.wake);
    pthread_mutex_unlock(&qviz_pool.lock);
    const long started = qviz_now_ns();
    const long ran = qviz_pool_drain(0, gen, fn, ctx, tasks, threads);
    const long drained = qviz_now_ns();
    /* the rest is in workers' hands: spin briefly, then yield the core (it may be the one they need) */
    long waited_from = 0;
    for (long spin = 0; atomic_load_explicit(&qviz_pool.done, memory_order_acquire) < tasks; spin++) {
        if (spin < 2000) {
            qviz_relax();
            continue;
        }
        if (!waited_from) waited_from = qviz_now_ns();
        sched_yield();
    }
    if (waited_from && qviz_stalled(qviz_now_ns() - drained, drained - started, ran))
        qviz_back_off();
    pthread_mutex_unlock(&qviz_pool.busy);
}

#else
#define QVIZ_HAVE_POOL 0
static void qviz_set_threading(int openmp) { (void)openmp; }
static int qviz_threading(void) { return 0; }
static void qviz_parallel(qviz_task_fn fn, void *ctx, long tasks, int threads) {
    (void)threads;
    for (long t = 0; t < tasks; t++) fn(ctx, t);
}
#endif

#endif /* QVIZ_PACKED_POOL_H */
