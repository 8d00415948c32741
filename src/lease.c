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

/*
 * The lease table of a worker: set associative, LEASE_WAYS entries a set,
 * the set chosen by the top bits of the set's hash (Fibonacci hashing).
 * It starts at LEASE_MIN_SETS sets and doubles when a live entry (a mark
 * or a slice still within its ttl, see lease_victim) would be evicted
 * and at least 1/8 of the entries are in use (a few bucket sets that
 * share a set of ways, by chance or chosen, do not grow it), up to
 * LEASE_MAX_SLICES entries; else the entry that ends first goes (its
 * slice given back).  Doubling splits each set in two, so the move
 * never overflows a set.  The sample's walk for expired slices is
 * bounded: a table of more than LEASE_SWEEP_ALL entries is walked a
 * 1/LEASE_SWEEP_DIV part per sample (the whole every 16 x 50 ms).
 */
#define LEASE_WAYS         8
#define LEASE_MIN_SETS     32          /* 256 entries at the first lease */
#define LEASE_MAX_SLICES   65536       /* entries per worker, at most */
#define LEASE_SWEEP_ALL    1024
#define LEASE_SWEEP_DIV    16

/*
 * A lease (rate_limits.<tier>.lease), per worker: a slice of `size` tokens
 * charged to every bucket of one bucket set (tier + route + global of one
 * consumer and route) in Redis, spent here without a call; what is left
 * at its ttl (or a reload, or shutdown) is given back.  An entry without
 * a slice is a mark: the set asked within its ttl (the next request takes
 * a slice).  128 bytes (two cache lines), and the bucket names on the
 * heap (kept for the entry's next set: no allocation per take once the
 * table is warm).  Its set's hash is in the table's hash array.
 */
typedef struct lease_entry {
    uint64_t      until_us;       /* live until: the set's last ask + ttl,
                                     or its slice's end, whichever is later */
    uint64_t      expires_us;     /* 0 = no slice */
    uint64_t      reset_at_us;    /* the take's answer: full at (our clock) */
    int64_t       skew_us;        /* Redis's clock - ours, at most (the
                                     take's answer: Redis read its clock
                                     before we got it) */
    uint64_t      p_us[TG_LIMIT_MAX_BUCKETS];   /* TATs the take wrote (Redis clock) */
    tg_gcra_limit limits[TG_LIMIT_MAX_BUCKETS];
    uint32_t      tokens;         /* left to spend */
    uint32_t      remaining;      /* the take's answer: tokens left in Redis */
    char         *names;          /* the n bucket keys, each NUL-terminated,
                                     back to back (heap, names_cap bytes) */
    uint16_t      names_cap;
    int8_t        limiting;       /* the take's tightest bucket */
    uint8_t       taking;         /* a take for this set is in flight */
    uint8_t       n;              /* buckets; 0: a mark only (no names yet) */
} lease_entry;

_Static_assert(LEASE_WAYS * sizeof(uint64_t) == 64, "a set's hashes: one cache line");

struct lease_table {
    uint64_t    *h;               /* nsets * LEASE_WAYS: the hash of e[i]'s
                                     set (lease_hash), 0 = free; a set's
                                     ways in one cache line */
    lease_entry *e;               /* nsets * LEASE_WAYS */
    size_t       nsets;           /* a power of two */
    unsigned     shift;           /* 64 - log2(nsets) */
    size_t       sweep;           /* the sample's walk: next entry */
    size_t       used;            /* entries ever taken (h[i] != 0) */
};

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
    return h != 0 ? h : 1;             /* 0 marks a free entry */
}

/* n zeroed entries of size bytes (a multiple of 64) on cache lines of
 * their own; unaligned only if aligned_alloc fails (tg_xcalloc: fatal if
 * that fails too). */
static void *
lease_calloc(size_t n, size_t size)
{
    void *p = aligned_alloc(64, n * size);

    if (p == NULL) {
        return tg_xcalloc(n, size);
    }
    memset(p, 0, n * size);
    return p;
}

static struct lease_table *
lease_table(struct tg_limiter *lim)
{
    struct lease_table *t = lim->leases;

    if (t == NULL) {
        t = tg_xcalloc(1, sizeof(*t));
        t->nsets = LEASE_MIN_SETS;
        t->shift = 64;
        for (size_t n = t->nsets; n > 1; n >>= 1) {
            t->shift--;
        }
        t->h = lease_calloc(t->nsets * LEASE_WAYS, sizeof(*t->h));
        t->e = lease_calloc(t->nsets * LEASE_WAYS, sizeof(*t->e));
        lim->leases = t;
        lim->give = tg_xcalloc(1, sizeof(*lim->give));
    }
    return t;
}

/* The index of the first way of hash h's set. */
static size_t
lease_set(const struct lease_table *t, uint64_t h)
{
    return (size_t)((h * 0x9e3779b97f4a7c15ull) >> t->shift) * LEASE_WAYS;
}

/* The entry of the set of hash h, or NULL. */
static lease_entry *
lease_find(const struct lease_table *t, uint64_t h)
{
    size_t i = lease_set(t, h);

    for (size_t w = 0; w < LEASE_WAYS; w++) {
        if (t->h[i + w] == h) {
            return &t->e[i + w];
        }
    }
    return NULL;
}

/* 1 when e, found by ctx's hash, is the lease of ctx's bucket set (names
 * and limits, not only the hash). */
static int
lease_match(const lease_entry *e, const tg_limit_ctx *ctx)
{
    const char *p = e->names;

    if (e->n != ctx->n) {
        return 0;
    }
    for (size_t i = 0; i < ctx->n; i++) {
        if (!limit_eq(&e->limits[i], &ctx->limits[i]) || strcmp(p, ctx->keys[i]) != 0) {
            return 0;
        }
        p += strlen(p) + 1;
    }
    return 1;
}

/* e holds ctx's set from now on: its bucket names and limits. */
static void
lease_assign(lease_entry *e, const tg_limit_ctx *ctx)
{
    size_t len = 0, k;
    char *p;

    for (size_t i = 0; i < ctx->n; i++) {
        len += strlen(ctx->keys[i]) + 1;
    }
    if (len > e->names_cap) {
        size_t cap = (len + 63) & ~(size_t)63;

        e->names = tg_xrealloc(e->names, cap);
        e->names_cap = (uint16_t)cap;
    }
    p = e->names;
    for (size_t i = 0; i < ctx->n; i++) {
        k = strlen(ctx->keys[i]) + 1;
        memcpy(p, ctx->keys[i], k);
        p += k;
        e->limits[i] = ctx->limits[i];
    }
    e->n = (uint8_t)ctx->n;
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

/*
 * Give e's unused tokens back to Redis and empty it (a take in flight
 * for it stays marked).  Our own deny cache forgets those buckets: the
 * give-back makes them fuller than it knows.  A bucket whose TAT the take
 * wrote (P) is behind Redis's clock now gets nothing back (the refund
 * script returns at most P - now): no call for it.  Under a limit far
 * above the load that is every slice at its ttl.  Our estimate of
 * Redis's clock is not ahead of it (skew_us; but for the two clocks'
 * drift over a ttl), so a bucket skipped could not have been refunded;
 * and a give-back skipped is under-use at worst, never an admission.
 */
static void
lease_give_back(struct tg_limiter *lim, lease_entry *e)
{
    if (e->expires_us != 0 && e->tokens > 0) {
        int64_t rnow = (int64_t)tg_now_us() + e->skew_us;
        const char *p = e->names;

        for (size_t i = 0; i < e->n; i++) {
            if ((int64_t)e->p_us[i] > rnow) {
                give_add(lim, p, (uint64_t)e->tokens * e->limits[i].interval_us, e->p_us[i]);
                tg_dcache_forget(lim, p);
            }
            p += strlen(p) + 1;
        }
    }
    e->expires_us = 0;
    e->tokens = 0;
}

/*
 * The entry of set for a new bucket set: a free one, else the one whose
 * life ends first (a take in flight is never chosen); NULL when every
 * way has a take in flight.  *live: the entry chosen is still in use (a
 * mark or a slice within its ttl).
 */
static lease_entry *
lease_victim(const struct lease_table *t, size_t set, uint64_t now, int *live)
{
    lease_entry *v = NULL;

    for (size_t w = 0; w < LEASE_WAYS; w++) {
        lease_entry *e = &t->e[set + w];

        if (t->h[set + w] == 0) {
            *live = 0;
            return e;
        }
        if (!e->taking && (v == NULL || e->until_us < v->until_us)) {
            v = e;
        }
    }
    *live = v != NULL && v->until_us > now;
    return v;
}

/* Double the table: set i's entries go to sets 2i and 2i + 1 (the next
 * bit of their hash), so none overflows; names move with their entry. */
static void
lease_grow(struct lease_table *t)
{
    size_t old = t->nsets * LEASE_WAYS;
    lease_entry *from = t->e;
    uint64_t *fromh = t->h;

    t->nsets *= 2;
    t->shift--;
    t->h = lease_calloc(t->nsets * LEASE_WAYS, sizeof(*t->h));
    t->e = lease_calloc(t->nsets * LEASE_WAYS, sizeof(*t->e));
    for (size_t i = 0; i < old; i++) {
        size_t set, w = 0;

        if (fromh[i] == 0) {
            free(from[i].names);       /* a free entry's buffer */
            continue;
        }
        set = lease_set(t, fromh[i]);
        while (t->h[set + w] != 0) {
            w++;
        }
        TG_ASSERT(w < LEASE_WAYS);
        t->h[set + w] = fromh[i];
        t->e[set + w] = from[i];
    }
    t->sweep *= 2;
    free(fromh);
    free(from);
}

/* An entry for the new set of hash h (a mark, no names yet), or NULL:
 * every way of its set has a take in flight.  A live entry is evicted
 * only at the table's cap or while less than 1/8 of it is used; else the
 * table grows instead. */
static lease_entry *
lease_insert(struct tg_limiter *lim, struct lease_table *t, uint64_t h, uint64_t now)
{
    lease_entry *e;
    int live;

    for (;;) {
        e = lease_victim(t, lease_set(t, h), now, &live);
        if (e == NULL) {
            return NULL;
        }
        if (!live || t->nsets * LEASE_WAYS >= LEASE_MAX_SLICES
            || t->used < t->nsets * LEASE_WAYS / 8) {
            break;
        }
        lease_grow(t);
    }
    lease_give_back(lim, e);           /* an evicted slice's leftovers */
    if (t->h[e - t->e] == 0) {
        t->used++;
    }
    t->h[e - t->e] = h;
    e->n = 0;
    e->until_us = 0;
    return e;
}

/* Every lease back to Redis (reload, shutdown; only the expired ones when
 * now != 0, from a bounded part of a large table: the sample's walk);
 * at_exit: written at once (the loop has stopped). */
void
tg_lease_give_back_all(struct tg_limiter *lim, uint64_t now, int at_exit)
{
    struct lease_table *t = lim->leases;
    size_t total, visit;

    if (t == NULL || lim->redis == NULL) {
        return;
    }
    total = t->nsets * LEASE_WAYS;
    visit = now == 0 || total <= LEASE_SWEEP_ALL ? total : total / LEASE_SWEEP_DIV;
    for (size_t k = 0; k < visit; k++) {
        lease_entry *e = &t->e[(t->sweep + k) & (total - 1)];

        if (e->expires_us != 0 && (now == 0 || now >= e->expires_us)) {
            lease_give_back(lim, e);
        }
    }
    t->sweep = (t->sweep + visit) & (total - 1);
    tg_lease_give_flush(lim, at_exit);
}

/* The table's memory (the limiter is going away; give back first). */
void
tg_lease_free(struct tg_limiter *lim)
{
    struct lease_table *t = lim->leases;

    if (t != NULL) {
        for (size_t i = 0; i < t->nsets * LEASE_WAYS; i++) {
            free(t->e[i].names);
        }
        free(t->h);
        free(t->e);
        free(t);
        lim->leases = NULL;
    }
    free(lim->give);
    lim->give = NULL;
}

/* 1 (out filled: allowed) when ctx's cost is spent from a live lease.
 * Any request of a set with a slice keeps its mark alive: when the slice
 * ends, the next request takes a new one at once. */
int
tg_lease_spend(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    uint64_t h = lease_hash(ctx), now = tg_now_us(), reset;
    uint64_t until = now + (uint64_t)ctx->lease_ttl_ms * 1000;
    lease_entry *e = lease_find(lease_table(lim), h);
    tg_limit_outcome *out = ctx->out;
    const tg_gcra_limit *l;
    int i;

    if (e == NULL || e->expires_us == 0 || !lease_match(e, ctx)) {
        return 0;
    }
    if (until > e->until_us) {
        e->until_us = until;
    }
    if (now >= e->expires_us || e->tokens < ctx->cost) {
        lease_give_back(lim, e);
        return 0;
    }
    e->tokens -= ctx->cost;
    /* Headers: the bucket as the take left it, plus the slice in hand. */
    i = e->limiting >= 0 && (size_t)e->limiting < ctx->n ? e->limiting : 0;
    l = &ctx->limits[i];
    reset = e->reset_at_us;
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
 * take is in flight already, or the set did not ask within its ttl
 * (ctx->lease_ttl_ms).  A slice pays only when a second request of the
 * set comes while it lives: with many keys each met about once per ttl
 * (10,000 keys), a slice per first request charged N tokens to serve one
 * request and cost a give-back call later.  So the first request of a
 * set is charged exactly and only leaves a mark (an entry without a
 * slice); a request within the ttl of the set's last one takes the
 * slice, and so does the next request of a set whose slice ran out or
 * ended while it was in use.
 */
int
tg_lease_begin(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    uint64_t h = lease_hash(ctx), now = tg_now_us();
    uint64_t until = now + (uint64_t)ctx->lease_ttl_ms * 1000;
    struct lease_table *t = lease_table(lim);
    lease_entry *e = lease_find(t, h);
    int again;

    if (e == NULL) {
        e = lease_insert(lim, t, h, now);
        if (e != NULL) {
            e->until_us = until;
        }
        return 0;
    }
    if (e->taking) {
        return 0;
    }
    again = now <= e->until_us;
    if (until > e->until_us) {
        e->until_us = until;
    }
    if (!again) {
        return 0;
    }
    if (!lease_match(e, ctx)) {
        lease_give_back(lim, e);       /* a mark, or (64-bit collision) another set */
        lease_assign(e, ctx);
    }
    e->taking = 1;
    return 1;
}

/* The take of ctx ended (answered or not). */
void
tg_lease_end(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    uint64_t h = lease_hash(ctx);
    lease_entry *e = lease_find(lease_table(lim), h);

    if (e != NULL && lease_match(e, ctx)) {
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
    lease_entry *e = lease_find(lease_table(lim), h);

    if (e == NULL || !lease_match(e, ctx)) {
        return;                        /* cannot happen: a take's entry stays */
    }
    TG_ASSERT(e->taking && ln > ctx->cost);
    lease_give_back(lim, e);           /* leftovers of an older slice */
    for (size_t i = 0; i < ctx->n; i++) {
        e->p_us[i] = res->now_us > 0 ? res->now_us + res->held_us[i] : 0;
    }
    e->tokens = ln - ctx->cost;
    e->remaining = res->remaining;
    e->reset_at_us = ctx->started_us + res->reset_us;
    e->limiting = (int8_t)res->limiting;
    e->skew_us = res->now_us > 0 ? (int64_t)(res->now_us - tg_now_us()) : 0;
    e->expires_us = tg_now_us() + (uint64_t)ctx->lease_ttl_ms * 1000;
    if (e->expires_us > e->until_us) {
        e->until_us = e->expires_us;
    }
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
