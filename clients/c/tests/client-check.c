/* client-check: the library's error paths against a real daemon.
 *
 *   client-check SOCKET IMAGE DAEMON_PID
 *
 * Error replies (and that the connection carries on after them), the kv rules, sealed
 * memfds, a FRONTEND_MISBEHAVED notice from a corrupted ring, a reply timeout while the
 * daemon is stopped, and the daemon going away (SIGTERM): -ECONNRESET, then -EPIPE.
 * Prints "client-check: ok" at the end; exits 1 on the first failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __asm__ __volatile__("" ::: "memory")
#define wmb() __asm__ __volatile__("" ::: "memory")
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/blkif.h>

#include "backendd-client.h"

#ifndef F_GET_SEALS
#define F_GET_SEALS 1034
#endif
#ifndef F_SEAL_SHRINK
#define F_SEAL_SHRINK 0x0002
#endif

static struct bkd_client *c;

#define EXPECT(cond, ...)                                                            \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "client-check: line %d: ", __LINE__);                    \
            fprintf(stderr, __VA_ARGS__);                                            \
            fprintf(stderr, " (last error: %s)\n", c ? bkd_last_error(c) : "");      \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

static void u32le(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET IMAGE DAEMON_PID\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t daemon = (pid_t)atoi(argv[3]);
    int r = bkd_connect("/nonexistent/backendd.sock", 0, &c);
    EXPECT(r == -ENOENT && c == NULL, "connect to a missing socket: %d", r);
    r = bkd_connect(argv[1], 0, &c);
    EXPECT(r == 0, "connect: %d", r);

    /* HELLO's optional map: a guest name, held by one connection at a time. */
    struct bkd_kv info = {0};
    struct bkd_client *named = NULL, *twin = NULL;
    bkd_kv_set(&info, "name", "vm-check.1");
    r = bkd_connect_info(argv[1], 0, &info, &named);
    EXPECT(r == 0, "HELLO with a name: %d", r);
    r = bkd_connect_info(argv[1], 0, &info, &twin);
    EXPECT(r == -EEXIST && twin == NULL, "a name already held: %d", r);
    bkd_kv_set(&info, "name", "bad name!");
    r = bkd_connect_info(argv[1], 0, &info, &twin);
    EXPECT(r == -EINVAL && twin == NULL, "an invalid name: %d", r);
    bkd_close(named);
    bkd_kv_free(&info);
    printf("hello: a named guest; the name held once (EEXIST), checked (EINVAL)\n");

    /* Error replies: each named, the connection carries on. */
    uint8_t hello[12] = {1};
    r = bkd_request_raw(c, BKD_HELLO, hello, sizeof(hello), NULL, 0, NULL, NULL);
    EXPECT(r == -EPROTO && strstr(bkd_last_error(c), "HELLO"), "second HELLO: %d", r);
    r = bkd_request_raw(c, 0x55, NULL, 0, NULL, 0, NULL, NULL);
    EXPECT(r == -EOPNOTSUPP, "unknown code: %d", r);
    r = bkd_request_raw(c, BKD_NOTICE_KEYS_CHANGED, NULL, 0, NULL, 0, NULL, NULL);
    EXPECT(r == -EPROTO, "notice code as a request: %d", r);
    uint8_t region[24] = {0};
    u32le(region + 8, 4096);
    r = bkd_request_raw(c, BKD_ADD_MEM_REGION, region, sizeof(region), NULL, 0, NULL, NULL);
    EXPECT(r == -EBADF, "ADD_MEM_REGION without its fd: %d", r);
    r = bkd_request_raw(c, BKD_ADD_MEM_REGION, region, 20, NULL, 0, NULL, NULL);
    EXPECT(r == -EBADF || r == -EBADMSG, "short ADD_MEM_REGION: %d", r);
    int ram = bkd_memfd("ram", 1 << 20);
    EXPECT(ram >= 0, "memfd: %d", ram);
    r = bkd_add_mem_region(c, 0, 1 << 20, ram, 100);
    EXPECT(r == -EINVAL, "unaligned mmap_offset: %d", r);
    r = bkd_remove_device(c, 7);
    EXPECT(r == -ENOENT, "REMOVE_DEVICE of nothing: %d", r);
    struct bkd_kv stats = {0};
    r = bkd_get_stats(c, BKD_ALL_DEVICES, &stats);
    EXPECT(r == 0 && stats.count == 0, "GET_STATS with no device: %d, %zu", r, stats.count);
    printf("error replies: EPROTO, EOPNOTSUPP, EBADF, EINVAL, ENOENT; connection alive\n");

    /* kv rules are checked before sending. */
    struct bkd_kv kv = {0};
    char longkey[BKD_KV_MAX_KEY + 2];
    memset(longkey, 'k', sizeof(longkey) - 1);
    longkey[sizeof(longkey) - 1] = 0;
    EXPECT(bkd_kv_set(&kv, "", "v") == -EINVAL, "empty key accepted");
    EXPECT(bkd_kv_set(&kv, longkey, "v") == -EINVAL, "257-byte key accepted");
    EXPECT(bkd_kv_set(&kv, "a", "1") == 0 && bkd_kv_set(&kv, "a", "2") == 0 &&
               kv.count == 1 && strcmp(bkd_kv_get(&kv, "a"), "2") == 0,
           "kv replace");
    uint64_t v;
    EXPECT(bkd_kv_set(&kv, "n", "18446744073709551616") == 0 &&
               bkd_kv_get_u64(&kv, "n", &v) == -EINVAL,
           "u64 overflow parsed");
    bkd_kv_free(&kv);

    /* Sealed memfds: can grow, cannot shrink. */
    int seals = fcntl(ram, F_GET_SEALS);
    EXPECT(seals >= 0 && (seals & F_SEAL_SHRINK), "memfd seals %#x", seals);
    EXPECT(ftruncate(ram, 2 << 20) == 0, "grow a sealed memfd");
    EXPECT(ftruncate(ram, 4096) < 0 && errno == EPERM, "shrink a sealed memfd");
    printf("memfd: F_SEAL_SHRINK set, grows, does not shrink\n");

    /* fd kinds: memory must be a sealed memfd. */
    int unsealed = memfd_create("unsealed", MFD_CLOEXEC);
    EXPECT(unsealed >= 0 && ftruncate(unsealed, 4096) == 0, "memfd");
    r = bkd_add_mem_region(c, 0, 4096, unsealed, 0);
    EXPECT(r == -EBADF && strstr(bkd_last_error(c), "fd rule"), "unsealed memfd: %d", r);
    close(unsealed);

    /* A guest that corrupts its ring: FRONTEND_MISBEHAVED arrives as a notice. */
    uint8_t *mem = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, ram, 0);
    EXPECT(mem != MAP_FAILED, "mmap");
    EXPECT(bkd_add_mem_region(c, 0, 1 << 20, ram, 0) == 0, "ADD_MEM_REGION");
    int gt = bkd_memfd("gnttab", 4096);
    struct grant_entry_v1 *table =
        mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, gt, 0);
    EXPECT(gt >= 0 && table != MAP_FAILED, "grant table");
    EXPECT(bkd_set_grant_table(c, gt, 1, 1, 0, 0) == 0, "SET_GRANT_TABLE");

    /* The dirty log: 256 RAM pages (the 1 MiB region) and the 1-page grant table. */
    uint64_t log_size = bkd_log_size(256, 1);
    EXPECT(log_size == 40 && bkd_log_gnttab_offset(256) == 32, "log size %lu",
           (unsigned long)log_size);
    int logfd = bkd_memfd("dirty-log", log_size);
    EXPECT(logfd >= 0, "log memfd");
    int lp[2];
    EXPECT(pipe2(lp, O_CLOEXEC) == 0, "pipe");
    r = bkd_set_log(c, lp[0], 0, log_size, 256);
    EXPECT(r == -EBADF && strstr(bkd_last_error(c), "memfd"), "a pipe as the log: %d", r);
    close(lp[0]);
    close(lp[1]);
    r = bkd_set_log(c, logfd, 0, log_size, 255);
    EXPECT(r == -EINVAL && strstr(bkd_last_error(c), "does not cover"), "ram_pages: %d", r);
    r = bkd_set_log(c, logfd, 0, bkd_log_gnttab_offset(256), 256);
    EXPECT(r == -EINVAL && strstr(bkd_last_error(c), "grant-table"), "no table bits: %d", r);
    r = bkd_request_raw(c, BKD_CLEAR_LOG, NULL, 0, &logfd, 1, NULL, NULL);
    EXPECT(r == -EBADF, "CLEAR_LOG with an fd: %d", r);
    EXPECT(bkd_set_log(c, logfd, 0, log_size, 256) == 0, "SET_LOG");
    r = bkd_add_mem_region(c, 1 << 20, 4096, ram, 0);
    EXPECT(r == -EINVAL && strstr(bkd_last_error(c), "dirty log"), "region beyond: %d", r);
    uint8_t *logmap = mmap(NULL, log_size, PROT_READ | PROT_WRITE, MAP_SHARED, logfd, 0);
    EXPECT(logmap != MAP_FAILED, "mmap log");
    logmap[3] = 0x81; /* as if frames 24 and 31 were written */
    uint8_t bits[32] = {0};
    EXPECT(bkd_log_take(logmap, 0, 256, bits) == 2 && bits[3] == 0x81 && logmap[3] == 0,
           "take and clear");
    EXPECT(bkd_clear_log(c) == 0 && bkd_clear_log(c) == 0, "CLEAR_LOG");
    munmap(logmap, log_size);
    close(logfd);
    printf("dirty log: a pipe EBADF, short ram_pages and log EINVAL, a region beyond it "
           "EINVAL, taken and cleared\n");
    struct bkd_kv cfg = {0}, keys = {0};
    bkd_kv_set(&cfg, "path", argv[2]);
    EXPECT(bkd_add_device(c, 51712, BKD_DEV_BLK, &cfg, NULL, NULL) == 0, "ADD_DEVICE");
    blkif_sring_t *sring = (blkif_sring_t *)(mem + 4096);
    blkif_front_ring_t front;
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&front, sring, 4096);
    table[8].frame = 1;
    wmb();
    table[8].flags = GTF_permit_access;
    struct bkd_channel ch;
    EXPECT(bkd_channel_open(&ch, 3, 0) == 0, "eventfds");
    bkd_kv_set(&keys, "ring-ref", "8");
    bkd_kv_set(&keys, "event-channel", "3");
    uint32_t state;
    /* fd kinds: event channels must be eventfds; a pipe is refused, nothing changes. */
    int pipefd[2];
    EXPECT(pipe2(pipefd, O_CLOEXEC) == 0, "pipe");
    struct bkd_channel bad_ch = {3, pipefd[0], pipefd[1]};
    r = bkd_frontend_state(c, 51712, BKD_XB_CONNECTED, &keys, &bad_ch, 1, &state, NULL);
    EXPECT(r == -EBADF && strstr(bkd_last_error(c), "eventfd"), "pipe as a channel: %d", r);
    close(pipefd[0]);
    close(pipefd[1]);
    EXPECT(bkd_get_backend_state(c, 51712, &state, NULL) == 0 && state == BKD_XB_INIT_WAIT,
           "device left InitWait after a refused connect: %u", state);
    printf("fd rules: an unsealed memfd and a pipe refused with EBADF\n");
    EXPECT(bkd_frontend_state(c, 51712, BKD_XB_CONNECTED, &keys, &ch, 1, &state, NULL) == 0 &&
               state == BKD_XB_CONNECTED,
           "connect");
    /* Live migration: a state blob only of a suspended device; none for a connected one. */
    int sfd = bkd_memfd("state", 0);
    uint64_t ssize = 0;
    EXPECT(sfd >= 0, "state memfd");
    r = bkd_get_device_state(c, 51712, sfd, &ssize);
    EXPECT(r == -EBUSY, "GET_DEVICE_STATE of a running device: %d", r);
    EXPECT(bkd_suspend(c, BKD_ALL_DEVICES) == 0, "SUSPEND");
    EXPECT(bkd_get_device_state(c, 51712, sfd, &ssize) == 0 && ssize > 32, "GET_DEVICE_STATE");
    char magic[8];
    EXPECT(pread(sfd, magic, sizeof(magic), 0) == 8 && !memcmp(magic, "BKDSTATE", 8),
           "the blob's magic");
    r = bkd_set_device_state(c, 51712, sfd, ssize);
    EXPECT(r == -EBUSY, "SET_DEVICE_STATE on a connected device: %d", r);
    EXPECT(bkd_resume(c, 51712) == 0, "RESUME");
    close(sfd);
    printf("migration: SUSPEND, a %llu-byte state blob, RESUME\n", (unsigned long long)ssize);
    sring->req_prod = 1000; /* more requests than the ring holds */
    eventfd_write(ch.kick_fd, 1);
    struct bkd_notice n = {0};
    int got = 0;
    for (int tries = 0; tries < 20 && !got; tries++) {
        EXPECT(bkd_read_notices(c, 500) >= 0, "read notices");
        got = bkd_next_notice(c, &n);
    }
    EXPECT(got && n.code == BKD_NOTICE_FRONTEND_MISBEHAVED && n.devid == 51712 &&
               bkd_kv_get(&n.kv, "message"),
           "no FRONTEND_MISBEHAVED notice");
    printf("notice: FRONTEND_MISBEHAVED: %s\n", bkd_kv_get(&n.kv, "message"));
    bkd_kv_free(&n.kv);
    uint32_t bstate;
    EXPECT(bkd_get_backend_state(c, 51712, &bstate, NULL) == 0, "daemon still answers");

    /* Per-connection bound: memory regions until -ENOSPC; removing one makes room. */
    unsigned added = 1; /* the region at gpa 0 */
    for (;;) {
        uint64_t gpa = 0x10000000ull + (uint64_t)added * 4096;
        r = bkd_add_mem_region(c, gpa, 4096, ram, 0);
        if (r)
            break;
        added++;
        EXPECT(added < 100000, "no bound on memory regions");
    }
    EXPECT(r == -ENOSPC, "past the last region: %d", r);
    uint64_t last = 0x10000000ull + (uint64_t)(added - 1) * 4096;
    EXPECT(bkd_remove_mem_region(c, last, 4096) == 0 &&
               bkd_add_mem_region(c, last, 4096, ram, 0) == 0,
           "room after a removal");
    printf("bound: %u memory regions, then ENOSPC\n", added);

    /* No reply in time (the daemon is stopped): -ETIMEDOUT, and the client is dead. */
    EXPECT(kill(daemon, SIGSTOP) == 0, "SIGSTOP");
    bkd_set_timeout(c, 300);
    r = bkd_get_backend_state(c, 51712, &bstate, NULL);
    EXPECT(kill(daemon, SIGCONT) == 0, "SIGCONT");
    EXPECT(r == -ETIMEDOUT && bkd_is_dead(c), "stopped daemon: %d", r);
    r = bkd_get_backend_state(c, 51712, &bstate, NULL);
    EXPECT(r == -EPIPE, "call on a dead client: %d", r);
    bkd_close(c);
    printf("timeout: -ETIMEDOUT, then -EPIPE\n");

    /* The daemon going away: EOF is -ECONNRESET, later calls -EPIPE. */
    r = bkd_connect(argv[1], 0, &c);
    EXPECT(r == 0, "reconnect: %d", r);
    EXPECT(kill(daemon, SIGTERM) == 0, "SIGTERM");
    bkd_set_timeout(c, -1);
    r = bkd_read_notices(c, -1);
    EXPECT(r == -ECONNRESET && bkd_is_dead(c), "daemon gone: %d", r);
    r = bkd_get_stats(c, BKD_ALL_DEVICES, &stats);
    EXPECT(r == -EPIPE, "request after loss: %d", r);
    printf("daemon gone: -ECONNRESET, then -EPIPE\n");

    bkd_close(c);
    bkd_channel_close(&ch);
    bkd_kv_free(&cfg);
    bkd_kv_free(&keys);
    bkd_kv_free(&stats);
    munmap(table, 4096);
    munmap(mem, 1 << 20);
    close(gt);
    close(ram);
    printf("client-check: ok\n");
    return 0;
}
