/*
 * tollgate_redis.c - tollgate's bucket charge as a native Redis command,
 * for a redis-server that loads it (`loadmodule /usr/lib/.../tollgate-redis.so`).
 *
 *     TOLLGATE.CHARGE packed key...    the charge script (src/gcra.c,
 *                                      tg_gcra_lua), same arguments, same
 *                                      answer, same writes
 *     TOLLGATE.PROTO                   TG_GCRA_NATIVE_PROTO: which layout of
 *                                      `packed` this module speaks
 *
 * tollgate asks every Redis it connects to for TOLLGATE.PROTO and sends its
 * charges as TOLLGATE.CHARGE where the answer is its own protocol number,
 * as EVALSHA of the script everywhere else: the module is an accelerator,
 * never a requirement (redis.native, docs/CONFIG.md).
 *
 * Why: in exact mode Redis's CPU per charge bounds how many requests all
 * instances together can admit, and the script spends most of it in Lua
 * (docs/PERFORMANCE.md, "Exact mode: where a charge's Redis CPU goes").
 * Here the same decisions cost a key lookup, a strtod, a few additions and,
 * for a bucket that changed, its digits written in place and its expiry.
 *
 * The arithmetic is the script's, in doubles (Lua's numbers), step for step
 * (keep the two in step: integration_native compares them on random
 * batches); -ffp-contract=off keeps every product rounded as Lua rounds it.
 * The clock is gettimeofday, what the script's TIME reads.  A changed bucket
 * is written as the script writes it (its TAT in decimal, expiring at
 * ceil(TAT / 1000) ms) and replicated as that SET ... PXAT, so replicas and
 * the AOF see the same commands as from the script.
 *
 * Unlike the script, which fails on the first number it cannot use, every
 * index and count in `packed` is checked before anything is read or
 * written: malformed arguments get "ERR tollgate: packed arguments" and
 * change nothing.
 */
#include <ctype.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "rm_api.h"
#include "tollgate/gcra.h"

#define TG_MAX_TAT        9007199254740991.0   /* 2^53 - 1 */
#define TG_MAX_NB         15          /* nbuckets is h % 16 */
#define TG_STACK_NUMS     512         /* numbers of a call kept on the stack */
#define TG_ERR_ARGS       "ERR tollgate: packed arguments"

/* One call's state: A is the script's table of numbers, 1-based. */
typedef struct tgm_call {
    double  *A;
    size_t   n;             /* numbers in A */
    size_t   nk;            /* keys */
    size_t   pk;            /* A[pk + 3x - 2 .. pk + 3x]: key x's T, burst, alias */
    char    *written;       /* per key (1-based): an allowed charge changed it */
} tgm_call;

static double
now_us(void)
{
    struct timeval tv;

    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec * 1000000.0 + (double)tv.tv_usec;
}

static double
get_le_double(const unsigned char *p)
{
    uint64_t b = 0;
    double d;

    for (int i = 7; i >= 0; i--) {
        b = b << 8 | p[i];
    }
    memcpy(&d, &b, sizeof(d));
    return d;
}

static void
put_le_double(unsigned char *p, double d)
{
    uint64_t b;

    memcpy(&b, &d, sizeof(b));
    for (int i = 0; i < 8; i++) {
        p[i] = (unsigned char)(b >> (8 * i));
    }
}

/* d is a whole number in [lo, hi]. */
static int
whole_in(double d, double lo, double hi)
{
    return d >= lo && d <= hi && d == floor(d);
}

/*
 * The TAT stored at key, as the script reads an MGET answer with tonumber:
 * a string holding a decimal (or 0x hex) number, blanks around it allowed;
 * anything else (no key, another type, not a number, nan, inf, negative,
 * beyond 2^53 - 1) is no bucket: 0.
 */
static double
stored_tat(RedisModuleCtx *ctx, RedisModuleString *name)
{
    RedisModuleKey *key = RM_OpenKey(ctx, name, RM_READ);
    const char *p;
    char sbuf[64], *buf = sbuf, *end;
    size_t len;
    double v = 0;

    if (key == NULL) {
        return 0;
    }
    if (RM_KeyType(key) == RM_KEYTYPE_STRING
        && (p = RM_StringDMA(key, &len, RM_READ)) != NULL && len > 0) {
        if (len >= sizeof(sbuf)) {
            buf = RM_Alloc(len + 1);    /* as long as it is: tonumber reads it whole */
        }
        memcpy(buf, p, len);
        buf[len] = '\0';
        v = strtod(buf, &end);
        if (end == buf) {
            v = 0;
        } else {
            if (*end == 'x' || *end == 'X') {
                v = (double)strtoul(buf, &end, 16);
            }
            while (isspace((unsigned char)*end)) {
                end++;
            }
            if (*end != '\0' || !(v >= 0 && v <= TG_MAX_TAT)) {
                v = 0;
            }
        }
        if (buf != sbuf) {
            RM_Free(buf);
        }
    }
    RM_CloseKey(key);
    return floor(v);
}

/* Write v's digits (v a whole number >= 0 below 2^63) into buf. */
static size_t
u64_digits(char *buf, uint64_t v)
{
    char tmp[24];
    size_t n = 0, i = 0;

    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    while (n > 0) {
        buf[i++] = tmp[--n];
    }
    return i;
}

/* SET name <v> PXAT ceil(v / 1000), in place where the key already holds a
 * plain string, and the same SET to replicas and the AOF. */
static void
write_tat(RedisModuleCtx *ctx, RedisModuleString *name, double v)
{
    RedisModuleKey *key = RM_OpenKey(ctx, name, RM_READ | RM_WRITE);
    char digits[24];
    long long ms;
    size_t len, dlen;
    char *p;

    if (key == NULL) {
        return;
    }
    if (v > 9e18) {
        v = 9e18;           /* only from absurd limits; past 2^63 the script fails */
    }
    ms = (long long)ceil(v / 1000.0);
    len = u64_digits(digits, (uint64_t)v);
    if (RM_StringTruncate(key, len) != RM_OK) {
        RM_DeleteKey(key);              /* another type: the script's SET replaces it */
        RM_StringTruncate(key, len);
    }
    p = RM_StringDMA(key, &dlen, RM_WRITE);
    if (p == NULL || dlen != len) {
        RM_CloseKey(key);               /* not written: nothing to tell anyone */
        return;
    }
    memcpy(p, digits, len);
    RM_SetAbsExpire(key, ms);
    RM_CloseKey(key);
    RM_Replicate(ctx, "SET", "sbcl", name, digits, len, "PXAT", ms);
    RM_NotifyKeyspaceEvent(ctx, RM_NOTIFY_STRING, "set", name);      /* as SET's */
    RM_NotifyKeyspaceEvent(ctx, RM_NOTIFY_GENERIC, "expire", name);
}

/*
 * The layout, all checked before any key is read (the script's steps, with
 * the checks the script leaves to Lua's nil errors): A[1] requests, A[2]
 * floors (0 or 1), then per request cost*16 + nb and nb bucket indexes (each
 * followed by its floor when A[2] is 1), then the key triples, which the
 * requests must not run into.
 */
static int
check_layout(const tgm_call *c)
{
    double nr = c->A[1], fl = c->A[2];
    size_t a = 3;

    for (size_t i = 1; i <= c->n; i++) {
        if (!whole_in(c->A[i], 0, TG_MAX_TAT)) {   /* what tollgate sends */
            return 0;
        }
    }
    if (nr > (double)c->n || (fl != 0 && fl != 1)) {
        return 0;
    }
    for (size_t r = 1; r <= (size_t)nr; r++) {
        double h;
        size_t nb;

        if (a > c->pk) {
            return 0;
        }
        h = c->A[a++];
        nb = (size_t)fmod(h, 16);
        if (a + nb * (fl == 1 ? 2 : 1) > c->pk + 1) {
            return 0;
        }
        for (size_t i = 0; i < nb; i++) {
            if (!whole_in(c->A[a], 1, (double)c->nk)) {
                return 0;
            }
            a += fl == 1 ? 2 : 1;
        }
    }
    for (size_t x = 1; x <= c->nk; x++) {
        if (c->A[c->pk + 3 * x] < 1 || c->A[c->pk + 3 * x] > (double)x) {
            return 0;                   /* alias: the key itself or an earlier one */
        }
    }
    return 1;
}

/* The script's decisions on A (see tg_gcra_lua), answers packed over A's
 * first numbers; returns how many numbers the answer has. */
static size_t
decide(tgm_call *c, double now)
{
    double *A = c->A;
    size_t a = 3, o = 0, kx[TG_MAX_NB + 1], nr = (size_t)A[1];
    int fl = A[2] == 1;

    /* A[1] and A[2] are the first numbers the answers overwrite */
    for (size_t r = 1; r <= nr; r++) {
        double h = A[a], nb = fmod(h, 16), cost = (h - nb) / 16;
        int ok = 1;

        a++;
        for (size_t i = 1; i <= (size_t)nb; i++) {
            size_t k = c->pk + 3 * (size_t)A[a];
            double t = A[k], held, per;

            if (t < 0) {
                t = A[(size_t)-t];
            }
            held = t - now;
            a++;
            if (fl) {
                double f = A[a];

                a++;
                if (held < f) {
                    held = f;
                }
            }
            if (held < 0) {
                held = 0;
            }
            per = A[k - 2];
            if (held + cost * per > A[k - 1] * per) {
                ok = 0;
            }
            kx[i] = k;
            A[o + 1 + i] = held;
        }
        if (ok && cost > 0) {
            for (size_t i = 1; i <= (size_t)nb; i++) {
                size_t k = kx[i], w = k;

                if (A[k] < 0) {
                    w = (size_t)-A[k];
                }
                A[w] = now + A[o + 1 + i] + cost * A[k - 2];
                c->written[(w - c->pk) / 3] = 1;
            }
        }
        A[o + 1] = ok;
        o += 1 + (size_t)nb;
    }
    A[o + 1] = now;
    return o + 1;
}

/* TOLLGATE.CHARGE packed key... */
static int
charge_cmd(RedisModuleCtx *ctx, RedisModuleString **argv, int argc)
{
    double stack_nums[TG_STACK_NUMS + 1];
    char stack_written[TG_STACK_NUMS / 3 + 2];
    const unsigned char *s;
    unsigned char *out;
    tgm_call c;
    size_t slen, m;
    double now;
    int rc;

    if (argc < 2) {
        return RM_WrongArity(ctx);
    }
    s = (const unsigned char *)RM_StringPtrLen(argv[1], &slen);
    c.nk = (size_t)argc - 2;
    c.n = slen / 8;
    if (slen % 8 != 0 || c.n < 2 + 3 * c.nk) {
        return RM_ReplyWithError(ctx, TG_ERR_ARGS);
    }
    c.pk = c.n - 3 * c.nk;
    if (c.n <= TG_STACK_NUMS) {
        c.A = stack_nums;
        c.written = stack_written;
    } else {
        c.A = RM_Alloc((c.n + 1) * sizeof(*c.A));
        c.written = RM_Alloc(c.nk + 1);
    }
    for (size_t i = 0; i < c.n; i++) {
        c.A[i + 1] = get_le_double(s + 8 * i);
    }
    if (!check_layout(&c)) {
        rc = RM_ReplyWithError(ctx, TG_ERR_ARGS);
        goto done;
    }

    /* The clock after the arguments, as the script's TIME is the first
     * thing it does: either way before any key is read. */
    now = now_us();
    memset(c.written, 0, c.nk + 1);
    for (size_t x = 1; x <= c.nk; x++) {
        size_t k = c.pk + 3 * x, y = (size_t)c.A[k];

        if (y == x) {
            c.A[k] = stored_tat(ctx, argv[1 + x]);
        } else {
            double r = c.A[c.pk + 3 * y];       /* the alias's, already read */

            c.A[k] = r < 0 ? r : -(double)(c.pk + 3 * y);
        }
    }
    m = decide(&c, now);
    for (size_t x = 1; x <= c.nk; x++) {
        if (c.written[x]) {
            write_tat(ctx, argv[1 + x], c.A[c.pk + 3 * x]);
        }
    }

    /* The answer over the packed arguments' own bytes is not allowed (they
     * are Redis's); m <= n numbers, so A's storage takes them. */
    out = (unsigned char *)c.A;
    for (size_t i = 0; i < m; i++) {
        put_le_double(out + 8 * i, c.A[i + 1]);
    }
    rc = RM_ReplyWithStringBuffer(ctx, (const char *)out, 8 * m);

done:
    if (c.A != stack_nums) {
        RM_Free(c.A);
        RM_Free(c.written);
    }
    return rc;
}

/* TOLLGATE.PROTO */
static int
proto_cmd(RedisModuleCtx *ctx, RedisModuleString **argv, int argc)
{
    (void)argv;
    if (argc != 1) {
        return RM_WrongArity(ctx);
    }
    return RM_ReplyWithLongLong(ctx, TG_GCRA_NATIVE_PROTO);
}

__attribute__((visibility("default"))) int
RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc)
{
    (void)argv;
    (void)argc;
    if (rm_init(ctx, "tollgate", TG_GCRA_NATIVE_PROTO) != RM_OK) {
        return RM_ERR;
    }
    /* Keys from the second argument to the last: Cluster routes on them
     * (tollgate sends one slot per call); write, and refused when Redis is
     * out of memory, as the script (a script that may write) is. */
    if (RM_CreateCommand(ctx, "tollgate.charge", charge_cmd, "write deny-oom",
                         2, -1, 1) != RM_OK
        || RM_CreateCommand(ctx, "tollgate.proto", proto_cmd, "readonly fast",
                            0, 0, 0) != RM_OK) {
        return RM_ERR;
    }
    return RM_OK;
}
