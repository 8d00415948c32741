/*
 * gcra.c - token buckets as GCRA: the pure step, the in-process store and
 * the Redis script.  The C step and the Lua text must give identical
 * results for identical inputs and clock; change both or neither.
 */
#include "tollgate/gcra.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

#define GCRA_MAX_BUCKETS   8     /* buckets per request (header contract) */
#define TG_GCRA_SCRIPT_MAX 9007199254740991ULL  /* 2^53 - 1: the script's numbers */

#define LS_INLINE_KEY      48    /* keys up to this length live in the slot */
#define LS_MIN_CAP         256   /* initial slots (power of two) */
#define LS_SWEEP_SLOTS     4     /* slots examined for expiry on each insert */
#define LS_EVICT_SCAN      16    /* occupied slots examined when full */

#define LSH_STRIPES        64    /* shared store: tables, each with a lock */
#define LSH_CELLS          8     /* shared store: lock-free hot buckets */
#define LSH_BUSY           (1ULL << 63)  /* a cell's TAT held by a charge
                                            of several cells */

/*
 * One slot of the open-addressing table (linear probing, backward-shift
 * deletion, no tombstones).  64 bytes: one cache line holds the TAT, the
 * hash and, for keys up to LS_INLINE_KEY bytes, the key itself, so a hit
 * costs one line and a memcmp.  Longer keys are copied to the heap.
 */
typedef struct ls_slot {
    uint64_t tat;                 /* theoretical arrival time, us */
    uint32_t hash;                /* folded hash; home slot = hash & mask */
    uint32_t klen1;               /* key length + 1; 0 = empty slot */
    union {
        char  inl[LS_INLINE_KEY]; /* klen1 - 1 <= LS_INLINE_KEY */
        char *ext;                /* longer keys: owned heap copy */
    } k;
} ls_slot;

struct tg_lstore {
    ls_slot *slots;
    size_t   mask;                /* capacity - 1 (capacity: power of two) */
    size_t   size;                /* occupied slots */
    size_t   max_entries;         /* bound on size */
    size_t   cursor;              /* where the next sweep/eviction scan starts */
    uint64_t none_full_until;     /* a full scan found no bucket full before
                                     this time: no need to scan again */
};

/*
 * The shared store: LSH_STRIPES tables, a key's table chosen by its hash
 * tag ({...}, the Redis Cluster rule) so that one consumer's buckets share
 * one table and one lock.  A bucket every request shares (the global one)
 * would make its table's lock the one everybody waits for: the caller
 * names it "hot" and it moves to a cell, a TAT charged with a
 * compare-and-swap while the request's other buckets are held under their
 * tables' locks.  Cells are never evicted (at most LSH_CELLS of them).
 */
typedef struct lsh_stripe {
    pthread_mutex_t   mu;
    struct tg_lstore  st;         /* in line: the lock and the table header
                                     share the stripe's lines */
} __attribute__((aligned(64))) lsh_stripe;

typedef struct lsh_cell {
    uint64_t tat;                 /* atomic; LSH_BUSY while a charge of
                                     several cells holds it */
    uint32_t hash;                /* as ls_hash, folded */
    size_t   len;
    char    *key;                 /* owned copy */
} __attribute__((aligned(64))) lsh_cell;

struct tg_lshared {
    lsh_stripe      stripes[LSH_STRIPES];
    lsh_cell        cells[LSH_CELLS];
    unsigned        ncells;       /* published cells (atomic, release) */
    pthread_mutex_t cells_mu;     /* creates cells */
};

static void ls_init(struct tg_lstore *st, size_t max_entries);
static void ls_deinit(struct tg_lstore *st);
static uint64_t ls_hash(const char *key, size_t *len);
static const char *ls_key(const ls_slot *s);
static long ls_find(const struct tg_lstore *st, const char *key, size_t len,
                    uint32_t h);
static void ls_insert(struct tg_lstore *st, const char *key, size_t len,
                      uint32_t h, uint64_t tat, uint64_t now_us,
                      const uint32_t *protect, size_t nprotect);
static void ls_store_back(struct tg_lstore *const *tab, const char *const *keys,
                          const size_t *len, const uint32_t *h, long *at,
                          const uint64_t *tat, size_t n, uint64_t now_us);
static void ls_delete(struct tg_lstore *st, size_t i);
static void ls_grow(struct tg_lstore *st);
static int ls_protected(uint32_t h, const uint32_t *protect, size_t nprotect);
static void ls_sweep(struct tg_lstore *st, uint64_t now_us,
                     const uint32_t *protect, size_t nprotect);
static void ls_evict(struct tg_lstore *st, uint64_t now_us,
                     const uint32_t *protect, size_t nprotect);

/* ---- limits ----------------------------------------------------------- */

/* T = ceil(60e6 / rpm): rounding up can only make the bucket stricter. */
tg_gcra_limit
tg_gcra_per_minute(uint32_t requests_per_minute, uint32_t burst)
{
    tg_gcra_limit l;
    uint64_t rpm = requests_per_minute ? requests_per_minute : 1;

    l.interval_us = (60000000u + rpm - 1) / rpm;
    l.burst = burst ? burst : 1;
    return l;
}

tg_gcra_limit
tg_gcra_per_second(uint32_t requests_per_second, uint32_t burst)
{
    tg_gcra_limit l;
    uint64_t rps = requests_per_second ? requests_per_second : 1;

    l.interval_us = (1000000u + rps - 1) / rps;
    l.burst = burst ? burst : 1;
    return l;
}

tg_gcra_limit
tg_gcra_share(tg_gcra_limit l, unsigned instances, uint32_t max_cost)
{
    tg_gcra_limit s;
    uint32_t k = instances ? instances : 1;
    uint32_t floor = max_cost < l.burst ? max_cost : l.burst;

    s.interval_us = l.interval_us * k;
    s.burst = l.burst / k > floor ? l.burst / k : floor;
    if (s.burst == 0) {
        s.burst = 1;
    }
    return s;
}

/* ---- the pure step ---------------------------------------------------- */

/*
 * Per bucket: held = max(TAT, now) - now (time until full, now), d = held +
 * cost*T (the same after this request), L = burst*T.  The bucket admits
 * the request iff d <= L.  Tie-breaks (mirrored in the Lua text):
 *   allowed: tightest = smallest remaining after; then larger d; then
 *            lower index.
 *   denied:  limiting = largest d - L; then lower index.  remaining = the
 *            smallest token count over all buckets without this request.
 */
void
tg_gcra_charge(const tg_gcra_limit *lim, uint64_t *tat, uint64_t *ttl_us,
               size_t n, uint32_t cost, uint64_t now_us, tg_gcra_result *res)
{
    uint64_t held[GCRA_MAX_BUCKETS], d[GCRA_MAX_BUCKETS];
    uint32_t arem = UINT32_MAX, drem = UINT32_MAX;
    uint64_t areset = 0, retry = 0, dreset = 0;
    int aidx = -1, didx = -1, ok = 1;
    size_t i;

    res->now_us = 0;
    if (n > GCRA_MAX_BUCKETS) {
        tg_error("gcra: %zu buckets in one request (max %d): denied",
                 n, GCRA_MAX_BUCKETS);
        res->allowed = 0;
        res->remaining = 0;
        res->retry_us = 0;
        res->reset_us = 0;
        res->limiting = -1;
        return;
    }

    for (i = 0; i < n; i++) {
        uint64_t t = lim[i].interval_us;
        uint64_t l = (uint64_t)lim[i].burst * t;
        uint32_t rem;

        held[i] = tat[i] > now_us ? tat[i] - now_us : 0;
        d[i] = held[i] + (uint64_t)cost * t;

        /* Tokens available now; a TAT beyond L (burst lowered by a reload)
         * just means none. */
        rem = held[i] < l ? (uint32_t)((l - held[i]) / t) : 0;
        if (rem < drem) {
            drem = rem;
        }

        if (d[i] > l) {
            ok = 0;
            if (d[i] - l > retry) {
                retry = d[i] - l;
                dreset = held[i];
                didx = (int)i;
            }
        } else {
            rem = (uint32_t)((l - d[i]) / t);
            if (aidx < 0 || rem < arem || (rem == arem && d[i] > areset)) {
                arem = rem;
                areset = d[i];
                aidx = (int)i;
            }
        }
    }

    if (ok) {
        for (i = 0; i < n; i++) {
            tat[i] = now_us + d[i];
            res->held_us[i] = d[i];
            if (ttl_us != NULL) {
                ttl_us[i] = d[i];
            }
        }
        res->allowed = 1;
        res->remaining = arem;
        res->retry_us = 0;
        res->reset_us = areset;
        res->limiting = aidx;
    } else {
        for (i = 0; i < n; i++) {
            res->held_us[i] = held[i];
            if (ttl_us != NULL) {
                ttl_us[i] = held[i];
            }
        }
        res->allowed = 0;
        res->remaining = drem;
        res->retry_us = retry;
        res->reset_us = dreset;
        res->limiting = didx;
    }
}

/* ---- in-process store ------------------------------------------------- */

struct tg_lstore *
tg_lstore_create(size_t max_entries)
{
    struct tg_lstore *st = tg_xmalloc(sizeof(*st));

    ls_init(st, max_entries);
    return st;
}

void
tg_lstore_destroy(struct tg_lstore *st)
{
    if (st == NULL) {
        return;
    }
    ls_deinit(st);
    free(st);
}

/*
 * Look every key up, run the pure step on copies of the TATs, and write
 * back only if allowed (a bucket left full by cost 0 is not stored): found
 * keys in place first (their slots are still
 * where the lookup saw them), then the missing ones, whose insertion may
 * sweep, evict or grow - never evicting a key of this request.  A denied
 * request for a new key stores nothing.
 */
void
tg_lstore_charge(struct tg_lstore *st, const char *const *keys,
                 const tg_gcra_limit *lim, size_t n, uint32_t cost,
                 uint64_t now_us, tg_gcra_result *res)
{
    struct tg_lstore *tab[GCRA_MAX_BUCKETS];
    uint64_t tat[GCRA_MAX_BUCKETS];
    uint32_t h[GCRA_MAX_BUCKETS];
    size_t len[GCRA_MAX_BUCKETS];
    long at[GCRA_MAX_BUCKETS];
    size_t i;

    if (n > GCRA_MAX_BUCKETS) {
        tg_gcra_charge(lim, tat, NULL, n, cost, now_us, res); /* denies */
        return;
    }
    for (i = 0; i < n; i++) {
        uint64_t h64 = ls_hash(keys[i], &len[i]);
        h[i] = (uint32_t)(h64 ^ (h64 >> 32));
        at[i] = ls_find(st, keys[i], len[i], h[i]);
        tat[i] = at[i] >= 0 ? st->slots[at[i]].tat : 0;
    }

    tg_gcra_charge(lim, tat, NULL, n, cost, now_us, res);
    if (!res->allowed) {
        return;
    }
    for (i = 0; i < n; i++) {
        tab[i] = st;
    }
    ls_store_back(tab, keys, len, h, at, tat, n, now_us);
}

/* key (len, folded hash h) up to tat; a missing key is inserted only if
 * tat is in the future (else it is full: as absent). */
static void
ls_raise(struct tg_lstore *st, const char *key, size_t len, uint32_t h, uint64_t tat,
         uint64_t now_us)
{
    long at = ls_find(st, key, len, h);

    if (at >= 0) {
        if (st->slots[at].tat < tat) {
            st->slots[at].tat = tat;
        }
    } else if (tat > now_us) {
        ls_insert(st, key, len, h, tat, now_us, &h, 1);
    }
}

void
tg_lstore_raise(struct tg_lstore *st, const char *key, uint64_t tat, uint64_t now_us)
{
    size_t len;
    uint64_t h64 = ls_hash(key, &len);

    ls_raise(st, key, len, (uint32_t)(h64 ^ (h64 >> 32)), tat, now_us);
}

uint64_t
tg_lstore_held(const struct tg_lstore *st, const char *key, uint64_t now_us)
{
    size_t len;
    uint64_t h64 = ls_hash(key, &len);
    long at = ls_find(st, key, len, (uint32_t)(h64 ^ (h64 >> 32)));

    return at >= 0 && st->slots[at].tat > now_us ? st->slots[at].tat - now_us : 0;
}

size_t
tg_lstore_size(const struct tg_lstore *st)
{
    return st->size;
}

/*
 * Worst case per bucket of a full store: a 64-byte slot (keys up to 48
 * bytes inline) in a power-of-two table kept at most 3/4 full, so a full
 * store sits at a load between 3/8 and 3/4: 86..171 bytes a bucket, this
 * returns the bound.  Keys longer than 48 bytes add one malloc'd copy
 * (len + 8..16 bytes).
 */
size_t
tg_lstore_entry_bytes(void)
{
    return (sizeof(ls_slot) * 8 + 2) / 3;
}

/* ---- shared store ----------------------------------------------------- */

static unsigned lsh_stripe_of(const char *key, size_t len);
static int lsh_cell_find(struct tg_lshared *sh, const char *key, size_t len,
                         uint32_t h);
static int lsh_cell_make(struct tg_lshared *sh, struct tg_lstore *st,
                         const char *key, size_t len, uint32_t h);
static uint64_t lsh_cell_load(lsh_cell *c);

struct tg_lshared *
tg_lshared_create(size_t max_entries)
{
    struct tg_lshared *sh;
    size_t share, i;

    if (posix_memalign((void **)&sh, 64, sizeof(*sh)) != 0) {
        tg_error("out of memory (%zu bytes)", sizeof(*sh));  /* the policy */
        abort();                                              /* of common.h */
    }
    memset(sh, 0, sizeof(*sh));
    /* Each table holds at most 5/4 of its share: hashing is not perfectly
     * even, and a table's slots are a power of two anyway - for 2^20
     * buckets, 64 tables of at most 20,480 need 2^15 slots each, the
     * 2^21 slots (128 MiB) one table of 2^20 needs.  No count is shared
     * between tables (it would be one more cache line every worker
     * writes). */
    share = (max_entries + LSH_STRIPES - 1) / LSH_STRIPES;
    for (i = 0; i < LSH_STRIPES; i++) {
        pthread_mutex_init(&sh->stripes[i].mu, NULL);
        ls_init(&sh->stripes[i].st, share + share / 4);
    }
    pthread_mutex_init(&sh->cells_mu, NULL);
    return sh;
}

void
tg_lshared_destroy(struct tg_lshared *sh)
{
    size_t i;

    if (sh == NULL) {
        return;
    }
    for (i = 0; i < LSH_STRIPES; i++) {
        ls_deinit(&sh->stripes[i].st);
        pthread_mutex_destroy(&sh->stripes[i].mu);
    }
    for (i = 0; i < sh->ncells; i++) {
        free(sh->cells[i].key);
    }
    pthread_mutex_destroy(&sh->cells_mu);
    free(sh);
}

/*
 * As tg_lstore_charge, from any thread.  The tables of the request's
 * buckets are locked in index order (no deadlock), then every cell bucket
 * is read; the charge is decided on that snapshot and written with one
 * compare-and-swap of the single cell (retried on a change: the decision
 * is taken again on the new value), or, with several cells, under their
 * LSH_BUSY bits (taken in cell order).  While the tables are locked only
 * the cells move, so the request is atomic: it takes effect at its
 * successful CAS (denied: at its read), as if the whole store were
 * locked.
 */
void
tg_lshared_charge(struct tg_lshared *sh, const char *const *keys,
                  const tg_gcra_limit *lim, size_t n, uint32_t cost, int hot,
                  uint64_t now_us, tg_gcra_result *res)
{
    struct tg_lstore *tab[GCRA_MAX_BUCKETS];
    uint64_t tat[GCRA_MAX_BUCKETS], seen[LSH_CELLS];
    uint32_t h[GCRA_MAX_BUCKETS];
    size_t len[GCRA_MAX_BUCKETS];
    long at[GCRA_MAX_BUCKETS];
    int cell[GCRA_MAX_BUCKETS];
    unsigned stripe[GCRA_MAX_BUCKETS], locked[GCRA_MAX_BUCKETS], cmask = 0;
    size_t i, j, nlocked = 0, ncell = 0;
    unsigned seen_cells;
    int one = -1, recheck;

    if (n > GCRA_MAX_BUCKETS) {
        tg_gcra_charge(lim, tat, NULL, n, cost, now_us, res); /* denies */
        return;
    }

    /* Cells are never removed: a key found among them stays there. */
    seen_cells = __atomic_load_n(&sh->ncells, __ATOMIC_ACQUIRE);
    for (i = 0; i < n; i++) {
        uint64_t h64 = ls_hash(keys[i], &len[i]);
        h[i] = (uint32_t)(h64 ^ (h64 >> 32));
        cell[i] = lsh_cell_find(sh, keys[i], len[i], h[i]);
        stripe[i] = lsh_stripe_of(keys[i], len[i]);
        if (cell[i] < 0) {
            for (j = 0; j < nlocked && locked[j] != stripe[i]; j++) {
            }
            if (j == nlocked) {
                locked[nlocked++] = stripe[i];
            }
        }
    }
    for (i = 1; i < nlocked; i++) {           /* insertion sort, <= 8 */
        unsigned v = locked[i];
        for (j = i; j > 0 && locked[j - 1] > v; j--) {
            locked[j] = locked[j - 1];
        }
        locked[j] = v;
    }
    for (i = 0; i < nlocked; i++) {
        pthread_mutex_lock(&sh->stripes[locked[i]].mu);
    }

    /* Under the locks: a cell made since the look above moved its key out
     * of a table we now hold; the hot bucket becomes a cell if there is
     * room (its debt moves with it). */
    recheck = __atomic_load_n(&sh->ncells, __ATOMIC_ACQUIRE) != seen_cells;
    for (i = 0; i < n; i++) {
        struct tg_lstore *st = &sh->stripes[stripe[i]].st;
        if (cell[i] < 0 && recheck) {
            cell[i] = lsh_cell_find(sh, keys[i], len[i], h[i]);
        }
        if (cell[i] < 0 && (int)i == hot) {
            cell[i] = lsh_cell_make(sh, st, keys[i], len[i], h[i]);
        }
        if (cell[i] >= 0) {
            tab[i] = NULL;
            at[i] = -1;
            if (!(cmask & (1u << cell[i]))) {
                cmask |= 1u << cell[i];
                ncell++;
                one = cell[i];
            }
        } else {
            tab[i] = st;
        }
    }
    for (i = 0; i < n; i++) {
        if (tab[i] != NULL) {
            at[i] = ls_find(tab[i], keys[i], len[i], h[i]);
            tat[i] = at[i] >= 0 ? tab[i]->slots[at[i]].tat : 0;
        }
    }

    if (ncell <= 1) {
        uint64_t c = 0, want;
        for (;;) {
            if (ncell == 1) {
                c = lsh_cell_load(&sh->cells[one]);
                for (i = 0; i < n; i++) {
                    if (cell[i] == one) {
                        tat[i] = c;
                    }
                }
            }
            tg_gcra_charge(lim, tat, NULL, n, cost, now_us, res);
            if (!res->allowed || ncell == 0) {
                break;
            }
            for (i = 0, want = c; i < n; i++) {   /* the last copy wins, */
                if (cell[i] == one) {             /* as in a table */
                    want = tat[i];
                }
            }
            if (__atomic_compare_exchange_n(&sh->cells[one].tat, &c, want, 0,
                                            __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
                break;
            }
            for (i = 0; i < n; i++) {             /* undo the step's */
                if (tab[i] != NULL) {             /* in-place update */
                    tat[i] = at[i] >= 0 ? tab[i]->slots[at[i]].tat : 0;
                }
            }
        }
    } else {
        for (j = 0; j < LSH_CELLS; j++) {         /* take in cell order */
            uint64_t v;
            if (!(cmask & (1u << j))) {
                continue;
            }
            for (;;) {
                v = lsh_cell_load(&sh->cells[j]);
                if (__atomic_compare_exchange_n(&sh->cells[j].tat, &v, v | LSH_BUSY,
                                                0, __ATOMIC_ACQUIRE,
                                                __ATOMIC_RELAXED)) {
                    break;
                }
            }
            seen[j] = v;
        }
        for (i = 0; i < n; i++) {
            if (cell[i] >= 0) {
                tat[i] = seen[cell[i]];
            }
        }
        tg_gcra_charge(lim, tat, NULL, n, cost, now_us, res);
        if (res->allowed) {
            for (i = 0; i < n; i++) {
                if (cell[i] >= 0) {
                    seen[cell[i]] = tat[i];
                }
            }
        }
        for (j = 0; j < LSH_CELLS; j++) {
            if (cmask & (1u << j)) {
                __atomic_store_n(&sh->cells[j].tat, seen[j], __ATOMIC_RELEASE);
            }
        }
    }

    if (res->allowed) {
        ls_store_back(tab, keys, len, h, at, tat, n, now_us);
    }
    for (i = nlocked; i > 0; i--) {
        pthread_mutex_unlock(&sh->stripes[locked[i - 1]].mu);
    }
}

void
tg_lshared_raise(struct tg_lshared *sh, const char *key, uint64_t tat,
                 uint64_t now_us)
{
    size_t len;
    uint64_t h64 = ls_hash(key, &len);
    uint32_t h = (uint32_t)(h64 ^ (h64 >> 32));
    int c = lsh_cell_find(sh, key, len, h);
    lsh_stripe *sp;

    if (c < 0) {
        sp = &sh->stripes[lsh_stripe_of(key, len)];
        pthread_mutex_lock(&sp->mu);
        c = lsh_cell_find(sh, key, len, h);
        if (c < 0) {
            tg_lstore_raise(&sp->st, key, tat, now_us);
        }
        pthread_mutex_unlock(&sp->mu);
        if (c < 0) {
            return;
        }
    }
    for (;;) {
        uint64_t v = lsh_cell_load(&sh->cells[c]);
        if (v >= tat || __atomic_compare_exchange_n(&sh->cells[c].tat, &v, tat, 0,
                                                    __ATOMIC_ACQ_REL,
                                                    __ATOMIC_RELAXED)) {
            return;
        }
    }
}

/* A cell's TAT up to tat (never down). */
static void
lsh_cell_raise(lsh_cell *c, uint64_t tat)
{
    for (;;) {
        uint64_t v = lsh_cell_load(c);
        if (v >= tat || __atomic_compare_exchange_n(&c->tat, &v, tat, 0,
                                                    __ATOMIC_ACQ_REL,
                                                    __ATOMIC_RELAXED)) {
            return;
        }
    }
}

/*
 * As tg_lshared_raise per key, grouped by table: the keys of a table are
 * raised under one hold of its lock (one table at a time: no lock order
 * needed), the cells by compare-and-swap.  A key that became a cell since
 * the look without the lock is found again under it, as in
 * tg_lshared_raise.
 */
void
tg_lshared_raise_n(struct tg_lshared *sh, const char *const *keys,
                   const uint64_t *tat, size_t n, uint64_t now_us)
{
    size_t len[GCRA_MAX_BUCKETS], i, j;
    uint32_t h[GCRA_MAX_BUCKETS];
    unsigned stripe[GCRA_MAX_BUCKETS];
    int cell[GCRA_MAX_BUCKETS], done[GCRA_MAX_BUCKETS];

    if (n > GCRA_MAX_BUCKETS) {
        n = GCRA_MAX_BUCKETS;            /* the limiter never has more */
    }
    for (i = 0; i < n; i++) {
        uint64_t h64 = ls_hash(keys[i], &len[i]);
        h[i] = (uint32_t)(h64 ^ (h64 >> 32));
        cell[i] = tat[i] != 0 ? lsh_cell_find(sh, keys[i], len[i], h[i]) : -1;
        stripe[i] = lsh_stripe_of(keys[i], len[i]);
        done[i] = tat[i] == 0 || cell[i] >= 0;
    }
    for (i = 0; i < n; i++) {
        lsh_stripe *sp;
        if (done[i]) {
            continue;
        }
        sp = &sh->stripes[stripe[i]];
        pthread_mutex_lock(&sp->mu);
        for (j = i; j < n; j++) {
            if (done[j] || stripe[j] != stripe[i]) {
                continue;
            }
            done[j] = 1;
            cell[j] = lsh_cell_find(sh, keys[j], len[j], h[j]);
            if (cell[j] < 0) {
                ls_raise(&sp->st, keys[j], len[j], h[j], tat[j], now_us);
            }
        }
        pthread_mutex_unlock(&sp->mu);
    }
    for (i = 0; i < n; i++) {
        if (tat[i] != 0 && cell[i] >= 0) {
            lsh_cell_raise(&sh->cells[cell[i]], tat[i]);
        }
    }
}

uint64_t
tg_lshared_held(struct tg_lshared *sh, const char *key, uint64_t now_us)
{
    size_t len;
    uint64_t h64 = ls_hash(key, &len), v;
    uint32_t h = (uint32_t)(h64 ^ (h64 >> 32));
    int c = lsh_cell_find(sh, key, len, h);
    lsh_stripe *sp;

    if (c < 0) {
        sp = &sh->stripes[lsh_stripe_of(key, len)];
        pthread_mutex_lock(&sp->mu);
        c = lsh_cell_find(sh, key, len, h);
        v = c < 0 ? tg_lstore_held(&sp->st, key, now_us) : 0;
        pthread_mutex_unlock(&sp->mu);
        if (c < 0) {
            return v;
        }
    }
    v = lsh_cell_load(&sh->cells[c]);
    return v > now_us ? v - now_us : 0;
}

size_t
tg_lshared_size(struct tg_lshared *sh)
{
    size_t n = __atomic_load_n(&sh->ncells, __ATOMIC_ACQUIRE), i;

    for (i = 0; i < LSH_STRIPES; i++) {
        pthread_mutex_lock(&sh->stripes[i].mu);
        n += sh->stripes[i].st.size;
        pthread_mutex_unlock(&sh->stripes[i].mu);
    }
    return n;
}

/* The table of a key: by its hash tag - the bytes between the first '{'
 * and the next '}' when not empty (Redis Cluster's rule) - else by the
 * whole key. */
static unsigned
lsh_stripe_of(const char *key, size_t len)
{
    const char *o = memchr(key, '{', len), *c;
    const unsigned char *p, *e;
    uint64_t x = 0xcbf29ce484222325ULL;

    p = (const unsigned char *)key;
    e = p + len;
    if (o != NULL && (c = memchr(o + 1, '}', (size_t)(key + len - o - 1))) != NULL
        && c > o + 1) {
        p = (const unsigned char *)o + 1;
        e = (const unsigned char *)c;
    }
    while (p < e) {
        x ^= *p++;
        x *= 0x100000001b3ULL;
    }
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (unsigned)(x & (LSH_STRIPES - 1));
}

static int
lsh_cell_find(struct tg_lshared *sh, const char *key, size_t len, uint32_t h)
{
    unsigned n = __atomic_load_n(&sh->ncells, __ATOMIC_ACQUIRE), i;

    for (i = 0; i < n; i++) {
        if (sh->cells[i].hash == h && sh->cells[i].len == len
            && memcmp(sh->cells[i].key, key, len) == 0) {
            return (int)i;
        }
    }
    return -1;
}

/* Make key a cell, moving its bucket out of st (whose lock the caller
 * holds: nobody else can be reading it there); -1 when all cells are
 * taken (the key stays in its table). */
static int
lsh_cell_make(struct tg_lshared *sh, struct tg_lstore *st, const char *key,
              size_t len, uint32_t h)
{
    unsigned n;
    long at;
    lsh_cell *c;

    pthread_mutex_lock(&sh->cells_mu);
    n = sh->ncells;
    if (n == LSH_CELLS) {
        pthread_mutex_unlock(&sh->cells_mu);
        return -1;
    }
    c = &sh->cells[n];
    at = ls_find(st, key, len, h);
    c->tat = at >= 0 ? st->slots[at].tat : 0;
    if (at >= 0) {
        ls_delete(st, (size_t)at);
    }
    c->hash = h;
    c->len = len;
    c->key = tg_xmalloc(len + 1);
    memcpy(c->key, key, len + 1);
    __atomic_store_n(&sh->ncells, n + 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&sh->cells_mu);
    return (int)n;
}

/* A cell's TAT, waiting out a charge of several cells that holds it. */
static uint64_t
lsh_cell_load(lsh_cell *c)
{
    uint64_t v;

    while ((v = __atomic_load_n(&c->tat, __ATOMIC_ACQUIRE)) & LSH_BUSY) {
        sched_yield();
    }
    return v;
}

/* ---- store internals -------------------------------------------------- */

static void
ls_init(struct tg_lstore *st, size_t max_entries)
{
    memset(st, 0, sizeof(*st));
    /* A request may bring GCRA_MAX_BUCKETS new keys while protecting its
     * own; below that the bound could not be kept. */
    st->max_entries = max_entries < GCRA_MAX_BUCKETS * 2
                      ? GCRA_MAX_BUCKETS * 2 : max_entries;
    st->slots = tg_xcalloc(LS_MIN_CAP, sizeof(ls_slot));
    st->mask = LS_MIN_CAP - 1;
}

static void
ls_deinit(struct tg_lstore *st)
{
    size_t i;

    for (i = 0; i <= st->mask; i++) {
        if (st->slots[i].klen1 > LS_INLINE_KEY + 1) {
            free(st->slots[i].k.ext);
        }
    }
    free(st->slots);
}

/* FNV-1a over the key (computing its length on the way), then the
 * murmur3 finalizer so the low bits used for the home slot are mixed. */
static uint64_t
ls_hash(const char *key, size_t *len)
{
    const unsigned char *p = (const unsigned char *)key;
    uint64_t h = 0xcbf29ce484222325ULL;

    while (*p != '\0') {
        h ^= *p++;
        h *= 0x100000001b3ULL;
    }
    *len = (size_t)(p - (const unsigned char *)key);
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static const char *
ls_key(const ls_slot *s)
{
    return s->klen1 > LS_INLINE_KEY + 1 ? s->k.ext : s->k.inl;
}

/* Index of key's slot, or -1. */
static long
ls_find(const struct tg_lstore *st, const char *key, size_t len, uint32_t h)
{
    size_t i = h & st->mask;

    for (;;) {
        const ls_slot *s = &st->slots[i];
        if (s->klen1 == 0) {
            return -1;
        }
        if (s->hash == h && s->klen1 == len + 1
            && memcmp(ls_key(s), key, len) == 0) {
            return (long)i;
        }
        i = (i + 1) & st->mask;
    }
}

/* Insert a key known to be absent, keeping size <= max_entries and the
 * load factor <= 3/4.  protect[] are hashes of keys that must survive. */
static void
ls_insert(struct tg_lstore *st, const char *key, size_t len, uint32_t h,
          uint64_t tat, uint64_t now_us, const uint32_t *protect,
          size_t nprotect)
{
    ls_slot *s;
    size_t i;

    ls_sweep(st, now_us, protect, nprotect);
    if (st->size >= st->max_entries) {
        ls_evict(st, now_us, protect, nprotect);
    }
    if ((st->size + 1) * 4 > (st->mask + 1) * 3) {
        ls_grow(st);
    }

    i = h & st->mask;
    while (st->slots[i].klen1 != 0) {
        i = (i + 1) & st->mask;
    }
    s = &st->slots[i];
    s->tat = tat;
    s->hash = h;
    s->klen1 = (uint32_t)len + 1;
    if (len <= LS_INLINE_KEY) {
        memcpy(s->k.inl, key, len);
    } else {
        s->k.ext = tg_xmalloc(len);
        memcpy(s->k.ext, key, len);
    }
    st->size++;
}

/*
 * Write back the TATs of an allowed charge: key i lives in table tab[i]
 * (NULL: not in a table - a cell of the shared store) at slot at[i] (-1:
 * missing).  Found keys first, in place (their slots are still where the
 * lookup saw them), then the missing ones, whose insertion may sweep,
 * evict or grow - never evicting a key of this request (protected by
 * hash).  A bucket left full (cost 0) is not stored.
 */
static void
ls_store_back(struct tg_lstore *const *tab, const char *const *keys,
              const size_t *len, const uint32_t *h, long *at,
              const uint64_t *tat, size_t n, uint64_t now_us)
{
    size_t i, missing = 0;

    for (i = 0; i < n; i++) {
        if (tab[i] == NULL) {
            continue;
        }
        if (at[i] >= 0) {
            tab[i]->slots[at[i]].tat = tat[i];
        } else if (tat[i] > now_us) {
            missing++;
        } else {
            at[i] = 0;          /* cost 0 on a full bucket: keep nothing */
        }
    }
    if (missing == 0) {
        return;
    }
    for (i = 0; i < n; i++) {
        if (tab[i] != NULL && at[i] < 0) {
            /* Look again: the same key may appear twice in one request. */
            long j = ls_find(tab[i], keys[i], len[i], h[i]);
            if (j >= 0) {
                tab[i]->slots[j].tat = tat[i];
            } else {
                ls_insert(tab[i], keys[i], len[i], h[i], tat[i], now_us, h, n);
            }
        }
    }
}

/* Empty slot i and shift the rest of its cluster back so that every key
 * stays reachable from its home slot without tombstones. */
static void
ls_delete(struct tg_lstore *st, size_t i)
{
    size_t j = i, home;

    if (st->slots[i].klen1 > LS_INLINE_KEY + 1) {
        free(st->slots[i].k.ext);
    }
    for (;;) {
        j = (j + 1) & st->mask;
        if (st->slots[j].klen1 == 0) {
            break;
        }
        home = st->slots[j].hash & st->mask;
        /* The entry at j may move to the hole at i unless its home lies
         * cyclically in (i, j]. */
        if (i <= j ? (i < home && home <= j) : (i < home || home <= j)) {
            continue;
        }
        st->slots[i] = st->slots[j];
        i = j;
    }
    memset(&st->slots[i], 0, sizeof(ls_slot));
    st->size--;
}

static void
ls_grow(struct tg_lstore *st)
{
    size_t old_cap = st->mask + 1, i, j;
    ls_slot *old = st->slots;

    st->slots = tg_xcalloc(old_cap * 2, sizeof(ls_slot));
    st->mask = old_cap * 2 - 1;
    for (i = 0; i < old_cap; i++) {
        if (old[i].klen1 == 0) {
            continue;
        }
        j = old[i].hash & st->mask;
        while (st->slots[j].klen1 != 0) {
            j = (j + 1) & st->mask;
        }
        st->slots[j] = old[i];  /* the key moves with its slot */
    }
    st->cursor &= st->mask;
    free(old);
}

static int
ls_protected(uint32_t h, const uint32_t *protect, size_t nprotect)
{
    size_t i;

    for (i = 0; i < nprotect; i++) {
        if (protect[i] == h) {
            return 1;
        }
    }
    return 0;
}

/* Drop expired buckets (TAT <= now: full, equivalent to absent) among a
 * few slots at the cursor.  Deleting shifts later entries into the hole,
 * so a deleted slot is examined again. */
static void
ls_sweep(struct tg_lstore *st, uint64_t now_us, const uint32_t *protect,
         size_t nprotect)
{
    size_t pos = st->cursor, k;

    for (k = 0; k < LS_SWEEP_SLOTS; k++) {
        ls_slot *s = &st->slots[pos];
        if (s->klen1 != 0 && s->tat <= now_us
            && !ls_protected(s->hash, protect, nprotect)) {
            ls_delete(st, pos);
            continue;
        }
        pos = (pos + 1) & st->mask;
    }
    st->cursor = pos;
}

/*
 * The table is full: examine up to LS_EVICT_SCAN occupied slots from the
 * cursor, dropping every expired bucket; if none was expired, scan the
 * whole table for full buckets (a bucket not yet full is never dropped
 * while a full one exists: forgetting its debt would admit extra
 * requests); only when none is full, drop the one with the smallest TAT
 * (closest to full).  A scan that finds no full bucket remembers the
 * earliest TAT it saw: no whole scan again before then, so a store full
 * of live buckets costs one scan per expiry, not one per insert.  If
 * every candidate is protected (hash collisions only) the table exceeds
 * its bound by one.
 */
static void
ls_evict(struct tg_lstore *st, uint64_t now_us, const uint32_t *protect,
         size_t nprotect)
{
    size_t pos = st->cursor, visited = 0, seen = 0, dropped = 0;
    long best = -1;

    while (seen < LS_EVICT_SCAN && visited <= st->mask) {
        ls_slot *s = &st->slots[pos];
        visited++;
        if (s->klen1 != 0) {
            seen++;
            if (!ls_protected(s->hash, protect, nprotect)) {
                if (s->tat <= now_us) {
                    ls_delete(st, pos);
                    dropped++;
                    continue;
                }
                if (best < 0 || s->tat < st->slots[best].tat) {
                    best = (long)pos;
                }
            }
        }
        pos = (pos + 1) & st->mask;
    }
    st->cursor = pos;
    if (dropped > 0) {
        return;
    }
    if (now_us >= st->none_full_until) {
        uint64_t least = UINT64_MAX;

        best = -1;
        for (pos = 0; pos <= st->mask; pos++) {
            ls_slot *s = &st->slots[pos];
            if (s->klen1 == 0 || ls_protected(s->hash, protect, nprotect)) {
                continue;
            }
            if (s->tat <= now_us) {
                ls_delete(st, pos);
                dropped++;
                pos--;                  /* the shifted entry is examined too */
                continue;
            }
            if (s->tat < least) {
                least = s->tat;
                best = (long)pos;
            }
        }
        if (dropped > 0) {
            return;
        }
        st->none_full_until = least;
    }
    if (best >= 0) {
        ls_delete(st, (size_t)best);
    }
}

/* ---- Redis ------------------------------------------------------------ */

/*
 * The decision of tg_gcra_charge, for a batch (layout in gcra.h).  Every
 * number is an integer held in a double: timestamps ~1.8e15 < 2^53 are
 * exact, and the only division is the ceil of PXAT.  One TIME, one MGET
 * for every key of the batch, then each request on the TATs held in the
 * argument table A itself (a key charged twice in one call sees its first
 * charge, exactly as sequential calls would), and at the end one SET per
 * key that an allowed request of cost > 0 changed, with its final TAT: a
 * bucket that every request of a batch shares (the global one) costs one
 * read and one write per call, not one per request.
 *
 * No table per call but A, the MGET reply and kx (one request's buckets):
 * each key's triple (T, burst, alias) sits at the end of A, and its third
 * number becomes the key's TAT (its alias is itself: the usual case) or
 * -(where the TAT of its alias is) - a name sent twice with two limits
 * has one TAT, read and written by both, as sequential calls would (a
 * TAT is never negative).  The MGET reply doubles as the "written" mark
 * (true: never a value MGET gives, a string or false), and each request's
 * answer overwrites its own numbers in A, already read (the answer of a
 * request is at most as long as its numbers, and starts 2 earlier), so
 * the reply is packed from A as well (loadtest/script-cost, 9 charges
 * a call, against "prev", the script before: 0.86x the redis-server CPU
 * per charge, 4.2 -> 3.7 us).
 *
 * The script only decides (allowed iff every bucket's debt after the
 * request, d = held + cost*T, is at most burst*T) and answers each
 * bucket's debt before it; the client derives the rest of the answer
 * (remaining, retry, reset, limiting bucket) with tg_gcra_charge from
 * those debts, on the script's clock (tg_gcra_script_answer): the same
 * numbers as the step, computed in C rather than in Lua, and a reply of
 * 1 + nbuckets integers per request.
 *
 * The numbers come packed (gcra.h): ARGV[1] is a string of little-endian
 * doubles read with one struct.unpack (4,000 at a time: Lua's C stack
 * holds 8,000 values), where one bulk string per number cost Redis an
 * object, Lua an interned string and a tonumber each; the answer goes
 * back the same way, one struct.pack string, not a table Redis converts
 * element by element (loadtest/script-cost, 9 charges a call: about 0.85x
 * the redis-server CPU per charge of one string per number, 5.3 -> 4.7
 * us).  KEYS stay keys: Cluster routes on them.
 *
 * Numbers are written with string.format('%d'): a Lua number passed to
 * redis.call is formatted with %.17g by Redis 7.0 (exact below 2^53,
 * but measured slower: script-cost "cur-set-num").  The expiry is PXAT
 * ceil(TAT / 1 ms), an absolute time on the
 * clock TIME reads, so a key provably outlives its debt; a relative PX
 * would count from Redis's cached millisecond clock, which lags TIME, and
 * the bound would depend on that lag.  The shebang flag lets one call span
 * several Cluster slots of one node (Redis >= 7); the client sends the
 * keys of one slot per call (Redis refuses declared keys of several), so
 * MGET never sees two slots.
 *
 * Each bucket may come with a floor: it holds at least that debt (time
 * until full), whatever is stored - the debt the caller's local fallback
 * store knows of.  A call whose floors are all 0 sends none (ARGV[2] 0).
 *
 * A stored value that is not a bucket (another type: MGET answers nil for
 * it; not a number; nan, inf, negative, or beyond 2^53) is treated as no
 * bucket, i.e. full, and is overwritten by the next allowed charge: one
 * bad key never fails the batch of other consumers.
 */
const char tg_gcra_lua[] =
    "#!lua flags=allow-cross-slot-keys\n"
    "local call, num, unpack, floor, ceil, fmt = redis.call, tonumber, unpack, math.floor, math.ceil, string.format\n"
    "local tm = call('TIME')\n"
    "local now = num(tm[1]) * 1000000 + num(tm[2])\n"
    "local s = ARGV[1]\n"
    "local n = #s / 8\n"
    "local nk = #KEYS\n"
    "local pk = n - 3 * nk\n"
    "if n ~= floor(n) or pk < 2 then return redis.error_reply('ERR tollgate: packed arguments') end\n"
    "local A\n"
    "if n <= 4000 then\n"
    "  A = {struct.unpack('<' .. string.rep('d', n), s)}\n"
    "else\n"
    "  A = {}\n"
    "  for i = 0, n - 1, 4000 do\n"
    "    local m = n - i\n"
    "    if m > 4000 then m = 4000 end\n"
    "    local p = {struct.unpack('<' .. string.rep('d', m), s, 8 * i + 1)}\n"
    "    for j = 1, m do A[i + j] = p[j] end\n"
    "  end\n"
    "end\n"
    "local got\n"
    "if nk <= 1000 then\n"
    "  if nk > 0 then got = call('MGET', unpack(KEYS)) end\n"
    "else\n"
    "  got = {}\n"
    "  for i = 1, nk, 1000 do\n"
    "    local j = i + 999\n"
    "    if j > nk then j = nk end\n"
    "    local g = call('MGET', unpack(KEYS, i, j))\n"
    "    for x = i, j do got[x] = g[x - i + 1] end\n"
    "  end\n"
    "end\n"
    "for x = 1, nk do\n"
    "  local k = pk + 3 * x\n"
    "  local y = A[k]\n"
    "  if y == x then\n"
    "    local v = num(got[x])\n"
    "    if v == nil or v ~= v or v < 0 or v > 9007199254740991 then v = 0 end\n"
    "    A[k] = floor(v)\n"
    "  elseif y >= 1 and y < x and y == floor(y) then\n"
    "    local t = pk + 3 * y\n"
    "    local r = A[t]\n"
    "    if r < 0 then A[k] = r else A[k] = -t end\n"
    "  else\n"
    "    return redis.error_reply('ERR tollgate: packed arguments')\n"
    "  end\n"
    "end\n"
    "local fl = A[2] == 1\n"
    "local a, o, kx = 3, 0, {}\n"
    "for r = 1, A[1] do\n"
    "  local h = A[a]\n"
    "  local nb = h % 16\n"
    "  local cost = (h - nb) / 16\n"
    "  local ok = 1\n"
    "  a = a + 1\n"
    "  for i = 1, nb do\n"
    "    local x = A[a]\n"
    "    if x < 1 or x > nk then return redis.error_reply('ERR tollgate: packed arguments') end\n"
    "    local k = pk + 3 * x\n"
    "    local t = A[k]\n"
    "    if t < 0 then t = A[-t] end\n"
    "    local held = t - now\n"
    "    a = a + 1\n"
    "    if fl then\n"
    "      local f = A[a]\n"
    "      a = a + 1\n"
    "      if held < f then held = f end\n"
    "    end\n"
    "    if held < 0 then held = 0 end\n"
    "    local per = A[k - 2]\n"
    "    if held + cost * per > A[k - 1] * per then ok = 0 end\n"
    "    kx[i] = k\n"
    "    A[o + 1 + i] = held\n"
    "  end\n"
    "  if ok == 1 and cost > 0 then\n"
    "    for i = 1, nb do\n"
    "      local k = kx[i]\n"
    "      local w = A[k]\n"
    "      if w < 0 then w = -w else w = k end\n"
    "      A[w] = now + A[o + 1 + i] + cost * A[k - 2]\n"
    "      got[(w - pk) / 3] = true\n"
    "    end\n"
    "  end\n"
    "  A[o + 1] = ok\n"
    "  o = o + 1 + nb\n"
    "end\n"
    "for x = 1, nk do\n"
    "  if got[x] == true then\n"
    "    local v = A[pk + 3 * x]\n"
    "    call('SET', KEYS[x], fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000)))\n"
    "  end\n"
    "end\n"
    "A[o + 1] = now\n"
    "o = o + 1\n"
    "if o <= 4000 then return struct.pack('<' .. string.rep('d', o), unpack(A, 1, o)) end\n"
    "local parts = {}\n"
    "for i = 1, o, 4000 do\n"
    "  local j = i + 3999\n"
    "  if j > o then j = o end\n"
    "  parts[#parts + 1] = struct.pack('<' .. string.rep('d', j - i + 1), unpack(A, i, j))\n"
    "end\n"
    "return table.concat(parts)\n";

/*
 * Give back part of a charge (a late answer, a Cluster split's first part,
 * a lease's unused tokens).  KEYS: its buckets; ARGV per key: the amount
 * (cost*T, or unused*T) and P, the TAT that charge wrote.  Each bucket
 * loses at most the amount and never more than the debt still ahead of P
 * (P - now): what a later charge by someone else added stays (that charge
 * can only have shrunk our share of the debt to no less than P - now).
 * Cluster: the keys of one call share a slot.
 */
const char tg_gcra_refund_lua[] =
    "local tm = redis.call('TIME')\n"
    "local now = tonumber(tm[1]) * 1000000 + tonumber(tm[2])\n"
    "for i = 1, #KEYS do\n"
    "  local ok, v = pcall(redis.call, 'GET', KEYS[i])\n"
    "  local tat = ok and tonumber(v) or nil\n"
    "  local amount, p = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])\n"
    "  if tat and tat == tat and tat > now and tat <= 9007199254740991 then\n"
    "    local r = p - now\n"
    "    if r > amount then r = amount end\n"
    "    if r > 0 then\n"
    "      local t = tat - r\n"
    "      if t <= now then\n"
    "        redis.call('DEL', KEYS[i])\n"
    "      else\n"
    "        redis.call('SET', KEYS[i], string.format('%d', t), 'PXAT',\n"
    "                   string.format('%d', math.ceil(t / 1000)))\n"
    "      end\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return 0\n";

/* ---- the scripts' layout ---------------------------------------------- */

size_t
tg_gcra_script_args(const uint32_t *kidx, const uint64_t *floor_us, size_t n,
                    unsigned mask, uint32_t cost, int floors, uint64_t *out)
{
    size_t i = 1;

    for (size_t k = 0; k < n && k < TG_GCRA_MAX_BUCKETS; k++) {
        if (mask & (1u << k)) {
            out[i++] = kidx[k];
            if (floors) {
                out[i++] = floor_us != NULL ? floor_us[k] : 0;
            }
        }
    }
    out[0] = (uint64_t)cost * 16 + (floors ? (i - 1) / 2 : i - 1);
    return i;
}

size_t
tg_gcra_script_key(tg_gcra_limit l, uint32_t alias, uint64_t *out)
{
    out[0] = l.interval_us;
    out[1] = l.burst;
    out[2] = alias;
    return TG_GCRA_SCRIPT_KEY_ARGS;
}

size_t
tg_gcra_script_pack(const uint64_t *v, size_t n, unsigned char *out)
{
    for (size_t i = 0; i < n; i++) {
        double d = (double)(v[i] < TG_GCRA_SCRIPT_MAX ? v[i] : TG_GCRA_SCRIPT_MAX);
        uint64_t b;

        memcpy(&b, &d, sizeof(b));
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && TG_GCRA_PACKED == 8
        memcpy(out + i * TG_GCRA_PACKED, &b, sizeof(b));     /* one store */
#else
        for (int k = 0; k < TG_GCRA_PACKED; k++) {
            out[i * TG_GCRA_PACKED + (size_t)k] = (unsigned char)(b >> (8 * k));
        }
#endif
    }
    return n * TG_GCRA_PACKED;
}

int
tg_gcra_script_unpack(const unsigned char *in, size_t n, uint64_t *v)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t b = 0;
        double d;

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && TG_GCRA_PACKED == 8
        memcpy(&b, in + i * TG_GCRA_PACKED, sizeof(b));       /* one load */
#else
        for (int k = TG_GCRA_PACKED - 1; k >= 0; k--) {
            b = b << 8 | in[i * TG_GCRA_PACKED + (size_t)k];
        }
#endif
        memcpy(&d, &b, sizeof(d));
        /* NaN fails both comparisons */
        if (!(d >= 0 && d <= (double)TG_GCRA_SCRIPT_MAX) || d != (double)(uint64_t)d) {
            return 0;
        }
        v[i] = (uint64_t)d;
    }
    return 1;
}

size_t
tg_gcra_script_reply_len(size_t nreq, size_t nbuckets)
{
    return nreq + nbuckets + 1;
}

int
tg_gcra_script_answer(const long long *v, const tg_gcra_limit *lim, unsigned mask,
                      uint32_t cost, uint64_t now_us, tg_gcra_result *res)
{
    tg_gcra_limit sl[TG_GCRA_MAX_BUCKETS] = { { 0, 0 } };
    uint64_t tat[TG_GCRA_MAX_BUCKETS];
    int idx[TG_GCRA_MAX_BUCKETS], nb = 0;
    uint64_t keep_now;

    for (int k = 0; k < TG_GCRA_MAX_BUCKETS; k++) {
        if (mask & (1u << k)) {
            idx[nb++] = k;
        }
    }
    if (v[0] < 0 || v[0] > 1 || now_us > TG_GCRA_SCRIPT_MAX) {
        return 0;
    }
    for (int j = 0; j < nb; j++) {
        if (v[1 + j] < 0 || (uint64_t)v[1 + j] > TG_GCRA_SCRIPT_MAX) {
            return 0;
        }
        sl[j] = lim[idx[j]];
        tat[j] = now_us + (uint64_t)v[1 + j];
    }
    keep_now = res->now_us;
    tg_gcra_charge(sl, tat, NULL, (size_t)nb, cost, now_us, res);
    res->now_us = keep_now;
    if (res->allowed != (int)v[0]) {
        return 0;               /* not the step's decision on these debts */
    }
    /* buckets not in this call (the other part of a Cluster split) hold
     * nothing we know of: 0, never stack garbage */
    for (int j = nb - 1; j >= 0; j--) {
        uint64_t h = res->held_us[j];
        res->held_us[j] = 0;
        res->held_us[idx[j]] = h;
    }
    for (int k = 0; k < TG_GCRA_MAX_BUCKETS; k++) {
        if (!(mask & (1u << k))) {
            res->held_us[k] = 0;
        }
    }
    if (res->limiting >= 0) {
        res->limiting = idx[res->limiting];
    }
    return 1;
}

size_t
tg_gcra_refund_args(uint64_t amount_us, uint64_t p_us, uint64_t *out)
{
    out[0] = amount_us;
    out[1] = p_us;
    return 2;
}
