/*
 * harness.h - integration test harness: processes, ports and a raw HTTP
 * client.
 *
 * The harness starts the real programs (tollgate, tg-testup, the FastAPI
 * sample app under uvicorn) on ephemeral loopback ports and talks to them
 * over real sockets.  It uses only POSIX, pthreads and (for TLS clients)
 * OpenSSL: no libevent, so a bug shared by the proxy and its tests cannot
 * hide itself.
 *
 * Every wait is bounded; nothing sleeps for a fixed time to "let things
 * settle" - we poll for the condition we need (a port answering, a line in
 * a log) with a generous deadline.
 *
 * Environment: TG_BINARY (tollgate), TG_TESTUP (tg-testup),
 * TG_SOURCE_ROOT (repository root), TG_REDIS_SERVER and TG_REDIS_CLI
 * (default /usr/bin/redis-server, /usr/bin/redis-cli).
 *
 * Spawned processes must be started from the test's main thread:
 * PR_SET_PDEATHSIG fires when the spawning *thread* exits.
 */
#ifndef TOLLGATE_TESTS_HARNESS_H
#define TOLLGATE_TESTS_HARNESS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* ------------------------------------------------------------------ */
/* time, environment                                                   */

uint64_t tgh_now_ms(void);             /* monotonic clock, milliseconds */
void tgh_sleep_ms(int ms);
const char *tgh_env(const char *name); /* getenv, or a sane default */
const char *tgh_tmpdir(void);          /* per-process temp dir, created once */

/* ------------------------------------------------------------------ */
/* processes                                                           */

typedef struct tgh_proc {
    pid_t pid;
    char  name[32];
    char  log_path[512];               /* stdout+stderr of the process */
    int   reaped;                      /* waitpid() has collected it */
    int   status;                      /* wait status once reaped */
} tgh_proc;

/* Fork/exec argv[0] with argv, stdout and stderr to a fresh log file in
 * tgh_tmpdir().  The child gets its own process group and SIGKILL on
 * parent death.  Returns a registered process (owned by the harness; it is
 * freed by tgh_cleanup()) or NULL. */
tgh_proc *tgh_spawn(const char *name, char *const argv[]);

/* Send sig to the process (group = 1: to its whole process group). */
void tgh_proc_signal(tgh_proc *p, int sig, int group);

/* Wait up to timeout_ms for it to exit.  Returns 0 and fills p->status
 * when it exited, -1 on timeout. */
int tgh_proc_wait(tgh_proc *p, int timeout_ms);

/* Non-blocking: 1 if still running, 0 if it has exited (and is reaped). */
int tgh_proc_alive(tgh_proc *p);

/* A "Vm...:" line of /proc/PID/status (field "VmRSS", "VmData"...), in kB,
 * or -1. */
long tgh_proc_status_kb(pid_t pid, const char *field);

/* Raise this process's soft RLIMIT_NOFILE (what it starts inherits it) to
 * at least n.  0, or -1 when the hard limit is below n (the caller skips)
 * or setrlimit fails. */
int tgh_need_nofile(unsigned long n);

/* SIGTERM (whole group), wait up to timeout_ms, then SIGKILL.  Returns the
 * wait status (see WIFEXITED...) or -1 if it had to be killed. */
int tgh_proc_stop(tgh_proc *p, int timeout_ms);

/* SIGKILL (whole group) and reap: kill -9, the crash a test wants.
 * 0, or -1 if it was not reaped within 5 s. */
int tgh_proc_kill(tgh_proc *p);

/* Print the last max_bytes of the process log to stderr. */
void tgh_proc_dump_log(const tgh_proc *p, size_t max_bytes);

/* Print the tails of every registered process's log (on test failure). */
void tgh_dump_all_logs(void);

/* Criterion .fini: kill every process still running, remove temp files. */
void tgh_cleanup(void);

/* ------------------------------------------------------------------ */
/* ports                                                               */

int tgh_free_port(void);                          /* 127.0.0.1 ephemeral */
int tgh_wait_port(int port, int timeout_ms);      /* 0 when it accepts */
int tgh_port_accepts(int port);                   /* 1 if connect() works now */
/* 1 if port is listening here (/proc/net/tcp{,6}); makes no connection:
 * for tollgate's own ports, where a probe would hold a connection place */
int tgh_port_listening(int port);
int tgh_listening_sockets(int port);             /* LISTEN sockets on port */
int tgh_wait_listening(int port, int timeout_ms);  /* 0 when listening */

/* ------------------------------------------------------------------ */
/* upstreams and tollgate                                              */

typedef struct tgh_upstream {
    tgh_proc *proc;
    int       port;
} tgh_upstream;

/* tg-testup -p 0; reads PORT=<n> from its first output line. 0 / -1. */
int tgh_testup_start(tgh_upstream *u);
/* tg-testup on a given port (a restart); 0 / -1. */
int tgh_testup_start_port(tgh_upstream *u, int port);

/* The FastAPI sample app under uvicorn (2 workers); waits for /health. */
int tgh_fastapi_start(tgh_upstream *u);

/* ------------------------------------------------------------------ */
/* Redis: the one way the tests start redis-server, replicas, Sentinel  */
/* and Cluster nodes.  Each is a harness process on 127.0.0.1 with no   */
/* persistence and its files (a replica's sync, nodes-PORT.conf,        */
/* sentinel-PORT.conf) in tgh_tmpdir(); every redis-server loads the    */
/* module TG_REDIS_MODULE names, when set (the *_native runs).  A start */
/* returns once the server answers PING as itself (INFO's process_id:   */
/* never another program's server that took the port); it retries on   */
/* new ports when the port was lost to a race, and shows the log when   */
/* it fails.                                                            */

typedef struct tgh_redis_opts {
    int         replicaof;             /* > 0: replica of 127.0.0.1:<port> */
    int         cluster;               /* --cluster-enabled (a port pair) */
    const char *password;              /* --requirepass and --masterauth */
    const char *const *args;           /* more arguments, NULL-terminated */
} tgh_redis_opts;

/* redis-server per o (NULL: a plain one) on a free port, or on u->port
 * when it is set (a restart, or a port chosen by the test).  0 / -1. */
int tgh_redis_start_opts(tgh_upstream *u, const tgh_redis_opts *o);
/* A plain redis-server: tgh_redis_start_opts(u, NULL). */
int tgh_redis_start(tgh_upstream *u);

/* A Sentinel on a free port; its config is "port, bind 127.0.0.1, dir,
 * sentinel resolve-hostnames no", "requirepass PASSWORD" when password
 * is not NULL, and then the printf lines given (e.g. "sentinel monitor
 * mymaster 127.0.0.1 %d 2\n").  0 / -1. */
int tgh_sentinel_start(tgh_upstream *u, const char *password, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A free port p whose cluster bus port p + 10000 is free too; -1. */
int tgh_cluster_free_port(void);

/* redis-cli --cluster create over the n nodes (cluster-enabled servers)
 * at ports, with `replicas` replicas per master, then waits for
 * cluster_state:ok on every node and every replica's link.  password:
 * the nodes' (NULL: none).  0 / -1 (the reason on stderr). */
int tgh_redis_cluster_create(const int *ports, int n, int replicas,
                             const char *password);

/* Poll redis-cli -p port ARGS until its output contains needle: 1, or 0
 * after timeout_ms. */
int tgh_redis_wait(int port, const char *needle, int timeout_ms,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* Run redis-cli -p port ARGS... (words split by the shell); its output
 * (trimmed) into out.  0 / -1. */
int tgh_redis_cli(int port, char *out, size_t outlen, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Counters of tg-testup (read directly, not through the proxy). */
typedef struct tgh_stats {
    long connections;
    long requests;
} tgh_stats;
int tgh_testup_stats(int port, tgh_stats *st);
int tgh_testup_reset(int port);

/* Config fields of a tollgate test instance.  tgh_tg_opts_default() fills
 * the values of the standard test config; tests override fields. */
typedef struct tgh_tg_opts {
    char upstream_servers[256];        /* YAML flow list body, e.g. "127.0.0.1:8000" */
    int  workers;
    int  drain_timeout_ms;
    const char *log_level;
    long max_body_bytes;
    long max_header_bytes;
    long max_request_line;
    int  header_timeout_ms;
    int  body_timeout_ms;
    int  idle_timeout_ms;
    int  connect_timeout_ms;
    int  first_byte_timeout_ms;
    int  total_timeout_ms;
    int  keepalive;                    /* upstream.keepalive; < 0: auto */
    int  keepalive_timeout_ms;         /* upstream's; 0: not written (default) */
    const char *store;                 /* "local" (default) or "redis" */
    int         tls_port;              /* > 0: a second listener with TLS */
    const char *tls_cert, *tls_key;    /* its PEM files */
    const char *http_extra;            /* more keys of the http: mapping,
                                          e.g. "trusted_proxies: [::1]" */
    const char *extra_yaml;            /* appended verbatim (may be NULL) */
} tgh_tg_opts;

void tgh_tg_opts_default(tgh_tg_opts *o, int upstream_port);

typedef struct tgh_tollgate {
    tgh_proc *proc;
    int       port;                    /* plain-HTTP listener */
    int       admin_port;
    char      conf_path[512];
} tgh_tollgate;

/* Write the config, start $TG_BINARY -c FILE, wait for both ports.  Retries
 * with new ports if the process dies at start (port race).  0 / -1. */
int tgh_tollgate_start(tgh_tollgate *t, const tgh_tg_opts *o);

/* ------------------------------------------------------------------ */
/* raw HTTP client                                                     */

#define TGH_MAX_HDRS 128

typedef struct tgh_hdr {
    char *name;
    char *value;
} tgh_hdr;

typedef struct tgh_resp {
    int      minor;                    /* HTTP/1.<minor> */
    int      status;
    char     reason[256];
    tgh_hdr  hdr[TGH_MAX_HDRS];
    int      nhdr;
    unsigned char *body;               /* decoded body, NUL-terminated */
    size_t   body_len;
    int      chunked;                  /* framed by chunked coding */
    int      close_delimited;          /* framed by connection close */
    int      has_content_length;
    int      interim[8];               /* 1xx statuses seen before this one */
    int      ninterim;
    int      saw_100;                  /* an interim 100 Continue was seen */
    int      nchunks;                  /* chunk count (chunked framing) */
    uint64_t t_start_ms;               /* when reading started */
    uint64_t t_head_ms;                /* final head complete (relative) */
    uint64_t t_first_body_ms;          /* first body byte (relative, >= 1; 0 = none) */
    uint64_t t_done_ms;                /* response complete (relative) */
} tgh_resp;

/* A client connection with its own read buffer (keeps bytes that arrive
 * after one response for the next: keep-alive and pipelining). */
typedef struct tgh_conn {
    int    fd;
    unsigned char *buf;
    size_t off, len, cap;              /* unread bytes: buf[off..len) */
    int    eof;                        /* peer closed (read returned 0) */
    int    reset;                      /* read/write failed: ECONNRESET... */
} tgh_conn;

tgh_conn *tgh_conn_open(int port, int timeout_ms);  /* NULL if refused */
void tgh_conn_close(tgh_conn *c);

/* Send all bytes (bounded).  0 / -1 (the peer may have closed). */
int tgh_conn_send(tgh_conn *c, const void *buf, size_t len, int timeout_ms);
int tgh_conn_sendstr(tgh_conn *c, const char *s);
/* Send in pieces of piece bytes with pause_ms between them. */
int tgh_conn_send_slowly(tgh_conn *c, const void *buf, size_t len,
                         size_t piece, int pause_ms);

enum {
    TGH_HEAD_REQ  = 1,                 /* response to HEAD: no body */
    TGH_STOP_1XX  = 2                  /* return an interim 1xx response */
};

/* Read one response.  1xx interim responses are recorded in r->interim
 * and skipped unless TGH_STOP_1XX.  Returns 0 when complete, -1 on
 * timeout, EOF before the end, or a malformed response (r->reason gets
 * "harness: ..." text then). */
int tgh_conn_read_response(tgh_conn *c, tgh_resp *r, int flags,
                           int timeout_ms);

/* Send req (len bytes) while reading the response: large bodies cannot
 * deadlock against a server that answers while the request is still being
 * sent.  0 / -1 like tgh_conn_read_response. */
int tgh_conn_roundtrip(tgh_conn *c, const void *req, size_t len,
                       tgh_resp *r, int flags, int timeout_ms);

/* Read and discard until the peer closes.  Returns 1 when closed (EOF or
 * reset) within timeout_ms, 0 otherwise.  *extra gets the number of bytes
 * read meanwhile (may be NULL). */
int tgh_conn_wait_closed(tgh_conn *c, int timeout_ms, size_t *extra);

/* Read everything until close or timeout; returns a malloc'ed buffer
 * (NUL-terminated) and its length in *len.  *closed: 1 if closed. */
unsigned char *tgh_conn_read_all(tgh_conn *c, int timeout_ms, size_t *len,
                                 int *closed);

void tgh_resp_free(tgh_resp *r);
/* First header value by case-insensitive name, or NULL. */
const char *tgh_resp_header(const tgh_resp *r, const char *name);
int tgh_resp_header_count(const tgh_resp *r, const char *name);

/* One request on a fresh connection: "METHOD path HTTP/1.1", Host and
 * Connection: close added, extra_headers ("A: b\r\n"...) and a body
 * with Content-Length when body != NULL.  0 / -1. */
int tgh_http(int port, const char *method, const char *path,
             const char *extra_headers, const void *body, size_t body_len,
             tgh_resp *r, int timeout_ms);

/* ------------------------------------------------------------------ */
/* TLS clients (OpenSSL, blocking sockets)                             */

struct ssl_st;                         /* OpenSSL's SSL */
struct ssl_ctx_st;                     /* OpenSSL's SSL_CTX */
struct ssl_session_st;                 /* OpenSSL's SSL_SESSION */

/* A self-signed certificate for CN=cn and its key, written to
 * tgh_tmpdir()/cert and tgh_tmpdir()/key; newkey is what openssl req
 * -newkey takes ("rsa:2048", "ec -pkeyopt ec_paramgen_curve:prime256v1").
 * 0 / -1. */
int tgh_tls_selfsigned(const char *newkey, const char *cn, const char *cert,
                       const char *key);

/* tollgate in front of up (started here) with a TLS listener besides the
 * plain one, on a self-signed certificate for localhost made with newkey
 * (tgh_tls_selfsigned); workers 0: the default; http_extra as in
 * tgh_tg_opts.  Returns the TLS port once it answers, or -1. */
int tgh_tls_tollgate_start(tgh_upstream *up, tgh_tollgate *tg, const char *newkey,
                           int workers, const char *http_extra);
/* A blocking TCP connection to 127.0.0.1:port, each send and receive
 * bounded by timeout_ms (SO_SNDTIMEO, SO_RCVTIMEO); the fd or -1. */
int tgh_tcp_connect(int port, int timeout_ms);
/* A TLS connection to 127.0.0.1:port made from ctx, offering session
 * sess (may be NULL), its handshake done (tgh_tcp_connect's timeouts).
 * NULL on failure, and *why (if why != NULL) says which step failed.
 * The caller closes it: tgh_tls_close, or SSL_free and close. */
struct ssl_st *tgh_tls_connect(struct ssl_ctx_st *ctx, int port, int timeout_ms,
                               struct ssl_session_st *sess, const char **why);
/* SSL_shutdown (close_notify), SSL_free and close of its socket. */
void tgh_tls_close(struct ssl_st *ssl);
/* One "GET / HTTP/1.1" on ssl and its response read: 1 when it is a 200
 * with the body "ok\n" (tg-testup's /), else 0. */
int tgh_tls_get_ok(struct ssl_st *ssl);

/* ------------------------------------------------------------------ */
/* data helpers                                                        */

/* buf[i] = (i*31+7)&0xff - tg-testup's /bytes pattern. */
void tgh_fill_testup_pattern(unsigned char *buf, size_t n);
/* Pseudo-random bytes from seed (deterministic). */
void tgh_fill_random(unsigned char *buf, size_t n, uint32_t seed);
/* Encode body as chunked with varied chunk sizes; malloc'ed result. */
unsigned char *tgh_chunk_encode(const unsigned char *body, size_t n,
                                size_t *out_len, uint32_t seed);
/* A malloc'ed string from printf. */
char *tgh_strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Run a printf-made command with /bin/sh; its standard output (at most
 * outlen - 1 bytes, NUL-terminated; trailing newlines kept) into out,
 * or discarded when out is NULL.  Returns its exit status, -1 when it
 * could not run or was killed by a signal. */
int tgh_sh(char *out, size_t outlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Index of the first byte where a and b differ, or -1 if equal in n. */
long tgh_first_diff(const unsigned char *a, const unsigned char *b, size_t n);
/* Is s exactly n lowercase hex digits? */
int tgh_is_lower_hex(const char *s, size_t n);

/* ------------------------------------------------------------------ */
/* assertions (for test files: they include criterion first)           */

/* Like cr_assert, but prints the tails of every process log first. */
#define TGH_CHECK(cond, ...)                                              \
    do {                                                                  \
        if (!(cond)) {                                                    \
            tgh_dump_all_logs();                                          \
            cr_assert_fail(__VA_ARGS__);                                  \
        }                                                                 \
    } while (0)

#endif
