/*
 * breaker.c - the circuit breaker state machine (see breaker.h).
 *
 * The only stored transitions are CLOSED->OPEN, OPEN->HALF_OPEN (performed
 * by tg_breaker_allow once the open duration has elapsed), HALF_OPEN->OPEN
 * and HALF_OPEN->CLOSED; every one goes through set_state() so the hook
 * sees each exactly once, after the breaker is consistent again.
 */
#include "tollgate/breaker.h"

#include <string.h>

#include "tollgate/common.h"

static void set_state(tg_breaker *b, enum tg_breaker_state to);
static void trip(tg_breaker *b, uint64_t now_ms, uint64_t duration_ms);
static void reset_counters(tg_breaker *b);
static int open_expired(const tg_breaker *b, uint64_t now_ms);
static void window_add(tg_breaker *b, uint64_t now_ms, int failed);
static void window_sum(const tg_breaker *b, uint64_t now_ms,
                       uint64_t *total, uint64_t *errors);

/* ---- public ----------------------------------------------------------- */

void
tg_breaker_init(tg_breaker *b, const tg_breaker_conf *c)
{
    memset(b, 0, sizeof(*b));
    b->conf = *c;
    if (b->conf.failures == 0)
        b->conf.failures = 1;
    if (b->conf.probes == 0)
        b->conf.probes = 1;
    if (b->conf.window_ms > TG_BREAKER_BUCKETS * 1000u)
        b->conf.window_ms = TG_BREAKER_BUCKETS * 1000u;
    if (b->conf.max_open_ms < b->conf.open_ms)
        b->conf.max_open_ms = b->conf.open_ms;
    b->state = TG_BREAKER_CLOSED;
    b->open_ms = b->conf.open_ms;
}

void
tg_breaker_set_hook(tg_breaker *b, tg_breaker_hook hook, void *arg)
{
    b->hook = hook;
    b->hook_arg = arg;
}

int
tg_breaker_allow(tg_breaker *b, uint64_t now_ms)
{
    switch (b->state) {
    case TG_BREAKER_CLOSED:
        return 1;
    case TG_BREAKER_OPEN:
        if (!open_expired(b, now_ms))
            return 0;
        b->probe_ok = 0;
        b->probe_inflight = 1;    /* this call is the probe */
        set_state(b, TG_BREAKER_HALF_OPEN);
        return 1;
    case TG_BREAKER_HALF_OPEN:
        if (b->probe_inflight)
            return 0;
        b->probe_inflight = 1;
        return 1;
    case TG_BREAKER_NONE:
        break;
    }
    return 0;
}

void
tg_breaker_success(tg_breaker *b, uint64_t now_ms)
{
    switch (b->state) {
    case TG_BREAKER_CLOSED:
        b->consecutive = 0;
        window_add(b, now_ms, 0);
        return;
    case TG_BREAKER_OPEN:
        return;                   /* late result: ignored */
    case TG_BREAKER_HALF_OPEN:
        if (!b->probe_inflight)
            return;               /* late result: ignored */
        b->probe_inflight = 0;
        if (++b->probe_ok < b->conf.probes)
            return;
        reset_counters(b);
        b->open_ms = b->conf.open_ms;
        set_state(b, TG_BREAKER_CLOSED);
        return;
    case TG_BREAKER_NONE:
        return;
    }
}

void
tg_breaker_failure(tg_breaker *b, uint64_t now_ms)
{
    uint64_t total, errors, next;

    switch (b->state) {
    case TG_BREAKER_CLOSED:
        if (b->consecutive < b->conf.failures)
            b->consecutive++;
        window_add(b, now_ms, 1);
        if (b->consecutive >= b->conf.failures) {
            trip(b, now_ms, b->conf.open_ms);
            return;
        }
        if (b->conf.window_ms == 0)
            return;
        window_sum(b, now_ms, &total, &errors);
        if (total >= b->conf.min_requests
            && errors * 100 >= (uint64_t)b->conf.error_pct * total)
            trip(b, now_ms, b->conf.open_ms);
        return;
    case TG_BREAKER_OPEN:
        return;                   /* late result: ignored */
    case TG_BREAKER_HALF_OPEN:
        if (!b->probe_inflight)
            return;               /* late result: ignored */
        next = b->open_ms * 2;
        if (next < b->conf.open_ms)   /* open_ms == 0 stays 0 */
            next = b->conf.open_ms;
        if (next > b->conf.max_open_ms)
            next = b->conf.max_open_ms;
        trip(b, now_ms, next);
        return;
    case TG_BREAKER_NONE:
        return;
    }
}

void
tg_breaker_abandon(tg_breaker *b, uint64_t now_ms)
{
    if (b->state == TG_BREAKER_HALF_OPEN)
        b->probe_inflight = 0;
}

enum tg_breaker_state
tg_breaker_state(const tg_breaker *b, uint64_t now_ms)
{
    if (b->state == TG_BREAKER_OPEN && open_expired(b, now_ms))
        return TG_BREAKER_HALF_OPEN;
    return b->state;
}

uint64_t
tg_breaker_retry_ms(const tg_breaker *b, uint64_t now_ms)
{
    uint64_t elapsed;

    if (b->state != TG_BREAKER_OPEN)
        return 0;
    elapsed = now_ms > b->opened_at ? now_ms - b->opened_at : 0;
    return elapsed >= b->open_ms ? 0 : b->open_ms - elapsed;
}

const char *
tg_breaker_state_name(enum tg_breaker_state s)
{
    switch (s) {
    case TG_BREAKER_CLOSED:    return "closed";
    case TG_BREAKER_OPEN:      return "open";
    case TG_BREAKER_HALF_OPEN: return "half-open";
    case TG_BREAKER_NONE:      return "none";
    }
    return "?";
}

/* ---- helpers ---------------------------------------------------------- */

/* Change state and tell the hook (a no-op if nothing changes). */
static void
set_state(tg_breaker *b, enum tg_breaker_state to)
{
    enum tg_breaker_state from = b->state;

    if (from == to)
        return;
    TG_ASSERT((from == TG_BREAKER_CLOSED && to == TG_BREAKER_OPEN)
              || (from == TG_BREAKER_OPEN && to == TG_BREAKER_HALF_OPEN)
              || from == TG_BREAKER_HALF_OPEN);
    b->state = to;
    if (b->hook != NULL)
        b->hook(b->hook_arg, from, to);
}

/* Open at now_ms for duration_ms. */
static void
trip(tg_breaker *b, uint64_t now_ms, uint64_t duration_ms)
{
    b->opened_at = now_ms;
    b->open_ms = duration_ms;
    b->probe_inflight = 0;
    b->probe_ok = 0;
    set_state(b, TG_BREAKER_OPEN);
}

/* Forget the outcomes of the closed period (on closing). */
static void
reset_counters(tg_breaker *b)
{
    b->consecutive = 0;
    b->probe_ok = 0;
    b->probe_inflight = 0;
    memset(b->ring, 0, sizeof(b->ring));
}

/* Has the current open period ended?  A clock that went backwards counts
 * as no time elapsed. */
static int
open_expired(const tg_breaker *b, uint64_t now_ms)
{
    return now_ms >= b->opened_at && now_ms - b->opened_at >= b->open_ms;
}

static void
window_add(tg_breaker *b, uint64_t now_ms, int failed)
{
    uint64_t sec = now_ms / 1000;
    tg_breaker_bucket *k = &b->ring[sec % TG_BREAKER_BUCKETS];

    if (b->conf.window_ms == 0)
        return;
    if (k->sec != sec) {          /* stale: last used >= 60 s ago (or never) */
        k->sec = sec;
        k->ok = 0;
        k->err = 0;
    }
    if (failed) {
        if (k->err < UINT32_MAX)
            k->err++;
    } else {
        if (k->ok < UINT32_MAX)
            k->ok++;
    }
}

/* Sum the buckets of the window ending at now_ms: the current second and
 * the ceil(window_ms/1000) - 1 before it.  Buckets of other seconds are
 * stale and skipped (cleared lazily by window_add). */
static void
window_sum(const tg_breaker *b, uint64_t now_ms, uint64_t *total,
           uint64_t *errors)
{
    uint64_t now_sec = now_ms / 1000;
    uint64_t nsec = (b->conf.window_ms + 999) / 1000;
    uint64_t ok = 0, err = 0;
    size_t i;

    for (i = 0; i < TG_BREAKER_BUCKETS; i++) {
        const tg_breaker_bucket *k = &b->ring[i];

        if (k->sec <= now_sec && now_sec - k->sec < nsec) {
            ok += k->ok;
            err += k->err;
        }
    }
    *total = ok + err;
    *errors = err;
}
