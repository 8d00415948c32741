/*
 * health.h - active health checks of the upstream servers.
 *
 * Runs on the main thread's event loop.  Every upstream.health_check.
 * interval_ms, each server gets one HTTP/1.1 "GET <path>" on a fresh
 * connection (Connection: close), bounded by timeout_ms from connect to the
 * end of the response head.  A 2xx status is a success; anything else
 * (refused, reset, timeout, malformed head, other status) a failure.
 * After `healthy` consecutive successes a server is up, after `unhealthy`
 * consecutive failures it is down.  Every server starts up, so traffic
 * flows before the first round has finished.  A check still running when
 * the next round starts is not duplicated: that server waits for the round
 * after.
 *
 * The up/down flags are an array of atomic ints: worker threads read them
 * with tg_health_up() without locks.  Transitions are logged (tg_info when
 * a server comes up, tg_warn when it goes down).
 *
 * The settings and the server list are copied at creation: a reload does
 * not change them (like upstream.servers, they need a restart).
 */
#ifndef TOLLGATE_HEALTH_H
#define TOLLGATE_HEALTH_H

#include <stddef.h>

#include <event2/event.h>

#include "tollgate/conf.h"

struct tg_health;

/*
 * Start checking conf's upstream servers on main_base (the first round is
 * run as soon as the loop runs).  Returns NULL when conf has no
 * upstream.health_check block: no checks, every server counts as up.
 * The caller owns the result and frees it with tg_health_destroy().
 */
struct tg_health *tg_health_create(struct event_base *main_base,
                                   const tg_conf *conf);

/* Stop the checks (closing any in flight) and free h.  No thread may call
 * tg_health_up(h, ...) any more.  NULL is a no-op. */
void tg_health_destroy(struct tg_health *h);

/* 1 when server (an index into upstream.servers) is up, 0 when down.  Any
 * thread.  h NULL, or an index out of range, is up. */
int tg_health_up(const struct tg_health *h, size_t server);

/* Number of servers checked (upstream.nservers); 0 for NULL.  For metrics
 * and /status together with tg_health_up(). */
size_t tg_health_server_count(const struct tg_health *h);

/*
 * Set server's flag (1 up, 0 down) and restart its consecutive counts:
 * the checks go on from there.  A hook for tests (and a future operator
 * "drain this server" command); main thread, or any thread while the
 * checks are not running.
 */
void tg_health_force(struct tg_health *h, size_t server, int up);

#endif
