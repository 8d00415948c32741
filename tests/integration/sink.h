/*
 * sink.h - an HTTP(S) server on loopback that records every request it
 * gets (path, body, time) and answers as told: the webhook end of the
 * alert tests (Slack, PagerDuty, generic webhook all POST JSON).
 *
 * One thread accepts and serves one request per connection.  Start it
 * from the test (sink_start), read what came with sink_count / sink_wait
 * / sink_get, stop it (the port refuses connections from then on).
 */
#ifndef TOLLGATE_TESTS_SINK_H
#define TOLLGATE_TESTS_SINK_H

#include <openssl/ssl.h>
#include <pthread.h>
#include <stdint.h>

#define SINK_MAX 256

typedef struct sink_req {
    char     path[256];
    char    *body;
    uint64_t at_ms;
} sink_req;

typedef struct sink {
    int             fd, port;
    pthread_t       th;
    volatile int    stop;
    pthread_mutex_t mu;
    sink_req        req[SINK_MAX];
    int             nreq;
    int             script[16];        /* statuses, answered in order ... */
    int             nscript, pos;      /* ... then 200 */
    int             retry_after;       /* seconds, on a 429; 0 none */
    int             hang;              /* read the request, never answer */
    int             hung[64];
    int             nhung;
    SSL_CTX        *tls;               /* HTTPS when set */
    int             tls_failed;        /* handshakes that failed */
} sink;

/* Listen on an ephemeral loopback port (HTTPS with tls), serve in a
 * thread. */
void sink_start(sink *s, SSL_CTX *tls);
/* Stop accepting (the port refuses connections from now on) and forget
 * the requests. */
void sink_stop(sink *s);
/* Requests to path so far (NULL: all). */
int sink_count(sink *s, const char *path);
/* Wait until path has at least n requests; 0 / -1. */
int sink_wait(sink *s, const char *path, int n, int timeout_ms);
/* The k-th request (0-based) to path; NULL if none. */
sink_req *sink_get(sink *s, const char *path, int k);

#endif
