/*
 * test_tls.c - the listeners' TLS context sets (tls.c): one context per
 * TLS listener, a reload renews them (or keeps them where a listener's
 * TLS changes only at restart), a bad certificate refuses the renewal,
 * and a context outlives its set while an SSL holds it.  Certificates are
 * made here with OpenSSL (P-256, self-signed), written to a temp dir.
 */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
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
