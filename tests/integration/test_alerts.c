/*
 * test_alerts.c - alerts end to end: the real tollgate binary, real
 * causes (a burst of 429s, redis-server killed and restarted, an upstream
 * killed and restarted, an upstream answering 500s) and a real HTTP(S)
 * sink on loopback that records every request and answers as told.
 *
 * Each rule: exactly one trigger with the exact JSON of its channel, one
 * resolve with the same dedup key.  Transport: retry after 500, 429 with
 * Retry-After, a sink that is down, a sink that never answers (requests
 * through tollgate stay as fast), TLS with the right and a wrong CA.
 * Secrets: no log line, /status or /metrics holds a URL path or a key.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"
#include "sink.h"

/* Strings a test makes live until its end: gc() keeps them, fini frees. */
static void *garbage[512];
static int ngarbage;

static char *
gc(char *p)
{
    if (ngarbage < 512)
        garbage[ngarbage++] = p;
    return p;
}

static void
fini(void)
{
    while (ngarbage > 0)
        free(garbage[--ngarbage]);
    tgh_cleanup();
}

TestSuite(alerts, .fini = fini, .timeout = 240);

#define SLACK_SECRET "T000/B000/SLACKSECRETxyz"
#define PD_KEY       "R0UTINGKEYsecret0123456789abcdef"
#define HOOK_SECRET  "HOOKSECRETpath42"

static sink snk;                        /* the webhook end (sink.h) */

/* ------------------------------------------------------------------ */
/* tollgate with an alerts: section                                     */

static tgh_proc *tg;
static int tg_port, tg_admin;
static char tg_conf_path[512];
static char source[256];                /* "HOST/test-1" */
static tgh_upstream up, rds;

static void
start_tollgate(const char *yaml)
{
    char path[512], host[128];
    FILE *f;

    gethostname(host, sizeof host);
    host[sizeof host - 1] = '\0';
    snprintf(source, sizeof source, "%s/test-1", host);
    for (int attempt = 0; attempt < 3; attempt++) {
        tg_port = tgh_free_port();
        do {
            tg_admin = tgh_free_port();
        } while (tg_admin == tg_port);
        snprintf(path, sizeof path, "%s/alerts-%d.yaml", tgh_tmpdir(), attempt);
        snprintf(tg_conf_path, sizeof tg_conf_path, "%s", path);
        f = fopen(path, "w");
        cr_assert_not_null(f);
        fprintf(f, "listen: [ { address: 127.0.0.1:%d } ]\n"
                "admin: { address: 127.0.0.1:%d }\nworkers: 2\n%s",
                tg_port, tg_admin, yaml);
        fclose(f);
        char *argv[] = { (char *)tgh_env("TG_BINARY"), "-c", path, NULL };
        tg = tgh_spawn("tollgate", argv);
        cr_assert_not_null(tg);
        uint64_t end = tgh_now_ms() + 20000;
        while (tgh_now_ms() < end && tgh_proc_alive(tg)) {
            if (tgh_port_listening(tg_port) && tgh_port_accepts(tg_admin))
                return;
            tgh_sleep_ms(20);
        }
        tgh_proc_dump_log(tg, 4000);
        tgh_proc_stop(tg, 3000);
    }
    cr_assert_fail("tollgate did not start");
}

/* The common part of a config: the channels at the sink, instance,
 * fast evaluation.  scheme "http" or "https". */
static char *
channels_yaml(const char *scheme, int port, const char *extra)
{
    return gc(tgh_strf(
        "alerts:\n"
        "  slack: { webhook_url: \"%s://127.0.0.1:%d/slack/" SLACK_SECRET "\" }\n"
        "  pagerduty: { routing_key: \"" PD_KEY "\", url: \"%s://127.0.0.1:%d/pd\" }\n"
        "  webhook: { url: \"%s://127.0.0.1:%d/hook/" HOOK_SECRET "\" }\n"
        "  instance: test-1\n"
        "  evaluate_ms: 50\n"
        "  backoff_ms: 100\n"
        "%s",
        scheme, port, scheme, port, scheme, port, extra));
}

static int
get(const char *path)
{
    tgh_resp r;
    int st;

    if (tgh_http(tg_port, "GET", path, NULL, NULL, 0, &r, 10000) != 0)
        return -1;
    st = r.status;
    tgh_resp_free(&r);
    return st;
}

/* The admin page's body (malloc'ed). */
static char *
admin_page(const char *path)
{
    tgh_resp r;
    char *s;

    TGH_CHECK(tgh_http(tg_admin, "GET", path, NULL, NULL, 0, &r, 10000) == 0,
              "GET %s", path);
    s = strdup(r.body ? (char *)r.body : "");
    tgh_resp_free(&r);
    return s;
}

/* tollgate_alerts_total{channel,rule,outcome} from /metrics. */
static long
alerts_metric(const char *channel, const char *rule, const char *outcome)
{
    char want[256], *page = admin_page("/metrics"), *p;
    long v = -1;

    snprintf(want, sizeof want, "tollgate_alerts_total{channel=\"%s\",rule=\"%s\","
             "outcome=\"%s\"} ", channel, rule, outcome);
    p = strstr(page, want);
    if (p != NULL)
        v = atol(p + strlen(want));
    free(page);
    return v;
}

static int
wait_metric(const char *ch, const char *rule, const char *outcome, long n, int ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)ms;
    while (tgh_now_ms() < end) {
        if (alerts_metric(ch, rule, outcome) >= n)
            return 0;
        tgh_sleep_ms(50);
    }
    return -1;
}

static char *
slurp(const char *path)
{
    FILE *f = fopen(path, "r");
    char *buf;
    long n;

    if (f == NULL)
        return strdup("");
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = calloc(1, (size_t)n + 1);
    if (fread(buf, 1, (size_t)n, f) != (size_t)n)
        buf[0] = '\0';
    fclose(f);
    return buf;
}

/* No secret in the log, /status or /metrics. */
static void
no_secrets(void)
{
    static const char *const secrets[] = { SLACK_SECRET, PD_KEY, HOOK_SECRET,
                                           "/slack/", "/hook/" };
    char *pages[3] = { slurp(tg->log_path), admin_page("/status"),
                       admin_page("/metrics") };

    for (size_t i = 0; i < 3; i++) {
        for (size_t j = 0; j < sizeof secrets / sizeof *secrets; j++)
            TGH_CHECK(strstr(pages[i], secrets[j]) == NULL,
                      "%s found in %s", secrets[j],
                      i == 0 ? "the log" : i == 1 ? "/status" : "/metrics");
        free(pages[i]);
    }
}

/* The string value of "key":"..." in a JSON body (malloc'ed), or "". */
static char *
jstr(const char *body, const char *key)
{
    char want[128];
    const char *p, *e;

    snprintf(want, sizeof want, "\"%s\":\"", key);
    p = strstr(body, want);
    if (p == NULL)
        return gc(strdup(""));
    p += strlen(want);
    for (e = p; *e != '\0' && !(*e == '"' && e[-1] != '\\'); e++)
        ;
    return gc(strndup(p, (size_t)(e - p)));
}

/* The raw number after "key": (malloc'ed), or "". */
static char *
jnum(const char *body, const char *key)
{
    char want[128];
    const char *p;

    snprintf(want, sizeof want, "\"%s\":", key);
    p = strstr(body, want);
    if (p == NULL)
        return gc(strdup(""));
    p += strlen(want);
    return gc(strndup(p, strspn(p, "0123456789.-e")));
}

/* The text after prefix up to the next '"' or '\\' (malloc'ed), or "". */
static char *
after(const char *body, const char *prefix)
{
    const char *p = strstr(body, prefix);
    if (p == NULL)
        return gc(strdup(""));
    p += strlen(prefix);
    return gc(strndup(p, strcspn(p, "\"\\")));
}

#define EXPECT_JSON(got, ...)                                                  \
    do {                                                                       \
        char *want_ = tgh_strf(__VA_ARGS__);                                   \
        TGH_CHECK(strcmp((got), want_) == 0, "JSON differs:\n got  %s\n want %s", \
                  (got), want_);                                               \
        free(want_);                                                           \
    } while (0)

/* ------------------------------------------------------------------ */
/* rules                                                                */

static const char *basic_local =
    "upstream: { servers: [127.0.0.1:%d] }\n"
    "store: local\n"
    "rate_limits: { basic: { requests_per_minute: 1, burst_limit: 5 } }\n"
    "auth: { anonymous_tier: basic }\n";

/* A burst of 25 429s -> one Slack trigger; after the window, one resolve. */
Test(alerts, breaches_slack_trigger_and_resolve)
{
    char *base, *ch, *conf;
    sink_req *q;
    int n429 = 0;

    sink_start(&snk, NULL);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    base = gc(tgh_strf(basic_local, up.port));
    ch = channels_yaml("http", snk.port, "  rules:\n"
        "    breaches: { threshold: 10, window_ms: 1500, to: [slack] }\n");
    conf = gc(tgh_strf("%s%s", base, ch));
    start_tollgate(conf);

    for (int i = 0; i < 30; i++)
        n429 += get("/") == 429;
    TGH_CHECK(n429 == 25, "%d 429s of 30, expected 25", n429);
    TGH_CHECK(sink_wait(&snk, "/slack/" SLACK_SECRET, 1, 10000) == 0, "no trigger");
    TGH_CHECK(sink_wait(&snk, "/slack/" SLACK_SECRET, 2, 10000) == 0, "no resolve");

    q = sink_get(&snk, "/slack/" SLACK_SECRET, 0);
    char *n = gc(tgh_strf("%d", atoi(after(q->body, "*Numbers*\\n"))));
    char *since = after(q->body, "*Since*\\n");
    char *inc = after(q->body, "incident ");
    TGH_CHECK(atoi(n) > 10 && atoi(n) <= 25, "count %s", n);
    EXPECT_JSON(q->body,
        "{\"text\":\"[FIRING] tollgate breaches on %s: tier basic: %s 429s in 1500 ms "
        "(threshold 10)\",\"blocks\":[{\"type\":\"header\",\"text\":{\"type\":"
        "\"plain_text\",\"text\":\"[FIRING] breaches: tier basic\"}},{\"type\":"
        "\"section\",\"fields\":[{\"type\":\"mrkdwn\",\"text\":\"*What*\\ntier basic: "
        "%s 429s in 1500 ms (threshold 10)\"},{\"type\":\"mrkdwn\",\"text\":"
        "\"*Where*\\n%s\"},{\"type\":\"mrkdwn\",\"text\":\"*Since*\\n%s\"},"
        "{\"type\":\"mrkdwn\",\"text\":\"*Numbers*\\n%s 429s in 1500 ms (threshold "
        "10)\"}]},{\"type\":\"context\",\"elements\":[{\"type\":\"mrkdwn\",\"text\":"
        "\"incident %s\"}]}]}", source, n, n, source, since, n, inc);
    TGH_CHECK(strncmp(inc, "tollgate/", 9) == 0 && strstr(inc, "/breaches/tier basic/"),
              "incident id %s", inc);

    q = sink_get(&snk, "/slack/" SLACK_SECRET, 1);
    char *lasted = gc(tgh_strf("%d", atoi(after(q->body, "*Numbers*\\nlasted "))));
    EXPECT_JSON(q->body,
        "{\"text\":\"[RESOLVED] tollgate breaches on %s: back to normal\",\"blocks\":"
        "[{\"type\":\"header\",\"text\":{\"type\":\"plain_text\",\"text\":"
        "\"[RESOLVED] breaches: tier basic\"}},{\"type\":\"section\",\"fields\":["
        "{\"type\":\"mrkdwn\",\"text\":\"*What*\\nback to normal\"},{\"type\":"
        "\"mrkdwn\",\"text\":\"*Where*\\n%s\"},{\"type\":\"mrkdwn\",\"text\":"
        "\"*Since*\\n%s\"},{\"type\":\"mrkdwn\",\"text\":\"*Numbers*\\nlasted %s s\"}]},"
        "{\"type\":\"context\",\"elements\":[{\"type\":\"mrkdwn\",\"text\":"
        "\"incident %s\"}]}]}", source, source, since, lasted, inc);

    /* once: nothing more while calm */
    tgh_sleep_ms(1000);
    TGH_CHECK(sink_count(&snk, NULL) == 2, "%d messages, expected 2", sink_count(&snk, NULL));
    TGH_CHECK(alerts_metric("slack", "breaches", "sent") == 2, "sent counter");
    no_secrets();
    sink_stop(&snk);
}

/* Redis killed: redis_down after after_ms (Slack + PagerDuty) and the
 * Redis breaker (PagerDuty); Redis back: each resolved with its key. */
Test(alerts, redis_down_and_breaker_pagerduty)
{
    char *conf;

    sink_start(&snk, NULL);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server");
    conf = gc(tgh_strf(
        "upstream: { servers: [127.0.0.1:%d] }\n"
        "store: redis\n"
        "redis: { url: \"redis://127.0.0.1:%d/0\", timeout_ms: 50, on_failure: local }\n"
        "rate_limits: { basic: { requests_per_minute: 6000, burst_limit: 1000 } }\n"
        "auth: { anonymous_tier: basic }\n%s", up.port, rds.port,
        channels_yaml("http", snk.port, "  rules:\n"
            "    redis_down: { after_ms: 600, to: [slack, pagerduty] }\n"
            "    breaker_open: { to: [pagerduty] }\n")));
    start_tollgate(conf);
    for (int i = 0; i < 5; i++)
        TGH_CHECK(get("/") == 200, "before the kill");
    TGH_CHECK(sink_count(&snk, NULL) == 0, "alert while healthy");
    /* every worker has seen Redis up (its 50 ms sample): Redis down from
     * the start until then counts as down, so a kill before that sample
     * could fire sooner than 600 ms after the kill, rightly */
    uint64_t up_end = tgh_now_ms() + 10000;
    char *m;
    while ((m = admin_page("/metrics")) != NULL
           && strstr(m, "tollgate_store_mode{mode=\"redis\"} 1") == NULL
           && tgh_now_ms() < up_end) {
        free(m);
        tgh_sleep_ms(10);
    }
    TGH_CHECK(m != NULL && strstr(m, "tollgate_store_mode{mode=\"redis\"} 1") != NULL,
              "tollgate never reported its store as Redis");
    free(m);

    /* the time before the signal: tgh_proc_wait polls every 10 ms, and
     * tollgate may see the connection lost before it returns */
    uint64_t killed = tgh_now_ms(), end = killed + 15000;
    tgh_proc_signal(rds.proc, SIGKILL, 0);
    tgh_proc_wait(rds.proc, 5000);
    while (tgh_now_ms() < end && sink_count(&snk, "/pd") < 2) {
        get("/");                        /* failures open the breaker */
        tgh_sleep_ms(20);
    }
    TGH_CHECK(sink_wait(&snk, "/slack/" SLACK_SECRET, 1, 5000) == 0, "no Slack trigger");
    TGH_CHECK(sink_count(&snk, "/pd") == 2, "%d PagerDuty triggers", sink_count(&snk, "/pd"));

    sink_req *rd = NULL, *bk = NULL;
    for (int k = 0; k < 2; k++) {
        sink_req *q = sink_get(&snk, "/pd", k);
        if (strstr(q->body, "\"class\":\"redis_down\""))
            rd = q;
        else if (strstr(q->body, "\"class\":\"breaker_open\""))
            bk = q;
    }
    TGH_CHECK(rd != NULL && bk != NULL, "one redis_down and one breaker_open trigger");
    TGH_CHECK(rd->at_ms >= killed + 600, "redis_down fired %llu ms after the kill",
              (unsigned long long)(rd->at_ms - killed));
    char *dk = jstr(rd->body, "dedup_key"), *ts = jstr(rd->body, "timestamp");
    char *since = jstr(rd->body, "since"), *down = jnum(rd->body, "down_ms");
    EXPECT_JSON(rd->body,
        "{\"routing_key\":\"" PD_KEY "\",\"event_action\":\"trigger\",\"dedup_key\":"
        "\"%s\",\"payload\":{\"summary\":\"tollgate redis_down: Redis unavailable for "
        "%s ms (after_ms 600); requests use the on_failure policy\",\"source\":\"%s\","
        "\"severity\":\"critical\",\"component\":\"redis\",\"group\":\"tollgate\","
        "\"class\":\"redis_down\",\"timestamp\":\"%s\",\"custom_details\":{\"rule\":"
        "\"redis_down\",\"subject\":\"redis\",\"since\":\"%s\",\"down_ms\":%s,"
        "\"after_ms\":600}}}", dk, down, source, ts, since, down);
    char *bdk = jstr(bk->body, "dedup_key"), *bts = jstr(bk->body, "timestamp");
    char *bsince = jstr(bk->body, "since");
    EXPECT_JSON(bk->body,
        "{\"routing_key\":\"" PD_KEY "\",\"event_action\":\"trigger\",\"dedup_key\":"
        "\"%s\",\"payload\":{\"summary\":\"tollgate breaker_open: Redis circuit breaker "
        "open\",\"source\":\"%s\",\"severity\":\"error\",\"component\":\"redis\","
        "\"group\":\"tollgate\",\"class\":\"breaker_open\",\"timestamp\":\"%s\","
        "\"custom_details\":{\"rule\":\"breaker_open\",\"subject\":\"redis\","
        "\"since\":\"%s\"}}}", bdk, source, bts, bsince);
    TGH_CHECK(strcmp(dk, bdk) != 0, "two incidents, two keys");

    /* /status lists both open incidents, without secrets */
    char *st = admin_page("/status");
    TGH_CHECK(strstr(st, "\"rule\":\"redis_down\"") && strstr(st, "\"rule\":\"breaker_open\""),
              "/status: %s", st);
    free(st);
    no_secrets();

    /* a reload keeps the open incidents: no new trigger, same keys later */
    tgh_proc_signal(tg, SIGHUP, 0);
    uint64_t hup_end = tgh_now_ms() + 10000;
    char *log = NULL;
    while (tgh_now_ms() < hup_end) {
        free(log);
        log = slurp(tg->log_path);
        if (strstr(log, "SIGHUP: configuration reloaded"))
            break;
        tgh_sleep_ms(50);
    }
    TGH_CHECK(strstr(log, "SIGHUP: configuration reloaded") != NULL, "no reload");
    free(log);
    for (int i = 0; i < 10; i++) {
        get("/");
        tgh_sleep_ms(20);
    }
    TGH_CHECK(sink_count(&snk, NULL) == 3, "%d messages after the reload, expected 3",
              sink_count(&snk, NULL));

    TGH_CHECK(tgh_redis_start(&rds) == 0, "redis-server restart");
    end = tgh_now_ms() + 20000;
    while (tgh_now_ms() < end && sink_count(&snk, "/pd") < 4) {
        get("/");                        /* lets the breaker probe */
        tgh_sleep_ms(20);
    }
    TGH_CHECK(sink_count(&snk, "/pd") == 4, "%d PagerDuty messages", sink_count(&snk, "/pd"));
    int resolved_rd = 0, resolved_bk = 0;
    for (int k = 2; k < 4; k++) {
        sink_req *q = sink_get(&snk, "/pd", k);
        char *key = jstr(q->body, "dedup_key");
        char *want = tgh_strf("{\"routing_key\":\"" PD_KEY "\",\"event_action\":"
                              "\"resolve\",\"dedup_key\":\"%s\"}", key);
        TGH_CHECK(strcmp(q->body, want) == 0, "resolve: %s", q->body);
        resolved_rd += strcmp(key, dk) == 0;
        resolved_bk += strcmp(key, bdk) == 0;
        free(want);
    }
    TGH_CHECK(resolved_rd == 1 && resolved_bk == 1, "each incident resolved once");
    TGH_CHECK(sink_wait(&snk, "/slack/" SLACK_SECRET, 2, 5000) == 0, "no Slack resolve");
    TGH_CHECK(strstr(sink_get(&snk, "/slack/" SLACK_SECRET, 1)->body, "[RESOLVED] "
              "tollgate redis_down") != NULL, "Slack resolve");
    tgh_sleep_ms(500);
    TGH_CHECK(sink_count(&snk, NULL) == 6, "%d messages, expected 6", sink_count(&snk, NULL));
    st = admin_page("/status");
    TGH_CHECK(strstr(st, "\"alerts\":{\"open\":[]}") != NULL, "/status: %s", st);
    free(st);
    no_secrets();
    sink_stop(&snk);
}

/* An upstream killed: its breaker opens (PagerDuty trigger); back: it
 * closes (resolve, same key). */
Test(alerts, upstream_breaker_pagerduty)
{
    char *conf;
    int port;

    sink_start(&snk, NULL);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    port = up.port;
    conf = gc(tgh_strf(
        "upstream: { servers: [127.0.0.1:%d], connect_timeout_ms: 500,"
        " breaker: { failures: 2, open_ms: 300, max_open_ms: 300 } }\n"
        "store: local\n"
        "rate_limits: { basic: { requests_per_minute: 6000, burst_limit: 1000 } }\n"
        "auth: { anonymous_tier: basic }\n%s", port,
        channels_yaml("http", snk.port, "  rules:\n    breaker_open: { to: [pagerduty] }\n")));
    start_tollgate(conf);
    TGH_CHECK(get("/") == 200, "before the kill");

    tgh_proc_signal(up.proc, SIGKILL, 0);
    tgh_proc_wait(up.proc, 5000);
    uint64_t end = tgh_now_ms() + 15000;
    while (tgh_now_ms() < end && sink_count(&snk, "/pd") < 1) {
        get("/");
        tgh_sleep_ms(20);
    }
    TGH_CHECK(sink_count(&snk, "/pd") == 1, "no trigger");
    sink_req *q = sink_get(&snk, "/pd", 0);
    char *dk = jstr(q->body, "dedup_key"), *ts = jstr(q->body, "timestamp");
    char *since = jstr(q->body, "since");
    EXPECT_JSON(q->body,
        "{\"routing_key\":\"" PD_KEY "\",\"event_action\":\"trigger\",\"dedup_key\":"
        "\"%s\",\"payload\":{\"summary\":\"tollgate breaker_open: upstream "
        "127.0.0.1:%d: circuit breaker open\",\"source\":\"%s\",\"severity\":\"error\","
        "\"component\":\"upstream 127.0.0.1:%d\",\"group\":\"tollgate\",\"class\":"
        "\"breaker_open\",\"timestamp\":\"%s\",\"custom_details\":{\"rule\":"
        "\"breaker_open\",\"subject\":\"upstream 127.0.0.1:%d\",\"since\":\"%s\"}}}",
        dk, port, source, port, ts, port, since);

    TGH_CHECK(tgh_testup_start_port(&up, port) == 0, "tg-testup restart");
    end = tgh_now_ms() + 15000;
    while (tgh_now_ms() < end && sink_count(&snk, "/pd") < 2) {
        get("/");
        tgh_sleep_ms(20);
    }
    TGH_CHECK(sink_count(&snk, "/pd") == 2, "no resolve");
    EXPECT_JSON(sink_get(&snk, "/pd", 1)->body, "{\"routing_key\":\"" PD_KEY "\","
                "\"event_action\":\"resolve\",\"dedup_key\":\"%s\"}", dk);
    tgh_sleep_ms(500);
    TGH_CHECK(sink_count(&snk, NULL) == 2, "%d messages", sink_count(&snk, NULL));
    no_secrets();
    sink_stop(&snk);
}

/* An upstream answering 500s: the 5xx share passes ratio (webhook). */
Test(alerts, upstream_errors_webhook)
{
    char *conf;

    sink_start(&snk, NULL);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    conf = gc(tgh_strf(
        "upstream: { servers: [127.0.0.1:%d] }\n"
        "store: local\n"
        "rate_limits: { basic: { requests_per_minute: 6000, burst_limit: 1000 } }\n"
        "auth: { anonymous_tier: basic }\n%s", up.port,
        channels_yaml("http", snk.port, "  rules:\n"
            "    upstream_errors: { ratio: 0.5, window_ms: 1500, min_requests: 10, "
            "to: [webhook] }\n")));
    start_tollgate(conf);
    for (int i = 0; i < 5; i++)
        TGH_CHECK(get("/") == 200, "ok request");
    for (int i = 0; i < 20; i++)
        TGH_CHECK(get("/status?code=500") == 500, "500 relayed");
    const char *path = "/hook/" HOOK_SECRET;
    TGH_CHECK(sink_wait(&snk, path, 1, 10000) == 0, "no trigger");
    TGH_CHECK(sink_wait(&snk, path, 2, 10000) == 0, "no resolve");

    sink_req *q = sink_get(&snk, path, 0);
    char *inc = jstr(q->body, "incident"), *started = jstr(q->body, "started_at");
    char *sent = jstr(q->body, "sent_at"), *share = jnum(q->body, "share");
    char *reqs = jnum(q->body, "requests");
    char *errs = gc(tgh_strf("%d", atoi(after(q->body, "upstream errors: "))));
    EXPECT_JSON(q->body,
        "{\"version\":1,\"status\":\"firing\",\"repeat\":false,\"rule\":"
        "\"upstream_errors\",\"subject\":\"upstream\",\"incident\":\"%s\",\"summary\":"
        "\"upstream errors: %s of %s requests 5xx in 1500 ms (ratio 0.5)\",\"source\":"
        "\"%s\",\"severity\":\"error\",\"started_at\":\"%s\",\"resolved_at\":null,"
        "\"sent_at\":\"%s\",\"details\":{\"rule\":\"upstream_errors\",\"subject\":"
        "\"upstream\",\"since\":\"%s\",\"share\":%s,\"ratio\":0.5,\"requests\":%s,"
        "\"window_ms\":1500}}", inc, errs, reqs, source, started, sent, started,
        share, reqs);
    TGH_CHECK(atof(share) > 0.5, "share %s", share);

    q = sink_get(&snk, path, 1);
    TGH_CHECK(strstr(q->body, "\"status\":\"resolved\"") != NULL, "resolve: %s", q->body);
    char *inc2 = jstr(q->body, "incident");
    TGH_CHECK(strcmp(inc, inc2) == 0, "same incident: %s vs %s", inc, inc2);
    char *rat = jstr(q->body, "resolved_at");
    TGH_CHECK(rat[0] != '\0', "resolved_at");
    tgh_sleep_ms(500);
    TGH_CHECK(sink_count(&snk, NULL) == 2, "%d messages", sink_count(&snk, NULL));
    no_secrets();
    sink_stop(&snk);
}

/* ------------------------------------------------------------------ */
/* transport                                                            */

/* A breaches trigger to the webhook channel with the given knobs. */
static void
start_webhook_breach(const char *scheme, int port, const char *knobs)
{
    char *conf;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    conf = gc(tgh_strf("%s%s%s", gc(tgh_strf(basic_local, up.port)),
        channels_yaml(scheme, port, "  rules:\n"
            "    breaches: { threshold: 3, window_ms: 60000, to: [webhook] }\n"),
        knobs));
    start_tollgate(conf);
    for (int i = 0; i < 10; i++)
        get("/");
}

Test(alerts, retry_after_500_then_delivered)
{
    const char *path = "/hook/" HOOK_SECRET;

    sink_start(&snk, NULL);
    snk.script[0] = 500;
    snk.nscript = 1;
    start_webhook_breach("http", snk.port, "");
    TGH_CHECK(sink_wait(&snk, path, 2, 10000) == 0, "no retry");
    TGH_CHECK(strcmp(sink_get(&snk, path, 0)->body, sink_get(&snk, path, 1)->body) == 0,
              "the retry carries the same message");
    TGH_CHECK(wait_metric("webhook", "breaches", "sent", 1, 5000) == 0, "sent");
    TGH_CHECK(alerts_metric("webhook", "breaches", "retried") == 1, "retried 1");
    TGH_CHECK(alerts_metric("webhook", "breaches", "dropped") == 0, "dropped 0");
    no_secrets();
    sink_stop(&snk);
}

/* Rewrite the running config (same listeners) and SIGHUP; wait for the
 * reload line number `nth` (1-based). */
static void
reload_with(const char *yaml, int nth)
{
    FILE *f = fopen(tg_conf_path, "w");
    uint64_t end = tgh_now_ms() + 10000;
    char *log = NULL;
    int n = 0;

    cr_assert_not_null(f);
    fprintf(f, "listen: [ { address: 127.0.0.1:%d } ]\n"
            "admin: { address: 127.0.0.1:%d }\nworkers: 2\n%s", tg_port, tg_admin, yaml);
    fclose(f);
    tgh_proc_signal(tg, SIGHUP, 0);
    while (tgh_now_ms() < end && n < nth) {
        free(log);
        log = slurp(tg->log_path);
        n = 0;
        for (char *p = log; (p = strstr(p, "SIGHUP: configuration reloaded")); p++)
            n++;
        tgh_sleep_ms(50);
    }
    free(log);
    TGH_CHECK(n >= nth, "reload %d not seen", nth);
}

/* A reload that removes the rule resolves its open incident. */
Test(alerts, reload_without_the_rule_resolves)
{
    const char *path = "/hook/" HOOK_SECRET;
    char *base;

    sink_start(&snk, NULL);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    base = gc(tgh_strf(basic_local, up.port));
    start_tollgate(gc(tgh_strf("%s%s", base, channels_yaml("http", snk.port,
        "  rules:\n    breaches: { threshold: 3, window_ms: 60000, to: [webhook] }\n"))));
    for (int i = 0; i < 15; i++)
        get("/");
    TGH_CHECK(sink_wait(&snk, path, 1, 10000) == 0, "no trigger");
    /* same rule, other numbers: stays open, nothing sent */
    reload_with(gc(tgh_strf("%s%s", base, channels_yaml("http", snk.port,
        "  rules:\n    breaches: { threshold: 4, window_ms: 60000, to: [webhook] }\n"))), 1);
    tgh_sleep_ms(300);
    TGH_CHECK(sink_count(&snk, NULL) == 1, "%d messages after a reload", sink_count(&snk, NULL));
    reload_with(gc(tgh_strf("%s%s", base, channels_yaml("http", snk.port,
        "  rules:\n    redis_down: { to: [webhook] }\n"))), 2);
    TGH_CHECK(sink_wait(&snk, path, 2, 10000) == 0, "no resolve");
    sink_req *q = sink_get(&snk, path, 1);
    TGH_CHECK(strstr(q->body, "\"status\":\"resolved\""), "%s", q->body);
    TGH_CHECK(strcmp(jstr(q->body, "incident"), jstr(sink_get(&snk, path, 0)->body,
                     "incident")) == 0, "same incident");
    char *st = admin_page("/status");
    TGH_CHECK(strstr(st, "\"alerts\":{\"open\":[]}") != NULL, "/status: %s", st);
    free(st);
    sink_stop(&snk);
}

Test(alerts, client_error_not_retried)
{
    const char *path = "/hook/" HOOK_SECRET;

    sink_start(&snk, NULL);
    snk.script[0] = 403;
    snk.nscript = 1;
    start_webhook_breach("http", snk.port, "");
    TGH_CHECK(wait_metric("webhook", "breaches", "dropped", 1, 10000) == 0, "not dropped");
    tgh_sleep_ms(500);
    TGH_CHECK(sink_count(&snk, path) == 1, "%d tries, a 403 is final", sink_count(&snk, path));
    TGH_CHECK(alerts_metric("webhook", "breaches", "retried") == 0, "retried");
    char *log = slurp(tg->log_path);
    TGH_CHECK(strstr(log, "alerts: webhook: message dropped after 1 try: HTTP 403"),
              "log:\n%s", log);
    free(log);
    sink_stop(&snk);
}

/* While an incident lasts it is repeated, at most every cooldown_ms,
 * with its one incident id; then resolved once. */
Test(alerts, cooldown_repeats_while_open)
{
    const char *path = "/hook/" HOOK_SECRET;
    int n, repeats = 0;

    sink_start(&snk, NULL);
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    start_tollgate(gc(tgh_strf("%s%s", gc(tgh_strf(basic_local, up.port)),
        channels_yaml("http", snk.port, "  cooldown_ms: 600\n  rules:\n"
            "    breaches: { threshold: 3, window_ms: 2500, to: [webhook] }\n"))));
    for (int i = 0; i < 15; i++)
        get("/");
    TGH_CHECK(sink_wait(&snk, path, 1, 10000) == 0, "no trigger");
    uint64_t end = tgh_now_ms() + 15000;
    while (tgh_now_ms() < end) {
        n = sink_count(&snk, path);
        if (n > 0 && strstr(sink_get(&snk, path, n - 1)->body, "\"status\":\"resolved\""))
            break;
        tgh_sleep_ms(50);
    }
    n = sink_count(&snk, path);
    char *inc = jstr(sink_get(&snk, path, 0)->body, "incident");
    for (int k = 0; k < n; k++) {
        sink_req *q = sink_get(&snk, path, k);
        TGH_CHECK(strcmp(jstr(q->body, "incident"), inc) == 0, "one incident id");
        if (k > 0 && k < n - 1)          /* the resolve is not held back */
            TGH_CHECK(q->at_ms - sink_get(&snk, path, k - 1)->at_ms >= 450,
                      "message %d only %llu ms after the previous one", k,
                      (unsigned long long)(q->at_ms - sink_get(&snk, path, k - 1)->at_ms));
        if (k > 0 && k < n - 1) {
            TGH_CHECK(strstr(q->body, "\"status\":\"firing\",\"repeat\":true"),
                      "repeat %d: %s", k, q->body);
            repeats++;
        }
    }
    TGH_CHECK(strstr(sink_get(&snk, path, 0)->body, "\"repeat\":false"), "trigger");
    TGH_CHECK(strstr(sink_get(&snk, path, n - 1)->body, "\"status\":\"resolved\""),
              "no resolve");
    /* open ~2.5 s with a 600 ms cooldown: 2..5 repeats (slow ticks) */
    TGH_CHECK(repeats >= 2 && repeats <= 5, "%d repeats", repeats);
    sink_stop(&snk);
}

Test(alerts, retry_after_429_honours_retry_after)
{
    const char *path = "/hook/" HOOK_SECRET;

    sink_start(&snk, NULL);
    snk.script[0] = 429;
    snk.nscript = 1;
    snk.retry_after = 2;
    start_webhook_breach("http", snk.port, "");
    TGH_CHECK(sink_wait(&snk, path, 2, 15000) == 0, "no retry");
    uint64_t gap = sink_get(&snk, path, 1)->at_ms - sink_get(&snk, path, 0)->at_ms;
    TGH_CHECK(gap >= 1950, "retried after %llu ms, Retry-After was 2 s",
              (unsigned long long)gap);
    TGH_CHECK(wait_metric("webhook", "breaches", "sent", 1, 5000) == 0, "sent");
    sink_stop(&snk);
}

Test(alerts, sink_down_dropped_and_counted)
{
    int port = tgh_free_port();          /* nobody listens there */
    char *log;

    start_webhook_breach("http", port, "  max_tries: 3\n");
    TGH_CHECK(wait_metric("webhook", "breaches", "dropped", 1, 10000) == 0, "not dropped");
    TGH_CHECK(alerts_metric("webhook", "breaches", "retried") == 2, "retried %ld",
              alerts_metric("webhook", "breaches", "retried"));
    TGH_CHECK(alerts_metric("webhook", "breaches", "sent") == 0, "sent");
    log = slurp(tg->log_path);
    TGH_CHECK(strstr(log, "alerts: webhook: message dropped after 3 tries: "
                     "Couldn't connect to server") != NULL, "log:\n%s", log);
    free(log);
    no_secrets();
}

static int
cmp_long(const void *a, const void *b)
{
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

/* p99 in ms of n sequential requests on fresh connections. */
static long
p99(int n)
{
    long ms[400];

    for (int i = 0; i < n; i++) {
        uint64_t t0 = tgh_now_ms();
        TGH_CHECK(get("/health") > 0, "request %d", i);
        ms[i] = (long)(tgh_now_ms() - t0);
    }
    qsort(ms, (size_t)n, sizeof *ms, cmp_long);
    return ms[n * 99 / 100];
}

Test(alerts, hung_sink_never_slows_requests)
{
    const char *path = "/hook/" HOOK_SECRET;
    char *conf;
    long before, during;

    sink_start(&snk, NULL);
    snk.hang = 1;
    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    conf = gc(tgh_strf("%s%s", gc(tgh_strf(
        "upstream: { servers: [127.0.0.1:%d] }\nstore: local\n"
        "rate_limits: { basic: { requests_per_minute: 60000, burst_limit: 10000 },"
        " tiny: { requests_per_minute: 1, burst_limit: 1 } }\n"
        "auth: { anonymous_tier: basic }\n", up.port)),
        channels_yaml("http", snk.port, "  timeout_ms: 8000\n  max_tries: 1\n"
            "  rules:\n    upstream_errors: { ratio: 0.01, window_ms: 60000, "
            "min_requests: 5, to: [webhook] }\n")));
    start_tollgate(conf);
    before = p99(200);
    for (int i = 0; i < 10; i++)
        get("/status?code=500");
    TGH_CHECK(sink_wait(&snk, path, 1, 10000) == 0, "the alert never reached the sink");
    uint64_t t_sent = sink_get(&snk, path, 0)->at_ms;
    during = p99(200);
    TGH_CHECK(tgh_now_ms() < t_sent + 8000, "the measure outlasted the transfer");
    cr_log_info("p99 of 200 requests: %ld ms before, %ld ms with a hung sink",
                before, during);
    TGH_CHECK(during <= before * 3 + 50, "p99 %ld ms with a hung sink, %ld ms before",
              during, before);
    TGH_CHECK(wait_metric("webhook", "upstream_errors", "dropped", 1, 15000) == 0,
              "the transfer never timed out");
    uint64_t waited = tgh_now_ms() - t_sent;
    TGH_CHECK(waited >= 7000, "timed out after %llu ms (timeout_ms 8000)",
              (unsigned long long)waited);
    char *log = slurp(tg->log_path);
    TGH_CHECK(strstr(log, "Timeout was reached") != NULL, "log:\n%s", log);
    free(log);
    sink_stop(&snk);
}

/* ------------------------------------------------------------------ */
/* TLS                                                                  */

/* A CA (ca.pem) and a server cert for 127.0.0.1 signed by it, plus an
 * unrelated CA (other.pem), in dir. */
static void
make_pki(const char *dir)
{
    char *cmd = tgh_strf(
        "cd %s && "
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem "
        "-days 2 -subj /CN=tollgate-test-ca 2>/dev/null && "
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other.pem "
        "-days 2 -subj /CN=other-ca 2>/dev/null && "
        "openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr "
        "-subj /CN=127.0.0.1 2>/dev/null && "
        "printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext && "
        "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial "
        "-out srv.pem -days 2 -extfile san.ext 2>/dev/null", dir);
    TGH_CHECK(tgh_sh(NULL, 0, "%s", cmd) == 0, "openssl: %s", cmd);
    free(cmd);
}

static SSL_CTX *
server_ctx(const char *dir)
{
    SSL_CTX *c = SSL_CTX_new(TLS_server_method());
    char *crt = tgh_strf("%s/srv.pem", dir), *key = tgh_strf("%s/srv.key", dir);

    TGH_CHECK(SSL_CTX_use_certificate_file(c, crt, SSL_FILETYPE_PEM) == 1, "cert");
    TGH_CHECK(SSL_CTX_use_PrivateKey_file(c, key, SSL_FILETYPE_PEM) == 1, "key");
    free(crt);
    free(key);
    return c;
}

Test(alerts, https_sink_with_ca_file)
{
    const char *dir = tgh_tmpdir();
    const char *path = "/hook/" HOOK_SECRET;
    char *knobs;

    make_pki(dir);
    sink_start(&snk, server_ctx(dir));
    knobs = gc(tgh_strf("  ca_file: %s/ca.pem\n", dir));
    start_webhook_breach("https", snk.port, knobs);
    TGH_CHECK(sink_wait(&snk, path, 1, 10000) == 0, "not delivered over TLS");
    TGH_CHECK(strstr(sink_get(&snk, path, 0)->body, "\"rule\":\"breaches\"") != NULL,
              "body");
    TGH_CHECK(wait_metric("webhook", "breaches", "sent", 1, 5000) == 0, "sent");
    TGH_CHECK(snk.tls_failed == 0, "handshake failures");
    no_secrets();
    sink_stop(&snk);
    SSL_CTX_free(snk.tls);
}

Test(alerts, https_sink_wrong_ca_refused)
{
    const char *dir = tgh_tmpdir();
    char *knobs;

    make_pki(dir);
    sink_start(&snk, server_ctx(dir));
    knobs = gc(tgh_strf("  ca_file: %s/other.pem\n", dir));
    start_webhook_breach("https", snk.port, knobs);
    TGH_CHECK(wait_metric("webhook", "breaches", "dropped", 1, 10000) == 0, "not dropped");
    TGH_CHECK(alerts_metric("webhook", "breaches", "retried") == 0,
              "a certificate failure is not retried");
    TGH_CHECK(sink_count(&snk, NULL) == 0, "the sink got a request in clear");
    TGH_CHECK(snk.tls_failed >= 1, "no handshake was tried");
    no_secrets();
    sink_stop(&snk);
    SSL_CTX_free(snk.tls);
}

/* ------------------------------------------------------------------ */
/* tollgate alert-test                                                  */

static int
alert_test(const char *conf_path, const char *channel, char **out)
{
    char *argv[] = { (char *)tgh_env("TG_BINARY"), "alert-test", "-c",
                     (char *)conf_path, channel ? "--channel" : NULL,
                     (char *)channel, NULL };
    tgh_proc *p = tgh_spawn("alert-test", argv);

    TGH_CHECK(p != NULL, "spawn");
    TGH_CHECK(tgh_proc_wait(p, 30000) == 0, "alert-test did not finish");
    *out = slurp(p->log_path);
    return WIFEXITED(p->status) ? WEXITSTATUS(p->status) : -1;
}

Test(alerts, alert_test_cli)
{
    char *path = gc(tgh_strf("%s/alert-test.yaml", tgh_tmpdir())), *out;
    char *secret = gc(tgh_strf("%s/slack-url", tgh_tmpdir()));
    FILE *f;
    int rc;

    sink_start(&snk, NULL);
    /* the Slack URL from a file, as with systemd LoadCredential= */
    f = fopen(secret, "w");
    fprintf(f, "http://127.0.0.1:%d/slack/" SLACK_SECRET "\n", snk.port);
    fclose(f);
    f = fopen(path, "w");
    fprintf(f, "listen: [ { address: 127.0.0.1:1 } ]\n"
            "upstream: { servers: [127.0.0.1:2] }\nstore: local\n"
            "alerts:\n  slack: { webhook_url_file: %s }\n"
            "  pagerduty: { routing_key: \"" PD_KEY "\", url: \"http://127.0.0.1:%d/pd\" }\n"
            "  webhook: { url: \"http://127.0.0.1:%d/hook/" HOOK_SECRET "\" }\n"
            "  instance: test-1\n", secret, snk.port, snk.port);
    fclose(f);

    rc = alert_test(path, NULL, &out);
    TGH_CHECK(rc == 0, "exit %d:\n%s", rc, out);
    TGH_CHECK(strstr(out, "slack: delivered\n") && strstr(out, "pagerduty: delivered\n")
              && strstr(out, "webhook: delivered\n"), "output:\n%s", out);
    TGH_CHECK(strstr(out, SLACK_SECRET) == NULL && strstr(out, PD_KEY) == NULL,
              "a secret in the output:\n%s", out);
    free(out);
    TGH_CHECK(sink_count(&snk, "/slack/" SLACK_SECRET) == 1
              && sink_count(&snk, "/pd") == 1
              && sink_count(&snk, "/hook/" HOOK_SECRET) == 1
              && sink_count(&snk, NULL) == 3, "one message per channel");
    TGH_CHECK(strstr(sink_get(&snk, "/pd", 0)->body, "\"routing_key\":\"" PD_KEY "\"")
              != NULL, "routing key sent");

    rc = alert_test(path, "webhook", &out);
    TGH_CHECK(rc == 0 && strstr(out, "webhook: delivered\n") && !strstr(out, "slack"),
              "exit %d:\n%s", rc, out);
    free(out);
    TGH_CHECK(sink_count(&snk, NULL) == 4, "--channel sends one");

    sink_stop(&snk);
    rc = alert_test(path, NULL, &out);
    TGH_CHECK(rc == 1, "sink down: exit %d:\n%s", rc, out);
    TGH_CHECK(strstr(out, "webhook: FAILED: Couldn't connect to server") != NULL,
              "output:\n%s", out);
    TGH_CHECK(strstr(out, SLACK_SECRET) == NULL && strstr(out, PD_KEY) == NULL
              && strstr(out, HOOK_SECRET) == NULL, "a secret in the output:\n%s", out);
    free(out);
}
