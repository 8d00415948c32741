/*
 * conf_redis.c - the store: the key store, and the section redis (url,
 * sentinel, cluster, credentials); its table, setters and rules, the Redis
 * URL parser (tg_conf_parse_redis_url) and what a reload cannot change
 * (tg_conf_store_diff).
 */
#include "conf_int.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- static prototypes ------------------------------------------------- */

static int addrs_differ(const tg_addr *a, size_t na, const tg_addr *b, size_t nb);
static int str_differ(const char *a, const char *b);
static TG_CONF_SETTER(set_url);
static TG_CONF_SETTER(set_sentinel);
static TG_CONF_SETTER(set_cluster);
static TG_CONF_SETTER(set_sentinel_addrs);
static TG_CONF_SETTER(set_cluster_nodes);
static tg_rc addr_list(tg_conf_ctx *ctx, yaml_node_t *node, const char *path,
                       tg_addr **out, size_t *n, const char *what);
static tg_rc password(tg_conf_ctx *ctx, char **pass, char **file, char **user,
                      const char *section);

/* ---- tables ------------------------------------------------------------ */

const tg_conf_enum tg_conf_store_enum[] = {
    { "redis", TG_STORE_REDIS }, { "local", TG_STORE_LOCAL }, { NULL, 0 },
};

static const tg_conf_enum native_enum[] = {
    { "auto", 1 }, { "off", 0 }, { NULL, 0 },
};

static const tg_conf_enum failure_enum[] = {
    { "local", TG_FAIL_LOCAL }, { "allow", TG_FAIL_ALLOW },
    { "deny", TG_FAIL_DENY }, { NULL, 0 },
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
    { "native", tg_conf_set_enum, TG_FIELD(tg_conf, redis.native), 0, 0, 0, native_enum },
    { "sentinel", set_sentinel, TG_NOFIELD, 0, 0, 0, sentinel_cmds },
    { "cluster", set_cluster, TG_NOFIELD, 0, 0, 0, cluster_cmds },
    { "username", tg_conf_set_prefix, TG_FIELD(tg_conf, redis.username), 1, 127, 0, NULL },
    { "password", tg_conf_set_secret, TG_FIELD(tg_conf, redis.password), 1, 511, 0, NULL },
    { "password_file", tg_conf_set_path, TG_FIELD(tg_conf, redis.password_file), 0, 0, 0,
      NULL },
    { NULL, NULL, 0, 0, 0, 0, 0, NULL },
};

/* ---- public functions -------------------------------------------------- */

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
        { a->redis.native != b->redis.native, "redis.native" },
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
        if (tg_parse_dec(ps, (size_t)(pe - ps), 65535, &port) != TG_OK
            || port == 0) {
            snprintf(why, whylen, "port must be a number 1..65535");
            return TG_ERR;
        }
        p = pe;
    }
    if (*p == '/') {
        const char *ds = p + 1;
        if (tg_parse_dec(ds, (size_t)(end - ds), 15, &db) != TG_OK) {
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
        /* a URL with userinfo may hold a password: the error, which goes to
         * logs and terminals, names the problem, never the URL */
        if (strchr(s, '@') != NULL) {
            return tg_conf_error(ctx, node->start_mark, path, "bad Redis URL "
                                 "(not shown: it has credentials): %s", why);
        }
        return tg_conf_error(ctx, node->start_mark, path, "bad Redis URL \"%s\": %s",
                             s, why);
    }
    free(*field);
    *field = tg_xstrdup(s);
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

/* ---- phase 3 ----------------------------------------------------------- */

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
