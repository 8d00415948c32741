/*
 * lshared-follow.c - what local_follow (src/limiter.c) costs per Redis
 * answer with on_failure: local: the answer's buckets raised in the
 * shared local store, one tg_lshared_raise per bucket (a lock per table
 * bucket) against one tg_lshared_raise_n (a lock per table).
 *
 *   cc -O2 -Iinclude loadtest/lshared-follow.c build/libtgcore.a -lpthread -o /tmp/lf
 *   /tmp/lf [ITERATIONS] [ROUNDS]
 *
 * Per shape (1: the tier bucket; 2: tier + global; 3: tier + route +
 * global, the route bucket in the tier's table, global a lock-free cell)
 * and thread count (1, 2), alternating old/new ROUNDS times, prints the
 * ns per answer of each and their ratio.  10,000 consumers picked by an
 * LCG, bucket keys as the limiter writes them.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tollgate/gcra.h"

#define NCONS 10000

static struct tg_lshared *sh;
static char tkeys[NCONS][32], rkeys[NCONS][40];
static const char gkey[] = "tg:{global}:g";
static long iters = 2000000;
static int shape, use_n;

static uint64_t
now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *
run(void *arg)
{
    uint64_t x = (uint64_t)(uintptr_t)arg * 7919 + 1, now = now_ns() / 1000;
    const char *keys[3];
    uint64_t tat[3];
    size_t n;

    for (long i = 0; i < iters; i++) {
        unsigned c;
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        c = (unsigned)((x >> 33) % NCONS);
        n = 0;
        keys[n++] = tkeys[c];
        if (shape == 3) {
            keys[n++] = rkeys[c];
        }
        if (shape >= 2) {
            keys[n++] = gkey;
        }
        for (size_t k = 0; k < n; k++) {
            tat[k] = now + 1000000 + (uint64_t)i;
        }
        if (use_n) {
            tg_lshared_raise_n(sh, keys, tat, n, now);
        } else {
            for (size_t k = 0; k < n; k++) {
                tg_lshared_raise(sh, keys[k], tat[k], now);
            }
        }
    }
    return NULL;
}

static double
measure(int threads)
{
    pthread_t th[2];
    uint64_t t0 = now_ns();

    for (int i = 0; i < threads; i++) {
        pthread_create(&th[i], NULL, run, (void *)(uintptr_t)(i + 1));
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
    }
    /* wall time per answer per thread */
    return (double)(now_ns() - t0) / (double)iters;
}

static int
cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return x < y ? -1 : x > y;
}

int
main(int argc, char **argv)
{
    int rounds = argc > 2 ? atoi(argv[2]) : 5;
    tg_gcra_limit g = { 1, 1000000000 };
    tg_gcra_result r;
    const char *gk = gkey;

    if (argc > 1) {
        iters = atol(argv[1]);
    }
    if (rounds < 1 || rounds > 64 || iters < 1) {
        fprintf(stderr, "usage: %s [ITERATIONS] [ROUNDS 1..64]\n", argv[0]);
        return 2;
    }
    sh = tg_lshared_create(1u << 20);
    for (int i = 0; i < NCONS; i++) {
        snprintf(tkeys[i], sizeof(tkeys[i]), "tg:{k%05d}:t", i);
        snprintf(rkeys[i], sizeof(rkeys[i]), "tg:{k%05d}:r:export", i);
    }
    tg_lshared_charge(sh, &gk, &g, 1, 1, 0, 1, &r);   /* global: a cell */

    printf("| buckets | threads | per bucket ns/answer | raise_n ns/answer | new/old |\n");
    printf("|---|---|---|---|---|\n");
    for (shape = 1; shape <= 3; shape++) {
        for (int threads = 1; threads <= 2; threads++) {
            double o[64], m[64], q[64];
            for (int k = 0; k < rounds; k++) {
                use_n = 0;
                o[k] = measure(threads);
                use_n = 1;
                m[k] = measure(threads);
                q[k] = m[k] / o[k];
            }
            qsort(o, (size_t)rounds, sizeof(o[0]), cmp);
            qsort(m, (size_t)rounds, sizeof(m[0]), cmp);
            qsort(q, (size_t)rounds, sizeof(q[0]), cmp);
            printf("| %d | %d | %.1f | %.1f | %.2f |\n", shape, threads, o[rounds / 2],
                   m[rounds / 2], q[rounds / 2]);
        }
    }
    tg_lshared_destroy(sh);
    return 0;
}
