/*
 * redis_int.h - internals shared by the Redis client's files (not a
 * public header: include/tollgate/redis.h is the API).
 *
 *   redis.c           API, ops, queue and flush, batches, delivery, refunds
 *   redis_conn.c      addresses, contexts (reader, adapter, AUTH), nodes,
 *                     reconnect backoff, evdns, aux questions
 *   redis_sentinel.c  master discovery, +switch-master subscription
 *   redis_cluster.c   key slots, slot map, node breakers, routing, MOVED/ASK
 *
 * Everything runs on the thread of the worker that owns the struct tg_redis.
 */
#ifndef TOLLGATE_REDIS_INT_H
#define TOLLGATE_REDIS_INT_H

#include "tollgate/redis.h"
#include "tollgate/breaker.h"
#include "tollgate/common_ev.h"

#include <netinet/in.h>
#include <stdint.h>
#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <event2/event.h>

#define TG_REDIS_BACKOFF_MIN_MS    100
#define TG_REDIS_BACKOFF_MAX_MS    5000
#define TG_REDIS_CONNECT_MIN_MS    1000     /* connect + SELECT deadline floor */
#define TG_REDIS_AUX_MIN_MS        250      /* sentinel / CLUSTER SLOTS question */
#define TG_REDIS_MAX_CONSEC_TMO    3        /* deadlines in a row: reconnect */
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
#define TG_REDIS_STR_CACHE_MAX     (64u << 10) /* a kept string buffer, at most */
#define TG_REDIS_WARN_MS           1000     /* connection warnings per node */
#define TG_REDIS_REFUND_MAX        TG_REDIS_GIVE_MAX   /* keys per refund call */
#define TG_REDIS_INFLIGHT          1        /* charge calls in flight per connection
                                               (single, Sentinel) before new
                                               charges wait for an answer */
#define TG_REDIS_HOLD_DIV          4        /* ... for at most timeout_ms / 4 */

enum tg_redis_mode { TG_MODE_SINGLE, TG_MODE_SENTINEL, TG_MODE_CLUSTER };

enum tg_redis_state {
    TG_REDIS_DOWN,                /* no context; reconnect timer armed */
    TG_REDIS_CONNECTING,          /* context exists, connect/SELECT/ROLE pending */
    TG_REDIS_READY,               /* connected (and SELECTed, and a master) */
};

enum tg_redis_kind { TG_OP_CHARGE, TG_OP_HGET, TG_OP_EVAL };

struct tg_redis_op {
    struct tg_redis_op *next;     /* r->pending, then the batch's list */
    tg_redis_charge_cb  charge_cb;  /* NULL once delivered or cancelled */
    tg_redis_str_cb     str_cb;     /* (HGET, EVAL) idem */
    void               *arg;
    uint8_t             kind;     /* enum tg_redis_kind */
    uint8_t             n;        /* buckets (charge) / 2 strings (HGET) /
                                     key, script, args (EVAL) */
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
    uint8_t             pooled;   /* str has TG_REDIS_OP_POOLED bytes: the
                                     op may go back to r->op_pool */
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
    uint8_t              native;      /* this connection's TOLLGATE.PROTO answered
                                         ours: charges go as TOLLGATE.CHARGE */
    int8_t               native_said; /* what the log last said of it (-1: nothing) */
    unsigned             backoff_ms;  /* next reconnect delay (pre-jitter) */
    unsigned             consec_tmo;  /* deadlines in a row */
    unsigned             charging;    /* charge calls sent, not yet answered */
    uint64_t             charge_sent_us;  /* when the last of them was sent */
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
    uint8_t                native;        /* sent as TOLLGATE.CHARGE */
    uint8_t                done;          /* ops answered; a reply is ignored */
    uint8_t                timer_set;
    uint8_t                asking;        /* ASK: ASKING before the command */
    uint8_t                redirects;     /* MOVED/ASK followed so far */
    uint8_t                brk;           /* Cluster: node breaker awaits the outcome */
    uint8_t                counted;       /* in node->charging */
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

struct tg_reply;

/* A distinct bucket of one charge call (batch_keys in redis.c). */
struct tg_rkey {
    const char         *s;        /* the op's copy of the key */
    size_t              len;
    uint32_t            hash;
    tg_gcra_limit       lim;
    uint32_t            alias;    /* 1-based index of the first of its name */
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
    struct event           *hold_ev;     /* the earliest deadline of held charges */
    struct tg_redis_op     *held;        /* charges waiting for the call in
                                            flight (hold_charges) */
    struct evdns_base      *dns;         /* names learnt from Redis; lazy */
    const struct timeval   *call_tv;     /* common timeout: timeout_ms */
    uint64_t                rng;         /* xorshift64 state, for jitter */

    char                    sha[41];     /* SHA1 of tg_gcra_lua, hex */
    size_t                  script_len;

    const char            **argv;        /* scratch for one command: */
    size_t                 *argvlen;     /* argc entries each */
    size_t                  argcap;
    char                   *num;         /* number strings, packed numbers */
    size_t                  numcap;
    char                   *cmd;         /* the command in RESP, for */
    size_t                  cmdcap;      /* redisAsyncFormattedCommand */
    struct tg_rkey         *kt;          /* a charge call's distinct buckets */
    uint32_t               *kix;         /* each bucket sent: index in kt + 1 */
    size_t                  ktcap;       /* entries of kt and of kix */
    uint32_t               *kh;          /* open addressing over kt: index + 1 */
    size_t                  khcap;

    /* Free lists, so a charge in the steady state allocates nothing of
     * ours: ops (of TG_REDIS_OP_POOLED string bytes), batches, reply
     * objects, one reply element array and one string buffer (the
     * charge script's packed reply; redis_conn.c). */
    struct tg_redis_op     *op_pool;
    unsigned                nop_pool;
    struct tg_redis_batch  *batch_pool;
    unsigned                nbatch_pool;
    struct tg_reply        *reply_pool;
    unsigned                nreply_pool;
    void                  **elem_cache;
    size_t                  elem_cache_cap;
    char                   *str_cache;
    size_t                  str_cache_cap;

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
    uint64_t                proto_log_ms;    /* last reply refused for its shape */
    tg_redis_stats          stats;
};

extern const tg_breaker_conf tg_redis_node_breaker_conf;

/* Free-list bounds: past them a block is freed as before. */
#define TG_REDIS_OP_POOLED   (3 * 192)   /* string bytes of a pooled op */
#define TG_REDIS_POOL_MAX    1024        /* ops, batches, replies kept each */
#if defined(__SANITIZE_ADDRESS__)
#define TG_REDIS_POOLING     0           /* ASan sees every free: no reuse */
#else
#define TG_REDIS_POOLING     1
#endif

/* redis.c: op back to r's free list (or freed). */
void tg_redis_op_release(struct tg_redis *r, struct tg_redis_op *op);

/* redis_conn.c */
/* Free r's reply objects kept for reuse (tg_redis_destroy, last). */
void tg_redis_reply_pool_free(struct tg_redis *r);
struct tg_rnode *tg_redis_node_new(struct tg_redis *r, const char *host, int port);
void tg_redis_node_free(struct tg_rnode *nd);
struct tg_rnode *tg_redis_node_get(struct tg_redis *r, const char *host, int port,
                                   size_t *idx);
void tg_redis_node_kick(struct tg_rnode *nd);
void tg_redis_node_warn(struct tg_rnode *nd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void tg_redis_node_good(struct tg_rnode *nd);
int tg_redis_node_usable(const struct tg_rnode *nd);
void tg_redis_conn_start(struct tg_rnode *nd);
void tg_redis_dns_give_up(struct tg_rnode *nd);
void tg_redis_schedule_reconnect(struct tg_rnode *nd);
void tg_redis_schedule_drop(struct tg_rnode *nd);
int tg_redis_is_numeric_host(const char *host);
redisAsyncContext *tg_redis_ctx_open(struct tg_redis *r, const char *host, int port,
                                     void *data, int sentinel, redisCallbackFn *auth_cb,
                                     void *privdata);
void tg_redis_aux_auth_cb(redisAsyncContext *ac, void *reply, void *privdata);
void tg_redis_aux_init(struct tg_redis *r, struct tg_raux *aux, tg_raux_done done);
void tg_redis_aux_start(struct tg_raux *aux, const char *host, int port, int argc,
                        const char **argv);
void tg_redis_aux_cancel(struct tg_raux *aux);
int tg_redis_split_hostport(const char *s, size_t len, char *host, size_t hostlen,
                            int *port);

/* redis_sentinel.c */
void tg_redis_sentinel_discover(struct tg_redis *r);
void tg_redis_sentinel_distrust(struct tg_redis *r);
void tg_redis_sentinel_done(struct tg_redis *r, const redisReply *rep,
                            const struct tg_raux *aux);
void tg_redis_sub_start(struct tg_redis *r);
void tg_redis_sub_follow(struct tg_redis *r);
void tg_redis_sub_retry_cb(evutil_socket_t fd, short what, void *arg);

/* redis_cluster.c */
void tg_redis_cluster_refresh(struct tg_redis *r);
void tg_redis_cluster_kick(struct tg_redis *r, const struct tg_rnode *nd);
void tg_redis_slots_done(struct tg_redis *r, const redisReply *rep,
                         const struct tg_raux *aux);
void tg_redis_refresh_cb(evutil_socket_t fd, short what, void *arg);
void tg_redis_route_cluster(struct tg_redis *r, struct tg_redis_op *op,
                            struct tg_redis_batch **built);
int tg_redis_batch_redirect(struct tg_redis_batch *b, const redisReply *rep);

/* redis.c */
struct tg_redis_batch *tg_redis_batch_new(struct tg_redis *r, struct tg_rnode *nd,
                                          enum tg_redis_kind kind);
void tg_redis_batch_add(struct tg_redis_batch *b, struct tg_redis_op *op);
tg_rc tg_redis_batch_send(struct tg_redis_batch *b);
void tg_redis_batch_fail(struct tg_redis_batch *b);
void tg_redis_batch_free(struct tg_redis_batch *b);
void tg_redis_op_fail(struct tg_redis *r, struct tg_redis_op *op);
const char *tg_redis_op_key(const struct tg_redis_op *op, size_t k);

#endif
