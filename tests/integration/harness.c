/*
 * harness.c - see harness.h.
 */
#include "harness.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/ssl.h>

#define TGH_MAX_PROCS 64

static tgh_proc *procs[TGH_MAX_PROCS];
static int nprocs;
static char tmpdir[256];

static void fail_reason(tgh_resp *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ------------------------------------------------------------------ */
/* time, environment                                                   */

uint64_t tgh_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void tgh_sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

const char *tgh_env(const char *name)
{
    const char *v = getenv(name);
    if (v != NULL && *v != '\0')
        return v;
    if (strcmp(name, "TG_BINARY") == 0)
        return "build/tollgate";
    if (strcmp(name, "TG_TESTUP") == 0)
        return "build/tests/tg-testup";
    if (strcmp(name, "TG_SOURCE_ROOT") == 0)
        return ".";
    if (strcmp(name, "TG_REDIS_SERVER") == 0)
        return "/usr/bin/redis-server";
    if (strcmp(name, "TG_REDIS_CLI") == 0)
        return "/usr/bin/redis-cli";
    return "";
}

const char *tgh_tmpdir(void)
{
    if (tmpdir[0] == '\0') {
        snprintf(tmpdir, sizeof tmpdir, "/tmp/tgh-%d-XXXXXX", (int)getpid());
        if (mkdtemp(tmpdir) == NULL) {
            perror("harness: mkdtemp");
            snprintf(tmpdir, sizeof tmpdir, "/tmp");
        }
    }
    return tmpdir;
}

static char *vstrf(const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        abort();
    return s;
}

char *tgh_strf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = vstrf(fmt, ap);
    va_end(ap);
    return s;
}

int tgh_sh(char *out, size_t outlen, const char *fmt, ...)
{
    char buf[4096];
    size_t n = 0;
    va_list ap;
    int st;

    va_start(ap, fmt);
    char *cmd = vstrf(fmt, ap);
    va_end(ap);
    FILE *p = popen(cmd, "r");
    free(cmd);
    if (p == NULL)
        return -1;
    for (;;) {                           /* read it all: the command ends */
        size_t got = fread(buf, 1, sizeof buf, p);
        if (got == 0)
            break;
        if (out != NULL && n + 1 < outlen) {
            size_t take = got < outlen - 1 - n ? got : outlen - 1 - n;
            memcpy(out + n, buf, take);
            n += take;
        }
    }
    if (out != NULL && outlen > 0)
        out[n] = '\0';
    st = pclose(p);
    return st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* ------------------------------------------------------------------ */
/* processes                                                           */

tgh_proc *tgh_spawn(const char *name, char *const argv[])
{
    if (nprocs >= TGH_MAX_PROCS)
        return NULL;
    tgh_proc *p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->log_path, sizeof p->log_path, "%s/%s-%d.log", tgh_tmpdir(),
             name, nprocs);
    int logfd = open(p->log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                     0644);
    if (logfd < 0) {
        free(p);
        return NULL;
    }
    pid_t parent = getpid();
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        close(logfd);
        free(p);
        return NULL;
    }
    if (pid == 0) {
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int nul = open("/dev/null", O_RDONLY);
        if (nul >= 0) {
            dup2(nul, 0);
            close(nul);
        }
        dup2(logfd, 1);
        dup2(logfd, 2);
        signal(SIGPIPE, SIG_DFL);
        execv(argv[0], argv);
        dprintf(2, "harness: exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(logfd);
    setpgid(pid, pid); /* both sides: no race with an early signal */
    p->pid = pid;
    procs[nprocs++] = p;
    return p;
}

void tgh_proc_signal(tgh_proc *p, int sig, int group)
{
    if (p == NULL || p->reaped)
        return;
    if (group)
        kill(-p->pid, sig);
    kill(p->pid, sig);
}

long tgh_proc_status_kb(pid_t pid, const char *field)
{
    char path[64], line[256];
    size_t n = strlen(field);
    long kb = -1;
    FILE *f;

    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    f = fopen(path, "r");
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, field, n) == 0 && line[n] == ':') {
            kb = atol(line + n + 1);
            break;
        }
    fclose(f);
    return kb;
}

int tgh_need_nofile(unsigned long n)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0
        || (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < n))
        return -1;
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < n) {
        rl.rlim_cur = n;
        return setrlimit(RLIMIT_NOFILE, &rl);
    }
    return 0;
}

int tgh_proc_alive(tgh_proc *p)
{
    if (p->reaped)
        return 0;
    int st;
    pid_t r = waitpid(p->pid, &st, WNOHANG);
    if (r == p->pid) {
        p->reaped = 1;
        p->status = st;
        return 0;
    }
    return 1;
}

int tgh_proc_wait(tgh_proc *p, int timeout_ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    for (;;) {
        if (!tgh_proc_alive(p))
            return 0;
        if (tgh_now_ms() >= end)
            return -1;
        tgh_sleep_ms(10);
    }
}

int tgh_proc_stop(tgh_proc *p, int timeout_ms)
{
    if (p == NULL)
        return -1;
    if (!p->reaped) {
        tgh_proc_signal(p, SIGTERM, 1);
        if (tgh_proc_wait(p, timeout_ms) != 0) {
            tgh_proc_signal(p, SIGKILL, 1);
            tgh_proc_wait(p, 5000);
            return -1;
        }
    }
    /* leftovers of the group (uvicorn workers) */
    kill(-p->pid, SIGKILL);
    return p->status;
}

int tgh_proc_kill(tgh_proc *p)
{
    if (p == NULL)
        return -1;
    tgh_proc_signal(p, SIGKILL, 1);
    return tgh_proc_wait(p, 5000);
}

void tgh_proc_dump_log(const tgh_proc *p, size_t max_bytes)
{
    if (p == NULL)
        return;
    int fd = open(p->log_path, O_RDONLY);
    if (fd < 0)
        return;
    struct stat st;
    if (fstat(fd, &st) == 0) {
        off_t start = st.st_size > (off_t)max_bytes
                    ? st.st_size - (off_t)max_bytes : 0;
        lseek(fd, start, SEEK_SET);
        fprintf(stderr, "----- %s (pid %d) log tail: %s -----\n", p->name,
                (int)p->pid, p->log_path);
        char b[4096];
        ssize_t n;
        while ((n = read(fd, b, sizeof b)) > 0)
            fwrite(b, 1, (size_t)n, stderr);
        fprintf(stderr, "----- end of %s log -----\n", p->name);
    }
    close(fd);
}

void tgh_dump_all_logs(void)
{
    for (int i = 0; i < nprocs; i++)
        if (procs[i] != NULL)
            tgh_proc_dump_log(procs[i], 6000);
}

void tgh_cleanup(void)
{
    for (int i = 0; i < nprocs; i++) {
        tgh_proc *p = procs[i];
        if (p == NULL)
            continue;
        if (!p->reaped) {
            tgh_proc_signal(p, SIGKILL, 1);
            tgh_proc_wait(p, 5000);
        }
        kill(-p->pid, SIGKILL);
        unlink(p->log_path);
        free(p);
        procs[i] = NULL;
    }
    nprocs = 0;
    if (tmpdir[0] != '\0' && strcmp(tmpdir, "/tmp") != 0) {
        DIR *d = opendir(tmpdir);
        if (d != NULL) {
            struct dirent *e;
            while ((e = readdir(d)) != NULL) {
                if (e->d_name[0] == '.')
                    continue;
                char path[600];
                snprintf(path, sizeof path, "%s/%s", tmpdir, e->d_name);
                unlink(path);
            }
            closedir(d);
        }
        rmdir(tmpdir);
    }
    tmpdir[0] = '\0';
}

/* ------------------------------------------------------------------ */
/* ports                                                               */

int tgh_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = { .sin_family = AF_INET };
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof sa;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0
        && getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
        port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

/* connect() with a deadline; returns the fd or -1 (errno set). */
static int connect_port(int port, int timeout_ms)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = { .sin_family = AF_INET,
                              .sin_port = htons((uint16_t)port) };
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        if (errno != EINPROGRESS) {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        struct pollfd pfd = { .fd = fd, .events = POLLOUT };
        int n = poll(&pfd, 1, timeout_ms);
        int err = 0;
        socklen_t el = sizeof err;
        if (n <= 0) {
            close(fd);
            errno = ETIMEDOUT;
            return -1;
        }
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err != 0) {
            close(fd);
            errno = err;
            return -1;
        }
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

int tgh_port_accepts(int port)
{
    int fd = connect_port(port, 500);
    if (fd < 0)
        return 0;
    close(fd);
    return 1;
}

/* Sockets in the LISTEN state on port on this host (any address, v4 and
 * v6), from /proc/net/tcp{,6}; SO_REUSEPORT makes several. */
int tgh_listening_sockets(int port)
{
    static const char *const files[] = { "/proc/net/tcp", "/proc/net/tcp6" };
    char line[512], want[16];
    int n = 0;

    snprintf(want, sizeof want, ":%04X ", port);
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        FILE *f = fopen(files[i], "r");
        if (f == NULL)
            continue;
        while (fgets(line, sizeof line, f) != NULL) {
            /* "sl local_address rem_address st ...": the local port is
             * after the second ':', then the remote address, then the
             * state, 0A for LISTEN */
            char *loc = strchr(line, ':'), *st;
            if (loc == NULL || (loc = strchr(loc + 1, ':')) == NULL
                || strncmp(loc, want, strlen(want)) != 0)
                continue;
            st = loc + strlen(want);
            st += strcspn(st, " ");
            if (strncmp(st, " 0A ", 4) == 0)
                n++;
        }
        fclose(f);
    }
    return n;
}

/* Unlike a connect, asking /proc leaves no connection behind for the
 * server to accept later.  A probe connection that tollgate has not yet
 * taken from its accept queue is counted by nobody (not in
 * tollgate_connections_open), yet holds a place under
 * http.max_connections{,_per_ip} once accepted: a test that starts from
 * "nothing open" and then fills a cap would race it. */
int tgh_port_listening(int port)
{
    return tgh_listening_sockets(port) > 0;
}

static int wait_for(int (*ready)(int port), int port, int timeout_ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    while (tgh_now_ms() < end) {
        if (ready(port))
            return 0;
        tgh_sleep_ms(20);
    }
    return -1;
}

int tgh_wait_listening(int port, int timeout_ms)
{
    return wait_for(tgh_port_listening, port, timeout_ms);
}

int tgh_wait_port(int port, int timeout_ms)
{
    return wait_for(tgh_port_accepts, port, timeout_ms);
}

/* ------------------------------------------------------------------ */
/* upstreams                                                           */

static int read_file(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    return (int)n;
}

int tgh_testup_start(tgh_upstream *u)
{
    return tgh_testup_start_port(u, 0);
}

int tgh_testup_start_port(tgh_upstream *u, int want)
{
    char port[16];
    snprintf(port, sizeof port, "%d", want);
    memset(u, 0, sizeof *u);
    char *argv[] = { (char *)tgh_env("TG_TESTUP"), "-p", port, NULL };
    u->proc = tgh_spawn("tg-testup", argv);
    if (u->proc == NULL)
        return -1;
    uint64_t end = tgh_now_ms() + 15000;
    char buf[4096];
    while (tgh_now_ms() < end) {
        if (read_file(u->proc->log_path, buf, sizeof buf) > 0) {
            const char *s = strstr(buf, "PORT=");
            if (s != NULL && strchr(s, '\n') != NULL) {
                u->port = atoi(s + 5);
                if (u->port > 0 && tgh_wait_port(u->port, 10000) == 0)
                    return 0;
                break;
            }
        }
        if (!tgh_proc_alive(u->proc))
            break;
        tgh_sleep_ms(10);
    }
    fprintf(stderr, "harness: tg-testup did not start\n");
    tgh_proc_dump_log(u->proc, 4000);
    return -1;
}

/* ------------------------------------------------------------------ */
/* Redis: servers, replicas, Sentinel, Cluster                         */

int tgh_cluster_free_port(void)
{
    for (int i = 0; i < 100; i++) {
        int p = tgh_free_port();
        struct sockaddr_in sa = { .sin_family = AF_INET };
        int fd, ok;

        if (p <= 0 || p + 10000 > 65535)
            continue;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        sa.sin_port = htons((uint16_t)(p + 10000));
        ok = bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
        close(fd);
        if (ok)
            return p;
    }
    fprintf(stderr, "harness: no free port pair for a cluster node\n");
    return -1;
}

/* "-a PASSWORD --no-auth-warning " for redis-cli, or "". */
static void
cli_auth(char *buf, size_t len, const char *password)
{
    if (password != NULL)
        snprintf(buf, len, "-a %s --no-auth-warning ", password);
    else
        buf[0] = '\0';
}

/* The server on port answers PING, and is process pid (INFO's process_id):
 * not another program's server that took the port meanwhile. */
static int
redis_is_ours(int port, pid_t pid, const char *password)
{
    char auth[256], out[4096], want[32];
    const char *at;

    cli_auth(auth, sizeof auth, password);
    if (!tgh_port_accepts(port)
        || tgh_redis_cli(port, out, sizeof out, "%sPING", auth) != 0
        || strcmp(out, "PONG") != 0
        || tgh_redis_cli(port, out, sizeof out, "%sINFO server", auth) != 0)
        return 0;
    snprintf(want, sizeof want, "process_id:%d", (int)pid);
    at = strstr(out, want);
    return at != NULL && !isdigit((unsigned char)at[strlen(want)]);
}

/* Wait until u->proc answers on u->port as itself; 0, or -1 (it died or
 * did not answer within 15 s: stopped, log shown). */
static int
redis_wait_started(tgh_upstream *u, const char *what, const char *password)
{
    uint64_t end = tgh_now_ms() + 15000;

    while (tgh_now_ms() < end && tgh_proc_alive(u->proc)) {
        if (redis_is_ours(u->port, u->proc->pid, password))
            return 0;
        tgh_sleep_ms(20);
    }
    fprintf(stderr, "harness: %s on port %d did not start\n", what, u->port);
    tgh_proc_dump_log(u->proc, 4000);
    tgh_proc_stop(u->proc, 3000);
    return -1;
}

int tgh_redis_start(tgh_upstream *u)
{
    return tgh_redis_start_opts(u, NULL);
}

int tgh_redis_start_opts(tgh_upstream *u, const tgh_redis_opts *o)
{
    static const tgh_redis_opts plain;
    int reuse = u->port > 0;

    if (o == NULL)
        o = &plain;
    for (int attempt = 0; attempt < 3; attempt++) {
        char port[16], rof[16], conf[600], name[32];
        char *argv[64];
        int n = 0;

        if (!reuse)
            u->port = o->cluster ? tgh_cluster_free_port() : tgh_free_port();
        if (u->port <= 0)
            return -1;
        snprintf(port, sizeof port, "%d", u->port);
        snprintf(rof, sizeof rof, "%d", o->replicaof);
        snprintf(conf, sizeof conf, "%s/nodes-%d.conf", tgh_tmpdir(), u->port);
        snprintf(name, sizeof name, "redis-%d", u->port);
        argv[n++] = (char *)tgh_env("TG_REDIS_SERVER");
        argv[n++] = "--port";
        argv[n++] = port;
        argv[n++] = "--bind";
        argv[n++] = "127.0.0.1";
        argv[n++] = "--dir";
        argv[n++] = (char *)tgh_tmpdir();
        argv[n++] = "--save";
        argv[n++] = "";
        argv[n++] = "--appendonly";
        argv[n++] = "no";
        if (o->replicaof > 0) {
            argv[n++] = "--replicaof";
            argv[n++] = "127.0.0.1";
            argv[n++] = rof;
        }
        if (o->cluster) {
            argv[n++] = "--cluster-enabled";
            argv[n++] = "yes";
            argv[n++] = "--cluster-config-file";
            argv[n++] = conf;
        }
        if (o->password != NULL) {
            argv[n++] = "--requirepass";
            argv[n++] = (char *)o->password;
            argv[n++] = "--masterauth";
            argv[n++] = (char *)o->password;
        }
        if (tgh_env("TG_REDIS_MODULE")[0] != '\0') {
            argv[n++] = "--loadmodule";
            argv[n++] = (char *)tgh_env("TG_REDIS_MODULE");
            argv[n++] = "--enable-module-command";   /* MODULE UNLOAD in a test */
            argv[n++] = "yes";
        }
        for (int i = 0; o->args != NULL && o->args[i] != NULL && n < 63; i++)
            argv[n++] = (char *)o->args[i];
        argv[n] = NULL;
        u->proc = tgh_spawn(name, argv);
        if (u->proc == NULL)
            return -1;
        if (redis_wait_started(u, "redis-server", o->password) == 0)
            return 0;
        fprintf(stderr, "harness: redis-server attempt %d failed\n", attempt + 1);
    }
    return -1;
}

int tgh_sentinel_start(tgh_upstream *u, const char *password, const char *fmt, ...)
{
    memset(u, 0, sizeof *u);
    for (int attempt = 0; attempt < 3; attempt++) {
        char path[600], name[32];
        char *argv[] = { (char *)tgh_env("TG_REDIS_SERVER"), path, "--sentinel", NULL };
        FILE *f;
        va_list ap;

        u->port = tgh_free_port();
        snprintf(path, sizeof path, "%s/sentinel-%d.conf", tgh_tmpdir(), u->port);
        snprintf(name, sizeof name, "sentinel-%d", u->port);
        f = fopen(path, "w");
        if (f == NULL)
            return -1;
        fprintf(f, "port %d\nbind 127.0.0.1\ndir %s\nsentinel resolve-hostnames no\n",
                u->port, tgh_tmpdir());
        if (password != NULL)
            fprintf(f, "requirepass %s\n", password);
        va_start(ap, fmt);
        vfprintf(f, fmt, ap);
        va_end(ap);
        if (fclose(f) != 0)
            return -1;
        u->proc = tgh_spawn(name, argv);
        if (u->proc == NULL)
            return -1;
        if (redis_wait_started(u, "sentinel", password) == 0)
            return 0;
    }
    return -1;
}

int tgh_redis_wait(int port, const char *needle, int timeout_ms, const char *fmt, ...)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    char args[1024], out[8192];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    for (;;) {
        if (tgh_redis_cli(port, out, sizeof out, "%s", args) == 0
            && strstr(out, needle) != NULL)
            return 1;
        if (tgh_now_ms() >= end)
            return 0;
        tgh_sleep_ms(20);
    }
}

int tgh_redis_cluster_create(const int *ports, int n, int replicas,
                             const char *password)
{
    char addrs[16][32], nrep[8], auth[256];
    char *cli[32];
    int k = 0;
    tgh_proc *p;

    if (n > 16)
        return -1;
    cli[k++] = (char *)tgh_env("TG_REDIS_CLI");
    cli[k++] = "--cluster";
    cli[k++] = "create";
    for (int i = 0; i < n; i++) {
        snprintf(addrs[i], sizeof addrs[i], "127.0.0.1:%d", ports[i]);
        cli[k++] = addrs[i];
    }
    snprintf(nrep, sizeof nrep, "%d", replicas);
    cli[k++] = "--cluster-replicas";
    cli[k++] = nrep;
    if (password != NULL) {
        cli[k++] = "-a";
        cli[k++] = (char *)password;
        cli[k++] = "--no-auth-warning";
    }
    cli[k++] = "--cluster-yes";
    cli[k] = NULL;
    p = tgh_spawn("cluster-create", cli);
    if (p == NULL)
        return -1;
    if (tgh_proc_wait(p, 60000) != 0) {
        fprintf(stderr, "harness: redis-cli --cluster create hangs\n");
        tgh_proc_dump_log(p, 4000);
        tgh_proc_stop(p, 1000);
        return -1;
    }
    if (!WIFEXITED(p->status) || WEXITSTATUS(p->status) != 0) {
        fprintf(stderr, "harness: redis-cli --cluster create failed\n");
        tgh_proc_dump_log(p, 4000);
        return -1;
    }
    cli_auth(auth, sizeof auth, password);
    for (int i = 0; i < n; i++) {
        if (!tgh_redis_wait(ports[i], "cluster_state:ok", 30000, "%sCLUSTER INFO", auth)) {
            fprintf(stderr, "harness: cluster_state is not ok on port %d\n", ports[i]);
            return -1;
        }
    }
    for (int i = 0; i < n; i++) {       /* replicas synced: able to fail over */
        char out[4096];
        if (tgh_redis_cli(ports[i], out, sizeof out, "%sINFO replication", auth) == 0
            && strstr(out, "role:master") != NULL)
            continue;
        if (!tgh_redis_wait(ports[i], "master_link_status:up", 30000,
                            "%sINFO replication", auth)) {
            fprintf(stderr, "harness: replica %d never synced\n", ports[i]);
            return -1;
        }
    }
    return 0;
}

int tgh_redis_cli(int port, char *out, size_t outlen, const char *fmt, ...)
{
    char args[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    char *cmd = tgh_strf("timeout 10 %s -p %d %s 2>&1", tgh_env("TG_REDIS_CLI"), port, args);
    FILE *p = popen(cmd, "r");
    free(cmd);
    if (p == NULL)
        return -1;
    size_t n = fread(out, 1, outlen - 1, p);
    out[n] = '\0';
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == '\r' || out[n - 1] == ' '))
        out[--n] = '\0';
    return pclose(p) == 0 ? 0 : -1;
}

int tgh_fastapi_start(tgh_upstream *u)
{
    memset(u, 0, sizeof *u);
    for (int attempt = 0; attempt < 3; attempt++) {
        u->port = tgh_free_port();
        char port[16];
        snprintf(port, sizeof port, "%d", u->port);
        char *dir = tgh_strf("%s/loadtest/upstream", tgh_env("TG_SOURCE_ROOT"));
        char *argv[] = { "/usr/bin/python3", "-m", "uvicorn", "app:app",
                         "--app-dir", dir, "--host", "127.0.0.1",
                         "--port", port, "--workers", "2",
                         "--log-level", "warning", NULL };
        u->proc = tgh_spawn("uvicorn", argv);
        free(dir);
        if (u->proc == NULL)
            return -1;
        uint64_t end = tgh_now_ms() + 30000;
        while (tgh_now_ms() < end && tgh_proc_alive(u->proc)) {
            if (tgh_port_accepts(u->port)) {
                tgh_resp r;
                int rc = tgh_http(u->port, "GET", "/health", NULL, NULL, 0,
                                  &r, 5000);
                int st = r.status;
                tgh_resp_free(&r);
                if (rc == 0 && st == 200)
                    return 0;
            }
            tgh_sleep_ms(50);
        }
        fprintf(stderr, "harness: uvicorn did not start (attempt %d)\n",
                attempt + 1);
        tgh_proc_dump_log(u->proc, 4000);
        tgh_proc_stop(u->proc, 3000);
    }
    return -1;
}

static long json_long(const char *s, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = strstr(s, pat);
    if (p == NULL)
        return -1;
    p += strlen(pat);
    while (*p == ' ' || *p == ':')
        p++;
    return strtol(p, NULL, 10);
}

int tgh_testup_stats(int port, tgh_stats *st)
{
    tgh_resp r;
    int rc = tgh_http(port, "GET", "/__stats", NULL, NULL, 0, &r, 5000);
    if (rc == 0 && r.status == 200 && r.body != NULL) {
        st->connections = json_long((const char *)r.body, "connections");
        st->requests = json_long((const char *)r.body, "requests");
        rc = (st->connections < 0 || st->requests < 0) ? -1 : 0;
    } else {
        rc = -1;
    }
    tgh_resp_free(&r);
    return rc;
}

int tgh_testup_reset(int port)
{
    tgh_resp r;
    int rc = tgh_http(port, "GET", "/__reset", NULL, NULL, 0, &r, 5000);
    if (rc == 0 && r.status != 200)
        rc = -1;
    tgh_resp_free(&r);
    return rc;
}

/* ------------------------------------------------------------------ */
/* tollgate                                                            */

void tgh_tg_opts_default(tgh_tg_opts *o, int upstream_port)
{
    memset(o, 0, sizeof *o);
    snprintf(o->upstream_servers, sizeof o->upstream_servers,
             "127.0.0.1:%d", upstream_port);
    o->workers = 2;
    o->drain_timeout_ms = 10000;
    o->log_level = "info";
    o->max_body_bytes = 16777216;
    o->max_header_bytes = 16384;
    o->max_request_line = 8192;
    o->header_timeout_ms = 10000;
    o->body_timeout_ms = 30000;
    o->idle_timeout_ms = 60000;
    o->connect_timeout_ms = 1000;
    o->first_byte_timeout_ms = 2000;
    o->total_timeout_ms = 10000;
    o->keepalive = 32;
}

static int write_config(const char *path, const tgh_tg_opts *o, int port,
                        int admin_port)
{
    char kat[48] = "", ka[16] = "auto";
    if (o->keepalive >= 0)
        snprintf(ka, sizeof ka, "%d", o->keepalive);
    if (o->keepalive_timeout_ms > 0)
        snprintf(kat, sizeof kat, ", keepalive_timeout_ms: %d", o->keepalive_timeout_ms);
    FILE *f = fopen(path, "w");
    if (f == NULL)
        return -1;
    if (o->tls_port > 0)
        fprintf(f, "listen: [ { address: 127.0.0.1:%d }, { address: 127.0.0.1:%d, "
                "tls: { cert: %s, key: %s } } ]\n", port, o->tls_port, o->tls_cert,
                o->tls_key);
    else
        fprintf(f, "listen: [ { address: 127.0.0.1:%d } ]\n", port);
    fprintf(f,
        "admin: { address: 127.0.0.1:%d }\n"
        "workers: %d\n"
        "drain_timeout_ms: %d\n"
        "log_level: %s\n"
        "http: { max_body_bytes: %ld, max_header_bytes: %ld, "
        "max_request_line: %ld, header_timeout_ms: %d, body_timeout_ms: %d, "
        "idle_timeout_ms: %d%s%s }\n"
        "upstream: { servers: [%s], connect_timeout_ms: %d, "
        "first_byte_timeout_ms: %d, total_timeout_ms: %d, keepalive: %s%s }\n"
        "store: %s\n",
        admin_port, o->workers, o->drain_timeout_ms, o->log_level,
        o->max_body_bytes, o->max_header_bytes, o->max_request_line,
        o->header_timeout_ms, o->body_timeout_ms, o->idle_timeout_ms,
        o->http_extra ? ", " : "", o->http_extra ? o->http_extra : "",
        o->upstream_servers, o->connect_timeout_ms, o->first_byte_timeout_ms,
        o->total_timeout_ms, ka, kat, o->store ? o->store : "local");
    if (o->extra_yaml != NULL)
        fputs(o->extra_yaml, f);
    return fclose(f) == 0 ? 0 : -1;
}

int tgh_tollgate_start(tgh_tollgate *t, const tgh_tg_opts *o)
{
    memset(t, 0, sizeof *t);
    static int seq;
    for (int attempt = 0; attempt < 3; attempt++) {
        t->port = tgh_free_port();
        do {
            t->admin_port = tgh_free_port();
        } while (t->admin_port == t->port);
        snprintf(t->conf_path, sizeof t->conf_path, "%s/tollgate-%d.yaml",
                 tgh_tmpdir(), seq++);
        if (write_config(t->conf_path, o, t->port, t->admin_port) != 0)
            return -1;
        char *argv[] = { (char *)tgh_env("TG_BINARY"), "-c", t->conf_path,
                         NULL };
        t->proc = tgh_spawn("tollgate", argv);
        if (t->proc == NULL)
            return -1;
        uint64_t end = tgh_now_ms() + 20000;
        int up = 0;
        while (tgh_now_ms() < end && tgh_proc_alive(t->proc)) {
            if (tgh_port_listening(t->port) && tgh_port_accepts(t->admin_port)) {
                up = 1;
                break;
            }
            tgh_sleep_ms(20);
        }
        if (up)
            return 0;
        fprintf(stderr, "harness: tollgate did not start (attempt %d)\n",
                attempt + 1);
        tgh_proc_dump_log(t->proc, 4000);
        tgh_proc_stop(t->proc, 3000);
    }
    return -1;
}

/* ------------------------------------------------------------------ */
/* raw client: connection                                              */

tgh_conn *tgh_conn_open(int port, int timeout_ms)
{
    int fd = connect_port(port, timeout_ms);
    if (fd < 0)
        return NULL;
    tgh_conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        close(fd);
        return NULL;
    }
    c->fd = fd;
    c->cap = 65536;
    c->buf = malloc(c->cap);
    if (c->buf == NULL) {
        close(fd);
        free(c);
        return NULL;
    }
    return c;
}

void tgh_conn_close(tgh_conn *c)
{
    if (c == NULL)
        return;
    if (c->fd >= 0)
        close(c->fd);
    free(c->buf);
    free(c);
}

/* Read what is available (waiting up to wait_ms).  Returns bytes read,
 * 0 on EOF/reset (c->eof / c->reset set), -1 on timeout. */
static ssize_t conn_fill(tgh_conn *c, int wait_ms)
{
    if (c->eof || c->reset)
        return 0;
    struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
    int n = poll(&pfd, 1, wait_ms < 0 ? 0 : wait_ms);
    if (n <= 0)
        return -1;
    if (c->off > 0 && c->off == c->len) {
        c->off = c->len = 0;
    }
    if (c->cap - c->len < 65536) {
        if (c->off > 0) {
            memmove(c->buf, c->buf + c->off, c->len - c->off);
            c->len -= c->off;
            c->off = 0;
        }
        if (c->cap - c->len < 65536) {
            size_t ncap = c->cap * 2;
            unsigned char *nb = realloc(c->buf, ncap);
            if (nb == NULL)
                abort();
            c->buf = nb;
            c->cap = ncap;
        }
    }
    ssize_t r = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (r > 0) {
        c->len += (size_t)r;
        return r;
    }
    if (r == 0)
        c->eof = 1;
    else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
        return -1;
    else
        c->reset = 1;
    return 0;
}

int tgh_conn_send(tgh_conn *c, const void *buf, size_t len, int timeout_ms)
{
    const unsigned char *p = buf;
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    while (len > 0) {
        ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK
                      || errno == EINTR)) {
            uint64_t now = tgh_now_ms();
            if (now >= end)
                return -1;
            struct pollfd pfd = { .fd = c->fd, .events = POLLOUT };
            poll(&pfd, 1, (int)(end - now));
            continue;
        }
        c->reset = 1;
        return -1;
    }
    return 0;
}

int tgh_conn_sendstr(tgh_conn *c, const char *s)
{
    return tgh_conn_send(c, s, strlen(s), 10000);
}

int tgh_conn_send_slowly(tgh_conn *c, const void *buf, size_t len,
                         size_t piece, int pause_ms)
{
    const unsigned char *p = buf;
    while (len > 0) {
        size_t n = len < piece ? len : piece;
        if (tgh_conn_send(c, p, n, 10000) != 0)
            return -1;
        p += n;
        len -= n;
        if (len > 0)
            tgh_sleep_ms(pause_ms);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* raw client: response parser (incremental, consumes c->buf)          */

enum pstate { P_HEAD, P_CL, P_CHUNK_SIZE, P_CHUNK_DATA, P_CHUNK_CRLF,
              P_TRAILER, P_CLOSE, P_DONE };

typedef struct parser {
    enum pstate st;
    uint64_t remaining;                /* P_CL / P_CHUNK_DATA */
    int flags;
    size_t body_cap;
    int error;
} parser;

static void fail_reason(tgh_resp *r, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->reason, sizeof r->reason, fmt, ap);
    va_end(ap);
}

static void body_append(tgh_resp *r, parser *ps, const unsigned char *p,
                        size_t n)
{
    if (r->body_len + n + 1 > ps->body_cap) {
        size_t ncap = ps->body_cap ? ps->body_cap : 4096;
        while (ncap < r->body_len + n + 1)
            ncap *= 2;
        unsigned char *nb = realloc(r->body, ncap);
        if (nb == NULL)
            abort();
        r->body = nb;
        ps->body_cap = ncap;
    }
    memcpy(r->body + r->body_len, p, n);
    r->body_len += n;
    r->body[r->body_len] = '\0';
    if (n > 0 && r->t_first_body_ms == 0) {
        uint64_t dt = tgh_now_ms() - r->t_start_ms;
        r->t_first_body_ms = dt > 0 ? dt : 1; /* 0 means "none yet" */
    }
}

static void clear_headers(tgh_resp *r)
{
    for (int i = 0; i < r->nhdr; i++) {
        free(r->hdr[i].name);
        free(r->hdr[i].value);
    }
    r->nhdr = 0;
}

static const unsigned char *find_crlf(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++)
        if (p[i] == '\r' && p[i + 1] == '\n')
            return p + i;
    return NULL;
}

static const unsigned char *find_head_end(const unsigned char *p, size_t n)
{
    for (size_t i = 0; i + 3 < n; i++)
        if (p[i] == '\r' && p[i + 1] == '\n' && p[i + 2] == '\r'
            && p[i + 3] == '\n')
            return p + i + 4;
    return NULL;
}

/* Does a comma-separated header list contain token (case-insensitive)? */
static int list_has_token(const char *v, const char *token)
{
    size_t tl = strlen(token);
    const char *p = v;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == ',')
            p++;
        const char *s = p;
        while (*p && *p != ',')
            p++;
        const char *e = p;
        while (e > s && (e[-1] == ' ' || e[-1] == '\t'))
            e--;
        if ((size_t)(e - s) == tl && strncasecmp(s, token, tl) == 0)
            return 1;
    }
    return 0;
}

/* Parse a head of n bytes (ending with CRLFCRLF).  0 / -1. */
static int parse_head(tgh_resp *r, const unsigned char *h, size_t n)
{
    clear_headers(r);
    const unsigned char *end = h + n;
    const unsigned char *eol = find_crlf(h, n);
    char line[512];
    size_t ll = (size_t)(eol - h);
    if (ll >= sizeof line) {
        fail_reason(r, "harness: status line too long");
        return -1;
    }
    memcpy(line, h, ll);
    line[ll] = '\0';
    int major, minor, status, off = 0;
    if (sscanf(line, "HTTP/%d.%d %3d%n", &major, &minor, &status, &off) != 3
        || major != 1 || strncmp(line, "HTTP/1.", 7) != 0
        || (line[off] != ' ' && line[off] != '\0')) {
        fail_reason(r, "harness: bad status line '%.80s'", line);
        return -1;
    }
    r->minor = minor;
    r->status = status;
    snprintf(r->reason, sizeof r->reason, "%s",
             line[off] == ' ' ? line + off + 1 : "");
    const unsigned char *p = eol + 2;
    while (p < end) {
        const unsigned char *e = find_crlf(p, (size_t)(end - p));
        if (e == NULL || e == p)
            break;
        const unsigned char *colon = memchr(p, ':', (size_t)(e - p));
        if (colon == NULL || colon == p) {
            fail_reason(r, "harness: bad header line '%.60s'", (const char *)p);
            return -1;
        }
        for (const unsigned char *q = p; q < colon; q++)
            if (*q <= ' ' || *q >= 0x7f) {
                fail_reason(r, "harness: bad header name");
                return -1;
            }
        const unsigned char *v = colon + 1;
        while (v < e && (*v == ' ' || *v == '\t'))
            v++;
        const unsigned char *ve = e;
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
            ve--;
        if (r->nhdr < TGH_MAX_HDRS) {
            r->hdr[r->nhdr].name = strndup((const char *)p,
                                           (size_t)(colon - p));
            r->hdr[r->nhdr].value = strndup((const char *)v,
                                            (size_t)(ve - v));
            r->nhdr++;
        }
        p = e + 2;
    }
    return 0;
}

/* Decide the body framing of a parsed head (RFC 9112 section 6.3). */
static int start_body(tgh_resp *r, parser *ps)
{
    const char *te = tgh_resp_header(r, "Transfer-Encoding");
    const char *cl = tgh_resp_header(r, "Content-Length");
    r->has_content_length = cl != NULL;
    if ((ps->flags & TGH_HEAD_REQ) || r->status == 204 || r->status == 304
        || (r->status >= 100 && r->status < 200)) {
        ps->st = P_DONE;
        return 0;
    }
    if (te != NULL) {
        if (cl != NULL) {
            fail_reason(r, "harness: response has both TE and CL");
            return -1;
        }
        if (!list_has_token(te, "chunked")) {
            r->close_delimited = 1;
            ps->st = P_CLOSE;
            return 0;
        }
        r->chunked = 1;
        ps->st = P_CHUNK_SIZE;
        return 0;
    }
    if (cl != NULL) {
        if (tgh_resp_header_count(r, "Content-Length") != 1) {
            fail_reason(r, "harness: several Content-Length headers");
            return -1;
        }
        char *e;
        errno = 0;
        unsigned long long v = strtoull(cl, &e, 10);
        if (*cl < '0' || *cl > '9' || *e != '\0' || errno != 0) {
            fail_reason(r, "harness: bad Content-Length '%.40s'", cl);
            return -1;
        }
        ps->remaining = v;
        ps->st = v == 0 ? P_DONE : P_CL;
        return 0;
    }
    r->close_delimited = 1;
    ps->st = P_CLOSE;
    return 0;
}

/* Run the parser over the buffered bytes.  Returns 1 when the response is
 * complete, 0 when more bytes are needed, -1 on a malformed response. */
static int parse_step(tgh_conn *c, tgh_resp *r, parser *ps)
{
    for (;;) {
        unsigned char *p = c->buf + c->off;
        size_t n = c->len - c->off;
        switch (ps->st) {
        case P_HEAD: {
            const unsigned char *he = find_head_end(p, n);
            if (he == NULL) {
                if (n > 1024 * 1024) {
                    fail_reason(r, "harness: response head too large");
                    return -1;
                }
                return 0;
            }
            size_t hl = (size_t)(he - p);
            if (parse_head(r, p, hl) != 0)
                return -1;
            c->off += hl;
            if (r->status >= 100 && r->status < 200 && r->status != 101) {
                if (r->ninterim < 8)
                    r->interim[r->ninterim++] = r->status;
                if (r->status == 100)
                    r->saw_100 = 1;
                if (ps->flags & TGH_STOP_1XX) {
                    r->t_head_ms = tgh_now_ms() - r->t_start_ms;
                    ps->st = P_DONE;
                    return 1;
                }
                continue; /* the final response follows */
            }
            r->t_head_ms = tgh_now_ms() - r->t_start_ms;
            if (start_body(r, ps) != 0)
                return -1;
            continue;
        }
        case P_CL: {
            size_t take = n < ps->remaining ? n : (size_t)ps->remaining;
            body_append(r, ps, p, take);
            c->off += take;
            ps->remaining -= take;
            if (ps->remaining == 0) {
                ps->st = P_DONE;
                continue;
            }
            return 0;
        }
        case P_CHUNK_SIZE: {
            const unsigned char *e = find_crlf(p, n);
            if (e == NULL) {
                if (n > 4096) {
                    fail_reason(r, "harness: chunk size line too long");
                    return -1;
                }
                return 0;
            }
            uint64_t v = 0;
            const unsigned char *q = p;
            int digits = 0;
            while (q < e && isxdigit(*q)) {
                int d = isdigit(*q) ? *q - '0' : (tolower(*q) - 'a' + 10);
                v = v * 16 + (uint64_t)d;
                q++;
                digits++;
            }
            if (digits == 0 || digits > 15 || (q < e && *q != ';')) {
                fail_reason(r, "harness: bad chunk size line");
                return -1;
            }
            c->off += (size_t)(e - p) + 2;
            if (v == 0) {
                ps->st = P_TRAILER;
            } else {
                ps->remaining = v;
                r->nchunks++;
                ps->st = P_CHUNK_DATA;
            }
            continue;
        }
        case P_CHUNK_DATA: {
            if (n == 0)
                return 0;
            size_t take = n < ps->remaining ? n : (size_t)ps->remaining;
            body_append(r, ps, p, take);
            c->off += take;
            ps->remaining -= take;
            if (ps->remaining == 0)
                ps->st = P_CHUNK_CRLF;
            continue;
        }
        case P_CHUNK_CRLF:
            if (n < 2)
                return 0;
            if (p[0] != '\r' || p[1] != '\n') {
                fail_reason(r, "harness: chunk data not followed by CRLF");
                return -1;
            }
            c->off += 2;
            ps->st = P_CHUNK_SIZE;
            continue;
        case P_TRAILER: {
            const unsigned char *e = find_crlf(p, n);
            if (e == NULL)
                return 0;
            c->off += (size_t)(e - p) + 2;
            if (e == p)
                ps->st = P_DONE;
            continue;
        }
        case P_CLOSE:
            body_append(r, ps, p, n);
            c->off += n;
            if (c->eof || c->reset) {
                ps->st = P_DONE;
                continue;
            }
            return 0;
        case P_DONE:
            r->t_done_ms = tgh_now_ms() - r->t_start_ms;
            if (r->body == NULL) {
                r->body = calloc(1, 1);
                if (r->body == NULL)
                    abort();
            }
            return 1;
        }
    }
}

static void resp_init(tgh_resp *r, int flags, parser *ps)
{
    memset(r, 0, sizeof *r);
    memset(ps, 0, sizeof *ps);
    ps->flags = flags;
    ps->st = P_HEAD;
    r->t_start_ms = tgh_now_ms();
}

static int finish_fail(tgh_conn *c, tgh_resp *r, parser *ps, int timed_out)
{
    (void)c;
    if (strncmp(r->reason, "harness:", 8) == 0)
        return -1;
    if (ps->st == P_CLOSE && timed_out)
        fail_reason(r, "harness: timeout: %d response without Content-Length or "
                    "chunked (close-delimited) "
                    "and the connection stayed open; %zu body bytes",
                    r->status, r->body_len);
    else
        fail_reason(r, "harness: %s in state %d (status %d, %zu body bytes)",
                    timed_out ? "timeout" : "connection closed", (int)ps->st,
                    r->status, r->body_len);
    return -1;
}

int tgh_conn_read_response(tgh_conn *c, tgh_resp *r, int flags,
                           int timeout_ms)
{
    parser ps;
    resp_init(r, flags, &ps);
    uint64_t end = r->t_start_ms + (uint64_t)timeout_ms;
    for (;;) {
        int rc = parse_step(c, r, &ps);
        if (rc == 1)
            return 0;
        if (rc < 0)
            return -1;
        if (c->eof || c->reset)
            return finish_fail(c, r, &ps, 0);
        uint64_t now = tgh_now_ms();
        if (now >= end)
            return finish_fail(c, r, &ps, 1);
        conn_fill(c, (int)(end - now));
    }
}

int tgh_conn_roundtrip(tgh_conn *c, const void *req, size_t len,
                       tgh_resp *r, int flags, int timeout_ms)
{
    parser ps;
    resp_init(r, flags, &ps);
    uint64_t end = r->t_start_ms + (uint64_t)timeout_ms;
    const unsigned char *p = req;
    int fl = fcntl(c->fd, F_GETFL);
    fcntl(c->fd, F_SETFL, fl | O_NONBLOCK);
    int rc = -1;
    for (;;) {
        int st = parse_step(c, r, &ps);
        if (st == 1) {
            rc = 0;
            break;
        }
        if (st < 0)
            break;
        if (c->eof || c->reset) {
            finish_fail(c, r, &ps, 0);
            break;
        }
        uint64_t now = tgh_now_ms();
        if (now >= end) {
            finish_fail(c, r, &ps, 1);
            break;
        }
        struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
        if (len > 0)
            pfd.events |= POLLOUT;
        if (poll(&pfd, 1, (int)(end - now)) <= 0)
            continue;
        if ((pfd.revents & POLLOUT) && len > 0) {
            ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
            if (n > 0) {
                p += n;
                len -= (size_t)n;
            } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
                /* the server may have answered and closed: keep reading */
                len = 0;
            }
        }
        if (pfd.revents & (POLLIN | POLLHUP | POLLERR))
            conn_fill(c, 0);
    }
    fcntl(c->fd, F_SETFL, fl);
    return rc;
}

int tgh_conn_wait_closed(tgh_conn *c, int timeout_ms, size_t *extra)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    size_t got = c->len - c->off;
    c->off = c->len;
    int closed = 0;
    for (;;) {
        if (c->eof || c->reset) {
            closed = 1;
            break;
        }
        uint64_t now = tgh_now_ms();
        if (now >= end)
            break;
        ssize_t n = conn_fill(c, (int)(end - now));
        if (n > 0) {
            got += (size_t)n;
            c->off = c->len;
        }
    }
    if (extra != NULL)
        *extra = got;
    return closed;
}

unsigned char *tgh_conn_read_all(tgh_conn *c, int timeout_ms, size_t *len,
                                 int *closed)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    while (!c->eof && !c->reset) {
        uint64_t now = tgh_now_ms();
        if (now >= end)
            break;
        conn_fill(c, (int)(end - now));
    }
    size_t n = c->len - c->off;
    unsigned char *out = malloc(n + 1);
    if (out == NULL)
        abort();
    memcpy(out, c->buf + c->off, n);
    out[n] = '\0';
    c->off = c->len;
    if (len != NULL)
        *len = n;
    if (closed != NULL)
        *closed = c->eof || c->reset;
    return out;
}

void tgh_resp_free(tgh_resp *r)
{
    clear_headers(r);
    free(r->body);
    r->body = NULL;
    r->body_len = 0;
}

const char *tgh_resp_header(const tgh_resp *r, const char *name)
{
    for (int i = 0; i < r->nhdr; i++)
        if (strcasecmp(r->hdr[i].name, name) == 0)
            return r->hdr[i].value;
    return NULL;
}

int tgh_resp_header_count(const tgh_resp *r, const char *name)
{
    int n = 0;
    for (int i = 0; i < r->nhdr; i++)
        if (strcasecmp(r->hdr[i].name, name) == 0)
            n++;
    return n;
}

int tgh_http(int port, const char *method, const char *path,
             const char *extra_headers, const void *body, size_t body_len,
             tgh_resp *r, int timeout_ms)
{
    memset(r, 0, sizeof *r);
    tgh_conn *c = tgh_conn_open(port, timeout_ms);
    if (c == NULL) {
        fail_reason(r, "harness: connect to %d failed: %s", port,
                    strerror(errno));
        return -1;
    }
    char *head;
    if (body != NULL)
        head = tgh_strf("%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                        "Connection: close\r\n%sContent-Length: %zu\r\n\r\n",
                        method, path, port,
                        extra_headers ? extra_headers : "", body_len);
    else
        head = tgh_strf("%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                        "Connection: close\r\n%s\r\n",
                        method, path, port,
                        extra_headers ? extra_headers : "");
    size_t hl = strlen(head);
    size_t total = hl + (body ? body_len : 0);
    unsigned char *req = malloc(total ? total : 1);
    if (req == NULL)
        abort();
    memcpy(req, head, hl);
    if (body != NULL && body_len > 0)
        memcpy(req + hl, body, body_len);
    free(head);
    int flags = strcmp(method, "HEAD") == 0 ? TGH_HEAD_REQ : 0;
    int rc = tgh_conn_roundtrip(c, req, total, r, flags, timeout_ms);
    free(req);
    tgh_conn_close(c);
    return rc;
}

/* ------------------------------------------------------------------ */
/* data helpers                                                        */

void tgh_fill_testup_pattern(unsigned char *buf, size_t n)
{
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)((i * 31 + 7) & 0xff);
}

void tgh_fill_random(unsigned char *buf, size_t n, uint32_t seed)
{
    uint32_t x = seed ? seed : 0x9e3779b9u;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (unsigned char)(x >> 24);
    }
}

unsigned char *tgh_chunk_encode(const unsigned char *body, size_t n,
                                size_t *out_len, uint32_t seed)
{
    size_t cap = n + n / 8 + 256;
    unsigned char *out = malloc(cap);
    if (out == NULL)
        abort();
    size_t o = 0;
    uint32_t x = seed ? seed : 12345u;
    size_t i = 0;
    while (i < n) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        size_t sz = 1 + x % 40000;
        if (sz > n - i)
            sz = n - i;
        if (o + sz + 64 > cap) {
            cap = (o + sz + 64) * 2;
            out = realloc(out, cap);
            if (out == NULL)
                abort();
        }
        /* vary hex case to exercise the parser */
        o += (size_t)sprintf((char *)out + o, (x & 1) ? "%zx\r\n" : "%zX\r\n",
                             sz);
        memcpy(out + o, body + i, sz);
        o += sz;
        out[o++] = '\r';
        out[o++] = '\n';
        i += sz;
    }
    if (o + 8 > cap) {
        out = realloc(out, o + 8);
        if (out == NULL)
            abort();
    }
    memcpy(out + o, "0\r\n\r\n", 5);
    o += 5;
    *out_len = o;
    return out;
}

long tgh_first_diff(const unsigned char *a, const unsigned char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i])
            return (long)i;
    return -1;
}

int tgh_is_lower_hex(const char *s, size_t n)
{
    if (s == NULL || strlen(s) != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

/* ------------------------------------------------------------------ */
/* TLS clients                                                         */

int tgh_tls_selfsigned(const char *newkey, const char *cn, const char *cert,
                       const char *key)
{
    char *cmd = tgh_strf("cd %s && openssl req -x509 -newkey %s -nodes -subj /CN=%s "
                         "-keyout %s -out %s -days 2 >/dev/null 2>&1",
                         tgh_tmpdir(), newkey, cn, key, cert);
    int rc = system(cmd);

    free(cmd);
    return rc == 0 ? 0 : -1;
}

int tgh_tls_tollgate_start(tgh_upstream *up, tgh_tollgate *tg, const char *newkey,
                           int workers, const char *http_extra)
{
    static char cert[512], key[512];
    tgh_tg_opts o;
    int port;

    if (tgh_tls_selfsigned(newkey, "localhost", "cert.pem", "key.pem") != 0
        || tgh_testup_start(up) != 0)
        return -1;
    port = tgh_free_port();
    tgh_tg_opts_default(&o, up->port);
    if (workers > 0)
        o.workers = workers;
    o.tls_port = port;
    snprintf(cert, sizeof cert, "%s/cert.pem", tgh_tmpdir());
    snprintf(key, sizeof key, "%s/key.pem", tgh_tmpdir());
    o.tls_cert = cert;
    o.tls_key = key;
    o.http_extra = http_extra;
    if (tgh_tollgate_start(tg, &o) != 0 || tgh_wait_listening(port, 10000) != 0)
        return -1;
    return port;
}

int tgh_tcp_connect(int port, int timeout_ms)
{
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    struct timeval tv = { timeout_ms / 1000, (timeout_ms % 1000) * 1000 };
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

SSL *tgh_tls_connect(SSL_CTX *ctx, int port, int timeout_ms, SSL_SESSION *sess,
                     const char **why)
{
    int fd = tgh_tcp_connect(port, timeout_ms);
    SSL *ssl;

    if (fd < 0) {
        if (why != NULL)
            *why = "connect refused";
        return NULL;
    }
    ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (sess != NULL)
        SSL_set_session(ssl, sess);
    if (SSL_connect(ssl) != 1) {
        if (why != NULL)
            *why = "handshake failed";
        SSL_free(ssl);
        close(fd);
        return NULL;
    }
    return ssl;
}

void tgh_tls_close(SSL *ssl)
{
    int fd = SSL_get_fd(ssl);

    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
}

int tgh_tls_get_ok(SSL *ssl)
{
    static const char req[] = "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    char buf[4096];
    size_t len = 0;
    const char *end, *cl;
    long body;

    if (SSL_write(ssl, req, sizeof req - 1) != (int)(sizeof req - 1))
        return 0;
    for (;;) {
        int n;
        buf[len] = '\0';
        end = strstr(buf, "\r\n\r\n");
        if (end != NULL) {
            cl = strstr(buf, "Content-Length: ");
            body = cl != NULL && cl < end ? atol(cl + 16) : -1;
            if (body >= 0 && len >= (size_t)(end + 4 - buf) + (size_t)body)
                break;
        }
        if (len + 1 >= sizeof buf)
            return 0;
        n = SSL_read(ssl, buf + len, (int)(sizeof buf - 1 - len));
        if (n <= 0)
            return 0;
        len += (size_t)n;
    }
    return strncmp(buf, "HTTP/1.1 200 ", 13) == 0 && strcmp(end + 4, "ok\n") == 0;
}
