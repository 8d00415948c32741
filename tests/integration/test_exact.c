/*
 * test_exact.c - limits that hold under faults and floods, through the
 * tollgate binary with a real redis-server: the fallback continues where
 * Redis left off (exact counts), a bad bucket value in Redis touches only
 * its own consumer, /readyz follows the breaker under on_failure: deny, a
 * flood of random keys costs Redis a bounded number of lookups while valid
 * keys keep working (through an outage too), a reload that turns auth on
 * charges Redis, and a route whose cost is above a divided fallback burst
 * still passes.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <openssl/sha.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

TestSuite(exact, .fini = tgh_cleanup, .timeout = 240);

static tgh_upstream up, rds;
static tgh_tollgate tg;

static void
sha_hex(const char *key, char out[65])
{
    unsigned char d[32];

    SHA256((const unsigned char *)key, strlen(key), d);
    for (int i = 0; i < 32; i++)
        sprintf(out + 2 * i, "%02x", d[i]);
}

/* keys.yaml with ids "id-<name>", tier basic. */
static const char *
keys_file(const char *const *names, size_t n)
{
    static char path[512];
    char hex[65];
    FILE *f;

    snprintf(path, sizeof path, "%s/xkeys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("keys:\n", f);
    for (size_t i = 0; i < n; i++) {
        sha_hex(names[i], hex);
        fprintf(f, "  - { id: id-%s, tier: basic, sha256: \"%s\" }\n", names[i], hex);
    }
    fclose(f);
    return path;
}

/* tg-testup, then tollgate with store: redis and extra (redis runs). */
static void
start_tollgate(const char *extra)
{
    tgh_tg_opts o;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    tgh_tg_opts_default(&o, up.port);
    o.store = "redis";
    o.extra_yaml = extra;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
}

static int
admin_status(const char *path, const char *needle)
{
    tgh_resp r;
    int st;

    if (tgh_http(tg.admin_port, "GET", path, NULL, NULL, 0, &r, 5000) != 0)
        return -1;
    st = r.status;
    if (needle != NULL && (r.body == NULL || strstr((char *)r.body, needle) == NULL))
        st = -2;
    tgh_resp_free(&r);
    return st;
}

/* Poll an admin path until it answers want (and contains needle). */
static void
await_admin(const char *path, int want, const char *needle, int timeout_ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    int st = 0;

    while (tgh_now_ms() < end) {
        st = admin_status(path, needle);
        if (st == want)
            return;
        tgh_sleep_ms(20);
    }
    TGH_CHECK(0, "%s answered %d, expected %d%s%s", path, st, want,
              needle ? " with " : "", needle ? needle : "");
}

static int
get(const char *key, const char *method, const char *path, tgh_resp *keep)
{
    tgh_resp r;
    char *hdr = key ? tgh_strf("X-API-Key: %s\r\n", key) : tgh_strf("%s", "");
    int rc = tgh_http(tg.port, method, path, hdr, NULL, 0, &r, 10000);
    int st = rc == 0 ? r.status : -1;

    free(hdr);
    if (rc == 0 && keep != NULL)
        *keep = r;
    else if (rc == 0)
        tgh_resp_free(&r);
    return st;
}

static long long
redis_int(const char *fmt, const char *arg)
{
    char out[256];

    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, fmt, arg) == 0, "redis-cli");
    return atoll(out);
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

/* ---- the fallback continues where Redis left off ------------------------- */

/*
 * basic: 5 at once, one token a minute.  The key spends its burst on
 * Redis; Redis dies; on the local fallback the key has nothing left: 0
 * more admitted (a fresh local bucket gave it 5 more before).  A key that
 * never spent anything keeps its 5.
 */
Test(exact, fallback_continues_from_redis)
{
    static const char *const names[] = { "fa", "fb" };
    static char extra[1024];
    int ok = 0, limited = 0;

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 1, burst_limit: 5 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 50, on_failure: local }\n",
             keys_file(names, 2), rds.port);
    start_tollgate(extra);
    await_admin("/status", 200, "\"mode\":\"redis\"", 15000);
    for (int i = 0; i < 5; i++)
        TGH_CHECK(get("fa", "GET", "/", NULL) == 200, "request %d on Redis", i);
    TGH_CHECK(get("fa", "GET", "/", NULL) == 429, "6th on Redis");
    TGH_CHECK(redis_int("EXISTS %s", "tg:{id-fa}:t") == 1, "charged in Redis");

    tgh_proc_stop(rds.proc, 5000);
    for (int i = 0; i < 12; i++) {
        int st = get("fa", "GET", "/", NULL);
        TGH_CHECK(st == 200 || st == 429, "fallback request %d: %d", i, st);
        ok += st == 200;
        limited += st == 429;
    }
    cr_log_info("after the Redis fault: %d admitted, %d limited (bound: 0 more)",
                ok, limited);
    TGH_CHECK(ok == 0, "the fallback admitted %d more of a spent key (burst 5, "
              "one token a minute)", ok);
    ok = 0;
    for (int i = 0; i < 7; i++)
        ok += get("fb", "GET", "/", NULL) == 200;
    TGH_CHECK(ok == 5, "an unspent key got %d of its 5 on the fallback", ok);
}

/* ---- one bad value, one consumer ------------------------------------------ */

/* Requests of several consumers sent at once, so that they share batches. */
static void
fire_all(const char *const *keys, size_t nkeys, int per, int *status)
{
    tgh_conn *c[64];
    size_t n = nkeys * (size_t)per;

    cr_assert(n <= 64);
    for (size_t i = 0; i < n; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(c[i] != NULL, "connect");
    }
    for (size_t i = 0; i < n; i++) {
        char *req = tgh_strf("GET / HTTP/1.1\r\nHost: t\r\nX-API-Key: %s\r\n\r\n",
                             keys[i % nkeys]);
        TGH_CHECK(tgh_conn_sendstr(c[i], req) == 0, "send");
        free(req);
    }
    for (size_t i = 0; i < n; i++) {
        tgh_resp r;
        TGH_CHECK(tgh_conn_read_response(c[i], &r, 0, 10000) == 0, "read %zu", i);
        status[i] = r.status;
        tgh_resp_free(&r);
        tgh_conn_close(c[i]);
    }
}

Test(exact, bad_bucket_value_touches_only_its_consumer)
{
    static const char *const names[] = { "ok1", "lst", "nan", "big", "inf", "ok2" };
    static char extra[1024];
    char out[64];
    int status[48];

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 60, burst_limit: 20 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n",
             keys_file(names, 6), rds.port);
    start_tollgate(extra);
    await_admin("/readyz", 200, NULL, 15000);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "RPUSH tg:{id-lst}:t x") == 0, "rpush");
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "SET tg:{id-nan}:t nan") == 0, "set");
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "SET tg:{id-big}:t 1e300") == 0, "set");
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "SET tg:{id-inf}:t inf") == 0, "set");

    fire_all(names, 6, 8, status);
    for (int i = 0; i < 48; i++)
        TGH_CHECK(status[i] == 200, "request %d (%s): %d", i, names[i % 6], status[i]);
    /* the bad values were replaced by buckets: 8 spent of 20 */
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "TYPE tg:{id-lst}:t") == 0
              && strcmp(out, "string") == 0, "TYPE after the charge: %s", out);
    {
        tgh_resp r;
        const char *h;
        TGH_CHECK(get("nan", "GET", "/", &r) == 200, "nan consumer");
        h = tgh_resp_header(&r, "X-RateLimit-Remaining");
        TGH_CHECK(h && atoi(h) == 11, "remaining %s (20 - 9)", h ? h : "-");
        tgh_resp_free(&r);
    }
}

/* ---- /readyz follows the breaker ------------------------------------------ */

/*
 * on_failure: deny.  A frozen Redis (SIGSTOP) still accepts connections,
 * so the worker's connection looks up while every request gets 503: not
 * ready.  503s say when to come back (the breaker's time, 1..5 s).  After
 * SIGCONT readiness comes back without any traffic (the breaker probes).
 */
Test(exact, readyz_under_deny_follows_the_breaker)
{
    static const char *const names[] = { "rd" };
    static char extra[1024];
    int got503 = 0;
    uint64_t end;

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 6000, burst_limit: 1000 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 50, on_failure: deny }\n",
             keys_file(names, 1), rds.port);
    start_tollgate(extra);
    await_admin("/readyz", 200, NULL, 15000);
    TGH_CHECK(get("rd", "GET", "/", NULL) == 200, "before the freeze");

    tgh_proc_signal(rds.proc, SIGSTOP, 0);
    end = tgh_now_ms() + 20000;
    while (tgh_now_ms() < end) {
        tgh_resp r;
        int st = get("rd", "GET", "/", &r);
        TGH_CHECK(st == 503 || st == 200, "status %d under deny", st);
        if (st == 200) {
            tgh_resp_free(&r);          /* answered before the deadline */
        } else {
            const char *h = tgh_resp_header(&r, "Retry-After");
            TGH_CHECK(h && atoi(h) >= 1 && atoi(h) <= 5, "Retry-After %s", h ? h : "-");
            got503++;
            tgh_resp_free(&r);
        }
        if (got503 >= 10 && admin_status("/readyz", NULL) == 503
            && admin_status("/status", "\"mode\":\"deny\"") == 200)
            break;
        tgh_sleep_ms(20);
    }
    /* ... and stays so while Redis is frozen (its port still accepts
     * connections: the workers reconnect, their breakers stay open) */
    for (int i = 0; i < 40; i++) {
        int st = get("rd", "GET", "/", NULL);
        TGH_CHECK(st == 503, "status %d under deny with Redis frozen", st);
        TGH_CHECK(admin_status("/readyz", NULL) == 503,
                  "ready while every request gets 503 (check %d)", i);
        TGH_CHECK(admin_status("/status", "\"mode\":\"deny\"") == 200,
                  "status mode not deny while requests get 503 (check %d)", i);
        tgh_sleep_ms(50);
    }

    tgh_proc_signal(rds.proc, SIGCONT, 0);
    /* no traffic at all: the breaker must probe by itself */
    await_admin("/readyz", 200, NULL, 15000);
    await_admin("/status", 200, "\"mode\":\"redis\"", 5000);
    TGH_CHECK(get("rd", "GET", "/", NULL) == 200, "after SIGCONT");
}

/* ---- a flood of random keys ----------------------------------------------- */

/* Send n requests with random keys (and every 500th the valid key) over
 * pipelined keep-alive connections; counts statuses of the random ones,
 * and checks each valid one is 200. */
typedef struct flood {
    long ok, unauth, limited, other, valid_ok, valid_bad;
} flood;

static void
flood_run(int n, const char *valid, uint32_t seed, flood *f)
{
    enum { PIPE = 100, PER_CONN = 5000 };
    tgh_conn *c = NULL;
    int sent_on_conn = 0;

    memset(f, 0, sizeof *f);
    for (int i = 0; i < n; i += PIPE) {
        int m = n - i < PIPE ? n - i : PIPE;
        char *buf = NULL;
        size_t blen = 0;
        FILE *ms = open_memstream(&buf, &blen);

        if (c == NULL || sent_on_conn + m > PER_CONN) {
            if (c != NULL)
                tgh_conn_close(c);
            c = tgh_conn_open(tg.port, 5000);
            TGH_CHECK(c != NULL, "connect");
            sent_on_conn = 0;
        }
        for (int k = 0; k < m; k++) {
            if ((i + k) % 500 == 499)
                fprintf(ms, "GET / HTTP/1.1\r\nHost: t\r\nX-API-Key: %s\r\n\r\n", valid);
            else
                fprintf(ms, "GET / HTTP/1.1\r\nHost: t\r\nX-API-Key: rnd-%08x-%d\r\n\r\n",
                        seed, i + k);
        }
        fclose(ms);
        TGH_CHECK(tgh_conn_send(c, buf, blen, 10000) == 0, "send");
        free(buf);
        for (int k = 0; k < m; k++) {
            tgh_resp r;
            TGH_CHECK(tgh_conn_read_response(c, &r, 0, 10000) == 0, "read %d", i + k);
            if ((i + k) % 500 == 499) {
                if (r.status == 200)
                    f->valid_ok++;
                else
                    f->valid_bad++;
            } else if (r.status == 401) {
                f->unauth++;
            } else if (r.status == 429) {
                f->limited++;
            } else if (r.status == 200) {
                f->ok++;
            } else {
                f->other++;
            }
            tgh_resp_free(&r);
        }
        sent_on_conn += m;
    }
    if (c != NULL)
        tgh_conn_close(c);
}

Test(exact, flood_of_random_keys_costs_bounded_lookups)
{
    enum { N = 50000, BURST = 50, RPM = 60 };
    static char extra[1024];
    char hex[65], out[64];
    uint64_t t0;
    long hget0, hget1, bound;
    double secs;
    flood f;

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 6000000, burst_limit: 100000 }\n"
             "auth:\n  redis_keys: true\n  cache_ttl_ms: 1000\n"
             "  unknown_key_limit: { requests_per_minute: %d, burst_limit: %d }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 200, on_failure: local }\n",
             RPM, BURST, rds.port);
    start_tollgate(extra);
    await_admin("/readyz", 200, NULL, 15000);
    sha_hex("valid-key", hex);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HSET tg:keys %s vk:basic", hex) == 0,
              "HSET");
    /* both workers learn the valid key */
    for (int i = 0; i < 8; i++)
        TGH_CHECK(get("valid-key", "GET", "/", NULL) == 200, "valid key %d", i);

    hget0 = redis_calls("hget");
    t0 = tgh_now_ms();
    flood_run(N, "valid-key", 0x5eed, &f);
    secs = (double)(tgh_now_ms() - t0) / 1000.0;
    hget1 = redis_calls("hget");
    /* one bucket per address per process: burst + rate * t lookups */
    bound = BURST + (long)(RPM * secs / 60.0) + 1;
    cr_log_info("flood: %d random keys in %.1f s: %ld x 401, %ld x 429, %ld other; "
                "valid key %ld ok / %ld not; Redis HGET calls %ld (bound %ld): "
                "%.5f per request", N, secs, f.unauth, f.limited, f.other + f.ok,
                f.valid_ok, f.valid_bad, hget1 - hget0, bound,
                (double)(hget1 - hget0) / N);
    TGH_CHECK(f.ok == 0 && f.other == 0, "random keys: %ld admitted, %ld other", f.ok,
              f.other);
    TGH_CHECK(f.unauth + f.limited == N - N / 500, "lost answers");
    TGH_CHECK(f.valid_bad == 0, "the valid key failed %ld times during the flood",
              f.valid_bad);
    TGH_CHECK(hget1 - hget0 <= bound, "Redis saw %ld lookups, bound %ld",
              hget1 - hget0, bound);

    /* an outage: the valid key's (stale) entry still speaks for it */
    tgh_proc_stop(rds.proc, 5000);
    tgh_sleep_ms(1100);                 /* past cache_ttl_ms: entries are stale */
    for (int i = 0; i < 10; i++) {
        int st = get("valid-key", "GET", "/", NULL);
        TGH_CHECK(st == 200, "valid key during the outage: %d", st);
    }
    TGH_CHECK(get("rnd-never-seen", "GET", "/", NULL) != 200, "unknown key let in");
}

/* ---- a reload that turns auth on ----------------------------------------- */

/* Append text to the running config and SIGHUP; wait for the log line. */
static void
reload_with(const char *text)
{
    FILE *f = fopen(tg.conf_path, "a");

    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
    tgh_proc_signal(tg.proc, SIGHUP, 0);
}

static void
await_key_status(const char *key, int want)
{
    uint64_t end = tgh_now_ms() + 10000;
    int st = 0, row = 0;

    while (tgh_now_ms() < end && row < 8) {
        st = get(key, "GET", "/", NULL);
        row = st == want ? row + 1 : 0;
        if (row == 0)
            tgh_sleep_ms(20);
    }
    TGH_CHECK(row >= 8, "key %s: %d, expected %d after the reload", key, st, want);
}

Test(exact, reload_turning_auth_on_charges_redis)
{
    static const char *const names[] = { "ra" };
    static char extra[1024], more[1024];
    char hex[65], out[64];

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 60, burst_limit: 1000 }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: local }\n",
             rds.port);
    start_tollgate(extra);
    TGH_CHECK(get("anything", "GET", "/", NULL) == 200, "a plain proxy at first");

    /* only redis_keys: the keys live in Redis */
    sha_hex("rk", hex);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HSET tg:keys %s id-rk:basic", hex) == 0,
              "HSET");
    snprintf(more, sizeof more, "auth: { redis_keys: true, keys_file: %s }\n",
             keys_file(names, 1));
    reload_with(more);
    await_key_status("not-a-key", 401);
    await_key_status("rk", 200);
    await_key_status("ra", 200);
    TGH_CHECK(redis_int("EXISTS %s", "tg:{id-rk}:t") == 1,
              "a Redis key was not charged in Redis");
    TGH_CHECK(redis_int("EXISTS %s", "tg:{id-ra}:t") == 1,
              "a keys-file key was charged in local buckets, not in Redis");
}

/* ---- a cost above a divided burst ----------------------------------------- */

/*
 * The production sample: cost 10, burst 20, 3 instances.  On the local
 * fallback each instance keeps burst/3 = 6 - below the cost, which could
 * never pass.  The fallback keeps the burst at least the largest cost.
 */
Test(exact, fallback_burst_is_never_below_a_cost)
{
    static const char *const names[] = { "ex" };
    static char extra[1024];
    tgh_resp r;
    int st;

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 100, burst_limit: 20 }\n"
             "auth: { keys_file: %s }\n"
             "routes:\n  - name: export\n    method: POST\n    path: /export\n"
             "    cost: 10\n    limit: { requests_per_minute: 60, burst_limit: 20 }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 50, on_failure: local,"
             " instances: 3 }\n",
             keys_file(names, 1), rds.port);
    start_tollgate(extra);
    tgh_proc_stop(rds.proc, 5000);
    st = get("ex", "POST", "/export", &r);
    TGH_CHECK(st == 200, "cost 10 on the fallback (burst 20 / 3 instances): %d", st);
    tgh_resp_free(&r);
    st = get("ex", "POST", "/export", &r);
    TGH_CHECK(st == 429, "second export at once: %d", st);
    TGH_CHECK(tgh_resp_header(&r, "Retry-After") != NULL, "a 429 that can pass later "
              "says when");
    tgh_resp_free(&r);
}

/* ---- late answers are given back ------------------------------------------- */

/*
 * on_failure: deny, deadline 50 ms.  Redis pauses writes for 400 ms: two
 * charges wait there, miss their deadline (503) and are applied when the
 * pause ends.  Those requests were refused: their tokens come back (the
 * late answers are refunded), so the key still has its whole burst.  (Two:
 * a third missed deadline in a row would drop that connection, and with
 * it the late answers.)
 */
Test(exact, late_answers_consume_nothing)
{
    static const char *const names[] = { "la" };
    static char extra[1024];
    char out[64];
    int ok = 0;

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 1, burst_limit: 5 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 50, on_failure: deny }\n",
             keys_file(names, 1), rds.port);
    start_tollgate(extra);
    await_admin("/readyz", 200, NULL, 15000);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "CLIENT PAUSE 400 WRITE") == 0,
              "CLIENT PAUSE");
    for (int i = 0; i < 2; i++) {
        int st = get("la", "GET", "/", NULL);
        TGH_CHECK(st == 503, "request %d during the pause: %d", i, st);
    }
    /* the pause ends (a write of ours waits for it, behind the charges);
     * the charges run, their late answers are refunded */
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "SET sync 1") == 0, "SET");
    await_admin("/readyz", 200, NULL, 15000);
    {
        uint64_t end = tgh_now_ms() + 5000;
        while (tgh_now_ms() < end && redis_int("EXISTS %s", "tg:{id-la}:t") != 0)
            tgh_sleep_ms(20);
    }
    for (int i = 0; i < 7; i++) {
        int st = get("la", "GET", "/", NULL);
        TGH_CHECK(st == 200 || st == 429, "after the pause: %d", st);
        ok += st == 200;
    }
    TGH_CHECK(ok == 5, "%d admitted after 2 refused requests, burst 5", ok);
}

/* ---- the store stays as started ------------------------------------------- */

static int
log_has(const char *needle)
{
    static char buf[262144];
    FILE *f = fopen(tg.proc->log_path, "r");
    size_t n;

    if (f == NULL)
        return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return strstr(buf, needle) != NULL;
}

/* A reload that changes the prefix and the timeout: both named in the
 * log, neither applied (a new prefix would hand every consumer fresh
 * buckets). */
Test(exact, reload_keeps_the_store_as_started)
{
    static const char *const names[] = { "sp" };
    static char extra[1024], text[8192];
    char *p;
    FILE *f;
    size_t n;
    uint64_t end;
    tgh_resp r;

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 60, burst_limit: 10 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: local }\n",
             keys_file(names, 1), rds.port);
    start_tollgate(extra);
    await_admin("/status", 200, "\"mode\":\"redis\"", 15000);

    f = fopen(tg.conf_path, "r");
    cr_assert_not_null(f);
    n = fread(text, 1, sizeof text - 1, f);
    text[n] = '\0';
    fclose(f);
    p = strstr(text, "timeout_ms: 500, on_failure: local }");
    cr_assert_not_null(p);
    f = fopen(tg.conf_path, "w");
    cr_assert_not_null(f);
    fprintf(f, "%.*stimeout_ms: 400, prefix: \"new:\", on_failure: local }%s",
            (int)(p - text), text, p + strlen("timeout_ms: 500, on_failure: local }"));
    fclose(f);
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && !log_has("configuration reloaded"))
        tgh_sleep_ms(20);
    TGH_CHECK(log_has("SIGHUP: redis.timeout_ms, redis.prefix changed: the store keeps "
                      "its settings as started until the next restart"),
              "no warning naming the changed store keys");
    TGH_CHECK(get("sp", "GET", "/", &r) == 200, "a request after the reload");
    tgh_resp_free(&r);
    TGH_CHECK(redis_int("EXISTS %s", "tg:{id-sp}:t") == 1, "not charged under the old prefix");
    TGH_CHECK(redis_int("EXISTS %s", "new:{id-sp}:t") == 0, "charged under the new prefix");
}

/* ---- one deadline per request ---------------------------------------------- */

/*
 * A key that must be looked up in Redis, then charged: redis.timeout_ms
 * covers both.  Redis is made slow for the lookup (a read-only script
 * busy for 150 ms ahead of it) and stuck for the charge (writes paused):
 * the answer (the local fallback) comes at the one deadline, 200 ms after
 * the request reached the limiter - not 150 + 200.
 */
Test(exact, one_deadline_covers_lookup_and_charge)
{
    static const char busy[] =
        "#!lua flags=no-writes\n"
        "local t0 = redis.call('TIME')\n"
        "local s = t0[1] * 1000000 + t0[2]\n"
        "repeat local t = redis.call('TIME') until t[1] * 1000000 + t[2] - s >= 150000\n"
        "return 1\n";
    static char extra[1024];
    char hex[65], out[64], *cmd;
    tgh_conn *rc;
    uint64_t t0;
    long ms;
    int st;

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 60, burst_limit: 10 }\n"
             "auth: { redis_keys: true }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 200, on_failure: local }\n",
             rds.port);
    start_tollgate(extra);
    await_admin("/readyz", 200, NULL, 15000);
    sha_hex("dk", hex);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HSET tg:keys %s id-dk:basic", hex) == 0,
              "HSET");

    rc = tgh_conn_open(rds.port, 5000);
    TGH_CHECK(rc != NULL, "connect to redis");
    cmd = tgh_strf("*4\r\n$6\r\nCLIENT\r\n$5\r\nPAUSE\r\n$4\r\n2000\r\n$5\r\nWRITE\r\n"
                   "*3\r\n$4\r\nEVAL\r\n$%zu\r\n%s\r\n$1\r\n0\r\n", strlen(busy), busy);
    TGH_CHECK(tgh_conn_sendstr(rc, cmd) == 0, "send");
    free(cmd);
    t0 = tgh_now_ms();
    st = get("dk", "GET", "/", NULL);
    ms = (long)(tgh_now_ms() - t0);
    cr_log_info("lookup 150 ms slow, charge stuck, timeout_ms 200: answered %d in %ld ms",
                st, ms);
    TGH_CHECK(st == 200, "status %d (the local fallback)", st);
    TGH_CHECK(ms < 300, "answered after %ld ms: more than one deadline (200 ms)", ms);
    tgh_conn_close(rc);
}
