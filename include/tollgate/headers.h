/*
 * headers.h - the heads tollgate writes: the request head it sends
 * upstream and the response head it relays to the client.
 *
 * Pure functions: they read a parsed head (tg_http_req / tg_http_resp,
 * http.h) and the facts of the request that the proxy knows (peer
 * address, request id, consumer, ...) and append the new head to a
 * tg_hbuf.  No sockets, no allocation beyond the buffer's own growth.
 *
 * What happens to each header the peer sent is decided by one table
 * (headers.c, `rules`): a header name (or name prefix) and its action
 * on the way up and on the way down.
 *   PASS     copied as it is;
 *   DROP     hop-by-hop (RFC 9110 7.6.1) or otherwise not forwarded, and
 *            not re-sent;
 *   REPLACE  said by tollgate alone: the peer's copy is dropped and
 *            tollgate writes its own (Host, X-Forwarded-Proto,
 *            X-Request-ID, X-Consumer-*), or none (Forwarded, X-Real-IP,
 *            other X-Forwarded-*);
 *   FRAMING  Content-Length: re-derived from the framing the parser
 *            decided (kept as sent only on a response to HEAD or a 304);
 *   APPEND   X-Forwarded-For: the values sent by a trusted proxy are
 *            kept, and the peer's address is appended.
 * On top of the table, a header named in a Connection header is dropped
 * (both ways), and on the way up the header that carried the API key
 * (the caller's strip predicate, tg_limiter_strip_header).
 */
#ifndef TOLLGATE_HEADERS_H
#define TOLLGATE_HEADERS_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "tollgate/cidr.h"
#include "tollgate/http.h"

/* A message head being built: in the stack area while it fits, then
 * on the heap.  The proxy hands it to its bufferevent with ONE
 * evbuffer_add (each add runs the buffer's callbacks). */
typedef struct tg_hbuf {
    char  *p;                   /* stack or a malloc'ed block */
    size_t len, cap;
    char   stack[4096];
} tg_hbuf;

static inline void
tg_hbuf_init(tg_hbuf *b)
{
    b->p = b->stack;
    b->len = 0;
    b->cap = sizeof(b->stack);
}

/* Release what tg_hbuf_add allocated (b may be used again after init). */
static inline void
tg_hbuf_free(tg_hbuf *b)
{
    if (b->p != b->stack) {
        free(b->p);
    }
    b->p = b->stack;
}

/* Make room for n more bytes (the slow path of tg_hbuf_add). */
void tg_hbuf_grow(tg_hbuf *b, size_t n);

/* Append n bytes of s (s may be NULL when n is 0).  Inline: a head is a
 * few dozen short pieces, most of them literals whose copy the compiler
 * makes in a move or two. */
static inline void
tg_hbuf_add(tg_hbuf *b, const char *s, size_t n)
{
    if (n == 0) {
        return;                 /* s may be NULL (no Host in HTTP/1.0) */
    }
    if (b->len + n > b->cap) {
        tg_hbuf_grow(b, n);
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

/* What the proxy knows of a request beyond its head. */
typedef struct tg_headers_up {
    const char    *ip;               /* peer address, as text */
    int            tls;              /* came in over TLS */
    const char    *reqid;            /* request id, reqid_len bytes */
    size_t         reqid_len;
    const char    *consumer;         /* "" when not identified */
    const char    *tier;             /* the consumer's tier */
    const tg_cidr *trusted;          /* http.trusted_proxies */
    size_t         ntrusted;
    /* 1 when header h of r carried the API key (not forwarded), or NULL */
    int          (*strip)(const void *arg, const tg_http_req *r, const tg_http_hdr *h);
    const void    *strip_arg;
} tg_headers_up;

/*
 * Append to out the request head for the upstream: "METHOD path
 * HTTP/1.1", Host, the client's end-to-end headers (the table's PASS),
 * then X-Forwarded-For, X-Forwarded-Proto, X-Request-ID, X-Consumer-ID
 * and X-Consumer-Tier (when a consumer is known) and the framing
 * (Content-Length or Transfer-Encoding: chunked), and the blank line.
 */
void tg_headers_request(tg_hbuf *out, const tg_http_req *r, const tg_headers_up *f);

/* What the proxy knows of the exchange when the response head arrives. */
typedef struct tg_headers_down {
    int         is_head;             /* the request was HEAD */
    int         minor;               /* the request's HTTP/1.minor */
    int         rq_done;             /* the request body was read whole */
    int         close_after;         /* the connection closes after this */
    const char *reqid;               /* request id, reqid_len bytes */
    size_t      reqid_len;
    const char *extra;               /* more header lines (CRLF-ended, the
                                        RateLimit ones), extra_len bytes */
    size_t      extra_len;
} tg_headers_down;

#define TG_HEADERS_CHUNKED  1u       /* the body is re-chunked to the client */
#define TG_HEADERS_CLOSE    2u       /* the connection closes after it */

/*
 * Append to out the response head for the client: the status line, the
 * upstream's end-to-end headers, X-Request-ID, f->extra, the framing and
 * the Connection header.  Returns TG_HEADERS_CHUNKED when the body must
 * be re-chunked, and TG_HEADERS_CLOSE when the connection must close
 * after the response (f->close_after, an HTTP/1.0 body that ends at
 * close, or a request body not read whole).
 */
unsigned tg_headers_response(tg_hbuf *out, const tg_http_resp *rs,
                             const tg_headers_down *f);

#endif
