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
#include "tollgate/target.h"

#define LSTORE_MAX_ENTRIES (1u << 20)
#define KCACHE_SETS        1024        /* key-store cache: sets per worker, */
#define KCACHE_WAYS        4           /* ... of this many keys each */
#define KNEG_SLOTS         4096        /* unknown keys remembered per worker */
#define KPEND_SLOTS        1024        /* lookups in flight, per worker */
#define DCACHE_SLOTS       2048        /* deny cache: buckets per worker */
#define LEASE_SLOTS        256         /* leases held per worker */

/*
 * The Redis key store (auth.redis_keys), per worker:
 *   kcache  keys that exist (enabled or not), 4-way set associative,
 *           trusted for auth.cache_ttl_ms; an expired entry is kept (and
 *           speaks for its key while Redis cannot answer) until another
 *           existing key needs its way.  Only existing keys enter it, so
 *           a flood of random keys cannot push a valid key out;
 *   kneg    keys Redis does not know, direct-mapped, same TTL: a miss
 *           evicts only another miss;
 *   kpend   lookups in flight: a second request for the same key waits for
 *           the first one's HGET (one HGET per key per worker at a time).
 * A lookup (a key in neither cache) is charged to a bucket of the client's
 * address first (auth.unknown_key_limit): a flood of random keys costs
 * Redis at most that many lookups per address per tollgate process.
 */
typedef struct kcache_entry {
    uint8_t  digest[32];
    uint64_t expires_ms;          /* 0 = empty way */
    int      exists;              /* 1 (kcache); 0 (kneg and malformed) */
    int      enabled;
    char     id[TG_KEY_ID_MAX + 1];
    char     tier[TG_TIER_MAX + 1];
} kcache_entry;

typedef struct kneg_entry {
    uint8_t  digest[32];
    uint64_t expires_ms;          /* 0 = empty */
} kneg_entry;

typedef struct kpend {
    struct tg_limiter  *lim;
    uint8_t             digest[32];
    struct tg_redis_op *op;       /* NULL = free slot */
    tg_limit_ctx       *waiters;  /* linked by ctx->kwait_next, in arrival order */
} kpend;

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

static void
local_charge(const char *const *keys, const tg_gcra_limit *lim, size_t n,
             uint32_t cost, tg_gcra_result *res)
{
    static const char gsuffix[] = "{global}:g";   /* as charge_stage builds it */
    int hot = -1;

    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(keys[i]);
        if (len >= sizeof(gsuffix) - 1
            && memcmp(keys[i] + len - (sizeof(gsuffix) - 1), gsuffix,
                      sizeof(gsuffix) - 1) == 0) {
            hot = (int)i;
        }
    }
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
    uint64_t sent = ctx->started_us, now = tg_now_us();

    for (size_t i = 0; i < ctx->n; i++) {
        if (res->held_us[i] > 0) {
            tg_lshared_raise(local_store, ctx->keys[i], sent + res->held_us[i], now);
        }
    }
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

struct tg_limiter {
    tg_conf            *conf;
    tg_conf            *sconf;      /* as started: store and redis.* (a reload
                                       changes them only at restart) */
    struct tg_keys     *keys;
    int                 enabled;
    uint32_t            max_cost;   /* largest route cost (>= 1) */
    struct tg_redis    *redis;      /* store: redis */
    struct tg_redis_op *probe;      /* breaker probe in flight (no traffic) */
    struct event_base  *base;
    tg_breaker          breaker;    /* over the Redis calls of this worker */
    kcache_entry       *kcache;     /* auth.redis_keys: KCACHE_SETS * WAYS */
    kneg_entry         *kneg;       /* KNEG_SLOTS */
    kpend              *kpend;      /* KPEND_SLOTS */
    dcache_entry       *dcache;     /* store: redis: DCACHE_SLOTS, lazily */
    lease_entry        *leases;     /* LEASE_SLOTS, lazily (a tier with a lease) */
    give_buf           *give;       /* ... and its give-backs not sent yet */
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
static tg_rc key_store_lookup(struct tg_limiter *lim, tg_limit_ctx *ctx);
static const tg_http_hdr *find_header(const tg_http_req *req, const char *name);
static void finish(tg_limit_ctx *ctx, const tg_gcra_result *res);
static void finish_impossible(tg_limit_ctx *ctx, size_t i);
static void redis_done(void *arg, tg_rc rc, const tg_gcra_result *res);
static void fallback(tg_limit_ctx *ctx);
static void store_down(tg_limit_ctx *ctx, const char *why);
static uint32_t ceil_s(uint64_t us);
static uint32_t max_cost(const tg_conf *conf);
static void client_net(const tg_conf *conf, const char *ip, char *out, size_t len);
static void kpend_cancel(tg_limit_ctx *ctx);
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
    lim->max_cost = max_cost(conf);
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
    lim->max_cost = max_cost(conf);
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

int
tg_limiter_strip_header(const struct tg_limiter *lim, const tg_http_req *req,
                        const tg_http_hdr *h)
{
    const tg_conf *conf = lim->conf;
    const char *kh = conf->auth.header ? conf->auth.header : "x-api-key";

    if (!lim->enabled || conf->auth.forward_key) {
        return 0;
    }
    if (tg_http_name_is(h->name, h->name_len, kh)) {
        return 1;
    }
    /* Authorization carried the key only as identify read it: the first
     * one, Bearer, with no key header (Basic etc. are the app's) */
    return tg_http_name_is(h->name, h->name_len, "authorization")
           && find_header(req, kh) == NULL && h == find_header(req, "authorization")
           && h->value_len > 7 && strncasecmp(h->value, "bearer ", 7) == 0;
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
    ctx->kwait = NULL;
    ctx->lease_n = 0;
    if (!lim->enabled) {
        return TG_OK;
    }
    /* One deadline for every Redis call of this request. */
    ctx->deadline_us = tg_now_us() + (uint64_t)lim->sconf->redis.timeout_ms * 1000;

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
            ctx->req = req;
            ctx->ip = client_ip;
            return key_store_lookup(lim, ctx);
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
        char net[INET6_ADDRSTRLEN + 8];

        client_net(conf, client_ip, net, sizeof(net));
        snprintf(out->consumer, sizeof(out->consumer), "anon:%s", net);
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
    const char *prefix = lim->sconf->redis.prefix;
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
    kpend_cancel(ctx);
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
        store_down(ctx, "rate limit store unavailable");
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
static void
store_down(tg_limit_ctx *ctx, const char *why)
{
    tg_limit_outcome *out = ctx->out;
    uint32_t s = ceil_s(tg_breaker_retry_ms(&ctx->lim->breaker, tg_now_ms()) * 1000);

    out->status = 503;
    out->error = why;
    out->retry_s = s > 0 ? s : 1;
}

static uint32_t
max_cost(const tg_conf *conf)
{
    uint32_t m = 1;

    for (size_t i = 0; i < conf->nroutes; i++) {
        if (conf->routes[i].cost > m) {
            m = conf->routes[i].cost;
        }
    }
    return m;
}

/*
 * The network a client's own buckets are keyed by: an IPv4 address as
 * is (IPv4-mapped IPv6 too: "::ffff:1.2.3.4" is 1.2.3.4), an IPv6 address
 * by its first auth.anonymous_ipv6_prefix bits ("2001:db8:1:2::/64"):
 * one holder of a /64 gets one bucket, not 2^64.
 */
static void
client_net(const tg_conf *conf, const char *ip, char *out, size_t len)
{
    struct in6_addr a;
    unsigned bits = conf->auth.anonymous_ipv6_prefix;
    char txt[INET6_ADDRSTRLEN];

    if (inet_pton(AF_INET6, ip, &a) != 1) {
        snprintf(out, len, "%s", ip);
        return;
    }
    if (IN6_IS_ADDR_V4MAPPED(&a)) {
        if (inet_ntop(AF_INET, &a.s6_addr[12], txt, sizeof(txt)) != NULL) {
            snprintf(out, len, "%s", txt);
            return;
        }
    }
    if (bits < 128) {
        for (unsigned b = bits; b < 128; b++) {
            a.s6_addr[b / 8] &= (uint8_t)~(0x80u >> (b % 8));
        }
    }
    if (inet_ntop(AF_INET6, &a, txt, sizeof(txt)) == NULL) {
        snprintf(out, len, "%s", ip);
        return;
    }
    snprintf(out, len, "%s/%u", txt, bits);
}

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

/* First rule whose method matches (or any; a GET rule also takes HEAD,
 * which is GET without the body, RFC 9110 9.3.2) and whose path is a
 * prefix of the normalised request path on a segment boundary. */
static const tg_route_conf *
route_for(const tg_conf *conf, const tg_http_req *req)
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

/* ---- the Redis key store ------------------------------------------------- */

static int
use_key_store(const struct tg_limiter *lim)
{
    return lim->conf->auth.redis_keys && lim->redis != NULL;
}

/* The set of 4 ways where digest lives. */
static kcache_entry *
kcache_set(struct tg_limiter *lim, const uint8_t digest[32])
{
    uint64_t h;

    if (lim->kcache == NULL) {
        lim->kcache = tg_xcalloc((size_t)KCACHE_SETS * KCACHE_WAYS, sizeof(*lim->kcache));
        lim->kneg = tg_xcalloc(KNEG_SLOTS, sizeof(*lim->kneg));
        lim->kpend = tg_xcalloc(KPEND_SLOTS, sizeof(*lim->kpend));
    }
    memcpy(&h, digest, sizeof(h));            /* a SHA-256 is already uniform */
    return &lim->kcache[(h & (KCACHE_SETS - 1)) * KCACHE_WAYS];
}

/* digest's entry in the positive cache (fresh or not), or NULL. */
static kcache_entry *
kcache_find(struct tg_limiter *lim, const uint8_t digest[32])
{
    kcache_entry *set = kcache_set(lim, digest);

    for (int w = 0; w < KCACHE_WAYS; w++) {
        if (set[w].expires_ms != 0 && memcmp(set[w].digest, digest, 32) == 0) {
            return &set[w];
        }
    }
    return NULL;
}

/* A way for digest: its own, else an empty one, else the stalest. */
static kcache_entry *
kcache_way(struct tg_limiter *lim, const uint8_t digest[32])
{
    kcache_entry *set = kcache_set(lim, digest), *e = kcache_find(lim, digest);

    if (e != NULL) {
        return e;
    }
    e = &set[0];
    for (int w = 1; w < KCACHE_WAYS && e->expires_ms != 0; w++) {
        if (set[w].expires_ms < e->expires_ms) {
            e = &set[w];
        }
    }
    return e;
}

static kneg_entry *
kneg_slot(struct tg_limiter *lim, const uint8_t digest[32])
{
    uint64_t h;

    memcpy(&h, digest + 8, sizeof(h));
    return &lim->kneg[h & (KNEG_SLOTS - 1)];
}

/* Who the key is, from a cache entry; TG_OK (decided or charged at once)
 * or TG_AGAIN (charging in Redis). */
static tg_rc
identify_cached(struct tg_limiter *lim, tg_limit_ctx *ctx, const kcache_entry *e)
{
    tg_limit_outcome *out = ctx->out;

    if (e == NULL || !e->exists) {
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

/* A lookup of digest ended (rc, value): fill the caches, tell the breaker. */
static void
key_store_fill(struct tg_limiter *lim, const uint8_t digest[32], tg_rc rc,
               const char *value, size_t len)
{
    uint64_t now = tg_now_ms();
    kcache_entry tmp, *e;
    kneg_entry *n;

    if (rc != TG_OK) {
        tg_breaker_failure(&lim->breaker, now);
        return;
    }
    tg_breaker_success(&lim->breaker, now);
    memset(&tmp, 0, sizeof(tmp));
    if (value != NULL && !parse_key_value(value, len, &tmp)) {
        tg_warn("auth.redis_keys: a malformed entry in %skeys (expected "
                "id:tier[:disabled])", lim->sconf->redis.prefix);
    }
    if (tmp.exists) {
        e = kcache_way(lim, digest);
        *e = tmp;
        memcpy(e->digest, digest, 32);
        e->expires_ms = now + lim->conf->auth.cache_ttl_ms;
        return;
    }
    if ((e = kcache_find(lim, digest)) != NULL) {
        e->expires_ms = 0;             /* gone from Redis: forget it */
    }
    n = kneg_slot(lim, digest);
    memcpy(n->digest, digest, 32);
    n->expires_ms = now + lim->conf->auth.cache_ttl_ms;
}

/* Decide one request from the cache after its lookup ended (rc: the
 * lookup's), and call it back unless it is now charging in Redis. */
static void
key_store_resume(struct tg_limiter *lim, tg_limit_ctx *ctx, tg_rc rc)
{
    kcache_entry *e = kcache_find(lim, ctx->digest);

    if (rc != TG_OK && e == NULL) {
        /* Unverifiable and never seen: nobody is let in unidentified. */
        store_down(ctx, "API key store unavailable");
        ctx->cb(ctx->arg);
        return;
    }
    /* A stale entry of this very key speaks for it while Redis cannot. */
    if (identify_cached(lim, ctx, e) == TG_AGAIN) {
        return;                        /* charging: redis_done calls back */
    }
    ctx->cb(ctx->arg);
}

/* The lookup of a kpend slot: every request waiting on it resumes. */
static void
key_store_done(void *arg, tg_rc rc, const char *value, size_t len)
{
    kpend *p = arg;
    struct tg_limiter *lim = p->lim;
    tg_limit_ctx *ctx, *next;

    ctx = p->waiters;
    p->waiters = NULL;
    p->op = NULL;
    key_store_fill(lim, p->digest, rc, value, len);
    for (; ctx != NULL; ctx = next) {
        next = ctx->kwait_next;
        ctx->kwait = NULL;
        ctx->kwait_next = NULL;
        key_store_resume(lim, ctx, rc);
    }
}

/* A lookup of one request's own (its kpend slot was busy with another key). */
static void
key_store_single(void *arg, tg_rc rc, const char *value, size_t len)
{
    tg_limit_ctx *ctx = arg;

    ctx->op = NULL;
    key_store_fill(ctx->lim, ctx->digest, rc, value, len);
    key_store_resume(ctx->lim, ctx, rc);
}

/* The request is gone while waiting for a lookup: leave the waiters
 * (the lookup itself goes on and fills the cache). */
static void
kpend_cancel(tg_limit_ctx *ctx)
{
    kpend *p = ctx->kwait;
    tg_limit_ctx **link;

    if (p == NULL) {
        return;
    }
    for (link = &p->waiters; *link != NULL; link = &(*link)->kwait_next) {
        if (*link == ctx) {
            *link = ctx->kwait_next;
            break;
        }
    }
    ctx->kwait = NULL;
    ctx->kwait_next = NULL;
}

/* Join the lookup of this key in flight, or start one (after charging the
 * client's address for it).  TG_OK: decided now; TG_AGAIN: cb later. */
static tg_rc
key_store_lookup(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    const tg_conf *conf = lim->conf;
    kcache_entry *e = kcache_find(lim, ctx->digest);
    kneg_entry *n = kneg_slot(lim, ctx->digest);
    uint64_t now = tg_now_ms(), h;
    char field[65], key[TG_LIMIT_KEY_MAX], net[INET6_ADDRSTRLEN + 8];
    const char *keys[1] = { key };
    tg_gcra_limit ul;
    tg_gcra_result res;
    kpend *p;

    if (e != NULL && e->expires_ms > now) {
        return identify_cached(lim, ctx, e);
    }
    if (e == NULL && n->expires_ms > now && memcmp(n->digest, ctx->digest, 32) == 0) {
        deny(ctx->out, 401, "unknown API key");
        return TG_OK;
    }
    memcpy(&h, ctx->digest + 16, sizeof(h));
    p = &lim->kpend[h & (KPEND_SLOTS - 1)];
    if (p->op != NULL && memcmp(p->digest, ctx->digest, 32) == 0) {
        tg_limit_ctx **link = &p->waiters;       /* one HGET per key */

        while (*link != NULL) {
            link = &(*link)->kwait_next;
        }
        *link = ctx;
        ctx->kwait = p;
        ctx->kwait_next = NULL;
        return TG_AGAIN;
    }
    if (!tg_breaker_allow(&lim->breaker, now)) {
        /* Redis is out: a stale entry speaks for its key, else 503. */
        if (e != NULL) {
            return identify_cached(lim, ctx, e);
        }
        store_down(ctx, "API key store unavailable");
        return TG_OK;
    }
    /* Lookups per client address (auth.unknown_key_limit). */
    client_net(conf, ctx->ip, net, sizeof(net));
    snprintf(key, sizeof(key), "%s{lookup:%s}:u", lim->sconf->redis.prefix, net);
    ul = tg_gcra_per_minute(conf->auth.unknown_key_limit.requests_per_minute,
                            conf->auth.unknown_key_limit.burst_limit);
    local_charge(keys, &ul, 1, 1, &res);
    if (!res.allowed) {
        tg_breaker_abandon(&lim->breaker, now);
        if (e != NULL) {
            return identify_cached(lim, ctx, e);  /* known, if not fresh */
        }
        ctx->out->status = 429;
        ctx->out->error = "too many unknown API keys from this address";
        ctx->out->retry_s = ceil_s(res.retry_us) ? ceil_s(res.retry_us) : 1;
        return TG_OK;
    }
    tg_keys_hex(ctx->digest, field);
    snprintf(key, sizeof(key), "%skeys", lim->sconf->redis.prefix);
    if (p->op != NULL) {
        /* The slot serves another key: this one is looked up on its own. */
        ctx->op_charge = 0;
        ctx->op = tg_redis_hget(lim->redis, key, field, key_store_single, ctx);
        tg_redis_op_deadline(ctx->op, ctx->deadline_us);
        return TG_AGAIN;
    }
    p->lim = lim;
    memcpy(p->digest, ctx->digest, 32);
    p->waiters = ctx;
    ctx->kwait = p;
    ctx->kwait_next = NULL;
    p->op = tg_redis_hget(lim->redis, key, field, key_store_done, p);
    tg_redis_op_deadline(p->op, ctx->deadline_us);
    return TG_AGAIN;
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
