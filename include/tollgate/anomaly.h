/*
 * anomaly.h - who is unusual: heavy hitters per window (Space-Saving) and
 * a baseline per heavy hitter (EWMA over windows).  Section anomaly:.
 *
 * Life of a count.  The request path calls tg_anomaly_count() with the
 * consumer the limiter identified (key id, or "anon:<ip>" for the
 * anonymous tier; never the key): one hash lookup and O(1) pointer moves
 * in the worker's own sketch, no lock, no allocation.  Every 50 ms the
 * worker's sampler calls tg_anomaly_shard_tick(); when the window
 * (window_ms, aligned on the monotonic clock) has ended, the worker hands
 * its sketch to the main thread through one atomic pointer exchange and
 * starts a fresh one.  The main thread collects the sketches of a window,
 * merges them (mergeable summaries), updates the baselines and keeps the
 * keys that are unusual now; the alert engine reads those (rule anomaly)
 * and /status/top shows the window's top consumers.
 *
 * Ownership: a sketch belongs to whoever holds its pointer; the exchange
 * moves it.  The shards belong to the engine and must outlive the
 * workers that count into them.
 *
 * Bounds (docs/DESIGN-NOTES.md): a sketch of capacity m (4 x top_k)
 * holds at most m keys in tg_sketch_bytes(m) bytes whatever the stream;
 * a count is over by at most err <= N/m (N: the window's requests), and
 * every key with more than N/m requests is in it.
 */
#ifndef TOLLGATE_ANOMALY_H
#define TOLLGATE_ANOMALY_H

#include <stddef.h>
#include <stdint.h>

#include "tollgate/common.h"
#include "tollgate/conf.h"
#include "tollgate/keys.h"

#define TG_ANOMALY_ID_MAX   (TG_KEY_ID_MAX + 47)   /* a limiter consumer, NUL excluded */
#define TG_ANOMALY_SLOTS_K  4                      /* sketch capacity = 4 x top_k */

struct evbuffer;
struct event_base;

/* ---- the sketch (Space-Saving with the Stream-Summary layout) ---------- */

struct tg_sketch;

typedef struct tg_sketch_item {
    const char *id;              /* valid while the sketch is unchanged */
    uint64_t    count;           /* estimate: true <= count */
    uint64_t    err;             /* over-count bound: count - err <= true */
} tg_sketch_item;

/* A sketch of capacity keys (>= 1); all its memory is taken here. */
struct tg_sketch *tg_sketch_create(size_t capacity);
void tg_sketch_destroy(struct tg_sketch *s);
/* Count one occurrence of id (cut at TG_ANOMALY_ID_MAX): O(1), no
 * allocation. */
void tg_sketch_add(struct tg_sketch *s, const char *id);
/* Occurrences counted (N), keys held, and the bytes the sketch owns (a
 * function of its capacity only). */
uint64_t tg_sketch_total(const struct tg_sketch *s);
size_t tg_sketch_size(const struct tg_sketch *s);
size_t tg_sketch_bytes(const struct tg_sketch *s);
/* The smallest count when full (what an absent key may have had), else 0. */
uint64_t tg_sketch_floor(const struct tg_sketch *s);
/* Up to k items, largest count first, into out.  Returns how many. */
size_t tg_sketch_top(const struct tg_sketch *s, tg_sketch_item *out, size_t k);

/* ---- the baseline of one key --------------------------------------------- */

enum tg_anomaly_state { TG_AN_NONE, TG_AN_SPIKE, TG_AN_NEW };

typedef struct tg_anomaly_params {
    double   spike_factor;       /* anomaly.spike_factor */
    uint64_t min_requests;       /* anomaly.min_requests */
    double   new_share;          /* anomaly.new_key_share */
    int      warm;               /* the detector has seen enough windows for
                                    "new key" to mean something */
} tg_anomaly_params;

typedef struct tg_anomaly_baseline {
    double   mean;               /* EWMA of its requests per window */
    unsigned nwin;               /* windows learned (0: never seen) */
    enum tg_anomaly_state state;
} tg_anomaly_baseline;

#define TG_ANOMALY_ALPHA  0.2    /* EWMA weight of the newest window */
#define TG_ANOMALY_LEARN  3      /* windows before the spike test applies */
#define TG_ANOMALY_CAP    2.0    /* a window teaches at most 2x the baseline */

/*
 * One window of one key: count requests (guaranteed, i.e. count - err)
 * out of total.  Tests the key against its baseline, then learns from
 * the window unless the key is in a spike (the baseline is frozen while
 * it lasts, so the incident ends when the traffic does).  Returns the new
 * state.  Pure: the unit tests drive it.
 */
enum tg_anomaly_state tg_anomaly_observe(tg_anomaly_baseline *b, uint64_t count,
                                         uint64_t total, const tg_anomaly_params *p);

/* ---- the engine (main thread) ---------------------------------------------- */

struct tg_anomaly;
struct tg_anomaly_shard;

/* The engine for nworkers workers on base; inactive while conf has no
 * anomaly: section.  Takes no reference on conf. */
struct tg_anomaly *tg_anomaly_create(struct event_base *base, const tg_conf *conf,
                                     unsigned nworkers);
/* Worker i's shard (give it to the worker before it starts). */
struct tg_anomaly_shard *tg_anomaly_shard(struct tg_anomaly *an, unsigned i);
/* SIGHUP: new parameters.  Windows restart if window_ms changed;
 * baselines are kept unless the section is gone. */
void tg_anomaly_reload(struct tg_anomaly *an, const tg_conf *conf);
/* After every worker has stopped. */
void tg_anomaly_destroy(struct tg_anomaly *an);

/* /status/top: the last finished window's top consumers, JSON. */
void tg_anomaly_status_json(const struct tg_anomaly *an, struct evbuffer *out);

/* A key that is unusual now (for the alert engine). */
typedef struct tg_anomaly_hit {
    const char *consumer;
    enum tg_anomaly_state state; /* TG_AN_SPIKE or TG_AN_NEW */
    uint64_t    requests;        /* in the last window (guaranteed) */
    uint64_t    total;           /* all requests of that window */
    double      baseline;        /* requests per window before the spike */
    unsigned    window_ms;
    double      spike_factor;
} tg_anomaly_hit;

/* Call fn for every unusual key; returns how many. */
size_t tg_anomaly_foreach_hit(const struct tg_anomaly *an,
                              void (*fn)(void *arg, const tg_anomaly_hit *h),
                              void *arg);
/* 1 if consumer is unusual now. */
int tg_anomaly_is_hit(const struct tg_anomaly *an, const char *consumer);

/* ---- the worker side --------------------------------------------------------- */

/* Request path: one request of consumer (NULL or "" = not identified).
 * sh may be NULL. */
void tg_anomaly_count(struct tg_anomaly_shard *sh, const char *consumer);
/* The worker's sampler: start a window, hand over an ended one. */
void tg_anomaly_shard_tick(struct tg_anomaly_shard *sh, uint64_t now_ms);

#endif
