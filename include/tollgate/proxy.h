/*
 * proxy.h - the request path of one worker thread: client connections,
 * strict request framing, forwarding to the upstream pool and streaming
 * both ways with backpressure.
 *
 * Pipeline per request (docs/ARCHITECTURE.md, "The request path"): read
 * head -> parse (tg_http) -> normal form of the target (tg_target) ->
 * limit (tg_limiter: identify, route, charge) -> admission (adaptive, when
 * configured) -> forward -> relay response -> account -> next request or
 * close.  Everything runs on the worker's event base; the only shared
 * state it touches is the in-process bucket store (striped locks, see
 * gcra.h) and the per-IP connection table (one atomic release).
 */
#ifndef TOLLGATE_PROXY_H
#define TOLLGATE_PROXY_H

#include <openssl/ssl.h>
#include <event2/event.h>

#include "tollgate/common.h"
#include "tollgate/conf.h"

struct tg_proxy;

/*
 * Create the proxy state of one worker.  on_empty(arg) is called when the
 * last client connection closes while draining.  Takes a reference on conf;
 * keys (may be NULL) must outlive the proxy.  NULL + err on failure.
 */
struct tg_keys;

struct tg_proxy *tg_proxy_create(struct event_base *base, tg_conf *conf,
                                 struct tg_keys *keys,
                                 void (*on_empty)(void *arg), void *arg,
                                 char *err, size_t errlen);
void tg_proxy_destroy(struct tg_proxy *px);

struct tg_connslot;
/*
 * Serve a newly accepted socket.  ssl_ctx is the listener's TLS context,
 * or NULL for plain HTTP.  The proxy owns fd and slot (its connection
 * count, may be NULL) from here on, and releases the slot at close.
 */
void tg_proxy_accept(struct tg_proxy *px, int fd, SSL_CTX *ssl_ctx,
                     struct tg_connslot *slot);

/* Start draining: idle keep-alive connections close now, busy ones after
 * their current response.  Calls on_empty when none is left (possibly at
 * once). */
void tg_proxy_drain(struct tg_proxy *px);

/* Apply a reloaded snapshot to the request path (see tg_limiter_reload). */
void tg_proxy_reload(struct tg_proxy *px, tg_conf *conf, struct tg_keys *keys);

struct tg_metrics_shard;
/* This worker's metric shard (read by the main thread when scraping). */
struct tg_metrics_shard *tg_proxy_shard(struct tg_proxy *px);
/* This worker's breaker of upstream server i (worker thread only). */
int tg_proxy_upstream_state(struct tg_proxy *px, size_t server);
/* Periodic sample of counters kept outside the request path. */
void tg_proxy_sample(struct tg_proxy *px);
/* This worker's Redis breaker: 0 closed, 1 open, 2 half-open, -1 none. */
int tg_proxy_redis_breaker(struct tg_proxy *px);

struct tg_alog;
/* Log every request of this worker to log (before the worker starts). */
void tg_proxy_set_access_log(struct tg_proxy *px, struct tg_alog *log);

struct tg_anomaly_shard;
/* Count every identified request into sh (heavy hitters; before the
 * worker starts). */
void tg_proxy_set_anomaly(struct tg_proxy *px, struct tg_anomaly_shard *sh);

/* 1 when this worker's bucket store can answer (see tg_limiter_store_ready). */
int tg_proxy_store_ready(const struct tg_proxy *px);

/* Client connections currently open. */
unsigned tg_proxy_nclients(const struct tg_proxy *px);

#endif
