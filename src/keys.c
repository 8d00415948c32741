/*
 * keys.c - the API keys file, lookup by SHA-256, key generation.
 *
 * The file is small in schema but may be large (a million keys, ~130 MB),
 * so it is read by one of two paths into the same compact table:
 *
 *   fast   the one-line flow form that `tollgate keygen` prints and the
 *          shipped file uses,
 *            - { id: acme, tier: pro, sha256: "<64 hex>", enabled: true }
 *          plus blank and comment lines, scanned line by line without
 *          libyaml.  It accepts only text that YAML reads the same way and
 *          that is valid; at the first thing it does not accept (another
 *          YAML form, a tab, a duplicate, a bad value...) it gives up and
 *          the general path reads the whole file again, so every message
 *          comes from one place.
 *   general libyaml, in phases as conf.c, with the same strictness and
 *          messages, "FILE:LINE:COL: keys[3].sha256: what is wrong":
 *          1. structure: scan the events once to reject anchors, aliases
 *             and extra documents at their marks, then load the node tree;
 *          2. parse: walk "keys:" entry by entry, checking each field;
 *             duplicate ids and digests are caught as each entry is added.
 *
 * The table (about 56 + 8..16 + id length + 1 bytes per key, see
 * tg_keys_memory): entries of fixed size in file order (digest, id and
 * tier pointers, enabled); ids packed in an arena; tiers interned (at most
 * TG_KEYS_TIERS_MAX distinct); the digest index is open addressing (linear
 * probing) over a power-of-two array of uint32 indices, load <= 0.5.  The
 * first 8 bytes of a SHA-256 are uniform, so they are the hash.  Full
 * digests are compared with CRYPTO_memcmp.  The large arrays are their own
 * mappings, so that freeing a set (the old one, after a reload) gives its
 * memory back to the system at once.  Once loaded nothing is written:
 * readers share it freely.
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
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <yaml.h>

#include "tollgate/yaml.h"

#define TG_KEYS_MAX_FILE  (512u * 1024 * 1024)  /* ~4M keys, ~320 MB held */
#define TG_KEYS_MAX       (64u * 1024 * 1024)   /* entries: uint32 indices */
#define TG_KEYS_PATHLEN   64                    /* "keys[123456].sha256" */
#define TG_KEYS_ECHO_MAX  32                    /* longest unknown key quoted */
#define TG_KEYS_TIERS_MAX 256                   /* distinct tiers in a file */
#define TG_KEYS_BLOCK     (1u << 20)            /* id arena block */

/* Where a key's id and digest were written, for duplicate messages while
 * loading (general path only). */
typedef struct tg_keys_pos {
    uint32_t     id_line, id_col;
    uint32_t     sha_line, sha_col;
} tg_keys_pos;

/* An interned tier name, and where it first appears (tg_keys_check_tiers:
 * the first key with an unknown tier is the first key of that tier). */
typedef struct tg_keys_tier {
    char         name[TG_TIER_MAX + 1];
    size_t       first;      /* index of its first key */
    uint32_t     line, col;  /* of that key's tier value */
} tg_keys_tier;

struct tg_keys {
    unsigned      extra_refs; /* atomic; references beyond the first (calloc: 0) */
    tg_key       *keys;       /* file order; a mapping of cap entries */
    size_t        n;
    size_t        cap;
    uint32_t     *slots;      /* index + 1 into keys; 0 = empty; a mapping */
    size_t        mask;       /* slots has mask + 1 entries, a power of two */
    char        **blocks;     /* id arena: TG_KEYS_BLOCK-byte mappings */
    size_t        nblocks;
    size_t        bused;      /* bytes used in the last block */
    size_t        idbytes;    /* bytes of ids, NULs included */
    tg_keys_tier *tiers;      /* TG_KEYS_TIERS_MAX; tg_key.tier points in */
    size_t        ntiers;
    char         *name;       /* file name, for tg_keys_check_tiers */
};

/* Why tg_keys_add refused an entry. */
enum { TG_KEYS_DUP_ID = 1, TG_KEYS_DUP_SHA, TG_KEYS_TOO_MANY_TIERS };

typedef struct tg_keys_ctx {
    const char      *name;   /* file name used in messages */
    const char      *text;
    size_t           len;
    yaml_document_t  doc;
    int              have_doc;
    struct tg_keys  *keys;   /* being built; owned until returned */
    uint64_t        *ids;    /* id hash set: index + 1 into keys (low 32
                                bits; 0 = empty), hash (high 32 bits) */
    tg_keys_pos     *pos;    /* general path: cap entries, parallel to keys */
    int              why;    /* TG_KEYS_DUP_* after tg_keys_add failed */
    size_t           first;  /* the earlier entry it duplicates */
    char            *err;
    size_t           errlen;
} tg_keys_ctx;

/* ---- static prototypes ------------------------------------------------- */

static tg_rc tg_keys_fast(tg_keys_ctx *ctx);
static tg_rc tg_keys_structure(tg_keys_ctx *ctx);
static tg_rc tg_keys_top(tg_keys_ctx *ctx, yaml_node_t *root);
static tg_rc tg_keys_entry(tg_keys_ctx *ctx, yaml_node_t *map, size_t idx);
static const char *tg_keys_scalar(tg_keys_ctx *ctx, yaml_node_t *node,
                                  const char *path, const char *expected);
static tg_rc tg_keys_name(tg_keys_ctx *ctx, yaml_node_t *node, const char *path,
                          const char *what, const char *charset, size_t max,
                          int (*ok)(unsigned char), char *out);
static int tg_keys_id_char(unsigned char c);
static int tg_keys_tier_char(unsigned char c);
static void tg_keys_reserve(tg_keys_ctx *ctx, size_t n);
static tg_rc tg_keys_add(tg_keys_ctx *ctx, const uint8_t sha256[32],
                         const char *id, size_t idlen, const char *tier,
                         size_t tierlen, int enabled, uint32_t tline,
                         uint32_t tcol);
static void tg_keys_finish(tg_keys_ctx *ctx);
static void tg_keys_ctx_reset(tg_keys_ctx *ctx);
static uint64_t tg_keys_digest_hash(const uint8_t sha256[32]);
static void *tg_keys_map(size_t size);
static void tg_keys_unmap(void *p, size_t size);
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

/* Characters of an id ([A-Za-z0-9._-]), by byte value (0x80.. are 0). */
static const unsigned char tg_keys_id_chars[128] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0,
    0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1,
    0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
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
    tg_rc rc;

    memset(&ctx, 0, sizeof(ctx));
    ctx.name = name;
    ctx.text = text;
    ctx.len = len;
    ctx.err = err;
    ctx.errlen = errlen;
    if (errlen > 0) {
        err[0] = '\0';
    }

    tg_keys_ctx_reset(&ctx);
    rc = tg_keys_fast(&ctx);
    if (rc != TG_OK) {
        tg_keys_ctx_reset(&ctx);         /* not the fast form: start over */
        rc = tg_keys_structure(&ctx);
        if (rc == TG_OK) {
            root = yaml_document_get_root_node(&ctx.doc);
            rc = tg_keys_top(&ctx, root);
        }
        if (ctx.have_doc) {
            yaml_document_delete(&ctx.doc);
        }
    }
    tg_keys_finish(&ctx);
    if (rc != TG_OK) {
        tg_keys_free(ctx.keys);
        return NULL;
    }
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

/* Bytes the set holds: entries, index, ids (whole blocks but the last),
 * tiers and the header.  Pages of a mapping not yet touched are not
 * counted by the system either, so this is what RSS grows by. */
size_t
tg_keys_memory(const struct tg_keys *keys)
{
    size_t b;

    if (keys == NULL) {
        return 0;
    }
    b = sizeof(*keys) + keys->n * sizeof(tg_key);
    b += keys->slots != NULL ? (keys->mask + 1) * sizeof(uint32_t) : 0;
    if (keys->nblocks > 0) {
        b += (keys->nblocks - 1) * TG_KEYS_BLOCK + keys->bused;
    }
    b += keys->nblocks * sizeof(char *);
    b += keys->tiers != NULL ? TG_KEYS_TIERS_MAX * sizeof(tg_keys_tier) : 0;
    return b;
}

/*
 * The first key (file order) whose tier is not in names[0..n) fails the
 * check, at the mark of its tier value, naming the key id and tier.  Tiers
 * are interned in the order they first appear, so the first unknown one is
 * that key's.
 */
tg_rc
tg_keys_check_tiers(const struct tg_keys *keys, const char *const *names,
                    size_t n, char *err, size_t errlen)
{
    const tg_keys_tier *t;
    size_t i, j, off;
    int w;

    if (keys == NULL) {
        return TG_OK;
    }
    for (i = 0; i < keys->ntiers; i++) {
        t = &keys->tiers[i];
        for (j = 0; j < n; j++) {
            if (strcmp(t->name, names[j]) == 0) {
                break;
            }
        }
        if (j < n) {
            continue;
        }
        if (errlen == 0) {
            return TG_ERR;
        }
        w = snprintf(err, errlen, "%s:%u:%u: keys[%zu].tier: key \"%s\" has "
                     "tier \"%s\", which is not a tier of rate_limits (",
                     keys->name, t->line + 1, t->col + 1, t->first,
                     keys->keys[t->first].id, t->name);
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

/* Once per request with a key: the low-level SHA-256 (deprecated in
 * OpenSSL 3, not removed) on the stack, because the one-shot SHA256()
 * there fetches the algorithm and allocates two contexts each call: 3
 * mallocs and ~1 us, against ~0.15 us for the same digest. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
void
tg_keys_hash(const char *key, size_t len, uint8_t out[32])
{
    SHA256_CTX c;

    SHA256_Init(&c);
    SHA256_Update(&c, key, len);
    SHA256_Final(out, &c);
}
#pragma GCC diagnostic pop

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

/* Either case is accepted: sha256sum writes lower, some tools upper.
 * Without branches on the digits (random hex mispredicts every other
 * one): the value of a hex digit c is (c & 0xf) + 9 * (c >> 6). */
tg_rc
tg_keys_unhex(const char *hex, size_t len, uint8_t out[32])
{
    unsigned bad = 0, c, v[2];
    size_t i, j;

    if (hex == NULL || len != 64) {
        return TG_ERR;
    }
    for (i = 0; i < 32; i++) {
        for (j = 0; j < 2; j++) {
            c = (unsigned char)hex[2 * i + j];
            bad |= !((c - '0' < 10u) | ((c | 0x20) - 'a' < 6u));
            v[j] = (c & 0xf) + 9 * (c >> 6);
        }
        out[i] = (uint8_t)(v[0] << 4 | v[1]);
    }
    return bad ? TG_ERR : TG_OK;
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
    if (n > TG_KEYS_MAX) {
        return tg_keys_error(ctx, seq->start_mark, "keys", "more than %u keys",
                             TG_KEYS_MAX);
    }
    tg_keys_reserve(ctx, n);
    ctx->pos = tg_xcalloc(n, sizeof(tg_keys_pos));

    for (i = 0; i < n; i++) {
        if (tg_keys_entry(ctx, yaml_document_get_node(&ctx->doc,
                                                      seq->data.sequence.items.start[i]),
                          i) != TG_OK) {
            return TG_ERR;
        }
    }
    return TG_OK;
}

/* One entry of "keys" into the set as keys[idx], its marks into
 * ctx->pos[idx]. */
static tg_rc
tg_keys_entry(tg_keys_ctx *ctx, yaml_node_t *map, size_t idx)
{
    struct tg_keys *keys = ctx->keys;
    tg_keys_pos *pos = &ctx->pos[idx];
    tg_key kv, *k = &kv;
    yaml_node_pair_t *pair;
    yaml_node_t *val;
    yaml_mark_t tmark, mark;
    const char *kname, *s;
    char path[TG_KEYS_PATHLEN], child[TG_KEYS_PATHLEN];
    char id[TG_KEY_ID_MAX + 1], tier[TG_TIER_MAX + 1];
    int seen[TG_KEYS_NFIELDS] = { 0 };
    size_t f, first;

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
            pos->id_line = (uint32_t)val->start_mark.line;
            pos->id_col = (uint32_t)val->start_mark.column;
            if (tg_keys_name(ctx, val, child, "id", "A-Za-z0-9._-",
                             TG_KEY_ID_MAX, tg_keys_id_char, id) != TG_OK) {
                return TG_ERR;
            }
            break;
        case TG_KEYS_F_TIER:
            tmark = val->start_mark;
            if (tg_keys_name(ctx, val, child, "tier", "a-z0-9_-",
                             TG_TIER_MAX, tg_keys_tier_char, tier) != TG_OK) {
                return TG_ERR;
            }
            break;
        case TG_KEYS_F_SHA256:
            pos->sha_line = (uint32_t)val->start_mark.line;
            pos->sha_col = (uint32_t)val->start_mark.column;
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
            if (tg_keys_unhex(s, 64, kv.sha256) != TG_OK) {
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

    if (tg_keys_add(ctx, kv.sha256, id, strlen(id), tier, strlen(tier),
                    kv.enabled, (uint32_t)tmark.line, (uint32_t)tmark.column)
        == TG_OK) {
        return TG_OK;
    }
    first = ctx->first;
    memset(&mark, 0, sizeof(mark));
    switch (ctx->why) {
    case TG_KEYS_DUP_ID:
        mark.line = pos->id_line;
        mark.column = pos->id_col;
        snprintf(path, sizeof(path), "keys[%zu].id", idx);
        return tg_keys_error(ctx, mark, path, "duplicate id \"%s\" (first at "
                             "keys[%zu], %u:%u)", id, first,
                             ctx->pos[first].id_line + 1,
                             ctx->pos[first].id_col + 1);
    case TG_KEYS_DUP_SHA:
        mark.line = pos->sha_line;
        mark.column = pos->sha_col;
        snprintf(path, sizeof(path), "keys[%zu].sha256", idx);
        return tg_keys_error(ctx, mark, path, "duplicate sha256: the same key "
                             "as \"%s\" (keys[%zu], %u:%u)",
                             keys->keys[first].id, first,
                             ctx->pos[first].sha_line + 1,
                             ctx->pos[first].sha_col + 1);
    default:
        snprintf(path, sizeof(path), "keys[%zu].tier", idx);
        return tg_keys_error(ctx, tmark, path, "more than %u distinct tiers",
                             TG_KEYS_TIERS_MAX);
    }
}

/* ---- fast path: the one-line flow form --------------------------------- */

/* A field value: plain ([A-Za-z0-9] then [A-Za-z0-9._-]*) or double-quoted
 * ([A-Za-z0-9._-]*, so no escapes): both read by YAML as that text. */
typedef struct tg_keys_tok {
    const char  *s;
    size_t       len;
    int          plain;
    uint32_t     col;
} tg_keys_tok;

static const char *
tg_keys_fast_spaces(const char *p, const char *eol)
{
    while (p < eol && *p == ' ') {
        p++;
    }
    return p;
}

/* Nothing, or a comment of printable ASCII, from p to eol. */
static int
tg_keys_fast_comment(const char *p, const char *eol)
{
    if (p < eol && *p != '#') {
        return 0;
    }
    for (; p < eol; p++) {
        if ((unsigned char)*p < 0x20 || (unsigned char)*p > 0x7e) {
            return 0;
        }
    }
    return 1;
}

/* The end of a line after a token: nothing, or spaces and then nothing or
 * a comment. */
static int
tg_keys_fast_rest(const char *p, const char *eol)
{
    if (p == eol) {
        return 1;
    }
    return *p == ' ' && tg_keys_fast_comment(tg_keys_fast_spaces(p, eol), eol);
}

static int
tg_keys_fast_value(const char **pp, const char *eol, const char *bol,
                   tg_keys_tok *tok)
{
    const char *p = *pp, *q;

    tok->col = (uint32_t)(p - bol);
    if (p < eol && *p == '"') {
        for (q = ++p; p < eol && tg_keys_id_char((unsigned char)*p); p++) {
        }
        if (p == eol || *p != '"') {
            return 0;
        }
        tok->plain = 0;
        tok->s = q;
        tok->len = (size_t)(p - q);
        *pp = p + 1;
        return 1;
    }
    if (p == eol || !((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') ||
                      (*p >= 'A' && *p <= 'Z'))) {
        return 0;
    }
    for (q = p; p < eol && tg_keys_id_char((unsigned char)*p); p++) {
    }
    tok->plain = 1;
    tok->s = q;
    tok->len = (size_t)(p - q);
    *pp = p;
    return 1;
}

/* A plain "null" is YAML's null, not a name. */
static int
tg_keys_fast_null(const tg_keys_tok *t)
{
    return t->plain && t->len == 4 && (memcmp(t->s, "null", 4) == 0 ||
                                       memcmp(t->s, "Null", 4) == 0 ||
                                       memcmp(t->s, "NULL", 4) == 0);
}

static int
tg_keys_fast_word(const tg_keys_tok *t, const char *w)
{
    return t->len == strlen(w) && memcmp(t->s, w, t->len) == 0;
}

/* "- { id: V, tier: V, sha256: V, enabled: B }" from p (its "-") to eol,
 * added to the set; TG_AGAIN for anything else or anything wrong. */
static tg_rc
tg_keys_fast_entry(tg_keys_ctx *ctx, const char *p, const char *eol,
                   const char *bol, uint32_t line)
{
    tg_keys_tok v[TG_KEYS_NFIELDS], *t;
    int seen[TG_KEYS_NFIELDS] = { 0 }, enabled = 1;
    uint8_t sha256[32];
    const char *q;
    size_t f, i;

    if (eol - p < 2 || p[0] != '-' || p[1] != ' ') {
        return TG_AGAIN;
    }
    p = tg_keys_fast_spaces(p + 1, eol);
    if (p == eol || *p != '{') {
        return TG_AGAIN;
    }
    p = tg_keys_fast_spaces(p + 1, eol);
    for (;;) {
        for (q = p; p < eol && ((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9'));
             p++) {
        }
        for (f = 0; f < TG_KEYS_NFIELDS; f++) {
            if (strlen(tg_keys_fields[f]) == (size_t)(p - q) &&
                memcmp(tg_keys_fields[f], q, (size_t)(p - q)) == 0) {
                break;
            }
        }
        if (f == TG_KEYS_NFIELDS || seen[f] || eol - p < 2 || p[0] != ':' ||
            p[1] != ' ') {
            return TG_AGAIN;
        }
        seen[f] = 1;
        p = tg_keys_fast_spaces(p + 1, eol);
        if (!tg_keys_fast_value(&p, eol, bol, &v[f])) {
            return TG_AGAIN;
        }
        p = tg_keys_fast_spaces(p, eol);
        if (p < eol && *p == ',') {
            p = tg_keys_fast_spaces(p + 1, eol);
            continue;
        }
        if (p < eol && *p == '}') {
            p++;
            break;
        }
        return TG_AGAIN;
    }
    if (!tg_keys_fast_rest(p, eol) || !seen[TG_KEYS_F_ID] ||
        !seen[TG_KEYS_F_TIER] || !seen[TG_KEYS_F_SHA256]) {
        return TG_AGAIN;
    }

    t = &v[TG_KEYS_F_ID];            /* charset checked by tg_keys_fast_value */
    if (t->len == 0 || t->len > TG_KEY_ID_MAX || tg_keys_fast_null(t)) {
        return TG_AGAIN;
    }
    t = &v[TG_KEYS_F_TIER];
    if (t->len == 0 || t->len > TG_TIER_MAX || tg_keys_fast_null(t)) {
        return TG_AGAIN;
    }
    for (i = 0; i < t->len; i++) {
        if (!tg_keys_tier_char((unsigned char)t->s[i])) {
            return TG_AGAIN;
        }
    }
    t = &v[TG_KEYS_F_SHA256];
    if (tg_keys_unhex(t->s, t->len, sha256) != TG_OK) {
        return TG_AGAIN;
    }
    if (seen[TG_KEYS_F_ENABLED]) {
        t = &v[TG_KEYS_F_ENABLED];
        if (t->plain && (tg_keys_fast_word(t, "true") || tg_keys_fast_word(t, "True") ||
                         tg_keys_fast_word(t, "TRUE"))) {
            enabled = 1;
        } else if (t->plain && (tg_keys_fast_word(t, "false") ||
                                tg_keys_fast_word(t, "False") ||
                                tg_keys_fast_word(t, "FALSE"))) {
            enabled = 0;
        } else {
            return TG_AGAIN;
        }
    }
    if (tg_keys_add(ctx, sha256, v[TG_KEYS_F_ID].s, v[TG_KEYS_F_ID].len,
                    v[TG_KEYS_F_TIER].s, v[TG_KEYS_F_TIER].len, enabled, line,
                    v[TG_KEYS_F_TIER].col) != TG_OK) {
        return TG_AGAIN;
    }
    return TG_OK;
}

/*
 * The whole text in the fast form, or TG_AGAIN (nothing reported) at the
 * first line it does not take.  Lines: blank; comment ("#" after spaces,
 * printable ASCII); "keys:" at column 0, once, before any entry; entries,
 * one per line at one indentation, fields in any order, spaces (not tabs)
 * around the punctuation, an optional comment after.  Valid and nothing
 * else: an error of any kind is left to the general path to report.
 */
static tg_rc
tg_keys_fast(tg_keys_ctx *ctx)
{
    const char *p = ctx->text, *end = ctx->text + ctx->len, *eol, *q;
    size_t nlines = 1, indent = SIZE_MAX;
    uint32_t line;
    int have_keys = 0;

    for (q = p; (q = memchr(q, '\n', (size_t)(end - q))) != NULL; q++) {
        nlines++;
    }
    if (nlines > TG_KEYS_MAX) {
        return TG_AGAIN;
    }
    for (line = 0; p < end; p = eol + 1, line++) {
        eol = memchr(p, '\n', (size_t)(end - p));
        if (eol == NULL) {
            eol = end;
        }
        q = tg_keys_fast_spaces(p, eol);
        if (q == eol || *q == '#') {
            if (!tg_keys_fast_comment(q, eol)) {
                return TG_AGAIN;
            }
        } else if (!have_keys) {
            if (q != p || eol - q < 5 || memcmp(q, "keys:", 5) != 0 ||
                !tg_keys_fast_rest(q + 5, eol)) {
                return TG_AGAIN;
            }
            have_keys = 1;
            tg_keys_reserve(ctx, nlines);
        } else {
            if (indent == SIZE_MAX) {
                indent = (size_t)(q - p);
            }
            if ((size_t)(q - p) != indent ||
                tg_keys_fast_entry(ctx, q, eol, p, line) != TG_OK) {
                return TG_AGAIN;
            }
        }
        if (eol == end) {
            break;
        }
    }
    return have_keys && ctx->keys->n > 0 ? TG_OK : TG_AGAIN;
}

/* ---- the table --------------------------------------------------------- */

/* Begin an empty set, dropping what a failed fast pass built. */
static void
tg_keys_ctx_reset(tg_keys_ctx *ctx)
{
    tg_keys_finish(ctx);
    tg_keys_free(ctx->keys);
    ctx->keys = tg_xcalloc(1, sizeof(struct tg_keys));
    ctx->keys->name = tg_xstrdup(ctx->name);
}

/* Room for n keys: entries, the digest index and the id set (load <= 0.5),
 * the tiers.  Once per set. */
static void
tg_keys_reserve(tg_keys_ctx *ctx, size_t n)
{
    struct tg_keys *keys = ctx->keys;
    size_t size = 2;

    while (size < 2 * n) {
        size *= 2;
    }
    keys->cap = n;
    keys->keys = tg_keys_map(n * sizeof(tg_key));
    keys->mask = size - 1;
    keys->slots = tg_keys_map(size * sizeof(uint32_t));
    ctx->ids = tg_keys_map(size * sizeof(uint64_t));
    keys->tiers = tg_xcalloc(TG_KEYS_TIERS_MAX, sizeof(tg_keys_tier));
}

static uint64_t
tg_keys_id_hash(const char *s, size_t len)
{
    uint64_t h = 14695981039346656037ULL;   /* FNV-1a */
    size_t i;

    for (i = 0; i < len; i++) {
        h = (h ^ (unsigned char)s[i]) * 1099511628211ULL;
    }
    return h;
}

/* A copy of id[0..len) and a NUL in the arena; blocks never move. */
static const char *
tg_keys_store_id(struct tg_keys *keys, const char *id, size_t len)
{
    char *p;

    if (keys->nblocks == 0 || keys->bused + len + 1 > TG_KEYS_BLOCK) {
        keys->blocks = tg_xrealloc(keys->blocks, (keys->nblocks + 1) * sizeof(char *));
        keys->blocks[keys->nblocks++] = tg_keys_map(TG_KEYS_BLOCK);
        keys->bused = 0;
    }
    p = keys->blocks[keys->nblocks - 1] + keys->bused;
    memcpy(p, id, len);
    p[len] = '\0';
    keys->bused += len + 1;
    keys->idbytes += len + 1;
    return p;
}

/*
 * Append a key (room reserved).  A duplicate id or digest, or one tier too
 * many, is refused with ctx->why and ctx->first (the earlier entry) set,
 * and nothing added.
 */
static tg_rc
tg_keys_add(tg_keys_ctx *ctx, const uint8_t sha256[32], const char *id,
            size_t idlen, const char *tier, size_t tierlen, int enabled,
            uint32_t tline, uint32_t tcol)
{
    struct tg_keys *keys = ctx->keys;
    size_t idx = keys->n, i, t;
    uint64_t h = tg_keys_id_hash(id, idlen), tag = h & 0xffffffff00000000ULL, *idslot;
    uint32_t s, *shaslot;
    tg_keys_tier *tt;
    tg_key *k;

    for (i = h & keys->mask;; i = (i + 1) & keys->mask) {
        s = (uint32_t)ctx->ids[i];
        if (s == 0) {
            idslot = &ctx->ids[i];
            break;
        }
        if ((ctx->ids[i] & 0xffffffff00000000ULL) == tag &&
            strncmp(keys->keys[s - 1].id, id, idlen) == 0 &&
            keys->keys[s - 1].id[idlen] == '\0') {
            ctx->why = TG_KEYS_DUP_ID;
            ctx->first = s - 1;
            return TG_ERR;
        }
    }
    for (i = tg_keys_digest_hash(sha256) & keys->mask;; i = (i + 1) & keys->mask) {
        s = keys->slots[i];
        if (s == 0) {
            shaslot = &keys->slots[i];
            break;
        }
        if (memcmp(keys->keys[s - 1].sha256, sha256, 32) == 0) {
            ctx->why = TG_KEYS_DUP_SHA;
            ctx->first = s - 1;
            return TG_ERR;
        }
    }
    for (t = 0; t < keys->ntiers; t++) {
        tt = &keys->tiers[t];
        if (strncmp(tt->name, tier, tierlen) == 0 && tt->name[tierlen] == '\0') {
            break;
        }
    }
    if (t == keys->ntiers) {
        if (t == TG_KEYS_TIERS_MAX) {
            ctx->why = TG_KEYS_TOO_MANY_TIERS;
            return TG_ERR;
        }
        tt = &keys->tiers[keys->ntiers++];
        memcpy(tt->name, tier, tierlen);
        tt->name[tierlen] = '\0';
        tt->first = idx;
        tt->line = tline;
        tt->col = tcol;
    }

    k = &keys->keys[idx];
    memcpy(k->sha256, sha256, 32);
    k->id = tg_keys_store_id(keys, id, idlen);
    k->tier = keys->tiers[t].name;
    k->enabled = enabled;
    *idslot = tag | ((uint64_t)idx + 1);
    *shaslot = (uint32_t)idx + 1;
    keys->n++;
    return TG_OK;
}

static size_t
tg_keys_page_round(size_t n)
{
    size_t page = (size_t)sysconf(_SC_PAGESIZE);

    return (n + page - 1) / page * page;
}

/*
 * End of a load: drop the id set and the marks; give back the entries
 * reserved but not used, and size the index for the keys there are (the
 * fast path reserves one entry per line, comments included).
 */
static void
tg_keys_finish(tg_keys_ctx *ctx)
{
    struct tg_keys *keys = ctx->keys;
    size_t used, have, size, i, j;
    uint32_t *slots;

    if (ctx->ids != NULL) {
        tg_keys_unmap(ctx->ids, (keys->mask + 1) * sizeof(uint64_t));
        ctx->ids = NULL;
    }
    free(ctx->pos);
    ctx->pos = NULL;
    if (keys == NULL || keys->keys == NULL) {
        return;
    }
    used = tg_keys_page_round(keys->n * sizeof(tg_key));
    have = tg_keys_page_round(keys->cap * sizeof(tg_key));
    if (used < have) {
        munmap((char *)keys->keys + used, have - used);
        keys->cap = used / sizeof(tg_key);
        if (used == 0) {
            keys->keys = NULL;
        }
    }
    for (size = 2; size < 2 * keys->n; size *= 2) {
    }
    if (size >= keys->mask + 1) {
        return;
    }
    slots = tg_keys_map(size * sizeof(uint32_t));
    for (i = 0; i < keys->n; i++) {
        for (j = tg_keys_digest_hash(keys->keys[i].sha256) & (size - 1);
             slots[j] != 0; j = (j + 1) & (size - 1)) {
        }
        slots[j] = (uint32_t)i + 1;
    }
    tg_keys_unmap(keys->slots, (keys->mask + 1) * sizeof(uint32_t));
    keys->slots = slots;
    keys->mask = size - 1;
}

static void *
tg_keys_map(size_t size)
{
    void *p = mmap(NULL, size ? size : 1, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (p == MAP_FAILED) {
        fprintf(stderr, "tollgate: out of memory mapping %zu bytes\n", size);
        abort();
    }
    return p;
}

static void
tg_keys_unmap(void *p, size_t size)
{
    if (p != NULL) {
        munmap(p, size ? size : 1);
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
    return c < 128 && tg_keys_id_chars[c];
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

static void
tg_keys_free(struct tg_keys *keys)
{
    size_t i;

    if (keys == NULL) {
        return;
    }
    tg_keys_unmap(keys->keys, keys->cap * sizeof(tg_key));
    if (keys->slots != NULL) {
        tg_keys_unmap(keys->slots, (keys->mask + 1) * sizeof(uint32_t));
    }
    for (i = 0; i < keys->nblocks; i++) {
        tg_keys_unmap(keys->blocks[i], TG_KEYS_BLOCK);
    }
    free(keys->blocks);
    free(keys->tiers);
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
