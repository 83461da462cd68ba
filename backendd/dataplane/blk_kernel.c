/* The compiled blkif data plane: one call serves a whole ring batch.
 *
 * Python (backendd/dataplane/blk.py) stays the control plane: it maps the ring pages,
 * owns the event channels, the stats and the logs, and calls in here once per wake-up
 * (bk_serve) and once per wake-up of the ring's I/O threads (bk_reap). The blocking
 * I/O runs on the kernel's own threads (below). Nothing here calls back into Python.
 *
 * The pure-Python path (backendd/devices/blk/{request,queue}.py, backendd/grants.py) is
 * the specification: every check, every grant rule and every in-flight table update
 * below follows it step by step, and a differential test feeds both the same rings.
 *
 * Order per request, which is the security argument:
 *   copy the slot (XSA-155: the guest may rewrite it; only the copy is looked at)
 *   -> record it in the in-flight table -> decode and check the copy
 *   -> indirect pages: pin, check the window, copy, unpin, check the copy
 *   -> pin every segment's grant (compare-and-swap, v1 or v2 rules), check each window
 *   -> the I/O: inline with RWF_NOWAIT, or handed to the pool when it would block (an
 *      O_DIRECT image's or a block device's transfers: to the queue's io_uring)
 *   -> unpin every grant BEFORE the response (XSA-396: once answered, the guest may
 *      revoke and reuse the page; a pin the persistent-grant cache keeps stays, as that
 *      protocol lets it, until purge or disconnect) -> response with zeroed padding
 *      (XSA-216)
 *   -> publish, then ring.h's notify rule.
 * Every guest value (indices, counts, sectors, grefs, frames, sub-page windows) is
 * checked before it is used as an offset; guest memory is reached only through the
 * region table, one checked page at a time.
 */
#define _GNU_SOURCE
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "core.h"
#include "pool.h"

#include <xen/io/blkif.h>

#define BK_PAGE DP_PAGE
#define BK_SECTOR 512u
#define BK_SECTORS_PER_PAGE (BK_PAGE / BK_SECTOR)
#define BK_SRING_HEADER offsetof(struct blkif_sring, ring)
#define BK_MAX_PENDING 64       /* requests taken and not answered, per ring */
#define BK_BUDGET 64            /* requests taken per call */
#ifndef BK_PUSH_EVERY
#define BK_PUSH_EVERY 8         /* while watched: answers published per push */
#endif
#define BK_MAX_SEGS 256         /* indirect segments we advertise (blkback's default) */
#define BK_MAX_RING_PAGES 16
#define BK_MAX_RING 1024        /* entries: the in-flight table's bound */
#define BK_SEGS_PER_FRAME (BK_PAGE / sizeof(struct blkif_request_segment))
#define BK_SLOT_MAX 112         /* sizeof(union blkif_sring_entry) on x86_64 */

/* The in-flight table (backendd/inflight.py, docs/protocol.md; the binding checks these
 * at load). Queue header: live, ring_size, req_cons, generation, rsp_prod, ring_id.
 * Entries (2 * ring_size used, a request in any free one): state, ring index, response
 * index, generation, the request. */
#define IF_QUEUE_HEADER 64
#define IF_REQ_CONS 8
#define IF_GENERATION 12
#define IF_RSP_PROD 16
#define IF_ENTRY 128
#define IF_ENTRY_HEADER 16
#define IF_E_INDEX 4
#define IF_E_RSP_INDEX 8
#define IF_E_GENERATION 12
#define IF_MAX_ENTRIES 1024
#define IF_FREE 0
#define IF_IN_FLIGHT 1
#define IF_ANSWERED 2

/* The x86_32 guest ABI: uint64_t is 4-aligned there. Xen's header gives the native
 * (x86_64) layout; these are the same declarations under i386 alignment, and a test
 * holds both against the rings/ layouts and a -m32 build of Xen's header. */
#pragma pack(push, 4)
struct bk32_request {
    uint8_t operation;
    uint8_t nr_segments;
    blkif_vdev_t handle;
    uint64_t id;
    blkif_sector_t sector_number;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct bk32_request_discard {
    uint8_t operation;
    uint8_t flag;
    blkif_vdev_t handle;
    uint64_t id;
    blkif_sector_t sector_number;
    uint64_t nr_sectors;
};
struct bk32_request_indirect {
    uint8_t operation;
    uint8_t indirect_op;
    uint16_t nr_segments;
    uint64_t id;
    blkif_sector_t sector_number;
    blkif_vdev_t handle;
    grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint64_t pad;
};
struct bk32_response {
    uint64_t id;
    uint8_t operation;
    int16_t status;
};
#pragma pack(pop)

_Static_assert(sizeof(struct blkif_request) == 112, "x86_64 request");
_Static_assert(sizeof(struct blkif_response) == 16, "x86_64 response");
_Static_assert(sizeof(struct bk32_request) == 108, "x86_32 request");
_Static_assert(sizeof(struct bk32_request_indirect) == 64, "x86_32 indirect");
_Static_assert(sizeof(struct bk32_response) == 12, "x86_32 response");
_Static_assert(offsetof(struct blkif_sring, req_prod) == DP_SRING_REQ_PROD &&
               offsetof(struct blkif_sring, req_event) == DP_SRING_REQ_EVENT &&
               offsetof(struct blkif_sring, rsp_prod) == DP_SRING_RSP_PROD &&
               offsetof(struct blkif_sring, rsp_event) == DP_SRING_RSP_EVENT, "sring indexes");

enum { BK_ABI_X86_64 = 0, BK_ABI_X86_32 = 1 };

/* ---- what Python hands in ------------------------------------------------------- */

struct bk_disk {
    int32_t fd;
    uint32_t sector_size;   /* logical block: 512 or 4096 */
    uint64_t sectors;       /* in 512-byte units */
    uint32_t readonly, discard, discard_secure, is_block;
    uint32_t max_indirect;  /* indirect segments advertised */
    uint32_t inline_io;     /* 0: every transfer goes to the pool (O_DIRECT, block dev) */
    uint32_t external;      /* 1: the caller moves the data (an NBD export): pool jobs
                             * come back in bk_out.jobs instead of going to the kernel's
                             * I/O threads */
};

struct bk_config {
    uint8_t *pages[BK_MAX_RING_PAGES];
    uint32_t nr_pages;
    uint32_t size;          /* ring entries, a power of two */
    uint32_t abi;
    uint32_t max_pending;
    uint32_t start;         /* req_cons = rsp_prod_pvt at attach */
    uint32_t req_cons;      /* != start after an in-flight table recovery */
    uint8_t *inflight;      /* this queue's table, or NULL */
    int32_t wake_fd;        /* an eventfd the I/O threads write when jobs are done */
    int32_t kick_fd;        /* the guest's kicks: drained when served without one */
    struct bk_disk disk;
    uint32_t persistent;    /* 1: both ends said feature-persistent=1: keep a cache */
    uint32_t pg_limit;      /* cached pins at most (blkback's 1056), 0..BK_PG_MAX */
};

struct bk_stats {
    uint64_t requests, reads, writes, bytes_read, bytes_written;
    uint64_t errors, invalid, unsupported, flushes, discards, inline_io, pooled;
};

enum { BK_NOTIFY = 1, BK_MORE = 2, BK_BLOCKED = 4, BK_CORRUPT = 8, BK_INTERNAL = 16 };

struct bk_out {
    struct bk_stats stats;
    uint32_t flags;
    uint32_t njobs;          /* disk.external: slots for the caller, in order */
    uint16_t jobs[BK_MAX_PENDING];
    uint8_t job_flush[BK_MAX_PENDING];
    uint32_t inpool;         /* requests in the pool (I/O threads or caller), not done */
    uint32_t notified;       /* bk_serve_*poll: events it signalled to the guest itself */
    uint64_t refused_id;     /* the first request refused in this call, for the log */
    uint32_t refused_why;    /* enum bk_why; 0: none */
    uint32_t saturated;      /* bk_serve_*poll: events not written, the eventfd being full */
};

/* Why a request was refused (the binding turns these into request.py's words). */
enum bk_why {
    WHY_NONE, WHY_UNKNOWN_OP, WHY_NSEG, WHY_READONLY, WHY_SEG_PAGE, WHY_ALIGN, WHY_WRAP,
    WHY_BEYOND, WHY_INDIRECT_OP, WHY_INDIRECT_NSEG, WHY_INDIRECT_PAGES, WHY_GRANT,
    WHY_SUBPAGE, WHY_NO_DISCARD, WHY_NO_SECURE_DISCARD,
};

/* ---- persistent grants: the ring's cache of pinned grants ------------------------ */

/* With feature-persistent, data and indirect pages are pinned through this cache, with
 * the rules of docs/blk.md ("Persistent grants") and backendd/devices/blk/persistent.py,
 * the reference it is tested against: a hit uses the cached pin; a miss pins and caches,
 * purging the entry released longest ago among those no request uses when full; when
 * every entry is in use the pin is not cached (overflow) and goes with its request. A
 * read-only entry a request needs writable is upgraded when idle (writable pin first,
 * then the read-only one let go), else that request gets an uncached writable pin.
 * Each entry keeps the guest frame and the granted window, not a host address: the
 * page is looked up again in the current regions at every use. Only the thread serving
 * the ring (or the loop, in bk_reap) touches the cache; the pins and unpins beneath it
 * go through the per-gref-stripe locks like any other. */
#define BK_PG_MAX 65536

struct bk_pgent {
    uint32_t gref, users;
    uint64_t frame;
    uint32_t lo, hi;
    uint32_t writable;
    uint64_t seq;                   /* when it was cached, for the order of saved ones */
    int32_t hnext;                  /* the gref's hash chain; the free list */
    int32_t prev, next;             /* the idle list, least recently released first */
};

struct bk_pg {
    uint32_t on, limit, count, closed;
    uint32_t hmask;
    uint64_t seq;
    int32_t *heads;
    struct bk_pgent *e;
    int32_t idle_head, idle_tail, free_head;
    uint64_t hits, misses, purged, overflow, upgrades;
};

/* ---- per-queue state -------------------------------------------------------------- */

/* The queue's io_uring (see "io_uring" below): the transfers of an O_DIRECT image or a
 * block device. Set up at the first such transfer; fd -1 until then (or for good when
 * set-up failed: failed 1, the I/O threads serve). */
struct bk_uring {
    int32_t fd;
    uint32_t failed;
    uint32_t inflight;              /* submitted, completion not reaped */
    uint32_t sq_mask, cq_mask;
    uint32_t *sq_head, *sq_tail, *sq_array;
    uint32_t *cq_head, *cq_tail;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map, *sqe_map;
    size_t sq_len, cq_len, sqe_len;
    uint64_t submitted;             /* transfers (and continuations) submitted */
};

enum { SLOT_FREE = 0, SLOT_WAITING, SLOT_POOL };

struct bk_pending {
    uint32_t state;
    uint32_t ring_index;
    uint64_t id;
    uint8_t op;             /* answered with; an indirect request's inner op */
    uint8_t flush;
    uint8_t write;
    uint8_t _pad;
    int16_t status;
    int32_t error;          /* errno of a failed system call */
    uint64_t sector;
    uint64_t nr_sectors;
    uint32_t nseg;          /* grants pinned */
    uint32_t if_entry;      /* its in-flight table entry */
    uint32_t iov_next;      /* first iovec not yet moved */
    uint64_t done;          /* bytes moved so far */
    uint32_t grefs[BK_MAX_SEGS];
    int32_t pent[BK_MAX_SEGS];      /* the persistent-grant entry used, or -1: own pin */
    struct iovec iov[BK_MAX_SEGS];
    uint8_t *page[BK_MAX_SEGS];     /* the pinned pages, for the dirty log */
};

struct bk_queue {
    uint8_t *pages[BK_MAX_RING_PAGES];
    uint32_t nr_pages, size, mask, abi, entry_size, rsp_size, max_pending;
    uint32_t req_cons, rsp_prod_pvt, pushed;
    uint32_t halted, draining, inpool;
    uint32_t poll_busy;     /* bk_queue_set_poll: no kick wanted while jobs are out */
    uint32_t polling;       /* in bk_serve_*poll: an empty ring asks for no kick yet */
    int32_t call_fd;        /* in bk_serve_*poll: the guest's event, signalled here */
    uint32_t push_every;    /* in bk_serve_*poll: answers per push in a long batch (0: one) */
    int32_t front_cpu;      /* the CPU its guest was last seen running on (-1: not known) */
    uint32_t since_push;    /* requests answered inline since the last push */
    uint8_t *inflight;
    struct bk_disk disk;
    uint32_t fifo[BK_MAX_PENDING];   /* waiting slots, in ring order */
    uint32_t fifo_head, fifo_count;
    uint32_t nunpub;
    uint16_t unpub[BK_MAX_RING];     /* table entries answered, response not published */
    /* With the I/O threads (under iopool.lock): jobs waiting, jobs done and not reaped. */
    int32_t wake_fd, kick_fd;
    uint32_t in_run, running;
    struct bk_queue *run_next;
    uint16_t jq[BK_MAX_PENDING];
    uint32_t jq_head, jq_count;
    uint16_t done[BK_MAX_PENDING];
    uint32_t ndone;
    uint32_t if_cap, if_nfree;
    uint16_t if_free[IF_MAX_ENTRIES]; /* free entries; the last is used next */
    /* Without a table, responses go out in ring order: one waits here, by request ring
     * index, until those to every earlier index are written. */
    uint8_t held[BK_MAX_RING];
    uint8_t held_rsp[BK_MAX_RING][sizeof(struct blkif_response)];
    struct bk_pending slots[BK_MAX_PENDING];
    const struct dp_env *env;        /* the current call's: its dirty log */
    struct bk_pg pg;                 /* persistent grants (pg.on) */
    struct bk_uring ur;              /* O_DIRECT image or block device: its transfers */
};

/* ---- shared memory access (core.h) and the ring ------------------------------- */

#define SRING_IDX(q, field) ((q)->pages[0] + offsetof(struct blkif_sring, field))

/* Slot `index` of a ring laid over pages that are contiguous only in the guest's view:
 * a slot may straddle two pages. */
static void ring_copy(struct bk_queue *q, uint32_t index, uint8_t *buf, uint32_t len,
                      int to_ring)
{
    size_t off = BK_SRING_HEADER + (size_t)(index & q->mask) * q->entry_size;
    size_t page = off / BK_PAGE, start = off % BK_PAGE;
    size_t first = len < BK_PAGE - start ? len : BK_PAGE - start;
    if (to_ring) {
        memcpy(q->pages[page] + start, buf, first);
        dp_log_host(q->env, q->pages[page]);
        if (first < len) {
            memcpy(q->pages[page + 1], buf + first, len - first);
            dp_log_host(q->env, q->pages[page + 1]);
        }
    } else {
        memcpy(buf, q->pages[page] + start, first);
        if (first < len)
            memcpy(buf + first, q->pages[page + 1], len - first);
    }
}

/* ---- the in-flight table ---------------------------------------------------------- */

static inline uint8_t *if_entry(struct bk_queue *q, uint32_t entry)
{
    return q->inflight + IF_QUEUE_HEADER + (size_t)entry * IF_ENTRY;
}

static inline uint32_t if_u32(struct bk_queue *q, uint32_t entry, uint32_t off)
{
    uint32_t v;
    memcpy(&v, if_entry(q, entry) + off, 4);
    return v;
}

/* Which entries hold requests of the current generation; the others are free. The same
 * walk, in the same order, as InflightQueue._scan, so both planes use the same entries. */
void bk_inflight_scan(struct bk_queue *q)
{
    if (!q->inflight)
        return;
    uint32_t gen;
    memcpy(&gen, q->inflight + IF_GENERATION, 4);
    static __thread uint32_t seen[IF_MAX_ENTRIES];
    uint32_t nseen = 0;
    q->if_nfree = 0;
    for (uint32_t k = q->if_cap; k-- > 0;) {
        uint8_t state = *if_entry(q, k);
        uint32_t index = if_u32(q, k, IF_E_INDEX);
        int taken = state != IF_FREE && if_u32(q, k, IF_E_GENERATION) == gen;
        for (uint32_t j = 0; taken && j < nseen; j++)
            if (seen[j] == index)
                taken = 0;
        if (taken)
            seen[nseen++] = index;
        else
            q->if_free[q->if_nfree++] = (uint16_t)k;
    }
}

/* The entry holding ring index `index` of this generation (a replayed request), or a
 * free one; -1 if there is none (cannot happen: 2 * ring_size entries). */
static int32_t if_claim(struct bk_queue *q, uint32_t index, int replayed)
{
    if (replayed) {
        uint32_t gen;
        memcpy(&gen, q->inflight + IF_GENERATION, 4);
        for (uint32_t k = q->if_cap; k-- > 0;) {
            if (*if_entry(q, k) != IF_FREE && if_u32(q, k, IF_E_GENERATION) == gen &&
                if_u32(q, k, IF_E_INDEX) == index) {
                int free_slot = 0;
                for (uint32_t j = 0; j < q->if_nfree; j++)
                    if (q->if_free[j] == k)
                        free_slot = 1;
                if (!free_slot)
                    return (int32_t)k;
            }
        }
    }
    if (q->if_nfree == 0)
        return -1;
    uint32_t k = q->if_free[--q->if_nfree];
    if (*if_entry(q, k) != IF_FREE)     /* void (an older generation): free it first */
        __atomic_store_n(if_entry(q, k), (uint8_t)IF_FREE, __ATOMIC_RELEASE);
    return (int32_t)k;
}

static int32_t if_in_flight(struct bk_queue *q, uint32_t index, const uint8_t *raw,
                            int replayed)
{
    int32_t k = if_claim(q, index, replayed);
    if (k < 0)
        return -1;
    uint8_t *e = if_entry(q, (uint32_t)k);
    memcpy(e + IF_ENTRY_HEADER, raw, q->entry_size);
    memcpy(e + IF_E_INDEX, &index, 4);
    memcpy(e + IF_E_GENERATION, q->inflight + IF_GENERATION, 4);
    __atomic_store_n(e, (uint8_t)IF_IN_FLIGHT, __ATOMIC_RELEASE); /* state last */
    return k;
}

static void if_answering(struct bk_queue *q, uint32_t entry, uint32_t rsp_index)
{
    uint8_t *e = if_entry(q, entry);
    memcpy(e + IF_E_RSP_INDEX, &rsp_index, 4);
    __atomic_store_n(e, (uint8_t)IF_ANSWERED, __ATOMIC_RELEASE);
}

/* ---- responses and the notify rule ------------------------------------------------ */

static void answer(struct bk_queue *q, uint64_t id, uint8_t op, int16_t status,
                   uint32_t index, uint32_t entry)
{
    uint8_t buf[sizeof(struct blkif_response)];
    if (q->halted)
        return;     /* a corrupt ring: write nothing more into it */
    memset(buf, 0, sizeof(buf));   /* padding goes out as zeros (XSA-216) */
    if (q->abi == BK_ABI_X86_32) {
        struct bk32_response r;
        memset(&r, 0, sizeof(r));
        r.id = id;
        r.operation = op;
        r.status = status;
        memcpy(buf, &r, sizeof(r));
    } else {
        struct blkif_response r;
        memset(&r, 0, sizeof(r));
        r.id = id;
        r.operation = op;
        r.status = status;
        memcpy(buf, &r, sizeof(r));
    }
    if (q->inflight) {
        if_answering(q, entry, q->rsp_prod_pvt);
        if (q->nunpub < BK_MAX_RING)
            q->unpub[q->nunpub++] = (uint16_t)entry;
        ring_copy(q, q->rsp_prod_pvt, buf, q->rsp_size, 1);
        q->rsp_prod_pvt++;
        return;
    }
    /* In ring order: rsp_prod never passes an unanswered request, so after a restart
     * without a table the shared rsp_prod alone says what was answered. */
    q->held[index & q->mask] = 1;
    memcpy(q->held_rsp[index & q->mask], buf, sizeof(buf));
    while (q->held[q->rsp_prod_pvt & q->mask]) {
        q->held[q->rsp_prod_pvt & q->mask] = 0;
        ring_copy(q, q->rsp_prod_pvt, q->held_rsp[q->rsp_prod_pvt & q->mask], q->rsp_size, 1);
        q->rsp_prod_pvt++;
    }
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY. */
static void push(struct bk_queue *q, struct bk_out *out)
{
    uint32_t old = q->pushed, new = q->rsp_prod_pvt;
    if (q->halted || new == old)
        return;
    if (dp_ring_push(q->env, q->pages[0], old, new))
        out->flags |= BK_NOTIFY;
    q->pushed = new;
    if (q->inflight && q->nunpub) {
        /* published now: a restarted daemon must not run these again */
        for (uint32_t i = 0; i < q->nunpub; i++) {
            __atomic_store_n(if_entry(q, q->unpub[i]), (uint8_t)IF_FREE, __ATOMIC_RELEASE);
            q->if_free[q->if_nfree++] = q->unpub[i];
        }
        dp_store32(q->inflight + IF_RSP_PROD, q->rsp_prod_pvt);
    }
    q->nunpub = 0;
}

/* ---- decoding and checking one request (backendd/devices/blk/request.py) ------- */

struct req {
    uint8_t op, nseg8, flag, inner;
    uint16_t nseg16;
    uint64_t id, sector, nr_sectors;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
    grant_ref_t igrefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
};

#define DECODE(T_REQ, T_DIS, T_IND)                                                  \
    do {                                                                             \
        T_REQ r; T_DIS d; T_IND n;                                                   \
        memcpy(&r, raw, sizeof(r)); memcpy(&d, raw, sizeof(d));                     \
        memcpy(&n, raw, sizeof(n));                                                  \
        f->op = r.operation; f->nseg8 = r.nr_segments; f->id = r.id;                 \
        f->sector = r.sector_number; memcpy(f->seg, r.seg, sizeof(f->seg));          \
        f->flag = d.flag; f->nr_sectors = d.nr_sectors;                              \
        f->inner = n.indirect_op; f->nseg16 = n.nr_segments;                         \
        memcpy(f->igrefs, n.indirect_grefs, sizeof(f->igrefs));                      \
    } while (0)

static void decode(uint32_t abi, const uint8_t *raw, struct req *f)
{
    /* id and sector sit at the same offsets in every variant of one ABI */
    if (abi == BK_ABI_X86_32)
        DECODE(struct bk32_request, struct bk32_request_discard, struct bk32_request_indirect);
    else
        DECODE(struct blkif_request, struct blkif_request_discard,
               struct blkif_request_indirect);
}

struct seg {
    uint32_t gref;
    uint8_t first, last;
};

/* _check_transfer: segments inside their page, alignment, range, write permission.
 * Returns the total 512-byte sectors, or -1. */
static int64_t check_transfer(const struct bk_disk *disk, uint8_t op, uint64_t sector,
                              const struct seg *segs, uint32_t nseg, uint32_t *why)
{
    if (op != BLKIF_OP_READ && disk->readonly)
        return *why = WHY_READONLY, -1;
    uint32_t mask = disk->sector_size / BK_SECTOR - 1;
    uint64_t total = 0;
    for (uint32_t i = 0; i < nseg; i++) {
        uint32_t first = segs[i].first, last = segs[i].last;
        if (last >= BK_SECTORS_PER_PAGE || last < first)
            return *why = WHY_SEG_PAGE, -1;
        uint32_t nsec = last - first + 1;
        if ((first | nsec) & mask)
            return *why = WHY_ALIGN, -1;
        total += nsec;
    }
    if (total && (sector & mask))
        return *why = WHY_ALIGN, -1;
    if (total) {
        if (sector > UINT64_MAX - total)
            return *why = WHY_WRAP, -1;     /* sector + total would not fit a u64 */
        if (sector + total > disk->sectors)
            return *why = WHY_BEYOND, -1;
    }
    return (int64_t)total;
}

static int is_flush_op(uint8_t op)
{
    return op == BLKIF_OP_WRITE_BARRIER || op == BLKIF_OP_FLUSH_DISKCACHE;
}

static struct bk_pending *slot_alloc(struct bk_queue *q)
{
    for (uint32_t i = 0; i < BK_MAX_PENDING; i++)
        if (q->slots[i].state == SLOT_FREE)
            return &q->slots[i];
    return NULL;
}

/* ---- the persistent-grant cache (see struct bk_pg) ------------------------------ */

static inline uint32_t pg_hash(const struct bk_pg *pg, uint32_t gref)
{
    return (gref * 2654435761u) & pg->hmask;
}

static int32_t pg_find(const struct bk_pg *pg, uint32_t gref)
{
    for (int32_t i = pg->heads[pg_hash(pg, gref)]; i >= 0; i = pg->e[i].hnext)
        if (pg->e[i].gref == gref)
            return i;
    return -1;
}

static void pg_idle_unlink(struct bk_pg *pg, int32_t i)
{
    struct bk_pgent *e = &pg->e[i];
    if (e->prev >= 0)
        pg->e[e->prev].next = e->next;
    else
        pg->idle_head = e->next;
    if (e->next >= 0)
        pg->e[e->next].prev = e->prev;
    else
        pg->idle_tail = e->prev;
    e->prev = e->next = -1;
}

static void pg_idle_append(struct bk_pg *pg, int32_t i)
{
    struct bk_pgent *e = &pg->e[i];
    e->next = -1;
    e->prev = pg->idle_tail;
    if (pg->idle_tail >= 0)
        pg->e[pg->idle_tail].next = i;
    else
        pg->idle_head = i;
    pg->idle_tail = i;
}

/* Out of the hash and back to the free list (its pin is the caller's to release). */
static void pg_remove(struct bk_pg *pg, int32_t i)
{
    int32_t *link = &pg->heads[pg_hash(pg, pg->e[i].gref)];
    while (*link != i)
        link = &pg->e[*link].hnext;
    *link = pg->e[i].hnext;
    pg->e[i].hnext = pg->free_head;
    pg->free_head = i;
    pg->count--;
}

/* Release one cached pin (the grant table may be gone by now: nothing to clear then). */
static void pg_unpin(const struct dp_env *env, const struct bk_pgent *e)
{
    if (env->gnt_version && e->gref < env->gnt_entries)
        dp_grant_unpin_locked(env, e->gref, (int)e->writable);
}

/* The guest frame of a host address inside a region (a page dp_grant_pin returned). */
static uint64_t pg_frame(const struct dp_env *env, const uint8_t *p)
{
    for (uint32_t i = 0; i < env->nr_regions; i++) {
        const struct dp_region *r = &env->regions[i];
        if (p >= r->host && (uint64_t)(p - r->host) < r->size)
            return (r->gpa + (uint64_t)(p - r->host)) >> 12;
    }
    return UINT64_MAX;  /* cannot happen: the pin found it there */
}

/* Cache a pin just taken (a free entry must exist). */
static int32_t pg_insert(struct bk_pg *pg, const struct dp_env *env, uint32_t gref,
                         int writable, const uint8_t *page, uint32_t lo, uint32_t hi)
{
    int32_t i = pg->free_head;
    struct bk_pgent *e = &pg->e[i];
    pg->free_head = e->hnext;
    e->gref = gref;
    e->users = 0;
    e->frame = pg_frame(env, page);
    e->lo = lo;
    e->hi = hi;
    e->writable = writable != 0;
    e->seq = pg->seq++;
    e->prev = e->next = -1;
    uint32_t h = pg_hash(pg, gref);
    e->hnext = pg->heads[h];
    pg->heads[h] = i;
    pg->count++;
    return i;
}

/* The idle entry released longest ago goes (its pin released). 0: none is idle. */
static int pg_purge_one(struct bk_pg *pg, const struct dp_env *env)
{
    int32_t i = pg->idle_head;
    if (i < 0)
        return 0;
    pg_idle_unlink(pg, i);
    pg_remove(pg, i);
    pg_unpin(env, &pg->e[i]);
    pg->purged++;
    return 1;
}

/* One use of entry i begins: its page in the current regions. */
static int pg_use(struct bk_pg *pg, const struct dp_env *env, int32_t i, uint8_t **page,
                  uint32_t *lo, uint32_t *hi)
{
    struct bk_pgent *e = &pg->e[i];
    uint8_t *p = dp_guest_page(env, e->frame);
    if (!p)
        return -DP_G_FRAME;     /* its region is gone (the VMM removed it meanwhile) */
    if (e->users++ == 0)
        pg_idle_unlink(pg, i);
    *page = p;
    *lo = e->lo;
    *hi = e->hi;
    return 0;
}

/* A pin of gref for one request, writable if asked: *ent is the cache entry it uses, or
 * -1 for a pin of its own (released with the request, as without the cache). Returns 0
 * or a negated DP_G_ reason, as dp_grant_pin, and nothing is held then. The counters
 * move exactly as persistent.py's. */
static int pg_acquire(struct bk_queue *q, const struct dp_env *env, uint32_t gref,
                      int writable, uint8_t **page, uint32_t *lo, uint32_t *hi, int32_t *ent)
{
    struct bk_pg *pg = &q->pg;
    *ent = -1;
    if (!pg->on)
        return dp_grant_pin_locked(env, gref, writable, page, lo, hi);
    int32_t i = pg->count ? pg_find(pg, gref) : -1;
    if (i >= 0) {
        struct bk_pgent *e = &pg->e[i];
        if (writable && !e->writable) {
            if (e->users) {     /* in use: an uncached writable pin of its own */
                pg->overflow++;
                return dp_grant_pin_locked(env, gref, 1, page, lo, hi);
            }
            /* Writable first, then let the read-only pin go: the grant never looks
             * unused to the frontend in between. A read-only grant fails here and the
             * entry stays cached read-only. */
            int rc = dp_grant_pin_locked(env, gref, 1, page, lo, hi);
            if (rc)
                return rc;
            pg_unpin(env, e);
            e->writable = 1;
            e->frame = pg_frame(env, *page);
            e->lo = *lo;
            e->hi = *hi;
            pg->upgrades++;
        } else {
            pg->hits++;
        }
        int rc = pg_use(pg, env, i, page, lo, hi);
        if (rc == 0)
            *ent = i;
        return rc;
    }
    int rc = dp_grant_pin_locked(env, gref, writable, page, lo, hi);
    if (rc)
        return rc;
    if (pg->closed || (pg->count >= pg->limit && !pg_purge_one(pg, env))) {
        pg->overflow++;
        return 0;
    }
    pg->misses++;
    i = pg_insert(pg, env, gref, writable, *page, *lo, *hi);
    pg->e[i].users = 1;
    *ent = i;
    return 0;
}

/* One use ends: an own pin is released; a cached one becomes idle when its last use
 * ends (most recently released: purged last), or is released if the cache is closed. */
static void pg_put(struct bk_queue *q, const struct dp_env *env, uint32_t gref, int32_t ent,
                   int writable)
{
    struct bk_pg *pg = &q->pg;
    if (ent < 0) {
        dp_grant_unpin_locked(env, gref, writable);
        return;
    }
    struct bk_pgent *e = &pg->e[ent];
    if (--e->users)
        return;
    if (pg->closed) {
        pg_remove(pg, ent);
        pg_unpin(env, e);
    } else {
        pg_idle_append(pg, ent);
    }
}

static int pg_init(struct bk_pg *pg, uint32_t limit)
{
    uint32_t nb = 16;
    while (nb < 2 * limit)
        nb <<= 1;
    pg->heads = malloc(nb * sizeof(*pg->heads));
    pg->e = calloc(limit ? limit : 1, sizeof(*pg->e));
    if (!pg->heads || !pg->e) {
        free(pg->heads);
        free(pg->e);
        pg->heads = NULL;
        pg->e = NULL;
        return -1;
    }
    for (uint32_t k = 0; k < nb; k++)
        pg->heads[k] = -1;
    for (uint32_t k = 0; k < limit; k++)
        pg->e[k].hnext = k + 1 < limit ? (int32_t)(k + 1) : -1;
    pg->free_head = limit ? 0 : -1;
    pg->idle_head = pg->idle_tail = -1;
    pg->hmask = nb - 1;
    pg->limit = limit;
    pg->on = 1;
    return 0;
}

static void slot_release(struct bk_queue *q, const struct dp_env *env, struct bk_pending *s)
{
    /* accept pins every segment writable exactly when the request reads the disk (a
     * cached entry it used may be writable for a write: the cache knows) */
    for (uint32_t i = 0; i < s->nseg; i++)
        pg_put(q, env, s->grefs[i], s->pent[i], !s->write);
    s->nseg = 0;
}

/* Copy an indirect request's segment descriptors out of its indirect pages. */
static int read_indirect(struct bk_queue *q, const struct dp_env *env, const struct req *f,
                         uint32_t nseg, struct seg *segs)
{
    uint32_t pages = (nseg + BK_SEGS_PER_FRAME - 1) / BK_SEGS_PER_FRAME;
    size_t left = (size_t)nseg * sizeof(struct blkif_request_segment);
    static __thread struct blkif_request_segment copy[BK_MAX_SEGS];
    uint8_t *dst = (uint8_t *)copy;
    for (uint32_t p = 0; p < pages; p++) {
        uint8_t *page;
        uint32_t lo, hi;
        int32_t ent;
        size_t n = left < BK_PAGE ? left : BK_PAGE;
        if (pg_acquire(q, env, f->igrefs[p], 0, &page, &lo, &hi, &ent))
            return -1;
        int ok = lo == 0 && n <= hi;
        if (ok)
            memcpy(dst, page, n);   /* a private copy, then let go */
        pg_put(q, env, f->igrefs[p], ent, 0);
        if (!ok)
            return -1;
        dst += n;
        left -= n;
    }
    for (uint32_t i = 0; i < nseg; i++) {
        segs[i].gref = copy[i].gref;
        segs[i].first = copy[i].first_sect;
        segs[i].last = copy[i].last_sect;
    }
    return 0;
}

/* Take one private copy: validate, pin, queue (or answer at once). */
static void accept(struct bk_queue *q, const struct dp_env *env, const uint8_t *raw,
                   uint32_t index, uint32_t entry, struct bk_out *out)
{
    struct req f;
    struct seg segs[BK_MAX_SEGS];
    uint32_t nseg;
    uint8_t op;
    int64_t total = 0;
    uint32_t why = WHY_NONE;
    decode(q->abi, raw, &f);
    out->stats.requests++;
    op = f.op;
    if (op == BLKIF_OP_READ || op == BLKIF_OP_WRITE || is_flush_op(op)) {
        nseg = f.nseg8;
        if ((nseg == 0 && !is_flush_op(op)) || nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST) {
            why = WHY_NSEG;
            goto invalid;
        }
        for (uint32_t i = 0; i < nseg; i++) {
            segs[i].gref = f.seg[i].gref;
            segs[i].first = f.seg[i].first_sect;
            segs[i].last = f.seg[i].last_sect;
        }
        total = check_transfer(&q->disk, op, f.sector, segs, nseg, &why);
        if (total < 0)
            goto invalid;
    } else if (op == BLKIF_OP_INDIRECT) {
        op = f.inner;   /* answered with the inner operation, as blkback does */
        nseg = f.nseg16;
        why = WHY_INDIRECT_OP;
        if (op != BLKIF_OP_READ && op != BLKIF_OP_WRITE)
            goto invalid;
        why = WHY_INDIRECT_NSEG;
        if (nseg == 0 || nseg > q->disk.max_indirect || nseg > BK_MAX_SEGS)
            goto invalid;
        why = WHY_READONLY;
        if (op == BLKIF_OP_WRITE && q->disk.readonly)
            goto invalid;
        why = WHY_INDIRECT_PAGES;
        if ((nseg + BK_SEGS_PER_FRAME - 1) / BK_SEGS_PER_FRAME >
            BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
            goto invalid;
        why = WHY_GRANT;
        if (read_indirect(q, env, &f, nseg, segs))
            goto invalid;
        total = check_transfer(&q->disk, op, f.sector, segs, nseg, &why);
        if (total < 0)
            goto invalid;
    } else if (op == BLKIF_OP_DISCARD) {
        int secure = f.flag & BLKIF_DISCARD_SECURE;
        nseg = 0;
        why = q->disk.discard ? WHY_NO_SECURE_DISCARD : WHY_NO_DISCARD;
        if (!q->disk.discard || (secure && !q->disk.discard_secure))
            goto unsupported;
        why = WHY_READONLY;
        if (q->disk.readonly)
            goto invalid;
        if (f.nr_sectors) {
            why = f.sector > UINT64_MAX - f.nr_sectors ? WHY_WRAP : WHY_BEYOND;
            if (f.sector > UINT64_MAX - f.nr_sectors ||
                f.sector + f.nr_sectors > q->disk.sectors)
                goto invalid;
        }
    } else {
        why = WHY_UNKNOWN_OP;
        goto unsupported;
    }

    struct bk_pending *s = slot_alloc(q);
    if (!s) {           /* cannot happen: room is checked before taking */
        out->flags |= BK_INTERNAL;
        goto invalid;
    }
    s->ring_index = index;
    s->if_entry = entry;
    s->id = f.id;
    s->op = op;
    s->flush = is_flush_op(op);
    s->write = op != BLKIF_OP_READ;
    s->status = BLKIF_RSP_OKAY;
    s->error = 0;
    s->sector = f.sector;
    s->nr_sectors = op == BLKIF_OP_DISCARD ? f.nr_sectors : (uint64_t)total;
    s->nseg = 0;
    s->iov_next = 0;
    s->done = 0;
    /* A read fills guest pages, so it needs them writable; a write only reads them. */
    int writable = op == BLKIF_OP_READ;
    for (uint32_t i = 0; i < nseg; i++) {
        uint8_t *page;
        uint32_t lo, hi;
        int32_t ent;
        if (pg_acquire(q, env, segs[i].gref, writable, &page, &lo, &hi, &ent)) {
            slot_release(q, env, s);
            why = WHY_GRANT;
            goto invalid;
        }
        s->grefs[s->nseg] = segs[i].gref;
        s->pent[s->nseg] = ent;
        s->nseg++;
        uint32_t start = segs[i].first * BK_SECTOR;
        uint32_t len = (segs[i].last - segs[i].first + 1u) * BK_SECTOR;
        if (start < lo || start + len > hi) {   /* outside a v2 sub-page grant */
            slot_release(q, env, s);
            why = WHY_SUBPAGE;
            goto invalid;
        }
        s->iov[i].iov_base = page + start;
        s->iov[i].iov_len = len;
        s->page[i] = page;
    }
    s->state = SLOT_WAITING;
    q->fifo[(q->fifo_head + q->fifo_count) % BK_MAX_PENDING] = (uint32_t)(s - q->slots);
    q->fifo_count++;
    return;

    int16_t status;
invalid:
    out->stats.invalid++;
    status = BLKIF_RSP_ERROR;
    goto refuse;
unsupported:
    out->stats.unsupported++;
    status = BLKIF_RSP_EOPNOTSUPP;
refuse:
    if (!out->refused_why) {
        out->refused_id = f.id;
        out->refused_why = why;
    }
    answer(q, f.id, op, status, index, entry);
}

/* ---- the I/O ---------------------------------------------------------------------- */

/* n more bytes of a transfer moved: its iovecs start past them. */
static void advance(struct bk_pending *s, size_t n)
{
    s->done += (uint64_t)n;
    while (s->iov_next < s->nseg && n >= s->iov[s->iov_next].iov_len) {
        n -= s->iov[s->iov_next].iov_len;
        s->iov[s->iov_next].iov_len = 0;
        s->iov_next++;
    }
    if (n) {
        s->iov[s->iov_next].iov_base = (uint8_t *)s->iov[s->iov_next].iov_base + n;
        s->iov[s->iov_next].iov_len -= n;
    }
}

/* One step of a transfer moved res bytes, or failed with -res: an error is answered
 * ERROR with its errno kept, nothing moved (the backing store ended before the request
 * did) ERROR with EIO. Returns whether the transfer goes on (not failed, not done). */
static int step_moved(struct bk_pending *s, int64_t res)
{
    if (res <= 0) {
        s->status = BLKIF_RSP_ERROR;
        s->error = res ? (int32_t)-res : EIO;
        return 0;
    }
    advance(s, (size_t)res);
    return s->iov_next < s->nseg;
}

/* Move what is left of a transfer. Returns 0 when done (status set on error), 1 when
 * it would block (RWF_NOWAIT only): the pool continues from where it stopped; 2 when
 * the filesystem does not do RWF_NOWAIT for this direction at all. */
static int transfer(struct bk_pending *s, int fd, int nowait)
{
    while (s->iov_next < s->nseg) {
        off_t off = (off_t)(s->sector * BK_SECTOR + s->done);
        struct iovec *iov = &s->iov[s->iov_next];
        int cnt = (int)(s->nseg - s->iov_next);
        ssize_t n = s->write ? pwritev2(fd, iov, cnt, off, nowait ? RWF_NOWAIT : 0)
                             : preadv2(fd, iov, cnt, off, nowait ? RWF_NOWAIT : 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (nowait && errno == EAGAIN)
                return 1;
            if (nowait && errno == EOPNOTSUPP)
                return 2;
        }
        if (!step_moved(s, n < 0 ? -(int64_t)errno : (int64_t)n))
            return 0;
    }
    return 0;
}

/* Only reads are tried inline. A write waits for a frozen filesystem in the VFS before
 * RWF_NOWAIT is looked at (file_start_write), so even a NOWAIT write can stall the
 * event loop; and ext4 refuses RWF_NOWAIT buffered writes anyway (EOPNOTSUPP, every one). */
static int needs_pool(const struct bk_queue *q, const struct bk_pending *s)
{
    return s->write || s->flush || s->op == BLKIF_OP_DISCARD || !q->disk.inline_io;
}

static void account(const struct bk_pending *s, struct bk_out *out)
{
    struct bk_stats *st = &out->stats;
    if (s->status != BLKIF_RSP_OKAY) {
        st->errors++;
        return;
    }
    if (s->flush)
        st->flushes++;
    if (s->op == BLKIF_OP_DISCARD)
        st->discards++;
    else if (s->op == BLKIF_OP_READ) {
        st->reads++;
        st->bytes_read += s->nr_sectors * BK_SECTOR;
    } else if (s->nr_sectors) {
        st->writes++;
        st->bytes_written += s->nr_sectors * BK_SECTOR;
    }
}

/* Done: grants go back before the response (XSA-396), then the answer. */
static void finish(struct bk_queue *q, const struct dp_env *env, struct bk_pending *s,
                   struct bk_out *out)
{
    if (env->log && !s->write)     /* the pages a read filled, before the answer */
        for (uint32_t i = 0; i < s->nseg; i++)
            dp_log_host(env, s->page[i]);
    slot_release(q, env, s);
    account(s, out);
    answer(q, s->id, s->op, s->status, s->ring_index, s->if_entry);
    s->state = SLOT_FREE;
}

/* ---- the I/O threads ---------------------------------------------------------------- */

/* The blocking part of one request, on an I/O thread: flush, discard, or the transfer
 * (continued from where an inline attempt stopped). Touches only that slot. */
static void run_io(const struct bk_queue *q, struct bk_pending *s)
{
    int fd = q->disk.fd;
    if (s->flush && fdatasync(fd) < 0) {
        s->status = BLKIF_RSP_ERROR;
        s->error = errno;
        return;
    }
    if (s->op == BLKIF_OP_DISCARD) {
        if (!s->nr_sectors)
            return;
        uint64_t range[2] = {s->sector * BK_SECTOR, s->nr_sectors * BK_SECTOR};
        int rc = q->disk.is_block
            ? ioctl(fd, BLKDISCARD, range)
            : fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        (off_t)range[0], (off_t)range[1]);
        if (rc < 0) {
            s->status = BLKIF_RSP_ERROR;
            s->error = errno;
        }
    } else if (s->nseg) {
        transfer(s, fd, 0);
    }
}

/* Threads of the kernel's own run the blocking I/O: no Python, no GIL, no future per
 * job. Rings with jobs waiting are served in turn, BK_IO_BATCH jobs at a time, so a
 * ring with a deep backlog on a slow disk delays another ring's job by at most a batch
 * per thread. A thread that finishes a ring's jobs puts them on the ring's done list
 * and, if the list was empty, writes the ring's wake eventfd; the event loop then reaps
 * them all with one bk_reap (unpin, answer, publish), so grant use counts only ever
 * change on the thread that owns the control plane. */
#define BK_IO_BATCH 4
#define BK_IO_THREADS_MAX 64

static struct {
    pthread_mutex_t lock;
    pthread_cond_t work;
    struct bk_queue *head, *tail;   /* rings with jobs waiting, in turn */
    uint32_t threads, want, idle;
} iopool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0, 4, 0};

static void run_append_locked(struct bk_queue *q)
{
    q->in_run = 1;
    q->run_next = NULL;
    if (iopool.tail)
        iopool.tail->run_next = q;
    else
        iopool.head = q;
    iopool.tail = q;
}

static void *io_thread(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&iopool.lock);
    for (;;) {
        while (!iopool.head) {
            iopool.idle++;
            pthread_cond_wait(&iopool.work, &iopool.lock);
            iopool.idle--;
        }
        struct bk_queue *q = iopool.head;
        iopool.head = q->run_next;
        if (!iopool.head)
            iopool.tail = NULL;
        uint16_t jobs[BK_IO_BATCH];
        uint32_t n = 0;
        while (n < BK_IO_BATCH && q->jq_count) {
            jobs[n++] = q->jq[q->jq_head];
            q->jq_head = (q->jq_head + 1) % BK_MAX_PENDING;
            q->jq_count--;
        }
        if (q->jq_count)
            run_append_locked(q);   /* to the back of the line */
        else
            q->in_run = 0;
        q->running++;
        pthread_mutex_unlock(&iopool.lock);
        for (uint32_t k = 0; k < n; k++)
            run_io(q, &q->slots[jobs[k]]);
        pthread_mutex_lock(&iopool.lock);
        q->running--;
        int wake = q->ndone == 0;
        for (uint32_t k = 0; k < n; k++)
            q->done[q->ndone++] = jobs[k];
        if (wake && q->wake_fd >= 0) {
            /* under the lock: once the loop has reaped everything, no thread touches
             * the ring (or its fd) again */
            uint64_t one = 1;
            ssize_t rc = write(q->wake_fd, &one, sizeof(one));
            (void)rc;   /* EAGAIN: the counter is saturated, the loop wakes anyway */
        }
    }
    return NULL;
}

/* Hand jobs (slots, in ring order) to the I/O threads. */
static void pool_submit(struct bk_queue *q, const uint16_t *jobs, uint32_t n)
{
    if (!n)
        return;
    pthread_mutex_lock(&iopool.lock);
    for (uint32_t k = 0; k < n; k++) {
        q->jq[(q->jq_head + q->jq_count) % BK_MAX_PENDING] = jobs[k];
        q->jq_count++;
    }
    if (!q->in_run)
        run_append_locked(q);
    /* a thread per batch: wake idle ones, start more (up to the bound) if short */
    uint32_t need = (n + BK_IO_BATCH - 1) / BK_IO_BATCH;
    uint32_t wake = need < iopool.idle ? need : iopool.idle;
    for (uint32_t k = 0; k < wake; k++)
        pthread_cond_signal(&iopool.work);
    need -= wake;
    while (need && iopool.threads < iopool.want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, io_thread, NULL);
        pthread_attr_destroy(&attr);
        if (rc)
            break;
        iopool.threads++;
        need--;
    }
    pthread_mutex_unlock(&iopool.lock);
}

/* How many I/O threads the kernel may run (1..BK_IO_THREADS_MAX); more are started only
 * when work waits for them. Returns the number now allowed. */
uint32_t bk_io_threads(uint32_t n)
{
    pthread_mutex_lock(&iopool.lock);
    if (n >= 1 && n <= BK_IO_THREADS_MAX)
        iopool.want = n;
    n = iopool.want;
    pthread_mutex_unlock(&iopool.lock);
    return n;
}

/* ---- io_uring: the transfers of O_DIRECT images and block devices ----------------- */

/* Every read and write of a disk whose I/O all waits for the device (an O_DIRECT image,
 * a block device) is submitted to the queue's own io_uring by the thread serving the
 * queue, and its completion is read from the completion ring by the thread that reaps
 * it: no hand-off to an I/O thread, no futex wake-up, no context switch per transfer.
 * The ring's wake eventfd is registered with it, so its completions wake the event loop
 * or a watching thread exactly as the I/O threads' do. A queue is served by one thread
 * at a time (the event loop, or the one helper thread a call gives it), and both the
 * submission and the completion ring are only ever touched there. Such transfers count
 * in q->inpool like any pool job: a flush waits for them, and a suspend or stop waits
 * until they are reaped. Flush, discard and everything of a page-cache image stay with
 * the I/O threads; so does a transfer the io_uring would not take (its set-up failed:
 * no io_uring in the kernel, or a seccomp filter; submission refused) or that stopped
 * short (the pool finishes it as it finishes a read that met EAGAIN). bk_set_uring(0)
 * keeps new queues on the I/O threads. */
static uint32_t bk_uring_on = 1;

/* Whether queues set up from now on use io_uring (on < 0: only ask). Returns the
 * setting before. */
int32_t bk_set_uring(int32_t on)
{
    int32_t was = (int32_t)__atomic_load_n(&bk_uring_on, __ATOMIC_RELAXED);
    if (on >= 0)
        __atomic_store_n(&bk_uring_on, on != 0, __ATOMIC_RELAXED);
    return was;
}

/* The queue's io_uring: whether it has one, transfers submitted, in flight now. */
void bk_queue_uring(const struct bk_queue *q, uint64_t out[3])
{
    out[0] = q->ur.fd >= 0;
    out[1] = q->ur.submitted;
    out[2] = q->ur.inflight;
}

static void uring_unmap(struct bk_uring *u)
{
    if (u->sqe_map)
        munmap(u->sqe_map, u->sqe_len);
    if (u->cq_map && u->cq_map != u->sq_map)
        munmap(u->cq_map, u->cq_len);
    if (u->sq_map)
        munmap(u->sq_map, u->sq_len);
    if (u->fd >= 0)
        close(u->fd);
    u->sq_map = u->cq_map = u->sqe_map = NULL;
    u->fd = -1;
}

static void *uring_map(int fd, size_t len, off_t off)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   fd, off);
    return p == MAP_FAILED ? NULL : p;
}

/* Set up the queue's io_uring (0), or mark it failed for good (-1). */
static int uring_init(struct bk_queue *q)
{
    struct bk_uring *u = &q->ur;
    struct io_uring_params p;
    if (q->wake_fd < 0)
        goto fail;
    /* Never more than BK_MAX_PENDING transfers out: the submission ring is empty
     * whenever io_uring_enter returns, and the completion ring cannot overflow. */
    uint32_t flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP | IORING_SETUP_SUBMIT_ALL;
    int fd;
    do {
        memset(&p, 0, sizeof(p));
        p.flags = flags;
        p.cq_entries = 2 * BK_MAX_PENDING;
        fd = (int)syscall(__NR_io_uring_setup, BK_MAX_PENDING, &p);
        if (fd < 0 && errno == EINVAL && (flags & IORING_SETUP_SUBMIT_ALL))
            flags &= ~(uint32_t)IORING_SETUP_SUBMIT_ALL;   /* before Linux 5.18 */
        else
            break;
    } while (1);
    if (fd < 0)
        goto fail;
    u->fd = fd;
    u->sq_len = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    u->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (u->cq_len > u->sq_len)
            u->sq_len = u->cq_len;
        u->cq_len = u->sq_len;
    }
    u->sq_map = uring_map(fd, u->sq_len, IORING_OFF_SQ_RING);
    if (!u->sq_map)
        goto fail_unmap;
    u->cq_map = p.features & IORING_FEAT_SINGLE_MMAP
        ? u->sq_map : uring_map(fd, u->cq_len, IORING_OFF_CQ_RING);
    if (!u->cq_map)
        goto fail_unmap;
    u->sqe_len = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sqe_map = uring_map(fd, u->sqe_len, IORING_OFF_SQES);
    if (!u->sqe_map)
        goto fail_unmap;
    uint8_t *sq = u->sq_map, *cq = u->cq_map;
    u->sq_head = (uint32_t *)(sq + p.sq_off.head);
    u->sq_tail = (uint32_t *)(sq + p.sq_off.tail);
    u->sq_mask = *(uint32_t *)(sq + p.sq_off.ring_mask);
    u->sq_array = (uint32_t *)(sq + p.sq_off.array);
    u->cq_head = (uint32_t *)(cq + p.cq_off.head);
    u->cq_tail = (uint32_t *)(cq + p.cq_off.tail);
    u->cq_mask = *(uint32_t *)(cq + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    u->sqes = u->sqe_map;
    if (p.sq_entries < BK_MAX_PENDING || p.cq_entries < BK_MAX_PENDING)
        goto fail_unmap;
    int32_t efd = q->wake_fd;
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_EVENTFD, &efd, 1) < 0)
        goto fail_unmap;
    return 0;
fail_unmap:
    uring_unmap(u);
fail:
    u->failed = 1;
    return -1;
}

/* Whether transfer s goes to the queue's io_uring (set up now if need be). */
static int uring_takes(struct bk_queue *q, const struct bk_pending *s)
{
    if (q->disk.inline_io || q->disk.external || s->flush || s->op == BLKIF_OP_DISCARD ||
        !s->nseg || q->ur.failed)
        return 0;
    if (q->ur.fd < 0 &&
        (!__atomic_load_n(&bk_uring_on, __ATOMIC_RELAXED) || uring_init(q)))
        return 0;
    return 1;
}

/* Submit what is left of the transfers `slots`; those the kernel did not take are
 * appended to rest (for the I/O threads). */
static void uring_submit(struct bk_queue *q, const uint16_t *slots, uint32_t n,
                         uint16_t *rest, uint32_t *nrest)
{
    struct bk_uring *u = &q->ur;
    if (!n)
        return;
    uint32_t tail = *u->sq_tail;    /* only this thread moves it */
    for (uint32_t k = 0; k < n; k++) {
        struct bk_pending *s = &q->slots[slots[k]];
        uint32_t idx = tail++ & u->sq_mask;
        struct io_uring_sqe *e = &u->sqes[idx];
        uint32_t cnt = s->nseg - s->iov_next;
        memset(e, 0, sizeof(*e));
        e->fd = q->disk.fd;
        e->off = s->sector * BK_SECTOR + s->done;
        if (cnt == 1) {
            e->opcode = s->write ? IORING_OP_WRITE : IORING_OP_READ;
            e->addr = (uint64_t)(uintptr_t)s->iov[s->iov_next].iov_base;
            e->len = (uint32_t)s->iov[s->iov_next].iov_len;
        } else {
            e->opcode = s->write ? IORING_OP_WRITEV : IORING_OP_READV;
            e->addr = (uint64_t)(uintptr_t)&s->iov[s->iov_next];
            e->len = cnt;
        }
        e->user_data = slots[k];
        u->sq_array[idx] = idx;
    }
    __atomic_store_n(u->sq_tail, tail, __ATOMIC_RELEASE);
    uint32_t left = n;
    while (left) {
        long rc = syscall(__NR_io_uring_enter, u->fd, left, 0, 0, NULL, 0);
        if (rc > 0)
            left -= (uint32_t)rc < left ? (uint32_t)rc : left;
        else if (!(rc < 0 && errno == EINTR))
            break;      /* EAGAIN, EBUSY, ENOMEM...: the rest go to the I/O threads */
    }
    /* What the kernel did not consume is taken back: the tail returns to its head (no
     * SQPOLL, so the kernel reads the submission ring only inside io_uring_enter). */
    uint32_t head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
    for (uint32_t i = head; i != tail; i++)
        rest[(*nrest)++] = (uint16_t)u->sqes[i & u->sq_mask].user_data;
    __atomic_store_n(u->sq_tail, head, __ATOMIC_RELEASE);
    u->inflight += n - (tail - head);
    u->submitted += n - (tail - head);
}

/* Completions posted and not yet read (a hint for the watching threads). */
static int uring_due(const struct bk_queue *q)
{
    return q->ur.inflight &&
           __atomic_load_n(q->ur.cq_tail, __ATOMIC_ACQUIRE) != *q->ur.cq_head;
}

/* Read the completion ring: finished transfers go to done (n at most BK_MAX_PENDING in
 * all), as run_io would have left them; those that moved only part are submitted again
 * from where they stopped, or go to the I/O threads (EINTR, EAGAIN, or not taken). */
static void uring_reap(struct bk_queue *q, uint16_t *done, uint32_t *ndone)
{
    struct bk_uring *u = &q->ur;
    uint16_t again[BK_MAX_PENDING], pool[BK_MAX_PENDING];
    uint32_t nagain = 0, npool = 0;
    if (!u->inflight)
        return;
    uint32_t head = *u->cq_head, tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++) {
        const struct io_uring_cqe *c = &u->cqes[head & u->cq_mask];
        uint64_t slot = c->user_data;
        int32_t res = c->res;
        u->inflight--;
        if (slot >= BK_MAX_PENDING || q->slots[slot].state != SLOT_POOL)
            continue;   /* cannot happen: only our own transfers are submitted */
        struct bk_pending *s = &q->slots[slot];
        if (res == -EINTR || res == -EAGAIN) {
            pool[npool++] = (uint16_t)slot;
            continue;
        }
        if (step_moved(s, res))
            again[nagain++] = (uint16_t)slot;
        else
            done[(*ndone)++] = (uint16_t)slot;
    }
    __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
    uring_submit(q, again, nagain, pool, &npool);
    pool_submit(q, pool, npool);
}

/* Start what waits: inline when the page cache has it, else to the I/O threads. A flush
 * or barrier starts only once everything before it has completed, and nothing after it
 * starts until it has completed. A request runs inline only while nothing taken before
 * it is with the threads, so requests start in ring order, as on the Python path. */
static void poll_signal(struct bk_out *out, int32_t call_fd);

static void dispatch(struct bk_queue *q, const struct dp_env *env, struct bk_out *out)
{
    uint16_t jobs[BK_MAX_PENDING], ujobs[BK_MAX_PENDING];
    uint32_t njobs = 0, nujobs = 0;
    while (q->fifo_count && !q->draining) {
        struct bk_pending *s = &q->slots[q->fifo[q->fifo_head]];
        if (s->flush) {
            if (q->inpool)
                break;
            q->draining = 1;
        }
        q->fifo_head = (q->fifo_head + 1) % BK_MAX_PENDING;
        q->fifo_count--;
        if (!needs_pool(q, s) && !q->inpool && transfer(s, q->disk.fd, 1) == 0) {
            out->stats.inline_io++;
            finish(q, env, s, out);
            /* While watched, a long batch is published and signalled in parts, so the
             * guest works on the first answers while the rest are served. */
            if (q->push_every && ++q->since_push >= q->push_every) {
                q->since_push = 0;
                push(q, out);
                poll_signal(out, q->call_fd);
            }
            continue;
        }
        s->state = SLOT_POOL;
        q->inpool++;
        out->stats.pooled++;
        if (q->disk.external) {
            out->job_flush[out->njobs] = s->flush;
            out->jobs[out->njobs++] = (uint16_t)(s - q->slots);
        } else if (uring_takes(q, s)) {
            ujobs[nujobs++] = (uint16_t)(s - q->slots);
        } else {
            jobs[njobs++] = (uint16_t)(s - q->slots);
        }
    }
    uring_submit(q, ujobs, nujobs, jobs, &njobs);
    pool_submit(q, jobs, njobs);
}

/* ---- taking requests ------------------------------------------------------------ */

static int final_check(struct bk_queue *q)
{
    return dp_ring_final_check(q->env, q->pages[0], q->size, q->req_cons,
                               q->rsp_prod_pvt);
}

static void halt(struct bk_queue *q, const struct dp_env *env)
{
    q->halted = 1;
    while (q->fifo_count) {     /* never started: just let go */
        struct bk_pending *s = &q->slots[q->fifo[q->fifo_head]];
        q->fifo_head = (q->fifo_head + 1) % BK_MAX_PENDING;
        q->fifo_count--;
        slot_release(q, env, s);
        s->state = SLOT_FREE;
    }
}

static int take(struct bk_queue *q, const struct dp_env *env, struct bk_out *out)
{
    uint8_t raws[BK_BUDGET][BK_SLOT_MAX];
    uint32_t entries[BK_BUDGET];
    uint32_t budget = BK_BUDGET;
    while (budget > 0) {
        uint32_t pending = q->req_cons - q->rsp_prod_pvt;
        if (pending >= q->max_pending) {
            out->flags |= BK_BLOCKED;   /* a completion resumes us */
            return 0;
        }
        uint32_t room = q->max_pending - pending;
        uint32_t limit = room < budget ? room : budget;
        uint32_t first = q->req_cons, cons = first, n = 0;
        uint32_t prod = dp_load32(SRING_IDX(q, req_prod));     /* read once */
        dp_rmb();
        if ((uint32_t)(prod - q->rsp_prod_pvt) > q->size)
            return -1;  /* more requests than the ring holds: corrupt */
        while (cons != prod && n < limit) {
            if ((uint32_t)(cons - q->rsp_prod_pvt) >= q->size)
                break;  /* RING_REQUEST_CONS_OVERFLOW */
            memset(raws[n], 0, BK_SLOT_MAX);
            ring_copy(q, cons, raws[n], q->entry_size, 0);
            cons++;
            n++;
        }
        q->req_cons = cons;
        budget -= n;
        if (q->inflight && n) {
            for (uint32_t k = 0; k < n; k++) {
                int32_t e = if_in_flight(q, first + k, raws[k], 0);
                if (e < 0) {
                    out->flags |= BK_INTERNAL;  /* no free entry: a bug of ours */
                    return -1;
                }
                entries[k] = (uint32_t)e;
            }
            dp_store32(q->inflight + IF_REQ_CONS, q->req_cons);
        }
        for (uint32_t k = 0; k < n; k++)
            accept(q, env, raws[k], first + k, q->inflight ? entries[k] : 0, out);
        if (n == 0) {
            /* With jobs out and a caller that looks at the ring again after each
             * completion, the guest need not kick: req_event is left where it is. The
             * same while bk_serve_*poll watches the ring: it asks at the end. */
            if ((q->poll_busy && q->inpool) || q->polling)
                return 0;
            if (!final_check(q))
                return 0;
        }
    }
    out->flags |= BK_MORE;  /* budget spent, more may be waiting */
    return 0;
}

/* ---- the entry points ------------------------------------------------------------- */

struct bk_queue *bk_queue_new(const struct bk_config *cfg)
{
    if (cfg->nr_pages == 0 || cfg->nr_pages > BK_MAX_RING_PAGES || cfg->size == 0 ||
        (cfg->size & (cfg->size - 1)) || cfg->size > BK_MAX_RING || cfg->abi > 1 ||
        cfg->max_pending == 0 || cfg->max_pending > BK_MAX_PENDING)
        return NULL;
    uint32_t esz = cfg->abi == BK_ABI_X86_32 ? sizeof(struct bk32_request)
                                             : sizeof(union blkif_sring_entry);
    if (BK_SRING_HEADER + (size_t)cfg->size * esz > (size_t)cfg->nr_pages * BK_PAGE)
        return NULL;
    struct bk_queue *q = calloc(1, sizeof(*q));
    if (!q)
        return NULL;
    memcpy(q->pages, cfg->pages, sizeof(q->pages));
    q->nr_pages = cfg->nr_pages;
    q->size = cfg->size;
    q->mask = cfg->size - 1;
    q->abi = cfg->abi;
    q->entry_size = esz;
    q->rsp_size = cfg->abi == BK_ABI_X86_32 ? sizeof(struct bk32_response)
                                            : sizeof(struct blkif_response);
    q->max_pending = cfg->max_pending;
    q->req_cons = cfg->req_cons;
    q->rsp_prod_pvt = q->pushed = cfg->start;
    q->inflight = cfg->inflight;
    q->if_cap = 2 * cfg->size;
    if (q->if_cap > IF_MAX_ENTRIES) {
        free(q);
        return NULL;
    }
    if (cfg->persistent && (cfg->pg_limit > BK_PG_MAX || pg_init(&q->pg, cfg->pg_limit))) {
        free(q);
        return NULL;
    }
    q->disk = cfg->disk;
    q->wake_fd = cfg->wake_fd;
    q->kick_fd = cfg->kick_fd;
    q->front_cpu = -1;
    q->call_fd = -1;
    q->ur.fd = -1;
    bk_inflight_scan(q);
    return q;
}

void bk_queue_free(struct bk_queue *q)
{
    pthread_mutex_lock(&iopool.lock);
    int busy = q->in_run || q->running || q->jq_count;
    pthread_mutex_unlock(&iopool.lock);
    if (busy || q->ur.inflight)
        return;     /* cannot happen (freed once all is reaped); leaked rather than freed */
    uring_unmap(&q->ur);
    free(q->pg.heads);
    free(q->pg.e);
    free(q);
}

void bk_queue_set_disk(struct bk_queue *q, const struct bk_disk *disk)
{
    q->disk = *disk;
}

/* req_cons, rsp_prod_pvt, pushed, waiting, in the pool, halted, draining */
void bk_queue_state(const struct bk_queue *q, uint32_t out[7])
{
    out[0] = q->req_cons;
    out[1] = q->rsp_prod_pvt;
    out[2] = q->pushed;
    out[3] = q->fifo_count;
    out[4] = q->inpool;
    out[5] = q->halted;
    out[6] = q->draining;
}

/* ---- the persistent-grant cache, for the control plane ------------------------ */

/* hits, misses, purged, overflow, upgrades (since the ring began), and the pins cached
 * now. */
void bk_pg_stats(const struct bk_queue *q, uint64_t out[6])
{
    const struct bk_pg *pg = &q->pg;
    out[0] = pg->hits;
    out[1] = pg->misses;
    out[2] = pg->purged;
    out[3] = pg->overflow;
    out[4] = pg->upgrades;
    out[5] = pg->count;
}

/* The cached grefs and their writable flag, in purge order (idle ones, released longest
 * ago first, then those in use in the order they were cached): what a migrated cache
 * pins again. Returns how many there are (at most max are written). */
uint32_t bk_pg_saved(const struct bk_queue *q, uint32_t *grefs, uint8_t *writable,
                     uint32_t max)
{
    const struct bk_pg *pg = &q->pg;
    uint32_t n = 0;
    if (!pg->on)
        return 0;
    for (int32_t i = pg->idle_head; i >= 0; i = pg->e[i].next, n++)
        if (n < max) {
            grefs[n] = pg->e[i].gref;
            writable[n] = (uint8_t)pg->e[i].writable;
        }
    /* in use: by seq (a suspended ring has none) */
    uint64_t last = 0;
    int have = 0;
    for (;;) {
        int32_t best = -1;
        for (uint32_t i = 0; i < pg->limit; i++) {
            const struct bk_pgent *e = &pg->e[i];
            if (!e->users || (have && e->seq <= last))
                continue;
            if (best < 0 || e->seq < pg->e[best].seq)
                best = (int32_t)i;
        }
        if (best < 0)
            break;
        if (n < max) {
            grefs[n] = pg->e[best].gref;
            writable[n] = (uint8_t)pg->e[best].writable;
        }
        n++;
        last = pg->e[best].seq;
        have = 1;
    }
    return n;
}

/* Pin and cache gref, idle, as a migrated cache had it (appended to the purge order, no
 * counter moves); skipped when closed, cached already or full. Returns 0 or a negated
 * DP_G_ reason (not cached: a later use pins it as a miss). */
int32_t bk_pg_restore(struct bk_queue *q, const struct dp_env *env, uint32_t gref,
                      uint32_t writable)
{
    struct bk_pg *pg = &q->pg;
    uint8_t *page;
    uint32_t lo, hi;
    if (!pg->on || pg->closed || pg_find(pg, gref) >= 0 || pg->count >= pg->limit)
        return 0;
    int rc = dp_grant_pin_locked(env, gref, writable != 0, &page, &lo, &hi);
    if (rc)
        return rc;
    pg_idle_append(pg, pg_insert(pg, env, gref, writable != 0, page, lo, hi));
    return 0;
}

/* Release every cached pin (those in use when their use ends) and cache nothing more:
 * disconnect, close, a halted ring let go. */
void bk_pg_close(struct bk_queue *q, const struct dp_env *env)
{
    struct bk_pg *pg = &q->pg;
    q->env = env;
    if (!pg->on)
        return;
    pg->closed = 1;
    while (pg->idle_head >= 0) {
        int32_t i = pg->idle_head;
        pg_idle_unlink(pg, i);
        pg_remove(pg, i);
        pg_unpin(env, &pg->e[i]);
    }
}

/* take, dispatch, push: one batch, its results added to out */
static void serve_batch(struct bk_queue *q, const struct dp_env *env, struct bk_out *out)
{
    if (take(q, env, out)) {
        halt(q, env);
        if (!(out->flags & BK_INTERNAL))
            out->flags |= BK_CORRUPT;
        return;
    }
    dispatch(q, env, out);
    /* The take loop stopped for want of room, but what filled the room was answered
     * inline just now: no pool completion will come to resume this ring, so it asks to
     * be served again. */
    if ((out->flags & BK_BLOCKED) && q->req_cons - q->rsp_prod_pvt < q->max_pending) {
        out->flags &= ~(uint32_t)BK_BLOCKED;
        out->flags |= BK_MORE;
    }
    push(q, out);
}

/* One wake-up: take what the guest queued, check, pin, do what the page cache has,
 * answer, publish. Pool work goes to the I/O threads (disk.external: out->jobs). */
void bk_serve(struct bk_queue *q, const struct dp_env *env, struct bk_out *out)
{
    memset(out, 0, sizeof(*out));
    q->env = env;
    if (q->halted)
        return;
    serve_batch(q, env, out);
    out->inpool = q->inpool;
}

/* The guest's event: an eventfd write, unless the counter is full (then the guest has
 * events pending anyway and a write would block). Whether it was written. */
static int signal_guest(int32_t call_fd)
{
    struct pollfd p = {call_fd, POLLOUT, 0};
    uint64_t one = 1;
    int rc;
    do
        rc = poll(&p, 1, 0);
    while (rc < 0 && errno == EINTR);
    if (rc != 1 || !(p.revents & POLLOUT))
        return 0;
    ssize_t w;
    do
        w = write(call_fd, &one, sizeof(one));
    while (w < 0 && errno == EINTR);
    return w == (ssize_t)sizeof(one);
}

/* The steps of bk_serve_round_poll (below), which watches rings after a batch. */
static void poll_signal(struct bk_out *out, int32_t call_fd)
{
    if (!(out->flags & BK_NOTIFY))
        return;
    out->flags &= ~(uint32_t)BK_NOTIFY;
    if (signal_guest(call_fd))
        out->notified++;
    else
        out->saturated++;
}

/* Whether the caller must see the ring now: halted, or jobs only Python can do. */
static int poll_stop(const struct bk_queue *q, const struct bk_out *out)
{
    return q->halted || out->njobs || (out->flags & (BK_CORRUPT | BK_INTERNAL));
}

static void poll_end(struct bk_queue *q, struct bk_out *out)
{
    q->polling = 0;
    q->call_fd = -1;
    q->push_every = 0;
    /* Blocked for want of room, but jobs reaped since made room: no completion will come
     * to resume the ring (as in serve_batch). */
    if ((out->flags & BK_BLOCKED) && q->req_cons - q->rsp_prod_pvt < q->max_pending) {
        out->flags &= ~(uint32_t)BK_BLOCKED;
        out->flags |= BK_MORE;
    }
    if (!q->halted && !(out->flags & (BK_MORE | BK_BLOCKED)) &&
        !(q->poll_busy && q->inpool)) {
        /* As take() does on an empty ring: ask for a kick, then look once more. A kick
         * the guest sent meanwhile is read first, as the requests it announced are
         * served (or seen here). */
        if (q->kick_fd >= 0) {
            uint64_t v;
            struct iovec iov = {&v, sizeof(v)};
            ssize_t rc = preadv2(q->kick_fd, &iov, 1, -1, RWF_NOWAIT);
            (void)rc;
        }
        if (final_check(q))
            out->flags |= BK_MORE;
    }
    out->inpool = q->inpool;
}

/* ---- several rings at once -------------------------------------------------------- */

/* The caller serves the first ring, helper threads (pool.h) the others. */
struct bk_many {
    struct bk_queue *const *qs;
    const struct dp_env *const *envs;
    struct bk_out *const *outs;
};

static void serve_item(void *ctx, uint32_t k)
{
    const struct bk_many *m = ctx;
    bk_serve(m->qs[k], m->envs[k], m->outs[k]);
}

/* Serve n rings, in parallel when n > 1. Returns how many ran on helper threads. */
static struct dp_pool serve_pool = DP_POOL_INIT;

uint32_t bk_serve_many(struct bk_queue *const *qs, const struct dp_env *const *envs,
                       struct bk_out *const *outs, uint32_t n)
{
    struct bk_many m = {qs, envs, outs};
    return dp_pool_run(&serve_pool, serve_item, &m, n);
}

/* One loop turn: the rings kicked (due[k] == 1) and, beside them, every ring that may be
 * served (due[k] == 2) and already has requests published and room to take them. Two
 * frontends kick independently, so a turn rarely finds both kicks: without this the
 * rings would be served one after the other on the loop's thread and the helpers would
 * seldom run. A ring served without its kick has the kick drained (it is served now; a
 * kick still reported by the loop's poll finds nothing and is dropped). served[k] says
 * which were served; returns how many ran on helper threads. */
#define BK_ROUND_MAX 1024
uint32_t bk_serve_round(struct bk_queue *const *qs, const struct dp_env *const *envs,
                        struct bk_out *const *outs, uint32_t n, const uint8_t *due,
                        uint8_t *served)
{
    struct bk_queue *sq[BK_ROUND_MAX];
    const struct dp_env *se[BK_ROUND_MAX];
    struct bk_out *so[BK_ROUND_MAX];
    uint32_t m = 0;
    for (uint32_t k = 0; k < n; k++) {
        struct bk_queue *q = qs[k];
        int take_it = due[k] == 1;
        if (due[k] == 2 && !q->halted && q->req_cons - q->rsp_prod_pvt < q->max_pending &&
            dp_ring_unconsumed(q->pages[0], q->size, q->req_cons, q->rsp_prod_pvt)) {
            take_it = 1;
            if (q->kick_fd >= 0) {
                uint64_t v;
                struct iovec iov = {&v, sizeof(v)};
                ssize_t rc = preadv2(q->kick_fd, &iov, 1, -1, RWF_NOWAIT);
                (void)rc;   /* nothing there, or no NOWAIT: the kick comes as usual */
            }
        }
        served[k] = (uint8_t)(take_it && m < BK_ROUND_MAX);
        if (served[k]) {
            sq[m] = q;
            se[m] = envs[k];
            so[m] = outs[k];
            m++;
        }
    }
    return bk_serve_many(sq, se, so, m);
}

static void stats_add(struct bk_stats *into, const struct bk_stats *add)
{
    uint64_t *a = (uint64_t *)into;
    const uint64_t *b = (const uint64_t *)add;
    for (size_t i = 0; i < sizeof(*add) / sizeof(uint64_t); i++)
        a[i] += b[i];
}

/* Add one batch's (or reap's) results for a ring to what the call has gathered for it. */
static void out_merge(struct bk_out *into, const struct bk_out *add)
{
    stats_add(&into->stats, &add->stats);
    into->flags |= add->flags;
    into->njobs += add->njobs;
    if (!into->refused_why && add->refused_why) {
        into->refused_id = add->refused_id;
        into->refused_why = add->refused_why;
    }
}

static void reap(struct bk_queue *q, const struct dp_env *env, struct bk_out *out);

/* Whether a watched ring has requests published and room to take them. */
static int ring_has_requests(const struct bk_queue *q)
{
    return !q->halted && q->req_cons - q->rsp_prod_pvt < q->max_pending &&
           dp_ring_unconsumed(q->pages[0], q->size, q->req_cons, q->rsp_prod_pvt);
}

/* Jobs the I/O threads or the io_uring have finished (a hint: reap() locks). */
static int jobs_due(const struct bk_queue *q)
{
    return __atomic_load_n(&q->ndone, __ATOMIC_ACQUIRE) || uring_due(q);
}

/* ... or jobs finished. */
static int poll_due(const struct bk_queue *q)
{
    return jobs_due(q) || ring_has_requests(q);
}

#define BK_POLL_MAX 16

/* bk_serve_round_poll's call: the rings it watches (due ones only), split among threads. */
struct bk_poll {
    struct bk_queue *const *qs;
    const struct dp_env *const *envs;
    struct bk_out *const *outs;
    const uint8_t *due;
    const int32_t *call_fds;
    uint32_t *parallel;
    uint32_t ring[BK_POLL_MAX];     /* indices of the due rings */
    uint32_t nrings, nthreads, poll_ns;
    uint32_t busy;                  /* threads not idle */
    uint64_t end;                   /* the budget's end */
};

/* Rings whose every request is with the I/O threads (an O_DIRECT disk, a burst of
 * writes) are waited for asleep: their guests wait for those answers, and the disk
 * takes far longer than a wake-up, while a spinning thread would take a CPU another
 * guest's ring could use. req_event is set first (the guest kicks for what it asks
 * meanwhile), then the thread sleeps on the rings' kicks and wake eventfds until `end`
 * (the budget's: such a ring is not idle).
 * Whether something is due. */
static int sleep_for_rings(const struct bk_poll *c, const uint32_t *mine, uint32_t n,
                           uint64_t end)
{
    struct pollfd pf[2 * BK_POLL_MAX];
    for (uint32_t j = 0; j < n; j++) {
        struct bk_queue *q = c->qs[mine[j]];
        if (final_check(q) || jobs_due(q))
            return 1;
        pf[2 * j] = (struct pollfd){q->kick_fd, POLLIN, 0};
        pf[2 * j + 1] = (struct pollfd){q->wake_fd, POLLIN, 0};
    }
    uint64_t now = dp_now_ns();
    if (now >= end)
        return 0;
    struct timespec ts = {(time_t)((end - now) / 1000000000u),
                          (long)((end - now) % 1000000000u)};
    int rc = ppoll(pf, 2 * n, &ts, NULL);
    if (rc < 0)
        return errno == EINTR;
    for (uint32_t j = 0; j < n; j++) {
        if (pf[2 * j].revents & POLLIN) {   /* read here: the next sleep must not see it */
            uint64_t v;
            struct iovec iov = {&v, sizeof(v)};
            ssize_t r = preadv2(pf[2 * j].fd, &iov, 1, -1, RWF_NOWAIT);
            (void)r;
        }
    }
    return rc > 0;
}

/* Which thread serves which ring. With several threads watching and few CPUs (two
 * vCPUs here, each shared by a thread of ours and the guests' threads), a ring is
 * served best by the thread on its guest's CPU: the two take turns there (the guest
 * runs while the thread yields, the thread while the guest sleeps), each finds the
 * other's cache lines (ring slots, grant entries) in that CPU's cache, and neither
 * spins on one CPU while the other waits for the other CPU. The scheduler does not
 * know which threads go together; the kernel can see it. A thread whose yield let
 * something else run on its CPU (the yield took BK_YIELDED_NS or more) notes, for each
 * ring of the call whose guest published requests meanwhile, that its guest runs on
 * this CPU; each thread notes its own CPU as the call ends; the next call gives each
 * thread the ring whose guest is on its CPU (bk_place_rings). */
#define BK_YIELDED_NS 2000
static int32_t bk_thread_cpu[DP_HELPERS + 1];   /* 1 + the CPU thread t ended its last call on */

static void poll_yield(const struct bk_poll *c)
{
    uint32_t before[BK_POLL_MAX];
    for (uint32_t i = 0; i < c->nrings; i++)
        before[i] = dp_load32(c->qs[c->ring[i]]->pages[0] + DP_SRING_REQ_PROD);
    uint64_t t0 = dp_now_ns();
    sched_yield();
    if (dp_now_ns() - t0 < BK_YIELDED_NS)
        return;     /* nothing else wanted this CPU */
    int32_t cpu = sched_getcpu();
    for (uint32_t i = 0; i < c->nrings; i++) {
        struct bk_queue *q = c->qs[c->ring[i]];
        if (dp_load32(q->pages[0] + DP_SRING_REQ_PROD) != before[i])
            __atomic_store_n(&q->front_cpu, cpu, __ATOMIC_RELAXED);
    }
}

/* ring[0..n) are ring numbers, ring[i] served by thread i % nthreads; front[k] is the
 * CPU ring k's guest runs on, cpu[t] thread t's (-1: not known). Each thread's first
 * ring not on its thread's CPU is swapped with one whose guest is there and that is not
 * on its own thread's CPU already. Returns how many swaps were made. */
uint32_t bk_place_rings(uint32_t *ring, uint32_t n, uint32_t nthreads, const int32_t *front,
                        const int32_t *cpu)
{
    uint32_t swaps = 0;
    for (uint32_t t = 0; t < nthreads && t < n; t++) {
        if (cpu[t] < 0 || front[ring[t]] == cpu[t])
            continue;
        for (uint32_t j = 0; j < n; j++) {
            if (j != t && front[ring[j]] == cpu[t] && front[ring[j]] != cpu[j % nthreads]) {
                uint32_t x = ring[t];
                ring[t] = ring[j];
                ring[j] = x;
                swaps++;
                break;
            }
        }
    }
    return swaps;
}

/* Thread t of the call watches rings t, t + nthreads, ...: serves each when it has
 * requests (a kicked ring at once), reaps its finished jobs, signals its guest, and
 * waits for any of them for up to poll_ns, until the budget's end. A ring that needs
 * the caller (halted, jobs only Python can do) is no longer watched. */
static void poll_thread(void *ctx, uint32_t t)
{
    struct bk_poll *c = ctx;
    uint32_t mine[BK_POLL_MAX], n = 0;
    for (uint32_t i = t; i < c->nrings; i += c->nthreads)
        mine[n++] = c->ring[i];
    int first = 1, idle = 0;
    while (n) {
        int more = 0, did = 0;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t k = mine[i];
            struct bk_queue *q = c->qs[k];
            struct bk_out *out = c->outs[k], tmp;
            out->flags &= ~(uint32_t)(BK_MORE | BK_BLOCKED);  /* the latest batch's say */
            if ((first && c->due[k] == 1) || ring_has_requests(q)) {
                bk_serve(q, c->envs[k], &tmp);
                out_merge(out, &tmp);
                did = 1;
                if (t > 0)
                    c->parallel[k]++;
            }
            if (jobs_due(q)) {
                memset(&tmp, 0, sizeof(tmp));
                reap(q, c->envs[k], &tmp);
                out_merge(out, &tmp);
                did = 1;
            }
            poll_signal(out, c->call_fds[k]);
            if (poll_stop(q, out)) {
                mine[i--] = mine[--n];  /* the caller must see it: no longer watched */
                continue;
            }
            more |= (out->flags & BK_MORE) != 0;
        }
        first = 0;
        if (did && idle) {
            idle = 0;
            __atomic_add_fetch(&c->busy, 1, __ATOMIC_ACQ_REL);
        }
        uint64_t now = dp_now_ns();
        if (!n || now >= c->end)
            break;
        if (more)
            continue;
        uint64_t end = now + c->poll_ns < c->end ? now + c->poll_ns : c->end;
        int any = 0, io_only = 1, disk_only = 1;
        for (uint32_t j = 0; j < n && io_only; j++) {
            io_only = c->qs[mine[j]]->inpool > 0;
            disk_only &= !c->qs[mine[j]]->disk.inline_io;
        }
        /* An O_DIRECT image or a block device: its jobs wait for the disk, so their
         * rings are not spun for at all (spinning through a stream of disk reads would
         * take a CPU for it). */
        if (io_only && disk_only)
            end = now;
        for (uint32_t i = 1; !any && end > now; i++) {
            for (uint32_t j = 0; j < n && !any; j++)
                any = poll_due(c->qs[mine[j]]);
            if (!any && (i & 63) == 0) {
                if (dp_now_ns() >= end)
                    break;
                /* With several threads watching, the guests' threads they wake may be
                 * waiting for this CPU (two vCPUs here): let them have it. */
                if (c->nthreads > 1)
                    poll_yield(c);
            }
            if (!any)
                __builtin_ia32_pause();
        }
        io_only = 1;
        for (uint32_t j = 0; j < n && io_only; j++)
            io_only = c->qs[mine[j]]->inpool > 0;
        /* Not idle: its answers are coming, so waited for, asleep, until the budget's
         * end (a page-cache write is done within the spin above; a disk read is not). */
        if (!any && io_only)
            any = sleep_for_rings(c, mine, n, c->end);
        if (any)
            continue;
        /* Idle for poll_ns. While another thread of the call still works, the call goes
         * on, so this one goes on watching its rings too. */
        if (!idle) {
            idle = 1;
            __atomic_sub_fetch(&c->busy, 1, __ATOMIC_ACQ_REL);
        }
        if (!__atomic_load_n(&c->busy, __ATOMIC_ACQUIRE))
            break;
    }
    if (!idle)
        __atomic_sub_fetch(&c->busy, 1, __ATOMIC_ACQ_REL);
    if (c->nthreads > 1)
        __atomic_store_n(&bk_thread_cpu[t], sched_getcpu() + 1, __ATOMIC_RELAXED);
}

/* The rings that may be served (due[k] != 0; 1: kicked, 2: served when its guest has
 * published requests) are served and then watched, in parallel: each on a thread of its
 * own (the caller's and the helpers'; with more rings than threads, a thread watches
 * several). After each batch a thread watches its rings for up to poll_ns: a ring with
 * requests published is served again, a ring whose jobs the I/O threads have finished
 * is reaped (as bk_reap would be on its wake eventfd), and the guest's event is
 * signalled here (call_fds[k]) as each batch is published. While watched, req_event
 * stays where it was, so the guest does not kick. When the call ends (every ring idle
 * for poll_ns, or budget_ns in all; a ring halted or with jobs only the caller can do
 * stops being watched at once) each ring's kick is read, its req_event set and the ring
 * looked at once more (MORE if it has requests). A ring the loop may not serve
 * (due[k] == 0: suspended, halted, stopping) is not touched. outs[k] gathers ring k's
 * results over the call (inpool: at its end), served[k] says whether there are any,
 * parallel[k] counts its batches served on a helper thread. A guest that waits for its
 * answers before asking again then costs no sleep and wake-up of the event loop and no
 * pass through Python per request, which on a virtual machine cost several times the
 * request; and each ring keeps a thread to itself, not waiting for the others' batches. */
void bk_serve_round_poll(struct bk_queue *const *qs, const struct dp_env *const *envs,
                         struct bk_out *const *outs, uint32_t n, const uint8_t *due,
                         uint8_t *served, uint32_t *parallel, const int32_t *call_fds,
                         uint32_t poll_ns, uint32_t budget_ns)
{
    struct bk_poll c = {qs, envs, outs, due, call_fds, parallel, {0}, 0, 0, poll_ns, 0, 0};
    if (n > BK_POLL_MAX)
        n = BK_POLL_MAX;    /* the binding passes at most POLL_MAX */
    for (uint32_t k = 0; k < n; k++) {
        memset(outs[k], 0, sizeof(*outs[k]));
        served[k] = due[k] != 0;    /* its results (at least the last check) are in outs */
        parallel[k] = 0;
        if (due[k]) {
            qs[k]->env = envs[k];
            qs[k]->polling = 1;
            qs[k]->call_fd = call_fds[k];
            c.ring[c.nrings++] = k;
        }
    }
    /* A thread for each ring whose reads the page cache serves inline; the rings of
     * O_DIRECT images and block devices, whose requests all wait for the disk, share
     * those threads (one looks at their completions between its own ring's batches,
     * which costs no wake-up), or one thread of their own if there are no others. */
    uint32_t ninline = 0;
    for (uint32_t i = 0; i < c.nrings; i++) {
        uint32_t k = c.ring[i];
        if (qs[k]->disk.inline_io) {
            c.ring[i] = c.ring[ninline];
            c.ring[ninline++] = k;
        }
    }
    c.nthreads = ninline ? ninline : c.nrings ? 1 : 0;
    if (c.nthreads > DP_HELPERS + 1)
        c.nthreads = DP_HELPERS + 1;
    c.busy = c.nthreads;
    if (c.nthreads > 1) {   /* each thread the ring whose guest is on its CPU */
        int32_t front[BK_POLL_MAX], cpu[DP_HELPERS + 1];
        for (uint32_t i = 0; i < ninline; i++)
            front[c.ring[i]] = __atomic_load_n(&qs[c.ring[i]]->front_cpu, __ATOMIC_RELAXED);
        cpu[0] = sched_getcpu();    /* the caller's, now */
        for (uint32_t t = 1; t < c.nthreads; t++)
            cpu[t] = __atomic_load_n(&bk_thread_cpu[t], __ATOMIC_RELAXED) - 1;
        bk_place_rings(c.ring, ninline, c.nthreads, front, cpu);
    }
    /* One thread watching: the guest's threads have the other CPUs, and publishing a
     * long batch in parts lets them work beside it. Several: the CPUs are shared with
     * the guests' threads, whose extra wake-ups would cost more than they gain. */
    for (uint32_t i = 0; i < c.nrings; i++)
        qs[c.ring[i]]->push_every = c.nthreads == 1 ? BK_PUSH_EVERY : 0;
    c.end = dp_now_ns() + budget_ns;
    dp_pool_run(&serve_pool, poll_thread, &c, c.nthreads);
    for (uint32_t i = 0; i < c.nrings; i++)
        poll_end(qs[c.ring[i]], outs[c.ring[i]]);
}

/* bk_serve_round_poll for one ring, which the caller serves itself. */
void bk_serve_poll(struct bk_queue *q, const struct dp_env *env, struct bk_out *out,
                   int32_t call_fd, uint32_t poll_ns, uint32_t budget_ns)
{
    const uint8_t due = 1;
    uint8_t served;
    uint32_t parallel;
    bk_serve_round_poll(&q, &env, &out, 1, &due, &served, &parallel, &call_fd, poll_ns,
                        budget_ns);
}

/* Requests an earlier daemon took and never visibly answered (from the in-flight
 * table), in ring order: recorded again, then served like new ones. */
void bk_replay(struct bk_queue *q, const struct dp_env *env, const uint8_t *raws,
               const uint32_t *indices, uint32_t n, struct bk_out *out)
{
    memset(out, 0, sizeof(*out));
    q->env = env;
    for (uint32_t k = 0; k < n; k++) {
        uint8_t raw[BK_SLOT_MAX];
        memcpy(raw, raws + (size_t)k * BK_SLOT_MAX, BK_SLOT_MAX);
        int32_t e = 0;
        if (q->inflight) {
            /* recorded again, in the entry it has, so a second crash replays it again */
            e = if_in_flight(q, indices[k], raw, 1);
            if (e < 0) {
                out->flags |= BK_INTERNAL;
                halt(q, env);
                return;
            }
        }
        accept(q, env, raw, indices[k], (uint32_t)e, out);
    }
    dispatch(q, env, out);
    push(q, out);
    out->inpool = q->inpool;
}

/* Unpin and answer the pool jobs `jobs` (slot numbers; anything else is skipped). errs:
 * NULL, or per job 0 or the errno that failed it; failed: every job failed. */
static void finish_jobs(struct bk_queue *q, const struct dp_env *env, const uint16_t *jobs,
                        const int32_t *errs, uint32_t n, int failed, struct bk_out *out)
{
    for (uint32_t k = 0; k < n; k++) {
        if (jobs[k] >= BK_MAX_PENDING)
            continue;
        struct bk_pending *s = &q->slots[jobs[k]];
        if (s->state != SLOT_POOL)
            continue;
        if (failed)
            s->status = BLKIF_RSP_ERROR;
        if (errs && errs[k]) {
            s->status = BLKIF_RSP_ERROR;
            s->error = errs[k];
        }
        q->inpool--;
        if (s->flush)
            q->draining = 0;
        finish(q, env, s, out);
    }
}

/* finish_jobs, then what waited behind them starts and the answers are published. */
static void answer_jobs(struct bk_queue *q, const struct dp_env *env, const uint16_t *jobs,
                        uint32_t n, int failed, struct bk_out *out)
{
    finish_jobs(q, env, jobs, NULL, n, failed, out);
    if (!q->halted) {
        dispatch(q, env, out);
        push(q, out);
    }
    out->inpool = q->inpool;
}

/* Woken by the ring's wake eventfd (on the event loop, or while a call watches the ring):
 * the jobs the I/O threads have finished are answered (grants released first), what
 * waited behind them starts. */
static void reap(struct bk_queue *q, const struct dp_env *env, struct bk_out *out)
{
    uint16_t jobs[BK_MAX_PENDING];
    uint32_t n;
    q->env = env;
    if (q->wake_fd >= 0) {
        uint64_t v;
        ssize_t rc = read(q->wake_fd, &v, sizeof(v));  /* before taking the list */
        (void)rc;
    }
    pthread_mutex_lock(&iopool.lock);
    n = q->ndone;
    memcpy(jobs, q->done, n * sizeof(jobs[0]));
    q->ndone = 0;
    pthread_mutex_unlock(&iopool.lock);
    uring_reap(q, jobs, &n);
    answer_jobs(q, env, jobs, n, 0, out);
}

void bk_reap(struct bk_queue *q, const struct dp_env *env, struct bk_out *out)
{
    memset(out, 0, sizeof(*out));
    reap(q, env, out);
}

/* On the event loop: jobs the caller moved itself (disk.external) are back (failed: the
 * caller could not do them). */
void bk_complete(struct bk_queue *q, const struct dp_env *env, const uint16_t *jobs,
                 uint32_t n, int32_t failed, struct bk_out *out)
{
    memset(out, 0, sizeof(*out));
    q->env = env;
    answer_jobs(q, env, jobs, n, failed != 0, out);
}

/* Publish what was answered (stopping). */
void bk_push(struct bk_queue *q, const struct dp_env *env, struct bk_out *out)
{
    memset(out, 0, sizeof(*out));
    q->env = env;
    push(q, out);
    out->inpool = q->inpool;
}

/* ---- pool jobs moved by the caller (a disk on an NBD export) ---------------------- */

/* A backing store the kernel cannot reach (an NBD export, which libnbd serves on the
 * event loop) takes every transfer as a pool job (inline_io 0). The caller learns what
 * each job asks for here, moves the data between the guest pages and the store itself,
 * and hands the slots back with bk_complete, which unpins and answers as for any job. */
struct bk_job_desc {
    uint16_t slot;
    uint8_t op;             /* BLKIF_OP_*: an indirect request's inner operation */
    uint8_t flush;          /* FLUSH_DISKCACHE or WRITE_BARRIER: flush before the data */
    uint32_t ring_index;
    uint64_t offset;        /* bytes */
    uint64_t length;        /* bytes: the data, or the range to discard */
    uint64_t addr;          /* host address of the data if its pages are one run, else 0 */
};
_Static_assert(sizeof(struct bk_job_desc) == 32, "bk_job_desc");

/* For a caller that serves the ring again after every bk_complete: while jobs are out,
 * an empty ring does not ask the guest for a kick (req_event stays behind), so a busy
 * guest's requests are taken at the next completion, without an event each. */
void bk_queue_set_poll(struct bk_queue *q, uint32_t on)
{
    q->poll_busy = on != 0;
}

/* On the event loop: jobs the caller moved itself are done (errs[k]: 0, or the errno
 * that failed jobs[k]); they are unpinned and answered, then the ring is served again
 * as by bk_serve, all in one call. */
void bk_jobs_done(struct bk_queue *q, const struct dp_env *env, const uint16_t *jobs,
                  const int32_t *errs, uint32_t n, struct bk_out *out)
{
    struct bk_out done;
    memset(&done, 0, sizeof(done));
    q->env = env;   /* the answers below write the ring: log its pages with this env */
    finish_jobs(q, env, jobs, errs, n, 0, &done);
    if (q->halted) {
        *out = done;
        out->inpool = q->inpool;
        return;
    }
    bk_serve(q, env, out);  /* publishes these answers too */
    stats_add(&out->stats, &done.stats);
}

/* Describe n jobs (slots from out->jobs). Returns how many were described: slots that
 * are not in the pool are left out. */
uint32_t bk_jobs_describe(const struct bk_queue *q, const uint16_t *jobs, uint32_t n,
                          struct bk_job_desc *descs)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (jobs[i] >= BK_MAX_PENDING)
            continue;
        const struct bk_pending *s = &q->slots[jobs[i]];
        if (s->state != SLOT_POOL)
            continue;
        struct bk_job_desc *d = &descs[k++];
        memset(d, 0, sizeof(*d));
        d->slot = jobs[i];
        d->op = s->op;
        d->flush = s->flush;
        d->ring_index = s->ring_index;
        d->offset = s->sector * BK_SECTOR;
        d->length = s->nr_sectors * BK_SECTOR;
        if (s->nseg) {
            uint8_t *next = s->iov[0].iov_base;
            uint32_t j = 0;
            for (; j < s->nseg && s->iov[j].iov_base == next; j++)
                next += s->iov[j].iov_len;
            if (j == s->nseg)
                d->addr = (uint64_t)(uintptr_t)s->iov[0].iov_base;
        }
    }
    return k;
}

/* Copy a job's data between its guest pages and buf (len: the job's length), to the
 * guest when to_guest, else from it. Returns 0, or -1 for a slot not in the pool or a
 * length that is not the job's. */
int32_t bk_job_copy(const struct bk_queue *q, uint16_t slot, uint8_t *buf, uint64_t len,
                    int32_t to_guest)
{
    if (slot >= BK_MAX_PENDING)
        return -1;
    const struct bk_pending *s = &q->slots[slot];
    if (s->state != SLOT_POOL || len != s->nr_sectors * BK_SECTOR)
        return -1;
    uint64_t pos = 0;
    for (uint32_t i = 0; i < s->nseg; i++) {
        size_t n = s->iov[i].iov_len;
        if (pos + n > len)
            return -1;
        if (to_guest)
            memcpy(s->iov[i].iov_base, buf + pos, n);
        else
            memcpy(buf + pos, s->iov[i].iov_base, n);
        pos += n;
    }
    return pos == len ? 0 : -1;
}

/* Layouts as compiled, for the binding's and the tests' checks. */
#define L(x) ((uint32_t)(x))
uint32_t bk_layout(uint32_t *out, uint32_t max)
{
    const uint32_t v[] = {
        /* x86_64, from Xen's header */
        L(sizeof(struct blkif_request)), L(offsetof(struct blkif_request, id)),
        L(offsetof(struct blkif_request, sector_number)), L(offsetof(struct blkif_request, seg)),
        L(offsetof(struct blkif_request_discard, nr_sectors)),
        L(offsetof(struct blkif_request_indirect, nr_segments)),
        L(offsetof(struct blkif_request_indirect, indirect_grefs)),
        L(sizeof(struct blkif_request_indirect)),
        L(sizeof(struct blkif_response)), L(offsetof(struct blkif_response, status)),
        L(sizeof(union blkif_sring_entry)),
        /* x86_32 */
        L(sizeof(struct bk32_request)), L(offsetof(struct bk32_request, id)),
        L(offsetof(struct bk32_request, sector_number)), L(offsetof(struct bk32_request, seg)),
        L(offsetof(struct bk32_request_discard, nr_sectors)),
        L(offsetof(struct bk32_request_indirect, nr_segments)),
        L(offsetof(struct bk32_request_indirect, indirect_grefs)),
        L(sizeof(struct bk32_request_indirect)),
        L(sizeof(struct bk32_response)), L(offsetof(struct bk32_response, status)),
        L(sizeof(struct bk32_request)),
        /* grants, ring header, in-flight table */
        L(sizeof(grant_entry_v1_t)), L(offsetof(grant_entry_v1_t, frame)),
        L(sizeof(grant_entry_v2_t)), L(offsetof(grant_entry_v2_t, sub_page.page_off)),
        L(offsetof(grant_entry_v2_t, sub_page.length)),
        L(offsetof(grant_entry_v2_t, full_page.frame)),
        L(BK_SRING_HEADER), L(offsetof(struct blkif_sring, rsp_prod)),
        L(offsetof(struct blkif_sring, rsp_event)),
        IF_QUEUE_HEADER, IF_ENTRY, IF_ENTRY_HEADER, BK_MAX_PENDING, BK_MAX_SEGS,
        L(sizeof(struct bk_pending)), L(sizeof(struct bk_out)), L(sizeof(struct bk_config)),
        L(sizeof(struct dp_env)), L(sizeof(struct bk_disk)), L(sizeof(struct bk_stats)),
    };
    uint32_t n = sizeof(v) / sizeof(v[0]);
    for (uint32_t i = 0; i < n && i < max; i++)
        out[i] = v[i];
    return n;
}
