/*
 * bevio.c - the libevent read and write tricks of the request path: our
 * own read events (plain client sockets, lent upstream connections),
 * write-through, and TLS close_notify.
 *
 * Plain sockets are read by our own event, straight into the
 * bufferevent's input (its tail thawed around the read, as libevent's own
 * read callback does).  libevent's read path asks the kernel how much is
 * readable (ioctl FIONREAD) before every read: one system call per read
 * that we do without.  TLS connections are read by their bufferevent.
 * Output is written through (tg_bev_flush) rather than a loop turn later.
 * tg_bev_rd_on/off and the flush wrappers are static inline in
 * proxy_int.h (hot).
 */
#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "proxy_int.h"

static ssize_t read_into(evutil_socket_t fd, struct evbuffer *in);
static void client_rd(evutil_socket_t fd, short what, struct tg_client *c);
static void up_rd(evutil_socket_t fd, struct tg_client *c);

/* ---- reading the client ------------------------------------------------- */

/* The two read callbacks run most of a request (head, identify, charge,
 * forward; response, account): the clock is read once for each. */
void
tg_bev_client_rd_cb(evutil_socket_t fd, short what, void *arg)
{
    tg_now_freeze();
    client_rd(fd, what, arg);
    tg_now_thaw();
}

static void
client_rd(evutil_socket_t fd, short what, struct tg_client *c)
{
    struct evbuffer *in = bufferevent_get_input(c->conn.bev);
    ssize_t n;

    if (what & EV_TIMEOUT) {
        tg_client_event_cb(c->conn.bev, BEV_EVENT_TIMEOUT | BEV_EVENT_READING, c);
        return;
    }
    if (c->conn.state == C_LINGER) {
        char junk[16384];

        n = read(fd, junk, sizeof(junk));
        if (n > 0) {
            c->conn.linger_bytes += (size_t)n;
        }
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)
            || c->conn.linger_bytes > TG_LINGER_BYTES) {
            tg_client_kill(c);
        }
        return;
    }
    if (evbuffer_get_length(in) >= TG_HIGH_WATER) {
        /* pipelined requests pile up: wait until they are served */
        tg_bev_rd_off(c);
        return;
    }
    n = read_into(fd, in);
    if (n > 0) {
        tg_client_read_cb(c->conn.bev, c);
    } else if (n == 0) {
        tg_bev_rd_off(c);                 /* level-triggered: EOF would fire forever */
        tg_client_event_cb(c->conn.bev, BEV_EVENT_EOF | BEV_EVENT_READING, c);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
        tg_bev_rd_off(c);
        tg_client_event_cb(c->conn.bev, BEV_EVENT_ERROR | BEV_EVENT_READING, c);
    }
}

/* ---- reading the upstream ---------------------------------------------- */

/* While an upstream connection is lent to us (and connected), we read it
 * through the connection's own read event instead of its bufferevent's
 * (no FIONREAD per read); the pool takes it back on release. */
void
tg_bev_up_read_start(struct tg_client *c)
{
    tg_uconn_read_start(c->up.uc, tg_bev_up_rd_cb, c);
}

void
tg_bev_up_rd_cb(evutil_socket_t fd, short what, void *arg)
{
    TG_UNUSED(what);
    tg_now_freeze();
    up_rd(fd, arg);
    tg_now_thaw();
}

static void
up_rd(evutil_socket_t fd, struct tg_client *c)
{
    struct bufferevent *ub;
    ssize_t n;

    if (c->up.uc == NULL) {
        return;                           /* not reached: the pool's reader */
    }
    ub = tg_uconn_bev(c->up.uc);
    n = read_into(fd, bufferevent_get_input(ub));
    if (n > 0) {
        tg_exchange_read_cb(ub, c);
    } else if (n == 0) {
        tg_uconn_read_stop(c->up.uc);
        tg_exchange_event_cb(ub, BEV_EVENT_EOF | BEV_EVENT_READING, c);
    } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
        tg_uconn_read_stop(c->up.uc);
        tg_exchange_event_cb(ub, BEV_EVENT_ERROR | BEV_EVENT_READING, c);
    }
}

/* ---- write-through ---------------------------------------------------- */

/*
 * Write buffered output now rather than a loop turn later.  A plain
 * socket's bufferevent keeps EV_WRITE off while the kernel takes all we
 * give it, which saves two epoll_ctl calls and a wake-up per write; only
 * when the socket is full does EV_WRITE go on (and the write callback,
 * which also times out a stuck peer, turns it off again once drained).
 * TLS connections always go through their bufferevent.
 */
void
tg_bev_flush(struct bufferevent *bev)
{
    struct evbuffer *out = bufferevent_get_output(bev);
    evutil_socket_t fd = bufferevent_getfd(bev);

    /* A socket bufferevent keeps the head of its output frozen and thaws
     * it around its own writes; do as it does. */
    evbuffer_unfreeze(out, 1);
    while (evbuffer_get_length(out) != 0) {
        if (evbuffer_write(out, fd) <= 0) {
            break;    /* EAGAIN, or an error the write event will report */
        }
    }
    evbuffer_freeze(out, 1);
    if (evbuffer_get_length(out) != 0) {
        bufferevent_enable(bev, EV_WRITE);
    }
}

/* TLS: end the session with close_notify, written straight to the
 * socket.  Only between records (nothing queued) and after the handshake;
 * a failure changes nothing (the TCP close follows anyway). */
void
tg_bev_close_notify(struct tg_client *c)
{
    SSL *ssl;

    if (!c->conn.tls || !c->conn.tls_ready
        || evbuffer_get_length(bufferevent_get_output(c->conn.bev)) != 0) {
        return;
    }
    ssl = bufferevent_openssl_get_ssl(c->conn.bev);
    if (ssl != NULL) {
        (void)SSL_shutdown(ssl);
    }
    ERR_clear_error();
}

/* ---- helpers ------------------------------------------------------------ */

/* Read fd into in (its tail thawed as libevent does): one readv of up to
 * 16 KiB, no FIONREAD.  Returns what readv returned. */
static ssize_t
read_into(evutil_socket_t fd, struct evbuffer *in)
{
    struct evbuffer_iovec v[2];
    struct iovec iov[2];
    ssize_t n;
    int nv, i;

    evbuffer_unfreeze(in, 0);
    nv = evbuffer_reserve_space(in, 16384, v, 2);
    for (i = 0; i < nv; i++) {
        iov[i].iov_base = v[i].iov_base;
        iov[i].iov_len = v[i].iov_len;
    }
    do {
        n = readv(fd, iov, nv);
    } while (n < 0 && errno == EINTR);
    if (n > 0) {
        size_t left = (size_t)n;
        for (i = 0; i < nv; i++) {
            if (v[i].iov_len > left) {
                v[i].iov_len = left;
            }
            left -= v[i].iov_len;
        }
        evbuffer_commit_space(in, v, nv);
    }
    evbuffer_freeze(in, 0);
    return n;
}
