/*
 * test_observe.c - what operators see: exact counters on /metrics after a
 * known mix of requests, a valid exposition, StatsD datagrams that add up,
 * /status, and the Grafana dashboard's metric names present on /metrics.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <ctype.h>
#include <netinet/in.h>
#include <openssl/sha.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"
#include "tollgate/common.h"

TestSuite(observe, .fini = tgh_cleanup, .timeout = 120);

static tgh_upstream up;
static tgh_tollgate tg;

static const char *
keys_file(void)
{
    static const char *const names[] = { "o-basic", "o-pro", "o-off" };
    static const char *const tiers[] = { "basic", "pro", "basic" };
    static char path[512];
    FILE *f;
    size_t i, j;

    snprintf(path, sizeof path, "%s/okeys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("keys:\n", f);
    for (i = 0; i < 3; i++) {
        unsigned char d[32];
        SHA256((const unsigned char *)names[i], strlen(names[i]), d);
        fprintf(f, "  - { id: c-%s, tier: %s, enabled: %s, sha256: \"", names[i], tiers[i],
                i == 2 ? "false" : "true");
        for (j = 0; j < 32; j++)
            fprintf(f, "%02x", d[j]);
        fputs("\" }\n", f);
    }
    fclose(f);
    return path;
}

/* basic refills one token a minute: counts cannot drift during the test */
static void
start(const char *more)
{
    static char extra[2048];
    tgh_tg_opts o;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    snprintf(extra, sizeof extra,
             "rate_limits:\n"
             "  basic: { requests_per_minute: 1, burst_limit: 20 }\n"
             "  pro:   { requests_per_minute: 1, burst_limit: 100 }\n"
             "auth: { keys_file: %s }\n%s",
             keys_file(), more ? more : "");
    tgh_tg_opts_default(&o, up.port);
    o.extra_yaml = extra;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
}

static int
status_of(const char *key)
{
    tgh_resp r;
    char *hdr = key ? tgh_strf("X-API-Key: %s\r\n", key) : tgh_strf("%s", "");
    int rc = tgh_http(tg.port, "GET", "/", hdr, NULL, 0, &r, 10000);
    int st = rc == 0 ? r.status : -1;
    free(hdr);
    tgh_resp_free(&r);
    return st;
}

/* 25 basic (20 ok + 5 limited), 3 pro, 2 without a key, 1 disabled. */
static void
the_mix(void)
{
    int i, ok = 0, lim = 0;

    for (i = 0; i < 25; i++) {
        int st = status_of("o-basic");
        ok += st == 200;
        lim += st == 429;
    }
    TGH_CHECK(ok == 20 && lim == 5, "basic: %d ok, %d limited", ok, lim);
    for (i = 0; i < 3; i++)
        TGH_CHECK(status_of("o-pro") == 200, "pro %d", i);
    TGH_CHECK(status_of(NULL) == 401, "no key");
    TGH_CHECK(status_of(NULL) == 401, "no key");
    TGH_CHECK(status_of("o-off") == 403, "disabled");
}

static char *
scrape(const char *path)
{
    tgh_resp r;
    char *body;

    TGH_CHECK(tgh_http(tg.admin_port, "GET", path, NULL, NULL, 0, &r, 10000) == 0, "GET %s",
              path);
    TGH_CHECK(r.status == 200, "GET %s: %d", path, r.status);
    body = malloc(r.body_len + 1);
    memcpy(body, r.body, r.body_len);
    body[r.body_len] = '\0';
    tgh_resp_free(&r);
    return body;
}

/* The value of the sample line "name{labels} value" exactly, or -1. */
static double
sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    const char *p = text;

    while ((p = strstr(p, series)) != NULL) {
        if ((p == text || p[-1] == '\n') && p[n] == ' ')
            return atof(p + n + 1);
        p += n;
    }
    return -1;
}

Test(observe, counters_are_exact)
{
    static const struct { const char *series; double want; } expect[] = {
        { "tollgate_requests_total{tier=\"basic\",status=\"200\"}", 20 },
        { "tollgate_requests_total{tier=\"basic\",status=\"429\"}", 5 },
        { "tollgate_requests_total{tier=\"basic\",status=\"403\"}", 1 },
        { "tollgate_requests_total{tier=\"pro\",status=\"200\"}", 3 },
        { "tollgate_requests_total{tier=\"none\",status=\"401\"}", 2 },
        { "rate_limiter_tokens_consumed{tier=\"basic\"}", 20 },
        { "rate_limiter_tokens_consumed{tier=\"pro\"}", 3 },
        { "rate_limiter_breaches{tier=\"basic\"}", 5 },
        { "rate_limiter_breaches{tier=\"pro\"}", 0 },
        { "tollgate_limit_decisions_total{outcome=\"allowed\"}", 23 },
        { "tollgate_limit_decisions_total{outcome=\"limited\"}", 5 },
        { "tollgate_limit_decisions_total{outcome=\"unauthorized\"}", 2 },
        { "tollgate_limit_decisions_total{outcome=\"forbidden\"}", 1 },
        { "tollgate_request_duration_seconds_count{tier=\"basic\"}", 26 },
        { "tollgate_store_mode{mode=\"local\"}", 1 },
        { "tollgate_build_info{version=\"" TG_VERSION "\"}", 1 },
    };
    char *m;
    size_t i;

    start(NULL);
    the_mix();
    m = scrape("/metrics");
    for (i = 0; i < sizeof expect / sizeof expect[0]; i++) {
        double v = sample(m, expect[i].series);
        TGH_CHECK(v == expect[i].want, "%s = %g, expected %g", expect[i].series, v,
                  expect[i].want);
    }
    free(m);
}

/* ---- exposition format ------------------------------------------------------ */

static int
name_ok(const char *s, size_t n)
{
    size_t i;

    if (n == 0 || !(isalpha((unsigned char)s[0]) || s[0] == '_' || s[0] == ':'))
        return 0;
    for (i = 1; i < n; i++)
        if (!(isalnum((unsigned char)s[i]) || s[i] == '_' || s[i] == ':'))
            return 0;
    return 1;
}

/* Text format 0.0.4: HELP and TYPE before a family's samples, valid names,
 * label sets {k="v",...} with escapes, a numeric value. */
static void
check_exposition(const char *text)
{
    char typed[256][128];
    size_t ntyped = 0, lineno = 0;
    const char *p = text;

    while (*p) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        char line[4096];

        lineno++;
        TGH_CHECK(e != NULL, "line %zu does not end with a newline", lineno);
        TGH_CHECK(len < sizeof line, "line %zu too long", lineno);
        memcpy(line, p, len);
        line[len] = '\0';
        p = e + 1;
        if (strncmp(line, "# HELP ", 7) == 0)
            continue;
        if (strncmp(line, "# TYPE ", 7) == 0) {
            char name[128], type[32];
            TGH_CHECK(sscanf(line + 7, "%127s %31s", name, type) == 2, "bad TYPE: %s", line);
            TGH_CHECK(strcmp(type, "counter") == 0 || strcmp(type, "gauge") == 0
                      || strcmp(type, "histogram") == 0, "bad type: %s", line);
            TGH_CHECK(ntyped < 256, "too many families");
            snprintf(typed[ntyped++], 128, "%s", name);
            continue;
        }
        TGH_CHECK(line[0] != '#', "stray comment: %s", line);
        {
            size_t n = strcspn(line, "{ ");
            size_t k, fam = 0;
            char *v;
            for (k = 0; k < ntyped; k++) {
                size_t tl = strlen(typed[k]);
                if (strncmp(line, typed[k], tl) == 0
                    && (n == tl || (n > tl && (strncmp(line + tl, "_bucket", 7) == 0
                                               || strncmp(line + tl, "_sum", 4) == 0
                                               || strncmp(line + tl, "_count", 6) == 0))))
                    fam = 1;
            }
            TGH_CHECK(name_ok(line, n), "bad metric name: %s", line);
            TGH_CHECK(fam, "sample before its TYPE: %s", line);
            v = line + n;
            if (*v == '{') {
                v++;
                while (*v != '}') {
                    size_t ln = strcspn(v, "=");
                    TGH_CHECK(name_ok(v, ln) && v[ln] == '=' && v[ln + 1] == '"',
                              "bad label in: %s", line);
                    v += ln + 2;
                    while (*v && *v != '"') {
                        if (*v == '\\') {
                            TGH_CHECK(v[1] == '\\' || v[1] == '"' || v[1] == 'n',
                                      "bad escape in: %s", line);
                            v++;
                        }
                        v++;
                    }
                    TGH_CHECK(*v == '"', "unterminated label value: %s", line);
                    v++;
                    if (*v == ',')
                        v++;
                    else
                        TGH_CHECK(*v == '}', "bad label list: %s", line);
                }
                v++;
            }
            TGH_CHECK(*v == ' ', "no value: %s", line);
            {
                char *end;
                v++;
                if (strcmp(v, "+Inf") != 0 && strcmp(v, "-Inf") != 0 && strcmp(v, "NaN") != 0) {
                    strtod(v, &end);
                    TGH_CHECK(end != v && *end == '\0', "bad value: %s", line);
                }
            }
        }
    }
    TGH_CHECK(ntyped >= 10, "only %zu metric families", ntyped);
}

Test(observe, exposition_is_valid)
{
    char *m, path[256];
    FILE *f;

    start(NULL);
    the_mix();
    m = scrape("/metrics");
    check_exposition(m);
    /* promtool, where Debian's prometheus package is installed */
    if (system("command -v promtool >/dev/null 2>&1") == 0) {
        snprintf(path, sizeof path, "%s/metrics.txt", tgh_tmpdir());
        f = fopen(path, "w");
        fputs(m, f);
        fclose(f);
        char *cmd = tgh_strf("promtool check metrics < %s 2>&1 | grep -v "
                             "-e 'counter metrics should have \"_total\" suffix' "
                             "-e 'use base unit \"seconds\" instead of \"milliseconds\"' "
                             "| grep -q 'error'", path);
        TGH_CHECK(system(cmd) != 0, "promtool reports errors");
        free(cmd);
    }
    free(m);
}

/* ---- StatsD -------------------------------------------------------------------- */

Test(observe, statsd_adds_up)
{
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    char more[256], buf[2048];
    int fd, i, port, total = 0, datagrams = 0;
    uint64_t end, quiet_until = 0;

    fd = socket(AF_INET, SOCK_DGRAM, 0);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    TGH_CHECK(bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "bind");
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    port = ntohs(sa.sin_port);
    snprintf(more, sizeof more,
             "metrics: { statsd: { address: 127.0.0.1:%d, prefix: tg, flush_ms: 200 } }\n",
             port);
    start(more);
    for (i = 0; i < 37; i++)
        TGH_CHECK(status_of("o-pro") == 200, "request %d", i);

    /* read until the requests add up, then 5 more flushes of silence */
    end = tgh_now_ms() + 15000;
    while (tgh_now_ms() < end) {
        struct pollfd pf = { fd, POLLIN, 0 };
        if (quiet_until && tgh_now_ms() > quiet_until)
            break;
        if (poll(&pf, 1, 100) <= 0)
            continue;
        ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
        TGH_CHECK(n > 0 && n <= 1432, "datagram of %zd bytes", n);
        buf[n] = '\0';
        datagrams++;
        char *save = NULL, *line;
        for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
            int v;
            if (strncmp(line, "tg.requests.", 12) == 0 && strstr(line, "|c")
                && sscanf(strchr(line, ':') + 1, "%d", &v) == 1)
                total += v;
        }
        if (total >= 37 && !quiet_until)
            quiet_until = tgh_now_ms() + 1000;
    }
    close(fd);
    TGH_CHECK(datagrams > 0, "no StatsD datagram arrived");
    TGH_CHECK(total == 37, "StatsD request counters add up to %d, expected 37", total);
}

/* ---- /status and the dashboard -------------------------------------------------- */

Test(observe, status_json)
{
    char *s;

    start(NULL);
    s = scrape("/status");
    TGH_CHECK(strstr(s, "\"version\":\"") != NULL, "version: %s", s);
    TGH_CHECK(strstr(s, "\"config\":{\"path\":") != NULL, "config: %s", s);
    TGH_CHECK(strstr(s, "\"mode\":\"local\"") != NULL, "store mode: %s", s);
    TGH_CHECK(strstr(s, "\"uptime_s\":") != NULL, "uptime: %s", s);
    TGH_CHECK(strstr(s, "\"upstream\":[{\"server\":\"127.0.0.1:") != NULL, "upstream: %s", s);
    free(s);
}

Test(observe, dashboard_names_exist_on_metrics)
{
    char *path = tgh_strf("%s/conf/grafana/tollgate.json", tgh_env("TG_SOURCE_ROOT"));
    FILE *f = fopen(path, "r");
    static char dash[1 << 20];
    size_t n, checked = 0;
    char *m, *p;

    TGH_CHECK(f != NULL, "cannot open %s", path);
    n = fread(dash, 1, sizeof dash - 1, f);
    dash[n] = '\0';
    fclose(f);
    free(path);
    start(NULL);
    the_mix();
    m = scrape("/metrics");
    for (p = strstr(dash, "\"expr\""); p; p = strstr(p + 1, "\"expr\"")) {
        char *q = strchr(p + 6, '"');
        char *e = q ? strchr(q + 1, '\n') : NULL;
        char *s;
        for (s = q; s && s < e; s++) {
            if ((strncmp(s, "tollgate_", 9) == 0 || strncmp(s, "rate_limiter_", 13) == 0
                 || strncmp(s, "redis_", 6) == 0) && !isalnum((unsigned char)s[-1])
                && s[-1] != '_') {
                char name[128], type[160];
                size_t k = 0;
                while ((isalnum((unsigned char)s[k]) || s[k] == '_') && k < sizeof name - 1) {
                    name[k] = s[k];
                    k++;
                }
                name[k] = '\0';
                s += k;
                {
                    static const char *const sufs[] = { "_bucket", "_sum", "_count" };
                    size_t si, nl = strlen(name);
                    for (si = 0; si < 3; si++) {
                        size_t sl = strlen(sufs[si]);
                        if (nl > sl && strcmp(name + nl - sl, sufs[si]) == 0) {
                            name[nl - sl] = '\0';
                            break;
                        }
                    }
                }
                snprintf(type, sizeof type, "# TYPE %s ", name);
                TGH_CHECK(strstr(m, type) != NULL, "dashboard uses %s, absent from /metrics", name);
                checked++;
            }
        }
    }
    TGH_CHECK(checked >= 10, "only %zu metric references found in the dashboard", checked);
    free(m);
}

/* ---- access log ------------------------------------------------------------------ */

Test(observe, access_log_lines)
{
    char more[512], *path, buf[1 << 16];
    size_t n = 0;
    int lines = 0, limited = 0;
    uint64_t end;
    FILE *f;
    char *p;

    path = tgh_strf("%s/access.log", tgh_tmpdir());
    snprintf(more, sizeof more, "access_log: { path: %s }\n", path);
    start(more);
    the_mix();                                /* 31 requests */
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end) {               /* flushed every 100 ms */
        f = fopen(path, "r");
        if (f != NULL) {
            n = fread(buf, 1, sizeof buf - 1, f);
            fclose(f);
            buf[n] = '\0';
            lines = 0;
            for (p = buf; (p = strchr(p, '\n')) != NULL; p++)
                lines++;
            if (lines >= 31)
                break;
        }
        tgh_sleep_ms(50);
    }
    TGH_CHECK(lines == 31, "%d access log lines, expected 31", lines);
    for (p = buf; *p; ) {
        char *e = strchr(p, '\n');
        *e = '\0';
        TGH_CHECK(p[0] == '{' && e[-1] == '}', "not a JSON object: %s", p);
        TGH_CHECK(strstr(p, "\"request_id\":\"") && strstr(p, "\"status\":")
                  && strstr(p, "\"duration_ms\":") && strstr(p, "\"method\":\"GET\""),
                  "fields missing: %s", p);
        TGH_CHECK(strstr(p, "\"o-basic\"") == NULL && strstr(p, "\"o-pro\"") == NULL,
                  "an API key in the access log: %s", p);
        if (strstr(p, "\"consumer\":\"c-o-basic\"") && strstr(p, "\"status\":429")
            && strstr(p, "\"limit\":\"limited\""))
            limited++;
        p = e + 1;
    }
    TGH_CHECK(limited == 5, "%d limited basic lines, expected 5", limited);
    free(path);
}
