/*
 * test_tls.c - the TLS listener: a real handshake (curl), ALPN http/1.1,
 * TLS 1.2 as the floor, and the same proxying as plain HTTP.
 */
#include <criterion/criterion.h>

#include <stdio.h>
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
