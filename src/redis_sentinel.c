/*
 * redis_sentinel.c - Sentinel mode of the Redis client: the master's
 * address asked of the sentinels (the one whose master last worked
 * first), and a SUBSCRIBE to +switch-master that kicks the node.  Runs on
 * the worker's loop.
 */
#include "redis_int.h"

#include <stdio.h>
#include <string.h>

static void sentinel_ask(struct tg_redis *r);

/* ------------------------------------------------------------------ */
/* Sentinel                                                            */

/* Learn the master again: first the sentinel whose master last worked,
 * then the others in order; the first good answer wins. */
void
tg_redis_sentinel_discover(struct tg_redis *r)
{
    r->stats.rediscoveries++;
    r->disc_idx = r->disc_pref;
    r->disc_tries = 0;
    sentinel_ask(r);
}

/* The master a sentinel named failed (connect, ROLE) before it worked:
 * that sentinel may be partitioned with a stale view; ask the next one
 * first from now on. */
void
tg_redis_sentinel_distrust(struct tg_redis *r)
{
    if (r->disc_pref == r->disc_from) {
        r->disc_pref = (r->disc_from + 1) % r->opts.nsentinels;
    }
}

static void
sentinel_ask(struct tg_redis *r)
{
    const tg_redis_addr *s = &r->opts.sentinels[r->disc_idx];
    const char *argv[3] = { "SENTINEL", "get-master-addr-by-name",
                            r->opts.sentinel_master };

    tg_redis_aux_start(&r->disc, s->host, s->port, 3, argv);
}

void
tg_redis_sentinel_done(struct tg_redis *r, const redisReply *rep, const struct tg_raux *aux)
{
    struct tg_rnode *nd = r->nodes[0];
    unsigned long port;

    if (rep != NULL && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2
        && rep->element[0]->type == REDIS_REPLY_STRING
        && rep->element[1]->type == REDIS_REPLY_STRING
        && rep->element[0]->len > 0 && rep->element[0]->len < sizeof(nd->host)
        && tg_parse_dec(rep->element[1]->str, rep->element[1]->len, 65535, &port)
           == TG_OK
        && port > 0) {
        if (strcmp(nd->host, rep->element[0]->str) != 0 || nd->port != (int)port) {
            tg_info("redis: sentinel %s:%d: master \"%s\" is %s:%lu", aux->host,
                    aux->port, r->opts.sentinel_master, rep->element[0]->str, port);
        }
        if (nd->ac == NULL && !nd->resolving) {
            snprintf(nd->host, sizeof(nd->host), "%s", rep->element[0]->str);
            nd->port = (int)port;
            r->disc_from = r->disc_idx;
            nd->tried = 1;
            evtimer_del(nd->reconnect_ev);
            tg_redis_conn_start(nd);
        }
        return;
    }
    if (rep != NULL) {
        tg_warn("redis: sentinel %s:%d does not know master \"%s\"%s%.200s",
                aux->host, aux->port, r->opts.sentinel_master,
                rep->type == REDIS_REPLY_ERROR ? ": " : "",
                rep->type == REDIS_REPLY_ERROR ? rep->str : "");
    }
    if (nd->ac != NULL) {
        return;                 /* connected meanwhile */
    }
    if (++r->disc_tries < r->opts.nsentinels) {
        r->disc_idx = (r->disc_idx + 1) % r->opts.nsentinels;
        sentinel_ask(r);        /* a new context: fine inside the old one's callback */
        return;
    }
    tg_redis_schedule_reconnect(nd);     /* every sentinel failed: back off */
}

static void
sub_fail(struct tg_redis *r)
{
    struct timeval tv = tg_ms_tv(TG_REDIS_SUB_RETRY_MS);

    if (r->destroying) {
        return;
    }
    r->sub_idx = (r->sub_idx + 1) % r->opts.nsentinels;
    evtimer_add(r->sub_ev, &tv);
}

static void
sub_connect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_redis *r = ac->data;

    if (status != REDIS_OK && r->sub_ac == ac) {
        r->sub_ac = NULL;
        sub_fail(r);
    }
}

static void
sub_disconnect_cb(const redisAsyncContext *ac, int status)
{
    struct tg_redis *r = ac->data;

    if (r->sub_ac == ac) {
        r->sub_ac = NULL;
        sub_fail(r);
    }
}

/* "+switch-master" messages: "<master> <oldip> <oldport> <newip> <newport>". */
static void
sub_msg_cb(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct tg_redis *r = privdata;
    redisReply *rep = reply, *msg;
    char name[64], newip[TG_REDIS_HOSTLEN];
    int newport;
    struct tg_rnode *nd;

    if (rep == NULL || r->destroying || ac != r->sub_ac
        || rep->type != REDIS_REPLY_ARRAY || rep->elements != 3
        || rep->element[0]->type != REDIS_REPLY_STRING
        || strcmp(rep->element[0]->str, "message") != 0
        || rep->element[2]->type != REDIS_REPLY_STRING) {
        return;
    }
    msg = rep->element[2];
    if (sscanf(msg->str, "%63s %*s %*d %255s %d", name, newip, &newport) != 3
        || strcmp(name, r->opts.sentinel_master) != 0) {
        return;
    }
    nd = r->nodes[0];
    r->stats.switches++;
    tg_info("redis: +switch-master: \"%s\" is now %s:%d", name, newip, newport);
    if (nd->state == TG_REDIS_READY && nd->port == newport
        && strcmp(nd->host, newip) == 0) {
        return;                 /* already there */
    }
    tg_redis_node_kick(nd);
}

/* Sentinel: listen for +switch-master on the sentinel that answered well
 * (a frozen or partitioned one would keep the subscription silent).  Not
 * called from the subscription's own callbacks. */
void
tg_redis_sub_follow(struct tg_redis *r)
{
    redisAsyncContext *ac = r->sub_ac;

    if (r->sub_idx == r->disc_pref || r->destroying) {
        return;
    }
    r->sub_idx = r->disc_pref;
    if (ac != NULL) {
        r->sub_ac = NULL;       /* its callbacks now see a stale context */
        redisAsyncFree(ac);
    }
    evtimer_del(r->sub_ev);
    tg_redis_sub_start(r);
}

void
tg_redis_sub_start(struct tg_redis *r)
{
    const tg_redis_addr *s = &r->opts.sentinels[r->sub_idx];
    redisAsyncContext *ac = tg_redis_ctx_open(r, s->host, s->port, r, 1,
                                              tg_redis_aux_auth_cb, r);

    if (ac == NULL) {
        sub_fail(r);
        return;
    }
    redisAsyncSetConnectCallback(ac, sub_connect_cb);
    redisAsyncSetDisconnectCallback(ac, sub_disconnect_cb);
    redisAsyncCommand(ac, sub_msg_cb, r, "SUBSCRIBE +switch-master");
    r->sub_ac = ac;
}

void
tg_redis_sub_retry_cb(evutil_socket_t fd, short what, void *arg)
{
    struct tg_redis *r = arg;

    if (r->sub_ac == NULL && !r->destroying) {
        tg_redis_sub_start(r);
    }
}
