/*
 * health.c - active health checks of the upstream servers (see health.h).
 *
 * One round per interval: a one-shot timer that re-arms itself, so a round
 * starts interval_ms after the previous one started.  Each check is a
 * bufferevent on a fresh non-blocking socket plus a one-shot deadline
 * timer; whichever of "head parsed", "error/EOF" and "deadline" comes
 * first ends the check and frees the bufferevent (libevent allows that
 * from the bufferevent's own callbacks: it defers the finalisation).
 *
 * Only the main thread touches the per-server state; the workers see the
 * outcome through h->up, an array of atomic ints.
 */
#include "tollgate/health.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>

#include "tollgate/common_ev.h"
#include "tollgate/http.h"

#define TG_HEALTH_REASON 128       /* last failure, for the transition log */

typedef struct tg_hserver {
    struct tg_health   *h;
    size_t              idx;        /* index into upstream.servers */
    tg_addr             addr;       /* copy: h keeps no conf reference */
    char               *req;        /* the request bytes (Host differs) */
    size_t              req_len;
    struct bufferevent *bev;        /* check in flight, or NULL */
    struct event       *deadline;   /* one-shot: timeout_ms per check */
    unsigned            ok_run;     /* consecutive successes */
    unsigned            fail_run;   /* consecutive failures */
    int                 up;         /* main thread's copy of h->up[idx] */
    char                reason[TG_HEALTH_REASON];   /* last failure */
} tg_hserver;

struct tg_health {
    struct event_base *base;
    struct event      *tick;        /* one-shot, re-armed every round */
    struct timeval     interval_tv;
    struct timeval     timeout_tv;
    unsigned           timeout_ms;
    unsigned           healthy;     /* successes to mark up */
    unsigned           unhealthy;   /* failures to mark down */
    tg_hserver        *servers;
    size_t             nservers;
    int               *up;          /* atomic: 1 up, 0 down; read by workers */
    tg_http_limits     lim;         /* for the response head */
    tg_http_resp       resp;        /* parse scratch (main thread only) */
};

static void tick_cb(evutil_socket_t fd, short what, void *arg);
static void deadline_cb(evutil_socket_t fd, short what, void *arg);
static void check_read_cb(struct bufferevent *bev, void *arg);
static void check_event_cb(struct bufferevent *bev, short what, void *arg);
static void check_start(tg_hserver *s);
static void check_done(tg_hserver *s, int ok);
static void set_up(tg_hserver *s, int up);

/* ---- public ----------------------------------------------------------- */

struct tg_health *
tg_health_create(struct event_base *main_base, const tg_conf *conf)
{
    const char *path = conf->upstream.health_check.path;
    struct timeval now = { 0, 0 };
    struct tg_health *h;
    tg_hserver *s;
    size_t i;
    int n;

    if (!conf->upstream.health_check.enabled) {
        return NULL;
    }
    h = tg_xcalloc(1, sizeof(*h));
    h->base = main_base;
    h->timeout_ms = conf->upstream.health_check.timeout_ms;
    h->healthy = conf->upstream.health_check.healthy;
    h->unhealthy = conf->upstream.health_check.unhealthy;
    h->interval_tv = tg_ms_tv(conf->upstream.health_check.interval_ms);
    h->timeout_tv = tg_ms_tv(h->timeout_ms);
    h->lim.max_request_line = 1024;
    h->lim.max_header_bytes = 16384;
    h->lim.max_headers = 100;
    h->nservers = conf->upstream.nservers;
    h->servers = tg_xcalloc(h->nservers, sizeof(*h->servers));
    h->up = tg_xcalloc(h->nservers, sizeof(*h->up));
    for (i = 0; i < h->nservers; i++) {
        s = &h->servers[i];
        s->h = h;
        s->idx = i;
        s->addr = conf->upstream.servers[i];
        s->up = 1;
        __atomic_store_n(&h->up[i], 1, __ATOMIC_RELEASE);
        n = snprintf(NULL, 0, "GET %s HTTP/1.1\r\nHost: %s\r\n"
                     "User-Agent: tollgate-health/" TG_VERSION "\r\n"
                     "Connection: close\r\n\r\n", path, s->addr.text);
        if (n < 0) {
            goto fail;
        }
        s->req = tg_xmalloc((size_t)n + 1);
        snprintf(s->req, (size_t)n + 1, "GET %s HTTP/1.1\r\nHost: %s\r\n"
                 "User-Agent: tollgate-health/" TG_VERSION "\r\n"
                 "Connection: close\r\n\r\n", path, s->addr.text);
        s->req_len = (size_t)n;
        s->deadline = tg_evtimer_new(main_base, deadline_cb, s);
    }
    h->tick = tg_evtimer_new(main_base, tick_cb, h);
    evtimer_add(h->tick, &now);     /* the first round as soon as possible */
    return h;

fail:
    tg_error("health: cannot format the check request");
    abort();
}

void
tg_health_destroy(struct tg_health *h)
{
    size_t i;

    if (h == NULL) {
        return;
    }
    for (i = 0; i < h->nservers; i++) {
        if (h->servers[i].bev != NULL) {
            bufferevent_free(h->servers[i].bev);
        }
        if (h->servers[i].deadline != NULL) {
            event_free(h->servers[i].deadline);
        }
        free(h->servers[i].req);
    }
    if (h->tick != NULL) {
        event_free(h->tick);
    }
    free(h->servers);
    free(h->up);
    free(h);
}

int
tg_health_up(const struct tg_health *h, size_t server)
{
    if (h == NULL || server >= h->nservers) {
        return 1;
    }
    return __atomic_load_n(&h->up[server], __ATOMIC_ACQUIRE);
}

size_t
tg_health_server_count(const struct tg_health *h)
{
    return h == NULL ? 0 : h->nservers;
}

void
tg_health_force(struct tg_health *h, size_t server, int up)
{
    tg_hserver *s;

    if (h == NULL || server >= h->nservers) {
        return;
    }
    s = &h->servers[server];
    s->ok_run = 0;
    s->fail_run = 0;
    s->up = up ? 1 : 0;
    __atomic_store_n(&h->up[server], s->up, __ATOMIC_RELEASE);
}

/* ---- rounds and checks ------------------------------------------------ */

static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_health *h = arg;
    size_t i;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    evtimer_add(h->tick, &h->interval_tv);
    for (i = 0; i < h->nservers; i++) {
        if (h->servers[i].bev == NULL) {    /* else: still running, skip */
            check_start(&h->servers[i]);
        }
    }
}

static void
check_start(tg_hserver *s)
{
    struct tg_health *h = s->h;
    evutil_socket_t fd;
    int one = 1;

    fd = socket(s->addr.sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(s->reason, sizeof(s->reason), "socket: %s", strerror(errno));
        check_done(s, 0);
        return;
    }
    if (s->addr.sa.ss_family != AF_UNIX) {
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    s->bev = tg_bufferevent_socket_new(h->base, fd, BEV_OPT_CLOSE_ON_FREE);
    bufferevent_setcb(s->bev, check_read_cb, NULL, check_event_cb, s);
    evtimer_add(s->deadline, &h->timeout_tv);
    if (bufferevent_socket_connect(s->bev, (struct sockaddr *)&s->addr.sa,
                                   (int)s->addr.salen) != 0) {
        snprintf(s->reason, sizeof(s->reason), "connect: %s",
                 strerror(EVUTIL_SOCKET_ERROR()));
        check_done(s, 0);
        return;
    }
    /* Sent once the connect completes. */
    evbuffer_add(bufferevent_get_output(s->bev), s->req, s->req_len);
    bufferevent_enable(s->bev, EV_READ | EV_WRITE);
}

static void
check_read_cb(struct bufferevent *bev, void *arg)
{
    tg_hserver *s = arg;
    struct tg_health *h = s->h;
    struct evbuffer *in = bufferevent_get_input(bev);
    const char *buf;
    size_t len;
    tg_rc rc;

    for (;;) {
        len = evbuffer_get_length(in);
        if (len > h->lim.max_header_bytes) {
            len = h->lim.max_header_bytes;
        }
        buf = (const char *)evbuffer_pullup(in, (ev_ssize_t)len);
        rc = tg_http_parse_response(buf, len, &h->lim, 0, &h->resp);
        if (rc == TG_AGAIN) {
            if (len < h->lim.max_header_bytes) {
                return;                      /* read more */
            }
            snprintf(s->reason, sizeof(s->reason), "response head too large");
            check_done(s, 0);
            return;
        }
        if (rc != TG_OK) {
            snprintf(s->reason, sizeof(s->reason), "invalid response: %s",
                     h->resp.error ? h->resp.error : "?");
            check_done(s, 0);
            return;
        }
        /* Interim 1xx (103 Early Hints...): the final head follows. */
        if (h->resp.status >= 100 && h->resp.status < 200 && h->resp.status != 101) {
            evbuffer_drain(in, h->resp.head_len);
            continue;
        }
        break;
    }
    if (h->resp.status >= 200 && h->resp.status < 300) {
        check_done(s, 1);
        return;
    }
    snprintf(s->reason, sizeof(s->reason), "status %d", h->resp.status);
    check_done(s, 0);
}

static void
check_event_cb(struct bufferevent *bev, short what, void *arg)
{
    tg_hserver *s = arg;
    int err = EVUTIL_SOCKET_ERROR();

    TG_UNUSED(bev);
    if (what & BEV_EVENT_CONNECTED) {
        return;
    }
    if (what & BEV_EVENT_EOF) {
        snprintf(s->reason, sizeof(s->reason),
                 "connection closed before a complete response head");
    } else {
        snprintf(s->reason, sizeof(s->reason), "%s",
                 err != 0 ? strerror(err) : "connection error");
    }
    check_done(s, 0);
}

static void
deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    tg_hserver *s = arg;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    snprintf(s->reason, sizeof(s->reason), "no response head within %u ms",
             s->h->timeout_ms);
    check_done(s, 0);
}

/* End the check in flight (if any) and count its outcome. */
static void
check_done(tg_hserver *s, int ok)
{
    struct tg_health *h = s->h;

    if (s->bev != NULL) {
        bufferevent_free(s->bev);
        s->bev = NULL;
    }
    evtimer_del(s->deadline);
    if (ok) {
        s->fail_run = 0;
        s->ok_run++;
        if (!s->up && s->ok_run >= h->healthy) {
            tg_info("upstream %s is up: %u health check(s) passed",
                    s->addr.text, s->ok_run);
            set_up(s, 1);
        }
        return;
    }
    s->ok_run = 0;
    s->fail_run++;
    tg_debug("upstream %s: health check failed (%u in a row): %s",
             s->addr.text, s->fail_run, s->reason);
    if (s->up && s->fail_run >= h->unhealthy) {
        tg_warn("upstream %s is down: %u health check(s) failed, last: %s",
                s->addr.text, s->fail_run, s->reason);
        set_up(s, 0);
    }
}

static void
set_up(tg_hserver *s, int up)
{
    s->up = up;
    __atomic_store_n(&s->h->up[s->idx], up, __ATOMIC_RELEASE);
}
