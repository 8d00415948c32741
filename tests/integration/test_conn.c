/*
 * test_conn.c - the life of a client connection, end to end: each phase's
 * own timeout, lingering closes (plain and TLS), backpressure on answers
 * tollgate writes itself, a client leaving mid-request, and upstream
 * responses that must become 502.
 *
 * Upstream connections are counted in the kernel's table (/proc/net/tcp):
 * ESTABLISHED sockets whose local port is tg-testup's.
 */
#include <criterion/criterion.h>

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>

#include "harness.h"

TestSuite(conn, .fini = tgh_cleanup, .timeout = 180);

static tgh_upstream up;
static tgh_tollgate tg;

/* ---- helpers -------------------------------------------------------- */

/* ESTABLISHED TCP sockets whose local port is port (IPv4 and IPv6). */
static int
established(int port)
{
    static const char *const files[] = { "/proc/net/tcp", "/proc/net/tcp6" };
    char line[512];
    int n = 0;

    for (size_t i = 0; i < 2; i++) {
        FILE *f = fopen(files[i], "r");
        if (f == NULL)
            continue;
        while (fgets(line, sizeof line, f) != NULL) {
            char local[128], remote[128];
            unsigned st;
            if (sscanf(line, " %*d: %127s %127s %x", local, remote, &st) != 3)
                continue;
            char *colon = strrchr(local, ':');
            if (colon != NULL && st == 1 && strtol(colon + 1, NULL, 16) == port)
                n++;
        }
        fclose(f);
    }
    return n;
}

/* Wait up to ms for at most max (at least min) such sockets; returns
 * the last count. */
static int
wait_established_at_most(int port, int max, int ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)ms;
    int n;

    while ((n = established(port)) > max && tgh_now_ms() < end)
        tgh_sleep_ms(10);
    return n;
}

static int
wait_established_at_least(int port, int min, int ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)ms;
    int n;

    while ((n = established(port)) < min && tgh_now_ms() < end)
        tgh_sleep_ms(10);
    return n;
}

static long
vmrss_kb(pid_t pid)
{
    return tgh_proc_status_kb(pid, "VmRSS");
}

/* Is pid's program built with AddressSanitizer?  The sanitized build links
 * the runtime statically (no libasan in the maps), so meson says so in
 * TG_SANITIZED; a libasan.so mapping counts too. */
static int
under_asan(pid_t pid)
{
    char path[64], line[512];
    const char *env = getenv("TG_SANITIZED");
    int yes = env != NULL && strcmp(env, "1") == 0;
    snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return yes;
    while (!yes && fgets(line, sizeof line, f) != NULL)
        yes = strstr(line, "libasan") != NULL;
    fclose(f);
    return yes;
}

/* Sum of tollgate_requests_total series with status="status" (0: all). */
static long
requests_counted(int status)
{
    tgh_resp r;
    long sum = 0;
    char want[32];

    snprintf(want, sizeof want, "status=\"%d\"", status);
    TGH_CHECK(tgh_http(tg.admin_port, "GET", "/metrics", NULL, NULL, 0, &r,
                       5000) == 0 && r.status == 200, "GET /metrics");
    const char *p = (const char *)r.body;
    while (p != NULL && *p) {
        const char *e = strchr(p, '\n');
        size_t ll = e ? (size_t)(e - p) : strlen(p);
        char *l = strndup(p, ll);
        if (strncmp(l, "tollgate_requests_total{", 24) == 0
            && (status == 0 || strstr(l, want) != NULL)) {
            char *sp = strrchr(l, ' ');
            if (sp != NULL)
                sum += strtol(sp + 1, NULL, 10);
        }
        free(l);
        p = e ? e + 1 : NULL;
    }
    tgh_resp_free(&r);
    return sum;
}

/* keys.yaml with one key ("k-conn"), for answers of our own (401). */
static const char *
keys_yaml(void)
{
    static char extra[1024];
    char path[512], hex[65];
    unsigned char d[32];

    snprintf(path, sizeof path, "%s/ckeys.yaml", tgh_tmpdir());
    SHA256((const unsigned char *)"k-conn", 6, d);
    for (int j = 0; j < 32; j++)
        snprintf(hex + 2 * j, 3, "%02x", d[j]);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, "keys:\n  - { id: conn, tier: basic, sha256: \"%s\" }\n", hex);
    fclose(f);
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 100, burst_limit: 20 }\n"
             "auth: { keys_file: %s }\n", path);
    return extra;
}

static void
start(void (*tweak)(tgh_tg_opts *))
{
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup did not start");
    tgh_tg_opts o;
    tgh_tg_opts_default(&o, up.port);
    if (tweak != NULL)
        tweak(&o);
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate did not start");
    if (o.tls_port > 0)
        TGH_CHECK(tgh_wait_listening(o.tls_port, 10000) == 0, "TLS port");
}

static int
roundtrip(tgh_conn *c, const char *req, tgh_resp *r, int ms)
{
    return tgh_conn_roundtrip(c, req, strlen(req), r, 0, ms);
}

/* ---- the body timer ends with the body -------------------------------- */

static void
timers(tgh_tg_opts *o)
{
    o->body_timeout_ms = 1000;
    o->idle_timeout_ms = 3000;
    o->first_byte_timeout_ms = 10000;
}

Test(conn, body_timeout_ends_with_the_body)
{
    start(timers);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    static const char post[] = "POST /echo HTTP/1.1\r\nHost: t\r\n"
                               "Content-Length: 10\r\n\r\n0123456789";
    tgh_resp r;
    TGH_CHECK(roundtrip(c, post, &r, 5000) == 0 && r.status == 200,
              "POST /echo: %d %s", r.status, r.reason);
    tgh_resp_free(&r);

    /* slower than body_timeout_ms: waiting for the upstream has no client
     * read timeout */
    TGH_CHECK(roundtrip(c, "GET /slow?ms=2000 HTTP/1.1\r\nHost: t\r\n\r\n",
                        &r, 8000) == 0 && r.status == 200,
              "GET /slow?ms=2000 after a POST (body_timeout_ms 1000): %d %s",
              r.status, r.reason);
    tgh_resp_free(&r);

    /* idle after a POST: idle_timeout_ms, not body_timeout_ms */
    TGH_CHECK(roundtrip(c, post, &r, 5000) == 0 && r.status == 200,
              "second POST: %d", r.status);
    tgh_resp_free(&r);
    uint64_t t0 = tgh_now_ms();
    size_t extra = 0;
    int closed = tgh_conn_wait_closed(c, 8000, &extra);
    uint64_t dt = tgh_now_ms() - t0;
    TGH_CHECK(closed && dt >= 2500 && dt <= 6000, "idle after a POST: closed=%d "
              "after %llu ms (idle_timeout_ms 3000, body_timeout_ms 1000)",
              closed, (unsigned long long)dt);
    TGH_CHECK(extra == 0, "%zu bytes on an idle connection", extra);
    tgh_conn_close(c);
}

/* ---- a refused upload reads its answer, not a reset -------------------- */

static int tls_port;

static void
tls_and_keys(tgh_tg_opts *o)
{
    char *cmd = tgh_strf("cd %s && openssl req -x509 -newkey rsa:2048 -nodes "
                         "-subj /CN=localhost -keyout key.pem -out cert.pem -days 2 "
                         ">/dev/null 2>&1", tgh_tmpdir());
    TGH_CHECK(system(cmd) == 0, "openssl req");
    free(cmd);
    tls_port = tgh_free_port();
    o->tls_port = tls_port;
    static char cert[512], key[512];
    snprintf(cert, sizeof cert, "%s/cert.pem", tgh_tmpdir());
    snprintf(key, sizeof key, "%s/key.pem", tgh_tmpdir());
    o->tls_cert = cert;
    o->tls_key = key;
    o->max_body_bytes = 1048576;
    o->extra_yaml = keys_yaml();
}

#define UPLOAD (10 * 1024 * 1024)

Test(conn, refused_upload_reads_the_answer)
{
    signal(SIGPIPE, SIG_IGN);   /* a reset must fail the test, not kill it */
    start(tls_and_keys);
    unsigned char *body = calloc(1, UPLOAD);
    cr_assert_not_null(body);

    /* TLS: 413 by Content-Length, the client sends all 10 MB first */
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    cr_assert_not_null(ctx);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)tls_port),
                              .sin_addr.s_addr = htonl(0x7f000001) };
    struct timeval tv = { 15, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    TGH_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect TLS");
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    TGH_CHECK(SSL_connect(ssl) == 1, "TLS handshake");
    char *head = tgh_strf("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n",
                          UPLOAD);
    TGH_CHECK(SSL_write(ssl, head, (int)strlen(head)) > 0, "write head");
    free(head);
    size_t sent = 0;
    while (sent < UPLOAD) {
        int n = SSL_write(ssl, body + sent, 65536);
        if (n <= 0)
            break;
        sent += (size_t)n;
    }
    char resp[4096];
    size_t got = 0;
    int n, err = 0;
    while (got < sizeof resp - 1
           && (n = SSL_read(ssl, resp + got, (int)(sizeof resp - 1 - got))) > 0)
        got += (size_t)n;
    if (got < sizeof resp - 1)
        err = SSL_get_error(ssl, n);
    resp[got] = '\0';
    TGH_CHECK(strncmp(resp, "HTTP/1.1 413 ", 13) == 0,
              "TLS upload of %d bytes (%zu sent): read '%.60s' (SSL error %d), "
              "expected 413", UPLOAD, sent, resp, err);
    TGH_CHECK(strstr(resp, "Connection: close\r\n") != NULL, "413 without "
              "Connection: close");
    TGH_CHECK(err == SSL_ERROR_ZERO_RETURN
              && (SSL_get_shutdown(ssl) & SSL_RECEIVED_SHUTDOWN),
              "TLS close without close_notify (SSL error %d)", err);
    SSL_free(ssl);
    close(fd);
    SSL_CTX_free(ctx);
    ERR_clear_error();

    /* plain: 401 (no key), the client sends all 10 MB first */
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    head = tgh_strf("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n",
                    512 * 1024);
    tgh_conn_sendstr(c, head);
    free(head);
    tgh_conn_send(c, body, 512 * 1024, 15000);
    tgh_resp r;
    TGH_CHECK(tgh_conn_read_response(c, &r, 0, 10000) == 0 && r.status == 401,
              "plain keyless upload: %d %s (reset=%d), expected 401", r.status,
              r.reason, c->reset);
    tgh_resp_free(&r);
    tgh_conn_close(c);
    free(body);
}

/* ---- a stalled body: one 408, the upstream exchange ends --------------- */

static void
short_body(tgh_tg_opts *o)
{
    o->body_timeout_ms = 1000;
    o->first_byte_timeout_ms = 10000;
}

Test(conn, stalled_body_408_ends_the_exchange)
{
    start(short_body);
    TGH_CHECK(established(up.port) == 0, "upstream connections before the test");
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_conn_sendstr(c, "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
                        "0123456789");
    TGH_CHECK(wait_established_at_least(up.port, 1, 5000) >= 1,
              "the request never reached the upstream");
    tgh_resp r;
    TGH_CHECK(tgh_conn_read_response(c, &r, 0, 5000) == 0 && r.status == 408,
              "stalled body: %d %s, expected 408", r.status, r.reason);
    TGH_CHECK(tgh_resp_header(&r, "Connection") != NULL
              && strcasecmp(tgh_resp_header(&r, "Connection"), "close") == 0,
              "408 without Connection: close");
    tgh_resp_free(&r);
    /* the client keeps its end open (lingering close): the upstream
     * exchange must not wait for it */
    int left = wait_established_at_most(up.port, 0, 1000);
    TGH_CHECK(left == 0, "%d upstream connection(s) still open 1 s after the 408",
              left);
    size_t extra = 0;
    int closed = tgh_conn_wait_closed(c, 5000, &extra);
    TGH_CHECK(closed && extra == 0, "after the 408: closed=%d, %zu more bytes",
              closed, extra);
    tgh_conn_close(c);
    TGH_CHECK(requests_counted(408) == 1 && requests_counted(0) == 1,
              "counted: %ld 408s, %ld requests in all; expected one",
              requests_counted(408), requests_counted(0));
}

/* ---- a client that does not read its answers --------------------------- */

static void
keys_unlimited(tgh_tg_opts *o)
{
    o->extra_yaml = keys_yaml();
    o->http_extra = "max_requests_per_connection: 0";
}

Test(conn, pipelining_non_reader_stays_bounded)
{
    start(keys_unlimited);
    static const char req[] = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    enum { NREQ = 200000, BATCH = 1000 };
    size_t rl = sizeof req - 1;
    unsigned char *batch = malloc(rl * BATCH);
    for (int i = 0; i < BATCH; i++)
        memcpy(batch + (size_t)i * rl, req, rl);

    /* one answer first: the worker is warm, its RSS the baseline */
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_resp r;
    TGH_CHECK(roundtrip(c, req, &r, 5000) == 0 && r.status == 401, "keyless: %d",
              r.status);
    tgh_resp_free(&r);
    long rss0 = vmrss_kb(tg.proc->pid);

    /* up to 200k keyless requests (401 each), never reading, for at most
     * 5 s; the send blocks once tollgate stops taking them */
    int sent = 0;
    uint64_t end = tgh_now_ms() + 5000;
    while (sent < NREQ && tgh_now_ms() < end) {
        if (tgh_conn_send(c, batch, rl * BATCH, 300) != 0)
            break;
        sent += BATCH;
    }
    /* wait until tollgate stops answering (the count holds for 500 ms) */
    long answered = requests_counted(401) - 1, prev = -1;
    uint64_t still = tgh_now_ms();
    end = tgh_now_ms() + 15000;
    while (tgh_now_ms() < end && (answered != prev || tgh_now_ms() - still < 500)) {
        if (answered != prev)
            still = tgh_now_ms();
        prev = answered;
        tgh_sleep_ms(50);
        answered = requests_counted(401) - 1;
    }
    long rss1 = vmrss_kb(tg.proc->pid);
    TGH_CHECK(rss0 > 0 && rss1 > 0, "VmRSS");
    cr_log_info("RSS %ld kB -> %ld kB, %d requests sent, %ld answered", rss0, rss1,
                sent, answered);
    /* answered: what fits the kernel's socket buffers and our high water */
    TGH_CHECK(answered < sent / 2, "%ld of %d requests answered to a client that "
              "reads nothing", answered, sent);
    /* ASan's quarantine keeps freed memory resident: RSS says nothing there */
    TGH_CHECK(under_asan(tg.proc->pid) || rss1 - rss0 < 8 * 1024, "RSS grew by %ld kB (from %ld kB) while a "
              "client sent %d pipelined requests without reading",
              rss1 - rss0, rss0, sent);
    /* it was paused, not dropped: the answers come in order once read */
    for (int i = 0; i < 1000; i++) {
        TGH_CHECK(tgh_conn_read_response(c, &r, 0, 5000) == 0 && r.status == 401,
                  "answer %d after the burst: %d %s", i, r.status, r.reason);
        tgh_resp_free(&r);
    }
    tgh_conn_close(c);
    free(batch);
}

/* ---- a client that leaves cancels the upstream exchange ---------------- */

static void
long_upstream(tgh_tg_opts *o)
{
    o->first_byte_timeout_ms = 20000;
    o->total_timeout_ms = 20000;
}

Test(conn, client_fin_cancels_the_upstream_exchange)
{
    enum { N = 20 };
    tgh_conn *c[N];

    start(long_upstream);
    TGH_CHECK(established(up.port) == 0, "upstream connections before the test");
    for (int i = 0; i < N; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(c[i] != NULL, "connect %d", i);
        tgh_conn_sendstr(c[i], "GET /slow?ms=10000 HTTP/1.1\r\nHost: t\r\n\r\n");
    }
    TGH_CHECK(wait_established_at_least(up.port, N, 5000) == N,
              "%d of %d requests reached the upstream", established(up.port), N);
    uint64_t t0 = tgh_now_ms();
    for (int i = 0; i < N; i++)
        shutdown(c[i]->fd, SHUT_WR);
    int left = wait_established_at_most(up.port, 0, 3000);
    TGH_CHECK(left == 0, "%d of %d upstream connections still open %llu ms after "
              "their clients closed", left, N, (unsigned long long)(tgh_now_ms() - t0));
    for (int i = 0; i < N; i++) {
        TGH_CHECK(tgh_conn_wait_closed(c[i], 5000, NULL), "client %d not closed", i);
        tgh_conn_close(c[i]);
    }
    TGH_CHECK(requests_counted(499) == N, "counted %ld with status 499, expected %d",
              requests_counted(499), N);
}

/* ---- a close with nothing unread does not linger ----------------------- */

/* tollgate_connections_open, or -1. */
static long
connections_open(void)
{
    static const char name[] = "tollgate_connections_open ";
    tgh_resp r;
    long v = -1;

    if (tgh_http(tg.admin_port, "GET", "/metrics", NULL, NULL, 0, &r, 5000) == 0
        && r.status == 200) {
        const char *p = strstr((const char *)r.body, "\ntollgate_connections_open ");
        if (p != NULL)
            v = atol(p + sizeof name);
    }
    tgh_resp_free(&r);
    return v;
}

Test(conn, whole_request_closes_without_linger)
{
    start(NULL);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_resp r;
    TGH_CHECK(roundtrip(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                        &r, 10000) == 0 && r.status == 200, "GET: %d", r.status);
    tgh_resp_free(&r);
    /* the client keeps its end open; it sent a whole request and nothing
     * after it, so the socket is closed at once (as nginx does), not
     * after a lingering read of up to 2 s */
    uint64_t t0 = tgh_now_ms();
    long v;
    while ((v = connections_open()) != 0 && tgh_now_ms() - t0 < 1500)
        tgh_sleep_ms(20);
    TGH_CHECK(v == 0, "tollgate_connections_open is %ld %llu ms after the answer to a "
              "whole request with Connection: close; expected 0 (closed, not lingering)",
              v, (unsigned long long)(tgh_now_ms() - t0));
    size_t extra = 0;
    int closed = tgh_conn_wait_closed(c, 5000, &extra);
    TGH_CHECK(closed && extra == 0, "closed=%d, %zu more bytes", closed, extra);
    tgh_conn_close(c);
}

/* ---- responses no server may send: 502 --------------------------------- */

Test(conn, upstream_impossible_responses_502)
{
    static const char *const kinds[] = { "600", "999", "1xxbody", "gzip" };

    start(long_upstream);
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        char *path = tgh_strf("/raw?kind=%s", kinds[i]);
        tgh_resp r;
        uint64_t t0 = tgh_now_ms();
        int rc = tgh_http(tg.port, "GET", path, NULL, NULL, 0, &r, 15000);
        uint64_t dt = tgh_now_ms() - t0;
        TGH_CHECK(rc == 0 && r.status == 502, "%s: %d %s, expected 502", path,
                  r.status, r.reason);
        TGH_CHECK(dt < 3000, "%s: 502 after %llu ms (first_byte_timeout_ms 20000)",
                  path, (unsigned long long)dt);
        tgh_resp_free(&r);
        free(path);
    }
}

/* An invalid answer on a kept-alive connection is an answer: the server
 * got the request and did something with it.  Only a connection closed
 * before any byte came back is the keep-alive race worth a retry; before,
 * every 502 in the head phase of a reused connection was taken for it and
 * an idempotent request went to the upstream a second time. */
Test(conn, invalid_answer_on_a_pooled_connection_is_not_sent_twice)
{
    tgh_conn *c;
    tgh_stats st;
    tgh_resp r;

    start(long_upstream);
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    TGH_CHECK(roundtrip(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n", &r, 10000) == 0
              && r.status == 200, "warm-up");
    tgh_resp_free(&r);
    TGH_CHECK(tgh_testup_reset(up.port) == 0, "reset");
    TGH_CHECK(roundtrip(c, "GET /raw?kind=600 HTTP/1.1\r\nHost: t\r\n\r\n", &r, 10000) == 0
              && r.status == 502, "/raw?kind=600: %d", r.status);
    tgh_resp_free(&r);
    tgh_conn_close(c);
    TGH_CHECK(tgh_testup_stats(up.port, &st) == 0, "stats");
    TGH_CHECK(st.requests == 1, "the upstream got the request %ld times", st.requests);
}

/* ---- TLS: the handshake has its own deadline ---------------------------- */

static void
tls_timeouts(tgh_tg_opts *o)
{
    tls_and_keys(o);
    o->header_timeout_ms = 3000;
    o->http_extra = "handshake_timeout_ms: 1000";
}

Test(conn, tls_handshake_timeout_is_its_own)
{
    start(tls_timeouts);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)tls_port),
                              .sin_addr.s_addr = htonl(0x7f000001) };
    struct timeval tv = { 10, 0 };
    char b[64];

    /* no ClientHello: closed at handshake_timeout_ms */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    TGH_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect TLS");
    uint64_t t0 = tgh_now_ms();
    ssize_t n = read(fd, b, sizeof b);
    uint64_t dt = tgh_now_ms() - t0;
    TGH_CHECK(n <= 0 && dt >= 800 && dt <= 2500, "silent TLS client: read %zd after "
              "%llu ms (handshake_timeout_ms 1000, header_timeout_ms 3000)", n,
              (unsigned long long)dt);
    close(fd);

    /* handshake done, no request: the header deadline, then close_notify */
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    fd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    TGH_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect TLS");
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    TGH_CHECK(SSL_connect(ssl) == 1, "TLS handshake");
    t0 = tgh_now_ms();
    int r = SSL_read(ssl, b, sizeof b);
    int err = SSL_get_error(ssl, r);
    dt = tgh_now_ms() - t0;
    TGH_CHECK(r <= 0 && dt >= 2500 && dt <= 5000, "idle TLS connection: read %d "
              "after %llu ms (header_timeout_ms 3000)", r, (unsigned long long)dt);
    TGH_CHECK(err == SSL_ERROR_ZERO_RETURN, "closed without close_notify "
              "(SSL error %d)", err);
    SSL_free(ssl);
    close(fd);
    SSL_CTX_free(ctx);
    ERR_clear_error();
}

/* ---- a head timeout is not the previous request ------------------------ */

static void
short_head(tgh_tg_opts *o)
{
    o->header_timeout_ms = 1000;
}

Test(conn, head_timeout_408_has_its_own_id)
{
    start(short_head);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_resp r;
    TGH_CHECK(roundtrip(c, "GET / HTTP/1.1\r\nHost: t\r\nX-Request-ID: prev-req-1\r\n\r\n",
                        &r, 5000) == 0 && r.status == 200, "GET /: %d", r.status);
    tgh_resp_free(&r);
    tgh_conn_sendstr(c, "GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ");
    TGH_CHECK(tgh_conn_read_response(c, &r, 0, 5000) == 0 && r.status == 408,
              "stalled head: %d %s, expected 408", r.status, r.reason);
    const char *rid = tgh_resp_header(&r, "X-Request-ID");
    TGH_CHECK(rid != NULL && strcmp(rid, "prev-req-1") != 0,
              "the 408 carries the previous request's id '%s'", rid ? rid : "(none)");
    tgh_resp_free(&r);
    tgh_conn_close(c);
}

/* ---- an early answer closes the connection ----------------------------- */

Test(conn, early_answer_says_connection_close)
{
    /* the sample app answers /status/{code} without reading the body */
    TGH_CHECK(tgh_fastapi_start(&up) == 0, "uvicorn did not start");
    tgh_tg_opts o;
    tgh_tg_opts_default(&o, up.port);
    o.first_byte_timeout_ms = 10000;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate did not start");
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    tgh_conn_sendstr(c, "POST /status/200 HTTP/1.1\r\nHost: t\r\n"
                        "Content-Length: 100000\r\n\r\n0123456789");
    tgh_resp r;
    TGH_CHECK(tgh_conn_read_response(c, &r, 0, 10000) == 0 && r.status == 200,
              "early answer: %d %s", r.status, r.reason);
    const char *conn = tgh_resp_header(&r, "Connection");
    TGH_CHECK(conn != NULL && strcasecmp(conn, "close") == 0, "an answer sent before "
              "the request body was read says Connection: %s", conn ? conn : "(none)");
    tgh_resp_free(&r);
    TGH_CHECK(tgh_conn_wait_closed(c, 5000, NULL), "connection still open");
    tgh_conn_close(c);
}

/* ---- a close tollgate decides while the client still sends ------------- */

static void
one_request_per_conn(tgh_tg_opts *o)
{
    o->http_extra = "max_requests_per_connection: 1";
}

/*
 * A pipelining client with a small receive window asks for n bytes, the
 * last answer tollgate serves on the connection
 * (max_requests_per_connection), and sends its next request while it has
 * not received all of it: after 500 ms (the end of the answer waits in
 * tollgate's output; reading is off), or (after_close) once tollgate
 * would have closed the connection (the kernel still holds the end of
 * the answer).  The close must linger: a close with unread bytes, or
 * bytes arriving at a closed socket, is a reset, and the reset throws
 * away what the kernel still had to send.  The answer must arrive whole,
 * ended by a FIN.
 */
static void
last_answer_whole(size_t n, int after_close)
{
    size_t cap = n + 4096, got = 0;
    int rcv = 4096, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(tg.port) };
    struct timeval tv = { 10, 0 };
    unsigned char *buf = malloc(cap);
    static const char next[] = "GET /bytes?n=1 HTTP/1.1\r\nHost: t\r\n\r\n";
    char req[128];
    ssize_t r = 0;

    cr_assert(fd >= 0 && buf != NULL);
    sa.sin_addr.s_addr = htonl(0x7f000001);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    TGH_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect");
    snprintf(req, sizeof req, "GET /bytes?n=%zu HTTP/1.1\r\nHost: t\r\n\r\n", n);
    TGH_CHECK(write(fd, req, strlen(req)) == (ssize_t)strlen(req), "write");
    tgh_sleep_ms(500);                          /* the answer is all out of the upstream */
    if (after_close) {
        uint64_t t0 = tgh_now_ms();             /* closed, or lingering (fixed) */
        while (connections_open() != 0 && tgh_now_ms() - t0 < 1000)
            tgh_sleep_ms(20);
    }
    TGH_CHECK(write(fd, next, sizeof next - 1) == (ssize_t)(sizeof next - 1), "write 2");
    tgh_sleep_ms(200);
    while (got < cap && (r = read(fd, buf + got, cap - got)) > 0)
        got += (size_t)r;
    int err = errno;
    unsigned char *eoh = memmem(buf, got, "\r\n\r\n", 4);
    size_t body = eoh != NULL ? got - (size_t)(eoh + 4 - buf) : 0;
    TGH_CHECK(eoh != NULL && body == n && r == 0,
              "%zu-byte answer, next request %s: %zu body bytes, then %s", n,
              after_close ? "after the close" : "while it is queued", body,
              r == 0 ? "EOF" : strerror(err));
    TGH_CHECK(memmem(buf, (size_t)(eoh - buf), "Connection: close", 17) != NULL,
              "the last answer does not say Connection: close");
    free(buf);
    close(fd);
}

Test(conn, next_request_during_the_last_answer_lingers)
{
    static const size_t queued[] = { 131072, 196608, 245760 };
    static const size_t in_kernel[] = { 32768, 65536, 131072 };

    start(one_request_per_conn);
    for (size_t k = 0; k < sizeof queued / sizeof queued[0]; k++)
        last_answer_whole(queued[k], 0);
    for (size_t k = 0; k < sizeof in_kernel / sizeof in_kernel[0]; k++)
        last_answer_whole(in_kernel[k], 1);
}

/* ---- the upstream pool under 1,000 clients ------------------------------ */

/* Descriptors tollgate holds now. */
static int
fd_count(pid_t pid)
{
    char path[64];
    int n = 0;

    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return -1;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

static int pool_workers;

static void
pool_auto(tgh_tg_opts *o)
{
    o->keepalive = -1;                 /* auto */
    o->keepalive_timeout_ms = 1500;
    o->workers = pool_workers;
}

/* One round: every client sends GET /slow?ms=100 at once, then each
 * reads its 200. */
static void
round_of(tgh_conn **c, int n)
{
    static const char rq[] = "GET /slow?ms=100 HTTP/1.1\r\nHost: t\r\n\r\n";
    tgh_resp r;

    for (int i = 0; i < n; i++)
        TGH_CHECK(tgh_conn_sendstr(c[i], rq) == 0, "send %d", i);
    for (int i = 0; i < n; i++) {
        TGH_CHECK(tgh_conn_read_response(c[i], &r, 0, 20000) == 0, "client %d: %s", i,
                  r.reason);
        TGH_CHECK(r.status == 200, "client %d: %d", i, r.status);
        tgh_resp_free(&r);
    }
}

/* keepalive: auto against one upstream: 1,000 clients in flight at once
 * open at most one upstream connection each, the next round reuses them
 * (no churn: no new connection), and once the clients are gone and the
 * idle ones expire (keepalive_timeout_ms), tollgate holds no more
 * descriptors than it held before. */
static void
pool_under_a_thousand_clients(int workers)
{
    enum { N = 1000 };
    static tgh_conn *c[N];
    tgh_stats s0, s1, s2;
    tgh_resp r;
    int fd0, fd1 = -1, fd2 = -1;
    uint64_t end;

    pool_workers = workers;
    start(pool_auto);
    TGH_CHECK(tgh_http(tg.port, "GET", "/", NULL, NULL, 0, &r, 5000) == 0, "warm-up");
    tgh_resp_free(&r);
    end = tgh_now_ms() + 5000;
    do {                                /* the warm-up's connections gone */
        tgh_sleep_ms(50);
        fd0 = fd_count(tg.proc->pid);
    } while (tgh_now_ms() < end && (fd0 != fd_count(tg.proc->pid)
                                    || wait_established_at_most(up.port, 0, 1) != 0));
    TGH_CHECK(tgh_testup_stats(up.port, &s0) == 0, "stats");
    for (int i = 0; i < N; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(c[i] != NULL, "connect %d", i);
    }
    round_of(c, N);
    TGH_CHECK(tgh_testup_stats(up.port, &s1) == 0, "stats");
    round_of(c, N);
    TGH_CHECK(tgh_testup_stats(up.port, &s2) == 0, "stats");
    cr_log_info("upstream connections: %ld in round 1, %ld in round 2; fds %d before",
                s1.connections - s0.connections, s2.connections - s1.connections, fd0);
    /* (each stats call is a connection of its own) */
    TGH_CHECK(s1.connections - s0.connections <= N + 1, "round 1 opened %ld",
              s1.connections - s0.connections);
    TGH_CHECK(s2.connections - s1.connections <= N / 20, "round 2 opened %ld more "
              "(churn)", s2.connections - s1.connections);
    for (int i = 0; i < N; i++)
        tgh_conn_close(c[i]);
    end = tgh_now_ms() + 15000;
    /* at most as many as before: one fewer was seen under load (a
     * descriptor of the warm-up, counted before, closed since) */
    while (tgh_now_ms() < end && (fd1 = fd_count(tg.proc->pid)) > fd0)
        tgh_sleep_ms(50);
    TGH_CHECK(fd1 <= fd0, "tollgate holds %d descriptors, %d before", fd1, fd0);
    TGH_CHECK(wait_established_at_most(up.port, 0, 5000) == 0, "upstream connections left");
    /* and it serves again from a cold pool */
    TGH_CHECK(tgh_http(tg.port, "GET", "/", NULL, NULL, 0, &r, 5000) == 0, "after");
    tgh_resp_free(&r);
    end = tgh_now_ms() + 5000;
    while (tgh_now_ms() < end && (fd2 = fd_count(tg.proc->pid)) != fd0 + 1)
        tgh_sleep_ms(20);
    TGH_CHECK(fd2 <= fd0 + 1, "fds %d after one more request", fd2);
}

/* The one worker accepts on its own socket (the accept path of
 * workers: 1); two get theirs from the main thread through their pipes. */
Test(conn, pool_auto_under_a_thousand_clients_one_worker)
{
    pool_under_a_thousand_clients(1);
}

Test(conn, pool_auto_under_a_thousand_clients_two_workers)
{
    pool_under_a_thousand_clients(2);
}

/* ---- a pooled connection the upstream closed ---------------------------- */

static void
one_worker(tgh_tg_opts *o)
{
    o->workers = 1;                    /* the client and the pool in one loop */
}

/* req on c while the pooled upstream connection dies under it: tollgate
 * is stopped while the request arrives and the upstream restarts, so on
 * waking it sees the request before (or with) the pooled connection's
 * end.  The answer's status; the restarted upstream's request count in
 * *seen.  Never a hang. */
/* The process's state letter in /proc/PID/stat ('T': stopped), or '?'. */
static char
proc_state(pid_t pid)
{
    char path[64], buf[512], *p;
    FILE *f;
    size_t n;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return '?';
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    p = strrchr(buf, ')');
    return p != NULL && p[1] == ' ' ? p[2] : '?';
}

static int
across_a_restart(tgh_conn *c, const char *req, long *seen)
{
    int port = up.port;
    tgh_stats st;
    tgh_resp r;
    int status;

    uint64_t end = tgh_now_ms() + 5000;

    tgh_proc_signal(tg.proc, SIGSTOP, 0);
    while (proc_state(tg.proc->pid) != 'T' && tgh_now_ms() < end)
        tgh_sleep_ms(1);
    TGH_CHECK(proc_state(tg.proc->pid) == 'T', "tollgate not stopped");
    TGH_CHECK(tgh_conn_sendstr(c, req) == 0, "send");
    tgh_proc_stop(up.proc, 5000);
    TGH_CHECK(tgh_testup_start_port(&up, port) == 0, "restart on %d", port);
    tgh_proc_signal(tg.proc, SIGCONT, 0);
    TGH_CHECK(tgh_conn_read_response(c, &r, 0, 10000) == 0, "no answer: %s", r.reason);
    status = r.status;
    tgh_resp_free(&r);
    TGH_CHECK(tgh_testup_stats(up.port, &st) == 0, "stats");
    *seen = st.requests;
    return status;
}

/* The keep-alive race, forced: an idempotent request on a pooled
 * connection the upstream had closed is sent again on a new one (200,
 * the upstream sees it once); a POST with a body is not: 502 when it went
 * out on the dead connection, 200 when tollgate saw the close first;
 * either way the upstream saw it at most once and the client its answer. */
Test(conn, dead_pooled_connection_retried_only_when_idempotent)
{
    static const char post[] = "POST /echo HTTP/1.1\r\nHost: t\r\n"
                               "Content-Length: 5\r\n\r\nhello";
    tgh_conn *c;
    tgh_resp r;
    long seen;
    int st;

    start(one_worker);
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    TGH_CHECK(roundtrip(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n", &r, 10000) == 0
              && r.status == 200, "warm-up");
    tgh_resp_free(&r);

    st = across_a_restart(c, "GET /echo HTTP/1.1\r\nHost: t\r\n\r\n", &seen);
    cr_log_info("GET across a restart: %d, upstream saw %ld", st, seen);
    TGH_CHECK(st == 200 && seen == 1, "GET: %d, the upstream saw %ld", st, seen);

    st = across_a_restart(c, post, &seen);
    cr_log_info("POST across a restart: %d, upstream saw %ld", st, seen);
    TGH_CHECK((st == 502 && seen == 0) || (st == 200 && seen == 1),
              "POST: %d, the upstream saw %ld", st, seen);
    tgh_conn_close(c);
}

/* ---- a lingering close ends by its bound, and is counted -------------- */

static void
linger_capped(tgh_tg_opts *o)
{
    o->http_extra = "max_requests_per_connection: 1, max_connections_per_ip: 3, "
                    "send_timeout_ms: 20000";
}

/* A socket with a 4 KiB receive window that asks for n bytes, the last
 * answer on its connection, and never reads nor closes. */
static int
non_reader(size_t n)
{
    int rcv = 4096, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(tg.port) };
    char req[128];

    cr_assert(fd >= 0);
    sa.sin_addr.s_addr = htonl(0x7f000001);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    TGH_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect");
    snprintf(req, sizeof req, "GET /bytes?n=%zu HTTP/1.1\r\nHost: t\r\n\r\n", n);
    TGH_CHECK(write(fd, req, strlen(req)) == (ssize_t)strlen(req), "write");
    return fd;
}

/*
 * Three clients from one address take the last answer of their
 * connection (it fits in the kernels' buffers, and most of it is unsent:
 * the close lingers) and never read nor close.  While they linger they
 * still hold their places (max_connections_per_ip 3: a fourth is closed
 * at accept); the linger ends by its bound (2 s, well before the 20 s
 * send timeout) and the places are free again.
 */
Test(conn, lingering_non_readers_end_by_the_bound_and_stay_counted)
{
    int fd[3];
    long v;

    start(linger_capped);
    uint64_t t0 = tgh_now_ms();
    while (connections_open() != 0 && tgh_now_ms() - t0 < 5000)
        tgh_sleep_ms(20);                       /* the harness's probes are gone */
    t0 = tgh_now_ms();
    for (int i = 0; i < 3; i++)
        fd[i] = non_reader(131072);
    while ((v = connections_open()) != 3 && tgh_now_ms() - t0 < 1500)
        tgh_sleep_ms(20);                       /* all three accepted */
    TGH_CHECK(v == 3, "%ld connections open, expected 3", v);
    tgh_conn *c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    size_t extra = 1;
    TGH_CHECK(tgh_conn_wait_closed(c, 1000, &extra) == 1 && extra == 0,
              "a fourth connection while three linger was not closed at accept");
    tgh_conn_close(c);
    while ((v = connections_open()) != 0 && tgh_now_ms() - t0 < 10000)
        tgh_sleep_ms(50);
    uint64_t took = tgh_now_ms() - t0;
    cr_log_info("three lingering non-readers gone after %llu ms", (unsigned long long)took);
    TGH_CHECK(v == 0 && took < 6000, "%ld connections still open after %llu ms (linger "
              "bound 2 s, send timeout 20 s)", v, (unsigned long long)took);
    c = tgh_conn_open(tg.port, 5000);
    tgh_resp r;
    TGH_CHECK(c != NULL && roundtrip(c, "GET / HTTP/1.1\r\nHost: t\r\n\r\n", &r, 10000) == 0
              && r.status == 200, "a connection after the lingering ones ended");
    tgh_resp_free(&r);
    tgh_conn_close(c);
    for (int i = 0; i < 3; i++)
        close(fd[i]);
}

/* ---- the idle timeout does not cut an answer still being sent ---------- */

static void
short_idle(tgh_tg_opts *o)
{
    o->idle_timeout_ms = 1000;
}

/* A client connected to port with a small MSS and receive window, so
 * that tollgate's kernel send buffer stays small too and most of a large
 * answer waits in tollgate's output; reads time out after 10 s. */
static int
narrow_client(int port)
{
    int rcv = 4096, mss = 536, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET };
    struct timeval tv = { 10, 0 };

    TGH_CHECK(fd >= 0, "socket");
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(0x7f000001);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof mss);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    TGH_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect");
    return fd;
}

/*
 * A keep-alive client with a small MSS and receive window (so tollgate's
 * kernel send buffer stays small too) asks for 200000 bytes: the upstream
 * gives them at once, most wait in tollgate's output.  It reads nothing
 * for 1.5 s, then all of it.  The connection waits for its next request
 * (the idle timeout, 1 s) only once the answer is out of tollgate; until
 * then a client that does not read is the send timeout's (30 s here).
 * So the answer is whole, and the connection then serves a next request.
 */
Test(conn, paused_reader_gets_the_whole_answer_past_the_idle_timeout)
{
    enum { N = 200000 };
    size_t cap = N + 4096, got = 0, body = 0;
    int fd;
    unsigned char *buf = malloc(cap), *eoh = NULL;
    static const char req[] = "GET /bytes?n=200000 HTTP/1.1\r\nHost: t\r\n\r\n";
    static const char req2[] = "GET /bytes?n=10 HTTP/1.1\r\nHost: t\r\n\r\n";
    ssize_t r = 0;

    start(short_idle);
    cr_assert(buf != NULL);
    fd = narrow_client(tg.port);
    TGH_CHECK(write(fd, req, sizeof req - 1) == (ssize_t)(sizeof req - 1), "write");
    tgh_sleep_ms(1500);                         /* past the idle timeout */
    while (!(eoh != NULL && body >= N) && (r = read(fd, buf + got, cap - got)) > 0) {
        got += (size_t)r;
        if (eoh == NULL)
            eoh = memmem(buf, got, "\r\n\r\n", 4);
        body = eoh != NULL ? got - (size_t)(eoh + 4 - buf) : 0;
    }
    int err = errno;
    TGH_CHECK(eoh != NULL && body == N, "the answer was cut at %zu of %d body bytes "
              "(idle timeout 1000 ms, read after 1500 ms), then %s", body, N,
              r == 0 ? "EOF" : strerror(err));
    TGH_CHECK(write(fd, req2, sizeof req2 - 1) == (ssize_t)(sizeof req2 - 1), "write 2");
    got = 0;
    eoh = NULL;
    while ((r = read(fd, buf + got, cap - got)) > 0) {
        got += (size_t)r;
        if ((eoh = memmem(buf, got, "\r\n\r\n", 4)) != NULL
            && got - (size_t)(eoh + 4 - buf) >= 10)
            break;
    }
    TGH_CHECK(eoh != NULL && memcmp(buf, "HTTP/1.1 200", 12) == 0,
              "no answer to the next request on the connection");
    free(buf);
    close(fd);
}

/* ---- the send timeout is a gap, also when closing after the answer ---- */

static void
short_send(tgh_tg_opts *o)
{
    o->http_extra = "send_timeout_ms: 1000";
}

/* Ask a narrow client for 1,000,000 bytes with Connection: close, wait
 * wait_ms, then read to the end, pace_ms between reads of at most 16 KiB:
 * the body bytes that came (*body), whether the stream ended (EOF or a
 * reset: 0, else errno), and whether it began with a 200 (*ok). */
enum { CLOSE_N = 1000000 };

static int
read_close_answer(int wait_ms, int pace_ms, size_t *body, int *ok)
{
    static const char req[] = "GET /bytes?n=1000000 HTTP/1.1\r\nHost: t\r\n"
                              "Connection: close\r\n\r\n";
    size_t cap = CLOSE_N + 4096, got = 0;
    unsigned char *buf = malloc(cap), *eoh = NULL;
    int fd = narrow_client(tg.port), err;
    ssize_t r;

    cr_assert(buf != NULL);
    TGH_CHECK(write(fd, req, sizeof req - 1) == (ssize_t)(sizeof req - 1), "write");
    tgh_sleep_ms(wait_ms);
    *body = 0;
    while ((r = read(fd, buf + got, cap - got < 16384 ? cap - got : 16384)) > 0) {
        got += (size_t)r;
        if (eoh == NULL)
            eoh = memmem(buf, got, "\r\n\r\n", 4);
        *body = eoh != NULL ? got - (size_t)(eoh + 4 - buf) : 0;
        if (pace_ms > 0)
            tgh_sleep_ms(pace_ms);
    }
    err = r == 0 || errno == ECONNRESET ? 0 : errno;
    *ok = eoh != NULL && memcmp(buf, "HTTP/1.1 200", 12) == 0;
    free(buf);
    close(fd);
    return err;
}

/*
 * A narrow client asks for 1,000,000 bytes with Connection: close and
 * reads them steadily, what its window holds every 20 ms (~150 kB/s:
 * about 7 s in all), never a pause near the send timeout (1 s), which
 * bounds the gap between two writes.  The answer is whole.  Before,
 * closing after the answer armed the send timeout once for all that was
 * left in tollgate's output (up to 256 KiB, ~1.7 s at that pace): the
 * end was cut.
 */
Test(conn, steady_slow_reader_gets_the_whole_answer_before_a_close)
{
    size_t body;
    int ok, err;

    start(short_send);
    err = read_close_answer(0, 20, &body, &ok);
    cr_log_info("Connection: close, 1,000,000 bytes read steadily: %zu, then %s", body,
                err == 0 ? "the end" : strerror(err));
    TGH_CHECK(ok, "no 200");
    TGH_CHECK(err == 0 && body == CLOSE_N, "the answer was cut at %zu of %d body bytes "
              "(send timeout 1000 ms, the client never paused), then %s", body, CLOSE_N,
              err == 0 ? "the end" : strerror(err));
}

/*
 * The same request from a client that reads nothing: closing after the
 * answer still ends by the send timeout (1 s without a write), not never.
 * After 3 s the client reads what reached it: the end of the stream (EOF
 * or a reset) comes before the whole answer.
 */
Test(conn, non_reader_closing_after_the_answer_ends_by_the_send_timeout)
{
    size_t body;
    int ok, err;

    start(short_send);
    err = read_close_answer(3000, 0, &body, &ok);   /* three send timeouts */
    cr_log_info("a non-reader, Connection: close: %zu of %d body bytes, then %s", body,
                CLOSE_N, err == 0 ? "the end" : strerror(err));
    TGH_CHECK(err == 0, "the connection did not end: %s", strerror(err));
    TGH_CHECK(body < CLOSE_N, "the whole answer reached a client that read nothing for 3 s "
              "(send timeout 1 s)");
}
