/*
 * conf_int.h - what the config's files share (private: not installed,
 * included only by src/conf*.c).
 *
 * conf.c builds a snapshot in four phases; conf_walk.c walks the YAML
 * tree through the directive tables; each section's table, its own
 * setters and its phase-3 rules are in the section's file (the list is at
 * the top of conf.c).  A directive is { name, setter, offset }: the
 * walker finds the key's directive and its setter stores the value at
 * base + offset.
 */
#ifndef TOLLGATE_CONF_INT_H
#define TOLLGATE_CONF_INT_H

#include "tollgate/conf.h"

#include <stddef.h>
#include <stdint.h>
#include <yaml.h>

#include "tollgate/yaml.h"

#define TG_CONF_MAX_FILE   (16u * 1024 * 1024)  /* a config is never this big */
#define TG_CONF_PATHLEN    256                  /* key path in messages */
#define TG_CONF_NOFIELD    ((size_t)-1)         /* directive with no scalar field */
#define TG_CONF_REQUIRED   0x1u
#define TG_CONF_PORT0      0x2u                 /* address may use port 0 */
#define TG_CONF_MAX_CMDS   32                   /* directives per table */
#define TG_CONF_METHOD_MAX 16
#define TG_CONF_ROUTE_PATH 256
#define TG_CONF_MAX_REDIS_ADDRS 16             /* = TG_REDIS_MAX_ADDRS */

/* A directive's field: its offset and size in the table's base struct. */
#define TG_FIELD(type, member) \
    offsetof(type, member), sizeof(((type *)0)->member)
#define TG_NOFIELD TG_CONF_NOFIELD, 0

#define TG_MS_MAX  3600000        /* one hour: the ceiling of every timeout */
#define TG_2P31    2147483648LL
#define TG_2P62    4611686018427387904LL

/* One remembered position: where a field's value was written, so that
 * phases 3 and 4 can point at it. */
typedef struct tg_conf_mark {
    const void  *field;          /* address of the field inside the snapshot */
    yaml_mark_t  mark;           /* start of its value node */
    char        *path;           /* key path, e.g. "listen[1].address" */
} tg_conf_mark;

/* The state of one load, from the text to the snapshot (conf.c build). */
typedef struct tg_conf_ctx {
    const char      *name;       /* file name used in messages */
    const char      *text;       /* the whole input, for reader-error offsets */
    size_t           len;
    yaml_document_t  doc;
    int              have_doc;
    tg_conf         *conf;       /* snapshot being built (owned until returned) */
    char            *err;
    size_t           errlen;
    tg_conf_mark    *marks;
    size_t           nmarks;
    size_t           capmarks;
} tg_conf_ctx;

struct tg_conf_cmd;

/* A setter stores value node `node` into `base` as described by `cmd`;
 * `path` is the key path of the value, for messages. */
typedef tg_rc (*tg_conf_set_pt)(tg_conf_ctx *ctx, const struct tg_conf_cmd *cmd,
                                yaml_node_t *node, void *base, const char *path);

typedef struct tg_conf_cmd {
    const char      *name;
    tg_conf_set_pt   set;
    size_t           offset;     /* field offset in base, or TG_CONF_NOFIELD */
    size_t           size;       /* field size, for integer stores */
    int64_t          min;
    int64_t          max;
    unsigned         flags;      /* TG_CONF_REQUIRED, TG_CONF_PORT0 */
    const void      *arg;        /* enum table or sub-table */
} tg_conf_cmd;

typedef struct tg_conf_enum {
    const char *name;
    int         value;
} tg_conf_enum;

/* Every setter has the tg_conf_set_pt signature; a file's own setters
 * are declared "static TG_CONF_SETTER(name);". */
#define TG_CONF_SETTER(name) \
    tg_rc name(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node, \
               void *base, const char *path)

/* ---- conf.c ------------------------------------------------------------ */

/* The defaults of one routes: item (conf_limits.c set_routes sets them
 * before its keys are walked). */
void tg_conf_route_defaults(tg_route_conf *route);

/* ---- conf_walk.c: the walker, marks and messages ------------------------ */

/* Walk mapping `map` through `cmds`, storing into `base`; `path` is the
 * mapping's key path ("" at top level), `section` its name for messages. */
tg_rc tg_conf_walk(tg_conf_ctx *ctx, yaml_node_t *map, const tg_conf_cmd *cmds,
                   void *base, const char *path, const char *section);
/* "parent.key" (or "key" at top level) into out[TG_CONF_PATHLEN]. */
void tg_conf_child(char *out, const char *parent, const char *key);
/* Remember where field's value was written (the walker does it for every
 * directive with a field; list setters for their items). */
void tg_conf_remember(tg_conf_ctx *ctx, const void *field, yaml_mark_t mark,
                      const char *path);
/* Where field's value was written, or NULL if it has its default. */
const tg_conf_mark *tg_conf_find_mark(const tg_conf_ctx *ctx, const void *field);
/* Format "FILE:LINE:COL: path: message" into ctx->err.  Always TG_ERR. */
tg_rc tg_conf_error(tg_conf_ctx *ctx, yaml_mark_t mark, const char *path,
                    const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* "expected <expected>, got <what node is>".  Always TG_ERR. */
tg_rc tg_conf_type_error(tg_conf_ctx *ctx, yaml_node_t *node, const char *path,
                         const char *expected);

/* ---- conf_walk.c: value helpers ----------------------------------------- */

/* A non-null scalar as text, or NULL after an error. */
const char *tg_conf_string(tg_conf_ctx *ctx, yaml_node_t *node, const char *path);
/* Store v into an integer field of size 1, 2, 4 or 8. */
void tg_conf_store(void *field, size_t size, uint64_t v);
/* An integer in cmd->min..max (suffix: k/m/g allowed) into the field. */
tg_rc tg_conf_int(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                  void *base, const char *path, int suffix);
/* The length of a string value against cmd->min..max. */
tg_rc tg_conf_check_len(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                        const char *path, size_t len);
/* A string of cmd->min..max bytes that ok() each accepts, into the field;
 * bad: the message for another byte, a format with one %s (the value). */
tg_rc tg_conf_set_chars(tg_conf_ctx *ctx, const tg_conf_cmd *cmd, yaml_node_t *node,
                        void *base, const char *path, int (*ok)(int c),
                        const char *bad);
/* A secret's text (an http(s) URL when is_url); never echoed. */
tg_rc tg_conf_check_secret(tg_conf_ctx *ctx, yaml_mark_t mark, const char *path,
                           const char *s, int is_url);
/* Wipe and free a secret (NULL is fine). */
void tg_conf_free_secret(char *s);

/* ---- conf_walk.c: the generic setters ----------------------------------- */

TG_CONF_SETTER(tg_conf_set_uint);
TG_CONF_SETTER(tg_conf_set_size);
TG_CONF_SETTER(tg_conf_set_bool);
TG_CONF_SETTER(tg_conf_set_enum);
TG_CONF_SETTER(tg_conf_set_path);
TG_CONF_SETTER(tg_conf_set_addr);
TG_CONF_SETTER(tg_conf_set_prefix);
TG_CONF_SETTER(tg_conf_set_string);
TG_CONF_SETTER(tg_conf_set_secret);
TG_CONF_SETTER(tg_conf_set_route_path);
TG_CONF_SETTER(tg_conf_set_ratio);
TG_CONF_SETTER(tg_conf_set_factor);
TG_CONF_SETTER(tg_conf_set_section);
TG_CONF_SETTER(tg_conf_set_present);

/* ---- the sections: their tables, top-level setters and phase-3 rules ---- */

/* conf_http.c: listen, admin, http, metrics, access_log */
extern const tg_conf_cmd tg_conf_admin_cmds[];
extern const tg_conf_cmd tg_conf_http_cmds[];
extern const tg_conf_cmd tg_conf_metrics_cmds[];
extern const tg_conf_cmd tg_conf_access_log_cmds[];
TG_CONF_SETTER(tg_conf_set_listen);
tg_rc tg_conf_validate_http(tg_conf_ctx *ctx);

/* conf_upstream.c: upstream */
extern const tg_conf_cmd tg_conf_upstream_cmds[];
tg_rc tg_conf_validate_upstream(tg_conf_ctx *ctx);

/* conf_limits.c: auth, rate_limits, routes, global_limit */
extern const tg_conf_cmd tg_conf_auth_cmds[];
extern const tg_conf_cmd tg_conf_tier_cmds[];
extern const tg_conf_cmd tg_conf_route_cmds[];
extern const tg_conf_cmd tg_conf_global_cmds[];
TG_CONF_SETTER(tg_conf_set_tiers);
TG_CONF_SETTER(tg_conf_set_routes);
tg_rc tg_conf_validate_limits(tg_conf_ctx *ctx);

/* conf_redis.c: store, redis */
extern const tg_conf_enum tg_conf_store_enum[];
extern const tg_conf_cmd tg_conf_redis_cmds[];
tg_rc tg_conf_validate_redis(tg_conf_ctx *ctx);
tg_rc tg_conf_validate_redis_auth(tg_conf_ctx *ctx);

/* conf_alerts.c: alerts, anomaly */
extern const tg_conf_cmd tg_conf_alerts_cmds[];
extern const tg_conf_cmd tg_conf_anomaly_cmds[];
TG_CONF_SETTER(tg_conf_set_alerts);
tg_rc tg_conf_validate_alerts(tg_conf_ctx *ctx);

/* conf_adaptive.c: adaptive */
extern const tg_conf_cmd tg_conf_adaptive_cmds[];
tg_rc tg_conf_validate_adaptive(tg_conf_ctx *ctx);

#endif
