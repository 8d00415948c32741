/*
 * test_http.c - unit tests of src/http.c: request and response framing,
 * the chunked decoder and the header helpers.  Every rejection asserts the
 * exact status the proxy will answer with.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tollgate/http.h"

static const tg_http_limits lim = {
    .max_request_line = 256,
    .max_header_bytes = 1024,
    .max_headers = 16,
};

/* Large structures live here, not on Criterion's stack. */
static tg_http_hdr req_hdr[TG_HTTP_MAX_HEADERS];
static tg_http_req req = { .hdr = req_hdr };
static tg_http_resp resp;

static tg_rc
preq(const char *s)
{
    return tg_http_parse_request(s, strlen(s), &lim, &req);
}

static tg_rc
presp(const char *s, int is_head)
{
    return tg_http_parse_response(s, strlen(s), &lim, is_head, &resp);
}

/* Assert that s is rejected with `status`. */
#define REJECT(s, st)                                                        \
    do {                                                                     \
        tg_rc rc_ = preq(s);                                                 \
        cr_assert_eq(rc_, TG_ERR, "expected TG_ERR for %s, got %d", #s, rc_); \
        cr_assert_eq(req.status, (st), "status %d != %d for %s (%s)",        \
                     req.status, (st), #s, req.error);                       \
        cr_assert_not_null(req.error);                                       \
    } while (0)

#define ACCEPT(s)                                                            \
    do {                                                                     \
        tg_rc rc_ = preq(s);                                                 \
        cr_assert_eq(rc_, TG_OK, "expected TG_OK for %s, got %d (%d %s)",    \
                     #s, rc_, req.status, req.error ? req.error : "");       \
    } while (0)

#define RESP_ERR(s, head)                                                    \
    do {                                                                     \
        cr_assert_eq(presp(s, head), TG_ERR, "expected TG_ERR for %s", #s);  \
        cr_assert_not_null(resp.error);                                      \
    } while (0)

#define RESP_OK(s, head)                                                     \
    do {                                                                     \
        tg_rc rc_ = presp(s, head);                                          \
        cr_assert_eq(rc_, TG_OK, "expected TG_OK for %s, got %d (%s)", #s,   \
                     rc_, resp.error ? resp.error : "");                     \
    } while (0)

static int
span_is(const char *p, size_t n, const char *lit)
{
    return p != NULL && n == strlen(lit) && memcmp(p, lit, n) == 0;
}

/* ------------------------------------------------------------------ */
/* Requests: basics                                                    */
/* ------------------------------------------------------------------ */

Test(http_req, simple_get)
{
    const char *s = "GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\n"
                    "X-Api-Key:  secret \t\r\n\r\n";

    ACCEPT(s);
    cr_assert(span_is(req.method, req.method_len, "GET"));
    cr_assert(span_is(req.target, req.target_len, "/a/b?c=d"));
    cr_assert(span_is(req.path, req.path_len, "/a/b?c=d"));
    cr_assert(span_is(req.host, req.host_len, "example.com"));
    cr_assert_eq(req.minor, 1);
    cr_assert_eq(req.is_head, 0);
    cr_assert_eq(req.nhdr, 2);
    cr_assert(span_is(req.hdr[1].name, req.hdr[1].name_len, "X-Api-Key"));
    cr_assert(span_is(req.hdr[1].value, req.hdr[1].value_len, "secret"));
    cr_assert_eq(req.body, TG_BODY_NONE);
    cr_assert_eq(req.keep_alive, 1);
    cr_assert_eq(req.expect_continue, 0);
    cr_assert_eq(req.head_len, strlen(s));
    cr_assert_eq(req.status, 0);
}

Test(http_req, empty_value_and_inner_spaces)
{
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\nX-E:\r\nX-F: a  b\tc \r\n\r\n");
    cr_assert_eq(req.hdr[1].value_len, 0);
    cr_assert(span_is(req.hdr[2].value, req.hdr[2].value_len, "a  b\tc"));
}

Test(http_req, obs_text_in_value)
{
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\nX-U: caf\xc3\xa9\r\n\r\n");
    cr_assert_eq(req.hdr[1].value_len, 5);
}

Test(http_req, pipelined_head_len)
{
    const char *s = "GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n";

    ACCEPT(s);
    cr_assert_eq(req.head_len, strlen(s) / 2);
    cr_assert_eq(tg_http_parse_request(s + req.head_len, strlen(s) / 2, &lim, &req), TG_OK);
    cr_assert(span_is(req.path, req.path_len, "/2"));
}

Test(http_req, every_prefix_is_again)
{
    const char *s = "\r\nPOST /upload HTTP/1.1\r\nHost: h:8080\r\n"
                    "Content-Length: 5\r\nConnection: close\r\n\r\nhello";
    size_t head = strlen(s) - 5, n;

    for (n = 0; n < head; n++) {
        cr_assert_eq(tg_http_parse_request(s, n, &lim, &req), TG_AGAIN,
                     "prefix %zu", n);
    }
    for (n = head; n <= strlen(s); n++) {
        cr_assert_eq(tg_http_parse_request(s, n, &lim, &req), TG_OK);
        cr_assert_eq(req.head_len, head);
        cr_assert_eq(req.body, TG_BODY_LENGTH);
        cr_assert_eq(req.content_length, 5);
        cr_assert_eq(req.keep_alive, 0);
    }
}

Test(http_req, errors_found_before_head_ends)
{
    /* Partial heads that already prove an error do not wait for more. */
    REJECT("GET / HTTP/1.1\r\nHost: h\r\nX: a\nY", 400);
    REJECT("GET / HTTP/1.1\r\nX\x01", 400);
    REJECT("GET / HTTP/2.0\r\n", 505);
    REJECT("CONNECT h:443 HTTP/1.1\r\n", 501);
    REJECT("GET / HTTP/1.1\r\n Folded", 400);
}

/* ------------------------------------------------------------------ */
/* Requests: line endings and control bytes                            */
/* ------------------------------------------------------------------ */

Test(http_req, bare_cr)
{
    REJECT("GET / HTTP/1.1\rHost: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\nHost: h\r\n\rX", 400);
    REJECT("GET /\r HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("\rGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
}

Test(http_req, bare_lf)
{
    REJECT("GET / HTTP/1.1\nHost: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\nHost: h\r\n\n", 400);
    REJECT("\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\nHo\nst: h\r\n\r\n", 400);
}

Test(http_req, control_bytes)
{
#define LIT(x) { x, sizeof(x) - 1 }     /* some contain NUL */
    static const struct { const char *s; size_t len; } bad[] = {
        LIT("GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n"),
        LIT("GET / HTTP/1.1\r\nHost: h\r\nX: a\x7f\r\n\r\n"),
        LIT("GET / HTTP/1.1\r\nHost: h\r\nX: a\x1b\r\n\r\n"),
        LIT("GET / HTTP/1.1\r\nHost: h\r\nX\0: a\r\n\r\n"),
        LIT("GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n"),
        LIT("GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n"),
        LIT("GET / HTTP/1.1\r\nHost: h\x0b\r\n\r\n"),
        LIT("\0GET / HTTP/1.1\r\nHost: h\r\n\r\n"),
        LIT("GET / HTTP/1.1\r\nHost: h\r\nX: \x80\x7f\r\n\r\n"),
    };
#undef LIT
    size_t i;

    for (i = 0; i < TG_ARRAY_LEN(bad); i++) {
        cr_assert_eq(tg_http_parse_request(bad[i].s, bad[i].len, &lim, &req),
                     TG_ERR, "case %zu", i);
        cr_assert_eq(req.status, 400, "case %zu", i);
    }
    /* HTAB is fine inside a field value */
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\nX: a\tb\r\n\r\n");
}

Test(http_req, leading_empty_lines)
{
    const char *s = "\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";

    ACCEPT(s);
    cr_assert_eq(req.head_len, strlen(s));
    cr_assert(span_is(req.method, req.method_len, "GET"));
    REJECT("\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    cr_assert_eq(preq("\r\n\r\n"), TG_AGAIN);
}

/* ------------------------------------------------------------------ */
/* Requests: request line                                              */
/* ------------------------------------------------------------------ */

Test(http_req, request_line_spaces)
{
    REJECT("GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET /  HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT(" GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400);
    REJECT("GET /\r\nHost: h\r\n\r\n", 400);
    REJECT("GET / / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET\r\nHost: h\r\n\r\n", 400);
}

Test(http_req, method_token)
{
    REJECT("G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GE\xc3\x89T / HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    ACCEPT("PURGE-X / HTTP/1.1\r\nHost: h\r\n\r\n");
    cr_assert(span_is(req.method, req.method_len, "PURGE-X"));
}

Test(http_req, is_head_case_sensitive)
{
    ACCEPT("HEAD / HTTP/1.1\r\nHost: h\r\n\r\n");
    cr_assert_eq(req.is_head, 1);
    ACCEPT("head / HTTP/1.1\r\nHost: h\r\n\r\n");
    cr_assert_eq(req.is_head, 0);
    ACCEPT("HEADER / HTTP/1.1\r\nHost: h\r\n\r\n");
    cr_assert_eq(req.is_head, 0);
}

Test(http_req, version)
{
    ACCEPT("GET / HTTP/1.0\r\n\r\n");
    cr_assert_eq(req.minor, 0);
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    cr_assert_eq(req.minor, 1);
    ACCEPT("GET / HTTP/1.2\r\nHost: h\r\n\r\n");
    cr_assert_eq(req.minor, 1);
    ACCEPT("GET / HTTP/1.9\r\nHost: h\r\n\r\n");
    cr_assert_eq(req.minor, 1);
    REJECT("GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505);
    REJECT("GET / HTTP/0.9\r\nHost: h\r\n\r\n", 505);
    REJECT("GET / HTTP/3.0\r\nHost: h\r\n\r\n", 505);
    REJECT("GET / http/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1.10\r\nHost: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1.x\r\nHost: h\r\n\r\n", 400);
    REJECT("GET / HTTP/11.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET / HTTPS/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1,1\r\nHost: h\r\n\r\n", 400);
}

Test(http_req, target_chars)
{
    REJECT("GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET /a\x7f HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    ACCEPT("GET /a%20b~!$&'()*+,;=:@[]{}|^`\"<> HTTP/1.1\r\nHost: h\r\n\r\n");
}

Test(http_req, absolute_form)
{
    ACCEPT("GET http://api.example.com:8080/v1/x?y=1 HTTP/1.1\r\nHost: other\r\n\r\n");
    cr_assert(span_is(req.host, req.host_len, "api.example.com:8080"));
    cr_assert(span_is(req.path, req.path_len, "/v1/x?y=1"));
    cr_assert(span_is(req.target, req.target_len, "http://api.example.com:8080/v1/x?y=1"));

    ACCEPT("GET HTTPS://Example.COM HTTP/1.1\r\nHost: x\r\n\r\n");
    cr_assert(span_is(req.host, req.host_len, "Example.COM"));
    cr_assert(span_is(req.path, req.path_len, "/"));

    ACCEPT("GET hTtP://[::1]:80/ HTTP/1.1\r\nHost: x\r\n\r\n");
    cr_assert(span_is(req.host, req.host_len, "[::1]:80"));
    cr_assert(span_is(req.path, req.path_len, "/"));

    /* 1.0 without Host: the authority is the host */
    ACCEPT("GET http://h1/p HTTP/1.0\r\n\r\n");
    cr_assert(span_is(req.host, req.host_len, "h1"));
}

Test(http_req, absolute_form_rejects)
{
    REJECT("GET http://h/p HTTP/1.1\r\n\r\n", 400);               /* Host still required */
    REJECT("GET http://h/p HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400);
    REJECT("GET http:///p HTTP/1.1\r\nHost: h\r\n\r\n", 400);      /* empty authority */
    REJECT("GET http://u:p@h/p HTTP/1.1\r\nHost: h\r\n\r\n", 400); /* userinfo */
    REJECT("GET http://h:99999/ HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET http://h?q HTTP/1.1\r\nHost: h\r\n\r\n", 400);     /* no path */
    REJECT("GET ftp://h/p HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET http:/h/p HTTP/1.1\r\nHost: h\r\n\r\n", 400);
}

Test(http_req, asterisk_form)
{
    ACCEPT("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
    cr_assert(span_is(req.path, req.path_len, "*"));
    REJECT("GET * HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("OPTIONS *x HTTP/1.1\r\nHost: h\r\n\r\n", 400);
}

Test(http_req, connect_and_authority_form)
{
    REJECT("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501);
    REJECT("CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n", 501);
    REJECT("GET example.com:443 HTTP/1.1\r\nHost: h\r\n\r\n", 400);
    REJECT("GET a/b HTTP/1.1\r\nHost: h\r\n\r\n", 400);
}

/* ------------------------------------------------------------------ */
/* Requests: limits                                                    */
/* ------------------------------------------------------------------ */

/* A request whose line is exactly `line` bytes (CRLF excluded) and whose
 * head is padded with one X-Pad field to exactly `head` bytes (0: none). */
static char *
make_req(size_t line, size_t head)
{
    char *s = malloc(line + head + 64);
    size_t n, tlen = line - strlen("GET  HTTP/1.1");

    n = (size_t) sprintf(s, "GET /");
    memset(s + n, 'a', tlen - 1);
    n += tlen - 1;
    n += (size_t) sprintf(s + n, " HTTP/1.1\r\nHost: h\r\n");
    if (head) {
        size_t pad = head - n - strlen("X-Pad: \r\n\r\n");
        n += (size_t) sprintf(s + n, "X-Pad: ");
        memset(s + n, 'p', pad);
        n += pad;
    }
    sprintf(s + n, "%s\r\n", head ? "\r\n" : "");
    return s;
}

Test(http_req, request_line_limit)
{
    char *s = make_req(256, 0);

    ACCEPT(s);
    free(s);
    s = make_req(257, 0);
    REJECT(s, 414);
    /* early: no CRLF within max_request_line + 1 bytes */
    s[257] = '\0';
    REJECT(s, 414);
    s[256] = '\0';
    cr_assert_eq(preq(s), TG_AGAIN);
    free(s);
}

Test(http_req, request_line_limit_at_exact_length_waits)
{
    char *s = make_req(256, 0);

    s[257] = '\0';   /* request line complete, CR present, LF not yet */
    cr_assert_eq(preq(s), TG_AGAIN);
    free(s);
}

Test(http_req, head_bytes_limit)
{
    char *s = make_req(40, 1024);

    cr_assert_eq(strlen(s), 1024);
    ACCEPT(s);
    cr_assert_eq(req.head_len, 1024);
    free(s);
    s = make_req(40, 1025);
    REJECT(s, 431);
    /* early: 1024 bytes buffered and the head has not ended */
    s[1024] = '\0';
    REJECT(s, 431);
    s[1023] = '\0';
    cr_assert_eq(preq(s), TG_AGAIN);
    free(s);
}

Test(http_req, header_count_limit)
{
    char buf[2048];
    size_t n, i;

    n = (size_t) sprintf(buf, "GET / HTTP/1.1\r\nHost: h\r\n");
    for (i = 1; i < 16; i++) {
        n += (size_t) sprintf(buf + n, "X-%zu: v\r\n", i);
    }
    strcpy(buf + n, "\r\n");
    ACCEPT(buf);
    cr_assert_eq(req.nhdr, 16);

    n += (size_t) sprintf(buf + n, "X-Last: v\r\n");
    strcpy(buf + n, "\r\n");
    REJECT(buf, 431);
    /* early: the 17th line has only begun */
    buf[n - 9] = '\0';
    REJECT(buf, 431);
}

Test(http_req, limits_count_empty_lines)
{
    /* 18-byte head + 1000 of CRLFs would not fit; 4 CRLFs count too */
    const tg_http_limits tight = { 64, 30, 4 };
    const char *ok = "GET / HTTP/1.1\r\nHost: h\r\n\r\n";       /* 27 bytes */
    const char *bad = "\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n"; /* 31 bytes */

    cr_assert_eq(tg_http_parse_request(ok, strlen(ok), &tight, &req), TG_OK);
    cr_assert_eq(tg_http_parse_request(bad, strlen(bad), &tight, &req), TG_ERR);
    cr_assert_eq(req.status, 431);
}

/* ------------------------------------------------------------------ */
/* Requests: header field syntax                                       */
/* ------------------------------------------------------------------ */

Test(http_req, field_syntax)
{
    REJECT("GET / HTTP/1.1\r\nHost : h\r\n\r\n", 400);            /* ws before colon */
    REJECT("GET / HTTP/1.1\r\nHost\t: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400); /* obs-fold */
    REJECT("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\n Host: h\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", 400);  /* missing colon */
    REJECT("GET / HTTP/1.1\r\nHost: h\r\n: v\r\n\r\n", 400);      /* empty name */
    REJECT("GET / HTTP/1.1\r\nHost: h\r\nX(Y): v\r\n\r\n", 400);  /* non-token name */
    REJECT("GET / HTTP/1.1\r\nHost: h\r\nX\xc3\xa9: v\r\n\r\n", 400);
}

/* ------------------------------------------------------------------ */
/* Requests: Host                                                      */
/* ------------------------------------------------------------------ */

Test(http_req, host_presence)
{
    REJECT("GET / HTTP/1.1\r\n\r\n", 400);
    REJECT("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400);
    REJECT("GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n", 400);
    ACCEPT("GET / HTTP/1.0\r\n\r\n");
    cr_assert_null(req.host);
    cr_assert_eq(req.host_len, 0);
    ACCEPT("GET / HTTP/1.0\r\nHOST: a.b\r\n\r\n");
    cr_assert(span_is(req.host, req.host_len, "a.b"));
}

Test(http_req, host_values)
{
    static const char *good[] = {
        "example.com", "example.com:8080", "1.2.3.4", "1.2.3.4:1",
        "[::1]", "[2001:db8::1]:443", "[::ffff:1.2.3.4]", "a-b_c~d.e",
        "ex%41mple", "h:65535", "h:00080", "sub!$&'()*+,;=",
    };
    static const char *bad[] = {
        "", "a b", "h:", ":80", "h:65536", "h:123456", "h:8a", "h:-1",
        "[::1", "[]", "[v1.x]", "[::g]", "[1.2.3.4]", "u@h", "h/p", "ex%4",
        "ex%zzmple", "h:80:80", "[::1]x", "h\"", "h?",
    };
    char buf[256];
    size_t i;

    for (i = 0; i < TG_ARRAY_LEN(good); i++) {
        snprintf(buf, sizeof(buf), "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", good[i]);
        cr_assert_eq(preq(buf), TG_OK, "Host: %s", good[i]);
        cr_assert(span_is(req.host, req.host_len, good[i]));
    }
    for (i = 0; i < TG_ARRAY_LEN(bad); i++) {
        snprintf(buf, sizeof(buf), "GET / HTTP/1.1\r\nHost: %s\r\n\r\n", bad[i]);
        cr_assert_eq(preq(buf), TG_ERR, "Host: %s", bad[i]);
        cr_assert_eq(req.status, 400, "Host: %s", bad[i]);
    }
}

/* ------------------------------------------------------------------ */
/* Requests: Content-Length and Transfer-Encoding                      */
/* ------------------------------------------------------------------ */

Test(http_req, content_length_valid)
{
    ACCEPT("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 42\r\n\r\n");
    cr_assert_eq(req.body, TG_BODY_LENGTH);
    cr_assert_eq(req.content_length, 42);
    ACCEPT("POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 007\r\n\r\n");
    cr_assert_eq(req.content_length, 7);
    ACCEPT("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4611686018427387904\r\n\r\n");
    cr_assert_eq(req.content_length, (uint64_t) 1 << 62);
    ACCEPT("POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\n");
    cr_assert_eq(req.body, TG_BODY_LENGTH);
}

Test(http_req, content_length_zero_is_none)
{
    ACCEPT("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n");
    cr_assert_eq(req.body, TG_BODY_NONE);
    cr_assert_eq(req.content_length, 0);
}

Test(http_req, content_length_invalid)
{
    static const char *bad[] = {
        "+5", "-1", "5 5", "5,5", "5, 5", "0x10", "", "1e3", "5;", "٣",
        "00000000000000000001",            /* 20 digits */
        "4611686018427387905",             /* 2^62 + 1 */
        "99999999999999999999",
    };
    char buf[256];
    size_t i;

    for (i = 0; i < TG_ARRAY_LEN(bad); i++) {
        snprintf(buf, sizeof(buf),
                 "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %s\r\n\r\n", bad[i]);
        cr_assert_eq(preq(buf), TG_ERR, "CL %s", bad[i]);
        cr_assert_eq(req.status, 400, "CL %s", bad[i]);
    }
}

Test(http_req, content_length_multiple)
{
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400);
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400);
}

Test(http_req, transfer_encoding_chunked)
{
    ACCEPT("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
    cr_assert_eq(req.body, TG_BODY_CHUNKED);
    ACCEPT("POST / HTTP/1.1\r\nHost: h\r\ntransfer-encoding: ChUnKeD\r\n\r\n");
    cr_assert_eq(req.body, TG_BODY_CHUNKED);
}

Test(http_req, transfer_encoding_codings)
{
#define TE(v) "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: " v "\r\n\r\n"
    REJECT(TE("gzip, chunked"), 501);
    REJECT(TE("gzip ,\t chunked"), 501);
    REJECT(TE("foo,chunked"), 501);
    REJECT(TE("identity, chunked"), 501);
    REJECT(TE("chunked, gzip"), 400);
    REJECT(TE("gzip"), 400);
    REJECT(TE("chunked, chunked"), 400);
    REJECT(TE("chunked,"), 400);
    REJECT(TE(", chunked"), 400);
    REJECT(TE("gzip,,chunked"), 400);
    REJECT(TE(""), 400);
    REJECT(TE("chunked;q=1"), 400);
    REJECT(TE("gzip;level=1, chunked"), 400);
    REJECT(TE("\"chunked\""), 400);
    REJECT(TE("chunked x"), 400);
#undef TE
}

Test(http_req, transfer_encoding_several_fields)
{
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n"
           "Transfer-Encoding: chunked\r\n\r\n", 501);
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
           "Transfer-Encoding: chunked\r\n\r\n", 400);
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
           "Transfer-Encoding: gzip\r\n\r\n", 400);
}

Test(http_req, transfer_encoding_http10)
{
    REJECT("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400);
}

Test(http_req, te_with_content_length)
{
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
           "Transfer-Encoding: chunked\r\n\r\n", 400);
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
           "Content-Length: 0\r\n\r\n", 400);
}

/* ------------------------------------------------------------------ */
/* Requests: Connection and Expect                                     */
/* ------------------------------------------------------------------ */

Test(http_req, keep_alive_http11)
{
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    cr_assert_eq(req.keep_alive, 1);
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
    cr_assert_eq(req.keep_alive, 0);
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\nConnection: X-Foo, CLOSE\r\n\r\n");
    cr_assert_eq(req.keep_alive, 0);
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n");
    cr_assert_eq(req.keep_alive, 0);
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\nConnection: closed\r\n\r\n");
    cr_assert_eq(req.keep_alive, 1);
}

Test(http_req, keep_alive_http10)
{
    ACCEPT("GET / HTTP/1.0\r\n\r\n");
    cr_assert_eq(req.keep_alive, 0);
    ACCEPT("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
    cr_assert_eq(req.keep_alive, 1);
    ACCEPT("GET / HTTP/1.0\r\nConnection: te , keep-alive\r\n\r\n");
    cr_assert_eq(req.keep_alive, 1);
    ACCEPT("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n");
    cr_assert_eq(req.keep_alive, 0);
}

Test(http_req, expect)
{
    ACCEPT("POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
    cr_assert_eq(req.expect_continue, 1);
    ACCEPT("POST / HTTP/1.1\r\nHost: h\r\nexpect: 100-Continue\r\n\r\n");
    cr_assert_eq(req.expect_continue, 1);
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nExpect: 200-ok\r\n\r\n", 417);
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue, foo\r\n\r\n", 417);
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nExpect:\r\n\r\n", 417);
    /* ignored in HTTP/1.0 */
    ACCEPT("POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n");
    cr_assert_eq(req.expect_continue, 0);
    ACCEPT("POST / HTTP/1.0\r\nExpect: whatever\r\n\r\n");
    cr_assert_eq(req.expect_continue, 0);
}

Test(http_req, framing_errors_before_expect)
{
    /* the body must be delimited before a 417 is answered */
    REJECT("POST / HTTP/1.1\r\nHost: h\r\nExpect: x\r\nContent-Length: 1\r\n"
           "Content-Length: 1\r\n\r\n", 400);
}

/* ------------------------------------------------------------------ */
/* Responses                                                           */
/* ------------------------------------------------------------------ */

Test(http_resp, content_length)
{
    const char *s = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX: y\r\n\r\nhello world!";

    RESP_OK(s, 0);
    cr_assert_eq(resp.minor, 1);
    cr_assert_eq(resp.status, 200);
    cr_assert(span_is(resp.reason, resp.reason_len, "OK"));
    cr_assert_eq(resp.nhdr, 2);
    cr_assert_eq(resp.body, TG_BODY_LENGTH);
    cr_assert_eq(resp.content_length, 12);
    cr_assert_eq(resp.keep_alive, 1);
    cr_assert_eq(resp.head_len, strlen(s) - 12);
}

Test(http_resp, reason_forms)
{
    RESP_OK("HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n", 0);
    cr_assert_eq(resp.status, 404);
    cr_assert_eq(resp.reason_len, 0);
    RESP_OK("HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n", 0);
    cr_assert_eq(resp.reason_len, 0);
    RESP_OK("HTTP/1.1 500 Internal\tServer \xe9rror\r\nContent-Length: 0\r\n\r\n", 0);
    cr_assert(span_is(resp.reason, resp.reason_len, "Internal\tServer \xe9rror"));
    cr_assert_eq(resp.body, TG_BODY_NONE);
    RESP_OK("HTTP/1.1 599 Odd\r\nContent-Length: 0\r\n\r\n", 0);
    cr_assert_eq(resp.status, 599);
}

Test(http_resp, status_out_of_range)
{
    /* RFC 9110 15: only 100..599 */
    RESP_ERR("HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n", 0);
}

Test(http_resp, not_a_status_line_fails_at_once)
{
    /* no CRLF yet, but these bytes can never begin a status line */
    RESP_ERR("hello", 0);
    RESP_ERR("HTTP/2", 0);
    RESP_ERR("x", 0);
}

Test(http_resp, interim_with_body)
{
    RESP_ERR("HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\nhello", 0);
    RESP_ERR("HTTP/1.1 103 Early\r\nTransfer-Encoding: chunked\r\n\r\n", 0);
    RESP_OK("HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n", 0);
}

Test(http_resp, bad_status_line)
{
    RESP_ERR("HTTP/1.1 20 OK\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 2000 OK\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 099 Low\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1  200 OK\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 2x0 OK\r\n\r\n", 0);
    RESP_ERR("HTTP/2.0 200 OK\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", 0);
    RESP_ERR("http/1.1 200 OK\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 O\x01K\r\n\r\n", 0);
    RESP_ERR("\r\nHTTP/1.1 200 OK\r\n\r\n", 0);
}

Test(http_resp, header_errors)
{
    RESP_ERR("HTTP/1.1 200 OK\r\nX : y\r\nContent-Length: 0\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nX: y\r\n z\r\nContent-Length: 0\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nX: y\rContent-Length: 0\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\n", 0);
}

Test(http_resp, head_request_no_body)
{
    RESP_OK("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", 1);
    cr_assert_eq(resp.body, TG_BODY_NONE);
    cr_assert_eq(resp.content_length, 1234);   /* kept for forwarding */
    cr_assert_eq(resp.keep_alive, 1);
    RESP_OK("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 1);
    cr_assert_eq(resp.body, TG_BODY_NONE);
    RESP_OK("HTTP/1.1 200 OK\r\n\r\n", 1);
    cr_assert_eq(resp.body, TG_BODY_NONE);
    cr_assert_eq(resp.keep_alive, 1);
}

Test(http_resp, no_body_statuses)
{
    RESP_OK("HTTP/1.1 204 No Content\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_NONE);
    cr_assert_eq(resp.keep_alive, 1);
    RESP_OK("HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_NONE);
    RESP_OK("HTTP/1.1 100 Continue\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_NONE);
    cr_assert_eq(resp.status, 100);
    RESP_OK("HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_NONE);
}

Test(http_resp, chunked)
{
    RESP_OK("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_CHUNKED);
    cr_assert_eq(resp.keep_alive, 1);
    RESP_OK("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_CHUNKED);
    cr_assert_eq(resp.keep_alive, 0);
}

Test(http_resp, transfer_encoding_errors)
{
    RESP_ERR("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked;x=1\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nTransfer-Encoding: ,chunked\r\n\r\n", 0);
    RESP_ERR("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0);
}

Test(http_resp, non_chunked_coding_refused)
{
    /* it is stripped (hop-by-hop) and could not be decoded: 502 */
    RESP_ERR("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n", 0);
}

Test(http_resp, close_delimited)
{
    RESP_OK("HTTP/1.1 200 OK\r\nX: y\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_CLOSE);
    cr_assert_eq(resp.keep_alive, 0);
    RESP_OK("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_CLOSE);
    cr_assert_eq(resp.keep_alive, 0);
}

Test(http_resp, content_length_rules)
{
    RESP_OK("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_LENGTH);
    cr_assert_eq(resp.content_length, 5);
    RESP_ERR("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", 0);
    RESP_ERR("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", 0);
    RESP_OK("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0);
    cr_assert_eq(resp.body, TG_BODY_NONE);
    cr_assert_eq(resp.keep_alive, 1);
}

Test(http_resp, keep_alive)
{
    RESP_OK("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", 0);
    cr_assert_eq(resp.minor, 0);
    cr_assert_eq(resp.keep_alive, 0);
    RESP_OK("HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n", 0);
    cr_assert_eq(resp.keep_alive, 1);
    RESP_OK("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n", 0);
    cr_assert_eq(resp.keep_alive, 0);
}

Test(http_resp, incremental_and_limits)
{
    const char *s = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc";
    size_t head = strlen(s) - 3, n;
    char big[2048];

    for (n = 0; n < head; n++) {
        cr_assert_eq(tg_http_parse_response(s, n, &lim, 0, &resp), TG_AGAIN, "prefix %zu", n);
    }
    RESP_OK(s, 0);
    cr_assert_eq(resp.head_len, head);

    /* status line over max_request_line, early */
    memcpy(big, "HTTP/1.1 200 ", 13);
    memset(big + 13, 'r', 300);
    big[313] = '\0';
    RESP_ERR(big, 0);
    /* head over max_header_bytes, early */
    memcpy(big, "HTTP/1.1 200 OK\r\nX: ", 20);
    memset(big + 20, 'v', 1100);
    big[1120] = '\0';
    RESP_ERR(big, 0);
    big[1000] = '\0';
    cr_assert_eq(presp(big, 0), TG_AGAIN);
}

/* ------------------------------------------------------------------ */
/* Chunked decoder                                                     */
/* ------------------------------------------------------------------ */

typedef struct sink {
    char   data[4096];
    size_t len;
    size_t calls;
} sink;

static void
sink_cb(void *arg, const char *data, size_t len)
{
    sink *s = arg;

    cr_assert(len > 0);
    cr_assert(s->len + len <= sizeof(s->data));
    memcpy(s->data + s->len, data, len);
    s->len += len;
    s->calls++;
}

/* Decode in[0..len) fed in pieces of at most `step` bytes, the first piece
 * being `first` bytes.  Returns the total consumed, or -1. */
static ssize_t
decode_pieces(const char *in, size_t len, size_t first, size_t step, sink *out,
              tg_chunked *c)
{
    size_t off = 0, n;
    ssize_t r;

    tg_chunked_init(c);
    memset(out, 0, sizeof(*out));
    while (off < len) {
        n = off == 0 && first > 0 ? first : step;
        if (n > len - off) {
            n = len - off;
        }
        r = tg_chunked_decode(c, in + off, n, sink_cb, out);
        if (r < 0) {
            return -1;
        }
        cr_assert((size_t) r <= n);
        off += (size_t) r;
        if (c->done) {
            return (ssize_t) off;
        }
        cr_assert_eq((size_t) r, n, "consumed less without done");
    }
    return (ssize_t) off;
}

static const char chunk_sample[] =
    "5\r\nhello\r\n"
    "1;ext=val;flag\r\n,\r\n"
    "A ; q=\"a \\\"quoted\\\" \\\\ \" ; r = s\r\n world 123\r\n"
    "0000000000000003\r\n!!!\r\n"
    "0\r\nX-Trailer: yes\r\nX-Other:\t v \r\n\r\n"
    "GET /next HTTP/1.1\r\n";

static const char chunk_payload[] = "hello, world 123!!!";

Test(http_chunked, whole)
{
    tg_chunked c;
    sink out;
    size_t msg = strlen(chunk_sample) - strlen("GET /next HTTP/1.1\r\n");
    ssize_t r = decode_pieces(chunk_sample, strlen(chunk_sample), 0,
                              strlen(chunk_sample), &out, &c);

    cr_assert_eq(r, (ssize_t) msg, "consumed %zd (%s)", r, c.error ? c.error : "");
    cr_assert_eq(c.done, 1);
    cr_assert_eq(out.len, strlen(chunk_payload));
    cr_assert(memcmp(out.data, chunk_payload, out.len) == 0);
    /* further input belongs to the next message */
    cr_assert_eq(tg_chunked_decode(&c, "x", 1, sink_cb, &out), 0);
}

Test(http_chunked, split_at_every_position)
{
    tg_chunked c;
    sink out;
    size_t len = strlen(chunk_sample);
    size_t msg = len - strlen("GET /next HTTP/1.1\r\n");
    size_t k;

    for (k = 1; k < len; k++) {
        ssize_t r = decode_pieces(chunk_sample, len, k, len, &out, &c);
        cr_assert_eq(r, (ssize_t) msg, "split %zu", k);
        cr_assert_eq(out.len, strlen(chunk_payload), "split %zu", k);
        cr_assert(memcmp(out.data, chunk_payload, out.len) == 0, "split %zu", k);
    }
}

Test(http_chunked, one_byte_at_a_time)
{
    tg_chunked c;
    sink out;
    size_t len = strlen(chunk_sample);
    ssize_t r = decode_pieces(chunk_sample, len, 0, 1, &out, &c);

    cr_assert_eq(r, (ssize_t) (len - strlen("GET /next HTTP/1.1\r\n")));
    cr_assert_eq(out.len, strlen(chunk_payload));
    cr_assert(memcmp(out.data, chunk_payload, out.len) == 0);
}

Test(http_chunked, data_pointers_into_input)
{
    tg_chunked c;
    sink out = { .len = 0 };
    const char *in = "3\r\nabc\r\n0\r\n\r\n";

    tg_chunked_init(&c);
    cr_assert_eq(tg_chunked_decode(&c, in, strlen(in), sink_cb, &out), (ssize_t) strlen(in));
    cr_assert_eq(out.calls, 1);
    /* a NULL callback just skips data */
    tg_chunked_init(&c);
    cr_assert_eq(tg_chunked_decode(&c, in, strlen(in), NULL, NULL), (ssize_t) strlen(in));
    cr_assert_eq(c.done, 1);
}

Test(http_chunked, empty_body_and_uppercase_hex)
{
    tg_chunked c;
    sink out;

    cr_assert_eq(decode_pieces("0\r\n\r\n", 5, 0, 5, &out, &c), 5);
    cr_assert_eq(out.len, 0);
    cr_assert_eq(decode_pieces("a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n",
                               35, 0, 3, &out, &c), 35);
    cr_assert_eq(out.len, 20);
}

static void
chunk_reject(const char *in, size_t len)
{
    size_t step;
    tg_chunked c;
    sink out;

    for (step = 1; step <= len; step++) {
        cr_assert_eq(decode_pieces(in, len, 0, step, &out, &c), -1,
                     "accepted %s (step %zu)", in, step);
        cr_assert_not_null(c.error);
        cr_assert_eq(tg_chunked_decode(&c, "0\r\n\r\n", 5, sink_cb, &out), -1);
    }
}

#define CHUNK_REJECT(lit) chunk_reject(lit, sizeof(lit) - 1)

Test(http_chunked, size_syntax_errors)
{
    CHUNK_REJECT("5 \r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT(" 5\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("0x5\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("-5\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("5\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("5\rhello\r\n0\r\n\r\n");
    CHUNK_REJECT("g\r\n");
    CHUNK_REJECT("5\t\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("0\n\r\n");
}

Test(http_chunked, size_overflow)
{
    tg_chunked c;
    sink out = { .len = 0 };

    CHUNK_REJECT("00000000000000001\r\n");              /* 17 digits */
    CHUNK_REJECT("10000000000000000\r\n");
    /* 16 digits is the maximum and fine */
    tg_chunked_init(&c);
    cr_assert_eq(tg_chunked_decode(&c, "ffffffffffffffff\r\nab", 20, sink_cb, &out), 20);
    cr_assert_eq(c.done, 0);
}

Test(http_chunked, extension_errors)
{
    CHUNK_REJECT("5;\r\nhello\r\n0\r\n\r\n");             /* empty name */
    CHUNK_REJECT("5;a=\r\nhello\r\n0\r\n\r\n");           /* empty value */
    CHUNK_REJECT("5;a=\"x\r\nhello\r\n0\r\n\r\n");        /* open quote */
    CHUNK_REJECT("5;a b\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("5;a=b c\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("5;a=\"x\"y\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("5;a=b \r\nhello\r\n0\r\n\r\n");         /* trailing BWS */
    CHUNK_REJECT("5;a@b\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("5;a=\"\x01\"\r\nhello\r\n0\r\n\r\n");
    CHUNK_REJECT("5;a\nhello\r\n0\r\n\r\n");
}

Test(http_chunked, extension_forms)
{
    tg_chunked c;
    sink out;
    const char *in = "5 ;a;b=c ; d = \"e\\\"f\" ;g\r\nhello\r\n0;last\r\n\r\n";

    cr_assert_eq(decode_pieces(in, strlen(in), 0, 1, &out, &c), (ssize_t) strlen(in));
    cr_assert_eq(out.len, 5);
}

Test(http_chunked, size_line_bound)
{
    char *in = malloc(5000);
    size_t n;
    tg_chunked c;
    sink out;

    /* 4096 bytes of size line is fine */
    n = (size_t) sprintf(in, "5;x=");
    memset(in + n, 'v', 4096 - n);
    memcpy(in + 4096, "\r\nhello\r\n0\r\n\r\n", 14);
    cr_assert_eq(decode_pieces(in, 4110, 0, 100, &out, &c), 4110);
    /* 4097 is not, and is refused before the CR arrives */
    memset(in + n, 'v', 4097 - n);
    tg_chunked_init(&c);
    cr_assert_eq(tg_chunked_decode(&c, in, 4097, sink_cb, &out), -1);
    free(in);
}

Test(http_chunked, data_crlf)
{
    CHUNK_REJECT("5\r\nhelloX\r\n0\r\n\r\n");
    CHUNK_REJECT("5\r\nhello\n0\r\n\r\n");
    CHUNK_REJECT("5\r\nhello\rX0\r\n\r\n");
    CHUNK_REJECT("5\r\nhello world\r\n0\r\n\r\n");
}

Test(http_chunked, trailers)
{
    tg_chunked c;
    sink out;
    const char *in = "0\r\nA: 1\r\nB-2:x y\r\nC:\r\n\r\nrest";

    cr_assert_eq(decode_pieces(in, strlen(in), 0, 2, &out, &c), (ssize_t) strlen(in) - 4);
    CHUNK_REJECT("0\r\nA: 1\r\n folded\r\n\r\n");
    CHUNK_REJECT("0\r\nA : 1\r\n\r\n");
    CHUNK_REJECT("0\r\nNoColon\r\n\r\n");
    CHUNK_REJECT("0\r\n: v\r\n\r\n");
    CHUNK_REJECT("0\r\nA: 1\n\r\n");
    CHUNK_REJECT("0\r\nA: 1\r\n\n");
    CHUNK_REJECT("0\r\nA: \x01\r\n\r\n");
    CHUNK_REJECT("0\r\n\rX");
}

Test(http_chunked, trailer_bound)
{
    size_t cap = 20000, n, k;
    char *in = malloc(cap);
    tg_chunked c;
    sink out;

    /* 16384 bytes of trailer section (final CRLF included) is fine */
    n = (size_t) sprintf(in, "0\r\n");
    for (k = 0; k < 16; k++) {
        n += (size_t) sprintf(in + n, "T%02zu: ", k);        /* 5 bytes */
        memset(in + n, 'v', 1024 - 5 - 2);
        n += 1024 - 5 - 2;
        n += (size_t) sprintf(in + n, "\r\n");
    }
    /* 16 lines of 1024 bytes = 16384: no room for the final CRLF */
    cr_assert_eq(n, 3 + 16384);
    memcpy(in + n, "\r\n", 2);
    tg_chunked_init(&c);
    cr_assert_eq(tg_chunked_decode(&c, in, n + 2, sink_cb, &out), -1);
    /* shorten the last line by 2: 16382 + 2 = 16384 */
    n -= 4;
    memcpy(in + n, "\r\n\r\n", 4);
    cr_assert_eq(decode_pieces(in, n + 4, 0, 1000, &out, &c), (ssize_t) (n + 4));
    free(in);
}

Test(http_chunked, pipelined_next_message)
{
    tg_chunked c;
    sink out;
    const char *in = "3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n";
    ssize_t r;

    tg_chunked_init(&c);
    memset(&out, 0, sizeof(out));
    r = tg_chunked_decode(&c, in, strlen(in), sink_cb, &out);
    cr_assert_eq(r, 13);
    cr_assert_eq(c.done, 1);
    cr_assert(memcmp(in + r, "HTTP/1.1", 8) == 0);
}

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

Test(http_helpers, name_is)
{
    cr_assert(tg_http_name_is("Content-Length", 14, "content-length"));
    cr_assert(tg_http_name_is("HOST", 4, "host"));
    cr_assert_not(tg_http_name_is("Hostx", 5, "host"));
    cr_assert_not(tg_http_name_is("Hos", 3, "host"));
    cr_assert_not(tg_http_name_is("Hist", 4, "host"));
    cr_assert(tg_http_name_is("", 0, ""));
    /* bytes that |0x20 folds onto each other but are not letters */
    cr_assert_not(tg_http_name_is("x\ra", 3, "x-a"));
    cr_assert_not(tg_http_name_is("@", 1, "`"));
    cr_assert_not(tg_http_name_is("[", 1, "{"));
    cr_assert(tg_http_name_is("X-API-KEY", 9, "x-api-key"));
    cr_assert(tg_http_name_is("x-api-key", 9, "X-Api-Key"));
    cr_assert(tg_http_name_eq("Content-Typex", 12, "content-type", 12));
}

Test(http_helpers, hop_by_hop)
{
    static const char *hop[] = {
        "Connection", "keep-alive", "Proxy-Connection", "TE", "Trailer",
        "transfer-encoding", "Upgrade", "Expect", "Content-Length",
        "Proxy-Authorization",
    };
    size_t i;

    for (i = 0; i < TG_ARRAY_LEN(hop); i++) {
        cr_assert(tg_http_is_hop_by_hop(hop[i], strlen(hop[i])), "%s", hop[i]);
    }
    cr_assert_not(tg_http_is_hop_by_hop("Host", 4));
    cr_assert_not(tg_http_is_hop_by_hop("Trailers", 8));
    cr_assert_not(tg_http_is_hop_by_hop("X-API-Key", 9));
    cr_assert_not(tg_http_is_hop_by_hop("Content-Type", 12));
}

Test(http_helpers, connection_lists)
{
    ACCEPT("GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\n"
           "Connection: ,Upgrade ,\r\nX-Secret: 1\r\n\r\n");
    cr_assert(tg_http_connection_lists(req.hdr, req.nhdr, "x-secret", 8));
    cr_assert(tg_http_connection_lists(req.hdr, req.nhdr, "upgrade", 7));
    cr_assert(tg_http_connection_lists(req.hdr, req.nhdr, "Keep-Alive", 10));
    cr_assert_not(tg_http_connection_lists(req.hdr, req.nhdr, "x-secre", 7));
    cr_assert_not(tg_http_connection_lists(req.hdr, req.nhdr, "host", 4));
}

Test(http_helpers, reason)
{
    static const struct { int code; const char *text; } r[] = {
        { 100, "Continue" }, { 200, "OK" }, { 204, "No Content" },
        { 304, "Not Modified" }, { 400, "Bad Request" }, { 401, "Unauthorized" },
        { 403, "Forbidden" }, { 404, "Not Found" }, { 413, "Content Too Large" },
        { 414, "URI Too Long" }, { 417, "Expectation Failed" },
        { 429, "Too Many Requests" }, { 431, "Request Header Fields Too Large" },
        { 500, "Internal Server Error" }, { 501, "Not Implemented" },
        { 502, "Bad Gateway" }, { 503, "Service Unavailable" },
        { 504, "Gateway Timeout" }, { 505, "HTTP Version Not Supported" },
        { 511, "Network Authentication Required" },
    };
    size_t i;

    for (i = 0; i < TG_ARRAY_LEN(r); i++) {
        cr_assert_str_eq(tg_http_reason(r[i].code), r[i].text);
    }
    cr_assert_str_eq(tg_http_reason(299), "Unknown");
    cr_assert_str_eq(tg_http_reason(0), "Unknown");
}
