/*
 * test_tls.c - the TLS listener: a real handshake (curl), ALPN http/1.1,
 * TLS 1.2 as the floor, the same proxying as plain HTTP, and certificates
 * reloaded on SIGHUP, also while TLS requests flow.
 */
#include <criterion/criterion.h>

#include <pthread.h>
#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "harness.h"

TestSuite(tls, .fini = tgh_cleanup, .timeout = 120);

#define EC_KEY "ec -pkeyopt ec_paramgen_curve:prime256v1"   /* openssl req -newkey */

static tgh_upstream up;
static tgh_tollgate tg;
static int tls_port;
static char out[16384];

static void
start(void)
{
    tls_port = tgh_tls_tollgate_start(&up, &tg, "rsa:2048", 0, NULL);
    TGH_CHECK(tls_port > 0, "tollgate with a TLS listener");
}

Test(tls, handshake_alpn_and_proxying)
{
    char *cmd;

    start();
    cmd = tgh_strf("curl -sk --http1.1 -w '\\n%%{http_code} %%{http_version}' "
                   "https://127.0.0.1:%d/headers 2>&1", tls_port);
    TGH_CHECK(tgh_sh(out, sizeof out, "%s", cmd) == 0, "curl: %s", out);
    free(cmd);
    TGH_CHECK(strstr(out, "X-Forwarded-Proto: https") != NULL, "forwarded proto: %s", out);
    TGH_CHECK(strstr(out, "\n200 1.1") != NULL, "status/version: %s", out);

    /* ALPN: h2 is not spoken; http/1.1 is chosen */
    cmd = tgh_strf("echo | openssl s_client -connect 127.0.0.1:%d -alpn h2,http/1.1 2>&1",
                   tls_port);
    tgh_sh(out, sizeof out, "%s", cmd);
    free(cmd);
    TGH_CHECK(strstr(out, "ALPN protocol: http/1.1") != NULL, "ALPN: %s", out);

    /* TLS 1.1 is refused */
    cmd = tgh_strf("echo | openssl s_client -connect 127.0.0.1:%d -tls1_1 2>&1", tls_port);
    tgh_sh(out, sizeof out, "%s", cmd);
    free(cmd);
    TGH_CHECK(strstr(out, "Cipher is (NONE)") != NULL || strstr(out, "alert") != NULL
              || strstr(out, "no protocols available") != NULL, "TLS 1.1 accepted: %s", out);

    /* a 1 MiB body through TLS, byte-exact */
    cmd = tgh_strf("head -c 1048576 /dev/urandom > %s/body && curl -sk --http1.1 "
                   "--data-binary @%s/body https://127.0.0.1:%d/echo | cmp - %s/body "
                   "&& echo SAME", tgh_tmpdir(), tgh_tmpdir(), tls_port, tgh_tmpdir());
    tgh_sh(out, sizeof out, "%s", cmd);
    free(cmd);
    TGH_CHECK(strstr(out, "SAME") != NULL, "1 MiB echo over TLS differs: %s", out);
}

/* The CN of the certificate the TLS listener presents now. */
static int
served_cn_is(const char *cn)
{
    char *cmd = tgh_strf("echo | openssl s_client -connect 127.0.0.1:%d 2>/dev/null "
                         "| openssl x509 -noout -subject 2>&1", tls_port);
    char want[128];

    tgh_sh(out, sizeof out, "%s", cmd);
    free(cmd);
    snprintf(want, sizeof want, "CN = %s", cn);
    return strstr(out, want) != NULL;
}

Test(tls, sighup_reloads_the_certificate)
{
    char *cmd;
    uint64_t end;

    start();
    TGH_CHECK(served_cn_is("localhost"), "initial certificate: %s", out);

    /* renewed in place (written aside, then renamed over) */
    TGH_CHECK(tgh_tls_selfsigned("rsa:2048", "renewed", "cert.new", "key.new") == 0, "renew");
    cmd = tgh_strf("cd %s && mv key.new key.pem && mv cert.new cert.pem", tgh_tmpdir());
    TGH_CHECK(tgh_sh(out, sizeof out, "%s", cmd) == 0, "renew");
    free(cmd);
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && !served_cn_is("renewed"))
        tgh_sleep_ms(50);
    TGH_CHECK(served_cn_is("renewed"), "after SIGHUP: %s", out);

    /* a broken certificate is refused; the running one stays */
    cmd = tgh_strf("cd %s && echo garbage > cert.pem", tgh_tmpdir());
    tgh_sh(out, sizeof out, "%s", cmd);
    free(cmd);
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    end = tgh_now_ms() + 10000;
    for (;;) {
        char *log = tgh_strf("grep -c 'new configuration refused' %s", tg.proc->log_path);
        int refused;
        tgh_sh(out, sizeof out, "%s", log);
        free(log);
        refused = atoi(out) > 0;
        if (refused || tgh_now_ms() > end)
            break;
        tgh_sleep_ms(50);
    }
    TGH_CHECK(atoi(out) > 0, "a broken certificate was not refused");
    TGH_CHECK(served_cn_is("renewed"), "the running certificate was dropped: %s", out);
    TGH_CHECK(tgh_proc_alive(tg.proc), "tollgate died");
}

/* ------------------------------------------------------------------ */
/* reload under load                                                   */

/* A TLS client thread: connections of per_conn keep-alive GET / each,
 * one after the other, until told to stop.  Counts requests, 200s, and
 * the handshakes that saw each certificate (CN alpha or beta). */
typedef struct tls_load {
    pthread_t th;
    int       port;
    unsigned  per_conn;
    int       pace_ms;                 /* pause between requests */
    int       stop;                    /* atomic: set by the test */
    unsigned  sent, ok;                /* atomic: read by the test */
    unsigned  alpha, beta;             /* atomic: handshakes per CN */
    char      failure[256];            /* the first failure, or "" */
} tls_load;

static void
load_fail(tls_load *l, const char *what)
{
    if (l->failure[0] == '\0')
        snprintf(l->failure, sizeof l->failure, "%s (after %u requests)", what,
                 __atomic_load_n(&l->sent, __ATOMIC_RELAXED));
}

static void *
load_main(void *arg)
{
    tls_load *l = arg;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    sigset_t all;

    /* The test's own signals (SIGCHLD of its sh commands) go to the main
     * thread: one landing here interrupts a blocking read (EINTR), which
     * OpenSSL reports as a failed read, not as tollgate's fault. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);

    while (!__atomic_load_n(&l->stop, __ATOMIC_ACQUIRE) && l->failure[0] == '\0') {
        const char *why = NULL;
        SSL *ssl = tgh_tls_connect(ctx, l->port, 10000, NULL, &why);
        X509 *cert;
        char cn[64] = "";

        if (ssl == NULL) {
            load_fail(l, why);
            break;
        }
        cert = SSL_get1_peer_certificate(ssl);
        if (cert != NULL) {
            X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName,
                                      cn, sizeof cn);
            X509_free(cert);
        }
        if (strcmp(cn, "alpha") == 0)
            __atomic_add_fetch(&l->alpha, 1, __ATOMIC_RELAXED);
        else if (strcmp(cn, "beta") == 0)
            __atomic_add_fetch(&l->beta, 1, __ATOMIC_RELAXED);
        for (unsigned k = 0; k < l->per_conn && !__atomic_load_n(&l->stop, __ATOMIC_ACQUIRE);
             k++) {
            __atomic_add_fetch(&l->sent, 1, __ATOMIC_RELAXED);
            if (!tgh_tls_get_ok(ssl)) {
                load_fail(l, "a request not answered 200");
                break;
            }
            __atomic_add_fetch(&l->ok, 1, __ATOMIC_RELAXED);
            if (l->pace_ms > 0)
                tgh_sleep_ms(l->pace_ms);
        }
        tgh_tls_close(ssl);
    }
    SSL_CTX_free(ctx);
    return NULL;
}

/* Lines of the tollgate log that contain text. */
static int
log_count(const char *text)
{
    char *cmd = tgh_strf("grep -c '%s' %s", text, tg.proc->log_path);
    tgh_sh(out, sizeof out, "%s", cmd);
    free(cmd);
    return atoi(out);
}

/*
 * The certificate is replaced ten times (alpha, beta, alpha, ...) while
 * two clients send requests over TLS: one opening a connection every four
 * requests, one keeping its connection across the reloads (paced, so as
 * to stay under http.max_requests_per_connection: its SSL outlives the
 * set of contexts it was made from).  Every request is
 * answered 200, the new handshakes present the new certificate, and
 * tollgate exits 0 at SIGTERM (in the ASan build: no leak, no
 * use-after-free of a replaced context).
 */
Test(tls, sighup_while_tls_requests_flow)
{
    tls_load short_conns = { .per_conn = 4 }, long_conn = { .per_conn = 5000, .pace_ms = 1 };
    char *cmd;

    signal(SIGPIPE, SIG_IGN);          /* a write to a closed connection fails */
    start();
    TGH_CHECK(tgh_tls_selfsigned(EC_KEY, "alpha", "alpha.crt", "alpha.key") == 0
              && tgh_tls_selfsigned(EC_KEY, "beta", "beta.crt", "beta.key") == 0,
              "openssl req");
    short_conns.port = long_conn.port = tls_port;
    pthread_create(&short_conns.th, NULL, load_main, &short_conns);
    pthread_create(&long_conn.th, NULL, load_main, &long_conn);

    for (int k = 0; k < 10; k++) {
        const char *cn = k % 2 == 0 ? "alpha" : "beta";
        unsigned *seen = k % 2 == 0 ? &short_conns.alpha : &short_conns.beta;
        unsigned before = __atomic_load_n(seen, __ATOMIC_RELAXED);
        unsigned ok_before = __atomic_load_n(&long_conn.ok, __ATOMIC_RELAXED);
        uint64_t end;

        cmd = tgh_strf("cd %s && cp %s.crt cert.pem && cp %s.key key.pem", tgh_tmpdir(), cn, cn);
        TGH_CHECK(tgh_sh(out, sizeof out, "%s", cmd) == 0, "cp");
        free(cmd);
        tgh_proc_signal(tg.proc, SIGHUP, 0);
        end = tgh_now_ms() + 20000;
        while (tgh_now_ms() < end && log_count("configuration reloaded") < k + 1)
            tgh_sleep_ms(20);
        TGH_CHECK(log_count("configuration reloaded") == k + 1, "reload %d not logged", k + 1);
        /* the new certificate reaches the next handshakes, and the long
         * connection keeps being answered */
        while (tgh_now_ms() < end
               && (__atomic_load_n(seen, __ATOMIC_RELAXED) < before + 3
                   || __atomic_load_n(&long_conn.ok, __ATOMIC_RELAXED) < ok_before + 3)
               && short_conns.failure[0] == '\0' && long_conn.failure[0] == '\0')
            tgh_sleep_ms(10);
        TGH_CHECK(short_conns.failure[0] == '\0', "short connections: %s", short_conns.failure);
        TGH_CHECK(long_conn.failure[0] == '\0', "long connection: %s", long_conn.failure);
        TGH_CHECK(__atomic_load_n(seen, __ATOMIC_RELAXED) >= before + 3,
                  "reload %d: no handshake with CN %s", k + 1, cn);
        TGH_CHECK(__atomic_load_n(&long_conn.ok, __ATOMIC_RELAXED) >= ok_before + 3,
                  "reload %d: the long connection stalled", k + 1);
    }

    __atomic_store_n(&short_conns.stop, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&long_conn.stop, 1, __ATOMIC_RELEASE);
    pthread_join(short_conns.th, NULL);
    pthread_join(long_conn.th, NULL);
    TGH_CHECK(short_conns.failure[0] == '\0', "short connections: %s", short_conns.failure);
    TGH_CHECK(long_conn.failure[0] == '\0', "long connection: %s", long_conn.failure);
    TGH_CHECK(short_conns.ok == short_conns.sent && long_conn.ok == long_conn.sent,
              "answered %u of %u and %u of %u", short_conns.ok, short_conns.sent,
              long_conn.ok, long_conn.sent);
    TGH_CHECK(log_count("new configuration refused") == 0, "a reload was refused");
    cr_log_info("%u + %u requests answered; handshakes: %u alpha, %u beta",
                short_conns.ok, long_conn.ok, short_conns.alpha, short_conns.beta);

    tgh_proc_signal(tg.proc, SIGTERM, 0);
    TGH_CHECK(tgh_proc_wait(tg.proc, 20000) == 0, "tollgate still running 20 s after SIGTERM");
    TGH_CHECK(WIFEXITED(tg.proc->status) && WEXITSTATUS(tg.proc->status) == 0,
              "tollgate exit after SIGTERM: %s %d",
              WIFEXITED(tg.proc->status) ? "status" : "signal",
              WIFEXITED(tg.proc->status) ? WEXITSTATUS(tg.proc->status)
                                         : WTERMSIG(tg.proc->status));
    TGH_CHECK(log_count("ERROR: AddressSanitizer") == 0, "ASan report in the log");
}
