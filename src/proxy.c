/*
 * proxy.c - the request path of one worker (proxy.h): its creation on
 * what the worker owns (tg_proxy_env: limiter, upstream pool, metric
 * shard, log buffer), reloads, drain, and the caches of head memory its
 * connections share.  A
 * connection is client.c's, its upstream exchange exchange.c's.
 */
#include "tollgate/proxy.h"

#include <stdlib.h>
#include <sys/random.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>

#include "proxy_int.h"

static void set_limits(struct tg_proxy *px);
static void cache_drain(void **list, unsigned *n);

/* ---- public -------------------------------------------------------- */

struct tg_proxy *
tg_proxy_create(struct event_base *base, tg_conf *conf, const tg_proxy_env *env,
                void (*on_empty)(void *arg), void *arg)
{
    struct tg_proxy *px = tg_xcalloc(1, sizeof(*px));

    px->base = base;
    px->env = env;
    px->conf = tg_conf_ref(conf);
    px->conf0 = tg_conf_ref(conf);
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
        tg_client_free(c);
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
tg_proxy_reload(struct tg_proxy *px, tg_conf *conf)
{
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
    px->body_tv = tg_ms_tv(conf->http.body_timeout_ms);
    px->send_tv = tg_ms_tv(conf->http.send_timeout_ms);
}

unsigned
tg_proxy_nclients(const struct tg_proxy *px)
{
    return px->nclients;
}

/* 1 when the kernel holds bytes of fd not read yet: a request sent
 * before the drain (a connection just started from the worker's queue has
 * read nothing), not an idle connection. */
static int
bytes_waiting(evutil_socket_t fd)
{
    char b;

    return fd >= 0 && recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
}

void
tg_proxy_drain(struct tg_proxy *px)
{
    struct tg_client *c, *next;

    px->draining = 1;
    tg_upstream_pool_close_idle(px->env->pool);
    for (c = TAILQ_FIRST(&px->clients); c != NULL; c = next) {
        next = TAILQ_NEXT(c, link);
        if (c->conn.state == C_HEAD
            && evbuffer_get_length(bufferevent_get_input(c->conn.bev)) == 0
            && !bytes_waiting(bufferevent_getfd(c->conn.bev))) {
            if (evbuffer_get_length(bufferevent_get_output(c->conn.bev)) != 0) {
                tg_client_close_after_flush(c);    /* answers still queued */
            } else {
                tg_bev_close_notify(c);
                tg_client_kill(c);
            }
        } else {
            c->conn.close_after = 1;
        }
    }
    if (px->nclients == 0 && px->on_empty != NULL) {
        px->on_empty(px->on_empty_arg);
    }
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
