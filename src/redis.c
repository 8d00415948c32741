/*
 * redis.c - async hiredis connections per worker, charges batched into
 * one EVALSHA of the GCRA script per loop turn, our own deadlines; one
 * Redis server, a Sentinel-managed master, or a Cluster.
 *
 * This file holds the API, the ops, the queue and flush, the batches and
 * the delivery of answers (and refunds); connections are in redis_conn.c,
 * Sentinel discovery in redis_sentinel.c, Cluster slots and routing in
 * redis_cluster.c, the shared structs in redis_int.h.
 *
 * Life of a charge:
 *
 *   tg_redis_charge   the op (keys copied) is appended to r->pending and
 *                     the flush event is activated (no fd), so the flush
 *                     runs after every callback of the current loop turn;
 *   flush_cb          target not ready: the op gets TG_ERR right there
 *                     (fail fast); ready: ops are cut into batches of up to
 *                     max_batch (Cluster: per slot), each sent as one
 *                     EVALSHA with its timer; a last batch not full waits
 *                     in r->held while a charge call is in flight
 *                     (hold_charges: the adaptive batch);
 *   batch_reply_cb    hiredis calls it exactly once per sent command: with
 *                     the reply, or NULL when the context goes away.  The
 *                     batch lives until then, even after its deadline (the
 *                     late reply is then ignored), and is freed there.
 *   batch_timeout_cb  deadline: every op gets TG_ERR; three deadlines in a
 *                     row drop that connection (a stuck TCP connection
 *                     would otherwise eat every deadline).
 *
 * NOSCRIPT: the same batch is sent again as EVAL <script> (which caches the
 * script) inside the reply callback, under the batch's original deadline.
 * Where the node runs tollgate's module (redis.native auto, TOLLGATE.PROTO
 * answered ours: redis_conn.c) a batch goes as TOLLGATE.CHARGE packed
 * KEYS... instead, the same numbers and answer; its "unknown command" (the
 * module unloaded) sends the batch again as the script, the same way.
 *
 * Connections are nodes (struct tg_rnode), each with its own reconnect
 * backoff.  Single mode has one node at redis.url.  Sentinel mode has one
 * node whose address is learnt from the sentinels (a short-lived "aux"
 * connection per question, the sentinel whose master last worked first)
 * and checked with ROLE; its reconnect timer asks the sentinels again, and
 * a dedicated connection SUBSCRIBEd to +switch-master kicks it.  Cluster
 * mode has one node (and one breaker) per master, a slot map from CLUSTER
 * SLOTS (aux connection, refreshed every 30 s, after MOVED, and as soon as
 * a node serving slots fails), one call per slot per batch (Redis refuses
 * declared keys of several slots: CROSSSLOT, even with
 * allow-cross-slot-keys), MOVED and ASK followed by resending the batch, at
 * most twice, within its deadline.
 *
 * Every context is opened by tg_redis_ctx_open: numeric addresses only (names from
 * Redis are resolved with evdns first), AUTH first when configured, our
 * reply functions and libevent adapter (bounded replies: see "contexts").
 *
 * Split requests (Cluster): the keys of one request live in the slot of
 * its first key, except the global bucket.  Such a request is charged in
 * two calls, one after the other: first its first key's slot (phase 1); if
 * allowed, the rest (phase 2); when phase 2 denies, phase 1 is refunded by
 * the refund script (tg_gcra_refund_lua) - at most what it still holds; when
 * phase 2 fails, phase 1 is kept (the requester falls back).  Sequential rather than
 * parallel so that requests a consumer's own bucket denies - the common
 * case under abuse - never touch the shared global bucket.
 *
 * Rules for callers (the header's, plus):
 *   - a callback may queue new ops and cancel ops not yet answered; it
 *     must not call tg_redis_destroy (that aborts when detected);
 *   - tg_redis_destroy calls no callback: ops still queued or in flight
 *     are dropped silently, so finish or cancel them first;
 *   - "ready" means connected and, for db != 0, SELECTed (Sentinel: and
 *     ROLE master); until then (and while reconnecting) charges fail fast
 *     on the next loop turn;
 *   - stats.errors counts charges only (not HGET); stats.reconnects counts
 *     reconnect attempts (timer firings), successful or not; the backoff
 *     restarts only after a good reply on the connection.
 *
 * Context ownership (hiredis 0.14 async.c): after a failed connect callback
 * or after the disconnect callback, hiredis frees the context itself; we
 * only ever free it with redisAsyncFree from our own timers and deferred
 * events (never from inside one of its own callbacks), and in
 * tg_redis_destroy.  Inside a reply callback we may only
 * redisAsyncDisconnect the context (hiredis defers that itself).
 */
#include "redis_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <event2/dns.h>
#include <openssl/sha.h>

static void queue_op(struct tg_redis *r, struct tg_redis_op *op);
static void flush_cb(evutil_socket_t fd, short what, void *arg);
static void batch_start(struct tg_redis_batch *b);
static void batch_outcome(struct tg_redis_batch *b, int ok);
static void batch_reply_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void batch_reply(redisAsyncContext *ac, void *reply, void *privdata);
static int batch_arm(struct tg_redis_batch *b, uint64_t now);
static void batch_timeout_cb(evutil_socket_t fd, short what, void *arg);
static void deliver_charges(struct tg_redis_batch *b, const redisReply *rep);
static void deliver_hget(struct tg_redis_batch *b, const redisReply *rep);
static int op_live(const struct tg_redis_op *op);
static void op_refund(struct tg_redis *r, struct tg_redis_op *op);
struct refund_buf;
static void late_refund(struct tg_redis *r, struct tg_rnode *nd,
                        const struct tg_redis_op *op, const tg_gcra_result *part,
                        uint64_t script_now, struct refund_buf *rb);
static void refund_flush(struct tg_redis *r, struct tg_rnode *nd, struct refund_buf *rb);
static int refund_send(struct tg_redis *r, struct tg_rnode *nd, const char *const *keys,
                       const size_t *lens, const uint64_t *amount, const uint64_t *p,
                       size_t nk, unsigned nops);
static struct tg_redis_op *op_new(struct tg_redis *r, enum tg_redis_kind kind,
                                  const char *const *s, size_t n);
static size_t format_resp(struct tg_redis *r, size_t argc);

/* ------------------------------------------------------------------ */
/* create / destroy                                                    */

struct tg_redis *
tg_redis_create(struct event_base *base, const tg_redis_opts *opts)
{
    struct tg_redis *r;
    unsigned char md[SHA_DIGEST_LENGTH];
    struct timeval tv;

    /* The config owns the defaults and bounds (redis.timeout_ms,
     * redis.max_batch): the client takes them as they are. */
    if (opts->timeout_ms == 0 || opts->max_batch == 0) {
        tg_error("redis: a client needs timeout_ms and max_batch (redis.timeout_ms, "
                 "redis.max_batch)");
        return NULL;
    }
    r = tg_xcalloc(1, sizeof(*r));
    r->base = base;
    r->opts = *opts;
    r->opts.host[sizeof(r->opts.host) - 1] = '\0';
    r->opts.sentinel_master[sizeof(r->opts.sentinel_master) - 1] = '\0';
    if (r->opts.nsentinels > TG_REDIS_MAX_ADDRS) {
        r->opts.nsentinels = TG_REDIS_MAX_ADDRS;
    }
    if (r->opts.ncluster > TG_REDIS_MAX_ADDRS) {
        r->opts.ncluster = TG_REDIS_MAX_ADDRS;
    }
    if (r->opts.ncluster > 0) {
        r->mode = TG_MODE_CLUSTER;
        if (r->opts.db != 0) {
            tg_warn("redis: Cluster has only database 0; ignoring db %d", r->opts.db);
            r->opts.db = 0;
        }
    } else if (r->opts.sentinel_master[0] != '\0') {
        r->mode = TG_MODE_SENTINEL;
        if (r->opts.nsentinels == 0) {
            tg_error("redis: Sentinel mode needs at least one sentinel address");
            free(r);
            return NULL;
        }
    } else {
        r->mode = TG_MODE_SINGLE;
    }
    if (r->mode != TG_MODE_SINGLE || !tg_redis_is_numeric_host(r->opts.host)) {
        /* names may come from Redis itself: resolve them without blocking */
        r->dns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS
                                      | EVDNS_BASE_DISABLE_WHEN_INACTIVE);
        if (r->dns == NULL) {
            tg_warn("redis: no resolver (evdns): only numeric addresses will work");
        }
    }
    r->pending_tail = &r->pending;
    r->rng = tg_now_us() ^ ((uint64_t)(uintptr_t)r << 17) ^ 0x9e3779b97f4a7c15ull;

    r->script_len = strlen(tg_gcra_lua);
    SHA1((const unsigned char *)tg_gcra_lua, r->script_len, md);
    for (size_t i = 0; i < SHA_DIGEST_LENGTH; i++) {
        snprintf(r->sha + 2 * i, 3, "%02x", md[i]);
    }

    tv = tg_ms_tv(r->opts.timeout_ms);
    r->call_tv = event_base_init_common_timeout(base, &tv);
    r->flush_ev = tg_event_new(base, -1, 0, flush_cb, r);
    r->hold_ev = tg_evtimer_new(base, flush_cb, r);
    if (r->call_tv == NULL) {
        tg_error("redis: cannot create events");
        goto fail;
    }
    tg_redis_aux_init(r, &r->disc, tg_redis_sentinel_done);
    tg_redis_aux_init(r, &r->slots, tg_redis_slots_done);

    switch (r->mode) {
    case TG_MODE_SINGLE:
        if (tg_redis_node_new(r, r->opts.host, r->opts.port) == NULL) {
            goto fail;
        }
        tg_redis_conn_start(r->nodes[0]);
        break;
    case TG_MODE_SENTINEL:
        r->sub_ev = tg_evtimer_new(base, tg_redis_sub_retry_cb, r);
        if (tg_redis_node_new(r, "", 0) == NULL) {
            tg_error("redis: cannot create events");
            goto fail;
        }
        tg_redis_sentinel_discover(r);
        tg_redis_sub_start(r);
        break;
    case TG_MODE_CLUSTER:
        r->slot_node = tg_xcalloc(TG_REDIS_CLUSTER_SLOTS, sizeof(*r->slot_node));
        r->slot_batch = tg_xcalloc(TG_REDIS_CLUSTER_SLOTS, sizeof(*r->slot_batch));
        r->refresh_ev = tg_evtimer_new(base, tg_redis_refresh_cb, r);
        tg_redis_cluster_refresh(r);
        break;
    }
    return r;

fail:
    r->destroying = 1;
    tg_redis_destroy(r);
    return NULL;
}

/* Free a context unless we are inside one of its callbacks (hiredis would
 * defer the free and call us back after r is gone). */
static void
free_ctx(redisAsyncContext *ac)
{
    if (ac->c.flags & REDIS_IN_CALLBACK) {
        tg_error("redis: tg_redis_destroy called from a Redis callback");
        abort();
    }
    redisAsyncFree(ac);     /* runs every reply callback with NULL */
}

void
tg_redis_destroy(struct tg_redis *r)
{
    struct tg_redis_op *op, *next;

    if (r == NULL) {
        return;
    }
    r->destroying = 1;
    for (size_t i = 0; i < r->nnodes; i++) {
        struct tg_rnode *nd = r->nodes[i];
        if (nd->ac != NULL) {
            redisAsyncContext *ac = nd->ac;
            nd->ac = NULL;
            free_ctx(ac);
        }
    }
    if (r->sub_ac != NULL) {
        redisAsyncContext *ac = r->sub_ac;
        r->sub_ac = NULL;
        free_ctx(ac);
    }
    tg_redis_aux_cancel(&r->disc);
    tg_redis_aux_cancel(&r->slots);
    while (r->inflight != NULL) {   /* not expected: each had a context */
        tg_redis_batch_free(r->inflight);
    }
    for (op = r->pending; op != NULL; op = next) {
        next = op->next;
        free(op);
    }
    for (op = r->held; op != NULL; op = next) {
        next = op->next;
        free(op);
    }
    for (size_t i = 0; i < r->nnodes; i++) {
        if (r->nodes[i]->resolving) {
            tg_redis_dns_give_up(r->nodes[i]);
        }
    }
    if (r->dns != NULL) {
        evdns_base_free(r->dns, 0);
    }
    for (size_t i = 0; i < r->nnodes; i++) {
        tg_redis_node_free(r->nodes[i]);
    }
    free(r->nodes);
    if (r->flush_ev) event_free(r->flush_ev);
    if (r->hold_ev) event_free(r->hold_ev);
    if (r->disc.timer) event_free(r->disc.timer);
    if (r->slots.timer) event_free(r->slots.timer);
    if (r->sub_ev) event_free(r->sub_ev);
    if (r->refresh_ev) event_free(r->refresh_ev);
    free(r->slot_node);
    free(r->slot_batch);
    free(r->argv);
    free(r->argvlen);
    free(r->num);
    free(r->cmd);
    free(r->kt);
    free(r->kix);
    free(r->kh);
    while ((op = r->op_pool) != NULL) {
        r->op_pool = op->next;
        free(op);
    }
    while (r->batch_pool != NULL) {
        struct tg_redis_batch *b = r->batch_pool;
        r->batch_pool = b->next;
        free(b);
    }
    tg_redis_reply_pool_free(r);
    free(r);
}

int
tg_redis_ready(const struct tg_redis *r)
{
    if (r == NULL) {
        return 0;
    }
    if (r->mode != TG_MODE_CLUSTER) {
        return r->nnodes > 0 && r->nodes[0]->state == TG_REDIS_READY;
    }
    if (!r->map_ok) {
        return 0;
    }
    for (size_t i = 0; i < r->nnodes; i++) {
        if (r->nodes[i]->state == TG_REDIS_READY) {
            return 1;
        }
    }
    return 0;
}

int
tg_redis_node_breakers(const struct tg_redis *r)
{
    return r != NULL && r->mode == TG_MODE_CLUSTER;
}

void
tg_redis_get_stats(const struct tg_redis *r, tg_redis_stats *st)
{
    *st = r->stats;
}

/* ------------------------------------------------------------------ */
/* requests                                                            */

/* Cluster: the buckets sharing the first key's slot go first (phase 1);
 * the others (the global bucket) must share one slot (phase 2). */
static tg_rc
op_split(struct tg_redis_op *op)
{
    unsigned s0 = tg_redis_key_slot(tg_redis_op_key(op, 0), op->len[0]);
    int s2 = -1;

    op->mask1 = op->mask2 = 0;
    for (size_t k = 0; k < op->n; k++) {
        unsigned s = tg_redis_key_slot(tg_redis_op_key(op, k), op->len[k]);
        if (s == s0) {
            op->mask1 |= (uint8_t)(1u << k);
        } else if (s2 < 0 || (unsigned)s2 == s) {
            s2 = (int)s;
            op->mask2 |= (uint8_t)(1u << k);
        } else {
            return TG_ERR;
        }
    }
    op->slot1 = (uint16_t)s0;
    op->slot2 = (uint16_t)(s2 < 0 ? 0 : s2);
    op->mask = op->mask1;
    op->phase = op->mask2 != 0 ? 1 : 0;
    return TG_OK;
}

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
        op = op_new(r, TG_OP_CHARGE, NULL, 0);
        op->n = 0;
    } else {
        op = op_new(r, TG_OP_CHARGE, keys, n);
        memcpy(op->lim, lim, n * sizeof(*lim));
        op->mask = (uint8_t)((1u << n) - 1);
        if (r->mode == TG_MODE_CLUSTER && op_split(op) != TG_OK) {
            tg_error("redis: the keys of one charge span more than two Cluster "
                     "slots (first key \"%s\")", keys[0]);
            op->n = 0;
        }
    }
    op->cost = cost;
    op->charge_cb = cb;
    op->arg = arg;
    op->deadline_us = tg_now_us() + (uint64_t)r->opts.timeout_ms * 1000;
    queue_op(r, op);
    return op;
}

struct tg_redis_op *
tg_redis_hget(struct tg_redis *r, const char *key, const char *field,
              tg_redis_str_cb cb, void *arg)
{
    const char *s[2] = { key, field };
    struct tg_redis_op *op;

    op = op_new(r, TG_OP_HGET, s, 2);
    op->slot1 = (uint16_t)tg_redis_key_slot(op->str, op->len[0]);
    op->str_cb = cb;
    op->arg = arg;
    op->deadline_us = tg_now_us() + (uint64_t)r->opts.timeout_ms * 1000;
    queue_op(r, op);
    return op;
}

struct tg_redis_op *
tg_redis_eval(struct tg_redis *r, const char *script, const char *key,
              const char *const *args, size_t nargs, tg_redis_str_cb cb, void *arg)
{
    const char *s[2 + TG_REDIS_EVAL_ARGS] = { key, script };
    struct tg_redis_op *op;

    if (nargs > TG_REDIS_EVAL_ARGS) {
        tg_error("redis: EVAL with %zu arguments (at most %d)", nargs, TG_REDIS_EVAL_ARGS);
        nargs = 0;
        s[1] = "return redis.error_reply('too many arguments')";
    }
    for (size_t i = 0; i < nargs; i++) {
        s[2 + i] = args[i];
    }
    op = op_new(r, TG_OP_EVAL, s, 2 + nargs);
    op->slot1 = (uint16_t)tg_redis_key_slot(op->str, op->len[0]);
    op->str_cb = cb;
    op->arg = arg;
    op->deadline_us = tg_now_us() + (uint64_t)r->opts.timeout_ms * 1000;
    queue_op(r, op);
    return op;
}

void
tg_redis_op_floor(struct tg_redis_op *op, const uint64_t *held_us, size_t n)
{
    if (op != NULL && op->kind == TG_OP_CHARGE && n <= op->n) {
        memcpy(op->floor_us, held_us, n * sizeof(*held_us));
    }
}

void
tg_redis_op_deadline(struct tg_redis_op *op, uint64_t deadline_us)
{
    if (op != NULL && deadline_us < op->deadline_us) {
        op->deadline_us = deadline_us;
    }
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

/*
 * The adaptive batch: while TG_REDIS_INFLIGHT charge calls are in flight
 * on the connection, the charges of a flush that do not fill a batch wait
 * in r->held, ahead of the next flush's, for an answer (batch_settle
 * flushes again), for max_batch charges (each flush takes them again), or
 * until `until` (the call in flight is then too slow to wait for:
 * timeout_ms / TG_REDIS_HOLD_DIV after it was sent, so a stuck connection
 * still sees a call per loop turn and its deadlines in a row) or the
 * earliest of their deadlines (hold_ev, armed anew by each flush).  Redis
 * runs one script at a time: a call sent behind one in flight would wait
 * there anyway, so under load the charges of a round trip go as one call
 * (Redis parses, reads and answers them at a fraction of the cost per
 * call), and an idle connection sends at once.  Takes b's ops; b is
 * freed.
 */
static void
hold_charges(struct tg_redis *r, struct tg_redis_batch *b, uint64_t until)
{
    uint64_t first = until, now = tg_now_us();
    struct timeval tv;

    for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
        if (op->deadline_us < first) {
            first = op->deadline_us;
        }
    }
    r->held = b->ops;
    b->ops = b->tail = NULL;
    b->nops = 0;
    tg_redis_batch_free(b);
    tv = tg_us_tv(first > now ? first - now : 0);
    event_add(r->hold_ev, &tv);
}

/* A charge call of b's connection is answered (or given up): charges
 * held for it go now. */
static void
batch_settle(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;

    if (!b->counted) {
        return;
    }
    b->counted = 0;
    b->node->charging--;
    if (r->held != NULL && !r->destroying) {
        event_active(r->flush_ev, 0, 0);
    }
}

static void flush_ops(struct tg_redis *r);

static void
flush_cb(evutil_socket_t fd, short what, void *arg)
{
    /* the deadlines of every op and the batches started: one clock read */
    tg_now_freeze();
    flush_ops(arg);
    tg_now_thaw();
}

static void
flush_ops(struct tg_redis *r)
{
    struct tg_redis_op *list, *op;
    struct tg_redis_batch *cur = NULL, *b, *built = NULL;
    struct tg_rnode *nd = r->mode != TG_MODE_CLUSTER ? r->nodes[0] : NULL;

    /* Take the list first: callbacks below may queue new ops, which go
     * out on the next run of this event. */
    list = r->pending;
    if (r->held != NULL) {
        struct tg_redis_op **t = &r->held;
        while (*t != NULL) {
            t = &(*t)->next;
        }
        *t = list;
        list = r->held;
        r->held = NULL;
        event_del(r->hold_ev);
    }
    r->pending = NULL;
    r->pending_tail = &r->pending;

    while ((op = list) != NULL) {
        list = op->next;
        op->next = NULL;
        if (!op_live(op)) {
            op_refund(r, op);   /* phase 2 of a cancelled request */
            tg_redis_op_release(r, op);
            continue;
        }
        if ((op->kind == TG_OP_CHARGE && op->n == 0) || op->deadline_us <= tg_now_us()) {
            tg_redis_op_fail(r, op);
            tg_redis_op_release(r, op);
            continue;
        }
        if (r->mode == TG_MODE_CLUSTER) {
            tg_redis_route_cluster(r, op, &built);
            continue;
        }
        if (!tg_redis_node_usable(nd)) {
            tg_redis_op_fail(r, op);
            tg_redis_op_release(r, op);
            continue;
        }
        if (op->kind != TG_OP_CHARGE) {
            b = tg_redis_batch_new(r, nd, (enum tg_redis_kind)op->kind);
            tg_redis_batch_add(b, op);
            batch_start(b);
            continue;
        }
        if (cur == NULL) {
            cur = tg_redis_batch_new(r, nd, TG_OP_CHARGE);
        }
        tg_redis_batch_add(cur, op);
        if (cur->nops >= r->opts.max_batch) {
            b = cur;
            cur = NULL;
            batch_start(b);
        }
    }
    if (cur != NULL) {
        uint64_t until = nd->charge_sent_us
                         + (uint64_t)r->opts.timeout_ms * 1000 / TG_REDIS_HOLD_DIV;
        if (nd->charging >= TG_REDIS_INFLIGHT && tg_now_us() < until) {
            hold_charges(r, cur, until);
        } else {
            batch_start(cur);
        }
    }
    /* Forget the slot index before starting: a start may answer ops, and
     * their callbacks may queue (never route) new ones. */
    for (b = built; b != NULL; b = b->flush_next) {
        if (b->slot >= 0) {
            r->slot_batch[b->slot] = NULL;
        }
    }
    while ((b = built) != NULL) {
        built = b->flush_next;
        b->flush_next = NULL;
        batch_start(b);
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

struct tg_redis_batch *
tg_redis_batch_new(struct tg_redis *r, struct tg_rnode *nd, enum tg_redis_kind kind)
{
    size_t off = batch_ev_offset(), size = off + event_get_struct_event_size();
    struct tg_redis_batch *b = r->batch_pool;

    if (b != NULL) {
        r->batch_pool = b->next;
        r->nbatch_pool--;
        memset(b, 0, size);              /* as new: the timer is assigned at start */
    } else {
        b = tg_xcalloc(1, size);
    }

    b->r = r;
    b->node = nd;
    b->slot = -1;
    b->kind = (uint8_t)kind;
    b->timer = (struct event *)(void *)((char *)b + off);
    return b;
}

void
tg_redis_batch_add(struct tg_redis_batch *b, struct tg_redis_op *op)
{
    if (b->tail != NULL) {
        b->tail->next = op;
    } else {
        b->ops = op;
    }
    b->tail = op;
    b->nops++;
    b->nkeys += op->kind == TG_OP_CHARGE ? (size_t)__builtin_popcount(op->mask) : op->n;
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
    batch_arm(b, tg_now_us());
    if (r->mode == TG_MODE_CLUSTER) {
        if (!tg_breaker_allow(&b->node->brk, tg_now_ms())) {
            tg_redis_batch_fail(b);      /* that node's breaker is open: at once */
            tg_redis_batch_free(b);
            return;
        }
        b->brk = 1;
    } else if (b->kind == TG_OP_CHARGE) {
        b->counted = 1;
        b->node->charging++;
        b->node->charge_sent_us = tg_now_us();
    }
    if (tg_redis_batch_send(b) != TG_OK) {
        tg_redis_batch_fail(b);
        tg_redis_batch_free(b);
    }
}

/* FNV-1a of a bucket's key (not its limit: batch_keys meets a name
 * under another limit on the way, for its alias). */
static uint32_t
rkey_hash(const char *s, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;

    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ULL;
    }
    return (uint32_t)(h ^ (h >> 32));
}

/*
 * The distinct buckets (key and limit) of charge batch b into r->kt, in
 * the order of first appearance, and each bucket sent (ops in order, bits
 * of each op's mask in order) into r->kix as its 1-based index in r->kt:
 * the script reads and writes each key once, and Redis parses each key
 * string once (the global bucket: once per call, not once per request).
 * r's scratch grows when needed and is kept.  Returns how many distinct.
 * The hash is of the name alone, so a name seen before with another limit
 * is met on the way and becomes the new bucket's alias (one TAT per name
 * in the script: gcra.h).
 */
static size_t
batch_keys(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;
    size_t cap = 16, nk = 0, kn = 0;

    while (cap < 2 * b->nkeys) {
        cap *= 2;
    }
    if (b->nkeys > r->ktcap) {
        r->ktcap = b->nkeys * 2;
        free(r->kt);
        free(r->kix);
        r->kt = tg_xmalloc(r->ktcap * sizeof(*r->kt));
        r->kix = tg_xmalloc(r->ktcap * sizeof(*r->kix));
    }
    if (cap > r->khcap) {
        r->khcap = cap;
        free(r->kh);
        r->kh = tg_xmalloc(cap * sizeof(*r->kh));
    }
    memset(r->kh, 0, cap * sizeof(*r->kh));
    for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
        const char *s = op->str;
        for (size_t k = 0; k < op->n; k++) {
            if (op->mask & (1u << k)) {
                size_t len = op->len[k], i;
                uint32_t h = rkey_hash(s, len), alias = 0;

                for (i = h & (cap - 1); r->kh[i] != 0; i = (i + 1) & (cap - 1)) {
                    const struct tg_rkey *e = &r->kt[r->kh[i] - 1];
                    if (e->hash == h && e->len == len && memcmp(e->s, s, len) == 0) {
                        if (e->lim.interval_us == op->lim[k].interval_us
                            && e->lim.burst == op->lim[k].burst) {
                            break;
                        }
                        alias = e->alias;
                    }
                }
                if (r->kh[i] == 0) {
                    r->kt[nk] = (struct tg_rkey){ s, len, h, op->lim[k],
                                                  alias != 0 ? alias : (uint32_t)nk + 1 };
                    r->kh[i] = (uint32_t)++nk;
                }
                r->kix[kn++] = r->kh[i];
            }
            s += op->len[k] + 1;
        }
    }
    return nk;
}

/*
 * r's argc arguments (r->argv, r->argvlen) as one RESP command in r->cmd
 * (grown when needed, kept; no printf): hiredis's redisAsyncCommandArgv
 * would format it into two fresh allocations per call.  Returns its length.
 */
static size_t
format_resp(struct tg_redis *r, size_t argc)
{
    size_t need = 24, n;
    char *p;

    for (size_t k = 0; k < argc; k++) {
        need += 24 + r->argvlen[k];          /* "$<len>\r\n" <arg> "\r\n" */
    }
    if (need > r->cmdcap) {
        r->cmdcap = need * 2;
        free(r->cmd);
        r->cmd = tg_xmalloc(r->cmdcap);
    }
    p = r->cmd;
    *p++ = '*';
    p += tg_u64_dec(p, argc);
    *p++ = '\r';
    *p++ = '\n';
    for (size_t k = 0; k < argc; k++) {
        n = r->argvlen[k];
        *p++ = '$';
        p += tg_u64_dec(p, n);
        *p++ = '\r';
        *p++ = '\n';
        memcpy(p, r->argv[k], n);
        p += n;
        *p++ = '\r';
        *p++ = '\n';
    }
    return (size_t)(p - r->cmd);
}

/*
 * One command for the batch into r's scratch arrays, then to hiredis (which
 * copies it): EVALSHA sha numkeys KEYS... packed (the numbers of the
 * layout in gcra.h as one argument of doubles: tg_gcra_script_pack),
 * TOLLGATE.CHARGE packed KEYS... where the node runs the module, or
 * EVAL script ... after NOSCRIPT; HGET key field; EVAL text 1 key args
 * (tg_redis_eval, one op per batch).  Only the buckets in
 * each op's mask are sent.  After ASK, ASKING goes first.
 */
tg_rc
tg_redis_batch_send(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;
    redisAsyncContext *ac = b->node != NULL ? b->node->ac : NULL;
    struct tg_redis_op *op = b->ops;
    size_t argc, nbytes, i = 0, len;
    char *np;
    int rc;

    if (ac == NULL) {
        return TG_ERR;
    }
    if (b->kind == TG_OP_HGET) {
        argc = 3;
        nbytes = 0;
    } else if (b->kind == TG_OP_EVAL) {
        argc = 2 + (size_t)op->n;      /* EVAL script 1 key args... */
        nbytes = TG_REDIS_NUMLEN;
    } else {
        /* at most: every bucket a distinct key; numkeys in decimal, the
         * rest packed (TG_GCRA_PACKED bytes each) in one argument */
        argc = 3 + b->nkeys + 1;
        nbytes = TG_REDIS_NUMLEN
                 + (2 + b->nops + 2 * b->nkeys
                    + TG_GCRA_SCRIPT_KEY_ARGS * b->nkeys) * TG_GCRA_PACKED;
    }
    if (argc > r->argcap) {
        r->argcap = argc * 2;
        free(r->argv);
        free(r->argvlen);
        r->argv = tg_xmalloc(r->argcap * sizeof(*r->argv));
        r->argvlen = tg_xmalloc(r->argcap * sizeof(*r->argvlen));
    }
    if (nbytes > r->numcap) {
        r->numcap = nbytes * 2;
        free(r->num);
        r->num = tg_xmalloc(r->numcap);
    }
    np = r->num;

#define TG_ARG(p, l) do { r->argv[i] = (p); r->argvlen[i] = (l); i++; } while (0)
#define TG_NUM(v) do { size_t l_ = tg_u64_dec(np, (uint64_t)(v));              \
                       np[l_] = '\0';                                          \
                       TG_ARG(np, l_); np += l_ + 1; } while (0)
#define TG_PACK(v) do { uint64_t v_ = (v);                                     \
                        np += tg_gcra_script_pack(&v_, 1, (unsigned char *)np); \
                   } while (0)

    if (b->kind == TG_OP_HGET) {
        TG_ARG("HGET", 4);
        TG_ARG(op->str, op->len[0]);
        TG_ARG(op->str + op->len[0] + 1, op->len[1]);
    } else if (b->kind == TG_OP_EVAL) {
        TG_ARG("EVAL", 4);
        TG_ARG(tg_redis_op_key(op, 1), op->len[1]);
        TG_NUM(1);
        TG_ARG(op->str, op->len[0]);
        for (size_t k = 2; k < op->n; k++) {
            TG_ARG(tg_redis_op_key(op, k), op->len[k]);
        }
    } else {
        size_t nk = batch_keys(b), kn = 0, floors = 0;
        const struct tg_rkey *kt = r->kt;
        char *packed;

        /* the module's command: TOLLGATE.CHARGE packed KEYS... (the
         * packed argument's place kept, filled below) */
        b->native = !b->eval && b->node->native;
        if (b->native) {
            TG_ARG("TOLLGATE.CHARGE", 15);
            TG_ARG(NULL, 0);
        } else if (b->eval) {
            TG_ARG("EVAL", 4);
            TG_ARG(tg_gcra_lua, r->script_len);
        } else {
            TG_ARG("EVALSHA", 7);
            TG_ARG(r->sha, 40);
        }
        if (!b->native) {
            TG_NUM(nk);
        }
        for (size_t j = 0; j < nk; j++) {
            TG_ARG(kt[j].s, kt[j].len);
        }
        for (op = b->ops; op != NULL; op = op->next) {
            for (size_t k = 0; k < op->n; k++) {
                floors |= (op->mask & (1u << k)) && op->floor_us[k] != 0;
            }
        }
        packed = np;
        TG_PACK(b->nops);
        TG_PACK(floors);
        for (op = b->ops; op != NULL; op = op->next) {
            uint64_t a[TG_GCRA_SCRIPT_ARGS];
            uint32_t kidx[TG_CHARGE_MAX_BUCKETS];
            size_t na;

            for (size_t k = 0; k < op->n; k++) {
                kidx[k] = op->mask & (1u << k) ? r->kix[kn++] : 0;
            }
            na = tg_gcra_script_args(kidx, op->floor_us, op->n, op->mask, op->cost,
                                     (int)floors, a);
            np += tg_gcra_script_pack(a, na, (unsigned char *)np);
        }
        for (size_t j = 0; j < nk; j++) {
            uint64_t a[TG_GCRA_SCRIPT_KEY_ARGS];

            np += tg_gcra_script_pack(a, tg_gcra_script_key(kt[j].lim, kt[j].alias, a),
                                      (unsigned char *)np);
        }
        if (b->native) {
            r->argv[1] = packed;
            r->argvlen[1] = (size_t)(np - packed);
        } else {
            TG_ARG(packed, (size_t)(np - packed));
        }
    }
#undef TG_PACK
#undef TG_NUM
#undef TG_ARG

    if (b->asking && redisAsyncCommand(ac, NULL, NULL, "ASKING") != REDIS_OK) {
        return TG_ERR;
    }
    len = format_resp(r, i);
    rc = redisAsyncFormattedCommand(ac, batch_reply_cb, b, r->cmd, len);
    if (rc != REDIS_OK) {
        return TG_ERR;
    }
    r->stats.calls++;
    return TG_OK;
}

/* Cluster: the node's breaker learns the outcome of this call, once. */
static void
batch_outcome(struct tg_redis_batch *b, int ok)
{
    if (!b->brk) {
        return;
    }
    b->brk = 0;
    if (ok > 0) {
        tg_breaker_success(&b->node->brk, tg_now_ms());
    } else if (ok == 0) {
        tg_breaker_failure(&b->node->brk, tg_now_ms());
    } else {
        tg_breaker_abandon(&b->node->brk, tg_now_ms());
    }
}

/* Answer every live op TG_ERR (no-op once done, or while destroying). */
void
tg_redis_batch_fail(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;

    if (b->done) {
        return;
    }
    b->done = 1;
    batch_settle(b);
    if (r->destroying) {
        return;
    }
    for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
        tg_redis_op_fail(r, op);
    }
}

void
tg_redis_batch_free(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;
    struct tg_redis_op *op, *next;

    if (b->timer_set) {
        event_del(b->timer);
    }
    batch_settle(b);
    if (!r->destroying) {
        batch_outcome(b, -1);
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
        tg_redis_op_release(r, op);
    }
    if (TG_REDIS_POOLING && r->nbatch_pool < TG_REDIS_POOL_MAX && !r->destroying) {
        b->next = r->batch_pool;         /* its timer is deleted above */
        r->batch_pool = b;
        r->nbatch_pool++;
    } else {
        free(b);
    }
}

/* Errors that mean "this is no longer the master" (Sentinel). */
static int
is_failover_error(const redisReply *rep)
{
    return strncmp(rep->str, "READONLY", 8) == 0 || strncmp(rep->str, "LOADING", 7) == 0
           || strncmp(rep->str, "MASTERDOWN", 10) == 0;
}

/* hiredis calls this exactly once per command sent: the reply, or NULL
 * when the context goes away.  The batch ends here (or is sent again:
 * NOSCRIPT, MOVED, ASK). */
static void
batch_reply_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    /* a reply answers several charges, each of which goes on to its
     * upstream or its 429: the clock is read once for all of them */
    tg_now_freeze();
    batch_reply(ac, reply, privdata);
    tg_now_thaw();
}

static void
batch_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_redis_batch *b = privdata;
    struct tg_redis *r = b->r;
    redisReply *rep = reply;

    if (b->done || rep == NULL) {
        batch_outcome(b, rep != NULL);
        if (rep != NULL && b->kind == TG_OP_CHARGE && rep->type == REDIS_REPLY_STRING) {
            deliver_charges(b, rep);    /* late: what it charged is given back */
        }
        tg_redis_batch_fail(b);          /* no-op if done */
        tg_redis_batch_free(b);
        return;
    }
    batch_outcome(b, 1);        /* the node answered */
    b->node->consec_tmo = 0;
    if (rep->type != REDIS_REPLY_ERROR) {
        tg_redis_node_good(b->node);
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        /* the same batch again, another way: the script where the module
         * went away, EVAL where the script was flushed */
        int again = 0;

        if (b->kind == TG_OP_CHARGE && b->native
            && strncmp(rep->str, "ERR unknown command", 19) == 0) {
            b->node->native = 0;
            again = 1;
        } else if (b->kind == TG_OP_CHARGE && !b->eval
                   && strncmp(rep->str, "NOSCRIPT", 8) == 0) {
            r->stats.noscript++;
            b->eval = 1;
            again = 1;
        }
        if (again) {
            if (tg_redis_batch_send(b) == TG_OK) {
                return;         /* same batch, same deadline, next reply */
            }
            tg_redis_batch_fail(b);
            tg_redis_batch_free(b);
            return;
        }
        if (r->mode == TG_MODE_CLUSTER && tg_redis_batch_redirect(b, rep)) {
            return;
        }
        if (is_failover_error(rep)) {
            tg_redis_node_warn(b->node, "redis: %s:%d: %.200s", b->node->host,
                               b->node->port, rep->str);
            if (r->mode == TG_MODE_SENTINEL) {
                tg_redis_node_kick(b->node);     /* never keep writing to a replica */
            } else if (r->mode == TG_MODE_CLUSTER) {
                tg_redis_cluster_refresh(r);
            }
        }
    }
    if (b->kind == TG_OP_CHARGE) {
        deliver_charges(b, rep);
    } else {
        deliver_hget(b, rep);
    }
    tg_redis_batch_free(b);
}

/* Arm the batch's timer for the earliest deadline of its live ops (each
 * request has one deadline for all its Redis calls); 0 if none is left. */
static int
batch_arm(struct tg_redis_batch *b, uint64_t now)
{
    uint64_t next = UINT64_MAX, us;
    struct timeval tv;

    for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
        if (op_live(op) && op->deadline_us < next) {
            next = op->deadline_us;
        }
    }
    if (next == UINT64_MAX) {
        return 0;
    }
    us = next > now ? next - now : 0;
    tv = tg_us_tv(us);
    event_add(b->timer, &tv);
    b->timer_set = 1;
    return 1;
}

static void
batch_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis_batch *b = arg;
    struct tg_redis *r = b->r;
    uint64_t now = tg_now_us();
    int later = 0;
    redisReader *rd;

    b->timer_set = 0;
    if (b->done) {
        return;
    }
    /* Ops whose deadline is still ahead (a request that came with more
     * time left) keep waiting for the reply. */
    for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
        later |= op_live(op) && op->deadline_us > now + 500;
    }
    if (later) {
        for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
            if (op_live(op) && op->deadline_us <= now + 500) {
                r->stats.timeouts++;
                tg_redis_op_fail(r, op);
            }
        }
        if (batch_arm(b, now)) {
            return;
        }
    }
    r->stats.timeouts++;
    batch_outcome(b, 0);
    tg_redis_batch_fail(b);              /* the batch waits for its reply or NULL */
    rd = b->node->ac != NULL ? b->node->ac->c.reader : NULL;
    if (rd != NULL && (rd->len > rd->pos || rd->ridx > 0)) {
        /* a reply is still arriving past a deadline: a huge or endless
         * one; the connection is not worth keeping */
        tg_redis_node_warn(b->node, "redis: %s:%d: reply still arriving at the deadline: "
                  "dropping the connection", b->node->host, b->node->port);
        b->node->consec_tmo = 0;
        tg_redis_schedule_drop(b->node);
    } else if (++b->node->consec_tmo >= TG_REDIS_MAX_CONSEC_TMO) {
        b->node->consec_tmo = 0;
        tg_redis_schedule_drop(b->node);
    }
}

/* A split request's answer from its two parts (a: phase 1, allowed; b:
 * phase 2), with the rules of tg_gcra_charge as far as two answers allow. */
static void
combine(const tg_gcra_result *a, const tg_gcra_result *b, uint32_t cost,
        tg_gcra_result *out)
{
    if (b->allowed) {
        int pick_b = b->remaining < a->remaining
                     || (b->remaining == a->remaining
                         && (b->reset_us > a->reset_us
                             || (b->reset_us == a->reset_us && b->limiting < a->limiting)));
        *out = pick_b ? *b : *a;
        out->allowed = 1;
        out->retry_us = 0;
        return;
    }
    /* denied: remaining is what was there before this request */
    *out = *b;
    if ((uint64_t)a->remaining + cost < out->remaining) {
        out->remaining = a->remaining + cost;
    }
}

/* One request's answer, the numbers p[0..1+nb) of the script's packed
 * reply, into res (tg_gcra_script_answer on the script's clock now: bucket
 * indices mapped through op->mask); 0 if it is not a valid answer (then
 * only this request fails). */
static int
charge_answer(const unsigned char *p, const struct tg_redis_op *op, uint64_t now,
              tg_gcra_result *res)
{
    long long v[1 + TG_CHARGE_MAX_BUCKETS];
    uint64_t u[1 + TG_CHARGE_MAX_BUCKETS];
    int nb = __builtin_popcount(op->mask);

    if (!tg_gcra_script_unpack(p, (size_t)(1 + nb), u)) {
        return 0;
    }
    for (int k = 0; k < 1 + nb; k++) {
        v[k] = (long long)u[k];
    }
    return tg_gcra_script_answer(v, op->lim, op->mask, op->cost, now, res);
}

/*
 * The give-backs of the charges of one reply answered too late, gathered
 * into calls of up to TG_REDIS_REFUND_MAX keys (in order: the script
 * takes them one after the other, as separate calls would).  One call
 * per late charge made a Redis that had just woken up run the refund
 * script once per request it had kept waiting.
 */
struct refund_buf {
    const char *keys[TG_REDIS_REFUND_MAX];   /* the ops' copies */
    size_t      lens[TG_REDIS_REFUND_MAX];
    uint64_t    amount[TG_REDIS_REFUND_MAX];
    uint64_t    p[TG_REDIS_REFUND_MAX];
    size_t      nk;
    unsigned    nops;                        /* charges given back by it */
};

static void
deliver_charges(struct tg_redis_batch *b, const redisReply *rep)
{
    struct tg_redis *r = b->r;
    struct tg_redis_op *op, **link, *again = NULL, **again_tail = &again;
    tg_gcra_result res, part = { 0 };   /* part.now_us is kept by charge_answer */
    struct refund_buf rb;
    uint64_t script_now = 0;
    const unsigned char *pk;
    size_t i, nb, nnum;

    if (rep->type == REDIS_REPLY_ERROR) {
        tg_redis_node_warn(b->node, "redis: charge script failed: %.200s", rep->str);
        goto fail;
    }
    nnum = tg_gcra_script_reply_len(b->nops, b->nkeys);
    if (rep->type != REDIS_REPLY_STRING || rep->len != nnum * TG_GCRA_PACKED) {
        tg_redis_node_warn(b->node, "redis: charge script reply: type %d of %zu bytes, "
                "expected a string of %zu", rep->type,
                rep->type == REDIS_REPLY_STRING ? rep->len : (size_t)0,
                nnum * TG_GCRA_PACKED);
        goto fail;
    }
    pk = (const unsigned char *)rep->str;
    if (!tg_gcra_script_unpack(pk + (nnum - 1) * TG_GCRA_PACKED, 1, &script_now)
        || script_now == 0) {
        tg_redis_node_warn(b->node, "redis: charge script reply: no clock");
        goto fail;
    }

    b->done = 1;
    batch_settle(b);
    rb.nk = 0;
    rb.nops = 0;
    /* Phase 1 parts that passed leave the batch for phase 2 (requeued
     * after the loop, so a callback's new ops keep their order). */
    for (i = 0, link = &b->ops; (op = *link) != NULL; i += 1 + nb) {
        tg_redis_charge_cb cb;
        size_t sent = (size_t)__builtin_popcount(op->mask);

        nb = sent;
        if (!charge_answer(pk + i * TG_GCRA_PACKED, op, script_now, &part)) {
            tg_redis_node_warn(b->node, "redis: charge script reply: request %zu out of "
                               "range", i);
            link = &op->next;
            tg_redis_op_fail(r, op);
            continue;
        }
        if (op->phase == 1) {
            /* each key's new TAT P = now + its debt after the charge: a
             * Cluster refund gives back at most what this request added */
            for (size_t k = 0, j = 0; k < op->n; k++) {
                if (op->mask & (1u << k)) {
                    op->p1[j++] = part.allowed ? script_now + part.held_us[k] : 0;
                }
            }
        }

        if (op->phase == 1 && part.allowed) {
            op->res1 = part;
            op->refund_due = 1;
            if (op->charge_cb != NULL) {
                op->phase = 2;
                op->mask = op->mask2;
                *link = op->next;
                op->next = NULL;
                *again_tail = op;
                again_tail = &op->next;
                continue;
            }
            op_refund(r, op);   /* cancelled meanwhile */
            link = &op->next;
            continue;
        }
        if (op->phase == 2) {
            combine(&op->res1, &part, op->cost, &res);
            for (size_t k = 0; k < op->n; k++) {
                res.held_us[k] = op->mask1 & (1u << k) ? op->res1.held_us[k]
                                                       : part.held_us[k];
            }
            if (!res.allowed || op->charge_cb == NULL) {
                /* denied, or cancelled meanwhile (nobody is served): phase
                 * 1 goes back (a request failed by its deadline already
                 * kept it, refund_due 0: the fallback decided it) */
                op_refund(r, op);
            }
            op->refund_due = 0;
        } else {
            res = part;
        }
        link = &op->next;
        cb = op->charge_cb;
        if (cb == NULL) {
            /* Answered after its deadline (or cancelled): the request was
             * decided without this charge, so give it back. */
            if (part.allowed) {
                late_refund(r, b->node, op, &part, script_now, &rb);
            }
            continue;
        }
        op->charge_cb = NULL;
        r->stats.charges++;
        res.now_us = script_now;
        cb(op->arg, TG_OK, &res);
    }
    refund_flush(r, b->node, &rb);      /* b's ops (their keys) are still here */
    while ((op = again) != NULL) {
        again = op->next;
        queue_op(r, op);
    }
    return;

fail:
    tg_redis_batch_fail(b);
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
    if (rep->type == REDIS_REPLY_STRING
        || (rep->type == REDIS_REPLY_STATUS && b->kind == TG_OP_EVAL)) {
        cb(op->arg, TG_OK, rep->str, rep->len);
    } else if (rep->type == REDIS_REPLY_NIL) {
        cb(op->arg, TG_OK, NULL, 0);
    } else {
        tg_redis_node_warn(b->node, "redis: %s answered type %d%s%.200s",
                b->kind == TG_OP_EVAL ? "EVAL" : "HGET", rep->type,
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

/* The k-th string of op. */
const char *
tg_redis_op_key(const struct tg_redis_op *op, size_t k)
{
    const char *s = op->str;

    for (size_t i = 0; i < k; i++) {
        s += op->len[i] + 1;
    }
    return s;
}

/* Answer TG_ERR once (the op is not freed here).  A charged first part
 * is kept when the requester is told: the fallback may admit it, and a
 * request admitted without any Redis charge would let the consumer past
 * its limit; it is given back only when nobody waits (cancelled). */
void
tg_redis_op_fail(struct tg_redis *r, struct tg_redis_op *op)
{
    if (op->kind == TG_OP_CHARGE) {
        tg_redis_charge_cb cb = op->charge_cb;
        if (cb == NULL) {
            op_refund(r, op);
        }
        op->refund_due = 0;
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

/*
 * Cluster: give back what phase 1 of a split request took (once).  Fire
 * and forget on the node serving that slot now: a lost refund (node down,
 * slot moving) only makes that consumer wait cost*T longer.
 */
static void
op_refund(struct tg_redis *r, struct tg_redis_op *op)
{
    const char *keys[TG_CHARGE_MAX_BUCKETS];
    size_t lens[TG_CHARGE_MAX_BUCKETS], nk = 0;
    uint64_t amount[TG_CHARGE_MAX_BUCKETS];
    struct tg_rnode *nd;

    if (op->kind != TG_OP_CHARGE || !op->refund_due) {
        return;
    }
    op->refund_due = 0;
    if (r->destroying || r->slot_node == NULL || r->slot_node[op->slot1] == 0) {
        return;
    }
    nd = r->nodes[r->slot_node[op->slot1] - 1];
    if (!tg_redis_node_usable(nd)) {
        return;
    }
    for (size_t k = 0; k < op->n; k++) {
        if (op->mask1 & (1u << k)) {
            keys[nk] = tg_redis_op_key(op, k);
            lens[nk] = op->len[k];
            amount[nk++] = (uint64_t)op->cost * op->lim[k].interval_us;
        }
    }
    refund_send(r, nd, keys, lens, amount, op->p1, nk, 1);    /* p1: in mask1 order */
}

/*
 * Give back what a charge answered too late added (tg_gcra_refund_lua):
 * for each bucket sent, at most cost*T and never more than its debt left
 * (P - now, P = the TAT this charge wrote), and only while that debt is
 * still there.  Into rb (sent by refund_flush, a charge's keys in one
 * call).  Fire and forget on the node that answered: a lost refund only
 * makes that consumer wait longer.
 */
static void
late_refund(struct tg_redis *r, struct tg_rnode *nd, const struct tg_redis_op *op,
            const tg_gcra_result *part, uint64_t script_now, struct refund_buf *rb)
{
    if (r->destroying || op->cost == 0) {
        return;
    }
    if (rb->nk + (size_t)__builtin_popcount(op->mask) > TG_REDIS_REFUND_MAX) {
        refund_flush(r, nd, rb);
    }
    for (size_t k = 0; k < op->n; k++) {
        if (op->mask & (1u << k)) {
            rb->keys[rb->nk] = tg_redis_op_key(op, k);
            rb->lens[rb->nk] = op->len[k];
            rb->amount[rb->nk] = (uint64_t)op->cost * op->lim[k].interval_us;
            rb->p[rb->nk++] = script_now + part->held_us[k];
        }
    }
    rb->nops++;
}

static void
refund_flush(struct tg_redis *r, struct tg_rnode *nd, struct refund_buf *rb)
{
    if (rb->nk > 0 && !r->destroying && tg_redis_node_usable(nd)) {
        refund_send(r, nd, rb->keys, rb->lens, rb->amount, rb->p, rb->nk, rb->nops);
    }
    rb->nk = 0;
    rb->nops = 0;
}

_Static_assert(TG_REDIS_REFUND_MAX >= TG_CHARGE_MAX_BUCKETS, "a charge's keys fit a refund");

/*
 * One call of the refund script (tg_gcra_refund_lua) on nd: keys[j]
 * (lens[j] bytes) gives back at most amount[j], never beyond p[j] - now.
 * Fire and forget, behind what is queued on that connection; nops (the
 * charges it gives back) counted in stats.refunds.  nk <=
 * TG_REDIS_REFUND_MAX, keys of one slot (Cluster).  1 if queued.
 */
static int
refund_send(struct tg_redis *r, struct tg_rnode *nd, const char *const *keys,
            const size_t *lens, const uint64_t *amount, const uint64_t *p, size_t nk,
            unsigned nops)
{
    const char *argv[3 + 3 * TG_REDIS_REFUND_MAX];
    size_t argvlen[TG_ARRAY_LEN(argv)], argc = 0, nn = 1;
    char num[1 + 2 * TG_REDIS_REFUND_MAX][TG_REDIS_NUMLEN];
    uint64_t a[2];

    argv[argc] = "EVAL";
    argvlen[argc++] = 4;
    argv[argc] = tg_gcra_refund_lua;
    argvlen[argc++] = strlen(tg_gcra_refund_lua);
    argvlen[argc] = (size_t)snprintf(num[0], sizeof(num[0]), "%zu", nk);
    argv[argc++] = num[0];
    for (size_t k = 0; k < nk; k++) {
        argv[argc] = keys[k];
        argvlen[argc++] = lens[k];
    }
    for (size_t k = 0; k < nk; k++) {
        size_t na = tg_gcra_refund_args(amount[k], p[k], a);
        for (size_t j = 0; j < na; j++) {
            argvlen[argc] = (size_t)snprintf(num[nn], sizeof(num[nn]), "%llu",
                                             (unsigned long long)a[j]);
            argv[argc++] = num[nn++];
        }
    }
    if (redisAsyncCommandArgv(nd->ac, NULL, NULL, (int)argc, argv, argvlen) != REDIS_OK) {
        return 0;
    }
    r->stats.refunds += nops;
    return 1;
}

/* One allocation: the op and copies of its n strings; from r's free list
 * when they fit in TG_REDIS_OP_POOLED bytes (every charge of the limiter:
 * at most 3 keys of at most 191 bytes). */
static struct tg_redis_op *
op_new(struct tg_redis *r, enum tg_redis_kind kind, const char *const *s, size_t n)
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
    if (total > TG_REDIS_OP_POOLED) {
        op = tg_xcalloc(1, sizeof(*op) + total);
    } else if ((op = r->op_pool) != NULL) {
        r->op_pool = op->next;
        r->nop_pool--;
        memset(op, 0, sizeof(*op));
        op->pooled = 1;
    } else {
        op = tg_xcalloc(1, sizeof(*op) + TG_REDIS_OP_POOLED);
        op->pooled = 1;
    }
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

void
tg_redis_op_release(struct tg_redis *r, struct tg_redis_op *op)
{
    if (TG_REDIS_POOLING && op->pooled && r->nop_pool < TG_REDIS_POOL_MAX
        && !r->destroying) {
        op->next = r->op_pool;
        r->op_pool = op;
        r->nop_pool++;
    } else {
        free(op);
    }
}

/*
 * Give back amount_us[i] of keys[i]'s debt (a lease's unused tokens), each
 * never more than what is still ahead of p_us[i] (the TAT the take wrote,
 * Redis clock): tg_gcra_refund_lua, one call for all n keys (Cluster: one
 * per key, each on the node serving its slot).  Fire and forget, behind
 * what is already queued on that connection; with now, the bytes are
 * written at once (shutdown: no loop turn will come).  A lost give-back
 * only leaves the bucket that much deeper in debt: under-use, never an
 * extra admission.
 */
void
tg_redis_give_back(struct tg_redis *r, const char *const *keys, const uint64_t *amount_us,
                   const uint64_t *p_us, size_t n, int now)
{
    size_t lens[TG_REDIS_GIVE_MAX], nk;
    struct tg_rnode *nd = NULL;
    size_t i = 0;

    if (r == NULL || r->destroying) {
        return;
    }
    while (i < n) {
        size_t first = i;

        if (r->mode != TG_MODE_CLUSTER) {
            nd = r->nodes[0];
            nk = n - i < TG_REDIS_GIVE_MAX ? n - i : TG_REDIS_GIVE_MAX;
        } else {
            unsigned slot = tg_redis_key_slot(keys[i], strlen(keys[i]));
            nd = r->map_ok && r->slot_node != NULL && r->slot_node[slot] != 0
                 ? r->nodes[r->slot_node[slot] - 1] : NULL;
            nk = 1;
        }
        i += nk;
        if (!tg_redis_node_usable(nd)) {
            continue;
        }
        for (size_t k = 0; k < nk; k++) {
            lens[k] = strlen(keys[first + k]);
        }
        if (refund_send(r, nd, keys + first, lens, amount_us + first, p_us + first, nk, 1)
            && now) {
            redisAsyncHandleWrite(nd->ac);
        }
    }
}
