/*
 * test_limits.c - API keys and token buckets end to end: the real tollgate
 * binary, tg-testup as the upstream, and a real redis-server (store: redis)
 * or the in-process store (store: local).
 */
#include <criterion/criterion.h>

#include <openssl/sha.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

TestSuite(limits, .fini = tgh_cleanup, .timeout = 120);

static tgh_upstream up, rds;
static tgh_tollgate tg, tg2;

static const char *const key_names[] = { "k-basic", "k-pro", "k-ent", "k-off" };
static const char *const key_tiers[] = { "basic", "pro", "enterprise", "basic" };

/* Write keys.yaml with the SHA-256 of each name; returns its path. */
static const char *
write_keys_list(const char *const *names, const char *const *tiers, const int *enabled,
                size_t n)
{
    static char path[512];
    char tmp[600];
    FILE *f;
    size_t i, j;

    snprintf(path, sizeof path, "%s/keys.yaml", tgh_tmpdir());
    snprintf(tmp, sizeof tmp, "%s.new", path);
    f = fopen(tmp, "w");
    cr_assert_not_null(f);
    fputs("keys:\n", f);
    for (i = 0; i < n; i++) {
        unsigned char d[32];
        SHA256((const unsigned char *)names[i], strlen(names[i]), d);
        fprintf(f, "  - { id: id-%s, tier: %s, enabled: %s, sha256: \"", names[i],
                tiers[i], enabled[i] ? "true" : "false");
        for (j = 0; j < 32; j++)
            fprintf(f, "%02x", d[j]);
        fputs("\" }\n", f);
    }
    fclose(f);
    cr_assert_eq(rename(tmp, path), 0);   /* a reload never sees half a file */
    return path;
}

/* The test keys: k-off is disabled. */
static const char *
write_keys(void)
{
    static const int enabled[] = { 1, 1, 1, 0 };
    return write_keys_list(key_names, key_tiers, enabled, 4);
}

/* /readyz turns 200 once every worker reaches its store. */
static void
wait_ready(tgh_tollgate *t)
{
    uint64_t end = tgh_now_ms() + 15000;
    int st = 0;

    while (tgh_now_ms() < end) {
        tgh_resp r;
        if (tgh_http(t->admin_port, "GET", "/readyz", NULL, NULL, 0, &r, 5000) == 0) {
            st = r.status;
            tgh_resp_free(&r);
            if (st == 200)
                return;
        }
        tgh_sleep_ms(20);
    }
    TGH_CHECK(0, "tollgate never became ready (/readyz %d)", st);
}

static const char *auth_extra = "";    /* more auth: keys for one test */
static const char *more_yaml = "";     /* more top-level sections for one test */

static void
start(const char *store, int instances)
{
    static char extra[2048];
    tgh_tg_opts o;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    if (strcmp(store, "redis") == 0)
        TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n"
             "  basic:      { requests_per_minute: 100,  burst_limit: 20 }\n"
             "  pro:        { requests_per_minute: 500,  burst_limit: 100 }\n"
             "  enterprise: { requests_per_minute: 1000, burst_limit: 200 }\n"
             "auth: { keys_file: %s%s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 500, on_failure: deny }\n"
             "%s",
             write_keys(), auth_extra, rds.port > 0 ? rds.port : 6379, more_yaml);
    tgh_tg_opts_default(&o, up.port);
    o.store = store;
    o.extra_yaml = extra;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
    wait_ready(&tg);
    if (instances > 1) {
        TGH_CHECK(tgh_tollgate_start(&tg2, &o) == 0, "second tollgate");
        wait_ready(&tg2);
    }
}

/* One GET with a key header (or none); returns the status, fills r. */
static int
get(int port, const char *key, const char *path, tgh_resp *r)
{
    char *hdr = key ? tgh_strf("X-API-Key: %s\r\n", key) : tgh_strf("%s", "");
    int rc = tgh_http(port, "GET", path, hdr, NULL, 0, r, 10000);
    free(hdr);
    return rc == 0 ? r->status : -1;
}

/* Send n requests with key at once (n connections, all written before any
 * is read); count statuses.  Returns the milliseconds the burst took. */
typedef struct burst {
    int ok, limited, other;
    long ms;
} burst;

static burst
fire(int port, const char *key, int n)
{
    burst b = { 0, 0, 0, 0 };
    tgh_conn **c = calloc((size_t)n, sizeof *c);
    char *req = tgh_strf("GET / HTTP/1.1\r\nHost: t\r\nX-API-Key: %s\r\n\r\n", key);
    uint64_t t0;
    int i;

    for (i = 0; i < n; i++) {
        c[i] = tgh_conn_open(port, 5000);
        TGH_CHECK(c[i] != NULL, "connect %d", i);
    }
    t0 = tgh_now_ms();
    for (i = 0; i < n; i++)
        TGH_CHECK(tgh_conn_sendstr(c[i], req) == 0, "send %d", i);
    for (i = 0; i < n; i++) {
        tgh_resp r;
        TGH_CHECK(tgh_conn_read_response(c[i], &r, 0, 10000) == 0, "read %d", i);
        if (r.status == 200)
            b.ok++;
        else if (r.status == 429)
            b.limited++;
        else
            b.other++;
        tgh_resp_free(&r);
        tgh_conn_close(c[i]);
    }
    b.ms = (long)(tgh_now_ms() - t0);
    free(req);
    free(c);
    return b;
}

/* burst exactly, when the burst arrived within one refill interval; else
 * never more than burst + the tokens earned meanwhile. */
static void
check_burst(burst b, int burst_limit, long interval_ms, int n)
{
    TGH_CHECK(b.other == 0, "%d responses neither 200 nor 429", b.other);
    TGH_CHECK(b.ok + b.limited == n, "lost responses: %d + %d != %d", b.ok, b.limited, n);
    if (b.ms < interval_ms) {
        TGH_CHECK(b.ok == burst_limit, "%d allowed, expected exactly %d (burst took %ld ms)",
                  b.ok, burst_limit, b.ms);
    } else {
        long earned = b.ms / interval_ms + 1;
        TGH_CHECK(b.ok >= burst_limit && b.ok <= burst_limit + earned,
                  "%d allowed, expected %d..%ld (burst took %ld ms)", b.ok, burst_limit,
                  burst_limit + earned, b.ms);
    }
}

/* After the basic burst: the next token comes 0.6 s after the first charge;
 * poll until one 200, and the request right after it is refused. */
static void
check_refill_one(int port, uint64_t burst_start)
{
    tgh_resp r;
    uint64_t end = tgh_now_ms() + 5000;
    int st = 0;

    while (tgh_now_ms() < end) {
        st = get(port, "k-basic", "/", &r);
        tgh_resp_free(&r);
        if (st == 200)
            break;
        TGH_CHECK(st == 429, "status %d while waiting for a token", st);
        tgh_sleep_ms(50);
    }
    TGH_CHECK(st == 200, "no token came back within 5 s");
    TGH_CHECK(tgh_now_ms() - burst_start >= 550, "a token came back after only %llu ms",
              (unsigned long long)(tgh_now_ms() - burst_start));
    st = get(port, "k-basic", "/", &r);
    TGH_CHECK(st == 429, "a second request right after the refill got %d", st);
    tgh_resp_free(&r);
}

static void
basic_burst(const char *store)
{
    uint64_t t0;
    burst b;

    start(store, 1);
    t0 = tgh_now_ms();
    b = fire(tg.port, "k-basic", 40);
    check_burst(b, 20, 600, 40);
    check_refill_one(tg.port, t0);
}

Test(limits, basic_burst_local) { basic_burst("local"); }
Test(limits, basic_burst_redis) { basic_burst("redis"); }

static void
pro_enterprise(const char *store)
{
    start(store, 1);
    check_burst(fire(tg.port, "k-pro", 200), 100, 120, 200);
    check_burst(fire(tg.port, "k-ent", 400), 200, 60, 400);
}

Test(limits, pro_and_enterprise_local) { pro_enterprise("local"); }
Test(limits, pro_and_enterprise_redis) { pro_enterprise("redis"); }

/* ---- two instances, one Redis --------------------------------------- */

typedef struct fire_arg {
    int port;
    burst b;
} fire_arg;

static void *
fire_thread(void *p)
{
    fire_arg *a = p;
    a->b = fire(a->port, "k-basic", 30);
    return NULL;
}

Test(limits, two_instances_share_the_burst)
{
    pthread_t t1, t2;
    fire_arg a1, a2;
    burst sum;

    start("redis", 2);
    a1.port = tg.port;
    a2.port = tg2.port;
    pthread_create(&t1, NULL, fire_thread, &a1);
    pthread_create(&t2, NULL, fire_thread, &a2);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    sum.ok = a1.b.ok + a2.b.ok;
    sum.limited = a1.b.limited + a2.b.limited;
    sum.other = a1.b.other + a2.b.other;
    sum.ms = a1.b.ms > a2.b.ms ? a1.b.ms : a2.b.ms;
    check_burst(sum, 20, 600, 60);
}

/* ---- headers ---------------------------------------------------------- */

static void
headers(const char *store)
{
    tgh_resp r;
    const char *h;
    int i, st;

    start(store, 1);
    st = get(tg.port, "k-basic", "/", &r);
    TGH_CHECK(st == 200, "first request: %d", st);
    h = tgh_resp_header(&r, "RateLimit-Policy");
    TGH_CHECK(h && strcmp(h, "\"basic\";q=20;w=12") == 0, "RateLimit-Policy: %s", h ? h : "-");
    h = tgh_resp_header(&r, "RateLimit");
    TGH_CHECK(h && strcmp(h, "\"basic\";r=19;t=1") == 0, "RateLimit: %s", h ? h : "-");
    h = tgh_resp_header(&r, "X-RateLimit-Limit");
    TGH_CHECK(h && strcmp(h, "20") == 0, "X-RateLimit-Limit: %s", h ? h : "-");
    h = tgh_resp_header(&r, "X-RateLimit-Remaining");
    TGH_CHECK(h && strcmp(h, "19") == 0, "X-RateLimit-Remaining: %s", h ? h : "-");
    TGH_CHECK(tgh_resp_header(&r, "Retry-After") == NULL, "Retry-After on a 200");
    tgh_resp_free(&r);
    for (i = 1; i < 20; i++) {
        st = get(tg.port, "k-basic", "/", &r);
        TGH_CHECK(st == 200, "request %d: %d", i + 1, st);
        h = tgh_resp_header(&r, "X-RateLimit-Remaining");
        TGH_CHECK(h && atoi(h) <= 19 - i + 1, "remaining %s after %d", h ? h : "-", i + 1);
        tgh_resp_free(&r);
    }
    st = get(tg.port, "k-basic", "/", &r);
    TGH_CHECK(st == 429, "21st: %d", st);
    h = tgh_resp_header(&r, "Retry-After");
    TGH_CHECK(h && strcmp(h, "1") == 0, "Retry-After: %s (0.6 s rounded up)", h ? h : "-");
    h = tgh_resp_header(&r, "X-RateLimit-Remaining");
    TGH_CHECK(h && strcmp(h, "0") == 0, "X-RateLimit-Remaining on 429: %s", h ? h : "-");
    h = tgh_resp_header(&r, "RateLimit");
    TGH_CHECK(h && strncmp(h, "\"basic\";r=0;t=", 14) == 0, "RateLimit on 429: %s", h ? h : "-");
    TGH_CHECK(strstr(r.body ? (char *)r.body : "", "rate_limited") != NULL, "429 body");
    tgh_resp_free(&r);
}

Test(limits, headers_local) { headers("local"); }
Test(limits, headers_redis) { headers("redis"); }

/* ---- identity ---------------------------------------------------------- */

static void
identity(const char *store)
{
    tgh_resp r;
    int st;

    start(store, 1);
    st = get(tg.port, NULL, "/", &r);
    TGH_CHECK(st == 401, "no key: %d", st);
    TGH_CHECK(strstr((char *)r.body, "unauthorized") != NULL, "401 body");
    tgh_resp_free(&r);
    st = get(tg.port, "not-a-key", "/", &r);
    TGH_CHECK(st == 401, "unknown key: %d", st);
    tgh_resp_free(&r);
    st = get(tg.port, "k-off", "/", &r);
    TGH_CHECK(st == 403, "disabled key: %d", st);
    TGH_CHECK(strstr((char *)r.body, "forbidden") != NULL, "403 body");
    tgh_resp_free(&r);

    /* Bearer works; the key is not passed on; consumer headers are ours */
    TGH_CHECK(tgh_http(tg.port, "GET", "/headers",
                       "Authorization: Bearer k-pro\r\nX-Consumer-ID: spoofed\r\n",
                       NULL, 0, &r, 10000) == 0, "bearer request");
    TGH_CHECK(r.status == 200, "bearer: %d", r.status);
    TGH_CHECK(strstr((char *)r.body, "X-Consumer-ID: id-k-pro") != NULL, "consumer id: %s",
              (char *)r.body);
    TGH_CHECK(strstr((char *)r.body, "X-Consumer-Tier: pro") != NULL, "tier");
    TGH_CHECK(strstr((char *)r.body, "spoofed") == NULL, "client's X-Consumer-ID reached upstream");
    TGH_CHECK(strstr((char *)r.body, "Bearer") == NULL
              && strcasestr((char *)r.body, "authorization:") == NULL,
              "the key reached upstream: %s", (char *)r.body);
    tgh_resp_free(&r);
}

Test(limits, identity_local) { identity("local"); }
Test(limits, identity_redis) { identity("redis"); }

/* A refused request that asked for 100-continue gets its 429 first. */
Test(limits, expect_continue_refused_before_upload)
{
    tgh_resp r;
    tgh_conn *c;
    int i;

    start("local", 1);
    for (i = 0; i < 20; i++) {
        TGH_CHECK(get(tg.port, "k-basic", "/", &r) == 200, "request %d", i);
        tgh_resp_free(&r);
    }
    c = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c != NULL, "connect");
    TGH_CHECK(tgh_conn_sendstr(c, "POST /echo HTTP/1.1\r\nHost: t\r\nX-API-Key: k-basic\r\n"
                                  "Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n") == 0,
              "send head");
    TGH_CHECK(tgh_conn_read_response(c, &r, TGH_STOP_1XX, 5000) == 0, "read");
    TGH_CHECK(r.status == 429, "expected 429 before any 100 Continue, got %d", r.status);
    tgh_resp_free(&r);
    tgh_conn_close(c);
}

/* ---- Redis specifics ----------------------------------------------------- */

Test(limits, bucket_keys_expire_after_refill)
{
    tgh_resp r;
    char out[256];
    uint64_t end;
    long pttl;
    int i;

    start("redis", 1);
    /* five basic tokens: 3 s until the bucket is full again */
    for (i = 0; i < 5; i++) {
        TGH_CHECK(get(tg.port, "k-basic", "/", &r) == 200, "request %d", i);
        tgh_resp_free(&r);
    }
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "PTTL 'tg:{id-k-basic}:t'") == 0,
              "PTTL");
    pttl = atol(out);
    /* expiry = the bucket's full time, rounded up to the millisecond */
    TGH_CHECK(pttl > 0 && pttl <= 3001, "PTTL of the bucket: %s", out);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end) {
        TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "EXISTS 'tg:{id-k-basic}:t'") == 0,
                  "EXISTS");
        if (strcmp(out, "0") == 0)
            break;
        tgh_sleep_ms(50);
    }
    TGH_CHECK(strcmp(out, "0") == 0, "bucket still there after it refilled");
}

Test(limits, script_flush_is_invisible)
{
    tgh_resp r;
    char out[64];
    int i, st;

    start("redis", 1);
    for (i = 0; i < 60; i++) {
        if (i % 20 == 10)
            TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "SCRIPT FLUSH") == 0, "flush");
        st = get(tg.port, "k-ent", "/", &r);
        TGH_CHECK(st == 200, "request %d after SCRIPT FLUSH: %d", i, st);
        tgh_resp_free(&r);
    }
}

/* ---- SIGHUP ------------------------------------------------------------- */

static int
status_of(const char *key)
{
    tgh_resp r;
    int st = get(tg.port, key, "/", &r);
    tgh_resp_free(&r);
    return st;
}

/* Poll until key gets want (a reload is applied by every worker). */
static void
await_status(const char *key, int want)
{
    uint64_t end = tgh_now_ms() + 10000;
    int st = 0;

    while (tgh_now_ms() < end) {
        st = status_of(key);
        if (st == want) {
            /* both workers: a few more in a row */
            int i, ok = 1;
            for (i = 0; i < 6 && ok; i++)
                ok = status_of(key) == want;
            if (ok)
                return;
        }
        tgh_sleep_ms(20);
    }
    TGH_CHECK(0, "key %s: status %d, expected %d after SIGHUP", key, st, want);
}

static int
log_has(const char *needle)
{
    char buf[65536];
    FILE *f = fopen(tg.proc->log_path, "r");
    size_t n;

    if (f == NULL)
        return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return strstr(buf, needle) != NULL;
}

Test(limits, sighup_reloads_keys_and_refuses_a_bad_file)
{
    static const char *const names[] = { "k-basic", "k-pro", "k-ent", "k-off", "k-new" };
    static const char *const tiers[] = { "basic", "pro", "enterprise", "basic", "pro" };
    static const int enabled[] = { 0, 1, 1, 0, 1 };
    char path[600];
    FILE *f;
    uint64_t end;

    start("local", 1);
    TGH_CHECK(status_of("k-new") == 401, "k-new before it exists");
    TGH_CHECK(status_of("k-basic") == 200, "k-basic before revocation");

    write_keys_list(names, tiers, enabled, 5);      /* add k-new, revoke k-basic */
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    await_status("k-new", 200);
    await_status("k-basic", 403);

    snprintf(path, sizeof path, "%s/keys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("keys:\n  - { id: broken, tier: nosuchtier, sha256: \"00\" }\n", f);
    fclose(f);
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && !log_has("new configuration refused"))
        tgh_sleep_ms(20);
    TGH_CHECK(log_has("new configuration refused"), "no refusal logged for a bad keys file");
    TGH_CHECK(status_of("k-new") == 200, "the running keys were not kept");
    TGH_CHECK(tgh_proc_alive(tg.proc), "tollgate died on a bad reload");
}

/* ---- a tier change (subscription) applies to the next request ------------ */

/* The RateLimit-Policy of one request of key (static buffer; "" if none);
 * *remaining gets the r= of its RateLimit (may be NULL). */
static const char *
policy_of(const char *key, int *status, int *remaining)
{
    static char policy[128];
    tgh_resp r;
    const char *h;

    *status = get(tg.port, key, "/", &r);
    h = tgh_resp_header(&r, "RateLimit-Policy");
    snprintf(policy, sizeof policy, "%s", h ? h : "");
    h = tgh_resp_header(&r, "RateLimit");
    if (remaining != NULL)
        *remaining = h && strstr(h, ";r=") ? atoi(strstr(h, ";r=") + 3) : -1;
    tgh_resp_free(&r);
    return policy;
}

/* Poll until key's answers carry policy want, 8 in a row (every worker);
 * returns the milliseconds it took.  Polls slowly while it differs, so
 * that the old tier's bucket is not drained meanwhile. */
static long
await_policy(const char *key, const char *want, int timeout_ms)
{
    uint64_t t0 = tgh_now_ms();
    const char *got = "";
    int row = 0, st;

    while (tgh_now_ms() - t0 < (uint64_t)timeout_ms) {
        got = policy_of(key, &st, NULL);
        row = strcmp(got, want) == 0 ? row + 1 : 0;
        if (row == 8)
            return (long)(tgh_now_ms() - t0);
        if (row == 0)
            tgh_sleep_ms(100);
    }
    TGH_CHECK(0, "key %s: RateLimit-Policy %s, expected %s", key, got, want);
    return -1;
}

/*
 * After a change of key's tier: one request is charged at the new tier
 * (its policy; R tokens left, at least min_left), then a burst of n gets
 * exactly what the new tier's bucket holds: R, plus what it earned
 * meanwhile at the new tier's rate (interval_ms a token).  The bucket
 * keeps its state as time, so what was used before the change stays used,
 * as the same share of the new bucket.
 */
static void
check_new_tier(const char *key, const char *policy, int min_left, int n, long interval_ms)
{
    uint64_t t0 = tgh_now_ms();
    const char *got;
    long earned;
    int st, left;
    burst b;

    got = policy_of(key, &st, &left);
    TGH_CHECK(st == 200 && strcmp(got, policy) == 0, "%s: %d, %s", key, st, got);
    TGH_CHECK(left >= min_left, "%s: %d tokens left, expected at least %d", key, left,
              min_left);
    b = fire(tg.port, key, n);
    earned = (long)(tgh_now_ms() - t0) / interval_ms + 1;
    TGH_CHECK(b.other == 0, "%d answers neither 200 nor 429", b.other);
    TGH_CHECK(b.ok >= left && b.ok <= left + earned, "%s: %d allowed of %d, expected "
              "%d..%ld at the new tier", key, b.ok, n, left, left + earned);
    TGH_CHECK(b.limited > 0, "%s: nothing refused", key);
}

/* basic -> enterprise and enterprise -> basic in the keys file: the next
 * requests after SIGHUP are charged at the new tier, on the same bucket. */
static void
tier_change_sighup(const char *store)
{
    static const char *const tiers2[] = { "enterprise", "pro", "basic", "basic" };
    static const int enabled[] = { 1, 1, 1, 0 };
    int st;

    start(store, 1);
    TGH_CHECK(strcmp(policy_of("k-basic", &st, NULL), "\"basic\";q=20;w=12") == 0
              && st == 200, "k-basic before");
    TGH_CHECK(strcmp(policy_of("k-ent", &st, NULL), "\"enterprise\";q=200;w=12") == 0
              && st == 200, "k-ent before");
    write_keys_list(key_names, tiers2, enabled, 4);
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    await_policy("k-basic", "\"enterprise\";q=200;w=12", 10000);
    await_policy("k-ent", "\"basic\";q=20;w=12", 10000);
    /* upgraded: more than basic's whole bucket, at enterprise's rate;
     * downgraded: basic's bucket and rate */
    check_new_tier("k-basic", "\"enterprise\";q=200;w=12", 21, 300, 60);
    check_new_tier("k-ent", "\"basic\";q=20;w=12", 1, 40, 600);
}

Test(limits, tier_change_sighup_local) { tier_change_sighup("local"); }
Test(limits, tier_change_sighup_redis) { tier_change_sighup("redis"); }

/* ---- keys in Redis ---------------------------------------------------------- */

static void
sha_hex(const char *key, char out[65])
{
    unsigned char d[32];
    int i;

    SHA256((const unsigned char *)key, strlen(key), d);
    for (i = 0; i < 32; i++)
        sprintf(out + 2 * i, "%02x", d[i]);
}

/* Poll until key gets want from every worker (each has its own cache:
 * 8 answers in a row); returns the milliseconds it took. */
static long
await_key(const char *key, int want, int timeout_ms)
{
    uint64_t t0 = tgh_now_ms();
    int st = 0, row = 0;

    while (tgh_now_ms() - t0 < (uint64_t)timeout_ms) {
        tgh_resp r;
        st = get(tg.port, key, "/", &r);
        tgh_resp_free(&r);
        row = st == want ? row + 1 : 0;
        if (row == 8)
            return (long)(tgh_now_ms() - t0);
        if (row == 0)
            tgh_sleep_ms(20);
    }
    TGH_CHECK(0, "key %s: status %d, expected %d", key, st, want);
    return -1;
}

Test(limits, redis_key_store_and_revocation_within_ttl)
{
    char hex[65], out[128];
    tgh_resp r;
    long ms;

    auth_extra = ", redis_keys: true, cache_ttl_ms: 300";
    start("redis", 1);
    sha_hex("rk-1", hex);
    TGH_CHECK(get(tg.port, "rk-1", "/", &r) == 401, "unknown before HSET");
    tgh_resp_free(&r);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HSET tg:keys %s rk1:pro", hex) == 0,
              "HSET");
    ms = await_key("rk-1", 200, 5000);     /* the cached miss expires */
    TGH_CHECK(ms <= 300 + 700, "a new key took %ld ms to work (cache TTL 300 ms)", ms);
    TGH_CHECK(tgh_http(tg.port, "GET", "/headers", "X-API-Key: rk-1\r\n", NULL, 0, &r,
                       10000) == 0 && r.status == 200, "headers");
    TGH_CHECK(strstr((char *)r.body, "X-Consumer-ID: rk1") != NULL
              && strstr((char *)r.body, "X-Consumer-Tier: pro") != NULL, "%s", (char *)r.body);
    tgh_resp_free(&r);

    /* revoke: disabled within the TTL, then deleted */
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HSET tg:keys %s rk1:pro:disabled",
                            hex) == 0, "HSET disabled");
    ms = await_key("rk-1", 403, 5000);
    TGH_CHECK(ms <= 300 + 700, "revocation took %ld ms (cache TTL 300 ms)", ms);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HDEL tg:keys %s", hex) == 0, "HDEL");
    ms = await_key("rk-1", 401, 5000);
    TGH_CHECK(ms <= 300 + 700, "deletion took %ld ms (cache TTL 300 ms)", ms);
    /* the file's keys still work beside the store */
    TGH_CHECK(get(tg.port, "k-pro", "/", &r) == 200, "file key");
    tgh_resp_free(&r);
    auth_extra = "";
}

/* A tier changed in the Redis key store applies within auth.cache_ttl_ms
 * (each worker's cached entry expires), to the same bucket. */
Test(limits, tier_change_in_redis_key_store_within_ttl)
{
    char hex[65], out[128];
    int st, left;
    long ms;

    auth_extra = ", redis_keys: true, cache_ttl_ms: 300";
    start("redis", 1);
    sha_hex("rk-2", hex);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HSET tg:keys %s rk2:basic", hex) == 0,
              "HSET");
    await_policy("rk-2", "\"basic\";q=20;w=12", 5000);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HSET tg:keys %s rk2:enterprise",
                            hex) == 0, "HSET enterprise");
    ms = await_policy("rk-2", "\"enterprise\";q=200;w=12", 5000);
    TGH_CHECK(ms <= 300 + 700, "the upgrade took %ld ms (cache TTL 300 ms)", ms);
    check_new_tier("rk-2", "\"enterprise\";q=200;w=12", 21, 300, 60);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "HSET tg:keys %s rk2:basic", hex) == 0,
              "HSET basic");
    ms = await_policy("rk-2", "\"basic\";q=20;w=12", 5000);
    TGH_CHECK(ms <= 300 + 700, "the downgrade took %ld ms (cache TTL 300 ms)", ms);
    /* the bucket was emptied as enterprise (12 s of debt): as basic it
     * is just as empty, and refills at basic's rate */
    TGH_CHECK(strcmp(policy_of("rk-2", &st, &left), "\"basic\";q=20;w=12") == 0
              && left <= 1, "right after the downgrade: %d, %d left", st, left);
    auth_extra = "";
}

/* ---- routes, global bucket, anonymous tier ------------------------------------ */

static int
count_ok(const char *key, const char *path, int n, const char **policy_seen)
{
    int i, ok = 0;
    static char policy[128];

    for (i = 0; i < n; i++) {
        tgh_resp r;
        int st = get(tg.port, key, path, &r);
        TGH_CHECK(st == 200 || st == 429, "%s %s: %d", key ? key : "(none)", path, st);
        ok += st == 200;
        if (st == 429 && policy_seen != NULL) {
            const char *h = tgh_resp_header(&r, "RateLimit-Policy");
            snprintf(policy, sizeof policy, "%s", h ? h : "");
            *policy_seen = policy;
        }
        tgh_resp_free(&r);
    }
    return ok;
}

static void
routes_and_global(const char *store)
{
    const char *policy = NULL;
    uint64_t t0;
    long earned;
    int ok;

    more_yaml =
        "routes:\n"
        "  - { name: limited, method: GET, path: /limited, limit: { requests_per_minute: 1, burst_limit: 3 } }\n"
        "  - { name: costly, path: /costly, cost: 5 }\n"
        "global_limit: { requests_per_second: 1, burst: 40 }\n";
    start(store, 1);
    t0 = tgh_now_ms();
    /* route bucket: 3 per key while the tier bucket still has room */
    TGH_CHECK(count_ok("k-ent", "/limited", 6, &policy) == 3, "route bucket");
    TGH_CHECK(policy && strncmp(policy, "\"limited\";q=3", 13) == 0, "policy %s", policy);
    /* cost 5 from every bucket: basic's 20 tokens are 4 requests */
    TGH_CHECK(count_ok("k-basic", "/costly", 6, NULL) == 4, "route cost");
    /* global: 40 in all, 3 + 20 used; 17 left for anybody, plus one a
     * second since the start */
    ok = count_ok("k-pro", "/", 30, &policy);
    earned = (long)(tgh_now_ms() - t0) / 1000 + 1;
    TGH_CHECK(ok >= 17 && ok <= 17 + earned, "global bucket: %d allowed, expected 17..%ld",
              ok, 17 + earned);
    TGH_CHECK(policy && strncmp(policy, "\"global\";q=40", 13) == 0, "policy %s", policy);
    more_yaml = "";
}

Test(limits, routes_and_global_local) { routes_and_global("local"); }
Test(limits, routes_and_global_redis) { routes_and_global("redis"); }

Test(limits, anonymous_tier_by_client_ip)
{
    tgh_resp r;

    auth_extra = ", anonymous_tier: basic";
    start("local", 1);
    TGH_CHECK(count_ok(NULL, "/", 25, NULL) == 20, "anonymous burst");
    /* keyed consumers have their own buckets */
    TGH_CHECK(get(tg.port, "k-basic", "/", &r) == 200, "keyed request");
    tgh_resp_free(&r);
    /* a wrong key is still refused, not taken as anonymous */
    TGH_CHECK(get(tg.port, "nope", "/", &r) == 401, "unknown key");
    tgh_resp_free(&r);
    auth_extra = "";
}
