/*
 * test_conf.c - configuration loading: every error class at its exact
 * FILE:LINE:COL, defaults, derived values, paths, refcount, and every
 * shipped config in conf/.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tollgate/conf.h"

static char err[TG_CONF_ERRLEN];

/*
 * Unit tests never ask the machine's resolver (a minimal system may not
 * know even "localhost"): host names go through this stub, which knows
 * "localhost" only and records each question.  Literals must not reach it.
 */
static int  resolver_calls;
static char resolver_host[128];

static tg_rc
stub_resolver(const char *host, struct sockaddr_storage *sa, socklen_t *salen,
              char *why, size_t whylen)
{
    struct sockaddr_in *sin = (struct sockaddr_in *)sa;

    resolver_calls++;
    snprintf(resolver_host, sizeof(resolver_host), "%s", host);
    if (strcmp(host, "localhost") != 0) {
        snprintf(why, whylen, "Name or service not known");
        return TG_ERR;
    }
    memset(sa, 0, sizeof(*sa));
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    *salen = sizeof(*sin);
    return TG_OK;
}

__attribute__((constructor)) static void
no_name_resolution(void)
{
    tg_addr_set_resolver(stub_resolver);
}

/* The two required sections; tests append or prepend to it. */
#define MIN_LISTEN   "listen:\n  - address: 127.0.0.1:8080\n"
#define MIN_UPSTREAM "upstream:\n  servers: [127.0.0.1:8000]\n"
#define MIN          MIN_LISTEN MIN_UPSTREAM

static tg_conf *
load(const char *yaml)
{
    err[0] = '\0';
    return tg_conf_load_string("t.yaml", yaml, strlen(yaml), err, sizeof(err));
}

/* Assert that yaml fails with a message starting "t.yaml:<pos>: " and
 * containing sub. */
static void
expect_error(const char *yaml, const char *pos, const char *sub)
{
    char prefix[64];
    tg_conf *conf = load(yaml);

    if (conf != NULL) {
        tg_conf_unref(conf);
    }
    cr_assert_null(conf, "expected failure for:\n%s", yaml);
    snprintf(prefix, sizeof(prefix), "t.yaml:%s: ", pos);
    cr_assert(strncmp(err, prefix, strlen(prefix)) == 0,
              "expected position \"%s\", got: %s", prefix, err);
    cr_assert(strstr(err, sub) != NULL,
              "expected \"%s\" in: %s", sub, err);
}

static tg_conf *
expect_ok(const char *yaml)
{
    tg_conf *conf = load(yaml);

    cr_assert_not_null(conf, "unexpected error: %s\nfor:\n%s", err, yaml);
    return conf;
}

static char tmpdir[] = "/tmp/tg_test_conf_XXXXXX";

static void
write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

/* ---- unknown keys --------------------------------------------------------- */

Test(conf_errors, unknown_top_level_key)
{
    expect_error(MIN "lisen: []\n", "5:1",
                 "lisen: unknown key \"lisen\" at top level (did you mean \"listen\"?)");
}

Test(conf_errors, unknown_key_in_section)
{
    expect_error(MIN "http:\n  max_headers: 50\n  max_hedaers: 60\n", "7:3",
                 "http.max_hedaers: unknown key \"max_hedaers\" in section \"http\" "
                 "(did you mean \"max_headers\"?)");
}

Test(conf_errors, unknown_key_in_tier)
{
    expect_error(MIN "rate_limits:\n  basic: { requests_per_minute: 1, burst_limit: 1, rpm: 3 }\n",
                 "6:52", "rate_limits.basic.rpm: unknown key \"rpm\" in section "
                 "\"rate_limits.basic\"");
}

Test(conf_errors, unknown_key_in_listen_item)
{
    expect_error("listen:\n  - address: 127.0.0.1:8080\n    tsl: {}\n" MIN_UPSTREAM,
                 "3:5", "listen[0].tsl: unknown key \"tsl\" in section \"listen[0]\"");
}

/* ---- duplicates ------------------------------------------------------------- */

Test(conf_errors, duplicate_key)
{
    expect_error(MIN "http:\n  max_headers: 50\n  idle_timeout_ms: 5\n  max_headers: 60\n",
                 "8:3", "http.max_headers: duplicate key \"max_headers\" (first at 6:3)");
}

Test(conf_errors, duplicate_section)
{
    expect_error(MIN "workers: 1\nlisten: []\n", "6:1",
                 "listen: duplicate key \"listen\" (first at 1:1)");
}

Test(conf_errors, duplicate_tier)
{
    expect_error(MIN "rate_limits:\n"
                 "  basic: { requests_per_minute: 1, burst_limit: 1 }\n"
                 "  basic: { requests_per_minute: 2, burst_limit: 2 }\n",
                 "7:3", "rate_limits.basic: duplicate key \"basic\" (first at 6:3)");
}

/* ---- wrong types ------------------------------------------------------------ */

Test(conf_errors, expected_integer)
{
    expect_error(MIN_LISTEN "upstream:\n  servers: [127.0.0.1:8000]\n"
                 "  connect_timeout_ms: abc\n", "5:23",
                 "upstream.connect_timeout_ms: expected an integer, got \"abc\"");
}

Test(conf_errors, expected_integer_not_quoted)
{
    expect_error(MIN "workers: \"4\"\n", "5:10",
                 "workers: expected an integer, got \"4\"");
}

Test(conf_errors, expected_integer_got_null)
{
    expect_error(MIN "workers:\n", "5:9", "workers: expected an integer, got null");
}

Test(conf_errors, expected_mapping)
{
    expect_error(MIN "upstream2: 1\nhttp:\n", "5:1", "unknown key");
    expect_error(MIN "http:\n", "5:6", "http: expected a mapping, got null");
    expect_error(MIN "http: 5\n", "5:7", "http: expected a mapping, got \"5\"");
    expect_error(MIN "redis: [a]\n", "5:8", "redis: expected a mapping, got a sequence");
}

Test(conf_errors, expected_mapping_top_level)
{
    expect_error("- a\n- b\n", "1:1", "top level: expected a mapping of sections, "
                 "got a sequence");
}

Test(conf_errors, expected_sequence)
{
    expect_error("listen: { address: 127.0.0.1:8080 }\n" MIN_UPSTREAM, "1:9",
                 "listen: expected a sequence of listeners, got a mapping");
    expect_error(MIN_LISTEN "upstream:\n  servers: 127.0.0.1:8000\n", "4:12",
                 "upstream.servers: expected a sequence of addresses, "
                 "got \"127.0.0.1:8000\"");
}

Test(conf_errors, expected_string)
{
    expect_error(MIN "auth:\n  keys_file: [a, b]\n", "6:14",
                 "auth.keys_file: expected a string, got a sequence");
    expect_error(MIN "auth:\n  keys_file: ~\n", "6:14",
                 "auth.keys_file: expected a string, got null");
}

Test(conf_errors, expected_bool)
{
    expect_error(MIN "admin: { enabled: yes }\n", "5:19",
                 "admin.enabled: expected a bool (true or false), got \"yes\"");
}

Test(conf_errors, listen_item_not_mapping)
{
    expect_error("listen:\n  - 127.0.0.1:8080\n" MIN_UPSTREAM, "2:5",
                 "listen[0]: expected a mapping");
}

/* ---- ranges ----------------------------------------------------------------- */

Test(conf_errors, out_of_range)
{
    expect_error(MIN "http:\n  max_headers: 200\n", "6:16",
                 "http.max_headers: 200 is out of range (1..128)");
    expect_error(MIN "workers: -1\n", "5:10", "workers: -1 is out of range (0..256)");
    expect_error(MIN "workers: 99999999999999999999999\n", "5:10",
                 "out of range (0..256)");
    expect_error(MIN "rate_limits:\n  pro: { requests_per_minute: 0, burst_limit: 1 }\n",
                 "6:31", "rate_limits.pro.requests_per_minute: 0 is out of range "
                 "(1..100000000)");
    expect_error(MIN "redis: { timeout_ms: 60001 }\n", "5:22",
                 "redis.timeout_ms: 60001 is out of range (1..60000)");
}

Test(conf_errors, size_out_of_range)
{
    expect_error(MIN "http: { max_body_bytes: 5000000000g }\n", "5:25",
                 "http.max_body_bytes: 5000000000g is out of range");
    expect_error(MIN "http: { max_body_bytes: 10x }\n", "5:25",
                 "expected a size (integer, or with a k/m/g suffix), got \"10x\"");
}

Test(conf_errors, cross_field_header_bytes)
{
    expect_error(MIN "http:\n  max_request_line: 4096\n  max_header_bytes: 4000\n",
                 "7:21", "http.max_header_bytes: must be at least "
                 "http.max_request_line + 2 (4098), got 4000");
    /* Only the line limit set: point at it. */
    expect_error(MIN "http:\n  max_request_line: 16384\n", "6:21",
                 "http.max_request_line: must be at least");
}

/* ---- missing required -------------------------------------------------------- */

Test(conf_errors, missing_listen)
{
    expect_error(MIN_UPSTREAM, "1:1", "missing required section \"listen\"");
}

Test(conf_errors, missing_upstream)
{
    expect_error("# comment\n" MIN_LISTEN, "2:1", "missing required section \"upstream\"");
}

Test(conf_errors, missing_servers)
{
    expect_error(MIN_LISTEN "upstream:\n  keepalive: 4\n", "4:3",
                 "upstream: missing required key \"servers\"");
}

Test(conf_errors, empty_servers)
{
    expect_error(MIN_LISTEN "upstream:\n  servers: []\n", "4:12",
                 "upstream.servers: needs at least one server");
}

Test(conf_errors, empty_listen)
{
    expect_error("listen: []\n" MIN_UPSTREAM, "1:9", "listen: needs at least one listener");
}

Test(conf_errors, missing_listen_address)
{
    expect_error("listen:\n  - tls: { cert: a, key: b }\n" MIN_UPSTREAM, "2:5",
                 "listen[0]: missing required key \"address\"");
}

Test(conf_errors, missing_tls_key)
{
    expect_error("listen:\n  - address: 127.0.0.1:8443\n    tls: { cert: c.pem }\n"
                 MIN_UPSTREAM, "3:10", "listen[0].tls: missing required key \"key\"");
}

Test(conf_errors, missing_tier_field)
{
    expect_error(MIN "rate_limits:\n  basic: { requests_per_minute: 100 }\n", "6:10",
                 "rate_limits.basic: missing required key \"burst_limit\"");
}

Test(conf_errors, missing_global_field)
{
    expect_error(MIN "global_limit: { burst: 10 }\n", "5:15",
                 "global_limit: missing required key \"requests_per_second\"");
}

/* ---- file, syntax, empty -------------------------------------------------------- */

Test(conf_errors, unreadable_file)
{
    tg_conf *conf = tg_conf_load("/nonexistent/dir/tollgate.yaml", err, sizeof(err));

    cr_assert_null(conf);
    cr_assert_str_eq(err, "/nonexistent/dir/tollgate.yaml: cannot open: "
                     "No such file or directory");
}

Test(conf_errors, directory_is_not_a_file)
{
    tg_conf *conf = tg_conf_load("/tmp", err, sizeof(err));

    cr_assert_null(conf);
    cr_assert_str_eq(err, "/tmp: cannot open: not a regular file");
}

Test(conf_errors, syntax_error)
{
    expect_error(MIN "http:\n  max_headers: 5\n bad: [\n", "7:2",
                 "YAML syntax error: ");
}

Test(conf_errors, syntax_error_unclosed_flow)
{
    expect_error(MIN "upstream2: [a, b\n", "6:1", "YAML syntax error: did not find "
                 "expected ',' or ']' while parsing a flow sequence (at 5:12)");
}

Test(conf_errors, syntax_error_tab)
{
    expect_error(MIN "http:\n\tmax_headers: 5\n", "6:1", "YAML syntax error: found "
                 "character that cannot start any token");
}

Test(conf_errors, invalid_utf8)
{
    expect_error(MIN "log_level: \"\xff\"\n", "5:13", "YAML syntax error: invalid "
                 "leading UTF-8 octet");
}

Test(conf_errors, empty_file)
{
    expect_error("", "1:1", "empty configuration");
    expect_error("# only a comment\n\n", "1:1", "empty configuration");
}

Test(conf_errors, empty_file_on_disk)
{
    char path[PATH_MAX];
    tg_conf *conf;

    cr_assert_not_null(mkdtemp(tmpdir));
    snprintf(path, sizeof(path), "%s/empty.yaml", tmpdir);
    write_file(path, "");
    conf = tg_conf_load(path, err, sizeof(err));
    cr_assert_null(conf);
    cr_assert(strstr(err, ":1:1: empty configuration") != NULL, "%s", err);
    cr_assert(strncmp(err, path, strlen(path)) == 0, "%s", err);
    unlink(path);
    rmdir(tmpdir);
}

Test(conf_errors, two_documents)
{
    expect_error(MIN "---\n" MIN, "5:1", "only one YAML document is allowed");
}

/* ---- anchors and aliases ---------------------------------------------------------- */

Test(conf_errors, anchor_rejected)
{
    expect_error("listen:\n  - address: &a 127.0.0.1:8080\n" MIN_UPSTREAM,
                 "2:14", "YAML anchors (&a) are not supported");
}

Test(conf_errors, alias_rejected)
{
    /* The event scan meets the alias before any loader could resolve it. */
    expect_error(MIN "http: *base\n", "5:7", "YAML aliases (*base) are not supported");
    expect_error(MIN "http:\n  <<: *base\n", "6:7", "YAML aliases (*base) are not supported");
}

/* ---- addresses ------------------------------------------------------------------------ */

Test(conf_errors, bad_address_no_port)
{
    expect_error("listen:\n  - address: localhost\n" MIN_UPSTREAM, "2:14",
                 "listen[0].address: bad address \"localhost\": expected \"host:port\"");
}

Test(conf_errors, bad_address_port_range)
{
    expect_error(MIN_LISTEN "upstream:\n  servers: [127.0.0.1:8000, 127.0.0.1:65536]\n",
                 "4:29", "upstream.servers[1]: bad address \"127.0.0.1:65536\": "
                 "port must be a number 0..65535");
}

Test(conf_errors, bad_address_v6_without_brackets)
{
    expect_error("listen:\n  - address: \"::1:8080\"\n" MIN_UPSTREAM, "2:14",
                 "write IPv6 addresses in brackets");
}

Test(conf_errors, bad_address_unclosed_bracket)
{
    expect_error("listen:\n  - address: \"[::1:8080\"\n" MIN_UPSTREAM, "2:14",
                 "missing ']'");
}

Test(conf_errors, bad_address_unresolvable)
{
    /* ".invalid" is reserved (RFC 6761): never resolves, fails fast offline. */
    expect_error(MIN_LISTEN "upstream:\n  servers:\n    - nohost.invalid:80\n",
                 "5:7", "upstream.servers[0]: bad address \"nohost.invalid:80\": "
                 "cannot resolve");
}

Test(conf_errors, port_zero_only_for_listen_and_admin)
{
    tg_conf *conf;

    expect_error(MIN_LISTEN "upstream:\n  servers: [127.0.0.1:0]\n", "4:13",
                 "upstream.servers[0]: port 0 is only allowed for listen and admin");
    conf = expect_ok("listen:\n  - address: 127.0.0.1:0\n  - address: 127.0.0.1:0\n"
                     "admin: { address: 127.0.0.1:0 }\n" MIN_UPSTREAM);
    tg_conf_unref(conf);
}

Test(conf_errors, listen_address_twice)
{
    expect_error("listen:\n  - address: 127.0.0.1:8080\n  - address: 127.0.0.1:8080\n"
                 MIN_UPSTREAM, "3:14", "listen[1].address: \"127.0.0.1:8080\" is "
                 "already used by listen[0].address (at 2:14)");
}

Test(conf_errors, admin_clashes_with_listener)
{
    expect_error(MIN "admin:\n  address: 127.0.0.1:8080\n", "6:12",
                 "admin.address: \"127.0.0.1:8080\" is already used by listen[0].address");
}

Test(conf_errors, address_too_long)
{
    char yaml[1024], host[200];

    memset(host, 'a', 150);
    host[150] = '\0';
    snprintf(yaml, sizeof(yaml), MIN_LISTEN "upstream:\n  servers: [%s:80]\n", host);
    expect_error(yaml, "4:13", "upstream.servers[0]: address is too long");
}

/* ---- enums --------------------------------------------------------------------------- */

Test(conf_errors, bad_enum_store)
{
    expect_error(MIN "store: memcached\n", "5:8",
                 "store: bad value \"memcached\", expected one of redis|local");
}

Test(conf_errors, bad_enum_native)
{
    expect_error(MIN "redis:\n  native: yes\n", "6:11",
                 "redis.native: bad value \"yes\", expected one of auto|off");
}

Test(conf_errors, bad_enum_on_failure)
{
    expect_error(MIN "redis:\n  on_failure: retry\n", "6:15",
                 "redis.on_failure: bad value \"retry\", expected one of local|allow|deny");
}

Test(conf_errors, bad_enum_log_level)
{
    expect_error(MIN "log_level: verbose\n", "5:12",
                 "log_level: bad value \"verbose\", expected one of debug|info|warn|error");
}

/* ---- other value checks ------------------------------------------------------------------ */

Test(conf_errors, bad_tier_name)
{
    expect_error(MIN "rate_limits:\n  Gold: { requests_per_minute: 1, burst_limit: 1 }\n",
                 "6:3", "rate_limits.Gold: bad tier name \"Gold\": 1..32 characters "
                 "of [a-z0-9_-]");
}

Test(conf_errors, bad_redis_url)
{
    expect_error(MIN "redis: { url: \"http://x:6379\" }\n", "5:15",
                 "redis.url: bad Redis URL \"http://x:6379\": scheme must be redis://");
    expect_error(MIN "redis: { url: \"redis://h:6379/16\" }\n", "5:15",
                 "database must be a number 0..15");
    expect_error(MIN "redis: { url: \"redis://h:0/1\" }\n", "5:15",
                 "port must be a number 1..65535");
    expect_error(MIN "redis: { url: \"redis://:6379/1\" }\n", "5:15", "missing host");
}

/* A URL with credentials is refused without being echoed: the error goes
 * to logs and terminals, the password must not. */
Test(conf_errors, bad_redis_url_hides_password)
{
    expect_error(MIN "redis: { url: \"redis://app:s3cret-pw@h:6379/0\" }\n", "5:15",
                 "redis.url: bad Redis URL (not shown: it has credentials): "
                 "credentials in the URL are not supported");
    cr_assert_null(strstr(err, "s3cret-pw"), "the password leaked: %s", err);
    expect_error(MIN "redis: { url: \"redis://:pw2@h:0\" }\n", "5:15",
                 "not shown");
    cr_assert_null(strstr(err, "pw2"), "the password leaked: %s", err);
}

/* redis.url is parsed once, at load, into what the Redis client connects
 * to (redis.server); the client's checks are the config's. */
Test(conf, redis_url_parsed_once)
{
    static const struct { const char *url, *host; int port, db; } t[] = {
        { "redis://127.0.0.1", "127.0.0.1", 6379, 0 },
        { "redis://cache-1.internal:6380/15", "cache-1.internal", 6380, 15 },
        { "redis://[::1]:7000/2", "::1", 7000, 2 },
    };
    char yaml[256];
    tg_conf *conf;

    conf = expect_ok(MIN);
    cr_assert_str_eq(conf->redis.server.host, "127.0.0.1", "the default");
    cr_assert_eq(conf->redis.server.port, 6379);
    cr_assert_eq(conf->redis.server.db, 0);
    tg_conf_unref(conf);
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        snprintf(yaml, sizeof(yaml), MIN "redis: { url: \"%s\" }\n", t[i].url);
        conf = expect_ok(yaml);
        cr_assert_str_eq(conf->redis.url, t[i].url);
        cr_assert_str_eq(conf->redis.server.host, t[i].host);
        cr_assert_eq(conf->redis.server.port, t[i].port, "%s", t[i].url);
        cr_assert_eq(conf->redis.server.db, t[i].db, "%s", t[i].url);
        tg_conf_unref(conf);
    }
    /* What only the client refused before: now at load, with its place. */
    expect_error(MIN "redis: { url: \"redis://ho st\" }\n", "5:15",
                 "redis.url: bad Redis URL \"redis://ho st\": bad character in host");
    expect_error(MIN "redis: { url: \"redis://h?db=1\" }\n", "5:15",
                 "query or fragment is not supported");
    expect_error(MIN "redis: { url: \"rediss://h\" }\n", "5:15", "TLS");
}

Test(conf_errors, bad_redis_prefix)
{
    expect_error(MIN "redis: { prefix: \"a b\" }\n", "5:18",
                 "redis.prefix: must not contain spaces");
    expect_error(MIN "redis: { prefix: \"\" }\n", "5:18",
                 "redis.prefix: length 0 is out of range (1..64 characters)");
}

/* A refused value is echoed with its control bytes shown as '?': a line
 * break or a terminal escape in the file forges no log line. */
Test(conf_errors, refused_values_echo_no_control_bytes)
{
    expect_error(MIN "redis: { prefix: \"a\\nb\\e[31mc\\rd\\x7f\" }\n", "5:18",
                 "got \"a?b?[31mc?d?\"");
    expect_error(MIN "auth:\n  header: \"X-Key\\r\\nEvil: 1\"\n", "6:11",
                 "bad header name \"X-Key??Evil: 1\"");
    expect_error(MIN "http:\n  \"a\\nb\": 1\n", "6:3", "unknown key \"a?b\"");
    expect_error(MIN "rate_limits:\n  \"a\\nb\": { requests_per_minute: 1, burst_limit: 1 }\n",
                 "6:3", "rate_limits.a?b: bad tier name");
}

/* ---- auth, redis.max_batch, routes ---------------------------------------------------- */

Test(conf_errors, bad_auth_header)
{
    expect_error(MIN "auth:\n  header: \"X API Key\"\n", "6:11",
                 "auth.header: bad header name \"X API Key\": only letters, "
                 "digits and !#$%&'*+-.^_`|~ (an HTTP token)");
    expect_error(MIN "auth: { header: \"X-Key:\" }\n", "5:17",
                 "auth.header: bad header name \"X-Key:\"");
    expect_error(MIN "auth: { header: \"\" }\n", "5:17",
                 "auth.header: length 0 is out of range (1..64 characters)");
    expect_error(MIN "auth: { header: "
                 "X-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa }\n",
                 "5:17", "auth.header: length 65 is out of range (1..64 characters)");
    expect_error(MIN "auth: { header: ~ }\n", "5:17",
                 "auth.header: expected a string, got null");
}

Test(conf_errors, bad_auth_scalars)
{
    expect_error(MIN "auth: { forward_key: yes }\n", "5:22",
                 "auth.forward_key: expected a bool (true or false), got \"yes\"");
    expect_error(MIN "auth: { redis_keys: 1 }\n", "5:21",
                 "auth.redis_keys: expected a bool (true or false), got \"1\"");
    expect_error(MIN "auth: { cache_ttl_ms: 3600001 }\n", "5:23",
                 "auth.cache_ttl_ms: 3600001 is out of range (0..3600000)");
}

Test(conf_errors, anonymous_tier_unknown)
{
    /* At the value, after the whole file is read: rate_limits may follow. */
    expect_error(MIN "rate_limits:\n"
                 "  basic: { requests_per_minute: 1, burst_limit: 1 }\n"
                 "  pro: { requests_per_minute: 2, burst_limit: 2 }\n"
                 "auth:\n"
                 "  keys_file: keys.yaml\n"
                 "  anonymous_tier: gold\n",
                 "10:19", "auth.anonymous_tier: unknown tier \"gold\" "
                 "(rate_limits defines basic, pro)");
    expect_error(MIN "auth: { anonymous_tier: free }\n", "5:25",
                 "auth.anonymous_tier: unknown tier \"free\" "
                 "(rate_limits defines no tiers)");
    expect_error(MIN "auth: { anonymous_tier: ~ }\n", "5:25",
                 "auth.anonymous_tier: expected a string, got null");
}

Test(conf_errors, max_batch_out_of_range)
{
    expect_error(MIN "redis: { max_batch: 0 }\n", "5:21",
                 "redis.max_batch: 0 is out of range (1..512)");
    expect_error(MIN "redis:\n  prefix: \"tg:\"\n  max_batch: 513\n", "7:14",
                 "redis.max_batch: 513 is out of range (1..512)");
}

Test(conf_errors, routes_not_a_sequence)
{
    expect_error(MIN "routes: { name: a, path: /a }\n", "5:9",
                 "routes: expected a sequence of routes, got a mapping");
    expect_error(MIN "routes:\n", "5:8", "routes: expected a sequence of routes, "
                 "got null");
    expect_error(MIN "routes:\n  - /leads\n", "6:5",
                 "routes[0]: expected a mapping (e.g. { name: leads, path: /leads }), "
                 "got \"/leads\"");
}

Test(conf_errors, route_unknown_key)
{
    expect_error(MIN "routes:\n  - name: a\n    path: /a\n    methd: GET\n", "8:5",
                 "routes[0].methd: unknown key \"methd\" in section \"routes[0]\" "
                 "(did you mean \"method\"?)");
}

Test(conf_errors, bad_route_name)
{
    expect_error(MIN "routes:\n  - name: Leads\n    path: /leads\n", "6:11",
                 "routes[0].name: bad route name \"Leads\": 1..32 characters "
                 "of [a-z0-9_-]");
    expect_error(MIN "routes:\n"
                 "  - { name: ok, path: /a }\n"
                 "  - { name: \"leads.read\", path: /b }\n", "7:13",
                 "routes[1].name: bad route name \"leads.read\"");
    expect_error(MIN "routes:\n  - { name: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa, path: /a }\n",
                 "6:13", "routes[0].name: bad route name");
    expect_error(MIN "routes:\n  - { name: \"\", path: /a }\n", "6:13",
                 "routes[0].name: bad route name \"\"");
}

Test(conf_errors, duplicate_route_name)
{
    expect_error(MIN "routes:\n"
                 "  - { name: leads, method: GET, path: /leads }\n"
                 "  - { name: other, path: /other }\n"
                 "  - { name: leads, method: POST, path: /leads }\n", "8:13",
                 "routes[2].name: duplicate route name \"leads\" (first at 6:13)");
}

/* A cost above any bucket a route's requests meet could never pass: the
 * cost is the error, wherever the smaller capacity was written. */
Test(conf_errors, route_cost_above_a_burst)
{
    /* a tier (keys may name any tier) */
    expect_error(MIN "rate_limits:\n"
                 "  basic: { requests_per_minute: 100, burst_limit: 20 }\n"
                 "  tiny:  { requests_per_minute: 10, burst_limit: 3 }\n"
                 "routes:\n  - { name: exp, path: /x, cost: 4 }\n", "9:34",
                 "routes[0].cost: cost 4 of route \"exp\" is above "
                 "rate_limits.tiny.burst_limit (3): no such request could ever pass");
    /* the anonymous tier */
    expect_error(MIN "auth: { anonymous_tier: anon }\n"
                 "rate_limits:\n  anon: { requests_per_minute: 60, burst_limit: 2 }\n"
                 "routes:\n  - name: exp\n    path: /x\n    cost: 3\n", "11:11",
                 "rate_limits.anon.burst_limit (the anonymous tier) (2)");
    /* the route's own bucket, written before the cost */
    expect_error(MIN "routes:\n  - name: exp\n    path: /x\n"
                 "    limit: { requests_per_minute: 60, burst_limit: 9 }\n"
                 "    cost: 10\n", "9:11",
                 "cost 10 of route \"exp\" is above its own limit.burst_limit (9)");
    /* the global bucket */
    expect_error(MIN "global_limit: { requests_per_second: 100, burst: 5 }\n"
                 "routes:\n  - { name: exp, path: /x, cost: 6 }\n", "7:34",
                 "is above global_limit.burst (5)");
    /* equal is fine: one such request passes a full bucket */
    tg_conf_unref(expect_ok(MIN "rate_limits:\n"
                            "  t: { requests_per_minute: 10, burst_limit: 6 }\n"
                            "global_limit: { requests_per_second: 100, burst: 6 }\n"
                            "routes:\n  - name: exp\n    path: /x\n    cost: 6\n"
                            "    limit: { requests_per_minute: 60, burst_limit: 6 }\n"));
}

/* Token intervals are whole microseconds: a rate that rounding would cut
 * by more than 1% is refused, with the nearest exact ones. */
Test(conf_errors, rate_that_whole_microseconds_cannot_keep)
{
    expect_error(MIN "global_limit: { requests_per_second: 400000, burst: 1000 }\n",
                 "5:38", "global_limit.requests_per_second: 400000 cannot be kept: "
                 "a token comes every whole microsecond, so it would be 333333; the "
                 "nearest rates kept exactly are 333333 and 500000");
    expect_error(MIN "rate_limits:\n  t: { requests_per_minute: 45000000, burst_limit: 5 }\n",
                 "6:29", "rate_limits.t.requests_per_minute: 45000000 cannot be kept");
    tg_conf_unref(expect_ok(MIN "global_limit: { requests_per_second: 500000, burst: 9 }\n"
                            "rate_limits:\n"
                            "  a: { requests_per_minute: 600000, burst_limit: 5 }\n"
                            "  b: { requests_per_minute: 60000000, burst_limit: 5 }\n"
                            "  c: { requests_per_minute: 123457, burst_limit: 5 }\n"));
}

Test(conf_errors, route_missing_required)
{
    expect_error(MIN "routes:\n  - name: leads\n    cost: 2\n", "6:5",
                 "routes[0]: missing required key \"path\"");
    expect_error(MIN "routes:\n  - { path: /leads }\n", "6:5",
                 "routes[0]: missing required key \"name\"");
}

Test(conf_errors, route_bad_method)
{
    expect_error(MIN "routes:\n  - { name: a, method: get, path: /a }\n", "6:24",
                 "routes[0].method: method must be upper case: write \"GET\", "
                 "not \"get\" (methods are case-sensitive)");
    expect_error(MIN "routes:\n  - { name: a, method: Post, path: /a }\n", "6:24",
                 "write \"POST\", not \"Post\"");
    expect_error(MIN "routes:\n  - { name: a, method: \"M-SEARCH\", path: /a }\n",
                 "6:24", "routes[0].method: bad method \"M-SEARCH\": 1..16 "
                 "upper-case letters A-Z (omit the key to match any method)");
    expect_error(MIN "routes:\n  - { name: a, method: \"\", path: /a }\n",
                 "6:24", "bad method \"\"");
    expect_error(MIN "routes:\n  - { name: a, method: ABCDEFGHIJKLMNOPQ, path: /a }\n",
                 "6:24", "bad method \"ABCDEFGHIJKLMNOPQ\"");
    expect_error(MIN "routes:\n  - { name: a, method: ~, path: /a }\n",
                 "6:24", "routes[0].method: expected a string, got null");
}

Test(conf_errors, route_bad_path)
{
    char yaml[1024], longpath[300];

    expect_error(MIN "routes:\n  - { name: a, path: leads }\n", "6:22",
                 "routes[0].path: must start with '/', got \"leads\"");
    expect_error(MIN "routes:\n  - { name: a, path: \"/a b\" }\n", "6:22",
                 "routes[0].path: must not contain spaces, control or non-ASCII "
                 "characters");
    expect_error(MIN "routes:\n  - { name: a, path: \"/a\\tb\" }\n", "6:22",
                 "must not contain spaces");
    expect_error(MIN "routes:\n  - { name: a, path: \"\" }\n", "6:22",
                 "routes[0].path: must start with '/', got \"\"");
    expect_error(MIN "routes:\n  - { name: a, path: \"/a?x\" }\n", "6:22",
                 "routes[0].path: bad path \"/a?x\": a route path has no query");
    expect_error(MIN "routes:\n  - { name: a, path: \"/a//b\" }\n", "6:22",
                 "routes[0].path: bad path \"/a//b\": empty path segment (//) in path");
    expect_error(MIN "routes:\n  - { name: a, path: \"/a%2Fb\" }\n", "6:22",
                 "encoded slash (%2F) in path");
    longpath[0] = '/';
    memset(longpath + 1, 'a', 256);
    longpath[257] = '\0';
    snprintf(yaml, sizeof(yaml), MIN "routes:\n  - { name: a, path: %s }\n", longpath);
    expect_error(yaml, "6:22", "routes[0].path: length 257 is out of range "
                 "(1..256 characters)");
    longpath[256] = '\0';          /* 256 characters: fine */
    snprintf(yaml, sizeof(yaml), MIN "routes:\n  - { name: a, path: %s }\n", longpath);
    tg_conf_unref(expect_ok(yaml));
}

Test(conf_errors, route_cost_out_of_range)
{
    expect_error(MIN "routes:\n  - { name: a, path: /a, cost: 0 }\n", "6:32",
                 "routes[0].cost: 0 is out of range (1..1000)");
    expect_error(MIN "routes:\n  - name: a\n    path: /a\n    cost: 1001\n", "8:11",
                 "routes[0].cost: 1001 is out of range (1..1000)");
}

Test(conf_errors, route_limit)
{
    expect_error(MIN "routes:\n  - { name: a, path: /a, limit: { requests_per_minute: 5 } }\n",
                 "6:33", "routes[0].limit: missing required key \"burst_limit\"");
    expect_error(MIN "routes:\n  - { name: a, path: /a, limit: { burst_limit: 5 } }\n",
                 "6:33", "routes[0].limit: missing required key \"requests_per_minute\"");
    expect_error(MIN "routes:\n"
                 "  - name: a\n"
                 "    path: /a\n"
                 "    limit: { requests_per_minute: 100000001, burst_limit: 1 }\n",
                 "8:35", "routes[0].limit.requests_per_minute: 100000001 is out of "
                 "range (1..100000000)");
    expect_error(MIN "routes:\n  - { name: a, path: /a, limit: 5 }\n", "6:33",
                 "routes[0].limit: expected a mapping, got \"5\"");
    expect_error(MIN "routes:\n  - { name: a, path: /a, limit: { rpm: 5 } }\n", "6:35",
                 "routes[0].limit.rpm: unknown key \"rpm\" in section \"routes[0].limit\"");
}

Test(conf_errors, error_buffer_small)
{
    char small[16];
    tg_conf *conf = tg_conf_load_string("t.yaml", "", 0, small, sizeof(small));

    cr_assert_null(conf);
    cr_assert_eq(strlen(small), sizeof(small) - 1);
}

/* ---- successful loads ------------------------------------------------------------------ */

Test(conf, defaults_filled)
{
    tg_conf *conf = expect_ok(MIN);
    const struct sockaddr_in *sin;
    char cwd[PATH_MAX];

    cr_assert_eq(conf->refcnt, 1);
    cr_assert_str_eq(conf->path, "t.yaml");
    cr_assert_not_null(getcwd(cwd, sizeof(cwd)));
    cr_assert_str_eq(conf->dir, cwd);

    cr_assert_eq(conf->nlisten, 1);
    cr_assert_str_eq(conf->listen[0].addr.text, "127.0.0.1:8080");
    cr_assert_eq(conf->listen[0].tls, 0);
    cr_assert_null(conf->listen[0].cert);
    sin = (const struct sockaddr_in *)&conf->listen[0].addr.sa;
    cr_assert_eq(sin->sin_family, AF_INET);
    cr_assert_eq(ntohs(sin->sin_port), 8080);
    cr_assert_eq(sin->sin_addr.s_addr, htonl(INADDR_LOOPBACK));

    cr_assert_eq(conf->admin_enabled, 1);
    cr_assert_str_eq(conf->admin.text, "127.0.0.1:9090");
    sin = (const struct sockaddr_in *)&conf->admin.sa;
    cr_assert_eq(ntohs(sin->sin_port), 9090);

    cr_assert_eq(conf->drain_timeout_ms, 10000);
    cr_assert_eq(conf->log_level, TG_LOG_INFO);
    cr_assert_eq(conf->http.max_request_line, 8192);
    cr_assert_eq(conf->http.max_header_bytes, 16384);
    cr_assert_eq(conf->http.max_headers, 100);
    cr_assert_eq(conf->http.max_body_bytes, 10485760);
    cr_assert_eq(conf->http.header_timeout_ms, 10000);
    cr_assert_eq(conf->http.body_timeout_ms, 30000);
    cr_assert_eq(conf->http.idle_timeout_ms, 60000);
    cr_assert_eq(conf->http.send_timeout_ms, 30000);
    cr_assert_eq(conf->http.max_requests_per_connection, 10000);
    cr_assert_eq(conf->http.max_connections, 10000);
    cr_assert_eq(conf->http.max_connections_per_ip, 1024);

    cr_assert_eq(conf->upstream.nservers, 1);
    cr_assert_str_eq(conf->upstream.servers[0].text, "127.0.0.1:8000");
    cr_assert_eq(conf->upstream.connect_timeout_ms, 2000);
    cr_assert_eq(conf->upstream.first_byte_timeout_ms, 30000);
    cr_assert_eq(conf->upstream.total_timeout_ms, 60000);
    cr_assert_eq(conf->upstream.keepalive, TG_UPSTREAM_KEEPALIVE_AUTO);
    cr_assert_eq(conf->upstream.keepalive_timeout_ms, 30000);

    cr_assert_eq(conf->ntiers, 0);
    cr_assert_null(tg_conf_tier(conf, "basic"));
    cr_assert_eq(conf->store, TG_STORE_REDIS);
    cr_assert_str_eq(conf->redis.url, "redis://127.0.0.1:6379/0");
    cr_assert_eq(conf->redis.timeout_ms, 25);
    cr_assert_eq(conf->redis.on_failure, TG_FAIL_LOCAL);
    cr_assert_str_eq(conf->redis.prefix, "tg:");
    cr_assert_eq(conf->redis.max_batch, 32);
    cr_assert_eq(conf->redis.native, 1, "redis.native: auto by default");
    cr_assert_null(conf->auth.keys_file);
    cr_assert_str_eq(conf->auth.header, "X-API-Key");
    cr_assert_eq(conf->auth.forward_key, 0);
    cr_assert_null(conf->auth.anonymous_tier);
    cr_assert_eq(conf->auth.redis_keys, 0);
    cr_assert_eq(conf->auth.cache_ttl_ms, 30000);
    cr_assert_null(conf->routes);
    cr_assert_eq(conf->nroutes, 0);
    cr_assert_eq(conf->global_limit.enabled, 0);
    tg_conf_unref(conf);
}

Test(conf, every_key_set)
{
    tg_conf *conf = expect_ok(
        "listen:\n"
        "  - address: \"[::1]:8443\"\n"
        "    tls: { cert: /etc/t/cert.pem, key: /etc/t/key.pem }\n"
        "admin: { enabled: false, address: 127.0.0.1:9999 }\n"
        "workers: 3\n"
        "drain_timeout_ms: 0\n"
        "log_level: debug\n"
        "http:\n"
        "  max_request_line: 256\n"
        "  max_header_bytes: 1024\n"
        "  max_headers: 128\n"
        "  max_body_bytes: 0\n"
        "  header_timeout_ms: 1\n"
        "  body_timeout_ms: 2\n"
        "  idle_timeout_ms: 3\n"
        "  send_timeout_ms: 3600000\n"
        "  max_requests_per_connection: 2147483648\n"
        "  max_connections: 0\n"
        "  max_connections_per_ip: 10000000\n"
        "upstream:\n"
        "  servers: [127.0.0.1:8000, \"[::1]:8001\", localhost:8002]\n"
        "  connect_timeout_ms: 10\n"
        "  first_byte_timeout_ms: 20\n"
        "  total_timeout_ms: 30\n"
        "  keepalive: 0\n"
        "  keepalive_timeout_ms: 40\n"
        "rate_limits:\n"
        "  basic:      { requests_per_minute: 100,  burst_limit: 20 }\n"
        "  pro:        { requests_per_minute: 500,  burst_limit: 100 }\n"
        "  enterprise: { requests_per_minute: 1000, burst_limit: 200 }\n"
        "store: local\n"
        "redis:\n"
        "  url: redis://[::1]:6380/15\n"
        "  timeout_ms: 60000\n"
        "  on_failure: deny\n"
        "  prefix: \"rl:\"\n"
        "  native: off\n"
        "auth: { keys_file: /etc/tollgate/keys.yaml }\n"
        "global_limit: { requests_per_second: 5000, burst: 1000 }\n");
    const struct sockaddr_in6 *sin6;
    const tg_tier_conf *t;

    cr_assert_eq(conf->listen[0].tls, 1);
    cr_assert_str_eq(conf->listen[0].cert, "/etc/t/cert.pem");
    cr_assert_str_eq(conf->listen[0].key, "/etc/t/key.pem");
    sin6 = (const struct sockaddr_in6 *)&conf->listen[0].addr.sa;
    cr_assert_eq(sin6->sin6_family, AF_INET6);
    cr_assert_eq(ntohs(sin6->sin6_port), 8443);
    cr_assert_eq(conf->admin_enabled, 0);
    cr_assert_eq(conf->workers, 3);
    cr_assert_eq(conf->drain_timeout_ms, 0);
    cr_assert_eq(conf->log_level, TG_LOG_DEBUG);
    cr_assert_eq(conf->http.max_request_line, 256);
    cr_assert_eq(conf->http.max_header_bytes, 1024);
    cr_assert_eq(conf->http.max_headers, 128);
    cr_assert_eq(conf->http.max_body_bytes, 0);
    cr_assert_eq(conf->http.send_timeout_ms, 3600000);
    cr_assert_eq(conf->http.max_requests_per_connection, 2147483648u);
    cr_assert_eq(conf->http.max_connections, 0);
    cr_assert_eq(conf->http.max_connections_per_ip, 10000000);
    cr_assert_eq(conf->upstream.nservers, 3);
    cr_assert_str_eq(conf->upstream.servers[2].text, "localhost:8002");
    cr_assert_eq(ntohs(((const struct sockaddr_in *)&conf->upstream.servers[2].sa)->sin_port),
                 8002, "resolved at load, with its port");
    cr_assert_eq(conf->upstream.keepalive, 0);
    cr_assert_eq(conf->upstream.keepalive_timeout_ms, 40);

    cr_assert_eq(conf->ntiers, 3);
    cr_assert_str_eq(conf->tiers[0].name, "basic");
    cr_assert_str_eq(conf->tiers[2].name, "enterprise");
    t = tg_conf_tier(conf, "pro");
    cr_assert_not_null(t);
    cr_assert_eq(t->requests_per_minute, 500);
    cr_assert_eq(t->burst_limit, 100);
    cr_assert_null(tg_conf_tier(conf, "gold"));

    cr_assert_eq(conf->store, TG_STORE_LOCAL);
    cr_assert_str_eq(conf->redis.url, "redis://[::1]:6380/15");
    cr_assert_eq(conf->redis.timeout_ms, 60000);
    cr_assert_eq(conf->redis.on_failure, TG_FAIL_DENY);
    cr_assert_str_eq(conf->redis.prefix, "rl:");
    cr_assert_eq(conf->redis.native, 0);
    cr_assert_str_eq(conf->auth.keys_file, "/etc/tollgate/keys.yaml");
    cr_assert_eq(conf->global_limit.enabled, 1);
    cr_assert_eq(conf->global_limit.requests_per_second, 5000);
    cr_assert_eq(conf->global_limit.burst, 1000);
    tg_conf_unref(conf);
}

Test(conf, auth_and_routes)
{
    /* auth comes before rate_limits: the tier check runs after the walk. */
    tg_conf *conf = expect_ok(
        MIN
        "auth:\n"
        "  keys_file: /etc/tollgate/keys.yaml\n"
        "  header: X-Tollgate-Key\n"
        "  forward_key: true\n"
        "  anonymous_tier: free\n"
        "  redis_keys: true\n"
        "  cache_ttl_ms: 0\n"
        "rate_limits:\n"
        "  free: { requests_per_minute: 10,  burst_limit: 5 }\n"
        "  pro:  { requests_per_minute: 500, burst_limit: 100 }\n"
        "redis: { max_batch: 512 }\n"
        "routes:\n"
        "  - name: leads_export\n"
        "    method: POST\n"
        "    path: /leads/export\n"
        "    cost: 5\n"
        "    limit: { requests_per_minute: 6000, burst_limit: 2000 }\n"
        "  - { name: leads-write, method: POST, path: /leads, cost: 2 }\n"
        "  - name: leads_read\n"
        "    method: GET\n"
        "    path: /leads\n"
        "    limit: { requests_per_minute: 60000000, burst_limit: 1 }\n"
        "  - { name: v2, path: \"/v2/~x%20y\" }\n");
    const tg_route_conf *r;

    cr_assert_str_eq(conf->auth.keys_file, "/etc/tollgate/keys.yaml");
    cr_assert_str_eq(conf->auth.header, "X-Tollgate-Key");
    cr_assert_eq(conf->auth.forward_key, 1);
    cr_assert_str_eq(conf->auth.anonymous_tier, "free");
    cr_assert_not_null(tg_conf_tier(conf, conf->auth.anonymous_tier));
    cr_assert_eq(conf->auth.redis_keys, 1);
    cr_assert_eq(conf->auth.cache_ttl_ms, 0);
    cr_assert_eq(conf->redis.max_batch, 512);

    cr_assert_eq(conf->nroutes, 4);
    r = &conf->routes[0];
    cr_assert_str_eq(r->name, "leads_export");
    cr_assert_str_eq(r->method, "POST");
    cr_assert_str_eq(r->path, "/leads/export");
    cr_assert_eq(r->cost, 5);
    cr_assert_eq(r->has_limit, 1);
    cr_assert_eq(r->requests_per_minute, 6000);
    cr_assert_eq(r->burst_limit, 2000);
    r = &conf->routes[1];
    cr_assert_str_eq(r->name, "leads-write");
    cr_assert_str_eq(r->method, "POST");
    cr_assert_str_eq(r->path, "/leads");
    cr_assert_eq(r->cost, 2);
    cr_assert_eq(r->has_limit, 0);
    r = &conf->routes[2];
    cr_assert_str_eq(r->name, "leads_read");
    cr_assert_str_eq(r->method, "GET");
    cr_assert_eq(r->cost, 1);
    cr_assert_eq(r->has_limit, 1);
    cr_assert_eq(r->requests_per_minute, 60000000);
    cr_assert_eq(r->burst_limit, 1);
    r = &conf->routes[3];
    cr_assert_str_eq(r->name, "v2");
    cr_assert_null(r->method);          /* any method */
    cr_assert_str_eq(r->path, "/v2/~x y");   /* matched decoded, as apps see it */
    cr_assert_eq(r->cost, 1);
    cr_assert_eq(r->has_limit, 0);
    tg_conf_unref(conf);

    /* The other header forms, and an empty routes list. */
    conf = expect_ok(MIN "auth: { header: \"x-api_key.v1!#$%&'*+^`|~\" }\n"
                     "routes: []\n");
    cr_assert_str_eq(conf->auth.header, "x-api_key.v1!#$%&'*+^`|~");
    cr_assert_eq(conf->nroutes, 0);
    tg_conf_unref(conf);
}

Test(conf, routes_do_not_need_tiers)
{
    tg_conf *conf = expect_ok(MIN "routes:\n"
                              "  - name: a\n"
                              "    path: /\n"
                              "    limit: { requests_per_minute: 60, burst_limit: 1 }\n");

    cr_assert_eq(conf->ntiers, 0);
    cr_assert_eq(conf->nroutes, 1);
    cr_assert_str_eq(conf->routes[0].path, "/");
    tg_conf_unref(conf);
}

Test(conf, workers_zero_is_cpus)
{
    tg_conf *conf = expect_ok(MIN "workers: 0\n");
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

    cr_assert_gt(ncpu, 0);
    cr_assert_eq(conf->workers, (unsigned)(ncpu > 256 ? 256 : ncpu));
    tg_conf_unref(conf);

    conf = expect_ok(MIN);          /* absent = 0 = CPUs too */
    cr_assert_eq(conf->workers, (unsigned)(ncpu > 256 ? 256 : ncpu));
    tg_conf_unref(conf);
}

Test(conf, size_suffix)
{
    static const struct { const char *text; uint64_t want; } cases[] = {
        { "8m", 8u * 1024 * 1024 },
        { "\"8m\"", 8u * 1024 * 1024 },
        { "512k", 512u * 1024 },
        { "512K", 512u * 1024 },
        { "2g", 2ull * 1024 * 1024 * 1024 },
        { "1234", 1234 },
        { "4294967296g", 4611686018427387904ull },   /* 2^62 exactly */
    };
    char yaml[256];
    size_t i;
    tg_conf *conf;

    for (i = 0; i < TG_ARRAY_LEN(cases); i++) {
        snprintf(yaml, sizeof(yaml), MIN "http: { max_body_bytes: %s }\n",
                 cases[i].text);
        conf = expect_ok(yaml);
        cr_assert_eq(conf->http.max_body_bytes, cases[i].want, "%s", cases[i].text);
        tg_conf_unref(conf);
    }
    expect_error(MIN "http: { max_body_bytes: 4294967297g }\n", "5:25",
                 "out of range (0..4611686018427387904)");
}

Test(conf, relative_paths_resolve_against_config_dir)
{
    char dir[] = "/tmp/tg_test_conf_rel_XXXXXX";
    char path[PATH_MAX], want[PATH_MAX], *real;
    tg_conf *conf;

    cr_assert_not_null(mkdtemp(dir));
    real = realpath(dir, NULL);
    cr_assert_not_null(real);
    snprintf(path, sizeof(path), "%s/tg.yaml", dir);
    write_file(path,
               "listen:\n"
               "  - address: 127.0.0.1:0\n"
               "    tls: { cert: tls/cert.pem, key: /abs/key.pem }\n"
               MIN_UPSTREAM
               "auth: { keys_file: keys.yaml }\n");

    /* Load through a relative, non-canonical path. */
    cr_assert_eq(chdir("/tmp"), 0);
    snprintf(want, sizeof(want), ".//%s/../%s/tg.yaml", dir + 5, dir + 5);
    conf = tg_conf_load(want, err, sizeof(err));
    cr_assert_not_null(conf, "%s", err);

    snprintf(want, sizeof(want), "%s/tg.yaml", real);
    cr_assert_str_eq(conf->path, want);
    cr_assert_str_eq(conf->dir, real);
    snprintf(want, sizeof(want), "%s/tls/cert.pem", real);
    cr_assert_str_eq(conf->listen[0].cert, want);
    cr_assert_str_eq(conf->listen[0].key, "/abs/key.pem");
    snprintf(want, sizeof(want), "%s/keys.yaml", real);
    cr_assert_str_eq(conf->auth.keys_file, want);
    tg_conf_unref(conf);

    unlink(path);
    rmdir(dir);
    free(real);
}

Test(conf, error_names_the_file_as_given)
{
    char dir[] = "/tmp/tg_test_conf_err_XXXXXX";
    char path[PATH_MAX], want[PATH_MAX + 128];
    tg_conf *conf;

    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/bad.yaml", dir);
    write_file(path, MIN "\nhttp:\n  idle_timeout_ms: abc\n");
    conf = tg_conf_load(path, err, sizeof(err));
    cr_assert_null(conf);
    snprintf(want, sizeof(want), "%s:7:20: http.idle_timeout_ms: expected an "
             "integer, got \"abc\"", path);
    cr_assert_str_eq(err, want);
    unlink(path);
    rmdir(dir);
}

Test(conf, refcount)
{
    tg_conf *conf = expect_ok(MIN);

    cr_assert_eq(tg_conf_ref(conf), conf);
    cr_assert_eq(conf->refcnt, 2);
    tg_conf_ref(conf);
    cr_assert_eq(conf->refcnt, 3);
    tg_conf_unref(conf);
    tg_conf_unref(conf);
    cr_assert_eq(conf->refcnt, 1);
    cr_assert_str_eq(conf->upstream.servers[0].text, "127.0.0.1:8000");
    tg_conf_unref(conf);            /* frees; ASan checks for leaks */
    tg_conf_unref(NULL);
}

/* ---- tg_addr_parse ------------------------------------------------------------------- */

Test(addr, forms_resolve_offline)
{
    tg_addr a;
    const struct sockaddr_in *sin = (const struct sockaddr_in *)&a.sa;
    const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&a.sa;

    cr_assert_eq(tg_addr_parse("0.0.0.0:8443", &a, err, sizeof(err)), TG_OK, "%s", err);
    cr_assert_eq(sin->sin_family, AF_INET);
    cr_assert_eq(ntohs(sin->sin_port), 8443);
    cr_assert_eq(sin->sin_addr.s_addr, htonl(INADDR_ANY));
    cr_assert_eq(a.salen, sizeof(struct sockaddr_in));
    cr_assert_str_eq(a.text, "0.0.0.0:8443");

    cr_assert_eq(tg_addr_parse("[::1]:80", &a, err, sizeof(err)), TG_OK, "%s", err);
    cr_assert_eq(sin6->sin6_family, AF_INET6);
    cr_assert_eq(ntohs(sin6->sin6_port), 80);
    cr_assert(IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr));

    cr_assert_eq(tg_addr_parse("[::]:0", &a, err, sizeof(err)), TG_OK, "%s", err);
    cr_assert_eq(ntohs(sin6->sin6_port), 0);
    cr_assert_eq(resolver_calls, 0, "a literal went to the resolver");

    cr_assert_eq(tg_addr_parse("localhost:8000", &a, err, sizeof(err)), TG_OK, "%s", err);
    cr_assert_eq(resolver_calls, 1);
    cr_assert_str_eq(resolver_host, "localhost");
    cr_assert_eq(a.sa.ss_family, AF_INET);
    cr_assert_eq(a.salen, sizeof(struct sockaddr_in));
    cr_assert_eq(sin->sin_addr.s_addr, htonl(INADDR_LOOPBACK));
    cr_assert_eq(ntohs(sin->sin_port), 8000);       /* the port is the parser's */
    cr_assert_str_eq(a.text, "localhost:8000");
}

Test(addr, bad_forms)
{
    static const char *const bad[] = {
        "127.0.0.1", "127.0.0.1:", ":80", "127.0.0.1:http", "127.0.0.1:-1",
        "127.0.0.1:123456", "[::1]80", "[::1", "::1:80", "[]:80", "1.2.3.4:8 ",
    };
    tg_addr a;
    size_t i;

    for (i = 0; i < TG_ARRAY_LEN(bad); i++) {
        cr_assert_eq(tg_addr_parse(bad[i], &a, err, sizeof(err)), TG_ERR,
                     "accepted \"%s\"", bad[i]);
        cr_assert(strstr(err, bad[i]) != NULL, "%s", err);
    }
}

/* ---- upstream breaker and health checks ---------------------------------------------- */

#define TWO_SERVERS MIN_LISTEN "upstream:\n  servers: [127.0.0.1:8000, 127.0.0.1:8001]\n"

Test(conf, upstream_breaker_health_defaults)
{
    tg_conf *conf = expect_ok(MIN);

    cr_assert_eq(conf->upstream.breaker.failures, 5);
    cr_assert_eq(conf->upstream.breaker.window_ms, 10000);
    cr_assert_eq(conf->upstream.breaker.min_requests, 20);
    cr_assert_eq(conf->upstream.breaker.error_pct, 50);
    cr_assert_eq(conf->upstream.breaker.open_ms, 5000);
    cr_assert_eq(conf->upstream.breaker.max_open_ms, 60000);
    cr_assert_eq(conf->upstream.health_check.enabled, 0);
    cr_assert_str_eq(conf->upstream.health_check.path, "/health");
    cr_assert_eq(conf->upstream.health_check.interval_ms, 2000);
    cr_assert_eq(conf->upstream.health_check.timeout_ms, 1000);
    cr_assert_eq(conf->upstream.health_check.healthy, 2);
    cr_assert_eq(conf->upstream.health_check.unhealthy, 2);
    tg_conf_unref(conf);
}

Test(conf, upstream_breaker_health_every_key)
{
    tg_conf *conf = expect_ok(
        TWO_SERVERS
        "  breaker: { failures: 3, window_ms: 0, min_requests: 10, error_pct: 25,\n"
        "             open_ms: 250, max_open_ms: 250 }\n"
        "  health_check:\n"
        "    path: /healthz?deep=1\n"
        "    interval_ms: 500\n"
        "    timeout_ms: 200\n"
        "    healthy: 1\n"
        "    unhealthy: 3\n");

    cr_assert_eq(conf->upstream.nservers, 2);
    cr_assert_eq(conf->upstream.breaker.failures, 3);
    cr_assert_eq(conf->upstream.breaker.window_ms, 0);
    cr_assert_eq(conf->upstream.breaker.min_requests, 10);
    cr_assert_eq(conf->upstream.breaker.error_pct, 25);
    cr_assert_eq(conf->upstream.breaker.open_ms, 250);
    cr_assert_eq(conf->upstream.breaker.max_open_ms, 250);
    cr_assert_eq(conf->upstream.health_check.enabled, 1);
    cr_assert_str_eq(conf->upstream.health_check.path, "/healthz?deep=1");
    cr_assert_eq(conf->upstream.health_check.interval_ms, 500);
    cr_assert_eq(conf->upstream.health_check.timeout_ms, 200);
    cr_assert_eq(conf->upstream.health_check.healthy, 1);
    cr_assert_eq(conf->upstream.health_check.unhealthy, 3);
    tg_conf_unref(conf);
}

/* The block's presence turns the checks on, with every default. */
Test(conf, upstream_health_check_empty_block)
{
    tg_conf *conf = expect_ok(MIN "  health_check: {}\n");

    cr_assert_eq(conf->upstream.health_check.enabled, 1);
    cr_assert_str_eq(conf->upstream.health_check.path, "/health");
    cr_assert_eq(conf->upstream.health_check.interval_ms, 2000);
    tg_conf_unref(conf);
}

Test(conf_errors, upstream_breaker)
{
    expect_error(MIN "  breaker: { failurs: 3 }\n", "5:14",
                 "upstream.breaker.failurs: unknown key \"failurs\" in section "
                 "\"upstream.breaker\" (did you mean \"failures\"?)");
    expect_error(MIN "  breaker: { error_pct: 101 }\n", "5:25",
                 "upstream.breaker.error_pct: 101 is out of range (1..100)");
    expect_error(MIN "  breaker: { window_ms: 60001 }\n", "5:25",
                 "upstream.breaker.window_ms: 60001 is out of range (0..60000)");
    expect_error(MIN "  breaker: { failures: 0 }\n", "5:24",
                 "upstream.breaker.failures: 0 is out of range (1..1000000)");
    expect_error(MIN "  breaker: 5\n", "5:12",
                 "upstream.breaker: expected a mapping, got \"5\"");
}

Test(conf_errors, upstream_breaker_cap_below_open)
{
    expect_error(MIN "  breaker: { open_ms: 10000, max_open_ms: 5000 }\n", "5:43",
                 "upstream.breaker.max_open_ms: max_open_ms must be at least "
                 "upstream.breaker.open_ms (10000), got 5000");
    /* Only open_ms set, above the default cap: point at it. */
    expect_error(MIN "  breaker: { open_ms: 120000 }\n", "5:23",
                 "upstream.breaker.open_ms: max_open_ms must be at least "
                 "upstream.breaker.open_ms (120000), got 60000");
}

Test(conf_errors, upstream_health_check)
{
    expect_error(MIN "  health_check: { path: health }\n", "5:25",
                 "upstream.health_check.path: must start with '/', got \"health\"");
    expect_error(MIN "  health_check: { path: \"/a b\" }\n", "5:25",
                 "upstream.health_check.path: must not contain spaces");
    expect_error(MIN "  health_check: { interval_ms: 5 }\n", "5:32",
                 "upstream.health_check.interval_ms: 5 is out of range (10..3600000)");
    expect_error(MIN "  health_check: { healthy: 0 }\n", "5:28",
                 "upstream.health_check.healthy: 0 is out of range (1..1000)");
    expect_error(MIN "  health_check: { intervl_ms: 100 }\n", "5:19",
                 "unknown key \"intervl_ms\" in section \"upstream.health_check\" "
                 "(did you mean \"interval_ms\"?)");
    expect_error(MIN "  health_check: true\n", "5:17",
                 "upstream.health_check: expected a mapping, got \"true\"");
}

/* ---- every shipped config ------------------------------------------------------------- */

Test(conf, shipped_configs_load)
{
    const char *root = getenv("TG_SOURCE_ROOT");
    char dirpath[PATH_MAX], path[PATH_MAX + 300];
    struct dirent *de;
    size_t n = 0, len;
    DIR *d;
    tg_conf *conf;

    snprintf(dirpath, sizeof(dirpath), "%s/conf", root ? root : ".");
    d = opendir(dirpath);
    cr_assert_not_null(d, "cannot open %s (set TG_SOURCE_ROOT)", dirpath);
    while ((de = readdir(d)) != NULL) {
        len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 5, ".yaml") != 0 ||
            strncmp(de->d_name, "keys", 4) == 0) {
            continue;
        }
        snprintf(path, sizeof(path), "%s/%s", dirpath, de->d_name);
        conf = tg_conf_load(path, err, sizeof(err));
        cr_assert_not_null(conf, "%s", err);
        cr_assert_geq(conf->nlisten, 1);
        cr_assert_geq(conf->upstream.nservers, 1);
        if (strcmp(de->d_name, "tollgate.yaml") == 0 ||
            strcmp(de->d_name, "demo.yaml") == 0) {
            cr_assert_eq(conf->ntiers, 3, "%s", path);
            cr_assert_eq(tg_conf_tier(conf, "basic")->burst_limit, 20);
            cr_assert_eq(tg_conf_tier(conf, "pro")->requests_per_minute, 500);
            cr_assert_eq(tg_conf_tier(conf, "enterprise")->burst_limit, 200);
            cr_assert_not_null(conf->auth.keys_file);
            snprintf(path, sizeof(path), "%s/keys.yaml", conf->dir);
            cr_assert_str_eq(conf->auth.keys_file, path);
        }
        if (strcmp(de->d_name, "tollgate.yaml") == 0) {
            /* the TLS listener is commented out: it names files that a
             * fresh install does not have */
            cr_assert_eq(conf->nlisten, 1);
            cr_assert_eq(conf->listen[0].tls, 0);
            cr_assert_eq(conf->store, TG_STORE_REDIS);
            cr_assert_eq(conf->global_limit.enabled, 1);
            cr_assert_str_eq(conf->auth.header, "X-API-Key");
            cr_assert_eq(conf->auth.redis_keys, 0);
            cr_assert_eq(conf->auth.cache_ttl_ms, 30000);
            cr_assert_eq(conf->redis.max_batch, 32);
            cr_assert_geq(conf->nroutes, 2);
        }
        if (strcmp(de->d_name, "demo.yaml") == 0) {
            cr_assert_eq(conf->workers, 2);
            cr_assert_eq(conf->store, TG_STORE_LOCAL);
            cr_assert_geq(conf->nroutes, 1);
            cr_assert_str_eq(conf->routes[0].method, "GET");
            cr_assert_str_eq(conf->routes[0].path, "/leads");
            cr_assert_eq(conf->routes[0].has_limit, 1);
            cr_assert_eq(conf->routes[0].requests_per_minute, 600);
            cr_assert_eq(conf->routes[0].burst_limit, 50);
        }
        tg_conf_unref(conf);
        n++;
    }
    closedir(d);
    cr_assert_geq(n, 2, "found only %zu configs in %s", n, dirpath);
}

/* ---- redis.sentinel, redis.cluster ---------------------------------------- */

Test(conf, redis_sentinel_and_cluster)
{
    tg_conf *conf = expect_ok(MIN
        "redis:\n"
        "  url: redis://127.0.0.1:6379/2\n"
        "  sentinel:\n"
        "    master: mymaster\n"
        "    addresses: [127.0.0.1:26379, \"[::1]:26380\", localhost:26381]\n");

    cr_assert_str_eq(conf->redis.sentinel_master, "mymaster");
    cr_assert_eq(conf->redis.nsentinels, 3);
    cr_assert_str_eq(conf->redis.sentinels[1].text, "[::1]:26380");
    cr_assert_eq(conf->redis.sentinels[1].sa.ss_family, AF_INET6);
    cr_assert_eq(conf->redis.sentinels[2].salen != 0, 1, "resolved at load");
    cr_assert_str_eq(resolver_host, "localhost");
    cr_assert_eq(conf->redis.ncluster_nodes, 0);
    tg_conf_unref(conf);

    conf = expect_ok(MIN
        "redis:\n"
        "  cluster:\n"
        "    nodes: [127.0.0.1:7000, 127.0.0.1:7001, 127.0.0.1:7002]\n");
    cr_assert_eq(conf->redis.ncluster_nodes, 3);
    cr_assert_str_eq(conf->redis.cluster_nodes[2].text, "127.0.0.1:7002");
    cr_assert_null(conf->redis.sentinel_master);
    cr_assert_eq(conf->redis.nsentinels, 0);
    tg_conf_unref(conf);

    conf = expect_ok(MIN "redis: { url: \"redis://h:6379/0\", cluster: { nodes: [127.0.0.1:7000] } }\n");
    tg_conf_unref(conf);

    conf = expect_ok(MIN "redis: {}\n");
    cr_assert_null(conf->redis.sentinel_master);
    cr_assert_eq(conf->redis.ncluster_nodes, 0);
    tg_conf_unref(conf);
}

Test(conf_errors, redis_sentinel_and_cluster)
{
    expect_error(MIN "redis:\n  sentinel: { master: m }\n", "6:13",
                 "redis.sentinel: missing required key \"addresses\"");
    expect_error(MIN "redis:\n  sentinel: { addresses: [127.0.0.1:1] }\n", "6:13",
                 "redis.sentinel: missing required key \"master\"");
    expect_error(MIN "redis:\n  sentinel: { master: \"a b\", addresses: [127.0.0.1:1] }\n",
                 "6:23", "redis.sentinel.master: must not contain spaces");
    expect_error(MIN "redis:\n  sentinel: { master: m, addresses: [] }\n", "6:37",
                 "redis.sentinel.addresses: needs 1..16 sentinel addresses, got 0");
    expect_error(MIN "redis:\n  sentinel: { master: m, addresses: 127.0.0.1:1 }\n", "6:37",
                 "redis.sentinel.addresses: expected a sequence of addresses");
    expect_error(MIN "redis:\n  sentinel: { master: m, addresses: [127.0.0.1:0] }\n",
                 "6:38", "redis.sentinel.addresses[0]: port 0 is only allowed");
    expect_error(MIN "redis:\n  sentinel: { master: m, addresses: [127.0.0.1] }\n",
                 "6:38", "redis.sentinel.addresses[0]: bad address \"127.0.0.1\"");
    expect_error(MIN "redis:\n  cluster: { nodes: [127.0.0.1:1, 127.0.0.1:1] }\n",
                 "6:35", "redis.cluster.nodes[1]: \"127.0.0.1:1\" is listed twice");
    expect_error(MIN "redis:\n  cluster: { nodez: [127.0.0.1:1] }\n", "6:14",
                 "unknown key \"nodez\" in section \"redis.cluster\" (did you mean \"nodes\"?)");
    expect_error(MIN "redis:\n  cluster: {}\n", "6:12",
                 "redis.cluster: missing required key \"nodes\"");
    expect_error(MIN "redis:\n  sentinel: { master: m, addresses: [127.0.0.1:1] }\n"
                 "  cluster: { nodes: [127.0.0.1:2] }\n", "7:12",
                 "redis.cluster: redis.sentinel and redis.cluster cannot be used together");
    expect_error(MIN "redis:\n  cluster: { nodes: [127.0.0.1:2] }\n"
                 "  sentinel: { master: m, addresses: [127.0.0.1:1] }\n", "7:13",
                 "redis.sentinel: redis.sentinel and redis.cluster cannot be used together");
    expect_error(MIN "redis:\n  url: redis://127.0.0.1:6379/3\n"
                 "  cluster: { nodes: [127.0.0.1:2] }\n", "6:8",
                 "redis.url: Redis Cluster has only database 0");
}

/* ---- redis AUTH --------------------------------------------------------------- */

Test(conf, redis_auth)
{
    char path[] = "/tmp/tg_test_pass_XXXXXX", yaml[512];
    int fd = mkstemp(path);
    tg_conf *conf;

    cr_assert(fd >= 0);
    cr_assert_eq(write(fd, "from-file\n", 10), 10);
    close(fd);
    conf = expect_ok(MIN "redis: { username: tg, password: s3cret }\n");
    cr_assert_str_eq(conf->redis.username, "tg");
    cr_assert_str_eq(conf->redis.password, "s3cret");
    cr_assert_null(conf->redis.sentinel_password);
    tg_conf_unref(conf);

    snprintf(yaml, sizeof(yaml), MIN "redis:\n  password_file: %s\n  sentinel:\n"
             "    master: m\n    addresses: [127.0.0.1:26379]\n    password: other\n", path);
    conf = expect_ok(yaml);
    cr_assert_str_eq(conf->redis.password, "from-file", "read once, newline stripped");
    cr_assert_null(conf->redis.username);
    cr_assert_str_eq(conf->redis.sentinel_password, "other");
    tg_conf_unref(conf);
    unlink(path);
}

Test(conf_errors, redis_auth)
{
    char path[] = "/tmp/tg_test_pass_XXXXXX", yaml[512];
    int fd = mkstemp(path);

    cr_assert(fd >= 0);
    cr_assert_eq(write(fd, "two words\n", 10), 10);
    close(fd);
    expect_error(MIN "redis: { username: tg }\n", "5:20",
                 "redis.username: redis.username needs redis.password or "
                 "redis.password_file");
    expect_error(MIN "redis: { password: a, password_file: /x }\n", "5:38",
                 "redis.password and redis.password_file cannot be used together");
    expect_error(MIN "redis: { password: \"a b\" }\n", "5:20",
                 "redis.password: must not contain spaces or control characters");
    expect_error(MIN "redis: { password: \"\" }\n", "5:20", "redis.password: length 0");
    expect_error(MIN "redis: { password_file: /nonexistent/tg-pass }\n", "5:25",
                 "/nonexistent/tg-pass: cannot open");
    snprintf(yaml, sizeof(yaml), MIN "redis: { password_file: %s }\n", path);
    expect_error(yaml, "5:25", "the password must be one line");
    cr_assert_null(strstr(err, "two words"), "the secret is never echoed: %s", err);
    expect_error(MIN "redis:\n  sentinel: { master: m, addresses: [127.0.0.1:1], "
                 "username: u }\n", "6:62", "redis.sentinel.username needs "
                 "redis.sentinel.password");
    unlink(path);
}

Test(conf, metrics_access_log_instances)
{
    tg_conf *conf = expect_ok(MIN
        "metrics:\n"
        "  statsd: { address: 127.0.0.1:8125, prefix: tg, flush_ms: 500, tags: true }\n"
        "access_log: { path: /var/log/tollgate/access.log }\n"
        "redis: { instances: 3 }\n");

    cr_assert_eq(conf->metrics.statsd_enabled, 1);
    cr_assert_str_eq(conf->metrics.statsd.text, "127.0.0.1:8125");
    cr_assert_str_eq(conf->metrics.statsd_prefix, "tg");
    cr_assert_eq(conf->metrics.statsd_flush_ms, 500);
    cr_assert_eq(conf->metrics.statsd_tags, 1);
    cr_assert_str_eq(conf->access_log.path, "/var/log/tollgate/access.log");
    cr_assert_eq(conf->redis.instances, 3);
    tg_conf_unref(conf);

    conf = expect_ok(MIN);
    cr_assert_eq(conf->metrics.statsd_enabled, 0);
    cr_assert_str_eq(conf->metrics.statsd_prefix, "tollgate");
    cr_assert_eq(conf->metrics.statsd_flush_ms, 10000);
    cr_assert_null(conf->access_log.path);
    cr_assert_eq(conf->redis.instances, 1);
    tg_conf_unref(conf);
}

Test(conf_errors, metrics_access_log_instances)
{
    expect_error(MIN "metrics:\n  statsd: { prefix: tg }\n", "6:11",
                 "missing required key \"address\"");
    expect_error(MIN "metrics:\n  statsd: { address: 127.0.0.1:8125, flush_ms: 50 }\n",
                 "6:48", "out of range (100..3600000)");
    expect_error(MIN "metrics:\n  statsd: { address: \"127.0.0.1:0\" }\n", "6:22", "port 0");
    expect_error(MIN "metrics:\n  stats: {}\n", "6:3", "unknown key \"stats\"");
    expect_error(MIN "access_log: {}\n", "5:13", "missing required key \"path\"");
    expect_error(MIN "redis: { instances: 0 }\n", "5:21", "out of range (1..1000)");
}

/* ---- http.trusted_proxies -------------------------------------------------- */

Test(conf, trusted_proxies)
{
    tg_conf *conf = expect_ok(MIN "http:\n  trusted_proxies: [10.0.0.0/8, \"::1\", "
                              "\"fd00::/8\"]\n");

    cr_assert_eq(conf->http.ntrusted_proxies, 3);
    cr_expect(tg_cidr_match(conf->http.trusted_proxies, 3, "10.9.9.9"));
    cr_expect(tg_cidr_match(conf->http.trusted_proxies, 3, "::1"));
    cr_expect(!tg_cidr_match(conf->http.trusted_proxies, 3, "127.0.0.1"));
    tg_conf_unref(conf);
    conf = expect_ok(MIN);
    cr_expect_eq(conf->http.ntrusted_proxies, 0);       /* default: trust nobody */
    tg_conf_unref(conf);
    conf = expect_ok(MIN "http:\n  trusted_proxies: []\n");
    cr_expect_eq(conf->http.ntrusted_proxies, 0);
    tg_conf_unref(conf);

    expect_error(MIN "http:\n  trusted_proxies: [10.0.0.1/8]\n", "6:21",
                 "http.trusted_proxies[0]: bad range \"10.0.0.1/8\": host bits set");
    expect_error(MIN "http:\n  trusted_proxies: [127.0.0.1, lb.internal]\n", "6:32",
                 "http.trusted_proxies[1]: bad range \"lb.internal\": not an IPv4 "
                 "or IPv6 address");
    expect_error(MIN "http:\n  trusted_proxies: 10.0.0.0/8\n", "6:20",
                 "http.trusted_proxies: expected a sequence of addresses or CIDR ranges");
}

/* ---- alerts ---------------------------------------------------------------- */

Test(conf_alerts, absent_section_is_off_with_the_documented_defaults)
{
    tg_conf *conf = expect_ok(MIN);

    cr_assert_eq(conf->alerts.enabled, 0);
    cr_assert_eq(conf->alerts.cooldown_ms, 300000);
    cr_assert_eq(conf->alerts.rule[TG_RULE_REDIS_DOWN].after_ms, 300000);
    cr_assert_eq(conf->alerts.rule[TG_RULE_BREACHES].threshold, 1000);
    cr_assert_eq(conf->alerts.rule[TG_RULE_BREACHES].window_ms, 60000);
    cr_assert_eq(conf->alerts.rule[TG_RULE_UPSTREAM_ERRORS].min_requests, 100);
    cr_assert_str_eq(conf->alerts.channel[TG_ALERT_PAGERDUTY].url,
                     "https://events.pagerduty.com/v2/enqueue");
    tg_conf_unref(conf);
}

/* The shape of DESIGN.md, secrets from files (LoadCredential=). */
Test(conf_alerts, design_shape_with_secret_files)
{
    char dir[] = "/tmp/tg_test_conf_alerts_XXXXXX", slack[128], pd[128], *yaml;
    tg_conf *conf;
    const tg_alert_rule_conf *r;

    cr_assert_not_null(mkdtemp(dir));
    snprintf(slack, sizeof(slack), "%s/slack", dir);
    snprintf(pd, sizeof(pd), "%s/pd", dir);
    write_file(slack, "https://hooks.slack.example/services/T/B/x\n");
    write_file(pd, "  routingkey123 \n\n");
    cr_assert(asprintf(&yaml, MIN
        "alerts:\n"
        "  slack:     { webhook_url_file: %s }\n"
        "  pagerduty: { routing_key_file: %s, url: https://pd.example/v2/enqueue }\n"
        "  webhook:   { url: http://127.0.0.1:9999/hook }\n"
        "  cooldown_ms: 300000\n"
        "  rules:\n"
        "    breaches:        { threshold: 1000, window_ms: 60000, to: [slack] }\n"
        "    redis_down:      { after_ms: 300000, to: [slack, pagerduty] }\n"
        "    breaker_open:    { to: [pagerduty] }\n"
        "    upstream_errors: { ratio: 0.05, window_ms: 60000, min_requests: 100, "
        "to: [pagerduty] }\n", slack, pd) > 0);
    conf = expect_ok(yaml);
    cr_assert_eq(conf->alerts.enabled, 1);
    cr_assert_str_eq(conf->alerts.channel[TG_ALERT_SLACK].url,
                     "https://hooks.slack.example/services/T/B/x");
    cr_assert_str_eq(conf->alerts.channel[TG_ALERT_PAGERDUTY].key, "  routingkey123"
                     + 2);
    cr_assert_str_eq(conf->alerts.channel[TG_ALERT_PAGERDUTY].url,
                     "https://pd.example/v2/enqueue");
    cr_assert_str_eq(conf->alerts.channel[TG_ALERT_WEBHOOK].url,
                     "http://127.0.0.1:9999/hook");
    r = conf->alerts.rule;
    cr_assert(r[TG_RULE_BREACHES].enabled && r[TG_RULE_BREACHES].to == 1u << TG_ALERT_SLACK);
    cr_assert_eq(r[TG_RULE_REDIS_DOWN].to, 1u << TG_ALERT_SLACK | 1u << TG_ALERT_PAGERDUTY);
    cr_assert_eq(r[TG_RULE_BREAKER_OPEN].to, 1u << TG_ALERT_PAGERDUTY);
    cr_assert(r[TG_RULE_UPSTREAM_ERRORS].ratio > 0.0499 && r[TG_RULE_UPSTREAM_ERRORS].ratio < 0.0501);
    tg_conf_unref(conf);
    free(yaml);
    unlink(slack);
    unlink(pd);
    rmdir(dir);
}

Test(conf_alerts, without_rules_every_rule_goes_to_its_configured_default_channels)
{
    tg_conf *conf = expect_ok(MIN "alerts:\n  slack: { webhook_url: https://h.example/x }\n");
    const tg_alert_rule_conf *r = conf->alerts.rule;

    cr_assert(r[TG_RULE_BREACHES].enabled && r[TG_RULE_BREACHES].to == 1u << TG_ALERT_SLACK);
    cr_assert(r[TG_RULE_REDIS_DOWN].enabled && r[TG_RULE_REDIS_DOWN].to == 1u << TG_ALERT_SLACK);
    cr_assert(!r[TG_RULE_BREAKER_OPEN].enabled);        /* PagerDuty only */
    cr_assert(!r[TG_RULE_UPSTREAM_ERRORS].enabled);
    tg_conf_unref(conf);
}

Test(conf_alerts, errors_never_show_a_secret)
{
    expect_error(MIN "alerts:\n  slack: { webhook_url: \"ftp://SECRET/x\" }\n", "6:25",
                 "must be an http:// or https:// URL (value not shown: a secret)");
    cr_assert(strstr(err, "SECRET") == NULL, "%s", err);
    expect_error(MIN "alerts:\n  pagerduty: { routing_key: \"SECRET key\" }\n", "6:29",
                 "must not contain spaces");
    cr_assert(strstr(err, "SECRET") == NULL, "%s", err);
}

Test(conf_alerts, errors)
{
    expect_error(MIN "alerts:\n  slack: {}\n", "6:10",
                 "alerts.slack: needs exactly one of webhook_url and webhook_url_file");
    expect_error(MIN "alerts:\n  pagerduty: { url: https://x.example/ }\n", "6:14",
                 "needs exactly one of routing_key and routing_key_file");
    expect_error(MIN "alerts:\n  webhook: { url_file: /nonexistent/tg-hook }\n", "6:24",
                 "/nonexistent/tg-hook: cannot open");
    expect_error(MIN "alerts:\n  slack: { webhook_url: https://h.example/x }\n"
                 "  rules:\n    breaches: { to: [pagerduty] }\n", "8:21",
                 "alerts.rules.breaches.to: channel \"pagerduty\" is not configured");
    expect_error(MIN "alerts:\n  slack: { webhook_url: https://h.example/x }\n"
                 "  rules:\n    breaches: { to: [slack, teams] }\n", "8:29",
                 "unknown channel \"teams\"");
    expect_error(MIN "alerts:\n  slack: { webhook_url: https://h.example/x }\n"
                 "  rules:\n    breaches: { to: [slack, slack] }\n", "8:29",
                 "listed twice");
    expect_error(MIN "alerts:\n  slack: { webhook_url: https://h.example/x }\n"
                 "  rules:\n    upstream_errors: { ratio: 1.5, to: [slack] }\n", "8:31",
                 "expected a number in (0, 1]");
    expect_error(MIN "alerts:\n  slack: { webhook_url: https://h.example/x }\n"
                 "  rules:\n    redis_down: { after: 5 }\n", "8:19",
                 "unknown key \"after\"");
}

/* What a reload would change in the store section, field by field (the
 * running process keeps its store as started and names each one). */
Test(conf, store_diff_names_every_changed_field)
{
    tg_conf *a = expect_ok(MIN "redis: { url: \"redis://127.0.0.1:6379/0\" }\n");
    tg_conf *b = expect_ok(MIN "redis: { url: \"redis://127.0.0.1:6379/0\" }\n");
    tg_conf *c = expect_ok(MIN "store: local\n"
                           "redis: { url: \"redis://127.0.0.1:6380/0\", timeout_ms: 9, "
                           "on_failure: deny, prefix: \"x:\", max_batch: 4, instances: 2,"
                           " native: off, cluster: { nodes: [127.0.0.1:7000] } }\n");
    char buf[256];

    cr_assert_eq(tg_conf_store_diff(a, b, buf, sizeof(buf)), 0);
    cr_assert_str_eq(buf, "");
    cr_assert_eq(tg_conf_store_diff(a, c, buf, sizeof(buf)), 9);
    cr_assert_str_eq(buf, "store, redis.url, redis.timeout_ms, redis.on_failure, "
                     "redis.prefix, redis.max_batch, redis.instances, redis.native, "
                     "redis.cluster");
    tg_conf_unref(a);
    tg_conf_unref(b);
    tg_conf_unref(c);
}

/* ---- anomaly ------------------------------------------------------------ */

Test(conf_anomaly, absent_is_off_and_defaults)
{
    tg_conf *conf = expect_ok(MIN);

    cr_assert_eq(conf->anomaly.enabled, 0);
    tg_conf_unref(conf);
    conf = expect_ok(MIN "anomaly: {}\n");
    cr_assert_eq(conf->anomaly.enabled, 1);
    cr_assert_eq(conf->anomaly.window_ms, 60000);
    cr_assert_eq(conf->anomaly.top_k, 20);
    cr_assert_float_eq(conf->anomaly.spike_factor, 10.0, 1e-12);
    cr_assert_eq(conf->anomaly.min_requests, 100);
    cr_assert_float_eq(conf->anomaly.new_key_share, 0.5, 1e-12);
    tg_conf_unref(conf);
    conf = expect_ok(MIN "anomaly: { window_ms: 500, top_k: 5, spike_factor: 2.5, "
                     "min_requests: 7, new_key_share: 0.3 }\n");
    cr_assert_eq(conf->anomaly.window_ms, 500);
    cr_assert_eq(conf->anomaly.top_k, 5);
    cr_assert_float_eq(conf->anomaly.spike_factor, 2.5, 1e-12);
    cr_assert_eq(conf->anomaly.min_requests, 7);
    cr_assert_float_eq(conf->anomaly.new_key_share, 0.3, 1e-12);
    tg_conf_unref(conf);
}

Test(conf_anomaly, rule_goes_to_slack_by_default)
{
    tg_conf *conf = expect_ok(MIN "alerts:\n  slack: { webhook_url: https://h.example/x }\n");

    cr_assert(conf->alerts.rule[TG_RULE_ANOMALY].enabled);
    cr_assert_eq(conf->alerts.rule[TG_RULE_ANOMALY].to, 1u << TG_ALERT_SLACK);
    tg_conf_unref(conf);
    conf = expect_ok(MIN "alerts:\n  slack: { webhook_url: https://h.example/x }\n"
                     "  webhook: { url: http://127.0.0.1:1/h }\n"
                     "  rules:\n    anomaly: { to: [webhook] }\n");
    cr_assert(conf->alerts.rule[TG_RULE_ANOMALY].enabled);
    cr_assert_eq(conf->alerts.rule[TG_RULE_ANOMALY].to, 1u << TG_ALERT_WEBHOOK);
    cr_assert(!conf->alerts.rule[TG_RULE_BREACHES].enabled, "rules: lists what runs");
    tg_conf_unref(conf);
}

Test(conf_anomaly, errors)
{
    expect_error(MIN "anomaly: { window_ms: 50 }\n", "5:23", "anomaly.window_ms");
    expect_error(MIN "anomaly: { top_k: 0 }\n", "5:19", "anomaly.top_k");
    expect_error(MIN "anomaly: { top_k: 1001 }\n", "5:19", "(1..1000)");
    expect_error(MIN "anomaly: { spike_factor: 1 }\n", "5:26",
                 "expected a number above 1 and at most 1000, got \"1\"");
    expect_error(MIN "anomaly: { spike_factor: ten }\n", "5:26", "above 1");
    expect_error(MIN "anomaly: { min_requests: 0 }\n", "5:26", "anomaly.min_requests");
    expect_error(MIN "anomaly: { new_key_share: 0 }\n", "5:27", "in (0, 1]");
    expect_error(MIN "anomaly: { spike: 10 }\n", "5:12", "unknown key \"spike\"");
    expect_error(MIN "alerts:\n  slack: { webhook_url: https://h.example/x }\n"
                 "  rules:\n    anomaly: { to: [pagerduty] }\n", "8:20",
                 "alerts.rules.anomaly.to: channel \"pagerduty\" is not configured");
}

/* ---- leases ------------------------------------------------------------------ */

Test(conf, tier_lease)
{
    tg_conf *conf = expect_ok(MIN "rate_limits:\n"
                              "  a: { requests_per_minute: 60, burst_limit: 20 }\n"
                              "  b: { requests_per_minute: 60, burst_limit: 20, "
                              "lease: { size: 5 } }\n"
                              "  c: { requests_per_minute: 60, burst_limit: 20, "
                              "lease: { size: 20, ttl_ms: 250 } }\n");

    cr_assert_eq(conf->tiers[0].lease_size, 0u, "off by default");
    cr_assert_eq(conf->tiers[1].lease_size, 5u);
    cr_assert_eq(conf->tiers[1].lease_ttl_ms, 1000u, "ttl default");
    cr_assert_eq(conf->tiers[2].lease_size, 20u);
    cr_assert_eq(conf->tiers[2].lease_ttl_ms, 250u);
    tg_conf_unref(conf);
}

Test(conf_errors, lease_above_burst)
{
    expect_error(MIN "rate_limits:\n  basic: { requests_per_minute: 1, burst_limit: 4, "
                 "lease: { size: 5 } }\n", "6:3", "lease.size 5 is above burst_limit 4");
}

Test(conf_errors, lease_needs_size)
{
    expect_error(MIN "rate_limits:\n  basic: { requests_per_minute: 1, burst_limit: 4, "
                 "lease: { ttl_ms: 5 } }\n", "6:59", "lease: missing required key \"size\"");
}

Test(conf_errors, lease_zero)
{
    expect_error(MIN "rate_limits:\n  basic: { requests_per_minute: 1, burst_limit: 4, "
                 "lease: { size: 0 } }\n", "6:67", "lease.size: 0 is out of range");
}

/* upstream.keepalive: auto (the default) or a number; anything else is a
 * clear error. */
Test(conf, upstream_keepalive_auto_or_number)
{
    tg_conf *conf = expect_ok(MIN_LISTEN MIN_UPSTREAM "  keepalive: auto\n");

    cr_assert_eq(conf->upstream.keepalive, TG_UPSTREAM_KEEPALIVE_AUTO);
    tg_conf_unref(conf);
    conf = expect_ok(MIN_LISTEN MIN_UPSTREAM "  keepalive: 64\n");
    cr_assert_eq(conf->upstream.keepalive, 64);
    tg_conf_unref(conf);
    expect_error(MIN_LISTEN MIN_UPSTREAM "  keepalive: lots\n", "5:14",
                 "upstream.keepalive: expected an integer or auto");
    expect_error(MIN_LISTEN MIN_UPSTREAM "  keepalive: 70000\n", "5:14",
                 "out of range");
}

/* http.reuseport: off by default, a bool. */
Test(conf, http_reuseport)
{
    tg_conf *conf = expect_ok(MIN);

    cr_assert_eq(conf->http.reuseport, 0);
    tg_conf_unref(conf);
    conf = expect_ok(MIN "http:\n  reuseport: true\n");
    cr_assert_eq(conf->http.reuseport, 1);
    tg_conf_unref(conf);
    expect_error(MIN "http:\n  reuseport: yes\n", "6:14", "http.reuseport: expected a bool");
}
