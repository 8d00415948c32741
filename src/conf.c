/*
 * conf.c - load, check and build a configuration snapshot.
 *
 * Phases (twemproxy conf_pre_validate / parse / post_validate, nginx
 * ngx_command_t):
 *
 *   1. structure  read the text, scan its YAML events once to reject what we
 *                 do not support (anchors, aliases, several documents) with
 *                 the exact mark, then load the node tree;
 *   2. parse      walk the tree through the directive tables below
 *                 (conf_walk.c walks): unknown keys, duplicates, wrong
 *                 types, ranges and enum values are caught here, at the
 *                 mark of the offending key or value;
 *   3. validate   cross-field rules and derived values (workers: 0 = CPUs);
 *   4. resolve    turn every address into a sockaddr (getaddrinfo).
 *
 * The walker, the generic setters and the error format are in conf_walk.c;
 * what these files share is declared in conf_int.h.
 *
 * Defaults are set in ONE place, defaults(), before phase 2; a key
 * present in the file overwrites its default.  The first error stops the
 * load: every message is "FILE:LINE:COL: key.path: what is wrong".
 */
#include "tollgate/conf.h"

#include <ctype.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>

#include "tollgate/target.h"

#include "conf_int.h"

/* ---- static prototypes ------------------------------------------------- */

static int addrs_differ(const tg_addr *a, size_t na, const tg_addr *b, size_t nb);
static int str_differ(const char *a, const char *b);
static tg_rc resolve_getaddrinfo(const char *host, struct sockaddr_storage *sa,
                                 socklen_t *salen, char *why, size_t whylen);
static tg_conf *build(const char *name, const char *text, size_t len, char *path,
                      char *dir, char *err, size_t errlen);
static void defaults(tg_conf *conf);
static void conf_free(tg_conf *conf);
static tg_rc structure(tg_conf_ctx *ctx);
static tg_rc password(tg_conf_ctx *ctx, char **pass, char **file, char **user,
                      const char *section);
static tg_rc validate(tg_conf_ctx *ctx);
static tg_rc check_costs(tg_conf_ctx *ctx);
static tg_rc check_rate(tg_conf_ctx *ctx, const uint32_t *field, uint64_t per_us);
static tg_rc check_rates(tg_conf_ctx *ctx);
static tg_rc resolve_one(tg_conf_ctx *ctx, tg_addr *addr, const char *defpath,
                         int allow_port0);
static int same_listener(const tg_addr *a, const tg_addr *b);
static tg_rc resolve(tg_conf_ctx *ctx);
static TG_CONF_SETTER(set_url);
static tg_rc parse_ulong(const char *s, size_t len, unsigned long max,
                         unsigned long *out);
static TG_CONF_SETTER(set_keepalive);
static int tchar(unsigned char c);
static TG_CONF_SETTER(set_token);
static TG_CONF_SETTER(set_name);
static TG_CONF_SETTER(set_method);
static TG_CONF_SETTER(set_route_prefix);
static TG_CONF_SETTER(set_route_limit);
static TG_CONF_SETTER(set_tls);
static TG_CONF_SETTER(set_servers);
static TG_CONF_SETTER(set_trusted_proxies);
static tg_rc addr_list(tg_conf_ctx *ctx, yaml_node_t *node, const char *path,
                       tg_addr **out, size_t *n, const char *what);
static TG_CONF_SETTER(set_sentinel);
static TG_CONF_SETTER(set_cluster);
static TG_CONF_SETTER(set_sentinel_addrs);
static TG_CONF_SETTER(set_cluster_nodes);
static TG_CONF_SETTER(set_channel);
static TG_CONF_SETTER(set_rule);
static TG_CONF_SETTER(set_to);
static tg_rc read_secret(tg_conf_ctx *ctx, const void *field, const char *file,
                         char **out, int is_url, const char *defpath);
static TG_CONF_SETTER(set_shed_order);

/* ---- tables ------------------------------------------------------------ */

const tg_conf_enum tg_conf_store_enum[] = {
    { "redis", TG_STORE_REDIS }, { "local", TG_STORE_LOCAL }, { NULL, 0 },
};

static const tg_conf_enum failure_enum[] = {
    { "local", TG_FAIL_LOCAL }, { "allow", TG_FAIL_ALLOW },
    { "deny", TG_FAIL_DENY }, { NULL, 0 },
};

static const tg_conf_enum level_enum[] = {
    { "debug", TG_LOG_DEBUG }, { "info", TG_LOG_INFO },
    { "warn", TG_LOG_WARN }, { "error", TG_LOG_ERROR }, { NULL, 0 },
};

static const tg_conf_cmd tls_cmds[] = {
    { "cert", tg_conf_set_path, TG_FIELD(tg_listen_conf, cert), 0, 0,
      TG_CONF_REQUIRED, NULL },
    { "key", tg_conf_set_path, TG_FIELD(tg_listen_conf, key), 0, 0,
      TG_CONF_REQUIRED, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd listen_cmds[] = {
    { "address", tg_conf_set_addr, TG_FIELD(tg_listen_conf, addr), 0, 0,
      TG_CONF_REQUIRED | TG_CONF_PORT0, NULL },
    { "tls", set_tls, TG_NOFIELD, 0, 0, 0, tls_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_admin_cmds[] = {
    { "enabled", tg_conf_set_bool, TG_FIELD(tg_conf, admin_enabled), 0, 1, 0, NULL },
    { "address", tg_conf_set_addr, TG_FIELD(tg_conf, admin), 0, 0,
      TG_CONF_PORT0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_http_cmds[] = {
    { "max_request_line", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.max_request_line), 256, 1048576, 0, NULL },
    { "max_header_bytes", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.max_header_bytes), 1024, 1048576, 0, NULL },
    { "max_headers", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.max_headers), 1, 128, 0, NULL },
    { "max_body_bytes", tg_conf_set_size,
      TG_FIELD(tg_conf, http.max_body_bytes), 0, TG_2P62, 0, NULL },
    { "header_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.header_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "handshake_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.handshake_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "body_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.body_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "idle_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.idle_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "send_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.send_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "max_requests_per_connection", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.max_requests_per_connection), 0, TG_2P31, 0, NULL },
    { "trusted_proxies", set_trusted_proxies, TG_NOFIELD, 0, 0, 0, NULL },
    { "max_connections", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.max_connections), 0, 10000000, 0, NULL },
    { "max_connections_per_ip", tg_conf_set_uint,
      TG_FIELD(tg_conf, http.max_connections_per_ip), 0, 10000000, 0, NULL },
    { "reuseport", tg_conf_set_bool, TG_FIELD(tg_conf, http.reuseport), 0, 1, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* The breaker of each upstream server (see breaker.h for the rules). */
static const tg_conf_cmd breaker_cmds[] = {
    { "failures", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.breaker.failures), 1, 1000000, 0, NULL },
    { "window_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.breaker.window_ms), 0, 60000, 0, NULL },
    { "min_requests", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.breaker.min_requests), 1, 1000000, 0, NULL },
    { "error_pct", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.breaker.error_pct), 1, 100, 0, NULL },
    { "open_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.breaker.open_ms), 1, TG_MS_MAX, 0, NULL },
    { "max_open_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.breaker.max_open_ms), 1, TG_MS_MAX, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd health_cmds[] = {
    { "path", tg_conf_set_route_path,
      TG_FIELD(tg_conf, upstream.health_check.path), 1, TG_CONF_ROUTE_PATH, 0, NULL },
    { "interval_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.health_check.interval_ms), 10, TG_MS_MAX, 0, NULL },
    { "timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.health_check.timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "healthy", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.health_check.healthy), 1, 1000, 0, NULL },
    { "unhealthy", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.health_check.unhealthy), 1, 1000, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_upstream_cmds[] = {
    { "servers", set_servers, TG_NOFIELD, 0, 0, TG_CONF_REQUIRED, NULL },
    { "connect_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.connect_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "first_byte_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.first_byte_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "total_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.total_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "keepalive", set_keepalive,
      TG_FIELD(tg_conf, upstream.keepalive), 0, 65535, 0, NULL },
    { "keepalive_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, upstream.keepalive_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { "breaker", tg_conf_set_section, TG_NOFIELD, 0, 0, 0, breaker_cmds },
    { "health_check", tg_conf_set_present, TG_FIELD(tg_conf, upstream.health_check.enabled),
      0, 0, 0, health_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd lease_cmds[] = {
    { "size", tg_conf_set_uint, TG_FIELD(tg_tier_conf, lease_size), 1, 100000000,
      TG_CONF_REQUIRED, NULL },
    { "ttl_ms", tg_conf_set_uint, TG_FIELD(tg_tier_conf, lease_ttl_ms), 1, 3600000,
      0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_tier_cmds[] = {
    { "requests_per_minute", tg_conf_set_uint,
      TG_FIELD(tg_tier_conf, requests_per_minute), 1, 100000000,
      TG_CONF_REQUIRED, NULL },
    { "burst_limit", tg_conf_set_uint,
      TG_FIELD(tg_tier_conf, burst_limit), 1, 100000000, TG_CONF_REQUIRED, NULL },
    { "lease", tg_conf_set_section, TG_NOFIELD, 0, 0, 0, lease_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* Sentinel master names are written into commands: no spaces. */
static const tg_conf_cmd sentinel_cmds[] = {
    { "master", tg_conf_set_prefix, TG_FIELD(tg_conf, redis.sentinel_master), 1, 63,
      TG_CONF_REQUIRED, NULL },
    { "addresses", set_sentinel_addrs, TG_NOFIELD, 0, 0, TG_CONF_REQUIRED, NULL },
    { "username", tg_conf_set_prefix, TG_FIELD(tg_conf, redis.sentinel_username), 1, 127,
      0, NULL },
    { "password", tg_conf_set_secret, TG_FIELD(tg_conf, redis.sentinel_password), 1, 511,
      0, NULL },
    { "password_file", tg_conf_set_path,
      TG_FIELD(tg_conf, redis.sentinel_password_file), 0, 0, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd cluster_cmds[] = {
    { "nodes", set_cluster_nodes, TG_NOFIELD, 0, 0, TG_CONF_REQUIRED, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_redis_cmds[] = {
    { "url", set_url, TG_FIELD(tg_conf, redis.url), 0, 0, 0, NULL },
    { "timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, redis.timeout_ms), 1, 60000, 0, NULL },
    { "on_failure", tg_conf_set_enum,
      TG_FIELD(tg_conf, redis.on_failure), 0, 0, 0, failure_enum },
    { "prefix", tg_conf_set_prefix, TG_FIELD(tg_conf, redis.prefix), 1, 64, 0, NULL },
    { "max_batch", tg_conf_set_uint,
      TG_FIELD(tg_conf, redis.max_batch), 1, 512, 0, NULL },
    { "instances", tg_conf_set_uint,
      TG_FIELD(tg_conf, redis.instances), 1, 1000, 0, NULL },
    { "sentinel", set_sentinel, TG_NOFIELD, 0, 0, 0, sentinel_cmds },
    { "cluster", set_cluster, TG_NOFIELD, 0, 0, 0, cluster_cmds },
    { "username", tg_conf_set_prefix, TG_FIELD(tg_conf, redis.username), 1, 127, 0, NULL },
    { "password", tg_conf_set_secret, TG_FIELD(tg_conf, redis.password), 1, 511, 0, NULL },
    { "password_file", tg_conf_set_path, TG_FIELD(tg_conf, redis.password_file), 0, 0, 0,
      NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* Lookups of keys the worker does not know, per client IP (both fields
 * optional: the defaults are in defaults()). */
static const tg_conf_cmd unknown_key_cmds[] = {
    { "requests_per_minute", tg_conf_set_uint,
      TG_FIELD(tg_conf, auth.unknown_key_limit.requests_per_minute), 1, 100000000,
      0, NULL },
    { "burst_limit", tg_conf_set_uint,
      TG_FIELD(tg_conf, auth.unknown_key_limit.burst_limit), 1, 100000000, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* anonymous_tier is checked against rate_limits in phase 3: the sections
 * may come in any order. */
const tg_conf_cmd tg_conf_auth_cmds[] = {
    { "keys_file", tg_conf_set_path, TG_FIELD(tg_conf, auth.keys_file), 0, 0, 0, NULL },
    { "header", set_token, TG_FIELD(tg_conf, auth.header), 1, 64, 0, NULL },
    { "forward_key", tg_conf_set_bool,
      TG_FIELD(tg_conf, auth.forward_key), 0, 1, 0, NULL },
    { "anonymous_tier", tg_conf_set_string,
      TG_FIELD(tg_conf, auth.anonymous_tier), 0, 0, 0, NULL },
    { "redis_keys", tg_conf_set_bool,
      TG_FIELD(tg_conf, auth.redis_keys), 0, 1, 0, NULL },
    { "cache_ttl_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, auth.cache_ttl_ms), 0, TG_MS_MAX, 0, NULL },
    { "anonymous_ipv6_prefix", tg_conf_set_uint,
      TG_FIELD(tg_conf, auth.anonymous_ipv6_prefix), 1, 128, 0, NULL },
    { "unknown_key_limit", tg_conf_set_section, TG_NOFIELD, 0, 0, 0,
      unknown_key_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* Same ranges as a tier. */
static const tg_conf_cmd route_limit_cmds[] = {
    { "requests_per_minute", tg_conf_set_uint,
      TG_FIELD(tg_route_conf, requests_per_minute), 1, 100000000,
      TG_CONF_REQUIRED, NULL },
    { "burst_limit", tg_conf_set_uint,
      TG_FIELD(tg_route_conf, burst_limit), 1, 100000000, TG_CONF_REQUIRED, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_route_cmds[] = {
    { "name", set_name, TG_FIELD(tg_route_conf, name), 1,
      TG_TIER_MAX, TG_CONF_REQUIRED, NULL },
    { "method", set_method, TG_FIELD(tg_route_conf, method), 1,
      TG_CONF_METHOD_MAX, 0, NULL },
    { "path", set_route_prefix, TG_FIELD(tg_route_conf, path), 1,
      TG_CONF_ROUTE_PATH, TG_CONF_REQUIRED, NULL },
    { "cost", tg_conf_set_uint, TG_FIELD(tg_route_conf, cost), 1, 1000, 0, NULL },
    { "limit", set_route_limit, TG_NOFIELD, 0, 0, 0,
      route_limit_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_global_cmds[] = {
    { "requests_per_second", tg_conf_set_uint,
      TG_FIELD(tg_conf, global_limit.requests_per_second), 1, 100000000,
      TG_CONF_REQUIRED, NULL },
    { "burst", tg_conf_set_uint, TG_FIELD(tg_conf, global_limit.burst),
      1, 100000000, TG_CONF_REQUIRED, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd statsd_cmds[] = {
    { "address", tg_conf_set_addr, TG_FIELD(tg_conf, metrics.statsd), 0, 0,
      TG_CONF_REQUIRED, NULL },
    { "prefix", tg_conf_set_prefix, TG_FIELD(tg_conf, metrics.statsd_prefix), 1, 64,
      0, NULL },
    { "flush_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, metrics.statsd_flush_ms), 100, TG_MS_MAX, 0, NULL },
    { "tags", tg_conf_set_bool, TG_FIELD(tg_conf, metrics.statsd_tags), 0, 1, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_metrics_cmds[] = {
    { "statsd", tg_conf_set_present, TG_FIELD(tg_conf, metrics.statsd_enabled),
      0, 0, 0, statsd_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_access_log_cmds[] = {
    { "path", tg_conf_set_path, TG_FIELD(tg_conf, access_log.path), 0, 0,
      TG_CONF_REQUIRED, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* Section alerts: (see alerts.h).  A channel's url and key are secrets:
 * tg_conf_set_secret never echoes the value in a message. */
#define TG_CHAN(i) TG_FIELD(tg_conf, alerts.channel[i])
#define TG_RULE(i) TG_FIELD(tg_conf, alerts.rule[i])
#define TG_SECRET_MAX 4096

static const tg_conf_cmd slack_cmds[] = {
    { "webhook_url", tg_conf_set_secret, TG_FIELD(tg_alert_channel_conf, url),
      1, TG_SECRET_MAX, 0, "url" },
    { "webhook_url_file", tg_conf_set_path,
      TG_FIELD(tg_alert_channel_conf, url_file), 0, 0, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd pagerduty_cmds[] = {
    { "routing_key", tg_conf_set_secret, TG_FIELD(tg_alert_channel_conf, key),
      1, 256, 0, NULL },
    { "routing_key_file", tg_conf_set_path,
      TG_FIELD(tg_alert_channel_conf, key_file), 0, 0, 0, NULL },
    { "url", tg_conf_set_secret, TG_FIELD(tg_alert_channel_conf, url),
      1, TG_SECRET_MAX, 0, "url" },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd webhook_cmds[] = {
    { "url", tg_conf_set_secret, TG_FIELD(tg_alert_channel_conf, url),
      1, TG_SECRET_MAX, 0, "url" },
    { "url_file", tg_conf_set_path,
      TG_FIELD(tg_alert_channel_conf, url_file), 0, 0, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd rule_breaches_cmds[] = {
    { "threshold", tg_conf_set_uint, TG_FIELD(tg_alert_rule_conf, threshold),
      1, 1000000000, 0, NULL },
    { "window_ms", tg_conf_set_uint, TG_FIELD(tg_alert_rule_conf, window_ms),
      10, 86400000, 0, NULL },
    { "to", set_to, TG_FIELD(tg_alert_rule_conf, to), 0, 0, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd rule_redis_cmds[] = {
    { "after_ms", tg_conf_set_uint, TG_FIELD(tg_alert_rule_conf, after_ms),
      0, 86400000, 0, NULL },
    { "to", set_to, TG_FIELD(tg_alert_rule_conf, to), 0, 0, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd rule_breaker_cmds[] = {
    { "to", set_to, TG_FIELD(tg_alert_rule_conf, to), 0, 0, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd rule_errors_cmds[] = {
    { "ratio", tg_conf_set_ratio, TG_FIELD(tg_alert_rule_conf, ratio), 0, 0, 0, NULL },
    { "window_ms", tg_conf_set_uint, TG_FIELD(tg_alert_rule_conf, window_ms),
      10, 86400000, 0, NULL },
    { "min_requests", tg_conf_set_uint, TG_FIELD(tg_alert_rule_conf, min_requests),
      1, 1000000000, 0, NULL },
    { "to", set_to, TG_FIELD(tg_alert_rule_conf, to), 0, 0, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd rule_anomaly_cmds[] = {
    { "to", set_to, TG_FIELD(tg_alert_rule_conf, to), 0, 0, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd rules_cmds[] = {
    { "breaches", set_rule, TG_RULE(TG_RULE_BREACHES), 0, 0, 0,
      rule_breaches_cmds },
    { "redis_down", set_rule, TG_RULE(TG_RULE_REDIS_DOWN), 0, 0, 0,
      rule_redis_cmds },
    { "breaker_open", set_rule, TG_RULE(TG_RULE_BREAKER_OPEN), 0, 0, 0,
      rule_breaker_cmds },
    { "upstream_errors", set_rule, TG_RULE(TG_RULE_UPSTREAM_ERRORS), 0, 0, 0,
      rule_errors_cmds },
    { "anomaly", set_rule, TG_RULE(TG_RULE_ANOMALY), 0, 0, 0,
      rule_anomaly_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_alerts_cmds[] = {
    { "slack", set_channel, TG_CHAN(TG_ALERT_SLACK), 0, 0, 0,
      slack_cmds },
    { "pagerduty", set_channel, TG_CHAN(TG_ALERT_PAGERDUTY), 0, 0, 0,
      pagerduty_cmds },
    { "webhook", set_channel, TG_CHAN(TG_ALERT_WEBHOOK), 0, 0, 0,
      webhook_cmds },
    { "ca_file", tg_conf_set_path, TG_FIELD(tg_conf, alerts.ca_file), 0, 0, 0, NULL },
    { "cooldown_ms", tg_conf_set_uint, TG_FIELD(tg_conf, alerts.cooldown_ms),
      0, 86400000, 0, NULL },
    { "evaluate_ms", tg_conf_set_uint, TG_FIELD(tg_conf, alerts.evaluate_ms),
      10, 60000, 0, NULL },
    { "connect_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, alerts.connect_timeout_ms), 1, 60000, 0, NULL },
    { "timeout_ms", tg_conf_set_uint, TG_FIELD(tg_conf, alerts.timeout_ms),
      1, 300000, 0, NULL },
    { "max_tries", tg_conf_set_uint, TG_FIELD(tg_conf, alerts.max_tries),
      1, 100, 0, NULL },
    { "backoff_ms", tg_conf_set_uint, TG_FIELD(tg_conf, alerts.backoff_ms),
      1, TG_MS_MAX, 0, NULL },
    { "max_backoff_ms", tg_conf_set_uint, TG_FIELD(tg_conf, alerts.max_backoff_ms),
      1, TG_MS_MAX, 0, NULL },
    { "queue", tg_conf_set_uint, TG_FIELD(tg_conf, alerts.queue), 1, 100000, 0, NULL },
    { "instance", tg_conf_set_prefix, TG_FIELD(tg_conf, alerts.instance), 1, 128,
      0, NULL },
    /* a field, so that phase 3 finds its mark: rules: written or not */
    { "rules", tg_conf_set_section, TG_FIELD(tg_conf, alerts.rule), 0, 0, 0,
      rules_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* Section anomaly: (see anomaly.h). */
const tg_conf_cmd tg_conf_anomaly_cmds[] = {
    { "window_ms", tg_conf_set_uint, TG_FIELD(tg_conf, anomaly.window_ms),
      100, 86400000, 0, NULL },
    { "top_k", tg_conf_set_uint, TG_FIELD(tg_conf, anomaly.top_k), 1, 1000, 0, NULL },
    { "spike_factor", tg_conf_set_factor, TG_FIELD(tg_conf, anomaly.spike_factor),
      1, 1000, 0, NULL },
    { "min_requests", tg_conf_set_uint, TG_FIELD(tg_conf, anomaly.min_requests),
      1, 1000000000, 0, NULL },
    { "new_key_share", tg_conf_set_ratio, TG_FIELD(tg_conf, anomaly.new_key_share),
      0, 0, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* Section adaptive: (see adaptive.h).  The numbers of concurrency: are
 * per upstream server for the whole process (each worker takes its share). */
static const tg_conf_cmd concurrency_cmds[] = {
    { "initial", tg_conf_set_uint, TG_FIELD(tg_conf, adaptive.initial),
      1, 1000000, 0, NULL },
    { "min", tg_conf_set_uint, TG_FIELD(tg_conf, adaptive.min), 1, 1000000, 0, NULL },
    { "max", tg_conf_set_uint, TG_FIELD(tg_conf, adaptive.max), 1, 1000000, 0, NULL },
    { "queue", tg_conf_set_uint, TG_FIELD(tg_conf, adaptive.queue), 0, 1000000, 0, NULL },
    { "queue_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, adaptive.queue_timeout_ms), 1, TG_MS_MAX, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd throttle_cmds[] = {
    { "target_p99_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, adaptive.throttle.target_p99_ms), 1, TG_MS_MAX, 0, NULL },
    { "max_error_ratio", tg_conf_set_ratio,
      TG_FIELD(tg_conf, adaptive.throttle.max_error_ratio), 0, 0, 0, NULL },
    { "min_factor", tg_conf_set_ratio,
      TG_FIELD(tg_conf, adaptive.throttle.min_factor), 0, 0, 0, NULL },
    { "window_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, adaptive.throttle.window_ms), 100, TG_MS_MAX, 0, NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

const tg_conf_cmd tg_conf_adaptive_cmds[] = {
    { "concurrency", tg_conf_set_section, TG_NOFIELD, 0, 0, 0,
      concurrency_cmds },
    { "shed_order", set_shed_order, TG_FIELD(tg_conf, adaptive.shed_order),
      0, 0, 0, NULL },
    { "throttle", tg_conf_set_present, TG_FIELD(tg_conf, adaptive.throttle.enabled),
      0, 0, 0, throttle_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

static const tg_conf_cmd top_cmds[] = {
    { "listen", tg_conf_set_listen, TG_NOFIELD, 0, 0, TG_CONF_REQUIRED, NULL },
    { "admin", tg_conf_set_section, TG_NOFIELD, 0, 0, 0, tg_conf_admin_cmds },
    { "workers", tg_conf_set_uint, TG_FIELD(tg_conf, workers), 0, 256, 0, NULL },
    { "drain_timeout_ms", tg_conf_set_uint,
      TG_FIELD(tg_conf, drain_timeout_ms), 0, TG_MS_MAX, 0, NULL },
    { "log_level", tg_conf_set_enum, TG_FIELD(tg_conf, log_level), 0, 0, 0,
      level_enum },
    { "http", tg_conf_set_section, TG_NOFIELD, 0, 0, 0, tg_conf_http_cmds },
    { "upstream", tg_conf_set_section, TG_NOFIELD, 0, 0, TG_CONF_REQUIRED,
      tg_conf_upstream_cmds },
    { "rate_limits", tg_conf_set_tiers, TG_NOFIELD, 0, 0, 0, tg_conf_tier_cmds },
    { "store", tg_conf_set_enum, TG_FIELD(tg_conf, store), 0, 0, 0,
      tg_conf_store_enum },
    { "redis", tg_conf_set_section, TG_NOFIELD, 0, 0, 0, tg_conf_redis_cmds },
    { "auth", tg_conf_set_section, TG_NOFIELD, 0, 0, 0, tg_conf_auth_cmds },
    { "routes", tg_conf_set_routes, TG_NOFIELD, 0, 0, 0, tg_conf_route_cmds },
    { "global_limit", tg_conf_set_present, TG_FIELD(tg_conf, global_limit.enabled),
      0, 0, 0, tg_conf_global_cmds },
    { "metrics", tg_conf_set_section, TG_NOFIELD, 0, 0, 0, tg_conf_metrics_cmds },
    { "access_log", tg_conf_set_section, TG_NOFIELD, 0, 0, 0, tg_conf_access_log_cmds },
    { "alerts", tg_conf_set_alerts, TG_NOFIELD, 0, 0, 0, tg_conf_alerts_cmds },
    { "anomaly", tg_conf_set_present, TG_FIELD(tg_conf, anomaly.enabled),
      0, 0, 0, tg_conf_anomaly_cmds },
    { "adaptive", tg_conf_set_present, TG_FIELD(tg_conf, adaptive.enabled),
      0, 0, 0, tg_conf_adaptive_cmds },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* ---- public functions -------------------------------------------------- */

tg_conf *
tg_conf_load(const char *path, char *err, size_t errlen)
{
    char *text, *abs = NULL, *dir = NULL, *slash;
    size_t len = 0;
    tg_conf *conf = NULL;

    text = tg_yaml_read_file(path, TG_CONF_MAX_FILE, &len, err, errlen);
    if (text == NULL) {
        return NULL;
    }

    abs = realpath(path, NULL);
    if (abs == NULL) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    dir = tg_xstrdup(abs);
    slash = strrchr(dir, '/');
    if (slash == dir) {
        slash[1] = '\0';         /* a file in "/" */
    } else if (slash != NULL) {
        *slash = '\0';
    }

    /* Messages name the file as the operator wrote it. */
    conf = build(path, text, len, abs, dir, err, errlen);
    abs = dir = NULL;            /* build took them */

fail:
    free(text);
    free(abs);
    free(dir);
    return conf;
}

tg_conf *
tg_conf_load_string(const char *name, const char *text, size_t len,
                    char *err, size_t errlen)
{
    char *cwd = getcwd(NULL, 0);

    if (cwd == NULL) {
        snprintf(err, errlen, "%s: cannot get the current directory: %s",
                 name, strerror(errno));
        return NULL;
    }
    return build(name, text, len, tg_xstrdup(name), cwd, err, errlen);
}

tg_conf *
tg_conf_ref(tg_conf *conf)
{
    __atomic_add_fetch(&conf->refcnt, 1, __ATOMIC_RELAXED);
    return conf;
}

/* The release/acquire pair makes every thread's reads of the snapshot
 * happen before the free by whichever thread drops the last reference. */
void
tg_conf_unref(tg_conf *conf)
{
    if (conf == NULL) {
        return;
    }
    if (__atomic_sub_fetch(&conf->refcnt, 1, __ATOMIC_ACQ_REL) == 0) {
        conf_free(conf);
    }
}

static int
addrs_differ(const tg_addr *a, size_t na, const tg_addr *b, size_t nb)
{
    if (na != nb) {
        return 1;
    }
    for (size_t i = 0; i < na; i++) {
        if (strcmp(a[i].text, b[i].text) != 0) {
            return 1;
        }
    }
    return 0;
}

static int
str_differ(const char *a, const char *b)
{
    return (a == NULL) != (b == NULL) || (a != NULL && strcmp(a, b) != 0);
}

size_t
tg_conf_store_diff(const tg_conf *a, const tg_conf *b, char *buf, size_t len)
{
    const struct { int differ; const char *name; } f[] = {
        { a->store != b->store, "store" },
        { str_differ(a->redis.url, b->redis.url), "redis.url" },
        { a->redis.timeout_ms != b->redis.timeout_ms, "redis.timeout_ms" },
        { a->redis.on_failure != b->redis.on_failure, "redis.on_failure" },
        { str_differ(a->redis.prefix, b->redis.prefix), "redis.prefix" },
        { a->redis.max_batch != b->redis.max_batch, "redis.max_batch" },
        { a->redis.instances != b->redis.instances, "redis.instances" },
        { str_differ(a->redis.sentinel_master, b->redis.sentinel_master)
          || addrs_differ(a->redis.sentinels, a->redis.nsentinels,
                                  b->redis.sentinels, b->redis.nsentinels),
          "redis.sentinel" },
        { addrs_differ(a->redis.cluster_nodes, a->redis.ncluster_nodes,
                               b->redis.cluster_nodes, b->redis.ncluster_nodes),
          "redis.cluster" },
        { str_differ(a->redis.username, b->redis.username)
          || str_differ(a->redis.password, b->redis.password),
          "redis.username/password" },
        { str_differ(a->redis.sentinel_username, b->redis.sentinel_username)
          || str_differ(a->redis.sentinel_password, b->redis.sentinel_password),
          "redis.sentinel.username/password" },
    };
    size_t n = 0, count = 0;

    if (len > 0) {
        buf[0] = '\0';
    }
    for (size_t i = 0; i < TG_ARRAY_LEN(f); i++) {
        if (f[i].differ) {
            int m = snprintf(buf + n, len - n, "%s%s", count ? ", " : "", f[i].name);
            if (m > 0 && (size_t)m < len - n) {
                n += (size_t)m;
            }
            count++;
        }
    }
    return count;
}

const tg_tier_conf *
tg_conf_tier(const tg_conf *conf, const char *name)
{
    size_t i;

    for (i = 0; i < conf->ntiers; i++) {
        if (strcmp(conf->tiers[i].name, name) == 0) {
            return &conf->tiers[i];
        }
    }
    return NULL;
}

/* The default resolver: the first answer of getaddrinfo. */
static tg_rc
resolve_getaddrinfo(const char *host, struct sockaddr_storage *sa, socklen_t *salen,
                    char *why, size_t whylen)
{
    struct addrinfo hints, *res = NULL;
    int rc;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0 || res == NULL || res->ai_addrlen > sizeof(*sa)) {
        snprintf(why, whylen, "%s", rc == 0 ? "no usable address"
                 : rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
        if (res != NULL) {
            freeaddrinfo(res);
        }
        return TG_ERR;
    }
    memcpy(sa, res->ai_addr, res->ai_addrlen);
    *salen = (socklen_t)res->ai_addrlen;
    freeaddrinfo(res);
    return TG_OK;
}

static tg_addr_resolver addr_resolver = resolve_getaddrinfo;

void
tg_addr_set_resolver(tg_addr_resolver fn)
{
    addr_resolver = fn != NULL ? fn : resolve_getaddrinfo;
}

tg_rc
tg_addr_parse(const char *text, tg_addr *addr, char *err, size_t errlen)
{
    char host[128], why[128];
    const char *port, *end;
    size_t hlen, i;
    unsigned long pnum;
    struct addrinfo hints, *res = NULL;
    int rc;

    memset(addr, 0, sizeof(*addr));
    if (strlen(text) >= sizeof(addr->text)) {
        snprintf(err, errlen, "address is too long (at most %zu characters)",
                 sizeof(addr->text) - 1);
        return TG_ERR;
    }

    if (text[0] == '[') {
        end = strchr(text, ']');
        if (end == NULL) {
            snprintf(err, errlen, "bad address \"%s\": missing ']'", text);
            return TG_ERR;
        }
        if (end[1] != ':') {
            snprintf(err, errlen,
                     "bad address \"%s\": expected \"[ipv6]:port\"", text);
            return TG_ERR;
        }
        hlen = (size_t)(end - text - 1);
        memcpy(host, text + 1, hlen);
        port = end + 2;
    } else {
        end = strrchr(text, ':');
        if (end == NULL) {
            snprintf(err, errlen,
                     "bad address \"%s\": expected \"host:port\"", text);
            return TG_ERR;
        }
        if (memchr(text, ':', (size_t)(end - text)) != NULL) {
            snprintf(err, errlen, "bad address \"%s\": write IPv6 addresses "
                     "in brackets, e.g. \"[::1]:8080\"", text);
            return TG_ERR;
        }
        hlen = (size_t)(end - text);
        memcpy(host, text, hlen);
        port = end + 1;
    }
    host[hlen] = '\0';
    if (hlen == 0) {
        snprintf(err, errlen, "bad address \"%s\": missing host "
                 "(use 0.0.0.0 or [::] for every interface)", text);
        return TG_ERR;
    }

    if (port[0] == '\0' || strlen(port) > 5) {
        goto bad_port;
    }
    for (i = 0; port[i] != '\0'; i++) {
        if (!isdigit((unsigned char)port[i])) {
            goto bad_port;
        }
    }
    pnum = strtoul(port, NULL, 10);
    if (pnum > 65535) {
        goto bad_port;
    }

    /* a literal needs no resolver; a name goes to the resolver */
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc == 0 && res != NULL && res->ai_addrlen <= sizeof(addr->sa)) {
        memcpy(&addr->sa, res->ai_addr, res->ai_addrlen);
        addr->salen = (socklen_t)res->ai_addrlen;
    } else if (addr_resolver(host, &addr->sa, &addr->salen, why, sizeof(why)) != TG_OK) {
        snprintf(err, errlen, "bad address \"%s\": cannot resolve \"%s\": %s",
                 text, host, why);
        if (res != NULL) {
            freeaddrinfo(res);
        }
        return TG_ERR;
    } else if (addr->sa.ss_family == AF_INET) {
        ((struct sockaddr_in *)&addr->sa)->sin_port = htons((uint16_t)pnum);
    } else if (addr->sa.ss_family == AF_INET6) {
        ((struct sockaddr_in6 *)&addr->sa)->sin6_port = htons((uint16_t)pnum);
    }
    if (res != NULL) {
        freeaddrinfo(res);
    }
    memcpy(addr->text, text, strlen(text) + 1);
    return TG_OK;

bad_port:
    snprintf(err, errlen, "bad address \"%s\": port must be a number "
             "0..65535", text);
    return TG_ERR;
}

tg_rc
tg_conf_parse_redis_url(const char *url, tg_conf_redis_url *out, char *why,
                        size_t whylen)
{
    static const char scheme[] = "redis://";
    const char *p, *host, *hend, *end;
    unsigned long port = 6379, db = 0;
    size_t hlen;

    if (url == NULL || *url == '\0') {
        snprintf(why, whylen, "empty");
        return TG_ERR;
    }
    if (strncmp(url, "rediss://", 9) == 0) {
        snprintf(why, whylen, "TLS (rediss://) is not supported");
        return TG_ERR;
    }
    if (strncmp(url, scheme, sizeof(scheme) - 1) != 0) {
        snprintf(why, whylen, "scheme must be redis://");
        return TG_ERR;
    }
    p = url + sizeof(scheme) - 1;
    end = p + strlen(p);
    if (strchr(p, '@') != NULL) {
        snprintf(why, whylen, "credentials in the URL are not supported: use "
                 "redis.username and redis.password");
        return TG_ERR;
    }
    if (strpbrk(p, "?#") != NULL) {
        snprintf(why, whylen, "query or fragment is not supported");
        return TG_ERR;
    }

    if (*p == '[') {
        host = p + 1;
        hend = strchr(host, ']');
        if (hend == NULL) {
            snprintf(why, whylen, "missing ']' after IPv6 address");
            return TG_ERR;
        }
        p = hend + 1;
        if (hend == host || memchr(host, ':', (size_t)(hend - host)) == NULL) {
            snprintf(why, whylen, "bad IPv6 address in brackets");
            return TG_ERR;
        }
        for (const char *q = host; q < hend; q++) {
            if (!isxdigit((unsigned char)*q) && *q != ':' && *q != '.') {
                snprintf(why, whylen, "bad IPv6 address in brackets");
                return TG_ERR;
            }
        }
    } else {
        const char *c1 = strchr(p, ':');
        if (c1 != NULL && strchr(c1 + 1, ':') != NULL) {
            snprintf(why, whylen, "IPv6 addresses go in brackets");
            return TG_ERR;
        }
        host = p;
        hend = p + strcspn(p, ":/");
        p = hend;
        if (hend == host) {
            snprintf(why, whylen, "missing host");
            return TG_ERR;
        }
        for (const char *q = host; q < hend; q++) {
            if (!isalnum((unsigned char)*q) && *q != '.' && *q != '-' && *q != '_') {
                snprintf(why, whylen, "bad character in host (IPv6 addresses go "
                         "in brackets)");
                return TG_ERR;
            }
        }
    }
    hlen = (size_t)(hend - host);
    if (hlen >= sizeof(out->host)) {
        snprintf(why, whylen, "host longer than %zu bytes", sizeof(out->host) - 1);
        return TG_ERR;
    }

    if (*p == ':') {
        const char *ps = p + 1, *pe = ps + strcspn(ps, "/");
        if (parse_ulong(ps, (size_t)(pe - ps), 65535, &port) != TG_OK
            || port == 0) {
            snprintf(why, whylen, "port must be a number 1..65535");
            return TG_ERR;
        }
        p = pe;
    }
    if (*p == '/') {
        const char *ds = p + 1;
        if (parse_ulong(ds, (size_t)(end - ds), 15, &db) != TG_OK) {
            snprintf(why, whylen, "database must be a number 0..15");
            return TG_ERR;
        }
        p = end;
    }
    if (p != end) {
        snprintf(why, whylen, "unexpected text after the host");
        return TG_ERR;
    }

    memcpy(out->host, host, hlen);
    out->host[hlen] = '\0';
    out->port = (int)port;
    out->db = (int)db;
    return TG_OK;
}

/* ---- build: the four phases -------------------------------------------- */

/*
 * Build a snapshot from text.  Takes ownership of path and dir (malloc'd)
 * whatever the outcome.  Returns the snapshot with refcnt 1, or NULL with
 * err filled.
 */
static tg_conf *
build(const char *name, const char *text, size_t len, char *path,
              char *dir, char *err, size_t errlen)
{
    tg_conf_ctx ctx;
    yaml_node_t *root;
    size_t i;

    memset(&ctx, 0, sizeof(ctx));
    ctx.name = name;
    ctx.text = text;
    ctx.len = len;
    ctx.err = err;
    ctx.errlen = errlen;
    ctx.conf = tg_xcalloc(1, sizeof(tg_conf));
    ctx.conf->refcnt = 1;
    ctx.conf->path = path;
    ctx.conf->dir = dir;
    if (errlen > 0) {
        err[0] = '\0';
    }

    defaults(ctx.conf);

    if (structure(&ctx) != TG_OK) {
        goto fail;
    }
    root = yaml_document_get_root_node(&ctx.doc);
    if (tg_conf_walk(&ctx, root, top_cmds, ctx.conf, "", "") != TG_OK) {
        goto fail;
    }
    if (validate(&ctx) != TG_OK) {
        goto fail;
    }
    if (resolve(&ctx) != TG_OK) {
        goto fail;
    }
    goto done;

fail:
    conf_free(ctx.conf);
    ctx.conf = NULL;

done:
    if (ctx.have_doc) {
        yaml_document_delete(&ctx.doc);
    }
    for (i = 0; i < ctx.nmarks; i++) {
        free(ctx.marks[i].path);
    }
    free(ctx.marks);
    return ctx.conf;
}

/* Every default of the configuration, in one place.  docs/CONFIG.md
 * mirrors this block. */
static void
defaults(tg_conf *conf)
{
    conf->admin_enabled = 1;
    snprintf(conf->admin.text, sizeof(conf->admin.text), "127.0.0.1:9090");
    conf->workers = 0;                          /* resolved to CPUs later */
    conf->drain_timeout_ms = 10000;
    conf->log_level = TG_LOG_INFO;

    conf->http.max_request_line = 8192;
    conf->http.max_header_bytes = 16384;
    conf->http.max_headers = 100;
    conf->http.max_body_bytes = 10 * 1024 * 1024;
    conf->http.header_timeout_ms = 10000;
    conf->http.handshake_timeout_ms = 10000;
    conf->http.body_timeout_ms = 30000;
    conf->http.idle_timeout_ms = 60000;
    conf->http.send_timeout_ms = 30000;
    conf->http.max_requests_per_connection = 10000;
    conf->http.max_connections = 10000;
    conf->http.max_connections_per_ip = 1024;

    conf->upstream.connect_timeout_ms = 2000;
    conf->upstream.first_byte_timeout_ms = 30000;
    conf->upstream.total_timeout_ms = 60000;
    conf->upstream.keepalive = TG_UPSTREAM_KEEPALIVE_AUTO;
    conf->upstream.keepalive_timeout_ms = 30000;
    conf->upstream.breaker.failures = 5;
    conf->upstream.breaker.window_ms = 10000;
    conf->upstream.breaker.min_requests = 20;
    conf->upstream.breaker.error_pct = 50;
    conf->upstream.breaker.open_ms = 5000;
    conf->upstream.breaker.max_open_ms = 60000;
    conf->upstream.health_check.enabled = 0;     /* no active checks */
    conf->upstream.health_check.path = tg_xstrdup("/health");
    conf->upstream.health_check.interval_ms = 2000;
    conf->upstream.health_check.timeout_ms = 1000;
    conf->upstream.health_check.healthy = 2;
    conf->upstream.health_check.unhealthy = 2;

    conf->store = TG_STORE_REDIS;
    conf->redis.url = tg_xstrdup("redis://127.0.0.1:6379/0");
    snprintf(conf->redis.server.host, sizeof(conf->redis.server.host), "127.0.0.1");
    conf->redis.server.port = 6379;
    conf->redis.server.db = 0;
    conf->redis.timeout_ms = 25;
    conf->redis.on_failure = TG_FAIL_LOCAL;
    conf->redis.prefix = tg_xstrdup("tg:");
    conf->redis.max_batch = 32;
    conf->redis.instances = 1;

    conf->metrics.statsd_enabled = 0;
    conf->metrics.statsd_prefix = tg_xstrdup("tollgate");
    conf->metrics.statsd_flush_ms = 10000;
    conf->metrics.statsd_tags = 0;
    conf->access_log.path = NULL;

    conf->auth.keys_file = NULL;
    conf->auth.header = tg_xstrdup("X-API-Key");
    conf->auth.forward_key = 0;
    conf->auth.anonymous_tier = NULL;           /* keyless requests get 401 */
    conf->auth.redis_keys = 0;
    conf->auth.cache_ttl_ms = 30000;
    conf->auth.anonymous_ipv6_prefix = 64;
    conf->auth.unknown_key_limit.requests_per_minute = 60;
    conf->auth.unknown_key_limit.burst_limit = 20;

    conf->alerts.enabled = 0;                   /* no alerts: section */
    conf->alerts.channel[TG_ALERT_PAGERDUTY].url =
        tg_xstrdup("https://events.pagerduty.com/v2/enqueue");
    conf->alerts.ca_file = NULL;                /* the system CAs */
    conf->alerts.cooldown_ms = 300000;
    conf->alerts.evaluate_ms = 1000;
    conf->alerts.connect_timeout_ms = 5000;
    conf->alerts.timeout_ms = 10000;
    conf->alerts.max_tries = 5;
    conf->alerts.backoff_ms = 1000;
    conf->alerts.max_backoff_ms = 60000;
    conf->alerts.queue = 256;
    conf->alerts.instance = NULL;               /* hostname/listen[0] */
    conf->alerts.rule[TG_RULE_BREACHES].to = 1u << TG_ALERT_SLACK;
    conf->alerts.rule[TG_RULE_BREACHES].threshold = 1000;
    conf->alerts.rule[TG_RULE_BREACHES].window_ms = 60000;
    conf->alerts.rule[TG_RULE_REDIS_DOWN].to =
        1u << TG_ALERT_SLACK | 1u << TG_ALERT_PAGERDUTY;
    conf->alerts.rule[TG_RULE_REDIS_DOWN].after_ms = 300000;
    conf->alerts.rule[TG_RULE_BREAKER_OPEN].to = 1u << TG_ALERT_PAGERDUTY;
    conf->alerts.rule[TG_RULE_UPSTREAM_ERRORS].to = 1u << TG_ALERT_PAGERDUTY;
    conf->alerts.rule[TG_RULE_UPSTREAM_ERRORS].ratio = 0.05;
    conf->alerts.rule[TG_RULE_UPSTREAM_ERRORS].window_ms = 60000;
    conf->alerts.rule[TG_RULE_UPSTREAM_ERRORS].min_requests = 100;
    conf->alerts.rule[TG_RULE_ANOMALY].to = 1u << TG_ALERT_SLACK;

    conf->anomaly.enabled = 0;                  /* no anomaly: section */
    conf->anomaly.window_ms = 60000;
    conf->anomaly.top_k = 20;
    conf->anomaly.spike_factor = 10;
    conf->anomaly.min_requests = 100;
    conf->anomaly.new_key_share = 0.5;

    conf->routes = NULL;                        /* route defaults: see below */
    conf->nroutes = 0;
    conf->global_limit.enabled = 0;

    conf->adaptive.enabled = 0;                 /* no adaptive: section */
    conf->adaptive.initial = 64;
    conf->adaptive.min = 4;
    conf->adaptive.max = 1024;
    conf->adaptive.queue = 128;
    conf->adaptive.queue_timeout_ms = 1000;
    conf->adaptive.shed_order = NULL;           /* phase 3: basic, pro, enterprise */
    conf->adaptive.nshed_order = 0;
    conf->adaptive.throttle.enabled = 0;
    conf->adaptive.throttle.target_p99_ms = 500;
    conf->adaptive.throttle.max_error_ratio = 0.05;
    conf->adaptive.throttle.min_factor = 0.25;
    conf->adaptive.throttle.window_ms = 5000;
}

/* The defaults of one routes: item, set before its keys are walked (an
 * item does not exist yet when defaults() runs). */
void
tg_conf_route_defaults(tg_route_conf *route)
{
    route->method = NULL;                       /* any method */
    route->cost = 1;
    route->has_limit = 0;
}

static void
conf_free(tg_conf *conf)
{
    size_t i;

    if (conf == NULL) {
        return;
    }
    for (i = 0; i < conf->nlisten; i++) {
        free(conf->listen[i].cert);
        free(conf->listen[i].key);
    }
    free(conf->listen);
    free(conf->http.trusted_proxies);
    free(conf->upstream.servers);
    free(conf->upstream.health_check.path);
    for (i = 0; i < conf->ntiers; i++) {
        free(conf->tiers[i].name);
    }
    free(conf->tiers);
    free(conf->redis.url);
    free(conf->redis.prefix);
    free(conf->redis.sentinel_master);
    free(conf->redis.sentinels);
    free(conf->redis.cluster_nodes);
    free(conf->redis.username);
    tg_conf_free_secret(conf->redis.password);
    free(conf->redis.password_file);
    free(conf->redis.sentinel_username);
    tg_conf_free_secret(conf->redis.sentinel_password);
    free(conf->redis.sentinel_password_file);
    free(conf->metrics.statsd_prefix);
    free(conf->access_log.path);
    free(conf->auth.keys_file);
    free(conf->auth.header);
    free(conf->auth.anonymous_tier);
    for (i = 0; i < conf->adaptive.nshed_order; i++) {
        free(conf->adaptive.shed_order[i]);
    }
    free(conf->adaptive.shed_order);
    for (i = 0; i < conf->nroutes; i++) {
        free(conf->routes[i].name);
        free(conf->routes[i].method);
        free(conf->routes[i].path);
    }
    free(conf->routes);
    for (i = 0; i < TG_ALERT__NCHANNELS; i++) {
        free(conf->alerts.channel[i].url);
        free(conf->alerts.channel[i].url_file);
        free(conf->alerts.channel[i].key);
        free(conf->alerts.channel[i].key_file);
    }
    free(conf->alerts.ca_file);
    free(conf->alerts.instance);
    free(conf->path);
    free(conf->dir);
    free(conf);
}

/*
 * Phase 1.  tg_yaml_load finds syntax errors, anchors/aliases and extra
 * documents at their exact marks, then loads the node tree.
 */
static tg_rc
structure(tg_conf_ctx *ctx)
{
    if (tg_yaml_load(&ctx->doc, ctx->name, ctx->text, ctx->len, "config file",
                     ctx->err, ctx->errlen) != TG_OK) {
        return TG_ERR;
    }
    ctx->have_doc = 1;

    if (yaml_document_get_root_node(&ctx->doc) == NULL) {
        yaml_mark_t zero;
        memset(&zero, 0, sizeof(zero));
        return tg_conf_error(ctx, zero, "", "empty configuration: "
                             "expected a mapping with at least \"listen\" "
                             "and \"upstream\"");
    }
    return TG_OK;
}

/*
 * password or password_file (one line, read now: systemd
 * LoadCredential=), never both; a username needs a password.  The
 * secret itself never appears in an error.
 */
static tg_rc
password(tg_conf_ctx *ctx, char **pass, char **file, char **user,
                 const char *section)
{
    const tg_conf_mark *m;
    char err[256];
    size_t len, i;
    char *text;

    if (*pass != NULL && *file != NULL) {
        m = tg_conf_find_mark(ctx, file);
        return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                             m ? m->path : section, "%s.password and %s.password_file "
                             "cannot be used together", section, section);
    }
    if (*file != NULL) {
        m = tg_conf_find_mark(ctx, file);
        text = tg_yaml_read_file(*file, 4096, &len, err, sizeof(err));
        if (text == NULL) {
            return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                                 m ? m->path : section, "%s", err);
        }
        while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == '\r')) {
            text[--len] = '\0';
        }
        for (i = 0; i < len && isgraph((unsigned char)text[i]); i++) {
        }
        if (len == 0 || len > 511 || i != len) {
            tg_conf_free_secret(text);
            return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                                 m ? m->path : section, "%s: the password must be "
                                 "one line of 1..511 printable characters without "
                                 "spaces", *file);
        }
        *pass = text;
    }
    if (*user != NULL && *pass == NULL) {
        m = tg_conf_find_mark(ctx, user);
        return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                             m ? m->path : section, "%s.username needs %s.password "
                             "or %s.password_file", section, section, section);
    }
    return TG_OK;
}

/* Phase 3: rules across fields and derived values.  Each section checks
 * its own rules in its file; the order is kept (the first error stops the
 * load). */
static tg_rc
validate(tg_conf_ctx *ctx)
{
    tg_conf *conf = ctx->conf;
    long ncpu;

    if (tg_conf_validate_http(ctx) != TG_OK
        || tg_conf_validate_upstream(ctx) != TG_OK
        || tg_conf_validate_limits(ctx) != TG_OK
        || tg_conf_validate_redis(ctx) != TG_OK) {
        return TG_ERR;
    }
    if (conf->alerts.enabled && tg_conf_validate_alerts(ctx) != TG_OK) {
        return TG_ERR;
    }
    if (tg_conf_validate_adaptive(ctx) != TG_OK
        || tg_conf_validate_redis_auth(ctx) != TG_OK) {
        return TG_ERR;
    }

    if (conf->workers == 0) {
        ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        conf->workers = ncpu < 1 ? 1 : ncpu > 256 ? 256 : (unsigned)ncpu;
    }
    return TG_OK;
}

/* The head holds the request line and its CRLF, so a head limit below
 * the line limit would make the line limit a lie. */
tg_rc
tg_conf_validate_http(tg_conf_ctx *ctx)
{
    const tg_conf *conf = ctx->conf;
    const tg_conf_mark *m;
    size_t i;

    if (conf->http.max_header_bytes < conf->http.max_request_line + 2) {
        m = NULL;
        for (i = 0; i < ctx->nmarks; i++) {
            if (ctx->marks[i].field == &conf->http.max_header_bytes ||
                (m == NULL && ctx->marks[i].field == &conf->http.max_request_line)) {
                m = &ctx->marks[i];
            }
        }
        /* One of the two was set in the file, or defaults would pass. */
        return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                             m ? m->path : "http.max_header_bytes",
                             "must be at least http.max_request_line + 2 "
                             "(%zu), got %zu", conf->http.max_request_line + 2,
                             conf->http.max_header_bytes);
    }
    return TG_OK;
}

/* The breaker's doubling starts at open_ms: a lower cap would be a lie. */
tg_rc
tg_conf_validate_upstream(tg_conf_ctx *ctx)
{
    const tg_conf *conf = ctx->conf;
    const tg_conf_mark *m;

    if (conf->upstream.breaker.max_open_ms < conf->upstream.breaker.open_ms) {
        m = tg_conf_find_mark(ctx, &conf->upstream.breaker.max_open_ms);
        if (m == NULL) {
            m = tg_conf_find_mark(ctx, &conf->upstream.breaker.open_ms);
        }
        /* One of the two was set in the file, or defaults would pass. */
        return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                             m ? m->path : "upstream.breaker.max_open_ms",
                             "max_open_ms must be at least "
                             "upstream.breaker.open_ms (%u), got %u",
                             conf->upstream.breaker.open_ms,
                             conf->upstream.breaker.max_open_ms);
    }
    return TG_OK;
}

/* auth.anonymous_tier names a tier of rate_limits (the sections may come
 * in any order), then every route's cost and every rate can be kept. */
tg_rc
tg_conf_validate_limits(tg_conf_ctx *ctx)
{
    const tg_conf *conf = ctx->conf;
    const tg_conf_mark *m;
    size_t i;

    /* Keyless requests are charged to this tier: it must exist. */
    if (conf->auth.anonymous_tier != NULL &&
        tg_conf_tier(conf, conf->auth.anonymous_tier) == NULL) {
        char names[256] = "";
        size_t n = 0;

        for (i = 0; i < conf->ntiers && n < sizeof(names); i++) {
            n += (size_t)snprintf(names + n, sizeof(names) - n, "%s%s",
                                  i ? ", " : "", conf->tiers[i].name);
        }
        m = tg_conf_find_mark(ctx, &conf->auth.anonymous_tier);
        return tg_conf_error(ctx, m->mark, m->path, "unknown tier \"%s\" "
                             "(rate_limits defines %s%s)",
                             conf->auth.anonymous_tier,
                             conf->ntiers ? "" : "no tiers", names);
    }

    if (check_costs(ctx) != TG_OK || check_rates(ctx) != TG_OK) {
        return TG_ERR;
    }
    return TG_OK;
}

/* Cluster has database 0 only; url still gives the db for Sentinel. */
tg_rc
tg_conf_validate_redis(tg_conf_ctx *ctx)
{
    const tg_conf *conf = ctx->conf;
    const tg_conf_mark *m;

    if (conf->redis.ncluster_nodes > 0 && conf->redis.server.db != 0) {
        m = tg_conf_find_mark(ctx, &conf->redis.url);
        return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                             m ? m->path : "redis.url", "Redis Cluster has "
                             "only database 0, got \"%s\" with redis.cluster",
                             conf->redis.url);
    }
    return TG_OK;
}

/* The credentials of Redis and of its sentinels (the files read now). */
tg_rc
tg_conf_validate_redis_auth(tg_conf_ctx *ctx)
{
    tg_conf *conf = ctx->conf;

    if (password(ctx, &conf->redis.password, &conf->redis.password_file,
                 &conf->redis.username, "redis") != TG_OK
        || password(ctx, &conf->redis.sentinel_password,
                    &conf->redis.sentinel_password_file,
                    &conf->redis.sentinel_username, "redis.sentinel") != TG_OK) {
        return TG_ERR;
    }
    return TG_OK;
}

/*
 * A route's cost is charged to every bucket its requests meet: any tier
 * (a key of the keys file or of Redis may name any of them, and keyless
 * requests the anonymous tier), the route's own bucket and the global
 * bucket.  A cost above one of those capacities could never pass, and its
 * 429 could name no honest retry time: refuse it here, at the cost.
 */
static tg_rc
check_costs(tg_conf_ctx *ctx)
{
    const tg_conf *conf = ctx->conf;
    const tg_conf_mark *m;
    const char *what = NULL;
    char name[TG_CONF_PATHLEN];
    uint32_t burst = 0;
    size_t i, j;

    for (i = 0; i < conf->nroutes; i++) {
        const tg_route_conf *r = &conf->routes[i];

        what = NULL;
        if (r->has_limit && r->cost > r->burst_limit) {
            snprintf(name, sizeof(name), "its own limit.burst_limit");
            burst = r->burst_limit;
            what = name;
        }
        for (j = 0; what == NULL && j < conf->ntiers; j++) {
            if (r->cost > conf->tiers[j].burst_limit) {
                snprintf(name, sizeof(name), "rate_limits.%s.burst_limit%s",
                         conf->tiers[j].name,
                         conf->auth.anonymous_tier != NULL
                         && strcmp(conf->auth.anonymous_tier, conf->tiers[j].name) == 0
                         ? " (the anonymous tier)" : "");
                burst = conf->tiers[j].burst_limit;
                what = name;
            }
        }
        if (what == NULL && conf->global_limit.enabled
            && r->cost > conf->global_limit.burst) {
            snprintf(name, sizeof(name), "global_limit.burst");
            burst = conf->global_limit.burst;
            what = name;
        }
        if (what != NULL) {
            m = tg_conf_find_mark(ctx, &r->cost);
            return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                                 m ? m->path : "routes", "cost %u of route \"%s\" "
                                 "is above %s (%u): no such request could ever pass",
                                 r->cost, r->name, what, burst);
        }
    }
    return TG_OK;
}

/*
 * A bucket earns a token every T microseconds, T a whole number rounded up
 * (never above the rate).  Past 10,000 per second (100 us) that rounding
 * can cost more than 1% of the rate (400,000/s would keep 333,333/s):
 * such a rate is refused, naming the two nearest rates kept exactly.
 */
static tg_rc
check_rate(tg_conf_ctx *ctx, const uint32_t *field, uint64_t per_us)
{
    const tg_conf_mark *m = tg_conf_find_mark(ctx, field);
    uint64_t r = *field, t_up, t_down;

    if (m == NULL || r == 0) {
        return TG_OK;                       /* a default: fine */
    }
    t_up = (per_us + r - 1) / r;
    if (per_us * 100 >= r * t_up * 99) {
        return TG_OK;                       /* kept to within 1% */
    }
    t_down = per_us / r;
    if (t_down == 0) {
        /* above one token per microsecond: there is no faster exact rate */
        return tg_conf_error(ctx, m->mark, m->path, "%llu cannot be kept: a token "
                             "comes every whole microsecond at most, so the "
                             "highest rate is %llu", (unsigned long long)r,
                             (unsigned long long)per_us);
    }
    return tg_conf_error(ctx, m->mark, m->path, "%llu cannot be kept: a token "
                         "comes every whole microsecond, so it would be %llu; "
                         "the nearest rates kept exactly are %llu and %llu",
                         (unsigned long long)r, (unsigned long long)(per_us / t_up),
                         (unsigned long long)(per_us / t_up),
                         (unsigned long long)(per_us / t_down));
}

static tg_rc
check_rates(tg_conf_ctx *ctx)
{
    const tg_conf *conf = ctx->conf;
    size_t i;

    for (i = 0; i < conf->ntiers; i++) {
        if (check_rate(ctx, &conf->tiers[i].requests_per_minute, 60000000)
            != TG_OK) {
            return TG_ERR;
        }
    }
    for (i = 0; i < conf->nroutes; i++) {
        if (conf->routes[i].has_limit
            && check_rate(ctx, &conf->routes[i].requests_per_minute, 60000000)
               != TG_OK) {
            return TG_ERR;
        }
    }
    if (conf->global_limit.enabled
        && check_rate(ctx, &conf->global_limit.requests_per_second, 1000000)
           != TG_OK) {
        return TG_ERR;
    }
    return check_rate(ctx, &conf->auth.unknown_key_limit.requests_per_minute,
                              60000000);
}

static tg_rc
resolve_one(tg_conf_ctx *ctx, tg_addr *addr, const char *defpath,
                    int allow_port0)
{
    const tg_conf_mark *m = tg_conf_find_mark(ctx, addr);
    yaml_node_t *root = yaml_document_get_root_node(&ctx->doc);
    yaml_mark_t mark = m ? m->mark : root->start_mark;
    const char *path = m ? m->path : defpath;
    char text[sizeof(addr->text)], why[TG_CONF_ERRLEN];
    const struct sockaddr *sa;

    memcpy(text, addr->text, sizeof(text));
    if (tg_addr_parse(text, addr, why, sizeof(why)) != TG_OK) {
        return tg_conf_error(ctx, mark, path, "%s", why);
    }
    sa = (const struct sockaddr *)&addr->sa;
    if (!allow_port0 &&
        ((sa->sa_family == AF_INET &&
          ((const struct sockaddr_in *)sa)->sin_port == 0) ||
         (sa->sa_family == AF_INET6 &&
          ((const struct sockaddr_in6 *)sa)->sin6_port == 0))) {
        return tg_conf_error(ctx, mark, path, "port 0 is only allowed for "
                             "listen and admin addresses, got \"%s\"", text);
    }
    return TG_OK;
}

static int
same_listener(const tg_addr *a, const tg_addr *b)
{
    const struct sockaddr *sa = (const struct sockaddr *)&a->sa;

    if (a->salen != b->salen || memcmp(&a->sa, &b->sa, a->salen) != 0) {
        return 0;
    }
    /* Port 0 asks the kernel for a fresh port each time: never a clash. */
    if (sa->sa_family == AF_INET) {
        return ((const struct sockaddr_in *)sa)->sin_port != 0;
    }
    if (sa->sa_family == AF_INET6) {
        return ((const struct sockaddr_in6 *)sa)->sin6_port != 0;
    }
    return 1;
}

/* Phase 4: every address becomes a sockaddr.  Two listeners on one address
 * would fail at bind(2) far from the config line that caused it. */
static tg_rc
resolve(tg_conf_ctx *ctx)
{
    tg_conf *conf = ctx->conf;
    const tg_conf_mark *m, *first;
    size_t i, j;

    for (i = 0; i < conf->nlisten; i++) {
        if (resolve_one(ctx, &conf->listen[i].addr, "listen.address", 1)
            != TG_OK) {
            return TG_ERR;
        }
        for (j = 0; j < i; j++) {
            if (same_listener(&conf->listen[i].addr, &conf->listen[j].addr)) {
                m = tg_conf_find_mark(ctx, &conf->listen[i].addr);
                first = tg_conf_find_mark(ctx, &conf->listen[j].addr);
                return tg_conf_error(ctx, m->mark, m->path, "\"%s\" is already "
                                     "used by %s (at %zu:%zu)",
                                     conf->listen[i].addr.text, first->path,
                                     first->mark.line + 1, first->mark.column + 1);
            }
        }
    }
    if (conf->admin_enabled) {
        if (resolve_one(ctx, &conf->admin, "admin.address", 1) != TG_OK) {
            return TG_ERR;
        }
        for (j = 0; j < conf->nlisten; j++) {
            if (same_listener(&conf->admin, &conf->listen[j].addr)) {
                m = tg_conf_find_mark(ctx, &conf->admin);
                first = tg_conf_find_mark(ctx, &conf->listen[j].addr);
                return tg_conf_error(ctx,
                                     m ? m->mark : yaml_document_get_root_node(&ctx->doc)->start_mark,
                                     m ? m->path : "admin.address",
                                     "\"%s\" is already used by %s (at %zu:%zu)",
                                     conf->admin.text, first->path,
                                     first->mark.line + 1, first->mark.column + 1);
            }
        }
    }
    for (i = 0; i < conf->upstream.nservers; i++) {
        if (resolve_one(ctx, &conf->upstream.servers[i],
                                "upstream.servers", 0) != TG_OK) {
            return TG_ERR;
        }
    }
    for (i = 0; i < conf->redis.nsentinels; i++) {
        if (resolve_one(ctx, &conf->redis.sentinels[i],
                                "redis.sentinel.addresses", 0) != TG_OK) {
            return TG_ERR;
        }
    }
    for (i = 0; i < conf->redis.ncluster_nodes; i++) {
        if (resolve_one(ctx, &conf->redis.cluster_nodes[i],
                                "redis.cluster.nodes", 0) != TG_OK) {
            return TG_ERR;
        }
    }
    if (conf->metrics.statsd_enabled
        && resolve_one(ctx, &conf->metrics.statsd, "metrics.statsd.address", 0)
           != TG_OK) {
        return TG_ERR;
    }
    return TG_OK;
}

/* ---- setters ----------------------------------------------------------- */

/* redis.url: kept as written, and parsed once into redis.server, which
 * is what the Redis client connects to. */
static tg_rc
set_url(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                void *base, const char *path)
{
    char **field = (char **)((char *)base + cmd->offset);
    tg_conf *conf = base;                       /* the redis table's base */
    const char *s = tg_conf_string(ctx, node, path);
    char why[128];

    if (s == NULL) {
        return TG_ERR;
    }
    if (tg_conf_parse_redis_url(s, &conf->redis.server, why, sizeof(why)) != TG_OK) {
        return tg_conf_error(ctx, node->start_mark, path, "bad Redis URL \"%s\": %s",
                             s, why);
    }
    free(*field);
    *field = tg_xstrdup(s);
    return TG_OK;
}

/* A decimal number of 1..10 digits, at most max (no sign, no spaces). */
static tg_rc
parse_ulong(const char *s, size_t len, unsigned long max, unsigned long *out)
{
    unsigned long v = 0;

    if (len == 0 || len > 10) {
        return TG_ERR;
    }
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return TG_ERR;
        }
        v = v * 10 + (unsigned long)(s[i] - '0');
    }
    if (v > max) {
        return TG_ERR;
    }
    *out = v;
    return TG_OK;
}

/* upstream.keepalive: an integer, or `auto` (TG_UPSTREAM_KEEPALIVE_AUTO). */
static tg_rc
set_keepalive(tg_conf_ctx *ctx, const tg_conf_cmd *cmd,
                      yaml_node_t *node, void *base, const char *path)
{
    if (node->type == YAML_SCALAR_NODE
        && node->data.scalar.style == YAML_PLAIN_SCALAR_STYLE
        && strcmp((const char *)node->data.scalar.value, "auto") == 0) {
        tg_conf_store((char *)base + cmd->offset, cmd->size,
                      TG_UPSTREAM_KEEPALIVE_AUTO);
        return TG_OK;
    }
    if (node->type == YAML_SCALAR_NODE
        && !isdigit((unsigned char)node->data.scalar.value[0])) {
        return tg_conf_type_error(ctx, node, path, "an integer or auto");
    }
    return tg_conf_int(ctx, cmd, node, base, path, 0);
}

/* An HTTP token (RFC 9110 5.6.2: 1*tchar), e.g. a header name. */
static int
tchar(unsigned char c)
{
    return isalnum(c) || (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static tg_rc
set_token(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                  void *base, const char *path)
{
    char **field = (char **)((char *)base + cmd->offset);
    const char *s = tg_conf_string(ctx, node, path);
    size_t i, len;

    if (s == NULL) {
        return TG_ERR;
    }
    len = strlen(s);
    if (tg_conf_check_len(ctx, cmd, node, path, len) != TG_OK) {
        return TG_ERR;
    }
    for (i = 0; i < len; i++) {
        if (!tchar((unsigned char)s[i])) {
            return tg_conf_error(ctx, node->start_mark, path, "bad header name "
                                 "\"%s\": only letters, digits and "
                                 "!#$%%&'*+-.^_`|~ (an HTTP token)", s);
        }
    }
    free(*field);
    *field = tg_xstrdup(s);
    return TG_OK;
}

/* A route name: like a tier name, it ends up in bucket keys and labels. */
static tg_rc
set_name(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                 void *base, const char *path)
{
    char **field = (char **)((char *)base + cmd->offset);
    const char *s = tg_conf_string(ctx, node, path);

    if (s == NULL) {
        return TG_ERR;
    }
    if (!tg_name_ok(TG_NAME_TIER, s, strlen(s))) {
        return tg_conf_error(ctx, node->start_mark, path, "bad route name "
                             "\"%s\": 1..%d characters of [a-z0-9_-]", s,
                             TG_TIER_MAX);
    }
    free(*field);
    *field = tg_xstrdup(s);
    return TG_OK;
}

/* Methods are case-sensitive (RFC 9110 9.1) and requests carry them in
 * upper case, so "get" would never match: refuse it rather than fold it. */
static tg_rc
set_method(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                   void *base, const char *path)
{
    char **field = (char **)((char *)base + cmd->offset);
    const char *s = tg_conf_string(ctx, node, path);
    char upper[TG_CONF_METHOD_MAX + 1];
    size_t i, len;
    int lower = 0;

    if (s == NULL) {
        return TG_ERR;
    }
    len = strlen(s);
    for (i = 0; i < len; i++) {
        if (s[i] >= 'a' && s[i] <= 'z') {
            lower = 1;
        } else if (!(s[i] >= 'A' && s[i] <= 'Z')) {
            break;
        }
    }
    if (i < len || (int64_t)len < cmd->min || (int64_t)len > cmd->max) {
        return tg_conf_error(ctx, node->start_mark, path, "bad method \"%s\": "
                             "%lld..%lld upper-case letters A-Z (omit the key "
                             "to match any method)", s, (long long)cmd->min,
                             (long long)cmd->max);
    }
    if (lower) {
        for (i = 0; i <= len; i++) {
            upper[i] = (char)toupper((unsigned char)s[i]);
        }
        return tg_conf_error(ctx, node->start_mark, path, "method must be "
                             "upper case: write \"%s\", not \"%s\" (methods "
                             "are case-sensitive)", upper, s);
    }
    free(*field);
    *field = tg_xstrdup(s);
    return TG_OK;
}

/* A route's path prefix, kept in the form it is matched in: normalised
 * and decoded like request targets (tg_target_route_path). */
static tg_rc
set_route_prefix(tg_conf_ctx *ctx, const tg_conf_cmd *cmd,
                         yaml_node_t *node, void *base, const char *path)
{
    char **field = (char **)((char *)base + cmd->offset);
    char out[TG_CONF_ROUTE_PATH + 1];
    const char *err;

    if (tg_conf_set_route_path(ctx, cmd, node, base, path) != TG_OK) {
        return TG_ERR;
    }
    if (tg_target_route_path(*field, out, sizeof(out), &err) != TG_OK) {
        return tg_conf_error(ctx, node->start_mark, path, "bad path \"%s\": %s",
                             *field, err);
    }
    free(*field);
    *field = tg_xstrdup(out);
    return TG_OK;
}

static tg_rc
set_route_limit(tg_conf_ctx *ctx, const tg_conf_cmd *cmd,
                        yaml_node_t *node, void *base, const char *path)
{
    if (tg_conf_walk(ctx, node, cmd->arg, base, path, path) != TG_OK) {
        return TG_ERR;
    }
    ((tg_route_conf *)base)->has_limit = 1;
    return TG_OK;
}

static tg_rc
set_tls(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                void *base, const char *path)
{
    if (tg_conf_walk(ctx, node, cmd->arg, base, path, path) != TG_OK) {
        return TG_ERR;
    }
    ((tg_listen_conf *)base)->tls = 1;
    return TG_OK;
}

tg_rc
tg_conf_set_listen(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                   void *base, const char *path)
{
    tg_conf *conf = base;
    yaml_node_item_t *it;
    yaml_node_t *item;
    char child[TG_CONF_PATHLEN];
    size_t n;

    if (node->type != YAML_SEQUENCE_NODE) {
        return tg_conf_type_error(ctx, node, path, "a sequence of listeners");
    }
    n = (size_t)(node->data.sequence.items.top - node->data.sequence.items.start);
    if (n == 0) {
        return tg_conf_error(ctx, node->start_mark, path, "needs at least one "
                             "listener");
    }
    /* Sized once: phase 4 keeps pointers into this array. */
    conf->listen = tg_xcalloc(n, sizeof(tg_listen_conf));
    for (it = node->data.sequence.items.start; it < node->data.sequence.items.top;
         it++) {
        item = yaml_document_get_node(&ctx->doc, *it);
        snprintf(child, sizeof(child), "%s[%zu]", path, conf->nlisten);
        conf->nlisten++;         /* counted before the walk: free sees it */
        if (item->type != YAML_MAPPING_NODE) {
            return tg_conf_type_error(ctx, item, child,
                                      "a mapping (e.g. { address: 127.0.0.1:8080 })");
        }
        if (tg_conf_walk(ctx, item, listen_cmds,
                         &conf->listen[conf->nlisten - 1], child, child) != TG_OK) {
            return TG_ERR;
        }
    }
    return TG_OK;
}

static tg_rc
set_servers(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                    void *base, const char *path)
{
    static const tg_conf_cmd addr_cmd = {
        "servers", tg_conf_set_addr, 0, sizeof(tg_addr), 0, 0, 0, NULL,
    };
    tg_conf *conf = base;
    yaml_node_item_t *it;
    yaml_node_t *item;
    tg_addr *addr;
    char child[TG_CONF_PATHLEN];
    size_t n;

    if (node->type != YAML_SEQUENCE_NODE) {
        return tg_conf_type_error(ctx, node, path, "a sequence of addresses");
    }
    n = (size_t)(node->data.sequence.items.top - node->data.sequence.items.start);
    if (n == 0) {
        return tg_conf_error(ctx, node->start_mark, path, "needs at least one "
                             "server");
    }
    conf->upstream.servers = tg_xcalloc(n, sizeof(tg_addr));
    for (it = node->data.sequence.items.start; it < node->data.sequence.items.top;
         it++) {
        item = yaml_document_get_node(&ctx->doc, *it);
        addr = &conf->upstream.servers[conf->upstream.nservers];
        snprintf(child, sizeof(child), "%s[%zu]", path, conf->upstream.nservers);
        conf->upstream.nservers++;
        if (tg_conf_set_addr(ctx, &addr_cmd, item, addr, child) != TG_OK) {
            return TG_ERR;
        }
        tg_conf_remember(ctx, addr, item->start_mark, child);
    }
    return TG_OK;
}

/* http.trusted_proxies: a sequence of addresses or CIDR ranges (IPv4 or
 * IPv6); a peer in one may pass its own X-Forwarded-For on. */
static tg_rc
set_trusted_proxies(tg_conf_ctx *ctx, const tg_conf_cmd *cmd,
                            yaml_node_t *node, void *base, const char *path)
{
    tg_conf *conf = base;
    yaml_node_item_t *it;
    yaml_node_t *item;
    char child[TG_CONF_PATHLEN];
    const char *s, *err;
    size_t n;

    if (node->type != YAML_SEQUENCE_NODE) {
        return tg_conf_type_error(ctx, node, path, "a sequence of addresses or "
                                  "CIDR ranges");
    }
    n = (size_t)(node->data.sequence.items.top - node->data.sequence.items.start);
    conf->http.trusted_proxies = tg_xcalloc(n ? n : 1, sizeof(tg_cidr));
    for (it = node->data.sequence.items.start; it < node->data.sequence.items.top;
         it++) {
        item = yaml_document_get_node(&ctx->doc, *it);
        snprintf(child, sizeof(child), "%s[%zu]", path, conf->http.ntrusted_proxies);
        s = tg_conf_string(ctx, item, child);
        if (s == NULL) {
            return TG_ERR;
        }
        if (tg_cidr_parse(s, &conf->http.trusted_proxies[conf->http.ntrusted_proxies],
                          &err) != TG_OK) {
            return tg_conf_error(ctx, item->start_mark, child, "bad range \"%s\": %s",
                                 s, err);
        }
        conf->http.ntrusted_proxies++;
    }
    return TG_OK;
}

/* A sequence of 1..TG_CONF_MAX_REDIS_ADDRS addresses into a fresh array
 * (*out, *n), each remembered for phase 4; what names them in messages. */
static tg_rc
addr_list(tg_conf_ctx *ctx, yaml_node_t *node, const char *path,
                  tg_addr **out, size_t *n, const char *what)
{
    static const tg_conf_cmd addr_cmd = {
        "address", tg_conf_set_addr, 0, sizeof(tg_addr), 0, 0, 0, NULL,
    };
    yaml_node_item_t *it;
    yaml_node_t *item;
    char child[TG_CONF_PATHLEN];
    size_t count;

    if (node->type != YAML_SEQUENCE_NODE) {
        return tg_conf_type_error(ctx, node, path, "a sequence of addresses");
    }
    count = (size_t)(node->data.sequence.items.top - node->data.sequence.items.start);
    if (count == 0 || count > TG_CONF_MAX_REDIS_ADDRS) {
        return tg_conf_error(ctx, node->start_mark, path, "needs 1..%d %s, got %zu",
                             TG_CONF_MAX_REDIS_ADDRS, what, count);
    }
    *out = tg_xcalloc(count, sizeof(tg_addr));
    for (it = node->data.sequence.items.start; it < node->data.sequence.items.top;
         it++) {
        tg_addr *addr = &(*out)[*n];
        item = yaml_document_get_node(&ctx->doc, *it);
        snprintf(child, sizeof(child), "%s[%zu]", path, *n);
        (*n)++;
        if (tg_conf_set_addr(ctx, &addr_cmd, item, addr, child) != TG_OK) {
            return TG_ERR;
        }
        for (size_t j = 0; j + 1 < *n; j++) {
            if (strcmp((*out)[j].text, addr->text) == 0) {
                return tg_conf_error(ctx, item->start_mark, child, "\"%s\" is "
                                     "listed twice", addr->text);
            }
        }
        tg_conf_remember(ctx, addr, item->start_mark, child);
    }
    return TG_OK;
}

/* redis.sentinel and redis.cluster exclude each other: the second one
 * written is the error. */
static tg_rc
set_sentinel(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                     void *base, const char *path)
{
    if (((tg_conf *)base)->redis.ncluster_nodes > 0) {
        return tg_conf_error(ctx, node->start_mark, path, "redis.sentinel and "
                             "redis.cluster cannot be used together");
    }
    return tg_conf_walk(ctx, node, cmd->arg, base, path, path);
}

static tg_rc
set_cluster(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                    void *base, const char *path)
{
    if (((tg_conf *)base)->redis.sentinel_master != NULL) {
        return tg_conf_error(ctx, node->start_mark, path, "redis.sentinel and "
                             "redis.cluster cannot be used together");
    }
    return tg_conf_walk(ctx, node, cmd->arg, base, path, path);
}

static tg_rc
set_sentinel_addrs(tg_conf_ctx *ctx, const tg_conf_cmd *cmd,
                           yaml_node_t *node, void *base, const char *path)
{
    tg_conf *conf = base;

    return addr_list(ctx, node, path, &conf->redis.sentinels,
                             &conf->redis.nsentinels, "sentinel addresses");
}

static tg_rc
set_cluster_nodes(tg_conf_ctx *ctx, const tg_conf_cmd *cmd,
                          yaml_node_t *node, void *base, const char *path)
{
    tg_conf *conf = base;

    return addr_list(ctx, node, path, &conf->redis.cluster_nodes,
                             &conf->redis.ncluster_nodes, "cluster nodes");
}

/* rate_limits: tier name -> { requests_per_minute, burst_limit }.  The
 * names are data, not directives, so this walks the mapping itself and
 * checks each name; duplicates are caught like any key. */
tg_rc
tg_conf_set_tiers(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                  void *base, const char *path)
{
    tg_conf *conf = base;
    yaml_node_pair_t *pair;
    yaml_node_t *key, *val, *pkey;
    tg_tier_conf *tier;
    const char *name;
    char child[TG_CONF_PATHLEN];
    size_t n;

    if (node->type != YAML_MAPPING_NODE) {
        return tg_conf_type_error(ctx, node, path, "a mapping of tier name to "
                                  "{ requests_per_minute, burst_limit }");
    }
    n = (size_t)(node->data.mapping.pairs.top - node->data.mapping.pairs.start);
    conf->tiers = tg_xcalloc(n, sizeof(tg_tier_conf));
    for (pair = node->data.mapping.pairs.start; pair < node->data.mapping.pairs.top;
         pair++) {
        key = yaml_document_get_node(&ctx->doc, pair->key);
        val = yaml_document_get_node(&ctx->doc, pair->value);
        if (key->type != YAML_SCALAR_NODE) {
            return tg_conf_error(ctx, key->start_mark, path, "tier names must be "
                                 "plain names");
        }
        name = (const char *)key->data.scalar.value;
        tg_conf_child(child, path, name);
        pkey = tg_yaml_pair_dup(&ctx->doc, node, pair);
        if (pkey != NULL) {
            return tg_conf_error(ctx, key->start_mark, child, "duplicate "
                                 "key \"%s\" (first at %zu:%zu)", name,
                                 pkey->start_mark.line + 1, pkey->start_mark.column + 1);
        }
        if (!tg_name_ok(TG_NAME_TIER, name, strlen(name))) {
            return tg_conf_error(ctx, key->start_mark, child, "bad tier name "
                                 "\"%s\": 1..%d characters of [a-z0-9_-]", name,
                                 TG_TIER_MAX);
        }
        tier = &conf->tiers[conf->ntiers++];
        tier->name = tg_xstrdup(name);
        tier->lease_ttl_ms = 1000;
        if (tg_conf_walk(ctx, val, cmd->arg, tier, child, child) != TG_OK) {
            return TG_ERR;
        }
        if (tier->lease_size > tier->burst_limit) {
            return tg_conf_error(ctx, key->start_mark, child, "lease.size %u is above "
                                 "burst_limit %u: a lease that large could never be "
                                 "taken", tier->lease_size, tier->burst_limit);
        }
    }
    return TG_OK;
}

/* routes: a sequence of { name, method, path, cost, limit }, kept in file
 * order (the first match wins).  Names must be unique: they key buckets. */
tg_rc
tg_conf_set_routes(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                   void *base, const char *path)
{
    tg_conf *conf = base;
    yaml_node_item_t *it;
    yaml_node_t *item;
    tg_route_conf *route;
    const tg_conf_mark *m, *first;
    char child[TG_CONF_PATHLEN];
    size_t n, j;

    if (node->type != YAML_SEQUENCE_NODE) {
        return tg_conf_type_error(ctx, node, path, "a sequence of routes");
    }
    n = (size_t)(node->data.sequence.items.top - node->data.sequence.items.start);
    /* Sized once: the marks point into this array. */
    conf->routes = tg_xcalloc(n, sizeof(tg_route_conf));
    for (it = node->data.sequence.items.start; it < node->data.sequence.items.top;
         it++) {
        item = yaml_document_get_node(&ctx->doc, *it);
        snprintf(child, sizeof(child), "%s[%zu]", path, conf->nroutes);
        route = &conf->routes[conf->nroutes++];   /* counted first: free sees it */
        tg_conf_route_defaults(route);
        if (item->type != YAML_MAPPING_NODE) {
            return tg_conf_type_error(ctx, item, child, "a mapping (e.g. "
                                      "{ name: leads, path: /leads })");
        }
        if (tg_conf_walk(ctx, item, cmd->arg, route, child, child) != TG_OK) {
            return TG_ERR;
        }
        for (j = 0; j + 1 < conf->nroutes; j++) {
            if (strcmp(conf->routes[j].name, route->name) == 0) {
                m = tg_conf_find_mark(ctx, &route->name);
                first = tg_conf_find_mark(ctx, &conf->routes[j].name);
                return tg_conf_error(ctx, m->mark, m->path, "duplicate route "
                                     "name \"%s\" (first at %zu:%zu)",
                                     route->name, first->mark.line + 1,
                                     first->mark.column + 1);
            }
        }
    }
    return TG_OK;
}

/* ---- section alerts ---------------------------------------------------- */

tg_rc
tg_conf_set_alerts(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                   void *base, const char *path)
{
    if (tg_conf_walk(ctx, node, cmd->arg, base, path, path) != TG_OK) {
        return TG_ERR;
    }
    ((tg_conf *)base)->alerts.enabled = 1;
    return TG_OK;
}

static tg_rc
set_channel(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                    void *base, const char *path)
{
    tg_alert_channel_conf *ch = (tg_alert_channel_conf *)((char *)base + cmd->offset);

    if (tg_conf_walk(ctx, node, cmd->arg, ch, path, path) != TG_OK) {
        return TG_ERR;
    }
    ch->enabled = 1;
    return TG_OK;
}

static tg_rc
set_rule(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                 void *base, const char *path)
{
    tg_alert_rule_conf *rule = (tg_alert_rule_conf *)((char *)base + cmd->offset);

    if (tg_conf_walk(ctx, node, cmd->arg, rule, path, path) != TG_OK) {
        return TG_ERR;
    }
    rule->enabled = 1;
    return TG_OK;
}

static const char *const channel_names[TG_ALERT__NCHANNELS] = {
    "slack", "pagerduty", "webhook",
};

/* to: [slack, pagerduty, webhook] -> a bit set; empty is an error. */
static tg_rc
set_to(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
               void *base, const char *path)
{
    unsigned *field = (unsigned *)((char *)base + cmd->offset), set = 0, bit;
    yaml_node_item_t *it;
    yaml_node_t *item;
    const char *s;
    size_t c;

    if (node->type != YAML_SEQUENCE_NODE || node->data.sequence.items.top ==
        node->data.sequence.items.start) {
        return tg_conf_type_error(ctx, node, path, "a non-empty sequence of "
                                  "channels (slack, pagerduty, webhook)");
    }
    for (it = node->data.sequence.items.start; it < node->data.sequence.items.top;
         it++) {
        item = yaml_document_get_node(&ctx->doc, *it);
        s = tg_conf_string(ctx, item, path);
        if (s == NULL) {
            return TG_ERR;
        }
        for (c = 0; c < TG_ALERT__NCHANNELS; c++) {
            if (strcmp(s, channel_names[c]) == 0) {
                break;
            }
        }
        if (c == TG_ALERT__NCHANNELS) {
            return tg_conf_error(ctx, item->start_mark, path, "unknown channel "
                                 "\"%s\", expected slack, pagerduty or webhook", s);
        }
        bit = 1u << c;
        if (set & bit) {
            return tg_conf_error(ctx, item->start_mark, path, "channel \"%s\" "
                                 "is listed twice", s);
        }
        set |= bit;
    }
    *field = set;
    return TG_OK;
}

/* A *_file secret: the whole file, surrounding whitespace removed
 * (systemd LoadCredential= files often end with a newline). */
static tg_rc
read_secret(tg_conf_ctx *ctx, const void *field, const char *file,
                    char **out, int is_url, const char *defpath)
{
    const tg_conf_mark *m = tg_conf_find_mark(ctx, field);
    yaml_mark_t mark = m ? m->mark : ctx->doc.start_mark;
    const char *path = m ? m->path : defpath;
    char why[TG_CONF_ERRLEN];
    size_t len = 0, lead;
    char *text = tg_yaml_read_file(file, TG_SECRET_MAX, &len, why, sizeof(why));

    if (text == NULL) {
        return tg_conf_error(ctx, mark, path, "%s", why);
    }
    while (len > 0 && isspace((unsigned char)text[len - 1])) {
        text[--len] = '\0';
    }
    lead = strspn(text, " \t\r\n");
    memmove(text, text + lead, len - lead + 1);
    len -= lead;
    if (strlen(text) != len) {
        free(text);
        return tg_conf_error(ctx, mark, path, "%s: contains a NUL byte", file);
    }
    if (tg_conf_check_secret(ctx, mark, path, text, is_url) != TG_OK) {
        free(text);
        return TG_ERR;
    }
    free(*out);
    *out = text;
    return TG_OK;
}

/* Phase 3 of alerts: each channel has exactly one source for its secret
 * (read now, from its file if so), and every rule sends to configured
 * channels.  Without rules: every rule with its defaults, to the channels
 * of its default list that are configured. */
tg_rc
tg_conf_validate_alerts(tg_conf_ctx *ctx)
{
    static const char *const url_names[TG_ALERT__NCHANNELS] = {
        "webhook_url", "url", "url",
    };
    static const char *const rule_names[TG_RULE__COUNT] = {
        "breaches", "redis_down", "breaker_open", "upstream_errors", "anomaly",
    };
    tg_conf *conf = ctx->conf;
    int rules_written = tg_conf_find_mark(ctx, conf->alerts.rule) != NULL;
    unsigned configured = 0;
    const tg_conf_mark *m;
    char p[TG_CONF_PATHLEN];
    size_t c, r;

    for (c = 0; c < TG_ALERT__NCHANNELS; c++) {
        tg_alert_channel_conf *ch = &conf->alerts.channel[c];
        const tg_conf_mark *cm = tg_conf_find_mark(ctx, ch);

        if (!ch->enabled) {
            continue;
        }
        configured |= 1u << c;
        snprintf(p, sizeof(p), "alerts.%s", channel_names[c]);
        if (c == TG_ALERT_PAGERDUTY) {
            if ((ch->key != NULL) == (ch->key_file != NULL)) {
                return tg_conf_error(ctx, cm->mark, p, "needs exactly one of "
                                     "routing_key and routing_key_file");
            }
            if (ch->key_file != NULL && read_secret(ctx, &ch->key_file,
                    ch->key_file, &ch->key, 0, p) != TG_OK) {
                return TG_ERR;
            }
            continue;
        }
        if ((tg_conf_find_mark(ctx, &ch->url) != NULL) == (ch->url_file != NULL)) {
            return tg_conf_error(ctx, cm->mark, p, "needs exactly one of %s "
                                 "and %s_file", url_names[c], url_names[c]);
        }
        if (ch->url_file != NULL && read_secret(ctx, &ch->url_file,
                ch->url_file, &ch->url, 1, p) != TG_OK) {
            return TG_ERR;
        }
    }
    for (r = 0; r < TG_RULE__COUNT; r++) {
        tg_alert_rule_conf *rule = &conf->alerts.rule[r];

        if (!rules_written) {
            rule->to &= configured;
            rule->enabled = rule->to != 0;
            continue;
        }
        if (!rule->enabled || (rule->to & ~configured) == 0) {
            continue;
        }
        for (c = 0; c < TG_ALERT__NCHANNELS; c++) {
            if (rule->to & ~configured & (1u << c)) {
                break;
            }
        }
        m = tg_conf_find_mark(ctx, &rule->to);
        if (m == NULL) {
            m = tg_conf_find_mark(ctx, rule);
        }
        snprintf(p, sizeof(p), "alerts.rules.%s.to", rule_names[r]);
        return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                             m ? m->path : p, "channel \"%s\" is not configured "
                             "(add alerts.%s%s)", channel_names[c],
                             channel_names[c],
                             m == tg_conf_find_mark(ctx, rule) ? ", or write to:" : "");
    }
    return TG_OK;
}

/* ---- section adaptive -------------------------------------------------- */

/* shed_order: [basic, pro, enterprise] -> names; checked against
 * rate_limits in phase 3 (the sections may come in any order). */
static tg_rc
set_shed_order(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                       void *base, const char *path)
{
    tg_conf *conf = base;
    yaml_node_item_t *it;
    yaml_node_t *item;
    const char *s;
    size_t n, i;

    TG_UNUSED(cmd);
    if (node->type != YAML_SEQUENCE_NODE) {
        return tg_conf_type_error(ctx, node, path, "a sequence of tier names");
    }
    n = (size_t)(node->data.sequence.items.top - node->data.sequence.items.start);
    conf->adaptive.shed_order = tg_xcalloc(n ? n : 1, sizeof(char *));
    for (it = node->data.sequence.items.start; it < node->data.sequence.items.top;
         it++) {
        item = yaml_document_get_node(&ctx->doc, *it);
        s = tg_conf_string(ctx, item, path);
        if (s == NULL) {
            return TG_ERR;
        }
        for (i = 0; i < conf->adaptive.nshed_order; i++) {
            if (strcmp(conf->adaptive.shed_order[i], s) == 0) {
                return tg_conf_error(ctx, item->start_mark, path, "tier \"%s\" "
                                     "is listed twice", s);
            }
        }
        conf->adaptive.shed_order[conf->adaptive.nshed_order++] = tg_xstrdup(s);
    }
    return TG_OK;
}

/* Bounds in order; shed_order names tiers of rate_limits (by default the
 * ones of basic, pro, enterprise it has). */
tg_rc
tg_conf_validate_adaptive(tg_conf_ctx *ctx)
{
    static const char *const def[] = { "basic", "pro", "enterprise" };
    tg_conf *conf = ctx->conf;
    const tg_conf_mark *m;
    size_t i;

    if (!conf->adaptive.enabled) {
        return TG_OK;
    }
    if (conf->adaptive.min > conf->adaptive.max
        || conf->adaptive.initial < conf->adaptive.min
        || conf->adaptive.initial > conf->adaptive.max) {
        m = tg_conf_find_mark(ctx, &conf->adaptive.initial);
        if (m == NULL) {
            m = tg_conf_find_mark(ctx, &conf->adaptive.max);
        }
        if (m == NULL) {
            m = tg_conf_find_mark(ctx, &conf->adaptive.min);
        }
        return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                             m ? m->path : "adaptive.concurrency",
                             "needs min <= initial <= max, got min %u, "
                             "initial %u, max %u", conf->adaptive.min,
                             conf->adaptive.initial, conf->adaptive.max);
    }
    if (conf->adaptive.shed_order == NULL) {
        conf->adaptive.shed_order = tg_xcalloc(TG_ARRAY_LEN(def), sizeof(char *));
        for (i = 0; i < TG_ARRAY_LEN(def); i++) {
            if (tg_conf_tier(conf, def[i]) != NULL) {
                conf->adaptive.shed_order[conf->adaptive.nshed_order++] =
                    tg_xstrdup(def[i]);
            }
        }
        return TG_OK;
    }
    for (i = 0; i < conf->adaptive.nshed_order; i++) {
        if (tg_conf_tier(conf, conf->adaptive.shed_order[i]) == NULL) {
            m = tg_conf_find_mark(ctx, &conf->adaptive.shed_order);
            return tg_conf_error(ctx, m ? m->mark : ctx->doc.start_mark,
                                 m ? m->path : "adaptive.shed_order",
                                 "unknown tier \"%s\" (not in rate_limits)",
                                 conf->adaptive.shed_order[i]);
        }
    }
    return TG_OK;
}
