/*
 * redis.h - the Redis side of the bucket store: one async hiredis
 * connection per worker thread, on that worker's event base.
 *
 * Charges that arrive during one loop turn are sent together as ONE
 * EVALSHA of the GCRA script (tg_gcra_lua) over all their keys (up to
 * redis.max_batch per call): each request's result is independent.  Every
 * call has a deadline (redis.timeout_ms) kept by our own timer, since
 * hiredis 0.14 has none.  NOSCRIPT is recovered (EVAL with the script
 * text, which also caches it) without the caller noticing.
 */
#ifndef TOLLGATE_REDIS_H
#define TOLLGATE_REDIS_H

#include <event2/event.h>

#include "tollgate/common.h"
#include "tollgate/gcra.h"

#define TG_CHARGE_MAX_BUCKETS 8

struct tg_redis;
struct tg_redis_op;

typedef struct tg_redis_opts {
    char      host[256];           /* from redis.url */
    int       port;
    int       db;                  /* SELECT db after connecting when != 0 */
    unsigned  timeout_ms;          /* per call */
    unsigned  max_batch;           /* requests per EVALSHA */
} tg_redis_opts;

/* Parse "redis://host[:port][/db]" into opts (port 6379, db 0 default). */
tg_rc tg_redis_parse_url(const char *url, tg_redis_opts *opts, char *err, size_t errlen);

/*
 * Create the client of one worker and start connecting (non-blocking;
 * numeric addresses or names resolved by... the caller passes a numeric
 * host: resolve at config load, never on the loop).  Reconnects by itself
 * with backoff (100 ms doubling to 5 s, with jitter) after any failure.
 */
struct tg_redis *tg_redis_create(struct event_base *base, const tg_redis_opts *opts);
void tg_redis_destroy(struct tg_redis *r);

/* 1 while connected and the script is usable. */
int tg_redis_ready(const struct tg_redis *r);

/*
 * Queue one charge: keys[0..n) (copied), limits lim[0..n), cost.
 * cb(arg, TG_OK, &result) with the script's answer, or cb(arg, TG_ERR,
 * NULL) on error, timeout or no connection.  cb is called exactly once,
 * and never from inside tg_redis_charge itself (a refusal is delivered on
 * the next loop turn too), unless the op is cancelled first.
 */
typedef void (*tg_redis_charge_cb)(void *arg, tg_rc rc, const tg_gcra_result *res);
struct tg_redis_op *tg_redis_charge(struct tg_redis *r, const char *const *keys,
                                    const tg_gcra_limit *lim, size_t n, uint32_t cost,
                                    tg_redis_charge_cb cb, void *arg);

/* The requester is gone: cb will not be called; op is invalid after. */
void tg_redis_cancel(struct tg_redis_op *op);

/*
 * HGET key field (the key store).  cb(arg, TG_OK, value, len) with the
 * string value, cb(arg, TG_OK, NULL, 0) when the field does not exist,
 * cb(arg, TG_ERR, NULL, 0) on error/timeout.  Same once-only and
 * cancellation rules as tg_redis_charge.
 */
typedef void (*tg_redis_str_cb)(void *arg, tg_rc rc, const char *value, size_t len);
struct tg_redis_op *tg_redis_hget(struct tg_redis *r, const char *key, const char *field,
                                  tg_redis_str_cb cb, void *arg);

/* Counters since creation (tests, metrics). */
typedef struct tg_redis_stats {
    uint64_t calls;                /* EVALSHA/EVAL/HGET sent */
    uint64_t charges;              /* charges answered OK */
    uint64_t errors;               /* charges answered TG_ERR */
    uint64_t timeouts;
    uint64_t noscript;             /* NOSCRIPT recoveries */
    uint64_t reconnects;
} tg_redis_stats;
void tg_redis_get_stats(const struct tg_redis *r, tg_redis_stats *st);

#endif
