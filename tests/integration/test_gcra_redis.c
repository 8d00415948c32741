/*
 * test_gcra_redis.c - the bucket script (tg_gcra_lua) in a real
 * redis-server: burst and retry on Redis's clock, PXAT expiry, denied
 * requests change nothing, all-or-nothing across buckets, batches (several
 * keys, the same key twice), EVALSHA, and exact agreement with the C step
 * (tg_gcra_charge) over random batches, reading Redis's "now" back through
 * a probe bucket.  Memory per bucket is measured and logged.
 *
 * Two runs of this one program (tests/meson.build): integration_gcra_redis
 * sends every charge as the script (EVAL tg_gcra_lua, or EVALSHA);
 * integration_gcra_redis_native sets TG_REDIS_MODULE, so that the harness
 * loads tollgate-redis.so into redis-server, and sends the same charges as
 * TOLLGATE.CHARGE packed key... (src/redis-module/tollgate_redis.c): the
 * same assertions hold for both, which is the proof that the module is the
 * script (with same_results_as_c, the agreement with the C step over
 * random batches).  The refund script (tg_gcra_refund_lua) is Lua in both.
 * charges_go_the_way_of_this_run checks which of the two ran (INFO
 * commandstats).
 *
 * Each test starts its own redis-server on an ephemeral loopback port
 * through the harness (tests/integration/harness.h: SIGKILL on parent
 * death, killed by tgh_cleanup at the end).  hiredis, synchronous.
 * Environment: TG_REDIS_SERVER (default /usr/bin/redis-server),
 * TG_REDIS_MODULE (set and not empty: the module, and charges natively).
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <errno.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"
#include "tollgate/gcra.h"

#define MAX_REQ_BUCKETS 8

typedef struct req {
    size_t        n;                        /* buckets */
    uint32_t      cost;
    const char   *keys[MAX_REQ_BUCKETS];
    tg_gcra_limit lim[MAX_REQ_BUCKETS];
} req;

/* Floors of the next run_batch, one per key in order (NULL: all 0). */
static const uint64_t *batch_floor;

static tgh_upstream redis_srv;
static redisContext *rc;
static int redis_port;

/* 1: this run charges with TOLLGATE.CHARGE (TG_REDIS_MODULE is set and
 * the harness loaded the module), 0: with the script. */
static int native;

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

static void
redis_start(void)
{
    struct timeval tv = { 2, 0 };

    TGH_CHECK(tgh_redis_start(&redis_srv) == 0, "redis-server did not start (is it installed?)");
    redis_port = redis_srv.port;
    rc = redisConnectWithTimeout("127.0.0.1", redis_port, tv);
    cr_assert(rc != NULL && !rc->err, "connect to redis-server on port %d", redis_port);
    redisSetTimeout(rc, (struct timeval){ 10, 0 });
    native = tgh_env("TG_REDIS_MODULE")[0] != '\0';
    if (native) {
        redisReply *r = redisCommand(rc, "TOLLGATE.PROTO");

        cr_assert(r != NULL && r->type == REDIS_REPLY_INTEGER && r->integer == 1,
                  "TG_REDIS_MODULE=%s: redis-server has no TOLLGATE.PROTO 1 (%s)",
                  tgh_env("TG_REDIS_MODULE"),
                  r == NULL ? rc->errstr : r->type == REDIS_REPLY_ERROR ? r->str : "not 1");
        freeReplyObject(r);
    }
}

static void
redis_stop(void)
{
    if (rc != NULL) {
        redisFree(rc);
        rc = NULL;
    }
    tgh_cleanup();
}

TestSuite(gcra_redis, .init = redis_start, .fini = redis_stop, .timeout = 120);

/* ---- script calls ------------------------------------------------------ */

static uint64_t last_now;        /* the script's clock in the last reply */

/* Keys of the next run_batch: 1 (the default) each distinct key once, as
 * the client sends them; 0 one KEY per bucket, repeated keys and all (the
 * script must still read and write each key once, as sequential calls). */
static int batch_dedup = 1;

/* One charge script call being built (argv owns its numbers; the
 * script's numbers go to v[], packed into pk as its last argument). */
typedef struct call {
    const char **argv;
    size_t      *len;
    char       (*num)[24];
    int          argc, nn;
    uint64_t    *v;
    size_t       nv;
    unsigned char *pk;
} call;

static void
call_arg(call *c, const char *s)
{
    c->argv[c->argc] = s;
    c->len[c->argc++] = strlen(s);
}

static void
call_num(call *c, unsigned long long v)
{
    snprintf(c->num[c->nn], sizeof(c->num[0]), "%llu", v);
    call_arg(c, c->num[c->nn++]);
}

/* A number of the script's packed argument. */
static void
call_val(call *c, unsigned long long v)
{
    c->v[c->nv++] = v;
}

static void
call_free(call *c)
{
    free(c->argv);
    free(c->len);
    free(c->num);
    free(c->v);
    free(c->pk);
}

/*
 * The charge script's call for reqs[0..nreq) (layout in gcra.h), EVAL or
 * EVALSHA sha - or, in the native run, TOLLGATE.CHARGE packed key... with
 * the same packed numbers and keys (sha is not used then): keys
 * deduplicated (key and limit) when dedup, else one KEY per bucket;
 * floors[] one per bucket in order (NULL: none).  Returns the number of
 * buckets.
 */
static size_t
build_call(call *c, const char *sha, const req *reqs, size_t nreq, const uint64_t *floors,
           int dedup)
{
    size_t nb = 0, nk = 0, i, b, j, fi = 0;
    const char **keys;
    tg_gcra_limit *kl;
    uint32_t *kidx;
    int fl = 0;

    for (i = 0; i < nreq; i++) {
        nb += reqs[i].n;
    }
    c->argc = c->nn = 0;
    c->argv = calloc(8 + 6 * nb + nreq, sizeof(*c->argv));
    c->len = calloc(8 + 6 * nb + nreq, sizeof(*c->len));
    c->num = calloc(8 + 6 * nb + nreq, sizeof(*c->num));
    c->v = calloc(8 + 6 * nb + nreq, sizeof(*c->v));
    c->pk = calloc(8 + 6 * nb + nreq, TG_GCRA_PACKED);
    c->nv = 0;
    keys = calloc(nb + 1, sizeof(*keys));
    kl = calloc(nb + 1, sizeof(*kl));
    kidx = calloc(nb + 1, sizeof(*kidx));
    cr_assert(c->argv && c->len && c->num && c->v && c->pk && keys && kl && kidx);
    for (i = 0; i < nreq; i++) {
        for (b = 0; b < reqs[i].n; b++, fi++) {
            const tg_gcra_limit *l = &reqs[i].lim[b];
            for (j = 0; dedup && j < nk; j++) {
                if (strcmp(keys[j], reqs[i].keys[b]) == 0
                    && kl[j].interval_us == l->interval_us && kl[j].burst == l->burst) {
                    break;
                }
            }
            if (!dedup || j == nk) {
                keys[nk] = reqs[i].keys[b];
                kl[nk] = *l;
                j = nk++;
            }
            kidx[fi] = (uint32_t)j + 1;
            fl |= floors != NULL && floors[fi] != 0;
        }
    }
    if (native) {
        call_arg(c, "TOLLGATE.CHARGE");
        call_arg(c, "");                /* packed, filled in below */
    } else {
        call_arg(c, sha ? "EVALSHA" : "EVAL");
        call_arg(c, sha ? sha : tg_gcra_lua);
        call_num(c, nk);
    }
    for (j = 0; j < nk; j++) {
        call_arg(c, keys[j]);
    }
    call_val(c, nreq);
    call_val(c, (unsigned long long)fl);
    for (i = 0, fi = 0; i < nreq; i++) {
        uint64_t a[TG_GCRA_SCRIPT_ARGS];
        size_t na = tg_gcra_script_args(kidx + fi, floors != NULL ? floors + fi : NULL,
                                        reqs[i].n, (1u << reqs[i].n) - 1, reqs[i].cost,
                                        fl, a);
        for (j = 0; j < na; j++) {
            call_val(c, a[j]);
        }
        fi += reqs[i].n;
    }
    for (j = 0; j < nk; j++) {
        uint64_t a[TG_GCRA_SCRIPT_KEY_ARGS];
        uint32_t alias = (uint32_t)j + 1;

        for (size_t f = 0; f < j; f++) {
            if (strcmp(keys[f], keys[j]) == 0) {
                alias = (uint32_t)f + 1;
                break;
            }
        }
        cr_assert_eq(tg_gcra_script_key(kl[j], alias, a), TG_GCRA_SCRIPT_KEY_ARGS);
        for (size_t f = 0; f < TG_GCRA_SCRIPT_KEY_ARGS; f++) {
            call_val(c, a[f]);
        }
    }
    if (native) {
        c->argv[1] = (const char *)c->pk;
        c->len[1] = tg_gcra_script_pack(c->v, c->nv, c->pk);
    } else {
        c->argv[c->argc] = (const char *)c->pk;
        c->len[c->argc++] = tg_gcra_script_pack(c->v, c->nv, c->pk);
    }
    free(keys);
    free(kl);
    free(kidx);
    return nb;
}

/* The want numbers of a charge script reply (a string of packed
 * doubles, gcra.h) into a new array (the caller frees it). */
static uint64_t *
reply_nums(const redisReply *r, size_t want)
{
    uint64_t *u = calloc(want, sizeof(*u));

    cr_assert_not_null(u);
    cr_assert_eq(r->type, REDIS_REPLY_STRING, "reply type %d: %s", r->type,
                 r->type == REDIS_REPLY_ERROR ? r->str : "");
    cr_assert_eq(r->len, want * TG_GCRA_PACKED, "%zu bytes for %zu numbers", r->len, want);
    cr_assert_eq(tg_gcra_script_unpack((const unsigned char *)r->str, want, u), 1,
                 "a number of the reply is not an integer in 0..2^53");
    return u;
}

/* Request i's answer from its numbers e[0..1+n) of a reply whose clock is
 * now (tg_gcra_script_answer); asserts it is a valid one. */
static void
decode(const uint64_t *e, const req *q, uint64_t now, tg_gcra_result *out)
{
    long long v[1 + MAX_REQ_BUCKETS];

    for (size_t b = 0; b < 1 + q->n; b++) {
        v[b] = (long long)e[b];
    }
    cr_assert_eq(tg_gcra_script_answer(v, q->lim, (1u << q->n) - 1, q->cost, now, out), 1,
                 "not a valid answer");
}

/* Run reqs[0..nreq) as one EVAL (or EVALSHA sha; TOLLGATE.CHARGE in the
 * native run), results into out. */
static void
run_batch(const char *sha, const req *reqs, size_t nreq, tg_gcra_result *out)
{
    size_t nb, i, e;
    redisReply *r;
    uint64_t *u;
    call c;

    nb = build_call(&c, sha, reqs, nreq, batch_floor, batch_dedup);
    r = redisCommandArgv(rc, c.argc, c.argv, c.len);
    call_free(&c);
    cr_assert_not_null(r, "redis: %s", rc->errstr);
    cr_assert_eq(tg_gcra_script_reply_len(nreq, nb), nreq + nb + 1);
    u = reply_nums(r, nreq + nb + 1);
    last_now = u[nreq + nb];
    cr_assert_gt(last_now, 0);
    for (i = 0, e = 0; i < nreq; i++) {
        decode(u + e, &reqs[i], last_now, &out[i]);
        e += 1 + reqs[i].n;
    }
    free(u);
    freeReplyObject(r);
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

/* The script loads (its shebang flags are accepted) and runs by its SHA;
 * in the native run the same charges go as TOLLGATE.CHARGE. */
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

/* A bucket every request of a call shares (the global one) is charged
 * once per request - 8 charges, 8 times T - and stored once, whether the
 * client sends its key once or once per request; the 6th..8th requests
 * are denied by it (burst 5) and leave their own buckets alone. */
Test(gcra_redis, shared_bucket_charged_once_per_request)
{
    tg_gcra_limit own = tg_gcra_per_second(1, 10), glob = { 1000000, 5 };
    static const char *own_keys[2][8] = {
        { "tg:{s0}:t", "tg:{s1}:t", "tg:{s2}:t", "tg:{s3}:t", "tg:{s4}:t", "tg:{s5}:t",
          "tg:{s6}:t", "tg:{s7}:t" },
        { "tg:{s8}:t", "tg:{s9}:t", "tg:{s10}:t", "tg:{s11}:t", "tg:{s12}:t",
          "tg:{s13}:t", "tg:{s14}:t", "tg:{s15}:t" },
    };
    static const char *globs[2] = { "tg:{s}:global", "tg:{s}:global2" };
    uint64_t n1;
    req q[8];
    tg_gcra_result res[8];

    for (int dedup = 0; dedup < 2; dedup++) {
        glob.burst = 100;
        for (int i = 0; i < 8; i++) {
            q[i] = (req){ 2, 1, { own_keys[dedup][i], globs[dedup] }, { own, glob } };
        }
        batch_dedup = dedup;
        run_batch(NULL, q, 8, res);
        for (int i = 0; i < 8; i++) {
            cr_assert(res[i].allowed);
            cr_assert_eq(res[i].held_us[1], (uint64_t)(i + 1) * 1000000, "request %d", i);
            cr_assert_eq(res[i].held_us[0], 1000000);
        }
        cr_assert_eq(get_u64(globs[dedup]), last_now + 8 * 1000000,
                     "8 charges of the shared bucket, 8 times T");
        n1 = last_now;

        /* burst 5 on a fresh shared key: 5 pass, 3 denied by it */
        glob.burst = 5;
        for (int i = 0; i < 8; i++) {
            q[i] = (req){ 2, 1, { own_keys[dedup][i], "tg:{s}:g5" }, { own, glob } };
        }
        freeReplyObject(redisCommand(rc, "DEL tg:{s}:g5"));
        run_batch(NULL, q, 8, res);
        for (int i = 0; i < 8; i++) {
            cr_assert_eq(res[i].allowed, i < 5, "request %d", i);
            cr_assert_eq(res[i].limiting, 1, "request %d", i);
            cr_assert_eq(get_u64(own_keys[dedup][i]), n1 + (i < 5 ? 2000000 : 1000000),
                         "request %d: own bucket", i);
        }
        cr_assert_eq(get_u64("tg:{s}:g5"), last_now + 5 * 1000000);
    }
    batch_dedup = 1;
}

/* Requests on repeated keys answered in one call give what the same
 * requests give one call each (T of 1000 s: the time between the calls
 * changes no decision and no token count). */
Test(gcra_redis, one_call_as_sequential_calls)
{
    enum { NK = 4, NREQ = 48 };
    static const tg_gcra_limit lk[NK] = {
        { 1000000000, 7 }, { 1000000000, 12 }, { 2000000000, 3 }, { 1000000000, 40 },
    };
    char names[2][NK][32];
    req q[2][NREQ];
    tg_gcra_result one[NREQ], seq;
    uint64_t rng = 77;

    for (int w = 0; w < 2; w++) {
        for (int k = 0; k < NK; k++) {
            snprintf(names[w][k], sizeof(names[w][k]), "tg:{seq%d}:%d", w, k);
        }
    }
    for (int i = 0; i < NREQ; i++) {
        size_t n;
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        n = 1 + (size_t)((rng >> 33) % 3);
        for (int w = 0; w < 2; w++) {
            q[w][i] = (req){ n, (uint32_t)((rng >> 40) % 3), { NULL }, { { 0, 0 } } };
        }
        for (size_t b = 0; b < n; b++) {
            size_t k;
            rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
            k = (size_t)((rng >> 33) % NK);
            for (int w = 0; w < 2; w++) {
                q[w][i].keys[b] = names[w][k];
                q[w][i].lim[b] = lk[k];
            }
        }
    }
    run_batch(NULL, q[0], NREQ, one);
    for (int i = 0; i < NREQ; i++) {
        run_batch(NULL, &q[1][i], 1, &seq);
        cr_assert_eq(one[i].allowed, seq.allowed, "request %d", i);
        cr_assert_eq(one[i].remaining, seq.remaining, "request %d", i);
        cr_assert_eq(one[i].limiting, seq.limiting, "request %d", i);
    }
    for (int k = 0; k < NK; k++) {
        /* the same debt ahead, up to the time between the calls */
        cr_assert_eq(int_cmd("EXISTS %s", names[0][k]), int_cmd("EXISTS %s", names[1][k]));
    }
}

/* The C step and the script agree exactly, field by field.  Each batch
 * starts with a probe bucket (T = 1e9 us, burst 1) whose stored TAT is
 * Redis's now + 1e9: that is the clock the C model replays.  Two of the
 * buckets are names of others under another limit (a reload changing a
 * tier while charges are batched): one TAT per name, in the model as in
 * Redis. */
Test(gcra_redis, same_results_as_c)
{
    enum { NKEYS = 6, NLIM = 8, BATCHES = 60, PER = 40 };
    static const char *names[NKEYS] = {
        "tg:{a}:minute", "tg:{a}:burst", "tg:{b}:minute", "tg:{b}:burst",
        "tg:{c}:x", "tg:global",
    };
    static const size_t name_of[NLIM] = { 0, 1, 2, 3, 4, 5, 0, 5 };
    tg_gcra_limit lk[NLIM] = {
        { 50000, 10 }, { 20000, 3 }, { 7001, 20 }, { 333334, 2 }, { 1, 1000 },
        { 1000, 50 }, { 30000, 6 }, { 2500, 80 },
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
                idx[i][b] = (size_t)((rng >> 33) % NLIM);
                q[i].keys[b] = names[name_of[idx[i][b]]];
                q[i].lim[b] = lk[idx[i][b]];
            }
        }
        t_batch = mono_us();
        batch_dedup = batch % 2;        /* repeated KEYS: the same answers */
        run_batch(NULL, q, PER + 1, res);
        batch_dedup = 1;
        cr_assert(res[0].allowed);
        now = get_u64(probe) - 1000000000;

        for (i = 1; i <= PER; i++) {
            uint64_t tat[3];
            tg_gcra_result c;
            size_t b;
            for (b = 0; b < q[i].n; b++) {
                tat[b] = model[name_of[idx[i][b]]];
            }
            tg_gcra_charge(q[i].lim, tat, NULL, q[i].n, q[i].cost, now, &c);
            cr_assert_eq(res[i].allowed, c.allowed, "batch %d req %d", batch, i);
            cr_assert_eq(res[i].remaining, c.remaining, "batch %d req %d", batch, i);
            cr_assert_eq(res[i].retry_us, c.retry_us, "batch %d req %d", batch, i);
            cr_assert_eq(res[i].reset_us, c.reset_us, "batch %d req %d", batch, i);
            cr_assert_eq(res[i].limiting, c.limiting, "batch %d req %d", batch, i);
            if (c.allowed) {
                for (b = 0; b < q[i].n; b++) {
                    model[name_of[idx[i][b]]] = tat[b];
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
    cr_log_info("C and %s agree on %d requests (%d allowed, %d denied)",
                native ? "TOLLGATE.CHARGE" : "Lua", compared, allowed, denied);
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

/* ---- bad values and floors ------------------------------------------------ */

/* A stored value that is not a bucket (another type, not a finite number
 * in 0..2^53) is no bucket: the request passes as on a full bucket, the
 * others of the batch are untouched, and the value is replaced. */
Test(gcra_redis, bad_values_are_no_bucket)
{
    static const char *const bad[] = {
        "tg:{nan}:t", "tg:{inf}:t", "tg:{big}:t", "tg:{neg}:t", "tg:{abc}:t",
        "tg:{lst}:t", "tg:{hsh}:t", "tg:{ok}:t",
    };
    tg_gcra_limit l = tg_gcra_per_second(1, 10);
    req q[8];
    tg_gcra_result res[8];
    redisReply *r;

    freeReplyObject(redisCommand(rc, "SET %s nan", bad[0]));
    freeReplyObject(redisCommand(rc, "SET %s inf", bad[1]));
    freeReplyObject(redisCommand(rc, "SET %s 1e300", bad[2]));
    freeReplyObject(redisCommand(rc, "SET %s -5", bad[3]));
    freeReplyObject(redisCommand(rc, "SET %s abc", bad[4]));
    freeReplyObject(redisCommand(rc, "RPUSH %s x", bad[5]));
    freeReplyObject(redisCommand(rc, "HSET %s f v", bad[6]));
    for (int i = 0; i < 8; i++) {
        q[i] = (req){ 1, 3, { bad[i] }, { l } };
    }
    run_batch(NULL, q, 8, res);
    for (int i = 0; i < 8; i++) {
        cr_assert(res[i].allowed, "%s", bad[i]);
        cr_assert_eq(res[i].remaining, 7, "%s: %u", bad[i], res[i].remaining);
        cr_assert_eq(res[i].held_us[0], 3000000, "%s", bad[i]);
        r = redisCommand(rc, "TYPE %s", bad[i]);
        cr_assert_str_eq(r->str, "string", "%s", bad[i]);
        freeReplyObject(r);
        cr_assert_eq(get_u64(bad[i]), last_now + 3000000, "%s", bad[i]);
    }

    /* each bad key twice in one call: read once as no bucket, the second
     * request sees the first one's charge, one write of the final TAT */
    freeReplyObject(redisCommand(rc, "SET %s nan", bad[0]));
    freeReplyObject(redisCommand(rc, "SET %s abc", bad[4]));
    freeReplyObject(redisCommand(rc, "DEL %s", bad[5]));
    freeReplyObject(redisCommand(rc, "RPUSH %s x", bad[5]));
    for (int i = 0; i < 8; i++) {
        q[i] = (req){ 1, 3, { bad[i < 4 ? 0 : i < 6 ? 4 : 5] }, { l } };
    }
    run_batch(NULL, q, 8, res);
    for (int i = 0; i < 8; i++) {
        static const uint32_t rem[8] = { 7, 4, 1, 1, 7, 4, 7, 4 };
        cr_assert_eq(res[i].allowed, i != 3, "request %d", i);
        cr_assert_eq(res[i].remaining, rem[i], "request %d: %u", i, res[i].remaining);
    }
    cr_assert_eq(get_u64(bad[0]), last_now + 9000000);
    cr_assert_eq(get_u64(bad[4]), last_now + 6000000);
    cr_assert_eq(get_u64(bad[5]), last_now + 6000000);
}

/* calls=N of command name in INFO commandstats (0 if never called). */
static long
cmd_calls(const char *name)
{
    redisReply *r = redisCommand(rc, "INFO commandstats");
    char pat[64];
    const char *p;
    long v = 0;

    cr_assert(r != NULL && r->type == REDIS_REPLY_STRING);
    snprintf(pat, sizeof(pat), "cmdstat_%s:calls=", name);
    p = strstr(r->str, pat);
    if (p != NULL) {
        v = strtol(p + strlen(pat), NULL, 10);
    }
    freeReplyObject(r);
    return v;
}

/* INFO persistence rdb_changes_since_last_save: the writes Redis counted
 * (each SET of the script, each bucket the module wrote, one apiece). */
static long long
changes(void)
{
    redisReply *r = redisCommand(rc, "INFO persistence");
    const char *p;
    long long v;

    cr_assert(r != NULL && r->type == REDIS_REPLY_STRING);
    p = strstr(r->str, "rdb_changes_since_last_save:");
    cr_assert_not_null(p, "INFO persistence has no rdb_changes_since_last_save");
    v = strtoll(p + strlen("rdb_changes_since_last_save:"), NULL, 10);
    freeReplyObject(r);
    return v;
}

/*
 * One name under three limits in one call (a reload changed a tier while
 * charges were batched; two routes whose buckets share a name): KEYS holds
 * it three times (one per limit, not first, with other keys between),
 * and all three share one TAT, exactly as sequential calls: each charge
 * sees the ones before it, one SET writes the final TAT.  A script that
 * kept a TAT per KEY index would answer held 0 to the second and write
 * the name three times, the last write winning.
 */
Test(gcra_redis, one_name_under_two_limits_shares_one_tat)
{
    static const char *dup = "tg:{dup}:t", *o1 = "tg:{dup}:o1", *o2 = "tg:{dup}:o2";
    const tg_gcra_limit la = { 1000000, 10 }, lb = { 2000000, 5 }, lc = { 1000000, 8 };
    const req q[] = {
        { 1, 1, { o1 }, { la } },        /* KEYS[1] */
        { 1, 3, { dup }, { la } },       /* KEYS[2]: held 0, TAT now + 3 s */
        { 1, 0, { o2 }, { la } },        /* KEYS[3], a look: not written */
        { 1, 2, { dup }, { lb } },       /* KEYS[4]: held 3 s, d 7 s <= 10 s */
        { 1, 2, { dup }, { lc } },       /* KEYS[5]: held 7 s, d 9 s > 8 s: no */
        { 1, 1, { dup }, { la } },       /* KEYS[2] again: held 7 s, TAT + 8 s */
    };
    const uint64_t held[] = { 0, 0, 0, 3000000, 7000000, 7000000 };
    const int allowed[] = { 1, 1, 1, 1, 0, 1 };
    tg_gcra_result res[TG_ARRAY_LEN(q)];
    redisReply *r = redisCommand(rc, "CONFIG RESETSTAT");
    long long changes0;

    cr_assert_not_null(r);
    freeReplyObject(r);
    changes0 = changes();
    run_batch(NULL, q, TG_ARRAY_LEN(q), res);
    for (size_t i = 0; i < TG_ARRAY_LEN(q); i++) {
        cr_assert_eq(res[i].allowed, allowed[i], "request %zu", i);
        cr_assert_eq(res[i].held_us[0], allowed[i] ? held[i] + q[i].cost * q[i].lim[0].interval_us
                                                   : held[i],
                     "request %zu: held %" PRIu64, i, res[i].held_us[0]);
    }
    cr_assert_eq(get_u64(dup), last_now + 8000000);
    cr_assert_eq(get_u64(o1), last_now + 1000000);
    cr_assert_eq(int_cmd("EXISTS %s", o2), 0);
    if (native) {
        /* the module reads and writes keys itself: no SET, no MGET */
        cr_assert_eq(cmd_calls("tollgate.charge"), 1);
        cr_assert_eq(cmd_calls("set") + cmd_calls("mget"), 0);
    } else {
        cr_assert_eq(cmd_calls("set"), 2, "one SET per name written");
        cr_assert_eq(cmd_calls("mget"), 1);
    }
    cr_assert_eq(changes() - changes0, 2, "one write per name, %lld counted",
                 changes() - changes0);
}

/*
 * Which way this run charged: in the native run INFO commandstats counts
 * TOLLGATE.CHARGE calls and no EVAL or EVALSHA (the refund script is not
 * called here); in the plain run EVAL and EVALSHA of the script and no
 * TOLLGATE.CHARGE (the module is not even loaded: unknown command).
 */
Test(gcra_redis, charges_go_the_way_of_this_run)
{
    req q = { 1, 1, { "tg:{way}:t" }, { tg_gcra_per_second(10, 5) } };
    tg_gcra_result res;
    redisReply *r = redisCommand(rc, "SCRIPT LOAD %s", tg_gcra_lua);
    char sha[64];

    cr_assert(r != NULL && r->type == REDIS_REPLY_STRING);
    snprintf(sha, sizeof(sha), "%s", r->str);
    freeReplyObject(r);
    r = redisCommand(rc, "CONFIG RESETSTAT");
    cr_assert_not_null(r);
    freeReplyObject(r);
    run_batch(NULL, &q, 1, &res);
    cr_assert(res.allowed);
    run_batch(sha, &q, 1, &res);
    cr_assert(res.allowed);
    run_batch(NULL, &q, 1, &res);
    cr_assert(res.allowed);
    cr_assert_eq(res.remaining, 2);
    if (native) {
        cr_assert_eq(cmd_calls("tollgate.charge"), 3,
                     "TG_REDIS_MODULE is set: 3 charges as TOLLGATE.CHARGE, %ld seen",
                     cmd_calls("tollgate.charge"));
        cr_assert_eq(cmd_calls("eval") + cmd_calls("evalsha"), 0,
                     "TG_REDIS_MODULE is set, yet the script ran (%ld EVAL, %ld EVALSHA)",
                     cmd_calls("eval"), cmd_calls("evalsha"));
    } else {
        cr_assert_eq(cmd_calls("eval"), 2, "2 charges as EVAL, %ld seen", cmd_calls("eval"));
        cr_assert_eq(cmd_calls("evalsha"), 1, "1 charge as EVALSHA, %ld seen",
                     cmd_calls("evalsha"));
        cr_assert_eq(cmd_calls("tollgate.charge"), 0);
        r = redisCommand(rc, "TOLLGATE.PROTO");
        cr_assert(r != NULL && r->type == REDIS_REPLY_ERROR,
                  "the plain run's redis-server has the module loaded");
        freeReplyObject(r);
    }
}

/* A floor is debt the bucket holds at least; 0 is none. */
Test(gcra_redis, floor_raises_the_debt)
{
    tg_gcra_limit l = tg_gcra_per_second(1, 10);    /* L = 10 s */
    req q = { 1, 1, { "tg:{fl}:t" }, { l } };
    static const uint64_t f1[] = { 9000000 }, f2[] = { 9500000 }, f3[] = { 1 };
    tg_gcra_result res;

    batch_floor = f1;                   /* 9 s held: one token left */
    run_batch(NULL, &q, 1, &res);
    batch_floor = NULL;
    cr_assert(res.allowed);
    cr_assert_eq(res.remaining, 0);
    cr_assert_eq(res.held_us[0], 10000000);
    batch_floor = f2;                   /* below what is stored: no effect */
    run_batch(NULL, &q, 1, &res);
    batch_floor = NULL;
    cr_assert(!res.allowed);
    cr_assert(res.retry_us > 900000 && res.retry_us <= 1000000, "%" PRIu64, res.retry_us);
    batch_floor = f3;
    q.keys[0] = "tg:{fl2}:t";
    run_batch(NULL, &q, 1, &res);
    batch_floor = NULL;
    cr_assert(res.allowed);
    cr_assert_eq(res.held_us[0], 1000001);
}

/*
 * The packed arguments keep every number exact, 2^32 and beyond: a floor
 * of 2^32 + 5 us (and an interval of 2^32 + 3 us) charged on an empty
 * bucket holds exactly that debt, and the stored TAT is now + floor + T.
 * A 32-bit packing would drop the high half; a float would round.
 */
/* Numbers that do not fit the layout (too few for the KEYS; an alias
 * that is not an earlier KEY; a bucket's KEY index out of 1..#KEYS) are
 * refused with an error, nothing written. */
Test(gcra_redis, numbers_off_the_layout_are_an_error)
{
    static const uint64_t bad[][7] = {
        { 1, 0 },                           /* no room for the key's numbers */
        { 1, 0, 17, 1, 1000000, 5, 2 },     /* alias beyond the KEY itself */
        { 1, 0, 17, 1, 1000000, 5, 0 },     /* alias 0 */
        { 1, 0, 17, 0, 1000000, 5, 1 },     /* a bucket of KEY 0 */
        { 1, 0, 17, 2, 1000000, 5, 1 },     /* a bucket of a KEY beyond the last */
    };
    static const size_t nbad[] = { 2, 7, 7, 7, 7 };

    for (size_t i = 0; i < TG_ARRAY_LEN(bad); i++) {
        unsigned char pk[sizeof(bad[0])];
        size_t npk = tg_gcra_script_pack(bad[i], nbad[i], pk);
        redisReply *r = native
            ? redisCommand(rc, "TOLLGATE.CHARGE %b %s", pk, npk, "tg:{off}:t")
            : redisCommand(rc, "EVAL %s 1 %s %b", tg_gcra_lua, "tg:{off}:t", pk, npk);

        cr_assert_not_null(r);
        cr_assert_eq(r->type, REDIS_REPLY_ERROR, "case %zu: type %d", i, r->type);
        cr_assert(strstr(r->str, "tollgate: packed arguments") != NULL, "case %zu: %s", i,
                  r->str);
        freeReplyObject(r);
        cr_assert_eq(int_cmd("EXISTS %s", "tg:{off}:t"), 0);
    }
}

Test(gcra_redis, packed_numbers_beyond_32_bits_survive)
{
    tg_gcra_limit l = { 0x100000003ULL, 1000 };         /* L = 1000 T */
    req q = { 1, 1, { "tg:{wide}:t" }, { l } };
    static const uint64_t f[] = { 0x100000005ULL };
    tg_gcra_result res;

    batch_floor = f;
    run_batch(NULL, &q, 1, &res);
    batch_floor = NULL;
    cr_assert(res.allowed);
    cr_assert_eq(res.held_us[0], 0x100000005ULL + 0x100000003ULL,
                 "held %" PRIu64, res.held_us[0]);
    cr_assert_eq(res.remaining, 997);          /* (1000 T - (2 T + 2)) / T */
    cr_assert_eq(get_u64("tg:{wide}:t"), last_now + 0x100000005ULL + 0x100000003ULL);
}

/*
 * A call of more numbers than one struct.unpack takes (the script decodes
 * them 4,000 at a time): 2,500 requests over 1,250 keys of burst 1, each
 * key charged twice, numbers 2 + 2*2500 + 3*1250 = 8,752.  The first
 * charge of each key passes, the second is denied, in every chunk.
 */
Test(gcra_redis, a_call_of_many_numbers_decodes_in_chunks)
{
    enum { NK = 1250, NR = 2 * NK };
    static req q[NR];
    static tg_gcra_result res[NR];
    static char names[NK][24];
    tg_gcra_limit l = tg_gcra_per_second(1, 1);

    for (int k = 0; k < NK; k++) {
        snprintf(names[k], sizeof(names[k]), "tg:{big}:%d", k);
    }
    for (int i = 0; i < NR; i++) {
        q[i] = (req){ 1, 1, { names[i % NK] }, { l } };
    }
    run_batch(NULL, q, NR, res);
    for (int i = 0; i < NR; i++) {
        cr_assert_eq(res[i].allowed, i < NK, "request %d", i);
        cr_assert_eq(res[i].held_us[0], 1000000, "request %d", i);
    }
}

/* ---- property: admitted <= burst + rate * t over every window ------------ */

static void refund(const char *key, uint64_t amount, uint64_t p);

/*
 * Three connections (three instances) pipeline random batches: random
 * buckets (limits, bursts), random costs (0 .. above the burst), random
 * floors, replies read late and out of order, some allowed answers given
 * back (late: tg_gcra_refund_lua) and then not counted.  Every answer carries the
 * script's clock; per bucket, the admitted costs in every window [t_i,
 * t_j] of admitted requests must be <= burst + floor((t_j - t_i) / T).
 */
typedef struct prop_ev {
    uint64_t t;
    uint32_t cost;
    uint8_t  nb, b[3];
} prop_ev;

static int
prop_cmp(const void *a, const void *b)
{
    const prop_ev *x = a, *y = b;
    return x->t < y->t ? -1 : x->t > y->t;
}

Test(gcra_redis, property_window_bound_across_instances, .timeout = 240)
{
    enum { NB = 6, NCONN = 3, ROUNDS = 600, MAXREQ = 8, MAXPEND = 4 };
    static const char *names[NB] = {
        "tg:{p1}:t", "tg:{p1}:r:x", "tg:{p2}:t", "tg:{p3}:t", "tg:{global}:g", "tg:{p4}:t",
    };
    tg_gcra_limit lk[NB];
    redisContext *c[NCONN];
    /* per connection: the batches sent, not yet read */
    struct pend { int nreq; size_t nbk; prop_ev ev[MAXREQ]; req rq[MAXREQ]; }
        pend[NCONN][MAXPEND];
    int npend[NCONN] = { 0 };
    prop_ev *all = calloc(ROUNDS * MAXREQ, sizeof(*all));
    size_t nall = 0, admitted = 0, denied = 0, impossible = 0, refunded = 0;
    uint64_t rng = 0x9e3779b97f4a7c15ull;

#define RND(n) (rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17, rng % (n))
    cr_assert_not_null(all);
    for (int i = 0; i < NB; i++) {
        lk[i].interval_us = 500 + RND(20000);
        lk[i].burst = 1 + (uint32_t)RND(12);
    }
    for (int i = 0; i < NCONN; i++) {
        c[i] = redisConnect("127.0.0.1", redis_port);
        cr_assert(c[i] != NULL && !c[i]->err);
    }
    for (int round = 0; round < ROUNDS; round++) {
        int k = (int)RND(NCONN);

        if (npend[k] == MAXPEND || (npend[k] > 0 && RND(3) == 0)) {
            /* read this connection's oldest reply (late, out of order) */
            struct pend *p = &pend[k][0];
            redisReply *r;
            uint64_t now_s, *u;
            size_t e = 0;

            cr_assert_eq(redisGetReply(c[k], (void **)&r), REDIS_OK);
            u = reply_nums(r, (size_t)p->nreq + p->nbk + 1);
            now_s = u[p->nreq + p->nbk];
            for (int q = 0; q < p->nreq; q++) {
                tg_gcra_result res;
                int allowed;

                decode(u + e, &p->rq[q], now_s, &res);
                allowed = res.allowed;
                for (int b = 0; b < p->ev[q].nb; b++) {
                    if (p->ev[q].cost > lk[p->ev[q].b[b]].burst) {
                        cr_assert(!allowed, "a cost above a burst passed");
                        impossible++;
                        break;
                    }
                }
                if (!allowed) {
                    cr_assert_gt(res.retry_us, 0, "denied, retry 0");
                    denied++;
                }
                if (allowed && RND(8) == 0) {
                    /* answered "late": given back, not admitted */
                    for (int b = 0; b < p->ev[q].nb; b++) {
                        int dup = 0;
                        for (int b2 = 0; b2 < b; b2++) {
                            dup |= p->ev[q].b[b2] == p->ev[q].b[b];
                        }
                        if (!dup) {
                            const tg_gcra_limit *l = &lk[p->ev[q].b[b]];
                            refund(names[p->ev[q].b[b]], (uint64_t)p->ev[q].cost * l->interval_us,
                                   now_s + res.held_us[b]);
                        }
                    }
                    refunded++;
                    allowed = 0;
                }
                e += 1 + p->ev[q].nb;
                if (allowed) {
                    p->ev[q].t = 0;     /* filled below */
                    all[nall] = p->ev[q];
                    all[nall++].t = 1;  /* mark */
                    admitted++;
                }
            }
            /* the script's clock: the last element */
            for (size_t j = nall; j > 0 && all[j - 1].t == 1; j--) {
                all[j - 1].t = u[e];
            }
            free(u);
            freeReplyObject(r);
            memmove(&pend[k][0], &pend[k][1], (size_t)(npend[k] - 1) * sizeof(pend[k][0]));
            npend[k]--;
        } else {
            struct pend *p = &pend[k][npend[k]++];
            uint64_t floors[MAXREQ * 3];
            int nf = 0;
            call cl;

            p->nreq = 1 + (int)RND(MAXREQ);
            for (int q = 0; q < p->nreq; q++) {
                prop_ev *ev = &p->ev[q];
                ev->nb = (uint8_t)(1 + RND(3));
                ev->cost = RND(10) == 0 ? (uint32_t)RND(15) : 1;
                p->rq[q] = (req){ ev->nb, ev->cost, { NULL }, { { 0, 0 } } };
                for (int b = 0; b < ev->nb; b++) {
                    const tg_gcra_limit *l;
                    ev->b[b] = (uint8_t)RND(NB);
                    l = &lk[ev->b[b]];
                    p->rq[q].keys[b] = names[ev->b[b]];
                    p->rq[q].lim[b] = *l;
                    /* a floor now and then: debt a local store knew of */
                    floors[nf++] = RND(8) == 0 ? RND(l->interval_us * l->burst + 1) : 0;
                }
            }
            /* keys sent once or once per bucket: the same answers */
            p->nbk = build_call(&cl, NULL, p->rq, (size_t)p->nreq, floors, (int)RND(2));
            cr_assert_eq(redisAppendCommandArgv(c[k], cl.argc, cl.argv, cl.len), REDIS_OK);
            call_free(&cl);
            cr_assert_eq(redisBufferWrite(c[k], &(int){ 0 }), REDIS_OK);
        }
        if (RND(4) == 0) {
            sleep_us(RND(3000));
        }
    }
    for (int k = 0; k < NCONN; k++) {
        redisFree(c[k]);                /* unread replies: applied anyway... */
    }
    /* ... so the bound below covers only what we read: it must hold for a
     * subset too, since every admitted request only adds debt. */
    qsort(all, nall, sizeof(*all), prop_cmp);
    for (int bk = 0; bk < NB; bk++) {
        uint64_t t = lk[bk].interval_us;
        for (size_t i = 0; i < nall; i++) {
            uint64_t sum = 0;
            int in_i = 0;
            for (int b = 0; b < all[i].nb; b++) {
                in_i |= all[i].b[b] == bk;
            }
            if (!in_i) {
                continue;
            }
            for (size_t j = i; j < nall; j++) {
                int in = 0;
                for (int b = 0; b < all[j].nb; b++) {
                    in += all[j].b[b] == bk;
                }
                if (!in) {
                    continue;
                }
                sum += all[j].cost;     /* a key twice in one request: once */
                cr_assert_leq(sum, lk[bk].burst + (all[j].t - all[i].t) / t,
                              "bucket %d: %" PRIu64 " tokens admitted in %" PRIu64
                              " us (burst %u, T %" PRIu64 ")", bk, sum,
                              all[j].t - all[i].t, lk[bk].burst, t);
            }
        }
    }
    cr_log_info("property: %zu admitted, %zu denied (%zu with a cost above a burst), "
                "%zu given back as late, over %d batches on %d connections", admitted,
                denied, impossible, refunded, ROUNDS, NCONN);
    cr_assert_gt(admitted, 200);
    cr_assert_gt(denied, 200);
    free(all);
#undef RND
}

/* ---- the late refund -------------------------------------------------------- */

static void
refund(const char *key, uint64_t amount, uint64_t p)
{
    redisReply *r = redisCommand(rc, "EVAL %s 1 %s %llu %llu", tg_gcra_refund_lua, key,
                                 (unsigned long long)amount, (unsigned long long)p);
    cr_assert_not_null(r);
    cr_assert_eq(r->type, REDIS_REPLY_INTEGER, "%s", r->type == REDIS_REPLY_ERROR ? r->str : "");
    freeReplyObject(r);
}

/* A charge answered too late is given back, but only its own debt: a
 * charge by someone else after it keeps its tokens. */
Test(gcra_redis, late_refund_gives_back_only_its_own)
{
    tg_gcra_limit l = tg_gcra_per_second(1, 10);    /* T = 1 s */
    tg_gcra_result a, b;
    uint64_t pa;

    a = charge("tg:{lr}:t", l, 3);
    cr_assert(a.allowed);
    pa = last_now + a.held_us[0];
    refund("tg:{lr}:t", 3 * l.interval_us, pa);
    cr_assert_eq(int_cmd("EXISTS %s", "tg:{lr}:t"), 0, "a full bucket is no key");

    a = charge("tg:{lr}:t", l, 3);                  /* ours: 3 */
    pa = last_now + a.held_us[0];
    b = charge("tg:{lr}:t", l, 2);                  /* someone else's: 2 */
    cr_assert(b.allowed);
    refund("tg:{lr}:t", 3 * l.interval_us, pa);
    b = charge("tg:{lr}:t", l, 0);                  /* a look */
    cr_assert(b.remaining >= 7 && b.remaining <= 8, "remaining %u: only ours back",
              b.remaining);
    /* two late charges given back in either order: nothing is left */
    for (int order = 0; order < 2; order++) {
        uint64_t p1, p2;
        a = charge("tg:{lr2}:t", l, 2);
        p1 = last_now + a.held_us[0];
        a = charge("tg:{lr2}:t", l, 3);
        p2 = last_now + a.held_us[0];
        refund("tg:{lr2}:t", (order ? 3 : 2) * l.interval_us, order ? p2 : p1);
        refund("tg:{lr2}:t", (order ? 2 : 3) * l.interval_us, order ? p1 : p2);
        cr_assert_eq(int_cmd("EXISTS %s", "tg:{lr2}:t"), 0, "order %d", order);
    }
}
