/* guest-disk: a VMM's whole life with one guest disk, through backendd-client.
 *
 *   guest-disk SOCKET IMAGE
 *
 * It plays both the VMM (memory, grant table, xenstore keys, eventfds) and the guest's
 * blkfront (a blkif ring driven with Xen's own ring.h macros), so it shows end to end
 * what a VMM must do:
 *   HELLO; guest RAM and a one-frame grant table, both sealed memfds; ADD_DEVICE for
 *   IMAGE as xvda; FRONTEND_STATE Initialised with the ring keys and one event channel,
 *   then Connected; verified writes and reads (checked against IMAGE itself), a flush,
 *   refused requests; growing the grant table to two frames; a KEYS_CHANGED notice when
 *   IMAGE grows; GET_STATS; Closing, Closed, REMOVE_DEVICE.
 * Prints one line per step and "guest-disk: ok" at the end; exits 1 on the first failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ring.h maps xen_mb/xen_rmb/xen_wmb onto these: a real fence, and compiler barriers
 * (all x86's total store order needs for read/write ordering). */
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __asm__ __volatile__("" ::: "memory")
#define wmb() __asm__ __volatile__("" ::: "memory")
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/protocols.h>

#include "backendd-client.h"

#define DEVID 51712u /* xvda */
#define RAM_SIZE (8u << 20)
#define RING_GFN 1u
#define DATA_GFN 16u /* data pages from here on */
#define RING_GREF 8u /* grefs 0..7 are the toolstack's, as in Linux */
#define PORT 5u
#define SECTOR 512u

static struct bkd_client *client;
static uint8_t *ram;
static struct grant_entry_v1 *gnttab;
static uint32_t gnttab_frames;
static int gnttab_fd = -1;
static blkif_front_ring_t front;
static struct bkd_channel chan = {0, -1, -1};
static int image_fd = -1;
static uint64_t next_id = 1;

#define FAIL(...)                                                                    \
    do {                                                                             \
        fprintf(stderr, "guest-disk: " __VA_ARGS__);                                 \
        fprintf(stderr, "\n");                                                       \
        exit(1);                                                                     \
    } while (0)

static void check(int r, const char *what)
{
    if (r < 0)
        FAIL("%s: %s (%s)", what, strerror(-r), bkd_last_error(client));
}

/* --- the guest's grant table ------------------------------------------------------- */

static void grant(uint32_t gref, uint32_t gfn, int readonly)
{
    struct grant_entry_v1 *e = &gnttab[gref];
    e->domid = 0;
    e->frame = gfn;
    wmb(); /* domid and frame before the flags that make the entry valid */
    __atomic_store_n(&e->flags, (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0)),
                     __ATOMIC_RELEASE);
}

/* gnttab_end_foreign_access_ref: only once the backend has let go of the page. */
static void end_grant(uint32_t gref)
{
    uint16_t flags = __atomic_load_n(&gnttab[gref].flags, __ATOMIC_ACQUIRE);
    if (flags & (GTF_reading | GTF_writing))
        FAIL("gref %u still in use by the backend after its response", gref);
    if (!__atomic_compare_exchange_n(&gnttab[gref].flags, &flags, 0, 0, __ATOMIC_SEQ_CST,
                                     __ATOMIC_SEQ_CST))
        FAIL("gref %u changed while revoking", gref);
}

static void map_gnttab(uint32_t frames)
{
    if (gnttab)
        munmap(gnttab, (size_t)gnttab_frames * BKD_PAGE_SIZE);
    gnttab = mmap(NULL, (size_t)frames * BKD_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED,
                  gnttab_fd, 0);
    if (gnttab == MAP_FAILED)
        FAIL("mmap grant table: %s", strerror(errno));
    gnttab_frames = frames;
}

/* --- the blkif ring ---------------------------------------------------------------- */

/* Wait for the daemon's call eventfd, then take every response. */
static void wait_responses(blkif_response_t *out, unsigned want)
{
    unsigned got = 0;
    while (got < want) {
        int more;
        do {
            RING_IDX prod = front.sring->rsp_prod;
            xen_rmb();
            for (; front.rsp_cons != prod && got < want; front.rsp_cons++)
                out[got++] = *RING_GET_RESPONSE(&front, front.rsp_cons);
            RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
        } while (more && got < want);
        if (got == want)
            break;
        struct pollfd p = {.fd = chan.call_fd, .events = POLLIN};
        if (poll(&p, 1, 10000) != 1)
            FAIL("no response within 10 s (%u of %u)", got, want);
        eventfd_t v;
        (void)eventfd_read(chan.call_fd, &v);
    }
}

static void push(void)
{
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
    if (notify && eventfd_write(chan.kick_fd, 1) < 0)
        FAIL("kick: %s", strerror(errno));
}

/* One read or write of `nsect` sectors at `sector`, one page per 8 sectors, data pages
 * granted with grefs from `gref0` (read-only for writes, as a frontend does). Returns the
 * response status. */
static int16_t rw(uint8_t op, uint64_t sector, unsigned nsect, uint8_t *buf, uint32_t gref0)
{
    unsigned nseg = (nsect + 7) / 8;
    if (nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST)
        FAIL("request too large");
    blkif_request_t *req = RING_GET_REQUEST(&front, front.req_prod_pvt);
    memset(req, 0, sizeof(*req));
    req->operation = op;
    req->nr_segments = (uint8_t)nseg;
    req->handle = (blkif_vdev_t)DEVID;
    req->id = next_id++;
    req->sector_number = sector;
    for (unsigned s = 0; s < nseg; s++) {
        unsigned n = nsect - 8 * s < 8 ? nsect - 8 * s : 8;
        uint32_t gfn = DATA_GFN + s;
        if (op == BLKIF_OP_WRITE)
            memcpy(ram + (size_t)gfn * BKD_PAGE_SIZE, buf + (size_t)s * 4096, n * SECTOR);
        grant(gref0 + s, gfn, op == BLKIF_OP_WRITE);
        req->seg[s].gref = gref0 + s;
        req->seg[s].first_sect = 0;
        req->seg[s].last_sect = (uint8_t)(n - 1);
    }
    front.req_prod_pvt++;
    push();
    blkif_response_t rsp;
    wait_responses(&rsp, 1);
    if (rsp.id != next_id - 1)
        FAIL("response id %" PRIu64 ", expected %" PRIu64, rsp.id, next_id - 1);
    for (unsigned s = 0; s < nseg; s++) {
        end_grant(gref0 + s);
        unsigned n = nsect - 8 * s < 8 ? nsect - 8 * s : 8;
        if (op == BLKIF_OP_READ && rsp.status == BLKIF_RSP_OKAY)
            memcpy(buf + (size_t)s * 4096, ram + (size_t)(DATA_GFN + s) * BKD_PAGE_SIZE,
                   n * SECTOR);
    }
    return rsp.status;
}

static int16_t simple_op(uint8_t op)
{
    blkif_request_t *req = RING_GET_REQUEST(&front, front.req_prod_pvt);
    memset(req, 0, sizeof(*req));
    req->operation = op;
    req->handle = (blkif_vdev_t)DEVID;
    req->id = next_id++;
    front.req_prod_pvt++;
    push();
    blkif_response_t rsp;
    wait_responses(&rsp, 1);
    return rsp.status;
}

static void fill_random(uint8_t *buf, size_t n, uint32_t *state)
{
    for (size_t i = 0; i < n; i++) {
        *state = *state * 1103515245u + 12345u;
        buf[i] = (uint8_t)(*state >> 16);
    }
}

/* --- the VMM's part ---------------------------------------------------------------- */

static void frontend_keys(struct bkd_kv *keys)
{
    char v[32];
    snprintf(v, sizeof(v), "%u", RING_GREF);
    check(bkd_kv_set(keys, "ring-ref", v), "kv");
    snprintf(v, sizeof(v), "%u", PORT);
    check(bkd_kv_set(keys, "event-channel", v), "kv");
    check(bkd_kv_set(keys, "protocol", XEN_IO_PROTO_ABI_X86_64), "kv");
}

static uint64_t stat_of(const struct bkd_kv *stats, const char *name)
{
    char key[64];
    uint64_t v;
    snprintf(key, sizeof(key), "%u.%s", DEVID, name);
    if (bkd_kv_get_u64(stats, key, &v))
        FAIL("GET_STATS: no counter %s", key);
    return v;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET IMAGE\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *image = argv[2];
    image_fd = open(image, O_RDWR | O_CLOEXEC);
    if (image_fd < 0)
        FAIL("open %s: %s", image, strerror(errno));
    struct stat st;
    if (fstat(image_fd, &st) < 0)
        FAIL("stat: %s", strerror(errno));
    uint64_t image_sectors = (uint64_t)st.st_size / SECTOR;

    int r = bkd_connect(argv[1], 0, &client);
    if (r < 0)
        FAIL("connect %s: %s", argv[1], strerror(-r));
    printf("hello: protocol %u, features %#" PRIx64 "\n", bkd_version(client),
           bkd_features(client));

    /* Guest RAM: one sealed memfd, one region at gpa 0. */
    int ram_fd = bkd_memfd("guest-ram", RAM_SIZE);
    check(ram_fd, "memfd");
    ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd, 0);
    if (ram == MAP_FAILED)
        FAIL("mmap RAM: %s", strerror(errno));
    check(bkd_add_mem_region(client, 0, RAM_SIZE, ram_fd, 0), "ADD_MEM_REGION");
    r = bkd_add_mem_region(client, 0x1000, 0x1000, ram_fd, 0x1000);
    if (r != -EEXIST)
        FAIL("overlapping region: got %d, want -EEXIST", r);
    close(ram_fd); /* the daemon has its own mapping; we keep ours */
    printf("memory: %u MiB at gpa 0\n", RAM_SIZE >> 20);

    /* Grant table v1, one frame (512 entries): its own sealed memfd, kept open to grow. */
    gnttab_fd = bkd_memfd("guest-gnttab", BKD_PAGE_SIZE);
    check(gnttab_fd, "memfd");
    map_gnttab(1);
    check(bkd_set_grant_table(client, gnttab_fd, 1, 1, 0, 0), "SET_GRANT_TABLE");
    printf("grant table: v1, 1 frame, %u entries\n", bkd_gnttab_entries_per_frame(1));

    /* ADD_DEVICE; the VMM writes the returned keys and state under the backend's dir. */
    struct bkd_kv config = {0}, keys = {0};
    check(bkd_kv_set(&config, "path", image), "kv");
    uint32_t state;
    check(bkd_add_device(client, DEVID, BKD_DEV_BLK, &config, &state, &keys), "ADD_DEVICE");
    if (state != BKD_XB_INIT_WAIT || !bkd_kv_get(&keys, "feature-flush-cache"))
        FAIL("ADD_DEVICE: state %u, keys without feature-flush-cache", state);
    r = bkd_add_device(client, DEVID, BKD_DEV_BLK, &config, NULL, NULL);
    if (r != -EEXIST || !*bkd_last_error(client))
        FAIL("second ADD_DEVICE: %d, want -EEXIST with a message", r);
    printf("device %u: InitWait, %zu backend keys; a second ADD_DEVICE: %s (\"%s\")\n", DEVID,
           keys.count, strerror(-r), bkd_last_error(client));
    bkd_kv_free(&config);

    /* The frontend's ring, granted to the backend, and one event channel. */
    blkif_sring_t *sring = (blkif_sring_t *)(ram + (size_t)RING_GFN * BKD_PAGE_SIZE);
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&front, sring, BKD_PAGE_SIZE);
    grant(RING_GREF, RING_GFN, 0);
    check(bkd_channel_open(&chan, PORT, EFD_NONBLOCK), "eventfd");

    struct bkd_kv fkeys = {0};
    frontend_keys(&fkeys);
    check(bkd_frontend_state(client, DEVID, BKD_XB_INITIALISED, &fkeys, &chan, 1, &state,
                             &keys),
          "FRONTEND_STATE Initialised");
    uint64_t sectors;
    if (state != BKD_XB_CONNECTED || bkd_kv_get_u64(&keys, "sectors", &sectors) ||
        sectors != image_sectors)
        FAIL("connect: state %u, sectors %s (image has %" PRIu64 ")", state,
             bkd_kv_get(&keys, "sectors") ? bkd_kv_get(&keys, "sectors") : "missing",
             image_sectors);
    /* Connected need not carry the channels again: the daemon keeps those of the connect. */
    check(bkd_frontend_state(client, DEVID, BKD_XB_CONNECTED, &fkeys, NULL, 0, &state, NULL),
          "FRONTEND_STATE Connected");
    if (state != BKD_XB_CONNECTED)
        FAIL("Connected: backend state %u", state);
    printf("device %u: Connected, %" PRIu64 " sectors\n", DEVID, sectors);

    /* Verified I/O: write random data, read it back, compare with the image file. */
    uint32_t seed = 12345;
    uint8_t *wbuf = malloc(11 * 4096), *rbuf = malloc(11 * 4096), *fbuf = malloc(11 * 4096);
    if (!wbuf || !rbuf || !fbuf)
        FAIL("out of memory");
    unsigned ios = 0;
    for (unsigned round = 0; round < 24; round++) {
        unsigned nsect = 1 + (round * 7) % 88;
        uint64_t sector = (round * 977u) % (image_sectors - nsect);
        fill_random(wbuf, nsect * SECTOR, &seed);
        int16_t s = rw(BLKIF_OP_WRITE, sector, nsect, wbuf, 16);
        if (s != BLKIF_RSP_OKAY)
            FAIL("write %u sectors at %" PRIu64 ": status %d", nsect, sector, s);
        memset(rbuf, 0, nsect * SECTOR);
        s = rw(BLKIF_OP_READ, sector, nsect, rbuf, 16);
        if (s != BLKIF_RSP_OKAY)
            FAIL("read %u sectors at %" PRIu64 ": status %d", nsect, sector, s);
        if (memcmp(wbuf, rbuf, nsect * SECTOR))
            FAIL("read-back mismatch at sector %" PRIu64, sector);
        if (pread(image_fd, fbuf, nsect * SECTOR, (off_t)(sector * SECTOR)) !=
                (ssize_t)(nsect * SECTOR) ||
            memcmp(wbuf, fbuf, nsect * SECTOR))
            FAIL("image file differs at sector %" PRIu64, sector);
        ios += 2;
    }
    if (simple_op(BLKIF_OP_FLUSH_DISKCACHE) != BLKIF_RSP_OKAY)
        FAIL("flush failed");
    printf("io: %u verified reads and writes, flush: ok\n", ios);

    /* Refused requests: an error response for their id, and the ring carries on. */
    if (rw(BLKIF_OP_READ, image_sectors, 8, rbuf, 16) != BLKIF_RSP_ERROR)
        FAIL("read past the end was not refused");
    blkif_request_t *bad = RING_GET_REQUEST(&front, front.req_prod_pvt);
    memset(bad, 0, sizeof(*bad));
    bad->operation = BLKIF_OP_READ;
    bad->nr_segments = 1;
    bad->id = next_id++;
    bad->seg[0].gref = 300; /* never granted */
    bad->seg[0].last_sect = 7;
    front.req_prod_pvt++;
    push();
    blkif_response_t rsp;
    wait_responses(&rsp, 1);
    if (rsp.status != BLKIF_RSP_ERROR)
        FAIL("ungranted page was not refused: status %d", rsp.status);
    printf("refused: a read past the end and an ungranted page, each with BLKIF_RSP_ERROR\n");

    /* Grow the grant table: the same memfd, grown, sent again with 2 frames. */
    if (ftruncate(gnttab_fd, 2 * BKD_PAGE_SIZE) < 0)
        FAIL("grow grant table: %s", strerror(errno));
    map_gnttab(2);
    check(bkd_set_grant_table(client, gnttab_fd, 1, 2, 0, 0), "SET_GRANT_TABLE (grow)");
    fill_random(wbuf, 4096, &seed);
    if (rw(BLKIF_OP_WRITE, 64, 8, wbuf, 600) != BLKIF_RSP_OKAY ||
        rw(BLKIF_OP_READ, 64, 8, rbuf, 600) != BLKIF_RSP_OKAY || memcmp(wbuf, rbuf, 4096))
        FAIL("I/O through gref 600 (second frame) failed");
    printf("grant table: grown to 2 frames, I/O through gref 600: ok\n");

    /* A notice: the image grows, the daemon says so with KEYS_CHANGED. */
    if (ftruncate(image_fd, st.st_size + (1 << 20)) < 0)
        FAIL("grow image: %s", strerror(errno));
    struct bkd_notice n = {0};
    int found = 0;
    for (int tries = 0; tries < 40 && !found; tries++) {
        r = bkd_read_notices(client, 500);
        check(r, "read notices");
        while (bkd_next_notice(client, &n)) {
            uint64_t now;
            if (n.code == BKD_NOTICE_KEYS_CHANGED && n.devid == DEVID &&
                bkd_kv_get_u64(&n.kv, "sectors", &now) == 0 &&
                now == image_sectors + 2048)
                found = 1;
            bkd_kv_free(&n.kv);
        }
    }
    if (!found)
        FAIL("no KEYS_CHANGED with the new size");
    printf("notice: KEYS_CHANGED sectors=%" PRIu64 "\n", image_sectors + 2048);

    struct bkd_kv stats = {0};
    check(bkd_get_stats(client, DEVID, &stats), "GET_STATS");
    uint64_t writes = stat_of(&stats, "writes"), reads = stat_of(&stats, "reads");
    uint64_t invalid = stat_of(&stats, "invalid"), errors = stat_of(&stats, "errors");
    if (writes != 25 || reads != 25 || invalid + errors != 2)
        FAIL("GET_STATS: writes %" PRIu64 " reads %" PRIu64 " invalid %" PRIu64
             " errors %" PRIu64,
             writes, reads, invalid, errors);
    r = bkd_get_stats(client, 4242, &stats);
    if (r != -ENOENT)
        FAIL("GET_STATS of no device: %d, want -ENOENT", r);
    printf("stats: writes=%" PRIu64 " reads=%" PRIu64 " invalid=%" PRIu64 " errors=%" PRIu64
           "\n",
           writes, reads, invalid, errors);
    bkd_kv_free(&stats);

    /* Teardown: Closing, Closed, REMOVE_DEVICE; the rings' grants are released. */
    check(bkd_frontend_state(client, DEVID, BKD_XB_CLOSING, NULL, NULL, 0, &state, NULL),
          "Closing");
    if (state != BKD_XB_CLOSING)
        FAIL("Closing: backend state %u", state);
    check(bkd_frontend_state(client, DEVID, BKD_XB_CLOSED, NULL, NULL, 0, &state, NULL),
          "Closed");
    if (state != BKD_XB_CLOSED)
        FAIL("Closed: backend state %u", state);
    end_grant(RING_GREF);
    check(bkd_remove_device(client, DEVID), "REMOVE_DEVICE");
    check(bkd_remove_mem_region(client, 0, RAM_SIZE), "REMOVE_MEM_REGION");
    printf("device %u: Closed and removed\n", DEVID);

    bkd_kv_free(&keys);
    bkd_kv_free(&fkeys);
    bkd_channel_close(&chan);
    bkd_close(client);
    munmap(gnttab, (size_t)gnttab_frames * BKD_PAGE_SIZE);
    munmap(ram, RAM_SIZE);
    close(gnttab_fd);
    close(image_fd);
    free(wbuf);
    free(rbuf);
    free(fbuf);
    printf("guest-disk: ok\n");
    return 0;
}
