/*
 * test_gcra_redis.c - the bucket script (tg_gcra_lua) in a real
 * redis-server: burst and retry on Redis's clock, PXAT expiry, denied
 * requests change nothing, all-or-nothing across buckets, batches (several
 * keys, the same key twice), EVALSHA, and exact agreement with the C step
 * (tg_gcra_charge) over random batches, reading Redis's "now" back through
 * a probe bucket.  Memory per bucket is measured and logged.
 *
 * Each test starts its own redis-server on an ephemeral loopback port
 * (SIGKILL on parent death) and kills it at the end.  hiredis, synchronous.
 * Environment: TG_REDIS_SERVER (default "redis-server").
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tollgate/gcra.h"

#define MAX_REQ_BUCKETS 8

typedef struct req {
    size_t        n;                        /* buckets */
    uint32_t      cost;
    const char   *keys[MAX_REQ_BUCKETS];
    tg_gcra_limit lim[MAX_REQ_BUCKETS];
} req;

static pid_t redis_pid = -1;
static redisContext *rc;

/* ---- process ------------------------------------------------------------ */

static uint64_t
mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void
sleep_us(uint64_t us)
{
    struct timespec ts = { (time_t)(us / 1000000u), (long)(us % 1000000u) * 1000 };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static int
free_port(void)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port;

    cr_assert_geq(fd, 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

/* Fork/exec redis-server on port; 0 once it answers PING, -1 if it died
 * or did not answer within 10 s. */
static int
try_start(int port)
{
    const char *bin = getenv("TG_REDIS_SERVER");
    char portstr[16];
    pid_t parent = getpid();
    uint64_t deadline;

    snprintf(portstr, sizeof(portstr), "%d", port);
    if (bin == NULL || *bin == '\0') {
        bin = "redis-server";
    }
    redis_pid = fork();
    cr_assert_geq(redis_pid, 0);
    if (redis_pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) {
            _exit(127);
        }
        if (null >= 0) {
            dup2(null, 1);
            dup2(null, 2);
        }
        execlp(bin, bin, "--port", portstr, "--bind", "127.0.0.1",
               "--save", "", "--appendonly", "no", (char *)NULL);
        _exit(127);
    }

    deadline = mono_us() + 10000000;
    while (mono_us() < deadline) {
        struct timeval tv = { 0, 200000 };
        int status;

        if (waitpid(redis_pid, &status, WNOHANG) == redis_pid) {
            redis_pid = -1;
            return -1;                      /* port taken, or no binary */
        }
        rc = redisConnectWithTimeout("127.0.0.1", port, tv);
        if (rc != NULL && !rc->err) {
            redisReply *r = redisCommand(rc, "PING");
            int ok = r != NULL && r->type == REDIS_REPLY_STATUS
                     && strcmp(r->str, "PONG") == 0;
            if (r != NULL) {
                freeReplyObject(r);
            }
            if (ok) {
                /* Ours, not another test's server on a reused port? */
                char want[32];
                snprintf(want, sizeof(want), "process_id:%d\r", (int)redis_pid);
                r = redisCommand(rc, "INFO server");
                ok = r != NULL && r->type == REDIS_REPLY_STRING
                     && strstr(r->str, want) != NULL;
                if (r != NULL) {
                    freeReplyObject(r);
                }
                if (!ok) {
                    redisFree(rc);
                    rc = NULL;
                    kill(redis_pid, SIGKILL);
                    waitpid(redis_pid, NULL, 0);
                    redis_pid = -1;
                    return -1;
                }
                redisSetTimeout(rc, (struct timeval){ 10, 0 });
                return 0;
            }
        }
        if (rc != NULL) {
            redisFree(rc);
            rc = NULL;
        }
        sleep_us(20000);
    }
    kill(redis_pid, SIGKILL);
    waitpid(redis_pid, NULL, 0);
    redis_pid = -1;
    return -1;
}

static void
redis_start(void)
{
    int attempt;

    for (attempt = 0; attempt < 5; attempt++) {
        if (try_start(free_port()) == 0) {
            return;
        }
    }
    cr_assert_fail("redis-server did not start (is it installed?)");
}

static void
redis_stop(void)
{
    if (rc != NULL) {
        redisFree(rc);
        rc = NULL;
    }
    if (redis_pid > 0) {
        kill(redis_pid, SIGKILL);
        waitpid(redis_pid, NULL, 0);
        redis_pid = -1;
    }
}

TestSuite(gcra_redis, .init = redis_start, .fini = redis_stop, .timeout = 120);

/* ---- script calls ------------------------------------------------------ */

/* Run reqs[0..nreq) as one EVAL (or EVALSHA sha), results into out. */
static void
run_batch(const char *sha, const req *reqs, size_t nreq, tg_gcra_result *out)
{
    size_t nkeys = 0, nargs = 1, i, b, argc = 0;
    const char **argv;
    char **owned;
    size_t nowned = 0;
    redisReply *r;
    char buf[32];

    for (i = 0; i < nreq; i++) {
        nkeys += reqs[i].n;
        nargs += 2 + 2 * reqs[i].n;
    }
    argv = calloc(3 + nkeys + nargs, sizeof(*argv));
    owned = calloc(2 + nargs, sizeof(*owned));
    cr_assert(argv != NULL && owned != NULL);

#define OWN(...) (snprintf(buf, sizeof(buf), __VA_ARGS__), \
                  owned[nowned] = strdup(buf), owned[nowned++])
    argv[argc++] = sha ? "EVALSHA" : "EVAL";
    argv[argc++] = sha ? sha : tg_gcra_lua;
    argv[argc++] = OWN("%zu", nkeys);
    for (i = 0; i < nreq; i++) {
        for (b = 0; b < reqs[i].n; b++) {
            argv[argc++] = reqs[i].keys[b];
        }
    }
    argv[argc++] = OWN("%zu", nreq);
    for (i = 0; i < nreq; i++) {
        argv[argc++] = OWN("%zu", reqs[i].n);
        argv[argc++] = OWN("%" PRIu32, reqs[i].cost);
        for (b = 0; b < reqs[i].n; b++) {
            argv[argc++] = OWN("%" PRIu64, reqs[i].lim[b].interval_us);
            argv[argc++] = OWN("%" PRIu32, reqs[i].lim[b].burst);
        }
    }
#undef OWN

    r = redisCommandArgv(rc, (int)argc, argv, NULL);
    cr_assert_not_null(r, "redis: %s", rc->errstr);
    cr_assert_eq(r->type, REDIS_REPLY_ARRAY, "reply type %d: %s", r->type,
                 r->type == REDIS_REPLY_ERROR ? r->str : "");
    cr_assert_eq(r->elements, 5 * nreq + nkeys);   /* then each key's new TAT */
    for (i = 0; i < nreq; i++) {
        for (b = 0; b < 5; b++) {
            cr_assert_eq(r->element[5 * i + b]->type, REDIS_REPLY_INTEGER);
        }
        out[i].allowed = (int)r->element[5 * i]->integer;
        out[i].remaining = (uint32_t)r->element[5 * i + 1]->integer;
        out[i].retry_us = (uint64_t)r->element[5 * i + 2]->integer;
        out[i].reset_us = (uint64_t)r->element[5 * i + 3]->integer;
        out[i].limiting = (int)r->element[5 * i + 4]->integer;
        cr_assert(out[i].allowed == 0 || out[i].allowed == 1);
    }
    freeReplyObject(r);
    for (i = 0; i < nowned; i++) {
        free(owned[i]);
    }
    free(owned);
    free(argv);
}

static tg_gcra_result
charge(const char *key, tg_gcra_limit l, uint32_t cost)
{
    req q = { 1, cost, { key }, { l } };
    tg_gcra_result res;
    run_batch(NULL, &q, 1, &res);
    return res;
}

/* GET key as an integer; 0 if absent. */
static uint64_t
get_u64(const char *key)
{
    redisReply *r = redisCommand(rc, "GET %s", key);
    uint64_t v = 0;

    cr_assert_not_null(r);
    if (r->type == REDIS_REPLY_STRING) {
        v = strtoull(r->str, NULL, 10);
    } else {
        cr_assert_eq(r->type, REDIS_REPLY_NIL);
    }
    freeReplyObject(r);
    return v;
}

static long long
int_cmd(const char *fmt, const char *key)
{
    redisReply *r = redisCommand(rc, fmt, key);
    long long v;

    cr_assert_not_null(r);
    cr_assert_eq(r->type, REDIS_REPLY_INTEGER, "%s: type %d", fmt, r->type);
    v = r->integer;
    freeReplyObject(r);
    return v;
}

/* ---- tests ------------------------------------------------------------- */

Test(gcra_redis, burst_in_one_batch_is_exact)
{
    /* 40 requests of one key in one call share one "now". */
    tg_gcra_limit l = tg_gcra_per_minute(100, 20);
    req q[40];
    tg_gcra_result res[40];
    uint64_t tat;
    long long pttl;
    int i;

    for (i = 0; i < 40; i++) {
        q[i] = (req){ 1, 1, { "tg:{acme}:tier" }, { l } };
    }
    run_batch(NULL, q, 40, res);
    for (i = 0; i < 40; i++) {
        cr_assert_eq(res[i].allowed, i < 20, "request %d", i);
        cr_assert_eq(res[i].remaining, i < 20 ? (uint32_t)(19 - i) : 0);
        cr_assert_eq(res[i].retry_us, i < 20 ? 0 : 600000);
        cr_assert_eq(res[i].reset_us, (uint64_t)(i < 20 ? i + 1 : 20) * 600000);
        cr_assert_eq(res[i].limiting, 0);
    }
    tat = get_u64("tg:{acme}:tier");
    cr_assert_gt(tat, 1500000000000000ULL, "TAT is Redis TIME in us: %" PRIu64, tat);
    pttl = int_cmd("PTTL %s", "tg:{acme}:tier");
    /* Expires at the first ms at or after the TAT: 12 s (+1 ms rounding). */
    cr_assert(pttl > 11000 && pttl <= 12001, "pttl %lld", pttl);
    cr_log_info("MEMORY USAGE tg:{acme}:tier = %lld bytes",
                int_cmd("MEMORY USAGE %s", "tg:{acme}:tier"));
}

Test(gcra_redis, burst_then_retry_on_redis_clock)
{
    tg_gcra_limit l = tg_gcra_per_minute(100, 20);
    const char *k = "tg:{beta}:tier";
    tg_gcra_result r;
    uint64_t t0 = mono_us(), elapsed, tat;
    int i, allowed = 0;

    for (i = 0; i < 40; i++) {
        r = charge(k, l, 1);
        if (i < 20) {
            cr_assert(r.allowed, "request %d", i);
            cr_assert_eq(r.remaining, (uint32_t)(19 - i));
            allowed++;
        } else {
            cr_assert(!r.allowed, "request %d", i);
            cr_assert_eq(r.remaining, 0);
        }
    }
    cr_assert_eq(allowed, 20);
    tat = get_u64(k);
    r = charge(k, l, 1);
    /* At most `elapsed` passed on Redis's clock since the first charge. */
    elapsed = mono_us() - t0;
    cr_assert(!r.allowed);
    cr_assert_eq(get_u64(k), tat, "a denied request changed the stored TAT");
    cr_assert_leq(r.retry_us, 600000);
    cr_assert_geq(r.retry_us + elapsed + 500, 600000, "retry %" PRIu64
                  " after %" PRIu64 " us", r.retry_us, elapsed);
    cr_log_info("retry_us after a 20-request burst (42 round trips in %" PRIu64
                " us): %" PRIu64, elapsed, r.retry_us);
    cr_assert_leq(int_cmd("PTTL %s", k), 12001);
}

Test(gcra_redis, retry_is_never_early)
{
    /* 20 per second, burst 3: wait exactly retry_us, then it passes. */
    tg_gcra_limit l = tg_gcra_per_second(20, 3);
    const char *k = "tg:{gamma}:sec";
    tg_gcra_result r;
    int round, i;

    for (round = 0; round < 5; round++) {
        for (i = 0; i < 10; i++) {
            r = charge(k, l, 1);
            if (!r.allowed) {
                break;
            }
        }
        cr_assert(!r.allowed);
        cr_assert(r.retry_us > 0 && r.retry_us <= 50000, "retry %" PRIu64, r.retry_us);
        sleep_us(r.retry_us);
        r = charge(k, l, 1);
        cr_assert(r.allowed, "round %d: denied after waiting retry_us", round);
    }
    /* Cost above burst: denied, nothing stored, retry (cost-burst)*T. */
    r = charge("tg:{gamma}:big", l, 5);
    cr_assert(!r.allowed);
    cr_assert_eq(r.retry_us, 100000);
    cr_assert_eq(r.remaining, 3);
    cr_assert_eq(int_cmd("EXISTS %s", "tg:{gamma}:big"), 0);
}

Test(gcra_redis, all_or_nothing)
{
    tg_gcra_limit a = tg_gcra_per_minute(1, 5), b = tg_gcra_per_minute(1, 2);
    req q = { 2, 1, { "tg:{acme}:minute", "tg:{acme}:burst" }, { a, b } };
    tg_gcra_result r;
    uint64_t tat_a;

    run_batch(NULL, &q, 1, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 1);
    cr_assert_eq(r.limiting, 1);
    run_batch(NULL, &q, 1, &r);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 0);
    tat_a = get_u64("tg:{acme}:minute");
    run_batch(NULL, &q, 1, &r);
    cr_assert(!r.allowed);
    cr_assert_eq(r.limiting, 1);
    cr_assert_eq(r.remaining, 0);
    cr_assert_eq(get_u64("tg:{acme}:minute"), tat_a, "bucket A was charged by a denied request");
    /* A alone still has 3 tokens (cost 0: a look, the TAT is unchanged). */
    r = charge("tg:{acme}:minute", a, 0);
    cr_assert(r.allowed);
    cr_assert_eq(r.remaining, 3);
    cr_assert_eq(get_u64("tg:{acme}:minute"), tat_a);
    r = charge("tg:{nobody}:minute", a, 0);
    cr_assert_eq(r.remaining, 5);
    cr_assert_eq(int_cmd("EXISTS %s", "tg:{nobody}:minute"), 0);
}

Test(gcra_redis, batch_requests_are_independent_and_ordered)
{
    tg_gcra_limit one = tg_gcra_per_minute(1, 1), two = tg_gcra_per_minute(1, 2);
    req q[6];
    tg_gcra_result r[6];

    /* Exhaust k2 first. */
    cr_assert(charge("tg:{k2}:t", one, 1).allowed);

    q[0] = (req){ 1, 1, { "tg:{k1}:t" }, { one } };
    q[1] = (req){ 1, 1, { "tg:{k2}:t" }, { one } };
    q[2] = (req){ 1, 1, { "tg:{k3}:t" }, { two } };
    /* The same key three times, then a two-bucket request that k3 denies. */
    q[3] = (req){ 1, 1, { "tg:{k3}:t" }, { two } };
    q[4] = (req){ 1, 1, { "tg:{k3}:t" }, { two } };
    q[5] = (req){ 2, 1, { "tg:{k4}:t", "tg:{k3}:t" }, { two, two } };
    run_batch(NULL, q, 6, r);
    cr_assert(r[0].allowed);
    cr_assert_eq(r[0].remaining, 0);
    cr_assert(!r[1].allowed);
    cr_assert(r[1].retry_us > 59000000 && r[1].retry_us <= 60000000);
    cr_assert(r[2].allowed);
    cr_assert_eq(r[2].remaining, 1);
    cr_assert(r[3].allowed);
    cr_assert_eq(r[3].remaining, 0);
    cr_assert(!r[4].allowed);
    cr_assert_eq(r[4].retry_us, 60000000, "same now within one call");
    cr_assert(!r[5].allowed);
    cr_assert_eq(r[5].limiting, 1);
    cr_assert_eq(r[5].remaining, 0);
    cr_assert_eq(int_cmd("EXISTS %s", "tg:{k4}:t"), 0);
}

Test(gcra_redis, evalsha_and_flags)
{
    redisReply *r = redisCommand(rc, "SCRIPT LOAD %s", tg_gcra_lua);
    tg_gcra_result res;
    char sha[64];
    req q = { 1, 1, { "tg:{sha}:t" }, { tg_gcra_per_second(10, 2) } };

    cr_assert_not_null(r);
    cr_assert_eq(r->type, REDIS_REPLY_STRING, "%s", r->type == REDIS_REPLY_ERROR ? r->str : "");
    snprintf(sha, sizeof(sha), "%s", r->str);
    freeReplyObject(r);
    run_batch(sha, &q, 1, &res);
    cr_assert(res.allowed);
    cr_assert_eq(res.remaining, 1);
    run_batch(sha, &q, 1, &res);
    run_batch(sha, &q, 1, &res);
    cr_assert(!res.allowed);
}

/* The C step and the script agree exactly, field by field.  Each batch
 * starts with a probe bucket (T = 1e9 us, burst 1) whose stored TAT is
 * Redis's now + 1e9: that is the clock the C model replays. */
Test(gcra_redis, same_results_as_c)
{
    enum { NKEYS = 6, BATCHES = 60, PER = 40 };
    static const char *names[NKEYS] = {
        "tg:{a}:minute", "tg:{a}:burst", "tg:{b}:minute", "tg:{b}:burst",
        "tg:{c}:x", "tg:global",
    };
    tg_gcra_limit lk[NKEYS] = {
        { 50000, 10 }, { 20000, 3 }, { 7001, 20 }, { 333334, 2 }, { 1, 1000 },
        { 1000, 50 },
    };
    uint64_t model[NKEYS] = { 0 };
    uint64_t rng = 12345;
    int batch, i, compared = 0, allowed = 0, denied = 0;

    for (batch = 0; batch < BATCHES; batch++) {
        req q[PER + 1];
        size_t idx[PER + 1][3];
        tg_gcra_result res[PER + 1];
        char probe[32];
        uint64_t now, t_batch;

        snprintf(probe, sizeof(probe), "tg:probe:%d", batch);
        q[0] = (req){ 1, 1, { NULL }, { { 1000000000, 1 } } };
        q[0].keys[0] = probe;
        for (i = 1; i <= PER; i++) {
            size_t b;
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            q[i].n = 1 + (size_t)((rng >> 33) % 3);
            q[i].cost = (uint32_t)((rng >> 40) % 4);
            for (b = 0; b < q[i].n; b++) {
                rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
                idx[i][b] = (size_t)((rng >> 33) % NKEYS);
                q[i].keys[b] = names[idx[i][b]];
                q[i].lim[b] = lk[idx[i][b]];
            }
        }
        t_batch = mono_us();
        run_batch(NULL, q, PER + 1, res);
        cr_assert(res[0].allowed);
        now = get_u64(probe) - 1000000000;

        for (i = 1; i <= PER; i++) {
            uint64_t tat[3];
            tg_gcra_result c;
            size_t b;
            for (b = 0; b < q[i].n; b++) {
                tat[b] = model[idx[i][b]];
            }
            tg_gcra_charge(q[i].lim, tat, NULL, q[i].n, q[i].cost, now, &c);
            cr_assert_eq(res[i].allowed, c.allowed, "batch %d req %d", batch, i);
            cr_assert_eq(res[i].remaining, c.remaining, "batch %d req %d", batch, i);
            cr_assert_eq(res[i].retry_us, c.retry_us, "batch %d req %d", batch, i);
            cr_assert_eq(res[i].reset_us, c.reset_us, "batch %d req %d", batch, i);
            cr_assert_eq(res[i].limiting, c.limiting, "batch %d req %d", batch, i);
            if (c.allowed) {
                for (b = 0; b < q[i].n; b++) {
                    model[idx[i][b]] = tat[b];
                }
                allowed++;
            } else {
                denied++;
            }
            compared++;
        }
        /* Stored TATs match the model (absent = full). */
        for (i = 0; i < NKEYS; i++) {
            uint64_t v = get_u64(names[i]);
            if (model[i] <= now) {
                cr_assert_leq(v, now, "%s", names[i]);  /* both full */
            } else if (v == 0) {
                /* Expired since: only once the clock passed its TAT. */
                uint64_t spent = mono_us() - t_batch;
                cr_assert_lt(model[i], now + spent + 1000,
                             "%s vanished %" PRIu64 " us before its TAT",
                             names[i], model[i] - now - spent);
            } else {
                cr_assert_eq(v, model[i], "%s", names[i]);
            }
        }
        sleep_us((batch % 7) * 3000);
    }
    cr_log_info("C and Lua agree on %d requests (%d allowed, %d denied)",
                compared, allowed, denied);
    cr_assert_gt(allowed, 100);
    cr_assert_gt(denied, 100);
}

static long long
used_memory(void)
{
    redisReply *r = redisCommand(rc, "INFO memory");
    const char *p;
    long long v;

    cr_assert_not_null(r);
    cr_assert_eq(r->type, REDIS_REPLY_STRING);
    p = strstr(r->str, "used_memory:");
    cr_assert_not_null(p);
    v = strtoll(p + strlen("used_memory:"), NULL, 10);
    freeReplyObject(r);
    return v;
}

Test(gcra_redis, memory_per_bucket, .timeout = 240)
{
    enum { N = 100000, PER = 500 };
    tg_gcra_limit l = tg_gcra_per_minute(100, 20);
    static char names[PER][40];
    static req q[PER];
    static tg_gcra_result res[PER];
    long long before, after, one;
    redisReply *r;
    int i, k;

    before = used_memory();
    for (i = 0; i < N; i += PER) {
        for (k = 0; k < PER; k++) {
            snprintf(names[k], sizeof(names[k]), "tg:{ak_%08d}:tier", i + k);
            q[k] = (req){ 1, 20, { names[k] }, { l } };  /* drained: 12 s */
        }
        run_batch(NULL, q, PER, res);
        for (k = 0; k < PER; k++) {
            cr_assert(res[k].allowed);
        }
    }
    after = used_memory();
    r = redisCommand(rc, "DBSIZE");
    cr_assert_eq(r->type, REDIS_REPLY_INTEGER);
    cr_assert_eq(r->integer, N, "dbsize %lld", r->integer);
    freeReplyObject(r);
    one = int_cmd("MEMORY USAGE %s", "tg:{ak_00000000}:tier");
    cr_log_info("redis: %lld bytes per bucket (used_memory delta over %d keys "
                "like tg:{ak_00000000}:tier, with expiry); MEMORY USAGE of one: "
                "%lld", (after - before) / N, N, one);
    cr_assert_lt((after - before) / N, 200);
}
