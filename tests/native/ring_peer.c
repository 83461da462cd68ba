/* One half of a blkif ring driven by ring.h's own macros, for lockstep interop tests with
 * the Python ring code. The ring lives in a file both processes mmap.
 *
 *   ring_peer FILE front|back       then commands on stdin, one reply line each:
 *   attach START      FRONT_RING_ATTACH / BACK_RING_ATTACH at index START     -> "ok"
 *   front: push K     K requests, RING_PUSH_REQUESTS_AND_CHECK_NOTIFY          -> "notify N"
 *          consume    every response (RING_GET_RESPONSE)                       -> "rsp id:st:op ..."
 *          final      RING_FINAL_CHECK_FOR_RESPONSES                           -> "work N"
 *   back:  take K     up to K requests (RING_GET_REQUEST), checked             -> "req id ..."
 *          respond K  answer the K oldest, RING_PUSH_RESPONSES_AND_CHECK_NOTIFY -> "notify N"
 *          final      RING_FINAL_CHECK_FOR_REQUESTS                            -> "work N"
 * Request id n carries sector n*8, n%11+1 segments and seg[0].gref n^0x5a5a; a response
 * carries status n%3-1 and operation n%2. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* ring.h maps xen_mb/xen_rmb/xen_wmb onto these: a real fence, and compiler barriers
 * (all x86's total store order needs for read/write ordering). */
#define mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define rmb() __asm__ __volatile__("" ::: "memory")
#define wmb() __asm__ __volatile__("" ::: "memory")
#include <xen/xen.h>
#include <xen/io/blkif.h>

#define RING_BYTES 4096

static blkif_front_ring_t front;
static blkif_back_ring_t back;
static uint64_t next_id;
static uint64_t pending[1024];
static unsigned pending_head, pending_tail;

static void fill_request(blkif_request_t *req, uint64_t id)
{
    memset(req, 0, sizeof(*req));
    req->operation = BLKIF_OP_READ;
    req->id = id;
    req->sector_number = id * 8;
    req->nr_segments = id % 11 + 1;
    req->seg[0].gref = (grant_ref_t)(id ^ 0x5a5a);
    req->seg[0].last_sect = 7;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s FILE front|back\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) { perror("open"); return 1; }
    blkif_sring_t *sring = mmap(NULL, RING_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (sring == MAP_FAILED) { perror("mmap"); return 1; }
    int is_front = strcmp(argv[2], "front") == 0;
    char cmd[64];
    unsigned long arg;
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (scanf("%63s", cmd) == 1) {
        if (strcmp(cmd, "attach") == 0 && scanf("%lu", &arg) == 1) {
            if (is_front)
                FRONT_RING_ATTACH(&front, sring, (RING_IDX)arg, RING_BYTES);
            else
                BACK_RING_ATTACH(&back, sring, (RING_IDX)arg, RING_BYTES);
            printf("ok\n");
        } else if (is_front && strcmp(cmd, "push") == 0 && scanf("%lu", &arg) == 1) {
            int notify;
            for (unsigned long i = 0; i < arg && !RING_FULL(&front); i++)
                fill_request(RING_GET_REQUEST(&front, front.req_prod_pvt++), next_id++);
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, notify);
            printf("notify %d\n", notify);
        } else if (is_front && strcmp(cmd, "consume") == 0) {
            RING_IDX prod = front.sring->rsp_prod;
            xen_rmb();
            printf("rsp");
            for (; front.rsp_cons != prod; front.rsp_cons++) {
                blkif_response_t *rsp = RING_GET_RESPONSE(&front, front.rsp_cons);
                printf(" %llu:%d:%u", (unsigned long long)rsp->id, rsp->status, rsp->operation);
            }
            printf("\n");
        } else if (is_front && strcmp(cmd, "final") == 0) {
            int work;
            RING_FINAL_CHECK_FOR_RESPONSES(&front, work);
            printf("work %d\n", work ? 1 : 0);
        } else if (!is_front && strcmp(cmd, "take") == 0 && scanf("%lu", &arg) == 1) {
            RING_IDX prod = back.sring->req_prod;
            xen_rmb();
            printf("req");
            for (unsigned long n = 0; n < arg && back.req_cons != prod; n++) {
                blkif_request_t req;
                RING_COPY_REQUEST(&back, back.req_cons, &req);
                back.req_cons++;
                uint64_t id = req.id;
                if (req.sector_number != id * 8 || req.nr_segments != id % 11 + 1 ||
                    req.seg[0].gref != (grant_ref_t)(id ^ 0x5a5a))
                    printf(" bad");
                pending[pending_tail++ % 1024] = id;
                printf(" %llu", (unsigned long long)id);
            }
            printf("\n");
        } else if (!is_front && strcmp(cmd, "respond") == 0 && scanf("%lu", &arg) == 1) {
            int notify;
            for (unsigned long n = 0; n < arg && pending_head != pending_tail; n++) {
                uint64_t id = pending[pending_head++ % 1024];
                blkif_response_t *rsp = RING_GET_RESPONSE(&back, back.rsp_prod_pvt++);
                memset(rsp, 0, sizeof(*rsp));
                rsp->id = id;
                rsp->status = (int16_t)(id % 3) - 1;
                rsp->operation = id % 2;
            }
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, notify);
            printf("notify %d\n", notify);
        } else if (!is_front && strcmp(cmd, "final") == 0) {
            int work;
            RING_FINAL_CHECK_FOR_REQUESTS(&back, work);
            printf("work %d\n", work ? 1 : 0);
        } else {
            printf("error unknown command %s\n", cmd);
        }
    }
    return 0;
}
