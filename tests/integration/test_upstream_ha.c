/*
 * test_upstream_ha.c - upstream servers failing under tollgate: the
 * failing server's breaker opens and traffic goes to the other with no
 * 5xx; all down -> 503 at once; a restarted server is back in rotation.
 */
#include <criterion/criterion.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

TestSuite(upstream_ha, .fini = tgh_cleanup, .timeout = 180);

static tgh_upstream a, b;
static tgh_tollgate tg;

static void
start(void)
{
    tgh_tg_opts o;

    TGH_CHECK(tgh_testup_start(&a) == 0, "upstream a");
    TGH_CHECK(tgh_testup_start(&b) == 0, "upstream b");
    tgh_tg_opts_default(&o, a.port);
    snprintf(o.upstream_servers, sizeof o.upstream_servers, "127.0.0.1:%d, 127.0.0.1:%d",
             a.port, b.port);
    o.connect_timeout_ms = 500;
    o.extra_yaml = "";
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
}

static int
get(const char *path, long *ms, tgh_resp *keep)
{
    tgh_resp r;
    uint64_t t0 = tgh_now_ms();
    int rc = tgh_http(tg.port, "GET", path, NULL, NULL, 0, &r, 10000);
    int st = rc == 0 ? r.status : -1;

    if (ms)
        *ms = (long)(tgh_now_ms() - t0);
    if (keep && rc == 0)
        *keep = r;
    else if (rc == 0)
        tgh_resp_free(&r);
    return st;
}

static char *
status_json(void)
{
    tgh_resp r;
    char *s;

    TGH_CHECK(tgh_http(tg.admin_port, "GET", "/status", NULL, NULL, 0, &r, 5000) == 0, "status");
    s = malloc(r.body_len + 1);
    memcpy(s, r.body, r.body_len);
    s[r.body_len] = '\0';
    tgh_resp_free(&r);
    return s;
}

Test(upstream_ha, one_down_no_5xx_then_back)
{
    tgh_stats st0, st1;
    char want[128], *s;
    uint64_t end;
    int i, port_b;

    start();
    for (i = 0; i < 10; i++)
        TGH_CHECK(get("/", NULL, NULL) == 200, "warm-up %d", i);

    port_b = b.port;
    tgh_proc_stop(b.proc, 5000);
    /* connect failures are retried on the other server: never a 5xx */
    for (i = 0; i < 60; i++) {
        int code = get("/", NULL, NULL);
        TGH_CHECK(code == 200, "request %d with one server down: %d", i, code);
    }
    /* /status samples the workers' breakers every 50 ms */
    snprintf(want, sizeof want, "\"server\":\"127.0.0.1:%d\",\"health\":\"up\",\"breaker\":\"open\"",
             port_b);
    end = tgh_now_ms() + 5000;
    for (;;) {
        int open;
        s = status_json();
        open = strstr(s, want) != NULL;
        if (open || tgh_now_ms() > end)
            break;
        free(s);
        tgh_sleep_ms(20);
    }
    TGH_CHECK(strstr(s, want) != NULL, "breaker of the dead server not open: %s", s);
    free(s);

    /* restarted on its port: back in rotation after a half-open probe */
    TGH_CHECK(tgh_testup_start_port(&b, port_b) == 0, "restart b on %d", port_b);
    TGH_CHECK(tgh_testup_stats(b.port, &st0) == 0, "stats");
    end = tgh_now_ms() + 30000;
    while (tgh_now_ms() < end) {
        TGH_CHECK(get("/", NULL, NULL) == 200, "request while b comes back");
        TGH_CHECK(tgh_testup_stats(b.port, &st1) == 0, "stats");
        if (st1.requests - st0.requests >= 5)
            break;
        tgh_sleep_ms(20);
    }
    TGH_CHECK(st1.requests - st0.requests >= 5, "the restarted server got %ld requests",
              st1.requests - st0.requests);
}

Test(upstream_ha, all_down_503_at_once)
{
    tgh_resp r;
    long ms;
    int i, code = 0;

    start();
    tgh_proc_stop(a.proc, 5000);
    tgh_proc_stop(b.proc, 5000);
    /* until both breakers have opened, connects fail: 502 */
    for (i = 0; i < 30; i++) {
        code = get("/", &ms, NULL);
        TGH_CHECK(code == 502 || code == 503, "status %d with everything down", code);
        if (code == 503)
            break;
    }
    TGH_CHECK(code == 503, "never got 503 with every server down");
    for (i = 0; i < 10; i++) {
        code = get("/", &ms, &r);
        TGH_CHECK(code == 503, "request %d: %d", i, code);
        TGH_CHECK(ms < 200, "503 took %ld ms", ms);
        TGH_CHECK(tgh_resp_header(&r, "Retry-After") != NULL, "503 without Retry-After");
        tgh_resp_free(&r);
    }
}
