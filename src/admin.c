/*
 * admin.c - admin listener on the main thread's event base.
 */
#include "tollgate/admin.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <evhtp.h>

#define ADMIN_MAX_ROUTES 8

struct tg_admin_route_ {
    struct tg_admin *adm;
    tg_admin_fn      fn;
    void            *arg;
};

struct tg_admin {
    evhtp_t *htp;
    struct tg_admin_route_ routes[ADMIN_MAX_ROUTES];
    size_t   nroutes;
    int      ready;
    int    (*check)(void *arg);
    void    *check_arg;
};

static void reply(evhtp_request_t *req, evhtp_res code, const char *body);
static void healthz_cb(evhtp_request_t *req, void *arg);
static void readyz_cb(evhtp_request_t *req, void *arg);
static void notfound_cb(evhtp_request_t *req, void *arg);

struct tg_admin *
tg_admin_create(struct event_base *base, const tg_addr *addr, char *err, size_t errlen)
{
    struct tg_admin *adm = tg_xcalloc(1, sizeof(*adm));
    struct timeval tv = { 10, 0 };

    adm->htp = evhtp_new(base, NULL);
    if (adm->htp == NULL) {
        snprintf(err, errlen, "admin: cannot create the HTTP server");
        free(adm);
        return NULL;
    }
    /* libevhtp has no timeouts unless told: a stuck admin client must not
     * hold a socket forever. */
    evhtp_set_timeouts(adm->htp, &tv, &tv);
    evhtp_set_cb(adm->htp, "/healthz", healthz_cb, adm);
    evhtp_set_cb(adm->htp, "/readyz", readyz_cb, adm);
    evhtp_set_gencb(adm->htp, notfound_cb, adm);
    if (evhtp_bind_sockaddr(adm->htp, (struct sockaddr *)&addr->sa, addr->salen, 128) != 0) {
        snprintf(err, errlen, "admin: cannot listen on %s: %s", addr->text, strerror(errno));
        evhtp_free(adm->htp);
        free(adm);
        return NULL;
    }
    return adm;
}

void
tg_admin_set_ready(struct tg_admin *adm, int ready)
{
    if (adm != NULL) {
        adm->ready = ready;
    }
}

static void
route_cb(evhtp_request_t *req, void *arg)
{
    struct tg_admin_route_ *r = arg;
    const char *ctype = "text/plain; charset=utf-8";
    int status = r->fn(r->arg, req->buffer_out, &ctype);

    evhtp_headers_add_header(req->headers_out,
        evhtp_header_new("Content-Type", ctype, 0, 0));
    evhtp_send_reply(req, (evhtp_res)status);
}

void
tg_admin_route(struct tg_admin *adm, const char *path, tg_admin_fn fn, void *arg)
{
    struct tg_admin_route_ *r;

    if (adm == NULL || adm->nroutes == ADMIN_MAX_ROUTES) {
        return;
    }
    r = &adm->routes[adm->nroutes++];
    r->adm = adm;
    r->fn = fn;
    r->arg = arg;
    evhtp_set_cb(adm->htp, path, route_cb, r);
}

void
tg_admin_set_check(struct tg_admin *adm, int (*check)(void *arg), void *arg)
{
    if (adm != NULL) {
        adm->check = check;
        adm->check_arg = arg;
    }
}

void
tg_admin_destroy(struct tg_admin *adm)
{
    if (adm == NULL) {
        return;
    }
    evhtp_unbind_socket(adm->htp);
    evhtp_free(adm->htp);
    free(adm);
}

static void
reply(evhtp_request_t *req, evhtp_res code, const char *body)
{
    evhtp_headers_add_header(req->headers_out,
        evhtp_header_new("Content-Type", "text/plain; charset=utf-8", 0, 0));
    evbuffer_add(req->buffer_out, body, strlen(body));
    evhtp_send_reply(req, code);
}

static void
healthz_cb(evhtp_request_t *req, void *arg)
{
    TG_UNUSED(arg);
    reply(req, EVHTP_RES_OK, "ok\n");
}

static void
readyz_cb(evhtp_request_t *req, void *arg)
{
    struct tg_admin *adm = arg;

    if (adm->ready && adm->check != NULL && !adm->check(adm->check_arg)) {
        reply(req, EVHTP_RES_SERVUNAVAIL, "store not connected\n");
    } else if (adm->ready) {
        reply(req, EVHTP_RES_OK, "ready\n");
    } else {
        reply(req, EVHTP_RES_SERVUNAVAIL, "not ready\n");
    }
}

static void
notfound_cb(evhtp_request_t *req, void *arg)
{
    TG_UNUSED(arg);
    reply(req, EVHTP_RES_NOTFOUND, "not found\n");
}
