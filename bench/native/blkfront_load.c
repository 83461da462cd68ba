/* A blkfront load generator: the guest's half of blkif rings, in C, so that a benchmark
 * measures the backend and not the frontend.
 *
 * The control plane (guest memory and grant table handed to the daemon, ADD_DEVICE, ring
 * pages allocated and granted, FRONTEND_STATE with the ring refs and event channels) is
 * done either by the caller (bench/blkload.py), or here, with --socket, through the C
 * client library (clients/c/backendd-client.h), as a C VMM would. In the first mode this
 * program inherits the guest RAM and grant-table memfds and each queue's kick/call
 * eventfds; in the second it makes them itself (sealed memfds, eventfd pairs), hands
 * them over with ADD_MEM_REGION, SET_GRANT_TABLE and ADD_DEVICE (the disk's config from
 * --disk KEY=VALUE, SET_INFLIGHT with --inflight), connects the device with
 * FRONTEND_STATE Connected, and closes and removes it after the run. Either way it maps
 * the memfds, initialises the rings (SHARED_RING_INIT, FRONT_RING_INIT) and drives them
 * with ring.h's macros, one thread per queue:
 *
 *   - requests are built in a private copy and put with RING_GET_REQUEST, pushed with
 *     RING_PUSH_REQUESTS_AND_CHECK_NOTIFY (kick only when it says so); responses are
 *     taken until RING_FINAL_CHECK_FOR_RESPONSES finds none, then it sleeps in poll() on
 *     the call eventfd;
 *   - v1 grants are written here, per request, as Linux's grant-table driver does: frame
 *     and domid, a write barrier, then the flags (permit_access, plus readonly when the
 *     backend only reads the page); after the response each grant is ended with a
 *     compare-and-swap that refuses while GTF_reading/GTF_writing is set (the backend
 *     must have released the page before answering);
 *   - with --persistent 1 (feature-persistent), as Linux blkfront: a pool of pages
 *     granted once, reused LIFO, data copied in before a write and out after a read;
 *   - more than 11 pages per request go as BLKIF_OP_INDIRECT with segment pages.
 *
 * Protocol on stdio: after mapping, ring set-up and granting, print "ready"; wait for one
 * line on stdin (sent once the backend is connected); run; print one line of JSON (I/Os,
 * bytes, seconds, this program's own CPU seconds, latency percentiles, counters). With
 * --socket there is no "ready"/go: it runs as soon as the device is connected (with
 * --markers it says "ready" once the device is connected and waits for a line, and after
 * the run says "done" and waits for another before it closes the device, so that the
 * caller can measure the daemon's CPU time over the run alone), and the JSON also gives
 * the disk's sectors, whether the backend offered feature-persistent and how many grants
 * were still in use once the device was closed. Exit status 0, or 1 when
 * any request failed, a response was malformed, a grant was still in use after its
 * response (or after the close), a verified read did not match, the ring stalled, or a
 * control request failed; 2 for bad arguments.
 *
 * --log (with --socket): SET_LOG before the device is connected, so the daemon logs every
 * guest page it writes during the run; after it the log is taken (atomic exchange per
 * word) and the JSON gives "dirty_pages" and "dirty_gnttab_pages" (-1 without --log).
 *
 * --verify: per queue, write COUNT distinct blocks with a pattern, then read them back
 * and check every byte here. The pattern's 8-byte word at disk byte offset o is
 * o * 0x9E3779B97F4A7C15 ^ seed (little-endian), so the image can be checked outside.
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
#include <time.h>
#include <unistd.h>

#include <sys/eventfd.h>
#include <sys/mman.h>

#include <xen/io/blkif.h>
#include <xen/io/protocols.h>

#define SECTOR 512u
#define SEGS_PER_INDIRECT_PAGE (PAGE / sizeof(struct blkif_request_segment))
#define PATTERN_MUL 0x9E3779B97F4A7C15ull
#define STALL_MS 10000
#define MAX_SAMPLES (64u << 20)

struct grant {
    grant_ref_t gref;
    uint32_t frame;
};

struct slot {
    uint64_t id;             /* 0 when free */
    uint64_t sector;
    uint64_t submitted_ns;
    uint8_t op;
    struct grant *grants;    /* nsegs data pages, then nind indirect pages */
    uint8_t *buf;            /* the request's data (guest pages, or private with persistent) */
};

struct queue {
    int index;
    int kick_fd, call_fd;
    uint32_t ring_frame;
    unsigned ring_order;
    blkif_front_ring_t front;
    struct slot *slots;
    unsigned *free_slots, nfree_slots;
    unsigned *batch;               /* slots put in the ring since the last push */
    struct grant *pool;            /* persistent: granted pages, LIFO */
    unsigned npool;
    grant_ref_t *free_grefs;       /* non-persistent: grant refs not in use */
    unsigned nfree_grefs;
    uint32_t *lat;                 /* latency samples, ns */
    size_t nlat, cap_lat;
    uint64_t rng, cursor, gen;
    uint64_t ios, bytes, errors, bad_responses, refused, mismatches, kicks, waits;
    uint64_t end_ns;
    bool corrupt;                  /* the backend's rsp_prod made no sense: stop at once */
    char failure[FAILURE_LEN];
};

const char program_name[] = "blkfront_load";

static struct {
    uint64_t sectors;
    unsigned max_indirect, qd, bs, nsegs, nind, nqueues;
    bool write, random, persistent, verify;
    double seconds;
    uint64_t count, seed;
    uint16_t handle;
    uint64_t go_ns, deadline_ns;
    struct queue q[MAX_QUEUES];
} cfg = { .qd = 32, .bs = 4096, .random = true, .handle = 0 };

/* --socket: the control plane done here, through the client library. */
static struct {
    const char *socket;
    struct bkd_kv disk;        /* ADD_DEVICE's config */
    uint32_t devid;
    unsigned nqueues, order;
    bool inflight, want_persistent, offered_persistent, markers, log;
    struct bkd_channel ch[MAX_QUEUES];
    uint64_t held_after_close;
    uint8_t *log_map;          /* --log: the dirty log, mapped */
    uint64_t log_size, log_ram_pages, log_gnt_pages;
    int64_t dirty_pages, dirty_gnttab_pages;
} ctl = { .devid = 51712, .dirty_pages = -1, .dirty_gnttab_pages = -1 };

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* --- data pattern ------------------------------------------------------------------ */

static void pattern_fill(uint8_t *buf, uint64_t sector, unsigned len)
{
    uint64_t off = sector * SECTOR;
    for (unsigned i = 0; i < len; i += 8) {
        uint64_t v = (off + i) * PATTERN_MUL ^ cfg.seed;
        memcpy(buf + i, &v, 8);
    }
}

static bool pattern_check(const uint8_t *buf, uint64_t sector, unsigned len, char *why,
                          size_t whylen)
{
    uint64_t off = sector * SECTOR;
    for (unsigned i = 0; i < len; i += 8) {
        uint64_t v = (off + i) * PATTERN_MUL ^ cfg.seed, got;
        memcpy(&got, buf + i, 8);
        if (got != v) {
            snprintf(why, whylen, "read-back mismatch at byte %" PRIu64 ": %#" PRIx64
                     " instead of %#" PRIx64, off + i, got, v);
            return false;
        }
    }
    return true;
}

/* --- one queue ----------------------------------------------------------------------- */

/* Keeps the first failure's description for the report. */
#define fail(q, ...) note_failure((q)->failure, __VA_ARGS__)

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* Where request number i of this queue goes, in blocks of bs. Verified runs visit
 * distinct blocks (a permutation), each queue its own share. */
static uint64_t pick_block(struct queue *q, uint64_t i)
{
    uint64_t nblocks = cfg.sectors * SECTOR / cfg.bs;
    if (cfg.verify) {
        uint64_t n = i + (uint64_t)q->index * cfg.count;
        if (!cfg.random)
            return n % nblocks;
        uint64_t stride = nblocks / 2 + 1;
        while (gcd(stride, nblocks) != 1)
            stride++;
        return n * stride % nblocks;
    }
    if (cfg.random)
        return xorshift(&q->rng) % nblocks;
    uint64_t b = q->cursor;
    q->cursor = (q->cursor + 1) % nblocks;
    return b;
}

/* Builds the request for a free slot in a private copy, then puts it in the ring. */
static unsigned submit(struct queue *q, uint8_t op, uint64_t block)
{
    unsigned s = q->free_slots[--q->nfree_slots];
    struct slot *sl = &q->slots[s];
    sl->op = op;
    sl->sector = block * (cfg.bs / SECTOR);
    sl->id = (q->gen++ << 16) | s;
    if (cfg.verify && op == BLKIF_OP_WRITE)
        pattern_fill(sl->buf, sl->sector, cfg.bs);

    unsigned ngrants = cfg.nsegs + cfg.nind;
    if (cfg.persistent) {
        for (unsigned i = 0; i < ngrants; i++)
            sl->grants[i] = q->pool[--q->npool];
        if (op == BLKIF_OP_WRITE)
            for (unsigned i = 0; i < cfg.nsegs; i++)
                memcpy(frame_addr(sl->grants[i].frame), sl->buf + (size_t)i * PAGE, PAGE);
    } else {
        /* The backend writes pages it reads from disk into; it only reads pages written
         * to disk, and the segment lists. */
        for (unsigned i = 0; i < ngrants; i++) {
            sl->grants[i].gref = q->free_grefs[--q->nfree_grefs];
            grant_access(sl->grants[i].gref, sl->grants[i].frame,
                         i >= cfg.nsegs || op == BLKIF_OP_WRITE);
        }
    }

    union blkif_sring_entry copy;
    memset(&copy, 0, sizeof(copy));
    if (cfg.nind) {
        blkif_request_indirect_t *ind = (blkif_request_indirect_t *)&copy.req;
        for (unsigned p = 0; p < cfg.nind; p++) {
            struct blkif_request_segment *segs =
                (void *)frame_addr(sl->grants[cfg.nsegs + p].frame);
            unsigned first = p * SEGS_PER_INDIRECT_PAGE;
            for (unsigned i = first; i < cfg.nsegs && i < first + SEGS_PER_INDIRECT_PAGE; i++)
                segs[i - first] = (struct blkif_request_segment){
                    .gref = sl->grants[i].gref, .first_sect = 0, .last_sect = PAGE / SECTOR - 1};
            ind->indirect_grefs[p] = sl->grants[cfg.nsegs + p].gref;
        }
        ind->operation = BLKIF_OP_INDIRECT;
        ind->indirect_op = op;
        ind->nr_segments = (uint16_t)cfg.nsegs;
        ind->id = sl->id;
        ind->sector_number = sl->sector;
        ind->handle = cfg.handle;
    } else {
        blkif_request_t *req = &copy.req;
        req->operation = op;
        req->nr_segments = (uint8_t)cfg.nsegs;
        req->handle = cfg.handle;
        req->id = sl->id;
        req->sector_number = sl->sector;
        for (unsigned i = 0; i < cfg.nsegs; i++)
            req->seg[i] = (struct blkif_request_segment){
                .gref = sl->grants[i].gref, .first_sect = 0, .last_sect = PAGE / SECTOR - 1};
    }
    memcpy(RING_GET_REQUEST(&q->front, q->front.req_prod_pvt), &copy, sizeof(copy.req));
    q->front.req_prod_pvt++;
    return s;
}

static void complete(struct queue *q, const blkif_response_t *rsp, uint64_t t)
{
    uint64_t id = rsp->id;
    unsigned s = (unsigned)(id & 0xffff);
    if (id == 0 || s >= cfg.qd || q->slots[s].id != id) { /* a free slot's id is 0 */
        q->bad_responses++;
        fail(q, "response with an id no request in flight has: %#" PRIx64, id);
        return;
    }
    struct slot *sl = &q->slots[s];
    if (rsp->operation != sl->op) {
        q->bad_responses++;
        fail(q, "response operation %u for a request of operation %u",
             (unsigned)rsp->operation, (unsigned)sl->op);
    }
    if (rsp->status != BLKIF_RSP_OKAY) {
        q->errors++;
        fail(q, "request at sector %" PRIu64 " answered status %d", sl->sector,
             (int)rsp->status);
    }
    unsigned ngrants = cfg.nsegs + cfg.nind;
    if (cfg.persistent) {
        if (sl->op == BLKIF_OP_READ)
            for (unsigned i = 0; i < cfg.nsegs; i++)
                memcpy(sl->buf + (size_t)i * PAGE, frame_addr(sl->grants[i].frame), PAGE);
        for (unsigned i = ngrants; i-- > 0;)
            q->pool[q->npool++] = sl->grants[i];
    } else {
        for (unsigned i = 0; i < ngrants; i++) {
            if (!end_grant(sl->grants[i].gref)) {
                /* Still mapped by the backend after it answered: never reuse the page. */
                q->refused++;
                fail(q, "grant %u still in use after the response (sector %" PRIu64 ")",
                     (unsigned)sl->grants[i].gref, sl->sector);
                continue;
            }
            q->free_grefs[q->nfree_grefs++] = sl->grants[i].gref;
        }
    }
    if (cfg.verify && sl->op == BLKIF_OP_READ && rsp->status == BLKIF_RSP_OKAY) {
        char why[128];
        if (!pattern_check(sl->buf, sl->sector, cfg.bs, why, sizeof(why))) {
            q->mismatches++;
            if (!q->failure[0])
                snprintf(q->failure, sizeof(q->failure), "%s", why);
        }
    }
    uint64_t lat = t - sl->submitted_ns;
    if (q->nlat < q->cap_lat)
        q->lat[q->nlat++] = lat > UINT32_MAX ? UINT32_MAX : (uint32_t)lat;
    q->ios++;
    q->bytes += cfg.bs;
    sl->id = 0;
    q->free_slots[q->nfree_slots++] = s;
}

/* Takes every response there is, then arms rsp_event; returns how many were taken. */
static unsigned take_responses(struct queue *q)
{
    unsigned n = 0;
    int more;
    do {
        RING_IDX prod = q->front.sring->rsp_prod;
        rmb(); /* the responses up to prod are visible once prod is */
        if (RING_RSP_PROD_BEYOND_REQUESTS(&q->front, prod)) {
            fail(q, "rsp_prod %u is beyond the requests made (%u)", prod,
                 q->front.req_prod_pvt);
            q->corrupt = true;
            return n;
        }
        if (q->front.rsp_cons != prod) {
            uint64_t t = now_ns();
            for (; q->front.rsp_cons != prod; q->front.rsp_cons++, n++) {
                blkif_response_t rsp;
                memcpy(&rsp, RING_GET_RESPONSE(&q->front, q->front.rsp_cons), sizeof(rsp));
                complete(q, &rsp, t);
            }
        }
        RING_FINAL_CHECK_FOR_RESPONSES(&q->front, more);
    } while (more);
    return n;
}

/* Runs `total` requests of `op` (0: until the deadline), keeping qd in flight. After a
 * failure it issues nothing more but still collects what is in flight. */
static bool run_phase(struct queue *q, uint8_t op, uint64_t total)
{
    uint64_t issued = 0;
    for (;;) {
        bool more_to_issue = !q->failure[0] &&
                             (total ? issued < total : now_ns() < cfg.deadline_ns);
        unsigned added = 0;
        while (more_to_issue && q->nfree_slots && !RING_FULL(&q->front)) {
            q->batch[added++] = submit(q, op, pick_block(q, issued));
            issued++;
            if (total && issued >= total)
                more_to_issue = false;
        }
        if (added) {
            int notify;
            uint64_t t = now_ns();
            for (unsigned i = 0; i < added; i++)
                q->slots[q->batch[i]].submitted_ns = t;
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->front, notify);
            if (notify) {
                if (!eventfd_kick(q->kick_fd)) {
                    fail(q, "kick eventfd write failed: %s", strerror(errno));
                    return false;
                }
                q->kicks++;
            }
        }
        if (take_responses(q))
            continue;
        if (q->corrupt)
            return false;
        if (q->nfree_slots == cfg.qd) {
            if (!more_to_issue)
                return !q->failure[0];
            continue;
        }
        struct pollfd pfd = { .fd = q->call_fd, .events = POLLIN };
        int r = poll(&pfd, 1, STALL_MS);
        if (r == 0) {
            fail(q, "no response for %d ms with %u requests in flight", STALL_MS,
                 cfg.qd - q->nfree_slots);
            return false;
        }
        if (r < 0 && errno != EINTR) {
            fail(q, "poll failed: %s", strerror(errno));
            return false;
        }
        if (!eventfd_drain(q->call_fd)) {
            fail(q, "call eventfd read failed: %s", strerror(errno));
            return false;
        }
        q->waits++;
    }
}

static void *queue_main(void *arg)
{
    struct queue *q = arg;
    q->cursor = cfg.sectors * SECTOR / cfg.bs / cfg.nqueues * (uint64_t)q->index;
    if (cfg.verify) {
        if (run_phase(q, BLKIF_OP_WRITE, cfg.count))
            run_phase(q, BLKIF_OP_READ, cfg.count);
    } else {
        run_phase(q, cfg.write ? BLKIF_OP_WRITE : BLKIF_OP_READ, cfg.count);
    }
    q->end_ns = now_ns();
    return NULL;
}

/* --- set-up ------------------------------------------------------------------------- */

static const char usage[] =
    "usage: blkfront_load --ram FD:SIZE --gnttab FD:FRAMES --grefs FIRST:COUNT\n"
    "         --frames FIRST:COUNT --queue RINGFRAME:ORDER:KICKFD:CALLFD [--queue ...]\n"
    "         --sectors N [--max-indirect N] [--qd N] [--bs BYTES] [--rw read|write]\n"
    "         [--pattern rand|seq] [--seconds S | --count N] [--persistent 0|1]\n"
    "         [--verify] [--seed N] [--domid N] [--handle N]\n"
    "   or: blkfront_load --socket PATH --disk path=IMAGE [--disk KEY=VALUE ...]\n"
    "         [--queues N] [--devid N] [--inflight] [--markers] [--log] [--qd N] [--bs BYTES]\n"
    "         ... (as above)";

static void check_backend(void);

static void parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *opt = argv[i];
        if (!strcmp(opt, "--verify")) {
            cfg.verify = true;
            continue;
        }
        if (!strcmp(opt, "--inflight")) {
            ctl.inflight = true;
            continue;
        }
        if (!strcmp(opt, "--log")) {
            ctl.log = true;
            continue;
        }
        if (!strcmp(opt, "--markers")) {
            ctl.markers = true;
            continue;
        }
        if (i + 1 >= argc)
            die_usage(usage);
        const char *v = argv[++i];
        if (parse_guest_option(opt, v))
            continue;
        if (!strcmp(opt, "--queue")) {
            unsigned long long frame, order;
            int kick, call, n;
            if (cfg.nqueues == MAX_QUEUES)
                die_usage("too many queues");
            if (sscanf(v, "%llu:%llu:%d:%d%n", &frame, &order, &kick, &call, &n) != 4 ||
                v[n] || order > 4)
                die_usage("--queue RINGFRAME:ORDER:KICKFD:CALLFD");
            struct queue *q = &cfg.q[cfg.nqueues];
            q->index = (int)cfg.nqueues++;
            q->ring_frame = (uint32_t)frame;
            q->ring_order = (unsigned)order;
            q->kick_fd = kick;
            q->call_fd = call;
        } else if (!strcmp(opt, "--socket")) {
            ctl.socket = v;
        } else if (!strcmp(opt, "--disk")) {
            parse_kv_option(&ctl.disk, opt, v);
        } else if (!strcmp(opt, "--queues")) {
            ctl.nqueues = (unsigned)parse_u64(v, "--queues");
            if (!ctl.nqueues || ctl.nqueues > MAX_QUEUES)
                die_usage("--queues must be 1..16");
        } else if (!strcmp(opt, "--devid")) {
            ctl.devid = (uint32_t)parse_u64(v, "--devid");
        } else if (!strcmp(opt, "--sectors")) {
            cfg.sectors = parse_u64(v, "--sectors");
        } else if (!strcmp(opt, "--max-indirect")) {
            cfg.max_indirect = (unsigned)parse_u64(v, "--max-indirect");
        } else if (!strcmp(opt, "--qd")) {
            cfg.qd = (unsigned)parse_u64(v, "--qd");
        } else if (!strcmp(opt, "--bs")) {
            cfg.bs = (unsigned)parse_u64(v, "--bs");
        } else if (!strcmp(opt, "--rw")) {
            if (strcmp(v, "read") && strcmp(v, "write"))
                die_usage("--rw read|write");
            cfg.write = !strcmp(v, "write");
        } else if (!strcmp(opt, "--pattern")) {
            if (strcmp(v, "rand") && strcmp(v, "seq"))
                die_usage("--pattern rand|seq");
            cfg.random = !strcmp(v, "rand");
        } else if (!strcmp(opt, "--seconds")) {
            cfg.seconds = strtod(v, NULL);
        } else if (!strcmp(opt, "--count")) {
            cfg.count = parse_u64(v, "--count");
        } else if (!strcmp(opt, "--persistent")) {
            cfg.persistent = parse_u64(v, "--persistent") != 0;
        } else if (!strcmp(opt, "--seed")) {
            cfg.seed = parse_u64(v, "--seed");
        } else if (!strcmp(opt, "--handle")) {
            cfg.handle = (uint16_t)parse_u64(v, "--handle");
        } else {
            die_usage(usage);
        }
    }
    if (ctl.socket) {
        if (guest.ram_fd >= 0 || guest.gnttab_fd >= 0 || cfg.nqueues || cfg.sectors ||
            guest.gref_count || guest.frame_count)
            die_usage("--socket: the program sets up the guest, the queues and the disk");
        if (!bkd_kv_get(&ctl.disk, "path"))
            die_usage("--socket needs --disk path=IMAGE");
        cfg.nqueues = ctl.nqueues ? ctl.nqueues : 1;
    } else if (ctl.markers) {
        die_usage("--markers is for --socket");
    if (ctl.log && !ctl.socket)
        die_usage("--log is for --socket");
    } else if (guest.ram_fd < 0 || guest.gnttab_fd < 0 || !cfg.nqueues || !cfg.sectors ||
               !guest.gref_count || !guest.frame_count) {
        die_usage(usage);
    }
    if (!cfg.bs || cfg.bs % PAGE || cfg.bs / PAGE > 4096)
        die_usage("--bs must be a multiple of 4096");
    if (!cfg.qd || cfg.qd > 0xffff)
        die_usage("--qd must be 1..65535");
    if ((cfg.seconds > 0) == (cfg.count > 0) && !cfg.verify)
        die_usage("give one of --seconds and --count");
    if (cfg.verify && !cfg.count)
        die_usage("--verify needs --count");
    cfg.nsegs = cfg.bs / PAGE;
    if (cfg.nsegs > BLKIF_MAX_SEGMENTS_PER_REQUEST)
        cfg.nind = (unsigned)((cfg.nsegs + SEGS_PER_INDIRECT_PAGE - 1) / SEGS_PER_INDIRECT_PAGE);
    if (cfg.nind > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
        die_usage("--bs needs more than 8 indirect pages");
    if (!ctl.socket) {
        check_backend();
        map_guest();
    }
}

/* What needs the backend's keys (the caller's --max-indirect and --sectors, or the
 * daemon's answers with --socket). */
static void check_backend(void)
{
    if (cfg.nind && cfg.nsegs > cfg.max_indirect)
        die_usage("--bs needs more segments than the backend's indirect limit");
    if ((uint64_t)cfg.bs > cfg.sectors * SECTOR)
        die_usage("--bs is bigger than the disk");
    if (cfg.verify && cfg.count * cfg.nqueues > cfg.sectors * SECTOR / cfg.bs)
        die_usage("--verify: more blocks than the disk has");
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, "blkfront_load: out of memory\n");
        exit(1);
    }
    return p;
}

/* Each queue gets its share of the frames and grant refs the caller set aside. */
static void setup_queue(struct queue *q)
{
    unsigned per_req = cfg.nsegs + cfg.nind;
    uint64_t need = (uint64_t)cfg.qd * per_req;
    uint64_t frames_each = guest.frame_count / cfg.nqueues, grefs_each = guest.gref_count / cfg.nqueues;
    if (need > frames_each || need > grefs_each)
        die_usage("not enough --frames or --grefs for qd * pages per request * queues");
    if (((uint64_t)q->ring_frame + (1u << q->ring_order)) * PAGE > guest.ram_size)
        die_usage("--queue: ring beyond guest RAM");
    blkif_sring_t *sring = (blkif_sring_t *)frame_addr(q->ring_frame);
    SHARED_RING_INIT(sring); /* before the backend is told where the ring is */
    FRONT_RING_INIT(&q->front, sring, PAGE << q->ring_order);
    if (cfg.qd > RING_SIZE(&q->front))
        die_usage("--qd is larger than the ring");

    uint32_t frame0 = guest.frame_first + (uint32_t)(q->index * frames_each);
    grant_ref_t gref0 = guest.gref_first + (grant_ref_t)(q->index * grefs_each);
    q->slots = xcalloc(cfg.qd, sizeof(*q->slots));
    q->free_slots = xcalloc(cfg.qd, sizeof(*q->free_slots));
    q->batch = xcalloc(cfg.qd, sizeof(*q->batch));
    for (unsigned s = 0; s < cfg.qd; s++) {
        struct slot *sl = &q->slots[s];
        sl->grants = xcalloc(per_req, sizeof(*sl->grants));
        q->free_slots[q->nfree_slots++] = cfg.qd - 1 - s;
        if (cfg.persistent) {
            /* The caller's data, copied to and from the granted pool pages. */
            sl->buf = aligned_alloc(PAGE, cfg.bs);
            if (!sl->buf)
                die_usage("out of memory");
            memset(sl->buf, 0, cfg.bs);
        } else {
            /* The request's own guest pages, granted directly (zero copy). */
            for (unsigned i = 0; i < per_req; i++)
                sl->grants[i].frame = frame0 + s * per_req + i;
            sl->buf = frame_addr(frame0 + s * per_req);
        }
    }
    if (cfg.persistent) {
        /* Granted once, writable, kept until the device is closed. */
        q->pool = xcalloc(need, sizeof(*q->pool));
        for (unsigned i = 0; i < need; i++) {
            q->pool[i] = (struct grant){ .gref = gref0 + (grant_ref_t)(need - 1 - i),
                                         .frame = frame0 + (uint32_t)(need - 1 - i) };
            grant_access(q->pool[i].gref, q->pool[i].frame, false);
        }
        q->npool = (unsigned)need;
    } else {
        q->free_grefs = xcalloc(need, sizeof(*q->free_grefs));
        for (unsigned i = 0; i < need; i++)
            q->free_grefs[q->nfree_grefs++] = gref0 + (grant_ref_t)(need - 1 - i);
    }
    uint64_t expect = cfg.count ? (cfg.verify ? 2 * cfg.count : cfg.count)
                                : (uint64_t)(cfg.seconds * 2e6) + cfg.qd;
    q->cap_lat = expect < MAX_SAMPLES ? expect : MAX_SAMPLES;
    q->lat = xcalloc(q->cap_lat, sizeof(*q->lat));
    q->rng = (cfg.seed ^ 0x2545F4914F6CDD1Dull) * (uint64_t)(q->index + 1) | 1;
    q->gen = 1ull << 31; /* ids use the high bits too: a backend that cuts them is caught */
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* --- --socket: the control plane through clients/c ----------------------------------- */

/* Guest RAM holds the rings (queue q's at frame q << order), then the data pages; the
 * grant table has the rings' refs from FIRST_GREF on, then the data pages' refs. Both
 * memfds are handed to the daemon, then mapped here; then ADD_DEVICE (and SET_INFLIGHT). */
static void control_attach(void)
{
    while (__CONST_RING_SIZE(blkif, PAGE) << ctl.order < cfg.qd)
        ctl.order++;
    if (ctl.order > 4)
        die_usage("--qd needs a ring of more than 16 pages");
    uint32_t ring_pages = cfg.nqueues << ctl.order;
    uint64_t data_pages = (uint64_t)cfg.nqueues * cfg.qd * (cfg.nsegs + cfg.nind);
    if (data_pages > (1u << 24))
        die_usage("--qd * --bs * --queues is too much guest memory");
    control_open(ctl.socket, ring_pages, data_pages);
    if (ctl.log) {  /* every page the daemon writes from now on is logged */
        ctl.log_ram_pages = guest.ram_size / PAGE;
        ctl.log_gnt_pages = guest.nr_entries / bkd_gnttab_entries_per_frame(1);
        ctl.log_size = bkd_log_size(ctl.log_ram_pages, ctl.log_gnt_pages);
        int fd;
        ctl_check(fd = bkd_memfd("dirty-log", ctl.log_size), "dirty log memfd");
        ctl.log_map = mmap(NULL, ctl.log_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (ctl.log_map == MAP_FAILED)
            die_usage("cannot map the dirty log");
        ctl_check(bkd_set_log(control, fd, 0, ctl.log_size, ctl.log_ram_pages), "SET_LOG");
        close(fd);
    }

    uint32_t state;
    struct bkd_kv keys = {0};
    ctl_check(bkd_add_device(control, ctl.devid, BKD_DEV_BLK, &ctl.disk, &state, &keys),
              "ADD_DEVICE");
    uint64_t v;
    cfg.max_indirect = bkd_kv_get_u64(&keys, "feature-max-indirect-segments", &v) ? 0
                                                                                    : (unsigned)v;
    ctl.offered_persistent = bkd_kv_get_u64(&keys, "feature-persistent", &v) == 0 && v == 1;
    ctl.want_persistent = cfg.persistent;
    cfg.persistent = ctl.want_persistent && ctl.offered_persistent;
    bkd_kv_free(&keys);
    if (ctl.inflight) {
        uint64_t size = bkd_inflight_size(cfg.nqueues);
        int fd;
        ctl_check(fd = bkd_memfd("inflight", size), "in-flight memfd");
        ctl_check(bkd_set_inflight(control, ctl.devid, fd, 0, size), "SET_INFLIGHT");
        close(fd);
    }
    for (unsigned i = 0; i < cfg.nqueues; i++) {
        struct queue *q = &cfg.q[i];
        q->index = (int)i;
        q->ring_frame = i << ctl.order;
        q->ring_order = ctl.order;
        ctl_check(bkd_channel_open(&ctl.ch[i], FIRST_PORT + i, EFD_NONBLOCK), "eventfd");
        q->kick_fd = ctl.ch[i].kick_fd;
        q->call_fd = ctl.ch[i].call_fd;
    }
}

/* Once the rings are initialised: grant their pages, FRONTEND_STATE Connected with the
 * ring refs and channels; the reply gives the disk's size. */
static void control_connect(void)
{
    struct bkd_kv fkeys = {0}, bkeys = {0};
    ctl_check(bkd_kv_set(&fkeys, "protocol", XEN_IO_PROTO_ABI_X86_64), "key/value map");
    ctl_check(bkd_kv_set(&fkeys, "feature-persistent", ctl.want_persistent ? "1" : "0"),
              "key/value map");
    if (cfg.nqueues > 1)
        kv_setf(&fkeys, "multi-queue-num-queues", cfg.nqueues);
    if (ctl.order)
        kv_setf(&fkeys, "ring-page-order", ctl.order);
    for (unsigned i = 0; i < cfg.nqueues; i++) {
        char prefix[24] = "", key[64];
        if (cfg.nqueues > 1)
            snprintf(prefix, sizeof(prefix), "queue-%u/", i);
        for (unsigned p = 0; p < 1u << ctl.order; p++) {
            grant_ref_t gref = FIRST_GREF + (i << ctl.order) + p;
            grant_access(gref, cfg.q[i].ring_frame + p, false);
            if (ctl.order)
                snprintf(key, sizeof(key), "%sring-ref%u", prefix, p);
            else
                snprintf(key, sizeof(key), "%sring-ref", prefix);
            kv_setf(&fkeys, key, gref);
        }
        snprintf(key, sizeof(key), "%sevent-channel", prefix);
        kv_setf(&fkeys, key, ctl.ch[i].port);
    }
    uint32_t state;
    ctl_check(bkd_frontend_state(control, ctl.devid, BKD_XB_CONNECTED, &fkeys, ctl.ch,
                                 cfg.nqueues, &state, &bkeys),
              "FRONTEND_STATE Connected");
    if (state != BKD_XB_CONNECTED || bkd_kv_get_u64(&bkeys, "sectors", &cfg.sectors)) {
        fprintf(stderr, "blkfront_load: the backend did not connect (state %u)\n", state);
        exit(1);
    }
    bkd_kv_free(&fkeys);
    bkd_kv_free(&bkeys);
    check_backend();
}

/* After the run: close the device; it must then hold none of this guest's grants
 * (GTF_reading/GTF_writing clear on every entry); remove it and disconnect. */
static void control_detach(void)
{
    if (ctl.log) {  /* what the run wrote, then logging off */
        ctl.dirty_pages = (int64_t)bkd_log_take(ctl.log_map, 0, ctl.log_ram_pages, NULL);
        ctl.dirty_gnttab_pages = (int64_t)bkd_log_take(
            ctl.log_map, bkd_log_gnttab_offset(ctl.log_ram_pages), ctl.log_gnt_pages, NULL);
        ctl_check(bkd_clear_log(control), "CLEAR_LOG");
        munmap(ctl.log_map, ctl.log_size);
    }
    ctl.held_after_close = control_close(ctl.devid, ctl.ch, cfg.nqueues);
    bkd_kv_free(&ctl.disk);
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    if (ctl.socket)
        control_attach();
    for (unsigned i = 0; i < cfg.nqueues; i++)
        setup_queue(&cfg.q[i]);
    if (ctl.socket)
        control_connect();
    if ((!ctl.socket || ctl.markers) && !ready_then_wait_for_go())
        return 2;

    struct rusage ru0;
    getrusage(RUSAGE_SELF, &ru0);
    cfg.go_ns = now_ns();
    cfg.deadline_ns = cfg.go_ns + (uint64_t)(cfg.seconds * 1e9);
    pthread_t threads[MAX_QUEUES];
    for (unsigned i = 0; i < cfg.nqueues; i++)
        if (pthread_create(&threads[i], NULL, queue_main, &cfg.q[i]))
            die_usage("pthread_create failed");
    uint64_t end = cfg.go_ns;
    for (unsigned i = 0; i < cfg.nqueues; i++) {
        pthread_join(threads[i], NULL);
        if (cfg.q[i].end_ns > end)
            end = cfg.q[i].end_ns;
    }

    double cpu = cpu_seconds_since(&ru0);
    if (ctl.markers) { /* the run is over; the device is closed once the caller says so */
        char line[16];
        printf("done\n");
        fflush(stdout);
        if (!fgets(line, sizeof(line), stdin))
            return 2;
    }
    uint64_t ios = 0, bytes = 0, errors = 0, bad = 0, refused = 0, mismatches = 0, kicks = 0,
             waits = 0, nlat = 0;
    const char *failure = "";
    for (unsigned i = 0; i < cfg.nqueues; i++) {
        struct queue *q = &cfg.q[i];
        ios += q->ios;
        bytes += q->bytes;
        errors += q->errors;
        bad += q->bad_responses;
        refused += q->refused;
        mismatches += q->mismatches;
        kicks += q->kicks;
        waits += q->waits;
        nlat += q->nlat;
        if (!failure[0] && q->failure[0])
            failure = q->failure;
    }
    uint32_t *lat = xcalloc(nlat ? nlat : 1, sizeof(*lat));
    size_t at = 0;
    double sum = 0;
    for (unsigned i = 0; i < cfg.nqueues; i++) {
        memcpy(lat + at, cfg.q[i].lat, cfg.q[i].nlat * sizeof(*lat));
        at += cfg.q[i].nlat;
    }
    for (size_t i = 0; i < nlat; i++)
        sum += lat[i];
    qsort(lat, nlat, sizeof(*lat), cmp_u32);
#define PCT(p) (nlat ? lat[(size_t)((double)(nlat - 1) * (p))] : 0)
    double seconds = (double)(end - cfg.go_ns) / 1e9;
    char held_why[FAILURE_LEN];
    if (ctl.socket) {
        control_detach();
        if (ctl.held_after_close && !failure[0]) {
            snprintf(held_why, sizeof(held_why), "%" PRIu64 " grants still in use after "
                     "the device was closed", ctl.held_after_close);
            failure = held_why;
        }
    }
    printf("{\"ios\": %" PRIu64 ", \"bytes\": %" PRIu64 ", \"seconds\": %.6f, "
           "\"cpu_seconds\": %.6f, \"queues\": %u, \"qd\": %u, \"bs\": %u, \"persistent\": %d, "
           "\"errors\": %" PRIu64 ", \"bad_responses\": %" PRIu64 ", "
           "\"refused_end_access\": %" PRIu64 ", \"mismatches\": %" PRIu64 ", "
           "\"kicks\": %" PRIu64 ", \"waits\": %" PRIu64 ", "
           "\"lat_ns\": {\"mean\": %.0f, \"p50\": %u, \"p90\": %u, \"p99\": %u, "
           "\"p999\": %u, \"max\": %u}, \"sectors\": %" PRIu64 ", "
           "\"offered_persistent\": %d, \"held_after_close\": %" PRIu64 ", "
           "\"dirty_pages\": %" PRId64 ", \"dirty_gnttab_pages\": %" PRId64 ", "
           "\"failure\": \"%s\"}\n",
           ios, bytes, seconds, cpu, cfg.nqueues, cfg.qd, cfg.bs, cfg.persistent, errors, bad,
           refused, mismatches, kicks, waits, nlat ? sum / (double)nlat : 0.0, PCT(0.5),
           PCT(0.9), PCT(0.99), PCT(0.999), PCT(1.0), cfg.sectors,
           ctl.socket ? ctl.offered_persistent : -1, ctl.held_after_close, ctl.dirty_pages,
           ctl.dirty_gnttab_pages, failure);
    fflush(stdout);
    for (unsigned i = 0; i < cfg.nqueues; i++) {
        struct queue *q = &cfg.q[i];
        for (unsigned s = 0; s < cfg.qd; s++) {
            free(q->slots[s].grants);
            if (cfg.persistent)
                free(q->slots[s].buf);
        }
        free(q->slots);
        free(q->free_slots);
        free(q->batch);
        free(q->pool);
        free(q->free_grefs);
        free(q->lat);
    }
    free(lat);
    bool ok = !errors && !bad && !refused && !mismatches && !ctl.held_after_close &&
              !failure[0];
    return ok ? 0 : 1;
}
