/*
 * breaker.h - a circuit breaker: pure logic with an injected clock (no
 * sockets, no libevent).  One guards the Redis store; one guards each
 * upstream server.
 *
 *   CLOSED     calls go ahead.  A failure bumps the consecutive-failure
 *              count (a success resets it) and is added to a sliding window
 *              of per-second buckets.  After a failure the breaker opens if
 *                consecutive >= failures, or
 *                window_ms && total >= min_requests &&
 *                errors*100 >= error_pct*total          (over the window).
 *              The rules are evaluated on failures only: a success never
 *              opens the breaker.
 *   OPEN       calls are refused for the current open duration (open_ms at
 *              first).  Then the breaker is HALF_OPEN; tg_breaker_state()
 *              reports that lazily, tg_breaker_allow() performs it.
 *   HALF_OPEN  exactly one call (the probe) is let through at a time.  Its
 *              success counts toward `probes`; when enough have succeeded
 *              the breaker closes (counters and window cleared, open
 *              duration back to open_ms).  Its failure reopens the breaker
 *              with the open duration doubled, capped at max_open_ms.  A
 *              probe that ends with neither outcome must be released with
 *              tg_breaker_abandon().
 *
 * Late results (outcomes of calls allowed before the breaker opened) must
 * not corrupt state: while OPEN every outcome is ignored, and while
 * HALF_OPEN outcomes count only when a probe is in flight.  Outcomes carry
 * no identity, so a late outcome arriving while a probe is in flight is
 * taken for the probe's (and the probe's own outcome is then ignored):
 * harmless in practice, since both describe the same server at nearly the
 * same time.
 *
 * The window has one-second resolution: window_ms is rounded up to whole
 * seconds (at most TG_BREAKER_BUCKETS) and covers the current second plus
 * the previous ones, so an outcome leaves the window between
 * window_ms - 1000 and window_ms after it was recorded.
 *
 * Not thread-safe: a breaker belongs to one thread (or one lock).  The
 * layout is public so a breaker can be embedded; it allocates nothing and
 * needs no deinit.  Do not touch the fields: use the functions.
 */
#ifndef TOLLGATE_BREAKER_H
#define TOLLGATE_BREAKER_H

#include <stdint.h>

#define TG_BREAKER_BUCKETS 60     /* one per second: window_ms <= 60000 */

typedef struct tg_breaker_conf {
    unsigned failures;        /* consecutive failures that open it (0 is taken as 1) */
    unsigned window_ms;       /* error-ratio window (0 = ratio rule off; capped at 60000) */
    unsigned min_requests;    /* ratio rule needs at least this many in the window */
    unsigned error_pct;       /* open when errors*100 >= error_pct*total in the window */
    unsigned open_ms;         /* first open duration before half-open */
    unsigned max_open_ms;     /* cap for the doubling (raised to open_ms if below) */
    unsigned probes;          /* half-open successes needed to close (0 is taken as 1) */
} tg_breaker_conf;

enum tg_breaker_state {
    TG_BREAKER_NONE      = -1,    /* never stored: "no breaker here" (no Redis) */
    TG_BREAKER_CLOSED    = 0,
    TG_BREAKER_OPEN      = 1,
    TG_BREAKER_HALF_OPEN = 2,
};

/* Called on every state change, after the change (the breaker may be
 * queried from the hook; it must not be re-initialised there). */
typedef void (*tg_breaker_hook)(void *arg, enum tg_breaker_state from,
                                enum tg_breaker_state to);

typedef struct tg_breaker_bucket {
    uint64_t sec;                 /* now_ms / 1000 the counts belong to */
    uint32_t ok;                  /* successes in that second */
    uint32_t err;                 /* failures in that second */
} tg_breaker_bucket;

typedef struct tg_breaker {
    tg_breaker_conf conf;         /* normalised copy (see tg_breaker_init) */
    enum tg_breaker_state state;  /* stored state; OPEN may have expired */
    unsigned consecutive;         /* CLOSED: failures since the last success */
    unsigned probe_ok;            /* HALF_OPEN: probes succeeded so far */
    int      probe_inflight;      /* HALF_OPEN: the probe slot is taken */
    uint64_t opened_at;           /* now_ms when it last opened */
    uint64_t open_ms;             /* current open duration */
    tg_breaker_hook hook;         /* may be NULL */
    void    *hook_arg;
    tg_breaker_bucket ring[TG_BREAKER_BUCKETS]; /* indexed by sec % BUCKETS */
} tg_breaker;

/* Start CLOSED with empty counters and no hook.  c is copied (the caller
 * keeps it); out-of-range values are normalised as noted on the fields. */
void tg_breaker_init(tg_breaker *b, const tg_breaker_conf *c);

/* Install (or, with NULL, remove) the transition hook. */
void tg_breaker_set_hook(tg_breaker *b, tg_breaker_hook hook, void *arg);

/*
 * May a call go ahead at now_ms?  CLOSED: 1.  OPEN: 0 until the open
 * duration has elapsed; then the breaker turns HALF_OPEN and lets exactly
 * one probe through (1 once, 0 while that probe is in flight).  Every call
 * that got 1 must later be reported with exactly one of success, failure
 * or abandon.
 */
int tg_breaker_allow(tg_breaker *b, uint64_t now_ms);

/* Outcome of an allowed call. */
void tg_breaker_success(tg_breaker *b, uint64_t now_ms);
void tg_breaker_failure(tg_breaker *b, uint64_t now_ms);

/* An allowed call that produced neither outcome (e.g. cancelled because
 * the client went away): frees a half-open probe slot; otherwise a no-op. */
void tg_breaker_abandon(tg_breaker *b, uint64_t now_ms);

/* The state at now_ms; an expired OPEN is reported as HALF_OPEN. */
enum tg_breaker_state tg_breaker_state(const tg_breaker *b, uint64_t now_ms);

/* Milliseconds until an open breaker lets a probe through; 0 if it is not
 * open (closed, half-open, or open but expired).  For Retry-After: note a
 * half-open breaker with its probe in flight refuses calls yet returns 0,
 * so round the header up to at least one second. */
uint64_t tg_breaker_retry_ms(const tg_breaker *b, uint64_t now_ms);

/* Name of a state for logs ("closed", "open", "half-open"). */
const char *tg_breaker_state_name(enum tg_breaker_state s);

#endif
