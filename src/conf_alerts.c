/*
 * conf_alerts.c - the sections alerts (channels, rules; see alerts.h) and
 * anomaly (see anomaly.h): their tables, setters and rules.  A channel's
 * url and key are secrets: tg_conf_set_secret and read_secret never echo
 * the value in a message.
 */
#include "conf_int.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- static prototypes ------------------------------------------------- */

static TG_CONF_SETTER(set_channel);
static TG_CONF_SETTER(set_rule);
static TG_CONF_SETTER(set_to);
static tg_rc read_secret(tg_conf_ctx *ctx, const void *field, const char *file,
                         char **out, int is_url, const char *defpath);

/* ---- tables ------------------------------------------------------------ */

/* A channel's and a rule's place in the snapshot. */
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

static const char *const channel_names[TG_ALERT__NCHANNELS] = {
    "slack", "pagerduty", "webhook",
};

/* ---- setters ----------------------------------------------------------- */

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

/* ---- phase 3 ----------------------------------------------------------- */

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
