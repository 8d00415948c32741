/*
 * admin.c - admin listener on the main thread's event base.
 *
 * Bounded reads.  No admin endpoint takes a body, and libevhtp would read
 * any body into memory, so a request that announces one (Content-Length
 * other than 0, or Transfer-Encoding) is answered 413 as soon as its head
 * is parsed.  Heads are bounded too (ADMIN_MAX_HEADERS fields of at most
 * ADMIN_MAX_HEAD bytes together: 431), and so are the connections
 * (ADMIN_MAX_CONNS; more are closed at accept).  A refused connection is
 * taken from libevhtp, answered, and closed with a short linger (input
 * discarded), so that a client still uploading reads the answer rather
 * than a reset.
 *
 * The pages (/metrics, /status, /status/top, the /readyz store check) read
 * the objects server.c lends through a tg_admin_view; the process-wide
 * states they show (store mode, each upstream server's breaker) are
 * merged here from the workers' samples.
 */
#include "tollgate/admin.h"
#include "tollgate/common_ev.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/listener.h>
#include <evhtp.h>

#include "tollgate/alerts.h"
#include "tollgate/anomaly.h"
#include "tollgate/health.h"
#include "tollgate/metrics.h"
#include "tollgate/redis.h"
#include "tollgate/throttle.h"
#include "tollgate/worker.h"

#define ADMIN_MAX_ROUTES  8
#define ADMIN_MAX_CONNS   64
#define ADMIN_MAX_HEADERS 64
#define ADMIN_MAX_HEAD    16384     /* header names and values, per request */
#define ADMIN_LINGER_MS   2000
#define ADMIN_PAUSE_MS    100       /* accept off this long when fds run out */

/* One admin connection: its head so far; after a refusal, the linger. */
struct admin_conn_ {
    struct tg_admin    *adm;
    size_t              nhdr;
    size_t              hbytes;
    struct bufferevent *bev;        /* ours once refused, else NULL */
    struct event       *timer;      /* linger bound */
    int                 shut;       /* write side shut */
    LIST_ENTRY(admin_conn_) link;   /* in adm->refused, once refused */
};

struct tg_admin_route_ {
    struct tg_admin *adm;
    tg_admin_fn      fn;
    void            *arg;
};

struct tg_admin {
    evhtp_t *htp;
    struct tg_admin_route_ routes[ADMIN_MAX_ROUTES];
    size_t   nroutes;
    int      ready;
    int    (*check)(void *arg);
    void    *check_arg;
    unsigned nconns;                /* open, including refused ones lingering */
    LIST_HEAD(, admin_conn_) refused;   /* ours until their linger ends */
};

static void reply(evhtp_request_t *req, evhtp_res code, const char *body);
static void healthz_cb(evhtp_request_t *req, void *arg);
static void readyz_cb(evhtp_request_t *req, void *arg);
static void notfound_cb(evhtp_request_t *req, void *arg);
static evhtp_res pre_accept_cb(evhtp_connection_t *conn, void *arg);
static evhtp_res post_accept_cb(evhtp_connection_t *conn, void *arg);
static void accept_error_cb(struct evconnlistener *l, void *arg);
static void conn_free(struct admin_conn_ *ac);
static int  store_ready(void *arg);
static int  metrics_page(void *arg, struct evbuffer *out, const char **ctype);
static int  status_page(void *arg, struct evbuffer *out, const char **ctype);
static int  top_page(void *arg, struct evbuffer *out, const char **ctype);

struct tg_admin *
tg_admin_create(struct event_base *base, const tg_addr *addr, char *err, size_t errlen)
{
    struct tg_admin *adm = tg_xcalloc(1, sizeof(*adm));
    struct timeval tv = { 10, 0 };

    adm->htp = evhtp_new(base, NULL);
    if (adm->htp == NULL) {
        snprintf(err, errlen, "admin: cannot create the HTTP server");
        free(adm);
        return NULL;
    }
    /* libevhtp has no timeouts unless told: a stuck admin client must not
     * hold a socket forever. */
    evhtp_set_timeouts(adm->htp, &tv, &tv);
    evhtp_set_cb(adm->htp, "/healthz", healthz_cb, adm);
    evhtp_set_cb(adm->htp, "/readyz", readyz_cb, adm);
    evhtp_set_gencb(adm->htp, notfound_cb, adm);
    evhtp_set_pre_accept_cb(adm->htp, pre_accept_cb, adm);
    evhtp_set_post_accept_cb(adm->htp, post_accept_cb, adm);
    if (evhtp_bind_sockaddr(adm->htp, (struct sockaddr *)&addr->sa, addr->salen, 128) != 0) {
        snprintf(err, errlen, "admin: cannot listen on %s: %s", addr->text, strerror(errno));
        evhtp_free(adm->htp);
        free(adm);
        return NULL;
    }
    evconnlistener_set_error_cb(adm->htp->server, accept_error_cb);
    return adm;
}

void
tg_admin_set_ready(struct tg_admin *adm, int ready)
{
    if (adm != NULL) {
        adm->ready = ready;
    }
}

static void
route_cb(evhtp_request_t *req, void *arg)
{
    struct tg_admin_route_ *r = arg;
    const char *ctype = "text/plain; charset=utf-8";
    int status = r->fn(r->arg, req->buffer_out, &ctype);

    evhtp_headers_add_header(req->headers_out,
        evhtp_header_new("Content-Type", ctype, 0, 0));
    evhtp_send_reply(req, (evhtp_res)status);
}

void
tg_admin_route(struct tg_admin *adm, const char *path, tg_admin_fn fn, void *arg)
{
    struct tg_admin_route_ *r;

    if (adm == NULL || adm->nroutes == ADMIN_MAX_ROUTES) {
        return;
    }
    r = &adm->routes[adm->nroutes++];
    r->adm = adm;
    r->fn = fn;
    r->arg = arg;
    evhtp_set_cb(adm->htp, path, route_cb, r);
}

void
tg_admin_set_check(struct tg_admin *adm, int (*check)(void *arg), void *arg)
{
    if (adm != NULL) {
        adm->check = check;
        adm->check_arg = arg;
    }
}

void
tg_admin_destroy(struct tg_admin *adm)
{
    if (adm == NULL) {
        return;
    }
    while (!LIST_EMPTY(&adm->refused)) {
        conn_free(LIST_FIRST(&adm->refused));
    }
    evhtp_unbind_socket(adm->htp);
    evhtp_free(adm->htp);
    free(adm);
}

static void
reply(evhtp_request_t *req, evhtp_res code, const char *body)
{
    evhtp_headers_add_header(req->headers_out,
        evhtp_header_new("Content-Type", "text/plain; charset=utf-8", 0, 0));
    evbuffer_add(req->buffer_out, body, strlen(body));
    evhtp_send_reply(req, code);
}

static void
healthz_cb(evhtp_request_t *req, void *arg)
{
    TG_UNUSED(arg);
    reply(req, EVHTP_RES_OK, "ok\n");
}

static void
readyz_cb(evhtp_request_t *req, void *arg)
{
    struct tg_admin *adm = arg;

    if (adm->ready && adm->check != NULL && !adm->check(adm->check_arg)) {
        reply(req, EVHTP_RES_SERVUNAVAIL, "store not connected\n");
    } else if (adm->ready) {
        reply(req, EVHTP_RES_OK, "ready\n");
    } else {
        reply(req, EVHTP_RES_SERVUNAVAIL, "not ready\n");
    }
}

static void
notfound_cb(evhtp_request_t *req, void *arg)
{
    TG_UNUSED(arg);
    reply(req, EVHTP_RES_NOTFOUND, "not found\n");
}

/* ---- pages: /metrics, /status, /status/top ------------------------------ */

void
tg_admin_serve(struct tg_admin *adm, const tg_admin_view *v)
{
    void *arg = (void *)v;              /* the routes' argument, read only */

    tg_admin_set_check(adm, store_ready, arg);
    tg_admin_route(adm, "/metrics", metrics_page, arg);
    /* before /status: libevhtp matches a path by its prefix, first wins */
    tg_admin_route(adm, "/status/top", top_page, arg);
    tg_admin_route(adm, "/status", status_page, arg);
}

/* /readyz: with store redis and on_failure deny, a worker without its
 * Redis connection would refuse every request: not ready. */
static int
store_ready(void *arg)
{
    const tg_admin_view *v = arg;
    unsigned i;

    if (v->conf->store != TG_STORE_REDIS || v->conf->redis.on_failure != TG_FAIL_DENY) {
        return 1;
    }
    for (i = 0; i < v->nworkers; i++) {
        if (!tg_worker_store_ready(v->workers[i])) {
            return 0;
        }
    }
    return 1;
}

/* The store mode now: Redis while every worker's breaker is closed, else
 * the on_failure policy some worker is using. */
static enum tg_metric_store_mode
store_mode(const tg_admin_view *v)
{
    unsigned i;

    if (v->conf->store == TG_STORE_LOCAL) {
        return TG_MSM_LOCAL;
    }
    for (i = 0; i < v->nworkers; i++) {
        int st = tg_worker_redis_breaker(v->workers[i]);
        if (st == 1 || !tg_worker_store_ready(v->workers[i])) {
            switch (v->conf->redis.on_failure) {
            case TG_FAIL_ALLOW: return TG_MSM_ALLOW;
            case TG_FAIL_DENY:  return TG_MSM_DENY;
            default:            return TG_MSM_LOCAL;
            }
        }
    }
    return TG_MSM_REDIS;
}

/* A server's breaker as the process sees it: open if any worker's is,
 * else half-open if any, else closed. */
static int
upstream_state(const tg_admin_view *v, size_t s)
{
    int worst = 0;
    unsigned i;

    for (i = 0; i < v->nworkers; i++) {
        int st = tg_worker_upstream_state(v->workers[i], s);
        if (st == 1 || (st == 2 && worst == 0)) {
            worst = st;
        }
    }
    return worst;
}

void
tg_admin_refresh_gauges(const tg_admin_view *v)
{
    size_t s;

    tg_metrics_set_store_mode(store_mode(v));
    for (s = 0; s < v->conf->upstream.nservers; s++) {
        tg_metrics_set_gauge(TG_M_UPSTREAM_HEALTH, s, tg_health_up(v->health, s) ? 1 : 0);
        tg_metrics_set_gauge(TG_M_UPSTREAM_BREAKER, s, upstream_state(v, s));
    }
}

static int
metrics_page(void *arg, struct evbuffer *out, const char **ctype)
{
    const tg_admin_view *v = arg;

    *ctype = "text/plain; version=0.0.4; charset=utf-8";
    tg_metrics_tick(v->shards, v->nworkers);
    return tg_metrics_render_prometheus(v->shards, v->nworkers, out) == TG_OK ? 200 : 500;
}

/*
 * /status, one JSON object built in parts.  Each part appends
 * "name":value followed by a comma; "alerts" comes last and closes the
 * object.  A new part is one more call before status_alerts.
 */
static const char *const breaker_states[] = { "closed", "open", "half-open" };

/* "version", "uptime_s", "draining", "config", "workers" */
static void
status_process(const tg_admin_view *v, struct evbuffer *out)
{
    char when[32];
    struct tm tm;

    gmtime_r(&v->loaded, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
    evbuffer_add_printf(out,
        "\"version\":\"%s\",\"uptime_s\":%ld,\"draining\":%s,"
        "\"config\":{\"path\":\"%s\",\"version\":%u,\"loaded_at\":\"%s\"},"
        "\"workers\":%u,",
        TG_VERSION, (long)(time(NULL) - v->started), v->draining ? "true" : "false",
        v->conf->path, v->generation, when, v->nworkers);
}

/* "store":{"kind":...,"mode":...,"breakers":[one per worker],"error":...} */
static void
status_store(const tg_admin_view *v, struct evbuffer *out)
{
    static const char *const modes[] = { "redis", "local", "allow", "deny" };
    unsigned i;

    evbuffer_add_printf(out, "\"store\":{\"kind\":\"%s\",\"mode\":\"%s\",\"breakers\":[",
                        v->conf->store == TG_STORE_REDIS ? "redis" : "local",
                        modes[store_mode(v)]);
    for (i = 0; i < v->nworkers; i++) {
        int st = tg_worker_redis_breaker(v->workers[i]);
        evbuffer_add_printf(out, "%s\"%s\"", i ? "," : "",
                            st >= 0 && st <= 2 ? breaker_states[st] : "none");
    }
    evbuffer_add_printf(out, "]");
    if (v->conf->store == TG_STORE_REDIS) {
        char rerr[256], esc[512];
        size_t k = 0;
        tg_redis_last_error(rerr, sizeof(rerr));
        for (const char *c = rerr; *c != '\0' && k + 3 < sizeof(esc); c++) {
            if (*c == '"' || *c == '\\') {
                esc[k++] = '\\';
            }
            esc[k++] = (unsigned char)*c < 0x20 ? ' ' : *c;
        }
        esc[k] = '\0';
        evbuffer_add_printf(out, ",\"error\":\"%s\"", esc);
    }
    evbuffer_add_printf(out, "},");
}

/* "upstream":[{"server":...,"health":...,"breaker":...,"adaptive":{...}},...] */
static void
status_upstream(const tg_admin_view *v, struct evbuffer *out)
{
    size_t s;

    evbuffer_add_printf(out, "\"upstream\":[");
    for (s = 0; s < v->conf->upstream.nservers; s++) {
        evbuffer_add_printf(out, "%s{\"server\":\"%s\",\"health\":\"%s\","
                            "\"breaker\":\"%s\"", s ? "," : "",
                            v->conf->upstream.servers[s].text,
                            tg_health_up(v->health, s) ? "up" : "down",
                            breaker_states[upstream_state(v, s)]);
        if (v->conf->adaptive.enabled) {
            evbuffer_add_printf(out, ",\"adaptive\":{\"limit\":%.0f,\"inflight\":%.0f}",
                tg_metrics_value(v->shards, v->nworkers, TG_M_ADAPTIVE_LIMIT, s),
                tg_metrics_value(v->shards, v->nworkers, TG_M_ADAPTIVE_INFLIGHT, s));
        }
        evbuffer_add_printf(out, "}");
    }
    evbuffer_add_printf(out, "],");
}

/* "adaptive":{"queued":N,"shed":{"basic":N,...,"none":N}} (the tier
 * labels of the metrics: the tiers at start); only with adaptive on. */
static void
status_adaptive(const tg_admin_view *v, struct evbuffer *out)
{
    size_t t;

    if (!v->conf->adaptive.enabled) {
        return;
    }
    evbuffer_add_printf(out, "\"adaptive\":{\"queued\":%.0f,\"shed\":{",
                        tg_metrics_value(v->shards, v->nworkers, TG_M_ADAPTIVE_QUEUED, 0));
    for (t = 0; t <= v->conf->ntiers; t++) {
        evbuffer_add_printf(out, "%s\"%s\":%.0f", t ? "," : "",
                            t < v->conf->ntiers ? v->conf->tiers[t].name : "none",
                            tg_metrics_value(v->shards, v->nworkers, TG_M_SHED, t));
    }
    evbuffer_add_printf(out, "}},");
}

/* "alerts":{"open":[...]}, the last part */
static void
status_alerts(const tg_admin_view *v, struct evbuffer *out)
{
    evbuffer_add_printf(out, "\"alerts\":{\"open\":");
    tg_alerts_status_json(v->alerts, out);
    evbuffer_add_printf(out, "}");
}

static int
status_page(void *arg, struct evbuffer *out, const char **ctype)
{
    const tg_admin_view *v = arg;

    *ctype = "application/json";
    evbuffer_add_printf(out, "{");
    status_process(v, out);
    status_store(v, out);
    status_upstream(v, out);
    status_adaptive(v, out);
    tg_throttle_status_json(out);
    status_alerts(v, out);
    evbuffer_add_printf(out, "}\n");
    return 200;
}

/* /status/top: the top consumers of the last anomaly window. */
static int
top_page(void *arg, struct evbuffer *out, const char **ctype)
{
    const tg_admin_view *v = arg;

    *ctype = "application/json";
    tg_anomaly_status_json(v->anomaly, out);
    return 200;
}

/* ---- bounds ------------------------------------------------------------ */

static evhtp_res
pre_accept_cb(evhtp_connection_t *conn, void *arg)
{
    struct tg_admin *adm = arg;

    TG_UNUSED(conn);
    return adm->nconns < ADMIN_MAX_CONNS ? EVHTP_RES_OK : EVHTP_RES_ERROR;
}

static void
conn_free(struct admin_conn_ *ac)
{
    ac->adm->nconns--;
    if (ac->bev != NULL) {
        LIST_REMOVE(ac, link);
    }
    if (ac->timer != NULL) {
        event_free(ac->timer);
    }
    if (ac->bev != NULL) {
        bufferevent_free(ac->bev);
    }
    free(ac);
}

static void
linger_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    TG_UNUSED(fd);
    TG_UNUSED(what);
    conn_free(arg);
}

static void
linger_read_cb(struct bufferevent *bev, void *arg)
{
    TG_UNUSED(arg);
    evbuffer_drain(bufferevent_get_input(bev), evbuffer_get_length(bufferevent_get_input(bev)));
}

static void
linger_write_cb(struct bufferevent *bev, void *arg)
{
    struct admin_conn_ *ac = arg;

    if (!ac->shut && evbuffer_get_length(bufferevent_get_output(bev)) == 0) {
        ac->shut = 1;                /* answered: now wait for the client's EOF */
        shutdown(bufferevent_getfd(bev), SHUT_WR);
    }
}

static void
linger_event_cb(struct bufferevent *bev, short what, void *arg)
{
    struct admin_conn_ *ac = arg;

    TG_UNUSED(what);
    /* EOF, error or timeout: freed from the timer, not from inside the
     * callback of the bufferevent being freed */
    bufferevent_disable(bev, EV_READ | EV_WRITE);
    event_active(ac->timer, EV_TIMEOUT, 1);
}

/* Take the connection from libevhtp, answer status and close.  Returns
 * what the hook returns: an error, so that libevhtp stops parsing and
 * lets go of its connection (not of the socket, ours now). */
static evhtp_res
refuse(struct admin_conn_ *ac, evhtp_request_t *req, int status, const char *text)
{
    struct timeval tv = tg_ms_tv(ADMIN_LINGER_MS);
    struct bufferevent *bev = evhtp_connection_take_ownership(evhtp_request_get_connection(req));

    ac->bev = bev;
    LIST_INSERT_HEAD(&ac->adm->refused, ac, link);
    evbuffer_add_printf(bufferevent_get_output(bev),
                        "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                        status, status == 413 ? "Payload Too Large"
                                              : "Request Header Fields Too Large",
                        strlen(text), text);
    ac->timer = tg_evtimer_new(bufferevent_get_base(bev), linger_timer_cb, ac);
    evtimer_add(ac->timer, &tv);
    bufferevent_set_timeouts(bev, NULL, NULL);
    bufferevent_setcb(bev, linger_read_cb, linger_write_cb, linger_event_cb, ac);
    bufferevent_enable(bev, EV_READ | EV_WRITE);
    return EVHTP_RES_ERROR;
}

static evhtp_res
header_cb(evhtp_request_t *req, evhtp_header_t *hdr, void *arg)
{
    struct admin_conn_ *ac = arg;

    ac->nhdr++;
    ac->hbytes += hdr->klen + hdr->vlen;
    if (ac->nhdr > ADMIN_MAX_HEADERS || ac->hbytes > ADMIN_MAX_HEAD) {
        return refuse(ac, req, 431, "request head too large\n");
    }
    return EVHTP_RES_OK;
}

static evhtp_res
headers_cb(evhtp_request_t *req, evhtp_headers_t *hdrs, void *arg)
{
    struct admin_conn_ *ac = arg;
    const char *cl = evhtp_header_find(hdrs, "Content-Length");

    ac->nhdr = ac->hbytes = 0;       /* the next request on this connection */
    if ((cl != NULL && strcmp(cl, "0") != 0)
        || evhtp_header_find(hdrs, "Transfer-Encoding") != NULL) {
        return refuse(ac, req, 413, "admin endpoints take no request body\n");
    }
    return EVHTP_RES_OK;
}

static evhtp_res
conn_fini_cb(evhtp_connection_t *conn, void *arg)
{
    TG_UNUSED(conn);
    conn_free(arg);
    return EVHTP_RES_OK;
}

static evhtp_res
post_accept_cb(evhtp_connection_t *conn, void *arg)
{
    struct admin_conn_ *ac = tg_xcalloc(1, sizeof(*ac));

    ac->adm = arg;
    ac->adm->nconns++;
    evhtp_connection_set_hook(conn, evhtp_hook_on_header, (evhtp_hook)header_cb, ac);
    evhtp_connection_set_hook(conn, evhtp_hook_on_headers, (evhtp_hook)headers_cb, ac);
    evhtp_connection_set_hook(conn, evhtp_hook_on_connection_fini, (evhtp_hook)conn_fini_cb, ac);
    return EVHTP_RES_OK;
}

static void
accept_resume_cb(evutil_socket_t fd, short what, void *arg)
{
    TG_UNUSED(fd);
    TG_UNUSED(what);
    evconnlistener_enable(arg);
}

/* Out of descriptors: pause accepting instead of waking at once, forever. */
static void
accept_error_cb(struct evconnlistener *l, void *arg)
{
    struct timeval tv = { 0, ADMIN_PAUSE_MS * 1000 };
    int err = EVUTIL_SOCKET_ERROR();

    TG_UNUSED(arg);
    if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
        evconnlistener_disable(l);
        event_base_once(evconnlistener_get_base(l), -1, EV_TIMEOUT, accept_resume_cb, l, &tv);
    } else {
        tg_error("admin: accept: %s", evutil_socket_error_to_string(err));
    }
}
