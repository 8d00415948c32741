/*
 * fuzz_keys.c - libFuzzer target for src/keys.c: the keys file loader's
 * two paths must agree.  Built by meson with -Dfuzz=true (CC=clang), run
 * by scripts/fuzz; by hand:
 *
 *   CC=clang meson setup build-fuzz -Dfuzz=true && meson compile -C build-fuzz fuzz_keys
 *   build-fuzz/tests/fuzz/fuzz_keys tests/fuzz/seeds/keys
 *
 * The input is loaded as is (the fast one-line path when it fits, else
 * libyaml) and again behind "%YAML 1.1\n---\n", which YAML reads the same
 * but the fast path never takes.  Both must load or both fail, and a
 * loaded set must be the same: count, and for every key its id, tier and
 * flag (looked up by digest in the other).  Inputs that already carry a
 * directive or a document marker are only loaded (the prefix would
 * change their meaning).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tollgate/keys.h"

static char fz_err[512];

/* Every key of a is in b with the same fields. */
static void
fz_same(const struct tg_keys *a, const struct tg_keys *b, const char *text,
        size_t len)
{
    const char *p = text, *end = text + len, *h;
    const tg_key *ka, *kb;
    uint8_t d[32];

    if (tg_keys_count(a) != tg_keys_count(b)) {
        abort();
    }
    /* Digests are found where the text has 64 hex digits in a row. */
    for (; p + 64 <= end; p++) {
        for (h = p; h < p + 64 && ((*h >= '0' && *h <= '9') ||
                                   ((*h | 0x20) >= 'a' && (*h | 0x20) <= 'f')); h++) {
        }
        if (h < p + 64 || tg_keys_unhex(p, 64, d) != TG_OK) {
            continue;
        }
        ka = tg_keys_find(a, d);
        kb = tg_keys_find(b, d);
        if ((ka == NULL) != (kb == NULL)) {
            abort();
        }
        if (ka != NULL && (strcmp(ka->id, kb->id) != 0 ||
                           strcmp(ka->tier, kb->tier) != 0 ||
                           ka->enabled != kb->enabled)) {
            abort();
        }
    }
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char prefix[] = "%YAML 1.1\n---\n";
    const char *text = (const char *)data;
    struct tg_keys *a, *b;
    char *wrapped;

    a = tg_keys_load_string("f.yaml", text, size, fz_err, sizeof(fz_err));
    if (memchr(data, '%', size) != NULL || memmem(data, size, "---", 3) != NULL ||
        memmem(data, size, "...", 3) != NULL || memchr(data, '\0', size) != NULL) {
        tg_keys_destroy(a);
        return 0;
    }
    wrapped = malloc(sizeof(prefix) - 1 + size);
    if (wrapped == NULL) {
        abort();
    }
    memcpy(wrapped, prefix, sizeof(prefix) - 1);
    memcpy(wrapped + sizeof(prefix) - 1, data, size);
    b = tg_keys_load_string("f.yaml", wrapped, sizeof(prefix) - 1 + size, fz_err,
                            sizeof(fz_err));
    if ((a == NULL) != (b == NULL)) {
        abort();
    }
    if (a != NULL) {
        fz_same(a, b, text, size);
    }
    tg_keys_destroy(a);
    tg_keys_destroy(b);
    free(wrapped);
    return 0;
}
