/*
 * test_cidr.c - unit tests of src/cidr.c: parsing address ranges and
 * matching peer addresses (http.trusted_proxies).
 */
#include <criterion/criterion.h>

#include <sys/socket.h>

#include "tollgate/cidr.h"

static tg_cidr list[8];
static size_t nlist;

static void
add(const char *s)
{
    const char *err = NULL;

    cr_assert_eq(tg_cidr_parse(s, &list[nlist], &err), TG_OK, "%s: %s", s, err ? err : "");
    nlist++;
}

static const char *
bad(const char *s)
{
    tg_cidr c;
    const char *err = NULL;

    cr_assert_eq(tg_cidr_parse(s, &c, &err), TG_ERR, "%s accepted", s);
    cr_assert_not_null(err);
    return err;
}

Test(cidr, parse)
{
    tg_cidr c;
    const char *err;

    cr_assert_eq(tg_cidr_parse("10.0.0.0/8", &c, &err), TG_OK);
    cr_expect_eq(c.family, AF_INET);
    cr_expect_eq(c.bits, 8);
    cr_assert_eq(tg_cidr_parse("2001:db8::/32", &c, &err), TG_OK);
    cr_expect_eq(c.family, AF_INET6);
    cr_expect_eq(c.bits, 32);
    cr_assert_eq(tg_cidr_parse("127.0.0.1", &c, &err), TG_OK);
    cr_expect_eq(c.bits, 32);
    cr_assert_eq(tg_cidr_parse("::1", &c, &err), TG_OK);
    cr_expect_eq(c.bits, 128);
    cr_assert_eq(tg_cidr_parse("0.0.0.0/0", &c, &err), TG_OK);
    cr_assert_eq(tg_cidr_parse("10.1.2.0/23", &c, &err), TG_OK);

    cr_expect_str_eq(bad("10.0.0.1/8"),
                     "host bits set after the prefix (write the network address)");
    cr_expect_str_eq(bad("10.1.3.0/23"),
                     "host bits set after the prefix (write the network address)");
    cr_expect_str_eq(bad("10.0.0.0/33"), "prefix length must be 0..32");
    cr_expect_str_eq(bad("::/129"), "prefix length must be 0..128");
    cr_expect_str_eq(bad("10.0.0.0/"), "prefix length must be a number");
    cr_expect_str_eq(bad("10.0.0.0/-1"), "prefix length must be a number");
    cr_expect_str_eq(bad("10.0.0.0/8x"), "prefix length must be 0..32");
    cr_expect_str_eq(bad("localhost"), "not an IPv4 or IPv6 address");
    cr_expect_str_eq(bad("10.0.0"), "not an IPv4 or IPv6 address");
    cr_expect_str_eq(bad(""), "expected an address or ADDRESS/BITS");
    cr_expect_str_eq(bad("/8"), "expected an address or ADDRESS/BITS");
}

Test(cidr, match)
{
    nlist = 0;
    cr_expect(!tg_cidr_match(list, 0, "127.0.0.1"));
    add("10.0.0.0/8");
    add("192.168.1.7");
    add("172.16.0.0/12");
    add("fd00::/8");
    add("::1");
    cr_expect(tg_cidr_match(list, nlist, "10.200.3.4"));
    cr_expect(!tg_cidr_match(list, nlist, "11.0.0.1"));
    cr_expect(tg_cidr_match(list, nlist, "192.168.1.7"));
    cr_expect(!tg_cidr_match(list, nlist, "192.168.1.8"));
    cr_expect(tg_cidr_match(list, nlist, "172.31.255.255"));
    cr_expect(!tg_cidr_match(list, nlist, "172.32.0.0"));
    cr_expect(tg_cidr_match(list, nlist, "fd12:3456::1"));
    cr_expect(!tg_cidr_match(list, nlist, "fe80::1"));
    cr_expect(tg_cidr_match(list, nlist, "::1"));
    cr_expect(!tg_cidr_match(list, nlist, "::2"));
    /* an IPv4-mapped peer of a dual-stack listener is its IPv4 address */
    cr_expect(tg_cidr_match(list, nlist, "::ffff:10.1.1.1"));
    cr_expect(!tg_cidr_match(list, nlist, "::ffff:11.1.1.1"));
    cr_expect(!tg_cidr_match(list, nlist, "unknown"));
    nlist = 0;
    add("0.0.0.0/0");
    cr_expect(tg_cidr_match(list, nlist, "1.2.3.4"));
    cr_expect(!tg_cidr_match(list, nlist, "::1"));
}
