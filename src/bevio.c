/*
 * bevio.c - the libevent read and write tricks of the request path: our
 * own read events (client sockets, lent upstream connections),
 * write-through, and TLS on the client socket (records in and out,
 * close_notify).
 *
 * Client sockets are read by our own event, straight into the
 * bufferevent's input (its tail thawed around the read, as libevent's own
 * read callback does).  libevent's read path asks the kernel how much is
 * readable (ioctl FIONREAD) before every read: one system call per read
 * that we do without.  Output is written through (tg_bev_flush) rather
 * than a loop turn later.  tg_bev_rd_on/off and the flush wrappers are
 * static inline in proxy_int.h (hot).
 *
 * TLS client connections keep a socket bufferevent for its two buffers
 * (plaintext both) and never enable its events: the same read event runs
 * the handshake and SSL_read into the input, and the output is written
 * through as records by SSL_write, with our own write event (the send
 * timeout) only while the kernel does not take it all.  libevent's
 * bufferevent_openssl wrote one record (one write) per evbuffer chain, a
 * loop turn later, and read each record with two reads; here a response
 * of up to 16 KiB is one record and one write, and OpenSSL reads ahead
 * (one read for what the socket holds).  What it has read beyond the
 * records decrypted is no longer the socket's readiness: tg_bev_tls_kick
 * reads it when reading resumes.
 */
#include <errno.h>
#include <sys/uio.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "tollgate/common_ev.h"
#include "proxy_int.h"

/* c->conn.tls_want: what an OpenSSL call waits for before it is repeated */
#define TLS_RD_WANTS_WRITE  0x1     /* the handshake or SSL_read: writable */
#define TLS_WR_WANTS_READ   0x2     /* SSL_write: readable */
#define TLS_WR_FAILED       0x4     /* SSL_write failed: the write event says so */
#define TLS_RECORD          16384   /* the plaintext of one record at most */

static ssize_t read_into(evutil_socket_t fd, struct evbuffer *in);
static void client_rd(evutil_socket_t fd, short what, struct tg_client *c);
static void up_rd(evutil_socket_t fd, struct tg_client *c);
static void tls_rd(struct tg_client *c);
static void tls_wr_rd(struct tg_client *c, short what);
static tg_rc tls_handshake(struct tg_client *c);
static short tls_failed(struct tg_client *c, int err);
static void tls_want_write(struct tg_client *c, unsigned want);
static void tls_wr_cb(evutil_socket_t fd, short what, void *arg);

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

    if (c->conn.ssl != NULL && !c->io.rd_on) {
        tls_wr_rd(c, what);               /* on for an SSL_write alone */
        return;
    }
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
    if (c->conn.ssl != NULL) {
        tls_rd(c);
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
 * TLS connections: tg_bev_tls_flush.
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

/* ---- TLS on the client socket ------------------------------------------ */

/* c's SSL on its socket (accepting) and its write event; TG_ERR when
 * OpenSSL refuses (nothing made).  Dirty shutdowns (no close_notify) are
 * ends of stream, as they were with bufferevent_openssl. */
tg_rc
tg_bev_tls_setup(struct tg_client *c, SSL_CTX *ctx)
{
    SSL *ssl = SSL_new(ctx);

    if (ssl == NULL || SSL_set_fd(ssl, c->conn.fd) != 1) {
        SSL_free(ssl);
        ERR_clear_error();
        return TG_ERR;
    }
    SSL_set_accept_state(ssl);
    SSL_set_mode(ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_set_options(ssl, SSL_OP_IGNORE_UNEXPECTED_EOF);
    SSL_set_read_ahead(ssl, 1);
    c->conn.ssl = ssl;
    c->io.wev = tg_event_new(c->px->base, c->conn.fd, EV_WRITE | EV_PERSIST, tls_wr_cb, c);
    return TG_OK;
}

/*
 * Write c's output now as records of up to 16 KiB, one SSL_write each
 * (the first chain when it holds a record, else a copy); the write event
 * goes on only when the kernel does not take it all.  After WANT_WRITE or
 * WANT_READ the same bytes are written again (tls_wlen); a failure is
 * reported by the write event, never inside the caller's callback.
 */
void
tg_bev_tls_flush(struct tg_client *c)
{
    struct evbuffer *out = bufferevent_get_output(c->conn.bev);
    struct evbuffer_iovec v;
    char buf[TLS_RECORD];
    const void *p;
    size_t len, n, w;

    if (!c->conn.tls_ready || c->conn.state == C_DEAD
        || (c->conn.tls_want & (TLS_WR_WANTS_READ | TLS_WR_FAILED))) {
        return;        /* the handshake, the read event or the error first */
    }
    ERR_clear_error();
    evbuffer_unfreeze(out, 1);
    while ((len = evbuffer_get_length(out)) != 0) {
        n = c->conn.tls_wlen != 0 ? (size_t)c->conn.tls_wlen
                                  : len < TLS_RECORD ? len : TLS_RECORD;
        if (evbuffer_peek(out, -1, NULL, &v, 1) >= 1 && v.iov_len >= n) {
            p = v.iov_base;
        } else {
            evbuffer_copyout(out, buf, n);
            p = buf;
        }
        if (SSL_write_ex(c->conn.ssl, p, n, &w) == 1) {
            c->conn.tls_wlen = 0;
            evbuffer_drain(out, w);
            continue;
        }
        c->conn.tls_wlen = (int)n;
        switch (SSL_get_error(c->conn.ssl, 0)) {
        case SSL_ERROR_WANT_WRITE:
            break;
        case SSL_ERROR_WANT_READ:
            /* tls_rd, or tls_wr_rd while reading is off, writes again */
            c->conn.tls_want |= TLS_WR_WANTS_READ;
            if (!c->io.rd_on) {
                event_add(c->io.rev, &c->px->send_tv);
            }
            break;
        default:
            ERR_clear_error();
            c->conn.tls_wlen = 0;
            c->conn.tls_want |= TLS_WR_FAILED;
            event_active(c->io.wev, EV_WRITE, 1);
            break;
        }
        break;
    }
    evbuffer_freeze(out, 1);
    if (len != 0 && !(c->conn.tls_want & (TLS_WR_WANTS_READ | TLS_WR_FAILED))) {
        tls_want_write(c, 0);
    }
}

/* Reading is on (again): what OpenSSL has read already will not make the
 * socket readable, so read it from the loop. */
void
tg_bev_tls_kick(struct tg_client *c)
{
    if ((SSL_has_pending(c->conn.ssl) || (c->conn.tls_want & TLS_WR_WANTS_READ))
        && event_pending(c->io.rev, EV_READ, NULL)) {
        event_active(c->io.rev, EV_READ, 1);
    }
}

/* The connection is dead: no more writes (tg_client_kill). */
void
tg_bev_tls_stop(struct tg_client *c)
{
    if (c->io.wev != NULL) {
        event_del(c->io.wev);
    }
}

/* Reading is off (tg_bev_rd_off) while a TLS wait is on: an SSL_write
 * that waits for a read keeps the read event (for it alone: tls_wr_rd),
 * with the send timeout; else (or dead) it goes off. */
void
tg_bev_tls_rd_off(struct tg_client *c)
{
    c->io.rd_on = 0;
    c->io.rd_timed = 0;
    if ((c->conn.tls_want & TLS_WR_WANTS_READ) && c->conn.state != C_DEAD) {
        event_add(c->io.rev, &c->px->send_tv);
    } else {
        event_del(c->io.rev);
    }
}

/* c waits for a request with nothing of it read: OpenSSL's record
 * buffers (18 and 17 KiB) are given back while they hold nothing
 * (SSL_free_buffers refuses otherwise); the next read or write takes
 * them again.  So is the empty chain tls_rd reserved for a record that
 * did not come (after the handshake): libevent 2.1's evbuffer_drain
 * keeps the chains of an empty buffer, and frees them all when it
 * drains everything, so one byte goes in and out. */
void
tg_bev_tls_release(struct tg_client *c)
{
    struct evbuffer *in = bufferevent_get_input(c->conn.bev);

    if (c->conn.ssl != NULL && c->conn.tls_ready && c->conn.tls_want == 0
        && c->conn.tls_wlen == 0
        && evbuffer_get_length(bufferevent_get_output(c->conn.bev)) == 0) {
        (void)SSL_free_buffers(c->conn.ssl);
    }
    if (evbuffer_get_length(in) == 0) {
        evbuffer_unfreeze(in, 0);
        if (evbuffer_add(in, "", 1) == 0) {
            evbuffer_drain(in, 1);
        }
        evbuffer_freeze(in, 0);
    }
}

/* Free c's SSL and write event (tg_client_free; before the bufferevent,
 * which closes the socket). */
void
tg_bev_tls_free(struct tg_client *c)
{
    if (c->io.wev != NULL) {
        event_free(c->io.wev);
        c->io.wev = NULL;
    }
    SSL_free(c->conn.ssl);
    c->conn.ssl = NULL;
}

/* TLS: end the session with close_notify, written straight to the
 * socket.  Only between records (nothing queued) and after the handshake;
 * a failure changes nothing (the TCP close follows anyway). */
void
tg_bev_close_notify(struct tg_client *c)
{
    if (c->conn.ssl == NULL || !c->conn.tls_ready || c->conn.tls_wlen != 0
        || evbuffer_get_length(bufferevent_get_output(c->conn.bev)) != 0) {
        return;
    }
    ERR_clear_error();
    (void)SSL_shutdown(c->conn.ssl);
    ERR_clear_error();
}

/*
 * The read event of a TLS connection: the handshake, then records into
 * the input while OpenSSL holds more of them (read-ahead) and the input
 * is below high water; the data first, then the end of stream or error
 * met after it.
 */
static void
tls_rd(struct tg_client *c)
{
    struct bufferevent *bev = c->conn.bev;
    struct evbuffer *in = bufferevent_get_input(bev);
    struct evbuffer_iovec v;
    size_t got = 0, n;
    short what = 0;
    int full = 0;

    ERR_clear_error();
    if (!c->conn.tls_ready && tls_handshake(c) != TG_OK) {
        return;
    }
    c->conn.tls_want &= ~TLS_RD_WANTS_WRITE;
    if (c->conn.tls_want & TLS_WR_WANTS_READ) {
        size_t before = evbuffer_get_length(bufferevent_get_output(bev));

        c->conn.tls_want &= ~TLS_WR_WANTS_READ;
        tg_bev_tls_flush(c);
        if (evbuffer_get_length(bufferevent_get_output(bev)) != before) {
            bufferevent_trigger(bev, EV_WRITE, 0);    /* as tls_wr_cb */
        }
        if (c->conn.state == C_DEAD) {
            return;
        }
    }
    evbuffer_unfreeze(in, 0);
    for (;;) {
        if (evbuffer_get_length(in) >= TG_HIGH_WATER) {
            full = 1;
            break;
        }
        if (evbuffer_reserve_space(in, TLS_RECORD, &v, 1) != 1) {
            break;
        }
        if (SSL_read_ex(c->conn.ssl, v.iov_base, v.iov_len, &n) != 1) {
            what = tls_failed(c, SSL_get_error(c->conn.ssl, 0));
            break;
        }
        v.iov_len = n;
        evbuffer_commit_space(in, &v, 1);
        got += n;
        if (!SSL_has_pending(c->conn.ssl)) {
            break;       /* what comes next makes the socket readable */
        }
    }
    evbuffer_freeze(in, 0);
    if (got != 0) {
        tg_client_read_cb(bev, c);
    }
    if (c->conn.state == C_DEAD) {
        return;
    }
    if (what != 0) {
        tg_bev_rd_off(c);
        tg_client_event_cb(bev, what | BEV_EVENT_READING, c);
    } else if (full) {
        tg_bev_tls_kick(c);
    }
}

/*
 * The read event while reading is off: only an SSL_write that wanted to
 * read keeps it on (tg_bev_tls_flush, tg_bev_tls_rd_off).  The write is
 * repeated (it reads what it waits for); reading stays off once it no
 * longer waits for a read; the send timeout ends a peer that sends
 * nothing.  The bufferevent's write callback runs on progress, as in
 * tls_wr_cb.
 */
static void
tls_wr_rd(struct tg_client *c, short what)
{
    struct evbuffer *out = bufferevent_get_output(c->conn.bev);
    size_t before = evbuffer_get_length(out);

    if (!(c->conn.tls_want & TLS_WR_WANTS_READ)) {
        event_del(c->io.rev);
        return;
    }
    if (what & EV_TIMEOUT) {
        event_del(c->io.rev);
        tg_client_event_cb(c->conn.bev, BEV_EVENT_TIMEOUT | BEV_EVENT_WRITING, c);
        return;
    }
    c->conn.tls_want &= ~TLS_WR_WANTS_READ;
    tg_bev_tls_flush(c);
    if (!c->io.rd_on && !(c->conn.tls_want & TLS_WR_WANTS_READ)) {
        event_del(c->io.rev);
    }
    if (evbuffer_get_length(out) != before) {
        bufferevent_trigger(c->conn.bev, EV_WRITE, 0);
    }
}

/* Drive the handshake on: TG_OK once done (the connected event given),
 * TG_AGAIN while it goes on, TG_ERR when it failed (the error given). */
static tg_rc
tls_handshake(struct tg_client *c)
{
    int r = SSL_do_handshake(c->conn.ssl);
    short what;

    if (r == 1) {
        c->conn.tls_ready = 1;
        tg_client_event_cb(c->conn.bev, BEV_EVENT_CONNECTED, c);
        return TG_OK;
    }
    what = tls_failed(c, SSL_get_error(c->conn.ssl, r));
    if (what == 0) {
        return TG_AGAIN;
    }
    tg_bev_rd_off(c);
    tg_client_event_cb(c->conn.bev, what | BEV_EVENT_READING, c);
    return TG_ERR;
}

/* What a failed handshake or SSL_read means: 0 (wait: readable, or
 * writable with the write event on), BEV_EVENT_EOF or BEV_EVENT_ERROR. */
static short
tls_failed(struct tg_client *c, int err)
{
    switch (err) {
    case SSL_ERROR_WANT_READ:
        return 0;
    case SSL_ERROR_WANT_WRITE:
        /* nothing is read before that write: the read event waits for
         * the write event (a readable socket would run it in vain, over
         * and over, until the write or a timeout) */
        if (c->io.rd_on) {
            event_del(c->io.rev);
        }
        tls_want_write(c, TLS_RD_WANTS_WRITE);
        return 0;
    case SSL_ERROR_ZERO_RETURN:
        return BEV_EVENT_EOF;
    default:
        ERR_clear_error();
        return BEV_EVENT_ERROR;
    }
}

/* The write event on (its timeout, the send timeout, runs from now unless
 * it is on already); want: what waits for it besides the output. */
static void
tls_want_write(struct tg_client *c, unsigned want)
{
    c->conn.tls_want |= want;
    if (!event_pending(c->io.wev, EV_WRITE, NULL)) {
        event_add(c->io.wev, &c->px->send_tv);
    }
}

/*
 * The socket is writable again (or the send timeout passed, or a write
 * failed): a read that waited for it goes on, the output is written, and
 * the bufferevent's write callback runs as libevent's would (progress, and
 * the output at or under its low-water mark).
 */
static void
tls_wr_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_client *c = arg;
    struct evbuffer *out = bufferevent_get_output(c->conn.bev);
    size_t before = evbuffer_get_length(out);

    TG_UNUSED(fd);
    if ((what & EV_TIMEOUT) || (c->conn.tls_want & TLS_WR_FAILED)) {
        event_del(c->io.wev);
        tg_client_event_cb(c->conn.bev, BEV_EVENT_WRITING
                           | ((what & EV_TIMEOUT) ? BEV_EVENT_TIMEOUT : BEV_EVENT_ERROR), c);
        return;
    }
    if (c->conn.tls_want & TLS_RD_WANTS_WRITE) {
        c->conn.tls_want &= ~TLS_RD_WANTS_WRITE;
        if (c->io.rd_on) {                  /* reading is wanted: on again */
            event_add(c->io.rev, c->io.rd_timed ? &c->px->body_tv : NULL);
            event_active(c->io.rev, EV_READ, 1);
        }
    }
    tg_bev_tls_flush(c);
    if (evbuffer_get_length(out) == 0 || (c->conn.tls_want & TLS_WR_WANTS_READ)) {
        event_del(c->io.wev);       /* nothing to write, or not before a read */
    }
    if (evbuffer_get_length(out) != before) {
        bufferevent_trigger(c->conn.bev, EV_WRITE, 0);
    }
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
