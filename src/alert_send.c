/*
 * alert_send.c - the alert transport: libcurl multi on a libevent loop.
 *
 * Life of a message: tg_alert_send_post() copies it to the tail of its
 * channel's FIFO.  The head of a FIFO is either in flight (an easy handle
 * in the multi) or waiting for its retry timer.  When curl reports the
 * transfer done (check_done, after curl_multi_socket_action returns), the
 * message is delivered, dropped, or re-armed for a retry; a settled
 * message leaves the FIFO and the next one starts.
 *
 * Ownership: messages and their easy handles belong to s.  The libevent
 * event of a curl socket is created in sock_cb and, when curl removes the
 * socket, parked on s->dead and freed after curl_multi_socket_action
 * returns: never inside its own callback.
 */
#include "tollgate/alert_send.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "tollgate/common_ev.h"
#include "tollgate/conf.h"
#include "tollgate/metrics.h"

#define TG_ASEND_MAX_DEAD     64
#define TG_ASEND_MAX_RETRY_MS (3600u * 1000)   /* a Retry-After we honour */

typedef struct tg_asend_msg {
    struct tg_asend_msg   *next;
    unsigned               channel;
    unsigned               rule;
    char                  *url;      /* secret: given to curl only */
    char                  *body;
    size_t                 len;
    unsigned               tries;    /* transfers started */
    CURL                  *easy;     /* in flight, or NULL */
    tg_alert_send_done_fn  done;
    void                  *arg;
} tg_asend_msg;

typedef struct tg_asend_fifo {
    tg_asend_msg *head, *tail;
    struct event *retry;             /* arms the head's next try */
} tg_asend_fifo;

struct tg_alert_send {
    struct event_base   *base;
    CURLM               *multi;
    struct event        *timer;      /* CURLMOPT_TIMERFUNCTION */
    struct curl_slist   *headers;
    tg_alert_send_opts   opts;       /* ca_file owned */
    tg_asend_fifo        fifo[TG_ALERT__NCHANNELS];
    size_t               pending;
    struct event        *dead[TG_ASEND_MAX_DEAD];  /* freed after the action */
    size_t               ndead;
    uint64_t             rnd;        /* jitter */
};

static const char *const tg_asend_channel_names[TG_ALERT__NCHANNELS] = {
    "slack", "pagerduty", "webhook",
};

static int  sock_cb(CURL *e, curl_socket_t fd, int what, void *userp, void *sockp);
static int  timer_cb(CURLM *multi, long timeout_ms, void *userp);
static void event_cb(evutil_socket_t fd, short what, void *arg);
static void timeout_cb(evutil_socket_t fd, short what, void *arg);
static void retry_cb(evutil_socket_t fd, short what, void *arg);
static void after_action(struct tg_alert_send *s);
static void start(struct tg_alert_send *s, unsigned channel);
static void settle(struct tg_alert_send *s, unsigned channel, int delivered,
                   const char *reason);
static void count(unsigned channel, unsigned rule, enum tg_metric_alert_outcome o);
static size_t discard(char *p, size_t size, size_t n, void *arg);

/* ---- public functions -------------------------------------------------- */

struct tg_alert_send *
tg_alert_send_create(struct event_base *base, const tg_alert_send_opts *opts)
{
    struct tg_alert_send *s = tg_xcalloc(1, sizeof(*s));
    unsigned c;

    s->base = base;
    s->multi = curl_multi_init();
    s->timer = tg_evtimer_new(base, timeout_cb, s);
    if (s->multi == NULL) {
        tg_error("alerts: cannot set up libcurl multi");
        tg_alert_send_destroy(s);
        return NULL;
    }
    for (c = 0; c < TG_ALERT__NCHANNELS; c++) {
        s->fifo[c].retry = tg_evtimer_new(base, retry_cb, s);
    }
    curl_multi_setopt(s->multi, CURLMOPT_SOCKETFUNCTION, sock_cb);
    curl_multi_setopt(s->multi, CURLMOPT_SOCKETDATA, s);
    curl_multi_setopt(s->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(s->multi, CURLMOPT_TIMERDATA, s);
    s->headers = curl_slist_append(NULL, "Content-Type: application/json");
    s->rnd = (uint64_t)time(NULL) ^ ((uint64_t)(uintptr_t)s << 16) ^ tg_now_us();
    tg_alert_send_configure(s, opts);
    return s;
}

void
tg_alert_send_configure(struct tg_alert_send *s, const tg_alert_send_opts *opts)
{
    char *ca = opts->ca_file ? tg_xstrdup(opts->ca_file) : NULL;

    free((char *)s->opts.ca_file);
    s->opts = *opts;
    s->opts.ca_file = ca;
}

tg_rc
tg_alert_send_post(struct tg_alert_send *s, unsigned channel, unsigned rule,
                   const char *url, const char *body, size_t len,
                   tg_alert_send_done_fn done, void *arg)
{
    tg_asend_fifo *f = &s->fifo[channel];
    tg_asend_msg *m;

    if (s->pending >= s->opts.queue) {
        tg_warn("alerts: %s: queue full (%u messages), message dropped",
                tg_asend_channel_names[channel], s->opts.queue);
        count(channel, rule, TG_MAO_DROPPED);
        return TG_ERR;
    }
    m = tg_xcalloc(1, sizeof(*m));
    m->channel = channel;
    m->rule = rule;
    m->url = tg_xstrdup(url);
    m->body = tg_xstrndup(body, len);
    m->len = len;
    m->done = done;
    m->arg = arg;
    if (f->tail != NULL) {
        f->tail->next = m;
    } else {
        f->head = m;
    }
    f->tail = m;
    s->pending++;
    if (f->head == m) {
        start(s, channel);
    }
    return TG_OK;
}

size_t
tg_alert_send_pending(const struct tg_alert_send *s)
{
    return s == NULL ? 0 : s->pending;
}

void
tg_alert_send_destroy(struct tg_alert_send *s)
{
    tg_asend_msg *m, *next;
    unsigned c;
    size_t i;

    if (s == NULL) {
        return;
    }
    if (s->pending > 0) {
        tg_warn("alerts: %zu message(s) abandoned at exit", s->pending);
    }
    for (c = 0; c < TG_ALERT__NCHANNELS; c++) {
        for (m = s->fifo[c].head; m != NULL; m = next) {
            next = m->next;
            count(c, m->rule, TG_MAO_DROPPED);
            if (m->easy != NULL) {
                curl_multi_remove_handle(s->multi, m->easy);   /* sock_cb REMOVE */
                curl_easy_cleanup(m->easy);
            }
            free(m->url);
            free(m->body);
            free(m);
        }
        if (s->fifo[c].retry != NULL) {
            event_free(s->fifo[c].retry);
        }
    }
    if (s->multi != NULL) {
        curl_multi_cleanup(s->multi);
    }
    for (i = 0; i < s->ndead; i++) {
        event_free(s->dead[i]);
    }
    if (s->timer != NULL) {
        event_free(s->timer);
    }
    curl_slist_free_all(s->headers);
    free((char *)s->opts.ca_file);
    free(s);
}

/* ---- curl <-> libevent ------------------------------------------------- */

/* curl tells what to watch on fd; sockp is our event for it (or NULL). */
static int
sock_cb(CURL *e, curl_socket_t fd, int what, void *userp, void *sockp)
{
    struct tg_alert_send *s = userp;
    struct event *ev = sockp;
    short kind;

    TG_UNUSED(e);
    if (what == CURL_POLL_REMOVE) {
        if (ev != NULL) {
            event_del(ev);
            if (s->ndead < TG_ASEND_MAX_DEAD) {
                s->dead[s->ndead++] = ev;    /* freed in after_action */
            } else {
                event_free(ev);              /* not running: curl never removes
                                                more than a few per action */
            }
            curl_multi_assign(s->multi, fd, NULL);
        }
        return 0;
    }
    kind = (short)(EV_PERSIST | ((what & CURL_POLL_IN) ? EV_READ : 0)
                   | ((what & CURL_POLL_OUT) ? EV_WRITE : 0));
    if (ev == NULL) {
        ev = tg_event_new(s->base, fd, kind, event_cb, s);
        curl_multi_assign(s->multi, fd, ev);
    } else {
        event_del(ev);
        event_assign(ev, s->base, fd, kind, event_cb, s);
    }
    event_add(ev, NULL);
    return 0;
}

/* curl's one timer: -1 deletes it; 0 means "call me soon", from the loop
 * (curl must not be re-entered from this callback). */
static int
timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    struct tg_alert_send *s = userp;
    struct timeval tv;

    TG_UNUSED(multi);
    if (timeout_ms < 0) {
        evtimer_del(s->timer);
        return 0;
    }
    tv = tg_ms_tv((unsigned)(timeout_ms > 3600000 ? 3600000 : timeout_ms));
    evtimer_add(s->timer, &tv);
    return 0;
}

static void
event_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_alert_send *s = arg;
    int running, flags = ((what & EV_READ) ? CURL_CSELECT_IN : 0)
                         | ((what & EV_WRITE) ? CURL_CSELECT_OUT : 0);

    curl_multi_socket_action(s->multi, fd, flags, &running);
    after_action(s);
}

static void
timeout_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_alert_send *s = arg;
    int running;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    curl_multi_socket_action(s->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    after_action(s);
}

static void
retry_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_alert_send *s = arg;
    unsigned c;

    TG_UNUSED(fd);
    TG_UNUSED(what);
    for (c = 0; c < TG_ALERT__NCHANNELS; c++) {
        tg_asend_msg *m = s->fifo[c].head;
        if (m != NULL && m->easy == NULL && !evtimer_pending(s->fifo[c].retry, NULL)) {
            start(s, c);
        }
    }
}

static uint64_t
jitter(struct tg_alert_send *s)
{
    s->rnd ^= s->rnd << 13;
    s->rnd ^= s->rnd >> 7;
    s->rnd ^= s->rnd << 17;
    return s->rnd;
}

/* Is this failure worth another try? */
static int
retryable(CURLcode rc, long status)
{
    switch (rc) {
    case CURLE_OK:
        return status >= 500 || status == 429;
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
        return 1;
    default:
        return 0;                  /* TLS verification, bad URL, ... */
    }
}

/* The finished transfers: settle or re-arm each; then free the events
 * curl let go of during the action. */
static void
after_action(struct tg_alert_send *s)
{
    CURLMsg *cm;
    int left;
    size_t i;

    while ((cm = curl_multi_info_read(s->multi, &left)) != NULL) {
        tg_asend_msg *m = NULL;
        CURLcode rc = cm->data.result;
        curl_off_t after = 0;
        long status = 0;
        char reason[96];
        uint64_t delay;
        unsigned shift;

        if (cm->msg != CURLMSG_DONE) {
            continue;
        }
        curl_easy_getinfo(cm->easy_handle, CURLINFO_PRIVATE, (char **)&m);
        curl_easy_getinfo(cm->easy_handle, CURLINFO_RESPONSE_CODE, &status);
        curl_easy_getinfo(cm->easy_handle, CURLINFO_RETRY_AFTER, &after);
        curl_multi_remove_handle(s->multi, m->easy);
        curl_easy_cleanup(m->easy);
        m->easy = NULL;
        if (rc == CURLE_OK && status >= 200 && status < 300) {
            settle(s, m->channel, 1, "delivered");
            continue;
        }
        if (rc == CURLE_OK) {
            snprintf(reason, sizeof(reason), "HTTP %ld", status);
        } else {
            snprintf(reason, sizeof(reason), "%s", curl_easy_strerror(rc));
        }
        if (!retryable(rc, status) || m->tries >= s->opts.max_tries) {
            settle(s, m->channel, 0, reason);
            continue;
        }
        shift = m->tries - 1 < 20 ? m->tries - 1 : 20;
        delay = (uint64_t)s->opts.backoff_ms << shift;
        if (delay > s->opts.max_backoff_ms) {
            delay = s->opts.max_backoff_ms;
        }
        delay = delay / 2 + jitter(s) % (delay / 2 + 1);
        if (rc == CURLE_OK && status == 429 && after > 0) {
            delay = (uint64_t)after * 1000 > TG_ASEND_MAX_RETRY_MS
                    ? TG_ASEND_MAX_RETRY_MS : (uint64_t)after * 1000;
        }
        count(m->channel, m->rule, TG_MAO_RETRIED);
        tg_info("alerts: %s: try %u of %u failed (%s), next in %llu ms",
                tg_asend_channel_names[m->channel], m->tries, s->opts.max_tries,
                reason, (unsigned long long)delay);
        {
            struct timeval tv = tg_ms_tv((unsigned)delay);
            evtimer_add(s->fifo[m->channel].retry, &tv);
        }
    }
    for (i = 0; i < s->ndead; i++) {
        event_free(s->dead[i]);
    }
    s->ndead = 0;
}

/* ---- messages ------------------------------------------------------------ */

/* Start the transfer of channel's head message. */
static void
start(struct tg_alert_send *s, unsigned channel)
{
    tg_asend_msg *m = s->fifo[channel].head;
    CURL *e;

    e = curl_easy_init();
    if (e == NULL) {
        settle(s, channel, 0, "cannot create a curl handle");
        return;
    }
    m->tries++;
    m->easy = e;
    curl_easy_setopt(e, CURLOPT_URL, m->url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)m);
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, m->body);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)m->len);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, s->headers);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "tollgate/" TG_VERSION);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)s->opts.connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)s->opts.timeout_ms);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(e, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    if (s->opts.ca_file != NULL) {
        curl_easy_setopt(e, CURLOPT_CAINFO, s->opts.ca_file);
        curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
    }
    /* the answer is read and discarded (the default would print it) */
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
    if (curl_multi_add_handle(s->multi, e) != CURLM_OK) {
        m->easy = NULL;
        curl_easy_cleanup(e);
        settle(s, channel, 0, "cannot start the transfer");
    }
}

/* The head of channel's FIFO is done: count, log, call back, free, and
 * start the next one. */
static void
settle(struct tg_alert_send *s, unsigned channel, int delivered, const char *reason)
{
    tg_asend_fifo *f = &s->fifo[channel];
    tg_asend_msg *m = f->head;

    f->head = m->next;
    if (f->head == NULL) {
        f->tail = NULL;
    }
    s->pending--;
    count(channel, m->rule, delivered ? TG_MAO_SENT : TG_MAO_DROPPED);
    if (!delivered) {
        tg_warn("alerts: %s: message dropped after %u tr%s: %s",
                tg_asend_channel_names[channel], m->tries,
                m->tries == 1 ? "y" : "ies", reason);
    }
    if (m->done != NULL) {
        m->done(m->arg, channel, delivered, reason);
    }
    free(m->url);
    free(m->body);
    free(m);
    if (f->head != NULL && f->head->easy == NULL && !evtimer_pending(f->retry, NULL)) {
        start(s, channel);
    }
}

static void
count(unsigned channel, unsigned rule, enum tg_metric_alert_outcome o)
{
    tg_metrics_global_inc(TG_M_ALERTS, tg_metrics_alert(channel, rule, o));
}

static size_t
discard(char *p, size_t size, size_t n, void *arg)
{
    TG_UNUSED(p);
    TG_UNUSED(arg);
    return size * n;
}
