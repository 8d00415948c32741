/*
 * upstream.h - per-worker pools of keep-alive connections to the upstream
 * servers, and server selection (round-robin).
 *
 * A pool belongs to one worker thread and is only touched from that
 * thread's event loop: no locks.
 */
#ifndef TOLLGATE_UPSTREAM_H
#define TOLLGATE_UPSTREAM_H

#include <event2/bufferevent.h>
#include <event2/event.h>

#include "tollgate/breaker.h"
#include "tollgate/common.h"
#include "tollgate/conf.h"

struct tg_upstream_pool;
struct tg_uconn;
struct tg_health;

/*
 * The active health checks every pool consults (see health.h), or NULL
 * for none (every server up).  Process-wide: call it once, from the main
 * thread, after tg_health_create() and before the workers start; the
 * pools read it on every acquire.  The checker must outlive every pool.
 */
void tg_upstream_set_health(const struct tg_health *health);

/* Create the pool of one worker for conf's upstream servers, with one
 * breaker per server (upstream.breaker).  Breaker settings are read here
 * only: like the servers, they change at the next restart. */
struct tg_upstream_pool *tg_upstream_pool_create(struct event_base *base,
                                                 const tg_conf *conf);
/* Close every idle connection and free the pool.  Connections still lent
 * out must have been released first. */
void tg_upstream_pool_destroy(struct tg_upstream_pool *pool);

/* Close idle connections (drain). */
void tg_upstream_pool_close_idle(struct tg_upstream_pool *pool);

/*
 * Lend a connection to the next server in rotation whose breaker allows a
 * call and that the active health check does not mark down: an idle
 * keep-alive one when there is one, else a new one being connected (its
 * bufferevent may be written to at once; the output waits for the
 * connect).  *reused tells which.  avoid (may be NULL) is a server to skip
 * if any other is available (the retry of a failed connect goes to
 * another server).  Returns NULL when no server may be used now (all
 * open or down: *retry_ms, if not NULL, says when one may be again) or a
 * socket could not be created.  The caller owns the connection until
 * tg_upstream_release().
 *
 * Servers are tried in rotation from the round-robin cursor, and the
 * cursor moves past the one chosen.  A half-open breaker lets its single
 * probe through (the borrower is that probe).  avoid is only looked at
 * during the call: it must still be lent (not yet released) then.  On
 * NULL, *retry_ms > 0 means no server may be used now: the smallest
 * time until an open breaker lets a probe through, and at least 1000 for
 * a server that is only down or whose probe is in flight (a 503 with
 * Retry-After); *retry_ms == 0 means a local failure (socket, memory: a
 * 502).
 */
struct tg_uconn *tg_upstream_acquire(struct tg_upstream_pool *pool, int *reused,
                                     const struct tg_uconn *avoid, uint64_t *retry_ms);

/* The server a connection goes to, as an index into upstream.servers. */
size_t tg_uconn_server_index(const struct tg_uconn *uc);

/* The breaker state of server (index into upstream.servers) in this pool,
 * i.e. this worker's view, for tests and per-worker status. */
enum tg_breaker_state tg_upstream_server_state(struct tg_upstream_pool *pool,
                                               size_t server);

/* Test hook: take the breakers' clock from now_ms (milliseconds, any
 * origin) instead of tg_now_ms(); NULL restores it.  Set it before the
 * first acquire. */
void tg_upstream_pool_set_clock(struct tg_upstream_pool *pool,
                                uint64_t (*now_ms)(void));

/*
 * The outcome of one exchange, for the server's breaker: ok = a response
 * head arrived and its status is not 502/503/504; failure = connect
 * failed or timed out, no answer in time, invalid response, or 502-504.
 * Call at most once per acquire, before tg_upstream_release(); a call
 * that ended otherwise (client gone) reports nothing.  A second report for
 * the same lending is ignored, and so is the report of a lending made
 * before the breaker last changed state (a late result: it must not
 * decide the fate of the half-open probe that followed).
 */
void tg_upstream_report(struct tg_uconn *uc, int ok);

/* The same for an exchange that got a response head with this status: ok
 * for the breaker unless 502-504; for the throttle (throttle.h) any 5xx
 * is an error.  Either report also feeds the throttle, a failure as an
 * error. */
void tg_upstream_report_status(struct tg_uconn *uc, int status);

/* The class of the request uc carries, for the adaptive limit (its
 * method and path, the query left out and ids folded:
 * tg_adapt_class_key); before the report.  Without it
 * the exchange counts in a catch-all class. */
void tg_upstream_set_class(struct tg_uconn *uc, const char *method, size_t method_len,
                           const char *path, size_t path_len);

/* The connection's bufferevent; callbacks are the borrower's while lent.
 * Its EV_READ stays off: the connection is read through its own event,
 * below (the bufferevent's input buffer is the borrower's to fill). */
struct bufferevent *tg_uconn_bev(struct tg_uconn *uc);
/* While lent (and connected): the connection's persistent read event calls
 * cb(fd, what, arg) until released; called again after a stop, it resumes
 * reading.  tg_uconn_read_stop: no more reads until then (a paused relay,
 * or EOF: the event is level-triggered).  Neither touches libevent when
 * nothing changes, so a kept-alive connection costs no event operation
 * per exchange. */
void tg_uconn_read_start(struct tg_uconn *uc,
                         void (*cb)(evutil_socket_t fd, short what, void *arg), void *arg);
void tg_uconn_read_stop(struct tg_uconn *uc);
/* Printable server address ("127.0.0.1:8000"). */
const char *tg_uconn_server(const struct tg_uconn *uc);

/*
 * Give a connection back.  reusable: the exchange ended cleanly on a
 * persistent connection with nothing unread; it then waits in the idle
 * list (up to upstream.keepalive per server), else it is closed.  A
 * lending released without a report frees the half-open probe slot it
 * held, if it was the probe (tg_breaker_abandon).
 */
void tg_upstream_release(struct tg_uconn *uc, int reusable);

/*
 * Adaptive concurrency (section adaptive:, see adaptive.h).  Without it
 * tg_upstream_admit() always answers TG_ADMIT_GO and nothing changes.
 * With it each server of the pool has an in-flight limit learned from
 * the latency of its exchanges (this worker's share of the process
 * limit), and a request asks for admission before tg_upstream_acquire():
 * go now, wait in the pool's queue (ordered by tier), or be shed.
 */
enum tg_upstream_admit {
    TG_ADMIT_GO,          /* a server has room: acquire now */
    TG_ADMIT_WAIT,        /* queued: the callback will say */
    TG_ADMIT_FULL,        /* shed: the queue is full of the same or higher tiers */
    TG_ADMIT_EVICTED,     /* shed: a higher tier took its place in the queue */
    TG_ADMIT_TIMEOUT      /* shed: no slot within queue_timeout_ms */
};

struct tg_upstream_waiter;
/* A queued request's answer: TG_ADMIT_GO (acquire now, in this call) or a
 * shed reason.  The waiter is already freed when it runs. */
typedef void (*tg_upstream_admit_cb)(void *arg, enum tg_upstream_admit result);

/*
 * Ask to start an exchange for a request of tier (NULL or "" for none;
 * its priority is its place in adaptive.shed_order, unlisted tiers
 * first to go).  TG_ADMIT_GO: call tg_upstream_acquire() now (also
 * when no server could take a call, each breaker open or health check
 * failing: nothing to wait for, acquire says when to retry).
 * TG_ADMIT_WAIT: *waiter is set; cb(arg, ...) runs later from the
 * pool's own event, never inside a call of the caller, unless
 * tg_upstream_admit_cancel(*waiter) comes first.  A shed result: answer
 * 503.  A request arriving while others wait queues behind them (by
 * tier): it does not overtake.  A retry (tg_upstream_acquire with
 * avoid) needs no admission: it replaces its own lending.
 */
enum tg_upstream_admit tg_upstream_admit(struct tg_upstream_pool *pool,
                                         const char *tier,
                                         struct tg_upstream_waiter **waiter,
                                         tg_upstream_admit_cb cb, void *arg);

/* The request gave up (client gone): forget it; its callback never runs. */
void tg_upstream_admit_cancel(struct tg_upstream_waiter *waiter);

struct tg_metrics_shard;
/* The shard the pool reports its adaptive gauges to (limit, in flight,
 * queued): the worker's.  Call once, before the first acquire. */
void tg_upstream_pool_set_shard(struct tg_upstream_pool *pool,
                                struct tg_metrics_shard *shard);

#endif
