/*
 * test_throttle.c - dynamic throttling without sockets: the AIMD step, the
 * latency histogram, the report's arguments and the parsing of the
 * script's reply, and the process's throttle closing windows on an
 * injected clock (store: local, so no Redis).
 */
#include <criterion/criterion.h>

#include <string.h>

#include "tollgate/conf.h"
#include "tollgate/metrics.h"
#include "tollgate/throttle.h"

static const tg_throttle_params P = { .max_error_ratio = 0.05, .min_factor = 250 };

static tg_throttle_window
win(uint64_t n, uint64_t slow, uint64_t errors)
{
    tg_throttle_window w = { n, slow, errors };
    return w;
}

/* ---- the step ------------------------------------------------------------ */

Test(throttle_step, halves_when_p99_over_target)
{
    tg_throttle_window w = win(100, 2, 0);        /* 2% over the target */

    cr_assert_eq(tg_throttle_step(1000, &w, &P), 500);
    cr_assert_eq(tg_throttle_step(500, &w, &P), 250);
    cr_assert_eq(tg_throttle_step(250, &w, &P), 250, "floor: min_factor");
    cr_assert_eq(tg_throttle_step(300, &w, &P), 250, "never below min_factor");
}

Test(throttle_step, p99_boundary_is_exact)
{
    tg_throttle_window one = win(100, 1, 0);      /* p99 is the 99th: fast */
    tg_throttle_window two = win(100, 2, 0);      /* the 99th is slow */

    cr_assert_eq(tg_throttle_step(1000, &one, &P), 1000);
    cr_assert_eq(tg_throttle_step(1000, &two, &P), 500);
}

Test(throttle_step, errors_over_ratio)
{
    tg_throttle_window at = win(100, 0, 5);       /* exactly 5%: not over */
    tg_throttle_window over = win(100, 0, 6);

    cr_assert_eq(tg_throttle_step(700, &at, &P), 800);
    cr_assert_eq(tg_throttle_step(700, &over, &P), 350);
}

Test(throttle_step, recovers_by_a_tenth_up_to_one)
{
    tg_throttle_window ok = win(1000, 0, 0);
    unsigned f = 250;
    int windows = 0;

    while (f < 1000) {
        f = tg_throttle_step(f, &ok, &P);
        windows++;
    }
    cr_assert_eq(f, 1000);
    cr_assert_eq(windows, 8, "0.25 -> 1 in 8 clear windows, got %d", windows);
    cr_assert_eq(tg_throttle_step(1000, &ok, &P), 1000);
}

Test(throttle_step, too_few_samples_is_not_judged)
{
    tg_throttle_window few = win(TG_THROTTLE_MIN_SAMPLES - 1,
                                 TG_THROTTLE_MIN_SAMPLES - 1, TG_THROTTLE_MIN_SAMPLES - 1);
    tg_throttle_window none = win(0, 0, 0);
    tg_throttle_window enough = win(TG_THROTTLE_MIN_SAMPLES, TG_THROTTLE_MIN_SAMPLES, 0);

    cr_assert_eq(tg_throttle_step(500, &few, &P), 600, "quiet: recovers");
    cr_assert_eq(tg_throttle_step(500, &none, &P), 600);
    cr_assert_eq(tg_throttle_step(500, &enough, &P), 250);
}

Test(throttle_step, min_factor_permille)
{
    cr_assert_eq(tg_throttle_min_permille(0.25), 250);
    cr_assert_eq(tg_throttle_min_permille(1.0), 1000);
    cr_assert_eq(tg_throttle_min_permille(0.0001), 1, "never 0");
    cr_assert_eq(tg_throttle_min_permille(0.3334), 333);
}

/* ---- the histogram ---------------------------------------------------------- */

Test(throttle_hist, buckets_cover_every_time_in_order)
{
    unsigned prev = 0;

    for (uint64_t us = 0; us < 5000000; us += 1 + us / 64) {
        unsigned b = tg_throttle_bucket(us);
        cr_assert(b < TG_THROTTLE_BUCKETS);
        cr_assert(b >= prev, "not monotonic at %llu", (unsigned long long)us);
        cr_assert(us <= tg_throttle_bucket_max(b), "%llu above its bucket's bound",
                  (unsigned long long)us);
        cr_assert(b == 0 || us > tg_throttle_bucket_max(b - 1),
                  "%llu belongs to the bucket below", (unsigned long long)us);
        /* at most one eighth of an octave above the time */
        cr_assert(tg_throttle_bucket_max(b) <= us + us / 8 + 1);
        prev = b;
    }
    cr_assert_eq(tg_throttle_bucket(UINT64_MAX), TG_THROTTLE_BUCKETS - 1);
    cr_assert_eq(tg_throttle_bucket((uint64_t)1 << 32), TG_THROTTLE_BUCKETS - 1);
    cr_assert_eq(tg_throttle_bucket(((uint64_t)1 << 32) - 1), TG_THROTTLE_BUCKETS - 1);
}

Test(throttle_hist, p99_nearest_rank)
{
    uint64_t h[TG_THROTTLE_BUCKETS] = { 0 };

    cr_assert_eq(tg_throttle_p99_us(h, 0), 0);
    h[tg_throttle_bucket(1000)] = 99;              /* 99 x 1 ms */
    h[tg_throttle_bucket(800000)] = 1;             /* 1 x 800 ms */
    cr_assert_eq(tg_throttle_p99_us(h, 100), tg_throttle_bucket_max(tg_throttle_bucket(1000)));
    h[tg_throttle_bucket(1000)] = 98;
    h[tg_throttle_bucket(800000)] = 2;
    cr_assert_eq(tg_throttle_p99_us(h, 100),
                 tg_throttle_bucket_max(tg_throttle_bucket(800000)));
}

/* ---- the report ------------------------------------------------------------- */

Test(throttle_report, arguments)
{
    tg_throttle_report r;

    tg_throttle_report_build(&r, "tg:", "host:42:0badcafe", 250, 15000);
    cr_assert_str_eq(r.key, "tg:{throttle}");
    cr_assert_str_eq(r.args[0], "host:42:0badcafe");
    cr_assert_str_eq(r.args[1], "250");
    cr_assert_str_eq(r.args[2], "15000");
    tg_throttle_report_build(&r, "", "i", 0, 300);
    cr_assert_str_eq(r.key, "{throttle}");
    cr_assert_str_eq(r.args[1], "1", "a factor is never reported as 0");
    tg_throttle_report_build(&r, "p", "i", 5000, 300);
    cr_assert_str_eq(r.args[1], "1000");
}

Test(throttle_report, script_shape)
{
    /* the contract the parser relies on */
    cr_assert(strstr(tg_throttle_lua, "KEYS[1]") != NULL);
    cr_assert(strstr(tg_throttle_lua, "return string.format('%d %d', min, n)") != NULL);
    cr_assert(strstr(tg_throttle_lua, "redis.call('TIME')") != NULL);
}

Test(throttle_report, reply_parsing)
{
    static const struct { const char *s; unsigned min, n; const char *why; } cases[] = {
        { "250 2", 250, 2, NULL },
        { "1000 1", 1000, 1, NULL },
        { "1 17", 1, 17, NULL },
        { "0 1", 0, 0, "factor out of 1..1000" },
        { "1001 1", 0, 0, "factor out of 1..1000" },
        { "250 0", 0, 0, "no live report" },
        { "250", 0, 0, "not \"<factor> <reports>\"" },
        { "250 2 3", 0, 0, "not \"<factor> <reports>\"" },
        { "250  2", 0, 0, "not \"<factor> <reports>\"" },
        { " 250 2", 0, 0, "not \"<factor> <reports>\"" },
        { "-1 2", 0, 0, "not \"<factor> <reports>\"" },
        { "0.5 2", 0, 0, "not \"<factor> <reports>\"" },
        { "99999999999999 2", 0, 0, "not \"<factor> <reports>\"" },
        { "", 0, 0, "not \"<factor> <reports>\"" },
        { "OK", 0, 0, "not \"<factor> <reports>\"" },
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        unsigned min = 7, n = 7;
        const char *why = NULL;
        tg_rc rc = tg_throttle_parse_reply(cases[i].s, strlen(cases[i].s), &min, &n, &why);

        if (cases[i].why == NULL) {
            cr_assert_eq(rc, TG_OK, "\"%s\": %s", cases[i].s, why ? why : "");
            cr_assert_eq(min, cases[i].min, "\"%s\"", cases[i].s);
            cr_assert_eq(n, cases[i].n, "\"%s\"", cases[i].s);
        } else {
            cr_assert_eq(rc, TG_ERR, "\"%s\" accepted", cases[i].s);
            cr_assert_not_null(why);
            cr_assert(strstr(why, cases[i].why) != NULL, "\"%s\": %s", cases[i].s, why);
            cr_assert_eq(min, 7, "untouched on error");
        }
    }
    {
        unsigned min, n;
        const char *why = NULL;
        cr_assert_eq(tg_throttle_parse_reply(NULL, 0, &min, &n, &why), TG_ERR);
        cr_assert_not_null(why);
        /* not NUL-terminated: only len bytes are read */
        cr_assert_eq(tg_throttle_parse_reply("250 21", 5, &min, &n, &why), TG_OK);
        cr_assert_eq(n, 2);
    }
}

/* ---- the process's throttle, store: local ------------------------------------ */

#define MIN "listen: [ { address: 127.0.0.1:8080 } ]\n" \
            "upstream: { servers: [127.0.0.1:8000] }\n" \
            "rate_limits:\n" \
            "  basic: { requests_per_minute: 60, burst_limit: 10 }\n"

static tg_conf *
load(const char *yaml)
{
    static char err[TG_CONF_ERRLEN];
    tg_conf *c = tg_conf_load_string("t.yaml", yaml, strlen(yaml), err, sizeof(err));

    cr_assert_not_null(c, "%s", err);
    return c;
}

static void
feed(unsigned n, uint64_t rtt_us, unsigned errors)
{
    for (unsigned i = 0; i < n; i++) {
        tg_throttle_record(rtt_us, i < errors);
    }
}

Test(throttle_proc, windows_drop_and_recover)
{
    tg_conf *c = load(MIN "adaptive:\n  throttle: { target_p99_ms: 100, "
                      "max_error_ratio: 0.1, min_factor: 0.3, window_ms: 200 }\n");

    tg_throttle_init(c);
    cr_assert_eq(tg_throttle_factor(), 1000);
    tg_throttle_tick(c, NULL, "p", 10000);              /* the first window starts */
    feed(50, 150000, 0);                                /* all over 100 ms */
    tg_throttle_tick(c, NULL, "p", 10100);              /* not over yet */
    cr_assert_eq(tg_throttle_factor(), 1000);
    tg_throttle_tick(c, NULL, "p", 10200);
    cr_assert_eq(tg_throttle_factor(), 500);
    feed(50, 150000, 0);
    tg_throttle_tick(c, NULL, "p", 10400);
    cr_assert_eq(tg_throttle_factor(), 300, "floor at min_factor 0.3");
    feed(50, 1000, 10);                                 /* fast, 20% errors */
    tg_throttle_tick(c, NULL, "p", 10600);
    cr_assert_eq(tg_throttle_factor(), 300);
    feed(50, 1000, 5);                                  /* fast, 10%: clear */
    tg_throttle_tick(c, NULL, "p", 10800);
    cr_assert_eq(tg_throttle_factor(), 400);
    for (uint64_t t = 11000; t <= 12200; t += 200) {    /* quiet windows */
        tg_throttle_tick(c, NULL, "p", t);
    }
    cr_assert_eq(tg_throttle_factor(), 1000);
    tg_throttle_deinit();
    tg_conf_unref(c);
}

Test(throttle_proc, off_records_nothing_and_stays_one)
{
    tg_conf *c = load(MIN);

    tg_throttle_init(c);
    tg_throttle_tick(c, NULL, "p", 1000);
    feed(100, 10000000, 100);
    tg_throttle_tick(c, NULL, "p", 7000);
    cr_assert_eq(tg_throttle_factor(), 1000);
    tg_throttle_deinit();
    tg_conf_unref(c);
}

/* A reload that turns throttle: off puts the factor back to 1 at the next
 * window (the tick reads the worker's configuration). */
Test(throttle_proc, reload_turns_it_off)
{
    tg_conf *on = load(MIN "adaptive:\n  throttle: { target_p99_ms: 10, window_ms: 100 }\n");
    tg_conf *off = load(MIN "adaptive: {}\n");

    tg_throttle_init(on);
    tg_throttle_tick(on, NULL, "p", 1000);
    feed(40, 50000, 0);
    tg_throttle_tick(on, NULL, "p", 1100);
    cr_assert_eq(tg_throttle_factor(), 500);
    tg_throttle_tick(off, NULL, "p", 1200);
    cr_assert_eq(tg_throttle_factor(), 1000);
    tg_throttle_deinit();
    tg_conf_unref(on);
    tg_conf_unref(off);
}
