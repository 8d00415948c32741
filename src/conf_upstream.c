/*
 * conf_upstream.c - the section upstream: servers, timeouts, keep-alive,
 * the breaker of each server and the active health check; its table,
 * setters and rules.
 */
#include "conf_int.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>

/* ---- static prototypes ------------------------------------------------- */

static TG_CONF_SETTER(set_servers);
static TG_CONF_SETTER(set_keepalive);

/* ---- tables ------------------------------------------------------------ */

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

/* ---- setters ----------------------------------------------------------- */

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

/* ---- phase 3 ----------------------------------------------------------- */

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
