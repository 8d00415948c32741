/*
 * admin.h - the admin listener (main thread, libevhtp): /healthz and
 * /readyz here; /metrics, /status and /status/top are routed in by main.c
 * (tg_admin_route).  Bodies are refused (413), heads and connections
 * bounded (docs/DESIGN-NOTES.md).  Low traffic and loopback-only by default, so libevhtp's own server fits
 * here; the data path has its own strict HTTP/1.1 framing (docs/DESIGN-NOTES.md).
 */
#ifndef TOLLGATE_ADMIN_H
#define TOLLGATE_ADMIN_H

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

#endif
