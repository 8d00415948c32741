/*
 * metrics.h - the metric registry: every metric declared once, per-thread
 * shards on the hot path, merge on read for Prometheus and StatsD.
 *
 * Model (twemproxy nc_stats.h): TG_METRICS below is the only list of
 * metrics.  Each worker thread owns a struct tg_metrics_shard (plain
 * uint64_t slots, written only by that thread with relaxed atomic
 * stores, read by the exporter with relaxed atomic loads: no lock, no
 * read-modify-write bus lock on the request path).  Rare events of the
 * main thread (config reloads, StatsD drops) and gauges go to one
 * process-global table instead (tg_metrics_global_add, tg_metrics_set_gauge).
 *
 * Labels are bounded: each metric has one label set, and every label set
 * is an enumeration known at start-up (tiers, routes and upstream servers
 * from the config given to tg_metrics_init, or a fixed list below).  A
 * series is addressed by its label index in [0, tg_metrics_series(id)).
 * Keys, client addresses and paths are never labels.
 *
 * Lifetime: tg_metrics_init() once before any shard is created and before
 * the workers start; tg_metrics_deinit() after every shard is destroyed.
 * Label enumerations are fixed for the life of the process: a config
 * reload that adds a tier or route cannot add series (indexes out of
 * range are dropped by the increments, never written out of bounds).
 */
#ifndef TOLLGATE_METRICS_H
#define TOLLGATE_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "tollgate/common.h"

struct evbuffer;

/* ---- the list ---------------------------------------------------------
 *
 * X(id, type, "name", "help", labelset, buckets)
 *
 * type:     COUNTER, GAUGE or HISTOGRAM
 * labelset: one of TG_METRICS_LABELSETS below
 * buckets:  NOBUCKETS for counters and gauges, else a bucket set
 *           (HTTP: 1 ms .. 30 s, REDIS: 0.1 ms .. 1 s)
 *
 * The three rate_limiter_* / redis_* names are the original design's
 * (RateLimiter.md) and are kept exactly, without the _total suffix.
 */
#define TG_METRICS(X)                                                          \
    X(TOKENS_CONSUMED, COUNTER, "rate_limiter_tokens_consumed",                \
      "Tokens charged to rate-limit buckets by allowed requests, by tier.",    \
      TIER, NOBUCKETS)                                                         \
    X(BREACHES, COUNTER, "rate_limiter_breaches",                              \
      "Requests refused with 429 because a bucket of the tier was empty.",     \
      TIER, NOBUCKETS)                                                         \
    X(REDIS_OP_LATENCY_MS, GAUGE, "redis_operation_latency_ms",                \
      "Mean latency in milliseconds of Redis calls in the last interval.",     \
      NONE, NOBUCKETS)                                                         \
    X(REQUESTS, COUNTER, "tollgate_requests_total",                            \
      "Requests answered, by key tier and HTTP status.",                       \
      TIER_STATUS, NOBUCKETS)                                                  \
    X(ROUTE_REQUESTS, COUNTER, "tollgate_route_requests_total",                \
      "Requests that matched a configured route, by route.",                   \
      ROUTE, NOBUCKETS)                                                        \
    X(REQUEST_DURATION, HISTOGRAM, "tollgate_request_duration_seconds",        \
      "Time from request headers read to response sent, by tier.",             \
      TIER, HTTP)                                                              \
    X(UPSTREAM_DURATION, HISTOGRAM, "tollgate_upstream_duration_seconds",      \
      "Time from request forwarded to upstream response complete.",            \
      SERVER, HTTP)                                                            \
    X(REDIS_CALLS, COUNTER, "tollgate_redis_calls_total",                      \
      "Charges sent to Redis by outcome (ok, error); timeout and noscript count calls.", \
      REDIS_OUTCOME, NOBUCKETS)                                                \
    X(REDIS_LATENCY, HISTOGRAM, "tollgate_redis_latency_seconds",              \
      "Latency of Redis script calls that got a reply.",                       \
      NONE, REDIS)                                                             \
    X(UPSTREAM_HEALTH, GAUGE, "tollgate_upstream_health",                      \
      "1 if the upstream server passes health checks, else 0.",                \
      SERVER, NOBUCKETS)                                                       \
    X(UPSTREAM_BREAKER, GAUGE, "tollgate_upstream_breaker_state",              \
      "Circuit breaker of the upstream server: 0 closed, 1 open, 2 half-open.",\
      SERVER, NOBUCKETS)                                                       \
    X(ADAPTIVE_LIMIT, GAUGE, "tollgate_adaptive_limit",                        \
      "Adaptive in-flight limit of the upstream server (sum of the workers').",\
      SERVER, NOBUCKETS)                                                       \
    X(ADAPTIVE_INFLIGHT, GAUGE, "tollgate_adaptive_inflight",                  \
      "Exchanges in flight to the upstream server (adaptive concurrency).",    \
      SERVER, NOBUCKETS)                                                       \
    X(ADAPTIVE_QUEUED, GAUGE, "tollgate_adaptive_queued",                      \
      "Requests waiting for an upstream slot (adaptive concurrency).",         \
      NONE, NOBUCKETS)                                                         \
    X(SHED, COUNTER, "tollgate_shed_total",                                    \
      "Requests refused with 503 by adaptive concurrency, by tier.",           \
      TIER, NOBUCKETS)                                                         \
    X(THROTTLE_FACTOR, GAUGE, "tollgate_throttle_factor",                      \
      "Load factor applied to every refill rate (adaptive.throttle); 1 = none.",\
      NONE, NOBUCKETS)                                                         \
    X(STORE_MODE, GAUGE, "tollgate_store_mode",                                \
      "Bucket store in use: 1 for the active mode, 0 for the others.",         \
      STORE_MODE, NOBUCKETS)                                                   \
    X(CONNECTIONS_OPEN, GAUGE, "tollgate_connections_open",                    \
      "Client connections open now.",                                          \
      NONE, NOBUCKETS)                                                         \
    X(CONFIG_RELOADS, COUNTER, "tollgate_config_reloads_total",                \
      "Configuration reloads by result.",                                      \
      RELOAD_RESULT, NOBUCKETS)                                                \
    X(BUILD_INFO, GAUGE, "tollgate_build_info",                                \
      "Always 1; the version label names the running build.",                  \
      VERSION, NOBUCKETS)                                                      \
    X(LIMIT_DECISIONS, COUNTER, "tollgate_limit_decisions_total",              \
      "Rate-limit decisions by outcome.",                                      \
      DECISION, NOBUCKETS)                                                     \
    X(STATSD_DROPPED, COUNTER, "tollgate_statsd_dropped_total",                \
      "StatsD lines dropped because one line exceeded the datagram size.",     \
      NONE, NOBUCKETS)                                                         \
    X(ALOG_DROPPED, COUNTER, "tollgate_access_log_dropped_total",              \
      "Access log lines dropped because the log could not keep up.",           \
      NONE, NOBUCKETS)                                                         \
    X(CONNS_REFUSED, COUNTER, "tollgate_connections_refused_total",            \
      "Client connections closed at accept, over http.max_connections or "     \
      "http.max_connections_per_ip.",                                          \
      NONE, NOBUCKETS)                                                         \
    X(ALERTS, COUNTER, "tollgate_alerts_total",                                \
      "Alert messages by channel, rule and outcome (sent, retried, dropped).", \
      ALERT, NOBUCKETS)                                                        \
    X(ALERTS_OPEN, GAUGE, "tollgate_alerts_open_incidents",                    \
      "Incidents open now, by alert rule.",                                    \
      ALERT_RULE, NOBUCKETS)

/* Metric ids: TG_M_REQUESTS, TG_M_BREACHES, ... */
typedef enum tg_metric_id {
#define TG_METRICS_ENUM_(id, type, name, help, ls, b) TG_M_##id,
    TG_METRICS(TG_METRICS_ENUM_)
#undef TG_METRICS_ENUM_
    TG_M__COUNT
} tg_metric_id;

typedef enum tg_metric_type {
    TG_MT_COUNTER,
    TG_MT_GAUGE,
    TG_MT_HISTOGRAM,
} tg_metric_type;

/* Label sets.  Cardinality in brackets. */
#define TG_METRICS_LABELSETS(X)                                                \
    X(NONE)          /* no labels [1] */                                       \
    X(TIER)          /* tier [ntiers] */                                       \
    X(TIER_STATUS)   /* tier, status [ntiers * TG_MS__COUNT] */                \
    X(ROUTE)         /* route [nroutes] */                                     \
    X(SERVER)        /* server [nservers] */                                   \
    X(REDIS_OUTCOME) /* outcome [TG_MR__COUNT] */                              \
    X(RELOAD_RESULT) /* result [TG_MRL__COUNT] */                              \
    X(STORE_MODE)    /* mode [TG_MSM__COUNT] */                                \
    X(DECISION)      /* outcome [TG_MD__COUNT] */                              \
    X(VERSION)       /* version [1], value TG_VERSION */                      \
    X(ALERT)         /* channel, rule, outcome [TG_MA_CHANNELS * TG_MA_RULES * TG_MAO__COUNT] */ \
    X(ALERT_RULE)    /* rule [TG_MA_RULES - 1]: without "test" */

typedef enum tg_metric_labelset {
#define TG_METRICS_LS_ENUM_(ls) TG_ML_##ls,
    TG_METRICS_LABELSETS(TG_METRICS_LS_ENUM_)
#undef TG_METRICS_LS_ENUM_
    TG_ML__COUNT
} tg_metric_labelset;

/* status label: the statuses tollgate and its upstreams answer most; any
 * other code is counted as "other".  Index with tg_metrics_status_slot(). */
#define TG_METRICS_STATUSES(X)                                                 \
    X(200) X(201) X(204) X(301) X(304) X(400) X(401) X(403) X(404) X(408)     \
    X(413) X(414) X(429) X(431) X(499) X(500) X(502) X(503) X(504)

enum tg_metric_status {
#define TG_METRICS_ST_ENUM_(code) TG_MS_##code,
    TG_METRICS_STATUSES(TG_METRICS_ST_ENUM_)
#undef TG_METRICS_ST_ENUM_
    TG_MS_OTHER,
    TG_MS__COUNT
};

/* outcome label of tollgate_redis_calls_total */
enum tg_metric_redis_outcome {
    TG_MR_OK, TG_MR_ERROR, TG_MR_TIMEOUT, TG_MR_NOSCRIPT, TG_MR__COUNT
};

/* result label of tollgate_config_reloads_total */
enum tg_metric_reload_result { TG_MRL_OK, TG_MRL_ERROR, TG_MRL__COUNT };

/* mode label of tollgate_store_mode */
enum tg_metric_store_mode {
    TG_MSM_REDIS, TG_MSM_LOCAL, TG_MSM_ALLOW, TG_MSM_DENY, TG_MSM__COUNT
};

/* outcome label of tollgate_limit_decisions_total */
enum tg_metric_decision {
    TG_MD_ALLOWED, TG_MD_LIMITED, TG_MD_UNAUTHORIZED, TG_MD_FORBIDDEN,
    TG_MD_STORE_FALLBACK, TG_MD_STORE_DENY, TG_MD__COUNT
};

/* labels of tollgate_alerts_total: channel (conf.h tg_alert_channel
 * order: slack pagerduty webhook), rule (tg_alert_rule order, then
 * "test" for tollgate alert-test), outcome */
#define TG_MA_CHANNELS 3
#define TG_MA_RULES    6
enum tg_metric_alert_outcome {
    TG_MAO_SENT, TG_MAO_RETRIED, TG_MAO_DROPPED, TG_MAO__COUNT
};
static inline size_t
tg_metrics_alert(size_t channel, size_t rule, size_t outcome)
{
    return (channel * TG_MA_RULES + rule) * TG_MAO__COUNT + outcome;
}

/* Upper bounds of histogram buckets, at most this many per set. */
#define TG_METRICS_MAX_BUCKETS 16

/* StatsD: no datagram is longer than this (fits a 1500-byte MTU with
 * IPv6 + UDP headers, the StatsD/DogStatsD recommendation). */
#define TG_METRICS_STATSD_MAX 1432

/* ---- registry ------------------------------------------------------- */

/*
 * Build the registry for the given label enumerations (strings are
 * copied; NULL with a count of 0 is fine) and set the constant gauges
 * (tollgate_build_info 1).  Call once before creating shards; calling it
 * again requires tg_metrics_deinit() first.
 */
tg_rc tg_metrics_init(const char *const *tiers, size_t ntiers,
                      const char *const *routes, size_t nroutes,
                      const char *const *servers, size_t nservers);
void tg_metrics_deinit(void);

/* Declared facts about a metric (tests, docs, the Grafana check). */
const char        *tg_metrics_name(tg_metric_id id);
const char        *tg_metrics_help(tg_metric_id id);
tg_metric_type     tg_metrics_type(tg_metric_id id);
tg_metric_labelset tg_metrics_labelset(tg_metric_id id);
/* Number of series (label combinations) of id under the current init. */
size_t             tg_metrics_series(tg_metric_id id);
/* The metric declared with this exact name, or -1. */
int                tg_metrics_lookup(const char *name);

/* Label index of (tier, status) for TG_M_REQUESTS. */
size_t tg_metrics_status_slot(int http_status);
static inline size_t
tg_metrics_tier_status(size_t tier, int http_status)
{
    return tier * TG_MS__COUNT + tg_metrics_status_slot(http_status);
}

/* ---- shards (hot path) --------------------------------------------- */

/*
 * Layout shared with the inline increments below; treat as private.
 * tg_metrics_layout_[id].off is the first slot of id in a shard,
 * .n its number of series, .stride the slots per series (1, or for a
 * histogram nbuckets + 1 (+Inf) + 1 (sum in microseconds)).
 */
struct tg_metrics_layout_ {
    uint32_t off;
    uint32_t n;
    uint32_t stride;
    uint32_t nb;                 /* finite buckets (histograms) */
    const uint64_t *bounds_us;   /* nb upper bounds, microseconds */
};
extern struct tg_metrics_layout_ tg_metrics_layout_[TG_M__COUNT];

struct tg_metrics_shard {
    uint64_t *slot;              /* owned; written by one thread only */
    size_t    nslots;
};

/* One per worker thread; zeroed.  Destroy after the last render. */
struct tg_metrics_shard *tg_metrics_shard_create(void);
void tg_metrics_shard_destroy(struct tg_metrics_shard *s);

/* Owner-thread increment: one relaxed load + store, no bus lock. */
static inline void
tg_metrics_slot_add_(uint64_t *p, uint64_t n)
{
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

/* Counter += n (or, for a gauge kept per shard, add a signed delta
 * converted to uint64_t: the merge sums shards as int64). */
static inline void
tg_metric_add(struct tg_metrics_shard *s, tg_metric_id id, size_t label, uint64_t n)
{
    const struct tg_metrics_layout_ *l = &tg_metrics_layout_[id];

    if (s == NULL || label >= l->n) {
        return;
    }
    tg_metrics_slot_add_(&s->slot[l->off + label * l->stride], n);
}

#define tg_metric_inc(s, id, label) tg_metric_add((s), (id), (label), 1)

/* Per-shard gauge delta (e.g. connections opened/closed by a worker). */
static inline void
tg_metric_gauge_add(struct tg_metrics_shard *s, tg_metric_id id, size_t label, int64_t d)
{
    tg_metric_add(s, id, label, (uint64_t)d);
}

/* Histogram observation in microseconds: bucket found by linear scan. */
static inline void
tg_metric_observe_us(struct tg_metrics_shard *s, tg_metric_id id, size_t label,
                     uint64_t us)
{
    const struct tg_metrics_layout_ *l = &tg_metrics_layout_[id];
    uint64_t *base;
    uint32_t b = 0;

    if (s == NULL || label >= l->n || l->stride < 2) {
        return;
    }
    while (b < l->nb && us > l->bounds_us[b]) {
        b++;
    }
    base = &s->slot[l->off + label * l->stride];
    tg_metrics_slot_add_(&base[b], 1);             /* b == nb: +Inf */
    tg_metrics_slot_add_(&base[l->nb + 1], us);    /* sum */
}

/* Histogram observation in (fractional) milliseconds. */
static inline void
tg_metric_observe(struct tg_metrics_shard *s, tg_metric_id id, size_t label, double ms)
{
    tg_metric_observe_us(s, id, label, ms <= 0 ? 0 : (uint64_t)(ms * 1000.0 + 0.5));
}

/* ---- process-global values (any thread) ----------------------------- */

/* Counter += n with an atomic add: for rare events outside a worker
 * (reloads, StatsD drops). */
void tg_metrics_global_add(tg_metric_id id, size_t label, uint64_t n);
#define tg_metrics_global_inc(id, label) tg_metrics_global_add((id), (label), 1)

/* Gauge = value (atomic store).  The rendered gauge is this value plus
 * the sum of the shards' deltas for the same series. */
void tg_metrics_set_gauge(tg_metric_id id, size_t label, double value);

/* tollgate_store_mode: 1 for mode, 0 for the other modes. */
void tg_metrics_set_store_mode(enum tg_metric_store_mode mode);

/* Called at the start of every render and StatsD flush, on the caller's
 * thread, to refresh gauges computed on demand.  NULL removes it. */
typedef void (*tg_metrics_scrape_fn)(void *arg);
void tg_metrics_set_scrape_hook(tg_metrics_scrape_fn fn, void *arg);

/*
 * Derived gauges, from the main thread on a timer (e.g. every StatsD
 * interval or 10 s): redis_operation_latency_ms = mean latency in ms of
 * the Redis calls observed in tollgate_redis_latency_seconds since the
 * previous tick; unchanged when there were none.
 */
void tg_metrics_tick(struct tg_metrics_shard *const *shards, size_t n);

/* Merged value of one series: counters and gauges; for a histogram its
 * observation count.  shards may be NULL when n is 0. */
double tg_metrics_value(struct tg_metrics_shard *const *shards, size_t n,
                        tg_metric_id id, size_t label);

/* ---- exporters ------------------------------------------------------ */

/* Append the Prometheus text exposition (format 0.0.4) of the merged
 * shards plus global values to out.  Returns TG_OK, or TG_ERR if out
 * refused data. */
tg_rc tg_metrics_render_prometheus(struct tg_metrics_shard *const *shards, size_t n,
                                   struct evbuffer *out);

/* Previous merged counters for StatsD deltas; create zeroed (the first
 * flush sends everything counted since start). */
struct tg_metrics_snapshot;
struct tg_metrics_snapshot *tg_metrics_snapshot_create(void);
void tg_metrics_snapshot_destroy(struct tg_metrics_snapshot *snap);

/*
 * One StatsD flush.  Counters: "prefix.name:delta|c" for every nonzero
 * delta since prev (prev is then updated).  Histograms: two counters
 * "name.count" and "name.sum_ms".  Gauges: "name:value|g" every flush.
 * dogstatsd_tags: labels as "|#tier:basic,status:200"; else folded into
 * the name ("prefix.requests.basic.200").  Lines are packed, '\n'
 * separated, into datagrams of at most TG_METRICS_STATSD_MAX bytes, each
 * passed to emit (the buffer is only valid during the call); a line is
 * never split, and one longer than the limit is dropped and counted in
 * tollgate_statsd_dropped_total.  prefix may be NULL or "".
 * Returns the number of datagrams emitted.
 */
typedef void (*tg_metrics_emit_fn)(void *arg, const char *datagram, size_t len);
size_t tg_metrics_statsd_delta(struct tg_metrics_shard *const *shards, size_t n,
                               struct tg_metrics_snapshot *prev, const char *prefix,
                               int dogstatsd_tags, tg_metrics_emit_fn emit, void *arg);

#endif
