/*
 * test_redis.c - the Redis client (src/redis.c) against a real
 * redis-server started by each test on an ephemeral loopback port (by the
 * harness: tests/integration/harness.h), and against a fake server, forked
 * here, that answers nonsense.
 *
 * The event loop is driven with event_base_loop(EVLOOP_ONCE) until a
 * condition holds or a generous deadline passes (a 5 ms tick keeps every
 * turn bounded); nothing sleeps for a fixed time.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/sockios.h>
#include <event2/event.h>
#include <hiredis/hiredis.h>

#include "harness.h"
#include "tollgate/common.h"
#include "tollgate/gcra.h"
#include "tollgate/redis.h"

static struct event_base *g_base;
static tgh_upstream g_redis;         /* the real server */
static pid_t g_fake = -1;            /* the fake one */
static int g_port;

/* ------------------------------------------------------------------ */
/* processes and ports                                                 */

/* A blocking command on a fresh connection (test setup only). */
static redisReply *
sync_cmd(int port, const char *fmt, ...)
{
    struct timeval tv = { 1, 0 };
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    redisReply *rep = NULL;
    va_list ap;

    if (c == NULL || c->err) {
        if (c) redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    va_start(ap, fmt);
    rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    return rep;
}

/* The real server: on a free port, or on port when it is > 0. */
static void
redis_start(tgh_upstream *u, int port)
{
    memset(u, 0, sizeof(*u));
    u->port = port;
    TGH_CHECK(tgh_redis_start(u) == 0, "redis-server did not start");
}

static void
proc_kill(pid_t *pid)
{
    if (*pid > 0) {
        kill(*pid, SIGKILL);
        waitpid(*pid, NULL, 0);
        *pid = -1;
    }
}

/* ------------------------------------------------------------------ */
/* fake server: one reply per RESP command, always the same nonsense   */

/* Bytes of the first complete RESP multibulk command in buf, 0 if
 * incomplete, -1 if it is not one. */
static long
resp_command_len(const char *buf, size_t len)
{
    const char *p = buf, *end = buf + len, *nl;
    long n, l;

    if (len == 0) return 0;
    if (*p != '*') return -1;
    if ((nl = memchr(p, '\n', (size_t)(end - p))) == NULL) return 0;
    n = strtol(p + 1, NULL, 10);
    p = nl + 1;
    for (long i = 0; i < n; i++) {
        if (p >= end) return 0;
        if (*p != '$') return -1;
        if ((nl = memchr(p, '\n', (size_t)(end - p))) == NULL) return 0;
        l = strtol(p + 1, NULL, 10);
        p = nl + 1;
        if (end - p < l + 2) return 0;
        p += l + 2;
    }
    return p - buf;
}

static int g_fake_stream;           /* after the answer: bytes forever */
static int g_fake_close;            /* after the answer: close */

/* Write filler until the peer goes away (a bulk that never ends). */
static void
fake_stream(int fd)
{
    static char fill[1 << 16];

    memset(fill, 'x', sizeof(fill));
    while (write(fd, fill, sizeof(fill)) > 0) {
    }
}

static void
fake_serve(int lfd, const char *answer)
{
    static char buf[1 << 20];

    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        size_t have = 0;
        if (fd < 0) continue;
        for (;;) {
            ssize_t got = read(fd, buf + have, sizeof(buf) - have);
            long used;
            if (got <= 0) break;
            have += (size_t)got;
            while ((used = resp_command_len(buf, have)) > 0) {
                if (write(fd, answer, strlen(answer)) < 0) break;
                if (g_fake_stream) fake_stream(fd);
                if (g_fake_close) break;
                memmove(buf, buf + used, have - (size_t)used);
                have -= (size_t)used;
            }
            if (used < 0 || have == sizeof(buf) || (g_fake_close && used > 0)) break;
        }
        close(fd);
    }
}

/* Start a fake server answering `answer` to every command; its port. */
static int
fake_start(const char *answer)
{
    struct sockaddr_in sa = { .sin_family = AF_INET };
    socklen_t len = sizeof(sa);
    int lfd = socket(AF_INET, SOCK_STREAM, 0);

    cr_assert(lfd >= 0);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
    cr_assert(listen(lfd, 16) == 0);
    cr_assert(getsockname(lfd, (struct sockaddr *)&sa, &len) == 0);
    g_fake = fork();
    cr_assert(g_fake >= 0);
    if (g_fake == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        fake_serve(lfd, answer);
        _exit(0);
    }
    close(lfd);
    return ntohs(sa.sin_port);
}

/* ------------------------------------------------------------------ */
/* loop driving                                                        */

static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
}

typedef int (*cond_fn)(const void *arg);

/* Run the loop until cond(arg) or timeout_ms; returns cond(arg). */
static int
run_until(cond_fn cond, const void *arg, unsigned timeout_ms)
{
    struct event *tick = event_new(g_base, -1, EV_PERSIST, tick_cb, NULL);
    struct timeval tv = { 0, 5000 };
    uint64_t deadline = tg_now_ms() + timeout_ms;

    event_add(tick, &tv);
    while (!cond(arg) && tg_now_ms() < deadline) {
        event_base_loop(g_base, EVLOOP_ONCE);
    }
    event_free(tick);
    return cond(arg);
}

static int
cond_ready(const void *arg)
{
    return tg_redis_ready(arg);
}

static int
cond_not_ready(const void *arg)
{
    return !tg_redis_ready(arg);
}

typedef struct want {
    const int *v;
    int        n;
} want;

static int
cond_count(const void *arg)
{
    const want *w = arg;
    return *w->v >= w->n;
}

struct reconn_want {
    const struct tg_redis *r;
    uint64_t               n;
};

static int
cond_reconnects(const void *arg)
{
    const struct reconn_want *w = arg;
    tg_redis_stats st;

    tg_redis_get_stats(w->r, &st);
    return st.reconnects >= w->n;
}

static int
wait_count(const int *v, int n, unsigned timeout_ms)
{
    want w = { v, n };
    return run_until(cond_count, &w, timeout_ms);
}

/* ------------------------------------------------------------------ */
/* callbacks                                                           */

typedef struct charge_res {
    int            called;
    tg_rc          rc;
    tg_gcra_result res;
    uint64_t       at_ms;
    int           *done;           /* shared counter, may be NULL */
} charge_res;

static void
on_charge(void *arg, tg_rc rc, const tg_gcra_result *res)
{
    charge_res *c = arg;

    c->called++;
    c->rc = rc;
    if (res != NULL) {
        c->res = *res;
    }
    cr_assert((rc == TG_OK) == (res != NULL));
    c->at_ms = tg_now_ms();
    if (c->done) {
        (*c->done)++;
    }
}

typedef struct str_res {
    int    called;
    tg_rc  rc;
    char   val[64];
    size_t len;
    int    isnull;
} str_res;

static void
on_str(void *arg, tg_rc rc, const char *value, size_t len)
{
    str_res *s = arg;

    s->called++;
    s->rc = rc;
    s->isnull = value == NULL;
    s->len = len;
    if (value != NULL && len < sizeof(s->val)) {
        memcpy(s->val, value, len);
    }
}

/* redis.native off for the next client() (a test of the script's path). */
static int g_no_native;

/* Under TG_REDIS_MODULE (integration_redis_native) every redis-server runs
 * tollgate-redis.so and every client here charges with TOLLGATE.CHARGE. */
static int
native_run(void)
{
    const char *m = getenv("TG_REDIS_MODULE");

    return m != NULL && *m != '\0';
}

/* INFO commandstats' calls of cmd ("evalsha", "tollgate.charge") at port. */
static long long
cmd_calls(int port, const char *cmd)
{
    redisReply *rep = sync_cmd(port, "INFO commandstats");
    char needle[64];
    const char *p;
    long long n = 0;

    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STRING);
    snprintf(needle, sizeof(needle), "cmdstat_%s:calls=", cmd);
    p = strstr(rep->str, needle);
    if (p != NULL) {
        n = strtoll(p + strlen(needle), NULL, 10);
    }
    freeReplyObject(rep);
    return n;
}

static struct tg_redis *
client(int port, unsigned timeout_ms, unsigned max_batch, int wait_ready)
{
    tg_redis_opts o;
    struct tg_redis *r;

    memset(&o, 0, sizeof(o));
    o.no_native = g_no_native;
    snprintf(o.host, sizeof(o.host), "127.0.0.1");
    o.port = port;
    o.timeout_ms = timeout_ms;
    o.max_batch = max_batch;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    if (wait_ready) {
        cr_assert(run_until(cond_ready, r, 5000), "client never became ready");
    }
    return r;
}

/* One charge of cost 1 to one bucket. */
static struct tg_redis_op *
charge1(struct tg_redis *r, const char *key, tg_gcra_limit lim, charge_res *c)
{
    const char *keys[1] = { key };
    return tg_redis_charge(r, keys, &lim, 1, 1, on_charge, c);
}

/* Charge until one succeeds (after a disruption); 1 on success. */
static int
charge_ok_eventually(struct tg_redis *r, unsigned timeout_ms)
{
    uint64_t deadline = tg_now_ms() + timeout_ms;
    tg_gcra_limit lim = tg_gcra_per_second(1000, 1000);

    while (tg_now_ms() < deadline) {
        charge_res c = { 0 };
        charge1(r, "t:probe", lim, &c);
        want w = { &c.called, 1 };
        if (!run_until(cond_count, &w, 5000)) {
            return 0;
        }
        if (c.rc == TG_OK && c.res.allowed == 1) {
            return 1;
        }
        run_until(cond_ready, r, 200);
    }
    return 0;
}

static void
setup(void)
{
    g_base = event_base_new();
    cr_assert_not_null(g_base);
    redis_start(&g_redis, 0);
    g_port = g_redis.port;
}

static void
teardown(void)
{
    proc_kill(&g_fake);
    tgh_cleanup();
    if (g_base) {
        event_base_free(g_base);
        g_base = NULL;
    }
}

/* ------------------------------------------------------------------ */
/* tests                                                               */

TestSuite(redis, .init = setup, .fini = teardown, .timeout = 120);

Test(redis, batch_of_100_distinct_keys)
{
    enum { N = 100, BATCH = 16 };
    struct tg_redis *r = client(g_port, 1000, BATCH, 1);
    static charge_res c[N];
    char key[N][32];
    int done = 0;
    tg_gcra_limit lim = tg_gcra_per_minute(60, 10);
    tg_redis_stats st;

    for (int i = 0; i < N; i++) {
        snprintf(key[i], sizeof(key[i]), "t:{k%d}:tier", i);
        c[i] = (charge_res){ .done = &done };
        charge1(r, key[i], lim, &c[i]);
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.calls, 0, "nothing is sent from inside tg_redis_charge");
    cr_assert_eq(done, 0);
    cr_assert(wait_count(&done, N, 10000));
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.calls, (N + BATCH - 1) / BATCH, "calls = %llu",
                 (unsigned long long)st.calls);
    cr_assert_eq(st.charges, N);
    cr_assert_eq(st.errors, 0);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].called, 1);
        cr_assert_eq(c[i].rc, TG_OK);
        cr_assert_eq(c[i].res.allowed, 1, "request %d", i);
        cr_assert_eq(c[i].res.remaining, 9, "request %d: remaining %u", i,
                     c[i].res.remaining);
        cr_assert_eq(c[i].res.retry_us, 0);
        cr_assert_eq(c[i].res.limiting, 0);
    }
    /* the buckets exist in Redis, with a TTL */
    redisReply *rep = sync_cmd(g_port, "PTTL %s", key[0]);
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_INTEGER && rep->integer > 0);
    freeReplyObject(rep);
    tg_redis_destroy(r);
}

/* Charges queued over several loop turns while a call is in flight (Redis
 * paused) wait for its answer and then go as one call, not one call per
 * turn; one whose own deadline comes first fails at that deadline, not
 * when the call in flight is answered. */
Test(redis, charges_wait_for_the_call_in_flight)
{
    enum { N = 11 };
    struct tg_redis *r = client(g_port, 3000, 32, 1);
    static charge_res c[N], late;
    char key[N][32];
    int done = 0;
    tg_gcra_limit lim = tg_gcra_per_minute(60, 20);
    tg_redis_stats st;
    redisReply *rep;
    struct tg_redis_op *op;
    uint64_t t0;

    rep = sync_cmd(g_port, "CLIENT PAUSE 600 ALL");
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STATUS, "CLIENT PAUSE");
    freeReplyObject(rep);
    for (int i = 0; i < N; i++) {
        snprintf(key[i], sizeof(key[i]), "t:{held%d}:tier", i);
        c[i] = (charge_res){ .done = &done };
        charge1(r, key[i], lim, &c[i]);
        event_base_loop(g_base, EVLOOP_NONBLOCK);       /* one loop turn */
    }
    t0 = tg_now_ms();
    late = (charge_res){ 0 };
    op = charge1(r, "t:{held}:late", lim, &late);
    tg_redis_op_deadline(op, tg_now_us() + 100000);
    event_base_loop(g_base, EVLOOP_NONBLOCK);
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.calls, 1, "held while the first call is in flight: %llu calls",
                 (unsigned long long)st.calls);
    want w = { &late.called, 1 };
    cr_assert(run_until(cond_count, &w, 5000));
    cr_assert_eq(late.rc, TG_ERR);
    cr_assert_lt(tg_now_ms() - t0, 450, "failed at its own deadline (100 ms)");
    cr_assert_eq(done, 0, "Redis is still paused");
    cr_assert(wait_count(&done, N, 5000));
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.calls, 2, "calls = %llu", (unsigned long long)st.calls);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].rc, TG_OK);
        cr_assert_eq(c[i].res.allowed, 1);
        cr_assert_eq(c[i].res.remaining, 19);
    }
    tg_redis_destroy(r);
}

static int
cond_calls(const void *arg)
{
    const struct reconn_want *w = arg;
    tg_redis_stats st;

    tg_redis_get_stats(w->r, &st);
    return st.calls >= w->n;
}

/* A call in flight is waited for at most timeout_ms / 4 (here 100 ms):
 * past that the charges held go out anyway (a stuck connection still
 * meets its deadlines in a row). */
Test(redis, a_slow_call_holds_the_others_briefly)
{
    struct tg_redis *r = client(g_port, 400, 32, 1);
    static charge_res c[2];
    int done = 0;
    tg_gcra_limit lim = tg_gcra_per_minute(60, 20);
    struct reconn_want w = { r, 2 };
    redisReply *rep;
    uint64_t t0;

    rep = sync_cmd(g_port, "CLIENT PAUSE 300 ALL");
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STATUS, "CLIENT PAUSE");
    freeReplyObject(rep);
    t0 = tg_now_ms();
    for (int i = 0; i < 2; i++) {
        c[i] = (charge_res){ .done = &done };
        charge1(r, i == 0 ? "t:{slow}:a" : "t:{slow}:b", lim, &c[i]);
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    cr_assert(run_until(cond_calls, &w, 1000), "the held charge was never sent");
    cr_assert_geq(tg_now_ms() - t0, 90, "sent after %llu ms, before the 100 ms hold",
                  (unsigned long long)(tg_now_ms() - t0));
    cr_assert_lt(tg_now_ms() - t0, 280, "sent only after the answer");
    cr_assert(wait_count(&done, 2, 5000));
    cr_assert(c[0].rc == TG_OK && c[1].rc == TG_OK);
    tg_redis_destroy(r);
}

static int
cond_refunds(const void *arg)
{
    const struct reconn_want *w = arg;
    tg_redis_stats st;

    tg_redis_get_stats(w->r, &st);
    return st.refunds >= w->n;
}

/* A call in flight (Redis paused), charges held behind it, and then the
 * connection is reset (redis-server killed): every charge, sent or held,
 * is answered exactly once, with an error, and nothing more comes later. */
Test(redis, held_charges_on_a_reset)
{
    enum { N = 6 };
    struct tg_redis *r = client(g_port, 3000, 32, 1);
    static charge_res c[N];
    int done = 0;
    tg_gcra_limit lim = tg_gcra_per_minute(60, 20);
    redisReply *rep;
    tg_redis_stats st;
    uint64_t t0;

    rep = sync_cmd(g_port, "CLIENT PAUSE 5000 ALL");
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STATUS, "CLIENT PAUSE");
    freeReplyObject(rep);
    for (int i = 0; i < N; i++) {
        char key[32];
        snprintf(key, sizeof(key), "t:{reset%d}:tier", i);
        c[i] = (charge_res){ .done = &done };
        charge1(r, key, lim, &c[i]);
        event_base_loop(g_base, EVLOOP_NONBLOCK);       /* one loop turn */
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.calls, 1, "the others are held: %llu calls",
                 (unsigned long long)st.calls);
    cr_assert_eq(done, 0);
    t0 = tg_now_ms();
    cr_assert_eq(kill(g_redis.proc->pid, SIGKILL), 0);
    cr_assert(wait_count(&done, N, 5000), "%d of %d answered after the reset", done, N);
    cr_assert_lt(tg_now_ms() - t0, 1000, "answered %llu ms after the reset, not at once",
                 (unsigned long long)(tg_now_ms() - t0));
    run_until(cond_not_ready, r, 300);
    for (int k = 0; k < 20; k++) {                      /* anything late shows here */
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].called, 1, "charge %d answered %d times", i, c[i].called);
        cr_assert_eq(c[i].rc, TG_ERR, "charge %d", i);
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.errors, N);
    cr_assert_eq(st.charges, 0);
    tg_redis_destroy(r);
}

/* Charges sent behind a slow call (the hold ran out) and then past their
 * deadline: each is answered once (TG_ERR, at its deadline), and when the
 * late replies come, what they charged is given back: the buckets are
 * whole again. */
Test(redis, late_replies_after_a_hold_are_given_back)
{
    enum { N = 3 };
    struct tg_redis *r = client(g_port, 400, 32, 1);
    static charge_res c[N];
    int done = 0;
    tg_gcra_limit lim = tg_gcra_per_minute(60, 20);
    struct reconn_want w = { r, N };
    redisReply *rep;
    char key[N][32];

    rep = sync_cmd(g_port, "CLIENT PAUSE 900 ALL");
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STATUS, "CLIENT PAUSE");
    freeReplyObject(rep);
    for (int i = 0; i < N; i++) {
        snprintf(key[i], sizeof(key[i]), "t:{late%d}:tier", i);
        c[i] = (charge_res){ .done = &done };
        charge1(r, key[i], lim, &c[i]);
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    cr_assert(wait_count(&done, N, 3000));
    for (int i = 0; i < N; i++) {
        cr_assert(c[i].called == 1 && c[i].rc == TG_ERR, "charge %d: %d calls, rc %d", i,
                  c[i].called, c[i].rc);
    }
    cr_assert(run_until(cond_refunds, &w, 5000), "the late charges were not given back");
    for (int k = 0; k < 20; k++) {
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    for (int i = 0; i < N; i++) {
        charge_res again = { 0 };
        cr_assert_eq(c[i].called, 1, "charge %d answered again", i);
        charge1(r, key[i], lim, &again);
        cr_assert(wait_count(&again.called, 1, 5000));
        cr_assert(again.rc == TG_OK && again.res.allowed == 1);
        cr_assert_eq(again.res.remaining, 19, "bucket %d: remaining %u (the late charge "
                     "was kept)", i, again.res.remaining);
    }
    tg_redis_destroy(r);
}

static long long redis_now_us(void);
static long long redis_get_ll(const char *key);

/* Calls of command cmd (lower case) since the last CONFIG RESETSTAT. */
static long long
redis_cmdstat_calls(const char *cmd)
{
    redisReply *rep = sync_cmd(g_port, "INFO commandstats");
    char needle[64];
    const char *p;
    long long n = 0;

    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STRING, "INFO commandstats");
    snprintf(needle, sizeof(needle), "cmdstat_%s:calls=", cmd);
    if ((p = strstr(rep->str, needle)) != NULL) {
        n = atoll(p + strlen(needle));
    }
    freeReplyObject(rep);
    return n;
}

/* CPU time of this process (the client's loop), in ms. */
static uint64_t
cpu_ms(void)
{
    struct rusage ru;

    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)ru.ru_utime.tv_sec * 1000 + (uint64_t)ru.ru_utime.tv_usec / 1000
           + (uint64_t)ru.ru_stime.tv_sec * 1000 + (uint64_t)ru.ru_stime.tv_usec / 1000;
}

/* Bytes this process has queued, unsent or unacknowledged, on its TCP
 * connections to port (SIOCOUTQ): the socket is full when Redis reads
 * nothing and this stays high. */
static long
outq_to(int port)
{
    long total = 0;

    for (int fd = 3; fd < 1024; fd++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        int q = 0;

        if (getpeername(fd, (struct sockaddr *)&ss, &len) != 0 || ss.ss_family != AF_INET
            || ntohs(((struct sockaddr_in *)&ss)->sin_port) != port) {
            continue;
        }
        if (ioctl(fd, SIOCOUTQ, &q) == 0) {
            total += q;
        }
    }
    return total;
}

static void
long_key(char *buf, size_t size, const char *tag, int i)
{
    int n = snprintf(buf, size, "t:{%s}:%d:", tag, i);

    memset(buf + n, 'k', size - 1 - (size_t)n);
    buf[size - 1] = '\0';
}

/*
 * Redis stopped (SIGSTOP) while charges keep coming in full batches of
 * long keys, until the connection's socket is full (the kernel holds
 * megabytes, hiredis the rest): no answer comes, and the loop sleeps
 * (no busy loop on a socket that stays full).  After SIGCONT every charge
 * is answered exactly once, within its deadline, and Redis holds exactly
 * what the admitted charges added (a shared bucket counts them: a write
 * lost or sent twice shows there).
 */
Test(redis, a_full_socket_while_redis_is_stopped)
{
    enum { TURNS = 50, PER = 1000, N = TURNS * PER };
    const uint64_t T = 3600ull * 1000000;        /* 1 token an hour: no refill */
    struct tg_redis *r = client(g_port, 10000, PER, 1);
    static charge_res c[N];
    static char key[180];
    tg_gcra_limit lim[2] = { tg_gcra_per_minute(60, 10), { T, 1000000 } };
    int done = 0;
    uint64_t cpu0, t0, cpu, wall;
    long outq;
    long long tat, now;
    tg_redis_stats st;

    cr_assert(charge_ok_eventually(r, 5000));
    cr_assert_eq(kill(g_redis.proc->pid, SIGSTOP), 0);
    for (int t = 0; t < TURNS; t++) {
        for (int j = 0; j < PER; j++) {
            int i = t * PER + j;
            const char *keys[2] = { key, "t:{full}:all" };

            long_key(key, sizeof(key), "full", i);
            c[i] = (charge_res){ .done = &done };
            tg_redis_charge(r, keys, lim, 2, 1, on_charge, &c[i]);
        }
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    for (int k = 0; k < 10; k++) {
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    outq = outq_to(g_port);
    cr_log_info("queued in the kernel to the stopped Redis: %ld bytes", outq);
    cr_assert_gt(outq, 100000, "the socket never filled (%ld bytes queued)", outq);

    /* the socket stays full: the loop must sleep */
    cpu0 = cpu_ms();
    t0 = tg_now_ms();
    run_until(cond_count, &(want){ &done, 1 }, 500);
    cpu = cpu_ms() - cpu0;
    wall = tg_now_ms() - t0;
    cr_log_info("CPU while the socket is full: %llu ms in %llu ms",
                (unsigned long long)cpu, (unsigned long long)wall);
    cr_assert_eq(done, 0, "answered while Redis is stopped");
    cr_assert_lt(cpu, wall / 10 + 20, "busy while the socket is full: %llu ms CPU in "
                 "%llu ms", (unsigned long long)cpu, (unsigned long long)wall);

    cr_assert_eq(kill(g_redis.proc->pid, SIGCONT), 0);
    cr_assert(wait_count(&done, N, 20000), "%d of %d answered after SIGCONT", done, N);
    for (int k = 0; k < 20; k++) {
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].called, 1, "charge %d answered %d times", i, c[i].called);
        cr_assert(c[i].rc == TG_OK && c[i].res.allowed, "charge %d: rc %d allowed %d", i,
                  c[i].rc, c[i].res.allowed);
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.charges, N + 1);
    cr_assert_eq(st.errors, 0);
    /* every admitted charge once in the shared bucket: its debt is N
     * intervals, less the time since the first */
    tat = redis_get_ll("t:{full}:all");
    now = redis_now_us();
    cr_assert_gt(tat - now, (long long)((N - 1) * T), "charges lost: debt %lld intervals",
                 (tat - now) / (long long)T);
    cr_assert_leq(tat - now, (long long)(N * T), "charges doubled: debt %lld intervals",
                  (tat - now) / (long long)T);
    long_key(key, sizeof(key), "full", N - 1);
    tat = redis_get_ll(key);
    cr_assert_gt(tat, 0, "the last charge never reached Redis");
    tg_redis_destroy(r);
}

/*
 * Redis killed (-9) with the socket full: commands half-written, calls
 * in flight and more waiting in hiredis.  Every charge is answered once,
 * with an error, at once (not at its deadline); nothing comes later; a
 * Redis started again on the same port is used again, and a charge there
 * sees nothing of the old connection (a fresh bucket).
 */
Test(redis, killed_with_the_socket_full)
{
    enum { TURNS = 40, PER = 500, N = TURNS * PER };
    struct tg_redis *r = client(g_port, 10000, PER, 1);
    static charge_res c[N];
    static char key[180];
    tg_gcra_limit lim = tg_gcra_per_minute(60, 10);
    int done = 0;
    uint64_t t0;
    tg_redis_stats st;

    signal(SIGPIPE, SIG_IGN);               /* a write to the reset socket fails */
    cr_assert(charge_ok_eventually(r, 5000));
    cr_assert_eq(kill(g_redis.proc->pid, SIGSTOP), 0);
    for (int t = 0; t < TURNS; t++) {
        for (int j = 0; j < PER; j++) {
            int i = t * PER + j;

            long_key(key, sizeof(key), "kill", i);
            c[i] = (charge_res){ .done = &done };
            charge1(r, key, lim, &c[i]);
        }
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    for (int k = 0; k < 10; k++) {
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    cr_assert_gt(outq_to(g_port), 100000, "the socket never filled");
    cr_assert_eq(done, 0);
    t0 = tg_now_ms();
    cr_assert_eq(kill(g_redis.proc->pid, SIGKILL), 0);
    kill(g_redis.proc->pid, SIGCONT);
    cr_assert(wait_count(&done, N, 5000), "%d of %d answered after kill -9", done, N);
    cr_assert_lt(tg_now_ms() - t0, 2000, "answered %llu ms after the kill, not at once",
                 (unsigned long long)(tg_now_ms() - t0));
    for (int k = 0; k < 20; k++) {
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].called, 1, "charge %d answered %d times", i, c[i].called);
        cr_assert_eq(c[i].rc, TG_ERR, "charge %d", i);
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.errors, N);
    tgh_proc_kill(g_redis.proc);            /* reaped */
    redis_start(&g_redis, g_port);
    cr_assert(charge_ok_eventually(r, 10000), "charges work again after the restart");
    {
        charge_res again = { 0 };

        long_key(key, sizeof(key), "kill", 0);
        charge1(r, key, lim, &again);
        cr_assert(wait_count(&again.called, 1, 5000));
        cr_assert(again.rc == TG_OK && again.res.allowed && again.res.remaining == 9,
                  "rc %d remaining %u", again.rc, again.res.remaining);
    }
    tg_redis_destroy(r);
}

/*
 * Deadlines passing while the socket is full (Redis stopped): every charge
 * is answered once, TG_ERR, at its deadline; three deadlines in a row drop
 * the connection.  What it still held unsent was charged for requests
 * already answered without Redis (and never given back, since no reply
 * can come): it must not reach Redis when it wakes up.  Only what Redis's
 * kernel had already taken in may (the shared bucket counts it).
 */
Test(redis, a_dropped_full_socket_sends_nothing_more)
{
    enum { TURNS = 40, PER = 500, N = TURNS * PER, TMO = 300 };
    const uint64_t T = 3600ull * 1000000;
    struct tg_redis *r = client(g_port, TMO, PER, 1);
    static charge_res c[N];
    static char key[180];
    tg_gcra_limit lim[2] = { tg_gcra_per_minute(60, 10), { T, 1000000 } };
    int done = 0;
    long outq;
    long long tat, now, charged;
    tg_redis_stats st;

    cr_assert(charge_ok_eventually(r, 5000));
    cr_assert_eq(kill(g_redis.proc->pid, SIGSTOP), 0);
    for (int t = 0; t < TURNS; t++) {
        for (int j = 0; j < PER; j++) {
            int i = t * PER + j;
            const char *keys[2] = { key, "t:{drop}:all" };

            long_key(key, sizeof(key), "drop", i);
            c[i] = (charge_res){ .done = &done };
            tg_redis_charge(r, keys, lim, 2, 1, on_charge, &c[i]);
        }
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    outq = outq_to(g_port);
    cr_log_info("queued in the kernel to the stopped Redis: %ld bytes", outq);
    cr_assert_gt(outq, 100000, "the socket never filled");
    cr_assert(wait_count(&done, N, 5000), "%d of %d answered", done, N);
    tg_redis_get_stats(r, &st);
    struct reconn_want w = { r, st.reconnects + 1 };
    cr_assert(run_until(cond_reconnects, &w, 5000), "no reconnect after the deadlines");
    cr_assert_eq(kill(g_redis.proc->pid, SIGCONT), 0);
    cr_assert(charge_ok_eventually(r, 10000), "charges work again after SIGCONT");
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].called, 1, "charge %d answered %d times", i, c[i].called);
        cr_assert_eq(c[i].rc, TG_ERR, "charge %d", i);
    }
    tat = redis_get_ll("t:{drop}:all");
    now = redis_now_us();
    charged = tat > now ? (tat - now + (long long)T - 1) / (long long)T : 0;
    cr_log_info("charged in Redis after the drop: %lld of %d failed requests", charged, N);
    cr_assert_lt(charged, N / 4, "%lld of %d requests answered TG_ERR were charged in Redis "
                 "after the connection was dropped", charged, N);
    tg_redis_destroy(r);
}

/*
 * Two full calls answered after their deadline (Redis paused): each
 * charge is answered once, TG_ERR at its deadline, and the late replies
 * give back exactly what was charged, also on a bucket shared by every
 * charge of both calls: it is whole again, and so is each own bucket.
 */
Test(redis, late_full_calls_on_a_shared_bucket_are_given_back)
{
    enum { TURNS = 2, PER = 500, N = TURNS * PER, TMO = 300 };
    const uint64_t T = 3600ull * 1000000;
    struct tg_redis *r = client(g_port, TMO, PER, 1);
    static charge_res c[N];
    static char key[180];
    tg_gcra_limit lim[2] = { tg_gcra_per_minute(60, 10), { T, 1000000 } };
    int done = 0;
    long long tat, now, evals;
    redisReply *rep;
    tg_redis_stats st;

    cr_assert(charge_ok_eventually(r, 5000));
    rep = sync_cmd(g_port, "CONFIG RESETSTAT");
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STATUS, "CONFIG RESETSTAT");
    freeReplyObject(rep);
    rep = sync_cmd(g_port, "CLIENT PAUSE 900 ALL");
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STATUS, "CLIENT PAUSE");
    freeReplyObject(rep);
    for (int t = 0; t < TURNS; t++) {
        for (int j = 0; j < PER; j++) {
            int i = t * PER + j;
            const char *keys[2] = { key, "t:{lateall}:all" };

            long_key(key, sizeof(key), "lateall", i);
            c[i] = (charge_res){ .done = &done };
            tg_redis_charge(r, keys, lim, 2, 1, on_charge, &c[i]);
        }
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    cr_assert(wait_count(&done, N, 5000), "%d of %d answered", done, N);
    struct reconn_want w = { r, N };
    cr_assert(run_until(cond_refunds, &w, 10000), "the late charges were not given back");
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.refunds, N, "%llu refunds", (unsigned long long)st.refunds);
    cr_assert_eq(st.errors, N);
    cr_assert_eq(st.reconnects, 0, "the connection was dropped");
    cr_assert(charge_ok_eventually(r, 5000));
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].called, 1, "charge %d answered %d times", i, c[i].called);
        cr_assert_eq(c[i].rc, TG_ERR, "charge %d", i);
    }
    /* the give-backs of a late call go in calls of up to 64 keys, not one
     * EVAL per charge (1,000 on a Redis that has just woken up) */
    evals = redis_cmdstat_calls("eval");
    cr_log_info("refund calls for %d late charges: %lld", N, evals);
    cr_assert_leq(evals, TURNS * ((2 * PER + 63) / 64), "%lld EVAL calls to give back %d "
                  "late charges", evals, N);
    tat = redis_get_ll("t:{lateall}:all");
    now = redis_now_us();
    cr_assert_leq(tat, now, "the shared bucket still holds %lld intervals after the "
                  "refunds", (tat - now + (long long)T - 1) / (long long)T);
    for (int i = 0; i < N; i += 97) {
        charge_res again = { 0 };
        const char *keys[1] = { key };

        long_key(key, sizeof(key), "lateall", i);
        tg_redis_charge(r, keys, lim, 1, 1, on_charge, &again);
        cr_assert(wait_count(&again.called, 1, 5000));
        cr_assert(again.rc == TG_OK && again.res.remaining == 9,
                  "bucket %d: rc %d remaining %u (the late charge was kept)", i, again.rc,
                  again.res.remaining);
    }
    tg_redis_destroy(r);
}

Test(redis, burst_is_exact)
{
    enum { N = 40 };
    struct tg_redis *r = client(g_port, 1000, 32, 1);
    static charge_res c[N];
    int done = 0, allowed = 0;
    tg_gcra_limit lim = tg_gcra_per_minute(1, 20);

    for (int i = 0; i < N; i++) {
        c[i] = (charge_res){ .done = &done };
        charge1(r, "t:{one}:tier", lim, &c[i]);
    }
    cr_assert(wait_count(&done, N, 10000));
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].rc, TG_OK);
        if (c[i].res.allowed) {
            cr_assert_eq(c[i].res.remaining, (uint32_t)(19 - allowed),
                         "request %d remaining %u", i, c[i].res.remaining);
            allowed++;
        } else {
            cr_assert_gt(c[i].res.retry_us, 0);
            cr_assert_eq(c[i].res.remaining, 0);
        }
    }
    cr_assert_eq(allowed, 20);
    for (int i = 0; i < 20; i++) {
        cr_assert_eq(c[i].res.allowed, 1, "the first 20 in order pass");
    }
    tg_redis_destroy(r);
}

/* One name under two limits (a reload changed its tier while charges
 * were batched) in one call: two KEYS, one TAT, charged in order as
 * sequential calls would (batch_keys sends the second its alias). */
Test(redis, one_name_under_two_limits_in_one_call)
{
    enum { N = 6 };
    struct tg_redis *r = client(g_port, 1000, 32, 1);
    const tg_gcra_limit la = tg_gcra_per_minute(60, 5), lb = tg_gcra_per_minute(30, 4);
    /* debt after (s): A 1, B 3, A 4, B 6, A 7 > 5 denied, B 8 */
    static const int allowed[N] = { 1, 1, 1, 1, 0, 1 };
    static const uint32_t remaining[N] = { 4, 2, 1, 1, 0, 0 };
    charge_res c[N] = { 0 };
    tg_redis_stats st;
    redisReply *rep;
    int done = 0;

    for (int i = 0; i < N; i++) {
        c[i].done = &done;
        charge1(r, "t:{alias}:tier", i % 2 ? lb : la, &c[i]);
    }
    cr_assert(wait_count(&done, N, 10000));
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.calls, 1, "calls = %llu", (unsigned long long)st.calls);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].rc, TG_OK);
        cr_assert_eq(c[i].res.allowed, allowed[i], "request %d", i);
        cr_assert_eq(c[i].res.remaining, remaining[i], "request %d: remaining %u", i,
                     c[i].res.remaining);
    }
    rep = sync_cmd(g_port, "PTTL %s", "t:{alias}:tier");
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_INTEGER);
    cr_assert(rep->integer > 7000 && rep->integer <= 8001, "PTTL %lld", rep->integer);
    freeReplyObject(rep);
    tg_redis_destroy(r);
}

Test(redis, multi_bucket_all_or_nothing)
{
    struct tg_redis *r = client(g_port, 1000, 32, 1);
    const char *keys[2] = { "t:{mb}:tier", "t:{mb}:route" };
    tg_gcra_limit lim[2] = { tg_gcra_per_minute(60, 5), tg_gcra_per_minute(60, 2) };
    charge_res c[4] = { 0 };
    int done = 0;

    for (int i = 0; i < 4; i++) {
        c[i].done = &done;
        tg_redis_charge(r, keys, lim, 2, 1, on_charge, &c[i]);
    }
    cr_assert(wait_count(&done, 4, 10000));
    cr_assert_eq(c[0].res.allowed, 1);
    cr_assert_eq(c[0].res.remaining, 1);
    cr_assert_eq(c[0].res.limiting, 1);
    cr_assert_eq(c[1].res.allowed, 1);
    cr_assert_eq(c[2].res.allowed, 0);
    cr_assert_eq(c[2].res.limiting, 1);
    cr_assert_eq(c[3].res.allowed, 0);
    /* the tier bucket was charged twice only: 3 left */
    charge_res d = { 0 };
    charge1(r, keys[0], lim[0], &d);
    cr_assert(wait_count(&d.called, 1, 5000));
    cr_assert_eq(d.res.allowed, 1);
    cr_assert_eq(d.res.remaining, 2);
    tg_redis_destroy(r);
}

Test(redis, script_flush_mid_run)
{
    enum { N = 20 };
    struct tg_redis *r = (g_no_native = 1, client(g_port, 1000, 8, 1));
    static charge_res c[N];
    char key[N][32];
    int done = 0;
    tg_gcra_limit lim = tg_gcra_per_minute(600, 100);
    tg_redis_stats st;
    redisReply *rep;

    for (int round = 0; round < 3; round++) {
        if (round == 1) {
            rep = sync_cmd(g_port, "SCRIPT FLUSH");
            cr_assert(rep != NULL && rep->type == REDIS_REPLY_STATUS);
            freeReplyObject(rep);
        }
        done = 0;
        for (int i = 0; i < N; i++) {
            snprintf(key[i], sizeof(key[i]), "t:{f%d}:tier", i);
            c[i] = (charge_res){ .done = &done };
            charge1(r, key[i], lim, &c[i]);
        }
        cr_assert(wait_count(&done, N, 10000));
        for (int i = 0; i < N; i++) {
            cr_assert_eq(c[i].called, 1);
            cr_assert_eq(c[i].rc, TG_OK, "round %d request %d", round, i);
            cr_assert_eq(c[i].res.allowed, 1);
            cr_assert_eq(c[i].res.remaining, (uint32_t)(99 - round));
        }
        tg_redis_get_stats(r, &st);
        if (round == 0) {
            cr_assert_eq(st.noscript, 0);
        } else {
            cr_assert_geq(st.noscript, 1);
            /* EVAL cached the script again: round 2 needs no recovery */
            cr_assert_leq(st.noscript, 3, "noscript %llu", (unsigned long long)st.noscript);
        }
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.errors, 0);
    cr_assert_eq(st.charges, 3 * N);
    tg_redis_destroy(r);
}

/*
 * Which command carried the charges: TOLLGATE.CHARGE where redis-server runs
 * the module (integration_redis_native), EVALSHA where it does not, and
 * EVALSHA with redis.native off whatever the server runs.  The same exact
 * counts either way.
 */
static void
charges_go_as(int no_native, const char *used, const char *not_used)
{
    enum { N = 30 };
    static charge_res c[N];
    tg_gcra_limit lim = tg_gcra_per_minute(6, 10);    /* a token per 10 s */
    long long used0, unused0;
    struct tg_redis *r;
    int done = 0, allowed = 0;

    g_no_native = no_native;
    r = client(g_port, 1000, 8, 1);
    /* a charge answered: TOLLGATE.PROTO's answer (queued before it) is in */
    cr_assert(charge_ok_eventually(r, 5000));
    used0 = cmd_calls(g_port, used);
    unused0 = cmd_calls(g_port, not_used);
    for (int i = 0; i < N; i++) {
        c[i] = (charge_res){ .done = &done };
        charge1(r, no_native ? "t:{via-off}:tier" : "t:{via}:tier", lim, &c[i]);
    }
    cr_assert(wait_count(&done, N, 10000));
    for (int i = 0; i < N; i++) {
        cr_assert_eq(c[i].rc, TG_OK);
        allowed += c[i].res.allowed;
    }
    cr_assert_eq(allowed, 10, "burst 10: %d of %d admitted", allowed, N);
    cr_assert_geq(cmd_calls(g_port, used) - used0, 1, "no %s call", used);
    cr_assert_eq(cmd_calls(g_port, not_used) - unused0, 0, "%s was used", not_used);
    tg_redis_destroy(r);
}

Test(redis, charges_go_native_where_the_module_runs)
{
    if (native_run()) {
        charges_go_as(0, "tollgate.charge", "evalsha");
    } else {
        charges_go_as(0, "evalsha", "tollgate.charge");
    }
}

Test(redis, native_off_charges_with_the_script)
{
    charges_go_as(1, "evalsha", "tollgate.charge");
}

/* The module unloaded under a running client: the next call's "unknown
 * command" sends the same batch as EVALSHA; nothing is lost or counted
 * twice. */
Test(redis, module_unloaded_mid_run_falls_back_to_the_script)
{
    enum { N = 20 };
    static charge_res c[N];
    tg_gcra_limit lim = tg_gcra_per_minute(600, 100);
    struct tg_redis *r;
    redisReply *rep;
    int done;

    if (!native_run()) {
        cr_skip_test("without TG_REDIS_MODULE (integration_redis_native runs it)");
    }
    r = client(g_port, 1000, 8, 1);
    cr_assert(charge_ok_eventually(r, 5000));
    for (int round = 0; round < 2; round++) {
        if (round == 1) {
            rep = sync_cmd(g_port, "MODULE UNLOAD tollgate");
            cr_assert(rep != NULL && rep->type == REDIS_REPLY_STATUS, "MODULE UNLOAD: %s",
                      rep != NULL && rep->type == REDIS_REPLY_ERROR ? rep->str : "?");
            freeReplyObject(rep);
        }
        done = 0;
        for (int i = 0; i < N; i++) {
            c[i] = (charge_res){ .done = &done };
            charge1(r, "t:{unload}:tier", lim, &c[i]);
        }
        cr_assert(wait_count(&done, N, 10000));
        for (int i = 0; i < N; i++) {
            cr_assert_eq(c[i].rc, TG_OK, "round %d request %d", round, i);
            cr_assert_eq(c[i].res.allowed, 1);
        }
        /* one bucket, charged once per request: exact across the switch */
        cr_assert_eq(c[N - 1].res.remaining + 0u, 100u - (uint32_t)(N * (round + 1)),
                     "round %d: remaining %u", round, c[N - 1].res.remaining);
    }
    cr_assert_geq(cmd_calls(g_port, "evalsha"), 1);
    tg_redis_destroy(r);
}

Test(redis, deadline_when_redis_is_stopped)
{
    enum { TMO = 100 };
    struct tg_redis *r = client(g_port, TMO, 32, 1);
    tg_gcra_limit lim = tg_gcra_per_minute(6000, 1000);
    tg_redis_stats st;

    cr_assert(charge_ok_eventually(r, 5000));
    cr_assert_eq(kill(g_redis.proc->pid, SIGSTOP), 0);

    charge_res c = { 0 };
    uint64_t t0 = tg_now_ms();
    charge1(r, "t:{stop}:tier", lim, &c);
    cr_assert(wait_count(&c.called, 1, 5000));
    cr_assert_eq(c.rc, TG_ERR);
    /* libevent's default clock is CLOCK_MONOTONIC_COARSE (one jiffy) */
    cr_assert_geq(c.at_ms - t0, TMO - 10, "too early: %llu ms",
                  (unsigned long long)(c.at_ms - t0));
    cr_assert_leq(c.at_ms - t0, TMO + 50, "too late: %llu ms",
                  (unsigned long long)(c.at_ms - t0));
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.timeouts, 1);
    cr_assert_eq(st.errors, 1);

    /* two more deadlines in a row: the connection is dropped and remade
     * (the stopped server's kernel still accepts TCP connections) */
    for (int i = 0; i < 2; i++) {
        charge_res d = { 0 };
        run_until(cond_ready, r, 5000);
        charge1(r, "t:{stop}:tier", lim, &d);
        cr_assert(wait_count(&d.called, 1, 5000));
        cr_assert_eq(d.rc, TG_ERR);
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.timeouts, 3);
    struct reconn_want w = { r, st.reconnects + 1 };
    cr_assert(run_until(cond_reconnects, &w, 5000), "no reconnect after 3 deadlines");

    cr_assert_eq(kill(g_redis.proc->pid, SIGCONT), 0);
    cr_assert(charge_ok_eventually(r, 10000), "charges work again after SIGCONT");
    tg_redis_destroy(r);
}

Test(redis, redis_killed_and_restarted)
{
    enum { TMO = 1000 };
    struct tg_redis *r = client(g_port, TMO, 32, 1);
    tg_gcra_limit lim = tg_gcra_per_minute(6000, 1000);
    tg_redis_stats st;

    cr_assert(charge_ok_eventually(r, 5000));
    cr_assert_eq(tgh_proc_kill(g_redis.proc), 0);
    cr_assert(run_until(cond_not_ready, r, 5000), "the client saw the server go");

    for (int i = 0; i < 5; i++) {
        charge_res c = { 0 };
        uint64_t t0 = tg_now_ms();
        charge1(r, "t:{down}:tier", lim, &c);
        cr_assert_eq(c.called, 0, "never called from inside tg_redis_charge");
        cr_assert(wait_count(&c.called, 1, 5000));
        cr_assert_eq(c.rc, TG_ERR);
        cr_assert_lt(c.at_ms - t0, 50, "fail fast, took %llu ms",
                     (unsigned long long)(c.at_ms - t0));
    }
    /* hget fails fast too */
    str_res s = { 0 };
    tg_redis_hget(r, "t:keys", "x", on_str, &s);
    cr_assert(wait_count(&s.called, 1, 5000));
    cr_assert_eq(s.rc, TG_ERR);

    /* let a few reconnect attempts fail */
    tg_redis_get_stats(r, &st);
    uint64_t before = st.reconnects;
    struct reconn_want w = { r, before + 2 };
    cr_assert(run_until(cond_reconnects, &w, 5000));
    tg_redis_get_stats(r, &st);
    cr_assert_geq(st.reconnects, before + 2);
    cr_assert(!tg_redis_ready(r));

    redis_start(&g_redis, g_port);
    uint64_t t0 = tg_now_ms();
    cr_assert(run_until(cond_ready, r, 8000), "ready again after restart");
    cr_log_info("ready %llu ms after the restart", (unsigned long long)(tg_now_ms() - t0));
    cr_assert(charge_ok_eventually(r, 5000));
    tg_redis_destroy(r);
}

Test(redis, nothing_listening)
{
    int port = tgh_free_port();
    struct tg_redis *r = client(port, 1000, 32, 0);
    tg_gcra_limit lim = tg_gcra_per_minute(60, 10);
    charge_res c = { 0 };
    tg_redis_stats st;

    charge1(r, "t:{x}:tier", lim, &c);
    cr_assert(wait_count(&c.called, 1, 2000));
    cr_assert_eq(c.rc, TG_ERR);
    cr_assert(!run_until(cond_ready, r, 500));
    tg_redis_get_stats(r, &st);
    cr_assert_geq(st.reconnects, 1);
    tg_redis_destroy(r);
}

static void
garbage(const char *answer)
{
    int port = fake_start(answer);
    struct tg_redis *r = client(port, 1000, 4, 1);
    tg_gcra_limit lim = tg_gcra_per_minute(60, 10);
    static charge_res c[10];
    int done = 0;
    str_res s = { 0 };
    tg_redis_stats st;

    for (int i = 0; i < 10; i++) {
        c[i] = (charge_res){ .done = &done };
        charge1(r, "t:{g}:tier", lim, &c[i]);
    }
    tg_redis_hget(r, "t:keys", "x", on_str, &s);
    cr_assert(wait_count(&done, 10, 5000));
    cr_assert(wait_count(&s.called, 1, 5000));
    for (int i = 0; i < 10; i++) {
        cr_assert_eq(c[i].called, 1);
        cr_assert_eq(c[i].rc, TG_ERR);
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.errors, 10);
    cr_assert_eq(st.charges, 0);
    cr_assert_eq(st.timeouts, 0, "answered, not timed out");
    tg_redis_destroy(r);
}

Test(redis, garbage_status_reply)
{
    garbage("+OK\r\n");
}

Test(redis, garbage_integer_reply)
{
    garbage(":1\r\n");
}

Test(redis, garbage_array_reply)
{
    /* 5 elements (a request's worth before the reply was packed), one a string */
    garbage("*5\r\n:1\r\n:2\r\n$1\r\nx\r\n:4\r\n:0\r\n");
}

Test(redis, garbage_nested_array_reply)
{
    garbage("*1\r\n*1\r\n:1\r\n");
}

Test(redis, garbage_noscript_forever)
{
    /* EVAL after NOSCRIPT answers NOSCRIPT too: TG_ERR, no loop */
    garbage("-NOSCRIPT No matching script\r\n");
}

/*
 * A server that answers every command twice (a broken proxy in front of
 * Redis, a stream out of step): the second reply has no command waiting
 * for it.  hiredis 0.14 asserts on such a reply (abort: the whole
 * process) unless it is an error; the connection must be dropped instead,
 * every charge answered once (TG_ERR), and the client reconnect.
 */
Test(redis, a_reply_nobody_asked_for_drops_the_connection)
{
    int port = fake_start("+OK\r\n:1\r\n");
    struct tg_redis *r = client(port, 1000, 4, 0);
    tg_gcra_limit lim = tg_gcra_per_minute(60, 10);
    static charge_res c[10];
    int done = 0;
    tg_redis_stats st;
    struct reconn_want w = { r, 3 };

    for (int i = 0; i < 10; i++) {
        c[i] = (charge_res){ .done = &done };
        charge1(r, "t:{g}:tier", lim, &c[i]);
    }
    cr_assert(wait_count(&done, 10, 5000));
    cr_assert(run_until(cond_reconnects, &w, 5000), "no reconnect");
    for (int i = 0; i < 10; i++) {
        cr_assert_eq(c[i].called, 1);
        cr_assert_eq(c[i].rc, TG_ERR);
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.charges, 0);
    tg_redis_destroy(r);
}

/*
 * A "sentinel" answering every command with a one-element array: the
 * client's SUBSCRIBE +switch-master connection gets it as a message.
 * hiredis 0.14 asserts that a message has at least two elements, strings
 * first (and reads a third for unsubscribe): the connection must be
 * dropped instead, the subscription retried, the process alive.
 */
static int
cond_rediscoveries(const void *arg)
{
    const struct reconn_want *w = arg;
    tg_redis_stats st;

    tg_redis_get_stats(w->r, &st);
    return st.rediscoveries >= w->n;
}

static void
sentinel_garbage(const char *answer)
{
    int port = fake_start(answer);
    tg_redis_opts o;
    struct tg_redis *r;
    struct reconn_want w;
    tg_redis_stats st;

    memset(&o, 0, sizeof(o));
    snprintf(o.sentinel_master, sizeof(o.sentinel_master), "mymaster");
    snprintf(o.sentinels[0].host, sizeof(o.sentinels[0].host), "127.0.0.1");
    o.sentinels[0].port = port;
    o.nsentinels = 1;
    o.timeout_ms = 200;
    o.max_batch = 4;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    /* the SUBSCRIBE is answered at once; the master asked again and again
     * (its answers are garbage too) shows the loop alive well after */
    tg_redis_get_stats(r, &st);
    w = (struct reconn_want){ r, st.rediscoveries + 3 };
    cr_assert(run_until(cond_rediscoveries, &w, 10000), "the master was not asked again");
    cr_assert(!tg_redis_ready(r));
    tg_redis_destroy(r);
}

Test(redis, sentinel_message_of_one_element)
{
    sentinel_garbage("*1\r\n:1\r\n");
}

Test(redis, sentinel_message_of_integers)
{
    sentinel_garbage("*3\r\n:1\r\n:2\r\n:3\r\n");
}

Test(redis, sentinel_unsubscribe_without_a_count)
{
    sentinel_garbage("*3\r\n$11\r\nunsubscribe\r\n$14\r\n+switch-master\r\n$1\r\nx\r\n");
}

Test(redis, sentinel_unsubscribe_of_two_elements)
{
    sentinel_garbage("*2\r\n$11\r\nunsubscribe\r\n$14\r\n+switch-master\r\n");
}

/* What a bounded reader may cost: ASan keeps freed memory in quarantine
 * (256 MB by default), so its bound is that much looser. */
#ifdef __SANITIZE_ADDRESS__
#define RSS_BOUND_KIB ((256 + 32) * 1024)
#else
#define RSS_BOUND_KIB (32 * 1024)
#endif

static int
cond_never(const void *arg)
{
    return 0;
}

/* Resident memory of this process, KiB. */
static long
rss_kib(void)
{
    char line[256];
    long kib = -1;
    FILE *f = fopen("/proc/self/status", "r");

    cr_assert_not_null(f);
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kib = strtol(line + 6, NULL, 10);
        }
    }
    fclose(f);
    return kib;
}

/*
 * A server that answers every command with `answer` (then, with stream,
 * endless filler): for 2 s, charges of a 100 ms deadline are each answered
 * TG_ERR within the deadline + a margin, memory stays bounded, and the
 * reply was refused; then a real Redis on that port works again.
 */
static void
unbounded(const char *answer, int stream)
{
    enum { TMO = 100, MARGIN = 150 };
    tg_gcra_limit lim = tg_gcra_per_minute(60, 10);
    long rss0 = rss_kib(), worst = 0;
    tgh_upstream alt;                   /* a real server where the fake was */
    tg_redis_stats st;
    struct tg_redis *r;
    uint64_t end;
    int port, n = 0;

    g_fake_stream = stream;
    port = fake_start(answer);
    r = client(port, TMO, 4, 0);
    end = tg_now_ms() + 2000;
    while (tg_now_ms() < end) {
        charge_res c = { 0 };
        uint64_t t0 = tg_now_ms();
        charge1(r, "t:{u}:tier", lim, &c);
        cr_assert(wait_count(&c.called, 1, 5000));
        cr_assert_eq(c.rc, TG_ERR);
        cr_assert_leq(tg_now_ms() - t0, TMO + MARGIN, "charge %d took %llu ms", n,
                      (unsigned long long)(tg_now_ms() - t0));
        if (rss_kib() - rss0 > worst) {
            worst = rss_kib() - rss0;
        }
        n++;
        run_until(cond_never, NULL, 5);     /* a charge every ~5 ms */
    }
    tg_redis_get_stats(r, &st);
    cr_log_info("%s: %d charges, rss growth %ld KiB, %llu refused replies", answer, n,
                worst, (unsigned long long)st.oversized);
    cr_assert_lt(worst, RSS_BOUND_KIB, "memory grew by %ld KiB", worst);
    cr_assert_geq(st.oversized, 1);

    /* the real one is back on that port */
    proc_kill(&g_fake);
    redis_start(&alt, port);
    cr_assert(charge_ok_eventually(r, 10000), "charges work again with a real Redis");
    tg_redis_destroy(r);
}

Test(redis, huge_array_header)
{
    unbounded("*2000000000\r\n", 0);
}

Test(redis, array_of_100000_elements)
{
    unbounded("*100000\r\n", 1);
}

Test(redis, huge_bulk_reply)
{
    unbounded("$1000000000\r\n", 1);
}

/*
 * A Redis at maxclients accepts the TCP connection, answers an error and
 * closes it.  The reconnect backoff must keep growing (it restarts only
 * after a good reply): 100 ms doubling, so about 5 attempts in 3 s, not
 * one every 100 ms.
 */
Test(redis, maxclients_backoff_keeps_growing)
{
    struct tg_redis *r;
    tg_redis_stats st;
    int port;

    g_fake_close = 1;
    port = fake_start("-ERR max number of clients reached\r\n");
    r = client(port, 100, 4, 0);
    run_until(cond_never, NULL, 3000);
    tg_redis_get_stats(r, &st);
    cr_log_info("maxclients: %llu reconnects in 3 s", (unsigned long long)st.reconnects);
    cr_assert_geq(st.reconnects, 3, "it does try again");
    cr_assert_leq(st.reconnects, 8, "%llu reconnects in 3 s: the backoff was reset",
                  (unsigned long long)st.reconnects);
    tg_redis_destroy(r);
}

Test(redis, garbage_string_of_the_wrong_length)
{
    /* packed numbers, but not 3 (allowed, held, now) of 8 bytes */
    garbage("$8\r\nabcdefgh\r\n");
}

Test(redis, garbage_bad_range)
{
    /* allowed = N is not a boolean: the reply of one request on one
     * bucket, 3 packed numbers, each N = 2^52 + 0x1111111111111 (an
     * integer whose double has no zero byte: the fake sends a C string) */
    uint64_t v[3] = { (1ULL << 52) + 0x1111111111111ULL, (1ULL << 52) + 0x1111111111111ULL,
                      (1ULL << 52) + 0x1111111111111ULL };
    static char answer[64];
    size_t n = (size_t)snprintf(answer, sizeof(answer), "$%d\r\n", 3 * TG_GCRA_PACKED);

    n += tg_gcra_script_pack(v, 3, (unsigned char *)answer + n);
    memcpy(answer + n, "\r\n", 3);
    cr_assert_eq(strlen(answer), n + 2, "a zero byte in the packed answer");
    int port = fake_start(answer);
    struct tg_redis *r = client(port, 1000, 4, 1);
    tg_gcra_limit lim = tg_gcra_per_minute(60, 10);
    charge_res c = { 0 };

    charge1(r, "t:{g}:tier", lim, &c);
    cr_assert(wait_count(&c.called, 1, 5000));
    cr_assert_eq(c.rc, TG_ERR);
    tg_redis_destroy(r);
}

struct cancel_other {
    struct tg_redis_op *victim;
    int                 first_called, victim_called;
};

/* The first op's callback cancels a later op of the same batch. */
static void
on_first_cancels(void *arg, tg_rc rc, const tg_gcra_result *res)
{
    struct cancel_other *co = arg;

    co->first_called++;
    tg_redis_cancel(co->victim);
}

static void
on_victim(void *arg, tg_rc rc, const tg_gcra_result *res)
{
    struct cancel_other *co = arg;

    co->victim_called++;
}

Test(redis, cancel)
{
    struct tg_redis *r = client(g_port, 1000, 32, 1);
    tg_gcra_limit lim = tg_gcra_per_minute(1, 10);    /* buckets live 60 s */
    charge_res c[4] = { 0 };
    str_res s = { 0 };
    struct tg_redis_op *op;
    tg_redis_stats st;

    /* cancelled while queued: never sent */
    charge1(r, "t:{c}:a", lim, &c[0]);
    op = charge1(r, "t:{c}:b", lim, &c[1]);
    tg_redis_cancel(op);
    op = tg_redis_hget(r, "t:keys", "x", on_str, &s);
    tg_redis_cancel(op);
    cr_assert(wait_count(&c[0].called, 1, 5000));

    /* cancelled while in flight: sent, answer dropped (redis is stopped
     * so that the answer cannot come before the cancel) */
    cr_assert_eq(kill(g_redis.proc->pid, SIGSTOP), 0);
    charge1(r, "t:{c}:c", lim, &c[2]);
    op = charge1(r, "t:{c}:d", lim, &c[3]);
    tg_redis_get_stats(r, &st);
    uint64_t calls = st.calls;
    while (st.calls == calls) {
        event_base_loop(g_base, EVLOOP_NONBLOCK);
        tg_redis_get_stats(r, &st);
    }
    tg_redis_cancel(op);
    cr_assert_eq(kill(g_redis.proc->pid, SIGCONT), 0);
    cr_assert(wait_count(&c[2].called, 1, 5000));
    cr_assert_eq(c[2].rc, TG_OK);

    /* cancelled by the callback of an earlier op of the same batch */
    struct cancel_other co = { 0 };
    const char *k1[1] = { "t:{c}:g" }, *k2[1] = { "t:{c}:h" };
    charge_res sentinel = { 0 };
    tg_redis_charge(r, k1, &lim, 1, 1, on_first_cancels, &co);
    co.victim = tg_redis_charge(r, k2, &lim, 1, 1, on_victim, &co);
    charge1(r, "t:{c}:i", lim, &sentinel);
    cr_assert(wait_count(&sentinel.called, 1, 5000));
    cr_assert_eq(sentinel.rc, TG_OK);
    cr_assert_eq(co.first_called, 1);
    cr_assert_eq(co.victim_called, 0);

    /* and a cancelled op of a batch that times out: redis stopped */
    cr_assert_eq(kill(g_redis.proc->pid, SIGSTOP), 0);
    charge_res e = { 0 };
    op = charge1(r, "t:{c}:e", lim, &e);
    charge_res f = { 0 };
    charge1(r, "t:{c}:f", lim, &f);
    event_base_loop(g_base, EVLOOP_NONBLOCK);
    tg_redis_cancel(op);
    cr_assert(wait_count(&f.called, 1, 5000));
    cr_assert_eq(f.rc, TG_ERR);
    cr_assert_eq(kill(g_redis.proc->pid, SIGCONT), 0);
    cr_assert(charge_ok_eventually(r, 5000));

    cr_assert_eq(c[1].called, 0);
    cr_assert_eq(c[3].called, 0);
    cr_assert_eq(e.called, 0);
    cr_assert_eq(s.called, 0);
    /* the in-flight cancelled op was charged, then given back (its
     * requester never used it): a full bucket is no key */
    redisReply *rep = sync_cmd(g_port, "EXISTS t:{c}:d");
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_INTEGER && rep->integer == 0);
    freeReplyObject(rep);
    rep = sync_cmd(g_port, "EXISTS t:{c}:b");
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_INTEGER && rep->integer == 0);
    freeReplyObject(rep);
    tg_redis_destroy(r);
}

Test(redis, destroy_with_work_pending)
{
    struct tg_redis *r = client(g_port, 1000, 32, 1);
    tg_gcra_limit lim = tg_gcra_per_minute(60, 10);
    charge_res a = { 0 }, b = { 0 };

    charge1(r, "t:{d}:a", lim, &a);            /* queued */
    cr_assert_eq(kill(g_redis.proc->pid, SIGSTOP), 0);
    event_base_loop(g_base, EVLOOP_NONBLOCK);   /* sent, stuck */
    charge1(r, "t:{d}:b", lim, &b);            /* queued */
    tg_redis_destroy(r);
    event_base_loop(g_base, EVLOOP_NONBLOCK);
    cr_assert_eq(a.called, 0, "destroy calls no callback");
    cr_assert_eq(b.called, 0);
    kill(g_redis.proc->pid, SIGCONT);
}

Test(redis, hget)
{
    struct tg_redis *r = client(g_port, 1000, 32, 1);
    redisReply *rep = sync_cmd(g_port, "HSET t:keys abc %b", "v\0x", (size_t)3);
    str_res s[3] = { 0 };
    tg_redis_stats st;

    cr_assert(rep != NULL && rep->type == REDIS_REPLY_INTEGER);
    freeReplyObject(rep);
    tg_redis_hget(r, "t:keys", "abc", on_str, &s[0]);
    tg_redis_hget(r, "t:keys", "nope", on_str, &s[1]);
    tg_redis_hget(r, "t:nokey", "abc", on_str, &s[2]);
    cr_assert_eq(s[0].called, 0);
    cr_assert(wait_count(&s[2].called, 1, 5000));
    cr_assert(wait_count(&s[0].called, 1, 5000));
    cr_assert(wait_count(&s[1].called, 1, 5000));
    cr_assert_eq(s[0].rc, TG_OK);
    cr_assert_eq(s[0].len, 3);
    cr_assert_eq(memcmp(s[0].val, "v\0x", 3), 0);
    for (int i = 1; i < 3; i++) {
        cr_assert_eq(s[i].rc, TG_OK);
        cr_assert(s[i].isnull);
        cr_assert_eq(s[i].len, 0);
    }
    /* wrong type: an error reply becomes TG_ERR */
    rep = sync_cmd(g_port, "SET t:str x");
    freeReplyObject(rep);
    str_res e = { 0 };
    tg_redis_hget(r, "t:str", "abc", on_str, &e);
    cr_assert(wait_count(&e.called, 1, 5000));
    cr_assert_eq(e.rc, TG_ERR);
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.calls, 4);
    tg_redis_destroy(r);
}

Test(redis, select_db)
{
    tg_redis_opts o;
    struct tg_redis *r;
    charge_res c = { 0 };
    redisReply *rep;

    memset(&o, 0, sizeof(o));
    snprintf(o.host, sizeof(o.host), "127.0.0.1");
    o.port = g_port;
    o.db = 3;
    o.timeout_ms = 1000;
    o.max_batch = 32;
    r = tg_redis_create(g_base, &o);
    cr_assert(run_until(cond_ready, r, 5000));
    charge1(r, "t:{db}:tier", tg_gcra_per_minute(60, 10), &c);
    cr_assert(wait_count(&c.called, 1, 5000));
    cr_assert_eq(c.rc, TG_OK);
    rep = sync_cmd(g_port, "EXISTS t:{db}:tier");
    cr_assert_eq(rep->integer, 0, "not in db 0");
    freeReplyObject(rep);
    redisContext *sc = redisConnect("127.0.0.1", g_port);
    cr_assert(sc != NULL && !sc->err);
    freeReplyObject(redisCommand(sc, "SELECT 3"));
    rep = redisCommand(sc, "EXISTS t:{db}:tier");
    cr_assert_eq(rep->integer, 1, "in db 3");
    freeReplyObject(rep);
    redisFree(sc);
    tg_redis_destroy(r);
}

/* One request of cost 1 on one bucket through the charge script (one KEY,
 * no floors): out[0..5) its answer (allowed, remaining, retry, reset,
 * index: tg_gcra_script_answer), out[5] the new TAT P = now + held for an
 * allowed request, else 0. */
static void
script_charge(const char *key, uint64_t t_us, unsigned burst, long long out[6])
{
    /* nreq 1, no floors, cost 1 on 1 bucket: key 1; the key's limit,
     * alias itself */
    uint64_t num[7] = { 1, 0, 17, 1, t_us, burst, 1 };
    unsigned char pk[sizeof(num)];
    size_t npk = tg_gcra_script_pack(num, 7, pk);
    redisReply *rep = sync_cmd(g_port, "EVAL %s 1 %s %b", tg_gcra_lua, key, pk, npk);
    tg_gcra_limit lim = { t_us, burst };
    tg_gcra_result res;
    uint64_t u[3];
    long long v[2];

    /* the reply: allowed, held, the script's now, packed (gcra.h) */
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STRING
              && rep->len == 3 * TG_GCRA_PACKED,
              "charge script: %s", rep && rep->str ? rep->str : "bad reply");
    cr_assert_eq(tg_gcra_script_unpack((const unsigned char *)rep->str, 3, u), 1);
    v[0] = (long long)u[0];
    v[1] = (long long)u[1];
    cr_assert_eq(tg_gcra_script_answer(v, &lim, 0x1, 1, u[2], &res), 1);
    out[0] = res.allowed;
    out[1] = res.remaining;
    out[2] = (long long)res.retry_us;
    out[3] = (long long)res.reset_us;
    out[4] = res.limiting;
    out[5] = res.allowed ? (long long)(u[2] + res.held_us[0]) : 0;
    freeReplyObject(rep);
}

static void
script_refund(const char *key, uint64_t t_us, long long p)
{
    redisReply *rep = sync_cmd(g_port, "EVAL %s 1 %s %llu %lld", tg_gcra_refund_lua,
                               key, (unsigned long long)t_us, p);

    cr_assert(rep != NULL && rep->type == REDIS_REPLY_INTEGER, "refund script: %s",
              rep && rep->str ? rep->str : "bad reply");
    freeReplyObject(rep);
}

static long long
redis_now_us(void)
{
    redisReply *rep = sync_cmd(g_port, "TIME");
    long long now;

    cr_assert(rep != NULL && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2);
    now = atoll(rep->element[0]->str) * 1000000 + atoll(rep->element[1]->str);
    freeReplyObject(rep);
    return now;
}

static long long
redis_get_ll(const char *key)
{
    redisReply *rep = sync_cmd(g_port, "GET %s", key);
    long long v = -1;

    cr_assert_not_null(rep);
    if (rep->type == REDIS_REPLY_STRING) {
        v = atoll(rep->str);
    }
    freeReplyObject(rep);
    return v;
}

/*
 * The Cluster refund at the script level: a refund that arrives after its
 * charge's debt has run out (and another instance charged the bucket
 * since) gives nothing back; one that arrives in time gives back at most
 * what its charge still holds, never another request's charge.
 */
Test(redis, late_refund_never_removes_another_charge)
{
    enum { T = 200000, T2 = 2000000 };  /* 5 tokens/s; 0.5 tokens/s */
    long long a[6], b[6], c[6], before, after;
    uint64_t end = tg_now_ms() + 5000;

    cr_assert_gt(strlen(tg_gcra_refund_lua), 0);
    /* A charges; its debt runs out; B (another instance) charges */
    script_charge("t:{late}:g", T, 1, a);
    cr_assert_eq(a[0], 1);
    cr_assert_gt(a[5], 0, "the script returns the new TAT");
    while (redis_now_us() <= a[5]) {
        cr_assert(tg_now_ms() < end, "Redis time never passed A's TAT");
        usleep(10000);
    }
    script_charge("t:{late}:g", T, 1, b);
    cr_assert_eq(b[0], 1);
    /* A's refund arrives late: B's charge stays, C is denied */
    script_refund("t:{late}:g", T, a[5]);
    cr_assert_eq(redis_get_ll("t:{late}:g"), b[5], "the late refund changed the bucket");
    script_charge("t:{late}:g", T, 1, c);
    cr_assert_eq(c[0], 0, "a late refund gave B's token to C");

    /* in time: A then B on a bucket of 2; A's refund takes back only A's
     * part, B's charge stays */
    script_charge("t:{soon}:g", T2, 2, a);
    script_charge("t:{soon}:g", T2, 2, b);
    cr_assert(a[0] == 1 && b[0] == 1);
    before = redis_get_ll("t:{soon}:g");
    script_refund("t:{soon}:g", T2, a[5]);
    after = redis_get_ll("t:{soon}:g");
    cr_assert_lt(after, before, "an in-time refund gives something back");
    cr_assert_geq(after, before - T2, "a refund gave back more than its charge");
    script_charge("t:{soon}:g", T2, 2, c);
    cr_assert_eq(c[0], 1, "the refunded token is usable");
    script_charge("t:{soon}:g", T2, 2, c);
    cr_assert_eq(c[0], 0, "B's token was given away too");
}

Test(redis, invalid_charge_is_an_error)
{
    struct tg_redis *r = client(g_port, 1000, 32, 1);
    tg_gcra_limit bad = { 0, 10 };
    charge_res c = { 0 };

    charge1(r, "t:{bad}:tier", bad, &c);
    cr_assert_eq(c.called, 0);
    cr_assert(wait_count(&c.called, 1, 5000));
    cr_assert_eq(c.rc, TG_ERR);
    tg_redis_destroy(r);
}

/* The config owns redis.timeout_ms and redis.max_batch: a client asked
 * for without them is refused, not given defaults of its own. */
Test(redis, zero_timeout_or_batch_refused)
{
    tg_redis_opts o;

    memset(&o, 0, sizeof(o));
    snprintf(o.host, sizeof(o.host), "127.0.0.1");
    o.port = g_port;
    o.max_batch = 32;
    cr_assert_null(tg_redis_create(g_base, &o), "timeout_ms 0 accepted");
    o.timeout_ms = 1000;
    o.max_batch = 0;
    cr_assert_null(tg_redis_create(g_base, &o), "max_batch 0 accepted");
    o.max_batch = 32;
    struct tg_redis *r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    tg_redis_destroy(r);
}

/* ------------------------------------------------------------------ */
/* URL parsing (no server needed, but harmless)                        */

Test(redis_url, good)
{
    static const struct { const char *url, *host; int port, db; } t[] = {
        { "redis://127.0.0.1", "127.0.0.1", 6379, 0 },
        { "redis://127.0.0.1:6380", "127.0.0.1", 6380, 0 },
        { "redis://127.0.0.1:6380/15", "127.0.0.1", 6380, 15 },
        { "redis://localhost/2", "localhost", 6379, 2 },
        { "redis://redis-1.internal:1", "redis-1.internal", 1, 0 },
        { "redis://[::1]", "::1", 6379, 0 },
        { "redis://[::1]:65535/0", "::1", 65535, 0 },
        { "redis://[2001:db8::7]:7000/9", "2001:db8::7", 7000, 9 },
    };
    for (size_t i = 0; i < TG_ARRAY_LEN(t); i++) {
        tg_redis_opts o;
        char err[256] = "";
        memset(&o, 0, sizeof(o));
        o.timeout_ms = 25;
        cr_assert_eq(tg_redis_parse_url(t[i].url, &o, err, sizeof(err)), TG_OK,
                     "%s: %s", t[i].url, err);
        cr_assert_str_eq(o.host, t[i].host);
        cr_assert_eq(o.port, t[i].port, "%s", t[i].url);
        cr_assert_eq(o.db, t[i].db, "%s", t[i].url);
        cr_assert_eq(o.timeout_ms, 25, "other fields are left alone");
    }
}

Test(redis_url, bad)
{
    static const struct { const char *url, *msg; } t[] = {
        { "", "empty" },
        { "127.0.0.1:6379", "redis://" },
        { "http://127.0.0.1", "redis://" },
        { "rediss://127.0.0.1", "TLS" },
        { "redis://", "missing host" },
        { "redis://:6379", "missing host" },
        { "redis://127.0.0.1:", "port" },
        { "redis://127.0.0.1:0", "port" },
        { "redis://127.0.0.1:65536", "port" },
        { "redis://127.0.0.1:99999999999", "port" },
        { "redis://127.0.0.1:-1", "port" },
        { "redis://127.0.0.1:12ab", "port" },
        { "redis://127.0.0.1/16", "database" },
        { "redis://127.0.0.1/", "database" },
        { "redis://127.0.0.1/-1", "database" },
        { "redis://127.0.0.1/1/2", "database" },
        { "redis://::1", "brackets" },
        { "redis://[::1", "']'" },
        { "redis://[]:6379", "IPv6" },
        { "redis://[zz]:6379", "IPv6" },
        { "redis://[::1]x", "unexpected" },
        { "redis://user:pw@host", "password" },
        { "redis://host?db=1", "query" },
        { "redis://ho st", "bad character" },
    };
    for (size_t i = 0; i < TG_ARRAY_LEN(t); i++) {
        tg_redis_opts o;
        char err[256] = "";
        memset(&o, 0, sizeof(o));
        cr_assert_eq(tg_redis_parse_url(t[i].url, &o, err, sizeof(err)), TG_ERR,
                     "accepted %s", t[i].url);
        cr_assert(strstr(err, t[i].msg) != NULL, "%s: got \"%s\", want \"%s\"",
                  t[i].url, err, t[i].msg);
        cr_assert_str_eq(o.host, "", "opts untouched on error");
    }
    char longurl[400];
    memset(longurl, 'a', sizeof(longurl));
    memcpy(longurl, "redis://", 8);
    longurl[sizeof(longurl) - 1] = '\0';
    tg_redis_opts o;
    char err[256];
    cr_assert_eq(tg_redis_parse_url(longurl, &o, err, sizeof(err)), TG_ERR);
    cr_assert(strstr(err, "longer") != NULL, "%s", err);
}
