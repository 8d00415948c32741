/*
 * route.c - the route stage: rule, cost and buckets of one request.
 *
 * Bucket keys: <prefix>{<consumer>}:t for the tier bucket,
 * <prefix>{<consumer>}:r:<route> for a route bucket, <prefix>{global}:g for
 * the global bucket.  The hash tag keeps all of one consumer's buckets in
 * one Redis Cluster slot.  Limits travel with every call, so a changed tier
 * applies at once to existing buckets.
 */
#include "tollgate/route.h"

#include <stdio.h>
#include <string.h>

#include "tollgate/target.h"

/* First rule whose method matches (or any; a GET rule also takes HEAD,
 * which is GET without the body, RFC 9110 9.3.2) and whose path is a
 * prefix of the normalised request path on a segment boundary. */
const tg_route_conf *
tg_route_find(const tg_conf *conf, const tg_http_req *req)
{
    size_t i;

    for (i = 0; i < conf->nroutes; i++) {
        const tg_route_conf *r = &conf->routes[i];

        if (r->method != NULL && (strlen(r->method) != req->method_len
                                  || memcmp(r->method, req->method, req->method_len) != 0)
            && !(req->is_head && strcmp(r->method, "GET") == 0)) {
            continue;
        }
        if (tg_target_match_prefix(req->path, req->path_len, r->path)) {
            return r;
        }
    }
    return NULL;
}

uint32_t
tg_route_max_cost(const tg_conf *conf)
{
    uint32_t m = 1;

    for (size_t i = 0; i < conf->nroutes; i++) {
        if (conf->routes[i].cost > m) {
            m = conf->routes[i].cost;
        }
    }
    return m;
}

/* key = <prefix>{<tag>}<suffix>, cut to TG_LIMIT_KEY_MAX - 1 bytes as
 * snprintf would (the config keeps every key well below). */
static void
bucket_key(char *key, const char *prefix, const char *tag, const char *suffix,
           const char *suffix2)
{
    char *p = key, *end = key + TG_LIMIT_KEY_MAX - 1;
    const char *part[6] = { prefix, "{", tag, "}", suffix, suffix2 };

    for (size_t i = 0; i < 6 && part[i] != NULL; i++) {
        size_t n = strlen(part[i]);
        if (n > (size_t)(end - p)) {
            n = (size_t)(end - p);
        }
        memcpy(p, part[i], n);
        p += n;
    }
    *p = '\0';
}

size_t
tg_route_buckets(const tg_conf *conf, const tg_tier_conf *tier,
                 const tg_route_conf *route, const char *prefix, const char *consumer,
                 tg_gcra_limit limits[TG_LIMIT_MAX_BUCKETS],
                 char names[TG_LIMIT_MAX_BUCKETS][TG_TIER_MAX + 1],
                 char keys[TG_LIMIT_MAX_BUCKETS][TG_LIMIT_KEY_MAX],
                 int *global)
{
    size_t n = 0;

    *global = -1;

    bucket_key(keys[n], prefix, consumer, ":t", NULL);
    limits[n] = tg_gcra_per_minute(tier->requests_per_minute, tier->burst_limit);
    tg_copy(names[n++], tier->name, sizeof(names[0]));
    if (route != NULL && route->has_limit) {
        bucket_key(keys[n], prefix, consumer, ":r:", route->name);
        limits[n] = tg_gcra_per_minute(route->requests_per_minute, route->burst_limit);
        tg_copy(names[n++], route->name, sizeof(names[0]));
    }
    if (conf->global_limit.enabled) {
        *global = (int)n;
        bucket_key(keys[n], prefix, "global", ":g", NULL);
        limits[n] = tg_gcra_per_second(conf->global_limit.requests_per_second,
                                       conf->global_limit.burst);
        tg_copy(names[n++], "global", sizeof(names[0]));
    }
    return n;
}
