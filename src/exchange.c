/*
 * exchange.c - one upstream exchange of a client's request: forward (an
 * upstream connection lent by the pool, the request head from headers.c),
 * the request body relay, the response head and the response body relay,
 * the upstream deadlines (connect, first byte, total), one retry when
 * nothing can have been done twice, and tg_exchange_end, the one place
 * where the connection goes back to the pool.
 *
 * Backpressure: see client.c.  Every function runs on the worker's
 * thread with the client (struct tg_client, proxy_int.h) alive: the
 * client is freed only from its own defer event.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>

#include "tollgate/headers.h"
#include "tollgate/upstream.h"
#include "proxy_int.h"

#define ADD_LIT(b, lit) add_str((b), (lit), sizeof(lit) - 1)

static void add_str(struct evbuffer *b, const char *s, size_t n);
static int strip_key(const void *lim, const tg_http_req *r, const tg_http_hdr *h);
static void write_upstream_head(struct tg_client *c, struct evbuffer *out);
static void rq_chunk_cb(void *arg, const char *data, size_t len);
static void request_body_done(struct tg_client *c);
static void up_arm(struct tg_client *c);
static void up_write_cb(struct bufferevent *bev, void *arg);
static void up_failed(struct tg_client *c, int status, const char *code,
                      const char *msg);
static int idempotent(const tg_http_req *r);
static void write_response_head(struct tg_client *c, const tg_http_resp *rs);
static void rs_chunk_cb(void *arg, const char *data, size_t len);

/* ---- forwarding ----------------------------------------------------- */

static void
add_str(struct evbuffer *b, const char *s, size_t n)
{
    evbuffer_add(b, s, n);
}

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
        .ip = c->conn.ip, .tls = c->conn.tls, .reqid = c->rq.reqid, .reqid_len = c->rq.reqid_len,
        .consumer = c->rq.lo.consumer, .tier = c->rq.lo.tier,
        .trusted = conf->http.trusted_proxies, .ntrusted = conf->http.ntrusted_proxies,
        .strip = strip_key, .strip_arg = c->px->env->limiter,
    };
    tg_hbuf hb;

    tg_hbuf_init(&hb);
    tg_headers_request(&hb, &c->rq.req, &f);
    evbuffer_add(out, hb.p, hb.len);
    tg_hbuf_free(&hb);
}

void
tg_exchange_forward(struct tg_client *c)
{
    struct tg_proxy *px = c->px;
    const tg_conf *conf = px->conf;
    struct bufferevent *ub;
    uint64_t now = tg_now_ms();

    uint64_t retry_ms = 0;

    c->up.uc = tg_upstream_acquire(px->env->pool, &c->up.reused, c->up.avoid, &retry_ms);
    if (c->up.uc != NULL) {
        tg_upstream_set_class(c->up.uc, c->rq.req.method, c->rq.req.method_len,
                              c->rq.req.path, c->rq.req.path_len);
    }
    if (c->up.uc == NULL) {
        if (retry_ms != 0) {
            /* every server's breaker is open or its health check failing:
             * say so at once instead of trying */
            char extra[48];
            size_t n = tg_fmt(extra, sizeof(extra), "Retry-After: %llu\r\n",
                              (unsigned long long)((retry_ms + 999) / 1000));
            if (!c->rq.done) {
                c->conn.close_after = 1;
            }
            tg_client_respond(c, 503, "unavailable", "no healthy upstream server", extra, n);
            return;
        }
        tg_client_respond_error(c, 502, "bad_gateway", "no upstream connection could be made");
        return;
    }
    c->up.reported = 0;
    c->up.connected = c->up.reused;
    c->up.state = U_HEAD;
    if (c->up.t_up_us == 0) {
        c->up.t_up_us = tg_now_us();
    }
    c->up.server = tg_uconn_server_index(c->up.uc);
    c->rs.paused = 0;
    ub = tg_uconn_bev(c->up.uc);
    bufferevent_setcb(ub, tg_exchange_read_cb, up_write_cb, tg_exchange_event_cb, c);
    bufferevent_setwatermark(ub, EV_WRITE, TG_LOW_WATER, 0);
    /* A new connection writes when the connect completes; a reused one
     * is written through at once (tg_bev_up_flush). */
    if (c->up.connected) {
        /* the connection's own read event, already watching the fd: no
         * event operation, no epoll_ctl */
        tg_bev_up_read_start(c);
    } else {
        bufferevent_enable(ub, EV_WRITE);      /* the connect; reads after it */
    }
    write_upstream_head(c, bufferevent_get_output(ub));

    if (!c->up.retried) {
        c->up.total_deadline = now + conf->upstream.total_timeout_ms;
    }
    c->up.phase_deadline = 0;
    c->up.phase_is_connect = 0;
    if (!c->up.connected) {
        c->up.phase_is_connect = 1;
        c->up.phase_deadline = now + conf->upstream.connect_timeout_ms;
    } else if (c->rq.done) {
        c->up.phase_deadline = now + conf->upstream.first_byte_timeout_ms;
    }
    up_arm(c);

    if (c->rq.done) {
        tg_bev_up_flush(c);
        return;
    }
    if (c->rq.req.expect_continue && !c->up.retried) {
        ADD_LIT(bufferevent_get_output(c->conn.bev), "HTTP/1.1 100 Continue\r\n\r\n");
        tg_bev_client_flush(c);
    }
    tg_bev_rd_on(c, &px->body_tv);
    tg_exchange_relay_request(c);
}

static void
rq_chunk_cb(void *arg, const char *data, size_t len)
{
    struct tg_client *c = arg;
    char line[24];
    int n;

    c->rq.total += len;
    if (c->rq.total > c->px->conf->http.max_body_bytes) {
        c->rq.bad = 413;
        return;
    }
    if (len == 0) {
        return;
    }
    n = (int)tg_fmt(line, sizeof(line), "%zx\r\n", len);
    struct evbuffer *out = bufferevent_get_output(tg_uconn_bev(c->up.uc));
    evbuffer_add(out, line, (size_t)n);
    evbuffer_add(out, data, len);
    evbuffer_add(out, "\r\n", 2);
}

void
tg_exchange_relay_request(struct tg_client *c)
{
    struct evbuffer *in = bufferevent_get_input(c->conn.bev);
    struct evbuffer *out = bufferevent_get_output(tg_uconn_bev(c->up.uc));
    size_t len;

    while (!c->rq.done && (len = evbuffer_get_length(in)) != 0) {
        if (evbuffer_get_length(out) >= TG_HIGH_WATER) {
            tg_bev_up_flush(c);
            if (evbuffer_get_length(out) < TG_HIGH_WATER) {
                continue;
            }
            c->rq.paused = 1;
            tg_bev_rd_off(c);
            return;
        }
        if (c->rq.req.body == TG_BODY_LENGTH) {
            size_t n = len < c->rq.left ? len : (size_t)c->rq.left;
            if (n > TG_HIGH_WATER) {
                n = TG_HIGH_WATER;
            }
            evbuffer_remove_buffer(in, out, n);
            c->rq.left -= n;
            if (c->rq.left == 0) {
                request_body_done(c);
            }
        } else {
            struct evbuffer_iovec v[8];
            size_t consumed = 0;
            int cnt = evbuffer_peek(in, -1, NULL, v, 8), i;
            for (i = 0; i < cnt && !c->rq.chunk.done; i++) {
                ssize_t r = tg_chunked_decode(&c->rq.chunk, v[i].iov_base,
                                              v[i].iov_len, rq_chunk_cb, c);
                if (r < 0) {
                    c->rq.bad = 400;
                    break;
                }
                consumed += (size_t)r;
                if (c->rq.bad) {
                    break;
                }
            }
            evbuffer_drain(in, consumed);
            if (c->rq.bad) {
                int st = c->rq.bad;
                c->conn.close_after = 1;
                tg_exchange_end(c, 0);
                if (c->rs.started) {
                    tg_client_kill(c);    /* an answer is already under way */
                } else if (st == 413) {
                    tg_client_respond_error(c, 413, "payload_too_large",
                                  "the request body exceeds the configured limit");
                } else {
                    tg_client_respond_error(c, 400, "bad_request", c->rq.chunk.error
                                  ? c->rq.chunk.error : "malformed chunked body");
                }
                return;
            }
            if (c->rq.chunk.done) {
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
    c->rq.done = 1;
    tg_bev_rd_on(c, NULL);                         /* may have been paused */
    if (c->up.connected && c->up.state == U_HEAD) {
        c->up.phase_is_connect = 0;
        c->up.phase_deadline = tg_now_ms() + c->px->conf->upstream.first_byte_timeout_ms;
        up_arm(c);
    }
}

/* ---- upstream side -------------------------------------------------- */

/* The upstream deadline timer is lazy, as nginx's: left pending for an
 * earlier time (the last exchange's deadline, the first byte's) it wakes
 * early and tg_exchange_timer_cb arms it again for what is due then; so a
 * kept-alive exchange re-arms it about once per timeout, not twice per
 * request, and tg_exchange_end leaves it. */
static void
up_arm(struct tg_client *c)
{
    uint64_t now, when = c->up.total_deadline, ms;
    struct timeval tv;

    if (c->up.phase_deadline != 0 && c->up.phase_deadline < when) {
        when = c->up.phase_deadline;
    }
    if (c->up.armed_ms <= when && evtimer_pending(c->io.up_timer, NULL)) {
        return;
    }
    c->up.armed_ms = when;
    now = tg_now_ms();
    ms = when > now ? when - now : 0;
    tv = tg_ms_tv(ms);
    evtimer_add(c->io.up_timer, &tv);
}

void
tg_exchange_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_client *c = arg;
    uint64_t now = tg_now_ms();

    TG_UNUSED(fd);
    TG_UNUSED(what);
    if (c->up.uc == NULL) {
        return;
    }
    if (c->up.phase_deadline != 0 && now >= c->up.phase_deadline) {
        if (c->up.phase_is_connect) {
            up_failed(c, 502, "bad_gateway", "upstream connect timed out");
        } else {
            up_failed(c, 504, "gateway_timeout", "upstream did not answer in time");
        }
        return;
    }
    if (now >= c->up.total_deadline) {
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
        c->up.connected = 1;
        tg_bev_up_read_start(c);
        c->up.phase_deadline = 0;
        c->up.phase_is_connect = 0;
        if (c->rq.done && c->up.state == U_HEAD) {
            c->up.phase_deadline = tg_now_ms() + c->px->conf->upstream.first_byte_timeout_ms;
        }
        up_arm(c);
        return;
    }
    if ((what & BEV_EVENT_EOF) && c->up.state == U_BODY && c->rs.body == TG_BODY_CLOSE) {
        /* The end of a close-delimited body: queue all that is left,
         * past the high-water mark, since the connection goes now. */
        struct evbuffer *in = bufferevent_get_input(bev);
        struct evbuffer *out = bufferevent_get_output(c->conn.bev);
        size_t len = evbuffer_get_length(in);
        if (len != 0 && c->rs.chunked_out) {
            char line[24];
            int n = (int)tg_fmt(line, sizeof(line), "%zx\r\n", len);
            evbuffer_add(out, line, (size_t)n);
            evbuffer_remove_buffer(in, out, len);
            evbuffer_add(out, "\r\n", 2);
        } else if (len != 0) {
            evbuffer_remove_buffer(in, out, len);
        }
        if (c->rs.chunked_out) {
            ADD_LIT(bufferevent_get_output(c->conn.bev), "0\r\n\r\n");
        }
        tg_exchange_end(c, 0);
        tg_exchange_response_done(c);
        return;
    }
    if (!c->up.connected) {
        snprintf(msg, sizeof(msg), "upstream %s: connect failed: %s",
                 tg_uconn_server(c->up.uc), strerror(EVUTIL_SOCKET_ERROR()));
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
    if (c->rq.paused && !c->rq.done && c->conn.state == C_BUSY) {
        c->rq.paused = 0;
        tg_bev_rd_on(c, &c->px->body_tv);
        tg_exchange_relay_request(c);
    }
}

/* The exchange failed on the upstream side. */
static void
up_failed(struct tg_client *c, int status, const char *code, const char *msg)
{
    /* A reused keep-alive connection that the server had just closed
     * (nothing came back on it: an invalid answer is an answer) says
     * nothing about the server's health: no outcome for its breaker. */
    int stale = c->up.reused && c->up.state == U_HEAD && status == 502 && c->up.uc != NULL
                && evbuffer_get_length(bufferevent_get_input(tg_uconn_bev(c->up.uc))) == 0;

    if (!c->up.reported && c->up.uc != NULL && !stale) {
        tg_upstream_report(c->up.uc, 0);
        c->up.reported = 1;
    }
    /* Retry once, on another server when there is one, when nothing can
     * have been done twice: a bodyless request whose connect failed, or
     * whose kept-alive connection the server had just closed, and that is
     * idempotent (a reused connection may have delivered it). */
    if (!c->up.retried && !c->rs.started && c->up.state == U_HEAD && status == 502
        && c->rq.req.body == TG_BODY_NONE
        && (!c->up.connected || (stale && idempotent(&c->rq.req)))) {
        struct tg_uconn *old = c->up.uc;

        c->up.uc = NULL;
        event_del(c->io.up_timer);
        tg_uconn_read_stop(old);
        c->up.retried = 1;
        c->up.avoid = old;
        tg_exchange_forward(c);
        c->up.avoid = NULL;
        tg_upstream_release(old, 0);
        return;
    }
    tg_exchange_end(c, 0);
    if (c->rs.started) {
        tg_client_kill(c);            /* the response is cut: the client sees it */
        return;
    }
    if (!c->rq.done) {
        c->conn.close_after = 1;
    }
    tg_warn("request %s: %s", c->rq.reqid, msg);
    tg_client_respond_error(c, status, code, msg);
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

void
tg_exchange_end(struct tg_client *c, int reusable)
{
    if (c->up.uc == NULL) {
        return;
    }
    /* the pool's idle watch takes over the connection's read event */
    tg_upstream_release(c->up.uc, reusable && c->rq.done);
    c->up.uc = NULL;
    c->up.state = U_NONE;
}

/* The response head for the client (headers.c); sets rs_chunked_out and
 * close_after from it. */
static void
write_response_head(struct tg_client *c, const tg_http_resp *rs)
{
    char rl[512];
    tg_headers_down f = {
        .is_head = c->rq.req.is_head, .minor = c->rq.req.minor, .rq_done = c->rq.done,
        .close_after = c->conn.close_after, .reqid = c->rq.reqid, .reqid_len = c->rq.reqid_len,
        .extra = rl,
        .extra_len = c->rq.lo.limited ? tg_limiter_headers(&c->rq.lo, rl, sizeof(rl)) : 0,
    };
    tg_hbuf hb;
    unsigned out;

    tg_hbuf_init(&hb);
    out = tg_headers_response(&hb, rs, &f);
    c->rs.chunked_out = (out & TG_HEADERS_CHUNKED) != 0;
    c->conn.close_after = (out & TG_HEADERS_CLOSE) != 0;
    evbuffer_add(bufferevent_get_output(c->conn.bev), hb.p, hb.len);
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

    if (c->up.state == U_BODY) {
        tg_exchange_relay_response(c);
        return;
    }
    if (c->up.state != U_HEAD) {
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
        rc = tg_http_parse_response(p, n, &lim, c->rq.req.is_head, &rs);
        if (rc == TG_AGAIN) {
            return;
        }
        if (rc != TG_OK) {
            tg_warn("request %s: upstream %s sent an invalid response: %s",
                    c->rq.reqid, tg_uconn_server(c->up.uc), rs.error);
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
    c->up.phase_deadline = 0;
    up_arm(c);
    if (!c->up.reported) {
        tg_upstream_report_status(c->up.uc, rs.status);
        c->up.reported = 1;
    }
    c->rs.status = rs.status;
    c->rs.body = rs.body;
    c->rs.left = rs.content_length;
    c->rs.keep = rs.keep_alive;
    tg_chunked_init(&c->rs.chunk);
    write_response_head(c, &rs);
    evbuffer_drain(in, rs.head_len);
    c->rs.started = 1;
    c->up.state = U_BODY;
    if (rs.body == TG_BODY_NONE
        || (rs.body == TG_BODY_LENGTH && rs.content_length == 0)) {
        tg_exchange_end(c, c->rs.keep);
        tg_exchange_response_done(c);
        return;
    }
    tg_exchange_relay_response(c);
}

static void
rs_chunk_cb(void *arg, const char *data, size_t len)
{
    struct tg_client *c = arg;
    struct evbuffer *out = bufferevent_get_output(c->conn.bev);
    char line[24];
    int n;

    if (len == 0) {
        return;
    }
    c->rs.bytes += len;
    if (c->rs.chunked_out) {
        n = (int)tg_fmt(line, sizeof(line), "%zx\r\n", len);
        evbuffer_add(out, line, (size_t)n);
        evbuffer_add(out, data, len);
        evbuffer_add(out, "\r\n", 2);
    } else {
        evbuffer_add(out, data, len);
    }
}

void
tg_exchange_relay_response(struct tg_client *c)
{
    struct evbuffer *in, *out = bufferevent_get_output(c->conn.bev);
    size_t len;

    if (c->up.uc == NULL) {
        return;
    }
    in = bufferevent_get_input(tg_uconn_bev(c->up.uc));
    while ((len = evbuffer_get_length(in)) != 0) {
        if (evbuffer_get_length(out) >= TG_HIGH_WATER) {
            tg_bev_client_flush(c);
            if (evbuffer_get_length(out) < TG_HIGH_WATER) {
                continue;
            }
            c->rs.paused = 1;
            tg_uconn_read_stop(c->up.uc);
            return;
        }
        if (c->rs.body == TG_BODY_LENGTH) {
            size_t n = len < c->rs.left ? len : (size_t)c->rs.left;
            evbuffer_remove_buffer(in, out, n);
            c->rs.left -= n;
            c->rs.bytes += n;
            if (c->rs.left == 0) {
                tg_exchange_end(c, c->rs.keep);
                tg_exchange_response_done(c);
                return;
            }
        } else if (c->rs.body == TG_BODY_CHUNKED) {
            struct evbuffer_iovec v[8];
            size_t consumed = 0;
            int cnt = evbuffer_peek(in, -1, NULL, v, 8), i;
            for (i = 0; i < cnt && !c->rs.chunk.done; i++) {
                ssize_t r = tg_chunked_decode(&c->rs.chunk, v[i].iov_base,
                                              v[i].iov_len, rs_chunk_cb, c);
                if (r < 0) {
                    tg_warn("request %s: upstream %s: bad chunked body: %s",
                            c->rq.reqid, tg_uconn_server(c->up.uc), c->rs.chunk.error);
                    up_failed(c, 502, "bad_gateway", "bad chunked body");
                    return;
                }
                consumed += (size_t)r;
            }
            evbuffer_drain(in, consumed);
            if (c->rs.chunk.done) {
                if (c->rs.chunked_out) {
                    ADD_LIT(out, "0\r\n\r\n");
                }
                tg_exchange_end(c, c->rs.keep);
                tg_exchange_response_done(c);
                return;
            }
        } else {   /* TG_BODY_CLOSE: everything until EOF */
            c->rs.bytes += len;
            if (c->rs.chunked_out) {
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
void
tg_exchange_response_done(struct tg_client *c)
{
    tg_client_account(c);
    if (!c->rq.done || c->conn.close_after || c->px->draining) {
        tg_client_close_after_flush(c);
        return;
    }
    tg_client_next_request(c);
}
