/*
 * test_edge.c - what the front door owns, through the real binary: the
 * normal form of request targets (every encoding is charged to its
 * canonical route or refused with 400, and the normal form is what the
 * application receives), HEAD charged to a GET route, the identity and
 * forwarding headers (client-sent ones never reach the application;
 * http.trusted_proxies), and an exact forwarded Content-Length.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/sha.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"

TestSuite(edge, .fini = tgh_cleanup, .timeout = 180);

static tgh_upstream up;
static tgh_tollgate tg;

#define KEY "k-edge"

/* keys.yaml with one enterprise key, KEY; returns its path. */
static const char *
write_keys(void)
{
    static char path[512];
    unsigned char d[32];
    FILE *f;
    int j;

    snprintf(path, sizeof path, "%s/edge-keys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    SHA256((const unsigned char *)KEY, strlen(KEY), d);
    fputs("keys:\n  - { id: edge, tier: enterprise, sha256: \"", f);
    for (j = 0; j < 32; j++)
        fprintf(f, "%02x", d[j]);
    fputs("\" }\n", f);
    fclose(f);
    return path;
}

/* The routes of these tests: the tightest bucket of a routed request is
 * its route's (q=50 < the tier's 200), so RateLimit-Policy names the
 * route a request was charged to. */
static const char *routes_yaml =
    "rate_limits:\n"
    "  enterprise: { requests_per_minute: 1000, burst_limit: 200 }\n"
    "routes:\n"
    "  - { name: exp, method: POST, path: /leads/export, limit: { requests_per_minute: 1, burst_limit: 50 } }\n"
    "  - { name: leads_post, method: POST, path: /leads, limit: { requests_per_minute: 1, burst_limit: 50 } }\n"
    "  - { name: leads_get, method: GET, path: /leads, limit: { requests_per_minute: 1, burst_limit: 50 } }\n";

/* tollgate in front of tg-testup (or uvicorn); keys: with routes_yaml and
 * KEY, else no limiter at all. */
static void
start(int fastapi, int keys, const char *http_extra)
{
    static char extra[2048];
    tgh_tg_opts o;

    if (fastapi)
        TGH_CHECK(tgh_fastapi_start(&up) == 0, "uvicorn did not start");
    else
        TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup did not start");
    tgh_tg_opts_default(&o, up.port);
    o.http_extra = http_extra;
    if (keys) {
        snprintf(extra, sizeof extra, "%sauth: { keys_file: %s }\n", routes_yaml,
                 write_keys());
        o.extra_yaml = extra;
    }
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate did not start");
}

/* One request with the key on a fresh connection; HEAD reads no body. */
static int
send_req(const char *method, const char *target, const char *more, tgh_resp *r)
{
    char *req = tgh_strf("%s %s HTTP/1.1\r\nHost: t\r\nX-API-Key: " KEY "\r\n%s"
                         "Connection: close\r\n\r\n", method, target, more ? more : "");
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    int rc;

    TGH_CHECK(c != NULL, "connect");
    rc = tgh_conn_roundtrip(c, req, strlen(req), r,
                            strcmp(method, "HEAD") == 0 ? TGH_HEAD_REQ : 0, 10000);
    TGH_CHECK(rc == 0, "%s %s: %s", method, target, r->reason);
    tgh_conn_close(c);
    free(req);
    return r->status;
}

/* The bucket a response says it was charged to: the name in
 * RateLimit-Policy ("leads_get" from "\"leads_get\";q=50;w=3000"). */
static const char *
policy_of(const tgh_resp *r)
{
    static char name[64];
    const char *v = tgh_resp_header(r, "RateLimit-Policy");
    const char *q;

    if (v == NULL || v[0] != '"' || (q = strchr(v + 1, '"')) == NULL
        || (size_t)(q - v - 1) >= sizeof name)
        return "(none)";
    memcpy(name, v + 1, (size_t)(q - v - 1));
    name[q - v - 1] = '\0';
    return name;
}

/* ---- request targets ----------------------------------------------------- */

static const struct {
    const char *method, *target;
    const char *policy;          /* the bucket it must be charged to */
    const char *forwarded;       /* the target tg-testup must receive */
} charged[] = {
    { "GET", "/leads", "leads_get", "/leads" },
    { "GET", "/%6ceads", "leads_get", "/leads" },
    { "GET", "/%6Ceads", "leads_get", "/leads" },
    { "GET", "/l%65%61ds/7", "leads_get", "/leads/7" },
    { "GET", "/./leads", "leads_get", "/leads" },
    { "GET", "/x/../leads", "leads_get", "/leads" },
    { "GET", "/%2e/leads", "leads_get", "/leads" },
    { "GET", "/x/%2E%2e/leads/", "leads_get", "/leads/" },
    { "GET", "/leads/7/..", "leads_get", "/leads/" },
    { "GET", "/%6ceads?a=%2f&b=../x", "leads_get", "/leads?a=%2f&b=../x" },
    { "POST", "/leads/export", "exp", "/leads/export" },
    { "POST", "/leads/%65xport", "exp", "/leads/export" },
    { "POST", "/leads/%65%78%70%6f%72%74/", "exp", "/leads/export/" },
    { "POST", "/leads/./export", "exp", "/leads/export" },
    { "POST", "/leads/x/../export", "exp", "/leads/export" },
    { "POST", "/%6ceads/export?x=1", "exp", "/leads/export?x=1" },
    { "POST", "http://t/leads/%65xport/./", "exp", "/leads/export/" },
    { "GET", "http://t/x/../y", "enterprise", "/y" },
    { "OPTIONS", "*", "enterprise", "*" },
    { "POST", "/leads", "leads_post", "/leads" },
    { "POST", "/leads/%41", "leads_post", "/leads/A" },
    { "GET", "/leadsx", "enterprise", "/leadsx" },
    { "GET", "/a%3Ab%20c%c3%a9", "enterprise", "/a%3Ab%20c%C3%A9" },
};

static const char *const refused[] = {
    "/leads/export#x",
    "/leads#",
    "/%6ceads?a=1#frag",
    "/leads%2Fexport",
    "/leads%2fexport",
    "/leads%00",
    "/le%zzads",
    "/leads%",
    "/leads%6",
    "/leads//export",
    "//leads",
    "/leads|x",
    "/leads\\export",
    "/leads{x}",
    "/leads^",
    "/leads\"x",
};

Test(edge, encoded_targets_are_charged_to_their_route)
{
    size_t i;

    start(0, 1, NULL);
    for (i = 0; i < sizeof charged / sizeof charged[0]; i++) {
        tgh_resp r;
        const char *t;

        send_req(charged[i].method, charged[i].target, NULL, &r);
        TGH_CHECK(r.status == 200, "%s %s: status %d", charged[i].method,
                  charged[i].target, r.status);
        TGH_CHECK(strcmp(policy_of(&r), charged[i].policy) == 0,
                  "%s %s charged to \"%s\", expected \"%s\"", charged[i].method,
                  charged[i].target, policy_of(&r), charged[i].policy);
        t = tgh_resp_header(&r, "X-Echo-Target");
        TGH_CHECK(t != NULL && strcmp(t, charged[i].forwarded) == 0,
                  "%s %s forwarded as \"%s\", expected \"%s\"", charged[i].method,
                  charged[i].target, t ? t : "(none)", charged[i].forwarded);
        t = tgh_resp_header(&r, "X-Echo-Method");
        TGH_CHECK(t != NULL && strcmp(t, charged[i].method) == 0, "method %s", t);
        tgh_resp_free(&r);
    }
}

/* HEAD is GET without the body (RFC 9110 9.3.2): a GET route charges it. */
Test(edge, head_is_charged_to_the_get_route)
{
    tgh_resp r;

    start(0, 1, NULL);
    send_req("HEAD", "/leads", NULL, &r);
    TGH_CHECK(r.status == 200, "HEAD /leads: %d", r.status);
    TGH_CHECK(strcmp(policy_of(&r), "leads_get") == 0, "HEAD /leads charged to \"%s\"",
              policy_of(&r));
    TGH_CHECK(r.body_len == 0, "HEAD response with a body");
    tgh_resp_free(&r);
    send_req("HEAD", "/%6ceads/7", NULL, &r);
    TGH_CHECK(r.status == 200 && strcmp(policy_of(&r), "leads_get") == 0,
              "HEAD /%%6ceads/7: %d, charged to \"%s\"", r.status, policy_of(&r));
    tgh_resp_free(&r);
}

Test(edge, unsafe_targets_are_refused_not_forwarded)
{
    tgh_stats s0, s1;
    size_t i;

    start(0, 1, NULL);
    TGH_CHECK(tgh_testup_stats(up.port, &s0) == 0, "stats");
    for (i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        const char *methods[] = { "GET", "POST" };
        for (int m = 0; m < 2; m++) {
            tgh_resp r;
            send_req(methods[m], refused[i], NULL, &r);
            TGH_CHECK(r.status == 400, "%s %s: status %d, expected 400", methods[m],
                      refused[i], r.status);
            TGH_CHECK(strstr((char *)r.body, "bad_request") != NULL, "body %s",
                      (char *)r.body);
            tgh_resp_free(&r);
        }
    }
    TGH_CHECK(tgh_testup_stats(up.port, &s1) == 0, "stats");
    TGH_CHECK(s1.requests == s0.requests, "%ld refused requests reached the upstream",
              s1.requests - s0.requests);
}

/* The reported bypass, against the sample app itself: uvicorn decodes
 * "/%6ceads" to "/leads", so tollgate must charge it to /leads; and what
 * the app receives is the normal form. */
Test(edge, fastapi_agrees_on_the_resource)
{
    tgh_resp r;
    const char *t;
    int i, ok = 0, limited = 0;

    start(1, 1, NULL);
    for (i = 0; i < 60; i++) {
        int st = send_req("GET", i % 2 ? "/%6ceads?limit=1" : "/le%61ds/../leads?limit=1",
                          NULL, &r);
        TGH_CHECK(st == 200 || st == 429, "GET leads: %d", st);
        ok += st == 200;
        limited += st == 429;
        if (st == 200)
            TGH_CHECK(strcmp(policy_of(&r), "leads_get") == 0, "charged to %s",
                      policy_of(&r));
        tgh_resp_free(&r);
    }
    /* the route's burst is 50, refilled at 1/min: exactly 50 pass */
    TGH_CHECK(ok == 50 && limited == 10, "%d allowed, %d limited; expected 50 and 10",
              ok, limited);

    send_req("GET", "/%68eaders?x=%2F", NULL, &r);
    TGH_CHECK(r.status == 200, "GET /%%68eaders: %d", r.status);
    t = tgh_resp_header(&r, "X-Echo-Target");
    TGH_CHECK(t != NULL && strcmp(t, "/headers?x=%2F") == 0,
              "uvicorn received \"%s\", expected \"/headers?x=%%2F\"", t ? t : "(none)");
    tgh_resp_free(&r);

    send_req("GET", "/leads%2F7", NULL, &r);
    TGH_CHECK(r.status == 400, "GET /leads%%2F7: %d", r.status);
    tgh_resp_free(&r);
}

/* ---- identity and forwarding headers -------------------------------------- */

static const char *spoofed =
    "X-Consumer-ID: spoofed-id\r\n"
    "X-Consumer-Tier: spoofed-tier\r\n"
    "x-consumer-extra: spoofed-extra\r\n"
    "X-Real-IP: 6.6.6.6\r\n"
    "Forwarded: for=6.6.6.6;proto=https;host=evil\r\n"
    "X-Forwarded-For: 6.6.6.6\r\n"
    "X-Forwarded-Host: evil.example\r\n"
    "X-Forwarded-Port: 6666\r\n"
    "X-Forwarded-Proto: https\r\n"
    "X-Forwarded-Prefix: /evil\r\n";

/* Value of "name: value" in tg-testup's /headers body; NULL if absent,
 * and *count the number of such lines.  Static buffer. */
static const char *
seen(const tgh_resp *r, const char *name, int *count)
{
    static char val[256];
    const char *p = (const char *)r->body;
    size_t nl = strlen(name);
    const char *found = NULL;

    *count = 0;
    while (p != NULL && *p != '\0') {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        if (len > nl + 1 && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            size_t vl = len - nl - 2;
            (*count)++;
            if (found == NULL && vl < sizeof val) {
                memcpy(val, p + nl + 2, vl);
                val[vl] = '\0';
                found = val;
            }
        }
        p = eol ? eol + 1 : NULL;
    }
    return found;
}

static void
check_no_spoof(const tgh_resp *r, const char *xff)
{
    const char *b = (const char *)r->body, *v;
    int n;

    TGH_CHECK(strstr(b, "spoofed") == NULL && strstr(b, "evil") == NULL
              && strcasestr(b, "x-real-ip") == NULL && strcasestr(b, "forwarded:") == NULL
              && strcasestr(b, "x-forwarded-port") == NULL,
              "a client-sent identity header reached the upstream:\n%s", b);
    v = seen(r, "X-Forwarded-For", &n);
    TGH_CHECK(v != NULL && n == 1 && strcmp(v, xff) == 0,
              "X-Forwarded-For \"%s\" (x%d), expected \"%s\"", v ? v : "(none)", n, xff);
    v = seen(r, "X-Forwarded-Proto", &n);
    TGH_CHECK(v != NULL && n == 1 && strcmp(v, "http") == 0,
              "X-Forwarded-Proto \"%s\" (x%d)", v ? v : "(none)", n);
}

Test(edge, spoofed_identity_headers_never_reach_the_app)
{
    tgh_resp r;
    int n;

    /* the limiter off (no keys): nothing is said about the consumer */
    start(0, 0, NULL);
    send_req("GET", "/headers", spoofed, &r);
    TGH_CHECK(r.status == 200, "GET /headers: %d", r.status);
    check_no_spoof(&r, "127.0.0.1");
    TGH_CHECK(seen(&r, "X-Consumer-ID", &n) == NULL, "X-Consumer-ID without a limiter");
    tgh_resp_free(&r);
}

Test(edge, consumer_headers_and_authorization_with_keys)
{
    tgh_resp r;
    const char *v;
    int n;

    start(0, 1, NULL);
    send_req("GET", "/headers", spoofed, &r);
    TGH_CHECK(r.status == 200, "GET /headers: %d", r.status);
    check_no_spoof(&r, "127.0.0.1");
    v = seen(&r, "X-Consumer-ID", &n);
    TGH_CHECK(v != NULL && n == 1 && strcmp(v, "edge") == 0, "X-Consumer-ID %s (x%d)",
              v ? v : "(none)", n);
    v = seen(&r, "X-Consumer-Tier", &n);
    TGH_CHECK(v != NULL && n == 1 && strcmp(v, "enterprise") == 0, "X-Consumer-Tier %s",
              v ? v : "(none)");
    TGH_CHECK(seen(&r, "X-API-Key", &n) == NULL, "the key reached the upstream");
    tgh_resp_free(&r);

    /* the key came in X-API-Key: the app's own Authorization passes */
    send_req("GET", "/headers", "Authorization: Basic YXBwOnB3\r\n", &r);
    TGH_CHECK(r.status == 200, "GET /headers: %d", r.status);
    v = seen(&r, "Authorization", &n);
    TGH_CHECK(v != NULL && strcmp(v, "Basic YXBwOnB3") == 0,
              "the app's Authorization was stripped: %s", (char *)r.body);
    tgh_resp_free(&r);
}

Test(edge, bearer_key_is_stripped)
{
    tgh_resp r;
    tgh_conn *c;
    const char *req = "GET /headers HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " KEY
                      "\r\nConnection: close\r\n\r\n";
    int n;

    start(0, 1, NULL);
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    TGH_CHECK(tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 10000) == 0, "%s", r.reason);
    TGH_CHECK(r.status == 200, "bearer: %d", r.status);
    TGH_CHECK(seen(&r, "Authorization", &n) == NULL && strstr((char *)r.body, KEY) == NULL,
              "the bearer key reached the upstream:\n%s", (char *)r.body);
    tgh_resp_free(&r);
    tgh_conn_close(c);
}

Test(edge, trusted_proxy_appends_to_x_forwarded_for)
{
    tgh_resp r;

    start(0, 0, "trusted_proxies: [\"::1\", 127.0.0.0/8]");
    send_req("GET", "/headers", spoofed, &r);
    TGH_CHECK(r.status == 200, "GET /headers: %d", r.status);
    TGH_CHECK(strstr((char *)r.body, "X-Forwarded-For: 6.6.6.6, 127.0.0.1\n") != NULL,
              "trusted peer: X-Forwarded-For not appended to:\n%s", (char *)r.body);
    /* the rest of the spoofed set is still dropped */
    TGH_CHECK(strstr((char *)r.body, "spoofed") == NULL && strstr((char *)r.body, "evil") == NULL
              && strcasestr((char *)r.body, "x-real-ip") == NULL,
              "identity header from a trusted proxy:\n%s", (char *)r.body);
    tgh_resp_free(&r);
}

Test(edge, untrusted_proxy_x_forwarded_for_is_replaced)
{
    tgh_resp r;
    int n;
    const char *v;

    start(0, 0, "trusted_proxies: [10.0.0.0/8]");
    send_req("GET", "/headers", "X-Forwarded-For: 10.1.1.1\r\nX-Forwarded-For: 6.6.6.6\r\n", &r);
    TGH_CHECK(r.status == 200, "GET /headers: %d", r.status);
    v = seen(&r, "X-Forwarded-For", &n);
    TGH_CHECK(v != NULL && n == 1 && strcmp(v, "127.0.0.1") == 0,
              "X-Forwarded-For \"%s\" (x%d), expected the peer alone", v ? v : "(none)", n);
    tgh_resp_free(&r);
}

Test(edge, fastapi_sees_no_spoofed_headers)
{
    tgh_resp r;
    const char *b;

    start(1, 0, NULL);
    send_req("GET", "/headers", spoofed, &r);
    TGH_CHECK(r.status == 200, "GET /headers: %d", r.status);
    b = (const char *)r.body;
    TGH_CHECK(strstr(b, "spoofed") == NULL && strstr(b, "6.6.6.6") == NULL
              && strstr(b, "evil") == NULL && strstr(b, "\"x-real-ip\"") == NULL
              && strstr(b, "\"forwarded\"") == NULL
              && strstr(b, "\"x-forwarded-for\":\"127.0.0.1\"") != NULL
              && strstr(b, "\"x-forwarded-proto\":\"http\"") != NULL,
              "the app saw: %s", b);
    tgh_resp_free(&r);
}

/* ---- the forwarded head ---------------------------------------------------- */

/* A 19-digit Content-Length (max_body_bytes 2^62) is forwarded exactly:
 * the upstream here is a bare socket that reads the head. */
Test(edge, content_length_19_digits_forwarded_exactly)
{
    struct sockaddr_in sa = { .sin_family = AF_INET };
    socklen_t sl = sizeof sa;
    char head[8192];
    size_t got = 0;
    uint64_t end;
    tgh_tg_opts o;
    tgh_conn *c;
    int lfd, ufd = -1;
    const char *req = "POST /echo?x=1 HTTP/1.1\r\nHost: t\r\n"
                      "Content-Length: 1000000000000000000\r\n\r\nsome body bytes";

    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    TGH_CHECK(lfd >= 0 && bind(lfd, (struct sockaddr *)&sa, sizeof sa) == 0
              && listen(lfd, 8) == 0
              && getsockname(lfd, (struct sockaddr *)&sa, &sl) == 0, "listener");
    tgh_tg_opts_default(&o, ntohs(sa.sin_port));
    o.max_body_bytes = 4611686018427387904L;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate did not start");
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    TGH_CHECK(tgh_conn_sendstr(c, req) == 0, "send");

    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && (got < 4 || memmem(head, got, "\r\n\r\n", 4) == NULL)) {
        struct pollfd pfd = { .fd = ufd >= 0 ? ufd : lfd, .events = POLLIN };
        if (poll(&pfd, 1, 200) <= 0)
            continue;
        if (ufd < 0) {
            ufd = accept(lfd, NULL, NULL);
            continue;
        }
        ssize_t n = read(ufd, head + got, sizeof head - 1 - got);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    head[got] = '\0';
    TGH_CHECK(memmem(head, got, "\r\n\r\n", 4) != NULL, "no request head upstream: %s", head);
    TGH_CHECK(strncmp(head, "POST /echo?x=1 HTTP/1.1\r\n", 25) == 0, "request line: %s", head);
    TGH_CHECK(strstr(head, "\r\nContent-Length: 1000000000000000000\r\n") != NULL,
              "forwarded Content-Length is not exact:\n%s", head);
    for (size_t i = 0; i < (size_t)(strstr(head, "\r\n\r\n") - head); i++)
        TGH_CHECK(head[i] == '\r' || head[i] == '\n' || (head[i] >= 0x20 && head[i] < 0x7f),
                  "byte 0x%02x at %zu of the forwarded head", (unsigned char)head[i], i);
    close(ufd);
    close(lfd);
    tgh_conn_close(c);
}
