/*
 * anomaly.c - heavy hitters per window and per-key baselines.  See
 * anomaly.h for the life of a count; docs/DESIGN-NOTES.md for the bounds.
 *
 * The sketch is Space-Saving (Metwally, Agrawal, El Abbadi 2005) in the
 * Stream-Summary layout: entries with equal counts share a bucket, the
 * buckets form a list in ascending count order, so counting one
 * occurrence moves an entry to the next bucket (or moves its bucket up)
 * in O(1).  A new key when the sketch is full takes over an entry of the
 * smallest bucket: its count becomes min + 1 and its err min.  All the
 * memory (entries, buckets, hash heads) is one block taken at creation.
 *
 * The main thread merges the workers' sketches of a window (Agarwal et
 * al., "Mergeable summaries"): a key's count is the sum of its counts,
 * plus, for every sketch that does not hold it, that sketch's floor
 * (which it may have had there), added to its err too; the largest m
 * are kept.
 */
#include "tollgate/anomaly.h"
#include "tollgate/common_ev.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/event.h>

#define NIL            UINT32_MAX
#define TICK_MS        50            /* main thread: collect the hand-overs */
#define GRACE_MS       250           /* a window closes without a late worker */
#define KEYS_PER_K     4             /* baselines kept: 4 x top_k */

/* ---- the sketch ------------------------------------------------------------ */

typedef struct sk_entry {
    uint64_t hash;
    uint64_t count;
    uint64_t err;
    uint32_t bucket;
    uint32_t prev, next;             /* in its bucket */
    uint32_t hnext;                  /* hash chain */
    char     id[TG_ANOMALY_ID_MAX + 1];
} sk_entry;

typedef struct sk_bucket {
    uint64_t count;
    uint32_t head;                   /* an entry; NIL only while free */
    uint32_t prev, next;             /* ascending count; free list: next */
} sk_bucket;

struct tg_sketch {
    uint32_t   cap, n;               /* entries: capacity, in use */
    uint32_t   hmask;                /* hash heads - 1 (power of two) */
    uint32_t   min, max;             /* buckets of the extreme counts */
    uint32_t   bfree;                /* free buckets */
    uint64_t   total;
    uint64_t   window;               /* engine: window id (now / window_ms) */
    unsigned   window_ms;            /* engine: its length */
    size_t     bytes;
    uint32_t  *heads;
    sk_entry  *e;
    sk_bucket *b;
};

static uint64_t
sk_hash(const char *id, size_t *len)
{
    uint64_t h = 1469598103934665603ull;   /* FNV-1a */
    size_t i;

    for (i = 0; id[i] != '\0' && i < TG_ANOMALY_ID_MAX; i++) {
        h = (h ^ (unsigned char)id[i]) * 1099511628211ull;
    }
    *len = i;
    return h ^ (h >> 29);
}

struct tg_sketch *
tg_sketch_create(size_t capacity)
{
    struct tg_sketch *s;
    size_t nh = 2, bytes;
    char *p;
    uint32_t i;

    capacity = capacity < 1 ? 1 : capacity;
    while (nh < capacity * 2) {
        nh <<= 1;
    }
    bytes = sizeof(*s) + nh * sizeof(uint32_t) + capacity * sizeof(sk_entry)
            + capacity * sizeof(sk_bucket);
    p = tg_xmalloc(bytes);
    s = (struct tg_sketch *)(void *)p;
    memset(s, 0, sizeof(*s));
    s->e = (sk_entry *)(void *)(p + sizeof(*s));
    s->b = (sk_bucket *)(void *)(p + sizeof(*s) + capacity * sizeof(sk_entry));
    s->heads = (uint32_t *)(void *)(p + sizeof(*s) + capacity * sizeof(sk_entry)
                                    + capacity * sizeof(sk_bucket));
    s->cap = (uint32_t)capacity;
    s->hmask = (uint32_t)(nh - 1);
    s->bytes = bytes;
    s->min = s->max = NIL;
    memset(s->heads, 0xff, nh * sizeof(uint32_t));
    for (i = 0; i < s->cap; i++) {
        s->b[i].next = i + 1 < s->cap ? i + 1 : NIL;
    }
    s->bfree = 0;
    return s;
}

void
tg_sketch_destroy(struct tg_sketch *s)
{
    free(s);
}

/* A free bucket of count c, linked after `after` (NIL: first). */
static uint32_t
sk_bucket_new(struct tg_sketch *s, uint64_t c, uint32_t after)
{
    uint32_t k = s->bfree;
    sk_bucket *b = &s->b[k];

    s->bfree = b->next;
    b->count = c;
    b->head = NIL;
    b->prev = after;
    b->next = after == NIL ? s->min : s->b[after].next;
    if (b->next != NIL) {
        s->b[b->next].prev = k;
    } else {
        s->max = k;
    }
    if (after != NIL) {
        s->b[after].next = k;
    } else {
        s->min = k;
    }
    return k;
}

static void
sk_bucket_free(struct tg_sketch *s, uint32_t k)
{
    sk_bucket *b = &s->b[k];

    if (b->prev != NIL) {
        s->b[b->prev].next = b->next;
    } else {
        s->min = b->next;
    }
    if (b->next != NIL) {
        s->b[b->next].prev = b->prev;
    } else {
        s->max = b->prev;
    }
    b->next = s->bfree;
    s->bfree = k;
}

static void
sk_attach(struct tg_sketch *s, uint32_t x, uint32_t k)
{
    sk_entry *e = &s->e[x];

    e->bucket = k;
    e->prev = NIL;
    e->next = s->b[k].head;
    if (e->next != NIL) {
        s->e[e->next].prev = x;
    }
    s->b[k].head = x;
}

static void
sk_detach(struct tg_sketch *s, uint32_t x)
{
    sk_entry *e = &s->e[x];

    if (e->prev != NIL) {
        s->e[e->prev].next = e->next;
    } else {
        s->b[e->bucket].head = e->next;
    }
    if (e->next != NIL) {
        s->e[e->next].prev = e->prev;
    }
}

/* Entry x counts one more: into the bucket of count + 1. */
static void
sk_increment(struct tg_sketch *s, uint32_t x)
{
    sk_entry *e = &s->e[x];
    uint32_t k = e->bucket, nk = s->b[k].next;
    uint64_t c = s->b[k].count + 1;

    e->count = c;
    sk_detach(s, x);
    if (nk != NIL && s->b[nk].count == c) {
        sk_attach(s, x, nk);
        if (s->b[k].head == NIL) {
            sk_bucket_free(s, k);
        }
        return;
    }
    if (s->b[k].head == NIL) {           /* alone: its bucket moves up */
        s->b[k].count = c;
        sk_attach(s, x, k);
        return;
    }
    sk_attach(s, x, sk_bucket_new(s, c, k));
}

static uint32_t
sk_find(const struct tg_sketch *s, const char *id, size_t len, uint64_t h)
{
    uint32_t x;

    for (x = s->heads[h & s->hmask]; x != NIL; x = s->e[x].hnext) {
        if (s->e[x].hash == h && strncmp(s->e[x].id, id, len) == 0
            && s->e[x].id[len] == '\0') {
            return x;
        }
    }
    return NIL;
}

static void
sk_unhash(struct tg_sketch *s, uint32_t x)
{
    uint32_t *pp = &s->heads[s->e[x].hash & s->hmask];

    while (*pp != x) {
        pp = &s->e[*pp].hnext;
    }
    *pp = s->e[x].hnext;
}

void
tg_sketch_add(struct tg_sketch *s, const char *id)
{
    size_t len;
    uint64_t h = sk_hash(id, &len);
    uint32_t x = sk_find(s, id, len, h), *head;
    sk_entry *e;

    s->total++;
    if (x != NIL) {
        sk_increment(s, x);
        return;
    }
    if (s->n < s->cap) {                 /* a free entry, count 1 */
        x = s->n++;
        e = &s->e[x];
        e->count = 1;
        e->err = 0;
        if (s->min == NIL || s->b[s->min].count != 1) {
            sk_bucket_new(s, 1, NIL);
        }
        sk_attach(s, x, s->min);
    } else {                             /* take over a smallest entry */
        x = s->b[s->min].head;
        e = &s->e[x];
        sk_unhash(s, x);
        e->err = e->count;
        sk_increment(s, x);
    }
    e->hash = h;
    memcpy(e->id, id, len);
    e->id[len] = '\0';
    head = &s->heads[h & s->hmask];
    e->hnext = *head;
    *head = x;
}

uint64_t
tg_sketch_total(const struct tg_sketch *s)
{
    return s->total;
}

size_t
tg_sketch_size(const struct tg_sketch *s)
{
    return s->n;
}

size_t
tg_sketch_bytes(const struct tg_sketch *s)
{
    return s->bytes;
}

uint64_t
tg_sketch_floor(const struct tg_sketch *s)
{
    return s->n == s->cap && s->min != NIL ? s->b[s->min].count : 0;
}

size_t
tg_sketch_top(const struct tg_sketch *s, tg_sketch_item *out, size_t k)
{
    uint32_t b, x;
    size_t n = 0;

    for (b = s->max; b != NIL && n < k; b = s->b[b].prev) {
        for (x = s->b[b].head; x != NIL && n < k; x = s->e[x].next) {
            out[n].id = s->e[x].id;
            out[n].count = s->e[x].count;
            out[n].err = s->e[x].err;
            n++;
        }
    }
    return n;
}

/* ---- baselines --------------------------------------------------------------- */

static void
learn(tg_anomaly_baseline *b, double c)
{
    if (b->nwin < TG_ANOMALY_LEARN) {
        b->mean += (c - b->mean) / (double)(b->nwin + 1);   /* plain mean */
    } else {
        /* A window counts at most TG_ANOMALY_CAP x the baseline: a spike
         * that starts mid-window (its first window under spike_factor)
         * cannot lift the baseline out of reach of the next full one. */
        double cap = TG_ANOMALY_CAP * (b->mean > 1.0 ? b->mean : 1.0);
        b->mean += TG_ANOMALY_ALPHA * ((c > cap ? cap : c) - b->mean);
    }
    if (b->nwin < UINT32_MAX) {
        b->nwin++;
    }
}

enum tg_anomaly_state
tg_anomaly_observe(tg_anomaly_baseline *b, uint64_t count, uint64_t total,
                   const tg_anomaly_params *p)
{
    double c = (double)count;
    int enough = count >= p->min_requests;
    int big = enough && c >= p->new_share * (double)total;

    if (b->nwin == 0) {                  /* its first window */
        b->mean = c;
        b->nwin = 1;
        b->state = p->warm && big ? TG_AN_NEW : TG_AN_NONE;
        return b->state;
    }
    if (b->state == TG_AN_NEW) {
        b->state = big ? TG_AN_NEW : TG_AN_NONE;
        learn(b, c);
        return b->state;
    }
    if (b->nwin >= TG_ANOMALY_LEARN && enough && c >= p->spike_factor * b->mean) {
        b->state = TG_AN_SPIKE;          /* the baseline stays as it was */
        return b->state;
    }
    b->state = TG_AN_NONE;
    learn(b, c);
    return b->state;
}

/* ---- the engine ----------------------------------------------------------------- */

/* One worker's shard.  window_ms and capacity are written by the main
 * thread and read by the worker's tick (atomics); cur is the worker's
 * own; ready moves a finished sketch from worker to main thread. */
struct tg_anomaly_shard {
    unsigned          window_ms;     /* atomic; 0 = off */
    unsigned          capacity;      /* atomic */
    struct tg_sketch *cur;           /* worker only */
    struct tg_sketch *ready;         /* atomic exchange */
    char              pad[64];       /* shards are adjacent: no false sharing */
};

typedef struct an_top {              /* one key of the last window */
    char     id[TG_ANOMALY_ID_MAX + 1];
    uint64_t count, err;
} an_top;

typedef struct an_key {              /* a tracked key and its baseline */
    char     id[TG_ANOMALY_ID_MAX + 1];
    uint64_t requests;               /* last window, guaranteed */
    int      seen;                   /* in this window's top-K */
    tg_anomaly_baseline b;
} an_key;

typedef struct an_cand {             /* merge: one candidate key */
    const char *id;
    uint64_t    hash;
    uint64_t    count, err, floors;  /* floors: of the sketches holding it */
} an_cand;

struct tg_anomaly {
    struct event_base       *base;
    struct event            *tick;
    unsigned                 nworkers;
    struct tg_anomaly_shard *shards;
    int                      enabled;
    unsigned                 window_ms, top_k;
    tg_anomaly_params        p;
    /* the window being collected */
    struct tg_sketch       **pend;   /* nworkers */
    unsigned                 npend;
    uint64_t                 pend_wid;
    uint64_t                 done_wid;   /* last finished (+1; 0 = none) */
    /* the last finished window */
    an_top                  *top;    /* TG_ANOMALY_SLOTS_K x top_k */
    size_t                   ntop;
    uint64_t                 total;
    uint64_t                 windows;    /* finished since enabled */
    /* baselines */
    an_key                  *keys;   /* KEYS_PER_K x top_k */
    size_t                   nkeys;
};

static void tick_cb(evutil_socket_t fd, short what, void *arg);
static void configure(struct tg_anomaly *an, const tg_conf *conf);
static void collect(struct tg_anomaly *an, unsigned i, struct tg_sketch *s);
static void finish_window(struct tg_anomaly *an);
static void drop_pending(struct tg_anomaly *an);
static void evaluate(struct tg_anomaly *an);
static void js(struct evbuffer *b, const char *s);

struct tg_anomaly *
tg_anomaly_create(struct event_base *base, const tg_conf *conf, unsigned nworkers)
{
    struct tg_anomaly *an = tg_xcalloc(1, sizeof(*an));

    an->base = base;
    an->nworkers = nworkers;
    an->shards = tg_xcalloc(nworkers ? nworkers : 1, sizeof(*an->shards));
    an->pend = tg_xcalloc(nworkers ? nworkers : 1, sizeof(*an->pend));
    an->tick = tg_event_new(base, -1, EV_PERSIST, tick_cb, an);
    configure(an, conf);
    return an;
}

struct tg_anomaly_shard *
tg_anomaly_shard(struct tg_anomaly *an, unsigned i)
{
    return an != NULL && i < an->nworkers ? &an->shards[i] : NULL;
}

void
tg_anomaly_reload(struct tg_anomaly *an, const tg_conf *conf)
{
    if (an != NULL) {
        configure(an, conf);
    }
}

void
tg_anomaly_destroy(struct tg_anomaly *an)
{
    unsigned i;

    if (an == NULL) {
        return;
    }
    drop_pending(an);
    for (i = 0; i < an->nworkers; i++) {
        tg_sketch_destroy(an->shards[i].cur);
        tg_sketch_destroy(an->shards[i].ready);
    }
    if (an->tick != NULL) {
        event_free(an->tick);
    }
    free(an->shards);
    free(an->pend);
    free(an->top);
    free(an->keys);
    free(an);
}

/* Parameters from conf; tells the workers (atomics), arms the tick. */
static void
configure(struct tg_anomaly *an, const tg_conf *conf)
{
    unsigned i, wms = conf->anomaly.enabled ? conf->anomaly.window_ms : 0;
    unsigned k = conf->anomaly.top_k;
    struct timeval tv = { 0, TICK_MS * 1000 };

    if (!conf->anomaly.enabled || wms != an->window_ms || k != an->top_k) {
        drop_pending(an);
        an->ntop = 0;
        an->total = 0;
    }
    if (!conf->anomaly.enabled || k != an->top_k) {
        free(an->keys);
        free(an->top);
        an->keys = NULL;
        an->top = NULL;
        an->nkeys = 0;
        an->windows = 0;
    }
    an->enabled = conf->anomaly.enabled;
    an->window_ms = wms;
    an->top_k = k;
    an->p.spike_factor = conf->anomaly.spike_factor;
    an->p.min_requests = conf->anomaly.min_requests;
    an->p.new_share = conf->anomaly.new_key_share;
    if (an->enabled && an->keys == NULL) {
        an->keys = tg_xcalloc((size_t)k * KEYS_PER_K, sizeof(*an->keys));
        an->top = tg_xcalloc((size_t)k * TG_ANOMALY_SLOTS_K, sizeof(*an->top));
    }
    for (i = 0; i < an->nworkers; i++) {
        __atomic_store_n(&an->shards[i].capacity, k * TG_ANOMALY_SLOTS_K,
                         __ATOMIC_RELAXED);
        __atomic_store_n(&an->shards[i].window_ms, wms, __ATOMIC_RELAXED);
    }
    if (an->tick == NULL) {
        return;
    }
    if (an->enabled) {
        if (!event_pending(an->tick, EV_TIMEOUT, NULL)) {
            event_add(an->tick, &tv);
        }
    } else {
        event_del(an->tick);
    }
}

/* ---- worker side ---------------------------------------------------------------- */

void
tg_anomaly_count(struct tg_anomaly_shard *sh, const char *consumer)
{
    if (sh != NULL && sh->cur != NULL && consumer != NULL && consumer[0] != '\0') {
        tg_sketch_add(sh->cur, consumer);
    }
}

void
tg_anomaly_shard_tick(struct tg_anomaly_shard *sh, uint64_t now_ms)
{
    unsigned wms, cap;
    uint64_t wid;
    struct tg_sketch *old;

    if (sh == NULL) {
        return;
    }
    wms = __atomic_load_n(&sh->window_ms, __ATOMIC_RELAXED);
    cap = __atomic_load_n(&sh->capacity, __ATOMIC_RELAXED);
    if (wms == 0) {
        tg_sketch_destroy(sh->cur);
        sh->cur = NULL;
        return;
    }
    wid = now_ms / wms;
    if (sh->cur != NULL && sh->cur->window == wid && sh->cur->window_ms == wms) {
        return;
    }
    if (sh->cur != NULL) {
        /* hand it over; one the main thread has not taken yet is lost */
        old = __atomic_exchange_n(&sh->ready, sh->cur, __ATOMIC_ACQ_REL);
        tg_sketch_destroy(old);
    }
    sh->cur = tg_sketch_create(cap);
    sh->cur->window = wid;
    sh->cur->window_ms = wms;
}

/* ---- main thread: windows ------------------------------------------------------- */

static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_anomaly *an = arg;
    struct tg_sketch *s;
    uint64_t now = tg_now_ms();
    unsigned i;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    for (i = 0; i < an->nworkers; i++) {
        s = __atomic_exchange_n(&an->shards[i].ready, NULL, __ATOMIC_ACQ_REL);
        if (s != NULL) {
            collect(an, i, s);
        }
    }
    if (an->npend > 0 && now >= (an->pend_wid + 1) * an->window_ms + GRACE_MS) {
        finish_window(an);               /* a worker is late: without it */
    }
}

/* Worker i's sketch of a finished window (ownership comes with it). */
static void
collect(struct tg_anomaly *an, unsigned i, struct tg_sketch *s)
{
    if (!an->enabled || s->window_ms != an->window_ms || s->window + 1 <= an->done_wid) {
        tg_sketch_destroy(s);            /* old parameters, or too late */
        return;
    }
    if (an->npend > 0 && s->window > an->pend_wid) {
        finish_window(an);
    }
    if (an->npend > 0 && s->window < an->pend_wid) {
        tg_sketch_destroy(s);
        return;
    }
    an->pend_wid = s->window;
    if (an->pend[i] != NULL) {
        tg_sketch_destroy(an->pend[i]);
        an->npend--;
    }
    an->pend[i] = s;
    an->npend++;
    if (an->npend == an->nworkers) {
        finish_window(an);
    }
}

static void
drop_pending(struct tg_anomaly *an)
{
    unsigned i;

    for (i = 0; i < an->nworkers; i++) {
        tg_sketch_destroy(an->pend[i]);
        an->pend[i] = NULL;
    }
    an->npend = 0;
}

static int
cand_cmp(const void *a, const void *b)
{
    const an_cand *x = a, *y = b;

    if (x->count != y->count) {
        return x->count < y->count ? 1 : -1;
    }
    return strcmp(x->id, y->id);
}

/* Merge the pending sketches into an->top (largest first), then judge. */
static void
finish_window(struct tg_anomaly *an)
{
    size_t cap = (size_t)an->top_k * TG_ANOMALY_SLOTS_K, nc = 0, ncmax = 0, nh = 2;
    uint64_t floors = 0, total = 0;
    tg_sketch_item *items;
    an_cand *cand;
    uint32_t *heads;
    unsigned i;
    size_t j, n, len;

    for (i = 0; i < an->nworkers; i++) {
        if (an->pend[i] != NULL) {
            ncmax += tg_sketch_size(an->pend[i]);
            floors += tg_sketch_floor(an->pend[i]);
            total += tg_sketch_total(an->pend[i]);
        }
    }
    while (nh < ncmax * 2) {
        nh <<= 1;
    }
    cand = tg_xcalloc(ncmax ? ncmax : 1, sizeof(*cand));
    items = tg_xcalloc(cap ? cap : 1, sizeof(*items));
    heads = tg_xmalloc(nh * sizeof(*heads));
    memset(heads, 0xff, nh * sizeof(*heads));
    for (i = 0; i < an->nworkers; i++) {
        struct tg_sketch *s = an->pend[i];
        uint64_t fl;

        if (s == NULL) {
            continue;
        }
        fl = tg_sketch_floor(s);
        n = tg_sketch_top(s, items, cap);
        for (j = 0; j < n; j++) {
            uint64_t h = sk_hash(items[j].id, &len);
            uint32_t slot = (uint32_t)(h & (nh - 1));

            while (heads[slot] != NIL && (cand[heads[slot]].hash != h
                                          || strcmp(cand[heads[slot]].id, items[j].id))) {
                slot = (uint32_t)((slot + 1) & (nh - 1));
            }
            if (heads[slot] == NIL) {
                heads[slot] = (uint32_t)nc;
                cand[nc].id = items[j].id;
                cand[nc].hash = h;
                nc++;
            }
            cand[heads[slot]].count += items[j].count;
            cand[heads[slot]].err += items[j].err;
            cand[heads[slot]].floors += fl;
        }
    }
    for (j = 0; j < nc; j++) {           /* what it may have had elsewhere */
        cand[j].count += floors - cand[j].floors;
        cand[j].err += floors - cand[j].floors;
    }
    qsort(cand, nc, sizeof(*cand), cand_cmp);
    an->ntop = nc < cap ? nc : cap;
    for (j = 0; j < an->ntop; j++) {
        snprintf(an->top[j].id, sizeof(an->top[j].id), "%s", cand[j].id);
        an->top[j].count = cand[j].count;
        an->top[j].err = cand[j].err;
    }
    an->total = total;
    an->done_wid = an->pend_wid + 1;
    free(heads);
    free(items);
    free(cand);
    drop_pending(an);
    an->windows++;
    evaluate(an);
}

static an_key *
key_find(struct tg_anomaly *an, const char *id)
{
    size_t i;

    for (i = 0; i < an->nkeys; i++) {
        if (strcmp(an->keys[i].id, id) == 0) {
            return &an->keys[i];
        }
    }
    return NULL;
}

/* A slot for a new tracked key: a free one, else the quietest key that
 * is neither unusual nor in this window's top-K; NULL if none. */
static an_key *
key_new(struct tg_anomaly *an, const char *id)
{
    an_key *k = NULL;
    size_t i;

    if (an->nkeys < (size_t)an->top_k * KEYS_PER_K) {
        k = &an->keys[an->nkeys++];
    } else {
        for (i = 0; i < an->nkeys; i++) {
            an_key *c = &an->keys[i];
            if (!c->seen && c->b.state == TG_AN_NONE
                && (k == NULL || c->b.mean < k->b.mean)) {
                k = c;
            }
        }
    }
    if (k != NULL) {
        memset(k, 0, sizeof(*k));
        snprintf(k->id, sizeof(k->id), "%s", id);
    }
    return k;
}

/* The window's top-K get (or keep) a baseline; every tracked key is
 * judged on its count in the merged window (0 when the merge does not
 * hold it: at most the floor, which is below every top-K count). */
static void
evaluate(struct tg_anomaly *an)
{
    size_t i, j, k = an->ntop < an->top_k ? an->ntop : an->top_k;
    an_key *key;

    an->p.warm = an->windows > TG_ANOMALY_LEARN;
    for (i = 0; i < an->nkeys; i++) {
        an->keys[i].seen = 0;
    }
    for (i = 0; i < k; i++) {
        key = key_find(an, an->top[i].id);
        if (key == NULL) {
            key = key_new(an, an->top[i].id);
        }
        if (key != NULL) {
            key->seen = 1;
        }
    }
    for (i = 0; i < an->nkeys; i++) {
        uint64_t c = 0;

        key = &an->keys[i];
        for (j = 0; j < an->ntop; j++) {
            if (strcmp(an->top[j].id, key->id) == 0) {
                c = an->top[j].count - an->top[j].err;
                break;
            }
        }
        key->requests = c;
        tg_anomaly_observe(&key->b, c, an->total, &an->p);
    }
    /* forget the keys that went quiet */
    for (i = 0; i < an->nkeys;) {
        key = &an->keys[i];
        if (!key->seen && key->b.state == TG_AN_NONE && key->b.mean < 1.0) {
            *key = an->keys[--an->nkeys];
        } else {
            i++;
        }
    }
}

/* ---- readers --------------------------------------------------------------------- */

size_t
tg_anomaly_foreach_hit(const struct tg_anomaly *an,
                       void (*fn)(void *arg, const tg_anomaly_hit *h), void *arg)
{
    tg_anomaly_hit h;
    size_t i, n = 0;

    if (an == NULL || !an->enabled) {
        return 0;
    }
    for (i = 0; i < an->nkeys; i++) {
        const an_key *k = &an->keys[i];

        if (k->b.state == TG_AN_NONE) {
            continue;
        }
        h.consumer = k->id;
        h.state = k->b.state;
        h.requests = k->requests;
        h.total = an->total;
        h.baseline = k->b.mean;
        h.window_ms = an->window_ms;
        h.spike_factor = an->p.spike_factor;
        fn(arg, &h);
        n++;
    }
    return n;
}

int
tg_anomaly_is_hit(const struct tg_anomaly *an, const char *consumer)
{
    size_t i;

    if (an == NULL || !an->enabled) {
        return 0;
    }
    for (i = 0; i < an->nkeys; i++) {
        if (an->keys[i].b.state != TG_AN_NONE && strcmp(an->keys[i].id, consumer) == 0) {
            return 1;
        }
    }
    return 0;
}

void
tg_anomaly_status_json(const struct tg_anomaly *an, struct evbuffer *out)
{
    static const char *const states[] = { "null", "\"spike\"", "\"new\"" };
    double secs;
    size_t i, j, k;

    if (an == NULL || !an->enabled) {
        evbuffer_add_printf(out, "{\"enabled\":false,\"top\":[]}\n");
        return;
    }
    secs = an->window_ms / 1000.0;
    k = an->ntop < an->top_k ? an->ntop : an->top_k;
    evbuffer_add_printf(out, "{\"enabled\":true,\"window_ms\":%u,\"top_k\":%u,"
                        "\"windows\":%llu,\"requests\":%llu,\"top\":[",
                        an->window_ms, an->top_k, (unsigned long long)an->windows,
                        (unsigned long long)an->total);
    for (i = 0; i < k; i++) {
        const an_top *t = &an->top[i];
        const an_key *key = NULL;

        for (j = 0; j < an->nkeys; j++) {
            if (strcmp(an->keys[j].id, t->id) == 0) {
                key = &an->keys[j];
                break;
            }
        }
        evbuffer_add_printf(out, "%s{\"consumer\":", i ? "," : "");
        js(out, t->id);
        evbuffer_add_printf(out, ",\"requests\":%llu,\"error\":%llu,"
                            "\"rate_per_s\":%.2f,", (unsigned long long)t->count,
                            (unsigned long long)t->err, (double)t->count / secs);
        if (key != NULL && key->b.nwin > 0) {
            evbuffer_add_printf(out, "\"baseline_per_s\":%.2f,\"anomaly\":%s}",
                                key->b.mean / secs, states[key->b.state]);
        } else {
            evbuffer_add_printf(out, "\"baseline_per_s\":null,\"anomaly\":null}");
        }
    }
    evbuffer_add_printf(out, "]}\n");
}

/* s as a JSON string, quotes included. */
static void
js(struct evbuffer *b, const char *s)
{
    evbuffer_add(b, "\"", 1);
    for (; *s != '\0'; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            evbuffer_add_printf(b, "\\%c", ch);
        } else if (ch < 0x20) {
            evbuffer_add_printf(b, "\\u%04x", ch);
        } else {
            evbuffer_add(b, s, 1);
        }
    }
    evbuffer_add(b, "\"", 1);
}
