/*
 * throttle.c - dynamic throttling: the load factor of the process (see
 * throttle.h for the rule, docs/DESIGN-NOTES.md "Dynamic throttling" for
 * the design and its bounds).
 *
 * Threads: tg_throttle_record runs on every worker for every upstream
 * exchange and only adds to the caller's slot (relaxed atomics, no lock);
 * tg_throttle_factor is one relaxed load per charge.  The window is closed
 * by the worker whose tick wins the compare-and-swap on close_ms; what the
 * closer keeps (seen counters, the local factor, the report in flight) is
 * under thr.lock, which only the closer, the Redis answer to its report
 * (on that worker's loop) and /status take - never a request.
 */
#include "tollgate/throttle.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <event2/buffer.h>

#include "tollgate/metrics.h"
#include "tollgate/redis.h"

#define THR_LOG_MS   1000     /* a factor change is logged at most this often */

/* One thread's exchanges since start: only ever added to, so the closer
 * reads them without stopping anybody (a window is the difference). */
typedef struct thr_slot {
    uint64_t n;
    uint64_t slow;
    uint64_t errors;
    uint64_t hist[TG_THROTTLE_BUCKETS];
} thr_slot;

static struct {
    thr_slot          *slots;        /* nslots; NULL before init */
    unsigned           nslots;
    unsigned           next_slot;    /* atomic: slots claimed so far */
    int                enabled;      /* atomic: adaptive.throttle configured */
    uint64_t           target_us;    /* atomic: target_p99_ms */
    unsigned           applied;      /* atomic: the factor in force, permille */
    uint64_t           close_ms;     /* atomic: the window ends (0: none yet) */
    pthread_mutex_t    lock;         /* the closer's state, below */
    unsigned           local;        /* this instance's own factor */
    unsigned           reporters;    /* live reports in the last answer (0: none) */
    int                reporting;    /* a report waits for its answer */
    uint64_t           reporting_ms; /* ... sent then */
    uint64_t           window_ms;    /* of the last close */
    uint64_t           seen_n, seen_slow, seen_errors;
    uint64_t           seen_hist[TG_THROTTLE_BUCKETS];
    tg_throttle_window last;         /* the last window closed */
    uint64_t           last_p99_us;
    unsigned           logged;       /* the factor last logged */
    uint64_t           logged_ms;
    uint64_t           warned_ms;    /* last odd reply logged */
    int                failing;      /* reports fail (logged once) */
    char               id[TG_THROTTLE_ID_MAX];
} thr = { .applied = TG_THROTTLE_ONE, .lock = PTHREAD_MUTEX_INITIALIZER };

/* The slot of this thread, + 1 (0: not claimed yet). */
static __thread unsigned thr_my_slot;

static void close_window(const tg_conf *conf, struct tg_redis *redis, const char *prefix,
                         uint64_t now_ms);
static void report_done(void *arg, tg_rc rc, const char *value, size_t len);
static void apply(unsigned factor, uint64_t now_ms);

/*
 * The report (KEYS[1] the hash; ARGV: id, factor, life in ms).  Redis's
 * clock decides expiry, so instances need no common clock.  A field that
 * is not "factor expiry" with a factor in 1..1000 is dropped like an
 * expired one: one bad field never holds everybody down.
 */
const char tg_throttle_lua[] =
    "local tm = redis.call('TIME')\n"
    "local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)\n"
    "redis.call('HSET', KEYS[1], ARGV[1],\n"
    "           string.format('%d %d', tonumber(ARGV[2]), now + tonumber(ARGV[3])))\n"
    "local all = redis.call('HGETALL', KEYS[1])\n"
    "local min, n, keep = 1000, 0, now\n"
    "for i = 1, #all, 2 do\n"
    "  local f, e = string.match(all[i + 1], '^(%d+) (%d+)$')\n"
    "  f, e = tonumber(f), tonumber(e)\n"
    "  if f == nil or e == nil or f < 1 or f > 1000 or e <= now then\n"
    "    redis.call('HDEL', KEYS[1], all[i])\n"
    "  else\n"
    "    n = n + 1\n"
    "    if f < min then min = f end\n"
    "    if e > keep then keep = e end\n"
    "  end\n"
    "end\n"
    "redis.call('PEXPIREAT', KEYS[1], string.format('%d', keep))\n"
    "return string.format('%d %d', min, n)\n";

/* ---- pure parts ------------------------------------------------------- */

unsigned
tg_throttle_min_permille(double min_factor)
{
    double v = min_factor * TG_THROTTLE_ONE + 0.5;

    if (v < 1) {
        return 1;
    }
    return v > TG_THROTTLE_ONE ? TG_THROTTLE_ONE : (unsigned)v;
}

unsigned
tg_throttle_step(unsigned factor, const tg_throttle_window *w, const tg_throttle_params *p)
{
    unsigned min = p->min_factor < 1 ? 1 : p->min_factor;
    int over = 0;

    if (w->n >= TG_THROTTLE_MIN_SAMPLES) {
        over = w->slow * 100 > w->n
               || (double)w->errors > p->max_error_ratio * (double)w->n;
    }
    if (over) {
        factor = factor * TG_THROTTLE_DECREASE / TG_THROTTLE_ONE;
    } else {
        factor += TG_THROTTLE_RECOVER;
    }
    if (factor > TG_THROTTLE_ONE) {
        factor = TG_THROTTLE_ONE;
    }
    return factor < min ? (min > TG_THROTTLE_ONE ? TG_THROTTLE_ONE : min) : factor;
}

/* Below 16 us one bucket per microsecond; above, 8 per octave. */
unsigned
tg_throttle_bucket(uint64_t us)
{
    unsigned o;

    if (us < 16) {
        return (unsigned)us;
    }
    o = 63u - (unsigned)__builtin_clzll(us);
    if (o > 31) {
        return TG_THROTTLE_BUCKETS - 1;
    }
    return (o - 2) * 8 + (unsigned)((us >> (o - 3)) & 7);
}

uint64_t
tg_throttle_bucket_max(unsigned b)
{
    unsigned o;

    if (b < 16) {
        return b;
    }
    if (b >= TG_THROTTLE_BUCKETS - 1) {
        return UINT64_MAX;
    }
    o = b / 8 + 2;
    return ((uint64_t)(9 + b % 8) << (o - 3)) - 1;
}

uint64_t
tg_throttle_p99_us(const uint64_t *hist, uint64_t n)
{
    uint64_t rank = (n * 99 + 99) / 100, seen = 0;

    if (n == 0) {
        return 0;
    }
    for (unsigned b = 0; b < TG_THROTTLE_BUCKETS; b++) {
        seen += hist[b];
        if (seen >= rank) {
            return tg_throttle_bucket_max(b);
        }
    }
    return tg_throttle_bucket_max(TG_THROTTLE_BUCKETS - 1);
}

void
tg_throttle_report_build(tg_throttle_report *rep, const char *prefix, const char *id,
                         unsigned factor, unsigned life_ms)
{
    snprintf(rep->key, sizeof(rep->key), "%s{throttle}", prefix != NULL ? prefix : "");
    snprintf(rep->id, sizeof(rep->id), "%s", id);
    snprintf(rep->factor, sizeof(rep->factor), "%u",
             factor < 1 ? 1 : factor > TG_THROTTLE_ONE ? TG_THROTTLE_ONE : factor);
    snprintf(rep->life_ms, sizeof(rep->life_ms), "%u", life_ms);
    rep->args[0] = rep->id;
    rep->args[1] = rep->factor;
    rep->args[2] = rep->life_ms;
}

/* A decimal of 1..9 digits at *p; moves *p past it.  -1 if none. */
static long
parse_uint(const char **p, const char *end)
{
    long v = 0;
    int digits = 0;

    while (*p < end && **p >= '0' && **p <= '9' && digits < 9) {
        v = v * 10 + (**p - '0');
        (*p)++;
        digits++;
    }
    return digits == 0 || (*p < end && **p >= '0' && **p <= '9') ? -1 : v;
}

tg_rc
tg_throttle_parse_reply(const char *s, size_t len, unsigned *min, unsigned *reporters,
                        const char **why)
{
    const char *p = s, *end = s + len;
    long m, n;

    if (s == NULL) {
        *why = "no value";
        return TG_ERR;
    }
    m = parse_uint(&p, end);
    if (m < 0 || p >= end || *p != ' ') {
        *why = "not \"<factor> <reports>\"";
        return TG_ERR;
    }
    p++;
    n = parse_uint(&p, end);
    if (n < 0 || p != end) {
        *why = "not \"<factor> <reports>\"";
        return TG_ERR;
    }
    if (m < 1 || m > TG_THROTTLE_ONE) {
        *why = "factor out of 1..1000";
        return TG_ERR;
    }
    if (n < 1) {
        *why = "no live report (not even ours)";
        return TG_ERR;
    }
    *min = (unsigned)m;
    *reporters = (unsigned)n;
    return TG_OK;
}

/* ---- the process's throttle -------------------------------------------- */

void
tg_throttle_init(const tg_conf *conf)
{
    char host[64] = "localhost";
    uint32_t rnd = 0;

    thr.nslots = conf->workers + 1;       /* + any other thread that reports */
    thr.slots = tg_xcalloc(thr.nslots, sizeof(*thr.slots));
    thr.next_slot = 0;
    memset(thr.seen_hist, 0, sizeof(thr.seen_hist));
    thr.seen_n = thr.seen_slow = thr.seen_errors = 0;
    thr.enabled = conf->adaptive.throttle.enabled;
    thr.target_us = (uint64_t)conf->adaptive.throttle.target_p99_ms * 1000;
    thr.applied = thr.local = thr.logged = TG_THROTTLE_ONE;
    thr.close_ms = 0;
    thr.reporters = 0;
    thr.reporting = 0;
    thr.failing = 0;
    memset(&thr.last, 0, sizeof(thr.last));
    thr.last_p99_us = 0;
    /* host:pid:random - unique per process, readable in the hash */
    gethostname(host, sizeof(host) - 1);
    host[sizeof(host) - 1] = '\0';
    if (getrandom(&rnd, sizeof(rnd), GRND_NONBLOCK) != (ssize_t)sizeof(rnd)) {
        rnd = (uint32_t)(tg_now_us() * 2654435761u);
    }
    snprintf(thr.id, sizeof(thr.id), "%s:%ld:%08x", host, (long)getpid(), rnd);
    tg_metrics_set_gauge(TG_M_THROTTLE_FACTOR, 0, 1.0);
}

void
tg_throttle_deinit(void)
{
    free(thr.slots);
    thr.slots = NULL;
    thr.nslots = 0;
    __atomic_store_n(&thr.enabled, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&thr.applied, TG_THROTTLE_ONE, __ATOMIC_RELAXED);
}

void
tg_throttle_record(uint64_t rtt_us, int error)
{
    thr_slot *s;

    if (!__atomic_load_n(&thr.enabled, __ATOMIC_RELAXED) || thr.slots == NULL) {
        return;
    }
    if (thr_my_slot == 0) {
        thr_my_slot = __atomic_add_fetch(&thr.next_slot, 1, __ATOMIC_RELAXED);
    }
    /* A thread beyond nslots shares a slot: the adds stay atomic. */
    s = &thr.slots[(thr_my_slot - 1) % thr.nslots];
    if (rtt_us > __atomic_load_n(&thr.target_us, __ATOMIC_RELAXED)) {
        __atomic_fetch_add(&s->slow, 1, __ATOMIC_RELAXED);
    }
    if (error) {
        __atomic_fetch_add(&s->errors, 1, __ATOMIC_RELAXED);
    }
    __atomic_fetch_add(&s->hist[tg_throttle_bucket(rtt_us)], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->n, 1, __ATOMIC_RELAXED);
}

unsigned
tg_throttle_factor(void)
{
    return __atomic_load_n(&thr.applied, __ATOMIC_RELAXED);
}

void
tg_throttle_tick(const tg_conf *conf, struct tg_redis *redis, const char *prefix,
                 uint64_t now_ms)
{
    uint64_t end = __atomic_load_n(&thr.close_ms, __ATOMIC_RELAXED);

    if (thr.slots == NULL || (end != 0 && now_ms < end)) {
        return;
    }
    /* One worker closes the window: the one whose swap succeeds. */
    if (!__atomic_compare_exchange_n(&thr.close_ms, &end,
                                     now_ms + conf->adaptive.throttle.window_ms, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
        return;
    }
    pthread_mutex_lock(&thr.lock);
    if (end != 0) {
        close_window(conf, redis, prefix, now_ms);
    }
    pthread_mutex_unlock(&thr.lock);
}

void
tg_throttle_status_json(struct evbuffer *out)
{
    if (!__atomic_load_n(&thr.enabled, __ATOMIC_RELAXED)) {
        return;
    }
    pthread_mutex_lock(&thr.lock);
    evbuffer_add_printf(out,
        "\"throttle\":{\"factor\":%.3f,\"local\":%.3f,\"reports\":%u,"
        "\"window\":{\"exchanges\":%llu,\"p99_ms\":%.1f,\"error_ratio\":%.4f}},",
        (double)tg_throttle_factor() / TG_THROTTLE_ONE,
        (double)thr.local / TG_THROTTLE_ONE, thr.reporters,
        (unsigned long long)thr.last.n,
        thr.last_p99_us == UINT64_MAX ? -1.0 : (double)thr.last_p99_us / 1000,
        thr.last.n != 0 ? (double)thr.last.errors / (double)thr.last.n : 0.0);
    pthread_mutex_unlock(&thr.lock);
}

/* ---- helpers ------------------------------------------------------------ */

/* Under thr.lock: the window since the last close, one step, then the
 * factor to apply (local) or a report whose answer will say (Redis). */
static void
close_window(const tg_conf *conf, struct tg_redis *redis, const char *prefix,
             uint64_t now_ms)
{
    uint64_t n = 0, slow = 0, errors = 0, hist[TG_THROTTLE_BUCKETS] = { 0 };
    tg_throttle_params p;
    tg_throttle_report rep;

    for (unsigned i = 0; i < thr.nslots; i++) {
        const thr_slot *s = &thr.slots[i];
        /* n first: an exchange being recorded now counts next window */
        n += __atomic_load_n(&s->n, __ATOMIC_RELAXED);
        slow += __atomic_load_n(&s->slow, __ATOMIC_RELAXED);
        errors += __atomic_load_n(&s->errors, __ATOMIC_RELAXED);
        for (unsigned b = 0; b < TG_THROTTLE_BUCKETS; b++) {
            hist[b] += __atomic_load_n(&s->hist[b], __ATOMIC_RELAXED);
        }
    }
    thr.last.n = n - thr.seen_n;
    thr.last.slow = slow - thr.seen_slow;
    thr.last.errors = errors - thr.seen_errors;
    thr.seen_n = n;
    thr.seen_slow = slow;
    thr.seen_errors = errors;
    for (unsigned b = 0; b < TG_THROTTLE_BUCKETS; b++) {
        uint64_t d = hist[b] - thr.seen_hist[b];
        thr.seen_hist[b] = hist[b];
        hist[b] = d;
    }
    /* counted a little apart: never more slow or failed than finished */
    thr.last.slow = thr.last.slow > thr.last.n ? thr.last.n : thr.last.slow;
    thr.last.errors = thr.last.errors > thr.last.n ? thr.last.n : thr.last.errors;
    thr.last_p99_us = tg_throttle_p99_us(hist, thr.last.n);
    thr.window_ms = conf->adaptive.throttle.window_ms;

    /* a reload reaches the recorders here */
    __atomic_store_n(&thr.target_us, (uint64_t)conf->adaptive.throttle.target_p99_ms * 1000,
                     __ATOMIC_RELAXED);
    __atomic_store_n(&thr.enabled, conf->adaptive.throttle.enabled, __ATOMIC_RELAXED);
    if (!conf->adaptive.throttle.enabled) {
        thr.local = TG_THROTTLE_ONE;
        thr.reporters = 0;
        apply(TG_THROTTLE_ONE, now_ms);
        return;
    }
    p.max_error_ratio = conf->adaptive.throttle.max_error_ratio;
    p.min_factor = tg_throttle_min_permille(conf->adaptive.throttle.min_factor);
    thr.local = tg_throttle_step(thr.local, &thr.last, &p);
    if (redis == NULL) {
        apply(thr.local, now_ms);
        return;
    }
    /* The last report's answer is due within redis.timeout_ms; one that
     * never came (a dropped connection) stops holding reports after a
     * few windows. */
    if (thr.reporting && now_ms - thr.reporting_ms < 4 * thr.window_ms) {
        return;
    }
    tg_throttle_report_build(&rep, prefix, thr.id, thr.local,
                             TG_THROTTLE_REPORT_WINDOWS * conf->adaptive.throttle.window_ms);
    thr.reporting = 1;
    thr.reporting_ms = now_ms;
    tg_redis_eval(redis, tg_throttle_lua, rep.key, rep.args, 3, report_done, NULL);
}

/* The answer to a report, on the reporting worker's loop (never inside
 * tg_redis_eval, so thr.lock is free).  Redis unavailable: the local
 * factor; a reply that makes no sense: the same, and one line that says so. */
static void
report_done(void *arg, tg_rc rc, const char *value, size_t len)
{
    uint64_t now = tg_now_ms();
    unsigned min = TG_THROTTLE_ONE, reports = 0;
    const char *why = NULL;

    TG_UNUSED(arg);
    pthread_mutex_lock(&thr.lock);
    thr.reporting = 0;
    if (rc == TG_OK && tg_throttle_parse_reply(value, len, &min, &reports, &why) == TG_OK) {
        if (thr.failing) {
            tg_info("throttle: Redis answers the reports again: applying the "
                    "smallest of %u instance(s)", reports);
            thr.failing = 0;
        }
        thr.reporters = reports;
        apply(min < thr.local ? min : thr.local, now);
    } else {
        if (rc != TG_OK && !thr.failing) {
            tg_warn("throttle: the report to Redis failed (the Redis client's "
                    "log says why): applying this instance's factor only");
        }
        thr.failing = 1;
        if (rc == TG_OK && now - thr.warned_ms >= THR_LOG_MS) {
            tg_warn("throttle: Redis answered the report with \"%.*s\" (%s): "
                    "applying this instance's factor only",
                    value != NULL ? (int)(len > 64 ? 64 : len) : 6,
                    value != NULL ? value : "(nil)", why);
            thr.warned_ms = now;
        }
        thr.reporters = 0;
        apply(thr.local, now);
    }
    pthread_mutex_unlock(&thr.lock);
}

/* Under thr.lock: factor in force from now; the gauge; a log line when it
 * changed (at most one per THR_LOG_MS; a change held back is logged with
 * the next window's). */
static void
apply(unsigned factor, uint64_t now_ms)
{
    if (__atomic_exchange_n(&thr.applied, factor, __ATOMIC_RELAXED) != factor) {
        tg_metrics_set_gauge(TG_M_THROTTLE_FACTOR, 0, (double)factor / TG_THROTTLE_ONE);
    }
    if (factor != thr.logged && now_ms - thr.logged_ms >= THR_LOG_MS) {
        tg_info("throttle: factor %.3f -> %.3f (last window: %llu exchanges, "
                "p99 %.1f ms, %llu errors; this instance %.3f, %u report(s))",
                (double)thr.logged / TG_THROTTLE_ONE, (double)factor / TG_THROTTLE_ONE,
                (unsigned long long)thr.last.n,
                thr.last_p99_us == UINT64_MAX ? -1.0 : (double)thr.last_p99_us / 1000,
                (unsigned long long)thr.last.errors, (double)thr.local / TG_THROTTLE_ONE,
                thr.reporters);
        thr.logged = factor;
        thr.logged_ms = now_ms;
    }
}
