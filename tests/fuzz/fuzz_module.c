/*
 * fuzz_module.c - libFuzzer target for the Redis module's TOLLGATE.CHARGE
 * (src/redis-module/tollgate_redis.c).  The module runs inside a user's
 * redis-server: a crash there takes their Redis down, and a charge that
 * lowers a bucket's TAT lets a client walk around its limit.  Built by
 * meson with -Dfuzz=true (CC=clang), run by scripts/fuzz; by hand:
 *
 *   CC=clang meson setup build-fuzz -Dfuzz=true && meson compile -C build-fuzz fuzz_module
 *   mkdir -p /tmp/corpus   # new inputs go to the first directory, never the seeds
 *   build-fuzz/tests/fuzz/fuzz_module -dict=tests/fuzz/module.dict /tmp/corpus tests/fuzz/seeds/module
 *
 * The module's own source is compiled into this program (with the
 * fuzzer's coverage, ASan and UBSan) and loaded the way Redis loads it:
 * RedisModule_OnLoad gets a context whose first member is a GetApi, here
 * answering with the entry points below, which keep keys in a small table
 * with Redis's semantics for what the module calls (RM_OpenKey gives NULL
 * for a missing key opened to read, RM_StringDMA an empty string for an
 * empty key, RM_StringTruncate fails on another type...).  The integration
 * tests run the same module in a real redis-server (integration_native);
 * this target is for the inputs no test thinks of.
 *
 * Input: byte 0 = number encoding (bit 7) and key count (bits 0-4, at most
 * FZ_MAXARGS); per key, a byte naming it among FZ_NAMES names (so the same
 * name comes twice), unless that name was already given a value: a byte
 * for what it holds (none, a string, another type) and, for a string, a
 * length byte and that many bytes; then the packed argument.  With bit 7
 * clear the rest is the packed argument as is (8-byte little-endian
 * doubles, any bits); with it set, numbers written small (fz_number), so
 * that valid layouts are common and the decisions themselves get explored.
 *
 * Checked on every input, besides the sanitizers:
 * - an error answer changes nothing: no key, no expiry, no SET replicated,
 *   no event;
 * - a packed answer has the length the layout gives (a number per request
 *   and per bucket of it, and the clock), each request's verdict is 0 or
 *   1, each "held" is >= 0, and the last number is the clock of the call;
 * - every key the module changed holds its TAT in decimal digits, expires
 *   at ceil(TAT / 1000) ms, was replicated as that SET ... PXAT (the last
 *   one for the key), announced (set, expire), and is not below the TAT it
 *   held (a charge never gives tokens back); a key not replicated is
 *   untouched.
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "../../src/redis-module/tollgate_redis.c"

#define FZ_MAXARGS   31          /* keys of one call */
#define FZ_NAMES     6           /* distinct key names */
#define FZ_MAXREP    (FZ_MAXARGS * 2)

/* ---- the fake Redis ---------------------------------------------------- */

struct RedisModuleString {
    const char *p;
    size_t      len;
};

enum { FZ_NONE, FZ_STRING, FZ_OTHER };

typedef struct fz_val {
    int        type;
    char      *s;                /* FZ_STRING: len bytes (+ a NUL of ours) */
    size_t     len;
    long long  expire_ms;        /* -1: none */
} fz_val;

struct RedisModuleKey {
    fz_val *v;
    int     mode;
};

typedef struct fz_set {          /* a replicated SET name v PXAT ms */
    int       name;
    char      v[32];
    size_t    vlen;
    long long ms;
} fz_set;

static struct {
    void          *getapi;       /* first member: what rm_init reads */
    fz_val         keys[FZ_NAMES];
    char           names[FZ_NAMES][4];
    rm_cmd_fn      charge;
    int            replied;      /* 0 none, 1 error, 2 buffer, 3 long long */
    unsigned char *reply;
    size_t         reply_len;
    fz_set         sets[FZ_MAXREP];
    size_t         nsets;
    size_t         nevents;
    int            open_keys;
} fz;

static int
fz_name_of(const RedisModuleString *s)
{
    for (int i = 0; i < FZ_NAMES; i++) {
        if (s->len == strlen(fz.names[i]) && memcmp(s->p, fz.names[i], s->len) == 0) {
            return i;
        }
    }
    abort();                     /* the module named a key it was not given */
}

static void *
fz_alloc(size_t n)
{
    void *p = malloc(n != 0 ? n : 1);

    if (p == NULL) {
        abort();
    }
    return p;
}

static void fz_free(void *p) { free(p); }

static int
fz_create_command(RedisModuleCtx *ctx, const char *name, rm_cmd_fn fn,
                  const char *flags, int firstkey, int lastkey, int keystep)
{
    (void)ctx; (void)flags; (void)firstkey; (void)lastkey; (void)keystep;
    if (strcmp(name, "tollgate.charge") == 0) {
        fz.charge = fn;
    }
    return RM_OK;
}

static void
fz_set_attribs(RedisModuleCtx *ctx, const char *name, int ver, int apiver)
{
    (void)ctx; (void)name; (void)ver; (void)apiver;
}

static int fz_name_busy(const char *name) { (void)name; return 0; }

static int
fz_wrong_arity(RedisModuleCtx *ctx)
{
    (void)ctx;
    fz.replied = 1;
    return RM_OK;
}

static int
fz_reply_error(RedisModuleCtx *ctx, const char *err)
{
    (void)ctx;
    if (fz.replied || strncmp(err, "ERR ", 4) != 0) {
        abort();
    }
    fz.replied = 1;
    return RM_OK;
}

static int
fz_reply_ll(RedisModuleCtx *ctx, long long v)
{
    (void)ctx; (void)v;
    fz.replied = 3;
    return RM_OK;
}

static int
fz_reply_buf(RedisModuleCtx *ctx, const char *buf, size_t len)
{
    (void)ctx;
    if (fz.replied) {
        abort();
    }
    fz.replied = 2;
    fz.reply = fz_alloc(len);
    memcpy(fz.reply, buf, len);
    fz.reply_len = len;
    return RM_OK;
}

static const char *
fz_ptr_len(const RedisModuleString *s, size_t *len)
{
    *len = s->len;
    return s->p;
}

static RedisModuleKey *
fz_open_key(RedisModuleCtx *ctx, RedisModuleString *name, int mode)
{
    fz_val *v = &fz.keys[fz_name_of(name)];
    RedisModuleKey *k;

    (void)ctx;
    if (v->type == FZ_NONE && !(mode & RM_WRITE)) {
        return NULL;             /* as Redis: a missing key opened to read */
    }
    k = fz_alloc(sizeof(*k));
    k->v = v;
    k->mode = mode;
    fz.open_keys++;
    return k;
}

static void
fz_close_key(RedisModuleKey *k)
{
    if (k != NULL) {
        fz.open_keys--;
        free(k);
    }
}

static int
fz_key_type(RedisModuleKey *k)
{
    return k->v->type == FZ_NONE ? RM_KEYTYPE_EMPTY
         : k->v->type == FZ_STRING ? RM_KEYTYPE_STRING : 2 /* a list */;
}

static void
fz_val_clear(fz_val *v)
{
    free(v->s);
    v->s = NULL;
    v->len = 0;
    v->type = FZ_NONE;
    v->expire_ms = -1;
}

static int
fz_delete_key(RedisModuleKey *k)
{
    if (!(k->mode & RM_WRITE)) {
        return RM_ERR;
    }
    fz_val_clear(k->v);
    return RM_OK;
}

static char *
fz_dma(RedisModuleKey *k, size_t *len, int mode)
{
    static char empty[1];

    if (k->v->type == FZ_NONE) {
        *len = 0;
        return empty;            /* as Redis for an empty key */
    }
    if (k->v->type != FZ_STRING || ((mode & RM_WRITE) && !(k->mode & RM_WRITE))) {
        return NULL;
    }
    *len = k->v->len;
    return k->v->s;
}

static int
fz_truncate(RedisModuleKey *k, size_t newlen)
{
    fz_val *v = k->v;

    if (!(k->mode & RM_WRITE) || v->type == FZ_OTHER || newlen > 512u << 20) {
        return RM_ERR;
    }
    if (v->type == FZ_NONE && newlen == 0) {
        return RM_OK;
    }
    v->s = realloc(v->s, newlen + 1);
    if (v->s == NULL) {
        abort();
    }
    if (newlen > v->len || v->type == FZ_NONE) {
        size_t from = v->type == FZ_NONE ? 0 : v->len;
        memset(v->s + from, 0, newlen + 1 - from);
    }
    v->s[newlen] = '\0';
    v->len = newlen;
    v->type = FZ_STRING;
    return RM_OK;
}

static int
fz_set_abs_expire(RedisModuleKey *k, rm_mstime_t when)
{
    if (!(k->mode & RM_WRITE) || k->v->type == FZ_NONE || when < 0) {
        return RM_ERR;
    }
    k->v->expire_ms = when;
    return RM_OK;
}

static int
fz_replicate(RedisModuleCtx *ctx, const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fz_set *s;
    const char *b, *c;

    (void)ctx;
    if (strcmp(cmd, "SET") != 0 || strcmp(fmt, "sbcl") != 0 || fz.nsets == FZ_MAXREP) {
        abort();
    }
    s = &fz.sets[fz.nsets++];
    va_start(ap, fmt);
    s->name = fz_name_of(va_arg(ap, RedisModuleString *));
    b = va_arg(ap, const char *);
    s->vlen = va_arg(ap, size_t);
    c = va_arg(ap, const char *);
    s->ms = va_arg(ap, long long);
    va_end(ap);
    if (s->vlen == 0 || s->vlen >= sizeof(s->v) || strcmp(c, "PXAT") != 0) {
        abort();
    }
    memcpy(s->v, b, s->vlen);
    s->v[s->vlen] = '\0';
    return RM_OK;
}

static int
fz_notify(RedisModuleCtx *ctx, int type, const char *event, RedisModuleString *key)
{
    (void)ctx;
    fz_name_of(key);
    if (!((type == RM_NOTIFY_STRING && strcmp(event, "set") == 0)
          || (type == RM_NOTIFY_GENERIC && strcmp(event, "expire") == 0))) {
        abort();
    }
    fz.nevents++;
    return RM_OK;
}

static int
fz_getapi(const char *name, void *out)
{
    static const struct { const char *name; void *fn; } api[] = {
        { "RedisModule_Alloc", (void *)fz_alloc },
        { "RedisModule_Free", (void *)fz_free },
        { "RedisModule_CreateCommand", (void *)fz_create_command },
        { "RedisModule_SetModuleAttribs", (void *)fz_set_attribs },
        { "RedisModule_IsModuleNameBusy", (void *)fz_name_busy },
        { "RedisModule_WrongArity", (void *)fz_wrong_arity },
        { "RedisModule_ReplyWithError", (void *)fz_reply_error },
        { "RedisModule_ReplyWithLongLong", (void *)fz_reply_ll },
        { "RedisModule_ReplyWithStringBuffer", (void *)fz_reply_buf },
        { "RedisModule_StringPtrLen", (void *)fz_ptr_len },
        { "RedisModule_OpenKey", (void *)fz_open_key },
        { "RedisModule_CloseKey", (void *)fz_close_key },
        { "RedisModule_KeyType", (void *)fz_key_type },
        { "RedisModule_DeleteKey", (void *)fz_delete_key },
        { "RedisModule_StringDMA", (void *)fz_dma },
        { "RedisModule_StringTruncate", (void *)fz_truncate },
        { "RedisModule_SetAbsExpire", (void *)fz_set_abs_expire },
        { "RedisModule_Replicate", (void *)fz_replicate },
        { "RedisModule_NotifyKeyspaceEvent", (void *)fz_notify },
    };

    for (size_t i = 0; i < sizeof(api) / sizeof(api[0]); i++) {
        if (strcmp(api[i].name, name) == 0) {
            memcpy(out, &api[i].fn, sizeof(void *));
            return RM_OK;
        }
    }
    return RM_ERR;               /* the module asked for one we lack */
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc; (void)argv;
    fz.getapi = (void *)fz_getapi;
    for (int i = 0; i < FZ_NAMES; i++) {
        snprintf(fz.names[i], sizeof(fz.names[i]), "k%d", i);
        fz.keys[i].expire_ms = -1;
    }
    if (RedisModule_OnLoad((RedisModuleCtx *)&fz, NULL, 0) != RM_OK || fz.charge == NULL) {
        abort();
    }
    return 0;
}

/* ---- the input --------------------------------------------------------- */

typedef struct fz_in {
    const uint8_t *p;
    size_t         n;
} fz_in;

static int
fz_byte(fz_in *in, uint8_t *b)
{
    if (in->n == 0) {
        return 0;
    }
    *b = *in->p++;
    in->n--;
    return 1;
}

/* A number written small: a byte below 250 is itself; 250, 251, 252 are
 * followed by 2, 4, 8 bytes of an unsigned little-endian integer; 253 by
 * the 8 bytes of a double (any bits: fractions, negatives, nan). */
static int
fz_number(fz_in *in, double *d)
{
    uint8_t t, b;
    uint64_t u = 0;
    size_t w;

    if (!fz_byte(in, &t)) {
        return 0;
    }
    if (t < 250) {
        *d = t;
        return 1;
    }
    w = t == 250 ? 2 : t == 251 ? 4 : 8;
    for (size_t i = 0; i < w; i++) {
        if (!fz_byte(in, &b)) {
            return 0;
        }
        u |= (uint64_t)b << (8 * i);
    }
    if (t == 253) {
        memcpy(d, &u, sizeof(*d));
    } else {
        *d = (double)u;
    }
    return 1;
}

/* The TAT a value holds, when it is one the checks can compare: plain
 * decimal digits (what the module writes, at most 9e18); -1 otherwise. */
static double
fz_plain_tat(const fz_val *v)
{
    uint64_t t = 0;

    if (v->type != FZ_STRING || v->len == 0 || v->len > 19) {
        return -1;
    }
    for (size_t i = 0; i < v->len; i++) {
        if (v->s[i] < '0' || v->s[i] > '9') {
            return -1;
        }
        t = t * 10 + (uint64_t)(v->s[i] - '0');
    }
    return (double)t;
}

static int
fz_val_eq(const fz_val *a, const fz_val *b)
{
    return a->type == b->type && a->expire_ms == b->expire_ms && a->len == b->len
           && (a->len == 0 || memcmp(a->s, b->s, a->len) == 0);
}

/* The answer's length by the layout, or 0 when the layout is not one the
 * module must accept (then it may answer either way; the other checks
 * still hold).  Mirrors the rules of check_layout from the outside. */
static size_t
fz_answer_len(const double *A, size_t n, size_t nk, size_t *nreq)
{
    size_t pk, a = 3, m = 0;
    double nr, fl;

    if (n < 2 + 3 * nk) {
        return 0;
    }
    pk = n - 3 * nk;
    for (size_t i = 1; i <= n; i++) {
        if (!(A[i] >= 0 && A[i] <= TG_MAX_TAT && A[i] == floor(A[i]))) {
            return 0;
        }
    }
    nr = A[1];
    fl = A[2];
    if (nr > (double)n || (fl != 0 && fl != 1)) {
        return 0;
    }
    for (size_t r = 0; r < (size_t)nr; r++) {
        size_t nb, step = fl == 1 ? 2 : 1;

        if (a > pk) {
            return 0;
        }
        nb = (size_t)fmod(A[a++], 16);
        if (a + nb * step > pk + 1) {
            return 0;
        }
        for (size_t i = 0; i < nb; i++, a += step) {
            if (A[a] < 1 || A[a] > (double)nk) {
                return 0;
            }
        }
        m += 1 + nb;
    }
    for (size_t x = 1; x <= nk; x++) {
        if (A[pk + 3 * x] < 1 || A[pk + 3 * x] > (double)x) {
            return 0;
        }
    }
    *nreq = (size_t)nr;
    return m + 1;
}

static void
fz_check_answer(const double *A, size_t want, size_t nreq, double t0, double t1)
{
    size_t o = 0, a = 3;
    double now;

    if (want == 0) {
        abort();                 /* the module took a layout it must refuse */
    }
    if (fz.reply_len != 8 * want) {
        abort();
    }
    for (size_t r = 0; r < nreq; r++) {
        size_t nb = (size_t)fmod(A[a], 16);
        double ok = get_le_double(fz.reply + 8 * o);

        if (ok != 0 && ok != 1) {
            abort();
        }
        for (size_t i = 1; i <= nb; i++) {
            double held = get_le_double(fz.reply + 8 * (o + i));
            if (!(held >= 0)) {
                abort();
            }
        }
        o += 1 + nb;
        a += 1 + nb * (A[2] == 1 ? 2 : 1);
    }
    now = get_le_double(fz.reply + 8 * o);
    if (!(now >= t0 && now <= t1)) {
        abort();
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = { data, size };
    RedisModuleString args[FZ_MAXARGS + 2], *argv[FZ_MAXARGS + 2];
    fz_val before[FZ_NAMES];
    uint8_t b0, b;
    int given[FZ_NAMES] = { 0 }, nk, small;
    unsigned char *packed = NULL;
    size_t plen = 0, cap = 0;
    double *A, t0, t1;
    size_t n, want, nreq = 0;

    if (!fz_byte(&in, &b0)) {
        return 0;
    }
    small = b0 >> 7;
    nk = b0 & 0x1f;
    if (nk > FZ_MAXARGS) {
        nk = FZ_MAXARGS;
    }
    for (int i = 0; i < FZ_NAMES; i++) {
        fz_val_clear(&fz.keys[i]);
    }
    for (int x = 0; x < nk; x++) {
        uint8_t kind, len;
        int id;

        if (!fz_byte(&in, &b)) {
            return 0;
        }
        id = b % FZ_NAMES;
        args[2 + x].p = fz.names[id];
        args[2 + x].len = strlen(fz.names[id]);
        if (given[id]++) {
            continue;
        }
        if (!fz_byte(&in, &kind)) {
            return 0;
        }
        if (kind % 3 == FZ_OTHER) {
            fz.keys[id].type = FZ_OTHER;
        } else if (kind % 3 == FZ_STRING) {
            if (!fz_byte(&in, &len) || in.n < len) {
                return 0;
            }
            fz.keys[id].type = FZ_STRING;
            fz.keys[id].s = fz_alloc((size_t)len + 1);
            memcpy(fz.keys[id].s, in.p, len);
            fz.keys[id].s[len] = '\0';
            fz.keys[id].len = len;
            in.p += len;
            in.n -= len;
        }
        if (kind >= 128 && fz.keys[id].type != FZ_NONE) {
            fz.keys[id].expire_ms = (long long)kind * 1000;
        }
    }
    if (small) {
        double d;
        while (fz_number(&in, &d)) {
            if (plen + 8 > cap) {
                cap = cap ? 2 * cap : 256;
                packed = realloc(packed, cap);
                if (packed == NULL) {
                    abort();
                }
            }
            put_le_double(packed + plen, d);
            plen += 8;
        }
    } else {
        packed = fz_alloc(in.n);
        memcpy(packed, in.p, in.n);
        plen = in.n;
    }

    args[1].p = (const char *)packed;
    args[1].len = plen;
    args[0].p = "tollgate.charge";
    args[0].len = strlen(args[0].p);
    for (int i = 0; i < nk + 2; i++) {
        argv[i] = &args[i];
    }
    for (int i = 0; i < FZ_NAMES; i++) {
        before[i] = fz.keys[i];
        if (fz.keys[i].s != NULL) {
            before[i].s = fz_alloc(fz.keys[i].len + 1);
            memcpy(before[i].s, fz.keys[i].s, fz.keys[i].len + 1);
        }
    }
    fz.replied = 0;
    fz.reply = NULL;
    fz.reply_len = 0;
    fz.nsets = 0;
    fz.nevents = 0;

    {
        struct timeval tv;
        gettimeofday(&tv, NULL);
        t0 = (double)tv.tv_sec * 1e6 + (double)tv.tv_usec;
        fz.charge((RedisModuleCtx *)&fz, argv, nk + 2);
        gettimeofday(&tv, NULL);
        t1 = (double)tv.tv_sec * 1e6 + (double)tv.tv_usec;
    }
    if (fz.open_keys != 0) {
        abort();                 /* a key handle left open */
    }

    /* the layout as the checks read it: the answer's length, 0 if none */
    n = plen / 8;
    A = fz_alloc((n + 1) * sizeof(*A));
    for (size_t i = 0; i < n; i++) {
        A[i + 1] = get_le_double(packed + 8 * i);
    }
    want = plen % 8 == 0 ? fz_answer_len(A, n, (size_t)nk, &nreq) : 0;

    if (fz.replied == 1) {
        /* refused: a layout that is not one, and nothing written,
         * replicated or announced */
        if (want != 0) {
            abort();             /* a valid layout refused */
        }
        if (fz.nsets != 0 || fz.nevents != 0) {
            abort();
        }
        for (int i = 0; i < FZ_NAMES; i++) {
            if (!fz_val_eq(&before[i], &fz.keys[i])) {
                abort();
            }
        }
    } else if (fz.replied == 2) {
        fz_check_answer(A, want, nreq, t0, t1);
        if (fz.nevents != 2 * fz.nsets) {
            abort();
        }
        for (int i = 0; i < FZ_NAMES; i++) {
            const fz_set *last = NULL;
            double tat, old;

            for (size_t s = 0; s < fz.nsets; s++) {
                if (fz.sets[s].name == i) {
                    last = &fz.sets[s];
                }
            }
            if (last == NULL) {
                if (!fz_val_eq(&before[i], &fz.keys[i])) {
                    abort();     /* changed without telling replicas */
                }
                continue;
            }
            tat = fz_plain_tat(&fz.keys[i]);
            if (tat < 0 || fz.keys[i].len != last->vlen
                || memcmp(fz.keys[i].s, last->v, last->vlen) != 0
                || fz.keys[i].expire_ms != last->ms
                || last->ms != (long long)ceil(tat / 1000.0)) {
                abort();
            }
            old = fz_plain_tat(&before[i]);
            if (old >= 0 && old <= TG_MAX_TAT && tat < old) {
                abort();         /* a charge lowered a bucket's TAT */
            }
        }
    } else {
        abort();                 /* no answer, or the wrong kind */
    }

    free(A);
    free(fz.reply);
    for (int i = 0; i < FZ_NAMES; i++) {
        free(before[i].s);
    }
    free(packed);
    return 0;
}
