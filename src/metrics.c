/*
 * metrics.c - the metric registry, shard merge, Prometheus text exposition
 * and StatsD delta flush.  See metrics.h for the model; docs/METRICS.md for
 * every metric.
 */
#include "tollgate/metrics.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

static void sb_seconds_us(tg_buf *b, uint64_t us);
static void sb_double(tg_buf *b, double v);
static size_t label_pairs(tg_metric_labelset ls, size_t idx,
                          const char *names[3], const char *values[3]);
static uint64_t *merge(struct tg_metrics_shard *const *shards, size_t n);
static uint64_t shards_sum(struct tg_metrics_shard *const *shards, size_t n, size_t slot);

/* ---- tables ---------------------------------------------------------- */

#define TG_METRICS_STR_(x) #x
#define TG_METRICS_XSTR_(x) TG_METRICS_STR_(x)

static const struct {
    const char          *name;
    const char          *help;
    tg_metric_type       type;
    tg_metric_labelset   ls;
    int                  buckets;   /* index into bucket_sets, -1 none */
} decl[TG_M__COUNT] = {
#define TG_METRICS_DECL_(id, t, nm, hp, lset, b) \
    [TG_M_##id] = { nm, hp, TG_MT_##t, TG_ML_##lset, BS_##b },
#define BS_NOBUCKETS -1
#define BS_HTTP       0
#define BS_REDIS      1
    TG_METRICS(TG_METRICS_DECL_)
#undef TG_METRICS_DECL_
};

/* Bucket upper bounds in microseconds. */
static const uint64_t bs_http[] = {
    1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
    1000000, 2500000, 5000000, 10000000, 30000000,
};
static const uint64_t bs_redis[] = {
    100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000,
    250000, 500000, 1000000,
};
static const struct {
    const uint64_t *b;
    uint32_t        n;
} bucket_sets[] = {
    [BS_HTTP]  = { bs_http,  (uint32_t)TG_ARRAY_LEN(bs_http) },
    [BS_REDIS] = { bs_redis, (uint32_t)TG_ARRAY_LEN(bs_redis) },
};
_Static_assert(TG_ARRAY_LEN(bs_http) <= TG_METRICS_MAX_BUCKETS, "buckets");
_Static_assert(TG_ARRAY_LEN(bs_redis) <= TG_METRICS_MAX_BUCKETS, "buckets");

static const char *const type_names[] = { "counter", "gauge", "histogram" };

static const char *const status_values[TG_MS__COUNT] = {
#define TG_METRICS_ST_STR_(code) [TG_MS_##code] = #code,
    TG_METRICS_STATUSES(TG_METRICS_ST_STR_)
#undef TG_METRICS_ST_STR_
    [TG_MS_OTHER] = "other",
};
static const char *const redis_outcome_values[TG_MR__COUNT] = {
    "ok", "error", "timeout", "noscript",
};
static const char *const reload_values[TG_MRL__COUNT] = { "ok", "error" };
static const char *const store_mode_values[TG_MSM__COUNT] = {
    "redis", "local", "allow", "deny",
};
static const char *const decision_values[TG_MD__COUNT] = {
    "allowed", "limited", "unauthorized", "forbidden", "store_fallback",
    "store_deny",
};
static const char *const version_values[1] = { TG_VERSION };
static const char *const alert_channel_values[TG_MA_CHANNELS] = {
    "slack", "pagerduty", "webhook",
};
static const char *const alert_rule_values[TG_MA_RULES] = {
    "breaches", "redis_down", "breaker_open", "upstream_errors", "anomaly", "test",
};
static const char *const alert_outcome_values[TG_MAO__COUNT] = {
    "sent", "retried", "dropped",
};

/* ---- state ----------------------------------------------------------- */

struct tg_metrics_layout_ tg_metrics_layout_[TG_M__COUNT];

struct names {
    char  **v;
    size_t  n;
};

static struct {
    int           ready;
    struct names  tiers, routes, servers;
    size_t        nslots;               /* per shard */
    uint64_t     *global;               /* nslots; counters, gauge bits */
    tg_metrics_scrape_fn hook;
    void         *hook_arg;
    uint64_t      tick_cnt, tick_sum_us;   /* Redis latency at last tick */
} reg;

struct tg_metrics_snapshot {
    uint64_t *v;                        /* merged counters at last flush */
    size_t    nslots;
};

/* ---- registry -------------------------------------------------------- */

static void
names_copy(struct names *dst, const char *const *src, size_t n)
{
    dst->n = n;
    dst->v = tg_xcalloc(n ? n : 1, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        dst->v[i] = tg_xstrdup(src[i] ? src[i] : "");
    }
}

static void
names_free(struct names *d)
{
    for (size_t i = 0; i < d->n; i++) {
        free(d->v[i]);
    }
    free(d->v);
    d->v = NULL;
    d->n = 0;
}

static size_t
labelset_card(tg_metric_labelset ls)
{
    switch (ls) {
    case TG_ML_NONE:          return 1;
    case TG_ML_TIER:          return reg.tiers.n;
    case TG_ML_TIER_STATUS:   return reg.tiers.n * TG_MS__COUNT;
    case TG_ML_ROUTE:         return reg.routes.n;
    case TG_ML_SERVER:        return reg.servers.n;
    case TG_ML_REDIS_OUTCOME: return TG_MR__COUNT;
    case TG_ML_RELOAD_RESULT: return TG_MRL__COUNT;
    case TG_ML_STORE_MODE:    return TG_MSM__COUNT;
    case TG_ML_DECISION:      return TG_MD__COUNT;
    case TG_ML_VERSION:       return 1;
    case TG_ML_ALERT:         return TG_MA_CHANNELS * TG_MA_RULES * TG_MAO__COUNT;
    case TG_ML_ALERT_RULE:    return TG_MA_RULES - 1;
    case TG_ML__COUNT:        break;
    }
    return 0;
}

tg_rc
tg_metrics_init(const char *const *tiers, size_t ntiers,
                const char *const *routes, size_t nroutes,
                const char *const *servers, size_t nservers)
{
    size_t off = 0;

    if (reg.ready) {
        tg_error("metrics: tg_metrics_init called twice");
        return TG_ERR;
    }
    names_copy(&reg.tiers, tiers, ntiers);
    names_copy(&reg.routes, routes, nroutes);
    names_copy(&reg.servers, servers, nservers);

    for (int id = 0; id < TG_M__COUNT; id++) {
        struct tg_metrics_layout_ *l = &tg_metrics_layout_[id];
        size_t card = labelset_card(decl[id].ls);

        l->off = (uint32_t)off;
        l->n = (uint32_t)card;
        l->nb = 0;
        l->bounds_us = NULL;
        l->stride = 1;
        if (decl[id].type == TG_MT_HISTOGRAM) {
            l->nb = bucket_sets[decl[id].buckets].n;
            l->bounds_us = bucket_sets[decl[id].buckets].b;
            l->stride = l->nb + 2;
        }
        off += card * l->stride;
        if (off > UINT32_MAX) {
            tg_error("metrics: too many series (%zu tiers, %zu routes, %zu servers)",
                     ntiers, nroutes, nservers);
            tg_metrics_deinit();
            return TG_ERR;
        }
    }
    reg.nslots = off;
    reg.global = tg_xcalloc(off ? off : 1, sizeof(uint64_t));
    reg.ready = 1;
    tg_metrics_set_gauge(TG_M_BUILD_INFO, 0, 1.0);
    return TG_OK;
}

void
tg_metrics_deinit(void)
{
    names_free(&reg.tiers);
    names_free(&reg.routes);
    names_free(&reg.servers);
    free(reg.global);
    reg.global = NULL;
    reg.nslots = 0;
    reg.hook = NULL;
    reg.hook_arg = NULL;
    reg.tick_cnt = 0;
    reg.tick_sum_us = 0;
    reg.ready = 0;
    memset(tg_metrics_layout_, 0, sizeof(tg_metrics_layout_));
}

const char *
tg_metrics_name(tg_metric_id id)
{
    return (unsigned)id < TG_M__COUNT ? decl[id].name : NULL;
}

const char *
tg_metrics_help(tg_metric_id id)
{
    return (unsigned)id < TG_M__COUNT ? decl[id].help : NULL;
}

tg_metric_type
tg_metrics_type(tg_metric_id id)
{
    return decl[id].type;
}

tg_metric_labelset
tg_metrics_labelset(tg_metric_id id)
{
    return decl[id].ls;
}

size_t
tg_metrics_series(tg_metric_id id)
{
    return (unsigned)id < TG_M__COUNT ? tg_metrics_layout_[id].n : 0;
}

int
tg_metrics_lookup(const char *name)
{
    for (int id = 0; id < TG_M__COUNT; id++) {
        if (strcmp(decl[id].name, name) == 0) {
            return id;
        }
    }
    return -1;
}

size_t
tg_metrics_status_slot(int http_status)
{
    switch (http_status) {
#define TG_METRICS_ST_CASE_(code) case code: return TG_MS_##code;
    TG_METRICS_STATUSES(TG_METRICS_ST_CASE_)
#undef TG_METRICS_ST_CASE_
    default:
        return TG_MS_OTHER;
    }
}

/* ---- shards and global values ----------------------------------------- */

struct tg_metrics_shard *
tg_metrics_shard_create(void)
{
    struct tg_metrics_shard *s = tg_xcalloc(1, sizeof(*s));

    s->nslots = reg.nslots;
    s->slot = tg_xcalloc(reg.nslots ? reg.nslots : 1, sizeof(uint64_t));
    return s;
}

void
tg_metrics_shard_destroy(struct tg_metrics_shard *s)
{
    if (s == NULL) {
        return;
    }
    free(s->slot);
    free(s);
}

void
tg_metrics_global_add(tg_metric_id id, size_t label, uint64_t n)
{
    const struct tg_metrics_layout_ *l = &tg_metrics_layout_[id];

    if (reg.global == NULL || label >= l->n || decl[id].type != TG_MT_COUNTER) {
        return;
    }
    __atomic_fetch_add(&reg.global[l->off + label], n, __ATOMIC_RELAXED);
}

void
tg_metrics_set_gauge(tg_metric_id id, size_t label, double value)
{
    const struct tg_metrics_layout_ *l = &tg_metrics_layout_[id];
    uint64_t bits;

    if (reg.global == NULL || label >= l->n || decl[id].type != TG_MT_GAUGE) {
        return;
    }
    memcpy(&bits, &value, sizeof(bits));
    __atomic_store_n(&reg.global[l->off + label], bits, __ATOMIC_RELAXED);
}

void
tg_metrics_set_store_mode(enum tg_metric_store_mode mode)
{
    for (size_t m = 0; m < TG_MSM__COUNT; m++) {
        tg_metrics_set_gauge(TG_M_STORE_MODE, m, m == (size_t)mode ? 1.0 : 0.0);
    }
}

void
tg_metrics_set_scrape_hook(tg_metrics_scrape_fn fn, void *arg)
{
    reg.hook = fn;
    reg.hook_arg = arg;
}

void
tg_metrics_tick(struct tg_metrics_shard *const *shards, size_t n)
{
    const struct tg_metrics_layout_ *l = &tg_metrics_layout_[TG_M_REDIS_LATENCY];
    uint64_t cnt = 0, sum;

    if (!reg.ready) {
        return;
    }
    for (uint32_t b = 0; b <= l->nb; b++) {
        cnt += shards_sum(shards, n, l->off + b);
    }
    sum = shards_sum(shards, n, l->off + l->nb + 1);
    if (cnt > reg.tick_cnt) {
        tg_metrics_set_gauge(TG_M_REDIS_OP_LATENCY_MS, 0,
                             (double)(sum - reg.tick_sum_us) / 1000.0 /
                             (double)(cnt - reg.tick_cnt));
    }
    reg.tick_cnt = cnt;
    reg.tick_sum_us = sum;
}

static double
global_gauge(size_t slot)
{
    uint64_t bits = __atomic_load_n(&reg.global[slot], __ATOMIC_RELAXED);
    double v;

    memcpy(&v, &bits, sizeof(v));
    return v;
}

/* Sum of slot over the shards (wrapping; a gauge reads it as int64). */
static uint64_t
shards_sum(struct tg_metrics_shard *const *shards, size_t n, size_t slot)
{
    uint64_t v = 0;

    for (size_t i = 0; i < n; i++) {
        if (shards[i] != NULL && slot < shards[i]->nslots) {
            v += __atomic_load_n(&shards[i]->slot[slot], __ATOMIC_RELAXED);
        }
    }
    return v;
}

double
tg_metrics_value(struct tg_metrics_shard *const *shards, size_t n,
                 tg_metric_id id, size_t label)
{
    const struct tg_metrics_layout_ *l;
    size_t base;
    uint64_t c = 0;

    if ((unsigned)id >= TG_M__COUNT || !reg.ready) {
        return 0;
    }
    l = &tg_metrics_layout_[id];
    if (label >= l->n) {
        return 0;
    }
    base = l->off + label * l->stride;
    switch (decl[id].type) {
    case TG_MT_COUNTER:
        return (double)(shards_sum(shards, n, base) +
                        __atomic_load_n(&reg.global[base], __ATOMIC_RELAXED));
    case TG_MT_GAUGE:
        return global_gauge(base) + (double)(int64_t)shards_sum(shards, n, base);
    case TG_MT_HISTOGRAM:
        for (uint32_t b = 0; b <= l->nb; b++) {
            c += shards_sum(shards, n, base + b);
        }
        return (double)c;
    }
    return 0;
}

/* ---- Prometheus ------------------------------------------------------- */

/* Label value escaping of the text format: \ " and newline. */
static void
sb_prom_escaped(tg_buf *b, const char *s, int quote)
{
    for (; *s; s++) {
        switch (*s) {
        case '\\': tg_buf_add(b, "\\\\", 2); break;
        case '\n': tg_buf_add(b, "\\n", 2); break;
        case '"':
            if (quote) {
                tg_buf_add(b, "\\\"", 2);
                break;
            }
            /* fall through */
        default:   tg_buf_add(b, s, 1); break;
        }
    }
}

/* name{l1="v1",l2="v2",le="x"} — extra_le NULL for no le. */
static void
sb_prom_series(tg_buf *b, const char *name, const char *suffix,
               tg_metric_labelset ls, size_t idx, const char *le)
{
    const char *ln[3], *lv[3];
    size_t np = label_pairs(ls, idx, ln, lv);

    tg_buf_str(b, name);
    tg_buf_str(b, suffix);
    if (np == 0 && le == NULL) {
        return;
    }
    tg_buf_add(b, "{", 1);
    for (size_t i = 0; i < np; i++) {
        if (i > 0) {
            tg_buf_add(b, ",", 1);
        }
        tg_buf_str(b, ln[i]);
        tg_buf_add(b, "=\"", 2);
        sb_prom_escaped(b, lv[i], 1);
        tg_buf_add(b, "\"", 1);
    }
    if (le != NULL) {
        if (np > 0) {
            tg_buf_add(b, ",", 1);
        }
        tg_buf_str(b, "le=\"");
        tg_buf_str(b, le);
        tg_buf_add(b, "\"", 1);
    }
    tg_buf_add(b, "}", 1);
}

tg_rc
tg_metrics_render_prometheus(struct tg_metrics_shard *const *shards, size_t n,
                             struct evbuffer *out)
{
    tg_buf b = TG_BUF_INIT;
    uint64_t *m;
    int rc;

    if (!reg.ready) {
        return TG_ERR;
    }
    if (reg.hook != NULL) {
        reg.hook(reg.hook_arg);
    }
    m = merge(shards, n);

    for (int id = 0; id < TG_M__COUNT; id++) {
        const struct tg_metrics_layout_ *l = &tg_metrics_layout_[id];
        const char *name = decl[id].name;

        tg_buf_printf(&b, "# HELP %s ", name);
        sb_prom_escaped(&b, decl[id].help, 0);
        tg_buf_printf(&b, "\n# TYPE %s %s\n", name, type_names[decl[id].type]);

        for (size_t s = 0; s < l->n; s++) {
            size_t base = l->off + s * l->stride;

            if (decl[id].type == TG_MT_COUNTER) {
                sb_prom_series(&b, name, "", decl[id].ls, s, NULL);
                tg_buf_printf(&b, " %" PRIu64 "\n", m[base] +
                          __atomic_load_n(&reg.global[base], __ATOMIC_RELAXED));
            } else if (decl[id].type == TG_MT_GAUGE) {
                sb_prom_series(&b, name, "", decl[id].ls, s, NULL);
                tg_buf_add(&b, " ", 1);
                sb_double(&b, global_gauge(base) + (double)(int64_t)m[base]);
                tg_buf_add(&b, "\n", 1);
            } else {
                tg_buf le = TG_BUF_INIT;
                uint64_t cum = 0;

                for (uint32_t k = 0; k <= l->nb; k++) {
                    tg_buf_reset(&le);
                    if (k < l->nb) {
                        sb_seconds_us(&le, l->bounds_us[k]);
                    } else {
                        tg_buf_str(&le, "+Inf");
                    }
                    cum += m[base + k];
                    sb_prom_series(&b, name, "_bucket", decl[id].ls, s, le.p);
                    tg_buf_printf(&b, " %" PRIu64 "\n", cum);
                }
                tg_buf_free(&le);
                sb_prom_series(&b, name, "_sum", decl[id].ls, s, NULL);
                tg_buf_add(&b, " ", 1);
                sb_seconds_us(&b, m[base + l->nb + 1]);
                tg_buf_add(&b, "\n", 1);
                sb_prom_series(&b, name, "_count", decl[id].ls, s, NULL);
                tg_buf_printf(&b, " %" PRIu64 "\n", cum);
            }
        }
    }
    free(m);
    rc = evbuffer_add(out, b.p, b.len);
    tg_buf_free(&b);
    return rc == 0 ? TG_OK : TG_ERR;
}

/* ---- StatsD ----------------------------------------------------------- */

struct tg_metrics_snapshot *
tg_metrics_snapshot_create(void)
{
    struct tg_metrics_snapshot *snap = tg_xcalloc(1, sizeof(*snap));

    snap->nslots = reg.nslots;
    snap->v = tg_xcalloc(reg.nslots ? reg.nslots : 1, sizeof(uint64_t));
    return snap;
}

void
tg_metrics_snapshot_destroy(struct tg_metrics_snapshot *snap)
{
    if (snap == NULL) {
        return;
    }
    free(snap->v);
    free(snap);
}

struct statsd {
    tg_buf             dg;          /* datagram being packed */
    tg_buf             line;        /* line being built */
    const char        *prefix;
    int                tags;
    tg_metrics_emit_fn emit;
    void              *arg;
    size_t             emitted;
    uint64_t           dropped;
};

static void
statsd_flush(struct statsd *st)
{
    if (st->dg.len > 0) {
        st->emit(st->arg, st->dg.p, st->dg.len);
        st->emitted++;
        tg_buf_reset(&st->dg);
    }
}

static void
statsd_push(struct statsd *st)
{
    size_t len = st->line.len;

    if (len > TG_METRICS_STATSD_MAX) {
        st->dropped++;
        return;
    }
    if (st->dg.len > 0 && st->dg.len + 1 + len > TG_METRICS_STATSD_MAX) {
        statsd_flush(st);
    }
    if (st->dg.len > 0) {
        tg_buf_add(&st->dg, "\n", 1);
    }
    tg_buf_add(&st->dg, st->line.p, len);
}

/* Bytes a StatsD name or tag may not carry, replaced by '_'.  In a name
 * only [A-Za-z0-9_-] survive (a '.' would add a path level); a tag value
 * keeps '.' ':' '/' as DogStatsD allows. */
static void
sb_statsd_clean(tg_buf *b, const char *s, int tag)
{
    for (; *s; s++) {
        char c = *s;
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                 (c >= '0' && c <= '9') || c == '_' || c == '-' ||
                 (tag && (c == '.' || c == ':' || c == '/'));
        tg_buf_add(b, ok ? &c : "_", 1);
    }
}

/* Short StatsD name: "tollgate_" prefix, "_total" and (histograms)
 * "_seconds" suffixes removed. */
static void
sb_statsd_base(tg_buf *b, tg_metric_id id)
{
    const char *nm = decl[id].name;
    size_t len = strlen(nm);

    if (strncmp(nm, "tollgate_", 9) == 0) {
        nm += 9;
        len -= 9;
    }
    if (len > 6 && strcmp(nm + len - 6, "_total") == 0) {
        len -= 6;
    } else if (decl[id].type == TG_MT_HISTOGRAM && len > 8 &&
               strcmp(nm + len - 8, "_seconds") == 0) {
        len -= 8;
    }
    tg_buf_add(b, nm, len);
}

/* Start a line: prefix.base[.labels][.suffix]: */
static void
statsd_begin(struct statsd *st, tg_metric_id id, size_t idx, const char *suffix)
{
    const char *ln[3], *lv[3];
    size_t np = label_pairs(decl[id].ls, idx, ln, lv);

    tg_buf_reset(&st->line);
    if (st->prefix != NULL && st->prefix[0] != '\0') {
        tg_buf_str(&st->line, st->prefix);
        tg_buf_add(&st->line, ".", 1);
    }
    sb_statsd_base(&st->line, id);
    if (!st->tags) {
        for (size_t i = 0; i < np; i++) {
            tg_buf_add(&st->line, ".", 1);
            sb_statsd_clean(&st->line, lv[i], 0);
        }
    }
    tg_buf_str(&st->line, suffix);
    tg_buf_add(&st->line, ":", 1);
}

/* End a line: value is already in; add |type and tags, then pack it. */
static void
statsd_end(struct statsd *st, tg_metric_id id, size_t idx, const char *type)
{
    const char *ln[3], *lv[3];
    size_t np = label_pairs(decl[id].ls, idx, ln, lv);

    tg_buf_str(&st->line, type);
    if (st->tags && np > 0) {
        tg_buf_add(&st->line, "|#", 2);
        for (size_t i = 0; i < np; i++) {
            if (i > 0) {
                tg_buf_add(&st->line, ",", 1);
            }
            tg_buf_str(&st->line, ln[i]);
            tg_buf_add(&st->line, ":", 1);
            sb_statsd_clean(&st->line, lv[i], 1);
        }
    }
    statsd_push(st);
}

static uint64_t
delta(uint64_t now, uint64_t before)
{
    return now >= before ? now - before : now;   /* reset: count afresh */
}

size_t
tg_metrics_statsd_delta(struct tg_metrics_shard *const *shards, size_t n,
                        struct tg_metrics_snapshot *prev, const char *prefix,
                        int dogstatsd_tags, tg_metrics_emit_fn emit, void *arg)
{
    struct statsd st;
    uint64_t *m;

    if (!reg.ready || prev == NULL || prev->nslots != reg.nslots || emit == NULL) {
        return 0;
    }
    if (reg.hook != NULL) {
        reg.hook(reg.hook_arg);
    }
    memset(&st, 0, sizeof(st));
    st.prefix = prefix;
    st.tags = dogstatsd_tags;
    st.emit = emit;
    st.arg = arg;
    tg_buf_reserve(&st.dg, TG_METRICS_STATSD_MAX);

    m = merge(shards, n);
    for (int id = 0; id < TG_M__COUNT; id++) {
        const struct tg_metrics_layout_ *l = &tg_metrics_layout_[id];

        for (size_t s = 0; s < l->n; s++) {
            size_t base = l->off + s * l->stride;

            if (decl[id].type == TG_MT_COUNTER) {
                uint64_t now = m[base] +
                               __atomic_load_n(&reg.global[base], __ATOMIC_RELAXED);
                uint64_t d = delta(now, prev->v[base]);

                prev->v[base] = now;
                if (d == 0) {
                    continue;
                }
                statsd_begin(&st, id, s, "");
                tg_buf_printf(&st.line, "%" PRIu64, d);
                statsd_end(&st, id, s, "|c");
            } else if (decl[id].type == TG_MT_GAUGE) {
                double v = global_gauge(base) + (double)(int64_t)m[base];

                if (isnan(v) || isinf(v)) {
                    continue;
                }
                if (v < 0) {
                    /* "-x|g" is a relative change in StatsD: set 0 first. */
                    statsd_begin(&st, id, s, "");
                    tg_buf_str(&st.line, "0");
                    statsd_end(&st, id, s, "|g");
                }
                statsd_begin(&st, id, s, "");
                sb_double(&st.line, v);
                statsd_end(&st, id, s, "|g");
            } else {
                uint64_t cnt = 0, dsum;

                for (uint32_t k = 0; k <= l->nb; k++) {
                    cnt += delta(m[base + k], prev->v[base + k]);
                    prev->v[base + k] = m[base + k];
                }
                dsum = delta(m[base + l->nb + 1], prev->v[base + l->nb + 1]);
                prev->v[base + l->nb + 1] = m[base + l->nb + 1];
                if (cnt == 0) {
                    continue;
                }
                statsd_begin(&st, id, s, ".count");
                tg_buf_printf(&st.line, "%" PRIu64, cnt);
                statsd_end(&st, id, s, "|c");
                statsd_begin(&st, id, s, ".sum_ms");
                tg_buf_printf(&st.line, "%" PRIu64, dsum / 1000);
                if (dsum % 1000 != 0) {
                    char frac[8];
                    size_t fl;

                    snprintf(frac, sizeof(frac), ".%03u", (unsigned)(dsum % 1000));
                    fl = strlen(frac);
                    while (frac[fl - 1] == '0') {
                        fl--;
                    }
                    tg_buf_add(&st.line, frac, fl);
                }
                statsd_end(&st, id, s, "|c");
            }
        }
    }
    statsd_flush(&st);
    free(m);
    tg_buf_free(&st.dg);
    tg_buf_free(&st.line);
    if (st.dropped > 0) {
        tg_warn("metrics: %" PRIu64 " StatsD line(s) over %d bytes dropped",
                st.dropped, TG_METRICS_STATSD_MAX);
        tg_metrics_global_add(TG_M_STATSD_DROPPED, 0, st.dropped);
    }
    return st.emitted;
}

/* ---- helpers ---------------------------------------------------------- */

/* Label names and values of series idx of label set ls; returns how many. */
static size_t
label_pairs(tg_metric_labelset ls, size_t idx, const char *names[3],
            const char *values[3])
{
    switch (ls) {
    case TG_ML_NONE:
        return 0;
    case TG_ML_TIER:
        names[0] = "tier";
        values[0] = reg.tiers.v[idx];
        return 1;
    case TG_ML_TIER_STATUS:
        names[0] = "tier";
        values[0] = reg.tiers.v[idx / TG_MS__COUNT];
        names[1] = "status";
        values[1] = status_values[idx % TG_MS__COUNT];
        return 2;
    case TG_ML_ROUTE:
        names[0] = "route";
        values[0] = reg.routes.v[idx];
        return 1;
    case TG_ML_SERVER:
        names[0] = "server";
        values[0] = reg.servers.v[idx];
        return 1;
    case TG_ML_REDIS_OUTCOME:
        names[0] = "outcome";
        values[0] = redis_outcome_values[idx];
        return 1;
    case TG_ML_RELOAD_RESULT:
        names[0] = "result";
        values[0] = reload_values[idx];
        return 1;
    case TG_ML_STORE_MODE:
        names[0] = "mode";
        values[0] = store_mode_values[idx];
        return 1;
    case TG_ML_DECISION:
        names[0] = "outcome";
        values[0] = decision_values[idx];
        return 1;
    case TG_ML_VERSION:
        names[0] = "version";
        values[0] = version_values[idx];
        return 1;
    case TG_ML_ALERT:
        names[0] = "channel";
        values[0] = alert_channel_values[idx / (TG_MA_RULES * TG_MAO__COUNT)];
        names[1] = "rule";
        values[1] = alert_rule_values[idx / TG_MAO__COUNT % TG_MA_RULES];
        names[2] = "outcome";
        values[2] = alert_outcome_values[idx % TG_MAO__COUNT];
        return 3;
    case TG_ML_ALERT_RULE:
        names[0] = "rule";
        values[0] = alert_rule_values[idx];
        return 1;
    case TG_ML__COUNT:
        break;
    }
    return 0;
}

/* Merged shard slots (caller frees).  Global values are added by the
 * callers, by type. */
static uint64_t *
merge(struct tg_metrics_shard *const *shards, size_t n)
{
    uint64_t *m = tg_xcalloc(reg.nslots ? reg.nslots : 1, sizeof(uint64_t));

    for (size_t i = 0; i < n; i++) {
        const struct tg_metrics_shard *s = shards[i];
        size_t lim;

        if (s == NULL) {
            continue;
        }
        lim = s->nslots < reg.nslots ? s->nslots : reg.nslots;
        for (size_t k = 0; k < lim; k++) {
            m[k] += __atomic_load_n(&s->slot[k], __ATOMIC_RELAXED);
        }
    }
    return m;
}

/* Microseconds as decimal seconds, exact, no trailing zeros ("0.0025"). */
static void
sb_seconds_us(tg_buf *b, uint64_t us)
{
    char frac[8];
    size_t fl;

    tg_buf_printf(b, "%" PRIu64, us / 1000000);
    if (us % 1000000 == 0) {
        return;
    }
    snprintf(frac, sizeof(frac), ".%06u", (unsigned)(us % 1000000));
    fl = strlen(frac);
    while (frac[fl - 1] == '0') {
        fl--;
    }
    tg_buf_add(b, frac, fl);
}

/* A sample value: shortest round-trip-ish form; NaN and infinities as the
 * text format spells them. */
static void
sb_double(tg_buf *b, double v)
{
    if (isnan(v)) {
        tg_buf_str(b, "NaN");
    } else if (isinf(v)) {
        tg_buf_str(b, v > 0 ? "+Inf" : "-Inf");
    } else if (v == 0) {
        tg_buf_str(b, "0");
    } else {
        tg_buf_printf(b, "%.15g", v);
    }
}
