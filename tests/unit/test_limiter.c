/*
 * test_limiter.c - the limiter without sockets (store: local): anonymous
 * buckets keyed by client network (IPv6 by prefix, IPv4-mapped as IPv4),
 * and headers of a request that can never pass (no Retry-After).
 */
#include <criterion/criterion.h>

#include <event2/event.h>
#include <stdio.h>
#include <string.h>

#include "tollgate/conf.h"
#include "tollgate/limiter.h"

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
