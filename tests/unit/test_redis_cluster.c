/*
 * test_redis_cluster.c - unit tests of the pure part of src/redis_cluster.c:
 * the key slot (CRC16-XMODEM of the hash tag, mod 16384), with the
 * vectors of the Redis Cluster specification and against a bit-by-bit
 * CRC16 written here from the polynomial (not the module's table).
 */
#include <criterion/criterion.h>

#include <stdint.h>
#include <string.h>

#include "tollgate/redis.h"

static unsigned
slot(const char *key)
{
    return tg_redis_key_slot(key, strlen(key));
}

/* CRC16-CCITT (XMODEM): poly 0x1021, init 0, no reflection, bit by bit. */
static uint16_t
crc16_bitwise(const unsigned char *p, size_t len)
{
    uint16_t crc = 0;

    for (size_t i = 0; i < len; i++) {
        crc ^= (uint16_t)(p[i] << 8);
        for (int b = 0; b < 8; b++) {
            crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
        }
    }
    return crc;
}

Test(redis_cluster, crc16_spec_vector)
{
    /* the specification's check value: crc16("123456789") = 0x31C3 */
    cr_assert_eq(crc16_bitwise((const unsigned char *)"123456789", 9), 0x31C3);
    cr_assert_eq(slot("123456789"), 0x31C3u & 16383u);
    cr_assert_eq(slot("123456789"), 12739u);
}

/* CLUSTER KEYSLOT answers of a real Redis. */
Test(redis_cluster, known_slots)
{
    cr_expect_eq(slot("foo"), 12182u);
    cr_expect_eq(slot("bar"), 5061u);
    cr_expect_eq(slot("hello"), 866u);
    cr_expect_eq(slot("user1000"), 3443u);
    cr_expect_eq(slot(""), 0u);
}

Test(redis_cluster, hash_tags)
{
    /* the spec's examples */
    cr_expect_eq(slot("{user1000}.following"), slot("{user1000}.followers"));
    cr_expect_eq(slot("{user1000}.following"), slot("user1000"));
    cr_expect_eq(slot("foo{}{bar}"), 8363u, "an empty tag: the whole key");
    cr_expect_neq(slot("foo{}{bar}"), slot("bar"));
    cr_expect_eq(slot("foo{{bar}}zap"), slot("{bar"), "from the first { to the first }");
    cr_expect_eq(slot("foo{{bar}}zap"), 4015u);
    cr_expect_eq(slot("foo{bar}{zap}"), slot("bar"), "the first tag only");
    /* no closing brace, a lone }, a } before the {: the whole key */
    cr_expect_eq(slot("a{b"), 13340u);
    cr_expect_eq(slot("{}"), 15257u);
    cr_expect_eq(slot("}{a}"), slot("a"));
    /* tollgate's bucket keys: all of one key's buckets in one slot */
    cr_expect_eq(slot("tg:{k1}:t"), slot("tg:{k1}:route:3"));
    cr_expect_eq(slot("tg:{k1}:t"), slot("k1"));
    /* the tags the Cluster tests use to reach each master of a default
     * 3-master cluster (0-5460, 5461-10922, 10923-16383); {d} shares
     * {a}'s range */
    cr_expect_eq(slot("{b}"), 3300u);
    cr_expect_eq(slot("{c}"), 7365u);
    cr_expect_eq(slot("{a}"), 15495u);
    cr_expect_eq(slot("{d}"), 11298u);
}

/* len, not the NUL, bounds the key: a tag past len is not seen, and
 * bytes after a NUL inside len count. */
Test(redis_cluster, length_not_nul)
{
    const char key[] = "x{ab}y";
    const char bin[] = { 'a', '\0', '{', 'b', '}' };

    cr_expect_eq(tg_redis_key_slot(key, 3), tg_redis_key_slot("x{a", 3));
    cr_expect_eq(tg_redis_key_slot(key, 4), slot("x{ab"), "no } within len");
    cr_expect_eq(tg_redis_key_slot(key, 5), slot("ab"));
    cr_expect_eq(tg_redis_key_slot(bin, sizeof(bin)), slot("b"));
    cr_expect_eq(tg_redis_key_slot(bin, 2),
                 crc16_bitwise((const unsigned char *)bin, 2) & 16383u);
}

/* Random keys (no braces, and with tags) against the bitwise CRC16. */
Test(redis_cluster, table_matches_bitwise_crc)
{
    uint32_t seed = 12345;
    unsigned char key[64];

    for (int i = 0; i < 20000; i++) {
        size_t len = 0, n;
        seed = seed * 1103515245u + 12345u;
        n = (seed >> 16) % sizeof(key);
        for (len = 0; len < n; len++) {
            seed = seed * 1103515245u + 12345u;
            key[len] = (unsigned char)(seed >> 16);
            if (key[len] == '{' || key[len] == '}') {
                key[len] = 'x';
            }
        }
        cr_assert_eq(tg_redis_key_slot((const char *)key, len),
                     crc16_bitwise(key, len) & 16383u, "key %d (%zu bytes)", i, len);
        if (len >= 3) {
            /* a tag around the middle hashes only what it encloses */
            size_t open = len / 3, close = 2 * len / 3;
            if (close > open + 1) {
                key[open] = '{';
                key[close] = '}';
                cr_assert_eq(tg_redis_key_slot((const char *)key, len),
                             crc16_bitwise(key + open + 1, close - open - 1) & 16383u,
                             "tagged key %d", i);
            }
        }
    }
}
