/*
 * redis_cluster.c - Cluster mode of the Redis client: key slots (CRC16),
 * the slot map from CLUSTER SLOTS, one breaker per node, routing a
 * flush's ops into one batch per slot, MOVED and ASK.  Runs on the
 * worker's loop.
 */
#include "redis_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void cluster_ask(struct tg_redis *r);

/* CRC16-CCITT (XMODEM): poly 0x1021, init 0, as in the Cluster spec. */
static const uint16_t tg_crc16_tab[256] = {
    0x0000, 0x1021, 0x2042, 0x3063, 0x4084, 0x50a5, 0x60c6, 0x70e7,
    0x8108, 0x9129, 0xa14a, 0xb16b, 0xc18c, 0xd1ad, 0xe1ce, 0xf1ef,
    0x1231, 0x0210, 0x3273, 0x2252, 0x52b5, 0x4294, 0x72f7, 0x62d6,
    0x9339, 0x8318, 0xb37b, 0xa35a, 0xd3bd, 0xc39c, 0xf3ff, 0xe3de,
    0x2462, 0x3443, 0x0420, 0x1401, 0x64e6, 0x74c7, 0x44a4, 0x5485,
    0xa56a, 0xb54b, 0x8528, 0x9509, 0xe5ee, 0xf5cf, 0xc5ac, 0xd58d,
    0x3653, 0x2672, 0x1611, 0x0630, 0x76d7, 0x66f6, 0x5695, 0x46b4,
    0xb75b, 0xa77a, 0x9719, 0x8738, 0xf7df, 0xe7fe, 0xd79d, 0xc7bc,
    0x48c4, 0x58e5, 0x6886, 0x78a7, 0x0840, 0x1861, 0x2802, 0x3823,
    0xc9cc, 0xd9ed, 0xe98e, 0xf9af, 0x8948, 0x9969, 0xa90a, 0xb92b,
    0x5af5, 0x4ad4, 0x7ab7, 0x6a96, 0x1a71, 0x0a50, 0x3a33, 0x2a12,
    0xdbfd, 0xcbdc, 0xfbbf, 0xeb9e, 0x9b79, 0x8b58, 0xbb3b, 0xab1a,
    0x6ca6, 0x7c87, 0x4ce4, 0x5cc5, 0x2c22, 0x3c03, 0x0c60, 0x1c41,
    0xedae, 0xfd8f, 0xcdec, 0xddcd, 0xad2a, 0xbd0b, 0x8d68, 0x9d49,
    0x7e97, 0x6eb6, 0x5ed5, 0x4ef4, 0x3e13, 0x2e32, 0x1e51, 0x0e70,
    0xff9f, 0xefbe, 0xdfdd, 0xcffc, 0xbf1b, 0xaf3a, 0x9f59, 0x8f78,
    0x9188, 0x81a9, 0xb1ca, 0xa1eb, 0xd10c, 0xc12d, 0xf14e, 0xe16f,
    0x1080, 0x00a1, 0x30c2, 0x20e3, 0x5004, 0x4025, 0x7046, 0x6067,
    0x83b9, 0x9398, 0xa3fb, 0xb3da, 0xc33d, 0xd31c, 0xe37f, 0xf35e,
    0x02b1, 0x1290, 0x22f3, 0x32d2, 0x4235, 0x5214, 0x6277, 0x7256,
    0xb5ea, 0xa5cb, 0x95a8, 0x8589, 0xf56e, 0xe54f, 0xd52c, 0xc50d,
    0x34e2, 0x24c3, 0x14a0, 0x0481, 0x7466, 0x6447, 0x5424, 0x4405,
    0xa7db, 0xb7fa, 0x8799, 0x97b8, 0xe75f, 0xf77e, 0xc71d, 0xd73c,
    0x26d3, 0x36f2, 0x0691, 0x16b0, 0x6657, 0x7676, 0x4615, 0x5634,
    0xd94c, 0xc96d, 0xf90e, 0xe92f, 0x99c8, 0x89e9, 0xb98a, 0xa9ab,
    0x5844, 0x4865, 0x7806, 0x6827, 0x18c0, 0x08e1, 0x3882, 0x28a3,
    0xcb7d, 0xdb5c, 0xeb3f, 0xfb1e, 0x8bf9, 0x9bd8, 0xabbb, 0xbb9a,
    0x4a75, 0x5a54, 0x6a37, 0x7a16, 0x0af1, 0x1ad0, 0x2ab3, 0x3a92,
    0xfd2e, 0xed0f, 0xdd6c, 0xcd4d, 0xbdaa, 0xad8b, 0x9de8, 0x8dc9,
    0x7c26, 0x6c07, 0x5c64, 0x4c45, 0x3ca2, 0x2c83, 0x1ce0, 0x0cc1,
    0xef1f, 0xff3e, 0xcf5d, 0xdf7c, 0xaf9b, 0xbfba, 0x8fd9, 0x9ff8,
    0x6e17, 0x7e36, 0x4e55, 0x5e74, 0x2e93, 0x3eb2, 0x0ed1, 0x1ef0,
};

/* ------------------------------------------------------------------ */
/* slots: CRC16 and the node breaker                                  */

unsigned
tg_redis_key_slot(const char *key, size_t len)
{
    const char *open = memchr(key, '{', len), *close;
    uint16_t crc = 0;

    if (open != NULL) {
        size_t rest = len - (size_t)(open - key) - 1;
        close = memchr(open + 1, '}', rest);
        if (close != NULL && close > open + 1) {
            key = open + 1;
            len = (size_t)(close - key);
        }
    }
    for (size_t i = 0; i < len; i++) {
        crc = (uint16_t)((crc << 8) ^ tg_crc16_tab[((crc >> 8) ^ (uint8_t)key[i]) & 0xff]);
    }
    return crc & (TG_REDIS_CLUSTER_SLOTS - 1);
}

/* Cluster: one breaker per node (a dead master must not send the other
 * masters' slots to the fallback): a few failed calls in a row open it;
 * then that node's calls fail at once, one probe per second. */
const tg_breaker_conf tg_redis_node_breaker_conf = {
    .failures = 3, .window_ms = 0, .min_requests = 0, .error_pct = 0,
    .open_ms = 1000, .max_open_ms = 5000, .probes = 1,
};

/* ------------------------------------------------------------------ */
/* Cluster: the slot map                                               */

static void
refresh_in(struct tg_redis *r, unsigned ms)
{
    struct timeval tv = tg_ms_tv(ms);

    if (r->destroying) {
        return;
    }
    evtimer_del(r->refresh_ev);
    evtimer_add(r->refresh_ev, &tv);
}

/* Ask for the map unless a question is already out. */
void
tg_redis_cluster_refresh(struct tg_redis *r)
{
    if (r->slots.ac != NULL || r->slots.failed || r->destroying) {
        return;
    }
    r->slots_tries = 0;
    r->slots_asked_ms = tg_now_ms();
    cluster_ask(r);
}

/* A node failed: if it serves slots, ask for the map again now (another
 * node answers: cluster_ask skips failed ones), at most every
 * TG_REDIS_KICK_MS; tg_redis_slots_done keeps asking while a failed node still
 * serves slots, so a promotion is seen within about that time. */
void
tg_redis_cluster_kick(struct tg_redis *r, const struct tg_rnode *nd)
{
    uint16_t want = 0;
    uint64_t since;

    if (r->slot_node == NULL || !r->map_ok) {
        return;
    }
    for (size_t i = 0; i < r->nnodes; i++) {
        if (r->nodes[i] == nd) {
            want = (uint16_t)(i + 1);
        }
    }
    for (size_t s = 0; want != 0 && s < TG_REDIS_CLUSTER_SLOTS; s++) {
        if (r->slot_node[s] == want) {
            r->stats.map_kicks++;
            since = tg_now_ms() - r->slots_asked_ms;
            if (since >= TG_REDIS_KICK_MS) {
                tg_redis_cluster_refresh(r);
            } else {
                refresh_in(r, (unsigned)(TG_REDIS_KICK_MS - since));
            }
            return;
        }
    }
}

/* A candidate for CLUSTER SLOTS that is known to have failed. */
static int
cluster_failed_addr(const struct tg_redis *r, const char *host, int port)
{
    for (size_t i = 0; i < r->nnodes; i++) {
        const struct tg_rnode *nd = r->nodes[i];
        if (nd->failed && nd->port == port
            && (strcmp(nd->ip, host) == 0 || strcmp(nd->host, host) == 0)) {
            return 1;
        }
    }
    return 0;
}

/* Candidates: the configured seeds, then every node learnt so far. */
static void
cluster_ask(struct tg_redis *r)
{
    const char *argv[2] = { "CLUSTER", "SLOTS" };
    size_t total = r->opts.ncluster + r->nnodes;
    size_t i = r->slots_idx % total;

    /* skip failed candidates, unless every one has failed */
    for (size_t n = 0; n < total; n++, i = (i + 1) % total) {
        const char *h = i < r->opts.ncluster ? r->opts.cluster_nodes[i].host
                        : r->nodes[i - r->opts.ncluster]->ip;
        int p = i < r->opts.ncluster ? r->opts.cluster_nodes[i].port
                : r->nodes[i - r->opts.ncluster]->port;
        if (!cluster_failed_addr(r, h, p)) {
            r->slots_idx = i;
            break;
        }
    }
    i = r->slots_idx % total;
    if (i < r->opts.ncluster) {
        tg_redis_aux_start(&r->slots, r->opts.cluster_nodes[i].host,
                  r->opts.cluster_nodes[i].port, 2, argv);
    } else {
        struct tg_rnode *nd = r->nodes[i - r->opts.ncluster];
        tg_redis_aux_start(&r->slots, nd->ip[0] != '\0' ? nd->ip : nd->host, nd->port, 2,
                           argv);
    }
}

/* [[start, end, [host, port, id...], replicas...]...] into a new map. */
static tg_rc
slots_parse(struct tg_redis *r, const redisReply *rep, const char *asked,
            uint16_t *map)
{
    char host[TG_REDIS_HOSTLEN];
    size_t idx;

    if (rep->type != REDIS_REPLY_ARRAY || rep->elements == 0) {
        return TG_ERR;
    }
    for (size_t i = 0; i < rep->elements; i++) {
        const redisReply *e = rep->element[i], *m;
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3
            || e->element[0]->type != REDIS_REPLY_INTEGER
            || e->element[1]->type != REDIS_REPLY_INTEGER
            || e->element[0]->integer < 0
            || e->element[0]->integer > e->element[1]->integer
            || e->element[1]->integer >= TG_REDIS_CLUSTER_SLOTS) {
            return TG_ERR;
        }
        m = e->element[2];
        if (m->type != REDIS_REPLY_ARRAY || m->elements < 2
            || m->element[0]->type != REDIS_REPLY_STRING
            || m->element[1]->type != REDIS_REPLY_INTEGER
            || m->element[1]->integer <= 0 || m->element[1]->integer > 65535
            || m->element[0]->len >= sizeof(host)) {
            return TG_ERR;
        }
        if (strcmp(m->element[0]->str, "?") == 0) {
            continue;           /* endpoint unknown to that node */
        }
        /* "" means: the address you asked */
        snprintf(host, sizeof(host), "%s",
                 m->element[0]->len > 0 ? m->element[0]->str : asked);
        if (tg_redis_node_get(r, host, (int)m->element[1]->integer, &idx) == NULL) {
            return TG_ERR;
        }
        for (long long s = e->element[0]->integer; s <= e->element[1]->integer; s++) {
            map[s] = (uint16_t)(idx + 1);
        }
    }
    return TG_OK;
}

void
tg_redis_slots_done(struct tg_redis *r, const redisReply *rep, const struct tg_raux *aux)
{
    uint16_t *map;
    size_t known = 0;

    if (rep != NULL) {
        map = tg_xcalloc(TG_REDIS_CLUSTER_SLOTS, sizeof(*map));
        if (slots_parse(r, rep, aux->host, map) == TG_OK) {
            memcpy(r->slot_node, map, TG_REDIS_CLUSTER_SLOTS * sizeof(*map));
            free(map);
            for (size_t s = 0; s < TG_REDIS_CLUSTER_SLOTS; s++) {
                known += r->slot_node[s] != 0;
            }
            if (!r->map_ok || known < TG_REDIS_CLUSTER_SLOTS) {
                tg_info("redis: cluster slot map from %s:%d: %zu nodes, %zu of %d "
                        "slots served", aux->host, aux->port, r->nnodes, known,
                        TG_REDIS_CLUSTER_SLOTS);
            }
            r->map_ok = 1;
            r->stats.map_refreshes++;
            refresh_in(r, TG_REDIS_REFRESH_MS);
            for (size_t s = 0; s < TG_REDIS_CLUSTER_SLOTS; s++) {
                if (r->slot_node[s] != 0 && r->nodes[r->slot_node[s] - 1]->failed) {
                    /* a failed node still serves slots: ask again soon */
                    refresh_in(r, 2 * TG_REDIS_KICK_MS);
                    break;
                }
            }
            return;
        }
        free(map);
        tg_warn("redis: %s:%d: unexpected CLUSTER SLOTS reply%s%.200s", aux->host,
                aux->port, rep->type == REDIS_REPLY_ERROR ? ": " : "",
                rep->type == REDIS_REPLY_ERROR ? rep->str : "");
    }
    r->slots_idx++;
    if (++r->slots_tries < r->opts.ncluster + r->nnodes) {
        cluster_ask(r);
        return;
    }
    refresh_in(r, TG_REDIS_REFRESH_RETRY_MS);
}

void
tg_redis_refresh_cb(evutil_socket_t fd, short what, void *arg)
{
    tg_redis_cluster_refresh(arg);
}

/* ------------------------------------------------------------------ */
/* routing: a slot's batch, MOVED and ASK                             */

/* Cluster: into this flush's batch for the op's slot (new batches are
 * pushed on *built and started by the caller). */
void
tg_redis_route_cluster(struct tg_redis *r, struct tg_redis_op *op,
                       struct tg_redis_batch **built)
{
    unsigned slot = op->phase == 2 ? op->slot2 : op->slot1;
    struct tg_rnode *nd = NULL;
    struct tg_redis_batch *b;

    if (r->map_ok && r->slot_node[slot] != 0) {
        nd = r->nodes[r->slot_node[slot] - 1];
    } else {
        tg_redis_cluster_refresh(r);
    }
    if (!tg_redis_node_usable(nd)) {
        tg_redis_op_fail(r, op);
        tg_redis_op_release(r, op);
        return;
    }
    b = op->kind == TG_OP_CHARGE ? r->slot_batch[slot] : NULL;
    if (b == NULL || b->nops >= r->opts.max_batch) {
        b = tg_redis_batch_new(r, nd, (enum tg_redis_kind)op->kind);
        b->slot = (int)slot;
        b->flush_next = *built;
        *built = b;
        if (op->kind == TG_OP_CHARGE) {
            r->slot_batch[slot] = b;
        }
    }
    tg_redis_batch_add(b, op);
}

/*
 * Cluster: "MOVED <slot> <host>:<port>" (the map entry is fixed, the whole
 * map refreshed in the background) or "ASK <slot> <host>:<port>" (ASKING
 * first, no map change): the batch - every key in that one slot - goes to
 * that node under its original deadline.  1 if it was sent again.
 */
int
tg_redis_batch_redirect(struct tg_redis_batch *b, const redisReply *rep)
{
    struct tg_redis *r = b->r;
    const char *p, *sp;
    char host[TG_REDIS_HOSTLEN];
    unsigned long slot;
    struct tg_rnode *nd;
    size_t idx;
    int ask, port;

    if (strncmp(rep->str, "MOVED ", 6) == 0) {
        ask = 0;
        p = rep->str + 6;
    } else if (strncmp(rep->str, "ASK ", 4) == 0) {
        ask = 1;
        p = rep->str + 4;
    } else {
        return 0;
    }
    sp = strchr(p, ' ');
    if (sp == NULL
        || tg_parse_dec(p, (size_t)(sp - p), TG_REDIS_CLUSTER_SLOTS - 1, &slot) != TG_OK
        || tg_redis_split_hostport(sp + 1, strlen(sp + 1), host, sizeof(host), &port)
           != TG_OK) {
        tg_warn("redis: cannot parse the redirection \"%.200s\"", rep->str);
        return 0;
    }
    if (b->redirects >= TG_REDIS_MAX_REDIRECTS) {
        tg_warn("redis: too many redirections for slot %lu: %.200s", slot, rep->str);
        return 0;
    }
    nd = tg_redis_node_get(r, host[0] != '\0' ? host : b->node->host, port, &idx);
    if (nd == NULL) {
        return 0;
    }
    if (!ask) {
        r->slot_node[slot] = (uint16_t)(idx + 1);
        tg_redis_cluster_refresh(r);
    }
    b->redirects++;
    r->stats.redirects++;
    b->node = nd;
    b->asking = (uint8_t)ask;
    if (!tg_redis_node_usable(nd)) {
        return 0;               /* a new node, still connecting */
    }
    if (tg_redis_batch_send(b) != TG_OK) {
        tg_redis_batch_fail(b);
        tg_redis_batch_free(b);
    }
    return 1;
}
