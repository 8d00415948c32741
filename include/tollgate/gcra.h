/*
 * gcra.h - token buckets as GCRA (generic cell rate algorithm), and the
 * in-process bucket store (`store: local`, and the Redis fallback).
 *
 * A bucket has a capacity (burst) and an emission interval T (time to earn
 * one token: 60 s / requests_per_minute, rounded UP to the microsecond so
 * rounding never admits more than the configured rate).  Its whole state is
 * one integer, the theoretical arrival time (TAT, microseconds).  A request
 * of cost n at time now:
 *
 *     tat     = max(TAT, now)
 *     new_tat = tat + n*T
 *     allowed = new_tat - now <= burst*T
 *
 * A fresh bucket (TAT <= now) is full: burst requests pass at once.  Denied
 * requests change nothing.  The same arithmetic runs in Redis (the Lua text
 * below, with Redis TIME as the only clock) and in process memory.
 */
#ifndef TOLLGATE_GCRA_H
#define TOLLGATE_GCRA_H

#include <stddef.h>
#include <stdint.h>

#include "tollgate/common.h"

#define TG_GCRA_MAX_BUCKETS 8     /* buckets per request */

typedef struct tg_gcra_limit {
    uint64_t interval_us;         /* T: microseconds per token, >= 1 */
    uint32_t burst;               /* capacity, >= 1 */
} tg_gcra_limit;

/* T for a per-minute / per-second rate (rounded up). */
tg_gcra_limit tg_gcra_per_minute(uint32_t requests_per_minute, uint32_t burst);
tg_gcra_limit tg_gcra_per_second(uint32_t requests_per_second, uint32_t burst);

/*
 * One instance's share of l when `instances` share it on local buckets
 * (the Redis fallback, redis.instances): T * instances, burst / instances
 * - but never below the largest cost that could pass l (max_cost, capped
 * at l.burst), since a smaller burst would refuse that cost for good.
 */
tg_gcra_limit tg_gcra_share(tg_gcra_limit l, unsigned instances, uint32_t max_cost);

/* The outcome of charging one request to all of its buckets. */
typedef struct tg_gcra_result {
    int      allowed;             /* 1: every bucket had room; all charged */
    uint32_t remaining;           /* tokens left in the tightest bucket, after */
    uint64_t retry_us;            /* denied: wait at least this long (0 if allowed) */
    uint64_t reset_us;            /* until the tightest bucket is full again */
    int      limiting;            /* index of the tightest bucket (for headers) */
    uint64_t held_us[TG_GCRA_MAX_BUCKETS];   /* per bucket: time until full again,
                                    after this request (allowed) or now (denied);
                                    lets the local store continue where Redis
                                    left off (the fallback) */
    uint64_t now_us;              /* Redis answers: the script's clock (Redis
                                    TIME, us), so now_us + held_us[i] is the
                                    TAT it wrote; 0 = unknown (local store) */
} tg_gcra_result;

/*
 * Pure step for n buckets: tat[i] is the stored TAT of bucket i (0 = none).
 * On allow, tat[i] are updated in place; on deny they are left alone.
 * ttl_us[i] (may be NULL) receives how long bucket i must be kept
 * (time until it is full again; 0 = may be dropped).
 *
 * Per bucket, with L = burst*T and new = max(TAT, now) + cost*T:
 *   allowed:   remaining = min over buckets of (L - (new - now)) / T
 *              (floored); limiting = that bucket (ties: the larger reset,
 *              then the lower index); reset_us = its new - now.
 *   denied:    retry_us = max over denying buckets of new - now - L (>= 1):
 *              a retry at now + retry_us passes if nothing else happened;
 *              limiting = that bucket (ties: lower index); reset_us = its
 *              max(TAT, now) - now; remaining = tokens available now
 *              (min over all buckets, without this request).
 *   cost > burst can never pass: it is denied with the same formula,
 *              retry_us = (TAT - now)+ + (cost - burst)*T, which is > 0 but
 *              NOT a promise (a retry then is denied again).  Callers
 *              should refuse such costs before charging.
 *   n == 0:    allowed, remaining UINT32_MAX, limiting -1.
 *   n > 8:     a bug; logged and denied with retry_us 0, limiting -1.
 * The Lua script below gives the identical results.
 */
void tg_gcra_charge(const tg_gcra_limit *lim, uint64_t *tat, uint64_t *ttl_us,
                    size_t n, uint32_t cost, uint64_t now_us, tg_gcra_result *res);

/* ---- in-process store ------------------------------------------------ */

struct tg_lstore;

/* A single-threaded store (no locks of its own: the caller serialises;
 * tg_lshared below is the striped store the workers share).  max_entries bounds memory
 * (values below 16 are raised to 16): when full, expired buckets are
 * evicted first (the whole table is searched for them before a bucket
 * that is not full is dropped), then the one closest to full - forgetting
 * a bucket that is not full admits extra requests, so size max_entries
 * for the live keys.  tg_lstore_destroy(NULL) is a no-op. */
struct tg_lstore *tg_lstore_create(size_t max_entries);
void tg_lstore_destroy(struct tg_lstore *st);

/*
 * Charge one request to buckets keys[0..n) (NUL-terminated strings, at
 * most 8) with limits lim[], atomically (all or none), at now_us (pass
 * tg_now_us(); tests inject a clock).
 */
void tg_lstore_charge(struct tg_lstore *st, const char *const *keys,
                      const tg_gcra_limit *lim, size_t n, uint32_t cost,
                      uint64_t now_us, tg_gcra_result *res);

/* Raise key's TAT to at least tat (insert it when absent and tat > now):
 * the fallback store follows the answers of Redis, so that a fault does
 * not hand every active key a fresh burst. */
void tg_lstore_raise(struct tg_lstore *st, const char *key, uint64_t tat,
                     uint64_t now_us);

/* Time until key's bucket is full again (0: full or absent). */
uint64_t tg_lstore_held(const struct tg_lstore *st, const char *key, uint64_t now_us);

/* Buckets held now (tests, metrics). */
size_t tg_lstore_size(const struct tg_lstore *st);

/* Bytes one bucket costs in this store (for docs/PERFORMANCE.md). */
size_t tg_lstore_entry_bytes(void);

/*
 * The shared store: one per process, used by every worker thread at once
 * (store: local, the Redis fallback).  The same buckets and rules as
 * tg_lstore, in 64 tables chosen by the key's hash tag ({...}), each with
 * its own lock, so requests of different consumers do not wait for each
 * other.  Each table holds at most 5/4 of max_entries / 64 buckets (the
 * same memory as one table of max_entries: slots come in powers of two);
 * eviction (expired first, then closest to full) runs within the table
 * that needs room.  Up to 8 hot buckets live in cells, outside the tables.
 */
struct tg_lshared;

struct tg_lshared *tg_lshared_create(size_t max_entries);
void tg_lshared_destroy(struct tg_lshared *sh);

/*
 * As tg_lstore_charge, thread-safe, atomic across all n buckets.  hot:
 * index of the bucket every request shares (the global bucket), or -1.
 * A hot bucket moves (for good, up to 8 of them) to a lock-free cell
 * charged by compare-and-swap; it is then found as a cell by every call,
 * hot or not.  now_us may differ slightly between threads (each reads its
 * own clock): a request charged with an older now is judged no less
 * strictly, so over any interval of length t a bucket still admits at most
 * burst + t/T.
 */
void tg_lshared_charge(struct tg_lshared *sh, const char *const *keys,
                       const tg_gcra_limit *lim, size_t n, uint32_t cost,
                       int hot, uint64_t now_us, tg_gcra_result *res);

/* As tg_lstore_raise / tg_lstore_held / tg_lstore_size, thread-safe
 * (size locks each table in turn: for tests and metrics). */
void tg_lshared_raise(struct tg_lshared *sh, const char *key, uint64_t tat,
                      uint64_t now_us);
uint64_t tg_lshared_held(struct tg_lshared *sh, const char *key, uint64_t now_us);

/* tg_lshared_raise of n (<= 8) keys, key i to tat[i] (0: left alone),
 * taking each table's lock once: one lock for the buckets of one
 * consumer (they share a table), none for a cell. */
void tg_lshared_raise_n(struct tg_lshared *sh, const char *const *keys,
                        const uint64_t *tat, size_t n, uint64_t now_us);
size_t tg_lshared_size(struct tg_lshared *sh);

/*
 * The Redis side: a Lua script deciding tg_gcra_charge for a BATCH of
 * requests in one call, with Redis TIME as the clock.
 *   KEYS: the batch's bucket keys, each once (a key may appear twice
 *         only with two different limits: the script reads it once and
 *         charges both against the same TAT).
 *   ARGV[1]: these numbers, packed (tg_gcra_script_pack): nreq; floors
 *         (1: each bucket below carries a floor_us, 0: none, all 0); per
 *         request: cost*16 + nbuckets, then per bucket its key's index in
 *         KEYS (1-based) and, with floors, floor_us (the bucket holds at
 *         least this much debt - time until full - whatever is stored);
 *         then, AFTER the requests, per KEY in order
 *         (tg_gcra_script_key): interval_us, burst, alias (the 1-based
 *         index of the first KEY of the same name: itself, unless the name
 *         came before with another limit; the script keeps one TAT per
 *         name, there).  A call whose numbers do not fit this is refused
 *         with an error, nothing written.
 *   Reply: one string of packed numbers (tg_gcra_script_unpack); per
 *         request 1 + nbuckets: allowed (0/1), then each bucket's debt
 *         before the request (held_us, floor applied); after the last
 *         request one more: the script's now (Redis TIME, us).
 *         tg_gcra_script_answer turns that into the tg_gcra_result of
 *         tg_gcra_charge.
 *   A stored value that is not a bucket (another type, not a finite
 *   number in 0..2^53) counts as no bucket (full) and is overwritten by
 *   the next allowed charge.
 *   A charge's new TAT P (now + its held_us after) bounds what a refund
 *   (tg_gcra_refund_lua) may give back.
 * Each request is all-or-nothing over its own buckets; requests of one
 * batch are independent and applied in order (a key charged by several
 * requests of one call is written once, with its final TAT).  Keys are
 * written with PXAT = the first millisecond at or after their TAT (when
 * the bucket is full again), so stale buckets vanish and none vanishes
 * early.  A cost-0 request (a look) writes nothing.  Needs Redis >= 7
 * (script flags).
 */
extern const char tg_gcra_lua[];

/*
 * The one refund script: give back part of what a charge added.  KEYS:
 * the buckets (Cluster: of one slot); ARGV per key: the amount (us), then
 * P (the TAT that charge wrote).  Each key loses at most the amount,
 * never more than its debt beyond now (P - now), so a refund that comes
 * after its charge's debt ran out gives nothing back and never removes a
 * later charge of someone else.  Used for a charge answered after its
 * deadline (amount cost*T), the first part of a Cluster split whose
 * second part denied (idem), and a lease's unused tokens (unused*T).
 */
extern const char tg_gcra_refund_lua[];

/* ---- the scripts' argument and reply layout (pure) ------------------- */

#define TG_GCRA_SCRIPT_ARGS (1 + 2 * TG_GCRA_MAX_BUCKETS)  /* per request, at most */

/*
 * The charge script's ARGV numbers of one request into out[] (room for
 * TG_GCRA_SCRIPT_ARGS): cost*16 + nbuckets, then for each bucket k < n
 * whose bit is set in mask, in index order: kidx[k] (its key's 1-based
 * index in KEYS) and, when floors, floor_us[k] (NULL: 0).  Returns how
 * many numbers.
 */
size_t tg_gcra_script_args(const uint32_t *kidx, const uint64_t *floor_us, size_t n,
                           unsigned mask, uint32_t cost, int floors, uint64_t *out);

/* The charge script's numbers of KEY x (after the requests') into
 * out[0..3): l.interval_us, l.burst, alias (1-based index of the first
 * KEY of x's name, <= x).  Returns 3. */
#define TG_GCRA_SCRIPT_KEY_ARGS 3
size_t tg_gcra_script_key(tg_gcra_limit l, uint32_t alias, uint64_t *out);

/*
 * The charge script reads its numbers from ONE argument (ARGV[1]) of
 * little-endian IEEE 754 doubles, TG_GCRA_PACKED bytes each, decoded with
 * one struct.unpack: no Redis object, Lua string or tonumber per number.
 * Every number is an integer < 2^53, exact in a double.
 * tg_gcra_script_pack writes v[0..n) into out (room for n *
 * TG_GCRA_PACKED bytes), a value above 2^53 - 1 as 2^53 - 1 (only a
 * floor can be: a debt of 285 years); returns the bytes written.
 * tg_gcra_script_unpack reads n doubles from in into v; returns 0 if one
 * is not an integer in 0..2^53 - 1, else 1.
 */
#define TG_GCRA_PACKED 8
size_t tg_gcra_script_pack(const uint64_t *v, size_t n, unsigned char *out);
int tg_gcra_script_unpack(const unsigned char *in, size_t n, uint64_t *v);

/*
 * The same call without Lua: `TOLLGATE.CHARGE packed key...` of the Redis
 * module tollgate-redis.so (src/redis-module/tollgate_redis.c) takes the
 * script's ARGV[1] and KEYS and answers, writes and replicates what the
 * script does.  TOLLGATE.PROTO answers this number; bump both together
 * when the layout above changes.
 */
#define TG_GCRA_NATIVE_PROTO 1

/* Numbers in the charge script's reply to nreq requests over nbuckets
 * buckets in all: 1 per request, 1 per bucket, and the script's now (the
 * reply is that many times TG_GCRA_PACKED bytes). */
size_t tg_gcra_script_reply_len(size_t nreq, size_t nbuckets);

/*
 * One request's answer from its 1 + popcount(mask) reply integers v[]
 * (allowed, then held_us before the request of each bucket sent; pass -1
 * for an element that is not an integer) into res: tg_gcra_charge over the
 * buckets sent (lim[k], k in mask) with each TAT at now_us + held, at
 * now_us (the script's clock), cost; bucket indices mapped back through
 * mask, the buckets not sent hold 0.  Returns 1, or 0 when v is not a
 * valid answer (a negative number, allowed above 1, a debt beyond 2^53,
 * or a decision the step does not reproduce).  res->now_us is left alone.
 */
int tg_gcra_script_answer(const long long *v, const tg_gcra_limit *lim, unsigned mask,
                          uint32_t cost, uint64_t now_us, tg_gcra_result *res);

/* The refund script's ARGV numbers of one key into out[0..2): amount_us,
 * p_us.  Returns 2. */
size_t tg_gcra_refund_args(uint64_t amount_us, uint64_t p_us, uint64_t *out);

#endif
