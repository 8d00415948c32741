/*
 * coarsetick.c - an LD_PRELOAD shim that gives CLOCK_MONOTONIC_COARSE a
 * 25 ms tick: the value is CLOCK_MONOTONIC rounded down to a multiple of
 * 25 ms, so it lags real time by 0 to 25 ms.  Built by meson
 * (tests/meson.build) as coarsetick.so.
 *
 *   LD_PRELOAD=build/tests/coarsetick.so tg-testup -p 0
 *
 * Why: libevent's timers run on CLOCK_MONOTONIC_COARSE unless a base asks
 * for EVENT_BASE_FLAG_PRECISE_TIMER.  That clock advances once per kernel
 * tick (4 ms at HZ=250) and, in a VM whose timekeeping CPU is held off
 * by the host, stalls for several ticks: 20-27 ms measured on the test
 * machine.  A timer armed while the clock lags fires early by the lag.
 * The shim makes that case happen on every request instead of in one run
 * of 20 (tests/integration/test_adaptive.c, upstream_delays_are_exact).
 *
 * Every other clock goes to the kernel unchanged.
 */
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TICK_NS 25000000LL

int
clock_gettime(clockid_t id, struct timespec *ts)
{
    long long ns;

    if (id != CLOCK_MONOTONIC_COARSE) {
        return (int)syscall(SYS_clock_gettime, id, ts);
    }
    if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, ts) != 0) {
        return -1;
    }
    ns = (long long)ts->tv_sec * 1000000000LL + ts->tv_nsec;
    ns -= ns % TICK_NS;
    ts->tv_sec = (time_t)(ns / 1000000000LL);
    ts->tv_nsec = (long)(ns % 1000000000LL);
    return 0;
}
