/* A netfront for benchmarks: the guest's half of the netif rings, in C, bridged to a tap
 * in a "guest" network namespace, so that the kernel's TCP/IP stack (iperf3, ping) is
 * the guest and the benchmark measures the backend, not a Python frontend.
 *
 * The guest tap (opened with vnet headers, the offloads set) and its namespace come from
 * the caller (bench/netload.py), one tap queue fd per ring queue. The control plane
 * (guest memory and grant table handed to the daemon, ADD_DEVICE, ring pages allocated
 * and granted, FRONTEND_STATE) is done either by the caller too, or here, with --socket,
 * through the C client library (clients/c/backendd-client.h), as a C VMM would. In the
 * first mode this program inherits the guest RAM and grant-table memfds and per queue
 * the tx and rx event channels' kick/call eventfds; in the second it makes them itself
 * (sealed memfds, eventfd pairs), hands them over with ADD_MEM_REGION, SET_GRANT_TABLE
 * and ADD_DEVICE (the nic's config from --nic KEY=VALUE), connects the nic with
 * FRONTEND_STATE Connected, and after the run reads the daemon's counters (GET_STATS),
 * closes and removes the nic. Either way it maps the memfds, initialises the rings
 * (SHARED_RING_INIT, FRONT_RING_INIT) and serves them with ring.h's macros, one thread
 * per queue:
 *
 *   - tx (guest -> backend): a frame read from the guest tap lands, behind its
 *     virtio_net_hdr, straight in up to 17 guest pages; each page is granted read-only
 *     for this one use and put on the ring as Linux's netfront lays a frame out: the
 *     first slot carries the whole frame's size, NETTXF_more_data chains the rest, a
 *     GSO frame gets a XEN_NETIF_EXTRA_TYPE_GSO slot after its first slot, and
 *     NEEDS_CSUM becomes csum_blank|data_validated;
 *   - rx (backend -> guest): every free rx slot gets a page granted writable for this
 *     one use; a received frame (data slots, an extra-info slot after the first) is
 *     written to the guest tap from the pages with a virtio_net_hdr rebuilt from the
 *     flags and the GSO extra (netfront's skb_checksum_setup for csum_blank);
 *   - after its response, every grant is ended with a compare-and-swap that refuses
 *     while GTF_reading/GTF_writing is set: the backend must have let go of the page
 *     before it answered;
 *   - event channels are split (tx and rx each with its own kick/call) or shared (the
 *     caller passes the same fds twice); kicks only when RING_PUSH_REQUESTS_AND_CHECK_
 *     NOTIFY says so, and responses are taken until a final check finds none.
 *
 * Protocol on stdio: after ring set-up (with --socket: once the nic is connected) print
 * "ready"; wait for one line on stdin (sent once the backend is connected) and start; run
 * until a line "stop" or end of input (with --socket, a line "stats" meanwhile is answered
 * with one line of JSON, {"daemon": {the nic's counters}}, from GET_STATS); print one
 * line of JSON (frames, bytes,
 * GSO frames, slots, errors, kicks, this program's CPU seconds; with --socket also the
 * daemon's counters for the nic and how many grants were still in use once it was
 * closed). Exit status 0, or 1 when a response was an error or malformed, a grant was
 * still in use after its response (or after the close), a ring's producer index made no
 * sense, or a control request failed; 2 for bad arguments.
 */
#include "frontend_common.h"

#include "backendd-client.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <xen/io/netif.h>
#include <xen/io/protocols.h>

#define TX_RING 256u                  /* __CONST_RING_SIZE(netif_tx, 4096) */
#define RX_RING 256u                  /* __CONST_RING_SIZE(netif_rx, 4096) */
#define MAX_FRAME_PAGES 17u           /* a 64 KiB GSO frame plus its Ethernet header */
#define MAX_FRAME 65535u              /* the first tx slot's size is 16 bits */
#define TX_BATCH 64                   /* frames read from the tap per wakeup */

/* virtio_net_hdr, 10 bytes (the tap is set to this size; no num_buffers). */
struct vnet_hdr {
    uint8_t flags;
    uint8_t gso_type;
    uint16_t hdr_len;
    uint16_t gso_size;
    uint16_t csum_start;
    uint16_t csum_offset;
} __attribute__((packed));
#define VNET_F_NEEDS_CSUM 1
#define VNET_F_DATA_VALID 2
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define VNET_GSO_TCPV6 4
#define VNET_GSO_ECN 0x80

union tx_entry {
    netif_tx_request_t req;
    netif_extra_info_t extra;
};
union rx_entry {
    netif_rx_response_t rsp;
    netif_extra_info_t extra;
};

struct queue {
    int index;
    int tap_fd, tx_kick, tx_call, rx_kick, rx_call;
    uint32_t tx_ring_frame, rx_ring_frame;
    netif_tx_front_ring_t tx;
    netif_rx_front_ring_t rx;
    /* tx pages: page i has grant ref tx_gref0 + i and is request id i while in flight */
    uint32_t tx_frame0, rx_frame0;
    grant_ref_t tx_gref0, rx_gref0;
    uint16_t tx_free[TX_RING];
    unsigned ntx_free;
    bool tx_busy[TX_RING];
    /* rx buffers: the one posted at ring index i is page (i % RX_RING), gref likewise */
    uint64_t tx_frames, tx_bytes, tx_gso, tx_slots, tx_errors, tx_too_big;
    uint64_t rx_frames, rx_bytes, rx_gso, rx_slots, rx_errors, rx_tap_drops, rx_unparsed;
    uint64_t refused, bad_responses, kicks, wakeups;
    bool corrupt;
    char failure[FAILURE_LEN];
};

const char program_name[] = "netfront_load";

static struct {
    unsigned nqueues;
    int stop_fd;
    struct queue q[MAX_QUEUES];
} cfg;

/* --socket: the control plane done here, through the client library. */
static struct {
    const char *socket;
    struct bkd_kv nic;         /* ADD_DEVICE's config */
    uint32_t devid;
    bool split;
    unsigned ntaps, nchannels;
    int tap[MAX_QUEUES];
    struct bkd_channel ch[2 * MAX_QUEUES];
    struct bkd_kv stats;       /* GET_STATS after the run */
    uint64_t held_after_close;
} ctl = { .split = true };

#define fail(q, ...) note_failure((q)->failure, __VA_ARGS__)

/* Revoke unless the backend still has the page mapped: counted and reported then. */
static bool end_access(struct queue *q, grant_ref_t gref)
{
    if (end_grant(gref))
        return true;
    q->refused++;
    fail(q, "grant %u still in use after its response", (unsigned)gref);
    return false;
}

static void kick(struct queue *q, int fd)
{
    if (!eventfd_kick(fd))
        fail(q, "kick eventfd write failed: %s", strerror(errno));
    q->kicks++;
}

/* --- tx: guest tap -> ring ------------------------------------------------------------ */

static void tx_responses(struct queue *q)
{
    int more;
    do {
        RING_IDX prod = q->tx.sring->rsp_prod;
        rmb(); /* the responses up to prod are visible once prod is */
        if (RING_RSP_PROD_BEYOND_REQUESTS(&q->tx, prod)) {
            fail(q, "tx rsp_prod %u is beyond the requests made (%u)", prod,
                 q->tx.req_prod_pvt);
            q->corrupt = true;
            return;
        }
        for (; q->tx.rsp_cons != prod; q->tx.rsp_cons++) {
            netif_tx_response_t rsp;
            memcpy(&rsp, RING_GET_RESPONSE(&q->tx, q->tx.rsp_cons), sizeof(rsp));
            if (rsp.status == NETIF_RSP_NULL) /* an extra-info slot's */
                continue;
            if (rsp.id >= TX_RING || !q->tx_busy[rsp.id]) {
                q->bad_responses++;
                fail(q, "tx response with id %u, which no request in flight has",
                     (unsigned)rsp.id);
                continue;
            }
            if (rsp.status != NETIF_RSP_OKAY) {
                q->tx_errors++;
                fail(q, "tx request %u answered status %d", (unsigned)rsp.id,
                     (int)rsp.status);
            }
            q->tx_busy[rsp.id] = false;
            if (end_access(q, q->tx_gref0 + rsp.id))
                q->tx_free[q->ntx_free++] = rsp.id;
        }
        RING_FINAL_CHECK_FOR_RESPONSES(&q->tx, more);
    } while (more);
}

static bool tx_room(struct queue *q)
{
    return q->ntx_free >= MAX_FRAME_PAGES && RING_FREE_REQUESTS(&q->tx) >= MAX_FRAME_PAGES + 1;
}

static void put_tx(struct queue *q, netif_tx_request_t *req)
{
    memcpy(RING_GET_REQUEST(&q->tx, q->tx.req_prod_pvt), req, sizeof(*req));
    q->tx.req_prod_pvt++;
    q->tx_slots++;
}

/* Reads up to TX_BATCH frames from the tap into granted pages; returns whether the tap
 * may have more (stopped for lack of room, not for an empty tap). */
static bool tap_to_tx(struct queue *q)
{
    for (int n = 0; n < TX_BATCH; n++) {
        if (!tx_room(q))
            return true;
        struct vnet_hdr hdr;
        struct iovec iov[1 + MAX_FRAME_PAGES];
        uint16_t pages[MAX_FRAME_PAGES];
        iov[0] = (struct iovec){ &hdr, sizeof(hdr) };
        for (unsigned i = 0; i < MAX_FRAME_PAGES; i++) {
            pages[i] = q->tx_free[q->ntx_free - 1 - i];
            iov[1 + i] = (struct iovec){ frame_addr(q->tx_frame0 + pages[i]), PAGE };
        }
        ssize_t got = readv(q->tap_fd, iov, 1 + MAX_FRAME_PAGES);
        if (got < 0) {
            if (errno != EAGAIN && errno != EINTR)
                fail(q, "guest tap read failed: %s", strerror(errno));
            return false;
        }
        if (got <= (ssize_t)sizeof(hdr))
            continue;
        size_t len = (size_t)got - sizeof(hdr);
        if (len > MAX_FRAME) {
            q->tx_too_big++; /* the guest tap's gso_max_size keeps this from happening */
            continue;
        }
        unsigned npages = (unsigned)((len + PAGE - 1) / PAGE);
        q->ntx_free -= npages;

        uint16_t csum = 0;
        if (hdr.flags & VNET_F_NEEDS_CSUM)
            csum = NETTXF_csum_blank | NETTXF_data_validated;
        else if (hdr.flags & VNET_F_DATA_VALID)
            csum = NETTXF_data_validated;
        uint8_t gso = XEN_NETIF_GSO_TYPE_NONE;
        if ((hdr.gso_type & ~VNET_GSO_ECN) == VNET_GSO_TCPV4)
            gso = XEN_NETIF_GSO_TYPE_TCPV4;
        else if ((hdr.gso_type & ~VNET_GSO_ECN) == VNET_GSO_TCPV6)
            gso = XEN_NETIF_GSO_TYPE_TCPV6;

        size_t left = len;
        for (unsigned i = 0; i < npages; i++) {
            size_t chunk = left < PAGE ? left : PAGE;
            grant_access(q->tx_gref0 + pages[i], q->tx_frame0 + pages[i], true);
            q->tx_busy[pages[i]] = true;
            netif_tx_request_t req = {
                .gref = q->tx_gref0 + pages[i],
                .offset = 0,
                .flags = (uint16_t)((i == 0 ? csum : 0) | (i + 1 < npages ? NETTXF_more_data : 0) |
                                    (i == 0 && gso ? NETTXF_extra_info : 0)),
                .id = pages[i],
                .size = (uint16_t)(i == 0 ? len : chunk),
            };
            put_tx(q, &req);
            if (i == 0 && gso) {
                union tx_entry e;
                memset(&e, 0, sizeof(e));
                e.extra.type = XEN_NETIF_EXTRA_TYPE_GSO;
                e.extra.u.gso.size = hdr.gso_size;
                e.extra.u.gso.type = gso;
                put_tx(q, &e.req);
            }
            left -= chunk;
        }
        q->tx_frames++;
        q->tx_bytes += len;
        q->tx_gso += gso != XEN_NETIF_GSO_TYPE_NONE;
    }
    return true;
}

static void push_tx(struct queue *q)
{
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->tx, notify);
    if (notify)
        kick(q, q->tx_kick);
}

/* --- rx: ring -> guest tap ------------------------------------------------------------ */

static void post_rx(struct queue *q)
{
    while (RING_FREE_REQUESTS(&q->rx)) {
        RING_IDX i = q->rx.req_prod_pvt;
        unsigned slot = i % RX_RING;
        grant_access(q->rx_gref0 + slot, q->rx_frame0 + slot, false);
        netif_rx_request_t req = { .id = (uint16_t)slot, .gref = q->rx_gref0 + slot };
        memcpy(RING_GET_REQUEST(&q->rx, i), &req, sizeof(req));
        q->rx.req_prod_pvt++;
    }
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->rx, notify);
    if (notify)
        kick(q, q->rx_kick);
}

/* csum_start/csum_offset and the header length of a checksum-partial frame, as
 * netfront's skb_checksum_setup finds them. */
static bool l4_offsets(const uint8_t *f, size_t len, uint16_t *start, uint16_t *off,
                       uint16_t *end)
{
    if (len < 14)
        return false;
    size_t l3 = 14;
    unsigned type = (unsigned)f[12] << 8 | f[13];
    unsigned proto;
    size_t l4;
    if (type == 0x0800) {
        if (len < l3 + 20)
            return false;
        l4 = l3 + (size_t)(f[l3] & 15) * 4;
        proto = f[l3 + 9];
    } else if (type == 0x86DD) {
        if (len < l3 + 40)
            return false;
        l4 = l3 + 40;
        proto = f[l3 + 6];
    } else {
        return false;
    }
    if (proto == 6) {
        if (len < l4 + 20)
            return false;
        *off = 16;
        *end = (uint16_t)(l4 + (size_t)(f[l4 + 12] >> 4) * 4);
    } else if (proto == 17) {
        if (len < l4 + 8)
            return false;
        *off = 6;
        *end = (uint16_t)(l4 + 8);
    } else {
        return false;
    }
    *start = (uint16_t)l4;
    return true;
}

/* The number of slots the frame at rsp_cons spans, 0 while not all of it is published. */
static unsigned frame_slots(struct queue *q, RING_IDX prod)
{
    /* The chain follows the flags whatever the status (an error slot keeps them). */
    RING_IDX i = q->rx.rsp_cons;
    if (i == prod)
        return 0;
    uint16_t flags = RING_GET_RESPONSE(&q->rx, i)->flags;
    i++;
    if (flags & NETRXF_extra_info) {
        for (;;) {
            if (i == prod)
                return 0;
            const netif_extra_info_t *e = (const void *)RING_GET_RESPONSE(&q->rx, i++);
            if (!(e->flags & XEN_NETIF_EXTRA_FLAG_MORE))
                break;
        }
    }
    while (flags & NETRXF_more_data) {
        if (i == prod)
            return 0;
        flags = RING_GET_RESPONSE(&q->rx, i++)->flags;
    }
    return i - q->rx.rsp_cons;
}

static void deliver(struct queue *q, unsigned nslots)
{
    struct iovec iov[1 + RX_RING];
    struct vnet_hdr hdr;
    memset(&hdr, 0, sizeof(hdr));
    unsigned niov = 1;
    size_t len = 0;
    bool error = false, bad = false;
    uint16_t first_flags = 0, gso_size = 0;
    uint8_t gso = XEN_NETIF_GSO_TYPE_NONE;
    bool extras = false;
    for (unsigned k = 0; k < nslots; k++) {
        RING_IDX i = q->rx.rsp_cons + k;
        unsigned slot = i % RX_RING;
        union rx_entry e;
        memcpy(&e, RING_GET_RESPONSE(&q->rx, i), sizeof(e));
        /* Every buffer, the extra-info slot's too, was mapped by the backend and must be
         * released by now. */
        end_access(q, q->rx_gref0 + slot);
        q->rx_slots++;
        if (k == 0) {
            first_flags = e.rsp.flags;
            extras = first_flags & NETRXF_extra_info;
        } else if (extras) { /* netif_extra_info slots follow the first data slot */
            extras = e.extra.flags & XEN_NETIF_EXTRA_FLAG_MORE;
            if (e.extra.type == XEN_NETIF_EXTRA_TYPE_GSO) {
                gso = e.extra.u.gso.type;
                gso_size = e.extra.u.gso.size;
            }
            continue;
        }
        if (e.rsp.id != slot) {
            bad = true;
            q->bad_responses++;
            fail(q, "rx response id %u at ring index %u", (unsigned)e.rsp.id, (unsigned)i);
            continue;
        }
        if (e.rsp.status < 0) {
            error = true;
            continue;
        }
        if ((size_t)e.rsp.offset + (size_t)e.rsp.status > PAGE) {
            bad = true;
            q->bad_responses++;
            fail(q, "rx response offset %u + size %d is beyond its page",
                 (unsigned)e.rsp.offset, (int)e.rsp.status);
            continue;
        }
        iov[niov++] = (struct iovec){ frame_addr(q->rx_frame0 + slot) + e.rsp.offset,
                                      (size_t)e.rsp.status };
        len += (size_t)e.rsp.status;
    }
    q->rx.rsp_cons += nslots;
    if (error) {
        q->rx_errors++;
        fail(q, "rx frame answered with an error status");
        return;
    }
    if (bad || niov == 1)
        return;
    if (first_flags & NETRXF_csum_blank) {
        uint16_t start, off, end;
        if (!l4_offsets(iov[1].iov_base, iov[1].iov_len, &start, &off, &end)) {
            q->rx_unparsed++;
            return;
        }
        hdr.flags = VNET_F_NEEDS_CSUM;
        hdr.csum_start = start;
        hdr.csum_offset = off;
        if (gso == XEN_NETIF_GSO_TYPE_TCPV4 || gso == XEN_NETIF_GSO_TYPE_TCPV6) {
            hdr.gso_type = gso == XEN_NETIF_GSO_TYPE_TCPV4 ? VNET_GSO_TCPV4 : VNET_GSO_TCPV6;
            hdr.gso_size = gso_size;
            hdr.hdr_len = end;
        }
    } else if (first_flags & NETRXF_data_validated) {
        hdr.flags = VNET_F_DATA_VALID;
    }
    iov[0] = (struct iovec){ &hdr, sizeof(hdr) };
    if (writev(q->tap_fd, iov, (int)niov) < 0) {
        q->rx_tap_drops++;
        return;
    }
    q->rx_frames++;
    q->rx_bytes += len;
    q->rx_gso += hdr.gso_type != VNET_GSO_NONE;
}

static void rx_responses(struct queue *q)
{
    for (;;) {
        RING_IDX prod = q->rx.sring->rsp_prod;
        rmb();
        if (RING_RSP_PROD_BEYOND_REQUESTS(&q->rx, prod)) {
            fail(q, "rx rsp_prod %u is beyond the buffers posted (%u)", prod,
                 q->rx.req_prod_pvt);
            q->corrupt = true;
            return;
        }
        unsigned n;
        while ((n = frame_slots(q, prod)))
            deliver(q, n);
        post_rx(q);
        if (q->rx.rsp_cons == prod) {
            int more;
            RING_FINAL_CHECK_FOR_RESPONSES(&q->rx, more);
            if (!more)
                return;
        } else {
            /* Part of a frame is published: wake when anything more is. */
            q->rx.sring->rsp_event = prod + 1;
            mb();
            if (q->rx.sring->rsp_prod == prod)
                return;
        }
    }
}

/* --- one queue ----------------------------------------------------------------------- */

static void drain(struct queue *q, int fd)
{
    if (!eventfd_drain(fd))
        fail(q, "call eventfd read failed: %s", strerror(errno));
}

static void *queue_main(void *arg)
{
    struct queue *q = arg;
    post_rx(q);
    bool tap_more = true;
    while (!q->corrupt) {
        tx_responses(q);
        if (q->corrupt)
            break;
        rx_responses(q);
        if (q->corrupt)
            break;
        if (tap_more || tx_room(q)) {
            tap_more = tap_to_tx(q) && tx_room(q);
            push_tx(q);
        }
        if (tap_more)
            continue; /* more frames waiting: go round without sleeping */
        struct pollfd pfd[4] = {
            { .fd = cfg.stop_fd, .events = POLLIN },
            { .fd = q->tx_call, .events = POLLIN },
            { .fd = q->rx_call, .events = POLLIN },
            { .fd = q->tap_fd, .events = tx_room(q) ? POLLIN : 0 },
        };
        if (poll(pfd, 4, -1) < 0 && errno != EINTR) {
            fail(q, "poll failed: %s", strerror(errno));
            break;
        }
        q->wakeups++;
        if (pfd[0].revents)
            break;
        if (pfd[1].revents)
            drain(q, q->tx_call);
        if (pfd[2].revents && q->rx_call != q->tx_call)
            drain(q, q->rx_call);
        tap_more = pfd[3].revents & POLLIN;
    }
    return NULL;
}

/* --- set-up ------------------------------------------------------------------------- */

static const char usage[] =
    "usage: netfront_load --ram FD:SIZE --gnttab FD:FRAMES --grefs FIRST:COUNT\n"
    "         --frames FIRST:COUNT [--domid N]\n"
    "         --queue TXRING:RXRING:TXKICK:TXCALL:RXKICK:RXCALL:TAPFD [--queue ...]\n"
    "   or: netfront_load --socket PATH --nic KEY=VALUE [--nic ...] --tap FD [--tap FD ...]\n"
    "         [--split 0|1] [--devid N]";

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *opt = argv[i];
        if (i + 1 >= argc)
            die_usage(usage);
        const char *v = argv[++i];
        if (parse_guest_option(opt, v))
            continue;
        if (!strcmp(opt, "--queue")) {
            unsigned long long txr, rxr;
            int fds[5], n = 0;
            if (cfg.nqueues == MAX_QUEUES)
                die_usage("too many queues");
            if (sscanf(v, "%llu:%llu:%d:%d:%d:%d:%d%n", &txr, &rxr, &fds[0], &fds[1], &fds[2],
                       &fds[3], &fds[4], &n) != 7 || v[n])
                die_usage("--queue TXRING:RXRING:TXKICK:TXCALL:RXKICK:RXCALL:TAPFD");
            struct queue *q = &cfg.q[cfg.nqueues];
            q->index = (int)cfg.nqueues++;
            q->tx_ring_frame = (uint32_t)txr;
            q->rx_ring_frame = (uint32_t)rxr;
            q->tx_kick = fds[0];
            q->tx_call = fds[1];
            q->rx_kick = fds[2];
            q->rx_call = fds[3];
            q->tap_fd = fds[4];
        } else if (!strcmp(opt, "--socket")) {
            ctl.socket = v;
        } else if (!strcmp(opt, "--nic")) {
            parse_kv_option(&ctl.nic, opt, v);
        } else if (!strcmp(opt, "--tap")) {
            if (ctl.ntaps == MAX_QUEUES)
                die_usage("too many queues");
            ctl.tap[ctl.ntaps++] = (int)parse_u64(v, "--tap");
        } else if (!strcmp(opt, "--split")) {
            ctl.split = parse_u64(v, "--split") != 0;
        } else if (!strcmp(opt, "--devid")) {
            ctl.devid = (uint32_t)parse_u64(v, "--devid");
        } else {
            die_usage(usage);
        }
    }
    if (ctl.socket) {
        if (guest.ram_fd >= 0 || guest.gnttab_fd >= 0 || cfg.nqueues || guest.gref_count ||
            guest.frame_count)
            die_usage("--socket: the program sets up the guest and the rings");
        if (!ctl.ntaps)
            die_usage("--socket needs a --tap FD per queue");
        cfg.nqueues = ctl.ntaps;
        return;
    }
    if (guest.ram_fd < 0 || guest.gnttab_fd < 0 || !cfg.nqueues)
        die_usage(usage);
    uint64_t need = (uint64_t)cfg.nqueues * (TX_RING + RX_RING);
    if (guest.gref_count < need || guest.frame_count < need)
        die_usage("--grefs and --frames need 512 per queue");
    map_guest();
}

static void setup_queue(struct queue *q)
{
    uint32_t base = (uint32_t)q->index * (TX_RING + RX_RING);
    q->tx_frame0 = guest.frame_first + base;
    q->rx_frame0 = q->tx_frame0 + TX_RING;
    q->tx_gref0 = guest.gref_first + base;
    q->rx_gref0 = q->tx_gref0 + TX_RING;
    for (unsigned r = 0; r < 2; r++) {
        uint32_t frame = r ? q->rx_ring_frame : q->tx_ring_frame;
        if (((uint64_t)frame + 1) * PAGE > guest.ram_size)
            die_usage("--queue: ring beyond guest RAM");
    }
    netif_tx_sring_t *txs = (netif_tx_sring_t *)frame_addr(q->tx_ring_frame);
    netif_rx_sring_t *rxs = (netif_rx_sring_t *)frame_addr(q->rx_ring_frame);
    SHARED_RING_INIT(txs); /* before the backend is told where the rings are */
    SHARED_RING_INIT(rxs);
    FRONT_RING_INIT(&q->tx, txs, PAGE);
    FRONT_RING_INIT(&q->rx, rxs, PAGE);
    if (RING_SIZE(&q->tx) != TX_RING || RING_SIZE(&q->rx) != RX_RING)
        die_usage("unexpected netif ring size");
    for (unsigned i = 0; i < TX_RING; i++)
        q->tx_free[q->ntx_free++] = (uint16_t)(TX_RING - 1 - i);
}

/* --- --socket: the control plane through clients/c ----------------------------------- */

/* Guest RAM holds queue q's tx and rx rings at frames 2q and 2q+1, then the data pages
 * (TX_RING + RX_RING per queue); the grant table has the rings' refs from FIRST_GREF on,
 * then the data pages' refs. Both memfds are handed to the daemon, then mapped here;
 * then ADD_DEVICE with the --nic config, and an eventfd pair per event channel. */
static void control_attach(void)
{
    uint32_t ring_pages = 2 * cfg.nqueues;
    uint32_t data_pages = cfg.nqueues * (TX_RING + RX_RING);
    control_open(ctl.socket, ring_pages, data_pages);

    if (!bkd_kv_get(&ctl.nic, "queues"))
        kv_setf(&ctl.nic, "queues", cfg.nqueues);
    uint32_t state;
    struct bkd_kv keys = {0};
    ctl_check(bkd_add_device(control, ctl.devid, BKD_DEV_NET, &ctl.nic, &state, &keys),
              "ADD_DEVICE");
    uint64_t v;
    if (ctl.split && (bkd_kv_get_u64(&keys, "feature-split-event-channels", &v) || v != 1)) {
        fprintf(stderr, "netfront_load: the daemon does not offer split event channels\n");
        exit(1);
    }
    if (bkd_kv_get_u64(&keys, "multi-queue-max-queues", &v))
        v = 1;
    if (v < cfg.nqueues) {
        fprintf(stderr, "netfront_load: the daemon offers fewer than %u queues\n",
                cfg.nqueues);
        exit(1);
    }
    bkd_kv_free(&keys);
    for (unsigned i = 0; i < cfg.nqueues; i++) {
        struct queue *q = &cfg.q[i];
        q->index = (int)i;
        q->tx_ring_frame = 2 * i;
        q->rx_ring_frame = 2 * i + 1;
        q->tap_fd = ctl.tap[i];
        struct bkd_channel *tx = &ctl.ch[ctl.nchannels], *rx = tx;
        ctl_check(bkd_channel_open(tx, FIRST_PORT + ctl.nchannels, EFD_NONBLOCK), "eventfd");
        ctl.nchannels++;
        if (ctl.split) {
            rx = &ctl.ch[ctl.nchannels];
            ctl_check(bkd_channel_open(rx, FIRST_PORT + ctl.nchannels, EFD_NONBLOCK),
                      "eventfd");
            ctl.nchannels++;
        }
        q->tx_kick = tx->kick_fd;
        q->tx_call = tx->call_fd;
        q->rx_kick = rx->kick_fd;
        q->rx_call = rx->call_fd;
    }
}

/* Once the rings are initialised: grant their pages, FRONTEND_STATE Connected with the
 * ring refs, the channels and the features Linux's netfront asks for. */
static void control_connect(void)
{
    struct bkd_kv fkeys = {0};
    static const char *const features[] = {
        "request-rx-copy", "feature-rx-notify", "feature-sg", "feature-gso-tcpv4",
        "feature-gso-tcpv6", "feature-ipv6-csum-offload"};
    for (size_t i = 0; i < sizeof(features) / sizeof(features[0]); i++)
        ctl_check(bkd_kv_set(&fkeys, features[i], "1"), "key/value map");
    if (cfg.nqueues > 1)
        kv_setf(&fkeys, "multi-queue-num-queues", cfg.nqueues);
    for (unsigned i = 0; i < cfg.nqueues; i++) {
        char prefix[24] = "", key[64];
        if (cfg.nqueues > 1)
            snprintf(prefix, sizeof(prefix), "queue-%u/", i);
        grant_ref_t tx_gref = FIRST_GREF + 2 * i, rx_gref = tx_gref + 1;
        grant_access(tx_gref, cfg.q[i].tx_ring_frame, false);
        grant_access(rx_gref, cfg.q[i].rx_ring_frame, false);
        snprintf(key, sizeof(key), "%stx-ring-ref", prefix);
        kv_setf(&fkeys, key, tx_gref);
        snprintf(key, sizeof(key), "%srx-ring-ref", prefix);
        kv_setf(&fkeys, key, rx_gref);
        if (ctl.split) {
            snprintf(key, sizeof(key), "%sevent-channel-tx", prefix);
            kv_setf(&fkeys, key, ctl.ch[2 * i].port);
            snprintf(key, sizeof(key), "%sevent-channel-rx", prefix);
            kv_setf(&fkeys, key, ctl.ch[2 * i + 1].port);
        } else {
            snprintf(key, sizeof(key), "%sevent-channel", prefix);
            kv_setf(&fkeys, key, ctl.ch[i].port);
        }
    }
    uint32_t state;
    ctl_check(bkd_frontend_state(control, ctl.devid, BKD_XB_CONNECTED, &fkeys, ctl.ch,
                                 ctl.nchannels, &state, NULL),
              "FRONTEND_STATE Connected");
    bkd_kv_free(&fkeys);
    if (state != BKD_XB_CONNECTED) {
        fprintf(stderr, "netfront_load: the backend did not connect (state %u)\n", state);
        exit(1);
    }
}

/* After the run: the daemon's counters (GET_STATS); close the device, which must then
 * hold none of this guest's grants (GTF_reading/GTF_writing clear on every entry);
 * remove it and disconnect. */
static void control_detach(void)
{
    ctl_check(bkd_get_stats(control, ctl.devid, &ctl.stats), "GET_STATS");
    ctl.held_after_close = control_close(ctl.devid, ctl.ch, ctl.nchannels);
    bkd_kv_free(&ctl.nic);
}

static void print_json_string(const char *s);

/* "stats" on stdin during the run (--socket): one JSON line {"daemon": {counters}}. */
static void print_daemon_counters(const struct bkd_kv *kv)
{
    printf("{");
    for (size_t i = 0; i < kv->count; i++) {
        printf("%s", i ? ", " : "");
        print_json_string(kv->pairs[i].key);
        printf(": ");
        print_json_string(kv->pairs[i].value);
    }
    printf("}");
}

static void stats_line(void)
{
    struct bkd_kv kv = {0};
    ctl_check(bkd_get_stats(control, ctl.devid, &kv), "GET_STATS");
    printf("{\"daemon\": ");
    print_daemon_counters(&kv);
    printf("}\n");
    fflush(stdout);
    bkd_kv_free(&kv);
}

/* A JSON string of `s` on stdout. */
static void print_json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    if (ctl.socket)
        control_attach();
    for (unsigned i = 0; i < cfg.nqueues; i++)
        setup_queue(&cfg.q[i]);
    cfg.stop_fd = eventfd(0, EFD_CLOEXEC);
    if (cfg.stop_fd < 0) {
        perror("netfront_load: eventfd");
        return 1;
    }
    if (ctl.socket)
        control_connect();
    if (!ready_then_wait_for_go())
        return 2;

    struct rusage ru0;
    getrusage(RUSAGE_SELF, &ru0);
    pthread_t threads[MAX_QUEUES];
    for (unsigned i = 0; i < cfg.nqueues; i++)
        if (pthread_create(&threads[i], NULL, queue_main, &cfg.q[i]))
            die_usage("pthread_create failed");
    char line[16];
    while (fgets(line, sizeof(line), stdin) && strncmp(line, "stop", 4))
        if (ctl.socket && !strncmp(line, "stats", 5))
            stats_line();
    if (!eventfd_kick(cfg.stop_fd))
        perror("netfront_load: stop eventfd");
    for (unsigned i = 0; i < cfg.nqueues; i++)
        pthread_join(threads[i], NULL);
    double cpu = cpu_seconds_since(&ru0);

    struct queue t;
    memset(&t, 0, sizeof(t));
    const char *failure = "";
    for (unsigned i = 0; i < cfg.nqueues; i++) {
        struct queue *q = &cfg.q[i];
#define ADD(f) t.f += q->f
        ADD(tx_frames); ADD(tx_bytes); ADD(tx_gso); ADD(tx_slots); ADD(tx_errors);
        ADD(tx_too_big); ADD(rx_frames); ADD(rx_bytes); ADD(rx_gso); ADD(rx_slots);
        ADD(rx_errors); ADD(rx_tap_drops); ADD(rx_unparsed); ADD(refused);
        ADD(bad_responses); ADD(kicks); ADD(wakeups);
#undef ADD
        if (!failure[0] && q->failure[0])
            failure = q->failure;
    }
    char held_why[FAILURE_LEN];
    if (ctl.socket) {
        control_detach();
        if (ctl.held_after_close && !failure[0]) {
            snprintf(held_why, sizeof(held_why), "%" PRIu64 " grants still in use after "
                     "the device was closed", ctl.held_after_close);
            failure = held_why;
        }
    }
    printf("{\"queues\": %u, \"cpu_seconds\": %.6f, "
           "\"tx_frames\": %" PRIu64 ", \"tx_bytes\": %" PRIu64 ", \"tx_gso\": %" PRIu64 ", "
           "\"tx_slots\": %" PRIu64 ", \"tx_errors\": %" PRIu64 ", \"tx_too_big\": %" PRIu64 ", "
           "\"rx_frames\": %" PRIu64 ", \"rx_bytes\": %" PRIu64 ", \"rx_gso\": %" PRIu64 ", "
           "\"rx_slots\": %" PRIu64 ", \"rx_errors\": %" PRIu64 ", "
           "\"rx_tap_drops\": %" PRIu64 ", \"rx_unparsed\": %" PRIu64 ", "
           "\"refused_end_access\": %" PRIu64 ", \"bad_responses\": %" PRIu64 ", "
           "\"kicks\": %" PRIu64 ", \"wakeups\": %" PRIu64 ", \"failure\": \"%s\", "
           "\"frames_per_queue\": [",
           cfg.nqueues, cpu, t.tx_frames, t.tx_bytes, t.tx_gso, t.tx_slots, t.tx_errors,
           t.tx_too_big, t.rx_frames, t.rx_bytes, t.rx_gso, t.rx_slots, t.rx_errors,
           t.rx_tap_drops, t.rx_unparsed, t.refused, t.bad_responses, t.kicks, t.wakeups,
           failure);
    for (unsigned i = 0; i < cfg.nqueues; i++)
        printf("%s%" PRIu64, i ? ", " : "", cfg.q[i].tx_frames + cfg.q[i].rx_frames);
    printf("], \"held_after_close\": %" PRIu64 ", \"daemon\": ", ctl.held_after_close);
    print_daemon_counters(&ctl.stats);
    printf("}\n");
    fflush(stdout);
    bkd_kv_free(&ctl.stats);
    for (unsigned i = 0; ctl.socket && i < cfg.nqueues; i++)
        close(cfg.q[i].tap_fd);
    bool ok = !t.tx_errors && !t.rx_errors && !t.refused && !t.bad_responses &&
              !ctl.held_after_close && !failure[0];
    return ok ? 0 : 1;
}
