/*
 * test_edge_accept.c - what the edge admits before any request: caps on
 * connections per process and per client address (closed at once, the
 * others unharmed), accept pausing instead of spinning when descriptors
 * run out, the admin listener refusing bodies without reading them, and
 * SIGHUP applying the http.* limits to new requests.
 */
#include <criterion/criterion.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/ptrace.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

TestSuite(edge_accept, .fini = tgh_cleanup, .timeout = 180);

static tgh_upstream up;
static tgh_tollgate tg;

static void
start(const char *http_extra, int workers)
{
    tgh_tg_opts o;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    tgh_tg_opts_default(&o, up.port);
    o.http_extra = http_extra;
    o.workers = workers;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
}

/* A value of /metrics (the first line starting with name), or -1. */
static long
metric(const char *name)
{
    tgh_resp r;
    long v = -1;

    if (tgh_http(tg.admin_port, "GET", "/metrics", NULL, NULL, 0, &r, 10000) == 0
        && r.status == 200) {
        const char *p = (const char *)r.body;
        size_t n = strlen(name);
        while (p != NULL && *p != '\0') {
            if (strncmp(p, name, n) == 0 && p[n] == ' ') {
                v = atol(p + n + 1);
                break;
            }
            p = strchr(p, '\n');
            p = p ? p + 1 : NULL;
        }
    }
    tgh_resp_free(&r);
    return v;
}

/* Wait until tollgate counts exactly n open client connections (closes
 * are counted when the worker has seen them). */
static void
await_open(long n)
{
    uint64_t end = tgh_now_ms() + 10000;
    long v = -1;

    while (tgh_now_ms() < end) {
        if ((v = metric("tollgate_connections_open")) == n)
            return;
        tgh_sleep_ms(20);
    }
    TGH_CHECK(0, "tollgate_connections_open is %ld, expected %ld", v, n);
}

/* One keep-alive GET on c: its status, or -1 (closed, timeout). */
static int
get_on(tgh_conn *c)
{
    static const char req[] = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";
    tgh_resp r;
    int st = -1;

    if (tgh_conn_send(c, req, sizeof req - 1, 5000) == 0
        && tgh_conn_read_response(c, &r, 0, 5000) == 0)
        st = r.status;
    tgh_resp_free(&r);
    return st;
}

/* A connection closed by the server before any byte: EOF (or a reset),
 * and nothing to read. */
static void
check_refused(int port, const char *what)
{
    tgh_conn *c = tgh_conn_open(port, 5000);
    size_t extra = 1;

    TGH_CHECK(c != NULL, "%s: connect failed", what);
    TGH_CHECK(tgh_conn_wait_closed(c, 5000, &extra) == 1,
              "%s: the connection over the cap was not closed", what);
    TGH_CHECK(extra == 0, "%s: %zu bytes came before the close", what, extra);
    tgh_conn_close(c);
}

static void
check_cap(int cap, const char *what)
{
    tgh_conn *c[8];
    int i;

    await_open(0);                       /* the harness's probes are gone */
    for (i = 0; i < cap; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(c[i] != NULL, "%s: connection %d", what, i);
        TGH_CHECK(get_on(c[i]) == 200, "%s: connection %d within the cap", what, i);
    }
    check_refused(tg.port, what);
    check_refused(tg.port, what);
    for (i = 0; i < cap; i++)
        TGH_CHECK(get_on(c[i]) == 200, "%s: connection %d after the refusals", what, i);
    TGH_CHECK(metric("tollgate_connections_refused_total") == 2,
              "%s: refused %ld, expected 2", what,
              metric("tollgate_connections_refused_total"));

    /* one closes: one more fits, exactly */
    tgh_conn_close(c[0]);
    await_open(cap - 1);
    c[0] = tgh_conn_open(tg.port, 5000);
    TGH_CHECK(c[0] != NULL && get_on(c[0]) == 200, "%s: a freed place is usable", what);
    check_refused(tg.port, what);
    for (i = 0; i < cap; i++)
        tgh_conn_close(c[i]);
    await_open(0);
}

Test(edge_accept, per_ip_cap_closes_the_extra_connections)
{
    /* all test traffic comes from 127.0.0.1: one address */
    start("max_connections_per_ip: 4", 2);
    check_cap(4, "per-ip");
}

Test(edge_accept, global_cap_closes_the_extra_connections)
{
    start("max_connections: 3, max_connections_per_ip: 0", 2);
    check_cap(3, "global");
}

/* http.reuseport: every worker accepts on its own socket; the caps are
 * still the process's, exact (one shared table), and it serves. */
Test(edge_accept, reuseport_serves_and_caps_hold)
{
    tgh_conn *c[16];
    int i;

    start("reuseport: true, max_connections_per_ip: 4", 2);
    TGH_CHECK(tgh_listening_sockets(tg.port) == 2, "listening sockets on the port: %d, "
              "expected one per worker", tgh_listening_sockets(tg.port));
    check_cap(4, "reuseport per-ip");
    /* the kernel spreads connections over both workers' sockets: 16
     * sequential connections, one request each, all served */
    for (i = 0; i < 16; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(c[i] != NULL && get_on(c[i]) == 200, "reuseport: connection %d", i);
        tgh_conn_close(c[i]);
    }
}

Test(edge_accept, reuseport_global_cap_holds)
{
    start("reuseport: true, max_connections: 3, max_connections_per_ip: 0", 2);
    check_cap(3, "reuseport global");
}

/* ---- head buffers ------------------------------------------------------- */

static long rss_kb(pid_t pid);

/* With max_header_bytes at its maximum (1 MiB), 64 connections, idle or
 * between requests, must not hold 64 MiB of head buffers. */
Test(edge_accept, idle_connections_hold_no_head_buffer)
{
    enum { NCONN = 64 };
    tgh_conn *c[NCONN];
    tgh_tg_opts o;
    long data0, data1, data2;
    int i;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    tgh_tg_opts_default(&o, up.port);
    o.max_header_bytes = 1048576;
    o.workers = 1;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
    await_open(0);
    data0 = tgh_proc_status_kb(tg.proc->pid, "VmData");
    for (i = 0; i < NCONN; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(c[i] != NULL, "connect %d", i);
    }
    await_open(NCONN);
    data1 = tgh_proc_status_kb(tg.proc->pid, "VmData");
    for (i = 0; i < NCONN; i++)
        TGH_CHECK(get_on(c[i]) == 200, "request on connection %d", i);
    data2 = tgh_proc_status_kb(tg.proc->pid, "VmData");
    TGH_CHECK(data0 > 0 && data1 > 0 && data2 > 0, "cannot read VmData");
    TGH_CHECK(data1 - data0 < 16 * 1024, "%d idle connections took %ld kB", NCONN,
              data1 - data0);
    TGH_CHECK(data2 - data0 < 16 * 1024, "%d connections between requests hold %ld kB",
              NCONN, data2 - data0);
    for (i = 0; i < NCONN; i++)
        tgh_conn_close(c[i]);
}

/* 1,000 keep-alive connections, each idle after one request, hold under
 * 6 KiB of resident memory each (measured: about 3.8 kB; 8.8 kB when each
 * held a header array and a head copy: 10,000 took 86 MiB).  Resident
 * memory under ASan measures ASan, so that build skips the check. */
Test(edge_accept, idle_keepalive_connections_stay_small)
{
    enum { NCONN = 1000 };
    static tgh_conn *c[NCONN];
    tgh_tg_opts o;
    tgh_conn *warm;
    long rss0, rss1;
    int i;

#if defined(__SANITIZE_ADDRESS__)
    cr_skip_test("resident memory under ASan is ASan's");
#endif
    if (tgh_need_nofile(NCONN + 512) != 0)      /* tollgate inherits it */
        cr_skip_test("RLIMIT_NOFILE cannot reach %d", NCONN + 512);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    tgh_tg_opts_default(&o, up.port);
    o.workers = 1;
    o.http_extra = "max_connections_per_ip: 0";
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
    warm = tgh_conn_open(tg.port, 5000);           /* pool, first allocations */
    TGH_CHECK(warm != NULL && get_on(warm) == 200, "warm-up request");
    tgh_conn_close(warm);
    await_open(0);

    rss0 = rss_kb(tg.proc->pid);
    for (i = 0; i < NCONN; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(c[i] != NULL, "connect %d", i);
        TGH_CHECK(get_on(c[i]) == 200, "request on connection %d", i);
    }
    await_open(NCONN);
    rss1 = rss_kb(tg.proc->pid);
    TGH_CHECK(rss0 > 0 && rss1 > 0, "cannot read VmRSS");
    TGH_CHECK((rss1 - rss0) * 1024 / NCONN < 6144, "%d idle connections grew "
              "VmRSS by %ld kB: %ld bytes each", NCONN, rss1 - rss0,
              (rss1 - rss0) * 1024 / NCONN);
    for (i = 0; i < NCONN; i++)
        tgh_conn_close(c[i]);
}

/* ---- out of descriptors -------------------------------------------------- */

static double
cpu_seconds(pid_t pid)
{
    char path[64], buf[2048], *p;
    unsigned long ut = 0, st = 0;
    FILE *f;
    size_t n;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    f = fopen(path, "r");
    if (f == NULL)
        return -1;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    p = strrchr(buf, ')');               /* comm may hold spaces */
    if (p == NULL || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
                            &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static int
count_fds(pid_t pid)
{
    char buf[32];

    return tgh_sh(buf, sizeof buf, "ls /proc/%d/fd | wc -l", (int)pid) == 0 ? atoi(buf) : -1;
}

static int
run_prlimit(pid_t pid, int nofile)
{
    char cmd[128];

    snprintf(cmd, sizeof cmd, "prlimit --pid %d --nofile=%d:%d", (int)pid, nofile, nofile);
    return system(cmd);
}

/* workers: 1, the worker accepts; 2, the main thread accepts and hands
 * each connection to a worker. */
static void
out_of_descriptors(int workers)
{
    enum { NCONN = 40 };
    tgh_conn *c[NCONN];
    double cpu0, cpu1;
    int i, fds, st;
    tgh_resp r;

    start(NULL, workers);
    await_open(0);
    fds = count_fds(tg.proc->pid);
    TGH_CHECK(fds > 0, "cannot count the descriptors of tollgate");
    /* room for a handful of connections, far fewer than we open */
    TGH_CHECK(run_prlimit(tg.proc->pid, fds + 8) == 0, "prlimit failed");

    for (i = 0; i < NCONN; i++) {
        c[i] = tgh_conn_open(tg.port, 5000);   /* the kernel's backlog takes them */
        TGH_CHECK(c[i] != NULL, "connect %d", i);
    }
    /* saturated: wait until tollgate has hit the limit ... */
    {
        uint64_t end = tgh_now_ms() + 10000;
        while (tgh_now_ms() < end && count_fds(tg.proc->pid) < fds + 8)
            tgh_sleep_ms(20);
    }
    /* ... then it must idle, not spin on accept */
    cpu0 = cpu_seconds(tg.proc->pid);
    tgh_sleep_ms(2000);
    cpu1 = cpu_seconds(tg.proc->pid);
    TGH_CHECK(cpu0 >= 0 && cpu1 >= 0, "cannot read the CPU time of tollgate");
    fprintf(stderr, "cpu while saturated: %.3f s\n", cpu1 - cpu0);
    TGH_CHECK(cpu1 - cpu0 < 0.2, "tollgate used %.2f s of CPU in 2 s while out of "
              "descriptors (accept spinning?)", cpu1 - cpu0);
    TGH_CHECK(tgh_proc_alive(tg.proc), "tollgate died out of descriptors");

    for (i = 0; i < NCONN; i++)
        tgh_conn_close(c[i]);
    /* recovers: serves again once descriptors are back */
    {
        uint64_t end = tgh_now_ms() + 15000;
        st = -1;
        while (tgh_now_ms() < end) {
            if (tgh_http(tg.port, "GET", "/", NULL, NULL, 0, &r, 5000) == 0)
                st = r.status;
            tgh_resp_free(&r);
            if (st == 200)
                break;
            tgh_sleep_ms(50);
        }
    }
    TGH_CHECK(st == 200, "no 200 after the connections closed (got %d)", st);
}

Test(edge_accept, out_of_descriptors_pauses_accept_then_recovers)
{
    out_of_descriptors(1);
}

Test(edge_accept, out_of_descriptors_pauses_accept_then_recovers_main_thread)
{
    out_of_descriptors(2);
}

/* Context switches of the main thread of pid (voluntary + not), or -1. */
static long
main_thread_switches(pid_t pid)
{
    char path[64], line[256];
    long n = 0, k = 0;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/task/%d/status", (int)pid, (int)pid);
    f = fopen(path, "r");
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "voluntary_ctxt_switches: %ld", &n) == 1
            || sscanf(line, "nonvoluntary_ctxt_switches: %ld", &n) == 1)
            k += n;
    fclose(f);
    return k;
}

/*
 * With a single worker, the worker accepts itself: 200 new connections
 * (one request each) are served without waking the main thread for each
 * (it accepted every one and wrote it to the worker's pipe: at least 200
 * wakeups).  Its own timers may wake it a few times a second.
 */
Test(edge_accept, one_worker_accepts_without_the_main_thread)
{
    enum { NCONN = 200 };
    long sw0, sw1;
    uint64_t t0, ms;
    int i, ok = 0;
    tgh_resp r;

    start(NULL, 1);
    await_open(0);
    t0 = tgh_now_ms();
    sw0 = main_thread_switches(tg.proc->pid);
    for (i = 0; i < NCONN; i++) {
        if (tgh_http(tg.port, "GET", "/", NULL, NULL, 0, &r, 5000) == 0 && r.status == 200)
            ok++;
        tgh_resp_free(&r);
    }
    sw1 = main_thread_switches(tg.proc->pid);
    ms = tgh_now_ms() - t0;
    TGH_CHECK(sw0 >= 0 && sw1 >= 0, "cannot read the main thread's context switches");
    cr_log_info("%d connections in %llu ms: %ld main-thread context switches", NCONN,
                (unsigned long long)ms, sw1 - sw0);
    TGH_CHECK(ok == NCONN, "%d of %d connections answered 200", ok, NCONN);
    TGH_CHECK(sw1 - sw0 < 20 + (long)(ms / 50), "the main thread switched %ld times for "
              "%d connections in %llu ms", sw1 - sw0, NCONN, (unsigned long long)ms);
}

/* ---- a worker that stops reading its pipe --------------------------------- */

/* The thread of pid named name (/proc/PID/task/TID/comm), or -1. */
static pid_t
thread_named(pid_t pid, const char *name)
{
    char path[300], comm[32];
    struct dirent *de;
    pid_t tid = -1;
    DIR *d;

    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    if ((d = opendir(path)) == NULL)
        return -1;
    while (tid < 0 && (de = readdir(d)) != NULL) {
        FILE *f;
        if (de->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/proc/%d/task/%s/comm", (int)pid, de->d_name);
        if ((f = fopen(path, "r")) == NULL)
            continue;
        if (fgets(comm, sizeof comm, f) != NULL) {
            comm[strcspn(comm, "\n")] = '\0';
            if (strcmp(comm, name) == 0)
                tid = (pid_t)atoi(de->d_name);
        }
        fclose(f);
    }
    closedir(d);
    return tid;
}

/* Connections, and the most that a worker's pipe can hold (64 KiB, a
 * message of more than 64 bytes; 736 here).  With both workers stopped,
 * what the two pipes and the main thread do not hold (2,400 - 2 x 736 - 1
 * = 927) waits in the kernel's backlog: 1,024 (it was libevent's 128). */
enum { STUCK_NCONN = 2400, PIPE_HOLDS_AT_MOST = 1024 };

/* The connections of stopped_workers, a request sent on each; done: 1 answered
 * 200 and closed, -1 closed (or reset) without a whole 200. */
static struct {
    int  n;                             /* connections opened so far */
    int  fd[STUCK_NCONN];
    int  done[STUCK_NCONN];
    char buf[STUCK_NCONN][16];
    int  got[STUCK_NCONN];
} sc;

/* Read what is there on every open connection; the number answered. */
static int
stuck_poll(int timeout_ms, int *closed)
{
    static struct pollfd p[STUCK_NCONN];
    int i, n = 0, answered = 0;

    for (i = 0; i < sc.n; i++)
        if (sc.done[i] == 0)
            p[n++] = (struct pollfd){ sc.fd[i], POLLIN, 0 };
    if (n > 0)
        poll(p, (nfds_t)n, timeout_ms);
    *closed = 0;
    for (i = 0; i < sc.n; i++) {
        if (sc.done[i] == 0) {
            char b[4096];
            ssize_t k = recv(sc.fd[i], b, sizeof b, MSG_DONTWAIT);
            if (k > 0) {
                size_t room = sizeof sc.buf[i] - 1 - (size_t)sc.got[i];
                size_t c = (size_t)k < room ? (size_t)k : room;
                memcpy(sc.buf[i] + sc.got[i], b, c);
                sc.got[i] += (int)c;
            } else if (k == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
                sc.buf[i][sc.got[i]] = '\0';
                sc.done[i] = strncmp(sc.buf[i], "HTTP/1.1 200 ", 13) == 0 ? 1 : -1;
                close(sc.fd[i]);
            }
        }
        answered += sc.done[i] == 1;
        *closed += sc.done[i] == -1;
    }
    return answered;
}

/* Stop (ptrace) the thread of tollgate named name; its tid. */
static pid_t
stop_thread(const char *name)
{
    pid_t tid = thread_named(tg.proc->pid, name);
    int st;

    TGH_CHECK(tid > 0, "no thread named %s in tollgate", name);
    TGH_CHECK(ptrace(PTRACE_SEIZE, tid, NULL, NULL) == 0, "ptrace seize %s: %s", name,
              strerror(errno));
    TGH_CHECK(ptrace(PTRACE_INTERRUPT, tid, NULL, NULL) == 0, "ptrace interrupt %s: %s",
              name, strerror(errno));
    TGH_CHECK(waitpid(tid, &st, __WALL) == tid && WIFSTOPPED(st), "%s did not stop", name);
    return tid;
}

/* Set by a while_stopped that sends SIGTERM: tollgate ends once the
 * workers have gone on and served what they hold. */
static int sw_stopping;

/*
 * nstopped of two workers stop (ptrace holds their threads, as a worker
 * stuck in a long loop turn would be) while 2,400 clients connect and
 * send a request.  The main thread hands a connection to a worker through
 * its pipe, and a stopped worker's fills after several hundred.  Then the
 * main thread passes it over: with one worker stopped the other answers
 * every connection it is given; with both stopped, the main thread keeps
 * one connection and stops accepting for a while, the rest waiting in the
 * kernel's backlog.  Either way the admin listener answers, and when the
 * workers go on every connection is answered: none is lost.  (The write
 * to the pipe used to block: the main thread stopped with the worker, and
 * with it every new connection, the admin listener and the signals.)
 */
static void
stopped_workers(int nstopped, void (*while_stopped)(void))
{
    static const char req[] = "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    int i, answered = 0, closed = 0, want;
    pid_t tid[2];
    uint64_t end;
    tgh_tg_opts o;
    tgh_resp r;

    TGH_CHECK(tgh_need_nofile(2 * STUCK_NCONN + 512) == 0,
              "cannot raise RLIMIT_NOFILE to %d", 2 * STUCK_NCONN + 512);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    tgh_tg_opts_default(&o, up.port);
    o.http_extra = "max_connections_per_ip: 0";
    o.workers = 2;
    o.header_timeout_ms = 120000;   /* none waits long enough to be shed as stale */
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
    tid[0] = stop_thread("tg-worker-1");
    if (nstopped == 2)
        tid[1] = stop_thread("tg-worker-0");

    for (i = 0; i < STUCK_NCONN; i++) {
        sc.fd[i] = tgh_tcp_connect(tg.port, 5000);
        TGH_CHECK(sc.fd[i] >= 0, "connection %d: connect failed", i);
        TGH_CHECK(send(sc.fd[i], req, sizeof req - 1, MSG_NOSIGNAL) == (ssize_t)(sizeof req - 1),
                  "connection %d: send failed", i);
        sc.n = i + 1;
        if (i % 64 == 63)
            answered = stuck_poll(0, &closed);
    }
    /* everything but what waits for a stopped worker is answered, and no
     * more comes (2 s more) */
    want = nstopped == 1 ? STUCK_NCONN - PIPE_HOLDS_AT_MOST : 0;
    end = tgh_now_ms() + 30000;
    while (tgh_now_ms() < end && answered + closed < want)
        answered = stuck_poll(100, &closed);
    end = tgh_now_ms() + 2000;
    while (tgh_now_ms() < end)
        answered = stuck_poll(100, &closed);
    cr_log_info("%d of 2 workers stopped: %d answered, %d closed, %d waiting", nstopped,
                answered, closed, STUCK_NCONN - answered - closed);
    TGH_CHECK(closed == 0, "%d connections closed without an answer", closed);
    TGH_CHECK(answered >= want, "only %d of %d connections answered with %d of two "
              "workers stopped (the main thread stalled)", answered, STUCK_NCONN, nstopped);
    TGH_CHECK(tgh_http(tg.admin_port, "GET", "/metrics", NULL, NULL, 0, &r, 5000) == 0
              && r.status == 200, "the admin listener does not answer (%s)", r.reason);
    tgh_resp_free(&r);
    if (nstopped == 2) {
        TGH_CHECK(answered == 0, "%d answered with both workers stopped", answered);
        TGH_CHECK(tgh_sh(NULL, 0, "grep -q \"every worker's queue of new connections is "
                         "full\" '%s'", tg.proc->log_path) == 0,
                  "no warning that the workers' queues are full");
    }

    if (while_stopped != NULL)
        while_stopped();

    /* the workers go on: every connection waiting is answered */
    for (i = 0; i < nstopped; i++)
        TGH_CHECK(ptrace(PTRACE_DETACH, tid[i], NULL, NULL) == 0, "ptrace detach: %s",
                  strerror(errno));
    end = tgh_now_ms() + 30000;
    while (tgh_now_ms() < end && answered + closed < STUCK_NCONN)
        answered = stuck_poll(100, &closed);
    TGH_CHECK(answered == STUCK_NCONN && closed == 0, "after the workers went on: %d "
              "answered, %d closed, of %d", answered, closed, STUCK_NCONN);
    if (sw_stopping) {
        TGH_CHECK(tgh_proc_wait(tg.proc, 30000) == 0 && WIFEXITED(tg.proc->status)
                  && WEXITSTATUS(tg.proc->status) == 0, "tollgate did not end its drain");
        return;
    }
    TGH_CHECK(metric("tollgate_connections_refused_total") == 0, "%ld connections refused",
              metric("tollgate_connections_refused_total"));
}

Test(edge_accept, a_stopped_worker_does_not_stall_the_others)
{
    stopped_workers(1, NULL);
}

Test(edge_accept, every_worker_stopped_pauses_accept_and_loses_nothing)
{
    stopped_workers(2, NULL);
}

/* SIGTERM with worker 1 stopped and its pipe full: the main thread does
 * not wait for it (/readyz says 503 at once), worker 0 drains, and worker
 * 1, when it goes on, serves the connections in its pipe, then drains;
 * tollgate exits 0 with every connection answered. */
static void
drain_while_stopped(void)
{
    uint64_t end = tgh_now_ms() + 10000;
    int st = -1, said = 0;
    tgh_resp r;

    sw_stopping = 1;
    tgh_proc_signal(tg.proc, SIGTERM, 0);
    while (tgh_now_ms() < end && (st != 503 || !said)) {
        st = tgh_http(tg.admin_port, "GET", "/readyz", NULL, NULL, 0, &r, 5000) == 0
            ? r.status : -1;
        tgh_resp_free(&r);
        said = tgh_sh(NULL, 0, "grep -q 'worker 1 has not read its queue for a while: "
                      "drain waits for it' '%s'", tg.proc->log_path) == 0;
        if (st != 503 || !said)
            tgh_sleep_ms(20);
    }
    TGH_CHECK(st == 503, "/readyz while draining with worker 1 stopped: %d", st);
    TGH_CHECK(said, "no word of the drain waiting for worker 1");
}

Test(edge_accept, sigterm_with_a_stopped_worker_drains_both_and_loses_nothing)
{
    stopped_workers(1, drain_while_stopped);
}

/* ---- admin listener ------------------------------------------------------- */

static long
rss_kb(pid_t pid)
{
    return tgh_proc_status_kb(pid, "VmRSS");
}

/* head + body_len bytes of filler: sent while the answer is read */
static void
admin_upload(const char *head, size_t body_len)
{
    size_t hl = strlen(head);
    unsigned char *req = malloc(hl + body_len);
    long rss0, rss1;
    tgh_conn *c;
    tgh_resp r;
    int rc;

    cr_assert_not_null(req);
    memcpy(req, head, hl);
    memset(req + hl, 'x', body_len);
    rss0 = rss_kb(tg.proc->pid);
    c = tgh_conn_open(tg.admin_port, 5000);
    TGH_CHECK(c != NULL, "admin connect");
    rc = tgh_conn_roundtrip(c, req, hl + body_len, &r, 0, 10000);
    TGH_CHECK(rc == 0, "admin: no answer to a body (%s)", r.reason);
    TGH_CHECK(r.status == 413, "admin: status %d, expected 413", r.status);
    TGH_CHECK(tgh_resp_header(&r, "Connection") != NULL
              && strcmp(tgh_resp_header(&r, "Connection"), "close") == 0,
              "admin: the 413 does not close the connection");
    tgh_resp_free(&r);
    /* the rest of the upload is discarded, not stored */
    tgh_conn_send(c, req + hl, body_len, 5000);
    TGH_CHECK(tgh_conn_wait_closed(c, 5000, NULL) == 1, "admin: refused connection left open");
    rss1 = rss_kb(tg.proc->pid);
    TGH_CHECK(rss0 > 0 && rss1 > 0, "cannot read the RSS of tollgate");
    TGH_CHECK(rss1 - rss0 < 3 * 1024, "admin: RSS grew by %ld kB for a refused body",
              rss1 - rss0);
    tgh_conn_close(c);
    free(req);
}

Test(edge_accept, admin_refuses_bodies_without_reading_them)
{
    const char *asan = getenv("ASAN_OPTIONS");
    tgh_resp r;

    /* under ASan, freed buffers sit in its quarantine and count in the
     * RSS: without it, RSS measures what is kept, as in a plain build */
    char *opts = tgh_strf("%s%squarantine_size_mb=0", asan ? asan : "",
                          asan && *asan ? ":" : "");

    setenv("ASAN_OPTIONS", opts, 1);   /* copies it */
    free(opts);
    start(NULL, 1);
    admin_upload("POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 524288000\r\n\r\n",
                 8u << 20);
    admin_upload("POST /metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                 "7fffffff\r\n", 8u << 20);
    admin_upload("GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n", 10);

    /* a head of too many fields: 431, not memory */
    {
        size_t cap = 200 * 40 + 128, n = 0;
        char *head = malloc(cap);
        tgh_conn *c = tgh_conn_open(tg.admin_port, 5000);
        cr_assert_not_null(head);
        n += (size_t)snprintf(head + n, cap - n, "GET /healthz HTTP/1.1\r\nHost: a\r\n");
        for (int i = 0; i < 200; i++)
            n += (size_t)snprintf(head + n, cap - n, "X-F%d: %030d\r\n", i, i);
        n += (size_t)snprintf(head + n, cap - n, "\r\n");
        TGH_CHECK(c != NULL, "admin connect");
        TGH_CHECK(tgh_conn_roundtrip(c, head, n, &r, 0, 10000) == 0, "admin: no answer");
        TGH_CHECK(r.status == 431, "admin: status %d for 200 fields, expected 431", r.status);
        tgh_resp_free(&r);
        tgh_conn_close(c);
        free(head);
    }

    /* the admin still serves */
    TGH_CHECK(tgh_http(tg.admin_port, "GET", "/healthz", NULL, NULL, 0, &r, 5000) == 0
              && r.status == 200, "admin /healthz after the refusals");
    tgh_resp_free(&r);
    TGH_CHECK(tgh_http(tg.admin_port, "GET", "/metrics", "Content-Length: 0\r\n", NULL, 0,
                       &r, 5000) == 0 && r.status == 200, "admin GET with Content-Length: 0");
    tgh_resp_free(&r);
}

/* ---- SIGHUP ------------------------------------------------------------- */

static int
log_has(const char *needle)
{
    static char buf[1 << 20];
    FILE *f = fopen(tg.proc->log_path, "r");
    size_t n;

    if (f == NULL)
        return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return strstr(buf, needle) != NULL;
}

/* Replace the first `from` in the running config file with `to`. */
static void
edit_conf(const char *from, const char *to)
{
    static char buf[65536], out[65536];
    FILE *f = fopen(tg.conf_path, "r");
    size_t n;
    char *p;

    cr_assert_not_null(f);
    n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    p = strstr(buf, from);
    cr_assert_not_null(p, "no \"%s\" in the config", from);
    snprintf(out, sizeof out, "%.*s%s%s", (int)(p - buf), buf, to, p + strlen(from));
    f = fopen(tg.conf_path, "w");
    cr_assert_not_null(f);
    fputs(out, f);
    fclose(f);
}

static int
post_status(size_t len)
{
    char *body = malloc(len);
    tgh_resp r;
    int st = -1;

    cr_assert_not_null(body);
    memset(body, 'b', len);
    if (tgh_http(tg.port, "POST", "/echo", NULL, body, len, &r, 10000) == 0)
        st = r.status;
    tgh_resp_free(&r);
    free(body);
    return st;
}

Test(edge_accept, sighup_applies_http_limits_to_new_requests)
{
    uint64_t end;
    int ok = 0;

    start(NULL, 2);
    TGH_CHECK(post_status(2000) == 200, "2000-byte body before the reload");
    edit_conf("max_body_bytes: 16777216", "max_body_bytes: 1000");
    edit_conf("keepalive: 32", "keepalive: 8");
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && !ok) {
        ok = post_status(2000) == 413;
        for (int i = 0; i < 6 && ok; i++)       /* every worker */
            ok = post_status(2000) == 413;
        if (!ok)
            tgh_sleep_ms(20);
    }
    TGH_CHECK(ok, "max_body_bytes lowered by SIGHUP: a 2000-byte body still passes");
    TGH_CHECK(post_status(1000) == 200, "a body at the new limit");
    TGH_CHECK(log_has("configuration reloaded"), "no reload logged");
    TGH_CHECK(log_has("kept until the next restart (changed in the file): upstream.keepalive"),
              "no warning for a restart-only key");
}

/*
 * A reload reads its files on a thread of its own (tg-reload).  With the
 * config file replaced by a FIFO that nobody writes (as a file on a hung
 * network mount would be), SIGHUP leaves that thread waiting in open()
 * while the main thread goes on handing new connections to the two
 * workers and answering the admin listener; a second SIGHUP meanwhile
 * follows it.  When the FIFO is written, the first reload is refused (not
 * a regular file) and the running configuration kept; the second reads
 * the real file, put back in the meantime, and applies it.
 */
Test(edge_accept, sighup_reads_files_off_the_main_thread)
{
    char real[600], fifo[600];
    uint64_t end;
    tgh_resp r;
    int i, fd, ok = 0;

    start(NULL, 2);
    snprintf(real, sizeof real, "%s.real", tg.conf_path);
    snprintf(fifo, sizeof fifo, "%s.fifo", tg.conf_path);
    TGH_CHECK(rename(tg.conf_path, real) == 0 && mkfifo(fifo, 0600) == 0
              && link(fifo, tg.conf_path) == 0,
              "cannot put a FIFO in place of the config: %s", strerror(errno));
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && thread_named(tg.proc->pid, "tg-reload") < 0)
        tgh_sleep_ms(20);
    TGH_CHECK(thread_named(tg.proc->pid, "tg-reload") > 0, "no tg-reload thread after SIGHUP");

    for (i = 0; i < 20; i++) {           /* new connections: the main thread accepts */
        TGH_CHECK(tgh_http(tg.port, "GET", "/", NULL, NULL, 0, &r, 5000) == 0
                  && r.status == 200, "request %d while the reload waits: %s", i, r.reason);
        tgh_resp_free(&r);
    }
    TGH_CHECK(tgh_http(tg.admin_port, "GET", "/metrics", NULL, NULL, 0, &r, 5000) == 0
              && r.status == 200, "the admin listener does not answer (%s)", r.reason);
    tgh_resp_free(&r);
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && !log_has("a reload is loading; another follows it"))
        tgh_sleep_ms(20);
    TGH_CHECK(log_has("a reload is loading; another follows it"), "second SIGHUP not queued");
    TGH_CHECK(!log_has("configuration reloaded") && !log_has("configuration refused"),
              "the reload ended before its file was written");

    /* the real file back first (the loader waits on the FIFO itself, still
     * linked at fifo), then the FIFO opened and closed */
    TGH_CHECK(rename(real, tg.conf_path) == 0, "cannot put the config back: %s",
              strerror(errno));
    edit_conf("max_body_bytes: 16777216", "max_body_bytes: 1000");
    fd = open(fifo, O_WRONLY);           /* the loader holds the read end */
    TGH_CHECK(fd >= 0, "open the FIFO: %s", strerror(errno));
    close(fd);
    unlink(fifo);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && !ok) {
        ok = log_has("configuration reloaded");
        for (i = 0; i < 6 && ok; i++)    /* both workers */
            ok = post_status(2000) == 413;
        if (!ok)
            tgh_sleep_ms(20);
    }
    TGH_CHECK(log_has("new configuration refused") && log_has("not a regular file"),
              "the reload from the FIFO was not refused");
    TGH_CHECK(ok, "the second reload was not applied");
    TGH_CHECK(post_status(1000) == 200, "a body at the new limit");
}

/* SIGHUP with worker 1 stopped and its pipe full (see stopped_workers):
 * the main thread reloads without waiting for it, worker 0 applies the
 * new limit at once, and worker 1 gets it when it reads its pipe again. */
static void
reload_while_stopped(void)
{
    uint64_t end = tgh_now_ms() + 10000;

    edit_conf("max_body_bytes: 16777216", "max_body_bytes: 1000");
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    while (tgh_now_ms() < end && !log_has("configuration reloaded"))
        tgh_sleep_ms(20);
    TGH_CHECK(log_has("configuration reloaded"), "no reload while worker 1 is stopped");
    TGH_CHECK(log_has("worker 1 has not read its queue for a while: the new configuration "
                      "waits for it"), "no word of the reload waiting for worker 1");
    for (int i = 0; i < 6; i++)       /* new connections go to worker 0 */
        TGH_CHECK(post_status(2000) == 413, "worker 0 did not apply the reload (%d)", i);
}

Test(edge_accept, sighup_with_a_stopped_worker_reloads_the_others_and_it_later)
{
    uint64_t end;
    int ok = 0;

    stopped_workers(1, reload_while_stopped);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && !ok) {
        ok = 1;
        for (int i = 0; i < 6 && ok; i++)       /* both workers */
            ok = post_status(2000) == 413;
        if (!ok)
            tgh_sleep_ms(20);
    }
    TGH_CHECK(ok, "worker 1 did not apply the reload after it went on");
    TGH_CHECK(log_has("worker 1 reads its queue again"), "no word of worker 1 catching up");
    TGH_CHECK(post_status(1000) == 200, "a body at the new limit");
}

/* ---- RLIMIT_NOFILE at start ---------------------------------------------- */

/* The soft limit on pid's open files (/proc/PID/limits), or -1. */
static long
soft_nofile(pid_t pid)
{
    char path[64], line[256];
    long v = -1;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/limits", (int)pid);
    f = fopen(path, "r");
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, "Max open files", 14) == 0) {
            v = atol(line + 14);
            break;
        }
    fclose(f);
    return v;
}

/* Started with a low soft limit, tollgate raises it to what
 * max_connections needs (2 x 1000 + 256) and has nothing to warn about. */
Test(edge_accept, nofile_soft_limit_raised_at_start)
{
    struct rlimit rl;

    TGH_CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0, "getrlimit");
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < 2256)
        cr_skip_test("RLIMIT_NOFILE hard limit %lu < 2256", (unsigned long)rl.rlim_max);
    rl.rlim_cur = 512;                   /* tollgate inherits it */
    TGH_CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0, "setrlimit");
    start("max_connections: 1000", 1);
    TGH_CHECK(soft_nofile(tg.proc->pid) == 2256, "soft limit %ld, not 2256",
              soft_nofile(tg.proc->pid));
    TGH_CHECK(!log_has("RLIMIT_NOFILE"), "the log speaks of RLIMIT_NOFILE");
}

/* A hard limit below the connection cap is a real problem: it is warned
 * about, with the number where accept pauses. */
Test(edge_accept, nofile_hard_limit_below_the_cap_is_warned)
{
    struct rlimit rl = { 1000, 1000 };

    TGH_CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0, "setrlimit");
    start("max_connections: 1000", 1);
    TGH_CHECK(log_has("[warn] RLIMIT_NOFILE is 1000: client connections alone run out "
                      "of descriptors at about 744, before http.max_connections (1000)"),
              "no warning");
}
