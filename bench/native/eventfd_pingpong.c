/* The latency floor for a kick and its answer: two processes bounce a count over a pair of
 * eventfds, each sleeping in poll() as the daemon and blkfront_load do.
 *
 *   eventfd_pingpong ROUNDS     prints {"rounds": N, "p50_ns": ..., "p99_ns": ..., ...}
 *
 * One round is: write the kick eventfd, the other process wakes, reads it and writes the
 * call eventfd, we wake and read it. */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Sleeps until fd is readable, then consumes its count. */
static int wait_and_read(int fd)
{
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    uint64_t v;
    for (;;) {
        int r = poll(&pfd, 1, 10000);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        if (read(fd, &v, sizeof(v)) == sizeof(v))
            return 0;
        if (errno != EAGAIN)
            return -1;
    }
}

static int kick(int fd)
{
    uint64_t one = 1;
    return write(fd, &one, sizeof(one)) == sizeof(one) ? 0 : -1;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    long rounds = argc == 2 ? strtol(argv[1], NULL, 10) : 0;
    if (rounds <= 0 || rounds > 10000000) {
        fprintf(stderr, "usage: eventfd_pingpong ROUNDS\n");
        return 2;
    }
    int ping = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int pong = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (ping < 0 || pong < 0) {
        perror("eventfd");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        for (long i = 0; i < rounds; i++)
            if (wait_and_read(ping) || kick(pong))
                _exit(1);
        _exit(0);
    }
    uint64_t *lat = calloc((size_t)rounds, sizeof(*lat));
    if (!lat)
        return 1;
    for (long i = 0; i < rounds; i++) {
        uint64_t t0 = now_ns();
        if (kick(ping) || wait_and_read(pong)) {
            fprintf(stderr, "eventfd_pingpong: the other process stopped answering\n");
            return 1;
        }
        lat[i] = now_ns() - t0;
    }
    int status;
    waitpid(child, &status, 0);
    qsort(lat, (size_t)rounds, sizeof(*lat), cmp_u64);
    printf("{\"rounds\": %ld, \"p50_ns\": %" PRIu64 ", \"p90_ns\": %" PRIu64
           ", \"p99_ns\": %" PRIu64 "}\n", rounds, lat[(rounds - 1) / 2],
           lat[(size_t)((double)(rounds - 1) * 0.9)], lat[(size_t)((double)(rounds - 1) * 0.99)]);
    free(lat);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
