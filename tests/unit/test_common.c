/*
 * test_common.c - unit tests of src/common.c: tg_fmt's length contract,
 * the allocation wrappers, the log line (level filter, one line, cut at
 * its buffer) and the monotonic clocks.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tollgate/common.h"

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
