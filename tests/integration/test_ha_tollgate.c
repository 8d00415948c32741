/*
 * test_ha_tollgate.c - the real tollgate binary charging its token buckets
 * in Redis Sentinel (a master, a replica, three sentinels; the master is
 * killed with SIGKILL) and Redis Cluster (three masters; buckets spread over
 * the slots; a slot migrated under a live key).
 *
 * redis.on_failure is deny: a request Redis could not charge is a 503, so
 * exact 200/429 counts prove Redis did the charging.  Buckets are checked
 * on the Redis nodes themselves with redis-cli.
 *
 * Every process is spawned by the harness (own process group, SIGKILL on
 * parent death) on ephemeral loopback ports, with its files in the
 * harness's temporary directory, and killed by tgh_cleanup().  Waits are
 * bounded polls with short intervals; nothing sleeps for a fixed time.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

#define NSLOTS    16384

TestSuite(ha_tollgate, .fini = tgh_cleanup, .timeout = 240);

static tgh_upstream up;
static tgh_tollgate tg;

/* ------------------------------------------------------------------ */
/* keys                                                                */

#define NCLUSTER_KEYS 30

static const char *const sentinel_ids[] = { "ha-a", "ha-b", "ha-c" };

static void
cluster_id(int i, char *buf, size_t len)
{
    snprintf(buf, len, "c-%02d", i);
}

/* The secret of a key id (what the client sends as X-API-Key). */
static void
secret_of(const char *id, char *buf, size_t len)
{
    snprintf(buf, len, "secret-%s", id);
}

static void
key_line_tier(FILE *f, const char *id, const char *tier)
{
    char secret[64];
    unsigned char d[32];

    secret_of(id, secret, sizeof secret);
    SHA256((const unsigned char *)secret, strlen(secret), d);
    fprintf(f, "  - { id: %s, tier: %s, sha256: \"", id, tier);
    for (int j = 0; j < 32; j++)
        fprintf(f, "%02x", d[j]);
    fputs("\" }\n", f);
}

static void
key_line(FILE *f, const char *id)
{
    key_line_tier(f, id, "basic");
}

/* keys.yaml with every id used here; returns its absolute path. */
static const char *
keys_file(void)
{
    static char path[512];
    char id[32];
    FILE *f;

    snprintf(path, sizeof path, "%s/hakeys.yaml", tgh_tmpdir());
    f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs("keys:\n", f);
    for (size_t i = 0; i < sizeof sentinel_ids / sizeof sentinel_ids[0]; i++)
        key_line(f, sentinel_ids[i]);
    for (int i = 0; i < NCLUSTER_KEYS; i++) {
        cluster_id(i, id, sizeof id);
        key_line(f, id);
    }
    key_line(f, "c-live");
    key_line(f, "c-other");
    key_line_tier(f, "c-heavy", "heavy");
    cr_assert_eq(fclose(f), 0);
    return path;
}

/* ------------------------------------------------------------------ */
/* tollgate                                                            */

/* One GET / with id's key; returns the status (-1: no response). */
static int
request(const char *id)
{
    char secret[64];
    char *hdr;
    tgh_resp r;
    int rc, st;

    secret_of(id, secret, sizeof secret);
    hdr = tgh_strf("X-API-Key: %s\r\n", secret);
    rc = tgh_http(tg.port, "GET", "/", hdr, NULL, 0, &r, 10000);
    st = rc == 0 ? r.status : -1;
    tgh_resp_free(&r);
    free(hdr);
    return st;
}

typedef struct counts {
    int ok, limited, unavailable, other;
} counts;

static void
count(counts *c, int st)
{
    if (st == 200)
        c->ok++;
    else if (st == 429)
        c->limited++;
    else if (st == 503)
        c->unavailable++;
    else
        c->other++;
}

/* n sequential requests (a fresh connection each: round-robin over the
 * workers), statuses added to *c. */
static void
run(const char *id, int n, counts *c)
{
    for (int i = 0; i < n; i++)
        count(c, request(id));
}

static int
admin_get(const char *path, char *body, size_t len)
{
    tgh_resp r;
    int st = -1;

    if (body != NULL && len > 0)
        body[0] = '\0';
    if (tgh_http(tg.admin_port, "GET", path, NULL, NULL, 0, &r, 5000) == 0) {
        st = r.status;
        if (body != NULL && len > 0 && r.body != NULL)
            snprintf(body, len, "%s", (const char *)r.body);
    }
    tgh_resp_free(&r);
    return st;
}

/* /readyz turns 200 once every worker has its Redis (on_failure deny). */
static void
wait_ready(int timeout_ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    int st = 0;

    while (tgh_now_ms() < end) {
        st = admin_get("/readyz", NULL, 0);
        if (st == 200)
            return;
        tgh_sleep_ms(20);
    }
    TGH_CHECK(0, "tollgate never became ready (/readyz %d)", st);
}

/* Every worker charges in Redis: /readyz 200, /status mode redis and every
 * worker's Redis breaker closed. */
static int
all_workers_on_redis(void)
{
    char body[4096];
    const char *b, *e;

    if (admin_get("/readyz", NULL, 0) != 200)
        return 0;
    if (admin_get("/status", body, sizeof body) != 200)
        return 0;
    if (strstr(body, "\"mode\":\"redis\"") == NULL)
        return 0;
    b = strstr(body, "\"breakers\":[");
    if (b == NULL)
        return 0;
    e = strchr(b, ']');
    if (e == NULL)
        return 0;
    for (const char *p = b; p < e; p++)
        if (strncmp(p, "open", 4) == 0)
            return 0;
    return 1;
}

static const char *g_policy = "deny";  /* redis.on_failure */
static const char *g_more = "";         /* more top-level YAML */

static void
start_tollgate(const char *redis_extra)
{
    static char extra[2048];
    tgh_tg_opts o;

    TGH_CHECK(tgh_testup_start(&up) == 0, "tg-testup");
    /* basic refills a token a minute: the counts are exact */
    snprintf(extra, sizeof extra,
             "rate_limits: { basic: { requests_per_minute: 1, burst_limit: 20 },\n"
             "               heavy: { requests_per_minute: 600000, burst_limit: 100 } }\n"
             "auth: { keys_file: %s }\n"
             "redis: { url: \"redis://127.0.0.1:6379/0\", timeout_ms: 500, "
             "on_failure: %s, %s }\n%s",
             keys_file(), g_policy, redis_extra, g_more);
    tgh_tg_opts_default(&o, up.port);
    o.store = "redis";
    o.extra_yaml = extra;
    TGH_CHECK(tgh_tollgate_start(&tg, &o) == 0, "tollgate");
    wait_ready(15000);
}

/* ------------------------------------------------------------------ */
/* redis processes and redis-cli                                        */

/* A quoted bucket key for redis-cli's shell command line. */
static void
bucket(const char *id, char *buf, size_t len)
{
    snprintf(buf, len, "'tg:{%s}:t'", id);
}

static int
cli_has(int port, const char *needle, const char *args)
{
    char out[8192];

    return tgh_redis_cli(port, out, sizeof out, "%s", args) == 0
           && strstr(out, needle) != NULL;
}

static long
cli_long(int port, const char *fmt, const char *arg)
{
    char out[256];
    char *e;
    long v;

    if (tgh_redis_cli(port, out, sizeof out, fmt, arg) != 0)
        return -1;
    v = strtol(out, &e, 10);
    return e == out ? -1 : v;
}

static int g_ha6;                       /* Cluster of 3 masters + 3 replicas */

/* redis-server on a free port (a replica of 127.0.0.1:replicaof when
 * > 0), its port into *port; waits for it. */
static tgh_proc *
redis_start(int *port, int replicaof)
{
    tgh_upstream u = { 0 };
    tgh_redis_opts o = { .replicaof = replicaof };

    TGH_CHECK(tgh_redis_start_opts(&u, &o) == 0, "redis-server did not start");
    *port = u.port;
    return u.proc;
}

/* ------------------------------------------------------------------ */
/* Sentinel                                                            */

/* SENTINEL master mymaster: the value of field as a number (-1). */
static long
sentinel_field(int port, const char *field)
{
    char out[8192];
    char *line, *save = NULL;
    int next = 0;

    if (tgh_redis_cli(port, out, sizeof out, "SENTINEL master mymaster") != 0)
        return -1;
    for (line = strtok_r(out, "\n", &save); line != NULL;
         line = strtok_r(NULL, "\n", &save)) {
        if (next)
            return strtol(line, NULL, 10);
        next = strcmp(line, field) == 0;
    }
    return -1;
}

/* The master's port the sentinel names (-1). */
static int
sentinel_master_port(int port)
{
    char out[256];
    char *nl;

    if (tgh_redis_cli(port, out, sizeof out, "SENTINEL get-master-addr-by-name mymaster") != 0)
        return -1;
    nl = strchr(out, '\n');
    return nl != NULL ? atoi(nl + 1) : -1;
}

Test(ha_tollgate, sentinel_failover_after_kill_9)
{
    int mport, rport, sport[3];
    char redis_extra[512], key[64], role[256];
    tgh_proc *master;
    counts a = { 0 }, b = { 0 }, settle = { 0 }, c = { 0 };
    uint64_t t0, end;
    int st = 0, attempts = 0, promoted;

    master = redis_start(&mport, 0);
    redis_start(&rport, mport);
    TGH_CHECK(tgh_redis_wait(rport, "master_link_status:up", 15000, "INFO replication"),
              "the replica never linked to the master");

    for (int i = 0; i < 3; i++) {
        tgh_upstream u;
        TGH_CHECK(tgh_sentinel_start(&u, NULL,
                                     "sentinel monitor mymaster 127.0.0.1 %d 2\n"
                                     "sentinel down-after-milliseconds mymaster 1000\n"
                                     "sentinel failover-timeout mymaster 5000\n", mport) == 0,
                  "sentinel %d did not start", i);
        sport[i] = u.port;
    }
    for (int i = 0; i < 3; i++) {
        end = tgh_now_ms() + 20000;
        while (!(sentinel_field(sport[i], "num-other-sentinels") == 2
                 && sentinel_field(sport[i], "num-slaves") == 1)) {
            TGH_CHECK(tgh_now_ms() < end,
                      "sentinel %d never saw the other sentinels and the replica", i);
            tgh_sleep_ms(50);
        }
    }

    snprintf(redis_extra, sizeof redis_extra,
             "sentinel: { master: mymaster, addresses: [127.0.0.1:%d, 127.0.0.1:%d, "
             "127.0.0.1:%d] }", sport[0], sport[1], sport[2]);
    start_tollgate(redis_extra);

    /* key A on the first master: the burst, exactly */
    run(sentinel_ids[0], 40, &a);
    TGH_CHECK(a.ok == 20 && a.limited == 20 && a.unavailable == 0 && a.other == 0,
              "before the failover: %d x 200, %d x 429, %d x 503, %d other "
              "(want 20 / 20 / 0 / 0)", a.ok, a.limited, a.unavailable, a.other);
    bucket(sentinel_ids[0], key, sizeof key);
    TGH_CHECK(cli_long(mport, "EXISTS %s", key) == 1, "key A's bucket is not on the master");

    /* the master dies hard; the sentinels promote the replica */
    tgh_proc_signal(master, SIGKILL, 0);
    TGH_CHECK(tgh_proc_wait(master, 5000) == 0, "the master did not die");
    t0 = tgh_now_ms();
    end = t0 + 40000;
    while (tgh_now_ms() < end) {
        st = request(sentinel_ids[1]);
        attempts++;
        count(&b, st);
        TGH_CHECK(st == 200 || st == 503, "during the failover: status %d (want 200 or 503)",
                  st);
        if (st == 200)
            break;
        tgh_sleep_ms(20);
    }
    TGH_CHECK(st == 200, "no request was charged within 40 s of the kill "
              "(%d attempts, %d x 503)", attempts, b.unavailable);
    cr_log_info("sentinel failover: key B charged after %llu ms, %d attempts, %d x 503 "
                "(deny policy) before it",
                (unsigned long long)(tgh_now_ms() - t0), attempts, b.unavailable);

    /* every worker back on Redis (one worker may have reconnected first);
     * traffic lets an open breaker probe */
    end = tgh_now_ms() + 15000;
    while (!all_workers_on_redis()) {
        TGH_CHECK(tgh_now_ms() < end, "not every worker came back to Redis within 15 s");
        count(&settle, request(sentinel_ids[1]));
        tgh_sleep_ms(20);
    }
    TGH_CHECK(settle.other == 0, "%d responses neither 200, 429 nor 503 while settling",
              settle.other);
    cr_log_info("sentinel failover: every worker on Redis after %llu ms "
                "(%d more requests: %d x 503)", (unsigned long long)(tgh_now_ms() - t0),
                settle.ok + settle.limited + settle.unavailable, settle.unavailable);

    promoted = sentinel_master_port(sport[0]);
    TGH_CHECK(promoted == rport, "the sentinels name port %d as the master, want the "
              "replica's %d", promoted, rport);
    TGH_CHECK(tgh_redis_cli(rport, role, sizeof role, "ROLE") == 0
              && strncmp(role, "master", 6) == 0, "ROLE of the promoted node: %s", role);

    /* key C: exact limits on the promoted replica */
    run(sentinel_ids[2], 40, &c);
    TGH_CHECK(c.ok == 20 && c.limited == 20 && c.unavailable == 0 && c.other == 0,
              "after the failover: %d x 200, %d x 429, %d x 503, %d other "
              "(want 20 / 20 / 0 / 0)", c.ok, c.limited, c.unavailable, c.other);
    bucket(sentinel_ids[2], key, sizeof key);
    TGH_CHECK(cli_long(rport, "EXISTS %s", key) == 1,
              "key C's bucket is not on the new master (port %d)", rport);
    bucket(sentinel_ids[0], key, sizeof key);
    TGH_CHECK(cli_long(rport, "EXISTS %s", key) == 1,
              "key A's bucket was not replicated to the new master");
}

/* ------------------------------------------------------------------ */
/* Cluster                                                             */

static int g_cport[6];
static tgh_proc *g_cproc[6];
static int g_slot_owner[NSLOTS];        /* port of the master serving a slot */

static void
cluster_start(void)
{
    /* replicas: fail over within seconds; the live masters keep serving
     * while one fails over */
    static const char *const ha6[] = {
        "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no",
        "--repl-diskless-sync-delay", "0", NULL,
    };
    tgh_redis_opts o = { .cluster = 1, .args = g_ha6 ? ha6 : NULL };
    int nn = g_ha6 ? 6 : 3;

    for (int i = 0; i < nn; i++) {
        tgh_upstream u = { 0 };
        TGH_CHECK(tgh_redis_start_opts(&u, &o) == 0, "cluster node %d did not start", i);
        g_cport[i] = u.port;
        g_cproc[i] = u.proc;
    }
    TGH_CHECK(tgh_redis_cluster_create(g_cport, nn, g_ha6 ? 1 : 0, NULL) == 0,
              "redis-cli --cluster create failed");
}

/* Fill g_slot_owner from CLUSTER NODES as node `port` sees it. */
static void
load_slot_map(int port)
{
    char out[8192];
    char *line, *save = NULL;
    int covered = 0;

    for (int s = 0; s < NSLOTS; s++)
        g_slot_owner[s] = -1;
    TGH_CHECK(tgh_redis_cli(port, out, sizeof out, "CLUSTER NODES") == 0, "CLUSTER NODES");
    for (line = strtok_r(out, "\n", &save); line != NULL;
         line = strtok_r(NULL, "\n", &save)) {
        char *tok, *save2 = NULL, *colon;
        int field = 0, owner = -1, is_master = 0;

        for (tok = strtok_r(line, " ", &save2); tok != NULL;
             tok = strtok_r(NULL, " ", &save2), field++) {
            if (field == 1) {               /* ip:port@cport */
                colon = strrchr(tok, ':');
                owner = colon != NULL ? atoi(colon + 1) : -1;
            } else if (field == 2) {
                is_master = strstr(tok, "master") != NULL;
            } else if (field >= 8 && is_master && tok[0] != '[') {
                int lo = atoi(tok), hi = lo;
                char *dash = strchr(tok, '-');
                if (dash != NULL)
                    hi = atoi(dash + 1);
                for (int s = lo; s <= hi && s >= 0 && s < NSLOTS; s++)
                    g_slot_owner[s] = owner;
            }
        }
    }
    for (int s = 0; s < NSLOTS; s++)
        covered += g_slot_owner[s] > 0;
    TGH_CHECK(covered == NSLOTS, "CLUSTER NODES covers %d of %d slots", covered, NSLOTS);
}

static int
node_index(int port)
{
    for (int i = 0; i < 3; i++)
        if (g_cport[i] == port)
            return i;
    return -1;
}

/* The index (in g_cport) of the master that serves id's bucket. */
static int
owner_of(const char *id, long *slot_out)
{
    char key[64];
    long slot;
    int at;

    bucket(id, key, sizeof key);
    slot = cli_long(g_cport[0], "CLUSTER KEYSLOT %s", key);
    TGH_CHECK(slot >= 0 && slot < NSLOTS, "CLUSTER KEYSLOT %s: %ld", key, slot);
    at = node_index(g_slot_owner[slot]);
    TGH_CHECK(at >= 0, "slot %ld is served by port %d, not one of ours", slot,
              g_slot_owner[slot]);
    if (slot_out != NULL)
        *slot_out = slot;
    return at;
}

/* Which nodes hold id's bucket: a bit per node index. */
static int
holders(const char *id)
{
    char key[64];
    int mask = 0;

    bucket(id, key, sizeof key);
    for (int i = 0; i < 3; i++)
        if (cli_long(g_cport[i], "EXISTS %s", key) == 1)
            mask |= 1 << i;
    return mask;
}

static void
start_cluster_tollgate(void)
{
    char redis_extra[512];

    cluster_start();
    load_slot_map(g_cport[0]);
    snprintf(redis_extra, sizeof redis_extra,
             "cluster: { nodes: [127.0.0.1:%d, 127.0.0.1:%d, 127.0.0.1:%d] }",
             g_cport[0], g_cport[1], g_cport[2]);
    start_tollgate(redis_extra);
}

Test(ha_tollgate, cluster_buckets_spread_exact_limits)
{
    char id[32];
    int per_node[3] = { 0 };

    start_cluster_tollgate();

    for (int i = 0; i < NCLUSTER_KEYS; i++) {
        counts c = { 0 };
        cluster_id(i, id, sizeof id);
        run(id, 30, &c);
        TGH_CHECK(c.ok == 20 && c.limited == 10 && c.unavailable == 0 && c.other == 0,
                  "%s: %d x 200, %d x 429, %d x 503, %d other (want 20 / 10 / 0 / 0)",
                  id, c.ok, c.limited, c.unavailable, c.other);
    }

    /* each bucket is on the master serving its slot, and only there */
    load_slot_map(g_cport[1]);
    for (int i = 0; i < NCLUSTER_KEYS; i++) {
        long slot;
        int at, mask;

        cluster_id(i, id, sizeof id);
        at = owner_of(id, &slot);
        mask = holders(id);
        TGH_CHECK(mask == 1 << at, "%s (slot %ld): bucket on nodes mask %#x, its slot's "
                  "master is node %d", id, slot, mask, at);
        per_node[at]++;
    }
    for (int i = 0; i < 3; i++)
        TGH_CHECK(per_node[i] > 0, "no bucket on master %d (port %d): %d / %d / %d",
                  i, g_cport[i], per_node[0], per_node[1], per_node[2]);
    cr_log_info("cluster: buckets per master %d / %d / %d", per_node[0], per_node[1],
                per_node[2]);
}

static void
expect_ok(int port, const char *fmt, const char *a, const char *b)
{
    char args[512], out[512];

    snprintf(args, sizeof args, fmt, a, b);
    TGH_CHECK(tgh_redis_cli(port, out, sizeof out, "%s", args) == 0
              && strcmp(out, "OK") == 0, "redis-cli -p %d %s: %s", port, args, out);
}

static void
node_id(int port, char *buf, size_t len)
{
    TGH_CHECK(tgh_redis_cli(port, buf, len, "CLUSTER MYID") == 0 && strlen(buf) == 40,
              "CLUSTER MYID on %d: %s", port, buf);
}

/* The slot of a live key moves to another master in the middle of its
 * requests (IMPORTING/MIGRATING, MIGRATE: ASK; SETSLOT NODE: MOVED), while
 * another key's traffic goes on: no 503, and the counts stay exact. */
Test(ha_tollgate, cluster_slot_migration_under_a_live_key)
{
    const char *live = "c-live", *other = "c-other";
    char key[64], slotstr[16], dstport[16], src_id[64], dst_id[64], args[256], out[256];
    counts c = { 0 }, o = { 0 };
    long slot;
    int src, dst;

    start_cluster_tollgate();

    run(live, 5, &c);
    run(other, 5, &o);
    src = owner_of(live, &slot);
    TGH_CHECK(holders(live) == 1 << src, "the live bucket is not on its slot's master");
    dst = (src + 1) % 3;
    snprintf(slotstr, sizeof slotstr, "%ld", slot);
    snprintf(dstport, sizeof dstport, "%d", g_cport[dst]);
    node_id(g_cport[src], src_id, sizeof src_id);
    node_id(g_cport[dst], dst_id, sizeof dst_id);

    expect_ok(g_cport[dst], "CLUSTER SETSLOT %s IMPORTING %s", slotstr, src_id);
    expect_ok(g_cport[src], "CLUSTER SETSLOT %s MIGRATING %s", slotstr, dst_id);
    run(live, 5, &c);                   /* the key is still on the source */
    run(other, 5, &o);

    bucket(live, key, sizeof key);
    snprintf(args, sizeof args, "MIGRATE 127.0.0.1 %s \"\" 0 5000 KEYS %s", dstport, key);
    TGH_CHECK(tgh_redis_cli(g_cport[src], out, sizeof out, "%s", args) == 0
              && strcmp(out, "OK") == 0, "%s: %s", args, out);
    /* EXISTS would be redirected while the slot is open: count the slot */
    TGH_CHECK(cli_long(g_cport[src], "CLUSTER COUNTKEYSINSLOT %s", slotstr) == 0
              && cli_long(g_cport[dst], "CLUSTER COUNTKEYSINSLOT %s", slotstr) >= 1,
              "the bucket did not move from node %d to node %d", src, dst);
    run(live, 5, &c);                   /* ASK -> the destination */
    run(other, 5, &o);

    for (int i = 0; i < 3; i++) {
        int p = (dst + i) % 3;          /* the new owner first */
        expect_ok(g_cport[p], "CLUSTER SETSLOT %s NODE %s", slotstr, dst_id);
    }
    run(live, 15, &c);                  /* MOVED -> the destination */
    run(other, 15, &o);

    TGH_CHECK(c.ok == 20 && c.limited == 10 && c.unavailable == 0 && c.other == 0,
              "live key across the migration: %d x 200, %d x 429, %d x 503, %d other "
              "(want 20 / 10 / 0 / 0)", c.ok, c.limited, c.unavailable, c.other);
    TGH_CHECK(o.ok == 20 && o.limited == 10 && o.unavailable == 0 && o.other == 0,
              "other key during the migration: %d x 200, %d x 429, %d x 503, %d other "
              "(want 20 / 10 / 0 / 0)", o.ok, o.limited, o.unavailable, o.other);
    load_slot_map(g_cport[src]);
    TGH_CHECK(owner_of(live, NULL) == dst, "the slot map does not name the new owner");
    TGH_CHECK(holders(live) == 1 << dst, "the live bucket is not (only) on the new owner");
    cr_log_info("cluster: slot %ld moved from port %d to %d under the live key",
                slot, g_cport[src], g_cport[dst]);
}

/* ------------------------------------------------------------------ */
/* Cluster with replicas: kill -9 of the master owning {global}        */

typedef struct loader {
    pthread_t tid;
    const char *id;
    volatile int stop;
    counts c;
    long worst_ms;
} loader;

static void *
load_main(void *arg)
{
    loader *l = arg;

    while (!l->stop) {
        uint64_t t0 = tgh_now_ms();
        count(&l->c, request(l->id));
        if ((long)(tgh_now_ms() - t0) > l->worst_ms)
            l->worst_ms = (long)(tgh_now_ms() - t0);
    }
    return NULL;
}

/* A Redis bucket's TAT on port (-1 when absent) and that node's TIME, us. */
static long long
bucket_tat(int port, const char *id, long long *now_us)
{
    char key[64], out[256];
    long long tat;

    bucket(id, key, sizeof key);
    tat = cli_long(port, "GET %s", key);
    if (now_us != NULL) {
        TGH_CHECK(tgh_redis_cli(port, out, sizeof out, "TIME") == 0, "TIME");
        *now_us = atoll(out) * 1000000 + atoll(strchr(out, '\n') + 1);
    }
    return tat;
}

/*
 * Under load (on_failure: local), the master owning {global} dies
 * (kill -9) and its replica is promoted: no request gets an error, a
 * consumer whose bucket lives on a live master keeps being charged in
 * Redis all along (its node's traffic never went to the fallback), the
 * global bucket is charged on the promoted replica within 3 s of the
 * promotion, and the loaded consumer is admitted no more than its
 * bucket allows.
 */
Test(ha_tollgate, cluster_master_of_global_killed_under_load)
{
    char out[256], id[32], gkey[] = "tg:{global}:g", seeds[256];
    const char *x = NULL, *w = NULL, *z = NULL;
    static char xid[32], wid[32], zid[32];
    long gslot;
    int gport = -1, gidx = -1, replica = -1, xport = -1;
    long long v0, v, now, tat;
    uint64_t t_start, t_kill, t_promo = 0, t_back = 0, end;
    counts cx = { 0 };
    loader ld = { .id = "c-heavy" }, lw = { 0 }, lz = { 0 };
    double minutes;
    int allowed;

    g_ha6 = 1;
    g_policy = "local";
    /* 1 ms of global debt per request, never binding here: the global
     * bucket's value changes with every charge and outlives the outage */
    g_more = "global_limit: { requests_per_second: 1000, burst: 1000000 }\n";
    cluster_start();
    load_slot_map(g_cport[0]);
    TGH_CHECK(tgh_redis_cli(g_cport[0], out, sizeof out, "CLUSTER KEYSLOT %s", gkey) == 0,
              "KEYSLOT");
    gslot = atol(out);
    gport = g_slot_owner[gslot];
    for (int i = 0; i < 6; i++) {
        char want[32];
        snprintf(want, sizeof want, "master_port:%d", gport);
        if (g_cport[i] == gport)
            gidx = i;
        else if (cli_has(g_cport[i], want, "INFO replication"))
            replica = g_cport[i];
    }
    TGH_CHECK(gidx >= 0 && replica > 0, "the master of {global} (%d) or its replica", gport);
    /* X, W: consumers whose buckets live on other masters (X checked in
     * Redis, W hammered); Z: one on the dying master (hammered) */
    for (int i = 1; i < NCLUSTER_KEYS; i++) {
        char key[64];
        int owner;
        cluster_id(i, id, sizeof id);
        bucket(id, key, sizeof key);
        TGH_CHECK(tgh_redis_cli(g_cport[0], out, sizeof out, "CLUSTER KEYSLOT %s", key) == 0,
                  "KEYSLOT");
        owner = g_slot_owner[atol(out)];
        if (owner != gport && x == NULL) {
            snprintf(xid, sizeof xid, "%s", id);
            x = xid;
            xport = owner;
        } else if (owner != gport && w == NULL) {
            snprintf(wid, sizeof wid, "%s", id);
            w = wid;
        } else if (owner == gport && z == NULL) {
            snprintf(zid, sizeof zid, "%s", id);
            z = zid;
        }
    }
    TGH_CHECK(x != NULL && w != NULL && z != NULL, "consumers on each side");
    lw.id = w;
    lz.id = z;
    snprintf(seeds, sizeof seeds, "cluster: { nodes: [127.0.0.1:%d, 127.0.0.1:%d, "
             "127.0.0.1:%d] }", g_cport[0], g_cport[1], g_cport[2]);
    start_tollgate(seeds);
    end = tgh_now_ms() + 15000;
    while (!all_workers_on_redis() && tgh_now_ms() < end)
        tgh_sleep_ms(20);
    TGH_CHECK(all_workers_on_redis(), "tollgate is not on Redis");

    t_start = tgh_now_ms();
    TGH_CHECK(pthread_create(&ld.tid, NULL, load_main, &ld) == 0
              && pthread_create(&lw.tid, NULL, load_main, &lw) == 0
              && pthread_create(&lz.tid, NULL, load_main, &lz) == 0, "load threads");
    while (ld.c.ok < 3000 && tgh_now_ms() < t_start + 20000)
        tgh_sleep_ms(10);

    tgh_proc_signal(g_cproc[gidx], SIGKILL, 0);
    t_kill = tgh_now_ms();
    run(x, 10, &cx);                    /* during the outage, within X's burst */
    end = t_kill + 30000;
    while (t_promo == 0 && tgh_now_ms() < end) {
        if (cli_has(replica, "role:master", "INFO replication"))
            t_promo = tgh_now_ms();
        else
            tgh_sleep_ms(20);
    }
    TGH_CHECK(t_promo != 0, "the replica of {global}'s master was never promoted");
    v0 = cli_long(replica, "GET %s", gkey);
    while (t_back == 0 && tgh_now_ms() < t_promo + 10000) {
        v = cli_long(replica, "GET %s", gkey);
        if (v != v0)
            t_back = tgh_now_ms();
        else
            tgh_sleep_ms(20);
    }
    ld.stop = lw.stop = lz.stop = 1;
    pthread_join(ld.tid, NULL);
    pthread_join(lw.tid, NULL);
    pthread_join(lz.tid, NULL);
    minutes = (double)(tgh_now_ms() - t_start) / 60000.0;
    allowed = 100 + (int)(minutes * 600000) + 1;   /* burst + rate*t, rounded up */

    tat = bucket_tat(xport, x, &now);
    cr_log_info("cluster kill -9 of {global}'s master under load: promoted %llu ms after "
                "the kill, {global} charged on the new master %llu ms after the promotion; "
                "load key: %d x 200, %d x 429, %d x 503, %d other in %.1f s (allowed <= %d), "
                "slowest %ld ms; X on a live master: %d x 200, Redis holds %.1f of its "
                "charges", (unsigned long long)(t_promo - t_kill),
                (unsigned long long)(t_back ? t_back - t_promo : 0), ld.c.ok, ld.c.limited,
                ld.c.unavailable, ld.c.other, minutes * 60, allowed, ld.worst_ms, cx.ok,
                (double)(tat - now) / 60e6);
    TGH_CHECK(t_back != 0, "{global} not charged on the new master within 10 s of the "
              "promotion");
    TGH_CHECK(t_back - t_promo <= 3000, "{global} back on Redis %llu ms after the "
              "promotion (want <= 3000)", (unsigned long long)(t_back - t_promo));
    TGH_CHECK(ld.c.unavailable == 0 && ld.c.other == 0 && cx.unavailable == 0
              && cx.other == 0, "errors under on_failure: local");
    cr_log_info("basic tier (burst 20, 1/min; allowed <= %d): W on a live master admitted "
                "%d (%d x 429), Z on the killed master admitted %d (%d x 429)",
                20 + (int)minutes + 1, lw.c.ok, lw.c.limited, lz.c.ok, lz.c.limited);
    TGH_CHECK(ld.c.ok <= allowed, "load key admitted %d, allowed %d", ld.c.ok, allowed);
    TGH_CHECK(lw.c.unavailable + lw.c.other + lz.c.unavailable + lz.c.other == 0,
              "errors under on_failure: local (W, Z)");
    TGH_CHECK(lw.c.ok <= 20 + (int)minutes + 1, "W on a live master admitted %d", lw.c.ok);
    TGH_CHECK(cx.ok == 10, "X: %d of 10 admitted", cx.ok);
    /* X's 10 charges are in its Redis bucket: its node's traffic stayed on
     * Redis (10 x 60 s of debt, minus the time since) */
    TGH_CHECK(tat > now && (tat - now + 59999999) / 60000000 == 10,
              "X's Redis bucket holds %.2f charges, want 10", (double)(tat - now) / 60e6);
}
