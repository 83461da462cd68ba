/* The helper threads that serve the rings of one *_serve_many call in parallel.
 *
 * Static, included by a kernel's single C file after core.h: each kernel library has its
 * own pool. The caller (the event loop, GIL released) serves item 0 itself, up to
 * DP_HELPERS helpers serve items 1.., the caller serves what is left over, then waits
 * for all of them, so nothing the control plane owns changes meanwhile.
 */
#ifndef BACKENDD_DATAPLANE_POOL_H
#define BACKENDD_DATAPLANE_POOL_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

#define DP_HELPERS 7
#ifndef DP_SPIN_NS
#define DP_SPIN_NS 30000    /* how long to poll before sleeping */
#endif

/* Serve item k of ctx. */
typedef void dp_serve_fn(void *ctx, uint32_t k);

struct dp_pool {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_cond_t done;
    pthread_mutex_t one_call;   /* one event loop at a time uses the helpers */
    dp_serve_fn *serve;
    void *ctx;
    uint32_t next, count, busy, threads;   /* helpers take items 1 + next .. count */
    uint32_t posted;    /* calls so far: a helper polls it for a while before sleeping */
};
#define DP_POOL_INIT { PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, \
                       PTHREAD_COND_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, NULL, NULL, \
                       0, 0, 0, 0, 0 }

/* Rounds come every few tens of microseconds under load, and on a virtual machine a
 * sleep and a wake-up cost about as much: a helper that has just finished polls for the
 * next round for a short while, and the caller polls for its helpers, before sleeping. */
static inline uint64_t dp_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Poll until cond(arg) holds or DP_SPIN_NS have passed; whether it holds. */
static inline int dp_poll(int (*cond)(const void *), const void *arg)
{
    uint64_t end = 0;
    for (uint32_t i = 0;; i++) {
        if (cond(arg))
            return 1;
        if ((i & 63) == 0) {
            uint64_t now = dp_now_ns();
            if (!end)
                end = now + DP_SPIN_NS;
            else if (now >= end)
                return 0;
        }
        __builtin_ia32_pause();
    }
}

struct dp_posted_since {
    const uint32_t *posted;
    uint32_t seen;
};

static int dp_posted_changed(const void *arg)
{
    const struct dp_posted_since *w = arg;
    return __atomic_load_n(w->posted, __ATOMIC_ACQUIRE) != w->seen;
}

static int dp_all_done(const void *arg)
{
    const struct dp_pool *p = arg;
    return !__atomic_load_n(&p->busy, __ATOMIC_ACQUIRE) &&
           __atomic_load_n(&p->next, __ATOMIC_ACQUIRE) == __atomic_load_n(&p->count,
                                                                          __ATOMIC_ACQUIRE);
}

static void *dp_pool_helper(void *arg)
{
    struct dp_pool *p = arg;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        if (p->next == p->count) {
            struct dp_posted_since w = {&p->posted, p->posted};
            pthread_mutex_unlock(&p->lock);
            dp_poll(dp_posted_changed, &w);
            pthread_mutex_lock(&p->lock);
        }
        while (p->next == p->count)
            pthread_cond_wait(&p->wake, &p->lock);
        uint32_t k = 1 + p->next++;
        dp_serve_fn *serve = p->serve;
        void *ctx = p->ctx;
        p->busy++;
        pthread_mutex_unlock(&p->lock);
        serve(ctx, k);
        pthread_mutex_lock(&p->lock);
        if (--p->busy == 0 && p->next == p->count)
            pthread_cond_broadcast(&p->done);
    }
    return NULL;
}

/* Serve items 0..n-1 of ctx, in parallel when n > 1. Returns how many ran on helpers. */
static uint32_t dp_pool_run(struct dp_pool *p, dp_serve_fn *serve, void *ctx, uint32_t n)
{
    uint32_t helped = 0;
    if (n == 0)
        return 0;
    if (n > 1) {
        pthread_mutex_lock(&p->one_call);
        pthread_mutex_lock(&p->lock);
        helped = n - 1 < DP_HELPERS ? n - 1 : DP_HELPERS;
        while (p->threads < helped) {
            pthread_t t;
            pthread_attr_t attr;
            pthread_attr_init(&attr);
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            int rc = pthread_create(&t, &attr, dp_pool_helper, p);
            pthread_attr_destroy(&attr);
            if (rc)
                break;
            p->threads++;
        }
        if (helped > p->threads)
            helped = p->threads;
        p->serve = serve;
        p->ctx = ctx;
        p->next = 0;
        p->count = helped;
        __atomic_store_n(&p->posted, p->posted + 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->lock);
    }
    serve(ctx, 0);
    for (uint32_t k = 1 + helped; k < n; k++)   /* more items than helpers */
        serve(ctx, k);
    if (helped) {
        dp_poll(dp_all_done, p);
        pthread_mutex_lock(&p->lock);
        while (p->busy || p->next != p->count)
            pthread_cond_wait(&p->done, &p->lock);
        p->next = p->count = 0;
        pthread_mutex_unlock(&p->lock);
    }
    if (n > 1)
        pthread_mutex_unlock(&p->one_call);
    return helped;
}

#endif
