/*
 * test_headers.c - the heads tollgate writes (headers.c), byte for byte:
 * each action of the header table on the way up (hop-by-hop and
 * Connection-listed headers dropped, X-Forwarded-* / Forwarded /
 * X-Real-IP / X-Consumer-* / X-Request-ID replaced, X-Forwarded-For kept
 * only from a trusted proxy, the key's header stripped, the framing
 * re-derived) and on the way down (hop-by-hop dropped, X-Request-ID
 * replaced, Content-Length kept for HEAD and 304, re-chunking, the
 * Connection header).
 */
#include <criterion/criterion.h>

#include <event2/event.h>
#include <stdio.h>
#include <string.h>

#include "tollgate/cidr.h"
#include "tollgate/conf.h"
#include "tollgate/headers.h"
#include "tollgate/http.h"
#include "tollgate/keys.h"
#include "tollgate/limiter.h"

static const tg_http_limits lim = { 8192, 65536, TG_HTTP_MAX_HEADERS };
static tg_http_hdr hdrs[TG_HTTP_MAX_HEADERS];

static tg_http_req
parse_req(const char *s)
{
    tg_http_req r;

    memset(&r, 0, sizeof(r));
    r.hdr = hdrs;
    cr_assert_eq(tg_http_parse_request(s, strlen(s), &lim, &r), TG_OK, "%s", s);
    return r;
}

static tg_http_resp rs;

static const tg_http_resp *
parse_resp(const char *s, int is_head)
{
    memset(&rs, 0, sizeof(rs));
    cr_assert_eq(tg_http_parse_response(s, strlen(s), &lim, is_head, &rs), TG_OK, "%s", s);
    return &rs;
}

/* The request head for r with facts f, as a C string (static). */
static const char *
up(const char *req, const tg_headers_up *f)
{
    static char out[8192];
    tg_http_req r = parse_req(req);
    tg_hbuf hb;

    tg_hbuf_init(&hb);
    tg_headers_request(&hb, &r, f);
    cr_assert_lt(hb.len, sizeof(out));
    memcpy(out, hb.p, hb.len);
    out[hb.len] = '\0';
    tg_hbuf_free(&hb);
    return out;
}

static const char *
down(const tg_http_resp *r, const tg_headers_down *f, unsigned *flags)
{
    static char out[8192];
    tg_hbuf hb;

    tg_hbuf_init(&hb);
    *flags = tg_headers_response(&hb, r, f);
    cr_assert_lt(hb.len, sizeof(out));
    memcpy(out, hb.p, hb.len);
    out[hb.len] = '\0';
    tg_hbuf_free(&hb);
    return out;
}

static tg_headers_up
facts(void)
{
    tg_headers_up f = {
        .ip = "192.0.2.7", .tls = 0, .reqid = "rid-1", .reqid_len = 5,
        .consumer = "", .tier = "",
    };
    return f;
}

/* ---- request head ------------------------------------------------------ */

Test(headers, request_passes_end_to_end_and_drops_hop_by_hop)
{
    tg_headers_up f = facts();

    cr_expect_str_eq(up("GET /a?b=1 HTTP/1.1\r\n"
                        "Host: example.com\r\n"
                        "Accept: */*\r\n"
                        "Connection: keep-alive, X-Secret\r\n"
                        "Keep-Alive: timeout=5\r\n"
                        "X-Secret: 1\r\n"
                        "Proxy-Connection: keep-alive\r\n"
                        "TE: trailers\r\n"
                        "Trailer: X-T\r\n"
                        "Upgrade: websocket\r\n"
                        "Proxy-Authorization: Basic eA==\r\n"
                        "User-Agent: t/1\r\n"
                        "\r\n", &f),
                     "GET /a?b=1 HTTP/1.1\r\n"
                     "Host: example.com\r\n"
                     "Accept: */*\r\n"
                     "User-Agent: t/1\r\n"
                     "X-Forwarded-For: 192.0.2.7\r\n"
                     "X-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\n"
                     "\r\n");
}

Test(headers, request_replaces_edge_owned)
{
    tg_headers_up f = facts();

    f.tls = 1;
    f.consumer = "acme";
    f.tier = "gold";
    cr_expect_str_eq(up("GET / HTTP/1.1\r\n"
                        "Host: h\r\n"
                        "X-Forwarded-For: 10.0.0.1\r\n"
                        "X-Forwarded-Proto: http\r\n"
                        "X-Forwarded-Host: evil\r\n"
                        "Forwarded: for=10.0.0.1\r\n"
                        "X-Real-IP: 10.0.0.1\r\n"
                        "X-Consumer-ID: root\r\n"
                        "X-Consumer-Tier: unlimited\r\n"
                        "X-Request-ID: theirs\r\n"
                        "X-Forwarded-: kept\r\n"
                        "X-Consumer-: kept\r\n"
                        "\r\n", &f),
                     "GET / HTTP/1.1\r\n"
                     "Host: h\r\n"
                     "X-Forwarded-: kept\r\n"
                     "X-Consumer-: kept\r\n"
                     "X-Forwarded-For: 192.0.2.7\r\n"
                     "X-Forwarded-Proto: https\r\n"
                     "X-Request-ID: rid-1\r\n"
                     "X-Consumer-ID: acme\r\n"
                     "X-Consumer-Tier: gold\r\n"
                     "\r\n");
}

Test(headers, request_x_forwarded_for_from_trusted_proxy)
{
    tg_headers_up f = facts();
    tg_cidr trusted[1];
    const char *err = NULL;
    const char *req = "GET / HTTP/1.1\r\n"
                      "Host: h\r\n"
                      "X-Forwarded-For: 203.0.113.1\r\n"
                      "X-Forwarded-For: 203.0.113.2, 203.0.113.3\r\n"
                      "\r\n";

    cr_assert_eq(tg_cidr_parse("192.0.2.0/24", &trusted[0], &err), TG_OK);
    f.trusted = trusted;
    f.ntrusted = 1;
    cr_expect_str_eq(up(req, &f),
                     "GET / HTTP/1.1\r\n"
                     "Host: h\r\n"
                     "X-Forwarded-For: 203.0.113.1, 203.0.113.2, 203.0.113.3, 192.0.2.7\r\n"
                     "X-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\n"
                     "\r\n");
    f.ip = "198.51.100.9";                /* not trusted: the peer alone */
    cr_expect_str_eq(up(req, &f),
                     "GET / HTTP/1.1\r\n"
                     "Host: h\r\n"
                     "X-Forwarded-For: 198.51.100.9\r\n"
                     "X-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\n"
                     "\r\n");
}

Test(headers, request_framing)
{
    tg_headers_up f = facts();

    cr_expect_str_eq(up("POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                        "Expect: 100-continue\r\n\r\n", &f),
                     "POST /p HTTP/1.1\r\nHost: h\r\n"
                     "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\nContent-Length: 5\r\n\r\n");
    cr_expect_str_eq(up("POST /p HTTP/1.1\r\nHost: h\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n", &f),
                     "POST /p HTTP/1.1\r\nHost: h\r\n"
                     "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\nTransfer-Encoding: chunked\r\n\r\n");
    /* an empty POST stays framed */
    cr_expect_str_eq(up("POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n", &f),
                     "POST /p HTTP/1.1\r\nHost: h\r\n"
                     "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\nContent-Length: 0\r\n\r\n");
    /* HTTP/1.0 without Host: an empty Host line, HTTP/1.1 upstream */
    cr_expect_str_eq(up("GET /x HTTP/1.0\r\n\r\n", &f),
                     "GET /x HTTP/1.1\r\nHost: \r\n"
                     "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\n\r\n");
}

/* The key's header is stripped (tg_limiter_strip_header): the key header,
 * or Authorization: Bearer only when it carried the key. */
static struct event_base *base;

static struct tg_limiter *
limiter(void)
{
    static const char conf_yaml[] =
        "listen:\n  - address: 127.0.0.1:8080\n"
        "upstream:\n  servers: [127.0.0.1:8000]\n"
        "store: local\n"
        "rate_limits:\n  basic: { requests_per_minute: 60, burst_limit: 10 }\n"
        "auth: {}\n";
    static const char keys_yaml[] =
        "keys:\n  - { id: acme, tier: basic, sha256: "
        "\"0b131655124822cb1cf254042086d2bf26a4f1c6cd82727aab583e915346aca3\" }\n";
    char err[TG_CONF_ERRLEN];
    tg_conf *c = tg_conf_load_string("t.yaml", conf_yaml, strlen(conf_yaml),
                                     err, sizeof(err));
    struct tg_keys *k;
    struct tg_limiter *l;

    cr_assert_not_null(c, "%s", err);
    k = tg_keys_load_string("k.yaml", keys_yaml, strlen(keys_yaml), err, sizeof(err));
    cr_assert_not_null(k, "%s", err);
    base = event_base_new();
    l = tg_limiter_create(base, c, k, err, sizeof(err));
    cr_assert_not_null(l, "%s", err);
    tg_keys_unref(k);
    tg_conf_unref(c);
    return l;
}

static int
strip(const void *l, const tg_http_req *r, const tg_http_hdr *h)
{
    return tg_limiter_strip_header(l, r, h);
}

Test(headers, request_strips_the_key)
{
    struct tg_limiter *l = limiter();
    tg_headers_up f = facts();

    f.strip = strip;
    f.strip_arg = l;
    f.consumer = "acme";
    f.tier = "basic";
    cr_expect_str_eq(up("GET / HTTP/1.1\r\nHost: h\r\nX-API-Key: k-acme\r\n"
                        "Authorization: Bearer other\r\n\r\n", &f),
                     "GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer other\r\n"
                     "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\nX-Consumer-ID: acme\r\n"
                     "X-Consumer-Tier: basic\r\n\r\n");
    cr_expect_str_eq(up("GET / HTTP/1.1\r\nHost: h\r\n"
                        "Authorization: Bearer k-acme\r\n\r\n", &f),
                     "GET / HTTP/1.1\r\nHost: h\r\n"
                     "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\nX-Consumer-ID: acme\r\n"
                     "X-Consumer-Tier: basic\r\n\r\n");
    cr_expect_str_eq(up("GET / HTTP/1.1\r\nHost: h\r\n"
                        "Authorization: Basic YTpi\r\n\r\n", &f),
                     "GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Basic YTpi\r\n"
                     "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
                     "X-Request-ID: rid-1\r\nX-Consumer-ID: acme\r\n"
                     "X-Consumer-Tier: basic\r\n\r\n");
    tg_limiter_destroy(l);
    event_base_free(base);
}

Test(headers, request_head_larger_than_the_stack_buffer)
{
    tg_headers_up f = facts();
    static char req[16384], want[16384];
    char big[6001];

    memset(big, 'v', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    snprintf(req, sizeof(req), "GET / HTTP/1.1\r\nHost: h\r\nX-Big: %s\r\n\r\n", big);
    snprintf(want, sizeof(want), "GET / HTTP/1.1\r\nHost: h\r\nX-Big: %s\r\n"
             "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
             "X-Request-ID: rid-1\r\n\r\n", big);
    cr_expect_str_eq(up(req, &f), want);
}

/* ---- response head ----------------------------------------------------- */

static tg_headers_down
dfacts(void)
{
    tg_headers_down f = { .is_head = 0, .minor = 1, .rq_done = 1, .close_after = 0,
                          .reqid = "rid-1", .reqid_len = 5 };
    return f;
}

Test(headers, response_passes_and_drops)
{
    tg_headers_down f = dfacts();
    unsigned fl;

    f.extra = "RateLimit: limit=10, remaining=9, reset=6\r\n";
    f.extra_len = strlen(f.extra);
    cr_expect_str_eq(down(parse_resp("HTTP/1.1 200 OK\r\n"
                                     "Server: app\r\n"
                                     "Date: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
                                     "Connection: keep-alive, X-Hop\r\n"
                                     "Keep-Alive: timeout=5\r\n"
                                     "X-Hop: 1\r\n"
                                     "X-Request-ID: theirs\r\n"
                                     "Content-Length: 2\r\n"
                                     "Set-Cookie: a=b\r\n"
                                     "\r\nok", 0), &f, &fl),
                     "HTTP/1.1 200 OK\r\n"
                     "Server: app\r\n"
                     "Date: Tue, 01 Dec 2026 10:00:00 GMT\r\n"
                     "Set-Cookie: a=b\r\n"
                     "X-Request-ID: rid-1\r\n"
                     "RateLimit: limit=10, remaining=9, reset=6\r\n"
                     "Content-Length: 2\r\n"
                     "\r\n");
    cr_expect_eq(fl, 0u);
}

Test(headers, response_content_length_of_head_and_304)
{
    tg_headers_down f = dfacts();
    unsigned fl;

    f.is_head = 1;
    cr_expect_str_eq(down(parse_resp("HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n", 1),
                          &f, &fl),
                     "HTTP/1.1 200 OK\r\nContent-Length: 42\r\nX-Request-ID: rid-1\r\n\r\n");
    f.is_head = 0;
    cr_expect_str_eq(down(parse_resp("HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\n"
                                     "ETag: \"x\"\r\n\r\n", 0), &f, &fl),
                     "HTTP/1.1 304 Not Modified\r\nContent-Length: 42\r\nETag: \"x\"\r\n"
                     "X-Request-ID: rid-1\r\n\r\n");
    cr_expect_str_eq(down(parse_resp("HTTP/1.1 204 No Content\r\n\r\n", 0), &f, &fl),
                     "HTTP/1.1 204 No Content\r\nX-Request-ID: rid-1\r\n\r\n");
    /* a bodyless 200 says so */
    cr_expect_str_eq(down(parse_resp("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0),
                          &f, &fl),
                     "HTTP/1.1 200 OK\r\nX-Request-ID: rid-1\r\nContent-Length: 0\r\n\r\n");
    cr_expect_eq(fl, 0u);
}

Test(headers, response_rechunked_or_closed)
{
    tg_headers_down f = dfacts();
    unsigned fl;

    cr_expect_str_eq(down(parse_resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                     0), &f, &fl),
                     "HTTP/1.1 200 OK\r\nX-Request-ID: rid-1\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n");
    cr_expect_eq(fl, TG_HEADERS_CHUNKED);
    /* a body that ends at close, to an HTTP/1.1 client: re-chunked */
    cr_expect_str_eq(down(parse_resp("HTTP/1.0 200 OK\r\n\r\n", 0), &f, &fl),
                     "HTTP/1.1 200 OK\r\nX-Request-ID: rid-1\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n");
    cr_expect_eq(fl, TG_HEADERS_CHUNKED);
    /* ... to an HTTP/1.0 client: the body ends at close */
    f.minor = 0;
    cr_expect_str_eq(down(parse_resp("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                                     0), &f, &fl),
                     "HTTP/1.1 200 OK\r\nX-Request-ID: rid-1\r\nConnection: close\r\n\r\n");
    cr_expect_eq(fl, TG_HEADERS_CLOSE);
}

Test(headers, response_connection_header)
{
    tg_headers_down f = dfacts();
    const tg_http_resp *r = parse_resp("HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\n", 0);
    unsigned fl;

    f.minor = 0;                       /* a kept HTTP/1.0 connection says so */
    cr_expect_str_eq(down(r, &f, &fl),
                     "HTTP/1.1 201 Created\r\nX-Request-ID: rid-1\r\nContent-Length: 3\r\n"
                     "Connection: keep-alive\r\n\r\n");
    cr_expect_eq(fl, 0u);
    f.minor = 1;
    f.close_after = 1;
    cr_expect_str_eq(down(r, &f, &fl),
                     "HTTP/1.1 201 Created\r\nX-Request-ID: rid-1\r\nContent-Length: 3\r\n"
                     "Connection: close\r\n\r\n");
    cr_expect_eq(fl, TG_HEADERS_CLOSE);
    f.close_after = 0;
    f.rq_done = 0;                     /* the rest of the body is not read */
    cr_expect_str_eq(down(r, &f, &fl),
                     "HTTP/1.1 201 Created\r\nX-Request-ID: rid-1\r\nContent-Length: 3\r\n"
                     "Connection: close\r\n\r\n");
    cr_expect_eq(fl, TG_HEADERS_CLOSE);
}
