/*
 * test_keys.c - the keys file: every error class at its exact
 * FILE:LINE:COL, the shipped conf/keys.yaml and its demo keys, lookup
 * (found, unknown, disabled, 10,000 keys), hex, key generation and the
 * tier check.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tollgate/keys.h"

static char err[512];

#define HA "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define HB "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
#define HA_UPPER "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"

/* A valid entry in block style, indented for a sequence item. */
#define ENTRY(id, tier, hex) \
    "  - id: " id "\n    tier: " tier "\n    sha256: \"" hex "\"\n"

static struct tg_keys *
load(const char *yaml)
{
    err[0] = '\0';
    return tg_keys_load_string("t.yaml", yaml, strlen(yaml), err, sizeof(err));
}

/* Assert that yaml fails with a message starting "t.yaml:<pos>: " and
 * containing sub. */
static void
expect_error(const char *yaml, const char *pos, const char *sub)
{
    char prefix[64];
    struct tg_keys *keys = load(yaml);

    if (keys != NULL) {
        tg_keys_destroy(keys);
    }
    cr_assert_null(keys, "expected failure for:\n%s", yaml);
    snprintf(prefix, sizeof(prefix), "t.yaml:%s: ", pos);
    cr_assert(strncmp(err, prefix, strlen(prefix)) == 0,
              "expected position \"%s\", got: %s", prefix, err);
    cr_assert(strstr(err, sub) != NULL, "expected \"%s\" in: %s", sub, err);
}

static struct tg_keys *
expect_ok(const char *yaml)
{
    struct tg_keys *keys = load(yaml);

    cr_assert_not_null(keys, "unexpected error: %s\nfor:\n%s", err, yaml);
    return keys;
}

static const tg_key *
find_clear(const struct tg_keys *keys, const char *clear)
{
    uint8_t d[32];

    tg_keys_hash(clear, strlen(clear), d);
    return tg_keys_find(keys, d);
}

static const char *
source_root(void)
{
    const char *root = getenv("TG_SOURCE_ROOT");

    return root != NULL && root[0] != '\0' ? root : ".";
}

/* ---- structure ------------------------------------------------------------ */

Test(keys_errors, empty_file)
{
    expect_error("", "1:1", "empty keys file");
    expect_error("# only a comment\n", "1:1", "empty keys file");
}

Test(keys_errors, top_level_not_a_mapping)
{
    expect_error("- a\n", "1:1",
                 "top level: expected a mapping with \"keys\", got a sequence");
    expect_error("keys\n", "1:1", "top level: expected a mapping with \"keys\", "
                 "got a scalar");
}

Test(keys_errors, missing_keys)
{
    expect_error("{}\n", "1:1", "missing required key \"keys\"");
}

Test(keys_errors, unknown_top_level_key)
{
    expect_error("keys: []\nextra: 1\n", "2:1",
                 "extra: unknown key \"extra\"; expected only \"keys\" at top level");
}

Test(keys_errors, duplicate_top_level_key)
{
    expect_error("keys: []\nkeys: []\n", "2:1",
                 "keys: duplicate key \"keys\" (first at 1:1)");
}

Test(keys_errors, keys_not_a_sequence)
{
    expect_error("keys:\n", "1:6", "keys: expected a sequence (\"keys: []\" for "
                 "none), got null");
    expect_error("keys: {}\n", "1:7", "keys: expected a sequence");
    expect_error("keys: abc\n", "1:7", "keys: expected a sequence (\"keys: []\" "
                 "for none), got \"abc\"");
}

Test(keys_errors, entry_not_a_mapping)
{
    expect_error("keys:\n  - abc\n", "2:5", "keys[0]: expected a mapping");
    expect_error("keys:\n" ENTRY("a", "pro", HA) "  - [1, 2]\n", "5:5",
                 "keys[1]: expected a mapping { id: ..., tier: ..., sha256: ... }, "
                 "got a sequence");
}

Test(keys_errors, syntax_error)
{
    expect_error("keys: [\n", "2:1", "YAML syntax error");
    expect_error("keys:\n  - { id: a, tier: b\n", "3:1", "YAML syntax error");
}

Test(keys_errors, anchors_and_aliases)
{
    expect_error("keys: &k []\n", "1:7",
                 "YAML anchors (&k) are not supported: write the value out");
    expect_error("keys:\n  - &e { id: a, tier: b, sha256: " HA " }\n", "2:5",
                 "YAML anchors (&e) are not supported");
    expect_error("keys:\n  - *e\n", "2:5",
                 "YAML aliases (*e) are not supported");
}

Test(keys_errors, several_documents)
{
    expect_error("keys: []\n---\nkeys: []\n", "2:1",
                 "only one YAML document is allowed in a keys file");
}

Test(keys_errors, mapping_key_not_a_scalar)
{
    expect_error("keys:\n  - { [id]: a }\n", "2:7",
                 "keys[0]: keys must be plain names, got a sequence");
}

/* ---- entries -------------------------------------------------------------- */

Test(keys_errors, unknown_key_in_entry)
{
    expect_error("keys:\n" ENTRY("a", "pro", HA) "    color: red\n", "5:5",
                 "keys[0].color: unknown key \"color\"; expected id, tier, "
                 "sha256 or enabled");
}

Test(keys_errors, long_unknown_key_not_quoted)
{
    /* A clear key pasted where a field name goes is not echoed. */
    const char *secret = "tg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    char yaml[256];

    snprintf(yaml, sizeof(yaml), "keys:\n  - %s: pro\n", secret);
    expect_error(yaml, "2:5", "keys[0]: unknown key (46 characters)");
    cr_assert_null(strstr(err, secret), "secret echoed: %s", err);
}

Test(keys_errors, duplicate_key_in_entry)
{
    expect_error("keys:\n  - { id: a, id: b, tier: pro, sha256: " HA " }\n",
                 "2:14", "keys[0].id: duplicate key \"id\" (first at 2:7)");
    expect_error("keys:\n" ENTRY("a", "pro", HA) "    enabled: true\n"
                 "    enabled: false\n", "6:5",
                 "keys[0].enabled: duplicate key \"enabled\" (first at 5:5)");
}

Test(keys_errors, wrong_types)
{
    expect_error("keys:\n  - id: {x: 1}\n", "2:9",
                 "keys[0].id: expected a string, got a mapping");
    expect_error("keys:\n  - id: a\n    tier: ~\n", "3:11",
                 "keys[0].tier: expected a string, got null");
    expect_error("keys:\n  - id: a\n    tier: [pro]\n", "3:11",
                 "keys[0].tier: expected a string, got a sequence");
    expect_error("keys:\n  - { id: a, tier: b, sha256: [] }\n", "2:31",
                 "keys[0].sha256: expected 64 hex digits (a SHA-256), got a sequence");
}

Test(keys_errors, enabled_only_true_or_false)
{
    expect_error("keys:\n" ENTRY("a", "pro", HA) "    enabled: yes\n", "5:14",
                 "keys[0].enabled: expected a bool (true or false), got \"yes\"");
    expect_error("keys:\n" ENTRY("a", "pro", HA) "    enabled: 1\n", "5:14",
                 "keys[0].enabled: expected a bool (true or false), got \"1\"");
    expect_error("keys:\n" ENTRY("a", "pro", HA) "    enabled: \"true\"\n", "5:14",
                 "keys[0].enabled: expected a bool (true or false), got \"true\"");
    expect_error("keys:\n" ENTRY("a", "pro", HA) "    enabled:\n", "5:13",
                 "keys[0].enabled: expected a bool (true or false), got null");
}

Test(keys_errors, missing_fields)
{
    expect_error("keys:\n  - tier: pro\n    sha256: " HA "\n", "2:5",
                 "keys[0]: missing required key \"id\"");
    expect_error("keys:\n  - { id: a, sha256: " HA " }\n", "2:5",
                 "keys[0]: missing required key \"tier\"");
    expect_error("keys:\n" ENTRY("a", "pro", HA) "  - { id: b, tier: pro }\n",
                 "5:5", "keys[1]: missing required key \"sha256\"");
    expect_error("keys:\n  - {}\n", "2:5", "keys[0]: missing required key \"id\"");
}

Test(keys_errors, short_hex)
{
    /* 63 digits, quoted: the mark is the opening quote. */
    expect_error("keys:\n  - id: a\n    tier: pro\n    sha256: \""
                 "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n",
                 "4:13", "keys[0].sha256: expected 64 hex digits (the SHA-256 of "
                 "the key, printf %s KEY | sha256sum), got 63 characters");
    expect_error("keys:\n  - id: a\n    tier: pro\n    sha256: \"\"\n", "4:13",
                 "keys[0].sha256: expected 64 hex digits");
    expect_error("keys:\n  - id: a\n    tier: pro\n    sha256: ~\n", "4:13",
                 "keys[0].sha256: expected 64 hex digits (a SHA-256), got null");
}

Test(keys_errors, bad_hex)
{
    expect_error("keys:\n  - id: a\n    tier: pro\n    sha256: "
                 "aaaaaaaaagaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n",
                 "4:13", "keys[0].sha256: expected 64 hex digits, character 10 "
                 "is not a hex digit");
    /* 64 characters of a would-be clear key: rejected, never quoted back. */
    expect_error("keys:\n  - id: a\n    tier: pro\n    sha256: "
                 "tg_secretsecretsecretsecretsecretsecretsecretsecretsecretsecret0\n",
                 "4:13", "character 1 is not a hex digit");
    cr_assert_null(strstr(err, "secret"), "value echoed: %s", err);
    expect_error("keys:\n  - id: a\n    tier: pro\n    sha256: tg_secret\n",
                 "4:13", "got 9 characters");
    cr_assert_null(strstr(err, "secret"), "value echoed: %s", err);
}

Test(keys_errors, id_charset_and_length)
{
    char yaml[512], id[80];

    expect_error("keys:\n  - { id: a/b, tier: pro, sha256: " HA " }\n", "2:11",
                 "keys[0].id: id may only contain [A-Za-z0-9._-], got '/' at "
                 "character 2");
    expect_error("keys:\n  - { id: \"a b\", tier: pro, sha256: " HA " }\n", "2:11",
                 "keys[0].id: id may only contain [A-Za-z0-9._-], got byte 0x20 at "
                 "character 2");
    expect_error("keys:\n  - { id: \"\", tier: pro, sha256: " HA " }\n", "2:11",
                 "keys[0].id: id must be 1 to 64 characters of [A-Za-z0-9._-], "
                 "got 0 characters");

    memset(id, 'x', 64);
    id[64] = '\0';
    snprintf(yaml, sizeof(yaml), "keys:\n  - { id: %s, tier: pro, sha256: " HA " }\n",
             id);
    tg_keys_destroy(expect_ok(yaml));
    id[64] = 'x';
    id[65] = '\0';
    snprintf(yaml, sizeof(yaml), "keys:\n  - { id: %s, tier: pro, sha256: " HA " }\n",
             id);
    expect_error(yaml, "2:11", "keys[0].id: id must be 1 to 64 characters of "
                 "[A-Za-z0-9._-], got 65 characters");
}

Test(keys_errors, tier_charset_and_length)
{
    char yaml[512], tier[40];

    expect_error("keys:\n  - { id: a, tier: Pro, sha256: " HA " }\n", "2:20",
                 "keys[0].tier: tier may only contain [a-z0-9_-], got 'P' at "
                 "character 1");
    expect_error("keys:\n  - { id: a, tier: p.ro, sha256: " HA " }\n", "2:20",
                 "got '.' at character 2");

    memset(tier, 't', 32);
    tier[32] = '\0';
    snprintf(yaml, sizeof(yaml), "keys:\n  - { id: a, tier: %s, sha256: " HA " }\n",
             tier);
    tg_keys_destroy(expect_ok(yaml));
    tier[32] = 't';
    tier[33] = '\0';
    snprintf(yaml, sizeof(yaml), "keys:\n  - { id: a, tier: %s, sha256: " HA " }\n",
             tier);
    expect_error(yaml, "2:20", "keys[0].tier: tier must be 1 to 32 characters of "
                 "[a-z0-9_-], got 33 characters");
}

Test(keys_errors, duplicate_id)
{
    expect_error("keys:\n" ENTRY("acme", "pro", HA) ENTRY("acme", "basic", HB),
                 "5:9", "keys[1].id: duplicate id \"acme\" (first at keys[0], 2:9)");
}

Test(keys_errors, duplicate_sha256)
{
    expect_error("keys:\n" ENTRY("a", "pro", HA) ENTRY("b", "basic", HA),
                 "7:13", "keys[1].sha256: duplicate sha256: the same key as \"a\" "
                 "(keys[0], 4:13)");
    /* Case does not make a different digest. */
    expect_error("keys:\n" ENTRY("a", "pro", HA) ENTRY("b", "basic", HA_UPPER),
                 "7:13", "keys[1].sha256: duplicate sha256");
}

Test(keys_errors, cannot_open)
{
    struct tg_keys *keys;

    keys = tg_keys_load("/nonexistent/keys.yaml", err, sizeof(err));
    cr_assert_null(keys);
    cr_assert_str_eq(err, "/nonexistent/keys.yaml: cannot open: "
                     "No such file or directory");
    keys = tg_keys_load("/tmp", err, sizeof(err));
    cr_assert_null(keys);
    cr_assert_str_eq(err, "/tmp: cannot open: not a regular file");
}

Test(keys_errors, error_in_file_names_the_path)
{
    char path[] = "/tmp/tg_test_keys_XXXXXX";
    int fd = mkstemp(path);
    const char *text = "keys:\n  - { id: a, tier: pro }\n";
    char prefix[64];
    struct tg_keys *keys;

    cr_assert(fd >= 0);
    cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    keys = tg_keys_load(path, err, sizeof(err));
    unlink(path);
    cr_assert_null(keys);
    snprintf(prefix, sizeof(prefix), "%s:2:5: keys[0]: missing", path);
    cr_assert(strncmp(err, prefix, strlen(prefix)) == 0, "got: %s", err);
}

Test(keys_errors, zero_errlen_is_safe)
{
    char one[1] = { 'x' };

    cr_assert_null(tg_keys_load_string("t.yaml", "keys: 1\n", 8, one, 0));
    cr_assert_eq(one[0], 'x');
    cr_assert_null(tg_keys_load_string("t.yaml", "keys: 1\n", 8, one, 1));
    cr_assert_eq(one[0], '\0');
}

/* ---- loading and lookup --------------------------------------------------- */

Test(keys_load, shipped_keys_file)
{
    static const struct { const char *clear, *id, *tier; } demo[] = {
        { "demo-basic-key",      "demo-basic",      "basic" },
        { "demo-pro-key",        "demo-pro",        "pro" },
        { "demo-enterprise-key", "demo-enterprise", "enterprise" },
    };
    char path[4096];
    struct tg_keys *keys;
    const tg_key *k;
    size_t i;

    snprintf(path, sizeof(path), "%s/conf/keys.yaml", source_root());
    keys = tg_keys_load(path, err, sizeof(err));
    cr_assert_not_null(keys, "%s", err);
    cr_assert_eq(tg_keys_count(keys), 3);
    for (i = 0; i < 3; i++) {
        k = find_clear(keys, demo[i].clear);
        cr_assert_not_null(k, "%s not found", demo[i].clear);
        cr_assert_str_eq(k->id, demo[i].id);
        cr_assert_str_eq(k->tier, demo[i].tier);
        cr_assert_eq(k->enabled, 1);
    }
    cr_assert_null(find_clear(keys, "demo-basic-key "));
    cr_assert_null(find_clear(keys, "demo-basic"));
    cr_assert_null(find_clear(keys, ""));
    tg_keys_destroy(keys);
}

Test(keys_load, empty_sequence)
{
    struct tg_keys *keys = expect_ok("keys: []\n");
    uint8_t d[32] = { 0 };

    cr_assert_eq(tg_keys_count(keys), 0);
    cr_assert_null(tg_keys_find(keys, d));
    cr_assert_null(find_clear(keys, "demo-basic-key"));
    tg_keys_destroy(keys);

    cr_assert_eq(tg_keys_count(NULL), 0);
    cr_assert_null(tg_keys_find(NULL, d));
    tg_keys_destroy(NULL);
}

Test(keys_load, fields_enabled_and_case)
{
    struct tg_keys *keys = expect_ok(
        "# comment\n"
        "keys:\n"
        "  - { id: A.b_c-9, tier: pro-1_x, sha256: " HA_UPPER " }\n"
        "  - id: off\n"
        "    enabled: false\n"
        "    tier: basic\n"
        "    sha256: '" HB "'\n"
        "  - { id: on, tier: basic, sha256: "
        "\"cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc\", "
        "enabled: True }\n");
    uint8_t d[32];
    const tg_key *k;

    cr_assert_eq(tg_keys_count(keys), 3);

    cr_assert_eq(tg_keys_unhex(HA, 64, d), TG_OK);
    k = tg_keys_find(keys, d);
    cr_assert_not_null(k);
    cr_assert_str_eq(k->id, "A.b_c-9");
    cr_assert_str_eq(k->tier, "pro-1_x");
    cr_assert_eq(k->enabled, 1, "enabled defaults to true");

    /* A disabled key is found (403, not 401), with enabled = 0. */
    cr_assert_eq(tg_keys_unhex(HB, 64, d), TG_OK);
    k = tg_keys_find(keys, d);
    cr_assert_not_null(k);
    cr_assert_str_eq(k->id, "off");
    cr_assert_eq(k->enabled, 0);

    memset(d, 0xcc, 32);
    k = tg_keys_find(keys, d);
    cr_assert_not_null(k);
    cr_assert_str_eq(k->id, "on");
    cr_assert_eq(k->enabled, 1);

    /* Same first 8 bytes, different digest: probes past, not found. */
    memset(d, 0xaa, 32);
    d[31] = 0xab;
    cr_assert_null(tg_keys_find(keys, d));
    tg_keys_destroy(keys);
}

Test(keys_load, unknown_key_not_found)
{
    struct tg_keys *keys = expect_ok("keys:\n" ENTRY("a", "pro", HA));

    cr_assert_null(find_clear(keys, "no-such-key"));
    tg_keys_destroy(keys);
}

/* Digests sharing their first 8 bytes all land on one probe chain. */
Test(keys_load, colliding_prefixes)
{
    char yaml[8192], hex[65];
    uint8_t d[32];
    size_t off, i;
    struct tg_keys *keys;
    const tg_key *k;

    off = (size_t)snprintf(yaml, sizeof(yaml), "keys:\n");
    for (i = 0; i < 20; i++) {
        memset(d, 0x11, 32);
        d[31] = (uint8_t)i;
        tg_keys_hex(d, hex);
        off += (size_t)snprintf(yaml + off, sizeof(yaml) - off,
                                "  - { id: k%zu, tier: t, sha256: %s }\n", i, hex);
    }
    keys = expect_ok(yaml);
    for (i = 0; i < 20; i++) {
        char id[16];
        memset(d, 0x11, 32);
        d[31] = (uint8_t)i;
        k = tg_keys_find(keys, d);
        cr_assert_not_null(k);
        snprintf(id, sizeof(id), "k%zu", i);
        cr_assert_str_eq(k->id, id);
    }
    memset(d, 0x11, 32);
    d[31] = 20;
    cr_assert_null(tg_keys_find(keys, d));
    tg_keys_destroy(keys);
}

Test(keys_load, ten_thousand_keys, .timeout = 30)
{
    enum { N = 10000 };
    size_t cap = (size_t)N * 128 + 16, off, i;
    char *yaml = malloc(cap), clear[32], hex[65], id[16];
    uint8_t d[32];
    struct tg_keys *keys;
    const tg_key *k;

    cr_assert_not_null(yaml);
    off = (size_t)snprintf(yaml, cap, "keys:\n");
    for (i = 0; i < N; i++) {
        snprintf(clear, sizeof(clear), "key-%zu", i);
        tg_keys_hash(clear, strlen(clear), d);
        tg_keys_hex(d, hex);
        off += (size_t)snprintf(yaml + off, cap - off,
                                "  - { id: c%zu, tier: t%zu, sha256: %s%s }\n", i,
                                i % 3, hex, i % 7 == 0 ? ", enabled: false" : "");
    }
    keys = tg_keys_load_string("big.yaml", yaml, off, err, sizeof(err));
    free(yaml);
    cr_assert_not_null(keys, "%s", err);
    cr_assert_eq(tg_keys_count(keys), N);
    for (i = 0; i < N; i++) {
        snprintf(clear, sizeof(clear), "key-%zu", i);
        k = find_clear(keys, clear);
        cr_assert_not_null(k, "%s not found", clear);
        snprintf(id, sizeof(id), "c%zu", i);
        cr_assert_str_eq(k->id, id);
        cr_assert_eq(k->enabled, i % 7 != 0);
    }
    for (i = N; i < N + 1000; i++) {
        snprintf(clear, sizeof(clear), "key-%zu", i);
        cr_assert_null(find_clear(keys, clear));
    }
    tg_keys_destroy(keys);
}

static long
rss_kb(void)
{
    char line[256];
    long kb = -1;
    FILE *f = fopen("/proc/self/status", "r");

    if (f == NULL) {
        return -1;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kb = atol(line + 6);
            break;
        }
    }
    fclose(f);
    return kb;
}

/* N keys in the one-line form, ids k0000000.., three tiers. */
static char *
one_line_file(size_t n, size_t *len)
{
    size_t cap = n * 128 + 16, off, i;
    char *yaml = malloc(cap), clear[32], hex[65];
    uint8_t d[32];

    cr_assert_not_null(yaml);
    off = (size_t)snprintf(yaml, cap, "keys:\n");
    for (i = 0; i < n; i++) {
        snprintf(clear, sizeof(clear), "key-%zu", i);
        tg_keys_hash(clear, strlen(clear), d);
        tg_keys_hex(d, hex);
        off += (size_t)snprintf(yaml + off, cap - off, "  - { id: k%07zu, tier: t%zu, "
                                "sha256: \"%s\", enabled: true }\n", i, i % 3, hex);
    }
    *len = off;
    return yaml;
}

/*
 * A million keys in 128 MB: 100,000 keys take under 128 bytes each of
 * resident memory (measured: 72; about 1 KB when the file was loaded as
 * a YAML tree into 136-byte entries), and a reload (a second set loaded
 * while the first is held, then the first dropped) gives the first set's
 * memory back.  Under ASan resident memory is ASan's: skipped there.
 */
Test(keys_load, resident_memory_per_key_and_reload, .timeout = 60)
{
    enum { N = 100000 };
    struct tg_keys *a, *b, *c;
    size_t len;
    char *yaml;
    long r0, r1, r2, r3, grown;

#if defined(__SANITIZE_ADDRESS__)
    cr_skip_test("resident memory under ASan is ASan's");
#endif
    yaml = one_line_file(N, &len);
    r0 = rss_kb();
    a = tg_keys_load_string("big.yaml", yaml, len, err, sizeof(err));
    cr_assert_not_null(a, "%s", err);
    r1 = rss_kb();
    b = tg_keys_load_string("big.yaml", yaml, len, err, sizeof(err));
    cr_assert_not_null(b, "%s", err);
    tg_keys_destroy(a);
    r2 = rss_kb();
    c = tg_keys_load_string("big.yaml", yaml, len, err, sizeof(err));
    cr_assert_not_null(c, "%s", err);
    tg_keys_destroy(b);
    r3 = rss_kb();
    free(yaml);

    cr_assert(r0 > 0 && r1 > 0 && r2 > 0 && r3 > 0, "cannot read VmRSS");
    grown = r1 - r0;
    cr_assert_leq(grown * 1024 / N, 128, "%d keys: VmRSS grew by %ld kB, %ld bytes "
                  "per key", N, grown, grown * 1024 / N);
    cr_assert_leq(tg_keys_memory(c) / N, 128, "tg_keys_memory: %zu bytes per key",
                  tg_keys_memory(c) / N);
    cr_assert_leq(r2 - r0, grown + grown / 4 + 1024, "after one reload VmRSS is "
                  "%ld kB over the start, one set is %ld kB", r2 - r0, grown);
    cr_assert_leq(r3 - r0, grown + grown / 4 + 1024, "after two reloads VmRSS is "
                  "%ld kB over the start, one set is %ld kB", r3 - r0, grown);
    tg_keys_destroy(c);
}

/* The fast path (one-line form) and the general path (any other YAML
 * form) build the same set: same lookups, ids, tiers, flags and the same
 * first unknown tier. */
Test(keys_load, one_line_and_block_forms_agree)
{
    static const char *const tiers[] = { "t0", "t1" };
    enum { N = 300 };
    size_t len, off, cap = N * 160 + 16, i;
    char *flow, *block, clear[32], hex[65], e1[512], e2[512];
    struct tg_keys *a, *b;
    const tg_key *ka, *kb;
    uint8_t d[32];

    flow = one_line_file(N, &len);
    block = malloc(cap);
    cr_assert_not_null(block);
    off = (size_t)snprintf(block, cap, "keys:\n");
    for (i = 0; i < N; i++) {
        snprintf(clear, sizeof(clear), "key-%zu", i);
        tg_keys_hash(clear, strlen(clear), d);
        tg_keys_hex(d, hex);
        off += (size_t)snprintf(block + off, cap - off, "- id: k%07zu\n  tier: t%zu\n"
                                "  sha256: %s\n", i, i % 3, hex);
    }
    a = tg_keys_load_string("a.yaml", flow, len, err, sizeof(err));
    cr_assert_not_null(a, "%s", err);
    b = tg_keys_load_string("a.yaml", block, off, err, sizeof(err));
    cr_assert_not_null(b, "%s", err);
    cr_assert_eq(tg_keys_count(a), N);
    cr_assert_eq(tg_keys_count(b), N);
    for (i = 0; i < N + 10; i++) {
        snprintf(clear, sizeof(clear), "key-%zu", i);
        ka = find_clear(a, clear);
        kb = find_clear(b, clear);
        cr_assert_eq(ka == NULL, i >= N);
        cr_assert_eq(kb == NULL, i >= N);
        if (ka != NULL) {
            cr_assert_str_eq(ka->id, kb->id);
            cr_assert_str_eq(ka->tier, kb->tier);
            cr_assert_eq(ka->enabled, kb->enabled);
        }
    }
    /* t2 first appears at keys[2]: line 4 in the one-line form, column
     * 27; line 9 column 9 in the block form. */
    cr_assert_eq(tg_keys_check_tiers(a, tiers, 2, e1, sizeof(e1)), TG_ERR);
    cr_assert_eq(tg_keys_check_tiers(b, tiers, 2, e2, sizeof(e2)), TG_ERR);
    cr_assert_str_eq(e1, "a.yaml:4:27: keys[2].tier: key \"k0000002\" has tier "
                     "\"t2\", which is not a tier of rate_limits (t0, t1)");
    cr_assert_str_eq(e2, "a.yaml:9:9: keys[2].tier: key \"k0000002\" has tier "
                     "\"t2\", which is not a tier of rate_limits (t0, t1)");
    tg_keys_destroy(a);
    tg_keys_destroy(b);
    free(flow);
    free(block);
}

/* Lines the fast path must read as YAML does, or leave to the general
 * path: each file is valid YAML and loads, with the values YAML gives. */
Test(keys_load, one_line_form_edge_cases)
{
    static const struct { const char *yaml; const char *id, *tier; int enabled; } ok[] = {
        { "keys:\n- { id: a, tier: b, sha256: " HA " }\n", "a", "b", 1 },
        { "# c\n\nkeys:   # c\n  # c\n  - {id: \"a\",tier: b,sha256: " HA "}  # c\n",
          "a", "b", 1 },
        { "keys:\n  - { id: \"null\", tier: b, sha256: " HA " }\n", "null", "b", 1 },
        { "keys:\n  - { id: 1.5, tier: b, sha256: " HA ", enabled: FALSE }\n",
          "1.5", "b", 0 },
        { "keys:\r\n  - { id: a, tier: b, sha256: " HA " }\r\n", "a", "b", 1 },
        { "keys:\n  - { id: a, tier: b, sha256: " HA " }", "a", "b", 1 },
        { "---\nkeys:\n  - { id: a, tier: b, sha256: " HA " }\n", "a", "b", 1 },
        { "keys:\n  - { id: a, tier: b, sha256: " HA " }\n"
          "  - { id: a, tier: b, sha256: " HB " }\n", NULL, NULL, 0 },
        { "keys:\n  - { id: null, tier: b, sha256: " HA " }\n", NULL, NULL, 0 },
        { "keys:\n  - { id: a, tier: b, sha256: " HA ", enabled: yes }\n",
          NULL, NULL, 0 },
        { "keys:\n  - { id: a, tier: b, sha256: " HA ", }\n", "a", "b", 1 },
        { "keys:\n\t- { id: a, tier: b, sha256: " HA " }\n", NULL, NULL, 0 },
    };
    struct tg_keys *keys;
    const tg_key *k;
    uint8_t d[32];
    size_t i;

    cr_assert_eq(tg_keys_unhex(HA, 64, d), TG_OK);
    for (i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        keys = load(ok[i].yaml);
        if (ok[i].id == NULL) {
            cr_assert_null(keys, "case %zu should be refused", i);
            continue;
        }
        cr_assert_not_null(keys, "case %zu: %s", i, err);
        k = tg_keys_find(keys, d);
        cr_assert_not_null(k, "case %zu", i);
        cr_assert_str_eq(k->id, ok[i].id, "case %zu", i);
        cr_assert_str_eq(k->tier, ok[i].tier, "case %zu", i);
        cr_assert_eq(k->enabled, ok[i].enabled, "case %zu", i);
        tg_keys_destroy(keys);
    }
}

/* ---- tiers ---------------------------------------------------------------- */

/* Tiers are interned: a file may name at most 256 distinct ones. */
Test(keys_tiers, at_most_256_distinct)
{
    size_t cap = 300 * 128, off, i;
    char *yaml = malloc(cap), hex[65];
    struct tg_keys *keys;
    uint8_t d[32];

    cr_assert_not_null(yaml);
    for (int n = 256; n <= 257; n++) {
        off = (size_t)snprintf(yaml, cap, "keys:\n");
        for (i = 0; i < (size_t)n; i++) {
            memset(d, 0, sizeof(d));
            memcpy(d, &i, sizeof(i));
            tg_keys_hex(d, hex);
            off += (size_t)snprintf(yaml + off, cap - off, "  - { id: k%zu, tier: "
                                    "t%zu, sha256: %s }\n", i, i, hex);
        }
        keys = tg_keys_load_string("t.yaml", yaml, off, err, sizeof(err));
        if (n == 256) {
            cr_assert_not_null(keys, "%s", err);
            cr_assert_eq(tg_keys_count(keys), 256);
            tg_keys_destroy(keys);
        } else {
            cr_assert_null(keys);
            cr_assert_str_eq(err, "t.yaml:258:23: keys[256].tier: more than 256 "
                             "distinct tiers");
        }
    }
    free(yaml);
}

Test(keys_tiers, check)
{
    static const char *const tiers[] = { "basic", "pro" };
    static const char *const one[] = { "basic" };
    struct tg_keys *keys = expect_ok("keys:\n"
                                     "  - { id: a, tier: basic, sha256: " HA " }\n"
                                     "  - { id: acme, tier: gold, sha256: " HB " }\n");

    cr_assert_eq(tg_keys_check_tiers(keys, tiers, 2, err, sizeof(err)), TG_ERR);
    cr_assert_str_eq(err, "t.yaml:3:23: keys[1].tier: key \"acme\" has tier "
                     "\"gold\", which is not a tier of rate_limits (basic, pro)");
    cr_assert_eq(tg_keys_check_tiers(keys, one, 1, err, sizeof(err)), TG_ERR);
    cr_assert(strstr(err, "key \"acme\"") != NULL, "%s", err);
    cr_assert_eq(tg_keys_check_tiers(keys, NULL, 0, err, sizeof(err)), TG_ERR);
    cr_assert(strstr(err, "keys[0].tier: key \"a\" has tier \"basic\"") != NULL,
              "%s", err);
    cr_assert(strstr(err, "(none defined)") != NULL, "%s", err);
    tg_keys_destroy(keys);

    keys = expect_ok("keys:\n  - { id: a, tier: pro, sha256: " HA " }\n");
    err[0] = '\0';
    cr_assert_eq(tg_keys_check_tiers(keys, tiers, 2, err, sizeof(err)), TG_OK);
    cr_assert_str_eq(err, "");
    tg_keys_destroy(keys);
}

Test(keys_tiers, long_list_truncates_safely)
{
    static const char *const tiers[] = { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                                         "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb" };
    struct tg_keys *keys = expect_ok("keys:\n  - { id: a, tier: z, sha256: " HA " }\n");
    char small[100];

    cr_assert_eq(tg_keys_check_tiers(keys, tiers, 2, small, sizeof(small)), TG_ERR);
    cr_assert_eq(strlen(small), sizeof(small) - 1);
    cr_assert(strstr(small, "key \"a\"") != NULL, "%s", small);
    tg_keys_destroy(keys);
}

/* ---- hex, hash, generate -------------------------------------------------- */

Test(keys_hex, round_trip)
{
    uint8_t d[32], back[32];
    char hex[65];
    size_t i;

    for (i = 0; i < 32; i++) {
        d[i] = (uint8_t)(i * 37 + 5);
    }
    tg_keys_hex(d, hex);
    cr_assert_eq(strlen(hex), 64);
    cr_assert_str_eq(hex, "052a4f7499bee3082d52779cc1e60b30"
                          "557a9fc4e90e33587da2c7ec11365b80", "got %s", hex);
    cr_assert_eq(tg_keys_unhex(hex, 64, back), TG_OK);
    cr_assert_arr_eq(back, d, 32);

    for (i = 0; i < 64; i++) {
        hex[i] = (char)(hex[i] >= 'a' ? hex[i] - 32 : hex[i]);
    }
    cr_assert_eq(tg_keys_unhex(hex, 64, back), TG_OK, "upper case accepted");
    cr_assert_arr_eq(back, d, 32);

    cr_assert_eq(tg_keys_unhex(hex, 63, back), TG_ERR);
    cr_assert_eq(tg_keys_unhex(HA "a", 65, back), TG_ERR);
    cr_assert_eq(tg_keys_unhex("", 0, back), TG_ERR);
    cr_assert_eq(tg_keys_unhex(NULL, 64, back), TG_ERR);
    hex[10] = 'g';
    cr_assert_eq(tg_keys_unhex(hex, 64, back), TG_ERR);
    hex[10] = ' ';
    cr_assert_eq(tg_keys_unhex(hex, 64, back), TG_ERR);
}

Test(keys_hex, hash_known_value)
{
    uint8_t d[32];
    char hex[65];

    tg_keys_hash("demo-basic-key", 14, d);
    tg_keys_hex(d, hex);
    cr_assert_str_eq(hex, "4f6d8d54023de38a3bc2ca891c396e12d7cf000a3c5dbd9c2c1c73ef9b4f1c9b");
    tg_keys_hash("", 0, d);
    tg_keys_hex(d, hex);
    cr_assert_str_eq(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    /* Length counts, not NUL termination. */
    tg_keys_hash("demo-basic-keyXYZ", 14, d);
    tg_keys_hex(d, hex);
    cr_assert_str_eq(hex, "4f6d8d54023de38a3bc2ca891c396e12d7cf000a3c5dbd9c2c1c73ef9b4f1c9b");
}

Test(keys_generate, format_and_use)
{
    char a[64], b[64], hex[65], yaml[512];
    uint8_t d[32];
    struct tg_keys *keys;
    const tg_key *k;
    size_t i;

    cr_assert_eq(tg_keys_generate(a), TG_OK);
    cr_assert_eq(tg_keys_generate(b), TG_OK);
    cr_assert_eq(strlen(a), 46);
    cr_assert_eq(strlen(b), 46);
    cr_assert(strncmp(a, "tg_", 3) == 0, "%s", a);
    for (i = 3; i < 46; i++) {
        cr_assert(strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                         "0123456789-_", a[i]) != NULL && a[i] != '\0',
                  "not base64url: '%c' in %s", a[i], a);
    }
    /* 256 bits in 43 characters: the last one carries 4 bits and two zero
     * bits, so its value is a multiple of 4. */
    cr_assert(strchr("AEIMQUYcgkosw048", a[45]) != NULL, "%s", a);
    cr_assert_str_neq(a, b);

    tg_keys_hash(a, strlen(a), d);
    tg_keys_hex(d, hex);
    snprintf(yaml, sizeof(yaml), "keys:\n  - { id: gen, tier: pro, sha256: %s }\n"
             "  - { id: other, tier: basic, sha256: " HA " }\n", hex);
    keys = expect_ok(yaml);
    k = find_clear(keys, a);
    cr_assert_not_null(k);
    cr_assert_str_eq(k->id, "gen");
    cr_assert_str_eq(k->tier, "pro");
    cr_assert_null(find_clear(keys, b));
    tg_keys_destroy(keys);
}

Test(keys_generate, many_distinct)
{
    char keys[64][64];
    size_t i, j;

    for (i = 0; i < 64; i++) {
        cr_assert_eq(tg_keys_generate(keys[i]), TG_OK);
        for (j = 0; j < i; j++) {
            cr_assert_str_neq(keys[i], keys[j]);
        }
    }
}
