/*
 * test_target.c - unit tests of src/target.c: the normal form of request
 * targets (a table of inputs and their normal form or rejection), the
 * route prefix match and the route path check.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <string.h>

#include "tollgate/target.h"

/* Normalise in; NULL for "rejected".  Returns a static buffer. */
static const char *
norm(const char *in)
{
    static char buf[512];
    size_t n = strlen(in);
    const char *err = NULL;

    cr_assert_lt(n, sizeof(buf));
    memcpy(buf, in, n);
    if (tg_target_normalize(buf, &n, &err) != TG_OK) {
        cr_assert_not_null(err, "no error text for %s", in);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

static const struct {
    const char *in;
    const char *out;            /* NULL: rejected */
} cases[] = {
    /* already normal */
    { "/", "/" },
    { "/leads", "/leads" },
    { "/leads/", "/leads/" },
    { "/leads/7?x=1&y=%2f", "/leads/7?x=1&y=%2f" },
    { "/a:b@c!$&'()*+,;=", "/a:b@c!$&'()*+,;=" },
    /* unreserved escapes decoded, in either hex case */
    { "/%6ceads", "/leads" },
    { "/%6Ceads", "/leads" },
    { "/leads/%65xport", "/leads/export" },
    { "/%41%7a%30%2D%2e%5F%7E", "/Az0-._~" },
    /* other escapes kept, upper-case */
    { "/a%3ab", "/a%3Ab" },
    { "/a%20b", "/a%20b" },
    { "/a%7b%7C", "/a%7B%7C" },
    { "/%c3%a9", "/%C3%A9" },
    { "/%25", "/%25" },
    { "/%256ceads", "/%256ceads" },
    { "/%23x", "/%23x" },
    { "/%3F", "/%3F" },
    /* dot segments, plain and encoded */
    { "/a/./b", "/a/b" },
    { "/a/../b", "/b" },
    { "/a/b/..", "/a/" },
    { "/a/b/.", "/a/b/" },
    { "/..", "/" },
    { "/../../x", "/x" },
    { "/./", "/" },
    { "/.", "/" },
    { "/a/..", "/" },
    { "/x/%2e%2E/leads", "/leads" },
    { "/x/.%2e/leads/export", "/leads/export" },
    { "/leads/export/../../leads/export", "/leads/export" },
    { "/...", "/..." },
    { "/.a/..b", "/.a/..b" },
    /* the query is left alone, dots and all */
    { "/a/../b?../c/./d", "/b?../c/./d" },
    { "/?a[]=1|2{}", "/?a[]=1|2{}" },
    { "/x?%zz", "/x?%zz" },
    /* rejected */
    { "", NULL },
    { "leads", NULL },
    { "/leads/export#x", NULL },
    { "/leads?x#y", NULL },
    { "/a%2Fb", NULL },
    { "/a%2fb", NULL },
    { "/a%00b", NULL },
    { "/a%", NULL },
    { "/a%4", NULL },
    { "/a%4g", NULL },
    { "/a%%41", NULL },
    { "/a%?41", NULL },
    { "//", NULL },
    { "//leads", NULL },
    { "/leads//export", NULL },
    { "/a/%2e//b", NULL },
    { "/a b", NULL },
    { "/a\"b", NULL },
    { "/a<b>", NULL },
    { "/a\\b", NULL },
    { "/a^b", NULL },
    { "/a`b", NULL },
    { "/a{b}", NULL },
    { "/a|b", NULL },
    { "/a[b]", NULL },
    { "/a\x7f", NULL },
    { "/a\x80", NULL },
    { "/a\tb", NULL },
    { "/x?a b", NULL },
};

Test(target, table)
{
    size_t i;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *got = norm(cases[i].in);

        if (cases[i].out == NULL) {
            cr_expect_null(got, "\"%s\" should be rejected, got \"%s\"", cases[i].in,
                           got ? got : "");
        } else {
            cr_expect_not_null(got, "\"%s\" rejected", cases[i].in);
            if (got != NULL) {
                cr_expect_str_eq(got, cases[i].out, "\"%s\"", cases[i].in);
            }
        }
    }
}

/* The normal form is a fixed point. */
Test(target, idempotent)
{
    size_t i;
    char again[512];

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *got = norm(cases[i].in);
        if (got != NULL) {
            snprintf(again, sizeof(again), "%s", got);
            cr_expect_str_eq(norm(again), again, "\"%s\"", cases[i].in);
        }
    }
}

Test(target, error_texts)
{
    struct { const char *in, *err; } e[] = {
        { "/a#b", "fragment in request target" },
        { "/a%2Fb", "encoded slash (%2F) in path" },
        { "/a%00", "encoded NUL (%00) in path" },
        { "/a%g0", "bad percent escape in path" },
        { "/a//b", "empty path segment (//) in path" },
        { "/a|b", "invalid character in path" },
    };
    size_t i;

    for (i = 0; i < sizeof(e) / sizeof(e[0]); i++) {
        char buf[64];
        size_t n = strlen(e[i].in);
        const char *err = NULL;

        memcpy(buf, e[i].in, n);
        cr_expect_eq(tg_target_normalize(buf, &n, &err), TG_ERR);
        cr_expect_str_eq(err ? err : "", e[i].err, "%s", e[i].in);
    }
}

#define MATCH(t, p) tg_target_match_prefix((t), strlen(t), (p))

Test(target, match_prefix)
{
    cr_expect(MATCH("/leads", "/leads"));
    cr_expect(MATCH("/leads/7", "/leads"));
    cr_expect(MATCH("/leads?x", "/leads"));
    cr_expect(!MATCH("/leadsx", "/leads"));
    cr_expect(!MATCH("/lead", "/leads"));
    cr_expect(!MATCH("/lead?s", "/leads"));
    cr_expect(MATCH("/leads/export", "/leads/"));
    cr_expect(!MATCH("/leads", "/leads/"));
    cr_expect(MATCH("/anything", "/"));
    /* escapes compare as the byte the application decodes */
    cr_expect(MATCH("/v1/items%3Abatch", "/v1/items:batch"));
    cr_expect(MATCH("/v1/items%3abatch?x", "/v1/items:batch"));
    cr_expect(!MATCH("/v1/items%3Bbatch", "/v1/items:batch"));
    cr_expect(!MATCH("/leads%3Fx", "/leads"));
}

static const char *
route(const char *s)
{
    static char out[64];
    const char *err = NULL;

    if (tg_target_route_path(s, out, sizeof(out), &err) != TG_OK) {
        cr_assert_not_null(err);
        return NULL;
    }
    return out;
}

Test(target, route_paths)
{
    cr_expect_str_eq(route("/"), "/");
    cr_expect_str_eq(route("/leads"), "/leads");
    cr_expect_str_eq(route("/leads/"), "/leads/");
    cr_expect_str_eq(route("/v1/items:batch"), "/v1/items:batch");
    cr_expect_str_eq(route("/le%61ds/./"), "/leads/");
    cr_expect_str_eq(route("/a/../b"), "/b");
    cr_expect_str_eq(route("/v2/~x%20y"), "/v2/~x y");
    cr_expect_str_eq(route("/%c3%a9"), "/\xc3\xa9");
    cr_expect_null(route("leads"));
    cr_expect_null(route("/leads?x"));
    cr_expect_null(route("/a//b"));
    cr_expect_null(route("/a#b"));
    cr_expect_null(route("/a|b"));
    cr_expect_null(route("/a%2Fb"));
    cr_expect_null(route("/0123456789012345678901234567890123456789012345678901234567890123"));
    /* a request matches the route whatever escapes it uses */
    cr_expect(MATCH("/v2/~x%20y/1", route("/v2/~x%20y")));
    cr_expect(MATCH("/%C3%A9", route("/%c3%a9")));
}
