/* stamp.c - the benchmark's child: prints CLOCK_REALTIME in ns at the moments that matter.
 *   stamp now    print the time main() starts, exit 0   (start-to-first-instruction)
 *   stamp term   print "ready", wait for SIGTERM, print the time the handler ran, exit 0 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t got;
static struct timespec when;

static void on_term(int sig) {
    (void)sig;
    clock_gettime(CLOCK_REALTIME, &when);
    got = 1;
}

int main(int argc, char **argv) {
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (argc > 1 && !strcmp(argv[1], "term")) {
        signal(SIGTERM, on_term);
        printf("ready\n");
        fflush(stdout);
        while (!got) pause();
        printf("%lld\n", (long long)when.tv_sec * 1000000000LL + when.tv_nsec);
        return 0;
    }
    printf("%lld\n", (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    return 0;
}
