/*
 * evmem.c - a per-thread cache of blocks for libevent (evmem.h).
 *
 * A block is an ordinary malloc block of at least its class's size, so
 * realloc and a block from before the install need no special case: its
 * class on free is the largest class not above malloc_usable_size.  Each
 * thread keeps its own lists (no lock, no atomic); a block freed by
 * another thread than the one that took it joins that thread's lists.  A
 * thread's lists go back to malloc when it exits (a pthread key's
 * destructor).
 */
#include "tollgate/evmem.h"

#include <event2/event.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#include "tollgate/common.h"

#define EVMEM_MIN_SHIFT   6                    /* 64 bytes */
#define EVMEM_MAX_SHIFT   16                   /* 64 KiB: above it, malloc */
#define EVMEM_CLASSES     (EVMEM_MAX_SHIFT - EVMEM_MIN_SHIFT + 1)
#define EVMEM_KEEP_BYTES  (4u << 20)           /* cached per thread, at most */

typedef struct evmem_block {
    struct evmem_block *next;
} evmem_block;

typedef struct evmem_cache {
    evmem_block *list[EVMEM_CLASSES];
    size_t       bytes;                        /* cached, all classes */
} evmem_cache;

static pthread_once_t    evmem_once = PTHREAD_ONCE_INIT;
static pthread_key_t     evmem_key;
static int               evmem_on;
static __thread evmem_cache *evmem_tc;
static __thread int      evmem_dying;          /* the key's destructor ran */

static void *evmem_malloc(size_t size);
static void *evmem_realloc(void *p, size_t size);
static void  evmem_free(void *p);

/* ---- public ----------------------------------------------------------- */

static void
evmem_thread_exit(void *arg)
{
    evmem_cache *tc = arg;

    evmem_dying = 1;
    evmem_tc = NULL;
    for (int c = 0; c < EVMEM_CLASSES; c++) {
        evmem_block *b;
        while ((b = tc->list[c]) != NULL) {
            tc->list[c] = b->next;
            free(b);
        }
    }
    free(tc);
}

static void
evmem_init(void)
{
#if defined(__SANITIZE_ADDRESS__)
    const int wanted = 0;                      /* ASan must see every free */
#else
    const int wanted = 1;
#endif

    if (!wanted || pthread_key_create(&evmem_key, evmem_thread_exit) != 0) {
        return;
    }
    event_set_mem_functions(evmem_malloc, evmem_realloc, evmem_free);
    evmem_on = 1;
}

void
tg_evmem_install(void)
{
    pthread_once(&evmem_once, evmem_init);
}

int
tg_evmem_installed(void)
{
    return evmem_on;
}

/* ---- the allocator ---------------------------------------------------- */

/* The class holding size bytes, or -1 (too large). */
static int
class_up(size_t size)
{
    int s;

    if (size <= ((size_t)1 << EVMEM_MIN_SHIFT)) {
        return 0;
    }
    if (size > ((size_t)1 << EVMEM_MAX_SHIFT)) {
        return -1;
    }
    s = 64 - __builtin_clzll((unsigned long long)(size - 1));   /* 2^s >= size */
    return s - EVMEM_MIN_SHIFT;
}

/* The largest class a block of usable bytes can serve, or -1 (too small,
 * or more than twice the largest class: caching it would hold memory the
 * byte count does not see). */
static int
class_down(size_t usable)
{
    if (usable < ((size_t)1 << EVMEM_MIN_SHIFT)
        || usable >= ((size_t)2 << EVMEM_MAX_SHIFT)) {
        return -1;                             /* a big block: not kept */
    }
    /* 2^s <= usable < 2^(s+1) */
    return 63 - __builtin_clzll((unsigned long long)usable) - EVMEM_MIN_SHIFT;
}

static evmem_cache *
cache_get(void)
{
    evmem_cache *tc = evmem_tc;

    if (tc == NULL && !evmem_dying) {
        tc = calloc(1, sizeof(*tc));
        if (tc != NULL) {
            if (pthread_setspecific(evmem_key, tc) != 0) {
                free(tc);
                return NULL;
            }
            evmem_tc = tc;
        }
    }
    return tc;
}

static void *
evmem_malloc(size_t size)
{
    evmem_cache *tc = evmem_tc;
    int c = class_up(size);
    evmem_block *b;

    if (c < 0) {
        return malloc(size);
    }
    if (tc != NULL && (b = tc->list[c]) != NULL) {
        tc->list[c] = b->next;
        tc->bytes -= (size_t)1 << (c + EVMEM_MIN_SHIFT);
        return b;
    }
    return malloc((size_t)1 << (c + EVMEM_MIN_SHIFT));
}

static void *
evmem_realloc(void *p, size_t size)
{
    /* a cached class is a lower bound on the block: realloc keeps that */
    return realloc(p, size);
}

static void
evmem_free(void *p)
{
    evmem_cache *tc;
    size_t csize;
    int c;

    if (p == NULL) {
        return;
    }
    c = class_down(malloc_usable_size(p));
    tc = c >= 0 ? cache_get() : NULL;
    if (tc == NULL) {
        free(p);
        return;
    }
    csize = (size_t)1 << (c + EVMEM_MIN_SHIFT);
    if (tc->bytes + csize > EVMEM_KEEP_BYTES) {
        free(p);
        return;
    }
    ((evmem_block *)p)->next = tc->list[c];
    tc->list[c] = p;
    tc->bytes += csize;
}
