/*
 * yaml.c - strict YAML loading and "FILE:LINE:COL: ..." messages, shared by
 * conf.c and keys.c so that both files are read, and refused, alike.
 */
#include "tollgate/yaml.h"

#include <unistd.h>

#include <sys/stat.h>

#include <stdlib.h>

#include <fcntl.h>

#include <errno.h>

#include <stdio.h>
#include <string.h>

/* Nesting of mappings and sequences: the files need a handful; libyaml's
 * scanner is quadratic in the depth, so deep input is refused early. */
#define TG_YAML_MAX_DEPTH 64

/* Where a message goes, and what it reads. */
typedef struct tg_yaml_src {
    const char *name;            /* file name used in messages */
    const char *text;            /* the whole input, for reader-error offsets */
    size_t      len;
    char       *err;
    size_t      errlen;
} tg_yaml_src;

/* ---- static prototypes ------------------------------------------------- */

static tg_rc scan_events(const tg_yaml_src *src, const char *what);
static tg_rc syntax_error(const tg_yaml_src *src, yaml_parser_t *parser);
static yaml_mark_t offset_mark(const tg_yaml_src *src, size_t offset);

/* ---- public functions -------------------------------------------------- */

tg_rc
tg_yaml_load(yaml_document_t *doc, const char *name, const char *text,
             size_t len, const char *what, char *err, size_t errlen)
{
    tg_yaml_src src = { name, text, len, err, errlen };
    yaml_parser_t parser;

    if (scan_events(&src, what) != TG_OK) {
        return TG_ERR;
    }

    yaml_parser_initialize(&parser);
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    if (!yaml_parser_load(&parser, doc)) {
        syntax_error(&src, &parser);
        yaml_parser_delete(&parser);
        return TG_ERR;
    }
    yaml_parser_delete(&parser);
    return TG_OK;
}

tg_rc
tg_yaml_error(char *err, size_t errlen, const char *name, yaml_mark_t mark,
              const char *path, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    tg_yaml_verror(err, errlen, name, mark, path, fmt, ap);
    va_end(ap);
    return TG_ERR;
}

tg_rc
tg_yaml_verror(char *err, size_t errlen, const char *name, yaml_mark_t mark,
               const char *path, const char *fmt, va_list ap)
{
    int n;

    if (errlen == 0) {
        return TG_ERR;
    }
    n = snprintf(err, errlen, "%s:%zu:%zu: %s%s", name, mark.line + 1,
                 mark.column + 1, path, path[0] ? ": " : "");
    if (n < 0 || (size_t)n >= errlen) {
        return TG_ERR;
    }
    vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    /* keys (in path) and values from the file are echoed: a control byte
     * (a line break, a terminal escape) is shown as '?', never logged */
    for (; *err != '\0'; err++) {
        if ((unsigned char)*err < 0x20 || *err == 0x7f) {
            *err = '?';
        }
    }
    return TG_ERR;
}

/* ---- static helpers ---------------------------------------------------- */

/*
 * The event scan: syntax errors, anchors, aliases and extra documents at
 * their exact marks.  Anchors are refused, not only aliases, so that a file
 * means the same thing read by a person top to bottom.
 */
static tg_rc
scan_events(const tg_yaml_src *src, const char *what)
{
    yaml_parser_t parser;
    yaml_event_t ev;
    yaml_char_t *anchor;
    int ndocs = 0, done = 0, depth = 0;

    yaml_parser_initialize(&parser);
    yaml_parser_set_input_string(&parser, (const unsigned char *)src->text,
                                 src->len);
    while (!done) {
        if (!yaml_parser_parse(&parser, &ev)) {
            syntax_error(src, &parser);
            yaml_parser_delete(&parser);
            return TG_ERR;
        }
        anchor = NULL;
        switch (ev.type) {
        case YAML_DOCUMENT_START_EVENT:
            if (++ndocs > 1) {
                tg_yaml_error(src->err, src->errlen, src->name, ev.start_mark,
                              "", "only one YAML document is allowed in a %s",
                              what);
                goto fail;
            }
            break;
        case YAML_ALIAS_EVENT:
            tg_yaml_error(src->err, src->errlen, src->name, ev.start_mark, "",
                          "YAML aliases (*%s) are not supported: write the "
                          "value out", (const char *)ev.data.alias.anchor);
            goto fail;
        case YAML_SCALAR_EVENT:
            anchor = ev.data.scalar.anchor;
            break;
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT:
            anchor = ev.type == YAML_SEQUENCE_START_EVENT
                     ? ev.data.sequence_start.anchor : ev.data.mapping_start.anchor;
            if (++depth > TG_YAML_MAX_DEPTH) {
                tg_yaml_error(src->err, src->errlen, src->name, ev.start_mark, "",
                              "YAML nested deeper than %d levels is not supported",
                              TG_YAML_MAX_DEPTH);
                goto fail;
            }
            break;
        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
            depth--;
            break;
        case YAML_STREAM_END_EVENT:
            done = 1;
            break;
        default:
            break;
        }
        if (anchor != NULL) {
            tg_yaml_error(src->err, src->errlen, src->name, ev.start_mark, "",
                          "YAML anchors (&%s) are not supported: write the "
                          "value out", (const char *)anchor);
            goto fail;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&parser);
    return TG_OK;

fail:
    yaml_event_delete(&ev);
    yaml_parser_delete(&parser);
    return TG_ERR;
}

static tg_rc
syntax_error(const tg_yaml_src *src, yaml_parser_t *parser)
{
    const char *problem = parser->problem ? parser->problem : "unknown error";

    if (parser->error == YAML_READER_ERROR) {
        return tg_yaml_error(src->err, src->errlen, src->name,
                             offset_mark(src, parser->problem_offset),
                             "", "YAML syntax error: %s", problem);
    }
    if (parser->context != NULL) {
        return tg_yaml_error(src->err, src->errlen, src->name,
                             parser->problem_mark, "", "YAML syntax error: "
                             "%s %s (at %zu:%zu)", problem, parser->context,
                             parser->context_mark.line + 1,
                             parser->context_mark.column + 1);
    }
    return tg_yaml_error(src->err, src->errlen, src->name, parser->problem_mark,
                         "", "YAML syntax error: %s", problem);
}

/* Line and column of a byte offset, for reader errors that carry no mark. */
static yaml_mark_t
offset_mark(const tg_yaml_src *src, size_t offset)
{
    yaml_mark_t m;
    size_t i;

    memset(&m, 0, sizeof(m));
    for (i = 0; i < offset && i < src->len; i++) {
        if (src->text[i] == '\n') {
            m.line++;
            m.column = 0;
        } else {
            m.column++;
        }
    }
    m.index = offset;
    return m;
}

char *
tg_yaml_read_file(const char *path, size_t max, size_t *lenp, char *err, size_t errlen)
{
    tg_buf text = TG_BUF_INIT;
    ssize_t n;
    struct stat st;
    int fd;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) < 0) {
        snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s: cannot open: not a regular file", path);
        goto fail;
    }
    if ((uint64_t)st.st_size > max) {
        snprintf(err, errlen, "%s: cannot open: file larger than %zu bytes", path, max);
        goto fail;
    }
    tg_buf_reserve(&text, (size_t)st.st_size);
    for (;;) {
        if (text.len + 1 >= text.cap) {
            tg_buf_reserve(&text, text.cap - text.len);     /* doubles */
        }
        n = read(fd, text.p + text.len, text.cap - text.len - 1);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            snprintf(err, errlen, "%s: cannot read: %s", path, strerror(errno));
            goto fail;
        }
        if (n == 0) {
            break;
        }
        text.len += (size_t)n;
        if (text.len > max) {   /* it grew since fstat; max bytes are fine */
            snprintf(err, errlen, "%s: cannot open: file larger than %zu bytes", path, max);
            goto fail;
        }
    }
    text.p[text.len] = '\0';
    close(fd);
    *lenp = text.len;
    return text.p;

fail:
    tg_buf_free(&text);
    close(fd);
    return NULL;
}

yaml_node_t *
tg_yaml_pair_dup(yaml_document_t *doc, const yaml_node_t *map,
                 const yaml_node_pair_t *pair)
{
    const yaml_node_t *key = yaml_document_get_node(doc, pair->key);
    const char *name = (const char *)key->data.scalar.value;
    const yaml_node_pair_t *prev;
    yaml_node_t *pkey;

    for (prev = map->data.mapping.pairs.start; prev < pair; prev++) {
        pkey = yaml_document_get_node(doc, prev->key);
        if (pkey->type == YAML_SCALAR_NODE &&
            strcmp((const char *)pkey->data.scalar.value, name) == 0) {
            return pkey;
        }
    }
    return NULL;
}

const char *
tg_yaml_kind(const yaml_node_t *node)
{
    switch (node->type) {
    case YAML_SCALAR_NODE:   return "a scalar";
    case YAML_SEQUENCE_NODE: return "a sequence";
    case YAML_MAPPING_NODE:  return "a mapping";
    default:                 return "";
    }
}

int
tg_yaml_is_null(const yaml_node_t *node)
{
    const char *s;

    if (node->type != YAML_SCALAR_NODE ||
        node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) {
        return 0;
    }
    s = (const char *)node->data.scalar.value;
    return s[0] == '\0' || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 ||
           strcmp(s, "Null") == 0 || strcmp(s, "NULL") == 0;
}
