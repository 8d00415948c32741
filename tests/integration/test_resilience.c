/*
 * test_resilience.c - Redis trouble must never become hung clients or 5xx
 * from the proxy (unless the policy is deny): Redis killed, frozen
 * (SIGSTOP), restarted; policies local, allow and deny.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/sha.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

TestSuite(resilience, .fini = tgh_cleanup, .timeout = 180);

#define TIMEOUT_MS 50          /* redis.timeout_ms in these tests */
#define MARGIN_MS  400         /* scheduling slack (ASan builds, 2 shared cores) */

static tgh_upstream up, rds;
static tgh_tollgate tg;

static const char *
keys_file(void)
{
    static char path[512];
    static const char *const names[] = { "r-a", "r-b", "r-c", "r-d" };
    FILE *f;
    size_t i, j;

    snprintf(path, sizeof path, "%s/rkeys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("keys:\n", f);
    for (i = 0; i < 4; i++) {
        unsigned char d[32];
        SHA256((const unsigned char *)names[i], strlen(names[i]), d);
        fprintf(f, "  - { id: %s, tier: basic, sha256: \"", names[i]);
        for (j = 0; j < 32; j++)
            fprintf(f, "%02x", d[j]);
        fputs("\" }\n", f);
    }
    fclose(f);
    return path;
}

static void
wait_ready(void)
{
    uint64_t end = tgh_now_ms() + 15000;
    while (tgh_now_ms() < end) {
        tgh_resp r;
        if (tgh_http(tg.admin_port, "GET", "/status", NULL, NULL, 0, &r, 5000) == 0) {
            int ok = r.body && strstr((char *)r.body, "\"mode\":\"redis\"") != NULL;
            tgh_resp_free(&r);
            if (ok)
                return;
        }
        tgh_sleep_ms(20);
    }
    TGH_CHECK(0, "tollgate never reported store mode redis");
}

static void
start_tmo(const char *policy, int timeout_ms)
{
    static char extra[1024];
    tgh_tg_opts o;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    /* basic refills a token a minute here: counts stay exact */
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 1, burst_limit: 20 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: %d, on_failure: %s }\n",
             keys_file(), rds.port, timeout_ms, policy);
    tgh_tg_opts_default(&o, up.port);
    o.store = "redis";
    o.extra_yaml = extra;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
    wait_ready();
}

static void
start(const char *policy)
{
    start_tmo(policy, TIMEOUT_MS);
}

/* One request; returns its status and how long it took. */
static int
timed(const char *key, long *ms, tgh_resp *keep)
{
    tgh_resp r;
    char *hdr = tgh_strf("X-API-Key: %s\r\n", key);
    uint64_t t0 = tgh_now_ms();
    int rc = tgh_http(tg.port, "GET", "/", hdr, NULL, 0, &r, 10000);
    int st = rc == 0 ? r.status : -1;

    *ms = (long)(tgh_now_ms() - t0);
    free(hdr);
    if (keep != NULL && rc == 0)
        *keep = r;
    else if (rc == 0)
        tgh_resp_free(&r);
    return st;
}

/* n requests for key: all answered in time, no 5xx; returns the 200s. */
static int
run(const char *key, int n, long limit_ms)
{
    int i, ok = 0;

    for (i = 0; i < n; i++) {
        long ms;
        int st = timed(key, &ms, NULL);
        TGH_CHECK(st == 200 || st == 429, "request %d: status %d", i, st);
        TGH_CHECK(ms <= limit_ms, "request %d took %ld ms (limit %ld)", i, ms, limit_ms);
        ok += st == 200;
    }
    return ok;
}

static void
await_mode(const char *mode, int timeout_ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    char want[64];

    snprintf(want, sizeof want, "\"mode\":\"%s\"", mode);
    while (tgh_now_ms() < end) {
        tgh_resp r;
        long ms;
        /* traffic lets the breaker probe */
        timed("r-d", &ms, NULL);
        if (tgh_http(tg.admin_port, "GET", "/status", NULL, NULL, 0, &r, 5000) == 0) {
            int ok = r.body && strstr((char *)r.body, want) != NULL;
            tgh_resp_free(&r);
            if (ok)
                return;
        }
        tgh_sleep_ms(50);
    }
    TGH_CHECK(0, "store mode never became %s", mode);
}

Test(resilience, redis_killed_then_restarted_local_policy)
{
    int ok;

    start("local");
    TGH_CHECK(run("r-a", 5, 2000) == 5, "before the kill");

    tgh_proc_signal(rds.proc, SIGKILL, 0);
    tgh_proc_wait(rds.proc, 5000);
    /* every request answered within the deadline + margin, none 5xx, and
     * the local buckets hold the limit exactly: r-b is new to them */
    ok = run("r-b", 40, TIMEOUT_MS + MARGIN_MS);
    TGH_CHECK(ok == 20, "local fallback allowed %d of 40, expected 20", ok);
    await_mode("local", 5000);

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server restart on port %d", rds.port);
    await_mode("redis", 15000);
    ok = run("r-c", 40, 2000);
    TGH_CHECK(ok == 20, "back on Redis: %d of 40 allowed, expected 20", ok);
}

Test(resilience, redis_frozen_answers_within_deadline)
{
    int ok;

    start("local");
    TGH_CHECK(run("r-a", 3, 2000) == 3, "before SIGSTOP");
    tgh_proc_signal(rds.proc, SIGSTOP, 0);
    ok = run("r-b", 30, TIMEOUT_MS + MARGIN_MS);
    TGH_CHECK(ok == 20, "frozen Redis: %d of 30 allowed from local buckets", ok);
    await_mode("local", 5000);           /* the breaker opened */
    tgh_proc_signal(rds.proc, SIGCONT, 0);
    await_mode("redis", 15000);
    TGH_CHECK(run("r-c", 3, 2000) == 3, "after SIGCONT");
}

/* CPU time (utime + stime) of process pid so far, in ms; -1 if unknown. */
static long
proc_cpu_ms(pid_t pid)
{
    char path[64], buf[1024];
    unsigned long ut, st;
    const char *p;
    size_t n;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    if ((f = fopen(path, "r")) == NULL)
        return -1;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    if ((p = strrchr(buf, ')')) == NULL
        || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu",
                  &ut, &st) != 2)
        return -1;
    return (long)((ut + st) * 1000 / (unsigned long)sysconf(_SC_CLK_TCK));
}

/*
 * Redis frozen (SIGSTOP) under 160 concurrent requests with a deadline
 * (redis.timeout_ms 3 s) longer than the freeze: while they wait tollgate
 * sleeps (its CPU stays near 0: no busy loop on the Redis connection), no
 * answer comes early; after SIGCONT each request gets exactly one answer,
 * and each key exactly its 20 tokens (the charges neither lost nor
 * doubled).
 */
Test(resilience, redis_frozen_under_load_one_answer_each)
{
    enum { NK = 4, PER = 40, N = NK * PER, TMO = 3000 };
    static const char *const names[NK] = { "r-a", "r-b", "r-c", "r-d" };
    static tgh_conn *c[N];
    int ok[NK] = { 0 }, denied[NK] = { 0 };
    long cpu0, cpu;
    uint64_t t0, wall;

    start_tmo("local", TMO);
    TGH_CHECK(run("r-d", 1, 2000) == 1, "before SIGSTOP");
    for (int i = 0; i < N; i++) {
        c[i] = tgh_conn_open(tg.port, 2000);
        TGH_CHECK(c[i] != NULL, "connection %d", i);
    }
    tgh_proc_signal(rds.proc, SIGSTOP, 0);
    for (int i = 0; i < N; i++) {
        char *req = tgh_strf("GET /%d HTTP/1.1\r\nHost: t\r\nX-API-Key: %s\r\n\r\n", i,
                             names[i % NK]);
        TGH_CHECK(tgh_conn_sendstr(c[i], req) == 0, "request %d not sent", i);
        free(req);
    }
    /* a measurement window, not a wait: tollgate's CPU while they wait */
    t0 = tgh_now_ms();
    cpu0 = proc_cpu_ms(tg.proc->pid);
    tgh_sleep_ms(600);
    cpu = proc_cpu_ms(tg.proc->pid) - cpu0;
    wall = tgh_now_ms() - t0;
    cr_log_info("tollgate CPU while Redis is frozen: %ld ms in %llu ms", cpu,
                (unsigned long long)wall);
    TGH_CHECK(cpu0 >= 0 && cpu <= (long)wall / 10, "busy while Redis is frozen: %ld ms "
              "CPU in %llu ms", cpu, (unsigned long long)wall);
    for (int i = 0; i < N; i++) {
        struct pollfd pfd = { c[i]->fd, POLLIN, 0 };
        TGH_CHECK(poll(&pfd, 1, 0) == 0, "request %d answered while Redis is frozen", i);
    }
    tgh_proc_signal(rds.proc, SIGCONT, 0);
    for (int i = 0; i < N; i++) {
        tgh_resp r;
        size_t extra = 0;

        TGH_CHECK(tgh_conn_read_response(c[i], &r, 0, 10000) == 0, "request %d: no answer",
                  i);
        TGH_CHECK(r.status == 200 || r.status == 429, "request %d: status %d", i, r.status);
        ok[i % NK] += r.status == 200;
        denied[i % NK] += r.status == 429;
        tgh_resp_free(&r);
        tgh_conn_wait_closed(c[i], i == 0 ? 200 : 0, &extra);
        TGH_CHECK(extra == 0, "request %d: %zu more bytes after its answer", i, extra);
    }
    TGH_CHECK(tgh_now_ms() - t0 < TMO, "answered after the deadline");
    for (int k = 0; k < NK; k++) {
        int want = k == 3 ? 19 : 20;         /* r-d was charged once before */
        TGH_CHECK(ok[k] == want && denied[k] == PER - want, "%s: %d allowed, %d denied "
                  "(expected %d, %d)", names[k], ok[k], denied[k], want, PER - want);
    }
    for (int i = 0; i < N; i++)
        tgh_conn_close(c[i]);
}

Test(resilience, deny_policy_answers_503_with_retry_after)
{
    tgh_resp r;
    long ms;
    int st;

    start("deny");
    tgh_proc_signal(rds.proc, SIGKILL, 0);
    tgh_proc_wait(rds.proc, 5000);
    st = timed("r-a", &ms, &r);
    TGH_CHECK(st == 503, "deny policy: status %d", st);
    TGH_CHECK(tgh_resp_header(&r, "Retry-After") != NULL, "503 without Retry-After");
    TGH_CHECK(ms <= TIMEOUT_MS + MARGIN_MS, "took %ld ms", ms);
    tgh_resp_free(&r);
}

Test(resilience, allow_policy_lets_everything_through)
{
    int i;

    start("allow");
    tgh_proc_signal(rds.proc, SIGKILL, 0);
    tgh_proc_wait(rds.proc, 5000);
    for (i = 0; i < 30; i++) {
        long ms;
        TGH_CHECK(timed("r-a", &ms, NULL) == 200, "allow policy: request %d refused", i);
    }
}

/* ------------------------------------------------------------------ */
/* AUTH: requirepass, an ACL user, a wrong password                    */

/* Redis with a password for the default user and an ACL user "tg" (only
 * our keys and commands); tollgate with `auth` (YAML for redis:), policy
 * deny so that exact counts prove Redis did the charging. */
static void
start_auth(const char *auth)
{
    static char extra[1024];
    char out[256];
    tgh_tg_opts o;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "ACL SETUSER tg on '>tg-pass' "
                            "'~tg:*' '+@all'") == 0 && strcmp(out, "OK") == 0,
              "ACL SETUSER: %s", out);
    TGH_CHECK(tgh_redis_cli(rds.port, out, sizeof out, "CONFIG SET requirepass "
                            "s3cret-default") == 0 && strcmp(out, "OK") == 0,
              "requirepass: %s", out);
    snprintf(extra, sizeof extra,
             "rate_limits:\n  basic: { requests_per_minute: 1, burst_limit: 20 }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: %d, on_failure: deny, "
             "%s }\n", keys_file(), rds.port, TIMEOUT_MS, auth);
    tgh_tg_opts_default(&o, up.port);
    o.store = "redis";
    o.extra_yaml = extra;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
}

static int
count_200(const char *key, int n)
{
    int i, ok = 0;

    for (i = 0; i < n; i++) {
        long ms;
        int st = timed(key, &ms, NULL);
        TGH_CHECK(st == 200 || st == 429, "request %d: status %d", i, st);
        ok += st == 200;
    }
    return ok;
}

Test(resilience, redis_requirepass)
{
    start_auth("password: s3cret-default");
    wait_ready();
    TGH_CHECK(count_200("r-a", 30) == 20, "requirepass: exact burst on Redis");
}

Test(resilience, redis_acl_user_with_password_file)
{
    char *file = tgh_strf("%s/redis-pass", tgh_tmpdir()), *yaml;
    FILE *f = fopen(file, "w");

    cr_assert_not_null(f);
    fputs("tg-pass\n", f);
    fclose(f);
    yaml = tgh_strf("username: tg, password_file: %s", file);
    start_auth(yaml);
    wait_ready();
    TGH_CHECK(count_200("r-b", 30) == 20, "ACL user: exact burst on Redis");
    free(yaml);
    free(file);
}

/* A wrong password: a clear error in the log at start and in /status,
 * neither showing the password; requests get the on_failure answer. */
Test(resilience, redis_wrong_password_is_a_clear_error)
{
    uint64_t end;
    char log[65536];
    int found = 0;
    FILE *f;
    size_t n;

    start_auth("username: tg, password: not-the-pass");
    end = tgh_now_ms() + 10000;
    while (!found && tgh_now_ms() < end) {
        tgh_resp r;
        long ms;
        timed("r-c", &ms, NULL);
        if (tgh_http(tg.admin_port, "GET", "/status", NULL, NULL, 0, &r, 5000) == 0) {
            const char *b = (const char *)r.body;
            found = b != NULL && strstr(b, "\"error\":\"AUTH to server 127.0.0.1:") != NULL
                    && strstr(b, "as user \\\"tg\\\" refused: WRONGPASS") != NULL;
            TGH_CHECK(b == NULL || strstr(b, "not-the-pass") == NULL,
                      "/status shows the password");
            if (found)
                cr_log_info("/status: %s", b);
            tgh_resp_free(&r);
        }
        if (!found)
            tgh_sleep_ms(50);
    }
    TGH_CHECK(found, "/status never named the AUTH failure");
    f = fopen(tg.proc->log_path, "r");
    cr_assert_not_null(f);
    n = fread(log, 1, sizeof log - 1, f);
    log[n] = '\0';
    fclose(f);
    TGH_CHECK(strstr(log, "[error] redis: AUTH to server 127.0.0.1:") != NULL
              && strstr(log, "(check redis.password)") != NULL,
              "no clear AUTH error in the log");
    TGH_CHECK(strstr(log, "not-the-pass") == NULL, "the log shows the password");
}

/* ------------------------------------------------------------------ */
/* a broken Redis: huge replies, garbage, silence                      */

enum fake_mode { FAKE_HUGE_ARRAY, FAKE_HUGE_BULK, FAKE_GARBAGE, FAKE_SILENT };

/* A server on 127.0.0.1:port answering every read with the mode's reply
 * (a process per connection); killed with the test. */
static pid_t
fake_redis_start(int port, enum fake_mode mode)
{
    struct sockaddr_in sa = { .sin_family = AF_INET };
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    pid_t pid;

    cr_assert(lfd >= 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = htons((uint16_t)port);
    cr_assert(bind(lfd, (struct sockaddr *)&sa, sizeof sa) == 0, "bind %d", port);
    cr_assert(listen(lfd, 64) == 0);
    pid = fork();
    cr_assert(pid >= 0);
    if (pid != 0) {
        close(lfd);
        return pid;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            continue;
        if (fork() == 0) {
            static char buf[1 << 16], fill[1 << 16];
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            memset(fill, 'x', sizeof fill);
            while (read(fd, buf, sizeof buf) > 0) {
                const char *a = mode == FAKE_HUGE_ARRAY ? "*2000000000\r\n"
                                : mode == FAKE_HUGE_BULK ? "$1000000000\r\n"
                                : mode == FAKE_GARBAGE ? "garbage\r\n" : NULL;
                if (a == NULL)
                    continue;                   /* silent */
                if (write(fd, a, strlen(a)) < 0)
                    break;
                while (mode == FAKE_HUGE_BULK && write(fd, fill, sizeof fill) > 0) {
                }
            }
            _exit(0);
        }
        close(fd);
        while (waitpid(-1, NULL, WNOHANG) > 0) {
        }
    }
}

/* ASan (the build-asan tollgate) keeps freed memory in quarantine,
 * 256 MB by default: its bound is that much looser. */
#ifdef __SANITIZE_ADDRESS__
#define RSS_BOUND_KIB ((256 + 64) * 1024)
#else
#define RSS_BOUND_KIB (64 * 1024)
#endif

static long
tollgate_rss_kib(void)
{
    char path[64], line[256];
    long kib = -1;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/status", (int)tg.proc->pid);
    f = fopen(path, "r");
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, "VmRSS:", 6) == 0)
            kib = strtol(line + 6, NULL, 10);
    fclose(f);
    return kib;
}

/*
 * tollgate's Redis answers nonsense (or nothing) for 2 s: every request is
 * answered within the deadline + margin, none is a 5xx (policy local),
 * tollgate's memory stays bounded; then a real Redis takes the port and
 * tollgate is back on it.
 */
static void
broken_redis(enum fake_mode mode)
{
    pid_t fake;
    long rss0, worst = 0;
    uint64_t end;
    int n = 0, st;

    start("local");
    rss0 = tollgate_rss_kib();
    tgh_proc_signal(rds.proc, SIGKILL, 0);
    tgh_proc_wait(rds.proc, 5000);
    fake = fake_redis_start(rds.port, mode);
    end = tgh_now_ms() + 2000;
    while (tgh_now_ms() < end) {
        long ms;
        st = timed("r-b", &ms, NULL);
        TGH_CHECK(st == 200 || st == 429, "request %d: status %d", n, st);
        TGH_CHECK(ms <= TIMEOUT_MS + MARGIN_MS, "request %d took %ld ms", n, ms);
        if (tollgate_rss_kib() - rss0 > worst)
            worst = tollgate_rss_kib() - rss0;
        n++;
        tgh_sleep_ms(2);                /* paced: the point is memory, not rate */
    }
    cr_log_info("broken Redis (mode %d): %d requests in 2 s, tollgate RSS grew %ld KiB",
                (int)mode, n, worst);
    TGH_CHECK(worst < RSS_BOUND_KIB, "tollgate's RSS grew by %ld KiB", worst);
    kill(fake, SIGKILL);
    waitpid(fake, NULL, 0);
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server back on port %d", rds.port);
    await_mode("redis", 15000);
    TGH_CHECK(run("r-c", 3, 2000) == 3, "back on the real Redis");
}

Test(resilience, redis_answers_a_huge_array_header)
{
    broken_redis(FAKE_HUGE_ARRAY);
}

Test(resilience, redis_answers_an_endless_bulk)
{
    broken_redis(FAKE_HUGE_BULK);
}

Test(resilience, redis_answers_garbage)
{
    broken_redis(FAKE_GARBAGE);
}

Test(resilience, redis_answers_nothing)
{
    broken_redis(FAKE_SILENT);
}
