/*
 * test_yaml.c - unit tests of src/yaml.c, the strict YAML front end of the
 * config and keys files: scalars and nesting loaded, anchors, aliases and
 * a second document refused at their mark, syntax and encoding errors
 * with "NAME:LINE:COL", nulls, message formatting, and file reading
 * (missing, not regular, too large, deep or huge input) refused cleanly.
 */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tollgate/yaml.h"

static char err[512];
static yaml_document_t doc;

static tg_rc
load(const char *text)
{
    err[0] = '\0';
    return tg_yaml_load(&doc, "t.yaml", text, strlen(text), "config file", err, sizeof(err));
}

/* text must be refused with a message that starts with want. */
static void
refused(const char *text, const char *want)
{
    cr_assert_eq(load(text), TG_ERR, "accepted: %s", text);
    cr_assert(strncmp(err, want, strlen(want)) == 0, "message \"%s\", want \"%s...\"",
              err, want);
}

/* The value of key in a mapping node, or NULL. */
static yaml_node_t *
map_get(yaml_node_t *map, const char *key)
{
    cr_assert_eq(map->type, YAML_MAPPING_NODE);
    for (yaml_node_pair_t *p = map->data.mapping.pairs.start;
         p < map->data.mapping.pairs.top; p++) {
        yaml_node_t *k = yaml_document_get_node(&doc, p->key);
        if (k->type == YAML_SCALAR_NODE && strcmp((char *)k->data.scalar.value, key) == 0) {
            return yaml_document_get_node(&doc, p->value);
        }
    }
    return NULL;
}

static const char *
scalar(yaml_node_t *n)
{
    cr_assert_not_null(n);
    cr_assert_eq(n->type, YAML_SCALAR_NODE);
    return (const char *)n->data.scalar.value;
}

static yaml_node_t *
seq_at(yaml_node_t *seq, size_t i)
{
    cr_assert_eq(seq->type, YAML_SEQUENCE_NODE);
    cr_assert_lt(i, (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start));
    return yaml_document_get_node(&doc, seq->data.sequence.items.start[i]);
}

/* ------------------------------------------------------------------ */
/* loading                                                             */

Test(yaml, scalars_and_nesting)
{
    yaml_node_t *root, *up, *servers;

    cr_assert_eq(load("listen: \"0.0.0.0:8080\"\n"
                      "workers: 4\n"
                      "name: 'single'\n"
                      "note: |\n  two\n  lines\n"
                      "upstream:\n"
                      "  servers:\n"
                      "    - 127.0.0.1:8000\n"
                      "    - { host: b, port: 9 }\n"
                      "  flow: [a, b, c]\n"), TG_OK, "%s", err);
    root = yaml_document_get_root_node(&doc);
    cr_assert_not_null(root);
    cr_expect_str_eq(scalar(map_get(root, "listen")), "0.0.0.0:8080");
    cr_expect_str_eq(scalar(map_get(root, "workers")), "4");
    cr_expect_str_eq(scalar(map_get(root, "name")), "single");
    cr_expect_str_eq(scalar(map_get(root, "note")), "two\nlines\n");
    up = map_get(root, "upstream");
    cr_assert_not_null(up);
    servers = map_get(up, "servers");
    cr_assert_not_null(servers);
    cr_expect_str_eq(scalar(seq_at(servers, 0)), "127.0.0.1:8000");
    cr_expect_str_eq(scalar(map_get(seq_at(servers, 1), "host")), "b");
    cr_expect_str_eq(scalar(map_get(seq_at(servers, 1), "port")), "9");
    cr_expect_str_eq(scalar(seq_at(map_get(up, "flow"), 2)), "c");
    /* marks are 0-based in libyaml: the list under "servers:" starts on
     * the 9th line, 5th column */
    cr_expect_eq(servers->start_mark.line, 8u);
    cr_expect_eq(servers->start_mark.column, 4u);
    yaml_document_delete(&doc);
}

Test(yaml, empty_text_has_no_root)
{
    cr_assert_eq(load(""), TG_OK, "%s", err);
    cr_expect_null(yaml_document_get_root_node(&doc));
    yaml_document_delete(&doc);
    cr_assert_eq(load("# only a comment\n\n"), TG_OK, "%s", err);
    cr_expect_null(yaml_document_get_root_node(&doc));
    yaml_document_delete(&doc);
}

Test(yaml, one_explicit_document_is_fine)
{
    cr_assert_eq(load("%YAML 1.1\n---\na: 1\n...\n"), TG_OK, "%s", err);
    cr_expect_str_eq(scalar(map_get(yaml_document_get_root_node(&doc), "a")), "1");
    yaml_document_delete(&doc);
}

/* text need not be NUL-terminated: len bounds it. */
Test(yaml, length_bounds_the_text)
{
    const char text[] = "a: 1\nb: [";       /* the tail would be an error */

    cr_assert_eq(tg_yaml_load(&doc, "t.yaml", text, 5, "config file", err, sizeof(err)),
                 TG_OK, "%s", err);
    cr_expect_str_eq(scalar(map_get(yaml_document_get_root_node(&doc), "a")), "1");
    cr_expect_null(map_get(yaml_document_get_root_node(&doc), "b"));
    yaml_document_delete(&doc);
}

/* ------------------------------------------------------------------ */
/* refused, at their mark                                              */

Test(yaml, anchors_and_aliases_refused)
{
    refused("a: 1\nb: &x 2\n",
            "t.yaml:2:4: YAML anchors (&x) are not supported: write the value out");
    refused("a: &m { b: 1 }\n", "t.yaml:1:4: YAML anchors (&m) are not supported");
    refused("- &s [1]\n", "t.yaml:1:3: YAML anchors (&s) are not supported");
    refused("a: 1\nb: *x\n",
            "t.yaml:2:4: YAML aliases (*x) are not supported: write the value out");
}

Test(yaml, second_document_refused)
{
    refused("a: 1\n---\nb: 2\n",
            "t.yaml:2:1: only one YAML document is allowed in a config file");
    cr_assert_eq(tg_yaml_load(&doc, "k.yaml", "a\n---\nb\n", 8, "keys file", err,
                              sizeof(err)), TG_ERR);
    cr_expect_str_eq(err, "k.yaml:2:1: only one YAML document is allowed in a keys file");
}

Test(yaml, syntax_errors_carry_line_and_column)
{
    /* an unclosed flow sequence: found at the next key's line */
    refused("a: 1\nb: [1, 2\nc: 3\n", "t.yaml:3:2: YAML syntax error: ");
    /* a tab where indentation is expected */
    refused("a:\n\tb: 1\n", "t.yaml:2:1: YAML syntax error: ");
    /* a mapping value where none can be */
    refused("a: b: c\n", "t.yaml:1:5: YAML syntax error: mapping values are not allowed");
    cr_expect(strstr(err, "(at ") == NULL || strstr(err, "(at 1:") != NULL, "%s", err);
}

/* Reader errors carry an offset only: the line and column are counted. */
Test(yaml, bad_encoding_has_its_line)
{
    refused("a: 1\nb: 2\nc: \xff\n", "t.yaml:3:4: YAML syntax error: invalid leading UTF-8 octet");
    refused("a: \"x\x01\"\n", "t.yaml:1:6: YAML syntax error: control characters are not allowed");
}

/* text nested depth levels deep in flow sequences: "a: [[...[]...]]\n". */
static char *
nested(size_t depth, size_t *len)
{
    char *text = malloc(2 * depth + 8);
    size_t n = 0;

    cr_assert_not_null(text);
    memcpy(text, "a: ", 3);
    n = 3;
    memset(text + n, '[', depth);
    n += depth;
    memset(text + n, ']', depth);
    n += depth;
    text[n++] = '\n';
    text[n] = '\0';
    *len = n;
    return text;
}

/* 64 levels load (the files need a handful); deeper is refused at the
 * level that is one too many. */
Test(yaml, nesting_limit)
{
    size_t len;
    char *text = nested(63, &len);          /* + the top mapping: 64 */

    cr_assert_eq(tg_yaml_load(&doc, "t.yaml", text, len, "config file", err, sizeof(err)),
                 TG_OK, "%s", err);
    yaml_document_delete(&doc);
    free(text);
    text = nested(64, &len);
    cr_assert_eq(tg_yaml_load(&doc, "t.yaml", text, len, "config file", err, sizeof(err)),
                 TG_ERR);
    cr_expect_str_eq(err, "t.yaml:1:67: YAML nested deeper than 64 levels is not supported");
    free(text);
    /* block style counts the same */
    cr_assert_eq(load("a:\n  b:\n    - c: [1, {d: 2}]\n"), TG_OK, "%s", err);
    yaml_document_delete(&doc);
}

/* Deep input is refused at once: libyaml's scanner checks every open
 * level at each token (quadratic in the depth: 100,000 levels took
 * minutes to load before the limit). */
Test(yaml, deep_nesting_refused_quickly, .timeout = 30)
{
    size_t len;
    char *text = nested(1000000, &len);
    uint64_t t0 = tg_now_ms();

    cr_assert_eq(tg_yaml_load(&doc, "t.yaml", text, len, "config file", err, sizeof(err)),
                 TG_ERR);
    cr_log_info("1,000,000 levels refused in %llu ms", (unsigned long long)(tg_now_ms() - t0));
    cr_expect(strstr(err, "YAML nested deeper than 64 levels") != NULL, "%s", err);
    /* unbalanced and shallow: a syntax error with its line */
    free(text);
    text = nested(10, &len);
    text[len - 2] = '\n';
    cr_assert_eq(tg_yaml_load(&doc, "t.yaml", text, len - 1, "config file", err, sizeof(err)),
                 TG_ERR);
    cr_expect(strncmp(err, "t.yaml:", 7) == 0, "%s", err);
    free(text);
}

/* Many nodes: loaded (no quadratic walk); 200000 items. */
Test(yaml, large_sequence_loads)
{
    size_t items = 200000, n = 0;
    char *text = malloc(items * 8 + 16);
    yaml_node_t *root;

    cr_assert_not_null(text);
    for (size_t i = 0; i < items; i++) {
        n += (size_t)sprintf(text + n, "- %zu\n", i % 1000);
    }
    cr_assert_eq(tg_yaml_load(&doc, "t.yaml", text, n, "config file", err, sizeof(err)),
                 TG_OK, "%s", err);
    root = yaml_document_get_root_node(&doc);
    cr_expect_eq((size_t)(root->data.sequence.items.top - root->data.sequence.items.start),
                 items);
    cr_expect_str_eq(scalar(seq_at(root, items - 1)), "999");
    yaml_document_delete(&doc);
    free(text);
}

/* ------------------------------------------------------------------ */
/* nulls and messages                                                  */

Test(yaml, nulls)
{
    static const char *const nulls[] = { "", "~", "null", "Null", "NULL" };
    static const char *const not_null[] = { "nul", "NULl", "nil", "0", "none", "''" };
    yaml_node_t *root;

    cr_assert_eq(load("a:\nb: ~\nc: null\nd: Null\ne: NULL\n"
                      "f: \"null\"\ng: 'null'\nh: []\ni: {}\n"), TG_OK, "%s", err);
    root = yaml_document_get_root_node(&doc);
    for (const char *k = "abcde"; *k; k++) {
        char key[2] = { *k, '\0' };
        cr_expect(tg_yaml_is_null(map_get(root, key)), "%s", key);
    }
    for (const char *k = "fghi"; *k; k++) {
        char key[2] = { *k, '\0' };
        cr_expect(!tg_yaml_is_null(map_get(root, key)), "%s is not null", key);
    }
    yaml_document_delete(&doc);
    for (size_t i = 0; i < sizeof(nulls) / sizeof(nulls[0]); i++) {
        char text[32];
        snprintf(text, sizeof(text), "v: %s\n", nulls[i]);
        cr_assert_eq(load(text), TG_OK);
        cr_expect(tg_yaml_is_null(map_get(yaml_document_get_root_node(&doc), "v")), "%s",
                  nulls[i]);
        yaml_document_delete(&doc);
    }
    for (size_t i = 0; i < sizeof(not_null) / sizeof(not_null[0]); i++) {
        char text[32];
        snprintf(text, sizeof(text), "v: %s\n", not_null[i]);
        cr_assert_eq(load(text), TG_OK);
        cr_expect(!tg_yaml_is_null(map_get(yaml_document_get_root_node(&doc), "v")), "%s",
                  not_null[i]);
        yaml_document_delete(&doc);
    }
}

Test(yaml, error_format)
{
    yaml_mark_t m = { .index = 0, .line = 4, .column = 2 };
    char small[12];

    cr_expect_eq(tg_yaml_error(err, sizeof(err), "f.yaml", m, "upstream.servers[1]",
                               "bad port %d", 70000), TG_ERR);
    cr_expect_str_eq(err, "f.yaml:5:3: upstream.servers[1]: bad port 70000");
    tg_yaml_error(err, sizeof(err), "f.yaml", m, "", "no path");
    cr_expect_str_eq(err, "f.yaml:5:3: no path");
    /* cut, NUL-terminated; nothing written with errlen 0 */
    memset(small, 'z', sizeof(small));
    tg_yaml_error(small, sizeof(small), "f.yaml", m, "p", "long message");
    cr_expect_eq(strlen(small), sizeof(small) - 1);
    cr_expect(strncmp(small, "f.yaml:5:3:", 11) == 0, "%s", small);
    memset(small, 'z', sizeof(small));
    cr_expect_eq(tg_yaml_error(small, 0, "f.yaml", m, "", "x"), TG_ERR);
    cr_expect_eq(small[0], 'z');
    memset(small, 'z', sizeof(small));
    tg_yaml_error(small, 6, "f.yaml", m, "path", "x");
    cr_expect_str_eq(small, "f.yam");
}

/* ------------------------------------------------------------------ */
/* files                                                               */

static char tmp_path[64];

static void
tmp_write(const char *text, size_t len)
{
    int fd;

    snprintf(tmp_path, sizeof(tmp_path), "/tmp/tg-test-yaml-XXXXXX");
    fd = mkstemp(tmp_path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, len), (ssize_t)len);
    close(fd);
}

Test(yaml, read_file)
{
    size_t len = 0;
    char *text;

    tmp_write("a: 1\n", 5);
    text = tg_yaml_read_file(tmp_path, 5, &len, err, sizeof(err));     /* exactly max */
    cr_assert_not_null(text, "%s", err);
    cr_expect_eq(len, 5u);
    cr_expect_str_eq(text, "a: 1\n");
    free(text);
    /* one byte over the limit */
    cr_expect_null(tg_yaml_read_file(tmp_path, 4, &len, err, sizeof(err)));
    cr_expect(strstr(err, ": cannot open: file larger than 4 bytes") != NULL, "%s", err);
    unlink(tmp_path);
    tmp_write("", 0);
    text = tg_yaml_read_file(tmp_path, 100, &len, err, sizeof(err));
    cr_assert_not_null(text, "%s", err);
    cr_expect_eq(len, 0u);
    cr_expect_str_eq(text, "");
    free(text);
    unlink(tmp_path);
}

Test(yaml, read_file_refused)
{
    size_t len = 0;
    char want[128];

    cr_expect_null(tg_yaml_read_file("/nonexistent/tg.yaml", 100, &len, err, sizeof(err)));
    cr_expect_str_eq(err, "/nonexistent/tg.yaml: cannot open: No such file or directory");
    cr_expect_null(tg_yaml_read_file("/tmp", 100, &len, err, sizeof(err)));
    cr_expect_str_eq(err, "/tmp: cannot open: not a regular file");
    /* a device that never ends is not a regular file either */
    cr_expect_null(tg_yaml_read_file("/dev/zero", 100, &len, err, sizeof(err)));
    cr_expect(strstr(err, "not a regular file") != NULL, "%s", err);
    /* a huge file: refused from its size, not read */
    snprintf(tmp_path, sizeof(tmp_path), "/tmp/tg-test-yaml-XXXXXX");
    {
        int fd = mkstemp(tmp_path);
        cr_assert_geq(fd, 0);
        cr_assert_eq(ftruncate(fd, (off_t)1 << 32), 0);     /* 4 GiB, sparse */
        close(fd);
    }
    cr_expect_null(tg_yaml_read_file(tmp_path, 16u << 20, &len, err, sizeof(err)));
    snprintf(want, sizeof(want), "%s: cannot open: file larger than %zu bytes", tmp_path,
             (size_t)16u << 20);
    cr_expect_str_eq(err, want);
    unlink(tmp_path);
}
