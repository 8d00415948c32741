/*
 * limiter.c - identify, route and charge one request.
 *
 * Bucket keys: <prefix>{<consumer>}:t for the tier bucket,
 * <prefix>{<consumer>}:r:<route> for a route bucket, <prefix>{global}:g for
 * the global bucket.  The hash tag keeps all of one consumer's buckets in
 * one Redis Cluster slot.  Limits travel with every call, so a changed tier
 * applies at once to existing buckets.
 */
#include "tollgate/limiter.h"

#include <limits.h>
#include <netdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "tollgate/breaker.h"
#include "tollgate/metrics.h"
#include "tollgate/redis.h"

#define LSTORE_MAX_ENTRIES (1u << 20)
#define KCACHE_SLOTS       4096        /* key-store cache entries per worker */

/* A key learned from the Redis key store (auth.redis_keys), cached for
 * auth.cache_ttl_ms: a revoked key stops working within that time.
 * Misses are cached too, so unknown keys cannot hammer Redis. */
typedef struct kcache_entry {
    uint8_t  digest[32];
    uint64_t expires_ms;          /* 0 = empty slot */
    int      exists;
    int      enabled;
    char     id[TG_KEY_ID_MAX + 1];
    char     tier[TG_TIER_MAX + 1];
} kcache_entry;

/*
 * The in-process store (store: local, and the Redis fallback) is ONE per
 * process, shared by the workers behind a mutex: per-worker buckets would
 * let a key have `workers` times its burst.  It is the only lock a request
 * can meet, held for one hash lookup and a few integer operations, and
 * only when Redis is not the store (docs/DESIGN-NOTES.md).
 */
static pthread_once_t    local_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t   local_mu = PTHREAD_MUTEX_INITIALIZER;
static struct tg_lstore *local_store;

static void
local_init(void)
{
    local_store = tg_lstore_create(LSTORE_MAX_ENTRIES);
}

static void
local_charge(const char *const *keys, const tg_gcra_limit *lim, size_t n,
             uint32_t cost, tg_gcra_result *res)
{
    pthread_mutex_lock(&local_mu);
    tg_lstore_charge(local_store, keys, lim, n, cost, tg_now_us(), res);
    pthread_mutex_unlock(&local_mu);
}

struct tg_limiter {
    tg_conf            *conf;
    struct tg_keys     *keys;
    int                 enabled;
    struct tg_redis    *redis;      /* store: redis */
    struct event_base  *base;
    tg_breaker          breaker;    /* over the Redis calls of this worker */
    kcache_entry       *kcache;     /* auth.redis_keys, KCACHE_SLOTS entries */
    struct tg_metrics_shard *shard; /* may be NULL */
    uint64_t            last_fail_ms;   /* a batch fails all its charges at once */
    uint64_t            seen_timeouts;  /* tg_redis_stats already counted */
    uint64_t            seen_noscript;
};

/* Redis breaker: a handful of failed calls (each already bounded by
 * redis.timeout_ms) open it; then requests go straight to the fallback
 * and one probe per second checks whether Redis is back. */
static const tg_breaker_conf redis_breaker_conf = {
    .failures = 3, .window_ms = 0, .min_requests = 0, .error_pct = 0,
    .open_ms = 1000, .max_open_ms = 5000, .probes = 1,
};

static void
breaker_hook(void *arg, enum tg_breaker_state from, enum tg_breaker_state to)
{
    TG_UNUSED(arg);
    if (to == TG_BREAKER_OPEN && from == TG_BREAKER_CLOSED) {
        tg_warn("redis: breaker open, using the on_failure policy");
    } else if (to == TG_BREAKER_CLOSED) {
        tg_info("redis: breaker closed, back on Redis");
    }
}

static const tg_route_conf *route_for(const tg_conf *conf, const tg_http_req *req);
static tg_rc charge_stage(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_http_req *req);
static int use_key_store(const struct tg_limiter *lim);
static tg_rc key_store_lookup(struct tg_limiter *lim, tg_limit_ctx *ctx,
                              const tg_http_req *req);
static const tg_http_hdr *find_header(const tg_http_req *req, const char *name);
static void finish(tg_limit_ctx *ctx, const tg_gcra_result *res);
static void redis_done(void *arg, tg_rc rc, const tg_gcra_result *res);
static void fallback(tg_limit_ctx *ctx);
static uint32_t ceil_s(uint64_t us);

struct tg_limiter *
tg_limiter_create(struct event_base *base, tg_conf *conf, struct tg_keys *keys,
                  char *err, size_t errlen)
{
    struct tg_limiter *lim = tg_xcalloc(1, sizeof(*lim));

    lim->conf = tg_conf_ref(conf);
    lim->keys = tg_keys_ref(keys);
    lim->base = base;
    lim->enabled = keys != NULL || conf->auth.anonymous_tier != NULL
                   || (conf->auth.redis_keys && conf->store == TG_STORE_REDIS);
    tg_breaker_init(&lim->breaker, &redis_breaker_conf);
    tg_breaker_set_hook(&lim->breaker, breaker_hook, lim);
    pthread_once(&local_once, local_init);
    if (lim->enabled && conf->store == TG_STORE_REDIS) {
        tg_redis_opts opts;
        struct addrinfo hints, *ai = NULL;
        int rc;

        if (tg_redis_parse_url(conf->redis.url, &opts, err, errlen) != TG_OK) {
            goto fail;
        }
        /* Resolve once, here (start-up, main thread): never on a loop. */
        memset(&hints, 0, sizeof(hints));
        hints.ai_socktype = SOCK_STREAM;
        rc = getaddrinfo(opts.host, NULL, &hints, &ai);
        if (rc != 0) {
            snprintf(err, errlen, "redis.url: cannot resolve %s: %s", opts.host,
                     gai_strerror(rc));
            goto fail;
        }
        getnameinfo(ai->ai_addr, ai->ai_addrlen, opts.host, sizeof(opts.host),
                    NULL, 0, NI_NUMERICHOST);
        freeaddrinfo(ai);
        opts.timeout_ms = conf->redis.timeout_ms;
        opts.max_batch = conf->redis.max_batch ? conf->redis.max_batch : 32;
        /* Sentinel / Cluster: addresses resolved at config load. */
        if (conf->redis.sentinel_master != NULL) {
            snprintf(opts.sentinel_master, sizeof(opts.sentinel_master), "%s",
                     conf->redis.sentinel_master);
        }
        for (size_t i = 0; i < conf->redis.nsentinels && i < TG_REDIS_MAX_ADDRS; i++) {
            if (tg_redis_addr_from_sockaddr((const struct sockaddr *)
                                            &conf->redis.sentinels[i].sa,
                                            &opts.sentinels[opts.nsentinels]) == TG_OK) {
                opts.nsentinels++;
            }
        }
        for (size_t i = 0; i < conf->redis.ncluster_nodes && i < TG_REDIS_MAX_ADDRS; i++) {
            if (tg_redis_addr_from_sockaddr((const struct sockaddr *)
                                            &conf->redis.cluster_nodes[i].sa,
                                            &opts.cluster_nodes[opts.ncluster]) == TG_OK) {
                opts.ncluster++;
            }
        }
#define TG_COPY(dst, src) snprintf(dst, sizeof(dst), "%s", (src) ? (src) : "")
        TG_COPY(opts.username, conf->redis.username);
        TG_COPY(opts.password, conf->redis.password);
        TG_COPY(opts.sentinel_username, conf->redis.sentinel_username);
        TG_COPY(opts.sentinel_password, conf->redis.sentinel_password);
#undef TG_COPY
        lim->redis = tg_redis_create(base, &opts);
        explicit_bzero(opts.password, sizeof(opts.password));
        explicit_bzero(opts.sentinel_password, sizeof(opts.sentinel_password));
        if (lim->redis == NULL) {
            snprintf(err, errlen, "redis: cannot create the client");
            goto fail;
        }
        if (tg_redis_node_breakers(lim->redis)) {
            /* Cluster: a breaker per node inside the client; one over all
             * nodes would send every slot to the fallback for one node */
            static const tg_breaker_conf never = { .failures = UINT_MAX,
                                                   .open_ms = 1000, .probes = 1 };
            tg_breaker_init(&lim->breaker, &never);
        }
    }
    return lim;

fail:
    tg_keys_unref(lim->keys);
    tg_conf_unref(lim->conf);
    free(lim);
    return NULL;
}

void
tg_limiter_destroy(struct tg_limiter *lim)
{
    if (lim == NULL) {
        return;
    }
    if (lim->redis != NULL) {
        tg_redis_destroy(lim->redis);
    }
    tg_keys_unref(lim->keys);
    tg_conf_unref(lim->conf);
    free(lim->kcache);
    free(lim);
}

void
tg_limiter_reload(struct tg_limiter *lim, tg_conf *conf, struct tg_keys *keys)
{
    tg_conf *old_conf = lim->conf;
    struct tg_keys *old_keys = lim->keys;

    lim->conf = tg_conf_ref(conf);
    lim->keys = tg_keys_ref(keys);
    lim->enabled = keys != NULL || conf->auth.anonymous_tier != NULL
                   || (conf->auth.redis_keys && lim->redis != NULL);
    tg_keys_unref(old_keys);
    tg_conf_unref(old_conf);
}

void
tg_limiter_sample(struct tg_limiter *lim)
{
    tg_redis_stats st;

    if (lim->redis == NULL || lim->shard == NULL) {
        return;
    }
    tg_redis_get_stats(lim->redis, &st);
    tg_metric_add(lim->shard, TG_M_REDIS_CALLS, TG_MR_TIMEOUT, st.timeouts - lim->seen_timeouts);
    tg_metric_add(lim->shard, TG_M_REDIS_CALLS, TG_MR_NOSCRIPT, st.noscript - lim->seen_noscript);
    lim->seen_timeouts = st.timeouts;
    lim->seen_noscript = st.noscript;
}

void
tg_limiter_set_shard(struct tg_limiter *lim, struct tg_metrics_shard *shard)
{
    lim->shard = shard;
}

int
tg_limiter_breaker_state(struct tg_limiter *lim)
{
    if (lim->redis == NULL) {
        return -1;
    }
    return (int)tg_breaker_state(&lim->breaker, tg_now_ms());
}

int
tg_limiter_store_ready(const struct tg_limiter *lim)
{
    return lim->redis == NULL || tg_redis_ready(lim->redis);
}

int
tg_limiter_enabled(const struct tg_limiter *lim)
{
    return lim->enabled;
}

int
tg_limiter_strip_header(const struct tg_limiter *lim, const char *name, size_t len)
{
    const tg_conf *conf = lim->conf;

    if (tg_http_name_is(name, len, "x-consumer-id")
        || tg_http_name_is(name, len, "x-consumer-tier")) {
        return 1;     /* only tollgate says who the consumer is */
    }
    if (conf->auth.forward_key) {
        return 0;
    }
    return tg_http_name_is(name, len, conf->auth.header ? conf->auth.header : "x-api-key")
           || tg_http_name_is(name, len, "authorization");
}

/* ---- the decision -------------------------------------------------- */

static void
deny(tg_limit_outcome *out, int status, const char *why)
{
    out->status = status;
    out->error = why;
    out->limited = 0;
}

tg_rc
tg_limiter_check(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_http_req *req,
                 const char *client_ip, tg_limit_outcome *out, tg_limit_cb cb, void *arg)
{
    const tg_conf *conf = lim->conf;
    const tg_http_hdr *h;
    const char *kv = NULL;
    size_t klen = 0;

    memset(out, 0, sizeof(*out));
    out->route = -1;
    ctx->lim = lim;
    ctx->out = out;
    ctx->cb = cb;
    ctx->arg = arg;
    ctx->op = NULL;
    if (!lim->enabled) {
        return TG_OK;
    }

    /* identify */
    h = find_header(req, conf->auth.header ? conf->auth.header : "x-api-key");
    if (h != NULL) {
        kv = h->value;
        klen = h->value_len;
    } else if ((h = find_header(req, "authorization")) != NULL
               && h->value_len > 7 && strncasecmp(h->value, "bearer ", 7) == 0) {
        kv = h->value + 7;
        klen = h->value_len - 7;
        while (klen > 0 && (*kv == ' ' || *kv == '\t')) {
            kv++;
            klen--;
        }
    }
    if (kv != NULL && klen > 0 && (lim->keys != NULL || use_key_store(lim))) {
        const tg_key *key;

        tg_keys_hash(kv, klen, ctx->digest);
        key = tg_keys_find(lim->keys, ctx->digest);
        if (key == NULL && use_key_store(lim)) {
            return key_store_lookup(lim, ctx, req);
        }
        if (key == NULL) {
            deny(out, 401, "unknown API key");
            return TG_OK;
        }
        if (!key->enabled) {
            snprintf(out->consumer, sizeof(out->consumer), "%s", key->id);
            snprintf(out->tier, sizeof(out->tier), "%s", key->tier);
            deny(out, 403, "API key disabled");
            return TG_OK;
        }
        snprintf(out->consumer, sizeof(out->consumer), "%s", key->id);
        snprintf(out->tier, sizeof(out->tier), "%s", key->tier);
    } else if (kv == NULL && conf->auth.anonymous_tier != NULL) {
        snprintf(out->consumer, sizeof(out->consumer), "anon:%s", client_ip);
        snprintf(out->tier, sizeof(out->tier), "%s", conf->auth.anonymous_tier);
    } else {
        deny(out, 401, kv == NULL ? "missing API key" : "unknown API key");
        return TG_OK;
    }
    return charge_stage(lim, ctx, req);
}

/* Route, buckets and charge, once the consumer and tier are known. */
static tg_rc
charge_stage(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_http_req *req)
{
    const tg_conf *conf = lim->conf;
    const char *prefix = conf->redis.prefix ? conf->redis.prefix : "tg:";
    tg_limit_outcome *out = ctx->out;
    const tg_tier_conf *tier;
    const tg_route_conf *route;
    size_t n = 0;
    tg_gcra_result res;

    tier = tg_conf_tier(conf, out->tier);
    if (tier == NULL) {
        deny(out, 403, "the key's tier is not configured");
        return TG_OK;
    }

    /* route, and the buckets of this request */
    route = route_for(conf, req);
    ctx->cost = route != NULL ? route->cost : 1;
    out->route = route != NULL ? (int)(route - conf->routes) : -1;
    out->cost = ctx->cost;
    snprintf(ctx->keys[n], TG_LIMIT_KEY_MAX, "%s{%s}:t", prefix, out->consumer);
    ctx->limits[n] = tg_gcra_per_minute(tier->requests_per_minute, tier->burst_limit);
    snprintf(ctx->names[n++], sizeof(ctx->names[0]), "%s", tier->name);
    if (route != NULL && route->has_limit) {
        snprintf(ctx->keys[n], TG_LIMIT_KEY_MAX, "%s{%s}:r:%s", prefix, out->consumer,
                 route->name);
        ctx->limits[n] = tg_gcra_per_minute(route->requests_per_minute, route->burst_limit);
        snprintf(ctx->names[n++], sizeof(ctx->names[0]), "%s", route->name);
    }
    if (conf->global_limit.enabled) {
        snprintf(ctx->keys[n], TG_LIMIT_KEY_MAX, "%s{global}:g", prefix);
        ctx->limits[n] = tg_gcra_per_second(conf->global_limit.requests_per_second,
                                            conf->global_limit.burst);
        snprintf(ctx->names[n++], sizeof(ctx->names[0]), "%s", "global");
    }
    ctx->n = n;

    /* charge */
    if (lim->redis != NULL) {
        const char *keys[TG_LIMIT_MAX_BUCKETS];
        size_t i;

        if (!tg_breaker_allow(&lim->breaker, tg_now_ms())) {
            fallback(ctx);             /* open: no waiting on a dead store */
            return TG_OK;
        }
        for (i = 0; i < n; i++) {
            keys[i] = ctx->keys[i];
        }
        ctx->started_us = tg_now_us();
        ctx->op_charge = 1;
        ctx->op = tg_redis_charge(lim->redis, keys, ctx->limits, n, ctx->cost,
                                  redis_done, ctx);
        if (ctx->op != NULL) {
            return TG_AGAIN;
        }
        tg_breaker_failure(&lim->breaker, tg_now_ms());
        fallback(ctx);
        return TG_OK;
    }
    {
        const char *keys[TG_LIMIT_MAX_BUCKETS];
        size_t i;

        for (i = 0; i < n; i++) {
            keys[i] = ctx->keys[i];
        }
        local_charge(keys, ctx->limits, n, ctx->cost, &res);
    }
    finish(ctx, &res);
    return TG_OK;
}

void
tg_limiter_cancel(tg_limit_ctx *ctx)
{
    if (ctx->op != NULL) {
        tg_redis_cancel(ctx->op);
        ctx->op = NULL;
        if (ctx->op_charge) {
            tg_breaker_abandon(&ctx->lim->breaker, tg_now_ms());
        }
    }
}

/* Fill the outcome from a store result. */
static void
finish(tg_limit_ctx *ctx, const tg_gcra_result *res)
{
    tg_limit_outcome *out = ctx->out;
    int i = res->limiting >= 0 && (size_t)res->limiting < ctx->n ? res->limiting : 0;
    const tg_gcra_limit *l = &ctx->limits[i];

    out->limited = 1;
    memcpy(out->policy, ctx->names[i], sizeof(out->policy));
    out->quota = l->burst;
    out->window_s = ceil_s(l->interval_us * l->burst);
    out->remaining = res->remaining;
    out->reset_s = ceil_s(res->reset_us);
    if (res->allowed) {
        out->status = 0;
        out->retry_s = 0;
    } else {
        out->status = 429;
        out->error = "rate limit exceeded";
        out->retry_s = ceil_s(res->retry_us);
        if (out->retry_s == 0) {
            out->retry_s = 1;
        }
    }
}

static void
redis_done(void *arg, tg_rc rc, const tg_gcra_result *res)
{
    tg_limit_ctx *ctx = arg;
    struct tg_limiter *lim = ctx->lim;
    uint64_t now = tg_now_us();

    ctx->op = NULL;
    if (lim->shard != NULL) {
        tg_metric_inc(lim->shard, TG_M_REDIS_CALLS, rc == TG_OK ? TG_MR_OK : TG_MR_ERROR);
        tg_metric_observe_us(lim->shard, TG_M_REDIS_LATENCY, 0, now - ctx->started_us);
    }
    if (rc == TG_OK && res != NULL) {
        tg_breaker_success(&lim->breaker, now / 1000);
        finish(ctx, res);
    } else {
        /* A batch that misses its deadline fails all its charges in one
         * callback run: that is one failure of Redis, not one per charge
         * (else one late batch on a busy machine opens the breaker). */
        if (now / 1000 != lim->last_fail_ms) {
            tg_breaker_failure(&lim->breaker, now / 1000);
            lim->last_fail_ms = now / 1000;
        } else {
            tg_breaker_abandon(&lim->breaker, now / 1000);
        }
        fallback(ctx);
    }
    ctx->cb(ctx->arg);
}

/* Redis could not answer: redis.on_failure decides. */
static void
fallback(tg_limit_ctx *ctx)
{
    struct tg_limiter *lim = ctx->lim;
    tg_limit_outcome *out = ctx->out;
    tg_gcra_result res;
    const char *keys[TG_LIMIT_MAX_BUCKETS];
    size_t i;

    out->fallback = 1;
    switch (lim->conf->redis.on_failure) {
    case TG_FAIL_ALLOW:
        out->status = 0;
        out->limited = 0;
        return;
    case TG_FAIL_DENY:
        out->status = 503;
        out->error = "rate limit store unavailable";
        out->limited = 0;
        out->retry_s = 1;
        return;
    case TG_FAIL_LOCAL:
    default: {
        /* redis.instances: each instance keeps its share of every limit,
         * so a fleet on local buckets stays near the global limit. */
        unsigned k = lim->conf->redis.instances ? lim->conf->redis.instances : 1;
        tg_gcra_limit shared[TG_LIMIT_MAX_BUCKETS];

        for (i = 0; i < ctx->n; i++) {
            keys[i] = ctx->keys[i];
            shared[i].interval_us = ctx->limits[i].interval_us * k;
            shared[i].burst = ctx->limits[i].burst / k ? ctx->limits[i].burst / k : 1;
        }
        local_charge(keys, shared, ctx->n, ctx->cost, &res);
        if (k > 1) {
            memcpy(ctx->limits, shared, sizeof(shared[0]) * ctx->n);   /* headers */
        }
        finish(ctx, &res);
        return;
    }
    }
}

/* ---- headers --------------------------------------------------------- */

size_t
tg_limiter_headers(const tg_limit_outcome *o, char *buf, size_t len)
{
    int n = 0, m;

    if (o->limited) {
        /* draft-ietf-httpapi-ratelimit-headers: policy (quota q over window
         * w seconds) and current state (r remaining, t seconds to reset). */
        n = snprintf(buf, len,
                     "RateLimit-Policy: \"%s\";q=%u;w=%u\r\n"
                     "RateLimit: \"%s\";r=%u;t=%u\r\n"
                     "X-RateLimit-Limit: %u\r\n"
                     "X-RateLimit-Remaining: %u\r\n"
                     "X-RateLimit-Reset: %u\r\n",
                     o->policy, o->quota, o->window_s, o->policy, o->remaining,
                     o->reset_s, o->quota, o->remaining, o->reset_s);
        if (n < 0 || (size_t)n >= len) {
            return 0;
        }
    }
    if (o->status == 429 || o->status == 503) {
        m = snprintf(buf + n, len - (size_t)n, "Retry-After: %u\r\n", o->retry_s);
        if (m < 0 || (size_t)m >= len - (size_t)n) {
            return (size_t)n;
        }
        n += m;
    }
    return (size_t)n;
}

/* ---- helpers ---------------------------------------------------------- */

static uint32_t
ceil_s(uint64_t us)
{
    uint64_t s = (us + 999999) / 1000000;
    return s > UINT32_MAX ? UINT32_MAX : (uint32_t)s;
}

static const tg_http_hdr *
find_header(const tg_http_req *req, const char *name)
{
    size_t i;

    for (i = 0; i < req->nhdr; i++) {
        if (tg_http_name_is(req->hdr[i].name, req->hdr[i].name_len, name)) {
            return &req->hdr[i];
        }
    }
    return NULL;
}

/* First rule whose method matches (or any) and whose path is a prefix of
 * the request path on a segment boundary. */
static const tg_route_conf *
route_for(const tg_conf *conf, const tg_http_req *req)
{
    size_t i, plen;

    for (i = 0; i < conf->nroutes; i++) {
        const tg_route_conf *r = &conf->routes[i];

        if (r->method != NULL && (strlen(r->method) != req->method_len
                                  || memcmp(r->method, req->method, req->method_len) != 0)) {
            continue;
        }
        plen = strlen(r->path);
        if (plen > req->path_len || memcmp(r->path, req->path, plen) != 0) {
            continue;
        }
        if (plen == req->path_len || r->path[plen - 1] == '/'
            || req->path[plen] == '/' || req->path[plen] == '?') {
            return r;
        }
    }
    return NULL;
}

/* ---- the Redis key store ------------------------------------------------- */

static int
use_key_store(const struct tg_limiter *lim)
{
    return lim->conf->auth.redis_keys && lim->redis != NULL;
}

static kcache_entry *
kcache_slot(struct tg_limiter *lim, const uint8_t digest[32])
{
    uint64_t h;

    if (lim->kcache == NULL) {
        lim->kcache = tg_xcalloc(KCACHE_SLOTS, sizeof(*lim->kcache));
    }
    memcpy(&h, digest, sizeof(h));            /* a SHA-256 is already uniform */
    return &lim->kcache[h & (KCACHE_SLOTS - 1)];
}

/* Who the key is, from a cache entry; TG_OK (decided or charged at once)
 * or TG_AGAIN (charging in Redis). */
static tg_rc
identify_cached(struct tg_limiter *lim, tg_limit_ctx *ctx, const kcache_entry *e)
{
    tg_limit_outcome *out = ctx->out;

    if (!e->exists) {
        deny(out, 401, "unknown API key");
        return TG_OK;
    }
    snprintf(out->consumer, sizeof(out->consumer), "%s", e->id);
    snprintf(out->tier, sizeof(out->tier), "%s", e->tier);
    if (!e->enabled) {
        deny(out, 403, "API key disabled");
        return TG_OK;
    }
    return charge_stage(lim, ctx, ctx->req);
}

static int
charset_ok(const char *s, size_t n, size_t max, int upper)
{
    size_t i;

    if (n == 0 || n > max) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-'
              || (upper && ((c >= 'A' && c <= 'Z') || c == '.')))) {
            return 0;
        }
    }
    return 1;
}

/* The stored value is "<id>:<tier>" or "<id>:<tier>:disabled". */
static int
parse_key_value(const char *v, size_t len, kcache_entry *e)
{
    const char *c1 = memchr(v, ':', len), *c2;
    size_t idl, tl;

    if (c1 == NULL) {
        return 0;
    }
    idl = (size_t)(c1 - v);
    c2 = memchr(c1 + 1, ':', len - idl - 1);
    tl = c2 ? (size_t)(c2 - c1 - 1) : len - idl - 1;
    if (!charset_ok(v, idl, TG_KEY_ID_MAX, 1) || !charset_ok(c1 + 1, tl, TG_TIER_MAX, 0)) {
        return 0;
    }
    if (c2 != NULL && ((size_t)(v + len - c2 - 1) != 8 || memcmp(c2 + 1, "disabled", 8) != 0)) {
        return 0;
    }
    memcpy(e->id, v, idl);
    e->id[idl] = '\0';
    memcpy(e->tier, c1 + 1, tl);
    e->tier[tl] = '\0';
    e->enabled = c2 == NULL;
    e->exists = 1;
    return 1;
}

static void
key_store_done(void *arg, tg_rc rc, const char *value, size_t len)
{
    tg_limit_ctx *ctx = arg;
    struct tg_limiter *lim = ctx->lim;
    kcache_entry *e = kcache_slot(lim, ctx->digest);

    ctx->op = NULL;
    if (rc != TG_OK) {
        /* Unverifiable: a stale entry for this very key still speaks for
         * it; otherwise nobody is let in unidentified. */
        if (e->expires_ms != 0 && memcmp(e->digest, ctx->digest, 32) == 0) {
            if (identify_cached(lim, ctx, e) == TG_AGAIN) {
                return;
            }
        } else {
            ctx->out->status = 503;
            ctx->out->error = "API key store unavailable";
            ctx->out->retry_s = 1;
        }
        ctx->cb(ctx->arg);
        return;
    }
    memset(e, 0, sizeof(*e));
    memcpy(e->digest, ctx->digest, 32);
    e->expires_ms = tg_now_ms() + lim->conf->auth.cache_ttl_ms;
    if (value != NULL && !parse_key_value(value, len, e)) {
        tg_warn("auth.redis_keys: a malformed entry in %skeys (expected id:tier[:disabled])",
                lim->conf->redis.prefix);
        e->exists = 0;
    }
    if (identify_cached(lim, ctx, e) == TG_AGAIN) {
        return;                        /* charging: redis_done calls back */
    }
    ctx->cb(ctx->arg);
}

static tg_rc
key_store_lookup(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_http_req *req)
{
    kcache_entry *e = kcache_slot(lim, ctx->digest);
    char field[65], key[TG_LIMIT_KEY_MAX];

    ctx->req = req;
    if (e->expires_ms > tg_now_ms() && memcmp(e->digest, ctx->digest, 32) == 0) {
        return identify_cached(lim, ctx, e);
    }
    tg_keys_hex(ctx->digest, field);
    snprintf(key, sizeof(key), "%skeys", lim->conf->redis.prefix);
    ctx->op_charge = 0;
    ctx->op = tg_redis_hget(lim->redis, key, field, key_store_done, ctx);
    if (ctx->op == NULL) {
        ctx->out->status = 503;
        ctx->out->error = "API key store unavailable";
        ctx->out->retry_s = 1;
        return TG_OK;
    }
    return TG_AGAIN;
}
