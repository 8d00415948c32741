/*
 * cidr.c - IPv4 and IPv6 address ranges (see cidr.h).
 */
#include "tollgate/cidr.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static int cidr_in(const tg_cidr *c, int family, const uint8_t *a);

/* ---- public functions ---------------------------------------------------- */

tg_rc
tg_cidr_parse(const char *s, tg_cidr *out, const char **error)
{
    char host[INET6_ADDRSTRLEN];
    const char *slash = strchr(s, '/');
    size_t hlen = slash ? (size_t)(slash - s) : strlen(s), i, alen;
    unsigned long bits;
    char *end;

    memset(out, 0, sizeof(*out));
    if (hlen == 0 || hlen >= sizeof(host)) {
        *error = "expected an address or ADDRESS/BITS";
        return TG_ERR;
    }
    memcpy(host, s, hlen);
    host[hlen] = '\0';
    if (inet_pton(AF_INET, host, out->addr) == 1) {
        out->family = AF_INET;
        alen = 4;
    } else if (inet_pton(AF_INET6, host, out->addr) == 1) {
        out->family = AF_INET6;
        alen = 16;
    } else {
        *error = "not an IPv4 or IPv6 address";
        return TG_ERR;
    }
    bits = alen * 8;
    if (slash != NULL) {
        if (slash[1] < '0' || slash[1] > '9') {
            *error = "prefix length must be a number";
            return TG_ERR;
        }
        bits = strtoul(slash + 1, &end, 10);
        if (*end != '\0' || bits > alen * 8) {
            *error = alen == 4 ? "prefix length must be 0..32" : "prefix length must be 0..128";
            return TG_ERR;
        }
    }
    out->bits = (unsigned)bits;
    for (i = 0; i < alen; i++) {
        unsigned keep = bits >= (i + 1) * 8 ? 8 : bits > i * 8 ? (unsigned)(bits - i * 8) : 0;
        uint8_t mask = (uint8_t)(keep == 0 ? 0 : 0xff << (8 - keep));
        if (out->addr[i] & ~mask) {
            *error = "host bits set after the prefix (write the network address)";
            return TG_ERR;
        }
    }
    return TG_OK;
}

int
tg_cidr_match(const tg_cidr *list, size_t n, const char *ip)
{
    static const uint8_t mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
    uint8_t a[16];
    int family;
    size_t i;

    if (n == 0) {
        return 0;
    }
    if (inet_pton(AF_INET, ip, a) == 1) {
        family = AF_INET;
    } else if (inet_pton(AF_INET6, ip, a) == 1) {
        family = AF_INET6;
        if (memcmp(a, mapped, sizeof(mapped)) == 0) {
            memmove(a, a + 12, 4);
            family = AF_INET;
        }
    } else {
        return 0;
    }
    for (i = 0; i < n; i++) {
        if (cidr_in(&list[i], family, a)) {
            return 1;
        }
    }
    return 0;
}

/* ---- static helpers ------------------------------------------------------ */

static int
cidr_in(const tg_cidr *c, int family, const uint8_t *a)
{
    unsigned full = c->bits / 8, rest = c->bits % 8;

    if (c->family != family || memcmp(c->addr, a, full) != 0) {
        return 0;
    }
    return rest == 0 || ((a[full] ^ c->addr[full]) & (uint8_t)(0xff << (8 - rest))) == 0;
}
