/* backendd-client: the VMM side of backendd's control protocol. docs/protocol.md is the
 * specification; each function below names the rule it follows. libc only. */
#define _GNU_SOURCE
#include "backendd-client.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef F_ADD_SEALS
#define F_ADD_SEALS 1033
#endif
#ifndef F_SEAL_SHRINK
#define F_SEAL_SHRINK 0x0002
#endif
#ifndef MFD_ALLOW_SEALING
#define MFD_ALLOW_SEALING 0x0002U
#endif

/* Wire limit on fds per message: 2 per channel, 32 channels. */
#define MAX_FDS (2 * BKD_MAX_CHANNELS)
#define INFLIGHT_HEADER 64u
#define INFLIGHT_QUEUE_BYTES 131136u

struct notice_node {
    struct notice_node *next;
    struct bkd_notice notice;
};

struct bkd_client {
    int sock;
    int dead;
    int timeout_ms;
    uint32_t seq;
    uint32_t version;
    uint64_t features;
    /* Received bytes not yet framed: at most one header and one payload. */
    uint8_t *buf;
    size_t buf_len;
    struct notice_node *notices_head, *notices_tail;
    size_t nr_notices;
    char error[512];
};

/* --- little-endian packing (the wire is little-endian whatever the host is) ---------- */

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void set_error(struct bkd_client *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void set_error(struct bkd_client *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof(c->error), fmt, ap);
    va_end(ap);
}

static int die(struct bkd_client *c, int err, const char *what)
{
    c->dead = 1;
    set_error(c, "connection lost: %s", what);
    return err;
}

/* --- key/value maps ---------------------------------------------------------------- */

int bkd_kv_set(struct bkd_kv *map, const char *key, const char *value)
{
    size_t klen = strlen(key), vlen = strlen(value);
    if (klen == 0 || klen > BKD_KV_MAX_KEY || vlen > BKD_KV_MAX_VALUE)
        return -EINVAL;
    char *v = strdup(value);
    if (!v)
        return -ENOMEM;
    for (size_t i = 0; i < map->count; i++) {
        if (strcmp(map->pairs[i].key, key) == 0) {
            free(map->pairs[i].value);
            map->pairs[i].value = v;
            return 0;
        }
    }
    if (map->count == map->cap) {
        size_t cap = map->cap ? map->cap * 2 : 8;
        struct bkd_kv_pair *p = realloc(map->pairs, cap * sizeof(*p));
        if (!p) {
            free(v);
            return -ENOMEM;
        }
        map->pairs = p;
        map->cap = cap;
    }
    char *k = strdup(key);
    if (!k) {
        free(v);
        return -ENOMEM;
    }
    map->pairs[map->count].key = k;
    map->pairs[map->count].value = v;
    map->count++;
    return 0;
}

const char *bkd_kv_get(const struct bkd_kv *map, const char *key)
{
    for (size_t i = 0; i < map->count; i++)
        if (strcmp(map->pairs[i].key, key) == 0)
            return map->pairs[i].value;
    return NULL;
}

int bkd_kv_get_u64(const struct bkd_kv *map, const char *key, uint64_t *out)
{
    const char *v = bkd_kv_get(map, key);
    if (!v)
        return -ENOENT;
    if (!*v || strlen(v) > 20)
        return -EINVAL;
    uint64_t n = 0;
    for (const char *p = v; *p; p++) {
        if (*p < '0' || *p > '9')
            return -EINVAL;
        uint64_t d = (uint64_t)(*p - '0');
        if (n > (UINT64_MAX - d) / 10)
            return -EINVAL;
        n = n * 10 + d;
    }
    *out = n;
    return 0;
}

void bkd_kv_clear(struct bkd_kv *map)
{
    for (size_t i = 0; i < map->count; i++) {
        free(map->pairs[i].key);
        free(map->pairs[i].value);
    }
    map->count = 0;
}

void bkd_kv_free(struct bkd_kv *map)
{
    if (!map)
        return;
    bkd_kv_clear(map);
    free(map->pairs);
    map->pairs = NULL;
    map->cap = 0;
}

/* Encoded size of a map: u32 count, then per pair u16 key_len, u16 value_len, bytes. */
static size_t kv_encoded_size(const struct bkd_kv *map)
{
    size_t n = 4;
    for (size_t i = 0; map && i < map->count; i++)
        n += 4 + strlen(map->pairs[i].key) + strlen(map->pairs[i].value);
    return n;
}

static uint8_t *kv_encode(const struct bkd_kv *map, uint8_t *p)
{
    put32(p, map ? (uint32_t)map->count : 0);
    p += 4;
    for (size_t i = 0; map && i < map->count; i++) {
        size_t kl = strlen(map->pairs[i].key), vl = strlen(map->pairs[i].value);
        put16(p, (uint16_t)kl);
        put16(p + 2, (uint16_t)vl);
        memcpy(p + 4, map->pairs[i].key, kl);
        memcpy(p + 4 + kl, map->pairs[i].value, vl);
        p += 4 + kl + vl;
    }
    return p;
}

/* Decode a map at data[*off..len); advances *off. -EBADMSG if it runs past the data,
 * -EINVAL for NUL, an empty or long key, a long value, or a duplicate key. */
static int kv_decode(const uint8_t *data, size_t len, size_t *off, struct bkd_kv *out)
{
    size_t o = *off;
    if (len - o < 4)
        return -EBADMSG;
    uint32_t count = get32(data + o);
    o += 4;
    if ((uint64_t)count * 4 > len - o)
        return -EBADMSG;
    for (uint32_t i = 0; i < count; i++) {
        if (len - o < 4)
            return -EBADMSG;
        size_t kl = get16(data + o), vl = get16(data + o + 2);
        o += 4;
        if (kl + vl > len - o)
            return -EBADMSG;
        if (kl == 0 || kl > BKD_KV_MAX_KEY || vl > BKD_KV_MAX_VALUE ||
            memchr(data + o, 0, kl + vl))
            return -EINVAL;
        char key[BKD_KV_MAX_KEY + 1];
        char *value = malloc(vl + 1);
        if (!value)
            return -ENOMEM;
        memcpy(key, data + o, kl);
        key[kl] = 0;
        memcpy(value, data + o + kl, vl);
        value[vl] = 0;
        o += kl + vl;
        int r = bkd_kv_get(out, key) ? -EINVAL : bkd_kv_set(out, key, value);
        free(value);
        if (r)
            return r;
    }
    *off = o;
    return 0;
}

static int kv_check(const struct bkd_kv *map)
{
    for (size_t i = 0; map && i < map->count; i++) {
        size_t kl = strlen(map->pairs[i].key), vl = strlen(map->pairs[i].value);
        if (kl == 0 || kl > BKD_KV_MAX_KEY || vl > BKD_KV_MAX_VALUE)
            return -EINVAL;
        for (size_t j = 0; j < i; j++)
            if (strcmp(map->pairs[i].key, map->pairs[j].key) == 0)
                return -EINVAL;
    }
    return 0;
}

/* --- transport --------------------------------------------------------------------- */

/* Send one whole message. Rule (protocol.md, "File descriptors"): the fds ride on the
 * sendmsg() that carries the header's first byte, and that call carries no bytes of a
 * later message: we send exactly one message per call, and any rest without fds. */
static int send_message(struct bkd_client *c, const uint8_t *msg, size_t len, const int *fds,
                        size_t nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } control;
    size_t sent = 0;
    while (sent < len) {
        struct iovec iov = {.iov_base = (void *)(msg + sent), .iov_len = len - sent};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
        if (sent == 0 && nfds) {
            memset(&control, 0, sizeof(control));
            mh.msg_control = control.buf;
            mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
            struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
            cm->cmsg_level = SOL_SOCKET;
            cm->cmsg_type = SCM_RIGHTS;
            cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
            memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
        }
        ssize_t n = sendmsg(c->sock, &mh, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                struct pollfd p = {.fd = c->sock, .events = POLLOUT};
                if (poll(&p, 1, c->timeout_ms) == 0)
                    return die(c, -ETIMEDOUT, "send timed out");
                continue;
            }
            int e = errno;
            return die(c, -e, strerror(e));
        }
        sent += (size_t)n;
    }
    return 0;
}

/* Read once from the socket into the buffer (waiting up to timeout_ms). The daemon never
 * sends fds: any that arrive are closed and end the connection. Returns bytes read (> 0),
 * 0 on timeout, or -errno (connection dead). */
static int fill(struct bkd_client *c, int timeout_ms)
{
    struct pollfd p = {.fd = c->sock, .events = POLLIN};
    int r;
    do
        r = poll(&p, 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        int e = errno;
        return die(c, -e, strerror(e));
    }
    if (r == 0)
        return 0;
    size_t want = BKD_HEADER_SIZE + BKD_MAX_PAYLOAD - c->buf_len;
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } control;
    struct iovec iov = {.iov_base = c->buf + c->buf_len, .iov_len = want};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = sizeof(control.buf)};
    ssize_t n;
    do
        n = recvmsg(c->sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        int e = errno;
        return die(c, -e, strerror(e));
    }
    int got_fds = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
            size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            int fds[MAX_FDS];
            if (k > MAX_FDS)
                k = MAX_FDS;
            memcpy(fds, CMSG_DATA(cm), k * sizeof(int));
            for (size_t i = 0; i < k; i++)
                close(fds[i]);
            got_fds = 1;
        }
    }
    if (got_fds || (mh.msg_flags & MSG_CTRUNC))
        return die(c, -EPROTO, "the daemon sent file descriptors");
    if (n == 0)
        return die(c, -ECONNRESET, "the daemon closed the connection");
    c->buf_len += (size_t)n;
    return (int)n;
}

static void queue_notice(struct bkd_client *c, struct notice_node *node)
{
    node->next = NULL;
    if (c->notices_tail)
        c->notices_tail->next = node;
    else
        c->notices_head = node;
    c->notices_tail = node;
    c->nr_notices++;
}

/* Decode a notice payload (protocol.md: DEVICE_FAILED, FRONTEND_MISBEHAVED, KEYS_CHANGED). */
static int decode_notice(uint32_t code, const uint8_t *p, size_t len, struct bkd_notice *n)
{
    memset(n, 0, sizeof(*n));
    n->code = code;
    size_t off;
    switch (code) {
    case BKD_NOTICE_DEVICE_FAILED:
        if (len < 8)
            return -EBADMSG;
        n->devid = get32(p);
        n->error = (int32_t)get32(p + 4);
        if (n->error >= 0)
            return -EINVAL;
        off = 8;
        break;
    case BKD_NOTICE_FRONTEND_MISBEHAVED:
        if (len < 4)
            return -EBADMSG;
        n->devid = get32(p);
        off = 4;
        break;
    case BKD_NOTICE_KEYS_CHANGED:
        if (len < 8)
            return -EBADMSG;
        n->devid = get32(p);
        n->state = get32(p + 4);
        if (n->state > BKD_XB_RECONFIGURED)
            return -EINVAL;
        off = 8;
        break;
    default:
        return -EPROTO;
    }
    int r = kv_decode(p, len, &off, &n->kv);
    if (r == 0 && off != len)
        r = -EBADMSG;
    if (r)
        bkd_kv_free(&n->kv);
    return r;
}

/* Take every whole message out of the buffer. Notices are queued; the reply to
 * (want_code, want_seq), if complete, is returned through *reply (malloc'd payload).
 * Any header that breaks a rule ends the connection (the stream cannot be resynced). */
static int drain(struct bkd_client *c, uint32_t want_code, uint32_t want_seq,
                 uint8_t **reply, size_t *reply_len)
{
    while (c->buf_len >= BKD_HEADER_SIZE) {
        uint32_t code = get32(c->buf), flags = get32(c->buf + 4);
        uint32_t size = get32(c->buf + 8), seq = get32(c->buf + 12);
        uint32_t kind = flags & (BKD_FLAG_REPLY | BKD_FLAG_NOTICE);
        if ((flags & BKD_FLAG_VERSION_MASK) != BKD_PROTOCOL_VERSION ||
            (flags & ~(BKD_FLAG_VERSION_MASK | BKD_FLAG_REPLY | BKD_FLAG_NOTICE)) ||
            (kind != BKD_FLAG_REPLY && kind != BKD_FLAG_NOTICE) || size > BKD_MAX_PAYLOAD)
            return die(c, -EPROTO, "malformed header from the daemon");
        if (c->buf_len < BKD_HEADER_SIZE + size)
            return 0;
        const uint8_t *payload = c->buf + BKD_HEADER_SIZE;
        if (kind == BKD_FLAG_NOTICE) {
            struct notice_node *node = calloc(1, sizeof(*node));
            if (!node)
                return die(c, -ENOMEM, "out of memory");
            int r = decode_notice(code, payload, size, &node->notice);
            if (r == -EPROTO) {
                free(node); /* a notice code this library does not know: skipped */
            } else if (r) {
                free(node);
                return die(c, -EPROTO, "malformed notice from the daemon");
            } else {
                queue_notice(c, node);
            }
        } else {
            if (!reply || code != want_code || seq != want_seq)
                return die(c, -EPROTO, "reply that answers no request");
            *reply = malloc(size ? size : 1);
            if (!*reply)
                return die(c, -ENOMEM, "out of memory");
            memcpy(*reply, payload, size);
            *reply_len = size;
        }
        c->buf_len -= BKD_HEADER_SIZE + size;
        memmove(c->buf, c->buf + BKD_HEADER_SIZE + size, c->buf_len);
        if (kind == BKD_FLAG_REPLY)
            return 1;
    }
    return 0;
}

int bkd_request_raw(struct bkd_client *c, uint32_t code, const void *payload, size_t len,
                    const int *fds, size_t nfds, uint8_t **body, size_t *body_len)
{
    if (body)
        *body = NULL;
    if (body_len)
        *body_len = 0;
    c->error[0] = 0;
    if (c->dead) {
        set_error(c, "connection lost earlier");
        return -EPIPE;
    }
    if (len > BKD_MAX_PAYLOAD || nfds > MAX_FDS)
        return -EMSGSIZE;
    uint8_t *msg = malloc(BKD_HEADER_SIZE + len);
    if (!msg)
        return -ENOMEM;
    uint32_t seq = ++c->seq;
    put32(msg, code);
    put32(msg + 4, BKD_PROTOCOL_VERSION);
    put32(msg + 8, (uint32_t)len);
    put32(msg + 12, seq);
    if (len)
        memcpy(msg + BKD_HEADER_SIZE, payload, len);
    int r = send_message(c, msg, BKD_HEADER_SIZE + len, fds, nfds);
    free(msg);
    if (r)
        return r;
    uint8_t *reply = NULL;
    size_t rlen = 0;
    for (;;) {
        r = drain(c, code, seq, &reply, &rlen);
        if (r < 0)
            return r;
        if (r == 1)
            break;
        r = fill(c, c->timeout_ms);
        if (r < 0)
            return r;
        if (r == 0)
            return die(c, -ETIMEDOUT, "no reply in time");
    }
    /* Reply payload: i32 result, then the body (0) or u32 length + message (-errno). */
    if (rlen < 4) {
        free(reply);
        return die(c, -EPROTO, "reply without a result");
    }
    int32_t result = (int32_t)get32(reply);
    if (result > 0) {
        free(reply);
        return die(c, -EPROTO, "reply with a positive result");
    }
    if (result < 0) {
        uint32_t mlen = rlen >= 8 ? get32(reply + 4) : 0;
        if (rlen < 8 || mlen != rlen - 8) {
            free(reply);
            return die(c, -EPROTO, "error reply with a bad message length");
        }
        size_t keep = mlen < sizeof(c->error) - 1 ? mlen : sizeof(c->error) - 1;
        memcpy(c->error, reply + 8, keep);
        c->error[keep] = 0;
        free(reply);
        return result;
    }
    if (body && rlen > 4) {
        *body = malloc(rlen - 4);
        if (!*body) {
            free(reply);
            return -ENOMEM;
        }
        memcpy(*body, reply + 4, rlen - 4);
    }
    if (body_len)
        *body_len = rlen - 4;
    free(reply);
    return 0;
}

/* A request whose reply body must be empty. */
static int request_empty(struct bkd_client *c, uint32_t code, const void *payload, size_t len,
                         const int *fds, size_t nfds)
{
    size_t blen;
    int r = bkd_request_raw(c, code, payload, len, fds, nfds, NULL, &blen);
    if (r == 0 && blen != 0)
        return die(c, -EPROTO, "unexpected reply body");
    return r;
}

/* A request answered with u32 state + kv keys (ADD_DEVICE, FRONTEND_STATE,
 * GET_BACKEND_STATE). */
static int request_state(struct bkd_client *c, uint32_t code, const uint8_t *payload,
                         size_t len, const int *fds, size_t nfds, uint32_t *state,
                         struct bkd_kv *keys)
{
    uint8_t *body;
    size_t blen;
    int r = bkd_request_raw(c, code, payload, len, fds, nfds, &body, &blen);
    if (r)
        return r;
    struct bkd_kv tmp = {0};
    size_t off = 4;
    r = blen < 4 ? -EBADMSG : kv_decode(body, blen, &off, &tmp);
    if (r == 0 && off != blen)
        r = -EBADMSG;
    uint32_t st = blen >= 4 ? get32(body) : 0;
    free(body);
    if (r == 0 && st > BKD_XB_RECONFIGURED)
        r = -EINVAL;
    if (r) {
        bkd_kv_free(&tmp);
        return die(c, -EPROTO, "malformed state reply");
    }
    if (state)
        *state = st;
    if (keys) {
        bkd_kv_free(keys);
        *keys = tmp;
    } else {
        bkd_kv_free(&tmp);
    }
    return 0;
}

/* --- connecting ------------------------------------------------------------------- */

int bkd_connect_fd(int sock, uint64_t features, struct bkd_client **out)
{
    return bkd_connect_fd_info(sock, features, NULL, out);
}

int bkd_connect_fd_info(int sock, uint64_t features, const struct bkd_kv *info,
                        struct bkd_client **out)
{
    *out = NULL;
    if (kv_check(info)) {
        close(sock);
        return -EINVAL;
    }
    struct bkd_client *c = calloc(1, sizeof(*c));
    uint8_t *buf = malloc(BKD_HEADER_SIZE + BKD_MAX_PAYLOAD);
    if (!c || !buf) {
        free(c);
        free(buf);
        close(sock);
        return -ENOMEM;
    }
    c->sock = sock;
    c->buf = buf;
    c->timeout_ms = -1;
    /* HELLO: u32 version, u64 features, then the optional kv (absent when empty).
     * Reply: u32 version, u64 accepted features. */
    size_t len = 12 + (info && info->count ? kv_encoded_size(info) : 0);
    uint8_t *hello = len <= BKD_MAX_PAYLOAD ? malloc(len) : NULL;
    if (!hello) {
        bkd_close(c);
        return len <= BKD_MAX_PAYLOAD ? -ENOMEM : -EMSGSIZE;
    }
    put32(hello, BKD_PROTOCOL_VERSION);
    put64(hello + 4, features);
    if (len > 12)
        kv_encode(info, hello + 12);
    uint8_t *body;
    size_t blen;
    int r = bkd_request_raw(c, BKD_HELLO, hello, len, NULL, 0, &body, &blen);
    free(hello);
    if (r == 0) {
        if (blen != 12) {
            r = -EPROTO;
        } else {
            c->version = get32(body);
            c->features = (uint64_t)get32(body + 4) | (uint64_t)get32(body + 8) << 32;
            if (c->features & ~features)
                r = -EPROTO; /* accepted features must be a subset of the offered */
        }
        free(body);
    }
    if (r) {
        bkd_close(c);
        return r;
    }
    *out = c;
    return 0;
}

int bkd_connect(const char *socket_path, uint64_t features, struct bkd_client **out)
{
    return bkd_connect_info(socket_path, features, NULL, out);
}

int bkd_connect_info(const char *socket_path, uint64_t features, const struct bkd_kv *info,
                     struct bkd_client **out)
{
    *out = NULL;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof(addr.sun_path))
        return -ENAMETOOLONG;
    strcpy(addr.sun_path, socket_path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -errno;
    if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        int e = errno;
        close(sock);
        return -e;
    }
    return bkd_connect_fd_info(sock, features, info, out);
}

void bkd_close(struct bkd_client *c)
{
    if (!c)
        return;
    struct bkd_notice n;
    while (bkd_next_notice(c, &n))
        bkd_kv_free(&n.kv);
    if (c->sock >= 0)
        close(c->sock);
    free(c->buf);
    free(c);
}

int bkd_socket(const struct bkd_client *c) { return c->sock; }
uint64_t bkd_features(const struct bkd_client *c) { return c->features; }
uint32_t bkd_version(const struct bkd_client *c) { return c->version; }
const char *bkd_last_error(const struct bkd_client *c) { return c->error; }
int bkd_is_dead(const struct bkd_client *c) { return c->dead; }
void bkd_set_timeout(struct bkd_client *c, int timeout_ms) { c->timeout_ms = timeout_ms; }

/* --- requests ---------------------------------------------------------------------- */

int bkd_add_mem_region(struct bkd_client *c, uint64_t gpa, uint64_t size, int fd,
                       uint64_t mmap_offset)
{
    uint8_t p[24];
    put64(p, gpa);
    put64(p + 8, size);
    put64(p + 16, mmap_offset);
    return request_empty(c, BKD_ADD_MEM_REGION, p, sizeof(p), &fd, 1);
}

int bkd_remove_mem_region(struct bkd_client *c, uint64_t gpa, uint64_t size)
{
    uint8_t p[16];
    put64(p, gpa);
    put64(p + 8, size);
    return request_empty(c, BKD_REMOVE_MEM_REGION, p, sizeof(p), NULL, 0);
}

int bkd_set_grant_table(struct bkd_client *c, int fd, uint32_t version, uint32_t nr_frames,
                        uint64_t mmap_offset, uint16_t backend_domid)
{
    uint8_t p[20];
    put32(p, version);
    put32(p + 4, nr_frames);
    put64(p + 8, mmap_offset);
    put16(p + 16, backend_domid);
    put16(p + 18, 0);
    return request_empty(c, BKD_SET_GRANT_TABLE, p, sizeof(p), &fd, 1);
}

int bkd_add_device(struct bkd_client *c, uint32_t devid, uint32_t type,
                   const struct bkd_kv *config, uint32_t *state, struct bkd_kv *keys)
{
    if (kv_check(config))
        return -EINVAL;
    size_t len = 8 + kv_encoded_size(config);
    if (len > BKD_MAX_PAYLOAD)
        return -EMSGSIZE;
    uint8_t *p = malloc(len);
    if (!p)
        return -ENOMEM;
    put32(p, devid);
    put32(p + 4, type);
    kv_encode(config, p + 8);
    int r = request_state(c, BKD_ADD_DEVICE, p, len, NULL, 0, state, keys);
    free(p);
    return r;
}

int bkd_remove_device(struct bkd_client *c, uint32_t devid)
{
    uint8_t p[4];
    put32(p, devid);
    return request_empty(c, BKD_REMOVE_DEVICE, p, sizeof(p), NULL, 0);
}

int bkd_frontend_state(struct bkd_client *c, uint32_t devid, uint32_t frontend_state,
                       const struct bkd_kv *frontend_keys,
                       const struct bkd_channel *channels, uint32_t nr,
                       uint32_t *backend_state, struct bkd_kv *backend_keys)
{
    if (nr > BKD_MAX_CHANNELS || (nr && !channels) || kv_check(frontend_keys))
        return -EINVAL;
    /* u32 devid, u32 state, kv keys, u32 nr_channels, u32 ports[nr]. */
    size_t len = 8 + kv_encoded_size(frontend_keys) + 4 + 4 * (size_t)nr;
    if (len > BKD_MAX_PAYLOAD)
        return -EMSGSIZE;
    uint8_t *p = malloc(len);
    if (!p)
        return -ENOMEM;
    put32(p, devid);
    put32(p + 4, frontend_state);
    uint8_t *q = kv_encode(frontend_keys, p + 8);
    put32(q, nr);
    q += 4;
    int fds[MAX_FDS];
    for (uint32_t i = 0; i < nr; i++) {
        put32(q + 4 * i, channels[i].port);
        /* 2 fds per channel, in port order, kick then call. */
        fds[2 * i] = channels[i].kick_fd;
        fds[2 * i + 1] = channels[i].call_fd;
    }
    int r = request_state(c, BKD_FRONTEND_STATE, p, len, fds, 2 * (size_t)nr, backend_state,
                          backend_keys);
    free(p);
    return r;
}

int bkd_get_backend_state(struct bkd_client *c, uint32_t devid, uint32_t *state,
                          struct bkd_kv *keys)
{
    uint8_t p[4];
    put32(p, devid);
    return request_state(c, BKD_GET_BACKEND_STATE, p, sizeof(p), NULL, 0, state, keys);
}

int bkd_get_stats(struct bkd_client *c, uint32_t devid, struct bkd_kv *counters)
{
    uint8_t p[4];
    put32(p, devid);
    uint8_t *body;
    size_t blen;
    int r = bkd_request_raw(c, BKD_GET_STATS, p, sizeof(p), NULL, 0, &body, &blen);
    if (r)
        return r;
    struct bkd_kv tmp = {0};
    size_t off = 0;
    r = kv_decode(body, blen, &off, &tmp);
    free(body);
    if (r || off != blen) {
        bkd_kv_free(&tmp);
        return die(c, -EPROTO, "malformed GET_STATS reply");
    }
    bkd_kv_free(counters);
    *counters = tmp;
    return 0;
}

int bkd_set_inflight(struct bkd_client *c, uint32_t devid, int fd, uint64_t mmap_offset,
                     uint64_t size)
{
    uint8_t p[24];
    put32(p, devid);
    put32(p + 4, 0);
    put64(p + 8, mmap_offset);
    put64(p + 16, size);
    return request_empty(c, BKD_SET_INFLIGHT, p, sizeof(p), &fd, 1);
}

int bkd_set_log(struct bkd_client *c, int fd, uint64_t mmap_offset, uint64_t size,
                uint64_t ram_pages)
{
    uint8_t p[24];
    put64(p, mmap_offset);
    put64(p + 8, size);
    put64(p + 16, ram_pages);
    return request_empty(c, BKD_SET_LOG, p, sizeof(p), &fd, 1);
}

int bkd_clear_log(struct bkd_client *c)
{
    return request_empty(c, BKD_CLEAR_LOG, NULL, 0, NULL, 0);
}

int bkd_suspend(struct bkd_client *c, uint32_t devid)
{
    uint8_t p[4];
    put32(p, devid);
    return request_empty(c, BKD_SUSPEND, p, sizeof(p), NULL, 0);
}

int bkd_resume(struct bkd_client *c, uint32_t devid)
{
    uint8_t p[4];
    put32(p, devid);
    return request_empty(c, BKD_RESUME, p, sizeof(p), NULL, 0);
}

int bkd_get_device_state(struct bkd_client *c, uint32_t devid, int fd, uint64_t *size)
{
    uint8_t p[8];
    put32(p, devid);
    put32(p + 4, 0);
    uint8_t *body;
    size_t blen;
    int r = bkd_request_raw(c, BKD_GET_DEVICE_STATE, p, sizeof(p), &fd, 1, &body, &blen);
    if (r)
        return r;
    if (blen != 8) {
        free(body);
        return die(c, -EPROTO, "malformed GET_DEVICE_STATE reply");
    }
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | body[i];
    free(body);
    if (size)
        *size = v;
    return 0;
}

int bkd_set_device_state(struct bkd_client *c, uint32_t devid, int fd, uint64_t size)
{
    uint8_t p[16];
    put32(p, devid);
    put32(p + 4, 0);
    put64(p + 8, size);
    return request_empty(c, BKD_SET_DEVICE_STATE, p, sizeof(p), &fd, 1);
}

/* --- notices ----------------------------------------------------------------------- */

int bkd_read_notices(struct bkd_client *c, int timeout_ms)
{
    if (c->dead)
        return -EPIPE;
    int r = fill(c, timeout_ms);
    if (r < 0)
        return r;
    /* Between requests only notices may come: a reply here answers nothing. */
    r = drain(c, 0, 0, NULL, NULL);
    if (r < 0)
        return r;
    return (int)c->nr_notices;
}

int bkd_next_notice(struct bkd_client *c, struct bkd_notice *out)
{
    struct notice_node *node = c->notices_head;
    if (!node)
        return 0;
    c->notices_head = node->next;
    if (!c->notices_head)
        c->notices_tail = NULL;
    c->nr_notices--;
    *out = node->notice;
    free(node);
    return 1;
}

/* --- resources --------------------------------------------------------------------- */

int bkd_memfd(const char *name, uint64_t size)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)size) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int bkd_eventfd(int flags)
{
    int fd = eventfd(0, EFD_CLOEXEC | flags);
    return fd < 0 ? -errno : fd;
}

int bkd_channel_open(struct bkd_channel *ch, uint32_t port, int flags)
{
    ch->port = port;
    ch->kick_fd = bkd_eventfd(flags);
    if (ch->kick_fd < 0) {
        int r = ch->kick_fd;
        ch->call_fd = -1;
        return r;
    }
    ch->call_fd = bkd_eventfd(flags);
    if (ch->call_fd < 0) {
        int r = ch->call_fd;
        close(ch->kick_fd);
        ch->kick_fd = -1;
        return r;
    }
    return 0;
}

void bkd_channel_close(struct bkd_channel *ch)
{
    if (ch->kick_fd >= 0)
        close(ch->kick_fd);
    if (ch->call_fd >= 0)
        close(ch->call_fd);
    ch->kick_fd = ch->call_fd = -1;
}

uint32_t bkd_gnttab_entries_per_frame(uint32_t version)
{
    return BKD_PAGE_SIZE / (version == 2 ? 16u : 8u);
}

uint32_t bkd_gnttab_status_frames(uint32_t nr_frames)
{
    uint64_t entries = (uint64_t)nr_frames * bkd_gnttab_entries_per_frame(2);
    return (uint32_t)((entries * 2 + BKD_PAGE_SIZE - 1) / BKD_PAGE_SIZE);
}

uint64_t bkd_log_gnttab_offset(uint64_t ram_pages)
{
    return ((ram_pages + 7) / 8 + 7) / 8 * 8;
}

uint64_t bkd_log_size(uint64_t ram_pages, uint64_t gnttab_pages)
{
    return bkd_log_gnttab_offset(ram_pages) + (gnttab_pages + 63) / 64 * 8;
}

uint64_t bkd_log_take(void *log, uint64_t byte_offset, uint64_t nbits, uint8_t *out)
{
    uint64_t *words = (uint64_t *)((uint8_t *)log + byte_offset), n = 0;
    for (uint64_t w = 0; w < (nbits + 63) / 64; w++) {
        uint64_t v = __atomic_exchange_n(&words[w], 0, __ATOMIC_SEQ_CST);
        if (w == nbits / 64)    /* the last, partial word: only bits below nbits */
            v &= (1ull << (nbits % 64)) - 1;
        n += (uint64_t)__builtin_popcountll(v);
        if (out)
            for (unsigned b = 0; b < 8 && w * 8 + b < (nbits + 7) / 8; b++)
                out[w * 8 + b] = (uint8_t)(v >> (8 * b));
    }
    return n;
}

uint64_t bkd_inflight_size(uint32_t nr_queues)
{
    uint64_t n = INFLIGHT_HEADER + (uint64_t)nr_queues * INFLIGHT_QUEUE_BYTES;
    return (n + BKD_PAGE_SIZE - 1) / BKD_PAGE_SIZE * BKD_PAGE_SIZE;
}
