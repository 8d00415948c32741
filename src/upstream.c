/*
 * upstream.c - per-worker keep-alive pools and round-robin selection.
 *
 * Idle connections are watched: any byte or EOF from an idle upstream
 * means the server closed (or broke) it, so it is dropped at once rather
 * than handed to the next request.  An idle connection also expires after
 * upstream.keepalive_timeout_ms (bufferevent read timeout).
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

#include "tollgate/health.h"

struct tg_uconn;
TAILQ_HEAD(tg_uconn_list, tg_uconn);

typedef struct tg_userver {
    struct tg_upstream_pool *pool;
    const tg_addr        *addr;
    struct tg_uconn_list  idle;
    unsigned              nidle;
    tg_breaker            breaker;     /* this worker's breaker for the server */
    unsigned              gen;         /* bumped on every breaker change */
} tg_userver;

struct tg_upstream_pool {
    struct event_base *base;
    tg_userver        *servers;
    size_t             nservers;
    size_t             next;           /* round-robin cursor */
    unsigned           keepalive;      /* max idle per server */
    struct timeval     idle_tv;
    tg_conf           *conf;           /* reference: addresses live there */
    uint64_t         (*now_ms)(void);  /* breaker clock: tg_now_ms or a test's */
};

struct tg_uconn {
    TAILQ_ENTRY(tg_uconn) link;        /* in server->idle while idle */
    struct tg_upstream_pool *pool;
    tg_userver         *server;
    struct bufferevent *bev;
    int                 idle;          /* in the idle list */
    int                 reported;      /* outcome given for this lending */
    unsigned            gen;           /* server->gen when lent */
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
static void idle_read_cb(struct bufferevent *bev, void *arg);
static void idle_event_cb(struct bufferevent *bev, short what, void *arg);

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
    pool->idle_tv.tv_sec = conf->upstream.keepalive_timeout_ms / 1000;
    pool->idle_tv.tv_usec = (conf->upstream.keepalive_timeout_ms % 1000) * 1000;
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
    for (k = 0; k < pool->nservers; k++) {
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
    tg_userver *srv = uc->server;

    if (uc->reported) {
        return;
    }
    uc->reported = 1;
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
    uc->reported = 1;
    if (!reusable || srv->nidle >= pool->keepalive
        || evbuffer_get_length(bufferevent_get_input(uc->bev)) != 0
        || evbuffer_get_length(bufferevent_get_output(uc->bev)) != 0) {
        uconn_free(uc);
        return;
    }
    bufferevent_setcb(uc->bev, idle_read_cb, NULL, idle_event_cb, uc);
    bufferevent_set_timeouts(uc->bev, &pool->idle_tv, NULL);
    bufferevent_setwatermark(uc->bev, EV_READ, 0, 0);
    bufferevent_setwatermark(uc->bev, EV_WRITE, 0, 0);
    bufferevent_disable(uc->bev, EV_WRITE);
    bufferevent_enable(uc->bev, EV_READ);
    uc->idle = 1;
    TAILQ_INSERT_HEAD(&srv->idle, uc, link);   /* LIFO: warmest first */
    srv->nidle++;
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
        TAILQ_REMOVE(&srv->idle, uc, link);
        srv->nidle--;
        uc->idle = 0;
        bufferevent_setcb(uc->bev, NULL, NULL, NULL, NULL);
        bufferevent_set_timeouts(uc->bev, NULL, NULL);
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
    uc->bev = bufferevent_socket_new(pool->base, fd, BEV_OPT_CLOSE_ON_FREE);
    if (uc->bev == NULL) {
        close(fd);
        free(uc);
        goto fail;
    }
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
    bufferevent_free(uc->bev);
    free(uc);
}

static void
idle_read_cb(struct bufferevent *bev, void *arg)
{
    /* An idle upstream has nothing to say: bytes here mean a broken
     * server or a stray response; either way the connection is unusable. */
    TG_UNUSED(bev);
    uconn_free(arg);
}

static void
idle_event_cb(struct bufferevent *bev, short what, void *arg)
{
    TG_UNUSED(bev);
    TG_UNUSED(what);
    uconn_free(arg);
}
