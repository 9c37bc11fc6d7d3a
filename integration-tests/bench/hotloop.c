// Benchmark target: calls a small function in a hot loop and measures ns per call
// itself (CLOCK_MONOTONIC around the loop). Commands on stdin, one answer per line:
//   loop T N   -> T threads each call add1() N times; prints "ns_per_call=<x>"
//                 (wall time of the slowest thread / N)
//   quit
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

__attribute__((noinline)) long add1(long x, long y) { return x + y + 1; }

static long iters;
static double elapsed[64];

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e9 + ts.tv_nsec;
}

static void *run(void *arg) {
  long id = (long)arg, acc = 0;
  double t0 = now();
  for (long i = 0; i < iters; i++) acc = add1(acc, i);
  elapsed[id] = now() - t0;
  __asm__ volatile("" ::"r"(acc));
  return 0;
}

int main(void) {
  char line[128];
  printf("ready\n");
  fflush(stdout);
  while (fgets(line, sizeof line, stdin)) {
    long t, n;
    if (sscanf(line, "loop %ld %ld", &t, &n) == 2 && t > 0 && t <= 64) {
      pthread_t th[64];
      iters = n;
      for (long i = 0; i < t; i++) pthread_create(&th[i], 0, run, (void *)i);
      for (long i = 0; i < t; i++) pthread_join(th[i], 0);
      double worst = 0;
      for (long i = 0; i < t; i++) worst = elapsed[i] > worst ? elapsed[i] : worst;
      printf("ns_per_call=%.4f\n", worst / n);
    } else if (!strncmp(line, "quit", 4)) {
      return 0;
    } else {
      printf("error unknown command\n");
    }
    fflush(stdout);
  }
  return 0;
}
