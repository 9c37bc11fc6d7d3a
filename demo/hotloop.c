/*
 * hotloop: a small program to try `patchbay run` on.
 *
 *     hotloop [ITERATIONS [START_DELAY_MS]]
 *
 * Two threads run ITERATIONS iterations each (default 16000000) of a loop that calls four
 * functions at different, fixed rates:
 *
 *     parse_record  every iteration               (2 x ITERATIONS calls)
 *     checksum      every 2nd iteration, thread 0 (ITERATIONS / 2)
 *                   every 4th iteration, thread 1 (ITERATIONS / 4)
 *     is_prime      every 8th iteration           (2 x ITERATIONS / 8)
 *     render_line   every 64th iteration          (2 x ITERATIONS / 64)
 *
 * plus `worker` once per thread. The call counts depend only on ITERATIONS; the program
 * prints them at the end, on one line, so that what patchbay counted can be checked
 * against them. The threads start after START_DELAY_MS (default 0: `patchbay run` holds
 * the program before `main` until its tracer is live, so no delay is needed; a delay
 * leaves time to attach by hand with `patchbay attach`).
 *
 * Built by build.sh with `gcc -pg -mfentry -mrecord-mcount`: every function starts with
 * a call to __fentry__ that the agent turns into a patchable 5-byte nop.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Keep every traced function a real, separately called function: no inlining, no
 * cloning into `.constprop`/`.isra` variants, no merging of identical bodies. */
#if defined(__clang__)
#define TRACED __attribute__((noinline, used))
#else
#define TRACED __attribute__((noipa, used))
#endif

struct record {
    uint32_t id;
    uint32_t value;
    char name[16];
};

struct counts {
    unsigned long parse_record;
    unsigned long checksum;
    unsigned long is_prime;
    unsigned long render_line;
};

struct job {
    int index;
    unsigned long iterations;
    struct counts counts;
    uint64_t sink;
};

static const char *const LINES[8] = {
    "id=17 value=4099 name=alpha",    "id=2 value=65537 name=beta",
    "id=311 value=7919 name=gamma",   "id=4 value=104729 name=delta",
    "id=5000 value=1299709 name=eps", "id=61 value=15485863 name=zeta",
    "id=7 value=32452843 name=eta",   "id=808 value=49979687 name=theta",
};

/* Parses "id=N value=N name=S" into `out`; returns the number of fields read. */
TRACED int parse_record(const char *text, struct record *out)
{
    int fields = 0;
    memset(out, 0, sizeof *out);
    while (*text) {
        const char *eq = strchr(text, '=');
        if (!eq)
            break;
        const char *value = eq + 1;
        const char *end = strchr(value, ' ');
        size_t len = end ? (size_t)(end - value) : strlen(value);
        if (eq - text == 2 && text[0] == 'i') {
            out->id = (uint32_t)strtoul(value, NULL, 10);
            fields++;
        } else if (eq - text == 5 && text[0] == 'v') {
            out->value = (uint32_t)strtoul(value, NULL, 10);
            fields++;
        } else if (eq - text == 4 && text[0] == 'n') {
            if (len >= sizeof out->name)
                len = sizeof out->name - 1;
            memcpy(out->name, value, len);
            fields++;
        }
        if (!end)
            break;
        text = end + 1;
    }
    return fields;
}

/* FNV-1a over the bytes of a record. */
TRACED uint64_t checksum(const struct record *r)
{
    const unsigned char *p = (const unsigned char *)r;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < sizeof *r; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Trial division. */
TRACED int is_prime(uint32_t n)
{
    if (n < 2)
        return 0;
    if (n % 2 == 0)
        return n == 2;
    for (uint32_t d = 3; d <= n / d && d < 2000; d += 2)
        if (n % d == 0)
            return 0;
    return 1;
}

/* Formats a record as a report line into `buf`. */
TRACED int render_line(const struct record *r, char *buf, size_t size)
{
    return snprintf(buf, size, "%-16s #%-6u %12u\n", r->name, r->id, r->value);
}

TRACED void *worker(void *arg)
{
    struct job *job = arg;
    struct counts *c = &job->counts;
    /* Thread 0 checksums every 2nd record, thread 1 every 4th. */
    unsigned long checksum_every = job->index == 0 ? 2 : 4;
    struct record rec;
    char line[64];
    uint64_t sink = 0;

    for (unsigned long i = 0; i < job->iterations; i++) {
        sink += (uint64_t)parse_record(LINES[(i + (unsigned long)job->index) % 8], &rec);
        c->parse_record++;
        rec.value += (uint32_t)i;
        if (i % checksum_every == 0) {
            sink ^= checksum(&rec);
            c->checksum++;
        }
        if (i % 8 == 0) {
            sink += (uint64_t)is_prime(rec.value);
            c->is_prime++;
        }
        if (i % 64 == 0) {
            sink += (uint64_t)render_line(&rec, line, sizeof line);
            c->render_line++;
        }
    }
    job->sink = sink;
    return NULL;
}

static unsigned long parse_arg(const char *arg, const char *what)
{
    char *end;
    unsigned long value = strtoul(arg, &end, 10);
    if (*arg == '\0' || *end != '\0') {
        fprintf(stderr, "hotloop: %s must be a number, not '%s'\n", what, arg);
        fprintf(stderr, "usage: hotloop [ITERATIONS [START_DELAY_MS]]\n");
        exit(2);
    }
    return value;
}

int main(int argc, char **argv)
{
    unsigned long iterations = argc > 1 ? parse_arg(argv[1], "ITERATIONS") : 16000000;
    unsigned long delay_ms = argc > 2 ? parse_arg(argv[2], "START_DELAY_MS") : 0;
    struct job jobs[2];
    pthread_t threads[2];

    printf("hotloop: pid %ld, 2 threads x %lu iterations, starting in %lu ms\n",
           (long)getpid(), iterations, delay_ms);
    fflush(stdout);
    struct timespec delay = {(time_t)(delay_ms / 1000), (long)(delay_ms % 1000) * 1000000L};
    nanosleep(&delay, NULL);

    for (int t = 0; t < 2; t++) {
        memset(&jobs[t], 0, sizeof jobs[t]);
        jobs[t].index = t;
        jobs[t].iterations = iterations;
        if (pthread_create(&threads[t], NULL, worker, &jobs[t]) != 0) {
            perror("hotloop: pthread_create");
            return 1;
        }
    }
    struct counts total = {0, 0, 0, 0};
    uint64_t sink = 0;
    for (int t = 0; t < 2; t++) {
        pthread_join(threads[t], NULL);
        total.parse_record += jobs[t].counts.parse_record;
        total.checksum += jobs[t].counts.checksum;
        total.is_prime += jobs[t].counts.is_prime;
        total.render_line += jobs[t].counts.render_line;
        sink ^= jobs[t].sink;
    }
    printf("hotloop: calls parse_record=%lu checksum=%lu is_prime=%lu render_line=%lu "
           "worker=2 (sink %llx)\n",
           total.parse_record, total.checksum, total.is_prime, total.render_line,
           (unsigned long long)sink);
    return 0;
}
