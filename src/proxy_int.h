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
 *   bevio.c     our own reads, write-through, TLS close_notify;
 *   headers.c   the heads we write (pure, include/tollgate/headers.h).
 */
#ifndef TOLLGATE_PROXY_INT_H
#define TOLLGATE_PROXY_INT_H

#include <netinet/in.h>
#include <sys/queue.h>
#include <time.h>

#include <event2/bufferevent.h>
#include <event2/event.h>

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
    struct tg_upstream_pool *pool;
    struct tg_limiter     *limiter;
    struct tg_metrics_shard *shard;      /* this worker's counters */
    struct tg_alog_buf    *alog;         /* access log, or NULL */
    struct tg_anomaly_shard *anomaly;    /* heavy hitters, or NULL */
    time_t                 alog_sec;     /* second of alog_time */
    char                   alog_time[24];   /* "2026-11-28T14:32:10" */
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

struct tg_client {
    TAILQ_ENTRY(tg_client) link;
    struct tg_proxy    *px;
    struct bufferevent *bev;
    int                 fd;
    int                 tls;
    int                 tls_ready;      /* handshake done */
    size_t              linger_bytes;   /* discarded while lingering */
    enum cstate         state;
    unsigned            nreq;           /* requests begun on this connection */
    int                 close_after;    /* close once this response is sent */
    int                 head_timer_on;  /* timer is the header deadline */
    size_t              head_scan;      /* head bytes searched for its end */
    int                 out_wait;       /* output above high water: no new request */
    struct event       *timer;          /* idle / header / linger deadline */
    struct event       *defer;          /* free, or serve a pipelined request */
    struct event       *rev;            /* plain sockets: our own read event */
    struct event       *urev;           /* our read event on the lent upstream */
    struct tg_connslot *slot;           /* connection count, released at free */
    char                ip[INET6_ADDRSTRLEN];

    /* the current request */
    char               *headbuf;        /* copy of the head; req points in;
                                           allocated when a head is complete */
    size_t              headcap;
    tg_http_req         req;
    char                reqid[TG_REQID_MAX + 1];
    size_t              reqid_len;
    int                 rq_done;        /* body fully passed upstream */
    int                 rq_paused;      /* client reads off: upstream full */
    uint64_t            rq_left;        /* Content-Length bytes still due */
    uint64_t            rq_total;       /* body bytes so far (limit check) */
    int                 rq_bad;         /* body error found inside a callback */
    tg_chunked          rq_chunk;
    int                 charging;       /* waiting for the limiter's answer */
    uint64_t            t_start_us;     /* request head complete */
    uint64_t            t_up_us;        /* forwarded upstream (0: not) */
    size_t              up_server;      /* index of the server it went to */
    uint64_t            rs_bytes;       /* response body bytes relayed */
    tg_limit_ctx        lctx;
    tg_limit_outcome    lo;

    /* the upstream exchange */
    struct tg_uconn    *uc;
    struct tg_uconn    *avoid;          /* retry: the connection that failed */
    struct tg_upstream_waiter *waiter;  /* waiting for an upstream slot */
    int                 reported;       /* outcome given to the server's breaker */
    int                 uc_reused;
    int                 uc_connected;
    int                 retried;
    enum ustate         ustate;
    struct event       *up_timer;
    uint64_t            phase_deadline; /* connect or first byte; 0 = none */
    uint64_t            total_deadline;
    int                 phase_is_connect;
    int                 rs_started;     /* response head sent to client */
    int                 rs_status;
    enum tg_http_body   rs_body;
    uint64_t            rs_left;
    int                 rs_keep;        /* upstream allows reuse */
    int                 rs_chunked_out; /* re-chunk towards the client */
    int                 rs_paused;      /* upstream reads off: client full */
    tg_chunked          rs_chunk;
};

/* ---- client.c --------------------------------------------------------- */

void tg_client_read_cb(struct bufferevent *bev, void *arg);
void tg_client_event_cb(struct bufferevent *bev, short what, void *arg);
void tg_client_kill(struct tg_client *c);

/* ---- exchange.c ------------------------------------------------------- */

void tg_exchange_read_cb(struct bufferevent *bev, void *arg);
void tg_exchange_event_cb(struct bufferevent *bev, short what, void *arg);

/* ---- bevio.c ---------------------------------------------------------- */

void tg_bev_client_rd_cb(evutil_socket_t fd, short what, void *arg);
void tg_bev_up_rd_cb(evutil_socket_t fd, short what, void *arg);
void tg_bev_up_read_start(struct tg_client *c);
void tg_bev_flush(struct bufferevent *bev);
void tg_bev_close_notify(struct tg_client *c);

/*
 * Plain sockets are read by our own event, straight into the bufferevent's
 * input (its tail thawed around the read, as libevent's own read callback
 * does).  libevent's read path asks the kernel how much is readable
 * (ioctl FIONREAD) before every read: one system call per read that we do
 * without.  TLS connections are read by their bufferevent.  timeout is the
 * body timeout while a body is expected, else NULL (the head and idle
 * deadlines are c->timer's).
 */
static inline void
tg_bev_rd_on(struct tg_client *c, const struct timeval *timeout)
{
    if (c->rev != NULL) {
        /* event_add with NULL keeps a pending timeout: remove it, so a
         * body timeout never outlives the body */
        event_add(c->rev, timeout);
        if (timeout == NULL) {
            event_remove_timer(c->rev);
        }
    } else {
        bufferevent_set_timeouts(c->bev, timeout, &c->px->send_tv);
        bufferevent_enable(c->bev, EV_READ);
    }
}

static inline void
tg_bev_rd_off(struct tg_client *c)
{
    if (c->rev != NULL) {
        event_del(c->rev);
    } else {
        bufferevent_disable(c->bev, EV_READ);
    }
}

/* Write-through (tg_bev_flush) of the client's output; TLS goes through
 * its bufferevent. */
static inline void
tg_bev_client_flush(struct tg_client *c)
{
    if (!c->tls) {
        tg_bev_flush(c->bev);
    }
}

/* Write-through of the lent upstream connection's output, once connected. */
static inline void
tg_bev_up_flush(struct tg_client *c)
{
    if (c->uc != NULL && c->uc_connected) {
        tg_bev_flush(tg_uconn_bev(c->uc));
    }
}

#endif
