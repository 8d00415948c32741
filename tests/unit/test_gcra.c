/*
 * test_gcra.c - GCRA arithmetic with an injected clock: the shipped tiers
 * to the microsecond, rounding, all-or-nothing over several buckets,
 * tie-breaks, randomized properties against an exact integer token-bucket
 * reference (the configured rate is never exceeded over any window, a
 * request is never refused when tokens are there, retry_us is exact), and
 * the in-process store (same results, eviction, size, long keys, 100k keys).
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tollgate/gcra.h"

#define T0 1000000000000ULL    /* an arbitrary "now", far from 0 */

/* ---- helpers ---------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t
rng(void)
{
    /* xorshift64*: deterministic across platforms, seeded per test. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static uint64_t
rng_below(uint64_t n)
{
    return rng() % n;
}

/* Charge one bucket. */
static tg_gcra_result
charge1(tg_gcra_limit l, uint64_t *tat, uint32_t cost, uint64_t now)
{
    tg_gcra_result r;
    tg_gcra_charge(&l, tat, NULL, 1, cost, now, &r);
    return r;
}

/* The shape every tier must have: 2*burst requests at one instant, exactly
 * burst allowed with remaining counting down, retry_us == T, one more at
 * exactly now + T. */
static void
check_tier(uint32_t rpm, uint32_t burst, uint64_t expect_t)
{
    tg_gcra_limit l = tg_gcra_per_minute(rpm, burst);
    uint64_t tat = 0, saved;
    tg_gcra_result r;
    uint32_t i, allowed = 0;

    cr_assert_eq(l.interval_us, expect_t, "rpm %u: T %" PRIu64, rpm, l.interval_us);
    cr_assert_eq(l.burst, burst);
    for (i = 0; i < 2 * burst; i++) {
        saved = tat;
        r = charge1(l, &tat, 1, T0);
        if (i < burst) {
            cr_assert(r.allowed, "rpm %u request %u", rpm, i);
            cr_assert_eq(r.remaining, burst - 1 - i);
            cr_assert_eq(r.retry_us, 0);
            cr_assert_eq(r.reset_us, (uint64_t)(i + 1) * expect_t);
            cr_assert_eq(r.limiting, 0);
            allowed++;
        } else {
            cr_assert(!r.allowed, "rpm %u request %u", rpm, i);
            cr_assert_eq(r.remaining, 0);
            cr_assert_eq(r.retry_us, expect_t, "retry %" PRIu64, r.retry_us);
            cr_assert_eq(r.reset_us, (uint64_t)burst * expect_t);
            cr_assert_eq(tat, saved, "a denied request changed the bucket");
        }
    }
    cr_assert_eq(allowed, burst);

    /* One microsecond early: still denied, by exactly 1 us. */
    r = charge1(l, &tat, 1, T0 + expect_t - 1);
    cr_assert(!r.allowed);
    cr_assert_eq(r.retry_us, 1);
    /* Exactly on time: one more, then nothing. */
    r = charge1(l, &tat, 1, T0 + expect_t);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);
    r = charge1(l, &tat, 1, T0 + expect_t);
    cr_assert(!r.allowed);
    cr_assert_eq(r.retry_us, expect_t);
}

/* ---- tiers, rounding -------------------------------------------------- */

Test(gcra, tier_basic)      { check_tier(100, 20, 600000); }
Test(gcra, tier_pro)        { check_tier(500, 100, 120000); }
Test(gcra, tier_enterprise) { check_tier(1000, 200, 60000); }

Test(gcra, interval_rounds_up)
{
    cr_assert_eq(tg_gcra_per_minute(7, 1).interval_us, 8571429);  /* 8571428.57 */
    cr_assert_eq(tg_gcra_per_minute(60, 1).interval_us, 1000000);
    cr_assert_eq(tg_gcra_per_minute(1, 1).interval_us, 60000000);
    cr_assert_eq(tg_gcra_per_minute(60000000, 1).interval_us, 1);
    cr_assert_eq(tg_gcra_per_minute(4000000000u, 1).interval_us, 1);
    cr_assert_eq(tg_gcra_per_second(3, 1).interval_us, 333334);
    cr_assert_eq(tg_gcra_per_second(1000, 5).interval_us, 1000);
    cr_assert_eq(tg_gcra_per_second(1000, 5).burst, 5);
    /* Degenerate input is clamped, never a zero interval or capacity. */
    cr_assert_eq(tg_gcra_per_minute(0, 0).interval_us, 60000000);
    cr_assert_eq(tg_gcra_per_minute(0, 0).burst, 1);
    cr_assert_eq(tg_gcra_per_second(0, 3).interval_us, 1000000);
}

Test(gcra, rounding_never_exceeds_rate)
{
    /* rpm 7: after the burst, 7 more in one minute would need T <= 60/7 s;
     * with T rounded up the 7th lands just after the minute. */
    tg_gcra_limit l = tg_gcra_per_minute(7, 1);
    uint64_t tat = 0, now = T0;
    int n = 0;

    while (now <= T0 + 60000000) {
        tg_gcra_result r = charge1(l, &tat, 1, now);
        if (r.allowed) {
            n++;
            now += 1;
        } else {
            now += r.retry_us;
        }
    }
    cr_assert_eq(n, 7, "allowed %d in [0, 60 s] (burst 1 + 60 s * 7/min = 8 max)", n);
}

/* ---- cost, several buckets ------------------------------------------------ */

Test(gcra, cost_and_reset)
{
    tg_gcra_limit l = tg_gcra_per_minute(100, 20);
    uint64_t tat = 0, ttl;
    tg_gcra_result r;

    tg_gcra_charge(&l, &tat, &ttl, 1, 5, T0, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 15);
    cr_assert_eq(r.reset_us, 5 * 600000);
    cr_assert_eq(ttl, 5 * 600000);
    cr_assert_eq(tat, T0 + 5 * 600000);

    /* 2 s later: 3 tokens back (3.33), 18 available: cost 19 is denied,
     * short by 1 token minus the 0.2 s already earned. */
    tg_gcra_charge(&l, &tat, &ttl, 1, 19, T0 + 2000000, &r);
    cr_assert(!r.allowed);
    cr_assert_eq(r.remaining, 18);
    cr_assert_eq(r.retry_us, 400000);
    cr_assert_eq(r.reset_us, 1000000);
    cr_assert_eq(ttl, 1000000);
    tg_gcra_charge(&l, &tat, &ttl, 1, 19, T0 + 2400000, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);

    /* Cost 0 is a free look. */
    tg_gcra_charge(&l, &tat, &ttl, 1, 0, T0 + 2400000, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);
    cr_assert_eq(r.reset_us, 20 * 600000);
}

Test(gcra, cost_above_burst_never_passes)
{
    tg_gcra_limit l = tg_gcra_per_second(10, 5);  /* T = 100 ms */
    uint64_t tat = 0, now = T0;
    tg_gcra_result r;
    int i;

    for (i = 0; i < 5; i++) {
        r = charge1(l, &tat, 6, now);
        cr_assert(!r.allowed);
        cr_assert_eq(tat, 0);
        cr_assert_eq(r.remaining, 5);
        cr_assert_eq(r.retry_us, 100000, "(cost - burst) * T on a full bucket");
        now += r.retry_us;
    }
    /* On a bucket in debt the time to refill is added. */
    r = charge1(l, &tat, 2, now);
    cr_assert(r.allowed);
    r = charge1(l, &tat, 6, now);
    cr_assert(!r.allowed);
    cr_assert_eq(r.retry_us, 300000);
    cr_assert_eq(r.remaining, 3);
}

Test(gcra, all_or_nothing)
{
    /* Bucket 0: the minute (burst 5); bucket 1: a second burst of 2. */
    tg_gcra_limit l[2] = { tg_gcra_per_minute(60, 5), tg_gcra_per_second(2, 2) };
    uint64_t tat[2] = { 0, 0 }, ttl[2], saved[2];
    tg_gcra_result r;

    tg_gcra_charge(l, tat, ttl, 2, 1, T0, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 1);           /* min(4, 1) */
    cr_assert_eq(r.limiting, 1);
    cr_assert_eq(r.reset_us, 500000);
    cr_assert_eq(ttl[0], 1000000);
    cr_assert_eq(ttl[1], 500000);

    tg_gcra_charge(l, tat, ttl, 2, 1, T0, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);
    cr_assert_eq(r.limiting, 1);

    memcpy(saved, tat, sizeof(tat));
    tg_gcra_charge(l, tat, ttl, 2, 1, T0, &r);
    cr_assert(!r.allowed);
    cr_assert_eq(memcmp(saved, tat, sizeof(tat)), 0, "bucket 0 was charged by a denied request");
    cr_assert_eq(r.limiting, 1);
    cr_assert_eq(r.retry_us, 500000);
    cr_assert_eq(r.remaining, 0);
    cr_assert_eq(r.reset_us, 1000000);
    cr_assert_eq(ttl[0], 2000000);
    cr_assert_eq(ttl[1], 1000000);

    /* Every 0.5 s bucket 1 gives one token back and bucket 0 half of one:
     * bucket 0 runs dry after three more and then limits. */
    tg_gcra_charge(l, tat, ttl, 2, 1, T0 + 500000, &r);
    cr_assert(r.allowed);
    tg_gcra_charge(l, tat, ttl, 2, 1, T0 + 1000000, &r);
    cr_assert(r.allowed);
    tg_gcra_charge(l, tat, ttl, 2, 1, T0 + 1500000, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);
    cr_assert_eq(r.limiting, 1);
    tg_gcra_charge(l, tat, ttl, 2, 1, T0 + 2000000, &r);
    cr_assert(r.allowed);
    tg_gcra_charge(l, tat, ttl, 2, 1, T0 + 2500000, &r);
    cr_assert(r.allowed);
    tg_gcra_charge(l, tat, ttl, 2, 1, T0 + 3000000, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);
    cr_assert_eq(r.limiting, 0, "both at 0: bucket 0 takes longer to refill");
    cr_assert_eq(r.reset_us, 5000000);
    /* Both deny; bucket 0 by 1 s, bucket 1 by 0.5 s: the larger wins. */
    tg_gcra_charge(l, tat, ttl, 2, 1, T0 + 3000000, &r);
    cr_assert(!r.allowed);
    cr_assert_eq(r.limiting, 0);
    cr_assert_eq(r.retry_us, 1000000);
    tg_gcra_charge(l, tat, ttl, 2, 1, T0 + 3999999, &r);
    cr_assert(!r.allowed);
    tg_gcra_charge(l, tat, ttl, 2, 1, T0 + 4000000, &r);
    cr_assert(r.allowed);
}

Test(gcra, tie_breaks)
{
    /* Same remaining (1) after the charge: the longer reset wins. */
    tg_gcra_limit l[3] = { { 100, 2 }, { 300, 2 }, { 300, 2 } };
    uint64_t tat[3] = { 0, 0, 0 };
    tg_gcra_result r;

    tg_gcra_charge(l, tat, NULL, 3, 1, T0, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 1);
    cr_assert_eq(r.limiting, 1, "larger reset, then lower index");
    cr_assert_eq(r.reset_us, 300);

    /* Denied by equal retries: the lower index. */
    tg_gcra_charge(l, tat, NULL, 3, 2, T0, &r);
    cr_assert(!r.allowed);
    cr_assert_eq(r.retry_us, 300);
    cr_assert_eq(r.limiting, 1);
    cr_assert_eq(r.remaining, 1);

    /* Denied by one bucket of two: remaining still spans both. */
    {
        tg_gcra_limit m[2] = { { 100, 10 }, { 100, 1 } };
        uint64_t t2[2] = { 0, 0 };
        tg_gcra_charge(m, t2, NULL, 2, 2, T0, &r);
        cr_assert(!r.allowed);
        cr_assert_eq(r.limiting, 1);
        cr_assert_eq(r.retry_us, 100);
        cr_assert_eq(r.remaining, 1);
        cr_assert_eq(t2[0], 0);
    }
}

Test(gcra, no_buckets)
{
    tg_gcra_result r;
    tg_gcra_charge(NULL, NULL, NULL, 0, 1, T0, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, UINT32_MAX);
    cr_assert_eq(r.limiting, -1);
}

Test(gcra, lowered_burst_after_reload)
{
    /* A TAT beyond the new capacity (burst lowered): denied, 0 left, and
     * the retry is still exact. */
    tg_gcra_limit big = { 1000, 100 }, small = { 1000, 10 };
    uint64_t tat = 0;
    tg_gcra_result r;

    r = charge1(big, &tat, 50, T0);
    cr_assert(r.allowed);
    r = charge1(small, &tat, 1, T0);
    cr_assert(!r.allowed);
    cr_assert_eq(r.remaining, 0);
    cr_assert_eq(r.retry_us, 41000);
    r = charge1(small, &tat, 1, T0 + 41000);
    cr_assert(r.allowed);
}

/* ---- randomized properties --------------------------------------------- */

typedef struct arrival {
    uint64_t t;
    uint32_t cost;
    int      allowed;
} arrival;

/*
 * Exact reference: credit c in microseconds (tokens * T), capped at L,
 * earning 1 per microsecond.  GCRA must agree with it on every decision:
 * property (b) (never refused when tokens are there) and the converse.
 */
static void
property_run(uint64_t seed, size_t nb, const tg_gcra_limit *l, size_t count)
{
    uint64_t tat[8] = { 0 }, credit[8], last = T0, now = T0;
    arrival *arr = calloc(count, sizeof(*arr));
    uint64_t *prefix = calloc(count + 1, sizeof(*prefix));
    uint32_t maxcost = UINT32_MAX;
    size_t i, j, b;

    cr_assert_not_null(arr);
    rng_state = seed;
    for (b = 0; b < nb; b++) {
        credit[b] = l[b].burst * l[b].interval_us;
        if (l[b].burst < maxcost) {
            maxcost = l[b].burst;
        }
    }
    for (i = 0; i < count; i++) {
        uint64_t gap, save[8], ttl[8];
        uint32_t cost;
        int ref_ok = 1;
        tg_gcra_result r;

        /* Arrivals in clumps: often simultaneous, often a fraction of T,
         * sometimes long pauses. */
        switch (rng_below(4)) {
        case 0:  gap = 0; break;
        case 1:  gap = rng_below(l[0].interval_us + 1); break;
        case 2:  gap = rng_below(4 * l[0].interval_us); break;
        default: gap = rng_below(l[0].interval_us * l[0].burst * 2); break;
        }
        now += gap;
        cost = rng_below(8) == 0 ? (uint32_t)rng_below(maxcost + 1) : 1;
        for (b = 0; b < nb; b++) {
            uint64_t lim = (uint64_t)l[b].burst * l[b].interval_us;
            credit[b] += now - last;
            if (credit[b] > lim) {
                credit[b] = lim;
            }
            if (credit[b] < (uint64_t)cost * l[b].interval_us) {
                ref_ok = 0;
            }
        }
        last = now;

        memcpy(save, tat, sizeof(tat));
        tg_gcra_charge(l, tat, ttl, nb, cost, now, &r);
        cr_assert_eq(r.allowed, ref_ok,
                     "seed %" PRIu64 " #%zu: gcra %d, reference %d", seed, i,
                     r.allowed, ref_ok);
        arr[i].t = now;
        arr[i].cost = cost;
        arr[i].allowed = r.allowed;
        if (r.allowed) {
            uint32_t rem = UINT32_MAX;
            for (b = 0; b < nb; b++) {
                uint32_t rb;
                credit[b] -= (uint64_t)cost * l[b].interval_us;
                rb = (uint32_t)(credit[b] / l[b].interval_us);
                rem = rb < rem ? rb : rem;
                cr_assert_eq(ttl[b], (uint64_t)l[b].burst * l[b].interval_us - credit[b]);
            }
            cr_assert_eq(r.remaining, rem);
            cr_assert_eq(r.retry_us, 0);
        } else {
            uint64_t probe[8];
            tg_gcra_result r2;

            cr_assert_eq(memcmp(save, tat, sizeof(tat)), 0);
            cr_assert_gt(r.retry_us, 0);
            /* (c) retry_us is never early, and exact: at now + retry_us
             * the same request passes; one microsecond earlier it does not. */
            memcpy(probe, tat, sizeof(tat));
            tg_gcra_charge(l, probe, NULL, nb, cost, now + r.retry_us, &r2);
            cr_assert(r2.allowed, "seed %" PRIu64 " #%zu: retry %" PRIu64 " early",
                      seed, i, r.retry_us);
            memcpy(probe, tat, sizeof(tat));
            tg_gcra_charge(l, probe, NULL, nb, cost, now + r.retry_us - 1, &r2);
            cr_assert(!r2.allowed, "retry_us not minimal");
        }
    }

    /* (a) every window [t_i, t_j]: allowed cost * T <= L + (t_j - t_i),
     * for every bucket. */
    for (i = 0; i < count; i++) {
        prefix[i + 1] = prefix[i] + (arr[i].allowed ? arr[i].cost : 0);
    }
    for (b = 0; b < nb; b++) {
        uint64_t t = l[b].interval_us, lim = (uint64_t)l[b].burst * t;
        for (i = 0; i < count; i++) {
            if (!arr[i].allowed) {
                continue;
            }
            for (j = i; j < count; j++) {
                uint64_t sum = prefix[j + 1] - prefix[i];
                if (sum * t > lim + (arr[j].t - arr[i].t)) {
                    cr_assert_fail("seed %" PRIu64 " bucket %zu: %" PRIu64
                             " allowed in %" PRIu64 " us", seed, b, sum,
                             arr[j].t - arr[i].t);
                }
            }
        }
    }
    free(prefix);
    free(arr);
}

Test(gcra, property_single_bucket)
{
    static const uint32_t cfg[][2] = {
        { 100, 20 }, { 500, 100 }, { 1000, 200 }, { 7, 1 }, { 1, 3 },
        { 60000, 5 }, { 3, 2 }, { 6000000, 1000 },
    };
    size_t c;
    uint64_t seed;

    for (c = 0; c < TG_ARRAY_LEN(cfg); c++) {
        for (seed = 1; seed <= 4; seed++) {
            tg_gcra_limit l = tg_gcra_per_minute(cfg[c][0], cfg[c][1]);
            property_run(seed * 7919 + c, 1, &l, 3000);
        }
    }
}

Test(gcra, property_several_buckets)
{
    uint64_t seed;

    for (seed = 1; seed <= 12; seed++) {
        tg_gcra_limit l[3];
        size_t nb = 2 + seed % 2;
        rng_state = seed * 104729;
        /* Random, unrelated limits (odd intervals shake out rounding). */
        l[0] = (tg_gcra_limit){ 1000 + rng_below(100000), 1 + (uint32_t)rng_below(50) };
        l[1] = (tg_gcra_limit){ 100 + rng_below(1000000), 1 + (uint32_t)rng_below(10) };
        l[2] = (tg_gcra_limit){ 1 + rng_below(5000), 1 + (uint32_t)rng_below(500) };
        property_run(seed, nb, l, 3000);
    }
}

/* ---- in-process store ------------------------------------------------ */

static void
assert_same(const tg_gcra_result *a, const tg_gcra_result *b, size_t step)
{
    cr_assert_eq(a->allowed, b->allowed, "step %zu", step);
    cr_assert_eq(a->remaining, b->remaining, "step %zu", step);
    cr_assert_eq(a->retry_us, b->retry_us, "step %zu", step);
    cr_assert_eq(a->reset_us, b->reset_us, "step %zu", step);
    cr_assert_eq(a->limiting, b->limiting, "step %zu", step);
}

/* The store without eviction is exactly the pure step on remembered TATs,
 * through growth and through the deletions of the expiry sweep. */
Test(lstore, same_as_pure_step)
{
    enum { NKEYS = 3000, STEPS = 200000 };
    struct tg_lstore *st = tg_lstore_create(1000000);
    static uint64_t model[NKEYS];
    static char names[NKEYS][80];
    tg_gcra_limit lk[NKEYS];
    uint64_t now = T0;
    size_t i;

    rng_state = 42;
    for (i = 0; i < NKEYS; i++) {
        /* Lengths around the inline limit (48) and far above it. */
        size_t len = 1 + rng_below(60);
        snprintf(names[i], sizeof(names[i]), "tg:{%zu}:%.*s", i, (int)len,
                 "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijklmn");
        lk[i] = (tg_gcra_limit){ 1 + rng_below(20000), 1 + (uint32_t)rng_below(5) };
    }
    for (i = 0; i < STEPS; i++) {
        size_t n = 1 + rng_below(3), b, idx[3];
        const char *keys[3];
        tg_gcra_limit l[3];
        uint64_t tat[3];
        uint32_t cost = (uint32_t)rng_below(3);
        tg_gcra_result rs, rp;

        now += rng_below(50);
        for (b = 0; b < n; b++) {
            idx[b] = rng_below(NKEYS);
            keys[b] = names[idx[b]];
            l[b] = lk[idx[b]];
            tat[b] = model[idx[b]];
        }
        tg_lstore_charge(st, keys, l, n, cost, now, &rs);
        tg_gcra_charge(l, tat, NULL, n, cost, now, &rp);
        assert_same(&rs, &rp, i);
        if (rp.allowed) {
            for (b = 0; b < n; b++) {
                model[idx[b]] = tat[b];
            }
        }
    }
    /* Sweeping keeps the table to roughly the live buckets. */
    cr_assert_leq(tg_lstore_size(st), NKEYS);
    tg_lstore_destroy(st);
}

static uint32_t
probe_remaining(struct tg_lstore *st, const char *key, tg_gcra_limit l, uint64_t now)
{
    tg_gcra_result r;
    tg_lstore_charge(st, &key, &l, 1, 0, now, &r);  /* cost 0: a look */
    return r.remaining;
}

Test(lstore, basic_tier_and_size)
{
    struct tg_lstore *st = tg_lstore_create(100);
    tg_gcra_limit l = tg_gcra_per_minute(100, 20);
    const char *k = "tg:{acme}:tier";
    tg_gcra_result r;
    int i;

    cr_assert_eq(tg_lstore_size(st), 0);
    for (i = 0; i < 40; i++) {
        tg_lstore_charge(st, &k, &l, 1, 1, T0, &r);
        cr_assert_eq(r.allowed, i < 20);
        cr_assert_eq(r.remaining, i < 20 ? (uint32_t)(19 - i) : 0);
        if (i >= 20) {
            cr_assert_eq(r.retry_us, 600000);
        }
    }
    cr_assert_eq(tg_lstore_size(st), 1);
    tg_lstore_charge(st, &k, &l, 1, 1, T0 + 600000, &r);
    cr_assert(r.allowed);
    tg_lstore_charge(st, &k, &l, 1, 1, T0 + 600000, &r);
    cr_assert(!r.allowed);

    /* A denied request for a new key stores nothing, nor does a look. */
    {
        const char *k2 = "tg:{other}:tier";
        tg_gcra_limit one = { 1000, 1 };
        tg_lstore_charge(st, &k2, &one, 1, 2, T0, &r);
        cr_assert(!r.allowed);
        cr_assert_eq(tg_lstore_size(st), 1);
        cr_assert_eq(probe_remaining(st, k2, one, T0), 1);
        cr_assert_eq(tg_lstore_size(st), 1);
        tg_lstore_charge(st, &k2, &one, 1, 1, T0, &r);
        cr_assert(r.allowed);
        cr_assert_eq(tg_lstore_size(st), 2);
    }
    /* All-or-nothing across keys. */
    {
        const char *ks[2] = { "tg:{acme}:minute", "tg:{acme}:tier" };
        tg_gcra_limit ls[2] = { tg_gcra_per_minute(1000, 50), l };
        tg_lstore_charge(st, ks, ls, 2, 1, T0 + 600000, &r);
        cr_assert(!r.allowed);
        cr_assert_eq(r.limiting, 1);
        cr_assert_eq(tg_lstore_size(st), 2);
        tg_lstore_charge(st, ks, ls, 2, 1, T0 + 1200000, &r);
        cr_assert(r.allowed);
        cr_assert_eq(r.limiting, 1);
        cr_assert_eq(r.remaining, 0);
        cr_assert_eq(tg_lstore_size(st), 3);
        cr_assert_eq(probe_remaining(st, ks[0], ls[0], T0 + 1200000), 49);
    }
    /* The same key twice in one request: two buckets, same state, last
     * write wins (as in Redis). */
    {
        const char *ks[2] = { "tg:{dup}:x", "tg:{dup}:x" };
        tg_gcra_limit ls[2] = { { 1000, 10 }, { 1000, 10 } };
        tg_lstore_charge(st, ks, ls, 2, 1, T0, &r);
        cr_assert(r.allowed);
        cr_assert_eq(r.remaining, 9);
        cr_assert_eq(probe_remaining(st, ks[0], ls[0], T0), 9);
    }
    tg_lstore_destroy(st);
    tg_lstore_destroy(NULL);
}

Test(lstore, eviction_prefers_expired)
{
    struct tg_lstore *st = tg_lstore_create(16);
    tg_gcra_limit shortl = { 1000, 5 }, longl = { 60000000, 1 };
    char name[32];
    const char *k = name;
    tg_gcra_result r;
    int i;

    for (i = 0; i < 8; i++) {
        snprintf(name, sizeof(name), "short%d", i);
        tg_lstore_charge(st, &k, &shortl, 1, 1, T0, &r);
        cr_assert(r.allowed);
        snprintf(name, sizeof(name), "long%d", i);
        tg_lstore_charge(st, &k, &longl, 1, 1, T0, &r);
        cr_assert(r.allowed);
    }
    cr_assert_eq(tg_lstore_size(st), 16);

    /* 1 ms later every short bucket is full again; 8 new keys must push
     * those out, never a long one. */
    for (i = 0; i < 8; i++) {
        snprintf(name, sizeof(name), "new%d", i);
        tg_lstore_charge(st, &k, &longl, 1, 1, T0 + 1000, &r);
        cr_assert(r.allowed);
        cr_assert_leq(tg_lstore_size(st), 16);
    }
    cr_assert_eq(tg_lstore_size(st), 16);
    for (i = 0; i < 8; i++) {
        snprintf(name, sizeof(name), "long%d", i);
        cr_assert_eq(probe_remaining(st, name, longl, T0 + 1000), 0, "%s evicted", name);
        snprintf(name, sizeof(name), "new%d", i);
        cr_assert_eq(probe_remaining(st, name, longl, T0 + 1000), 0, "%s evicted", name);
    }
    tg_lstore_destroy(st);
}

Test(lstore, eviction_drops_closest_to_full)
{
    struct tg_lstore *st = tg_lstore_create(16);
    tg_gcra_limit l = { 1000000, 100 };
    char name[32];
    const char *k = name;
    tg_gcra_result r;
    int i;

    /* key i has 30 - i tokens used: key15 is the closest to full. */
    for (i = 0; i < 16; i++) {
        snprintf(name, sizeof(name), "k%d", i);
        tg_lstore_charge(st, &k, &l, 1, 30 - (uint32_t)i, T0, &r);
        cr_assert(r.allowed);
    }
    snprintf(name, sizeof(name), "fresh");
    tg_lstore_charge(st, &k, &l, 1, 1, T0, &r);
    cr_assert(r.allowed);
    cr_assert_eq(tg_lstore_size(st), 16);
    for (i = 0; i < 15; i++) {
        snprintf(name, sizeof(name), "k%d", i);
        cr_assert_eq(probe_remaining(st, name, l, T0), 70 + (uint32_t)i);
    }
    cr_assert_eq(probe_remaining(st, "k15", l, T0), 100, "k15 should be the victim");
    cr_assert_eq(probe_remaining(st, "fresh", l, T0), 99);
    tg_lstore_destroy(st);
}

Test(lstore, a_request_never_evicts_its_own_keys)
{
    struct tg_lstore *st = tg_lstore_create(16);
    tg_gcra_limit l = { 1000000, 100 };
    char name[32], n2[32];
    const char *ks[2] = { name, n2 };
    tg_gcra_limit ls[2] = { l, l };
    tg_gcra_result r;
    int i;

    /* "mine" is the closest to full of all, and is charged together with
     * a new key while the store is full. */
    for (i = 0; i < 15; i++) {
        snprintf(name, sizeof(name), "k%d", i);
        tg_lstore_charge(st, ks, &l, 1, 50, T0, &r);
    }
    snprintf(name, sizeof(name), "mine");
    tg_lstore_charge(st, ks, &l, 1, 1, T0, &r);
    cr_assert_eq(tg_lstore_size(st), 16);
    snprintf(n2, sizeof(n2), "new");
    tg_lstore_charge(st, ks, ls, 2, 1, T0, &r);
    cr_assert(r.allowed);
    cr_assert_eq(tg_lstore_size(st), 16);
    cr_assert_eq(probe_remaining(st, "mine", l, T0), 98);
    cr_assert_eq(probe_remaining(st, "new", l, T0), 99);
    tg_lstore_destroy(st);
}

Test(lstore, long_keys)
{
    struct tg_lstore *st = tg_lstore_create(1000);
    tg_gcra_limit l = { 1000000, 10 };
    static char keys[201][201];
    const char *k;
    tg_gcra_result r;
    int len;

    /* Keys of every length 0..200 that share prefixes: each its own
     * bucket, each charged (len % 10) + 1 times. */
    for (len = 0; len <= 200; len++) {
        memset(keys[len], 'x', (size_t)len);
        keys[len][len] = '\0';
        if (len > 0) {
            keys[len][len - 1] = (char)('a' + len % 26);
        }
        k = keys[len];
        for (int j = 0; j <= len % 10; j++) {
            tg_lstore_charge(st, &k, &l, 1, 1, T0, &r);
            cr_assert(r.allowed);
        }
    }
    cr_assert_eq(tg_lstore_size(st), 201);
    for (len = 0; len <= 200; len++) {
        cr_assert_eq(probe_remaining(st, keys[len], l, T0), 9 - (uint32_t)(len % 10),
                     "key of length %d", len);
    }
    /* Differ only in the last byte of 200. */
    {
        char a[201], b[201];
        memset(a, 'q', 200);
        a[200] = '\0';
        memcpy(b, a, sizeof(a));
        b[199] = 'r';
        k = a;
        tg_lstore_charge(st, &k, &l, 1, 10, T0, &r);
        cr_assert(r.allowed);
        cr_assert_eq(probe_remaining(st, b, l, T0), 10);
        cr_assert_eq(probe_remaining(st, a, l, T0), 0);
    }
    tg_lstore_destroy(st);
}

Test(lstore, many_keys_bounded)
{
    enum { N = 100000 };
    struct tg_lstore *big = tg_lstore_create(2 * N), *small = tg_lstore_create(N / 2);
    tg_gcra_limit l = tg_gcra_per_minute(100, 20);
    char name[64];
    const char *k = name;
    tg_gcra_result r;
    struct timespec a, b;
    int i, pass;

    clock_gettime(CLOCK_MONOTONIC, &a);
    for (pass = 0; pass < 2; pass++) {
        for (i = 0; i < N; i++) {
            snprintf(name, sizeof(name), "tg:{ak_%08d}:tier", i);
            tg_lstore_charge(big, &k, &l, 1, 1, T0 + (uint64_t)pass, &r);
            cr_assert(r.allowed);
            cr_assert_eq(r.remaining, 19 - (uint32_t)pass);
            tg_lstore_charge(small, &k, &l, 1, 1, T0 + (uint64_t)pass, &r);
            cr_assert(r.allowed);
        }
        cr_assert_eq(tg_lstore_size(big), N);
        cr_assert_leq(tg_lstore_size(small), N / 2);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    cr_log_info("lstore: %d charges in %.1f ms; %zu bytes per bucket (bound)",
                4 * N, (double)(b.tv_sec - a.tv_sec) * 1e3
                + (double)(b.tv_nsec - a.tv_nsec) / 1e6, tg_lstore_entry_bytes());
    cr_assert_geq(tg_lstore_entry_bytes(), 64);
    cr_assert_leq(tg_lstore_entry_bytes(), 200);
    tg_lstore_destroy(big);
    tg_lstore_destroy(small);
}

/* ---- the Redis fallback: local buckets following Redis --------------------- */

/*
 * A model of one worker: Redis (the pure step on its own TATs) answers
 * while it is up; during faults the local store decides.  Each answer
 * raises the local buckets (tg_lstore_raise), each charge carries the
 * local debt to Redis as a floor; some answers are lost after Redis
 * applied them (late replies: the request goes to the fallback too).
 * Whatever the interleaving, the admitted requests keep the bound over
 * every window; without lost answers every decision is that of ONE
 * bucket (the exact reference): no fault hands out an extra burst.
 */
static void
fallback_run(uint64_t seed, int lost_answers)
{
    enum { N = 3000 };
    static const char *names[2] = { "tg:{k}:t", "tg:{global}:g" };
    tg_gcra_limit l[2];
    uint64_t tat_r[2] = { 0, 0 }, tat_ref[2] = { 0, 0 }, now = T0;
    struct tg_lstore *st = tg_lstore_create(64);
    arrival *arr = calloc(N, sizeof(*arr));
    size_t nb, i, j, b, exact = 0;
    int up = 1;

    cr_assert_not_null(arr);
    rng_state = seed;
    nb = 1 + seed % 2;
    l[0] = (tg_gcra_limit){ 1000 + rng_below(50000), 1 + (uint32_t)rng_below(20) };
    l[1] = (tg_gcra_limit){ 100 + rng_below(5000), 1 + (uint32_t)rng_below(40) };
    for (i = 0; i < N; i++) {
        uint32_t cost = rng_below(6) == 0 ? 1 + (uint32_t)rng_below(l[0].burst) : 1;
        tg_gcra_result res, ref;
        int admitted;

        now += rng_below(3) == 0 ? rng_below(l[0].interval_us * 3) : rng_below(200);
        if (rng_below(40) == 0) {
            up = !up;                           /* a fault starts or ends */
        }
        if (up) {
            for (b = 0; b < nb; b++) {          /* the floor */
                uint64_t held = tg_lstore_held(st, names[b], now);
                if (tat_r[b] < now + held) {
                    tat_r[b] = now + held;
                }
            }
            tg_gcra_charge(l, tat_r, NULL, nb, cost, now, &res);
            if (lost_answers && rng_below(8) == 0) {
                tg_lstore_charge(st, names, l, nb, cost, now, &res);
            } else {
                for (b = 0; b < nb; b++) {
                    tg_lstore_raise(st, names[b], now + res.held_us[b], now);
                }
            }
        } else {
            tg_lstore_charge(st, names, l, nb, cost, now, &res);
        }
        admitted = res.allowed;
        tg_gcra_charge(l, tat_ref, NULL, nb, cost, now, &ref);
        if (!lost_answers) {
            cr_assert_eq(admitted, ref.allowed, "seed %" PRIu64 " #%zu (%s): %d, one "
                         "bucket says %d", seed, i, up ? "redis" : "fallback",
                         admitted, ref.allowed);
            exact++;
        }
        arr[i] = (arrival){ now, cost, admitted };
    }
    for (b = 0; b < nb; b++) {
        uint64_t t = l[b].interval_us;
        for (i = 0; i < N; i++) {
            uint64_t sum = 0;
            if (!arr[i].allowed) {
                continue;
            }
            for (j = i; j < N; j++) {
                sum += arr[j].allowed ? arr[j].cost : 0;
                cr_assert_leq(sum, l[b].burst + (arr[j].t - arr[i].t) / t,
                              "seed %" PRIu64 " bucket %zu: %" PRIu64 " in %" PRIu64 " us",
                              seed, b, sum, arr[j].t - arr[i].t);
            }
        }
    }
    TG_UNUSED(exact);
    free(arr);
    tg_lstore_destroy(st);
}

Test(lstore, property_fallback_follows_redis)
{
    for (uint64_t seed = 1; seed <= 6; seed++) {
        fallback_run(seed * 31337, 0);
        fallback_run(seed * 7777, 1);
    }
}

/* The fallback's share of a limit across instances never drops below the
 * largest cost that could pass it (else that route could never pass). */
Test(gcra, share_never_below_a_cost)
{
    rng_state = 42;
    for (int i = 0; i < 100000; i++) {
        tg_gcra_limit l = { 1 + rng_below(1000000), 1 + (uint32_t)rng_below(1000) };
        unsigned k = 1 + (unsigned)rng_below(1000);
        uint32_t maxcost = 1 + (uint32_t)rng_below(1200);
        tg_gcra_limit s = tg_gcra_share(l, k, maxcost);

        cr_assert_eq(s.interval_us, l.interval_us * k);
        cr_assert_geq(s.burst, maxcost < l.burst ? maxcost : l.burst);
        cr_assert_geq(s.burst, l.burst / k);
        cr_assert_leq(s.burst, l.burst);
    }
    /* the production sample: cost 10, burst 20, 3 instances -> 10, not 6 */
    cr_assert_eq(tg_gcra_share(tg_gcra_per_minute(100, 20), 3, 10).burst, 10);
}

/* A full store drops a full bucket wherever it is in the table before any
 * bucket that still holds debt (forgetting debt admits extra requests). */
Test(lstore, eviction_finds_the_full_bucket_anywhere)
{
    enum { MAX = 256 };
    struct tg_lstore *st = tg_lstore_create(MAX);
    tg_gcra_limit longl = { 60000000, 10 }, shortl = { 1000, 5 };
    char name[32];
    const char *k = name;
    tg_gcra_result r;
    int i, round;

    for (round = 0; round < 20; round++) {
        uint64_t now = T0 + (uint64_t)round * 10000000;

        /* one bucket that is full again 1 ms later, among live ones */
        snprintf(name, sizeof(name), "short%d", round);
        tg_lstore_charge(st, &k, &shortl, 1, 1, now, &r);
        cr_assert(r.allowed);
        for (i = 0; tg_lstore_size(st) < MAX; i++) {
            snprintf(name, sizeof(name), "live%d_%d", round, i);
            tg_lstore_charge(st, &k, &longl, 1, 1, now, &r);
        }
        snprintf(name, sizeof(name), "new%d", round);
        tg_lstore_charge(st, &k, &longl, 1, 1, now + 1000, &r);
        cr_assert(r.allowed);
        cr_assert_eq(tg_lstore_size(st), MAX);
        for (int j = 0; j < i; j++) {
            snprintf(name, sizeof(name), "live%d_%d", round, j);
            cr_assert_eq(probe_remaining(st, name, longl, now + 1000), 9,
                         "round %d: %s (not full) was dropped", round, name);
        }
        /* make room for the next round: everything ages out */
        tg_lstore_destroy(st);
        st = tg_lstore_create(MAX);
    }
    tg_lstore_destroy(st);
}

/*
 * The deny cache and a refused lease take decide from the buckets' held
 * times (time until full) in a Redis answer, on a clock of their own: the
 * step must give the same result at (tat = base + held, now = base) as at
 * Redis's own (tat, now), every field; and a TAT known no later than the
 * true one never refuses what the true one admits.
 */
Test(gcra, decision_from_held_times)
{
    const tg_gcra_limit lim[3] = { { 600000, 20 }, { 60000000, 2 }, { 100, 1000 } };
    uint64_t seed = 12345;

    for (int it = 0; it < 20000; it++) {
        uint64_t now = 1700000000000000ull + (seed % 1000000), base = 1ull << 40;
        uint64_t tat[3], rel[3], lo[3];
        uint32_t cost = 1 + (uint32_t)(seed % 3);
        tg_gcra_result a, b, c;

        for (int i = 0; i < 3; i++) {
            uint64_t l = (uint64_t)lim[i].burst * lim[i].interval_us;
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            tat[i] = (seed >> 33) % 3 == 0 ? 0 : now - l / 4 + (seed >> 20) % (l + l / 2);
            rel[i] = base + (tat[i] > now ? tat[i] - now : 0);
            lo[i] = tat[i] > 1000 ? tat[i] - (seed >> 40) % 1000 : tat[i];
        }
        tg_gcra_charge(lim, tat, NULL, 3, cost, now, &a);
        tg_gcra_charge(lim, rel, NULL, 3, cost, base, &b);
        cr_assert_eq(a.allowed, b.allowed);
        cr_assert_eq(a.remaining, b.remaining);
        cr_assert_eq(a.retry_us, b.retry_us);
        cr_assert_eq(a.reset_us, b.reset_us);
        cr_assert_eq(a.limiting, b.limiting);
        for (int i = 0; i < 3; i++)
            cr_assert_eq(a.held_us[i], b.held_us[i]);
        tg_gcra_charge(lim, lo, NULL, 3, cost, now, &c);
        if (!c.allowed)
            cr_assert(!a.allowed, "a lower TAT refused what the true one admits");
    }
}

/* ---- the scripts' argument and reply layout ---------------------------- */

Test(gcra_script, args_of_the_buckets_sent)
{
    uint32_t kidx[3] = { 4, 1, 9 };
    uint64_t floor_us[3] = { 11, 22, 33 };
    uint64_t a[TG_GCRA_SCRIPT_ARGS];
    static const uint64_t want_all[] = { 4 * 16 + 3, 4, 11, 1, 22, 9, 33 };
    static const uint64_t want_13[] = { 16 + 2, 4, 9 };
    static const uint64_t want_13f[] = { 16 + 2, 4, 0, 9, 0 };
    size_t na;

    na = tg_gcra_script_args(kidx, floor_us, 3, 0x7, 4, 1, a);
    cr_assert_eq(na, TG_ARRAY_LEN(want_all));
    cr_assert_arr_eq(a, want_all, sizeof(want_all));

    /* a Cluster part: the first and third buckets, no floors in the call */
    na = tg_gcra_script_args(kidx, floor_us, 3, 0x5, 1, 0, a);
    cr_assert_eq(na, TG_ARRAY_LEN(want_13));
    cr_assert_arr_eq(a, want_13, sizeof(want_13));

    /* floors in the call (another request's), none of this one's */
    na = tg_gcra_script_args(kidx, NULL, 3, 0x5, 1, 1, a);
    cr_assert_eq(na, TG_ARRAY_LEN(want_13f));
    cr_assert_arr_eq(a, want_13f, sizeof(want_13f));

    /* bits beyond n are not buckets; cost 0 is a look */
    na = tg_gcra_script_args(kidx, floor_us, 1, 0xff, 0, 1, a);
    cr_assert_eq(na, 3);
    cr_assert(a[0] == 1 && a[1] == 4 && a[2] == 11);

    /* the largest cost keeps its bits apart from nbuckets */
    na = tg_gcra_script_args(kidx, NULL, 3, 0x7, UINT32_MAX, 0, a);
    cr_assert_eq(na, 4);
    cr_assert_eq(a[0] % 16, 3);
    cr_assert_eq(a[0] / 16, UINT32_MAX);
}

/* A key's numbers (after the requests'): T, burst, alias. */
Test(gcra_script, key_numbers)
{
    uint64_t a[TG_GCRA_SCRIPT_KEY_ARGS];
    tg_gcra_limit l = { 0x100000003ULL, 4000000000u };

    cr_assert_eq(tg_gcra_script_key(l, 7, a), TG_GCRA_SCRIPT_KEY_ARGS);
    cr_assert(a[0] == 0x100000003ULL && a[1] == 4000000000u && a[2] == 7);
}

/* The packed numbers: little-endian doubles, exact below 2^53 (a value of
 * 2^32 or more must not lose its high half), clamped at 2^53 - 1. */
Test(gcra_script, packed_numbers_are_exact)
{
    static const uint64_t v[] = { 0, 1, 16 + 1, 0xffffffffULL, 0x100000000ULL,
                                  0x100000005ULL, 1800000000123457ULL,
                                  9007199254740991ULL };
    static const unsigned char one[8] = { 0, 0, 0, 0, 0, 0, 0xf0, 0x3f };
    uint64_t back[TG_ARRAY_LEN(v)], big[2] = { 9007199254740992ULL, UINT64_MAX };
    unsigned char pk[TG_ARRAY_LEN(v) * TG_GCRA_PACKED];

    cr_assert_eq(tg_gcra_script_pack(v, TG_ARRAY_LEN(v), pk), sizeof(pk));
    cr_assert_arr_eq(pk + TG_GCRA_PACKED, one, 8, "1 is the double 1.0, little-endian");
    cr_assert_eq(tg_gcra_script_unpack(pk, TG_ARRAY_LEN(v), back), 1);
    for (size_t i = 0; i < TG_ARRAY_LEN(v); i++) {
        cr_assert_eq(back[i], v[i], "value %zu: %" PRIu64 " came back as %" PRIu64,
                     i, v[i], back[i]);
    }
    /* beyond the script's numbers: 2^53 - 1 */
    cr_assert_eq(tg_gcra_script_pack(big, 2, pk), 2 * TG_GCRA_PACKED);
    cr_assert_eq(tg_gcra_script_unpack(pk, 2, back), 1);
    cr_assert(back[0] == 9007199254740991ULL && back[1] == 9007199254740991ULL);
}

Test(gcra_script, unpack_refuses_what_is_not_a_number_of_the_script)
{
    static const double bad[] = { -1.0, 0.5, 9007199254740992.0, 1e300,
                                  __builtin_nan(""), __builtin_inf() };
    uint64_t out;

    for (size_t i = 0; i < TG_ARRAY_LEN(bad); i++) {
        unsigned char pk[8];
        uint64_t b;
        memcpy(&b, &bad[i], 8);
        for (int k = 0; k < 8; k++) {
            pk[k] = (unsigned char)(b >> (8 * k));
        }
        cr_assert_eq(tg_gcra_script_unpack(pk, 1, &out), 0, "value %zu accepted", i);
    }
}

Test(gcra_script, reply_length)
{
    cr_assert_eq(tg_gcra_script_reply_len(1, 1), 3);
    cr_assert_eq(tg_gcra_script_reply_len(3, 5), 9);
    cr_assert_eq(tg_gcra_script_reply_len(0, 0), 1);   /* only the script's now */
}

Test(gcra_script, answer_maps_the_buckets_sent)
{
    /* buckets 0 and 2 of 3 were sent (T 100 and 300 us, bursts 10 and 6):
     * debts 100 and 300 before a request of cost 1 */
    tg_gcra_limit lim[3] = { { 100, 10 }, { 7, 7 }, { 300, 6 } };
    long long v[] = { 1, 100, 300 };
    tg_gcra_result res;

    memset(&res, 0xa5, sizeof(res));
    res.now_us = 77;
    cr_assert_eq(tg_gcra_script_answer(v, lim, 0x5, 1, 1000000, &res), 1);
    cr_assert_eq(res.allowed, 1);
    cr_assert_eq(res.remaining, 4, "bucket 2: (1800 - 600) / 300");
    cr_assert_eq(res.retry_us, 0);
    cr_assert_eq(res.reset_us, 600);
    cr_assert_eq(res.limiting, 2);
    cr_assert_eq(res.held_us[0], 200, "debts after an allowed request");
    cr_assert_eq(res.held_us[1], 0, "a bucket not sent holds 0, not garbage");
    cr_assert_eq(res.held_us[2], 600);
    for (int k = 3; k < TG_GCRA_MAX_BUCKETS; k++) {
        cr_assert_eq(res.held_us[k], 0);
    }
    cr_assert_eq(res.now_us, 77, "now_us is the caller's");

    /* denied by bucket 2: debts before, retry when it has room */
    v[0] = 0;
    v[2] = 1700;
    cr_assert_eq(tg_gcra_script_answer(v, lim, 0x5, 1, 1000000, &res), 1);
    cr_assert_eq(res.allowed, 0);
    cr_assert_eq(res.limiting, 2);
    cr_assert_eq(res.retry_us, 200);
    cr_assert_eq(res.reset_us, 1700);
    cr_assert_eq(res.remaining, 0);
    cr_assert_eq(res.held_us[0], 100);
    cr_assert_eq(res.held_us[2], 1700);
}

Test(gcra_script, answer_rejects_what_is_not_one)
{
    tg_gcra_limit lim[1] = { { 100, 10 } };
    static const long long good[2] = { 0, 950 };
    long long v[2];
    tg_gcra_result res;

    memcpy(v, good, sizeof(v));
    cr_assert_eq(tg_gcra_script_answer(v, lim, 0x1, 1, 5000000, &res), 1);
    cr_assert_eq(res.allowed, 0);
    cr_assert_eq(res.retry_us, 50);
    cr_assert_eq(res.limiting, 0);
    for (int k = 0; k < 2; k++) {        /* not an integer, or negative */
        memcpy(v, good, sizeof(v));
        v[k] = -1;
        cr_assert_eq(tg_gcra_script_answer(v, lim, 0x1, 1, 5000000, &res), 0,
                     "element %d", k);
    }
    memcpy(v, good, sizeof(v));
    v[0] = 2;                            /* allowed is 0 or 1 */
    cr_assert_eq(tg_gcra_script_answer(v, lim, 0x1, 1, 5000000, &res), 0);
    memcpy(v, good, sizeof(v));
    v[0] = 1;                            /* not what these debts decide */
    cr_assert_eq(tg_gcra_script_answer(v, lim, 0x1, 1, 5000000, &res), 0);
    memcpy(v, good, sizeof(v));
    v[1] = 1LL << 60;                    /* beyond the script's 2^53 */
    cr_assert_eq(tg_gcra_script_answer(v, lim, 0x1, 1, 5000000, &res), 0);
}

/* What the script answers (the decision and the debts before) decodes to
 * the pure step's result, field by field. */
Test(gcra_script, answer_round_trips_the_pure_step)
{
    tg_gcra_limit lim[3] = { tg_gcra_per_minute(60, 3), tg_gcra_per_second(10, 5),
                             tg_gcra_per_minute(600, 2) };
    uint64_t tat[3] = { 0, 0, 0 }, now = 1000000000;
    tg_gcra_result res, back;
    long long v[1 + 3];

    for (int i = 0; i < 12; i++, now += 50000) {
        uint32_t cost = (uint32_t)(i % 3);
        for (int k = 0; k < 3; k++) {
            v[1 + k] = tat[k] > now ? (long long)(tat[k] - now) : 0;
        }
        tg_gcra_charge(lim, tat, NULL, 3, cost, now, &res);
        v[0] = res.allowed;
        cr_assert_eq(tg_gcra_script_answer(v, lim, 0x7, cost, now, &back), 1);
        cr_assert_eq(back.allowed, res.allowed);
        cr_assert_eq(back.remaining, res.remaining);
        cr_assert_eq(back.retry_us, res.retry_us);
        cr_assert_eq(back.reset_us, res.reset_us);
        cr_assert_eq(back.limiting, res.limiting);
        cr_assert_arr_eq(back.held_us, res.held_us, 3 * sizeof(uint64_t));
    }
}

Test(gcra_script, refund_args)
{
    uint64_t a[2];

    cr_assert_eq(tg_gcra_refund_args(300000, 1700000000123456ull, a), 2);
    cr_assert_eq(a[0], 300000);
    cr_assert_eq(a[1], 1700000000123456ull);
}

/* ---- shared (striped) store ------------------------------------------- */

/* One thread: the shared store is exactly the pure step on remembered
 * TATs, the hot key (a cell) included. */
Test(lshared, same_as_pure_step)
{
    enum { NKEYS = 2000, STEPS = 200000 };
    struct tg_lshared *sh = tg_lshared_create(1000000);
    static uint64_t model[NKEYS];
    static char names[NKEYS][80];
    tg_gcra_limit lk[NKEYS];
    uint64_t now = T0;
    size_t i;

    rng_state = 7;
    for (i = 0; i < NKEYS; i++) {
        size_t len = 1 + rng_below(60);
        if (i < 2) {       /* 0: the hot (global) key; 1: a second cell */
            snprintf(names[i], sizeof(names[i]), "tg:{global%zu}:g", i);
        } else {
            snprintf(names[i], sizeof(names[i]), "tg:{%zu}:%zu:%.*s", i % 500, i,
                     (int)len, "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz0123456789");
        }
        lk[i] = (tg_gcra_limit){ 1 + rng_below(20000), 1 + (uint32_t)rng_below(5) };
    }
    for (i = 0; i < STEPS; i++) {
        size_t n = 1 + rng_below(3), b, idx[3];
        const char *keys[3];
        tg_gcra_limit l[3];
        uint64_t tat[3];
        uint32_t cost = (uint32_t)rng_below(3);
        int hot = -1;
        tg_gcra_result rs, rp;

        now += rng_below(50);
        for (b = 0; b < n; b++) {
            idx[b] = rng_below(8) == 0 ? rng_below(2) : rng_below(NKEYS);
            keys[b] = names[idx[b]];
            l[b] = lk[idx[b]];
            tat[b] = model[idx[b]];
            if (idx[b] < 2 && (i > 1000 || idx[b] == 0)) {
                hot = (int)b;          /* key 1 becomes a cell later */
            }
        }
        tg_lshared_charge(sh, keys, l, n, cost, hot, now, &rs);
        tg_gcra_charge(l, tat, NULL, n, cost, now, &rp);
        assert_same(&rs, &rp, i);
        if (rp.allowed) {
            for (b = 0; b < n; b++) {
                model[idx[b]] = tat[b];
            }
        }
    }
    for (i = 0; i < NKEYS; i++) {
        uint64_t held = model[i] > now ? model[i] - now : 0;
        cr_assert_eq(tg_lshared_held(sh, names[i], now), held, "key %zu", i);
    }
    tg_lshared_raise(sh, names[0], now + 5000000, now);
    tg_lshared_raise(sh, names[5], now + 5000000, now);
    cr_assert_eq(tg_lshared_held(sh, names[0], now), 5000000);
    cr_assert_eq(tg_lshared_held(sh, names[5], now), 5000000);
    tg_lshared_destroy(sh);
    tg_lshared_destroy(NULL);
}

/* raise_n is raise per key: a table key and a route key of one consumer
 * (one table), a cell, a key left alone (tat 0); never lowers a bucket,
 * a past TAT makes no entry. */
Test(lshared, raise_n_as_raise_each)
{
    struct tg_lshared *sh = tg_lshared_create(1024);
    const char *g = "tg:{global}:g";
    const char *keys[4] = { "tg:{acme}:t", "tg:{acme}:r:export", "tg:{global}:g",
                            "tg:{other}:t" };
    uint64_t tat[4] = { 1000 + 300, 1000 + 700, 1000 + 500, 0 };
    tg_gcra_limit l = { 100, 10 };
    tg_gcra_result r;

    tg_lshared_charge(sh, &g, &l, 1, 1, 0, 1000, &r);     /* global: a cell */
    cr_assert(r.allowed);
    tg_lshared_raise_n(sh, keys, tat, 4, 1000);
    cr_expect_eq(tg_lshared_held(sh, keys[0], 1000), 300);
    cr_expect_eq(tg_lshared_held(sh, keys[1], 1000), 700);
    cr_expect_eq(tg_lshared_held(sh, keys[2], 1000), 500);
    cr_expect_eq(tg_lshared_held(sh, keys[3], 1000), 0);
    cr_expect_eq(tg_lshared_size(sh), 3);                  /* 2 table keys + the cell */
    tat[0] = 1000 + 100;                                    /* lower: kept */
    tat[1] = 1000 + 900;                                    /* higher: raised */
    tat[2] = 0;
    tat[3] = 900;                                           /* past: no entry */
    tg_lshared_raise_n(sh, keys, tat, 4, 1000);
    cr_expect_eq(tg_lshared_held(sh, keys[0], 1000), 300);
    cr_expect_eq(tg_lshared_held(sh, keys[1], 1000), 900);
    cr_expect_eq(tg_lshared_held(sh, keys[2], 1000), 500);
    cr_expect_eq(tg_lshared_size(sh), 3);
    tg_lshared_destroy(sh);
}

/* The bound holds over all tables together: 5/4 of each table's share. */
Test(lshared, memory_bound)
{
    struct tg_lshared *sh = tg_lshared_create(1024);
    tg_gcra_limit l = { 1000000, 10 };
    char key[64];
    const char *k = key;
    tg_gcra_result r;
    size_t i;

    for (i = 0; i < 20000; i++) {
        snprintf(key, sizeof(key), "tg:{c%zu}:t", i);
        tg_lshared_charge(sh, &k, &l, 1, 1, -1, T0 + i, &r);
        cr_assert(r.allowed);
        cr_assert_leq(tg_lshared_size(sh), 64 * 20, "after %zu", i);
    }
    cr_assert_geq(tg_lshared_size(sh), 1024);
    tg_lshared_destroy(sh);
}

/*
 * Four threads on the real clock charge shared keys as fast as they can:
 * each request is a consumer bucket (4 consumers, shared by all threads)
 * plus the global bucket (hot: a lock-free cell), or both global buckets
 * (two cells: the LSH_BUSY path).  Exact reference: for every bucket, the
 * times of its admitted requests, sorted, must all pass a serial GCRA of
 * the same limit - i.e. no window of length t holds more than
 * burst + t/T of them - and the global bucket, which binds, must admit
 * close to that bound.
 */
#define SH_THREADS 4
#define SH_KEYS    6             /* 4 consumers, 2 globals */
#define SH_MAXLOG  200000

static struct tg_lshared *sh_store;
static const char *sh_names[SH_KEYS] = {
    "tg:{c0}:t", "tg:{c1}:t", "tg:{c2}:t", "tg:{c3}:t",
    "tg:{global}:g", "tg:{global2}:g",
};
static tg_gcra_limit sh_lim[SH_KEYS];
static uint64_t *sh_log[SH_KEYS];      /* admitted nows */
static size_t sh_nlog[SH_KEYS];        /* atomic */
static uint64_t sh_until;

static void *
sh_worker(void *arg)
{
    uint64_t seed = (uintptr_t)arg * 0x9E3779B97F4A7C15ULL + 1, now;

    while ((now = tg_now_us()) < sh_until) {
        const char *keys[2];
        tg_gcra_limit l[2];
        size_t idx[2], b;
        int hot;
        tg_gcra_result r;

        seed ^= seed >> 12; seed ^= seed << 25; seed ^= seed >> 27;
        if (seed % 8 == 0) {
            idx[0] = 4, idx[1] = 5, hot = 1;
        } else {
            idx[0] = (seed >> 8) % 4, idx[1] = 4, hot = 1;
        }
        for (b = 0; b < 2; b++) {
            keys[b] = sh_names[idx[b]];
            l[b] = sh_lim[idx[b]];
        }
        tg_lshared_charge(sh_store, keys, l, 2, 1, hot, now, &r);
        if (r.allowed) {
            for (b = 0; b < 2; b++) {
                size_t at = __atomic_fetch_add(&sh_nlog[idx[b]], 1, __ATOMIC_RELAXED);
                cr_assert_lt(at, SH_MAXLOG);
                sh_log[idx[b]][at] = now;
            }
        }
    }
    return NULL;
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

Test(lshared, threads_never_exceed_the_rate, .timeout = 60)
{
    pthread_t th[SH_THREADS];
    uint64_t start, end;
    size_t i, k;

    sh_store = tg_lshared_create(1 << 16);
    for (k = 0; k < 4; k++) {
        sh_lim[k] = (tg_gcra_limit){ 700, 20 };      /* ~1430/s each */
    }
    sh_lim[4] = (tg_gcra_limit){ 400, 50 };          /* 2500/s: binds */
    sh_lim[5] = (tg_gcra_limit){ 3000, 10 };
    tg_lshared_raise(sh_store, sh_names[5], 1, 0);   /* warm the path */
    for (k = 0; k < SH_KEYS; k++) {
        sh_log[k] = calloc(SH_MAXLOG, sizeof(uint64_t));
        sh_nlog[k] = 0;
    }
    start = tg_now_us();
    sh_until = start + 400000;
    for (i = 0; i < SH_THREADS; i++) {
        cr_assert_eq(pthread_create(&th[i], NULL, sh_worker, (void *)(uintptr_t)i), 0);
    }
    for (i = 0; i < SH_THREADS; i++) {
        pthread_join(th[i], NULL);
    }
    end = tg_now_us();

    for (k = 0; k < SH_KEYS; k++) {
        uint64_t tat = 0, bound = sh_lim[k].burst
                                  + (end - start) / sh_lim[k].interval_us + 1;
        tg_gcra_result r;

        qsort(sh_log[k], sh_nlog[k], sizeof(uint64_t), cmp_u64);
        for (i = 0; i < sh_nlog[k]; i++) {
            tg_gcra_charge(&sh_lim[k], &tat, NULL, 1, 1, sh_log[k][i], &r);
            cr_assert(r.allowed, "%s: admitted #%zu at +%" PRIu64 " us exceeds "
                      "burst + rate*t", sh_names[k], i, sh_log[k][i] - start);
        }
        cr_assert_leq(sh_nlog[k], bound, "%s", sh_names[k]);
        cr_log_info("%s: %zu admitted, bound %" PRIu64, sh_names[k], sh_nlog[k], bound);
        if (k == 4) {
            cr_assert_geq(sh_nlog[k] * 2, bound, "global bucket: %zu of %" PRIu64,
                          sh_nlog[k], bound);
        }
        free(sh_log[k]);
    }
    tg_lshared_destroy(sh_store);
}
