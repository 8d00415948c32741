/*
 * test_cli.c - the command line a sysadmin uses: -t, --version, -h, exit
 * codes, and every shipped conf/<name>.yaml passing -t as shipped and as
 * installed (with the production keys file), with no file made for it.
 */
#include <criterion/criterion.h>

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

static char out[8192];

/* Run a shell command, capture stdout+stderr into out, return exit code. */
static int
sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    return tgh_sh(out, sizeof out, "%s 2>&1", cmd);
}

static const char *
bin(void)
{
    const char *b = getenv("TG_BINARY");
    cr_assert_not_null(b, "TG_BINARY not set");
    return b;
}

static const char *
root(void)
{
    const char *r = getenv("TG_SOURCE_ROOT");
    return r ? r : ".";
}

static char tmpdir[256];

static void
mktmp(void)
{
    strcpy(tmpdir, "/tmp/tg-cli-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

static void
rmtmp(void)
{
    char cmd[512];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
    (void)system(cmd);
}

static void
write_file(const char *name, const char *text)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

Test(cli, version_and_help)
{
    cr_assert_eq(sh("%s --version", bin()), 0);
    cr_assert(strstr(out, "tollgate ") != NULL, "version output: %s", out);
    cr_assert_eq(sh("%s -h", bin()), 0);
    cr_assert(strstr(out, "usage: tollgate") != NULL);
    cr_assert_eq(sh("%s --no-such-option", bin()), 2);
    cr_assert_eq(sh("%s stray-argument", bin()), 2);
}

Test(cli, test_good_config, .init = mktmp, .fini = rmtmp)
{
    write_file("ok.yaml",
               "listen: [ { address: 127.0.0.1:18080 } ]\n"
               "upstream: { servers: [127.0.0.1:18000] }\n");
    cr_assert_eq(sh("%s -t -c %s/ok.yaml", bin(), tmpdir), 0, "%s", out);
    cr_assert(strstr(out, "test is successful") != NULL, "%s", out);
}

Test(cli, test_bad_config_names_line_and_column, .init = mktmp, .fini = rmtmp)
{
    write_file("bad.yaml",
               "listen: [ { address: 127.0.0.1:18080 } ]\n"
               "upstream:\n"
               "  servers: [127.0.0.1:18000]\n"
               "  conect_timeout_ms: 5\n");
    cr_assert_eq(sh("%s -t -c %s/bad.yaml", bin(), tmpdir), 1, "%s", out);
    cr_assert(strstr(out, "bad.yaml:4:3") != NULL, "%s", out);
    cr_assert(strstr(out, "conect_timeout_ms") != NULL, "%s", out);
    cr_assert(strstr(out, "test failed") != NULL, "%s", out);
}

Test(cli, missing_file, .init = mktmp, .fini = rmtmp)
{
    cr_assert_eq(sh("%s -t -c %s/nope.yaml", bin(), tmpdir), 1);
    cr_assert(strstr(out, "nope.yaml") != NULL, "%s", out);
    /* running (not -t) with a missing file fails the same way */
    cr_assert_eq(sh("%s -c %s/nope.yaml", bin(), tmpdir), 1);
}

Test(cli, tls_key_mismatch_is_refused, .init = mktmp, .fini = rmtmp)
{
    cr_assert_eq(sh("cd %s && openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=a "
                    "-keyout a.key -out a.pem -days 2 && openssl req -x509 -newkey "
                    "rsa:2048 -nodes -subj /CN=b -keyout b.key -out b.pem -days 2",
                    tmpdir), 0, "%s", out);
    write_file("tls.yaml",
               "listen:\n"
               "  - address: 127.0.0.1:18443\n"
               "    tls: { cert: a.pem, key: b.key }\n"
               "upstream: { servers: [127.0.0.1:18000] }\n");
    cr_assert_eq(sh("%s -t -c %s/tls.yaml", bin(), tmpdir), 1, "%s", out);
    cr_assert(strstr(out, "b.key") != NULL, "%s", out);
    cr_assert(strstr(out, "mismatch") != NULL || strstr(out, "does not match") != NULL,
              "%s", out);
    write_file("tls2.yaml",
               "listen:\n"
               "  - address: 127.0.0.1:18443\n"
               "    tls: { cert: a.pem, key: a.key }\n"
               "upstream: { servers: [127.0.0.1:18000] }\n");
    cr_assert_eq(sh("%s -t -c %s/tls2.yaml", bin(), tmpdir), 0, "%s", out);
}

Test(cli, every_shipped_config_passes, .init = mktmp, .fini = rmtmp)
{
    char confdir[512];
    struct dirent *de;
    DIR *d;
    int n = 0;

    /* As shipped: each sample in place, nothing made for it (no TLS files). */
    snprintf(confdir, sizeof(confdir), "%s/conf", root());
    d = opendir(confdir);
    cr_assert_not_null(d);
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (len < 6 || strcmp(de->d_name + len - 5, ".yaml") != 0) {
            continue;
        }
        /* keys files too: -t checks a keys file as one */
        cr_assert_eq(sh("%s -t -c %s/%s", bin(), confdir, de->d_name), 0,
                     "%s: %s", de->d_name, out);
        cr_assert(strstr(out, strncmp(de->d_name, "keys", 4) == 0 ? "keys file"
                                                                  : "configuration file"),
                  "%s: %s", de->d_name, out);
        n++;
    }
    closedir(d);
    cr_assert(n >= 4, "expected conf/tollgate.yaml, demo.yaml and two keys files, found %d", n);

    /* As installed (meson install, the .deb): /etc/tollgate/tollgate.yaml
     * beside the production keys file, which holds no key. */
    cr_assert_eq(sh("cp %s/tollgate.yaml %s/ && cp %s/keys.production.yaml %s/keys.yaml",
                    confdir, tmpdir, confdir, tmpdir), 0, "%s", out);
    cr_assert_eq(sh("%s -t -c %s/tollgate.yaml", bin(), tmpdir), 0, "%s", out);
}

/* Every bucket a route's requests meet: a cost above its capacity could
 * never pass, so -t refuses it at the cost, with FILE:LINE:COL. */
Test(cli, impossible_cost_is_refused, .init = mktmp, .fini = rmtmp)
{
    static const struct { const char *yaml, *pos, *what; } cases[] = {
        { "rate_limits:\n  basic: { requests_per_minute: 100, burst_limit: 20 }\n"
          "  free:  { requests_per_minute: 10, burst_limit: 5 }\n"
          "routes:\n  - { name: export, path: /export, cost: 6 }\n",
          "c0.yaml:7:42", "rate_limits.free.burst_limit (5)" },
        { "auth: { anonymous_tier: anon }\n"
          "rate_limits:\n  anon: { requests_per_minute: 60, burst_limit: 1 }\n"
          "routes:\n  - { name: w, method: POST, path: /w, cost: 2 }\n",
          "c1.yaml:7:46", "the anonymous tier" },
        { "routes:\n  - name: export\n    path: /export\n    cost: 10\n"
          "    limit: { requests_per_minute: 60, burst_limit: 6 }\n",
          "c2.yaml:6:11", "its own limit.burst_limit (6)" },
        { "global_limit: { requests_per_second: 10, burst: 3 }\n"
          "routes:\n  - { name: export, path: /export, cost: 4 }\n",
          "c3.yaml:5:42", "global_limit.burst (3)" },
    };
    char name[32];

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char *text = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&text, &len);

        fprintf(f, "listen: [ { address: 127.0.0.1:18080 } ]\n"
                   "upstream: { servers: [127.0.0.1:18000] }\n%s", cases[i].yaml);
        fclose(f);
        snprintf(name, sizeof(name), "c%zu.yaml", i);
        write_file(name, text);
        free(text);
        cr_assert_eq(sh("%s -t -c %s/%s", bin(), tmpdir, name), 1, "%s", out);
        cr_assert(strstr(out, cases[i].pos) != NULL, "case %zu: %s", i, out);
        cr_assert(strstr(out, cases[i].what) != NULL, "case %zu: %s", i, out);
        cr_assert(strstr(out, "could ever pass") != NULL, "case %zu: %s", i, out);
    }
}
