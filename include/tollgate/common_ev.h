/*
 * common_ev.h - libevent allocations under the out-of-memory policy of
 * common.h: abort with a message, like tg_xmalloc.
 *
 * event_new, evbuffer_new and bufferevent_socket_new fail only when an
 * allocation fails (for the arguments tollgate passes), so every caller
 * uses these and never tests for NULL.  Header-only, so that common.c
 * itself does not need libevent.  Creating an event base, a listener or
 * an evdns base can fail for other reasons: those stay errors.
 */
#ifndef TOLLGATE_COMMON_EV_H
#define TOLLGATE_COMMON_EV_H

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "tollgate/common.h"

static inline struct event *
tg_event_new(struct event_base *base, evutil_socket_t fd, short what,
             event_callback_fn cb, void *arg)
{
    struct event *ev = event_new(base, fd, what, cb, arg);

    if (ev == NULL) {
        tg_oom("event_new");
    }
    return ev;
}

/* evtimer_new: an event with no fd and no events but its timeout. */
#define tg_evtimer_new(base, cb, arg) tg_event_new((base), -1, 0, (cb), (arg))

static inline struct evbuffer *
tg_evbuffer_new(void)
{
    struct evbuffer *b = evbuffer_new();

    if (b == NULL) {
        tg_oom("evbuffer_new");
    }
    return b;
}

/* A bufferevent on fd (or -1), taking it with BEV_OPT_CLOSE_ON_FREE. */
static inline struct bufferevent *
tg_bufferevent_socket_new(struct event_base *base, evutil_socket_t fd, int options)
{
    struct bufferevent *bev = bufferevent_socket_new(base, fd, options);

    if (bev == NULL) {
        tg_oom("bufferevent_socket_new");
    }
    return bev;
}

#endif
