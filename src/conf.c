/*
 * conf.c - load, check and build a configuration snapshot: the public
 * API, the four build phases, the top-level table and the one defaults
 * block.
 *
 * Phases (twemproxy conf_pre_validate / parse / post_validate, nginx
 * ngx_command_t):
 *
 *   1. structure  read the text, scan its YAML events once to reject what we
 *                 do not support (anchors, aliases, several documents) with
 *                 the exact mark, then load the node tree;
 *   2. parse      walk the tree through the directive tables (conf_walk.c):
 *                 unknown keys, duplicates, wrong types, ranges and enum
 *                 values are caught here, at the mark of the offending key
 *                 or value;
 *   3. validate   cross-field rules and derived values (workers: 0 = CPUs);
 *   4. resolve    turn every address into a sockaddr (getaddrinfo).
 *
 * Each section has its table, its own setters and its own phase-3 rules
 * in one file, named in the top-level table below:
 *
 *   conf_http.c      listen, admin, http, metrics, access_log
 *   conf_upstream.c  upstream (breaker, health_check)
 *   conf_limits.c    auth, rate_limits, routes, global_limit
 *   conf_redis.c     store, redis (sentinel, cluster); the Redis URL
 *   conf_alerts.c    alerts, anomaly
 *   conf_adaptive.c  adaptive (concurrency, throttle)
 *
 * The walker, the generic setters and the error format are in conf_walk.c;
 * what these files share is declared in conf_int.h.
 *
 * Defaults are set in ONE place, defaults() here, before phase 2; a key
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

#include "conf_int.h"

/* ---- static prototypes ------------------------------------------------- */

static tg_rc resolve_getaddrinfo(const char *host, struct sockaddr_storage *sa,
                                 socklen_t *salen, char *why, size_t whylen);
static tg_conf *build(const char *name, const char *text, size_t len, char *path,
                      char *dir, char *err, size_t errlen);
static void defaults(tg_conf *conf);
static void conf_free(tg_conf *conf);
static tg_rc structure(tg_conf_ctx *ctx);
static tg_rc validate(tg_conf_ctx *ctx);
static tg_rc resolve_one(tg_conf_ctx *ctx, tg_addr *addr, const char *defpath,
                         int allow_port0);
static int same_listener(const tg_addr *a, const tg_addr *b);
static tg_rc resolve(tg_conf_ctx *ctx);

/* ---- tables ------------------------------------------------------------ */

static const tg_conf_enum level_enum[] = {
    { "debug", TG_LOG_DEBUG }, { "info", TG_LOG_INFO },
    { "warn", TG_LOG_WARN }, { "error", TG_LOG_ERROR }, { NULL, 0 },
};

/* The top level: each section's table is in the file listed at the top. */
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
    conf->redis.native = 1;
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
