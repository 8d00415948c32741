/*
 * worker.h - worker threads.  Each owns an event base and a tg_proxy; the
 * main thread accepts connections and hands each socket to a worker
 * through the worker's notification pipe (one atomic write, no lock), or
 * (http.reuseport, or a single worker) each worker accepts on its own
 * sockets.
 */
#ifndef TOLLGATE_WORKER_H
#define TOLLGATE_WORKER_H

#include "tollgate/breaker.h"
#include "tollgate/common.h"
#include "tollgate/conf.h"

struct tg_worker;

struct tg_keys;
struct tg_tls_set;

/* tls holds the listeners' TLS contexts (tls.h; may be NULL: no TLS);
 * keys (may be NULL) must outlive the worker.  Takes a reference on conf
 * and on tls.  NULL + err on failure. */
struct tg_worker *tg_worker_create(unsigned id, tg_conf *conf, struct tg_keys *keys,
                                   struct tg_tls_set *tls, char *err, size_t errlen);
tg_rc tg_worker_start(struct tg_worker *w);

struct tg_connslot;
struct sockaddr;
/* Main thread: hand an accepted socket (from listener idx) and its peer
 * address as accept gave it (salen bytes, copied; NULL: none) to w, with
 * its connection count (may be NULL), which w releases when it closes it.
 * TG_AGAIN: w's pipe is full (w has not read it for a while: give the
 * socket to another worker); on TG_AGAIN and TG_ERR the caller still owns
 * both. */
tg_rc tg_worker_dispatch(struct tg_worker *w, int fd, const struct sockaddr *sa,
                         int salen, unsigned listener_idx, struct tg_connslot *slot);

struct tg_connlimit;
/* Before tg_worker_start (http.reuseport, workers: 1): w accepts on its own listening
 * socket fd (listener idx; w takes it, also on TG_ERR), counting each
 * connection in cl (which must outlive the worker).  The worker closes
 * its listeners when told to drain. */
tg_rc tg_worker_listen(struct tg_worker *w, int fd, unsigned listener_idx,
                       struct tg_connlimit *cl);

/* Main thread: hand w a reloaded snapshot (its connections accepted from
 * then on use tls's contexts); w takes its own references (the caller
 * keeps its own) and drops those of the previous snapshot.  Never blocks:
 * TG_AGAIN when w's pipe is full (w has not read it for a while): the
 * snapshot waits in w, replaced by a newer one, until tg_worker_flush
 * sends it. */
tg_rc tg_worker_reload(struct tg_worker *w, tg_conf *conf, struct tg_keys *keys,
                       struct tg_tls_set *tls);

/* Main thread: ask w to drain and exit its loop when its last connection
 * is gone, or after timeout_ms at the latest.  As tg_worker_reload:
 * TG_AGAIN, the request waits in w. */
tg_rc tg_worker_drain(struct tg_worker *w, unsigned timeout_ms);

/* Main thread: send what waits in w (a reload, then a drain).  TG_AGAIN:
 * the pipe is still full; wait = 1: block until it is sent (at exit). */
tg_rc tg_worker_flush(struct tg_worker *w, int wait);
/* 1 while a reload or a drain waits in w. */
int tg_worker_pending(const struct tg_worker *w);

/* 1 when the worker's bucket store is connected (any thread may ask;
 * refreshed every 50 ms by the worker). */
int tg_worker_store_ready(struct tg_worker *w);
/* Since when (monotonic ms, tg_now_ms) the worker's samples have seen its
 * store unavailable; 0 while available. */
uint64_t tg_worker_store_down_ms(struct tg_worker *w);

struct tg_metrics_shard;
/* The worker's metric shard, and its Redis breaker state (TG_BREAKER_NONE
 * without Redis); sampled every 50 ms. */
struct tg_metrics_shard *tg_worker_shard(struct tg_worker *w);
enum tg_breaker_state tg_worker_redis_breaker(struct tg_worker *w);
/* Upstream server i's breaker in this worker (sampled every 50 ms). */
enum tg_breaker_state tg_worker_upstream_state(struct tg_worker *w, size_t server);

struct tg_alog;
/* Before tg_worker_start: log this worker's requests to log. */
void tg_worker_set_access_log(struct tg_worker *w, struct tg_alog *log);

struct tg_anomaly_shard;
/* Before tg_worker_start: count this worker's consumers into sh (which
 * must outlive the worker). */
void tg_worker_set_anomaly(struct tg_worker *w, struct tg_anomaly_shard *sh);

/* 1 once the worker's loop has ended (any thread may ask). */
int tg_worker_finished(struct tg_worker *w);

/* Wait for the thread to end, then free it. */
void tg_worker_join_destroy(struct tg_worker *w);

#endif
