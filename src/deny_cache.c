/*
 * deny_cache.c - the deny cache, a part of the charge stage (store: redis):
 * a request one of whose buckets this worker knows to be empty for its
 * cost is answered 429 here, without a Redis call (docs/DESIGN-NOTES.md,
 * "The deny cache").  Per worker; runs on the worker's thread only.
 */
#include <stdio.h>
#include <string.h>

#include "limiter_int.h"

#define DCACHE_SLOTS       2048        /* deny cache: buckets per worker */

/*
 * The deny cache (store: redis), per worker, direct-mapped: the TAT of a
 * bucket as a Redis answer showed it (never later than the TAT Redis
 * holds).  Only consumption moves a TAT later; what moves it earlier is
 * handled in docs/DESIGN-NOTES.md ("The deny cache").  A request one of
 * whose buckets is known empty for its cost is answered 429 here.
 */
typedef struct dcache_entry {
    tg_gcra_limit lim;            /* the limits it was learnt under */
    char          key[TG_LIMIT_KEY_MAX];
} dcache_entry;

/*
 * The TATs apart from the entries: every request looks its buckets up,
 * and almost every slot is empty (only refused buckets enter), so the
 * lookup reads 8 bytes of a 16 KiB array that stays in cache, not the
 * first line of a 200-byte entry of a 400 KiB table (a cache miss per
 * bucket per request, measured).  Entry i is valid when tat[i] != 0.
 */
struct dcache {
    uint64_t     tat[DCACHE_SLOTS];     /* local clock; 0 = empty */
    dcache_entry e[DCACHE_SLOTS];
};

static size_t
dcache_slot(struct tg_limiter *lim, const char *key)
{
    if (lim->dcache == NULL) {
        lim->dcache = tg_xcalloc(1, sizeof(*lim->dcache));
    }
    return key_hash(key, 14695981039346656037ull) & (DCACHE_SLOTS - 1);
}

/* The TAT known for key under limit l (0: none). */
static uint64_t
dcache_tat(struct tg_limiter *lim, const char *key, const tg_gcra_limit *l)
{
    size_t i = dcache_slot(lim, key);
    const dcache_entry *e = &lim->dcache->e[i];
    uint64_t tat = lim->dcache->tat[i];

    if (tat == 0 || !limit_eq(&e->lim, l) || strcmp(e->key, key) != 0) {
        return 0;
    }
    return tat;
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
void
tg_dcache_learn(struct tg_limiter *lim, const tg_limit_ctx *ctx, const tg_gcra_result *res)
{
    int cluster = lim->sconf->redis.ncluster_nodes > 0;

    for (size_t i = 0; i < ctx->n; i++) {
        const tg_gcra_limit *l = &ctx->limits[i];
        dcache_entry *e;
        size_t k;
        int known;

        if (!res->allowed && cluster && (int)i != res->limiting) {
            continue;
        }
        k = dcache_slot(lim, ctx->keys[i]);
        e = &lim->dcache->e[k];
        known = lim->dcache->tat[k] != 0 && strcmp(e->key, ctx->keys[i]) == 0;
        if (!known && (res->allowed
                       || res->held_us[i] + (uint64_t)ctx->cost * l->interval_us
                          <= (uint64_t)l->burst * l->interval_us)) {
            continue;
        }
        if (!known) {
            snprintf(e->key, sizeof(e->key), "%s", ctx->keys[i]);
        }
        e->lim = *l;
        lim->dcache->tat[k] = res->held_us[i] > 0 ? ctx->started_us + res->held_us[i] : 0;
    }
}

/* Forget ctx's buckets (a charge of it may be given back by redis.c). */
void
tg_dcache_forget(struct tg_limiter *lim, const char *key)
{
    size_t k;

    if (lim->dcache == NULL) {
        return;
    }
    k = dcache_slot(lim, key);
    if (lim->dcache->tat[k] != 0 && strcmp(lim->dcache->e[k].key, key) == 0) {
        lim->dcache->tat[k] = 0;
    }
}

/* 1 (res filled: refused) when a bucket of ctx is known empty for its
 * cost: the same arithmetic as the script over the TATs known (unknown
 * buckets count as full), so the headers are those Redis would give. */
int
tg_dcache_deny(struct tg_limiter *lim, const tg_limit_ctx *ctx, tg_gcra_result *res)
{
    uint64_t tat[TG_LIMIT_MAX_BUCKETS], now = tg_now_us();
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
    tg_gcra_charge(ctx->limits, tat, NULL, ctx->n, ctx->cost, now, res);
    return !res->allowed;
}


void
tg_dcache_clear(struct tg_limiter *lim)
{
    if (lim->dcache != NULL) {
        memset(lim->dcache, 0, sizeof(*lim->dcache));
    }
}
