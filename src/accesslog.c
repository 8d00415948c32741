/*
 * accesslog.c - the access log: per-worker buffers, a pipe, one writer
 * thread (see accesslog.h).
 *
 * A buffer's pending bytes are data[head, tail): whole lines, each ending
 * in the only '\n' it contains and at most PIPE_BUF bytes long, so a chunk
 * of at most PIPE_BUF bytes that ends on a line boundary always exists.
 * Lines are appended at tail and leave at head (flushed or dropped); the
 * array is compacted when tail reaches its end, and grown so that at least
 * half of it is free after a compaction, which keeps the memmove cost
 * amortized O(1) per byte even while the buffer sits at TG_ALOG_BUF_MAX.
 */
#include "tollgate/accesslog.h"

#include "tollgate/common.h"
#include "tollgate/common_ev.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#define ALOG_LINE_MAX     (PIPE_BUF - 1)      /* bytes before the '\n' */
#define ALOG_BUF_INIT     (32u * 1024)        /* initial (and idle) buffer size */
#define ALOG_READ_SIZE    (64u * 1024)        /* writer thread's read size */
#define ALOG_PIPE_SIZE    (1024u * 1024)      /* requested pipe capacity */
#define ALOG_OPEN_FLAGS   (O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC)
#define ALOG_OPEN_MODE    0640

struct tg_alog {
    char *path;
    int fd;                     /* the file; only the writer thread touches it
                                   between create and the join in destroy */
    int pipe_r;                 /* writer thread reads (blocking) */
    int pipe_w;                 /* buffers write (non-blocking) */
    pthread_t thread;
    atomic_int reopen;          /* set by tg_alog_reopen, taken by the writer */
    atomic_uint_least64_t dropped;
};

struct tg_alog_buf {
    struct tg_alog *log;
    struct event *timer;        /* TG_ALOG_FLUSH_MS flush, armed while pending */
    struct event *wev;          /* pipe writable again, armed after EAGAIN */
    char *data;
    size_t cap;                 /* bytes allocated at data */
    size_t head;                /* first pending byte */
    size_t tail;                /* one past the last pending byte */
    size_t unflushed;           /* bytes appended since the last flush attempt */
    int failed;                 /* last write hit an unexpected error (logged once) */
    time_t sec;                 /* the second of sec_text */
    char sec_text[24];          /* "2026-11-28T14:32:10" */
};

void (*tg_alog_test_before_write)(void);

static void *writer_main(void *arg);
static void writer_reopen(struct tg_alog *log);
static int write_all(int fd, const char *p, size_t n);
static void buf_flush(struct tg_alog_buf *b);
static void buf_drop_oldest(struct tg_alog_buf *b);
static void buf_reserve(struct tg_alog_buf *b, size_t n);
static void buf_arm_timer(struct tg_alog_buf *b);
static void on_timer(evutil_socket_t fd, short what, void *arg);
static void on_writable(evutil_socket_t fd, short what, void *arg);
static size_t utf8_seq_len(const unsigned char *p, size_t avail);

/* ---- the log and its writer thread ------------------------------------ */

struct tg_alog *
tg_alog_create(const char *path, char *err, size_t errlen)
{
    struct tg_alog *log;
    sigset_t all, old;
    int fds[2], rc;

    log = tg_xcalloc(1, sizeof(*log));
    log->path = tg_xstrdup(path);
    log->pipe_r = log->pipe_w = -1;
    atomic_init(&log->reopen, 0);
    atomic_init(&log->dropped, 0);

    log->fd = open(path, ALOG_OPEN_FLAGS, ALOG_OPEN_MODE);
    if (log->fd < 0) {
        snprintf(err, errlen, "access_log: cannot open %s: %s", path,
                 strerror(errno));
        goto fail;
    }
    if (pipe2(fds, O_CLOEXEC) < 0) {
        snprintf(err, errlen, "access_log: pipe: %s", strerror(errno));
        goto fail;
    }
    log->pipe_r = fds[0];
    log->pipe_w = fds[1];
    if (fcntl(log->pipe_w, F_SETFL, fcntl(log->pipe_w, F_GETFL) | O_NONBLOCK) < 0) {
        snprintf(err, errlen, "access_log: pipe: %s", strerror(errno));
        goto fail;
    }
#ifdef F_SETPIPE_SZ
    /* A bigger pipe absorbs bursts shared by all workers before any of
     * them has to buffer (best effort: capped by fs.pipe-max-size). */
    (void)fcntl(log->pipe_w, F_SETPIPE_SZ, (int)ALOG_PIPE_SIZE);
#endif

    /* The thread inherits the mask: block everything around its creation
     * so no signal is ever delivered to it, not even before it runs. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&log->thread, NULL, writer_main, log);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "access_log: cannot start the writer thread: %s",
                 strerror(rc));
        goto fail;
    }
    return log;

fail:
    if (log->pipe_r >= 0)
        close(log->pipe_r);
    if (log->pipe_w >= 0)
        close(log->pipe_w);
    if (log->fd >= 0)
        close(log->fd);
    free(log->path);
    free(log);
    return NULL;
}

void
tg_alog_reopen(struct tg_alog *log)
{
    atomic_store(&log->reopen, 1);
}

void
tg_alog_destroy(struct tg_alog *log)
{
    if (log == NULL)
        return;
    close(log->pipe_w);                 /* the writer sees EOF once drained */
    pthread_join(log->thread, NULL);
    close(log->pipe_r);
    close(log->fd);
    free(log->path);
    free(log);
}

uint64_t
tg_alog_dropped(const struct tg_alog *log)
{
    return atomic_load(&log->dropped);
}

/* Blocking loop: whatever arrives in the pipe goes to the file.  The pipe
 * only ever holds whole lines (each chunk ends on one), so every write to
 * the file does too, and a reopen never splits a line across files. */
static void *
writer_main(void *arg)
{
    struct tg_alog *log = arg;
    char *buf = tg_xmalloc(ALOG_READ_SIZE);
    ssize_t n;

    pthread_setname_np(pthread_self(), "tg-access-log");

    for (;;) {
        n = read(log->pipe_r, buf, ALOG_READ_SIZE);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            tg_error("access_log: read from pipe: %s", strerror(errno));
            break;
        }
        if (n == 0)
            break;                      /* every write end closed: done */
        if (atomic_exchange(&log->reopen, 0))
            writer_reopen(log);
        if (tg_alog_test_before_write != NULL)
            tg_alog_test_before_write();
        if (write_all(log->fd, buf, (size_t)n) < 0)
            tg_error("access_log: write to %s: %s (%zd bytes lost)",
                     log->path, strerror(errno), n);
    }
    free(buf);
    return NULL;
}

static void
writer_reopen(struct tg_alog *log)
{
    int fd = open(log->path, ALOG_OPEN_FLAGS, ALOG_OPEN_MODE);

    if (fd < 0) {
        tg_error("access_log: cannot reopen %s: %s (still writing to the old file)",
                 log->path, strerror(errno));
        return;
    }
    close(log->fd);
    log->fd = fd;
}

/* write(2) until all n bytes are out; 0, or -1 with errno. */
static int
write_all(int fd, const char *p, size_t n)
{
    ssize_t w;

    while (n > 0) {
        w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ---- per-worker buffers ----------------------------------------------- */

struct tg_alog_buf *
tg_alog_buf_create(struct tg_alog *log, struct event_base *base)
{
    struct tg_alog_buf *b = tg_xcalloc(1, sizeof(*b));

    b->log = log;
    b->timer = tg_evtimer_new(base, on_timer, b);
    b->wev = tg_event_new(base, log->pipe_w, EV_WRITE, on_writable, b);
    b->cap = ALOG_BUF_INIT;
    b->data = tg_xmalloc(b->cap);
    return b;
}

void
tg_alog_buf_destroy(struct tg_alog_buf *b)
{
    uint64_t deadline, now, lost = 0;
    struct pollfd pfd;
    size_t i;

    if (b == NULL)
        return;
    event_free(b->timer);
    event_free(b->wev);
    b->timer = b->wev = NULL;

    /* Shutdown: the loop is stopping, so a short bounded wait for the
     * writer beats losing the last lines. */
    deadline = tg_now_ms() + TG_ALOG_DRAIN_MS;
    for (;;) {
        buf_flush(b);
        if (b->head == b->tail || b->failed)
            break;
        now = tg_now_ms();
        if (now >= deadline)
            break;
        pfd.fd = b->log->pipe_w;
        pfd.events = POLLOUT;
        pfd.revents = 0;
        poll(&pfd, 1, (int)(deadline - now));
    }
    for (i = b->head; i < b->tail; i++)
        lost += b->data[i] == '\n';
    if (lost > 0) {
        atomic_fetch_add(&b->log->dropped, lost);
        tg_warn("access_log: %llu lines dropped at shutdown (pipe full)",
                (unsigned long long)lost);
    }
    free(b->data);
    free(b);
}

void
tg_alog_write(struct tg_alog_buf *b, const char *line, size_t len)
{
    char *p, *end, *nl;

    if (len > ALOG_LINE_MAX)
        len = ALOG_LINE_MAX;
    while (b->tail - b->head + len + 1 > TG_ALOG_BUF_MAX)
        buf_drop_oldest(b);
    buf_reserve(b, len + 1);

    p = b->data + b->tail;
    memcpy(p, line, len);
    for (end = p + len; (nl = memchr(p, '\n', (size_t)(end - p))) != NULL; p = nl + 1)
        *nl = ' ';
    b->data[b->tail + len] = '\n';
    b->tail += len + 1;
    b->unflushed += len + 1;

    if (b->unflushed >= TG_ALOG_FLUSH_AT)
        buf_flush(b);
    else
        buf_arm_timer(b);
}

/* Send pending lines to the pipe in atomic chunks until it is empty or the
 * pipe is full (then wait for it to become writable). */
static void
buf_flush(struct tg_alog_buf *b)
{
    size_t pending, n;
    const char *nl;
    ssize_t w;

    b->unflushed = 0;
    while ((pending = b->tail - b->head) > 0) {
        n = pending < PIPE_BUF ? pending : PIPE_BUF;
        if (n < pending) {
            /* Lines are <= PIPE_BUF bytes: one ends in the first PIPE_BUF. */
            nl = memrchr(b->data + b->head, '\n', n);
            n = (size_t)(nl - (b->data + b->head)) + 1;
        }
        w = write(b->log->pipe_w, b->data + b->head, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (b->wev != NULL && !event_pending(b->wev, EV_WRITE, NULL))
                    event_add(b->wev, NULL);
            } else if (!b->failed) {
                /* The writer keeps the read end open until destroy: this
                 * is a bug, not a condition.  The lines age out as drops. */
                tg_error("access_log: write to pipe: %s", strerror(errno));
                b->failed = 1;
            }
            break;
        }
        b->head += (size_t)w;           /* n <= PIPE_BUF: all or nothing */
        b->failed = 0;
    }

    if (b->head == b->tail) {
        b->head = b->tail = 0;
        if (b->cap > ALOG_BUF_INIT) {   /* a burst is over: give memory back */
            free(b->data);
            b->cap = ALOG_BUF_INIT;
            b->data = tg_xmalloc(b->cap);
        }
    } else {
        buf_arm_timer(b);
    }
}

static void
buf_drop_oldest(struct tg_alog_buf *b)
{
    const char *nl = memchr(b->data + b->head, '\n', b->tail - b->head);

    b->head = (size_t)(nl - b->data) + 1;
    atomic_fetch_add_explicit(&b->log->dropped, 1, memory_order_relaxed);
}

/* Make room for n more bytes at tail.  Pending + n never exceeds
 * TG_ALOG_BUF_MAX, so cap stays below 2 * (TG_ALOG_BUF_MAX + PIPE_BUF). */
static void
buf_reserve(struct tg_alog_buf *b, size_t n)
{
    size_t pending = b->tail - b->head, cap;
    char *data;

    if (b->tail + n <= b->cap)
        return;
    cap = b->cap;
    while (pending + n > cap / 2)
        cap *= 2;
    if (cap != b->cap) {
        data = tg_xmalloc(cap);
        memcpy(data, b->data + b->head, pending);
        free(b->data);
        b->data = data;
        b->cap = cap;
    } else {
        memmove(b->data, b->data + b->head, pending);
    }
    b->head = 0;
    b->tail = pending;
}

static void
buf_arm_timer(struct tg_alog_buf *b)
{
    static const struct timeval tv = { 0, TG_ALOG_FLUSH_MS * 1000 };

    if (b->timer != NULL && !evtimer_pending(b->timer, NULL))
        evtimer_add(b->timer, &tv);
}

static void
on_timer(evutil_socket_t fd, short what, void *arg)
{
    buf_flush(arg);
}

static void
on_writable(evutil_socket_t fd, short what, void *arg)
{
    buf_flush(arg);
}

/* ---- request lines ---------------------------------------------------- */

/* One JSON line per request: who (the consumer id, never the key), what,
 * the outcome, sizes and durations. */
size_t
tg_alog_format(char *out, size_t len, const char *time_s, long ms, const tg_alog_req *r)
{
    char path[6 * 256 + 1], method[6 * 16 + 1];

    tg_alog_json_escape(method, r->method ? r->method : "", r->method ? r->method_len : 0, 16);
    tg_alog_json_escape(path, r->path ? r->path : "", r->path ? r->path_len : 0, 256);
    return tg_fmt(out, len,
                  "{\"time\":\"%s.%03ldZ\",\"request_id\":\"%s\",\"consumer\":\"%s\","
                  "\"tier\":\"%s\",\"method\":\"%s\",\"path\":\"%s\",\"status\":%d,"
                  "\"bytes_in\":%llu,\"bytes_out\":%llu,\"duration_ms\":%.3f,"
                  "\"upstream_ms\":%.3f,\"upstream\":\"%s\",\"limit\":\"%s\"}",
                  time_s, ms, r->request_id, r->consumer, r->tier,
                  method, path, r->status, (unsigned long long)r->bytes_in,
                  (unsigned long long)r->bytes_out,
                  r->start_us ? (double)(r->now_us - r->start_us) / 1000.0 : 0.0,
                  r->upstream_us ? (double)(r->now_us - r->upstream_us) / 1000.0 : 0.0,
                  r->upstream, r->limit);
}

void
tg_alog_request(struct tg_alog_buf *b, const tg_alog_req *r)
{
    char line[2048];
    struct timespec ts;
    size_t n;

    clock_gettime(CLOCK_REALTIME, &ts);
    if (ts.tv_sec != b->sec) {
        struct tm tm;
        gmtime_r(&ts.tv_sec, &tm);
        strftime(b->sec_text, sizeof(b->sec_text), "%Y-%m-%dT%H:%M:%S", &tm);
        b->sec = ts.tv_sec;
    }
    n = tg_alog_format(line, sizeof(line), b->sec_text, ts.tv_nsec / 1000000, r);
    if (n > 0)
        tg_alog_write(b, line, n);
}

/* ---- JSON escaping ---------------------------------------------------- */

size_t
tg_alog_json_escape(char *out, const char *s, size_t len, size_t max)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *u = (const unsigned char *)s;
    size_t n = len < max ? len : max, i = 0, k;
    char *o = out;
    unsigned char c;

    while (i < n) {
        c = u[i];
        if (c < 0x80) {
            if (c == '"' || c == '\\') {
                *o++ = '\\';
                *o++ = (char)c;
            } else if (c < 0x20 || c == 0x7f) {
                memcpy(o, "\\u00", 4);
                o[4] = hex[c >> 4];
                o[5] = hex[c & 0xf];
                o += 6;
            } else {
                *o++ = (char)c;
            }
            i++;
            continue;
        }
        /* Validate against all of s, so a character that max cuts is
         * recognised as valid and left out rather than replaced. */
        k = utf8_seq_len(u + i, len - i);
        if (k == 0) {
            memcpy(o, "\\ufffd", 6);
            o += 6;
            i++;
        } else if (i + k > n) {
            break;
        } else {
            memcpy(o, u + i, k);
            o += k;
            i += k;
        }
    }
    *o = '\0';
    return (size_t)(o - out);
}

/* Length of the well-formed UTF-8 sequence at p (Unicode table 3-7: no
 * overlongs, no surrogates, nothing above U+10FFFF), or 0. */
static size_t
utf8_seq_len(const unsigned char *p, size_t avail)
{
    unsigned char lo = 0x80, hi = 0xbf;
    size_t need, j;

    if (p[0] >= 0xc2 && p[0] <= 0xdf) {
        need = 2;
    } else if (p[0] >= 0xe0 && p[0] <= 0xef) {
        need = 3;
        if (p[0] == 0xe0)
            lo = 0xa0;
        else if (p[0] == 0xed)
            hi = 0x9f;
    } else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        need = 4;
        if (p[0] == 0xf0)
            lo = 0x90;
        else if (p[0] == 0xf4)
            hi = 0x8f;
    } else {
        return 0;
    }
    if (avail < need || p[1] < lo || p[1] > hi)
        return 0;
    for (j = 2; j < need; j++) {
        if ((p[j] & 0xc0) != 0x80)
            return 0;
    }
    return need;
}
