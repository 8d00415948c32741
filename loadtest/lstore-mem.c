/*
 * lstore-mem.c - resident memory of the local bucket store (store: local)
 * (the striped tg_lshared the limiter uses) with N distinct keys, and after they expire and N other keys arrive.
 * Built and run by loadtest/bench-scale (part "lstore"):
 *
 *   cc -O2 -Iinclude -DTG_VERSION="\"$(build/tollgate -V | cut -d' ' -f2)\"" \
 *       loadtest/lstore-mem.c build/libtgcore.a -o lstore-mem
 *   ./lstore-mem [N] [MAX_ENTRIES]
 *
 * Keys are bucket keys as the limiter writes them ("tg:{k0000001}:t", 15
 * bytes: inline in a slot).  Tier 60 req/min, burst 10: each charge leaves
 * a bucket 1 s short of full, so it expires (TAT <= now) 1 s later.
 * Prints VmRSS before, after N keys, after N more keys 2 s later (the
 * first N expired), and the store's size each time.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tollgate/gcra.h"

static long
rss_kib(void)
{
    char line[256];
    long kb = -1;
    FILE *f = fopen("/proc/self/status", "r");

    if (f == NULL) {
        return -1;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kb = atol(line + 6);
        }
    }
    fclose(f);
    return kb;
}

static void
fill(struct tg_lshared *st, const tg_gcra_limit *lim, size_t from, size_t n,
     uint64_t now_us)
{
    char key[32];
    const char *keys[1] = { key };
    tg_gcra_result res;
    size_t i;

    for (i = from; i < from + n; i++) {
        snprintf(key, sizeof(key), "tg:{k%07zu}:t", i);
        tg_lshared_charge(st, keys, lim, 1, 1, -1, now_us, &res);
    }
}

int
main(int argc, char **argv)
{
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 1000000;
    size_t max = argc > 2 ? strtoul(argv[2], NULL, 10) : (1u << 20);
    tg_gcra_limit lim = tg_gcra_per_minute(60, 10);
    uint64_t t0 = 1000000000000ULL;
    struct tg_lshared *st;
    long r0, r1, r2;

    r0 = rss_kib();
    st = tg_lshared_create(max);
    fill(st, &lim, 0, n, t0);
    r1 = rss_kib();
    printf("lstore: %zu keys (max_entries %zu): size %zu, VmRSS +%ld KiB, "
           "%ld bytes per key (bound: tg_lstore_entry_bytes() = %zu)\n", n, max,
           tg_lshared_size(st), r1 - r0, n ? (r1 - r0) * 1024 / (long)n : 0,
           tg_lstore_entry_bytes());
    fill(st, &lim, n, n, t0 + 2000000);
    r2 = rss_kib();
    printf("lstore: %zu other keys 2 s later (the first %zu expired): size %zu, "
           "VmRSS +%ld KiB\n", n, n, tg_lshared_size(st), r2 - r0);
    tg_lshared_destroy(st);
    return 0;
}
