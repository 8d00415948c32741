/*
 * redis.c - async hiredis connections per worker, charges batched into
 * one EVALSHA of the GCRA script per loop turn, our own deadlines; one
 * Redis server, a Sentinel-managed master, or a Cluster.
 *
 * Life of a charge:
 *
 *   tg_redis_charge   the op (keys copied) is appended to r->pending and
 *                     the flush event is activated (no fd), so the flush
 *                     runs after every callback of the current loop turn;
 *   flush_cb          target not ready: the op gets TG_ERR right there
 *                     (fail fast); ready: ops are cut into batches of up to
 *                     max_batch (Cluster: per slot), each sent as one
 *                     EVALSHA with its timer;
 *   batch_reply_cb    hiredis calls it exactly once per sent command: with
 *                     the reply, or NULL when the context goes away.  The
 *                     batch lives until then, even after its deadline (the
 *                     late reply is then ignored), and is freed there.
 *   batch_timeout_cb  deadline: every op gets TG_ERR; three deadlines in a
 *                     row drop that connection (a stuck TCP connection
 *                     would otherwise eat every deadline).
 *
 * NOSCRIPT: the same batch is sent again as EVAL <script> (which caches the
 * script) inside the reply callback, under the batch's original deadline.
 *
 * Connections are nodes (struct tg_rnode), each with its own reconnect
 * backoff.  Single mode has one node at redis.url.  Sentinel mode has one
 * node whose address is learnt from the sentinels (a short-lived "aux"
 * connection per question, the sentinel whose master last worked first)
 * and checked with ROLE; its reconnect timer asks the sentinels again, and
 * a dedicated connection SUBSCRIBEd to +switch-master kicks it.  Cluster
 * mode has one node (and one breaker) per master, a slot map from CLUSTER
 * SLOTS (aux connection, refreshed every 30 s, after MOVED, and as soon as
 * a node serving slots fails), one call per slot per batch (Redis refuses
 * declared keys of several slots: CROSSSLOT, even with
 * allow-cross-slot-keys), MOVED and ASK followed by resending the batch, at
 * most twice, within its deadline.
 *
 * Every context is opened by ctx_open: numeric addresses only (names from
 * Redis are resolved with evdns first), AUTH first when configured, our
 * reply functions and libevent adapter (bounded replies: see "contexts").
 *
 * Split requests (Cluster): the keys of one request live in the slot of
 * its first key, except the global bucket.  Such a request is charged in
 * two calls, one after the other: first its first key's slot (phase 1); if
 * allowed, the rest (phase 2); when phase 2 denies, phase 1 is refunded by
 * a small script (tg_redis_refund_lua) - at most what it still holds; when
 * phase 2 fails, phase 1 is kept (the requester falls back).  Sequential rather than
 * parallel so that requests a consumer's own bucket denies - the common
 * case under abuse - never touch the shared global bucket.
 *
 * Rules for callers (the header's, plus):
 *   - a callback may queue new ops and cancel ops not yet answered; it
 *     must not call tg_redis_destroy (that aborts when detected);
 *   - tg_redis_destroy calls no callback: ops still queued or in flight
 *     are dropped silently, so finish or cancel them first;
 *   - "ready" means connected and, for db != 0, SELECTed (Sentinel: and
 *     ROLE master); until then (and while reconnecting) charges fail fast
 *     on the next loop turn;
 *   - stats.errors counts charges only (not HGET); stats.reconnects counts
 *     reconnect attempts (timer firings), successful or not; the backoff
 *     restarts only after a good reply on the connection.
 *
 * Context ownership (hiredis 0.14 async.c): after a failed connect callback
 * or after the disconnect callback, hiredis frees the context itself; we
 * only ever free it with redisAsyncFree from our own timers and deferred
 * events (never from inside one of its own callbacks), and in
 * tg_redis_destroy.  Inside a reply callback we may only
 * redisAsyncDisconnect the context (hiredis defers that itself).
 */
#include "tollgate/redis.h"
#include "tollgate/breaker.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libevent.h>
#include <event2/dns.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdarg.h>

#define TG_REDIS_BACKOFF_MIN_MS    100
#define TG_REDIS_BACKOFF_MAX_MS    5000
#define TG_REDIS_CONNECT_MIN_MS    1000     /* connect + SELECT deadline floor */
#define TG_REDIS_AUX_MIN_MS        250      /* sentinel / CLUSTER SLOTS question */
#define TG_REDIS_MAX_CONSEC_TMO    3        /* deadlines in a row: reconnect */
#define TG_REDIS_DEFAULT_TIMEOUT   25
#define TG_REDIS_DEFAULT_BATCH     32
#define TG_REDIS_MAX_BATCH         512
#define TG_REDIS_NUMLEN            21       /* "18446744073709551615" + NUL */
#define TG_REDIS_MAX_REDIRECTS     2        /* MOVED/ASK per batch */
#define TG_REDIS_REFRESH_MS        30000    /* Cluster: slot map refresh */
#define TG_REDIS_REFRESH_RETRY_MS  1000     /* ... after every seed failed */
#define TG_REDIS_KICK_MS           250      /* ... after a node failed, at most */
#define TG_REDIS_SUB_RETRY_MS      1000     /* Sentinel: resubscribe */
#define TG_REDIS_HOSTLEN           256
#define TG_REDIS_MAX_ELEMENTS      65536    /* per array in one reply */
#define TG_REDIS_MAX_OBJECTS       (1 << 20)   /* objects in one reply */
#define TG_REDIS_MAX_READBUF       (4u << 20)  /* unparsed reply bytes */
#define TG_REDIS_WARN_MS           1000     /* connection warnings per node */

enum tg_redis_mode { TG_MODE_SINGLE, TG_MODE_SENTINEL, TG_MODE_CLUSTER };

enum tg_redis_state {
    TG_REDIS_DOWN,                /* no context; reconnect timer armed */
    TG_REDIS_CONNECTING,          /* context exists, connect/SELECT/ROLE pending */
    TG_REDIS_READY,               /* connected (and SELECTed, and a master) */
};

enum tg_redis_kind { TG_OP_CHARGE, TG_OP_HGET };

struct tg_redis_op {
    struct tg_redis_op *next;     /* r->pending, then the batch's list */
    tg_redis_charge_cb  charge_cb;  /* NULL once delivered or cancelled */
    tg_redis_str_cb     str_cb;     /* (HGET) idem */
    void               *arg;
    uint8_t             kind;     /* enum tg_redis_kind */
    uint8_t             n;        /* buckets (charge) / 2 strings (HGET) */
    uint8_t             mask;     /* buckets sent by the current call */
    uint8_t             mask1;    /* Cluster split: phase 1 buckets */
    uint8_t             mask2;    /* ... phase 2 buckets; 0: not split */
    uint8_t             phase;    /* 0 whole, 1 first part, 2 second part */
    uint8_t             refund_due;   /* phase 1 charged, not yet settled */
    uint16_t            slot1;    /* Cluster slot of the current call's keys */
    uint16_t            slot2;    /* ... of phase 2 */
    uint32_t            cost;
    uint64_t            deadline_us;  /* answered TG_ERR at this tg_now_us() */
    tg_gcra_result      res1;     /* phase 1 answer (indices mapped) */
    uint64_t            p1[TG_CHARGE_MAX_BUCKETS];  /* phase 1: each key's new TAT */
    tg_gcra_limit       lim[TG_CHARGE_MAX_BUCKETS];
    uint64_t            floor_us[TG_CHARGE_MAX_BUCKETS];  /* held at least (0) */
    uint32_t            len[TG_CHARGE_MAX_BUCKETS];   /* of each string */
    char                str[];    /* n NUL-terminated strings back to back */
};

/* A resolution's link to its node.  evdns delivers a cancellation later
 * (deferred), possibly after the node has moved on or is gone: the ticket
 * is freed by dns_cb, and a node that gives up only clears ticket->nd. */
struct tg_rdns {
    struct tg_rnode     *nd;          /* NULL: given up */
};

struct tg_rnode {
    struct tg_redis     *r;
    char                 host[TG_REDIS_HOSTLEN];   /* as announced (may be a name) */
    int                  port;
    char                 ip[INET6_ADDRSTRLEN];     /* numeric, what we connect to */
    struct evdns_getaddrinfo_request *dns_req;     /* resolving host */
    struct tg_rdns      *resolving;   /* its ticket; NULL: not resolving */
    uint64_t             warn_ms;     /* last connection warning */
    unsigned             warn_quiet;  /* warnings suppressed since */
    int                  tried;       /* Sentinel: a named master being tried */
    int                  failed;      /* Cluster: down since its last success */
    tg_breaker           brk;         /* Cluster: over this node's calls */
    redisAsyncContext   *ac;          /* NULL while down */
    redisAsyncContext   *drop_ac;     /* to drop on a clean stack */
    enum tg_redis_state  state;
    unsigned             gates;       /* SELECT/ROLE answers still awaited */
    unsigned             backoff_ms;  /* next reconnect delay (pre-jitter) */
    unsigned             consec_tmo;  /* deadlines in a row */
    struct event        *drop_ev;     /* no fd, activated by hand */
    struct event        *reconnect_ev;
    struct event        *connect_ev;  /* connect + SELECT + ROLE deadline */
};

struct tg_redis_batch {
    struct tg_redis       *r;
    struct tg_rnode       *node;          /* where it is (re)sent */
    struct tg_redis_batch *prev, *next;   /* r->inflight */
    struct tg_redis_batch *flush_next;    /* Cluster: built in one flush */
    struct tg_redis_op    *ops;           /* in ARGV order */
    struct tg_redis_op    *tail;
    size_t                 nops;
    size_t                 nkeys;         /* total bucket keys (charge) */
    int                    slot;          /* Cluster: every key's slot */
    uint8_t                kind;          /* enum tg_redis_kind */
    uint8_t                eval;          /* sent again as EVAL (NOSCRIPT) */
    uint8_t                done;          /* ops answered; a reply is ignored */
    uint8_t                timer_set;
    uint8_t                asking;        /* ASK: ASKING before the command */
    uint8_t                redirects;     /* MOVED/ASK followed so far */
    uint8_t                brk;           /* Cluster: node breaker awaits the outcome */
    struct event          *timer;         /* in the same allocation */
};

/* One question on its own short-lived connection (a sentinel, a cluster
 * seed).  done(r, reply) runs once per question: with the reply (inside
 * the hiredis callback) or NULL on failure/deadline (from our timer). */
struct tg_raux;
typedef void (*tg_raux_done)(struct tg_redis *r, const redisReply *rep,
                             const struct tg_raux *aux);
struct tg_raux {
    struct tg_redis     *r;
    redisAsyncContext   *ac;          /* NULL: no question in flight */
    struct event        *timer;       /* deadline, or deferred failure */
    tg_raux_done         done;
    int                  failed;      /* timer armed to report a failure */
    char                 host[TG_REDIS_HOSTLEN];   /* who was asked */
    int                  port;
};

struct tg_redis {
    struct event_base      *base;
    tg_redis_opts           opts;
    enum tg_redis_mode      mode;
    int                     destroying;  /* no callbacks, no reconnects */

    struct tg_rnode       **nodes;       /* [0]: single / Sentinel master */
    size_t                  nnodes;

    struct tg_redis_op     *pending;     /* queued this loop turn */
    struct tg_redis_op    **pending_tail;
    struct tg_redis_batch  *inflight;    /* sent, reply callback not yet run */

    struct event           *flush_ev;    /* no fd, activated by hand */
    struct evdns_base      *dns;         /* names learnt from Redis; lazy */
    const struct timeval   *call_tv;     /* common timeout: timeout_ms */
    uint64_t                rng;         /* xorshift64 state, for jitter */

    char                    sha[41];     /* SHA1 of tg_gcra_lua, hex */
    size_t                  script_len;

    const char            **argv;        /* scratch for one command: */
    size_t                 *argvlen;     /* argc entries each */
    size_t                  argcap;
    char                   *num;         /* number strings */
    size_t                  numcap;

    /* Sentinel */
    struct tg_raux          disc;        /* get-master-addr-by-name */
    size_t                  disc_idx;    /* sentinel asked now */
    size_t                  disc_tries;  /* sentinels asked in this round */
    size_t                  disc_pref;   /* asked first: last answered well */
    size_t                  disc_from;   /* whose answer nodes[0] uses */
    redisAsyncContext      *sub_ac;      /* SUBSCRIBE +switch-master */
    size_t                  sub_idx;
    struct event           *sub_ev;      /* resubscribe timer */

    /* Cluster */
    struct tg_raux          slots;       /* CLUSTER SLOTS */
    size_t                  slots_idx;   /* over seeds, then known nodes */
    size_t                  slots_tries;
    uint16_t               *slot_node;   /* [16384]: node index + 1, 0 unknown */
    struct tg_redis_batch **slot_batch;  /* [16384]: batch of this flush */
    int                     map_ok;
    struct event           *refresh_ev;
    uint64_t                slots_asked_ms;  /* last CLUSTER SLOTS round started */

    uint64_t                auth_log_ms; /* last AUTH error logged */
    tg_redis_stats          stats;
};

/* Gives back what the first part of a split request added to each key,
 * as far as it is still owed: min(cost*T, P - now), P the TAT that charge
 * wrote (the script returns it).  A late refund after the debt has run
 * out gives nothing back, so it never removes a later charge of another
 * request or instance.  ARGV: cost, then per key T, P.  Rare: EVAL. */
const char tg_redis_refund_lua[] =
    "local tm = redis.call('TIME')\n"
    "local now = tonumber(tm[1]) * 1000000 + tonumber(tm[2])\n"
    "local cost = tonumber(ARGV[1])\n"
    "for i = 1, #KEYS do\n"
    "  local tat = tonumber(redis.pcall('GET', KEYS[i]))\n"
    "  local give = math.min(cost * tonumber(ARGV[2 * i]),\n"
    "                        tonumber(ARGV[2 * i + 1]) - now)\n"
    "  if tat and give > 0 then\n"
    "    local t = tat - give\n"
    "    if t <= now then\n"
    "      redis.call('DEL', KEYS[i])\n"
    "    else\n"
    "      redis.call('SET', KEYS[i], string.format('%d', t), 'PXAT',\n"
    "                 string.format('%d', math.ceil(t / 1000)))\n"
    "    end\n"
    "  end\n"
    "end\n"
    "return 0\n";

/* CRC16-CCITT (XMODEM): poly 0x1021, init 0, as in the Cluster spec. */
static const uint16_t tg_crc16_tab[256] = {
    0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7,
    0x8108, 0x9129, 0xa14a, 0xb16b, 0xc18c, 0xd1ad, 0xe1ce, 0xf1ef,
    0x1231, 0x0210, 0x3273, 0x2252, 0x52b5, 0x4294, 0x72f7, 0x62d6,
    0x9339, 0x8318, 0xb37b, 0xa35a, 0xd3bd, 0xc39c, 0xf3ff, 0xe3de,
    0x2462, 0x3443, 0x0420, 0x1401, 0x64e6, 0x74c7, 0x44a4, 0x5485,
    0xa56a, 0xb54b, 0x8528, 0x9509, 0xe5ee, 0xf5cf, 0xc5ac, 0xd58d,
    0x3653, 0x2672, 0x1611, 0x0630, 0x76d7, 0x66f6, 0x5695, 0x46b4,
    0xb75b, 0xa77a, 0x9719, 0x8738, 0xf7df, 0xe7fe, 0xd79d, 0xc7bc,
    0x48c4, 0x58e5, 0x6886, 0x78a7, 0x0840, 0x1861, 0x2802, 0x3823,
    0xc9cc, 0xd9ed, 0xe98e, 0xf9af, 0x8948, 0x9969, 0xa90a, 0xb92b,
    0x5af5, 0x4ad4, 0x7ab7, 0x6a96, 0x1a71, 0x0a50, 0x3a33, 0x2a12,
    0xdbfd, 0xcbdc, 0xfbbf, 0xeb9e, 0x9b79, 0x8b58, 0xbb3b, 0xab1a,
    0x6ca6, 0x7c87, 0x4ce4, 0x5cc5, 0x2c22, 0x3c03, 0x0c60, 0x1c41,
    0xedae, 0xfd8f, 0xcdec, 0xddcd, 0xad2a, 0xbd0b, 0x8d68, 0x9d49,
    0x7e97, 0x6eb6, 0x5ed5, 0x4ef4, 0x3e13, 0x2e32, 0x1e51, 0x0e70,
    0xff9f, 0xefbe, 0xdfdd, 0xcffc, 0xbf1b, 0xaf3a, 0x9f59, 0x8f78,
    0x9188, 0x81a9, 0xb1ca, 0xa1eb, 0xd10c, 0xc12d, 0xf14e, 0xe16f,
    0x1080, 0x00a1, 0x30c2, 0x20e3, 0x5004, 0x4025, 0x7046, 0x6067,
    0x83b9, 0x9398, 0xa3fb, 0xb3da, 0xc33d, 0xd31c, 0xe37f, 0xf35e,
    0x02b1, 0x1290, 0x22f3, 0x32d2, 0x4235, 0x5214, 0x6277, 0x7256,
    0xb5ea, 0xa5cb, 0x95a8, 0x8589, 0xf56e, 0xe54f, 0xd52c, 0xc50d,
    0x34e2, 0x24c3, 0x14a0, 0x0481, 0x7466, 0x6447, 0x5424, 0x4405,
    0xa7db, 0xb7fa, 0x8799, 0x97b8, 0xe75f, 0xf77e, 0xc71d, 0xd73c,
    0x26d3, 0x36f2, 0x0691, 0x16b0, 0x6657, 0x7676, 0x4615, 0x5634,
    0xd94c, 0xc96d, 0xf90e, 0xe92f, 0x99c8, 0x89e9, 0xb98a, 0xa9ab,
    0x5844, 0x4865, 0x7806, 0x6827, 0x18c0, 0x08e1, 0x3882, 0x28a3,
    0xcb7d, 0xdb5c, 0xeb3f, 0xfb1e, 0x8bf9, 0x9bd8, 0xabbb, 0xbb9a,
    0x4a75, 0x5a54, 0x6a37, 0x7a16, 0x0af1, 0x1ad0, 0x2ab3, 0x3a92,
    0xfd2e, 0xed0f, 0xdd6c, 0xcd4d, 0xbdaa, 0xad8b, 0x9de8, 0x8dc9,
    0x7c26, 0x6c07, 0x5c64, 0x4c45, 0x3ca2, 0x2c83, 0x1ce0, 0x0cc1,
    0xef1f, 0xff3e, 0xcf5d, 0xdf7c, 0xaf9b, 0xbfba, 0x8fd9, 0x9ff8,
    0x6e17, 0x7e36, 0x4e55, 0x5e74, 0x2e93, 0x3eb2, 0x0ed1, 0x1ef0,
};

static struct tg_rnode *node_new(struct tg_redis *r, const char *host, int port);
static void node_free(struct tg_rnode *nd);
static struct tg_rnode *node_get(struct tg_redis *r, const char *host, int port,
                                 size_t *idx);
static void node_kick(struct tg_rnode *nd);
static int is_numeric_host(const char *host);
static void node_good(struct tg_rnode *nd);
static void node_warn(struct tg_rnode *nd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void conn_start(struct tg_rnode *nd);
static void dns_give_up(struct tg_rnode *nd);
static void conn_connect(struct tg_rnode *nd);
static void conn_drop(struct tg_rnode *nd);
static void schedule_reconnect(struct tg_rnode *nd);
static void schedule_drop(struct tg_rnode *nd);
static void set_ready(struct tg_rnode *nd);
static void gate_pass(struct tg_rnode *nd);
static void connect_cb(const redisAsyncContext *ac, int status);
static void disconnect_cb(const redisAsyncContext *ac, int status);
static void select_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void role_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void script_load_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void drop_cb(evutil_socket_t fd, short what, void *arg);
static void reconnect_cb(evutil_socket_t fd, short what, void *arg);
static void connect_timeout_cb(evutil_socket_t fd, short what, void *arg);
static tg_rc aux_init(struct tg_redis *r, struct tg_raux *aux, tg_raux_done done);
static void aux_start(struct tg_raux *aux, const char *host, int port, int argc,
                      const char **argv);
static void aux_cancel(struct tg_raux *aux);
static void sentinel_discover(struct tg_redis *r);
static void sentinel_distrust(struct tg_redis *r);
static void sentinel_ask(struct tg_redis *r);
static void sentinel_done(struct tg_redis *r, const redisReply *rep,
                          const struct tg_raux *aux);
static void sub_start(struct tg_redis *r);
static void sub_follow(struct tg_redis *r);
static void sub_retry_cb(evutil_socket_t fd, short what, void *arg);
static void cluster_refresh(struct tg_redis *r);
static void cluster_kick(struct tg_redis *r, const struct tg_rnode *nd);
static void cluster_ask(struct tg_redis *r);
static void slots_done(struct tg_redis *r, const redisReply *rep,
                       const struct tg_raux *aux);
static void refresh_cb(evutil_socket_t fd, short what, void *arg);
static void flush_cb(evutil_socket_t fd, short what, void *arg);
static struct tg_redis_batch *batch_new(struct tg_redis *r, struct tg_rnode *nd,
                                        enum tg_redis_kind kind);
static void batch_add(struct tg_redis_batch *b, struct tg_redis_op *op);
static void batch_start(struct tg_redis_batch *b);
static tg_rc batch_send(struct tg_redis_batch *b);
static void batch_fail(struct tg_redis_batch *b);
static void batch_free(struct tg_redis_batch *b);
static void batch_outcome(struct tg_redis_batch *b, int ok);
static void batch_reply_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void batch_timeout_cb(evutil_socket_t fd, short what, void *arg);
static int batch_arm(struct tg_redis_batch *b, uint64_t now);
static int batch_redirect(struct tg_redis_batch *b, const redisReply *rep);
static void deliver_charges(struct tg_redis_batch *b, const redisReply *reply);
static void deliver_hget(struct tg_redis_batch *b, const redisReply *reply);
static void op_fail(struct tg_redis *r, struct tg_redis_op *op);
static void op_refund(struct tg_redis *r, struct tg_redis_op *op);
static void late_refund(struct tg_redis *r, struct tg_rnode *nd, const struct tg_redis_op *op,
                        const tg_gcra_result *part, uint64_t script_now);
static int op_live(const struct tg_redis_op *op);
static struct tg_redis_op *op_new(enum tg_redis_kind kind, const char *const *s, size_t n);
static const char *op_key(const struct tg_redis_op *op, size_t k);
static void queue_op(struct tg_redis *r, struct tg_redis_op *op);
static int parse_uint(const char *s, size_t len, unsigned long max, unsigned long *out);
static int split_hostport(const char *s, size_t len, char *host, size_t hostlen,
                          int *port);

/* ------------------------------------------------------------------ */
/* URL                                                                 */

tg_rc
tg_redis_parse_url(const char *url, tg_redis_opts *opts, char *err, size_t errlen)
{
    static const char scheme[] = "redis://";
    const char *p, *host, *hend, *end;
    unsigned long port = 6379, db = 0;
    size_t hlen;

    if (url == NULL || *url == '\0') {
        snprintf(err, errlen, "redis url: empty");
        return TG_ERR;
    }
    if (strncmp(url, "rediss://", 9) == 0) {
        snprintf(err, errlen, "redis url: TLS (rediss://) is not supported");
        return TG_ERR;
    }
    if (strncmp(url, scheme, sizeof(scheme) - 1) != 0) {
        snprintf(err, errlen, "redis url: must start with \"redis://\"");
        return TG_ERR;
    }
    p = url + sizeof(scheme) - 1;
    end = p + strlen(p);
    if (strpbrk(p, "@") != NULL) {
        snprintf(err, errlen, "redis url: credentials go in redis.username and "
                 "redis.password");
        return TG_ERR;
    }
    if (strpbrk(p, "?#") != NULL) {
        snprintf(err, errlen, "redis url: query or fragment is not supported");
        return TG_ERR;
    }

    if (*p == '[') {
        host = p + 1;
        hend = strchr(host, ']');
        if (hend == NULL) {
            snprintf(err, errlen, "redis url: missing ']' after IPv6 address");
            return TG_ERR;
        }
        p = hend + 1;
        if (hend == host || memchr(host, ':', (size_t)(hend - host)) == NULL) {
            snprintf(err, errlen, "redis url: bad IPv6 address in brackets");
            return TG_ERR;
        }
        for (const char *q = host; q < hend; q++) {
            if (!isxdigit((unsigned char)*q) && *q != ':' && *q != '.') {
                snprintf(err, errlen, "redis url: bad IPv6 address in brackets");
                return TG_ERR;
            }
        }
    } else {
        const char *c1 = strchr(p, ':');
        if (c1 != NULL && strchr(c1 + 1, ':') != NULL) {
            snprintf(err, errlen, "redis url: IPv6 addresses go in brackets");
            return TG_ERR;
        }
        host = p;
        hend = p + strcspn(p, ":/");
        p = hend;
        if (hend == host) {
            snprintf(err, errlen, "redis url: missing host");
            return TG_ERR;
        }
        for (const char *q = host; q < hend; q++) {
            if (!isalnum((unsigned char)*q) && *q != '.' && *q != '-' && *q != '_') {
                snprintf(err, errlen, "redis url: bad character in host "
                         "(IPv6 addresses go in brackets)");
                return TG_ERR;
            }
        }
    }
    hlen = (size_t)(hend - host);
    if (hlen >= sizeof(opts->host)) {
        snprintf(err, errlen, "redis url: host longer than %zu bytes",
                 sizeof(opts->host) - 1);
        return TG_ERR;
    }

    if (*p == ':') {
        const char *ps = p + 1, *pe = ps + strcspn(ps, "/");
        if (parse_uint(ps, (size_t)(pe - ps), 65535, &port) != TG_OK || port == 0) {
            snprintf(err, errlen, "redis url: port must be a number in 1..65535");
            return TG_ERR;
        }
        p = pe;
    }
    if (*p == '/') {
        const char *ds = p + 1;
        if (parse_uint(ds, (size_t)(end - ds), 15, &db) != TG_OK) {
            snprintf(err, errlen, "redis url: database must be a number in 0..15");
            return TG_ERR;
        }
        p = end;
    }
    if (p != end) {
        snprintf(err, errlen, "redis url: unexpected text after the host");
        return TG_ERR;
    }

    memcpy(opts->host, host, hlen);
    opts->host[hlen] = '\0';
    opts->port = (int)port;
    opts->db = (int)db;
    opts->sentinel_master[0] = '\0';
    opts->nsentinels = 0;
    opts->ncluster = 0;
    return TG_OK;
}

tg_rc
tg_redis_addr_from_sockaddr(const struct sockaddr *sa, tg_redis_addr *a)
{
    const void *src;

    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        src = &s4->sin_addr;
        a->port = ntohs(s4->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        src = &s6->sin6_addr;
        a->port = ntohs(s6->sin6_port);
    } else {
        return TG_ERR;
    }
    if (inet_ntop(sa->sa_family, src, a->host, sizeof(a->host)) == NULL) {
        return TG_ERR;
    }
    return TG_OK;
}

unsigned
tg_redis_key_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len), *close;
    uint16_t crc = 0;

    if (open != NULL) {
        size_t rest = len - (size_t)(open - key) - 1;
        close = memchr(open + 1, '}', rest);
        if (close != NULL && close > open + 1) {
            key = open + 1;
            len = (size_t)(close - key);
        }
    }
    for (size_t i = 0; i < len; i++) {
        crc = (uint16_t)((crc << 8) ^ tg_crc16_tab[((crc >> 8) ^ (uint8_t)key[i]) & 0xff]);
    }
    return crc & (TG_REDIS_CLUSTER_SLOTS - 1);
}

/* ------------------------------------------------------------------ */
/* create / destroy                                                    */

struct tg_redis *
tg_redis_create(struct event_base *base, const tg_redis_opts *opts)
{
    struct tg_redis *r;
    unsigned char md[SHA_DIGEST_LENGTH];
    struct timeval tv;

    r = tg_xcalloc(1, sizeof(*r));
    r->base = base;
    r->opts = *opts;
    r->opts.host[sizeof(r->opts.host) - 1] = '\0';
    r->opts.sentinel_master[sizeof(r->opts.sentinel_master) - 1] = '\0';
    if (r->opts.nsentinels > TG_REDIS_MAX_ADDRS) {
        r->opts.nsentinels = TG_REDIS_MAX_ADDRS;
    }
    if (r->opts.ncluster > TG_REDIS_MAX_ADDRS) {
        r->opts.ncluster = TG_REDIS_MAX_ADDRS;
    }
    if (r->opts.timeout_ms == 0) {
        r->opts.timeout_ms = TG_REDIS_DEFAULT_TIMEOUT;
    }
    if (r->opts.max_batch == 0) {
        r->opts.max_batch = TG_REDIS_DEFAULT_BATCH;
    } else if (r->opts.max_batch > TG_REDIS_MAX_BATCH) {
        r->opts.max_batch = TG_REDIS_MAX_BATCH;
    }
    if (r->opts.ncluster > 0) {
        r->mode = TG_MODE_CLUSTER;
        if (r->opts.db != 0) {
            tg_warn("redis: Cluster has only database 0; ignoring db %d", r->opts.db);
            r->opts.db = 0;
        }
    } else if (r->opts.sentinel_master[0] != '\0') {
        r->mode = TG_MODE_SENTINEL;
        if (r->opts.nsentinels == 0) {
            tg_error("redis: Sentinel mode needs at least one sentinel address");
            free(r);
            return NULL;
        }
    } else {
        r->mode = TG_MODE_SINGLE;
    }
    if (r->mode != TG_MODE_SINGLE || !is_numeric_host(r->opts.host)) {
        /* names may come from Redis itself: resolve them without blocking */
        r->dns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS
                                      | EVDNS_BASE_DISABLE_WHEN_INACTIVE);
        if (r->dns == NULL) {
            tg_warn("redis: no resolver (evdns): only numeric addresses will work");
        }
    }
    r->pending_tail = &r->pending;
    r->rng = tg_now_us() ^ ((uint64_t)(uintptr_t)r << 17) ^ 0x9e3779b97f4a7c15ull;

    r->script_len = strlen(tg_gcra_lua);
    SHA1((const unsigned char *)tg_gcra_lua, r->script_len, md);
    for (size_t i = 0; i < SHA_DIGEST_LENGTH; i++) {
        snprintf(r->sha + 2 * i, 3, "%02x", md[i]);
    }

    tv.tv_sec = r->opts.timeout_ms / 1000;
    tv.tv_usec = (r->opts.timeout_ms % 1000) * 1000;
    r->call_tv = event_base_init_common_timeout(base, &tv);
    r->flush_ev = event_new(base, -1, 0, flush_cb, r);
    if (r->call_tv == NULL || r->flush_ev == NULL
        || aux_init(r, &r->disc, sentinel_done) != TG_OK
        || aux_init(r, &r->slots, slots_done) != TG_OK) {
        tg_error("redis: cannot create events");
        goto fail;
    }

    switch (r->mode) {
    case TG_MODE_SINGLE:
        if (node_new(r, r->opts.host, r->opts.port) == NULL) {
            goto fail;
        }
        conn_start(r->nodes[0]);
        break;
    case TG_MODE_SENTINEL:
        r->sub_ev = evtimer_new(base, sub_retry_cb, r);
        if (r->sub_ev == NULL || node_new(r, "", 0) == NULL) {
            tg_error("redis: cannot create events");
            goto fail;
        }
        sentinel_discover(r);
        sub_start(r);
        break;
    case TG_MODE_CLUSTER:
        r->slot_node = tg_xcalloc(TG_REDIS_CLUSTER_SLOTS, sizeof(*r->slot_node));
        r->slot_batch = tg_xcalloc(TG_REDIS_CLUSTER_SLOTS, sizeof(*r->slot_batch));
        r->refresh_ev = evtimer_new(base, refresh_cb, r);
        if (r->refresh_ev == NULL) {
            tg_error("redis: cannot create events");
            goto fail;
        }
        cluster_refresh(r);
        break;
    }
    return r;

fail:
    r->destroying = 1;
    tg_redis_destroy(r);
    return NULL;
}

/* Free a context unless we are inside one of its callbacks (hiredis would
 * defer the free and call us back after r is gone). */
static void
free_ctx(redisAsyncContext *ac)
{
    if (ac->c.flags & REDIS_IN_CALLBACK) {
        tg_error("redis: tg_redis_destroy called from a Redis callback");
        abort();
    }
    redisAsyncFree(ac);     /* runs every reply callback with NULL */
}

void
tg_redis_destroy(struct tg_redis *r)
{
    struct tg_redis_op *op, *next;

    if (r == NULL) {
        return;
    }
    r->destroying = 1;
    for (size_t i = 0; i < r->nnodes; i++) {
        struct tg_rnode *nd = r->nodes[i];
        if (nd->ac != NULL) {
            redisAsyncContext *ac = nd->ac;
            nd->ac = NULL;
            free_ctx(ac);
        }
    }
    if (r->sub_ac != NULL) {
        redisAsyncContext *ac = r->sub_ac;
        r->sub_ac = NULL;
        free_ctx(ac);
    }
    aux_cancel(&r->disc);
    aux_cancel(&r->slots);
    while (r->inflight != NULL) {   /* not expected: each had a context */
        batch_free(r->inflight);
    }
    for (op = r->pending; op != NULL; op = next) {
        next = op->next;
        free(op);
    }
    for (size_t i = 0; i < r->nnodes; i++) {
        if (r->nodes[i]->resolving) {
            dns_give_up(r->nodes[i]);
        }
    }
    if (r->dns != NULL) {
        evdns_base_free(r->dns, 0);
    }
    for (size_t i = 0; i < r->nnodes; i++) {
        node_free(r->nodes[i]);
    }
    free(r->nodes);
    if (r->flush_ev) event_free(r->flush_ev);
    if (r->disc.timer) event_free(r->disc.timer);
    if (r->slots.timer) event_free(r->slots.timer);
    if (r->sub_ev) event_free(r->sub_ev);
    if (r->refresh_ev) event_free(r->refresh_ev);
    free(r->slot_node);
    free(r->slot_batch);
    free(r->argv);
    free(r->argvlen);
    free(r->num);
    free(r);
}

int
tg_redis_ready(const struct tg_redis *r)
{
    if (r == NULL) {
        return 0;
    }
    if (r->mode != TG_MODE_CLUSTER) {
        return r->nnodes > 0 && r->nodes[0]->state == TG_REDIS_READY;
    }
    if (!r->map_ok) {
        return 0;
    }
    for (size_t i = 0; i < r->nnodes; i++) {
        if (r->nodes[i]->state == TG_REDIS_READY) {
            return 1;
        }
    }
    return 0;
}

int
tg_redis_node_breakers(const struct tg_redis *r)
{
    return r != NULL && r->mode == TG_MODE_CLUSTER;
}

void
tg_redis_get_stats(const struct tg_redis *r, tg_redis_stats *st)
{
    *st = r->stats;
}

/* ------------------------------------------------------------------ */
/* requests                                                            */

/* Cluster: the buckets sharing the first key's slot go first (phase 1);
 * the others (the global bucket) must share one slot (phase 2). */
static tg_rc
op_split(struct tg_redis_op *op)
{
    unsigned s0 = tg_redis_key_slot(op_key(op, 0), op->len[0]);
    int s2 = -1;

    op->mask1 = op->mask2 = 0;
    for (size_t k = 0; k < op->n; k++) {
        unsigned s = tg_redis_key_slot(op_key(op, k), op->len[k]);
        if (s == s0) {
            op->mask1 |= (uint8_t)(1u << k);
        } else if (s2 < 0 || (unsigned)s2 == s) {
            s2 = (int)s;
            op->mask2 |= (uint8_t)(1u << k);
        } else {
            return TG_ERR;
        }
    }
    op->slot1 = (uint16_t)s0;
    op->slot2 = (uint16_t)(s2 < 0 ? 0 : s2);
    op->mask = op->mask1;
    op->phase = op->mask2 != 0 ? 1 : 0;
    return TG_OK;
}

struct tg_redis_op *
tg_redis_charge(struct tg_redis *r, const char *const *keys, const tg_gcra_limit *lim,
                size_t n, uint32_t cost, tg_redis_charge_cb cb, void *arg)
{
    struct tg_redis_op *op;
    int bad = (n == 0 || n > TG_CHARGE_MAX_BUCKETS || keys == NULL || lim == NULL);

    for (size_t i = 0; !bad && i < n; i++) {
        bad = keys[i] == NULL || lim[i].interval_us == 0 || lim[i].burst == 0;
    }
    if (bad) {
        /* a caller bug: answered TG_ERR like any failure, never sent */
        tg_error("redis: invalid charge (%zu buckets)", n);
        op = op_new(TG_OP_CHARGE, NULL, 0);
        op->n = 0;
    } else {
        op = op_new(TG_OP_CHARGE, keys, n);
        memcpy(op->lim, lim, n * sizeof(*lim));
        op->mask = (uint8_t)((1u << n) - 1);
        if (r->mode == TG_MODE_CLUSTER && op_split(op) != TG_OK) {
            tg_error("redis: the keys of one charge span more than two Cluster "
                     "slots (first key \"%s\")", keys[0]);
            op->n = 0;
        }
    }
    op->cost = cost;
    op->charge_cb = cb;
    op->arg = arg;
    op->deadline_us = tg_now_us() + (uint64_t)r->opts.timeout_ms * 1000;
    queue_op(r, op);
    return op;
}

struct tg_redis_op *
tg_redis_hget(struct tg_redis *r, const char *key, const char *field,
              tg_redis_str_cb cb, void *arg)
{
    const char *s[2] = { key, field };
    struct tg_redis_op *op;

    op = op_new(TG_OP_HGET, s, 2);
    op->slot1 = (uint16_t)tg_redis_key_slot(op->str, op->len[0]);
    op->str_cb = cb;
    op->arg = arg;
    op->deadline_us = tg_now_us() + (uint64_t)r->opts.timeout_ms * 1000;
    queue_op(r, op);
    return op;
}

void
tg_redis_op_floor(struct tg_redis_op *op, const uint64_t *held_us, size_t n)
{
    if (op != NULL && op->kind == TG_OP_CHARGE && n <= op->n) {
        memcpy(op->floor_us, held_us, n * sizeof(*held_us));
    }
}

void
tg_redis_op_deadline(struct tg_redis_op *op, uint64_t deadline_us)
{
    if (op != NULL && deadline_us < op->deadline_us) {
        op->deadline_us = deadline_us;
    }
}

void
tg_redis_cancel(struct tg_redis_op *op)
{
    if (op != NULL) {
        op->charge_cb = NULL;
        op->str_cb = NULL;
    }
}

/* ------------------------------------------------------------------ */
/* contexts: a bounded reply reader, our own libevent adapter, AUTH    */

/*
 * hiredis 0.14 accepts arrays of up to INT_MAX elements (allocated, then
 * freed one by one) and keeps reading a bulk reply of any announced size
 * into its buffer.  A broken or hostile server must cost us neither the
 * loop nor the memory: an array above TG_REDIS_MAX_ELEMENTS elements or a
 * reply above TG_REDIS_MAX_OBJECTS objects fails the reader (hiredis then
 * drops the connection), and our read event drops the connection when
 * more than TG_REDIS_MAX_READBUF bytes of replies wait unparsed.
 *
 * The adapter is hiredis's libevent one plus that check; since the
 * context can be freed inside redisAsyncHandleRead, its cleanup only
 * marks the events dead while a read is running (ENTERED/DELETED).
 */
struct tg_rctx {                  /* ac->ev.data and reader privdata */
    redisAsyncContext *ac;
    struct tg_redis   *r;
    struct event      *rev, *wev;
    size_t             objects;   /* in the reply being read */
    uint8_t            reading;   /* inside redisAsyncHandleRead */
    uint8_t            dead;      /* cleaned up meanwhile: free after */
};

static pthread_mutex_t tg_redis_err_mu = PTHREAD_MUTEX_INITIALIZER;
static char tg_redis_err[256];

static void
set_last_error(const char *fmt, ...)
{
    va_list ap;

    pthread_mutex_lock(&tg_redis_err_mu);
    va_start(ap, fmt);
    vsnprintf(tg_redis_err, sizeof(tg_redis_err), fmt, ap);
    va_end(ap);
    pthread_mutex_unlock(&tg_redis_err_mu);
}

void
tg_redis_last_error(char *buf, size_t len)
{
    pthread_mutex_lock(&tg_redis_err_mu);
    snprintf(buf, len, "%s", tg_redis_err);
    pthread_mutex_unlock(&tg_redis_err_mu);
}

/* One more object of the reply being read; NULL (reader error) past the
 * limit.  hiredis passes the reader's privdata: our tg_rctx. */
static redisReply *
reply_new(const redisReadTask *task, int type)
{
    struct tg_rctx *e = task->privdata;
    redisReply *rep;

    if (e == NULL) {
        return NULL;            /* the context is being freed */
    }
    if (task->parent == NULL) {
        e->objects = 0;
    }
    if (++e->objects > TG_REDIS_MAX_OBJECTS) {
        e->r->stats.oversized++;
        tg_warn("redis: a reply of more than %d objects: dropping the connection",
                TG_REDIS_MAX_OBJECTS);
        return NULL;
    }
    rep = calloc(1, sizeof(*rep));
    if (rep != NULL) {
        rep->type = type;
    }
    return rep;
}

static void *
reply_link(const redisReadTask *task, redisReply *rep)
{
    if (rep != NULL && task->parent != NULL) {
        redisReply *parent = task->parent->obj;
        parent->element[task->idx] = rep;
    }
    return rep;
}

static void *
reply_string(const redisReadTask *task, char *str, size_t len)
{
    redisReply *rep = reply_new(task, task->type);

    if (rep == NULL) {
        return NULL;
    }
    rep->str = malloc(len + 1);
    if (rep->str == NULL) {
        free(rep);
        return NULL;
    }
    memcpy(rep->str, str, len);
    rep->str[len] = '\0';
    rep->len = len;
    return reply_link(task, rep);
}

static void *
reply_array(const redisReadTask *task, int elements)
{
    struct tg_rctx *e = task->privdata;
    redisReply *rep;

    if (e != NULL && elements > TG_REDIS_MAX_ELEMENTS) {
        e->r->stats.oversized++;
        tg_warn("redis: a reply announced %d elements (at most %d): dropping the "
                "connection", elements, TG_REDIS_MAX_ELEMENTS);
        return NULL;
    }
    rep = reply_new(task, REDIS_REPLY_ARRAY);
    if (rep == NULL) {
        return NULL;
    }
    if (elements > 0) {
        rep->element = calloc((size_t)elements, sizeof(*rep->element));
        if (rep->element == NULL) {
            free(rep);
            return NULL;
        }
    }
    rep->elements = (size_t)elements;
    return reply_link(task, rep);
}

static void *
reply_integer(const redisReadTask *task, long long value)
{
    redisReply *rep = reply_new(task, REDIS_REPLY_INTEGER);

    if (rep != NULL) {
        rep->integer = value;
    }
    return reply_link(task, rep);
}

static void *
reply_nil(const redisReadTask *task)
{
    return reply_link(task, reply_new(task, REDIS_REPLY_NIL));
}

static redisReplyObjectFunctions tg_reply_fns = {
    reply_string, reply_array, reply_integer, reply_nil, freeReplyObject,
};

static void
rctx_free(struct tg_rctx *e)
{
    event_free(e->rev);
    event_free(e->wev);
    free(e);
}

static void
rctx_read_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_rctx *e = arg;
    redisReader *rd;

    e->reading = 1;
    redisAsyncHandleRead(e->ac);
    e->reading = 0;
    if (e->dead) {
        rctx_free(e);
        return;
    }
    rd = e->ac->c.reader;
    if (rd != NULL && rd->len - rd->pos > TG_REDIS_MAX_READBUF) {
        e->r->stats.oversized++;
        tg_warn("redis: %s:%d: more than %u bytes of reply unparsed: dropping the "
                "connection", e->ac->c.tcp.host, e->ac->c.tcp.port, TG_REDIS_MAX_READBUF);
        redisAsyncFree(e->ac);  /* our event: callbacks see NULL replies */
    }
}

static void
rctx_write_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_rctx *e = arg;

    redisAsyncHandleWrite(e->ac);
}

static void rctx_add_read(void *p)  { event_add(((struct tg_rctx *)p)->rev, NULL); }
static void rctx_del_read(void *p)  { event_del(((struct tg_rctx *)p)->rev); }
static void rctx_add_write(void *p) { event_add(((struct tg_rctx *)p)->wev, NULL); }
static void rctx_del_write(void *p) { event_del(((struct tg_rctx *)p)->wev); }

static void
rctx_cleanup(void *p)
{
    struct tg_rctx *e = p;
    redisAsyncContext *ac = e->ac;

    /* never called twice, never called back into */
    memset(&ac->ev, 0, sizeof(ac->ev));
    ac->c.reader->privdata = NULL;
    event_del(e->rev);
    event_del(e->wev);
    if (e->reading) {
        e->dead = 1;
    } else {
        rctx_free(e);
    }
}

static int
is_numeric_host(const char *host)
{
    struct in6_addr a6;
    struct in_addr a4;

    return inet_pton(AF_INET, host, &a4) == 1 || inet_pton(AF_INET6, host, &a6) == 1;
}

/*
 * A new context to host:port (numeric: never resolves), with our reader
 * limits and adapter, data in ac->data.  NULL (logged) on failure.  When
 * a password is configured (the sentinels' when sentinel is set), AUTH
 * goes first, answered to cb(privdata).
 */
static redisAsyncContext *
ctx_open(struct tg_redis *r, const char *host, int port, void *data, int sentinel,
         redisCallbackFn *auth_cb, void *privdata)
{
    const char *user = sentinel ? r->opts.sentinel_username : r->opts.username;
    const char *pass = sentinel ? r->opts.sentinel_password : r->opts.password;
    redisAsyncContext *ac;
    struct tg_rctx *e;

    if (!is_numeric_host(host)) {
        tg_warn("redis: %s:%d is not a numeric address", host, port);
        return NULL;
    }
    ac = redisAsyncConnect(host, port);
    if (ac == NULL || ac->err) {
        tg_warn("redis: connect to %s:%d: %s", host, port,
                ac != NULL ? ac->errstr : "cannot create a context");
        if (ac != NULL) {
            redisAsyncFree(ac);
        }
        return NULL;
    }
    e = tg_xcalloc(1, sizeof(*e));
    e->ac = ac;
    e->r = r;
    e->rev = event_new(r->base, ac->c.fd, EV_READ, rctx_read_cb, e);
    e->wev = event_new(r->base, ac->c.fd, EV_WRITE, rctx_write_cb, e);
    if (e->rev == NULL || e->wev == NULL) {
        tg_error("redis: cannot create events");
        if (e->rev) event_free(e->rev);
        if (e->wev) event_free(e->wev);
        free(e);
        redisAsyncFree(ac);
        return NULL;
    }
    ac->c.reader->fn = &tg_reply_fns;
    ac->c.reader->privdata = e;
    ac->ev.addRead = rctx_add_read;
    ac->ev.delRead = rctx_del_read;
    ac->ev.addWrite = rctx_add_write;
    ac->ev.delWrite = rctx_del_write;
    ac->ev.cleanup = rctx_cleanup;
    ac->ev.data = e;
    event_add(e->rev, NULL);
    event_add(e->wev, NULL);
    ac->data = data;

    if (pass[0] != '\0') {
        const char *argv[3] = { "AUTH", user, pass };
        int argc = 3;
        if (user[0] == '\0') {
            argv[1] = pass;
            argc = 2;
        }
        redisAsyncCommandArgv(ac, auth_cb, privdata, argc, argv, NULL);
    }
    return ac;
}

/* An AUTH answer: 1 when accepted; else the error is logged and kept for
 * /status (without the secret). */
static int
auth_ok(struct tg_redis *r, const redisAsyncContext *ac, const redisReply *rep,
        int sentinel)
{
    const char *user = sentinel ? r->opts.sentinel_username : r->opts.username;

    if (rep->type == REDIS_REPLY_STATUS) {
        char last[8];
        tg_redis_last_error(last, sizeof(last));
        if (last[0] != '\0') {
            set_last_error("%s", "");
        }
        return 1;
    }
    r->stats.auth_failures++;
    if (r->auth_log_ms != 0 && tg_now_ms() - r->auth_log_ms < TG_REDIS_WARN_MS) {
        return 0;
    }
    r->auth_log_ms = tg_now_ms();
    tg_error("redis: AUTH to %s %s:%d%s%s%s refused: %.200s (check redis.%spassword)",
             sentinel ? "sentinel" : "server", ac->c.tcp.host, ac->c.tcp.port,
             user[0] ? " as user \"" : "", user, user[0] ? "\"" : "",
             rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply",
             sentinel ? "sentinel." : "");
    set_last_error("AUTH to %s %s:%d%s%s%s refused: %.150s",
                   sentinel ? "sentinel" : "server", ac->c.tcp.host, ac->c.tcp.port,
                   user[0] ? " as user \"" : "", user, user[0] ? "\"" : "",
                   rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
    return 0;
}

/* AUTH on a sentinel or CLUSTER SLOTS connection: the command behind it
 * fails with NOAUTH by itself; only log and keep the error. */
static void
aux_auth_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_redis *r = privdata;

    if (reply != NULL && !r->destroying) {
        auth_ok(r, ac, reply, ac->data == &r->disc || ac->data == r);
    }
}

/* ------------------------------------------------------------------ */
/* nodes and their connections                                         */

/* Cluster: one breaker per node (a dead master must not send the other
 * masters' slots to the fallback): a few failed calls in a row open it;
 * then that node's calls fail at once, one probe per second. */
static const tg_breaker_conf tg_node_breaker_conf = {
    .failures = 3, .window_ms = 0, .min_requests = 0, .error_pct = 0,
    .open_ms = 1000, .max_open_ms = 5000, .probes = 1,
};

static struct tg_rnode *
node_new(struct tg_redis *r, const char *host, int port)
{
    struct tg_rnode *nd = tg_xcalloc(1, sizeof(*nd));

    tg_breaker_init(&nd->brk, &tg_node_breaker_conf);

    nd->r = r;
    snprintf(nd->host, sizeof(nd->host), "%s", host);
    nd->port = port;
    nd->state = TG_REDIS_DOWN;
    nd->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
    nd->drop_ev = event_new(r->base, -1, 0, drop_cb, nd);
    nd->reconnect_ev = evtimer_new(r->base, reconnect_cb, nd);
    nd->connect_ev = evtimer_new(r->base, connect_timeout_cb, nd);
    if (nd->drop_ev == NULL || nd->reconnect_ev == NULL || nd->connect_ev == NULL) {
        tg_error("redis: cannot create events");
        node_free(nd);
        return NULL;
    }
    r->nodes = tg_xrealloc(r->nodes, (r->nnodes + 1) * sizeof(*r->nodes));
    r->nodes[r->nnodes++] = nd;
    return nd;
}

static void
node_free(struct tg_rnode *nd)
{
    if (nd->drop_ev) event_free(nd->drop_ev);
    if (nd->reconnect_ev) event_free(nd->reconnect_ev);
    if (nd->connect_ev) event_free(nd->connect_ev);
    free(nd);
}

/* Cluster: the node at host:port, created (and connecting) if new.  Nodes
 * are never removed before tg_redis_destroy: a batch may point at one. */
static struct tg_rnode *
node_get(struct tg_redis *r, const char *host, int port, size_t *idx)
{
    struct tg_rnode *nd;

    for (size_t i = 0; i < r->nnodes; i++) {
        if (r->nodes[i]->port == port && strcmp(r->nodes[i]->host, host) == 0) {
            *idx = i;
            return r->nodes[i];
        }
    }
    if (r->nnodes >= UINT16_MAX - 1) {
        return NULL;
    }
    nd = node_new(r, host, port);
    if (nd == NULL) {
        return NULL;
    }
    *idx = r->nnodes - 1;
    tg_info("redis: cluster node %s:%d", host, port);
    conn_start(nd);
    return nd;
}

/* Reconnect soon, without the accumulated backoff (Sentinel: asking the
 * sentinels again on the way). */
static void
node_kick(struct tg_rnode *nd)
{
    struct timeval now = { 0, 0 };

    nd->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
    if (nd->ac != NULL) {
        schedule_drop(nd);
    } else if (!nd->r->destroying) {
        evtimer_del(nd->reconnect_ev);
        evtimer_add(nd->reconnect_ev, &now);
    }
}

/* Connection warnings of a node: at most one per TG_REDIS_WARN_MS (a
 * Redis refusing every connection would flood the log). */
static void
node_warn(struct tg_rnode *nd, const char *fmt, ...)
{
    uint64_t now = tg_now_ms();
    char msg[512];
    va_list ap;

    if (nd->warn_ms != 0 && now - nd->warn_ms < TG_REDIS_WARN_MS) {
        nd->warn_quiet++;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (nd->warn_quiet > 0) {
        tg_warn("%s (%u similar message(s) suppressed)", msg, nd->warn_quiet);
    } else {
        tg_warn("%s", msg);
    }
    nd->warn_ms = now;
    nd->warn_quiet = 0;
}

/* A good reply on the node's connection: the backoff starts over (not
 * at TCP connect: a Redis at maxclients accepts, then refuses). */
static void
node_good(struct tg_rnode *nd)
{
    nd->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
}

static void
node_auth_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_rnode *nd = privdata;

    if (reply == NULL || nd->r->destroying || nd->ac != ac) {
        return;
    }
    if (auth_ok(nd->r, ac, reply, 0)) {
        gate_pass(nd);
        return;
    }
    schedule_drop(nd);
}

/* Stop waiting for the node's resolution (deadline, destroy). */
static void
dns_give_up(struct tg_rnode *nd)
{
    struct evdns_getaddrinfo_request *req = nd->dns_req;

    nd->resolving->nd = NULL;
    nd->resolving = NULL;
    nd->dns_req = NULL;
    if (req != NULL) {
        evdns_getaddrinfo_cancel(req);      /* dns_cb later: ticket freed */
    }
}

static void
dns_cb(int result, struct evutil_addrinfo *res, void *arg)
{
    struct tg_rdns *t = arg;
    struct tg_rnode *nd = t->nd;
    tg_redis_addr a;

    free(t);
    if (nd == NULL || nd->r->destroying) {
        if (res != NULL) {
            evutil_freeaddrinfo(res);
        }
        return;
    }
    nd->dns_req = NULL;
    nd->resolving = NULL;
    if (result != 0 || res == NULL || tg_redis_addr_from_sockaddr(res->ai_addr, &a) != TG_OK
        || strlen(a.host) >= sizeof(nd->ip)) {
        node_warn(nd, "redis: cannot resolve %s: %s", nd->host,
                  result != 0 ? evutil_gai_strerror(result) : "no address");
        if (res != NULL) {
            evutil_freeaddrinfo(res);
        }
        schedule_reconnect(nd);
        return;
    }
    memcpy(nd->ip, a.host, strlen(a.host) + 1);
    evutil_freeaddrinfo(res);
    conn_connect(nd);
}

/* Connect to the node: its host when numeric, else resolved off the loop
 * first (evdns; the connect deadline covers the resolution). */
static void
conn_start(struct tg_rnode *nd)
{
    struct tg_redis *r = nd->r;
    struct evutil_addrinfo hints;
    struct evdns_getaddrinfo_request *req;
    struct tg_rdns *t;
    struct timeval tv;
    unsigned ms;

    if (nd->host[0] == '\0') {
        schedule_reconnect(nd);
        return;
    }
    if (is_numeric_host(nd->host)) {
        memcpy(nd->ip, nd->host, strlen(nd->host) + 1);    /* < INET6_ADDRSTRLEN */
        conn_connect(nd);
        return;
    }
    if (r->dns == NULL) {
        node_warn(nd, "redis: %s is a name and no resolver is available", nd->host);
        schedule_reconnect(nd);
        return;
    }
    nd->state = TG_REDIS_CONNECTING;
    ms = r->opts.timeout_ms > TG_REDIS_CONNECT_MIN_MS ? r->opts.timeout_ms
                                                      : TG_REDIS_CONNECT_MIN_MS;
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    evtimer_add(nd->connect_ev, &tv);
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    t = tg_xcalloc(1, sizeof(*t));
    t->nd = nd;
    nd->resolving = t;
    req = evdns_getaddrinfo(r->dns, nd->host, NULL, &hints, dns_cb, t);
    if (nd->resolving == t) {       /* dns_cb may have run already */
        nd->dns_req = req;
    }
}

/* Open the context to nd->ip (numeric) and queue AUTH, SELECT, ROLE and
 * SCRIPT LOAD behind the connect. */
static void
conn_connect(struct tg_rnode *nd)
{
    struct tg_redis *r = nd->r;
    redisAsyncContext *ac;
    struct timeval tv;
    unsigned ms;

    nd->gates = 0;
    ac = ctx_open(r, nd->ip, nd->port, nd, 0, node_auth_cb, nd);
    if (ac == NULL) {
        schedule_reconnect(nd);
        return;
    }
    redisAsyncSetConnectCallback(ac, connect_cb);
    redisAsyncSetDisconnectCallback(ac, disconnect_cb);
    nd->ac = ac;
    nd->state = TG_REDIS_CONNECTING;
    nd->consec_tmo = 0;

    /* Queued now, written as soon as the socket connects, ahead of any
     * charge; nobody waits for the SCRIPT LOAD (EVALSHA falls back).
     * Sentinel: never trust the sentinels' answer blindly (it may be
     * stale during a failover): ROLE must say master. */
    if (r->opts.password[0] != '\0') {
        nd->gates++;            /* AUTH, queued by ctx_open */
    }
    if (r->opts.db != 0) {
        nd->gates++;
        redisAsyncCommand(ac, select_cb, nd, "SELECT %d", r->opts.db);
    }
    if (r->mode == TG_MODE_SENTINEL) {
        nd->gates++;
        redisAsyncCommand(ac, role_cb, nd, "ROLE");
    }
    redisAsyncCommand(ac, script_load_cb, nd, "SCRIPT LOAD %b", tg_gcra_lua,
                      r->script_len);

    ms = r->opts.timeout_ms > TG_REDIS_CONNECT_MIN_MS ? r->opts.timeout_ms
                                                      : TG_REDIS_CONNECT_MIN_MS;
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    evtimer_del(nd->connect_ev);
    evtimer_add(nd->connect_ev, &tv);
}

/* Free the context now (from our own events only).  Every sent command's
 * callback runs with NULL; disconnect_cb runs if it was connected. */
static void
conn_drop(struct tg_rnode *nd)
{
    redisAsyncContext *ac = nd->ac;

    if (ac == NULL) {
        return;
    }
    redisAsyncFree(ac);
    if (nd->ac == ac) {          /* not connected yet: no disconnect callback */
        nd->ac = NULL;
        nd->state = TG_REDIS_DOWN;
        if (!nd->r->destroying) {
            schedule_reconnect(nd);
        }
    }
}

static void
set_ready(struct tg_rnode *nd)
{
    nd->state = TG_REDIS_READY;
    nd->consec_tmo = 0;
    if (nd->tried) {
        nd->tried = 0;
        nd->r->disc_pref = nd->r->disc_from;    /* Sentinel: it answered well */
        sub_follow(nd->r);
    }
    nd->failed = 0;
    evtimer_del(nd->connect_ev);
    tg_info("redis: connected to %s:%d", nd->host, nd->port);
}

/* One of SELECT/ROLE answered well. */
static void
gate_pass(struct tg_rnode *nd)
{
    node_good(nd);
    if (nd->gates > 0 && --nd->gates == 0 && nd->state == TG_REDIS_CONNECTING) {
        set_ready(nd);
    }
}

static void
schedule_reconnect(struct tg_rnode *nd)
{
    struct tg_redis *r = nd->r;
    struct timeval tv;
    uint64_t x, ms;

    nd->state = TG_REDIS_DOWN;
    evtimer_del(nd->connect_ev);
    if (nd->tried) {
        nd->tried = 0;
        sentinel_distrust(r);
    }
    if (r->mode == TG_MODE_CLUSTER && !r->destroying) {
        nd->failed = 1;
        cluster_kick(r, nd);
    }
    if (r->destroying || evtimer_pending(nd->reconnect_ev, NULL)) {
        return;
    }
    /* xorshift64: jitter only, no need for quality */
    x = r->rng;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    r->rng = x;
    ms = (uint64_t)nd->backoff_ms * (800 + x % 401) / 1000;     /* +-20 % */
    if (nd->backoff_ms < TG_REDIS_BACKOFF_MAX_MS) {
        nd->backoff_ms *= 2;
        if (nd->backoff_ms > TG_REDIS_BACKOFF_MAX_MS) {
            nd->backoff_ms = TG_REDIS_BACKOFF_MAX_MS;
        }
    }
    tv.tv_sec = (time_t)(ms / 1000);
    tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
    evtimer_add(nd->reconnect_ev, &tv);
}

/* Drop the current context on a clean stack (not inside a hiredis or
 * batch callback). */
static void
schedule_drop(struct tg_rnode *nd)
{
    if (nd->ac == NULL) {
        return;
    }
    nd->drop_ac = nd->ac;
    event_active(nd->drop_ev, 0, 0);
}

static void
connect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_rnode *nd = ac->data;

    if (status != REDIS_OK) {
        /* hiredis frees ac after we return (and fails its commands) */
        node_warn(nd, "redis: connect to %s:%d failed: %s", nd->host, nd->port,
                  ac->errstr);
        if (nd->ac == ac) {
            nd->ac = NULL;
        }
        schedule_reconnect(nd);
        return;
    }
    if (nd->gates == 0) {
        set_ready(nd);
    }
}

static void
disconnect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_rnode *nd = ac->data;

    /* hiredis frees ac after we return */
    if (nd->ac == ac) {
        nd->ac = NULL;
    }
    if (nd->r->destroying) {
        return;
    }
    if (status != REDIS_OK) {
        node_warn(nd, "redis: connection to %s:%d lost: %s", nd->host, nd->port,
                  ac->errstr);
    } else {
        node_warn(nd, "redis: connection to %s:%d closed", nd->host, nd->port);
    }
    schedule_reconnect(nd);
}

static void
select_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_rnode *nd = privdata;
    redisReply *rep = reply;

    if (rep == NULL || nd->r->destroying || nd->ac != ac) {
        return;
    }
    if (rep->type == REDIS_REPLY_STATUS) {
        gate_pass(nd);
        return;
    }
    tg_error("redis: SELECT %d failed: %s", nd->r->opts.db,
             rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected reply");
    schedule_drop(nd);
}

/* Sentinel: the address the sentinels gave must be a master now. */
static void
role_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_rnode *nd = privdata;
    redisReply *rep = reply;

    if (rep == NULL || nd->r->destroying || nd->ac != ac) {
        return;
    }
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1
        && rep->element[0]->type == REDIS_REPLY_STRING
        && strcmp(rep->element[0]->str, "master") == 0) {
        gate_pass(nd);
        return;
    }
    node_warn(nd, "redis: %s:%d is not a master (%s): asking the sentinels again",
            nd->host, nd->port,
            rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1
            && rep->element[0]->type == REDIS_REPLY_STRING ? rep->element[0]->str
            : rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected ROLE reply");
    schedule_drop(nd);          /* reconnect = ask again, after a backoff */
}

static void
script_load_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_rnode *nd = privdata;
    redisReply *rep = reply;

    if (rep == NULL || nd->r->destroying) {
        return;
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        node_warn(nd, "redis: SCRIPT LOAD failed: %.200s", rep->str);
        if (strncmp(rep->str, "NOAUTH", 6) == 0 && nd->r->opts.password[0] == '\0') {
            tg_error("redis: %s:%d requires a password: set redis.password "
                     "(or redis.password_file)", nd->host, nd->port);
            set_last_error("%s:%d requires a password (NOAUTH): set redis.password",
                           nd->host, nd->port);
        }
        return;
    }
    node_good(nd);
    if (rep->type != REDIS_REPLY_STRING || rep->len != 40
               || strncasecmp(rep->str, nd->r->sha, 40) != 0) {
        tg_warn("redis: SCRIPT LOAD answered an unexpected digest");
    }
}

static void
drop_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_rnode *nd = arg;

    if (nd->ac != NULL && nd->ac == nd->drop_ac) {
        node_warn(nd, "redis: dropping the connection to %s:%d", nd->host, nd->port);
        conn_drop(nd);
    }
    nd->drop_ac = NULL;
}

static void
reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_rnode *nd = arg;
    struct tg_redis *r = nd->r;

    if (nd->ac != NULL || nd->resolving) {
        return;
    }
    r->stats.reconnects++;
    if (r->mode == TG_MODE_SENTINEL) {
        sentinel_discover(r);   /* connects when a sentinel answers */
    } else {
        conn_start(nd);
    }
}

static void
connect_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_rnode *nd = arg;

    if (nd->resolving) {
        node_warn(nd, "redis: resolving %s timed out", nd->host);
        dns_give_up(nd);
        schedule_reconnect(nd);
    } else if (nd->ac != NULL && nd->state != TG_REDIS_READY) {
        node_warn(nd, "redis: connect to %s:%d timed out", nd->host, nd->port);
        conn_drop(nd);
    }
}

/* ------------------------------------------------------------------ */
/* aux: one question on a short-lived connection                       */

static void aux_timer_cb(evutil_socket_t fd, short what, void *arg);

static tg_rc
aux_init(struct tg_redis *r, struct tg_raux *aux, tg_raux_done done)
{
    aux->r = r;
    aux->done = done;
    aux->timer = evtimer_new(r->base, aux_timer_cb, aux);
    return aux->timer != NULL ? TG_OK : TG_ERR;
}

/* Report the failure from our timer, on a clean stack. */
static void
aux_fail_later(struct tg_raux *aux)
{
    struct timeval now = { 0, 0 };

    if (aux->r->destroying) {
        return;
    }
    aux->failed = 1;
    evtimer_del(aux->timer);
    evtimer_add(aux->timer, &now);
}

static void
aux_connect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_raux *aux = ac->data;

    if (status != REDIS_OK && aux->ac == ac) {
        tg_warn("redis: connect to %s:%d failed: %s", aux->host, aux->port, ac->errstr);
        aux->ac = NULL;         /* hiredis frees ac after we return */
        aux_fail_later(aux);
    }
}

static void
aux_disconnect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_raux *aux = ac->data;

    if (aux->ac == ac) {
        aux->ac = NULL;
        aux_fail_later(aux);
    }
}

static void
aux_reply_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_raux *aux = privdata;

    if (aux->ac != ac) {
        return;                 /* given up on (deadline, cancel) */
    }
    aux->ac = NULL;
    if (reply == NULL) {
        aux_fail_later(aux);
        return;
    }
    evtimer_del(aux->timer);
    redisAsyncDisconnect(ac);   /* deferred by hiredis until we return */
    aux->done(aux->r, reply, aux);
}

static void
aux_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_raux *aux = arg;
    redisAsyncContext *ac = aux->ac;

    if (ac != NULL) {
        tg_warn("redis: %s:%d did not answer in time", aux->host, aux->port);
        aux->ac = NULL;
        redisAsyncFree(ac);     /* its callbacks see a stale context */
    } else if (!aux->failed) {
        return;
    }
    aux->failed = 0;
    aux->done(aux->r, NULL, aux);
}

/* Ask host:port argv (copied by hiredis) under the aux deadline; any
 * question still in flight is abandoned. */
static void
aux_start(struct tg_raux *aux, const char *host, int port, int argc, const char **argv)
{
    struct tg_redis *r = aux->r;
    redisAsyncContext *ac;
    struct timeval tv;
    unsigned ms;

    aux_cancel(aux);
    snprintf(aux->host, sizeof(aux->host), "%s", host);
    aux->port = port;
    ac = ctx_open(r, host, port, aux, aux == &r->disc, aux_auth_cb, r);
    if (ac == NULL) {
        aux_fail_later(aux);
        return;
    }
    redisAsyncSetConnectCallback(ac, aux_connect_cb);
    redisAsyncSetDisconnectCallback(ac, aux_disconnect_cb);
    if (redisAsyncCommandArgv(ac, aux_reply_cb, aux, argc, argv, NULL) != REDIS_OK) {
        redisAsyncFree(ac);
        aux_fail_later(aux);
        return;
    }
    aux->ac = ac;
    ms = r->opts.timeout_ms > TG_REDIS_AUX_MIN_MS ? r->opts.timeout_ms
                                                  : TG_REDIS_AUX_MIN_MS;
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    evtimer_add(aux->timer, &tv);
}

static void
aux_cancel(struct tg_raux *aux)
{
    redisAsyncContext *ac = aux->ac;

    if (aux->timer != NULL) {
        evtimer_del(aux->timer);
    }
    aux->failed = 0;
    if (ac != NULL) {
        aux->ac = NULL;
        redisAsyncFree(ac);
    }
}

/* ------------------------------------------------------------------ */
/* Sentinel                                                            */

/* Learn the master again: first the sentinel whose master last worked,
 * then the others in order; the first good answer wins. */
static void
sentinel_discover(struct tg_redis *r)
{
    r->stats.rediscoveries++;
    r->disc_idx = r->disc_pref;
    r->disc_tries = 0;
    sentinel_ask(r);
}

/* The master a sentinel named failed (connect, ROLE) before it worked:
 * that sentinel may be partitioned with a stale view; ask the next one
 * first from now on. */
static void
sentinel_distrust(struct tg_redis *r)
{
    if (r->disc_pref == r->disc_from) {
        r->disc_pref = (r->disc_from + 1) % r->opts.nsentinels;
    }
}

static void
sentinel_ask(struct tg_redis *r)
{
    const tg_redis_addr *s = &r->opts.sentinels[r->disc_idx];
    const char *argv[3] = { "SENTINEL", "get-master-addr-by-name",
                            r->opts.sentinel_master };

    aux_start(&r->disc, s->host, s->port, 3, argv);
}

static void
sentinel_done(struct tg_redis *r, const redisReply *rep, const struct tg_raux *aux)
{
    struct tg_rnode *nd = r->nodes[0];
    unsigned long port;

    if (rep != NULL && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2
        && rep->element[0]->type == REDIS_REPLY_STRING
        && rep->element[1]->type == REDIS_REPLY_STRING
        && rep->element[0]->len > 0 && rep->element[0]->len < sizeof(nd->host)
        && parse_uint(rep->element[1]->str, rep->element[1]->len, 65535, &port) == TG_OK
        && port > 0) {
        if (strcmp(nd->host, rep->element[0]->str) != 0 || nd->port != (int)port) {
            tg_info("redis: sentinel %s:%d: master \"%s\" is %s:%lu", aux->host,
                    aux->port, r->opts.sentinel_master, rep->element[0]->str, port);
        }
        if (nd->ac == NULL && !nd->resolving) {
            snprintf(nd->host, sizeof(nd->host), "%s", rep->element[0]->str);
            nd->port = (int)port;
            r->disc_from = r->disc_idx;
            nd->tried = 1;
            evtimer_del(nd->reconnect_ev);
            conn_start(nd);
        }
        return;
    }
    if (rep != NULL) {
        tg_warn("redis: sentinel %s:%d does not know master \"%s\"%s%.200s",
                aux->host, aux->port, r->opts.sentinel_master,
                rep->type == REDIS_REPLY_ERROR ? ": " : "",
                rep->type == REDIS_REPLY_ERROR ? rep->str : "");
    }
    if (nd->ac != NULL) {
        return;                 /* connected meanwhile */
    }
    if (++r->disc_tries < r->opts.nsentinels) {
        r->disc_idx = (r->disc_idx + 1) % r->opts.nsentinels;
        sentinel_ask(r);        /* a new context: fine inside the old one's callback */
        return;
    }
    schedule_reconnect(nd);     /* every sentinel failed: back off */
}

static void
sub_fail(struct tg_redis *r)
{
    struct timeval tv = { TG_REDIS_SUB_RETRY_MS / 1000,
                          (TG_REDIS_SUB_RETRY_MS % 1000) * 1000 };

    if (r->destroying) {
        return;
    }
    r->sub_idx = (r->sub_idx + 1) % r->opts.nsentinels;
    evtimer_add(r->sub_ev, &tv);
}

static void
sub_connect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_redis *r = ac->data;

    if (status != REDIS_OK && r->sub_ac == ac) {
        r->sub_ac = NULL;
        sub_fail(r);
    }
}

static void
sub_disconnect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_redis *r = ac->data;

    if (r->sub_ac == ac) {
        r->sub_ac = NULL;
        sub_fail(r);
    }
}

/* "+switch-master" messages: "<master> <oldip> <oldport> <newip> <newport>". */
static void
sub_msg_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_redis *r = privdata;
    redisReply *rep = reply, *msg;
    char name[64], newip[TG_REDIS_HOSTLEN];
    int newport;
    struct tg_rnode *nd;

    if (rep == NULL || r->destroying || ac != r->sub_ac
        || rep->type != REDIS_REPLY_ARRAY || rep->elements != 3
        || rep->element[0]->type != REDIS_REPLY_STRING
        || strcmp(rep->element[0]->str, "message") != 0
        || rep->element[2]->type != REDIS_REPLY_STRING) {
        return;
    }
    msg = rep->element[2];
    if (sscanf(msg->str, "%63s %*s %*d %255s %d", name, newip, &newport) != 3
        || strcmp(name, r->opts.sentinel_master) != 0) {
        return;
    }
    nd = r->nodes[0];
    r->stats.switches++;
    tg_info("redis: +switch-master: \"%s\" is now %s:%d", name, newip, newport);
    if (nd->state == TG_REDIS_READY && nd->port == newport
        && strcmp(nd->host, newip) == 0) {
        return;                 /* already there */
    }
    node_kick(nd);
}

/* Sentinel: listen for +switch-master on the sentinel that answered well
 * (a frozen or partitioned one would keep the subscription silent).  Not
 * called from the subscription's own callbacks. */
static void
sub_follow(struct tg_redis *r)
{
    redisAsyncContext *ac = r->sub_ac;

    if (r->sub_idx == r->disc_pref || r->destroying) {
        return;
    }
    r->sub_idx = r->disc_pref;
    if (ac != NULL) {
        r->sub_ac = NULL;       /* its callbacks now see a stale context */
        redisAsyncFree(ac);
    }
    evtimer_del(r->sub_ev);
    sub_start(r);
}

static void
sub_start(struct tg_redis *r)
{
    const tg_redis_addr *s = &r->opts.sentinels[r->sub_idx];
    redisAsyncContext *ac = ctx_open(r, s->host, s->port, r, 1, aux_auth_cb, r);

    if (ac == NULL) {
        sub_fail(r);
        return;
    }
    redisAsyncSetConnectCallback(ac, sub_connect_cb);
    redisAsyncSetDisconnectCallback(ac, sub_disconnect_cb);
    redisAsyncCommand(ac, sub_msg_cb, r, "SUBSCRIBE +switch-master");
    r->sub_ac = ac;
}

static void
sub_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis *r = arg;

    if (r->sub_ac == NULL && !r->destroying) {
        sub_start(r);
    }
}

/* ------------------------------------------------------------------ */
/* Cluster: the slot map                                               */

static void
refresh_in(struct tg_redis *r, unsigned ms)
{
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };

    if (r->destroying) {
        return;
    }
    evtimer_del(r->refresh_ev);
    evtimer_add(r->refresh_ev, &tv);
}

/* Ask for the map unless a question is already out. */
static void
cluster_refresh(struct tg_redis *r)
{
    if (r->slots.ac != NULL || r->slots.failed || r->destroying) {
        return;
    }
    r->slots_tries = 0;
    r->slots_asked_ms = tg_now_ms();
    cluster_ask(r);
}

/* A node failed: if it serves slots, ask for the map again now (another
 * node answers: cluster_ask skips failed ones), at most every
 * TG_REDIS_KICK_MS; slots_done keeps asking while a failed node still
 * serves slots, so a promotion is seen within about that time. */
static void
cluster_kick(struct tg_redis *r, const struct tg_rnode *nd)
{
    uint16_t want = 0;
    uint64_t since;

    if (r->slot_node == NULL || !r->map_ok) {
        return;
    }
    for (size_t i = 0; i < r->nnodes; i++) {
        if (r->nodes[i] == nd) {
            want = (uint16_t)(i + 1);
        }
    }
    for (size_t s = 0; want != 0 && s < TG_REDIS_CLUSTER_SLOTS; s++) {
        if (r->slot_node[s] == want) {
            r->stats.map_kicks++;
            since = tg_now_ms() - r->slots_asked_ms;
            if (since >= TG_REDIS_KICK_MS) {
                cluster_refresh(r);
            } else {
                refresh_in(r, (unsigned)(TG_REDIS_KICK_MS - since));
            }
            return;
        }
    }
}

/* A candidate for CLUSTER SLOTS that is known to have failed. */
static int
cluster_failed_addr(const struct tg_redis *r, const char *host, int port)
{
    for (size_t i = 0; i < r->nnodes; i++) {
        const struct tg_rnode *nd = r->nodes[i];
        if (nd->failed && nd->port == port
            && (strcmp(nd->ip, host) == 0 || strcmp(nd->host, host) == 0)) {
            return 1;
        }
    }
    return 0;
}

/* Candidates: the configured seeds, then every node learnt so far. */
static void
cluster_ask(struct tg_redis *r)
{
    const char *argv[2] = { "CLUSTER", "SLOTS" };
    size_t total = r->opts.ncluster + r->nnodes;
    size_t i = r->slots_idx % total;

    /* skip failed candidates, unless every one has failed */
    for (size_t n = 0; n < total; n++, i = (i + 1) % total) {
        const char *h = i < r->opts.ncluster ? r->opts.cluster_nodes[i].host
                        : r->nodes[i - r->opts.ncluster]->ip;
        int p = i < r->opts.ncluster ? r->opts.cluster_nodes[i].port
                : r->nodes[i - r->opts.ncluster]->port;
        if (!cluster_failed_addr(r, h, p)) {
            r->slots_idx = i;
            break;
        }
    }
    i = r->slots_idx % total;
    if (i < r->opts.ncluster) {
        aux_start(&r->slots, r->opts.cluster_nodes[i].host,
                  r->opts.cluster_nodes[i].port, 2, argv);
    } else {
        struct tg_rnode *nd = r->nodes[i - r->opts.ncluster];
        aux_start(&r->slots, nd->ip[0] != '\0' ? nd->ip : nd->host, nd->port, 2, argv);
    }
}

/* [[start, end, [host, port, id...], replicas...]...] into a new map. */
static tg_rc
slots_parse(struct tg_redis *r, const redisReply *rep, const char *asked,
            uint16_t *map)
{
    char host[TG_REDIS_HOSTLEN];
    size_t idx;

    if (rep->type != REDIS_REPLY_ARRAY || rep->elements == 0) {
        return TG_ERR;
    }
    for (size_t i = 0; i < rep->elements; i++) {
        const redisReply *e = rep->element[i], *m;
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3
            || e->element[0]->type != REDIS_REPLY_INTEGER
            || e->element[1]->type != REDIS_REPLY_INTEGER
            || e->element[0]->integer < 0
            || e->element[0]->integer > e->element[1]->integer
            || e->element[1]->integer >= TG_REDIS_CLUSTER_SLOTS) {
            return TG_ERR;
        }
        m = e->element[2];
        if (m->type != REDIS_REPLY_ARRAY || m->elements < 2
            || m->element[0]->type != REDIS_REPLY_STRING
            || m->element[1]->type != REDIS_REPLY_INTEGER
            || m->element[1]->integer <= 0 || m->element[1]->integer > 65535
            || m->element[0]->len >= sizeof(host)) {
            return TG_ERR;
        }
        if (strcmp(m->element[0]->str, "?") == 0) {
            continue;           /* endpoint unknown to that node */
        }
        /* "" means: the address you asked */
        snprintf(host, sizeof(host), "%s",
                 m->element[0]->len > 0 ? m->element[0]->str : asked);
        if (node_get(r, host, (int)m->element[1]->integer, &idx) == NULL) {
            return TG_ERR;
        }
        for (long long s = e->element[0]->integer; s <= e->element[1]->integer; s++) {
            map[s] = (uint16_t)(idx + 1);
        }
    }
    return TG_OK;
}

static void
slots_done(struct tg_redis *r, const redisReply *rep, const struct tg_raux *aux)
{
    uint16_t *map;
    size_t known = 0;

    if (rep != NULL) {
        map = tg_xcalloc(TG_REDIS_CLUSTER_SLOTS, sizeof(*map));
        if (slots_parse(r, rep, aux->host, map) == TG_OK) {
            memcpy(r->slot_node, map, TG_REDIS_CLUSTER_SLOTS * sizeof(*map));
            free(map);
            for (size_t s = 0; s < TG_REDIS_CLUSTER_SLOTS; s++) {
                known += r->slot_node[s] != 0;
            }
            if (!r->map_ok || known < TG_REDIS_CLUSTER_SLOTS) {
                tg_info("redis: cluster slot map from %s:%d: %zu nodes, %zu of %d "
                        "slots served", aux->host, aux->port, r->nnodes, known,
                        TG_REDIS_CLUSTER_SLOTS);
            }
            r->map_ok = 1;
            r->stats.map_refreshes++;
            refresh_in(r, TG_REDIS_REFRESH_MS);
            for (size_t s = 0; s < TG_REDIS_CLUSTER_SLOTS; s++) {
                if (r->slot_node[s] != 0 && r->nodes[r->slot_node[s] - 1]->failed) {
                    /* a failed node still serves slots: ask again soon */
                    refresh_in(r, 2 * TG_REDIS_KICK_MS);
                    break;
                }
            }
            return;
        }
        free(map);
        tg_warn("redis: %s:%d: unexpected CLUSTER SLOTS reply%s%.200s", aux->host,
                aux->port, rep->type == REDIS_REPLY_ERROR ? ": " : "",
                rep->type == REDIS_REPLY_ERROR ? rep->str : "");
    }
    r->slots_idx++;
    if (++r->slots_tries < r->opts.ncluster + r->nnodes) {
        cluster_ask(r);
        return;
    }
    refresh_in(r, TG_REDIS_REFRESH_RETRY_MS);
}

static void
refresh_cb(evutil_socket_t fd, short what, void *arg)
{
    cluster_refresh(arg);
}

/* ------------------------------------------------------------------ */
/* queue and flush                                                     */

static void
queue_op(struct tg_redis *r, struct tg_redis_op *op)
{
    op->next = NULL;
    *r->pending_tail = op;
    r->pending_tail = &op->next;
    if (r->pending == op) {
        event_active(r->flush_ev, 0, 0);
    }
}

static int
node_usable(const struct tg_rnode *nd)
{
    return nd != NULL && nd->state == TG_REDIS_READY && nd->ac != NULL;
}

/* Cluster: into this flush's batch for the op's slot (new batches are
 * pushed on *built and started by the caller). */
static void
route_cluster(struct tg_redis *r, struct tg_redis_op *op, struct tg_redis_batch **built)
{
    unsigned slot = op->phase == 2 ? op->slot2 : op->slot1;
    struct tg_rnode *nd = NULL;
    struct tg_redis_batch *b;

    if (r->map_ok && r->slot_node[slot] != 0) {
        nd = r->nodes[r->slot_node[slot] - 1];
    } else {
        cluster_refresh(r);
    }
    if (!node_usable(nd)) {
        op_fail(r, op);
        free(op);
        return;
    }
    b = op->kind == TG_OP_CHARGE ? r->slot_batch[slot] : NULL;
    if (b == NULL || b->nops >= r->opts.max_batch) {
        b = batch_new(r, nd, (enum tg_redis_kind)op->kind);
        b->slot = (int)slot;
        b->flush_next = *built;
        *built = b;
        if (op->kind == TG_OP_CHARGE) {
            r->slot_batch[slot] = b;
        }
    }
    batch_add(b, op);
}

static void
flush_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis *r = arg;
    struct tg_redis_op *list, *op;
    struct tg_redis_batch *cur = NULL, *b, *built = NULL;
    struct tg_rnode *nd = r->mode != TG_MODE_CLUSTER ? r->nodes[0] : NULL;

    /* Take the list first: callbacks below may queue new ops, which go
     * out on the next run of this event. */
    list = r->pending;
    r->pending = NULL;
    r->pending_tail = &r->pending;

    while ((op = list) != NULL) {
        list = op->next;
        op->next = NULL;
        if (!op_live(op)) {
            op_refund(r, op);   /* phase 2 of a cancelled request */
            free(op);
            continue;
        }
        if ((op->kind == TG_OP_CHARGE && op->n == 0) || op->deadline_us <= tg_now_us()) {
            op_fail(r, op);
            free(op);
            continue;
        }
        if (r->mode == TG_MODE_CLUSTER) {
            route_cluster(r, op, &built);
            continue;
        }
        if (!node_usable(nd)) {
            op_fail(r, op);
            free(op);
            continue;
        }
        if (op->kind == TG_OP_HGET) {
            b = batch_new(r, nd, TG_OP_HGET);
            batch_add(b, op);
            batch_start(b);
            continue;
        }
        if (cur == NULL) {
            cur = batch_new(r, nd, TG_OP_CHARGE);
        }
        batch_add(cur, op);
        if (cur->nops >= r->opts.max_batch) {
            b = cur;
            cur = NULL;
            batch_start(b);
        }
    }
    if (cur != NULL) {
        batch_start(cur);
    }
    /* Forget the slot index before starting: a start may answer ops, and
     * their callbacks may queue (never route) new ones. */
    for (b = built; b != NULL; b = b->flush_next) {
        if (b->slot >= 0) {
            r->slot_batch[b->slot] = NULL;
        }
    }
    while ((b = built) != NULL) {
        built = b->flush_next;
        b->flush_next = NULL;
        batch_start(b);
    }
}

/* ------------------------------------------------------------------ */
/* batches                                                             */

static size_t
batch_ev_offset(void)
{
    size_t a = _Alignof(max_align_t);
    return (sizeof(struct tg_redis_batch) + a - 1) / a * a;
}

static struct tg_redis_batch *
batch_new(struct tg_redis *r, struct tg_rnode *nd, enum tg_redis_kind kind)
{
    size_t off = batch_ev_offset();
    struct tg_redis_batch *b = tg_xcalloc(1, off + event_get_struct_event_size());

    b->r = r;
    b->node = nd;
    b->slot = -1;
    b->kind = (uint8_t)kind;
    b->timer = (struct event *)(void *)((char *)b + off);
    return b;
}

static void
batch_add(struct tg_redis_batch *b, struct tg_redis_op *op)
{
    if (b->tail != NULL) {
        b->tail->next = op;
    } else {
        b->ops = op;
    }
    b->tail = op;
    b->nops++;
    b->nkeys += op->kind == TG_OP_CHARGE ? (size_t)__builtin_popcount(op->mask) : op->n;
}

/* Link, arm the deadline, send.  On a send failure the ops are answered
 * TG_ERR and the batch is gone. */
static void
batch_start(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;

    b->next = r->inflight;
    if (r->inflight != NULL) {
        r->inflight->prev = b;
    }
    r->inflight = b;
    event_assign(b->timer, r->base, -1, 0, batch_timeout_cb, b);
    batch_arm(b, tg_now_us());
    if (r->mode == TG_MODE_CLUSTER) {
        if (!tg_breaker_allow(&b->node->brk, tg_now_ms())) {
            batch_fail(b);      /* that node's breaker is open: at once */
            batch_free(b);
            return;
        }
        b->brk = 1;
    }
    if (batch_send(b) != TG_OK) {
        batch_fail(b);
        batch_free(b);
    }
}

/*
 * One command for the batch into r's scratch arrays, then to hiredis (which
 * copies it): EVALSHA sha numkeys KEYS... nreq (nbuckets cost (T burst)...)...
 * or EVAL script ... after NOSCRIPT; HGET key field.  Only the buckets in
 * each op's mask are sent.  After ASK, ASKING goes first.
 */
static tg_rc
batch_send(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;
    redisAsyncContext *ac = b->node != NULL ? b->node->ac : NULL;
    struct tg_redis_op *op = b->ops;
    size_t argc, nnum, i = 0;
    char *np;
    int rc;

    if (ac == NULL) {
        return TG_ERR;
    }
    if (b->kind == TG_OP_HGET) {
        argc = 3;
        nnum = 0;
    } else {
        argc = 3 + b->nkeys + 1 + 2 * b->nops + 3 * b->nkeys;
        nnum = 1 + 1 + 2 * b->nops + 3 * b->nkeys;
    }
    if (argc > r->argcap) {
        r->argcap = argc * 2;
        free(r->argv);
        free(r->argvlen);
        r->argv = tg_xmalloc(r->argcap * sizeof(*r->argv));
        r->argvlen = tg_xmalloc(r->argcap * sizeof(*r->argvlen));
    }
    if (nnum * TG_REDIS_NUMLEN > r->numcap) {
        r->numcap = nnum * TG_REDIS_NUMLEN * 2;
        free(r->num);
        r->num = tg_xmalloc(r->numcap);
    }
    np = r->num;

#define TG_ARG(p, l) do { r->argv[i] = (p); r->argvlen[i] = (l); i++; } while (0)
#define TG_NUM(v) do { int l_ = snprintf(np, TG_REDIS_NUMLEN, "%llu",           \
                                         (unsigned long long)(v));              \
                       TG_ARG(np, (size_t)l_); np += l_ + 1; } while (0)

    if (b->kind == TG_OP_HGET) {
        TG_ARG("HGET", 4);
        TG_ARG(op->str, op->len[0]);
        TG_ARG(op->str + op->len[0] + 1, op->len[1]);
    } else {
        if (b->eval) {
            TG_ARG("EVAL", 4);
            TG_ARG(tg_gcra_lua, r->script_len);
        } else {
            TG_ARG("EVALSHA", 7);
            TG_ARG(r->sha, 40);
        }
        TG_NUM(b->nkeys);
        for (op = b->ops; op != NULL; op = op->next) {
            const char *s = op->str;
            for (size_t k = 0; k < op->n; k++) {
                if (op->mask & (1u << k)) {
                    TG_ARG(s, op->len[k]);
                }
                s += op->len[k] + 1;
            }
        }
        TG_NUM(b->nops);
        for (op = b->ops; op != NULL; op = op->next) {
            TG_NUM(__builtin_popcount(op->mask));
            TG_NUM(op->cost);
            for (size_t k = 0; k < op->n; k++) {
                if (op->mask & (1u << k)) {
                    TG_NUM(op->lim[k].interval_us);
                    TG_NUM(op->lim[k].burst);
                    TG_NUM(op->floor_us[k]);
                }
            }
        }
    }
#undef TG_NUM
#undef TG_ARG

    if (b->asking && redisAsyncCommand(ac, NULL, NULL, "ASKING") != REDIS_OK) {
        return TG_ERR;
    }
    rc = redisAsyncCommandArgv(ac, batch_reply_cb, b, (int)i, r->argv, r->argvlen);
    if (rc != REDIS_OK) {
        return TG_ERR;
    }
    r->stats.calls++;
    return TG_OK;
}

/* Cluster: the node's breaker learns the outcome of this call, once. */
static void
batch_outcome(struct tg_redis_batch *b, int ok)
{
    if (!b->brk) {
        return;
    }
    b->brk = 0;
    if (ok > 0) {
        tg_breaker_success(&b->node->brk, tg_now_ms());
    } else if (ok == 0) {
        tg_breaker_failure(&b->node->brk, tg_now_ms());
    } else {
        tg_breaker_abandon(&b->node->brk, tg_now_ms());
    }
}

/* Answer every live op TG_ERR (no-op once done, or while destroying). */
static void
batch_fail(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;

    if (b->done) {
        return;
    }
    b->done = 1;
    if (r->destroying) {
        return;
    }
    for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
        op_fail(r, op);
    }
}

static void
batch_free(struct tg_redis_batch *b)
{
    struct tg_redis *r = b->r;
    struct tg_redis_op *op, *next;

    if (b->timer_set) {
        event_del(b->timer);
    }
    if (!r->destroying) {
        batch_outcome(b, -1);
    }
    if (b->prev != NULL) {
        b->prev->next = b->next;
    } else if (r->inflight == b) {
        r->inflight = b->next;
    }
    if (b->next != NULL) {
        b->next->prev = b->prev;
    }
    for (op = b->ops; op != NULL; op = next) {
        next = op->next;
        free(op);
    }
    free(b);
}

/* Errors that mean "this is no longer the master" (Sentinel). */
static int
is_failover_error(const redisReply *rep)
{
    return strncmp(rep->str, "READONLY", 8) == 0 || strncmp(rep->str, "LOADING", 7) == 0
           || strncmp(rep->str, "MASTERDOWN", 10) == 0;
}

/* hiredis calls this exactly once per command sent: the reply, or NULL
 * when the context goes away.  The batch ends here (or is sent again:
 * NOSCRIPT, MOVED, ASK). */
static void
batch_reply_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_redis_batch *b = privdata;
    struct tg_redis *r = b->r;
    redisReply *rep = reply;

    if (b->done || rep == NULL) {
        batch_outcome(b, rep != NULL);
        if (rep != NULL && b->kind == TG_OP_CHARGE && rep->type == REDIS_REPLY_ARRAY) {
            deliver_charges(b, rep);    /* late: what it charged is given back */
        }
        batch_fail(b);          /* no-op if done */
        batch_free(b);
        return;
    }
    batch_outcome(b, 1);        /* the node answered */
    b->node->consec_tmo = 0;
    if (rep->type != REDIS_REPLY_ERROR) {
        node_good(b->node);
    }
    if (rep->type == REDIS_REPLY_ERROR) {
        if (b->kind == TG_OP_CHARGE && !b->eval && strncmp(rep->str, "NOSCRIPT", 8) == 0) {
            r->stats.noscript++;
            b->eval = 1;
            if (batch_send(b) == TG_OK) {
                return;         /* same batch, same deadline, next reply */
            }
            batch_fail(b);
            batch_free(b);
            return;
        }
        if (r->mode == TG_MODE_CLUSTER && batch_redirect(b, rep)) {
            return;
        }
        if (is_failover_error(rep)) {
            node_warn(b->node, "redis: %s:%d: %.200s", b->node->host, b->node->port,
                      rep->str);
            if (r->mode == TG_MODE_SENTINEL) {
                node_kick(b->node);     /* never keep writing to a replica */
            } else if (r->mode == TG_MODE_CLUSTER) {
                cluster_refresh(r);
            }
        }
    }
    if (b->kind == TG_OP_CHARGE) {
        deliver_charges(b, rep);
    } else {
        deliver_hget(b, rep);
    }
    batch_free(b);
}

/*
 * Cluster: "MOVED <slot> <host>:<port>" (the map entry is fixed, the whole
 * map refreshed in the background) or "ASK <slot> <host>:<port>" (ASKING
 * first, no map change): the batch - every key in that one slot - goes to
 * that node under its original deadline.  1 if it was sent again.
 */
static int
batch_redirect(struct tg_redis_batch *b, const redisReply *rep)
{
    struct tg_redis *r = b->r;
    const char *p, *sp;
    char host[TG_REDIS_HOSTLEN];
    unsigned long slot;
    struct tg_rnode *nd;
    size_t idx;
    int ask, port;

    if (strncmp(rep->str, "MOVED ", 6) == 0) {
        ask = 0;
        p = rep->str + 6;
    } else if (strncmp(rep->str, "ASK ", 4) == 0) {
        ask = 1;
        p = rep->str + 4;
    } else {
        return 0;
    }
    sp = strchr(p, ' ');
    if (sp == NULL || parse_uint(p, (size_t)(sp - p), TG_REDIS_CLUSTER_SLOTS - 1, &slot)
        != TG_OK || split_hostport(sp + 1, strlen(sp + 1), host, sizeof(host), &port)
        != TG_OK) {
        tg_warn("redis: cannot parse the redirection \"%.200s\"", rep->str);
        return 0;
    }
    if (b->redirects >= TG_REDIS_MAX_REDIRECTS) {
        tg_warn("redis: too many redirections for slot %lu: %.200s", slot, rep->str);
        return 0;
    }
    nd = node_get(r, host[0] != '\0' ? host : b->node->host, port, &idx);
    if (nd == NULL) {
        return 0;
    }
    if (!ask) {
        r->slot_node[slot] = (uint16_t)(idx + 1);
        cluster_refresh(r);
    }
    b->redirects++;
    r->stats.redirects++;
    b->node = nd;
    b->asking = (uint8_t)ask;
    if (!node_usable(nd)) {
        return 0;               /* a new node, still connecting */
    }
    if (batch_send(b) != TG_OK) {
        batch_fail(b);
        batch_free(b);
    }
    return 1;
}

/* Arm the batch's timer for the earliest deadline of its live ops (each
 * request has one deadline for all its Redis calls); 0 if none is left. */
static int
batch_arm(struct tg_redis_batch *b, uint64_t now)
{
    uint64_t next = UINT64_MAX, us;
    struct timeval tv;

    for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
        if (op_live(op) && op->deadline_us < next) {
            next = op->deadline_us;
        }
    }
    if (next == UINT64_MAX) {
        return 0;
    }
    us = next > now ? next - now : 0;
    tv.tv_sec = (time_t)(us / 1000000);
    tv.tv_usec = (suseconds_t)(us % 1000000);
    event_add(b->timer, &tv);
    b->timer_set = 1;
    return 1;
}

static void
batch_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis_batch *b = arg;
    struct tg_redis *r = b->r;
    uint64_t now = tg_now_us();
    int later = 0;
    redisReader *rd;

    b->timer_set = 0;
    if (b->done) {
        return;
    }
    /* Ops whose deadline is still ahead (a request that came with more
     * time left) keep waiting for the reply. */
    for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
        later |= op_live(op) && op->deadline_us > now + 500;
    }
    if (later) {
        for (struct tg_redis_op *op = b->ops; op != NULL; op = op->next) {
            if (op_live(op) && op->deadline_us <= now + 500) {
                r->stats.timeouts++;
                op_fail(r, op);
            }
        }
        if (batch_arm(b, now)) {
            return;
        }
    }
    r->stats.timeouts++;
    batch_outcome(b, 0);
    batch_fail(b);              /* the batch waits for its reply or NULL */
    rd = b->node->ac != NULL ? b->node->ac->c.reader : NULL;
    if (rd != NULL && (rd->len > rd->pos || rd->ridx > 0)) {
        /* a reply is still arriving past a deadline: a huge or endless
         * one; the connection is not worth keeping */
        node_warn(b->node, "redis: %s:%d: reply still arriving at the deadline: "
                  "dropping the connection", b->node->host, b->node->port);
        b->node->consec_tmo = 0;
        schedule_drop(b->node);
    } else if (++b->node->consec_tmo >= TG_REDIS_MAX_CONSEC_TMO) {
        b->node->consec_tmo = 0;
        schedule_drop(b->node);
    }
}

/* Bucket index of the j-th bucket sent (bit j set in mask). */
static int
mask_index(uint8_t mask, long long j)
{
    for (int k = 0; k < TG_CHARGE_MAX_BUCKETS; k++) {
        if ((mask & (1u << k)) && j-- == 0) {
            return k;
        }
    }
    return -1;
}

/* A split request's answer from its two parts (a: phase 1, allowed; b:
 * phase 2), with the rules of tg_gcra_charge as far as two answers allow. */
static void
combine(const tg_gcra_result *a, const tg_gcra_result *b, uint32_t cost,
        tg_gcra_result *out)
{
    if (b->allowed) {
        int pick_b = b->remaining < a->remaining
                     || (b->remaining == a->remaining
                         && (b->reset_us > a->reset_us
                             || (b->reset_us == a->reset_us && b->limiting < a->limiting)));
        *out = pick_b ? *b : *a;
        out->allowed = 1;
        out->retry_us = 0;
        return;
    }
    /* denied: remaining is what was there before this request */
    *out = *b;
    if ((uint64_t)a->remaining + cost < out->remaining) {
        out->remaining = a->remaining + cost;
    }
}

/* One request's answer, elements e[0..5+nb) of the script's reply, into
 * res (bucket indices mapped through op->mask); 0 if it is not a valid
 * answer (then only this request fails). */
static int
charge_answer(redisReply *const *e, const struct tg_redis_op *op, tg_gcra_result *res)
{
    int nb = __builtin_popcount(op->mask);

    /* buckets not in this call (the other part of a Cluster split) hold
     * nothing we know of: 0, never stack garbage */
    memset(res->held_us, 0, sizeof(res->held_us));
    for (int k = 0; k < 5 + nb; k++) {
        if (e[k]->type != REDIS_REPLY_INTEGER || e[k]->integer < 0) {
            return 0;
        }
    }
    if (e[0]->integer > 1 || e[4]->integer >= nb) {
        return 0;
    }
    res->allowed = (int)e[0]->integer;
    res->remaining = e[1]->integer > UINT32_MAX ? UINT32_MAX : (uint32_t)e[1]->integer;
    res->retry_us = (uint64_t)e[2]->integer;
    res->reset_us = (uint64_t)e[3]->integer;
    res->limiting = mask_index(op->mask, e[4]->integer);
    for (int j = 0; j < nb; j++) {
        res->held_us[mask_index(op->mask, j)] = (uint64_t)e[5 + j]->integer;
    }
    return 1;
}

static void
deliver_charges(struct tg_redis_batch *b, const redisReply *rep)
{
    struct tg_redis *r = b->r;
    struct tg_redis_op *op, **link, *again = NULL, **again_tail = &again;
    tg_gcra_result res, part;
    uint64_t script_now = 0;
    size_t i, nb;

    if (rep->type == REDIS_REPLY_ERROR) {
        node_warn(b->node, "redis: charge script failed: %.200s", rep->str);
        goto fail;
    }
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 5 * b->nops + b->nkeys + 1) {
        node_warn(b->node, "redis: charge script reply: type %d with %zu elements, "
                "expected an array of %zu", rep->type,
                rep->type == REDIS_REPLY_ARRAY ? rep->elements : (size_t)0,
                5 * b->nops + b->nkeys + 1);
        goto fail;
    }
    if (rep->element[rep->elements - 1]->type == REDIS_REPLY_INTEGER
        && rep->element[rep->elements - 1]->integer > 0) {
        script_now = (uint64_t)rep->element[rep->elements - 1]->integer;
    }

    b->done = 1;
    /* Phase 1 parts that passed leave the batch for phase 2 (requeued
     * after the loop, so a callback's new ops keep their order). */
    for (i = 0, link = &b->ops; (op = *link) != NULL; i += 5 + nb) {
        tg_redis_charge_cb cb;
        size_t sent = (size_t)__builtin_popcount(op->mask);

        nb = sent;
        if (!charge_answer(rep->element + i, op, &part)) {
            node_warn(b->node, "redis: charge script reply: request %zu out of range", i);
            link = &op->next;
            op_fail(r, op);
            continue;
        }
        if (op->phase == 1) {
            /* each key's new TAT P = now + its debt after the charge: a
             * Cluster refund gives back at most what this request added */
            for (size_t j = 0; j < sent; j++) {
                op->p1[j] = part.allowed && script_now > 0
                            ? script_now + (uint64_t)rep->element[i + 5 + j]->integer : 0;
            }
        }

        if (op->phase == 1 && part.allowed) {
            op->res1 = part;
            op->refund_due = 1;
            if (op->charge_cb != NULL) {
                op->phase = 2;
                op->mask = op->mask2;
                *link = op->next;
                op->next = NULL;
                *again_tail = op;
                again_tail = &op->next;
                continue;
            }
            op_refund(r, op);   /* cancelled meanwhile */
            link = &op->next;
            continue;
        }
        if (op->phase == 2) {
            combine(&op->res1, &part, op->cost, &res);
            for (size_t k = 0; k < op->n; k++) {
                res.held_us[k] = op->mask1 & (1u << k) ? op->res1.held_us[k]
                                                       : part.held_us[k];
            }
            if (!res.allowed) {
                op_refund(r, op);
            }
            op->refund_due = 0;
        } else {
            res = part;
        }
        link = &op->next;
        cb = op->charge_cb;
        if (cb == NULL) {
            /* Answered after its deadline (or cancelled): the request was
             * decided without this charge, so give it back. */
            if (part.allowed && script_now > 0) {
                late_refund(r, b->node, op, &part, script_now);
            }
            continue;
        }
        op->charge_cb = NULL;
        r->stats.charges++;
        res.now_us = script_now;
        cb(op->arg, TG_OK, &res);
    }
    while ((op = again) != NULL) {
        again = op->next;
        queue_op(r, op);
    }
    return;

fail:
    batch_fail(b);
}

static void
deliver_hget(struct tg_redis_batch *b, const redisReply *rep)
{
    struct tg_redis_op *op = b->ops;
    tg_redis_str_cb cb = op->str_cb;

    b->done = 1;
    if (cb == NULL) {
        return;
    }
    op->str_cb = NULL;
    if (rep->type == REDIS_REPLY_STRING) {
        cb(op->arg, TG_OK, rep->str, rep->len);
    } else if (rep->type == REDIS_REPLY_NIL) {
        cb(op->arg, TG_OK, NULL, 0);
    } else {
        node_warn(b->node, "redis: HGET answered type %d%s%.200s", rep->type,
                rep->type == REDIS_REPLY_ERROR ? ": " : "",
                rep->type == REDIS_REPLY_ERROR ? rep->str : "");
        cb(op->arg, TG_ERR, NULL, 0);
    }
}

/* ------------------------------------------------------------------ */
/* ops                                                                 */

static int
op_live(const struct tg_redis_op *op)
{
    return op->kind == TG_OP_CHARGE ? op->charge_cb != NULL : op->str_cb != NULL;
}

/* The k-th string of op. */
static const char *
op_key(const struct tg_redis_op *op, size_t k)
{
    const char *s = op->str;

    for (size_t i = 0; i < k; i++) {
        s += op->len[i] + 1;
    }
    return s;
}

/* Answer TG_ERR once (the op is not freed here).  A charged first part
 * is kept when the requester is told: the fallback may admit it, and a
 * request admitted without any Redis charge would let the consumer past
 * its limit; it is given back only when nobody waits (cancelled). */
static void
op_fail(struct tg_redis *r, struct tg_redis_op *op)
{
    if (op->kind == TG_OP_CHARGE) {
        tg_redis_charge_cb cb = op->charge_cb;
        if (cb == NULL) {
            op_refund(r, op);
        }
        op->refund_due = 0;
        if (cb != NULL) {
            op->charge_cb = NULL;
            r->stats.errors++;
            cb(op->arg, TG_ERR, NULL);
        }
    } else {
        tg_redis_str_cb cb = op->str_cb;
        if (cb != NULL) {
            op->str_cb = NULL;
            cb(op->arg, TG_ERR, NULL, 0);
        }
    }
}

/*
 * Cluster: give back what phase 1 of a split request took (once).  Fire
 * and forget on the node serving that slot now: a lost refund (node down,
 * slot moving) only makes that consumer wait cost*T longer.
 */
static void
op_refund(struct tg_redis *r, struct tg_redis_op *op)
{
    const char *argv[3 + 3 * TG_CHARGE_MAX_BUCKETS + 1];
    size_t argvlen[TG_ARRAY_LEN(argv)], argc = 0, nk = 0;
    char num[2 + 2 * TG_CHARGE_MAX_BUCKETS][TG_REDIS_NUMLEN];
    struct tg_rnode *nd;

    if (op->kind != TG_OP_CHARGE || !op->refund_due) {
        return;
    }
    op->refund_due = 0;
    if (r->destroying || r->slot_node == NULL || r->slot_node[op->slot1] == 0) {
        return;
    }
    nd = r->nodes[r->slot_node[op->slot1] - 1];
    if (!node_usable(nd)) {
        return;
    }
    for (size_t k = 0; k < op->n; k++) {
        nk += (op->mask1 >> k) & 1u;
    }
    argv[argc] = "EVAL";
    argvlen[argc++] = 4;
    argv[argc] = tg_redis_refund_lua;
    argvlen[argc++] = strlen(tg_redis_refund_lua);
    argvlen[argc] = (size_t)snprintf(num[0], sizeof(num[0]), "%zu", nk);
    argv[argc++] = num[0];
    for (size_t k = 0; k < op->n; k++) {
        if (op->mask1 & (1u << k)) {
            argv[argc] = op_key(op, k);
            argvlen[argc++] = op->len[k];
        }
    }
    argvlen[argc] = (size_t)snprintf(num[1], sizeof(num[1]), "%u", op->cost);
    argv[argc++] = num[1];
    for (size_t k = 0, j = 2, sent = 0; k < op->n; k++) {
        if (op->mask1 & (1u << k)) {
            argvlen[argc] = (size_t)snprintf(num[j], sizeof(num[j]), "%llu",
                                             (unsigned long long)op->lim[k].interval_us);
            argv[argc++] = num[j++];
            argvlen[argc] = (size_t)snprintf(num[j], sizeof(num[j]), "%llu",
                                             (unsigned long long)op->p1[sent++]);
            argv[argc++] = num[j++];
        }
    }
    if (redisAsyncCommandArgv(nd->ac, NULL, NULL, (int)argc, argv, argvlen) == REDIS_OK) {
        r->stats.refunds++;
    }
}

/*
 * Give back what a charge answered too late added (tg_gcra_refund_lua):
 * for each bucket sent, at most cost*T and never more than its debt left
 * (P - now, P = the TAT this charge wrote), and only while that debt is
 * still there.  Fire and forget on the node that answered: a lost refund
 * only makes that consumer wait longer.
 */
static void
late_refund(struct tg_redis *r, struct tg_rnode *nd, const struct tg_redis_op *op,
            const tg_gcra_result *part, uint64_t script_now)
{
    const char *argv[3 + 3 * TG_CHARGE_MAX_BUCKETS];
    size_t argvlen[TG_ARRAY_LEN(argv)], argc = 0, nk = 0;
    char num[1 + 2 * TG_CHARGE_MAX_BUCKETS][TG_REDIS_NUMLEN];
    size_t nn = 0;

    if (r->destroying || op->cost == 0 || !node_usable(nd)) {
        return;
    }
    argv[argc] = "EVAL";
    argvlen[argc++] = 4;
    argv[argc] = tg_gcra_refund_lua;
    argvlen[argc++] = strlen(tg_gcra_refund_lua);
    argv[argc++] = num[nn++];                       /* numkeys: below */
    for (size_t k = 0; k < op->n; k++) {
        if (op->mask & (1u << k)) {
            argv[argc] = op_key(op, k);
            argvlen[argc++] = op->len[k];
            nk++;
        }
    }
    argvlen[2] = (size_t)snprintf(num[0], sizeof(num[0]), "%zu", nk);
    for (size_t k = 0; k < op->n; k++) {
        if (op->mask & (1u << k)) {
            argvlen[argc] = (size_t)snprintf(num[nn], sizeof(num[nn]), "%llu",
                                             (unsigned long long)op->cost
                                             * op->lim[k].interval_us);
            argv[argc++] = num[nn++];
            argvlen[argc] = (size_t)snprintf(num[nn], sizeof(num[nn]), "%llu",
                                             (unsigned long long)(script_now
                                                                  + part->held_us[k]));
            argv[argc++] = num[nn++];
        }
    }
    if (redisAsyncCommandArgv(nd->ac, NULL, NULL, (int)argc, argv, argvlen) == REDIS_OK) {
        r->stats.refunds++;
    }
}

/* One allocation: the op and copies of its n strings. */
static struct tg_redis_op *
op_new(enum tg_redis_kind kind, const char *const *s, size_t n)
{
    struct tg_redis_op *op;
    size_t total = 0, len[TG_CHARGE_MAX_BUCKETS];
    char *p;

    for (size_t i = 0; i < n; i++) {
        len[i] = s[i] != NULL ? strlen(s[i]) : 0;
        if (len[i] > UINT32_MAX - 1) {
            len[i] = UINT32_MAX - 1;
        }
        total += len[i] + 1;
    }
    op = tg_xcalloc(1, sizeof(*op) + total);
    op->kind = (uint8_t)kind;
    op->n = (uint8_t)n;
    p = op->str;
    for (size_t i = 0; i < n; i++) {
        if (len[i] != 0) {
            memcpy(p, s[i], len[i]);
        }
        p[len[i]] = '\0';
        op->len[i] = (uint32_t)len[i];
        p += len[i] + 1;
    }
    return op;
}

/* "host:port" (host may be an IPv6 literal, with or without brackets). */
static int
split_hostport(const char *s, size_t len, char *host, size_t hostlen, int *port)
{
    const char *colon = NULL;
    unsigned long p;
    size_t hl;

    for (size_t i = len; i > 0; i--) {
        if (s[i - 1] == ':') {
            colon = s + i - 1;
            break;
        }
    }
    if (colon == NULL
        || parse_uint(colon + 1, len - (size_t)(colon + 1 - s), 65535, &p) != TG_OK
        || p == 0) {
        return TG_ERR;
    }
    hl = (size_t)(colon - s);
    if (hl >= 2 && s[0] == '[' && s[hl - 1] == ']') {
        s++;
        hl -= 2;
    }
    if (hl >= hostlen) {
        return TG_ERR;
    }
    memcpy(host, s, hl);
    host[hl] = '\0';
    *port = (int)p;
    return TG_OK;
}

static int
parse_uint(const char *s, size_t len, unsigned long max, unsigned long *out)
{
    unsigned long v = 0;

    if (len == 0 || len > 10) {
        return TG_ERR;
    }
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') {
            return TG_ERR;
        }
        v = v * 10 + (unsigned long)(s[i] - '0');
    }
    if (v > max) {
        return TG_ERR;
    }
    *out = v;
    return TG_OK;
}

/*
 * Give back amount_us[i] of keys[i]'s debt (a lease's unused tokens), each
 * never more than what is still ahead of p_us[i] (the TAT the take wrote,
 * Redis clock): tg_gcra_refund_lua, one call for all n keys (Cluster: one
 * per key, each on the node serving its slot).  Fire and forget, behind
 * what is already queued on that connection; with now, the bytes are
 * written at once (shutdown: no loop turn will come).  A lost give-back
 * only leaves the bucket that much deeper in debt: under-use, never an
 * extra admission.
 */
void
tg_redis_give_back(struct tg_redis *r, const char *const *keys, const uint64_t *amount_us,
                   const uint64_t *p_us, size_t n, int now)
{
    const char *argv[3 + 3 * TG_REDIS_GIVE_MAX];
    size_t argvlen[TG_ARRAY_LEN(argv)], argc, nk;
    char num[1 + 2 * TG_REDIS_GIVE_MAX][TG_REDIS_NUMLEN];
    struct tg_rnode *nd = NULL;
    size_t i = 0;

    if (r == NULL || r->destroying) {
        return;
    }
    while (i < n) {
        size_t first = i, nn = 1;

        if (r->mode != TG_MODE_CLUSTER) {
            nd = r->nodes[0];
            nk = n - i < TG_REDIS_GIVE_MAX ? n - i : TG_REDIS_GIVE_MAX;
        } else {
            unsigned slot = tg_redis_key_slot(keys[i], strlen(keys[i]));
            nd = r->map_ok && r->slot_node != NULL && r->slot_node[slot] != 0
                 ? r->nodes[r->slot_node[slot] - 1] : NULL;
            nk = 1;
        }
        i += nk;
        if (!node_usable(nd)) {
            continue;
        }
        argc = 0;
        argv[argc] = "EVAL";
        argvlen[argc++] = 4;
        argv[argc] = tg_gcra_refund_lua;
        argvlen[argc++] = strlen(tg_gcra_refund_lua);
        argvlen[argc] = (size_t)snprintf(num[0], sizeof(num[0]), "%zu", nk);
        argv[argc++] = num[0];
        for (size_t k = first; k < first + nk; k++) {
            argv[argc] = keys[k];
            argvlen[argc++] = strlen(keys[k]);
        }
        for (size_t k = first; k < first + nk; k++) {
            argvlen[argc] = (size_t)snprintf(num[nn], sizeof(num[nn]), "%llu",
                                             (unsigned long long)amount_us[k]);
            argv[argc++] = num[nn++];
            argvlen[argc] = (size_t)snprintf(num[nn], sizeof(num[nn]), "%llu",
                                             (unsigned long long)p_us[k]);
            argv[argc++] = num[nn++];
        }
        if (redisAsyncCommandArgv(nd->ac, NULL, NULL, (int)argc, argv, argvlen) == REDIS_OK) {
            r->stats.refunds++;
            if (now) {
                redisAsyncHandleWrite(nd->ac);
            }
        }
    }
}
