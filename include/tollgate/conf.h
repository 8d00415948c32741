/*
 * conf.h - the configuration snapshot.
 *
 * A snapshot is built in phases (YAML structure -> typed parse through the
 * directive tables -> validate and fill defaults -> resolve addresses) and is
 * immutable once tg_conf_load() returns it.  Worker threads hold references
 * (tg_conf_ref/tg_conf_unref); reload builds a new snapshot and swaps it in.
 */
#ifndef TOLLGATE_CONF_H
#define TOLLGATE_CONF_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "tollgate/cidr.h"
#include "tollgate/common.h"

#define TG_CONF_ERRLEN 512
#define TG_UPSTREAM_KEEPALIVE_AUTO 0xffffffffu  /* upstream.keepalive: auto */

/* A resolved numeric socket address ("127.0.0.1:8080", "[::1]:8080",
 * "localhost:8000").  Host names are resolved once, at load time. */
typedef struct tg_addr {
    char                    text[128];   /* as written in the config */
    struct sockaddr_storage sa;
    socklen_t               salen;
} tg_addr;

/* redis.url, parsed once by the config (tg_conf_parse_redis_url): where
 * the Redis client connects in single mode (and the db for Sentinel). */
typedef struct tg_conf_redis_url {
    char      host[256];         /* a name, an IPv4 address, or an IPv6
                                    literal without its brackets */
    int       port;              /* 1..65535; 6379 when not written */
    int       db;                /* 0..15; 0 when not written */
} tg_conf_redis_url;

typedef struct tg_listen_conf {
    tg_addr  addr;
    int      tls;                /* 1 when a tls: block is present */
    char    *cert;               /* absolute path, or NULL */
    char    *key;                /* absolute path, or NULL */
} tg_listen_conf;

typedef struct tg_tier_conf {
    char     *name;
    uint32_t  requests_per_minute;  /* refill: rpm/60 tokens per second */
    uint32_t  burst_limit;          /* bucket capacity */
    uint32_t  lease_size;           /* lease.size: tokens a worker takes from
                                       Redis at once (0 = off: exact) */
    uint32_t  lease_ttl_ms;         /* lease.ttl_ms: unused tokens go back
                                       after this long (1000) */
} tg_tier_conf;

/* A per-endpoint rule: method (NULL = any) + path prefix (segment-wise:
 * "/leads" matches "/leads", "/leads/7", "/leads?x", not "/leadsx") ->
 * cost, and optionally an extra bucket per key for this route. */
typedef struct tg_route_conf {
    char     *name;                 /* [a-z0-9_-]{1,32}: bucket key and label */
    char     *method;               /* upper-case token, or NULL for any */
    char     *path;                 /* starts with '/' */
    uint32_t  cost;                 /* tokens per request; default 1, 1..1000 */
    int       has_limit;            /* limit: present */
    uint32_t  requests_per_minute;  /* limit: { requests_per_minute, burst_limit } */
    uint32_t  burst_limit;
} tg_route_conf;

enum tg_store_kind { TG_STORE_REDIS, TG_STORE_LOCAL };

/* Alert channels and rules (section alerts:); the order is the order of
 * the metric labels (metrics.h TG_MA_*). */
enum tg_alert_channel {
    TG_ALERT_SLACK, TG_ALERT_PAGERDUTY, TG_ALERT_WEBHOOK, TG_ALERT__NCHANNELS
};
enum tg_alert_rule {
    TG_RULE_BREACHES, TG_RULE_REDIS_DOWN, TG_RULE_BREAKER_OPEN,
    TG_RULE_UPSTREAM_ERRORS, TG_RULE_ANOMALY, TG_RULE__COUNT
};

typedef struct tg_alert_rule_conf {
    int      enabled;            /* written under alerts.rules (or no rules:) */
    unsigned to;                 /* channels: bit (1u << tg_alert_channel) */
    uint64_t threshold;          /* breaches: 429s of one tier per window; 1000 */
    unsigned window_ms;          /* breaches, upstream_errors; 60000 */
    unsigned after_ms;           /* redis_down; 300000 */
    double   ratio;              /* upstream_errors: 5xx share; 0.05 */
    uint64_t min_requests;       /* upstream_errors; 100 */
} tg_alert_rule_conf;

/* One channel.  url and key are secrets: never logged or exported. */
typedef struct tg_alert_channel_conf {
    int      enabled;            /* the channel's block is present */
    char    *url;                /* webhook URL / PagerDuty endpoint (read
                                    from *_file at load when given) */
    char    *url_file;           /* absolute path, or NULL */
    char    *key;                /* PagerDuty routing key, or NULL */
    char    *key_file;           /* absolute path, or NULL */
} tg_alert_channel_conf;
enum tg_on_failure { TG_FAIL_LOCAL, TG_FAIL_ALLOW, TG_FAIL_DENY };

typedef struct tg_conf {
    unsigned         refcnt;          /* atomic; see tg_conf_ref */
    char            *path;            /* absolute path of the file loaded */
    char            *dir;             /* its directory: base of relative paths */

    tg_listen_conf  *listen;          /* at least one */
    size_t           nlisten;

    int              admin_enabled;   /* admin: present (default on) */
    tg_addr          admin;           /* default 127.0.0.1:9090 */

    unsigned         workers;         /* resolved: 0 in the file = CPUs */
    unsigned         drain_timeout_ms;   /* default 10000 */
    enum tg_log_level log_level;         /* log_level: debug|info|warn|error */

    struct {                          /* section http: client-side limits */
        size_t   max_request_line;    /* default 8192 (414 past it) */
        size_t   max_header_bytes;    /* whole head; default 16384 (431) */
        size_t   max_headers;         /* default 100 (431) */
        uint64_t max_body_bytes;      /* default 10 MiB (413) */
        unsigned header_timeout_ms;   /* whole head must arrive; 10000 */
        unsigned handshake_timeout_ms;   /* TLS handshake must end; 10000 */
        unsigned body_timeout_ms;     /* between two body reads; 30000 */
        unsigned idle_timeout_ms;     /* keep-alive idle; 60000 */
        unsigned send_timeout_ms;     /* between two writes; 30000 */
        unsigned max_requests_per_connection;   /* 0 = unlimited; 10000 */
        tg_cidr *trusted_proxies;     /* peers whose X-Forwarded-For is kept
                                         (appended to); none by default */
        size_t   ntrusted_proxies;
        unsigned max_connections;     /* open client connections per process;
                                         0 = unlimited; 10000 */
        unsigned max_connections_per_ip;   /* per client address; 0 = unlimited; 1024 */
        int      reuseport;           /* each worker accepts on its own
                                         SO_REUSEPORT sockets; 0 */
    } http;

    struct {                          /* section upstream: */
        tg_addr *servers;             /* at least one */
        size_t   nservers;
        unsigned connect_timeout_ms;     /* 2000 -> 502 */
        unsigned first_byte_timeout_ms;  /* 30000 -> 504 */
        unsigned total_timeout_ms;       /* 60000 -> 504 */
        unsigned keepalive;              /* idle conns per server per worker;
                                            TG_UPSTREAM_KEEPALIVE_AUTO (default):
                                            every conn that was in use, up to
                                            http.max_connections */
        unsigned keepalive_timeout_ms;   /* idle upstream conn closed after; 30000 */
        struct {                         /* upstream.breaker: one per server per worker */
            unsigned failures;           /* consecutive failures that open it; 5 */
            unsigned window_ms;          /* error-ratio window, 0 = off; 10000 */
            unsigned min_requests;       /* ratio rule needs this many; 20 */
            unsigned error_pct;          /* open at this error percentage; 50 */
            unsigned open_ms;            /* first open duration; 5000 */
            unsigned max_open_ms;        /* cap of the doubling; 60000 */
        } breaker;
        struct {                         /* upstream.health_check: active checks */
            int      enabled;            /* the block is present */
            char    *path;               /* GET target; default "/health" */
            unsigned interval_ms;        /* between two rounds; 2000 */
            unsigned timeout_ms;         /* connect + status line; 1000 */
            unsigned healthy;            /* consecutive 2xx to mark up; 2 */
            unsigned unhealthy;          /* consecutive failures to mark down; 2 */
        } health_check;
    } upstream;

    tg_tier_conf    *tiers;           /* rate_limits:, in file order */
    size_t           ntiers;

    enum tg_store_kind store;         /* default redis */
    struct {
        char              *url;          /* default redis://127.0.0.1:6379/0,
                                            as written (messages, reload) */
        tg_conf_redis_url  server;       /* url parsed: what is connected to */
        unsigned           timeout_ms;   /* default 25 */
        enum tg_on_failure on_failure;   /* default local */
        char              *prefix;       /* key prefix; default "tg:" */
        unsigned           max_batch;    /* charges per EVALSHA; default 32, 1..512 */
        int                native;       /* redis.native: auto (1, default): the
                                            module's TOLLGATE.CHARGE where a server
                                            has it; off (0): the script everywhere */
        unsigned           instances;    /* tollgate instances sharing the limits:
                                            the local fallback divides each limit
                                            by this; default 1 */
        char              *sentinel_master;  /* sentinel.master; NULL = no Sentinel */
        tg_addr           *sentinels;        /* sentinel.addresses, asked in order */
        size_t             nsentinels;
        tg_addr           *cluster_nodes;    /* cluster.nodes (seeds); 0 = no Cluster */
        size_t             ncluster_nodes;   /* (Cluster: the url's db must be 0) */
        char              *username;         /* AUTH (ACL user); NULL = default user */
        char              *password;         /* AUTH; NULL = none; from password or
                                                password_file (read at load) */
        char              *password_file;    /* absolute path, or NULL */
        char              *sentinel_username;      /* sentinel.username, .password, */
        char              *sentinel_password;      /* .password_file: the sentinels' */
        char              *sentinel_password_file; /* own AUTH (may differ) */
    } redis;

    struct {
        char     *keys_file;          /* absolute path, or NULL */
        char     *header;             /* key header; default "X-API-Key"
                                         (Authorization: Bearer always works) */
        int       forward_key;        /* pass the key header upstream; default 0 */
        char     *anonymous_tier;     /* tier for keyless requests, keyed by
                                         client IP; NULL = keyless gets 401 */
        int       redis_keys;         /* also HGET <prefix>keys <sha256>; default 0 */
        unsigned  cache_ttl_ms;       /* Redis key lookups cached this long; 30000 */
        unsigned  anonymous_ipv6_prefix;   /* anonymous buckets per IPv6 /N; 64 */
        struct {                      /* Redis lookups of keys this worker does
                                         not know, per client IP: a bucket */
            uint32_t requests_per_minute;   /* 60 */
            uint32_t burst_limit;           /* 20 */
        } unknown_key_limit;
    } auth;

    tg_route_conf   *routes;          /* routes:, in file order (first match wins) */
    size_t           nroutes;

    struct {                          /* section metrics: */
        int      statsd_enabled;      /* metrics.statsd: present */
        tg_addr  statsd;              /* statsd.address (UDP) */
        char    *statsd_prefix;       /* default "tollgate" */
        unsigned statsd_flush_ms;     /* default 10000, 100..3600000 */
        int      statsd_tags;         /* DogStatsD tags; default false */
    } metrics;

    struct {                          /* section access_log: */
        char    *path;                /* absolute; NULL = no access log */
    } access_log;

    struct {                          /* section alerts: (see alerts.h) */
        int      enabled;             /* alerts: present */
        tg_alert_channel_conf channel[TG_ALERT__NCHANNELS];
        tg_alert_rule_conf    rule[TG_RULE__COUNT];
        char    *ca_file;             /* absolute; NULL = the system CAs */
        unsigned cooldown_ms;         /* repeat an open incident; 300000 */
        unsigned evaluate_ms;         /* rule evaluation period; 1000 */
        unsigned connect_timeout_ms;  /* per transfer; 5000 */
        unsigned timeout_ms;          /* per transfer, total; 10000 */
        unsigned max_tries;           /* per message, first try included; 5 */
        unsigned backoff_ms;          /* first retry delay, doubles; 1000 */
        unsigned max_backoff_ms;      /* cap of the doubling; 60000 */
        unsigned queue;               /* messages queued at most; 256 */
        char    *instance;            /* "source" name; default hostname/listen[0] */
    } alerts;

    struct {                          /* section anomaly: (see anomaly.h) */
        int      enabled;             /* anomaly: present */
        unsigned window_ms;           /* heavy-hitter window; 60000 */
        unsigned top_k;               /* consumers tracked per window; 20 */
        double   spike_factor;        /* unusual at this x its baseline; 10 */
        uint64_t min_requests;        /* ... with at least this many; 100 */
        double   new_key_share;       /* a new key with this share of a
                                         window is unusual too; 0.5 */
    } anomaly;

    struct {
        int      enabled;             /* global_limit: present */
        uint32_t requests_per_second;
        uint32_t burst;
    } global_limit;

    struct {                          /* section adaptive: (see adaptive.h) */
        int      enabled;             /* adaptive: present; off = as before */
        unsigned initial;             /* concurrency.initial, per server; 64 */
        unsigned min;                 /* concurrency.min; 4 */
        unsigned max;                 /* concurrency.max; 1024 */
        unsigned queue;               /* concurrency.queue, per server; 128 */
        unsigned queue_timeout_ms;    /* concurrency.queue_timeout_ms; 1000 */
        char   **shed_order;          /* tier names, the first shed first;
                                         default the tiers of basic, pro,
                                         enterprise that rate_limits has */
        size_t   nshed_order;
        struct {                      /* throttle: parsed, not applied yet */
            int      enabled;
            unsigned target_p99_ms;   /* 500 */
            double   max_error_ratio; /* 0.05 */
            double   min_factor;      /* 0.25 */
            unsigned window_ms;       /* 5000 */
        } throttle;
    } adaptive;
} tg_conf;

/*
 * Load and validate the file at path.  Returns a new snapshot with one
 * reference, or NULL with a message in err ("FILE:LINE:COL: what is wrong",
 * or "FILE: why it cannot be read").
 */
tg_conf *tg_conf_load(const char *path, char *err, size_t errlen);

/* Same, from a string already in memory; name is used in messages and
 * relative paths resolve against the current directory. */
tg_conf *tg_conf_load_string(const char *name, const char *text, size_t len,
                             char *err, size_t errlen);

tg_conf *tg_conf_ref(tg_conf *conf);
void     tg_conf_unref(tg_conf *conf);

/* The store settings (store, redis.*) that differ between a and b, as
 * "redis.prefix, redis.timeout_ms" into buf (truncated to len); returns
 * how many differ.  A running process keeps its store as started. */
size_t tg_conf_store_diff(const tg_conf *a, const tg_conf *b, char *buf, size_t len);

/* Find a tier by name; NULL if none. */
const tg_tier_conf *tg_conf_tier(const tg_conf *conf, const char *name);

/* Parse "redis://host[:port][/db]" into out: host a name or a [v6]
 * literal, port 1..65535 (6379), db 0..15 (0); no credentials, query or
 * TLS.  TG_ERR with why filled ("scheme must be redis://", ...) and out
 * untouched.  The config parses redis.url with it; nothing parses it again. */
tg_rc tg_conf_parse_redis_url(const char *url, tg_conf_redis_url *out, char *why,
                              size_t whylen);

/* Parse "host:port" / "[v6]:port" into addr (resolving names with
 * getaddrinfo: start-up and reload only, never on an event loop). */
tg_rc tg_addr_parse(const char *text, tg_addr *addr, char *err, size_t errlen);

/* How tg_addr_parse resolves a host name (literals never get here): fill
 * sa and salen (any port; the caller sets it) or return TG_ERR with the
 * reason in why.  The default is getaddrinfo's first answer; tests
 * install their own, so that they do not depend on the machine's
 * resolver.  NULL restores the default.  Not thread-safe: set it before
 * loading. */
typedef tg_rc (*tg_addr_resolver)(const char *host, struct sockaddr_storage *sa,
                                  socklen_t *salen, char *why, size_t whylen);
void tg_addr_set_resolver(tg_addr_resolver fn);

#endif
