/*
 * test_accesslog.c - the access log against real files, pipes and threads:
 * four workers writing concurrently (every line whole, in order, none
 * lost), backpressure with a stalled writer (writes never block, the
 * oldest lines are dropped and counted exactly), the flush timer, line
 * cutting, reopen after a rename, open errors, JSON escaping, and the
 * request line (tg_alog_format) byte for byte.
 */
#include <criterion/criterion.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "tollgate/accesslog.h"
#include "tollgate/common.h"

/* ---- helpers ---------------------------------------------------------- */

static char dir[64];
static char path[128];

static void
setup(void)
{
    strcpy(dir, "/tmp/tg_alog_XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/access.log", dir);
}

static void
teardown(void)
{
    char cmd[128];

    tg_alog_test_before_write = NULL;
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "cannot remove %s\n", dir);
}

TestSuite(accesslog, .init = setup, .fini = teardown);

/* Whole file, NUL-terminated (NULL if it does not exist). */
static char *
slurp(const char *p, size_t *len)
{
    FILE *f = fopen(p, "rb");
    char *data;
    long n;

    if (f == NULL)
        return NULL;
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = tg_xmalloc((size_t)n + 1);
    if (fread(data, 1, (size_t)n, f) != (size_t)n)
        n = 0;
    data[n] = '\0';
    fclose(f);
    *len = (size_t)n;
    return data;
}

static size_t
count_lines(const char *p)
{
    size_t len, i, n = 0;
    char *d = slurp(p, &len);

    if (d == NULL)
        return 0;
    for (i = 0; i < len; i++)
        n += d[i] == '\n';
    free(d);
    return n;
}

/* Poll until the file at p holds n lines (the writer thread is async). */
static int
wait_lines(const char *p, size_t n, unsigned timeout_ms)
{
    uint64_t end = tg_now_ms() + timeout_ms;

    while (tg_now_ms() < end) {
        if (count_lines(p) == n)
            return 1;
        usleep(2000);
    }
    return count_lines(p) == n;
}

static struct tg_alog *
open_log(void)
{
    char err[256] = "";
    struct tg_alog *log = tg_alog_create(path, err, sizeof(err));

    cr_assert_not_null(log, "%s", err);
    return log;
}

static void
write_str(struct tg_alog_buf *b, const char *s)
{
    tg_alog_write(b, s, strlen(s));
}

/* ---- concurrent workers ----------------------------------------------- */

#define NTHREADS  4
#define NLINES    20000

typedef struct worker {
    struct tg_alog *log;
    int id;
    int paced;        /* give the loop 1 ms every 100 lines */
    int ok;
} worker;

static size_t
pad_len(int t, int seq)
{
    return (size_t)((seq * 7919 + t * 31) % 300);
}

static void *
worker_main(void *arg)
{
    worker *w = arg;
    struct event_base *base = event_base_new();
    const struct timeval pace = { 0, 1000 };
    struct tg_alog_buf *b;
    char line[512];
    size_t n, pad;
    int seq;

    if (base == NULL)
        return NULL;
    b = tg_alog_buf_create(w->log, base);
    for (seq = 0; seq < NLINES; seq++) {
        pad = pad_len(w->id, seq);
        n = (size_t)snprintf(line, sizeof(line), "T%d S%d L%zu ", w->id, seq, pad);
        memset(line + n, 'a' + (seq + w->id) % 26, pad);
        tg_alog_write(b, line, n + pad);
        if (w->paced && seq % 100 == 99) {
            event_base_loopexit(base, &pace);
            event_base_dispatch(base);
        } else if (seq % 64 == 0) {
            event_base_loop(base, EVLOOP_NONBLOCK);
        }
    }
    tg_alog_buf_destroy(b);
    event_base_free(base);
    w->ok = 1;
    return NULL;
}

/* Run NTHREADS workers, destroy the log, check every line of the file is
 * whole and each thread's lines are in order.  Returns the lines dropped;
 * gaps in a thread's sequence must add up to exactly that. */
static uint64_t
run_workers(int paced)
{
    struct tg_alog *log = open_log();
    pthread_t th[NTHREADS];
    worker w[NTHREADS];
    int next[NTHREADS] = { 0 };
    size_t len, total = 0, pad, i;
    uint64_t dropped, gap = 0;
    char *data, *line, *nl;
    int t, seq, off;

    for (t = 0; t < NTHREADS; t++) {
        w[t] = (worker){ .log = log, .id = t, .paced = paced, .ok = 0 };
        cr_assert_eq(pthread_create(&th[t], NULL, worker_main, &w[t]), 0);
    }
    for (t = 0; t < NTHREADS; t++) {
        pthread_join(th[t], NULL);
        cr_assert(w[t].ok, "worker %d failed", t);
    }
    dropped = tg_alog_dropped(log);
    tg_alog_destroy(log);

    data = slurp(path, &len);
    cr_assert_not_null(data);
    cr_assert_gt(len, 0);
    cr_assert_eq(data[len - 1], '\n', "file ends inside a line");
    for (line = data; line < data + len; line = nl + 1) {
        nl = memchr(line, '\n', (size_t)(data + len - line));
        *nl = '\0';
        off = -1;
        cr_assert_eq(sscanf(line, "T%d S%d L%zu %n", &t, &seq, &pad, &off), 3,
                     "corrupt line %zu: %.80s", total, line);
        cr_assert_geq(off, 0, "corrupt line %zu: %.80s", total, line);
        cr_assert(t >= 0 && t < NTHREADS, "bad thread in: %.80s", line);
        cr_assert_geq(seq, next[t], "thread %d: seq %d after %d", t, seq, next[t]);
        gap += (uint64_t)(seq - next[t]);
        cr_assert_eq(pad, pad_len(t, seq));
        cr_assert_eq(strlen(line + off), pad, "line cut or merged: %.80s", line);
        for (i = 0; i < pad; i++)
            cr_assert_eq(line[off + (int)i], 'a' + (seq + t) % 26,
                         "interleaved bytes in: %.80s", line);
        next[t] = seq + 1;
        total++;
    }
    free(data);
    for (t = 0; t < NTHREADS; t++)
        gap += (uint64_t)(NLINES - next[t]);
    cr_assert_eq(gap, dropped, "missing lines %llu, counted drops %llu",
                 (unsigned long long)gap, (unsigned long long)dropped);
    cr_assert_eq(total + dropped, (uint64_t)NTHREADS * NLINES);
    return dropped;
}

/* A busy but not flooding pace (~16 MB/s per worker): nothing is lost. */
Test(accesslog, four_workers_lines_whole_in_order_none_lost)
{
    cr_assert_eq(run_workers(1), 0, "lines dropped at a sustainable rate");
}

/* A flood that outruns the disk: drops are allowed (the oldest pending
 * lines), but every line in the file is whole and the count is exact. */
Test(accesslog, four_workers_flood_drops_are_exact)
{
    run_workers(0);
}

/* ---- backpressure ----------------------------------------------------- */

static pthread_mutex_t gate_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cv = PTHREAD_COND_INITIALIZER;
static int gate_open;
static int gate_entered;

/* The writer thread stalls here until the test opens the gate. */
static void
gate_wait(void)
{
    pthread_mutex_lock(&gate_mu);
    gate_entered = 1;
    pthread_cond_broadcast(&gate_cv);
    while (!gate_open)
        pthread_cond_wait(&gate_cv, &gate_mu);
    pthread_mutex_unlock(&gate_mu);
}

/* Wait until the writer thread sits in gate_wait (it has taken all it will
 * take from the pipe until the gate opens). */
static void
gate_wait_entered(void)
{
    pthread_mutex_lock(&gate_mu);
    while (!gate_entered)
        pthread_cond_wait(&gate_cv, &gate_mu);
    pthread_mutex_unlock(&gate_mu);
}

static void
gate_set(int open)
{
    pthread_mutex_lock(&gate_mu);
    gate_open = open;
    pthread_cond_broadcast(&gate_cv);
    pthread_mutex_unlock(&gate_mu);
}

#define BURST 100000

Test(accesslog, stalled_writer_never_blocks_and_drops_oldest_exactly)
{
    struct event_base *base = event_base_new();
    struct tg_alog *log;
    struct tg_alog_buf *b;
    uint64_t t0, elapsed, dropped;
    size_t len, lines = 0, gaps = 0;
    char line[128], *data, *p, *nl;
    long prev = -1, seq;
    int i, n;

    gate_set(0);
    gate_entered = 0;
    tg_alog_test_before_write = gate_wait;
    log = open_log();

    /* Line 0 stalls the writer: from now on the pipe only fills up. */
    b = tg_alog_buf_create(log, base);
    n = snprintf(line, sizeof(line),
                 "S%06d ........................................", 0);
    tg_alog_write(b, line, (size_t)n);
    tg_alog_buf_destroy(b);
    gate_wait_entered();

    b = tg_alog_buf_create(log, base);
    t0 = tg_now_ms();
    for (i = 1; i < BURST; i++) {
        n = snprintf(line, sizeof(line),
                     "S%06d ........................................", i);
        tg_alog_write(b, line, (size_t)n);
    }
    elapsed = tg_now_ms() - t0;
    cr_assert_lt(elapsed, 2000, "100k writes took %llu ms",
                 (unsigned long long)elapsed);

    /* ~4.8 MB against a 1 MiB buffer and a stalled pipe (up to 1 MiB
     * too, where fs.pipe-max-size allows): most are gone. */
    dropped = tg_alog_dropped(log);
    cr_assert_gt(dropped, BURST / 2);
    cr_assert_lt(dropped, BURST);

    /* The loop runs while the writer is still stalled: nothing changes. */
    event_base_loop(base, EVLOOP_NONBLOCK);
    cr_assert_eq(tg_alog_dropped(log), dropped);

    gate_set(1);
    tg_alog_buf_destroy(b);                 /* drains what is pending */
    cr_assert_eq(tg_alog_dropped(log), dropped, "lines dropped at shutdown");
    tg_alog_destroy(log);
    event_base_free(base);

    data = slurp(path, &len);
    cr_assert_not_null(data);
    for (p = data; p < data + len; p = nl + 1) {
        nl = memchr(p, '\n', (size_t)(data + len - p));
        cr_assert_not_null(nl);
        cr_assert_eq(sscanf(p, "S%ld ", &seq), 1);
        cr_assert_eq(nl - p, n, "line cut or merged");
        cr_assert_gt(seq, prev);
        if (seq != prev + 1) {
            /* The dropped lines are the oldest pending ones: one block. */
            cr_assert_eq((uint64_t)(seq - prev - 1), dropped);
            gaps++;
        }
        prev = seq;
        lines++;
    }
    free(data);
    cr_assert_eq(gaps, 1);
    cr_assert_eq(prev, BURST - 1, "the newest line must survive");
    cr_assert_eq(lines + dropped, (uint64_t)BURST);
}

/* A slow (not stalled) writer and a driven loop: the buffer waits for the
 * pipe instead of dropping, and nothing is lost. */
static void
slow_write(void)
{
    usleep(500);
}

Test(accesslog, slow_writer_with_running_loop_loses_nothing)
{
    struct event_base *base = event_base_new();
    struct tg_alog *log;
    struct tg_alog_buf *b;
    char line[64];
    int i, n;

    tg_alog_test_before_write = slow_write;
    log = open_log();
    b = tg_alog_buf_create(log, base);
    for (i = 0; i < 20000; i++) {
        n = snprintf(line, sizeof(line), "line %06d", i);
        tg_alog_write(b, line, (size_t)n);
        if (i % 100 == 0)
            event_base_loop(base, EVLOOP_NONBLOCK);
    }
    tg_alog_buf_destroy(b);
    cr_assert_eq(tg_alog_dropped(log), 0);
    tg_alog_destroy(log);
    event_base_free(base);
    cr_assert_eq(count_lines(path), 20000);
}

/* ---- flushing, cutting, reopen, errors -------------------------------- */

Test(accesslog, timer_flushes_a_lone_line)
{
    struct event_base *base = event_base_new();
    struct tg_alog *log = open_log();
    struct tg_alog_buf *b = tg_alog_buf_create(log, base);
    struct timeval tv = { 0, 250 * 1000 };

    write_str(b, "lonely");
    cr_assert_eq(count_lines(path), 0, "a short line must wait for the timer");
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
    cr_assert(wait_lines(path, 1, 2000), "the 100 ms timer did not flush");

    tg_alog_buf_destroy(b);
    tg_alog_destroy(log);
    event_base_free(base);
}

Test(accesslog, long_lines_are_cut_and_newlines_replaced)
{
    struct event_base *base = event_base_new();
    struct tg_alog *log = open_log();
    struct tg_alog_buf *b = tg_alog_buf_create(log, base);
    char *big = tg_xmalloc(3 * PIPE_BUF);
    char *data, *nl;
    size_t len, i;

    memset(big, 'x', 3 * PIPE_BUF);
    tg_alog_write(b, big, 3 * PIPE_BUF);
    write_str(b, "a\nb\n");
    tg_alog_write(b, "", 0);
    tg_alog_write(b, big, PIPE_BUF - 1);
    tg_alog_buf_destroy(b);
    tg_alog_destroy(log);
    event_base_free(base);

    data = slurp(path, &len);
    cr_assert_not_null(data);
    cr_assert_eq(len, (size_t)PIPE_BUF + 5 + 1 + PIPE_BUF);
    nl = memchr(data, '\n', len);
    cr_assert_eq(nl - data, PIPE_BUF - 1);
    for (i = 0; i < PIPE_BUF - 1; i++)
        cr_assert_eq(data[i], 'x');
    cr_assert_eq(memcmp(data + PIPE_BUF, "a b \n\n", 6), 0);
    cr_assert_eq(data[len - 1], '\n');
    free(data);
    free(big);
}

Test(accesslog, reopen_after_rename_writes_a_new_file)
{
    struct event_base *base = event_base_new();
    struct tg_alog *log = open_log();
    struct tg_alog_buf *b = tg_alog_buf_create(log, base);
    char rotated[160];
    struct stat st;
    mode_t mask;
    size_t len;
    char *data;
    int i;

    snprintf(rotated, sizeof(rotated), "%s.1", path);
    for (i = 0; i < 10; i++)
        write_str(b, "before");
    tg_alog_buf_destroy(b);             /* flushes into the pipe */
    cr_assert(wait_lines(path, 10, 2000));

    cr_assert_eq(rename(path, rotated), 0);
    tg_alog_reopen(log);
    b = tg_alog_buf_create(log, base);
    for (i = 0; i < 5; i++)
        write_str(b, "after");
    tg_alog_buf_destroy(b);
    tg_alog_destroy(log);
    event_base_free(base);

    cr_assert_eq(stat(path, &st), 0, "no new file at the original path");
    mask = umask(0);
    umask(mask);
    cr_assert_eq(st.st_mode & 0777, 0640 & ~mask);
    data = slurp(rotated, &len);
    cr_assert_not_null(data);
    cr_assert_eq(count_lines(rotated), 10);
    cr_assert_null(strstr(data, "after"));
    free(data);
    data = slurp(path, &len);
    cr_assert_not_null(data);
    cr_assert_eq(count_lines(path), 5);
    cr_assert_null(strstr(data, "before"));
    free(data);
}

Test(accesslog, create_reports_open_errors)
{
    char err[256] = "";
    char bad[160];
    char expect[256];

    snprintf(bad, sizeof(bad), "%s/no/such/dir/access.log", dir);
    cr_assert_null(tg_alog_create(bad, err, sizeof(err)));
    snprintf(expect, sizeof(expect), "access_log: cannot open %s: %s", bad,
             strerror(ENOENT));
    cr_assert_str_eq(err, expect);
}

/* ---- JSON escaping ---------------------------------------------------- */

static void
check_escape(const char *in, size_t len, size_t max, const char *want)
{
    char out[6 * 64 + 1];
    size_t n;

    cr_assert_leq(max, 64);
    n = tg_alog_json_escape(out, in, len, max);
    cr_assert_eq(n, strlen(want), "escape(%zu bytes, max %zu): got \"%s\", want \"%s\"",
                 len, max, out, want);
    cr_assert_str_eq(out, want);
}

#define ESC(s, want) check_escape((s), sizeof(s) - 1, 64, (want))

Test(accesslog, json_escape)
{
    ESC("", "");
    ESC("GET /index.html", "GET /index.html");
    ESC("a\"b\\c/d", "a\\\"b\\\\c/d");
    ESC("\n\r\t\x01\x1f\x7f", "\\u000a\\u000d\\u0009\\u0001\\u001f\\u007f");
    ESC("a\0b", "a\\u0000b");
    ESC(" ~", " ~");
    /* Valid UTF-8 is copied: 2, 3 and 4 bytes, and the extremes. */
    ESC("h\xc3\xa9llo", "h\xc3\xa9llo");
    ESC("\xe2\x82\xac", "\xe2\x82\xac");
    ESC("\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80");
    ESC("\xc2\x80\xef\xbf\xbf\xf4\x8f\xbf\xbf", "\xc2\x80\xef\xbf\xbf\xf4\x8f\xbf\xbf");
    /* Invalid bytes become \ufffd, one per byte. */
    ESC("\xff", "\\ufffd");
    ESC("\x80x", "\\ufffdx");
    ESC("a\xc3", "a\\ufffd");                         /* truncated at the end */
    ESC("\xc3(", "\\ufffd(");                          /* bad continuation */
    ESC("\xc0\xaf", "\\ufffd\\ufffd");                 /* overlong '/' */
    ESC("\xe0\x80\xaf", "\\ufffd\\ufffd\\ufffd");      /* overlong, 3 bytes */
    ESC("\xed\xa0\x80", "\\ufffd\\ufffd\\ufffd");      /* surrogate U+D800 */
    ESC("\xf4\x90\x80\x80", "\\ufffd\\ufffd\\ufffd\\ufffd");   /* > U+10FFFF */
    ESC("\xf5\x80", "\\ufffd\\ufffd");
    ESC("\xe2\x82", "\\ufffd\\ufffd");                 /* cut by len: invalid */
    ESC("\xe2\x82\xac\xe2", "\xe2\x82\xac\\ufffd");
    /* max: input bytes considered, and a character it would cut is left out. */
    check_escape("abcdef", 6, 3, "abc");
    check_escape("abcdef", 6, 0, "");
    check_escape("abc", 3, 10, "abc");
    check_escape("a\xe2\x82\xac", 4, 2, "a");
    check_escape("a\xe2\x82\xac", 4, 3, "a");
    check_escape("a\xe2\x82\xac", 4, 4, "a\xe2\x82\xac");
    check_escape("a\xe2\x82", 3, 2, "a\\ufffd");       /* invalid anyway */
    check_escape("\"\"", 2, 1, "\\\"");
}

Test(accesslog, json_escape_worst_case_fits)
{
    char in[64], out[6 * 64 + 1 + 8];
    size_t n;

    memset(in, 0x01, sizeof(in));
    memset(out, '#', sizeof(out));
    n = tg_alog_json_escape(out, in, sizeof(in), sizeof(in));
    cr_assert_eq(n, 6 * sizeof(in));
    cr_assert_eq(out[n], '\0');
    cr_assert_eq(out[n + 1], '#', "wrote past 6 * max + 1");

    memset(in, 0xff, sizeof(in));
    n = tg_alog_json_escape(out, in, sizeof(in), sizeof(in));
    cr_assert_eq(n, 6 * sizeof(in));
    cr_assert_eq(out[n + 1], '#');
}

/* ---- request lines ---------------------------------------------------- */

Test(accesslog, request_line_exact)
{
    char out[2048];
    tg_alog_req r = {
        .request_id = "rid-1", .consumer = "acme", .tier = "gold",
        .method = "GETX", .method_len = 3, .path = "/a\"b\x01?q=1", .path_len = 9,
        .status = 200, .bytes_in = 5, .bytes_out = 1234,
        .now_us = 10000000, .start_us = 10000000 - 1500, .upstream_us = 10000000 - 250,
        .upstream = "127.0.0.1:8000", .limit = "allowed",
    };
    size_t n = tg_alog_format(out, sizeof(out), "2026-11-28T14:32:10", 7, &r);

    cr_assert_str_eq(out,
        "{\"time\":\"2026-11-28T14:32:10.007Z\",\"request_id\":\"rid-1\","
        "\"consumer\":\"acme\",\"tier\":\"gold\",\"method\":\"GET\","
        "\"path\":\"/a\\\"b\\u0001?q=1\",\"status\":200,\"bytes_in\":5,"
        "\"bytes_out\":1234,\"duration_ms\":1.500,\"upstream_ms\":0.250,"
        "\"upstream\":\"127.0.0.1:8000\",\"limit\":\"allowed\"}");
    cr_expect_eq(n, strlen(out));
}

/* A request with no request line of its own (a head timeout), never
 * forwarded. */
Test(accesslog, request_line_without_request)
{
    char out[2048];
    tg_alog_req r = {
        .request_id = "x", .consumer = "", .tier = "", .status = 408,
        .now_us = 5000, .upstream = "", .limit = "none",
    };

    tg_alog_format(out, sizeof(out), "2026-01-02T03:04:05", 999, &r);
    cr_assert_str_eq(out,
        "{\"time\":\"2026-01-02T03:04:05.999Z\",\"request_id\":\"x\",\"consumer\":\"\","
        "\"tier\":\"\",\"method\":\"\",\"path\":\"\",\"status\":408,\"bytes_in\":0,"
        "\"bytes_out\":0,\"duration_ms\":0.000,\"upstream_ms\":0.000,\"upstream\":\"\","
        "\"limit\":\"none\"}");
}

/* Method and path are cut (16 and 256 characters) before escaping. */
Test(accesslog, request_line_cuts_long_fields)
{
    char out[2048], lpath[300], want[2048], cut[257];
    tg_alog_req r = {
        .request_id = "r", .consumer = "", .tier = "", .status = 200,
        .method = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", .method_len = 26,
        .path = lpath, .path_len = sizeof(lpath),
        .now_us = 1, .upstream = "", .limit = "none",
    };

    memset(lpath, 'p', sizeof(lpath));
    memset(cut, 'p', 256);
    cut[256] = '\0';
    snprintf(want, sizeof(want),
             "{\"time\":\"T.000Z\",\"request_id\":\"r\",\"consumer\":\"\",\"tier\":\"\","
             "\"method\":\"ABCDEFGHIJKLMNOP\",\"path\":\"%s\",\"status\":200,"
             "\"bytes_in\":0,\"bytes_out\":0,\"duration_ms\":0.000,\"upstream_ms\":0.000,"
             "\"upstream\":\"\",\"limit\":\"none\"}", cut);
    tg_alog_format(out, sizeof(out), "T", 0, &r);
    cr_assert_str_eq(out, want);
}
