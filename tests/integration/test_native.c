/*
 * test_native.c - the charge as a native Redis command (TOLLGATE.CHARGE,
 * src/redis-module/tollgate_redis.c) against the script it stands for
 * (tg_gcra_lua, src/gcra.c), in real redis-servers that load the module:
 *
 *   mixed writers   buckets charged by the script and the module in turn
 *                   (each reading what the other wrote) answer as the C
 *                   step (tg_gcra_charge) on each reply's clock, and store
 *                   the same TAT and expiry; values set by hand (hex,
 *                   blanks, nan, 2^53, other types...) read as the script
 *                   reads them, and other types overwritten as it does
 *   garbage         thousands of random and mutated `packed` strings: an
 *                   error or 8*k bytes each, nothing written on an error,
 *                   the same redis-server alive at the end; valid layouts
 *                   of random values answered exactly as by the script
 *   replication     a replica (with the module or without) holds the same
 *                   values and expiry times as the master
 *   big calls       2,000 keys and 3,000 requests in one call
 *   memory          200,000 charges leave used_memory where 1,000 keys put it
 *   OOM             refused over maxmemory, as the script is
 *   events          keyspace notifications as the script's SET ... PXAT
 *
 * Comparisons with the script run the same numbers on two sets of fresh
 * keys (one per way); answers are compared where they cannot depend on
 * the microsecond each call ran at (whole numbers below 2^52: exact; or
 * intervals of seconds with debts at half seconds: no decision within
 * half a second of flipping).
 *
 * Each test starts its own redis-server(s) through the harness
 * (harness.h), which loads the module TG_REDIS_MODULE names (meson sets
 * it: build/tollgate-redis.so); every server is checked to answer
 * TOLLGATE.PROTO with 1.  hiredis, synchronous; no fixed sleeps (the
 * replication test polls offsets).
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hiredis/hiredis.h>

#include "harness.h"
#include "tollgate/common.h"
#include "tollgate/gcra.h"

#define MAXNUM  9007199254740991.0            /* 2^53 - 1 */
#define EXACT   4503599627370496.0            /* 2^52: answers below it are exact */
#define MAXB    8                             /* buckets of one request (tollgate's) */

enum { LUA = 0, NATIVE = 1 };                 /* the two ways to charge */
static const char *const way_name[2] = { "the script", "TOLLGATE.CHARGE" };

static tgh_upstream srv;
static redisContext *rc;
static char sha[48];                          /* tg_gcra_lua, loaded */

/* ---- small things --------------------------------------------------------- */

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static uint64_t
rnd(uint64_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return n == 0 ? 0 : rng % n;
}

static redisReply *
cmd(redisContext *c, const char *fmt, ...)
{
    redisReply *r;
    va_list ap;

    va_start(ap, fmt);
    r = redisvCommand(c, fmt, ap);
    va_end(ap);
    cr_assert_not_null(r, "redis: %s (%s)", c->errstr, fmt);
    return r;
}

static void
cmd_ok(redisContext *c, const char *fmt, ...)
{
    redisReply *r;
    va_list ap;

    va_start(ap, fmt);
    r = redisvCommand(c, fmt, ap);
    va_end(ap);
    cr_assert_not_null(r, "redis: %s (%s)", c->errstr, fmt);
    cr_assert_neq(r->type, REDIS_REPLY_ERROR, "%s: %s", fmt, r->str);
    freeReplyObject(r);
}

static long long
cmd_int(redisContext *c, const char *fmt, ...)
{
    redisReply *r;
    long long v;
    va_list ap;

    va_start(ap, fmt);
    r = redisvCommand(c, fmt, ap);
    va_end(ap);
    cr_assert_not_null(r, "redis: %s (%s)", c->errstr, fmt);
    cr_assert_eq(r->type, REDIS_REPLY_INTEGER, "%s: reply type %d %s", fmt, r->type,
                 r->type == REDIS_REPLY_ERROR ? r->str : "");
    v = r->integer;
    freeReplyObject(r);
    return v;
}

/* A number field of INFO section (e.g. "memory", "used_memory"); -1 if
 * it is not there. */
static long long
info_num(redisContext *c, const char *section, const char *field)
{
    redisReply *r = cmd(c, "INFO %s", section);
    char pat[96];
    const char *p;
    long long v = -1;

    cr_assert_eq(r->type, REDIS_REPLY_STRING);
    snprintf(pat, sizeof(pat), "\n%s:", field);
    p = strstr(r->str, pat);
    if (p != NULL) {
        v = strtoll(p + strlen(pat), NULL, 10);
    }
    freeReplyObject(r);
    return v;
}

/* Redis TIME in microseconds. */
static uint64_t
redis_now(redisContext *c)
{
    redisReply *r = cmd(c, "TIME");
    uint64_t v;

    cr_assert(r->type == REDIS_REPLY_ARRAY && r->elements == 2);
    v = strtoull(r->element[0]->str, NULL, 10) * 1000000u
        + strtoull(r->element[1]->str, NULL, 10);
    freeReplyObject(r);
    return v;
}

/* GET key: 1 and its value (a decimal) in *v, 0 if absent. */
static int
get_num(redisContext *c, const char *key, double *v)
{
    redisReply *r = cmd(c, "GET %s", key);
    int found = r->type == REDIS_REPLY_STRING;

    cr_assert(found || r->type == REDIS_REPLY_NIL, "GET %s: type %d", key, r->type);
    *v = found ? strtod(r->str, NULL) : 0;
    freeReplyObject(r);
    return found;
}

static int
module_loaded(redisContext *c)
{
    redisReply *r = redisCommand(c, "TOLLGATE.PROTO");
    int ok = r != NULL && r->type == REDIS_REPLY_INTEGER && r->integer == 1;

    freeReplyObject(r);
    return ok;
}

static redisContext *
connect_to(int port)
{
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, (struct timeval){ 2, 0 });

    cr_assert(c != NULL && !c->err, "connect to redis-server on port %d: %s", port,
              c != NULL ? c->errstr : "out of memory");
    redisSetTimeout(c, (struct timeval){ 60, 0 });
    return c;
}

static void
load_script(redisContext *c)
{
    redisReply *r = cmd(c, "SCRIPT LOAD %s", tg_gcra_lua);

    cr_assert_eq(r->type, REDIS_REPLY_STRING, "SCRIPT LOAD: %s",
                 r->type == REDIS_REPLY_ERROR ? r->str : "");
    snprintf(sha, sizeof(sha), "%s", r->str);
    freeReplyObject(r);
}

static void
start(void)
{
    cr_assert(tgh_env("TG_REDIS_MODULE")[0] != '\0',
              "TG_REDIS_MODULE is not set: run through meson test, or set it to "
              "build/tollgate-redis.so");
    TGH_CHECK(tgh_redis_start(&srv) == 0, "redis-server with the module %s did not start",
              tgh_env("TG_REDIS_MODULE"));
    rc = connect_to(srv.port);
    cr_assert(module_loaded(rc), "redis-server loaded %s but TOLLGATE.PROTO is not 1",
              tgh_env("TG_REDIS_MODULE"));
    load_script(rc);
}

static void
stop(void)
{
    if (rc != NULL) {
        redisFree(rc);
        rc = NULL;
    }
    tgh_cleanup();
}

TestSuite(native, .init = start, .fini = stop, .timeout = 240);

/* ---- calls ------------------------------------------------------------------ */

/* The packed argument: n doubles, little-endian, as they are (NaN and all). */
static unsigned char *
pack_d(const double *v, size_t n, size_t extra)
{
    unsigned char *p = malloc(8 * n + extra + 1);

    cr_assert_not_null(p);
    for (size_t i = 0; i < n; i++) {
        uint64_t b;

        memcpy(&b, &v[i], 8);
        for (int k = 0; k < 8; k++) {
            p[8 * i + (size_t)k] = (unsigned char)(b >> (8 * k));
        }
    }
    return p;
}

/* One call's argument vector: EVALSHA sha nk prefix+key... packed (the
 * script) or TOLLGATE.CHARGE packed prefix+key... (the module). */
typedef struct argvec {
    int          argc;
    const char **argv;
    size_t      *len;
    char        *names;
    char         nk[24];
} argvec;

#define NAME_MAX_LEN 80

static void
argv_build(argvec *a, int way, const char *prefix, const unsigned char *pk, size_t npk,
           char *const *keys, size_t nk)
{
    a->argv = calloc(nk + 4, sizeof(*a->argv));
    a->len = calloc(nk + 4, sizeof(*a->len));
    a->names = calloc(nk + 1, NAME_MAX_LEN);
    cr_assert(a->argv && a->len && a->names);
    a->argc = 0;
    if (way == NATIVE) {
        a->argv[a->argc] = "TOLLGATE.CHARGE";
        a->len[a->argc++] = strlen("TOLLGATE.CHARGE");
        a->argv[a->argc] = (const char *)pk;
        a->len[a->argc++] = npk;
    } else {
        snprintf(a->nk, sizeof(a->nk), "%zu", nk);
        a->argv[a->argc] = "EVALSHA";
        a->len[a->argc++] = 7;
        a->argv[a->argc] = sha;
        a->len[a->argc++] = strlen(sha);
        a->argv[a->argc] = a->nk;
        a->len[a->argc++] = strlen(a->nk);
    }
    for (size_t i = 0; i < nk; i++) {
        char *s = a->names + i * NAME_MAX_LEN;

        snprintf(s, NAME_MAX_LEN, "%s%s", prefix, keys[i]);
        a->argv[a->argc] = s;
        a->len[a->argc++] = strlen(s);
    }
    if (way == LUA) {
        a->argv[a->argc] = (const char *)pk;
        a->len[a->argc++] = npk;
    }
}

static void
argv_free(argvec *a)
{
    free(a->argv);
    free(a->len);
    free(a->names);
}

/* One charge of packed numbers pk[0..npk) over keys (each prefixed). */
static redisReply *
charge_raw(redisContext *c, int way, const char *prefix, const unsigned char *pk,
           size_t npk, char *const *keys, size_t nk)
{
    argvec a;
    redisReply *r;

    argv_build(&a, way, prefix, pk, npk, keys, nk);
    r = redisCommandArgv(c, a.argc, a.argv, a.len);
    argv_free(&a);
    cr_assert_not_null(r, "redis: %s", c->errstr);
    return r;
}

static void
charge_append(redisContext *c, int way, const char *prefix, const unsigned char *pk,
              size_t npk, char *const *keys, size_t nk)
{
    argvec a;

    argv_build(&a, way, prefix, pk, npk, keys, nk);
    cr_assert_eq(redisAppendCommandArgv(c, a.argc, a.argv, a.len), REDIS_OK);
    argv_free(&a);
}

static redisReply *
next_reply(redisContext *c)
{
    redisReply *r = NULL;

    cr_assert_eq(redisGetReply(c, (void **)&r), REDIS_OK, "redis: %s", c->errstr);
    cr_assert_not_null(r);
    return r;
}

/* A charge's answer: its numbers into a new array (*n of them); asserts a
 * string of whole doubles. */
static double *
answer(const redisReply *r, size_t *n, const char *what)
{
    double *d;

    cr_assert_eq(r->type, REDIS_REPLY_STRING, "%s: reply type %d %s", what, r->type,
                 r->type == REDIS_REPLY_ERROR ? r->str : "");
    cr_assert_eq(r->len % 8, 0, "%s: an answer of %zu bytes", what, r->len);
    *n = r->len / 8;
    d = calloc(*n + 1, sizeof(*d));
    cr_assert_not_null(d);
    for (size_t i = 0; i < *n; i++) {
        uint64_t b = 0;

        for (int k = 7; k >= 0; k--) {
            b = b << 8 | (unsigned char)r->str[8 * i + (size_t)k];
        }
        memcpy(&d[i], &b, 8);
    }
    return d;
}

/* ---- requests into the packed layout (gcra.h) ------------------------------- */

typedef struct req {
    size_t        n;
    uint32_t      cost;
    const char   *keys[MAXB];
    tg_gcra_limit lim[MAXB];
    uint64_t      floor[MAXB];
} req;

typedef struct layout {
    double  *v;
    size_t   nv;
    char   **keys;                  /* KEYS, the requests' names (not copied) */
    size_t   nk, nb;
    unsigned char *pk;              /* v packed */
    size_t   npk;
} layout;

/* As tollgate sends it: each (name, limit) once, alias = the first KEY of
 * the name; floors when any is not 0. */
static void
layout_build(layout *L, const req *q, size_t nreq)
{
    size_t nb = 0, fi = 0, nk = 0, nv = 0;
    tg_gcra_limit *kl;
    uint32_t *kidx;
    int fl = 0;

    for (size_t i = 0; i < nreq; i++) {
        nb += q[i].n;
        for (size_t b = 0; b < q[i].n; b++) {
            fl |= q[i].floor[b] != 0;
        }
    }
    L->keys = calloc(nb + 1, sizeof(*L->keys));
    kl = calloc(nb + 1, sizeof(*kl));
    kidx = calloc(nb + 1, sizeof(*kidx));
    L->v = calloc(2 + nreq + 2 * nb + 3 * nb + 1, sizeof(*L->v));
    cr_assert(L->keys && kl && kidx && L->v);
    for (size_t i = 0; i < nreq; i++) {
        for (size_t b = 0; b < q[i].n; b++, fi++) {
            size_t j;

            for (j = 0; j < nk; j++) {
                if (strcmp(L->keys[j], q[i].keys[b]) == 0
                    && kl[j].interval_us == q[i].lim[b].interval_us
                    && kl[j].burst == q[i].lim[b].burst) {
                    break;
                }
            }
            if (j == nk) {
                L->keys[nk] = (char *)q[i].keys[b];
                kl[nk++] = q[i].lim[b];
            }
            kidx[fi] = (uint32_t)j + 1;
        }
    }
    L->v[nv++] = (double)nreq;
    L->v[nv++] = fl;
    for (size_t i = 0, f = 0; i < nreq; i++) {
        uint64_t a[TG_GCRA_SCRIPT_ARGS];
        size_t na = tg_gcra_script_args(kidx + f, q[i].floor, q[i].n, (1u << q[i].n) - 1,
                                        q[i].cost, fl, a);

        for (size_t j = 0; j < na; j++) {
            L->v[nv++] = (double)a[j];
        }
        f += q[i].n;
    }
    for (size_t j = 0; j < nk; j++) {
        uint64_t a[TG_GCRA_SCRIPT_KEY_ARGS];
        uint32_t alias = (uint32_t)j + 1;

        for (size_t f = 0; f < j; f++) {
            if (strcmp(L->keys[f], L->keys[j]) == 0) {
                alias = (uint32_t)f + 1;
                break;
            }
        }
        tg_gcra_script_key(kl[j], alias, a);
        for (size_t f = 0; f < TG_GCRA_SCRIPT_KEY_ARGS; f++) {
            L->v[nv++] = (double)a[f];
        }
    }
    L->nv = nv;
    L->nk = nk;
    L->nb = nb;
    L->pk = pack_d(L->v, nv, 0);
    L->npk = 8 * nv;
    free(kl);
    free(kidx);
}

static void
layout_free(layout *L)
{
    free(L->v);
    free(L->keys);
    free(L->pk);
}

/* ---- a. mixed writers ------------------------------------------------------ */

/*
 * Random batches on six names (eight limits: two names under a second
 * limit), each batch sent by the script or by the module at random, so
 * that each reads TATs the other wrote.  Every answer must be the C
 * step's on the reply's own clock (its last number), bucket debts
 * included, and every stored value the model's TAT expiring at
 * ceil(TAT / 1 ms) - whichever way wrote it.
 */
Test(native, mixed_writers_answer_as_the_c_step)
{
    enum { NKEYS = 6, NLIM = 8, CALLS = 160 };
    static const char *names[NKEYS] = {
        "mx:{a}:minute", "mx:{a}:burst", "mx:{b}:t", "mx:{c}:t", "mx:global", "mx:{d}:t",
    };
    static const size_t name_of[NLIM] = { 0, 1, 2, 3, 4, 5, 0, 4 };
    static const tg_gcra_limit lk[NLIM] = {
        { 1000000, 10 }, { 2000000, 3 }, { 1000000, 20 }, { 3000000, 2 },
        { 1000000, 60 }, { 1500000, 6 }, { 2000000, 8 },  { 1000000, 80 },
    };
    uint64_t model[NKEYS] = { 0 };
    int writer[NKEYS] = { -1, -1, -1, -1, -1, -1 };
    int ncalls[2] = { 0, 0 }, handoffs = 0, allowed = 0, denied = 0;

    for (int call = 0; call < CALLS; call++) {
        int way = (int)rnd(2);
        size_t nreq = 1 + rnd(8), nans;
        req q[8];
        size_t idx[8][3];
        layout L;
        redisReply *r;
        double *ans, now_d;
        uint64_t now, tcheck;
        char what[64];

        for (size_t i = 0; i < nreq; i++) {
            q[i] = (req){ 1 + rnd(3), (uint32_t)rnd(4), { NULL }, { { 0, 0 } }, { 0 } };
            for (size_t b = 0; b < q[i].n; b++) {
                idx[i][b] = rnd(NLIM);
                q[i].keys[b] = names[name_of[idx[i][b]]];
                q[i].lim[b] = lk[idx[i][b]];
            }
        }
        layout_build(&L, q, nreq);
        r = charge_raw(rc, way, "", L.pk, L.npk, L.keys, L.nk);
        snprintf(what, sizeof(what), "call %d by %s", call, way_name[way]);
        ans = answer(r, &nans, what);
        freeReplyObject(r);
        cr_assert_eq(nans, nreq + L.nb + 1, "%s: %zu numbers in the answer", what, nans);
        now_d = ans[nans - 1];
        cr_assert(now_d > 1e15 && now_d < MAXNUM, "%s: clock %.0f", what, now_d);
        now = (uint64_t)now_d;
        ncalls[way]++;

        for (size_t i = 0, e = 0; i < nreq; i++) {
            uint64_t tat[3];
            long long v[1 + MAXB];
            tg_gcra_result c, got;

            for (size_t b = 0; b < q[i].n; b++) {
                size_t nm = name_of[idx[i][b]];

                tat[b] = model[nm];
                if (writer[nm] >= 0 && writer[nm] != way && tat[b] > now) {
                    handoffs++;
                }
                /* the debt it read: what the other way (or itself) wrote */
                cr_assert_eq(ans[e + 1 + b], (double)(tat[b] > now ? tat[b] - now : 0),
                             "%s req %zu bucket %zu (%s): debt %.0f, the model's %" PRIu64,
                             what, i, b, q[i].keys[b], ans[e + 1 + b],
                             tat[b] > now ? tat[b] - now : 0);
            }
            for (size_t b = 0; b <= q[i].n; b++) {
                v[b] = (long long)ans[e + b];
            }
            got.now_us = 0;
            cr_assert_eq(tg_gcra_script_answer(v, q[i].lim, (1u << q[i].n) - 1, q[i].cost,
                                               now, &got), 1, "%s req %zu: not a valid answer",
                         what, i);
            tg_gcra_charge(q[i].lim, tat, NULL, q[i].n, q[i].cost, now, &c);
            cr_assert_eq(got.allowed, c.allowed, "%s req %zu", what, i);
            cr_assert_eq(got.remaining, c.remaining, "%s req %zu", what, i);
            cr_assert_eq(got.retry_us, c.retry_us, "%s req %zu", what, i);
            cr_assert_eq(got.reset_us, c.reset_us, "%s req %zu", what, i);
            cr_assert_eq(got.limiting, c.limiting, "%s req %zu", what, i);
            if (c.allowed) {
                for (size_t b = 0; b < q[i].n; b++) {
                    model[name_of[idx[i][b]]] = tat[b];
                    if (q[i].cost > 0) {
                        writer[name_of[idx[i][b]]] = way;
                    }
                }
                allowed++;
            } else {
                denied++;
            }
            e += 1 + q[i].n;
        }
        free(ans);
        layout_free(&L);

        for (int k = 0; k < NKEYS; k++) {
            double sv;
            int found = get_num(rc, names[k], &sv);
            long long pxat = cmd_int(rc, "PEXPIRETIME %s", names[k]);

            tcheck = redis_now(rc);
            if (model[k] <= now) {
                cr_assert(!found || sv <= (double)now, "%s: %.0f stored on a full bucket",
                          names[k], sv);
            } else if (!found) {
                cr_assert_leq(model[k], tcheck + 1000, "%s vanished %" PRIu64 " us before "
                              "its TAT", names[k], model[k] - tcheck);
            } else {
                cr_assert_eq(sv, (double)model[k], "after call %d: %s holds %.0f, the TAT is "
                             "%" PRIu64, call, names[k], sv, model[k]);
                cr_assert_eq(pxat, (long long)((model[k] + 999) / 1000),
                             "%s expires at %lld ms, its TAT is %" PRIu64 " us", names[k],
                             pxat, model[k]);
            }
        }
    }
    cr_log_info("mixed writers: %d calls by the script, %d by the module, %d buckets read "
                "from the other's write, %d allowed, %d denied", ncalls[LUA],
                ncalls[NATIVE], handoffs, allowed, denied);
    cr_assert_gt(ncalls[LUA], 40);
    cr_assert_gt(ncalls[NATIVE], 40);
    cr_assert_gt(handoffs, 50, "too few buckets changed hands to prove anything");
    cr_assert_gt(allowed, 100);
    cr_assert_gt(denied, 100);
}

/* ---- a. values set by hand ------------------------------------------------- */

/* How a key is seeded before a charge. */
typedef struct seeded {
    const char *what;
    int         type;               /* 0 string, 1 list, 2 hash, 3 set, 4 zset, 5 none */
    char        val[160];
    size_t      len;
    long long   pxat;               /* > 0: SET ... PXAT this */
} seeded;

static void
seed(redisContext *c, const char *key, const seeded *s)
{
    cmd_ok(c, "DEL %s", key);
    switch (s->type) {
    case 0:
        if (s->pxat > 0) {
            cmd_ok(c, "SET %s %b PXAT %lld", key, s->val, s->len, s->pxat);
        } else {
            cmd_ok(c, "SET %s %b", key, s->val, s->len);
        }
        break;
    case 1: cmd_ok(c, "RPUSH %s a b", key); break;
    case 2: cmd_ok(c, "HSET %s f v", key); break;
    case 3: cmd_ok(c, "SADD %s m", key); break;
    case 4: cmd_ok(c, "ZADD %s 1 m", key); break;
    default: break;
    }
}

/* GET key's bytes into buf (type string), or its TYPE name. */
static void
key_state(redisContext *c, const char *key, char *type, size_t tlen, char *buf, size_t *blen)
{
    redisReply *r = cmd(c, "TYPE %s", key);

    snprintf(type, tlen, "%s", r->str);
    freeReplyObject(r);
    *blen = 0;
    if (strcmp(type, "string") == 0) {
        r = cmd(c, "GET %s", key);
        cr_assert_eq(r->type, REDIS_REPLY_STRING);
        cr_assert_lt(r->len, 200);
        memcpy(buf, r->str, r->len);
        *blen = r->len;
        freeReplyObject(r);
    }
}

/*
 * Each seeded value on two keys, one charged by the script and one by the
 * module (one request, cost 1, T = 100 s, burst 10): the same decision,
 * the same TAT read (now + debt, when there is a debt), the same value
 * and expiry written (relative to each call's clock) or left alone.
 * Then each key is charged again by the other way: the script's write
 * read by the module and the module's by the script (a TAT written on a
 * full bucket is compared relative to the clock of the call that wrote
 * it).
 */
static void
compare_seeded(const seeded *cases, size_t ncases, const char *tag)
{
    const double T = 100000000.0;
    double v[7] = { 1, 0, 16 + 1, 1, T, 10, 1 };
    unsigned char *pk = pack_d(v, 7, 0);

    for (size_t i = 0; i < ncases; i++) {
        const seeded *s = &cases[i];
        char kL[64], kM[64], *key[2] = { kL, kM };
        double base[2] = { 0, 0 };      /* the clock a key's TAT counts from (0: absolute) */

        snprintf(kL, sizeof(kL), "%s:L:%zu", tag, i);
        snprintf(kM, sizeof(kM), "%s:M:%zu", tag, i);
        seed(rc, kL, s);
        seed(rc, kM, s);
        for (int round = 0; round < 2; round++) {
            double *a[2], now[2], read[2];
            char type[2][32], val[2][200];
            size_t n, vlen[2];
            long long pxat[2];
            int way[2];

            for (int w = 0; w < 2; w++) {
                /* round 0: L by the script, M by the module; round 1 crossed */
                redisReply *r;
                char what[200];

                way[w] = round == 0 ? w : 1 - w;
                r = charge_raw(rc, way[w], "", pk, 56, &key[w], 1);
                snprintf(what, sizeof(what), "%s (%s), round %d, %s", s->what, key[w], round,
                         way_name[way[w]]);
                a[w] = answer(r, &n, what);
                freeReplyObject(r);
                cr_assert_eq(n, 3, "%s", what);
                now[w] = a[w][2];
                read[w] = a[w][1] > 0 ? now[w] + a[w][1] - base[w] : 0;
                key_state(rc, key[w], type[w], sizeof(type[w]), val[w], &vlen[w]);
                pxat[w] = cmd_int(rc, "PEXPIRETIME %s", key[w]);
            }
            cr_assert_eq(a[0][0], a[1][0], "%s, round %d: %s answers allowed=%.0f, %s %.0f",
                         s->what, round, way_name[way[0]], a[0][0], way_name[way[1]], a[1][0]);
            cr_assert_eq(read[0], read[1], "%s, round %d: %s read the TAT as %.0f, %s as "
                         "%.0f (0: no bucket)", s->what, round, way_name[way[0]],
                         read[0] + (read[0] > 0 ? base[0] : 0), way_name[way[1]],
                         read[1] + (read[1] > 0 ? base[1] : 0));
            cr_assert_str_eq(type[0], type[1], "%s, round %d: a %s after %s, a %s after %s",
                             s->what, round, type[0], way_name[way[0]], type[1],
                             way_name[way[1]]);
            if (a[0][0] == 1) {
                for (int w = 0; w < 2; w++) {
                    double sv;

                    cr_assert_str_eq(type[w], "string", "%s: allowed by %s, but not replaced",
                                     s->what, way_name[way[w]]);
                    val[w][vlen[w]] = '\0';
                    sv = strtod(val[w], NULL);
                    cr_assert_eq(sv, now[w] + a[w][1] + T, "%s, round %d, %s wrote \"%s\" at "
                                 "%.0f, debt %.0f", s->what, round, way_name[way[w]], val[w],
                                 now[w], a[w][1]);
                    cr_assert_eq(pxat[w], (long long)ceil(sv / 1000), "%s: %s wrote %.0f to "
                                 "expire at %lld ms", s->what, way_name[way[w]], sv, pxat[w]);
                    if (a[w][1] == 0) {
                        base[w] = now[w];       /* now + T; else the TAT read + T */
                    }
                }
            } else if (base[0] == 0) {
                cr_assert(vlen[0] == vlen[1] && memcmp(val[0], val[1], vlen[0]) == 0,
                          "%s, round %d: a denied charge changed a value", s->what, round);
                cr_assert_eq(pxat[0], pxat[1], "%s, round %d: denied, expiry %lld and %lld",
                             s->what, round, pxat[0], pxat[1]);
            }
            free(a[0]);
            free(a[1]);
        }
    }
    free(pk);
}

static size_t
seeded_str(seeded *c, const char *what, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static size_t
seeded_str(seeded *c, const char *what, const char *fmt, ...)
{
    va_list ap;
    int n;

    c->what = what;
    c->type = 0;
    c->pxat = 0;
    va_start(ap, fmt);
    n = vsnprintf(c->val, sizeof(c->val), fmt, ap);
    va_end(ap);
    cr_assert(n >= 0 && (size_t)n < sizeof(c->val));
    c->len = (size_t)n;
    return 1;
}

Test(native, stored_values_are_read_as_the_script_reads_them)
{
    uint64_t now = redis_now(rc);
    unsigned long long fut = now + 300000000ull, past = now - 5000000ull;
    seeded c[48];
    size_t n = 0;

    n += seeded_str(&c[n], "a decimal TAT ahead", "%llu", fut);
    n += seeded_str(&c[n], "a decimal TAT past", "%llu", past);
    n += seeded_str(&c[n], "hex 0x10", "0x10");
    n += seeded_str(&c[n], "hex TAT ahead", "0x%llx", fut);
    n += seeded_str(&c[n], "hex 0X, capital", "0X%llX", fut);
    n += seeded_str(&c[n], "blanks around", " %llu ", fut);
    n += seeded_str(&c[n], "tab, newline around", "\t%llu\r\n", fut);
    n += seeded_str(&c[n], "\" 123 \"", " 123 ");
    n += seeded_str(&c[n], "a fraction", "%llu.75", fut);
    n += seeded_str(&c[n], "1e3", "1e3");
    n += seeded_str(&c[n], "an exponent ahead", "%.15e", (double)fut);
    n += seeded_str(&c[n], "abc", "abc");
    n += seeded_str(&c[n], "123abc", "123abc");
    n += seeded_str(&c[n], "0x", "0x");
    n += seeded_str(&c[n], "1x", "1x");
    n += seeded_str(&c[n], "nan", "nan");
    n += seeded_str(&c[n], "-nan", "-nan");
    n += seeded_str(&c[n], "inf", "inf");
    n += seeded_str(&c[n], "-inf", "-inf");
    n += seeded_str(&c[n], "-5", "-5");
    n += seeded_str(&c[n], "-0", "-0");
    n += seeded_str(&c[n], "0", "0");
    n += seeded_str(&c[n], "2^53", "9007199254740992");
    n += seeded_str(&c[n], "2^53 - 1 (a debt of centuries)", "9007199254740991");
    n += seeded_str(&c[n], "1e300", "1e300");
    n += seeded_str(&c[n], "an empty string", "%s", "");
    n += seeded_str(&c[n], "blanks only", "   ");
    n += seeded_str(&c[n], "100 x", "%0100d", 0);
    memset(c[n - 1].val, 'x', 100);
    /* a TAT, a NUL, then junk: both read up to the NUL */
    n += seeded_str(&c[n], "a TAT, NUL, junk", "%llu", fut);
    memcpy(c[n - 1].val + c[n - 1].len, "\0junk", 5);
    c[n - 1].len += 5;
    n += seeded_str(&c[n], "a TAT ahead with an expiry of its own", "%llu", fut);
    c[n - 1].pxat = (long long)(fut / 1000 + 3600000);
    n += seeded_str(&c[n], "2^53 - 1 with an expiry of its own", "9007199254740991");
    c[n - 1].pxat = (long long)(fut / 1000 + 3600000);
    n += seeded_str(&c[n], "abc with an expiry of its own", "abc");
    c[n - 1].pxat = (long long)(fut / 1000 + 3600000);
    c[n] = (seeded){ "a list", 1, "", 0, 0 };
    n++;
    c[n] = (seeded){ "a hash", 2, "", 0, 0 };
    n++;
    c[n] = (seeded){ "a set", 3, "", 0, 0 };
    n++;
    c[n] = (seeded){ "a sorted set", 4, "", 0, 0 };
    n++;
    c[n] = (seeded){ "no key", 5, "", 0, 0 };
    n++;
    cr_assert_leq(n, TG_ARRAY_LEN(c));
    compare_seeded(c, n, "sv");
}

/*
 * Values of 64 bytes and more that are numbers (zeros or blanks padding a
 * TAT): the script's tonumber reads them whatever their length.
 */
Test(native, long_stored_values_are_read_as_the_script_reads_them)
{
    uint64_t now = redis_now(rc);
    unsigned long long fut = now + 300000000ull;
    seeded c[8];
    size_t n = 0;

    n += seeded_str(&c[n], "a TAT padded with zeros to 63 bytes", "%063llu", fut);
    n += seeded_str(&c[n], "a TAT padded with zeros to 64 bytes", "%064llu", fut);
    n += seeded_str(&c[n], "a TAT padded with zeros to 100 bytes", "%0100llu", fut);
    n += seeded_str(&c[n], "a TAT after 84 blanks", "%100llu", fut);
    n += seeded_str(&c[n], "a TAT before 84 blanks", "%-100llu", fut);
    n += seeded_str(&c[n], "2^53 - 1 padded with zeros to 100 bytes", "%0100llu",
                    9007199254740991ull);
    compare_seeded(c, n, "lv");
}

/* ---- b. garbage --------------------------------------------------------------- */

static double
pick_odd(void)
{
    static const double odd[] = {
        NAN, -NAN, INFINITY, -INFINITY, -1, -0.0, 0.5, 1.5, 9007199254740992.0, MAXNUM,
        9007199254740994.0, 1e300, -1e300, 5e-324, 0, 1, 2, 3, 15, 16, 17, 31, 33, 1e15,
        9223372036854775808.0, 1e19, 4e18, 1e22, -16,
    };
    switch (rnd(4)) {
    case 0:
        return odd[rnd(TG_ARRAY_LEN(odd))];
    case 1:
        return (double)rnd(50);
    case 2:
        return (double)(rnd(40) * 16 + rnd(16));
    default: {
        uint64_t b = rng;
        double d;

        rnd(2);
        memcpy(&d, &b, 8);
        return d;
    }
    }
}

/* A layout that fits (gcra.h) in room numbers, its numbers bounded so that
 * every sum stays far below 2^53 (answers exact), intervals of a second
 * or more (whole seconds, and floors half a second past whole seconds,
 * when whole_seconds); names[] of *nk keys (aliases: a name again, under
 * an earlier KEY's index or, now and then, its own). */
static size_t
gen_valid(double *v, size_t room, char names[][24], size_t *nk, size_t maxk, int whole_seconds)
{
    size_t n = 0, nreq = rnd(12);
    int fl = (int)rnd(2);
    size_t k = 1 + rnd(maxk);

    v[n++] = (double)nreq;
    v[n++] = fl;
    for (size_t r = 0; r < nreq && n + 31 + 3 * k <= room; r++) {
        size_t nb = rnd(6) == 0 ? rnd(16) : rnd(4);
        uint64_t cost = rnd(5) == 0 ? rnd(30) : rnd(4);

        v[n++] = (double)(cost * 16 + nb);
        for (size_t b = 0; b < nb; b++) {
            v[n++] = (double)(1 + rnd(k));
            if (fl) {
                uint64_t f = rnd(3) != 0 ? 0
                           : whole_seconds ? (1 + rnd(20)) * 1000000 + 500000
                           : rnd(1ull << 36);
                v[n++] = (double)f;
            }
        }
    }
    v[0] = 0;
    /* count what fit */
    for (size_t a = 2, r = 0; a < n; r++) {
        size_t nb = (size_t)fmod(v[a], 16);

        a += 1 + nb * (fl ? 2 : 1);
        v[0] = (double)(r + 1);
    }
    for (size_t x = 1; x <= k; x++) {
        uint64_t T = whole_seconds ? (1 + rnd(5)) * 1000000 : 1000000 + rnd(1ull << 30);
        uint64_t burst = 1 + rnd(rnd(4) == 0 ? 200 : 20);
        size_t alias = x;

        if (x > 1 && rnd(5) == 0) {
            alias = 1 + rnd(x - 1);             /* the same name, another limit */
            memcpy(names[x - 1], names[alias - 1], 24);   /* alias < x */
            if (rnd(6) == 0) {
                alias = x;                      /* read and written twice */
            }
        } else {
            snprintf(names[x - 1], 24, "k%zu", x);
        }
        v[n++] = (double)T;
        v[n++] = (double)burst;
        v[n++] = (double)alias;
    }
    *nk = k;
    return n;
}

/* A layout of 513 numbers or more (past the module's stack buffer) up to
 * room: up to 40 keys, requests of up to 15 buckets, bounded values. */
static size_t
gen_big(double *v, size_t room, char names[][24], size_t *nk)
{
    size_t n = 2, k = 1 + rnd(40), want = 513 + rnd(room - 513 - 3 * 40 - 32);
    int fl = (int)rnd(2);

    v[0] = 0;
    v[1] = fl;
    while (n < want) {
        size_t nb = rnd(16);

        v[n++] = (double)(rnd(4) * 16 + nb);
        for (size_t b = 0; b < nb; b++) {
            v[n++] = (double)(1 + rnd(k));
            if (fl) {
                v[n++] = rnd(3) == 0 ? (double)rnd(1u << 30) : 0;
            }
        }
        v[0] += 1;
    }
    for (size_t x = 1; x <= k; x++) {
        size_t alias = x;

        if (x > 1 && rnd(5) == 0) {
            alias = 1 + rnd(x - 1);
            memcpy(names[x - 1], names[alias - 1], 24);   /* alias < x */
        }
        v[n++] = (double)(1000000 + rnd(1u << 30));
        v[n++] = (double)(1 + rnd(20));
        v[n++] = (double)alias;
    }
    *nk = k;
    return n;
}

/* Every number of an answer but its clock (the last) is below 2^52. */
static int
exact_answer(const double *a, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++) {
        if (!(a[i] >= 0 && a[i] < EXACT)) {
            return 0;
        }
    }
    return 1;
}

/*
 * Thousands of arguments TOLLGATE.CHARGE must survive: random bytes of
 * any length, random numbers (NaN, inf, negative, huge, fractions),
 * layouts that fit then mutated (a number replaced, a byte flipped,
 * bytes cut or added, the key count changed), every 50th one of 513
 * numbers or more (the module's heap path), 0..40 keys.  Each goes to
 * the module and to the script, on keys of their own that do not exist:
 * the module answers an error (and then writes none of them) or 8*k
 * bytes (k >= 1, never more numbers than it got); when both answer and
 * the answer is exact (below 2^52), the two are the same but for the
 * clock.  At the end the same redis-server answers PING.
 */
Test(native, garbage_never_crashes_redis, .timeout = 300)
{
    enum { N = 6000, MAXN = 160, MAXBIG = 4096 };
    static double v[MAXBIG];
    long long pid = info_num(rc, "server", "process_id");
    int native_err = 0, native_ok = 0, both_ok = 0, compared = 0, lua_only = 0,
        native_only = 0;
    char lua_only_example[200] = "", native_only_example[200] = "";

    cr_assert_gt(pid, 0);
    for (int it = 0; it < N; it++) {
        char names[48][24], *keys[48];
        size_t nv = 0, nk = 0, npk, extra = 0;
        unsigned char *pk;
        int kind = it % 50 == 49 ? 4 : it % 4, mutate;
        redisReply *r[2];
        char pfx[2][32];

        for (size_t x = 0; x < TG_ARRAY_LEN(names); x++) {
            snprintf(names[x], sizeof(names[x]), "k%zu", x + 1);
            keys[x] = names[x];
        }
        if (kind == 0) {
            /* random bytes, any length */
            npk = rnd(330);
            pk = malloc(npk + 1);
            cr_assert_not_null(pk);
            for (size_t i = 0; i < npk; i++) {
                pk[i] = (unsigned char)rnd(256);
            }
            nk = rnd(41);
        } else {
            if (kind == 1) {
                nv = rnd(90);
                for (size_t i = 0; i < nv; i++) {
                    v[i] = pick_odd();
                }
                nk = rnd(41);
            } else if (kind == 4) {
                nv = gen_big(v, MAXBIG, names, &nk);
            } else {
                nv = gen_valid(v, MAXN, names, &nk, kind == 3 ? 12 : 40, 0);
            }
            mutate = kind == 2 || (kind == 4 && rnd(2));
            if (mutate) {
                /* mutations */
                for (int m = 0, nm = 1 + (int)rnd(3); m < nm; m++) {
                    switch (rnd(6)) {
                    case 0:
                        if (nv > 0) {
                            v[rnd(nv)] = pick_odd();
                        }
                        break;
                    case 1:
                        v[0] = rnd(2) ? pick_odd() : (double)rnd(1000);
                        break;
                    case 2:
                        nk = rnd(41);
                        break;
                    case 3:
                        extra = 1 + rnd(15);
                        break;
                    case 4:
                        if (nv > 0) {
                            nv -= 1 + rnd(nv < 3 ? nv : 3);
                        }
                        break;
                    default:
                        if (nv > 2) {
                            v[2 + rnd(nv - 2)] = (double)rnd(1000);
                        }
                        break;
                    }
                }
            }
            pk = pack_d(v, nv, extra + 8);
            npk = 8 * nv;
            if (mutate && rnd(3) == 0 && npk > 0) {
                pk[rnd(npk)] ^= (unsigned char)(1u << rnd(8));       /* a bit flipped */
            }
            if (extra > 0) {
                /* bytes added, or cut */
                if (rnd(2) && npk >= extra) {
                    npk -= extra;
                } else {
                    for (size_t i = 0; i < extra && i < 8; i++) {
                        pk[npk++] = (unsigned char)rnd(256);
                    }
                }
            }
        }
        for (int w = 0; w < 2; w++) {
            snprintf(pfx[w], sizeof(pfx[w]), "g%d:%d:", w, it);
            charge_append(rc, w, pfx[w], pk, npk, keys, nk);
        }
        r[LUA] = next_reply(rc);
        r[NATIVE] = next_reply(rc);

        if (r[NATIVE]->type == REDIS_REPLY_ERROR) {
            native_err++;
            cr_assert(strstr(r[NATIVE]->str, "tollgate: packed arguments") != NULL,
                      "input %d (%zu bytes, %zu keys): error \"%s\"", it, npk, nk,
                      r[NATIVE]->str);
            if (nk > 0) {
                /* nothing written: none of its keys exists */
                argvec a;
                redisReply *e;

                argv_build(&a, NATIVE, pfx[NATIVE], pk, npk, keys, nk);
                a.argv[1] = "EXISTS";
                a.len[1] = 6;
                e = redisCommandArgv(rc, a.argc - 1, a.argv + 1, a.len + 1);
                argv_free(&a);
                cr_assert(e != NULL && e->type == REDIS_REPLY_INTEGER);
                cr_assert_eq(e->integer, 0, "input %d: answered an error but wrote %lld keys",
                             it, e->integer);
                freeReplyObject(e);
            }
            if (r[LUA]->type != REDIS_REPLY_ERROR) {
                lua_only++;
                if (lua_only_example[0] == '\0') {
                    snprintf(lua_only_example, sizeof(lua_only_example),
                             "input %d (kind %d, %zu bytes, %zu keys)", it, kind, npk, nk);
                }
            }
        } else {
            size_t n;
            double *a;

            cr_assert_eq(r[NATIVE]->type, REDIS_REPLY_STRING,
                         "input %d: reply type %d", it, r[NATIVE]->type);
            cr_assert(r[NATIVE]->len % 8 == 0 && r[NATIVE]->len >= 8 && r[NATIVE]->len <= npk,
                      "input %d (%zu bytes): an answer of %zu bytes", it, npk, r[NATIVE]->len);
            native_ok++;
            if (r[LUA]->type == REDIS_REPLY_STRING) {
                size_t nl;
                double *b;

                both_ok++;
                a = answer(r[NATIVE], &n, "module");
                b = answer(r[LUA], &nl, "script");
                cr_assert_eq(n, nl, "input %d: %zu numbers from the module, %zu from the "
                             "script", it, n, nl);
                if (exact_answer(b, nl)) {
                    compared++;
                    for (size_t i = 0; i + 1 < n; i++) {
                        cr_assert(memcmp(&a[i], &b[i], 8) == 0,
                                  "input %d (kind %d): number %zu of the answer: module %.17g, "
                                  "script %.17g", it, kind, i, a[i], b[i]);
                    }
                }
                free(a);
                free(b);
            } else {
                native_only++;
                if (native_only_example[0] == '\0') {
                    snprintf(native_only_example, sizeof(native_only_example),
                             "input %d (kind %d): script: %.120s", it, kind, r[LUA]->str);
                }
            }
        }
        freeReplyObject(r[0]);
        freeReplyObject(r[1]);
        free(pk);
        if (it % 500 == 0) {
            redisReply *p = cmd(rc, "PING");

            cr_assert(p->type == REDIS_REPLY_STATUS && strcmp(p->str, "PONG") == 0);
            freeReplyObject(p);
        }
    }
    {
        redisReply *p = cmd(rc, "PING");

        cr_assert(p->type == REDIS_REPLY_STATUS && strcmp(p->str, "PONG") == 0,
                  "redis-server does not answer PING after the garbage");
        freeReplyObject(p);
    }
    cr_assert_eq(info_num(rc, "server", "process_id"), pid, "redis-server restarted");
    cr_assert(module_loaded(rc));
    cr_log_info("garbage: %d inputs, module: %d errors, %d answers (%d also answered by the "
                "script, %d of them compared exactly); script answered where the module "
                "refused: %d (%s); module answered where the script failed: %d (%s)", N,
                native_err, native_ok, both_ok, compared, lua_only, lua_only_example,
                native_only, native_only_example);
    cr_assert_gt(native_err, 1000);
    cr_assert_gt(compared, 1000);
    cr_assert_eq(native_only, 0, "the module answered where the script failed: %s",
                 native_only_example);
}

/*
 * Layouts that fit, of random values (costs, bursts, intervals, floors,
 * aliases, a name twice under its own index, up to 15 buckets a request):
 * on fresh keys the answer can only depend on the clock through rounding,
 * and below 2^52 there is none, so module and script answer the same
 * numbers (but the clock) and store the same TATs relative to their clock,
 * expiring at ceil(TAT / 1 ms).
 */
Test(native, valid_layouts_answer_as_the_script)
{
    enum { N = 2500, MAXN = 240 };
    int allowed = 0, denied = 0, written = 0;

    for (int it = 0; it < N; it++) {
        double v[MAXN], *a[2], now[2];
        char names[48][24], *keys[48], pfx[2][32];
        size_t nk, nv = gen_valid(v, MAXN, names, &nk, 24, 0), n[2];
        unsigned char *pk = pack_d(v, nv, 0);

        for (size_t x = 0; x < nk; x++) {
            keys[x] = names[x];
        }
        for (int w = 0; w < 2; w++) {
            redisReply *r;

            snprintf(pfx[w], sizeof(pfx[w]), "rv%d:%d:", w, it);
            r = charge_raw(rc, w, pfx[w], pk, 8 * nv, keys, nk);
            a[w] = answer(r, &n[w], way_name[w]);
            freeReplyObject(r);
            now[w] = a[w][n[w] - 1];
        }
        cr_assert_eq(n[0], n[1], "input %d: %zu numbers from the script, %zu from the module",
                     it, n[0], n[1]);
        cr_assert(exact_answer(a[0], n[0]), "input %d: the generator's numbers are too big", it);
        for (size_t i = 0; i + 1 < n[0]; i++) {
            cr_assert_eq(a[1][i], a[0][i], "input %d: number %zu of the answer: module %.0f, "
                         "script %.0f", it, i, a[1][i], a[0][i]);
        }
        /* allowed flags: each request's first number */
        for (size_t i = 0, e = 0, p = 2; i < (size_t)v[0]; i++) {
            size_t nb = (size_t)fmod(v[p], 16);

            if (a[0][e] == 1) {
                allowed++;
            } else {
                denied++;
            }
            e += 1 + nb;
            p += 1 + nb * (v[1] == 1 ? 2 : 1);
        }
        for (size_t x = 0; x < nk; x++) {
            for (int w = 0; w < 2; w++) {
                redisAppendCommand(rc, "GET %s%s", pfx[w], keys[x]);
                redisAppendCommand(rc, "PEXPIRETIME %s%s", pfx[w], keys[x]);
            }
        }
        for (size_t x = 0; x < nk; x++) {
            double sv[2];
            int found[2];
            long long pxat[2];

            for (int w = 0; w < 2; w++) {
                char key[64];
                redisReply *g = next_reply(rc), *e = next_reply(rc);

                snprintf(key, sizeof(key), "%s%s", pfx[w], keys[x]);
                found[w] = g->type == REDIS_REPLY_STRING;
                cr_assert(found[w] || g->type == REDIS_REPLY_NIL, "GET %s: type %d", key, g->type);
                sv[w] = found[w] ? strtod(g->str, NULL) : 0;
                cr_assert_eq(e->type, REDIS_REPLY_INTEGER);
                pxat[w] = e->integer;
                freeReplyObject(g);
                freeReplyObject(e);
                if (found[w]) {
                    cr_assert_eq(pxat[w], (long long)ceil(sv[w] / 1000),
                                 "input %d: %s holds %.0f, expires at %lld ms", it, key, sv[w],
                                 pxat[w]);
                }
            }
            cr_assert_eq(found[0], found[1], "input %d: %s written by %s only", it, keys[x],
                         way_name[found[1]]);
            if (found[0]) {
                written += x == 0;
                cr_assert_eq(sv[1] - now[1], sv[0] - now[0], "input %d: %s: the module "
                             "stored now + %.0f, the script now + %.0f", it, keys[x],
                             sv[1] - now[1], sv[0] - now[0]);
            }
        }
        free(a[0]);
        free(a[1]);
        free(pk);
    }
    cr_log_info("random layouts: %d calls, %d requests allowed, %d denied", N, allowed, denied);
    cr_assert_gt(allowed, 2000);
    cr_assert_gt(denied, 2000);
    cr_assert_gt(written, 300);
}

/*
 * The same, on buckets that hold debt (a TAT seeded on both sides: half a
 * second past whole seconds, as are the floors; intervals are whole
 * seconds): a decision could only flip if the two calls ran half a second
 * apart, so the allowed flags are equal, and each debt differs by no more
 * than the two calls' clocks do.
 */
Test(native, valid_layouts_on_held_buckets_decide_as_the_script)
{
    enum { N = 1500, MAXN = 240 };
    int allowed = 0, denied = 0, held = 0;

    for (int it = 0; it < N; it++) {
        double v[MAXN], *a[2], now[2];
        char names[48][24], *keys[48], pfx[2][32];
        size_t nk, nv = gen_valid(v, MAXN, names, &nk, 24, 1), n[2];
        unsigned char *pk = pack_d(v, nv, 0);
        uint64_t t0 = redis_now(rc);

        for (size_t x = 0; x < nk; x++) {
            keys[x] = names[x];
        }
        for (int w = 0; w < 2; w++) {
            snprintf(pfx[w], sizeof(pfx[w]), "hv%d:%d:", w, it);
        }
        for (size_t x = 0; x < nk; x++) {
            uint64_t tat;

            if (rnd(4) == 0) {
                continue;                       /* no bucket */
            }
            tat = rnd(5) == 0 ? t0 - 1000000 * rnd(100)   /* full again */
                              : t0 + 500000 + 1000000 * rnd(60);
            for (int w = 0; w < 2; w++) {
                cmd_ok(rc, "SET %s%s %llu", pfx[w], keys[x], (unsigned long long)tat);
            }
        }
        for (int w = 0; w < 2; w++) {
            redisReply *r = charge_raw(rc, w, pfx[w], pk, 8 * nv, keys, nk);

            a[w] = answer(r, &n[w], way_name[w]);
            freeReplyObject(r);
            now[w] = a[w][n[w] - 1];
        }
        cr_assert_eq(n[0], n[1]);
        for (size_t i = 0, e = 0, p = 2; i < (size_t)v[0]; i++) {
            size_t nb = (size_t)fmod(v[p], 16);

            cr_assert_eq(a[1][e], a[0][e], "input %d request %zu: module allowed=%.0f, "
                         "script %.0f", it, i, a[1][e], a[0][e]);
            allowed += a[0][e] == 1;
            denied += a[0][e] == 0;
            for (size_t b = 1; b <= nb; b++) {
                held += a[0][e + b] > 0;
                cr_assert_leq(fabs(a[1][e + b] - a[0][e + b]), fabs(now[1] - now[0]),
                              "input %d request %zu bucket %zu: debts %.0f (module) and %.0f "
                              "(script), clocks %.0f apart", it, i, b, a[1][e + b],
                              a[0][e + b], fabs(now[1] - now[0]));
            }
            e += 1 + nb;
            p += 1 + nb * (v[1] == 1 ? 2 : 1);
        }
        free(a[0]);
        free(a[1]);
        free(pk);
    }
    cr_log_info("held buckets: %d calls, %d allowed, %d denied, %d debts compared", N, allowed,
                denied, held);
    cr_assert_gt(allowed, 1000);
    cr_assert_gt(denied, 1000);
    cr_assert_gt(held, 3000);
}

/* No arguments: Redis's arity error.  `packed` and no keys: what the
 * script answers with no KEYS (requests of no buckets, the clock). */
Test(native, no_arguments_and_no_keys)
{
    static const double cases[][4] = {
        { 0, 0 }, { 1, 0, 3 * 16 }, { 2, 0, 0, 16 }, { 1, 1, 5 * 16 }, { 3, 0, 0, 0 },
        { 1, 0, 1 },                /* a bucket, no KEY: both refuse */
        { 1, 0 },                   /* a request that is not there */
        { 0 },                      /* 1 number */
    };
    static const size_t ncase[] = { 2, 3, 4, 3, 4, 3, 2, 1 };
    redisReply *r = cmd(rc, "TOLLGATE.CHARGE");

    cr_assert_eq(r->type, REDIS_REPLY_ERROR, "TOLLGATE.CHARGE with no arguments: type %d",
                 r->type);
    cr_assert(strstr(r->str, "wrong number of arguments") != NULL, "%s", r->str);
    freeReplyObject(r);
    for (size_t i = 0; i <= TG_ARRAY_LEN(cases); i++) {
        size_t nv = i < TG_ARRAY_LEN(cases) ? ncase[i] : 0;   /* last: empty */
        unsigned char *pk = pack_d(i < TG_ARRAY_LEN(cases) ? cases[i] : NULL, nv, 0);
        redisReply *rr[2];

        for (int w = 0; w < 2; w++) {
            rr[w] = charge_raw(rc, w, "", pk, 8 * nv, NULL, 0);
        }
        cr_assert_eq(rr[NATIVE]->type == REDIS_REPLY_ERROR, rr[LUA]->type == REDIS_REPLY_ERROR,
                     "case %zu: module %s, script %s", i,
                     rr[NATIVE]->type == REDIS_REPLY_ERROR ? rr[NATIVE]->str : "answers",
                     rr[LUA]->type == REDIS_REPLY_ERROR ? rr[LUA]->str : "answers");
        if (rr[LUA]->type == REDIS_REPLY_STRING) {
            size_t n[2];
            double *a[2];

            for (int w = 0; w < 2; w++) {
                a[w] = answer(rr[w], &n[w], way_name[w]);
            }
            cr_assert_eq(n[0], n[1], "case %zu", i);
            for (size_t k = 0; k + 1 < n[0]; k++) {
                cr_assert_eq(a[0][k], a[1][k], "case %zu number %zu", i, k);
            }
            cr_assert_eq(a[1][n[1] - 1] > 1e15, 1, "case %zu: the clock", i);
            free(a[0]);
            free(a[1]);
        } else {
            cr_assert(strstr(rr[NATIVE]->str, "tollgate: packed arguments") != NULL,
                      "case %zu: %s", i, rr[NATIVE]->str);
        }
        freeReplyObject(rr[0]);
        freeReplyObject(rr[1]);
        free(pk);
    }
    cr_assert_eq(cmd_int(rc, "DBSIZE"), 0, "a call with no keys wrote one");
}

/* ---- c. replication ---------------------------------------------------------- */

static long long
repl_offset(redisContext *c, const char *field)
{
    return info_num(c, "replication", field);
}

/* Native charges on the master (random batches over 60 names, other
 * types and hand-set values among them); once the replica has processed
 * all the master sent, every key has the same type, value and expiry
 * time on both. */
static void
replica_holds_the_same(int replica_module)
{
    enum { NAMES = 60, CALLS = 400 };
    tgh_upstream rep = { 0 };
    tgh_redis_opts o = { .replicaof = srv.port };
    char saved[1024];
    redisContext *rr;
    static char names[NAMES][24];
    long long want, got = -1, keys = 0;
    uint64_t end;
    redisReply *r;
    unsigned long long cursor = 0;

    /* the full sync at once, not after the 5 s that diskless sync waits
     * for more replicas */
    cmd_ok(rc, "CONFIG SET repl-diskless-sync-delay 0");
    snprintf(saved, sizeof(saved), "%s", tgh_env("TG_REDIS_MODULE"));
    if (!replica_module) {
        setenv("TG_REDIS_MODULE", "", 1);       /* the harness loads none */
    }
    TGH_CHECK(tgh_redis_start_opts(&rep, &o) == 0, "replica did not start");
    setenv("TG_REDIS_MODULE", saved, 1);
    rr = connect_to(rep.port);
    cr_assert_eq(module_loaded(rr), replica_module, "the replica %s the module",
                 replica_module ? "lacks" : "has");
    TGH_CHECK(tgh_redis_wait(rep.port, "master_link_status:up", 30000, "INFO replication"),
              "the replica's link to the master is not up");

    for (int k = 0; k < NAMES; k++) {
        snprintf(names[k], sizeof(names[k]), "rp:{%d}:t", k);
    }
    cmd_ok(rc, "RPUSH %s x", names[0]);
    cmd_ok(rc, "HSET %s f v", names[1]);
    cmd_ok(rc, "SET %s abc", names[2]);
    cmd_ok(rc, "SET %s %llu", names[3], (unsigned long long)redis_now(rc) + 30000000ull);
    cmd_ok(rc, "SET %s 0x10 PX 3600000", names[4]);
    for (int call = 0; call < CALLS; call++) {
        size_t nreq = 1 + rnd(8);
        req q[8];
        layout L;

        for (size_t i = 0; i < nreq; i++) {
            q[i] = (req){ 1 + rnd(3), (uint32_t)rnd(4), { NULL }, { { 0, 0 } }, { 0 } };
            for (size_t b = 0; b < q[i].n; b++) {
                size_t k = rnd(NAMES);

                q[i].keys[b] = names[k];
                q[i].lim[b] = (tg_gcra_limit){ 1000000 * (1 + k % 3), (uint32_t)(2 + k % 7) };
                q[i].floor[b] = rnd(10) == 0 ? rnd(5000000) : 0;
            }
        }
        layout_build(&L, q, nreq);
        r = charge_raw(rc, NATIVE, "", L.pk, L.npk, L.keys, L.nk);
        cr_assert_eq(r->type, REDIS_REPLY_STRING, "call %d: %s", call,
                     r->type == REDIS_REPLY_ERROR ? r->str : "");
        freeReplyObject(r);
        layout_free(&L);
    }
    /* the master's keys as they are now; then wait for the replica */
    want = repl_offset(rc, "master_repl_offset");
    end = tgh_now_ms() + 30000;
    while (tgh_now_ms() < end) {
        got = repl_offset(rr, "slave_repl_offset");
        if (got >= want) {
            break;
        }
        tgh_sleep_ms(10);
    }
    cr_assert_geq(got, want, "the replica processed %lld of the master's %lld bytes in 30 s",
                  got, want);
    do {
        r = cmd(rc, "SCAN %llu COUNT 100", cursor);
        cr_assert(r->type == REDIS_REPLY_ARRAY && r->elements == 2);
        cursor = strtoull(r->element[0]->str, NULL, 10);
        for (size_t i = 0; i < r->element[1]->elements; i++) {
            const char *key = r->element[1]->element[i]->str;
            char tm[32], tr[32], vm[200], vr[200];
            size_t lm, lr;
            long long em, er;

            key_state(rc, key, tm, sizeof(tm), vm, &lm);
            key_state(rr, key, tr, sizeof(tr), vr, &lr);
            em = cmd_int(rc, "PEXPIRETIME %s", key);
            er = cmd_int(rr, "PEXPIRETIME %s", key);
            cr_assert_str_eq(tr, tm, "%s: a %s on the master, a %s on the replica", key, tm, tr);
            cr_assert(lm == lr && memcmp(vm, vr, lm) == 0, "%s: \"%.*s\" on the master, "
                      "\"%.*s\" on the replica", key, (int)lm, vm, (int)lr, vr);
            cr_assert_eq(er, em, "%s expires at %lld ms on the master, %lld on the replica",
                         key, em, er);
            keys++;
        }
        freeReplyObject(r);
    } while (cursor != 0);
    cr_assert_eq(cmd_int(rr, "DBSIZE"), cmd_int(rc, "DBSIZE"));
    cr_assert_geq(keys, NAMES - 2, "only %lld keys to compare", keys);
    for (int k = 0; k < 5; k++) {
        char t[32], val[200];
        size_t l;

        key_state(rr, names[k], t, sizeof(t), val, &l);
        cr_assert_str_eq(t, "string", "%s: not replaced by the charges on the replica", names[k]);
    }
    if (replica_module) {
        /* a replica refuses a charge, the module's as the script's */
        double v[7] = { 1, 0, 17, 1, 1000000, 5, 1 };
        unsigned char *pk = pack_d(v, 7, 0);
        char *key[1] = { names[5] };

        load_script(rr);
        for (int w = 0; w < 2; w++) {
            r = charge_raw(rr, w, "", pk, 56, key, 1);
            cr_assert(r->type == REDIS_REPLY_ERROR && strncmp(r->str, "READONLY", 8) == 0,
                      "a charge by %s on a replica: %s", way_name[w],
                      r->type == REDIS_REPLY_ERROR ? r->str : "answered");
            freeReplyObject(r);
        }
        free(pk);
    }
    cr_log_info("replica %s the module: %lld keys equal, offset %lld",
                replica_module ? "with" : "without", keys, want);
    redisFree(rr);
}

Test(native, replica_with_the_module_holds_the_same_buckets)
{
    replica_holds_the_same(1);
}

Test(native, replica_without_the_module_holds_the_same_buckets)
{
    replica_holds_the_same(0);
}

/* ---- d. big calls ------------------------------------------------------------- */

/*
 * 2,000 keys and 3,000 requests in one call (about 22,000 numbers: far
 * beyond the module's stack buffer, and beyond one struct.unpack and one
 * MGET of the script): on fresh keys the same answer as the script, the
 * same TATs stored; then the same call again on the buckets it left
 * (intervals of seconds): the same decisions.
 */
Test(native, big_calls_answer_as_the_script)
{
    enum { NK = 2000, NR = 3000 };
    static req q[NR];
    static char names[NK][24];
    static tg_gcra_limit lim[NK];
    layout L;
    double *a[2][2], now[2][2];
    size_t n[2][2];
    int allowed = 0, denied = 0;

    for (int k = 0; k < NK; k++) {
        snprintf(names[k], sizeof(names[k]), "b:{%d}:t", k);
        lim[k] = (tg_gcra_limit){ 1000000 * (1 + rnd(5)), (uint32_t)(1 + rnd(4)) };
    }
    for (int i = 0; i < NR; i++) {
        q[i] = (req){ 1 + rnd(3), (uint32_t)rnd(3), { NULL }, { { 0, 0 } }, { 0 } };
        for (size_t b = 0; b < q[i].n; b++) {
            int k = i < NK && b == 0 ? i : (int)rnd(NK);

            q[i].keys[b] = names[k];
            q[i].lim[b] = lim[k];
            q[i].floor[b] = rnd(8) == 0 ? 1000000 * rnd(3) + 500000 : 0;
        }
    }
    layout_build(&L, q, NR);
    cr_assert_eq(L.nk, NK);
    cr_assert_gt(L.nv, 4 * 4000);
    for (int round = 0; round < 2; round++) {
        for (int w = 0; w < 2; w++) {
            redisReply *r = charge_raw(rc, w, w == LUA ? "bL:" : "bM:", L.pk, L.npk, L.keys, L.nk);

            a[round][w] = answer(r, &n[round][w], way_name[w]);
            freeReplyObject(r);
            cr_assert_eq(n[round][w], NR + L.nb + 1, "round %d, %s: %zu numbers", round,
                         way_name[w], n[round][w]);
            now[round][w] = a[round][w][n[round][w] - 1];
        }
    }
    /* round 0, fresh keys: every number the same */
    for (size_t i = 0; i + 1 < n[0][0]; i++) {
        cr_assert_eq(a[0][NATIVE][i], a[0][LUA][i], "number %zu of the answer: module %.0f, "
                     "script %.0f", i, a[0][NATIVE][i], a[0][LUA][i]);
    }
    /* round 1, on what round 0 left: the same decisions */
    for (size_t i = 0, e = 0; i < NR; i++) {
        cr_assert_eq(a[1][NATIVE][e], a[1][LUA][e], "second call, request %zu: module "
                     "allowed=%.0f, script %.0f", i, a[1][NATIVE][e], a[1][LUA][e]);
        allowed += a[1][LUA][e] == 1;
        denied += a[1][LUA][e] == 0;
        e += 1 + q[i].n;
    }
    /* stored: the same debt ahead of each side's last clock */
    for (int k = 0; k < NK; k++) {
        double sv[2];
        char key[64];
        int found[2];

        for (int w = 0; w < 2; w++) {
            snprintf(key, sizeof(key), "%s%.32s", w == LUA ? "bL:" : "bM:", names[k]);
            found[w] = get_num(rc, key, &sv[w]);
        }
        cr_assert_eq(found[0], found[1], "%s written by one way only", names[k]);
        if (found[0]) {
            double dl = sv[LUA] - now[1][LUA], dm = sv[NATIVE] - now[1][NATIVE];

            cr_assert_leq(fabs(dl - dm), fabs((now[1][LUA] - now[0][LUA])
                                              - (now[1][NATIVE] - now[0][NATIVE])),
                          "%s: debt %.0f (module) and %.0f (script)", names[k], dm, dl);
        }
    }
    cr_log_info("big calls: %zu numbers, %zu keys, %d requests; second call %d allowed, %d "
                "denied; module %.0f us after the script", L.nv, L.nk, NR, allowed, denied,
                now[0][NATIVE] - now[0][LUA]);
    cr_assert_gt(allowed, 100);
    cr_assert_gt(denied, 100);
    for (int i = 0; i < 2; i++) {
        free(a[i][0]);
        free(a[i][1]);
    }
    layout_free(&L);
}

/* ---- e. memory ------------------------------------------------------------------ */

/*
 * 200,000 native charges over 1,000 keys: 9,000 calls of 10 requests (the
 * module's numbers on its stack) and 110 of 1,000 (on the heap), plus
 * 2,000 refused calls of both sizes.  After the first pass over the 1,000
 * keys redis holds all it will; used_memory must not grow with the
 * calls.  A leak of 8 bytes a call (a key handle, a buffer) would add
 * 80 kB or more.
 */
Test(native, memory_does_not_grow_with_calls, .timeout = 300)
{
    enum { NK = 1000, SMALL = 10, BIG = 1000, NSMALL = 9000, NBIG = 110, PIPE = 100 };
    static char names[NK][24];
    tg_gcra_limit l = { 1000000, 1000000 };    /* always room: each charge writes */
    long long m0, m1, m2, d1, d2;
    long charges = 0;
    req q[BIG];
    layout Ls, Lb, Lbad;
    unsigned char bad_small[8 * 20];

    for (int k = 0; k < NK; k++) {
        snprintf(names[k], sizeof(names[k]), "mem:{%d}:t", k);
    }
    /* the first passes: every key, three times */
    for (int i = 0; i < NK; i++) {
        q[i] = (req){ 1, 1, { names[i] }, { l }, { 0 } };
    }
    layout_build(&Lb, q, BIG);
    m0 = info_num(rc, "memory", "used_memory");
    for (int pass = 0; pass < 3; pass++) {
        redisReply *r = charge_raw(rc, NATIVE, "", Lb.pk, Lb.npk, Lb.keys, Lb.nk);

        cr_assert_eq(r->type, REDIS_REPLY_STRING);
        freeReplyObject(r);
        charges += BIG;
    }
    cr_assert_eq(cmd_int(rc, "DBSIZE"), NK);
    /* a refused call of each size, and the small call, pipelined as below */
    memset(bad_small, 0xff, sizeof(bad_small));         /* NaN */
    {
        double bv[BIG * 2 + 2];

        for (size_t i = 0; i < TG_ARRAY_LEN(bv); i++) {
            bv[i] = 0.5;
        }
        Lbad.pk = pack_d(bv, TG_ARRAY_LEN(bv), 0);
        Lbad.npk = 8 * TG_ARRAY_LEN(bv);
    }
    for (int phase = 0; phase < 2; phase++) {
        int nsmall = phase == 0 ? 300 : NSMALL, nbig = phase == 0 ? 5 : NBIG;
        int pending = 0, errs = 0, ncalls = nsmall + nbig + (phase == 0 ? 20 : 2000);

        for (int c = 0; c < ncalls; c++) {
            int kind = c < nsmall ? 0 : c < nsmall + nbig ? 1 : 2;

            if (kind == 0) {
                for (int i = 0; i < SMALL; i++) {
                    q[i] = (req){ 1, 1, { names[(c * SMALL + i) % NK] }, { l }, { 0 } };
                }
                layout_build(&Ls, q, SMALL);
                charge_append(rc, NATIVE, "", Ls.pk, Ls.npk, Ls.keys, Ls.nk);
                layout_free(&Ls);
            } else if (kind == 1) {
                charge_append(rc, NATIVE, "", Lb.pk, Lb.npk, Lb.keys, Lb.nk);
            } else if (c % 2) {
                charge_append(rc, NATIVE, "", bad_small, sizeof(bad_small), Lb.keys, 3);
            } else {
                charge_append(rc, NATIVE, "", Lbad.pk, Lbad.npk, Lb.keys, 600);
            }
            pending++;
            if (pending == PIPE || c == ncalls - 1) {
                while (pending > 0) {
                    redisReply *r = next_reply(rc);

                    if (r->type == REDIS_REPLY_ERROR) {
                        errs++;
                    } else {
                        cr_assert_eq(r->type, REDIS_REPLY_STRING);
                    }
                    freeReplyObject(r);
                    pending--;
                }
            }
        }
        charges += (long)nsmall * SMALL + (long)nbig * BIG;
        cr_assert_eq(errs, phase == 0 ? 20 : 2000, "refused calls: %d", errs);
        if (phase == 0) {
            m1 = info_num(rc, "memory", "used_memory");
        }
    }
    m2 = info_num(rc, "memory", "used_memory");
    d1 = m1 - m0;
    d2 = m2 - m1;
    cr_assert_eq(cmd_int(rc, "DBSIZE"), NK);
    cr_assert_lt(d1 / NK, 400, "1,000 buckets took %lld bytes each", d1 / NK);
    cr_log_info("memory: %ld charges; used_memory %lld before, %lld after the first pass "
                "(+%lld: %lld bytes a key), %lld at the end (%+lld)", charges, m0, m1, d1,
                d1 / NK, m2, d2);
    cr_assert_geq(charges, 200000);
    cr_assert_lt(d2, 64 * 1024, "used_memory grew by %lld bytes over %ld charges on the same "
                 "1,000 keys (it was %lld after the first pass)", d2, charges, m1);
    layout_free(&Lb);
    free(Lbad.pk);
}

/* ---- f. out of memory ------------------------------------------------------------ */

/*
 * Over maxmemory (1 MB, noeviction), a charge is refused with Redis's OOM
 * error, the module's as the script's, a look (cost 0) too, and nothing is
 * written; TOLLGATE.PROTO still answers.  With the limit lifted the same
 * charge passes.
 */
Test(native, refused_over_maxmemory_as_the_script)
{
    double v[7] = { 1, 0, 17, 1, 1000000, 5, 1 }, look[7] = { 1, 0, 1, 1, 1000000, 5, 1 };
    unsigned char *pk = pack_d(v, 7, 0), *pl = pack_d(look, 7, 0);
    char *key[1] = { "oom:{a}:t" };
    size_t big = 512 * 1024;
    char *fill = malloc(big);

    cr_assert_not_null(fill);
    memset(fill, 'f', big);
    for (int i = 0; i < 4; i++) {
        cmd_ok(rc, "SET oom:fill:%d %b", i, fill, big);
    }
    free(fill);
    cmd_ok(rc, "CONFIG SET maxmemory-policy noeviction");
    cmd_ok(rc, "CONFIG SET maxmemory 1mb");
    cr_assert_gt(info_num(rc, "memory", "used_memory"), 1024 * 1024);
    for (int w = 0; w < 2; w++) {
        for (int l = 0; l < 2; l++) {
            redisReply *r = charge_raw(rc, w, "", l ? pl : pk, 56, key, 1);

            cr_assert(r->type == REDIS_REPLY_ERROR && strncmp(r->str, "OOM", 3) == 0,
                      "a %s by %s over maxmemory: %s", l ? "look" : "charge", way_name[w],
                      r->type == REDIS_REPLY_ERROR ? r->str : "answered");
            freeReplyObject(r);
        }
    }
    cr_assert_eq(cmd_int(rc, "EXISTS %s", key[0]), 0);
    cr_assert(module_loaded(rc), "TOLLGATE.PROTO refused over maxmemory");
    cmd_ok(rc, "CONFIG SET maxmemory 0");
    for (int w = 0; w < 2; w++) {
        redisReply *r = charge_raw(rc, w, "", pk, 56, key, 1);

        cr_assert_eq(r->type, REDIS_REPLY_STRING, "with no maxmemory, %s: %s", way_name[w],
                     r->type == REDIS_REPLY_ERROR ? r->str : "");
        freeReplyObject(r);
    }
    cr_assert_eq(cmd_int(rc, "EXISTS %s", key[0]), 1);
    free(pk);
    free(pl);
}

/*
 * Keyspace notifications: an allowed charge tells a subscriber what the
 * script's SET ... PXAT does ("set" then "expire" on the key), a denied
 * one nothing, whichever way it was charged.
 */
Test(native, keyspace_events_as_the_script)
{
    static const double v[] = { 1, 0, 17, 1, 1e6, 1, 1 };   /* burst 1 */
    unsigned char *pk = pack_d(v, 7, 0);
    redisContext *sub = connect_to(srv.port);
    char *keys[1] = { "ev" };
    redisReply *r;

    cmd_ok(rc, "CONFIG SET notify-keyspace-events KEA");
    r = cmd(sub, "SUBSCRIBE __keyevent@0__:set __keyevent@0__:expire");
    freeReplyObject(r);
    r = next_reply(sub);                 /* the second channel's confirmation */
    freeReplyObject(r);
    for (int way = LUA; way <= NATIVE; way++) {
        const char *prefix = way == NATIVE ? "ks:n:" : "ks:l:";
        char want[32];

        snprintf(want, sizeof(want), "%sev", prefix);
        for (int k = 0; k < 2; k++) {         /* allowed, then denied (burst 1) */
            r = charge_raw(rc, way, prefix, pk, 7 * 8, keys, 1);
            cr_assert_eq(r->type, REDIS_REPLY_STRING, "%s: %s", way_name[way],
                         r->type == REDIS_REPLY_ERROR ? r->str : "");
            freeReplyObject(r);
        }
        /* a marker after both charges: the events before it are theirs */
        cmd_ok(rc, "SET %smark x", prefix);
        for (int e = 0; e < 3; e++) {
            static const char *const events[] = { "set", "expire", "set" };
            char chan[48];

            r = next_reply(sub);
            cr_assert(r->type == REDIS_REPLY_ARRAY && r->elements == 3, "%s: not a message",
                      way_name[way]);
            snprintf(chan, sizeof(chan), "__keyevent@0__:%s", events[e]);
            cr_assert_str_eq(r->element[1]->str, chan, "%s: event %d is %s, the script's is %s",
                             way_name[way], e, r->element[1]->str, chan);
            if (e < 2) {
                cr_assert_str_eq(r->element[2]->str, want, "%s: event on %s", way_name[way],
                                 r->element[2]->str);
            } else {
                cr_assert(strstr(r->element[2]->str, "mark") != NULL,
                          "%s: the denied charge sent an event (%s)", way_name[way],
                          r->element[2]->str);
            }
            freeReplyObject(r);
        }
    }
    redisFree(sub);
    free(pk);
}
