/*
 * tg-testup: a small, fast HTTP/1.1 upstream for tollgate's integration
 * tests and benchmarks, built on libevent's evhttp.
 *
 *   tg-testup -p PORT [-a ADDR] [-t THREADS]
 *
 * PORT 0 picks an ephemeral port. Once every thread is listening the
 * program prints "PORT=<n>" on stdout (always, flushed), so a harness can
 * read the port from the first line.
 *
 * Endpoints (see usage() for the list). Byte pattern of generated bodies:
 * byte i = (i * 31 + 7) & 0xff, i counted from the start of the body.
 *
 * /__stats returns {"connections":A,"requests":R}: A counts accepted TCP
 * connections, R counts requests served, both since start or the last
 * /__reset. /__stats and /__reset themselves are not counted as requests;
 * the connection they arrive on is counted when it is accepted, so a test
 * that calls /__reset and /__stats over one keep-alive connection sees
 * exactly the traffic that happened in between.
 *
 * With -t N > 1 each thread has its own event base and evhttp on its own
 * SO_REUSEPORT socket bound to the same port; the kernel spreads
 * connections over them. Counters are C11 atomics.
 */

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/queue.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/util.h>

#define TU_MAX_THREADS   64
#define TU_PATTERN_BLOCK (64 * 1024)          /* one referenced block */
#define TU_MAX_BODY      ((uint64_t)1 << 36)  /* 64 GiB: refuse beyond */
#define TU_MAX_CHUNKS    1000000
#define TU_MAX_DELAY_MS  (3600 * 1000)

struct tu_worker {
    pthread_t          tid;
    int                fd;     /* listening socket, owned by evhttp */
    struct event_base *base;
    struct evhttp     *http;
};

/* A /chunked response in progress; freed by its last timer callback. */
struct tu_chunked {
    struct evhttp_request *req;     /* user-owned until send_reply_end */
    struct event          *timer;
    uint64_t               off;     /* bytes sent so far */
    uint64_t               total;   /* N */
    uint64_t               chunks;  /* chunks left to send */
    uint64_t               delay;   /* us between chunks */
    uint64_t               next;    /* the next chunk's deadline (tu_now_us) */
};

/* A /work request: queued until one of the thread's k workers is free,
 * then served for ms milliseconds (a capacity-bound server: a fixed
 * worker pool with a fixed service time, like a FastAPI app). */
struct tu_work {
    TAILQ_ENTRY(tu_work)   link;    /* in tu_work_queue while waiting */
    struct evhttp_request *req;
    struct event          *timer;
    uint64_t               service; /* us */
    uint64_t               done;    /* its deadline once in service (tu_now_us) */
};
TAILQ_HEAD(tu_work_list, tu_work);

/* A /slow response waiting for its timer. */
struct tu_slow {
    struct evhttp_request *req;
    struct event          *timer;
    uint64_t               done;    /* its deadline (tu_now_us) */
};

static void tu_usage(FILE *out);
static int tu_listen(const char *addr, int port, int reuseport, int *bound);
static void *tu_thread_main(void *arg);
static struct bufferevent *tu_on_accept(struct event_base *base, void *arg);
static void tu_on_request(struct evhttp_request *req, void *arg);
static void tu_reply_text(struct evhttp_request *req, int code,
                          const char *reason, const char *body);
static int tu_query_u64(struct evhttp_request *req, const char *name,
                        uint64_t def, uint64_t max, uint64_t *out);
static void tu_add_pattern(struct evbuffer *buf, uint64_t off, uint64_t len);
static const char *tu_method_name(enum evhttp_cmd_type cmd);
static const char *tu_reason(int code);
static uint64_t tu_now_us(void);
static void tu_timer_at(struct event *ev, uint64_t deadline);
static int tu_timer_early(struct event *ev, uint64_t deadline);
static void tu_send(struct evhttp_request *req, int code, const char *reason);

static void tu_h_ok(struct evhttp_request *req);
static void tu_h_echo(struct evhttp_request *req);
static void tu_echo_target(struct evhttp_request *req);
static void tu_h_headers(struct evhttp_request *req);
static void tu_h_bytes(struct evhttp_request *req);
static void tu_h_chunked(struct evhttp_request *req, struct event_base *base);
static void tu_h_slow(struct evhttp_request *req, struct event_base *base);
static void tu_h_work(struct evhttp_request *req, struct event_base *base);
static void tu_work_done(evutil_socket_t fd, short what, void *arg);
static void tu_h_status(struct evhttp_request *req);
static void tu_h_stats(struct evhttp_request *req);
static void tu_h_reset(struct evhttp_request *req);
static void tu_h_close(struct evhttp_request *req);
static void tu_h_raw(struct evhttp_request *req);
static void tu_chunked_tick(evutil_socket_t fd, short what, void *arg);
static void tu_slow_fire(evutil_socket_t fd, short what, void *arg);

/* ------------------------------------------------------------------ */
/* state                                                               */

static atomic_uint_fast64_t tu_connections;
static atomic_uint_fast64_t tu_requests;

/* /work: per event-loop thread (use -t 1 for an exact k). */
static _Thread_local struct tu_work_list tu_work_queue;   /* TAILQ_INIT'ed */
static _Thread_local int tu_work_ready;          /* ... once, lazily */
static _Thread_local unsigned tu_work_busy;      /* requests in service */
static _Thread_local uint64_t tu_work_k;         /* workers (last k seen) */

/* TU_PATTERN_BLOCK bytes of the pattern plus 256 so that a slice of up to
 * one block can start at any phase (offset mod 256) and stay contiguous. */
static unsigned char tu_pattern[TU_PATTERN_BLOCK + 256];

static const struct {
    int         code;
    const char *reason;
} tu_reasons[] = {
    {200, "OK"}, {201, "Created"}, {202, "Accepted"}, {204, "No Content"},
    {206, "Partial Content"}, {301, "Moved Permanently"}, {302, "Found"},
    {304, "Not Modified"}, {400, "Bad Request"}, {401, "Unauthorized"},
    {403, "Forbidden"}, {404, "Not Found"}, {405, "Method Not Allowed"},
    {408, "Request Timeout"}, {409, "Conflict"}, {413, "Payload Too Large"},
    {418, "I'm a teapot"}, {422, "Unprocessable Entity"},
    {429, "Too Many Requests"}, {500, "Internal Server Error"},
    {501, "Not Implemented"}, {502, "Bad Gateway"},
    {503, "Service Unavailable"}, {504, "Gateway Timeout"},
};

/* ------------------------------------------------------------------ */
/* main                                                                */

int
main(int argc, char **argv)
{
    static struct tu_worker workers[TU_MAX_THREADS];
    const char *addr = "127.0.0.1";
    int port = -1, nthreads = 1, bound = 0, opt, i;

    while ((opt = getopt(argc, argv, "p:a:t:h")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'a': addr = optarg; break;
        case 't': nthreads = atoi(optarg); break;
        case 'h': tu_usage(stdout); return 0;
        default:  tu_usage(stderr); return 2;
        }
    }
    if (port < 0 || port > 65535 || nthreads < 1 ||
        nthreads > TU_MAX_THREADS || optind != argc) {
        tu_usage(stderr);
        return 2;
    }

    /* A client that goes away mid-response must not kill the server. */
    signal(SIGPIPE, SIG_IGN);

    for (i = 0; i < (int)sizeof(tu_pattern); i++)
        tu_pattern[i] = (unsigned char)((i * 31 + 7) & 0xff);

    for (i = 0; i < nthreads; i++) {
        struct tu_worker *w = &workers[i];

        /* The first socket may bind port 0; the others join its port. */
        w->fd = tu_listen(addr, i == 0 ? port : bound, nthreads > 1, &bound);
        if (w->fd < 0)
            return 1;
        w->base = event_base_new();
        w->http = w->base ? evhttp_new(w->base) : NULL;
        if (w->http == NULL) {
            fprintf(stderr, "tg-testup: cannot create event base/evhttp\n");
            return 1;
        }
        evhttp_set_allowed_methods(w->http,
            EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS |
            EVHTTP_REQ_TRACE | EVHTTP_REQ_PATCH);
        evhttp_set_default_content_type(w->http, NULL);
        evhttp_set_bevcb(w->http, tu_on_accept, NULL);
        evhttp_set_gencb(w->http, tu_on_request, w->base);
        if (evhttp_accept_socket(w->http, w->fd) != 0) {
            fprintf(stderr, "tg-testup: evhttp_accept_socket failed\n");
            return 1;
        }
    }

    printf("PORT=%d\n", bound);
    fflush(stdout);

    for (i = 1; i < nthreads; i++) {
        if (pthread_create(&workers[i].tid, NULL, tu_thread_main,
                           &workers[i]) != 0) {
            fprintf(stderr, "tg-testup: pthread_create failed\n");
            return 1;
        }
    }
    tu_thread_main(&workers[0]);
    return 0;
}

/* ------------------------------------------------------------------ */
/* setup                                                               */

static void
tu_usage(FILE *out)
{
    fprintf(out,
        "usage: tg-testup -p PORT [-a ADDR] [-t THREADS]\n"
        "  -p PORT     port to listen on, 0 = ephemeral (PORT=<n> printed)\n"
        "  -a ADDR     IPv4/IPv6 address (default 127.0.0.1)\n"
        "  -t THREADS  event loop threads (default 1, max %d)\n"
        "endpoints:\n"
        "  /                  200 text/plain \"ok\\n\" (also any unknown path)\n"
        "  /echo              echo request body, X-Echo-Method header\n"
        "  /headers           request headers as \"name: value\" lines\n"
        "  /bytes?n=N         N pattern bytes, Content-Length framed\n"
        "  /chunked?n=N&chunks=K&delay_ms=D   chunked, K chunks, D ms apart\n"
        "  /slow?ms=M         200 \"slow\\n\" after M ms\n"
        "  /work?ms=M&k=K     200 \"work\\n\" after M ms of service by one of K\n"
        "                     workers (per thread); the rest wait in line\n"
        "  /status?code=C     reply with status C\n"
        "  /close             200, then close the connection\n"
        "  /raw?kind=K        raw bytes no server should send (K: 600, 999,\n"
        "                     1xxbody, gzip), then silence until the peer closes\n"
        "  /__stats /__reset  counters (JSON) / zero them\n",
        TU_MAX_THREADS);
}

/* Open a non-blocking listening socket on addr:port. *bound receives the
 * actual port. Returns the fd, or -1 after printing why. */
static int
tu_listen(const char *addr, int port, int reuseport, int *bound)
{
    struct sockaddr_storage ss;
    socklen_t sslen;
    int fd, one = 1;

    memset(&ss, 0, sizeof(ss));
    if (strchr(addr, ':') != NULL) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, addr, &s6->sin6_addr) != 1)
            goto badaddr;
        sslen = sizeof(*s6);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, addr, &s4->sin_addr) != 1)
            goto badaddr;
        sslen = sizeof(*s4);
    }

    fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("tg-testup: socket");
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    /* Accepted sockets inherit it (Linux): a reply written in pieces
     * (headers, chunks) must not wait on Nagle + delayed ACK. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (reuseport &&
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) {
        perror("tg-testup: SO_REUSEPORT");
        goto fail;
    }
    if (bind(fd, (struct sockaddr *)&ss, sslen) != 0) {
        fprintf(stderr, "tg-testup: bind %s:%d: %s\n", addr, port,
                strerror(errno));
        goto fail;
    }
    if (listen(fd, 1024) != 0) {
        perror("tg-testup: listen");
        goto fail;
    }
    sslen = sizeof(ss);
    if (getsockname(fd, (struct sockaddr *)&ss, &sslen) != 0) {
        perror("tg-testup: getsockname");
        goto fail;
    }
    *bound = ntohs(ss.ss_family == AF_INET6
                   ? ((struct sockaddr_in6 *)&ss)->sin6_port
                   : ((struct sockaddr_in *)&ss)->sin_port);
    return fd;

fail:
    close(fd);
    return -1;
badaddr:
    fprintf(stderr, "tg-testup: bad address '%s'\n", addr);
    return -1;
}

static void *
tu_thread_main(void *arg)
{
    struct tu_worker *w = arg;

    event_base_dispatch(w->base);
    return NULL;
}

/* evhttp asks us for a bufferevent once per accepted connection: the one
 * place that sees every connection. Returning NULL lets evhttp make its
 * own. */
static struct bufferevent *
tu_on_accept(struct event_base *base, void *arg)
{
    atomic_fetch_add_explicit(&tu_connections, 1, memory_order_relaxed);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* dispatch                                                            */

static void
tu_on_request(struct evhttp_request *req, void *arg)
{
    struct event_base *base = arg;
    const char *uri = evhttp_request_get_uri(req);
    const char *path;

    /* Hot path: the benchmark target. */
    if (uri[0] == '/' && uri[1] == '\0') {
        atomic_fetch_add_explicit(&tu_requests, 1, memory_order_relaxed);
        tu_h_ok(req);
        return;
    }

    path = evhttp_uri_get_path(evhttp_request_get_evhttp_uri(req));
    if (path == NULL)
        path = "/";

    if (strcmp(path, "/__stats") == 0) {
        tu_h_stats(req);
        return;
    }
    if (strcmp(path, "/__reset") == 0) {
        tu_h_reset(req);
        return;
    }

    atomic_fetch_add_explicit(&tu_requests, 1, memory_order_relaxed);

    if (strcmp(path, "/echo") == 0)
        tu_h_echo(req);
    else if (strcmp(path, "/headers") == 0)
        tu_h_headers(req);
    else if (strcmp(path, "/bytes") == 0)
        tu_h_bytes(req);
    else if (strcmp(path, "/chunked") == 0)
        tu_h_chunked(req, base);
    else if (strcmp(path, "/slow") == 0)
        tu_h_slow(req, base);
    else if (strcmp(path, "/work") == 0)
        tu_h_work(req, base);
    else if (strcmp(path, "/status") == 0)
        tu_h_status(req);
    else if (strcmp(path, "/close") == 0)
        tu_h_close(req);
    else if (strcmp(path, "/raw") == 0)
        tu_h_raw(req);
    else {
        tu_echo_target(req);
        tu_h_ok(req);
    }
}

/* ------------------------------------------------------------------ */
/* handlers                                                            */

static void
tu_h_ok(struct evhttp_request *req)
{
    tu_reply_text(req, 200, "OK", "ok\n");
}

static void
tu_h_echo(struct evhttp_request *req)
{
    struct evkeyvalq *oh = evhttp_request_get_output_headers(req);
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    char len[32];

    snprintf(len, sizeof(len), "%zu", evbuffer_get_length(in));
    evhttp_add_header(oh, "Content-Type", "application/octet-stream");
    evhttp_add_header(oh, "X-Echo-Method",
                      tu_method_name(evhttp_request_get_command(req)));
    evhttp_add_header(oh, "X-Echo-Length", len);
    /* Moves the chains, no copy; send_reply takes the output buffer. */
    evbuffer_add_buffer(evhttp_request_get_output_buffer(req), in);
    tu_send(req, 200, "OK");
}

/* X-Echo-Method / X-Echo-Target: the request line as received, so tests
 * see the exact target a proxy forwarded. */
static void
tu_echo_target(struct evhttp_request *req)
{
    struct evkeyvalq *oh = evhttp_request_get_output_headers(req);

    evhttp_add_header(oh, "X-Echo-Method",
                      tu_method_name(evhttp_request_get_command(req)));
    evhttp_add_header(oh, "X-Echo-Target", evhttp_request_get_uri(req));
}

static void
tu_h_headers(struct evhttp_request *req)
{
    struct evkeyvalq *ih = evhttp_request_get_input_headers(req);
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    struct evkeyval *kv;

    tu_echo_target(req);
    TAILQ_FOREACH(kv, ih, next)
        evbuffer_add_printf(out, "%s: %s\n", kv->key, kv->value);
    evhttp_add_header(evhttp_request_get_output_headers(req),
                      "Content-Type", "text/plain");
    tu_send(req, 200, "OK");
}

static void
tu_h_bytes(struct evhttp_request *req)
{
    uint64_t n;

    if (tu_query_u64(req, "n", 1024, TU_MAX_BODY, &n) != 0) {
        tu_reply_text(req, 400, "Bad Request", "bad n\n");
        return;
    }
    tu_add_pattern(evhttp_request_get_output_buffer(req), 0, n);
    evhttp_add_header(evhttp_request_get_output_headers(req),
                      "Content-Type", "application/octet-stream");
    tu_send(req, 200, "OK");
}

static void
tu_h_chunked(struct evhttp_request *req, struct event_base *base)
{
    struct tu_chunked *c;
    uint64_t n, k, d;

    if (tu_query_u64(req, "n", 1024, TU_MAX_BODY, &n) != 0 ||
        tu_query_u64(req, "chunks", 4, TU_MAX_CHUNKS, &k) != 0 ||
        tu_query_u64(req, "delay_ms", 0, TU_MAX_DELAY_MS, &d) != 0) {
        tu_reply_text(req, 400, "Bad Request", "bad n, chunks or delay_ms\n");
        return;
    }
    /* Never emit an empty chunk: it would read as the terminator. */
    if (k > n)
        k = n;

    c = calloc(1, sizeof(*c));
    if (c == NULL ||
        (c->timer = evtimer_new(base, tu_chunked_tick, c)) == NULL) {
        free(c);
        tu_reply_text(req, 500, "Internal Server Error", "oom\n");
        return;
    }
    c->req = req;
    c->total = n;
    c->chunks = k;
    c->delay = d * 1000;

    evhttp_add_header(evhttp_request_get_output_headers(req),
                      "Content-Type", "application/octet-stream");
    evhttp_send_reply_start(req, 200, "OK");
    /* The first chunk goes out now, the rest D ms apart. */
    tu_chunked_tick(-1, 0, c);
}

/* Send the next chunk, or finish. Runs from the timer, which is the only
 * owner of c. A vanished client shows up as a request without connection:
 * evhttp then leaves the request to us and send_reply_end frees it. */
static void
tu_chunked_tick(evutil_socket_t fd, short what, void *arg)
{
    struct tu_chunked *c = arg;
    struct evbuffer *buf;
    uint64_t len;

    if ((what & EV_TIMEOUT) && tu_timer_early(c->timer, c->next))
        return;
    if (c->chunks == 0 || evhttp_request_get_connection(c->req) == NULL) {
        evhttp_send_reply_end(c->req);
        event_free(c->timer);
        free(c);
        return;
    }

    len = (c->total - c->off) / c->chunks;
    buf = evbuffer_new();
    if (buf != NULL) {
        tu_add_pattern(buf, c->off, len);
        evhttp_send_reply_chunk(c->req, buf);
        evbuffer_free(buf);
    }
    c->off += len;
    c->chunks--;

    if (c->chunks == 0) {
        /* Close the stream now rather than one delay later. */
        tu_chunked_tick(-1, 0, c);
        return;
    }
    c->next = tu_now_us() + c->delay;
    tu_timer_at(c->timer, c->next);
}

static void
tu_h_slow(struct evhttp_request *req, struct event_base *base)
{
    struct tu_slow *s;
    uint64_t ms;

    if (tu_query_u64(req, "ms", 1000, TU_MAX_DELAY_MS, &ms) != 0) {
        tu_reply_text(req, 400, "Bad Request", "bad ms\n");
        return;
    }
    s = calloc(1, sizeof(*s));
    if (s == NULL || (s->timer = evtimer_new(base, tu_slow_fire, s)) == NULL) {
        free(s);
        tu_reply_text(req, 500, "Internal Server Error", "oom\n");
        return;
    }
    s->req = req;
    s->done = tu_now_us() + ms * 1000;
    tu_timer_at(s->timer, s->done);
}

static void
tu_work_start(struct tu_work *w)
{
    tu_work_busy++;
    w->done = tu_now_us() + w->service;
    tu_timer_at(w->timer, w->done);
}

static void
tu_h_work(struct evhttp_request *req, struct event_base *base)
{
    struct tu_work *w;
    uint64_t ms, k;

    if (tu_query_u64(req, "ms", 20, TU_MAX_DELAY_MS, &ms) != 0 ||
        tu_query_u64(req, "k", 4, 100000, &k) != 0 || k == 0) {
        tu_reply_text(req, 400, "Bad Request", "bad ms or k\n");
        return;
    }
    w = calloc(1, sizeof(*w));
    if (w == NULL || (w->timer = evtimer_new(base, tu_work_done, w)) == NULL) {
        free(w);
        tu_reply_text(req, 500, "Internal Server Error", "oom\n");
        return;
    }
    w->req = req;
    w->service = ms * 1000;
    tu_work_k = k;
    if (!tu_work_ready) {
        TAILQ_INIT(&tu_work_queue);
        tu_work_ready = 1;
    }
    if (tu_work_busy < tu_work_k)
        tu_work_start(w);
    else
        TAILQ_INSERT_TAIL(&tu_work_queue, w, link);
}

/* One worker done: answer, then the next in line.  A client gone
 * meanwhile: evhttp_send_reply frees the request. */
static void
tu_work_done(evutil_socket_t fd, short what, void *arg)
{
    struct tu_work *w = arg, *next;

    if (tu_timer_early(w->timer, w->done))
        return;
    tu_reply_text(w->req, 200, "OK", "work\n");
    event_free(w->timer);
    free(w);
    tu_work_busy--;
    while (tu_work_busy < tu_work_k && (next = TAILQ_FIRST(&tu_work_queue)) != NULL) {
        TAILQ_REMOVE(&tu_work_queue, next, link);
        tu_work_start(next);
    }
}

/* If the client left meanwhile, evhttp_send_reply just frees the request. */
static void
tu_slow_fire(evutil_socket_t fd, short what, void *arg)
{
    struct tu_slow *s = arg;

    if (tu_timer_early(s->timer, s->done))
        return;
    tu_reply_text(s->req, 200, "OK", "slow\n");
    event_free(s->timer);
    free(s);
}

static void
tu_h_status(struct evhttp_request *req)
{
    char body[64];
    uint64_t code;

    if (tu_query_u64(req, "code", 200, 599, &code) != 0 || code < 200) {
        tu_reply_text(req, 400, "Bad Request", "bad code (200..599)\n");
        return;
    }
    /* tu_send drops the body of 204 and 304. */
    snprintf(body, sizeof(body), "status %d\n", (int)code);
    tu_reply_text(req, (int)code, tu_reason((int)code), body);
}

static void
tu_h_stats(struct evhttp_request *req)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(req);

    evbuffer_add_printf(out, "{\"connections\":%" PRIuFAST64
        ",\"requests\":%" PRIuFAST64 "}\n",
        atomic_load_explicit(&tu_connections, memory_order_relaxed),
        atomic_load_explicit(&tu_requests, memory_order_relaxed));
    evhttp_add_header(evhttp_request_get_output_headers(req),
                      "Content-Type", "application/json");
    tu_send(req, 200, "OK");
}

static void
tu_h_reset(struct evhttp_request *req)
{
    atomic_store_explicit(&tu_connections, 0, memory_order_relaxed);
    atomic_store_explicit(&tu_requests, 0, memory_order_relaxed);
    tu_reply_text(req, 200, "OK", "reset\n");
}

/* evhttp closes after the reply when the output headers say so. */
static void
tu_h_close(struct evhttp_request *req)
{
    evhttp_add_header(evhttp_request_get_output_headers(req),
                      "Connection", "close");
    tu_reply_text(req, 200, "OK", "closing\n");
}

/* Responses a proxy must refuse (502), written as raw bytes past evhttp,
 * which stays waiting; the connection ends when the peer closes it. */
static void
tu_h_raw(struct evhttp_request *req)
{
    static const struct { const char *kind, *bytes; } raw[] = {
        { "600", "HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok" },
        { "999", "HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok" },
        { "1xxbody", "HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello" },
        { "gzip", "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"
                  "\x1f\x8b" "gzipped" },
    };
    const char *query = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req));
    struct evkeyvalq params;
    const char *kind;
    size_t i;

    TAILQ_INIT(&params);
    if (query == NULL || evhttp_parse_query_str(query, &params) != 0
        || (kind = evhttp_find_header(&params, "kind")) == NULL) {
        evhttp_clear_headers(&params);
        tu_reply_text(req, 400, "Bad Request", "kind?\n");
        return;
    }
    for (i = 0; i < sizeof(raw) / sizeof(raw[0]); i++) {
        if (strcmp(kind, raw[i].kind) == 0) {
            struct bufferevent *bev = evhttp_connection_get_bufferevent(
                evhttp_request_get_connection(req));
            bufferevent_write(bev, raw[i].bytes, strlen(raw[i].bytes));
            bufferevent_enable(bev, EV_WRITE);   /* evhttp turned it off */
            evhttp_clear_headers(&params);
            return;
        }
    }
    evhttp_clear_headers(&params);
    tu_reply_text(req, 400, "Bad Request", "unknown kind\n");
}

/* ------------------------------------------------------------------ */
/* helpers                                                             */

static void
tu_reply_text(struct evhttp_request *req, int code, const char *reason,
              const char *body)
{
    evhttp_add_header(evhttp_request_get_output_headers(req),
                      "Content-Type", "text/plain");
    evbuffer_add(evhttp_request_get_output_buffer(req), body, strlen(body));
    tu_send(req, code, reason);
}

/* Read query parameter name as an unsigned integer in [0, max]; def when
 * absent. Returns 0, or -1 when present but malformed or out of range. */
static int
tu_query_u64(struct evhttp_request *req, const char *name, uint64_t def,
             uint64_t max, uint64_t *out)
{
    const char *query = evhttp_uri_get_query(evhttp_request_get_evhttp_uri(req));
    struct evkeyvalq params;
    const char *v;
    char *end;
    unsigned long long x;
    int rc = 0;

    *out = def;
    if (query == NULL)
        return 0;
    TAILQ_INIT(&params);
    if (evhttp_parse_query_str(query, &params) != 0) {
        evhttp_clear_headers(&params);
        return -1;
    }
    v = evhttp_find_header(&params, name);
    if (v != NULL) {
        errno = 0;
        x = strtoull(v, &end, 10);
        if (*v < '0' || *v > '9' || *end != '\0' || errno != 0 || x > max)
            rc = -1;
        else
            *out = x;
    }
    evhttp_clear_headers(&params);
    return rc;
}

/* Append len pattern bytes starting at body offset off. The bytes are
 * referenced from the static table, never copied, so any size is cheap. */
static void
tu_add_pattern(struct evbuffer *buf, uint64_t off, uint64_t len)
{
    while (len > 0) {
        size_t n = len > TU_PATTERN_BLOCK ? TU_PATTERN_BLOCK : (size_t)len;

        evbuffer_add_reference(buf, tu_pattern + (off & 0xff), n, NULL, NULL);
        off += n;
        len -= n;
    }
}

static const char *
tu_method_name(enum evhttp_cmd_type cmd)
{
    switch (cmd) {
    case EVHTTP_REQ_GET:     return "GET";
    case EVHTTP_REQ_POST:    return "POST";
    case EVHTTP_REQ_HEAD:    return "HEAD";
    case EVHTTP_REQ_PUT:     return "PUT";
    case EVHTTP_REQ_DELETE:  return "DELETE";
    case EVHTTP_REQ_OPTIONS: return "OPTIONS";
    case EVHTTP_REQ_TRACE:   return "TRACE";
    case EVHTTP_REQ_CONNECT: return "CONNECT";
    case EVHTTP_REQ_PATCH:   return "PATCH";
    }
    return "UNKNOWN";
}

static const char *
tu_reason(int code)
{
    size_t i;

    for (i = 0; i < sizeof(tu_reasons) / sizeof(tu_reasons[0]); i++)
        if (tu_reasons[i].code == code)
            return tu_reasons[i].reason;
    return "Status";
}

/* Send the reply held in req's output buffer. evhttp 2.1 writes whatever
 * is in that buffer even for HEAD, 204 and 304, and leaves out the
 * Content-Length of a HEAD reply: drop the body ourselves and give HEAD
 * the length a GET would have had. */
static void
tu_send(struct evhttp_request *req, int code, const char *reason)
{
    struct evbuffer *out = evhttp_request_get_output_buffer(req);
    size_t len = evbuffer_get_length(out);

    if (code == 204 || code == 304) {
        evbuffer_drain(out, len);
    } else if (evhttp_request_get_command(req) == EVHTTP_REQ_HEAD) {
        char num[32];

        snprintf(num, sizeof(num), "%zu", len);
        evhttp_add_header(evhttp_request_get_output_headers(req),
                          "Content-Length", num);
        evbuffer_drain(out, len);
    }
    evhttp_send_reply(req, code, reason, NULL);
}

/* The delays of /work, /slow and /chunked are deadlines on CLOCK_MONOTONIC,
 * not libevent timeouts alone.  libevent's timers run on
 * CLOCK_MONOTONIC_COARSE (a base without EVENT_BASE_FLAG_PRECISE_TIMER,
 * which would add a timerfd_settime to every loop turn), and a timer armed
 * while that clock lags fires early by the lag as soon as other traffic
 * wakes the loop.  The lag is up to a tick (4 ms at HZ=250) and, in a VM
 * whose timekeeping CPU the host holds off, 20-27 ms (measured on the test
 * machine), enough for /work?ms=50 to answer in ~30 ms and give tollgate's
 * adaptive limit a no-load RTT far below the service time (DESIGN-NOTES,
 * "Adaptive concurrency").  So a timer is armed for the time left and,
 * fired early, armed again for the rest. */
static uint64_t
tu_now_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Arm ev to fire at deadline (tu_now_us), or at once if it has passed. */
static void
tu_timer_at(struct event *ev, uint64_t deadline)
{
    uint64_t now = tu_now_us(), left = deadline > now ? deadline - now : 0;
    struct timeval tv;

    tv.tv_sec = (time_t)(left / 1000000);
    tv.tv_usec = (suseconds_t)(left % 1000000);
    evtimer_add(ev, &tv);
}

/* In ev's callback: 1, and ev armed for the rest, if it fired before
 * deadline; else 0. */
static int
tu_timer_early(struct event *ev, uint64_t deadline)
{
    if (tu_now_us() >= deadline)
        return 0;
    tu_timer_at(ev, deadline);
    return 1;
}
