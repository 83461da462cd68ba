/* backendd-client: the VMM side of backendd's control protocol (docs/protocol.md).
 *
 * A small, dependency-free C library (libc only) for VMMs that hand a guest's memory,
 * grant table and PV devices to backendd over its unix socket. One `struct bkd_client`
 * is one connection, which is one guest. Calls are synchronous: each request is sent and
 * its reply awaited; notices that arrive in between are queued and handed out by
 * bkd_next_notice(). A client is not thread-safe: serialise calls on one client.
 *
 * Return values: 0 (or a count, where stated) on success, -errno on failure.
 *  - An error reply from the daemon returns its -errno; bkd_last_error() gives the
 *    daemon's message. The connection carries on.
 *  - A transport or framing failure (daemon gone, malformed reply, fds where none may
 *    come, no reply within bkd_set_timeout) returns -errno (-ECONNRESET, -EPROTO,
 *    -ETIMEDOUT, or the failed send's) and marks the client dead: every later
 *    call returns -EPIPE. Close it and reconnect (protocol.md, SET_INFLIGHT: the replay
 *    after a restart).
 *
 * File descriptors passed in are never closed by the library: the daemon receives its own
 * copies (SCM_RIGHTS), so the caller may close its fds once the call returns.
 */
#ifndef BACKENDD_CLIENT_H
#define BACKENDD_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BKD_PROTOCOL_VERSION 1
#define BKD_HEADER_SIZE 16
#define BKD_MAX_PAYLOAD 65536
#define BKD_MAX_CHANNELS 32
#define BKD_KV_MAX_KEY 256
#define BKD_KV_MAX_VALUE 4096
#define BKD_ALL_DEVICES 0xFFFFFFFFu
#define BKD_PAGE_SIZE 4096u

/* Header flags. */
#define BKD_FLAG_VERSION_MASK 0x3u
#define BKD_FLAG_REPLY 0x4u
#define BKD_FLAG_NOTICE 0x8u

enum bkd_code {
    BKD_HELLO = 1,
    BKD_ADD_MEM_REGION = 2,
    BKD_REMOVE_MEM_REGION = 3,
    BKD_SET_GRANT_TABLE = 4,
    BKD_ADD_DEVICE = 5,
    BKD_REMOVE_DEVICE = 6,
    BKD_FRONTEND_STATE = 7,
    BKD_GET_BACKEND_STATE = 8,
    BKD_GET_STATS = 9,
    BKD_DAEMON_STATUS = 10,
    BKD_RING_DUMP = 11,
    BKD_SET_INFLIGHT = 12,
    BKD_SET_LOG = 13,
    BKD_CLEAR_LOG = 14,
    BKD_SUSPEND = 15,
    BKD_RESUME = 16,
    BKD_GET_DEVICE_STATE = 17,
    BKD_SET_DEVICE_STATE = 18,
    BKD_NOTICE_DEVICE_FAILED = 0x100,
    BKD_NOTICE_FRONTEND_MISBEHAVED = 0x101,
    BKD_NOTICE_KEYS_CHANGED = 0x102,
};

enum bkd_device_type { BKD_DEV_BLK = 1, BKD_DEV_NET = 2 };

/* xenbus states, as in xen/io/xenbus.h. */
enum bkd_xenbus_state {
    BKD_XB_UNKNOWN = 0,
    BKD_XB_INITIALISING = 1,
    BKD_XB_INIT_WAIT = 2,
    BKD_XB_INITIALISED = 3,
    BKD_XB_CONNECTED = 4,
    BKD_XB_CLOSING = 5,
    BKD_XB_CLOSED = 6,
    BKD_XB_RECONFIGURING = 7,
    BKD_XB_RECONFIGURED = 8,
};

/* --- key/value maps ---------------------------------------------------------------- */

/* An owned map of UTF-8 keys and values, NUL-terminated copies. Zero-initialise it
 * (`struct bkd_kv map = {0};`) and free it with bkd_kv_free(). */
struct bkd_kv_pair {
    char *key;
    char *value;
};

struct bkd_kv {
    size_t count;
    size_t cap;
    struct bkd_kv_pair *pairs;
};

/* Add `key`, or replace its value. -EINVAL if the key is empty or either text is too
 * long (key 1..256 bytes, value 0..4096 bytes); -ENOMEM. */
int bkd_kv_set(struct bkd_kv *map, const char *key, const char *value);
/* The value of `key`, or NULL. */
const char *bkd_kv_get(const struct bkd_kv *map, const char *key);
/* Parse `key` as a decimal u64 into *out: 0, -ENOENT (missing) or -EINVAL. */
int bkd_kv_get_u64(const struct bkd_kv *map, const char *key, uint64_t *out);
void bkd_kv_clear(struct bkd_kv *map);
void bkd_kv_free(struct bkd_kv *map);

/* --- the client ------------------------------------------------------------------ */

struct bkd_client;

/* Connect to the daemon's socket and do HELLO with `features` (0: none are defined).
 * On success *out is a new client; on failure *out is NULL and the result is -errno
 * (an error reply to HELLO is returned as its -errno). */
int bkd_connect(const char *socket_path, uint64_t features, struct bkd_client **out);
/* The same over an already connected AF_UNIX SOCK_STREAM socket, which the client takes
 * over (it is closed by bkd_close, or here on failure). */
int bkd_connect_fd(int sock, uint64_t features, struct bkd_client **out);
/* Both with HELLO's optional map (`info`, NULL or empty: the 12-byte HELLO), e.g.
 * {"name": "vm1"} to name the guest in the daemon's status and metrics. */
int bkd_connect_info(const char *socket_path, uint64_t features, const struct bkd_kv *info,
                     struct bkd_client **out);
int bkd_connect_fd_info(int sock, uint64_t features, const struct bkd_kv *info,
                        struct bkd_client **out);
/* Close the socket and free everything; queued notices are dropped. NULL is allowed.
 * The daemon then removes this guest's devices, grant table and memory. */
void bkd_close(struct bkd_client *c);

/* The socket, to poll for readability (notices) in the VMM's own event loop; then call
 * bkd_read_notices(c, 0). Never read from or write to it directly. */
int bkd_socket(const struct bkd_client *c);
/* The accepted features from HELLO's reply, and the daemon's protocol version. */
uint64_t bkd_features(const struct bkd_client *c);
uint32_t bkd_version(const struct bkd_client *c);
/* The daemon's message for the last error reply (or a description of the last transport
 * failure); "" if none. Valid until the next call on this client. */
const char *bkd_last_error(const struct bkd_client *c);
/* Non-zero once a transport or framing failure ended the connection. */
int bkd_is_dead(const struct bkd_client *c);

/* Per-request timeout in milliseconds for waiting on a reply (-1: forever, the default).
 * A timeout returns -ETIMEDOUT and marks the client dead (the reply would arrive later,
 * out of step). */
void bkd_set_timeout(struct bkd_client *c, int timeout_ms);

/* --- requests (docs/protocol.md, "Message layouts") ------------------------------ */

/* ADD_MEM_REGION: gpa, size and mmap_offset page-aligned (4096), size > 0. */
int bkd_add_mem_region(struct bkd_client *c, uint64_t gpa, uint64_t size, int fd,
                       uint64_t mmap_offset);
int bkd_remove_mem_region(struct bkd_client *c, uint64_t gpa, uint64_t size);

/* SET_GRANT_TABLE: version 1 or 2, nr_frames > 0, mmap_offset page-aligned. Send again
 * with more frames to grow the table (same memory: see protocol.md). */
int bkd_set_grant_table(struct bkd_client *c, int fd, uint32_t version, uint32_t nr_frames,
                        uint64_t mmap_offset, uint16_t backend_domid);

/* ADD_DEVICE: type BKD_DEV_BLK or BKD_DEV_NET. *state (may be NULL) gets the backend's
 * xenbus state, `keys` (may be NULL; cleared first) the keys to write under the
 * backend's xenstore directory. */
int bkd_add_device(struct bkd_client *c, uint32_t devid, uint32_t type,
                   const struct bkd_kv *config, uint32_t *state, struct bkd_kv *keys);
int bkd_remove_device(struct bkd_client *c, uint32_t devid);

/* One event channel: its port and the two eventfds (docs/protocol.md, "Event channels"). */
struct bkd_channel {
    uint32_t port;
    int kick_fd; /* guest -> daemon */
    int call_fd; /* daemon -> guest */
};

/* FRONTEND_STATE: the frontend's state and flat keys, and `nr` channels (0..32); the
 * fds go as kick0, call0, kick1, call1, ... in the order of `channels`. */
int bkd_frontend_state(struct bkd_client *c, uint32_t devid, uint32_t frontend_state,
                       const struct bkd_kv *frontend_keys,
                       const struct bkd_channel *channels, uint32_t nr,
                       uint32_t *backend_state, struct bkd_kv *backend_keys);
int bkd_get_backend_state(struct bkd_client *c, uint32_t devid, uint32_t *state,
                          struct bkd_kv *keys);
/* GET_STATS: keys "<devid>.<counter>", decimal values; devid BKD_ALL_DEVICES for all. */
int bkd_get_stats(struct bkd_client *c, uint32_t devid, struct bkd_kv *counters);
/* SET_INFLIGHT: after ADD_DEVICE, before the frontend connects. */
int bkd_set_inflight(struct bkd_client *c, uint32_t devid, int fd, uint64_t mmap_offset,
                     uint64_t size);

/* SET_LOG: log the guest pages the daemon writes in the bitmap at mmap_offset (page-
 * aligned) of `fd`, a sealed memfd (bkd_memfd) of at least mmap_offset + size bytes;
 * bkd_log_size() gives the size for `ram_pages` and the grant table's pages. Sent again,
 * it replaces the log. CLEAR_LOG: logging off. docs/protocol.md, "Dirty log". */
int bkd_set_log(struct bkd_client *c, int fd, uint64_t mmap_offset, uint64_t size,
                uint64_t ram_pages);
int bkd_clear_log(struct bkd_client *c);

/* Live migration (docs/protocol.md, "Live migration"). SUSPEND / RESUME one device or
 * BKD_ALL_DEVICES. GET_DEVICE_STATE writes a suspended device's state blob at offset 0
 * of memfd `fd` (bkd_memfd; grown as needed) and sets *size. SET_DEVICE_STATE hands the
 * first `size` bytes of memfd `fd` to a device added and not connected yet. */
int bkd_suspend(struct bkd_client *c, uint32_t devid);
int bkd_resume(struct bkd_client *c, uint32_t devid);
int bkd_get_device_state(struct bkd_client *c, uint32_t devid, int fd, uint64_t *size);
int bkd_set_device_state(struct bkd_client *c, uint32_t devid, int fd, uint64_t size);

/* Any request, raw: `payload` of `len` bytes and `nfds` fds. On result 0 the reply body
 * (after the i32 result) is copied to *body (malloc'd, caller frees; may be NULL when
 * empty) and its length to *body_len. For tests and for codes this header does not wrap. */
int bkd_request_raw(struct bkd_client *c, uint32_t code, const void *payload, size_t len,
                    const int *fds, size_t nfds, uint8_t **body, size_t *body_len);

/* --- notices ----------------------------------------------------------------------- */

struct bkd_notice {
    uint32_t code;    /* BKD_NOTICE_* */
    uint32_t devid;
    int32_t error;    /* DEVICE_FAILED: -errno; else 0 */
    uint32_t state;   /* KEYS_CHANGED: backend xenbus state; else 0 */
    struct bkd_kv kv; /* KEYS_CHANGED: the keys; others: {"message": ...} */
};

/* Read what the socket has (waiting up to timeout_ms, 0: not at all, -1: forever) and
 * queue the notices. Returns how many notices are queued, or -errno. */
int bkd_read_notices(struct bkd_client *c, int timeout_ms);
/* Pop the oldest queued notice into *out (caller frees out->kv): 1, or 0 if none. */
int bkd_next_notice(struct bkd_client *c, struct bkd_notice *out);

/* --- resources a VMM hands over ---------------------------------------------------- */

/* A memfd of `size` bytes (zero-filled) for guest RAM, a grant table or an in-flight
 * table: MFD_CLOEXEC | MFD_ALLOW_SEALING, then F_SEAL_SHRINK so the daemon's mappings can
 * never lose their pages. It may still grow (ftruncate), as a growing grant table needs.
 * Returns the fd or -errno. */
int bkd_memfd(const char *name, uint64_t size);
/* An eventfd for one end of an event channel: eventfd(0, EFD_CLOEXEC | flags). The flags
 * are the VMM's choice and the daemon never changes them; EFD_NONBLOCK is recommended
 * (protocol.md, "What a VMM must do"). Returns the fd or -errno. */
int bkd_eventfd(int flags);
/* A kick/call eventfd pair for `port`: 0 or -errno (nothing left open on failure). */
int bkd_channel_open(struct bkd_channel *ch, uint32_t port, int flags);
void bkd_channel_close(struct bkd_channel *ch);

/* Sizes from docs/protocol.md. */
uint32_t bkd_gnttab_entries_per_frame(uint32_t version); /* 512 (v1) or 256 (v2) */
uint32_t bkd_gnttab_status_frames(uint32_t nr_frames);   /* v2 status frames */
uint64_t bkd_inflight_size(uint32_t nr_queues);          /* page-rounded */
/* The dirty log: its grant-table bits start at byte bkd_log_gnttab_offset(ram_pages);
 * bkd_log_size covers both, in whole 64-bit words. */
uint64_t bkd_log_gnttab_offset(uint64_t ram_pages);
uint64_t bkd_log_size(uint64_t ram_pages, uint64_t gnttab_pages);
/* Read and clear bits [0, nbits) of the log mapped at `log` + byte_offset (8-aligned),
 * with an atomic exchange per 64-bit word, so no bit the daemon sets meanwhile is lost;
 * `out` (NULL, or ceil(nbits / 8) bytes) gets them. Returns how many were set. */
uint64_t bkd_log_take(void *log, uint64_t byte_offset, uint64_t nbits, uint8_t *out);

#ifdef __cplusplus
}
#endif

#endif /* BACKENDD_CLIENT_H */
