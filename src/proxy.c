/*
 * proxy.c - client connections and the forwarding of one request at a time
 * per connection (HTTP/1.1 keep-alive; pipelined requests wait their turn).
 *
 * Ownership and lifetime.  A client (struct tg_client) is only ever freed
 * from its own `defer` event: every path that ends a connection marks it
 * (C_DEAD, or C_CLOSING / C_LINGER for a graceful end) and activates that
 * event.  So no callback ever frees the object it is running for, whichever
 * of the three directions (client, upstream, timer) ends the exchange.
 * The upstream connection is lent by the pool for one exchange and given
 * back (reusable or not) in exactly one place, exchange_end().
 *
 * Backpressure.  Each direction moves data between two bufferevents; when
 * the destination's output holds more than TG_HIGH_WATER bytes the source
 * stops reading, and the destination's write callback (low watermark)
 * resumes it.  No body is ever buffered whole.  Answers we write ourselves
 * obey the same mark: no next request is parsed while the client's output
 * is above it (client_next_request).
 */
#include "tollgate/proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "tollgate/accesslog.h"
#include "tollgate/anomaly.h"
#include "tollgate/connlimit.h"
#include "tollgate/headers.h"
#include "tollgate/http.h"
#include "tollgate/limiter.h"
#include "tollgate/metrics.h"
#include "tollgate/target.h"
#include "tollgate/upstream.h"
#include "proxy_int.h"

static void client_write_cb(struct bufferevent *bev, void *arg);
static void client_timer_cb(evutil_socket_t fd, short what, void *arg);
static void client_defer_cb(evutil_socket_t fd, short what, void *arg);
static void client_free(struct tg_client *c);
static void *cache_get(void **list, unsigned *n, size_t size);
static void cache_put(void **list, unsigned *n, void *p);
static void cache_drain(void **list, unsigned *n);
static void client_close_after_flush(struct tg_client *c);
static void client_next_request(struct tg_client *c);
static void arm_timer(struct tg_client *c, unsigned ms);
static void handle_head(struct tg_client *c);
static void start_request(struct tg_client *c);
static void request_reset(struct tg_client *c, uint64_t t_start_us);
static void forward(struct tg_client *c);
static void relay_request_body(struct tg_client *c);
static void request_body_done(struct tg_client *c);
static void respond_error(struct tg_client *c, int status, const char *code,
                          const char *msg);
static void respond(struct tg_client *c, int status, const char *code,
                    const char *msg, const char *extra, size_t extra_len);
static void limit_decided(void *arg);
static void account(struct tg_client *c);
static void access_log(struct tg_client *c, uint64_t now_us);
static int idempotent(const tg_http_req *r);
static void limit_apply(struct tg_client *c);
static void admit(struct tg_client *c);
static void admitted(void *arg, enum tg_upstream_admit result);
static size_t tier_label(const struct tg_client *c);
static void up_write_cb(struct bufferevent *bev, void *arg);
static void up_timer_cb(evutil_socket_t fd, short what, void *arg);
static void up_arm(struct tg_client *c);
static void up_failed(struct tg_client *c, int status, const char *code,
                      const char *msg);
static void relay_response_body(struct tg_client *c);
static void exchange_end(struct tg_client *c, int reusable);
static void response_done(struct tg_client *c);
static void make_request_id(struct tg_client *c);
static tg_rc normalize_target(struct tg_client *c);
static void set_limits(struct tg_proxy *px);
static void head_release(struct tg_client *c);

/* ---- public -------------------------------------------------------- */

struct tg_proxy *
tg_proxy_create(struct event_base *base, tg_conf *conf, struct tg_keys *keys,
                void (*on_empty)(void *arg), void *arg, char *err, size_t errlen)
{
    struct tg_proxy *px = tg_xcalloc(1, sizeof(*px));

    px->limiter = tg_limiter_create(base, conf, keys, err, errlen);
    if (px->limiter == NULL) {
        free(px);
        return NULL;
    }
    px->base = base;
    px->conf = tg_conf_ref(conf);
    px->conf0 = tg_conf_ref(conf);
    px->pool = tg_upstream_pool_create(base, conf);
    px->shard = tg_metrics_shard_create();
    tg_limiter_set_shard(px->limiter, px->shard);
    tg_upstream_pool_set_shard(px->pool, px->shard);
    set_limits(px);
    px->on_empty = on_empty;
    px->on_empty_arg = arg;
    TAILQ_INIT(&px->clients);
    if (getrandom(px->rng, sizeof(px->rng), 0) != (ssize_t)sizeof(px->rng)) {
        px->rng[0] = tg_now_us() ^ (uint64_t)(uintptr_t)px;
        px->rng[1] = 0x9e3779b97f4a7c15ull;
    }
    px->rng[1] |= 1;
    return px;
}

void
tg_proxy_destroy(struct tg_proxy *px)
{
    struct tg_client *c;

    if (px == NULL) {
        return;
    }
    while ((c = TAILQ_FIRST(&px->clients)) != NULL) {
        client_free(c);
    }
    tg_upstream_pool_destroy(px->pool);
    tg_limiter_destroy(px->limiter);
    tg_metrics_shard_destroy(px->shard);
    if (px->alog != NULL) {
        tg_alog_buf_destroy(px->alog);
    }
    tg_conf_unref(px->conf);
    tg_conf_unref(px->conf0);
    cache_drain(&px->free_hdrs, &px->nfree_hdrs);
    cache_drain(&px->free_heads, &px->nfree_heads);
    free(px);
}

/* New requests and exchanges take http.* and the upstream timeouts from
 * the new snapshot; what is under way keeps the deadlines it has. */
void
tg_proxy_reload(struct tg_proxy *px, tg_conf *conf, struct tg_keys *keys)
{
    tg_limiter_reload(px->limiter, conf, keys);
    tg_conf_unref(px->conf);
    px->conf = tg_conf_ref(conf);
    set_limits(px);
}

static void
set_limits(struct tg_proxy *px)
{
    const tg_conf *conf = px->conf;

    px->lim.max_request_line = conf->http.max_request_line;
    px->lim.max_header_bytes = conf->http.max_header_bytes;
    px->lim.max_headers = conf->http.max_headers;
    px->body_tv.tv_sec = conf->http.body_timeout_ms / 1000;
    px->body_tv.tv_usec = (conf->http.body_timeout_ms % 1000) * 1000;
    px->send_tv.tv_sec = conf->http.send_timeout_ms / 1000;
    px->send_tv.tv_usec = (conf->http.send_timeout_ms % 1000) * 1000;
}

struct tg_metrics_shard *
tg_proxy_shard(struct tg_proxy *px)
{
    return px->shard;
}

int
tg_proxy_upstream_state(struct tg_proxy *px, size_t server)
{
    return (int)tg_upstream_server_state(px->pool, server);
}

void
tg_proxy_sample(struct tg_proxy *px)
{
    tg_limiter_sample(px->limiter);
}

int
tg_proxy_redis_breaker(struct tg_proxy *px)
{
    return tg_limiter_breaker_state(px->limiter);
}

void
tg_proxy_set_access_log(struct tg_proxy *px, struct tg_alog *log)
{
    px->alog = tg_alog_buf_create(log, px->base);
}

void
tg_proxy_set_anomaly(struct tg_proxy *px, struct tg_anomaly_shard *sh)
{
    px->anomaly = sh;
}

int
tg_proxy_store_ready(const struct tg_proxy *px)
{
    return tg_limiter_store_ready(px->limiter);
}

unsigned
tg_proxy_nclients(const struct tg_proxy *px)
{
    return px->nclients;
}

void
tg_proxy_accept(struct tg_proxy *px, int fd, SSL_CTX *ssl_ctx, struct tg_connslot *slot)
{
    struct tg_client *c;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int one = 1;

    if (px->draining) {
        close(fd);
        tg_connlimit_release(slot);
        return;
    }
    c = tg_xcalloc(1, sizeof(*c));
    c->px = px;
    c->fd = fd;
    c->slot = slot;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET) {
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, c->ip, sizeof(c->ip));
        } else if (ss.ss_family == AF_INET6) {
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, c->ip, sizeof(c->ip));
        }
    }
    if (c->ip[0] == '\0') {
        strcpy(c->ip, "unknown");
    }

    if (ssl_ctx != NULL) {
        SSL *ssl = SSL_new(ssl_ctx);
        if (ssl == NULL) {
            close(fd);
            tg_connlimit_release(slot);
            free(c);
            return;
        }
        c->tls = 1;
        c->bev = bufferevent_openssl_socket_new(px->base, fd, ssl,
                     BUFFEREVENT_SSL_ACCEPTING, BEV_OPT_CLOSE_ON_FREE);
        if (c->bev != NULL) {
            bufferevent_openssl_set_allow_dirty_shutdown(c->bev, 1);
        }
    } else {
        c->bev = bufferevent_socket_new(px->base, fd, BEV_OPT_CLOSE_ON_FREE);
    }
    if (c->bev == NULL) {
        close(fd);
        tg_connlimit_release(slot);
        free(c);
        return;
    }
    c->timer = evtimer_new(px->base, client_timer_cb, c);
    c->defer = event_new(px->base, -1, 0, client_defer_cb, c);
    c->up_timer = evtimer_new(px->base, up_timer_cb, c);
    c->urev = event_new(px->base, -1, 0, tg_bev_up_rd_cb, c);   /* assigned per exchange */
    TAILQ_INSERT_TAIL(&px->clients, c, link);
    px->nclients++;
    tg_metric_gauge_add(px->shard, TG_M_CONNECTIONS_OPEN, 0, 1);

    bufferevent_setcb(c->bev, tg_client_read_cb, client_write_cb, tg_client_event_cb, c);
    bufferevent_setwatermark(c->bev, EV_WRITE, TG_LOW_WATER, 0);
    /* Pipelined requests wait in the input while one is served; past
     * this much the bufferevent stops reading by itself. */
    bufferevent_setwatermark(c->bev, EV_READ, 0, TG_HIGH_WATER);
    bufferevent_set_timeouts(c->bev, NULL, &px->send_tv);
    if (c->tls) {
        bufferevent_enable(c->bev, EV_READ | EV_WRITE);
    } else {
        bufferevent_disable(c->bev, EV_WRITE);   /* on by default: write-through */
        c->rev = event_new(px->base, fd, EV_READ | EV_PERSIST, tg_bev_client_rd_cb, c);
        tg_bev_rd_on(c, NULL);
    }
    c->state = C_HEAD;
    if (c->tls) {
        /* the header deadline starts when the handshake ends */
        arm_timer(c, px->conf->http.handshake_timeout_ms);
    } else {
        c->head_timer_on = 1;
        arm_timer(c, px->conf->http.header_timeout_ms);
    }
}

void
tg_proxy_drain(struct tg_proxy *px)
{
    struct tg_client *c, *next;

    px->draining = 1;
    tg_upstream_pool_close_idle(px->pool);
    for (c = TAILQ_FIRST(&px->clients); c != NULL; c = next) {
        next = TAILQ_NEXT(c, link);
        if (c->state == C_HEAD
            && evbuffer_get_length(bufferevent_get_input(c->bev)) == 0) {
            if (evbuffer_get_length(bufferevent_get_output(c->bev)) != 0) {
                client_close_after_flush(c);    /* answers still queued */
            } else {
                tg_bev_close_notify(c);
                tg_client_kill(c);
            }
        } else {
            c->close_after = 1;
        }
    }
    if (px->nclients == 0 && px->on_empty != NULL) {
        px->on_empty(px->on_empty_arg);
    }
}

/* ---- connection lifetime ------------------------------------------- */

static void
client_free(struct tg_client *c)
{
    struct tg_proxy *px = c->px;

    if (c->uc != NULL) {
        tg_upstream_release(c->uc, 0);
        c->uc = NULL;
    }
    if (c->charging) {
        tg_limiter_cancel(&c->lctx);
    }
    tg_upstream_admit_cancel(c->waiter);
    if (c->rev != NULL) {
        event_free(c->rev);
    }
    event_free(c->urev);
    event_free(c->timer);
    event_free(c->defer);
    event_free(c->up_timer);
    bufferevent_free(c->bev);
    head_release(c);
    tg_connlimit_release(c->slot);
    TAILQ_REMOVE(&px->clients, c, link);
    free(c);
    px->nclients--;
    tg_metric_gauge_add(px->shard, TG_M_CONNECTIONS_OPEN, 0, -1);
    if (px->draining && px->nclients == 0 && px->on_empty != NULL) {
        px->on_empty(px->on_empty_arg);
    }
}

/* End the connection now (error, reset, timeout): freed on the next loop
 * turn by the defer event, never inside the caller's callback. */
void
tg_client_kill(struct tg_client *c)
{
    if (c->state == C_DEAD) {
        return;
    }
    c->state = C_DEAD;
    tg_bev_rd_off(c);
    bufferevent_disable(c->bev, EV_READ | EV_WRITE);
    bufferevent_setcb(c->bev, NULL, NULL, NULL, NULL);
    if (c->uc != NULL) {
        exchange_end(c, 0);
    }
    if (c->charging) {
        tg_limiter_cancel(&c->lctx);
        c->charging = 0;
    }
    tg_upstream_admit_cancel(c->waiter);
    c->waiter = NULL;
    event_del(c->timer);
    event_active(c->defer, EV_TIMEOUT, 1);
}

/* Send what is buffered, then close: lingering (discard input for a while)
 * so that a client still sending a body we refused reads our answer
 * instead of a reset. */
static void
client_close_after_flush(struct tg_client *c)
{
    c->state = C_CLOSING;
    tg_bev_rd_off(c);
    bufferevent_setwatermark(c->bev, EV_WRITE, 0, 0);
    arm_timer(c, c->px->conf->http.send_timeout_ms);
    tg_bev_client_flush(c);
    if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0) {
        event_active(c->defer, EV_TIMEOUT, 1);
    }
}

static void
client_defer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_client *c = arg;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    switch (c->state) {
    case C_DEAD:
        client_free(c);
        return;
    case C_CLOSING:
        if (evbuffer_get_length(bufferevent_get_output(c->bev)) != 0) {
            return;   /* the write callback comes back here */
        }
        tg_bev_close_notify(c);
        if (shutdown(c->fd, SHUT_WR) != 0) {
            client_free(c);
            return;
        }
        c->state = C_LINGER;
        evbuffer_drain(bufferevent_get_input(c->bev),
                       evbuffer_get_length(bufferevent_get_input(c->bev)));
        bufferevent_set_timeouts(c->bev, NULL, NULL);
        if (c->tls) {
            /* TLS is over (close_notify sent): discard raw bytes, not
             * records, with our own read event */
            bufferevent_disable(c->bev, EV_READ | EV_WRITE);
            c->rev = event_new(c->px->base, c->fd, EV_READ | EV_PERSIST,
                               tg_bev_client_rd_cb, c);
        }
        tg_bev_rd_on(c, NULL);
        arm_timer(c, TG_LINGER_MS);
        return;
    case C_HEAD:
        if (!c->out_wait && evbuffer_get_length(bufferevent_get_input(c->bev)) != 0) {
            handle_head(c);
        }
        return;
    default:
        return;
    }
}

static void
arm_timer(struct tg_client *c, unsigned ms)
{
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    evtimer_add(c->timer, &tv);
}

static void
client_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_client *c = arg;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    switch (c->state) {
    case C_HEAD:
        if (evbuffer_get_length(bufferevent_get_input(c->bev)) == 0) {
            tg_bev_close_notify(c);      /* idle keep-alive, or handshake timeout */
            tg_client_kill(c);
        } else {
            /* no request of its own yet: no id, method or path of the
             * last one; it began when the header deadline was armed */
            request_reset(c, tg_now_us()
                          - (uint64_t)c->px->conf->http.header_timeout_ms * 1000);
            c->req.method = NULL;
            c->req.path = NULL;
            c->req.body = TG_BODY_NONE;
            respond_error(c, 408, "request_timeout",
                          "the request head did not arrive in time");
        }
        return;
    case C_CLOSING:
    case C_LINGER:
        tg_client_kill(c);
        return;
    default:
        return;
    }
}

/* Ready for the next request on a persistent connection. */
static void
client_next_request(struct tg_client *c)
{
    struct tg_proxy *px = c->px;

    c->state = C_HEAD;
    c->rq_paused = 0;
    tg_bev_client_flush(c);
    if (evbuffer_get_length(bufferevent_get_output(c->bev)) > TG_HIGH_WATER) {
        /* A client that does not read its answers (pipelining) gets no
         * new request parsed until they drain: the write callback (low
         * water) comes back here; the send timeout bounds the wait. */
        c->out_wait = 1;
        tg_bev_rd_off(c);
        event_del(c->timer);
        return;
    }
    c->out_wait = 0;
    tg_bev_rd_on(c, NULL);
    if (evbuffer_get_length(bufferevent_get_input(c->bev)) != 0) {
        /* pipelined: serve it from the loop, not by recursion */
        c->head_timer_on = 1;
        arm_timer(c, px->conf->http.header_timeout_ms);
        event_active(c->defer, EV_TIMEOUT, 1);
    } else {
        c->head_timer_on = 0;
        arm_timer(c, px->conf->http.idle_timeout_ms);
        head_release(c);                 /* an idle connection stays small */
    }
}

/* Give back the copy of the last head and the header array (to the
 * worker's cache); the request that pointed into them is over, so its
 * pointers are cleared too. */
static void
head_release(struct tg_client *c)
{
    struct tg_proxy *px = c->px;

    if (c->headcap == TG_HEADBUF_KEEP) {
        cache_put(&px->free_heads, &px->nfree_heads, c->headbuf);
    } else {
        free(c->headbuf);
    }
    c->headbuf = NULL;
    c->headcap = 0;
    if (c->req.hdr != NULL) {
        cache_put(&px->free_hdrs, &px->nfree_hdrs, c->req.hdr);
        c->req.hdr = NULL;
    }
    c->req.method = c->req.target = c->req.path = c->req.host = NULL;
    c->req.method_len = c->req.target_len = c->req.path_len = c->req.host_len = 0;
    c->req.nhdr = 0;
}

static void *
cache_get(void **list, unsigned *n, size_t size)
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
static void
cache_put(void **list, unsigned *n, void *p)
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

static void
cache_drain(void **list, unsigned *n)
{
    void *p;

    while ((p = *list) != NULL) {
        memcpy(list, p, sizeof(void *));
        free(p);
    }
    *n = 0;
}

/* ---- client callbacks ---------------------------------------------- */

void
tg_client_read_cb(struct bufferevent *bev, void *arg)
{
    struct tg_client *c = arg;

    switch (c->state) {
    case C_HEAD:
        handle_head(c);
        return;
    case C_BUSY:
        if (!c->rq_done && c->uc != NULL) {
            relay_request_body(c);
        }
        return;
    case C_LINGER:
    case C_CLOSING:
    case C_DEAD:
        evbuffer_drain(bufferevent_get_input(bev),
                       evbuffer_get_length(bufferevent_get_input(bev)));
        return;
    }
}

static void
client_write_cb(struct bufferevent *bev, void *arg)
{
    struct tg_client *c = arg;

    if (!c->tls && evbuffer_get_length(bufferevent_get_output(bev)) == 0) {
        bufferevent_disable(bev, EV_WRITE);    /* back to write-through */
    }
    if (c->state == C_CLOSING) {
        event_active(c->defer, EV_TIMEOUT, 1);
        return;
    }
    if (c->state == C_HEAD && c->out_wait) {
        client_next_request(c);
        return;
    }
    if (c->state == C_BUSY && c->rs_paused && c->uc != NULL) {
        c->rs_paused = 0;
        event_add(c->urev, NULL);
        relay_response_body(c);
    }
}

void
tg_client_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct tg_client *c = arg;

    TG_UNUSED(bev);
    if (what & BEV_EVENT_CONNECTED) {
        /* TLS handshake done: the header deadline starts now */
        c->tls_ready = 1;
        if (c->state == C_HEAD && !c->head_timer_on) {
            c->head_timer_on = 1;
            arm_timer(c, c->px->conf->http.header_timeout_ms);
        }
        return;
    }
    if (c->state == C_LINGER || c->state == C_CLOSING || c->state == C_DEAD) {
        tg_client_kill(c);
        return;
    }
    if ((what & BEV_EVENT_TIMEOUT) && (what & BEV_EVENT_READING)
        && c->state == C_BUSY && !c->rq_done && !c->rs_started) {
        exchange_end(c, 0);          /* no late upstream answer after ours */
        respond_error(c, 408, "request_timeout", "the request body stalled");
        return;
    }
    if ((what & BEV_EVENT_EOF) && c->state == C_BUSY) {
        if (c->rs_started && c->rq_done) {
            /* Half-close while the answer streams: finish it. */
            c->close_after = 1;
            return;
        }
        if (!c->rs_started) {
            /* The client closed (or half-closed) before its answer began:
             * the upstream exchange is abandoned at once, as nginx does
             * without proxy_ignore_client_abort, and counted as 499. */
            exchange_end(c, 0);
            c->rs_status = 499;
            account(c);
        }
    }
    tg_client_kill(c);
}

/* ---- request head --------------------------------------------------- */

/* Pointers in req point into the evbuffer's contiguous region `from`;
 * move them into headbuf, which holds a copy of the head. */
static void
rebase(const char **p, const char *from, size_t len, const char *to)
{
    if (*p != NULL && *p >= from && *p <= from + len) {
        *p = to + (*p - from);
    }
}

static void
handle_head(struct tg_client *c)
{
    struct tg_proxy *px = c->px;
    struct evbuffer *in = bufferevent_get_input(c->bev);
    size_t len = evbuffer_get_length(in);
    size_t n, i;
    const char *p;
    tg_rc rc;

    if (len == 0) {
        return;
    }
    if (!c->head_timer_on) {
        c->head_timer_on = 1;
        arm_timer(c, px->conf->http.header_timeout_ms);
    }
    n = len < px->lim.max_header_bytes ? len : px->lim.max_header_bytes;
    /* The parser starts over on each call: after the first look (early
     * errors), call it again only once a blank line may end the head or
     * the limit is reached, searching only the new bytes for it, so a
     * client sending a byte at a time costs O(n), not O(n^2). */
    if (c->head_scan != 0 && n < px->lim.max_header_bytes) {
        struct evbuffer_ptr pos;
        size_t from = c->head_scan > 3 ? c->head_scan - 3 : 0;

        if (n <= c->head_scan
            || evbuffer_ptr_set(in, &pos, from, EVBUFFER_PTR_SET) != 0
            || evbuffer_search(in, "\r\n\r\n", 4, &pos).pos < 0) {
            c->head_scan = n;
            return;
        }
    }
    p = (const char *)evbuffer_pullup(in, (ssize_t)n);
    if (c->req.hdr == NULL) {
        c->req.hdr = cache_get(&px->free_hdrs, &px->nfree_hdrs,
                               TG_HTTP_MAX_HEADERS * sizeof(tg_http_hdr));
    }
    rc = tg_http_parse_request(p, n, &px->lim, &c->req);
    if (rc == TG_AGAIN) {
        c->head_scan = n;
        return;
    }
    c->head_scan = 0;
    c->nreq++;
    request_reset(c, tg_now_us());
    if (rc != TG_OK) {
        c->close_after = 1;
        respond_error(c, c->req.status, "bad_request", c->req.error);
        return;
    }
    if (c->headcap < c->req.head_len) {
        if (c->headcap == TG_HEADBUF_KEEP) {
            cache_put(&px->free_heads, &px->nfree_heads, c->headbuf);
        } else {
            free(c->headbuf);
        }
        c->headcap = (c->req.head_len + 1023) & ~(size_t)1023;
        c->headbuf = c->headcap == TG_HEADBUF_KEEP
                     ? cache_get(&px->free_heads, &px->nfree_heads, TG_HEADBUF_KEEP)
                     : tg_xmalloc(c->headcap);
    }
    memcpy(c->headbuf, p, c->req.head_len);
    rebase(&c->req.method, p, n, c->headbuf);
    rebase(&c->req.target, p, n, c->headbuf);
    rebase(&c->req.path, p, n, c->headbuf);
    rebase(&c->req.host, p, n, c->headbuf);
    for (i = 0; i < c->req.nhdr; i++) {
        rebase(&c->req.hdr[i].name, p, n, c->headbuf);
        rebase(&c->req.hdr[i].value, p, n, c->headbuf);
    }
    if (normalize_target(c) != TG_OK) {
        return;
    }
    evbuffer_drain(in, c->req.head_len);
    event_del(c->timer);
    c->head_timer_on = 0;
    start_request(c);
}

/* Put the path of an origin-form target into its normal form (target.h)
 * in headbuf, where it only shrinks: routes match it and it is forwarded.
 * A target without one is answered 400 (TG_ERR).  "*" and the "/" that
 * the parser supplies for "http://host" are left alone. */
static tg_rc
normalize_target(struct tg_client *c)
{
    uintptr_t at = (uintptr_t)c->req.path, hb = (uintptr_t)c->headbuf;
    const char *err;

    if (c->req.path[0] != '/' || at < hb || at >= hb + c->req.head_len) {
        return TG_OK;
    }
    if (tg_target_normalize(c->headbuf + (at - hb), &c->req.path_len, &err) != TG_OK) {
        c->reqid_len = 0;
        c->close_after = 1;
        respond_error(c, 400, "bad_request", err);
        return TG_ERR;
    }
    return TG_OK;
}

/* Per-request state for a new request whose head began at t_start_us:
 * nothing of the previous request may leak into its answer or its log. */
static void
request_reset(struct tg_client *c, uint64_t t_start_us)
{
    c->rs_started = 0;
    c->t_start_us = t_start_us;
    c->t_up_us = 0;
    c->rs_bytes = 0;
    c->rq_total = 0;
    c->reqid_len = 0;
    memset(&c->lo, 0, sizeof(c->lo));
    c->lo.route = -1;
}

static int
reqid_ok(const char *v, size_t len)
{
    size_t i;

    if (len == 0 || len > TG_REQID_MAX) {
        return 0;
    }
    for (i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)v[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z')
              || (ch >= 'A' && ch <= 'Z') || ch == '-' || ch == '_'
              || ch == '.' || ch == ':')) {
            return 0;
        }
    }
    return 1;
}

static void
make_request_id(struct tg_client *c)
{
    static const char hex[] = "0123456789abcdef";
    struct tg_proxy *px = c->px;
    const tg_http_hdr *h;
    size_t i;
    int k;

    for (i = 0; i < c->req.nhdr; i++) {
        h = &c->req.hdr[i];
        if (tg_http_name_is(h->name, h->name_len, "x-request-id")
            && reqid_ok(h->value, h->value_len)) {
            memcpy(c->reqid, h->value, h->value_len);
            c->reqid_len = h->value_len;
            c->reqid[c->reqid_len] = '\0';
            return;
        }
    }
    for (k = 0; k < 2; k++) {
        /* xorshift128+: request ids need uniqueness, not secrecy */
        uint64_t s1 = px->rng[0], s0 = px->rng[1], r;
        px->rng[0] = s0;
        s1 ^= s1 << 23;
        px->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
        r = px->rng[1] + s0;
        for (i = 0; i < 16; i++) {
            c->reqid[k * 16 + (int)i] = hex[(r >> (i * 4)) & 0xf];
        }
    }
    c->reqid_len = 32;
    c->reqid[32] = '\0';
}

static void
start_request(struct tg_client *c)
{
    struct tg_proxy *px = c->px;
    const tg_conf *conf = px->conf;

    make_request_id(c);
    c->state = C_BUSY;
    c->close_after = !c->req.keep_alive || px->draining
        || (conf->http.max_requests_per_connection != 0
            && c->nreq >= conf->http.max_requests_per_connection);
    c->rq_done = (c->req.body == TG_BODY_NONE);
    c->rq_left = c->req.content_length;
    c->rq_total = 0;
    c->rq_bad = 0;
    c->rq_paused = 0;
    c->retried = 0;
    tg_chunked_init(&c->rq_chunk);

    if (c->req.body == TG_BODY_LENGTH
        && c->req.content_length > conf->http.max_body_bytes) {
        c->close_after = 1;
        respond_error(c, 413, "payload_too_large",
                      "the request body exceeds the configured limit");
        return;
    }
    /* identify -> route -> charge; the answer may come later (Redis) */
    if (tg_limiter_check(px->limiter, &c->lctx, &c->req, c->ip, &c->lo,
                         limit_decided, c) == TG_AGAIN) {
        c->charging = 1;
        return;
    }
    limit_apply(c);
}

static void
limit_decided(void *arg)
{
    struct tg_client *c = arg;

    c->charging = 0;
    limit_apply(c);
}

/* Forward an allowed request; answer a refused one ourselves.  A refused
 * request's body was never read (nor 100 Continue sent), so the
 * connection closes after the answer unless there was no body. */
static void
limit_apply(struct tg_client *c)
{
    char extra[512];
    size_t n;

    tg_anomaly_count(c->px->anomaly, c->lo.consumer);   /* allowed or refused */
    if (c->lo.status == 0) {
        admit(c);
        return;
    }
    if (!c->rq_done) {
        c->close_after = 1;
    }
    n = tg_limiter_headers(&c->lo, extra, sizeof(extra));
    switch (c->lo.status) {
    case 401:
        respond(c, 401, "unauthorized", c->lo.error, NULL, 0);
        return;
    case 403:
        respond(c, 403, "forbidden", c->lo.error, NULL, 0);
        return;
    case 429:
        respond(c, 429, "rate_limited", c->lo.error, extra, n);
        return;
    default:
        respond(c, 503, "unavailable", c->lo.error, extra, n);
        return;
    }
}

/* Adaptive concurrency: forward now, wait for a slot (by tier), or shed
 * with 503 (see upstream.h).  Without adaptive: forward now. */
static void
admit(struct tg_client *c)
{
    admitted(c, tg_upstream_admit(c->px->pool, c->lo.tier, &c->waiter, admitted, c));
}

static void
admitted(void *arg, enum tg_upstream_admit result)
{
    static const char *const why[] = {
        [TG_ADMIT_FULL] = "the upstream is at its concurrency limit and the "
                          "queue is full of requests of the same or a higher tier",
        [TG_ADMIT_EVICTED] = "the upstream is at its concurrency limit: a request "
                             "of a higher tier took this one's place in the queue",
        [TG_ADMIT_TIMEOUT] = "the upstream is at its concurrency limit: no slot "
                             "freed within adaptive.concurrency.queue_timeout_ms",
    };
    static const char retry[] = "Retry-After: 1\r\n";
    struct tg_client *c = arg;

    if (result == TG_ADMIT_WAIT) {
        return;                                 /* admitted() comes back */
    }
    c->waiter = NULL;
    if (result == TG_ADMIT_GO) {
        forward(c);
        return;
    }
    tg_metric_inc(c->px->shard, TG_M_SHED, tier_label(c));
    if (!c->rq_done) {
        c->close_after = 1;
    }
    respond(c, 503, "overloaded", why[result], retry, sizeof(retry) - 1);
}

/* ---- forwarding ----------------------------------------------------- */

static void
add_str(struct evbuffer *b, const char *s, size_t n)
{
    evbuffer_add(b, s, n);
}

#define ADD_LIT(b, lit) add_str((b), (lit), sizeof(lit) - 1)

static int
strip_key(const void *lim, const tg_http_req *r, const tg_http_hdr *h)
{
    return tg_limiter_strip_header(lim, r, h);
}

/* The request head for the upstream (headers.c), handed to out with ONE
 * evbuffer_add (each add runs the buffer's callbacks). */
static void
write_upstream_head(struct tg_client *c, struct evbuffer *out)
{
    const tg_conf *conf = c->px->conf;
    tg_headers_up f = {
        .ip = c->ip, .tls = c->tls, .reqid = c->reqid, .reqid_len = c->reqid_len,
        .consumer = c->lo.consumer, .tier = c->lo.tier,
        .trusted = conf->http.trusted_proxies, .ntrusted = conf->http.ntrusted_proxies,
        .strip = strip_key, .strip_arg = c->px->limiter,
    };
    tg_hbuf hb;

    tg_hbuf_init(&hb);
    tg_headers_request(&hb, &c->req, &f);
    evbuffer_add(out, hb.p, hb.len);
    tg_hbuf_free(&hb);
}

static void
forward(struct tg_client *c)
{
    struct tg_proxy *px = c->px;
    const tg_conf *conf = px->conf;
    struct bufferevent *ub;
    uint64_t now = tg_now_ms();

    uint64_t retry_ms = 0;

    c->uc = tg_upstream_acquire(px->pool, &c->uc_reused, c->avoid, &retry_ms);
    if (c->uc == NULL) {
        if (retry_ms != 0) {
            /* every server's breaker is open or its health check failing:
             * say so at once instead of trying */
            char extra[48];
            size_t n = tg_fmt(extra, sizeof(extra), "Retry-After: %llu\r\n",
                              (unsigned long long)((retry_ms + 999) / 1000));
            if (!c->rq_done) {
                c->close_after = 1;
            }
            respond(c, 503, "unavailable", "no healthy upstream server", extra, n);
            return;
        }
        respond_error(c, 502, "bad_gateway", "no upstream connection could be made");
        return;
    }
    c->reported = 0;
    c->uc_connected = c->uc_reused;
    c->ustate = U_HEAD;
    if (c->t_up_us == 0) {
        c->t_up_us = tg_now_us();
    }
    c->up_server = tg_uconn_server_index(c->uc);
    c->rs_paused = 0;
    ub = tg_uconn_bev(c->uc);
    bufferevent_setcb(ub, tg_exchange_read_cb, up_write_cb, tg_exchange_event_cb, c);
    bufferevent_setwatermark(ub, EV_WRITE, TG_LOW_WATER, 0);
    /* A new connection writes when the connect completes; a reused one
     * is written through at once (tg_bev_up_flush). */
    if (c->uc_connected) {
        /* ours while lent; added before the pool's is removed, so the fd
         * never stops being watched for reading: no epoll_ctl */
        tg_bev_up_read_start(c);
        bufferevent_disable(ub, EV_READ);
    } else {
        bufferevent_enable(ub, EV_WRITE);      /* the connect; reads after it */
    }
    write_upstream_head(c, bufferevent_get_output(ub));

    if (!c->retried) {
        c->total_deadline = now + conf->upstream.total_timeout_ms;
    }
    c->phase_deadline = 0;
    c->phase_is_connect = 0;
    if (!c->uc_connected) {
        c->phase_is_connect = 1;
        c->phase_deadline = now + conf->upstream.connect_timeout_ms;
    } else if (c->rq_done) {
        c->phase_deadline = now + conf->upstream.first_byte_timeout_ms;
    }
    up_arm(c);

    if (c->rq_done) {
        tg_bev_up_flush(c);
        return;
    }
    if (c->req.expect_continue && !c->retried) {
        ADD_LIT(bufferevent_get_output(c->bev), "HTTP/1.1 100 Continue\r\n\r\n");
        tg_bev_client_flush(c);
    }
    tg_bev_rd_on(c, &px->body_tv);
    relay_request_body(c);
}

static void
rq_chunk_cb(void *arg, const char *data, size_t len)
{
    struct tg_client *c = arg;
    char line[24];
    int n;

    c->rq_total += len;
    if (c->rq_total > c->px->conf->http.max_body_bytes) {
        c->rq_bad = 413;
        return;
    }
    if (len == 0) {
        return;
    }
    n = (int)tg_fmt(line, sizeof(line), "%zx\r\n", len);
    struct evbuffer *out = bufferevent_get_output(tg_uconn_bev(c->uc));
    evbuffer_add(out, line, (size_t)n);
    evbuffer_add(out, data, len);
    evbuffer_add(out, "\r\n", 2);
}

static void
relay_request_body(struct tg_client *c)
{
    struct evbuffer *in = bufferevent_get_input(c->bev);
    struct evbuffer *out = bufferevent_get_output(tg_uconn_bev(c->uc));
    size_t len;

    while (!c->rq_done && (len = evbuffer_get_length(in)) != 0) {
        if (evbuffer_get_length(out) >= TG_HIGH_WATER) {
            tg_bev_up_flush(c);
            if (evbuffer_get_length(out) < TG_HIGH_WATER) {
                continue;
            }
            c->rq_paused = 1;
            tg_bev_rd_off(c);
            return;
        }
        if (c->req.body == TG_BODY_LENGTH) {
            size_t n = len < c->rq_left ? len : (size_t)c->rq_left;
            if (n > TG_HIGH_WATER) {
                n = TG_HIGH_WATER;
            }
            evbuffer_remove_buffer(in, out, n);
            c->rq_left -= n;
            if (c->rq_left == 0) {
                request_body_done(c);
            }
        } else {
            struct evbuffer_iovec v[8];
            size_t consumed = 0;
            int cnt = evbuffer_peek(in, -1, NULL, v, 8), i;
            for (i = 0; i < cnt && !c->rq_chunk.done; i++) {
                ssize_t r = tg_chunked_decode(&c->rq_chunk, v[i].iov_base,
                                              v[i].iov_len, rq_chunk_cb, c);
                if (r < 0) {
                    c->rq_bad = 400;
                    break;
                }
                consumed += (size_t)r;
                if (c->rq_bad) {
                    break;
                }
            }
            evbuffer_drain(in, consumed);
            if (c->rq_bad) {
                int st = c->rq_bad;
                c->close_after = 1;
                exchange_end(c, 0);
                if (c->rs_started) {
                    tg_client_kill(c);    /* an answer is already under way */
                } else if (st == 413) {
                    respond_error(c, 413, "payload_too_large",
                                  "the request body exceeds the configured limit");
                } else {
                    respond_error(c, 400, "bad_request", c->rq_chunk.error
                                  ? c->rq_chunk.error : "malformed chunked body");
                }
                return;
            }
            if (c->rq_chunk.done) {
                evbuffer_add(out, "0\r\n\r\n", 5);
                request_body_done(c);
            }
        }
    }
    tg_bev_up_flush(c);
}

static void
request_body_done(struct tg_client *c)
{
    c->rq_done = 1;
    tg_bev_rd_on(c, NULL);                         /* may have been paused */
    if (c->uc_connected && c->ustate == U_HEAD) {
        c->phase_is_connect = 0;
        c->phase_deadline = tg_now_ms() + c->px->conf->upstream.first_byte_timeout_ms;
        up_arm(c);
    }
}

/* ---- upstream side -------------------------------------------------- */

static void
up_arm(struct tg_client *c)
{
    uint64_t now = tg_now_ms(), when = c->total_deadline, ms;
    struct timeval tv;

    if (c->phase_deadline != 0 && c->phase_deadline < when) {
        when = c->phase_deadline;
    }
    ms = when > now ? when - now : 0;
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)((ms % 1000) * 1000);
    evtimer_add(c->up_timer, &tv);
}

static void
up_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_client *c = arg;
    uint64_t now = tg_now_ms();

    TG_UNUSED(fd);
    TG_UNUSED(what);
    if (c->uc == NULL) {
        return;
    }
    if (c->phase_deadline != 0 && now >= c->phase_deadline) {
        if (c->phase_is_connect) {
            up_failed(c, 502, "bad_gateway", "upstream connect timed out");
        } else {
            up_failed(c, 504, "gateway_timeout", "upstream did not answer in time");
        }
        return;
    }
    if (now >= c->total_deadline) {
        up_failed(c, 504, "gateway_timeout", "upstream exchange took too long");
        return;
    }
    up_arm(c);   /* early wake-up (clock granularity) */
}

void
tg_exchange_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct tg_client *c = arg;
    char msg[160];

    if (what & BEV_EVENT_CONNECTED) {
        c->uc_connected = 1;
        tg_bev_up_read_start(c);
        c->phase_deadline = 0;
        c->phase_is_connect = 0;
        if (c->rq_done && c->ustate == U_HEAD) {
            c->phase_deadline = tg_now_ms() + c->px->conf->upstream.first_byte_timeout_ms;
        }
        up_arm(c);
        return;
    }
    if ((what & BEV_EVENT_EOF) && c->ustate == U_BODY && c->rs_body == TG_BODY_CLOSE) {
        /* The end of a close-delimited body: queue all that is left,
         * past the high-water mark, since the connection goes now. */
        struct evbuffer *in = bufferevent_get_input(bev);
        struct evbuffer *out = bufferevent_get_output(c->bev);
        size_t len = evbuffer_get_length(in);
        if (len != 0 && c->rs_chunked_out) {
            char line[24];
            int n = (int)tg_fmt(line, sizeof(line), "%zx\r\n", len);
            evbuffer_add(out, line, (size_t)n);
            evbuffer_remove_buffer(in, out, len);
            evbuffer_add(out, "\r\n", 2);
        } else if (len != 0) {
            evbuffer_remove_buffer(in, out, len);
        }
        if (c->rs_chunked_out) {
            ADD_LIT(bufferevent_get_output(c->bev), "0\r\n\r\n");
        }
        exchange_end(c, 0);
        response_done(c);
        return;
    }
    if (!c->uc_connected) {
        snprintf(msg, sizeof(msg), "upstream %s: connect failed: %s",
                 tg_uconn_server(c->uc), strerror(EVUTIL_SOCKET_ERROR()));
        tg_warn("%s", msg);
        up_failed(c, 502, "bad_gateway", "upstream connect failed");
        return;
    }
    up_failed(c, 502, "bad_gateway", (what & BEV_EVENT_EOF)
              ? "upstream closed the connection" : "upstream connection error");
}

static void
up_write_cb(struct bufferevent *bev, void *arg)
{
    struct tg_client *c = arg;

    if (evbuffer_get_length(bufferevent_get_output(bev)) == 0) {
        bufferevent_disable(bev, EV_WRITE);    /* back to write-through */
    }
    if (c->rq_paused && !c->rq_done && c->state == C_BUSY) {
        c->rq_paused = 0;
        tg_bev_rd_on(c, &c->px->body_tv);
        relay_request_body(c);
    }
}

/* The exchange failed on the upstream side. */
static void
up_failed(struct tg_client *c, int status, const char *code, const char *msg)
{
    /* A reused keep-alive connection that the server had just closed says
     * nothing about the server's health: no outcome for its breaker. */
    if (!c->reported && c->uc != NULL
        && !(c->uc_reused && c->ustate == U_HEAD && status == 502)) {
        tg_upstream_report(c->uc, 0);
        c->reported = 1;
    }
    /* Retry once, on another server when there is one, when nothing can
     * have been done twice: a bodyless request whose connect failed, or
     * whose kept-alive connection the server had just closed, and that is
     * idempotent (a reused connection may have delivered it). */
    if (!c->retried && !c->rs_started && c->ustate == U_HEAD && status == 502
        && c->req.body == TG_BODY_NONE
        && (!c->uc_connected || (c->uc_reused && idempotent(&c->req)))) {
        struct tg_uconn *old = c->uc;

        c->uc = NULL;
        event_del(c->up_timer);
        event_del(c->urev);
        c->retried = 1;
        c->avoid = old;
        forward(c);
        c->avoid = NULL;
        tg_upstream_release(old, 0);
        return;
    }
    exchange_end(c, 0);
    if (c->rs_started) {
        tg_client_kill(c);            /* the response is cut: the client sees it */
        return;
    }
    if (!c->rq_done) {
        c->close_after = 1;
    }
    tg_warn("request %s: %s", c->reqid, msg);
    respond_error(c, status, code, msg);
}

static int
idempotent(const tg_http_req *r)
{
    static const char *const m[] = { "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE" };
    size_t i;

    for (i = 0; i < TG_ARRAY_LEN(m); i++) {
        if (strlen(m[i]) == r->method_len && memcmp(m[i], r->method, r->method_len) == 0) {
            return 1;
        }
    }
    return 0;
}

static void
exchange_end(struct tg_client *c, int reusable)
{
    if (c->uc == NULL) {
        return;
    }
    event_del(c->up_timer);
    if (reusable && c->rq_done) {
        /* back to the pool's idle watcher, which reads again before our
         * event stops (no epoll_ctl) */
        bufferevent_enable(tg_uconn_bev(c->uc), EV_READ);
    }
    event_del(c->urev);
    tg_upstream_release(c->uc, reusable && c->rq_done);
    c->uc = NULL;
    c->ustate = U_NONE;
}

/* The response head for the client (headers.c); sets rs_chunked_out and
 * close_after from it. */
static void
write_response_head(struct tg_client *c, const tg_http_resp *rs)
{
    char rl[512];
    tg_headers_down f = {
        .is_head = c->req.is_head, .minor = c->req.minor, .rq_done = c->rq_done,
        .close_after = c->close_after, .reqid = c->reqid, .reqid_len = c->reqid_len,
        .extra = rl,
        .extra_len = c->lo.limited ? tg_limiter_headers(&c->lo, rl, sizeof(rl)) : 0,
    };
    tg_hbuf hb;
    unsigned out;

    tg_hbuf_init(&hb);
    out = tg_headers_response(&hb, rs, &f);
    c->rs_chunked_out = (out & TG_HEADERS_CHUNKED) != 0;
    c->close_after = (out & TG_HEADERS_CLOSE) != 0;
    evbuffer_add(bufferevent_get_output(c->bev), hb.p, hb.len);
    tg_hbuf_free(&hb);
}

void
tg_exchange_read_cb(struct bufferevent *bev, void *arg)
{
    struct tg_client *c = arg;
    struct evbuffer *in = bufferevent_get_input(bev);
    tg_http_resp rs;
    tg_http_limits lim;
    size_t len, n;
    const char *p;
    tg_rc rc;

    if (c->ustate == U_BODY) {
        relay_response_body(c);
        return;
    }
    if (c->ustate != U_HEAD) {
        return;
    }
    lim.max_request_line = 8192;
    lim.max_header_bytes = TG_UP_HEAD_MAX;
    lim.max_headers = TG_HTTP_MAX_HEADERS;
    for (;;) {
        len = evbuffer_get_length(in);
        if (len == 0) {
            return;
        }
        n = len < TG_UP_HEAD_MAX ? len : TG_UP_HEAD_MAX;
        p = (const char *)evbuffer_pullup(in, (ssize_t)n);
        rc = tg_http_parse_response(p, n, &lim, c->req.is_head, &rs);
        if (rc == TG_AGAIN) {
            return;
        }
        if (rc != TG_OK) {
            tg_warn("request %s: upstream %s sent an invalid response: %s",
                    c->reqid, tg_uconn_server(c->uc), rs.error);
            up_failed(c, 502, "bad_gateway", "upstream sent an invalid response");
            return;
        }
        if (rs.status >= 100 && rs.status < 200) {
            if (rs.status == 101) {
                up_failed(c, 502, "bad_gateway", "upstream switched protocols");
                return;
            }
            evbuffer_drain(in, rs.head_len);   /* interim: not relayed */
            continue;
        }
        break;
    }
    c->phase_deadline = 0;
    up_arm(c);
    if (!c->reported) {
        tg_upstream_report(c->uc, rs.status < 502 || rs.status > 504);
        c->reported = 1;
    }
    c->rs_status = rs.status;
    c->rs_body = rs.body;
    c->rs_left = rs.content_length;
    c->rs_keep = rs.keep_alive;
    tg_chunked_init(&c->rs_chunk);
    write_response_head(c, &rs);
    evbuffer_drain(in, rs.head_len);
    c->rs_started = 1;
    c->ustate = U_BODY;
    if (rs.body == TG_BODY_NONE
        || (rs.body == TG_BODY_LENGTH && rs.content_length == 0)) {
        exchange_end(c, c->rs_keep);
        response_done(c);
        return;
    }
    relay_response_body(c);
}

static void
rs_chunk_cb(void *arg, const char *data, size_t len)
{
    struct tg_client *c = arg;
    struct evbuffer *out = bufferevent_get_output(c->bev);
    char line[24];
    int n;

    if (len == 0) {
        return;
    }
    c->rs_bytes += len;
    if (c->rs_chunked_out) {
        n = (int)tg_fmt(line, sizeof(line), "%zx\r\n", len);
        evbuffer_add(out, line, (size_t)n);
        evbuffer_add(out, data, len);
        evbuffer_add(out, "\r\n", 2);
    } else {
        evbuffer_add(out, data, len);
    }
}

static void
relay_response_body(struct tg_client *c)
{
    struct evbuffer *in, *out = bufferevent_get_output(c->bev);
    size_t len;

    if (c->uc == NULL) {
        return;
    }
    in = bufferevent_get_input(tg_uconn_bev(c->uc));
    while ((len = evbuffer_get_length(in)) != 0) {
        if (evbuffer_get_length(out) >= TG_HIGH_WATER) {
            tg_bev_client_flush(c);
            if (evbuffer_get_length(out) < TG_HIGH_WATER) {
                continue;
            }
            c->rs_paused = 1;
            event_del(c->urev);
            return;
        }
        if (c->rs_body == TG_BODY_LENGTH) {
            size_t n = len < c->rs_left ? len : (size_t)c->rs_left;
            evbuffer_remove_buffer(in, out, n);
            c->rs_left -= n;
            c->rs_bytes += n;
            if (c->rs_left == 0) {
                exchange_end(c, c->rs_keep);
                response_done(c);
                return;
            }
        } else if (c->rs_body == TG_BODY_CHUNKED) {
            struct evbuffer_iovec v[8];
            size_t consumed = 0;
            int cnt = evbuffer_peek(in, -1, NULL, v, 8), i;
            for (i = 0; i < cnt && !c->rs_chunk.done; i++) {
                ssize_t r = tg_chunked_decode(&c->rs_chunk, v[i].iov_base,
                                              v[i].iov_len, rs_chunk_cb, c);
                if (r < 0) {
                    tg_warn("request %s: upstream %s: bad chunked body: %s",
                            c->reqid, tg_uconn_server(c->uc), c->rs_chunk.error);
                    up_failed(c, 502, "bad_gateway", "bad chunked body");
                    return;
                }
                consumed += (size_t)r;
            }
            evbuffer_drain(in, consumed);
            if (c->rs_chunk.done) {
                if (c->rs_chunked_out) {
                    ADD_LIT(out, "0\r\n\r\n");
                }
                exchange_end(c, c->rs_keep);
                response_done(c);
                return;
            }
        } else {   /* TG_BODY_CLOSE: everything until EOF */
            c->rs_bytes += len;
            if (c->rs_chunked_out) {
                char line[24];
                int n = (int)tg_fmt(line, sizeof(line), "%zx\r\n", len);
                evbuffer_add(out, line, (size_t)n);
                evbuffer_remove_buffer(in, out, len);
                evbuffer_add(out, "\r\n", 2);
            } else {
                evbuffer_remove_buffer(in, out, len);
            }
        }
    }
    tg_bev_client_flush(c);
}

/* The response is fully queued to the client. */
static void
response_done(struct tg_client *c)
{
    account(c);
    if (!c->rq_done || c->close_after || c->px->draining) {
        client_close_after_flush(c);
        return;
    }
    client_next_request(c);
}

/* ---- answers of our own ---------------------------------------------- */

static void
respond_error(struct tg_client *c, int status, const char *code, const char *msg)
{
    respond(c, status, code, msg, NULL, 0);
}

/* Answer with a JSON error body; extra: more header lines (CRLF-ended). */
static void
respond(struct tg_client *c, int status, const char *code, const char *msg,
        const char *extra, size_t extra_len)
{
    struct evbuffer *out = bufferevent_get_output(c->bev);
    char body[512], head[256 + TG_REQID_MAX];
    int bn, hn;

    if (c->reqid_len == 0) {
        make_request_id(c);
    }
    bn = (int)tg_fmt(body, sizeof(body),
                     "{\"error\":\"%s\",\"message\":\"%s\",\"request_id\":\"%s\"}\n",
                     code, msg, c->reqid);
    if (c->state != C_BUSY || !c->rq_done) {
        c->close_after = 1;
    }
    hn = (int)tg_fmt(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %d\r\nX-Request-ID: %s\r\n%s",
                     status, tg_http_reason(status), bn, c->reqid,
                     c->close_after ? "Connection: close\r\n" : "");
    evbuffer_add(out, head, (size_t)hn);
    if (extra_len != 0) {
        evbuffer_add(out, extra, extra_len);
    }
    evbuffer_add(out, "\r\n", 2);
    if (!(c->state == C_BUSY && c->req.is_head)) {
        evbuffer_add(out, body, (size_t)bn);
    }
    c->rs_started = 1;
    c->rs_status = status;
    account(c);
    event_del(c->timer);
    if (c->close_after) {
        client_close_after_flush(c);
    } else {
        client_next_request(c);
    }
}

/* ---- counting ------------------------------------------------------------ */

/* Metric label of the consumer's tier: the tiers of the configuration the
 * process started with (label sets are fixed), then "none". */
static size_t
tier_label(const struct tg_client *c)
{
    const tg_conf *conf = c->px->conf0;
    size_t i;

    if (c->lo.tier[0] != '\0') {
        for (i = 0; i < conf->ntiers; i++) {
            if (strcmp(conf->tiers[i].name, c->lo.tier) == 0) {
                return i;
            }
        }
    }
    return conf->ntiers;
}

static const char *
limit_outcome(const tg_limit_outcome *lo)
{
    switch (lo->status) {
    case 0:   return lo->consumer[0] == '\0' ? "none" : lo->fallback ? "fallback" : "allowed";
    case 429: return "limited";
    case 401: return "unauthorized";
    case 403: return "forbidden";
    default:  return "unavailable";
    }
}

/* One JSON line per request: who (the consumer id, never the key), what,
 * the outcome, sizes and durations.  Handed to the worker's log buffer:
 * the write to the file happens on the log's own thread. */
static void
access_log(struct tg_client *c, uint64_t now_us)
{
    struct tg_proxy *px = c->px;
    char line[2048], path[6 * 256 + 1], method[6 * 16 + 1];
    struct timespec ts;
    uint64_t in = c->req.body == TG_BODY_LENGTH ? c->req.content_length : c->rq_total;
    int n;

    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != px->alog_sec) {
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        strftime(px->alog_time, sizeof(px->alog_time), "%Y-%m-%dT%H:%M:%S", &tm);
        px->alog_sec = ts.tv_sec;
    }
    tg_alog_json_escape(method, c->req.method ? c->req.method : "", c->req.method
                        ? c->req.method_len : 0, 16);
    tg_alog_json_escape(path, c->req.path ? c->req.path : "", c->req.path
                        ? c->req.path_len : 0, 256);
    n = (int)tg_fmt(line, sizeof(line),
                 "{\"time\":\"%s.%03ldZ\",\"request_id\":\"%s\",\"consumer\":\"%s\","
                 "\"tier\":\"%s\",\"method\":\"%s\",\"path\":\"%s\",\"status\":%d,"
                 "\"bytes_in\":%llu,\"bytes_out\":%llu,\"duration_ms\":%.3f,"
                 "\"upstream_ms\":%.3f,\"upstream\":\"%s\",\"limit\":\"%s\"}",
                 px->alog_time, ts.tv_nsec / 1000000, c->reqid, c->lo.consumer, c->lo.tier,
                 method, path, c->rs_status, (unsigned long long)in,
                 (unsigned long long)c->rs_bytes,
                 c->t_start_us ? (double)(now_us - c->t_start_us) / 1000.0 : 0.0,
                 c->t_up_us ? (double)(now_us - c->t_up_us) / 1000.0 : 0.0,
                 c->t_up_us ? px->conf0->upstream.servers[c->up_server].text : "",
                 limit_outcome(&c->lo));
    if (n > 0) {
        tg_alog_write(px->alog, line, (size_t)n);
    }
}

/* One finished request: counted once, when its response is queued. */
static void
account(struct tg_client *c)
{
    struct tg_metrics_shard *m = c->px->shard;
    size_t tier = tier_label(c);
    uint64_t now = tg_now_us();

    tg_metric_inc(m, TG_M_REQUESTS, tg_metrics_tier_status(tier, c->rs_status));
    if (c->t_start_us != 0) {
        tg_metric_observe_us(m, TG_M_REQUEST_DURATION, tier, now - c->t_start_us);
    }
    if (c->t_up_us != 0) {
        tg_metric_observe_us(m, TG_M_UPSTREAM_DURATION, c->up_server, now - c->t_up_us);
    }
    if (c->lo.route >= 0) {
        tg_metric_inc(m, TG_M_ROUTE_REQUESTS, (size_t)c->lo.route);
    }
    if (c->px->alog != NULL) {
        access_log(c, now);
    }
    if (c->lo.consumer[0] == '\0' && c->lo.status == 0) {
        return;                       /* not limited: a plain proxy request */
    }
    switch (c->lo.status) {
    case 0:
        tg_metric_inc(m, TG_M_LIMIT_DECISIONS, c->lo.fallback ? TG_MD_STORE_FALLBACK
                                                              : TG_MD_ALLOWED);
        if (c->lo.limited) {
            tg_metric_add(m, TG_M_TOKENS_CONSUMED, tier, c->lo.cost);
        }
        break;
    case 429:
        tg_metric_inc(m, TG_M_LIMIT_DECISIONS, TG_MD_LIMITED);
        tg_metric_inc(m, TG_M_BREACHES, tier);
        break;
    case 401:
        tg_metric_inc(m, TG_M_LIMIT_DECISIONS, TG_MD_UNAUTHORIZED);
        break;
    case 403:
        tg_metric_inc(m, TG_M_LIMIT_DECISIONS, TG_MD_FORBIDDEN);
        break;
    default:
        tg_metric_inc(m, TG_M_LIMIT_DECISIONS, TG_MD_STORE_DENY);
        break;
    }
    c->lo.status = 0;
    c->lo.consumer[0] = '\0';       /* counted: a second call adds nothing */
    c->t_up_us = 0;
}
