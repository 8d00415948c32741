/*
 * keys.h - API keys: the keys file, lookup by SHA-256, key generation.
 *
 * Keys are never stored or logged in clear: the file holds the hex SHA-256
 * of each key; a presented key is hashed and looked up; digests are compared
 * in constant time.
 */
#ifndef TOLLGATE_KEYS_H
#define TOLLGATE_KEYS_H

#include <stddef.h>
#include <stdint.h>

#include "tollgate/common.h"

/* TG_KEY_ID_MAX and TG_TIER_MAX, and the check of ids and tier names,
 * are in common.h (tg_name_ok): the config checks tier names the same way. */

/* One key of a loaded set (56 bytes): id and tier point into the set,
 * valid as long as it is. */
typedef struct tg_key {
    uint8_t     sha256[32];
    const char *id;                    /* consumer id: [A-Za-z0-9._-], 1..64 */
    const char *tier;                  /* a tier name of rate_limits (interned) */
    int         enabled;
} tg_key;

struct tg_keys;   /* immutable once loaded; shared by threads read-only */

/*
 * Load a keys file:
 *   keys:
 *     - { id: acme, tier: pro, sha256: "<64 hex>", enabled: true }
 * enabled defaults to true.  Files up to 512 MiB (about 4M keys in the
 * one-line form above, which loads fastest).  Errors are "FILE:LINE:COL: what" (unknown key,
 * duplicate key, wrong type, bad hex, duplicate id or sha256, missing field).
 * Tier names are NOT checked here (tg_keys_check_tiers does it).
 */
struct tg_keys *tg_keys_load(const char *path, char *err, size_t errlen);
struct tg_keys *tg_keys_load_string(const char *name, const char *text, size_t len,
                                    char *err, size_t errlen);
void tg_keys_destroy(struct tg_keys *keys);
/* Shared ownership across threads (reload): a loaded set has one
 * reference; the last tg_keys_unref frees it.  NULL is accepted. */
struct tg_keys *tg_keys_ref(struct tg_keys *keys);
void tg_keys_unref(struct tg_keys *keys);
size_t tg_keys_count(const struct tg_keys *keys);
/* Bytes held by a loaded set (entries, index, ids, tiers): what resident
 * memory grows by when it is loaded, and shrinks by when it is freed. */
size_t tg_keys_memory(const struct tg_keys *keys);

/* Every key's tier must be one of names[0..n); else TG_ERR and a message
 * naming the key id and its tier. */
tg_rc tg_keys_check_tiers(const struct tg_keys *keys, const char *const *names,
                          size_t n, char *err, size_t errlen);

/* SHA-256 of the presented key (raw bytes, len). */
void tg_keys_hash(const char *key, size_t len, uint8_t out[32]);

/* Lookup by digest, constant-time compare of the digest.  NULL if none. */
const tg_key *tg_keys_find(const struct tg_keys *keys, const uint8_t sha256[32]);

/* Lower-case hex of a digest into out[65]. */
void tg_keys_hex(const uint8_t sha256[32], char out[65]);
/* Parse 64 hex chars; TG_ERR if not exactly that. */
tg_rc tg_keys_unhex(const char *hex, size_t len, uint8_t out[32]);

/* A new random key ("tg_" + 43 base64url chars, 256 bits from getrandom)
 * into out[64]. */
tg_rc tg_keys_generate(char out[64]);

#endif
