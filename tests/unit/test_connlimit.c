/*
 * test_connlimit.c - connection caps: per process, per client address
 * (IPv4 and IPv6 each by the whole address), release from other threads,
 * and entries of gone addresses freed.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "tollgate/connlimit.h"

static struct sockaddr_storage
v4(const char *ip, int port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

    memset(&ss, 0, sizeof(ss));
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    cr_assert_eq(inet_pton(AF_INET, ip, &sin->sin_addr), 1);
    return ss;
}

static struct sockaddr_storage
v6(const char *ip, int port)
{
    struct sockaddr_storage ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

    memset(&ss, 0, sizeof(ss));
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((uint16_t)port);
    cr_assert_eq(inet_pton(AF_INET6, ip, &sin6->sin6_addr), 1);
    return ss;
}

static enum tg_connlimit_verdict
take(struct tg_connlimit *cl, struct sockaddr_storage ss, struct tg_connslot **slot)
{
    return tg_connlimit_acquire(cl, (const struct sockaddr *)&ss, slot);
}

Test(connlimit, per_ip_cap_counts_each_address_whatever_the_port)
{
    struct tg_connlimit *cl = tg_connlimit_create(0, 2);
    struct tg_connslot *a, *b, *c, *d;

    cr_assert_eq(take(cl, v4("10.0.0.1", 1000), &a), TG_CONN_OK);
    cr_assert_eq(take(cl, v4("10.0.0.1", 1001), &b), TG_CONN_OK);
    cr_assert_eq(take(cl, v4("10.0.0.1", 1002), &c), TG_CONN_OVER_IP);
    cr_assert_null(c);
    cr_assert_eq(take(cl, v4("10.0.0.2", 1000), &d), TG_CONN_OK, "another address");
    cr_assert_eq(tg_connlimit_total(cl), 3);
    tg_connlimit_release(a);
    cr_assert_eq(take(cl, v4("10.0.0.1", 1003), &c), TG_CONN_OK, "a freed place");
    tg_connlimit_release(b);
    tg_connlimit_release(c);
    tg_connlimit_release(d);
    tg_connlimit_release(NULL);
    cr_assert_eq(tg_connlimit_total(cl), 0);
    tg_connlimit_destroy(cl);
}

Test(connlimit, ipv6_counts_per_address)
{
    struct tg_connlimit *cl = tg_connlimit_create(0, 1);
    struct tg_connslot *s[4];

    cr_assert_eq(take(cl, v6("2001:db8::1", 1), &s[0]), TG_CONN_OK);
    cr_assert_eq(take(cl, v6("2001:db8::1", 2), &s[1]), TG_CONN_OVER_IP);
    cr_assert_eq(take(cl, v6("2001:db8::2", 1), &s[1]), TG_CONN_OK, "same /64, other address");
    cr_assert_eq(take(cl, v6("::ffff:10.0.0.1", 1), &s[2]), TG_CONN_OK);
    cr_assert_eq(take(cl, v4("10.0.0.1", 1), &s[3]), TG_CONN_OK, "v4 and v6 keys differ");
    for (int i = 0; i < 4; i++)
        tg_connlimit_release(s[i]);
    tg_connlimit_destroy(cl);
}

Test(connlimit, total_cap_and_reload)
{
    struct tg_connlimit *cl = tg_connlimit_create(3, 0);
    struct tg_connslot *s[5];
    char ip[32];
    int i;

    for (i = 0; i < 3; i++) {
        snprintf(ip, sizeof(ip), "10.0.1.%d", i);
        cr_assert_eq(take(cl, v4(ip, 1), &s[i]), TG_CONN_OK);
    }
    cr_assert_eq(take(cl, v4("10.0.2.1", 1), &s[3]), TG_CONN_OVER_TOTAL);
    tg_connlimit_set(cl, 5, 1);              /* a reload raises it */
    cr_assert_eq(take(cl, v4("10.0.2.1", 1), &s[3]), TG_CONN_OK);
    cr_assert_eq(take(cl, v4("10.0.2.1", 2), &s[4]), TG_CONN_OVER_IP);
    cr_assert_eq(take(cl, v4("10.0.2.2", 1), &s[4]), TG_CONN_OK);
    {
        struct tg_connslot *extra;
        cr_assert_eq(take(cl, v4("10.0.2.3", 1), &extra), TG_CONN_OVER_TOTAL);
        cr_assert_null(extra);
    }
    for (i = 0; i < 5; i++)
        tg_connlimit_release(s[i]);
    cr_assert_eq(tg_connlimit_total(cl), 0);
    tg_connlimit_destroy(cl);
}

/* Addresses that come and go leave no entries behind: the table stays
 * about as large as the addresses connected now. */
Test(connlimit, entries_of_gone_addresses_are_freed)
{
    struct tg_connlimit *cl = tg_connlimit_create(0, 4);
    struct tg_connslot *keep, *s;
    char ip[64];
    int i;

    cr_assert_eq(take(cl, v4("192.0.2.1", 1), &keep), TG_CONN_OK);
    for (i = 0; i < 100000; i++) {
        snprintf(ip, sizeof(ip), "2001:db8::%x:%x", i >> 16, i & 0xffff);
        cr_assert_eq(take(cl, v6(ip, 1), &s), TG_CONN_OK);
        tg_connlimit_release(s);
    }
    cr_assert_leq(tg_connlimit_entries(cl), 4096, "%zu entries for 1 open connection",
                  tg_connlimit_entries(cl));
    cr_assert_eq(tg_connlimit_total(cl), 1);
    /* the survivor is still counted exactly */
    for (i = 0; i < 3; i++)
        cr_assert_eq(take(cl, v4("192.0.2.1", 2), &s), TG_CONN_OK);
    cr_assert_eq(take(cl, v4("192.0.2.1", 3), &s), TG_CONN_OVER_IP);
    tg_connlimit_destroy(cl);
}

/* Releases come from worker threads while the main thread acquires. */
struct releaser {
    struct tg_connslot **slots;
    int                  n;
};

static void *
release_all(void *arg)
{
    struct releaser *r = arg;

    for (int i = 0; i < r->n; i++)
        tg_connlimit_release(r->slots[i]);
    return NULL;
}

Test(connlimit, releases_from_other_threads_are_exact)
{
    enum { N = 20000, T = 4 };
    static struct tg_connslot *slots[N];
    struct tg_connlimit *cl = tg_connlimit_create(N, N);
    struct releaser r[T];
    pthread_t th[T];
    struct tg_connslot *s;
    char ip[32];
    int i;

    for (i = 0; i < N; i++) {
        snprintf(ip, sizeof(ip), "10.%d.%d.%d", i % 3, (i / 3) % 200, i % 7);
        cr_assert_eq(take(cl, v4(ip, i), &slots[i]), TG_CONN_OK);
    }
    cr_assert_eq(take(cl, v4("10.9.9.9", 1), &s), TG_CONN_OVER_TOTAL);
    for (i = 0; i < T; i++) {
        r[i].slots = slots + i * (N / T);
        r[i].n = N / T;
        cr_assert_eq(pthread_create(&th[i], NULL, release_all, &r[i]), 0);
    }
    /* meanwhile the main thread keeps accepting and closing */
    for (i = 0; i < 1000; i++) {
        if (take(cl, v4("10.200.0.1", i), &s) == TG_CONN_OK)
            tg_connlimit_release(s);
    }
    for (i = 0; i < T; i++)
        pthread_join(th[i], NULL);
    cr_assert_eq(tg_connlimit_total(cl), 0);
    for (i = 0; i < N; i++) {                /* every place is free again */
        snprintf(ip, sizeof(ip), "10.%d.%d.%d", i % 3, (i / 3) % 200, i % 7);
        cr_assert_eq(take(cl, v4(ip, i), &slots[i]), TG_CONN_OK);
    }
    for (i = 0; i < N; i++)
        tg_connlimit_release(slots[i]);
    tg_connlimit_destroy(cl);
}
