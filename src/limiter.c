/*
 * limiter.c - identify, route and charge one request.
 *
 * The buckets of a request and their keys are the route stage's
 * (route.c).  Limits travel with every call, so a changed tier applies
 * at once to existing buckets.
 */
#include "limiter_int.h"

#include <arpa/inet.h>
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

#define LSTORE_MAX_ENTRIES (1u << 20)
#define DCACHE_SLOTS       2048        /* deny cache: buckets per worker */
#define LEASE_SLOTS        256         /* leases held per worker */

/*
 * The deny cache (store: redis), per worker, direct-mapped: the TAT of a
 * bucket as a Redis answer showed it (never later than the TAT Redis
 * holds).  Only consumption moves a TAT later; what moves it earlier is
 * handled in docs/DESIGN-NOTES.md ("The deny cache").  A request one of
 * whose buckets is known empty for its cost is answered 429 here.
 */
typedef struct dcache_entry {
    uint64_t      tat_us;         /* local clock; 0 = empty */
    tg_gcra_limit lim;            /* the limits it was learnt under */
    char          key[TG_LIMIT_KEY_MAX];
} dcache_entry;

/*
 * A lease (rate_limits.<tier>.lease), per worker: a slice of `size` tokens
 * charged to every bucket of one bucket set (tier + route + global of one
 * consumer and route) in Redis, spent here without a call; what is left
 * at its ttl (or a reload, or shutdown) is given back.
 */
typedef struct lease_entry {
    uint64_t      hash;           /* of the set: lease_hash() */
    uint64_t      expires_us;     /* 0 = no slice */
    uint64_t      taken_us;       /* when its take was sent */
    uint64_t      reset_us;       /* the take's answer: until full, from taken_us */
    uint64_t      p_us[TG_LIMIT_MAX_BUCKETS];   /* TATs the take wrote (Redis clock) */
    uint32_t      tokens;         /* left to spend */
    uint32_t      remaining;      /* the take's answer: tokens left in Redis */
    int           limiting;       /* ... its tightest bucket */
    int           taking;         /* a take for this set is in flight */
    size_t        n;
    tg_gcra_limit limits[TG_LIMIT_MAX_BUCKETS];
    char          keys[TG_LIMIT_MAX_BUCKETS][TG_LIMIT_KEY_MAX];
} lease_entry;

/* Unused lease tokens on their way back to Redis: sent together, at the
 * worker's next sample (50 ms), before its next charge, or when full. */
typedef struct give_buf {
    size_t   n;
    uint64_t amount_us[TG_REDIS_GIVE_MAX];
    uint64_t p_us[TG_REDIS_GIVE_MAX];
    char     keys[TG_REDIS_GIVE_MAX][TG_LIMIT_KEY_MAX];
} give_buf;

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
static uint64_t          local_fallback_us;   /* last fallback charge (atomic) */

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
    uint64_t sent = ctx->started_us, now = tg_now_us();

    pthread_mutex_lock(&local_mu);
    for (size_t i = 0; i < ctx->n; i++) {
        if (res->held_us[i] > 0) {
            tg_lstore_raise(local_store, ctx->keys[i], sent + res->held_us[i], now);
        }
    }
    pthread_mutex_unlock(&local_mu);
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
    pthread_mutex_lock(&local_mu);
    for (size_t i = 0; i < ctx->n; i++) {
        held[i] = tg_lstore_held(local_store, ctx->keys[i], now);
    }
    pthread_mutex_unlock(&local_mu);
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

static void finish(tg_limit_ctx *ctx, const tg_gcra_result *res);
static void finish_impossible(tg_limit_ctx *ctx, size_t i);
static void redis_done(void *arg, tg_rc rc, const tg_gcra_result *res);
static void fallback(tg_limit_ctx *ctx);
static tg_rc send_charge(struct tg_limiter *lim, tg_limit_ctx *ctx, uint32_t cost);
static void give_flush(struct tg_limiter *lim, int now);
static void dcache_learn(struct tg_limiter *lim, const tg_limit_ctx *ctx,
                         const tg_gcra_result *res);
static void dcache_forget(struct tg_limiter *lim, const char *key);
static int dcache_deny(struct tg_limiter *lim, tg_limit_ctx *ctx);
static void lease_give_back_all(struct tg_limiter *lim, uint64_t now, int at_exit);
static int lease_spend(struct tg_limiter *lim, tg_limit_ctx *ctx);
static int lease_begin(struct tg_limiter *lim, tg_limit_ctx *ctx);
static void lease_end(struct tg_limiter *lim, tg_limit_ctx *ctx);
static void lease_install(struct tg_limiter *lim, tg_limit_ctx *ctx,
                          const tg_gcra_result *res, uint32_t ln);
static uint32_t lease_size(const tg_tier_conf *tier, const tg_limit_ctx *ctx);
static tg_rc lease_taken(struct tg_limiter *lim, tg_limit_ctx *ctx,
                         const tg_gcra_result *res);

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
        lease_give_back_all(lim, 0, 1);    /* unused slices go back */
        tg_redis_destroy(lim->redis);
    }
    tg_keys_unref(lim->keys);
    tg_conf_unref(lim->conf);
    tg_conf_unref(lim->sconf);
    free(lim->kcache);
    free(lim->kneg);
    free(lim->kpend);
    free(lim->dcache);
    free(lim->leases);
    free(lim->give);
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
    lease_give_back_all(lim, 0, 0);
    if (lim->dcache != NULL) {
        memset(lim->dcache, 0, DCACHE_SLOTS * sizeof(*lim->dcache));
    }
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

    if (lim->redis != NULL) {
        probe(lim);
        lease_give_back_all(lim, tg_now_us(), 0);    /* expired slices */
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
    return lim->redis == NULL
           || (tg_redis_ready(lim->redis)
               && tg_breaker_state(&lim->breaker, tg_now_ms()) == TG_BREAKER_CLOSED);
}

int
tg_limiter_enabled(const struct tg_limiter *lim)
{
    return lim->enabled;
}

/* ---- the decision -------------------------------------------------- */

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
    if (!lim->enabled) {
        return TG_OK;
    }
    /* One deadline for every Redis call of this request. */
    ctx->deadline_us = tg_now_us() + (uint64_t)lim->sconf->redis.timeout_ms * 1000;

    /* identify -> route -> charge (tg_limiter_charge) */
    return tg_identify(lim, ctx, req, client_ip);
}

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
        tg_limit_deny(out, 403, "the key's tier is not configured");
        return TG_OK;
    }

    /* route, and the buckets of this request */
    route = tg_route_find(conf, req);
    ctx->cost = route != NULL ? route->cost : 1;
    out->route = route != NULL ? (int)(route - conf->routes) : -1;
    out->cost = ctx->cost;
    n = tg_route_buckets(conf, tier, route, prefix, out->consumer,
                         ctx->limits, ctx->names, ctx->keys);
    ctx->n = n;

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
        uint32_t ln = lease_size(tier, ctx);

        /* A slice in hand, then a bucket known empty: no Redis call. */
        if (ln > 0 && lease_spend(lim, ctx)) {
            return TG_OK;
        }
        if (dcache_deny(lim, ctx)) {
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
        if (ln > 0 && lease_begin(lim, ctx)) {
            ctx->lease_n = ln;         /* take a slice: charge ln, spend cost */
            ctx->lease_ttl_ms = tier->lease_ttl_ms;
        }
        if (send_charge(lim, ctx, ctx->lease_n > 0 ? ctx->lease_n : ctx->cost) == TG_AGAIN) {
            return TG_AGAIN;
        }
        if (ctx->lease_n > 0) {
            lease_end(lim, ctx);
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

/* Queue ctx's charge of cost tokens to Redis: TG_AGAIN (redis_done will
 * be called) or TG_ERR (not queued). */
static tg_rc
send_charge(struct tg_limiter *lim, tg_limit_ctx *ctx, uint32_t cost)
{
    const char *keys[TG_LIMIT_MAX_BUCKETS];

    /* Tokens given back (a slice of this key just expired) go first: on
     * the same connection, Redis applies them before this charge. */
    give_flush(lim, 0);
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
                lease_end(ctx->lim, ctx);
            }
            for (size_t i = 0; i < ctx->n; i++) {
                dcache_forget(ctx->lim, ctx->keys[i]);
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
    out->quota = l->burst;
    out->window_s = ceil_s(l->interval_us * l->burst);
    out->remaining = 0;
    out->reset_s = 0;
    out->status = 429;
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
        if (lim->sconf->redis.on_failure == TG_FAIL_LOCAL) {
            local_follow(ctx, res);
        }
        dcache_learn(lim, ctx, res);
        if (ctx->lease_n == 0) {
            finish(ctx, res);
        } else if (lease_taken(lim, ctx, res) == TG_AGAIN) {
            return;                    /* charged exactly now: called again */
        }
    } else {
        if (ctx->lease_n > 0) {
            lease_end(lim, ctx);
        }
        for (size_t i = 0; i < ctx->n; i++) {
            dcache_forget(lim, ctx->keys[i]);   /* it may be given back late */
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
        lease_install(lim, ctx, res, ln);
        lease_end(lim, ctx);
        finish(ctx, res);
        ctx->out->remaining = res->remaining + (ln - ctx->cost) < ctx->out->quota
                              ? res->remaining + (ln - ctx->cost) : ctx->out->quota;
        return TG_OK;
    }
    lease_end(lim, ctx);
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
        out->status = 0;
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
    if ((o->status == 429 || o->status == 503) && o->retry_s > 0) {
        m = snprintf(buf + n, len - (size_t)n, "Retry-After: %u\r\n", o->retry_s);
        if (m < 0 || (size_t)m >= len - (size_t)n) {
            return (size_t)n;
        }
        n += m;
    }
    return (size_t)n;
}

/* ---- helpers ---------------------------------------------------------- */

/* 503 while Redis cannot be asked: Retry-After is when this worker's
 * breaker lets the next call through (1 s while it is closed or probing). */
void
tg_limiter_store_down(tg_limit_ctx *ctx, const char *why)
{
    tg_limit_outcome *out = ctx->out;
    uint32_t s = ceil_s(tg_breaker_retry_ms(&ctx->lim->breaker, tg_now_ms()) * 1000);

    out->status = 503;
    out->error = why;
    out->retry_s = s > 0 ? s : 1;
}

void
tg_limiter_local_charge(const char *const *keys, const tg_gcra_limit *lim, size_t n,
                        uint32_t cost, tg_gcra_result *res)
{
    local_charge(keys, lim, n, cost, res);
}

/* ---- the deny cache ------------------------------------------------------ */

/* FNV-1a: bucket keys are ours (prefix + consumer id), a collision only
 * costs a Redis call (an entry is checked by its whole key). */
static uint64_t
key_hash(const char *s, uint64_t h)
{
    for (; *s != '\0'; s++) {
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    }
    return h;
}

static int
limit_eq(const tg_gcra_limit *a, const tg_gcra_limit *b)
{
    return a->interval_us == b->interval_us && a->burst == b->burst;
}

static dcache_entry *
dcache_slot(struct tg_limiter *lim, const char *key)
{
    if (lim->dcache == NULL) {
        lim->dcache = tg_xcalloc(DCACHE_SLOTS, sizeof(*lim->dcache));
    }
    return &lim->dcache[key_hash(key, 14695981039346656037ull) & (DCACHE_SLOTS - 1)];
}

/* The TAT known for key under limit l (0: none). */
static uint64_t
dcache_tat(struct tg_limiter *lim, const char *key, const tg_gcra_limit *l)
{
    const dcache_entry *e = dcache_slot(lim, key);

    if (e->tat_us == 0 || !limit_eq(&e->lim, l) || strcmp(e->key, key) != 0) {
        return 0;
    }
    return e->tat_us;
}

/*
 * Learn from a Redis answer to ctx: each bucket's TAT, as sent + held
 * (Redis read its clock after we sent, so this is never later than the
 * TAT Redis holds).  A bucket already known is updated; a new one enters
 * only from a refusal, when it is a bucket that refused (a flood's key:
 * its first 429 per worker and refill is Redis's, the rest are ours).  In
 * Cluster, a denied answer may count a first part that redis.c refunds:
 * only its limiting bucket (the one that denied) is learnt then.
 */
static void
dcache_learn(struct tg_limiter *lim, const tg_limit_ctx *ctx, const tg_gcra_result *res)
{
    int cluster = lim->sconf->redis.ncluster_nodes > 0;

    for (size_t i = 0; i < ctx->n; i++) {
        const tg_gcra_limit *l = &ctx->limits[i];
        dcache_entry *e;
        int known;

        if (!res->allowed && cluster && (int)i != res->limiting) {
            continue;
        }
        e = dcache_slot(lim, ctx->keys[i]);
        known = e->tat_us != 0 && strcmp(e->key, ctx->keys[i]) == 0;
        if (!known && (res->allowed
                       || res->held_us[i] + (uint64_t)ctx->cost * l->interval_us
                          <= (uint64_t)l->burst * l->interval_us)) {
            continue;
        }
        if (!known) {
            snprintf(e->key, sizeof(e->key), "%s", ctx->keys[i]);
        }
        e->lim = *l;
        e->tat_us = res->held_us[i] > 0 ? ctx->started_us + res->held_us[i] : 0;
    }
}

/* Forget ctx's buckets (a charge of it may be given back by redis.c). */
static void
dcache_forget(struct tg_limiter *lim, const char *key)
{
    dcache_entry *e;

    if (lim->dcache == NULL) {
        return;
    }
    e = dcache_slot(lim, key);
    if (strcmp(e->key, key) == 0) {
        e->tat_us = 0;
    }
}

/* 1 (out filled: 429) when a bucket of ctx is known empty for its cost:
 * the same arithmetic as the script over the TATs known (unknown buckets
 * count as full), so the headers are those Redis would give. */
static int
dcache_deny(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    uint64_t tat[TG_LIMIT_MAX_BUCKETS], now = tg_now_us();
    tg_gcra_result res;
    int hit = 0;

    if (lim->dcache == NULL) {
        return 0;
    }
    for (size_t i = 0; i < ctx->n; i++) {
        tat[i] = dcache_tat(lim, ctx->keys[i], &ctx->limits[i]);
        hit |= tat[i] > now;
    }
    if (!hit) {
        return 0;
    }
    tg_gcra_charge(ctx->limits, tat, NULL, ctx->n, ctx->cost, now, &res);
    if (res.allowed) {
        return 0;
    }
    finish(ctx, &res);
    return 1;
}

/* ---- leases --------------------------------------------------------------- */

static uint64_t
lease_hash(const tg_limit_ctx *ctx)
{
    uint64_t h = 14695981039346656037ull;

    for (size_t i = 0; i < ctx->n; i++) {
        h = key_hash(ctx->keys[i], h) * 31 + ctx->limits[i].interval_us;
        h = h * 31 + ctx->limits[i].burst;
    }
    return h;
}

static lease_entry *
lease_slot(struct tg_limiter *lim, const tg_limit_ctx *ctx, uint64_t h)
{
    TG_UNUSED(ctx);
    if (lim->leases == NULL) {
        lim->leases = tg_xcalloc(LEASE_SLOTS, sizeof(*lim->leases));
        lim->give = tg_xcalloc(1, sizeof(*lim->give));
    }
    return &lim->leases[h & (LEASE_SLOTS - 1)];
}

/* 1 when e is the lease of ctx's bucket set. */
static int
lease_match(const lease_entry *e, const tg_limit_ctx *ctx, uint64_t h)
{
    if (e->hash != h || e->n != ctx->n) {
        return 0;
    }
    for (size_t i = 0; i < ctx->n; i++) {
        if (!limit_eq(&e->limits[i], &ctx->limits[i]) || strcmp(e->keys[i], ctx->keys[i]) != 0) {
            return 0;
        }
    }
    return 1;
}

/* Send the give-backs queued (one call for all, Cluster: per key); now:
 * write them at once (shutdown). */
static void
give_flush(struct tg_limiter *lim, int now)
{
    const char *keys[TG_REDIS_GIVE_MAX];
    give_buf *g = lim->give;

    if (g == NULL || g->n == 0) {
        return;
    }
    for (size_t i = 0; i < g->n; i++) {
        keys[i] = g->keys[i];
    }
    tg_redis_give_back(lim->redis, keys, g->amount_us, g->p_us, g->n, now);
    g->n = 0;
}

/* Queue amount_us of key's debt to go back (p_us: the TAT the take wrote;
 * 0 = unknown: nothing can go back safely). */
static void
give_add(struct tg_limiter *lim, const char *key, uint64_t amount_us, uint64_t p_us)
{
    give_buf *g = lim->give;

    if (g == NULL || amount_us == 0 || p_us == 0) {
        return;
    }
    if (g->n == TG_REDIS_GIVE_MAX) {
        give_flush(lim, 0);
    }
    snprintf(g->keys[g->n], sizeof(g->keys[0]), "%s", key);
    g->amount_us[g->n] = amount_us;
    g->p_us[g->n] = p_us;
    g->n++;
}

/* Give e's unused tokens back to Redis and empty it (a take in flight
 * for it stays marked).  Our own deny cache forgets those buckets: the
 * give-back makes them fuller than it knows. */
static void
lease_give_back(struct tg_limiter *lim, lease_entry *e)
{
    if (e->expires_us != 0 && e->tokens > 0) {
        for (size_t i = 0; i < e->n; i++) {
            give_add(lim, e->keys[i], (uint64_t)e->tokens * e->limits[i].interval_us,
                     e->p_us[i]);
            dcache_forget(lim, e->keys[i]);
        }
    }
    e->expires_us = 0;
    e->tokens = 0;
}

/* Every lease back to Redis (reload, shutdown; only the expired ones when
 * now != 0); at_exit: written at once (the loop has stopped). */
static void
lease_give_back_all(struct tg_limiter *lim, uint64_t now, int at_exit)
{
    if (lim->leases == NULL || lim->redis == NULL) {
        return;
    }
    for (size_t i = 0; i < LEASE_SLOTS; i++) {
        lease_entry *e = &lim->leases[i];

        if (e->expires_us != 0 && (now == 0 || now >= e->expires_us)) {
            lease_give_back(lim, e);
        }
    }
    give_flush(lim, at_exit);
}

/* 1 (out filled: allowed) when ctx's cost is spent from a live lease. */
static int
lease_spend(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    uint64_t h = lease_hash(ctx), now = tg_now_us(), reset;
    lease_entry *e = lease_slot(lim, ctx, h);
    tg_limit_outcome *out = ctx->out;
    const tg_gcra_limit *l;
    int i;

    if (e->expires_us == 0 || !lease_match(e, ctx, h)) {
        return 0;
    }
    if (now >= e->expires_us || e->tokens < ctx->cost) {
        lease_give_back(lim, e);
        return 0;
    }
    e->tokens -= ctx->cost;
    /* Headers: the bucket as the take left it, plus the slice in hand. */
    i = e->limiting >= 0 && (size_t)e->limiting < ctx->n ? e->limiting : 0;
    l = &ctx->limits[i];
    reset = e->taken_us + e->reset_us;
    out->limited = 1;
    memcpy(out->policy, ctx->names[i], sizeof(out->policy));
    out->quota = l->burst;
    out->window_s = ceil_s(l->interval_us * l->burst);
    out->remaining = e->remaining + e->tokens < l->burst ? e->remaining + e->tokens : l->burst;
    out->reset_s = ceil_s(reset > now ? reset - now : 0);
    out->status = 0;
    out->retry_s = 0;
    return 1;
}

/* Mark a take for ctx's set; 0 when one is in flight already (then this
 * request is charged exactly) or the slot holds another set's take. */
static int
lease_begin(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    uint64_t h = lease_hash(ctx);
    lease_entry *e = lease_slot(lim, ctx, h);

    if (e->taking) {
        return 0;
    }
    if (!lease_match(e, ctx, h)) {
        lease_give_back(lim, e);       /* a collision: the older set goes */
        e->hash = h;
        e->n = ctx->n;
        for (size_t i = 0; i < ctx->n; i++) {
            e->limits[i] = ctx->limits[i];
            snprintf(e->keys[i], sizeof(e->keys[i]), "%s", ctx->keys[i]);
        }
    }
    e->taking = 1;
    return 1;
}

/* The take of ctx ended (answered or not). */
static void
lease_end(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    uint64_t h = lease_hash(ctx);
    lease_entry *e = lease_slot(lim, ctx, h);

    if (lease_match(e, ctx, h)) {
        e->taking = 0;
    }
    ctx->lease_n = 0;
}

/* A take of ln tokens passed: the slice minus this request's cost is
 * spendable here until the lease's ttl. */
static void
lease_install(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_gcra_result *res,
              uint32_t ln)
{
    uint64_t h = lease_hash(ctx);
    lease_entry *e = lease_slot(lim, ctx, h);

    if (!lease_match(e, ctx, h)) {
        return;                        /* cannot happen: the slot was marked */
    }
    lease_give_back(lim, e);           /* leftovers of an older slice */
    for (size_t i = 0; i < ctx->n; i++) {
        e->p_us[i] = res->now_us > 0 ? res->now_us + res->held_us[i] : 0;
    }
    e->tokens = ln - ctx->cost;
    e->remaining = res->remaining;
    e->reset_us = res->reset_us;
    e->limiting = res->limiting;
    e->taken_us = ctx->started_us;
    e->expires_us = tg_now_us() + (uint64_t)ctx->lease_ttl_ms * 1000;
}

/* The lease size for ctx under tier: tier's lease.size, at most the
 * smallest burst of its buckets; 0 (exact) when off or not above cost. */
static uint32_t
lease_size(const tg_tier_conf *tier, const tg_limit_ctx *ctx)
{
    uint32_t ln = tier->lease_size;

    for (size_t i = 0; i < ctx->n && ln > 0; i++) {
        if (ctx->limits[i].burst < ln) {
            ln = ctx->limits[i].burst;
        }
    }
    return ln > ctx->cost ? ln : 0;
}
