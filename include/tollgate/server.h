/*
 * server.h - the running process (main thread): start-up, the listeners
 * and accept with the connection caps, signals (SIGTERM/SIGINT/SIGQUIT
 * drain, SIGHUP reload), drain, reload and stop; systemd notify and
 * watchdog.  docs/ARCHITECTURE.md has who owns what and which thread
 * runs what.
 */
#ifndef TOLLGATE_SERVER_H
#define TOLLGATE_SERVER_H

#include "tollgate/common.h"
#include "tollgate/conf.h"

struct tg_keys;

/* Load the configuration at path, start, serve until told to stop, stop.
 * Returns the exit status (0 after a drain, 1 when it could not start). */
int tg_server_run(const char *path);

/* The keys file of conf's auth.keys_file (*out = NULL without one), its
 * tiers checked against conf's rate_limits: a reference to the caller.
 * TG_ERR with a message in err. */
tg_rc tg_server_load_keys(const tg_conf *conf, struct tg_keys **out,
                          char *err, size_t errlen);

#endif
