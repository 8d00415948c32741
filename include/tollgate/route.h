/*
 * route.h - the route stage of the request path (identify -> ROUTE ->
 * charge): which routes: rule a request matches, what it costs, and the
 * buckets it is charged to.
 *
 * Pure: no I/O, no clock, no event loop; the config is read, never
 * written, and every result lands in the caller's memory.
 */
#ifndef TOLLGATE_ROUTE_H
#define TOLLGATE_ROUTE_H

#include <stddef.h>
#include <stdint.h>

#include "tollgate/conf.h"
#include "tollgate/gcra.h"
#include "tollgate/http.h"
#include "tollgate/keys.h"

#define TG_LIMIT_MAX_BUCKETS 3
#define TG_LIMIT_KEY_MAX     192

/*
 * The first rule of conf->routes whose method is req's (or any; a GET
 * rule also takes HEAD) and whose path is a prefix of req's normalised
 * path on a segment boundary; NULL when none matches (cost 1, no route
 * bucket).  The result points into conf.
 */
const tg_route_conf *tg_route_find(const tg_conf *conf, const tg_http_req *req);

/* The largest cost of any route of conf (1 when there is none). */
uint32_t tg_route_max_cost(const tg_conf *conf);

/*
 * The buckets of one request of consumer (a key id or "anon:<net>") on
 * tier, matched to route (NULL: none), with bucket keys under prefix:
 *   <prefix>{<consumer>}:t            the tier bucket, always;
 *   <prefix>{<consumer>}:r:<route>    the route's own, if it has a limit;
 *   <prefix>{global}:g                the global bucket, if enabled.
 * Fills limits[i], names[i] (the policy name in headers) and keys[i] of
 * each, and *global: the index of the global bucket (the one every
 * request shares: the local store keeps it lock-free), or -1; returns how
 * many (1..TG_LIMIT_MAX_BUCKETS).
 */
size_t tg_route_buckets(const tg_conf *conf, const tg_tier_conf *tier,
                        const tg_route_conf *route, const char *prefix,
                        const char *consumer,
                        tg_gcra_limit limits[TG_LIMIT_MAX_BUCKETS],
                        char names[TG_LIMIT_MAX_BUCKETS][TG_TIER_MAX + 1],
                        char keys[TG_LIMIT_MAX_BUCKETS][TG_LIMIT_KEY_MAX],
                        int *global);

#endif
