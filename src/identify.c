/*
 * identify.c - the identify stage: who sends a request, and at which tier.
 *
 * The key comes from the key header (auth.header, X-API-Key by default)
 * or Authorization: Bearer; it is hashed (SHA-256) and looked up in the
 * keys file, then (auth.redis_keys) in the Redis key store through this
 * worker's caches; no key and an anonymous tier: the client's network is
 * the consumer.  Then the request goes on to be charged (limiter.c).
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "limiter_int.h"
#include "tollgate/redis.h"

#define KCACHE_SETS        1024        /* key-store cache: sets per worker, */
#define KCACHE_WAYS        4           /* ... of this many keys each */
#define KNEG_SLOTS         4096        /* unknown keys remembered per worker */
#define KPEND_SLOTS        1024        /* lookups in flight, per worker */

/*
 * The Redis key store (auth.redis_keys), per worker:
 *   kcache  keys that exist (enabled or not), 4-way set associative,
 *           trusted for auth.cache_ttl_ms; an expired entry is kept (and
 *           speaks for its key while Redis cannot answer) until another
 *           existing key needs its way.  Only existing keys enter it, so
 *           a flood of random keys cannot push a valid key out;
 *   kneg    keys Redis does not know, direct-mapped, same TTL: a miss
 *           evicts only another miss;
 *   kpend   lookups in flight: a second request for the same key waits for
 *           the first one's HGET (one HGET per key per worker at a time).
 * A lookup (a key in neither cache) is charged to a bucket of the client's
 * address first (auth.unknown_key_limit): a flood of random keys costs
 * Redis at most that many lookups per address per tollgate process.
 */
typedef struct kcache_entry {
    uint8_t  digest[32];
    uint64_t expires_ms;          /* 0 = empty way */
    int      exists;              /* 1 (kcache); 0 (kneg and malformed) */
    int      enabled;
    char     id[TG_KEY_ID_MAX + 1];
    char     tier[TG_TIER_MAX + 1];
} kcache_entry;

typedef struct kneg_entry {
    uint8_t  digest[32];
    uint64_t expires_ms;          /* 0 = empty */
} kneg_entry;

typedef struct kpend {
    struct tg_limiter  *lim;
    uint8_t             digest[32];
    struct tg_redis_op *op;       /* NULL = free slot */
    tg_limit_ctx       *waiters;  /* linked by ctx->kwait_next, in arrival order */
} kpend;

static int use_key_store(const struct tg_limiter *lim);
static tg_rc key_store_lookup(struct tg_limiter *lim, tg_limit_ctx *ctx);
static const tg_http_hdr *find_header(const tg_http_req *req, const char *name);
static void client_net(const tg_conf *conf, const char *ip, char *out, size_t len);

/* snprintf(dst, cap, "%s", src) without the formatter: once per request */
static void
copy_name(char *dst, size_t cap, const char *src)
{
    size_t n = strnlen(src, cap - 1);

    memcpy(dst, src, n);
    dst[n] = '\0';
}

tg_rc
tg_identify(struct tg_limiter *lim, tg_limit_ctx *ctx, const tg_http_req *req,
            const char *client_ip)
{
    const tg_conf *conf = lim->conf;
    tg_limit_outcome *out = ctx->out;
    const tg_http_hdr *h;
    const char *kv = NULL;
    size_t klen = 0;

    h = find_header(req, conf->auth.header ? conf->auth.header : "x-api-key");
    if (h != NULL) {
        kv = h->value;
        klen = h->value_len;
    } else if ((h = find_header(req, "authorization")) != NULL
               && h->value_len > 7 && strncasecmp(h->value, "bearer ", 7) == 0) {
        kv = h->value + 7;
        klen = h->value_len - 7;
        while (klen > 0 && (*kv == ' ' || *kv == '\t')) {
            kv++;
            klen--;
        }
    }
    if (kv != NULL && klen > 0 && (lim->keys != NULL || use_key_store(lim))) {
        const tg_key *key;

        tg_keys_hash(kv, klen, ctx->digest);
        key = tg_keys_find(lim->keys, ctx->digest);
        if (key == NULL && use_key_store(lim)) {
            ctx->req = req;
            ctx->ip = client_ip;
            return key_store_lookup(lim, ctx);
        }
        if (key == NULL) {
            tg_limit_deny(out, 401, "unknown API key");
            return TG_OK;
        }
        copy_name(out->consumer, sizeof(out->consumer), key->id);
        copy_name(out->tier, sizeof(out->tier), key->tier);
        if (!key->enabled) {
            tg_limit_deny(out, 403, "API key disabled");
            return TG_OK;
        }
    } else if (kv == NULL && conf->auth.anonymous_tier != NULL) {
        char net[INET6_ADDRSTRLEN + 8];

        client_net(conf, client_ip, net, sizeof(net));
        snprintf(out->consumer, sizeof(out->consumer), "anon:%s", net);
        snprintf(out->tier, sizeof(out->tier), "%s", conf->auth.anonymous_tier);
    } else {
        tg_limit_deny(out, 401, kv == NULL ? "missing API key" : "unknown API key");
        return TG_OK;
    }
    return tg_limiter_charge(lim, ctx, req);
}

int
tg_limiter_strip_header(const struct tg_limiter *lim, const tg_http_req *req,
                        const tg_http_hdr *h)
{
    const tg_conf *conf = lim->conf;
    const char *kh = conf->auth.header ? conf->auth.header : "x-api-key";

    if (!lim->enabled || conf->auth.forward_key) {
        return 0;
    }
    if (tg_http_name_is(h->name, h->name_len, kh)) {
        return 1;
    }
    /* Authorization carried the key only as identify read it: the first
     * one, Bearer, with no key header (Basic etc. are the app's) */
    return tg_http_name_is(h->name, h->name_len, "authorization")
           && find_header(req, kh) == NULL && h == find_header(req, "authorization")
           && h->value_len > 7 && strncasecmp(h->value, "bearer ", 7) == 0;
}

/* ---- helpers ---------------------------------------------------------- */

/*
 * The network a client's own buckets are keyed by: an IPv4 address as
 * is (IPv4-mapped IPv6 too: "::ffff:1.2.3.4" is 1.2.3.4), an IPv6 address
 * by its first auth.anonymous_ipv6_prefix bits ("2001:db8:1:2::/64"):
 * one holder of a /64 gets one bucket, not 2^64.
 */
static void
client_net(const tg_conf *conf, const char *ip, char *out, size_t len)
{
    struct in6_addr a;
    unsigned bits = conf->auth.anonymous_ipv6_prefix;
    char txt[INET6_ADDRSTRLEN];

    if (inet_pton(AF_INET6, ip, &a) != 1) {
        snprintf(out, len, "%s", ip);
        return;
    }
    if (IN6_IS_ADDR_V4MAPPED(&a)) {
        if (inet_ntop(AF_INET, &a.s6_addr[12], txt, sizeof(txt)) != NULL) {
            snprintf(out, len, "%s", txt);
            return;
        }
    }
    if (bits < 128) {
        for (unsigned b = bits; b < 128; b++) {
            a.s6_addr[b / 8] &= (uint8_t)~(0x80u >> (b % 8));
        }
    }
    if (inet_ntop(AF_INET6, &a, txt, sizeof(txt)) == NULL) {
        snprintf(out, len, "%s", ip);
        return;
    }
    snprintf(out, len, "%s/%u", txt, bits);
}

static const tg_http_hdr *
find_header(const tg_http_req *req, const char *name)
{
    size_t i;

    for (i = 0; i < req->nhdr; i++) {
        if (tg_http_name_is(req->hdr[i].name, req->hdr[i].name_len, name)) {
            return &req->hdr[i];
        }
    }
    return NULL;
}

/* ---- the Redis key store ------------------------------------------------- */

static int
use_key_store(const struct tg_limiter *lim)
{
    return lim->conf->auth.redis_keys && lim->redis != NULL;
}

/* The set of 4 ways where digest lives. */
static kcache_entry *
kcache_set(struct tg_limiter *lim, const uint8_t digest[32])
{
    uint64_t h;

    if (lim->kcache == NULL) {
        lim->kcache = tg_xcalloc((size_t)KCACHE_SETS * KCACHE_WAYS, sizeof(*lim->kcache));
        lim->kneg = tg_xcalloc(KNEG_SLOTS, sizeof(*lim->kneg));
        lim->kpend = tg_xcalloc(KPEND_SLOTS, sizeof(*lim->kpend));
    }
    memcpy(&h, digest, sizeof(h));            /* a SHA-256 is already uniform */
    return &lim->kcache[(h & (KCACHE_SETS - 1)) * KCACHE_WAYS];
}

/* digest's entry in the positive cache (fresh or not), or NULL. */
static kcache_entry *
kcache_find(struct tg_limiter *lim, const uint8_t digest[32])
{
    kcache_entry *set = kcache_set(lim, digest);

    for (int w = 0; w < KCACHE_WAYS; w++) {
        if (set[w].expires_ms != 0 && memcmp(set[w].digest, digest, 32) == 0) {
            return &set[w];
        }
    }
    return NULL;
}

/* A way for digest: its own, else an empty one, else the stalest. */
static kcache_entry *
kcache_way(struct tg_limiter *lim, const uint8_t digest[32])
{
    kcache_entry *set = kcache_set(lim, digest), *e = kcache_find(lim, digest);

    if (e != NULL) {
        return e;
    }
    e = &set[0];
    for (int w = 1; w < KCACHE_WAYS && e->expires_ms != 0; w++) {
        if (set[w].expires_ms < e->expires_ms) {
            e = &set[w];
        }
    }
    return e;
}

static kneg_entry *
kneg_slot(struct tg_limiter *lim, const uint8_t digest[32])
{
    uint64_t h;

    memcpy(&h, digest + 8, sizeof(h));
    return &lim->kneg[h & (KNEG_SLOTS - 1)];
}

/* Who the key is, from a cache entry; TG_OK (decided or charged at once)
 * or TG_AGAIN (charging in Redis). */
static tg_rc
identify_cached(struct tg_limiter *lim, tg_limit_ctx *ctx, const kcache_entry *e)
{
    tg_limit_outcome *out = ctx->out;

    if (e == NULL || !e->exists) {
        tg_limit_deny(out, 401, "unknown API key");
        return TG_OK;
    }
    snprintf(out->consumer, sizeof(out->consumer), "%s", e->id);
    snprintf(out->tier, sizeof(out->tier), "%s", e->tier);
    if (!e->enabled) {
        tg_limit_deny(out, 403, "API key disabled");
        return TG_OK;
    }
    return tg_limiter_charge(lim, ctx, ctx->req);
}

static int
charset_ok(const char *s, size_t n, size_t max, int upper)
{
    size_t i;

    if (n == 0 || n > max) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-'
              || (upper && ((c >= 'A' && c <= 'Z') || c == '.')))) {
            return 0;
        }
    }
    return 1;
}

/* The stored value is "<id>:<tier>" or "<id>:<tier>:disabled". */
static int
parse_key_value(const char *v, size_t len, kcache_entry *e)
{
    const char *c1 = memchr(v, ':', len), *c2;
    size_t idl, tl;

    if (c1 == NULL) {
        return 0;
    }
    idl = (size_t)(c1 - v);
    c2 = memchr(c1 + 1, ':', len - idl - 1);
    tl = c2 ? (size_t)(c2 - c1 - 1) : len - idl - 1;
    if (!charset_ok(v, idl, TG_KEY_ID_MAX, 1) || !charset_ok(c1 + 1, tl, TG_TIER_MAX, 0)) {
        return 0;
    }
    if (c2 != NULL && ((size_t)(v + len - c2 - 1) != 8 || memcmp(c2 + 1, "disabled", 8) != 0)) {
        return 0;
    }
    memcpy(e->id, v, idl);
    e->id[idl] = '\0';
    memcpy(e->tier, c1 + 1, tl);
    e->tier[tl] = '\0';
    e->enabled = c2 == NULL;
    e->exists = 1;
    return 1;
}

/* A lookup of digest ended (rc, value): fill the caches, tell the breaker. */
static void
key_store_fill(struct tg_limiter *lim, const uint8_t digest[32], tg_rc rc,
               const char *value, size_t len)
{
    uint64_t now = tg_now_ms();
    kcache_entry tmp, *e;
    kneg_entry *n;

    if (rc != TG_OK) {
        tg_breaker_failure(&lim->breaker, now);
        return;
    }
    tg_breaker_success(&lim->breaker, now);
    memset(&tmp, 0, sizeof(tmp));
    if (value != NULL && !parse_key_value(value, len, &tmp)) {
        tg_warn("auth.redis_keys: a malformed entry in %skeys (expected "
                "id:tier[:disabled])", lim->sconf->redis.prefix);
    }
    if (tmp.exists) {
        e = kcache_way(lim, digest);
        *e = tmp;
        memcpy(e->digest, digest, 32);
        e->expires_ms = now + lim->conf->auth.cache_ttl_ms;
        return;
    }
    if ((e = kcache_find(lim, digest)) != NULL) {
        e->expires_ms = 0;             /* gone from Redis: forget it */
    }
    n = kneg_slot(lim, digest);
    memcpy(n->digest, digest, 32);
    n->expires_ms = now + lim->conf->auth.cache_ttl_ms;
}

/* Decide one request from the cache after its lookup ended (rc: the
 * lookup's), and call it back unless it is now charging in Redis. */
static void
key_store_resume(struct tg_limiter *lim, tg_limit_ctx *ctx, tg_rc rc)
{
    kcache_entry *e = kcache_find(lim, ctx->digest);

    if (rc != TG_OK && e == NULL) {
        /* Unverifiable and never seen: nobody is let in unidentified. */
        tg_limiter_store_down(ctx, "API key store unavailable");
        ctx->cb(ctx->arg);
        return;
    }
    /* A stale entry of this very key speaks for it while Redis cannot. */
    if (identify_cached(lim, ctx, e) == TG_AGAIN) {
        return;                        /* charging: redis_done calls back */
    }
    ctx->cb(ctx->arg);
}

/* The lookup of a kpend slot: every request waiting on it resumes. */
static void
key_store_done(void *arg, tg_rc rc, const char *value, size_t len)
{
    kpend *p = arg;
    struct tg_limiter *lim = p->lim;
    tg_limit_ctx *ctx, *next;

    ctx = p->waiters;
    p->waiters = NULL;
    p->op = NULL;
    key_store_fill(lim, p->digest, rc, value, len);
    for (; ctx != NULL; ctx = next) {
        next = ctx->kwait_next;
        ctx->kwait = NULL;
        ctx->kwait_next = NULL;
        key_store_resume(lim, ctx, rc);
    }
}

/* A lookup of one request's own (its kpend slot was busy with another key). */
static void
key_store_single(void *arg, tg_rc rc, const char *value, size_t len)
{
    tg_limit_ctx *ctx = arg;

    ctx->op = NULL;
    key_store_fill(ctx->lim, ctx->digest, rc, value, len);
    key_store_resume(ctx->lim, ctx, rc);
}

/* The request is gone while waiting for a lookup: leave the waiters
 * (the lookup itself goes on and fills the cache). */
void
tg_identify_cancel(tg_limit_ctx *ctx)
{
    kpend *p = ctx->kwait;
    tg_limit_ctx **link;

    if (p == NULL) {
        return;
    }
    for (link = &p->waiters; *link != NULL; link = &(*link)->kwait_next) {
        if (*link == ctx) {
            *link = ctx->kwait_next;
            break;
        }
    }
    ctx->kwait = NULL;
    ctx->kwait_next = NULL;
}

/* Join the lookup of this key in flight, or start one (after charging the
 * client's address for it).  TG_OK: decided now; TG_AGAIN: cb later. */
static tg_rc
key_store_lookup(struct tg_limiter *lim, tg_limit_ctx *ctx)
{
    const tg_conf *conf = lim->conf;
    kcache_entry *e = kcache_find(lim, ctx->digest);
    kneg_entry *n = kneg_slot(lim, ctx->digest);
    uint64_t now = tg_now_ms(), h;
    char field[65], key[TG_LIMIT_KEY_MAX], net[INET6_ADDRSTRLEN + 8];
    const char *keys[1] = { key };
    tg_gcra_limit ul;
    tg_gcra_result res;
    kpend *p;

    if (e != NULL && e->expires_ms > now) {
        return identify_cached(lim, ctx, e);
    }
    if (e == NULL && n->expires_ms > now && memcmp(n->digest, ctx->digest, 32) == 0) {
        tg_limit_deny(ctx->out, 401, "unknown API key");
        return TG_OK;
    }
    memcpy(&h, ctx->digest + 16, sizeof(h));
    p = &lim->kpend[h & (KPEND_SLOTS - 1)];
    if (p->op != NULL && memcmp(p->digest, ctx->digest, 32) == 0) {
        tg_limit_ctx **link = &p->waiters;       /* one HGET per key */

        while (*link != NULL) {
            link = &(*link)->kwait_next;
        }
        *link = ctx;
        ctx->kwait = p;
        ctx->kwait_next = NULL;
        return TG_AGAIN;
    }
    if (!tg_breaker_allow(&lim->breaker, now)) {
        /* Redis is out: a stale entry speaks for its key, else 503. */
        if (e != NULL) {
            return identify_cached(lim, ctx, e);
        }
        tg_limiter_store_down(ctx, "API key store unavailable");
        return TG_OK;
    }
    /* Lookups per client address (auth.unknown_key_limit). */
    client_net(conf, ctx->ip, net, sizeof(net));
    snprintf(key, sizeof(key), "%s{lookup:%s}:u", lim->sconf->redis.prefix, net);
    ul = tg_gcra_per_minute(conf->auth.unknown_key_limit.requests_per_minute,
                            conf->auth.unknown_key_limit.burst_limit);
    tg_limiter_local_charge(keys, &ul, 1, 1, &res);
    if (!res.allowed) {
        tg_breaker_abandon(&lim->breaker, now);
        if (e != NULL) {
            return identify_cached(lim, ctx, e);  /* known, if not fresh */
        }
        ctx->out->status = 429;
        ctx->out->error = "too many unknown API keys from this address";
        ctx->out->retry_s = ceil_s(res.retry_us) ? ceil_s(res.retry_us) : 1;
        return TG_OK;
    }
    tg_keys_hex(ctx->digest, field);
    snprintf(key, sizeof(key), "%skeys", lim->sconf->redis.prefix);
    if (p->op != NULL) {
        /* The slot serves another key: this one is looked up on its own. */
        ctx->op_charge = 0;
        ctx->op = tg_redis_hget(lim->redis, key, field, key_store_single, ctx);
        tg_redis_op_deadline(ctx->op, ctx->deadline_us);
        return TG_AGAIN;
    }
    p->lim = lim;
    memcpy(p->digest, ctx->digest, 32);
    p->waiters = ctx;
    ctx->kwait = p;
    ctx->kwait_next = NULL;
    p->op = tg_redis_hget(lim->redis, key, field, key_store_done, p);
    tg_redis_op_deadline(p->op, ctx->deadline_us);
    return TG_AGAIN;
}
