/*
 * limiter.c - the limiter of one worker, and the charge stage.
 *
 * A request goes through it in this order (docs/ARCHITECTURE-limiter.md):
 *   tg_limiter_check    starts it: its context and its one Redis deadline;
 *   tg_identify         who sends it, at which tier (identify.c);
 *   tg_limiter_charge   its route and buckets (route.c), then the charge:
 *                       a lease's tokens (lease.c), the deny cache
 *                       (deny_cache.c), Redis (send_charge, redis_done) or
 *                       the in-process store, and the on_failure fallback;
 *   tg_limiter_headers  the rate-limit headers of its answer.
 * Limits travel with every call, so a changed tier applies at once to
 * existing buckets.
 */
#include "limiter_int.h"

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
#include "tollgate/route.h"
#include "tollgate/throttle.h"

#define LSTORE_MAX_ENTRIES (1u << 20)
#define THROTTLE_SPAN_MAX  (1ull << 52)   /* interval * burst, throttled: below
                                             the scripts' 2^53 */

/*
 * The in-process store (store: local, and the Redis fallback) is ONE per
 * process, shared by the workers: per-worker buckets would let a key have
 * `workers` times its burst.  It is striped (gcra.c, tg_lshared): one
 * consumer's buckets share a table and its lock, so workers serving
 * different consumers do not wait for each other, and the global bucket,
 * which every request shares, is a lock-free cell charged by
 * compare-and-swap (docs/DESIGN-NOTES.md).
 */
static pthread_once_t    local_once = PTHREAD_ONCE_INIT;
static struct tg_lshared *local_store;
static uint64_t          local_fallback_us;   /* last fallback charge (atomic) */

static void
local_init(void)
{
    local_store = tg_lshared_create(LSTORE_MAX_ENTRIES);
}

/* hot: the index of the bucket every request shares (the global one, as
 * the route stage said), or -1. */
static void
local_charge(const char *const *keys, const tg_gcra_limit *lim, size_t n,
             uint32_t cost, int hot, tg_gcra_result *res)
{
    tg_lshared_charge(local_store, keys, lim, n, cost, hot, tg_now_us(), res);
}

/*
 * The local store and Redis exchange debts (on_failure: local):
 *   local_follow  each Redis answer raises the local buckets (time until
 *                 full, measured from when the charge was sent: never
 *                 later than Redis's own clock read), so a fault starts
 *                 the fallback where Redis left off, not from full buckets;
 *   local_floors  each charge tells Redis what the local buckets hold, so
 *                 what the fallback admitted (this worker's during a fault,
 *                 or another worker's that lost its connection) is not
 *                 admitted again by Redis.
 * Both are maxima, never sums: a bucket is never charged twice for one
 * request.
 */
static void
local_follow(const tg_limit_ctx *ctx, const tg_gcra_result *res)
{
    uint64_t sent = ctx->started_us, tat[TG_LIMIT_MAX_BUCKETS];
    const char *keys[TG_LIMIT_MAX_BUCKETS];

    for (size_t i = 0; i < ctx->n; i++) {
        keys[i] = ctx->keys[i];
        tat[i] = res->held_us[i] > 0 ? sent + res->held_us[i] : 0;   /* 0: none */
    }
    /* one lock for the consumer's buckets (one table), none for global */
    tg_lshared_raise_n(local_store, keys, tat, ctx->n, tg_now_us());
}

/* The local debts of ctx's buckets, as floors for Redis; 0 without a
 * look (no lock) when no fallback charge happened within the longest
 * time a bucket of this request could stay in debt: then the local store
 * holds only what it copied from Redis answers, which Redis has anyway. */
static void
local_floors(const tg_limit_ctx *ctx, unsigned instances, uint64_t *held)
{
    uint64_t now = tg_now_us(), last, span = 0;

    for (size_t i = 0; i < ctx->n; i++) {
        uint64_t l = (uint64_t)ctx->limits[i].burst * ctx->limits[i].interval_us * instances;
        span = l > span ? l : span;
        held[i] = 0;
    }
    last = __atomic_load_n(&local_fallback_us, __ATOMIC_RELAXED);
    if (last == 0 || now > last + span) {
        return;
    }
    for (size_t i = 0; i < ctx->n; i++) {
        held[i] = tg_lshared_held(local_store, ctx->keys[i], now);
    }
}

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

static void finish_impossible(tg_limit_ctx *ctx, size_t i);
static void finish(tg_limit_ctx *ctx, const tg_gcra_result *res);
static void redis_done(void *arg, tg_rc rc, const tg_gcra_result *res);
static void fallback(tg_limit_ctx *ctx);
static tg_rc send_charge(struct tg_limiter *lim, tg_limit_ctx *ctx, uint32_t cost);
static tg_rc lease_taken(struct tg_limiter *lim, tg_limit_ctx *ctx,
                         const tg_gcra_result *res);
static void throttle(tg_limit_ctx *ctx);

struct tg_limiter *
tg_limiter_create(struct event_base *base, tg_conf *conf, struct tg_keys *keys,
                  char *err, size_t errlen)
{
    struct tg_limiter *lim = tg_xcalloc(1, sizeof(*lim));

    lim->conf = tg_conf_ref(conf);
    lim->sconf = tg_conf_ref(conf);
    lim->keys = tg_keys_ref(keys);
    lim->base = base;
    lim->max_cost = tg_route_max_cost(conf);
    lim->enabled = keys != NULL || conf->auth.anonymous_tier != NULL
                   || (conf->auth.redis_keys && conf->store == TG_STORE_REDIS);
    tg_breaker_init(&lim->breaker, &redis_breaker_conf);
    tg_breaker_set_hook(&lim->breaker, breaker_hook, lim);
    pthread_once(&local_once, local_init);
    /* Whenever the store is Redis, even with no keys yet: a reload may
     * turn auth on, and must then charge Redis, not local buckets. */
    if (conf->store == TG_STORE_REDIS) {
        tg_redis_opts opts;
        struct addrinfo hints, *ai = NULL;
        int rc;

        /* redis.url as the config parsed it (redis.server). */
        memset(&opts, 0, sizeof(opts));
        snprintf(opts.host, sizeof(opts.host), "%s", conf->redis.server.host);
        opts.port = conf->redis.server.port;
        opts.db = conf->redis.server.db;
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
        opts.max_batch = conf->redis.max_batch;
        opts.no_native = !conf->redis.native;
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
    tg_conf_unref(lim->sconf);
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
        tg_lease_give_back_all(lim, 0, 1);    /* unused slices go back */
        tg_redis_destroy(lim->redis);
    }
    tg_keys_unref(lim->keys);
    tg_conf_unref(lim->conf);
    tg_conf_unref(lim->sconf);
    free(lim->kcache);
    free(lim->kneg);
    free(lim->kpend);
    free(lim->dcache);
    tg_lease_free(lim);
    free(lim);
}

void
tg_limiter_reload(struct tg_limiter *lim, tg_conf *conf, struct tg_keys *keys)
{
    tg_conf *old_conf = lim->conf;
    struct tg_keys *old_keys = lim->keys;

    lim->conf = tg_conf_ref(conf);
    lim->keys = tg_keys_ref(keys);
    lim->max_cost = tg_route_max_cost(conf);
    lim->enabled = keys != NULL || conf->auth.anonymous_tier != NULL
                   || (conf->auth.redis_keys && lim->redis != NULL);
    /* Leases go back; the deny cache starts empty (limits may change). */
    tg_lease_give_back_all(lim, 0, 0);
    tg_dcache_clear(lim);
    tg_keys_unref(old_keys);
    tg_conf_unref(old_conf);
}

static void
probe_done(void *arg, tg_rc rc, const tg_gcra_result *res)
{
    struct tg_limiter *lim = arg;

    TG_UNUSED(res);
    lim->probe = NULL;
    if (rc == TG_OK) {
        tg_breaker_success(&lim->breaker, tg_now_ms());
    } else {
        tg_breaker_failure(&lim->breaker, tg_now_ms());
    }
}

/* An open breaker whose time is over is probed here, not only by the next
 * request: a worker that gets no traffic (taken out of rotation by
 * /readyz) must still find out that Redis is back. */
static void
probe(struct tg_limiter *lim)
{
    static const tg_gcra_limit one = { 1000000, 1 };
    char key[TG_LIMIT_KEY_MAX];
    const char *keys[1] = { key };
    uint64_t now = tg_now_ms();

    if (lim->probe != NULL || !tg_redis_ready(lim->redis)
        || tg_breaker_state(&lim->breaker, now) != TG_BREAKER_HALF_OPEN
        || !tg_breaker_allow(&lim->breaker, now)) {
        return;
    }
    snprintf(key, sizeof(key), "%s{probe}:p", lim->sconf->redis.prefix);
    lim->probe = tg_redis_charge(lim->redis, keys, &one, 1, 0, probe_done, lim);
}

void
tg_limiter_sample(struct tg_limiter *lim)
{
    tg_redis_stats st;

    tg_throttle_tick(lim->conf, lim->redis, lim->sconf->redis.prefix, tg_now_ms());
    if (lim->redis != NULL) {
        probe(lim);
        tg_lease_give_back_all(lim, tg_now_us(), 0);    /* expired slices */
    }
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

enum tg_breaker_state
tg_limiter_breaker_state(struct tg_limiter *lim)
{
    if (lim->redis == NULL) {
        return TG_BREAKER_NONE;
    }
    return tg_breaker_state(&lim->breaker, tg_now_ms());
}

int
tg_limiter_store_ready(const struct tg_limiter *lim)
{
    return lim->redis == NULL
           || (tg_redis_ready(lim->redis)
               && tg_breaker_state(&lim->breaker, tg_now_ms()) == TG_BREAKER_CLOSED);
}

int
tg_limiter_enabled(const struct tg_limiter *lim)
{
    return lim->enabled;
}

/* ---- the request path ---------------------------------------------- */

tg_rc
tg_limiter_check(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_http_req *req,
                 const char *client_ip, tg_limit_outcome *out, tg_limit_cb cb, void *arg)
{
    memset(out, 0, sizeof(*out));
    out->route = -1;
    ctx->lim = lim;
    ctx->out = out;
    ctx->cb = cb;
    ctx->arg = arg;
    ctx->op = NULL;
    ctx->kwait = NULL;
    ctx->lease_n = 0;
    ctx->factor = TG_THROTTLE_ONE;
    ctx->global = -1;
    if (!lim->enabled) {
        return TG_OK;
    }
    /* One deadline for every Redis call of this request. */
    ctx->deadline_us = tg_now_us() + (uint64_t)lim->sconf->redis.timeout_ms * 1000;

    /* identify -> route -> charge (tg_limiter_charge) */
    return tg_identify(lim, ctx, req, client_ip);
}

/* ---- charge ---------------------------------------------------------- */

/* Route, buckets and charge, once the consumer and tier are known. */
tg_rc
tg_limiter_charge(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_http_req *req)
{
    const tg_conf *conf = lim->conf;
    const char *prefix = lim->sconf->redis.prefix;
    tg_limit_outcome *out = ctx->out;
    const tg_tier_conf *tier;
    const tg_route_conf *route;
    size_t n;
    tg_gcra_result res;

    tier = tg_conf_tier(conf, out->tier);
    if (tier == NULL) {
        tg_limit_deny(out, TG_LIMIT_FORBIDDEN, "the key's tier is not configured");
        return TG_OK;
    }

    /* route, and the buckets of this request */
    route = tg_route_find(conf, req);
    ctx->cost = route != NULL ? route->cost : 1;
    out->route = route != NULL ? (int)(route - conf->routes) : -1;
    out->cost = ctx->cost;
    n = tg_route_buckets(conf, tier, route, prefix, out->consumer,
                         ctx->limits, ctx->names, ctx->keys, &ctx->global);
    ctx->n = n;
    throttle(ctx);

    /* A cost above a capacity could never pass: refuse it without a
     * Retry-After, which would be a lie (the config check makes this
     * unreachable; kept as the last guard). */
    for (size_t i = 0; i < n; i++) {
        if (ctx->cost > ctx->limits[i].burst) {
            finish_impossible(ctx, i);
            return TG_OK;
        }
    }

    /* charge */
    if (lim->redis != NULL) {
        uint32_t ln = tg_lease_size(tier, ctx);

        /* A slice in hand, then a bucket known empty: no Redis call. */
        ctx->lease_ttl_ms = tier->lease_ttl_ms;    /* a spend renews its mark */
        if (ln > 0 && tg_lease_spend(lim, ctx)) {
            return TG_OK;
        }
        if (tg_dcache_deny(lim, ctx, &res)) {
            finish(ctx, &res);
            return TG_OK;
        }
        if (!tg_breaker_allow(&lim->breaker, tg_now_ms())) {
            fallback(ctx);             /* open: no waiting on a dead store */
            return TG_OK;
        }
        if (tg_now_us() >= ctx->deadline_us) {
            tg_breaker_abandon(&lim->breaker, tg_now_ms());
            fallback(ctx);             /* the key lookup used all the time */
            return TG_OK;
        }
        ctx->lease_n = 0;
        if (ln > 0 && tg_lease_begin(lim, ctx)) {
            ctx->lease_n = ln;         /* take a slice: charge ln, spend cost */
        }
        if (send_charge(lim, ctx, ctx->lease_n > 0 ? ctx->lease_n : ctx->cost) == TG_AGAIN) {
            return TG_AGAIN;
        }
        if (ctx->lease_n > 0) {
            tg_lease_end(lim, ctx);
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
        local_charge(keys, ctx->limits, n, ctx->cost, ctx->global, &res);
    }
    finish(ctx, &res);
    return TG_OK;
}

/* Queue ctx's charge of cost tokens to Redis: TG_AGAIN (redis_done will
 * be called) or TG_ERR (not queued). */
static tg_rc
send_charge(struct tg_limiter *lim, tg_limit_ctx *ctx, uint32_t cost)
{
    const char *keys[TG_LIMIT_MAX_BUCKETS];

    /* Tokens given back to these buckets (a slice just expired) go
     * first: on the same connection, Redis applies them before this. */
    tg_lease_give_flush_for(lim, ctx);
    for (size_t i = 0; i < ctx->n; i++) {
        keys[i] = ctx->keys[i];
    }
    ctx->started_us = tg_now_us();
    ctx->op_charge = 1;
    ctx->op = tg_redis_charge(lim->redis, keys, ctx->limits, ctx->n, cost, redis_done, ctx);
    if (ctx->op == NULL) {
        return TG_ERR;
    }
    tg_redis_op_deadline(ctx->op, ctx->deadline_us);
    if (lim->sconf->redis.on_failure == TG_FAIL_LOCAL) {
        uint64_t held[TG_LIMIT_MAX_BUCKETS];

        local_floors(ctx, lim->sconf->redis.instances, held);
        tg_redis_op_floor(ctx->op, held, ctx->n);
    }
    return TG_AGAIN;
}

void
tg_limiter_cancel(tg_limit_ctx *ctx)
{
    tg_identify_cancel(ctx);
    if (ctx->op != NULL) {
        if (ctx->op_charge) {
            /* redis.c gives the charge back if it was applied */
            if (ctx->lease_n > 0) {
                tg_lease_end(ctx->lim, ctx);
            }
            for (size_t i = 0; i < ctx->n; i++) {
                tg_dcache_forget(ctx->lim, ctx->keys[i]);
            }
        }
        tg_redis_cancel(ctx->op);
        ctx->op = NULL;
        tg_breaker_abandon(&ctx->lim->breaker, tg_now_ms());
    }
}

/* The request costs more than bucket i can ever hold: 429 that says so,
 * and no Retry-After (no wait would help). */
static void
finish_impossible(tg_limit_ctx *ctx, size_t i)
{
    tg_limit_outcome *out = ctx->out;
    const tg_gcra_limit *l = &ctx->limits[i];

    out->limited = 1;
    memcpy(out->policy, ctx->names[i], sizeof(out->policy));
    tg_limit_policy(out, l, ctx->factor);
    out->remaining = 0;
    out->reset_s = 0;
    out->status = TG_LIMIT_LIMITED;
    out->error = "this request costs more tokens than the bucket can hold: "
                 "it can never pass";
    out->retry_s = 0;
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
    tg_limit_policy(out, l, ctx->factor);
    out->remaining = res->remaining;
    out->reset_s = ceil_s(res->reset_us);
    if (res->allowed) {
        out->status = TG_LIMIT_ALLOWED;
        out->retry_s = 0;
    } else {
        out->status = TG_LIMIT_LIMITED;
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
        if (lim->sconf->redis.on_failure == TG_FAIL_LOCAL) {
            local_follow(ctx, res);
        }
        tg_dcache_learn(lim, ctx, res);
        if (ctx->lease_n == 0) {
            finish(ctx, res);
        } else if (lease_taken(lim, ctx, res) == TG_AGAIN) {
            return;                    /* charged exactly now: called again */
        }
    } else {
        if (ctx->lease_n > 0) {
            tg_lease_end(lim, ctx);
        }
        for (size_t i = 0; i < ctx->n; i++) {
            tg_dcache_forget(lim, ctx->keys[i]);   /* it may be given back late */
        }
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

/*
 * The answer to a lease take of ctx: passed, the slice is installed and
 * ctx allowed; refused (fewer than the slice's tokens left), ctx is
 * decided for its own cost from the same answer when that is refused too,
 * else charged exactly (TG_AGAIN: redis_done comes again).  TG_OK: out
 * filled.  Either way the take is over (ctx->lease_n 0).
 */
static tg_rc
lease_taken(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_gcra_result *res)
{
    const uint64_t base = (uint64_t)1 << 62;
    uint64_t tat[TG_LIMIT_MAX_BUCKETS];
    tg_gcra_result own;
    uint32_t ln = ctx->lease_n;

    if (res->allowed) {
        tg_lease_install(lim, ctx, res, ln);
        tg_lease_end(lim, ctx);
        finish(ctx, res);
        ctx->out->remaining = res->remaining + (ln - ctx->cost) < ctx->out->quota
                              ? res->remaining + (ln - ctx->cost) : ctx->out->quota;
        return TG_OK;
    }
    tg_lease_end(lim, ctx);
    /* The buckets as Redis read them (held), on a clock of our own. */
    for (size_t i = 0; i < ctx->n; i++) {
        tat[i] = base + res->held_us[i];
    }
    tg_gcra_charge(ctx->limits, tat, NULL, ctx->n, ctx->cost, base, &own);
    if (!own.allowed) {
        finish(ctx, &own);
        return TG_OK;
    }
    if (tg_now_us() < ctx->deadline_us && send_charge(lim, ctx, ctx->cost) == TG_AGAIN) {
        return TG_AGAIN;
    }
    fallback(ctx);
    return TG_OK;
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
    switch (lim->sconf->redis.on_failure) {
    case TG_FAIL_ALLOW:
        out->status = TG_LIMIT_ALLOWED;
        out->limited = 0;
        return;
    case TG_FAIL_DENY:
        out->limited = 0;
        tg_limiter_store_down(ctx, "rate limit store unavailable");
        return;
    case TG_FAIL_LOCAL:
    default: {
        /* redis.instances: each instance keeps its share of every limit,
         * so a fleet on local buckets stays near the global limit - but
         * never below the largest cost that could pass the bucket (a
         * smaller share would refuse that route for good). */
        unsigned k = lim->sconf->redis.instances;
        tg_gcra_limit shared[TG_LIMIT_MAX_BUCKETS];

        for (i = 0; i < ctx->n; i++) {
            keys[i] = ctx->keys[i];
            shared[i] = tg_gcra_share(ctx->limits[i], k, lim->max_cost);
        }
        __atomic_store_n(&local_fallback_us, tg_now_us(), __ATOMIC_RELAXED);
        local_charge(keys, shared, ctx->n, ctx->cost, ctx->global, &res);
        if (k > 1) {
            memcpy(ctx->limits, shared, sizeof(shared[0]) * ctx->n);   /* headers */
        }
        finish(ctx, &res);
        return;
    }
    }
}

/* ---- headers --------------------------------------------------------- */

/* Appenders of tg_limiter_headers: a literal, a string, a number. */
#define HDR_LIT(p, end, lit) tg_cat((p), (end), (lit), sizeof(lit) - 1)

static int
hdr_u32(char **p, const char *end, uint32_t v)
{
    char d[20];

    if (end - *p >= 20) {              /* room for any: written in place */
        *p += tg_u64_dec(*p, v);
        return 1;
    }
    return tg_cat(p, end, d, tg_u64_dec(d, v));
}

size_t
tg_limiter_headers(const tg_limit_outcome *o, char *buf, size_t len)
{
    /* built by hand, not snprintf (once per request: docs/PERFORMANCE.md);
     * the text is exactly what the format below says */
    char *p = buf, *end, *mark;
    size_t pl;
    /* a throttled quota is below the burst: never show more left than it */
    uint32_t left = o->remaining < o->quota ? o->remaining : o->quota;

    if (len == 0) {
        return 0;
    }
    end = buf + len - 1;                 /* room for the NUL */
    if (o->limited) {
        /* draft-ietf-httpapi-ratelimit-headers: policy (quota q over window
         * w seconds) and current state (r remaining, t seconds to reset):
         *   RateLimit-Policy: "%s";q=%u;w=%u  RateLimit: "%s";r=%u;t=%u
         *   X-RateLimit-Limit: %u  X-RateLimit-Remaining: %u
         *   X-RateLimit-Reset: %u  (each line ending in CRLF) */
        pl = strnlen(o->policy, sizeof(o->policy));
        if (!(HDR_LIT(&p, end, "RateLimit-Policy: \"") && tg_cat(&p, end, o->policy, pl)
              && HDR_LIT(&p, end, "\";q=") && hdr_u32(&p, end, o->quota)
              && HDR_LIT(&p, end, ";w=") && hdr_u32(&p, end, o->window_s)
              && HDR_LIT(&p, end, "\r\nRateLimit: \"") && tg_cat(&p, end, o->policy, pl)
              && HDR_LIT(&p, end, "\";r=") && hdr_u32(&p, end, left)
              && HDR_LIT(&p, end, ";t=") && hdr_u32(&p, end, o->reset_s)
              && HDR_LIT(&p, end, "\r\nX-RateLimit-Limit: ") && hdr_u32(&p, end, o->quota)
              && HDR_LIT(&p, end, "\r\nX-RateLimit-Remaining: ")
              && hdr_u32(&p, end, left)
              && HDR_LIT(&p, end, "\r\nX-RateLimit-Reset: ") && hdr_u32(&p, end, o->reset_s)
              && HDR_LIT(&p, end, "\r\n"))) {
            buf[0] = '\0';
            return 0;
        }
    }
    if ((o->status == TG_LIMIT_LIMITED || o->status == TG_LIMIT_UNAVAILABLE) && o->retry_s > 0) {
        mark = p;
        if (!(HDR_LIT(&p, end, "Retry-After: ") && hdr_u32(&p, end, o->retry_s)
              && HDR_LIT(&p, end, "\r\n"))) {
            p = mark;                    /* as before: the rest, without it */
        }
    }
    *p = '\0';
    return (size_t)(p - buf);
}

/* ---- helpers ---------------------------------------------------------- */

/* The throttle's factor (throttle.h) on ctx's buckets: each interval
 * divided by it, rounded up (refill x factor; burst unchanged), before
 * the store, the fallback, the leases and the deny cache see them - all
 * of which match a bucket by its limits, so nothing learnt under another
 * factor is used under this one. */
static void
throttle(tg_limit_ctx *ctx)
{
    uint32_t f = tg_throttle_factor();

    ctx->factor = f;
    if (f >= TG_THROTTLE_ONE || f == 0) {
        ctx->factor = TG_THROTTLE_ONE;
        return;
    }
    for (size_t i = 0; i < ctx->n; i++) {
        tg_gcra_limit *l = &ctx->limits[i];
        uint64_t t = (l->interval_us * TG_THROTTLE_ONE + f - 1) / f;

        if (t * l->burst > THROTTLE_SPAN_MAX) {
            t = THROTTLE_SPAN_MAX / l->burst > l->interval_us
                ? THROTTLE_SPAN_MAX / l->burst : l->interval_us;
        }
        l->interval_us = t;
    }
}

/* 503 while Redis cannot be asked: Retry-After is when this worker's
 * breaker lets the next call through (1 s while it is closed or probing). */
void
tg_limiter_store_down(tg_limit_ctx *ctx, const char *why)
{
    tg_limit_outcome *out = ctx->out;
    uint32_t s = ceil_s(tg_breaker_retry_ms(&ctx->lim->breaker, tg_now_ms()) * 1000);

    out->status = TG_LIMIT_UNAVAILABLE;
    out->error = why;
    out->retry_s = s > 0 ? s : 1;
}

void
tg_limiter_local_charge(const char *const *keys, const tg_gcra_limit *lim, size_t n,
                        uint32_t cost, tg_gcra_result *res)
{
    local_charge(keys, lim, n, cost, -1, res);
}
