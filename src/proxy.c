/*
 * proxy.c - the request path of one worker (proxy.h): its creation with
 * the limiter, the upstream pool and the metric shard it owns, reloads,
 * drain, and the caches of head memory its connections share.  A
 * connection is client.c's, its upstream exchange exchange.c's.
 */
#include "tollgate/proxy.h"

#include <stdlib.h>
#include <sys/random.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>

#include "tollgate/accesslog.h"
#include "tollgate/metrics.h"
#include "proxy_int.h"

static void set_limits(struct tg_proxy *px);
static void cache_drain(void **list, unsigned *n);

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
        tg_client_free(c);
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
tg_proxy_drain(struct tg_proxy *px)
{
    struct tg_client *c, *next;

    px->draining = 1;
    tg_upstream_pool_close_idle(px->pool);
    for (c = TAILQ_FIRST(&px->clients); c != NULL; c = next) {
        next = TAILQ_NEXT(c, link);
        if (c->conn.state == C_HEAD
            && evbuffer_get_length(bufferevent_get_input(c->conn.bev)) == 0) {
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
