/*
 * test_health.c - active health checks against real servers: two
 * tg-testup processes (one killed: marked down in bounded time) and a
 * small in-test server that can be switched between 200, 503, silence and
 * garbage (down after `unhealthy` failures, up again after `healthy`
 * successes, never sooner).
 *
 * The checker runs on a private event base driven by the test thread in
 * short slices; every wait is a bounded poll of tg_health_up().
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/event.h>

#include "harness.h"
#include "tollgate/conf.h"
#include "tollgate/health.h"

#define INTERVAL_MS 150
#define TIMEOUT_MS  1000               /* generous: a starved test thread must
                                          not turn a 200 into a failure */
#define SHORT_TIMEOUT_MS 100           /* for the silent server */
#define HEALTHY     2
#define UNHEALTHY   2
#define MARGIN_MS   1500               /* scheduling slack on a busy box */

/* ---- a switchable in-test upstream --------------------------------------- */

enum { MODE_200, MODE_503, MODE_SILENT, MODE_GARBAGE, MODE_ALTERNATE };

typedef struct tserver {
    int          fd;                   /* listening socket */
    int          port;
    pthread_t    tid;
    atomic_int   mode;
    atomic_int   stop;
    atomic_long  n200;                 /* responses by kind */
    atomic_long  nfail;                /* 503, silence or garbage */
    atomic_long  nconn;                /* requests read (MODE_ALTERNATE) */
    char         last_req[1024];       /* last request head (under lock) */
    pthread_mutex_t lock;
} tserver;

static tserver ts;

/* Read a request head (bounded); 0 when complete. */
static int
read_head(int fd, char *buf, size_t cap)
{
    size_t len = 0;
    struct pollfd p = { .fd = fd, .events = POLLIN };
    ssize_t n;

    while (len + 1 < cap) {
        if (poll(&p, 1, 2000) <= 0)
            return -1;
        n = read(fd, buf + len, cap - 1 - len);
        if (n <= 0)
            return -1;
        len += (size_t)n;
        buf[len] = '\0';
        if (strstr(buf, "\r\n\r\n") != NULL)
            return 0;
    }
    return -1;
}

static void
write_all(int fd, const char *s)
{
    size_t len = strlen(s), off = 0;
    ssize_t n;

    while (off < len) {
        n = send(fd, s + off, len - off, MSG_NOSIGNAL);
        if (n <= 0)
            return;
        off += (size_t)n;
    }
}

static void *
tserver_main(void *arg)
{
    char buf[1024], sink[256];
    struct pollfd p = { .fd = ts.fd, .events = POLLIN };
    int c, mode;

    (void)arg;
    while (!atomic_load(&ts.stop)) {
        if (poll(&p, 1, 50) <= 0)
            continue;
        c = accept(ts.fd, NULL, NULL);
        if (c < 0)
            continue;
        if (read_head(c, buf, sizeof(buf)) == 0) {
            pthread_mutex_lock(&ts.lock);
            snprintf(ts.last_req, sizeof(ts.last_req), "%s", buf);
            pthread_mutex_unlock(&ts.lock);
            mode = atomic_load(&ts.mode);
            if (mode == MODE_ALTERNATE)       /* 503, 200, 503, 200... */
                mode = atomic_fetch_add(&ts.nconn, 1) % 2 ? MODE_200 : MODE_503;
            /* Counted before the answer: the checker may act on it
             * before this thread runs again. */
            switch (mode) {
            case MODE_200:
                atomic_fetch_add(&ts.n200, 1);
                write_all(c, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                             "Connection: close\r\n\r\nok\n");
                break;
            case MODE_503:
                atomic_fetch_add(&ts.nfail, 1);
                write_all(c, "HTTP/1.1 503 Service Unavailable\r\n"
                             "Content-Length: 0\r\nConnection: close\r\n\r\n");
                break;
            case MODE_SILENT: {
                /* Say nothing until the checker gives up and closes. */
                struct pollfd q = { .fd = c, .events = POLLIN };
                int r;
                atomic_fetch_add(&ts.nfail, 1);
                while (!atomic_load(&ts.stop)) {
                    r = poll(&q, 1, 100);
                    if (r < 0 || (r > 0 && read(c, sink, sizeof(sink)) <= 0))
                        break;
                }
                break;
            }
            default:
                atomic_fetch_add(&ts.nfail, 1);
                write_all(c, "NOT HTTP AT ALL\r\n\r\n");
                break;
            }
        }
        close(c);
    }
    return NULL;
}

static void
tserver_start(int mode)
{
    struct sockaddr_in sin;
    socklen_t len = sizeof(sin);

    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ts.fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(ts.fd, 0);
    cr_assert_eq(bind(ts.fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    cr_assert_eq(listen(ts.fd, 64), 0);
    cr_assert_eq(getsockname(ts.fd, (struct sockaddr *)&sin, &len), 0);
    ts.port = ntohs(sin.sin_port);
    atomic_store(&ts.mode, mode);
    pthread_mutex_init(&ts.lock, NULL);
    cr_assert_eq(pthread_create(&ts.tid, NULL, tserver_main, NULL), 0);
}

static void
tserver_stop(void)
{
    atomic_store(&ts.stop, 1);
    pthread_join(ts.tid, NULL);
    close(ts.fd);
}

/* ---- the checker on a private base ------------------------------------ */

static struct event_base *base;
static tg_conf *conf;
static struct tg_health *health;

static void
checker_start(const char *servers, int timeout_ms)
{
    char yaml[1024], err[TG_CONF_ERRLEN];

    snprintf(yaml, sizeof(yaml),
             "listen:\n  - address: 127.0.0.1:0\n"
             "upstream:\n  servers: [%s]\n"
             "  health_check: { path: /health, interval_ms: %d, timeout_ms: %d,"
             " healthy: %d, unhealthy: %d }\n",
             servers, INTERVAL_MS, timeout_ms, HEALTHY, UNHEALTHY);
    conf = tg_conf_load_string("t.yaml", yaml, strlen(yaml), err, sizeof(err));
    cr_assert_not_null(conf, "%s", err);
    base = event_base_new();
    cr_assert_not_null(base);
    health = tg_health_create(base, conf);
    cr_assert_not_null(health);
}

static void
fini(void)
{
    tg_health_destroy(health);
    if (conf != NULL)
        tg_conf_unref(conf);
    if (base != NULL)
        event_base_free(base);
    tgh_cleanup();
}

TestSuite(health, .fini = fini, .timeout = 120);

/* Run the checker's loop for about ms milliseconds. */
static void
run_ms(int ms)
{
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };

    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
}

/* Poll until server's flag is want; returns the elapsed ms, or -1 after
 * timeout_ms. */
static long
wait_flag(size_t server, int want, int timeout_ms)
{
    uint64_t t0 = tgh_now_ms();

    while (tgh_now_ms() - t0 < (uint64_t)timeout_ms) {
        run_ms(10);
        if (tg_health_up(health, server) == want)
            return (long)(tgh_now_ms() - t0);
    }
    return -1;
}

/* ---- tests -------------------------------------------------------------- */

Test(health, testup_pair_up_then_killed_one_down)
{
    tgh_upstream a, b;
    tgh_stats sa, sb;
    uint64_t t0;
    char servers[128];
    long ms;
    int bound = INTERVAL_MS * UNHEALTHY + TIMEOUT_MS + MARGIN_MS;

    TGH_CHECK(tgh_testup_start(&a) == 0, "tg-testup a");
    TGH_CHECK(tgh_testup_start(&b) == 0, "tg-testup b");
    snprintf(servers, sizeof(servers), "127.0.0.1:%d, 127.0.0.1:%d", a.port, b.port);
    checker_start(servers, TIMEOUT_MS);
    cr_assert_eq(tg_health_server_count(health), 2);
    cr_assert_eq(tg_health_up(health, 0), 1, "servers start up");
    cr_assert_eq(tg_health_up(health, 1), 1);

    /* A few rounds: the checks really reach both, and both stay up. */
    t0 = tgh_now_ms();
    for (;;) {
        TGH_CHECK(tgh_testup_stats(a.port, &sa) == 0, "stats a");
        TGH_CHECK(tgh_testup_stats(b.port, &sb) == 0, "stats b");
        if (sa.requests >= 3 && sb.requests >= 3)
            break;
        TGH_CHECK(tgh_now_ms() - t0 < 10000, "checks in 10 s: a %ld, b %ld",
                  sa.requests, sb.requests);
        run_ms(20);
        cr_assert_eq(tg_health_up(health, 0), 1);
        cr_assert_eq(tg_health_up(health, 1), 1);
    }
    run_ms(20);
    cr_assert_eq(tg_health_up(health, 0), 1);
    cr_assert_eq(tg_health_up(health, 1), 1);

    tgh_proc_signal(b.proc, SIGKILL, 1);
    TGH_CHECK(tgh_proc_wait(b.proc, 5000) == 0, "tg-testup b did not die");
    ms = wait_flag(1, 0, bound);
    TGH_CHECK(ms >= 0, "killed server not marked down within %d ms", bound);
    cr_assert_eq(tg_health_up(health, 0), 1, "the live server stays up");
    run_ms(INTERVAL_MS * 3);
    cr_assert_eq(tg_health_up(health, 0), 1);
    cr_assert_eq(tg_health_up(health, 1), 0, "a dead server stays down");
}

Test(health, status_503_down_then_200_up_with_counts)
{
    char servers[64];
    long ms, before;
    uint64_t t0;
    int down_bound = INTERVAL_MS * UNHEALTHY + TIMEOUT_MS + MARGIN_MS;
    int up_bound = INTERVAL_MS * HEALTHY + TIMEOUT_MS + MARGIN_MS;

    tserver_start(MODE_200);
    snprintf(servers, sizeof(servers), "127.0.0.1:%d", ts.port);
    checker_start(servers, TIMEOUT_MS);
    t0 = tgh_now_ms();
    while (atomic_load(&ts.n200) < 2) {
        cr_assert_lt(tgh_now_ms() - t0, 10000, "fewer than 2 checks in 10 s");
        run_ms(10);
    }
    run_ms(20);
    cr_assert_eq(tg_health_up(health, 0), 1);

    /* The request: GET <path> HTTP/1.1 with a Host, closing. */
    pthread_mutex_lock(&ts.lock);
    cr_assert(strncmp(ts.last_req, "GET /health HTTP/1.1\r\n", 22) == 0,
              "request was: %s", ts.last_req);
    cr_assert(strstr(ts.last_req, "\r\nConnection: close\r\n") != NULL);
    cr_assert(strstr(ts.last_req, "\r\nHost: 127.0.0.1:") != NULL);
    pthread_mutex_unlock(&ts.lock);

    before = atomic_load(&ts.nfail);
    atomic_store(&ts.mode, MODE_503);
    ms = wait_flag(0, 0, down_bound);
    cr_assert_geq(ms, 0, "503 server not marked down within %d ms", down_bound);
    cr_assert_geq(atomic_load(&ts.nfail) - before, UNHEALTHY,
                  "down after fewer than %d failures", UNHEALTHY);

    before = atomic_load(&ts.n200);
    atomic_store(&ts.mode, MODE_200);
    ms = wait_flag(0, 1, up_bound);
    cr_assert_geq(ms, 0, "recovered server not marked up within %d ms", up_bound);
    cr_assert_geq(atomic_load(&ts.n200) - before, HEALTHY,
                  "up after fewer than %d successes", HEALTHY);
    tserver_stop();
}

/* One success between failures restarts the count: 503, 200, 503, 200...
 * (the server alternates by itself, whatever the timing) never reaches
 * `unhealthy` failures in a row. */
Test(health, alternating_never_down)
{
    char servers[64];
    uint64_t t0;

    tserver_start(MODE_ALTERNATE);
    snprintf(servers, sizeof(servers), "127.0.0.1:%d", ts.port);
    checker_start(servers, TIMEOUT_MS);
    t0 = tgh_now_ms();
    while (atomic_load(&ts.nfail) < 4 || atomic_load(&ts.n200) < 4) {
        cr_assert_lt(tgh_now_ms() - t0, 20000, "too few checks in 20 s");
        run_ms(10);
        cr_assert_eq(tg_health_up(health, 0), 1, "down after one failure");
    }
    run_ms(50);
    cr_assert_eq(tg_health_up(health, 0), 1);
    tserver_stop();
}

Test(health, silent_server_times_out_down)
{
    char servers[64];
    long ms;
    int bound = (INTERVAL_MS + SHORT_TIMEOUT_MS) * UNHEALTHY + MARGIN_MS;

    tserver_start(MODE_SILENT);
    snprintf(servers, sizeof(servers), "127.0.0.1:%d", ts.port);
    checker_start(servers, SHORT_TIMEOUT_MS);
    ms = wait_flag(0, 0, bound);
    cr_assert_geq(ms, 0, "silent server not marked down within %d ms", bound);
    cr_assert_geq(ms, SHORT_TIMEOUT_MS, "down before a check could time out "
                  "(%ld ms)", ms);
    tserver_stop();
}

Test(health, garbage_response_is_a_failure)
{
    char servers[64];
    long ms;
    int bound = INTERVAL_MS * UNHEALTHY + TIMEOUT_MS + MARGIN_MS;

    tserver_start(MODE_GARBAGE);
    snprintf(servers, sizeof(servers), "127.0.0.1:%d", ts.port);
    checker_start(servers, TIMEOUT_MS);
    ms = wait_flag(0, 0, bound);
    cr_assert_geq(ms, 0, "garbage server not marked down within %d ms", bound);
    tserver_stop();
}

/* Without a health_check block there is no checker: every server is up. */
Test(health, not_configured_is_null_and_up)
{
    char err[TG_CONF_ERRLEN];
    const char *yaml = "listen:\n  - address: 127.0.0.1:0\n"
                       "upstream:\n  servers: [127.0.0.1:1]\n";
    tg_conf *c = tg_conf_load_string("t.yaml", yaml, strlen(yaml), err, sizeof(err));

    cr_assert_not_null(c, "%s", err);
    base = event_base_new();
    cr_assert_null(tg_health_create(base, c));
    cr_assert_eq(tg_health_up(NULL, 0), 1);
    cr_assert_eq(tg_health_server_count(NULL), 0);
    tg_conf_unref(c);
}
