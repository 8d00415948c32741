/*
 * connlimit.h - caps on open client connections: per process and per
 * client address (http.max_connections, http.max_connections_per_ip).
 *
 * Counting is exact across threads: the acceptor takes a slot at accept
 * (the only place that increments, under the table's mutex, so no check
 * can race another increment) - the main thread, or each worker with
 * http.reuseport - and the worker that owns the connection gives the slot
 * back when it closes it, with one atomic decrement per counter.  An IPv4
 * address counts as itself, an IPv6 address as its whole 128 bits.
 */
#ifndef TOLLGATE_CONNLIMIT_H
#define TOLLGATE_CONNLIMIT_H

#include <sys/socket.h>

#include "tollgate/common.h"

struct tg_connlimit;
struct tg_connslot;                 /* one open connection's share */

/* 0 = no cap.  The table must outlive every slot it handed out. */
struct tg_connlimit *tg_connlimit_create(unsigned max_total, unsigned max_per_ip);
void tg_connlimit_destroy(struct tg_connlimit *cl);

/* Main thread: new caps (reload); open connections are kept. */
void tg_connlimit_set(struct tg_connlimit *cl, unsigned max_total, unsigned max_per_ip);

enum tg_connlimit_verdict { TG_CONN_OK, TG_CONN_OVER_TOTAL, TG_CONN_OVER_IP };

/* The acceptor (any thread): count a connection from sa.  TG_CONN_OK sets *slot, which
 * the caller (or whoever it hands the connection to) must release once;
 * otherwise the connection is over a cap and nothing is counted. */
enum tg_connlimit_verdict tg_connlimit_acquire(struct tg_connlimit *cl,
                                               const struct sockaddr *sa,
                                               struct tg_connslot **slot);

/* Any thread: the connection of slot is closed.  NULL is a no-op. */
void tg_connlimit_release(struct tg_connslot *slot);

/* Open connections counted now (any thread; for tests and metrics). */
unsigned tg_connlimit_total(const struct tg_connlimit *cl);
/* Addresses tracked by the table (main thread; for tests). */
size_t tg_connlimit_entries(const struct tg_connlimit *cl);

#endif
