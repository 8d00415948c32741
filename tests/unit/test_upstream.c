/*
 * test_upstream.c - server selection of a pool: round-robin, skipping
 * open breakers and down servers, avoid, all refused -> NULL + retry_ms,
 * the single half-open probe, report/abandon bookkeeping and late results.
 *
 * No traffic: the servers are loopback sockets that listen and never
 * accept (connects complete in the backlog), the event base is never
 * dispatched (so the health checker never runs: its flags are set with
 * tg_health_force), and the breakers' clock is the test's
 * (tg_upstream_pool_set_clock).
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>

#include "tollgate/conf.h"
#include "tollgate/health.h"
#include "tollgate/upstream.h"

#define MAXS 4

static uint64_t fake_now = 1000000000000ULL;
static struct event_base *base;
static tg_conf *conf;
static struct tg_upstream_pool *pool;
static struct tg_health *health;
static int lfd[MAXS];
static size_t nlfd;
static const char *keepalive_line = "  keepalive: 4\n";   /* setup's */

static uint64_t
clock_ms(void)
{
    return fake_now;
}

static int
listen_any(void)
{
    struct sockaddr_in sin;
    socklen_t len = sizeof(sin);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    cr_assert_geq(fd, 0);
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    cr_assert_eq(listen(fd, 128), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
    lfd[nlfd++] = fd;
    return ntohs(sin.sin_port);
}

/* A pool over n listening servers; breaker: 2 consecutive failures open
 * it for 1000 ms (doubling, capped at 8000), ratio rule off.  with_health:
 * a (never running) checker is installed. */
static void
setup(size_t n, int with_health)
{
    char yaml[1024], servers[256] = "", err[TG_CONF_ERRLEN];
    size_t i, off = 0;

    for (i = 0; i < n; i++) {
        off += (size_t)snprintf(servers + off, sizeof(servers) - off, "%s127.0.0.1:%d",
                                i ? ", " : "", listen_any());
    }
    snprintf(yaml, sizeof(yaml),
             "listen:\n  - address: 127.0.0.1:0\n"
             "upstream:\n  servers: [%s]\n%s"
             "  breaker: { failures: 2, window_ms: 0, open_ms: 1000, max_open_ms: 8000 }\n"
             "%s",
             servers, keepalive_line, with_health ? "  health_check: { interval_ms: 1000 }\n" : "");
    conf = tg_conf_load_string("t.yaml", yaml, strlen(yaml), err, sizeof(err));
    cr_assert_not_null(conf, "%s", err);
    base = event_base_new();
    cr_assert_not_null(base);
    health = tg_health_create(base, conf);
    cr_assert((health != NULL) == (with_health != 0));
    tg_upstream_set_health(health);
    pool = tg_upstream_pool_create(base, conf);
    tg_upstream_pool_set_clock(pool, clock_ms);
}

static void
teardown(void)
{
    size_t i;

    if (pool != NULL)
        tg_upstream_pool_destroy(pool);
    tg_upstream_set_health(NULL);
    tg_health_destroy(health);
    if (conf != NULL)
        tg_conf_unref(conf);
    if (base != NULL)
        event_base_free(base);
    for (i = 0; i < nlfd; i++)
        close(lfd[i]);
}

TestSuite(upstream, .fini = teardown);

/* Acquire (no avoid), assert success, return the server index; the
 * connection is left lent in *out (or released without report when out
 * is NULL). */
static size_t
take(struct tg_uconn **out, const struct tg_uconn *avoid)
{
    int reused = -1;
    uint64_t retry = 12345;
    struct tg_uconn *uc = tg_upstream_acquire(pool, &reused, avoid, &retry);
    size_t idx;

    cr_assert_not_null(uc, "acquire failed, retry_ms %llu", (unsigned long long)retry);
    cr_assert_eq(retry, 0);
    cr_assert_eq(reused, 0);
    idx = tg_uconn_server_index(uc);
    if (out != NULL)
        *out = uc;
    else
        tg_upstream_release(uc, 0);
    return idx;
}

/* Acquire must fail; returns retry_ms. */
static uint64_t
refused(void)
{
    int reused = -1;
    uint64_t retry = 0;
    struct tg_uconn *uc = tg_upstream_acquire(pool, &reused, NULL, &retry);

    cr_assert_null(uc, "acquire lent server %zu", uc ? tg_uconn_server_index(uc) : 0);
    cr_assert_gt(retry, 0);
    return retry;
}

/* Two failed exchanges on server idx: its breaker opens. */
static void
open_server(size_t idx)
{
    struct tg_uconn *uc;
    int i;

    for (i = 0; i < 2; i++) {
        do {
            uc = NULL;
            size_t got = take(&uc, NULL);
            if (got == idx)
                break;
            tg_upstream_release(uc, 0);
            uc = NULL;
        } while (1);
        tg_upstream_report(uc, 0);
        tg_upstream_release(uc, 0);
    }
    cr_assert_eq(tg_upstream_server_state(pool, idx), TG_BREAKER_OPEN);
}

/* ---- rotation ----------------------------------------------------------- */

Test(upstream, round_robin)
{
    size_t i;

    setup(3, 0);
    for (i = 0; i < 9; i++)
        cr_assert_eq(take(NULL, NULL), i % 3);
}

Test(upstream, skips_open_breaker)
{
    size_t i;

    setup(3, 0);
    open_server(1);
    for (i = 0; i < 6; i++)
        cr_assert_neq(take(NULL, NULL), 1);
    /* Other servers' breakers are untouched. */
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_CLOSED);
    cr_assert_eq(tg_upstream_server_state(pool, 2), TG_BREAKER_CLOSED);
}

Test(upstream, skips_down_server_until_up)
{
    size_t i, seen[3] = { 0, 0, 0 };

    setup(3, 1);
    cr_assert_eq(tg_health_server_count(health), 3);
    cr_assert_eq(tg_health_up(health, 0), 1, "servers start up");
    tg_health_force(health, 0, 0);
    cr_assert_eq(tg_health_up(health, 0), 0);
    for (i = 0; i < 6; i++)
        cr_assert_neq(take(NULL, NULL), 0);
    /* A down server's breaker is not consulted: still closed, no probe. */
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_CLOSED);
    tg_health_force(health, 0, 1);
    for (i = 0; i < 6; i++)
        seen[take(NULL, NULL)]++;
    cr_assert_eq(seen[0], 2);
    cr_assert_eq(seen[1], 2);
    cr_assert_eq(seen[2], 2);
}

/* ---- avoid -------------------------------------------------------------- */

Test(upstream, avoid_respected_when_another_exists)
{
    struct tg_uconn *a, *b, *c;

    setup(2, 0);
    cr_assert_eq(take(&a, NULL), 0);
    cr_assert_eq(take(&b, NULL), 1);
    /* The cursor points at 0 again: avoid moves the pick to 1. */
    cr_assert_eq(take(&c, a), 1);
    tg_upstream_release(c, 0);
    tg_upstream_release(b, 0);
    /* With 1 open, the avoided server is the only one: it is used. */
    open_server(1);
    cr_assert_eq(take(&c, a), 0);
    tg_upstream_release(c, 0);
    tg_upstream_release(a, 0);
}

Test(upstream, avoid_ignored_with_one_server)
{
    struct tg_uconn *a, *b;

    setup(1, 0);
    cr_assert_eq(take(&a, NULL), 0);
    cr_assert_eq(take(&b, a), 0);
    tg_upstream_release(b, 0);
    tg_upstream_release(a, 0);
}

Test(upstream, avoid_down_server_not_used)
{
    struct tg_uconn *a;

    setup(2, 1);
    cr_assert_eq(take(&a, NULL), 0);
    tg_health_force(health, 1, 0);
    /* The only other server is down: fall back to the avoided one. */
    cr_assert_eq(take(NULL, a), 0);
    tg_upstream_release(a, 0);
}

/* ---- nothing usable ----------------------------------------------------- */

Test(upstream, all_open_null_with_smallest_retry)
{
    setup(2, 0);
    open_server(0);                    /* open until +1000 */
    fake_now += 300;
    open_server(1);                    /* open until +1300 */
    cr_assert_eq(refused(), 700);
    fake_now += 650;
    cr_assert_eq(refused(), 50);
    fake_now += 50;
    cr_assert_eq(take(NULL, NULL), 0, "server 0 half-open: its probe");
}

Test(upstream, all_down_retry_at_least_a_second)
{
    setup(2, 1);
    tg_health_force(health, 0, 0);
    tg_health_force(health, 1, 0);
    cr_assert_eq(refused(), 1000);
    /* Down and open for longer than a second: the breaker's time. */
    tg_health_force(health, 0, 1);
    open_server(0);
    tg_health_force(health, 0, 0);
    cr_assert_eq(refused(), 1000);     /* server 1: down only */
    tg_health_force(health, 1, 1);
    open_server(1);
    tg_health_force(health, 1, 0);
    fake_now += 100;
    cr_assert_eq(refused(), 1000);     /* both open (900 left) and down */
    /* Up again but open: the breaker decides. */
    tg_health_force(health, 0, 1);
    tg_health_force(health, 1, 1);
    cr_assert_eq(refused(), 900);
}

Test(upstream, retry_ms_may_be_null)
{
    int reused;

    setup(1, 0);
    open_server(0);
    cr_assert_null(tg_upstream_acquire(pool, &reused, NULL, NULL));
}

/* ---- half-open ---------------------------------------------------------- */

Test(upstream, half_open_single_probe_success_closes)
{
    struct tg_uconn *probe;

    setup(1, 0);
    open_server(0);
    cr_assert_eq(refused(), 1000);
    fake_now += 1000;
    cr_assert_eq(take(&probe, NULL), 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_HALF_OPEN);
    /* Probe in flight: nobody else, and Retry-After is a second. */
    cr_assert_eq(refused(), 1000);
    cr_assert_eq(refused(), 1000);
    tg_upstream_report(probe, 1);
    tg_upstream_release(probe, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_CLOSED);
    cr_assert_eq(take(NULL, NULL), 0);
    cr_assert_eq(take(NULL, NULL), 0);
}

Test(upstream, half_open_probe_failure_reopens_doubled)
{
    struct tg_uconn *probe;

    setup(1, 0);
    open_server(0);
    fake_now += 1000;
    take(&probe, NULL);
    tg_upstream_report(probe, 0);
    tg_upstream_release(probe, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_OPEN);
    cr_assert_eq(refused(), 2000);
}

Test(upstream, half_open_probe_on_one_server_others_serve)
{
    struct tg_uconn *probe;
    size_t i;

    setup(2, 0);
    open_server(0);
    fake_now += 1000;
    /* The cursor may be anywhere: find the probe. */
    for (;;) {
        if (take(&probe, NULL) == 0)
            break;
        tg_upstream_release(probe, 0);
    }
    for (i = 0; i < 4; i++)
        cr_assert_eq(take(NULL, NULL), 1, "server 0's probe is in flight");
    tg_upstream_report(probe, 1);
    tg_upstream_release(probe, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_CLOSED);
}

/* ---- report / abandon bookkeeping ---------------------------------------- */

Test(upstream, release_without_report_frees_probe_slot)
{
    struct tg_uconn *probe, *again;

    setup(1, 0);
    open_server(0);
    fake_now += 1000;
    take(&probe, NULL);
    refused();
    tg_upstream_release(probe, 0);     /* client went away: no outcome */
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_HALF_OPEN);
    take(&again, NULL);                /* a new probe */
    refused();
    tg_upstream_report(again, 1);
    tg_upstream_release(again, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_CLOSED);
}

Test(upstream, second_report_ignored)
{
    struct tg_uconn *uc;

    setup(1, 0);
    take(&uc, NULL);
    tg_upstream_report(uc, 0);
    tg_upstream_report(uc, 0);         /* ignored: one lending, one outcome */
    tg_upstream_release(uc, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_CLOSED);
    take(&uc, NULL);
    tg_upstream_report(uc, 0);
    tg_upstream_report(uc, 1);         /* ignored too */
    tg_upstream_release(uc, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_OPEN,
                 "the second lending's failure is the second in a row");
}

Test(upstream, success_resets_consecutive)
{
    struct tg_uconn *uc;
    int i;

    setup(1, 0);
    for (i = 0; i < 5; i++) {
        take(&uc, NULL);
        tg_upstream_report(uc, i % 2);  /* fail, ok, fail, ok, fail */
        tg_upstream_release(uc, 0);
    }
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_CLOSED);
}

/* A lending made before the breaker opened reports during the half-open
 * probe: its outcome must not count as the probe's, and releasing it
 * without a report must not free the probe's slot. */
Test(upstream, late_results_do_not_touch_the_probe)
{
    struct tg_uconn *late_fail, *late_silent, *a, *b, *probe;

    setup(1, 0);
    take(&late_fail, NULL);
    take(&late_silent, NULL);
    take(&a, NULL);
    take(&b, NULL);
    tg_upstream_report(a, 0);
    tg_upstream_release(a, 0);
    tg_upstream_report(b, 0);
    tg_upstream_release(b, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_OPEN);
    fake_now += 1000;
    take(&probe, NULL);
    tg_upstream_report(late_fail, 0);
    tg_upstream_release(late_fail, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_HALF_OPEN,
                 "a late failure reopened the breaker");
    tg_upstream_release(late_silent, 0);
    refused();                         /* the probe still holds the slot */
    tg_upstream_report(probe, 1);
    tg_upstream_release(probe, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_CLOSED);
}

/* An idle keep-alive connection is not lent while its server's breaker is
 * open; the half-open probe takes it. */
Test(upstream, idle_connection_waits_while_open)
{
    struct tg_uconn *keep, *uc;
    int reused = -1;

    setup(1, 0);
    take(&keep, NULL);
    open_server(0);
    tg_upstream_release(keep, 1);      /* clean: back to the idle list */
    refused();
    fake_now += 1000;
    uc = tg_upstream_acquire(pool, &reused, NULL, NULL);
    cr_assert_eq(uc, keep);
    cr_assert_eq(reused, 1);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_HALF_OPEN);
    tg_upstream_report(uc, 1);
    tg_upstream_release(uc, 0);
    cr_assert_eq(tg_upstream_server_state(pool, 0), TG_BREAKER_CLOSED);
}

/* Lend 64 connections at once, give them all back clean, lend 64 again:
 * how many of the second round were reused. */
static int
reused_after_64(void)
{
    struct tg_uconn *uc[64];
    int i, reused, n = 0;

    for (i = 0; i < 64; i++) {
        take(&uc[i], NULL);
    }
    for (i = 0; i < 64; i++) {
        tg_upstream_release(uc[i], 1);
    }
    for (i = 0; i < 64; i++) {
        uc[i] = tg_upstream_acquire(pool, &reused, NULL, NULL);
        cr_assert_not_null(uc[i]);
        n += reused;
    }
    for (i = 0; i < 64; i++) {
        tg_upstream_release(uc[i], 0);
    }
    return n;
}

/* The default (keepalive: auto) keeps every connection that was in use:
 * 64 concurrent exchanges leave 64 idle connections, none churns. */
Test(upstream, default_pool_keeps_what_the_concurrency_used)
{
    keepalive_line = "";
    setup(1, 0);
    cr_assert_eq(conf->upstream.keepalive, TG_UPSTREAM_KEEPALIVE_AUTO);
    cr_assert_eq(reused_after_64(), 64);
}

/* An explicit number still caps the idle list. */
Test(upstream, explicit_keepalive_caps_the_idle_list)
{
    keepalive_line = "  keepalive: 32\n";
    setup(1, 0);
    cr_assert_eq(reused_after_64(), 32);
}
