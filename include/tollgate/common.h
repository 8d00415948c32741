/*
 * common.h - status codes, logging and small helpers shared by every module.
 *
 * Out-of-memory policy: tollgate aborts with a message (tg_xmalloc and
 * friends).  A proxy that half-handles ENOMEM corrupts state in ways that
 * are worse than a restart by systemd.
 */
#ifndef TOLLGATE_COMMON_H
#define TOLLGATE_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/time.h>

/* The version has one source: meson's project(version:), passed as
 * -DTG_VERSION (meson.build); no default here to drift from it. */
#ifndef TG_VERSION
#error "TG_VERSION is defined by meson.build from project(version:)"
#endif

typedef int tg_rc;
#define TG_OK     0
#define TG_ERR   -1
#define TG_AGAIN -2   /* need more input / try later */
#define TG_DONE  -3   /* finished, nothing more to do */

enum tg_log_level { TG_LOG_DEBUG, TG_LOG_INFO, TG_LOG_WARN, TG_LOG_ERROR };

/* Set the minimum level written (default INFO).  Not thread-safe: call at
 * start-up only. */
void tg_log_set_level(enum tg_log_level level);
void tg_log(enum tg_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define tg_debug(...) tg_log(TG_LOG_DEBUG, __VA_ARGS__)
#define tg_info(...)  tg_log(TG_LOG_INFO, __VA_ARGS__)
#define tg_warn(...)  tg_log(TG_LOG_WARN, __VA_ARGS__)
#define tg_error(...) tg_log(TG_LOG_ERROR, __VA_ARGS__)

/* snprintf that returns the length really in buf: 0..size-1, never more.
 * A format that fails is 0 bytes and one that does not fit is cut, so the
 * result can always be used as a length (size must be > 0). */
size_t tg_fmt(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The out-of-memory exit: "tollgate: out of memory in WHAT", then abort.
 * For allocators other than tg_x* (libevent: common_ev.h). */
void tg_oom(const char *what) __attribute__((noreturn));

/*
 * The request path's formatting without printf (snprintf was 3-5 % of a
 * request's CPU: docs/PERFORMANCE.md, "CPU profiles").
 *   tg_copy    src into dst (size > 0), cut to size - 1, NUL-terminated;
 *              returns the length copied.
 *   tg_u64_dec v in decimal at p (room for 20 digits), no NUL; returns the
 *              digits written.
 *   tg_cat     appends n bytes at *p if they fit before end (*p moves);
 *              0 when they do not (nothing written), else 1.
 */
size_t tg_copy(char *dst, const char *src, size_t size);
size_t tg_u64_dec(char *p, uint64_t v);

/* s[0..len) as a decimal of 1..10 digits (no sign, no spaces), at most
 * max, into *out; TG_ERR (nothing written) otherwise. */
tg_rc tg_parse_dec(const char *s, size_t len, unsigned long max, unsigned long *out);

static inline int
tg_cat(char **p, const char *end, const void *s, size_t n)
{
    if ((size_t)(end - *p) < n) {
        return 0;
    }
    memcpy(*p, s, n);
    *p += n;
    return 1;
}

void *tg_xmalloc(size_t n);
void *tg_xcalloc(size_t n, size_t size);
void *tg_xrealloc(void *p, size_t n);
char *tg_xstrdup(const char *s);
char *tg_xstrndup(const char *s, size_t n);

/*
 * tg_buf: the one growable byte string (exporters, message bodies, file
 * reads).  TG_BUF_INIT (or zeroed memory) is empty with nothing allocated;
 * after any append p is NUL-terminated (len does not count the NUL).
 * Growth at least doubles; out of memory aborts (tg_xrealloc).  The owner
 * frees p (tg_buf_free) or takes it.
 */
typedef struct tg_buf {
    char   *p;
    size_t  len;
    size_t  cap;                  /* bytes allocated, the NUL included */
} tg_buf;

#define TG_BUF_INIT { NULL, 0, 0 }

/* Room for `more` bytes after len, plus the NUL. */
void tg_buf_reserve(tg_buf *b, size_t more);
void tg_buf_add(tg_buf *b, const void *s, size_t n);
void tg_buf_str(tg_buf *b, const char *s);
void tg_buf_printf(tg_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Empty again, keeping the memory. */
void tg_buf_reset(tg_buf *b);
/* Free p; empty again. */
void tg_buf_free(tg_buf *b);

/*
 * Identifiers: the one check for names that end up in bucket keys, metric
 * labels and log lines.
 *   TG_NAME_TIER  tier and route names: 1..TG_TIER_MAX of [a-z0-9_-]
 *   TG_NAME_ID    consumer ids (keys file): 1..TG_KEY_ID_MAX of [A-Za-z0-9._-]
 */
#define TG_TIER_MAX     32
#define TG_KEY_ID_MAX   64

enum tg_name_kind { TG_NAME_TIER, TG_NAME_ID };

/* By byte value: bit TG_NAME_TIER, bit TG_NAME_ID (a table: the keys
 * file's fast path reads every byte of a million lines through it). */
extern const unsigned char tg_name_chars[256];

static inline int
tg_name_char(enum tg_name_kind kind, unsigned char c)
{
    return (tg_name_chars[c] >> kind) & 1;
}

/* 1 when s[0..len) is a name of kind (length and characters). */
int tg_name_ok(enum tg_name_kind kind, const char *s, size_t len);

/* Monotonic clock in milliseconds / microseconds. */
uint64_t tg_now_ms(void);
uint64_t tg_now_us(void);
/* Between tg_now_freeze and tg_now_thaw (nested: counted) on this thread,
 * tg_now_* return the time of the outermost freeze: for one event
 * callback of the request path, which blocks on nothing. */
void tg_now_freeze(void);
void tg_now_thaw(void);

/* A duration in milliseconds / microseconds as the struct timeval that
 * event_add() and friends take: the one conversion in the tree. */
static inline struct timeval
tg_ms_tv(uint64_t ms)
{
    struct timeval tv;

    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)((ms % 1000) * 1000);
    return tv;
}

static inline struct timeval
tg_us_tv(uint64_t us)
{
    struct timeval tv;

    tv.tv_sec = (time_t)(us / 1000000);
    tv.tv_usec = (suseconds_t)(us % 1000000);
    return tv;
}

/*
 * TG_ASSERT(cond): an invariant of a state machine (breaker, upstream
 * connection, lease, adaptive queue).  On in debug and sanitized builds
 * (meson defines TG_DEBUG for buildtype=debug or b_sanitize set): a false
 * cond aborts with its text and place.  Off in release builds, where cond
 * is not evaluated; so it must have no side effects.
 */
#ifdef TG_DEBUG
#define TG_ASSERT(cond) \
    ((cond) ? (void)0 : tg_assert_fail(#cond, __FILE__, __LINE__, __func__))
#else
#define TG_ASSERT(cond) ((void)sizeof(!(cond)))
#endif
void tg_assert_fail(const char *cond, const char *file, int line, const char *func)
    __attribute__((noreturn));

#define TG_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define TG_UNUSED(x) ((void)(x))

#endif
