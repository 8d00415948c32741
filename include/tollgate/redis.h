/*
 * redis.h - the Redis side of the bucket store: one async hiredis
 * connection per worker thread, on that worker's event base.
 *
 * Charges that arrive during one loop turn are sent together as ONE
 * EVALSHA of the GCRA script (tg_gcra_lua) over all their keys, each
 * distinct key once (up to redis.max_batch charges per call): each
 * request's result is independent.  While a charge call is in flight on
 * the connection (single, Sentinel), the charges of the next loop turns
 * wait for its answer (or their deadline) and go as one call.  Every
 * call has a deadline (redis.timeout_ms) kept by our own timer, since
 * hiredis 0.14 has none.  NOSCRIPT is recovered (EVAL with the script
 * text, which also caches it) without the caller noticing.
 *
 * Three deployments (see docs/DESIGN-NOTES.md, "Sentinel and Cluster"):
 *   single    opts.host:port (redis.url);
 *   Sentinel  opts.sentinel_master set: the master is asked of the
 *             sentinels, checked with ROLE, re-learned on connection loss,
 *             READONLY/LOADING/MASTERDOWN replies and +switch-master;
 *   Cluster   opts.ncluster > 0: slot map from CLUSTER SLOTS (asked again
 *             at once when a master fails), one connection and one breaker
 *             per master, one script call per slot (Redis rejects declared
 *             keys of several slots even with allow-cross-slot-keys),
 *             MOVED/ASK followed.  A request whose keys span two slots (the
 *             global bucket) is charged in two calls: its first key's slot,
 *             then the rest, with a refund of the first part (at most what
 *             it still holds) when the second denies.
 */
#ifndef TOLLGATE_REDIS_H
#define TOLLGATE_REDIS_H

#include <event2/event.h>

#include "tollgate/common.h"
#include "tollgate/gcra.h"

#define TG_CHARGE_MAX_BUCKETS 8
#define TG_REDIS_MAX_ADDRS    16      /* sentinels / cluster seed nodes */
#define TG_REDIS_CLUSTER_SLOTS 16384
#define TG_REDIS_USER_MAX     128     /* ACL user name, with its NUL */
#define TG_REDIS_PASS_MAX     512     /* password, with its NUL */

struct tg_redis;
struct tg_redis_op;

/* A numeric address (no name resolution happens on a loop). */
typedef struct tg_redis_addr {
    char      host[64];            /* "127.0.0.1", "::1" */
    int       port;
} tg_redis_addr;

typedef struct tg_redis_opts {
    char      host[256];           /* from redis.url (single mode) */
    int       port;
    int       db;                  /* SELECT db after connecting when != 0 */
    unsigned  timeout_ms;          /* per call (redis.timeout_ms; > 0) */
    unsigned  max_batch;           /* requests per EVALSHA (redis.max_batch; > 0) */
    int       no_native;           /* redis.native off; else (0) ask each server
                                      for TOLLGATE.PROTO and charge with
                                      TOLLGATE.CHARGE where it answers
                                      TG_GCRA_NATIVE_PROTO (gcra.h) */
    char      sentinel_master[64]; /* non-empty: Sentinel mode */
    tg_redis_addr sentinels[TG_REDIS_MAX_ADDRS];    /* asked in order */
    size_t    nsentinels;
    tg_redis_addr cluster_nodes[TG_REDIS_MAX_ADDRS]; /* seeds; > 0: Cluster */
    size_t    ncluster;            /* (Cluster needs db 0) */
    /* AUTH, sent first on every connection; "" = none.  The server's
     * (and every Cluster node's), and the sentinels' (may differ).
     * Never logged. */
    char      username[TG_REDIS_USER_MAX];
    char      password[TG_REDIS_PASS_MAX];
    char      sentinel_username[TG_REDIS_USER_MAX];
    char      sentinel_password[TG_REDIS_PASS_MAX];
} tg_redis_opts;

/* Parse "redis://host[:port][/db]" into opts (port 6379, db 0 default)
 * with the config's parser (tg_conf_parse_redis_url; the limiter takes
 * conf->redis.server instead).  Also clears the Sentinel and Cluster
 * fields: fill them afterwards. */
tg_rc tg_redis_parse_url(const char *url, tg_redis_opts *opts, char *err, size_t errlen);

/*
 * Create the client of one worker and start connecting (non-blocking).
 * opts.host, the sentinels and the seeds should be numeric (resolved at
 * config load); names learnt later (CLUSTER SLOTS, MOVED, Sentinel with
 * announce-hostnames) are resolved with evdns, never blocking the loop.
 * Reconnects by itself with backoff (100 ms doubling to 5 s, with jitter)
 * after any failure; the backoff restarts after the first good reply.
 * Call on the thread that will run base, before it runs (reads
 * /etc/resolv.conf and /etc/hosts).
 */
struct tg_redis *tg_redis_create(struct event_base *base, const tg_redis_opts *opts);
void tg_redis_destroy(struct tg_redis *r);

/* Fill a from a numeric socket address (AF_INET/AF_INET6); TG_ERR else. */
struct sockaddr;
tg_rc tg_redis_addr_from_sockaddr(const struct sockaddr *sa, tg_redis_addr *a);

/* The Cluster slot of a key: CRC16 (XMODEM) of its hash tag mod 16384. */
unsigned tg_redis_key_slot(const char *key, size_t len);

/* 1 while connected and the script is usable (Cluster: the slot map is
 * known and at least one master is connected). */
int tg_redis_ready(const struct tg_redis *r);

/* 1 when the client keeps a breaker per node (Cluster): a failing node
 * fails its own calls at once, the others go on; the caller should then
 * not open a breaker of its own over all of them. */
int tg_redis_node_breakers(const struct tg_redis *r);

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

/*
 * Bring op's deadline forward to deadline_us (tg_now_us() clock; it is
 * never moved later).  An op's deadline is redis.timeout_ms after it was
 * queued unless set here; the caller sets it right after queueing, so one
 * deadline covers all the Redis calls of one request (key lookup, charge,
 * Cluster's second call).  Past it, cb gets TG_ERR.
 */
void tg_redis_op_deadline(struct tg_redis_op *op, uint64_t deadline_us);

/*
 * Charge op's buckets as if each held at least held_us[i] (time until
 * full, 0 = no floor): the debt the local fallback store knows of, so
 * that what the fallback admitted is not admitted again by Redis.  Call
 * right after tg_redis_charge.
 */
void tg_redis_op_floor(struct tg_redis_op *op, const uint64_t *held_us, size_t n);

/* The requester is gone: cb will not be called; op is invalid after.  A
 * charge already sent is given back when its answer says it was applied
 * (as is any charge answered after its deadline). */
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

/*
 * EVAL script 1 key args[0..nargs) - a small script of another module
 * (the throttle's report), sent as its text every time: for rare calls
 * only.  cb(arg, TG_OK, value, len) when the script returns a string or
 * status (NULL, 0 for nil), cb(arg, TG_ERR, NULL, 0) on an error reply
 * (logged), any other reply type (logged), a timeout or no connection.
 * script, key and args are copied.  Same once-only and cancellation rules
 * as tg_redis_charge.
 */
#define TG_REDIS_EVAL_ARGS 6
struct tg_redis_op *tg_redis_eval(struct tg_redis *r, const char *script, const char *key,
                                  const char *const *args, size_t nargs,
                                  tg_redis_str_cb cb, void *arg);

/* The last authentication problem of any client of this process (wrong
 * password, NOAUTH), "" when the last AUTH succeeded: for /status.  Never
 * holds a secret.  Thread-safe. */
void tg_redis_last_error(char *buf, size_t len);

/*
 * Give back amount_us[i] of keys[i]'s debt for i < n, each at most what is
 * still ahead of p_us[i] (the TAT a charge wrote, on the clock of
 * tg_gcra_result.now_us): a lease's unused tokens.  One call per
 * TG_REDIS_GIVE_MAX keys (Cluster: per key).  Fire and forget, sent after
 * what is queued on the connection already.  now: write at once, for a
 * worker that is shutting down (no loop turn will come) - never on a
 * request's path (a failed write runs the connection's callbacks).
 */
#define TG_REDIS_GIVE_MAX 64
void tg_redis_give_back(struct tg_redis *r, const char *const *keys,
                        const uint64_t *amount_us, const uint64_t *p_us, size_t n, int now);

/* Counters since creation (tests, metrics). */
typedef struct tg_redis_stats {
    uint64_t calls;                /* EVALSHA/EVAL/HGET sent */
    uint64_t charges;              /* charges answered OK */
    uint64_t errors;               /* charges answered TG_ERR */
    uint64_t timeouts;
    uint64_t noscript;             /* NOSCRIPT recoveries */
    uint64_t reconnects;
    uint64_t rediscoveries;        /* Sentinel: master asked again */
    uint64_t switches;             /* Sentinel: +switch-master seen for us */
    uint64_t redirects;            /* Cluster: MOVED/ASK followed */
    uint64_t map_refreshes;        /* Cluster: CLUSTER SLOTS answered */
    uint64_t refunds;              /* given back: Cluster first parts, and
                                      charges answered late or cancelled */
    uint64_t map_kicks;            /* Cluster: refresh asked by a node failure */
    uint64_t oversized;            /* replies refused (too many elements/bytes) */
    uint64_t auth_failures;        /* AUTH refused */
} tg_redis_stats;
void tg_redis_get_stats(const struct tg_redis *r, tg_redis_stats *st);

#endif
