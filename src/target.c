/*
 * target.c - the normal form of a request target's path (RFC 3986 6.2.2).
 *
 * Why: routes are matched by tollgate, resources are chosen by the
 * application after it percent-decodes the path (uvicorn, most
 * frameworks).  If the two read a target differently, "/%6ceads" escapes
 * the "/leads" bucket.  So the path is put in one normal form, checked by
 * the route rules and forwarded as is:
 *
 *   1. bytes: pchar and "/" only; "%" must start "%" HEXDIG HEXDIG;
 *   2. escapes: unreserved characters decoded, others kept with upper-case
 *      hex; "%2F" and "%00" refused (an encoded "/" is a segment boundary
 *      to some applications and not to others; NUL truncates strings);
 *   3. "//" refused (some servers merge slashes, others do not);
 *   4. dot segments removed (RFC 3986 5.2.4), after step 2 so "%2E%2E"
 *      counts as "..".
 * Every step only shortens the text, so it runs in place with the write
 * position never ahead of the read position.
 */
#include "tollgate/target.h"

#include <string.h>

/* Byte classes. */
#define TC_UNRESERVED 0x01   /* ALPHA / DIGIT / "-" / "." / "_" / "~" */
#define TC_PCHAR      0x02   /* unreserved / sub-delims / ":" / "@" ('%' apart) */
#define TC_QUERY      0x04   /* allowed in the query: VCHAR but "#" */

static int target_hex(unsigned char ch);
static int target_class(unsigned char ch);
static size_t target_remove_dots(char *t, size_t n);

/* ---- public functions ---------------------------------------------------- */

tg_rc
tg_target_normalize(char *t, size_t *len, const char **error)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = *len, q, r, w, i;

    if (n == 0 || t[0] != '/') {
        *error = "request target must start with \"/\"";
        return TG_ERR;
    }
    for (q = 0; q < n && t[q] != '?'; q++) {
        /* the path ends at the first "?" */
    }
    for (i = q; i < n; i++) {
        if (!(target_class((unsigned char)t[i]) & TC_QUERY)) {
            *error = t[i] == '#' ? "fragment in request target"
                                 : "invalid character in query";
            return TG_ERR;
        }
    }

    /* steps 1-3: one pass, decoding into t[0..w) */
    for (r = 0, w = 0; r < q; w++) {
        unsigned char ch = (unsigned char)t[r];

        if (ch == '%') {
            int hi = r + 2 < q ? target_hex((unsigned char)t[r + 1]) : -1;
            int lo = r + 2 < q ? target_hex((unsigned char)t[r + 2]) : -1;

            if (hi < 0 || lo < 0) {
                *error = "bad percent escape in path";
                return TG_ERR;
            }
            ch = (unsigned char)(hi << 4 | lo);
            r += 3;
            if (ch == '\0') {
                *error = "encoded NUL (%00) in path";
                return TG_ERR;
            }
            if (ch == '/') {
                *error = "encoded slash (%2F) in path";
                return TG_ERR;
            }
            if (!(target_class(ch) & TC_UNRESERVED)) {
                t[w++] = '%';
                t[w++] = hex[ch >> 4];
                ch = (unsigned char)hex[ch & 0xf];
            }
        } else if (ch == '/') {
            if (w > 0 && t[w - 1] == '/') {
                *error = "empty path segment (//) in path";
                return TG_ERR;
            }
            r++;
        } else if (target_class(ch) & TC_PCHAR) {
            r++;
        } else {
            *error = ch == '#' ? "fragment in request target"
                               : "invalid character in path";
            return TG_ERR;
        }
        t[w] = (char)ch;
    }

    /* step 4, then the query moves up behind the path */
    w = target_remove_dots(t, w);
    memmove(t + w, t + q, n - q);
    *len = w + (n - q);
    return TG_OK;
}

int
tg_target_match_prefix(const char *t, size_t len, const char *prefix)
{
    size_t i = 0;
    const char *p;
    int hi, lo;

    for (p = prefix; *p != '\0'; p++) {
        if (i < len && t[i] == '?') {
            return 0;                       /* the path ended */
        }
        if (i + 2 < len && t[i] == '%'
            && (hi = target_hex((unsigned char)t[i + 1])) >= 0
            && (lo = target_hex((unsigned char)t[i + 2])) >= 0) {
            if ((unsigned char)*p != (unsigned char)(hi << 4 | lo)) {
                return 0;
            }
            i += 3;
        } else if (i < len && t[i] == *p) {
            i++;
        } else {
            return 0;
        }
    }
    return p == prefix || p[-1] == '/' || i == len || t[i] == '/' || t[i] == '?';
}

tg_rc
tg_target_route_path(const char *s, char *out, size_t size, const char **error)
{
    size_t n = strlen(s), r, w;

    if (n >= size) {
        *error = "path too long";
        return TG_ERR;
    }
    if (strchr(s, '?') != NULL) {
        *error = "a route path has no query (\"?\")";
        return TG_ERR;
    }
    memcpy(out, s, n);
    if (tg_target_normalize(out, &n, error) != TG_OK) {
        return TG_ERR;
    }
    for (r = 0, w = 0; r < n; w++) {
        if (out[r] == '%') {          /* well-formed: normalize checked it */
            out[w] = (char)(target_hex((unsigned char)out[r + 1]) << 4
                            | target_hex((unsigned char)out[r + 2]));
            r += 3;
        } else {
            out[w] = out[r++];
        }
    }
    out[w] = '\0';
    return TG_OK;
}

/* ---- static helpers ------------------------------------------------------ */

static int
target_hex(unsigned char ch)
{
    if (ch >= '0' && ch <= '9') {
        return ch - '0';
    }
    if (ch >= 'a' && ch <= 'f') {
        return ch - 'a' + 10;
    }
    if (ch >= 'A' && ch <= 'F') {
        return ch - 'A' + 10;
    }
    return -1;
}

static int
target_class(unsigned char ch)
{
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
        || (ch >= '0' && ch <= '9') || ch == '-' || ch == '.' || ch == '_'
        || ch == '~') {
        return TC_UNRESERVED | TC_PCHAR | TC_QUERY;
    }
    if (strchr("!$&'()*+,;=:@", ch) != NULL && ch != '\0') {
        return TC_PCHAR | TC_QUERY;
    }
    return ch > 0x20 && ch < 0x7f && ch != '#' ? TC_QUERY : 0;
}

/*
 * Remove dot segments from the absolute path t[0..n) (no "//" in it), in
 * place; returns the new length.  Each segment "/seg" is copied down,
 * "/." dropped, "/.." drops the last segment copied; a dot segment at the
 * end leaves a trailing "/" ("/a/b/.." -> "/a/").
 */
static size_t
target_remove_dots(char *t, size_t n)
{
    size_t i = 0, j, out = 0, seg;

    while (i < n) {
        for (j = i + 1; j < n && t[j] != '/'; j++) {
            /* t[i] is '/', t[i+1..j) the segment */
        }
        seg = j - i - 1;
        if (seg == 1 && t[i + 1] == '.') {
            /* drop */
        } else if (seg == 2 && t[i + 1] == '.' && t[i + 2] == '.') {
            while (out > 0 && t[--out] != '/') {
                /* back to the start of the last segment */
            }
        } else {
            memmove(t + out, t + i, j - i);
            out += j - i;
            i = j;
            continue;
        }
        if (j == n) {
            t[out++] = '/';
        }
        i = j;
    }
    return out;
}
