/*
 * adaptive.h - adaptive concurrency: the in-flight limit of one upstream
 * server learned from latency, and the tier-ordered queue of requests
 * waiting for a slot.
 *
 * Pure logic: no I/O, no clock, no allocation on the request path (the
 * caller passes the times and owns the queue entries), so both are tested
 * without sockets (tests/unit/test_adaptive.c).  The upstream pool
 * (upstream.c) keeps one limit per server and one queue per worker.
 *
 * The limit (a gradient, after Netflix concurrency-limits' Gradient):
 * exchanges are sampled (time to the response head) in windows of at
 * least TG_ADAPT_WIN_SAMPLES samples and one no-load RTT (or one second,
 * whichever first).  The no-load RTT is the smallest of the last 15 to
 * 30 s: of two sliding halves, the lower of their TG_ADAPT_NOLOAD_RANK-th
 * smallest samples (a single early answer does not set it).  It is kept
 * per class of exchange (the caller's key: method, path and status
 * class), up to TG_ADAPT_CLASSES of them, so that each sample is compared
 * with the no-load RTT of its own kind: an API whose health checks answer
 * in 1 ms and its searches in 100 ms is not queueing.  At the end of a
 * window of n samples, allow_c = n_c * (TG_ADAPT_TOLERANCE * noload_c +
 * TG_ADAPT_SLACK_US) is what the n_c samples of class c may take,
 * allow = sum(allow_c), and rtt_c their summed RTT, counted at most
 * allow_c + n_c * allow / n (a class's excess is worth at most a mean
 * sample's allowance per sample: its count decides, not its size):
 *
 *     gradient = clamp(allow / sum(min(rtt_c, allow_c + n_c * allow / n)),
 *                      0.5, 1)
 *     gradient < 1 (queueing upstream)  -> target = limit * gradient
 *     failures (5xx, timeout): half the window's samples or more
 *                                        -> target = limit / 2
 *     gradient 1, busy (in flight >= limit/2) -> target = limit + sqrt(limit)
 *     gradient 1, idle, below initial    -> target = limit + sqrt(limit),
 *                                           at most initial
 *     limit = limit + s * (target - limit), in [min, max], where s is
 *     TG_ADAPT_SMOOTHING going up, TG_ADAPT_SMOOTHING_DOWN going down
 *
 * so the limit settles where the upstream's own queue stays short (its
 * latency within the tolerance of the no-load one): the knee.
 */
#ifndef TOLLGATE_ADAPTIVE_H
#define TOLLGATE_ADAPTIVE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "tollgate/common.h"

#define TG_ADAPT_WIN_SAMPLES  8          /* samples per window, at least */
#define TG_ADAPT_WIN_MAX_US   1000000    /* a window never lasts longer */
#define TG_ADAPT_MIN_HALF_US  15000000   /* no-load RTT: min of 2 halves */
#define TG_ADAPT_NOLOAD_RANK  3          /* ... each its 3rd smallest sample */
#define TG_ADAPT_TOLERANCE    1.25       /* latency allowed over no-load */
#define TG_ADAPT_SLACK_US     1000       /* ... and per sample, at least */
#define TG_ADAPT_CLASSES      16         /* no-load RTTs kept per limit */
#define TG_ADAPT_SMOOTHING    0.2        /* share of a higher target per window */
#define TG_ADAPT_SMOOTHING_DOWN 0.5      /* ... of a lower one */

/* ---- the limit ---------------------------------------------------------- */

/* One class of exchange: its own no-load RTT. */
typedef struct tg_adapt_class {
    uint32_t key;            /* the caller's; 0 = the catch-all (slot 0) */
    unsigned win_n;          /* its samples in the current window */
    uint64_t win_sum_us;     /* ... their RTTs */
    double   win_allow;      /* ... what they may take (window_close) */
    uint64_t lo_cur_us[TG_ADAPT_NOLOAD_RANK]; /* as below, for the class */
    uint64_t min_prev_us;
} tg_adapt_class;

typedef struct tg_adapt_limit {
    double   limit;          /* the estimate, in [min, max] */
    unsigned initial, min, max;
    uint64_t lo_cur_us[TG_ADAPT_NOLOAD_RANK]; /* smallest RTTs of the current
                                                half, ascending (0 = none) */
    uint64_t min_prev_us;    /* the previous half's no-load RTT (0 = none) */
    uint64_t half_start_us;  /* start of the current half */
    uint64_t win_start_us;   /* start of the current window (0 = none yet) */
    unsigned win_n;          /* samples in the window */
    unsigned win_cn;         /* ... of them in a class (the others: no
                                gradient, only length and failures) */
    unsigned win_inflight;   /* most in flight seen in the window */
    unsigned win_failed;     /* failures in the window */
    tg_adapt_class cls[TG_ADAPT_CLASSES]; /* [0]: the catch-all; a slot with
                                             no sample in either half is free */
} tg_adapt_limit;

/* Start at initial, bounded by [min, max] (min >= 1, min <= initial <= max). */
void tg_adapt_limit_init(tg_adapt_limit *l, unsigned initial, unsigned min,
                         unsigned max);

/*
 * One finished exchange: rtt_us from lending to the response head (or
 * the failure), now_us any monotonic clock in microseconds, inflight the
 * exchanges in flight to the server when it ended (itself included),
 * ok 0 for a failure (connect error, timeout, 502-504).  Returns the
 * limit, as tg_adapt_limit_get().
 */
unsigned tg_adapt_limit_sample(tg_adapt_limit *l, uint64_t now_us, uint64_t rtt_us,
                               unsigned inflight, int ok);

/* The class key of an exchange (never 0): FNV-1a of the method and the
 * path up to its query, each segment that is an id (all digits; 16+ of
 * hex and dashes; 20+ of a token alphabet with a digit) hashed as one
 * placeholder, so /items/123 and /items/456 are one class: a REST API's
 * ids would otherwise take every slot and leave its endpoints in none. */
uint32_t tg_adapt_class_key(const char *method, size_t method_len, const char *path,
                            size_t path_len);

/* The same for an exchange of class key (any value; 0: the catch-all
 * class).  A new key while every slot holds a class seen in the last
 * 15-30 s is in no class: its sample counts towards the window's length
 * and its failure counts towards the window's, but it moves no
 * gradient. */
unsigned tg_adapt_limit_sample_class(tg_adapt_limit *l, uint32_t key, uint64_t now_us,
                                     uint64_t rtt_us, unsigned inflight, int ok);

/* The current limit: exchanges that may be in flight, in [min, max]. */
unsigned tg_adapt_limit_get(const tg_adapt_limit *l);

/* The no-load RTT of all samples, whatever their class, microseconds (0
 * before the first sample): a window lasts at least that long. */
uint64_t tg_adapt_limit_noload_us(const tg_adapt_limit *l);

/* ---- the queue ---------------------------------------------------------- */

/* A waiting request: embedded in the caller's object, which owns it. */
typedef struct tg_adapt_entry {
    TAILQ_ENTRY(tg_adapt_entry) link;
    unsigned prio;           /* 0 = shed first; higher is served first */
    uint64_t deadline;       /* any clock unit the caller uses */
    int      queued;         /* in a queue now */
} tg_adapt_entry;

TAILQ_HEAD(tg_adapt_list, tg_adapt_entry);

/* A bounded queue: by priority (highest first), then arrival (FIFO). */
typedef struct tg_adapt_queue {
    struct tg_adapt_list *cls;   /* nprio lists, indexed by priority */
    unsigned nprio;
    unsigned len;
    unsigned cap;                /* 0: nobody waits */
} tg_adapt_queue;

/* nprio >= 1 priorities (0 .. nprio-1), at most cap waiting. */
void tg_adapt_queue_init(tg_adapt_queue *q, unsigned nprio, unsigned cap);
/* Forget every entry (they stay the callers'); free the lists. */
void tg_adapt_queue_deinit(tg_adapt_queue *q);

/*
 * Queue e with priority prio (clamped to nprio-1) and deadline.
 * Returns NULL: queued.  Returns e itself: refused, the queue is full of
 * waiters of the same or a higher priority.  Returns another entry:
 * e is queued and that one, the newest of the lowest priority present
 * (lower than prio), was evicted to make room; it is out of the queue.
 */
tg_adapt_entry *tg_adapt_queue_push(tg_adapt_queue *q, tg_adapt_entry *e,
                                    unsigned prio, uint64_t deadline);

/* Take the next to serve (highest priority, oldest), or NULL if empty. */
tg_adapt_entry *tg_adapt_queue_pop(tg_adapt_queue *q);

/* Take e out (it gave up); no-op if it is not queued. */
void tg_adapt_queue_remove(tg_adapt_queue *q, tg_adapt_entry *e);

/* Take one entry whose deadline is <= now, or NULL if none. */
tg_adapt_entry *tg_adapt_queue_expired(tg_adapt_queue *q, uint64_t now);

/* The earliest deadline of a queued entry, 0 when empty. */
uint64_t tg_adapt_queue_next_deadline(const tg_adapt_queue *q);

static inline unsigned
tg_adapt_queue_len(const tg_adapt_queue *q)
{
    return q->len;
}

#endif
