/*
 * http.h - strict HTTP/1.1 message framing (RFC 9110 / RFC 9112).
 *
 * Pure functions over byte buffers: no sockets, no allocation.  The front
 * door decides where a request ends, so these functions never guess: any
 * ambiguity is an error that the caller answers with req->status and a
 * closed connection.
 *
 * Pointers in the parsed structures point into the caller's buffer, which
 * must stay unchanged while the structure is used.
 */
#ifndef TOLLGATE_HTTP_H
#define TOLLGATE_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "tollgate/common.h"

#define TG_HTTP_MAX_HEADERS 128   /* hard cap for tg_http_limits.max_headers */

typedef struct tg_http_limits {
    size_t max_request_line;      /* request line (or status line) bytes, excl. CRLF */
    size_t max_header_bytes;      /* whole head incl. request line and final CRLF */
    size_t max_headers;           /* header field lines; <= TG_HTTP_MAX_HEADERS */
} tg_http_limits;

typedef struct tg_http_hdr {
    const char *name;
    size_t      name_len;
    const char *value;            /* OWS trimmed on both sides */
    size_t      value_len;
} tg_http_hdr;

enum tg_http_body {
    TG_BODY_NONE,                 /* no body at all */
    TG_BODY_LENGTH,               /* content_length bytes follow */
    TG_BODY_CHUNKED,              /* chunked coding follows */
    TG_BODY_CLOSE                 /* response only: body ends at EOF */
};

typedef struct tg_http_req {
    const char  *method;
    size_t       method_len;
    const char  *target;          /* request-target as sent */
    size_t       target_len;
    const char  *path;            /* origin-form to forward ("/x?y"; "*" for OPTIONS *) */
    size_t       path_len;
    int          minor;           /* 0: HTTP/1.0, 1: HTTP/1.1 */
    int          is_head;         /* method is HEAD */
    tg_http_hdr *hdr;             /* the caller's array of TG_HTTP_MAX_HEADERS
                                     entries (set before parsing; an idle
                                     connection holds none) */
    size_t       nhdr;
    const char  *host;            /* Host value (or authority of absolute-form) */
    size_t       host_len;
    enum tg_http_body body;       /* NONE, LENGTH or CHUNKED */
    uint64_t     content_length;  /* when body == TG_BODY_LENGTH */
    int          keep_alive;      /* connection may persist after this exchange */
    int          expect_continue; /* Expect: 100-continue (HTTP/1.1 only) */
    size_t       head_len;        /* bytes of the head, final CRLF included */
    int          status;          /* on TG_ERR: 400, 414, 417, 431, 501 or 505 */
    const char  *error;           /* on TG_ERR: static text, for logs and bodies */
} tg_http_req;

typedef struct tg_http_resp {
    int          minor;
    int          status;          /* 100..999 */
    const char  *reason;
    size_t       reason_len;
    tg_http_hdr  hdr[TG_HTTP_MAX_HEADERS];
    size_t       nhdr;
    enum tg_http_body body;
    uint64_t     content_length;
    int          keep_alive;      /* the upstream connection may be reused */
    size_t       head_len;
    const char  *error;           /* on TG_ERR */
} tg_http_resp;

/*
 * Parse the request head at the start of buf[0..len).
 * Returns TG_OK (req filled, req->head_len set), TG_AGAIN (head incomplete
 * and still within the limits: read more), or TG_ERR (req->status and
 * req->error set; the caller answers and closes).  req->hdr must point to
 * TG_HTTP_MAX_HEADERS entries.
 */
tg_rc tg_http_parse_request(const char *buf, size_t len,
                            const tg_http_limits *lim, tg_http_req *req);

/*
 * Parse an upstream response head.  req_is_head: the request was HEAD (no
 * body whatever the headers say).  Same return convention; any framing
 * ambiguity is TG_ERR (the proxy answers 502).
 */
tg_rc tg_http_parse_response(const char *buf, size_t len,
                             const tg_http_limits *lim, int req_is_head,
                             tg_http_resp *resp);

/* Chunked-coding decoder, incremental: feed it bytes as they arrive. */
typedef struct tg_chunked {
    int      state;               /* private */
    uint64_t remaining;           /* private: bytes left in current chunk */
    size_t   line_len;            /* private: bytes of current size/trailer line */
    size_t   trailer_bytes;       /* private */
    int      done;                /* last chunk and trailers seen */
    const char *error;            /* set when tg_chunked_decode returns -1 */
} tg_chunked;

typedef void (*tg_chunked_data_cb)(void *arg, const char *data, size_t len);

void tg_chunked_init(tg_chunked *c);

/*
 * Decode in[0..len).  Chunk data is passed to cb (pointers into in).
 * Returns the number of bytes consumed: len, or fewer when the message
 * ended inside in (c->done set; the rest belongs to the next message), or
 * -1 on a malformed stream (c->error set).
 */
ssize_t tg_chunked_decode(tg_chunked *c, const char *in, size_t len,
                          tg_chunked_data_cb cb, void *arg);

/* Case-insensitive comparison of a header name with lit[0..litlen). */
int tg_http_name_eq(const char *name, size_t len, const char *lit, size_t litlen);

/* ... with a C string (inline: a literal's length is known at compile
 * time, and most names differ in length: no call, no strlen). */
static inline int
tg_http_name_is(const char *name, size_t len, const char *lit)
{
    size_t n = strlen(lit);

    return len == n && tg_http_name_eq(name, len, lit, n);
}

/* 1 if name is hop-by-hop (never forwarded): Connection, Keep-Alive,
 * Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, Expect,
 * Content-Length (re-framed by the proxy), Proxy-Authorization. */
int tg_http_is_hop_by_hop(const char *name, size_t len);

/* 1 if name is listed as a token in any Connection header of hdr[]. */
int tg_http_connection_lists(const tg_http_hdr *hdr, size_t nhdr,
                             const char *name, size_t len);

/* Standard reason phrase ("Not Found"), "Unknown" if none. */
const char *tg_http_reason(int status);

#endif
