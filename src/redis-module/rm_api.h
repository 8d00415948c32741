/*
 * rm_api.h - the few entry points of the Redis module API (Redis >= 7.0)
 * that tollgate_redis.c uses, declared by hand: Debian ships no
 * redismodule.h.  A module receives its context with a pointer to Redis's
 * GetApi as the first member, and asks it for each function by name
 * ("RedisModule_OpenKey", ...); a name this Redis does not export leaves
 * the module unloaded (RM_ONLOAD fails) rather than half working.
 *
 * The types are opaque; the constants and signatures are those of Redis's
 * documented module API (https://redis.io/docs/reference/modules/).
 */
#ifndef TOLLGATE_RM_API_H
#define TOLLGATE_RM_API_H

#include <stddef.h>

#define RM_OK            0
#define RM_ERR           1
#define RM_APIVER_1      1

#define RM_READ          (1 << 0)
#define RM_WRITE         (1 << 1)

#define RM_KEYTYPE_EMPTY  0
#define RM_KEYTYPE_STRING 1

#define RM_NOTIFY_GENERIC (1 << 2)    /* keyspace events of class g */
#define RM_NOTIFY_STRING  (1 << 3)    /* class $ */

typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleKey RedisModuleKey;
typedef struct RedisModuleString RedisModuleString;
typedef long long rm_mstime_t;

typedef int (*rm_cmd_fn)(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

/* The table of entry points, filled by rm_init: one static copy per
 * module (Redis loads modules RTLD_LOCAL; nothing here is exported). */
#define RM_API(X)                                                              \
    X(void *, Alloc, (size_t bytes))                                           \
    X(void, Free, (void *ptr))                                                 \
    X(int, CreateCommand, (RedisModuleCtx *ctx, const char *name,             \
                           rm_cmd_fn fn, const char *flags, int firstkey,      \
                           int lastkey, int keystep))                          \
    X(void, SetModuleAttribs, (RedisModuleCtx *ctx, const char *name,         \
                               int ver, int apiver))                           \
    X(int, IsModuleNameBusy, (const char *name))                               \
    X(int, WrongArity, (RedisModuleCtx *ctx))                                  \
    X(int, ReplyWithError, (RedisModuleCtx *ctx, const char *err))             \
    X(int, ReplyWithLongLong, (RedisModuleCtx *ctx, long long ll))             \
    X(int, ReplyWithStringBuffer, (RedisModuleCtx *ctx, const char *buf,       \
                                   size_t len))                                \
    X(const char *, StringPtrLen, (const RedisModuleString *s, size_t *len))   \
    X(RedisModuleKey *, OpenKey, (RedisModuleCtx *ctx,                         \
                                  RedisModuleString *name, int mode))          \
    X(void, CloseKey, (RedisModuleKey *key))                                   \
    X(int, KeyType, (RedisModuleKey *key))                                     \
    X(int, DeleteKey, (RedisModuleKey *key))                                   \
    X(char *, StringDMA, (RedisModuleKey *key, size_t *len, int mode))         \
    X(int, StringTruncate, (RedisModuleKey *key, size_t newlen))               \
    X(int, SetAbsExpire, (RedisModuleKey *key, rm_mstime_t when))              \
    X(int, Replicate, (RedisModuleCtx *ctx, const char *cmd,                   \
                       const char *fmt, ...))                                  \
    X(int, NotifyKeyspaceEvent, (RedisModuleCtx *ctx, int type,                \
                                 const char *event, RedisModuleString *key))

#define RM_DECLARE(ret, name, args) static ret (*RM_##name) args;
RM_API(RM_DECLARE)
#undef RM_DECLARE

/* Fill the table from ctx and name the module; RM_ERR if this Redis lacks
 * an entry point or the name is taken. */
static int
rm_init(RedisModuleCtx *ctx, const char *name, int ver)
{
    int (*get_api)(const char *, void *);
    void *p = ((void **)ctx)[0];

    *(void **)&get_api = p;
#define RM_GET(ret, name, args)                                                \
    if (get_api("RedisModule_" #name, (void *)&RM_##name) != RM_OK) {          \
        return RM_ERR;                                                         \
    }
    RM_API(RM_GET)
#undef RM_GET
    if (RM_IsModuleNameBusy(name)) {
        return RM_ERR;
    }
    RM_SetModuleAttribs(ctx, name, ver, RM_APIVER_1);
    return RM_OK;
}

#endif
