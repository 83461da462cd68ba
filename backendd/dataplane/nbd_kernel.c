/* The hot path of an NBD disk's rings in C: plain reads and writes into and out of
 * guest memory are issued to libnbd here, and their completions recorded here, so a
 * 4 KiB read costs no Python object, call or callback of its own.
 *
 * Python (backendd/dataplane/blknbd.py, backendd/devices/blk/nbd.py) stays in charge
 * of everything else: the connection, its socket and the event loop, flushes, trims,
 * bounce buffers, multi-conn, reconnects. It owns the table (one entry per kernel job
 * slot) and reads it on the slow paths: a command that failed stays in the table with
 * its errno (FAILED) until Python answers it, or sends it again after a reconnect;
 * what is in flight when a connection is lost is taken back from the table by Python.
 *
 * Successful completions go straight into the done arrays that bk_jobs_done takes
 * (slots, errnos), behind whatever Python put there in the same wake-up.
 *
 * nf_wake is the whole wake-up of a connection's socket in one call (made with the GIL
 * released): every reply the socket holds is read, the rings are answered and served
 * again (blk_kernel.c's bk_jobs_done, reached through the pointers Python hands in),
 * what they hand out is issued, and each ring's guest is signalled at most once.
 * Python hears only counts and flags, and does the rest only when a flag asks.
 */
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <libnbd.h>

enum { NF_FREE = 0, NF_IN_FLIGHT = 1, NF_FAILED = 2 };

struct nf_ctx;

struct nf_cmd {
    uint64_t offset;
    uint64_t addr;   /* host address of the guest pages (one run) */
    uint64_t seq;    /* submission order, for resending in order */
    struct nf_ctx *ctx;
    uint32_t length;
    uint32_t flags;  /* NBD command flags (FUA) */
    int32_t err;     /* NF_FAILED: the errno */
    uint16_t slot;   /* the kernel's job slot; the table index */
    uint8_t write;
    uint8_t state;
};

struct nf_ctx {
    struct nf_cmd *table;
    uint32_t table_len;
    uint32_t n;        /* entries in slots/errs (shared with Python) */
    uint16_t *slots;   /* table_len entries */
    int32_t *errs;
    uint32_t inflight; /* IN_FLIGHT or FAILED entries */
    uint32_t failed;   /* FAILED entries */
};

_Static_assert(sizeof(struct nf_cmd) == 48, "struct nf_cmd layout (blknbd.py NfCmd)");


static int nf_complete(void *user_data, int *error)
{
    struct nf_cmd *c = user_data;
    struct nf_ctx *x = c->ctx;

    if (c->state != NF_IN_FLIGHT)
        return 1;
    if (*error) {
        /* Python decides: an error for the guest, or (the connection died and
         * libnbd aborted what was in flight) a resend after the reconnect. */
        c->state = NF_FAILED;
        c->err = *error;
        x->failed++;
        return 1;
    }
    c->state = NF_FREE;
    x->inflight--;
    if (x->n < x->table_len) { /* always: a slot finishes once per hand-out */
        x->slots[x->n] = c->slot;
        x->errs[x->n] = 0;
        x->n++;
    }
    return 1;
}

static int nf_issue_one(struct nf_ctx *x, struct nbd_handle *h, const struct nf_cmd *in,
                        int32_t *err)
{
    if (in->slot >= x->table_len || x->table[in->slot].state != NF_FREE) {
        *err = EINVAL;
        return -1;
    }
    struct nf_cmd *c = &x->table[in->slot];
    *c = *in;
    c->ctx = x;
    c->err = 0;
    c->state = NF_IN_FLIGHT;
    nbd_completion_callback cb = { .callback = nf_complete, .user_data = c };
    int64_t r = c->write
        ? nbd_aio_pwrite(h, (const void *)(uintptr_t)c->addr, c->length, c->offset, cb,
                         c->flags)
        : nbd_aio_pread(h, (void *)(uintptr_t)c->addr, c->length, c->offset, cb,
                        c->flags);
    if (r == -1) {
        c->state = NF_FREE;
        *err = nbd_get_errno() ? nbd_get_errno() : EIO;
        return -1;
    }
    x->inflight++;
    return 0;
}

/* blk_kernel.c's struct bk_job_desc and core.h's struct dp_region, as bk_jobs_describe
 * and the data planes' environment have them (blknbd.py checks the sizes). */
struct nf_desc {
    uint16_t slot;
    uint8_t op;
    uint8_t flush;
    uint32_t ring_index;
    uint64_t offset;
    uint64_t length;
    uint64_t addr;
};

struct nf_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t host;
};

enum { NF_OP_READ = 0, NF_OP_WRITE = 1 };

/* Issue the plain reads and writes among descs[0..n) (no flush, pages one run inside
 * one region of guest memory), numbered seq0+1.. in order. The indices of the others,
 * and of any libnbd refused (with every one after it), go to rest (*nrest of them) for
 * the Python path; *err says why libnbd refused one. Returns how many were issued. */
uint32_t nf_issue_descs(struct nf_ctx *x, struct nbd_handle *h, const struct nf_desc *d,
                        uint32_t n, const struct nf_region *regions, uint32_t nr,
                        uint64_t seq0, uint32_t *rest, uint32_t *nrest, int32_t *err)
{
    uint32_t issued = 0, k = 0;
    int refused = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct nf_desc *e = &d[i];
        int plain = !refused && !e->flush && e->addr && e->length &&
            e->length <= UINT32_MAX && (e->op == NF_OP_READ || e->op == NF_OP_WRITE);
        if (plain) {
            plain = 0;
            for (uint32_t j = 0; j < nr; j++) {
                const struct nf_region *r = &regions[j];
                if (r->host <= e->addr && e->addr - r->host <= r->size &&
                    e->length <= r->size - (e->addr - r->host)) {
                    plain = 1;
                    break;
                }
            }
        }
        if (plain) {
            struct nf_cmd c = {
                .offset = e->offset, .addr = e->addr, .seq = seq0 + i + 1,
                .length = (uint32_t)e->length, .slot = e->slot,
                .write = e->op == NF_OP_WRITE,
            };
            if (nf_issue_one(x, h, &c, err) == 0) {
                issued++;
                continue;
            }
            refused = 1;
        }
        rest[k++] = i;
    }
    *nrest = k;
    return issued;
}

/* The FAILED entries, while the connection lives: each into the done arrays with its
 * errno, freed. Returns how many. */
uint32_t nf_take_failed(struct nf_ctx *x)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < x->table_len && x->failed; i++) {
        struct nf_cmd *c = &x->table[i];
        if (c->state != NF_FAILED)
            continue;
        c->state = NF_FREE;
        x->failed--;
        x->inflight--;
        if (x->n < x->table_len) {
            x->slots[x->n] = c->slot;
            x->errs[x->n] = c->err;
            x->n++;
        }
        k++;
    }
    return k;
}

/* The connection is gone (its handle closed): every entry still held, copied to out
 * (table_len entries) and freed. Returns how many. */
uint32_t nf_take_back(struct nf_ctx *x, struct nf_cmd *out)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < x->table_len; i++) {
        struct nf_cmd *c = &x->table[i];
        if (c->state == NF_FREE)
            continue;
        out[k++] = *c;
        c->state = NF_FREE;
    }
    x->inflight = 0;
    x->failed = 0;
    return k;
}

/* ---- the whole wake-up (nf_wake) ------------------------------------------------- */

/* blk_kernel.c's struct bk_stats and struct bk_out (blknbd.py checks the size). */
struct nf_stats {
    uint64_t requests, reads, writes, bytes_read, bytes_written;
    uint64_t errors, invalid, unsupported, flushes, discards, inline_io, pooled;
};

enum { NF_MAX_PENDING = 64 };
enum { NF_B_NOTIFY = 1, NF_B_MORE = 2, NF_B_BLOCKED = 4 };

struct nf_out {
    struct nf_stats stats;
    uint32_t flags;
    uint32_t njobs;
    uint16_t jobs[NF_MAX_PENDING];
    uint8_t job_flush[NF_MAX_PENDING];
    uint32_t inpool;
    uint32_t notified;
    uint64_t refused_id;
    uint32_t refused_why;
    uint32_t saturated;
};

_Static_assert(sizeof(struct nf_out) == 320, "struct bk_out layout (kernel.py Out)");

/* How core.h's struct dp_env begins: the guest memory regions. */
struct nf_env_head {
    const struct nf_region *regions;
    uint32_t nr_regions;
};

typedef void (*nf_jobs_done_fn)(void *q, const void *env, const uint16_t *jobs,
                                const int32_t *errs, uint32_t n, struct nf_out *out);
typedef uint32_t (*nf_describe_fn)(const void *q, const uint16_t *jobs, uint32_t n,
                                   struct nf_desc *descs);

/* One ring whose commands go on the connection. */
struct nf_ring {
    struct nf_ctx *ctx;
    void *q;                    /* blk_kernel.c's struct bk_queue */
    const void *env;            /* its struct dp_env (the regions are read here too) */
    struct nf_out *out;         /* NF_R_OUT: the answer call's result, for Python */
    struct nf_desc *descs;      /* NF_R_REST: the jobs it handed out, described ... */
    uint32_t *rest;             /* ... and the indices of those left to Python */
    uint32_t nrest;
    int32_t call_fd;            /* the guest's event channel (ours to signal) */
    uint32_t flags;             /* out: NF_R_* */
    uint32_t inpool;            /* out: the ring's jobs not done yet */
    uint32_t answered;          /* out: answers written this call */
    uint32_t issued;            /* out: commands issued this call */
    /* Kept until Python folds them into its counters (blknbd.py fold_stats). */
    uint64_t notifies, notifies_saturated;
    struct nf_stats stats;
};

struct nf_wake {
    struct nbd_handle *h;
    nf_jobs_done_fn jobs_done;
    nf_describe_fn describe;
    struct nf_ring *const *rings;
    uint32_t nrings;
    int32_t fd;                 /* the connection's socket */
    uint64_t seq;               /* in and out: the order of submission (NbdImage._seq) */
    uint32_t flags;             /* out: NF_W_* */
    uint32_t replies;           /* out: commands completed this call */
    uint32_t direction;         /* out: nbd_aio_get_direction afterwards */
    int32_t err;                /* out: errno of a command libnbd refused */
    uint64_t calls, replies_total;  /* statistics: replies read per call */
};

enum { NF_W_DEAD = 1, NF_W_FAILED = 2, NF_W_ERROR = 4, NF_W_SLOW = 8, NF_W_ANSWERED = 16 };
enum { NF_R_OUT = 1, NF_R_REST = 2 };
enum { NF_MAX_READS = 1024 };   /* replies read in one call, at most */

static uint32_t nf_done(const struct nf_wake *w)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < w->nrings; i++)
        n += w->rings[i]->ctx->n;
    return n;
}

static uint32_t nf_failed(const struct nf_wake *w)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < w->nrings; i++)
        n += w->rings[i]->ctx->failed;
    return n;
}

/* The guest's event channel, as evtchn.py's notify: poll for POLLOUT with a zero timeout,
 * then write (the eventfd is the VMM's: its flags are never changed). Not writable: the
 * counter is saturated, the guest signalled already. */
static void nf_signal(struct nf_ring *r)
{
    struct pollfd p = {.fd = r->call_fd, .events = POLLOUT};
    uint64_t one = 1;
    if (r->call_fd >= 0 && poll(&p, 1, 0) == 1 && (p.revents & POLLOUT) &&
        write(r->call_fd, &one, sizeof(one)) == (ssize_t)sizeof(one)) {
        r->notifies++;
        return;
    }
    r->notifies_saturated++;
}

static void nf_add_stats(struct nf_stats *sum, const struct nf_stats *add)
{
    uint64_t *s = (uint64_t *)sum;
    const uint64_t *a = (const uint64_t *)add;
    for (size_t i = 0; i < sizeof(*sum) / sizeof(uint64_t); i++)
        s[i] += a[i];
}

/* Answer what ring r has done, serve it again, issue what it hands out. */
static void nf_serve_ring(struct nf_wake *w, struct nf_ring *r)
{
    struct nf_ctx *x = r->ctx;
    struct nf_out out;
    uint32_t n = x->n;
    x->n = 0;
    r->answered = n;
    w->jobs_done(r->q, r->env, x->slots, x->errs, n, &out);
    r->inpool = out.inpool;
    int unusual = (out.flags & ~(uint32_t)(NF_B_NOTIFY | NF_B_BLOCKED)) ||
        out.stats.invalid || out.stats.unsupported;
    if (unusual) {
        /* Refused requests to log, a halted ring, more than one batch's worth: Python
         * does all of what this result asks (blk.py _after), jobs and signal included. */
        *r->out = out;
        r->flags |= NF_R_OUT;
        return;
    }
    nf_add_stats(&r->stats, &out.stats);
    if (out.njobs) {
        uint32_t nd = w->describe(r->q, out.jobs, out.njobs, r->descs);
        const struct nf_env_head *env = r->env;
        uint32_t nrest = 0;
        int32_t err = 0;
        r->issued += nf_issue_descs(x, w->h, r->descs, nd, env->regions, env->nr_regions,
                                    w->seq, r->rest, &nrest, &err);
        w->seq += nd;
        if (err)
            w->err = err;
        if (nrest) {
            r->nrest = nrest;
            r->flags |= NF_R_REST;
        }
    }
    if (out.flags & NF_B_NOTIFY)
        nf_signal(r);
}

/* The connection's socket is readable: read every reply it holds (libnbd reads one per
 * notification: it is asked again while the socket has more), then answer and serve
 * each ring that had commands complete. Stops early, leaving the rest to Python, when
 * the connection is gone or a command failed. Returns w->flags. */
uint32_t nf_wake(struct nf_wake *w)
{
    w->flags = 0;
    w->replies = 0;
    w->err = 0;
    for (uint32_t i = 0; i < w->nrings; i++) {
        struct nf_ring *r = w->rings[i];
        r->flags = r->nrest = r->answered = r->issued = 0;
    }
    uint32_t before = nf_done(w);
    for (uint32_t reads = 0; reads < NF_MAX_READS; reads++) {
        uint32_t done = nf_done(w);
        if (nbd_aio_notify_read(w->h) == -1) {
            w->flags |= NF_W_ERROR;
            break;
        }
        if (nbd_aio_is_dead(w->h) || nbd_aio_is_closed(w->h)) {
            w->flags |= NF_W_DEAD;
            break;
        }
        if (nf_failed(w)) {
            w->flags |= NF_W_FAILED;
            break;
        }
        int avail = 0;
        if (nf_done(w) == done || !nbd_aio_is_ready(w->h) ||
            ioctl(w->fd, FIONREAD, &avail) < 0 || avail <= 0)
            break;  /* nothing more complete here: the event loop wakes us for the rest */
    }
    w->replies = nf_done(w) - before;
    w->calls++;
    w->replies_total += w->replies;
    if (!w->flags) {
        for (uint32_t i = 0; i < w->nrings; i++) {
            struct nf_ring *r = w->rings[i];
            if (r->ctx->n) {
                nf_serve_ring(w, r);
                w->flags |= NF_W_ANSWERED;
            }
            if (r->flags)
                w->flags |= NF_W_SLOW;
        }
    }
    w->direction = (uint32_t)nbd_aio_get_direction(w->h) & 3;
    return w->flags;
}

/* libnbd's message for the last error of this thread (nf_wake's NF_W_ERROR). */
const char *nf_last_error(void)
{
    return nbd_get_error();
}

/* The sizes of the structures the binding declares (blknbd.py checks them). */
uint32_t nf_sizes(uint32_t *out, uint32_t max)
{
    const uint32_t v[] = {sizeof(struct nf_cmd), sizeof(struct nf_ctx), sizeof(struct nf_ring),
                          sizeof(struct nf_wake), sizeof(struct nf_out)};
    uint32_t n = sizeof(v) / sizeof(v[0]);
    for (uint32_t i = 0; i < n && i < max; i++)
        out[i] = v[i];
    return n;
}
