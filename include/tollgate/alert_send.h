/*
 * alert_send.h - the alert transport: HTTP POSTs of JSON bodies with
 * libcurl multi, driven by one libevent loop (the main thread's).
 *
 * The multi handle's sockets and timer are libevent events
 * (CURLMOPT_SOCKETFUNCTION / CURLMOPT_TIMERFUNCTION), so a transfer never
 * blocks the loop and no worker thread ever sees it.
 *
 * Queueing: one FIFO per channel with at most one transfer in flight per
 * channel, so a resolve never overtakes its trigger.  The queues together
 * hold at most `queue` messages; a message posted to a full queue is
 * dropped (logged, counted).
 *
 * Retries: timeouts, connection errors and HTTP 5xx are retried after
 * backoff_ms, doubling up to max_backoff_ms, with jitter (half the delay
 * fixed, half random); HTTP 429 waits its Retry-After when it has one.
 * Other answers (2xx excepted) and TLS verification failures are not
 * retried.  After max_tries the message is dropped.  Every outcome is
 * counted in tollgate_alerts_total{channel,rule,outcome}.
 *
 * Secrets: the URL is only given to curl; log lines name the channel,
 * the rule, the HTTP status or curl's error text (curl_easy_strerror,
 * which never holds the URL).
 */
#ifndef TOLLGATE_ALERT_SEND_H
#define TOLLGATE_ALERT_SEND_H

#include <stddef.h>

#include "tollgate/common.h"

struct event_base;
struct tg_alert_send;

typedef struct tg_alert_send_opts {
    const char *ca_file;            /* PEM bundle (copied); NULL = system CAs */
    unsigned    connect_timeout_ms; /* every transfer */
    unsigned    timeout_ms;         /* every transfer, total */
    unsigned    max_tries;          /* first try included, >= 1 */
    unsigned    backoff_ms;         /* first retry delay */
    unsigned    max_backoff_ms;     /* cap of the doubling */
    unsigned    queue;              /* messages queued at most, all channels */
} tg_alert_send_opts;

/*
 * Called once per message when it is delivered (delivered = 1) or dropped
 * (0; reason says why, e.g. "HTTP 403", "Timeout was reached").  reason
 * is only valid during the call.  The callback may post new messages.
 */
typedef void (*tg_alert_send_done_fn)(void *arg, unsigned channel,
                                      int delivered, const char *reason);

/* A transport on base (the caller's loop; base outlives it).  NULL if
 * curl cannot be set up.  curl_global_init must have run. */
struct tg_alert_send *tg_alert_send_create(struct event_base *base,
                                           const tg_alert_send_opts *opts);

/* New options for the transfers that start from now on (reload). */
void tg_alert_send_configure(struct tg_alert_send *s, const tg_alert_send_opts *opts);

/*
 * Queue a POST of body (len bytes, JSON) to url for channel (conf.h
 * tg_alert_channel) and rule (metric rule index, metrics.h).  url and
 * body are copied.  done (may be NULL) is called with arg when the
 * message is settled.  Returns TG_OK, or TG_ERR when the queue is full
 * (the message is dropped and counted, done is not called).
 */
tg_rc tg_alert_send_post(struct tg_alert_send *s, unsigned channel, unsigned rule,
                         const char *url, const char *body, size_t len,
                         tg_alert_send_done_fn done, void *arg);

/* Messages queued or in flight. */
size_t tg_alert_send_pending(const struct tg_alert_send *s);

/* Abandon every message (no callbacks) and free s. */
void tg_alert_send_destroy(struct tg_alert_send *s);

#endif
