/*
 * test_anomaly.c - anomaly detection end to end: the real tollgate with
 * short windows, two keys with steady traffic, then one of them jumps
 * far above its baseline.  The Slack sink (sink.h) gets exactly one
 * anomaly trigger for that key (the cooldown holds the repeats), and its
 * resolve once the traffic is back; /status/top lists the key first,
 * flagged, with its rate and its baseline.
 */
#include <criterion/criterion.h>

#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness.h"
#include "sink.h"

TestSuite(anomaly, .fini = tgh_cleanup, .timeout = 180);

#define SLACK "/slack/T0/B0/anomalysecret"

static sink snk;
static tgh_upstream up;
static tgh_tollgate tg;

/* keys.yaml with id-<name> for each name, tier basic. */
static const char *
write_keys(const char *const *names, size_t n)
{
    static char path[512];
    FILE *f;

    snprintf(path, sizeof path, "%s/anomaly-keys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("keys:\n", f);
    for (size_t i = 0; i < n; i++) {
        unsigned char d[32];
        SHA256((const unsigned char *)names[i], strlen(names[i]), d);
        fprintf(f, "  - { id: id-%s, tier: basic, sha256: \"", names[i]);
        for (int j = 0; j < 32; j++)
            fprintf(f, "%02x", d[j]);
        fputs("\" }\n", f);
    }
    fclose(f);
    return path;
}

/* One keep-alive client per key; reopened when tollgate closes it. */
typedef struct client {
    const char *key;
    tgh_conn   *c;
    long        sent;
} client;

static void
one(client *cl)
{
    char *req = tgh_strf("GET / HTTP/1.1\r\nHost: t\r\nX-API-Key: %s\r\n\r\n", cl->key);
    tgh_resp r;

    for (int attempt = 0; attempt < 2; attempt++) {
        if (cl->c == NULL)
            cl->c = tgh_conn_open(tg.port, 5000);
        TGH_CHECK(cl->c != NULL, "connect");
        if (tgh_conn_sendstr(cl->c, req) == 0
            && tgh_conn_read_response(cl->c, &r, 0, 10000) == 0) {
            TGH_CHECK(r.status == 200, "%s: status %d", cl->key, r.status);
            tgh_resp_free(&r);
            cl->sent++;
            free(req);
            return;
        }
        tgh_conn_close(cl->c);          /* closed under us: once more */
        cl->c = NULL;
    }
    TGH_CHECK(0, "%s: no answer", cl->key);
}

static char *
admin_page(const char *path)
{
    tgh_resp r;
    char *s;

    TGH_CHECK(tgh_http(tg.admin_port, "GET", path, NULL, NULL, 0, &r, 10000) == 0,
              "GET %s", path);
    TGH_CHECK(r.status == 200, "GET %s: %d", path, r.status);
    s = strdup(r.body ? (char *)r.body : "");
    tgh_resp_free(&r);
    return s;
}

/* "windows":N of /status/top. */
static long
windows_done(void)
{
    char *j = admin_page("/status/top"), *p = strstr(j, "\"windows\":");
    long n = p ? atol(p + 10) : -1;

    free(j);
    return n;
}

/* Paced traffic in 50 ms slices: na requests of a and nb of b per slice
 * (x 10 per 500 ms window), until cond() or ms have passed. */
static void
paced(client *a, int na, client *b, int nb, int ms, int (*cond)(void))
{
    uint64_t end = tgh_now_ms() + (uint64_t)ms, slice = tgh_now_ms();

    while (tgh_now_ms() < end && (cond == NULL || !cond())) {
        for (int i = 0; i < na; i++)
            one(a);
        for (int i = 0; i < nb; i++)
            one(b);
        slice += 50;
        if (tgh_now_ms() < slice)
            tgh_sleep_ms((int)(slice - tgh_now_ms()));
        else
            slice = tgh_now_ms();       /* late: no catching up in a burst */
    }
}

/* Both keys steady: one request each per slice, 10 per window. */
static void
steady(client *a, client *b, int ms, int (*cond)(void))
{
    paced(a, 1, b, 1, ms, cond);
}

static int
occurrences(const char *s, const char *sub)
{
    int n = 0;

    for (s = strstr(s, sub); s != NULL; s = strstr(s + 1, sub))
        n++;
    return n;
}

static int
fired(void)
{
    return sink_count(&snk, SLACK) >= 1;
}

static int
resolved(void)
{
    return sink_count(&snk, SLACK) >= 2;
}

Test(anomaly, spike_alerts_once_tops_the_list_and_resolves)
{
    static const char *const names[] = { "k-acme", "k-globex" };
    client a = { "k-acme", NULL, 0 }, b = { "k-globex", NULL, 0 };
    char *extra, *top, *p;
    uint64_t end;
    double factor;
    tgh_tg_opts o;
    sink_req *q;
    long w0;

    sink_start(&snk, NULL);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    extra = tgh_strf(
        "rate_limits: { basic: { requests_per_minute: 60000000, burst_limit: 100000000 } }\n"
        "auth: { keys_file: %s }\n"
        "anomaly: { window_ms: 500, top_k: 5, spike_factor: 10, min_requests: 50 }\n"
        "alerts:\n"
        "  slack: { webhook_url: \"http://127.0.0.1:%d" SLACK "\" }\n"
        "  instance: anomaly-1\n"
        "  evaluate_ms: 50\n"
        "  cooldown_ms: 600000\n"
        "  rules: { anomaly: { to: [slack] } }\n",
        write_keys(names, 2), snk.port);
    tgh_tg_opts_default(&o, up.port);
    o.extra_yaml = extra;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");

    /* the baselines: both keys steady for 8 windows */
    w0 = windows_done();
    end = tgh_now_ms() + 30000;
    while (tgh_now_ms() < end && windows_done() < w0 + 8)
        steady(&a, &b, 200, NULL);
    TGH_CHECK(windows_done() >= w0 + 8, "windows do not finish");
    top = admin_page("/status/top");
    TGH_CHECK(strstr(top, "\"enabled\":true,\"window_ms\":500,\"top_k\":5,") != NULL,
              "%s", top);
    TGH_CHECK(strstr(top, "\"consumer\":\"id-k-acme\"") != NULL
              && strstr(top, "\"consumer\":\"id-k-globex\"") != NULL, "%s", top);
    TGH_CHECK(strstr(top, "\"anomaly\":\"") == NULL, "flagged while steady: %s", top);
    free(top);
    TGH_CHECK(sink_count(&snk, NULL) == 0, "an alert while steady");

    /* acme jumps to 15 times its rate (150 a window), globex stays; until
     * the trigger, then 6 more windows of it */
    paced(&a, 15, &b, 1, 15000, fired);
    TGH_CHECK(fired(), "no anomaly trigger (%ld requests of acme)", a.sent);
    paced(&a, 15, &b, 1, 3000, NULL);
    top = admin_page("/status/top");
    p = strstr(top, "\"top\":[{\"consumer\":\"id-k-acme\",");
    TGH_CHECK(p != NULL, "acme is not first: %s", top);
    TGH_CHECK(strstr(p, "\"anomaly\":\"spike\"}") != NULL
              && strstr(p, "\"anomaly\":\"spike\"}") < strstr(p, "}"), "not flagged: %s", top);
    TGH_CHECK(strstr(p, "\"baseline_per_s\":") != NULL && strstr(p, "\"rate_per_s\":"),
              "%s", top);
    {
        double rate = atof(strstr(p, "\"rate_per_s\":") + 13);
        double base = atof(strstr(p, "\"baseline_per_s\":") + 17);
        TGH_CHECK(base > 10 && base < 30 && rate >= 10 * base && rate <= 20 * base,
                  "rate %g, baseline %g per second: %s", rate, base, top);
    }
    free(top);
    top = admin_page("/status");
    TGH_CHECK(strstr(top, "\"rule\":\"anomaly\",\"subject\":\"consumer id-k-acme\"") != NULL,
              "no open incident in /status: %s", top);
    free(top);
    TGH_CHECK(sink_count(&snk, NULL) == 1, "%d messages during the spike, expected 1 "
              "(cooldown)", sink_count(&snk, NULL));
    q = sink_get(&snk, SLACK, 0);
    TGH_CHECK(strstr(q->body, "{\"text\":\"[FIRING] tollgate anomaly on ") == q->body
              && strstr(q->body, "/anomaly-1: consumer id-k-acme: ") != NULL
              && strstr(q->body, "x its baseline of ") != NULL
              && strstr(q->body, "\"text\":\"[FIRING] anomaly: consumer id-k-acme\"") != NULL,
              "trigger: %s", q->body);
    p = strstr(q->body, "x its baseline of ");
    while (p > q->body && p[-1] != ' ')
        p--;
    factor = atof(p);
    TGH_CHECK(factor >= 10 && factor < 20, "factor %g: %s", factor, q->body);
    TGH_CHECK(occurrences(q->body, "k-acme") == occurrences(q->body, "id-k-acme"),
              "the key itself in the alert: %s", q->body);

    /* back to steady: resolved, with the same incident */
    steady(&a, &b, 20000, resolved);
    TGH_CHECK(sink_count(&snk, SLACK) == 2, "no resolve");
    {
        char *inc = strstr(q->body, "incident tollgate/");
        sink_req *r = sink_get(&snk, SLACK, 1);
        TGH_CHECK(inc != NULL, "%s", q->body);
        TGH_CHECK(strstr(r->body, "[RESOLVED] tollgate anomaly on ") != NULL
                  && strstr(r->body, "/anomaly/consumer id-k-acme/") != NULL, "%s", r->body);
        TGH_CHECK(strncmp(strstr(r->body, "incident tollgate/"), inc,
                          strcspn(inc, "\"")) == 0, "not the same incident:\n%s\n%s",
                  q->body, r->body);
    }
    /* and quiet from then on: globex never alerted */
    steady(&a, &b, 1500, NULL);
    TGH_CHECK(sink_count(&snk, NULL) == 2, "%d messages, expected 2", sink_count(&snk, NULL));
    tgh_conn_close(a.c);
    tgh_conn_close(b.c);
    free(extra);
    sink_stop(&snk);
}
