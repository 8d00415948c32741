/*
 * fuzz_target.c - libFuzzer target for src/target.c (request-target
 * normal form).  Built by meson with -Dfuzz=true (CC=clang), run by
 * scripts/fuzz; by hand:
 *
 *   CC=clang meson setup build-fuzz -Dfuzz=true && meson compile -C build-fuzz fuzz_target
 *   build-fuzz/tests/fuzz/fuzz_target
 *
 * Besides memory errors it checks the properties routing relies on:
 *  - the normal form is never longer, starts with "/", and is a fixed
 *    point (normalising it again changes nothing);
 *  - its path has no "//", no dot segment, no escape of an unreserved
 *    character, no lower-case hex digit in an escape, only pchar and "/";
 *  - the query (from the first "?") is kept byte for byte;
 *  - a route prefix made from the input matches without reading past the
 *    target, and a normalised target always matches its own route form.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tollgate/target.h"

static int
fz_unreserved(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z')
           || (ch >= '0' && ch <= '9') || ch == '-' || ch == '.' || ch == '_' || ch == '~';
}

static int
fz_hexval(unsigned char ch)
{
    return ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
}

/* Abort unless t[0..n) is in normal form. */
static void
fz_check_normal(const char *t, size_t n)
{
    size_t q, i;

    if (n == 0 || t[0] != '/') {
        abort();
    }
    for (q = 0; q < n && t[q] != '?'; q++) {
        /* path end */
    }
    for (i = 0; i < q; i++) {
        unsigned char ch = (unsigned char)t[i];
        if (ch == '%') {
            int hi, lo;
            if (i + 2 >= q || (hi = fz_hexval((unsigned char)t[i + 1])) < 0
                || (lo = fz_hexval((unsigned char)t[i + 2])) < 0
                || fz_unreserved((unsigned char)(hi << 4 | lo)) || (hi == 0 && lo == 0)
                || (hi == 2 && lo == 15)) {
                abort();
            }
            i += 2;
        } else if (ch == '/') {
            size_t j;
            for (j = i + 1; j < q && t[j] != '/'; j++) {
                /* segment end */
            }
            if (j == i + 1 && j < q) {
                abort();                            /* "//" */
            }
            if ((j - i - 1 == 1 && t[i + 1] == '.')
                || (j - i - 1 == 2 && t[i + 1] == '.' && t[i + 2] == '.')) {
                abort();                            /* dot segment */
            }
        } else if (!fz_unreserved(ch) && strchr("!$&'()*+,;=:@", ch) == NULL) {
            abort();
        }
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *t, *again, *route, *z;
    const char *err = NULL, *q_in, *q_out;
    size_t n = size, m, k;

    /* exact-size copies, so any read past the end is caught */
    t = malloc(size ? size : 1);
    memcpy(t, data, size);
    q_in = memchr(data, '?', size);
    if (tg_target_normalize(t, &n, &err) == TG_OK) {
        if (n > size || err != NULL) {
            abort();
        }
        fz_check_normal(t, n);
        q_out = memchr(t, '?', n);
        if ((q_in == NULL) != (q_out == NULL)
            || (q_in != NULL && ((size_t)(t + n - q_out) != size - (size_t)(q_in - (const char *)data)
                                 || memcmp(q_in, q_out, (size_t)(t + n - q_out)) != 0))) {
            abort();
        }
        again = malloc(n);
        memcpy(again, t, n);
        m = n;
        if (tg_target_normalize(again, &m, &err) != TG_OK || m != n
            || memcmp(again, t, n) != 0) {
            abort();
        }
        free(again);

        /* the target's own path, as a route, matches it */
        k = q_out ? (size_t)(q_out - t) : n;
        z = malloc(k + 1);
        memcpy(z, t, k);
        z[k] = '\0';
        route = malloc(k + 1);
        if (memchr(z, '\0', k) == NULL
            && (tg_target_route_path(z, route, k + 1, &err) != TG_OK
                || !tg_target_match_prefix(t, n, route))) {
            abort();
        }
        free(route);
        free(z);
    } else if (err == NULL) {
        abort();
    }

    /* the input as a route prefix against the input as a target */
    z = malloc(size + 1);
    memcpy(z, data, size);
    z[size] = '\0';
    route = malloc(size + 1);
    if (tg_target_route_path(z, route, size + 1, &err) == TG_OK) {
        (void)tg_target_match_prefix((const char *)data, size, route);
        if (strlen(route) > size) {
            abort();
        }
    }
    free(route);
    free(z);
    free(t);
    return 0;
}
