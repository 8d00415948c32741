/*
 * test_fork.c - fork() from a threaded process never leaves the child stuck.
 *
 * This is what Criterion does for every test, and what the harness does to
 * start processes: fork while other threads allocate.  In the ASan build a
 * fork that lands while another thread holds an allocator lock used to
 * leave the child waiting on it forever (see tests/support/asan_atfork.c).
 * Here three threads allocate and free without pause while the main thread
 * forks children that allocate; every child must exit within a deadline.
 */
#include <criterion/criterion.h>

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static atomic_int stop_churn;

static void *churn(void *arg)
{
    (void) arg;
    while (!atomic_load(&stop_churn)) {
        void *p[64];
        for (int i = 0; i < 64; i++) {
            p[i] = malloc(16 + (size_t) (i * 37) % 4000);
        }
        for (int i = 0; i < 64; i++) {
            free(p[i]);
        }
    }
    return NULL;
}

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for pid up to deadline_ms; kill it past that.  1 if it exited 0. */
static int reap(pid_t pid, long deadline_ms)
{
    int st;
    while (now_ms() < deadline_ms) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            return WIFEXITED(st) && WEXITSTATUS(st) == 0;
        }
        usleep(1000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    return 0;
}

Test(fork, child_of_allocating_threads_never_hangs, .timeout = 120)
{
    pthread_t t[3];
    for (int i = 0; i < 3; i++) {
        cr_assert_eq(pthread_create(&t[i], NULL, churn, NULL), 0);
    }
    int forks = 200, stuck = 0;
    for (int i = 0; i < forks; i++) {
        pid_t pid = fork();
        cr_assert_neq(pid, -1);
        if (pid == 0) {
            char *q[32];
            for (int j = 0; j < 32; j++) {
                q[j] = malloc(16 + (size_t) j * 100);
                memset(q[j], 'x', 16);
            }
            for (int j = 0; j < 32; j++) {
                free(q[j]);
            }
            _exit(0);
        }
        stuck += !reap(pid, now_ms() + 10000);
    }
    atomic_store(&stop_churn, 1);
    for (int i = 0; i < 3; i++) {
        pthread_join(t[i], NULL);
    }
    cr_assert_eq(stuck, 0, "%d of %d children stuck after fork", stuck, forks);
}
