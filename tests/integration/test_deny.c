/*
 * test_deny.c - the exact deny cache and leases, through the tollgate
 * binary with a real redis-server:
 *   deny:    a flood from one over-limit key costs Redis fewer than 0.05
 *            calls per request (EVALSHA counted by INFO commandstats), its
 *            local 429s carry the headers Redis's would, the key gets
 *            exactly its refill after T; a bucket known empty denies only
 *            the requests that use it; a reload drops what is known;
 *   lease:   slices of a bucket spent without a call per request: across
 *            3 instances sharing one redis-server the admitted count stays
 *            within burst + rate * t (slices are charged when taken), and
 *            unused slices go back (at their ttl, and at shutdown).
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <openssl/sha.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

TestSuite(deny, .fini = tgh_cleanup, .timeout = 240);
TestSuite(lease, .fini = tgh_cleanup, .timeout = 240);

static tgh_upstream up, rds;

static void
sha_hex(const char *key, char out[65])
{
    unsigned char d[32];

    SHA256((const unsigned char *)key, strlen(key), d);
    for (int i = 0; i < 32; i++)
        sprintf(out + 2 * i, "%02x", d[i]);
}

/* keys.yaml: key "<name>" has id "id-<name>" and tier tiers[i]. */
static const char *
keys_file(const char *const *names, const char *const *tiers, size_t n)
{
    static char path[512];
    char hex[65];
    FILE *f;

    snprintf(path, sizeof path, "%s/dkeys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("keys:\n", f);
    for (size_t i = 0; i < n; i++) {
        sha_hex(names[i], hex);
        fprintf(f, "  - { id: id-%s, tier: %s, sha256: \"%s\" }\n", names[i], tiers[i], hex);
    }
    fclose(f);
    return path;
}

/* tollgate on store: redis with extra (upstream and redis already run);
 * workers 0: the harness's default. */
static void
start_tg_workers(tgh_tollgate *t, const char *extra, int workers)
{
    tgh_tg_opts o;

    tgh_tg_opts_default(&o, up.port);
    o.store = "redis";
    o.extra_yaml = extra;
    if (workers > 0)
        o.workers = workers;
    TGH_CHECK(tgh_tollgate_start(t, &o) == 0, "tollgate");
}

static void
start_tg(tgh_tollgate *t, const char *extra)
{
    start_tg_workers(t, extra, 0);
}

/* calls=N of a command in INFO commandstats (0 if never called). */
static long
redis_calls(const char *cmd)
{
    static char out[65536];
    char needle[64];
    const char *p;

    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "INFO commandstats") == 0,
              "INFO commandstats");
    snprintf(needle, sizeof needle, "cmdstat_%s:calls=", cmd);
    p = strstr(out, needle);
    return p ? atol(p + strlen(needle)) : 0;
}

/* The charge's calls: the script's (EVAL counts the NOSCRIPT recoveries)
 * and, under TG_REDIS_MODULE (integration_deny_native), the module's. */
static long
script_calls(void)
{
    return redis_calls("evalsha") + redis_calls("eval") + redis_calls("tollgate.charge");
}

static long long
redis_get(const char *key)
{
    char out[256];

    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "GET %s", key) == 0, "redis-cli");
    return atoll(out);
}

/* One keep-alive request on c; its status (-1 on error); r kept if given. */
static int
req(tgh_conn *c, const char *key, const char *path, tgh_resp *keep)
{
    char buf[512];
    tgh_resp r;
    int n = snprintf(buf, sizeof buf, "GET %s HTTP/1.1\r\nHost: t\r\nX-API-Key: %s\r\n\r\n",
                     path, key);
    int st;

    if (tgh_conn_roundtrip(c, buf, (size_t)n, &r, 0, 10000) != 0)
        return -1;
    st = r.status;
    if (keep != NULL)
        *keep = r;
    else
        tgh_resp_free(&r);
    return st;
}

static const char *const rl_headers[] = {
    "RateLimit-Policy", "RateLimit", "X-RateLimit-Limit", "X-RateLimit-Remaining",
    "X-RateLimit-Reset", "Retry-After",
};

/* The number after the last '=' of v, or v itself. */
static long
num_of(const char *v)
{
    const char *eq = strrchr(v, '=');

    return atol(eq ? eq + 1 : v);
}

/*
 * a (decided by Redis) and b (by the deny cache, a moment later) carry the
 * same rate-limit headers: equal, but the seconds to reset and to retry,
 * which may have ticked down by one between the two.
 */
static void
same_headers(const tgh_resp *a, const tgh_resp *b)
{
    for (size_t i = 0; i < sizeof rl_headers / sizeof rl_headers[0]; i++) {
        const char *va = tgh_resp_header(a, rl_headers[i]);
        const char *vb = tgh_resp_header(b, rl_headers[i]);

        TGH_CHECK(va != NULL && vb != NULL, "%s: %s / %s", rl_headers[i], va ? va : "-",
                  vb ? vb : "-");
        TGH_CHECK(tgh_resp_header_count(a, rl_headers[i]) == 1
                  && tgh_resp_header_count(b, rl_headers[i]) == 1, "%s once", rl_headers[i]);
        if (strcmp(va, vb) == 0)
            continue;
        if (strcmp(rl_headers[i], "RateLimit") == 0) {
            /* "basic";r=0;t=N */
            const char *ta = strstr(va, ";t="), *tb = strstr(vb, ";t=");
            TGH_CHECK(ta && tb && (size_t)(ta - va) == (size_t)(tb - vb)
                      && strncmp(va, vb, (size_t)(ta - va)) == 0
                      && atol(ta + 3) - atol(tb + 3) == 1, "RateLimit: %s / %s", va, vb);
            continue;
        }
        TGH_CHECK((strcmp(rl_headers[i], "X-RateLimit-Reset") == 0
                   || strcmp(rl_headers[i], "Retry-After") == 0)
                  && num_of(va) - num_of(vb) == 1, "%s: Redis said %s, the cache %s",
                  rl_headers[i], va, vb);
    }
}

/* ---- the deny cache ------------------------------------------------------ */

/*
 * basic: burst 3, one token per 10 s, 2 workers.  On one connection: 3
 * pass, the 4th is Redis's 429, the 5th the cache's (no script call) with
 * the same headers.  Then a flood of 2,000 requests on 4 connections
 * (both workers): 0 admitted, fewer than 0.05 script calls per request.
 * Then the key gets exactly its refill: polled until one passes (not
 * before its Retry-After), after which it is refused again.
 */
Test(deny, flood_costs_redis_little)
{
    static const char *const names[] = { "fl" };
    static const char *const tiers[] = { "basic" };
    static char extra[1024];
    tgh_tollgate tg;
    tgh_conn *c[4];
    tgh_resp r4, r5;
    long calls0, calls1;
    int st, ok = 0, limited = 0, other = 0;
    uint64_t t4, t_flood, t_pass;
    long retry_s;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 6, burst_limit: 3 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             keys_file(names, tiers, 1), rds.port);
    start_tg(&tg, extra);
    for (int i = 0; i < 4; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(c[i] != NULL, "connect %d", i);
    }
    for (int i = 0; i < 3; i++)
        TGH_CHECK((st = req(c[0], "fl", "/", NULL)) == 200, "request %d: %d", i + 1, st);
    calls0 = script_calls();
    TGH_CHECK(req(c[0], "fl", "/", &r4) == 429, "the 4th is refused");
    t4 = tgh_now_ms();
    calls1 = script_calls();
    TGH_CHECK(calls1 == calls0 + 1, "Redis decided the 4th (%ld calls)", calls1 - calls0);
    TGH_CHECK(req(c[0], "fl", "/", &r5) == 429, "the 5th is refused");
    TGH_CHECK(script_calls() == calls1, "the 5th was decided without Redis");
    same_headers(&r4, &r5);
    TGH_CHECK(strcmp(tgh_resp_header(&r5, "X-RateLimit-Remaining"), "0") == 0
              && strcmp(tgh_resp_header(&r5, "X-RateLimit-Limit"), "3") == 0,
              "remaining %s of %s", tgh_resp_header(&r5, "X-RateLimit-Remaining"),
              tgh_resp_header(&r5, "X-RateLimit-Limit"));
    retry_s = atol(tgh_resp_header(&r4, "Retry-After"));
    TGH_CHECK(retry_s >= 9 && retry_s <= 10, "Retry-After %ld", retry_s);
    tgh_resp_free(&r4);
    tgh_resp_free(&r5);

    /* the flood */
    calls0 = script_calls();
    for (int i = 0; i < 2000; i++) {
        st = req(c[i % 4], "fl", "/", NULL);
        ok += st == 200;
        limited += st == 429;
        other += st != 200 && st != 429;
    }
    t_flood = tgh_now_ms();
    calls1 = script_calls();
    cr_log_info("flood: 2000 requests, %d admitted, %d limited, %ld script calls "
                "(%.4f per request) in %llu ms", ok, limited, calls1 - calls0,
                (double)(calls1 - calls0) / 2000, (unsigned long long)(t_flood - t4));
    TGH_CHECK(t_flood - t4 < 9000, "the flood took %llu ms: too slow to count exactly",
              (unsigned long long)(t_flood - t4));
    TGH_CHECK(ok == 0 && limited == 2000 && other == 0,
              "flood: %d admitted, %d limited, %d other", ok, limited, other);
    TGH_CHECK((double)(calls1 - calls0) / 2000 < 0.05, "%ld script calls for 2000 requests",
              calls1 - calls0);

    /* exactly the refill: one token at T */
    t_pass = 0;
    while (tgh_now_ms() < t4 + 30000) {
        st = req(c[0], "fl", "/", NULL);
        TGH_CHECK(st == 200 || st == 429, "poll: %d", st);
        if (st == 200) {
            t_pass = tgh_now_ms();
            break;
        }
        tgh_sleep_ms(50);
    }
    TGH_CHECK(t_pass != 0, "no refill within 30 s");
    TGH_CHECK(t_pass + 1000 >= t4 + (uint64_t)retry_s * 1000,
              "passed %llu ms after the 4th, Retry-After said %ld s",
              (unsigned long long)(t_pass - t4), retry_s);
    ok = 0;
    for (int i = 0; i < 200; i++)
        ok += req(c[i % 4], "fl", "/", NULL) == 200;
    TGH_CHECK(ok == 0 || tgh_now_ms() - t_pass >= 10000,
              "%d more admitted right after the refill of one token", ok);
    for (int i = 0; i < 4; i++)
        tgh_conn_close(c[i]);
}

/*
 * A bucket known empty refuses only the requests that use it: a key whose
 * route bucket (search: burst 2) is spent still passes on other paths
 * (its tier bucket has room), and another key is untouched.
 */
Test(deny, only_the_empty_bucket_denies)
{
    static const char *const names[] = { "ra", "rb" };
    static const char *const tiers[] = { "basic", "basic" };
    static char extra[1024];
    tgh_tollgate tg;
    tgh_conn *c;
    long calls0;
    int st;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 6, burst_limit: 100 }\n"
             "routes:\n  - { name: search, path: /search, limit: "
             "{ requests_per_minute: 1, burst_limit: 2 } }\n"
             "global_limit: { requests_per_second: 100000, burst: 100000 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             keys_file(names, tiers, 2), rds.port);
    start_tg(&tg, extra);
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    for (int i = 0; i < 2; i++)
        TGH_CHECK((st = req(c, "ra", "/search", NULL)) == 200, "search %d: %d", i, st);
    for (int i = 0; i < 20; i++) {
        tgh_resp r;
        TGH_CHECK((st = req(c, "ra", "/search", &r)) == 429, "search over: %d", st);
        TGH_CHECK(strncmp(tgh_resp_header(&r, "RateLimit-Policy"), "\"search\"", 8) == 0,
                  "policy %s", tgh_resp_header(&r, "RateLimit-Policy"));
        tgh_resp_free(&r);
    }
    calls0 = script_calls();
    for (int i = 0; i < 10; i++)
        TGH_CHECK((st = req(c, "ra", "/items", NULL)) == 200, "other path %d: %d", i, st);
    for (int i = 0; i < 2; i++)
        TGH_CHECK((st = req(c, "rb", "/search", NULL)) == 200, "other key %d: %d", i, st);
    TGH_CHECK(script_calls() - calls0 == 12, "each of those was charged in Redis");
    tgh_conn_close(c);
}

/* Replace the first occurrence of from by to in the running config and
 * SIGHUP; wait for the reload to be logged. */
static void
reload_replace(tgh_tollgate *tg, const char *from, const char *to)
{
    static char buf[16384], out[16384];
    FILE *f = fopen(tg->conf_path, "r");
    size_t n;
    char *p;
    uint64_t end = tgh_now_ms() + 10000;
    int seen = 0;

    cr_assert_not_null(f);
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    p = strstr(buf, from);
    cr_assert_not_null(p, "%s not in the config", from);
    snprintf(out, sizeof out, "%.*s%s%s", (int)(p - buf), buf, to, p + strlen(from));
    f = fopen(tg->conf_path, "w");
    cr_assert_not_null(f);
    fputs(out, f);
    fclose(f);
    tgh_proc_signal(tg->proc, SIGHUP, 0);
    while (!seen && tgh_now_ms() < end) {
        FILE *lf = fopen(tg->proc->log_path, "r");
        static char log[1 << 16];
        size_t ln = lf ? fread(log, 1, sizeof log - 1, lf) : 0;

        if (lf)
            fclose(lf);
        log[ln] = '\0';
        seen = strstr(log, "configuration reloaded") != NULL;
        if (!seen)
            tgh_sleep_ms(50);
    }
    TGH_CHECK(seen, "reload not seen");
}

/* A reload that raises the burst admits at once: what the cache knew is
 * dropped (and its entries are keyed by the limits anyway). */
Test(deny, reload_forgets)
{
    static const char *const names[] = { "rl" };
    static const char *const tiers[] = { "basic" };
    static char extra[1024];
    tgh_tollgate tg;
    tgh_conn *c;
    int st, ok = 0;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 1, burst_limit: 2 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             keys_file(names, tiers, 1), rds.port);
    start_tg(&tg, extra);
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    for (int i = 0; i < 2; i++)
        TGH_CHECK((st = req(c, "rl", "/", NULL)) == 200, "request %d: %d", i, st);
    for (int i = 0; i < 10; i++)
        TGH_CHECK((st = req(c, "rl", "/", NULL)) == 429, "over: %d", st);
    reload_replace(&tg, "burst_limit: 2", "burst_limit: 5");
    for (int i = 0; i < 10; i++)
        ok += req(c, "rl", "/", NULL) == 200;
    TGH_CHECK(ok == 3, "after raising the burst to 5: %d admitted, expected 3", ok);
    tgh_conn_close(c);
}

/* ---- leases ---------------------------------------------------------------- */

/*
 * 3 instances (2 workers each) share one redis-server; tier basic: burst
 * 20, 10 tokens a second, leases of 5.  One key floods all three for 3 s.
 * Slices are charged to the bucket when taken, so the admitted count is
 * within burst + rate * t, t from the first request sent to the last
 * answer - exactly, no instances x workers x size term - and at most the
 * slices in hand at the end (6 workers x 4) below it.
 */
Test(lease, three_instances_bound)
{
    static const char *const names[] = { "ls" };
    static const char *const tiers[] = { "basic" };
    static char extra[1024];
    tgh_tollgate tg[3];
    tgh_conn *c[6];
    uint64_t t0, t1;
    long calls0, calls1, bound, low;
    int st, ok = 0, limited = 0, other = 0, n = 0;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 600, burst_limit: 20, "
             "lease: { size: 5, ttl_ms: 500 } }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             keys_file(names, tiers, 1), rds.port);
    for (int i = 0; i < 3; i++)
        start_tg(&tg[i], extra);
    for (int i = 0; i < 6; i++) {
        c[i] = tgh_conn_open(tg[i % 3].port, 5000);
        TGH_CHECK(c[i] != NULL, "connect %d", i);
    }
    calls0 = script_calls();
    t0 = tgh_now_ms();
    while (tgh_now_ms() < t0 + 3000) {
        st = req(c[n % 6], "ls", "/", NULL);
        if (st == -1) {
            /* a keep-alive connection ends after so many requests */
            tgh_conn_close(c[n % 6]);
            c[n % 6] = tgh_conn_open(tg[n % 3].port, 5000);
            TGH_CHECK(c[n % 6] != NULL, "reconnect");
            st = req(c[n % 6], "ls", "/", NULL);
        }
        ok += st == 200;
        limited += st == 429;
        if (st != 200 && st != 429) {
            other++;
            cr_log_error("request %d on instance %d: %d", n, n % 3, st);
            break;
        }
        n++;
    }
    t1 = tgh_now_ms();
    calls1 = script_calls();
    bound = 20 + (long)((t1 - t0) / 100);
    low = 20 + (long)((t1 - t0) / 100) - 6 * 4 - 2;
    cr_log_info("leases, 3 instances: %d requests in %llu ms, %d admitted (bound %ld), "
                "%d limited, %ld script calls", n, (unsigned long long)(t1 - t0), ok,
                bound, limited, calls1 - calls0);
    TGH_CHECK(other == 0, "%d answers neither 200 nor 429", other);
    TGH_CHECK(ok <= bound, "%d admitted, above burst + rate * t = %ld", ok, bound);
    TGH_CHECK(ok >= low, "%d admitted, more than the slices in hand below %ld", ok, bound);
    for (int i = 0; i < 6; i++)
        tgh_conn_close(c[i]);
}

/*
 * Under the limit, a lease of 50 serves 49 requests of 50 without a call:
 * 1,000 requests on one connection cost at most 1,000 / 49 + 2 calls, and
 * every one is admitted.
 */
Test(lease, fewer_calls_under_the_limit)
{
    static const char *const names[] = { "lc" };
    static const char *const tiers[] = { "basic" };
    static char extra[1024];
    tgh_tollgate tg;
    tgh_conn *c;
    long calls0, calls1;
    int ok = 0;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 6000000, burst_limit: 100000, "
             "lease: { size: 50, ttl_ms: 60000 } }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             keys_file(names, tiers, 1), rds.port);
    start_tg(&tg, extra);
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    calls0 = script_calls();
    for (int i = 0; i < 1000; i++)
        ok += req(c, "lc", "/", NULL) == 200;
    calls1 = script_calls();
    cr_log_info("lease of 50: 1000 requests, %d admitted, %ld script calls", ok,
                calls1 - calls0);
    TGH_CHECK(ok == 1000, "%d of 1000 admitted", ok);
    TGH_CHECK(calls1 - calls0 <= 1000 / 49 + 2, "%ld script calls", calls1 - calls0);
    tgh_conn_close(c);
}

/* Poll key's TAT in Redis until it equals want (bounded). */
static long long
await_tat(const char *key, long long want, int timeout_ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    long long v = redis_get(key);

    while (v != want && tgh_now_ms() < end) {
        tgh_sleep_ms(20);
        v = redis_get(key);
    }
    return v;
}

/*
 * Unused slices go back: a first request is charged exactly (a slice is
 * taken only for a set seen again within the ttl), the second takes a
 * slice of 5 (the bucket's TAT moves 5 T ahead), spends 1, and the 4 left
 * are given back - at the lease's ttl (tier short: 300 ms), and at
 * shutdown (tier long: a ttl of an hour).  T is a minute, so the TAT
 * after is exactly 4 T earlier.
 */
Test(lease, unused_slices_go_back)
{
    static const char *const names[] = { "gs", "gl" };
    static const char *const tiers[] = { "short", "long" };
    static char extra[1024];
    const long long t = 60000000;
    tgh_tollgate tg;
    long long tat0, tat1;
    tgh_conn *c;
    int st;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n"
             "  short: { requests_per_minute: 1, burst_limit: 20, "
             "lease: { size: 5, ttl_ms: 300 } }\n"
             "  long: { requests_per_minute: 1, burst_limit: 20, "
             "lease: { size: 5, ttl_ms: 3600000 } }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             keys_file(names, tiers, 2), rds.port);
    start_tg(&tg, extra);
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");

    TGH_CHECK((st = req(c, "gs", "/", NULL)) == 200, "short: %d", st);
    tat0 = redis_get("tg:{id-gs}:t");
    TGH_CHECK((st = req(c, "gs", "/", NULL)) == 200, "short: %d", st);
    tat1 = redis_get("tg:{id-gs}:t");
    TGH_CHECK(tat1 - tat0 == 5 * t, "the first request exact, the second takes a slice "
              "of 5: TAT %lld after %lld", tat1, tat0);
    tat0 = tat1;
    tat1 = await_tat("tg:{id-gs}:t", tat0 - 4 * t, 10000);
    TGH_CHECK(tat1 == tat0 - 4 * t, "at the ttl: TAT %lld, expected %lld (4 T back)",
              tat1, tat0 - 4 * t);

    TGH_CHECK((st = req(c, "gl", "/", NULL)) == 200, "long: %d", st);
    tat0 = redis_get("tg:{id-gl}:t");
    TGH_CHECK((st = req(c, "gl", "/", NULL)) == 200, "long: %d", st);
    tat1 = redis_get("tg:{id-gl}:t");
    TGH_CHECK(tat1 - tat0 == 5 * t, "the second request takes a slice of 5");
    tat0 = tat1;
    tgh_conn_close(c);
    TGH_CHECK(tgh_proc_stop(tg.proc, 15000) >= 0, "clean stop");
    tat1 = redis_get("tg:{id-gl}:t");
    TGH_CHECK(tat1 == tat0 - 4 * t, "at shutdown: TAT %lld, expected %lld (4 T back)",
              tat1, tat0 - 4 * t);
}

/* ---- many keys on one worker ------------------------------------------- */

enum { MANY = 2000 };
static char many_buf[MANY][16];
static const char *many_names[MANY];

/* tg-testup, redis-server and tollgate (one worker, store: redis,
 * on_failure: deny) with MANY keys named <prefix><i> in tier basic,
 * whose mapping is basic (e.g. "requests_per_minute: 1, burst_limit: 20,
 * lease: { ... }"). */
static void
start_many(tgh_tollgate *tg, const char *prefix, const char *basic)
{
    static const char *tiers[MANY];
    static char extra[1024];

    for (int i = 0; i < MANY; i++) {
        snprintf(many_buf[i], sizeof many_buf[i], "%s%d", prefix, i);
        many_names[i] = many_buf[i];
        tiers[i] = "basic";
    }
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { %s }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             basic, keys_file(many_names, tiers, MANY), rds.port);
    start_tg_workers(tg, extra, 1);
}

/* One request of key name on *c (opened again when tollgate ended the
 * keep-alive connection after so many requests): its status. */
static int
req_on(tgh_conn **c, int port, const char *name)
{
    int st = -1;

    if (*c != NULL)
        st = req(*c, name, "/", NULL);
    if (st == -1) {
        if (*c != NULL)
            tgh_conn_close(*c);
        *c = tgh_conn_open(port, 5000);
        TGH_CHECK(*c != NULL, "connect");
        st = req(*c, name, "/", NULL);
    }
    return st;
}

/*
 * A slice that outlives its charge: two instances (1 worker each) share a
 * bucket, burst 12, a token per 200 ms, slices of 5.  B takes a slice (ttl
 * 300 ms), then A (ttl 30 s, far beyond its charge's 5 T = 1 s).  B's
 * unused tokens go back at its ttl, and the bucket then refills in Redis
 * while A still holds 4 tokens.  From the moment the bucket is full (its
 * key gone), B drains it and A spends: what passes is bounded by burst +
 * rate * t + the tokens slices held at the start (here A's 4), the
 * documented bound of a ttl longer than size * T (docs/DESIGN-NOTES.md,
 * "Leases").  A slice spent twice, or a give-back that refunded what its
 * slice then spent, would pass more.
 */
Test(lease, slice_outliving_its_charge_is_bounded)
{
    static const char *const names[] = { "lh" };
    static const char *const tiers[] = { "basic" };
    static char extra_a[1024], extra_b[1024];
    const char *kf = keys_file(names, tiers, 1);
    tgh_tollgate a, b;
    tgh_conn *ca, *cb;
    uint64_t t0, t1, end;
    int st, ok_a = 0, ok_b = 0;
    long bound;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra_a, sizeof extra_a,
             "rate_limits:\n  basic: { requests_per_minute: 300, burst_limit: 12, "
             "lease: { size: 5, ttl_ms: 30000 } }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             kf, rds.port);
    snprintf(extra_b, sizeof extra_b,
             "rate_limits:\n  basic: { requests_per_minute: 300, burst_limit: 12, "
             "lease: { size: 5, ttl_ms: 300 } }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             kf, rds.port);
    start_tg_workers(&a, extra_a, 1);
    start_tg_workers(&b, extra_b, 1);
    ca = tgh_conn_open(a.port, 5000);
    cb = tgh_conn_open(b.port, 5000);
    TGH_CHECK(ca != NULL && cb != NULL, "connect");

    /* B: exact, then a slice of 5; A: the same, on top */
    for (int i = 0; i < 2; i++)
        TGH_CHECK((st = req(cb, "lh", "/", NULL)) == 200, "B %d: %d", i, st);
    for (int i = 0; i < 2; i++)
        TGH_CHECK((st = req(ca, "lh", "/", NULL)) == 200, "A %d: %d", i, st);
    /* B's tokens go back at its ttl; then the bucket refills: its key expires */
    end = tgh_now_ms() + 15000;
    while (redis_get("tg:{id-lh}:t") != 0 && tgh_now_ms() < end)
        tgh_sleep_ms(5);
    TGH_CHECK(redis_get("tg:{id-lh}:t") == 0, "the bucket never refilled");

    t0 = tgh_now_ms();
    for (int i = 0; i < 40; i++) {
        st = req(cb, "lh", "/", NULL);
        TGH_CHECK(st == 200 || st == 429, "B: %d", st);
        if (st == 429)
            break;
        ok_b++;
    }
    for (int i = 0; i < 8; i++) {
        st = req(ca, "lh", "/", NULL);
        TGH_CHECK(st == 200 || st == 429, "A: %d", st);
        ok_a += st == 200;
    }
    t1 = tgh_now_ms();
    bound = 12 + (long)((t1 - t0) / 200) + 1 + 4;
    cr_log_info("a full bucket: B %d, then A %d admitted in %llu ms (bound %ld)", ok_b,
                ok_a, (unsigned long long)(t1 - t0), bound);
    TGH_CHECK(ok_b >= 12, "B got %d of a full bucket of 12", ok_b);
    TGH_CHECK(ok_a + ok_b <= bound, "%d + %d admitted from a full bucket in %llu ms: "
              "above burst + rate * t + 1 + the 4 tokens A held = %ld", ok_b, ok_a,
              (unsigned long long)(t1 - t0), bound);
    tgh_conn_close(ca);
    tgh_conn_close(cb);
}

/*
 * A key well under its limit, over two workers: 40 requests a second
 * against 100 (T 10 ms, burst 100), slices of 20 with a ttl of 10 s, on 4
 * keep-alive connections (the workers take them in turn), for 5 s.  Every
 * request is admitted and the slices serve most of them: a take per
 * worker every ~20 requests, not a call per request.  A slice whose
 * tokens were spendable only while its charge lasted (20 T = 200 ms,
 * whatever the ttl) made each worker reserve the whole rate: the two
 * together asked for twice the limit, takes were refused and charged
 * again exactly (more calls than requests, and a few 429s).
 */
Test(lease, two_workers_under_the_limit)
{
    static const char *const names[] = { "lw" };
    static const char *const tiers[] = { "basic" };
    static char extra[1024];
    tgh_tollgate tg;
    tgh_conn *c[4] = { NULL };
    uint64_t t0, next;
    long calls0, calls1;
    int st, n = 0, ok = 0, limited = 0, other = 0;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 6000, burst_limit: 100, "
             "lease: { size: 20, ttl_ms: 10000 } }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             keys_file(names, tiers, 1), rds.port);
    start_tg_workers(&tg, extra, 2);
    calls0 = script_calls();
    t0 = tgh_now_ms();
    next = t0;
    while (next < t0 + 5000) {
        uint64_t now = tgh_now_ms();

        /* paced at 40 a second; a late client skips, never catches up */
        if (now < next)
            tgh_sleep_ms((int)(next - now));
        else if (now > next + 25)
            next = now;
        st = req_on(&c[n % 4], tg.port, "lw");
        ok += st == 200;
        limited += st == 429;
        other += st != 200 && st != 429;
        n++;
        next += 25;
    }
    calls1 = script_calls();
    cr_log_info("2 workers, 40/s against 100/s: %d requests, %d admitted, %d limited, "
                "%ld script calls", n, ok, limited, calls1 - calls0);
    TGH_CHECK(other == 0, "%d answers neither 200 nor 429", other);
    TGH_CHECK(ok == n, "%d of %d admitted under the limit (%d limited)", ok, n, limited);
    TGH_CHECK(calls1 - calls0 <= n / 4, "%ld script calls for %d requests",
              calls1 - calls0, n);
    for (int i = 0; i < 4; i++)
        if (c[i] != NULL)
            tgh_conn_close(c[i]);
}

/*
 * Many keys on one worker: 2,000 keys, each sent 5 requests within the
 * ttl (a minute), the keys in turn.  A key's first request is charged
 * exactly and marks its set, its second takes a slice of 50, the three
 * after are spent from the slice: rounds 2 to 5 cost one take per key
 * (8,000 requests, about 2,000 script calls), not a call per request.
 * With a table too small for 2,000 live sets, marks and slices evict
 * each other and every request is charged.
 */
Test(lease, many_keys_one_take_each)
{
    enum { ROUNDS = 5 };
    tgh_tollgate tg;
    tgh_conn *c = NULL;
    long calls1 = 0, calls2;
    int ok = 0;

    start_many(&tg, "mk", "requests_per_minute: 6000000, burst_limit: 100000, "
               "lease: { size: 50, ttl_ms: 60000 }");
    for (int r = 0; r < ROUNDS; r++) {
        if (r == 1)
            calls1 = script_calls();
        for (int i = 0; i < MANY; i++)
            ok += req_on(&c, tg.port, many_names[i]) == 200;
    }
    calls2 = script_calls();
    cr_log_info("leases, %d keys x %d requests on 1 worker: %d admitted, %ld script calls "
                "after the first round", MANY, ROUNDS, ok, calls2 - calls1);
    TGH_CHECK(ok == MANY * ROUNDS, "%d of %d admitted", ok, MANY * ROUNDS);
    TGH_CHECK(calls2 - calls1 <= MANY + MANY / 20,
              "%ld script calls for %d requests of %d keys after their first: "
              "about one take per key expected", calls2 - calls1, MANY * (ROUNDS - 1), MANY);
    tgh_conn_close(c);
}

/* Keys matching pattern whose TAT is more than ahead_us ahead of Redis's
 * clock (one script: the bucket keys hold their TAT in microseconds). */
static long
keys_ahead(const char *pattern, long long ahead_us)
{
    char out[256];

    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out,
                            "EVAL 'local t = redis.call(\"TIME\") "
                            "local now = tonumber(t[1]) * 1000000 + tonumber(t[2]) "
                            "local n = 0 "
                            "for _, k in ipairs(redis.call(\"KEYS\", ARGV[1])) do "
                            "if tonumber(redis.call(\"GET\", k)) > now + tonumber(ARGV[2]) "
                            "then n = n + 1 end end return n' 0 '%s' %lld",
                            pattern, ahead_us) == 0, "EVAL: %s", out);
    return atol(out);
}

/*
 * Many slices live at once on one worker, and all go back at their ttl:
 * 2,000 keys (tier: 1 a minute, burst 20, slices of 5, ttl 5 s) each
 * sent 2 requests (the first exact, the second takes a slice: the TAT 6 T
 * ahead).  Right after, all 2,000 hold their slice (none evicted by
 * another); after the ttl (the sample's walk of a table of thousands of
 * entries), all are given back (4 T: the TAT 2 T ahead).
 */
Test(lease, many_slices_live_and_go_back)
{
    const long long t = 60000000;
    tgh_tollgate tg;
    tgh_conn *c = NULL;
    uint64_t t0, t1, end;
    long held;
    int ok = 0;

    start_many(&tg, "ms", "requests_per_minute: 1, burst_limit: 20, "
               "lease: { size: 5, ttl_ms: 5000 }");
    t0 = tgh_now_ms();
    for (int i = 0; i < 2 * MANY; i++)
        ok += req_on(&c, tg.port, many_names[i / 2]) == 200;
    t1 = tgh_now_ms();
    held = keys_ahead("tg:{id-ms*}:t", 4 * t);
    cr_log_info("leases, %d keys x 2 requests in %llu ms: %d admitted, %ld slices held",
                MANY, (unsigned long long)(t1 - t0), ok, held);
    TGH_CHECK(ok == 2 * MANY, "%d of %d admitted", ok, 2 * MANY);
    if (t1 - t0 < 4000)
        TGH_CHECK(held == MANY, "%ld of %d keys hold their slice within its ttl", held, MANY);
    end = t0 + 5000 + 15000;
    while (held > 0 && tgh_now_ms() < end) {
        tgh_sleep_ms(100);
        held = keys_ahead("tg:{id-ms*}:t", 4 * t);
    }
    TGH_CHECK(held == 0, "%ld of %d slices not given back %llu ms after the first take "
              "(ttl 5 s)", held, MANY, (unsigned long long)(tgh_now_ms() - t0));
    cr_log_info("all %d slices given back %llu ms after the first take (ttl 5000 ms)", MANY,
                (unsigned long long)(tgh_now_ms() - t0));
    tgh_conn_close(c);
}

/* 1 when an EVAL (the refund script: give-backs) in Redis's slow log
 * names key among its keys (the log records every call: threshold 0). */
static int
eval_gave_back(const char *key)
{
    static char out[1 << 20];
    char *line, *save = NULL;
    int state = 0;      /* 0: looking for EVAL; 1: its script (lines), then
                           numkeys (the first line all digits); 2: keys */
    long nkeys = 0;

    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "SLOWLOG GET 100000") == 0,
              "SLOWLOG GET");
    for (line = strtok_r(out, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        if (state == 0) {
            state = strcmp(line, "EVAL") == 0;
        } else if (state == 1) {
            if (line[0] != '\0' && strspn(line, "0123456789") == strlen(line)) {
                nkeys = atol(line);
                state = nkeys > 0 ? 2 : 0;
            }
        } else {
            if (strcmp(line, key) == 0)
                return 1;
            state = --nkeys > 0 ? 2 : 0;
        }
    }
    return 0;
}

/*
 * A give-back that would return nothing costs no call: under a limit far
 * above the load (tier huge: 100,000 a minute, slices of 50), a slice's
 * take wrote a TAT that is behind Redis's clock long before the ttl
 * (300 ms), so the refund script could give nothing back; tollgate does
 * not send it.  Tier short (1 a minute) in the same run shows the
 * give-backs do go out (its TAT goes back 4 T) - and that the sample has
 * passed both expired slices.
 */
Test(lease, no_give_back_call_for_nothing)
{
    static const char *const names[] = { "nh", "ns" };
    static const char *const tiers[] = { "huge", "short" };
    static char extra[1024];
    const long long t = 60000000;
    char out[256];
    tgh_tollgate tg;
    tgh_conn *c;
    long long tat0, tat1;
    int st;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n"
             "  huge: { requests_per_minute: 6000000, burst_limit: 100000, "
             "lease: { size: 50, ttl_ms: 300 } }\n"
             "  short: { requests_per_minute: 1, burst_limit: 20, "
             "lease: { size: 5, ttl_ms: 300 } }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             keys_file(names, tiers, 2), rds.port);
    start_tg(&tg, extra);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "CONFIG SET slowlog-max-len 100000") == 0
              && tgh_redis_cli(rds.port, out, sizeof out,
                               "CONFIG SET slowlog-log-slower-than 0") == 0, "slowlog: %s", out);
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    for (int i = 0; i < 5; i++)
        TGH_CHECK((st = req(c, "nh", "/", NULL)) == 200, "huge: %d", st);
    TGH_CHECK((st = req(c, "ns", "/", NULL)) == 200, "short: %d", st);
    TGH_CHECK((st = req(c, "ns", "/", NULL)) == 200, "short: %d", st);
    tat0 = redis_get("tg:{id-ns}:t");
    tat1 = await_tat("tg:{id-ns}:t", tat0 - 4 * t, 10000);
    TGH_CHECK(tat1 == tat0 - 4 * t, "short: at the ttl: TAT %lld, expected %lld (4 T back)",
              tat1, tat0 - 4 * t);
    TGH_CHECK(eval_gave_back("tg:{id-ns}:t"), "short's give-back is in the slow log");
    TGH_CHECK(!eval_gave_back("tg:{id-nh}:t"),
              "huge's slice was given back in a call, though nothing could come back");
    tgh_conn_close(c);
}

/*
 * A reload gives every slice of a large table back: 2,000 keys (ttl an
 * hour) each take a slice of 5 on one worker (the TAT 6 T ahead); after
 * a SIGHUP all 2,000 are 4 T back (2 T ahead), without waiting for a ttl.
 */
Test(lease, reload_gives_many_slices_back)
{
    const long long t = 60000000;
    tgh_tollgate tg;
    tgh_conn *c = NULL;
    uint64_t end;
    long held;
    int ok = 0;

    start_many(&tg, "mr", "requests_per_minute: 1, burst_limit: 20, "
               "lease: { size: 5, ttl_ms: 3600000 }");
    for (int i = 0; i < 2 * MANY; i++)
        ok += req_on(&c, tg.port, many_names[i / 2]) == 200;
    TGH_CHECK(ok == 2 * MANY, "%d of %d admitted", ok, 2 * MANY);
    held = keys_ahead("tg:{id-mr*}:t", 4 * t);
    TGH_CHECK(held == MANY, "%ld of %d keys hold their slice (ttl an hour)", held, MANY);
    reload_replace(&tg, "burst_limit: 20", "burst_limit: 20 ");
    end = tgh_now_ms() + 10000;
    while (held > 0 && tgh_now_ms() < end) {
        tgh_sleep_ms(50);
        held = keys_ahead("tg:{id-mr*}:t", 4 * t);
    }
    TGH_CHECK(held == 0, "%ld of %d slices not given back after the reload", held, MANY);
    TGH_CHECK(keys_ahead("tg:{id-mr*}:t", 0) == MANY, "the buckets keep the first request and "
              "the slice's spent token");
    tgh_conn_close(c);
}
