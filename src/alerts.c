/*
 * alerts.c - the alert engine: rules evaluated on the main thread,
 * incidents, and the JSON of each channel.  See alerts.h.
 *
 * Windows: every tick the engine samples the merged counters it needs
 * (429s per tier, upstream 5xx, requests) into a ring; a rule's count
 * over window_ms is the newest sample minus the oldest one inside the
 * window.  Samples are spaced so that the ring covers the longest window.
 *
 * Incidents: one per (rule, subject) while its condition holds.  Its
 * dedup key is made once, when it opens ("tollgate/SOURCE/RULE/SUBJECT/
 * START-MS"), and is the same on every repeat and on the resolve; the
 * resolve goes to the channels the trigger went to.
 */
#include "tollgate/alerts.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <event2/buffer.h>
#include <event2/event.h>

#include "tollgate/alert_send.h"
#include "tollgate/anomaly.h"
#include "tollgate/common_ev.h"
#include "tollgate/metrics.h"
#include "tollgate/worker.h"

#define TG_ALERTS_RING   1024        /* samples kept */
#define TG_ALERTS_TEST   (TG_MA_RULES - 1)   /* metric rule "test" */

_Static_assert(TG_ALERT__NCHANNELS == TG_MA_CHANNELS, "channel labels");
_Static_assert(TG_RULE__COUNT + 1 == TG_MA_RULES, "rule labels");

enum tg_alerts_kind { TG_AK_FIRING, TG_AK_REPEAT, TG_AK_RESOLVED };

typedef struct tg_incident {
    struct tg_incident *next;
    unsigned            rule;          /* enum tg_alert_rule, or TG_ALERTS_TEST */
    char                subject[160];  /* "tier basic", "redis", "upstream HOST:PORT" */
    char                dedup[256];
    char                summary[320];  /* the last firing summary */
    char                numbers[160];  /* the same, as a short line */
    uint64_t            started;       /* wall clock, ms since the epoch */
    uint64_t            last_sent;     /* monotonic ms */
    unsigned            to;            /* channels the trigger went to */
    double              value;         /* rule-specific: see details() */
    double              limit;
    uint64_t            requests;
    unsigned            window_ms;
} tg_incident;

struct tg_alerts {
    struct event_base          *base;
    tg_conf                    *start;     /* tiers, servers, store: fixed */
    tg_conf                    *conf;      /* alerts: the current snapshot */
    struct tg_worker *const    *workers;
    struct tg_metrics_shard *const *shards;
    unsigned                    nworkers;
    struct tg_alert_send       *send;
    struct event               *tick;
    unsigned                    tick_ms;
    char                        source[256];  /* "host/instance" */
    tg_incident                *open;
    uint64_t                   *ring;      /* TG_ALERTS_RING x (1 + nv) */
    size_t                      nv;        /* tiers' 429s, 5xx, requests */
    size_t                      ntiers;
    size_t                      nsamples, newest;
    const struct tg_anomaly    *anomaly;   /* rule anomaly's source, or NULL */
    uint64_t                    eval_now;  /* anomaly_hit: this evaluation's time */
};

static const char *const rule_names[TG_MA_RULES] = {
    "breaches", "redis_down", "breaker_open", "upstream_errors", "anomaly", "test",
};
static const char *const channel_names[TG_ALERT__NCHANNELS] = {
    "slack", "pagerduty", "webhook",
};
static const char *const severities[TG_MA_RULES] = {
    "warning", "critical", "error", "error", "warning", "info",
};

static void tick_cb(evutil_socket_t fd, short what, void *arg);
static void arm(struct tg_alerts *a);
static void sample(struct tg_alerts *a, uint64_t now);
static uint64_t window_delta(const struct tg_alerts *a, size_t v, unsigned window_ms,
                             uint64_t now);
static void evaluate(struct tg_alerts *a, uint64_t now);
static void evaluate_anomaly(struct tg_alerts *a, uint64_t now);
static tg_incident *find(struct tg_alerts *a, unsigned rule, const char *subject);
static void update(struct tg_alerts *a, tg_incident *fresh, int active, uint64_t now);
static void close_incident(struct tg_alerts *a, tg_incident *inc);
static void send_all(struct tg_alerts *a, struct tg_alert_send *s, const tg_conf *conf,
                     const tg_incident *inc, enum tg_alerts_kind kind,
                     tg_alert_send_done_fn done, void *arg);
static char *render(unsigned channel, const tg_conf *conf, const char *source,
                    const tg_incident *inc, enum tg_alerts_kind kind, size_t *len);
static void make_source(const tg_conf *conf, char *out, size_t len);
static void js(struct evbuffer *b, const char *s);
static void dedup_key(tg_incident *inc, const char *source);
static void send_opts(const tg_conf *conf, tg_alert_send_opts *o);
static uint64_t wall_ms(void);
static void iso(uint64_t ms, char *out, size_t len);

/* ---- public functions -------------------------------------------------- */

struct tg_alerts *
tg_alerts_create(struct event_base *base, tg_conf *conf,
                 struct tg_worker *const *workers,
                 struct tg_metrics_shard *const *shards, unsigned nworkers)
{
    struct tg_alerts *a = tg_xcalloc(1, sizeof(*a));
    tg_alert_send_opts o;

    a->base = base;
    a->start = tg_conf_ref(conf);
    a->conf = tg_conf_ref(conf);
    a->workers = workers;
    a->shards = shards;
    a->nworkers = nworkers;
    a->ntiers = conf->ntiers;
    a->nv = a->ntiers + 2;
    a->ring = tg_xcalloc(TG_ALERTS_RING * (1 + a->nv), sizeof(uint64_t));
    send_opts(conf, &o);
    a->send = tg_alert_send_create(base, &o);
    a->tick = tg_event_new(base, -1, EV_PERSIST, tick_cb, a);
    if (a->send == NULL) {
        tg_alerts_destroy(a);
        return NULL;
    }
    make_source(conf, a->source, sizeof(a->source));
    /* the counters start at zero with the process: the first sample, so
     * a burst before the first tick is inside the window */
    a->nsamples = 1;
    a->ring[0] = tg_now_ms();
    arm(a);
    return a;
}

void
tg_alerts_reload(struct tg_alerts *a, tg_conf *conf)
{
    tg_alert_send_opts o;
    tg_incident *inc, *next;

    if (a == NULL) {
        return;
    }
    /* a rule the new file switches off resolves its incidents, through
     * the channels they were sent to (the old file's) */
    for (inc = a->open; inc != NULL; inc = next) {
        next = inc->next;
        if (!conf->alerts.enabled || !conf->alerts.rule[inc->rule].enabled) {
            close_incident(a, inc);
        }
    }
    tg_conf_unref(a->conf);
    a->conf = tg_conf_ref(conf);
    send_opts(conf, &o);
    tg_alert_send_configure(a->send, &o);
    make_source(conf, a->source, sizeof(a->source));
    arm(a);
}

void
tg_alerts_set_anomaly(struct tg_alerts *a, const struct tg_anomaly *an)
{
    if (a != NULL) {
        a->anomaly = an;
    }
}

void
tg_alerts_status_json(const struct tg_alerts *a, struct evbuffer *out)
{
    const tg_incident *inc;
    char since[40];
    unsigned c;
    int first = 1;

    evbuffer_add(out, "[", 1);
    for (inc = a ? a->open : NULL; inc != NULL; inc = inc->next) {
        iso(inc->started, since, sizeof(since));
        evbuffer_add_printf(out, "%s{\"rule\":\"%s\",\"subject\":",
                            first ? "" : ",", rule_names[inc->rule]);
        js(out, inc->subject);
        evbuffer_add(out, ",\"incident\":", 12);
        js(out, inc->dedup);
        evbuffer_add_printf(out, ",\"since\":\"%s\",\"channels\":[", since);
        for (c = 0; c < TG_ALERT__NCHANNELS; c++) {
            if (inc->to & (1u << c)) {
                evbuffer_add_printf(out, "%s\"%s\"", (inc->to & ((1u << c) - 1))
                                    ? "," : "", channel_names[c]);
            }
        }
        evbuffer_add(out, "]}", 2);
        first = 0;
    }
    evbuffer_add(out, "]", 1);
}

void
tg_alerts_destroy(struct tg_alerts *a)
{
    tg_incident *inc, *next;

    if (a == NULL) {
        return;
    }
    for (inc = a->open; inc != NULL; inc = next) {
        next = inc->next;
        free(inc);
    }
    if (a->tick != NULL) {
        event_free(a->tick);
    }
    tg_alert_send_destroy(a->send);
    free(a->ring);
    tg_conf_unref(a->conf);
    tg_conf_unref(a->start);
    free(a);
}

/* ---- evaluation ---------------------------------------------------------- */

static void
arm(struct tg_alerts *a)
{
    struct timeval tv;
    unsigned ms = a->conf->alerts.evaluate_ms;

    if (!a->conf->alerts.enabled) {
        event_del(a->tick);
        a->tick_ms = 0;
        return;
    }
    if (ms == a->tick_ms && event_pending(a->tick, EV_TIMEOUT, NULL)) {
        return;
    }
    a->tick_ms = ms;
    tv = tg_ms_tv(ms);
    event_add(a->tick, &tv);
}

static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_alerts *a = arg;
    uint64_t now = tg_now_ms();

    TG_UNUSED(fd);
    TG_UNUSED(what);
    sample(a, now);
    evaluate(a, now);
}

/* Values of a sample: [0, ntiers) 429s of tier i; ntiers: upstream 5xx
 * (500, 502, 504 answered, any tier); ntiers + 1: requests that passed
 * the limiter (every answer but 401, 403, 429). */
static void
sample(struct tg_alerts *a, uint64_t now)
{
    static const int errs[] = { 500, 502, 504 };
    static const int refused[] = { 401, 403, 429 };
    struct tg_metrics_shard *const *sh = a->shards;
    size_t t, k, ntl = tg_metrics_series(TG_M_REQUESTS) / TG_MS__COUNT;
    unsigned maxw = 1, w, every;
    uint64_t *row, e = 0, all = 0;

    for (k = 0; k < TG_RULE__COUNT; k++) {
        w = a->conf->alerts.rule[k].window_ms;
        maxw = w > maxw ? w : maxw;
    }
    every = maxw / (TG_ALERTS_RING - 2);
    if (a->nsamples > 1 && now - a->ring[a->newest * (1 + a->nv)] < every) {
        row = &a->ring[a->newest * (1 + a->nv)];     /* too soon: refresh it */
    } else {
        a->newest = a->nsamples == 0 ? 0 : (a->newest + 1) % TG_ALERTS_RING;
        a->nsamples += a->nsamples < TG_ALERTS_RING;
        row = &a->ring[a->newest * (1 + a->nv)];
        row[0] = now;
    }
    for (t = 0; t < a->ntiers; t++) {
        row[1 + t] = (uint64_t)tg_metrics_value(sh, a->nworkers, TG_M_BREACHES, t);
    }
    for (t = 0; t < ntl; t++) {
        for (k = 0; k < TG_MS__COUNT; k++) {
            all += (uint64_t)tg_metrics_value(sh, a->nworkers, TG_M_REQUESTS,
                                              t * TG_MS__COUNT + k);
        }
        for (k = 0; k < TG_ARRAY_LEN(errs); k++) {
            e += (uint64_t)tg_metrics_value(sh, a->nworkers, TG_M_REQUESTS,
                                            tg_metrics_tier_status(t, errs[k]));
        }
        for (k = 0; k < TG_ARRAY_LEN(refused); k++) {
            all -= (uint64_t)tg_metrics_value(sh, a->nworkers, TG_M_REQUESTS,
                                              tg_metrics_tier_status(t, refused[k]));
        }
    }
    row[1 + a->ntiers] = e;
    row[2 + a->ntiers] = all;
}

/* Growth of value v over the last window_ms (the whole ring while it is
 * younger than the window). */
static uint64_t
window_delta(const struct tg_alerts *a, size_t v, unsigned window_ms, uint64_t now)
{
    size_t i, idx, old = a->newest, stride = 1 + a->nv;

    if (a->nsamples == 0) {
        return 0;
    }
    for (i = 1; i < a->nsamples; i++) {
        idx = (a->newest + TG_ALERTS_RING - i) % TG_ALERTS_RING;
        if (a->ring[idx * stride] + window_ms < now) {
            break;
        }
        old = idx;
    }
    return a->ring[a->newest * stride + 1 + v] - a->ring[old * stride + 1 + v];
}

/* Redis unavailable to some worker (its breaker open or not connected),
 * and since when: the earliest of those workers' own first samples of it
 * down (tg_worker_store_down_ms; now if none has sampled it yet). */
static void
redis_states(const struct tg_alerts *a, uint64_t now, uint64_t *down_since,
             enum tg_breaker_state *breaker)
{
    unsigned i;
    int open = 0, closed = 1;

    *down_since = 0;
    for (i = 0; i < a->nworkers; i++) {
        enum tg_breaker_state st = tg_worker_redis_breaker(a->workers[i]);
        if (st == TG_BREAKER_OPEN || !tg_worker_store_ready(a->workers[i])) {
            uint64_t since = tg_worker_store_down_ms(a->workers[i]);

            if (since == 0 || since > now) {
                since = now;
            }
            if (*down_since == 0 || since < *down_since) {
                *down_since = since;
            }
        }
        open |= st == TG_BREAKER_OPEN;
        closed &= st == TG_BREAKER_CLOSED || st == TG_BREAKER_NONE;
    }
    *breaker = open ? TG_BREAKER_OPEN : closed ? TG_BREAKER_CLOSED : TG_BREAKER_HALF_OPEN;
}

/* A server's breaker for the process: open if any worker's is, closed
 * if all are, else half-open. */
static enum tg_breaker_state
upstream_breaker(const struct tg_alerts *a, size_t s)
{
    unsigned i;
    int open = 0, closed = 1;

    for (i = 0; i < a->nworkers; i++) {
        enum tg_breaker_state st = tg_worker_upstream_state(a->workers[i], s);
        open |= st == TG_BREAKER_OPEN;
        closed &= st == TG_BREAKER_CLOSED;
    }
    return open ? TG_BREAKER_OPEN : closed ? TG_BREAKER_CLOSED : TG_BREAKER_HALF_OPEN;
}

static void
evaluate(struct tg_alerts *a, uint64_t now)
{
    const tg_alert_rule_conf *r = a->conf->alerts.rule;
    int enabled = a->conf->alerts.enabled, down;
    enum tg_breaker_state breaker;
    tg_incident fresh, *inc;
    uint64_t since;
    unsigned counts[TG_RULE__COUNT] = { 0 };
    size_t t, s;

    if (!enabled) {
        return;
    }
    if (r[TG_RULE_BREACHES].enabled) {
        for (t = 0; t < a->ntiers; t++) {
            uint64_t d = window_delta(a, t, r[TG_RULE_BREACHES].window_ms, now);

            memset(&fresh, 0, sizeof(fresh));
            fresh.rule = TG_RULE_BREACHES;
            snprintf(fresh.subject, sizeof(fresh.subject), "tier %s",
                     a->start->tiers[t].name);
            fresh.value = (double)d;
            fresh.limit = (double)r[TG_RULE_BREACHES].threshold;
            fresh.window_ms = r[TG_RULE_BREACHES].window_ms;
            snprintf(fresh.numbers, sizeof(fresh.numbers), "%llu 429s in %u ms "
                     "(threshold %llu)", (unsigned long long)d, fresh.window_ms,
                     (unsigned long long)r[TG_RULE_BREACHES].threshold);
            snprintf(fresh.summary, sizeof(fresh.summary), "tier %s: %s",
                     a->start->tiers[t].name, fresh.numbers);
            update(a, &fresh, d > r[TG_RULE_BREACHES].threshold, now);
        }
    }
    redis_states(a, now, &since, &breaker);
    if (a->start->store != TG_STORE_REDIS) {
        since = 0;
        breaker = TG_BREAKER_CLOSED;
    }
    down = since != 0;
    if (r[TG_RULE_REDIS_DOWN].enabled) {
        uint64_t for_ms = down ? now - since : 0;

        memset(&fresh, 0, sizeof(fresh));
        fresh.rule = TG_RULE_REDIS_DOWN;
        snprintf(fresh.subject, sizeof(fresh.subject), "redis");
        fresh.value = (double)for_ms;
        fresh.limit = r[TG_RULE_REDIS_DOWN].after_ms;
        snprintf(fresh.numbers, sizeof(fresh.numbers), "unavailable for %llu ms "
                 "(after_ms %u)", (unsigned long long)for_ms,
                 r[TG_RULE_REDIS_DOWN].after_ms);
        snprintf(fresh.summary, sizeof(fresh.summary), "Redis %s; requests use "
                 "the on_failure policy", fresh.numbers);
        update(a, &fresh, down && for_ms >= r[TG_RULE_REDIS_DOWN].after_ms, now);
    }
    if (r[TG_RULE_BREAKER_OPEN].enabled) {
        memset(&fresh, 0, sizeof(fresh));
        fresh.rule = TG_RULE_BREAKER_OPEN;
        snprintf(fresh.subject, sizeof(fresh.subject), "redis");
        snprintf(fresh.numbers, sizeof(fresh.numbers), "circuit breaker open");
        snprintf(fresh.summary, sizeof(fresh.summary), "Redis circuit breaker open");
        if (breaker != TG_BREAKER_HALF_OPEN) {      /* half-open: no change */
            update(a, &fresh, breaker == TG_BREAKER_OPEN, now);
        }
        for (s = 0; s < a->start->upstream.nservers; s++) {
            enum tg_breaker_state st = upstream_breaker(a, s);

            snprintf(fresh.subject, sizeof(fresh.subject), "upstream %s",
                     a->start->upstream.servers[s].text);
            snprintf(fresh.summary, sizeof(fresh.summary), "upstream %s: circuit "
                     "breaker open", a->start->upstream.servers[s].text);
            if (st != TG_BREAKER_HALF_OPEN) {
                update(a, &fresh, st == TG_BREAKER_OPEN, now);
            }
        }
    }
    if (r[TG_RULE_UPSTREAM_ERRORS].enabled) {
        const tg_alert_rule_conf *ue = &r[TG_RULE_UPSTREAM_ERRORS];
        uint64_t e = window_delta(a, a->ntiers, ue->window_ms, now);
        uint64_t n = window_delta(a, a->ntiers + 1, ue->window_ms, now);

        memset(&fresh, 0, sizeof(fresh));
        fresh.rule = TG_RULE_UPSTREAM_ERRORS;
        snprintf(fresh.subject, sizeof(fresh.subject), "upstream");
        fresh.value = n ? (double)e / (double)n : 0.0;
        fresh.limit = ue->ratio;
        fresh.requests = n;
        fresh.window_ms = ue->window_ms;
        snprintf(fresh.numbers, sizeof(fresh.numbers), "%llu of %llu requests "
                 "5xx in %u ms (ratio %g)", (unsigned long long)e,
                 (unsigned long long)n, ue->window_ms, ue->ratio);
        snprintf(fresh.summary, sizeof(fresh.summary), "upstream errors: %s",
                 fresh.numbers);
        update(a, &fresh, n >= ue->min_requests && (double)e > ue->ratio * (double)n,
               now);
    }
    evaluate_anomaly(a, now);
    for (inc = a->open; inc != NULL; inc = inc->next) {
        counts[inc->rule]++;
    }
    for (t = 0; t < TG_RULE__COUNT; t++) {
        tg_metrics_set_gauge(TG_M_ALERTS_OPEN, t, counts[t]);
    }
}

/* One unusual consumer (tg_anomaly_foreach_hit): open or refresh its
 * incident. */
static void
anomaly_hit(void *arg, const tg_anomaly_hit *h)
{
    struct tg_alerts *a = arg;
    tg_incident fresh;

    memset(&fresh, 0, sizeof(fresh));
    fresh.rule = TG_RULE_ANOMALY;
    snprintf(fresh.subject, sizeof(fresh.subject), "consumer %s", h->consumer);
    fresh.value = (double)h->requests;
    fresh.limit = h->baseline;
    fresh.requests = h->total;
    fresh.window_ms = h->window_ms;
    if (h->state == TG_AN_SPIKE) {
        snprintf(fresh.numbers, sizeof(fresh.numbers), "%llu requests in %u ms, "
                 "%.1fx its baseline of %.1f (spike_factor %g)",
                 (unsigned long long)h->requests, h->window_ms,
                 h->baseline > 0 ? (double)h->requests / h->baseline : 0.0,
                 h->baseline, h->spike_factor);
    } else {
        snprintf(fresh.numbers, sizeof(fresh.numbers), "new consumer: %llu of "
                 "%llu requests in %u ms", (unsigned long long)h->requests,
                 (unsigned long long)h->total, h->window_ms);
    }
    snprintf(fresh.summary, sizeof(fresh.summary), "consumer %s: %s", h->consumer,
             fresh.numbers);
    update(a, &fresh, 1, a->eval_now);
}

/* Rule anomaly: an incident per unusual consumer; those that are no
 * longer unusual (or the rule or the detector is off) resolve. */
static void
evaluate_anomaly(struct tg_alerts *a, uint64_t now)
{
    int on = a->conf->alerts.rule[TG_RULE_ANOMALY].enabled && a->anomaly != NULL;
    tg_incident *inc, *next;

    for (inc = a->open; inc != NULL; inc = next) {
        next = inc->next;
        if (inc->rule == TG_RULE_ANOMALY
            && (!on || !tg_anomaly_is_hit(a->anomaly, inc->subject + 9))) {
            close_incident(a, inc);
        }
    }
    if (on) {
        a->eval_now = now;
        tg_anomaly_foreach_hit(a->anomaly, anomaly_hit, a);
    }
}

static tg_incident *
find(struct tg_alerts *a, unsigned rule, const char *subject)
{
    tg_incident *inc;

    for (inc = a->open; inc != NULL; inc = inc->next) {
        if (inc->rule == rule && strcmp(inc->subject, subject) == 0) {
            return inc;
        }
    }
    return NULL;
}

/* The condition of fresh's (rule, subject) now: open, repeat or resolve
 * its incident. */
static void
update(struct tg_alerts *a, tg_incident *fresh, int active, uint64_t now)
{
    tg_incident *inc = find(a, fresh->rule, fresh->subject);
    unsigned cooldown = a->conf->alerts.cooldown_ms;

    if (inc == NULL && active) {
        inc = tg_xmalloc(sizeof(*inc));
        *inc = *fresh;
        inc->started = wall_ms();
        inc->last_sent = now;
        inc->to = a->conf->alerts.rule[fresh->rule].to;
        dedup_key(inc, a->source);
        inc->next = a->open;
        a->open = inc;
        tg_warn("alerts: %s %s: firing: %s", rule_names[inc->rule], inc->subject,
                inc->summary);
        send_all(a, a->send, a->conf, inc, TG_AK_FIRING, NULL, NULL);
    } else if (inc != NULL && active) {
        memcpy(inc->summary, fresh->summary, sizeof(inc->summary));
        memcpy(inc->numbers, fresh->numbers, sizeof(inc->numbers));
        inc->value = fresh->value;
        inc->limit = fresh->limit;
        inc->requests = fresh->requests;
        inc->window_ms = fresh->window_ms;
        if (cooldown > 0 && now - inc->last_sent >= cooldown) {
            inc->last_sent = now;
            send_all(a, a->send, a->conf, inc, TG_AK_REPEAT, NULL, NULL);
        }
    } else if (inc != NULL) {
        close_incident(a, inc);
    }
}

/* Send inc's resolve, unlink and free it. */
static void
close_incident(struct tg_alerts *a, tg_incident *inc)
{
    tg_incident **pp;

    tg_info("alerts: %s %s: resolved after %llu ms", rule_names[inc->rule],
            inc->subject, (unsigned long long)(wall_ms() - inc->started));
    send_all(a, a->send, a->conf, inc, TG_AK_RESOLVED, NULL, NULL);
    for (pp = &a->open; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == inc) {
            *pp = inc->next;
            break;
        }
    }
    free(inc);
}

/* ---- messages ------------------------------------------------------------ */

/* One message per channel of inc->to that conf still configures. */
static void
send_all(struct tg_alerts *a, struct tg_alert_send *s, const tg_conf *conf,
         const tg_incident *inc, enum tg_alerts_kind kind,
         tg_alert_send_done_fn done, void *arg)
{
    const char *source = a != NULL ? a->source : NULL;
    char src[256];
    unsigned c;

    if (source == NULL) {
        make_source(conf, src, sizeof(src));
        source = src;
    }
    for (c = 0; c < TG_ALERT__NCHANNELS; c++) {
        size_t len;
        char *body;

        if (!(inc->to & (1u << c)) || !conf->alerts.channel[c].enabled) {
            continue;
        }
        body = render(c, conf, source, inc, kind, &len);
        tg_alert_send_post(s, c, inc->rule, conf->alerts.channel[c].url, body, len,
                           done, arg);
        free(body);
    }
}

/* s as a JSON string, quotes included. */
static void
js(struct evbuffer *b, const char *s)
{
    evbuffer_add(b, "\"", 1);
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        switch (ch) {
        case '"':  evbuffer_add(b, "\\\"", 2); break;
        case '\\': evbuffer_add(b, "\\\\", 2); break;
        case '\n': evbuffer_add(b, "\\n", 2); break;
        default:
            if (ch < 0x20) {
                evbuffer_add_printf(b, "\\u%04x", ch);
            } else {
                evbuffer_add(b, s, 1);
            }
        }
    }
    evbuffer_add(b, "\"", 1);
}

/* The rule's numbers as a JSON object (custom_details / details). */
static void
details(struct evbuffer *b, const tg_incident *inc, const char *since)
{
    evbuffer_add_printf(b, "{\"rule\":\"%s\",\"subject\":", rule_names[inc->rule]);
    js(b, inc->subject);
    evbuffer_add_printf(b, ",\"since\":\"%s\"", since);
    switch (inc->rule) {
    case TG_RULE_BREACHES:
        evbuffer_add_printf(b, ",\"count\":%.0f,\"threshold\":%.0f,\"window_ms\":%u",
                            inc->value, inc->limit, inc->window_ms);
        break;
    case TG_RULE_REDIS_DOWN:
        evbuffer_add_printf(b, ",\"down_ms\":%.0f,\"after_ms\":%.0f",
                            inc->value, inc->limit);
        break;
    case TG_RULE_UPSTREAM_ERRORS:
        evbuffer_add_printf(b, ",\"share\":%.4f,\"ratio\":%g,\"requests\":%llu,"
                            "\"window_ms\":%u", inc->value, inc->limit,
                            (unsigned long long)inc->requests, inc->window_ms);
        break;
    case TG_RULE_ANOMALY:
        evbuffer_add_printf(b, ",\"requests\":%.0f,\"baseline\":%.1f,"
                            "\"window_requests\":%llu,\"window_ms\":%u",
                            inc->value, inc->limit,
                            (unsigned long long)inc->requests, inc->window_ms);
        break;
    default:
        break;
    }
    evbuffer_add(b, "}", 1);
}

static void
slack_field(struct evbuffer *b, const char *title, const char *text, int comma)
{
    char t[512];

    snprintf(t, sizeof(t), "*%s*\n%s", title, text);
    evbuffer_add_printf(b, "%s{\"type\":\"mrkdwn\",\"text\":", comma ? "," : "");
    js(b, t);
    evbuffer_add(b, "}", 1);
}

/* The body of one message (malloc'ed, NUL-terminated; *len its length). */
static char *
render(unsigned channel, const tg_conf *conf, const char *source,
       const tg_incident *inc, enum tg_alerts_kind kind, size_t *len)
{
    static const char *const tags[] = { "FIRING", "STILL FIRING", "RESOLVED" };
    struct evbuffer *b = tg_evbuffer_new();
    uint64_t now = wall_ms();
    char since[40], at[40], line[640], head[256], lasted[64];
    const char *rule = rule_names[inc->rule];
    char *out;

    iso(inc->started, since, sizeof(since));
    iso(now, at, sizeof(at));
    snprintf(lasted, sizeof(lasted), "lasted %llu s",
             (unsigned long long)((now - inc->started + 999) / 1000));
    switch (channel) {
    case TG_ALERT_SLACK:
        snprintf(head, sizeof(head), "[%s] %s: %s", tags[kind], rule, inc->subject);
        snprintf(line, sizeof(line), "[%s] tollgate %s on %s: %s", tags[kind], rule,
                 source, kind == TG_AK_RESOLVED ? "back to normal" : inc->summary);
        evbuffer_add(b, "{\"text\":", 8);
        js(b, line);
        evbuffer_add_printf(b, ",\"blocks\":[{\"type\":\"header\",\"text\":"
                            "{\"type\":\"plain_text\",\"text\":");
        js(b, head);
        evbuffer_add_printf(b, "}},{\"type\":\"section\",\"fields\":[");
        slack_field(b, "What", kind == TG_AK_RESOLVED ? "back to normal"
                                                       : inc->summary, 0);
        slack_field(b, "Where", source, 1);
        slack_field(b, "Since", since, 1);
        slack_field(b, "Numbers", kind == TG_AK_RESOLVED ? lasted : inc->numbers, 1);
        evbuffer_add_printf(b, "]},{\"type\":\"context\",\"elements\":[{\"type\":"
                            "\"mrkdwn\",\"text\":");
        snprintf(line, sizeof(line), "incident %s", inc->dedup);
        js(b, line);
        evbuffer_add_printf(b, "}]}]}");
        break;
    case TG_ALERT_PAGERDUTY:
        evbuffer_add(b, "{\"routing_key\":", 15);
        js(b, conf->alerts.channel[TG_ALERT_PAGERDUTY].key);
        evbuffer_add_printf(b, ",\"event_action\":\"%s\",\"dedup_key\":",
                            kind == TG_AK_RESOLVED ? "resolve" : "trigger");
        js(b, inc->dedup);
        if (kind != TG_AK_RESOLVED) {
            evbuffer_add(b, ",\"payload\":{\"summary\":", 22);
            snprintf(line, sizeof(line), "tollgate %s: %s", rule, inc->summary);
            js(b, line);
            evbuffer_add(b, ",\"source\":", 10);
            js(b, source);
            evbuffer_add_printf(b, ",\"severity\":\"%s\",\"component\":",
                                severities[inc->rule]);
            js(b, inc->subject);
            evbuffer_add_printf(b, ",\"group\":\"tollgate\",\"class\":\"%s\","
                                "\"timestamp\":\"%s\",\"custom_details\":", rule, at);
            details(b, inc, since);
            evbuffer_add(b, "}", 1);
        }
        evbuffer_add(b, "}", 1);
        break;
    default:
        evbuffer_add_printf(b, "{\"version\":1,\"status\":\"%s\",\"repeat\":%s,"
                            "\"rule\":\"%s\",\"subject\":",
                            kind == TG_AK_RESOLVED ? "resolved" : "firing",
                            kind == TG_AK_REPEAT ? "true" : "false", rule);
        js(b, inc->subject);
        evbuffer_add(b, ",\"incident\":", 12);
        js(b, inc->dedup);
        evbuffer_add(b, ",\"summary\":", 11);
        js(b, inc->summary);
        evbuffer_add(b, ",\"source\":", 10);
        js(b, source);
        evbuffer_add_printf(b, ",\"severity\":\"%s\",\"started_at\":\"%s\","
                            "\"resolved_at\":", severities[inc->rule], since);
        if (kind == TG_AK_RESOLVED) {
            evbuffer_add_printf(b, "\"%s\"", at);
        } else {
            evbuffer_add(b, "null", 4);
        }
        evbuffer_add_printf(b, ",\"sent_at\":\"%s\",\"details\":", at);
        details(b, inc, since);
        evbuffer_add(b, "}", 1);
        break;
    }
    *len = evbuffer_get_length(b);
    out = tg_xmalloc(*len + 1);
    evbuffer_remove(b, out, *len);
    out[*len] = '\0';
    evbuffer_free(b);
    return out;
}

/* "host/instance": instance is alerts.instance, else the first listener. */
static void
make_source(const tg_conf *conf, char *out, size_t len)
{
    char host[128];

    if (gethostname(host, sizeof(host)) != 0) {
        snprintf(host, sizeof(host), "unknown");
    }
    host[sizeof(host) - 1] = '\0';
    snprintf(out, len, "%s/%s", host, conf->alerts.instance != NULL
             ? conf->alerts.instance : conf->listen[0].addr.text);
}

/* "tollgate/SOURCE/RULE/SUBJECT/START-MS", at most 255 characters
 * (PagerDuty's limit). */
static void
dedup_key(tg_incident *inc, const char *source)
{
    char buf[640];

    snprintf(buf, sizeof(buf), "tollgate/%s/%s/%s/%llu", source,
             rule_names[inc->rule], inc->subject, (unsigned long long)inc->started);
    snprintf(inc->dedup, sizeof(inc->dedup), "%.255s", buf);
}

static void
send_opts(const tg_conf *conf, tg_alert_send_opts *o)
{
    o->ca_file = conf->alerts.ca_file;
    o->connect_timeout_ms = conf->alerts.connect_timeout_ms;
    o->timeout_ms = conf->alerts.timeout_ms;
    o->max_tries = conf->alerts.max_tries;
    o->backoff_ms = conf->alerts.backoff_ms;
    o->max_backoff_ms = conf->alerts.max_backoff_ms;
    o->queue = conf->alerts.queue;
}

static uint64_t
wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* "2026-12-01T15:04:05.123Z" */
static void
iso(uint64_t ms, char *out, size_t len)
{
    time_t sec = (time_t)(ms / 1000);
    struct tm tm;
    char buf[32];

    gmtime_r(&sec, &tm);
    strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, len, "%s.%03uZ", buf, (unsigned)(ms % 1000));
}

/* ---- tollgate alert-test ------------------------------------------------- */

typedef struct tg_alerts_cli {
    struct event_base    *base;
    struct tg_alert_send *send;
    int                   failed;
} tg_alerts_cli;

static void
cli_done(void *arg, unsigned channel, int delivered, const char *reason)
{
    tg_alerts_cli *cli = arg;

    if (delivered) {
        printf("%s: delivered\n", channel_names[channel]);
    } else {
        printf("%s: FAILED: %s\n", channel_names[channel], reason);
        cli->failed = 1;
    }
    fflush(stdout);
    if (tg_alert_send_pending(cli->send) == 0) {
        event_base_loopbreak(cli->base);
    }
}

int
tg_alerts_cli_test(int argc, char **argv)
{
    static const struct option opts[] = {
        { "config",  required_argument, NULL, 'c' },
        { "channel", required_argument, NULL, 'n' },
        { NULL, 0, NULL, 0 }
    };
    static const char *usage = "usage: tollgate alert-test -c FILE [--channel "
                               "slack|pagerduty|webhook]\n";
    const char *path = NULL, *only = NULL;
    char err[TG_CONF_ERRLEN];
    tg_alerts_cli cli = { NULL, NULL, 0 };
    tg_alert_send_opts o;
    tg_incident inc;
    tg_conf *conf;
    unsigned c;
    int ch;

    optind = 1;
    while ((ch = getopt_long(argc, argv, "c:", opts, NULL)) != -1) {
        switch (ch) {
        case 'c': path = optarg; break;
        case 'n': only = optarg; break;
        default: fputs(usage, stderr); return 2;
        }
    }
    if (path == NULL || optind != argc) {
        fputs(usage, stderr);
        return 2;
    }
    conf = tg_conf_load(path, err, sizeof(err));
    if (conf == NULL) {
        fprintf(stderr, "tollgate: %s\n", err);
        return 1;
    }
    memset(&inc, 0, sizeof(inc));
    inc.rule = TG_ALERTS_TEST;
    for (c = 0; c < TG_ALERT__NCHANNELS; c++) {
        if (conf->alerts.channel[c].enabled
            && (only == NULL || strcmp(only, channel_names[c]) == 0)) {
            inc.to |= 1u << c;
        }
    }
    if (inc.to == 0) {
        fprintf(stderr, "tollgate: %s: no alert channel %s%s configured\n", path,
                only ? "named " : "", only ? only : "");
        tg_conf_unref(conf);
        return 1;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    cli.base = event_base_new();
    send_opts(conf, &o);
    o.max_tries = 1;                     /* the operator sees the first error */
    cli.send = cli.base ? tg_alert_send_create(cli.base, &o) : NULL;
    if (cli.send == NULL) {
        fprintf(stderr, "tollgate: cannot set up libcurl\n");
        cli.failed = 1;
        goto out;
    }
    inc.started = wall_ms();
    snprintf(inc.subject, sizeof(inc.subject), "alert-test");
    snprintf(inc.summary, sizeof(inc.summary), "test alert from tollgate "
             "alert-test: this channel works");
    snprintf(inc.numbers, sizeof(inc.numbers), "none (a test)");
    {
        char src[256];
        make_source(conf, src, sizeof(src));
        dedup_key(&inc, src);
    }
    send_all(NULL, cli.send, conf, &inc, TG_AK_FIRING, cli_done, &cli);
    if (tg_alert_send_pending(cli.send) > 0) {
        event_base_dispatch(cli.base);
    }

out:
    tg_alert_send_destroy(cli.send);
    if (cli.base != NULL) {
        event_base_free(cli.base);
    }
    tg_conf_unref(conf);
    curl_global_cleanup();
    return cli.failed ? 1 : 0;
}
