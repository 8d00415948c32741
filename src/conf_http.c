/*
 * conf_http.c - the sections of the edge: listen (with tls), admin, http,
 * metrics (statsd) and access_log; their tables, setters and rules.
 */
#include "conf_int.h"

#include <stdio.h>

/* ---- static prototypes ------------------------------------------------- */

static TG_CONF_SETTER(set_tls);
static TG_CONF_SETTER(set_trusted_proxies);

/* ---- tables ------------------------------------------------------------ */

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

/* ---- setters ----------------------------------------------------------- */

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
set_tls(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
        void *base, const char *path)
{
    if (tg_conf_walk(ctx, node, cmd->arg, base, path, path) != TG_OK) {
        return TG_ERR;
    }
    ((tg_listen_conf *)base)->tls = 1;
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

/* ---- phase 3 ----------------------------------------------------------- */

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
