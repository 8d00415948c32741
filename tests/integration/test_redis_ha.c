/*
 * test_redis_ha.c - the Redis client (src/redis.c) against Redis Sentinel
 * (a master, a replica, three sentinels: failover after kill -9) and Redis
 * Cluster (three masters: keys spread over the nodes, exact limits, the
 * global bucket's refund, a slot migrated under a live key).
 *
 * Every process is real and started by the harness
 * (tests/integration/harness.h): an ephemeral loopback port, its files in
 * the harness's temporary directory, SIGKILL on parent death, killed by
 * tgh_cleanup() in the fixture.  Waits are bounded polls; the event loop is
 * driven with EVLOOP_ONCE and a 5 ms tick; nothing sleeps for a fixed time.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <event2/event.h>
#include <hiredis/hiredis.h>

#include "harness.h"
#include "tollgate/common.h"
#include "tollgate/gcra.h"
#include "tollgate/redis.h"
#include "tollgate/throttle.h"

static struct event_base *g_base;
static pid_t g_stale = -1;              /* the partitioned "sentinel", forked here */

/* ------------------------------------------------------------------ */
/* processes and setup connections                                     */

static const char *g_auth;              /* AUTH on every setup connection, or NULL */

/* A fresh blocking connection, authenticated when g_auth is set. */
static redisContext *
sync_connect(int port)
{
    struct timeval tv = { 2, 0 };
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);

    if (c == NULL || c->err) {
        if (c) redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv);
    if (g_auth != NULL) {
        redisReply *rep = redisCommand(c, "AUTH %s", g_auth);
        if (rep) freeReplyObject(rep);
    }
    return c;
}

/* A blocking command on a fresh connection (test setup only). */
static redisReply *
sync_argv(int port, int argc, const char **argv)
{
    redisContext *c = sync_connect(port);
    redisReply *rep;

    if (c == NULL) {
        return NULL;
    }
    rep = redisCommandArgv(c, argc, argv, NULL);
    redisFree(c);
    return rep;
}

static redisReply *
sync_cmd(int port, const char *fmt, ...)
{
    redisContext *c = sync_connect(port);
    redisReply *rep;
    va_list ap;

    if (c == NULL) {
        return NULL;
    }
    va_start(ap, fmt);
    rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    return rep;
}

/* The reply's text contains needle (status, string or error). */
static int
reply_has(int port, const char *needle, const char *fmt, ...)
{
    redisContext *c = sync_connect(port);
    redisReply *rep;
    va_list ap;
    int ok;

    if (c == NULL) {
        return 0;
    }
    va_start(ap, fmt);
    rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    ok = rep != NULL && rep->str != NULL && strstr(rep->str, needle) != NULL;
    if (rep) freeReplyObject(rep);
    return ok;
}

static long long
sync_int(int port, const char *fmt, const char *arg)
{
    redisReply *rep = sync_cmd(port, fmt, arg);
    long long v = -1;

    if (rep != NULL && rep->type == REDIS_REPLY_INTEGER) {
        v = rep->integer;
    }
    if (rep) freeReplyObject(rep);
    return v;
}

/* Poll (no event loop involved) until fn(port) or timeout_ms. */
static int
poll_until(int (*fn)(int, const void *), int port, const void *arg, unsigned timeout_ms)
{
    uint64_t deadline = tg_now_ms() + timeout_ms;

    while (!fn(port, arg)) {
        if (tg_now_ms() >= deadline) {
            return 0;
        }
        usleep(20000);          /* polling processes we do not drive */
    }
    return 1;
}


static int
has_text(int port, const void *arg)
{
    const char *const *q = arg;       /* { needle, command, argument } */
    redisReply *rep = sync_argv(port, 2, (const char **)q + 1);
    int ok = rep != NULL && rep->str != NULL && strstr(rep->str, q[0]) != NULL;

    if (rep) freeReplyObject(rep);
    return ok;
}

/* A redis-server on a free port (a replica of 127.0.0.1:replicaof when
 * > 0; requirepass when password is not NULL); its port into *port. */
static tgh_proc *
redis_start(int *port, int replicaof, const char *password)
{
    tgh_upstream u = { 0 };
    tgh_redis_opts o = { .replicaof = replicaof, .password = password };

    TGH_CHECK(tgh_redis_start_opts(&u, &o) == 0, "redis-server did not start");
    *port = u.port;
    return u.proc;
}

/* ------------------------------------------------------------------ */
/* loop driving and charges                                            */

static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
}

typedef int (*cond_fn)(const void *arg);

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

typedef struct tally {
    int answered;
    int allowed;
    int denied;
    int errors;
} tally;

static int g_want;

static int
cond_answered(const void *arg)
{
    return ((const tally *)arg)->answered >= g_want;
}

static void
on_charge(void *arg, tg_rc rc, const tg_gcra_result *res)
{
    tally *t = arg;

    t->answered++;
    if (rc != TG_OK) {
        t->errors++;
    } else if (res->allowed) {
        t->allowed++;
    } else {
        t->denied++;
    }
}

/* Issue `count` charges of key (plus the global key when gkey != NULL)
 * in one loop turn and wait for every answer; results added to *t. */
static void
charge_many(struct tg_redis *r, const char *key, tg_gcra_limit lim, const char *gkey,
            tg_gcra_limit glim, int count, tally *t)
{
    const char *keys[2] = { key, gkey };
    tg_gcra_limit lims[2] = { lim, glim };

    for (int i = 0; i < count; i++) {
        cr_assert_not_null(tg_redis_charge(r, keys, lims, gkey ? 2 : 1, 1, on_charge, t));
    }
    g_want = t->answered + count;
    cr_assert(run_until(cond_answered, t, 10000), "charges not answered");
}

/* Charge until one is allowed (after a disruption); 1 on success. */
static int
charge_ok_eventually(struct tg_redis *r, const char *key, unsigned timeout_ms)
{
    uint64_t deadline = tg_now_ms() + timeout_ms;
    tg_gcra_limit lim = tg_gcra_per_second(1000, 1000);

    while (tg_now_ms() < deadline) {
        tally t = { 0 };
        charge_many(r, key, lim, NULL, lim, 1, &t);
        if (t.allowed == 1) {
            return 1;
        }
        run_until(cond_ready, r, 50);   /* a short breath, loop still driven */
    }
    return 0;
}

static void
setup(void)
{
    g_base = event_base_new();
    cr_assert_not_null(g_base);
}

static void
teardown(void)
{
    if (g_stale > 0) {
        kill(g_stale, SIGKILL);
        waitpid(g_stale, NULL, 0);
        g_stale = -1;
    }
    tgh_cleanup();
    if (g_base) {
        event_base_free(g_base);
        g_base = NULL;
    }
}

/* ------------------------------------------------------------------ */
/* Sentinel                                                            */

/* SENTINEL master mymaster: the value of field, as a number (-1). */
static long
sentinel_field(int port, const char *field)
{
    redisReply *rep = sync_cmd(port, "SENTINEL master mymaster");
    long v = -1;

    if (rep != NULL && rep->type == REDIS_REPLY_ARRAY) {
        for (size_t i = 0; i + 1 < rep->elements; i += 2) {
            if (rep->element[i]->type == REDIS_REPLY_STRING
                && strcmp(rep->element[i]->str, field) == 0
                && rep->element[i + 1]->type == REDIS_REPLY_STRING) {
                v = strtol(rep->element[i + 1]->str, NULL, 10);
            }
        }
    }
    if (rep) freeReplyObject(rep);
    return v;
}

static int
sentinel_settled(int port, const void *arg)
{
    return sentinel_field(port, "num-other-sentinels") == 2
           && sentinel_field(port, "num-slaves") == 1;
}

static int
master_port_is(int port, const void *arg)
{
    redisReply *rep = sync_cmd(port, "SENTINEL get-master-addr-by-name mymaster");
    int ok = rep != NULL && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2
             && atoi(rep->element[1]->str) == *(const int *)arg;

    if (rep) freeReplyObject(rep);
    return ok;
}

/* Three sentinels watching the master on mport (quorum 2, down after 1 s),
 * each settled: it sees the two others and the replica. */
static void
sentinels_start(int mport, int sport[3], tgh_proc *sent[3])
{
    for (int i = 0; i < 3; i++) {
        tgh_upstream u;
        TGH_CHECK(tgh_sentinel_start(&u, NULL,
                                     "sentinel monitor mymaster 127.0.0.1 %d 2\n"
                                     "sentinel down-after-milliseconds mymaster 1000\n"
                                     "sentinel failover-timeout mymaster 5000\n", mport) == 0,
                  "sentinel %d did not start", i);
        sport[i] = u.port;
        if (sent != NULL) {
            sent[i] = u.proc;
        }
    }
    for (int i = 0; i < 3; i++) {
        TGH_CHECK(poll_until(sentinel_settled, sport[i], NULL, 20000),
                  "sentinel %d never saw the others and the replica", i);
    }
}

TestSuite(redis_sentinel, .init = setup, .fini = teardown, .timeout = 180);

Test(redis_sentinel, failover_after_kill_9)
{
    int mport, rport, sport[3];
    const char *const link_up[3] = { "master_link_status:up", "INFO", "replication" };
    tgh_proc *master;
    tg_redis_opts o;
    struct tg_redis *r;
    tg_redis_stats st;
    tg_gcra_limit lim = tg_gcra_per_minute(1, 20);
    uint64_t t0, took;
    tally t = { 0 };

    master = redis_start(&mport, 0, NULL);
    redis_start(&rport, mport, NULL);
    cr_assert(poll_until(has_text, rport, link_up, 15000), "replica never linked");
    sentinels_start(mport, sport, NULL);

    memset(&o, 0, sizeof(o));
    snprintf(o.sentinel_master, sizeof(o.sentinel_master), "mymaster");
    for (int i = 0; i < 3; i++) {
        snprintf(o.sentinels[i].host, sizeof(o.sentinels[i].host), "127.0.0.1");
        o.sentinels[i].port = sport[i];
    }
    o.nsentinels = 3;
    o.timeout_ms = 200;
    o.max_batch = 16;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(run_until(cond_ready, r, 10000), "never found the master");

    charge_many(r, "tg:{before}:t", lim, NULL, lim, 40, &t);
    cr_assert_eq(t.errors, 0);
    cr_assert_eq(t.allowed, 20, "before failover: %d of 40 allowed", t.allowed);
    cr_assert(sync_int(mport, "EXISTS %s", "tg:{before}:t") == 1, "not on the master");

    /* the master dies hard; a sentinel promotes the replica */
    cr_assert_eq(tgh_proc_kill(master), 0);
    t0 = tg_now_ms();
    cr_assert(charge_ok_eventually(r, "tg:{probe}:t", 30000),
              "no successful charge within 30 s of the failover");
    took = tg_now_ms() - t0;
    cr_assert(took <= 30000);
    cr_assert(master_port_is(sport[0], &rport), "the replica was not promoted");
    cr_log_info("failover: charges work again after %llu ms",
                (unsigned long long)took);

    memset(&t, 0, sizeof(t));
    charge_many(r, "tg:{after}:t", lim, NULL, lim, 40, &t);
    cr_assert_eq(t.errors, 0);
    cr_assert_eq(t.allowed, 20, "after failover: %d of 40 allowed", t.allowed);
    cr_assert(sync_int(rport, "EXISTS %s", "tg:{after}:t") == 1,
              "not written to the promoted replica");

    tg_redis_get_stats(r, &st);
    cr_assert(st.rediscoveries >= 2, "master asked %llu times",
              (unsigned long long)st.rediscoveries);
    tg_redis_destroy(r);
}

/*
 * The master frozen (SIGSTOP) with the client's socket to it full (long
 * keys, a long deadline: megabytes wait in the kernel and in hiredis)
 * while the sentinels fail over: +switch-master drops that connection, so
 * every charge is answered once, an error, well before its 10 s deadline,
 * and the promoted replica takes charges exactly; the old master, thawed,
 * is never written to again.
 */
Test(redis_sentinel, failover_while_the_socket_is_full)
{
    enum { TURNS = 80, PER = 500, N = TURNS * PER };    /* 7.6 MB of calls */
    int mport, rport, sport[3];
    const char *const link_up[3] = { "master_link_status:up", "INFO", "replication" };
    tgh_proc *master;
    tg_redis_opts o;
    struct tg_redis *r;
    tg_gcra_limit lim = tg_gcra_per_minute(1, 20);
    tg_gcra_limit one = tg_gcra_per_minute(60, 10);
    static char key[180];
    uint64_t t0;
    tally t = { 0 }, full = { 0 };

    signal(SIGPIPE, SIG_IGN);
    master = redis_start(&mport, 0, NULL);
    redis_start(&rport, mport, NULL);
    cr_assert(poll_until(has_text, rport, link_up, 15000), "replica never linked");
    sentinels_start(mport, sport, NULL);

    memset(&o, 0, sizeof(o));
    snprintf(o.sentinel_master, sizeof(o.sentinel_master), "mymaster");
    for (int i = 0; i < 3; i++) {
        snprintf(o.sentinels[i].host, sizeof(o.sentinels[i].host), "127.0.0.1");
        o.sentinels[i].port = sport[i];
    }
    o.nsentinels = 3;
    o.timeout_ms = 10000;
    o.max_batch = PER;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(run_until(cond_ready, r, 10000), "never found the master");
    cr_assert(charge_ok_eventually(r, "tg:{probe}:t", 5000));

    cr_assert_eq(kill(master->pid, SIGSTOP), 0);
    t0 = tg_now_ms();
    for (int i = 0; i < TURNS; i++) {
        for (int j = 0; j < PER; j++) {
            int n = snprintf(key, sizeof(key), "tg:{full%d}:", i * PER + j);
            const char *keys[1] = { key };

            memset(key + n, 'k', sizeof(key) - 1 - (size_t)n);
            key[sizeof(key) - 1] = '\0';
            cr_assert_not_null(tg_redis_charge(r, keys, &one, 1, 1, on_charge, &full));
        }
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    g_want = N;
    cr_assert(run_until(cond_answered, &full, 9000), "%d of %d answered during the "
              "failover", full.answered, N);
    cr_log_info("failover with a full socket: %d charges answered after %llu ms",
                N, (unsigned long long)(tg_now_ms() - t0));
    cr_assert_eq(full.errors, N, "%d errors, %d allowed", full.errors, full.allowed);
    cr_assert(charge_ok_eventually(r, "tg:{probe}:t", 30000), "no charge after failover");
    cr_assert(master_port_is(sport[0], &rport), "the replica was not promoted");
    cr_assert_eq(kill(master->pid, SIGCONT), 0);

    charge_many(r, "tg:{after}:t", lim, NULL, lim, 40, &t);
    cr_assert_eq(t.errors, 0);
    cr_assert_eq(t.allowed, 20, "after failover: %d of 40 allowed", t.allowed);
    cr_assert(sync_int(rport, "EXISTS %s", "tg:{after}:t") == 1,
              "not written to the promoted replica");
    g_want = N + 1;
    run_until(cond_answered, &full, 200);
    cr_assert_eq(full.answered, N, "answered twice: %d", full.answered);
    tg_redis_destroy(r);
}

/* A partitioned "sentinel": answers every command (one RESP command at a
 * time) with the master it last knew, port mport, forever.  Its port. */
static int
stale_sentinel_start(int mport)
{
    struct sockaddr_in sa = { .sin_family = AF_INET };
    socklen_t len = sizeof(sa);
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    char answer[64];
    pid_t pid;

    snprintf(answer, sizeof(answer), "*2\r\n$9\r\n127.0.0.1\r\n$%d\r\n%d\r\n",
             snprintf(NULL, 0, "%d", mport), mport);
    cr_assert(lfd >= 0);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
    cr_assert(listen(lfd, 16) == 0);
    cr_assert(getsockname(lfd, (struct sockaddr *)&sa, &len) == 0);
    pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        for (;;) {
            int fd = accept(lfd, NULL, NULL);
            char buf[4096];
            ssize_t n;
            if (fd < 0) continue;
            if (fork() == 0) {          /* one process per connection */
                prctl(PR_SET_PDEATHSIG, SIGKILL);
                /* every read that ends a command line gets the answer:
                 * the client sends one command and waits */
                while ((n = read(fd, buf, sizeof(buf))) > 0) {
                    if (buf[n - 1] == '\n' && write(fd, answer, strlen(answer)) < 0) break;
                }
                _exit(0);
            }
            close(fd);
            while (waitpid(-1, NULL, WNOHANG) > 0) {
            }
        }
    }
    close(lfd);
    g_stale = pid;
    return ntohs(sa.sin_port);
}

/*
 * Sentinel 0 is partitioned and keeps naming the old master; sentinel 1
 * is frozen (SIGSTOP); sentinels 2 and 3 fail over after the master's
 * kill -9.  The client must leave the stale and the frozen one behind:
 * the promoted master is used within 5 s of the promotion.
 */
Test(redis_sentinel, stale_and_frozen_sentinels_are_left_behind)
{
    int mport, rport, sport[3];
    const char *const link_up[3] = { "master_link_status:up", "INFO", "replication" };
    tgh_proc *master, *sent[3];
    tg_redis_opts o;
    struct tg_redis *r;
    tg_gcra_limit lim = tg_gcra_per_minute(1, 20);
    uint64_t t_promo, took;
    tally t = { 0 };

    master = redis_start(&mport, 0, NULL);
    redis_start(&rport, mport, NULL);
    cr_assert(poll_until(has_text, rport, link_up, 15000), "replica never linked");
    sentinels_start(mport, sport, sent);

    memset(&o, 0, sizeof(o));
    snprintf(o.sentinel_master, sizeof(o.sentinel_master), "mymaster");
    snprintf(o.sentinels[0].host, sizeof(o.sentinels[0].host), "127.0.0.1");
    o.sentinels[0].port = stale_sentinel_start(mport);
    for (int i = 0; i < 3; i++) {
        snprintf(o.sentinels[i + 1].host, sizeof(o.sentinels[i + 1].host), "127.0.0.1");
        o.sentinels[i + 1].port = sport[i];
    }
    o.nsentinels = 4;
    o.timeout_ms = 200;
    o.max_batch = 16;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(run_until(cond_ready, r, 10000), "never found the master");
    charge_many(r, "tg:{before}:t", lim, NULL, lim, 40, &t);
    cr_assert_eq(t.allowed, 20, "before failover: %d of 40 allowed", t.allowed);

    tgh_proc_signal(sent[0], SIGSTOP, 0);   /* frozen: connects, never answers */
    cr_assert_eq(tgh_proc_kill(master), 0);
    /* keep the client busy while the others fail over */
    t_promo = tg_now_ms() + 30000;
    while (!master_port_is(sport[1], &rport) && tg_now_ms() < t_promo) {
        charge_ok_eventually(r, "tg:{probe}:t", 100);
    }
    cr_assert(master_port_is(sport[1], &rport), "the replica was not promoted");
    t_promo = tg_now_ms();
    cr_assert(charge_ok_eventually(r, "tg:{probe}:t", 5000),
              "the promoted master was not used within 5 s");
    took = tg_now_ms() - t_promo;
    cr_log_info("stale sentinel 0, frozen sentinel 1: charges on the promoted master "
                "%llu ms after the promotion", (unsigned long long)took);
    memset(&t, 0, sizeof(t));
    charge_many(r, "tg:{after}:t", lim, NULL, lim, 40, &t);
    cr_assert_eq(t.allowed, 20, "after failover: %d of 40 allowed", t.allowed);
    cr_assert(sync_int(rport, "EXISTS %s", "tg:{after}:t") == 1,
              "not written to the promoted replica");
    tgh_proc_signal(sent[0], SIGCONT, 0);
    tg_redis_destroy(r);
}

/* A master the sentinels name but which is a replica (stale answer, or
 * demoted): ROLE says so, the client never becomes ready on it. */
Test(redis_sentinel, replica_is_never_used)
{
    int mport, rport;
    tg_redis_opts o;
    struct tg_redis *r;
    tg_redis_stats st;
    const char *const link_up[3] = { "master_link_status:up", "INFO", "replication" };
    tgh_upstream stale;
    int fake;

    redis_start(&mport, 0, NULL);
    redis_start(&rport, mport, NULL);
    cr_assert(poll_until(has_text, rport, link_up, 15000), "replica never linked");

    /* a "sentinel" that names the replica: a real sentinel monitoring the
     * replica's address */
    TGH_CHECK(tgh_sentinel_start(&stale, NULL, "sentinel monitor mymaster 127.0.0.1 %d 1\n",
                                 rport) == 0, "sentinel did not start");
    fake = stale.port;

    memset(&o, 0, sizeof(o));
    snprintf(o.sentinel_master, sizeof(o.sentinel_master), "mymaster");
    snprintf(o.sentinels[0].host, sizeof(o.sentinels[0].host), "127.0.0.1");
    o.sentinels[0].port = fake;
    o.nsentinels = 1;
    o.timeout_ms = 200;
    o.max_batch = 32;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(!run_until(cond_ready, r, 1500), "became ready on a replica");
    {
        tally t = { 0 };
        tg_gcra_limit lim = tg_gcra_per_minute(1, 20);
        charge_many(r, "tg:{x}:t", lim, NULL, lim, 3, &t);
        cr_assert_eq(t.errors, 3, "charges must fail, not go to a replica");
    }
    cr_assert(sync_int(rport, "EXISTS %s", "tg:{x}:t") == 0);
    tg_redis_get_stats(r, &st);
    cr_assert(st.rediscoveries >= 2, "the sentinels were not asked again");
    tg_redis_destroy(r);
}

/* ------------------------------------------------------------------ */
/* Cluster                                                             */

static int g_cport[6];
static tgh_upstream g_cnode[6];
static const char *g_announce;          /* cluster-announce-hostname, or NULL */


/* n nodes (3 masters, then a replica each when n == 6), a node timeout
 * of 1 s (failover within a few seconds). */
static void
cluster_start_n(int nnodes)
{
    /* with replicas: the live masters keep serving their slots while one
     * is failing over (else CLUSTERDOWN everywhere meanwhile) */
    static const char *const six[] = {
        "--cluster-node-timeout", "1000", "--repl-diskless-sync-delay", "0",
        "--cluster-require-full-coverage", "no", NULL,
    };
    static const char *const three[] = {
        "--cluster-node-timeout", "1000", "--repl-diskless-sync-delay", "0", NULL,
    };
    /* nodes known by name: CLUSTER SLOTS and MOVED say the name */
    const char *const named[] = {
        "--cluster-node-timeout", "1000", "--repl-diskless-sync-delay", "0",
        "--cluster-announce-hostname", g_announce,
        "--cluster-preferred-endpoint-type", "hostname", NULL,
    };
    tgh_redis_opts o = { .cluster = 1 };

    if (nnodes == 6) {
        o.args = six;
    } else if (g_auth != NULL) {
        o.args = three;
        o.password = g_auth;
    } else if (g_announce != NULL) {
        o.args = named;
    } else {
        o.args = three;
    }
    for (int i = 0; i < nnodes; i++) {
        g_cnode[i] = (tgh_upstream){ 0 };
        TGH_CHECK(tgh_redis_start_opts(&g_cnode[i], &o) == 0, "cluster node did not start");
        g_cport[i] = g_cnode[i].port;
    }
    TGH_CHECK(tgh_redis_cluster_create(g_cport, nnodes, nnodes == 6 ? 1 : 0, g_auth) == 0,
              "redis-cli --cluster create failed");
}

static void
cluster_start(void)
{
    cluster_start_n(3);
}

static struct tg_redis *
cluster_client(size_t nseeds)
{
    tg_redis_opts o;
    struct tg_redis *r;

    memset(&o, 0, sizeof(o));
    for (size_t i = 0; i < nseeds; i++) {
        snprintf(o.cluster_nodes[i].host, sizeof(o.cluster_nodes[i].host), "127.0.0.1");
        o.cluster_nodes[i].port = g_cport[i];
    }
    o.ncluster = nseeds;
    o.timeout_ms = 1000;
    o.max_batch = 32;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(run_until(cond_ready, r, 10000), "never learnt the slot map");
    /* {b}, {c}, {a} hash to the three default ranges (0-5460, 5461-10922,
     * 10923-16383: tests/unit/test_redis_cluster.c): every node is up */
    cr_assert(charge_ok_eventually(r, "tg:{a}:probe", 10000));
    cr_assert(charge_ok_eventually(r, "tg:{b}:probe", 10000));
    cr_assert(charge_ok_eventually(r, "tg:{c}:probe", 10000));
    return r;
}

/* Which node holds key (its index in g_cport), -1 if none. */
static int
key_node(const char *key)
{
    int at = -1;

    for (int i = 0; i < 3; i++) {
        redisReply *rep = sync_cmd(g_cport[i], "EXISTS %s", key);
        if (rep != NULL && rep->type == REDIS_REPLY_INTEGER && rep->integer == 1) {
            cr_assert_eq(at, -1, "%s exists on two nodes", key);
            at = i;
        }
        if (rep) freeReplyObject(rep);
    }
    return at;
}

TestSuite(redis_cluster, .init = setup, .fini = teardown, .timeout = 240);

Test(redis_cluster, slots_spread_and_exact_limits)
{
    enum { NKEYS = 300, NEXACT = 10 };
    struct tg_redis *r;
    static tally t[NKEYS];
    tg_gcra_limit lim = tg_gcra_per_minute(1, 20);
    tg_gcra_limit glim = tg_gcra_per_minute(1, 1000000);  /* no refill: stays */
    static const char *const odd[] = {
        "{}x", "a{}{b}", "{a", "a}b{c}", "{user1000}.following", "foo{bar}{zap}",
        "", "tg:{global}:g", "{{x}}", "}{",
    };
    char key[64];
    long long total = 0;
    int per_node[3] = { 0 };
    tg_redis_stats st;

    cluster_start();

    /* our slot function agrees with the server's */
    for (int i = 0; i < NKEYS; i++) {
        snprintf(key, sizeof(key), "tg:{c%d}:t", i);
        cr_assert_eq((long long)tg_redis_key_slot(key, strlen(key)),
                     sync_int(g_cport[0], "CLUSTER KEYSLOT %s", key), "slot of %s", key);
    }
    for (size_t i = 0; i < TG_ARRAY_LEN(odd); i++) {
        cr_assert_eq((long long)tg_redis_key_slot(odd[i], strlen(odd[i])),
                     sync_int(g_cport[0], "CLUSTER KEYSLOT %s", odd[i]),
                     "slot of \"%s\"", odd[i]);
    }

    r = cluster_client(1);      /* one seed: the other masters are learnt */

    /* 300 consumers, each with the global bucket: one loop turn */
    for (int i = 0; i < NKEYS; i++) {
        const char *keys[2];
        tg_gcra_limit lims[2] = { lim, glim };
        char *k = malloc(32);
        snprintf(k, 32, "tg:{c%d}:t", i);
        keys[0] = k;
        keys[1] = "tg:{global}:g";
        cr_assert_not_null(tg_redis_charge(r, keys, lims, 2, 1, on_charge, &t[i]));
        free(k);                /* copied by tg_redis_charge */
    }
    for (int i = 0; i < NKEYS; i++) {
        g_want = 1;
        cr_assert(run_until(cond_answered, &t[i], 10000), "charge %d not answered", i);
        cr_assert_eq(t[i].errors, 0, "charge %d failed", i);
        cr_assert_eq(t[i].allowed, 1, "charge %d denied", i);
    }
    for (int i = 0; i < NKEYS; i++) {
        int at;
        snprintf(key, sizeof(key), "tg:{c%d}:t", i);
        at = key_node(key);
        cr_assert(at >= 0, "%s was not written", key);
        per_node[at]++;
    }
    for (int i = 0; i < 3; i++) {
        long long n = sync_int(g_cport[i], "DBSIZE", NULL);
        cr_assert(per_node[i] > 0, "no consumer key on node %d", i);
        total += n;
    }
    cr_log_info("consumer keys per node: %d %d %d", per_node[0], per_node[1], per_node[2]);
    cr_assert(key_node("tg:{global}:g") >= 0, "the global bucket was not written");

    /* exact limits per key, global bucket included, all at once */
    for (int i = 0; i < NEXACT; i++) {
        tally x = { 0 };
        snprintf(key, sizeof(key), "tg:{x%d}:t", i);
        charge_many(r, key, lim, "tg:{global}:g", glim, 40, &x);
        cr_assert_eq(x.errors, 0, "%s: %d errors", key, x.errors);
        cr_assert_eq(x.allowed, 20, "%s: %d of 40 allowed", key, x.allowed);
    }
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.errors, 0);
    cr_assert(st.map_refreshes >= 1);
    tg_redis_destroy(r);
}

/* tg_redis_eval (the throttle's report) goes to the node of its key. */
typedef struct eval_ans {
    int  done;
    tg_rc rc;
    char value[64];
} eval_ans;

static void
on_eval(void *arg, tg_rc rc, const char *value, size_t len)
{
    eval_ans *a = arg;

    a->rc = rc;
    snprintf(a->value, sizeof(a->value), "%.*s", value != NULL ? (int)len : 0,
             value != NULL ? value : "");
    a->done = 1;
}

static int
cond_eval(const void *arg)
{
    return ((const eval_ans *)arg)->done;
}

Test(redis_cluster, throttle_report_on_its_node)
{
    static const char *const keys[] = { "tg:{throttle}", "a:{throttle}", "tg:{b}x" };
    struct tg_redis *r;

    cluster_start();
    r = cluster_client(1);
    for (size_t i = 0; i < TG_ARRAY_LEN(keys); i++) {
        tg_throttle_report rep;
        eval_ans a = { 0 };

        tg_throttle_report_build(&rep, "", "inst-1", 300 + (unsigned)i, 60000);
        cr_assert_not_null(tg_redis_eval(r, tg_throttle_lua, keys[i], rep.args, 3,
                                         on_eval, &a));
        cr_assert(run_until(cond_eval, &a, 10000), "%s: no answer", keys[i]);
        cr_assert_eq(a.rc, TG_OK, "%s: failed", keys[i]);
        char want[16];

        snprintf(want, sizeof(want), "%u 1", 300 + (unsigned)i);
        cr_assert_str_eq(a.value, want, "%s: %s", keys[i], a.value);
        cr_assert(key_node(keys[i]) >= 0, "%s was not written", keys[i]);
    }
    tg_redis_destroy(r);
}

/* The global bucket denies: the consumer's own charge is given back. */
Test(redis_cluster, global_deny_refunds_the_consumer)
{
    enum { N = 10, GBURST = 4 };
    struct tg_redis *r;
    tg_gcra_limit lim = tg_gcra_per_minute(1, 20);
    tg_gcra_limit glim = tg_gcra_per_minute(1, GBURST);
    tally t[N];
    char key[N][32];
    int allowed = 0, exists = 0;
    tg_redis_stats st;
    uint64_t deadline;

    cluster_start();
    r = cluster_client(3);
    for (int i = 0; i < N; i++) {
        memset(&t[i], 0, sizeof(t[i]));
        snprintf(key[i], sizeof(key[i]), "tg:{r%d}:t", i);
        charge_many(r, key[i], lim, "tg:{g2}:g", glim, 1, &t[i]);
        cr_assert_eq(t[i].errors, 0);
        allowed += t[i].allowed;
    }
    cr_assert_eq(allowed, GBURST, "%d allowed, the global burst is %d", allowed, GBURST);
    tg_redis_get_stats(r, &st);
    cr_assert_eq(st.refunds, N - GBURST);

    /* refunds are fire-and-forget: wait (bounded) until they landed */
    deadline = tg_now_ms() + 5000;
    for (;;) {
        exists = 0;
        run_until(cond_ready, r, 0);
        for (int i = 0; i < N; i++) {
            exists += key_node(key[i]) >= 0;
        }
        if (exists == GBURST || tg_now_ms() > deadline) {
            break;
        }
        {
            struct timeval tv = { 0, 20000 };
            event_base_loopexit(g_base, &tv);
            event_base_dispatch(g_base);
        }
    }
    cr_assert_eq(exists, GBURST, "%d consumer buckets remain, want %d", exists, GBURST);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(key_node(key[i]) >= 0, t[i].allowed == 1,
                     "%s: bucket present %d, allowed %d", key[i],
                     key_node(key[i]) >= 0, t[i].allowed);
    }
    tg_redis_destroy(r);
}

/* ------------------------------------------------------------------ */
/* Cluster property: the bound holds across instances and slots        */

/*
 * The property of the Cluster code path (the split request, its refund,
 * late answers, cancels), checked against a reference built from what the
 * test observed.  Redis TIME and CLOCK_REALTIME are the same clock here
 * (every node runs on this host), so times are taken with it.
 */
enum { PB_CONS = 3, PB_ROUTE = 3, PB_GLOBAL = 4, PB_N = 5 };
enum { PS_PENDING, PS_ADMITTED, PS_DENIED, PS_ERROR, PS_CANCELLED };

typedef struct prop_rec {
    struct tg_redis_op *op;     /* while pending */
    uint64_t send, ans;         /* wall clock, us: queued, answered */
    uint32_t cost;
    uint8_t  inst, st, nb;
    uint8_t  b[3];              /* bucket indices, consumer first */
} prop_rec;

static int g_prop_pending;

static uint64_t
wall_us(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static void
prop_on_charge(void *arg, tg_rc rc, const tg_gcra_result *res)
{
    prop_rec *p = arg;

    p->ans = wall_us();
    p->op = NULL;
    p->st = rc != TG_OK ? PS_ERROR : res->allowed ? PS_ADMITTED : PS_DENIED;
    g_prop_pending--;
}

static int g_prop_barrier;

static void
prop_on_hget(void *arg, tg_rc rc, const char *value, size_t len)
{
    g_prop_barrier--;
}

static int
prop_has(const prop_rec *p, int bk)
{
    for (int i = 0; i < p->nb; i++) {
        if (p->b[i] == bk) {
            return 1;
        }
    }
    return 0;
}

/* Whether p may have left debt in bucket bk: admitted; or failed after
 * its phase 1 passed, which is kept (the requester falls back), so bk in
 * phase 1 of a split request; any failure after a dropped connection
 * (its answer, and so its refund, is lost). */
static int
prop_counts(const prop_rec *p, int bk, uint64_t reconnects)
{
    if (p->st == PS_ADMITTED) {
        return 1;
    }
    if (p->st != PS_ERROR) {
        return 0;
    }
    return reconnects > 0 || (bk != PB_GLOBAL && prop_has(p, PB_GLOBAL));
}

/* GET key on the master serving its slot (the others answer MOVED):
 * the TAT as stored (us on the Redis clock), 0 when absent; *owner: the
 * node's index in g_cport. */
static uint64_t
prop_get(const char *key, int *owner)
{
    uint64_t tat = 0;
    int owners = 0;

    for (int i = 0; i < 3; i++) {
        redisReply *rep = sync_cmd(g_cport[i], "GET %s", key);
        cr_assert_not_null(rep, "GET %s", key);
        if (rep->type == REDIS_REPLY_STRING || rep->type == REDIS_REPLY_NIL) {
            if (rep->type == REDIS_REPLY_STRING) {
                tat = strtoull(rep->str, NULL, 10);
            }
            owners++;
            *owner = i;
        }
        freeReplyObject(rep);
    }
    cr_assert_eq(owners, 1, "%s: %d nodes answer GET (not MOVED)", key, owners);
    return tat;
}

static uint64_t
prop_tat(const char *key)
{
    int owner;

    return prop_get(key, &owner);
}

static int
prop_owner(const char *key)
{
    int owner = -1;

    prop_get(key, &owner);
    return owner;
}

/*
 * Three instances (three clients, each on its own event base, driven in
 * turns by this thread) charge three consumers on different masters (one
 * with a route bucket in its slot) and, for most requests, the global
 * bucket in a slot of its own: split requests, phase 1 the consumer's
 * slot, phase 2 {global}, phase 1 given back when phase 2 denies.  Costs
 * are random up to the smallest burst of the request's buckets (often
 * above what is left), some requests get a deadline of a few hundred us
 * (answered late: given back), some are cancelled while in flight.
 * TG_PROP_SEED=n replays a seed (the interleaving still depends on timing).
 *
 * Checks, per bucket:
 *  1. admitted ≤ burst + rate·(t2 − t1) + 1 over every window.  The true
 *     time a request was charged lies in [send, ans] (queued, answered);
 *     the requests with send ≥ send_i and ans ≤ ans_j were all charged
 *     inside [send_i, ans_j], so their cost is bounded by burst +
 *     (ans_j − send_i)/T.  Widening every window to the outer times can
 *     only loosen the bound: it never produces a false failure.  + 1: the
 *     same clock allowance as the script's own property test rounds to
 *     (Redis TIME in us vs our clock read a moment apart).
 *  2. denied requests consumed nothing: after a barrier (every refund
 *     applied), the TAT left in Redis lies between the GCRA of the
 *     admitted requests alone at their earliest possible times (lower
 *     bound: max over k of send_k + T·(c_k + Σ c_j, send_j ≥ ans_k)) and
 *     the GCRA of the requests that may hold debt (prop_counts: admitted,
 *     plus failed split requests in their phase-1 buckets, kept by
 *     design) at their latest possible times (upper: max over k of ans_k
 *     + T·Σ c_j, ans_j ≥ send_k).  Both are the conservative side of the
 *     unknown true times.  Allowance: one interval, plus the time a
 *     refund takes to land (it gives back what its charge still holds
 *     then, so requests charged meanwhile keep up to that long of its
 *     debt), taken as 2 × the longest answer seen.  Bursts last 0.3-1 s
 *     against answers of a few ms, so a denied request that kept its
 *     phase 1 shows far above the upper bound; a refund of more than its
 *     own debt shows below the lower bound (or in check 1).
 */
Test(redis_cluster, property_window_bound_split_requests, .timeout = 240)
{
    enum { NI = 3, NREQ = 3000, BATCH = 4 };
    static const char *const names[PB_N] = {
        "tg:{a}:t", "tg:{b}:t", "tg:{c}:t", "tg:{a}:r:x", "tg:{global}:g",
    };
    static const char *const tags[4] = { "tg:{a}:z", "tg:{b}:z", "tg:{c}:z", "tg:{global}:z" };
    struct event_base *bases[NI], *saved = g_base;
    struct tg_redis *r[NI];
    tg_gcra_limit lk[PB_N];
    prop_rec *rec = calloc(NREQ, sizeof(*rec));
    int *idx = calloc(NREQ, sizeof(*idx));
    size_t issued = 0, nadm = 0, nden = 0, nerr = 0, ncan = 0, nlate = 0;
    uint64_t seed, rng, max_rtt = 0, t_start, deadline;
    const char *env = getenv("TG_PROP_SEED");
    tg_redis_stats st;
    uint64_t refunds = 0, reconnects = 0;
    int node_of[PB_N];

    cr_assert(rec != NULL && idx != NULL);
    seed = env != NULL ? strtoull(env, NULL, 10) : (wall_us() ^ ((uint64_t)getpid() << 32));
    seed |= 1;
    rng = seed;
    fprintf(stderr, "property_window_bound_split_requests: TG_PROP_SEED=%llu\n",
            (unsigned long long)seed);
    cr_log_info("seed %llu (replay: TG_PROP_SEED=%llu)", (unsigned long long)seed,
                (unsigned long long)seed);
#define RND(n) (rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17, rng % (n))
    /* Bursts long in time (burst·T of 0.3 to 1 s) against answers of a
     * few ms: a denied request that kept its tokens shows in the state
     * left in Redis well beyond the allowance.  The global bucket is the
     * tightest: many requests pass their consumer and are denied by it. */
    for (int i = 0; i < PB_CONS; i++) {
        lk[i].interval_us = 10000 + RND(10000);
        lk[i].burst = 30 + (uint32_t)RND(21);
    }
    lk[PB_ROUTE].interval_us = 20000 + RND(10000);
    lk[PB_ROUTE].burst = 20 + (uint32_t)RND(11);
    lk[PB_GLOBAL].interval_us = 15000 + RND(15000);
    lk[PB_GLOBAL].burst = 20 + (uint32_t)RND(21);

    cluster_start();
    for (int i = 0; i < NI; i++) {
        bases[i] = event_base_new();
        cr_assert_not_null(bases[i]);
        g_base = bases[i];
        r[i] = cluster_client(3);       /* every master reached once */
    }
    g_base = saved;
    /* the consumers live on three different masters ({a}, {b}, {c}: slots
     * 15495, 3300, 7365), the global bucket in a slot of its own */
    for (int i = 0; i < PB_N; i++) {
        node_of[i] = prop_owner(names[i]);
    }
    cr_assert(node_of[0] != node_of[1] && node_of[1] != node_of[2]
              && node_of[0] != node_of[2], "consumers not on three masters: %d %d %d",
              node_of[0], node_of[1], node_of[2]);
    cr_assert_neq(tg_redis_key_slot(names[PB_GLOBAL], strlen(names[PB_GLOBAL])),
                  tg_redis_key_slot(names[0], strlen(names[0])));

    t_start = tg_now_ms();
    g_prop_pending = 0;
    while (issued < NREQ || g_prop_pending > 0) {
        int k = (int)RND(NI);

        cr_assert(tg_now_ms() - t_start < 60000, "run not finished in 60 s: %d pending",
                  g_prop_pending);
        for (int q = 0; issued < NREQ && q < 1 + (int)RND(BATCH); q++) {
            prop_rec *p = &rec[issued++];
            const char *keys[3];
            tg_gcra_limit lims[3];
            uint32_t maxc = UINT32_MAX;
            int short_dl;

            p->inst = (uint8_t)k;
            if (q > 0 && RND(3) == 0) {
                /* little time left: often answered late.  Same buckets as
                 * the request before it, so it shares that one's calls
                 * (whose deadline is ahead): a late answer, not a
                 * dropped connection */
                p->nb = p[-1].nb;
                memcpy(p->b, p[-1].b, sizeof(p->b));
                short_dl = 1;
            } else {
                short_dl = 0;
                p->b[p->nb++] = (uint8_t)RND(PB_CONS);
                if (p->b[0] == 0 && RND(2) == 0) {
                    p->b[p->nb++] = PB_ROUTE;       /* same slot: phase 1 */
                }
                if (RND(5) < 3) {
                    p->b[p->nb++] = PB_GLOBAL;      /* another slot: phase 2 */
                }
            }
            for (int i = 0; i < p->nb; i++) {
                keys[i] = names[p->b[i]];
                lims[i] = lk[p->b[i]];
                if (lims[i].burst < maxc) maxc = lims[i].burst;
            }
            /* mostly small, now and then up to the smallest burst */
            p->cost = 1 + (uint32_t)(RND(8) == 0 ? RND(maxc) : RND(4));
            p->send = wall_us();
            p->op = tg_redis_charge(r[k], keys, lims, p->nb, p->cost, prop_on_charge, p);
            cr_assert_not_null(p->op);
            g_prop_pending++;
            if (short_dl) {
                tg_redis_op_deadline(p->op, tg_now_us() + 200 + RND(2500));
            }
        }
        if (issued > 0 && RND(30) == 0) {
            /* the requester goes away: a recent request still in flight */
            prop_rec *p = &rec[issued - 1 - RND(issued < 16 ? issued : 16)];
            if (p->st == PS_PENDING && p->op != NULL) {
                tg_redis_cancel(p->op);
                p->op = NULL;
                p->st = PS_CANCELLED;
                g_prop_pending--;
            }
        }
        for (int i = 0; i < NI; i++) {              /* each instance a turn */
            event_base_loop(bases[(k + i) % NI], EVLOOP_NONBLOCK);
        }
        usleep((useconds_t)(issued == NREQ ? 500 : 300 + RND(1500)));   /* pacing */
    }

    /* Barrier: a lookup in each bucket's slot, twice in a row on every
     * instance: refunds written when an answer arrived go out before the
     * next call on that connection, so after the second round every
     * refund has been applied. */
    for (int round = 0; round < 2; round++) {
        g_prop_barrier = 0;
        for (int i = 0; i < NI; i++) {
            for (int j = 0; j < 4; j++) {
                cr_assert_not_null(tg_redis_hget(r[i], tags[j], "f", prop_on_hget, NULL));
                g_prop_barrier++;
            }
        }
        deadline = tg_now_ms() + 10000;
        while (g_prop_barrier > 0 && tg_now_ms() < deadline) {
            for (int i = 0; i < NI; i++) {
                event_base_loop(bases[i], EVLOOP_NONBLOCK);
            }
            usleep(500);
        }
        cr_assert_eq(g_prop_barrier, 0, "barrier lookups not answered");
    }
    for (int i = 0; i < NI; i++) {
        tg_redis_get_stats(r[i], &st);
        refunds += st.refunds;
        reconnects += st.reconnects;
    }

    for (size_t i = 0; i < issued; i++) {
        nadm += rec[i].st == PS_ADMITTED;
        nden += rec[i].st == PS_DENIED;
        nerr += rec[i].st == PS_ERROR;
        ncan += rec[i].st == PS_CANCELLED;
        if (rec[i].st == PS_ADMITTED || rec[i].st == PS_DENIED) {
            if (rec[i].ans - rec[i].send > max_rtt) max_rtt = rec[i].ans - rec[i].send;
        }
    }
    nlate = nerr;

    for (int bk = 0; bk < PB_N; bk++) {
        const uint64_t T = lk[bk].interval_us;
        size_t n = 0;
        uint64_t ub = 0, lb = 0, tat, now0, allow;
        uint64_t sum_adm = 0;

        /* admitted requests of bk, by answer time */
        for (size_t i = 0; i < issued; i++) {
            if (rec[i].st == PS_ADMITTED && prop_has(&rec[i], bk)) {
                size_t j = n++;
                while (j > 0 && rec[idx[j - 1]].ans > rec[i].ans) {
                    idx[j] = idx[j - 1];
                    j--;
                }
                idx[j] = (int)i;
                sum_adm += rec[i].cost;
            }
        }
        /* 1. every window */
        for (size_t a = 0; a < n; a++) {
            uint64_t lo = rec[idx[a]].send, sum = 0;
            for (size_t b = 0; b < n; b++) {
                const prop_rec *p = &rec[idx[b]];
                if (p->send < lo) continue;
                sum += p->cost;
                cr_assert_leq(sum, lk[bk].burst + (p->ans - lo) / T + 1,
                              "seed %llu, %s: %llu tokens admitted within %llu us "
                              "(burst %u, T %llu us)", (unsigned long long)seed, names[bk],
                              (unsigned long long)sum, (unsigned long long)(p->ans - lo),
                              lk[bk].burst, (unsigned long long)T);
            }
        }
        /* 2. the state left in Redis */
        for (size_t a = 0; a < issued; a++) {
            const prop_rec *pk = &rec[a];
            uint64_t up = 0, low = pk->cost;
            if (!prop_has(pk, bk) || !prop_counts(pk, bk, reconnects)) {
                continue;
            }
            for (size_t b = 0; b < issued; b++) {
                const prop_rec *pj = &rec[b];
                if (!prop_has(pj, bk)) continue;
                if (prop_counts(pj, bk, reconnects) && pj->ans >= pk->send) {
                    up += pj->cost;
                }
                if (pk->st == PS_ADMITTED && pj->st == PS_ADMITTED && b != a
                    && pj->send >= pk->ans) {
                    low += pj->cost;
                }
            }
            if (pk->ans + T * up > ub) ub = pk->ans + T * up;
            if (pk->st == PS_ADMITTED && pk->send + T * low > lb) lb = pk->send + T * low;
        }
        now0 = wall_us();
        tat = prop_tat(names[bk]);
        if (tat == 0) {
            tat = now0;                 /* absent: full, TAT <= now */
        }
        /* a refund is sent without waiting for it: it may land later than the
         * slowest answer seen, and leave the debt of that delay behind */
        allow = T + 4 * max_rtt + 5000;
        cr_log_info("%s: burst %u, T %llu us: %zu admitted (%llu tokens); TAT - now "
                    "%lld us, reference [%lld, %lld] us, allowance %llu us", names[bk],
                    lk[bk].burst, (unsigned long long)T, n, (unsigned long long)sum_adm,
                    (long long)(tat - now0), (long long)(lb - now0), (long long)(ub - now0),
                    (unsigned long long)allow);
        if (reconnects > 0) {
            /* a refund on a dropped connection is lost: it leaves the
             * debt of a denied request, which only tollgate's own
             * fallback would know of; the upper bound is not exact */
            cr_log_warn("%s: %llu reconnects, upper bound not checked", names[bk],
                        (unsigned long long)reconnects);
        } else {
            cr_assert_leq(tat, (ub > now0 ? ub : now0) + allow,
                          "seed %llu, %s: TAT %lld us ahead, the admitted and failed "
                          "requests explain at most %lld (+%llu): something denied kept "
                          "its tokens", (unsigned long long)seed, names[bk],
                          (long long)(tat - now0), (long long)(ub - now0),
                          (unsigned long long)allow);
        }
        cr_assert_geq(tat + T, lb,
                      "seed %llu, %s: TAT %lld us ahead, the admitted requests alone need "
                      "%lld: tokens given back that were not owed", (unsigned long long)seed,
                      names[bk], (long long)(tat - now0), (long long)(lb - now0));
    }
    cr_log_info("cluster property: %zu requests on %d instances in %llu ms: %zu admitted, "
                "%zu denied, %zu failed (deadline), %zu cancelled; %llu refunds; "
                "longest answer %llu us; %llu reconnects", issued, NI,
                (unsigned long long)(tg_now_ms() - t_start), nadm, nden, nlate, ncan,
                (unsigned long long)refunds, (unsigned long long)max_rtt,
                (unsigned long long)reconnects);
    cr_assert_gt(nadm, 150, "too few admitted to mean anything");
    cr_assert_gt(nden, 300, "too few denied to mean anything");
    cr_assert_gt(refunds, 30, "the refund paths were hardly taken");
    for (int i = 0; i < NI; i++) {
        tg_redis_destroy(r[i]);
        event_base_free(bases[i]);
    }
    free(rec);
    free(idx);
#undef RND
}

static char *
node_id(int port)
{
    redisReply *rep = sync_cmd(port, "CLUSTER MYID");
    char *id;

    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STRING);
    id = strdup(rep->str);
    freeReplyObject(rep);
    return id;
}

static void
expect_ok(redisReply *rep, const char *what)
{
    cr_assert(rep != NULL && rep->type == REDIS_REPLY_STATUS,
              "%s: %s", what, rep != NULL && rep->str != NULL ? rep->str : "no reply");
    freeReplyObject(rep);
}

/* Slot migration under a live key: charges keep working (ASK, then
 * MOVED, followed) and the count stays exact. */
Test(redis_cluster, slot_migration_under_a_live_key)
{
    const char *key = "tg:{live}:t";
    tg_gcra_limit lim = tg_gcra_per_minute(1, 20);
    tg_gcra_limit glim = tg_gcra_per_second(1000, 1000000);
    struct tg_redis *r;
    tally t = { 0 };
    tg_redis_stats st;
    long long slot;
    int src, dst;
    char *src_id, *dst_id, slotstr[16], dstport[16];

    cluster_start();
    r = cluster_client(3);

    charge_many(r, key, lim, "tg:{global}:g", glim, 5, &t);
    src = key_node(key);
    cr_assert(src >= 0);
    dst = (src + 1) % 3;
    slot = sync_int(g_cport[0], "CLUSTER KEYSLOT %s", key);
    snprintf(slotstr, sizeof(slotstr), "%lld", slot);
    snprintf(dstport, sizeof(dstport), "%d", g_cport[dst]);
    src_id = node_id(g_cport[src]);
    dst_id = node_id(g_cport[dst]);

    expect_ok(sync_cmd(g_cport[dst], "CLUSTER SETSLOT %s IMPORTING %s", slotstr, src_id),
              "IMPORTING");
    expect_ok(sync_cmd(g_cport[src], "CLUSTER SETSLOT %s MIGRATING %s", slotstr, dst_id),
              "MIGRATING");
    charge_many(r, key, lim, "tg:{global}:g", glim, 5, &t);    /* still on src */
    {
        const char *argv[] = { "MIGRATE", "127.0.0.1", dstport, "", "0", "5000",
                               "KEYS", key };
        expect_ok(sync_argv(g_cport[src], 8, argv), "MIGRATE");
    }
    charge_many(r, key, lim, "tg:{global}:g", glim, 5, &t);    /* ASK -> dst */
    tg_redis_get_stats(r, &st);
    cr_assert(st.redirects >= 1, "no ASK followed");
    for (int i = 0; i < 3; i++) {
        int p = (dst + i) % 3;  /* the new owner first */
        expect_ok(sync_cmd(g_cport[p], "CLUSTER SETSLOT %s NODE %s", slotstr, dst_id),
                  "SETSLOT NODE");
    }
    charge_many(r, key, lim, "tg:{global}:g", glim, 25, &t);   /* MOVED -> dst */

    cr_assert_eq(t.errors, 0, "%d charges failed during the migration", t.errors);
    cr_assert_eq(t.allowed, 20, "%d of 40 allowed across the migration", t.allowed);
    cr_assert_eq(key_node(key), dst, "the bucket is not on the new owner");
    tg_redis_get_stats(r, &st);
    cr_assert(st.redirects >= 2, "redirects: %llu", (unsigned long long)st.redirects);
    cr_log_info("migration: %llu redirects followed, %llu map refreshes",
                (unsigned long long)st.redirects, (unsigned long long)st.map_refreshes);
    free(src_id);
    free(dst_id);
    tg_redis_destroy(r);
}

/* ------------------------------------------------------------------ */
/* Cluster with replicas: a master dies                                */

/* The master of port (a replica), or 0. */
static int
master_of(int port)
{
    redisReply *rep = sync_cmd(port, "ROLE");
    int m = 0;

    if (rep != NULL && rep->type == REDIS_REPLY_ARRAY && rep->elements >= 3
        && rep->element[0]->type == REDIS_REPLY_STRING
        && strcmp(rep->element[0]->str, "slave") == 0
        && rep->element[2]->type == REDIS_REPLY_INTEGER) {
        m = (int)rep->element[2]->integer;
    }
    if (rep) freeReplyObject(rep);
    return m;
}

static int
cond_never(const void *arg)
{
    return 0;
}

static int
is_master(int port, const void *arg)
{
    return reply_has(port, "role:master", "INFO replication");
}

/*
 * kill -9 of the master owning {global}, with a replica each: consumers
 * whose slots live on the other masters never see an error (a breaker
 * per node), and charges of {global} work again within 3 s of the
 * promotion (the slot map is asked again as soon as the node drops, not
 * after the 30 s refresh).
 */
Test(redis_cluster, master_killed_others_unaffected_back_within_3s)
{
    enum { NC = 24 };
    struct tg_redis *r;
    tg_redis_opts o;
    tg_gcra_limit lim = tg_gcra_per_second(100000, 100000);
    tg_gcra_limit slow = tg_gcra_per_minute(1, 1000000);
    tally t0;
    int gport = 0, gidx = -1, replica = 0, cnode[NC], other_errors = 0, dead_errors = 0;
    char ckey[NC][32];
    uint64_t t_kill, t_promo = 0, t_back = 0, end;
    tg_redis_stats st;

    cluster_start_n(6);
    memset(&o, 0, sizeof(o));
    for (int i = 0; i < 3; i++) {
        snprintf(o.cluster_nodes[i].host, sizeof(o.cluster_nodes[i].host), "127.0.0.1");
        o.cluster_nodes[i].port = g_cport[i];
    }
    o.ncluster = 3;
    o.timeout_ms = 100;
    o.max_batch = 32;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(run_until(cond_ready, r, 10000), "never learnt the slot map");
    cr_assert(charge_ok_eventually(r, "tg:{global}:g", 10000));
    memset(&t0, 0, sizeof(t0));          /* a key that lives a minute: EXISTS finds it */
    charge_many(r, "tg:{global}:probe", slow, NULL, slow, 1, &t0);
    cr_assert_eq(t0.allowed, 1);
    for (int i = 0; i < 6; i++) {
        long long e = sync_int(g_cport[i], "EXISTS %s", "tg:{global}:probe");
        if (e == 1 && master_of(g_cport[i]) == 0) {
            gport = g_cport[i];
            gidx = i;
        }
    }
    cr_assert(gidx >= 0, "no master holds {global}");
    for (int i = 0; i < 6; i++) {
        if (master_of(g_cport[i]) == gport) {
            replica = g_cport[i];
        }
    }
    cr_assert(replica != 0, "the master of {global} has no replica");
    for (int i = 0; i < NC; i++) {
        snprintf(ckey[i], sizeof(ckey[i]), "tg:{c-%02d}:t", i);
        char probe[32];
        snprintf(probe, sizeof(probe), "tg:{c-%02d}:probe", i);
        memset(&t0, 0, sizeof(t0));
        charge_many(r, probe, slow, NULL, slow, 1, &t0);
        cr_assert_eq(t0.allowed, 1);
        cnode[i] = sync_int(gport, "EXISTS %s", probe) == 1;   /* on the victim */
    }

    cr_assert_eq(tgh_proc_kill(g_cnode[gidx].proc), 0);
    t_kill = tg_now_ms();
    end = t_kill + 30000;
    while (tg_now_ms() < end && t_back == 0) {
        tally t[NC + 1];
        memset(t, 0, sizeof(t));
        for (int i = 0; i < NC; i++) {
            charge_many(r, ckey[i], lim, NULL, lim, 1, &t[i]);
            if (t[i].errors > 0) {
                if (cnode[i]) dead_errors++;
                else other_errors++;
            }
        }
        charge_many(r, "tg:{global}:g", lim, NULL, lim, 1, &t[NC]);
        if (t_promo == 0 && is_master(replica, NULL)) {
            t_promo = tg_now_ms();
        }
        if (t_promo != 0 && t[NC].allowed == 1) {
            t_back = tg_now_ms();
        }
        run_until(cond_never, NULL, 20);      /* a round every ~20 ms */
    }
    tg_redis_get_stats(r, &st);
    cr_log_info("cluster kill -9: promotion after %llu ms, {global} back on Redis %llu ms "
                "after it; errors: %d on the dead node's consumers, %d on the others; "
                "%llu map refreshes (%llu asked by node failures)",
                (unsigned long long)(t_promo - t_kill),
                (unsigned long long)(t_back - t_promo), dead_errors, other_errors,
                (unsigned long long)st.map_refreshes, (unsigned long long)st.map_kicks);
    if (t_promo == 0) {
        redisReply *rep = sync_cmd(replica, "CLUSTER NODES");
        cr_log_error("victim %d replica %d: %s", gport, replica,
                     rep && rep->str ? rep->str : "?");
        if (rep) freeReplyObject(rep);
    }
    cr_assert(t_promo != 0, "the replica was never promoted");
    cr_assert(t_back != 0, "{global} never came back");
    cr_assert_leq(t_back - t_promo, 3000, "{global} back on Redis %llu ms after the "
                  "promotion", (unsigned long long)(t_back - t_promo));
    cr_assert_eq(other_errors, 0, "consumers on live masters got %d errors", other_errors);
    tg_redis_destroy(r);
}

/*
 * One master frozen (SIGSTOP) with the client's socket to it full (long
 * keys of its slot, a 2 s deadline): the consumers on the other masters
 * are answered meanwhile as before, every charge of the frozen one is
 * answered once (an error, by its deadline), and after its replica is
 * promoted that slot's charges are exact on it.
 */
Test(redis_cluster, a_full_socket_to_a_frozen_master_and_its_failover)
{
    enum { TURNS = 40, PER = 500, N = TURNS * PER, NC = 24 };
    struct tg_redis *r;
    tg_redis_opts o;
    tg_gcra_limit one = tg_gcra_per_minute(60, 10);
    tg_gcra_limit lim = tg_gcra_per_minute(1, 20);
    tg_gcra_limit slow = tg_gcra_per_minute(1, 1000000);
    static char key[180];
    char ckey[NC][32];
    int gport = 0, gidx = -1, replica = 0, on_victim[NC], others = 0;
    uint64_t t0;
    tally full = { 0 }, t = { 0 }, live = { 0 };

    signal(SIGPIPE, SIG_IGN);
    cluster_start_n(6);
    memset(&o, 0, sizeof(o));
    for (int i = 0; i < 3; i++) {
        snprintf(o.cluster_nodes[i].host, sizeof(o.cluster_nodes[i].host), "127.0.0.1");
        o.cluster_nodes[i].port = g_cport[i];
    }
    o.ncluster = 3;
    o.timeout_ms = 2000;
    o.max_batch = PER;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(run_until(cond_ready, r, 10000), "never learnt the slot map");
    cr_assert(charge_ok_eventually(r, "tg:{global}:g", 10000));
    charge_many(r, "tg:{global}:probe", slow, NULL, slow, 1, &t);
    for (int i = 0; i < 6; i++) {
        if (sync_int(g_cport[i], "EXISTS %s", "tg:{global}:probe") == 1
            && master_of(g_cport[i]) == 0) {
            gport = g_cport[i];
            gidx = i;
        }
    }
    cr_assert(gidx >= 0, "no master holds {global}");
    for (int i = 0; i < 6; i++) {
        if (master_of(g_cport[i]) == gport) {
            replica = g_cport[i];
        }
    }
    cr_assert(replica != 0, "the master of {global} has no replica");
    for (int i = 0; i < NC; i++) {
        char probe[32];
        tally p = { 0 };

        snprintf(ckey[i], sizeof(ckey[i]), "tg:{c-%02d}:t", i);
        snprintf(probe, sizeof(probe), "tg:{c-%02d}:probe", i);
        charge_many(r, probe, slow, NULL, slow, 1, &p);
        on_victim[i] = sync_int(gport, "EXISTS %s", probe) == 1;
        others += !on_victim[i];
    }
    cr_assert_gt(others, 0);

    cr_assert_eq(kill(g_cnode[gidx].proc->pid, SIGSTOP), 0);
    t0 = tg_now_ms();
    for (int i = 0; i < TURNS; i++) {
        for (int j = 0; j < PER; j++) {
            int n = snprintf(key, sizeof(key), "tg:{global}:%d:", i * PER + j);
            const char *keys[1] = { key };

            memset(key + n, 'k', sizeof(key) - 1 - (size_t)n);
            key[sizeof(key) - 1] = '\0';
            cr_assert_not_null(tg_redis_charge(r, keys, &one, 1, 1, on_charge, &full));
        }
        event_base_loop(g_base, EVLOOP_NONBLOCK);
    }
    /* the other masters answer as before while that socket is full */
    for (int i = 0; i < NC; i++) {
        if (!on_victim[i]) {
            uint64_t t1 = tg_now_ms();
            charge_many(r, ckey[i], lim, NULL, lim, 1, &live);
            cr_assert_lt(tg_now_ms() - t1, 500, "a live master's consumer waited %llu ms",
                         (unsigned long long)(tg_now_ms() - t1));
        }
    }
    cr_assert_eq(live.errors, 0, "consumers on live masters got %d errors", live.errors);
    cr_assert_eq(live.allowed, others);
    g_want = N;
    cr_assert(run_until(cond_answered, &full, 10000), "%d of %d answered", full.answered, N);
    cr_log_info("cluster, full socket to a frozen master: %d charges answered after %llu "
                "ms", N, (unsigned long long)(tg_now_ms() - t0));
    cr_assert_eq(full.errors, N, "%d errors, %d allowed", full.errors, full.allowed);
    cr_assert(poll_until(is_master, replica, NULL, 30000), "the replica was never promoted");
    cr_assert(charge_ok_eventually(r, "tg:{global}:g", 30000), "no charge after failover");
    cr_assert_eq(kill(g_cnode[gidx].proc->pid, SIGCONT), 0);
    memset(&t, 0, sizeof(t));
    charge_many(r, "tg:{global}:after", lim, NULL, lim, 40, &t);
    cr_assert_eq(t.errors, 0);
    cr_assert_eq(t.allowed, 20, "after failover: %d of 40 allowed", t.allowed);
    g_want = N + 1;
    run_until(cond_answered, &full, 200);
    cr_assert_eq(full.answered, N, "answered twice: %d", full.answered);
    tg_redis_destroy(r);
}

/* ------------------------------------------------------------------ */
/* names from Redis: resolved off the loop                             */

/*
 * Cluster nodes that announce themselves by name (CLUSTER SLOTS says
 * "localhost"): the client resolves the name with evdns, without blocking
 * its loop, and charges work on every node.  Skipped where "localhost"
 * does not resolve.
 */
Test(redis_cluster, nodes_announced_by_hostname)
{
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *ai = NULL;
    struct tg_redis *r;
    tg_redis_opts o;
    redisReply *rep;
    int named;

    if (getaddrinfo("localhost", NULL, &hints, &ai) != 0) {
        cr_skip_test("localhost does not resolve here");
    }
    freeaddrinfo(ai);
    g_announce = "localhost";
    cluster_start_n(3);
    g_announce = NULL;
    rep = sync_cmd(g_cport[0], "CLUSTER SLOTS");
    named = rep != NULL && rep->type == REDIS_REPLY_ARRAY && rep->elements > 0
            && strcmp(rep->element[0]->element[2]->element[0]->str, "localhost") == 0;
    if (rep) freeReplyObject(rep);
    cr_assert(named, "CLUSTER SLOTS does not name the nodes \"localhost\"");

    memset(&o, 0, sizeof(o));
    snprintf(o.cluster_nodes[0].host, sizeof(o.cluster_nodes[0].host), "127.0.0.1");
    o.cluster_nodes[0].port = g_cport[0];
    o.ncluster = 1;
    o.timeout_ms = 1000;
    o.max_batch = 32;
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(run_until(cond_ready, r, 10000), "never learnt the slot map");
    /* {a}, {b}, {c}: one key per node, each node reached by its name */
    cr_assert(charge_ok_eventually(r, "tg:{a}:probe", 10000));
    cr_assert(charge_ok_eventually(r, "tg:{b}:probe", 10000));
    cr_assert(charge_ok_eventually(r, "tg:{c}:probe", 10000));
    tg_redis_destroy(r);
}

/* ------------------------------------------------------------------ */
/* AUTH on Cluster nodes and on sentinels                              */

/* Every node has requirepass: the client authenticates on its node
 * connections and its CLUSTER SLOTS questions; charges work on every
 * node.  A wrong password: nothing works, the failure is counted. */
Test(redis_cluster, nodes_with_a_password)
{
    struct tg_redis *r;
    tg_redis_opts o;
    tg_redis_stats st;
    char last[256];

    g_auth = "cluster-secret";
    cluster_start_n(3);
    memset(&o, 0, sizeof(o));
    snprintf(o.cluster_nodes[0].host, sizeof(o.cluster_nodes[0].host), "127.0.0.1");
    o.cluster_nodes[0].port = g_cport[0];
    o.ncluster = 1;
    o.timeout_ms = 1000;
    o.max_batch = 32;
    snprintf(o.password, sizeof(o.password), "cluster-secret");
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(run_until(cond_ready, r, 10000), "never learnt the slot map");
    cr_assert(charge_ok_eventually(r, "tg:{a}:probe", 10000));
    cr_assert(charge_ok_eventually(r, "tg:{b}:probe", 10000));
    cr_assert(charge_ok_eventually(r, "tg:{c}:probe", 10000));
    tg_redis_destroy(r);

    snprintf(o.password, sizeof(o.password), "wrong");
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(!run_until(cond_ready, r, 1500), "ready with a wrong password");
    tg_redis_get_stats(r, &st);
    cr_assert_geq(st.auth_failures, 1);
    tg_redis_last_error(last, sizeof(last));
    cr_assert(strstr(last, "AUTH to server 127.0.0.1:") != NULL
              && strstr(last, "WRONGPASS") != NULL, "last error: %s", last);
    cr_assert_null(strstr(last, "wrong"), "the password shows: %s", last);
    tg_redis_destroy(r);
    g_auth = NULL;
}

/* A master with a password and a sentinel with another one: the client
 * authenticates to each with its own; a wrong sentinel password is an
 * error that names the sentinel. */
Test(redis_sentinel, master_and_sentinel_passwords_differ)
{
    int mport;
    tgh_upstream sent;
    tg_redis_opts o;
    struct tg_redis *r;
    tally t = { 0 };
    tg_gcra_limit lim = tg_gcra_per_minute(1, 20);
    char last[256];

    redis_start(&mport, 0, "m-pass");
    TGH_CHECK(tgh_sentinel_start(&sent, "s-pass",
                                 "sentinel monitor mymaster 127.0.0.1 %d 1\n"
                                 "sentinel auth-pass mymaster m-pass\n", mport) == 0,
              "sentinel did not start");

    memset(&o, 0, sizeof(o));
    snprintf(o.sentinel_master, sizeof(o.sentinel_master), "mymaster");
    snprintf(o.sentinels[0].host, sizeof(o.sentinels[0].host), "127.0.0.1");
    o.sentinels[0].port = sent.port;
    o.nsentinels = 1;
    o.timeout_ms = 200;
    o.max_batch = 32;
    snprintf(o.password, sizeof(o.password), "m-pass");
    snprintf(o.sentinel_password, sizeof(o.sentinel_password), "s-pass");
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(run_until(cond_ready, r, 10000), "never found the master");
    charge_many(r, "tg:{auth}:t", lim, NULL, lim, 30, &t);
    cr_assert_eq(t.allowed, 20, "%d of 30 allowed", t.allowed);
    tg_redis_destroy(r);

    snprintf(o.sentinel_password, sizeof(o.sentinel_password), "not-s-pass");
    r = tg_redis_create(g_base, &o);
    cr_assert_not_null(r);
    cr_assert(!run_until(cond_ready, r, 1500), "ready with a wrong sentinel password");
    tg_redis_last_error(last, sizeof(last));
    cr_assert(strstr(last, "AUTH to sentinel 127.0.0.1:") != NULL
              && strstr(last, "WRONGPASS") != NULL, "last error: %s", last);
    cr_assert_null(strstr(last, "not-s-pass"), "the password shows: %s", last);
    tg_redis_destroy(r);
}
