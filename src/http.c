/*
 * http.c - strict HTTP/1.1 message framing (RFC 9110 / RFC 9112).
 *
 * The front door decides where a message ends, so every rule here rejects
 * what another parser could read differently (request smuggling): bare CR
 * or LF, obs-fold, whitespace before the colon, duplicate or malformed
 * Content-Length, Transfer-Encoding we cannot decode, both at once.
 *
 * The head parsers are re-run on everything buffered so far (the proxy does
 * so only once a blank line may have ended the head).  They are single pass, driven by one 256-entry class table,
 * and stop at the first byte that proves an error or a limit; a head is at
 * most a few KiB, so re-parsing costs less than keeping parser state.
 *
 * Framing decisions worth knowing:
 *  - A request with Content-Length: 0 gets body TG_BODY_NONE and
 *    content_length 0.  Responses do the same, except that content_length
 *    keeps the Content-Length value whenever one was sent (HEAD, 304), so
 *    the proxy can forward it.
 *  - Absolute-form "http://host?q" (empty path followed by a query) is 400:
 *    path must point into the caller's buffer and "/?q" is not there.
 *  - Chunk extensions accept BWS before ";" and around "=" (RFC 9112 7.1.1
 *    says recipients must), but whitespace anywhere else in a size line,
 *    including "5 \r\n", is an error.
 */
#include "tollgate/http.h"

#include <string.h>

/* Byte classes, bit flags of http_ctab[]. */
#define HC_TCHAR  0x01   /* token character (RFC 9110 5.6.2) */
#define HC_FVCHAR 0x02   /* field-vchar: VCHAR / obs-text */
#define HC_WS     0x04   /* SP / HTAB */
#define HC_RL     0x08   /* allowed in a request line: SP / VCHAR */
#define HC_HEX    0x10   /* HEXDIG */
#define HC_HOST   0x20   /* reg-name: unreserved / sub-delims ('%' apart) */
#define HC_DIGIT  0x40   /* DIGIT */

#define HTTP_MAX_EMPTY_LINES  4       /* CRLFs skipped before a request line */
#define HTTP_CL_MAX           ((uint64_t) 1 << 62)
#define CHUNK_MAX_SIZE_DIGITS 16
#define CHUNK_MAX_LINE        4096    /* size line incl. extensions, excl. CRLF */
#define CHUNK_MAX_TRAILER     16384   /* whole trailer section incl. final CRLF */

/* Head parse state shared by the request and response parsers. */
typedef struct http_ctx {
    const unsigned char *b;      /* buffer */
    size_t       len;            /* bytes buffered */
    size_t       end;            /* min(len, max_header_bytes): the head must end by here */
    int          capped;         /* len >= max_header_bytes: running out at end is 431 */
    size_t       max_headers;    /* min(lim->max_headers, TG_HTTP_MAX_HEADERS) */
    int          status;         /* on TG_ERR */
    const char  *error;          /* on TG_ERR */
    const char  *too_large;      /* error text for the head size limit */
} http_ctx;

/* Facts gathered from the header fields that frame the message. */
typedef struct http_framing {
    size_t       ncl;            /* Content-Length fields */
    int          cl_bad;         /* some Content-Length value is invalid */
    int          cl_differ;      /* Content-Length fields disagree */
    uint64_t     cl;             /* value of the first one */
    size_t       nte;            /* Transfer-Encoding fields */
    int          te_bad;         /* empty element or parameters in TE */
    size_t       te_chunked;     /* "chunked" elements */
    size_t       te_other;       /* codings other than chunked */
    int          te_last_chunked;/* final coding is chunked */
    int          conn_close;     /* Connection: close */
    int          conn_keep;      /* Connection: keep-alive */
} http_framing;

static tg_rc http_request(http_ctx *hc, const char *buf, size_t len,
                          const tg_http_limits *lim, tg_http_req *req);
static tg_rc http_fail(http_ctx *hc, int status, const char *error);
static tg_rc http_more(http_ctx *hc);
static tg_rc http_bad_byte(http_ctx *hc, size_t p, const char *what);
static void http_ctx_init(http_ctx *hc, const char *buf, size_t len,
                          const tg_http_limits *lim, const char *too_large);
static tg_rc http_line_end(http_ctx *hc, size_t start, size_t max_line,
                           unsigned char cls, size_t *cr, const char *too_long,
                           int too_long_status);
static tg_rc http_parse_fields(http_ctx *hc, size_t *pos, tg_http_hdr *hdr,
                               size_t *nhdr);
static tg_rc http_parse_target(http_ctx *hc, tg_http_req *req);
static int http_version(const unsigned char *v, int *minor);
static void http_framing_scan(const tg_http_hdr *hdr, size_t nhdr,
                              http_framing *fr);
static int http_list_next(const char *v, size_t n, size_t *i,
                          const char **e, size_t *elen);
static int http_host_valid(const unsigned char *s, size_t n);
static int http_cl_parse(const char *v, size_t n, uint64_t *out);
static int http_ieq(const char *a, size_t alen, const char *lit, size_t litlen);

static const unsigned char http_ctab[256] = {
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  /* 00-0f */
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  /* 10-1f */
    0x0c, 0x2b, 0x0a, 0x0b, 0x2b, 0x0b, 0x2b, 0x2b, 0x2a, 0x2a, 0x2b, 0x2b, 0x2a, 0x2b, 0x2b, 0x0a,  /* 20-2f */
    0x7b, 0x7b, 0x7b, 0x7b, 0x7b, 0x7b, 0x7b, 0x7b, 0x7b, 0x7b, 0x0a, 0x2a, 0x0a, 0x2a, 0x0a, 0x0a,  /* 30-3f */
    0x0a, 0x3b, 0x3b, 0x3b, 0x3b, 0x3b, 0x3b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b,  /* 40-4f */
    0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x0a, 0x0a, 0x0a, 0x0b, 0x2b,  /* 50-5f */
    0x0b, 0x3b, 0x3b, 0x3b, 0x3b, 0x3b, 0x3b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b,  /* 60-6f */
    0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x2b, 0x0a, 0x0b, 0x0a, 0x2b, 0x00,  /* 70-7f */
    0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,  /* 80-8f */
    0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,  /* 90-9f */
    0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,  /* a0-af */
    0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,  /* b0-bf */
    0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,  /* c0-cf */
    0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,  /* d0-df */
    0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,  /* e0-ef */
    0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02,  /* f0-ff */
};

/* ------------------------------------------------------------------ */
/* Requests                                                            */
/* ------------------------------------------------------------------ */

tg_rc
tg_http_parse_request(const char *buf, size_t len, const tg_http_limits *lim,
                      tg_http_req *req)
{
    http_ctx hc;
    tg_rc rc;

    rc = http_request(&hc, buf, len, lim, req);
    if (rc == TG_ERR) {
        req->status = hc.status;
        req->error = hc.error;
    }
    return rc;
}

/* ------------------------------------------------------------------ */
/* Responses                                                           */
/* ------------------------------------------------------------------ */

tg_rc
tg_http_parse_response(const char *buf, size_t len, const tg_http_limits *lim,
                       int req_is_head, tg_http_resp *resp)
{
    http_ctx hc;
    http_framing fr;
    const unsigned char *b;
    size_t p, cr;
    tg_rc rc;

    resp->nhdr = 0;
    resp->reason = NULL;
    resp->reason_len = 0;
    resp->body = TG_BODY_NONE;
    resp->content_length = 0;
    resp->keep_alive = 0;
    resp->head_len = 0;
    resp->error = NULL;

    http_ctx_init(&hc, buf, len, lim, "response head too large");
    b = hc.b;

    /* Bytes that cannot begin a status line fail now, not at the next
     * CRLF (which may never come: e.g. a body after a 1xx). */
    if (memcmp(buf, "HTTP/1.", len < 7 ? len : 7) != 0) {
        rc = http_fail(&hc, 502, "malformed status line");
        goto fail;
    }

    /* The reason phrase may carry HTAB and obs-text, nothing else below SP. */
    rc = http_line_end(&hc, 0, lim->max_request_line, HC_FVCHAR | HC_WS, &cr,
                       "status line too long", 502);
    if (rc != TG_OK) {
        goto fail;
    }
    /* HTTP/1.x SP 3DIGIT [ SP reason ] */
    if (cr < 12 || b[8] != ' ') {
        rc = http_fail(&hc, 502, "malformed status line");
        goto fail;
    }
    switch (http_version(b, &resp->minor)) {
    case 0:
        break;
    case 505:
        rc = http_fail(&hc, 502, "unsupported HTTP version in response");
        goto fail;
    default:
        rc = http_fail(&hc, 502, "malformed status line");
        goto fail;
    }
    if (!(http_ctab[b[9]] & HC_DIGIT) || !(http_ctab[b[10]] & HC_DIGIT)
        || !(http_ctab[b[11]] & HC_DIGIT) || b[9] == '0'
        || (cr > 12 && b[12] != ' ')) {
        rc = http_fail(&hc, 502, "malformed status code");
        goto fail;
    }
    resp->status = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
    if (resp->status > 599) {
        rc = http_fail(&hc, 502, "status code out of range");   /* RFC 9110 15 */
        goto fail;
    }
    if (cr > 12) {
        resp->reason = buf + 13;
        resp->reason_len = cr - 13;
    } else {
        resp->reason = buf + 12;
    }

    p = cr + 2;
    rc = http_parse_fields(&hc, &p, resp->hdr, &resp->nhdr);
    if (rc != TG_OK) {
        goto fail;
    }

    http_framing_scan(resp->hdr, resp->nhdr, &fr);
    if (fr.cl_bad || fr.cl_differ) {
        rc = http_fail(&hc, 502, "invalid Content-Length in response");
        goto fail;
    }
    if (fr.nte > 0) {
        if (resp->minor == 0) {
            rc = http_fail(&hc, 502, "Transfer-Encoding in HTTP/1.0 response");
            goto fail;
        }
        if (fr.ncl > 0) {
            rc = http_fail(&hc, 502, "Transfer-Encoding with Content-Length");
            goto fail;
        }
        if (fr.te_bad || fr.te_chunked > 1) {
            rc = http_fail(&hc, 502, "invalid Transfer-Encoding in response");
            goto fail;
        }
        /* The proxy strips TE (hop-by-hop) and re-frames: any coding but
         * chunked could not be forwarded intact. */
        if (fr.te_other > 0) {
            rc = http_fail(&hc, 502, "unsupported transfer coding");
            goto fail;
        }
    }
    if (fr.ncl > 0) {
        resp->content_length = fr.cl;
    }
    /* A 1xx ends with its head (RFC 9110 15.2); one that announces a
     * body leaves the stream unframed. */
    if (resp->status < 200 && (fr.nte > 0 || (fr.ncl > 0 && fr.cl > 0))) {
        rc = http_fail(&hc, 502, "interim response with a body");
        goto fail;
    }

    if (resp->minor == 1) {
        resp->keep_alive = !fr.conn_close;
    } else {
        resp->keep_alive = fr.conn_keep && !fr.conn_close;
    }

    /* RFC 9112 6.3, in order. */
    if (req_is_head || resp->status < 200 || resp->status == 204
        || resp->status == 304) {
        resp->body = TG_BODY_NONE;
    } else if (fr.nte > 0) {
        if (fr.te_last_chunked) {
            resp->body = TG_BODY_CHUNKED;
        } else {
            resp->body = TG_BODY_CLOSE;
            resp->keep_alive = 0;
        }
    } else if (fr.ncl > 0) {
        resp->body = fr.cl > 0 ? TG_BODY_LENGTH : TG_BODY_NONE;
    } else {
        resp->body = TG_BODY_CLOSE;
        resp->keep_alive = 0;
    }
    resp->head_len = p;
    return TG_OK;

fail:
    if (rc == TG_ERR) {
        resp->error = hc.error;
    }
    return rc;
}

/* ------------------------------------------------------------------ */
/* Chunked coding                                                      */
/* ------------------------------------------------------------------ */

enum {
    CH_SIZE,            /* chunk-size digits */
    CH_EXT_WS,          /* BWS seen after size or ext: only ';' may follow */
    CH_EXT_NAME_START,  /* after ';': BWS, then ext-name */
    CH_EXT_NAME,        /* in ext-name */
    CH_EXT_NAME_WS,     /* BWS after ext-name: '=' or ';' must follow */
    CH_EXT_VAL_START,   /* after '=': BWS, then token or quoted-string */
    CH_EXT_VAL_TOKEN,   /* in a token ext-val */
    CH_EXT_VAL_QS,      /* in a quoted-string ext-val */
    CH_EXT_VAL_QP,      /* after a backslash in a quoted-string */
    CH_EXT_AFTER,       /* after a complete ext: ';', CR or BWS */
    CH_SIZE_LF,         /* CR of the size line seen */
    CH_DATA,            /* chunk data, c->remaining bytes left */
    CH_DATA_CR,         /* CRLF after chunk data */
    CH_DATA_LF,
    CH_TR_START,        /* start of a trailer line or the final CRLF */
    CH_TR_NAME,
    CH_TR_VALUE,
    CH_TR_LF,
    CH_FINAL_LF,
    CH_DONE,
    CH_ERROR
};

void
tg_chunked_init(tg_chunked *c)
{
    memset(c, 0, sizeof(*c));
    c->state = CH_SIZE;
}

static ssize_t
chunk_fail(tg_chunked *c, const char *error)
{
    c->state = CH_ERROR;
    c->error = error;
    return -1;
}

ssize_t
tg_chunked_decode(tg_chunked *c, const char *in, size_t len,
                  tg_chunked_data_cb cb, void *arg)
{
    const unsigned char *b = (const unsigned char *) in;
    size_t i = 0;

    if (c->state == CH_ERROR) {
        return -1;
    }
    if (c->done) {
        return 0;
    }

    while (i < len) {
        unsigned char ch;
        unsigned char cls;

        if (c->state == CH_DATA) {
            size_t n = len - i;
            if ((uint64_t) n > c->remaining) {
                n = (size_t) c->remaining;
            }
            if (cb != NULL) {
                cb(arg, in + i, n);
            }
            i += n;
            c->remaining -= n;
            if (c->remaining == 0) {
                c->state = CH_DATA_CR;
            }
            continue;
        }

        ch = b[i++];
        cls = http_ctab[ch];

        if (c->state < CH_SIZE_LF) {
            /* Every byte of the size line counts against its bound. */
            if (ch != '\r' && ++c->line_len > CHUNK_MAX_LINE) {
                return chunk_fail(c, "chunk size line too long");
            }
        } else if (c->state >= CH_TR_START && c->state <= CH_FINAL_LF) {
            if (++c->trailer_bytes > CHUNK_MAX_TRAILER) {
                return chunk_fail(c, "chunked trailer too large");
            }
        }

        switch (c->state) {
        case CH_SIZE:
            if (cls & HC_HEX) {
                /* line_len counts this digit already: in this state every
                 * byte so far was a digit. */
                if (c->line_len > CHUNK_MAX_SIZE_DIGITS) {
                    return chunk_fail(c, "chunk size too large");
                }
                c->remaining = (c->remaining << 4)
                    | (uint64_t) ((cls & HC_DIGIT) ? ch - '0' : (ch | 0x20) - 'a' + 10);
                break;
            }
            /* Digits so far: line_len, less this byte unless it is CR. */
            if (c->line_len - (ch != '\r') == 0) {
                return chunk_fail(c, "invalid chunk size");
            }
            /* FALLTHROUGH */
        case CH_EXT_AFTER:
            if (ch == '\r') {
                c->state = CH_SIZE_LF;
            } else if (ch == ';') {
                c->state = CH_EXT_NAME_START;
            } else if (cls & HC_WS) {
                c->state = CH_EXT_WS;
            } else {
                return chunk_fail(c, "invalid chunk size line");
            }
            break;
        case CH_EXT_WS:
            if (ch == ';') {
                c->state = CH_EXT_NAME_START;
            } else if (!(cls & HC_WS)) {
                return chunk_fail(c, "invalid chunk size line");
            }
            break;
        case CH_EXT_NAME_START:
            if (cls & HC_TCHAR) {
                c->state = CH_EXT_NAME;
            } else if (!(cls & HC_WS)) {
                return chunk_fail(c, "invalid chunk extension");
            }
            break;
        case CH_EXT_NAME:
            if (cls & HC_TCHAR) {
                break;
            }
            if (ch == '=') {
                c->state = CH_EXT_VAL_START;
            } else if (ch == ';') {
                c->state = CH_EXT_NAME_START;
            } else if (ch == '\r') {
                c->state = CH_SIZE_LF;
            } else if (cls & HC_WS) {
                c->state = CH_EXT_NAME_WS;
            } else {
                return chunk_fail(c, "invalid chunk extension");
            }
            break;
        case CH_EXT_NAME_WS:
            if (ch == '=') {
                c->state = CH_EXT_VAL_START;
            } else if (ch == ';') {
                c->state = CH_EXT_NAME_START;
            } else if (!(cls & HC_WS)) {
                return chunk_fail(c, "invalid chunk extension");
            }
            break;
        case CH_EXT_VAL_START:
            if (cls & HC_TCHAR) {
                c->state = CH_EXT_VAL_TOKEN;
            } else if (ch == '"') {
                c->state = CH_EXT_VAL_QS;
            } else if (!(cls & HC_WS)) {
                return chunk_fail(c, "invalid chunk extension");
            }
            break;
        case CH_EXT_VAL_TOKEN:
            if (cls & HC_TCHAR) {
                break;
            }
            if (ch == '\r') {
                c->state = CH_SIZE_LF;
            } else if (ch == ';') {
                c->state = CH_EXT_NAME_START;
            } else if (cls & HC_WS) {
                c->state = CH_EXT_WS;
            } else {
                return chunk_fail(c, "invalid chunk extension");
            }
            break;
        case CH_EXT_VAL_QS:
            if (ch == '"') {
                c->state = CH_EXT_AFTER;
            } else if (ch == '\\') {
                c->state = CH_EXT_VAL_QP;
            } else if (!(cls & (HC_FVCHAR | HC_WS))) {
                return chunk_fail(c, "invalid chunk extension");
            }
            break;
        case CH_EXT_VAL_QP:
            if (!(cls & (HC_FVCHAR | HC_WS))) {
                return chunk_fail(c, "invalid chunk extension");
            }
            c->state = CH_EXT_VAL_QS;
            break;
        case CH_SIZE_LF:
            if (ch != '\n') {
                return chunk_fail(c, "bare CR in chunk size line");
            }
            c->line_len = 0;
            if (c->remaining == 0) {
                c->state = CH_TR_START;
                c->trailer_bytes = 0;
            } else {
                c->state = CH_DATA;
            }
            break;
        case CH_DATA_CR:
            if (ch != '\r') {
                return chunk_fail(c, "missing CRLF after chunk data");
            }
            c->state = CH_DATA_LF;
            break;
        case CH_DATA_LF:
            if (ch != '\n') {
                return chunk_fail(c, "missing CRLF after chunk data");
            }
            c->state = CH_SIZE;
            c->line_len = 0;
            c->remaining = 0;
            break;
        case CH_TR_START:
            if (ch == '\r') {
                c->state = CH_FINAL_LF;
            } else if (cls & HC_TCHAR) {
                c->state = CH_TR_NAME;
            } else {
                return chunk_fail(c, "invalid trailer field");
            }
            break;
        case CH_TR_NAME:
            if (ch == ':') {
                c->state = CH_TR_VALUE;
            } else if (!(cls & HC_TCHAR)) {
                return chunk_fail(c, "invalid trailer field");
            }
            break;
        case CH_TR_VALUE:
            if (ch == '\r') {
                c->state = CH_TR_LF;
            } else if (!(cls & (HC_FVCHAR | HC_WS))) {
                return chunk_fail(c, "invalid trailer field");
            }
            break;
        case CH_TR_LF:
            if (ch != '\n') {
                return chunk_fail(c, "bare CR in trailer");
            }
            c->state = CH_TR_START;
            break;
        case CH_FINAL_LF:
            if (ch != '\n') {
                return chunk_fail(c, "bare CR in trailer");
            }
            c->state = CH_DONE;
            c->done = 1;
            return (ssize_t) i;
        default:
            return chunk_fail(c, "chunked decoder misuse");
        }
    }
    return (ssize_t) i;
}

/* ------------------------------------------------------------------ */
/* Header helpers                                                      */
/* ------------------------------------------------------------------ */

int
tg_http_name_eq(const char *name, size_t len, const char *lit, size_t litlen)
{
    return http_ieq(name, len, lit, litlen);
}

int
tg_http_is_hop_by_hop(const char *name, size_t len)
{
    static const char *const hop[] = {
        "connection", "keep-alive", "proxy-connection", "te", "trailer",
        "transfer-encoding", "upgrade", "expect", "content-length",
        "proxy-authorization",
    };
    size_t i;

    for (i = 0; i < TG_ARRAY_LEN(hop); i++) {
        if (tg_http_name_is(name, len, hop[i])) {
            return 1;
        }
    }
    return 0;
}

int
tg_http_connection_lists(const tg_http_hdr *hdr, size_t nhdr,
                         const char *name, size_t len)
{
    size_t k, i;
    const char *e;
    size_t elen;

    for (k = 0; k < nhdr; k++) {
        if (!tg_http_name_is(hdr[k].name, hdr[k].name_len, "connection")) {
            continue;
        }
        i = 0;
        while (http_list_next(hdr[k].value, hdr[k].value_len, &i, &e, &elen)) {
            if (http_ieq(e, elen, name, len)) {
                return 1;
            }
        }
    }
    return 0;
}

const char *
tg_http_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 102: return "Processing";
    case 103: return "Early Hints";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 205: return "Reset Content";
    case 206: return "Partial Content";
    case 207: return "Multi-Status";
    case 208: return "Already Reported";
    case 226: return "IM Used";
    case 300: return "Multiple Choices";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 305: return "Use Proxy";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 402: return "Payment Required";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 407: return "Proxy Authentication Required";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 418: return "I'm a teapot";
    case 421: return "Misdirected Request";
    case 422: return "Unprocessable Content";
    case 423: return "Locked";
    case 424: return "Failed Dependency";
    case 425: return "Too Early";
    case 426: return "Upgrade Required";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 451: return "Unavailable For Legal Reasons";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 506: return "Variant Also Negotiates";
    case 507: return "Insufficient Storage";
    case 508: return "Loop Detected";
    case 510: return "Not Extended";
    case 511: return "Network Authentication Required";
    default:  return "Unknown";
    }
}

/* ------------------------------------------------------------------ */
/* Static helpers                                                      */
/* ------------------------------------------------------------------ */

/* The request parser proper; errors land in hc. */
static tg_rc
http_request(http_ctx *hc, const char *buf, size_t len,
             const tg_http_limits *lim, tg_http_req *req)
{
    http_framing fr;
    size_t p, cr, i, nempty, nhost;
    const unsigned char *b;
    tg_rc rc;

    req->nhdr = 0;
    req->host = NULL;
    req->host_len = 0;
    req->body = TG_BODY_NONE;
    req->content_length = 0;
    req->keep_alive = 0;
    req->expect_continue = 0;
    req->head_len = 0;
    req->status = 0;
    req->error = NULL;

    http_ctx_init(hc, buf, len, lim, "request head too large");
    b = hc->b;

    /* RFC 9112 2.2: a few empty lines before the request line are noise
     * left by clients that end a POST body with an extra CRLF. */
    p = 0;
    for (nempty = 0;; nempty++) {
        if (p >= hc->end) {
            return http_more(hc);
        }
        if (b[p] != '\r') {
            if (b[p] == '\n') {
                return http_fail(hc, 400, "bare LF");
            }
            break;
        }
        if (p + 1 >= hc->end) {
            return http_more(hc);
        }
        if (b[p + 1] != '\n') {
            return http_fail(hc, 400, "bare CR");
        }
        if (nempty == HTTP_MAX_EMPTY_LINES) {
            return http_fail(hc, 400, "too many empty lines before request");
        }
        p += 2;
    }

    rc = http_line_end(hc, p, lim->max_request_line, HC_RL, &cr,
                       "request line too long", 414);
    if (rc != TG_OK) {
        return rc;
    }

    /* method SP request-target SP HTTP-version: exactly one SP each. */
    req->method = buf + p;
    for (i = p; http_ctab[b[i]] & HC_TCHAR; i++) {
        /* cr holds '\r', which is no tchar: the loop stops by then */
    }
    if (i == p || b[i] != ' ') {
        return http_fail(hc, 400, "invalid method");
    }
    req->method_len = i - p;
    req->target = buf + i + 1;
    {
        const char *sp = memchr(buf + i + 1, ' ', cr - (i + 1));
        if (sp == NULL || sp == req->target) {
            return http_fail(hc, 400, "malformed request line");
        }
        req->target_len = (size_t) (sp - req->target);
        i = (size_t) (sp - buf) + 1;
    }
    if (cr - i != 8) {
        return http_fail(hc, 400, "malformed HTTP version");
    }
    switch (http_version(b + i, &req->minor)) {
    case 0:
        break;
    case 505:
        return http_fail(hc, 505, "HTTP version not supported");
    default:
        return http_fail(hc, 400, "malformed HTTP version");
    }
    req->is_head = req->method_len == 4 && memcmp(req->method, "HEAD", 4) == 0;

    rc = http_parse_target(hc, req);
    if (rc != TG_OK) {
        return rc;
    }

    p = cr + 2;
    rc = http_parse_fields(hc, &p, req->hdr, &req->nhdr);
    if (rc != TG_OK) {
        return rc;
    }

    /* Host: exactly one in HTTP/1.1, at most one in 1.0; always valid. */
    nhost = 0;
    for (i = 0; i < req->nhdr; i++) {
        const tg_http_hdr *h = &req->hdr[i];
        if (h->name_len == 4 && tg_http_name_is(h->name, 4, "host")) {
            if (++nhost > 1) {
                return http_fail(hc, 400, "duplicate Host");
            }
            if (!http_host_valid((const unsigned char *) h->value, h->value_len)) {
                return http_fail(hc, 400, "invalid Host");
            }
            if (req->host == NULL) {
                req->host = h->value;
                req->host_len = h->value_len;
            }
        } else if (h->name_len == 6 && tg_http_name_is(h->name, 6, "expect")
                   && req->minor == 1) {
            /* Judged after the framing checks: a 417 may keep the
             * connection, so the body must be delimited first. */
            if (http_ieq(h->value, h->value_len, "100-continue", 12)) {
                req->expect_continue |= 1;
            } else {
                req->expect_continue |= 2;
            }
        }
    }
    if (nhost == 0 && req->minor == 1) {
        return http_fail(hc, 400, "missing Host");
    }

    http_framing_scan(req->hdr, req->nhdr, &fr);
    if (fr.ncl > 1) {
        return http_fail(hc, 400, "multiple Content-Length");
    }
    if (fr.cl_bad) {
        return http_fail(hc, 400, "invalid Content-Length");
    }
    if (fr.nte > 0) {
        /* RFC 9112 6.1: TE in a 1.0 message means faulty framing. */
        if (req->minor == 0) {
            return http_fail(hc, 400, "Transfer-Encoding in HTTP/1.0");
        }
        if (fr.ncl > 0) {
            return http_fail(hc, 400, "Transfer-Encoding with Content-Length");
        }
        if (fr.te_bad) {
            return http_fail(hc, 400, "invalid Transfer-Encoding");
        }
        if (!fr.te_last_chunked || fr.te_chunked != 1) {
            return http_fail(hc, 400, "chunked must be the final coding");
        }
        if (fr.te_other > 0) {
            return http_fail(hc, 501, "unsupported transfer coding");
        }
        req->body = TG_BODY_CHUNKED;
    } else if (fr.ncl == 1 && fr.cl > 0) {
        req->body = TG_BODY_LENGTH;
        req->content_length = fr.cl;
    }

    if (req->expect_continue & 2) {
        req->expect_continue = 0;
        return http_fail(hc, 417, "unsupported expectation");
    }

    if (req->minor == 1) {
        req->keep_alive = !fr.conn_close;
    } else {
        req->keep_alive = fr.conn_keep && !fr.conn_close;
    }
    req->head_len = p;
    return TG_OK;
}

static tg_rc
http_fail(http_ctx *hc, int status, const char *error)
{
    hc->status = status;
    hc->error = error;
    return TG_ERR;
}

/* The buffer ran out before the head ended: wait for more, unless the
 * head size limit already proves it too large. */
static tg_rc
http_more(http_ctx *hc)
{
    if (hc->capped) {
        return http_fail(hc, 431, hc->too_large);
    }
    return TG_AGAIN;
}

/* Name the error for byte b[p], which broke a scan of `what`. */
static tg_rc
http_bad_byte(http_ctx *hc, size_t p, const char *what)
{
    unsigned char ch = hc->b[p];

    if (ch == '\n') {
        return http_fail(hc, 400, "bare LF");
    }
    if (ch == '\r') {
        return http_fail(hc, 400, "bare CR");
    }
    if (ch < 0x20 || ch == 0x7f) {
        return http_fail(hc, 400, "control character in head");
    }
    return http_fail(hc, 400, what);
}

static void
http_ctx_init(http_ctx *hc, const char *buf, size_t len,
              const tg_http_limits *lim, const char *too_large)
{
    hc->b = (const unsigned char *) buf;
    hc->len = len;
    hc->capped = len >= lim->max_header_bytes;
    hc->end = hc->capped ? lim->max_header_bytes : len;
    hc->max_headers = lim->max_headers < TG_HTTP_MAX_HEADERS
                      ? lim->max_headers : TG_HTTP_MAX_HEADERS;
    hc->status = 0;
    hc->error = NULL;
    hc->too_large = too_large;
}

/*
 * Find the CRLF ending the first line, which starts at `start` and may hold
 * only bytes of class `cls` and at most max_line of them.  On TG_OK *cr is
 * the offset of its CR (the LF follows).  A line proven longer than
 * max_line fails with too_long_status.
 */
static tg_rc
http_line_end(http_ctx *hc, size_t start, size_t max_line, unsigned char cls,
              size_t *cr, const char *too_long, int too_long_status)
{
    const unsigned char *b = hc->b;
    size_t stop, p;
    int long_stop;

    /* Scan at most max_line bytes plus the one that must be CR. */
    if (hc->end - start > max_line) {
        stop = start + max_line + 1;
        long_stop = 1;
    } else {
        stop = hc->end;
        long_stop = 0;
    }
    for (p = start; p < stop && (http_ctab[b[p]] & cls); p++) {
        /* scan */
    }
    if (p == stop) {
        if (long_stop) {
            return http_fail(hc, too_long_status, too_long);
        }
        return http_more(hc);
    }
    if (b[p] != '\r') {
        return http_bad_byte(hc, p, "invalid character in start line");
    }
    if (p + 1 >= hc->end) {
        return http_more(hc);
    }
    if (b[p + 1] != '\n') {
        return http_fail(hc, 400, "bare CR");
    }
    *cr = p;
    return TG_OK;
}

/*
 * Parse field lines from *pos through the empty line that ends the head;
 * on TG_OK *pos is the head length.
 *   field-line = field-name ":" OWS field-value OWS CRLF
 */
static tg_rc
http_parse_fields(http_ctx *hc, size_t *pos, tg_http_hdr *hdr, size_t *nhdr)
{
    const unsigned char *b = hc->b;
    size_t end = hc->end;
    size_t p = *pos;
    size_t n = 0;

    for (;;) {
        size_t name, name_end, val, val_end;

        if (p >= end) {
            return http_more(hc);
        }
        if (b[p] == '\r') {
            if (p + 1 >= end) {
                return http_more(hc);
            }
            if (b[p + 1] != '\n') {
                return http_fail(hc, 400, "bare CR");
            }
            *pos = p + 2;
            *nhdr = n;
            return TG_OK;
        }
        if (n == hc->max_headers) {
            return http_fail(hc, 431, "too many header fields");
        }

        name = p;
        while (p < end && (http_ctab[b[p]] & HC_TCHAR)) {
            p++;
        }
        if (p >= end) {
            return http_more(hc);
        }
        if (b[p] != ':') {
            if (p == name && (http_ctab[b[p]] & HC_WS)) {
                return http_fail(hc, 400, "obsolete line folding");
            }
            if (http_ctab[b[p]] & HC_WS) {
                return http_fail(hc, 400, "whitespace before colon");
            }
            if (b[p] == '\r') {
                return http_fail(hc, 400, "missing colon in header");
            }
            return http_bad_byte(hc, p, "invalid header name");
        }
        if (p == name) {
            return http_fail(hc, 400, "empty header name");
        }
        name_end = p++;

        while (p < end && (http_ctab[b[p]] & HC_WS)) {
            p++;
        }
        val = val_end = p;
        while (p < end) {
            unsigned char cls = http_ctab[b[p]];
            if (cls & HC_FVCHAR) {
                val_end = ++p;
            } else if (cls & HC_WS) {
                p++;
            } else {
                break;
            }
        }
        if (p >= end) {
            return http_more(hc);
        }
        if (b[p] != '\r') {
            return http_bad_byte(hc, p, "invalid header value");
        }
        if (p + 1 >= end) {
            return http_more(hc);
        }
        if (b[p + 1] != '\n') {
            return http_fail(hc, 400, "bare CR");
        }
        p += 2;

        hdr[n].name = (const char *) b + name;
        hdr[n].name_len = name_end - name;
        hdr[n].value = (const char *) b + val;
        hdr[n].value_len = val_end - val;
        n++;
    }
}

/*
 * Classify req->target and set req->path (and req->host for absolute-form).
 * The target holds only 0x21-0x7E: the request line scan saw to that.
 */
static tg_rc
http_parse_target(http_ctx *hc, tg_http_req *req)
{
    const char *t = req->target;
    size_t n = req->target_len;
    size_t skip, a;

    if (req->method_len == 7 && memcmp(req->method, "CONNECT", 7) == 0) {
        return http_fail(hc, 501, "CONNECT not supported");
    }
    if (t[0] == '/') {
        req->path = t;
        req->path_len = n;
        return TG_OK;
    }
    if (n == 1 && t[0] == '*') {
        if (req->method_len == 7 && memcmp(req->method, "OPTIONS", 7) == 0) {
            req->path = t;
            req->path_len = 1;
            return TG_OK;
        }
        return http_fail(hc, 400, "asterisk-form only with OPTIONS");
    }
    if (n >= 7 && http_ieq(t, 7, "http://", 7)) {
        skip = 7;
    } else if (n >= 8 && http_ieq(t, 8, "https://", 8)) {
        skip = 8;
    } else {
        return http_fail(hc, 400, "invalid request target");
    }

    /* absolute-form: authority ends at the path, query or fragment. */
    for (a = skip; a < n && t[a] != '/' && t[a] != '?' && t[a] != '#'; a++) {
        /* scan */
    }
    if (a < n && t[a] != '/') {
        return http_fail(hc, 400, "absolute-form target without path");
    }
    if (!http_host_valid((const unsigned char *) t + skip, a - skip)) {
        return http_fail(hc, 400, "invalid authority in request target");
    }
    req->host = t + skip;
    req->host_len = a - skip;
    if (a < n) {
        req->path = t + a;
        req->path_len = n - a;
    } else {
        req->path = "/";
        req->path_len = 1;
    }
    return TG_OK;
}

/*
 * Check an 8-byte HTTP-version, "HTTP/" DIGIT "." DIGIT.  Returns 0 and sets
 * *minor (1.2-1.9 count as 1.1), 505 for a major other than 1, or 400.
 */
static int
http_version(const unsigned char *v, int *minor)
{
    if (memcmp(v, "HTTP/", 5) != 0 || !(http_ctab[v[5]] & HC_DIGIT)
        || v[6] != '.' || !(http_ctab[v[7]] & HC_DIGIT)) {
        return 400;
    }
    if (v[5] != '1') {
        return 505;
    }
    *minor = v[7] == '0' ? 0 : 1;
    return 0;
}

/* Gather Content-Length, Transfer-Encoding and Connection facts. */
static void
http_framing_scan(const tg_http_hdr *hdr, size_t nhdr, http_framing *fr)
{
    size_t k, i, j;
    const char *e;
    size_t elen;

    memset(fr, 0, sizeof(*fr));
    for (k = 0; k < nhdr; k++) {
        const tg_http_hdr *h = &hdr[k];

        switch (h->name_len) {
        case 14:
            if (tg_http_name_is(h->name, 14, "content-length")) {
                uint64_t v;
                if (!http_cl_parse(h->value, h->value_len, &v)) {
                    fr->cl_bad = 1;
                } else if (fr->ncl == 0) {
                    fr->cl = v;
                } else if (v != fr->cl) {
                    fr->cl_differ = 1;
                }
                fr->ncl++;
            }
            break;
        case 17:
            if (tg_http_name_is(h->name, 17, "transfer-encoding")) {
                fr->nte++;
                i = 0;
                while (http_list_next(h->value, h->value_len, &i, &e, &elen)) {
                    if (elen == 0) {
                        fr->te_bad = 1;
                        continue;
                    }
                    for (j = 0; j < elen; j++) {
                        if (!(http_ctab[(unsigned char) e[j]] & HC_TCHAR)) {
                            fr->te_bad = 1;   /* parameters (";") or junk */
                        }
                    }
                    if (http_ieq(e, elen, "chunked", 7)) {
                        fr->te_chunked++;
                        fr->te_last_chunked = 1;
                    } else {
                        fr->te_other++;
                        fr->te_last_chunked = 0;
                    }
                }
            }
            break;
        case 10:
            if (tg_http_name_is(h->name, 10, "connection")) {
                i = 0;
                while (http_list_next(h->value, h->value_len, &i, &e, &elen)) {
                    if (http_ieq(e, elen, "close", 5)) {
                        fr->conn_close = 1;
                    } else if (http_ieq(e, elen, "keep-alive", 10)) {
                        fr->conn_keep = 1;
                    }
                }
            }
            break;
        default:
            break;
        }
    }
}

/*
 * Iterate over a comma-separated list: sets *e and *elen to the next element
 * with OWS trimmed (possibly empty) and returns 1, or returns 0 when the
 * list is exhausted.  *i is the cursor, 0 to start.  An empty value is one
 * empty element, so "a," has two elements.
 */
static int
http_list_next(const char *v, size_t n, size_t *i, const char **e, size_t *elen)
{
    size_t s = *i, t;

    if (s > n) {
        return 0;
    }
    for (t = s; t < n && v[t] != ','; t++) {
        /* scan */
    }
    *i = t + 1;
    while (s < t && (v[s] == ' ' || v[s] == '\t')) {
        s++;
    }
    while (t > s && (v[t - 1] == ' ' || v[t - 1] == '\t')) {
        t--;
    }
    *e = v + s;
    *elen = t - s;
    return 1;
}

/*
 * uri-host [ ":" port ] (RFC 9110 7.2): a non-empty reg-name (IPv4 is one)
 * or an IP-literal of hex digits, colons and dots; a port of 1-5 digits up
 * to 65535.  IPvFuture and empty hosts are refused.
 */
static int
http_host_valid(const unsigned char *s, size_t n)
{
    size_t i = 0, colons = 0, digits;
    unsigned port;

    if (n == 0) {
        return 0;
    }
    if (s[0] == '[') {
        for (i = 1; i < n && s[i] != ']'; i++) {
            if (s[i] == ':') {
                colons++;
            } else if (!(http_ctab[s[i]] & HC_HEX) && s[i] != '.') {
                return 0;
            }
        }
        if (i == n || colons < 2) {
            return 0;
        }
        i++;
    } else {
        while (i < n && s[i] != ':') {
            if (s[i] == '%') {
                if (n - i < 3 || !(http_ctab[s[i + 1]] & HC_HEX)
                    || !(http_ctab[s[i + 2]] & HC_HEX)) {
                    return 0;
                }
                i += 3;
            } else if (http_ctab[s[i]] & HC_HOST) {
                i++;
            } else {
                return 0;
            }
        }
        if (i == 0) {
            return 0;
        }
    }
    if (i == n) {
        return 1;
    }
    if (s[i++] != ':' || i == n || n - i > 5) {
        return 0;
    }
    port = 0;
    for (digits = 0; i < n; i++, digits++) {
        if (!(http_ctab[s[i]] & HC_DIGIT)) {
            return 0;
        }
        port = port * 10 + (unsigned) (s[i] - '0');
    }
    return port <= 65535;
}

/* Content-Length = 1*DIGIT, at most 19 digits and 2^62. */
static int
http_cl_parse(const char *v, size_t n, uint64_t *out)
{
    uint64_t x = 0;
    size_t i;

    if (n == 0 || n > 19) {
        return 0;
    }
    for (i = 0; i < n; i++) {
        if (!(http_ctab[(unsigned char) v[i]] & HC_DIGIT)) {
            return 0;
        }
        x = x * 10 + (uint64_t) (v[i] - '0');   /* 19 digits fit in 64 bits */
    }
    if (x > HTTP_CL_MAX) {
        return 0;
    }
    *out = x;
    return 1;
}

/* ASCII case-insensitive equality of a[0..alen) and lit[0..litlen). */
static int
http_ieq(const char *a, size_t alen, const char *lit, size_t litlen)
{
    size_t i;

    if (alen != litlen) {
        return 0;
    }
    for (i = 0; i < alen; i++) {
        unsigned char x = (unsigned char) a[i], y = (unsigned char) lit[i];
        if (x == y) {
            continue;                  /* the common case: no folding */
        }
        /* different bytes: equal only as the two cases of one letter */
        x |= 0x20;
        if (x != (y | 0x20) || x < 'a' || x > 'z') {
            return 0;
        }
    }
    return 1;
}
