/*
 * test_tls.c - unit tests of src/tls.c: the server context from PEM files
 * (a pair that belongs together, a key of another certificate, missing and
 * garbage files: a message naming the file), and what it negotiates, in
 * memory (a BIO pair, no socket): ALPN http/1.1 or nothing, TLS 1.2 at
 * least, forward-secret suites only.  The certificates are made here.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "tollgate/tls.h"

static char dir[64];
static char cert_path[128], key_path[128], other_key_path[128];
static char err[512];

/* A P-256 key and a self-signed certificate for it, as PEM files. */
static void
write_pair(const char *cert, const char *key)
{
    EVP_PKEY *pkey = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    X509_NAME *name;
    FILE *f;

    cr_assert(pkey != NULL && x != NULL);
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, pkey);
    name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)"localhost",
                               -1, -1, 0);
    X509_set_issuer_name(x, name);
    cr_assert(X509_sign(x, pkey, EVP_sha256()) > 0);
    if (cert != NULL) {
        cr_assert_not_null(f = fopen(cert, "w"));
        cr_assert(PEM_write_X509(f, x));
        fclose(f);
    }
    cr_assert_not_null(f = fopen(key, "w"));
    cr_assert(PEM_write_PrivateKey(f, pkey, NULL, NULL, 0, NULL, NULL));
    fclose(f);
    X509_free(x);
    EVP_PKEY_free(pkey);
}

static void
setup(void)
{
    snprintf(dir, sizeof(dir), "/tmp/tg-test-tls-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
    snprintf(cert_path, sizeof(cert_path), "%s/cert.pem", dir);
    snprintf(key_path, sizeof(key_path), "%s/key.pem", dir);
    snprintf(other_key_path, sizeof(other_key_path), "%s/other.pem", dir);
    write_pair(cert_path, key_path);
    write_pair(NULL, other_key_path);
}

static void
teardown(void)
{
    char path[128];

    unlink(cert_path);
    unlink(key_path);
    unlink(other_key_path);
    snprintf(path, sizeof(path), "%s/garbage.pem", dir);
    unlink(path);
    rmdir(dir);
}

TestSuite(tls, .init = setup, .fini = teardown);

/* ------------------------------------------------------------------ */
/* a handshake in memory                                               */

typedef struct client_opts {
    const unsigned char *alpn;      /* wire format, or NULL: none offered */
    unsigned             alpn_len;
    int                  max_version;   /* 0: any */
    const char          *ciphers;       /* TLS 1.2 list, or NULL: default */
} client_opts;

typedef struct outcome {
    int  ok;                        /* both sides finished the handshake */
    int  version;                   /* SSL_version of the server side */
    char alpn[32];                  /* selected protocol, "" if none */
} outcome;

static outcome
handshake(SSL_CTX *server_ctx, const client_opts *co)
{
    SSL_CTX *cctx = SSL_CTX_new(TLS_client_method());
    SSL *srv = SSL_new(server_ctx), *cli;
    BIO *bs, *bc;
    outcome out = { 0 };
    int sdone = 0, cdone = 0;

    cr_assert(cctx != NULL && srv != NULL);
    if (co->max_version) {
        SSL_CTX_set_max_proto_version(cctx, co->max_version);
        SSL_CTX_set_min_proto_version(cctx, TLS1_VERSION);
        SSL_CTX_set_security_level(cctx, 0);    /* let the old client try */
    }
    if (co->ciphers != NULL) {
        cr_assert_eq(SSL_CTX_set_cipher_list(cctx, co->ciphers), 1);
        SSL_CTX_set_max_proto_version(cctx, TLS1_2_VERSION);
    }
    cli = SSL_new(cctx);
    cr_assert_not_null(cli);
    if (co->alpn != NULL) {
        cr_assert_eq(SSL_set_alpn_protos(cli, co->alpn, co->alpn_len), 0);
    }
    cr_assert_eq(BIO_new_bio_pair(&bs, 0, &bc, 0), 1);
    SSL_set_bio(srv, bs, bs);
    SSL_set_bio(cli, bc, bc);
    SSL_set_accept_state(srv);
    SSL_set_connect_state(cli);
    for (int i = 0; i < 100 && !(sdone && cdone); i++) {
        int rc, e;
        if (!cdone) {
            rc = SSL_do_handshake(cli);
            e = SSL_get_error(cli, rc);
            if (rc == 1) cdone = 1;
            else if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) break;
        }
        if (!sdone) {
            rc = SSL_do_handshake(srv);
            e = SSL_get_error(srv, rc);
            if (rc == 1) sdone = 1;
            else if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) break;
        }
    }
    out.ok = sdone && cdone;
    if (out.ok) {
        const unsigned char *sel = NULL;
        unsigned len = 0;
        out.version = SSL_version(srv);
        SSL_get0_alpn_selected(srv, &sel, &len);
        if (len >= sizeof(out.alpn)) len = sizeof(out.alpn) - 1;
        if (len > 0) memcpy(out.alpn, sel, len);
        out.alpn[len] = '\0';
    }
    ERR_clear_error();
    SSL_free(cli);
    SSL_free(srv);
    SSL_CTX_free(cctx);
    return out;
}

static const unsigned char h2_and_http11[] = "\x02h2\x08http/1.1";
static const unsigned char h2_only[] = "\x02h2";

Test(tls, pair_loads_and_speaks_http11)
{
    SSL_CTX *ctx = tg_tls_server_ctx(cert_path, key_path, err, sizeof(err));
    client_opts co = { h2_and_http11, sizeof(h2_and_http11) - 1, 0, NULL };
    outcome o;

    cr_assert_not_null(ctx, "%s", err);
    cr_expect_eq(SSL_CTX_get_min_proto_version(ctx), TLS1_2_VERSION);
    cr_expect(SSL_CTX_get_options(ctx) & SSL_OP_NO_RENEGOTIATION);
    cr_expect(SSL_CTX_get_options(ctx) & SSL_OP_NO_COMPRESSION);
    o = handshake(ctx, &co);
    cr_assert(o.ok, "handshake failed");
    cr_expect_str_eq(o.alpn, "http/1.1", "a client offering h2 first still gets http/1.1");
    cr_expect_geq(o.version, TLS1_2_VERSION);
    SSL_CTX_free(ctx);
}

/* A client that offers only h2 gets no ALPN answer and may go on. */
Test(tls, h2_only_client_gets_no_alpn)
{
    SSL_CTX *ctx = tg_tls_server_ctx(cert_path, key_path, err, sizeof(err));
    client_opts co = { h2_only, sizeof(h2_only) - 1, 0, NULL };
    client_opts none = { NULL, 0, 0, NULL };
    outcome o;

    cr_assert_not_null(ctx, "%s", err);
    o = handshake(ctx, &co);
    cr_assert(o.ok, "handshake failed");
    cr_expect_str_eq(o.alpn, "");
    o = handshake(ctx, &none);
    cr_assert(o.ok, "handshake without ALPN failed");
    cr_expect_str_eq(o.alpn, "");
    SSL_CTX_free(ctx);
}

Test(tls, old_versions_and_weak_suites_refused)
{
    SSL_CTX *ctx = tg_tls_server_ctx(cert_path, key_path, err, sizeof(err));
    client_opts tls11 = { NULL, 0, TLS1_1_VERSION, NULL };
    client_opts tls12 = { NULL, 0, TLS1_2_VERSION, NULL };
    client_opts no_fs = { NULL, 0, 0, "AES128-GCM-SHA256:AES256-SHA" };   /* RSA key exchange */
    client_opts cbc = { NULL, 0, 0, "ECDHE-ECDSA-AES128-SHA" };           /* no AEAD */

    cr_assert_not_null(ctx, "%s", err);
    cr_expect(!handshake(ctx, &tls11).ok, "TLS 1.1 accepted");
    cr_expect(handshake(ctx, &tls12).ok, "TLS 1.2 refused");
    cr_expect(!handshake(ctx, &no_fs).ok, "a suite without forward secrecy accepted");
    cr_expect(!handshake(ctx, &cbc).ok, "a CBC suite accepted");
    SSL_CTX_free(ctx);
}

/* ------------------------------------------------------------------ */
/* refused files: the message names the file and the reason            */

Test(tls, key_of_another_certificate)
{
    cr_assert_null(tg_tls_server_ctx(cert_path, other_key_path, err, sizeof(err)));
    cr_expect(strncmp(err, other_key_path, strlen(other_key_path)) == 0, "%s", err);
    /* OpenSSL 3 refuses it while loading ("key values mismatch"); the
     * context's own check says "does not match" where it gets that far */
    cr_expect(strstr(err, "key values mismatch") != NULL
              || strstr(err, ": the private key does not match the certificate: ") != NULL,
              "%s", err);
}

Test(tls, missing_files)
{
    cr_assert_null(tg_tls_server_ctx("/nonexistent/cert.pem", key_path, err, sizeof(err)));
    cr_expect(strncmp(err, "/nonexistent/cert.pem: cannot load the certificate: ", 52) == 0,
              "%s", err);
    cr_assert_null(tg_tls_server_ctx(cert_path, "/nonexistent/key.pem", err, sizeof(err)));
    cr_expect(strncmp(err, "/nonexistent/key.pem: cannot load the private key: ", 51) == 0,
              "%s", err);
}

Test(tls, garbage_files)
{
    char path[128];
    FILE *f;

    snprintf(path, sizeof(path), "%s/garbage.pem", dir);
    cr_assert_not_null(f = fopen(path, "w"));
    fputs("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", f);
    fclose(f);
    cr_assert_null(tg_tls_server_ctx(path, key_path, err, sizeof(err)));
    cr_expect(strstr(err, ": cannot load the certificate: ") != NULL, "%s", err);
    /* a certificate where the key should be */
    cr_assert_null(tg_tls_server_ctx(cert_path, cert_path, err, sizeof(err)));
    cr_expect(strstr(err, ": cannot load the private key: ") != NULL, "%s", err);
    /* a small buffer: cut, terminated */
    {
        char small[16];
        memset(small, 'z', sizeof(small));
        cr_assert_null(tg_tls_server_ctx(cert_path, cert_path, small, sizeof(small)));
        cr_expect_eq(strlen(small), sizeof(small) - 1);
    }
}
