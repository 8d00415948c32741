/*
 * server.c - the running process, on the main thread: start-up, the
 * listeners and accept, signals, drain, reload (SIGHUP) and stop.
 *
 * The main thread owns the listening sockets (accept, then hand the socket
 * to a worker; with http.reuseport it only opens one per worker, and with
 * a single worker only the one, which the workers accept on), the admin
 * listener, signals and the systemd
 * protocol.  It creates the process's objects at start and frees them at
 * stop, after the workers (docs/ARCHITECTURE.md, "Who owns what"); the
 * workers get theirs by reference: at start, and in each reload message
 * (config, keys, TLS contexts).
 */
#include "tollgate/server.h"

#include <errno.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/listener.h>
#include <event2/thread.h>
#include <systemd/sd-daemon.h>
#include <curl/curl.h>

#include "tollgate/accesslog.h"
#include "tollgate/admin.h"
#include "tollgate/alerts.h"
#include "tollgate/anomaly.h"
#include "tollgate/common_ev.h"
#include "tollgate/connlimit.h"
#include "tollgate/health.h"
#include "tollgate/keys.h"
#include "tollgate/metrics.h"
#include "tollgate/statsd.h"
#include "tollgate/throttle.h"
#include "tollgate/tls.h"
#include "tollgate/upstream.h"
#include "tollgate/worker.h"

#define ACCEPT_PAUSE_MS 100      /* accept off this long when fds run out */
#define LISTEN_BACKLOG  1024     /* connections the kernel keeps for accept
                                    (capped by net.core.somaxconn) */

/* State of the main thread; private to this file. */
static struct {
    tg_conf                 *conf;          /* the snapshot at start */
    tg_conf                 *live;          /* the latest (reload); == conf at start */
    struct event_base       *base;
    struct tg_worker       **workers;
    unsigned                 nworkers;
    unsigned                 next;          /* round-robin dispatch */
    struct evconnlistener  **listeners;     /* NULL each when the workers accept */
    int                     *rp_fds;        /* the workers accept: [listener *
                                               workers], until the workers
                                               take them (-1) */
    struct tg_connlimit     *connlimit;     /* http.max_connections{,_per_ip} */
    struct event            *accept_resume; /* accept paused (EMFILE, every worker's
                                               pipe full) until it fires */
    struct {                                /* the connection no worker could take
                                               (every pipe full), given first when
                                               the pause ends; fd -1: none */
        int                      fd;
        unsigned                 idx;
        struct tg_connslot      *slot;
        struct sockaddr_storage  sa;
        int                      salen;
    } held;
    uint64_t                 refused_logged;   /* last "over a cap" warning, ms */
    struct tg_tls_set       *tls;           /* the latest TLS contexts (our reference;
                                               each worker holds its own) */
    struct tg_keys          *keys;          /* auth.keys_file, or NULL */
    struct tg_alog          *alog;          /* access_log.path, or NULL */
    uint64_t                 alog_counted;  /* drops already in the metric */
    struct tg_health        *health;        /* upstream.health_check, or NULL */
    struct tg_admin         *admin;
    struct tg_alerts        *alerts;        /* the alert engine (curl multi) */
    struct tg_anomaly       *anomaly;       /* heavy hitters and baselines */
    uint64_t                 drain_deadline;
    struct event            *signals[4];
    struct event            *drain_timer;
    struct event            *flush_timer;   /* a reload or drain waits in a worker */
    struct event            *watchdog;
    struct tg_metrics_shard **shards;       /* one per worker, for scrapes */
    struct tg_statsd        *statsd;        /* metrics.statsd, or NULL */
    tg_admin_view            view;          /* what the admin pages read; draining,
                                               loaded, generation live here */
    struct {                                /* a reload's loading (loader_main) */
        pthread_t            thread;
        int                  running;       /* started, not joined yet */
        int                  again;         /* SIGHUP while loading: one more after */
        struct event        *done;          /* activated by the loader when it ends */
        const char          *path;
        struct tg_tls_set   *base;          /* the running TLS set (loader's ref) */
        tg_conf             *conf;          /* what it loaded: all three, or */
        struct tg_keys      *keys;          /* conf NULL and err says why */
        struct tg_tls_set   *tls;
        char                 err[TG_CONF_ERRLEN];
    } ld;
} g;

static tg_rc open_listeners(void);
static tg_rc open_reuseport(void);
static void accept_cb(struct evconnlistener *l, evutil_socket_t fd,
                      struct sockaddr *sa, int salen, void *arg);
static void accept_error_cb(struct evconnlistener *l, void *arg);
static void accept_resume_cb(evutil_socket_t fd, short what, void *arg);
static void pause_accepting(void);
static tg_rc dispatch(int fd, const struct sockaddr *sa, int salen, unsigned idx,
                      struct tg_connslot *slot);
static void give_held(int last);
static void close_held(void);
static void check_nofile(const tg_conf *conf);
static void signal_cb(evutil_socket_t sig, short what, void *arg);
static void drain_timer_cb(evutil_socket_t fd, short what, void *arg);
static void flush_timer_cb(evutil_socket_t fd, short what, void *arg);
static void control_sent(unsigned i, tg_rc rc, const char *what);
static void watchdog_cb(evutil_socket_t fd, short what, void *arg);
static void start_drain(void);
static int  adaptive_eq(const tg_conf *a, const tg_conf *b);
static void scrape_hook(void *arg);
static tg_rc metrics_init(const tg_conf *conf);
static void reload(const char *path);
static void *loader_main(void *arg);
static void loader_done_cb(evutil_socket_t fd, short what, void *arg);
static void loader_join(void);
static void reload_apply(tg_conf *conf, struct tg_keys *keys, struct tg_tls_set *tls);

/* ---- start and stop -------------------------------------------------- */

int
tg_server_run(const char *path)
{
    char err[TG_CONF_ERRLEN];
    const char *wd;
    unsigned i;
    int rc = 1;

    signal(SIGPIPE, SIG_IGN);
    g.conf = tg_conf_load(path, err, sizeof(err));
    if (g.conf == NULL) {
        fprintf(stderr, "tollgate: %s\n", err);
        return 1;
    }
    g.live = tg_conf_ref(g.conf);
    tg_log_set_level(g.conf->log_level);
    g.tls = tg_tls_set_create(g.conf, err, sizeof(err));
    if (g.tls == NULL || tg_server_load_keys(g.conf, &g.keys, err, sizeof(err)) != TG_OK) {
        tg_error("%s", err);
        goto out;
    }
    evthread_use_pthreads();
    g.base = event_base_new();
    if (g.base == NULL) {
        tg_error("cannot create the event base");
        goto out;
    }
    g.connlimit = tg_connlimit_create(g.conf->http.max_connections,
                                      g.conf->http.max_connections_per_ip);
    g.accept_resume = tg_evtimer_new(g.base, accept_resume_cb, NULL);
    g.flush_timer = tg_evtimer_new(g.base, flush_timer_cb, NULL);
    g.ld.done = tg_event_new(g.base, -1, 0, loader_done_cb, NULL);
    g.held.fd = -1;
    check_nofile(g.conf);
    if (open_listeners() != TG_OK) {
        goto out;
    }
    if (g.conf->admin_enabled) {
        g.admin = tg_admin_create(g.base, &g.conf->admin, err, sizeof(err));
        if (g.admin == NULL) {
            tg_error("%s", err);
            goto out;
        }
    }

    g.health = tg_health_create(g.base, g.conf);
    tg_upstream_set_health(g.health);
    if (metrics_init(g.conf) != TG_OK) {
        tg_error("cannot set up the metrics");
        goto out;
    }
    tg_throttle_init(g.conf);
    g.view.started = g.view.loaded = time(NULL);
    g.view.generation = 1;
    curl_global_init(CURL_GLOBAL_DEFAULT);      /* before any other thread */
    if (g.conf->access_log.path != NULL) {
        g.alog = tg_alog_create(g.conf->access_log.path, err, sizeof(err));
        if (g.alog == NULL) {
            tg_error("%s", err);
            goto out;
        }
    }
    g.nworkers = g.conf->workers;
    g.workers = tg_xcalloc(g.nworkers, sizeof(*g.workers));
    g.shards = tg_xcalloc(g.nworkers, sizeof(*g.shards));
    g.anomaly = tg_anomaly_create(g.base, g.conf, g.nworkers);
    for (i = 0; i < g.nworkers; i++) {
        g.workers[i] = tg_worker_create(i, g.conf, g.keys, g.tls, err, sizeof(err));
        if (g.workers[i] == NULL) {
            tg_error("%s", err);
            goto out;
        }
        g.shards[i] = tg_worker_shard(g.workers[i]);
        tg_worker_set_anomaly(g.workers[i], tg_anomaly_shard(g.anomaly, i));
        if (g.alog != NULL) {
            tg_worker_set_access_log(g.workers[i], g.alog);
        }
        for (size_t l = 0; g.rp_fds != NULL && l < g.conf->nlisten; l++) {
            int fd = g.rp_fds[l * g.nworkers + i];
            g.rp_fds[l * g.nworkers + i] = -1;
            if (tg_worker_listen(g.workers[i], fd, (unsigned)l, g.connlimit) != TG_OK) {
                goto out;
            }
        }
        if (tg_worker_start(g.workers[i]) != TG_OK) {
            tg_error("cannot start worker %u", i);
            goto out;
        }
    }

    g.alerts = tg_alerts_create(g.base, g.conf, g.workers, g.shards, g.nworkers);
    if (g.alerts == NULL) {
        goto out;
    }
    tg_alerts_set_anomaly(g.alerts, g.anomaly);
    g.view.conf = g.conf;
    g.view.workers = g.workers;
    g.view.shards = g.shards;
    g.view.nworkers = g.nworkers;
    g.view.health = g.health;
    g.view.alerts = g.alerts;
    g.view.anomaly = g.anomaly;

    g.signals[0] = tg_event_new(g.base, SIGTERM, EV_SIGNAL | EV_PERSIST, signal_cb, NULL);
    g.signals[1] = tg_event_new(g.base, SIGINT, EV_SIGNAL | EV_PERSIST, signal_cb, NULL);
    g.signals[2] = tg_event_new(g.base, SIGHUP, EV_SIGNAL | EV_PERSIST, signal_cb, (void *)path);
    g.signals[3] = tg_event_new(g.base, SIGQUIT, EV_SIGNAL | EV_PERSIST, signal_cb, NULL);
    for (i = 0; i < TG_ARRAY_LEN(g.signals); i++) {
        evsignal_add(g.signals[i], NULL);
    }
    wd = getenv("WATCHDOG_USEC");
    if (wd != NULL && atol(wd) > 0) {
        long us = atol(wd) / 2;
        struct timeval tv = tg_us_tv((uint64_t)us);
        g.watchdog = tg_event_new(g.base, -1, EV_PERSIST, watchdog_cb, NULL);
        event_add(g.watchdog, &tv);
    }

    if (g.conf->metrics.statsd_enabled) {
        g.statsd = tg_statsd_create(g.base, g.conf, g.shards, g.nworkers);
        if (g.statsd == NULL) {
            goto out;
        }
    }
    tg_admin_serve(g.admin, &g.view);
    tg_metrics_set_scrape_hook(scrape_hook, NULL);
    tg_admin_set_ready(g.admin, 1);
    for (i = 0; i < g.conf->nlisten; i++) {
        tg_info("listening on %s%s", g.conf->listen[i].addr.text,
                g.conf->listen[i].tls ? " (tls)" : "");
    }
    tg_info("tollgate %s started: %u worker(s), %zu upstream server(s)",
            TG_VERSION, g.nworkers, g.conf->upstream.nservers);
    sd_notify(0, "READY=1\nSTATUS=serving");

    event_base_dispatch(g.base);
    rc = 0;
    tg_info("tollgate stopped");

out:
    for (i = 0; g.listeners != NULL && i < g.conf->nlisten; i++) {
        if (g.listeners[i] != NULL) {
            evconnlistener_free(g.listeners[i]);
        }
    }
    free(g.listeners);
    for (i = 0; g.rp_fds != NULL && i < g.conf->nlisten * g.conf->workers; i++) {
        if (g.rp_fds[i] >= 0) {
            close(g.rp_fds[i]);
        }
    }
    free(g.rp_fds);
    if (g.statsd != NULL && rc == 0) {
        tg_statsd_flush(g.statsd);       /* the last interval (the workers have stopped) */
    }
    tg_statsd_destroy(g.statsd);
    for (i = 0; i < g.nworkers; i++) {
        if (g.workers[i] != NULL) {
            if (rc != 0) {
                tg_worker_drain(g.workers[i], 0);
            }
            tg_worker_flush(g.workers[i], 1);   /* what waits, before the join */
            tg_worker_join_destroy(g.workers[i]);
        }
    }
    close_held();                        /* the workers are gone */
    free(g.workers);
    free(g.shards);
    tg_connlimit_destroy(g.connlimit);   /* after every worker's connections */
    if (g.accept_resume != NULL) {
        event_free(g.accept_resume);
    }
    if (g.flush_timer != NULL) {
        event_free(g.flush_timer);
    }
    loader_join();                       /* a reload still loading: dropped */
    if (g.ld.done != NULL) {
        event_free(g.ld.done);
    }
    tg_upstream_set_health(NULL);
    tg_health_destroy(g.health);
    if (g.alog != NULL) {
        tg_alog_destroy(g.alog);         /* after every worker's buffer */
    }
    tg_admin_destroy(g.admin);
    tg_alerts_destroy(g.alerts);
    tg_anomaly_destroy(g.anomaly);       /* after the workers and the alerts */
    tg_throttle_deinit();
    curl_global_cleanup();
    tg_metrics_deinit();
    for (i = 0; i < TG_ARRAY_LEN(g.signals); i++) {
        if (g.signals[i] != NULL) {
            event_free(g.signals[i]);
        }
    }
    if (g.drain_timer != NULL) {
        event_free(g.drain_timer);
    }
    if (g.watchdog != NULL) {
        event_free(g.watchdog);
    }
    if (g.base != NULL) {
        event_base_free(g.base);
    }
    tg_tls_set_unref(g.tls);             /* after the workers: the last reference */
    tg_keys_unref(g.keys);
    tg_conf_unref(g.live);
    tg_conf_unref(g.conf);
    return rc;
}

tg_rc
tg_server_load_keys(const tg_conf *conf, struct tg_keys **out, char *err, size_t errlen)
{
    const char *names[64];
    struct tg_keys *keys;
    size_t i, n = conf->ntiers < 64 ? conf->ntiers : 64;

    *out = NULL;
    if (conf->auth.keys_file == NULL) {
        return TG_OK;
    }
    keys = tg_keys_load(conf->auth.keys_file, err, errlen);
    if (keys == NULL) {
        return TG_ERR;
    }
    for (i = 0; i < n; i++) {
        names[i] = conf->tiers[i].name;
    }
    if (tg_keys_check_tiers(keys, names, n, err, errlen) != TG_OK) {
        tg_keys_unref(keys);
        return TG_ERR;
    }
    *out = keys;
    return TG_OK;
}

/* ---- listeners ---------------------------------------------------- */

static tg_rc
open_listeners(void)
{
    size_t i;
    int one = 1;

    g.listeners = tg_xcalloc(g.conf->nlisten, sizeof(*g.listeners));
    if (g.conf->http.reuseport || g.conf->workers == 1) {
        return open_reuseport();
    }
    for (i = 0; i < g.conf->nlisten; i++) {
        const tg_addr *a = &g.conf->listen[i].addr;
        int fd = socket(a->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

        if (fd < 0) {
            tg_error("listen %s: socket: %s", a->text, strerror(errno));
            return TG_ERR;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (a->sa.ss_family == AF_INET6) {
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
        }
        if (bind(fd, (const struct sockaddr *)&a->sa, a->salen) != 0
            || listen(fd, LISTEN_BACKLOG) != 0) {
            tg_error("listen %s: %s", a->text, strerror(errno));
            close(fd);
            return TG_ERR;
        }
        /* backlog 0: it listens already (-1 would make libevent listen
         * again with its own 128) */
        g.listeners[i] = evconnlistener_new(g.base, accept_cb, (void *)(uintptr_t)i,
                             LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 0, fd);
        if (g.listeners[i] == NULL) {
            tg_error("listen %s: cannot create the listener", a->text);
            close(fd);
            return TG_ERR;
        }
        evconnlistener_set_error_cb(g.listeners[i], accept_error_cb);
    }
    return TG_OK;
}

/*
 * The workers accept, each on its own socket per listener.  http.reuseport:
 * `workers` sockets per listener, bound to the same address with
 * SO_REUSEPORT (the kernel spreads new connections over them); the first
 * one's bound address is used for the others (a port 0 resolves once).
 * A single worker (workers: 1) takes the one plain socket: accepting here
 * and handing each connection over through its pipe would only cost this
 * thread's wakeup, two accepts and a pipe write and read per connection
 * (docs/DESIGN-NOTES.md, "Connections and threads").
 */
static tg_rc
open_reuseport(void)
{
    size_t i, k, n = g.conf->workers;
    int one = 1;

    g.rp_fds = tg_xmalloc(g.conf->nlisten * n * sizeof(int));
    for (i = 0; i < g.conf->nlisten * n; i++) {
        g.rp_fds[i] = -1;
    }
    for (i = 0; i < g.conf->nlisten; i++) {
        const tg_addr *a = &g.conf->listen[i].addr;
        struct sockaddr_storage ss = a->sa;
        socklen_t sl = a->salen;

        for (k = 0; k < n; k++) {
            int fd = socket(a->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) {
                tg_error("listen %s: socket: %s", a->text, strerror(errno));
                return TG_ERR;
            }
            g.rp_fds[i * n + k] = fd;
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
            if (a->sa.ss_family == AF_INET6) {
                setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
            }
            if ((g.conf->http.reuseport
                 && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
                || bind(fd, (const struct sockaddr *)&ss, sl) != 0
                || listen(fd, LISTEN_BACKLOG) != 0) {
                tg_error("listen %s%s: %s", a->text,
                         g.conf->http.reuseport ? " (reuseport)" : "", strerror(errno));
                return TG_ERR;
            }
            if (k == 0) {
                sl = sizeof(ss);
                getsockname(fd, (struct sockaddr *)&ss, &sl);
            }
        }
    }
    return TG_OK;
}

/*
 * A connection over http.max_connections or http.max_connections_per_ip
 * is closed here, before a byte of it is read; the others go to the
 * workers in turn, each with its share of the counts.
 */
static void
accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
          int salen, void *arg)
{
    unsigned idx = (unsigned)(uintptr_t)arg;
    enum tg_connlimit_verdict v;
    struct tg_connslot *slot;
    tg_rc rc;

    TG_UNUSED(l);
    v = tg_connlimit_acquire(g.connlimit, sa, &slot);
    if (v != TG_CONN_OK) {
        close(fd);
        tg_metrics_global_inc(TG_M_CONNS_REFUSED, 0);
        if (tg_now_ms() - g.refused_logged >= 1000) {   /* one line a second */
            char ip[INET6_ADDRSTRLEN] = "?";
            const void *a = sa->sa_family == AF_INET6
                ? (const void *)&((struct sockaddr_in6 *)(void *)sa)->sin6_addr
                : (const void *)&((struct sockaddr_in *)(void *)sa)->sin_addr;
            inet_ntop(sa->sa_family, a, ip, sizeof(ip));
            g.refused_logged = tg_now_ms();
            tg_warn("connection from %s closed: over %s (%u)", ip,
                    v == TG_CONN_OVER_IP ? "http.max_connections_per_ip"
                                         : "http.max_connections",
                    v == TG_CONN_OVER_IP ? g.live->http.max_connections_per_ip
                                         : g.live->http.max_connections);
        }
        return;
    }
    if (g.held.fd >= 0) {                /* the listeners are paused: not expected */
        close(fd);
        tg_connlimit_release(slot);
        tg_metrics_global_inc(TG_M_CONNS_REFUSED, 0);
        return;
    }
    rc = dispatch(fd, sa, salen, idx, slot);
    if (rc == TG_AGAIN) {
        /* Every worker's pipe is full: they have not read it for a while
         * (each takes several hundred).  Keep this one, leave the next in
         * the kernel's backlog, and try again after the pause. */
        g.held.fd = fd;
        g.held.idx = idx;
        g.held.slot = slot;
        g.held.salen = salen > (int)sizeof(g.held.sa) ? (int)sizeof(g.held.sa) : salen;
        memcpy(&g.held.sa, sa, (size_t)g.held.salen);
        pause_accepting();
        if (tg_now_ms() - g.refused_logged >= 1000) {
            g.refused_logged = tg_now_ms();
            tg_warn("every worker's queue of new connections is full: not accepting for "
                    "%d ms (%u connection(s) open)", ACCEPT_PAUSE_MS,
                    tg_connlimit_total(g.connlimit));
        }
    } else if (rc != TG_OK) {
        tg_error("cannot hand a connection to a worker: %s", strerror(errno));
        close(fd);
        tg_connlimit_release(slot);
    }
}

/*
 * Hand fd to a worker, round robin, passing over one whose pipe is full
 * (a worker that has not read it for a while: stuck, or in a long loop
 * turn).  TG_AGAIN: every pipe is full; the caller still owns fd and slot.
 */
static tg_rc
dispatch(int fd, const struct sockaddr *sa, int salen, unsigned idx,
         struct tg_connslot *slot)
{
    tg_rc rc = TG_AGAIN;
    unsigned i;

    for (i = 0; i < g.nworkers && rc == TG_AGAIN; i++) {
        rc = tg_worker_dispatch(g.workers[g.next++ % g.nworkers], fd, sa, salen, idx, slot);
    }
    return rc;
}

/* Close the held connection (no worker takes it). */
static void
close_held(void)
{
    if (g.held.fd >= 0) {
        close(g.held.fd);
        tg_connlimit_release(g.held.slot);
        g.held.fd = -1;
    }
}

/* The held connection to a worker; last: close it when none takes it. */
static void
give_held(int last)
{
    tg_rc rc;

    if (g.held.fd < 0) {
        return;
    }
    rc = dispatch(g.held.fd, (struct sockaddr *)&g.held.sa, g.held.salen, g.held.idx,
                  g.held.slot);
    if (rc == TG_OK) {
        g.held.fd = -1;
    } else if (rc != TG_AGAIN || last) {
        close_held();
    }
}

/* Stop accepting for ACCEPT_PAUSE_MS: what waits stays in the backlog. */
static void
pause_accepting(void)
{
    struct timeval tv = { 0, ACCEPT_PAUSE_MS * 1000 };
    size_t i;

    if (evtimer_pending(g.accept_resume, NULL)) {
        return;
    }
    for (i = 0; i < g.conf->nlisten; i++) {
        if (g.listeners[i] != NULL) {
            evconnlistener_disable(g.listeners[i]);
        }
    }
    evtimer_add(g.accept_resume, &tv);
}

/*
 * accept failed.  Out of descriptors (or kernel memory), the pending
 * connection stays in the backlog and the listener would wake at once,
 * forever: stop accepting for ACCEPT_PAUSE_MS instead (as nginx does),
 * while the connections we have finish and give their descriptors back.
 */
static void
accept_error_cb(struct evconnlistener *l, void *arg)
{
    int err = EVUTIL_SOCKET_ERROR();

    TG_UNUSED(l);
    TG_UNUSED(arg);
    if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM) {
        tg_error("accept: %s", evutil_socket_error_to_string(err));
        return;
    }
    if (evtimer_pending(g.accept_resume, NULL)) {
        return;
    }
    pause_accepting();
    if (tg_now_ms() - g.refused_logged >= 1000) {
        g.refused_logged = tg_now_ms();
        tg_warn("accept: %s: not accepting for %d ms (%u connection(s) open)",
                evutil_socket_error_to_string(err), ACCEPT_PAUSE_MS,
                tg_connlimit_total(g.connlimit));
    }
}

static void
accept_resume_cb(evutil_socket_t fd, short what, void *arg)
{
    size_t i;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    TG_UNUSED(arg);
    give_held(g.view.draining);
    if (g.held.fd >= 0) {                /* every pipe still full: wait more */
        pause_accepting();
        return;
    }
    for (i = 0; !g.view.draining && i < g.conf->nlisten; i++) {
        if (g.listeners[i] != NULL) {
            evconnlistener_enable(g.listeners[i]);
        }
    }
}

/* Each client connection may hold an upstream one too, and the process
 * keeps up to NOFILE_RESERVE descriptors of its own.  At start, raise the
 * soft limit toward what http.max_connections needs (up to the hard limit,
 * as Redis does and systemd advises), then say what is still short: a
 * warning when client connections alone run out before the cap (it cannot
 * be reached), a notice when only clients that all hold an upstream
 * connection at once would (accept pauses then rather than failing). */
#define NOFILE_RESERVE 256

static void
check_nofile(const tg_conf *conf)
{
    struct rlimit rl;
    rlim_t max = conf->http.max_connections;
    rlim_t need = max == 0 ? RLIM_INFINITY : 2 * max + NOFILE_RESERVE;
    rlim_t room;                       /* for connections, below the limit */

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) {
        return;
    }
    if (rl.rlim_cur < need && rl.rlim_cur < rl.rlim_max) {
        struct rlimit up = { need < rl.rlim_max ? need : rl.rlim_max, rl.rlim_max };
        if (setrlimit(RLIMIT_NOFILE, &up) == 0) {
            rl.rlim_cur = up.rlim_cur;
        }
    }
    if (max == 0 || rl.rlim_cur >= need) {
        return;
    }
    room = rl.rlim_cur > NOFILE_RESERVE ? rl.rlim_cur - NOFILE_RESERVE : 0;
    if (room < max) {
        tg_warn("RLIMIT_NOFILE is %lu: client connections alone run out of descriptors "
                "at about %lu, before http.max_connections (%lu), and accept pauses "
                "there; raise LimitNOFILE to %lu or lower http.max_connections",
                (unsigned long)rl.rlim_cur, (unsigned long)room,
                (unsigned long)max, (unsigned long)need);
    } else {
        tg_info("RLIMIT_NOFILE is %lu: enough for http.max_connections (%lu), but "
                "accept pauses if more than about %lu clients hold an upstream "
                "connection at once; LimitNOFILE %lu covers every client holding one",
                (unsigned long)rl.rlim_cur, (unsigned long)max,
                (unsigned long)(room / 2), (unsigned long)need);
    }
}

/* ---- signals and shutdown ------------------------------------------- */

static void
signal_cb(evutil_socket_t sig, short what, void *arg)
{
    TG_UNUSED(what);
    if (sig == SIGHUP) {
        if (!g.view.draining) {
            reload((const char *)arg);
        }
        return;
    }
    if (g.view.draining) {
        if (sig == SIGINT || sig == SIGQUIT) {
            tg_warn("second signal: stopping at once");
            event_base_loopbreak(g.base);
        }
        return;
    }
    tg_info("signal %d: draining (up to %u ms)", (int)sig, g.live->drain_timeout_ms);
    start_drain();
}

static void
start_drain(void)
{
    struct timeval tv = { 0, 50 * 1000 };
    unsigned i;

    g.view.draining = 1;
    give_held(1);                        /* served in the drain, or closed */
    sd_notify(0, "STOPPING=1\nSTATUS=draining");
    tg_admin_set_ready(g.admin, 0);
    for (i = 0; i < g.conf->nlisten; i++) {
        if (g.listeners[i] != NULL) {
            evconnlistener_free(g.listeners[i]);   /* new connections are refused */
        }
        g.listeners[i] = NULL;
    }
    for (i = 0; i < g.nworkers; i++) {
        control_sent(i, tg_worker_drain(g.workers[i], g.live->drain_timeout_ms), "drain");
    }
    g.drain_deadline = tg_now_ms() + g.live->drain_timeout_ms + 1000;
    g.drain_timer = tg_event_new(g.base, -1, EV_PERSIST, drain_timer_cb, NULL);
    event_add(g.drain_timer, &tv);
}

static void
drain_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    unsigned i;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    TG_UNUSED(arg);
    for (i = 0; i < g.nworkers; i++) {
        if (!tg_worker_finished(g.workers[i])) {
            if (tg_now_ms() < g.drain_deadline) {
                return;
            }
            tg_warn("workers did not finish draining in time");
            break;
        }
    }
    event_base_loopbreak(g.base);
}

/*
 * A reload or a drain for worker i: sent (TG_OK), or waiting in the worker
 * because its pipe is full (TG_AGAIN: it has not read it for a while), to
 * be sent by flush_timer_cb when there is room; the main thread does not
 * wait for it.
 */
static void
control_sent(unsigned i, tg_rc rc, const char *what)
{
    struct timeval tv = { 0, 50 * 1000 };

    if (rc == TG_AGAIN) {
        tg_warn("worker %u has not read its queue for a while: %s waits for it", i, what);
        if (!evtimer_pending(g.flush_timer, NULL)) {
            evtimer_add(g.flush_timer, &tv);
        }
    } else if (rc != TG_OK) {
        tg_error("worker %u: cannot send it %s: %s", i, what, strerror(errno));
    }
}

static void
flush_timer_cb(evutil_socket_t fd, short what, void *arg)
{
    struct timeval tv = { 0, 50 * 1000 };
    int waiting = 0;
    unsigned i;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    TG_UNUSED(arg);
    for (i = 0; i < g.nworkers; i++) {
        if (tg_worker_pending(g.workers[i])) {
            tg_rc rc = tg_worker_flush(g.workers[i], 0);
            if (rc == TG_AGAIN) {
                waiting = 1;
            } else if (rc == TG_OK) {
                tg_info("worker %u reads its queue again: what waited for it is sent", i);
            } else {
                control_sent(i, rc, "what waited");
            }
        }
    }
    if (waiting) {
        evtimer_add(g.flush_timer, &tv);
    }
}

/* ---- reload ---------------------------------------------------------- */

static int
addr_eq(const tg_addr *a, const tg_addr *b)
{
    return a->salen == b->salen && memcmp(&a->sa, &b->sa, a->salen) == 0;
}

static int
str_eq(const char *a, const char *b)
{
    return (a == NULL || b == NULL) ? a == b : strcmp(a, b) == 0;
}

static int
addrs_eq(const tg_addr *a, size_t na, const tg_addr *b, size_t nb)
{
    size_t i;

    for (i = 0; na == nb && i < na; i++) {
        if (!addr_eq(&a[i], &b[i])) {
            return 0;
        }
    }
    return na == nb;
}

/* The adaptive: section is read by the pools at start only (throttle:
 * reloads: the throttle reads the workers' configuration every window). */
static int
adaptive_eq(const tg_conf *a, const tg_conf *b)
{
    size_t i;

    if (a->adaptive.enabled != b->adaptive.enabled
        || a->adaptive.initial != b->adaptive.initial
        || a->adaptive.min != b->adaptive.min || a->adaptive.max != b->adaptive.max
        || a->adaptive.queue != b->adaptive.queue
        || a->adaptive.queue_timeout_ms != b->adaptive.queue_timeout_ms
        || a->adaptive.nshed_order != b->adaptive.nshed_order) {
        return 0;
    }
    for (i = 0; i < a->adaptive.nshed_order; i++) {
        if (strcmp(a->adaptive.shed_order[i], b->adaptive.shed_order[i]) != 0) {
            return 0;
        }
    }
    return 1;
}

/*
 * What a reload cannot change in a running process: each key that differs
 * from the running one is named in one warning.  Every other key is
 * applied (docs/CONFIG.md, "Reload"); keep the two lists in step.
 */
static void
warn_restart_only(const tg_conf *old, const tg_conf *nc)
{
    char keys[512] = "";
    size_t i, n = 0;
    int listen_same = old->nlisten == nc->nlisten;
    char store[256];

#define RESTART_ONLY(differs, name)                                           \
    do {                                                                      \
        if ((differs) && n < sizeof(keys)) {                                  \
            int k_ = snprintf(keys + n, sizeof(keys) - n, "%s%s",             \
                              n ? ", " : "", (name));                         \
            n += k_ > 0 ? (size_t)k_ : 0;                                     \
        }                                                                     \
    } while (0)

    for (i = 0; listen_same && i < old->nlisten; i++) {
        listen_same = addr_eq(&old->listen[i].addr, &nc->listen[i].addr)
                      && old->listen[i].tls == nc->listen[i].tls;
    }
    RESTART_ONLY(!listen_same, "listen");
    RESTART_ONLY(old->admin_enabled != nc->admin_enabled
                 || !addr_eq(&old->admin, &nc->admin), "admin");
    RESTART_ONLY(old->workers != nc->workers, "workers");
    RESTART_ONLY(old->http.reuseport != nc->http.reuseport, "http.reuseport");
    RESTART_ONLY(!addrs_eq(old->upstream.servers, old->upstream.nservers,
                           nc->upstream.servers, nc->upstream.nservers),
                 "upstream.servers");
    RESTART_ONLY(old->upstream.keepalive != nc->upstream.keepalive,
                 "upstream.keepalive");
    RESTART_ONLY(old->upstream.keepalive_timeout_ms != nc->upstream.keepalive_timeout_ms,
                 "upstream.keepalive_timeout_ms");
    RESTART_ONLY(memcmp(&old->upstream.breaker, &nc->upstream.breaker,
                        sizeof(old->upstream.breaker)) != 0, "upstream.breaker");
    RESTART_ONLY(old->upstream.health_check.enabled != nc->upstream.health_check.enabled
                 || !str_eq(old->upstream.health_check.path, nc->upstream.health_check.path)
                 || old->upstream.health_check.interval_ms != nc->upstream.health_check.interval_ms
                 || old->upstream.health_check.timeout_ms != nc->upstream.health_check.timeout_ms
                 || old->upstream.health_check.healthy != nc->upstream.health_check.healthy
                 || old->upstream.health_check.unhealthy != nc->upstream.health_check.unhealthy,
                 "upstream.health_check");
    RESTART_ONLY(!adaptive_eq(old, nc), "adaptive");
    RESTART_ONLY(old->metrics.statsd_enabled != nc->metrics.statsd_enabled
                 || (nc->metrics.statsd_enabled
                     && (!addr_eq(&old->metrics.statsd, &nc->metrics.statsd)
                         || !str_eq(old->metrics.statsd_prefix, nc->metrics.statsd_prefix)
                         || old->metrics.statsd_flush_ms != nc->metrics.statsd_flush_ms
                         || old->metrics.statsd_tags != nc->metrics.statsd_tags)),
                 "metrics.statsd");
    RESTART_ONLY(!str_eq(old->access_log.path, nc->access_log.path), "access_log.path");
#undef RESTART_ONLY
    if (n != 0) {
        tg_warn("SIGHUP: kept until the next restart (changed in the file): %s", keys);
    }
    if (tg_conf_store_diff(old, nc, store, sizeof(store)) > 0) {
        tg_warn("SIGHUP: %s changed: the store keeps its settings as started "
                "until the next restart", store);
    }
}

/*
 * SIGHUP: load and check the file, its keys and its TLS certificates; if
 * all are good, every worker switches to them for its next request (keys,
 * tiers, routes, auth, global limit, http.*, upstream timeouts) or TLS
 * handshake, each through its pipe with its own references, and so does
 * this thread (connection caps, log level, drain time).  What cannot change without a
 * restart is named in a warning.  A bad file changes nothing.
 *
 * What a reload reads - the config, the keys file (a million keys: about
 * a second), the TLS files, the names it resolves - is read on a thread of
 * its own (loader_main), so the main loop goes on accepting, handing
 * connections over and answering the admin listener meanwhile; what it
 * built is applied on the main thread (loader_done_cb, reload_apply).  A
 * SIGHUP that comes while one loads starts another when it ends (the file
 * may have changed since it was read).
 */
static void
reload(const char *path)
{
    sigset_t all, old;
    int rc;

    if (g.ld.running) {
        g.ld.again = 1;
        tg_info("SIGHUP: a reload is loading; another follows it");
        return;
    }
    sd_notify(0, "RELOADING=1");
    if (g.alog != NULL) {
        tg_alog_reopen(g.alog);          /* log rotation */
    }
    g.ld.path = path;
    g.ld.base = tg_tls_set_ref(g.tls);
    g.ld.conf = NULL;
    g.ld.keys = NULL;
    g.ld.tls = NULL;
    g.ld.err[0] = '\0';
    sigfillset(&all);                    /* no signal for the loader thread */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&g.ld.thread, NULL, loader_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        tg_tls_set_unref(g.ld.base);
        g.ld.base = NULL;
        tg_metrics_global_inc(TG_M_CONFIG_RELOADS, TG_MRL_ERROR);
        tg_error("SIGHUP: cannot start the loader thread: %s", strerror(rc));
        sd_notify(0, "READY=1");
        return;
    }
    g.ld.running = 1;
}

/* The loader thread: reads and builds; touches nothing the main thread
 * uses but g.ld, and g.ld.base read-only. */
static void *
loader_main(void *arg)
{
    tg_conf *conf;

    TG_UNUSED(arg);
    pthread_setname_np(pthread_self(), "tg-reload");
    conf = tg_conf_load(g.ld.path, g.ld.err, sizeof(g.ld.err));
    if (conf != NULL
        && (tg_server_load_keys(conf, &g.ld.keys, g.ld.err, sizeof(g.ld.err)) != TG_OK
            || (g.ld.tls = tg_tls_set_renew(g.ld.base, conf, g.ld.err,
                                            sizeof(g.ld.err))) == NULL)) {
        tg_keys_unref(g.ld.keys);
        g.ld.keys = NULL;
        tg_conf_unref(conf);
        conf = NULL;
    }
    g.ld.conf = conf;
    event_active(g.ld.done, EV_READ, 0);    /* the base is thread-safe */
    return NULL;
}

/* Join the loader (it has ended, or ends now: at exit); its results, if
 * still in g.ld.conf (and keys, tls), dropped. */
static void
loader_join(void)
{
    if (!g.ld.running) {
        return;
    }
    pthread_join(g.ld.thread, NULL);
    g.ld.running = 0;
    tg_tls_set_unref(g.ld.base);
    g.ld.base = NULL;
    if (g.ld.conf != NULL) {
        tg_conf_unref(g.ld.conf);
        tg_keys_unref(g.ld.keys);
        tg_tls_set_unref(g.ld.tls);
        g.ld.conf = NULL;
    }
}

static void
loader_done_cb(evutil_socket_t fd, short what, void *arg)
{
    tg_conf *conf;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    TG_UNUSED(arg);
    if (g.view.draining) {               /* stopping: not applied */
        loader_join();
        return;
    }
    conf = g.ld.conf;                    /* ours now: loader_join keeps them */
    g.ld.conf = NULL;
    loader_join();
    if (conf == NULL) {
        tg_metrics_global_inc(TG_M_CONFIG_RELOADS, TG_MRL_ERROR);
        tg_error("SIGHUP: new configuration refused, keeping the running one: %s", g.ld.err);
        sd_notify(0, "READY=1");
    } else {
        reload_apply(conf, g.ld.keys, g.ld.tls);
    }
    if (g.ld.again) {
        g.ld.again = 0;
        reload(g.ld.path);
    }
}

/* The loaded snapshot to the main thread and every worker; takes the
 * caller's references. */
static void
reload_apply(tg_conf *conf, struct tg_keys *keys, struct tg_tls_set *tls)
{
    unsigned i;

    warn_restart_only(g.conf, conf);
    tg_log_set_level(conf->log_level);
    tg_connlimit_set(g.connlimit, conf->http.max_connections,
                     conf->http.max_connections_per_ip);
    tg_conf_unref(g.live);
    g.live = tg_conf_ref(conf);
    for (i = 0; i < g.nworkers; i++) {
        control_sent(i, tg_worker_reload(g.workers[i], conf, keys, tls),
                     "the new configuration");
    }
    tg_metrics_global_inc(TG_M_CONFIG_RELOADS, TG_MRL_OK);
    g.view.loaded = time(NULL);
    g.view.generation++;
    tg_info("SIGHUP: configuration reloaded (%zu key(s), %zu tier(s), %zu route(s))",
            tg_keys_count(keys), conf->ntiers, conf->nroutes);
    tg_anomaly_reload(g.anomaly, conf);  /* baselines stay */
    tg_alerts_reload(g.alerts, conf);    /* open incidents stay open */
    tg_keys_unref(g.keys);
    g.keys = keys;                       /* our reference */
    tg_tls_set_unref(g.tls);             /* each worker drops the old as it takes the new */
    g.tls = tls;                         /* our reference */
    tg_conf_unref(conf);                 /* the workers hold theirs */
    sd_notify(0, "READY=1");
}

/* ---- metrics and status ------------------------------------------------ */

/* Label sets are fixed here, from the configuration at start: the tiers
 * plus "none" (requests without a tier), the routes, the servers. */
static tg_rc
metrics_init(const tg_conf *conf)
{
    const char **tiers = tg_xcalloc(conf->ntiers + 1, sizeof(*tiers));
    const char **routes = tg_xcalloc(conf->nroutes + 1, sizeof(*routes));
    const char **servers = tg_xcalloc(conf->upstream.nservers + 1, sizeof(*servers));
    size_t i;
    tg_rc rc;

    for (i = 0; i < conf->ntiers; i++) {
        tiers[i] = conf->tiers[i].name;
    }
    tiers[conf->ntiers] = "none";
    for (i = 0; i < conf->nroutes; i++) {
        routes[i] = conf->routes[i].name;
    }
    for (i = 0; i < conf->upstream.nservers; i++) {
        servers[i] = conf->upstream.servers[i].text;
    }
    rc = tg_metrics_init(tiers, conf->ntiers + 1, routes, conf->nroutes,
                         servers, conf->upstream.nservers);
    free(tiers);
    free(routes);
    free(servers);
    return rc;
}

static void
scrape_hook(void *arg)
{
    TG_UNUSED(arg);
    if (g.alog != NULL) {
        uint64_t dropped = tg_alog_dropped(g.alog);
        tg_metrics_global_add(TG_M_ALOG_DROPPED, 0, dropped - g.alog_counted);
        g.alog_counted = dropped;
    }
    tg_admin_refresh_gauges(&g.view);
}

static void
watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
    TG_UNUSED(fd);
    TG_UNUSED(what);
    TG_UNUSED(arg);
    sd_notify(0, "WATCHDOG=1");
}
