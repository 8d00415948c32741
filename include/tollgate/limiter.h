/*
 * limiter.h - the identify -> route -> charge stages of the request path.
 *
 * One limiter per worker thread.  For each request it finds the API key
 * (X-API-Key or the configured header, or Authorization: Bearer), looks
 * it up by SHA-256, picks the route rule, and charges the key's tier
 * bucket, the route bucket (if the rule has a limit) and the global bucket
 * in ONE atomic store call: Redis (async, batched per loop turn) or the
 * in-process store.  When Redis fails, redis.on_failure decides: the local
 * buckets, allow, or deny (503).
 *
 * The caller owns a tg_limit_ctx per in-flight request (embedded in its
 * connection object): no allocation per request.
 *
 * One module, one stage per file: limiter.c (this API and the charge),
 * identify.c, route.c (route.h: pure), deny_cache.c and lease.c; what they
 * share is src/limiter_int.h (docs/ARCHITECTURE-limiter.md).
 */
#ifndef TOLLGATE_LIMITER_H
#define TOLLGATE_LIMITER_H

#include <event2/event.h>

#include "tollgate/breaker.h"
#include "tollgate/common.h"
#include "tollgate/conf.h"
#include "tollgate/gcra.h"
#include "tollgate/http.h"
#include "tollgate/keys.h"
#include "tollgate/route.h"

struct tg_limiter;
struct tg_redis_op;

/* The limiter's decision for one request: allowed, or refused with the
 * HTTP status of the answer (each value is that status code). */
enum tg_limit_status {
    TG_LIMIT_ALLOWED      = 0,
    TG_LIMIT_UNAUTHORIZED = 401,  /* no API key, or an unknown one */
    TG_LIMIT_FORBIDDEN    = 403,  /* key disabled, or its tier not configured */
    TG_LIMIT_LIMITED      = 429,  /* over a limit (or too many unknown keys) */
    TG_LIMIT_UNAVAILABLE  = 503,  /* the store cannot be asked (on_failure) */
};

/* What the limiter decided for one request. */
typedef struct tg_limit_outcome {
    enum tg_limit_status status;
    const char *error;            /* short reason when refused */
    int      limited;             /* rate-limit headers apply */
    char     consumer[TG_KEY_ID_MAX + 48];   /* key id, or "anon:<ip>" */
    char     tier[TG_TIER_MAX + 1];
    char     policy[TG_TIER_MAX + 1];   /* limiting bucket: tier/route name or "global" */
    uint32_t quota;               /* its burst */
    uint32_t window_s;            /* its burst * interval, seconds (ceil) */
    uint32_t remaining;
    uint32_t reset_s;             /* seconds until full again (ceil) */
    uint32_t retry_s;             /* 429/503: seconds to wait (ceil, never early) */
    int      fallback;            /* decided without Redis (policy on_failure) */
    int      route;               /* index of the matched route rule, or -1 */
    uint32_t cost;                /* tokens charged (when allowed) */
} tg_limit_outcome;

typedef void (*tg_limit_cb)(void *arg);

/* Per-request state, owned by the caller; opaque in use. */
typedef struct tg_limit_ctx {
    struct tg_limiter  *lim;
    tg_limit_outcome   *out;
    tg_limit_cb         cb;
    void               *arg;
    struct tg_redis_op *op;                        /* pending Redis call */
    int                 op_charge;                 /* op is a charge (breaker) */
    uint64_t            started_us;                /* for the Redis latency */
    uint64_t            deadline_us;               /* of all its Redis calls */
    void               *kwait;                     /* key lookup waited on */
    struct tg_limit_ctx *kwait_next;               /* ... its next waiter */
    const tg_http_req  *req;                       /* during a key-store lookup */
    const char         *ip;                        /* ... and the client's address */
    uint8_t             digest[32];                /* the key, hashed */
    size_t              n;
    uint32_t            cost;
    uint32_t            lease_n;                   /* a lease take in flight:
                                                      tokens asked (0: exact) */
    uint32_t            lease_ttl_ms;              /* ... kept this long */
    uint32_t            factor;                    /* throttle factor in limits[]
                                                      (permille, throttle.h) */
    tg_gcra_limit       limits[TG_LIMIT_MAX_BUCKETS];
    char                names[TG_LIMIT_MAX_BUCKETS][TG_TIER_MAX + 1];
    char                keys[TG_LIMIT_MAX_BUCKETS][TG_LIMIT_KEY_MAX];
} tg_limit_ctx;

/*
 * Create the limiter of one worker.  keys may be NULL (no keys file).
 * Takes a reference on conf and on keys.  Starts the
 * worker's Redis connection when store is redis.  NULL + err on failure.
 */
struct tg_limiter *tg_limiter_create(struct event_base *base, tg_conf *conf,
                                     struct tg_keys *keys,
                                     char *err, size_t errlen);

/*
 * Apply a reloaded configuration and keys set (SIGHUP): tiers, routes,
 * auth and the global limit take effect for the next request; requests
 * in flight are unaffected (their context holds copies).  The store
 * (kind and Redis address) stays as started.  Takes references.
 */
void tg_limiter_reload(struct tg_limiter *lim, tg_conf *conf, struct tg_keys *keys);
void tg_limiter_destroy(struct tg_limiter *lim);

/* 1 when the bucket store answers requests (always, unless store: redis
 * and the worker's connection is not up or its breaker is not closed:
 * then requests get the on_failure policy). */
int tg_limiter_store_ready(const struct tg_limiter *lim);

/* 1 when requests are identified and charged at all (keys file or an
 * anonymous tier configured); 0: a plain proxy. */
int tg_limiter_enabled(const struct tg_limiter *lim);

/*
 * Decide for req from client_ip.  Returns TG_OK when decided at once
 * (out filled), or TG_AGAIN when cb(arg) will be called later (from the
 * event loop, never from inside this call) with out filled.
 */
tg_rc tg_limiter_check(struct tg_limiter *lim, tg_limit_ctx *ctx,
                       const tg_http_req *req, const char *client_ip,
                       tg_limit_outcome *out, tg_limit_cb cb, void *arg);

/* The request is gone: cb will not be called. */
void tg_limiter_cancel(tg_limit_ctx *ctx);

struct tg_metrics_shard;
/* Count Redis calls and latency into the worker's metric shard. */
void tg_limiter_set_shard(struct tg_limiter *lim, struct tg_metrics_shard *shard);

/* Worker's periodic sample (every 50 ms): Redis client counters that are
 * per call (deadlines missed, NOSCRIPT recoveries) into the shard; and a
 * breaker whose open time is over is probed (a cost-0 charge) even
 * without traffic, so readiness comes back by itself. */
void tg_limiter_sample(struct tg_limiter *lim);

/* State of the Redis breaker; TG_BREAKER_NONE without Redis. */
enum tg_breaker_state tg_limiter_breaker_state(struct tg_limiter *lim);

/*
 * Format the rate-limit headers of o (RateLimit-Policy, RateLimit,
 * X-RateLimit-Limit/-Remaining/-Reset, and Retry-After for 429/503),
 * each line CRLF-terminated, into buf.  Returns the length (0 if none).
 */
size_t tg_limiter_headers(const tg_limit_outcome *o, char *buf, size_t len);

/* (identify.c) 1 if header h of req carried the API key and must not
 * reach the upstream: the key header, or the Authorization: Bearer it came from
 * (never when the limiter is off or auth.forward_key is set). */
int tg_limiter_strip_header(const struct tg_limiter *lim, const tg_http_req *req,
                            const tg_http_hdr *h);

#endif
