/*
 * test_common.c - the small shared helpers of common.h: the growable
 * buffer (tg_buf), the ms/us -> timeval conversions, tg_fmt, the
 * identifier check (tg_name_ok), the allocation wrappers, the monotonic
 * clocks and the log line (level filter, one line, cut at its buffer).
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tollgate/common.h"

Test(tg_buf, starts_empty_and_allocates_nothing)
{
    tg_buf b = TG_BUF_INIT;

    cr_assert_null(b.p);
    cr_assert_eq(b.len, 0);
    tg_buf_free(&b);                    /* freeing an empty buffer is fine */
    cr_assert_null(b.p);
}

Test(tg_buf, appends_and_stays_nul_terminated)
{
    tg_buf b = TG_BUF_INIT;

    tg_buf_add(&b, "ab", 2);
    tg_buf_str(&b, "cd");
    tg_buf_printf(&b, "-%d-%s", 42, "x");
    cr_assert_str_eq(b.p, "abcd-42-x");
    cr_assert_eq(b.len, strlen("abcd-42-x"));
    cr_assert_gt(b.cap, b.len);
    tg_buf_add(&b, "", 0);              /* nothing: still terminated */
    cr_assert_str_eq(b.p, "abcd-42-x");
    tg_buf_free(&b);
    cr_assert_null(b.p);
    cr_assert_eq(b.len, 0);
    cr_assert_eq(b.cap, 0);
}

Test(tg_buf, an_empty_printf_adds_nothing)
{
    tg_buf b = TG_BUF_INIT;

    tg_buf_printf(&b, "%s", "");
    cr_assert_eq(b.len, 0);
    tg_buf_str(&b, "a");
    tg_buf_printf(&b, "%s", "");
    cr_assert_str_eq(b.p, "a");
    tg_buf_free(&b);
}

Test(tg_buf, grows_past_many_doublings_with_every_byte_kept)
{
    tg_buf b = TG_BUF_INIT;
    char line[32];
    size_t i, want = 0;

    for (i = 0; i < 100000; i++) {
        int n = snprintf(line, sizeof(line), "%zu,", i);
        tg_buf_add(&b, line, (size_t)n);
        want += (size_t)n;
    }
    cr_assert_eq(b.len, want);
    cr_assert_eq(strlen(b.p), want);
    cr_assert(strncmp(b.p, "0,1,2,", 6) == 0);
    cr_assert(strcmp(b.p + want - 6, "99999,") == 0);
    tg_buf_free(&b);
}

Test(tg_buf, reserve_gives_room_without_changing_the_content)
{
    tg_buf b = TG_BUF_INIT;
    char *p;

    tg_buf_str(&b, "keep");
    tg_buf_reserve(&b, 10000);
    cr_assert_geq(b.cap, b.len + 10000 + 1);
    cr_assert_str_eq(b.p, "keep");
    p = b.p;
    tg_buf_add(&b, "0123456789", 10);   /* fits: no move */
    cr_assert_eq(b.p, p);
    tg_buf_free(&b);
}

Test(tg_buf, reset_keeps_the_memory)
{
    tg_buf b = TG_BUF_INIT;
    size_t cap;

    tg_buf_str(&b, "something long enough");
    cap = b.cap;
    tg_buf_reset(&b);
    cr_assert_eq(b.len, 0);
    cr_assert_str_eq(b.p, "");
    cr_assert_eq(b.cap, cap);
    tg_buf_str(&b, "new");
    cr_assert_str_eq(b.p, "new");
    tg_buf_free(&b);
}

Test(tg_buf, binary_bytes_are_kept)
{
    tg_buf b = TG_BUF_INIT;

    tg_buf_add(&b, "a\0b", 3);
    cr_assert_eq(b.len, 3);
    cr_assert(memcmp(b.p, "a\0b", 4) == 0);
    tg_buf_free(&b);
}

Test(tg_time, ms_and_us_to_timeval)
{
    struct timeval tv;

    tv = tg_ms_tv(0);
    cr_assert(tv.tv_sec == 0 && tv.tv_usec == 0);
    tv = tg_ms_tv(999);
    cr_assert(tv.tv_sec == 0 && tv.tv_usec == 999000);
    tv = tg_ms_tv(1500);
    cr_assert(tv.tv_sec == 1 && tv.tv_usec == 500000);
    tv = tg_ms_tv(86400000ull * 365);
    cr_assert(tv.tv_sec == 86400 * 365 && tv.tv_usec == 0);
    tv = tg_us_tv(2500001);
    cr_assert(tv.tv_sec == 2 && tv.tv_usec == 500001);
}

Test(tg_fmt, cuts_and_returns_the_length_really_written)
{
    char buf[8];

    cr_assert_eq(tg_fmt(buf, sizeof(buf), "%s", "abc"), 3);
    cr_assert_str_eq(buf, "abc");
    cr_assert_eq(tg_fmt(buf, sizeof(buf), "%s", "0123456789"), 7);
    cr_assert_str_eq(buf, "0123456");
}

Test(tg_name, tier_and_route_names)
{
    char longest[TG_TIER_MAX + 2];

    cr_assert(tg_name_ok(TG_NAME_TIER, "pro", 3));
    cr_assert(tg_name_ok(TG_NAME_TIER, "free_tier-2", 11));
    cr_assert_not(tg_name_ok(TG_NAME_TIER, "", 0));
    cr_assert_not(tg_name_ok(TG_NAME_TIER, "Pro", 3));        /* upper case */
    cr_assert_not(tg_name_ok(TG_NAME_TIER, "a.b", 3));
    cr_assert_not(tg_name_ok(TG_NAME_TIER, "a b", 3));
    cr_assert_not(tg_name_ok(TG_NAME_TIER, "caf\xc3\xa9", 5));
    memset(longest, 'a', sizeof(longest));
    cr_assert(tg_name_ok(TG_NAME_TIER, longest, TG_TIER_MAX));
    cr_assert_not(tg_name_ok(TG_NAME_TIER, longest, TG_TIER_MAX + 1));
}

Test(tg_name, consumer_ids)
{
    char longest[TG_KEY_ID_MAX + 2];

    cr_assert(tg_name_ok(TG_NAME_ID, "Acme.Corp_1-x", 13));
    cr_assert_not(tg_name_ok(TG_NAME_ID, "", 0));
    cr_assert_not(tg_name_ok(TG_NAME_ID, "a:b", 3));
    cr_assert_not(tg_name_ok(TG_NAME_ID, "a/b", 3));
    cr_assert(tg_name_char(TG_NAME_ID, 'Z') && !tg_name_char(TG_NAME_TIER, 'Z'));
    cr_assert(tg_name_char(TG_NAME_ID, '.') && !tg_name_char(TG_NAME_TIER, '.'));
    cr_assert_not(tg_name_char(TG_NAME_ID, 0x80));
    memset(longest, 'A', sizeof(longest));
    cr_assert(tg_name_ok(TG_NAME_ID, longest, TG_KEY_ID_MAX));
    cr_assert_not(tg_name_ok(TG_NAME_ID, longest, TG_KEY_ID_MAX + 1));
}

/* ------------------------------------------------------------------ */
/* allocation, clocks, the log line                                    */

Test(common, fmt_returns_what_is_in_the_buffer)
{
    char buf[8];

    cr_expect_eq(tg_fmt(buf, sizeof(buf), "%d", 1234), 4u);
    cr_expect_str_eq(buf, "1234");
    cr_expect_eq(tg_fmt(buf, sizeof(buf), "%s", "exactly"), 7u);
    cr_expect_str_eq(buf, "exactly");
    /* cut: the length is what fits, never what would have been */
    cr_expect_eq(tg_fmt(buf, sizeof(buf), "%s", "much too long"), 7u);
    cr_expect_str_eq(buf, "much to");
    cr_expect_eq(tg_fmt(buf, 1, "%s", "x"), 0u);
    cr_expect_str_eq(buf, "");
    cr_expect_eq(tg_fmt(buf, sizeof(buf), "%s", ""), 0u);
}

Test(common, alloc_wrappers)
{
    char *s = tg_xstrndup("abcdef", 3), *z;
    unsigned char *c = tg_xcalloc(16, 4);
    void *p0 = tg_xmalloc(0);

    cr_expect_str_eq(s, "abc");
    z = tg_xstrdup("");
    cr_expect_str_eq(z, "");
    for (size_t i = 0; i < 64; i++) {
        cr_assert_eq(c[i], 0);
    }
    c = tg_xrealloc(c, 4096);
    c[4095] = 1;
    cr_expect_not_null(p0, "a 0-byte allocation is a valid pointer");
    free(s);
    free(z);
    free(c);
    free(p0);
}

Test(common, xstrndup_stops_at_n_not_nul)
{
    const char bin[] = { 'a', '\0', 'b' };
    char *s = tg_xstrndup(bin, 3);

    cr_expect_eq(memcmp(s, bin, 3), 0);
    cr_expect_eq(s[3], '\0');
    free(s);
}

Test(common, clocks_are_monotonic)
{
    uint64_t us0 = tg_now_us(), ms0 = tg_now_ms(), us1, ms1;

    for (volatile int i = 0; i < 100000; i++) {
    }
    us1 = tg_now_us();
    ms1 = tg_now_ms();
    cr_expect_geq(us1, us0);
    cr_expect_geq(ms1, ms0);
    cr_expect_leq(ms0, us1 / 1000 + 1);
    cr_expect_gt(us0, 0u);
}

/* stderr into a temp file while fn runs; the file, rewound. */
static FILE *
capture_stderr(void (*fn)(void))
{
    FILE *f = tmpfile();
    int saved = dup(2);

    cr_assert_not_null(f);
    cr_assert_geq(saved, 0);
    fflush(stderr);
    cr_assert_geq(dup2(fileno(f), 2), 0);
    fn();
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    rewind(f);
    return f;
}

static void
log_levels(void)
{
    tg_log_set_level(TG_LOG_WARN);
    tg_info("hidden %d", 1);
    tg_warn("shown %d", 2);
    tg_error("also %s", "shown");
    tg_log_set_level(TG_LOG_INFO);
}

/* "YYYY-MM-DDTHH:MM:SS.mmmZ [warn] shown 2\n", below the level nothing. */
Test(common, log_level_filters_and_formats)
{
    FILE *f = capture_stderr(log_levels);
    char line[256];
    int n = 0;

    while (fgets(line, sizeof(line), f) != NULL) {
        const char *msg = strchr(line, ' ');
        cr_assert_not_null(msg, "%s", line);
        cr_expect_eq(line[4], '-');
        cr_expect_eq(line[10], 'T');
        cr_expect_eq(msg[-1], 'Z');
        cr_expect(strcmp(msg, n == 0 ? " [warn] shown 2\n" : " [error] also shown\n") == 0,
                  "line %d: %s", n, line);
        n++;
    }
    cr_expect_eq(n, 2);
    fclose(f);
}

static void
log_long(void)
{
    char big[4096];

    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    tg_error("%s", big);
    tg_error("next");
}

/* A message longer than the line buffer is cut and still ends the line. */
Test(common, log_long_line_is_cut)
{
    FILE *f = capture_stderr(log_long);
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;

    n = getline(&line, &cap, f);
    cr_assert_gt(n, 0);
    cr_expect_leq((size_t)n, 1023u, "a log line is at most its buffer");
    cr_expect_eq(line[n - 1], '\n');
    cr_expect_eq(line[n - 2], 'x');
    n = getline(&line, &cap, f);
    cr_assert_gt(n, 0);
    cr_expect(strstr(line, "[error] next\n") != NULL, "%s", line);
    free(line);
    fclose(f);
}

/* The one decimal parser (ports, databases, slots): digits only, 1..10
 * of them, at most max; nothing written on refusal. */
Test(common, parse_dec)
{
    unsigned long v = 7;

    cr_expect_eq(tg_parse_dec("6379", 4, 65535, &v), TG_OK);
    cr_expect_eq(v, 6379);
    cr_expect_eq(tg_parse_dec("65535", 5, 65535, &v), TG_OK);
    cr_expect_eq(tg_parse_dec("0", 1, 15, &v), TG_OK);
    cr_expect_eq(v, 0);
    v = 7;
    cr_expect_eq(tg_parse_dec("65536", 5, 65535, &v), TG_ERR);
    cr_expect_eq(tg_parse_dec("", 0, 65535, &v), TG_ERR);
    cr_expect_eq(tg_parse_dec("-1", 2, 65535, &v), TG_ERR);
    cr_expect_eq(tg_parse_dec("12ab", 4, 65535, &v), TG_ERR);
    cr_expect_eq(tg_parse_dec(" 1", 2, 65535, &v), TG_ERR);
    cr_expect_eq(tg_parse_dec("12345678901", 11, ~0UL, &v), TG_ERR);
    cr_expect_eq(v, 7, "nothing written on refusal");
    cr_expect_eq(tg_parse_dec("163845", 3, 16383, &v), TG_OK, "only len bytes read");
    cr_expect_eq(v, 163);
}

/* Every length of decimal, and the two-digit steps' edges. */
Test(tg_u64_dec, every_length_and_the_edges)
{
    static const uint64_t v[] = {
        0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 4294967295u, 4294967296u,
        10000000000000000000u, UINT64_MAX,
    };
    char want[32], got[32];

    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        int wn = snprintf(want, sizeof(want), "%llu", (unsigned long long)v[i]);
        size_t n = tg_u64_dec(got, v[i]);
        cr_assert_eq(n, (size_t)wn, "%s: length %zu", want, n);
        cr_assert(memcmp(got, want, n) == 0, "%s: got %.*s", want, (int)n, got);
    }
    for (uint64_t x = 1, k = 1; k <= 20; k++, x *= 10) {   /* 10^k - 1 and 10^k */
        int wn = snprintf(want, sizeof(want), "%llu", (unsigned long long)(x - 1));
        cr_assert_eq(tg_u64_dec(got, x - 1), (size_t)wn);
        cr_assert(memcmp(got, want, (size_t)wn) == 0, "%s", want);
        if (k == 20) {
            break;                     /* 10^20 does not fit */
        }
        wn = snprintf(want, sizeof(want), "%llu", (unsigned long long)x);
        cr_assert_eq(tg_u64_dec(got, x), (size_t)wn);
        cr_assert(memcmp(got, want, (size_t)wn) == 0, "%s", want);
    }
}
