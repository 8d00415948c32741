/*
 * yaml.h - the strict YAML front end shared by the config and keys parsers.
 *
 * tg_yaml_load reads a text in two passes over libyaml.  The first scans the
 * event stream and rejects what tollgate does not support (anchors, aliases,
 * a second document) at its exact mark: the loaded tree has forgotten
 * aliases (it shares the anchored node), so only the events can point at
 * them.  The second loads the node tree.  Every message has the form
 * "NAME:LINE:COL: path: what is wrong" (1-based line and column).
 */
#ifndef TOLLGATE_YAML_H
#define TOLLGATE_YAML_H

#include <stdarg.h>
#include <stddef.h>
#include <yaml.h>

#include "tollgate/common.h"

/*
 * Read the regular file at path, at most max bytes, to EOF (not trusting
 * st_size: an editor or a reload may race us).  Returns a NUL-terminated
 * copy the caller frees and its length in *len, or NULL with err filled
 * ("PATH: cannot open: why", "... file larger than MAX bytes",
 * "PATH: cannot read: why").
 */
char *tg_yaml_read_file(const char *path, size_t max, size_t *len, char *err,
                        size_t errlen);

/*
 * Load text (len bytes, need not be NUL-terminated) into doc.  `name` is the
 * file name used in messages; `what` names the kind of file in "only one
 * YAML document is allowed in a WHAT" (e.g. "config file").  Returns TG_OK
 * with doc loaded (the caller frees it with yaml_document_delete; its root
 * is NULL for an empty text), or TG_ERR with err filled and nothing to free.
 */
tg_rc tg_yaml_load(yaml_document_t *doc, const char *name, const char *text,
                   size_t len, const char *what, char *err, size_t errlen);

/*
 * The mapping walk shared by the config (conf.c's table walker and its
 * rate_limits names) and the keys file (keys.c's general path): a key
 * must be a scalar, and must not repeat an earlier key of its mapping.
 * tg_yaml_pair_dup returns that earlier key's node (pair's key must be a
 * scalar), or NULL.  The caller words the message: the config quotes the
 * key, the keys file does not quote a long one (a misplaced secret).
 */
yaml_node_t *tg_yaml_pair_dup(yaml_document_t *doc, const yaml_node_t *map,
                              const yaml_node_pair_t *pair);

/* A node's kind as messages name it: "a scalar", "a sequence", "a mapping". */
const char *tg_yaml_kind(const yaml_node_t *node);

/* 1 if node is a YAML null: a plain scalar "", "~", "null", "Null", "NULL". */
int tg_yaml_is_null(const yaml_node_t *node);

/*
 * Format "NAME:LINE:COL: path: message" into err (errlen bytes; nothing is
 * written when errlen is 0).  An empty path writes "NAME:LINE:COL: message".
 * Always returns TG_ERR.
 */
tg_rc tg_yaml_error(char *err, size_t errlen, const char *name,
                    yaml_mark_t mark, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
tg_rc tg_yaml_verror(char *err, size_t errlen, const char *name,
                     yaml_mark_t mark, const char *path, const char *fmt,
                     va_list ap)
    __attribute__((format(printf, 6, 0)));

#endif /* TOLLGATE_YAML_H */
