/*
 * evmem.h - libevent's memory through a per-thread cache of blocks, so a
 * kept-alive connection's buffers cost no malloc per request.
 *
 * libevent frees an evbuffer's chain as soon as it is drained, and
 * allocates a new one (16 KiB and more: reads reserve 16 KiB) for the
 * next bytes: without a cache every request paid four chain mallocs and
 * frees (client in, upstream out, upstream in, client out).  With it, a
 * freed block goes onto its thread's list of its size class (powers of two
 * from 64 bytes to 64 KiB, at most EVMEM_KEEP_BYTES cached per thread) and
 * the next allocation of that class takes it back.
 */
#ifndef TOLLGATE_EVMEM_H
#define TOLLGATE_EVMEM_H

/*
 * Route libevent's allocations through the cache (event_set_mem_functions),
 * once per process (later calls do nothing).  Call it on the main thread
 * before any thread other than the main one uses libevent: the functions
 * libevent calls are then fixed for the life of the process.  Blocks
 * libevent allocated before are freed correctly (a block's class comes
 * from malloc_usable_size, not from a header).  A no-op under
 * AddressSanitizer, which must see every block freed.
 */
void tg_evmem_install(void);

/* 1 when installed (the cache is in use). */
int tg_evmem_installed(void);

#endif
