/*
 * adaptive.c - the learned in-flight limit and the tier-ordered queue
 * (see adaptive.h for the rule).  Pure: the callers own the clock, the
 * entries and the events.
 */
#include "tollgate/adaptive.h"

#include <stdlib.h>
#include <string.h>

static void window_close(tg_adapt_limit *l);
static double window_gradient(tg_adapt_limit *l);
static tg_adapt_class *class_of(tg_adapt_limit *l, uint32_t key);
static uint64_t noload_of(const uint64_t *lo_cur, uint64_t min_prev);
static void half_roll(uint64_t *lo_cur, uint64_t *min_prev);
static void lo_insert(uint64_t *lo, uint64_t v);
static uint64_t lo_rank(const uint64_t *lo);
static double root(double x);

/* ---- the limit ---------------------------------------------------------- */

void
tg_adapt_limit_init(tg_adapt_limit *l, unsigned initial, unsigned min,
                    unsigned max)
{
    l->min = min < 1 ? 1 : min;
    l->max = max < l->min ? l->min : max;
    l->initial = initial < l->min ? l->min : initial > l->max ? l->max : initial;
    l->limit = l->initial;
    memset(l->lo_cur_us, 0, sizeof(l->lo_cur_us));
    l->min_prev_us = 0;
    l->half_start_us = 0;
    l->win_start_us = 0;
    l->win_n = 0;
    l->win_cn = 0;
    l->win_inflight = 0;
    l->win_failed = 0;
    memset(l->cls, 0, sizeof(l->cls));
}

unsigned
tg_adapt_limit_get(const tg_adapt_limit *l)
{
    unsigned v = (unsigned)l->limit;

    return v < l->min ? l->min : v > l->max ? l->max : v;
}

uint64_t
tg_adapt_limit_noload_us(const tg_adapt_limit *l)
{
    return noload_of(l->lo_cur_us, l->min_prev_us);
}

/* A no-load RTT (of all samples, or of a class): the lower of the two
 * halves' (0 = none). */
static uint64_t
noload_of(const uint64_t *lo_cur, uint64_t min_prev)
{
    uint64_t cur = lo_rank(lo_cur);

    return min_prev != 0 && (cur == 0 || min_prev < cur) ? min_prev : cur;
}

/* A half ends: its no-load RTT becomes the previous one. */
static void
half_roll(uint64_t *lo_cur, uint64_t *min_prev)
{
    *min_prev = lo_rank(lo_cur);
    memset(lo_cur, 0, TG_ADAPT_NOLOAD_RANK * sizeof(*lo_cur));
}

/* Why not the smallest sample: nothing bounds an RTT from below.  An
 * upstream may answer one request early (tg-testup did, its timers on a
 * lagging clock; an app does on a fast path such as an early 4xx), and a
 * no-load RTT set by that one sample held the limit at its minimum for
 * the 15-30 s it took to age out.  The third smallest needs three such
 * answers in 15 s; against the smallest it costs a baseline higher by
 * the jitter of three samples, far inside the tolerance. */

/* v into lo, the TG_ADAPT_NOLOAD_RANK smallest samples, ascending, the
 * empty (0) ones last. */
static void
lo_insert(uint64_t *lo, uint64_t v)
{
    unsigned i = TG_ADAPT_NOLOAD_RANK - 1;

    if (lo[i] != 0 && v >= lo[i]) {
        return;
    }
    for (; i > 0 && (lo[i - 1] == 0 || lo[i - 1] > v); i--) {
        lo[i] = lo[i - 1];
    }
    lo[i] = v;
}

/* A half's no-load RTT: its TG_ADAPT_NOLOAD_RANK-th smallest sample, or
 * the largest it has when fewer (0 when none). */
static uint64_t
lo_rank(const uint64_t *lo)
{
    unsigned i = TG_ADAPT_NOLOAD_RANK;

    while (i > 0 && lo[i - 1] == 0) {
        i--;
    }
    return i == 0 ? 0 : lo[i - 1];
}

/* Why classes: an API has endpoints at 1-5 ms (health, cached reads, an
 * early 401/404/422) next to ones at 50-500 ms.  With one no-load RTT the
 * fastest set it, every window's mean was many times larger, and the
 * gradient read a steady mix as queueing: the limit went to its minimum
 * and healthy traffic was shed.  Each class keeps the rule of the whole
 * (a minimum, so no upward drift under sustained overload), and a window
 * compares its time with the time its samples take unloaded.  Why slots
 * freed only after 15-30 s without a sample: a stream of keys seen once
 * (ids in the path) must not push out the classes that carry the signal.
 * Why a key beyond them is in no class (NULL: its samples count towards
 * the window's length and failures, not its gradient) rather than in a
 * shared catch-all: there the fast and the slow meet again, so a client
 * that takes the slots with a few fast paths (early 404s) and sends a
 * few more would make every slow endpoint left out read as queueing,
 * and the limit would shed the API's traffic for it. */
static tg_adapt_class *
class_of(tg_adapt_limit *l, uint32_t key)
{
    tg_adapt_class *c, *free_slot = NULL;
    unsigned i;

    if (key == 0) {
        return &l->cls[0];
    }
    for (i = 1; i < TG_ADAPT_CLASSES; i++) {
        c = &l->cls[i];
        if (c->key == key) {
            return c;
        }
        if (free_slot == NULL && c->win_n == 0 && c->min_prev_us == 0
            && c->lo_cur_us[0] == 0) {
            free_slot = c;
        }
    }
    if (free_slot != NULL) {
        free_slot->key = key;
    }
    return free_slot;
}

/* An id in a path segment: all digits, or 16+ characters of hex and
 * dashes (a hash, a UUID), or 20+ of a token alphabet with a digit in it
 * (base64url or similar ids).  Names of endpoints ("v1", "orders",
 * "2fa") stay themselves. */
static int
id_segment(const char *s, size_t n)
{
    size_t i, digits = 0, hex = 0, token = 0;

    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int d = c >= '0' && c <= '9';
        int h = d || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') || c == '-';
        int t = h || ((c | 0x20) >= 'g' && (c | 0x20) <= 'z') || c == '_';

        digits += (size_t)d;
        hex += (size_t)h;
        token += (size_t)t;
    }
    return n > 0 && (digits == n || (n >= 16 && hex == n)
                     || (n >= 20 && token == n && digits > 0));
}

uint32_t
tg_adapt_class_key(const char *method, size_t method_len, const char *path,
                   size_t path_len)
{
    uint32_t h = 2166136261u;
    size_t i, seg;

    for (i = 0; method != NULL && i < method_len; i++) {
        h = (h ^ (unsigned char)method[i]) * 16777619u;
    }
    h = (h ^ ' ') * 16777619u;
    for (i = 0; path != NULL && i < path_len && path[i] != '?'; i = seg) {
        for (seg = i + 1; seg < path_len && path[seg] != '/' && path[seg] != '?'; seg++) {
        }
        if (path[i] == '/' && id_segment(path + i + 1, seg - i - 1)) {
            h = (h ^ '/') * 16777619u;
            h = (h ^ 0xff) * 16777619u;     /* not a byte of any path */
            continue;
        }
        for (size_t k = i; k < seg; k++) {
            h = (h ^ (unsigned char)path[k]) * 16777619u;
        }
    }
    return h != 0 ? h : 1;
}

unsigned
tg_adapt_limit_sample(tg_adapt_limit *l, uint64_t now_us, uint64_t rtt_us,
                      unsigned inflight, int ok)
{
    return tg_adapt_limit_sample_class(l, 0, now_us, rtt_us, inflight, ok);
}

unsigned
tg_adapt_limit_sample_class(tg_adapt_limit *l, uint32_t key, uint64_t now_us,
                            uint64_t rtt_us, unsigned inflight, int ok)
{
    tg_adapt_class *c;
    uint64_t noload;
    unsigned i;

    if (rtt_us == 0) {
        rtt_us = 1;
    }
    /* The no-load RTT: the minimum of two sliding halves, so that an
     * upstream that became slower for good is believed within 30 s. */
    if (l->half_start_us == 0) {
        l->half_start_us = now_us;
    } else if (now_us - l->half_start_us >= TG_ADAPT_MIN_HALF_US) {
        half_roll(l->lo_cur_us, &l->min_prev_us);
        for (i = 0; i < TG_ADAPT_CLASSES; i++) {
            half_roll(l->cls[i].lo_cur_us, &l->cls[i].min_prev_us);
        }
        l->half_start_us = now_us;
    }
    c = class_of(l, key);
    if (ok) {
        lo_insert(l->lo_cur_us, rtt_us);
        if (c != NULL) {
            lo_insert(c->lo_cur_us, rtt_us);
        }
    }
    if (l->win_n == 0) {
        l->win_start_us = now_us;
    }
    l->win_n++;
    if (c != NULL) {
        c->win_n++;
        c->win_sum_us += rtt_us;
        l->win_cn++;
    }
    if (inflight > l->win_inflight) {
        l->win_inflight = inflight;
    }
    if (!ok) {
        l->win_failed++;
    }
    noload = tg_adapt_limit_noload_us(l);
    if ((l->win_n >= TG_ADAPT_WIN_SAMPLES && now_us - l->win_start_us >= noload)
        || now_us - l->win_start_us >= TG_ADAPT_WIN_MAX_US) {
        window_close(l);
    }
    return tg_adapt_limit_get(l);
}

/* Why a class's excess (its time over what its samples may take) counts
 * at most the window's mean allowance per sample, times its samples: the
 * window is a ratio of sums, and without a bound one sample's size
 * outweighed everything else in it.  One client whose query makes its
 * own endpoint slow (a search for everything: 400 ms, after three cheap
 * ones set the class's no-load RTT) read as a queue in every window it
 * fell in, and at 1 request in 25 it held the limit at its minimum while
 * the upstream was idle: one client could have everyone else shed.  A
 * queue upstream slows every class: each one's excess is still counted,
 * up to a sample's worth each, and the window still reads as queueing
 * (the gradient is clamped at 0.5 anyway); one class's answers now move
 * it by their count, not their size. */
static double
window_gradient(tg_adapt_limit *l)
{
    double allow = 0, sum = 0, per, a, cap;
    unsigned i;

    for (i = 0; i < TG_ADAPT_CLASSES; i++) {
        l->cls[i].win_allow = (double)l->cls[i].win_n
            * (TG_ADAPT_TOLERANCE
               * (double)noload_of(l->cls[i].lo_cur_us, l->cls[i].min_prev_us)
               + TG_ADAPT_SLACK_US);
        allow += l->cls[i].win_allow;
    }
    per = l->win_cn != 0 ? allow / l->win_cn : 0;
    for (i = 0; i < TG_ADAPT_CLASSES; i++) {
        a = l->cls[i].win_allow;
        cap = a + (double)l->cls[i].win_n * per;
        sum += (double)l->cls[i].win_sum_us < cap ? (double)l->cls[i].win_sum_us : cap;
    }
    return allow > 0 && sum > 0 ? allow / sum : 1;
}

/* One window's verdict (the rule in adaptive.h). */
static void
window_close(tg_adapt_limit *l)
{
    double target = l->limit, g;
    unsigned i;
    int idle = 0;

    /* Why half of the window's samples, not any one: a failure is the
     * upstream's answer to one request (an app's 503 for one feature, a
     * gateway's 504 for one slow backend).  One client asking for such a
     * thing 27 times a second put a failure in most windows, and the
     * limit sat at its minimum with the upstream idle, everyone's
     * requests queued behind it.  A server that fails (down, refusing,
     * timing out everything) fails every sample; fewer failures move the
     * limit through their time, as any sample. */
    if (l->win_failed * 2 >= l->win_n) {
        target = l->limit / 2;
    } else if (l->win_cn != 0) {
        g = window_gradient(l);
        g = g < 0.5 ? 0.5 : g;
        if (g < 1.0) {
            target = l->limit * g;
        } else if (l->win_inflight * 2 >= l->limit) {
            target = l->limit + root(l->limit);
        } else if (l->limit < l->initial) {
            target = l->limit + root(l->limit);
            idle = 1;
        }
    }
    /* Down faster than up: a queue building upstream costs every
     * request in it, a slot left unused costs only throughput. */
    l->limit += (target < l->limit ? TG_ADAPT_SMOOTHING_DOWN : TG_ADAPT_SMOOTHING)
                * (target - l->limit);
    if (idle && l->limit > l->initial) {
        l->limit = l->initial;           /* idle growth stops at initial */
    }
    if (l->limit < l->min) {
        l->limit = l->min;
    } else if (l->limit > l->max) {
        l->limit = l->max;
    }
    for (i = 0; i < TG_ADAPT_CLASSES; i++) {
        l->cls[i].win_n = 0;
        l->cls[i].win_sum_us = 0;
    }
    l->win_n = 0;
    l->win_cn = 0;
    l->win_inflight = 0;
    l->win_failed = 0;
}

/* ---- the queue ---------------------------------------------------------- */

void
tg_adapt_queue_init(tg_adapt_queue *q, unsigned nprio, unsigned cap)
{
    unsigned i;

    q->nprio = nprio < 1 ? 1 : nprio;
    q->cls = tg_xcalloc(q->nprio, sizeof(*q->cls));
    for (i = 0; i < q->nprio; i++) {
        TAILQ_INIT(&q->cls[i]);
    }
    q->len = 0;
    q->cap = cap;
}

void
tg_adapt_queue_deinit(tg_adapt_queue *q)
{
    tg_adapt_entry *e;
    unsigned i;

    for (i = 0; q->cls != NULL && i < q->nprio; i++) {
        while ((e = TAILQ_FIRST(&q->cls[i])) != NULL) {
            TAILQ_REMOVE(&q->cls[i], e, link);
            e->queued = 0;
        }
    }
    free(q->cls);
    q->cls = NULL;
    q->len = 0;
}

tg_adapt_entry *
tg_adapt_queue_push(tg_adapt_queue *q, tg_adapt_entry *e, unsigned prio,
                    uint64_t deadline)
{
    tg_adapt_entry *victim = NULL;
    unsigned i;

    e->prio = prio >= q->nprio ? q->nprio - 1 : prio;
    e->deadline = deadline;
    e->queued = 0;
    if (q->len >= q->cap) {
        /* Full: the lowest tier present goes, if it is below e's. */
        for (i = 0; i < e->prio; i++) {
            victim = TAILQ_LAST(&q->cls[i], tg_adapt_list);
            if (victim != NULL) {
                break;
            }
        }
        if (victim == NULL) {
            return e;
        }
        tg_adapt_queue_remove(q, victim);
    }
    TAILQ_INSERT_TAIL(&q->cls[e->prio], e, link);
    e->queued = 1;
    q->len++;
    TG_ASSERT(q->len <= q->cap);
    return victim;
}

tg_adapt_entry *
tg_adapt_queue_pop(tg_adapt_queue *q)
{
    tg_adapt_entry *e;
    unsigned i;

    for (i = q->nprio; i-- > 0;) {
        e = TAILQ_FIRST(&q->cls[i]);
        if (e != NULL) {
            tg_adapt_queue_remove(q, e);
            return e;
        }
    }
    return NULL;
}

void
tg_adapt_queue_remove(tg_adapt_queue *q, tg_adapt_entry *e)
{
    if (!e->queued) {
        return;
    }
    TG_ASSERT(q->len > 0 && e->prio < q->nprio);
    TAILQ_REMOVE(&q->cls[e->prio], e, link);
    e->queued = 0;
    q->len--;
}

/* Within a priority the oldest is first and every entry of a queue is
 * given the same wait: the heads hold the earliest deadlines. */
tg_adapt_entry *
tg_adapt_queue_expired(tg_adapt_queue *q, uint64_t now)
{
    tg_adapt_entry *e;
    unsigned i;

    for (i = 0; i < q->nprio; i++) {
        e = TAILQ_FIRST(&q->cls[i]);
        if (e != NULL && e->deadline <= now) {
            tg_adapt_queue_remove(q, e);
            return e;
        }
    }
    return NULL;
}

uint64_t
tg_adapt_queue_next_deadline(const tg_adapt_queue *q)
{
    const tg_adapt_entry *e;
    uint64_t best = 0;
    unsigned i;

    for (i = 0; i < q->nprio; i++) {
        e = TAILQ_FIRST(&q->cls[i]);
        if (e != NULL && (best == 0 || e->deadline < best)) {
            best = e->deadline;
        }
    }
    return best;
}

/* Square root of x >= 1 by Newton's method (no libm for one call). */
static double
root(double x)
{
    double r = x;
    int i;

    for (i = 0; i < 32 && r * r - x > 1e-6 * x; i++) {
        r = (r + x / r) / 2;
    }
    return r;
}
