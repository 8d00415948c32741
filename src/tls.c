/*
 * tls.c - server TLS contexts, and the refcounted set of the listeners'
 * contexts that reaches the workers by reference (tls.h).
 */
#include "tollgate/tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>

struct tg_tls_set {
    unsigned  refcnt;       /* atomic */
    size_t    n;            /* listeners */
    SSL_CTX  *ctx[];        /* one reference each, or NULL (plain) */
};

static int alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                       const unsigned char *in, unsigned int inlen, void *arg);
static struct tg_tls_set *set_new(size_t n);

static void
ssl_err(char *err, size_t errlen, const char *what, const char *path)
{
    unsigned long e = ERR_get_error();
    char buf[256];

    ERR_error_string_n(e, buf, sizeof(buf));
    snprintf(err, errlen, "%s%s%s: %s", path ? path : "", path ? ": " : "", what,
             e ? buf : "unknown error");
    ERR_clear_error();
}

SSL_CTX *
tg_tls_server_ctx(const char *cert, const char *key, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

    if (ctx == NULL) {
        ssl_err(err, errlen, "cannot create a TLS context", NULL);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE
                             | SSL_OP_NO_COMPRESSION);
    /* TLS 1.2: forward-secret AEAD suites only; 1.3 suites are all modern. */
    if (SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS") != 1) {
        ssl_err(err, errlen, "cannot set the cipher list", NULL);
        goto fail;
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        ssl_err(err, errlen, "cannot load the certificate", cert);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        ssl_err(err, errlen, "cannot load the private key", key);
        goto fail;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        ssl_err(err, errlen, "the private key does not match the certificate", key);
        goto fail;
    }
    SSL_CTX_set_alpn_select_cb(ctx, alpn_select, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
    return ctx;

fail:
    SSL_CTX_free(ctx);
    return NULL;
}

struct tg_tls_set *
tg_tls_set_create(const tg_conf *conf, char *err, size_t errlen)
{
    struct tg_tls_set *set = set_new(conf->nlisten);
    size_t i;

    for (i = 0; i < conf->nlisten; i++) {
        if (!conf->listen[i].tls) {
            continue;
        }
        set->ctx[i] = tg_tls_server_ctx(conf->listen[i].cert, conf->listen[i].key,
                                        err, errlen);
        if (set->ctx[i] == NULL) {
            tg_tls_set_unref(set);
            return NULL;
        }
    }
    return set;
}

struct tg_tls_set *
tg_tls_set_renew(struct tg_tls_set *cur, const tg_conf *conf, char *err, size_t errlen)
{
    struct tg_tls_set *set;
    size_t i;

    if (cur == NULL || conf->nlisten != cur->n) {
        return tg_tls_set_ref(cur);
    }
    set = set_new(cur->n);
    for (i = 0; i < cur->n; i++) {
        if (cur->ctx[i] == NULL) {
            continue;
        }
        if (!conf->listen[i].tls) {
            SSL_CTX_up_ref(cur->ctx[i]);
            set->ctx[i] = cur->ctx[i];
            continue;
        }
        set->ctx[i] = tg_tls_server_ctx(conf->listen[i].cert, conf->listen[i].key,
                                        err, errlen);
        if (set->ctx[i] == NULL) {
            tg_tls_set_unref(set);
            return NULL;
        }
    }
    return set;
}

struct tg_tls_set *
tg_tls_set_ref(struct tg_tls_set *set)
{
    if (set != NULL) {
        __atomic_add_fetch(&set->refcnt, 1, __ATOMIC_RELAXED);
    }
    return set;
}

void
tg_tls_set_unref(struct tg_tls_set *set)
{
    size_t i;

    if (set == NULL || __atomic_sub_fetch(&set->refcnt, 1, __ATOMIC_ACQ_REL) != 0) {
        return;
    }
    for (i = 0; i < set->n; i++) {
        SSL_CTX_free(set->ctx[i]);
    }
    free(set);
}

SSL_CTX *
tg_tls_set_ctx(const struct tg_tls_set *set, size_t i)
{
    return set != NULL && i < set->n ? set->ctx[i] : NULL;
}

static struct tg_tls_set *
set_new(size_t n)
{
    struct tg_tls_set *set = tg_xcalloc(1, sizeof(*set) + n * sizeof(set->ctx[0]));

    set->refcnt = 1;
    set->n = n;
    return set;
}

/* Only http/1.1 is spoken; a client offering only h2 gets no ALPN answer
 * and may still continue with HTTP/1.1. */
static int
alpn_select(SSL *ssl, const unsigned char **out, unsigned char *outlen,
            const unsigned char *in, unsigned int inlen, void *arg)
{
    static const unsigned char proto[] = "\x08http/1.1";
    unsigned char *sel;

    TG_UNUSED(ssl);
    TG_UNUSED(arg);
    if (SSL_select_next_proto(&sel, outlen, proto, sizeof(proto) - 1, in, inlen)
        != OPENSSL_NPN_NEGOTIATED) {
        return SSL_TLSEXT_ERR_NOACK;
    }
    *out = sel;
    return SSL_TLSEXT_ERR_OK;
}
