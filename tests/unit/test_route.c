/*
 * test_route.c - the route stage without sockets: which rule a request
 * matches (first match in file order, method or any, GET takes HEAD,
 * segment-wise path prefixes on the normalised path), its cost, the
 * largest cost, and the buckets and keys it is charged to.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <string.h>

#include "tollgate/conf.h"
#include "tollgate/route.h"

static tg_conf *
conf_with(const char *extra)
{
    static char text[4096], err[TG_CONF_ERRLEN];
    tg_conf *c;

    snprintf(text, sizeof(text),
             "listen:\n  - address: 127.0.0.1:8080\n"
             "upstream:\n  servers: [127.0.0.1:8000]\n"
             "store: local\n"
             "rate_limits:\n  basic: { requests_per_minute: 100, burst_limit: 20 }\n%s",
             extra);
    c = tg_conf_load_string("t.yaml", text, strlen(text), err, sizeof(err));
    cr_assert_not_null(c, "%s", err);
    return c;
}

static const char routes[] =
    "routes:\n"
    "  - { name: export, method: POST, path: /leads/export, cost: 10,\n"
    "      limit: { requests_per_minute: 60, burst_limit: 20 } }\n"
    "  - { name: post_leads, method: POST, path: /leads, cost: 5 }\n"
    "  - { name: get_leads, method: GET, path: /leads, cost: 2 }\n"
    "  - { name: dir, path: /static/, cost: 3 }\n"
    "  - { name: any_admin, path: /admin }\n";

/* The rule index (-1: none) of method + path under c. */
static int
route_of(const tg_conf *c, const char *method, const char *path)
{
    tg_http_req req;
    const tg_route_conf *r;

    memset(&req, 0, sizeof(req));
    req.method = method;
    req.method_len = strlen(method);
    req.is_head = strcmp(method, "HEAD") == 0;
    req.path = path;
    req.path_len = strlen(path);
    r = tg_route_find(c, &req);
    return r == NULL ? -1 : (int)(r - c->routes);
}

Test(route, table)
{
    static const struct {
        const char *method, *path;
        int route;
        uint32_t cost;
    } cases[] = {
        { "POST", "/leads/export", 0, 10 },
        { "POST", "/leads/export/7", 0, 10 },
        { "POST", "/leads/export?x=1", 0, 10 },
        { "POST", "/leads/exportx", 1, 5 },     /* not on a segment boundary */
        { "POST", "/leads", 1, 5 },
        { "POST", "/leads/7", 1, 5 },
        { "POST", "/leads?page=2", 1, 5 },
        { "POST", "/leadsx", -1, 1 },
        { "GET", "/leads/export", 2, 2 },       /* method first: GET rule */
        { "GET", "/leads", 2, 2 },
        { "HEAD", "/leads", 2, 2 },             /* HEAD is charged as GET */
        { "HEAD", "/leads/export", 2, 2 },
        { "PUT", "/leads", -1, 1 },
        { "get", "/leads", -1, 1 },             /* methods are case-sensitive */
        { "GET", "/static/app.js", 3, 3 },      /* any method */
        { "DELETE", "/static/x/y", 3, 3 },
        { "GET", "/static", -1, 1 },            /* "/static/" needs the slash */
        { "GET", "/admin", 4, 1 },
        { "PATCH", "/admin/users", 4, 1 },
        { "GET", "/administrator", -1, 1 },
        { "GET", "/", -1, 1 },
        { "OPTIONS", "*", -1, 1 },
    };
    tg_conf *c = conf_with(routes);

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int r = route_of(c, cases[i].method, cases[i].path);
        uint32_t cost = r >= 0 ? c->routes[r].cost : 1;

        cr_expect_eq(r, cases[i].route, "%s %s: route %d, expected %d", cases[i].method,
                     cases[i].path, r, cases[i].route);
        cr_expect_eq(cost, cases[i].cost, "%s %s: cost %u, expected %u", cases[i].method,
                     cases[i].path, cost, cases[i].cost);
    }
    tg_conf_unref(c);
}

/* Escapes that remain in a normalised path compare as what they encode. */
Test(route, escapes_compare_decoded)
{
    tg_conf *c = conf_with("routes:\n  - { name: colon, path: \"/a:b\", cost: 4 }\n");

    cr_expect_eq(route_of(c, "GET", "/a%3Ab"), 0);
    cr_expect_eq(route_of(c, "GET", "/a%3ab/c"), 0);
    cr_expect_eq(route_of(c, "GET", "/a%3Ac"), -1);
    tg_conf_unref(c);
}

/* No routes: every request costs 1 and has no route. */
Test(route, none)
{
    tg_conf *c = conf_with("");

    cr_expect_eq(route_of(c, "GET", "/leads"), -1);
    cr_expect_eq(tg_route_max_cost(c), 1);
    tg_conf_unref(c);
}

Test(route, max_cost)
{
    tg_conf *c = conf_with(routes);

    cr_expect_eq(tg_route_max_cost(c), 10);
    tg_conf_unref(c);
}

/* Tier bucket always; the route's own when it has a limit; global when on. */
Test(route, buckets)
{
    tg_conf *c = conf_with("global_limit: { requests_per_second: 50, burst: 7 }\n");
    tg_conf *r = conf_with(routes);
    tg_gcra_limit limits[TG_LIMIT_MAX_BUCKETS];
    char names[TG_LIMIT_MAX_BUCKETS][TG_TIER_MAX + 1];
    char keys[TG_LIMIT_MAX_BUCKETS][TG_LIMIT_KEY_MAX];
    const tg_tier_conf *tier = tg_conf_tier(r, "basic");
    size_t n;
    int global;

    cr_assert_not_null(tier);
    /* a route with a limit, no global */
    n = tg_route_buckets(r, tier, &r->routes[0], "tg:", "acme", limits, names, keys,
                         &global);
    cr_assert_eq(n, 2);
    cr_expect_eq(global, -1);
    cr_expect_str_eq(keys[0], "tg:{acme}:t");
    cr_expect_str_eq(names[0], "basic");
    cr_expect_eq(limits[0].burst, 20);
    cr_expect_eq(limits[0].interval_us, 600000);       /* 100/min */
    cr_expect_str_eq(keys[1], "tg:{acme}:r:export");
    cr_expect_str_eq(names[1], "export");
    cr_expect_eq(limits[1].burst, 20);
    cr_expect_eq(limits[1].interval_us, 1000000);      /* 60/min */
    /* a route without a limit: the tier bucket alone */
    n = tg_route_buckets(r, tier, &r->routes[1], "tg:", "anon:10.0.0.1", limits, names,
                         keys, &global);
    cr_assert_eq(n, 1);
    cr_expect_eq(global, -1);
    cr_expect_str_eq(keys[0], "tg:{anon:10.0.0.1}:t");
    /* no route, global on */
    tier = tg_conf_tier(c, "basic");
    n = tg_route_buckets(c, tier, NULL, "p:", "acme", limits, names, keys, &global);
    cr_assert_eq(n, 2);
    cr_expect_eq(global, 1);              /* the local store's hot bucket */
    cr_expect_str_eq(keys[0], "p:{acme}:t");
    cr_expect_str_eq(keys[1], "p:{global}:g");
    cr_expect_str_eq(names[1], "global");
    cr_expect_eq(limits[1].burst, 7);
    cr_expect_eq(limits[1].interval_us, 20000);        /* 50/s */
    tg_conf_unref(c);
    tg_conf_unref(r);
}

/* The global bucket's index is the route stage's word, not a guess from a
 * key: after a route bucket it is the third. */
Test(route, global_index)
{
    char text[1024];
    tg_conf *c;
    tg_gcra_limit limits[TG_LIMIT_MAX_BUCKETS];
    char names[TG_LIMIT_MAX_BUCKETS][TG_TIER_MAX + 1];
    char keys[TG_LIMIT_MAX_BUCKETS][TG_LIMIT_KEY_MAX];
    size_t n;
    int global = 7;

    snprintf(text, sizeof(text), "%sglobal_limit: { requests_per_second: 50, burst: 70 }\n",
             routes);
    c = conf_with(text);
    n = tg_route_buckets(c, tg_conf_tier(c, "basic"), &c->routes[0], "tg:", "acme",
                         limits, names, keys, &global);
    cr_assert_eq(n, 3);
    cr_expect_eq(global, 2);
    cr_expect_str_eq(keys[2], "tg:{global}:g");
    cr_expect_str_eq(names[2], "global");
    /* the same consumer without the route's bucket: second */
    n = tg_route_buckets(c, tg_conf_tier(c, "basic"), NULL, "tg:", "acme", limits, names,
                         keys, &global);
    cr_assert_eq(n, 2);
    cr_expect_eq(global, 1);
    tg_conf_unref(c);
}
