/*
 * common.c - logging, allocation wrappers and clocks.
 */
#include "tollgate/common.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int min_level = TG_LOG_INFO;       /* atomic: a reload sets it while
                                             workers log */
static const char *const level_names[] = { "debug", "info", "warn", "error" };

void
tg_log_set_level(enum tg_log_level level)
{
    __atomic_store_n(&min_level, (int)level, __ATOMIC_RELAXED);
}

/* One write(2) per line through a stack buffer, so lines from several
 * threads never interleave. */
void
tg_log(enum tg_log_level level, const char *fmt, ...)
{
    char line[1024];
    struct timespec ts;
    struct tm tm;
    va_list ap;
    int n, m;

    if ((int)level < __atomic_load_n(&min_level, __ATOMIC_RELAXED)) {
        return;
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = (int)tg_fmt(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ [%s] ",
                    tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                    tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000, level_names[level]);
    va_start(ap, fmt);
    m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0) {
        m = 0;
    }
    n += m;
    if ((size_t)n > sizeof(line) - 2) {
        n = (int)sizeof(line) - 2;
    }
    line[n++] = '\n';
    fwrite(line, 1, (size_t)n, stderr);
}

static void
oom(size_t n)
{
    fprintf(stderr, "tollgate: out of memory allocating %zu bytes\n", n);
    abort();
}

void
tg_assert_fail(const char *cond, const char *file, int line, const char *func)
{
    fprintf(stderr, "tollgate: assertion failed: %s (%s:%d, %s)\n", cond, file,
            line, func);
    abort();
}

void
tg_oom(const char *what)
{
    fprintf(stderr, "tollgate: out of memory in %s\n", what);
    abort();
}

size_t
tg_fmt(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    if (n < 0) {
        buf[0] = '\0';
        return 0;
    }
    return (size_t)n < size ? (size_t)n : size - 1;
}

size_t
tg_copy(char *dst, const char *src, size_t size)
{
    size_t n = strnlen(src, size - 1);

    memcpy(dst, src, n);
    dst[n] = '\0';
    return n;
}

tg_rc
tg_parse_dec(const char *s, size_t len, unsigned long max, unsigned long *out)
{
    unsigned long v = 0;

    if (len == 0 || len > 10) {
        return TG_ERR;
    }
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return TG_ERR;
        }
        v = v * 10 + (unsigned long)(s[i] - '0');
    }
    if (v > max) {
        return TG_ERR;
    }
    *out = v;
    return TG_OK;
}

size_t
tg_u64_dec(char *p, uint64_t v)
{
    static const char d2[] =
        "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
        "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
        "8081828384858687888990919293949596979899";
    size_t n = 1, i;
    uint64_t t = v;

    while (t >= 10) {                  /* the length first: written in place */
        t /= 10;
        n++;
    }
    i = n;
    while (v >= 100) {                 /* two digits per division */
        unsigned r = (unsigned)(v % 100);
        v /= 100;
        p[--i] = d2[2 * r + 1];
        p[--i] = d2[2 * r];
    }
    if (v >= 10) {
        p[--i] = d2[2 * v + 1];
        p[--i] = d2[2 * v];
    } else {
        p[--i] = (char)('0' + v);
    }
    return n;
}

void *
tg_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        oom(n);
    }
    return p;
}

void *
tg_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL) {
        oom(n * size);
    }
    return p;
}

void *
tg_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL) {
        oom(n);
    }
    return q;
}

char *
tg_xstrdup(const char *s)
{
    return tg_xstrndup(s, strlen(s));
}

char *
tg_xstrndup(const char *s, size_t n)
{
    char *p = tg_xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* [a-z0-9_-]: 3 (tier and id), [A-Z.]: 2 (id only); 0x80.. are 0. */
const unsigned char tg_name_chars[256] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 2, 0,
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0,
    0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 3,
    0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0,
};

int
tg_name_ok(enum tg_name_kind kind, const char *s, size_t len)
{
    size_t i, max = kind == TG_NAME_ID ? TG_KEY_ID_MAX : TG_TIER_MAX;

    if (len < 1 || len > max) {
        return 0;
    }
    for (i = 0; i < len; i++) {
        if (!tg_name_char(kind, (unsigned char)s[i])) {
            return 0;
        }
    }
    return 1;
}

/* ---- tg_buf ------------------------------------------------------------ */

void
tg_buf_reserve(tg_buf *b, size_t more)
{
    size_t need, cap;

    if (more > SIZE_MAX - b->len - 1) {
        tg_oom("tg_buf");
    }
    need = b->len + more + 1;
    if (need <= b->cap) {
        return;
    }
    cap = b->cap > SIZE_MAX / 2 ? need : 2 * b->cap;
    if (cap < need) {
        cap = need;
    }
    if (cap < 256) {
        cap = 256;
    }
    b->p = tg_xrealloc(b->p, cap);
    b->cap = cap;
}

void
tg_buf_add(tg_buf *b, const void *s, size_t n)
{
    tg_buf_reserve(b, n);
    if (n > 0) {
        memcpy(b->p + b->len, s, n);
    }
    b->len += n;
    b->p[b->len] = '\0';
}

void
tg_buf_str(tg_buf *b, const char *s)
{
    tg_buf_add(b, s, strlen(s));
}

void
tg_buf_printf(tg_buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0) {
        return;
    }
    tg_buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void
tg_buf_reset(tg_buf *b)
{
    b->len = 0;
    if (b->p != NULL) {
        b->p[0] = '\0';
    }
}

void
tg_buf_free(tg_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = 0;
    b->cap = 0;
}

/* ---- clocks -------------------------------------------------------------- */

uint64_t
tg_now_ms(void)
{
    return tg_now_us() / 1000;
}

/* Frozen (tg_now_freeze) around a request-path callback, the clock is read
 * once for all of it, as nginx reads it once per loop turn: a proxied
 * request made 10-12 clock_gettime calls, about 2 % of its CPU. */
static __thread uint64_t now_frozen;     /* 0: not frozen */
static __thread unsigned now_depth;

uint64_t
tg_now_us(void)
{
    struct timespec ts;

    if (now_frozen != 0) {
        return now_frozen;
    }
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

void
tg_now_freeze(void)
{
    if (now_depth++ == 0) {
        now_frozen = tg_now_us();
    }
}

void
tg_now_thaw(void)
{
    if (now_depth > 0 && --now_depth == 0) {
        now_frozen = 0;
    }
}
