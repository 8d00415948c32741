/*
 * statsd.c - the StatsD exporter: a connected UDP socket and a flush timer
 * on the main thread's base.
 *
 * Counters are aggregated in the workers' shards and sent as deltas every
 * flush_ms, packed into datagrams of at most TG_METRICS_STATSD_MAX bytes
 * (tg_metrics_statsd_delta).  The socket is non-blocking: a full socket
 * drops a datagram, and a receiver that is not there (ECONNREFUSED) is
 * not an error.
 */
#include "tollgate/statsd.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tollgate/common_ev.h"
#include "tollgate/metrics.h"

struct tg_statsd {
    tg_conf                        *conf;    /* a reference: address, prefix, tags */
    struct tg_metrics_shard *const *shards;  /* the workers', not ours */
    size_t                          nshards;
    int                             fd;      /* connected UDP socket */
    struct event                   *timer;   /* every flush_ms */
    struct tg_metrics_snapshot     *prev;    /* counters at the last flush */
};

static void flush_cb(evutil_socket_t fd, short what, void *arg);
static void emit(void *arg, const char *datagram, size_t len);

struct tg_statsd *
tg_statsd_create(struct event_base *base, tg_conf *conf,
                 struct tg_metrics_shard *const *shards, size_t n)
{
    const tg_addr *a = &conf->metrics.statsd;
    unsigned ms = conf->metrics.statsd_flush_ms;
    struct timeval tv = tg_ms_tv(ms);
    struct tg_statsd *sd;
    int fd;

    fd = socket(a->sa.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (const struct sockaddr *)&a->sa, a->salen) != 0) {
        tg_error("metrics.statsd: %s: %s", a->text, strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        return NULL;
    }
    sd = tg_xcalloc(1, sizeof(*sd));
    sd->conf = tg_conf_ref(conf);
    sd->shards = shards;
    sd->nshards = n;
    sd->fd = fd;
    sd->prev = tg_metrics_snapshot_create();
    sd->timer = tg_event_new(base, -1, EV_PERSIST, flush_cb, sd);
    event_add(sd->timer, &tv);
    tg_info("statsd: sending to %s every %u ms", a->text, ms);
    return sd;
}

void
tg_statsd_flush(struct tg_statsd *sd)
{
    tg_metrics_tick(sd->shards, sd->nshards);
    tg_metrics_statsd_delta(sd->shards, sd->nshards, sd->prev,
                            sd->conf->metrics.statsd_prefix, sd->conf->metrics.statsd_tags,
                            emit, sd);
}

void
tg_statsd_destroy(struct tg_statsd *sd)
{
    if (sd == NULL) {
        return;
    }
    event_free(sd->timer);
    tg_metrics_snapshot_destroy(sd->prev);
    close(sd->fd);
    tg_conf_unref(sd->conf);
    free(sd);
}

static void
flush_cb(evutil_socket_t fd, short what, void *arg)
{
    TG_UNUSED(fd);
    TG_UNUSED(what);
    tg_statsd_flush(arg);
}

static void
emit(void *arg, const char *datagram, size_t len)
{
    struct tg_statsd *sd = arg;

    if (send(sd->fd, datagram, len, 0) < 0 && errno != EAGAIN && errno != ECONNREFUSED) {
        tg_debug("statsd: send: %s", strerror(errno));
    }
}
