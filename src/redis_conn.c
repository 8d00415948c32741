/*
 * redis_conn.c - the connections of the Redis client: addresses, contexts
 * (a bounded reply reader, our own libevent adapter, AUTH), nodes with
 * their reconnect backoff and names resolved off the loop (evdns), and
 * "aux" connections that ask one question.  Runs on the worker's loop.
 * See redis.c for the life of a charge and the context ownership rules.
 */
#include "redis_int.h"
#include "tollgate/conf.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <event2/dns.h>

static void conn_connect(struct tg_rnode *nd);
static void conn_drop(struct tg_rnode *nd);
static void set_ready(struct tg_rnode *nd);
static void gate_pass(struct tg_rnode *nd);
static void connect_cb(const redisAsyncContext *ac, int status);
static void disconnect_cb(const redisAsyncContext *ac, int status);
static void select_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void role_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void script_load_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void native_cb(redisAsyncContext *ac, void *reply, void *privdata);
static void drop_cb(evutil_socket_t fd, short what, void *arg);
static void reconnect_cb(evutil_socket_t fd, short what, void *arg);
static void connect_timeout_cb(evutil_socket_t fd, short what, void *arg);

/* ------------------------------------------------------------------ */
/* addresses: the URL, numbers, host:port                             */

/* The URL is parsed by the config's parser (one place); this fills opts
 * from it for callers that hold a URL (tests). */
tg_rc
tg_redis_parse_url(const char *url, tg_redis_opts *opts, char *err, size_t errlen)
{
    tg_conf_redis_url u;
    char why[128];

    _Static_assert(sizeof(u.host) == sizeof(opts->host), "host sizes");
    if (tg_conf_parse_redis_url(url, &u, why, sizeof(why)) != TG_OK) {
        snprintf(err, errlen, "redis url: %s", why);
        return TG_ERR;
    }
    memcpy(opts->host, u.host, sizeof(opts->host));
    opts->port = u.port;
    opts->db = u.db;
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

/* "host:port" (host may be an IPv6 literal, with or without brackets). */
int
tg_redis_split_hostport(const char *s, size_t len, char *host, size_t hostlen, int *port)
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
        || tg_parse_dec(colon + 1, len - (size_t)(colon + 1 - s), 65535, &p) != TG_OK
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
 * The adapter is hiredis's libevent one plus that check, writing without
 * epoll when it can (rctx_add_write); since the context can be freed
 * inside redisAsyncHandleRead or HandleWrite, its cleanup only marks the
 * events dead while one of ours is running.
 */
struct tg_rctx {                  /* ac->ev.data and reader privdata */
    redisAsyncContext *ac;
    struct tg_redis   *r;
    struct event      *rev, *wev;
    size_t             objects;   /* in the reply being read */
    uint8_t            reading;   /* inside redisAsyncHandleRead */
    uint8_t            writing;   /* inside redisAsyncHandleWrite (ours) */
    uint8_t            wadded;    /* wev waits for the socket (epoll) */
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

/*
 * Reply objects come from r's free list and go back to it (reply_free):
 * the batch reply of a charge is an array of integers, which hiredis would
 * otherwise allocate one by one.  The wrapper remembers its pool and the
 * capacity of its element array (r keeps one array, the largest seen).
 */
typedef struct tg_reply {
    redisReply       rep;         /* first: hiredis sees a redisReply * */
    struct tg_redis *r;           /* whose free lists */
    size_t           ecap;        /* rep.element's capacity (0: none) */
    size_t           scap;        /* rep.str's capacity (0: not cached) */
    struct tg_reply *next;        /* on r->reply_pool */
} tg_reply;

/*
 * On a subscribed context a reply that no command waits for goes to
 * hiredis's pub/sub dispatch (__redisGetSubscribeCallback), which asserts
 * - the process aborts - unless it is an array of at least two elements
 * whose first two are bulk strings, and which reads a third, an integer,
 * for (p)unsubscribe.  1 if an object of type may stand at task's place
 * in such a reply (a top-level array's size: sub_push_array_ok).
 */
/* A reply refused for its shape (below): one warning a second per client,
 * since a server out of step is met again at each reconnect. */
static void
proto_warn(struct tg_rctx *e, const char *what)
{
    uint64_t now = tg_now_ms();

    if (e->r->proto_log_ms != 0 && now - e->r->proto_log_ms < TG_REDIS_WARN_MS) {
        return;
    }
    e->r->proto_log_ms = now;
    tg_warn("redis: %s:%d sent %s: dropping the connection", e->ac->c.tcp.host,
            e->ac->c.tcp.port, what);
}

static int
sub_push(const redisAsyncContext *ac)
{
    return (ac->c.flags & REDIS_SUBSCRIBED) && ac->replies.head == NULL;
}

static int
sub_push_object_ok(const redisAsyncContext *ac, const redisReadTask *task, int type)
{
    const redisReadTask *top = task->parent;
    const redisReply *first;
    const char *t;

    if (top == NULL || top->parent != NULL || !sub_push(ac) || task->idx > 2) {
        return 1;
    }
    if (task->idx < 2) {
        return type == REDIS_REPLY_STRING;
    }
    first = ((const redisReply *)top->obj)->element[0];
    t = first->str + (tolower((unsigned char)first->str[0]) == 'p');
    return strcasecmp(t, "unsubscribe") != 0 || type == REDIS_REPLY_INTEGER;
}

static int
sub_push_array_ok(const redisAsyncContext *ac, const redisReadTask *task, int elements)
{
    return task->parent != NULL || !sub_push(ac) || elements >= 3;
}

/* One more object of the reply being read; NULL (reader error) past the
 * limit.  hiredis passes the reader's privdata: our tg_rctx. */
static redisReply *
reply_new(const redisReadTask *task, int type)
{
    struct tg_rctx *e = task->privdata;
    struct tg_redis *r;
    tg_reply *w;

    if (e == NULL) {
        return NULL;            /* the context is being freed */
    }
    if (task->parent == NULL) {
        e->objects = 0;
        /* A reply with no command waiting for it (a server or proxy out
         * of step): hiredis 0.14 asserts on one unless it is an error
         * (redisProcessCallbacks: the process aborts).  Replies are read
         * one at a time, after the previous one's callback was shifted,
         * so an empty callback list here means that this one is such. */
        if (e->ac->replies.head == NULL && type != REDIS_REPLY_ERROR
            && !(e->ac->c.flags & (REDIS_SUBSCRIBED | REDIS_MONITORING))) {
            proto_warn(e, "a reply nobody asked for");
            return NULL;
        }
    }
    if (!sub_push_object_ok(e->ac, task, type)) {
        proto_warn(e, "a malformed pub/sub message");
        return NULL;
    }
    if (++e->objects > TG_REDIS_MAX_OBJECTS) {
        e->r->stats.oversized++;
        tg_warn("redis: a reply of more than %d objects: dropping the connection",
                TG_REDIS_MAX_OBJECTS);
        return NULL;
    }
    r = e->r;
    if ((w = r->reply_pool) != NULL) {
        r->reply_pool = w->next;
        r->nreply_pool--;
        memset(w, 0, sizeof(*w));
    } else if ((w = calloc(1, sizeof(*w))) == NULL) {
        return NULL;
    }
    w->r = r;
    w->rep.type = type;
    return &w->rep;
}

/* rep and everything under it back to its pool (hiredis's freeObject). */
static void
reply_free(void *p)
{
    tg_reply *w = p;
    struct tg_redis *r;

    if (w == NULL) {
        return;
    }
    r = w->r;
    if (w->rep.str != NULL && w->scap > r->str_cache_cap && TG_REDIS_POOLING
        && !r->destroying) {
        free(r->str_cache);     /* keep the larger one */
        r->str_cache = w->rep.str;
        r->str_cache_cap = w->scap;
    } else {
        free(w->rep.str);
    }
    if (w->rep.element != NULL) {
        for (size_t i = 0; i < w->rep.elements; i++) {
            reply_free(w->rep.element[i]);
        }
        if (r->elem_cache == NULL && TG_REDIS_POOLING) {
            r->elem_cache = (void **)w->rep.element;
            r->elem_cache_cap = w->ecap;
        } else if (w->ecap > r->elem_cache_cap && TG_REDIS_POOLING) {
            free(r->elem_cache);
            r->elem_cache = (void **)w->rep.element;
            r->elem_cache_cap = w->ecap;
        } else {
            free(w->rep.element);
        }
    }
    if (TG_REDIS_POOLING && r->nreply_pool < TG_REDIS_POOL_MAX && !r->destroying) {
        w->next = r->reply_pool;
        r->reply_pool = w;
        r->nreply_pool++;
    } else {
        free(w);
    }
}

void
tg_redis_reply_pool_free(struct tg_redis *r)
{
    tg_reply *w;

    while ((w = r->reply_pool) != NULL) {
        r->reply_pool = w->next;
        free(w);
    }
    r->nreply_pool = 0;
    free(r->elem_cache);
    r->elem_cache = NULL;
    r->elem_cache_cap = 0;
    free(r->str_cache);
    r->str_cache = NULL;
    r->str_cache_cap = 0;
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
    if (TG_REDIS_POOLING && ((tg_reply *)rep)->r->str_cache_cap > len) {
        tg_reply *w = (tg_reply *)rep;
        rep->str = w->r->str_cache;                 /* the charge reply's */
        w->scap = w->r->str_cache_cap;              /* buffer, kept */
        w->r->str_cache = NULL;
        w->r->str_cache_cap = 0;
    } else {
        rep->str = malloc(len + 1);
        ((tg_reply *)rep)->scap = len < TG_REDIS_STR_CACHE_MAX ? len + 1 : 0;
    }
    if (rep->str == NULL) {
        reply_free(rep);
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
    tg_reply *w;

    if (e != NULL && elements > TG_REDIS_MAX_ELEMENTS) {
        e->r->stats.oversized++;
        tg_warn("redis: a reply announced %d elements (at most %d): dropping the "
                "connection", elements, TG_REDIS_MAX_ELEMENTS);
        return NULL;
    }
    if (e != NULL && !sub_push_array_ok(e->ac, task, elements)) {
        proto_warn(e, "a pub/sub message of fewer than 3 elements");
        return NULL;
    }
    rep = reply_new(task, REDIS_REPLY_ARRAY);
    if (rep == NULL) {
        return NULL;
    }
    w = (tg_reply *)rep;
    if (elements > 0) {
        struct tg_redis *r = w->r;
        if (r->elem_cache != NULL && r->elem_cache_cap >= (size_t)elements) {
            rep->element = (redisReply **)r->elem_cache;
            w->ecap = r->elem_cache_cap;
            r->elem_cache = NULL;
            r->elem_cache_cap = 0;
            memset(rep->element, 0, (size_t)elements * sizeof(*rep->element));
        } else {
            rep->element = calloc((size_t)elements, sizeof(*rep->element));
            if (rep->element == NULL) {
                reply_free(rep);
                return NULL;
            }
            w->ecap = (size_t)elements;
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
    reply_string, reply_array, reply_integer, reply_nil, reply_free,
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

    e->wadded = 0;              /* one-shot: no longer pending, if it was */
    e->writing = 1;
    redisAsyncHandleWrite(e->ac);
    e->writing = 0;
    if (e->dead) {
        rctx_free(e);
    }
}

static void rctx_add_read(void *p)  { event_add(((struct tg_rctx *)p)->rev, NULL); }
static void rctx_del_read(void *p)  { event_del(((struct tg_rctx *)p)->rev); }

/*
 * hiredis asks to write after each command it buffers, and to stop once
 * its buffer is out.  Waiting for the socket to say writable (it almost
 * always is) cost two epoll_ctl per call (write event on, off) and a
 * loop wake-up: instead the write event is made active at once, so the
 * commands of this loop turn go out in one write() at its end; only a
 * write that could not finish (socket full), or a connect still in
 * progress (hiredis's write handler completes it), waits for epoll.
 */
static void
rctx_add_write(void *p)
{
    struct tg_rctx *e = p;

    if (e->writing || !(e->ac->c.flags & REDIS_CONNECTED)) {
        event_add(e->wev, NULL);
        e->wadded = 1;
    } else if (!e->wadded) {
        event_active(e->wev, EV_WRITE, 0);      /* no-op if already active */
    }
}

static void
rctx_del_write(void *p)
{
    struct tg_rctx *e = p;

    if (e->wadded) {
        event_del(e->wev);
        e->wadded = 0;
    }
}

static void
rctx_cleanup(void *p)
{
    struct tg_rctx *e = p;
    redisAsyncContext *ac = e->ac;

    /* never called twice, never called back into */
    memset(&ac->ev, 0, sizeof(ac->ev));
    ac->c.reader->privdata = NULL;
    event_del(e->rev);
    event_del(e->wev);                  /* also if only active */
    if (e->reading || e->writing) {
        e->dead = 1;
    } else {
        rctx_free(e);
    }
}

int
tg_redis_is_numeric_host(const char *host)
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
redisAsyncContext *
tg_redis_ctx_open(struct tg_redis *r, const char *host, int port, void *data, int sentinel,
         redisCallbackFn *auth_cb, void *privdata)
{
    const char *user = sentinel ? r->opts.sentinel_username : r->opts.username;
    const char *pass = sentinel ? r->opts.sentinel_password : r->opts.password;
    redisAsyncContext *ac;
    struct tg_rctx *e;

    if (!tg_redis_is_numeric_host(host)) {
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
    /* persistent: a one-shot read event is deleted at each answer and
     * added again by hiredis, an epoll_ctl per call */
    e->rev = tg_event_new(r->base, ac->c.fd, EV_READ | EV_PERSIST, rctx_read_cb, e);
    e->wev = tg_event_new(r->base, ac->c.fd, EV_WRITE, rctx_write_cb, e);
    ac->c.reader->fn = &tg_reply_fns;
    ac->c.reader->privdata = e;
    ac->ev.addRead = rctx_add_read;
    ac->ev.delRead = rctx_del_read;
    ac->ev.addWrite = rctx_add_write;
    ac->ev.delWrite = rctx_del_write;
    ac->ev.cleanup = rctx_cleanup;
    ac->ev.data = e;
    event_add(e->rev, NULL);
    event_add(e->wev, NULL);            /* the connect's end */
    e->wadded = 1;
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
void
tg_redis_aux_auth_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_redis *r = privdata;

    if (reply != NULL && !r->destroying) {
        auth_ok(r, ac, reply, ac->data == &r->disc || ac->data == r);
    }
}

/* ------------------------------------------------------------------ */
/* nodes and their connections                                         */

struct tg_rnode *
tg_redis_node_new(struct tg_redis *r, const char *host, int port)
{
    struct tg_rnode *nd = tg_xcalloc(1, sizeof(*nd));

    tg_breaker_init(&nd->brk, &tg_redis_node_breaker_conf);

    nd->r = r;
    snprintf(nd->host, sizeof(nd->host), "%s", host);
    nd->port = port;
    nd->state = TG_REDIS_DOWN;
    nd->native_said = -1;
    nd->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
    nd->drop_ev = tg_event_new(r->base, -1, 0, drop_cb, nd);
    nd->reconnect_ev = tg_evtimer_new(r->base, reconnect_cb, nd);
    nd->connect_ev = tg_evtimer_new(r->base, connect_timeout_cb, nd);
    r->nodes = tg_xrealloc(r->nodes, (r->nnodes + 1) * sizeof(*r->nodes));
    r->nodes[r->nnodes++] = nd;
    return nd;
}

void
tg_redis_node_free(struct tg_rnode *nd)
{
    if (nd->drop_ev) event_free(nd->drop_ev);
    if (nd->reconnect_ev) event_free(nd->reconnect_ev);
    if (nd->connect_ev) event_free(nd->connect_ev);
    free(nd);
}

/* Cluster: the node at host:port, created (and connecting) if new.  Nodes
 * are never removed before tg_redis_destroy: a batch may point at one. */
struct tg_rnode *
tg_redis_node_get(struct tg_redis *r, const char *host, int port, size_t *idx)
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
    nd = tg_redis_node_new(r, host, port);
    if (nd == NULL) {
        return NULL;
    }
    *idx = r->nnodes - 1;
    tg_info("redis: cluster node %s:%d", host, port);
    tg_redis_conn_start(nd);
    return nd;
}

/* Reconnect soon, without the accumulated backoff (Sentinel: asking the
 * sentinels again on the way). */
void
tg_redis_node_kick(struct tg_rnode *nd)
{
    struct timeval now = { 0, 0 };

    nd->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
    if (nd->ac != NULL) {
        tg_redis_schedule_drop(nd);
    } else if (!nd->r->destroying) {
        evtimer_del(nd->reconnect_ev);
        evtimer_add(nd->reconnect_ev, &now);
    }
}

/* Connection warnings of a node: at most one per TG_REDIS_WARN_MS (a
 * Redis refusing every connection would flood the log). */
void
tg_redis_node_warn(struct tg_rnode *nd, const char *fmt, ...)
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
void
tg_redis_node_good(struct tg_rnode *nd)
{
    nd->backoff_ms = TG_REDIS_BACKOFF_MIN_MS;
}

int
tg_redis_node_usable(const struct tg_rnode *nd)
{
    return nd != NULL && nd->state == TG_REDIS_READY && nd->ac != NULL;
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
    tg_redis_schedule_drop(nd);
}

/* Stop waiting for the node's resolution (deadline, destroy). */
void
tg_redis_dns_give_up(struct tg_rnode *nd)
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
        tg_redis_node_warn(nd, "redis: cannot resolve %s: %s", nd->host,
                  result != 0 ? evutil_gai_strerror(result) : "no address");
        if (res != NULL) {
            evutil_freeaddrinfo(res);
        }
        tg_redis_schedule_reconnect(nd);
        return;
    }
    memcpy(nd->ip, a.host, strlen(a.host) + 1);
    evutil_freeaddrinfo(res);
    conn_connect(nd);
}

/* Connect to the node: its host when numeric, else resolved off the loop
 * first (evdns; the connect deadline covers the resolution). */
void
tg_redis_conn_start(struct tg_rnode *nd)
{
    struct tg_redis *r = nd->r;
    struct evutil_addrinfo hints;
    struct evdns_getaddrinfo_request *req;
    struct tg_rdns *t;
    struct timeval tv;
    unsigned ms;

    if (nd->host[0] == '\0') {
        tg_redis_schedule_reconnect(nd);
        return;
    }
    if (tg_redis_is_numeric_host(nd->host)) {
        memcpy(nd->ip, nd->host, strlen(nd->host) + 1);    /* < INET6_ADDRSTRLEN */
        conn_connect(nd);
        return;
    }
    if (r->dns == NULL) {
        tg_redis_node_warn(nd, "redis: %s is a name and no resolver is available",
                           nd->host);
        tg_redis_schedule_reconnect(nd);
        return;
    }
    nd->state = TG_REDIS_CONNECTING;
    ms = r->opts.timeout_ms > TG_REDIS_CONNECT_MIN_MS ? r->opts.timeout_ms
                                                      : TG_REDIS_CONNECT_MIN_MS;
    tv = tg_ms_tv(ms);
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
    nd->native = 0;
    ac = tg_redis_ctx_open(r, nd->ip, nd->port, nd, 0, node_auth_cb, nd);
    if (ac == NULL) {
        tg_redis_schedule_reconnect(nd);
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
        nd->gates++;            /* AUTH, queued by tg_redis_ctx_open */
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
    if (!r->opts.no_native) {
        redisAsyncCommand(ac, native_cb, nd, "TOLLGATE.PROTO");
    }

    ms = r->opts.timeout_ms > TG_REDIS_CONNECT_MIN_MS ? r->opts.timeout_ms
                                                      : TG_REDIS_CONNECT_MIN_MS;
    tv = tg_ms_tv(ms);
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
            tg_redis_schedule_reconnect(nd);
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
        tg_redis_sub_follow(nd->r);
    }
    nd->failed = 0;
    evtimer_del(nd->connect_ev);
    tg_info("redis: connected to %s:%d", nd->host, nd->port);
}

/* One of SELECT/ROLE answered well. */
static void
gate_pass(struct tg_rnode *nd)
{
    tg_redis_node_good(nd);
    if (nd->gates > 0 && --nd->gates == 0 && nd->state == TG_REDIS_CONNECTING) {
        set_ready(nd);
    }
}

void
tg_redis_schedule_reconnect(struct tg_rnode *nd)
{
    struct tg_redis *r = nd->r;
    struct timeval tv;
    uint64_t x, ms;

    nd->state = TG_REDIS_DOWN;
    evtimer_del(nd->connect_ev);
    if (nd->tried) {
        nd->tried = 0;
        tg_redis_sentinel_distrust(r);
    }
    if (r->mode == TG_MODE_CLUSTER && !r->destroying) {
        nd->failed = 1;
        tg_redis_cluster_kick(r, nd);
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
    tv = tg_ms_tv(ms);
    evtimer_add(nd->reconnect_ev, &tv);
}

/* Drop the current context on a clean stack (not inside a hiredis or
 * batch callback). */
void
tg_redis_schedule_drop(struct tg_rnode *nd)
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
        tg_redis_node_warn(nd, "redis: connect to %s:%d failed: %s", nd->host, nd->port,
                  ac->errstr);
        if (nd->ac == ac) {
            nd->ac = NULL;
        }
        tg_redis_schedule_reconnect(nd);
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
        tg_redis_node_warn(nd, "redis: connection to %s:%d lost: %s", nd->host, nd->port,
                  ac->errstr);
    } else {
        tg_redis_node_warn(nd, "redis: connection to %s:%d closed", nd->host, nd->port);
    }
    tg_redis_schedule_reconnect(nd);
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
    tg_redis_schedule_drop(nd);
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
    tg_redis_node_warn(nd, "redis: %s:%d is not a master (%s): asking the sentinels again",
            nd->host, nd->port,
            rep->type == REDIS_REPLY_ARRAY && rep->elements >= 1
            && rep->element[0]->type == REDIS_REPLY_STRING ? rep->element[0]->str
            : rep->type == REDIS_REPLY_ERROR ? rep->str : "unexpected ROLE reply");
    tg_redis_schedule_drop(nd);          /* reconnect = ask again, after a backoff */
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
        tg_redis_node_warn(nd, "redis: SCRIPT LOAD failed: %.200s", rep->str);
        if (strncmp(rep->str, "NOAUTH", 6) == 0 && nd->r->opts.password[0] == '\0') {
            tg_error("redis: %s:%d requires a password: set redis.password "
                     "(or redis.password_file)", nd->host, nd->port);
            set_last_error("%s:%d requires a password (NOAUTH): set redis.password",
                           nd->host, nd->port);
        }
        return;
    }
    tg_redis_node_good(nd);
    if (rep->type != REDIS_REPLY_STRING || rep->len != 40
               || strncasecmp(rep->str, nd->r->sha, 40) != 0) {
        tg_warn("redis: SCRIPT LOAD answered an unexpected digest");
    }
}

/* redis.native: does this server run the charge natively (the module
 * tollgate-redis.so, TOLLGATE.PROTO = ours)?  Charges sent before the
 * answer go as EVALSHA; an error ("unknown command") means no module. */
static void
native_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_rnode *nd = privdata;
    redisReply *rep = reply;
    int native;

    (void)ac;
    if (rep == NULL || nd->r->destroying) {
        return;
    }
    native = rep->type == REDIS_REPLY_INTEGER && rep->integer == TG_GCRA_NATIVE_PROTO;
    nd->native = (uint8_t)native;
    if (native == nd->native_said) {
        return;
    }
    nd->native_said = (int8_t)native;
    if (native) {
        tg_info("redis: %s:%d runs tollgate's module: charges as TOLLGATE.CHARGE",
                nd->host, nd->port);
    } else if (rep->type == REDIS_REPLY_INTEGER) {
        tg_warn("redis: %s:%d runs tollgate's module with protocol %lld, this tollgate "
                "speaks %d: charges with the script (update the module)", nd->host,
                nd->port, rep->integer, TG_GCRA_NATIVE_PROTO);
    } else {
        tg_debug("redis: %s:%d has no tollgate module: charges with the script",
                 nd->host, nd->port);
    }
}

static void
drop_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_rnode *nd = arg;

    if (nd->ac != NULL && nd->ac == nd->drop_ac) {
        tg_redis_node_warn(nd, "redis: dropping the connection to %s:%d", nd->host,
                           nd->port);
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
        tg_redis_sentinel_discover(r);   /* connects when a sentinel answers */
    } else {
        tg_redis_conn_start(nd);
    }
}

static void
connect_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_rnode *nd = arg;

    if (nd->resolving) {
        tg_redis_node_warn(nd, "redis: resolving %s timed out", nd->host);
        tg_redis_dns_give_up(nd);
        tg_redis_schedule_reconnect(nd);
    } else if (nd->ac != NULL && nd->state != TG_REDIS_READY) {
        tg_redis_node_warn(nd, "redis: connect to %s:%d timed out", nd->host, nd->port);
        conn_drop(nd);
    }
}

/* ------------------------------------------------------------------ */
/* aux: one question on a short-lived connection                       */

static void aux_timer_cb(evutil_socket_t fd, short what, void *arg);

void
tg_redis_aux_init(struct tg_redis *r, struct tg_raux *aux, tg_raux_done done)
{
    aux->r = r;
    aux->done = done;
    aux->timer = tg_evtimer_new(r->base, aux_timer_cb, aux);
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
void
tg_redis_aux_start(struct tg_raux *aux, const char *host, int port, int argc,
                   const char **argv)
{
    struct tg_redis *r = aux->r;
    redisAsyncContext *ac;
    struct timeval tv;
    unsigned ms;

    tg_redis_aux_cancel(aux);
    snprintf(aux->host, sizeof(aux->host), "%s", host);
    aux->port = port;
    ac = tg_redis_ctx_open(r, host, port, aux, aux == &r->disc, tg_redis_aux_auth_cb, r);
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
    tv = tg_ms_tv(ms);
    evtimer_add(aux->timer, &tv);
}

void
tg_redis_aux_cancel(struct tg_raux *aux)
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
