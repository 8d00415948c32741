/*
 * tls.h - server TLS contexts: TLS 1.2+, modern ciphers, ALPN http/1.1;
 * and the set of the listeners' contexts that the workers hold by
 * reference.
 */
#ifndef TOLLGATE_TLS_H
#define TOLLGATE_TLS_H

#include <openssl/ssl.h>

#include "tollgate/common.h"
#include "tollgate/conf.h"

/* Build a context from PEM files (certificate chain, private key); checks
 * that they belong together.  NULL with a message in err on failure. */
SSL_CTX *tg_tls_server_ctx(const char *cert, const char *key, char *err, size_t errlen);

/*
 * The listeners' contexts of one (re)load: context i is listener i's, or
 * NULL for a plain listener.  Immutable once built and refcounted
 * (atomic): the main thread keeps one reference to the latest set, each
 * worker one to the set it uses, received at start and in each reload
 * message; the last unref frees the contexts, on whichever thread drops
 * it.  A connection's SSL holds its own reference on its context, so it
 * may outlive its set.
 */
struct tg_tls_set;

/* A context for every TLS listener of conf (a reference to the caller).
 * NULL with a message in err if one cannot be built. */
struct tg_tls_set *tg_tls_set_create(const tg_conf *conf, char *err, size_t errlen);

/*
 * For a reload to conf: new contexts, from the files conf names, for the
 * listeners that had TLS in cur and still have; cur's context for a
 * listener that had TLS and has not any more (a listener's TLS changes at
 * restart), NULL for the others.  When conf has another number of
 * listeners (they change at restart), cur itself.  A new reference to the
 * caller; cur is not touched.  NULL with a message in err if a context
 * cannot be built.
 */
struct tg_tls_set *tg_tls_set_renew(struct tg_tls_set *cur, const tg_conf *conf,
                                    char *err, size_t errlen);

/* Reference counting; both accept NULL. */
struct tg_tls_set *tg_tls_set_ref(struct tg_tls_set *set);
void tg_tls_set_unref(struct tg_tls_set *set);

/* Listener i's context, or NULL (plain, no set, i out of range). */
SSL_CTX *tg_tls_set_ctx(const struct tg_tls_set *set, size_t i);

#endif
