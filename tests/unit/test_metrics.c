/*
 * test_metrics.c - the metric registry: shard merge to exact sums, labels
 * of the configured tiers/routes/servers, histogram buckets, escaping, a
 * validator of the Prometheus text format (and promtool when present),
 * StatsD deltas, packing and tags, and the Grafana dashboard's metric
 * names against the registry.
 */
#include <criterion/criterion.h>

#include <ctype.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/buffer.h>

#include "tollgate/metrics.h"

static const char *const tiers3[] = { "basic", "pro", "enterprise" };
static const char *const routes2[] = { "search", "upload" };
static const char *const servers2[] = { "10.0.0.1:8000", "10.0.0.2:8000" };

static void
setup3(void)
{
    cr_assert_eq(tg_metrics_init(tiers3, 3, routes2, 2, servers2, 2), TG_OK);
}

static void
teardown(void)
{
    tg_metrics_deinit();
}

/* Render the shards to a NUL-terminated malloc'd string. */
static char *
render(struct tg_metrics_shard *const *shards, size_t n)
{
    struct evbuffer *out = evbuffer_new();
    size_t len;
    char *s;

    cr_assert_eq(tg_metrics_render_prometheus(shards, n, out), TG_OK);
    len = evbuffer_get_length(out);
    s = malloc(len + 1);
    evbuffer_remove(out, s, len);
    s[len] = '\0';
    evbuffer_free(out);
    return s;
}

/* True if text holds line as a whole line. */
static int
has_line(const char *text, const char *line)
{
    size_t n = strlen(line);

    for (const char *p = text; (p = strstr(p, line)) != NULL; p++) {
        if ((p == text || p[-1] == '\n') && (p[n] == '\n' || p[n] == '\0')) {
            return 1;
        }
    }
    return 0;
}

#define assert_line(text, line) \
    cr_assert(has_line((text), (line)), "missing line: %s\n--- in ---\n%s", (line), (text))

/* ======================================================================
 * A validator of the text exposition format 0.0.4.  Returns NULL when
 * text is valid, else a static message naming the first bad line.
 * ==================================================================== */

struct fam {
    char name[128];
    char type[16];
    int  help, typed, samples;
};

struct hseries {
    char   key[512];        /* family + labels without le */
    double last_le;
    double last_count;
    double inf;             /* -1 until the +Inf bucket */
    double count;           /* -1 until _count */
    int    nb;
};

static char vmsg[1024];

static int
name_ok(const char *s, size_t n, int colon)
{
    if (n == 0 || !(isalpha((unsigned char)s[0]) || s[0] == '_' || (colon && s[0] == ':'))) {
        return 0;
    }
    for (size_t i = 1; i < n; i++) {
        if (!(isalnum((unsigned char)s[i]) || s[i] == '_' || (colon && s[i] == ':'))) {
            return 0;
        }
    }
    return 1;
}

static int
value_ok(const char *s, double *v)
{
    char *end;

    if (strcmp(s, "+Inf") == 0 || strcmp(s, "-Inf") == 0 || strcmp(s, "NaN") == 0) {
        *v = 0;
        return 1;
    }
    if (*s == '\0' || isspace((unsigned char)*s)) {
        return 0;
    }
    *v = strtod(s, &end);
    return *end == '\0';
}

static struct fam *
fam_find(struct fam *f, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++) {
        if (strcmp(f[i].name, name) == 0) {
            return &f[i];
        }
    }
    return NULL;
}

static void __attribute__((format(printf, 1, 2)))
vfail(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(vmsg, sizeof(vmsg), fmt, ap);
    va_end(ap);
}

/* Append s to the NUL-terminated key of capacity cap, truncating. */
static void
keycat(char *key, size_t cap, const char *s)
{
    size_t kl = strlen(key);

    while (*s && kl + 1 < cap) {
        key[kl++] = *s++;
    }
    key[kl] = '\0';
}

#define VFAIL(...) do { vfail(__VA_ARGS__); goto done; } while (0)

static const char *
validate_exposition(const char *text)
{
    static struct fam fams[256];
    static struct hseries hs[2048];
    size_t nf = 0, nh = 0, lineno = 0;
    const char *p = text, *ret = vmsg;
    char line[4096];

    vmsg[0] = '\0';
    while (*p) {
        const char *nl = strchr(p, '\n');
        size_t len;

        lineno++;
        if (nl == NULL) {
            VFAIL("line %zu: no final newline", lineno);
        }
        len = (size_t)(nl - p);
        if (len >= sizeof(line)) {
            VFAIL("line %zu: too long", lineno);
        }
        memcpy(line, p, len);
        line[len] = '\0';
        p = nl + 1;

        if (len == 0) {
            VFAIL("line %zu: empty line", lineno);
        }
        if (line[0] == '#') {
            char kw[8], name[256];
            int off = 0;
            struct fam *f;

            if (sscanf(line, "# %7s %255s %n", kw, name, &off) < 2) {
                VFAIL("line %zu: bad comment: %s", lineno, line);
            }
            if (!name_ok(name, strlen(name), 1)) {
                VFAIL("line %zu: bad family name %s", lineno, name);
            }
            f = fam_find(fams, nf, name);
            if (f == NULL) {
                if (nf == TG_ARRAY_LEN(fams)) {
                    VFAIL("too many families");
                }
                f = &fams[nf++];
                memset(f, 0, sizeof(*f));
                snprintf(f->name, sizeof(f->name), "%.127s", name);
            }
            if (f->samples) {
                VFAIL("line %zu: %s after samples of %s", lineno, kw, name);
            }
            if (strcmp(kw, "HELP") == 0) {
                if (f->help++) {
                    VFAIL("line %zu: second HELP for %s", lineno, name);
                }
            } else if (strcmp(kw, "TYPE") == 0) {
                const char *t = line + off;

                if (f->typed++) {
                    VFAIL("line %zu: second TYPE for %s", lineno, name);
                }
                if (strcmp(t, "counter") && strcmp(t, "gauge") && strcmp(t, "histogram") &&
                    strcmp(t, "summary") && strcmp(t, "untyped")) {
                    VFAIL("line %zu: bad type %s", lineno, t);
                }
                snprintf(f->type, sizeof(f->type), "%s", t);
            } else {
                VFAIL("line %zu: unknown comment keyword %s", lineno, kw);
            }
            continue;
        }

        /* A sample: name[{labels}] value */
        {
            char name[256], fname[256], key[512], le[64];
            const char *q = line, *sfx = NULL;
            size_t nlen;
            struct fam *f;
            double v, lev = 0;
            int has_le = 0;

            while (*q && *q != '{' && *q != ' ') {
                q++;
            }
            nlen = (size_t)(q - line);
            if (!name_ok(line, nlen, 1) || nlen >= sizeof(name)) {
                VFAIL("line %zu: bad metric name: %s", lineno, line);
            }
            memcpy(name, line, nlen);
            name[nlen] = '\0';
            snprintf(key, sizeof(key), "%s", name);

            f = fam_find(fams, nf, name);
            if (f == NULL) {
                static const char *const sfxs[] = { "_bucket", "_sum", "_count" };

                for (size_t i = 0; i < 3 && f == NULL; i++) {
                    size_t sl = strlen(sfxs[i]);

                    if (nlen > sl && strcmp(name + nlen - sl, sfxs[i]) == 0) {
                        memcpy(fname, name, nlen - sl);
                        fname[nlen - sl] = '\0';
                        f = fam_find(fams, nf, fname);
                        if (f != NULL && strcmp(f->type, "histogram") == 0) {
                            sfx = sfxs[i];
                        } else {
                            f = NULL;
                        }
                    }
                }
                if (f == NULL) {
                    VFAIL("line %zu: sample %s without HELP/TYPE", lineno, name);
                }
                snprintf(key, sizeof(key), "%s", f->name);
            } else if (strcmp(f->type, "histogram") == 0) {
                VFAIL("line %zu: bare sample %s of a histogram", lineno, name);
            }
            if (!f->help || !f->typed) {
                VFAIL("line %zu: %s before its HELP and TYPE", lineno, name);
            }
            f->samples++;

            if (*q == '{') {
                q++;
                while (*q != '}') {
                    const char *ls = q;
                    char lname[128];
                    size_t ll;

                    while (*q && *q != '=') {
                        q++;
                    }
                    ll = (size_t)(q - ls);
                    if (!name_ok(ls, ll, 0) || ll >= sizeof(lname) || q[0] != '=' ||
                        q[1] != '"') {
                        VFAIL("line %zu: bad label: %s", lineno, line);
                    }
                    memcpy(lname, ls, ll);
                    lname[ll] = '\0';
                    q += 2;
                    {
                        char val[512];
                        size_t vl = 0;

                        while (*q != '"') {
                            if (*q == '\0') {
                                VFAIL("line %zu: unterminated label value", lineno);
                            }
                            if (*q == '\\') {
                                q++;
                                if (*q != '\\' && *q != '"' && *q != 'n') {
                                    VFAIL("line %zu: bad escape \\%c", lineno, *q);
                                }
                            }
                            if (vl + 1 < sizeof(val)) {
                                val[vl++] = *q;
                            }
                            q++;
                        }
                        val[vl] = '\0';
                        q++;
                        if (strcmp(lname, "le") == 0 && sfx != NULL &&
                            strcmp(sfx, "_bucket") == 0) {
                            has_le = 1;
                            snprintf(le, sizeof(le), "%.63s", val);
                            if (!value_ok(le, &lev)) {
                                VFAIL("line %zu: bad le %s", lineno, le);
                            }
                            if (strcmp(le, "+Inf") == 0) {
                                lev = 1e308;
                            }
                        } else {
                            keycat(key, sizeof(key), ",");
                            keycat(key, sizeof(key), lname);
                            keycat(key, sizeof(key), "=");
                            keycat(key, sizeof(key), val);
                        }
                    }
                    if (*q == ',') {
                        q++;
                    } else if (*q != '}') {
                        VFAIL("line %zu: expected , or }: %s", lineno, line);
                    }
                }
                q++;
            }
            if (*q != ' ') {
                VFAIL("line %zu: no space before value: %s", lineno, line);
            }
            q++;
            if (!value_ok(q, &v)) {
                VFAIL("line %zu: bad value '%s'", lineno, q);
            }

            if (sfx != NULL) {
                struct hseries *h = NULL;

                for (size_t i = 0; i < nh; i++) {
                    if (strcmp(hs[i].key, key) == 0) {
                        h = &hs[i];
                    }
                }
                if (h == NULL) {
                    if (nh == TG_ARRAY_LEN(hs)) {
                        VFAIL("too many histogram series");
                    }
                    h = &hs[nh++];
                    snprintf(h->key, sizeof(h->key), "%s", key);
                    h->last_le = -1e308;
                    h->last_count = 0;
                    h->inf = -1;
                    h->count = -1;
                    h->nb = 0;
                }
                if (strcmp(sfx, "_bucket") == 0) {
                    if (!has_le) {
                        VFAIL("line %zu: bucket without le", lineno);
                    }
                    if (h->inf >= 0) {
                        VFAIL("line %zu: bucket after +Inf", lineno);
                    }
                    if (lev <= h->last_le) {
                        VFAIL("line %zu: le not increasing", lineno);
                    }
                    if (v < h->last_count) {
                        VFAIL("line %zu: buckets not cumulative (%g < %g)", lineno, v,
                              h->last_count);
                    }
                    h->last_le = lev;
                    h->last_count = v;
                    h->nb++;
                    if (strcmp(le, "+Inf") == 0) {
                        h->inf = v;
                    }
                } else if (strcmp(sfx, "_count") == 0) {
                    h->count = v;
                }
            }
        }
    }
    for (size_t i = 0; i < nh; i++) {
        if (hs[i].inf < 0) {
            VFAIL("histogram %s has no +Inf bucket", hs[i].key);
        }
        if (hs[i].count != hs[i].inf) {
            VFAIL("histogram %s: _count %g != +Inf %g", hs[i].key, hs[i].count, hs[i].inf);
        }
    }
    for (size_t i = 0; i < nf; i++) {
        if (!fams[i].help || !fams[i].typed) {
            VFAIL("family %s lacks HELP or TYPE", fams[i].name);
        }
    }
    ret = NULL;
done:
    return ret;
}

#define assert_valid(text) do {                                              \
        const char *verr_ = validate_exposition(text);                        \
        cr_assert_null(verr_, "invalid exposition: %s\n--- text ---\n%s",     \
                       verr_, (text));                                        \
    } while (0)

Test(validator, rejects_bad_input)
{
    static const char *const bad[] = {
        "x 1\n",                                                     /* no HELP */
        "# HELP x h\n# TYPE x counter\n1x 1\n",
        "# HELP x h\n# TYPE x counter\nx{a=\"b} 1\n",
        "# HELP x h\n# TYPE x counter\nx{a=\"\\t\"} 1\n",
        "# HELP x h\n# TYPE x counter\nx 1\n# HELP x again\n",
        "# HELP x h\n# TYPE x counter\nx one\n",
        "# HELP x h\n# TYPE x counter\nx 1",
        "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
        "h_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",                /* not cumulative */
        "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\n"
        "h_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",                /* +Inf != count */
        "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        "# HELP h h\n# TYPE h histogram\nh_bucket{le=\"2\"} 1\n"
        "h_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",   /* le order */
    };

    for (size_t i = 0; i < TG_ARRAY_LEN(bad); i++) {
        cr_assert_not_null(validate_exposition(bad[i]), "accepted:\n%s", bad[i]);
    }
    cr_assert_null(validate_exposition(
        "# HELP h h\n# TYPE h histogram\nh_bucket{a=\"x\",le=\"1\"} 1\n"
        "h_bucket{a=\"x\",le=\"+Inf\"} 2\nh_sum{a=\"x\"} 1.5\nh_count{a=\"x\"} 2\n"
        "# HELP c c\n# TYPE c counter\nc{a=\"q\\\"\\\\\\n\"} 3\n"));
}

/* ======================================================================
 * Registry and Prometheus
 * ==================================================================== */

Test(registry, declared_once_with_valid_names, .init = setup3, .fini = teardown)
{
    for (int id = 0; id < TG_M__COUNT; id++) {
        const char *n = tg_metrics_name(id);

        cr_assert(name_ok(n, strlen(n), 1), "bad name %s", n);
        cr_assert_eq(tg_metrics_lookup(n), id, "%s declared twice", n);
        cr_assert(strlen(tg_metrics_help(id)) > 0);
    }
    /* The original design's names, exactly. */
    cr_assert_eq(tg_metrics_lookup("rate_limiter_tokens_consumed"), TG_M_TOKENS_CONSUMED);
    cr_assert_eq(tg_metrics_lookup("rate_limiter_breaches"), TG_M_BREACHES);
    cr_assert_eq(tg_metrics_lookup("redis_operation_latency_ms"), TG_M_REDIS_OP_LATENCY_MS);
    cr_assert_eq(tg_metrics_type(TG_M_TOKENS_CONSUMED), TG_MT_COUNTER);
    cr_assert_eq(tg_metrics_type(TG_M_REDIS_OP_LATENCY_MS), TG_MT_GAUGE);
    cr_assert_eq(tg_metrics_lookup("nope"), -1);
    cr_assert_eq(tg_metrics_series(TG_M_REQUESTS), 3 * TG_MS__COUNT);
    cr_assert_eq(tg_metrics_series(TG_M_UPSTREAM_HEALTH), 2);
    cr_assert_eq(tg_metrics_series(TG_M_ROUTE_REQUESTS), 2);
    cr_assert_eq(tg_metrics_init(tiers3, 3, NULL, 0, NULL, 0), TG_ERR, "double init");
}

Test(registry, status_slots)
{
    cr_assert_eq(tg_metrics_status_slot(200), TG_MS_200);
    cr_assert_eq(tg_metrics_status_slot(429), TG_MS_429);
    cr_assert_eq(tg_metrics_status_slot(504), TG_MS_504);
    cr_assert_eq(tg_metrics_status_slot(418), TG_MS_OTHER);
    cr_assert_eq(tg_metrics_status_slot(0), TG_MS_OTHER);
    cr_assert_eq(tg_metrics_tier_status(2, 503), 2 * TG_MS__COUNT + TG_MS_503);
}

Test(prometheus, three_shards_merge_exactly, .init = setup3, .fini = teardown)
{
    struct tg_metrics_shard *sh[3];
    char *text;

    for (int i = 0; i < 3; i++) {
        sh[i] = tg_metrics_shard_create();
    }
    /* shard i counts (i+1)*k of everything */
    for (int i = 0; i < 3; i++) {
        for (int k = 0; k < (i + 1) * 10; k++) {
            tg_metric_inc(sh[i], TG_M_REQUESTS, tg_metrics_tier_status(1, 200));
        }
        tg_metric_add(sh[i], TG_M_REQUESTS, tg_metrics_tier_status(1, 429), (uint64_t)(i + 1));
        tg_metric_add(sh[i], TG_M_REQUESTS, tg_metrics_tier_status(0, 418), 7);
        tg_metric_add(sh[i], TG_M_TOKENS_CONSUMED, 2, 1000000007ULL);
        tg_metric_inc(sh[i], TG_M_BREACHES, 0);
        tg_metric_inc(sh[i], TG_M_REDIS_CALLS, TG_MR_TIMEOUT);
        tg_metric_inc(sh[i], TG_M_LIMIT_DECISIONS, TG_MD_STORE_FALLBACK);
        tg_metric_gauge_add(sh[i], TG_M_CONNECTIONS_OPEN, 0, 5);
        tg_metric_gauge_add(sh[i], TG_M_CONNECTIONS_OPEN, 0, -2);
        tg_metric_inc(sh[i], TG_M_ROUTE_REQUESTS, 1);
    }
    /* out of range: dropped, not written */
    tg_metric_inc(sh[0], TG_M_BREACHES, 3);
    tg_metric_inc(sh[0], TG_M_REQUESTS, tg_metrics_tier_status(3, 200));
    tg_metrics_global_inc(TG_M_CONFIG_RELOADS, TG_MRL_ERROR);
    tg_metrics_global_add(TG_M_CONFIG_RELOADS, TG_MRL_OK, 4);
    tg_metrics_global_inc(TG_M_BREACHES, 0);            /* global + shards */

    cr_assert_eq(tg_metrics_value(sh, 3, TG_M_REQUESTS, tg_metrics_tier_status(1, 200)), 60);
    cr_assert_eq(tg_metrics_value(sh, 3, TG_M_TOKENS_CONSUMED, 2), 3000000021.0);
    cr_assert_eq(tg_metrics_value(sh, 3, TG_M_CONNECTIONS_OPEN, 0), 9);
    cr_assert_eq(tg_metrics_value(sh, 3, TG_M_BREACHES, 0), 4);

    text = render(sh, 3);
    assert_valid(text);
    assert_line(text, "tollgate_requests_total{tier=\"pro\",status=\"200\"} 60");
    assert_line(text, "tollgate_requests_total{tier=\"pro\",status=\"429\"} 6");
    assert_line(text, "tollgate_requests_total{tier=\"basic\",status=\"other\"} 21");
    assert_line(text, "tollgate_requests_total{tier=\"enterprise\",status=\"200\"} 0");
    assert_line(text, "rate_limiter_tokens_consumed{tier=\"enterprise\"} 3000000021");
    assert_line(text, "rate_limiter_tokens_consumed{tier=\"basic\"} 0");
    assert_line(text, "rate_limiter_breaches{tier=\"basic\"} 4");
    assert_line(text, "tollgate_redis_calls_total{outcome=\"timeout\"} 3");
    assert_line(text, "tollgate_redis_calls_total{outcome=\"noscript\"} 0");
    assert_line(text, "tollgate_limit_decisions_total{outcome=\"store_fallback\"} 3");
    assert_line(text, "tollgate_connections_open 9");
    assert_line(text, "tollgate_route_requests_total{route=\"upload\"} 3");
    assert_line(text, "tollgate_route_requests_total{route=\"search\"} 0");
    assert_line(text, "tollgate_config_reloads_total{result=\"ok\"} 4");
    assert_line(text, "tollgate_config_reloads_total{result=\"error\"} 1");
    assert_line(text, "# TYPE rate_limiter_breaches counter");
    assert_line(text, "# TYPE tollgate_request_duration_seconds histogram");
    assert_line(text, "# TYPE redis_operation_latency_ms gauge");
    cr_assert_null(strstr(text, "rate_limiter_breaches_total"));
    free(text);
    for (int i = 0; i < 3; i++) {
        tg_metrics_shard_destroy(sh[i]);
    }
}

Test(prometheus, gauges_and_labels, .init = setup3, .fini = teardown)
{
    struct tg_metrics_shard *sh = tg_metrics_shard_create();
    char *text;

    tg_metrics_set_gauge(TG_M_UPSTREAM_HEALTH, 0, 1);
    tg_metrics_set_gauge(TG_M_UPSTREAM_HEALTH, 1, 0);
    tg_metrics_set_gauge(TG_M_UPSTREAM_BREAKER, 1, 2);
    tg_metrics_set_gauge(TG_M_REDIS_OP_LATENCY_MS, 0, 10.5);
    tg_metrics_set_gauge(TG_M_REQUESTS, 0, 99);         /* not a gauge: ignored */
    tg_metrics_set_gauge(TG_M_UPSTREAM_HEALTH, 2, 1);   /* out of range: ignored */
    tg_metrics_set_store_mode(TG_MSM_LOCAL);

    text = render(&sh, 1);
    assert_valid(text);
    assert_line(text, "redis_operation_latency_ms 10.5");
    assert_line(text, "tollgate_upstream_health{server=\"10.0.0.1:8000\"} 1");
    assert_line(text, "tollgate_upstream_health{server=\"10.0.0.2:8000\"} 0");
    assert_line(text, "tollgate_upstream_breaker_state{server=\"10.0.0.1:8000\"} 0");
    assert_line(text, "tollgate_upstream_breaker_state{server=\"10.0.0.2:8000\"} 2");
    assert_line(text, "tollgate_store_mode{mode=\"redis\"} 0");
    assert_line(text, "tollgate_store_mode{mode=\"local\"} 1");
    assert_line(text, "tollgate_store_mode{mode=\"allow\"} 0");
    assert_line(text, "tollgate_store_mode{mode=\"deny\"} 0");
    assert_line(text, "tollgate_build_info{version=\"" TG_VERSION "\"} 1");
    assert_line(text, "tollgate_requests_total{tier=\"basic\",status=\"200\"} 0");
    assert_line(text, "# HELP tollgate_upstream_breaker_state Circuit breaker of the upstream "
                      "server: 0 closed, 1 open, 2 half-open.");
    /* the label set of every configured tier, route and server */
    for (size_t t = 0; t < 3; t++) {
        char want[128];

        snprintf(want, sizeof(want), "rate_limiter_breaches{tier=\"%s\"} 0", tiers3[t]);
        assert_line(text, want);
        snprintf(want, sizeof(want),
                 "tollgate_request_duration_seconds_bucket{tier=\"%s\",le=\"+Inf\"} 0",
                 tiers3[t]);
        assert_line(text, want);
    }
    assert_line(text, "tollgate_upstream_duration_seconds_count{server=\"10.0.0.2:8000\"} 0");
    free(text);
    tg_metrics_shard_destroy(sh);
}

static int hook_calls;

static void
hook(void *arg)
{
    hook_calls++;
    tg_metrics_set_gauge(TG_M_REDIS_OP_LATENCY_MS, 0, *(double *)arg);
}

Test(prometheus, scrape_hook_refreshes_gauges, .init = setup3, .fini = teardown)
{
    double lat = 0.25;
    char *text;

    tg_metrics_set_scrape_hook(hook, &lat);
    text = render(NULL, 0);
    assert_line(text, "redis_operation_latency_ms 0.25");
    free(text);
    lat = 3;
    text = render(NULL, 0);
    assert_line(text, "redis_operation_latency_ms 3");
    free(text);
    cr_assert_eq(hook_calls, 2);
}

/* Three labels: channel, rule, outcome; the open incidents per rule. */
Test(prometheus, alert_series, .init = setup3, .fini = teardown)
{
    char *text;

    cr_assert_eq(tg_metrics_series(TG_M_ALERTS), 3 * 6 * 3);
    cr_assert_eq(tg_metrics_series(TG_M_ALERTS_OPEN), 5);
    tg_metrics_global_inc(TG_M_ALERTS, tg_metrics_alert(1, 2, TG_MAO_SENT));
    tg_metrics_global_add(TG_M_ALERTS, tg_metrics_alert(2, 5, TG_MAO_DROPPED), 3);
    tg_metrics_global_inc(TG_M_ALERTS, tg_metrics_alert(0, 4, TG_MAO_SENT));
    tg_metrics_set_gauge(TG_M_ALERTS_OPEN, 3, 2);
    text = render(NULL, 0);
    assert_valid(text);
    assert_line(text, "tollgate_alerts_total{channel=\"pagerduty\",rule=\"breaker_open\","
                "outcome=\"sent\"} 1");
    assert_line(text, "tollgate_alerts_total{channel=\"webhook\",rule=\"test\","
                "outcome=\"dropped\"} 3");
    assert_line(text, "tollgate_alerts_total{channel=\"slack\",rule=\"breaches\","
                "outcome=\"retried\"} 0");
    assert_line(text, "tollgate_alerts_total{channel=\"slack\",rule=\"anomaly\","
                "outcome=\"sent\"} 1");
    assert_line(text, "tollgate_alerts_open_incidents{rule=\"upstream_errors\"} 2");
    free(text);
}

Test(prometheus, tick_sets_mean_redis_latency, .init = setup3, .fini = teardown)
{
    struct tg_metrics_shard *sh[2] = { tg_metrics_shard_create(), tg_metrics_shard_create() };
    char *text;

    tg_metrics_tick(sh, 2);
    cr_assert_eq(tg_metrics_value(sh, 2, TG_M_REDIS_OP_LATENCY_MS, 0), 0);
    tg_metric_observe(sh[0], TG_M_REDIS_LATENCY, 0, 10.0);
    tg_metric_observe(sh[1], TG_M_REDIS_LATENCY, 0, 11.0);
    tg_metrics_tick(sh, 2);
    text = render(sh, 2);
    assert_line(text, "redis_operation_latency_ms 10.5");   /* RateLimiter.md's example */
    free(text);
    tg_metrics_tick(sh, 2);                                  /* no calls: kept */
    cr_assert_eq(tg_metrics_value(sh, 2, TG_M_REDIS_OP_LATENCY_MS, 0), 10.5);
    tg_metric_observe_us(sh[1], TG_M_REDIS_LATENCY, 0, 2);
    tg_metrics_tick(sh, 2);                                  /* only the new call */
    cr_assert_eq(tg_metrics_value(sh, 2, TG_M_REDIS_OP_LATENCY_MS, 0), 0.002);
    tg_metrics_shard_destroy(sh[0]);
    tg_metrics_shard_destroy(sh[1]);
}

Test(prometheus, histogram_buckets, .init = setup3, .fini = teardown)
{
    struct tg_metrics_shard *sh[2] = { tg_metrics_shard_create(), tg_metrics_shard_create() };
    char *text;

    /* request duration of tier "pro": le is inclusive */
    tg_metric_observe_us(sh[0], TG_M_REQUEST_DURATION, 1, 0);         /* 0.001 */
    tg_metric_observe_us(sh[0], TG_M_REQUEST_DURATION, 1, 1000);      /* 0.001 */
    tg_metric_observe_us(sh[1], TG_M_REQUEST_DURATION, 1, 1001);      /* 0.0025 */
    tg_metric_observe(sh[1], TG_M_REQUEST_DURATION, 1, 2.5);          /* 0.0025 */
    tg_metric_observe(sh[0], TG_M_REQUEST_DURATION, 1, 250.0);        /* 0.25 */
    tg_metric_observe(sh[1], TG_M_REQUEST_DURATION, 1, 30000.0);      /* 30 */
    tg_metric_observe(sh[1], TG_M_REQUEST_DURATION, 1, 30000.001);    /* +Inf */
    tg_metric_observe(sh[1], TG_M_REQUEST_DURATION, 1, -5);           /* 0 -> 0.001 */
    /* Redis latency, no labels */
    tg_metric_observe_us(sh[0], TG_M_REDIS_LATENCY, 0, 100);          /* 0.0001 */
    tg_metric_observe_us(sh[1], TG_M_REDIS_LATENCY, 0, 700);          /* 0.001 */
    tg_metric_observe_us(sh[1], TG_M_REDIS_LATENCY, 0, 2000000);      /* +Inf */
    tg_metric_observe_us(sh[0], TG_M_REDIS_LATENCY, 1, 5);            /* dropped */

    cr_assert_eq(tg_metrics_value(sh, 2, TG_M_REQUEST_DURATION, 1), 8);
    text = render(sh, 2);
    assert_valid(text);
#define RD "tollgate_request_duration_seconds"
    assert_line(text, RD "_bucket{tier=\"pro\",le=\"0.001\"} 3");
    assert_line(text, RD "_bucket{tier=\"pro\",le=\"0.0025\"} 5");
    assert_line(text, RD "_bucket{tier=\"pro\",le=\"0.005\"} 5");
    assert_line(text, RD "_bucket{tier=\"pro\",le=\"0.1\"} 5");
    assert_line(text, RD "_bucket{tier=\"pro\",le=\"0.25\"} 6");
    assert_line(text, RD "_bucket{tier=\"pro\",le=\"10\"} 6");
    assert_line(text, RD "_bucket{tier=\"pro\",le=\"30\"} 7");
    assert_line(text, RD "_bucket{tier=\"pro\",le=\"+Inf\"} 8");
    /* 0 + 1000 + 1001 + 2500 + 250000 + 30000000 + 30000001 + 0 us */
    assert_line(text, RD "_sum{tier=\"pro\"} 60.254502");
    assert_line(text, RD "_count{tier=\"pro\"} 8");
    assert_line(text, RD "_bucket{tier=\"basic\",le=\"+Inf\"} 0");
    assert_line(text, RD "_sum{tier=\"basic\"} 0");
#define RL "tollgate_redis_latency_seconds"
    assert_line(text, RL "_bucket{le=\"0.0001\"} 1");
    assert_line(text, RL "_bucket{le=\"0.00025\"} 1");
    assert_line(text, RL "_bucket{le=\"0.001\"} 2");
    assert_line(text, RL "_bucket{le=\"1\"} 2");
    assert_line(text, RL "_bucket{le=\"+Inf\"} 3");
    assert_line(text, RL "_sum 2.0008");
    assert_line(text, RL "_count 3");
    free(text);
    tg_metrics_shard_destroy(sh[0]);
    tg_metrics_shard_destroy(sh[1]);
}

Test(prometheus, label_values_escaped)
{
    static const char *const t[] = { "we\"ird\\ti\ner", "plain" };
    static const char *const s[] = { "back\\slash" };
    struct tg_metrics_shard *sh;
    char *text;

    cr_assert_eq(tg_metrics_init(t, 2, NULL, 0, s, 1), TG_OK);
    sh = tg_metrics_shard_create();
    tg_metric_inc(sh, TG_M_BREACHES, 0);
    tg_metric_observe_us(sh, TG_M_REQUEST_DURATION, 0, 1);
    text = render(&sh, 1);
    assert_valid(text);
    assert_line(text, "rate_limiter_breaches{tier=\"we\\\"ird\\\\ti\\ner\"} 1");
    assert_line(text, "tollgate_request_duration_seconds_bucket{tier=\"we\\\"ird\\\\ti\\ner\","
                      "le=\"0.001\"} 1");
    assert_line(text, "tollgate_upstream_health{server=\"back\\\\slash\"} 0");
    /* no route configured: the family is declared, with no samples */
    assert_line(text, "# TYPE tollgate_route_requests_total counter");
    cr_assert_null(strstr(text, "tollgate_route_requests_total{"));
    free(text);
    tg_metrics_shard_destroy(sh);
    tg_metrics_deinit();
}

/* Owners write while the main thread renders: final sums are exact and
 * every intermediate render is valid. */
struct writer {
    struct tg_metrics_shard *sh;
    int n;
};

static void *
writer_main(void *arg)
{
    struct writer *w = arg;

    for (int i = 0; i < w->n; i++) {
        tg_metric_inc(w->sh, TG_M_REQUESTS, tg_metrics_tier_status((size_t)i % 3, 200));
        tg_metric_observe_us(w->sh, TG_M_REQUEST_DURATION, (size_t)i % 3, (uint64_t)i % 50000);
    }
    return NULL;
}

Test(prometheus, concurrent_writers, .init = setup3, .fini = teardown)
{
    enum { NW = 4, N = 300000 };
    struct tg_metrics_shard *sh[NW];
    struct writer w[NW];
    pthread_t th[NW];
    double total = 0;

    for (int i = 0; i < NW; i++) {
        sh[i] = tg_metrics_shard_create();
        w[i].sh = sh[i];
        w[i].n = N;
        pthread_create(&th[i], NULL, writer_main, &w[i]);
    }
    for (int r = 0; r < 5; r++) {
        char *text = render(sh, NW);

        assert_valid(text);
        free(text);
    }
    for (int i = 0; i < NW; i++) {
        pthread_join(th[i], NULL);
    }
    for (size_t t = 0; t < 3; t++) {
        total += tg_metrics_value(sh, NW, TG_M_REQUESTS, tg_metrics_tier_status(t, 200));
        cr_assert_eq(tg_metrics_value(sh, NW, TG_M_REQUEST_DURATION, t), NW * (N / 3));
    }
    cr_assert_eq(total, (double)NW * N);
    for (int i = 0; i < NW; i++) {
        tg_metrics_shard_destroy(sh[i]);
    }
}

/* promtool (optional): the only check allowed to skip. */
Test(prometheus, promtool_check_metrics, .init = setup3, .fini = teardown)
{
    const char *tool = getenv("TG_PROMTOOL");
    struct tg_metrics_shard *sh = tg_metrics_shard_create();
    char path[] = "/tmp/tg_metrics_XXXXXX", cmd[512], out[8192];
    size_t got;
    FILE *f, *pp;
    char *text, *line, *save = NULL;
    int fd, status;

    if (tool == NULL || *tool == '\0') {
        tool = system("command -v promtool >/dev/null 2>&1") == 0 ? "promtool" : NULL;
    }
    if (tool == NULL) {
        tg_metrics_shard_destroy(sh);
        cr_skip("promtool not installed (Debian package prometheus; or set TG_PROMTOOL)");
    }
    tg_metric_inc(sh, TG_M_REQUESTS, tg_metrics_tier_status(0, 200));
    tg_metric_observe(sh, TG_M_REDIS_LATENCY, 0, 0.7);
    tg_metrics_set_store_mode(TG_MSM_REDIS);
    text = render(&sh, 1);
    fd = mkstemp(path);
    cr_assert(fd >= 0);
    f = fdopen(fd, "w");
    fputs(text, f);
    fclose(f);
    snprintf(cmd, sizeof(cmd), "%s check metrics < %s 2>&1", tool, path);
    pp = popen(cmd, "r");
    cr_assert_not_null(pp);
    got = fread(out, 1, sizeof(out) - 1, pp);
    out[got] = '\0';
    status = pclose(pp);
    unlink(path);
    /* promtool's lint wants _total on counters and no unit abbreviations:
     * the three names of the original design break both on purpose.  Any
     * other complaint, or a parse error, fails. */
    for (line = strtok_r(out, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        cr_assert(strncmp(line, "rate_limiter_tokens_consumed ", 29) == 0 ||
                  strncmp(line, "rate_limiter_breaches ", 22) == 0 ||
                  strncmp(line, "redis_operation_latency_ms ", 27) == 0,
                  "promtool: %s (exit %d)", line, status);
    }
    free(text);
    tg_metrics_shard_destroy(sh);
}

/* ======================================================================
 * StatsD
 * ==================================================================== */

struct dgrams {
    char   *all;      /* every line, '\n' terminated */
    size_t  len;
    size_t  n;        /* datagrams */
    size_t  maxlen;
};

static void
collect(void *arg, const char *dg, size_t len)
{
    struct dgrams *d = arg;

    cr_assert(len > 0 && len <= TG_METRICS_STATSD_MAX, "datagram of %zu bytes", len);
    cr_assert(dg[0] != '\n' && dg[len - 1] != '\n', "empty line in datagram");
    d->all = realloc(d->all, d->len + len + 2);
    memcpy(d->all + d->len, dg, len);
    d->len += len;
    d->all[d->len++] = '\n';
    d->all[d->len] = '\0';
    d->n++;
    if (len > d->maxlen) {
        d->maxlen = len;
    }
}

static void
dgrams_reset(struct dgrams *d)
{
    free(d->all);
    memset(d, 0, sizeof(*d));
}

/* A whole StatsD line: name:value|c or |g, optional |#k:v,k:v. */
static int
statsd_line_ok(const char *l, size_t n)
{
    size_t i = 0;

    while (i < n && (isalnum((unsigned char)l[i]) || l[i] == '_' || l[i] == '-' ||
                     l[i] == '.')) {
        i++;
    }
    if (i == 0 || i >= n || l[i++] != ':') {
        return 0;
    }
    if (i < n && l[i] == '-') {
        i++;
    }
    if (i >= n || !isdigit((unsigned char)l[i])) {
        return 0;
    }
    while (i < n && (isdigit((unsigned char)l[i]) || l[i] == '.')) {
        i++;
    }
    if (n - i < 2 || l[i] != '|' || (l[i + 1] != 'c' && l[i + 1] != 'g')) {
        return 0;
    }
    i += 2;
    if (i == n) {
        return 1;
    }
    if (n - i < 3 || l[i] != '|' || l[i + 1] != '#') {
        return 0;
    }
    for (i += 2; i < n; i++) {
        if (l[i] == '|' || l[i] == '#' || l[i] == ' ') {
            return 0;
        }
    }
    return 1;
}

static size_t
count_lines_ok(const struct dgrams *d)
{
    size_t n = 0;
    const char *p = d->all ? d->all : "";

    while (*p) {
        const char *nl = strchr(p, '\n');

        cr_assert(statsd_line_ok(p, (size_t)(nl - p)), "bad line: %.*s", (int)(nl - p), p);
        n++;
        p = nl + 1;
    }
    return n;
}

Test(statsd, deltas_exact_across_flushes, .init = setup3, .fini = teardown)
{
    struct tg_metrics_shard *sh[3];
    struct tg_metrics_snapshot *snap = tg_metrics_snapshot_create();
    struct dgrams d = { 0 };

    for (int i = 0; i < 3; i++) {
        sh[i] = tg_metrics_shard_create();
        tg_metric_add(sh[i], TG_M_REQUESTS, tg_metrics_tier_status(0, 200), 10);
        tg_metric_inc(sh[i], TG_M_BREACHES, 1);
        tg_metric_observe_us(sh[i], TG_M_REDIS_LATENCY, 0, 1500);
    }
    tg_metrics_set_gauge(TG_M_REDIS_OP_LATENCY_MS, 0, 1.5);

    cr_assert_eq(tg_metrics_statsd_delta(sh, 3, snap, "tg", 0, collect, &d), 1);
    count_lines_ok(&d);
    assert_line(d.all, "tg.requests.basic.200:30|c");
    assert_line(d.all, "tg.rate_limiter_breaches.pro:3|c");
    assert_line(d.all, "tg.redis_latency.count:3|c");
    assert_line(d.all, "tg.redis_latency.sum_ms:4.5|c");
    assert_line(d.all, "tg.redis_operation_latency_ms:1.5|g");
    {
        char bi[64];

        snprintf(bi, sizeof(bi), "tg.build_info.%s:1|g", TG_VERSION);
        for (char *c = bi + 14; *c != ':'; c++) {
            *c = *c == '.' ? '_' : *c;              /* a dot would nest */
        }
        assert_line(d.all, bi);
    }
    cr_assert_null(strstr(d.all, ":0|c"), "zero delta sent:\n%s", d.all);
    cr_assert_null(strstr(d.all, "requests.pro"), "zero delta sent:\n%s", d.all);
    dgrams_reset(&d);

    /* second flush: only what changed since */
    tg_metric_add(sh[1], TG_M_REQUESTS, tg_metrics_tier_status(0, 200), 4);
    tg_metric_inc(sh[2], TG_M_REQUESTS, tg_metrics_tier_status(2, 503));
    tg_metric_observe_us(sh[0], TG_M_REDIS_LATENCY, 0, 1);
    tg_metrics_global_inc(TG_M_CONFIG_RELOADS, TG_MRL_OK);
    tg_metrics_statsd_delta(sh, 3, snap, "tg", 0, collect, &d);
    count_lines_ok(&d);
    assert_line(d.all, "tg.requests.basic.200:4|c");
    assert_line(d.all, "tg.requests.enterprise.503:1|c");
    assert_line(d.all, "tg.redis_latency.count:1|c");
    assert_line(d.all, "tg.redis_latency.sum_ms:0.001|c");
    assert_line(d.all, "tg.config_reloads.ok:1|c");
    cr_assert_null(strstr(d.all, "rate_limiter_breaches"), "unchanged sent:\n%s", d.all);
    cr_assert_null(strstr(d.all, ":0|c"));
    dgrams_reset(&d);

    /* third flush with nothing new: gauges only */
    tg_metrics_statsd_delta(sh, 3, snap, NULL, 0, collect, &d);
    cr_assert_null(strstr(d.all, "|c"), "counters sent without change:\n%s", d.all);
    assert_line(d.all, "redis_operation_latency_ms:1.5|g");
    dgrams_reset(&d);

    for (int i = 0; i < 3; i++) {
        tg_metrics_shard_destroy(sh[i]);
    }
    tg_metrics_snapshot_destroy(snap);
}

Test(statsd, dogstatsd_tags, .init = setup3, .fini = teardown)
{
    struct tg_metrics_shard *sh = tg_metrics_shard_create();
    struct tg_metrics_snapshot *snap = tg_metrics_snapshot_create();
    struct dgrams d = { 0 };

    tg_metric_add(sh, TG_M_REQUESTS, tg_metrics_tier_status(0, 200), 2);
    tg_metric_inc(sh, TG_M_REQUESTS, tg_metrics_tier_status(1, 777));
    tg_metric_observe(sh, TG_M_UPSTREAM_DURATION, 1, 12.0);
    tg_metrics_set_gauge(TG_M_UPSTREAM_HEALTH, 0, 1);
    tg_metrics_set_store_mode(TG_MSM_REDIS);
    tg_metric_gauge_add(sh, TG_M_CONNECTIONS_OPEN, 0, -3);    /* negative gauge */

    tg_metrics_statsd_delta(&sh, 1, snap, "api.tg", 1, collect, &d);
    count_lines_ok(&d);
    assert_line(d.all, "api.tg.requests:2|c|#tier:basic,status:200");
    assert_line(d.all, "api.tg.requests:1|c|#tier:pro,status:other");
    assert_line(d.all, "api.tg.upstream_duration.count:1|c|#server:10.0.0.2:8000");
    assert_line(d.all, "api.tg.upstream_duration.sum_ms:12|c|#server:10.0.0.2:8000");
    assert_line(d.all, "api.tg.upstream_health:1|g|#server:10.0.0.1:8000");
    assert_line(d.all, "api.tg.store_mode:1|g|#mode:redis");
    assert_line(d.all, "api.tg.store_mode:0|g|#mode:deny");
    /* a negative gauge is set through 0: "-3|g" alone would be relative */
    cr_assert_not_null(strstr(d.all, "api.tg.connections_open:0|g\napi.tg.connections_open:-3|g\n"),
                       "%s", d.all);
    dgrams_reset(&d);

    /* name-folded form of the same label values: dots and colons cleaned */
    tg_metrics_snapshot_destroy(snap);
    snap = tg_metrics_snapshot_create();
    tg_metrics_statsd_delta(&sh, 1, snap, "api.tg", 0, collect, &d);
    assert_line(d.all, "api.tg.upstream_duration.10_0_0_2_8000.count:1|c");
    assert_line(d.all, "api.tg.upstream_health.10_0_0_1_8000:1|g");
    dgrams_reset(&d);
    tg_metrics_snapshot_destroy(snap);
    tg_metrics_shard_destroy(sh);
}

/* 50 tiers with long names, every status: thousands of lines, each
 * datagram <= 1432 bytes, no line split or lost. */
static void
many_labels(int tags)
{
    enum { NT = 50 };
    char *names[NT];
    struct tg_metrics_shard *sh[2];
    struct tg_metrics_snapshot *snap;
    struct dgrams d = { 0 };
    size_t expect = 0, got, dg;

    for (int i = 0; i < NT; i++) {
        names[i] = malloc(40);
        snprintf(names[i], 40, "tier_with_a_rather_long_name_%02d", i);
    }
    cr_assert_eq(tg_metrics_init((const char *const *)names, NT, routes2, 2, servers2, 2), TG_OK);
    snap = tg_metrics_snapshot_create();
    sh[0] = tg_metrics_shard_create();
    sh[1] = tg_metrics_shard_create();
    for (size_t t = 0; t < NT; t++) {
        for (size_t s = 0; s < TG_MS__COUNT; s++) {
            tg_metric_add(sh[t % 2], TG_M_REQUESTS, t * TG_MS__COUNT + s, t + s + 1);
            expect++;
        }
        tg_metric_inc(sh[0], TG_M_BREACHES, t);
        tg_metric_inc(sh[1], TG_M_TOKENS_CONSUMED, t);
        tg_metric_observe_us(sh[0], TG_M_REQUEST_DURATION, t, 5000);
        expect += 4;
    }
    dg = tg_metrics_statsd_delta(sh, 2, snap, "tollgate", tags, collect, &d);
    got = count_lines_ok(&d);
    /* + gauges: redis latency, 2 health, 2 breaker, 4 store modes,
     * connections, build info, 5 open-incident rules, 2 adaptive limit,
     * 2 adaptive in flight, adaptive queued, throttle factor */
    cr_assert_eq(got, expect + 22, "lines %zu, expected %zu", got, expect + 22);
    cr_assert_eq(dg, d.n);
    cr_assert(d.n >= got * 30 / TG_METRICS_STATSD_MAX, "too many datagrams? %zu", d.n);
    cr_assert(d.maxlen <= TG_METRICS_STATSD_MAX);
    cr_assert(d.maxlen > TG_METRICS_STATSD_MAX - 100, "datagrams poorly packed: max %zu",
              d.maxlen);
    assert_line(d.all, tags ? "tollgate.requests:50|c|#tier:tier_with_a_rather_long_name_49,"
                              "status:200"
                            : "tollgate.requests.tier_with_a_rather_long_name_49.200:50|c");
    cr_assert_eq(tg_metrics_value(NULL, 0, TG_M_STATSD_DROPPED, 0), 0);
    dgrams_reset(&d);
    tg_metrics_shard_destroy(sh[0]);
    tg_metrics_shard_destroy(sh[1]);
    tg_metrics_snapshot_destroy(snap);
    tg_metrics_deinit();
    for (int i = 0; i < NT; i++) {
        free(names[i]);
    }
}

Test(statsd, packing_50_tiers_folded)
{
    many_labels(0);
}

Test(statsd, packing_50_tiers_tags)
{
    many_labels(1);
}

Test(statsd, oversized_line_dropped_and_counted)
{
    char huge[1500];
    const char *t[2];
    struct tg_metrics_shard *sh;
    struct tg_metrics_snapshot *snap;
    struct dgrams d = { 0 };

    memset(huge, 'h', sizeof(huge) - 1);
    huge[sizeof(huge) - 1] = '\0';
    t[0] = huge;
    t[1] = "ok";
    cr_assert_eq(tg_metrics_init(t, 2, NULL, 0, NULL, 0), TG_OK);
    sh = tg_metrics_shard_create();
    snap = tg_metrics_snapshot_create();
    tg_metric_inc(sh, TG_M_BREACHES, 0);
    tg_metric_inc(sh, TG_M_BREACHES, 1);
    tg_metrics_statsd_delta(&sh, 1, snap, "p", 0, collect, &d);
    count_lines_ok(&d);
    assert_line(d.all, "p.rate_limiter_breaches.ok:1|c");
    cr_assert_null(strstr(d.all, "hhhh"));
    cr_assert_eq(tg_metrics_value(&sh, 1, TG_M_STATSD_DROPPED, 0), 1);
    dgrams_reset(&d);
    /* the drop counter itself goes out on the next flush */
    tg_metrics_statsd_delta(&sh, 1, snap, "p", 0, collect, &d);
    assert_line(d.all, "p.statsd_dropped:1|c");
    dgrams_reset(&d);
    tg_metrics_snapshot_destroy(snap);
    tg_metrics_shard_destroy(sh);
    tg_metrics_deinit();
}

/* ======================================================================
 * Grafana dashboard: every metric named in an expr is declared.
 * ==================================================================== */

static char *
slurp(const char *rel)
{
    const char *root = getenv("TG_SOURCE_ROOT");
    char path[1024];
    FILE *f;
    long n;
    char *buf;

    snprintf(path, sizeof(path), "%s/%s", root ? root : ".", rel);
    f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s (set TG_SOURCE_ROOT)", path);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)n + 1);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static int
is_declared(const char *name)
{
    static const char *const sfx[] = { "_bucket", "_sum", "_count" };
    size_t n = strlen(name);
    char base[256];

    if (tg_metrics_lookup(name) >= 0) {
        return 1;
    }
    for (size_t i = 0; i < 3; i++) {
        size_t sl = strlen(sfx[i]);
        int id;

        if (n > sl && n - sl < sizeof(base) && strcmp(name + n - sl, sfx[i]) == 0) {
            memcpy(base, name, n - sl);
            base[n - sl] = '\0';
            id = tg_metrics_lookup(base);
            if (id >= 0 && tg_metrics_type(id) == TG_MT_HISTOGRAM) {
                return 1;
            }
        }
    }
    return 0;
}

static const char *
skip_group(const char *p, char open, char close)
{
    int depth = 0;

    for (; *p; p++) {
        if (*p == '"' || *p == '\'') {
            char q = *p++;

            while (*p && *p != q) {
                p += (*p == '\\' && p[1]) ? 2 : 1;
            }
            if (!*p) {
                break;
            }
        } else if (*p == open) {
            depth++;
        } else if (*p == close && --depth == 0) {
            return p + 1;
        }
    }
    return p;
}

/* Metric names of one PromQL expression: identifiers that are not
 * functions, keywords, label names (in {}, by(), without(), on(), ...)
 * strings, durations, numbers or $variables. */
static size_t
promql_metrics(const char *e, char names[][128], size_t max)
{
    static const char *const kw[] = {
        "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
        "group_left", "group_right", "inf", "nan",
    };
    size_t n = 0;
    const char *p = e;

    while (*p) {
        if (*p == '"' || *p == '\'' || *p == '`') {
            char q = *p++;

            while (*p && *p != q) {
                p += (*p == '\\' && p[1]) ? 2 : 1;
            }
            p += *p ? 1 : 0;
        } else if (*p == '{') {
            p = skip_group(p, '{', '}');
        } else if (*p == '[') {
            p = skip_group(p, '[', ']');
        } else if (*p == '$') {
            p++;
            if (*p == '{') {
                p = skip_group(p, '{', '}');
            }
            while (isalnum((unsigned char)*p) || *p == '_') {
                p++;
            }
        } else if (isdigit((unsigned char)*p) || *p == '.') {
            while (isalnum((unsigned char)*p) || *p == '.') {
                p++;
            }
        } else if (isalpha((unsigned char)*p) || *p == '_' || *p == ':') {
            const char *s = p;
            const char *a;
            size_t len, k;
            int keyword = 0;

            while (isalnum((unsigned char)*p) || *p == '_' || *p == ':') {
                p++;
            }
            len = (size_t)(p - s);
            for (a = p; *a == ' '; a++) {
            }
            for (k = 0; k < TG_ARRAY_LEN(kw); k++) {
                if (strlen(kw[k]) == len && strncasecmp(s, kw[k], len) == 0) {
                    keyword = 1;
                    break;
                }
            }
            if (keyword) {
                /* by (...), without (...), on (...): label names */
                if (k >= 5 && *a == '(') {
                    p = skip_group(a, '(', ')');
                }
                continue;
            }
            if (*a == '(' || ((strncmp(a, "by", 2) == 0 || strncmp(a, "without", 7) == 0) &&
                              !isalnum((unsigned char)a[*a == 'b' ? 2 : 7]) &&
                              a[*a == 'b' ? 2 : 7] != '_')) {
                continue;               /* function, or "sum by (...)" */
            }
            cr_assert(n < max && len < 128);
            memcpy(names[n], s, len);
            names[n][len] = '\0';
            n++;
        } else {
            p++;
        }
    }
    return n;
}

Test(grafana, dashboard_uses_declared_metrics, .init = setup3, .fini = teardown)
{
    static const char *const required[] = {
        "tollgate_requests_total", "rate_limiter_breaches", "rate_limiter_tokens_consumed",
        "tollgate_store_mode", "redis_operation_latency_ms", "tollgate_redis_calls_total",
        "tollgate_redis_latency_seconds_bucket", "tollgate_upstream_health",
        "tollgate_upstream_breaker_state", "tollgate_request_duration_seconds_bucket",
    };
    int used[TG_ARRAY_LEN(required)] = { 0 };
    char *json = slurp("conf/grafana/tollgate.json");
    const char *p = json;
    size_t nexpr = 0;

    cr_assert_not_null(strstr(json, "\"schemaVersion\""));
    cr_assert_not_null(strstr(json, "${DS_PROMETHEUS}"));
    while ((p = strstr(p, "\"expr\"")) != NULL) {
        char expr[2048], names[64][128];
        size_t el = 0, nn;

        p += 6;
        while (*p == ' ' || *p == ':') {
            p++;
        }
        cr_assert_eq(*p, '"', "expr is not a string");
        for (p++; *p && *p != '"'; p++) {
            char c = *p;

            if (c == '\\') {
                p++;
                c = *p == 'n' ? '\n' : *p == 't' ? '\t' : *p;
            }
            cr_assert(el + 1 < sizeof(expr));
            expr[el++] = c;
        }
        expr[el] = '\0';
        nexpr++;
        nn = promql_metrics(expr, names, 64);
        cr_assert(nn > 0, "no metric in expr: %s", expr);
        for (size_t i = 0; i < nn; i++) {
            cr_assert(is_declared(names[i]), "undeclared metric \"%s\" in expr: %s",
                      names[i], expr);
            for (size_t r = 0; r < TG_ARRAY_LEN(required); r++) {
                used[r] |= strcmp(names[i], required[r]) == 0;
            }
        }
    }
    cr_assert(nexpr >= 10, "only %zu exprs", nexpr);
    for (size_t r = 0; r < TG_ARRAY_LEN(required); r++) {
        cr_assert(used[r], "dashboard has no panel on %s", required[r]);
    }
    free(json);
}

Test(grafana, scanner_finds_names)
{
    char names[16][128];
    size_t n = promql_metrics(
        "histogram_quantile(0.99, sum by (le, tier) (rate(foo_bucket{tier=~\"$tier\"}"
        "[$__rate_interval]))) / on(x) group_left bar_total offset 5m + 1e3", names, 16);

    cr_assert_eq(n, 2);
    cr_assert_str_eq(names[0], "foo_bucket");
    cr_assert_str_eq(names[1], "bar_total");
}
