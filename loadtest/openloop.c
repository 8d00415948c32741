/*
 * loadtest/openloop.c: a constant-rate (open-loop) HTTP/1.1 load generator,
 * for the latency at a fixed rate that wrk (closed loop: each connection
 * sends when its last answer came) cannot give.
 *
 *   cc -O2 -Wall -Wextra -o openloop loadtest/openloop.c
 *   openloop -r RATE -d SECONDS [-c CONNS] [-k KEYS_FILE] [-H HEADER]
 *            [-s SEED] http://127.0.0.1:PORT/PATH
 *
 * Request i is due at t0 + i / RATE, whatever happened to the ones before:
 * a due request goes out at once on an idle keep-alive connection of CONNS
 * (default 64), or waits in a queue for the first one free.  Its latency
 * counts from when it was due, not from when it was sent, so a target
 * that stalls is charged for the requests it kept waiting (wrk2's
 * correction of "coordinated omission").  Each request carries a key of
 * KEYS_FILE picked at random (HEADER, default X-API-Key), as
 * loadtest/keys.lua does with ORDER=random.
 *
 * Prints one line, "rps p50_ms p99_ms non2xx errors requests" (the shape
 * of lt_run_wrk's), and on stderr the detail: sent, answered, p50, p90,
 * p99, p99.9, max from the due time and p99 from the send, and how late
 * the generator itself noticed a request was due (if that is not far
 * below the target's p99, the figures measure the generator).  Loopback, plain HTTP, GET only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RBUF 65536

typedef struct conn {
    int      fd;
    int      busy;          /* a request in flight */
    uint64_t due, sent;     /* of the request in flight (ns) */
    size_t   len;           /* bytes in buf */
    size_t   skip;          /* body bytes still to come, past the buffer */
    int      status, close_after;   /* of the answer being skipped */
    char     buf[RBUF];
} conn;

static struct sockaddr_in peer;
static char   **reqs;
static size_t  *reqlen, nreqs;
static conn    *conns;
static int      nconns, ep;
static uint64_t *lat, *svc, *late;   /* per answer: from due, from send; per send */
static size_t   nlat, nlate, cap;
static uint64_t n2xx, nother, nerr, rng;

static uint64_t
now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void
die(const char *msg)
{
    fprintf(stderr, "openloop: %s\n", msg);
    exit(2);
}

static uint64_t
rand64(void)            /* xorshift64* */
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ull;
}

static void
conn_open(conn *c)
{
    int one = 1;
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };

    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&peer, sizeof peer) != 0) {
        die("cannot connect");
    }
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(c->fd, F_SETFL, O_NONBLOCK);
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
        die("epoll_ctl");
    }
    c->busy = 0;
    c->len = 0;
    c->skip = 0;
}

static void
conn_reset(conn *c)
{
    close(c->fd);
    conn_open(c);
}

static int
conn_send(conn *c, uint64_t due)
{
    size_t k = nreqs > 1 ? (size_t)(rand64() % nreqs) : 0;
    uint64_t t = now_ns();

    if (write(c->fd, reqs[k], reqlen[k]) != (ssize_t)reqlen[k]) {
        return -1;        /* a ~100-byte request on an idle socket: whole or failed */
    }
    c->busy = 1;
    c->due = due;
    c->sent = t;
    return 0;
}

/* A whole answer at the head of c->buf: its length, 0 if not yet whole,
 * -1 if it cannot be parsed.  *status, *close_after.  A body with a
 * Content-Length that does not fit in the buffer: all of c->buf, and
 * *skip the bytes of it still to come. */
static long
parse_answer(const conn *c, int *status, int *close_after, size_t *skip)
{
    const char *b = c->buf, *eoh = memmem(b, c->len, "\r\n\r\n", 4), *p, *end;
    size_t head, body = 0;
    long clen = -1;
    int chunked = 0;

    if (eoh == NULL) {
        return c->len >= RBUF ? -1 : 0;
    }
    head = (size_t)(eoh - b) + 4;
    if (c->len < 12 || strncmp(b, "HTTP/1.", 7) != 0) {
        return -1;
    }
    *status = atoi(b + 9);
    *close_after = 0;
    for (p = (const char *)memchr(b, '\n', head) + 1; p < eoh; p = end + 2) {
        end = memmem(p, (size_t)(eoh + 2 - p), "\r\n", 2);
        if (strncasecmp(p, "content-length:", 15) == 0) {
            clen = atol(p + 15);
        } else if (strncasecmp(p, "transfer-encoding:", 18) == 0) {
            chunked = memmem(p, (size_t)(end - p), "chunked", 7) != NULL;
        } else if (strncasecmp(p, "connection:", 11) == 0) {
            *close_after = memmem(p, (size_t)(end - p), "close", 5) != NULL;
        }
    }
    if (!chunked) {
        body = clen > 0 ? (size_t)clen : 0;
        if (c->len >= head + body) {
            return (long)(head + body);
        }
        if (head + body > RBUF) {
            *skip = head + body - c->len;
            return (long)c->len;
        }
        return 0;
    }
    for (size_t at = head;;) {          /* chunk-size CRLF data CRLF ... 0 CRLF CRLF */
        const char *crlf = memmem(b + at, c->len - at, "\r\n", 2);
        size_t n;

        if (crlf == NULL) {
            return 0;
        }
        n = strtoul(b + at, NULL, 16);
        at = (size_t)(crlf - b) + 2;
        if (n == 0) {
            return c->len >= at + 2 ? (long)(at + 2) : 0;   /* no trailers */
        }
        if (c->len < at + n + 2) {
            return c->len >= RBUF ? -1 : 0;
        }
        at += n + 2;
    }
}

static void
answered(conn *c, uint64_t t, int status)
{
    if (nlat < cap) {
        lat[nlat] = t - c->due;
        svc[nlat++] = t - c->sent;
    }
    if (status >= 200 && status < 300) {
        n2xx++;
    } else {
        nother++;
    }
    c->busy = 0;
}

static void
conn_read(conn *c, uint64_t t)
{
    for (;;) {
        ssize_t r = read(c->fd, c->buf + c->len, RBUF - c->len);
        long whole;
        size_t skip = 0;

        if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
            return;
        }
        if (r <= 0) {
            nerr += (uint64_t)c->busy;
            conn_reset(c);
            return;
        }
        c->len += (size_t)r;
        if (c->skip > 0) {                 /* the rest of a large body */
            size_t take = c->len < c->skip ? c->len : c->skip;

            c->skip -= take;
            memmove(c->buf, c->buf + take, c->len - take);
            c->len -= take;
            if (c->skip > 0) {
                continue;
            }
        } else {
            whole = parse_answer(c, &c->status, &c->close_after, &skip);
            if (whole < 0 || (whole > 0 && !c->busy)) {
                nerr++;
                conn_reset(c);
                return;
            }
            if (whole == 0) {
                continue;
            }
            memmove(c->buf, c->buf + whole, c->len - (size_t)whole);
            c->len -= (size_t)whole;
            if (skip > 0) {
                c->skip = skip;
                continue;
            }
        }
        answered(c, t, c->status);
        if (c->close_after || c->len > 0) {   /* closing, or bytes nobody asked for */
            nerr += c->len > 0;
            conn_reset(c);
        }
        return;
    }
}

static int
cmp64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

static double
pct_ms(uint64_t *v, size_t n, double q)
{
    size_t i;

    if (n == 0) {
        return 0;
    }
    i = (size_t)(q * (double)(n - 1) + 0.5);
    return (double)v[i] / 1e6;
}

static void
load_requests(const char *keys, const char *header, const char *host, const char *path)
{
    char line[512];
    size_t n = 0, sz = 1024;
    FILE *f = NULL;

    reqs = malloc(sz * sizeof *reqs);
    reqlen = malloc(sz * sizeof *reqlen);
    if (keys != NULL && (f = fopen(keys, "r")) == NULL) {
        die("cannot open the keys file");
    }
    do {
        char *r = NULL;
        int len;

        if (f != NULL) {
            if (fgets(line, sizeof line, f) == NULL) {
                break;
            }
            line[strcspn(line, "\r\n")] = '\0';
            if (line[0] == '\0') {
                continue;
            }
            len = asprintf(&r, "GET %s HTTP/1.1\r\nHost: %s\r\n%s: %s\r\n\r\n",
                           path, host, header, line);
        } else {
            len = asprintf(&r, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", path, host);
        }
        if (len < 0) {
            die("out of memory");
        }
        if (n == sz) {
            sz *= 2;
            reqs = realloc(reqs, sz * sizeof *reqs);
            reqlen = realloc(reqlen, sz * sizeof *reqlen);
            if (reqs == NULL || reqlen == NULL) {
                die("out of memory");
            }
        }
        reqs[n] = r;
        reqlen[n++] = (size_t)len;
    } while (f != NULL);
    if (f != NULL) {
        fclose(f);
    }
    if (n == 0) {
        die("no keys in the keys file");
    }
    nreqs = n;
}

int
main(int argc, char **argv)
{
    double rate = 0, secs = 0;
    const char *keys = NULL, *header = "X-API-Key", *url;
    char host[64], path[512];
    unsigned port;
    int opt;
    uint64_t t0, total, sent_i = 0, *queue, qhead = 0, qtail = 0, interval, stop;

    nconns = 64;
    rng = 88172645463325252ull;
    while ((opt = getopt(argc, argv, "r:d:c:k:H:s:")) != -1) {
        switch (opt) {
        case 'r': rate = atof(optarg); break;
        case 'd': secs = atof(optarg); break;
        case 'c': nconns = atoi(optarg); break;
        case 'k': keys = optarg; break;
        case 'H': header = optarg; break;
        case 's': rng ^= strtoull(optarg, NULL, 10) * 0x9e3779b97f4a7c15ull; break;
        default: die("usage: openloop -r RATE -d SECONDS [-c CONNS] [-k KEYS] [-H HEADER] URL");
        }
    }
    if (optind != argc - 1 || rate <= 0 || rate > 10e6 || secs <= 0 || secs > 3600
        || nconns < 1 || nconns > 10000) {
        die("usage: openloop -r RATE(1..10e6) -d SECONDS(..3600) [-c CONNS(1..10000)] "
            "[-k KEYS] [-H HEADER] http://127.0.0.1:PORT/PATH");
    }
    url = argv[optind];
    if (sscanf(url, "http://127.0.0.1:%u%511s", &port, path) < 1 || port == 0 || port > 65535) {
        die("the URL must be http://127.0.0.1:PORT/PATH");
    }
    if (strchr(url + 17, '/') == NULL) {
        strcpy(path, "/");
    }
    snprintf(host, sizeof host, "127.0.0.1:%u", port);
    peer.sin_family = AF_INET;
    peer.sin_port = htons((uint16_t)port);
    peer.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    load_requests(keys, header, host, path);

    total = (uint64_t)(rate * secs);
    cap = (size_t)total + 1;
    lat = malloc(cap * sizeof *lat);
    svc = malloc(cap * sizeof *svc);
    late = malloc(cap * sizeof *late);
    queue = malloc(cap * sizeof *queue);
    conns = calloc((size_t)nconns, sizeof *conns);
    if (lat == NULL || svc == NULL || late == NULL || queue == NULL || conns == NULL) {
        die("out of memory");
    }
    prctl(PR_SET_TIMERSLACK, 1UL);       /* wake on the due time, not 50 us later */
    if ((ep = epoll_create1(0)) < 0) {
        die("epoll_create1");
    }
    for (int i = 0; i < nconns; i++) {
        conn_open(&conns[i]);
    }
    interval = (uint64_t)(1e9 / rate);
    t0 = now_ns() + 10000000;            /* 10 ms from now */
    stop = t0 + (uint64_t)(secs * 1e9);
    for (;;) {
        struct epoll_event evs[256];
        struct timespec ts = { 0, 0 };
        uint64_t t = now_ns(), wait_ns;
        int n;

        while (sent_i < total && t0 + sent_i * interval <= t) {
            queue[qtail++] = t0 + sent_i * interval;
            late[nlate++] = t - (t0 + sent_i * interval);   /* the generator's own delay */
            sent_i++;
        }
        for (int i = 0; i < nconns && qhead < qtail; i++) {   /* free connections */
            if (!conns[i].busy) {
                if (conn_send(&conns[i], queue[qhead]) != 0) {
                    nerr++;
                    conn_reset(&conns[i]);
                }
                qhead++;
            }
        }
        if (sent_i == total && qhead == qtail) {
            int busy = 0;

            for (int i = 0; i < nconns; i++) {
                busy += conns[i].busy;
            }
            if (busy == 0 || t > stop + 2000000000ull) {   /* 2 s for the last answers */
                nerr += (uint64_t)busy;
                break;
            }
        }
        if (sent_i == total) {
            wait_ns = 1000000;                 /* only answers to wait for */
        } else {
            uint64_t next = t0 + sent_i * interval;

            wait_ns = next > t ? next - t : 0;
        }
        ts.tv_nsec = (long)(wait_ns < 999999999 ? wait_ns : 999999999);
        n = epoll_pwait2(ep, evs, 256, &ts, NULL);
        if (n < 0 && errno != EINTR) {
            die("epoll_pwait2");
        }
        t = now_ns();
        for (int i = 0; i < n; i++) {
            conn_read(evs[i].data.ptr, t);
        }
    }

    qsort(lat, nlat, sizeof *lat, cmp64);
    qsort(svc, nlat, sizeof *svc, cmp64);
    qsort(late, nlate, sizeof *late, cmp64);
    fprintf(stderr, "openloop: rate %.0f/s for %.1f s over %d connections: %llu due, "
            "%llu answered (%llu 2xx, %llu other), %llu errors\n"
            "openloop: latency from the due time, ms: p50 %.3f p90 %.3f p99 %.3f "
            "p99.9 %.3f max %.3f; from the send: p99 %.3f; the generator saw "
            "requests due late by p99 %.3f ms\n",
            rate, secs, nconns, (unsigned long long)total, (unsigned long long)nlat,
            (unsigned long long)n2xx, (unsigned long long)nother,
            (unsigned long long)nerr,
            pct_ms(lat, nlat, 0.5), pct_ms(lat, nlat, 0.9), pct_ms(lat, nlat, 0.99),
            pct_ms(lat, nlat, 0.999), nlat ? (double)lat[nlat - 1] / 1e6 : 0,
            pct_ms(svc, nlat, 0.99), pct_ms(late, nlate, 0.99));
    printf("%.1f %.3f %.3f %llu %llu %llu\n", (double)nlat / secs, pct_ms(lat, nlat, 0.5),
           pct_ms(lat, nlat, 0.99), (unsigned long long)nother, (unsigned long long)nerr,
           (unsigned long long)nlat);
    return 0;
}
