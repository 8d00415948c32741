/*
 * test_throttle.c - dynamic throttling (adaptive.throttle) end to end: the
 * real tollgate binary in front of tg-testup, whose /slow?ms=M answers
 * after M ms and /status?code=500 fails at once, so the upstream's p99 and
 * error ratio are chosen per request.
 *
 * A "driver" (12 client threads on one enterprise key, whose limits are
 * never reached) makes the upstream slow or failing; the basic tier
 * (4 tokens, one per 0.5 s) shows what the factor does to a consumer:
 * at factor 0.25 its refill is one token per 2 s, its headers advertise
 * q=1 and a 429 says Retry-After: 2 (1 unthrottled).
 *
 * Windows of 500 ms, target p99 40 ms, at least 20 exchanges to judge: the
 * driver gives about 100 per window.  Every wait polls a condition (the
 * factor in /status) with generous bounds.
 */
#include <criterion/criterion.h>

#include <openssl/sha.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "harness.h"

TestSuite(throttle, .fini = tgh_cleanup, .timeout = 240);

#define NDRIVE    12
#define WAIT_MS   30000           /* bound of every wait on the factor */
#define THROTTLE  "adaptive:\n" \
                  "  concurrency: { initial: 512, min: 256, max: 1024 }\n" \
                  "  throttle: { target_p99_ms: 40, max_error_ratio: 0.2, " \
                  "min_factor: 0.25, window_ms: 500 }\n"

static tgh_upstream up, rds;

/* keys.yaml: e0 enterprise, b0..b9 basic (the key is its own name). */
static const char *
keys_file(void)
{
    static char path[512];
    static const char *const names[] = { "e0", "b0", "b1", "b2", "b3", "b4", "b5",
                                         "b6", "b7", "b8", "b9" };
    FILE *f;

    snprintf(path, sizeof path, "%s/tkeys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("keys:\n", f);
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        unsigned char d[32];
        SHA256((const unsigned char *)names[i], strlen(names[i]), d);
        fprintf(f, "  - { id: id-%s, tier: %s, sha256: \"", names[i],
                names[i][0] == 'b' ? "basic" : "enterprise");
        for (size_t j = 0; j < 32; j++)
            fprintf(f, "%02x", d[j]);
        fputs("\" }\n", f);
    }
    cr_assert_eq(fclose(f), 0);
    return path;
}

/* A tollgate with the throttle; redis_port > 0: store: redis there. */
static void
start_tg(tgh_tollgate *tg, int redis_port)
{
    static char extra[2048];
    tgh_tg_opts o;
    int n;

    n = snprintf(extra, sizeof extra,
                 "rate_limits:\n"
                 "  basic:      { requests_per_minute: 120, burst_limit: 4 }\n"
                 "  enterprise: { requests_per_minute: 60000000, burst_limit: 1000000 }\n"
                 "auth: { keys_file: %s }\n" THROTTLE, keys_file());
    if (redis_port > 0)
        snprintf(extra + n, sizeof extra - (size_t)n,
                 "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500 }\n",
                 redis_port);
    tgh_tg_opts_default(&o, up.port);
    o.store = redis_port > 0 ? "redis" : "local";
    o.extra_yaml = extra;
    TGH_CHECK(tgh_tollgate_start(tg, &o) == 0, "tollgate");
}

/* ---- observing ------------------------------------------------------------ */

static char *
admin_get(const tgh_tollgate *tg, const char *path)
{
    tgh_resp r;
    char *body;

    TGH_CHECK(tgh_http(tg->admin_port, "GET", path, NULL, NULL, 0, &r, 10000) == 0,
              "GET %s", path);
    TGH_CHECK(r.status == 200, "GET %s: %d", path, r.status);
    body = strdup((const char *)r.body);
    tgh_resp_free(&r);
    return body;
}

/* The number after "throttle":{..."key": in /status, or -1 (no throttle). */
static double
thr_status(const tgh_tollgate *tg, const char *key)
{
    char *s = admin_get(tg, "/status"), pat[64];
    const char *t = strstr(s, "\"throttle\":{"), *p;
    double v = -1;

    snprintf(pat, sizeof pat, "\"%s\":", key);
    if (t != NULL && (p = strstr(t, pat)) != NULL)
        v = atof(p + strlen(pat));
    free(s);
    return v;
}

static double
factor(const tgh_tollgate *tg)
{
    return thr_status(tg, "factor");
}

/* The value of the sample line "series value" on /metrics, or -1. */
static double
metric(const tgh_tollgate *tg, const char *series)
{
    char *text = admin_get(tg, "/metrics");
    size_t n = strlen(series);
    const char *p = text;
    double v = -1;

    while ((p = strstr(p, series)) != NULL) {
        if ((p == text || p[-1] == '\n') && p[n] == ' ') {
            v = atof(p + n + 1);
            break;
        }
        p += n;
    }
    free(text);
    return v;
}

/* Poll until the factor of tg is within [lo, hi]; the last one seen. */
static double
wait_factor(const tgh_tollgate *tg, double lo, double hi)
{
    uint64_t end = tgh_now_ms() + WAIT_MS;
    double f;

    while ((f = factor(tg)) < lo - 1e-9 || f > hi + 1e-9) {
        if (tgh_now_ms() >= end)
            break;
        tgh_sleep_ms(50);
    }
    return f;
}

/* SIGTERM: a clean exit, status 0 and no sanitizer report in its log (the
 * ASan build: no leak, no undefined behaviour on the way). */
static void
stop_clean(tgh_tollgate *tg)
{
    int st = tgh_proc_stop(tg->proc, 20000);
    FILE *f = fopen(tg->proc->log_path, "r");
    char line[1024];

    TGH_CHECK(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0,
              "tollgate did not exit cleanly (wait status %d)", st);
    TGH_CHECK(f != NULL, "log %s", tg->proc->log_path);
    while (fgets(line, sizeof line, f) != NULL)
        TGH_CHECK(strstr(line, "runtime error") == NULL && strstr(line, "Sanitizer") == NULL,
                  "tollgate log: %s", line);
    fclose(f);
}

/* ---- the driver ------------------------------------------------------------- */

typedef struct driver {
    pthread_t    th[NDRIVE];
    int          port;
    const char  *path;
    int          think_ms;        /* pause after each answer */
    volatile int stop;
    long         n[NDRIVE], bad[NDRIVE];
} driver;

typedef struct drive_arg {
    driver *d;
    int     i;
} drive_arg;

static void *
drive_main(void *arg)
{
    drive_arg *a = arg;
    driver *d = a->d;
    tgh_conn *c = NULL;
    char req[256];
    tgh_resp r;
    int n;

    n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: t\r\nX-API-Key: e0\r\n\r\n",
                 d->path);
    while (!d->stop) {
        if (c == NULL && (c = tgh_conn_open(d->port, 5000)) == NULL) {
            d->bad[a->i]++;
            tgh_sleep_ms(20);
            continue;
        }
        if (tgh_conn_send(c, req, (size_t)n, 5000) != 0
            || tgh_conn_read_response(c, &r, 0, 10000) != 0) {
            tgh_conn_close(c);
            c = NULL;
            d->bad[a->i]++;
            continue;
        }
        if (r.status == 429 || r.status == 503)
            d->bad[a->i]++;
        d->n[a->i]++;
        tgh_resp_free(&r);
        if (d->think_ms > 0)
            tgh_sleep_ms(d->think_ms);
    }
    tgh_conn_close(c);
    return NULL;
}

static void
drive_start(driver *d, int port, const char *path)
{
    static drive_arg args[NDRIVE];

    memset(d, 0, sizeof *d);
    d->port = port;
    d->path = path;
    d->think_ms = strncmp(path, "/slow", 5) == 0 ? 0 : 20;   /* fast paths: ~50/s each */
    for (int i = 0; i < NDRIVE; i++) {
        args[i].d = d;
        args[i].i = i;
        pthread_create(&d->th[i], NULL, drive_main, &args[i]);
    }
}

static void
drive_stop(driver *d)
{
    long n = 0, bad = 0;

    d->stop = 1;
    for (int i = 0; i < NDRIVE; i++) {
        pthread_join(d->th[i], NULL);
        n += d->n[i];
        bad += d->bad[i];
    }
    cr_log_info("driver %s: %ld answers, %ld refused or failed", d->path, n, bad);
    TGH_CHECK(bad == 0, "driver %s: %ld of %ld refused (429/503) or failed: the "
              "enterprise key must never be limited", d->path, bad, n);
}

/* ---- a basic consumer --------------------------------------------------------- */

typedef struct seen {
    int  n200, n429, other;
    char limit[32];               /* X-RateLimit-Limit of the first answer */
    char policy[96];              /* RateLimit-Policy of the first answer */
    char retry[16];               /* Retry-After of the first 429 */
} seen;

static void
note(seen *s, const tgh_resp *r)
{
    const char *v;

    if (r->status == 200)
        s->n200++;
    else if (r->status == 429)
        s->n429++;
    else
        s->other++;
    if (s->limit[0] == '\0' && (v = tgh_resp_header(r, "X-RateLimit-Limit")) != NULL)
        snprintf(s->limit, sizeof s->limit, "%s", v);
    if (s->policy[0] == '\0' && (v = tgh_resp_header(r, "RateLimit-Policy")) != NULL)
        snprintf(s->policy, sizeof s->policy, "%s", v);
    if (r->status == 429 && s->retry[0] == '\0'
        && (v = tgh_resp_header(r, "Retry-After")) != NULL)
        snprintf(s->retry, sizeof s->retry, "%s", v);
}

/* One GET / with key; its status (-1: no answer), noted in s. */
static int
basic_get(const tgh_tollgate *tg, const char *key, seen *s)
{
    char *hdr = tgh_strf("X-API-Key: %s\r\n", key);
    tgh_resp r;
    int st = -1;

    if (tgh_http(tg->port, "GET", "/", hdr, NULL, 0, &r, 10000) == 0) {
        st = r.status;
        note(s, &r);
        tgh_resp_free(&r);
    } else {
        s->other++;
    }
    free(hdr);
    return st;
}

/* A fresh basic key's burst: 5 requests at once.  The burst (4) is the
 * same at any factor; the advertised quota and the 429's Retry-After are
 * not. */
static void
burst5(const tgh_tollgate *tg, const char *key, seen *s)
{
    memset(s, 0, sizeof *s);
    for (int i = 0; i < 5; i++)
        basic_get(tg, key, s);
    cr_log_info("%s: %d x 200, %d x 429, limit %s, policy %s, retry %s", key, s->n200,
                s->n429, s->limit, s->policy, s->retry);
    TGH_CHECK(s->n200 == 4 && s->n429 == 1 && s->other == 0,
              "%s: %d x 200, %d x 429, %d other for 5 at once with burst 4", key,
              s->n200, s->n429, s->other);
}

static void
check_throttled(const tgh_tollgate *tg, const char *key)
{
    seen s;

    burst5(tg, key, &s);
    TGH_CHECK(strcmp(s.limit, "1") == 0, "X-RateLimit-Limit %s at factor 0.25 "
              "(burst 4: 4 x 0.25 = 1)", s.limit);
    TGH_CHECK(strstr(s.policy, ";q=1;w=2") != NULL, "RateLimit-Policy %s", s.policy);
    TGH_CHECK(strcmp(s.retry, "2") == 0, "Retry-After %s: one token per 2 s", s.retry);
}

static void
check_unthrottled(const tgh_tollgate *tg, const char *key)
{
    seen s;

    burst5(tg, key, &s);
    TGH_CHECK(strcmp(s.limit, "4") == 0, "X-RateLimit-Limit %s unthrottled", s.limit);
    TGH_CHECK(strstr(s.policy, ";q=4;w=2") != NULL, "RateLimit-Policy %s", s.policy);
    TGH_CHECK(strcmp(s.retry, "1") == 0, "Retry-After %s: one token per 0.5 s", s.retry);
}

/* ---- the tests ------------------------------------------------------------------ */

/*
 * store: local.  The upstream turns slow: the factor halves per window to
 * min_factor; a basic key then gets exactly its throttled rate; the
 * upstream is fast again: the factor climbs back to 1 and so do the
 * headers.
 */
Test(throttle, local_slow_upstream_throttles_and_recovers)
{
    tgh_tollgate tg;
    driver d;
    seen s;
    uint64_t t0, end;
    double f;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    start_tg(&tg, 0);
    TGH_CHECK(factor(&tg) == 1.0, "factor at start: %g", factor(&tg));
    TGH_CHECK(metric(&tg, "tollgate_throttle_factor") == 1.0, "gauge at start");
    check_unthrottled(&tg, "b0");

    drive_start(&d, tg.port, "/slow?ms=100");
    f = wait_factor(&tg, 0.25, 0.25);
    TGH_CHECK(f == 0.25, "factor %g: it never reached min_factor 0.25 with a p99 of "
              "100 ms over a 40 ms target", f);
    TGH_CHECK(thr_status(&tg, "p99_ms") >= 90, "p99_ms %g", thr_status(&tg, "p99_ms"));
    TGH_CHECK(metric(&tg, "tollgate_throttle_factor") == 0.25, "gauge %g",
              metric(&tg, "tollgate_throttle_factor"));
    check_throttled(&tg, "b1");

    /* The throttled rate, exactly: a fresh key, one request every 100 ms
     * for 3.5 s.  Burst 4, then one token 2 s after the first request
     * (the next would take 4 s): 5 pass.  Unthrottled (a token per
     * 0.5 s) about 10 would. */
    memset(&s, 0, sizeof s);
    t0 = tgh_now_ms();
    end = t0 + 3500;
    while (tgh_now_ms() < end) {
        uint64_t next = tgh_now_ms() + 100;
        basic_get(&tg, "b2", &s);
        while (tgh_now_ms() < next)
            tgh_sleep_ms(5);
    }
    cr_log_info("b2 paced over 3.5 s: %d x 200, %d x 429", s.n200, s.n429);
    TGH_CHECK(s.other == 0, "b2: %d answers not 200/429", s.other);
    TGH_CHECK(s.n200 == 5, "b2: %d x 200 in 3.5 s at factor 0.25 (burst 4 + one "
              "token per 2 s = 5); %d x 429", s.n200, s.n429);
    TGH_CHECK(factor(&tg) == 0.25, "the factor moved while the upstream was slow: %g",
              factor(&tg));

    /* Fast again: recovery by 0.1 per window, 8 windows. */
    drive_stop(&d);
    drive_start(&d, tg.port, "/");
    f = wait_factor(&tg, 1.0, 1.0);
    drive_stop(&d);
    TGH_CHECK(f == 1.0, "factor %g: it did not recover", f);
    TGH_CHECK(metric(&tg, "tollgate_throttle_factor") == 1.0, "gauge after recovery");
    check_unthrottled(&tg, "b3");
    stop_clean(&tg);
}

/*
 * Two instances share one redis-server; only A's traffic is slow.  B's own
 * factor stays 1, yet B applies A's report: both throttle, and B's basic
 * consumers get the throttled quota.  A's upstream recovers: both return
 * to 1.  A throttles again and dies: its report expires and B returns to 1.
 */
Test(throttle, two_instances_share_the_factor_in_redis)
{
    tgh_tollgate a, b;
    driver d;
    char out[4096];
    double f;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    start_tg(&a, rds.port);
    start_tg(&b, rds.port);
    TGH_CHECK(factor(&a) == 1.0 && factor(&b) == 1.0, "factors at start");

    drive_start(&d, a.port, "/slow?ms=100");
    f = wait_factor(&a, 0.25, 0.25);
    TGH_CHECK(f == 0.25, "A: factor %g", f);
    f = wait_factor(&b, 0.25, 0.25);
    TGH_CHECK(f == 0.25, "B: factor %g: it did not apply A's report", f);
    TGH_CHECK(thr_status(&b, "local") == 1.0, "B's own factor %g: B's upstream "
              "traffic is not slow", thr_status(&b, "local"));
    TGH_CHECK(thr_status(&b, "reports") == 2, "B sees %g reports",
              thr_status(&b, "reports"));
    TGH_CHECK(metric(&b, "tollgate_throttle_factor") == 0.25, "B's gauge");
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HLEN tg:{throttle}") == 0
              && strcmp(out, "2") == 0, "reports in Redis: %s", out);
    check_throttled(&b, "b4");

    /* A's upstream recovers: both return to 1. */
    drive_stop(&d);
    drive_start(&d, a.port, "/");
    f = wait_factor(&a, 1.0, 1.0);
    TGH_CHECK(f == 1.0, "A: factor %g after its upstream recovered", f);
    f = wait_factor(&b, 1.0, 1.0);
    drive_stop(&d);
    TGH_CHECK(f == 1.0, "B: factor %g after A recovered", f);
    check_unthrottled(&b, "b5");

    /* A throttles again, then dies while throttled. */
    drive_start(&d, a.port, "/slow?ms=100");
    f = wait_factor(&b, 0.25, 0.5);
    TGH_CHECK(f <= 0.5, "B: factor %g while A throttles again", f);
    tgh_proc_signal(a.proc, SIGKILL, 1);
    TGH_CHECK(tgh_proc_wait(a.proc, 10000) == 0, "A did not die");
    d.stop = 1;                   /* its clients fail now: not counted */
    for (int i = 0; i < NDRIVE; i++)
        pthread_join(d.th[i], NULL);
    f = wait_factor(&b, 1.0, 1.0);
    TGH_CHECK(f == 1.0, "B: factor %g after A died: A's report must expire", f);
    TGH_CHECK(thr_status(&b, "reports") == 1, "B sees %g reports after A died",
              thr_status(&b, "reports"));
    stop_clean(&b);
}

/* Errors: the upstream answers 500 (not a breaker failure): the error
 * ratio passes max_error_ratio and the factor drops; then it recovers. */
Test(throttle, upstream_errors_throttle)
{
    tgh_tollgate tg;
    driver d;
    double f;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    start_tg(&tg, 0);
    drive_start(&d, tg.port, "/status?code=500");
    f = wait_factor(&tg, 0.25, 0.25);
    TGH_CHECK(f == 0.25, "factor %g with every exchange a 500", f);
    TGH_CHECK(thr_status(&tg, "error_ratio") > 0.2, "error_ratio %g",
              thr_status(&tg, "error_ratio"));
    check_throttled(&tg, "b6");
    drive_stop(&d);
    f = wait_factor(&tg, 1.0, 1.0);
    TGH_CHECK(f == 1.0, "factor %g after the errors stopped", f);
    stop_clean(&tg);
}

/* 1 if the log of p has a line containing s. */
static int
log_has(const tgh_proc *p, const char *s)
{
    FILE *f = fopen(p->log_path, "r");
    char line[1024];
    int found = 0;

    if (f == NULL)
        return 0;
    while (!found && fgets(line, sizeof line, f) != NULL)
        found = strstr(line, s) != NULL;
    fclose(f);
    return found;
}

/*
 * What others wrote in the reports hash: a malformed field and a factor of
 * 0 are dropped by the script (they never hold anybody down); a key of the
 * wrong type makes every report fail - one clear log line, and the
 * instance goes on with its own factor (it still throttles).
 */
Test(throttle, bad_reports_in_redis)
{
    tgh_tollgate tg;
    driver d;
    char out[4096];
    uint64_t end;
    double f;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    start_tg(&tg, rds.port);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out,
                            "HSET tg:{throttle} junk 'not a report' ghost "
                            "'0 99999999999999'") == 0, "HSET: %s", out);
    end = tgh_now_ms() + WAIT_MS;
    do {
        TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HKEYS tg:{throttle}") == 0,
                  "HKEYS: %s", out);
        if (strstr(out, "junk") == NULL && strstr(out, "ghost") == NULL)
            break;
        tgh_sleep_ms(50);
    } while (tgh_now_ms() < end);
    TGH_CHECK(strstr(out, "junk") == NULL && strstr(out, "ghost") == NULL,
              "bad reports kept: %s", out);
    TGH_CHECK(factor(&tg) == 1.0, "factor %g: a bad report was applied", factor(&tg));

    /* The key is a string now: every report fails. */
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "SET tg:{throttle} x") == 0,
              "SET: %s", out);
    end = tgh_now_ms() + WAIT_MS;
    while (!log_has(tg.proc, "throttle: the report to Redis failed") && tgh_now_ms() < end)
        tgh_sleep_ms(50);
    TGH_CHECK(log_has(tg.proc, "throttle: the report to Redis failed"),
              "no log line says the report failed");
    TGH_CHECK(log_has(tg.proc, "WRONGTYPE"), "no log line says why the report failed");
    drive_start(&d, tg.port, "/slow?ms=100");
    f = wait_factor(&tg, 0.25, 0.25);
    drive_stop(&d);
    TGH_CHECK(f == 0.25, "factor %g: the local factor must apply when Redis "
              "refuses the report", f);
    TGH_CHECK(thr_status(&tg, "reports") == 0, "reports %g", thr_status(&tg, "reports"));
    stop_clean(&tg);
}

/* Replace the first from in tg's config file by to. */
static void
conf_replace(const tgh_tollgate *tg, const char *from, const char *to)
{
    static char text[16384];
    char *p;
    FILE *f = fopen(tg->conf_path, "r");
    size_t n;

    TGH_CHECK(f != NULL, "%s", tg->conf_path);
    n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    p = strstr(text, from);
    TGH_CHECK(p != NULL, "no \"%s\" in the config", from);
    f = fopen(tg->conf_path, "w");
    TGH_CHECK(f != NULL, "%s", tg->conf_path);
    fwrite(text, 1, (size_t)(p - text), f);
    fputs(to, f);
    fputs(p + strlen(from), f);
    TGH_CHECK(fclose(f) == 0, "write %s", tg->conf_path);
}

/* SIGHUP applies throttle: while the upstream stays slow, a target raised
 * above its latency lets the factor recover; no restart warning. */
Test(throttle, reload_applies_the_target)
{
    tgh_tollgate tg;
    driver d;
    double f;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    start_tg(&tg, 0);
    drive_start(&d, tg.port, "/slow?ms=100");
    f = wait_factor(&tg, 0.25, 0.25);
    TGH_CHECK(f == 0.25, "factor %g before the reload", f);
    conf_replace(&tg, "target_p99_ms: 40", "target_p99_ms: 1000");
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    f = wait_factor(&tg, 1.0, 1.0);
    drive_stop(&d);
    TGH_CHECK(f == 1.0, "factor %g: the raised target was not applied", f);
    TGH_CHECK(!log_has(tg.proc, "kept until the next restart"),
              "the reload warned that something needs a restart");
    stop_clean(&tg);
}
