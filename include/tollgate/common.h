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

#ifndef TG_VERSION               /* set by meson from project(version:) */
#define TG_VERSION "0.0.0-unknown"
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

void *tg_xmalloc(size_t n);
void *tg_xcalloc(size_t n, size_t size);
void *tg_xrealloc(void *p, size_t n);
char *tg_xstrdup(const char *s);
char *tg_xstrndup(const char *s, size_t n);

/* Monotonic clock in milliseconds / microseconds. */
uint64_t tg_now_ms(void);
uint64_t tg_now_us(void);
/* Between tg_now_freeze and tg_now_thaw (nested: counted) on this thread,
 * tg_now_* return the time of the outermost freeze: for one event
 * callback of the request path, which blocks on nothing. */
void tg_now_freeze(void);
void tg_now_thaw(void);

#define TG_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define TG_UNUSED(x) ((void)(x))

#endif
