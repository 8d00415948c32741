/*
 * test_framing.c - strict request framing at the front door.
 *
 * Every malformed or ambiguous request is sent as raw bytes on its own
 * connection.  For each one we assert:
 *   - the exact status (400 unless noted: 417, 501, 505),
 *   - a JSON error body,
 *   - the connection is closed afterwards (read returns 0 / reset),
 *   - the request never reached the upstream: tg-testup's request counter
 *     (read directly, /__stats is not counted) is unchanged.
 * One test per class; all cases of a class run and every failing case is
 * reported, not only the first.
 */
#include <criterion/criterion.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

TestSuite(framing, .fini = tgh_cleanup, .timeout = 120);

/* A case: raw request bytes (may contain NUL) and the status expected. */
typedef struct fcase {
    const char *name;
    const char *raw;
    size_t      len;
    int         status;
} fcase;

#define CASE(name, raw, status) { name, raw, sizeof(raw) - 1, status }

static tgh_upstream up;
static tgh_tollgate tg;

static void start_all(void)
{
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup did not start");
    tgh_tg_opts o;
    tgh_tg_opts_default(&o, up.port);
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate did not start");
}

/* Append a line to a growing failure report. */
static void report(char **rep, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void report(char **rep, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *line = NULL;
    if (vasprintf(&line, fmt, ap) < 0)
        abort();
    va_end(ap);
    char *n = tgh_strf("%s  %s\n", *rep ? *rep : "", line);
    free(*rep);
    free(line);
    *rep = n;
}

/* Printable rendition of raw bytes for failure messages. */
static char *show(const char *raw, size_t len)
{
    size_t cap = len * 4 + 1, o = 0;
    char *s = malloc(cap);
    if (s == NULL)
        abort();
    for (size_t i = 0; i < len && o + 5 < cap; i++) {
        unsigned char ch = (unsigned char)raw[i];
        if (ch == '\r') {
            s[o++] = '\\';
            s[o++] = 'r';
        } else if (ch == '\n') {
            s[o++] = '\\';
            s[o++] = 'n';
        } else if (ch < 0x20 || ch >= 0x7f) {
            o += (size_t)sprintf(s + o, "\\x%02x", ch);
        } else {
            s[o++] = (char)ch;
        }
    }
    s[o] = '\0';
    return s;
}

static int is_json_error(const tgh_resp *r)
{
    const char *ct = tgh_resp_header(r, "Content-Type");
    return ct != NULL && strncmp(ct, "application/json", 16) == 0
        && r->body != NULL && strstr((const char *)r->body, "\"error\"")
        && strstr((const char *)r->body, "\"request_id\"");
}

/* Send each case on a fresh connection and check it was rejected. */
static void run_rejects(const fcase *cases, size_t n)
{
    char *rep = NULL;
    for (size_t i = 0; i < n; i++) {
        const fcase *fc = &cases[i];
        char *raw = show(fc->raw, fc->len);
        tgh_stats before, after;
        if (tgh_testup_stats(up.port, &before) != 0) {
            report(&rep, "[%s] cannot read upstream stats", fc->name);
            free(raw);
            continue;
        }
        tgh_conn *c = tgh_conn_open(tg.port, 5000);
        if (c == NULL) {
            report(&rep, "[%s] connect failed", fc->name);
            free(raw);
            continue;
        }
        tgh_conn_send(c, fc->raw, fc->len, 5000);
        tgh_resp r;
        int rc = tgh_conn_read_response(c, &r, 0, 5000);
        if (rc != 0) {
            report(&rep, "[%s] request '%s': expected %d, got no complete "
                   "response (%s)", fc->name, raw, fc->status, r.reason);
        } else {
            if (r.status != fc->status)
                report(&rep, "[%s] request '%s': expected status %d, got "
                       "%d (body '%.120s')", fc->name, raw, fc->status,
                       r.status, (const char *)r.body);
            else if (!is_json_error(&r))
                report(&rep, "[%s] status %d but not a JSON error body "
                       "(Content-Type '%s', body '%.120s')", fc->name,
                       r.status, tgh_resp_header(&r, "Content-Type")
                       ? tgh_resp_header(&r, "Content-Type") : "(none)",
                       (const char *)r.body);
            size_t extra = 0;
            if (!tgh_conn_wait_closed(c, 3000, &extra))
                report(&rep, "[%s] request '%s': connection not closed "
                       "within 3 s after %d", fc->name, raw, r.status);
            else if (extra > 0)
                report(&rep, "[%s] %zu unexpected bytes after the %d "
                       "response", fc->name, extra, r.status);
        }
        tgh_resp_free(&r);
        tgh_conn_close(c);
        if (tgh_testup_stats(up.port, &after) != 0)
            report(&rep, "[%s] cannot read upstream stats", fc->name);
        else if (after.requests != before.requests)
            report(&rep, "[%s] request '%s' was FORWARDED: upstream "
                   "requests %ld -> %ld", fc->name, raw, before.requests,
                   after.requests);
        free(raw);
    }
    TGH_CHECK(rep == NULL, "rejections not as specified:\n%s", rep);
}

/* Send each case and expect 200 from the upstream (controls). */
static void run_accepts(const fcase *cases, size_t n)
{
    char *rep = NULL;
    for (size_t i = 0; i < n; i++) {
        const fcase *fc = &cases[i];
        char *raw = show(fc->raw, fc->len);
        tgh_stats before, after;
        tgh_testup_stats(up.port, &before);
        tgh_conn *c = tgh_conn_open(tg.port, 5000);
        if (c == NULL) {
            report(&rep, "[%s] connect failed", fc->name);
            free(raw);
            continue;
        }
        tgh_conn_send(c, fc->raw, fc->len, 5000);
        tgh_resp r;
        int rc = tgh_conn_read_response(c, &r, 0, 5000);
        if (rc != 0)
            report(&rep, "[%s] request '%s': no complete response (%s)",
                   fc->name, raw, r.reason);
        else if (r.status != fc->status)
            report(&rep, "[%s] request '%s': expected %d, got %d (body "
                   "'%.120s')", fc->name, raw, fc->status, r.status,
                   (const char *)r.body);
        tgh_resp_free(&r);
        tgh_conn_close(c);
        tgh_testup_stats(up.port, &after);
        if (rc == 0 && after.requests != before.requests + 1)
            report(&rep, "[%s] upstream requests %ld -> %ld, expected +1",
                   fc->name, before.requests, after.requests);
        free(raw);
    }
    TGH_CHECK(rep == NULL, "valid requests not accepted:\n%s", rep);
}

#define RUN_REJECTS(cases) run_rejects(cases, sizeof(cases) / sizeof(cases[0]))
#define RUN_ACCEPTS(cases) run_accepts(cases, sizeof(cases) / sizeof(cases[0]))

/* ------------------------------------------------------------------ */

Test(framing, valid_controls)
{
    start_all();
    static const fcase ok[] = {
        CASE("plain GET", "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 200),
        CASE("HTTP/1.0 without Host", "GET / HTTP/1.0\r\n\r\n", 200),
        CASE("tab in value", "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\tb\r\n"
             "Connection: close\r\n\r\n", 200),
        CASE("IPv6 Host", "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n"
             "Connection: close\r\n\r\n", 200),
        CASE("chunked, upper-case hex", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
             "A\r\n0123456789\r\n0\r\n\r\n", 200),
        CASE("Content-Length", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 5\r\nConnection: close\r\n\r\nhello", 200),
        CASE("Expect 100-continue", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Expect: 100-continue\r\nContent-Length: 5\r\n"
             "Connection: close\r\n\r\nhello", 200),
    };
    RUN_ACCEPTS(ok);
}

Test(framing, te_and_cl)
{
    start_all();
    static const fcase c[] = {
        CASE("TE then CL", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
             "5\r\nhello\r\n0\r\n\r\n", 400),
        CASE("CL then TE", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 15\r\nTransfer-Encoding: chunked\r\n\r\n"
             "5\r\nhello\r\n0\r\n\r\n", 400),
        CASE("TE + CL 0", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n"
             "5\r\nhello\r\n0\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, invalid_content_length)
{
    start_all();
    static const fcase c[] = {
        CASE("CL abc", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: abc\r\n\r\nhello", 400),
        CASE("CL -1", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: -1\r\n\r\nhello", 400),
        CASE("CL '1 2'", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 1 2\r\n\r\nhello", 400),
        CASE("CL +5", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: +5\r\n\r\nhello", 400),
        CASE("two CL equal", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", 400),
        CASE("two CL differ", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 5\r\nContent-Length: 3\r\n\r\nhello", 400),
        CASE("CL 5,5", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 5,5\r\n\r\nhello", 400),
        CASE("CL 0x5", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: 0x5\r\n\r\nhello", 400),
        CASE("CL empty", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length: \r\n\r\nhello", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, te_not_final_chunked)
{
    start_all();
    static const fcase c[] = {
        CASE("TE gzip", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: gzip\r\n\r\nhello", 400),
        CASE("TE chunked, chunked", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked, chunked\r\n\r\n"
             "5\r\nhello\r\n0\r\n\r\n", 400),
        CASE("TE chunked;x=1", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked;x=1\r\n\r\n"
             "5\r\nhello\r\n0\r\n\r\n", 400),
        CASE("TE chunked then gzip", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked, gzip\r\n\r\n"
             "5\r\nhello\r\n0\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, te_unsupported_coding_501)
{
    start_all();
    static const fcase c[] = {
        CASE("TE gzip, chunked", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: gzip, chunked\r\n\r\n"
             "5\r\nhello\r\n0\r\n\r\n", 501),
    };
    RUN_REJECTS(c);
}

Test(framing, te_in_http10)
{
    start_all();
    static const fcase c[] = {
        CASE("HTTP/1.0 TE chunked", "POST /echo HTTP/1.0\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "5\r\nhello\r\n0\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, bad_chunk_size)
{
    start_all();
    static const fcase c[] = {
        CASE("chunk size zz", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "zz\r\nhello\r\n0\r\n\r\n", 400),
        CASE("chunk size '5 '", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "5 \r\nhello\r\n0\r\n\r\n", 400),
        CASE("chunk size 0x5", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "0x5\r\nhello\r\n0\r\n\r\n", 400),
        CASE("chunk size empty", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "\r\nhello\r\n0\r\n\r\n", 400),
        CASE("chunk size -5", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "-5\r\nhello\r\n0\r\n\r\n", 400),
        CASE("second chunk size bad", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "5\r\nhello\r\nq\r\nhello\r\n0\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, bad_chunk_terminator)
{
    start_all();
    static const fcase c[] = {
        CASE("data then XX", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "5\r\nhelloXX\r\n0\r\n\r\n", 400),
        CASE("data then next size", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "5\r\nhello0\r\n\r\n", 400),
        CASE("data then bare LF", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Transfer-Encoding: chunked\r\n\r\n"
             "5\r\nhello\n0\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, host)
{
    start_all();
    static const fcase c[] = {
        CASE("missing Host", "GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
        CASE("duplicate Host", "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
             400),
        CASE("Host 'a b'", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        CASE("Host '[zz'", "GET / HTTP/1.1\r\nHost: [zz\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, invalid_header_name)
{
    start_all();
    static const fcase c[] = {
        CASE("space in name", "GET / HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
             400),
        CASE("@ in name", "GET / HTTP/1.1\r\nHost: x\r\nBad@Name: x\r\n\r\n",
             400),
        CASE("( in name", "GET / HTTP/1.1\r\nHost: x\r\na(b: x\r\n\r\n", 400),
        CASE("quote in name", "GET / HTTP/1.1\r\nHost: x\r\nBad\"Name: x\r\n\r\n",
             400),
        CASE("empty name", "GET / HTTP/1.1\r\nHost: x\r\n: x\r\n\r\n", 400),
        CASE("no colon", "GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
             400),
    };
    RUN_REJECTS(c);
}

Test(framing, whitespace_before_colon)
{
    start_all();
    static const fcase c[] = {
        CASE("Host : x", "GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        CASE("X-Foo : x", "GET / HTTP/1.1\r\nHost: x\r\nX-Foo : x\r\n\r\n", 400),
        CASE("X-Foo<TAB>: x", "GET / HTTP/1.1\r\nHost: x\r\nX-Foo\t: x\r\n\r\n",
             400),
        CASE("Content-Length : 5", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Content-Length : 5\r\n\r\nhello", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, obs_fold)
{
    start_all();
    static const fcase c[] = {
        CASE("fold with spaces", "GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n  b\r\n\r\n",
             400),
        CASE("fold with tab", "GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n\tb\r\n\r\n",
             400),
        CASE("fold first line", "GET / HTTP/1.1\r\n Host: x\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, bare_cr)
{
    start_all();
    static const fcase c[] = {
        CASE("CR in value", "GET / HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n", 400),
        CASE("CR ends line", "GET / HTTP/1.1\r\nHost: x\r\nX: a\r\rY: b\r\n\r\n",
             400),
        CASE("CR in request line", "GET /a\rb HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, bare_lf)
{
    start_all();
    static const fcase c[] = {
        CASE("all bare LF", "GET / HTTP/1.1\nHost: x\n\n", 400),
        CASE("one header bare LF", "GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
             400),
        CASE("request line bare LF", "GET / HTTP/1.1\nHost: x\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, nul_in_header)
{
    start_all();
    static const fcase c[] = {
        CASE("NUL in value", "GET / HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n", 400),
        CASE("NUL in name", "GET / HTTP/1.1\r\nHost: x\r\nX\0Y: a\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, control_bytes)
{
    start_all();
    static const fcase c[] = {
        CASE("0x01 in value", "GET / HTTP/1.1\r\nHost: x\r\nX: a\x01" "b\r\n\r\n",
             400),
        CASE("0x7f in value", "GET / HTTP/1.1\r\nHost: x\r\nX: a\x7f" "b\r\n\r\n",
             400),
        CASE("0x1b in value", "GET / HTTP/1.1\r\nHost: x\r\nX: a\x1b" "b\r\n\r\n",
             400),
        CASE("0x01 in target", "GET /a\x01" "b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        CASE("0x7f in target", "GET /a\x7f" "b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, malformed_request_line)
{
    start_all();
    static const fcase c[] = {
        CASE("double space", "GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        CASE("no version", "GET /\r\nHost: x\r\n\r\n", 400),
        CASE("extra token", "GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400),
        CASE("trailing space", "GET / HTTP/1.1 \r\nHost: x\r\n\r\n", 400),
        CASE("lowercase version", "GET / http/1.1\r\nHost: x\r\n\r\n", 400),
        CASE("HTTP/1", "GET / HTTP/1\r\nHost: x\r\n\r\n", 400),
        CASE("no method", "/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        CASE("tab separator", "GET\t/ HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    };
    RUN_REJECTS(c);
}

Test(framing, http2_version_505)
{
    start_all();
    static const fcase c[] = {
        CASE("HTTP/2.0", "GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    };
    RUN_REJECTS(c);
    static const fcase ok[] = {
        CASE("HTTP/1.1", "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
             200),
    };
    RUN_ACCEPTS(ok);
}

Test(framing, expect_unknown_417)
{
    start_all();
    static const fcase c[] = {
        CASE("Expect: something-else", "POST /echo HTTP/1.1\r\nHost: x\r\n"
             "Expect: something-else\r\nContent-Length: 5\r\n\r\nhello", 417),
        CASE("Expect on GET", "GET / HTTP/1.1\r\nHost: x\r\n"
             "Expect: nothing\r\n\r\n", 417),
    };
    RUN_REJECTS(c);
}
