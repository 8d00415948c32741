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
struct tg_limiter;
struct tg_upstream_pool;
struct tg_metrics_shard;
struct tg_alog_buf;
struct tg_anomaly_shard;

/*
 * What the worker owns and its proxy uses.  The worker creates each
 * (tg_limiter_create, tg_upstream_pool_create, tg_metrics_shard_create,
 * tg_alog_buf_create), keeps this struct, which must outlive the proxy,
 * and frees them after tg_proxy_destroy.  The proxy reads the fields at
 * each use, so alog and anomaly may be set before the worker starts.
 */
typedef struct tg_proxy_env {
    struct tg_limiter       *limiter;   /* this worker's limiter */
    struct tg_upstream_pool *pool;      /* this worker's upstream connections */
    struct tg_metrics_shard *shard;     /* this worker's counters */
    struct tg_alog_buf      *alog;      /* access log, or NULL */
    struct tg_anomaly_shard *anomaly;   /* heavy hitters, or NULL */
} tg_proxy_env;

/*
 * Create the proxy state of one worker on base, using env (see above).
 * on_empty(arg) is called when the last client connection closes while
 * draining.  Takes a reference on conf.
 */
struct tg_proxy *tg_proxy_create(struct event_base *base, tg_conf *conf,
                                 const tg_proxy_env *env,
                                 void (*on_empty)(void *arg), void *arg);
void tg_proxy_destroy(struct tg_proxy *px);

struct tg_connslot;
struct sockaddr;
/*
 * Serve a newly accepted socket.  peer is its address as accept gave it
 * (borrowed; NULL: asked of the socket).  ssl_ctx is the listener's TLS
 * context, or NULL for plain HTTP.  The proxy owns fd and slot (its
 * connection count, may be NULL) from here on, and releases the slot at
 * close.  accepted_ms: tg_now_ms() when it was accepted (0: now); its
 * first deadline (handshake, or request head) counts from then, so that
 * a wait in the worker's intake queue is part of it.
 */
void tg_proxy_accept(struct tg_proxy *px, int fd, const struct sockaddr *peer,
                     SSL_CTX *ssl_ctx, struct tg_connslot *slot, uint64_t accepted_ms);

/* Start draining: idle keep-alive connections close now, busy ones after
 * their current response.  Calls on_empty when none is left (possibly at
 * once). */
void tg_proxy_drain(struct tg_proxy *px);

/* Apply a reloaded snapshot to the request path: new requests take http.*
 * and the upstream timeouts from it (the worker reloads the limiter,
 * tg_limiter_reload). */
void tg_proxy_reload(struct tg_proxy *px, tg_conf *conf);

/* Client connections currently open. */
unsigned tg_proxy_nclients(const struct tg_proxy *px);

#endif
