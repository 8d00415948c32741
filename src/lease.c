/*
 * lease.c - leases, a part of the charge stage (store: redis,
 * rate_limits.<tier>.lease): a worker takes a slice of tokens from Redis
 * in one charge and spends it without a call; what is left at the
 * lease's ttl, a reload or shutdown goes back to Redis.  Per worker; runs
 * on the worker's thread only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "limiter_int.h"
#include "tollgate/redis.h"

#define LEASE_SLOTS        256         /* leases held per worker */

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
    uint64_t      seen_hash;      /* the last set that asked for a slice here */
    uint64_t      seen_us;        /* ... when */
    size_t        n;
    tg_gcra_limit limits[TG_LIMIT_MAX_BUCKETS];
    char          keys[TG_LIMIT_MAX_BUCKETS][TG_LIMIT_KEY_MAX];
} lease_entry;

/* Unused lease tokens on their way back to Redis: sent together, at the
 * worker's next sample (50 ms), before its next charge, or when full. */
typedef struct give_buf {
    size_t   n;
    uint64_t hash[TG_REDIS_GIVE_MAX];         /* key_hash of keys[i] */
    uint64_t amount_us[TG_REDIS_GIVE_MAX];
    uint64_t p_us[TG_REDIS_GIVE_MAX];
    char     keys[TG_REDIS_GIVE_MAX][TG_LIMIT_KEY_MAX];
} give_buf;

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
void
tg_lease_give_flush(struct tg_limiter *lim, int now)
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

/*
 * Before a charge of ctx goes out: the give-backs queued for any of its
 * buckets go first, on the same connection, so Redis applies them before
 * the charge.  Give-backs for other buckets wait for the worker's next
 * sample (50 ms) or a full buffer and go in one call: flushing them
 * before every charge made nearly one extra script call per request
 * when many keys each met a lease once (loadtest/bench, 10,000 keys).
 * Waiting only delays tokens coming back: never more admitted.
 */
void
tg_lease_give_flush_for(struct tg_limiter *lim, const tg_limit_ctx *ctx)
{
    const give_buf *g = lim->give;

    if (g == NULL || g->n == 0) {
        return;
    }
    for (size_t i = 0; i < ctx->n; i++) {
        uint64_t h = key_hash(ctx->keys[i], 0);

        for (size_t j = 0; j < g->n; j++) {
            if (g->hash[j] == h && strcmp(g->keys[j], ctx->keys[i]) == 0) {
                tg_lease_give_flush(lim, 0);
                return;
            }
        }
    }
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
        tg_lease_give_flush(lim, 0);
    }
    snprintf(g->keys[g->n], sizeof(g->keys[0]), "%s", key);
    g->hash[g->n] = key_hash(g->keys[g->n], 0);
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
            tg_dcache_forget(lim, e->keys[i]);
        }
    }
    e->expires_us = 0;
    e->tokens = 0;
}

/* Every lease back to Redis (reload, shutdown; only the expired ones when
 * now != 0); at_exit: written at once (the loop has stopped). */
void
tg_lease_give_back_all(struct tg_limiter *lim, uint64_t now, int at_exit)
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
    tg_lease_give_flush(lim, at_exit);
}

/* 1 (out filled: allowed) when ctx's cost is spent from a live lease. */
int
tg_lease_spend(struct tg_limiter *lim, tg_limit_ctx *ctx)
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
    tg_limit_policy(out, l, ctx->factor);
    out->remaining = e->remaining + e->tokens < l->burst ? e->remaining + e->tokens : l->burst;
    out->reset_s = ceil_s(reset > now ? reset - now : 0);
    out->status = TG_LIMIT_ALLOWED;
    out->retry_s = 0;
    return 1;
}

/*
 * Mark a take for ctx's set; 0 when this request is charged exactly: a
 * take is in flight already (this set's or another's in the slot), or
 * the set is not seen again within its ttl (ctx->lease_ttl_ms).  A slice
 * pays only when a second request of the set comes while it lives: with
 * many keys each met about once per ttl (10,000 keys), a slice per first
 * request charged N tokens to serve one request and cost a give-back call
 * later, and evicted a busy key's slice from the slot.  So the first
 * request of a set is charged exactly and only marks the slot; a second
 * within the ttl takes the slice, and so does the next request of a set
 * whose slice ran out within the ttl.
 */
int
tg_lease_begin(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    uint64_t h = lease_hash(ctx), now = tg_now_us();
    uint64_t ttl = (uint64_t)ctx->lease_ttl_ms * 1000;
    lease_entry *e = lease_slot(lim, ctx, h);
    int again;

    if (e->taking) {
        return 0;
    }
    again = (e->seen_hash == h && now - e->seen_us <= ttl)
            || (e->taken_us != 0 && now - e->taken_us <= ttl && lease_match(e, ctx, h));
    e->seen_hash = h;
    e->seen_us = now;
    if (!again) {
        return 0;
    }
    if (!lease_match(e, ctx, h)) {
        lease_give_back(lim, e);       /* a collision: the older set goes */
        e->taken_us = 0;
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
void
tg_lease_end(struct tg_limiter *lim, tg_limit_ctx *ctx)
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
void
tg_lease_install(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_gcra_result *res,
              uint32_t ln)
{
    uint64_t h = lease_hash(ctx);
    lease_entry *e = lease_slot(lim, ctx, h);

    if (!lease_match(e, ctx, h)) {
        return;                        /* cannot happen: the slot was marked */
    }
    TG_ASSERT(e->taking && ln > ctx->cost);
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
uint32_t
tg_lease_size(const tg_tier_conf *tier, const tg_limit_ctx *ctx)
{
    uint32_t ln = tier->lease_size;

    for (size_t i = 0; i < ctx->n && ln > 0; i++) {
        if (ctx->limits[i].burst < ln) {
            ln = ctx->limits[i].burst;
        }
    }
    return ln > ctx->cost ? ln : 0;
}
