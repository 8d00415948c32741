/*
 * upstream.c - per-worker keep-alive pools and round-robin selection.
 *
 * Idle connections are watched: any byte or EOF from an idle upstream
 * means the server closed (or broke) it, so it is dropped at once rather
 * than handed to the next request.  An idle connection also expires after
 * upstream.keepalive_timeout_ms (bufferevent read timeout).
 */
#include "tollgate/upstream.h"

#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>

struct tg_uconn;
TAILQ_HEAD(tg_uconn_list, tg_uconn);

typedef struct tg_userver {
    const tg_addr        *addr;
    struct tg_uconn_list  idle;
    unsigned              nidle;
} tg_userver;

struct tg_upstream_pool {
    struct event_base *base;
    tg_userver        *servers;
    size_t             nservers;
    size_t             next;           /* round-robin cursor */
    unsigned           keepalive;      /* max idle per server */
    struct timeval     idle_tv;
    tg_conf           *conf;           /* reference: addresses live there */
};

struct tg_uconn {
    TAILQ_ENTRY(tg_uconn) link;        /* in server->idle while idle */
    struct tg_upstream_pool *pool;
    tg_userver         *server;
    struct bufferevent *bev;
    int                 idle;          /* in the idle list */
};

static void uconn_free(struct tg_uconn *uc);
static void idle_read_cb(struct bufferevent *bev, void *arg);
static void idle_event_cb(struct bufferevent *bev, short what, void *arg);

struct tg_upstream_pool *
tg_upstream_pool_create(struct event_base *base, const tg_conf *conf)
{
    struct tg_upstream_pool *pool = tg_xcalloc(1, sizeof(*pool));
    size_t i;

    pool->base = base;
    pool->conf = tg_conf_ref((tg_conf *)conf);
    pool->nservers = conf->upstream.nservers;
    pool->servers = tg_xcalloc(pool->nservers, sizeof(tg_userver));
    pool->keepalive = conf->upstream.keepalive;
    pool->idle_tv.tv_sec = conf->upstream.keepalive_timeout_ms / 1000;
    pool->idle_tv.tv_usec = (conf->upstream.keepalive_timeout_ms % 1000) * 1000;
    for (i = 0; i < pool->nservers; i++) {
        pool->servers[i].addr = &conf->upstream.servers[i];
        TAILQ_INIT(&pool->servers[i].idle);
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
    tg_userver *srv = &pool->servers[pool->next++ % pool->nservers];
    struct tg_uconn *uc = TAILQ_FIRST(&srv->idle);
    evutil_socket_t fd;
    int one = 1;

    TG_UNUSED(avoid);
    if (retry_ms != NULL) {
        *retry_ms = 0;
    }
    if (uc != NULL) {
        TAILQ_REMOVE(&srv->idle, uc, link);
        srv->nidle--;
        uc->idle = 0;
        bufferevent_setcb(uc->bev, NULL, NULL, NULL, NULL);
        bufferevent_set_timeouts(uc->bev, NULL, NULL);
        *reused = 1;
        return uc;
    }

    fd = socket(srv->addr->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        tg_error("upstream %s: socket: %s", srv->addr->text, strerror(errno));
        return NULL;
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
        return NULL;
    }
    /* A refused or failed connect is reported through the event callback
     * the borrower installs; only immediate errors show here. */
    if (bufferevent_socket_connect(uc->bev, (struct sockaddr *)&srv->addr->sa,
                                   (int)srv->addr->salen) != 0) {
        uconn_free(uc);
        return NULL;
    }
    *reused = 0;
    return uc;
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
    TG_UNUSED(uc);
    TG_UNUSED(ok);
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
