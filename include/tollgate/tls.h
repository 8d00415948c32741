/*
 * tls.h - server TLS contexts: TLS 1.2+, modern ciphers, ALPN http/1.1.
 */
#ifndef TOLLGATE_TLS_H
#define TOLLGATE_TLS_H

#include <openssl/ssl.h>

#include "tollgate/common.h"

/* Build a context from PEM files (certificate chain, private key); checks
 * that they belong together.  NULL with a message in err on failure. */
SSL_CTX *tg_tls_server_ctx(const char *cert, const char *key, char *err, size_t errlen);

#endif
