/*
 * conf_limits.c - who is limited and how much: the sections auth,
 * rate_limits (tiers, leases), routes and global_limit; their tables,
 * setters and the rules across them (the anonymous tier exists, every
 * route's cost can pass, every rate can be kept).
 */
#include "conf_int.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tollgate/target.h"

/* ---- static prototypes ------------------------------------------------- */

static int tchar(int c);
static TG_CONF_SETTER(set_token);
static TG_CONF_SETTER(set_name);
static TG_CONF_SETTER(set_method);
static TG_CONF_SETTER(set_route_prefix);
static TG_CONF_SETTER(set_route_limit);
static tg_rc check_costs(tg_conf_ctx *ctx);
static tg_rc check_rate(tg_conf_ctx *ctx, const uint32_t *field, uint64_t per_us);
static tg_rc check_rates(tg_conf_ctx *ctx);

/* ---- tables ------------------------------------------------------------ */

/* Lookups of keys the worker does not know, per client IP (both fields
 * optional: the defaults are in conf.c defaults()). */
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

/* ---- setters ----------------------------------------------------------- */

/* An HTTP token (RFC 9110 5.6.2: 1*tchar), e.g. a header name. */
static int
tchar(int c)
{
    return isalnum(c) || (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static tg_rc
set_token(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
          void *base, const char *path)
{
    return tg_conf_set_chars(ctx, cmd, node, base, path, tchar, "bad header name "
                             "\"%s\": only letters, digits and "
                             "!#$%%&'*+-.^_`|~ (an HTTP token)");
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

/* ---- phase 3 ----------------------------------------------------------- */

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
