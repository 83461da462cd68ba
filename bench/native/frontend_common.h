/* What the C frontends (blkfront_load, netfront_load) share: the guest's memory and v1
 * grant table mapped from the memfds the caller hands over, granting and revoking pages
 * as Linux's grant-table driver does, eventfd kicks, the common command-line options, the
 * ready/go protocol on stdio, and the guest's side of --socket (connect, memory, detach)
 * through the C client library.
 *
 * Each program defines `program_name` (the prefix of its error messages) and includes
 * its own ring header (xen/io/blkif.h, xen/io/netif.h) after this one.
 */
#ifndef FRONTEND_COMMON_H
#define FRONTEND_COMMON_H

#define _GNU_SOURCE
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>

/* ring.h maps xen_mb/xen_rmb/xen_wmb onto these: a real fence for mb (x86 may reorder a
 * store with a later load), compiler barriers for rmb/wmb (x86 keeps loads with loads and
 * stores with stores). */
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __asm__ __volatile__("" ::: "memory")
#define wmb() __asm__ __volatile__("" ::: "memory")
#include <xen/xen.h>
#include <xen/grant_table.h>

/* Whether the backend's rsp_prod `prod` claims more responses than front ring `r` has
 * made requests (Linux blkfront's "illegal number of responses"): the ring is corrupt. */
#define RING_RSP_PROD_BEYOND_REQUESTS(r, prod) \
    ((RING_IDX)((prod) - (r)->rsp_cons) > (RING_IDX)((r)->req_prod_pvt - (r)->rsp_cons))

#define PAGE 4096u
#define MAX_QUEUES 16
#define FAILURE_LEN 160

extern const char program_name[];

/* The guest as the caller set it up: RAM and grant table (both mapped by map_guest), and
 * the frames and grant refs set aside for this program. */
struct guest {
    int ram_fd, gnttab_fd;
    uint8_t *ram;
    size_t ram_size;
    grant_entry_v1_t *gnttab;
    size_t nr_entries;
    uint32_t gref_first, gref_count, frame_first, frame_count;
    domid_t domid;
};
extern struct guest guest;

/* Prints "PROGRAM: msg" on stderr and exits with status 2 (bad arguments). */
__attribute__((noreturn)) void die_usage(const char *msg);

static inline uint8_t *frame_addr(uint32_t frame)
{
    return guest.ram + (size_t)frame * PAGE;
}

/* What Linux's gnttab_grant_foreign_access_ref does: frame and domid, then the flags. */
void grant_access(grant_ref_t gref, uint32_t frame, bool readonly);
/* What gnttab_end_foreign_access_ref does: revoke, unless the backend still has the page
 * mapped (GTF_reading/GTF_writing); false then. */
bool end_grant(grant_ref_t gref);

/* Keeps the first failure's description in `failure` (FAILURE_LEN bytes). */
__attribute__((format(printf, 2, 3)))
void note_failure(char *failure, const char *fmt, ...);

/* Signals an eventfd once; false (errno set) when the write failed. */
bool eventfd_kick(int fd);
/* Clears an eventfd's count; false (errno set) when the read failed other than EAGAIN. */
bool eventfd_drain(int fd);

uint64_t parse_u64(const char *s, const char *what);
/* Takes --ram FD:SIZE, --gnttab FD:FRAMES, --grefs FIRST:COUNT, --frames FIRST:COUNT and
 * --domid N into `guest`; false for any other option. */
bool parse_guest_option(const char *opt, const char *value);
/* Maps the RAM and grant-table memfds, closes them, and checks that the grant refs and
 * frames set aside are inside. */
void map_guest(void);

/* --- --socket: the control plane through the C client library ----------------------- */

#define FIRST_GREF 8 /* the entries below are Xen's reserved ones */
#define FIRST_PORT 1

struct bkd_client;
struct bkd_kv;
struct bkd_channel;

/* The connection to the daemon (NULL when there is none). */
extern struct bkd_client *control;

/* A failed control request (r < 0): the daemon's message too, then exit 1 (closing the
 * connection makes the daemon drop this guest's device, grant table and memory). */
void ctl_check(int r, const char *what);
/* Sets `key` to the decimal `value`. */
void kv_setf(struct bkd_kv *kv, const char *key, uint64_t value);
/* Takes option `opt`'s KEY=VALUE into `kv` (a device's ADD_DEVICE config). */
void parse_kv_option(struct bkd_kv *kv, const char *opt, const char *value);
/* Lays out the guest (RAM: `ring_pages` ring frames, then `data_pages` data frames; grant
 * table: the rings' refs from FIRST_GREF on, then the data pages' refs), connects to
 * `socket` (HELLO with a name unique to this process), hands the daemon both memfds
 * (ADD_MEM_REGION, SET_GRANT_TABLE) and maps them here. */
void control_open(const char *socket, uint32_t ring_pages, uint64_t data_pages);
/* After the run: FRONTEND_STATE Closed for `devid`, then counts the grant entries still
 * mapped (GTF_reading/GTF_writing), REMOVE_DEVICE, REMOVE_MEM_REGION, disconnects and
 * closes the `nchannels` channels. Returns the count (none should be). */
uint64_t control_close(uint32_t devid, struct bkd_channel *ch, unsigned nchannels);

/* Prints "ready" and waits for one line on stdin; false at end of input. */
bool ready_then_wait_for_go(void);
/* This process's user plus system CPU seconds since `start` (from getrusage). */
double cpu_seconds_since(const struct rusage *start);

#endif
