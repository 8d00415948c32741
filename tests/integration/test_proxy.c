/*
 * test_proxy.c - tollgate as a reverse proxy, end to end.
 *
 * Each test starts its own tollgate and upstream(s) on ephemeral loopback
 * ports and talks to them over real sockets with the harness's raw
 * client.  Bodies are compared byte for byte; timings are measured with the
 * monotonic clock and bounded.
 */
#include <criterion/criterion.h>

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>

#include "harness.h"

TestSuite(proxy, .fini = tgh_cleanup, .timeout = 180);

static tgh_upstream up;
static tgh_tollgate tg;

/* Start tg-testup and tollgate; tweak may change the config first. */
static void start_testup(void (*tweak)(tgh_tg_opts *))
{
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup did not start");
    tgh_tg_opts o;
    tgh_tg_opts_default(&o, up.port);
    if (tweak != NULL)
        tweak(&o);
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate did not start");
}

static void start_fastapi(void)
{
    TGH_CHECK(tgh_fastapi_start(&up) == 0, "uvicorn did not start");
    tgh_tg_opts o;
    tgh_tg_opts_default(&o, up.port);
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate did not start");
}

/* Value of "name: value" in tg-testup's /headers body (case-insensitive
 * name), malloc'ed, or NULL.  *count gets the number of such lines. */
static char *line_header(const char *body, const char *name, int *count)
{
    char *found = NULL;
    int n = 0;
    size_t nl = strlen(name);
    const char *p = body;
    while (p != NULL && *p) {
        const char *e = strchr(p, '\n');
        size_t ll = e ? (size_t)(e - p) : strlen(p);
        if (ll > nl + 1 && strncasecmp(p, name, nl) == 0 && p[nl] == ':') {
            n++;
            if (found == NULL) {
                const char *v = p + nl + 1;
                while (*v == ' ')
                    v++;
                found = strndup(v, ll - (size_t)(v - p));
            }
        }
        p = e ? e + 1 : NULL;
    }
    if (count != NULL)
        *count = n;
    return found;
}

/* Check the JSON error contract: Content-Type, the three fields, and that
 * request_id equals the X-Request-ID response header. */
static void check_error_json(const tgh_resp *r, int status)
{
    TGH_CHECK(r->status == status, "expected %d, got %d (body '%.200s')",
              status, r->status, (const char *)r->body);
    const char *ct = tgh_resp_header(r, "Content-Type");
    TGH_CHECK(ct != NULL && strncmp(ct, "application/json", 16) == 0,
              "%d: Content-Type '%s', expected application/json", status,
              ct ? ct : "(none)");
    const char *b = (const char *)r->body;
    TGH_CHECK(b != NULL && b[0] == '{'
              && strstr(b, "\"error\":\"") != NULL
              && strstr(b, "\"message\":\"") != NULL
              && strstr(b, "\"request_id\":\"") != NULL,
              "%d: body is not the JSON error shape: '%.200s'", status, b);
    const char *rid = tgh_resp_header(r, "X-Request-ID");
    TGH_CHECK(rid != NULL, "%d: no X-Request-ID on the error response",
              status);
    char *want = tgh_strf("\"request_id\":\"%s\"", rid);
    TGH_CHECK(strstr(b, want) != NULL, "%d: body request_id differs from "
              "X-Request-ID '%s': '%.200s'", status, rid, b);
    free(want);
}

/* 0 last: an empty-body bug should not hide the other sizes */
static const size_t sizes[] = { 1, 64 * 1024, 1024 * 1024, 8 * 1024 * 1024,
                                0 };
#define SIZE_TIMEOUT(n) ((n) < 1024 * 1024 ? 10000 : 60000)
#define NSIZES (sizeof sizes / sizeof sizes[0])

/* POST body (Content-Length) to path on a fresh connection; assert the
 * echo is byte-exact. */
static void echo_cl(const char *path, const unsigned char *body, size_t n)
{
    tgh_resp r;
    int rc = tgh_http(tg.port, "POST", path,
                      "Content-Type: application/octet-stream\r\n",
                      body, n, &r, SIZE_TIMEOUT(n));
    TGH_CHECK(rc == 0, "POST %s %zu bytes: %s", path, n, r.reason);
    TGH_CHECK(r.status == 200, "POST %s %zu bytes: status %d", path, n,
              r.status);
    TGH_CHECK(r.body_len == n, "POST %s: sent %zu bytes, echo has %zu",
              path, n, r.body_len);
    long d = tgh_first_diff(body, r.body, n);
    TGH_CHECK(d < 0, "POST %s %zu bytes: echo differs at byte %ld", path, n,
              d);
    const char *el = tgh_resp_header(&r, "X-Echo-Length");
    TGH_CHECK(el != NULL && strtoul(el, NULL, 10) == n,
              "POST %s: upstream saw %s bytes, sent %zu", path,
              el ? el : "(none)", n);
    tgh_resp_free(&r);
}

/* POST body chunk-encoded over keep-alive connection c; byte-exact echo. */
static void echo_chunked(tgh_conn *c, const char *path,
                         const unsigned char *body, size_t n, uint32_t seed)
{
    size_t enc_len;
    unsigned char *enc = tgh_chunk_encode(body, n, &enc_len, seed);
    char *head = tgh_strf("POST %s HTTP/1.1\r\nHost: test\r\n"
                          "Content-Type: application/octet-stream\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n", path);
    size_t hl = strlen(head);
    unsigned char *req = malloc(hl + enc_len);
    memcpy(req, head, hl);
    memcpy(req + hl, enc, enc_len);
    tgh_resp r;
    int rc = tgh_conn_roundtrip(c, req, hl + enc_len, &r, 0,
                                SIZE_TIMEOUT(n));
    TGH_CHECK(rc == 0, "chunked POST %s %zu bytes: %s", path, n, r.reason);
    TGH_CHECK(r.status == 200, "chunked POST %s %zu bytes: status %d", path,
              n, r.status);
    TGH_CHECK(r.body_len == n, "chunked POST %s: sent %zu bytes, echo has "
              "%zu", path, n, r.body_len);
    long d = tgh_first_diff(body, r.body, n);
    TGH_CHECK(d < 0, "chunked POST %s %zu bytes: echo differs at byte %ld",
              path, n, d);
    tgh_resp_free(&r);
    free(req);
    free(head);
    free(enc);
}

/* ------------------------------------------------------------------ */
/* round trips                                                         */

Test(proxy, testup_get_bytes_exact)
{
    start_testup(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect to tollgate");
    for (size_t i = 0; i < NSIZES; i++) {
        size_t n = sizes[i];
        char *req = tgh_strf("GET /bytes?n=%zu HTTP/1.1\r\nHost: t\r\n\r\n",
                             n);
        tgh_resp r;
        int rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0,
                                    SIZE_TIMEOUT(n));
        TGH_CHECK(rc == 0, "GET /bytes?n=%zu: %s", n, r.reason);
        TGH_CHECK(r.status == 200, "GET /bytes?n=%zu: %d", n, r.status);
        TGH_CHECK(r.body_len == n, "GET /bytes?n=%zu: got %zu bytes", n,
                  r.body_len);
        unsigned char *want = malloc(n + 1);
        tgh_fill_testup_pattern(want, n);
        long d = tgh_first_diff(want, r.body, n);
        TGH_CHECK(d < 0, "GET /bytes?n=%zu differs at byte %ld", n, d);
        const char *cl = tgh_resp_header(&r, "Content-Length");
        TGH_CHECK(cl != NULL && strtoul(cl, NULL, 10) == n && !r.chunked,
                  "GET /bytes?n=%zu: upstream gave Content-Length, client "
                  "got CL '%s' chunked=%d", n, cl ? cl : "(none)", r.chunked);
        free(want);
        free(req);
        tgh_resp_free(&r);
    }
    tgh_conn_close(c);
}

Test(proxy, testup_get_chunked_8mib)
{
    start_testup(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect to tollgate");
    /* upstream chunked, 8 MiB in 16 chunks: re-chunked byte-exact */
    size_t n = 8 * 1024 * 1024;
    char *req = tgh_strf("GET /chunked?n=%zu&chunks=16&delay_ms=0 HTTP/1.1\r\n"
                         "Host: t\r\n\r\n", n);
    tgh_resp r;
    int rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 60000);
    free(req);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /chunked 8 MiB: rc %d "
              "status %d (%s)", rc, r.status, r.reason);
    unsigned char *want = malloc(n);
    tgh_fill_testup_pattern(want, n);
    TGH_CHECK(r.chunked && r.body_len == n
              && tgh_first_diff(want, r.body, n) < 0,
              "GET /chunked 8 MiB: chunked=%d, %zu bytes, differs at %ld",
              r.chunked, r.body_len,
              r.body_len == n ? tgh_first_diff(want, r.body, n) : -1L);
    free(want);
    tgh_resp_free(&r);
    tgh_conn_close(c);
}


Test(proxy, testup_post_echo_content_length)
{
    start_testup(NULL);
    for (size_t i = 0; i < NSIZES; i++) {
        unsigned char *body = malloc(sizes[i] + 1);
        tgh_fill_random(body, sizes[i], (uint32_t)(i + 1));
        echo_cl("/echo", body, sizes[i]);
        free(body);
    }
}

Test(proxy, testup_post_echo_chunked_request)
{
    start_testup(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect to tollgate");
    for (size_t i = 0; i < NSIZES; i++) {
        unsigned char *body = malloc(sizes[i] + 1);
        tgh_fill_random(body, sizes[i], (uint32_t)(100 + i));
        echo_chunked(c, "/echo", body, sizes[i], (uint32_t)(7 + i));
        free(body);
    }
    tgh_conn_close(c);
}

Test(proxy, fastapi_post_echo)
{
    start_fastapi();
    for (size_t i = 0; i < NSIZES; i++) {
        unsigned char *body = malloc(sizes[i] + 1);
        tgh_fill_random(body, sizes[i], (uint32_t)(200 + i));
        echo_cl("/echo", body, sizes[i]);
        free(body);
    }
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect to tollgate");
    for (size_t i = 0; i < NSIZES; i++) {
        unsigned char *body = malloc(sizes[i] + 1);
        tgh_fill_random(body, sizes[i], (uint32_t)(300 + i));
        echo_chunked(c, "/echo", body, sizes[i], (uint32_t)(11 + i));
        free(body);
    }
    tgh_conn_close(c);
}

Test(proxy, fastapi_json_leads)
{
    start_fastapi();
    tgh_resp r;
    int rc = tgh_http(tg.port, "GET", "/leads?limit=3", NULL, NULL, 0, &r,
                      10000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /leads: rc %d status %d (%s)",
              rc, r.status, r.reason);
    const char *ct = tgh_resp_header(&r, "Content-Type");
    TGH_CHECK(ct != NULL && strncmp(ct, "application/json", 16) == 0,
              "GET /leads Content-Type '%s'", ct ? ct : "(none)");
    TGH_CHECK(r.body_len > 2 && r.body[0] == '['
              && strstr((char *)r.body, "\"id\":1") != NULL
              && strstr((char *)r.body, "\"id\":3") != NULL
              && strstr((char *)r.body, "\"id\":4") == NULL,
              "GET /leads?limit=3 body: %.300s", (char *)r.body);
    tgh_resp_free(&r);

    const char *lead = "{\"name\":\"Ada Lovelace\",\"email\":\"ADA@Example.org\","
                       "\"company\":\"Analytical\",\"score\":42}";
    rc = tgh_http(tg.port, "POST", "/leads",
                  "Content-Type: application/json\r\n", lead, strlen(lead),
                  &r, 10000);
    TGH_CHECK(rc == 0 && r.status == 201, "POST /leads: rc %d status %d "
              "body %.300s", rc, r.status, (char *)r.body);
    TGH_CHECK(strstr((char *)r.body, "\"name\":\"Ada Lovelace\"") != NULL
              && strstr((char *)r.body, "\"email\":\"ada@example.org\"")
              && strstr((char *)r.body, "\"score\":42"),
              "POST /leads body: %.300s", (char *)r.body);
    tgh_resp_free(&r);

    /* validation error from the app passes through untouched */
    const char *bad = "{\"name\":\"\",\"email\":\"nope\"}";
    rc = tgh_http(tg.port, "POST", "/leads",
                  "Content-Type: application/json\r\n", bad, strlen(bad),
                  &r, 10000);
    TGH_CHECK(rc == 0 && r.status == 422, "POST /leads invalid: rc %d "
              "status %d", rc, r.status);
    tgh_resp_free(&r);
}

/* ------------------------------------------------------------------ */
/* streaming                                                           */

Test(proxy, testup_chunked_response_streams)
{
    start_testup(NULL);
    tgh_resp r;
    /* 5 chunks 300 ms apart: the upstream needs >= 1200 ms in total */
    int rc = tgh_http(tg.port, "GET", "/chunked?n=5000&chunks=5&delay_ms=300",
                      NULL, NULL, 0, &r, 15000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /chunked: rc %d status %d (%s)",
              rc, r.status, r.reason);
    TGH_CHECK(r.chunked, "HTTP/1.1 client, upstream without Content-Length: "
              "expected chunked framing (TE '%s', CL '%s')",
              tgh_resp_header(&r, "Transfer-Encoding")
              ? tgh_resp_header(&r, "Transfer-Encoding") : "(none)",
              tgh_resp_header(&r, "Content-Length")
              ? tgh_resp_header(&r, "Content-Length") : "(none)");
    unsigned char want[5000];
    tgh_fill_testup_pattern(want, sizeof want);
    TGH_CHECK(r.body_len == 5000 && tgh_first_diff(want, r.body, 5000) < 0,
              "chunked body: %zu bytes, differs at %ld", r.body_len,
              r.body_len == 5000 ? tgh_first_diff(want, r.body, 5000) : -1L);
    cr_log_info("/chunked: first body byte %llu ms, done %llu ms",
                (unsigned long long)r.t_first_body_ms,
                (unsigned long long)r.t_done_ms);
    TGH_CHECK(r.t_done_ms >= 1100, "response done after %llu ms, upstream "
              "takes >= 1200", (unsigned long long)r.t_done_ms);
    /* a buffering proxy delivers everything at the end: first ~= done.
     * (tg-testup itself puts its first chunk on the wire at ~300 ms.) */
    TGH_CHECK(r.t_first_body_ms > 0 && r.t_first_body_ms < 900
              && r.t_done_ms - r.t_first_body_ms >= 550,
              "not streamed: first body byte at %llu ms, done at %llu ms",
              (unsigned long long)r.t_first_body_ms,
              (unsigned long long)r.t_done_ms);
    tgh_resp_free(&r);
}

Test(proxy, fastapi_stream_streams)
{
    start_fastapi();
    tgh_resp r;
    int rc = tgh_http(tg.port, "GET", "/stream?chunks=5&delay_ms=300", NULL,
                      NULL, 0, &r, 15000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /stream: rc %d status %d (%s)",
              rc, r.status, r.reason);
    const char *want = "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n";
    TGH_CHECK(r.body_len == strlen(want)
              && memcmp(r.body, want, strlen(want)) == 0,
              "stream body: '%s'", (char *)r.body);
    TGH_CHECK(r.chunked, "expected chunked framing to an HTTP/1.1 client");
    cr_log_info("/stream: first body byte %llu ms, done %llu ms",
                (unsigned long long)r.t_first_body_ms,
                (unsigned long long)r.t_done_ms);
    TGH_CHECK(r.t_first_body_ms > 0 && r.t_first_body_ms < 800
              && r.t_done_ms >= 1100
              && r.t_done_ms - r.t_first_body_ms >= 700,
              "not streamed: first body byte at %llu ms, done at %llu ms",
              (unsigned long long)r.t_first_body_ms,
              (unsigned long long)r.t_done_ms);
    tgh_resp_free(&r);
}

/* ------------------------------------------------------------------ */
/* keep-alive                                                          */

Test(proxy, keepalive_upstream_reuse)
{
    start_testup(NULL);
    /* warm-up request so that tollgate has started for sure */
    tgh_resp r;
    TGH_CHECK(tgh_http(tg.port, "GET", "/", NULL, NULL, 0, &r, 5000) == 0
              && r.status == 200, "warm-up: %d %s", r.status, r.reason);
    tgh_resp_free(&r);
    TGH_CHECK(tgh_testup_reset(up.port) == 0, "reset stats");

    enum { NCONN = 4, PER = 50 };
    tgh_conn *c[NCONN];
    for (int i = 0; i < NCONN; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(c[i] != NULL, "connect %d", i);
    }
    for (int k = 0; k < PER; k++) {
        for (int i = 0; i < NCONN; i++) {
            const char *req = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
            int rc = tgh_conn_roundtrip(c[i], req, strlen(req), &r, 0, 5000);
            TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 3
                      && memcmp(r.body, "ok\n", 3) == 0,
                      "request %d on client connection %d: rc %d status %d "
                      "(%s)", k, i, rc, r.status, r.reason);
            tgh_resp_free(&r);
        }
    }
    for (int i = 0; i < NCONN; i++)
        tgh_conn_close(c[i]);
    tgh_stats st;
    TGH_CHECK(tgh_testup_stats(up.port, &st) == 0, "stats");
    cr_log_info("keep-alive: %ld upstream connections for %ld requests",
                st.connections - 1, st.requests);
    TGH_CHECK(st.requests == NCONN * PER, "upstream saw %ld requests, "
              "expected %d", st.requests, NCONN * PER);
    /* +1: the connection of our own /__stats call */
    TGH_CHECK(st.connections - 1 < 20, "upstream connections not reused: "
              "%ld connections for %d requests", st.connections - 1,
              NCONN * PER);
}

Test(proxy, upstream_connection_close_not_forwarded)
{
    start_testup(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_resp r;
    /* tg-testup answers /close with Connection: close: that is about the
     * upstream hop; the client connection is not concerned. */
    for (int i = 0; i < 3; i++) {
        const char *req = "GET /close HTTP/1.1\r\nHost: t\r\n\r\n";
        int rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
        TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 8
                  && memcmp(r.body, "closing\n", 8) == 0,
                  "GET /close #%d: rc %d status %d (%s)", i, rc, r.status,
                  r.reason);
        tgh_resp_free(&r);
        req = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
        rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
        TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 3,
                  "GET / after upstream closed its connection, same client "
                  "socket: rc %d status %d (%s)", rc, r.status, r.reason);
        tgh_resp_free(&r);
    }
    tgh_conn_close(c);
}

/* ------------------------------------------------------------------ */
/* upstream failures                                                   */

static int closed_port;

static void point_at_closed_port(tgh_tg_opts *o)
{
    snprintf(o->upstream_servers, sizeof o->upstream_servers,
             "127.0.0.1:%d", closed_port);
}

Test(proxy, upstream_down_502)
{
    closed_port = tgh_free_port();
    start_testup(point_at_closed_port);
    for (int i = 0; i < 3; i++) {
        tgh_resp r;
        int rc = tgh_http(tg.port, "GET", "/anything", NULL, NULL, 0, &r,
                          10000);
        TGH_CHECK(rc == 0, "GET with upstream down: %s", r.reason);
        check_error_json(&r, 502);
        TGH_CHECK(r.t_done_ms < 3000, "502 took %llu ms",
                  (unsigned long long)r.t_done_ms);
        tgh_resp_free(&r);
    }
}

static void first_byte_1s(tgh_tg_opts *o)
{
    o->first_byte_timeout_ms = 1000;
}

Test(proxy, slow_upstream_504)
{
    start_testup(first_byte_1s);
    tgh_resp r;
    uint64_t t0 = tgh_now_ms();
    int rc = tgh_http(tg.port, "GET", "/slow?ms=5000", NULL, NULL, 0, &r,
                      8000);
    uint64_t dt = tgh_now_ms() - t0;
    cr_log_info("504 after %llu ms", (unsigned long long)dt);
    TGH_CHECK(rc == 0, "GET /slow?ms=5000: %s", r.reason);
    check_error_json(&r, 504);
    TGH_CHECK(dt >= 900 && dt <= 2500, "504 after %llu ms, expected within "
              "[900, 2500] (first_byte_timeout_ms 1000)",
              (unsigned long long)dt);
    tgh_resp_free(&r);
    /* the proxy still works afterwards */
    rc = tgh_http(tg.port, "GET", "/", NULL, NULL, 0, &r, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET / after 504: %d", r.status);
    tgh_resp_free(&r);
}

/* The upstream deadline timer is lazy (exchange.c, up_arm): on a
 * kept-alive connection the last exchange's first-byte deadline is still
 * pending when the next request is forwarded and wakes it early.  The
 * next request's own deadline must hold all the same: a slow answer gets
 * its 504 first_byte_timeout_ms after it was sent, not at the earlier
 * wake-up and not later. */
Test(proxy, slow_upstream_504_after_an_exchange_on_the_same_connection)
{
    start_testup(first_byte_1s);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_resp r;
    /* answered in 500 ms: its 1 s deadline is still pending after it */
    tgh_conn_sendstr(c, "GET /slow?ms=500 HTTP/1.1\r\nHost: t\r\n\r\n");
    int rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /slow?ms=500: %d (%s)", r.status, r.reason);
    tgh_resp_free(&r);
    uint64_t t0 = tgh_now_ms();
    tgh_conn_sendstr(c, "GET /slow?ms=5000 HTTP/1.1\r\nHost: t\r\n\r\n");
    rc = tgh_conn_read_response(c, &r, 0, 8000);
    uint64_t dt = tgh_now_ms() - t0;
    cr_log_info("504 after %llu ms", (unsigned long long)dt);
    TGH_CHECK(rc == 0, "GET /slow?ms=5000: %s", r.reason);
    check_error_json(&r, 504);
    TGH_CHECK(dt >= 900 && dt <= 2500, "504 after %llu ms, expected within "
              "[900, 2500] (first_byte_timeout_ms 1000)",
              (unsigned long long)dt);
    tgh_resp_free(&r);
    tgh_conn_close(c);
}

/* ------------------------------------------------------------------ */
/* limits                                                              */

static void small_body_limit(tgh_tg_opts *o)
{
    o->max_body_bytes = 1024;
}

Test(proxy, oversize_body_413)
{
    start_testup(small_body_limit);
    tgh_stats s0, s1;
    TGH_CHECK(tgh_testup_stats(up.port, &s0) == 0, "stats");

    /* Content-Length over the limit: 413 before any body byte is sent */
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_conn_sendstr(c, "POST /echo HTTP/1.1\r\nHost: t\r\n"
                        "Content-Length: 2048\r\n\r\n");
    tgh_resp r;
    int rc = tgh_conn_read_response(c, &r, 0, 3000);
    TGH_CHECK(rc == 0, "CL 2048 > 1024 without body: no response within "
              "3 s (%s)", r.reason);
    check_error_json(&r, 413);
    tgh_resp_free(&r);
    tgh_conn_close(c);

    /* with Expect: 100-continue: 413 instead of 100 Continue */
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_conn_sendstr(c, "POST /echo HTTP/1.1\r\nHost: t\r\n"
                        "Expect: 100-continue\r\nContent-Length: 2048\r\n\r\n");
    rc = tgh_conn_read_response(c, &r, 0, 3000);
    TGH_CHECK(rc == 0, "Expect + CL 2048: no response within 3 s (%s)",
              r.reason);
    TGH_CHECK(!r.saw_100, "100 Continue sent for a body over the limit");
    check_error_json(&r, 413);
    tgh_resp_free(&r);
    tgh_conn_close(c);

    TGH_CHECK(tgh_testup_stats(up.port, &s1) == 0, "stats");
    TGH_CHECK(s1.requests == s0.requests, "oversize request forwarded "
              "(upstream requests %ld -> %ld)", s0.requests, s1.requests);

    /* chunked body passing the limit */
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    unsigned char body[3000];
    tgh_fill_random(body, sizeof body, 5);
    size_t enc_len;
    unsigned char *enc = tgh_chunk_encode(body, sizeof body, &enc_len, 3);
    const char *head = "POST /echo HTTP/1.1\r\nHost: t\r\n"
                       "Transfer-Encoding: chunked\r\n\r\n";
    unsigned char req[8192];
    memcpy(req, head, strlen(head));
    memcpy(req + strlen(head), enc, enc_len);
    rc = tgh_conn_roundtrip(c, req, strlen(head) + enc_len, &r, 0, 5000);
    TGH_CHECK(rc == 0, "chunked 3000 > 1024: %s", r.reason);
    check_error_json(&r, 413);
    tgh_resp_free(&r);
    tgh_conn_close(c);
    free(enc);
    TGH_CHECK(tgh_testup_stats(up.port, &s0) == 0, "stats");
    TGH_CHECK(s0.requests == s1.requests, "chunked oversize request reached "
              "the upstream complete (requests %ld -> %ld)", s1.requests,
              s0.requests);

    /* exactly at the limit: fine */
    tgh_fill_random(body, 1024, 9);
    echo_cl("/echo", body, 1024);
}

Test(proxy, oversize_headers_431)
{
    start_testup(NULL);
    /* max_header_bytes 16384: a 12 KB header is fine, 20 KB is not */
    char *val = malloc(20001);
    memset(val, 'a', 20000);
    val[20000] = '\0';
    val[12000] = '\0';
    char *hdr = tgh_strf("X-Big: %s\r\n", val);
    tgh_resp r;
    int rc = tgh_http(tg.port, "GET", "/", hdr, NULL, 0, &r, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "12 KB header: rc %d status %d",
              rc, r.status);
    tgh_resp_free(&r);
    free(hdr);
    val[12000] = 'a';
    hdr = tgh_strf("X-Big: %s\r\n", val);
    tgh_stats s0, s1;
    tgh_testup_stats(up.port, &s0);
    rc = tgh_http(tg.port, "GET", "/", hdr, NULL, 0, &r, 5000);
    TGH_CHECK(rc == 0, "20 KB header: %s", r.reason);
    check_error_json(&r, 431);
    tgh_resp_free(&r);
    free(hdr);
    free(val);
    tgh_testup_stats(up.port, &s1);
    TGH_CHECK(s1.requests == s0.requests, "431 request was forwarded");
}

Test(proxy, long_url_414)
{
    start_testup(NULL);
    /* max_request_line 8192: a 7000-byte target is fine, 9000 is not */
    char *path = malloc(9001);
    path[0] = '/';
    memset(path + 1, 'p', 8999);
    path[9000] = '\0';
    path[7000] = '\0';
    tgh_resp r;
    int rc = tgh_http(tg.port, "GET", path, NULL, NULL, 0, &r, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "7000-byte URL: rc %d status %d",
              rc, r.status);
    tgh_resp_free(&r);
    path[7000] = 'p';
    tgh_stats s0, s1;
    tgh_testup_stats(up.port, &s0);
    rc = tgh_http(tg.port, "GET", path, NULL, NULL, 0, &r, 5000);
    TGH_CHECK(rc == 0, "9000-byte URL: %s", r.reason);
    check_error_json(&r, 414);
    tgh_resp_free(&r);
    free(path);
    tgh_testup_stats(up.port, &s1);
    TGH_CHECK(s1.requests == s0.requests, "414 request was forwarded");
}

Test(proxy, te_and_cl_400)
{
    start_testup(NULL);
    tgh_stats s0, s1;
    tgh_testup_stats(up.port, &s0);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    /* the classic smuggling shape: a second request hidden in the body */
    const char *req = "POST /echo HTTP/1.1\r\nHost: t\r\n"
                      "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                      "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
    tgh_conn_sendstr(c, req);
    tgh_resp r;
    int rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0, "TE+CL: %s", r.reason);
    check_error_json(&r, 400);
    tgh_resp_free(&r);
    size_t extra = 0;
    TGH_CHECK(tgh_conn_wait_closed(c, 3000, &extra),
              "connection not closed after TE+CL 400");
    TGH_CHECK(extra == 0, "%zu bytes after the 400 (a second response?)",
              extra);
    tgh_conn_close(c);
    tgh_testup_stats(up.port, &s1);
    TGH_CHECK(s1.requests == s0.requests, "TE+CL request forwarded "
              "(requests %ld -> %ld)", s0.requests, s1.requests);
}

/* ------------------------------------------------------------------ */
/* headers                                                             */

Test(proxy, forwarded_headers)
{
    start_testup(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    const char *req =
        "GET /headers HTTP/1.1\r\nHost: t\r\n"
        "Connection: keep-alive, X-Drop-Me\r\n"
        "X-Drop-Me: secret\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Trailer: X-Later\r\n"
        "Upgrade: example/1\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "X-Keep-Me: yes\r\n\r\n";
    tgh_resp r;
    int rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /headers: rc %d status %d "
              "(%s)", rc, r.status, r.reason);
    const char *b = (const char *)r.body;
    int n;
    char *v = line_header(b, "X-Forwarded-For", &n);
    TGH_CHECK(v != NULL && strcmp(v, "127.0.0.1") == 0 && n == 1,
              "upstream X-Forwarded-For '%s' (x%d), expected 127.0.0.1\n%s",
              v ? v : "(none)", n, b);
    free(v);
    v = line_header(b, "X-Forwarded-Proto", &n);
    TGH_CHECK(v != NULL && strcmp(v, "http") == 0 && n == 1,
              "upstream X-Forwarded-Proto '%s' (x%d)", v ? v : "(none)", n);
    free(v);
    v = line_header(b, "X-Request-ID", &n);
    TGH_CHECK(v != NULL && tgh_is_lower_hex(v, 32) && n == 1,
              "upstream X-Request-ID '%s' (x%d), expected 32 lowercase hex",
              v ? v : "(none)", n);
    const char *rid = tgh_resp_header(&r, "X-Request-ID");
    TGH_CHECK(rid != NULL && strcmp(rid, v) == 0, "response X-Request-ID "
              "'%s' differs from the upstream's '%s'", rid ? rid : "(none)",
              v);
    char *first_id = v;
    static const char *const hop[] = { "X-Drop-Me", "Keep-Alive", "TE",
                                       "Trailer", "Upgrade",
                                       "Proxy-Connection" };
    for (size_t i = 0; i < sizeof hop / sizeof hop[0]; i++) {
        v = line_header(b, hop[i], &n);
        TGH_CHECK(v == NULL, "hop-by-hop '%s: %s' reached the upstream",
                  hop[i], v);
    }
    v = line_header(b, "Connection", &n);
    TGH_CHECK(v == NULL || strcasecmp(v, "keep-alive") == 0,
              "client's Connection header forwarded: '%s'", v);
    free(v);
    v = line_header(b, "X-Keep-Me", &n);
    TGH_CHECK(v != NULL && strcmp(v, "yes") == 0, "X-Keep-Me lost");
    free(v);
    tgh_resp_free(&r);

    /* a second request gets a different generated id */
    req = "GET /headers HTTP/1.1\r\nHost: t\r\n\r\n";
    rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "second GET /headers");
    v = line_header((char *)r.body, "X-Request-ID", &n);
    TGH_CHECK(v != NULL && tgh_is_lower_hex(v, 32)
              && strcmp(v, first_id) != 0,
              "second generated X-Request-ID '%s' (first '%s')",
              v ? v : "(none)", first_id);
    free(v);
    free(first_id);
    tgh_resp_free(&r);

    /* a client-sent X-Forwarded-For is replaced (the peer is no trusted
     * proxy: test_edge covers http.trusted_proxies); a sane id is kept */
    req = "GET /headers HTTP/1.1\r\nHost: t\r\n"
          "X-Forwarded-For: 10.1.2.3\r\nX-Request-ID: my-req-abc123\r\n\r\n";
    rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /headers with XFF");
    b = (const char *)r.body;
    v = line_header(b, "X-Forwarded-For", &n);
    TGH_CHECK(v != NULL && strcmp(v, "127.0.0.1") == 0 && n == 1,
              "upstream X-Forwarded-For '%s' (x%d), expected "
              "'127.0.0.1'", v ? v : "(none)", n);
    free(v);
    v = line_header(b, "X-Request-ID", &n);
    TGH_CHECK(v != NULL && strcmp(v, "my-req-abc123") == 0 && n == 1,
              "client's X-Request-ID not kept: upstream saw '%s' (x%d)",
              v ? v : "(none)", n);
    free(v);
    rid = tgh_resp_header(&r, "X-Request-ID");
    TGH_CHECK(rid != NULL && strcmp(rid, "my-req-abc123") == 0,
              "response X-Request-ID '%s', expected my-req-abc123",
              rid ? rid : "(none)");
    tgh_resp_free(&r);

    /* an insane id (spaces, quotes) is replaced */
    req = "GET /headers HTTP/1.1\r\nHost: t\r\n"
          "X-Request-ID: bad id \"with\" <spaces>\r\n\r\n";
    rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /headers with a bad id");
    v = line_header((char *)r.body, "X-Request-ID", &n);
    TGH_CHECK(v != NULL && tgh_is_lower_hex(v, 32) && n == 1,
              "bad X-Request-ID not replaced: upstream saw '%s' (x%d)",
              v ? v : "(none)", n);
    free(v);
    tgh_resp_free(&r);
    tgh_conn_close(c);
}

Test(proxy, fastapi_forwarded_headers)
{
    start_fastapi();
    tgh_resp r;
    int rc = tgh_http(tg.port, "GET", "/headers",
                      "X-Forwarded-For: 192.0.2.7\r\n", NULL, 0, &r, 10000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /headers: %d %s", r.status,
              r.reason);
    const char *b = (const char *)r.body;
    TGH_CHECK(strstr(b, "\"x-forwarded-for\":\"127.0.0.1\"")
              && strstr(b, "\"x-forwarded-proto\":\"http\"")
              && strstr(b, "\"x-request-id\":\""),
              "FastAPI saw headers: %s", b);
    tgh_resp_free(&r);
}

/* ------------------------------------------------------------------ */
/* protocol corners                                                    */

Test(proxy, http10_requests)
{
    start_testup(NULL);
    unsigned char want[3000];
    tgh_fill_testup_pattern(want, sizeof want);

    /* Content-Length response */
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_conn_sendstr(c, "GET /bytes?n=1000 HTTP/1.0\r\nHost: t\r\n\r\n");
    tgh_resp r;
    int rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "HTTP/1.0 GET /bytes: rc %d "
              "status %d (%s)", rc, r.status, r.reason);
    TGH_CHECK(r.body_len == 1000 && tgh_first_diff(want, r.body, 1000) < 0,
              "HTTP/1.0 body: %zu bytes", r.body_len);
    TGH_CHECK(!r.chunked, "chunked response to an HTTP/1.0 client");
    tgh_resp_free(&r);
    TGH_CHECK(tgh_conn_wait_closed(c, 3000, NULL), "HTTP/1.0 connection "
              "without keep-alive not closed");
    tgh_conn_close(c);

    /* upstream chunked: close-delimited to the 1.0 client, no Host */
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_conn_sendstr(c, "GET /chunked?n=3000&chunks=3&delay_ms=20 HTTP/1.0"
                        "\r\n\r\n");
    rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "HTTP/1.0 GET /chunked: rc %d "
              "status %d (%s)", rc, r.status, r.reason);
    TGH_CHECK(!r.chunked && tgh_resp_header(&r, "Transfer-Encoding") == NULL,
              "Transfer-Encoding '%s' sent to an HTTP/1.0 client",
              tgh_resp_header(&r, "Transfer-Encoding"));
    TGH_CHECK(r.body_len == 3000 && tgh_first_diff(want, r.body, 3000) < 0,
              "HTTP/1.0 chunked-upstream body: %zu bytes (%s)", r.body_len,
              r.close_delimited ? "close-delimited" : "length");
    tgh_resp_free(&r);
    tgh_conn_close(c);

    /* POST with a body */
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_conn_sendstr(c, "POST /echo HTTP/1.0\r\nContent-Length: 11\r\n\r\n"
                        "hello world");
    rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 11
              && memcmp(r.body, "hello world", 11) == 0,
              "HTTP/1.0 POST /echo: rc %d status %d body '%s'", rc, r.status,
              (char *)r.body);
    tgh_resp_free(&r);
    tgh_conn_close(c);
}

Test(proxy, head_has_no_body)
{
    start_testup(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    const char *req = "HEAD /bytes?n=1000 HTTP/1.1\r\nHost: t\r\n\r\n";
    tgh_resp r;
    int rc = tgh_conn_roundtrip(c, req, strlen(req), &r, TGH_HEAD_REQ, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "HEAD: rc %d status %d (%s)", rc,
              r.status, r.reason);
    tgh_resp_free(&r);
    /* if a body followed the HEAD response it would be parsed here */
    req = "GET /bytes?n=10 HTTP/1.1\r\nHost: t\r\n\r\n";
    rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 10,
              "GET after HEAD on the same socket: rc %d status %d (%s)", rc,
              r.status, r.reason);
    unsigned char want[10];
    tgh_fill_testup_pattern(want, 10);
    TGH_CHECK(memcmp(want, r.body, 10) == 0, "GET after HEAD: wrong body");
    tgh_resp_free(&r);
    size_t extra = 0;
    tgh_conn_wait_closed(c, 300, &extra);
    TGH_CHECK(extra == 0, "%zu stray bytes after the responses", extra);
    tgh_conn_close(c);
}

static void no_body_then_keepalive(const char *path)
{
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    char *req = tgh_strf("GET %s HTTP/1.1\r\nHost: t\r\n\r\n", path);
    tgh_resp r;
    int rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
    free(req);
    TGH_CHECK(rc == 0, "GET %s: %s", path, r.reason);
    int want = strstr(path, "204") ? 204 : 304;
    TGH_CHECK(r.status == want, "GET %s: status %d", path, r.status);
    TGH_CHECK(tgh_resp_header(&r, "Transfer-Encoding") == NULL,
              "%d response carries Transfer-Encoding '%s'", want,
              tgh_resp_header(&r, "Transfer-Encoding"));
    if (want == 204)
        TGH_CHECK(tgh_resp_header(&r, "Content-Length") == NULL
                  || strcmp(tgh_resp_header(&r, "Content-Length"), "0") == 0,
                  "204 with Content-Length '%s'",
                  tgh_resp_header(&r, "Content-Length"));
    tgh_resp_free(&r);
    const char *next = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    rc = tgh_conn_roundtrip(c, next, strlen(next), &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 3
              && memcmp(r.body, "ok\n", 3) == 0,
              "second request after %d on the same socket: rc %d status %d "
              "(%s)", want, rc, r.status, r.reason);
    tgh_resp_free(&r);
    tgh_conn_close(c);
}

Test(proxy, no_body_204_304_keepalive)
{
    start_testup(NULL);
    no_body_then_keepalive("/status?code=204");
    no_body_then_keepalive("/status?code=304");
}

Test(proxy, expect_100_continue)
{
    start_testup(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_conn_sendstr(c, "POST /echo HTTP/1.1\r\nHost: t\r\n"
                        "Expect: 100-continue\r\nContent-Length: 11\r\n\r\n");
    tgh_resp r;
    int rc = tgh_conn_read_response(c, &r, TGH_STOP_1XX, 3000);
    TGH_CHECK(rc == 0 && r.status == 100, "expected HTTP/1.1 100 Continue "
              "before the body: rc %d status %d (%s)", rc, r.status,
              r.reason);
    tgh_resp_free(&r);
    tgh_conn_sendstr(c, "hello world");
    rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 11
              && memcmp(r.body, "hello world", 11) == 0,
              "echo after 100 Continue: rc %d status %d body '%s'", rc,
              r.status, (char *)r.body);
    tgh_resp_free(&r);

    /* Expect is hop-by-hop: the upstream must not see it */
    tgh_conn_sendstr(c, "POST /headers HTTP/1.1\r\nHost: t\r\n"
                        "Expect: 100-continue\r\nContent-Length: 5\r\n\r\n");
    rc = tgh_conn_read_response(c, &r, TGH_STOP_1XX, 3000);
    TGH_CHECK(rc == 0 && r.status == 100, "second 100 Continue: %d",
              r.status);
    tgh_resp_free(&r);
    tgh_conn_sendstr(c, "hello");
    rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "POST /headers: %d", r.status);
    char *v = line_header((char *)r.body, "Expect", NULL);
    TGH_CHECK(v == NULL, "upstream saw 'Expect: %s'", v);
    tgh_resp_free(&r);
    tgh_conn_close(c);
}

/* ------------------------------------------------------------------ */
/* admin and lifecycle                                                 */

Test(proxy, admin_health)
{
    start_testup(NULL);
    tgh_resp r;
    int rc = tgh_http(tg.admin_port, "GET", "/healthz", NULL, NULL, 0, &r,
                      5000);
    TGH_CHECK(rc == 0 && r.status == 200, "/healthz: rc %d status %d (%s)",
              rc, r.status, r.reason);
    tgh_resp_free(&r);
    rc = tgh_http(tg.admin_port, "GET", "/readyz", NULL, NULL, 0, &r, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "/readyz: rc %d status %d (%s)",
              rc, r.status, r.reason);
    tgh_resp_free(&r);
}

typedef struct inflight {
    pthread_t th;
    int port;
    atomic_int sent;
    int rc;
    tgh_resp r;
} inflight;

static void *inflight_main(void *arg)
{
    inflight *f = arg;
    tgh_conn *c = tgh_conn_open(f->port, 5000);
    f->rc = -1;
    if (c == NULL) {
        atomic_store(&f->sent, -1);
        return NULL;
    }
    const char *req = "GET /slow?ms=1500 HTTP/1.1\r\nHost: t\r\n\r\n";
    if (tgh_conn_sendstr(c, req) != 0) {
        atomic_store(&f->sent, -1);
        tgh_conn_close(c);
        return NULL;
    }
    atomic_store(&f->sent, 1);
    f->rc = tgh_conn_read_response(c, &f->r, 0, 15000);
    tgh_conn_close(c);
    return NULL;
}

/* SIGTERM with three requests in flight (tweak: the options, or NULL). */
static void
sigterm_drains(void (*tweak)(tgh_tg_opts *))
{
    start_testup(tweak);
    TGH_CHECK(tgh_testup_reset(up.port) == 0, "reset stats");
    inflight f[3];
    memset(f, 0, sizeof f);
    for (int i = 0; i < 3; i++) {
        f[i].port = tg.port;
        pthread_create(&f[i].th, NULL, inflight_main, &f[i]);
    }
    /* wait until the three requests reached the upstream (counted on
     * arrival); bounded, /slow takes 1500 ms */
    uint64_t end = tgh_now_ms() + 1000;
    tgh_stats st = { 0, 0 };
    while (tgh_now_ms() < end) {
        if (tgh_testup_stats(up.port, &st) == 0 && st.requests >= 3)
            break;
        tgh_sleep_ms(20);
    }
    for (int i = 0; i < 3; i++)
        TGH_CHECK(atomic_load(&f[i].sent) == 1, "in-flight request %d not "
                  "sent", i);
    uint64_t t_term = tgh_now_ms();
    tgh_proc_signal(tg.proc, SIGTERM, 0);

    /* new connections are refused (best effort: either connect fails
     * within 1 s, or a request on it is not served) */
    int refused = 0;
    end = tgh_now_ms() + 1000;
    while (tgh_now_ms() < end) {
        if (!tgh_port_accepts(tg.port)) {
            refused = 1;
            break;
        }
        tgh_sleep_ms(20);
    }
    cr_log_info("after SIGTERM: new connections %s", refused
                ? "refused" : "still accepted by the kernel (checked: not served)");
    if (!refused) {
        tgh_conn *c = tgh_conn_open(tg.port, 1000);
        if (c != NULL) {
            tgh_resp r;
            const char *req = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
            int rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 12000);
            TGH_CHECK(rc != 0 || r.status >= 500,
                      "a new connection after SIGTERM was served: %d",
                      r.status);
            tgh_resp_free(&r);
            tgh_conn_close(c);
        }
    }

    for (int i = 0; i < 3; i++) {
        pthread_join(f[i].th, NULL);
        TGH_CHECK(f[i].rc == 0 && f[i].r.status == 200
                  && f[i].r.body_len == 5
                  && memcmp(f[i].r.body, "slow\n", 5) == 0,
                  "in-flight request %d during drain: rc %d status %d (%s)",
                  i, f[i].rc, f[i].r.status, f[i].r.reason);
        tgh_resp_free(&f[i].r);
    }
    TGH_CHECK(tgh_proc_wait(tg.proc, 12000) == 0,
              "tollgate still running 12 s after SIGTERM");
    uint64_t dt = tgh_now_ms() - t_term;
    TGH_CHECK(WIFEXITED(tg.proc->status) && WEXITSTATUS(tg.proc->status) == 0,
              "tollgate exit after SIGTERM: %s %d",
              WIFEXITED(tg.proc->status) ? "status" : "signal",
              WIFEXITED(tg.proc->status) ? WEXITSTATUS(tg.proc->status)
                                         : WTERMSIG(tg.proc->status));
    TGH_CHECK(dt < 10000, "drain took %llu ms", (unsigned long long)dt);
}

Test(proxy, sigterm_drains_inflight)
{
    sigterm_drains(NULL);
}

static void one_worker(tgh_tg_opts *o)
{
    o->workers = 1;
}

/* The same with one worker, which accepts itself and closes its listener
 * when told to drain. */
Test(proxy, sigterm_drains_inflight_one_worker)
{
    sigterm_drains(one_worker);
}

/* ------------------------------------------------------------------ */
/* delivery corners                                                    */

Test(proxy, request_split_into_pieces)
{
    start_testup(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    /* one byte at a time, head and body */
    const char *req = "POST /echo?x=1 HTTP/1.1\r\nHost: t\r\nX-A: b\r\n"
                      "Content-Length: 10\r\n\r\n0123456789";
    TGH_CHECK(tgh_conn_send_slowly(c, req, strlen(req), 1, 3) == 0, "send");
    tgh_resp r;
    int rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 10
              && memcmp(r.body, "0123456789", 10) == 0,
              "request sent byte by byte: rc %d status %d body '%s' (%s)", rc,
              r.status, (char *)r.body, r.reason);
    tgh_resp_free(&r);
    /* a long request line (7000 bytes) in 100-byte pieces, then the
     * chunked body split inside the chunk-size lines and the CRLFs */
    size_t plen = 7000;
    char *path = malloc(plen + 1);
    path[0] = '/';
    memcpy(path + 1, "echo?pad=", 9);
    memset(path + 10, 'q', plen - 10);
    path[plen] = '\0';
    char *big = tgh_strf("POST %s HTTP/1.1\r\nHost: t\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n"
                         "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", path);
    TGH_CHECK(tgh_conn_send_slowly(c, big, strlen(big), 100, 2) == 0,
              "send");
    rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 11
              && memcmp(r.body, "hello world", 11) == 0,
              "long request line in pieces: rc %d status %d body '%s' (%s)",
              rc, r.status, (char *)r.body, r.reason);
    tgh_resp_free(&r);
    size_t tail = strlen(big) - 40; /* the chunked body, 3 bytes at a time */
    TGH_CHECK(tgh_conn_send(c, big, tail, 5000) == 0, "send");
    TGH_CHECK(tgh_conn_send_slowly(c, big + tail, 40, 3, 5) == 0, "send");
    rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 11
              && memcmp(r.body, "hello world", 11) == 0,
              "chunk framing split in pieces: rc %d status %d body '%s' (%s)",
              rc, r.status, (char *)r.body, r.reason);
    tgh_resp_free(&r);
    free(big);
    free(path);
    tgh_conn_close(c);
}

Test(proxy, pipelined_requests_in_order)
{
    start_testup(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    /* three requests in one write; the first is the slowest */
    const char *req = "GET /slow?ms=300 HTTP/1.1\r\nHost: t\r\n\r\n"
                      "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                      "\r\nabc"
                      "GET /bytes?n=7 HTTP/1.1\r\nHost: t\r\n\r\n";
    TGH_CHECK(tgh_conn_sendstr(c, req) == 0, "send");
    tgh_resp r;
    int rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 5
              && memcmp(r.body, "slow\n", 5) == 0,
              "pipelined #1: rc %d status %d body '%s' (%s)", rc, r.status,
              (char *)r.body, r.reason);
    tgh_resp_free(&r);
    rc = tgh_conn_read_response(c, &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 3
              && memcmp(r.body, "abc", 3) == 0,
              "pipelined #2: rc %d status %d body '%s' (%s)", rc, r.status,
              (char *)r.body, r.reason);
    tgh_resp_free(&r);
    rc = tgh_conn_read_response(c, &r, 0, 5000);
    unsigned char want[7];
    tgh_fill_testup_pattern(want, 7);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == 7
              && memcmp(r.body, want, 7) == 0,
              "pipelined #3: rc %d status %d %zu bytes (%s)", rc, r.status,
              r.body_len, r.reason);
    tgh_resp_free(&r);
    tgh_conn_close(c);
}

/* Peak resident set of a process in KiB (VmHWM), or -1. */
static long vm_hwm_kib(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    long v = -1;
    while (fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, "VmHWM:", 6) == 0)
            v = strtol(line + 6, NULL, 10);
    fclose(f);
    return v;
}

static void big_body_limit(tgh_tg_opts *o)
{
    o->max_body_bytes = 256L * 1024 * 1024;
    o->total_timeout_ms = 60000;
}

Test(proxy, streams_without_buffering_bodies)
{
    /* Under ASan, freed memory sits in a quarantine (256 MiB by default)
     * and would count as resident: keep it small for this child so the
     * measure is of tollgate's buffering, not of the sanitizer. */
    const char *asan = getenv("ASAN_OPTIONS");
    char *opts = tgh_strf("%s%squarantine_size_mb=4", asan ? asan : "",
                          asan && *asan ? ":" : "");
    setenv("ASAN_OPTIONS", opts, 1);
    free(opts);
    start_testup(big_body_limit);
    tgh_resp r;
    TGH_CHECK(tgh_http(tg.port, "GET", "/bytes?n=65536", NULL, NULL, 0, &r,
                       5000) == 0 && r.status == 200, "warm-up");
    tgh_resp_free(&r);
    long base = vm_hwm_kib(tg.proc->pid);
    TGH_CHECK(base > 0, "cannot read VmHWM of tollgate");
    const size_t n = 128u * 1024 * 1024;

    /* a client that stops reading: the proxy must stop reading the
     * upstream instead of buffering the 128 MiB response */
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    char *req = tgh_strf("GET /bytes?n=%zu HTTP/1.1\r\nHost: t\r\n\r\n", n);
    TGH_CHECK(tgh_conn_sendstr(c, req) == 0, "send");
    free(req);
    tgh_sleep_ms(1500);
    long stalled = vm_hwm_kib(tg.proc->pid);
    int rc = tgh_conn_read_response(c, &r, 0, 60000);
    TGH_CHECK(rc == 0 && r.status == 200 && r.body_len == n,
              "128 MiB download: rc %d status %d %zu bytes (%s)", rc,
              r.status, r.body_len, r.reason);
    unsigned char *want = malloc(n);
    tgh_fill_testup_pattern(want, n);
    TGH_CHECK(tgh_first_diff(want, r.body, n) < 0, "128 MiB download "
              "differs");
    tgh_resp_free(&r);
    tgh_conn_close(c);
    TGH_CHECK(stalled - base < 48 * 1024, "tollgate buffered the response "
              "for a stalled client: VmHWM %ld KiB -> %ld KiB", base,
              stalled);

    /* upload 128 MiB (echoed back, read concurrently) */
    tgh_fill_random(want, n, 77);
    echo_cl("/echo", want, n);
    free(want);
    long after = vm_hwm_kib(tg.proc->pid);
    cr_log_info("tollgate VmHWM: %ld KiB at start, %ld KiB with a stalled "
                "client, %ld KiB after the upload", base, stalled, after);
    TGH_CHECK(after - base < 48 * 1024, "tollgate buffered bodies: VmHWM "
              "%ld KiB -> %ld KiB over a 128 MiB upload + echo", base, after);
}

static void short_client_timeouts(tgh_tg_opts *o)
{
    o->header_timeout_ms = 1000;
    o->idle_timeout_ms = 1000;
}

Test(proxy, header_and_idle_timeouts)
{
    start_testup(short_client_timeouts);
    tgh_stats s0, s1;
    tgh_testup_stats(up.port, &s0);
    /* an incomplete head: closed after header_timeout_ms (408 or silence) */
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    uint64_t t0 = tgh_now_ms();
    tgh_conn_sendstr(c, "GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ");
    size_t got = 0;
    unsigned char *rest = NULL;
    int closed = 0;
    rest = tgh_conn_read_all(c, 5000, &got, &closed);
    uint64_t dt = tgh_now_ms() - t0;
    TGH_CHECK(closed, "incomplete head still open after 5 s "
              "(header_timeout_ms 1000)");
    TGH_CHECK(dt >= 800 && dt <= 3000, "incomplete head closed after %llu "
              "ms, header_timeout_ms 1000", (unsigned long long)dt);
    TGH_CHECK(got == 0 || strncmp((char *)rest, "HTTP/1.1 408 ", 13) == 0,
              "header timeout answered with '%.40s', expected 408 or "
              "nothing", (char *)rest);
    free(rest);
    tgh_conn_close(c);
    tgh_testup_stats(up.port, &s1);
    TGH_CHECK(s1.requests == s0.requests, "incomplete request forwarded");

    /* an idle keep-alive connection: closed after idle_timeout_ms */
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_resp r;
    const char *req = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    int rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
    TGH_CHECK(rc == 0 && r.status == 200, "GET /: %d", r.status);
    tgh_resp_free(&r);
    t0 = tgh_now_ms();
    size_t extra = 0;
    closed = tgh_conn_wait_closed(c, 5000, &extra);
    dt = tgh_now_ms() - t0;
    TGH_CHECK(closed && dt >= 800 && dt <= 3000, "idle keep-alive "
              "connection: closed=%d after %llu ms (idle_timeout_ms 1000)",
              closed, (unsigned long long)dt);
    TGH_CHECK(extra == 0, "%zu bytes sent on an idle connection", extra);
    tgh_conn_close(c);
}

/* GET / n times on c, each answered 200, gap_ms apart. */
static void get_n(tgh_conn *c, int n, int gap_ms)
{
    const char *req = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    for (int i = 0; i < n; i++) {
        tgh_resp r;
        int rc = tgh_conn_roundtrip(c, req, strlen(req), &r, 0, 5000);
        TGH_CHECK(rc == 0 && r.status == 200, "request %d of %d: rc %d, "
                  "status %d", i + 1, n, rc, r.status);
        tgh_resp_free(&r);
        if (gap_ms > 0)
            tgh_sleep_ms(gap_ms);
    }
}

static void idle_2500_header_1000(tgh_tg_opts *o)
{
    o->header_timeout_ms = 1000;
    o->idle_timeout_ms = 2500;
}

/* The connection's timer is lazy (armed for an earlier deadline, it wakes
 * and re-arms for what is left; a shorter deadline re-arms it at once): a
 * connection kept busy past the first idle deadline stays open; once idle
 * it is closed after idle_timeout_ms from its last response, not from an
 * earlier request; and a header deadline shorter than the idle one that
 * the timer was armed for fires at its own time. */
Test(proxy, lazy_client_timer_keeps_each_deadline)
{
    start_testup(idle_2500_header_1000);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    uint64_t t0 = tgh_now_ms();
    /* ~3.5 s of requests 5 ms apart: every idle deadline is re-armed */
    while (tgh_now_ms() - t0 < 3500)
        get_n(c, 20, 5);
    uint64_t t1 = tgh_now_ms();
    size_t extra = 0;
    int closed = tgh_conn_wait_closed(c, 5000, &extra);
    uint64_t dt = tgh_now_ms() - t1;
    TGH_CHECK(closed && dt >= 2300 && dt <= 4500, "idle after %llu ms of "
              "requests: closed=%d after %llu ms (idle_timeout_ms 2500)",
              (unsigned long long)(t1 - t0), closed, (unsigned long long)dt);
    TGH_CHECK(extra == 0, "%zu bytes sent on an idle connection", extra);
    tgh_conn_close(c);

    /* 1.2 s of requests (the timer, armed at the accept for its header
     * deadline, wakes after 1 s and is armed again for the idle deadline,
     * 2.5 s from the last response), then a head that stops half-way:
     * its header deadline, 1000 ms from its first byte, comes first */
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    t0 = tgh_now_ms();
    while (tgh_now_ms() - t0 < 1200)
        get_n(c, 10, 5);
    t1 = tgh_now_ms();
    tgh_conn_sendstr(c, "GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ");
    size_t got = 0;
    unsigned char *rest = tgh_conn_read_all(c, 5000, &got, &closed);
    dt = tgh_now_ms() - t1;
    TGH_CHECK(closed && dt >= 800 && dt <= 1800, "incomplete head after "
              "1.2 s of requests: closed=%d after %llu ms (header_timeout_ms 1000, "
              "idle_timeout_ms 2500)",
              closed, (unsigned long long)dt);
    TGH_CHECK(got != 0 && strncmp((char *)rest, "HTTP/1.1 408 ", 13) == 0,
              "header timeout answered with '%.40s', expected 408", (char *)rest);
    free(rest);
    tgh_conn_close(c);
}

static void short_upstream_keepalive(tgh_tg_opts *o)
{
    o->workers = 1;
    o->keepalive_timeout_ms = 1000;
}

/* The upstream pool's idle deadlines (one lazy timer for the pool, the
 * oldest idle connection first): a connection in use past the first
 * deadline is kept and reused; idle, it is closed after
 * keepalive_timeout_ms from its last release (a new one is opened), and
 * not before. */
Test(proxy, upstream_keepalive_timeout_after_reuse)
{
    start_testup(short_upstream_keepalive);
    tgh_stats s0, s1;
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    get_n(c, 1, 0);
    TGH_CHECK(tgh_testup_stats(up.port, &s0) == 0, "/__stats");
    uint64_t t0 = tgh_now_ms();
    while (tgh_now_ms() - t0 < 2500)      /* past two idle deadlines */
        get_n(c, 20, 5);
    tgh_sleep_ms(400);
    get_n(c, 1, 0);
    TGH_CHECK(tgh_testup_stats(up.port, &s1) == 0, "/__stats");
    /* +1: the connection of our own /__stats call */
    TGH_CHECK(s1.connections == s0.connections + 1, "upstream connections "
              "%ld -> %ld over 2.9 s of reuse (keepalive_timeout_ms 1000): "
              "an idle connection in use expired", s0.connections, s1.connections);
    tgh_sleep_ms(2000);
    get_n(c, 1, 0);
    TGH_CHECK(tgh_testup_stats(up.port, &s0) == 0, "/__stats");
    TGH_CHECK(s0.connections == s1.connections + 2, "upstream connections "
              "%ld -> %ld after 2 s idle (keepalive_timeout_ms 1000): the "
              "idle connection was not closed", s1.connections, s0.connections);
    tgh_conn_close(c);
}
