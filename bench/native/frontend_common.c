/* See frontend_common.h. */
#include "frontend_common.h"

#include <errno.h>
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
