/*
 * test_tls.c - the listeners' TLS context sets (tls.c): one context per
 * TLS listener, a reload renews them (or keeps them where a listener's
 * TLS changes only at restart), a bad certificate refuses the renewal,
 * and a context outlives its set while an SSL holds it; one context
 * (tg_tls_server_ctx) and what it negotiates over a BIO pair (ALPN, TLS
 * versions, suites), refused files named.  Certificates are made here
 * with OpenSSL (P-256, self-signed), written to a temp dir.
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

#include "tollgate/conf.h"
#include "tollgate/tls.h"

static char dir[] = "/tmp/tg-test-tls-XXXXXX";
static char err[TG_CONF_ERRLEN];

/* dir/name.crt and dir/name.key: a self-signed certificate for CN name. */
static void
make_cert(const char *name)
{
    EVP_PKEY *pk = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    X509_NAME *n;
    char path[256];
    FILE *f;

    cr_assert_not_null(pk);
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, pk);
    n = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, (const unsigned char *)name, -1, -1, 0);
    X509_set_issuer_name(x, n);
    cr_assert_gt(X509_sign(x, pk, EVP_sha256()), 0);
    snprintf(path, sizeof(path), "%s/%s.crt", dir, name);
    f = fopen(path, "w");
    cr_assert_not_null(f);
    PEM_write_X509(f, x);
    fclose(f);
    snprintf(path, sizeof(path), "%s/%s.key", dir, name);
    f = fopen(path, "w");
    cr_assert_not_null(f);
    PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL);
    fclose(f);
    X509_free(x);
    EVP_PKEY_free(pk);
}

static void
setup(void)
{
    cr_assert_not_null(mkdtemp(dir));
    make_cert("alpha");
    make_cert("beta");
}

static void
teardown(void)
{
    static const char *const files[] = { "alpha.crt", "alpha.key", "beta.crt", "beta.key" };
    char path[256];

    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

/*
 * A config with a plain listener (0) and a TLS one (1) using cert/key
 * (files in dir, by name), or, with tls NULL, both plain; three listeners
 * with extra.
 */
static tg_conf *
conf_with(const char *cert, const char *key, int tls, int extra)
{
    char yaml[1024];
    tg_conf *conf;

    if (tls) {
        snprintf(yaml, sizeof(yaml),
                 "listen: [ { address: 127.0.0.1:8080 }, { address: 127.0.0.1:8443, "
                 "tls: { cert: %s/%s, key: %s/%s } }%s ]\n"
                 "upstream: { servers: [127.0.0.1:8000] }\n",
                 dir, cert, dir, key, extra ? ", { address: 127.0.0.1:8081 }" : "");
    } else {
        snprintf(yaml, sizeof(yaml),
                 "listen: [ { address: 127.0.0.1:8080 }, { address: 127.0.0.1:8443 } ]\n"
                 "upstream: { servers: [127.0.0.1:8000] }\n");
    }
    conf = tg_conf_load_string("t.yaml", yaml, strlen(yaml), err, sizeof(err));
    cr_assert_not_null(conf, "%s", err);
    return conf;
}

static int
ctx_cn_is(SSL_CTX *ctx, const char *cn)
{
    X509 *x = SSL_CTX_get0_certificate(ctx);
    char got[64] = "";

    X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, got, sizeof(got));
    return strcmp(got, cn) == 0;
}

TestSuite(tls_set, .init = setup, .fini = teardown);

Test(tls_set, one_context_per_tls_listener)
{
    tg_conf *conf = conf_with("alpha.crt", "alpha.key", 1, 0);
    struct tg_tls_set *set = tg_tls_set_create(conf, err, sizeof(err));

    cr_assert_not_null(set, "%s", err);
    cr_assert_null(tg_tls_set_ctx(set, 0));
    cr_assert_not_null(tg_tls_set_ctx(set, 1));
    cr_assert(ctx_cn_is(tg_tls_set_ctx(set, 1), "alpha"));
    cr_assert_null(tg_tls_set_ctx(set, 2));          /* out of range */
    cr_assert_null(tg_tls_set_ctx(NULL, 0));
    tg_tls_set_unref(set);
    tg_tls_set_unref(NULL);
    tg_conf_unref(conf);
}

Test(tls_set, key_of_another_certificate_is_refused)
{
    tg_conf *conf = conf_with("alpha.crt", "beta.key", 1, 0);

    cr_assert_null(tg_tls_set_create(conf, err, sizeof(err)));
    cr_assert_not_null(strstr(err, "beta.key"), "%s", err);
    tg_conf_unref(conf);
}

Test(tls_set, renew_builds_new_contexts_and_keeps_the_old_set)
{
    tg_conf *a = conf_with("alpha.crt", "alpha.key", 1, 0);
    tg_conf *b = conf_with("beta.crt", "beta.key", 1, 0);
    struct tg_tls_set *cur = tg_tls_set_create(a, err, sizeof(err));
    struct tg_tls_set *next = tg_tls_set_renew(cur, b, err, sizeof(err));

    cr_assert_not_null(next, "%s", err);
    cr_assert_neq(next, cur);
    cr_assert_null(tg_tls_set_ctx(next, 0));
    cr_assert(ctx_cn_is(tg_tls_set_ctx(next, 1), "beta"));
    cr_assert(ctx_cn_is(tg_tls_set_ctx(cur, 1), "alpha"), "the old set was changed");
    tg_tls_set_unref(cur);
    tg_tls_set_unref(next);
    tg_conf_unref(a);
    tg_conf_unref(b);
}

Test(tls_set, renew_refused_by_a_bad_certificate)
{
    tg_conf *a = conf_with("alpha.crt", "alpha.key", 1, 0);
    tg_conf *bad = conf_with("alpha.crt", "beta.key", 1, 0);
    struct tg_tls_set *cur = tg_tls_set_create(a, err, sizeof(err));

    cr_assert_null(tg_tls_set_renew(cur, bad, err, sizeof(err)));
    cr_assert(ctx_cn_is(tg_tls_set_ctx(cur, 1), "alpha"));
    tg_tls_set_unref(cur);
    tg_conf_unref(a);
    tg_conf_unref(bad);
}

/* Listeners change at restart: another number of them keeps the set;
 * TLS turned off on a listener keeps its context. */
Test(tls_set, renew_keeps_what_changes_at_restart)
{
    tg_conf *a = conf_with("alpha.crt", "alpha.key", 1, 0);
    tg_conf *three = conf_with("beta.crt", "beta.key", 1, 1);
    tg_conf *plain = conf_with(NULL, NULL, 0, 0);
    struct tg_tls_set *cur = tg_tls_set_create(a, err, sizeof(err));
    struct tg_tls_set *same = tg_tls_set_renew(cur, three, err, sizeof(err));
    struct tg_tls_set *kept = tg_tls_set_renew(cur, plain, err, sizeof(err));

    cr_assert_eq(same, cur);
    cr_assert_not_null(kept, "%s", err);
    cr_assert_eq(tg_tls_set_ctx(kept, 1), tg_tls_set_ctx(cur, 1));
    tg_tls_set_unref(same);
    tg_tls_set_unref(cur);
    cr_assert(ctx_cn_is(tg_tls_set_ctx(kept, 1), "alpha"), "a shared context was freed");
    tg_tls_set_unref(kept);
    tg_conf_unref(a);
    tg_conf_unref(three);
    tg_conf_unref(plain);
}

/* An SSL holds its own reference: the context outlives the last set
 * (ASan would report the use after free otherwise). */
Test(tls_set, context_outlives_its_set_while_an_ssl_holds_it)
{
    tg_conf *a = conf_with("alpha.crt", "alpha.key", 1, 0);
    struct tg_tls_set *set = tg_tls_set_create(a, err, sizeof(err));
    SSL *ssl = SSL_new(tg_tls_set_ctx(set, 1));

    cr_assert_not_null(ssl);
    tg_tls_set_unref(set);
    cr_assert(ctx_cn_is(SSL_get_SSL_CTX(ssl), "alpha"));
    SSL_free(ssl);
    tg_conf_unref(a);
}

/* ------------------------------------------------------------------ */
/* one context (tg_tls_server_ctx) and what it negotiates, in memory    */
/* (a BIO pair, no socket): ALPN http/1.1 or nothing, TLS 1.2 at least, */
/* forward-secret AEAD suites only; refused files name the file.        */

static char cert_path[128], key_path[128], other_key_path[128];

/* alpha's certificate and key, and beta's key (setup made them). */
static void
ctx_setup(void)
{
    setup();
    snprintf(cert_path, sizeof(cert_path), "%s/alpha.crt", dir);
    snprintf(key_path, sizeof(key_path), "%s/alpha.key", dir);
    snprintf(other_key_path, sizeof(other_key_path), "%s/beta.key", dir);
}

TestSuite(tls_ctx, .init = ctx_setup, .fini = teardown);


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

Test(tls_ctx, pair_loads_and_speaks_http11)
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
Test(tls_ctx, h2_only_client_gets_no_alpn)
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

Test(tls_ctx, old_versions_and_weak_suites_refused)
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

Test(tls_ctx, key_of_another_certificate)
{
    cr_assert_null(tg_tls_server_ctx(cert_path, other_key_path, err, sizeof(err)));
    cr_expect(strncmp(err, other_key_path, strlen(other_key_path)) == 0, "%s", err);
    /* OpenSSL 3 refuses it while loading ("key values mismatch"); the
     * context's own check says "does not match" where it gets that far */
    cr_expect(strstr(err, "key values mismatch") != NULL
              || strstr(err, ": the private key does not match the certificate: ") != NULL,
              "%s", err);
}

Test(tls_ctx, missing_files)
{
    cr_assert_null(tg_tls_server_ctx("/nonexistent/cert.pem", key_path, err, sizeof(err)));
    cr_expect(strncmp(err, "/nonexistent/cert.pem: cannot load the certificate: ", 52) == 0,
              "%s", err);
    cr_assert_null(tg_tls_server_ctx(cert_path, "/nonexistent/key.pem", err, sizeof(err)));
    cr_expect(strncmp(err, "/nonexistent/key.pem: cannot load the private key: ", 51) == 0,
              "%s", err);
}

Test(tls_ctx, garbage_files)
{
    char path[128];
    FILE *f;

    snprintf(path, sizeof(path), "%s/garbage.pem", dir);
    cr_assert_not_null(f = fopen(path, "w"));
    fputs("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n", f);
    fclose(f);
    cr_assert_null(tg_tls_server_ctx(path, key_path, err, sizeof(err)));
    unlink(path);
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
