/*
 * admin.h - the admin listener (main thread, libevhtp): /healthz and
 * /readyz, and the pages /metrics, /status and /status/top, built here
 * from the process's objects that server.c lends (tg_admin_view).  Bodies are refused (413), heads and connections
 * bounded (docs/DESIGN-NOTES.md).  Low traffic and loopback-only by default, so libevhtp's own server fits
 * here; the data path has its own strict HTTP/1.1 framing (docs/DESIGN-NOTES.md).
 */
#ifndef TOLLGATE_ADMIN_H
#define TOLLGATE_ADMIN_H

#include <time.h>

#include <event2/event.h>

#include "tollgate/common.h"
#include "tollgate/conf.h"

struct tg_admin;
struct evbuffer;

/* Bind addr on base.  NULL with a message in err on failure. */
struct tg_admin *tg_admin_create(struct event_base *base, const tg_addr *addr,
                                 char *err, size_t errlen);
/* /readyz answers 200 while ready, 503 otherwise (draining, starting).
 * check (may be NULL) is asked too at each /readyz: 0 = not ready. */
void tg_admin_set_ready(struct tg_admin *adm, int ready);
void tg_admin_set_check(struct tg_admin *adm, int (*check)(void *arg), void *arg);
void tg_admin_destroy(struct tg_admin *adm);

/*
 * Serve GET path with fn: it appends the body to out and returns the HTTP
 * status; *ctype is the Content-Type.  Runs on the main thread.
 */
typedef int (*tg_admin_fn)(void *arg, struct evbuffer *out, const char **ctype);
void tg_admin_route(struct tg_admin *adm, const char *path, tg_admin_fn fn, void *arg);

/* ---- the pages ------------------------------------------------------- */

struct tg_worker;
struct tg_metrics_shard;
struct tg_health;
struct tg_alerts;
struct tg_anomaly;

/*
 * What the pages read: the process's objects, owned by server.c, which
 * keeps the changing fields up to date (main thread, as the pages).  The
 * admin only reads them, through the pointer it was given.
 */
typedef struct tg_admin_view {
    const tg_conf                  *conf;       /* the snapshot at start */
    struct tg_worker *const        *workers;
    struct tg_metrics_shard *const *shards;     /* one per worker */
    unsigned                        nworkers;
    struct tg_health               *health;     /* or NULL */
    struct tg_alerts               *alerts;
    struct tg_anomaly              *anomaly;
    time_t                          started;    /* wall clock */
    time_t                          loaded;     /* last (re)load of the config */
    unsigned                        generation; /* config version: 1, +1 per reload */
    int                             draining;
} tg_admin_view;

/* Serve /metrics, /status, /status/top and the /readyz store check from
 * v, which must outlive adm.  adm may be NULL (no admin listener). */
void tg_admin_serve(struct tg_admin *adm, const tg_admin_view *v);

/* Refresh the gauges /status shows (store mode, each upstream server's
 * health and breaker); from the metrics scrape hook. */
void tg_admin_refresh_gauges(const tg_admin_view *v);

#endif
