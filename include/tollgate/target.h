/*
 * target.h - the normal form of a request target's path (RFC 3986 6.2.2).
 *
 * tollgate matches routes on the same resource the application serves, so
 * it puts every origin-form target into one normal form before routing and
 * forwards that form (DESIGN-NOTES "Request targets").  Pure functions over
 * byte buffers: no allocation, no I/O.
 */
#ifndef TOLLGATE_TARGET_H
#define TOLLGATE_TARGET_H

#include <stddef.h>

#include "tollgate/common.h"

/*
 * Normalise t[0..*len), an origin-form target ("/path" or "/path?query"),
 * in place.  The path:
 *  - may hold only pchar and "/" (RFC 3986 3.3): "#" and every other byte
 *    is an error;
 *  - every "%" starts a well-formed escape "%" HEXDIG HEXDIG;
 *  - escapes of unreserved characters are decoded, the others keep an
 *    upper-case escape; "%2F" (an encoded "/") and "%00" are errors;
 *  - "//" (an empty segment) is an error;
 *  - dot segments are removed (RFC 3986 5.2.4), "%2E" included.
 * The query (from the first "?") is kept byte for byte; it may hold any
 * visible ASCII but "#".
 * Returns TG_OK with *len set to the new length (never longer), or TG_ERR
 * with *error set to a static text; t is then partly rewritten.
 */
tg_rc tg_target_normalize(char *t, size_t *len, const char **error);

/*
 * 1 if the route prefix (from tg_target_route_path) matches
 * the normalised target t[0..len) segment-wise: prefix "/leads" matches
 * "/leads", "/leads/7" and "/leads?x", not "/leadsx"; a prefix ending in
 * "/" matches anything below it.  Escapes in t compare as the byte they
 * encode, as the application sees them after percent-decoding, so
 * "/a%3Ab" is matched by the prefix "/a:b".
 */
int tg_target_match_prefix(const char *t, size_t len, const char *prefix);

/*
 * The form a route's path prefix s (NUL-terminated, from the config) is
 * matched in: s normalised like a request target, then every remaining
 * escape decoded ("/v2/x%20y" -> "/v2/x y", "/le%61ds/./" -> "/leads/"),
 * written NUL-terminated to out[0..size).  Returns TG_OK, or TG_ERR with
 * *error set (a target normalisation error, a query, or too long).
 */
tg_rc tg_target_route_path(const char *s, char *out, size_t size, const char **error);

#endif
