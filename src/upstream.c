/*
 * upstream.c - per-worker keep-alive pools and round-robin selection.
 *
 * Idle connections are watched: any byte or EOF from an idle upstream
 * means the server closed (or broke) it, so it is dropped at once rather
 * than handed to the next request.  An idle connection also expires after
 * upstream.keepalive_timeout_ms.
 *
 * Every connection is read through one persistent event of its own
 * (uc->rev), from the first lending that reads it to its free: while lent
 * it calls the borrower's reader (tg_uconn_read_start), while idle it
 * drops the connection.  Lending and giving back change no event (no
 * event_add/event_del, no min-heap operation per request).  The idle
 * deadlines are kept in the idle lists, not in libevent: a list is in
 * release order from its tail, so one pool timer (itimer), armed when it
 * is not, expires the tails at their exact deadlines.
 *
 * Each server of a pool has its own breaker (this worker's view of that
 * server) and shares the health checker's up/down flag with every worker.
 * The breaker has no notion of which call an outcome belongs to, so each
 * server keeps a generation, bumped on every breaker state change; a
 * lending remembers the generation it was made in, and its outcome (or
 * abandon) reaches the breaker only if the generation is still the same.
 * A result from before the breaker opened therefore cannot be taken for
 * the half-open probe's, and releasing such a lending cannot free the
 * probe's slot.
 *
 * Adaptive concurrency (adaptive: in the config).  Each server also has
 * an in-flight count and a limit learned from the time to the response
 * head of its exchanges (adaptive.h), each compared with others of its
 * class (tg_upstream_set_class: method, path, status class); acquire
 * prefers servers under their limit.  A request that finds every server at its limit waits in
 * the pool's queue (tg_upstream_admit), by tier; a release wakes the
 * queue through the pool's own `wake` event, which also delivers the
 * sheds (evicted, timed out), so no admission callback ever runs inside
 * a call of the proxy.  A waiter is freed by the pool just before its
 * callback runs, or by tg_upstream_admit_cancel.
 */
#include "tollgate/upstream.h"

#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>

#include "tollgate/adaptive.h"
#include "tollgate/common_ev.h"
#include "tollgate/health.h"
#include "tollgate/metrics.h"
#include "tollgate/throttle.h"

struct tg_uconn;
TAILQ_HEAD(tg_uconn_list, tg_uconn);
struct tg_upstream_waiter;
TAILQ_HEAD(tg_waiter_list, tg_upstream_waiter);

typedef struct tg_userver {
    struct tg_upstream_pool *pool;
    const tg_addr        *addr;
    struct tg_uconn_list  idle;
    unsigned              nidle;
    tg_breaker            breaker;     /* this worker's breaker for the server */
    unsigned              gen;         /* bumped on every breaker change */
    unsigned              inflight;    /* lent now */
    tg_adapt_limit        alim;        /* adaptive: the learned limit */
    unsigned              shown;       /* limit last added to the shard gauge */
} tg_userver;

struct tg_upstream_pool {
    struct event_base *base;
    tg_userver        *servers;
    size_t             nservers;
    size_t             next;           /* round-robin cursor */
    unsigned           keepalive;      /* max idle per server */
    uint64_t           idle_ms;        /* keepalive_timeout_ms */
    struct event      *itimer;         /* the oldest idle deadline */
    int                itimer_on;      /* itimer pending */
    tg_conf           *conf;           /* reference: addresses live there */
    uint64_t         (*now_ms)(void);  /* breaker clock: tg_now_ms or a test's */
    int                adaptive;       /* adaptive: configured */
    tg_adapt_queue     queue;          /* requests waiting for a slot */
    unsigned           queue_ms;       /* their wait at most */
    struct tg_waiter_list shed;        /* shed, callback not run yet */
    struct event      *wake;           /* serve the queue, deliver sheds */
    struct event      *qtimer;         /* the earliest queue deadline */
    struct tg_metrics_shard *shard;    /* adaptive gauges, or NULL */
};

struct tg_upstream_waiter {
    tg_adapt_entry     e;              /* first: the queue's entry */
    TAILQ_ENTRY(tg_upstream_waiter) link;   /* in pool->shed */
    struct tg_upstream_pool *pool;
    tg_upstream_admit_cb cb;
    void              *arg;
    enum tg_upstream_admit result;     /* in pool->shed: why */
    int                shed;           /* in pool->shed */
};

struct tg_uconn {
    TAILQ_ENTRY(tg_uconn) link;        /* in server->idle while idle */
    struct tg_upstream_pool *pool;
    tg_userver         *server;
    struct bufferevent *bev;
    struct event       *rev;           /* persistent read event (see the top) */
    int                 rev_on;        /* rev added */
    void              (*reader)(evutil_socket_t fd, short what, void *arg);
    void               *reader_arg;    /* the borrower's, while lent */
    uint64_t            idle_until;    /* idle: expires then (pool->now_ms) */
    int                 idle;          /* in the idle list */
    int                 reported;      /* outcome given for this lending */
    unsigned            gen;           /* server->gen when lent */
    uint64_t            lent_us;       /* when lent: the adaptive and throttle RTT */
    uint32_t            cls;           /* the request's class (adaptive), 0: none */
};

/* Written once by main before the workers start; atomic all the same. */
static const struct tg_health *upstream_health;

static int server_usable(tg_userver *srv, const struct tg_health *health,
                         uint64_t now);
static uint64_t retry_after(struct tg_upstream_pool *pool,
                            const struct tg_health *health, uint64_t now);
static struct tg_uconn *lend(struct tg_upstream_pool *pool, tg_userver *srv,
                             int *reused, uint64_t now);
static void breaker_hook(void *arg, enum tg_breaker_state from,
                         enum tg_breaker_state to);
static void uconn_free(struct tg_uconn *uc);
static void uconn_rd_cb(evutil_socket_t fd, short what, void *arg);
static void itimer_cb(evutil_socket_t fd, short what, void *arg);
static void report(struct tg_uconn *uc, int ok, int error, int status);
static void adaptive_init(struct tg_upstream_pool *pool, const tg_conf *conf);
static void limit_shown(tg_userver *srv);
static void waiter_shed(struct tg_upstream_waiter *w, enum tg_upstream_admit why);
static void queue_arm(struct tg_upstream_pool *pool);
static void wake_cb(evutil_socket_t fd, short what, void *arg);
static void qtimer_cb(evutil_socket_t fd, short what, void *arg);

void
tg_upstream_set_health(const struct tg_health *health)
{
    __atomic_store_n(&upstream_health, health, __ATOMIC_RELEASE);
}

struct tg_upstream_pool *
tg_upstream_pool_create(struct event_base *base, const tg_conf *conf)
{
    struct tg_upstream_pool *pool = tg_xcalloc(1, sizeof(*pool));
    tg_breaker_conf bc;
    size_t i;

    pool->base = base;
    pool->conf = tg_conf_ref((tg_conf *)conf);
    pool->nservers = conf->upstream.nservers;
    pool->servers = tg_xcalloc(pool->nservers, sizeof(tg_userver));
    /* auto: keep every connection that was in use.  One client connection
     * holds at most one upstream connection at a time, so the idle list
     * never outgrows the concurrency actually seen, and http.max_connections
     * bounds it; idle ones still expire after keepalive_timeout_ms. */
    pool->keepalive = conf->upstream.keepalive != TG_UPSTREAM_KEEPALIVE_AUTO
                      ? conf->upstream.keepalive
                      : conf->http.max_connections != 0
                      ? conf->http.max_connections : UINT_MAX;
    pool->idle_ms = conf->upstream.keepalive_timeout_ms;
    pool->itimer = tg_evtimer_new(base, itimer_cb, pool);
    pool->now_ms = tg_now_ms;
    memset(&bc, 0, sizeof(bc));
    bc.failures = conf->upstream.breaker.failures;
    bc.window_ms = conf->upstream.breaker.window_ms;
    bc.min_requests = conf->upstream.breaker.min_requests;
    bc.error_pct = conf->upstream.breaker.error_pct;
    bc.open_ms = conf->upstream.breaker.open_ms;
    bc.max_open_ms = conf->upstream.breaker.max_open_ms;
    bc.probes = 1;
    for (i = 0; i < pool->nservers; i++) {
        pool->servers[i].pool = pool;
        pool->servers[i].addr = &conf->upstream.servers[i];
        TAILQ_INIT(&pool->servers[i].idle);
        tg_breaker_init(&pool->servers[i].breaker, &bc);
        tg_breaker_set_hook(&pool->servers[i].breaker, breaker_hook,
                            &pool->servers[i]);
    }
    adaptive_init(pool, conf);
    return pool;
}

void
tg_upstream_pool_close_idle(struct tg_upstream_pool *pool)
{
    size_t i;
    struct tg_uconn *uc;

    for (i = 0; i < pool->nservers; i++) {
        while ((uc = TAILQ_FIRST(&pool->servers[i].idle)) != NULL) {
            uconn_free(uc);
        }
    }
}

void
tg_upstream_pool_destroy(struct tg_upstream_pool *pool)
{
    if (pool == NULL) {
        return;
    }
    tg_upstream_pool_close_idle(pool);
    if (pool->adaptive) {
        struct tg_upstream_waiter *w;
        tg_adapt_entry *e;

        while ((e = tg_adapt_queue_pop(&pool->queue)) != NULL) {
            free(e);
        }
        while ((w = TAILQ_FIRST(&pool->shed)) != NULL) {
            TAILQ_REMOVE(&pool->shed, w, link);
            free(w);
        }
        tg_adapt_queue_deinit(&pool->queue);
        event_free(pool->wake);
        event_free(pool->qtimer);
    }
    event_free(pool->itimer);
    free(pool->servers);
    tg_conf_unref(pool->conf);
    free(pool);
}

struct tg_uconn *
tg_upstream_acquire(struct tg_upstream_pool *pool, int *reused,
                    const struct tg_uconn *avoid, uint64_t *retry_ms)
{
    const struct tg_health *health = __atomic_load_n(&upstream_health,
                                                     __ATOMIC_ACQUIRE);
    uint64_t now = pool->now_ms();
    tg_userver *srv = NULL, *skip = NULL, *s;
    size_t k;

    if (retry_ms != NULL) {
        *retry_ms = 0;
    }
    if (avoid != NULL && avoid->pool == pool && pool->nservers > 1) {
        skip = avoid->server;
    }
    /* Adaptive: a server under its limit first (a retry replaces its
     * own lending: any); at the limit everywhere, one past it. */
    for (k = 0; pool->adaptive && avoid == NULL && k < pool->nservers; k++) {
        s = &pool->servers[(pool->next + k) % pool->nservers];
        if (s->inflight < tg_adapt_limit_get(&s->alim)
            && server_usable(s, health, now)) {
            srv = s;
            break;
        }
    }
    for (k = 0; srv == NULL && k < pool->nservers; k++) {
        s = &pool->servers[(pool->next + k) % pool->nservers];
        if (s != skip && server_usable(s, health, now)) {
            srv = s;
            break;
        }
    }
    /* The avoided server is still better than no server. */
    if (srv == NULL && skip != NULL && server_usable(skip, health, now)) {
        srv = skip;
    }
    if (srv == NULL) {
        if (retry_ms != NULL) {
            *retry_ms = retry_after(pool, health, now);
        }
        return NULL;
    }
    pool->next = (size_t)(srv - pool->servers) + 1;
    return lend(pool, srv, reused, now);
}

struct bufferevent *
tg_uconn_bev(struct tg_uconn *uc)
{
    return uc->bev;
}

size_t
tg_uconn_server_index(const struct tg_uconn *uc)
{
    return (size_t)(uc->server - uc->pool->servers);
}

void
tg_upstream_report(struct tg_uconn *uc, int ok)
{
    report(uc, ok, !ok, 0);
}

void
tg_upstream_report_status(struct tg_uconn *uc, int status)
{
    report(uc, status < 502 || status > 504, status >= 500, status);
}

/* The method and the path without its query or ids
 * (tg_adapt_class_key): the class is that and the status class (an early
 * 4xx is its own), so that the adaptive limit compares an exchange with
 * others of its kind. */
void
tg_upstream_set_class(struct tg_uconn *uc, const char *method, size_t method_len,
                      const char *path, size_t path_len)
{
    if (!uc->pool->adaptive) {
        return;                          /* nothing compares it */
    }
    uc->cls = tg_adapt_class_key(method, method_len, path, path_len);
}

/* The outcome of uc's exchange: ok for the breaker and the adaptive limit,
 * error (a failure or any 5xx) for the throttle; status 0 for none. */
static void
report(struct tg_uconn *uc, int ok, int error, int status)
{
    tg_userver *srv = uc->server;
    uint64_t now;

    if (uc->reported) {
        return;
    }
    uc->reported = 1;
    now = tg_now_us();
    tg_throttle_record(now - uc->lent_us, error);
    if (uc->pool->adaptive) {
        uint32_t key = uc->cls + (uint32_t)(status / 100) * 0x9e3779b9u;

        key = uc->cls == 0 ? 0 : key == 0 ? 1 : key;  /* 0 is the catch-all */

        tg_adapt_limit_sample_class(&srv->alim, key, now, now - uc->lent_us,
                                    srv->inflight, ok);
        limit_shown(srv);
    }
    if (uc->gen != srv->gen) {
        return;                        /* late: lent before the last change */
    }
    if (ok) {
        tg_breaker_success(&srv->breaker, uc->pool->now_ms());
    } else {
        tg_breaker_failure(&srv->breaker, uc->pool->now_ms());
    }
}

enum tg_breaker_state
tg_upstream_server_state(struct tg_upstream_pool *pool, size_t server)
{
    if (server >= pool->nservers) {
        return TG_BREAKER_CLOSED;
    }
    return tg_breaker_state(&pool->servers[server].breaker, pool->now_ms());
}

void
tg_upstream_pool_set_clock(struct tg_upstream_pool *pool, uint64_t (*now_ms)(void))
{
    pool->now_ms = now_ms != NULL ? now_ms : tg_now_ms;
}

const char *
tg_uconn_server(const struct tg_uconn *uc)
{
    return uc->server->addr->text;
}

void
tg_upstream_release(struct tg_uconn *uc, int reusable)
{
    struct tg_upstream_pool *pool = uc->pool;
    tg_userver *srv = uc->server;

    /* Neither outcome: a half-open probe must give its slot back. */
    if (!uc->reported && uc->gen == srv->gen) {
        tg_breaker_abandon(&srv->breaker, pool->now_ms());
    }
    TG_ASSERT(!uc->idle && srv->inflight > 0);
    uc->reported = 1;
    srv->inflight--;
    if (pool->adaptive) {
        tg_metric_gauge_add(pool->shard, TG_M_ADAPTIVE_INFLIGHT,
                            (size_t)(srv - pool->servers), -1);
        if (tg_adapt_queue_len(&pool->queue) != 0) {
            event_active(pool->wake, EV_TIMEOUT, 1);
        }
    }
    if (!reusable || srv->nidle >= pool->keepalive
        || evbuffer_get_length(bufferevent_get_input(uc->bev)) != 0
        || evbuffer_get_length(bufferevent_get_output(uc->bev)) != 0) {
        uconn_free(uc);
        return;
    }
    bufferevent_setcb(uc->bev, NULL, NULL, NULL, NULL);
    if (bufferevent_get_enabled(uc->bev) & EV_WRITE) {
        bufferevent_disable(uc->bev, EV_WRITE);
    }
    uc->reader = NULL;
    uc->reader_arg = NULL;
    if (!uc->rev_on) {
        /* never read, or paused by its borrower: watch it again */
        event_add(uc->rev, NULL);
        uc->rev_on = 1;
    }
    uc->idle = 1;
    uc->idle_until = pool->now_ms() + pool->idle_ms;
    TAILQ_INSERT_HEAD(&srv->idle, uc, link);   /* LIFO: warmest first */
    srv->nidle++;
    if (!pool->itimer_on) {
        struct timeval tv = tg_ms_tv(pool->idle_ms);

        evtimer_add(pool->itimer, &tv);
        pool->itimer_on = 1;
    }
}

void
tg_uconn_read_start(struct tg_uconn *uc,
                    void (*cb)(evutil_socket_t fd, short what, void *arg), void *arg)
{
    uc->reader = cb;
    uc->reader_arg = arg;
    if (!uc->rev_on) {
        event_add(uc->rev, NULL);
        uc->rev_on = 1;
    }
}

void
tg_uconn_read_stop(struct tg_uconn *uc)
{
    if (uc->rev_on) {
        event_del(uc->rev);
        uc->rev_on = 0;
    }
}

/* ---- selection ------------------------------------------------------ */

/* May srv take a call now?  Health first: a down server must not take the
 * breaker's half-open probe slot.  A 1 from the breaker is a lending the
 * caller must make (the probe slot is taken). */
static int
server_usable(tg_userver *srv, const struct tg_health *health, uint64_t now)
{
    return tg_health_up(health, (size_t)(srv - srv->pool->servers))
           && tg_breaker_allow(&srv->breaker, now);
}

/* Every server refused: the soonest one may be usable again.  An open
 * breaker knows when; a down server or a probe in flight does not, so
 * those count as at least a second. */
static uint64_t
retry_after(struct tg_upstream_pool *pool, const struct tg_health *health,
            uint64_t now)
{
    uint64_t best = 0, r;
    size_t i;

    for (i = 0; i < pool->nservers; i++) {
        r = tg_breaker_retry_ms(&pool->servers[i].breaker, now);
        if ((r == 0 || !tg_health_up(health, i)) && r < 1000) {
            r = 1000;
        }
        if (best == 0 || r < best) {
            best = r;
        }
    }
    return best;
}

/* A connection to srv, whose breaker has just allowed the call: an idle
 * one if any, else a new one being connected. */
static struct tg_uconn *
lend(struct tg_upstream_pool *pool, tg_userver *srv, int *reused, uint64_t now)
{
    struct tg_uconn *uc = TAILQ_FIRST(&srv->idle);
    evutil_socket_t fd;
    int one = 1;

    if (uc != NULL) {
        TG_ASSERT(uc->idle && srv->nidle > 0);
        TAILQ_REMOVE(&srv->idle, uc, link);
        srv->nidle--;
        uc->idle = 0;
        *reused = 1;
        goto lent;
    }

    fd = socket(srv->addr->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        tg_error("upstream %s: socket: %s", srv->addr->text, strerror(errno));
        goto fail;
    }
    if (srv->addr->sa.ss_family != AF_UNIX) {
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
    uc = tg_xcalloc(1, sizeof(*uc));
    uc->pool = pool;
    uc->server = srv;
    uc->bev = tg_bufferevent_socket_new(pool->base, fd, BEV_OPT_CLOSE_ON_FREE);
    uc->rev = tg_event_new(pool->base, fd, EV_READ | EV_PERSIST, uconn_rd_cb, uc);
    /* A refused or failed connect is reported through the event callback
     * the borrower installs; only immediate errors show here. */
    if (bufferevent_socket_connect(uc->bev, (struct sockaddr *)&srv->addr->sa,
                                   (int)srv->addr->salen) != 0) {
        uconn_free(uc);
        goto fail;
    }
    *reused = 0;

lent:
    uc->reported = 0;
    uc->gen = srv->gen;              /* after allow(): it may have bumped it */
    uc->lent_us = tg_now_us();
    uc->cls = 0;
    srv->inflight++;
    if (pool->adaptive) {
        tg_metric_gauge_add(pool->shard, TG_M_ADAPTIVE_INFLIGHT,
                            (size_t)(srv - pool->servers), 1);
    }
    return uc;

fail:
    /* A local failure says nothing about the server. */
    tg_breaker_abandon(&srv->breaker, now);
    return NULL;
}

/* Every breaker change: a new generation, and a line in the log (each
 * worker has its own breaker, so each worker logs its own changes). */
static void
breaker_hook(void *arg, enum tg_breaker_state from, enum tg_breaker_state to)
{
    tg_userver *srv = arg;

    srv->gen++;
    switch (to) {
    case TG_BREAKER_OPEN:
        tg_warn("upstream %s: breaker %s -> open, out of rotation for %llu ms",
                srv->addr->text, tg_breaker_state_name(from),
                (unsigned long long)tg_breaker_retry_ms(&srv->breaker,
                                                        srv->pool->now_ms()));
        break;
    case TG_BREAKER_HALF_OPEN:
        tg_info("upstream %s: breaker open -> half-open, probing",
                srv->addr->text);
        break;
    case TG_BREAKER_CLOSED:
        tg_info("upstream %s: breaker %s -> closed, back in rotation",
                srv->addr->text, tg_breaker_state_name(from));
        break;
    case TG_BREAKER_NONE:
        break;
    }
}

/* ---- idle watching -------------------------------------------------- */

static void
uconn_free(struct tg_uconn *uc)
{
    if (uc->idle) {
        TAILQ_REMOVE(&uc->server->idle, uc, link);
        uc->server->nidle--;
    }
    event_free(uc->rev);               /* before the fd closes */
    bufferevent_free(uc->bev);
    free(uc);
}

static void
uconn_rd_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_uconn *uc = arg;

    if (uc->reader != NULL) {
        uc->reader(fd, what, uc->reader_arg);
        return;
    }
    if (uc->idle) {
        /* An idle upstream has nothing to say: bytes or EOF here mean a
         * closed or broken server, or a stray response; either way the
         * connection is unusable. */
        uconn_free(uc);
        return;
    }
    tg_uconn_read_stop(uc);            /* lent, nobody reading: level-triggered */
}

/* The oldest idle connections (the lists' tails) expire at their
 * deadlines; armed again for the next oldest, if any. */
static void
itimer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_upstream_pool *pool = arg;
    uint64_t now = pool->now_ms(), next = 0;
    struct tg_uconn *uc;
    size_t i;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    pool->itimer_on = 0;
    for (i = 0; i < pool->nservers; i++) {
        while ((uc = TAILQ_LAST(&pool->servers[i].idle, tg_uconn_list)) != NULL
               && uc->idle_until <= now) {
            uconn_free(uc);
        }
        if (uc != NULL && (next == 0 || uc->idle_until < next)) {
            next = uc->idle_until;
        }
    }
    if (next != 0) {
        struct timeval tv = tg_ms_tv(next - now);

        evtimer_add(pool->itimer, &tv);
        pool->itimer_on = 1;
    }
}

/* ---- adaptive concurrency ---------------------------------------------- */

/* The config's numbers are per server for the process: this worker
 * takes its share, rounded up (at least 1). */
static unsigned
share(unsigned v, unsigned workers)
{
    return workers <= 1 ? v : (v + workers - 1) / workers;
}

static void
adaptive_init(struct tg_upstream_pool *pool, const tg_conf *conf)
{
    unsigned w = conf->workers;
    size_t i;

    TAILQ_INIT(&pool->shed);
    if (!conf->adaptive.enabled) {
        return;
    }
    pool->adaptive = 1;
    pool->queue_ms = conf->adaptive.queue_timeout_ms;
    tg_adapt_queue_init(&pool->queue, (unsigned)conf->adaptive.nshed_order + 1,
                        share(conf->adaptive.queue * (unsigned)pool->nservers, w));
    for (i = 0; i < pool->nservers; i++) {
        tg_adapt_limit_init(&pool->servers[i].alim, share(conf->adaptive.initial, w),
                            share(conf->adaptive.min, w), share(conf->adaptive.max, w));
    }
    pool->wake = tg_event_new(pool->base, -1, 0, wake_cb, pool);
    pool->qtimer = tg_evtimer_new(pool->base, qtimer_cb, pool);
}

void
tg_upstream_pool_set_shard(struct tg_upstream_pool *pool, struct tg_metrics_shard *shard)
{
    size_t i;

    pool->shard = shard;
    for (i = 0; pool->adaptive && i < pool->nservers; i++) {
        limit_shown(&pool->servers[i]);
    }
}

/* The shard's limit gauge follows the integer limit (a per-shard delta:
 * the process total is the sum over the workers). */
static void
limit_shown(tg_userver *srv)
{
    unsigned v = tg_adapt_limit_get(&srv->alim);

    if (v != srv->shown && srv->pool->shard != NULL) {
        tg_metric_gauge_add(srv->pool->shard, TG_M_ADAPTIVE_LIMIT,
                            (size_t)(srv - srv->pool->servers),
                            (int64_t)v - (int64_t)srv->shown);
        srv->shown = v;
    }
}

/* A slot now?  ROOM: a server under its limit could take a call (health
 * up, breaker not open; the breaker's own verdict comes at acquire).
 * BUSY: every server that could is at its limit: wait for a release.
 * NONE: no server could (each open or down): there is nothing to wait
 * for, acquire answers at once (503 with the breaker's Retry-After). */
enum room { ROOM_BUSY, ROOM_YES, ROOM_NONE };

static enum room
room(struct tg_upstream_pool *pool)
{
    const struct tg_health *health = __atomic_load_n(&upstream_health,
                                                     __ATOMIC_ACQUIRE);
    uint64_t now = pool->now_ms();
    enum room r = ROOM_NONE;
    tg_userver *s;
    size_t i;

    for (i = 0; i < pool->nservers; i++) {
        s = &pool->servers[i];
        if (!tg_health_up(health, i)
            || tg_breaker_state(&s->breaker, now) == TG_BREAKER_OPEN) {
            continue;
        }
        if (s->inflight < tg_adapt_limit_get(&s->alim)) {
            return ROOM_YES;
        }
        r = ROOM_BUSY;
    }
    return r;
}

/* Priority of a tier: its place in shed_order + 1; 0 for the others. */
static unsigned
priority(const struct tg_upstream_pool *pool, const char *tier)
{
    size_t i;

    if (tier == NULL || tier[0] == '\0') {
        return 0;
    }
    for (i = 0; i < pool->conf->adaptive.nshed_order; i++) {
        if (strcmp(pool->conf->adaptive.shed_order[i], tier) == 0) {
            return (unsigned)i + 1;
        }
    }
    return 0;
}

enum tg_upstream_admit
tg_upstream_admit(struct tg_upstream_pool *pool, const char *tier,
                  struct tg_upstream_waiter **waiter, tg_upstream_admit_cb cb,
                  void *arg)
{
    struct tg_upstream_waiter *w;
    tg_adapt_entry *out;
    enum room r;

    *waiter = NULL;
    if (!pool->adaptive) {
        return TG_ADMIT_GO;
    }
    r = room(pool);
    if (r == ROOM_NONE || (r == ROOM_YES && tg_adapt_queue_len(&pool->queue) == 0)) {
        return TG_ADMIT_GO;
    }
    w = tg_xcalloc(1, sizeof(*w));
    w->pool = pool;
    w->cb = cb;
    w->arg = arg;
    out = tg_adapt_queue_push(&pool->queue, &w->e, priority(pool, tier),
                              pool->now_ms() + pool->queue_ms);
    if (out == &w->e) {
        free(w);
        return TG_ADMIT_FULL;
    }
    if (out != NULL) {
        waiter_shed((struct tg_upstream_waiter *)out, TG_ADMIT_EVICTED);
    }
    tg_metric_gauge_add(pool->shard, TG_M_ADAPTIVE_QUEUED, 0, 1);
    queue_arm(pool);
    if (r == ROOM_YES) {
        /* a slot the queue has not been served from yet (a breaker
         * half-open again with nothing in flight): serve it, in order */
        event_active(pool->wake, EV_TIMEOUT, 1);
    }
    *waiter = w;
    return TG_ADMIT_WAIT;
}

void
tg_upstream_admit_cancel(struct tg_upstream_waiter *w)
{
    struct tg_upstream_pool *pool;

    if (w == NULL) {
        return;
    }
    pool = w->pool;
    if (w->shed) {
        TAILQ_REMOVE(&pool->shed, w, link);
    } else {
        tg_adapt_queue_remove(&pool->queue, &w->e);
        tg_metric_gauge_add(pool->shard, TG_M_ADAPTIVE_QUEUED, 0, -1);
        queue_arm(pool);
    }
    free(w);
}

/* Out of the queue (already removed) with a shed verdict, delivered by
 * the wake event. */
static void
waiter_shed(struct tg_upstream_waiter *w, enum tg_upstream_admit why)
{
    struct tg_upstream_pool *pool = w->pool;

    tg_metric_gauge_add(pool->shard, TG_M_ADAPTIVE_QUEUED, 0, -1);
    w->shed = 1;
    w->result = why;
    TAILQ_INSERT_TAIL(&pool->shed, w, link);
    event_active(pool->wake, EV_TIMEOUT, 1);
}

static void
queue_arm(struct tg_upstream_pool *pool)
{
    uint64_t when = tg_adapt_queue_next_deadline(&pool->queue), now, ms;
    struct timeval tv;

    if (when == 0) {
        event_del(pool->qtimer);
        return;
    }
    now = pool->now_ms();
    ms = when > now ? when - now : 0;
    tv = tg_ms_tv(ms);
    evtimer_add(pool->qtimer, &tv);
}

/* Run one waiter's callback; the waiter is freed first (the callback
 * may admit the same request again, or end its owner). */
static void
deliver(struct tg_upstream_waiter *w, enum tg_upstream_admit result)
{
    tg_upstream_admit_cb cb = w->cb;
    void *arg = w->arg;

    free(w);
    cb(arg, result);
}

/* Sheds first (their answers are due), then as many waiters as there
 * are slots, highest tier first; each callback acquires at once. */
static void
wake_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_upstream_pool *pool = arg;
    struct tg_upstream_waiter *w;
    tg_adapt_entry *e;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    while ((w = TAILQ_FIRST(&pool->shed)) != NULL) {
        TAILQ_REMOVE(&pool->shed, w, link);
        deliver(w, w->result);
    }
    /* NONE: each acquire answers its 503 at once, nothing to wait for */
    while (tg_adapt_queue_len(&pool->queue) != 0 && room(pool) != ROOM_BUSY) {
        e = tg_adapt_queue_pop(&pool->queue);
        tg_metric_gauge_add(pool->shard, TG_M_ADAPTIVE_QUEUED, 0, -1);
        deliver((struct tg_upstream_waiter *)e, TG_ADMIT_GO);
    }
    queue_arm(pool);
}

static void
qtimer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_upstream_pool *pool = arg;
    tg_adapt_entry *e;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    while ((e = tg_adapt_queue_expired(&pool->queue, pool->now_ms())) != NULL) {
        waiter_shed((struct tg_upstream_waiter *)e, TG_ADMIT_TIMEOUT);
    }
    queue_arm(pool);
    if (tg_adapt_queue_len(&pool->queue) != 0 && room(pool) != ROOM_BUSY) {
        event_active(pool->wake, EV_TIMEOUT, 1);
    }
}
