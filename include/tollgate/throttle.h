/*
 * throttle.h - dynamic throttling (adaptive.throttle): a load factor f in
 * [min_factor, 1] that scales the refill rate of every bucket while the
 * upstream is slow or failing, and recovers when it is not.
 *
 * One per process, shared by the workers (like the in-process store):
 *
 *   record   every finished upstream exchange (upstream.c): its time to the
 *            response head and whether it failed (a 5xx, or no answer:
 *            connect error, timeout, invalid response) go into the calling
 *            thread's own slot - counters and a log-scale histogram, relaxed
 *            atomic adds on a line no other worker writes: no lock;
 *   tick     every worker's 50 ms sample (limiter.c); the one that finds the
 *            window over closes it (a compare-and-swap elects it): the
 *            window's exchanges, slow ones (over target_p99_ms) and errors
 *            give the local factor by one AIMD step (tg_throttle_step); under
 *            store: redis the worker reports it through its own Redis client
 *            (tg_throttle_lua) and applies the smallest recent report of any
 *            instance; under store: local, or when Redis does not answer, it
 *            applies its own;
 *   factor   read by every charge (limiter.c): the bucket intervals become
 *            ceil(interval / f) (refill x f, burst unchanged) before the
 *            store, the fallback, the leases or the deny cache see them.
 *
 * The step (per window, f in permille):
 *
 *     judged = at least TG_THROTTLE_MIN_SAMPLES exchanges
 *     over   = judged and (slow * 100 > n          (p99 > target_p99_ms)
 *                          or errors > max_error_ratio * n)
 *     over   -> f = max(min_factor, f * TG_THROTTLE_DECREASE / 1000)
 *     else   -> f = min(1, f + TG_THROTTLE_RECOVER)
 *
 * A window too quiet to judge counts as clear: a throttle that no traffic
 * confirms does not stay.  The p99 test is exact (a count of exchanges over
 * the target, not a histogram bucket); the histogram only feeds /status.
 * Everything here reloads: a tick reads the closing worker's configuration.
 */
#ifndef TOLLGATE_THROTTLE_H
#define TOLLGATE_THROTTLE_H

#include <stddef.h>
#include <stdint.h>

#include "tollgate/common.h"
#include "tollgate/conf.h"

struct evbuffer;
struct tg_redis;

#define TG_THROTTLE_ONE          1000   /* factor 1, in permille */
#define TG_THROTTLE_MIN_SAMPLES  20     /* a window with fewer is not judged */
#define TG_THROTTLE_DECREASE     500    /* over: f * 0.5 */
#define TG_THROTTLE_RECOVER      100    /* clear: f + 0.1 */
#define TG_THROTTLE_REPORT_WINDOWS 3    /* a Redis report lives this many windows */
#define TG_THROTTLE_BUCKETS      240    /* histogram: 8 per octave up to 2^32 us */
#define TG_THROTTLE_ID_MAX       96     /* instance id, with its NUL */
#define TG_THROTTLE_KEY_MAX      192    /* <redis.prefix>{throttle}, with its NUL */

/* ---- pure parts (tests/unit/test_throttle.c) --------------------------- */

/* What one window saw. */
typedef struct tg_throttle_window {
    uint64_t n;                  /* exchanges finished */
    uint64_t slow;               /* ... of which over target_p99_ms */
    uint64_t errors;             /* ... of which failed */
} tg_throttle_window;

/* The step's settings, from adaptive.throttle. */
typedef struct tg_throttle_params {
    double   max_error_ratio;
    unsigned min_factor;         /* permille, >= 1 */
} tg_throttle_params;

/* min_factor of conf in permille (rounded, at least 1). */
unsigned tg_throttle_min_permille(double min_factor);

/* One window's step: the factor after w, from factor (both permille). */
unsigned tg_throttle_step(unsigned factor, const tg_throttle_window *w,
                          const tg_throttle_params *p);

/* Histogram bucket of a time in microseconds, and the largest time a
 * bucket holds (its bound: a p99 read from it is never low by more than
 * one eighth of an octave). */
unsigned tg_throttle_bucket(uint64_t us);
uint64_t tg_throttle_bucket_max(unsigned b);

/* The 99th percentile (nearest rank) of n samples counted in hist
 * (TG_THROTTLE_BUCKETS), as its bucket's bound; 0 when n is 0. */
uint64_t tg_throttle_p99_us(const uint64_t *hist, uint64_t n);

/*
 * The report script (Redis >= 5, effects replication).  KEYS[1]: the
 * reports hash, <redis.prefix>{throttle} (one key: Cluster-safe).  ARGV:
 * this instance's id, its factor (permille, 1..1000), the report's life in
 * ms.  It writes field id = "factor expiry_ms" (Redis clock), drops
 * expired or malformed reports, keeps the hash until the last report
 * expires, and returns "min n": the smallest factor among the n live
 * reports (its own included).
 */
extern const char tg_throttle_lua[];

/* The arguments of one report, laid out for tg_redis_eval. */
typedef struct tg_throttle_report {
    char        key[TG_THROTTLE_KEY_MAX];
    char        id[TG_THROTTLE_ID_MAX];
    char        factor[12];
    char        life_ms[24];
    const char *args[3];         /* id, factor, life_ms */
} tg_throttle_report;

void tg_throttle_report_build(tg_throttle_report *rep, const char *prefix,
                              const char *id, unsigned factor, unsigned life_ms);

/* Parse the script's reply s (len bytes): TG_OK with *min in 1..1000 and
 * *reporters >= 1, or TG_ERR (why: a static string) for anything else. */
tg_rc tg_throttle_parse_reply(const char *s, size_t len, unsigned *min,
                              unsigned *reporters, const char **why);

/* ---- the process's throttle -------------------------------------------- */

/* Set up from the configuration at start (main thread, before the workers
 * and after tg_metrics_init); always, so a reload may turn it on.  The
 * instance id is host:pid:random. */
void tg_throttle_init(const tg_conf *conf);
/* After every worker has stopped. */
void tg_throttle_deinit(void);

/* One finished upstream exchange (any worker thread): rtt_us to its
 * response head (or its failure), error 1 when it failed. */
void tg_throttle_record(uint64_t rtt_us, int error);

/* The factor to apply now, permille (TG_THROTTLE_ONE: none). */
unsigned tg_throttle_factor(void);

/* A worker's periodic sample: closes the window when it is over (one
 * worker wins), with conf (that worker's, reloaded), redis (its client,
 * NULL under store: local) and prefix (redis.prefix as started). */
void tg_throttle_tick(const tg_conf *conf, struct tg_redis *redis, const char *prefix,
                      uint64_t now_ms);

/* Append "throttle":{...}, to out (/status) when it is configured. */
void tg_throttle_status_json(struct evbuffer *out);

#endif
