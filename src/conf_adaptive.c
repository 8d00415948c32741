/*
 * conf_adaptive.c - the section adaptive (see adaptive.h): concurrency
 * limits, shed order and dynamic throttling; its table, setters and rules.
 */
#include "conf_int.h"

#include <string.h>

/* ---- static prototypes ------------------------------------------------- */

static TG_CONF_SETTER(set_shed_order);

/* ---- tables ------------------------------------------------------------ */

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

/* ---- setters ----------------------------------------------------------- */

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

/* ---- phase 3 ----------------------------------------------------------- */

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
