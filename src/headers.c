/*
 * headers.c - the request head sent upstream and the response head
 * relayed to the client, over one table of header rules (headers.h).
 */
#include "tollgate/headers.h"

#include <string.h>

#include "tollgate/common.h"

enum hdr_action {
    HA_PASS,          /* copied as it is */
    HA_DROP,          /* not forwarded, not re-sent */
    HA_REPLACE,       /* tollgate's own value (or none) instead */
    HA_FRAMING,       /* Content-Length: from the parsed framing */
    HA_APPEND         /* X-Forwarded-For: trusted values + the peer */
};

typedef struct hdr_rule {
    const char     *name;     /* lower case */
    unsigned char   len;      /* strlen(name) */
    unsigned char   prefix;   /* matches longer names starting with name */
    unsigned char   up;       /* action on the request head (to upstream) */
    unsigned char   down;     /* action on the response head (to client) */
} hdr_rule;

#define RULE(lit, pre, up, down) { lit, sizeof(lit) - 1, pre, up, down }

/* First match wins (X-Forwarded-For before the X-Forwarded- prefix).  The
 * hop-by-hop names are those of tg_http_is_hop_by_hop. */
static const hdr_rule rules[] = {
    RULE("content-length",      0, HA_FRAMING, HA_FRAMING),
    RULE("connection",          0, HA_DROP,    HA_DROP),
    RULE("keep-alive",          0, HA_DROP,    HA_DROP),
    RULE("proxy-connection",    0, HA_DROP,    HA_DROP),
    RULE("te",                  0, HA_DROP,    HA_DROP),
    RULE("trailer",             0, HA_DROP,    HA_DROP),
    RULE("transfer-encoding",   0, HA_DROP,    HA_DROP),
    RULE("upgrade",             0, HA_DROP,    HA_DROP),
    RULE("expect",              0, HA_DROP,    HA_DROP),
    RULE("proxy-authorization", 0, HA_DROP,    HA_DROP),
    RULE("host",                0, HA_REPLACE, HA_PASS),
    RULE("x-forwarded-for",     0, HA_APPEND,  HA_PASS),
    /* who the client and consumer are and how they came in is said by
     * tollgate alone */
    RULE("x-forwarded-",        1, HA_REPLACE, HA_PASS),
    RULE("x-consumer-",         1, HA_REPLACE, HA_PASS),
    RULE("forwarded",           0, HA_REPLACE, HA_PASS),
    RULE("x-real-ip",           0, HA_REPLACE, HA_PASS),
    RULE("x-request-id",        0, HA_REPLACE, HA_REPLACE),
};

#define XFF_MAX 8             /* X-Forwarded-For headers kept from a trusted proxy */
#define BY_LETTER_MAX 6       /* rules sharing a first letter, at most */

/* The rules by the first letter of their name (every name begins with a
 * lower-case letter), in table order: rule_find looks at a letter's few
 * only.  Built once at load, read-only after. */
static unsigned char by_letter[26][BY_LETTER_MAX];
static unsigned char n_by_letter[26];

__attribute__((constructor)) static void
rules_index(void)
{
    size_t i;

    for (i = 0; i < TG_ARRAY_LEN(rules); i++) {
        unsigned l = (unsigned)(rules[i].name[0] - 'a');
        if (l >= 26 || n_by_letter[l] == BY_LETTER_MAX) {
            abort();                  /* a rule table this index cannot hold */
        }
        by_letter[l][n_by_letter[l]++] = (unsigned char)i;
    }
}

static const hdr_rule *rule_find(const char *name, size_t len);
static int has_connection(const tg_http_hdr *hdr, size_t n);
static int put_num(char *out, unsigned long long v);

#define HB_LIT(b, lit) tg_hbuf_add((b), (lit), sizeof(lit) - 1)

/* ---- public ----------------------------------------------------------- */

void
tg_hbuf_grow(tg_hbuf *b, size_t n)
{
    size_t cap = (b->len + n) * 2;
    char *q = tg_xmalloc(cap);

    memcpy(q, b->p, b->len);
    if (b->p != b->stack) {
        free(b->p);
    }
    b->p = q;
    b->cap = cap;
}

/* The request head for the upstream: the normalised target, the client's
 * end-to-end headers, then ours.  X-Forwarded-For is the peer address,
 * appended to the client's own only when the peer is a trusted proxy. */
void
tg_headers_request(tg_hbuf *hb, const tg_http_req *r, const tg_headers_up *f)
{
    const tg_http_hdr *h;
    const tg_http_hdr *xff[XFF_MAX];
    const hdr_rule *rule;
    size_t nxff = 0, i;
    char num[48];                 /* "\r\nContent-Length: " + 20 digits */
    int had_cl = 0, conn = has_connection(r->hdr, r->nhdr);

    tg_hbuf_add(hb, r->method, r->method_len);
    HB_LIT(hb, " ");
    tg_hbuf_add(hb, r->path, r->path_len);
    HB_LIT(hb, " HTTP/1.1\r\nHost: ");
    tg_hbuf_add(hb, r->host, r->host_len);
    HB_LIT(hb, "\r\n");
    for (i = 0; i < r->nhdr; i++) {
        h = &r->hdr[i];
        rule = rule_find(h->name, h->name_len);
        if (rule != NULL) {
            switch (rule->up) {
            case HA_FRAMING:
                had_cl = 1;
                continue;
            case HA_APPEND:
                if (nxff < XFF_MAX && tg_cidr_match(f->trusted, f->ntrusted, f->ip)) {
                    xff[nxff++] = h;
                }
                continue;
            case HA_PASS:
                break;
            default:
                continue;
            }
        }
        if ((f->strip != NULL && f->strip(f->strip_arg, r, h))
            || (conn && tg_http_connection_lists(r->hdr, r->nhdr, h->name, h->name_len))) {
            continue;
        }
        tg_hbuf_add(hb, h->name, h->name_len);
        HB_LIT(hb, ": ");
        tg_hbuf_add(hb, h->value, h->value_len);
        HB_LIT(hb, "\r\n");
    }
    HB_LIT(hb, "X-Forwarded-For: ");
    for (i = 0; i < nxff; i++) {
        tg_hbuf_add(hb, xff[i]->value, xff[i]->value_len);
        HB_LIT(hb, ", ");
    }
    tg_hbuf_add(hb, f->ip, strlen(f->ip));
    if (f->tls) {
        HB_LIT(hb, "\r\nX-Forwarded-Proto: https\r\nX-Request-ID: ");
    } else {
        HB_LIT(hb, "\r\nX-Forwarded-Proto: http\r\nX-Request-ID: ");
    }
    tg_hbuf_add(hb, f->reqid, f->reqid_len);
    if (f->consumer[0] != '\0') {
        HB_LIT(hb, "\r\nX-Consumer-ID: ");
        tg_hbuf_add(hb, f->consumer, strlen(f->consumer));
        HB_LIT(hb, "\r\nX-Consumer-Tier: ");
        tg_hbuf_add(hb, f->tier, strlen(f->tier));
    }
    if (r->body == TG_BODY_LENGTH) {
        tg_hbuf_add(hb, num, tg_fmt(num, sizeof(num), "\r\nContent-Length: %llu",
                                    (unsigned long long)r->content_length));
    } else if (r->body == TG_BODY_CHUNKED) {
        HB_LIT(hb, "\r\nTransfer-Encoding: chunked");
    } else if (had_cl) {
        HB_LIT(hb, "\r\nContent-Length: 0");   /* an empty POST stays framed */
    }
    HB_LIT(hb, "\r\n\r\n");
}

unsigned
tg_headers_response(tg_hbuf *hb, const tg_http_resp *rs, const tg_headers_down *f)
{
    const tg_http_hdr *h;
    const hdr_rule *rule;
    char line[64];
    size_t i;
    int n, conn = has_connection(rs->hdr, rs->nhdr);
    unsigned out = f->close_after ? TG_HEADERS_CLOSE : 0;

    HB_LIT(hb, "HTTP/1.1 ");
    n = put_num(line, (unsigned long long)rs->status);  /* 100..999: parsed */
    line[n++] = ' ';
    tg_hbuf_add(hb, line, (size_t)n);
    tg_hbuf_add(hb, rs->reason, rs->reason_len);
    HB_LIT(hb, "\r\n");
    for (i = 0; i < rs->nhdr; i++) {
        h = &rs->hdr[i];
        rule = rule_find(h->name, h->name_len);
        if (rule != NULL && rule->down == HA_FRAMING) {
            /* HEAD and 304 describe the body they do not carry. */
            if (!(rs->body == TG_BODY_NONE && (f->is_head || rs->status == 304))) {
                continue;
            }
        } else if ((rule != NULL && rule->down != HA_PASS)
                   || (conn && tg_http_connection_lists(rs->hdr, rs->nhdr,
                                                        h->name, h->name_len))) {
            continue;
        }
        tg_hbuf_add(hb, h->name, h->name_len);
        HB_LIT(hb, ": ");
        tg_hbuf_add(hb, h->value, h->value_len);
        HB_LIT(hb, "\r\n");
    }
    HB_LIT(hb, "X-Request-ID: ");
    tg_hbuf_add(hb, f->reqid, f->reqid_len);
    HB_LIT(hb, "\r\n");
    tg_hbuf_add(hb, f->extra, f->extra_len);

    if (rs->body == TG_BODY_NONE) {
        /* An empty body the client cannot see the end of, unless told. */
        if (!f->is_head && rs->status != 204 && rs->status != 304) {
            HB_LIT(hb, "Content-Length: 0\r\n");
        }
    } else if (rs->body == TG_BODY_LENGTH) {
        HB_LIT(hb, "Content-Length: ");
        n = put_num(line, (unsigned long long)rs->content_length);
        line[n++] = '\r';
        line[n++] = '\n';
        tg_hbuf_add(hb, line, (size_t)n);
    } else if (rs->body == TG_BODY_CHUNKED || rs->body == TG_BODY_CLOSE) {
        if (f->minor >= 1) {
            out |= TG_HEADERS_CHUNKED;
            HB_LIT(hb, "Transfer-Encoding: chunked\r\n");
        } else {
            out |= TG_HEADERS_CLOSE;     /* HTTP/1.0: the body ends at close */
        }
    }
    if (!f->rq_done) {
        out |= TG_HEADERS_CLOSE;         /* the rest of the body is not read */
    }
    if (out & TG_HEADERS_CLOSE) {
        HB_LIT(hb, "Connection: close\r\n\r\n");
    } else if (f->minor == 0) {
        HB_LIT(hb, "Connection: keep-alive\r\n\r\n");
    } else {
        HB_LIT(hb, "\r\n");
    }
    return out;
}

/* ---- helpers ---------------------------------------------------------- */

/* The rule of header name[0..len), or NULL (PASS both ways).  A prefix
 * rule takes only names longer than its prefix. */
static const hdr_rule *
rule_find(const char *name, size_t len)
{
    unsigned l, k;

    if (len == 0) {
        return NULL;
    }
    /* |0x20 folds an upper-case letter onto its lower case; any byte that
     * is not a letter lands outside 'a'..'z' or on a letter no rule
     * begins with, or fails the full comparison */
    l = (unsigned)(((unsigned char)name[0] | 0x20) - 'a');
    if (l >= 26) {
        return NULL;
    }
    for (k = 0; k < n_by_letter[l]; k++) {
        const hdr_rule *ru = &rules[by_letter[l][k]];
        if (ru->prefix ? len > ru->len : len == ru->len) {
            if (tg_http_name_eq(name, ru->len, ru->name, ru->len)) {
                return ru;
            }
        }
    }
    return NULL;
}

/* 1 if any header is a Connection header (then its tokens name more
 * hop-by-hop headers); lets the common case skip the per-header scan. */
static int
has_connection(const tg_http_hdr *hdr, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (hdr[i].name_len == 10 && tg_http_name_is(hdr[i].name, 10, "connection")) {
            return 1;
        }
    }
    return 0;
}

/* v in decimal at out (at most 20 digits, no NUL), its length: the
 * response head's numbers without the formatter, once per response. */
static int
put_num(char *out, unsigned long long v)
{
    char d[20];
    int n = 0, i = 0;

    do {
        d[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v != 0);
    while (n > 0) {
        out[i++] = d[--n];
    }
    return i;
}
