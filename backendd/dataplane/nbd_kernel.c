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
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>

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
