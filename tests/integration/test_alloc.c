/*
 * test_alloc.c - no heap allocation per request in the steady state,
 * through the tollgate binary: tollgate runs under the malloc-counting
 * shim (tests/support/alloccount.c, LD_PRELOAD, counts in a shared file),
 * is warmed up (every key seen, its bucket made, the connections open),
 * then serves N keep-alive requests; the heap calls it made meanwhile,
 * per request, must stay under ALLOC_BOUND:
 *   local:  keys + store: local;
 *   redis:  keys + store: redis (on_failure: local, the default: each
 *           answer is copied into the local store too); hiredis 0.14
 *           allocates per command it sends, whatever we do (see
 *           HIREDIS_PER_CALL): that much per script call is allowed on top.
 * Not in the ASan build (its allocator is ASan's): skipped there.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <fcntl.h>
#include <openssl/sha.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"

TestSuite(alloc, .fini = tgh_cleanup, .timeout = 240);

enum {
    NKEYS = 200,          /* distinct keys, all warmed up */
    NCONN = 4,            /* keep-alive connections, all warmed up */
    WARM = 2 * NKEYS,     /* requests before counting (every key twice) */
    NREQ = 2000,          /* requests counted */
};

/*
 * The bound, in heap calls (malloc + calloc + realloc + aligned) per
 * request, over NREQ requests.  The request path allocates nothing once
 * warm; what is left is the process's timers (the 50 ms sample of each
 * worker, the metrics flush): a few calls per tick, whatever the traffic,
 * spread over the requests of the window.  0.05 per request is 100 calls
 * in 2,000 requests: far below one per request, far above the timers of a
 * window of a few seconds.
 */
#define ALLOC_BOUND 0.05

/*
 * hiredis 0.14, per command (redisAsyncFormattedCommand: we format it
 * ourselves): the callback's list entry, its output buffer growing from
 * empty, and the empty buffer it makes after each complete write.  A
 * script call carries a whole batch (0.1-0.2 calls per request under
 * load; 1 per request here: one request at a time).
 */
#define HIREDIS_PER_CALL 3

/* as tests/support/alloccount.c writes it */
struct tg_alloccount {
    uint64_t magic;
    uint64_t malloc_calls;
    uint64_t calloc_calls;
    uint64_t realloc_calls;
    uint64_t free_calls;
    uint64_t memalign_calls;
};
#define TG_ALLOCCOUNT_MAGIC 0x74676163636f756eull

static tgh_upstream up, rds;
static char counts_path[512];

static void
skip_unless_counting(void)
{
    const char *san = getenv("TG_SANITIZED"), *so = getenv("TG_ALLOCCOUNT");

    if (san != NULL && strcmp(san, "1") == 0)
        cr_skip_test("sanitized build: the allocator is ASan's, the shim cannot count it");
    if (so == NULL || *so == '\0' || access(so, R_OK) != 0)
        cr_skip_test("TG_ALLOCCOUNT (the alloccount.so shim) not set: run through meson test");
}

static void
read_counts(struct tg_alloccount *c)
{
    int fd = open(counts_path, O_RDONLY);
    ssize_t n;

    TGH_CHECK(fd >= 0, "open %s", counts_path);
    n = pread(fd, c, sizeof(*c), 0);
    close(fd);
    TGH_CHECK(n == (ssize_t)sizeof(*c) && c->magic == TG_ALLOCCOUNT_MAGIC,
              "%s: no counts (was the shim loaded?)", counts_path);
}

static uint64_t
allocs(const struct tg_alloccount *c)
{
    return c->malloc_calls + c->calloc_calls + c->realloc_calls + c->memalign_calls;
}

static const char *
keys_file(void)
{
    static char path[512];
    unsigned char d[32];
    char key[64];
    FILE *f;

    snprintf(path, sizeof path, "%s/akeys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("keys:\n", f);
    for (int i = 0; i < NKEYS; i++) {
        snprintf(key, sizeof key, "alloc-key-%03d", i);
        SHA256((const unsigned char *)key, strlen(key), d);
        fprintf(f, "  - { id: k%03d, tier: t, sha256: \"", i);
        for (int j = 0; j < 32; j++)
            fprintf(f, "%02x", d[j]);
        fputs("\" }\n", f);
    }
    fclose(f);
    return path;
}

/* tollgate under the shim, 1 worker, with extra (keys, tier, store). */
static void
start_tg(tgh_tollgate *t, const char *store, const char *extra)
{
    tgh_tg_opts o;
    int rc;

    snprintf(counts_path, sizeof counts_path, "%s/alloccount-%s", tgh_tmpdir(), store);
    tgh_tg_opts_default(&o, up.port);
    o.workers = 1;
    o.store = store;
    o.extra_yaml = extra;
    setenv("TG_ALLOCCOUNT_FILE", counts_path, 1);
    setenv("LD_PRELOAD", getenv("TG_ALLOCCOUNT"), 1);
    rc = tgh_tollgate_start(t, &o);
    unsetenv("LD_PRELOAD");
    unsetenv("TG_ALLOCCOUNT_FILE");
    TGH_CHECK(rc == 0, "tollgate");
}

/* One keep-alive GET / with key i on c: its status (-1: no answer). */
static int
req(tgh_conn *c, int i)
{
    char buf[256];
    tgh_resp r;
    int n = snprintf(buf, sizeof buf,
                     "GET / HTTP/1.1\r\nHost: t\r\nX-API-Key: alloc-key-%03d\r\n\r\n",
                     i % NKEYS);
    int st;

    if (tgh_conn_roundtrip(c, buf, (size_t)n, &r, 0, 10000) != 0)
        return -1;
    st = r.status;
    tgh_resp_free(&r);
    return st;
}

/* EVALSHA + EVAL calls so far (INFO commandstats), 0 without Redis. */
static long
script_calls(void)
{
    static char out[65536];
    static const char *const cmds[] = { "cmdstat_evalsha:calls=", "cmdstat_eval:calls=",
                                        "cmdstat_tollgate.charge:calls=" };
    long n = 0;

    if (rds.port == 0)
        return 0;
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "INFO commandstats") == 0,
              "INFO commandstats");
    for (int i = 0; i < 2; i++) {
        const char *p = strstr(out, cmds[i]);
        n += p ? atol(p + strlen(cmds[i])) : 0;
    }
    return n;
}

/* Warm up, then count the heap calls of NREQ requests. */
static void
steady_state(tgh_tollgate *tg, const char *what)
{
    tgh_conn *c[NCONN];
    struct tg_alloccount a, b;
    uint64_t t0, t1;
    int st, ok = 0;
    long calls0, calls;
    double per, ours;

    for (int i = 0; i < NCONN; i++) {
        c[i] = tgh_conn_open(tg->port, 5000);
        TGH_CHECK(c[i] != NULL, "connect %d", i);
    }
    for (int i = 0; i < WARM; i++)
        TGH_CHECK((st = req(c[i % NCONN], i)) == 200, "warm-up %d: %d", i, st);
    calls0 = script_calls();
    read_counts(&a);
    t0 = tgh_now_ms();
    for (int i = 0; i < NREQ; i++)
        ok += req(c[i % NCONN], i * 7) == 200;
    t1 = tgh_now_ms();
    read_counts(&b);
    calls = script_calls() - calls0;
    per = (double)(allocs(&b) - allocs(&a)) / NREQ;
    ours = ((double)(allocs(&b) - allocs(&a)) - (double)HIREDIS_PER_CALL * (double)calls) / NREQ;
    cr_log_info("%s: %d requests in %llu ms: malloc %llu, calloc %llu, realloc %llu, "
                "aligned %llu, free %llu: %.4f allocations per request; %ld script calls: "
                "%.4f per request beyond hiredis's %d per call (bound %.2f)",
                what, NREQ, (unsigned long long)(t1 - t0),
                (unsigned long long)(b.malloc_calls - a.malloc_calls),
                (unsigned long long)(b.calloc_calls - a.calloc_calls),
                (unsigned long long)(b.realloc_calls - a.realloc_calls),
                (unsigned long long)(b.memalign_calls - a.memalign_calls),
                (unsigned long long)(b.free_calls - a.free_calls), per, calls, ours,
                HIREDIS_PER_CALL, ALLOC_BOUND);
    TGH_CHECK(ok == NREQ, "%s: %d of %d requests answered 200", what, ok, NREQ);
    TGH_CHECK(ours <= ALLOC_BOUND,
              "%s: %.4f heap allocations per request (%ld script calls: %d each allowed; "
              "bound %.2f beyond them)", what, per, calls, HIREDIS_PER_CALL, ALLOC_BOUND);
    for (int i = 0; i < NCONN; i++)
        tgh_conn_close(c[i]);
}

Test(alloc, local_store_steady_state)
{
    static char extra[1024];
    tgh_tollgate tg;

    skip_unless_counting();
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  t: { requests_per_minute: 6000000, burst_limit: 100000 }\n"
             "auth: { keys_file: %s }\n", keys_file());
    start_tg(&tg, "local", extra);
    steady_state(&tg, "keys + local store");
}

Test(alloc, redis_store_steady_state)
{
    static char extra[1024];
    tgh_tollgate tg;

    skip_unless_counting();
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    snprintf(extra, sizeof extra,
             "rate_limits:\n  t: { requests_per_minute: 6000000, burst_limit: 100000 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 2000 }\n",
             keys_file(), rds.port);
    start_tg(&tg, "redis", extra);
    steady_state(&tg, "keys + Redis store");
}
