/*
 * statsd.h - the StatsD exporter (main thread).  Every metrics.statsd
 * flush_ms, the counters' deltas since the previous flush and the gauges,
 * formatted and packed by tg_metrics_statsd_delta (metrics.h), are sent
 * on a connected, non-blocking UDP socket: never a packet per request;
 * a full socket or an absent receiver drops a datagram.
 */
#ifndef TOLLGATE_STATSD_H
#define TOLLGATE_STATSD_H

#include <event2/event.h>

#include "tollgate/common.h"
#include "tollgate/conf.h"

struct tg_statsd;
struct tg_metrics_shard;

/*
 * Open the socket to conf's metrics.statsd (which must be enabled) and
 * start the flush timer on base.  shards[0..n) (one per worker) must
 * outlive the exporter; it takes a reference on conf.  NULL on failure,
 * logged.
 */
struct tg_statsd *tg_statsd_create(struct event_base *base, tg_conf *conf,
                                   struct tg_metrics_shard *const *shards, size_t n);

/* Send now what was counted since the last flush (at exit: the last
 * interval). */
void tg_statsd_flush(struct tg_statsd *sd);

/* Stop the timer and close the socket; sd may be NULL. */
void tg_statsd_destroy(struct tg_statsd *sd);

#endif
