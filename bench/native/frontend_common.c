/* See frontend_common.h. */
#include "frontend_common.h"

#include "backendd-client.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct guest guest = { .ram_fd = -1, .gnttab_fd = -1 };

void die_usage(const char *msg)
{
    fprintf(stderr, "%s: %s\n", program_name, msg);
    exit(2);
}

/* --- grants (what Linux's gnttab_grant_foreign_access_ref / _end_foreign_access do) -- */

void grant_access(grant_ref_t gref, uint32_t frame, bool readonly)
{
    grant_entry_v1_t *e = &guest.gnttab[gref];
    e->frame = frame;
    e->domid = guest.domid;
    wmb(); /* frame and domid are visible before the flags make the entry valid */
    __atomic_store_n(&e->flags, (uint16_t)(GTF_permit_access | (readonly ? GTF_readonly : 0)),
                     __ATOMIC_RELAXED);
}

bool end_grant(grant_ref_t gref)
{
    uint16_t *flags = &guest.gnttab[gref].flags;
    uint16_t old = __atomic_load_n(flags, __ATOMIC_RELAXED);
    do {
        if (old & (GTF_reading | GTF_writing))
            return false;
    } while (!__atomic_compare_exchange_n(flags, &old, 0, false, __ATOMIC_SEQ_CST,
                                          __ATOMIC_RELAXED));
    return true;
}

void note_failure(char *failure, const char *fmt, ...)
{
    if (failure[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(failure, FAILURE_LEN, fmt, ap);
    va_end(ap);
}

/* --- eventfds ---------------------------------------------------------------------- */

bool eventfd_kick(int fd)
{
    uint64_t one = 1;
    return write(fd, &one, sizeof(one)) == sizeof(one);
}

bool eventfd_drain(int fd)
{
    uint64_t count;
    return read(fd, &count, sizeof(count)) >= 0 || errno == EAGAIN;
}

/* --- options and the guest's memory --------------------------------------------------- */

uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s || *end)
        die_usage(what);
    return v;
}

static void parse_pair(const char *s, uint64_t *a, uint64_t *b, const char *what)
{
    char buf[64];
    const char *colon = strchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof(buf))
        die_usage(what);
    memcpy(buf, s, (size_t)(colon - s));
    buf[colon - s] = 0;
    *a = parse_u64(buf, what);
    *b = parse_u64(colon + 1, what);
}

bool parse_guest_option(const char *opt, const char *v)
{
    uint64_t a, b;
    if (!strcmp(opt, "--ram")) {
        parse_pair(v, &a, &b, "--ram FD:SIZE");
        guest.ram_fd = (int)a;
        guest.ram_size = b;
    } else if (!strcmp(opt, "--gnttab")) {
        parse_pair(v, &a, &b, "--gnttab FD:FRAMES");
        guest.gnttab_fd = (int)a;
        guest.nr_entries = b * PAGE / sizeof(grant_entry_v1_t);
    } else if (!strcmp(opt, "--grefs")) {
        parse_pair(v, &a, &b, "--grefs FIRST:COUNT");
        guest.gref_first = (uint32_t)a;
        guest.gref_count = (uint32_t)b;
    } else if (!strcmp(opt, "--frames")) {
        parse_pair(v, &a, &b, "--frames FIRST:COUNT");
        guest.frame_first = (uint32_t)a;
        guest.frame_count = (uint32_t)b;
    } else if (!strcmp(opt, "--domid")) {
        guest.domid = (domid_t)parse_u64(v, "--domid");
    } else {
        return false;
    }
    return true;
}

void map_guest(void)
{
    guest.ram = mmap(NULL, guest.ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, guest.ram_fd, 0);
    if (guest.ram == MAP_FAILED) {
        fprintf(stderr, "%s: mmap guest RAM: %s\n", program_name, strerror(errno));
        exit(1);
    }
    guest.gnttab = mmap(NULL, guest.nr_entries * sizeof(grant_entry_v1_t),
                        PROT_READ | PROT_WRITE, MAP_SHARED, guest.gnttab_fd, 0);
    if (guest.gnttab == MAP_FAILED) {
        fprintf(stderr, "%s: mmap grant table: %s\n", program_name, strerror(errno));
        exit(1);
    }
    close(guest.ram_fd);
    close(guest.gnttab_fd);
    if ((uint64_t)guest.gref_first + guest.gref_count > guest.nr_entries)
        die_usage("--grefs beyond the grant table");
    if (((uint64_t)guest.frame_first + guest.frame_count) * PAGE > guest.ram_size)
        die_usage("--frames beyond guest RAM");
}

/* --- the protocol on stdio ----------------------------------------------------------- */

bool ready_then_wait_for_go(void)
{
    printf("ready\n");
    fflush(stdout);
    char line[16];
    return fgets(line, sizeof(line), stdin) != NULL;
}

double cpu_seconds_since(const struct rusage *start)
{
    struct rusage now;
    getrusage(RUSAGE_SELF, &now);
    return (double)(now.ru_utime.tv_sec - start->ru_utime.tv_sec + now.ru_stime.tv_sec -
                    start->ru_stime.tv_sec) +
           (double)(now.ru_utime.tv_usec - start->ru_utime.tv_usec + now.ru_stime.tv_usec -
                    start->ru_stime.tv_usec) / 1e6;
}

/* --- --socket ----------------------------------------------------------------------- */

struct bkd_client *control;

void ctl_check(int r, const char *what)
{
    if (r >= 0)
        return;
    fprintf(stderr, "%s: %s: %s (%s)\n", program_name, what, strerror(-r),
            control ? bkd_last_error(control) : "");
    exit(1);
}

void kv_setf(struct bkd_kv *kv, const char *key, uint64_t value)
{
    char v[24];
    snprintf(v, sizeof(v), "%" PRIu64, value);
    ctl_check(bkd_kv_set(kv, key, v), "key/value map");
}

void parse_kv_option(struct bkd_kv *kv, const char *opt, const char *value)
{
    const char *eq = strchr(value, '=');
    char key[BKD_KV_MAX_KEY + 1], msg[64];
    if (!eq || eq == value || (size_t)(eq - value) > BKD_KV_MAX_KEY) {
        snprintf(msg, sizeof(msg), "%s KEY=VALUE", opt);
        die_usage(msg);
    }
    memcpy(key, value, (size_t)(eq - value));
    key[eq - value] = 0;
    if (bkd_kv_set(kv, key, eq + 1)) {
        snprintf(msg, sizeof(msg), "%s KEY=VALUE: too long", opt);
        die_usage(msg);
    }
}

void control_open(const char *socket, uint32_t ring_pages, uint64_t data_pages)
{
    uint64_t entries = FIRST_GREF + ring_pages + data_pages;
    uint32_t gt_frames = (uint32_t)((entries + bkd_gnttab_entries_per_frame(1) - 1) /
                                    bkd_gnttab_entries_per_frame(1));
    guest.ram_size = (size_t)(ring_pages + data_pages) * PAGE;
    guest.nr_entries = (size_t)gt_frames * bkd_gnttab_entries_per_frame(1);
    guest.frame_first = ring_pages;
    guest.frame_count = (uint32_t)data_pages;
    guest.gref_first = FIRST_GREF + ring_pages;
    guest.gref_count = (uint32_t)data_pages;

    struct bkd_kv info = {0};
    char name[64]; /* a guest's name is unique among the daemon's connections */
    snprintf(name, sizeof(name), "%s-%d", program_name, (int)getpid());
    ctl_check(bkd_kv_set(&info, "name", name), "key/value map");
    ctl_check(bkd_connect_info(socket, 0, &info, &control), "connect and HELLO");
    bkd_kv_free(&info);
    ctl_check(guest.ram_fd = bkd_memfd("guest-ram", guest.ram_size), "guest RAM memfd");
    ctl_check(guest.gnttab_fd = bkd_memfd("guest-gnttab", (uint64_t)gt_frames * PAGE),
              "grant table memfd");
    ctl_check(bkd_add_mem_region(control, 0, guest.ram_size, guest.ram_fd, 0),
              "ADD_MEM_REGION");
    ctl_check(bkd_set_grant_table(control, guest.gnttab_fd, 1, gt_frames, 0, guest.domid),
              "SET_GRANT_TABLE");
    map_guest(); /* and closes the memfds: the daemon has its own */
}

uint64_t control_close(uint32_t devid, struct bkd_channel *ch, unsigned nchannels)
{
    uint64_t held = 0;
    ctl_check(bkd_frontend_state(control, devid, BKD_XB_CLOSED, NULL, NULL, 0, NULL, NULL),
              "FRONTEND_STATE Closed");
    for (size_t g = 0; g < guest.nr_entries; g++)
        if (__atomic_load_n(&guest.gnttab[g].flags, __ATOMIC_ACQUIRE) &
            (GTF_reading | GTF_writing))
            held++;
    ctl_check(bkd_remove_device(control, devid), "REMOVE_DEVICE");
    ctl_check(bkd_remove_mem_region(control, 0, guest.ram_size), "REMOVE_MEM_REGION");
    bkd_close(control);
    control = NULL;
    for (unsigned i = 0; i < nchannels; i++)
        bkd_channel_close(&ch[i]);
    return held;
}
