/*
 * test_adaptive.c - adaptive concurrency without sockets: the learned
 * limit fed RTT samples on an injected clock, the tier-ordered queue,
 * and the adaptive: section of the config.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "tollgate/adaptive.h"
#include "tollgate/conf.h"
#include "tollgate/upstream.h"

/* ---- the limit ---------------------------------------------------------- */

/* n samples of rtt_us, 1 ms apart, with inflight in flight; returns the
 * clock after them. */
static uint64_t
feed(tg_adapt_limit *l, uint64_t now, unsigned n, uint64_t rtt_us,
     unsigned inflight, int ok)
{
    unsigned i, lim;

    for (i = 0; i < n; i++) {
        now += 1000;
        lim = tg_adapt_limit_sample(l, now, rtt_us, inflight, ok);
        cr_assert(lim >= l->min && lim <= l->max, "limit %u out of [%u, %u]",
                  lim, l->min, l->max);
    }
    return now;
}

Test(adaptive_limit, init_clamps)
{
    tg_adapt_limit l;

    tg_adapt_limit_init(&l, 64, 4, 1024);
    cr_assert_eq(tg_adapt_limit_get(&l), 64);
    tg_adapt_limit_init(&l, 1, 4, 16);
    cr_assert_eq(tg_adapt_limit_get(&l), 4);
    tg_adapt_limit_init(&l, 100, 4, 16);
    cr_assert_eq(tg_adapt_limit_get(&l), 16);
    tg_adapt_limit_init(&l, 0, 0, 0);
    cr_assert_eq(tg_adapt_limit_get(&l), 1, "min is at least 1");
    cr_assert_eq(tg_adapt_limit_noload_us(&l), 0);
}

/* Busy at the no-load latency: the limit grows, up to max and no further. */
Test(adaptive_limit, grows_when_busy_and_fast)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;

    tg_adapt_limit_init(&l, 8, 2, 40);
    now = feed(&l, now, 40, 2000, 8, 1);
    cr_assert_gt(tg_adapt_limit_get(&l), 8, "got %u", tg_adapt_limit_get(&l));
    now = feed(&l, now, 5000, 2000, 40, 1);
    cr_assert_eq(tg_adapt_limit_get(&l), 40);
    cr_assert_eq(tg_adapt_limit_noload_us(&l), 2000);
}

/* Latency three times the no-load one: the limit falls, to min at worst. */
Test(adaptive_limit, shrinks_when_latency_rises)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;
    unsigned before;

    tg_adapt_limit_init(&l, 64, 4, 1024);
    now = feed(&l, now, 32, 20000, 64, 1);       /* no-load RTT: 20 ms */
    before = tg_adapt_limit_get(&l);
    now = feed(&l, now, 64, 60000, 64, 1);
    cr_assert_lt(tg_adapt_limit_get(&l), before, "%u -> %u", before,
                 tg_adapt_limit_get(&l));
    now = feed(&l, now, 5000, 60000, 64, 1);
    cr_assert_eq(tg_adapt_limit_get(&l), 4, "bounded by min");
}

/* Within the tolerance (1.25x) the limit does not shrink. */
Test(adaptive_limit, tolerates_noise)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;

    tg_adapt_limit_init(&l, 16, 4, 1024);
    now = feed(&l, now, 16, 10000, 16, 1);
    now = feed(&l, now, 200, 12000, 16, 1);
    cr_assert_geq(tg_adapt_limit_get(&l), 16);
}

/* A failure (5xx, timeout) in a window halves the target. */
Test(adaptive_limit, failures_back_off)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;

    tg_adapt_limit_init(&l, 100, 4, 1024);
    now = feed(&l, now, 400, 10000, 100, 0);
    cr_assert_lt(tg_adapt_limit_get(&l), 20, "got %u", tg_adapt_limit_get(&l));
}

/* Idle (few in flight) at a good latency: back to initial, not above. */
Test(adaptive_limit, idle_returns_to_initial)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;

    tg_adapt_limit_init(&l, 32, 2, 1024);
    now = feed(&l, now, 16, 5000, 32, 1);
    now = feed(&l, now, 2000, 15000, 32, 1);     /* overload */
    cr_assert_lt(tg_adapt_limit_get(&l), 10);
    now = feed(&l, now, 2000, 5000, 1, 1);       /* light traffic after */
    cr_assert_eq(tg_adapt_limit_get(&l), 32);
    now = feed(&l, now, 2000, 5000, 1, 1);
    cr_assert_eq(tg_adapt_limit_get(&l), 32, "idle never grows past initial");
}

/* The no-load RTT slides: an upstream that got slower for good is
 * believed after two halves (30 s), and the limit recovers. */
Test(adaptive_limit, noload_rtt_slides)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;

    tg_adapt_limit_init(&l, 16, 2, 64);
    now = feed(&l, now, 16, 1000, 16, 1);
    cr_assert_eq(tg_adapt_limit_noload_us(&l), 1000);
    now = feed(&l, now, 31000, 5000, 16, 1);     /* 31 s at 5 ms */
    cr_assert_eq(tg_adapt_limit_noload_us(&l), 5000);
    now = feed(&l, now, 2000, 5000, 64, 1);
    cr_assert_gt(tg_adapt_limit_get(&l), 16);
}

/* Two samples far below the rest within a half (an upstream that answered
 * early, a fast path) do not become the no-load RTT: the limit stays at
 * the knee instead of falling to min for 15-30 s.  A third one does. */
Test(adaptive_limit, noload_rtt_ignores_two_outliers)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;

    tg_adapt_limit_init(&l, 8, 2, 64);
    now = feed(&l, now, 40, 50000, 4, 1);
    now = feed(&l, now, 2, 5000, 4, 1);          /* two early answers */
    cr_assert_eq(tg_adapt_limit_noload_us(&l), 50000);
    now = feed(&l, now, 400, 50000, 4, 1);
    cr_assert_geq(tg_adapt_limit_get(&l), 8, "got %u", tg_adapt_limit_get(&l));
    now = feed(&l, now, 1, 20000, 4, 1);         /* a third: believed */
    cr_assert_eq(tg_adapt_limit_noload_us(&l), 20000);
}

/* ---- a mix of classes --------------------------------------------------- */

#define K_FAST  11u                  /* GET /health: 1-1.6 ms */
#define K_404   12u                  /* an early 404: 3 ms */
#define K_SLOW  13u                  /* GET /search: 50-60 ms */

/* n samples of an API's steady mix, 1 ms apart: of 20, 16 fast, 1 early
 * 404 and 3 slow, each its class's service time (with some jitter)
 * times stretch, plus queue_us; in flight: the limit (busy) or idle.
 * Through the catch-all class when classes is 0. */
static uint64_t
feed_mix(tg_adapt_limit *l, uint64_t now, unsigned n, double stretch,
         uint64_t queue_us, int busy, int classes)
{
    static const uint64_t fast[4] = { 1000, 1200, 1600, 1300 };
    static const uint64_t slow[3] = { 50000, 55000, 60000 };
    unsigned i, lim;
    uint32_t key;
    uint64_t rtt;

    for (i = 0; i < n; i++) {
        now += 1000;
        if (i % 20 == 7) {
            key = K_404, rtt = 3000;
        } else if (i % 20 == 3 || i % 20 == 11 || i % 20 == 17) {
            key = K_SLOW, rtt = slow[(i / 20) % 3];
        } else {
            key = K_FAST, rtt = fast[i % 4];
        }
        rtt = (uint64_t)((double)rtt * stretch) + queue_us;
        lim = tg_adapt_limit_sample_class(l, classes ? key : 0, now, rtt,
                                          busy ? tg_adapt_limit_get(l) : 1, 1);
        cr_assert(lim >= l->min && lim <= l->max, "limit %u out of [%u, %u]",
                  lim, l->min, l->max);
    }
    return now;
}

/* A steady mix of fast and slow endpoints is no queueing: the limit
 * stays (and grows when busy).  Through one class (as before classes)
 * the fast ones set the no-load RTT and the limit falls to min. */
Test(adaptive_limit, stable_mix_is_not_queueing)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;

    tg_adapt_limit_init(&l, 16, 2, 64);
    now = feed_mix(&l, now, 40000, 1, 0, 0, 1);  /* 40 s, idle */
    cr_assert_eq(tg_adapt_limit_get(&l), 16);
    now = feed_mix(&l, now, 10000, 1, 0, 1, 1);  /* busy */
    cr_assert_eq(tg_adapt_limit_get(&l), 64, "busy: got %u", tg_adapt_limit_get(&l));

    tg_adapt_limit_init(&l, 16, 2, 64);
    now = feed_mix(&l, now, 2000, 1, 0, 0, 0);
    cr_assert_eq(tg_adapt_limit_get(&l), 2, "one class: got %u", tg_adapt_limit_get(&l));
}

/* A queue on top of the mix: every exchange waits 20 ms more (an RTT
 * 1.3 to 20 times its class's), and the limit falls, to min. */
Test(adaptive_limit, queue_on_a_mix_shrinks)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;
    unsigned before;

    tg_adapt_limit_init(&l, 32, 2, 64);
    now = feed_mix(&l, now, 5000, 1, 0, 1, 1);
    before = tg_adapt_limit_get(&l);
    now = feed_mix(&l, now, 200, 1, 20000, 1, 1);
    cr_assert_lt(tg_adapt_limit_get(&l), before, "%u -> %u", before,
                 tg_adapt_limit_get(&l));
    now = feed_mix(&l, now, 2000, 1, 20000, 1, 1);
    cr_assert_eq(tg_adapt_limit_get(&l), 2);
}

/* Sustained overload of a server with 8 workers, for 90 s: above 8 in
 * flight every exchange takes limit/8 times its service time.  The limit
 * keeps it near its knee and no class's no-load RTT drifts up (each is
 * refreshed whenever the limit dips to the knee): at the end it is still
 * the unloaded one, and the limit is where the server is. */
Test(adaptive_limit, no_drift_on_a_mix_under_overload)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;
    unsigned i, j, lim, hi = 0;
    double stretch;

    tg_adapt_limit_init(&l, 32, 2, 256);
    now = feed_mix(&l, now, 1000, 1, 0, 0, 1);
    for (i = 0; i < 900; i++) {                  /* 90 s, in steps of 100 ms */
        lim = tg_adapt_limit_get(&l);
        stretch = lim > 8 ? lim / 8.0 : 1;
        now = feed_mix(&l, now, 100, stretch, 0, 1, 1);
        if (i >= 600 && lim > hi)
            hi = lim;
    }
    cr_assert_leq(hi, 16, "the limit reached %u in the last 30 s", hi);
    cr_assert_eq(tg_adapt_limit_noload_us(&l), 1000, "all: %llu",
                 (unsigned long long)tg_adapt_limit_noload_us(&l));
    for (j = 1; j < TG_ADAPT_CLASSES; j++) {
        if (l.cls[j].key == K_SLOW)
            cr_assert_eq(l.cls[j].min_prev_us, 50000, "slow: %llu",
                          (unsigned long long)l.cls[j].min_prev_us);
        if (l.cls[j].key == K_404)
            cr_assert_eq(l.cls[j].min_prev_us, 3000, "404: %llu",
                         (unsigned long long)l.cls[j].min_prev_us);
    }
}

/* The table is bounded: a stream of keys seen once (ids in the path)
 * is in no class once the slots are taken, without pushing out the
 * classes that carry the signal; a slot with no sample for two halves is
 * free again. */
Test(adaptive_limit, classes_are_bounded)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;
    unsigned i, j, found = 0;

    tg_adapt_limit_init(&l, 16, 2, 64);
    now = feed_mix(&l, now, 100, 1, 0, 0, 1);
    for (i = 0; i < 1000; i++) {
        now += 1000;
        tg_adapt_limit_sample_class(&l, 1000 + i, now, 5000, 1, 1);
    }
    for (j = 1; j < TG_ADAPT_CLASSES; j++)
        found += l.cls[j].key == K_FAST || l.cls[j].key == K_404 || l.cls[j].key == K_SLOW;
    cr_assert_eq(found, 3);
    cr_assert_eq(l.cls[0].lo_cur_us[0], 0, "the rest are in no class, not the catch-all");
    now = feed_mix(&l, now + 31000000, 100, 1, 0, 0, 1);
    now += 16000000;
    tg_adapt_limit_sample_class(&l, 5, now, 5000, 1, 1);
    for (j = 1, found = 0; j < TG_ADAPT_CLASSES; j++)
        found += l.cls[j].key == 5;
    cr_assert_eq(found, 1, "an old one-off's slot was freed");
    cr_assert_eq(tg_adapt_limit_get(&l), 16);
}

/* An attack on the classes: a keyed client takes every slot with fast
 * paths (early 404s at 1 ms, kept alive), then sends more fast paths while
 * the API's real endpoint (50 ms) arrives too late for a slot.  Neither
 * has a class; had they shared the catch-all, its no-load RTT would be the
 * 1 ms of the extra paths and every 50 ms answer would read as a queue
 * (the limit fell to its minimum).  Busy at the no-load latency of the
 * classes there are: the limit grows, it does not shrink. */
Test(adaptive_limit, unclassed_paths_do_not_read_as_queueing)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;
    unsigned i, lim, lowest;

    tg_adapt_limit_init(&l, 16, 2, 64);
    for (i = 1; i < TG_ADAPT_CLASSES; i++) {          /* the attacker's slots */
        now += 1000;
        tg_adapt_limit_sample_class(&l, 100 + i, now, 1000, 1, 1);
    }
    lowest = tg_adapt_limit_get(&l);
    for (i = 0; i < 4000; i++) {
        uint32_t key;
        uint64_t rtt;

        now += 1000;
        if (i % 4 == 0) {
            key = K_SLOW, rtt = 50000 + (i % 3) * 5000;     /* the API, no slot */
        } else if (i % 4 == 1) {
            key = 500 + i % 7, rtt = 1000;                  /* more fast paths */
        } else {
            key = 101 + i % (TG_ADAPT_CLASSES - 1), rtt = 1000 + (i % 5) * 100;
        }
        lim = tg_adapt_limit_sample_class(&l, key, now, rtt, tg_adapt_limit_get(&l), 1);
        if (lim < lowest) {
            lowest = lim;
        }
    }
    cr_assert_geq(lowest, 16, "the limit fell to %u", lowest);
    cr_assert_gt(tg_adapt_limit_get(&l), 16, "busy at no-load latency: it grows");
}

/* An attack on the gradient: one client's query makes its own endpoint
 * slow (a search for everything: 400 ms) after three cheap ones set that
 * class's no-load RTT at 1 ms; 1 sample in 25, on a healthy upstream
 * whose other answers all come at their no-load times.  Through the ratio
 * of sums, each such sample alone weighed as much as a window of the
 * API's, read as a queue 300 times the no-load one, and halved the limit
 * (it fell to its minimum within a second).  A sample counts at most as
 * much as a queue that gives the floor gradient by itself. */
static void
one_slow_class(uint64_t cheap_us)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;
    unsigned i, lim, lowest;

    tg_adapt_limit_init(&l, 16, 2, 64);
    now = feed_mix(&l, now, 1000, 1, 0, 1, 1);
    for (i = 0; i < 3; i++) {
        now += 1000;
        tg_adapt_limit_sample_class(&l, 99, now, cheap_us, tg_adapt_limit_get(&l), 1);
    }
    lowest = tg_adapt_limit_get(&l);
    for (i = 0; i < 200; i++) {
        now = feed_mix(&l, now, 24, 1, 0, 1, 1);
        now += 1000;
        lim = tg_adapt_limit_sample_class(&l, 99, now, 400000, tg_adapt_limit_get(&l), 1);
        if (lim < lowest)
            lowest = lim;
    }
    cr_assert_geq(lowest, 16, "cheap at %llu us: the limit fell to %u",
                  (unsigned long long)cheap_us, lowest);
}

Test(adaptive_limit, one_slow_class_does_not_read_as_queueing)
{
    one_slow_class(1000);               /* cheap: 1 ms */
    one_slow_class(50000);              /* ... or 50 ms */
}

/* One failure in 25 samples (one client's requests the upstream answers
 * 503 to, on a healthy upstream) does not halve the limit: failures in
 * half a window do.  Before, any one failure halved its window and the
 * limit fell to its minimum. */
Test(adaptive_limit, a_failing_minority_does_not_halve)
{
    tg_adapt_limit l;
    uint64_t now = 1000000;
    unsigned i, lim, lowest;

    tg_adapt_limit_init(&l, 16, 2, 64);
    now = feed_mix(&l, now, 1000, 1, 0, 1, 1);
    lowest = tg_adapt_limit_get(&l);
    for (i = 0; i < 200; i++) {
        now = feed_mix(&l, now, 24, 1, 0, 1, 1);
        now += 1000;
        lim = tg_adapt_limit_sample_class(&l, 98, now, 1000, tg_adapt_limit_get(&l), 0);
        if (lim < lowest)
            lowest = lim;
    }
    cr_assert_geq(lowest, 16, "the limit fell to %u", lowest);
    now = feed(&l, now, 64, 1000, 16, 0);        /* everything fails */
    cr_assert_lt(tg_adapt_limit_get(&l), 16, "got %u", tg_adapt_limit_get(&l));
}

static uint32_t
ck(const char *method, const char *path)
{
    return tg_adapt_class_key(method, strlen(method), path, strlen(path));
}

/* Ids in the path are one class with their endpoint: digits, hashes and
 * UUIDs, long tokens with a digit; endpoint names, methods and the rest
 * of the path still tell classes apart; the query never does. */
Test(adaptive_limit, class_keys_fold_ids_in_the_path)
{
    cr_assert_eq(ck("GET", "/items/123"), ck("GET", "/items/98765432101"));
    cr_assert_eq(ck("GET", "/users/42/orders/7"), ck("GET", "/users/1/orders/99"));
    cr_assert_eq(ck("GET", "/o/3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
                 ck("GET", "/o/0123456789abcdef0123"));
    cr_assert_eq(ck("GET", "/t/AbCdEfGhIjKlMnOpQrSt9_x"), ck("GET", "/t/Zz9aaaaaaaaaaaaaaaaaaa"));
    cr_assert_eq(ck("GET", "/search?q=a"), ck("GET", "/search?q=b&page=2"));
    cr_assert_eq(ck("GET", "/items/123?x=1"), ck("GET", "/items/5"));
    cr_assert_neq(ck("GET", "/items/123"), ck("POST", "/items/123"));
    cr_assert_neq(ck("GET", "/items/123"), ck("GET", "/items"));
    cr_assert_neq(ck("GET", "/items/123"), ck("GET", "/users/123"));
    cr_assert_neq(ck("GET", "/v1/items"), ck("GET", "/v2/items"));
    cr_assert_neq(ck("GET", "/auth/2fa"), ck("GET", "/auth/3fa"), "short names stay");
    cr_assert_neq(ck("GET", "/items/123"), ck("GET", "/items/123/history"));
    cr_assert_neq(ck("GET", "/deadbeef"), ck("GET", "/cafe"), "short hex is a name");
    cr_assert_neq(ck("GET", "/a/abcdefghijklmnopqrstu"), ck("GET", "/a/vwxyzabcdefghijklmnop"),
                  "a long word without a digit is a name");
    cr_assert_neq(ck("GET", ""), 0u);
    cr_assert_neq(tg_adapt_class_key(NULL, 0, NULL, 0), 0u);
}

/* Hostile paths: 64 KiB of slashes, of one id, of %2F, of /./, of one
 * long name, with and without a query: a key each (never 0), in one pass
 * (no work per byte beyond a constant: 200 keys of 64 KiB in well under a
 * second even under ASan), the same for the same input. */
Test(adaptive_limit, class_keys_of_hostile_paths)
{
    static const char *const unit[] = { "/", "1", "%2F", "/./", "a", "//x", "?" };
    enum { LEN = 64 * 1024 };
    static char path[LEN + 1];
    struct timespec t0, t1;
    size_t i, k, rep;
    uint32_t a, b;
    double ms;

    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (rep = 0; rep < 200 / TG_ARRAY_LEN(unit); rep++) {
        for (k = 0; k < TG_ARRAY_LEN(unit); k++) {
            size_t n = strlen(unit[k]);

            path[0] = '/';
            for (i = 1; i + n <= LEN; i += n)
                memcpy(path + i, unit[k], n);
            path[i] = '\0';
            a = ck("GET", path);
            b = tg_adapt_class_key("GET", 3, path, i);
            cr_assert_neq(a, 0u);
            cr_assert_eq(a, b, "%s: the same input, another key", unit[k]);
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    cr_assert_lt(ms, 2000, "200 keys of 64 KiB took %.0f ms", ms);
    cr_assert_eq(ck("GET", "/items/1"), ck("GET", "/items/11111111111111111111111111111"));
}

/* ---- the queue ---------------------------------------------------------- */

Test(adaptive_queue, priority_then_fifo)
{
    tg_adapt_queue q;
    tg_adapt_entry e[6];
    unsigned prio[6] = { 1, 0, 2, 1, 2, 0 };
    int want[6] = { 2, 4, 0, 3, 1, 5 };
    int i;

    tg_adapt_queue_init(&q, 3, 10);
    for (i = 0; i < 6; i++) {
        cr_assert_null(tg_adapt_queue_push(&q, &e[i], prio[i], 100 + (uint64_t)i));
    }
    cr_assert_eq(tg_adapt_queue_len(&q), 6);
    for (i = 0; i < 6; i++) {
        cr_assert_eq(tg_adapt_queue_pop(&q), &e[want[i]], "pop %d", i);
    }
    cr_assert_null(tg_adapt_queue_pop(&q));
    tg_adapt_queue_deinit(&q);
}

/* Full: a higher tier evicts the newest of the lowest tier present; the
 * same tier is refused (no overtaking inside a tier). */
Test(adaptive_queue, full_evicts_lowest_or_refuses)
{
    tg_adapt_queue q;
    tg_adapt_entry b1, b2, p1, e1, e2, e3, b3;

    tg_adapt_queue_init(&q, 4, 3);             /* 0 none, 1 basic, 2 pro, 3 ent */
    cr_assert_null(tg_adapt_queue_push(&q, &b1, 1, 10));
    cr_assert_null(tg_adapt_queue_push(&q, &b2, 1, 11));
    cr_assert_null(tg_adapt_queue_push(&q, &p1, 2, 12));
    cr_assert_eq(tg_adapt_queue_push(&q, &b3, 1, 13), &b3, "basic refused");
    cr_assert_eq(tg_adapt_queue_push(&q, &e1, 3, 14), &b2, "newest basic out");
    cr_assert_eq(b2.queued, 0);
    cr_assert_eq(tg_adapt_queue_push(&q, &e2, 3, 15), &b1);
    cr_assert_eq(tg_adapt_queue_push(&q, &e3, 3, 16), &p1, "then pro");
    cr_assert_eq(tg_adapt_queue_len(&q), 3);
    cr_assert_eq(tg_adapt_queue_pop(&q), &e1);
    tg_adapt_queue_deinit(&q);
}

Test(adaptive_queue, zero_capacity_and_clamped_priority)
{
    tg_adapt_queue q;
    tg_adapt_entry a;

    tg_adapt_queue_init(&q, 2, 0);
    cr_assert_eq(tg_adapt_queue_push(&q, &a, 1, 5), &a);
    cr_assert_eq(tg_adapt_queue_len(&q), 0);
    tg_adapt_queue_deinit(&q);
    tg_adapt_queue_init(&q, 2, 1);
    cr_assert_null(tg_adapt_queue_push(&q, &a, 99, 5));
    cr_assert_eq(a.prio, 1);
    tg_adapt_queue_deinit(&q);
}

Test(adaptive_queue, remove_and_expire)
{
    tg_adapt_queue q;
    tg_adapt_entry a, b, c;

    tg_adapt_queue_init(&q, 2, 8);
    cr_assert_eq(tg_adapt_queue_next_deadline(&q), 0);
    tg_adapt_queue_push(&q, &a, 0, 100);
    tg_adapt_queue_push(&q, &b, 1, 150);
    tg_adapt_queue_push(&q, &c, 0, 200);
    cr_assert_eq(tg_adapt_queue_next_deadline(&q), 100);
    tg_adapt_queue_remove(&q, &a);
    tg_adapt_queue_remove(&q, &a);              /* twice: no-op */
    cr_assert_eq(tg_adapt_queue_len(&q), 2);
    cr_assert_eq(tg_adapt_queue_next_deadline(&q), 150);
    cr_assert_null(tg_adapt_queue_expired(&q, 149));
    cr_assert_eq(tg_adapt_queue_expired(&q, 160), &b);
    cr_assert_null(tg_adapt_queue_expired(&q, 160));
    cr_assert_eq(tg_adapt_queue_expired(&q, 1000), &c);
    cr_assert_eq(tg_adapt_queue_len(&q), 0);
    tg_adapt_queue_deinit(&q);
}

/* ---- the adaptive: section ---------------------------------------------- */

#define MIN "listen: [ { address: 127.0.0.1:8080 } ]\n" \
            "upstream: { servers: [127.0.0.1:8000] }\n"
#define TIERS "rate_limits:\n" \
              "  basic: { requests_per_minute: 60, burst_limit: 10 }\n" \
              "  pro: { requests_per_minute: 600, burst_limit: 10 }\n" \
              "  enterprise: { requests_per_minute: 6000, burst_limit: 10 }\n"

static char err[TG_CONF_ERRLEN];

static tg_conf *
load(const char *yaml)
{
    return tg_conf_load_string("t.yaml", yaml, strlen(yaml), err, sizeof(err));
}

Test(adaptive_conf, absent_is_off)
{
    tg_conf *c = load(MIN TIERS);

    cr_assert_not_null(c, "%s", err);
    cr_assert_eq(c->adaptive.enabled, 0);
    tg_conf_unref(c);
}

Test(adaptive_conf, defaults)
{
    tg_conf *c = load(MIN TIERS "adaptive: {}\n");

    cr_assert_not_null(c, "%s", err);
    cr_assert_eq(c->adaptive.enabled, 1);
    cr_assert_eq(c->adaptive.initial, 64);
    cr_assert_eq(c->adaptive.min, 4);
    cr_assert_eq(c->adaptive.max, 1024);
    cr_assert_eq(c->adaptive.queue, 128);
    cr_assert_eq(c->adaptive.queue_timeout_ms, 1000);
    cr_assert_eq(c->adaptive.nshed_order, 3);
    cr_assert_str_eq(c->adaptive.shed_order[0], "basic");
    cr_assert_str_eq(c->adaptive.shed_order[2], "enterprise");
    cr_assert_eq(c->adaptive.throttle.enabled, 0);
    tg_conf_unref(c);
}

Test(adaptive_conf, contract_shape)
{
    tg_conf *c = load(MIN TIERS
        "adaptive:\n"
        "  concurrency: { initial: 32, min: 2, max: 256, queue: 16 }\n"
        "  shed_order: [pro, basic, enterprise]\n"
        "  throttle: { target_p99_ms: 500, max_error_ratio: 0.05, "
        "min_factor: 0.25, window_ms: 5000 }\n");

    cr_assert_not_null(c, "%s", err);
    cr_assert_eq(c->adaptive.initial, 32);
    cr_assert_eq(c->adaptive.queue, 16);
    cr_assert_str_eq(c->adaptive.shed_order[0], "pro");
    cr_assert_eq(c->adaptive.throttle.enabled, 1);
    cr_assert_eq(c->adaptive.throttle.window_ms, 5000);
    tg_conf_unref(c);
}

/* The default order keeps only the tiers rate_limits has. */
Test(adaptive_conf, default_order_filters_tiers)
{
    tg_conf *c = load(MIN "rate_limits:\n"
                      "  free: { requests_per_minute: 60, burst_limit: 10 }\n"
                      "  enterprise: { requests_per_minute: 60, burst_limit: 10 }\n"
                      "adaptive: { concurrency: { initial: 8 } }\n");

    cr_assert_not_null(c, "%s", err);
    cr_assert_eq(c->adaptive.nshed_order, 1);
    cr_assert_str_eq(c->adaptive.shed_order[0], "enterprise");
    tg_conf_unref(c);
}

Test(adaptive_conf, errors)
{
    static const struct { const char *yaml, *msg; } bad[] = {
        { MIN TIERS "adaptive: { shed_order: [basic, gold] }\n",
          "t.yaml:7:25: adaptive.shed_order: unknown tier \"gold\"" },
        { MIN TIERS "adaptive: { shed_order: [basic, basic] }\n",
          "t.yaml:7:33: adaptive.shed_order: tier \"basic\" is listed twice" },
        { MIN TIERS "adaptive: { shed_order: basic }\n",
          "t.yaml:7:25: adaptive.shed_order: expected a sequence" },
        { MIN TIERS "adaptive: { concurrency: { min: 10, initial: 5 } }\n",
          "adaptive.concurrency.initial: needs min <= initial <= max" },
        { MIN TIERS "adaptive: { concurrency: { max: 0 } }\n",
          "adaptive.concurrency.max" },
        { MIN TIERS "adaptive: { concurrency: { queue_timout_ms: 5 } }\n",
          "did you mean \"queue_timeout_ms\"" },
        { MIN TIERS "adaptive: { throttle: { min_factor: 2 } }\n",
          "adaptive.throttle.min_factor: expected a number in (0, 1]" },
        { MIN TIERS "adaptive: { concurency: {} }\n",
          "did you mean \"concurrency\"" },
    };
    size_t i;

    for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        tg_conf *c = load(bad[i].yaml);
        cr_assert_null(c, "case %zu loaded", i);
        cr_assert(strstr(err, bad[i].msg) != NULL, "case %zu: \"%s\" lacks \"%s\"",
                  i, err, bad[i].msg);
    }
}

/* ---- the pool's admission (upstream.c), no traffic ----------------------
 *
 * One server that listens and never accepts; the event base runs only to
 * deliver the pool's own events (wake, queue timer); the queue's clock is
 * the test's. */

static uint64_t fake_now = 1000000;
static uint64_t clock_ms(void) { return fake_now; }

typedef struct waiting {
    struct tg_upstream_waiter *w;
    int      got;                /* results delivered */
    enum tg_upstream_admit result;
    struct tg_uconn *uc;         /* acquired on TG_ADMIT_GO, as the proxy does */
} waiting;
static int delivered;
static struct event_base *tbase;
static struct tg_upstream_pool *tpool;

static void
on_admit(void *arg, enum tg_upstream_admit result)
{
    waiting *x = arg;
    int reused;

    x->got++;
    x->result = result;
    x->w = NULL;
    delivered++;
    if (result == TG_ADMIT_GO) {
        x->uc = tg_upstream_acquire(tpool, &reused, NULL, NULL);
        cr_assert_not_null(x->uc);
    }
}

/* Run the loop until n results in all were delivered (2 s at most). */
static void
run_until(int n)
{
    struct timespec ts = { 0, 2000000 };
    int i;

    for (i = 0; i < 1000 && delivered < n; i++) {
        event_base_loop(tbase, EVLOOP_NONBLOCK);
        nanosleep(&ts, NULL);
    }
    event_base_loop(tbase, EVLOOP_NONBLOCK);
    cr_assert_eq(delivered, n, "delivered %d, wanted %d", delivered, n);
}

Test(adaptive_pool, admit_queue_evict_timeout_cancel)
{
    struct sockaddr_in sin;
    socklen_t len = sizeof(sin);
    char yaml[1024];
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), reused;
    struct tg_uconn *u1, *u2;
    waiting a = { 0 }, b = { 0 }, c = { 0 }, e = { 0 }, p = { 0 }, t = { 0 };
    tg_conf *conf;

    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(bind(lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    cr_assert_eq(listen(lfd, 16), 0);
    cr_assert_eq(getsockname(lfd, (struct sockaddr *)&sin, &len), 0);
    snprintf(yaml, sizeof(yaml), "listen: [ { address: 127.0.0.1:0 } ]\n"
             "workers: 1\n"
             "upstream: { servers: [127.0.0.1:%d] }\n" TIERS
             "adaptive: { concurrency: { initial: 2, min: 1, max: 4, queue: 2, "
             "queue_timeout_ms: 50 } }\n", ntohs(sin.sin_port));
    conf = load(yaml);
    cr_assert_not_null(conf, "%s", err);
    tbase = event_base_new();
    tpool = tg_upstream_pool_create(tbase, conf);
    tg_upstream_pool_set_clock(tpool, clock_ms);

    /* Two slots: go, go. */
    cr_assert_eq(tg_upstream_admit(tpool, "basic", &a.w, on_admit, &a), TG_ADMIT_GO);
    cr_assert_null(a.w);
    cr_assert_not_null(u1 = tg_upstream_acquire(tpool, &reused, NULL, NULL));
    cr_assert_eq(tg_upstream_admit(tpool, "basic", &a.w, on_admit, &a), TG_ADMIT_GO);
    cr_assert_not_null(u2 = tg_upstream_acquire(tpool, &reused, NULL, NULL));

    /* Full: two basic wait, a third is refused, an enterprise request
     * takes the newest basic's place (b is told, from the loop). */
    cr_assert_eq(tg_upstream_admit(tpool, "basic", &a.w, on_admit, &a), TG_ADMIT_WAIT);
    cr_assert_eq(tg_upstream_admit(tpool, "basic", &b.w, on_admit, &b), TG_ADMIT_WAIT);
    cr_assert_eq(tg_upstream_admit(tpool, "basic", &c.w, on_admit, &c), TG_ADMIT_FULL);
    cr_assert_null(c.w);
    cr_assert_eq(tg_upstream_admit(tpool, "enterprise", &e.w, on_admit, &e), TG_ADMIT_WAIT);
    cr_assert_eq(b.got, 0, "never inside the caller's call");
    run_until(1);
    cr_assert_eq(b.result, TG_ADMIT_EVICTED);

    /* A pro request queues (in b's place); a is cancelled (client gone). */
    cr_assert_eq(tg_upstream_admit(tpool, "pro", &p.w, on_admit, &p), TG_ADMIT_WAIT);
    tg_upstream_admit_cancel(a.w);

    /* A slot frees: enterprise first (it takes the slot), pro waits. */
    tg_upstream_release(u1, 0);
    run_until(2);
    cr_assert_eq(e.result, TG_ADMIT_GO);
    cr_assert_eq(p.got, 0, "one slot, one waiter");
    tg_upstream_release(u2, 0);
    run_until(3);
    cr_assert_eq(p.result, TG_ADMIT_GO);
    cr_assert_eq(a.got, 0, "a cancelled waiter is never called");

    /* No slot within queue_timeout_ms: shed. */
    cr_assert_eq(tg_upstream_admit(tpool, "enterprise", &t.w, on_admit, &t), TG_ADMIT_WAIT);
    fake_now += 100;
    run_until(4);
    cr_assert_eq(t.result, TG_ADMIT_TIMEOUT);

    /* Destroy with a waiter still queued: the pool frees it. */
    cr_assert_eq(tg_upstream_admit(tpool, NULL, &c.w, on_admit, &c), TG_ADMIT_WAIT);
    tg_upstream_release(e.uc, 0);
    tg_upstream_release(p.uc, 0);
    cr_assert_eq(c.got, 0);
    tg_upstream_pool_destroy(tpool);
    event_base_free(tbase);
    tg_conf_unref(conf);
    close(lfd);
}
