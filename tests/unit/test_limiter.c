/*
 * test_limiter.c - the limiter without sockets (store: local): anonymous
 * buckets keyed by client network (IPv6 by prefix, IPv4-mapped as IPv4),
 * the exact rate-limit headers of each kind of answer, and the fallback's
 * division of every limit among redis.instances (against a Redis that is
 * not there).
 */
#include <criterion/criterion.h>

#include <event2/event.h>
#include <stdio.h>
#include <string.h>

#include "tollgate/conf.h"
#include "tollgate/limiter.h"
#include "tollgate/throttle.h"

static tg_conf *
conf_with(const char *extra)
{
    static char text[2048], err[TG_CONF_ERRLEN];
    tg_conf *c;

    snprintf(text, sizeof(text),
             "listen:\n  - address: 127.0.0.1:8080\n"
             "upstream:\n  servers: [127.0.0.1:8000]\n"
             "store: local\n"
             "rate_limits:\n  anon: { requests_per_minute: 1, burst_limit: 2 }\n%s", extra);
    c = tg_conf_load_string("t.yaml", text, strlen(text), err, sizeof(err));
    cr_assert_not_null(c, "%s", err);
    return c;
}

static void
never(void *arg)
{
    (void)arg;
    cr_assert_fail("store: local decides at once");
}

/* One keyless GET / from ip: the status (0 = allowed). */
static int
from(struct tg_limiter *lim, const char *ip)
{
    tg_http_req req;
    tg_limit_ctx ctx;
    tg_limit_outcome out;

    memset(&req, 0, sizeof(req));
    req.method = "GET";
    req.method_len = 3;
    req.path = "/";
    req.path_len = 1;
    cr_assert_eq(tg_limiter_check(lim, &ctx, &req, ip, &out, never, NULL), TG_OK);
    return out.status;
}

static struct tg_limiter *
limiter(const char *extra, struct event_base **base)
{
    char err[256];
    tg_conf *c = conf_with(extra);
    struct tg_limiter *lim;

    *base = event_base_new();
    lim = tg_limiter_create(*base, c, NULL, err, sizeof(err));
    cr_assert_not_null(lim, "%s", err);
    tg_conf_unref(c);
    return lim;
}

/* Burst 2 per network: the third request of one network is refused. */
Test(limiter, anonymous_ipv6_by_prefix)
{
    struct event_base *base;
    struct tg_limiter *lim = limiter("auth: { anonymous_tier: anon }\n", &base);

    cr_assert_eq(from(lim, "2001:db8:1:2::1"), 0);
    cr_assert_eq(from(lim, "2001:db8:1:2:ffff:ffff:ffff:fffe"), 0);
    cr_assert_eq(from(lim, "2001:db8:1:2:abcd::9"), 429, "same /64: one bucket");
    cr_assert_eq(from(lim, "2001:db8:1:3::1"), 0, "another /64");
    /* IPv4-mapped is the IPv4 address */
    cr_assert_eq(from(lim, "10.1.2.3"), 0);
    cr_assert_eq(from(lim, "::ffff:10.1.2.3"), 0);
    cr_assert_eq(from(lim, "::ffff:10.1.2.3"), 429, "::ffff:10.1.2.3 is 10.1.2.3");
    cr_assert_eq(from(lim, "10.1.2.4"), 0, "IPv4 keeps one bucket per address");
    tg_limiter_destroy(lim);
    event_base_free(base);
}

Test(limiter, anonymous_ipv6_prefix_configurable)
{
    struct event_base *base;
    struct tg_limiter *lim = limiter("auth: { anonymous_tier: anon, "
                                     "anonymous_ipv6_prefix: 128 }\n", &base);

    cr_assert_eq(from(lim, "2001:db8::1"), 0);
    cr_assert_eq(from(lim, "2001:db8::1"), 0);
    cr_assert_eq(from(lim, "2001:db8::1"), 429);
    cr_assert_eq(from(lim, "2001:db8::2"), 0, "/128: one bucket per address");
    tg_limiter_destroy(lim);
    event_base_free(base);
}

/* A 429 that no wait would cure carries no Retry-After; others do. */
Test(limiter, no_retry_after_for_a_request_that_cannot_pass)
{
    tg_limit_outcome o;
    char buf[512];

    memset(&o, 0, sizeof(o));
    o.status = 429;
    o.limited = 1;
    snprintf(o.policy, sizeof(o.policy), "basic");
    o.quota = 20;
    o.retry_s = 0;
    tg_limiter_headers(&o, buf, sizeof(buf));
    cr_assert(strstr(buf, "Retry-After") == NULL, "%s", buf);
    cr_assert(strstr(buf, "X-RateLimit-Limit: 20") != NULL, "%s", buf);
    o.retry_s = 3;
    tg_limiter_headers(&o, buf, sizeof(buf));
    cr_assert(strstr(buf, "Retry-After: 3\r\n") != NULL, "%s", buf);
}

/* ---- the throttle's factor (throttle.h) ------------------------------ */

/* One keyless GET / from ip: its outcome. */
static tg_limit_outcome
outcome_from(struct tg_limiter *lim, const char *ip)
{
    tg_http_req req;
    tg_limit_ctx ctx;
    tg_limit_outcome out;

    memset(&req, 0, sizeof(req));
    req.method = "GET";
    req.method_len = 3;
    req.path = "/";
    req.path_len = 1;
    cr_assert_eq(tg_limiter_check(lim, &ctx, &req, ip, &out, never, NULL), TG_OK);
    return out;
}

/* Drive the process's throttle (store: local, no Redis) to factor 0.25
 * on an injected clock: two windows of slow exchanges. */
static void
throttle_to_quarter(const tg_conf *c)
{
    tg_throttle_init(c);
    tg_throttle_tick(c, NULL, "tg:", 1000);
    for (uint64_t t = 1100; t <= 1200; t += 100) {
        for (int i = 0; i < 40; i++) {
            tg_throttle_record(50000, 0);          /* 50 ms, target 10 ms */
        }
        tg_throttle_tick(c, NULL, "tg:", t);
    }
    cr_assert_eq(tg_throttle_factor(), 250);
}

/* anon: burst 2, one token per 60 s.  At factor 0.25 one per 240 s: the
 * burst is the same, the quota shown is 1 over the same 120 s window, the
 * remaining shown never above it, and the 429 waits 240 s, not 60. */
Test(limiter, throttle_factor_scales_the_refill)
{
    struct event_base *base;
    struct tg_limiter *lim;
    tg_conf *c = conf_with("auth: { anonymous_tier: anon }\n"
                           "adaptive: { throttle: { target_p99_ms: 10, window_ms: 100 } }\n");
    tg_limit_outcome o;
    char buf[512];

    throttle_to_quarter(c);
    lim = limiter("auth: { anonymous_tier: anon }\n", &base);
    o = outcome_from(lim, "10.0.0.1");
    cr_assert_eq(o.status, 0);
    cr_assert_eq(o.quota, 1, "burst 2 x 0.25, at least 1: %u", o.quota);
    cr_assert_eq(o.window_s, 120, "the configured window: %u", o.window_s);
    cr_assert_eq(o.remaining, 1);
    tg_limiter_headers(&o, buf, sizeof(buf));
    cr_assert(strstr(buf, "RateLimit-Policy: \"anon\";q=1;w=120\r\n") != NULL, "%s", buf);
    cr_assert(strstr(buf, "X-RateLimit-Limit: 1\r\n") != NULL, "%s", buf);
    cr_assert(strstr(buf, "X-RateLimit-Remaining: 1\r\n") != NULL, "%s", buf);
    o = outcome_from(lim, "10.0.0.1");
    cr_assert_eq(o.status, 0, "the burst is unchanged");
    o = outcome_from(lim, "10.0.0.1");
    cr_assert_eq(o.status, 429);
    cr_assert(o.retry_s > 230 && o.retry_s <= 240, "Retry-After %u: one token per 240 s",
              o.retry_s);

    /* back to 1: the configured limits (a fresh bucket) */
    tg_throttle_deinit();
    tg_throttle_init(c);
    o = outcome_from(lim, "10.0.0.2");
    cr_assert_eq(o.quota, 2);
    cr_assert_eq(o.window_s, 120);
    outcome_from(lim, "10.0.0.2");
    o = outcome_from(lim, "10.0.0.2");
    cr_assert_eq(o.status, 429);
    cr_assert(o.retry_s > 50 && o.retry_s <= 60, "Retry-After %u", o.retry_s);
    tg_throttle_deinit();
    tg_limiter_destroy(lim);
    event_base_free(base);
    tg_conf_unref(c);
}

/* ---- headers ---------------------------------------------------------- */

static tg_limit_outcome
outcome(int status, int limited, uint32_t remaining, uint32_t reset_s, uint32_t retry_s)
{
    tg_limit_outcome o;

    memset(&o, 0, sizeof(o));
    o.status = status;
    o.limited = limited;
    snprintf(o.policy, sizeof(o.policy), "basic");
    o.quota = 20;
    o.window_s = 12;
    o.remaining = remaining;
    o.reset_s = reset_s;
    o.retry_s = retry_s;
    return o;
}

Test(limiter, headers_exact)
{
    char buf[512];
    size_t n;
    tg_limit_outcome o;

    /* allowed: the policy, the state, the legacy trio; no Retry-After */
    o = outcome(0, 1, 7, 3, 0);
    n = tg_limiter_headers(&o, buf, sizeof(buf));
    cr_assert_eq(n, strlen(buf));
    cr_expect_str_eq(buf, "RateLimit-Policy: \"basic\";q=20;w=12\r\n"
                          "RateLimit: \"basic\";r=7;t=3\r\n"
                          "X-RateLimit-Limit: 20\r\n"
                          "X-RateLimit-Remaining: 7\r\n"
                          "X-RateLimit-Reset: 3\r\n");
    /* 429: the same, and when to come back */
    o = outcome(429, 1, 0, 12, 1);
    n = tg_limiter_headers(&o, buf, sizeof(buf));
    cr_assert_eq(n, strlen(buf));
    cr_expect_str_eq(buf, "RateLimit-Policy: \"basic\";q=20;w=12\r\n"
                          "RateLimit: \"basic\";r=0;t=12\r\n"
                          "X-RateLimit-Limit: 20\r\n"
                          "X-RateLimit-Remaining: 0\r\n"
                          "X-RateLimit-Reset: 12\r\n"
                          "Retry-After: 1\r\n");
    /* 429 of a request that can never pass: no Retry-After */
    o = outcome(429, 1, 0, 0, 0);
    n = tg_limiter_headers(&o, buf, sizeof(buf));
    cr_assert_eq(n, strlen(buf));
    cr_expect_str_eq(buf, "RateLimit-Policy: \"basic\";q=20;w=12\r\n"
                          "RateLimit: \"basic\";r=0;t=0\r\n"
                          "X-RateLimit-Limit: 20\r\n"
                          "X-RateLimit-Remaining: 0\r\n"
                          "X-RateLimit-Reset: 0\r\n");
    /* 503 (store down, on_failure: deny): Retry-After alone */
    o = outcome(503, 0, 0, 0, 2);
    n = tg_limiter_headers(&o, buf, sizeof(buf));
    cr_assert_eq(n, strlen(buf));
    cr_expect_str_eq(buf, "Retry-After: 2\r\n");
    /* 401/403: none */
    o = outcome(401, 0, 0, 0, 0);
    cr_expect_eq(tg_limiter_headers(&o, buf, sizeof(buf)), 0);
    /* a buffer too small for the block: none, never a cut line */
    o = outcome(429, 1, 0, 12, 1);
    cr_expect_eq(tg_limiter_headers(&o, buf, 40), 0);
}

/* ---- the fallback's division (redis.instances) ------------------------- */

typedef struct answer {
    int done;
    struct event_base *base;
} answer;

static void
answered(void *arg)
{
    answer *a = arg;

    a->done = 1;
    event_base_loopbreak(a->base);
}

/* One keyless GET path from 10.0.0.1, waiting (at most 10 s) for the
 * Redis call to fail: out filled. */
static void
fallback_get(struct tg_limiter *lim, struct event_base *base, const char *path,
             tg_limit_outcome *out)
{
    tg_http_req req;
    static tg_limit_ctx ctx;
    answer a = { 0, base };
    struct timeval tv = { 10, 0 };

    memset(&req, 0, sizeof(req));
    req.method = "GET";
    req.method_len = 3;
    req.path = path;
    req.path_len = strlen(path);
    if (tg_limiter_check(lim, &ctx, &req, "10.0.0.1", out, answered, &a) == TG_OK) {
        return;
    }
    event_base_loopexit(base, &tv);
    while (!a.done && event_base_dispatch(base) == 0 && !event_base_got_exit(base)) {
    }
    cr_assert(a.done, "the charge to a Redis that is not there was not answered");
}

/* store: redis on a port where nothing listens, on_failure: local. */
static struct tg_limiter *
redis_down(unsigned instances, struct event_base **base)
{
    static char text[2048];
    char err[TG_CONF_ERRLEN];
    tg_conf *c;
    struct tg_limiter *lim;

    snprintf(text, sizeof(text),
             "listen:\n  - address: 127.0.0.1:8080\n"
             "upstream:\n  servers: [127.0.0.1:8000]\n"
             "store: redis\n"
             "redis: { url: \"redis://127.0.0.1:1/0\", on_failure: local, instances: %u }\n"
             "rate_limits:\n  anon: { requests_per_minute: 60, burst_limit: 8 }\n"
             "auth: { anonymous_tier: anon }\n"
             "routes:\n  - { name: big, path: /big, cost: 3 }\n", instances);
    c = tg_conf_load_string("t.yaml", text, strlen(text), err, sizeof(err));
    cr_assert_not_null(c, "%s", err);
    *base = event_base_new();
    lim = tg_limiter_create(*base, c, NULL, err, sizeof(err));
    cr_assert_not_null(lim, "%s", err);
    tg_conf_unref(c);
    return lim;
}

/* Each of 2 instances keeps half of every limit: burst 4, a token every
 * 2 s (headers say so). */
Test(limiter, fallback_divides_by_instances)
{
    struct event_base *base;
    struct tg_limiter *lim = redis_down(2, &base);
    tg_limit_outcome out;

    for (int i = 0; i < 4; i++) {
        fallback_get(lim, base, "/", &out);
        cr_assert_eq(out.status, 0, "request %d: %d", i + 1, out.status);
        cr_expect_eq(out.fallback, 1);
        cr_expect_eq(out.quota, 4);
        cr_expect_eq(out.window_s, 8);
        cr_expect_eq(out.remaining, (uint32_t)(3 - i));
    }
    fallback_get(lim, base, "/", &out);
    cr_expect_eq(out.status, 429);
    cr_expect_eq(out.quota, 4);
    cr_expect_eq(out.retry_s, 2);
    tg_limiter_destroy(lim);
    event_base_free(base);
}

/* 4 instances: 8 / 4 = 2, but never below the largest route cost (3): a
 * share of 2 would refuse /big for good. */
Test(limiter, fallback_share_never_below_the_largest_cost)
{
    struct event_base *base;
    struct tg_limiter *lim = redis_down(4, &base);
    tg_limit_outcome out;

    fallback_get(lim, base, "/big", &out);
    cr_assert_eq(out.status, 0, "%d", out.status);
    cr_expect_eq(out.fallback, 1);
    cr_expect_eq(out.cost, 3);
    cr_expect_eq(out.quota, 3);
    cr_expect_eq(out.window_s, 12);           /* 3 tokens, one every 4 s */
    cr_expect_eq(out.remaining, 0);
    fallback_get(lim, base, "/", &out);
    cr_expect_eq(out.status, 429);
    cr_expect_eq(out.retry_s, 4);
    tg_limiter_destroy(lim);
    event_base_free(base);
}

/* One instance (the default): the limits as configured. */
Test(limiter, fallback_one_instance_keeps_the_limits)
{
    struct event_base *base;
    struct tg_limiter *lim = redis_down(1, &base);
    tg_limit_outcome out;

    fallback_get(lim, base, "/", &out);
    cr_assert_eq(out.status, 0, "%d", out.status);
    cr_expect_eq(out.fallback, 1);
    cr_expect_eq(out.quota, 8);
    cr_expect_eq(out.window_s, 8);
    cr_expect_eq(out.remaining, 7);
    tg_limiter_destroy(lim);
    event_base_free(base);
}
