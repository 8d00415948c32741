/*
 * client.c - one client connection: its lifetime, its request heads, the
 * hand-off to the limiter and to adaptive admission, our own answers and
 * the accounting of each finished request.  One request at a time per
 * connection (HTTP/1.1 keep-alive; pipelined requests wait their turn).
 *
 * Ownership and lifetime.  A client (struct tg_client, proxy_int.h) is
 * only ever freed from its own `defer` event: every path that ends a
 * connection marks it (C_DEAD, or C_CLOSING / C_LINGER for a graceful
 * end) and activates that event.  So no callback ever frees the object it
 * is running for, whichever of the three directions (client, upstream,
 * timer) ends the exchange.  The upstream connection is lent by the pool
 * for one exchange and given back (reusable or not) in exactly one place,
 * tg_exchange_end() (exchange.c).
 *
 * Backpressure.  Each direction moves data between two bufferevents; when
 * the destination's output holds more than TG_HIGH_WATER bytes the source
 * stops reading, and the destination's write callback (low watermark)
 * resumes it.  No body is ever buffered whole.  Answers we write ourselves
 * obey the same mark: no next request is parsed while the client's output
 * is above it (tg_client_next_request).
 */
#include <arpa/inet.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <openssl/ssl.h>

#include "tollgate/accesslog.h"
#include "tollgate/anomaly.h"
#include "tollgate/common_ev.h"
#include "tollgate/connlimit.h"
#include "tollgate/metrics.h"
#include "tollgate/target.h"
#include "proxy_int.h"

static void client_defer_cb(evutil_socket_t fd, short what, void *arg);
static void arm_timer(struct tg_client *c, unsigned ms);
static void wake_at(struct tg_client *c, uint64_t when);
static void disarm_timer(struct tg_client *c);
static void idle_wait(struct tg_client *c);
static void client_timer_cb(evutil_socket_t fd, short what, void *arg);
static void head_release(struct tg_client *c);
static void client_write_cb(struct bufferevent *bev, void *arg);
static void rebase(const char **p, const char *from, size_t len, const char *to);
static void handle_head(struct tg_client *c);
static tg_rc normalize_target(struct tg_client *c);
static void request_reset(struct tg_client *c, uint64_t t_start_us);
static int reqid_ok(const char *v, size_t len);
static void make_request_id(struct tg_client *c);
static void start_request(struct tg_client *c);
static void limit_decided(void *arg);
static void limit_apply(struct tg_client *c);
static void admit(struct tg_client *c);
static void admitted(void *arg, enum tg_upstream_admit result);
static size_t tier_label(const struct tg_client *c);
static const char *limit_outcome(const tg_limit_outcome *lo);
static void access_log(struct tg_client *c, uint64_t now_us);

/* ---- accept ------------------------------------------------------------ */

void
tg_proxy_accept(struct tg_proxy *px, int fd, const struct sockaddr *peer,
                SSL_CTX *ssl_ctx, struct tg_connslot *slot, uint64_t accepted_ms)
{
    struct tg_client *c;
    uint64_t now, waited;
    unsigned first;
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
    c->conn.fd = fd;
    c->conn.slot = slot;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (peer == NULL && getpeername(fd, (struct sockaddr *)&ss, &sl) == 0) {
        peer = (const struct sockaddr *)&ss;
    }
    if (peer != NULL && peer->sa_family == AF_INET) {
        inet_ntop(AF_INET, &((const struct sockaddr_in *)(const void *)peer)->sin_addr,
                  c->conn.ip, sizeof(c->conn.ip));
    } else if (peer != NULL && peer->sa_family == AF_INET6) {
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)(const void *)peer)->sin6_addr,
                  c->conn.ip, sizeof(c->conn.ip));
    }
    if (c->conn.ip[0] == '\0') {
        strcpy(c->conn.ip, "unknown");
    }

    if (ssl_ctx != NULL) {
        /* our own SSL on the socket (bevio.c); the bufferevent below
         * holds the plaintext */
        c->conn.tls = 1;
        if (tg_bev_tls_setup(c, ssl_ctx) != TG_OK) {
            close(fd);
            tg_connlimit_release(slot);
            free(c);
            return;
        }
    }
    c->conn.bev = tg_bufferevent_socket_new(px->base, fd, BEV_OPT_CLOSE_ON_FREE);
    c->io.timer = tg_evtimer_new(px->base, client_timer_cb, c);
    c->io.defer = tg_event_new(px->base, -1, 0, client_defer_cb, c);
    c->io.up_timer = tg_evtimer_new(px->base, tg_exchange_timer_cb, c);
    TAILQ_INSERT_TAIL(&px->clients, c, link);
    px->nclients++;
    tg_metric_gauge_add(px->env->shard, TG_M_CONNECTIONS_OPEN, 0, 1);

    bufferevent_setcb(c->conn.bev, tg_client_read_cb, client_write_cb, tg_client_event_cb, c);
    bufferevent_setwatermark(c->conn.bev, EV_WRITE, TG_LOW_WATER, 0);
    bufferevent_set_timeouts(c->conn.bev, NULL, &px->send_tv);
    bufferevent_disable(c->conn.bev, EV_WRITE);   /* on by default: write-through */
    c->io.rev = tg_event_new(px->base, fd, EV_READ | EV_PERSIST, tg_bev_client_rd_cb, c);
    tg_bev_rd_on(c, NULL);
    c->conn.state = C_HEAD;
    /* the first deadline counts from the accept (the intake queue's wait
     * is part of it); TLS: the header deadline starts when the handshake
     * ends */
    first = c->conn.tls ? px->conf->http.handshake_timeout_ms
                        : px->conf->http.header_timeout_ms;
    now = tg_now_ms();
    waited = accepted_ms != 0 && now > accepted_ms ? now - accepted_ms : 0;
    c->io.head_timer_on = !c->conn.tls;
    arm_timer(c, waited < first ? first - (unsigned)waited : 1);
}

/* ---- connection lifetime ------------------------------------------- */

void
tg_client_free(struct tg_client *c)
{
    struct tg_proxy *px = c->px;

    if (c->up.uc != NULL) {
        tg_upstream_release(c->up.uc, 0);
        c->up.uc = NULL;
    }
    if (c->rq.charging) {
        tg_limiter_cancel(&c->rq.lctx);
    }
    tg_upstream_admit_cancel(c->up.waiter);
    if (c->io.rev != NULL) {
        event_free(c->io.rev);
    }
    tg_bev_tls_free(c);
    event_free(c->io.timer);
    event_free(c->io.defer);
    event_free(c->io.up_timer);
    bufferevent_free(c->conn.bev);
    head_release(c);
    tg_connlimit_release(c->conn.slot);
    TAILQ_REMOVE(&px->clients, c, link);
    free(c);
    px->nclients--;
    tg_metric_gauge_add(px->env->shard, TG_M_CONNECTIONS_OPEN, 0, -1);
    if (px->draining && px->nclients == 0 && px->on_empty != NULL) {
        px->on_empty(px->on_empty_arg);
    }
}

/* End the connection now (error, reset, timeout): freed on the next loop
 * turn by the defer event, never inside the caller's callback. */
void
tg_client_kill(struct tg_client *c)
{
    if (c->conn.state == C_DEAD) {
        return;
    }
    c->conn.state = C_DEAD;
    tg_bev_rd_off(c);
    tg_bev_tls_stop(c);
    bufferevent_disable(c->conn.bev, EV_READ | EV_WRITE);
    bufferevent_setcb(c->conn.bev, NULL, NULL, NULL, NULL);
    if (c->up.uc != NULL) {
        tg_exchange_end(c, 0);
    }
    if (c->rq.charging) {
        tg_limiter_cancel(&c->rq.lctx);
        c->rq.charging = 0;
    }
    tg_upstream_admit_cancel(c->up.waiter);
    c->up.waiter = NULL;
    c->io.deadline = 0;
    event_del(c->io.timer);
    c->io.timer_on = 0;
    event_active(c->io.defer, EV_TIMEOUT, 1);
}

/* Send what is buffered, then close: lingering (discard input for a while)
 * when the client may still be sending (client_defer_cb), so that one
 * sending a body we refused reads our answer instead of a reset. */
void
tg_client_close_after_flush(struct tg_client *c)
{
    c->conn.state = C_CLOSING;
    tg_bev_rd_off(c);
    bufferevent_setwatermark(c->conn.bev, EV_WRITE, 0, 0);
    /* No deadline of the client's own: what is left goes out under the
     * write timeout (send_timeout_ms between two writes, as during the
     * answer).  One send timeout for all of it cut a client that read
     * steadily but slower than the rest took to drain. */
    disarm_timer(c);
    tg_bev_client_flush(c);
    if (evbuffer_get_length(bufferevent_get_output(c->conn.bev)) == 0) {
        event_active(c->io.defer, EV_TIMEOUT, 1);
    }
}

/* Whether the client may still be sending when we close: a body not read
 * to its end, or bytes read and not used (a request head, pipelined
 * requests; TLS: records OpenSSL holds), or an answer the kernel has not
 * sent all of yet (a pipelining client that has not seen its end may send
 * its next request any time; arriving at a closed socket, it turns the
 * close into a reset, and the reset throws away what was still to be
 * sent).  Only then is the close a lingering one; otherwise the socket is
 * closed at once (as nginx does): the whole answer is sent, and
 * nothing unread is there to turn the close into a reset. */
static int
may_be_sending(struct tg_client *c)
{
    int unsent = 0;

    if (!c->rq.done
        || evbuffer_get_length(bufferevent_get_input(c->conn.bev)) != 0
        || (c->conn.ssl != NULL && SSL_has_pending(c->conn.ssl))) {
        return 1;
    }
    return ioctl(c->conn.fd, SIOCOUTQNSD, &unsent) != 0 || unsent != 0;
}

static void
client_defer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_client *c = arg;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    switch (c->conn.state) {
    case C_DEAD:
        tg_client_free(c);
        return;
    case C_CLOSING:
        if (evbuffer_get_length(bufferevent_get_output(c->conn.bev)) != 0) {
            return;   /* the write callback comes back here */
        }
        tg_bev_close_notify(c);
        if (!may_be_sending(c) || shutdown(c->conn.fd, SHUT_WR) != 0) {
            tg_client_free(c);
            return;
        }
        c->conn.state = C_LINGER;
        evbuffer_drain(bufferevent_get_input(c->conn.bev),
                       evbuffer_get_length(bufferevent_get_input(c->conn.bev)));
        bufferevent_set_timeouts(c->conn.bev, NULL, NULL);
        /* TLS too (close_notify sent): raw bytes are discarded, not records */
        tg_bev_rd_on(c, NULL);
        arm_timer(c, TG_LINGER_MS);
        return;
    case C_HEAD:
        if (!c->conn.out_wait && evbuffer_get_length(bufferevent_get_input(c->conn.bev)) != 0) {
            handle_head(c);
        }
        return;
    default:
        return;
    }
}

/* The connection's deadline (idle, header, handshake, send, linger) is
 * kept here, not in libevent: a timer left pending for an earlier time
 * wakes early and client_timer_cb arms it again for what is left, as
 * nginx's lazy timers do.  A kept-alive connection under load so re-arms
 * it about once per idle timeout instead of an event_del and an
 * event_add (two min-heap operations) per request.  TLS: the same timer
 * wakes TG_TLS_IDLE_MS into an idle wait (io.tls_idle_at) to give back
 * OpenSSL's record buffers; a connection under load, never idle that
 * long, has it re-armed about once per TG_TLS_IDLE_MS, not per request. */
static void
arm_timer(struct tg_client *c, unsigned ms)
{
    c->io.deadline = tg_now_ms() + ms;
    wake_at(c, c->io.deadline);
}

/* The timer pending for when or earlier. */
static void
wake_at(struct tg_client *c, uint64_t when)
{
    if (!c->io.timer_on || c->io.timer_at > when) {
        uint64_t now = tg_now_ms();
        struct timeval tv = tg_ms_tv(when > now ? when - now : 0);

        evtimer_add(c->io.timer, &tv);
        c->io.timer_at = when;
        c->io.timer_on = 1;
    }
}

/* No deadline; the timer, if pending, fires and finds none. */
static void
disarm_timer(struct tg_client *c)
{
    c->io.deadline = 0;
}

/* Waiting for a request with nothing of it read: the next one of a
 * kept-alive connection (idle deadline) or the first after the TLS
 * handshake (header deadline). */
static int
waits_idle(struct tg_client *c)
{
    return c->conn.state == C_HEAD && c->io.deadline != 0
           && evbuffer_get_length(bufferevent_get_input(c->conn.bev)) == 0;
}

static void
client_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_client *c = arg;
    uint64_t now;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    c->io.timer_on = 0;
    now = tg_now_ms();
    if (c->io.tls_idle_at != 0 && now >= c->io.tls_idle_at) {
        c->io.tls_idle_at = 0;
        if (waits_idle(c)) {
            tg_bev_tls_release(c);
        }
    }
    if (c->io.deadline == 0) {
        return;                          /* disarmed since */
    }
    if (now < c->io.deadline) {
        /* early: armed for an earlier deadline, or clock granularity, or
         * the TLS idle point */
        wake_at(c, c->io.tls_idle_at != 0 && c->io.tls_idle_at < c->io.deadline
                   ? c->io.tls_idle_at : c->io.deadline);
        return;
    }
    c->io.deadline = 0;
    switch (c->conn.state) {
    case C_HEAD:
        if (evbuffer_get_length(bufferevent_get_input(c->conn.bev)) == 0) {
            tg_bev_close_notify(c);      /* idle keep-alive, or handshake timeout */
            tg_client_kill(c);
        } else {
            /* no request of its own yet: no id, method or path of the
             * last one; it began when the header deadline was armed */
            request_reset(c, tg_now_us()
                          - (uint64_t)c->px->conf->http.header_timeout_ms * 1000);
            c->rq.req.method = NULL;
            c->rq.req.path = NULL;
            c->rq.req.body = TG_BODY_NONE;
            tg_client_respond_error(c, 408, "request_timeout",
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
void
tg_client_next_request(struct tg_client *c)
{
    struct tg_proxy *px = c->px;

    c->conn.state = C_HEAD;
    c->rq.paused = 0;
    tg_bev_client_flush(c);
    if (evbuffer_get_length(bufferevent_get_output(c->conn.bev)) > TG_HIGH_WATER) {
        /* A client that does not read its answers (pipelining) gets no
         * new request parsed until they drain: the write callback (low
         * water) comes back here; the send timeout bounds the wait. */
        c->conn.out_wait = 1;
        tg_bev_rd_off(c);
        disarm_timer(c);
        return;
    }
    c->conn.out_wait = 0;
    c->io.idle_after_out = 0;
    tg_bev_rd_on(c, NULL);
    if (evbuffer_get_length(bufferevent_get_input(c->conn.bev)) != 0) {
        /* pipelined: serve it from the loop, not by recursion */
        c->io.head_timer_on = 1;
        arm_timer(c, px->conf->http.header_timeout_ms);
        event_active(c->io.defer, EV_TIMEOUT, 1);
    } else {
        c->io.head_timer_on = 0;
        head_release(c);                 /* an idle connection stays small */
        if (evbuffer_get_length(bufferevent_get_output(c->conn.bev)) != 0) {
            /* the answer is still going out (the send timeout bounds a
             * client that does not take it): the idle wait starts once it
             * is all out (client_write_cb), or its timeout would cut it */
            disarm_timer(c);
            c->io.idle_after_out = 1;
        } else {
            idle_wait(c);
        }
    }
}

/* Wait for the next request: the idle deadline; TLS: the buffers go back
 * once it has waited a while (timer). */
static void
idle_wait(struct tg_client *c)
{
    c->io.idle_after_out = 0;
    arm_timer(c, c->px->conf->http.idle_timeout_ms);
    if (c->conn.ssl != NULL) {
        c->io.tls_idle_at = tg_now_ms() + TG_TLS_IDLE_MS;
        wake_at(c, c->io.tls_idle_at);
    }
}

/* Give back the copy of the last head and the header array (to the
 * worker's cache); the request that pointed into them is over, so its
 * pointers are cleared too. */
static void
head_release(struct tg_client *c)
{
    struct tg_proxy *px = c->px;

    if (c->rq.headcap == TG_HEADBUF_KEEP) {
        tg_proxy_cache_put(&px->free_heads, &px->nfree_heads, c->rq.headbuf);
    } else {
        free(c->rq.headbuf);
    }
    c->rq.headbuf = NULL;
    c->rq.headcap = 0;
    if (c->rq.req.hdr != NULL) {
        tg_proxy_cache_put(&px->free_hdrs, &px->nfree_hdrs, c->rq.req.hdr);
        c->rq.req.hdr = NULL;
    }
    c->rq.req.method = c->rq.req.target = c->rq.req.path = c->rq.req.host = NULL;
    c->rq.req.method_len = c->rq.req.target_len = c->rq.req.path_len = c->rq.req.host_len = 0;
    c->rq.req.nhdr = 0;
}

/* ---- client callbacks ---------------------------------------------- */

void
tg_client_read_cb(struct bufferevent *bev, void *arg)
{
    struct tg_client *c = arg;

    switch (c->conn.state) {
    case C_HEAD:
        handle_head(c);
        return;
    case C_BUSY:
        if (!c->rq.done && c->up.uc != NULL) {
            tg_exchange_relay_request(c);
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

    if (!c->conn.tls && evbuffer_get_length(bufferevent_get_output(bev)) == 0) {
        bufferevent_disable(bev, EV_WRITE);    /* back to write-through */
    }
    if (c->conn.state == C_CLOSING) {
        event_active(c->io.defer, EV_TIMEOUT, 1);
        return;
    }
    if (c->conn.state == C_HEAD && c->conn.out_wait) {
        tg_client_next_request(c);
        return;
    }
    if (c->conn.state == C_HEAD && c->io.idle_after_out
        && evbuffer_get_length(bufferevent_get_output(bev)) == 0) {
        /* the last answer is out: the idle wait begins (unless the next
         * head has begun, under its own deadline) */
        c->io.idle_after_out = 0;
        if (!c->io.head_timer_on && evbuffer_get_length(bufferevent_get_input(bev)) == 0) {
            idle_wait(c);
        }
        return;
    }
    if (c->conn.state == C_BUSY && c->rs.paused && c->up.uc != NULL) {
        c->rs.paused = 0;
        tg_bev_up_read_start(c);
        tg_exchange_relay_response(c);
    }
}

void
tg_client_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct tg_client *c = arg;

    TG_UNUSED(bev);
    if (what & BEV_EVENT_CONNECTED) {
        /* TLS handshake done: the header deadline starts now */
        c->conn.tls_ready = 1;
        if (c->conn.state == C_HEAD && !c->io.head_timer_on) {
            c->io.head_timer_on = 1;
            arm_timer(c, c->px->conf->http.header_timeout_ms);
            /* a client that handshakes and waits keeps no buffers either
             * (a request usually follows the Finished at once) */
            c->io.tls_idle_at = tg_now_ms() + TG_TLS_IDLE_MS;
            wake_at(c, c->io.tls_idle_at);
        }
        return;
    }
    if (c->conn.state == C_LINGER || c->conn.state == C_CLOSING || c->conn.state == C_DEAD) {
        tg_client_kill(c);
        return;
    }
    if ((what & BEV_EVENT_TIMEOUT) && (what & BEV_EVENT_READING)
        && c->conn.state == C_BUSY && !c->rq.done && !c->rs.started) {
        tg_exchange_end(c, 0);          /* no late upstream answer after ours */
        tg_client_respond_error(c, 408, "request_timeout", "the request body stalled");
        return;
    }
    if ((what & BEV_EVENT_EOF) && c->conn.state == C_BUSY) {
        if (c->rs.started && c->rq.done) {
            /* Half-close while the answer streams: finish it. */
            c->conn.close_after = 1;
            return;
        }
        if (!c->rs.started) {
            /* The client closed (or half-closed) before its answer began:
             * the upstream exchange is abandoned at once, as nginx does
             * without proxy_ignore_client_abort, and counted as 499. */
            tg_exchange_end(c, 0);
            c->rs.status = 499;
            tg_client_account(c);
        }
    }
    if ((what & BEV_EVENT_EOF) && c->conn.state == C_HEAD && c->conn.tls
        && c->conn.tls_ready && evbuffer_get_length(bufferevent_get_input(c->conn.bev)) == 0) {
        /* TLS, between requests: the client's close_notify (or FIN) is
         * answered with ours (RFC 8446, 6.1), by the close that follows an
         * answer; the kill below would close without it */
        tg_client_close_after_flush(c);
        return;
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

/* The head is not complete in n bytes: the header deadline runs from
 * the first byte.  (A head read whole is parsed at once, without arming
 * it: the idle timer stays until the request starts.) */
static void
head_wait(struct tg_client *c, size_t n)
{
    c->rq.head_scan = n;
    if (!c->io.head_timer_on) {
        c->io.head_timer_on = 1;
        arm_timer(c, c->px->conf->http.header_timeout_ms);
    }
}

static void
handle_head(struct tg_client *c)
{
    struct tg_proxy *px = c->px;
    struct evbuffer *in = bufferevent_get_input(c->conn.bev);
    size_t len = evbuffer_get_length(in);
    size_t n, i;
    const char *p;
    tg_rc rc;

    if (len == 0) {
        return;
    }
    n = len < px->lim.max_header_bytes ? len : px->lim.max_header_bytes;
    /* The parser starts over on each call: after the first look (early
     * errors), call it again only once a blank line may end the head or
     * the limit is reached, searching only the new bytes for it, so a
     * client sending a byte at a time costs O(n), not O(n^2). */
    if (c->rq.head_scan != 0 && n < px->lim.max_header_bytes) {
        struct evbuffer_ptr pos;
        size_t from = c->rq.head_scan > 3 ? c->rq.head_scan - 3 : 0;

        if (n <= c->rq.head_scan
            || evbuffer_ptr_set(in, &pos, from, EVBUFFER_PTR_SET) != 0
            || evbuffer_search(in, "\r\n\r\n", 4, &pos).pos < 0) {
            head_wait(c, n);
            return;
        }
    }
    p = (const char *)evbuffer_pullup(in, (ssize_t)n);
    if (c->rq.req.hdr == NULL) {
        c->rq.req.hdr = tg_proxy_cache_get(&px->free_hdrs, &px->nfree_hdrs,
                               TG_HTTP_MAX_HEADERS * sizeof(tg_http_hdr));
    }
    rc = tg_http_parse_request(p, n, &px->lim, &c->rq.req);
    if (rc == TG_AGAIN) {
        head_wait(c, n);
        return;
    }
    c->rq.head_scan = 0;
    c->conn.nreq++;
    request_reset(c, tg_now_us());
    if (rc != TG_OK) {
        c->conn.close_after = 1;
        tg_client_respond_error(c, c->rq.req.status, "bad_request", c->rq.req.error);
        return;
    }
    if (c->rq.headcap < c->rq.req.head_len) {
        if (c->rq.headcap == TG_HEADBUF_KEEP) {
            tg_proxy_cache_put(&px->free_heads, &px->nfree_heads, c->rq.headbuf);
        } else {
            free(c->rq.headbuf);
        }
        c->rq.headcap = (c->rq.req.head_len + 1023) & ~(size_t)1023;
        c->rq.headbuf = c->rq.headcap == TG_HEADBUF_KEEP
                     ? tg_proxy_cache_get(&px->free_heads, &px->nfree_heads, TG_HEADBUF_KEEP)
                     : tg_xmalloc(c->rq.headcap);
    }
    memcpy(c->rq.headbuf, p, c->rq.req.head_len);
    rebase(&c->rq.req.method, p, n, c->rq.headbuf);
    rebase(&c->rq.req.target, p, n, c->rq.headbuf);
    rebase(&c->rq.req.path, p, n, c->rq.headbuf);
    rebase(&c->rq.req.host, p, n, c->rq.headbuf);
    for (i = 0; i < c->rq.req.nhdr; i++) {
        rebase(&c->rq.req.hdr[i].name, p, n, c->rq.headbuf);
        rebase(&c->rq.req.hdr[i].value, p, n, c->rq.headbuf);
    }
    if (normalize_target(c) != TG_OK) {
        return;
    }
    evbuffer_drain(in, c->rq.req.head_len);
    disarm_timer(c);
    c->io.head_timer_on = 0;
    start_request(c);
}

/* Put the path of an origin-form target into its normal form (target.h)
 * in headbuf, where it only shrinks: routes match it and it is forwarded.
 * A target without one is answered 400 (TG_ERR).  "*" and the "/" that
 * the parser supplies for "http://host" are left alone. */
static tg_rc
normalize_target(struct tg_client *c)
{
    uintptr_t at = (uintptr_t)c->rq.req.path, hb = (uintptr_t)c->rq.headbuf;
    const char *err;

    if (c->rq.req.path[0] != '/' || at < hb || at >= hb + c->rq.req.head_len) {
        return TG_OK;
    }
    if (tg_target_normalize(c->rq.headbuf + (at - hb), &c->rq.req.path_len, &err) != TG_OK) {
        c->rq.reqid_len = 0;
        c->conn.close_after = 1;
        tg_client_respond_error(c, 400, "bad_request", err);
        return TG_ERR;
    }
    return TG_OK;
}

/* Per-request state for a new request whose head began at t_start_us:
 * nothing of the previous request may leak into its answer or its log. */
static void
request_reset(struct tg_client *c, uint64_t t_start_us)
{
    c->rs.started = 0;
    c->rq.t_start_us = t_start_us;
    c->up.t_up_us = 0;
    c->rs.bytes = 0;
    c->rq.total = 0;
    c->rq.reqid_len = 0;
    memset(&c->rq.lo, 0, sizeof(c->rq.lo));
    c->rq.lo.route = -1;
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
    static const char hex2[] =
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
        "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
        "404142434445464748494a4b4c4d4e4f505152535455565758595a5b5c5d5e5f"
        "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f"
        "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
        "a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf"
        "c0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d1d2d3d4d5d6d7d8d9dadbdcdddedf"
        "e0e1e2e3e4e5e6e7e8e9eaebecedeeeff0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";
    struct tg_proxy *px = c->px;
    const tg_http_hdr *h;
    size_t i;
    int k;

    for (i = 0; i < c->rq.req.nhdr; i++) {
        h = &c->rq.req.hdr[i];
        if (tg_http_name_is(h->name, h->name_len, "x-request-id")
            && reqid_ok(h->value, h->value_len)) {
            memcpy(c->rq.reqid, h->value, h->value_len);
            c->rq.reqid_len = h->value_len;
            c->rq.reqid[c->rq.reqid_len] = '\0';
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
        for (i = 0; i < 8; i++) {      /* a byte (two digits) at a time */
            memcpy(&c->rq.reqid[k * 16 + (int)i * 2], &hex2[((r >> (i * 8)) & 0xff) * 2], 2);
        }
    }
    c->rq.reqid_len = 32;
    c->rq.reqid[32] = '\0';
}

static void
start_request(struct tg_client *c)
{
    struct tg_proxy *px = c->px;
    const tg_conf *conf = px->conf;

    make_request_id(c);
    c->conn.state = C_BUSY;
    c->conn.close_after = !c->rq.req.keep_alive || px->draining
        || (conf->http.max_requests_per_connection != 0
            && c->conn.nreq >= conf->http.max_requests_per_connection);
    c->rq.done = (c->rq.req.body == TG_BODY_NONE);
    c->rq.left = c->rq.req.content_length;
    c->rq.total = 0;
    c->rq.bad = 0;
    c->rq.paused = 0;
    c->up.retried = 0;
    tg_chunked_init(&c->rq.chunk);

    if (c->rq.req.body == TG_BODY_LENGTH
        && c->rq.req.content_length > conf->http.max_body_bytes) {
        c->conn.close_after = 1;
        tg_client_respond_error(c, 413, "payload_too_large",
                      "the request body exceeds the configured limit");
        return;
    }
    /* identify -> route -> charge; the answer may come later (Redis) */
    if (tg_limiter_check(px->env->limiter, &c->rq.lctx, &c->rq.req, c->conn.ip, &c->rq.lo,
                         limit_decided, c) == TG_AGAIN) {
        c->rq.charging = 1;
        return;
    }
    limit_apply(c);
}

static void
limit_decided(void *arg)
{
    struct tg_client *c = arg;

    c->rq.charging = 0;
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

    tg_anomaly_count(c->px->env->anomaly, c->rq.lo.consumer);   /* allowed or refused */
    if (c->rq.lo.status == 0) {
        admit(c);
        return;
    }
    if (!c->rq.done) {
        c->conn.close_after = 1;
    }
    n = tg_limiter_headers(&c->rq.lo, extra, sizeof(extra));
    switch (c->rq.lo.status) {
    case 401:
        tg_client_respond(c, 401, "unauthorized", c->rq.lo.error, NULL, 0);
        return;
    case 403:
        tg_client_respond(c, 403, "forbidden", c->rq.lo.error, NULL, 0);
        return;
    case 429:
        tg_client_respond(c, 429, "rate_limited", c->rq.lo.error, extra, n);
        return;
    default:
        tg_client_respond(c, 503, "unavailable", c->rq.lo.error, extra, n);
        return;
    }
}

/* Adaptive concurrency: forward now, wait for a slot (by tier), or shed
 * with 503 (see upstream.h).  Without adaptive: forward now. */
static void
admit(struct tg_client *c)
{
    admitted(c, tg_upstream_admit(c->px->env->pool, c->rq.lo.tier, &c->up.waiter, admitted, c));
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
    c->up.waiter = NULL;
    if (result == TG_ADMIT_GO) {
        tg_exchange_forward(c);
        return;
    }
    tg_metric_inc(c->px->env->shard, TG_M_SHED, tier_label(c));
    if (!c->rq.done) {
        c->conn.close_after = 1;
    }
    tg_client_respond(c, 503, "overloaded", why[result], retry, sizeof(retry) - 1);
}

/* ---- answers of our own ---------------------------------------------- */

void
tg_client_respond_error(struct tg_client *c, int status, const char *code, const char *msg)
{
    tg_client_respond(c, status, code, msg, NULL, 0);
}

/* Answer with a JSON error body; extra: more header lines (CRLF-ended). */
void
tg_client_respond(struct tg_client *c, int status, const char *code, const char *msg,
        const char *extra, size_t extra_len)
{
    struct evbuffer *out = bufferevent_get_output(c->conn.bev);
    char body[512], head[256 + TG_REQID_MAX];
    int bn, hn;

    if (c->rq.reqid_len == 0) {
        make_request_id(c);
    }
    bn = (int)tg_fmt(body, sizeof(body),
                     "{\"error\":\"%s\",\"message\":\"%s\",\"request_id\":\"%s\"}\n",
                     code, msg, c->rq.reqid);
    if (c->conn.state != C_BUSY || !c->rq.done) {
        c->conn.close_after = 1;
    }
    hn = (int)tg_fmt(head, sizeof(head),
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                     "Content-Length: %d\r\nX-Request-ID: %s\r\n%s",
                     status, tg_http_reason(status), bn, c->rq.reqid,
                     c->conn.close_after ? "Connection: close\r\n" : "");
    evbuffer_add(out, head, (size_t)hn);
    if (extra_len != 0) {
        evbuffer_add(out, extra, extra_len);
    }
    evbuffer_add(out, "\r\n", 2);
    if (!(c->conn.state == C_BUSY && c->rq.req.is_head)) {
        evbuffer_add(out, body, (size_t)bn);
    }
    c->rs.started = 1;
    c->rs.status = status;
    tg_client_account(c);
    disarm_timer(c);
    if (c->conn.close_after) {
        tg_client_close_after_flush(c);
    } else {
        tg_client_next_request(c);
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

    if (c->rq.lo.tier[0] != '\0') {
        for (i = 0; i < conf->ntiers; i++) {
            if (strcmp(conf->tiers[i].name, c->rq.lo.tier) == 0) {
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

/* The request's access-log line (accesslog.c), handed to the worker's
 * log buffer: the write to the file happens on the log's own thread. */
static void
access_log(struct tg_client *c, uint64_t now_us)
{
    const tg_http_req *r = &c->rq.req;
    tg_alog_req a = {
        .request_id = c->rq.reqid, .consumer = c->rq.lo.consumer, .tier = c->rq.lo.tier,
        .method = r->method, .method_len = r->method_len,
        .path = r->path, .path_len = r->path_len,
        .status = c->rs.status,
        .bytes_in = r->body == TG_BODY_LENGTH ? r->content_length : c->rq.total,
        .bytes_out = c->rs.bytes,
        .now_us = now_us, .start_us = c->rq.t_start_us, .upstream_us = c->up.t_up_us,
        .upstream = c->up.t_up_us ? c->px->conf0->upstream.servers[c->up.server].text : "",
        .limit = limit_outcome(&c->rq.lo),
    };

    tg_alog_request(c->px->env->alog, &a);
}

/* One finished request: counted once, when its response is queued. */
void
tg_client_account(struct tg_client *c)
{
    struct tg_metrics_shard *m = c->px->env->shard;
    size_t tier = tier_label(c);
    uint64_t now = tg_now_us();

    tg_metric_inc(m, TG_M_REQUESTS, tg_metrics_tier_status(tier, c->rs.status));
    if (c->rq.t_start_us != 0) {
        tg_metric_observe_us(m, TG_M_REQUEST_DURATION, tier, now - c->rq.t_start_us);
    }
    if (c->up.t_up_us != 0) {
        tg_metric_observe_us(m, TG_M_UPSTREAM_DURATION, c->up.server, now - c->up.t_up_us);
    }
    if (c->rq.lo.route >= 0) {
        tg_metric_inc(m, TG_M_ROUTE_REQUESTS, (size_t)c->rq.lo.route);
    }
    if (c->px->env->alog != NULL) {
        access_log(c, now);
    }
    if (c->rq.lo.consumer[0] == '\0' && c->rq.lo.status == 0) {
        return;                       /* not limited: a plain proxy request */
    }
    switch (c->rq.lo.status) {
    case 0:
        tg_metric_inc(m, TG_M_LIMIT_DECISIONS, c->rq.lo.fallback ? TG_MD_STORE_FALLBACK
                                                              : TG_MD_ALLOWED);
        if (c->rq.lo.limited) {
            tg_metric_add(m, TG_M_TOKENS_CONSUMED, tier, c->rq.lo.cost);
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
    c->rq.lo.status = 0;
    c->rq.lo.consumer[0] = '\0';       /* counted: a second call adds nothing */
    c->up.t_up_us = 0;
}
