/*
 * redis.c - one async hiredis connection per worker, charges batched into
 * one EVALSHA of the GCRA script per loop turn, our own deadlines.
 *
 * Life of a charge:
 *
 *   tg_redis_charge   the op (keys copied) is appended to r->pending and
 *                     the flush event is activated (no fd), so the flush
 *                     runs after every callback of the current loop turn;
 *   flush_cb          not ready: every pending op gets TG_ERR right there
 *                     (fail fast); ready: ops are cut into batches of up to
 *                     max_batch, each sent as one EVALSHA with its timer;
 *   batch_reply_cb    hiredis calls it exactly once per sent command: with
 *                     the reply, or NULL when the context goes away.  The
 *                     batch lives until then, even after its deadline (the
 *                     late reply is then ignored), and is freed there.
 *   batch_timeout_cb  deadline: every op gets TG_ERR; three deadlines in a
 *                     row drop the connection (a stuck TCP connection would
 *                     otherwise eat every deadline).
 *
 * NOSCRIPT: the same batch is sent again as EVAL <script> (which caches the
 * script) inside the reply callback, under the batch's original deadline.
 *
 * Rules for callers (the header's, plus):
 *   - a callback may queue new ops and cancel ops not yet answered; it
 *     must not call tg_redis_destroy (that aborts when detected);
 *   - tg_redis_destroy calls no callback: ops still queued or in flight
 *     are dropped silently, so finish or cancel them first;
 *   - "ready" means connected and, for db != 0, SELECTed; until then (and
 *     while reconnecting) charges fail fast on the next loop turn;
 *   - stats.errors counts charges only (not HGET); stats.reconnects counts
 *     reconnect attempts (timer firings), successful or not.
 *
 * Context ownership (hiredis 0.14 async.c): after a failed connect callback
 * or after the disconnect callback, hiredis frees the context itself; we
 * only ever free it with redisAsyncFree from our own timers and deferred
 * events (never from inside a hiredis callback), and in tg_redis_destroy.
 */
#include "tollgate/redis.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libevent.h>
#include <openssl/sha.h>

#define TG_REDIS_BACKOFF_MIN_MS    100
#define TG_REDIS_BACKOFF_MAX_MS    5000
#define TG_REDIS_CONNECT_MIN_MS    1000     /* connect + SELECT deadline floor */
#define TG_REDIS_MAX_CONSEC_TMO    3        /* deadlines in a row: reconnect */
#define TG_REDIS_DEFAULT_TIMEOUT   25
#define TG_REDIS_DEFAULT_BATCH     32
#define TG_REDIS_MAX_BATCH         512
#define TG_REDIS_NUMLEN            21       /* "18446744073709551615" + NUL */

enum tg_redis_state {
    TG_REDIS_DOWN,                /* no context; reconnect timer armed */
    TG_REDIS_CONNECTING,          /* context exists, connect/SELECT pending */
    TG_REDIS_READY,               /* connected (and SELECTed) */
};

enum tg_redis_kind { TG_OP_CHARGE, TG_OP_HGET };

struct tg_redis_op {
    struct tg_redis_op *next;     /* r->pending, then the batch's list */
    tg_redis_charge_cb  charge_cb;  /* NULL once delivered or cancelled */
    tg_redis_str_cb     str_cb;     /* (HGET) idem */
    void               *arg;
    uint8_t             kind;     /* enum tg_redis_kind */
    uint8_t             n;        /* buckets (charge) / 2 strings (HGET) */
    uint32_t            cost;
    tg_gcra_limit       lim[TG_CHARGE_MAX_BUCKETS];
    uint32_t            len[TG_CHARGE_MAX_BUCKETS];   /* of each string */
    char                str[];    /* n NUL-terminated strings back to back */
};

struct tg_redis_batch {
    struct tg_redis       *r;
    struct tg_redis_batch *prev, *next;   /* r->inflight */
    struct tg_redis_op    *ops;           /* in ARGV order */
    struct tg_redis_op    *tail;
    size_t                 nops;
    size_t                 nkeys;         /* total bucket keys (charge) */
    uint8_t                kind;          /* enum tg_redis_kind */
    uint8_t                eval;          /* sent again as EVAL (NOSCRIPT) */
    uint8_t                done;          /* ops answered; a reply is ignored */
    uint8_t                timer_set;
    struct event          *timer;         /* in the same allocation */
};

struct tg_redis {
    struct event_base      *base;
    tg_redis_opts           opts;
    redisAsyncContext      *ac;          /* NULL while down */
    enum tg_redis_state     state;
    int                     destroying;  /* no callbacks, no reconnects */

    struct tg_redis_op     *pending;     /* queued this loop turn */
    struct tg_redis_op    **pending_tail;
    struct tg_redis_batch  *inflight;    /* sent, reply callback not yet run */

    struct event           *flush_ev;    /* no fd, activated by hand */
    struct event           *drop_ev;     /* idem: drop r->drop_ac */
    redisAsyncContext      *drop_ac;
    struct event           *reconnect_ev;
    struct event           *connect_ev;  /* connect + SELECT deadline */
    const struct timeval   *call_tv;     /* common timeout: timeout_ms */

    unsigned                backoff_ms;  /* next reconnect delay (pre-jitter) */
    unsigned                consec_tmo;  /* deadlines in a row */
    uint64_t                rng;         /* xorshift64 state, for jitter */

    char                    sha[41];     /* SHA1 of tg_gcra_lua, hex */
    size_t                  script_len;

    const char            **argv;        /* scratch for one command: */
    size_t                 *argvlen;     /* argc entries each */
    size_t                  argcap;
    char                   *num;         /* number strings */
    size_t                  numcap;

    tg_redis_stats          stats;
};

static void conn_start(struct tg_redis *r);
static void conn_drop(struct tg_redis *r);
static void schedule_reconnect(struct tg_redis *r);
static void schedule_drop(struct tg_redis *r);
static void set_ready(struct tg_redis *r);
static void connect_cb(const redisAsyncContext *ac, int status);
static void disconnect_cb(const redisAsyncContext *ac, int status);
static void select_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void script_load_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void flush_cb(evutil_socket_t fd, short what, void *arg);
static void drop_cb(evutil_socket_t fd, short what, void *arg);
static void reconnect_cb(evutil_socket_t fd, short what, void *arg);
static void connect_timeout_cb(evutil_socket_t fd, short what, void *arg);
static struct tg_redis_batch *batch_new(struct tg_redis *r, enum tg_redis_kind kind);
static void batch_add(struct tg_redis_batch *b, struct tg_redis_op *op);
static void batch_start(struct tg_redis_batch *b);
static tg_rc batch_send(struct tg_redis_batch *b);
static void batch_fail(struct tg_redis_batch *b);
static void batch_free(struct tg_redis_batch *b);
static void batch_reply_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void batch_timeout_cb(evutil_socket_t fd, short what, void *arg);
static void deliver_charges(struct tg_redis_batch *b, const redisReply *reply);
static void deliver_hget(struct tg_redis_batch *b, const redisReply *reply);
static void op_fail(struct tg_redis *r, struct tg_redis_op *op);
static int op_live(const struct tg_redis_op *op);
static struct tg_redis_op *op_new(enum tg_redis_kind kind, const char *const *s, size_t n);
static void queue_op(struct tg_redis *r, struct tg_redis_op *op);
static int parse_uint(const char *s, size_t len, unsigned long max, unsigned long *out);

/* ------------------------------------------------------------------ */
/* URL                                                                 */

tg_rc
tg_redis_parse_url(const char *url, tg_redis_opts *opts, char *err, size_t errlen)
{
    static const char scheme[] = "redis://";
    const char *p, *host, *hend, *end;
    unsigned long port = 6379, db = 0;
    size_t hlen;

    if (url == NULL || *url == '\0') {
        snprintf(err, errlen, "redis url: empty");
        return TG_ERR;
    }
    if (strncmp(url, "rediss://", 9) == 0) {
        snprintf(err, errlen, "redis url: TLS (rediss://) is not supported");
        return TG_ERR;
    }
    if (strncmp(url, scheme, sizeof(scheme) - 1) != 0) {
        snprintf(err, errlen, "redis url: must start with \"redis://\"");
        return TG_ERR;
    }
    p = url + sizeof(scheme) - 1;
    end = p + strlen(p);
    if (strpbrk(p, "@") != NULL) {
        snprintf(err, errlen, "redis url: user/password is not supported");
        return TG_ERR;
    }
    if (strpbrk(p, "?#") != NULL) {
        snprintf(err, errlen, "redis url: query or fragment is not supported");
        return TG_ERR;
    }

    if (*p == '[') {
        host = p + 1;
        hend = strchr(host, ']');
        if (hend == NULL) {
            snprintf(err, errlen, "redis url: missing ']' after IPv6 address");
            return TG_ERR;
        }
        p = hend + 1;
        if (hend == host || memchr(host, ':', (size_t)(hend - host)) == NULL) {
            snprintf(err, errlen, "redis url: bad IPv6 address in brackets");
            return TG_ERR;
        }
        for (const char *q = host; q < hend; q++) {
            if (!isxdigit((unsigned char)*q) && *q != ':' && *q != '.') {
                snprintf(err, errlen, "redis url: bad IPv6 address in brackets");
                return TG_ERR;
            }
        }
    } else {
        const char *c1 = strchr(p, ':');
        if (c1 != NULL && strchr(c1 + 1, ':') != NULL) {
            snprintf(err, errlen, "redis url: IPv6 addresses go in brackets");
            return TG_ERR;
        }
        host = p;
        hend = p + strcspn(p, ":/");
        p = hend;
        if (hend == host) {
            snprintf(err, errlen, "redis url: missing host");
            return TG_ERR;
        }
        for (const char *q = host; q < hend; q++) {
            if (!isalnum((unsigned char)*q) && *q != '.' && *q != '-' && *q != '_') {
                snprintf(err, errlen, "redis url: bad character in host "
                         "(IPv6 addresses go in brackets)");
                return TG_ERR;
            }
        }
    }
    hlen = (size_t)(hend - host);
    if (hlen >= sizeof(opts->host)) {
        snprintf(err, errlen, "redis url: host longer than %zu bytes",
                 sizeof(opts->host) - 1);
        return TG_ERR;
    }

    if (*p == ':') {
        const char *ps = p + 1, *pe = ps + strcspn(ps, "/");
        if (parse_uint(ps, (size_t)(pe - ps), 65535, &port) != TG_OK || port == 0) {
            snprintf(err, errlen, "redis url: port must be a number in 1..65535");
            return TG_ERR;
        }
        p = pe;
    }
    if (*p == '/') {
        const char *ds = p + 1;
        if (parse_uint(ds, (size_t)(end - ds), 15, &db) != TG_OK) {
            snprintf(err, errlen, "redis url: database must be a number in 0..15");
            return TG_ERR;
        }
        p = end;
    }
    if (p != end) {
        snprintf(err, errlen, "redis url: unexpected text after the host");
        return TG_ERR;
    }

    memcpy(opts->host, host, hlen);
    opts->host[hlen] = '\0';
    opts->port = (int)port;
    opts->db = (int)db;
    return TG_OK;
}

/* ------------------------------------------------------------------ */
/* create / destroy                                                    */

struct tg_redis *
tg_redis_create(struct event_base *base, const tg_redis_opts *opts)
{
    struct tg_redis *r;
    unsigned char md[SHA_DIGEST_LENGTH];
    struct in6_addr a6;
    struct in_addr a4;
    struct timeval tv;

    r = tg_xcalloc(1, sizeof(*r));
    r->base = base;
    r->opts = *opts;
    r->opts.host[sizeof(r->opts.host) - 1] = '\0';
    if (r->opts.timeout_ms == 0) {
        r->opts.timeout_ms = TG_REDIS_DEFAULT_TIMEOUT;
    }
    if (r->opts.max_batch == 0) {
        r->opts.max_batch = TG_REDIS_DEFAULT_BATCH;
    } else if (r->opts.max_batch > TG_REDIS_MAX_BATCH) {
        r->opts.max_batch = TG_REDIS_MAX_BATCH;
    }
    if (inet_pton(AF_INET, r->opts.host, &a4) != 1
        && inet_pton(AF_INET6, r->opts.host, &a6) != 1) {
        tg_warn("redis: host is not a numeric address: resolving it blocks the loop");
    }
    r->pending_tail = &r->pending;
    r->state = TG_REDIS_DOWN;
    r->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
    r->rng = tg_now_us() ^ ((uint64_t)(uintptr_t)r << 17) ^ 0x9e3779b97f4a7c15ull;

    r->script_len = strlen(tg_gcra_lua);
    SHA1((const unsigned char *)tg_gcra_lua, r->script_len, md);
    for (size_t i = 0; i < SHA_DIGEST_LENGTH; i++) {
        snprintf(r->sha + 2 * i, 3, "%02x", md[i]);
    }

    tv.tv_sec = r->opts.timeout_ms / 1000;
    tv.tv_usec = (r->opts.timeout_ms % 1000) * 1000;
    r->call_tv = event_base_init_common_timeout(base, &tv);
    r->flush_ev = event_new(base, -1, 0, flush_cb, r);
    r->drop_ev = event_new(base, -1, 0, drop_cb, r);
    r->reconnect_ev = evtimer_new(base, reconnect_cb, r);
    r->connect_ev = evtimer_new(base, connect_timeout_cb, r);
    if (r->call_tv == NULL || r->flush_ev == NULL || r->drop_ev == NULL
        || r->reconnect_ev == NULL || r->connect_ev == NULL) {
        tg_error("redis: cannot create events");
        goto fail;
    }

    conn_start(r);
    return r;

fail:
    if (r->flush_ev) event_free(r->flush_ev);
    if (r->drop_ev) event_free(r->drop_ev);
    if (r->reconnect_ev) event_free(r->reconnect_ev);
    if (r->connect_ev) event_free(r->connect_ev);
    free(r);
    return NULL;
}

void
tg_redis_destroy(struct tg_redis *r)
{
    struct tg_redis_op *op, *next;

    if (r == NULL) {
        return;
    }
    r->destroying = 1;
    if (r->ac != NULL) {
        redisAsyncContext *ac = r->ac;
        if (ac->c.flags & REDIS_IN_CALLBACK) {
            /* hiredis would defer the free and call us back after r is gone */
            tg_error("redis: tg_redis_destroy called from a Redis callback");
            abort();
        }
        r->ac = NULL;
        redisAsyncFree(ac);     /* runs every reply callback with NULL */
    }
    while (r->inflight != NULL) {   /* not expected: each had a context */
        batch_free(r->inflight);
    }
    for (op = r->pending; op != NULL; op = next) {
        next = op->next;
        free(op);
    }
    event_free(r->flush_ev);
    event_free(r->drop_ev);
    event_free(r->reconnect_ev);
    event_free(r->connect_ev);
    free(r->argv);
    free(r->argvlen);
    free(r->num);
    free(r);
}

int
tg_redis_ready(const struct tg_redis *r)
{
    return r != NULL && r->state == TG_REDIS_READY;
}

void
tg_redis_get_stats(const struct tg_redis *r, tg_redis_stats *st)
{
    *st = r->stats;
}

/* ------------------------------------------------------------------ */
/* requests                                                            */

struct tg_redis_op *
tg_redis_charge(struct tg_redis *r, const char *const *keys, const tg_gcra_limit *lim,
                size_t n, uint32_t cost, tg_redis_charge_cb cb, void *arg)
{
    struct tg_redis_op *op;
    int bad = (n == 0 || n > TG_CHARGE_MAX_BUCKETS || keys == NULL || lim == NULL);

    for (size_t i = 0; !bad && i < n; i++) {
        bad = keys[i] == NULL || lim[i].interval_us == 0 || lim[i].burst == 0;
    }
    if (bad) {
        /* a caller bug: answered TG_ERR like any failure, never sent */
        tg_error("redis: invalid charge (%zu buckets)", n);
        op = op_new(TG_OP_CHARGE, NULL, 0);
        op->n = 0;
    } else {
        op = op_new(TG_OP_CHARGE, keys, n);
        memcpy(op->lim, lim, n * sizeof(*lim));
    }
    op->cost = cost;
    op->charge_cb = cb;
    op->arg = arg;
    queue_op(r, op);
    return op;
}

struct tg_redis_op *
tg_redis_hget(struct tg_redis *r, const char *key, const char *field,
              tg_redis_str_cb cb, void *arg)
{
    const char *s[2] = { key, field };
    struct tg_redis_op *op;

    op = op_new(TG_OP_HGET, s, 2);
    op->str_cb = cb;
    op->arg = arg;
    queue_op(r, op);
    return op;
}

void
tg_redis_cancel(struct tg_redis_op *op)
{
    if (op != NULL) {
        op->charge_cb = NULL;
        op->str_cb = NULL;
    }
}

/* ------------------------------------------------------------------ */
/* connection                                                          */

static void
conn_start(struct tg_redis *r)
{
    redisAsyncContext *ac;
    struct timeval tv;
    unsigned ms;

    ac = redisAsyncConnect(r->opts.host, r->opts.port);
    if (ac == NULL) {
        tg_warn("redis: cannot create a context for %s:%d", r->opts.host, r->opts.port);
        schedule_reconnect(r);
        return;
    }
    if (ac->err) {
        tg_warn("redis: connect to %s:%d: %s", r->opts.host, r->opts.port, ac->errstr);
        redisAsyncFree(ac);
        schedule_reconnect(r);
        return;
    }
    ac->data = r;
    if (redisLibeventAttach(ac, r->base) != REDIS_OK) {
        tg_error("redis: cannot attach to the event base");
        redisAsyncFree(ac);
        schedule_reconnect(r);
        return;
    }
    redisAsyncSetConnectCallback(ac, connect_cb);
    redisAsyncSetDisconnectCallback(ac, disconnect_cb);
    r->ac = ac;
    r->state = TG_REDIS_CONNECTING;
    r->consec_tmo = 0;

    /* Queued now, written as soon as the socket connects, ahead of any
     * charge; nobody waits for the SCRIPT LOAD (EVALSHA falls back). */
    if (r->opts.db != 0) {
        redisAsyncCommand(ac, select_cb, r, "SELECT %d", r->opts.db);
    }
    redisAsyncCommand(ac, script_load_cb, r, "SCRIPT LOAD %b", tg_gcra_lua, r->script_len);

    ms = r->opts.timeout_ms > TG_REDIS_CONNECT_MIN_MS ? r->opts.timeout_ms
                                                      : TG_REDIS_CONNECT_MIN_MS;
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    evtimer_add(r->connect_ev, &tv);
}

/* Free the context now (from our own events only).  Every sent command's
 * callback runs with NULL; disconnect_cb runs if it was connected. */
static void
conn_drop(struct tg_redis *r)
{
    redisAsyncContext *ac = r->ac;

    if (ac == NULL) {
        return;
    }
    redisAsyncFree(ac);
    if (r->ac == ac) {          /* not connected yet: no disconnect callback */
        r->ac = NULL;
        r->state = TG_REDIS_DOWN;
        if (!r->destroying) {
            schedule_reconnect(r);
        }
    }
}

static void
set_ready(struct tg_redis *r)
{
    r->state = TG_REDIS_READY;
    r->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
    r->consec_tmo = 0;
    evtimer_del(r->connect_ev);
    tg_info("redis: connected to %s:%d", r->opts.host, r->opts.port);
}

static void
schedule_reconnect(struct tg_redis *r)
{
    struct timeval tv;
    uint64_t x, ms;

    r->state = TG_REDIS_DOWN;
    evtimer_del(r->connect_ev);
    if (r->destroying || evtimer_pending(r->reconnect_ev, NULL)) {
        return;
    }
    /* xorshift64: jitter only, no need for quality */
    x = r->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    r->rng = x;
    ms = (uint64_t)r->backoff_ms * (800 + x % 401) / 1000;     /* +-20 % */
    if (r->backoff_ms < TG_REDIS_BACKOFF_MAX_MS) {
        r->backoff_ms *= 2;
        if (r->backoff_ms > TG_REDIS_BACKOFF_MAX_MS) {
            r->backoff_ms = TG_REDIS_BACKOFF_MAX_MS;
        }
    }
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
    evtimer_add(r->reconnect_ev, &tv);
}

/* Drop the current context on a clean stack (not inside a hiredis or
 * batch callback). */
static void
schedule_drop(struct tg_redis *r)
{
    if (r->ac == NULL) {
        return;
    }
    r->drop_ac = r->ac;
    event_active(r->drop_ev, 0, 0);
}

static void
connect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_redis *r = ac->data;

    if (status != REDIS_OK) {
        /* hiredis frees ac after we return (and fails its commands) */
        tg_warn("redis: connect to %s:%d failed: %s", r->opts.host, r->opts.port,
                ac->errstr);
        if (r->ac == ac) {
            r->ac = NULL;
        }
        schedule_reconnect(r);
        return;
    }
    if (r->opts.db == 0) {
        set_ready(r);
    }
}

static void
disconnect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_redis *r = ac->data;

    /* hiredis frees ac after we return */
    if (r->ac == ac) {
        r->ac = NULL;
    }
    if (r->destroying) {
        return;
    }
    if (status != REDIS_OK) {
        tg_warn("redis: connection to %s:%d lost: %s", r->opts.host, r->opts.port,
                ac->errstr);
    } else {
        tg_warn("redis: connection to %s:%d closed", r->opts.host, r->opts.port);
    }
    schedule_reconnect(r);
}

static void
select_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_redis *r = privdata;
    redisReply *rep = reply;

    if (rep == NULL || r->destroying || r->ac != ac) {
        return;
    }
    if (rep->type == REDIS_REPLY_STATUS) {
        set_ready(r);
        return;
    }
    tg_error("redis: SELECT %d failed: %s", r->opts.db,
             rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
    schedule_drop(r);
}

static void
script_load_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_redis *r = privdata;
    redisReply *rep = reply;

    if (rep == NULL || r->destroying) {
        return;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        tg_warn("redis: SCRIPT LOAD failed: %s", rep->str);
    } else if (rep->type != REDIS_REPLY_STRING || rep->len != 40
               || strncasecmp(rep->str, r->sha, 40) != 0) {
        tg_warn("redis: SCRIPT LOAD answered an unexpected digest");
    }
}

static void
drop_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis *r = arg;

    if (r->ac != NULL && r->ac == r->drop_ac) {
        tg_warn("redis: dropping the connection to %s:%d", r->opts.host, r->opts.port);
        conn_drop(r);
    }
    r->drop_ac = NULL;
}

static void
reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis *r = arg;

    if (r->ac == NULL) {
        r->stats.reconnects++;
        conn_start(r);
    }
}

static void
connect_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis *r = arg;

    if (r->ac != NULL && r->state != TG_REDIS_READY) {
        tg_warn("redis: connect to %s:%d timed out", r->opts.host, r->opts.port);
        conn_drop(r);
    }
}

/* ------------------------------------------------------------------ */
/* queue and flush                                                     */

static void
queue_op(struct tg_redis *r, struct tg_redis_op *op)
{
    op->next = NULL;
    *r->pending_tail = op;
    r->pending_tail = &op->next;
    if (r->pending == op) {
        event_active(r->flush_ev, 0, 0);
    }
}

static void
flush_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis *r = arg;
    struct tg_redis_op *list, *op;
    struct tg_redis_batch *cur = NULL, *b;

    /* Take the list first: callbacks below may queue new ops, which go
     * out on the next run of this event. */
    list = r->pending;
    r->pending = NULL;
    r->pending_tail = &r->pending;

    while ((op = list) != NULL) {
        list = op->next;
        op->next = NULL;
        if (!op_live(op)) {
            free(op);
            continue;
        }
        if (r->state != TG_REDIS_READY || r->ac == NULL
            || (op->kind == TG_OP_CHARGE && op->n == 0)) {
            op_fail(r, op);
            free(op);
            continue;
        }
        if (op->kind == TG_OP_HGET) {
            b = batch_new(r, TG_OP_HGET);
            batch_add(b, op);
            batch_start(b);
            continue;
        }
        if (cur == NULL) {
            cur = batch_new(r, TG_OP_CHARGE);
        }
        batch_add(cur, op);
        if (cur->nops >= r->opts.max_batch) {
            b = cur;
            cur = NULL;
            batch_start(b);
        }
    }
    if (cur != NULL) {
        batch_start(cur);
    }
}

/* ------------------------------------------------------------------ */
/* batches                                                             */

static size_t
batch_ev_offset(void)
{
    size_t a = _Alignof(max_align_t);
    return (sizeof(struct tg_redis_batch) + a - 1) / a * a;
}

static struct tg_redis_batch *
batch_new(struct tg_redis *r, enum tg_redis_kind kind)
{
    size_t off = batch_ev_offset();
    struct tg_redis_batch *b = tg_xcalloc(1, off + event_get_struct_event_size());

    b->r = r;
    b->kind = (uint8_t)kind;
    b->timer = (struct event *)(void *)((char *)b + off);
    return b;
}

static void
batch_add(struct tg_redis_batch *b, struct tg_redis_op *op)
{
    if (b->tail != NULL) {
        b->tail->next = op;
    } else {
        b->ops = op;
    }
    b->tail = op;
    b->nops++;
    b->nkeys += op->n;
}

/* Link, arm the deadline, send.  On a send failure the ops are answered
 * TG_ERR and the batch is gone. */
static void
batch_start(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;

    b->next = r->inflight;
    if (r->inflight != NULL) {
        r->inflight->prev = b;
    }
    r->inflight = b;
    event_assign(b->timer, r->base, -1, 0, batch_timeout_cb, b);
    event_add(b->timer, r->call_tv);
    b->timer_set = 1;
    if (batch_send(b) != TG_OK) {
        batch_fail(b);
        batch_free(b);
    }
}

/*
 * One command for the batch into r's scratch arrays, then to hiredis (which
 * copies it): EVALSHA sha numkeys KEYS... nreq (nbuckets cost (T burst)...)...
 * or EVAL script ... after NOSCRIPT; HGET key field.
 */
static tg_rc
batch_send(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;
    struct tg_redis_op *op = b->ops;
    size_t argc, nnum, i = 0;
    char *np;
    int rc;

    if (r->ac == NULL) {
        return TG_ERR;
    }
    if (b->kind == TG_OP_HGET) {
        argc = 3;
        nnum = 0;
    } else {
        argc = 3 + b->nkeys + 1 + 2 * b->nops + 2 * b->nkeys;
        nnum = 1 + 1 + 2 * b->nops + 2 * b->nkeys;
    }
    if (argc > r->argcap) {
        r->argcap = argc * 2;
        free(r->argv);
        free(r->argvlen);
        r->argv = tg_xmalloc(r->argcap * sizeof(*r->argv));
        r->argvlen = tg_xmalloc(r->argcap * sizeof(*r->argvlen));
    }
    if (nnum * TG_REDIS_NUMLEN > r->numcap) {
        r->numcap = nnum * TG_REDIS_NUMLEN * 2;
        free(r->num);
        r->num = tg_xmalloc(r->numcap);
    }
    np = r->num;

#define TG_ARG(p, l) do { r->argv[i] = (p); r->argvlen[i] = (l); i++; } while (0)
#define TG_NUM(v) do { int l_ = snprintf(np, TG_REDIS_NUMLEN, "%llu",           \
                                         (unsigned long long)(v));              \
                       TG_ARG(np, (size_t)l_); np += l_ + 1; } while (0)

    if (b->kind == TG_OP_HGET) {
        TG_ARG("HGET", 4);
        TG_ARG(op->str, op->len[0]);
        TG_ARG(op->str + op->len[0] + 1, op->len[1]);
    } else {
        if (b->eval) {
            TG_ARG("EVAL", 4);
            TG_ARG(tg_gcra_lua, r->script_len);
        } else {
            TG_ARG("EVALSHA", 7);
            TG_ARG(r->sha, 40);
        }
        TG_NUM(b->nkeys);
        for (op = b->ops; op != NULL; op = op->next) {
            const char *s = op->str;
            for (size_t k = 0; k < op->n; k++) {
                TG_ARG(s, op->len[k]);
                s += op->len[k] + 1;
            }
        }
        TG_NUM(b->nops);
        for (op = b->ops; op != NULL; op = op->next) {
            TG_NUM(op->n);
            TG_NUM(op->cost);
            for (size_t k = 0; k < op->n; k++) {
                TG_NUM(op->lim[k].interval_us);
                TG_NUM(op->lim[k].burst);
            }
        }
    }
#undef TG_NUM
#undef TG_ARG

    rc = redisAsyncCommandArgv(r->ac, batch_reply_cb, b, (int)i, r->argv, r->argvlen);
    if (rc != REDIS_OK) {
        return TG_ERR;
    }
    r->stats.calls++;
    return TG_OK;
}

/* Answer every live op TG_ERR (no-op once done, or while destroying). */
static void
batch_fail(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;

    if (b->done) {
        return;
    }
    b->done = 1;
    if (r->destroying) {
        return;
    }
    for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
        op_fail(r, op);
    }
}

static void
batch_free(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;
    struct tg_redis_op *op, *next;

    if (b->timer_set) {
        event_del(b->timer);
    }
    if (b->prev != NULL) {
        b->prev->next = b->next;
    } else if (r->inflight == b) {
        r->inflight = b->next;
    }
    if (b->next != NULL) {
        b->next->prev = b->prev;
    }
    for (op = b->ops; op != NULL; op = next) {
        next = op->next;
        free(op);
    }
    free(b);
}

/* hiredis calls this exactly once per command sent: the reply, or NULL
 * when the context goes away.  The batch ends here. */
static void
batch_reply_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_redis_batch *b = privdata;
    struct tg_redis *r = b->r;
    redisReply *rep = reply;

    if (b->done || rep == NULL) {
        batch_fail(b);          /* no-op if done */
        batch_free(b);
        return;
    }
    r->consec_tmo = 0;
    if (rep->type == REDIS_REPLY_ERROR && b->kind == TG_OP_CHARGE && !b->eval
        && strncmp(rep->str, "NOSCRIPT", 8) == 0) {
        r->stats.noscript++;
        b->eval = 1;
        if (batch_send(b) == TG_OK) {
            return;             /* same batch, same deadline, next reply */
        }
        batch_fail(b);
        batch_free(b);
        return;
    }
    if (b->kind == TG_OP_CHARGE) {
        deliver_charges(b, rep);
    } else {
        deliver_hget(b, rep);
    }
    batch_free(b);
}

static void
batch_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis_batch *b = arg;
    struct tg_redis *r = b->r;

    b->timer_set = 0;
    if (b->done) {
        return;
    }
    r->stats.timeouts++;
    batch_fail(b);              /* the batch waits for its reply or NULL */
    if (++r->consec_tmo >= TG_REDIS_MAX_CONSEC_TMO) {
        r->consec_tmo = 0;
        schedule_drop(r);
    }
}

static void
deliver_charges(struct tg_redis_batch *b, const redisReply *rep)
{
    struct tg_redis *r = b->r;
    struct tg_redis_op *op;
    tg_gcra_result res;
    size_t i;

    if (rep->type == REDIS_REPLY_ERROR) {
        tg_warn("redis: charge script failed: %.200s", rep->str);
        goto fail;
    }
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 5 * b->nops) {
        tg_warn("redis: charge script reply: type %d with %zu elements, "
                "expected an array of %zu", rep->type,
                rep->type == REDIS_REPLY_ARRAY ? rep->elements : (size_t)0,
                5 * b->nops);
        goto fail;
    }
    for (i = 0, op = b->ops; op != NULL; op = op->next, i += 5) {
        redisReply *const *e = rep->element + i;
        for (size_t k = 0; k < 5; k++) {
            if (e[k]->type != REDIS_REPLY_INTEGER || e[k]->integer < 0) {
                tg_warn("redis: charge script reply: element %zu is not a "
                        "non-negative integer", i + k);
                goto fail;
            }
        }
        if (e[0]->integer > 1 || e[4]->integer >= op->n) {
            tg_warn("redis: charge script reply: request %zu out of range", i / 5);
            goto fail;
        }
    }

    for (i = 0, op = b->ops; op != NULL; op = op->next, i += 5) {
        redisReply *const *e = rep->element + i;
        tg_redis_charge_cb cb = op->charge_cb;
        if (cb == NULL) {
            continue;
        }
        op->charge_cb = NULL;
        res.allowed = (int)e[0]->integer;
        res.remaining = e[1]->integer > UINT32_MAX ? UINT32_MAX : (uint32_t)e[1]->integer;
        res.retry_us = (uint64_t)e[2]->integer;
        res.reset_us = (uint64_t)e[3]->integer;
        res.limiting = (int)e[4]->integer;
        r->stats.charges++;
        cb(op->arg, TG_OK, &res);
    }
    b->done = 1;
    return;

fail:
    batch_fail(b);
}

static void
deliver_hget(struct tg_redis_batch *b, const redisReply *rep)
{
    struct tg_redis_op *op = b->ops;
    tg_redis_str_cb cb = op->str_cb;

    b->done = 1;
    if (cb == NULL) {
        return;
    }
    op->str_cb = NULL;
    if (rep->type == REDIS_REPLY_STRING) {
        cb(op->arg, TG_OK, rep->str, rep->len);
    } else if (rep->type == REDIS_REPLY_NIL) {
        cb(op->arg, TG_OK, NULL, 0);
    } else {
        tg_warn("redis: HGET answered type %d%s%.200s", rep->type,
                rep->type == REDIS_REPLY_ERROR ? ": " : "",
                rep->type == REDIS_REPLY_ERROR ? rep->str : "");
        cb(op->arg, TG_ERR, NULL, 0);
    }
}

/* ------------------------------------------------------------------ */
/* ops                                                                 */

static int
op_live(const struct tg_redis_op *op)
{
    return op->kind == TG_OP_CHARGE ? op->charge_cb != NULL : op->str_cb != NULL;
}

/* Answer TG_ERR once (the op is not freed here). */
static void
op_fail(struct tg_redis *r, struct tg_redis_op *op)
{
    if (op->kind == TG_OP_CHARGE) {
        tg_redis_charge_cb cb = op->charge_cb;
        if (cb != NULL) {
            op->charge_cb = NULL;
            r->stats.errors++;
            cb(op->arg, TG_ERR, NULL);
        }
    } else {
        tg_redis_str_cb cb = op->str_cb;
        if (cb != NULL) {
            op->str_cb = NULL;
            cb(op->arg, TG_ERR, NULL, 0);
        }
    }
}

/* One allocation: the op and copies of its n strings. */
static struct tg_redis_op *
op_new(enum tg_redis_kind kind, const char *const *s, size_t n)
{
    struct tg_redis_op *op;
    size_t total = 0, len[TG_CHARGE_MAX_BUCKETS];
    char *p;

    for (size_t i = 0; i < n; i++) {
        len[i] = s[i] != NULL ? strlen(s[i]) : 0;
        if (len[i] > UINT32_MAX - 1) {
            len[i] = UINT32_MAX - 1;
        }
        total += len[i] + 1;
    }
    op = tg_xcalloc(1, sizeof(*op) + total);
    op->kind = (uint8_t)kind;
    op->n = (uint8_t)n;
    p = op->str;
    for (size_t i = 0; i < n; i++) {
        if (len[i] != 0) {
            memcpy(p, s[i], len[i]);
        }
        p[len[i]] = '\0';
        op->len[i] = (uint32_t)len[i];
        p += len[i] + 1;
    }
    return op;
}

static int
parse_uint(const char *s, size_t len, unsigned long max, unsigned long *out)
{
    unsigned long v = 0;

    if (len == 0 || len > 10) {
        return TG_ERR;
    }
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return TG_ERR;
        }
        v = v * 10 + (unsigned long)(s[i] - '0');
    }
    if (v > max) {
        return TG_ERR;
    }
    *out = v;
    return TG_OK;
}
