/* Primitives every compiled data-plane kernel needs: guest memory lookup, grant pin and
 * unpin with backendd/grants.py's v1/v2 rules, shared-memory loads and barriers.
 *
 * Static inline, included by each kernel's single C file. The layouts of `dp_region`
 * and `dp_env` are the ones the ctypes bindings declare; the grant rules follow
 * backendd/grants.py step by step (it is the specification the tests hold them to).
 */
#ifndef BACKENDD_DATAPLANE_CORE_H
#define BACKENDD_DATAPLANE_CORE_H

#include <stddef.h>
#include <stdint.h>

#include <xen/xen.h>
#include <xen/grant_table.h>

#define DP_PAGE 4096u
#define DP_MAX_TRIES 5          /* grant compare-and-swap retries, then "unstable" */

_Static_assert(sizeof(grant_entry_v1_t) == 8 && sizeof(grant_entry_v2_t) == 16, "grants");

/* Why dp_grant_pin refused a grant (returned negated), as grants.py words it. */
enum { DP_G_NO_TABLE = 1, DP_G_BEYOND, DP_G_TRANSITIVE, DP_G_TYPE, DP_G_DOMAIN,
       DP_G_READONLY, DP_G_UNSTABLE, DP_G_SUB_PAGE, DP_G_FRAME };

struct dp_region {          /* one guest RAM region as mapped in this process */
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct dp_env {             /* guest memory and grant table, refreshed by Python when
                             * either changes (regions added/removed, table regrown) */
    const struct dp_region *regions; /* sorted by gpa, non-overlapping */
    uint32_t nr_regions;
    uint32_t gnt_version;   /* 0: no table */
    uint32_t gnt_entries;
    uint32_t backend_domid;
    uint8_t *gnt_shared;    /* the entries */
    uint8_t *gnt_status;    /* v2: the status words */
    uint32_t *gnt_uses;     /* 2 per gref: uses, writable uses (shared with grants.py) */
    /* The dirty log (SET_LOG, backendd/dirtylog.py); log NULL: logging is off. */
    uint8_t *log;
    uint64_t log_ram_pages; /* bits 0.. are guest frames */
    uint64_t log_gnt_offset; /* byte of the grant table's page bits */
    uint64_t log_gnt_pages;
};

/* ---- the dirty log: bits set with an atomic OR, after the write they log -------- */

static inline void dp_log_bit(uint8_t *bits, uint64_t n)
{
    /* a locked OR: the stores before it are visible before the bit */
    __atomic_fetch_or(bits + (n >> 3), (uint8_t)(1u << (n & 7)), __ATOMIC_SEQ_CST);
}

/* Guest frame `gfn` was written. */
static inline void dp_log_gfn(const struct dp_env *env, uint64_t gfn)
{
    if (env->log && gfn < env->log_ram_pages)
        dp_log_bit(env->log, gfn);
}

/* The guest page holding host address `p` (inside a region) was written. */
static inline void dp_log_host(const struct dp_env *env, const uint8_t *p)
{
    if (!env || !env->log)
        return;
    for (uint32_t i = 0; i < env->nr_regions; i++) {
        const struct dp_region *r = &env->regions[i];
        if (p >= r->host && (uint64_t)(p - r->host) < r->size) {
            dp_log_gfn(env, (r->gpa + (uint64_t)(p - r->host)) >> 12);
            return;
        }
    }
}

/* The grant-table word at `p` (an entry or a v2 status word) was written. */
static inline void dp_log_gnt(const struct dp_env *env, const uint8_t *p)
{
    if (!env->log)
        return;
    uint64_t page = (uint64_t)(p - env->gnt_shared) >> 12;
    if (page < env->log_gnt_pages)
        dp_log_bit(env->log + env->log_gnt_offset, page);
}

static inline uint32_t dp_load32(const uint8_t *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
}

static inline uint16_t dp_load16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED);
}

static inline void dp_store32(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
}

static inline void dp_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
static inline void dp_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
static inline void dp_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* Guest frame -> host address of the whole page, or NULL if not guest memory. */
static inline uint8_t *dp_guest_page(const struct dp_env *env, uint64_t frame)
{
    if (frame > (UINT64_MAX >> 12))   /* the page's address must fit 64 bits */
        return NULL;
    uint64_t gpa = frame << 12;
    uint32_t lo = 0, hi = env->nr_regions;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (env->regions[mid].gpa <= gpa)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const struct dp_region *r = &env->regions[lo - 1];
    uint64_t off = gpa - r->gpa;
    if (off >= r->size || r->size - off < DP_PAGE)
        return NULL;
    return r->host + off;
}

static inline int dp_grant_check(const struct dp_env *env, uint16_t flags, uint16_t domid,
                                 int writable)
{
    unsigned kind = flags & GTF_type_mask;
    if (kind == GTF_transitive && env->gnt_version == 2)
        return -DP_G_TRANSITIVE;    /* transitive grants are not supported */
    if (kind != GTF_permit_access)
        return -DP_G_TYPE;          /* revoked or never granted */
    if (domid != env->backend_domid)
        return -DP_G_DOMAIN;
    if (writable && (flags & GTF_readonly))
        return -DP_G_READONLY;
    return 0;
}

/* Set and clear bits of a shared u16 the guest may change at any moment: loop until our
 * swap lands on the value actually there. Returns the value before. */
static inline uint16_t dp_update16(uint8_t *p, uint16_t set, uint16_t clear)
{
    uint16_t seen = dp_load16(p);
    while (!__atomic_compare_exchange_n((uint16_t *)p, &seen,
                                        (uint16_t)((seen | set) & ~clear), 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        ;
    return seen;
}

/* One use of gref ends: the shared in-use bits go when the last such use ends. */
static inline void dp_grant_unpin(const struct dp_env *env, uint32_t gref, int writable)
{
    uint32_t *uses = &env->gnt_uses[2 * (size_t)gref];
    uint16_t clear = 0;
    uses[0]--;
    if (writable && --uses[1] == 0)
        clear |= GTF_writing;
    if (uses[0] == 0)
        clear |= GTF_reading;
    if (!clear)
        return;
    uint8_t *p = env->gnt_version == 2
        ? env->gnt_status + 2 * (size_t)gref
        : env->gnt_shared + sizeof(grant_entry_v1_t) * (size_t)gref;
    dp_update16(p, 0, clear);
    dp_log_gnt(env, p);
}

/* Pin one grant for reading (and writing if asked). On success (0): *page is the host
 * address of the guest page and [*lo, *hi) the part of it the guest granted; otherwise
 * a negated DP_G_ reason, and nothing stays pinned. */
static inline int dp_grant_pin(const struct dp_env *env, uint32_t gref, int writable,
                               uint8_t **page, uint32_t *lo, uint32_t *hi)
{
    uint16_t want = GTF_reading | (writable ? GTF_writing : 0);
    uint64_t frame;
    int bad;
    if (env->gnt_version == 0)
        return -DP_G_NO_TABLE;
    if (gref >= env->gnt_entries)
        return -DP_G_BEYOND;
    *lo = 0;
    *hi = DP_PAGE;
    if (env->gnt_version == 1) {
        uint8_t *e = env->gnt_shared + sizeof(grant_entry_v1_t) * (size_t)gref;
        uint32_t seen = dp_load32(e);  /* flags | domid << 16 */
        int tries;
        for (tries = 0; tries < DP_MAX_TRIES; tries++) {
            if ((bad = dp_grant_check(env, seen & 0xffff, seen >> 16, writable)))
                return bad;
            /* flags and domid swap together, so the grant cannot be re-targeted to
             * another domain between the check and the pin (as Xen does for v1). */
            uint32_t old = seen;
            if (__atomic_compare_exchange_n((uint32_t *)e, &seen, old | want, 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
                dp_log_gnt(env, e);
                break;
            }
        }
        if (tries == DP_MAX_TRIES)
            return -DP_G_UNSTABLE;
        dp_rmb();           /* the frame is read after pinning */
        frame = dp_load32(e + offsetof(grant_entry_v1_t, frame));
    } else {
        uint8_t *e = env->gnt_shared + sizeof(grant_entry_v2_t) * (size_t)gref;
        uint8_t *status = env->gnt_status + 2 * (size_t)gref;
        uint32_t hdr;
        uint16_t added = 0;
        int tries;
        for (tries = 0; tries < DP_MAX_TRIES; tries++) {
            hdr = dp_load32(e);
            if ((bad = dp_grant_check(env, hdr & 0xffff, hdr >> 16, writable)))
                return bad;
            added = want & ~dp_update16(status, want, 0);
            dp_log_gnt(env, status);
            /* the status store is visible before the entry is read again, so a guest
             * revoking now either sees our bits or we see its revocation */
            dp_mb();
            if (dp_load32(e) == hdr)
                break;
            if (added) {
                dp_update16(status, 0, added);
                dp_log_gnt(env, status);
            }
        }
        if (tries == DP_MAX_TRIES)
            return -DP_G_UNSTABLE;
        dp_rmb();
        uint16_t page_off = dp_load16(e + offsetof(grant_entry_v2_t, sub_page.page_off));
        uint16_t length = dp_load16(e + offsetof(grant_entry_v2_t, sub_page.length));
        frame = __atomic_load_n((uint64_t *)(e + offsetof(grant_entry_v2_t,
                                                          full_page.frame)),
                                __ATOMIC_RELAXED);
        if ((hdr & 0xffff) & GTF_sub_page) {
            if ((uint32_t)page_off + length > DP_PAGE) {
                if (added) {
                    dp_update16(status, 0, added);
                    dp_log_gnt(env, status);
                }
                return -DP_G_SUB_PAGE;
            }
            *lo = page_off;
            *hi = (uint32_t)page_off + length;
        }
    }
    uint32_t *uses = &env->gnt_uses[2 * (size_t)gref];
    uses[0]++;
    uses[1] += writable ? 1 : 0;
    *page = dp_guest_page(env, frame);
    if (!*page) {
        dp_grant_unpin(env, gref, writable);
        return -DP_G_FRAME;
    }
    return 0;
}

/* ---- the shared ring's indexes (io/ring.h) ---------------------------------------- */

/* Every Xen shared ring (DEFINE_RING_TYPES) starts with these four indexes; each kernel
 * asserts its sring agrees. */
enum { DP_SRING_REQ_PROD = 0, DP_SRING_REQ_EVENT = 4, DP_SRING_RSP_PROD = 8,
       DP_SRING_RSP_EVENT = 12 };

/* Requests published and not yet taken, bounded by the free response slots. */
static inline uint32_t dp_ring_unconsumed(const uint8_t *sring, uint32_t size,
                                          uint32_t req_cons, uint32_t rsp_prod_pvt)
{
    uint32_t req = dp_load32(sring + DP_SRING_REQ_PROD) - req_cons;
    uint32_t rsp = size - (req_cons - rsp_prod_pvt);
    return req < rsp ? req : rsp;
}

/* RING_FINAL_CHECK_FOR_REQUESTS */
static inline int dp_ring_final_check(const struct dp_env *env, uint8_t *sring,
                                      uint32_t size, uint32_t req_cons, uint32_t rsp_prod_pvt)
{
    if (dp_ring_unconsumed(sring, size, req_cons, rsp_prod_pvt))
        return 1;
    dp_store32(sring + DP_SRING_REQ_EVENT, req_cons + 1);
    dp_log_host(env, sring);
    dp_mb();
    return dp_ring_unconsumed(sring, size, req_cons, rsp_prod_pvt) > 0;
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY, responses old..new written (old != new):
 * whether the frontend asked to be notified. */
static inline int dp_ring_push(const struct dp_env *env, uint8_t *sring, uint32_t old,
                               uint32_t new)
{
    dp_wmb();               /* the frontend sees the responses before the index */
    dp_log_host(env, sring);    /* logged before the index is visible, and after */
    dp_store32(sring + DP_SRING_RSP_PROD, new);
    dp_log_host(env, sring);
    dp_mb();                /* ... and the index before we read rsp_event */
    return (uint32_t)(new - dp_load32(sring + DP_SRING_RSP_EVENT)) < (uint32_t)(new - old);
}

/* ---- pin and unpin under a per-gref-stripe lock ----------------------------------- */

/* The queues served in parallel by one *_serve_many call may pin the same gref at once:
 * the compare-and-swap on the shared entry and our use count must move together, and
 * "the last use clears the bit" must not interleave with a new pin (Xen holds the
 * active entry's lock for the same reason). One small spinlock per gref stripe, held
 * around dp_grant_pin and dp_grant_unpin. Static: each kernel library has its own. */
#define DP_LOCK_STRIPES 1024
static uint32_t dp_gnt_locks[DP_LOCK_STRIPES];

static inline uint32_t *dp_gnt_lock_of(const struct dp_env *env, uint32_t gref)
{
    uintptr_t h = (uintptr_t)env->gnt_uses / 8 + gref;
    return &dp_gnt_locks[h % DP_LOCK_STRIPES];
}

static inline void dp_gnt_lock(uint32_t *l)
{
    while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(l, __ATOMIC_RELAXED))
            __builtin_ia32_pause();
}

static inline void dp_gnt_unlock(uint32_t *l)
{
    __atomic_store_n(l, 0, __ATOMIC_RELEASE);
}

/* dp_grant_pin, serialised with other queues' pins and unpins of the same gref. */
static inline int dp_grant_pin_locked(const struct dp_env *env, uint32_t gref, int writable,
                                      uint8_t **page, uint32_t *lo, uint32_t *hi)
{
    uint32_t *l = dp_gnt_lock_of(env, gref);
    dp_gnt_lock(l);
    int rc = dp_grant_pin(env, gref, writable, page, lo, hi);
    dp_gnt_unlock(l);
    return rc;
}

/* dp_grant_unpin, likewise. */
static inline void dp_grant_unpin_locked(const struct dp_env *env, uint32_t gref, int writable)
{
    uint32_t *l = dp_gnt_lock_of(env, gref);
    dp_gnt_lock(l);
    dp_grant_unpin(env, gref, writable);
    dp_gnt_unlock(l);
}

#endif
