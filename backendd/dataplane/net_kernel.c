/* The compiled netif data plane: one call serves a whole tx ring batch.
 *
 * Python (backendd/dataplane/net.py) stays the control plane: it maps the ring page,
 * owns the event channels, the credit scheduler, the multicast list, the counters and
 * the logs, and calls nk_tx once per wake-up. Nothing here calls back into Python.
 *
 * The pure-Python path (backendd/devices/net/{tx,txpath,vnet}.py) is the specification:
 * every check below follows it step by step, in its order, and a differential test
 * feeds both the same rings and grant tables and compares responses, frames, grant
 * flags and counters.
 *
 * Order per packet, which is the security argument (netback's xenvif_tx_build_gops):
 *   copy each slot before looking at it (XSA-155: the guest may rewrite the ring)
 *   -> extra-info slots, then the data chain with netback's drop-vs-fatal split
 *   -> pin every grant (compare-and-swap, v1 or v2 rules), check each window
 *   -> copy the headers into private memory and build the virtio-net header from that
 *      copy only (XSA-423: headers split across slots are linearised)
 *   -> writev straight from the granted pages to the tap
 *   -> unpin every grant BEFORE the responses (XSA-396)
 *   -> responses with zeroed padding, publish, then ring.h's notify rule.
 * A multicast control packet stops the batch before it is consumed: the multicast list
 * is the vif's, so Python answers it and calls in again.
 */
#define _GNU_SOURCE
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

#include "core.h"
#include "pool.h"

#include <xen/io/netif.h>

#define NK_BUDGET 64            /* packets per call (XSA-332), as txpath.BUDGET */
#define NK_LEGACY_SLOTS 18      /* XEN_NETIF_NR_SLOTS_MIN: following slots -> drop */
#define NK_FATAL_SLOTS 20       /* following slots -> the frontend is malicious */
#define NK_MAX_HEADER 256       /* vnet.MAX_HEADER_COPY */
#define NK_ETH_HLEN 14
#define NK_SRING_HEADER offsetof(struct netif_tx_sring, ring)
#define NK_ENTRY sizeof(union netif_tx_sring_entry)
#define NK_MAX_ERRORS NK_BUDGET

_Static_assert(sizeof(struct netif_tx_request) == 12, "tx request");
_Static_assert(sizeof(struct netif_tx_response) == 4, "tx response");
_Static_assert(sizeof(struct netif_extra_info) == 8, "extra info");
_Static_assert(sizeof(union netif_tx_sring_entry) == 12, "tx entry");
_Static_assert(offsetof(struct netif_tx_sring, req_prod) == DP_SRING_REQ_PROD &&
               offsetof(struct netif_tx_sring, req_event) == DP_SRING_REQ_EVENT &&
               offsetof(struct netif_tx_sring, rsp_prod) == DP_SRING_RSP_PROD &&
               offsetof(struct netif_tx_sring, rsp_event) == DP_SRING_RSP_EVENT, "sring indexes");
_Static_assert(offsetof(struct netif_tx_sring, ring) == offsetof(struct netif_rx_sring, ring),
               "one shared ring header for tx and rx");

/* ---- what Python hands in and gets back ----------------------------------------- */

struct nk_ring {            /* one shared ring and the back end's private indices */
    uint8_t *page;
    uint32_t size;          /* entries, a power of two */
    uint32_t entry;         /* bytes per entry */
    uint32_t req_cons, rsp_prod_pvt, pushed;
};

struct nk_txq {             /* one tx ring: Python's ctypes Structure, kept across calls */
    struct nk_ring r;
    int32_t fd;             /* the tap queue */
    uint32_t credit_on;     /* 0: no rate limit */
    uint64_t credit;        /* bytes that may still go in this call */
    uint32_t charged_valid; /* the packet at charged_cons was charged already */
    uint32_t charged_cons;
    uint32_t budget;        /* packets this wake-up may still take; left over on return */
};

/* Why a packet was answered ERROR or the vif stopped: Python words the log line. */
enum {
    NK_R_NONE = 0,
    NK_R_TOO_MANY_SLOTS,    /* drop: 18 following slots or more */
    NK_R_SLOT_SIZE,         /* drop: a slot larger than what remains */
    NK_R_FIRST_SIZE,        /* drop: fewer than ETH_HLEN bytes in the first slot */
    NK_R_GRANT,             /* drop: a grant refused (detail: gref) */
    NK_R_WINDOW,            /* drop: slot outside the granted sub-page (detail: gref) */
    NK_R_MISSING_EXTRA,     /* fatal */
    NK_R_EXTRA_TYPE,        /* fatal (detail: type) */
    NK_R_CHAIN_PAST,        /* fatal: chain beyond the published requests */
    NK_R_MALICIOUS,         /* fatal: 20 following slots or more */
    NK_R_SLOT_CROSSES,      /* fatal */
    NK_R_FIRST_CROSSES,     /* fatal */
    NK_R_GSO_SIZE,          /* fatal */
    NK_R_GSO_TYPE,          /* fatal (detail: type) */
    NK_R_IMPOSSIBLE,        /* fatal: more requests than the ring holds */
};

enum { NK_NOTIFY = 1, NK_MORE = 2, NK_TAP_FULL = 4, NK_CREDIT = 8, NK_FATAL = 16,
       NK_MCAST = 32 };

struct nk_error {
    uint16_t id;
    uint16_t reason;
    uint32_t detail;
    uint32_t grant;         /* NK_R_GRANT: the DP_G_ reason */
};

struct nk_tx_out {
    uint64_t tx_packets, tx_bytes, tx_gso, tx_errors, tx_dropped_csum, tx_dropped_tap,
             tx_tap_full, tx_rate_limited;
    uint64_t charged;       /* credit used */
    uint32_t flags;
    uint32_t fatal_reason, fatal_detail;
    uint32_t nerrors;
    struct nk_error errors[NK_MAX_ERRORS];
};

/* ---- the ring --------------------------------------------------------------------- */

static inline uint8_t *slot_at(const struct nk_ring *r, uint32_t index)
{
    return r->page + NK_SRING_HEADER + (size_t)(index & (r->size - 1)) * r->entry;
}

#define SRING_IDX(r, field) ((r)->page + offsetof(struct netif_tx_sring, field))

struct slot {
    uint32_t gref;
    uint16_t offset, flags, id, size;
};

/* A private copy of an unconsumed tx slot (XSA-155). */
static void read_slot(const struct nk_txq *q, uint32_t index, uint8_t raw[12],
                      struct slot *s)
{
    memcpy(raw, slot_at(&q->r, index), NK_ENTRY);
    if (s) {
        struct netif_tx_request t;
        memcpy(&t, raw, sizeof(t));
        s->gref = t.gref;
        s->offset = t.offset;
        s->flags = t.flags;
        s->id = t.id;
        s->size = t.size;
    }
}

/* The dp_env of the nk_tx / nk_rx call running on this thread: its dirty log. */
static __thread const struct dp_env *nk_env;

/* One response slot: `len` bytes of `data`, the rest of the entry zeroed (no stale
 * bytes in the padding, XSA-216). */
static void put_slot(struct nk_ring *r, const void *data, size_t len)
{
    uint8_t buf[NK_ENTRY];
    memset(buf, 0, sizeof(buf));
    memcpy(buf, data, len);
    memcpy(slot_at(r, r->rsp_prod_pvt), buf, r->entry);
    dp_log_host(nk_env, r->page);
    r->rsp_prod_pvt++;
}

static void put_response(struct nk_txq *q, uint16_t id, int16_t status)
{
    struct netif_tx_response t = { .id = id, .status = status };
    put_slot(&q->r, &t, sizeof(t));
}

/* RING_PUSH_RESPONSES_AND_CHECK_NOTIFY */
static int push_responses(struct nk_ring *r)
{
    uint32_t old = r->pushed, new = r->rsp_prod_pvt;
    if (new == old)
        return 0;
    r->pushed = new;
    return dp_ring_push(nk_env, r->page, old, new);
}

static int final_check(struct nk_ring *r)
{
    return dp_ring_final_check(nk_env, r->page, r->size, r->req_cons, r->rsp_prod_pvt);
}

/* ---- parsing a packet: backendd/devices/net/tx.py ------------------------------- */

enum { K_SEND, K_ERROR, K_MCAST };

struct packet {
    int kind;
    struct slot first;
    uint32_t first_len;
    uint32_t extra_count;
    uint32_t nfrags;
    int gso;                /* a GSO extra was given */
    uint16_t gso_size;
    uint8_t gso_type;
    uint16_t reason;
    uint32_t detail;
    struct slot frags[NK_FATAL_SLOTS];  /* last: parse_packet clears what precedes it */
};

/* 0, or -1 with *reason set: fatal. */
static int parse_packet(const struct nk_txq *q, uint32_t cons, uint32_t avail,
                        struct packet *p)
{
    uint8_t raw[NK_ENTRY], extras[XEN_NETIF_EXTRA_TYPE_MAX][NK_ENTRY];
    int have[XEN_NETIF_EXTRA_TYPE_MAX] = { 0 };
    uint32_t pos = 1;
    memset(p, 0, offsetof(struct packet, frags));
    read_slot(q, cons, raw, &p->first);
    if (p->first.flags & NETTXF_extra_info) {
        for (;;) {
            if (pos >= avail) {
                p->reason = NK_R_MISSING_EXTRA;
                return -1;
            }
            read_slot(q, cons + pos, raw, NULL);
            pos++;
            uint8_t etype = raw[0], eflags = raw[1];
            if (etype == XEN_NETIF_EXTRA_TYPE_NONE || etype >= XEN_NETIF_EXTRA_TYPE_MAX) {
                p->reason = NK_R_EXTRA_TYPE;
                p->detail = etype;
                return -1;
            }
            memcpy(extras[etype], raw, NK_ENTRY);   /* a later one of a type wins */
            have[etype] = 1;
            p->extra_count++;
            if (!(eflags & XEN_NETIF_EXTRA_FLAG_MORE))
                break;
        }
    }
    if (have[XEN_NETIF_EXTRA_TYPE_MCAST_ADD] || have[XEN_NETIF_EXTRA_TYPE_MCAST_DEL]) {
        p->kind = K_MCAST;
        return 0;
    }
    /* xenvif_count_requests */
    uint32_t remaining = p->first.size, slots = 0;
    int more = !!(p->first.flags & NETTXF_more_data);
    uint16_t drop = NK_R_NONE;
    while (more) {
        if (slots >= avail - pos) {
            p->reason = NK_R_CHAIN_PAST;
            return -1;
        }
        if (slots >= NK_FATAL_SLOTS) {
            p->reason = NK_R_MALICIOUS;
            return -1;
        }
        if (slots >= NK_LEGACY_SLOTS && !drop)
            drop = NK_R_TOO_MANY_SLOTS;
        struct slot *t = &p->frags[slots];
        read_slot(q, cons + pos + slots, raw, t);
        if (!drop && t->size > remaining)
            drop = NK_R_SLOT_SIZE;
        remaining = (remaining - t->size) & 0xffff;
        slots++;
        if ((uint32_t)t->offset + t->size > DP_PAGE) {
            p->reason = NK_R_SLOT_CROSSES;
            return -1;
        }
        more = !!(t->flags & NETTXF_more_data);
    }
    p->nfrags = slots;
    p->first_len = remaining;
    if (drop) {
        p->kind = K_ERROR;
        p->reason = drop;
        return 0;
    }
    if (remaining < NK_ETH_HLEN) {
        p->kind = K_ERROR;
        p->reason = NK_R_FIRST_SIZE;
        return 0;
    }
    if ((uint32_t)p->first.offset + remaining > DP_PAGE) {
        p->reason = NK_R_FIRST_CROSSES;
        return -1;
    }
    if (have[XEN_NETIF_EXTRA_TYPE_GSO]) {
        struct netif_extra_info e;
        memcpy(&e, extras[XEN_NETIF_EXTRA_TYPE_GSO], sizeof(e));
        if (!e.u.gso.size) {
            p->reason = NK_R_GSO_SIZE;
            return -1;
        }
        if (e.u.gso.type != XEN_NETIF_GSO_TYPE_TCPV4 &&
            e.u.gso.type != XEN_NETIF_GSO_TYPE_TCPV6) {
            p->reason = NK_R_GSO_TYPE;
            p->detail = e.u.gso.type;
            return -1;
        }
        p->gso = 1;
        p->gso_size = e.u.gso.size;
        p->gso_type = e.u.gso.type;
    }
    p->kind = K_SEND;
    return 0;
}

/* ---- the virtio-net header: backendd/devices/net/vnet.py ------------------------ */

struct vnet_hdr {           /* struct virtio_net_hdr, little-endian */
    uint8_t flags, gso_type;
    uint16_t hdr_len, gso_size, csum_start, csum_offset;
} __attribute__((packed));

_Static_assert(sizeof(struct vnet_hdr) == 10, "virtio_net_hdr");

static inline uint32_t be16(const uint8_t *p) { return (uint32_t)p[0] << 8 | p[1]; }

struct l4 {
    int ipv6;
    uint8_t proto;
    uint32_t l4_off, l4_end;
    const uint8_t *src, *dst;
};

/* skb_checksum_setup's walk as vnet.parse_l4: 0 when the frame is not TCP/UDP over
 * IPv4/IPv6, is a fragment, or is truncated. Every offset is checked against len. */
static int parse_l4(const uint8_t *f, uint32_t len, struct l4 *h)
{
    uint32_t off = 12;
    int64_t payload;
    if (len < 14)
        return 0;
    uint32_t ethertype = be16(f + off);
    off += 2;
    if (ethertype == 0x8100) {
        if (len < off + 4)
            return 0;
        ethertype = be16(f + off + 2);
        off += 4;
    }
    if (ethertype == 0x0800) {
        if (len < off + 20)
            return 0;
        uint32_t ihl = (f[off] & 0xf) * 4;
        if (f[off] >> 4 != 4 || ihl < 20 || len < off + ihl)
            return 0;
        if (be16(f + off + 6) & 0x3fff)
            return 0;
        h->proto = f[off + 9];
        h->src = f + off + 12;
        h->dst = f + off + 16;
        h->l4_off = off + ihl;
        payload = (int64_t)be16(f + off + 2) - ihl;
        h->ipv6 = 0;
    } else if (ethertype == 0x86dd) {
        if (len < off + 40 || f[off] >> 4 != 6)
            return 0;
        payload = be16(f + off + 4);
        h->proto = f[off + 6];
        h->src = f + off + 8;
        h->dst = f + off + 24;
        h->l4_off = off + 40;
        while (h->proto == 0 || h->proto == 43 || h->proto == 60) {
            if (len < h->l4_off + 8)
                return 0;
            uint32_t ext = ((uint32_t)f[h->l4_off + 1] + 1) * 8;
            h->proto = f[h->l4_off];
            h->l4_off += ext;
            payload -= ext;
        }
        if (h->proto == 44)
            return 0;
        h->ipv6 = 1;
    } else {
        return 0;
    }
    if (h->proto == 6) {
        if (len < h->l4_off + 20)
            return 0;
        h->l4_end = h->l4_off + (f[h->l4_off + 12] >> 4) * 4;
        if (h->l4_end < h->l4_off + 20)
            return 0;
    } else if (h->proto == 17) {
        h->l4_end = h->l4_off + 8;
    } else {
        return 0;
    }
    if (len < h->l4_end || payload < (int64_t)(h->l4_end - h->l4_off))
        return 0;
    return 1;
}

static uint32_t sum16(const uint8_t *p, uint32_t n, uint32_t total)
{
    for (uint32_t i = 0; i + 1 < n; i += 2)
        total += be16(p + i);
    if (n & 1)
        total += (uint32_t)p[n - 1] << 8;
    return total;
}

static uint32_t fold(uint32_t total)
{
    while (total >> 16)
        total = (total & 0xffff) + (total >> 16);
    return total;
}

/* vnet.tx_vnet_header: 0 and *v filled, or -1: the headers cannot be parsed for the
 * offload asked for (netback drops the packet). Rewrites the pseudo-header sum into the
 * private header copy. */
static int tx_vnet_header(const struct packet *p, uint8_t *hdr, uint32_t hlen,
                          uint32_t frame_len, struct vnet_hdr *v)
{
    memset(v, 0, sizeof(*v));
    int partial = (p->first.flags & NETTXF_csum_blank) || p->gso;
    if (!partial) {
        if (p->first.flags & NETTXF_data_validated)
            v->flags = 2;   /* VIRTIO_NET_HDR_F_DATA_VALID */
        return 0;
    }
    struct l4 h;
    if (!parse_l4(hdr, hlen, &h))
        return -1;
    uint8_t vgso = 0;
    uint16_t size = 0;
    if (p->gso) {
        if (h.proto != 6 || h.ipv6 != (p->gso_type == XEN_NETIF_GSO_TYPE_TCPV6))
            return -1;
        vgso = p->gso_type == XEN_NETIF_GSO_TYPE_TCPV6 ? 4 : 1;
        size = p->gso_size;
    }
    if (frame_len < h.l4_off)
        return -1;
    uint32_t l4_len = frame_len - h.l4_off;
    if (l4_len < h.l4_end - h.l4_off)
        return -1;
    uint32_t csum_off = h.proto == 6 ? 16 : 6;
    uint32_t alen = h.ipv6 ? 16 : 4;
    uint32_t total = sum16(h.src, alen, 0) + sum16(h.dst, alen, 0);
    if (h.ipv6)
        total += (l4_len >> 16) + (l4_len & 0xffff) + h.proto;
    else
        total += h.proto + l4_len;
    total = fold(total);
    hdr[h.l4_off + csum_off] = (uint8_t)(total >> 8);
    hdr[h.l4_off + csum_off + 1] = (uint8_t)total;
    v->flags = 1;           /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
    v->gso_type = vgso;
    v->hdr_len = vgso ? (uint16_t)h.l4_end : 0;
    v->gso_size = size;
    v->csum_start = (uint16_t)h.l4_off;
    v->csum_offset = (uint16_t)csum_off;
    return 0;
}

/* ---- sending one packet: txpath.TxPath._send ------------------------------------ */

enum { S_OKAY, S_ERROR, S_TAP_FULL };

static void error_record(struct nk_tx_out *out, uint16_t id, uint16_t reason,
                         uint32_t detail, uint32_t grant)
{
    out->tx_errors++;
    if (out->nerrors < NK_MAX_ERRORS) {
        struct nk_error *e = &out->errors[out->nerrors++];
        e->id = id;
        e->reason = reason;
        e->detail = detail;
        e->grant = grant;
    }
}

static int send_packet(struct nk_txq *q, const struct dp_env *env, struct packet *p,
                       struct nk_tx_out *out)
{
    uint32_t pinned[1 + NK_FATAL_SLOTS];
    struct iovec iov[2 + 1 + NK_FATAL_SLOTS];
    const uint8_t *views[1 + NK_FATAL_SLOTS];
    uint32_t lens[1 + NK_FATAL_SLOTS];
    uint32_t npinned = 0, nviews = 0;
    int status = S_OKAY;

    for (uint32_t i = 0; i <= p->nfrags; i++) {
        const struct slot *s = i ? &p->frags[i - 1] : &p->first;
        uint32_t len = i ? s->size : p->first_len;
        if (i && !len)
            continue;       /* zero-length slots never touch their grants (XSA-448) */
        uint8_t *page;
        uint32_t lo, hi;
        int bad = dp_grant_pin_locked(env, s->gref, 0, &page, &lo, &hi);
        if (bad) {
            error_record(out, p->first.id, NK_R_GRANT, s->gref, (uint32_t)-bad);
            status = S_ERROR;
            goto release;
        }
        pinned[npinned++] = s->gref;
        if (s->offset < lo || (uint32_t)s->offset + len > hi) {
            error_record(out, p->first.id, NK_R_WINDOW, s->gref, 0);
            status = S_ERROR;
            goto release;
        }
        views[nviews] = page + s->offset;
        lens[nviews++] = len;
    }

    /* The headers: a private copy of the frame's first bytes across the slots. */
    uint32_t frame_len = p->first.size;
    uint32_t hlen = frame_len < NK_MAX_HEADER ? frame_len : NK_MAX_HEADER;
    uint8_t hdr[NK_MAX_HEADER];
    struct vnet_hdr vnet;
    uint32_t have = 0, niov = 2;
    for (uint32_t i = 0; i < nviews; i++) {
        uint32_t need = hlen - have;
        if (need == 0) {
            iov[niov].iov_base = (void *)views[i];
            iov[niov++].iov_len = lens[i];
        } else if (lens[i] <= need) {
            memcpy(hdr + have, views[i], lens[i]);
            have += lens[i];
        } else {
            memcpy(hdr + have, views[i], need);
            have += need;
            iov[niov].iov_base = (void *)(views[i] + need);
            iov[niov++].iov_len = lens[i] - need;
        }
    }
    if (tx_vnet_header(p, hdr, have, frame_len, &vnet)) {
        out->tx_dropped_csum++;
        goto release;
    }
    iov[0].iov_base = &vnet;
    iov[0].iov_len = sizeof(vnet);
    iov[1].iov_base = hdr;
    iov[1].iov_len = have;
    if (writev(q->fd, iov, (int)niov) < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            out->tx_tap_full++;
            status = S_TAP_FULL;
        } else {
            out->tx_dropped_tap++;
        }
        goto release;
    }
    out->tx_packets++;
    out->tx_bytes += frame_len;
    if (p->gso)
        out->tx_gso++;
release:
    /* Every grant goes before the response is published (XSA-396). */
    for (uint32_t i = 0; i < npinned; i++)
        dp_grant_unpin_locked(env, pinned[i], 0);
    return status;
}

static void respond(struct nk_txq *q, const struct packet *p, int16_t status)
{
    q->r.req_cons += 1 + p->extra_count + p->nfrags;
    put_response(q, p->first.id, status);
    for (uint32_t i = 0; i < p->extra_count; i++)
        put_response(q, 0, NETIF_RSP_NULL);
    for (uint32_t i = 0; i < p->nfrags; i++)
        put_response(q, p->frags[i].id, status);
}

/* ---- one wake-up: txpath.TxPath._run -------------------------------------------- */

void nk_tx(struct nk_txq *q, const struct dp_env *env, struct nk_tx_out *out)
{
    struct packet p;
    int budget_left = 0, stop = 0;
    memset(out, 0, offsetof(struct nk_tx_out, errors));
    nk_env = env;
    if (q->budget > NK_BUDGET)
        q->budget = NK_BUDGET;
    while (q->budget > 0) {
        uint32_t prod = dp_load32(SRING_IDX(&q->r, req_prod));   /* read once */
        dp_rmb();
        uint32_t avail = prod - q->r.req_cons;
        if (avail == 0)
            break;
        if (avail > q->r.size) {
            out->flags |= NK_FATAL;
            out->fatal_reason = NK_R_IMPOSSIBLE;
            out->fatal_detail = prod;
            return;
        }
        uint32_t cons = q->r.req_cons;
        if (q->credit_on && !(q->charged_valid && q->charged_cons == cons)) {
            uint8_t raw[NK_ENTRY];
            struct slot first;
            read_slot(q, cons, raw, &first);
            if (first.size > q->credit) {
                out->tx_rate_limited++;
                out->flags |= NK_CREDIT;
                stop = 1;
                break;
            }
            q->credit -= first.size;
            out->charged += first.size;
            q->charged_valid = 1;
            q->charged_cons = cons;
        }
        if (parse_packet(q, cons, avail, &p)) {
            out->flags |= NK_FATAL;
            out->fatal_reason = p.reason;
            out->fatal_detail = p.detail;
            return;
        }
        int16_t status = NETIF_RSP_OKAY;
        if (p.kind == K_MCAST) {
            out->flags |= NK_MCAST;     /* Python answers it, then calls again */
            stop = 1;
            break;
        } else if (p.kind == K_ERROR) {
            error_record(out, p.first.id, p.reason, 0, 0);
            status = NETIF_RSP_ERROR;
        } else {
            int s = send_packet(q, env, &p, out);
            if (s == S_TAP_FULL) {
                out->flags |= NK_TAP_FULL;
                stop = 1;
                break;
            }
            if (s == S_ERROR)
                status = NETIF_RSP_ERROR;
        }
        respond(q, &p, status);
        if (--q->budget == 0)
            budget_left = 1;
    }
    if (out->flags & NK_MCAST)
        return;             /* the wake-up goes on in Python: nothing published yet */
    if (push_responses(&q->r))
        out->flags |= NK_NOTIFY;
    if (budget_left || (!stop && final_check(&q->r)))
        out->flags |= NK_MORE;
}

/* ---- rx: backendd/devices/net/rx.py ---------------------------------------------- */

#define NK_RX_MAX_POSTED 256    /* a one-page rx ring's entries */
#define NK_MCAST_MAX 64
#define NK_VNET_HDR 10

_Static_assert(sizeof(struct netif_rx_request) == 8, "rx request");
_Static_assert(sizeof(struct netif_rx_response) == 8, "rx response");
_Static_assert(sizeof(union netif_rx_sring_entry) == 8, "rx entry");

struct nk_posted {          /* a buffer the guest posted, pinned writable when ok */
    uint16_t id;
    uint16_t ok;
    uint32_t gref;
    uint8_t *page;
};

/* ---- receive-side steering: backendd/devices/net/{hash,vif}.py ------------------ */

#define NK_MAX_QUEUES 8
#define NK_HASH_KEY 40
#define NK_HASH_MAPPING 128
#define NK_HASH_HEAD 256        /* hash.HEAD_BYTES */
#define NK_INBOX_FRAMES 128     /* vif.INBOX_FRAMES */
#define NK_INBOX_BYTES (512u * 1024u)   /* vif.INBOX_BYTES */

struct nk_steered {         /* one frame waiting in another queue's inbox */
    uint32_t len;
    uint32_t hash;
    uint8_t vnet[10];
    uint8_t has_hash, htype;
    uint32_t _pad;
    uint64_t pos;           /* where its bytes start in the inbox's byte ring */
};

struct nk_inbox {           /* vif.Inbox: the frames steered to one queue */
    uint32_t lock, count, head, _pad;
    uint64_t bytes, wpos;   /* bytes queued; the byte ring's next write position */
    uint8_t *data;          /* NK_INBOX_BYTES, Python's buffer (NULL: one queue) */
    struct nk_steered rec[NK_INBOX_FRAMES];
};

struct nk_steer {           /* one vif's HashConfig and inboxes, shared by its queues;
                             * Python writes the configuration between calls only */
    uint32_t on;            /* HashConfig.steering */
    uint32_t flags;
    uint32_t nq;
    uint32_t msize;         /* mapping entries; 0: hash modulo nq */
    uint8_t key[NK_HASH_KEY];
    uint32_t mapping[NK_HASH_MAPPING];
    struct nk_inbox inbox[NK_MAX_QUEUES];
};

struct nk_rxq {             /* one rx ring: Python's ctypes Structure, kept across calls */
    struct nk_ring r;
    int32_t fd;
    uint32_t need;          /* buffers posted before a read (RxPath.need) */
    uint32_t index;         /* this queue's number */
    uint32_t reserve;       /* buffers after the first kept for extra info (RxPath.reserve) */
    struct nk_steer *steer; /* NULL: no steering state */
    uint32_t gso_offload;   /* the tap may hand us GSO frames: slot 1 kept for the extra */
    uint32_t gso_tcpv4, gso_tcpv6, mcast_control;
    uint32_t nmcast;        /* the vif's multicast list, refreshed by Python per call */
    uint8_t mcast[NK_MCAST_MAX][6];
    uint32_t head, count;   /* the posted buffers, a ring of NK_RX_MAX_POSTED */
    struct nk_posted posted[NK_RX_MAX_POSTED];
    uint8_t hdr[NK_VNET_HDR];
    uint8_t scratch[DP_PAGE];
};

enum { NK_RX_STALL = 64, NK_RX_MORE = 128 };

struct nk_rx_bad {
    uint16_t id;
    uint16_t _pad;
    uint32_t gref;
    uint32_t grant;         /* the DP_G_ reason; 0: a v2 sub-page [lo, hi) */
    uint16_t lo, hi;
};

struct nk_rx_out {
    uint64_t rx_packets, rx_bytes, rx_gso, rx_dropped, rx_mcast_filtered, rx_bad_grant,
             rx_stalls, rx_steered;
    uint32_t woke;          /* bit per queue given a steered frame: Python wakes them */
    uint32_t flags;
    uint32_t fatal_prod;    /* NK_FATAL: the req_prod that overran the ring */
    uint32_t nbad;
    struct nk_rx_bad bad[NK_RX_MAX_POSTED];
};

static inline struct nk_posted *posted_at(struct nk_rxq *q, uint32_t k)
{
    return &q->posted[(q->head + k) % NK_RX_MAX_POSTED];
}

static struct nk_posted posted_pop(struct nk_rxq *q)
{
    struct nk_posted p = q->posted[q->head];
    q->head = (q->head + 1) % NK_RX_MAX_POSTED;
    q->count--;
    return p;
}

static void put_rx_response(struct nk_rxq *q, uint16_t id, uint16_t flags, int16_t status)
{
    struct netif_rx_response t = { .id = id, .offset = 0, .flags = flags, .status = status };
    put_slot(&q->r, &t, sizeof(t));
}

/* BackRing.take_requests + RxPath._take: -1 ring corrupted (fatal), 0 nothing new,
 * 1 some taken. Each buffer is pinned writable as a whole page; one that cannot be is
 * kept in its place as not ok, and answered ERROR in its turn. */
static int rx_take(struct nk_rxq *q, const struct dp_env *env, uint32_t want,
                   struct nk_rx_out *out)
{
    struct nk_ring *r = &q->r;
    uint32_t prod = dp_load32(SRING_IDX(r, req_prod));  /* read once */
    dp_rmb();
    if (prod - r->rsp_prod_pvt > r->size) {
        out->fatal_prod = prod;
        return -1;
    }
    uint32_t cons = r->req_cons, taken = 0;
    if (want < 1)
        want = 1;
    while (cons != prod && taken < want) {
        if (cons - r->rsp_prod_pvt >= r->size)   /* RING_REQUEST_CONS_OVERFLOW */
            break;
        if (q->count >= NK_RX_MAX_POSTED)          /* not reached: bounded by the ring */
            break;
        struct netif_rx_request req;
        memcpy(&req, slot_at(r, cons), sizeof(req));    /* a private copy (XSA-155) */
        cons++;
        taken++;
        struct nk_posted *p = posted_at(q, q->count);
        q->count++;
        p->id = req.id;
        p->gref = req.gref;
        p->ok = 0;
        p->page = NULL;
        uint32_t lo, hi;
        int bad = dp_grant_pin_locked(env, req.gref, 1, &p->page, &lo, &hi);
        if (!bad && (lo != 0 || hi != DP_PAGE)) {
            /* an rx buffer must be a whole page: a v2 sub-page is the guest's error */
            dp_grant_unpin_locked(env, req.gref, 1);
            bad = -0x100;
        }
        if (bad) {
            out->rx_bad_grant++;
            if (out->nbad < NK_RX_MAX_POSTED) {     /* the log keeps the first ones */
                struct nk_rx_bad *b = &out->bad[out->nbad++];
                b->id = req.id;
                b->gref = req.gref;
                b->grant = bad == -0x100 ? 0 : (uint32_t)-bad;
                b->lo = bad == -0x100 ? (uint16_t)lo : 0;
                b->hi = bad == -0x100 ? (uint16_t)hi : 0;
            }
            p->page = NULL;
        } else {
            p->ok = 1;
        }
    }
    r->req_cons = cons;
    return taken ? 1 : 0;
}

static void rx_answer_bad_head(struct nk_rxq *q)
{
    while (q->count && !posted_at(q, 0)->ok) {
        struct nk_posted p = posted_pop(q);
        put_rx_response(q, p.id, 0, NETIF_RSP_ERROR);
    }
}

/* RxPath._fill: 1 when `need` buffers are posted and the first is usable. */
static int rx_fill(struct nk_rxq *q, const struct dp_env *env, struct nk_rx_out *out)
{
    for (;;) {
        rx_answer_bad_head(q);
        if (q->count >= q->need)
            return 1;
        int t = rx_take(q, env, q->need - q->count, out);
        if (t < 0)
            return -1;
        if (t == 0)
            return 0;
    }
}

static inline uint8_t *rx_page(struct nk_rxq *q, const struct nk_posted *p)
{
    return p->ok ? p->page : q->scratch;
}

static int rx_wanted(const struct nk_rxq *q, const uint8_t *dst)
{
    static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    if (!q->mcast_control || !(dst[0] & 1) || !memcmp(dst, bcast, 6))
        return 1;
    for (uint32_t i = 0; i < q->nmcast && i < NK_MCAST_MAX; i++)
        if (!memcmp(q->mcast[i], dst, 6))
            return 1;
    return 0;
}

/* hash.toeplitz: for each bit of data, left-most first, XOR in the 32 key bits from
 * that bit's position on. n <= 36, so the key's 40 bytes always cover the window. */
static uint32_t toeplitz(const uint8_t key[NK_HASH_KEY], const uint8_t *data, uint32_t n)
{
    uint64_t window = 0;
    uint32_t h = 0;
    for (uint32_t i = 0; i < 8; i++)
        window = window << 8 | key[i];
    for (uint32_t i = 0; i < n; i++) {
        for (uint32_t b = 0; b < 8; b++) {
            if (data[i] & (0x80u >> b))
                h ^= (uint32_t)(window >> (32 - b));
        }
        window = window << 8 | (i + 8 < NK_HASH_KEY ? key[i + 8] : 0);
    }
    return h;
}

/* hash.flow_input: the hash type number and the bytes to hash, or -1: no hash. */
static int flow_input(const uint8_t *f, uint32_t len, uint32_t flags, uint8_t *buf,
                      uint32_t *n)
{
    const uint32_t ip = 14;
    if (len < 14)
        return -1;
    uint32_t ethertype = be16(f + 12);
    if (ethertype == 0x0800) {
        if (!(flags & 3) || len < ip + 20)
            return -1;
        uint32_t ihl = (f[ip] & 0xfu) * 4;
        if (f[ip] >> 4 != 4 || ihl < 20)
            return -1;
        memcpy(buf, f + ip + 12, 8);
        uint32_t frag = be16(f + ip + 6) & 0x3fff, l4 = ip + ihl;
        if ((flags & 2) && f[ip + 9] == 6 && !frag && len >= l4 + 4) {
            memcpy(buf + 8, f + l4, 4);
            *n = 12;
            return 1;
        }
        if (flags & 1) {
            *n = 8;
            return 0;
        }
        return -1;
    }
    if (ethertype == 0x86dd) {
        if (!(flags & 12) || len < ip + 40 || f[ip] >> 4 != 6)
            return -1;
        memcpy(buf, f + ip + 8, 32);
        uint32_t proto = f[ip + 6], l4 = ip + 40;
        while ((proto == 0 || proto == 43 || proto == 60) && len >= l4 + 8) {
            uint32_t next = f[l4];
            l4 += ((uint32_t)f[l4 + 1] + 1) * 8;
            proto = next;
        }
        if ((flags & 8) && proto == 6 && len >= l4 + 4) {
            memcpy(buf + 32, f + l4, 4);
            *n = 36;
            return 3;
        }
        if (flags & 4) {
            *n = 32;
            return 2;
        }
        return -1;
    }
    return -1;
}

/* HashConfig.steer: the queue of a frame starting with head[0..len), and its hash. */
static uint32_t steer_frame(const struct nk_steer *st, const uint8_t *head, uint32_t len,
                            int *has_hash, uint8_t *htype, uint32_t *hash)
{
    uint8_t buf[36];
    uint32_t n = 0, value = 0;
    int t = flow_input(head, len, st->flags, buf, &n);
    if (t >= 0)
        value = toeplitz(st->key, buf, n);
    *has_hash = t >= 0;
    *htype = t >= 0 ? (uint8_t)t : 0;
    *hash = value;
    uint32_t nq = st->nq ? st->nq : 1;
    uint32_t queue = st->msize && st->msize <= NK_HASH_MAPPING
                   ? st->mapping[value % st->msize] : value % nq;
    return queue < nq ? queue : 0;  /* not reached otherwise: entries are checked */
}

static void inbox_lock(struct nk_inbox *b) { dp_gnt_lock(&b->lock); }
static void inbox_unlock(struct nk_inbox *b) { dp_gnt_unlock(&b->lock); }

/* Inbox.put: the frame in the pages of bufs (frame_len bytes), or 0 when it is full. */
static int inbox_put(struct nk_inbox *b, struct nk_rxq *q, const struct nk_posted **bufs,
                     uint32_t frame_len, int has_hash, uint8_t htype, uint32_t hash)
{
    int ok = 0;
    inbox_lock(b);
    if (b->data && b->count < NK_INBOX_FRAMES && b->bytes + frame_len <= NK_INBOX_BYTES) {
        struct nk_steered *r = &b->rec[(b->head + b->count) % NK_INBOX_FRAMES];
        r->len = frame_len;
        r->hash = hash;
        r->has_hash = (uint8_t)has_hash;
        r->htype = htype;
        memcpy(r->vnet, q->hdr, NK_VNET_HDR);
        r->pos = b->wpos;
        for (uint32_t done = 0, k = 0; done < frame_len; k++) {
            const uint8_t *src = rx_page(q, bufs[k]);
            uint32_t chunk = frame_len - done < DP_PAGE ? frame_len - done : DP_PAGE;
            for (uint32_t c = 0; c < chunk;) {  /* the byte ring may wrap mid-chunk */
                uint32_t at = (uint32_t)((b->wpos + done + c) % NK_INBOX_BYTES);
                uint32_t run = chunk - c < NK_INBOX_BYTES - at ? chunk - c
                             : NK_INBOX_BYTES - at;
                memcpy(b->data + at, src + c, run);
                c += run;
            }
            done += chunk;
        }
        b->wpos += frame_len;
        b->bytes += frame_len;
        b->count++;
        ok = 1;
    }
    inbox_unlock(b);
    return ok;
}

/* RxPath._respond: the frame is in the posted buffers (first data page in the first,
 * then `extras` extra-info slots, then the other data pages): unpin, answer, count. */
static void rx_respond(struct nk_rxq *q, const struct dp_env *env, const struct vnet_hdr *v,
                       int64_t frame_len, int gso, uint8_t gtype, int has_hash,
                       uint8_t htype, uint32_t hash, struct nk_rx_out *out)
{
    uint32_t npages = (uint32_t)((frame_len + DP_PAGE - 1) / DP_PAGE);
    uint32_t extras = (uint32_t)gso + (uint32_t)has_hash;
    uint32_t used = npages + extras;
    struct nk_posted entries[NK_RX_MAX_POSTED];
    for (uint32_t i = 0; i < used; i++)
        entries[i] = posted_pop(q);
    int failed_any = 0;
    for (uint32_t i = 0; i < used; i++) {
        if (i >= 1 && i <= extras)
            continue;       /* the extra-info slots carry no data */
        if (!entries[i].ok)
            failed_any = 1;
    }
    /* Every grant goes before the responses are published (XSA-396). */
    for (uint32_t i = 0; i < used; i++)
        if (entries[i].ok)
            dp_grant_unpin_locked(env, entries[i].gref, 1);
    uint16_t csum = 0;      /* vnet.rx_netif_flags */
    if (v->flags & 1)
        csum = NETRXF_csum_blank | NETRXF_data_validated;
    else if (v->flags & 2)
        csum = NETRXF_data_validated;
    /* rx.rx_responses: the first data slot, the GSO and hash extras, the other data. */
    for (uint32_t k = 0; k < npages; k++) {
        uint32_t idx = k ? k + extras : 0;
        uint16_t flags = k == 0 ? csum : 0;
        if (k == 0 && extras)
            flags |= NETRXF_extra_info;
        if (k < npages - 1)
            flags |= NETRXF_more_data;
        int16_t size = k < npages - 1 ? (int16_t)DP_PAGE
                     : (int16_t)(frame_len - (int64_t)(npages - 1) * DP_PAGE);
        if (!entries[idx].ok)
            size = NETIF_RSP_ERROR;
        put_rx_response(q, entries[idx].id, flags, size);
        if (k == 0 && gso) {
            struct netif_extra_info e;
            memset(&e, 0, sizeof(e));
            e.type = XEN_NETIF_EXTRA_TYPE_GSO;
            e.flags = has_hash ? XEN_NETIF_EXTRA_FLAG_MORE : 0;
            e.u.gso.size = v->gso_size;
            e.u.gso.type = gtype;
            put_slot(&q->r, &e, sizeof(e));
        }
        if (k == 0 && has_hash) {
            struct netif_extra_info e;
            memset(&e, 0, sizeof(e));
            e.type = XEN_NETIF_EXTRA_TYPE_HASH;
            e.u.hash.type = htype;
            e.u.hash.algorithm = XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ;
            memcpy(e.u.hash.value, &hash, 4);   /* little-endian, as netback writes it */
            put_slot(&q->r, &e, sizeof(e));
        }
    }
    if (failed_any) {
        out->rx_dropped++;  /* part of the frame went to scratch: the frontend drops it */
        return;
    }
    out->rx_packets++;
    out->rx_bytes += (uint64_t)frame_len;
    if (gso)
        out->rx_gso++;
}

/* vnet.rx_gso: 0 not GSO, 1 GSO (*gtype set), -1 a GSO type netif cannot express. */
static int rx_gso(const struct vnet_hdr *v, uint8_t *gtype)
{
    *gtype = 0;
    if (v->gso_type == 0)
        return 0;
    if (v->gso_type == 1)
        *gtype = XEN_NETIF_GSO_TYPE_TCPV4;
    else if (v->gso_type == 4)
        *gtype = XEN_NETIF_GSO_TYPE_TCPV6;
    if (!*gtype || !v->gso_size)
        return -1;
    return 1;
}

/* RxPath._read_one: 0 when the tap is empty, 1 when a frame was handled. */
static int rx_read_one(struct nk_rxq *q, const struct dp_env *env, struct nk_rx_out *out)
{
    struct iovec iov[1 + NK_RX_MAX_POSTED];
    const struct nk_posted *bufs[NK_RX_MAX_POSTED];
    uint32_t nbufs = 0;
    bufs[nbufs++] = posted_at(q, 0);
    for (uint32_t i = 1 + q->reserve; i < q->need && i < q->count; i++)
        bufs[nbufs++] = posted_at(q, i);
    iov[0].iov_base = q->hdr;
    iov[0].iov_len = NK_VNET_HDR;
    for (uint32_t i = 0; i < nbufs; i++) {
        iov[1 + i].iov_base = rx_page(q, bufs[i]);
        iov[1 + i].iov_len = DP_PAGE;
    }
    ssize_t n = readv(q->fd, iov, (int)(1 + nbufs));
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        out->rx_dropped++;
        return 1;
    }
    int64_t frame_len = (int64_t)n - NK_VNET_HDR;
    if (env->log && frame_len > 0)  /* the guest pages the read reached */
        for (uint32_t i = 0; i < nbufs && (int64_t)i * DP_PAGE < frame_len; i++)
            if (bufs[i]->ok)
                dp_log_host(env, bufs[i]->page);
    if (frame_len < NK_ETH_HLEN || frame_len > (int64_t)nbufs * DP_PAGE) {
        out->rx_dropped++;
        return 1;
    }
    struct vnet_hdr v;
    memcpy(&v, q->hdr, sizeof(v));
    uint8_t gtype = 0;
    int gso = rx_gso(&v, &gtype);
    if (gso < 0) {
        out->rx_dropped++;
        return 1;
    }
    if (gso && !(gtype == XEN_NETIF_GSO_TYPE_TCPV4 ? q->gso_tcpv4 : q->gso_tcpv6)) {
        out->rx_dropped++;
        return 1;
    }
    if (!rx_wanted(q, rx_page(q, bufs[0]))) {
        out->rx_mcast_filtered++;   /* the buffers stay posted */
        return 1;
    }
    int has_hash = 0;
    uint8_t htype = 0;
    uint32_t hash = 0;
    struct nk_steer *st = q->steer;
    if (st && st->on) {
        /* A private copy of the headers: the guest may rewrite its posted pages. */
        uint8_t head[NK_HASH_HEAD];
        uint32_t hlen = frame_len < NK_HASH_HEAD ? (uint32_t)frame_len : NK_HASH_HEAD;
        memcpy(head, rx_page(q, bufs[0]), hlen);
        uint32_t queue = steer_frame(st, head, hlen, &has_hash, &htype, &hash);
        if (queue != q->index) {
            /* Another queue's frame: into its inbox; our buffers stay posted. */
            if (queue < NK_MAX_QUEUES &&
                inbox_put(&st->inbox[queue], q, bufs, (uint32_t)frame_len, has_hash,
                          htype, hash)) {
                out->rx_steered++;
                out->woke |= 1u << queue;
            } else {
                out->rx_dropped++;
            }
            return 1;
        }
    }
    uint32_t npages = (uint32_t)((frame_len + DP_PAGE - 1) / DP_PAGE);
    uint32_t extras = (uint32_t)gso + (uint32_t)has_hash;
    if (npages + extras > q->count) {
        /* Not reached: the reserve holds every extra slot a frame can need. Never let
         * a frame use buffers that are not posted. */
        out->rx_dropped++;
        return 1;
    }
    if (npages > 1 && extras < q->reserve) {
        /* Fewer extra-info slots than reserved: the data pages move down. */
        for (uint32_t k = 1; k < npages; k++) {
            const struct nk_posted *dst = posted_at(q, extras + k);
            memmove(rx_page(q, dst), rx_page(q, posted_at(q, q->reserve + k)), DP_PAGE);
            if (dst->ok)
                dp_log_host(env, dst->page);
        }
    }
    rx_respond(q, env, &v, frame_len, gso, gtype, has_hash, htype, hash, out);
    return 1;
}

/* RxPath._deliver: the oldest frame another queue read for this one, copied into the
 * posted buffers as a frame read here would be laid out. */
static void rx_deliver(struct nk_rxq *q, const struct dp_env *env, struct nk_rx_out *out)
{
    struct nk_inbox *b = &q->steer->inbox[q->index];
    inbox_lock(b);
    struct nk_steered r = b->rec[b->head];
    struct vnet_hdr v;
    memcpy(&v, r.vnet, sizeof(v));
    uint8_t gtype = 0;
    int gso = rx_gso(&v, &gtype) > 0;
    uint32_t npages = (r.len + DP_PAGE - 1) / DP_PAGE;
    uint32_t extras = (uint32_t)gso + r.has_hash;
    int room = npages + extras <= q->count;
    for (uint32_t k = 0; room && k < npages; k++) {
        const struct nk_posted *p = posted_at(q, k ? extras + k : 0);
        uint8_t *dst = rx_page(q, p);
        if (p->ok)      /* logged before the write, long before the response shows it */
            dp_log_host(env, p->page);
        uint32_t chunk = r.len - k * DP_PAGE < DP_PAGE ? r.len - k * DP_PAGE : DP_PAGE;
        for (uint32_t c = 0; c < chunk;) {
            uint32_t at = (uint32_t)((r.pos + (uint64_t)k * DP_PAGE + c) % NK_INBOX_BYTES);
            uint32_t run = chunk - c < NK_INBOX_BYTES - at ? chunk - c : NK_INBOX_BYTES - at;
            memcpy(dst + c, b->data + at, run);
            c += run;
        }
    }
    b->head = (b->head + 1) % NK_INBOX_FRAMES;
    b->count--;
    b->bytes -= r.len;
    inbox_unlock(b);
    if (!room) {
        out->rx_dropped++;  /* the frontend turned hashing off since: no room */
        return;
    }
    rx_respond(q, env, &v, r.len, gso, gtype, r.has_hash, r.htype, r.hash, out);
}

static int inbox_waiting(const struct nk_rxq *q)
{
    const struct nk_steer *st = q->steer;
    return st && q->index < NK_MAX_QUEUES &&
           __atomic_load_n(&st->inbox[q->index].count, __ATOMIC_ACQUIRE) > 0;
}

/* RxPath._readable: up to `budget` frames. NK_RX_STALL: not enough buffers posted (the
 * reader pauses; NK_RX_MORE then says requests arrived meanwhile: kick again). */
void nk_rx(struct nk_rxq *q, const struct dp_env *env, uint32_t budget,
           struct nk_rx_out *out)
{
    memset(out, 0, offsetof(struct nk_rx_out, bad));
    nk_env = env;
    if (q->need < 1 || q->need > NK_RX_MAX_POSTED / 2 || q->r.entry != 8 ||
        q->r.size > NK_RX_MAX_POSTED || q->reserve > 2 || q->reserve >= q->need ||
        (q->steer && (q->index >= NK_MAX_QUEUES || q->steer->nq > NK_MAX_QUEUES))) {
        out->flags |= NK_FATAL;     /* a binding error, never a guest's */
        return;
    }
    for (uint32_t n = 0; n < budget; n++) {
        int f = rx_fill(q, env, out);
        if (f <= 0) {
            out->flags |= NK_RX_STALL;
            out->rx_stalls++;
            if (f < 0)
                out->flags |= NK_FATAL;
            else if (final_check(&q->r))
                out->flags |= NK_RX_MORE;
            break;
        }
        if (inbox_waiting(q)) {
            rx_deliver(q, env, out);
            continue;
        }
        if (!rx_read_one(q, env, out))
            break;
    }
    if (push_responses(&q->r))
        out->flags |= NK_NOTIFY;
}

/* RxPath.stop: every posted buffer's pin goes. */
void nk_rx_release(struct nk_rxq *q, const struct dp_env *env)
{
    while (q->count) {
        struct nk_posted p = posted_pop(q);
        if (p.ok)
            dp_grant_unpin_locked(env, p.gref, 1);
    }
}

/* ---- the queues due in one loop turn, in parallel ------------------------------- */

/* One tx or rx wake-up of one queue. `thread` is set to the thread that served it. */
struct nk_work {
    uint32_t kind;      /* NK_WORK_TX or NK_WORK_RX */
    uint32_t budget;    /* rx: frames */
    void *q;
    const struct dp_env *env;
    void *out;
    uint64_t thread;
};
#define NK_WORK_TX 0
#define NK_WORK_RX 1

static void serve_one(struct nk_work *w)
{
    w->thread = (uint64_t)syscall(SYS_gettid);
    if (w->kind == NK_WORK_TX)
        nk_tx(w->q, w->env, w->out);
    else
        nk_rx(w->q, w->env, w->budget, w->out);
}

static void serve_item(void *ctx, uint32_t k)
{
    serve_one(&((struct nk_work *)ctx)[k]);
}

/* Serve n wake-ups, in parallel when n > 1: the caller serves the first, helper
 * threads (pool.h) the others. Each wake-up touches only its own queue, out and env,
 * and the grant use counts under their stripe locks. Returns how many ran on helper
 * threads. */
static struct dp_pool nk_pool = DP_POOL_INIT;

uint32_t nk_serve_many(struct nk_work *works, uint32_t n)
{
    return dp_pool_run(&nk_pool, serve_item, works, n);
}

struct nk_groups {
    struct nk_work *works;
    const uint32_t *starts;
};

static void serve_group(void *ctx, uint32_t k)
{
    const struct nk_groups *g = ctx;
    for (uint32_t i = g->starts[k]; i < g->starts[k + 1]; i++)
        serve_one(&g->works[i]);
}

/* As nk_serve_many, by groups: group k is works[starts[k] .. starts[k + 1]), served in
 * order on one thread; the groups in parallel. The tx and rx wake-ups of one queue go
 * in one group: handing one of them to another thread costs more than it saves (one
 * direction's work is mostly acknowledgements), and the queues are what spread. Returns
 * how many groups ran on helper threads. */
uint32_t nk_serve_groups(struct nk_work *works, const uint32_t *starts, uint32_t ngroups)
{
    struct nk_groups g = {works, starts};
    return dp_pool_run(&nk_pool, serve_group, &g, ngroups);
}

/* ---- one queue watched after its wake-up: nk_serve_poll ------------------------ */

/* One queue in an nk_serve_poll call: its tx and rx wake-ups (q NULL: that direction
 * is not served in this call) and the guest's eventfds. Counters are what the call did
 * on Python's behalf: events signalled, kicks read. */
struct nk_poll {
    struct nk_work tx, rx;
    int32_t tx_call, rx_call;   /* the guest's events, signalled as batches are published */
    int32_t tx_kick, rx_kick;   /* the guest's kicks, waited on and read; equal: shared */
    uint32_t tx_due, rx_due;    /* served at once; otherwise once it is ready */
    uint32_t tx_notified, tx_saturated, rx_notified, rx_saturated;
    uint32_t tx_kicks, rx_kicks;    /* kick counters read (a shared channel's: tx_kicks) */
    uint32_t tx_batches, rx_batches;    /* times each direction was served (0: its out
                                         * is untouched, the path left as it was) */
    uint32_t batches;           /* times the queue was served */
    uint32_t woken;             /* waits that ended with the queue ready */
    uint32_t ended;             /* NK_END_* */
    uint32_t rx_stalled;        /* in and out: the reader waits for buffers (one stall
                                 * is counted once, however often it is looked at) */    int32_t rx_wake;            /* an eventfd written when a frame is steered to this
                                 * queue's inbox by another queue of the call; -1 */
};

enum { NK_END_IDLE = 0, NK_END_BUDGET = 1, NK_END_CALLER = 2, NK_END_LOOP = 3 };

/* What the queues of one nk_serve_poll call share. With a loop fd, the call is one
 * watch over all of them: it ends for every queue at once (`end`), when Python has
 * something to do. The thread that finds so writes wake_fd, which every queue's wait
 * watches too, so the others leave their waits; nobody reads wake_fd during the call
 * (it stays readable), the call resets it when it starts. */
struct nk_poll_call {
    struct nk_poll *polls;
    uint32_t n;
    uint32_t poll_ns, budget_ns;
    int32_t loop_fd;        /* the event loop's own poll set (epoll fd); -1: none */
    int32_t wake_fd;        /* an eventfd of the call's; -1 without loop_fd */
    uint32_t end;           /* set once: every queue leaves its watch */
    uint32_t idle;          /* queues idle for poll_ns; all of them: the call ends */
};

#define NK_LOOP_CHECK_NS 50000u     /* a queue that never waits looks at the loop so often */

/* Whether fd is readable now (without waiting). */
static int fd_ready(int32_t fd)
{
    struct pollfd p = {fd, POLLIN, 0};
    return fd >= 0 && poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* The whole call ends: every queue leaves its watch. */
static void call_end(struct nk_poll_call *c)
{
    if (__atomic_exchange_n(&c->end, 1, __ATOMIC_ACQ_REL))
        return;
    if (c->wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t w;
        do
            w = write(c->wake_fd, &one, sizeof(one));
        while (w < 0 && errno == EINTR);
    }
}

/* The guest's event: an eventfd write, unless the counter is full (the guest has an
 * event pending then, and a write would block). Counted as written or saturated; a
 * signal arriving meanwhile does not lose it (EINTR: again). */
static void signal_guest(int32_t fd, uint32_t *written, uint32_t *saturated)
{
    struct pollfd p = {fd, POLLOUT, 0};
    uint64_t one = 1;
    int r;
    ssize_t w = -1;
    do
        r = fd >= 0 ? poll(&p, 1, 0) : -1;
    while (r < 0 && errno == EINTR);
    if (r == 1 && (p.revents & POLLOUT)) {
        do
            w = write(fd, &one, sizeof(one));
        while (w < 0 && errno == EINTR);
    }
    if (w == (ssize_t)sizeof(one))
        (*written)++;
    else
        (*saturated)++;
}

/* Reset a kick eventfd without blocking, whatever its O_NONBLOCK (RWF_NOWAIT); whether
 * it had been kicked. */
static int read_kick(int32_t fd)
{
    uint64_t v;
    struct iovec iov = {&v, sizeof(v)};
    return preadv2(fd, &iov, 1, -1, RWF_NOWAIT) == (ssize_t)sizeof(v);
}

static void merge_tx(struct nk_tx_out *acc, const struct nk_tx_out *b)
{
    acc->tx_packets += b->tx_packets;
    acc->tx_bytes += b->tx_bytes;
    acc->tx_gso += b->tx_gso;
    acc->tx_errors += b->tx_errors;
    acc->tx_dropped_csum += b->tx_dropped_csum;
    acc->tx_dropped_tap += b->tx_dropped_tap;
    acc->tx_tap_full += b->tx_tap_full;
    acc->tx_rate_limited += b->tx_rate_limited;
    acc->charged += b->charged;
    acc->flags = b->flags;
    acc->fatal_reason = b->fatal_reason;
    acc->fatal_detail = b->fatal_detail;
    for (uint32_t i = 0; i < b->nerrors && acc->nerrors < NK_MAX_ERRORS; i++)
        acc->errors[acc->nerrors++] = b->errors[i];    /* the log keeps the first ones */
}

static void merge_rx(struct nk_rx_out *acc, const struct nk_rx_out *b)
{
    acc->rx_packets += b->rx_packets;
    acc->rx_bytes += b->rx_bytes;
    acc->rx_gso += b->rx_gso;
    acc->rx_dropped += b->rx_dropped;
    acc->rx_mcast_filtered += b->rx_mcast_filtered;
    acc->rx_bad_grant += b->rx_bad_grant;
    acc->rx_stalls += b->rx_stalls;
    acc->rx_steered += b->rx_steered;
    acc->woke |= b->woke;
    acc->flags = b->flags;
    acc->fatal_prod = b->fatal_prod;
    for (uint32_t i = 0; i < b->nbad && acc->nbad < NK_RX_MAX_POSTED; i++)
        acc->bad[acc->nbad++] = b->bad[i];
}

/* A frame was steered to queue `index` of the vif whose steering state is st: if that
 * queue is watched in this call, its wait is ended so that it delivers the frame. */
static void wake_steered(const struct nk_poll_call *c, const struct nk_steer *st,
                         uint32_t woke)
{
    for (uint32_t k = 0; k < c->n; k++) {
        const struct nk_poll *o = &c->polls[k];
        const struct nk_rxq *q = o->rx.q;
        if (q && q->steer == st && q->index < 32 && (woke & (1u << q->index)) &&
            o->rx_wake >= 0) {
            uint64_t one = 1;
            ssize_t w;
            do
                w = write(o->rx_wake, &one, sizeof(one));
            while (w < 0 && errno == EINTR);
        }
    }
}

/* Serve the queue, then wait (sleeping in ppoll, never spinning) for it to be ready
 * again and serve it again. Without a loop fd, its watch ends once it has been idle
 * for poll_ns, budget_ns after the call began, or when it needs Python (a fatal ring,
 * a multicast packet, a full tap, the credit spent). With one (the event loop's own
 * poll set, which the caller keeps this call's fds out of), the watch is the whole
 * call's: it goes on while any queue is busy and ends for every queue at once when the
 * loop has work (its fd readable), a queue needs Python, every queue has been idle for
 * poll_ns, or at budget_ns. Every batch ends as a wake-up does: its responses
 * published, ring.h's notify rule applied (the guest's event signalled here), and
 * req_event set by the final check when the ring is empty, so the guest kicks for what
 * it publishes next: that kick, or the tap becoming readable, or (with too few rx
 * buffers posted) the rx kick, is what the wait watches. A direction is served only
 * when it is due or ready (a ring not kicked is not touched, not even its req_event);
 * the last batch's flags are the call's, as a single wake-up's would be. The queue's
 * record is worked on in a private copy and written back at the end, so two queues'
 * threads share no cache line they write. */
static void poll_group(void *ctx, uint32_t k)
{
    struct nk_poll_call *c = ctx;
    struct nk_poll lp = c->polls[k], *p = &lp;
    struct nk_txq *txq = p->tx.q;
    struct nk_rxq *rxq = p->rx.q;
    struct nk_tx_out *txo = p->tx.out, tb;
    struct nk_rx_out *rxo = p->rx.out, rb;
    uint64_t start = dp_now_ns(), deadline = start + c->budget_ns;
    uint64_t tid = (uint64_t)syscall(SYS_gettid);
    uint64_t last_work = start, last_look = start;
    int want_tx = txq && p->tx_due, want_rx = rxq && p->rx_due;
    int whole = c->loop_fd >= 0, idle = 0;
    p->tx.thread = p->rx.thread = tid;
    p->ended = NK_END_IDLE;
    for (;;) {
        int again_tx = 0, again_rx = 0, stop = 0;
        /* What is wanted here is always served before the queue leaves: a kick read
         * is not read again. */
        if (want_tx || want_rx) {
            p->batches++;
            if (idle) {
                idle = 0;
                __atomic_fetch_sub(&c->idle, 1, __ATOMIC_ACQ_REL);
            }
        }
        if (want_tx) {
            struct nk_tx_out *o = p->tx_batches ? &tb : txo;
            if (p->tx_batches)
                txq->budget = NK_BUDGET;
            nk_tx(txq, p->tx.env, o);
            if (o->flags & NK_NOTIFY) {
                o->flags &= ~(uint32_t)NK_NOTIFY;
                signal_guest(p->tx_call, &p->tx_notified, &p->tx_saturated);
            }
            if (p->tx_batches++)
                merge_tx(txo, o);
            if (txo->flags & (NK_FATAL | NK_MCAST | NK_TAP_FULL | NK_CREDIT))
                stop = 1;
            else if (txo->flags & NK_MORE)
                again_tx = 1;
        }
        if (want_rx && !stop) {
            struct nk_rx_out *o = p->rx_batches ? &rb : rxo;
            nk_rx(rxq, p->rx.env, p->rx.budget, o);
            if (o->rx_stalls && p->rx_stalled && !(o->rx_packets | o->rx_dropped |
                                                  o->rx_mcast_filtered | o->rx_steered))
                o->rx_stalls = 0;   /* still the stall counted before */
            p->rx_stalled = !!(o->flags & NK_RX_STALL);
            if (o->flags & NK_NOTIFY) {
                o->flags &= ~(uint32_t)NK_NOTIFY;
                signal_guest(p->rx_call, &p->rx_notified, &p->rx_saturated);
            }
            if (whole && o->woke)
                wake_steered(c, rxq->steer, o->woke);
            if (p->rx_batches++)
                merge_rx(rxo, o);
            if (rxo->flags & NK_FATAL)
                stop = 1;
            else if ((rxo->flags & NK_RX_STALL) && (rxo->flags & NK_RX_MORE))
                again_rx = 1;
            else if (!(rxo->flags & NK_RX_STALL) && inbox_waiting(rxq))
                again_rx = 1;   /* frames steered here while this batch ran */
        }
        if (stop) {
            p->ended = NK_END_CALLER;
            if (whole)
                call_end(c);
            break;
        }
        uint64_t now = dp_now_ns();
        if (want_tx || want_rx)
            last_work = now;    /* idle from the end of the last batch on */
        if (now >= deadline) {
            p->ended = NK_END_BUDGET;
            if (whole)
                call_end(c);
            break;
        }
        want_tx = again_tx;
        want_rx = again_rx;
        int ending = whole && __atomic_load_n(&c->end, __ATOMIC_ACQUIRE);
        if ((want_tx || want_rx) && !ending) {
            if (whole && now - last_look >= NK_LOOP_CHECK_NS) {
                last_look = now;
                if (fd_ready(c->loop_fd)) {     /* the loop has work: Python's turn */
                    p->ended = NK_END_LOOP;
                    call_end(c);    /* the work left is flagged (MORE): Python's */
                    break;
                }
            }
            continue;
        }
        if (ending) {
            p->ended = NK_END_LOOP;
            break;
        }
        /* Nothing left: wait for the guest's kick or the tap (and, for the whole call,
         * the loop and the other queues). */
        struct pollfd fds[6];
        nfds_t n = 0;
        int tx_at = -1, rx_at = -1, tap_at = -1, wake_at = -1, loop_at = -1;
        if (txq && p->tx_kick >= 0) {
            tx_at = (int)n;
            fds[n++] = (struct pollfd){p->tx_kick, POLLIN, 0};
        }
        if (rxq && p->rx_stalled) {
            if (p->rx_kick >= 0 && p->rx_kick != p->tx_kick) {
                rx_at = (int)n;
                fds[n++] = (struct pollfd){p->rx_kick, POLLIN, 0};
            } else if (p->rx_kick >= 0 && tx_at < 0) {
                tx_at = (int)n;     /* a shared channel, tx not served: counted as tx */
                fds[n++] = (struct pollfd){p->rx_kick, POLLIN, 0};
            }
        } else if (rxq) {
            tap_at = (int)n;
            fds[n++] = (struct pollfd){rxq->fd, POLLIN, 0};
        }
        if (!n && !whole)
            break;
        if (whole) {
            loop_at = (int)n;
            fds[n++] = (struct pollfd){c->loop_fd, POLLIN, 0};
            if (c->wake_fd >= 0)
                fds[n++] = (struct pollfd){c->wake_fd, POLLIN, 0};
            if (rxq && p->rx_wake >= 0) {
                wake_at = (int)n;
                fds[n++] = (struct pollfd){p->rx_wake, POLLIN, 0};
            }
        }
        uint64_t until = deadline;
        if (!idle && last_work + c->poll_ns < until)
            until = last_work + c->poll_ns;
        if (until <= now) {     /* idle for poll_ns */
            if (!whole)
                break;
            idle = 1;
            if (__atomic_add_fetch(&c->idle, 1, __ATOMIC_ACQ_REL) >= c->n) {
                call_end(c);    /* every queue idle: back to the loop */
                break;
            }
            continue;
        }
        uint64_t wait = until - now;
        struct timespec ts = {(time_t)(wait / 1000000000u), (long)(wait % 1000000000u)};
        int r = ppoll(fds, n, &ts, NULL);
        if (r < 0 && errno != EINTR) {
            if (whole)      /* not reached: the fds are the caller's, checked */
                call_end(c);
            break;
        }
        if (r <= 0)
            continue;       /* the time is looked at above */
        if (tx_at >= 0 && fds[tx_at].revents) {
            if (read_kick(fds[tx_at].fd))
                p->tx_kicks++;
            want_tx = txq != NULL;
            want_rx |= rxq && fds[tx_at].fd == p->rx_kick;    /* a shared channel */
        }
        if (rx_at >= 0 && fds[rx_at].revents) {
            if (read_kick(fds[rx_at].fd))
                p->rx_kicks++;
            want_rx = 1;
        }
        if (tap_at >= 0 && fds[tap_at].revents)
            want_rx = 1;
        if (wake_at >= 0 && fds[wake_at].revents) {
            read_kick(fds[wake_at].fd);
            want_rx |= !p->rx_stalled;  /* frames in its inbox, buffers permitting */
        }
        if (want_tx || want_rx) {
            p->woken++;
        } else if (loop_at >= 0 && fds[loop_at].revents) {
            p->ended = NK_END_LOOP;     /* the loop has work: Python's turn */
            call_end(c);
            break;
        }
    }
    c->polls[k] = lp;
}

/* As nk_serve_groups with one queue per group (polls[k]: its tx and rx), each queue
 * then watched and served again in the same call (poll_group); the queues in parallel,
 * as there. Python runs once per call instead of once per wake-up: without a loop fd
 * (-1) each queue's watch ends after poll_ns idle or budget_ns; with the event loop's
 * poll set as loop_fd (and wake_fd, an eventfd of the caller's), the call lasts until
 * the loop or a queue needs Python, every queue has been idle for poll_ns, or
 * budget_ns. Returns how many queues ran on helper threads. */
uint32_t nk_serve_poll(struct nk_poll *polls, uint32_t n, uint32_t poll_ns,
                       uint32_t budget_ns, int32_t loop_fd, int32_t wake_fd)
{
    struct nk_poll_call c = {polls, n, poll_ns, budget_ns, loop_fd,
                             loop_fd >= 0 ? wake_fd : -1, 0, 0};
    if (c.wake_fd >= 0)
        read_kick(c.wake_fd);   /* written by the call before */
    for (uint32_t k = 0; k < n; k++)
        if (polls[k].rx.q && polls[k].rx_wake >= 0)
            read_kick(polls[k].rx_wake);
    return dp_pool_run(&nk_pool, poll_group, &c, n);
}

/* Sizes the binding checks at load. */
uint32_t nk_layout(uint32_t *out, uint32_t n)
{
    const uint32_t v[] = {
        sizeof(struct nk_txq), sizeof(struct nk_tx_out), sizeof(struct dp_env),
        sizeof(struct nk_rxq), sizeof(struct nk_rx_out),
        sizeof(struct dp_region), NK_BUDGET, NK_MAX_ERRORS, (uint32_t)NK_SRING_HEADER,
        (uint32_t)NK_ENTRY, sizeof(struct nk_work), sizeof(struct nk_steer),
        sizeof(struct nk_poll),
    };
    uint32_t k = sizeof(v) / sizeof(v[0]);
    for (uint32_t i = 0; i < k && i < n; i++)
        out[i] = v[i];
    return k;
}
