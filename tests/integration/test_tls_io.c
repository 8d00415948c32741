/*
 * test_tls_io.c - the bytes of TLS client connections: a small response
 * is one TLS record, large responses (Content-Length and chunked) arrive
 * byte-exact, pipelined requests are answered in order (also past the
 * high-water mark), a client that stops reading is bounded in what
 * tollgate buffers for it and closed at send_timeout_ms, and clients that
 * vanish (reset, no close_notify) harm no one.
 */
#include <criterion/criterion.h>

#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "harness.h"

TestSuite(tls_io, .fini = tgh_cleanup, .timeout = 120);

static tgh_upstream up;
static tgh_tollgate tg;
static int tls_port;
static int tls_workers;           /* > 0: http.workers (start_cert) */
static int tls12;                 /* tls_open: TLS 1.2, not 1.3 */

/* tollgate with a certificate made by `openssl req -newkey newkey`. */
static void
start_cert(const char *http_extra, const char *newkey)
{
    signal(SIGPIPE, SIG_IGN);
    tls_port = tgh_tls_tollgate_start(&up, &tg, newkey, tls_workers, http_extra);
    TGH_CHECK(tls_port > 0, "tollgate with a TLS listener");
}

static void
start(const char *http_extra)
{
    start_cert(http_extra, "ec -pkeyopt ec_paramgen_curve:prime256v1");
}

/* ---- a TLS client with its own read buffer ------------------------------ */

typedef struct tls_conn {
    int            fd;
    SSL_CTX       *ctx;
    SSL           *ssl;
    unsigned       app_records;     /* application-data records received */
    unsigned char *buf;
    size_t         off, len, cap;
} tls_conn;

/* Counts the records received whose inner content type (TLS 1.3) is
 * application data. */
static void
msg_cb(int write_p, int version, int content_type, const void *buf, size_t len,
       SSL *ssl, void *arg)
{
    (void)version;
    (void)ssl;
    if (!write_p && content_type == SSL3_RT_INNER_CONTENT_TYPE && len == 1
        && ((const unsigned char *)buf)[0] == SSL3_RT_APPLICATION_DATA)
        ((tls_conn *)arg)->app_records++;
}

static tls_conn *
tls_open(int port)
{
    tls_conn *t = calloc(1, sizeof *t);
    const char *why = NULL;

    cr_assert_not_null(t);
    t->ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(t->ctx, tls12 ? TLS1_2_VERSION : TLS1_3_VERSION);
    if (tls12)
        SSL_CTX_set_max_proto_version(t->ctx, TLS1_2_VERSION);
    SSL_CTX_set_msg_callback(t->ctx, msg_cb);      /* its SSL takes them */
    SSL_CTX_set_msg_callback_arg(t->ctx, t);
    t->ssl = tgh_tls_connect(t->ctx, port, 10000, NULL, &why);
    TGH_CHECK(t->ssl != NULL, "TLS: %s", why);
    t->fd = SSL_get_fd(t->ssl);
    t->cap = 1 << 16;
    t->buf = malloc(t->cap);
    cr_assert_not_null(t->buf);
    return t;
}

static void
tls_close(tls_conn *t)
{
    SSL_free(t->ssl);
    SSL_CTX_free(t->ctx);
    close(t->fd);
    free(t->buf);
    free(t);
    ERR_clear_error();
}

static void
tls_send(tls_conn *t, const char *s)
{
    TGH_CHECK(SSL_write(t->ssl, s, (int)strlen(s)) == (int)strlen(s), "SSL_write");
}

/* At least want unread bytes in t->buf; 0, or -1 at EOF/error first. */
static int
fill(tls_conn *t, size_t want)
{
    while (t->len - t->off < want) {
        int n;
        if (t->off != 0) {
            memmove(t->buf, t->buf + t->off, t->len - t->off);
            t->len -= t->off;
            t->off = 0;
        }
        if (t->len == t->cap) {
            t->cap *= 2;
            t->buf = realloc(t->buf, t->cap);
            cr_assert_not_null(t->buf);
        }
        n = SSL_read(t->ssl, t->buf + t->len, (int)(t->cap - t->len > (1 << 20)
                                                    ? 1 << 20 : t->cap - t->len));
        if (n <= 0)
            return -1;
        t->len += (size_t)n;
    }
    return 0;
}

/* The next line (CRLF dropped) into line; 0 / -1. */
static int
get_line(tls_conn *t, char *line, size_t cap)
{
    for (size_t scan = 0;; ) {
        unsigned char *lf;
        if (t->len - t->off > scan
            && (lf = memchr(t->buf + t->off + scan, '\n', t->len - t->off - scan)) != NULL) {
            size_t n = (size_t)(lf - (t->buf + t->off));
            if (n == 0 || t->buf[t->off + n - 1] != '\r' || n - 1 >= cap)
                return -1;
            memcpy(line, t->buf + t->off, n - 1);
            line[n - 1] = '\0';
            t->off += n + 1;
            return 0;
        }
        scan = t->len - t->off;
        if (fill(t, scan + 1) != 0)
            return -1;
    }
}

/* One response: its status, and its body (Content-Length or chunked)
 * into *body (malloc'd, *blen bytes).  0 / -1. */
static int
read_response(tls_conn *t, int *status, unsigned char **body, size_t *blen)
{
    char line[8192];
    long long cl = -1;
    int chunked = 0;
    size_t len = 0, cap = 1 << 16;
    unsigned char *b;

    if (get_line(t, line, sizeof line) != 0 || sscanf(line, "HTTP/1.1 %d", status) != 1)
        return -1;
    for (;;) {
        if (get_line(t, line, sizeof line) != 0)
            return -1;
        if (line[0] == '\0')
            break;
        if (strncasecmp(line, "Content-Length:", 15) == 0)
            cl = atoll(line + 15);
        if (strncasecmp(line, "Transfer-Encoding:", 18) == 0 && strstr(line, "chunked"))
            chunked = 1;
    }
    b = malloc(cap);
    cr_assert_not_null(b);
    for (;;) {
        size_t n;
        if (chunked) {
            if (get_line(t, line, sizeof line) != 0)
                goto fail;
            n = strtoul(line, NULL, 16);
        } else {
            if (cl < 0)
                goto fail;
            n = (size_t)cl;
        }
        if (len + n > cap) {
            while (len + n > cap)
                cap *= 2;
            b = realloc(b, cap);
            cr_assert_not_null(b);
        }
        if (fill(t, n) != 0)
            goto fail;
        memcpy(b + len, t->buf + t->off, n);
        t->off += n;
        len += n;
        if (!chunked)
            break;
        if (get_line(t, line, sizeof line) != 0 || line[0] != '\0')
            goto fail;          /* the CRLF after the data, or the trailer end */
        if (n == 0)
            break;
    }
    *body = b;
    *blen = len;
    return 0;
fail:
    free(b);
    return -1;
}

/* 1 when b holds tg-testup's pattern (byte i = (i * 31 + 7) & 0xff). */
static int
is_pattern(const unsigned char *b, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (b[i] != (unsigned char)((i * 31 + 7) & 0xff))
            return 0;
    return 1;
}

/* GET path on t: 200 with n pattern bytes, else the test fails. */
static void
get_pattern(tls_conn *t, const char *path, size_t n)
{
    char *req = tgh_strf("GET %s HTTP/1.1\r\nHost: t\r\n\r\n", path);
    unsigned char *body;
    size_t blen;
    int status;

    tls_send(t, req);
    free(req);
    TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "%s: no response", path);
    TGH_CHECK(status == 200 && blen == n && is_pattern(body, blen),
              "%s: status %d, %zu bytes (want %zu), pattern %s", path, status, blen, n,
              is_pattern(body, blen) ? "ok" : "wrong");
    free(body);
}

/* ---- tests -------------------------------------------------------------- */

/* A response of up to 16 KiB (head and body) is written as one record,
 * not one per buffer chain (bufferevent_openssl wrote the head and the
 * body as two). */
Test(tls_io, small_response_is_one_record)
{
    static const size_t sizes[] = { 2, 100, 4000, 15000 };

    start(NULL);
    tls_conn *t = tls_open(tls_port);
    get_pattern(t, "/bytes?n=10", 10);          /* session tickets etc. first */
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        char *path = tgh_strf("/bytes?n=%zu", sizes[i]);
        t->app_records = 0;
        get_pattern(t, path, sizes[i]);
        TGH_CHECK(t->app_records == 1, "%s: the response came in %u records, not 1",
                  path, t->app_records);
        free(path);
    }
    tls_close(t);
}

/* Large responses, Content-Length framed and chunked, arrive byte-exact
 * over one keep-alive connection. */
Test(tls_io, large_responses_intact)
{
    start(NULL);
    tls_conn *t = tls_open(tls_port);
    get_pattern(t, "/bytes?n=8388608", 8388608);
    get_pattern(t, "/chunked?n=1048576&chunks=37", 1048576);
    get_pattern(t, "/bytes?n=16385", 16385);
    get_pattern(t, "/bytes?n=1", 1);
    tls_close(t);
}

/* Requests sent in one write are answered in order; with answers that
 * pass the high-water mark while the client does not read yet, too. */
Test(tls_io, pipelined_requests_in_order)
{
    enum { N = 40, BIG = 6 };
    char req[N * 64] = "";

    start(NULL);
    tls_conn *t = tls_open(tls_port);
    for (int i = 0; i < N; i++) {
        char one[64];
        snprintf(one, sizeof one, "GET /bytes?n=%d HTTP/1.1\r\nHost: t\r\n\r\n", 1 + i * 97);
        strcat(req, one);
    }
    tls_send(t, req);
    for (int i = 0; i < N; i++) {
        unsigned char *body;
        size_t blen;
        int status;
        TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "response %d missing", i);
        TGH_CHECK(status == 200 && blen == (size_t)(1 + i * 97) && is_pattern(body, blen),
                  "response %d: status %d, %zu bytes", i, status, blen);
        free(body);
    }

    /* 6 x 1 MiB asked at once: the answers queue past the high-water mark */
    req[0] = '\0';
    for (int i = 0; i < BIG; i++)
        strcat(req, "GET /bytes?n=1048576 HTTP/1.1\r\nHost: t\r\n\r\n");
    tls_send(t, req);
    tgh_sleep_ms(300);                          /* let them pile up */
    for (int i = 0; i < BIG; i++) {
        unsigned char *body;
        size_t blen;
        int status;
        TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "big response %d missing", i);
        TGH_CHECK(status == 200 && blen == 1048576 && is_pattern(body, blen),
                  "big response %d: status %d, %zu bytes", i, status, blen);
        free(body);
    }
    tls_close(t);
}

/* Resident memory of tollgate, in KiB (0 if unknown). */
static long
rss_kib(void)
{
    char path[64], line[256];
    long kib = 0;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/status", (int)tg.proc->pid);
    if ((f = fopen(path, "r")) == NULL)
        return 0;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "VmRSS: %ld", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

/* A client that asks for 1 GiB and stops reading: tollgate buffers a
 * bounded amount for it (backpressure to the upstream), and closes the
 * connection once nothing could be written for send_timeout_ms. */
Test(tls_io, stalled_reader_bounded_and_timed_out)
{
    char buf[65536];
    size_t got = 0;
    long rss0, rss1;
    int n;

    start("send_timeout_ms: 1500");
    tls_conn *t = tls_open(tls_port);
    get_pattern(t, "/bytes?n=1000", 1000);
    rss0 = rss_kib();
    tls_send(t, "GET /bytes?n=1073741824 HTTP/1.1\r\nHost: t\r\n\r\n");
    tgh_sleep_ms(1000);                         /* inside the send timeout */
    rss1 = rss_kib();
    TGH_CHECK(rss1 - rss0 < 32 * 1024, "tollgate grew by %ld KiB for a client that does "
              "not read", rss1 - rss0);
    tgh_sleep_ms(3000);                         /* past it */
    uint64_t t0 = tgh_now_ms();
    while ((n = SSL_read(t->ssl, buf, sizeof buf)) > 0 && tgh_now_ms() - t0 < 20000)
        got += (size_t)n;
    TGH_CHECK(n <= 0, "still reading after 20 s (%zu bytes)", got);
    TGH_CHECK(got < ((size_t)1 << 30) / 4, "read %zu bytes of 1 GiB after the send timeout",
              got);
    cr_log_info("stalled reader: %zu bytes queued in the kernels, RSS +%ld KiB", got,
                rss1 - rss0);
    tls_close(t);
}

/* Clients that go away mid-response (a reset with 64 MiB still due) or
 * without close_notify cost nothing else: tollgate lives on and the next
 * connections are answered. */
Test(tls_io, clients_gone_mid_response)
{
    char buf[65536];
    size_t got = 0;
    int n;

    start(NULL);
    for (int k = 0; k < 3; k++) {
        tls_conn *t = tls_open(tls_port);
        tls_send(t, "GET /bytes?n=67108864 HTTP/1.1\r\nHost: t\r\n\r\n");
        got = 0;
        while (got < 200000 && (n = SSL_read(t->ssl, buf, sizeof buf)) > 0)
            got += (size_t)n;
        TGH_CHECK(got >= 200000, "the response did not begin (%zu bytes)", got);
        tls_close(t);                           /* unread data: a reset */
    }
    for (int k = 0; k < 3; k++) {
        tls_conn *t = tls_open(tls_port);
        get_pattern(t, "/bytes?n=5000", 5000);
        close(t->fd);                           /* no close_notify */
        t->fd = -1;
        tls_close(t);
    }
    tls_conn *t = tls_open(tls_port);
    get_pattern(t, "/bytes?n=70000", 70000);
    tls_close(t);
    TGH_CHECK(tgh_proc_alive(tg.proc), "tollgate died");
}

/* CPU time tollgate has used so far, in ms. */
static long
cpu_ms(void)
{
    char path[64], buf[1024], *p;
    unsigned long ut = 0, st = 0;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)tg.proc->pid);
    if ((f = fopen(path, "r")) == NULL)
        return 0;
    p = fgets(buf, sizeof buf, f);
    fclose(f);
    if (p == NULL || (p = strrchr(buf, ')')) == NULL
        || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return 0;
    return (long)((ut + st) * 1000 / (unsigned long)sysconf(_SC_CLK_TCK));
}

/* A client that stops reading a large response (tollgate's writes wait
 * for the socket) and then asks for a key update (its answer must be
 * written before anything else is read) and keeps sending: tollgate does
 * not spin on the readable socket, and once the client reads again the
 * response and the next one arrive intact. */
Test(tls_io, key_update_while_output_waits)
{
    unsigned char *body;
    size_t blen;
    int status;

    start("send_timeout_ms: 30000");
    tls_conn *t = tls_open(tls_port);
    get_pattern(t, "/bytes?n=10", 10);
    tls_send(t, "GET /bytes?n=16777216 HTTP/1.1\r\nHost: t\r\n\r\n");
    tgh_sleep_ms(1000);                         /* the kernels' buffers fill */
    TGH_CHECK(SSL_key_update(t->ssl, SSL_KEY_UPDATE_REQUESTED) == 1, "SSL_key_update");
    long cpu0 = cpu_ms();
    tls_send(t, "GET /bytes?n=3 HTTP/1.1\r\nHost: t\r\n");
    for (int i = 0; i < 20; i++) {              /* more records: the socket stays readable */
        tls_send(t, "X-Pad: 0123456789012345678901234567890123456789\r\n");
        tgh_sleep_ms(50);
    }
    tls_send(t, "\r\n");
    tgh_sleep_ms(1000);
    long used = cpu_ms() - cpu0;
    cr_log_info("key update with stalled output: tollgate used %ld ms of CPU in ~2 s", used);
    TGH_CHECK(used < 500, "tollgate used %ld ms of CPU in ~2 s on a stalled connection", used);
    TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "the 16 MiB response broke off");
    TGH_CHECK(status == 200 && blen == 16777216 && is_pattern(body, blen),
              "16 MiB: status %d, %zu bytes", status, blen);
    free(body);
    TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "the pipelined response is missing");
    TGH_CHECK(status == 200 && blen == 3 && is_pattern(body, blen), "pipelined: %d, %zu", status, blen);
    free(body);
    tls_close(t);
}

/* A client that sends plaintext (not records) after its handshake, or a
 * record with a broken MAC: tollgate ends that connection at once (an
 * alert or a close, no answer), spends nothing on it meanwhile, and
 * serves the next one. */
Test(tls_io, garbage_after_the_handshake)
{
    static const char plain[] = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    char buf[4096];

    start(NULL);
    for (int k = 0; k < 2; k++) {
        tls_conn *t = tls_open(tls_port);
        get_pattern(t, "/bytes?n=10", 10);
        long cpu0 = cpu_ms();
        uint64_t t0 = tgh_now_ms();
        if (k == 0) {
            TGH_CHECK(write(t->fd, plain, sizeof plain - 1) == (ssize_t)(sizeof plain - 1),
                      "write");
        } else {
            /* an application-data record header and 40 bytes of noise */
            unsigned char rec[45] = { 0x17, 0x03, 0x03, 0x00, 40 };
            for (size_t i = 5; i < sizeof rec; i++)
                rec[i] = (unsigned char)(i * 37);
            TGH_CHECK(write(t->fd, rec, sizeof rec) == (ssize_t)sizeof rec, "write");
        }
        int n = SSL_read(t->ssl, buf, sizeof buf);
        TGH_CHECK(n <= 0, "an answer (%d bytes) to garbage", n);
        TGH_CHECK(tgh_now_ms() - t0 < 3000, "the connection lived %llu ms after garbage",
                  (unsigned long long)(tgh_now_ms() - t0));
        TGH_CHECK(cpu_ms() - cpu0 < 200, "tollgate spent %ld ms of CPU on it",
                  cpu_ms() - cpu0);
        tls_close(t);
    }
    tls_conn *t = tls_open(tls_port);
    get_pattern(t, "/bytes?n=100", 100);
    tls_close(t);
    TGH_CHECK(tgh_proc_alive(tg.proc), "tollgate died");
}

/* Request bodies over TLS reach the upstream byte-exact: 3 MiB in large
 * writes (records of 16 KiB, many per read), and 3000 bytes as 300
 * records of 10 bytes; /echo sends them back. */
Test(tls_io, request_bodies_intact)
{
    static const size_t sizes[] = { 3u << 20, 3000 };

    start(NULL);
    tls_conn *t = tls_open(tls_port);
    for (size_t k = 0; k < 2; k++) {
        size_t n = sizes[k], step = k == 0 ? 100000 : 10;
        unsigned char *b = malloc(n), *body;
        size_t blen;
        int status;
        char *head = tgh_strf("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %zu\r\n\r\n", n);

        cr_assert_not_null(b);
        tgh_fill_testup_pattern(b, n);
        tls_send(t, head);
        free(head);
        for (size_t off = 0; off < n; off += step) {
            int w = (int)(n - off < step ? n - off : step);
            TGH_CHECK(SSL_write(t->ssl, b + off, w) == w, "SSL_write at %zu", off);
        }
        TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "%zu: no response", n);
        TGH_CHECK(status == 200 && blen == n && is_pattern(body, blen),
                  "%zu-byte body: status %d, %zu bytes back, pattern %s", n, status, blen,
                  is_pattern(body, blen) ? "ok" : "wrong");
        free(body);
        free(b);
    }
    tls_close(t);
}

/*
 * A server flight larger than the socket takes (a certificate of ~250 KiB,
 * a client with a small MSS and receive window that does not read it
 * yet): the handshake waits for the socket to be writable.  The client
 * sends a record meanwhile (a middlebox-compatibility change_cipher_spec,
 * which TLS 1.3 ignores): the socket is readable, but the handshake
 * cannot read before it has written, and tollgate must not spin on that
 * socket until the handshake timeout.  Then the client reads: the
 * handshake ends and a request is answered.
 */
Test(tls_io, handshake_waiting_to_write_does_not_spin)
{
    static const unsigned char ccs[] = { 0x14, 0x03, 0x03, 0x00, 0x01, 0x01 };
    int rcv = 2048, mss = 536, fd;
    struct sockaddr_in sa = { .sin_family = AF_INET };
    struct timeval tv = { 10, 0 };
    char *newkey;

    /* ~250 KiB of subjectAltName (openssl req's config: too long for an
     * argument) */
    char *cnf = tgh_strf("%s/big.cnf", tgh_tmpdir());
    FILE *f = fopen(cnf, "w");
    cr_assert_not_null(f);
    fprintf(f, "[req]\ndistinguished_name = dn\nx509_extensions = v3\n[dn]\n"
               "[v3]\nsubjectAltName = @alt\n[alt]\nDNS.1 = localhost\n");
    for (int i = 2; i < 12000; i++)
        fprintf(f, "DNS.%d = h%05d.example.test\n", i, i);
    fclose(f);
    newkey = tgh_strf("ec -pkeyopt ec_paramgen_curve:prime256v1 -config %s", cnf);
    free(cnf);
    start_cert("handshake_timeout_ms: 8000", newkey);
    free(newkey);

    fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert(fd >= 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof mss);  /* a small send buffer */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    sa.sin_port = htons((uint16_t)tls_port);
    sa.sin_addr.s_addr = htonl(0x7f000001);
    TGH_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect");

    tls_conn *t = calloc(1, sizeof *t);
    cr_assert_not_null(t);
    t->fd = fd;
    t->ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_3_VERSION);
    SSL_CTX_clear_options(t->ctx, SSL_OP_ENABLE_MIDDLEBOX_COMPAT);  /* ours is the one CCS */
    SSL_CTX_set_max_cert_list(t->ctx, 1 << 20);
    t->ssl = SSL_new(t->ctx);
    t->cap = 1 << 16;
    t->buf = malloc(t->cap);
    cr_assert(t->ssl != NULL && t->buf != NULL);
    /* the ClientHello alone: a memory BIO for reading, so that the
     * handshake stops there */
    BIO *rb = BIO_new(BIO_s_mem()), *wb = BIO_new_socket(fd, BIO_NOCLOSE);
    SSL_set_bio(t->ssl, rb, wb);
    SSL_set_connect_state(t->ssl);
    TGH_CHECK(SSL_do_handshake(t->ssl) == -1
              && SSL_get_error(t->ssl, -1) == SSL_ERROR_WANT_READ, "ClientHello");
    tgh_sleep_ms(500);                          /* the server's flight fills the socket */
    TGH_CHECK(write(fd, ccs, sizeof ccs) == (ssize_t)sizeof ccs, "change_cipher_spec");
    tgh_sleep_ms(100);
    long cpu0 = cpu_ms();
    tgh_sleep_ms(1500);
    long used = cpu_ms() - cpu0;
    cr_log_info("handshake waiting to write, a record unread: %ld ms of CPU in 1.5 s", used);
    TGH_CHECK(used < 300, "tollgate used %ld ms of CPU in 1.5 s on one handshake that "
              "waits for the socket", used);

    SSL_set_fd(t->ssl, fd);                     /* the socket for reading too */
    TGH_CHECK(SSL_do_handshake(t->ssl) == 1, "the handshake did not end: %s",
              ERR_reason_error_string(ERR_peek_error()));
    get_pattern(t, "/bytes?n=10", 10);
    tls_close(t);
}

/* A client that sends close_notify while its answer streams (TLS 1.3
 * half-close: it reads on) gets the whole answer, then tollgate's
 * close_notify; one that sends it before its answer began is left at once
 * (the upstream exchange abandoned, as after a FIN). */
Test(tls_io, close_notify_from_the_client)
{
    unsigned char *body;
    size_t blen;
    int status;
    char buf[256];

    start(NULL);
    tls_conn *t = tls_open(tls_port);
    tls_send(t, "GET /bytes?n=4194304 HTTP/1.1\r\nHost: t\r\n\r\n");
    TGH_CHECK(fill(t, 100000) == 0, "the answer did not begin");
    TGH_CHECK(SSL_shutdown(t->ssl) == 0, "close_notify");
    TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "the answer broke off");
    TGH_CHECK(status == 200 && blen == 4194304 && is_pattern(body, blen),
              "status %d, %zu bytes", status, blen);
    free(body);
    TGH_CHECK(SSL_read(t->ssl, buf, sizeof buf) <= 0
              && SSL_get_error(t->ssl, 0) == SSL_ERROR_ZERO_RETURN,
              "no close_notify from tollgate after the answer");
    tls_close(t);

    t = tls_open(tls_port);
    uint64_t t0 = tgh_now_ms();
    tls_send(t, "GET /slow?ms=3000 HTTP/1.1\r\nHost: t\r\n\r\n");
    TGH_CHECK(SSL_shutdown(t->ssl) == 0, "close_notify");
    TGH_CHECK(SSL_read(t->ssl, buf, sizeof buf) <= 0, "an answer after close_notify");
    TGH_CHECK(tgh_now_ms() - t0 < 2000, "left after %llu ms, not at once",
              (unsigned long long)(tgh_now_ms() - t0));
    tls_close(t);
}

/* A slow reader of a long answer, with its close_notify sent: tollgate
 * may finish the answer before it reads the alert, and then meets it
 * between requests.  Its own close_notify must come there too (after the
 * answer, before the TCP close), each time. */
Test(tls_io, close_notify_after_a_slow_reader)
{
    const size_t n = 1 << 20;
    unsigned char *body;
    size_t blen;
    int status;
    char buf[256];

    start(NULL);
    for (int i = 0; i < 4; i++) {
        tls_conn *t = tls_open(tls_port);
        tls_send(t, "GET /bytes?n=1048576 HTTP/1.1\r\nHost: t\r\n\r\n");
        TGH_CHECK(fill(t, 1) == 0, "the answer did not begin");
        TGH_CHECK(SSL_shutdown(t->ssl) == 0, "close_notify");
        /* a record at a time, a pause after each: the sender stays ahead */
        while (t->len - t->off < n) {
            TGH_CHECK(fill(t, t->len - t->off + 1) == 0, "the answer broke off after "
                      "%zu bytes", t->len - t->off);
            usleep(1000);
        }
        TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "the answer broke off");
        TGH_CHECK(status == 200 && blen == n && is_pattern(body, blen),
                  "status %d, %zu bytes", status, blen);
        free(body);
        int last = SSL_read(t->ssl, buf, sizeof buf), err = SSL_get_error(t->ssl, last);
        TGH_CHECK(last <= 0 && err == SSL_ERROR_ZERO_RETURN,
                  "connection %d: no close_notify from tollgate after the answer "
                  "(SSL_read %d, error %d, errno %d, %s)", i, last, err, errno,
                  ERR_reason_error_string(ERR_peek_error()));
        tls_close(t);
    }
}

/* ---- memory of idle connections ----------------------------------------- */

static long
vmrss_kb(pid_t pid)
{
    return tgh_proc_status_kb(pid, "VmRSS");
}

/* VmRSS of pid once three readings 100 ms apart agree (at most 5 s). */
static long
settled_rss_kb(pid_t pid)
{
    long last = -1, v;
    int same = 0;
    uint64_t end = tgh_now_ms() + 5000;

    while ((v = vmrss_kb(pid)) > 0 && tgh_now_ms() < end) {
        same = v == last ? same + 1 : 0;
        if (same >= 2)
            break;
        last = v;
        tgh_sleep_ms(100);
    }
    return v;
}

/* Resident memory under ASan is ASan's: the bound is checked in the
 * plain build only. */
#if defined(__SANITIZE_ADDRESS__)
#define RSS_EACH_BOUND LONG_MAX
#else
#define RSS_EACH_BOUND 22500L
#endif

/* Bytes of VmRSS per connection over rss0 once they are under bound
 * (tollgate releases on its timer; a loaded machine may run it late), or
 * as they are after 5 s. */
static long
rss_each_under(pid_t pid, long rss0, int nconn, long bound)
{
    uint64_t end = tgh_now_ms() + 5000;
    long v, each;

    for (;;) {
        v = vmrss_kb(pid);
        TGH_CHECK(rss0 > 0 && v > 0, "cannot read VmRSS");
        each = (v - rss0) * 1024 / nconn;
        if (each < bound || tgh_now_ms() >= end)
            return each;
        tgh_sleep_ms(100);
    }
}

/*
 * An idle keep-alive TLS connection holds no OpenSSL record buffers (18
 * and 17 KiB, a few pages of them touched): they are given back once it
 * has waited TG_TLS_IDLE_MS (100 ms) for its next request, and the
 * connections opened next take them.  NCONN connections opened one after
 * the other, one request each, then idle: tollgate's VmRSS grows by less
 * than 22.5 kB each (27.2 kB before; 18.3 kB when every response gives
 * them back; nginx: 14.9 kB), and they still answer (a large response
 * takes the buffers again).  Resident memory under ASan is ASan's: the
 * bound is checked in the plain build only.
 */
Test(tls_io, idle_connections_give_back_their_buffers)
{
    enum { NCONN = 500 };
    static tls_conn *c[NCONN];
    long rss0, each;
    int i;

    if (tgh_need_nofile(NCONN + 512) != 0)      /* tollgate inherits it */
        cr_skip_test("RLIMIT_NOFILE cannot reach %d", NCONN + 512);
    tls_workers = 1;
    unsetenv("MALLOC_PERTURB_");     /* meson test's: it touches freed memory */
    start("max_connections_per_ip: 0");
    c[0] = tls_open(tls_port);                    /* first allocations */
    get_pattern(c[0], "/bytes?n=100", 100);
    tls_close(c[0]);
    rss0 = settled_rss_kb(tg.proc->pid);
    for (i = 0; i < NCONN; i++) {
        c[i] = tls_open(tls_port);
        get_pattern(c[i], "/bytes?n=100", 100);
    }
    each = rss_each_under(tg.proc->pid, rss0, NCONN, RSS_EACH_BOUND);
    cr_log_info("%d idle TLS connections: %ld bytes each", NCONN, each);
    TGH_CHECK(each < RSS_EACH_BOUND, "%d idle TLS connections grew VmRSS by %ld "
              "bytes each", NCONN, each);
    for (i = 0; i < NCONN; i++) {
        if (i % 10 == 0)
            get_pattern(c[i], "/bytes?n=20000", 20000);   /* buffers again */
        tls_close(c[i]);
    }
}

/*
 * The same for connections that complete the handshake and send nothing
 * (a slow or idle client, or a flood of handshakes): their buffers go
 * back TG_TLS_IDLE_MS after the handshake, not at the header timeout
 * (10 s: every reading is taken well before it).
 * 27.3 kB each before, ~19 kB after; and each still gets its answer.
 */
Test(tls_io, handshaken_connections_without_a_request_give_back_their_buffers)
{
    enum { NCONN = 500 };
    static tls_conn *c[NCONN];
    long rss0, each;
    uint64_t t0;
    int i;

    if (tgh_need_nofile(NCONN + 512) != 0)      /* tollgate inherits it */
        cr_skip_test("RLIMIT_NOFILE cannot reach %d", NCONN + 512);
    tls_workers = 1;
    unsetenv("MALLOC_PERTURB_");     /* meson test's: it touches freed memory */
    start("max_connections_per_ip: 0");   /* header timeout 10 s */
    c[0] = tls_open(tls_port);                    /* first allocations */
    get_pattern(c[0], "/bytes?n=100", 100);
    tls_close(c[0]);
    rss0 = settled_rss_kb(tg.proc->pid);
    t0 = tgh_now_ms();
    for (i = 0; i < NCONN; i++)
        c[i] = tls_open(tls_port);                /* the handshake only */
    each = rss_each_under(tg.proc->pid, rss0, NCONN, RSS_EACH_BOUND);
    TGH_CHECK(tgh_now_ms() - t0 < 9000, "too slow to measure before the "
              "header timeout: %llu ms", (unsigned long long)(tgh_now_ms() - t0));
    cr_log_info("%d handshaken TLS connections: %ld bytes each", NCONN, each);
    TGH_CHECK(each < RSS_EACH_BOUND, "%d handshaken TLS connections grew VmRSS by "
              "%ld bytes each", NCONN, each);
    for (i = 0; i < NCONN; i++) {
        if (i % 10 == 0)
            get_pattern(c[i], "/bytes?n=20000", 20000);
        tls_close(c[i]);
    }
}

/* ---- requests around the release of the buffers ------------------------- */

/* The records SSL_write makes of s (a record split across writes, or
 * several requests in one), captured instead of sent; *len bytes,
 * malloc'd. */
static unsigned char *
records_of(tls_conn *t, const void *s, size_t n, size_t *len)
{
    BIO *mem = BIO_new(BIO_s_mem()), *sock = SSL_get_wbio(t->ssl);
    unsigned char *out;
    char *p;
    long got;

    cr_assert(mem != NULL && BIO_up_ref(sock) == 1);
    SSL_set0_wbio(t->ssl, mem);
    TGH_CHECK(SSL_write(t->ssl, s, (int)n) == (int)n, "SSL_write to memory");
    got = BIO_get_mem_data(mem, &p);
    out = malloc((size_t)got);
    cr_assert(out != NULL && got > 0);
    memcpy(out, p, (size_t)got);
    *len = (size_t)got;
    SSL_set0_wbio(t->ssl, sock);                /* frees mem */
    return out;
}

/* Write b[from..to) to the socket as it is. */
static void
raw_send(tls_conn *t, const unsigned char *b, size_t from, size_t to)
{
    TGH_CHECK(write(t->fd, b + from, to - from) == (ssize_t)(to - from), "write");
}

/* One response on t: status 200 with n pattern bytes. */
static void
expect_pattern(tls_conn *t, size_t n, const char *what)
{
    unsigned char *body;
    size_t blen;
    int status;

    TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "%s: no response", what);
    TGH_CHECK(status == 200 && blen == n && is_pattern(body, blen),
              "%s: status %d, %zu bytes (want %zu)", what, status, blen, n);
    free(body);
}

/* tollgate (TLS) with http.idle_timeout_ms idle_ms. */
static void
start_idle(int idle_ms)
{
    static char cert[512], key[512];
    tgh_tg_opts o;

    signal(SIGPIPE, SIG_IGN);
    TGH_CHECK(tgh_tls_selfsigned("ec -pkeyopt ec_paramgen_curve:prime256v1", "localhost",
                                 "cert.pem", "key.pem") == 0 && tgh_testup_start(&up) == 0,
              "certificate, upstream");
    tls_port = tgh_free_port();
    tgh_tg_opts_default(&o, up.port);
    o.tls_port = tls_port;
    snprintf(cert, sizeof cert, "%s/cert.pem", tgh_tmpdir());
    snprintf(key, sizeof key, "%s/key.pem", tgh_tmpdir());
    o.tls_cert = cert;
    o.tls_key = key;
    o.idle_timeout_ms = idle_ms;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0 && tgh_wait_listening(tls_port, 10000) == 0,
              "tollgate with a TLS listener");
}

/*
 * Requests that come after a connection gave back its buffers (idle
 * 300 ms, past TG_TLS_IDLE_MS, or about when they go): one whose record
 * arrives in three pieces with pauses past the idle point between them
 * (OpenSSL holds a partial record then, and keeps its buffer), three
 * pipelined in one record, a
 * body uploaded with pauses in and between records, a key update
 * (tollgate's answer needs a write buffer), a response the client reads
 * only after a pause; then close_notify from the client, and the idle
 * timeout after a release (tollgate's close_notify needs a write buffer).
 * Every answer whole, nothing lost, tollgate alive.  With TLS 1.3, and
 * TLS 1.2 (no key update).
 */
static void
around_the_release(void)
{
    static const char req[] = "GET /bytes?n=5000 HTTP/1.1\r\nHost: t\r\n\r\n";
    static const char three[] = "GET /bytes?n=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                                "GET /bytes?n=2000 HTTP/1.1\r\nHost: t\r\n\r\n"
                                "GET /bytes?n=3 HTTP/1.1\r\nHost: t\r\n\r\n";
    enum { BODY = 40000 };
    unsigned char *rec, *b, *body;
    size_t len, blen;
    int status;
    char buf[256];

    start_idle(1500);
    tls_conn *t = tls_open(tls_port);
    get_pattern(t, "/bytes?n=10", 10);

    /* a record in three pieces: its header split, then its body */
    tgh_sleep_ms(300);
    rec = records_of(t, req, sizeof req - 1, &len);
    raw_send(t, rec, 0, 3);
    tgh_sleep_ms(300);
    raw_send(t, rec, 3, 20);
    tgh_sleep_ms(300);
    raw_send(t, rec, 20, len);
    free(rec);
    expect_pattern(t, 5000, "a record sent in three pieces");

    /* the same at once after an answer (the partial record is in
     * OpenSSL's buffer at the idle point: the buffers are kept) */
    rec = records_of(t, req, sizeof req - 1, &len);
    raw_send(t, rec, 0, 3);
    tgh_sleep_ms(300);
    raw_send(t, rec, 3, 30);
    tgh_sleep_ms(300);
    raw_send(t, rec, 30, len);
    free(rec);
    expect_pattern(t, 5000, "a record begun at once after an answer");

    /* requests that come about when the buffers go (90..110 ms after
     * the last answer), some in the very loop turn */
    for (int i = 0; i < 42; i++) {
        tgh_sleep_ms(90 + (i * 7) % 21);
        get_pattern(t, i % 2 ? "/bytes?n=17000" : "/bytes?n=50", i % 2 ? 17000 : 50);
    }

    /* three requests in one record */
    tgh_sleep_ms(300);
    rec = records_of(t, three, sizeof three - 1, &len);
    raw_send(t, rec, 0, len);
    free(rec);
    expect_pattern(t, 1, "pipelined 1");
    expect_pattern(t, 2000, "pipelined 2");
    expect_pattern(t, 3, "pipelined 3");

    /* a body with pauses: after the head, between records, in a record */
    tgh_sleep_ms(300);
    b = malloc(BODY);
    cr_assert_not_null(b);
    tgh_fill_testup_pattern(b, BODY);
    char *head = tgh_strf("POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n", BODY);
    tls_send(t, head);
    free(head);
    tgh_sleep_ms(300);
    TGH_CHECK(SSL_write(t->ssl, b, 20000) == 20000, "SSL_write");
    tgh_sleep_ms(300);
    rec = records_of(t, b + 20000, BODY - 20000, &len);
    raw_send(t, rec, 0, len / 2);
    tgh_sleep_ms(300);
    raw_send(t, rec, len / 2, len);
    free(rec);
    TGH_CHECK(read_response(t, &status, &body, &blen) == 0, "upload with pauses: no response");
    TGH_CHECK(status == 200 && blen == BODY && is_pattern(body, blen),
              "upload with pauses: status %d, %zu bytes back", status, blen);
    free(body);
    free(b);

    /* a key update asked of tollgate while it holds no buffers */
    tgh_sleep_ms(300);
    TGH_CHECK(tls12 || SSL_key_update(t->ssl, SSL_KEY_UPDATE_REQUESTED) == 1,
              "SSL_key_update");
    get_pattern(t, "/bytes?n=700", 700);

    /* a response read only after a pause past the idle point */
    tls_send(t, "GET /bytes?n=4194304 HTTP/1.1\r\nHost: t\r\n\r\n");
    TGH_CHECK(fill(t, 100000) == 0, "the 4 MiB answer did not begin");
    tgh_sleep_ms(400);
    expect_pattern(t, 4194304, "4 MiB read after a pause");
    get_pattern(t, "/bytes?n=30000", 30000);

    /* close_notify after the release: tollgate closes */
    tgh_sleep_ms(300);
    uint64_t t0 = tgh_now_ms();
    TGH_CHECK(SSL_shutdown(t->ssl) == 0, "close_notify");
    TGH_CHECK(SSL_read(t->ssl, buf, sizeof buf) <= 0, "an answer after close_notify");
    TGH_CHECK(tgh_now_ms() - t0 < 1000, "closed %llu ms after close_notify",
              (unsigned long long)(tgh_now_ms() - t0));
    tls_close(t);

    /* the idle timeout after a release ends with tollgate's close_notify */
    t = tls_open(tls_port);
    get_pattern(t, "/bytes?n=10", 10);
    t0 = tgh_now_ms();
    TGH_CHECK(SSL_read(t->ssl, buf, sizeof buf) <= 0
              && SSL_get_error(t->ssl, 0) == SSL_ERROR_ZERO_RETURN,
              "no close_notify at the idle timeout (after %llu ms)",
              (unsigned long long)(tgh_now_ms() - t0));
    TGH_CHECK(tgh_now_ms() - t0 >= 1300 && tgh_now_ms() - t0 < 4000,
              "closed %llu ms into a 1500 ms idle timeout",
              (unsigned long long)(tgh_now_ms() - t0));
    tls_close(t);

    /* half a record at once after the handshake, the rest after the
     * idle point */
    t = tls_open(tls_port);
    rec = records_of(t, req, sizeof req - 1, &len);
    raw_send(t, rec, 0, len / 2);
    tgh_sleep_ms(300);
    raw_send(t, rec, len / 2, len);
    free(rec);
    expect_pattern(t, 5000, "half a record at once after the handshake");
    tls_close(t);
    TGH_CHECK(tgh_proc_alive(tg.proc), "tollgate died");
}

Test(tls_io, requests_around_the_release_of_the_buffers)
{
    around_the_release();
}

Test(tls_io, requests_around_the_release_of_the_buffers_tls12)
{
    tls12 = 1;
    around_the_release();
}

/*
 * 200 connections cycle idle and busy six times (a request each, then
 * 150 ms idle: the buffers go and come back every round): every answer is
 * whole, and tollgate's VmRSS does not grow from the second round to the
 * last (plain build; under ASan, leaks are ASan's to report).
 */
Test(tls_io, connections_cycling_idle_and_busy_do_not_grow)
{
    enum { NCONN = 200, ROUNDS = 6 };
    static tls_conn *c[NCONN];
    long rss2 = 0, rss_last = 0;

    if (tgh_need_nofile(NCONN + 512) != 0)
        cr_skip_test("RLIMIT_NOFILE cannot reach %d", NCONN + 512);
    tls_workers = 1;
    unsetenv("MALLOC_PERTURB_");
    start("max_connections_per_ip: 0");
    for (int i = 0; i < NCONN; i++)
        c[i] = tls_open(tls_port);
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < NCONN; i++) {
            size_t n = (size_t)(1 + (i * 7919 + r * 104729) % 40000);
            char *path = tgh_strf("/bytes?n=%zu", n);
            get_pattern(c[i], path, n);
            free(path);
        }
        tgh_sleep_ms(150);
        if (r == 1)
            rss2 = settled_rss_kb(tg.proc->pid);
        if (r == ROUNDS - 1)
            rss_last = settled_rss_kb(tg.proc->pid);
    }
    cr_log_info("%d TLS connections cycling: VmRSS %ld KiB after round 2, %ld after %d",
                NCONN, rss2, rss_last, ROUNDS);
#if !defined(__SANITIZE_ADDRESS__)
    TGH_CHECK(rss_last - rss2 < 2048, "VmRSS grew by %ld KiB from round 2 to %d",
              rss_last - rss2, ROUNDS);
#endif
    for (int i = 0; i < NCONN; i++)
        tls_close(c[i]);
    TGH_CHECK(tgh_proc_alive(tg.proc), "tollgate died");

    /* it stops cleanly (in the ASan build: nothing leaked) */
    char out[64], *cmd;
    tgh_proc_signal(tg.proc, SIGTERM, 0);
    TGH_CHECK(tgh_proc_wait(tg.proc, 20000) == 0, "tollgate still running 20 s after SIGTERM");
    TGH_CHECK(WIFEXITED(tg.proc->status) && WEXITSTATUS(tg.proc->status) == 0,
              "tollgate did not exit 0 after SIGTERM");
    cmd = tgh_strf("grep -c 'Sanitizer' %s", tg.proc->log_path);
    tgh_sh(out, sizeof out, "%s", cmd);
    free(cmd);
    TGH_CHECK(atoi(out) == 0, "a sanitizer report in tollgate's log");
}

/* A TLS client with a small MSS and receive window (tollgate's kernel
 * send buffer stays small, most of a large answer waits in its output),
 * handshaken; reads and writes time out after 10 s. */
static tls_conn *
tls_narrow(int port)
{
    int rcv = 4096, mss = 536, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = { .sin_family = AF_INET };
    struct timeval tv = { 10, 0 };
    tls_conn *t = calloc(1, sizeof *t);

    cr_assert(fd >= 0 && t != NULL);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof mss);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(0x7f000001);
    TGH_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect");
    t->fd = fd;
    t->ctx = SSL_CTX_new(TLS_client_method());
    t->ssl = SSL_new(t->ctx);
    t->cap = 1 << 16;
    t->buf = malloc(t->cap);
    cr_assert(t->ssl != NULL && t->buf != NULL);
    SSL_set_fd(t->ssl, fd);
    TGH_CHECK(SSL_connect(t->ssl) == 1, "TLS handshake");
    return t;
}

/*
 * The idle timeout does not cut an answer still going out: a TLS client
 * with a small MSS and receive window (tollgate's kernel send buffer
 * stays small) asks for 200000 bytes, reads nothing for 1.5 s (idle
 * timeout 1 s), then reads the whole answer, and the connection serves
 * a next request.
 */
Test(tls_io, paused_reader_gets_the_whole_answer_past_the_idle_timeout)
{
    tls_conn *t;

    start_idle(1000);
    t = tls_narrow(tls_port);
    tls_send(t, "GET /bytes?n=200000 HTTP/1.1\r\nHost: t\r\n\r\n");
    tgh_sleep_ms(1500);                         /* past the idle timeout */
    expect_pattern(t, 200000, "an answer read after 1.5 s (idle timeout 1 s)");
    get_pattern(t, "/bytes?n=10", 10);
    tls_close(t);
}

/*
 * Closing after the last answer over TLS: a client with a small MSS and
 * receive window asks for 1,000,000 bytes with Connection: close and
 * reads steadily, 4 KiB every 20 ms (~200 kB/s), never pausing near the
 * send timeout (1 s, the longest gap between two writes): the answer is
 * whole (test_conn's steady_slow_reader_gets_the_whole_answer_before_a_close
 * over plain text, where one send timeout for all that was left cut it;
 * TLS, whose writes keep their own write event, was whole before too:
 * this keeps it so).
 */
Test(tls_io, steady_slow_reader_gets_the_whole_answer_before_a_close)
{
    enum { N = 1000000 };
    size_t cap = N + 4096, got = 0, body = 0;
    unsigned char *buf = malloc(cap), *eoh = NULL;
    tls_conn *t;
    int r;

    start("send_timeout_ms: 1000");
    cr_assert(buf != NULL);
    t = tls_narrow(tls_port);
    tls_send(t, "GET /bytes?n=1000000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    while ((r = SSL_read(t->ssl, buf + got, (int)(cap - got < 4096 ? cap - got : 4096))) > 0) {
        got += (size_t)r;
        if (eoh == NULL)
            eoh = memmem(buf, got, "\r\n\r\n", 4);
        body = eoh != NULL ? got - (size_t)(eoh + 4 - buf) : 0;
        tgh_sleep_ms(20);                       /* a steady, slow reader */
    }
    cr_log_info("TLS, Connection: close, 1,000,000 bytes read steadily: %zu", body);
    TGH_CHECK(eoh != NULL && memcmp(buf, "HTTP/1.1 200", 12) == 0, "no 200");
    TGH_CHECK(body == N, "the answer was cut at %zu of %d body bytes (send timeout 1000 ms, "
              "the client never paused)", body, N);
    free(buf);
    tls_close(t);
}
