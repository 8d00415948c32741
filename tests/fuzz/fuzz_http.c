/*
 * fuzz_http.c - libFuzzer target for src/http.c.
 *
 * Built by meson with -Dfuzz=true (CC=clang), run by scripts/fuzz; by hand:
 *
 *   CC=clang meson setup build-fuzz -Dfuzz=true && meson compile -C build-fuzz fuzz_http
 *   build-fuzz/tests/fuzz/fuzz_http
 *
 * The first input byte picks the limits and the split pattern; the rest is
 * fed to the request parser, the response parser and the chunked decoder.
 * Besides memory errors it checks properties the proxy relies on:
 *  - a head that parses is AGAIN on every shorter prefix (we never frame a
 *    message before its end) and parses identically when cut at head_len;
 *  - every pointer a parser returns lies inside the head;
 *  - the path of a parsed request normalises (target.h) to something no
 *    longer that normalises to itself, as the proxy does before routing;
 *  - the chunked decoder gives the same data, the same consumed count and
 *    the same verdict whatever the split of its input.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tollgate/http.h"
#include "tollgate/target.h"

static const tg_http_limits fuzz_limits[4] = {
    { 8192, 16384, 100 },
    { 64, 256, 8 },
    { 16, 48, 2 },
    { 4096, 4096, TG_HTTP_MAX_HEADERS },
};

static tg_http_hdr  fz_hdr[TG_HTTP_MAX_HEADERS], fz_hdr2[TG_HTTP_MAX_HEADERS];
static tg_http_req  fz_req = { .hdr = fz_hdr }, fz_req2 = { .hdr = fz_hdr2 };
static tg_http_resp fz_resp, fz_resp2;

static int
fz_inside(const char *p, size_t n, const char *buf, size_t len)
{
    return p >= buf && n <= len && (size_t) (p - buf) <= len - n;
}

static void
fz_check_hdrs(const tg_http_hdr *h, size_t nhdr, const char *buf, size_t head)
{
    size_t i;

    for (i = 0; i < nhdr; i++) {
        if (!fz_inside(h[i].name, h[i].name_len, buf, head) || h[i].name_len == 0
            || !fz_inside(h[i].value, h[i].value_len, buf, head)) {
            abort();
        }
    }
}

/* Shorter prefixes must all be AGAIN; check them all for small heads and a
 * spread of them otherwise, to keep the target fast. */
static size_t
fz_step(size_t head)
{
    return head <= 512 ? 1 : head / 256;
}

/* The proxy's next step: the path in normal form, in a copy. */
static void
fz_normalize(const char *path, size_t len)
{
    char *t, *t2;
    size_t n = len, n2;
    const char *err = NULL;

    if (len == 0 || path[0] != '/') {
        return;
    }
    t = malloc(len);
    memcpy(t, path, len);
    if (tg_target_normalize(t, &n, &err) == TG_OK) {
        if (n > len || n == 0 || t[0] != '/') {
            abort();
        }
        t2 = malloc(n);
        memcpy(t2, t, n);
        n2 = n;
        if (tg_target_normalize(t2, &n2, &err) != TG_OK || n2 != n
            || memcmp(t, t2, n) != 0) {
            abort();
        }
        free(t2);
    } else if (err == NULL) {
        abort();
    }
    free(t);
}

static void
fz_request(const char *buf, size_t len, const tg_http_limits *lim)
{
    tg_rc rc = tg_http_parse_request(buf, len, lim, &fz_req);
    size_t k;

    if (rc == TG_ERR) {
        switch (fz_req.status) {
        case 400: case 414: case 417: case 431: case 501: case 505:
            break;
        default:
            abort();
        }
        if (fz_req.error == NULL) {
            abort();
        }
        return;
    }
    if (rc != TG_OK) {
        if (rc != TG_AGAIN || len >= lim->max_header_bytes) {
            abort();
        }
        return;
    }
    if (fz_req.head_len == 0 || fz_req.head_len > len
        || fz_req.head_len > lim->max_header_bytes
        || fz_req.nhdr > lim->max_headers
        || !fz_inside(fz_req.method, fz_req.method_len, buf, fz_req.head_len)
        || !fz_inside(fz_req.target, fz_req.target_len, buf, fz_req.head_len)
        || fz_req.target_len > lim->max_request_line
        || (fz_req.host != NULL
            && !fz_inside(fz_req.host, fz_req.host_len, buf, fz_req.head_len))
        || (fz_req.minor == 1 && fz_req.host == NULL)
        || (fz_req.body == TG_BODY_LENGTH && fz_req.content_length == 0)
        || fz_req.body == TG_BODY_CLOSE
        || (fz_req.body == TG_BODY_CHUNKED && fz_req.minor == 0)) {
        abort();
    }
    if (!fz_inside(fz_req.path, fz_req.path_len, buf, fz_req.head_len)
        && !(fz_req.path_len == 1 && fz_req.path[0] == '/')) {
        abort();
    }
    fz_check_hdrs(fz_req.hdr, fz_req.nhdr, buf, fz_req.head_len);
    fz_normalize(fz_req.path, fz_req.path_len);

    for (k = 0; k < fz_req.head_len; k += fz_step(fz_req.head_len)) {
        if (tg_http_parse_request(buf, k, lim, &fz_req2) != TG_AGAIN) {
            abort();
        }
    }
    if (tg_http_parse_request(buf, fz_req.head_len - 1, lim, &fz_req2) != TG_AGAIN
        || tg_http_parse_request(buf, fz_req.head_len, lim, &fz_req2) != TG_OK
        || fz_req2.head_len != fz_req.head_len || fz_req2.body != fz_req.body
        || fz_req2.content_length != fz_req.content_length
        || fz_req2.keep_alive != fz_req.keep_alive) {
        abort();
    }
}

static void
fz_response(const char *buf, size_t len, const tg_http_limits *lim, int is_head)
{
    tg_rc rc = tg_http_parse_response(buf, len, lim, is_head, &fz_resp);
    size_t k;

    if (rc == TG_ERR) {
        if (fz_resp.error == NULL) {
            abort();
        }
        return;
    }
    if (rc != TG_OK) {
        return;
    }
    if (fz_resp.head_len == 0 || fz_resp.head_len > len
        || fz_resp.status < 100 || fz_resp.status > 999
        || fz_resp.nhdr > lim->max_headers
        || !fz_inside(fz_resp.reason, fz_resp.reason_len, buf, fz_resp.head_len)
        || (fz_resp.body == TG_BODY_CLOSE && fz_resp.keep_alive)
        || (is_head && fz_resp.body != TG_BODY_NONE)) {
        abort();
    }
    fz_check_hdrs(fz_resp.hdr, fz_resp.nhdr, buf, fz_resp.head_len);
    for (k = 0; k < fz_resp.head_len; k += fz_step(fz_resp.head_len)) {
        if (tg_http_parse_response(buf, k, lim, is_head, &fz_resp2) != TG_AGAIN) {
            abort();
        }
    }
}

/* Running digest of chunk data, so splits can be compared cheaply. */
typedef struct fz_sink {
    uint64_t hash;
    uint64_t len;
    const char *lo, *hi;          /* the piece being decoded */
} fz_sink;

static void
fz_cb(void *arg, const char *data, size_t len)
{
    fz_sink *s = arg;
    size_t i;

    if (len == 0 || data < s->lo || data + len > s->hi) {
        abort();
    }
    for (i = 0; i < len; i++) {
        s->hash = (s->hash ^ (unsigned char) data[i]) * 1099511628211ULL;
    }
    s->len += len;
}

/* Decode in pieces whose sizes come from a small PRNG; returns the
 * consumed count or -1. */
static ssize_t
fz_chunked(const char *buf, size_t len, uint32_t seed, fz_sink *s, tg_chunked *c)
{
    size_t off = 0, n;
    ssize_t r;

    memset(s, 0, sizeof(*s));
    s->hash = 14695981039346656037ULL;
    tg_chunked_init(c);
    while (off < len) {
        if (seed == 0) {
            n = len - off;
        } else {
            seed = seed * 1103515245u + 12345u;
            n = 1 + (seed >> 16) % 7;
            if (n > len - off) {
                n = len - off;
            }
        }
        s->lo = buf + off;
        s->hi = buf + off + n;
        r = tg_chunked_decode(c, buf + off, n, fz_cb, s);
        if (r < 0) {
            if (c->error == NULL) {
                abort();
            }
            return -1;
        }
        if ((size_t) r > n || ((size_t) r < n && !c->done)) {
            abort();
        }
        off += (size_t) r;
        if (c->done) {
            break;
        }
    }
    return (ssize_t) off;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const tg_http_limits *lim;
    fz_sink s1, s2;
    tg_chunked c1, c2;
    ssize_t r1, r2;
    char *buf;
    size_t len;

    if (size < 1) {
        return 0;
    }
    lim = &fuzz_limits[data[0] & 3];
    len = size - 1;
    /* an exact-size copy, so any read past the end is caught */
    buf = malloc(len ? len : 1);
    memcpy(buf, data + 1, len);

    fz_request(buf, len, lim);
    fz_response(buf, len, lim, (data[0] >> 2) & 1);

    r1 = fz_chunked(buf, len, 0, &s1, &c1);
    r2 = fz_chunked(buf, len, 1u + data[0], &s2, &c2);
    if (r1 != r2 || c1.done != c2.done
        || (r1 >= 0 && (s1.hash != s2.hash || s1.len != s2.len))) {
        abort();
    }
    free(buf);
    return 0;
}
