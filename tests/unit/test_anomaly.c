/*
 * test_anomaly.c - the Space-Saving sketch (exact heavy hitters in a
 * skewed stream, its error and memory bounds), the per-key baseline, and
 * the engine: two workers' sketches merged per window, a spike found.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "tollgate/anomaly.h"
#include "tollgate/conf.h"

/* ---- the sketch ------------------------------------------------------------ */

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t
next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* sqrt without libm (Newton) */
static double
root(double x)
{
    double r = x > 1 ? x : 1;
    for (int i = 0; i < 60; i++) {
        r = 0.5 * (r + x / r);
    }
    return r;
}

static uint64_t
item_count(const tg_sketch_item *it, size_t n, const char *id, int *found)
{
    for (size_t i = 0; i < n; i++) {
        if (strcmp(it[i].id, id) == 0) {
            *found = 1;
            return it[i].count;
        }
    }
    *found = 0;
    return 0;
}

Test(sketch, exact_below_capacity)
{
    struct tg_sketch *s = tg_sketch_create(8);
    tg_sketch_item it[8];
    size_t n;

    for (int i = 0; i < 5; i++) {
        tg_sketch_add(s, "a");
    }
    for (int i = 0; i < 3; i++) {
        tg_sketch_add(s, "b");
    }
    tg_sketch_add(s, "c");
    n = tg_sketch_top(s, it, 8);
    cr_assert_eq(n, 3);
    cr_assert_str_eq(it[0].id, "a");
    cr_assert_eq(it[0].count, 5);
    cr_assert_str_eq(it[1].id, "b");
    cr_assert_eq(it[1].count, 3);
    cr_assert_str_eq(it[2].id, "c");
    cr_assert_eq(it[2].count, 1);
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(it[i].err, 0);
    }
    cr_assert_eq(tg_sketch_total(s), 9);
    cr_assert_eq(tg_sketch_floor(s), 0, "not full: nothing was evicted");
    tg_sketch_destroy(s);
}

/* A Zipf stream over 2000 keys (key i has weight 1/(i+1)^1.5), shuffled:
 * the sketch of 200 counters finds every key above N/200, each count
 * within [true, true + N/200], and the top 10 exactly, in their order. */
Test(sketch, skewed_stream_heavy_hitters_and_error_bound)
{
    enum { KEYS = 2000, CAP = 200 };
    static uint64_t truth[KEYS];
    static uint32_t stream[400000];
    double w[KEYS], sum = 0;
    size_t n = 0, i, k;
    struct tg_sketch *s = tg_sketch_create(CAP);
    tg_sketch_item it[CAP];
    uint64_t total, bound, counted = 0;
    char id[32];

    memset(truth, 0, sizeof truth);
    for (i = 0; i < KEYS; i++) {
        w[i] = 1.0 / ((double)(i + 1) * root((double)(i + 1)));
        sum += w[i];
    }
    for (i = 0; i < KEYS; i++) {
        uint64_t c = (uint64_t)(w[i] / sum * 300000.0) + 1;
        for (k = 0; k < c && n < sizeof stream / sizeof *stream; k++) {
            stream[n++] = (uint32_t)i;
        }
    }
    for (i = n - 1; i > 0; i--) {                  /* Fisher-Yates */
        size_t j = next_rand() % (i + 1);
        uint32_t t = stream[i];
        stream[i] = stream[j];
        stream[j] = t;
    }
    for (i = 0; i < n; i++) {
        snprintf(id, sizeof id, "key-%u", stream[i]);
        tg_sketch_add(s, id);
        truth[stream[i]]++;
    }
    total = tg_sketch_total(s);
    cr_assert_eq(total, n);
    bound = total / CAP;
    cr_assert_leq(tg_sketch_floor(s), bound, "floor %llu > N/m %llu",
                  (unsigned long long)tg_sketch_floor(s), (unsigned long long)bound);
    k = tg_sketch_top(s, it, CAP);
    cr_assert_eq(k, CAP);
    for (i = 0; i < k; i++) {
        unsigned idx = (unsigned)atoi(it[i].id + 4);
        counted += it[i].count;
        cr_assert_geq(it[i].count, truth[idx], "%s under-counted", it[i].id);
        cr_assert_leq(it[i].count - it[i].err, truth[idx], "%s: guaranteed above true",
                      it[i].id);
        cr_assert_leq(it[i].count - truth[idx], bound, "%s: over by more than N/m",
                      it[i].id);
        cr_assert_leq(it[i].err, bound);
    }
    cr_assert_eq(counted, total, "Space-Saving: the counts sum to N");
    for (i = 0; i < KEYS; i++) {
        if (truth[i] > bound) {
            int found;
            snprintf(id, sizeof id, "key-%zu", i);
            item_count(it, k, id, &found);
            cr_assert(found, "%s (%llu > N/m) missing", id, (unsigned long long)truth[i]);
        }
    }
    for (i = 0; i < 10; i++) {
        snprintf(id, sizeof id, "key-%zu", i);
        cr_assert_str_eq(it[i].id, id, "rank %zu: %s", i, it[i].id);
        cr_assert_eq(it[i].err, 0, "a heavy hitter is counted exactly");
        cr_assert_eq(it[i].count, truth[i]);
    }
    tg_sketch_destroy(s);
}

/* Memory is fixed at creation: a million distinct keys change nothing. */
Test(sketch, memory_bound)
{
    struct tg_sketch *s = tg_sketch_create(64);
    size_t bytes = tg_sketch_bytes(s);
    char id[32];

    cr_assert_lt(bytes, 64 * 256 + 1024, "%zu bytes for 64 keys", bytes);
    for (unsigned i = 0; i < 1000000; i++) {
        snprintf(id, sizeof id, "anon:10.%u.%u.%u", i >> 16, (i >> 8) & 255, i & 255);
        tg_sketch_add(s, id);
    }
    cr_assert_eq(tg_sketch_bytes(s), bytes);
    cr_assert_eq(tg_sketch_size(s), 64);
    cr_assert_eq(tg_sketch_total(s), 1000000);
    tg_sketch_destroy(s);
}

/* Ids are cut at TG_ANOMALY_ID_MAX: one long id is one key. */
Test(sketch, long_ids_are_cut)
{
    struct tg_sketch *s = tg_sketch_create(4);
    char a[400], b[400];
    tg_sketch_item it[4];

    memset(a, 'x', sizeof a - 1);
    a[sizeof a - 1] = '\0';
    memcpy(b, a, sizeof b);
    b[300] = 'y';                                   /* differs after the cut */
    tg_sketch_add(s, a);
    tg_sketch_add(s, b);
    cr_assert_eq(tg_sketch_top(s, it, 4), 1);
    cr_assert_eq(it[0].count, 2);
    cr_assert_eq(strlen(it[0].id), TG_ANOMALY_ID_MAX);
    tg_sketch_destroy(s);
}

/* ---- the baseline ---------------------------------------------------------- */

static const tg_anomaly_params P = { 10, 100, 0.5, 1 };

Test(baseline, steady_traffic_is_normal)
{
    tg_anomaly_baseline b = { 0, 0, TG_AN_NONE };

    for (int i = 0; i < 20; i++) {
        cr_assert_eq(tg_anomaly_observe(&b, 50 + (uint64_t)(i % 3) * 20, 1000, &P),
                     TG_AN_NONE, "window %d", i);
    }
    cr_assert(b.mean > 50 && b.mean < 90, "mean %g", b.mean);
}

Test(baseline, spike_opens_holds_and_subsides)
{
    tg_anomaly_baseline b = { 0, 0, TG_AN_NONE };
    double before;

    for (int i = 0; i < 6; i++) {
        tg_anomaly_observe(&b, 40, 10000, &P);
    }
    cr_assert_float_eq(b.mean, 40.0, 1e-9);
    cr_assert_eq(tg_anomaly_observe(&b, 399, 10000, &P), TG_AN_NONE, "9.98x: not yet");
    before = b.mean;
    cr_assert_eq(tg_anomaly_observe(&b, (uint64_t)(10 * before) + 1, 10000, &P),
                 TG_AN_SPIKE);
    /* while it lasts the baseline does not learn the spike */
    for (int i = 0; i < 10; i++) {
        cr_assert_eq(tg_anomaly_observe(&b, 2000, 10000, &P), TG_AN_SPIKE);
    }
    cr_assert_float_eq(b.mean, before, 1e-9);
    cr_assert_eq(tg_anomaly_observe(&b, 60, 10000, &P), TG_AN_NONE, "subsided");
    cr_assert_float_eq(b.mean, before + TG_ANOMALY_ALPHA * (60 - before), 1e-9,
                       "learning again");
}

/* A spike that starts mid-window: its first window is under spike_factor
 * (here 8x); learnt in full it would lift the baseline so far that the
 * next, full window (15x) is no longer 10x of it.  Capped, it is. */
Test(baseline, spike_starting_mid_window_is_still_reported)
{
    tg_anomaly_baseline b = { 0, 0, TG_AN_NONE };

    for (int i = 0; i < 8; i++) {
        tg_anomaly_observe(&b, 100, 100000, &P);
    }
    cr_assert_eq(tg_anomaly_observe(&b, 800, 100000, &P), TG_AN_NONE, "8x: not yet");
    cr_assert_float_eq(b.mean, 100 + TG_ANOMALY_ALPHA * (200 - 100), 1e-9,
                       "the partial window taught as 2x");
    cr_assert_eq(tg_anomaly_observe(&b, 1500, 100000, &P), TG_AN_SPIKE,
                 "15x of the old baseline is a spike");
}

Test(baseline, min_requests_and_young_keys)
{
    tg_anomaly_baseline b = { 0, 0, TG_AN_NONE };

    for (int i = 0; i < 6; i++) {
        tg_anomaly_observe(&b, 2, 10000, &P);
    }
    cr_assert_eq(tg_anomaly_observe(&b, 99, 10000, &P), TG_AN_NONE,
                 "49x but under min_requests");
    /* a key seen in fewer than TG_ANOMALY_LEARN windows is still learning:
     * its first window may have been a partial one */
    tg_anomaly_baseline y = { 0, 0, TG_AN_NONE };
    tg_anomaly_observe(&y, 10, 100000, &P);
    cr_assert_eq(tg_anomaly_observe(&y, 500, 100000, &P), TG_AN_NONE);
}

Test(baseline, new_key_with_a_large_share)
{
    tg_anomaly_params cold = P;
    tg_anomaly_baseline b = { 0, 0, TG_AN_NONE }, c = { 0, 0, TG_AN_NONE },
                        d = { 0, 0, TG_AN_NONE };

    cold.warm = 0;
    cr_assert_eq(tg_anomaly_observe(&b, 600, 1000, &P), TG_AN_NEW);
    cr_assert_eq(tg_anomaly_observe(&b, 600, 1000, &P), TG_AN_NEW, "still half");
    cr_assert_eq(tg_anomaly_observe(&b, 100, 1000, &P), TG_AN_NONE, "share fell");
    cr_assert_eq(tg_anomaly_observe(&c, 600, 1000, &cold), TG_AN_NONE,
                 "at start every key is new");
    cr_assert_eq(tg_anomaly_observe(&d, 400, 1000, &P), TG_AN_NONE, "40% < 50%");
}

/* ---- the engine: two workers, one window at a time ------------------------------ */

static struct event_base *base;
static struct tg_anomaly *an;
static tg_conf *conf;

static void
engine_setup(void)
{
    static const char text[] =
        "listen: [ { address: 127.0.0.1:0 } ]\n"
        "upstream: { servers: [127.0.0.1:1] }\n"
        "workers: 2\n"
        "anomaly: { window_ms: 1000, top_k: 3, spike_factor: 10, min_requests: 50 }\n";
    char err[TG_CONF_ERRLEN];

    conf = tg_conf_load_string("t.yaml", text, sizeof text - 1, err, sizeof err);
    cr_assert_not_null(conf, "%s", err);
    base = event_base_new();
    an = tg_anomaly_create(base, conf, 2);
}

static void
engine_teardown(void)
{
    tg_anomaly_destroy(an);
    event_base_free(base);
    tg_conf_unref(conf);
}

static char *
top_json(void)
{
    struct evbuffer *b = evbuffer_new();
    size_t n;
    char *s;

    tg_anomaly_status_json(an, b);
    n = evbuffer_get_length(b);
    s = calloc(1, n + 1);
    evbuffer_remove(b, s, n);
    evbuffer_free(b);
    return s;
}

/* Window w of both workers: a gets na per worker, b nb on worker 0, a
 * key per request of "noise" on worker 1; then hand over and collect. */
static void
window(uint64_t t0, int w, int na, int nb, int noise)
{
    struct tg_anomaly_shard *s0 = tg_anomaly_shard(an, 0), *s1 = tg_anomaly_shard(an, 1);
    char id[32];

    tg_anomaly_shard_tick(s0, t0 + (uint64_t)w * 1000);
    tg_anomaly_shard_tick(s1, t0 + (uint64_t)w * 1000);
    for (int i = 0; i < na; i++) {
        tg_anomaly_count(s0, "acme");
        tg_anomaly_count(s1, "acme");
    }
    for (int i = 0; i < nb; i++) {
        tg_anomaly_count(s0, "globex");
    }
    for (int i = 0; i < noise; i++) {
        snprintf(id, sizeof id, "anon:10.0.%d.%d", w, i);
        tg_anomaly_count(s1, id);
    }
    tg_anomaly_count(s0, NULL);                     /* not identified */
    tg_anomaly_count(s0, "");
    /* the window ends: both hand over; the engine's tick collects */
    tg_anomaly_shard_tick(s0, t0 + (uint64_t)(w + 1) * 1000);
    tg_anomaly_shard_tick(s1, t0 + (uint64_t)(w + 1) * 1000);
    event_base_loop(base, EVLOOP_ONCE);
}

Test(engine, merged_windows_find_the_spike, .init = engine_setup, .fini = engine_teardown)
{
    uint64_t t0 = (tg_now_ms() / 1000 + 1) * 1000;
    char *j;
    int w;

    for (w = 0; w < 6; w++) {
        window(t0, w, 15, 20, 8);                   /* acme 30, globex 20 */
        cr_assert(!tg_anomaly_is_hit(an, "acme"), "window %d", w);
    }
    j = top_json();
    cr_assert(strstr(j, "\"top\":[{\"consumer\":\"acme\",\"requests\":30,\"error\":0,"
                        "\"rate_per_s\":30.00,\"baseline_per_s\":30.00,\"anomaly\":null},"
                        "{\"consumer\":\"globex\",\"requests\":20,\"error\":0,"
                        "\"rate_per_s\":20.00,\"baseline_per_s\":20.00,\"anomaly\":null},")
              != NULL, "%s", j);
    cr_assert(strstr(j, "\"window_ms\":1000,\"top_k\":3,\"windows\":6,\"requests\":"
                        "58,") != NULL, "%s", j);
    free(j);

    window(t0, w++, 150, 20, 8);                    /* acme x10 */
    cr_assert(tg_anomaly_is_hit(an, "acme"));
    cr_assert(!tg_anomaly_is_hit(an, "globex"));
    j = top_json();
    cr_assert(strstr(j, "\"top\":[{\"consumer\":\"acme\",\"requests\":300,\"error\":0,"
                        "\"rate_per_s\":300.00,\"baseline_per_s\":30.00,"
                        "\"anomaly\":\"spike\"}") != NULL, "%s", j);
    free(j);
    window(t0, w++, 160, 20, 8);
    cr_assert(tg_anomaly_is_hit(an, "acme"), "still high");
    window(t0, w++, 15, 20, 8);
    cr_assert(!tg_anomaly_is_hit(an, "acme"), "subsided");
}

/* The number after "key": in the first object of consumer id in j. */
static long
field(const char *j, const char *id, const char *key)
{
    char want[96];
    const char *p;

    snprintf(want, sizeof want, "{\"consumer\":\"%s\"", id);
    p = strstr(j, want);
    cr_assert_not_null(p, "%s not in %s", id, j);
    snprintf(want, sizeof want, "\"%s\":", key);
    p = strstr(p, want);
    cr_assert_not_null(p);
    return atol(p + strlen(want));
}

/* A worker whose sketch is full (its floor above 0): the merged count of
 * a key it lost is an upper bound, and count - error a lower one. */
Test(engine, merge_keeps_the_error_bound, .init = engine_setup, .fini = engine_teardown)
{
    uint64_t t0 = (tg_now_ms() / 1000 + 1) * 1000;
    struct tg_anomaly_shard *s0 = tg_anomaly_shard(an, 0), *s1 = tg_anomaly_shard(an, 1);
    char id[32], *j;
    long req, err;

    tg_anomaly_shard_tick(s0, t0);
    tg_anomaly_shard_tick(s1, t0);
    for (int i = 0; i < 100; i++)
        tg_anomaly_count(s0, "acme");
    for (int i = 0; i < 7; i++)
        tg_anomaly_count(s1, "acme");
    for (int i = 0; i < 300; i++) {                 /* 12 counters: churn */
        snprintf(id, sizeof id, "anon:10.1.%d.%d", i / 250, i % 250);
        tg_anomaly_count(s1, id);
    }
    tg_anomaly_shard_tick(s0, t0 + 1000);
    tg_anomaly_shard_tick(s1, t0 + 1000);
    event_base_loop(base, EVLOOP_ONCE);
    j = top_json();
    req = field(j, "acme", "requests");
    err = field(j, "acme", "error");
    cr_assert(req >= 107 && req - err <= 107 && err > 0, "acme %ld (error %ld): %s", req,
              err, j);
    cr_assert_leq(err, 307 / 12 + 1, "error above N/m: %s", j);
    cr_assert(strstr(j, "\"requests\":407,") != NULL, "%s", j);
    free(j);
}

/* SIGHUP without the section: off, baselines and hits gone. */
Test(engine, reload_without_the_section, .init = engine_setup, .fini = engine_teardown)
{
    static const char text[] =
        "listen: [ { address: 127.0.0.1:0 } ]\n"
        "upstream: { servers: [127.0.0.1:1] }\n"
        "workers: 2\n";
    uint64_t t0 = (tg_now_ms() / 1000 + 1) * 1000;
    char err[TG_CONF_ERRLEN], *j;
    tg_conf *off;
    int w;

    for (w = 0; w < 6; w++)
        window(t0, w, 15, 20, 8);
    window(t0, w++, 150, 20, 8);
    cr_assert(tg_anomaly_is_hit(an, "acme"));
    off = tg_conf_load_string("t.yaml", text, sizeof text - 1, err, sizeof err);
    cr_assert_not_null(off, "%s", err);
    tg_anomaly_reload(an, off);
    cr_assert(!tg_anomaly_is_hit(an, "acme"));
    j = top_json();
    cr_assert_str_eq(j, "{\"enabled\":false,\"top\":[]}\n");
    free(j);
    /* workers stop counting at their next tick */
    tg_anomaly_shard_tick(tg_anomaly_shard(an, 0), t0 + (uint64_t)w * 1000 + 5);
    tg_anomaly_count(tg_anomaly_shard(an, 0), "acme");
    tg_anomaly_reload(an, conf);                    /* and back on: learning again */
    j = top_json();
    cr_assert(strstr(j, "\"enabled\":true,") && strstr(j, "\"windows\":0,"), "%s", j);
    free(j);
    tg_conf_unref(off);
}
