/*
 * conf_walk.c - phase 2 of the config: the table walker and the setters
 * every section uses.
 *
 * tg_conf_walk() goes through one YAML mapping with a table of directives
 * (tg_conf_cmd, conf_int.h): an unknown key is an error with a "did you
 * mean", a duplicate one too, a missing required key as well; each value
 * goes to its directive's setter, and its position is remembered for the
 * messages of phases 3 and 4 (tg_conf_find_mark).  The setters here are
 * the generic ones (integers, sizes, bools, enums, paths, addresses,
 * strings, secrets, ratios, sections); a setter only one section needs
 * lives in that section's file.  Every message goes through
 * tg_conf_error(): "FILE:LINE:COL: key.path: what is wrong".
 */
#include "conf_int.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- static prototypes ------------------------------------------------- */

static size_t distance(const char *a, const char *b);
static const char *got(const yaml_node_t *node, char *buf, size_t len);
static int number(const char *s, int suffix, int64_t *out);

/* ---- phase 2: the table walker ----------------------------------------- */

/* Edit distance, for "did you mean" on unknown keys. */
static size_t
distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b), i, j, prev, cur, tmp;
    size_t row[64];

    if (la >= TG_ARRAY_LEN(row) || lb >= TG_ARRAY_LEN(row)) {
        return SIZE_MAX;
    }
    for (j = 0; j <= lb; j++) {
        row[j] = j;
    }
    for (i = 1; i <= la; i++) {
        prev = row[0];
        row[0] = i;
        for (j = 1; j <= lb; j++) {
            cur = prev + (a[i - 1] != b[j - 1]);
            if (row[j] + 1 < cur) {
                cur = row[j] + 1;
            }
            if (row[j - 1] + 1 < cur) {
                cur = row[j - 1] + 1;
            }
            tmp = row[j];
            row[j] = cur;
            prev = tmp;
        }
    }
    return row[lb];
}

void
tg_conf_child(char *out, const char *parent, const char *key)
{
    if (parent[0] == '\0') {
        snprintf(out, TG_CONF_PATHLEN, "%s", key);
    } else {
        snprintf(out, TG_CONF_PATHLEN, "%s.%s", parent, key);
    }
}

void
tg_conf_remember(tg_conf_ctx *ctx, const void *field, yaml_mark_t mark,
                 const char *path)
{
    if (ctx->nmarks == ctx->capmarks) {
        ctx->capmarks = ctx->capmarks ? ctx->capmarks * 2 : 32;
        ctx->marks = tg_xrealloc(ctx->marks, ctx->capmarks * sizeof(*ctx->marks));
    }
    ctx->marks[ctx->nmarks].field = field;
    ctx->marks[ctx->nmarks].mark = mark;
    ctx->marks[ctx->nmarks].path = tg_xstrdup(path);
    ctx->nmarks++;
}

/*
 * Walk mapping `map` through `cmds`, storing into `base`.  `path` is the
 * mapping's key path ("" at top level), `section` its name for messages.
 */
tg_rc
tg_conf_walk(tg_conf_ctx *ctx, yaml_node_t *map, const tg_conf_cmd *cmds,
             void *base, const char *path, const char *section)
{
    yaml_node_pair_t *pair;
    yaml_node_t *key, *val, *pkey;
    const tg_conf_cmd *cmd, *best;
    const char *kname;
    char child[TG_CONF_PATHLEN];
    int seen[TG_CONF_MAX_CMDS] = { 0 };
    size_t d, bestd;

    if (map->type != YAML_MAPPING_NODE) {
        if (path[0] == '\0') {
            return tg_conf_error(ctx, map->start_mark, "", "top level: expected "
                                 "a mapping of sections, got %s", tg_yaml_kind(map));
        }
        return tg_conf_type_error(ctx, map, path, "a mapping");
    }

    for (pair = map->data.mapping.pairs.start; pair < map->data.mapping.pairs.top;
         pair++) {
        key = yaml_document_get_node(&ctx->doc, pair->key);
        val = yaml_document_get_node(&ctx->doc, pair->value);
        if (key->type != YAML_SCALAR_NODE) {
            return tg_conf_error(ctx, key->start_mark, path, "keys must be plain "
                                 "names, got %s", tg_yaml_kind(key));
        }
        kname = (const char *)key->data.scalar.value;
        tg_conf_child(child, path, kname);

        pkey = tg_yaml_pair_dup(&ctx->doc, map, pair);
        if (pkey != NULL) {
            return tg_conf_error(ctx, key->start_mark, child, "duplicate key "
                                 "\"%s\" (first at %zu:%zu)", kname,
                                 pkey->start_mark.line + 1, pkey->start_mark.column + 1);
        }

        best = NULL;
        bestd = SIZE_MAX;
        for (cmd = cmds; cmd->name != NULL; cmd++) {
            if (strcmp(cmd->name, kname) == 0) {
                break;
            }
            d = distance(cmd->name, kname);
            if (d < bestd) {
                bestd = d;
                best = cmd;
            }
        }
        if (cmd->name == NULL) {
            /* Suggest only near misses: a random key gets no guess. */
            char hint[96] = "";
            if (best != NULL && bestd <= 2) {
                snprintf(hint, sizeof(hint), " (did you mean \"%s\"?)", best->name);
            }
            if (section[0] == '\0') {
                return tg_conf_error(ctx, key->start_mark, child, "unknown key "
                                     "\"%s\" at top level%s", kname, hint);
            }
            return tg_conf_error(ctx, key->start_mark, child, "unknown key \"%s\" "
                                 "in section \"%s\"%s", kname, section, hint);
        }
        seen[cmd - cmds] = 1;

        if (cmd->set(ctx, cmd, val, base, child) != TG_OK) {
            return TG_ERR;
        }
        if (cmd->offset != TG_CONF_NOFIELD) {
            tg_conf_remember(ctx, (char *)base + cmd->offset, val->start_mark, child);
        }
    }

    for (cmd = cmds; cmd->name != NULL; cmd++) {
        if ((cmd->flags & TG_CONF_REQUIRED) && !seen[cmd - cmds]) {
            if (path[0] == '\0') {
                return tg_conf_error(ctx, map->start_mark, "", "missing required "
                                     "section \"%s\"", cmd->name);
            }
            return tg_conf_error(ctx, map->start_mark, path, "missing required "
                                 "key \"%s\"", cmd->name);
        }
    }
    return TG_OK;
}

const tg_conf_mark *
tg_conf_find_mark(const tg_conf_ctx *ctx, const void *field)
{
    size_t i;

    for (i = 0; i < ctx->nmarks; i++) {
        if (ctx->marks[i].field == field) {
            return &ctx->marks[i];
        }
    }
    return NULL;
}

/* Format "FILE:LINE:COL: path: message" into ctx->err.  Always TG_ERR. */
tg_rc
tg_conf_error(tg_conf_ctx *ctx, yaml_mark_t mark, const char *path,
              const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    tg_yaml_verror(ctx->err, ctx->errlen, ctx->name, mark, path, fmt, ap);
    va_end(ap);
    return TG_ERR;
}

/* ---- setters ----------------------------------------------------------- */

/* "got ..." part of a wrong-type message: the scalar itself, quoted and
 * clipped, or the kind of node. */
static const char *
got(const yaml_node_t *node, char *buf, size_t len)
{
    if (node->type == YAML_MAPPING_NODE) {
        return "a mapping";
    }
    if (node->type == YAML_SEQUENCE_NODE) {
        return "a sequence";
    }
    if (tg_yaml_is_null(node)) {
        return "null";
    }
    snprintf(buf, len, "\"%.40s%s\"", (const char *)node->data.scalar.value,
             node->data.scalar.length > 40 ? "..." : "");
    return buf;
}

tg_rc
tg_conf_type_error(tg_conf_ctx *ctx, yaml_node_t *node, const char *path,
                   const char *expected)
{
    char buf[64];

    return tg_conf_error(ctx, node->start_mark, path, "expected %s, got %s",
                         expected, got(node, buf, sizeof(buf)));
}

/* A non-null scalar of any style, as text, or NULL after an error. */
const char *
tg_conf_string(tg_conf_ctx *ctx, yaml_node_t *node, const char *path)
{
    if (node->type != YAML_SCALAR_NODE || tg_yaml_is_null(node)) {
        tg_conf_type_error(ctx, node, path, "a string");
        return NULL;
    }
    if (strlen((const char *)node->data.scalar.value) != node->data.scalar.length) {
        tg_conf_error(ctx, node->start_mark, path, "string contains a NUL byte");
        return NULL;
    }
    return (const char *)node->data.scalar.value;
}

void
tg_conf_store(void *field, size_t size, uint64_t v)
{
    switch (size) {
    case 1: { uint8_t x = (uint8_t)v; memcpy(field, &x, 1); break; }
    case 2: { uint16_t x = (uint16_t)v; memcpy(field, &x, 2); break; }
    case 4: { uint32_t x = (uint32_t)v; memcpy(field, &x, 4); break; }
    default: memcpy(field, &v, 8); break;
    }
}

/* Parse a decimal integer (optional sign) with an optional k/m/g suffix
 * when `suffix`.  Returns 0 if not a number, -1 if it overflows int64, 1 ok. */
static int
number(const char *s, int suffix, int64_t *out)
{
    int neg = 0;
    uint64_t v = 0, mul = 1;
    const char *p = s;

    if (*p == '-' || *p == '+') {
        neg = (*p == '-');
        p++;
    }
    if (!isdigit((unsigned char)*p)) {
        return 0;
    }
    for (; isdigit((unsigned char)*p); p++) {
        if (v > (UINT64_MAX - 9) / 10) {
            return -1;
        }
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (suffix && *p != '\0' && p[1] == '\0') {
        switch (tolower((unsigned char)*p)) {
        case 'k': mul = 1024ull; p++; break;
        case 'm': mul = 1024ull * 1024; p++; break;
        case 'g': mul = 1024ull * 1024 * 1024; p++; break;
        default: break;
        }
    }
    if (*p != '\0') {
        return 0;
    }
    if (v > (uint64_t)INT64_MAX / mul) {
        return -1;
    }
    *out = neg ? -(int64_t)(v * mul) : (int64_t)(v * mul);
    return 1;
}

tg_rc
tg_conf_int(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
            void *base, const char *path, int suffix)
{
    const char *expected = suffix ? "a size (integer, or with a k/m/g suffix)"
                                  : "an integer";
    const char *s;
    int64_t v;
    int r;

    /* Integers are plain scalars; a quoted "100" is a string in YAML, so a
     * quoted value is accepted only where a suffix string is expected. */
    if (node->type != YAML_SCALAR_NODE || tg_yaml_is_null(node) ||
        (!suffix && node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)) {
        return tg_conf_type_error(ctx, node, path, expected);
    }
    s = (const char *)node->data.scalar.value;
    r = number(s, suffix, &v);
    if (r == 0) {
        return tg_conf_type_error(ctx, node, path, expected);
    }
    if (r < 0 || v < cmd->min || v > cmd->max) {
        return tg_conf_error(ctx, node->start_mark, path, "%s is out of range "
                             "(%lld..%lld)", s, (long long)cmd->min,
                             (long long)cmd->max);
    }
    tg_conf_store((char *)base + cmd->offset, cmd->size, (uint64_t)v);
    return TG_OK;
}

tg_rc
tg_conf_set_uint(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                 void *base, const char *path)
{
    return tg_conf_int(ctx, cmd, node, base, path, 0);
}

tg_rc
tg_conf_set_size(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                 void *base, const char *path)
{
    return tg_conf_int(ctx, cmd, node, base, path, 1);
}

/* YAML 1.2 core booleans only: "yes"/"no"/"on" are strings, not a guess. */
tg_rc
tg_conf_set_bool(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                 void *base, const char *path)
{
    const char *s;
    int v;

    if (node->type != YAML_SCALAR_NODE ||
        node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) {
        return tg_conf_type_error(ctx, node, path, "a bool (true or false)");
    }
    s = (const char *)node->data.scalar.value;
    if (strcmp(s, "true") == 0 || strcmp(s, "True") == 0 || strcmp(s, "TRUE") == 0) {
        v = 1;
    } else if (strcmp(s, "false") == 0 || strcmp(s, "False") == 0 ||
               strcmp(s, "FALSE") == 0) {
        v = 0;
    } else {
        return tg_conf_type_error(ctx, node, path, "a bool (true or false)");
    }
    tg_conf_store((char *)base + cmd->offset, cmd->size, (uint64_t)v);
    return TG_OK;
}

tg_rc
tg_conf_set_enum(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                 void *base, const char *path)
{
    const tg_conf_enum *e;
    char choices[128] = "";
    size_t n = 0;
    const char *s = tg_conf_string(ctx, node, path);

    if (s == NULL) {
        return TG_ERR;
    }
    for (e = cmd->arg; e->name != NULL; e++) {
        if (strcmp(e->name, s) == 0) {
            tg_conf_store((char *)base + cmd->offset, cmd->size,
                          (uint64_t)(uint32_t)e->value);
            return TG_OK;
        }
        n += (size_t)snprintf(choices + n, sizeof(choices) - n, "%s%s",
                              n ? "|" : "", e->name);
        if (n >= sizeof(choices)) {
            n = sizeof(choices) - 1;
        }
    }
    return tg_conf_error(ctx, node->start_mark, path, "bad value \"%s\", "
                         "expected one of %s", s, choices);
}

/* Relative paths are relative to the config file's directory, so a config
 * means the same thing whatever the daemon's working directory. */
tg_rc
tg_conf_set_path(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                 void *base, const char *path)
{
    char **field = (char **)((char *)base + cmd->offset);
    const char *s = tg_conf_string(ctx, node, path);
    const char *dir = ctx->conf->dir;
    size_t dl, sl;
    char *abs;

    if (s == NULL) {
        return TG_ERR;
    }
    if (s[0] == '\0') {
        return tg_conf_error(ctx, node->start_mark, path, "path is empty");
    }
    if (s[0] == '/') {
        abs = tg_xstrdup(s);
    } else {
        dl = strlen(dir);
        sl = strlen(s);
        abs = tg_xmalloc(dl + sl + 2);
        memcpy(abs, dir, dl);
        if (dl == 0 || dir[dl - 1] != '/') {
            abs[dl++] = '/';
        }
        memcpy(abs + dl, s, sl + 1);
    }
    free(*field);
    *field = abs;
    return TG_OK;
}

/* Only the text is kept here: phase 4 resolves it. */
tg_rc
tg_conf_set_addr(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                 void *base, const char *path)
{
    tg_addr *addr = (tg_addr *)((char *)base + cmd->offset);
    const char *s = tg_conf_string(ctx, node, path);

    if (s == NULL) {
        return TG_ERR;
    }
    if (strlen(s) >= sizeof(addr->text)) {
        return tg_conf_error(ctx, node->start_mark, path, "address is too long "
                             "(at most %zu characters)", sizeof(addr->text) - 1);
    }
    memcpy(addr->text, s, strlen(s) + 1);
    return TG_OK;
}

/* The length of a string value against the directive's min..max. */
tg_rc
tg_conf_check_len(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                  const char *path, size_t len)
{
    if ((int64_t)len < cmd->min || (int64_t)len > cmd->max) {
        return tg_conf_error(ctx, node->start_mark, path, "length %zu is out of "
                             "range (%lld..%lld characters)", len,
                             (long long)cmd->min, (long long)cmd->max);
    }
    return TG_OK;
}

/* A string of cmd->min..max bytes, each one ok() accepts (it is given the
 * byte as an unsigned char), into the field.  bad is the message for a
 * byte ok() refuses: a printf format with one %s, the value. */
tg_rc
tg_conf_set_chars(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                  void *base, const char *path, int (*ok)(int c), const char *bad)
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
        if (!ok((unsigned char)s[i])) {
            return tg_conf_error(ctx, node->start_mark, path, bad, s);
        }
    }
    free(*field);
    *field = tg_xstrdup(s);
    return TG_OK;
}

/* The prefix starts every Redis key we write: printable, no spaces. */
tg_rc
tg_conf_set_prefix(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                   void *base, const char *path)
{
    return tg_conf_set_chars(ctx, cmd, node, base, path, isgraph, "must not "
                             "contain spaces or control characters, got \"%s\"");
}

/* Any non-null string, stored as is; the meaning is checked elsewhere. */
tg_rc
tg_conf_set_string(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                   void *base, const char *path)
{
    char **field = (char **)((char *)base + cmd->offset);
    const char *s = tg_conf_string(ctx, node, path);

    if (s == NULL) {
        return TG_ERR;
    }
    free(*field);
    *field = tg_xstrdup(s);
    return TG_OK;
}

/* Every secret written in the file: a Redis password (it goes into AUTH
 * as one argument), an alert channel's key, or its URL (cmd->arg "url":
 * http:// or https://).  Printable, no spaces, cmd->min..max long, and
 * never echoed in an error.  The *_file forms are read in phase 3. */
tg_rc
tg_conf_set_secret(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                   void *base, const char *path)
{
    char **field = (char **)((char *)base + cmd->offset);
    const char *s = tg_conf_string(ctx, node, path);

    if (s == NULL) {
        return TG_ERR;
    }
    if (tg_conf_check_len(ctx, cmd, node, path, strlen(s)) != TG_OK
        || tg_conf_check_secret(ctx, node->start_mark, path, s, cmd->arg != NULL)
           != TG_OK) {
        return TG_ERR;
    }
    tg_conf_free_secret(*field);
    *field = tg_xstrdup(s);
    return TG_OK;
}

/* An http(s) URL (is_url) or a key, kept as written.  The value is a
 * secret: messages never show it. */
tg_rc
tg_conf_check_secret(tg_conf_ctx *ctx, yaml_mark_t mark, const char *path,
                     const char *s, int is_url)
{
    size_t i;

    for (i = 0; s[i] != '\0'; i++) {
        if (!isgraph((unsigned char)s[i])) {
            return tg_conf_error(ctx, mark, path, "must not contain spaces or "
                                 "control characters (value not shown: a secret)");
        }
    }
    if (i == 0) {
        return tg_conf_error(ctx, mark, path, "is empty");
    }
    if (is_url && strncmp(s, "https://", 8) != 0 && strncmp(s, "http://", 7) != 0) {
        return tg_conf_error(ctx, mark, path, "must be an http:// or https:// "
                             "URL (value not shown: a secret)");
    }
    return TG_OK;
}

void
tg_conf_free_secret(char *s)
{
    if (s != NULL) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

/* A path: a route's prefix (then see conf_limits.c set_route_prefix) or the
 * health check's target. */
tg_rc
tg_conf_set_route_path(tg_conf_ctx *ctx, const tg_conf_cmd *cmd,
                       yaml_node_t *node, void *base, const char *path)
{
    char **field = (char **)((char *)base + cmd->offset);
    const char *s = tg_conf_string(ctx, node, path);
    size_t i, len;

    if (s == NULL) {
        return TG_ERR;
    }
    len = strlen(s);
    if (s[0] != '/') {
        return tg_conf_error(ctx, node->start_mark, path, "must start with "
                             "'/', got \"%s\"", s);
    }
    if ((int64_t)len > cmd->max) {
        return tg_conf_error(ctx, node->start_mark, path, "length %zu is out of "
                             "range (%lld..%lld characters)", len,
                             (long long)cmd->min, (long long)cmd->max);
    }
    for (i = 0; i < len; i++) {
        if (!isgraph((unsigned char)s[i])) {
            return tg_conf_error(ctx, node->start_mark, path, "must not contain "
                                 "spaces, control or non-ASCII characters, "
                                 "got \"%s\"", s);
        }
    }
    free(*field);
    *field = tg_xstrdup(s);
    return TG_OK;
}

/* A plain number in (lo, hi]; want says which, in the error. */
static tg_rc
set_real(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node, void *base,
         const char *path, double lo, double hi, const char *want)
{
    const char *s;
    char *end;
    double v;

    if (node->type != YAML_SCALAR_NODE || tg_yaml_is_null(node) ||
        node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) {
        return tg_conf_type_error(ctx, node, path, want);
    }
    s = (const char *)node->data.scalar.value;
    errno = 0;
    v = strtod(s, &end);
    if (end == s || *end != '\0' || errno != 0 || !(v > lo && v <= hi)) {
        return tg_conf_error(ctx, node->start_mark, path, "expected %s, got \"%s\"",
                             want, s);
    }
    memcpy((char *)base + cmd->offset, &v, sizeof(v));
    return TG_OK;
}

/* A share in (0, 1], e.g. 0.05. */
tg_rc
tg_conf_set_ratio(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                  void *base, const char *path)
{
    return set_real(ctx, cmd, node, base, path, 0.0, 1.0,
                    "a number in (0, 1], e.g. 0.05");
}

/* A number in (min, max], e.g. 10 or 2.5 (a factor above min). */
tg_rc
tg_conf_set_factor(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                   void *base, const char *path)
{
    char want[80];

    snprintf(want, sizeof(want), "a number above %lld and at most %lld",
             (long long)cmd->min, (long long)cmd->max);
    return set_real(ctx, cmd, node, base, path, (double)cmd->min, (double)cmd->max,
                    want);
}

/* ---- sections ---------------------------------------------------------- */

/* A sub-section: its keys, walked through the table at cmd->arg. */
tg_rc
tg_conf_set_section(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                    void *base, const char *path)
{
    return tg_conf_walk(ctx, node, cmd->arg, base, path, path);
}

/* A section whose presence turns something on (global_limit, statsd,
 * health_check, anomaly, adaptive, throttle): its keys, then the int
 * flag at cmd->offset. */
tg_rc
tg_conf_set_present(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                    void *base, const char *path)
{
    if (tg_conf_walk(ctx, node, cmd->arg, base, path, path) != TG_OK) {
        return TG_ERR;
    }
    *(int *)(void *)((char *)base + cmd->offset) = 1;
    return TG_OK;
}
