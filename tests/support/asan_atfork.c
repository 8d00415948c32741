/*
 * asan_atfork.c - make fork() safe in AddressSanitizer test programs.
 *
 * Criterion runs each test in a child it forks from its runner, and the
 * runner has other threads (the nanomsg poller, the timeout and waitid
 * threads) that allocate.  GCC 12's libasan installs no at-fork handler: a
 * fork taken while another thread holds one of the allocator's region
 * mutexes leaves that mutex locked forever in the child, whose next malloc
 * (BoxFort's own, before execve) waits on it for good.
 *
 * This file does what newer compiler-rt does itself (asan_posix.cpp,
 * InstallAtForkHandler): around every fork, take the thread registry, the
 * allocator and the stack depot, and release them on both sides.  No lock
 * is then held by a thread that does not exist in the child.
 *
 * The functions are internal to the sanitizer runtime; libasan.so does not
 * export them, so the sanitized build links the runtime statically
 * (-static-libasan, see meson.build).  Built only when ASan is on.
 */
#include <pthread.h>

void tg_asan_lock_threads(void)   __asm__("_ZN6__lsan18LockThreadRegistryEv");
void tg_asan_unlock_threads(void) __asm__("_ZN6__lsan20UnlockThreadRegistryEv");
void tg_asan_lock_alloc(void)     __asm__("_ZN6__lsan13LockAllocatorEv");
void tg_asan_unlock_alloc(void)   __asm__("_ZN6__lsan15UnlockAllocatorEv");
void tg_asan_lock_depot(void)     __asm__("_ZN11__sanitizer17StackDepotLockAllEv");
void tg_asan_unlock_depot(void)   __asm__("_ZN11__sanitizer19StackDepotUnlockAllEv");

static void before_fork(void)
{
    tg_asan_lock_threads();
    tg_asan_lock_alloc();
    tg_asan_lock_depot();
}

static void after_fork(void)
{
    tg_asan_unlock_depot();
    tg_asan_unlock_alloc();
    tg_asan_unlock_threads();
}

__attribute__((constructor)) static void install_atfork(void)
{
    pthread_atfork(before_fork, after_fork, after_fork);
}
