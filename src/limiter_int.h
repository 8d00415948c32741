/*
 * limiter_int.h - what the stages of the limiter share (private to
 * limiter.c, identify.c; not for other modules).
 *
 * The limiter of one worker is ONE object, struct tg_limiter, created,
 * reloaded and destroyed by limiter.c on the worker's thread; every stage
 * runs on that thread and reads or writes its part of it:
 *   identify.c  the key store caches (kcache, kneg, kpend);
 *   route.c     nothing (pure: conf in, buckets out);
 *   limiter.c   the rest: breaker, Redis client, deny cache, leases.
 */
#ifndef TOLLGATE_LIMITER_INT_H
#define TOLLGATE_LIMITER_INT_H

#include <stdint.h>

#include "tollgate/breaker.h"
#include "tollgate/limiter.h"

struct kcache_entry;
struct kneg_entry;
struct kpend;
struct dcache_entry;
struct lease_entry;
struct give_buf;

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
    struct kcache_entry *kcache;    /* auth.redis_keys: KCACHE_SETS * WAYS (identify.c) */
    struct kneg_entry  *kneg;       /* KNEG_SLOTS */
    struct kpend       *kpend;      /* KPEND_SLOTS */
    struct dcache_entry *dcache;    /* store: redis: DCACHE_SLOTS, lazily */
    struct lease_entry *leases;     /* LEASE_SLOTS, lazily (a tier with a lease) */
    struct give_buf    *give;       /* ... and its give-backs not sent yet */
    struct tg_metrics_shard *shard; /* may be NULL */
    uint64_t            last_fail_ms;   /* a batch fails all its charges at once */
    uint64_t            seen_timeouts;  /* tg_redis_stats already counted */
    uint64_t            seen_noscript;
};

/* ---- identify.c ------------------------------------------------------ */

/*
 * The identify stage of ctx's request req from client_ip: the consumer
 * and tier into ctx->out, then on to tg_limiter_charge.  TG_OK: decided
 * (out filled; 401/403/429/503 without a charge); TG_AGAIN: ctx->cb will
 * be called (a key-store lookup or a charge in flight).
 */
tg_rc tg_identify(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_http_req *req,
                  const char *client_ip);

/* ctx is gone while waiting for a key-store lookup: leave its waiters
 * (the lookup itself goes on and fills the cache). */
void tg_identify_cancel(tg_limit_ctx *ctx);

/* ---- limiter.c ------------------------------------------------------- */

/* Route, buckets and charge of ctx, once identify has filled the consumer
 * and tier in ctx->out.  TG_OK: decided; TG_AGAIN: ctx->cb later. */
tg_rc tg_limiter_charge(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_http_req *req);

/* 503 + Retry-After into ctx->out: the store cannot be asked (why). */
void tg_limiter_store_down(tg_limit_ctx *ctx, const char *why);

/* Charge n buckets of the process's in-process store (never Redis). */
void tg_limiter_local_charge(const char *const *keys, const tg_gcra_limit *lim,
                             size_t n, uint32_t cost, tg_gcra_result *res);

/* ---- shared helpers -------------------------------------------------- */

/* Decided without the rate-limit headers: status, why. */
static inline void
tg_limit_deny(tg_limit_outcome *out, int status, const char *why)
{
    out->status = status;
    out->error = why;
    out->limited = 0;
}

/* Microseconds to whole seconds, rounded up (never early), capped. */
static inline uint32_t
ceil_s(uint64_t us)
{
    uint64_t s = (us + 999999) / 1000000;
    return s > UINT32_MAX ? UINT32_MAX : (uint32_t)s;
}

#endif
