/*
 * test_identify.c - the identify stage without sockets (store: local, a
 * keys file): where the key is read from (the key header first, then
 * Authorization: Bearer), what an unknown, disabled or missing key gets,
 * and which header is kept from the upstream.
 */
#include <criterion/criterion.h>

#include <event2/event.h>
#include <stdio.h>
#include <string.h>

#include "tollgate/conf.h"
#include "tollgate/keys.h"
#include "tollgate/limiter.h"

/* sha256("k-acme") and sha256("k-off") */
#define ACME "0b131655124822cb1cf254042086d2bf26a4f1c6cd82727aab583e915346aca3"
#define OFF  "4814404f21ad64d38a108cd3bc56f33e2bb91f7acc73149670112a900e0277fb"

static struct event_base *base;

static struct tg_limiter *
limiter(const char *auth)
{
    static const char keys_yaml[] =
        "keys:\n"
        "  - { id: acme, tier: basic, sha256: \"" ACME "\", enabled: true }\n"
        "  - { id: off, tier: basic, sha256: \"" OFF "\", enabled: false }\n";
    char text[2048], err[TG_CONF_ERRLEN];
    tg_conf *c;
    struct tg_keys *k;
    struct tg_limiter *lim;

    snprintf(text, sizeof(text),
             "listen:\n  - address: 127.0.0.1:8080\n"
             "upstream:\n  servers: [127.0.0.1:8000]\n"
             "store: local\n"
             "rate_limits:\n  basic: { requests_per_minute: 60, burst_limit: 10 }\n"
             "%s", auth);
    c = tg_conf_load_string("t.yaml", text, strlen(text), err, sizeof(err));
    cr_assert_not_null(c, "%s", err);
    k = tg_keys_load_string("k.yaml", keys_yaml, strlen(keys_yaml), err, sizeof(err));
    cr_assert_not_null(k, "%s", err);
    base = event_base_new();
    lim = tg_limiter_create(base, c, k, err, sizeof(err));
    cr_assert_not_null(lim, "%s", err);
    tg_keys_unref(k);
    tg_conf_unref(c);
    return lim;
}

static void
done(struct tg_limiter *lim)
{
    tg_limiter_destroy(lim);
    event_base_free(base);
}

static void
never(void *arg)
{
    (void)arg;
    cr_assert_fail("store: local decides at once");
}

static tg_http_hdr hdrs[4];

/* A GET / with up to two headers (name NULL: none). */
static tg_http_req
request(const char *n1, const char *v1, const char *n2, const char *v2)
{
    tg_http_req req;

    memset(&req, 0, sizeof(req));
    memset(hdrs, 0, sizeof(hdrs));
    req.method = "GET";
    req.method_len = 3;
    req.path = "/";
    req.path_len = 1;
    req.hdr = hdrs;
    if (n1 != NULL) {
        hdrs[req.nhdr++] = (tg_http_hdr){ n1, strlen(n1), v1, strlen(v1) };
    }
    if (n2 != NULL) {
        hdrs[req.nhdr++] = (tg_http_hdr){ n2, strlen(n2), v2, strlen(v2) };
    }
    return req;
}

static tg_limit_outcome
check(struct tg_limiter *lim, const tg_http_req *req)
{
    tg_limit_ctx ctx;
    tg_limit_outcome out;

    cr_assert_eq(tg_limiter_check(lim, &ctx, req, "10.0.0.1", &out, never, NULL), TG_OK);
    return out;
}

Test(identify, where_the_key_comes_from)
{
    struct tg_limiter *lim = limiter("auth: {}\n");
    tg_http_req req;
    tg_limit_outcome o;

    req = request("X-API-Key", "k-acme", NULL, NULL);
    o = check(lim, &req);
    cr_expect_eq(o.status, 0);
    cr_expect_str_eq(o.consumer, "acme");
    cr_expect_str_eq(o.tier, "basic");
    cr_expect_eq(o.limited, 1);
    /* the header name is case-insensitive */
    req = request("x-api-key", "k-acme", NULL, NULL);
    cr_expect_eq(check(lim, &req).status, 0);
    /* Bearer, any case, blanks after it skipped */
    req = request("Authorization", "bearer \t k-acme", NULL, NULL);
    o = check(lim, &req);
    cr_expect_eq(o.status, 0);
    cr_expect_str_eq(o.consumer, "acme");
    /* the key header wins over Authorization */
    req = request("Authorization", "Bearer k-acme", "X-API-Key", "k-nope");
    o = check(lim, &req);
    cr_expect_eq(o.status, 401);
    cr_expect_str_eq(o.error, "unknown API key");
    /* other schemes are not keys */
    req = request("Authorization", "Basic k-acme", NULL, NULL);
    o = check(lim, &req);
    cr_expect_eq(o.status, 401);
    cr_expect_str_eq(o.error, "missing API key");
    done(lim);
}

Test(identify, unknown_disabled_missing)
{
    struct tg_limiter *lim = limiter("auth: {}\n");
    tg_http_req req;
    tg_limit_outcome o;

    req = request("X-API-Key", "k-nope", NULL, NULL);
    o = check(lim, &req);
    cr_expect_eq(o.status, 401);
    cr_expect_str_eq(o.error, "unknown API key");
    cr_expect_eq(o.limited, 0);
    req = request("X-API-Key", "k-off", NULL, NULL);
    o = check(lim, &req);
    cr_expect_eq(o.status, 403);
    cr_expect_str_eq(o.error, "API key disabled");
    cr_expect_str_eq(o.consumer, "off", "a disabled key is still named (logs)");
    req = request(NULL, NULL, NULL, NULL);
    o = check(lim, &req);
    cr_expect_eq(o.status, 401);
    cr_expect_str_eq(o.error, "missing API key");
    req = request("X-API-Key", "", NULL, NULL);
    cr_expect_eq(check(lim, &req).status, 401);
    done(lim);
}

/* auth.header names the key header; X-API-Key is then an ordinary header. */
Test(identify, configured_header)
{
    struct tg_limiter *lim = limiter("auth: { header: X-Key }\n");
    tg_http_req req;

    req = request("X-Key", "k-acme", NULL, NULL);
    cr_expect_eq(check(lim, &req).status, 0);
    req = request("X-API-Key", "k-acme", NULL, NULL);
    cr_expect_eq(check(lim, &req).status, 401);
    done(lim);
}

/* The header the key came from is not forwarded; other headers are. */
Test(identify, strip_header)
{
    struct tg_limiter *lim = limiter("auth: {}\n");
    tg_http_req req;

    req = request("X-API-Key", "k-acme", "Authorization", "Bearer other");
    cr_expect_eq(tg_limiter_strip_header(lim, &req, &hdrs[0]), 1);
    cr_expect_eq(tg_limiter_strip_header(lim, &req, &hdrs[1]), 0,
                 "the key came from X-API-Key: Authorization is the app's");
    req = request("Authorization", "Bearer k-acme", "Accept", "*/*");
    cr_expect_eq(tg_limiter_strip_header(lim, &req, &hdrs[0]), 1);
    cr_expect_eq(tg_limiter_strip_header(lim, &req, &hdrs[1]), 0);
    req = request("Authorization", "Basic abc", NULL, NULL);
    cr_expect_eq(tg_limiter_strip_header(lim, &req, &hdrs[0]), 0);
    done(lim);
    lim = limiter("auth: { forward_key: true }\n");
    req = request("X-API-Key", "k-acme", NULL, NULL);
    cr_expect_eq(tg_limiter_strip_header(lim, &req, &hdrs[0]), 0);
    done(lim);
}
