/*
 * limiter_int.h - what the stages of the limiter share (private to
 * limiter.c, identify.c, deny_cache.c, lease.c; not for other modules).
 *
 * The limiter of one worker is ONE object, struct tg_limiter, created by
 * limiter.c while the worker is set up, then used and reloaded only on
 * the worker's thread; every stage reads or writes its part of it:
 *   identify.c  the key store caches (kcache, kneg, kpend);
 *   route.c     nothing (pure: conf in, buckets out);
 *   limiter.c   the charge: breaker, Redis client, local store, fallback;
 *   deny_cache.c  and lease.c  their tables (dcache; leases and give).
 */
#ifndef TOLLGATE_LIMITER_INT_H
#define TOLLGATE_LIMITER_INT_H

#include <stdint.h>

#include "tollgate/breaker.h"
#include "tollgate/limiter.h"
#include "tollgate/throttle.h"

struct kcache_entry;
struct kneg_entry;
struct kpend;
struct dcache;
struct lease_table;
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
    struct dcache      *dcache;     /* store: redis: DCACHE_SLOTS, lazily */
    struct lease_table *leases;     /* lease.c, lazily (a tier with a lease) */
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

/* Charge n buckets of the process's in-process store (never Redis); none
 * of them is the global bucket. */
void tg_limiter_local_charge(const char *const *keys, const tg_gcra_limit *lim,
                             size_t n, uint32_t cost, tg_gcra_result *res);

/* ---- deny_cache.c ---------------------------------------------------- */

/* Learn the TATs of ctx's buckets from a Redis answer res to it. */
void tg_dcache_learn(struct tg_limiter *lim, const tg_limit_ctx *ctx,
                     const tg_gcra_result *res);

/* Forget key's bucket (a charge of it may be given back by redis.c). */
void tg_dcache_forget(struct tg_limiter *lim, const char *key);

/* 1 (res filled: refused, as Redis would answer) when a bucket of ctx is
 * known empty for its cost; 0: ask Redis. */
int tg_dcache_deny(struct tg_limiter *lim, const tg_limit_ctx *ctx, tg_gcra_result *res);

/* Forget everything (a reload: limits may change). */
void tg_dcache_clear(struct tg_limiter *lim);

/* ---- lease.c --------------------------------------------------------- */

/* The lease size for ctx under tier: 0 (exact) when off or not above cost. */
uint32_t tg_lease_size(const tg_tier_conf *tier, const tg_limit_ctx *ctx);

/* 1 (ctx->out filled: allowed) when ctx's cost is spent from a live lease
 * (ctx->lease_ttl_ms set: the set's mark lives that long again). */
int tg_lease_spend(struct tg_limiter *lim, tg_limit_ctx *ctx);

/* Mark a take for ctx's bucket set; 0: charge ctx exactly instead. */
int tg_lease_begin(struct tg_limiter *lim, tg_limit_ctx *ctx);

/* The take of ctx ended (answered or not); ctx->lease_n = 0. */
void tg_lease_end(struct tg_limiter *lim, tg_limit_ctx *ctx);

/* A take of ln tokens passed (res): the rest is spendable until its ttl. */
void tg_lease_install(struct tg_limiter *lim, tg_limit_ctx *ctx,
                      const tg_gcra_result *res, uint32_t ln);

/* Every lease back to Redis (only the expired ones when now != 0);
 * at_exit: written at once (the loop has stopped). */
void tg_lease_give_back_all(struct tg_limiter *lim, uint64_t now, int at_exit);

/* The lease table's memory (after tg_lease_give_back_all). */
void tg_lease_free(struct tg_limiter *lim);

/* Send the give-backs queued; now: write them at once (shutdown). */
void tg_lease_give_flush(struct tg_limiter *lim, int now);
void tg_lease_give_flush_for(struct tg_limiter *lim, const tg_limit_ctx *ctx);

/* ---- shared helpers -------------------------------------------------- */

/* Decided without the rate-limit headers: status, why. */
static inline void
tg_limit_deny(tg_limit_outcome *out, enum tg_limit_status status, const char *why)
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

/* FNV-1a: bucket keys are ours (prefix + consumer id), a collision only
 * costs a Redis call (an entry is checked by its whole key). */
static inline uint64_t
key_hash(const char *s, uint64_t h)
{
    for (; *s != '\0'; s++) {
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    }
    return h;
}

/*
 * The policy of bucket l in the headers, into out: quota and window.  l
 * holds the interval throttled by factor (permille; limiter.c divides it,
 * rounding up, so multiplying back and rounding down gives the configured
 * one exactly): the window stays the configured one and the quota is what
 * a client gets over it now, burst * factor rounded down, at least 1.
 */
static inline void
tg_limit_policy(tg_limit_outcome *out, const tg_gcra_limit *l, uint32_t factor)
{
    uint64_t t = l->interval_us;
    uint64_t q = l->burst;

    if (factor > 0 && factor < TG_THROTTLE_ONE) {
        t = t * factor / TG_THROTTLE_ONE;
        q = q * factor / TG_THROTTLE_ONE;
        q = q > 0 ? q : 1;
    }
    out->quota = (uint32_t)q;
    out->window_s = ceil_s(t * l->burst);
}

static inline int
limit_eq(const tg_gcra_limit *a, const tg_gcra_limit *b)
{
    return a->interval_us == b->interval_us && a->burst == b->burst;
}

#endif
