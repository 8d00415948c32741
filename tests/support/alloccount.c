/*
 * alloccount.c - an LD_PRELOAD shim counting heap calls of a process:
 * malloc, calloc, realloc, free and the aligned allocators, every thread
 * together.  Built by meson (tests/meson.build, plain builds only: ASan
 * brings its own allocator) as alloccount.so.
 *
 *   TG_ALLOCCOUNT_FILE=/tmp/counts LD_PRELOAD=build/tests/alloccount.so prog
 *
 * The counts live in TG_ALLOCCOUNT_FILE, mapped shared: the file holds
 * struct tg_alloccount (below) at offset 0, always current, so a test
 * reads it (pread) whenever it likes - no signal, no thread, nothing the
 * program under test would notice.  Without the variable the shim only
 * counts in memory.
 *
 * The real allocator is glibc's own (__libc_malloc and friends): no
 * dlsym, which itself allocates.  Counting costs one relaxed atomic add
 * per call.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

/* The file's layout (the test reads the same struct). */
struct tg_alloccount {
    uint64_t magic;               /* TG_ALLOCCOUNT_MAGIC once mapped */
    uint64_t malloc_calls;
    uint64_t calloc_calls;
    uint64_t realloc_calls;
    uint64_t free_calls;          /* free of non-NULL pointers */
    uint64_t memalign_calls;      /* posix_memalign, aligned_alloc, memalign */
};
#define TG_ALLOCCOUNT_MAGIC 0x74676163636f756eull   /* "tgaccoun" */

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t size);
extern void  __libc_free(void *p);
extern void *__libc_memalign(size_t align, size_t size);

static struct tg_alloccount early;          /* until the file is mapped */
static struct tg_alloccount *ctr = &early;

#define COUNT(field) __atomic_fetch_add(&ctr->field, 1, __ATOMIC_RELAXED)

__attribute__((constructor)) static void
alloccount_init(void)
{
    const char *path = getenv("TG_ALLOCCOUNT_FILE");
    struct tg_alloccount *m;
    int fd;

    if (path == NULL || *path == '\0') {
        return;
    }
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        return;
    }
    if (ftruncate(fd, 4096) != 0) {
        close(fd);
        return;
    }
    m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        return;
    }
    /* what was counted before (the loader, other constructors) carries over */
    m->malloc_calls = early.malloc_calls;
    m->calloc_calls = early.calloc_calls;
    m->realloc_calls = early.realloc_calls;
    m->free_calls = early.free_calls;
    m->memalign_calls = early.memalign_calls;
    __atomic_store_n(&m->magic, TG_ALLOCCOUNT_MAGIC, __ATOMIC_RELEASE);
    __atomic_store_n(&ctr, m, __ATOMIC_RELEASE);
}

void *
malloc(size_t size)
{
    COUNT(malloc_calls);
    return __libc_malloc(size);
}

void *
calloc(size_t n, size_t size)
{
    COUNT(calloc_calls);
    return __libc_calloc(n, size);
}

void *
realloc(void *p, size_t size)
{
    COUNT(realloc_calls);
    return __libc_realloc(p, size);
}

void
free(void *p)
{
    if (p != NULL) {
        COUNT(free_calls);
    }
    __libc_free(p);
}

void *
memalign(size_t align, size_t size)
{
    COUNT(memalign_calls);
    return __libc_memalign(align, size);
}

void *
aligned_alloc(size_t align, size_t size)
{
    COUNT(memalign_calls);
    return __libc_memalign(align, size);
}

int
posix_memalign(void **out, size_t align, size_t size)
{
    void *p;

    if (align < sizeof(void *) || (align & (align - 1)) != 0) {
        return EINVAL;
    }
    COUNT(memalign_calls);
    p = __libc_memalign(align, size);
    if (p == NULL) {
        return ENOMEM;
    }
    *out = p;
    return 0;
}
