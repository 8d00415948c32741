/*
 * worker.c - worker threads: one event base and one tg_proxy each.  The
 * worker owns what its proxy uses (tg_proxy_env: limiter, upstream pool,
 * metric shard, access-log buffer) and reads its state from them for the
 * main thread (sampler_cb).
 *
 * The main thread talks to a worker only through its pipe, with fixed-size
 * messages of fewer than PIPE_BUF bytes (so each write is atomic and needs
 * no lock).  Everything else a worker touches is its own.
 */
#include "tollgate/worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/listener.h>

#include "tollgate/accesslog.h"
#include "tollgate/anomaly.h"
#include "tollgate/common_ev.h"
#include "tollgate/connlimit.h"
#include "tollgate/evmem.h"
#include "tollgate/keys.h"
#include "tollgate/limiter.h"
#include "tollgate/metrics.h"
#include "tollgate/proxy.h"
#include "tollgate/tls.h"
#include "tollgate/upstream.h"

#define WORKER_MAX_LISTEN 64       /* own listeners (http.reuseport) */
#define ACCEPT_PAUSE_MS   100      /* accept off this long when fds run out */
#define INTAKE_PER_TURN   4        /* new connections' cost started per loop turn: */
#define INTAKE_COST_PLAIN 1        /*   a plain one */
#define INTAKE_COST_TLS   4        /*   a TLS one (its first flight: key exchange, signature) */

enum { MSG_CONN, MSG_DRAIN, MSG_RELOAD };

/* One listening socket of this worker (http.reuseport). */
typedef struct worker_listener {
    struct tg_worker       *w;
    unsigned                idx;      /* listener index in the config */
    struct evconnlistener  *l;
} worker_listener;

/* A peer address as accept gave it (IPv4 or IPv6; sa_family 0: none). */
typedef union worker_peer {
    struct sockaddr      sa;
    struct sockaddr_in   in;
    struct sockaddr_in6  in6;
} worker_peer;

/* An accepted connection not started yet (the intake queue). */
typedef struct pending_conn {
    int                  fd;
    unsigned             idx;      /* listener index in the config */
    worker_peer          peer;     /* its address, from accept */
    struct tg_connslot  *slot;     /* its count, released at close */
    uint64_t             since;    /* ms: when it was accepted */
} pending_conn;

typedef struct tg_worker_msg {
    uint32_t        type;
    int32_t         fd;       /* MSG_CONN */
    uint32_t        arg;      /* MSG_CONN: listener index; MSG_DRAIN: timeout ms */
    tg_conf        *conf;     /* MSG_RELOAD: a reference, given to the worker */
    struct tg_keys *keys;     /* MSG_RELOAD: a reference, given to the worker */
    struct tg_tls_set *tls;   /* MSG_RELOAD: a reference, given to the worker */
    struct tg_connslot *slot; /* MSG_CONN: its count, released at close */
    worker_peer     peer;     /* MSG_CONN: its address, from accept */
    uint64_t        accepted; /* MSG_CONN: ms, when the main thread accepted it */
} tg_worker_msg;

struct tg_worker {
    unsigned           id;
    pthread_t          thread;
    int                started;
    int                finished;   /* atomic: loop ended */
    int                store_ready;  /* atomic: tg_limiter_store_ready, sampled */
    uint64_t           store_down_ms;  /* atomic: first sample (monotonic ms) of
                                          the store unavailable since it last
                                          was available; 0 = available */
    int                breaker;      /* atomic: enum tg_breaker_state, sampled */
    int               *upstate;      /* atomic each: upstream breakers (enum
                                        tg_breaker_state), sampled */
    size_t             nservers;
    struct event      *sampler;    /* refreshes store_ready */
    struct event_base *base;
    struct event      *notify;     /* read end of the pipe */
    struct event      *deadline;   /* drain time limit */
    int                pipefd[2];
    tg_conf           *conf;       /* the latest (reload): our reference */
    struct tg_tls_set *tls;        /* listeners' TLS contexts: our reference */
    struct tg_proxy   *px;
    tg_proxy_env       env;        /* owned: limiter, pool, shard, log buffer;
                                      borrowed: anomaly shard (or NULL) */
    worker_listener    listeners[WORKER_MAX_LISTEN];   /* http.reuseport */
    size_t             nlisteners;
    struct tg_connlimit *connlimit;  /* http.reuseport: counted here */
    struct event      *accept_resume;  /* accept paused (EMFILE) until it fires */
    int                draining;
    uint64_t           refused_logged;  /* ms: one line a second */
    pending_conn      *pend;       /* intake queue: a ring of npend_cap */
    size_t             pend_head;  /* the oldest */
    size_t             npend;
    size_t             pend_cap;
    struct event      *intake;     /* starts the next ones, next loop turn */
    uint64_t           stale;      /* queued past their time limit, closed */
    uint64_t           stale_logged;   /* ms: one line a second */
    /* main thread only: a reload and a drain that found the pipe full,
     * sent by tg_worker_flush, in that order */
    tg_worker_msg      pend_reload;
    int                has_reload;
    int                has_drain;
    unsigned           drain_ms;
};

static void *worker_main(void *arg);
static void notify_cb(evutil_socket_t fd, short what, void *arg);
static void deadline_cb(evutil_socket_t fd, short what, void *arg);
static void on_empty(void *arg);
static void sampler_cb(evutil_socket_t fd, short what, void *arg);
static void sample_store(struct tg_worker *w);
static void accept_cb(struct evconnlistener *l, evutil_socket_t fd,
                      struct sockaddr *sa, int salen, void *arg);
static void accept_error_cb(struct evconnlistener *l, void *arg);
static void accept_resume_cb(evutil_socket_t fd, short what, void *arg);
static void close_listeners(struct tg_worker *w);
static void peer_copy(worker_peer *to, const struct sockaddr *sa, int salen);
static void intake_push(struct tg_worker *w, int fd, const worker_peer *peer, unsigned idx,
                        struct tg_connslot *slot, uint64_t accepted);
static void intake_run(struct tg_worker *w, size_t budget);
static void intake_cb(evutil_socket_t fd, short what, void *arg);
static void drop_unread(struct tg_worker *w);

struct tg_worker *
tg_worker_create(unsigned id, tg_conf *conf, struct tg_keys *keys,
                 struct tg_tls_set *tls, char *err, size_t errlen)
{
    struct tg_worker *w = tg_xcalloc(1, sizeof(*w));
    struct event_config *cfg;

    w->id = id;
    w->pipefd[0] = w->pipefd[1] = -1;
    if (pipe2(w->pipefd, O_CLOEXEC) != 0) {
        snprintf(err, errlen, "worker %u: pipe: %s", id, strerror(errno));
        goto fail;
    }
    evutil_make_socket_nonblocking(w->pipefd[0]);
    evutil_make_socket_nonblocking(w->pipefd[1]);   /* send_msg */
    /* libevent's blocks from a per-thread cache (no malloc per request);
     * here, on the main thread, before any worker thread runs. */
    tg_evmem_install();
    /* Only this thread touches its base: no locks; and let epoll batch
     * the enable/disable pairs of one loop turn. */
    cfg = event_config_new();
    event_config_set_flag(cfg, EVENT_BASE_FLAG_NOLOCK | EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    w->base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    if (w->base == NULL) {
        snprintf(err, errlen, "worker %u: cannot create an event base", id);
        goto fail;
    }
    w->notify = tg_event_new(w->base, w->pipefd[0], EV_READ | EV_PERSIST, notify_cb, w);
    w->deadline = tg_evtimer_new(w->base, deadline_cb, w);
    w->intake = tg_evtimer_new(w->base, intake_cb, w);
    event_add(w->notify, NULL);
    w->env.limiter = tg_limiter_create(w->base, conf, keys, err, errlen);
    if (w->env.limiter == NULL) {
        event_free(w->notify);
        event_free(w->deadline);
        event_free(w->intake);
        event_base_free(w->base);
        goto fail;
    }
    w->env.pool = tg_upstream_pool_create(w->base, conf);
    w->env.shard = tg_metrics_shard_create();
    tg_limiter_set_shard(w->env.limiter, w->env.shard);
    tg_upstream_pool_set_shard(w->env.pool, w->env.shard);
    w->px = tg_proxy_create(w->base, conf, &w->env, on_empty, w);
    w->conf = tg_conf_ref(conf);
    w->tls = tg_tls_set_ref(tls);
    w->nservers = conf->upstream.nservers;
    w->upstate = tg_xcalloc(w->nservers, sizeof(*w->upstate));
    {
        struct timeval tv = { 0, 50 * 1000 };
        w->sampler = tg_event_new(w->base, -1, EV_PERSIST, sampler_cb, w);
        event_add(w->sampler, &tv);
        sample_store(w);
        w->breaker = tg_limiter_breaker_state(w->env.limiter);
    }
    return w;

fail:
    if (w->pipefd[0] >= 0) {
        close(w->pipefd[0]);
        close(w->pipefd[1]);
    }
    free(w);
    return NULL;
}

tg_rc
tg_worker_start(struct tg_worker *w)
{
    sigset_t all, old;
    int rc;

    /* Signals belong to the main thread. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    rc = pthread_create(&w->thread, NULL, worker_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        tg_error("worker %u: pthread_create: %s", w->id, strerror(rc));
        return TG_ERR;
    }
    w->started = 1;
    return TG_OK;
}

/*
 * Both ends of the pipe are non-blocking.  A connection is handed over
 * only when the pipe has room (wait = 0: TG_AGAIN when it is full, and
 * the main thread gives the connection to another worker), so a worker
 * that stops reading its pipe - stuck, or a loop turn that lasts - does
 * not stop the main thread's accepting, admin listener and signals with
 * it.  A reload or a drain that finds the pipe full waits in the worker
 * (tg_worker_flush sends it when there is room; wait = 1 blocks: at
 * exit only).  A message is shorter than PIPE_BUF: written whole or not
 * at all.
 */
static tg_rc
send_msg(struct tg_worker *w, const tg_worker_msg *m, int wait)
{
    struct pollfd p = { w->pipefd[1], POLLOUT, 0 };
    ssize_t n;

    for (;;) {
        n = write(w->pipefd[1], m, sizeof(*m));
        if (n == (ssize_t)sizeof(*m)) {
            return TG_OK;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
            return TG_ERR;
        }
        if (!wait) {
            return TG_AGAIN;
        }
        if (poll(&p, 1, -1) < 0 && errno != EINTR) {
            return TG_ERR;
        }
    }
}

tg_rc
tg_worker_dispatch(struct tg_worker *w, int fd, const struct sockaddr *sa, int salen,
                   unsigned listener_idx, struct tg_connslot *slot)
{
    tg_worker_msg m = { MSG_CONN, fd, listener_idx, NULL, NULL, NULL, slot, { .sa = { 0 } },
                        tg_now_ms() };   /* called from the accept callback */

    peer_copy(&m.peer, sa, salen);
    return send_msg(w, &m, 0);
}

tg_rc
tg_worker_listen(struct tg_worker *w, int fd, unsigned listener_idx,
                 struct tg_connlimit *cl)
{
    worker_listener *wl;

    if (w->nlisteners == WORKER_MAX_LISTEN) {
        tg_error("worker %u: more than %d listeners", w->id, WORKER_MAX_LISTEN);
        close(fd);
        return TG_ERR;
    }
    if (w->accept_resume == NULL) {
        w->accept_resume = tg_evtimer_new(w->base, accept_resume_cb, w);
    }
    wl = &w->listeners[w->nlisteners];
    wl->w = w;
    wl->idx = listener_idx;
    wl->l = evconnlistener_new(w->base, accept_cb, wl,     /* 0: fd listens already */
                               LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 0, fd);
    if (wl->l == NULL) {
        tg_error("worker %u: cannot create a listener", w->id);
        close(fd);
        return TG_ERR;
    }
    evconnlistener_set_error_cb(wl->l, accept_error_cb);
    w->connlimit = cl;
    w->nlisteners++;
    return TG_OK;
}

static void
drop_reload(tg_worker_msg *m)
{
    tg_conf_unref(m->conf);
    tg_keys_unref(m->keys);
    tg_tls_set_unref(m->tls);
}

tg_rc
tg_worker_drain(struct tg_worker *w, unsigned timeout_ms)
{
    w->has_drain = 1;
    w->drain_ms = timeout_ms;
    return tg_worker_flush(w, 0);
}

tg_rc
tg_worker_reload(struct tg_worker *w, tg_conf *conf, struct tg_keys *keys,
                 struct tg_tls_set *tls)
{
    tg_worker_msg m = { MSG_RELOAD, -1, 0, tg_conf_ref(conf), tg_keys_ref(keys),
                        tg_tls_set_ref(tls), NULL, { .sa = { 0 } }, 0 };

    if (w->has_reload) {                 /* never sent: the newer one replaces it */
        drop_reload(&w->pend_reload);
    }
    w->pend_reload = m;
    w->has_reload = 1;
    return tg_worker_flush(w, 0);
}

tg_rc
tg_worker_flush(struct tg_worker *w, int wait)
{
    tg_rc rc = TG_OK;

    if (w->has_reload) {
        rc = send_msg(w, &w->pend_reload, wait);
        if (rc == TG_AGAIN) {
            return TG_AGAIN;
        }
        if (rc != TG_OK) {
            drop_reload(&w->pend_reload);
        }
        w->has_reload = 0;
    }
    if (w->has_drain) {
        tg_worker_msg m = { MSG_DRAIN, -1, w->drain_ms, NULL, NULL, NULL, NULL,
                            { .sa = { 0 } }, 0 };
        tg_rc d = send_msg(w, &m, wait);
        if (d == TG_AGAIN) {
            return TG_AGAIN;
        }
        w->has_drain = 0;
        rc = rc == TG_OK ? d : rc;
    }
    return rc;
}

int
tg_worker_pending(const struct tg_worker *w)
{
    return w->has_reload || w->has_drain;
}

int
tg_worker_store_ready(struct tg_worker *w)
{
    return __atomic_load_n(&w->store_ready, __ATOMIC_RELAXED);
}

/* The store's state for the main thread, and since when it is down: the
 * redis_down alert counts from the first sample that saw it down after
 * one that saw it up (or from the start), so a Redis that came up and went
 * down again between two of the alerts' own ticks is not counted as down
 * all along. */
static void
sample_store(struct tg_worker *w)
{
    int ready = tg_limiter_store_ready(w->env.limiter);

    __atomic_store_n(&w->store_ready, ready, __ATOMIC_RELAXED);
    if (ready) {
        __atomic_store_n(&w->store_down_ms, 0, __ATOMIC_RELAXED);
    } else if (__atomic_load_n(&w->store_down_ms, __ATOMIC_RELAXED) == 0) {
        __atomic_store_n(&w->store_down_ms, tg_now_ms(), __ATOMIC_RELAXED);
    }
}

uint64_t
tg_worker_store_down_ms(struct tg_worker *w)
{
    return __atomic_load_n(&w->store_down_ms, __ATOMIC_RELAXED);
}

static void
sampler_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_worker *w = arg;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    sample_store(w);
    __atomic_store_n(&w->breaker, tg_limiter_breaker_state(w->env.limiter), __ATOMIC_RELAXED);
    tg_limiter_sample(w->env.limiter);
    for (size_t i = 0; i < w->nservers; i++) {
        __atomic_store_n(&w->upstate[i], (int)tg_upstream_server_state(w->env.pool, i),
                         __ATOMIC_RELAXED);
    }
    tg_anomaly_shard_tick(w->env.anomaly, tg_now_ms());
}

enum tg_breaker_state
tg_worker_upstream_state(struct tg_worker *w, size_t server)
{
    return server < w->nservers
           ? (enum tg_breaker_state)__atomic_load_n(&w->upstate[server], __ATOMIC_RELAXED)
           : TG_BREAKER_CLOSED;
}

void
tg_worker_set_access_log(struct tg_worker *w, struct tg_alog *log)
{
    w->env.alog = tg_alog_buf_create(log, w->base);
}

void
tg_worker_set_anomaly(struct tg_worker *w, struct tg_anomaly_shard *sh)
{
    w->env.anomaly = sh;
    tg_anomaly_shard_tick(sh, tg_now_ms());
}

struct tg_metrics_shard *
tg_worker_shard(struct tg_worker *w)
{
    return w->env.shard;
}

enum tg_breaker_state
tg_worker_redis_breaker(struct tg_worker *w)
{
    return (enum tg_breaker_state)__atomic_load_n(&w->breaker, __ATOMIC_RELAXED);
}

int
tg_worker_finished(struct tg_worker *w)
{
    return __atomic_load_n(&w->finished, __ATOMIC_ACQUIRE);
}

void
tg_worker_join_destroy(struct tg_worker *w)
{
    if (w == NULL) {
        return;
    }
    if (w->started) {
        pthread_join(w->thread, NULL);
    }
    close_listeners(w);
    if (w->accept_resume != NULL) {
        event_free(w->accept_resume);
    }
    while (w->npend > 0) {            /* never started: no client owns them */
        pending_conn *pc = &w->pend[w->pend_head];
        close(pc->fd);
        tg_connlimit_release(pc->slot);
        w->pend_head = (w->pend_head + 1) % w->pend_cap;
        w->npend--;
    }
    free(w->pend);
    event_free(w->intake);
    drop_unread(w);                   /* sent after the loop's last read */
    if (w->has_reload) {              /* never sent */
        drop_reload(&w->pend_reload);
        w->has_reload = 0;
    }
    tg_proxy_destroy(w->px);          /* its clients first: they hold the rest */
    tg_upstream_pool_destroy(w->env.pool);
    tg_limiter_destroy(w->env.limiter);
    tg_metrics_shard_destroy(w->env.shard);
    if (w->env.alog != NULL) {
        tg_alog_buf_destroy(w->env.alog);
    }
    event_free(w->sampler);
    event_free(w->notify);
    event_free(w->deadline);
    event_base_free(w->base);
    close(w->pipefd[0]);
    close(w->pipefd[1]);
    tg_conf_unref(w->conf);
    tg_tls_set_unref(w->tls);
    free(w->upstate);
    free(w);
}

/* ---- thread --------------------------------------------------------- */

static void *
worker_main(void *arg)
{
    struct tg_worker *w = arg;
    char name[16];

    snprintf(name, sizeof(name), "tg-worker-%u", w->id % 100000);   /* top -H, ps -L */
    pthread_setname_np(pthread_self(), name);
    event_base_dispatch(w->base);
    __atomic_store_n(&w->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

static void
notify_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_worker *w = arg;
    tg_worker_msg m[64];
    ssize_t n;
    size_t i;

    TG_UNUSED(what);
    n = read(fd, m, sizeof(m));
    if (n <= 0) {
        return;
    }
    for (i = 0; i < (size_t)n / sizeof(m[0]); i++) {
        if (m[i].type == MSG_CONN) {
            intake_push(w, m[i].fd, &m[i].peer, m[i].arg, m[i].slot, m[i].accepted);
        } else if (m[i].type == MSG_RELOAD) {
            tg_limiter_reload(w->env.limiter, m[i].conf, m[i].keys);
            tg_proxy_reload(w->px, m[i].conf);
            tg_conf_unref(w->conf);
            w->conf = m[i].conf;       /* the queue's time limits */
            tg_keys_unref(m[i].keys);
            tg_tls_set_unref(w->tls);  /* freed here if the last: its SSLs hold theirs */
            w->tls = m[i].tls;         /* certificates for the next handshakes */
        } else if (m[i].type == MSG_DRAIN) {
            struct timeval tv = tg_ms_tv(m[i].arg);
            evtimer_add(w->deadline, &tv);
            event_del(w->sampler);     /* lets the loop end when idle */
            w->draining = 1;
            close_listeners(w);        /* new connections are refused */
            intake_run(w, SIZE_MAX);   /* accepted ones are served */
            tg_proxy_drain(w->px);
        }
    }
    intake_run(w, INTAKE_PER_TURN);
}

/* The messages the loop never read (it ended first): give back what
 * each carries, as notify_cb would have taken it.  The thread is joined. */
static void
drop_unread(struct tg_worker *w)
{
    tg_worker_msg m;

    while (read(w->pipefd[0], &m, sizeof(m)) == (ssize_t)sizeof(m)) {
        if (m.type == MSG_CONN) {
            close(m.fd);
            tg_connlimit_release(m.slot);
        } else if (m.type == MSG_RELOAD) {
            drop_reload(&m);
        }
    }
}

static void
deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_worker *w = arg;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    tg_warn("worker %u: drain timeout, closing %u connection(s)",
            w->id, tg_proxy_nclients(w->px));
    event_base_loopbreak(w->base);
}

static void
on_empty(void *arg)
{
    struct tg_worker *w = arg;
    event_base_loopexit(w->base, NULL);
}

/* ---- own listeners (http.reuseport, or the one worker) ---------------- */

/*
 * As the main thread's accept: a connection over a cap is closed before
 * a byte of it is read (the table is shared, so the caps are the
 * process's, exact); the others are this worker's.
 */
static void
accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
          int salen, void *arg)
{
    worker_listener *wl = arg;
    struct tg_worker *w = wl->w;
    enum tg_connlimit_verdict v;
    struct tg_connslot *slot;
    worker_peer peer;

    TG_UNUSED(l);
    v = tg_connlimit_acquire(w->connlimit, sa, &slot);
    if (v != TG_CONN_OK) {
        close(fd);
        tg_metrics_global_inc(TG_M_CONNS_REFUSED, 0);
        if (tg_now_ms() - w->refused_logged >= 1000) {   /* one line a second */
            char ip[INET6_ADDRSTRLEN] = "?";
            const void *a = sa->sa_family == AF_INET6
                ? (const void *)&((struct sockaddr_in6 *)(void *)sa)->sin6_addr
                : (const void *)&((struct sockaddr_in *)(void *)sa)->sin_addr;
            inet_ntop(sa->sa_family, a, ip, sizeof(ip));
            w->refused_logged = tg_now_ms();
            tg_warn("worker %u: connection from %s closed: over %s (%u)", w->id, ip,
                    v == TG_CONN_OVER_IP ? "http.max_connections_per_ip"
                                         : "http.max_connections",
                    v == TG_CONN_OVER_IP ? w->conf->http.max_connections_per_ip
                                         : w->conf->http.max_connections);
        }
        return;
    }
    peer_copy(&peer, sa, salen);
    intake_push(w, fd, &peer, wl->idx, slot, tg_now_ms());
    intake_run(w, 0);                 /* libevent accepts the whole backlog: start
                                         them from the next turn on */
}

/* Out of descriptors: stop accepting for ACCEPT_PAUSE_MS rather than spin
 * (the pending connections wait in the kernel's backlog). */
static void
accept_error_cb(struct evconnlistener *l, void *arg)
{
    worker_listener *wl = arg;
    struct tg_worker *w = wl->w;
    struct timeval tv = { 0, ACCEPT_PAUSE_MS * 1000 };
    int err = EVUTIL_SOCKET_ERROR();
    size_t i;

    TG_UNUSED(l);
    if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM) {
        tg_error("worker %u: accept: %s", w->id, evutil_socket_error_to_string(err));
        return;
    }
    if (evtimer_pending(w->accept_resume, NULL)) {
        return;
    }
    for (i = 0; i < w->nlisteners; i++) {
        evconnlistener_disable(w->listeners[i].l);
    }
    evtimer_add(w->accept_resume, &tv);
    if (tg_now_ms() - w->refused_logged >= 1000) {
        w->refused_logged = tg_now_ms();
        tg_warn("worker %u: accept: %s: not accepting for %d ms (%u connection(s) open)",
                w->id, evutil_socket_error_to_string(err), ACCEPT_PAUSE_MS,
                tg_connlimit_total(w->connlimit));
    }
}

static void
accept_resume_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_worker *w = arg;
    size_t i;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    for (i = 0; !w->draining && i < w->nlisteners; i++) {
        evconnlistener_enable(w->listeners[i].l);
    }
}

static void
close_listeners(struct tg_worker *w)
{
    size_t i;

    for (i = 0; i < w->nlisteners; i++) {
        evconnlistener_free(w->listeners[i].l);
    }
    w->nlisteners = 0;
    if (w->accept_resume != NULL) {
        evtimer_del(w->accept_resume);
    }
}

/* ---- intake --------------------------------------------------------- */

/*
 * New connections (from the pipe, or this worker's own listeners) wait in
 * a queue, and each loop turn starts one TLS connection or up to four
 * plain ones, the rest on the next turns: a TLS handshake's first flight
 * costs far more than a request, and starting a whole accept batch in one
 * turn made every connection already past its handshake wait behind all
 * of them (nginx, with multi_accept off, likewise accepts one connection
 * per turn).  An idle worker turns at once, so the queue only waits while
 * the worker is busy; the time a connection waits counts against its
 * first time limit (intake_run), from its accept (by the main thread too:
 * the message through the pipe carries the time).
 */
static void
intake_push(struct tg_worker *w, int fd, const worker_peer *peer, unsigned idx,
            struct tg_connslot *slot, uint64_t accepted)
{
    pending_conn *pc;

    if (w->npend == w->pend_cap) {
        size_t cap = w->pend_cap ? 2 * w->pend_cap : 64, i;
        pending_conn *np = tg_xmalloc(cap * sizeof(*np));

        for (i = 0; i < w->npend; i++) {
            np[i] = w->pend[(w->pend_head + i) % w->pend_cap];
        }
        free(w->pend);
        w->pend = np;
        w->pend_head = 0;
        w->pend_cap = cap;
    }
    pc = &w->pend[(w->pend_head + w->npend) % w->pend_cap];
    pc->fd = fd;
    pc->peer = *peer;
    pc->idx = idx;
    pc->slot = slot;
    pc->since = accepted;
    w->npend++;
}

/* Starts queued connections, oldest first, while budget lasts (each costs
 * INTAKE_COST_*); the next ones on the next loop turn (a zero timer fires
 * after the turn's I/O).  One that has waited longer than its first time
 * limit (http.handshake_timeout_ms, plain: http.header_timeout_ms) would
 * only be timed out after costing a handshake for a client that is likely
 * gone: it is closed unread, as the timeout would have. */
static void
intake_run(struct tg_worker *w, size_t budget)
{
    static const struct timeval zero = { 0, 0 };
    uint64_t now = tg_now_ms();
    size_t spent = 0;

    while (w->npend > 0 && spent < budget) {
        pending_conn pc = w->pend[w->pend_head];
        SSL_CTX *ctx = tg_tls_set_ctx(w->tls, pc.idx);
        unsigned limit = ctx != NULL ? w->conf->http.handshake_timeout_ms
                                     : w->conf->http.header_timeout_ms;

        w->pend_head = (w->pend_head + 1) % w->pend_cap;
        w->npend--;
        if (now > pc.since && now - pc.since >= limit) {
            close(pc.fd);
            tg_connlimit_release(pc.slot);
            w->stale++;
            continue;
        }
        spent += ctx != NULL ? INTAKE_COST_TLS : INTAKE_COST_PLAIN;
        tg_proxy_accept(w->px, pc.fd, pc.peer.sa.sa_family != 0 ? &pc.peer.sa : NULL,
                        ctx, pc.slot, pc.since);
    }
    if (w->npend > 0 && !evtimer_pending(w->intake, NULL)) {
        evtimer_add(w->intake, &zero);
    }
    if (w->stale > 0 && now - w->stale_logged >= 1000) {
        w->stale_logged = now;
        tg_warn("worker %u: %llu new connection(s) closed unread: queued longer than "
                "their handshake/header timeout (the worker is overloaded; %zu queued)",
                w->id, (unsigned long long)w->stale, w->npend);
        w->stale = 0;
    }
}

static void
intake_cb(evutil_socket_t fd, short what, void *arg)
{
    TG_UNUSED(fd);
    TG_UNUSED(what);
    intake_run(arg, INTAKE_PER_TURN);
}

/* The address accept gave (salen bytes of sa), if it is one we keep. */
static void
peer_copy(worker_peer *to, const struct sockaddr *sa, int salen)
{
    memset(to, 0, sizeof(*to));
    if (sa != NULL && salen > 0 && (size_t)salen <= sizeof(*to)
        && (sa->sa_family == AF_INET || sa->sa_family == AF_INET6)) {
        memcpy(to, sa, (size_t)salen);
    }
}
