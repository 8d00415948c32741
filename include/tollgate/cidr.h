/*
 * cidr.h - IPv4 and IPv6 address ranges ("10.0.0.0/8", "2001:db8::/32"),
 * for http.trusted_proxies.  Pure functions: no allocation, no I/O.
 */
#ifndef TOLLGATE_CIDR_H
#define TOLLGATE_CIDR_H

#include <stddef.h>
#include <stdint.h>

#include "tollgate/common.h"

typedef struct tg_cidr {
    int      family;              /* AF_INET or AF_INET6 */
    uint8_t  addr[16];            /* the network: 4 or 16 bytes, host bits 0 */
    unsigned bits;                /* prefix length: 0..32 or 0..128 */
} tg_cidr;

/*
 * Parse "ADDR/BITS" or a bare "ADDR" (one host) into *out.  Host bits set
 * ("10.0.0.1/8") are an error, so a typo cannot widen a range silently.
 * Returns TG_OK, or TG_ERR with *error set to a static text.
 */
tg_rc tg_cidr_parse(const char *s, tg_cidr *out, const char **error);

/*
 * 1 if the address ip (text, as inet_ntop writes it) lies in one of
 * list[0..n).  An IPv4-mapped IPv6 address ("::ffff:10.1.2.3") is
 * matched as the IPv4 address.  0 for text that is no address.
 */
int tg_cidr_match(const tg_cidr *list, size_t n, const char *ip);

#endif
