/*
 * test_breaker.c - the circuit breaker with an injected clock: the
 * consecutive rule, the ratio rule and min_requests, the sliding window,
 * the single half-open probe, closing, reopening with doubled (capped)
 * duration, abandon, late results, retry_ms, the exact hook sequence, and
 * a randomized run checking the invariants against the hook's view.
 */
#include <criterion/criterion.h>

#include <inttypes.h>
#include <stdint.h>
#include <string.h>

#include "tollgate/breaker.h"

#define T0 1000000000000ULL    /* an arbitrary "now", far from 0 */

#define C TG_BREAKER_CLOSED
#define O TG_BREAKER_OPEN
#define H TG_BREAKER_HALF_OPEN

/* ---- helpers ---------------------------------------------------------- */

typedef struct rec {
    int n;
    enum tg_breaker_state from[64];
    enum tg_breaker_state to[64];
} rec;

static void
record(void *arg, enum tg_breaker_state from, enum tg_breaker_state to)
{
    rec *r = arg;

    cr_assert_lt(r->n, 64);
    r->from[r->n] = from;
    r->to[r->n] = to;
    r->n++;
}

/* Consecutive rule only (ratio off). */
static tg_breaker_conf
conf_consec(void)
{
    tg_breaker_conf c = {
        .failures = 5, .window_ms = 0, .min_requests = 20, .error_pct = 50,
        .open_ms = 5000, .max_open_ms = 60000, .probes = 1,
    };
    return c;
}

/* Ratio rule only (consecutive set out of reach). */
static tg_breaker_conf
conf_ratio(void)
{
    tg_breaker_conf c = {
        .failures = 1000, .window_ms = 10000, .min_requests = 20,
        .error_pct = 50, .open_ms = 5000, .max_open_ms = 60000, .probes = 1,
    };
    return c;
}

static void
fail_n(tg_breaker *b, unsigned n, uint64_t now)
{
    while (n--) {
        cr_assert(tg_breaker_allow(b, now));
        tg_breaker_failure(b, now);
    }
}

static void
succeed_n(tg_breaker *b, unsigned n, uint64_t now)
{
    while (n--) {
        cr_assert(tg_breaker_allow(b, now));
        tg_breaker_success(b, now);
    }
}

/* ---- consecutive rule ------------------------------------------------- */

Test(breaker, starts_closed)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    tg_breaker_init(&b, &c);
    cr_assert_eq(tg_breaker_state(&b, T0), C);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0), 0);
    for (int i = 0; i < 100; i++)
        cr_assert(tg_breaker_allow(&b, T0 + (uint64_t)i));
}

Test(breaker, consecutive_failures_open)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    tg_breaker_init(&b, &c);
    fail_n(&b, 4, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), C);
    fail_n(&b, 1, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), O);
    cr_assert_not(tg_breaker_allow(&b, T0));
}

Test(breaker, success_resets_consecutive)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    tg_breaker_init(&b, &c);
    for (int round = 0; round < 10; round++) {
        fail_n(&b, 4, T0 + (uint64_t)round);
        succeed_n(&b, 1, T0 + (uint64_t)round);
    }
    cr_assert_eq(tg_breaker_state(&b, T0 + 10), C);
    fail_n(&b, 4, T0 + 10);
    cr_assert_eq(tg_breaker_state(&b, T0 + 10), C);
    fail_n(&b, 1, T0 + 10);
    cr_assert_eq(tg_breaker_state(&b, T0 + 10), O);
}

Test(breaker, failures_zero_means_one)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    c.failures = 0;
    tg_breaker_init(&b, &c);
    fail_n(&b, 1, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), O);
}

/* ---- ratio rule ------------------------------------------------------- */

Test(breaker, ratio_opens_at_threshold)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();

    tg_breaker_init(&b, &c);
    /* 10 ok + 9 err = 19 < min_requests: closed. */
    for (int i = 0; i < 9; i++) {
        succeed_n(&b, 1, T0);
        fail_n(&b, 1, T0);
    }
    succeed_n(&b, 1, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), C);
    /* 10 err of 20 = 50% >= 50%: open. */
    fail_n(&b, 1, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), O);
}

Test(breaker, ratio_below_threshold_stays_closed)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();

    tg_breaker_init(&b, &c);
    /* 50 ok, then errors: 49 of 99 stays below 50%. */
    succeed_n(&b, 50, T0);
    for (int i = 0; i < 49; i++) {
        fail_n(&b, 1, T0 + 100);
        cr_assert_eq(tg_breaker_state(&b, T0 + 100), C, "i=%d", i);
    }
    /* The 50th error of 100 tips it: 50*100 >= 50*100. */
    fail_n(&b, 1, T0 + 100);
    cr_assert_eq(tg_breaker_state(&b, T0 + 100), O);
}

Test(breaker, ratio_needs_min_requests)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();

    tg_breaker_init(&b, &c);
    /* 100% errors, but only 19 calls in the window. */
    fail_n(&b, 19, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), C);
    fail_n(&b, 1, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), O);
}

Test(breaker, ratio_off_when_window_zero)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();

    c.window_ms = 0;
    tg_breaker_init(&b, &c);
    for (int i = 0; i < 500; i++) {
        fail_n(&b, 1, T0);
        succeed_n(&b, 1, T0);
    }
    fail_n(&b, 999, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), C);
}

Test(breaker, success_never_opens)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();

    tg_breaker_init(&b, &c);
    /* 10 err + 9 ok: below min_requests.  The 20th call, a success,
     * would make the ratio 50% but the rules run on failures only. */
    for (int i = 0; i < 9; i++) {
        fail_n(&b, 1, T0);
        succeed_n(&b, 1, T0);
    }
    fail_n(&b, 1, T0);
    succeed_n(&b, 1, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), C);
    fail_n(&b, 1, T0);              /* 11 of 21 */
    cr_assert_eq(tg_breaker_state(&b, T0), O);
}

/* ---- sliding window --------------------------------------------------- */

Test(breaker, window_old_errors_expire)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();
    uint64_t t = T0 - T0 % 1000;    /* start of a second */

    tg_breaker_init(&b, &c);
    fail_n(&b, 19, t);
    cr_assert_eq(tg_breaker_state(&b, t), C);
    /* 10 s later those 19 have left the window: 19 more do not open. */
    fail_n(&b, 19, t + 10000);
    cr_assert_eq(tg_breaker_state(&b, t + 10000), C);
    /* 9.999 s after the second batch it is still in: one more opens. */
    fail_n(&b, 1, t + 19999);
    cr_assert_eq(tg_breaker_state(&b, t + 19999), O);
}

Test(breaker, window_slides_per_second)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();
    uint64_t t = T0 - T0 % 1000;

    c.min_requests = 10;
    tg_breaker_init(&b, &c);
    /* One error per second: the window (10 s) never holds more than 10
     * calls; keep 9 ok per 1 err in each second so the ratio stays 10%. */
    for (int s = 0; s < 200; s++) {
        uint64_t now = t + (uint64_t)s * 1000 + 500;

        succeed_n(&b, 9, now);
        fail_n(&b, 1, now);
        cr_assert_eq(tg_breaker_state(&b, now), C, "s=%d", s);
    }
    /* Now only errors, 2 per second: after the old successes slide out the
     * ratio reaches 50%. */
    {
        uint64_t base = t + 200 * 1000 + 500;
        int opened_at = -1;

        for (int s = 0; s < 20 && opened_at < 0; s++) {
            fail_n(&b, 2, base + (uint64_t)s * 1000);
            if (tg_breaker_state(&b, base + (uint64_t)s * 1000) == O)
                opened_at = s;
        }
        /* At new second k the window holds (9 - k) old seconds of 9 ok +
         * 1 err and (k + 1) new seconds of 2 err: the first k where the
         * ratio reaches 50% is where it must open, not before. */
        int expect = -1;
        for (int k = 0; k < 20 && expect < 0; k++) {
            int old = k < 9 ? 9 - k : 0;
            int err = old + 2 * (k + 1), ok = 9 * old;
            if (err * 100 >= 50 * (err + ok) && err + ok >= 10)
                expect = k;
        }
        cr_assert_eq(opened_at, expect);
        cr_assert_gt(expect, 0);
    }
}

Test(breaker, window_bucket_reused_after_a_minute)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();
    uint64_t t = T0 - T0 % 1000;

    c.window_ms = 60000;
    tg_breaker_init(&b, &c);
    fail_n(&b, 19, t);              /* bucket (t/1000) % 60 */
    /* Exactly 60 s later the same ring slot is reused, stale counts must
     * not be added to the new second's. */
    fail_n(&b, 19, t + 60000);
    cr_assert_eq(tg_breaker_state(&b, t + 60000), C);
    fail_n(&b, 1, t + 60000);
    cr_assert_eq(tg_breaker_state(&b, t + 60000), O);
}

Test(breaker, window_capped_at_sixty_seconds)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();
    uint64_t t = T0 - T0 % 1000;

    c.window_ms = 3600000;          /* an hour: taken as 60 s */
    tg_breaker_init(&b, &c);
    fail_n(&b, 19, t);
    fail_n(&b, 19, t + 60000);
    cr_assert_eq(tg_breaker_state(&b, t + 60000), C);
}

/* ---- half-open -------------------------------------------------------- */

Test(breaker, half_open_single_probe)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    tg_breaker_init(&b, &c);
    fail_n(&b, 5, T0);
    cr_assert_not(tg_breaker_allow(&b, T0 + 4999));
    cr_assert_eq(tg_breaker_state(&b, T0 + 4999), O);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5000), H);   /* lazily */
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    cr_assert_eq(tg_breaker_state(&b, T0 + 5000), H);
    cr_assert_not(tg_breaker_allow(&b, T0 + 5000));
    cr_assert_not(tg_breaker_allow(&b, T0 + 9000));
    cr_assert_not(tg_breaker_allow(&b, T0 + 100000));
}

Test(breaker, probe_success_closes)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    tg_breaker_init(&b, &c);
    fail_n(&b, 5, T0);
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    tg_breaker_success(&b, T0 + 5010);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5010), C);
    cr_assert(tg_breaker_allow(&b, T0 + 5010));
    cr_assert(tg_breaker_allow(&b, T0 + 5010));
    /* Counters were reset: 4 failures do not reopen it. */
    fail_n(&b, 4, T0 + 5020);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5020), C);
    fail_n(&b, 1, T0 + 5020);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5020), O);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 5020), 5000);
}

Test(breaker, probe_success_resets_window)
{
    tg_breaker b;
    tg_breaker_conf c = conf_ratio();

    c.failures = 1000;
    tg_breaker_init(&b, &c);
    fail_n(&b, 20, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), O);
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    tg_breaker_success(&b, T0 + 5000);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5000), C);
    /* The 20 old errors are forgotten although still inside the window. */
    fail_n(&b, 19, T0 + 5000);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5000), C);
}

Test(breaker, several_probes_needed)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    c.probes = 3;
    tg_breaker_init(&b, &c);
    fail_n(&b, 5, T0);
    for (int i = 0; i < 2; i++) {
        cr_assert(tg_breaker_allow(&b, T0 + 5000));
        cr_assert_not(tg_breaker_allow(&b, T0 + 5000));
        tg_breaker_success(&b, T0 + 5000);
        cr_assert_eq(tg_breaker_state(&b, T0 + 5000), H, "i=%d", i);
    }
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    tg_breaker_success(&b, T0 + 5000);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5000), C);
}

Test(breaker, probe_failure_after_some_successes_reopens)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    c.probes = 3;
    tg_breaker_init(&b, &c);
    fail_n(&b, 5, T0);
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    tg_breaker_success(&b, T0 + 5000);
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    tg_breaker_failure(&b, T0 + 5000);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5000), O);
    /* The next half-open period needs 3 fresh successes. */
    cr_assert(tg_breaker_allow(&b, T0 + 15000));
    tg_breaker_success(&b, T0 + 15000);
    cr_assert(tg_breaker_allow(&b, T0 + 15000));
    tg_breaker_success(&b, T0 + 15000);
    cr_assert_eq(tg_breaker_state(&b, T0 + 15000), H);
    cr_assert(tg_breaker_allow(&b, T0 + 15000));
    tg_breaker_success(&b, T0 + 15000);
    cr_assert_eq(tg_breaker_state(&b, T0 + 15000), C);
}

Test(breaker, probe_failure_doubles_with_cap)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();
    uint64_t expect[] = { 10000, 20000, 40000, 60000, 60000, 60000 };
    uint64_t now = T0;

    tg_breaker_init(&b, &c);
    fail_n(&b, 5, now);
    cr_assert_eq(tg_breaker_retry_ms(&b, now), 5000);
    now += 5000;
    for (size_t i = 0; i < sizeof(expect) / sizeof(expect[0]); i++) {
        cr_assert(tg_breaker_allow(&b, now));
        tg_breaker_failure(&b, now);
        cr_assert_eq(tg_breaker_state(&b, now), O);
        cr_assert_eq(tg_breaker_retry_ms(&b, now), expect[i],
                     "i=%zu got %" PRIu64, i, tg_breaker_retry_ms(&b, now));
        cr_assert_not(tg_breaker_allow(&b, now + expect[i] - 1));
        now += expect[i];
    }
    /* A probe success resets the duration to open_ms. */
    cr_assert(tg_breaker_allow(&b, now));
    tg_breaker_success(&b, now);
    cr_assert_eq(tg_breaker_state(&b, now), C);
    fail_n(&b, 5, now);
    cr_assert_eq(tg_breaker_retry_ms(&b, now), 5000);
}

Test(breaker, max_below_open_is_raised)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    c.max_open_ms = 1000;           /* < open_ms: taken as open_ms */
    tg_breaker_init(&b, &c);
    fail_n(&b, 5, T0);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0), 5000);
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    tg_breaker_failure(&b, T0 + 5000);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 5000), 5000);
}

Test(breaker, abandon_frees_probe_slot)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    tg_breaker_init(&b, &c);
    fail_n(&b, 5, T0);
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    cr_assert_not(tg_breaker_allow(&b, T0 + 5000));
    tg_breaker_abandon(&b, T0 + 5001);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5001), H);
    cr_assert(tg_breaker_allow(&b, T0 + 5002));
    cr_assert_not(tg_breaker_allow(&b, T0 + 5002));
    tg_breaker_success(&b, T0 + 5003);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5003), C);
}

Test(breaker, abandon_elsewhere_is_noop)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();
    rec r = { 0 };

    tg_breaker_init(&b, &c);
    tg_breaker_set_hook(&b, record, &r);
    tg_breaker_abandon(&b, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), C);
    fail_n(&b, 4, T0);
    tg_breaker_abandon(&b, T0);
    fail_n(&b, 1, T0);              /* abandon did not reset the count */
    cr_assert_eq(tg_breaker_state(&b, T0), O);
    tg_breaker_abandon(&b, T0 + 100);
    cr_assert_eq(tg_breaker_state(&b, T0 + 100), O);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 100), 4900);
    cr_assert_eq(r.n, 1);
}

/* ---- late results ----------------------------------------------------- */

Test(breaker, late_results_while_open_ignored)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();
    rec r = { 0 };

    tg_breaker_init(&b, &c);
    tg_breaker_set_hook(&b, record, &r);
    /* 20 calls in flight; 5 fail and open it, the rest come back late. */
    for (int i = 0; i < 20; i++)
        cr_assert(tg_breaker_allow(&b, T0));
    for (int i = 0; i < 5; i++)
        tg_breaker_failure(&b, T0 + 10);
    cr_assert_eq(tg_breaker_state(&b, T0 + 10), O);
    for (int i = 0; i < 5; i++)
        tg_breaker_success(&b, T0 + 20);
    for (int i = 0; i < 5; i++)
        tg_breaker_failure(&b, T0 + 30);
    cr_assert_eq(tg_breaker_state(&b, T0 + 30), O);
    /* Neither closed it nor pushed the deadline. */
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 30), 4980);
    /* Late ones after the period expired but before any probe: still
     * ignored, and a probe is still available. */
    tg_breaker_failure(&b, T0 + 6000);
    tg_breaker_success(&b, T0 + 6000);
    cr_assert_eq(tg_breaker_state(&b, T0 + 6000), H);
    cr_assert(tg_breaker_allow(&b, T0 + 6000));
    cr_assert_not(tg_breaker_allow(&b, T0 + 6000));
    tg_breaker_success(&b, T0 + 6001);
    cr_assert_eq(tg_breaker_state(&b, T0 + 6001), C);
    /* Exactly the three transitions. */
    cr_assert_eq(r.n, 3);
}

Test(breaker, late_results_half_open_without_probe_ignored)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    c.probes = 2;
    tg_breaker_init(&b, &c);
    fail_n(&b, 5, T0);
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    tg_breaker_success(&b, T0 + 5000);   /* probe 1 of 2; slot free */
    cr_assert_eq(tg_breaker_state(&b, T0 + 5000), H);
    /* Outcomes with no probe in flight are late: ignored. */
    tg_breaker_failure(&b, T0 + 5001);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5001), H);
    tg_breaker_success(&b, T0 + 5001);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5001), H);
    cr_assert(tg_breaker_allow(&b, T0 + 5002));
    tg_breaker_success(&b, T0 + 5002);
    cr_assert_eq(tg_breaker_state(&b, T0 + 5002), C);
}

/* ---- retry_ms --------------------------------------------------------- */

Test(breaker, retry_ms_values)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    tg_breaker_init(&b, &c);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0), 0);
    fail_n(&b, 5, T0);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0), 5000);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 1), 4999);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 4999), 1);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 5000), 0);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 999999), 0);
    /* A clock that went backwards: the whole duration remains. */
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 - 10), 5000);
    cr_assert_not(tg_breaker_allow(&b, T0 - 10));
    cr_assert(tg_breaker_allow(&b, T0 + 5000));
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 5000), 0);  /* half-open */
    tg_breaker_failure(&b, T0 + 5500);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 5500), 10000);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0 + 8000), 7500);
}

Test(breaker, open_ms_zero)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    c.open_ms = 0;
    c.max_open_ms = 0;
    tg_breaker_init(&b, &c);
    fail_n(&b, 5, T0);
    cr_assert_eq(tg_breaker_state(&b, T0), H);
    cr_assert_eq(tg_breaker_retry_ms(&b, T0), 0);
    cr_assert(tg_breaker_allow(&b, T0));
    cr_assert_not(tg_breaker_allow(&b, T0));
    tg_breaker_failure(&b, T0);
    cr_assert(tg_breaker_allow(&b, T0));
}

/* ---- hook ------------------------------------------------------------- */

Test(breaker, hook_exact_sequence)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();
    rec r = { 0 };
    enum tg_breaker_state ef[] = { C, O, H, O, H, C, O };
    enum tg_breaker_state et[] = { O, H, O, H, C, O, H };

    tg_breaker_init(&b, &c);
    tg_breaker_set_hook(&b, record, &r);
    fail_n(&b, 5, T0);                          /* C -> O */
    cr_assert_eq(r.n, 1);
    /* Lazy reporting does not fire the hook; allow() does. */
    cr_assert_eq(tg_breaker_state(&b, T0 + 5000), H);
    cr_assert_eq(r.n, 1);
    cr_assert_not(tg_breaker_allow(&b, T0 + 4999));
    cr_assert_eq(r.n, 1);
    cr_assert(tg_breaker_allow(&b, T0 + 5000)); /* O -> H */
    cr_assert_not(tg_breaker_allow(&b, T0 + 5000));
    tg_breaker_failure(&b, T0 + 5000);          /* H -> O */
    cr_assert(tg_breaker_allow(&b, T0 + 15000));/* O -> H */
    tg_breaker_abandon(&b, T0 + 15000);         /* no transition */
    cr_assert(tg_breaker_allow(&b, T0 + 15000));
    tg_breaker_success(&b, T0 + 15000);         /* H -> C */
    succeed_n(&b, 3, T0 + 15000);               /* no transition */
    fail_n(&b, 5, T0 + 16000);                  /* C -> O */
    tg_breaker_failure(&b, T0 + 16000);         /* late: nothing */
    tg_breaker_success(&b, T0 + 16000);         /* late: nothing */
    cr_assert(tg_breaker_allow(&b, T0 + 21000));/* O -> H */

    cr_assert_eq(r.n, (int)(sizeof(ef) / sizeof(ef[0])));
    for (int i = 0; i < r.n; i++) {
        cr_assert_eq(r.from[i], ef[i], "i=%d", i);
        cr_assert_eq(r.to[i], et[i], "i=%d", i);
    }
}

static void
reentrant_hook(void *arg, enum tg_breaker_state from, enum tg_breaker_state to)
{
    tg_breaker *b = arg;

    /* The breaker is consistent when the hook runs. */
    cr_assert_eq(tg_breaker_state(b, T0 + 5000), to);
    if (to == O)
        cr_assert_gt(tg_breaker_retry_ms(b, T0), 0);
}

Test(breaker, hook_sees_new_state)
{
    tg_breaker b;
    tg_breaker_conf c = conf_consec();

    c.open_ms = 6000;
    tg_breaker_init(&b, &c);
    tg_breaker_set_hook(&b, reentrant_hook, &b);
    fail_n(&b, 5, T0);
    tg_breaker_set_hook(&b, NULL, NULL);
    cr_assert_eq(tg_breaker_state(&b, T0), O);
}

Test(breaker, state_names)
{
    cr_assert_str_eq(tg_breaker_state_name(TG_BREAKER_CLOSED), "closed");
    cr_assert_str_eq(tg_breaker_state_name(TG_BREAKER_OPEN), "open");
    cr_assert_str_eq(tg_breaker_state_name(TG_BREAKER_HALF_OPEN), "half-open");
}

/* ---- randomized ------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t
rng(void)
{
    /* xorshift64*: deterministic across platforms. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

/* What the hook tells the test, checked against the breaker's answers. */
typedef struct watch {
    enum tg_breaker_state state;  /* last "to" */
    uint64_t now;                 /* the test's clock when called */
    uint64_t opened_at;           /* now at the last ->OPEN */
    uint64_t open_for;            /* retry_ms right after the last ->OPEN */
    uint64_t last_open_for;       /* open_for of the previous open period */
    int      from_half;           /* last ->OPEN came from HALF_OPEN */
    tg_breaker *b;
    const tg_breaker_conf *c;
    unsigned transitions;
} watch;

static void
watch_hook(void *arg, enum tg_breaker_state from, enum tg_breaker_state to)
{
    watch *w = arg;

    cr_assert_eq(from, w->state, "hook from %d, last to %d", from, w->state);
    cr_assert((from == C && to == O) || (from == O && to == H)
              || (from == H && to == O) || (from == H && to == C),
              "bad transition %d -> %d", from, to);
    w->state = to;
    w->transitions++;
    if (to == O) {
        w->last_open_for = w->open_for;
        w->opened_at = w->now;
        w->open_for = tg_breaker_retry_ms(w->b, w->now);
        w->from_half = from == H;
        if (w->from_half) {
            uint64_t d = w->last_open_for * 2;
            if (d > w->c->max_open_ms)
                d = w->c->max_open_ms;
            cr_assert_eq(w->open_for, d);
        } else {
            cr_assert_eq(w->open_for, w->c->open_ms);
        }
    }
}

static void
random_run(uint64_t seed, const tg_breaker_conf *c)
{
    tg_breaker b;
    watch w = { 0 };
    uint64_t now = T0;
    unsigned inflight = 0;        /* allowed calls not yet reported */
    unsigned allows = 0;

    rng_state = seed;
    tg_breaker_init(&b, c);
    w.state = C;
    w.b = &b;
    w.c = c;
    tg_breaker_set_hook(&b, watch_hook, &w);

    for (int step = 0; step < 200000; step++) {
        uint64_t r = rng();
        enum tg_breaker_state s;

        /* Time: mostly small steps, sometimes long jumps. */
        switch (r % 16) {
        case 0:  now += rng() % 70000; break;
        case 1:
        case 2:  now += rng() % 3000;  break;
        default: now += rng() % 50;    break;
        }
        w.now = now;
        r = rng();
        s = tg_breaker_state(&b, now);
        cr_assert(s == C || s == O || s == H, "state %d", s);
        if (w.state == O && now - w.opened_at >= w.open_for)
            cr_assert_eq(s, H);
        else
            cr_assert_eq(s, w.state);
        if (s == O) {
            cr_assert_lt(now - w.opened_at, w.open_for);
            cr_assert_eq(tg_breaker_retry_ms(&b, now),
                         w.open_for - (now - w.opened_at));
        } else {
            cr_assert_eq(tg_breaker_retry_ms(&b, now), 0);
        }

        if (r % 3 == 0 || inflight == 0) {
            int ok = tg_breaker_allow(&b, now);

            if (ok) {
                /* Never while OPEN before the period has elapsed. */
                cr_assert(!(s == O && now - w.opened_at < w.open_for),
                          "allowed at +%" PRIu64 " of %" PRIu64,
                          now - w.opened_at, w.open_for);
                inflight++;
                allows++;
            } else {
                cr_assert_neq(s, C);
            }
        } else {
            /* Report one in-flight call; failure-heavy so it trips. */
            unsigned k = (unsigned)(rng() % 10);

            if (k < 4)
                tg_breaker_failure(&b, now);
            else if (k < 9)
                tg_breaker_success(&b, now);
            else
                tg_breaker_abandon(&b, now);
            inflight--;
        }
        /* Half-open never has more than one probe in flight. */
        if (tg_breaker_state(&b, now) == H) {
            int got = tg_breaker_allow(&b, now);
            if (got) {
                inflight++;
                cr_assert_not(tg_breaker_allow(&b, now));
            }
        }
    }
    /* The run exercised the machine, not just the closed state. */
    cr_assert_gt(w.transitions, 20, "seed %" PRIu64, seed);
    cr_assert_gt(allows, 1000);
}

Test(breaker, randomized_invariants)
{
    tg_breaker_conf cs[] = {
        { 5, 10000, 20, 50, 5000, 60000, 1 },
        { 3, 0, 0, 0, 1000, 8000, 2 },
        { 1000, 5000, 10, 30, 2000, 30000, 3 },
        { 2, 60000, 1, 100, 500, 500, 1 },
    };

    for (size_t i = 0; i < sizeof(cs) / sizeof(cs[0]); i++)
        for (uint64_t seed = 1; seed <= 5; seed++)
            random_run(seed * 0x9E3779B97F4A7C15ULL + i, &cs[i]);
}
