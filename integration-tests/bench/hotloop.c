/*
 * Benchmark target of patchbay's `bench` binary (integration-tests/src/bin/bench/):
 * calls a small function, add1, in hot loops and measures itself.
 *
 * Protocol: one command per line on stdin, one answer line per command on stdout
 * (flushed). At start it prints `ready pid=<pid>`.
 *
 *   loop T N     T threads each call add1() N times; print `ns_per_call=<x>` (CPU
 *                time of the slowest thread / N) and ` calls=<T*N>`
 *   burst T N B G  T threads each call add1() N times in bursts of B calls, sleeping G
 *                microseconds between bursts (time for the agent to drain its event
 *                rings); print `ns_per_call=<x> calls=<T*N>` (the median burst's
 *                wall time per call, of the slowest thread)
 *   pace N R     one thread calls add1() N times, R calls per second (busy-waits
 *                between calls); print `paced ns=<elapsed> calls=<N>`
 *   mix B K I    start B threads calling add1() in a loop ("busy"), K threads blocked
 *                in poll() on a pipe nobody writes ("blocked") and I threads waiting on
 *                a condition variable ("idle"); print `mixed threads=<B+K+I>` once every
 *                busy thread has made a call and every other one sleeps in the kernel
 *   stop         end the mix threads, join them; print `stopped calls=<busy calls>`
 *   rdtsc N      execute rdtsc N times; print `ns_per_call=<x> calls=<N>` (CPU time per
 *                rdtsc: what the trace stub's timestamp costs on this machine)
 *   quit         exit 0
 * Anything else prints `error unknown command: <line>`.
 * add2() is never called: a site to patch and retire while the threads run add1().
 */
#define _GNU_SOURCE
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#define MAX_THREADS 128
#define MAX_BURSTS 4096

/* The traced function: two argument registers, opaque body, never inlined or cloned. */
__attribute__((noinline, noipa)) long add1(long x, long y)
{
    __asm__ volatile("" : : "r"(x), "r"(y));
    return x + y + 1;
}

__attribute__((noinline, noipa, used)) long add2(long x, long y)
{
    __asm__ volatile("" : : "r"(x), "r"(y));
    return x + y + 2;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* CPU time of the calling thread (user + system): time the thread spends preempted
 * on a busy machine does not count. A system call: use it around long loops only. */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* ------------------------------------------------------------------ loop */

static long iters;
static double elapsed[MAX_THREADS];

static void *loop_thread(void *arg)
{
    long id = (long)arg, acc = 0;
    double t0 = cpu_now();
    for (long i = 0; i < iters; i++)
        acc = add1(acc, i);
    elapsed[id] = cpu_now() - t0;
    __asm__ volatile("" : : "r"(acc));
    return 0;
}

static void cmd_loop(long t, long n)
{
    pthread_t th[MAX_THREADS];
    iters = n;
    for (long i = 0; i < t; i++)
        pthread_create(&th[i], 0, loop_thread, (void *)i);
    for (long i = 0; i < t; i++)
        pthread_join(th[i], 0);
    double worst = 0;
    for (long i = 0; i < t; i++)
        worst = elapsed[i] > worst ? elapsed[i] : worst;
    printf("ns_per_call=%.4f calls=%ld\n", worst / n, t * n);
}

/* ----------------------------------------------------------------- burst */

static long burst_len, burst_gap_us;

static void *burst_thread(void *arg)
{
    long id = (long)arg, acc = 0;
    double per_call[MAX_BURSTS];
    long bursts = 0;
    for (long done = 0; done < iters; done += burst_len) {
        long n = iters - done < burst_len ? iters - done : burst_len;
        double t0 = now();
        for (long i = 0; i < n; i++)
            acc = add1(acc, i);
        if (bursts < MAX_BURSTS)
            per_call[bursts++] = (now() - t0) / n;
        usleep(burst_gap_us);
    }
    /* The median burst: a burst the scheduler preempted does not count. */
    qsort(per_call, bursts, sizeof per_call[0], cmp_double);
    elapsed[id] = bursts ? per_call[bursts / 2] * iters : 0;
    __asm__ volatile("" : : "r"(acc));
    return 0;
}

static void cmd_burst(long t, long n, long b, long g)
{
    pthread_t th[MAX_THREADS];
    iters = n;
    burst_len = b;
    burst_gap_us = g;
    for (long i = 0; i < t; i++)
        pthread_create(&th[i], 0, burst_thread, (void *)i);
    for (long i = 0; i < t; i++)
        pthread_join(th[i], 0);
    double worst = 0;
    for (long i = 0; i < t; i++)
        worst = elapsed[i] > worst ? elapsed[i] : worst;
    printf("ns_per_call=%.4f calls=%ld\n", worst / n, t * n);
}

/* ----------------------------------------------------------------- rdtsc */

static void cmd_rdtsc(long n)
{
    unsigned long long acc = 0;
    double t0 = cpu_now();
    for (long i = 0; i < n; i++)
        acc += __rdtsc();
    double t = cpu_now() - t0;
    __asm__ volatile("" : : "r"(acc));
    printf("ns_per_call=%.4f calls=%ld\n", t / n, n);
}

/* ------------------------------------------------------------------ pace */

static void cmd_pace(long n, long rate)
{
    double gap = 1e9 / (double)rate, t0 = now(), next = t0;
    long acc = 0;
    for (long i = 0; i < n; i++) {
        acc = add1(acc, i);
        next += gap;
        while (now() < next) {
        }
    }
    __asm__ volatile("" : : "r"(acc));
    printf("paced ns=%.0f calls=%ld\n", now() - t0, n);
}

/* ------------------------------------------------------------------- mix */

static pthread_t mix_th[MAX_THREADS];
static pid_t mix_tid[MAX_THREADS];
static long mix_busy, mix_total;
static atomic_int mix_stop, mix_started;
static atomic_ulong mix_calls;
static int mix_pipe[2] = {-1, -1};
static pthread_mutex_t mix_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t mix_cv = PTHREAD_COND_INITIALIZER;

static void *busy_thread(void *arg)
{
    (void)arg;
    unsigned long calls = 0;
    long acc = 0;
    acc = add1(acc, 1);
    calls++;
    atomic_fetch_add(&mix_started, 1);
    while (!atomic_load_explicit(&mix_stop, memory_order_relaxed)) {
        for (int i = 0; i < 1000; i++)
            acc = add1(acc, i);
        calls += 1000;
    }
    __asm__ volatile("" : : "r"(acc));
    atomic_fetch_add(&mix_calls, calls);
    return 0;
}

static void *blocked_thread(void *arg)
{
    long i = (long)arg;
    mix_tid[i] = (pid_t)syscall(SYS_gettid);
    atomic_fetch_add(&mix_started, 1);
    while (!atomic_load(&mix_stop)) {
        struct pollfd pfd = {.fd = mix_pipe[0], .events = POLLIN};
        poll(&pfd, 1, -1);
    }
    return 0;
}

static void *idle_thread(void *arg)
{
    long i = (long)arg;
    mix_tid[i] = (pid_t)syscall(SYS_gettid);
    atomic_fetch_add(&mix_started, 1);
    pthread_mutex_lock(&mix_mu);
    while (!atomic_load(&mix_stop))
        pthread_cond_wait(&mix_cv, &mix_mu);
    pthread_mutex_unlock(&mix_mu);
    return 0;
}

/* The thread's state letter in /proc/self/task/TID/stat ('S': sleeping). */
static char task_state(pid_t tid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return '?';
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && p[1] == ' ' ? p[2] : '?';
}

static void cmd_mix(long b, long k, long idle)
{
    if (mix_total || b + k + idle > MAX_THREADS || b + k + idle <= 0) {
        printf("error mix: already running or bad sizes\n");
        return;
    }
    if (mix_pipe[0] < 0 && pipe(mix_pipe) != 0) {
        printf("error pipe\n");
        return;
    }
    atomic_store(&mix_stop, 0);
    atomic_store(&mix_started, 0);
    atomic_store(&mix_calls, 0);
    mix_busy = b;
    mix_total = b + k + idle;
    for (long i = 0; i < mix_total; i++) {
        mix_tid[i] = 0;
        void *(*fn)(void *) = i < b ? busy_thread : i < b + k ? blocked_thread : idle_thread;
        pthread_create(&mix_th[i], 0, fn, (void *)i);
    }
    while (atomic_load(&mix_started) < mix_total)
        usleep(1000);
    for (long i = b; i < mix_total; i++)
        while (task_state(mix_tid[i]) != 'S')
            usleep(1000);
    printf("mixed threads=%ld\n", mix_total);
}

static void cmd_stop(void)
{
    atomic_store(&mix_stop, 1);
    if (write(mix_pipe[1], "x", 1) != 1) {
        /* the blocked threads would not wake: nothing else to do */
    }
    pthread_mutex_lock(&mix_mu);
    pthread_cond_broadcast(&mix_cv);
    pthread_mutex_unlock(&mix_mu);
    for (long i = 0; i < mix_total; i++)
        pthread_join(mix_th[i], 0);
    char c;
    if (read(mix_pipe[0], &c, 1) != 1) {
        /* cannot happen: one byte was written */
    }
    mix_total = 0;
    printf("stopped calls=%lu\n", atomic_load(&mix_calls));
}

int main(void)
{
    char line[128];
    printf("ready pid=%d\n", (int)getpid());
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        long a, b, c, d;
        if (sscanf(line, "loop %ld %ld", &a, &b) == 2 && a > 0 && a <= MAX_THREADS && b > 0) {
            cmd_loop(a, b);
        } else if (sscanf(line, "burst %ld %ld %ld %ld", &a, &b, &c, &d) == 4 && a > 0 &&
                   a <= MAX_THREADS && b > 0 && c > 0 && d >= 0) {
            cmd_burst(a, b, c, d);
        } else if (sscanf(line, "pace %ld %ld", &a, &b) == 2 && a > 0 && b > 0) {
            cmd_pace(a, b);
        } else if (sscanf(line, "mix %ld %ld %ld", &a, &b, &c) == 3 && a >= 0 && b >= 0 &&
                   c >= 0) {
            cmd_mix(a, b, c);
        } else if (sscanf(line, "rdtsc %ld", &a) == 1 && a > 0) {
            cmd_rdtsc(a);
        } else if (!strncmp(line, "stop", 4)) {
            cmd_stop();
        } else if (!strncmp(line, "quit", 4)) {
            return 0;
        } else {
            line[strcspn(line, "\n")] = 0;
            printf("error unknown command: %s\n", line);
        }
        fflush(stdout);
    }
    return 0;
}
