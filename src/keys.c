/*
 * keys.c - the API keys file, lookup by SHA-256, key generation.
 *
 * The file is small and its schema fixed, so it gets its own compact parser
 * rather than conf.c's directive tables, with the same strictness and the
 * same messages: "FILE:LINE:COL: keys[3].sha256: what is wrong".
 *
 *   1. structure  scan the YAML events once to reject anchors, aliases and
 *                 extra documents at their marks, then load the node tree;
 *   2. parse      walk "keys:" entry by entry into a flat array, checking
 *                 each field; duplicate ids and digests are caught as each
 *                 entry is added to the two hash tables.
 *
 * Lookup: the digest table is open addressing (linear probing) over a
 * power-of-two array of indices, load <= 0.5.  The first 8 bytes of a
 * SHA-256 are uniform, so they are the hash.  Full digests are compared with
 * CRYPTO_memcmp.  Once loaded nothing is written: readers share it freely.
 *
 * Only digests are held; the clear key never reaches this module except in
 * tg_keys_hash (hashed, not kept) and tg_keys_generate (written to the
 * caller's buffer).  No message quotes a sha256 value: an operator who
 * pasted a clear key into the file must not find it in a log.
 */
#include "tollgate/keys.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <yaml.h>

#include "tollgate/yaml.h"

#define TG_KEYS_MAX_FILE  (64u * 1024 * 1024)   /* ~500k keys; use Redis beyond */
#define TG_KEYS_PATHLEN   64                    /* "keys[123456].sha256" */
#define TG_KEYS_ECHO_MAX  32                    /* longest unknown key quoted */

/* Where a key's fields were written, for messages after the parse. */
typedef struct tg_keys_pos {
    yaml_mark_t  id;
    yaml_mark_t  tier;
    yaml_mark_t  sha256;
} tg_keys_pos;

struct tg_keys {
    unsigned     extra_refs; /* atomic; references beyond the first (calloc: 0) */
    tg_key      *keys;       /* file order */
    size_t       n;
    uint32_t    *slots;      /* index + 1 into keys; 0 = empty */
    size_t       mask;       /* slots has mask + 1 entries, a power of two */
    char        *name;       /* file name, for tg_keys_check_tiers */
    tg_keys_pos *pos;        /* n entries, parallel to keys */
};

typedef struct tg_keys_ctx {
    const char      *name;   /* file name used in messages */
    const char      *text;
    size_t           len;
    yaml_document_t  doc;
    int              have_doc;
    struct tg_keys  *keys;   /* being built; owned until returned */
    uint32_t        *ids;    /* id hash set: index + 1 into keys; 0 = empty */
    size_t           idmask;
    char            *err;
    size_t           errlen;
} tg_keys_ctx;

/* ---- static prototypes ------------------------------------------------- */

static tg_rc tg_keys_structure(tg_keys_ctx *ctx);
static tg_rc tg_keys_top(tg_keys_ctx *ctx, yaml_node_t *root);
static tg_rc tg_keys_entry(tg_keys_ctx *ctx, yaml_node_t *map, size_t idx);
static tg_rc tg_keys_add(tg_keys_ctx *ctx, size_t idx);
static const char *tg_keys_scalar(tg_keys_ctx *ctx, yaml_node_t *node,
                                  const char *path, const char *expected);
static tg_rc tg_keys_name(tg_keys_ctx *ctx, yaml_node_t *node, const char *path,
                          const char *what, const char *charset, size_t max,
                          int (*ok)(unsigned char), char *out);
static int tg_keys_id_char(unsigned char c);
static int tg_keys_tier_char(unsigned char c);
static uint64_t tg_keys_digest_hash(const uint8_t sha256[32]);
static size_t tg_keys_table_size(size_t n);
static void tg_keys_free(struct tg_keys *keys);
static tg_rc tg_keys_type_error(tg_keys_ctx *ctx, yaml_node_t *node,
                                const char *path, const char *expected);
static tg_rc tg_keys_error(tg_keys_ctx *ctx, yaml_mark_t mark, const char *path,
                           const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- tables ------------------------------------------------------------ */

enum { TG_KEYS_F_ID, TG_KEYS_F_TIER, TG_KEYS_F_SHA256, TG_KEYS_F_ENABLED,
       TG_KEYS_NFIELDS };

/* Fields of one entry, in the order "missing" is reported. */
static const char *const tg_keys_fields[TG_KEYS_NFIELDS] = {
    "id", "tier", "sha256", "enabled",
};

static const char tg_keys_b64url[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* ---- public functions -------------------------------------------------- */

struct tg_keys *
tg_keys_load(const char *path, char *err, size_t errlen)
{
    struct tg_keys *keys = NULL;
    char *text;
    size_t len = 0;

    text = tg_yaml_read_file(path, TG_KEYS_MAX_FILE, &len, err, errlen);
    if (text == NULL) {
        return NULL;
    }
    keys = tg_keys_load_string(path, text, len, err, errlen);
    free(text);
    return keys;
}

/*
 * Parse text (len bytes, need not be NUL-terminated) named `name` in
 * messages.  Returns a new set the caller frees with tg_keys_destroy, or
 * NULL with err filled.
 */
struct tg_keys *
tg_keys_load_string(const char *name, const char *text, size_t len,
                    char *err, size_t errlen)
{
    tg_keys_ctx ctx;
    yaml_node_t *root;

    memset(&ctx, 0, sizeof(ctx));
    ctx.name = name;
    ctx.text = text;
    ctx.len = len;
    ctx.err = err;
    ctx.errlen = errlen;
    ctx.keys = tg_xcalloc(1, sizeof(struct tg_keys));
    ctx.keys->name = tg_xstrdup(name);
    if (errlen > 0) {
        err[0] = '\0';
    }

    if (tg_keys_structure(&ctx) != TG_OK) {
        goto fail;
    }
    root = yaml_document_get_root_node(&ctx.doc);
    if (tg_keys_top(&ctx, root) != TG_OK) {
        goto fail;
    }
    goto done;

fail:
    tg_keys_free(ctx.keys);
    ctx.keys = NULL;

done:
    if (ctx.have_doc) {
        yaml_document_delete(&ctx.doc);
    }
    free(ctx.ids);
    return ctx.keys;
}

void
tg_keys_destroy(struct tg_keys *keys)
{
    tg_keys_free(keys);
}

struct tg_keys *
tg_keys_ref(struct tg_keys *keys)
{
    if (keys != NULL) {
        __atomic_add_fetch(&keys->extra_refs, 1, __ATOMIC_RELAXED);
    }
    return keys;
}

void
tg_keys_unref(struct tg_keys *keys)
{
    if (keys != NULL && __atomic_fetch_sub(&keys->extra_refs, 1, __ATOMIC_ACQ_REL) == 0) {
        tg_keys_free(keys);
    }
}

size_t
tg_keys_count(const struct tg_keys *keys)
{
    return keys != NULL ? keys->n : 0;
}

/*
 * The first key (file order) whose tier is not in names[0..n) fails the
 * check, at the mark of its tier value, naming the key id and tier.
 */
tg_rc
tg_keys_check_tiers(const struct tg_keys *keys, const char *const *names,
                    size_t n, char *err, size_t errlen)
{
    const tg_key *k;
    size_t i, j, off;
    int w;

    if (keys == NULL) {
        return TG_OK;
    }
    for (i = 0; i < keys->n; i++) {
        k = &keys->keys[i];
        for (j = 0; j < n; j++) {
            if (strcmp(k->tier, names[j]) == 0) {
                break;
            }
        }
        if (j < n) {
            continue;
        }
        if (errlen == 0) {
            return TG_ERR;
        }
        w = snprintf(err, errlen, "%s:%zu:%zu: keys[%zu].tier: key \"%s\" has "
                     "tier \"%s\", which is not a tier of rate_limits (",
                     keys->name, keys->pos[i].tier.line + 1,
                     keys->pos[i].tier.column + 1, i, k->id, k->tier);
        off = w < 0 ? 0 : (size_t)w;
        for (j = 0; j < n && off < errlen; j++) {
            w = snprintf(err + off, errlen - off, "%s%s", j ? ", " : "", names[j]);
            off += w < 0 ? 0 : (size_t)w;
        }
        if (off < errlen) {
            snprintf(err + off, errlen - off, "%s)", n == 0 ? "none defined" : "");
        }
        return TG_ERR;
    }
    return TG_OK;
}

void
tg_keys_hash(const char *key, size_t len, uint8_t out[32])
{
    SHA256((const unsigned char *)key, len, out);
}

/*
 * The probe sequence depends on the digest's first bytes, so lookup time
 * says something about where a digest lands in the table; that tells an
 * attacker nothing about any key (preimage resistance).  What must not leak
 * is how much of a stored digest matched, hence CRYPTO_memcmp.
 */
const tg_key *
tg_keys_find(const struct tg_keys *keys, const uint8_t sha256[32])
{
    size_t i;
    uint32_t s;

    if (keys == NULL || keys->slots == NULL) {
        return NULL;
    }
    for (i = tg_keys_digest_hash(sha256) & keys->mask;; i = (i + 1) & keys->mask) {
        s = keys->slots[i];
        if (s == 0) {
            return NULL;
        }
        if (CRYPTO_memcmp(keys->keys[s - 1].sha256, sha256, 32) == 0) {
            return &keys->keys[s - 1];
        }
    }
}

void
tg_keys_hex(const uint8_t sha256[32], char out[65])
{
    static const char hex[] = "0123456789abcdef";
    size_t i;

    for (i = 0; i < 32; i++) {
        out[2 * i] = hex[sha256[i] >> 4];
        out[2 * i + 1] = hex[sha256[i] & 0xf];
    }
    out[64] = '\0';
}

/* Either case is accepted: sha256sum writes lower, some tools upper. */
tg_rc
tg_keys_unhex(const char *hex, size_t len, uint8_t out[32])
{
    size_t i;
    int hi, lo;

    if (hex == NULL || len != 64) {
        return TG_ERR;
    }
    for (i = 0; i < 32; i++) {
        hi = OPENSSL_hexchar2int((unsigned char)hex[2 * i]);
        lo = OPENSSL_hexchar2int((unsigned char)hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            return TG_ERR;
        }
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return TG_OK;
}

/* "tg_" + 43 unpadded base64url characters of 32 random bytes + NUL: 47
 * bytes of out[64].  TG_ERR (errno set, out empty) if getrandom fails. */
tg_rc
tg_keys_generate(char out[64])
{
    uint8_t raw[33];             /* one spare zero byte ends the last group */
    size_t got = 0, i, o;
    ssize_t n;
    uint32_t v;

    out[0] = '\0';
    while (got < 32) {
        n = getrandom(raw + got, 32 - got, 0);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            OPENSSL_cleanse(raw, sizeof(raw));
            return TG_ERR;
        }
        got += (size_t)n;
    }
    raw[32] = 0;

    memcpy(out, "tg_", 3);
    o = 3;
    for (i = 0; i < 33; i += 3) {
        v = (uint32_t)raw[i] << 16 | (uint32_t)raw[i + 1] << 8 | raw[i + 2];
        out[o++] = tg_keys_b64url[(v >> 18) & 63];
        out[o++] = tg_keys_b64url[(v >> 12) & 63];
        out[o++] = tg_keys_b64url[(v >> 6) & 63];
        out[o++] = tg_keys_b64url[v & 63];
    }
    /* 33 bytes made 44 characters; the last one encodes only the spare
     * zero byte, so 32 bytes are the first 43 (unpadded base64url). */
    o = 3 + 43;
    out[o] = '\0';
    OPENSSL_cleanse(raw, sizeof(raw));
    OPENSSL_cleanse(&v, sizeof(v));
    return TG_OK;
}

/* ---- parsing ----------------------------------------------------------- */

/* Phase 1: tg_yaml_load rejects anchors, aliases and extra documents at
 * their exact marks, then loads the node tree. */
static tg_rc
tg_keys_structure(tg_keys_ctx *ctx)
{
    if (tg_yaml_load(&ctx->doc, ctx->name, ctx->text, ctx->len, "keys file",
                     ctx->err, ctx->errlen) != TG_OK) {
        return TG_ERR;
    }
    ctx->have_doc = 1;

    if (yaml_document_get_root_node(&ctx->doc) == NULL) {
        yaml_mark_t zero;
        memset(&zero, 0, sizeof(zero));
        return tg_keys_error(ctx, zero, "", "empty keys file: expected \"keys:\" "
                             "with a sequence (\"keys: []\" for none)");
    }
    return TG_OK;
}

/* Key path of a child: "parent.key", or the parent alone when the key is
 * too long to quote (see tg_keys_unknown). */
static void
tg_keys_child(char *out, const char *parent, const char *key)
{
    if (strlen(key) > TG_KEYS_ECHO_MAX) {
        snprintf(out, TG_KEYS_PATHLEN, "%s", parent);
    } else {
        snprintf(out, TG_KEYS_PATHLEN, "%s%s%s", parent, parent[0] ? "." : "", key);
    }
}

/* Scalar key of a mapping pair, or NULL after an error (not a scalar, or a
 * duplicate of an earlier key of the same mapping).  child gets its path. */
static const char *
tg_keys_map_key(tg_keys_ctx *ctx, yaml_node_t *map, yaml_node_pair_t *pair,
                const char *path, char *child)
{
    static const char *const what[] = { "", "a scalar", "a sequence", "a mapping" };
    yaml_node_pair_t *prev;
    yaml_node_t *key, *pkey;
    const char *kname;

    key = yaml_document_get_node(&ctx->doc, pair->key);
    if (key->type != YAML_SCALAR_NODE) {
        tg_keys_error(ctx, key->start_mark, path, "keys must be plain names, "
                      "got %s", what[key->type]);
        return NULL;
    }
    kname = (const char *)key->data.scalar.value;
    tg_keys_child(child, path, kname);
    for (prev = map->data.mapping.pairs.start; prev < pair; prev++) {
        pkey = yaml_document_get_node(&ctx->doc, prev->key);
        if (pkey->type == YAML_SCALAR_NODE &&
            strcmp((const char *)pkey->data.scalar.value, kname) == 0) {
            if (strlen(kname) > TG_KEYS_ECHO_MAX) {
                tg_keys_error(ctx, key->start_mark, child, "duplicate key "
                              "(first at %zu:%zu)", pkey->start_mark.line + 1,
                              pkey->start_mark.column + 1);
            } else {
                tg_keys_error(ctx, key->start_mark, child, "duplicate key \"%s\" "
                              "(first at %zu:%zu)", kname,
                              pkey->start_mark.line + 1,
                              pkey->start_mark.column + 1);
            }
            return NULL;
        }
    }
    return kname;
}

/* An unknown key is quoted only when short: a 46-character "tg_..." pasted
 * as a key name is more likely a secret than a typo. */
static tg_rc
tg_keys_unknown(tg_keys_ctx *ctx, yaml_node_pair_t *pair, const char *child,
                const char *expected)
{
    yaml_node_t *key = yaml_document_get_node(&ctx->doc, pair->key);
    const char *kname = (const char *)key->data.scalar.value;

    if (strlen(kname) > TG_KEYS_ECHO_MAX) {
        return tg_keys_error(ctx, key->start_mark, child, "unknown key (%zu "
                             "characters); expected %s", strlen(kname), expected);
    }
    return tg_keys_error(ctx, key->start_mark, child, "unknown key \"%s\"; "
                         "expected %s", kname, expected);
}

/* Top level: a mapping with exactly "keys", a sequence. */
static tg_rc
tg_keys_top(tg_keys_ctx *ctx, yaml_node_t *root)
{
    static const char *const what[] = { "", "a scalar", "a sequence", "a mapping" };
    yaml_node_pair_t *pair;
    yaml_node_t *seq = NULL;
    struct tg_keys *keys = ctx->keys;
    const char *kname;
    char child[TG_KEYS_PATHLEN];
    size_t n, i;

    if (root->type != YAML_MAPPING_NODE) {
        return tg_keys_error(ctx, root->start_mark, "", "top level: expected a "
                             "mapping with \"keys\", got %s", what[root->type]);
    }
    for (pair = root->data.mapping.pairs.start; pair < root->data.mapping.pairs.top;
         pair++) {
        kname = tg_keys_map_key(ctx, root, pair, "", child);
        if (kname == NULL) {
            return TG_ERR;
        }
        if (strcmp(kname, "keys") != 0) {
            return tg_keys_unknown(ctx, pair, child, "only \"keys\" at top level");
        }
        seq = yaml_document_get_node(&ctx->doc, pair->value);
    }
    if (seq == NULL) {
        return tg_keys_error(ctx, root->start_mark, "", "missing required key "
                             "\"keys\"");
    }
    if (seq->type != YAML_SEQUENCE_NODE) {
        return tg_keys_type_error(ctx, seq, "keys", "a sequence "
                                  "(\"keys: []\" for none)");
    }

    n = (size_t)(seq->data.sequence.items.top - seq->data.sequence.items.start);
    if (n == 0) {
        return TG_OK;
    }
    keys->keys = tg_xcalloc(n, sizeof(tg_key));
    keys->pos = tg_xcalloc(n, sizeof(tg_keys_pos));
    keys->mask = tg_keys_table_size(n) - 1;
    keys->slots = tg_xcalloc(keys->mask + 1, sizeof(uint32_t));
    ctx->idmask = keys->mask;
    ctx->ids = tg_xcalloc(ctx->idmask + 1, sizeof(uint32_t));

    for (i = 0; i < n; i++) {
        if (tg_keys_entry(ctx, yaml_document_get_node(&ctx->doc,
                                                      seq->data.sequence.items.start[i]),
                          i) != TG_OK) {
            return TG_ERR;
        }
        if (tg_keys_add(ctx, i) != TG_OK) {
            return TG_ERR;
        }
        keys->n = i + 1;
    }
    return TG_OK;
}

/* One entry of "keys" into keys->keys[idx] and keys->pos[idx]. */
static tg_rc
tg_keys_entry(tg_keys_ctx *ctx, yaml_node_t *map, size_t idx)
{
    tg_key *k = &ctx->keys->keys[idx];
    tg_keys_pos *pos = &ctx->keys->pos[idx];
    yaml_node_pair_t *pair;
    yaml_node_t *val;
    const char *kname, *s;
    char path[TG_KEYS_PATHLEN], child[TG_KEYS_PATHLEN];
    int seen[TG_KEYS_NFIELDS] = { 0 };
    size_t f;

    snprintf(path, sizeof(path), "keys[%zu]", idx);
    if (map->type != YAML_MAPPING_NODE) {
        return tg_keys_type_error(ctx, map, path, "a mapping "
                                  "{ id: ..., tier: ..., sha256: ... }");
    }
    k->enabled = 1;

    for (pair = map->data.mapping.pairs.start; pair < map->data.mapping.pairs.top;
         pair++) {
        kname = tg_keys_map_key(ctx, map, pair, path, child);
        if (kname == NULL) {
            return TG_ERR;
        }
        for (f = 0; f < TG_KEYS_NFIELDS; f++) {
            if (strcmp(kname, tg_keys_fields[f]) == 0) {
                break;
            }
        }
        if (f == TG_KEYS_NFIELDS) {
            return tg_keys_unknown(ctx, pair, child, "id, tier, sha256 or enabled");
        }
        seen[f] = 1;
        val = yaml_document_get_node(&ctx->doc, pair->value);

        switch (f) {
        case TG_KEYS_F_ID:
            pos->id = val->start_mark;
            if (tg_keys_name(ctx, val, child, "id", "A-Za-z0-9._-",
                             TG_KEY_ID_MAX, tg_keys_id_char, k->id) != TG_OK) {
                return TG_ERR;
            }
            break;
        case TG_KEYS_F_TIER:
            pos->tier = val->start_mark;
            if (tg_keys_name(ctx, val, child, "tier", "a-z0-9_-",
                             TG_TIER_MAX, tg_keys_tier_char, k->tier) != TG_OK) {
                return TG_ERR;
            }
            break;
        case TG_KEYS_F_SHA256:
            pos->sha256 = val->start_mark;
            s = tg_keys_scalar(ctx, val, child, "64 hex digits (a SHA-256)");
            if (s == NULL) {
                return TG_ERR;
            }
            /* The value is never quoted back: it may be a clear key. */
            if (val->data.scalar.length != 64) {
                return tg_keys_error(ctx, val->start_mark, child, "expected 64 "
                                     "hex digits (the SHA-256 of the key, "
                                     "printf %%s KEY | sha256sum), got %zu "
                                     "characters", val->data.scalar.length);
            }
            if (tg_keys_unhex(s, 64, k->sha256) != TG_OK) {
                size_t bad = 0;
                while (OPENSSL_hexchar2int((unsigned char)s[bad]) >= 0) {
                    bad++;
                }
                return tg_keys_error(ctx, val->start_mark, child, "expected 64 "
                                     "hex digits, character %zu is not a hex "
                                     "digit", bad + 1);
            }
            break;
        default:
            s = (const char *)val->data.scalar.value;
            if (val->type != YAML_SCALAR_NODE ||
                val->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) {
                return tg_keys_type_error(ctx, val, child, "a bool (true or false)");
            }
            /* YAML 1.2 core booleans, as conf.c: "yes"/"on"/1 are not. */
            if (strcmp(s, "true") == 0 || strcmp(s, "True") == 0 ||
                strcmp(s, "TRUE") == 0) {
                k->enabled = 1;
            } else if (strcmp(s, "false") == 0 || strcmp(s, "False") == 0 ||
                       strcmp(s, "FALSE") == 0) {
                k->enabled = 0;
            } else {
                return tg_keys_type_error(ctx, val, child, "a bool (true or false)");
            }
            break;
        }
    }

    for (f = 0; f < TG_KEYS_F_ENABLED; f++) {
        if (!seen[f]) {
            return tg_keys_error(ctx, map->start_mark, path, "missing required "
                                 "key \"%s\"", tg_keys_fields[f]);
        }
    }
    return TG_OK;
}

static uint64_t
tg_keys_id_hash(const char *s)
{
    uint64_t h = 14695981039346656037ULL;   /* FNV-1a */

    for (; *s != '\0'; s++) {
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    }
    return h;
}

/* Insert keys[idx] into the id set and the digest table; a duplicate of
 * either is an error at the mark of the second occurrence. */
static tg_rc
tg_keys_add(tg_keys_ctx *ctx, size_t idx)
{
    struct tg_keys *keys = ctx->keys;
    const tg_key *k = &keys->keys[idx];
    const tg_keys_pos *first;
    char path[TG_KEYS_PATHLEN];
    size_t i;
    uint32_t s;

    for (i = tg_keys_id_hash(k->id) & ctx->idmask;; i = (i + 1) & ctx->idmask) {
        s = ctx->ids[i];
        if (s == 0) {
            ctx->ids[i] = (uint32_t)idx + 1;
            break;
        }
        if (strcmp(keys->keys[s - 1].id, k->id) == 0) {
            first = &keys->pos[s - 1];
            snprintf(path, sizeof(path), "keys[%zu].id", idx);
            return tg_keys_error(ctx, keys->pos[idx].id, path, "duplicate id "
                                 "\"%s\" (first at keys[%u], %zu:%zu)", k->id,
                                 s - 1, first->id.line + 1, first->id.column + 1);
        }
    }

    for (i = tg_keys_digest_hash(k->sha256) & keys->mask;; i = (i + 1) & keys->mask) {
        s = keys->slots[i];
        if (s == 0) {
            keys->slots[i] = (uint32_t)idx + 1;
            return TG_OK;
        }
        if (memcmp(keys->keys[s - 1].sha256, k->sha256, 32) == 0) {
            first = &keys->pos[s - 1];
            snprintf(path, sizeof(path), "keys[%zu].sha256", idx);
            return tg_keys_error(ctx, keys->pos[idx].sha256, path, "duplicate "
                                 "sha256: the same key as \"%s\" (keys[%u], "
                                 "%zu:%zu)", keys->keys[s - 1].id, s - 1,
                                 first->sha256.line + 1, first->sha256.column + 1);
        }
    }
}

/* ---- helpers ----------------------------------------------------------- */

/* A non-null scalar of any style, as text, or NULL after an error. */
static const char *
tg_keys_scalar(tg_keys_ctx *ctx, yaml_node_t *node, const char *path,
               const char *expected)
{
    if (node->type != YAML_SCALAR_NODE || tg_yaml_is_null(node)) {
        tg_keys_type_error(ctx, node, path, expected);
        return NULL;
    }
    if (strlen((const char *)node->data.scalar.value) != node->data.scalar.length) {
        tg_keys_error(ctx, node->start_mark, path, "string contains a NUL byte");
        return NULL;
    }
    return (const char *)node->data.scalar.value;
}

/* An id or tier: 1..max characters for which ok() holds, into out[max+1].
 * The value is not quoted back whole (it may be a misplaced secret). */
static tg_rc
tg_keys_name(tg_keys_ctx *ctx, yaml_node_t *node, const char *path,
             const char *what, const char *charset, size_t max,
             int (*ok)(unsigned char), char *out)
{
    const char *s = tg_keys_scalar(ctx, node, path, "a string");
    size_t len, i;

    if (s == NULL) {
        return TG_ERR;
    }
    len = node->data.scalar.length;
    if (len == 0 || len > max) {
        return tg_keys_error(ctx, node->start_mark, path, "%s must be 1 to %zu "
                             "characters of [%s], got %zu characters", what, max,
                             charset, len);
    }
    for (i = 0; i < len; i++) {
        if (!ok((unsigned char)s[i])) {
            if ((unsigned char)s[i] > 0x20 && (unsigned char)s[i] < 0x7f) {
                return tg_keys_error(ctx, node->start_mark, path, "%s may only "
                                     "contain [%s], got '%c' at character %zu",
                                     what, charset, s[i], i + 1);
            }
            return tg_keys_error(ctx, node->start_mark, path, "%s may only "
                                 "contain [%s], got byte 0x%02x at character %zu",
                                 what, charset, (unsigned char)s[i], i + 1);
        }
    }
    memcpy(out, s, len + 1);
    return TG_OK;
}

static int
tg_keys_id_char(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
           (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

static int
tg_keys_tier_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

static uint64_t
tg_keys_digest_hash(const uint8_t sha256[32])
{
    uint64_t h;

    memcpy(&h, sha256, sizeof(h));
    return h;
}

/* Smallest power of two >= 2n (load <= 0.5), at least 2. */
static size_t
tg_keys_table_size(size_t n)
{
    size_t size = 2;

    while (size < 2 * n) {
        size *= 2;
    }
    return size;
}

static void
tg_keys_free(struct tg_keys *keys)
{
    if (keys == NULL) {
        return;
    }
    free(keys->keys);
    free(keys->slots);
    free(keys->pos);
    free(keys->name);
    free(keys);
}

/* "got ..." part of a wrong-type message: the kind of node, "null", or the
 * scalar quoted when short (a longer one may be a misplaced secret). */
static tg_rc
tg_keys_type_error(tg_keys_ctx *ctx, yaml_node_t *node, const char *path,
                   const char *expected)
{
    char got[TG_KEYS_ECHO_MAX + 48];

    if (node->type == YAML_MAPPING_NODE) {
        snprintf(got, sizeof(got), "a mapping");
    } else if (node->type == YAML_SEQUENCE_NODE) {
        snprintf(got, sizeof(got), "a sequence");
    } else if (tg_yaml_is_null(node)) {
        snprintf(got, sizeof(got), "null");
    } else if (node->data.scalar.length > TG_KEYS_ECHO_MAX ||
               strlen((const char *)node->data.scalar.value) !=
               node->data.scalar.length) {
        snprintf(got, sizeof(got), "a string of %zu characters",
                 node->data.scalar.length);
    } else {
        snprintf(got, sizeof(got), "\"%s\"", (const char *)node->data.scalar.value);
    }
    return tg_keys_error(ctx, node->start_mark, path, "expected %s, got %s",
                         expected, got);
}

static tg_rc
tg_keys_error(tg_keys_ctx *ctx, yaml_mark_t mark, const char *path,
              const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    tg_yaml_verror(ctx->err, ctx->errlen, ctx->name, mark, path, fmt, ap);
    va_end(ap);
    return TG_ERR;
}
