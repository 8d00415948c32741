/*
 * script-cost.c - where the charge script's time goes in redis-server
 * (issue 12: Redis CPU us per charge).  Sends the real script
 * (tg_gcra_lua, with its argument layout from gcra.h) and variants of it
 * with a part cut out, calls shaped like tollgate's under
 * loadtest/bench: CHARGES requests per call, each one bucket, the keys
 * distinct in a call and picked at random from KEYS, interval 10 us and
 * burst 100,000 (never denied, so every key is written).  For each
 * variant, ROUNDS times in alternation: CONFIG RESETSTAT, CALLS EVALSHA
 * pipelined (64 in flight), then INFO commandstats (usec_per_call of
 * evalsha and of the commands the script runs) and redis-server's CPU
 * time (utime + stime, /proc) over the run.  Prints per variant the
 * median over the rounds: us per call and per charge inside EVALSHA,
 * redis-server CPU us per charge (adds reading and parsing the
 * arguments, which usec_per_call does not count), and the nested
 * commands' usec_per_call.
 *
 * Run it through loadtest/script-cost (a private redis-server, this
 * built against build/libtgcore.a); by hand:
 *
 *   cc -O2 -Iinclude loadtest/script-cost.c build/libtgcore.a \
 *      $(pkg-config --libs hiredis libevent libcrypto) -o /tmp/script-cost
 *   /tmp/script-cost PORT [CALLS] [ROUNDS] [CHARGES] [KEYS] [VARIANTS]
 *
 * VARIANTS: comma-separated names (default: all).  "v0" is the script
 * and layout as of c623254 (one bulk string per number, a table reply),
 * kept as the baseline of the A/B; "prev" the script and layout before
 * the TATs moved into the argument table (per-key limits first, TATs in
 * tables keyed by name), "prev-*" its cut-down variants.
 */
#include <hiredis/hiredis.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tollgate/gcra.h"

#define MAXV      16
#define MAXCH     64
#define INFLIGHT  64

/* The charge script at c623254: the baseline. */
static const char v0_lua[] =
    "#!lua flags=allow-cross-slot-keys\n"
    "local call, num, unpack, floor, ceil, fmt = redis.call, tonumber, unpack, math.floor, math.ceil, string.format\n"
    "local tm = call('TIME')\n"
    "local now = num(tm[1]) * 1000000 + num(tm[2])\n"
    "local nk = #KEYS\n"
    "local tat, per, lim = {}, {}, {}\n"
    "for i = 1, nk, 1000 do\n"
    "  local j = i + 999\n"
    "  if j > nk then j = nk end\n"
    "  local got = call('MGET', unpack(KEYS, i, j))\n"
    "  for x = i, j do\n"
    "    local v = num(got[x - i + 1])\n"
    "    if v == nil or v ~= v or v < 0 or v > 9007199254740991 then v = 0 end\n"
    "    tat[KEYS[x]] = floor(v)\n"
    "    local t = num(ARGV[1 + 2 * x])\n"
    "    per[x], lim[x] = t, num(ARGV[2 + 2 * x]) * t\n"
    "  end\n"
    "end\n"
    "local fl = ARGV[2] == '1'\n"
    "local out, kx, dx, w, dirty = {}, {}, {}, {}, {}\n"
    "local a, o, nw = 3 + 2 * nk, 0, 0\n"
    "for r = 1, num(ARGV[1]) do\n"
    "  local h = num(ARGV[a])\n"
    "  local nb = h % 16\n"
    "  local cost = (h - nb) / 16\n"
    "  local ok = 1\n"
    "  a = a + 1\n"
    "  for i = 1, nb do\n"
    "    local x = num(ARGV[a])\n"
    "    local key = KEYS[x]\n"
    "    local held = tat[key] - now\n"
    "    a = a + 1\n"
    "    if fl then\n"
    "      local f = num(ARGV[a])\n"
    "      a = a + 1\n"
    "      if held < f then held = f end\n"
    "    end\n"
    "    if held < 0 then held = 0 end\n"
    "    local d = held + cost * per[x]\n"
    "    if d > lim[x] then ok = 0 end\n"
    "    kx[i], dx[i], out[o + 1 + i] = key, d, held\n"
    "  end\n"
    "  out[o + 1] = ok\n"
    "  if ok == 1 and cost > 0 then\n"
    "    for i = 1, nb do\n"
    "      local key = kx[i]\n"
    "      if not dirty[key] then dirty[key] = true; nw = nw + 1; w[nw] = key end\n"
    "      tat[key] = now + dx[i]\n"
    "    end\n"
    "  end\n"
    "  o = o + 1 + nb\n"
    "end\n"
    "for i = 1, nw do\n"
    "  local v = tat[w[i]]\n"
    "  call('SET', w[i], fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000)))\n"
    "end\n"
    "out[o + 1] = now\n"
    "return out\n";

/* The charge script before the per-key numbers moved after the requests
 * (TATs in Lua tables keyed by name; the layout of gcra.h before it):
 * the "prev" of the A/B. */
static const char prev_lua[] =
    "#!lua flags=allow-cross-slot-keys\n"
    "local call, num, unpack, floor, ceil, fmt = redis.call, tonumber, unpack, math.floor, math.ceil, string.format\n"
    "local tm = call('TIME')\n"
    "local now = num(tm[1]) * 1000000 + num(tm[2])\n"
    "local s = ARGV[1]\n"
    "local n = #s / 8\n"
    "if n ~= floor(n) then return redis.error_reply('ERR tollgate: packed arguments') end\n"
    "local A\n"
    "if n <= 4000 then\n"
    "  A = {struct.unpack('<' .. string.rep('d', n), s)}\n"
    "else\n"
    "  A = {}\n"
    "  for i = 0, n - 1, 4000 do\n"
    "    local m = n - i\n"
    "    if m > 4000 then m = 4000 end\n"
    "    local p = {struct.unpack('<' .. string.rep('d', m), s, 8 * i + 1)}\n"
    "    for j = 1, m do A[i + j] = p[j] end\n"
    "  end\n"
    "end\n"
    "local nk = #KEYS\n"
    "local tat, per, lim = {}, {}, {}\n"
    "for i = 1, nk, 1000 do\n"
    "  local j = i + 999\n"
    "  if j > nk then j = nk end\n"
    "  local got = call('MGET', unpack(KEYS, i, j))\n"
    "  for x = i, j do\n"
    "    local v = num(got[x - i + 1])\n"
    "    if v == nil or v ~= v or v < 0 or v > 9007199254740991 then v = 0 end\n"
    "    tat[KEYS[x]] = floor(v)\n"
    "    local t = A[1 + 2 * x]\n"
    "    per[x], lim[x] = t, A[2 + 2 * x] * t\n"
    "  end\n"
    "end\n"
    "local fl = A[2] == 1\n"
    "local out, kx, dx, w, dirty = {}, {}, {}, {}, {}\n"
    "local a, o, nw = 3 + 2 * nk, 0, 0\n"
    "for r = 1, A[1] do\n"
    "  local h = A[a]\n"
    "  local nb = h % 16\n"
    "  local cost = (h - nb) / 16\n"
    "  local ok = 1\n"
    "  a = a + 1\n"
    "  for i = 1, nb do\n"
    "    local x = A[a]\n"
    "    local key = KEYS[x]\n"
    "    local held = tat[key] - now\n"
    "    a = a + 1\n"
    "    if fl then\n"
    "      local f = A[a]\n"
    "      a = a + 1\n"
    "      if held < f then held = f end\n"
    "    end\n"
    "    if held < 0 then held = 0 end\n"
    "    local d = held + cost * per[x]\n"
    "    if d > lim[x] then ok = 0 end\n"
    "    kx[i], dx[i], out[o + 1 + i] = key, d, held\n"
    "  end\n"
    "  out[o + 1] = ok\n"
    "  if ok == 1 and cost > 0 then\n"
    "    for i = 1, nb do\n"
    "      local key = kx[i]\n"
    "      if not dirty[key] then dirty[key] = true; nw = nw + 1; w[nw] = key end\n"
    "      tat[key] = now + dx[i]\n"
    "    end\n"
    "  end\n"
    "  o = o + 1 + nb\n"
    "end\n"
    "for i = 1, nw do\n"
    "  local v = tat[w[i]]\n"
    "  call('SET', w[i], fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000)))\n"
    "end\n"
    "out[o + 1] = now\n"
    "o = o + 1\n"
    "if o <= 4000 then return struct.pack('<' .. string.rep('d', o), unpack(out)) end\n"
    "local parts = {}\n"
    "for i = 1, o, 4000 do\n"
    "  local j = i + 3999\n"
    "  if j > o then j = o end\n"
    "  parts[#parts + 1] = struct.pack('<' .. string.rep('d', j - i + 1), unpack(out, i, j))\n"
    "end\n"
    "return table.concat(parts)\n";

/* A variant: a base script with text substitutions (each must match). */
typedef struct variant {
    const char *name;
    int         v0;                 /* 1: v0's script and layout, 2: prev's,
                                       0: this tree's (tg_gcra_lua), 3: the
                                       module's TOLLGATE.CHARGE (no script) */
    const char *sub[4][2];          /* from -> to, NULL-terminated */
    char       *text;
    char        sha[41];
    double      call_us[MAXV], charge_us[MAXV], cpu_us[MAXV];
    double      nested[MAXV][3];    /* usec_per_call: time, mget, set */
    int         rounds;
} variant;

static variant variants[] = {
    { "v0", 1, { { NULL, NULL } } },
    { "v0-noset", 1, { { "  call('SET', w[i], fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000)))\n", "" } } },
    { "v0-set-nofmt", 1, { { "fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000))", "'1', 'PXAT', '99999999999999'" } } },
    { "v0-nomget", 1, { { "call('MGET', unpack(KEYS, i, j))", "{}" } } },
    { "v0-reply1", 1, { { "return out\n", "return now\n" } } },
    { "v0-packreply", 1, { { "return out\n", "return struct.pack('<' .. string.rep('d', o + 1), unpack(out))\n" } } },
    { "prev", 2, { { NULL, NULL } } },
    { "cur", 0, { { NULL, NULL } } },
    { "native", 3, { { NULL, NULL } } },
    { "cur-noset", 0, { { "    call('SET', KEYS[x], fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000)))\n", "" } } },
    { "cur-set-nofmt", 0, { { "fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000))", "'1', 'PXAT', '99999999999999'" } } },
    { "cur-set-tostr", 0, { { "fmt('%d', ceil(v / 1000))", "tostring(ceil(v / 1000))" } } },
    { "cur-set-cat", 0, { { "fmt('%d', ceil(v / 1000))", "ceil(v / 1000) .. ''" } } },
    { "cur-noalias", 0, { { "    if t < 0 then t = A[-t] end\n", "" },
                          { "      if w < 0 then w = -w else w = k end\n", "      w = k\n" } } },
    { "cur-fast1", 0, { { "  a = a + 1\n  for i = 1, nb do\n",
                          "  a = a + 1\n"
                          "  if nb == 1 and not fl then\n"
                          "    local k = pk + 3 * A[a]\n"
                          "    local t = A[k]\n"
                          "    local w = k\n"
                          "    if t < 0 then w = -t; t = A[w] end\n"
                          "    local held = t - now\n"
                          "    a = a + 1\n"
                          "    if held < 0 then held = 0 end\n"
                          "    local per = A[k - 2]\n"
                          "    local d = held + cost * per\n"
                          "    if d > A[k - 1] * per then ok = 0 elseif cost > 0 then A[w] = now + d; got[(w - pk) / 3] = true end\n"
                          "    A[o + 2] = held\n"
                          "  else\n"
                          "  for i = 1, nb do\n" },
                        { "  A[o + 1] = ok\n  o = o + 1 + nb\n", "  end\n  A[o + 1] = ok\n  o = o + 1 + nb\n" } } },
    { "prev-noset", 2, { { "  call('SET', w[i], fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000)))\n", "" } } },
    { "prev-nomget", 2, { { "call('MGET', unpack(KEYS, i, j))", "{}" } } },
    { "prev-reply1", 2, { { "return struct.pack('<' .. string.rep('d', o), unpack(out))", "return now" } } },
    { "prev-exat-memo", 2, { { "  call('SET', w[i], fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000)))\n",
                              "  local e = ceil(v / 1000000)\n  local es = w[-e]\n"
                              "  if not es then es = fmt('%d', e); w[-e] = es end\n"
                              "  call('SET', w[i], fmt('%d', v), 'EXAT', es)\n" } } },
    { "prev-set-num", 2, { { "fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000))", "v, 'PXAT', ceil(v / 1000)" } } },
    { "prev-set-nofmt", 2, { { "fmt('%d', v), 'PXAT', fmt('%d', ceil(v / 1000))", "'1', 'PXAT', '99999999999999'" } } },
};
#define NVAR (sizeof(variants) / sizeof(variants[0]))
#define PREV 6                      /* variants[PREV] is "prev" */

static redisContext *rc;
static int nkeys = 10000, ncharges = 9;

static char *
subst(const char *base, const char *from, const char *to)
{
    const char *at = strstr(base, from);
    size_t lb = strlen(base), lf = strlen(from), lt = strlen(to);
    char *s;

    if (at == NULL) {
        return NULL;
    }
    s = malloc(lb - lf + lt + 1);
    memcpy(s, base, (size_t)(at - base));
    memcpy(s + (at - base), to, lt);
    strcpy(s + (at - base) + lt, at + lf);
    return s;
}

static int
load(variant *v)
{
    if (v->v0 == 3) {               /* the module: there when redis-server loads it */
        redisReply *r = redisCommand(rc, "TOLLGATE.PROTO");
        int ok = r != NULL && r->type == REDIS_REPLY_INTEGER;

        if (r != NULL) {
            freeReplyObject(r);
        }
        if (!ok) {
            fprintf(stderr, "script-cost: native: redis-server has no tollgate module: skipped\n");
        }
        return ok ? 0 : -1;
    }
    char *text = strdup(v->v0 == 1 ? v0_lua : v->v0 == 2 ? prev_lua : tg_gcra_lua);
    redisReply *r;

    for (int i = 0; i < 4 && v->sub[i][0] != NULL; i++) {
        char *t = subst(text, v->sub[i][0], v->sub[i][1]);
        free(text);
        if (t == NULL) {
            fprintf(stderr, "script-cost: %s: the script has no \"%.40s...\": skipped\n",
                    v->name, v->sub[i][0]);
            return -1;
        }
        text = t;
    }
    v->text = text;
    r = redisCommand(rc, "SCRIPT LOAD %s", text);
    if (r == NULL || r->type != REDIS_REPLY_STRING) {
        fprintf(stderr, "script-cost: %s: SCRIPT LOAD: %s\n", v->name,
                r != NULL && r->str != NULL ? r->str : rc->errstr);
        exit(1);
    }
    snprintf(v->sha, sizeof(v->sha), "%s", r->str);
    freeReplyObject(r);
    return 0;
}

/* ---- one call --------------------------------------------------------- */

static char keybuf[MAXCH][32];

static void
pick_keys(void)
{
    int id[MAXCH];

    for (int i = 0; i < ncharges; i++) {
        int dup;
        do {
            id[i] = (int)(random() % nkeys);
            dup = 0;
            for (int j = 0; j < i; j++) {
                dup |= id[j] == id[i];
            }
        } while (dup);
        snprintf(keybuf[i], sizeof(keybuf[i]), "tg:{c%05d}:t", id[i]);
    }
}

/* v0's layout: one bulk string per number. */
static void
send_v0(const variant *v)
{
    const char *argv[8 + 5 * MAXCH];
    size_t len[8 + 5 * MAXCH];
    char num[8 + 5 * MAXCH][24];
    int argc = 0, nn = 0;

#define ARG(s) do { argv[argc] = (s); len[argc] = strlen(s); argc++; } while (0)
#define NUM(x) do { snprintf(num[nn], 24, "%llu", (unsigned long long)(x)); ARG(num[nn]); nn++; } while (0)
    ARG("EVALSHA");
    ARG(v->sha);
    NUM(ncharges);
    for (int i = 0; i < ncharges; i++) {
        ARG(keybuf[i]);
    }
    NUM(ncharges);
    NUM(0);
    for (int i = 0; i < ncharges; i++) {
        NUM(10);
        NUM(100000);
    }
    for (int i = 0; i < ncharges; i++) {
        NUM(1 * 16 + 1);
        NUM(i + 1);
    }
#undef NUM
#undef ARG
    redisAppendCommandArgv(rc, argc, argv, len);
}

/* prev's layout: numkeys, the keys, the numbers packed, each key's
 * limit before the requests. */
static void
send_prev(const variant *v)
{
    const char *argv[4 + MAXCH];
    size_t len[4 + MAXCH];
    uint64_t num[2 + 2 * MAXCH + MAXCH * TG_GCRA_SCRIPT_ARGS];
    unsigned char packed[sizeof(num)];
    char nk[24];
    size_t nn = 0;
    int argc = 0;

    num[nn++] = (uint64_t)ncharges;
    num[nn++] = 0;
    for (int i = 0; i < ncharges; i++) {
        num[nn++] = 10;
        num[nn++] = 100000;
    }
    for (int i = 0; i < ncharges; i++) {
        uint32_t kidx = (uint32_t)i + 1;
        nn += tg_gcra_script_args(&kidx, NULL, 1, 0x1, 1, 0, num + nn);
    }
    argv[argc] = "EVALSHA";
    len[argc++] = 7;
    argv[argc] = v->sha;
    len[argc++] = 40;
    snprintf(nk, sizeof(nk), "%d", ncharges);
    argv[argc] = nk;
    len[argc++] = strlen(nk);
    for (int i = 0; i < ncharges; i++) {
        argv[argc] = keybuf[i];
        len[argc++] = strlen(keybuf[i]);
    }
    argv[argc] = (const char *)packed;
    len[argc++] = tg_gcra_script_pack(num, nn, packed);
    redisAppendCommandArgv(rc, argc, argv, len);
}

/* The current layout (gcra.h): numkeys, the keys, the numbers packed. */
static void
send_cur(const variant *v)
{
    const char *argv[4 + MAXCH];
    size_t len[4 + MAXCH];
    uint64_t num[2 + TG_GCRA_SCRIPT_KEY_ARGS * MAXCH + MAXCH * TG_GCRA_SCRIPT_ARGS];
    unsigned char packed[sizeof(num)];
    char nk[24];
    size_t nn = 0;
    int argc = 0;

    num[nn++] = (uint64_t)ncharges;
    num[nn++] = 0;
    for (int i = 0; i < ncharges; i++) {
        uint32_t kidx = (uint32_t)i + 1;
        nn += tg_gcra_script_args(&kidx, NULL, 1, 0x1, 1, 0, num + nn);
    }
    for (int i = 0; i < ncharges; i++) {
        tg_gcra_limit l = { 10, 100000 };
        nn += tg_gcra_script_key(l, (uint32_t)i + 1, num + nn);
    }
    if (v->v0 == 3) {               /* TOLLGATE.CHARGE packed KEYS... */
        argv[argc] = "TOLLGATE.CHARGE";
        len[argc++] = 15;
        argv[argc] = (const char *)packed;
        len[argc++] = tg_gcra_script_pack(num, nn, packed);
    } else {
        argv[argc] = "EVALSHA";
        len[argc++] = 7;
        argv[argc] = v->sha;
        len[argc++] = 40;
        snprintf(nk, sizeof(nk), "%d", ncharges);
        argv[argc] = nk;
        len[argc++] = strlen(nk);
    }
    for (int i = 0; i < ncharges; i++) {
        argv[argc] = keybuf[i];
        len[argc++] = strlen(keybuf[i]);
    }
    if (v->v0 != 3) {
        argv[argc] = (const char *)packed;
        len[argc++] = tg_gcra_script_pack(num, nn, packed);
    }
    redisAppendCommandArgv(rc, argc, argv, len);
}

/* ---- measure ---------------------------------------------------------- */

static redisReply *
cmd(const char *s)
{
    redisReply *r = redisCommand(rc, s);

    if (r == NULL || r->type == REDIS_REPLY_ERROR) {
        fprintf(stderr, "script-cost: %s: %s\n", s, r != NULL ? r->str : rc->errstr);
        exit(1);
    }
    return r;
}

static double
stat_of(const char *info, const char *cmdname, const char *field)
{
    char pat[64];
    const char *p;

    snprintf(pat, sizeof(pat), "cmdstat_%s:", cmdname);
    p = strstr(info, pat);
    if (p == NULL) {
        return 0;
    }
    snprintf(pat, sizeof(pat), "%s=", field);
    p = strstr(p, pat);
    return p != NULL ? strtod(p + strlen(pat), NULL) : 0;
}

static double
cpu_us(long pid)
{
    char path[64], buf[1024], *p;
    unsigned long ut, st;
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    f = fopen(path, "r");
    if (f == NULL || fgets(buf, sizeof(buf), f) == NULL) {
        fprintf(stderr, "script-cost: %s unreadable\n", path);
        exit(1);
    }
    fclose(f);
    p = strrchr(buf, ')');
    /* fields 14, 15 (utime, stime) after ") S ..." : skip 11 */
    for (int i = 0; i < 12; i++) {
        p = strchr(p + 1, ' ');
    }
    sscanf(p, " %lu %lu", &ut, &st);
    return (double)(ut + st) * 1e6 / (double)sysconf(_SC_CLK_TCK);
}

static void
round_of(variant *v, int calls, long pid)
{
    redisReply *r;
    int sent = 0, got = 0;
    double c0, c1;

    freeReplyObject(cmd("CONFIG RESETSTAT"));
    c0 = cpu_us(pid);
    while (got < calls) {
        while (sent < calls && sent - got < INFLIGHT) {
            pick_keys();
            (v->v0 == 1 ? send_v0 : v->v0 == 2 ? send_prev : send_cur)(v);
            sent++;
        }
        if (redisGetReply(rc, (void **)&r) != REDIS_OK) {
            fprintf(stderr, "script-cost: %s\n", rc->errstr);
            exit(1);
        }
        if (r->type == REDIS_REPLY_ERROR) {
            fprintf(stderr, "script-cost: %s: %s\n", v->name, r->str);
            exit(1);
        }
        freeReplyObject(r);
        got++;
    }
    c1 = cpu_us(pid);
    r = cmd("INFO commandstats");
    v->call_us[v->rounds] = stat_of(r->str, v->v0 == 3 ? "tollgate.charge" : "evalsha",
                                    "usec_per_call");
    v->charge_us[v->rounds] = v->call_us[v->rounds] / ncharges;
    v->cpu_us[v->rounds] = (c1 - c0) / ((double)calls * ncharges);
    v->nested[v->rounds][0] = stat_of(r->str, "time", "usec_per_call");
    v->nested[v->rounds][1] = stat_of(r->str, "mget", "usec_per_call");
    v->nested[v->rounds][2] = stat_of(r->str, "set", "usec_per_call");
    v->rounds++;
    freeReplyObject(r);
}

static int
dcmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double
median(const double *v, int n)
{
    double s[MAXV];

    memcpy(s, v, (size_t)n * sizeof(*v));
    qsort(s, (size_t)n, sizeof(*s), dcmp);
    return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

static double
least(const double *v, int n)
{
    double m = v[0];

    for (int i = 1; i < n; i++) {
        m = v[i] < m ? v[i] : m;
    }
    return m;
}

int
main(int argc, char **argv)
{
    int port, calls = 20000, rounds = 5;
    const char *only = NULL;
    long pid;
    redisReply *r;
    char *p;

    if (argc < 2) {
        fprintf(stderr, "usage: script-cost PORT [CALLS] [ROUNDS] [CHARGES] [KEYS] [VARIANTS]\n");
        return 2;
    }
    if (strcmp(variants[PREV].name, "prev") != 0) {
        fprintf(stderr, "script-cost: PREV is not \"prev\"\n");
        return 2;
    }
    port = atoi(argv[1]);
    if (argc > 2) calls = atoi(argv[2]);
    if (argc > 3) rounds = atoi(argv[3]);
    if (argc > 4) ncharges = atoi(argv[4]);
    if (argc > 5) nkeys = atoi(argv[5]);
    if (argc > 6 && argv[6][0] != '\0') only = argv[6];
    if (calls < 1 || rounds < 1 || rounds > MAXV || ncharges < 1 || ncharges > MAXCH
        || nkeys < ncharges) {
        fprintf(stderr, "script-cost: CALLS >= 1, ROUNDS 1..%d, CHARGES 1..%d, KEYS >= CHARGES\n",
                MAXV, MAXCH);
        return 2;
    }
    rc = redisConnect("127.0.0.1", port);
    if (rc == NULL || rc->err) {
        fprintf(stderr, "script-cost: connect 127.0.0.1:%d failed\n", port);
        return 1;
    }
    r = cmd("INFO server");
    p = strstr(r->str, "process_id:");
    pid = p != NULL ? atol(p + 11) : 0;
    freeReplyObject(r);
    srandom(12);

    for (size_t i = 0; i < NVAR; i++) {
        variant *v = &variants[i];
        if (only != NULL) {
            char pat[64];
            snprintf(pat, sizeof(pat), ",%s,", v->name);
            char *o = malloc(strlen(only) + 3);
            sprintf(o, ",%s,", only);
            int skip = strstr(o, pat) == NULL;
            free(o);
            if (skip) {
                v->rounds = -1;
                continue;
            }
        }
        if (load(v) != 0) {
            v->rounds = -1;
        }
    }
    for (int k = 0; k < rounds; k++) {
        for (size_t i = 0; i < NVAR; i++) {
            if (variants[i].rounds >= 0) {
                freeReplyObject(cmd("FLUSHALL"));
                round_of(&variants[i], calls, pid);
            }
        }
    }
    printf("%d calls x %d rounds, %d charges per call, keys of %d; medians\n",
           calls, rounds, ncharges, nkeys);
    printf("%-14s %9s %11s %12s %12s %10s %10s %8s %8s %8s\n", "variant", "us/call",
           "us/charge", "cpu us/chg", "(least)", "cpu vs v0", "vs prev", "TIME", "MGET", "SET");
    for (size_t i = 0; i < NVAR; i++) {
        variant *v = &variants[i];
        double n[3][MAXV];
        if (v->rounds <= 0) {
            continue;
        }
        for (int k = 0; k < v->rounds; k++) {
            for (int j = 0; j < 3; j++) {
                n[j][k] = v->nested[k][j];
            }
        }
        /* the same round's ratio to v0 (run just before it), median */
        double ratio[MAXV], pratio[MAXV];
        const variant *pv = &variants[PREV];
        for (int k = 0; k < v->rounds; k++) {
            ratio[k] = variants[0].rounds == v->rounds && variants[0].cpu_us[k] > 0
                       ? v->cpu_us[k] / variants[0].cpu_us[k] : 0;
            pratio[k] = pv->rounds == v->rounds && pv->cpu_us[k] > 0
                        ? v->cpu_us[k] / pv->cpu_us[k] : 0;
        }
        printf("%-14s %9.2f %11.3f %12.3f %12.3f %9.2fx %9.2fx %8.2f %8.2f %8.2f\n", v->name,
               median(v->call_us, v->rounds), median(v->charge_us, v->rounds),
               median(v->cpu_us, v->rounds), least(v->cpu_us, v->rounds),
               median(ratio, v->rounds), median(pratio, v->rounds), median(n[0], v->rounds),
               median(n[1], v->rounds), median(n[2], v->rounds));
    }
    redisFree(rc);
    return 0;
}
