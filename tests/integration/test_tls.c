/*
 * test_tls.c - the TLS listener: a real handshake (curl), ALPN http/1.1,
 * TLS 1.2 as the floor, and the same proxying as plain HTTP.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

TestSuite(tls, .fini = tgh_cleanup, .timeout = 120);

static tgh_upstream up;
static tgh_tollgate tg;
static int tls_port;
static char out[16384];

static int
sh(const char *cmd)
{
    FILE *p = popen(cmd, "r");
    size_t n;

    if (p == NULL)
        return -1;
    n = fread(out, 1, sizeof out - 1, p);
    out[n] = '\0';
    return pclose(p);
}

static void
start(void)
{
    static char extra[1024];
    tgh_tg_opts o;
    char *cmd;

    cmd = tgh_strf("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost "
                   "-keyout key.pem -out cert.pem -days 2 >/dev/null 2>&1", tgh_tmpdir());
    TGH_CHECK(sh(cmd) == 0, "openssl req");
    free(cmd);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    tls_port = tgh_free_port();
    /* a second listener with TLS, besides the harness's plain one */
    tgh_tg_opts_default(&o, up.port);
    snprintf(extra, sizeof extra, "# tls listener added by the test\n");
    o.extra_yaml = extra;
    o.tls_port = tls_port;
    o.tls_cert = tgh_strf("%s/cert.pem", tgh_tmpdir());
    o.tls_key = tgh_strf("%s/key.pem", tgh_tmpdir());
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
    TGH_CHECK(tgh_wait_port(tls_port, 10000) == 0, "TLS port");
}

Test(tls, handshake_alpn_and_proxying)
{
    char *cmd;

    start();
    cmd = tgh_strf("curl -sk --http1.1 -w '\\n%%{http_code} %%{http_version}' "
                   "https://127.0.0.1:%d/headers 2>&1", tls_port);
    TGH_CHECK(sh(cmd) == 0, "curl: %s", out);
    free(cmd);
    TGH_CHECK(strstr(out, "X-Forwarded-Proto: https") != NULL, "forwarded proto: %s", out);
    TGH_CHECK(strstr(out, "\n200 1.1") != NULL, "status/version: %s", out);

    /* ALPN: h2 is not spoken; http/1.1 is chosen */
    cmd = tgh_strf("echo | openssl s_client -connect 127.0.0.1:%d -alpn h2,http/1.1 2>&1",
                   tls_port);
    sh(cmd);
    free(cmd);
    TGH_CHECK(strstr(out, "ALPN protocol: http/1.1") != NULL, "ALPN: %s", out);

    /* TLS 1.1 is refused */
    cmd = tgh_strf("echo | openssl s_client -connect 127.0.0.1:%d -tls1_1 2>&1", tls_port);
    sh(cmd);
    free(cmd);
    TGH_CHECK(strstr(out, "Cipher is (NONE)") != NULL || strstr(out, "alert") != NULL
              || strstr(out, "no protocols available") != NULL, "TLS 1.1 accepted: %s", out);

    /* a 1 MiB body through TLS, byte-exact */
    cmd = tgh_strf("head -c 1048576 /dev/urandom > %s/body && curl -sk --http1.1 "
                   "--data-binary @%s/body https://127.0.0.1:%d/echo | cmp - %s/body "
                   "&& echo SAME", tgh_tmpdir(), tgh_tmpdir(), tls_port, tgh_tmpdir());
    sh(cmd);
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

    sh(cmd);
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
    cmd = tgh_strf("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=renewed "
                   "-keyout key.new -out cert.new -days 2 >/dev/null 2>&1 && "
                   "mv key.new key.pem && mv cert.new cert.pem", tgh_tmpdir());
    TGH_CHECK(sh(cmd) == 0, "renew");
    free(cmd);
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    end = tgh_now_ms() + 10000;
    while (tgh_now_ms() < end && !served_cn_is("renewed"))
        tgh_sleep_ms(50);
    TGH_CHECK(served_cn_is("renewed"), "after SIGHUP: %s", out);

    /* a broken certificate is refused; the running one stays */
    cmd = tgh_strf("cd %s && echo garbage > cert.pem", tgh_tmpdir());
    sh(cmd);
    free(cmd);
    tgh_proc_signal(tg.proc, SIGHUP, 0);
    end = tgh_now_ms() + 10000;
    for (;;) {
        char *log = tgh_strf("grep -c 'new configuration refused' %s", tg.proc->log_path);
        int refused;
        sh(log);
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
