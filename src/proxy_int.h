/*
 * proxy_int.h - what the files of the request path share (private to
 * proxy.c, client.c, exchange.c, bevio.c; not for other modules).
 *
 * One worker has ONE struct tg_proxy (proxy.c) and one struct tg_client per
 * client connection (client.c); both are used only on the worker's thread.
 *   proxy.c     the worker's proxy: create, reload, drain, caches;
 *   client.c    a connection's lifetime, its request heads, the limiter
 *               hand-off, our own answers and the accounting;
 *   exchange.c  one upstream exchange: forward, both body relays, the
 *               upstream timers, retry, tg_exchange_end;
 *   bevio.c     our own reads, write-through, TLS records on the socket;
 *   headers.c   the heads we write (pure, include/tollgate/headers.h).
 */
#ifndef TOLLGATE_PROXY_INT_H
#define TOLLGATE_PROXY_INT_H

#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/bufferevent.h>
#include <event2/event.h>

#include "tollgate/common.h"
#include "tollgate/http.h"
#include "tollgate/limiter.h"
#include "tollgate/proxy.h"
#include "tollgate/upstream.h"

#define TG_HIGH_WATER        (256 * 1024)
#define TG_LOW_WATER         (64 * 1024)
#define TG_UP_HEAD_MAX       (64 * 1024)    /* upstream response head limit */
#define TG_LINGER_MS         2000           /* lingering close bound */
#define TG_LINGER_BYTES      (64u << 20)    /* ... and bytes discarded */
#define TG_REQID_MAX         128
#define TG_HEADBUF_KEEP      1024           /* head copies of this size are cached */
#define TG_TLS_IDLE_MS       100            /* TLS: idle this long, OpenSSL's
                                               buffers are given back */
#define TG_REQ_CACHE         256            /* cached header arrays, head copies */

enum cstate {
    C_HEAD,        /* waiting for (more of) a request head */
    C_BUSY,        /* a request is being served */
    C_CLOSING,     /* flushing the last response, then linger or free */
    C_LINGER,      /* write side shut; discarding input until EOF or timer */
    C_DEAD         /* to be freed by the defer event */
};

enum ustate { U_NONE, U_HEAD, U_BODY };

struct tg_client;
TAILQ_HEAD(tg_client_list, tg_client);

struct tg_proxy {
    struct event_base     *base;
    tg_conf               *conf;         /* the latest snapshot (reload): http.*,
                                            upstream timeouts */
    tg_conf               *conf0;        /* the one at start: metric labels,
                                            upstream servers (the pool's) */
    const tg_proxy_env    *env;          /* the worker's limiter, pool, shard,
                                            log buffer, anomaly shard */
    tg_http_limits         lim;
    struct tg_client_list  clients;
    unsigned               nclients;
    int                    draining;
    void                 (*on_empty)(void *arg);
    void                  *on_empty_arg;
    uint64_t               rng[2];        /* xorshift128+ for request ids */
    struct timeval         body_tv;       /* client read timeout, body */
    struct timeval         send_tv;       /* client write timeout */
    /* What a request needs and an idle connection does not hold: header
     * arrays and TG_HEADBUF_KEEP-byte head copies given back by
     * connections going idle, for the next head (no malloc per request
     * in the steady state).  Lists linked through their first bytes. */
    void                  *free_hdrs;
    unsigned               nfree_hdrs;
    void                  *free_heads;
    unsigned               nfree_heads;
};

/*
 * One client connection.  Created by tg_proxy_accept (client.c) and freed
 * only by tg_client_free from its own defer event (see client.c,
 * "Ownership and lifetime").  Its parts:
 *   conn  the connection, from accept to free (client.c);
 *   io    the events and timers it owns (all freed with it);
 *   rq    the current request: set up by handle_head/start_request,
 *         its head memory given back by head_release (client.c);
 *   up    the upstream exchange, from tg_exchange_forward to
 *         tg_exchange_end (exchange.c): the lent connection is the
 *         pool's, given back in tg_exchange_end only;
 *   rs    the response to the client, relayed or our own.
 */
struct tg_client {
    TAILQ_ENTRY(tg_client) link;        /* in px->clients */
    struct tg_proxy    *px;             /* the worker's proxy (outlives it) */

    struct {
        struct bufferevent *bev;        /* owned; closes fd when freed */
        int                 fd;
        int                 tls;
        int                 tls_ready;  /* handshake done */
        SSL                *ssl;        /* TLS: owned, on fd (bevio.c); else NULL */
        unsigned            tls_want;   /* TLS_* flags of bevio.c: what waits */
        int                 tls_wlen;   /* SSL_write to repeat after WANT_*, or 0 */
        enum cstate         state;
        unsigned            nreq;       /* requests begun on this connection */
        int                 close_after;   /* close once this response is sent */
        int                 out_wait;   /* output above high water: no new request */
        size_t              linger_bytes;  /* discarded while lingering */
        struct tg_connslot *slot;       /* connection count, released at free */
        char                ip[INET6_ADDRSTRLEN];
    } conn;

    struct {
        struct event       *timer;      /* idle / header / linger deadline,
                                           lazy (client.c, arm_timer) */
        uint64_t            deadline;   /* tg_now_ms of the deadline, 0: none */
        uint64_t            timer_at;   /* ... timer is pending for (if on) */
        int                 timer_on;   /* timer pending */
        int                 head_timer_on;  /* deadline is the header deadline */
        int                 idle_after_out; /* the idle wait starts once the
                                               answer is all out (client.c) */
        uint64_t            tls_idle_at;    /* TLS: buffers given back then if
                                               still idle (tg_now_ms), 0: none */
        struct event       *defer;      /* free, or serve a pipelined request */
        struct event       *rev;        /* our own read event */
        int                 rd_on;      /* rev added (tg_bev_rd_on/off only) */
        int                 rd_timed;   /* ... with the body timeout */
        struct event       *wev;        /* TLS: our write event, or NULL */
        struct event       *up_timer;   /* the exchange's deadlines (up.*) */
    } io;

    struct {
        char               *headbuf;    /* copy of the head; req points in;
                                           allocated when a head is complete */
        size_t              headcap;
        size_t              head_scan;  /* head bytes searched for its end */
        tg_http_req         req;        /* hdr: from the proxy's cache */
        char                reqid[TG_REQID_MAX + 1];
        size_t              reqid_len;
        int                 done;       /* body fully passed upstream */
        int                 paused;     /* client reads off: upstream full */
        uint64_t            left;       /* Content-Length bytes still due */
        uint64_t            total;      /* body bytes so far (limit check) */
        int                 bad;        /* body error found inside a callback */
        tg_chunked          chunk;
        int                 charging;   /* waiting for the limiter's answer */
        uint64_t            t_start_us; /* request head complete */
        tg_limit_ctx        lctx;       /* the limiter's, while charging */
        tg_limit_outcome    lo;         /* what the limiter decided */
    } rq;

    struct {
        struct tg_uconn    *uc;         /* lent by the pool, or NULL */
        struct tg_uconn    *avoid;      /* retry: the connection that failed */
        struct tg_upstream_waiter *waiter;  /* waiting for an upstream slot */
        enum ustate         state;
        int                 reported;   /* outcome given to the server's breaker */
        int                 reused;     /* uc was kept alive */
        int                 connected;
        int                 retried;
        uint64_t            phase_deadline;   /* connect or first byte; 0 = none */
        uint64_t            total_deadline;
        uint64_t            armed_ms;         /* up_timer pending for this (lazy) */
        int                 phase_is_connect;
        uint64_t            t_up_us;    /* forwarded upstream (0: not) */
        size_t              server;     /* index of the server it went to */
    } up;

    struct {
        int                 started;    /* response head sent to client */
        int                 status;
        enum tg_http_body   body;
        uint64_t            left;       /* Content-Length bytes still due */
        uint64_t            bytes;      /* response body bytes relayed */
        int                 keep;       /* upstream allows reuse */
        int                 chunked_out;   /* re-chunk towards the client */
        int                 paused;     /* upstream reads off: client full */
        tg_chunked          chunk;
    } rs;
};

/* ---- proxy.c: the worker's caches of head memory ------------------------ */

/* A block of size from the list (linked through its first bytes), or a
 * new one. */
static inline void *
tg_proxy_cache_get(void **list, unsigned *n, size_t size)
{
    void *p = *list;

    if (p == NULL) {
        return tg_xmalloc(size);
    }
    memcpy(list, p, sizeof(void *));
    (*n)--;
    return p;
}

/* p (a block of the list's size) onto the list, or freed when the list
 * is full.  NULL is ignored. */
static inline void
tg_proxy_cache_put(void **list, unsigned *n, void *p)
{
    if (p == NULL) {
        return;
    }
    if (*n >= TG_REQ_CACHE) {
        free(p);
        return;
    }
    memcpy(p, list, sizeof(void *));
    *list = p;
    (*n)++;
}

/* ---- client.c --------------------------------------------------------- */

/* Callbacks of the client's bufferevent (also called by bevio.c). */
void tg_client_read_cb(struct bufferevent *bev, void *arg);
void tg_client_event_cb(struct bufferevent *bev, short what, void *arg);
/* End the connection now: freed by its defer event (never in the caller). */
void tg_client_kill(struct tg_client *c);
/* Send what is buffered, then close (lingering). */
void tg_client_close_after_flush(struct tg_client *c);
/* Free c: only from its defer event, or when the proxy is destroyed. */
void tg_client_free(struct tg_client *c);
/* Ready for the next request on a persistent connection. */
void tg_client_next_request(struct tg_client *c);
/* Our own answer: a JSON error body; extra: more header lines (CRLF-ended). */
void tg_client_respond(struct tg_client *c, int status, const char *code,
                       const char *msg, const char *extra, size_t extra_len);
void tg_client_respond_error(struct tg_client *c, int status, const char *code,
                             const char *msg);
/* Count one finished request (metrics, access log); a second call adds
 * nothing. */
void tg_client_account(struct tg_client *c);

/* ---- exchange.c ------------------------------------------------------- */

/* Forward the current request (admitted) to an upstream connection. */
void tg_exchange_forward(struct tg_client *c);
/* Move what the client sent of the body upstream (backpressure). */
void tg_exchange_relay_request(struct tg_client *c);
/* Move what the upstream sent of the body to the client (backpressure). */
void tg_exchange_relay_response(struct tg_client *c);
/* Give the lent connection back to the pool (reusable: kept alive if the
 * request body was read whole); the ONE release point.  No-op without one. */
void tg_exchange_end(struct tg_client *c, int reusable);
/* The response is fully queued to the client: account, then next or close. */
void tg_exchange_response_done(struct tg_client *c);
/* Callbacks of the lent connection's bufferevent and of c->io.up_timer. */
void tg_exchange_read_cb(struct bufferevent *bev, void *arg);
void tg_exchange_event_cb(struct bufferevent *bev, short what, void *arg);
void tg_exchange_timer_cb(evutil_socket_t fd, short what, void *arg);

/* ---- bevio.c ---------------------------------------------------------- */

/* Our read event on a plain client socket (c->io.rev); the reader of the
 * lent upstream connection's own read event, which tg_bev_up_read_start
 * points at c once connected (upstream.h, tg_uconn_read_start). */
void tg_bev_client_rd_cb(evutil_socket_t fd, short what, void *arg);
void tg_bev_up_rd_cb(evutil_socket_t fd, short what, void *arg);
void tg_bev_up_read_start(struct tg_client *c);
/* Write bev's output to its socket now (write-through); EV_WRITE only
 * when the kernel does not take it all. */
void tg_bev_flush(struct bufferevent *bev);
/* TLS: send close_notify when between records and past the handshake. */
void tg_bev_close_notify(struct tg_client *c);
/* TLS client connections: our own SSL on the socket (bevio.c).  setup
 * makes c->conn.ssl and c->io.wev (TG_ERR: OpenSSL refused); flush writes
 * the output as records now; kick reads again what the SSL holds already;
 * stop and free end it (with tg_client_kill, tg_client_free). */
tg_rc tg_bev_tls_setup(struct tg_client *c, SSL_CTX *ctx);
void tg_bev_tls_flush(struct tg_client *c);
void tg_bev_tls_kick(struct tg_client *c);
void tg_bev_tls_stop(struct tg_client *c);
void tg_bev_tls_release(struct tg_client *c);
void tg_bev_tls_rd_off(struct tg_client *c);
void tg_bev_tls_free(struct tg_client *c);

/*
 * Client sockets are read by our own event, straight into the
 * bufferevent's input (its tail thawed around the read, as libevent's own
 * read callback does).  libevent's read path asks the kernel how much is
 * readable (ioctl FIONREAD) before every read: one system call per read
 * that we do without.  TLS connections are decrypted into it by SSL_read
 * in the same callback.  timeout is the body timeout while a body is
 * expected, else NULL (the head and idle deadlines are c->io.timer's).
 */
static inline void
tg_bev_rd_on(struct tg_client *c, const struct timeval *timeout)
{
    if (c->io.rev != NULL) {
        if (timeout == NULL && c->io.rd_on && !c->io.rd_timed) {
            if (c->conn.ssl != NULL) {
                tg_bev_tls_kick(c);     /* records already read: no readiness */
            }
            return;                     /* as it is: no event_add per request */
        }
        /* event_add with NULL keeps a pending timeout: remove it, so a
         * body timeout never outlives the body */
        event_add(c->io.rev, timeout);
        if (timeout == NULL) {
            event_remove_timer(c->io.rev);
        }
        c->io.rd_on = 1;
        c->io.rd_timed = timeout != NULL;
        if (c->conn.ssl != NULL) {
            tg_bev_tls_kick(c);    /* records already read: no readiness */
        }
    } else {
        bufferevent_set_timeouts(c->conn.bev, timeout, &c->px->send_tv);
        bufferevent_enable(c->conn.bev, EV_READ);
    }
}

static inline void
tg_bev_rd_off(struct tg_client *c)
{
    if (c->conn.tls_want != 0) {
        tg_bev_tls_rd_off(c);           /* an SSL_write may wait for a read */
    } else if (c->io.rev != NULL) {
        event_del(c->io.rev);
        c->io.rd_on = 0;
        c->io.rd_timed = 0;
    } else {
        bufferevent_disable(c->conn.bev, EV_READ);
    }
}

/* Write-through of the client's output: plain (tg_bev_flush) or as TLS
 * records (tg_bev_tls_flush). */
static inline void
tg_bev_client_flush(struct tg_client *c)
{
    if (c->conn.ssl == NULL) {
        tg_bev_flush(c->conn.bev);
    } else {
        tg_bev_tls_flush(c);
    }
}

/* Write-through of the lent upstream connection's output, once connected. */
static inline void
tg_bev_up_flush(struct tg_client *c)
{
    if (c->up.uc != NULL && c->up.connected) {
        tg_bev_flush(tg_uconn_bev(c->up.uc));
    }
}

#endif
