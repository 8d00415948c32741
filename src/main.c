/*
 * main.c - the command line: options, the configuration test (-t) and the
 * subcommands (keygen, alert-test); the process itself runs in server.c.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tollgate/alerts.h"
#include "tollgate/common.h"
#include "tollgate/conf.h"
#include "tollgate/keys.h"
#include "tollgate/server.h"
#include "tollgate/tls.h"

#define DEFAULT_CONF "/etc/tollgate/tollgate.yaml"

static void usage(FILE *out);
static int  keygen(int argc, char **argv);
static int  check_config(const char *path);

int
main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "config",  required_argument, NULL, 'c' },
        { "test",    no_argument,       NULL, 't' },
        { "version", no_argument,       NULL, 'v' },
        { "help",    no_argument,       NULL, 'h' },
        { NULL, 0, NULL, 0 }
    };
    const char *path = DEFAULT_CONF;
    int test = 0, ch;

    if (argc > 1 && strcmp(argv[1], "keygen") == 0) {
        return keygen(argc - 1, argv + 1);
    }
    if (argc > 1 && strcmp(argv[1], "alert-test") == 0) {
        return tg_alerts_cli_test(argc - 1, argv + 1);
    }
    while ((ch = getopt_long(argc, argv, "c:tvVh", opts, NULL)) != -1) {
        switch (ch) {
        case 'c': path = optarg; break;
        case 't': test = 1; break;
        case 'v':
        case 'V':
            printf("tollgate %s\n", TG_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "tollgate: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    return test ? check_config(path) : tg_server_run(path);
}

static void
usage(FILE *out)
{
    fprintf(out,
        "usage: tollgate [-c FILE] [-t] [-v] [-h]\n"
        "       tollgate keygen --id ID --tier TIER   new API key + its keys.yaml entry\n"
        "       tollgate alert-test -c FILE [--channel NAME]   one test alert per channel\n"
        "  -c, --config FILE  configuration file (default " DEFAULT_CONF ")\n"
        "  -t, --test         check the configuration (its keys and TLS files), or a\n"
        "                     keys file given as FILE, then exit 0 or 1\n"
        "  -v, --version      print the version and exit\n"
        "  -h, --help         print this help and exit\n"
        "signals: SIGTERM, SIGINT and SIGQUIT drain and exit (a second SIGINT or\n"
        "SIGQUIT: at once); SIGHUP reloads the configuration, keys and TLS\n"
        "certificates (restart-only keys are named in the log) and reopens the\n"
        "access log\n");
}

/* Make a new API key: print it once, and the keys file entry holding only
 * its SHA-256, so nobody hashes by hand. */
static int
keygen(int argc, char **argv)
{
    static const struct option opts[] = {
        { "id",   required_argument, NULL, 'i' },
        { "tier", required_argument, NULL, 't' },
        { NULL, 0, NULL, 0 }
    };
    const char *id = NULL, *tier = NULL;
    char key[64], hex[65];
    uint8_t digest[32];
    int ch;

    optind = 1;
    while ((ch = getopt_long(argc, argv, "i:t:", opts, NULL)) != -1) {
        switch (ch) {
        case 'i': id = optarg; break;
        case 't': tier = optarg; break;
        default:
            fprintf(stderr, "usage: tollgate keygen --id ID --tier TIER\n");
            return 2;
        }
    }
    if (id == NULL || tier == NULL || optind != argc) {
        fprintf(stderr, "usage: tollgate keygen --id ID --tier TIER\n");
        return 2;
    }
    if (tg_keys_generate(key) != TG_OK) {
        fprintf(stderr, "tollgate: cannot generate a key (getrandom failed)\n");
        return 1;
    }
    tg_keys_hash(key, strlen(key), digest);
    tg_keys_hex(digest, hex);
    printf("API key (shown once, give it to the consumer): %s\n\n"
           "Add to the keys file, then reload (SIGHUP) or restart:\n"
           "  - { id: %s, tier: %s, sha256: \"%s\", enabled: true }\n",
           key, id, tier, hex);
    return 0;
}

static int
check_config(const char *path)
{
    char err[TG_CONF_ERRLEN];
    struct tg_tls_set *tls;
    tg_conf *conf = tg_conf_load(path, err, sizeof(err));

    if (conf == NULL && strstr(err, "unknown key \"keys\" at top level") != NULL) {
        /* a keys file (auth.keys_file) given to -t: check it as one */
        struct tg_keys *keys = tg_keys_load(path, err, sizeof(err));
        if (keys == NULL) {
            fprintf(stderr, "tollgate: %s\ntollgate: keys file %s test failed\n", err, path);
            return 1;
        }
        tg_keys_unref(keys);
        fprintf(stderr, "tollgate: keys file %s test is successful\n", path);
        return 0;
    }
    if (conf == NULL) {
        fprintf(stderr, "tollgate: %s\ntollgate: configuration file %s test failed\n",
                err, path);
        return 1;
    }
    tls = tg_tls_set_create(conf, err, sizeof(err));
    if (tls == NULL) {
        fprintf(stderr, "tollgate: %s\ntollgate: configuration file %s test failed\n",
                err, path);
        tg_conf_unref(conf);
        return 1;
    }
    tg_tls_set_unref(tls);
    {
        struct tg_keys *keys = NULL;
        if (tg_server_load_keys(conf, &keys, err, sizeof(err)) != TG_OK) {
            fprintf(stderr, "tollgate: %s\ntollgate: configuration file %s test failed\n",
                    err, path);
            tg_conf_unref(conf);
            return 1;
        }
        tg_keys_unref(keys);
    }
    fprintf(stderr, "tollgate: configuration file %s test is successful\n", path);
    tg_conf_unref(conf);
    return 0;
}
