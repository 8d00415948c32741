/*
 * accesslog.h - the access log, written without ever blocking an event loop.
 *
 * One tg_alog per process owns the log file, a pipe and a writer thread.
 * Each worker thread owns one tg_alog_buf bound to its event base: lines
 * accumulate in memory and go to the pipe's non-blocking write end in
 * chunks of at most PIPE_BUF bytes that end on a line boundary.  Writes of
 * up to PIPE_BUF bytes to a pipe are atomic, so chunks from several workers
 * never interleave inside a line.  The writer thread does the blocking
 * part: read(2) from the pipe, write(2) to the file.
 *
 * A buffer is flushed when 16 KiB were appended since its last flush, by a
 * 100 ms timer on its base (armed only while lines are pending) and as soon
 * as the pipe becomes writable again after it was full.  While the pipe is
 * full, lines stay buffered up to TG_ALOG_BUF_MAX bytes per worker; past
 * that the OLDEST pending lines are dropped and counted
 * (tg_alog_dropped()).  Every line written is either in the file or
 * counted as dropped once the buffers and the log are destroyed (barring
 * write(2) errors on the file itself, which are logged).
 *
 * Threads: tg_alog_create/reopen/destroy/dropped may be called from any
 * thread (reopen is meant for the main thread's SIGHUP handling, outside
 * the signal handler).  A tg_alog_buf belongs to the thread running its
 * event base: create, write and destroy it there.
 */
#ifndef TOLLGATE_ACCESSLOG_H
#define TOLLGATE_ACCESSLOG_H

#include <stddef.h>
#include <stdint.h>

struct event_base;

struct tg_alog;        /* process-wide: owns the file and a writer thread */
struct tg_alog_buf;    /* one per worker thread (its event base) */

#define TG_ALOG_FLUSH_AT     (16u * 1024)     /* bytes appended that trigger a flush */
#define TG_ALOG_FLUSH_MS     100              /* flush timer period */
#define TG_ALOG_BUF_MAX      (1024u * 1024)   /* pending bytes per worker before drops */
#define TG_ALOG_DRAIN_MS     1000             /* longest wait in tg_alog_buf_destroy */

/* Open path (append, create 0640, close-on-exec), make the pipe and start
 * the writer thread (all signals blocked in it).  Returns NULL and a
 * message in err ("access_log: cannot open FILE: strerror") on failure. */
struct tg_alog *tg_alog_create(const char *path, char *err, size_t errlen);

/* Ask the writer to reopen the file at the same path at its next wake-up,
 * i.e. before it writes the next data it reads (log rotation: rename the
 * file, then call this).  If the open fails the old file is kept and an
 * error is logged.  Async-signal-safe (one atomic store), but calling it
 * from the main loop on SIGHUP is the intended use. */
void tg_alog_reopen(struct tg_alog *log);

/* Close the pipe's write end, let the writer drain what is in the pipe and
 * exit, join it, close the file and free log.  Every tg_alog_buf of log
 * must have been destroyed before.  NULL is ignored. */
void tg_alog_destroy(struct tg_alog *log);

/* Lines lost because the pipe stayed full for too long (or was still full
 * when a buffer was destroyed).  Any thread. */
uint64_t tg_alog_dropped(const struct tg_alog *log);

/* A worker's buffer on base (which must outlive it).  Allocates up to
 * about 2 * TG_ALOG_BUF_MAX while the pipe is full, and shrinks back once
 * everything was flushed. */
struct tg_alog_buf *tg_alog_buf_create(struct tg_alog *log, struct event_base *base);

/* Flush what can be flushed, waiting at most TG_ALOG_DRAIN_MS for room in
 * the pipe (shutdown path: the loop is stopping); lines still pending
 * after that are counted as dropped.  Frees b.  NULL is ignored. */
void tg_alog_buf_destroy(struct tg_alog_buf *b);

/* Append one line of len bytes (no '\n': the function adds it).  A line
 * longer than PIPE_BUF - 1 bytes is cut to PIPE_BUF - 1; a '\n' inside the
 * line is replaced by a space so a line stays a line.  Never blocks.  The
 * caller keeps line. */
void tg_alog_write(struct tg_alog_buf *b, const char *line, size_t len);

/* Append the first min(len, max) bytes of s to out as the body of a JSON
 * string (no quotes): '"' and '\\' are backslash-escaped, control
 * characters (0x00-0x1f, 0x7f) become \u00XX, valid UTF-8 is copied as is
 * and every byte >= 0x80 that is not part of a valid UTF-8 sequence
 * becomes \ufffd.  A multi-byte character that the max limit would cut is
 * left out whole.  out needs room for 6 * max + 1 bytes; it is
 * NUL-terminated.  Returns the bytes written, not counting the NUL. */
size_t tg_alog_json_escape(char *out, const char *s, size_t len, size_t max);

/* The facts of one finished request, for its access-log line. */
typedef struct tg_alog_req {
    const char *request_id;
    const char *consumer;         /* the consumer id (never the key); "" when none */
    const char *tier;             /* "" when none */
    const char *method;           /* method_len bytes, or NULL (no request line) */
    size_t      method_len;
    const char *path;             /* path_len bytes, or NULL */
    size_t      path_len;
    int         status;
    uint64_t    bytes_in;         /* request body bytes */
    uint64_t    bytes_out;        /* response body bytes */
    uint64_t    now_us;           /* monotonic (tg_now_us): the response is queued */
    uint64_t    start_us;         /* ... the request head began; 0: unknown */
    uint64_t    upstream_us;      /* ... it was forwarded; 0: not forwarded */
    const char *upstream;         /* the server it went to; "" when not forwarded */
    const char *limit;            /* the limiter's outcome: none, allowed,
                                     fallback, limited, unauthorized, ... */
} tg_alog_req;

/* Format r's line, one JSON object without the '\n', into out[0..len) (2048
 * bytes hold any line: method and path are cut to 16 and 256 characters,
 * then JSON-escaped).  time_s is the UTC second ("2026-11-28T14:32:10")
 * and ms its milliseconds.  Returns the line's length (as tg_fmt). */
size_t tg_alog_format(char *out, size_t len, const char *time_s, long ms,
                      const tg_alog_req *r);

/* Log one request to b (its worker's buffer): the wall clock now (its
 * second formatted once per second per buffer), tg_alog_format,
 * tg_alog_write. */
void tg_alog_request(struct tg_alog_buf *b, const tg_alog_req *r);

/* ---- tests only --------------------------------------------------------
 * When set, the writer thread calls this before each write(2) to the file
 * (a test makes the writer slow or stalls it to fill the pipe).  Set it
 * before tg_alog_create and reset it after tg_alog_destroy.  Never set in
 * production code. */
extern void (*tg_alog_test_before_write)(void);

#endif
