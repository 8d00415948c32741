/*
 * connlimit.c - caps on open client connections, per process and per
 * client address.
 *
 * Ownership.  The table and its entries belong to the acceptors (the
 * main thread, or every worker with http.reuseport), one at a time under
 * the table's mutex: only they insert, increment and free, so a check
 * never races another increment and the caps are exact.  The thread that
 * owns a connection only decrements, through the slot (entry) it was
 * handed with it.  An entry whose count is zero is referenced by no
 * connection, so an acceptor may free it: it does so lazily, when it
 * walks the entry's chain, and in a sweep of the whole table when the
 * entries outnumber the buckets.
 */
#include "tollgate/connlimit.h"

#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define CL_MIN_BUCKETS 1024

struct tg_connslot {
    struct tg_connslot  *next;
    struct tg_connlimit *cl;
    unsigned             count;       /* atomic: open connections */
    uint8_t              family;      /* AF_INET, AF_INET6, or 0 (other) */
    uint8_t              addr[16];
};

struct tg_connlimit {
    struct tg_connslot **buckets;
    size_t               nbuckets;    /* a power of two */
    size_t               nentries;
    unsigned             total;       /* atomic: open connections */
    unsigned             max_total;   /* 0 = no cap */
    unsigned             max_per_ip;  /* 0 = no cap */
    uint64_t             seed;        /* hash seed: chains cannot be aimed at */
    pthread_mutex_t      mu;          /* acquire (one per connection, not
                                         per request) */
};

static uint64_t hash_key(const struct tg_connlimit *cl, int family, const uint8_t *addr);
static void key_of(const struct sockaddr *sa, uint8_t *family, uint8_t addr[16]);
static enum tg_connlimit_verdict acquire_locked(struct tg_connlimit *cl,
                                                const struct sockaddr *sa,
                                                struct tg_connslot **slot);
static void sweep(struct tg_connlimit *cl);
static void grow(struct tg_connlimit *cl);

struct tg_connlimit *
tg_connlimit_create(unsigned max_total, unsigned max_per_ip)
{
    struct tg_connlimit *cl = tg_xcalloc(1, sizeof(*cl));

    pthread_mutex_init(&cl->mu, NULL);
    cl->nbuckets = CL_MIN_BUCKETS;
    cl->buckets = tg_xcalloc(cl->nbuckets, sizeof(*cl->buckets));
    if (getrandom(&cl->seed, sizeof(cl->seed), 0) != (ssize_t)sizeof(cl->seed)) {
        cl->seed = tg_now_us() ^ (uint64_t)(uintptr_t)cl;
    }
    tg_connlimit_set(cl, max_total, max_per_ip);
    return cl;
}

void
tg_connlimit_destroy(struct tg_connlimit *cl)
{
    size_t i;

    if (cl == NULL) {
        return;
    }
    for (i = 0; i < cl->nbuckets; i++) {
        struct tg_connslot *e = cl->buckets[i], *next;
        for (; e != NULL; e = next) {
            next = e->next;
            free(e);
        }
    }
    free(cl->buckets);
    pthread_mutex_destroy(&cl->mu);
    free(cl);
}

void
tg_connlimit_set(struct tg_connlimit *cl, unsigned max_total, unsigned max_per_ip)
{
    pthread_mutex_lock(&cl->mu);
    cl->max_total = max_total;
    cl->max_per_ip = max_per_ip;
    pthread_mutex_unlock(&cl->mu);
}

enum tg_connlimit_verdict
tg_connlimit_acquire(struct tg_connlimit *cl, const struct sockaddr *sa,
                     struct tg_connslot **slot)
{
    enum tg_connlimit_verdict v;

    pthread_mutex_lock(&cl->mu);
    v = acquire_locked(cl, sa, slot);
    pthread_mutex_unlock(&cl->mu);
    return v;
}

static enum tg_connlimit_verdict
acquire_locked(struct tg_connlimit *cl, const struct sockaddr *sa,
               struct tg_connslot **slot)
{
    struct tg_connslot **pp, *e, *found = NULL;
    uint8_t family, addr[16];
    size_t b;

    *slot = NULL;
    if (cl->max_total != 0
        && __atomic_load_n(&cl->total, __ATOMIC_RELAXED) >= cl->max_total) {
        return TG_CONN_OVER_TOTAL;
    }
    key_of(sa, &family, addr);
    b = hash_key(cl, family, addr) & (cl->nbuckets - 1);
    for (pp = &cl->buckets[b]; (e = *pp) != NULL; ) {
        if (e->family == family && memcmp(e->addr, addr, sizeof(addr)) == 0) {
            found = e;
            pp = &e->next;
        } else if (__atomic_load_n(&e->count, __ATOMIC_ACQUIRE) == 0) {
            *pp = e->next;               /* nobody holds it: free it now */
            free(e);
            cl->nentries--;
        } else {
            pp = &e->next;
        }
    }
    if (found != NULL) {
        if (cl->max_per_ip != 0
            && __atomic_load_n(&found->count, __ATOMIC_RELAXED) >= cl->max_per_ip) {
            return TG_CONN_OVER_IP;
        }
        __atomic_add_fetch(&found->count, 1, __ATOMIC_RELAXED);
    } else {
        found = tg_xcalloc(1, sizeof(*found));
        found->cl = cl;
        found->count = 1;
        found->family = family;
        memcpy(found->addr, addr, sizeof(addr));
        found->next = cl->buckets[b];
        cl->buckets[b] = found;
        if (++cl->nentries > cl->nbuckets) {
            sweep(cl);
            if (cl->nentries > cl->nbuckets / 2) {
                grow(cl);
            }
        }
    }
    __atomic_add_fetch(&cl->total, 1, __ATOMIC_RELAXED);
    *slot = found;
    return TG_CONN_OK;
}

void
tg_connlimit_release(struct tg_connslot *slot)
{
    struct tg_connlimit *cl;

    if (slot == NULL) {
        return;
    }
    cl = slot->cl;
    /* the last touch of the entry: once zero, the main thread may free it */
    __atomic_sub_fetch(&slot->count, 1, __ATOMIC_RELEASE);
    __atomic_sub_fetch(&cl->total, 1, __ATOMIC_RELAXED);
}

unsigned
tg_connlimit_total(const struct tg_connlimit *cl)
{
    return __atomic_load_n(&cl->total, __ATOMIC_RELAXED);
}

size_t
tg_connlimit_entries(const struct tg_connlimit *cl)
{
    return cl->nentries;
}

/* ---- helpers ---------------------------------------------------------- */

static void
key_of(const struct sockaddr *sa, uint8_t *family, uint8_t addr[16])
{
    memset(addr, 0, 16);
    *family = 0;
    if (sa == NULL) {
        return;
    }
    if (sa->sa_family == AF_INET) {
        *family = AF_INET;
        memcpy(addr, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        *family = AF_INET6;
        memcpy(addr, &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr, 16);
    }
}

/* FNV-1a over a seeded state, then a 64-bit finaliser. */
static uint64_t
hash_key(const struct tg_connlimit *cl, int family, const uint8_t *addr)
{
    uint64_t h = 0xcbf29ce484222325ull ^ cl->seed;
    int i;

    h = (h ^ (uint64_t)family) * 0x100000001b3ull;
    for (i = 0; i < 16; i++) {
        h = (h ^ addr[i]) * 0x100000001b3ull;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static void
sweep(struct tg_connlimit *cl)
{
    size_t i;

    for (i = 0; i < cl->nbuckets; i++) {
        struct tg_connslot **pp = &cl->buckets[i], *e;
        while ((e = *pp) != NULL) {
            if (__atomic_load_n(&e->count, __ATOMIC_ACQUIRE) == 0) {
                *pp = e->next;
                free(e);
                cl->nentries--;
            } else {
                pp = &e->next;
            }
        }
    }
}

static void
grow(struct tg_connlimit *cl)
{
    size_t n = cl->nbuckets * 2, i;
    struct tg_connslot **nb = tg_xcalloc(n, sizeof(*nb));

    for (i = 0; i < cl->nbuckets; i++) {
        struct tg_connslot *e = cl->buckets[i], *next;
        for (; e != NULL; e = next) {
            size_t b = hash_key(cl, e->family, e->addr) & (n - 1);
            next = e->next;
            e->next = nb[b];
            nb[b] = e;
        }
    }
    free(cl->buckets);
    cl->buckets = nb;
    cl->nbuckets = n;
}
