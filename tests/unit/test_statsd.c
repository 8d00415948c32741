/*
 * test_statsd.c - the StatsD exporter over a real loopback UDP socket: the
 * timer sends the counters' deltas every flush_ms, tg_statsd_flush sends
 * at once, only what changed is sent again, and nothing waits on a
 * receiver that is gone.  (The line format and packing are tested in
 * test_metrics.c.)
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>

#include "tollgate/conf.h"
#include "tollgate/metrics.h"
#include "tollgate/statsd.h"

static const char *const tiers[] = { "basic" };

static struct event_base *base;
static tg_conf *conf;
static struct tg_metrics_shard *shard;
static int rx = -1;                /* the receiver: a bound UDP socket */

/* A receiver on 127.0.0.1, and a config sending to it every flush_ms. */
static void
setup_flush(unsigned flush_ms)
{
    struct sockaddr_in sin = { .sin_family = AF_INET };
    socklen_t sl = sizeof(sin);
    char yaml[512], err[TG_CONF_ERRLEN];

    rx = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(rx, 0);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(bind(rx, (struct sockaddr *)&sin, sizeof(sin)), 0);
    cr_assert_eq(getsockname(rx, (struct sockaddr *)&sin, &sl), 0);
    snprintf(yaml, sizeof(yaml),
             "listen: [ { address: 127.0.0.1:8080 } ]\n"
             "upstream: { servers: [127.0.0.1:8000] }\n"
             "metrics: { statsd: { address: 127.0.0.1:%d, prefix: tg, flush_ms: %u } }\n",
             ntohs(sin.sin_port), flush_ms);
    conf = tg_conf_load_string("t.yaml", yaml, strlen(yaml), err, sizeof(err));
    cr_assert_not_null(conf, "%s", err);
    cr_assert_eq(tg_metrics_init(tiers, 1, NULL, 0, NULL, 0), TG_OK);
    shard = tg_metrics_shard_create();
    base = event_base_new();
}

static void
setup(void)
{
    setup_flush(100);
}

static void
teardown(void)
{
    event_base_free(base);
    tg_metrics_shard_destroy(shard);
    tg_metrics_deinit();
    tg_conf_unref(conf);
    if (rx >= 0) {
        close(rx);
    }
    rx = -1;
}

/* The datagrams of one flush, one line each ('\n'-separated, the last
 * line of a datagram without one), NUL-terminated in buf: the first
 * within timeout_ms, then those already queued.  The length; 0 if none. */
static size_t
receive(char *buf, size_t len, int timeout_ms)
{
    struct pollfd p = { .fd = rx, .events = POLLIN };
    size_t have = 0;

    while (have + 2 < len && poll(&p, 1, have == 0 ? timeout_ms : 0) == 1) {
        ssize_t n = recv(rx, buf + have, len - 2 - have, 0);
        cr_assert_gt(n, 0);
        have += (size_t)n;
        if (buf[have - 1] != '\n') {
            buf[have++] = '\n';
        }
    }
    buf[have] = '\0';
    return have;
}

/* True if text holds line as a whole line. */
static int
has_line(const char *text, const char *line)
{
    size_t n = strlen(line);

    for (const char *p = strstr(text, line); p != NULL; p = strstr(p + 1, line)) {
        if ((p == text || p[-1] == '\n') && p[n] == '\n') {
            return 1;
        }
    }
    return 0;
}

static void
stop_cb(evutil_socket_t fd, short what, void *arg)
{
    TG_UNUSED(fd);
    TG_UNUSED(what);
    event_base_loopbreak(arg);
}

/* Run the base until the receiver has a datagram, up to 5 s. */
static void
run_until_datagram(void)
{
    struct event *rd = event_new(base, rx, EV_READ, stop_cb, base);
    struct event *limit = evtimer_new(base, stop_cb, base);
    struct timeval five = { 5, 0 };

    event_add(rd, NULL);
    evtimer_add(limit, &five);
    event_base_dispatch(base);
    event_free(rd);
    event_free(limit);
}

Test(statsd, timer_sends_deltas, .init = setup, .fini = teardown)
{
    struct tg_metrics_shard *sh[1];
    struct tg_statsd *sd;
    char buf[16384];

    sh[0] = shard;
    sd = tg_statsd_create(base, conf, sh, 1);
    cr_assert_not_null(sd);
    tg_metric_add(shard, TG_M_REQUESTS, tg_metrics_tier_status(0, 200), 7);

    run_until_datagram();
    cr_assert_gt(receive(buf, sizeof(buf), 0), 0, "no datagram within 5 s");
    cr_assert(has_line(buf, "tg.requests.basic.200:7|c"), "%s", buf);

    /* flush at once: only the new delta, not the 7 again */
    tg_metric_add(shard, TG_M_REQUESTS, tg_metrics_tier_status(0, 200), 2);
    tg_statsd_flush(sd);
    cr_assert_gt(receive(buf, sizeof(buf), 2000), 0);
    cr_assert(has_line(buf, "tg.requests.basic.200:2|c"), "%s", buf);
    cr_assert_null(strstr(buf, ":7|c"), "%s", buf);
    tg_statsd_destroy(sd);
}

/* No receiver (its socket closed: ICMP port unreachable, ECONNREFUSED on
 * a later send): every flush still returns at once. */
Test(statsd, receiver_gone, .init = setup, .fini = teardown)
{
    struct tg_metrics_shard *sh[1] = { shard };
    struct tg_statsd *sd = tg_statsd_create(base, conf, sh, 1);

    cr_assert_not_null(sd);
    close(rx);
    rx = -1;
    for (int i = 0; i < 20; i++) {
        tg_metric_inc(shard, TG_M_REQUESTS, tg_metrics_tier_status(0, 200));
        tg_statsd_flush(sd);
    }
    tg_statsd_destroy(sd);
}

Test(statsd, destroy_null)
{
    tg_statsd_destroy(NULL);
}
