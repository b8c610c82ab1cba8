/*
 * exporter.c - a stand-in for dcgm-exporter in the WhaTap-shaped pod test (tests/test_whatap.py).
 *
 * What matters of the real exporter, and nothing else:
 *   - it loads libnvidia-ml.so.1 with dlopen (as go-nvml does), reads the GPU and MIG devices
 *     once at start, and keeps NVML open until it exits: a GPU client that blocks a GPU reset;
 *   - it serves what it read as Prometheus text over HTTP on $DCGM_EXPORTER_LISTEN (":9400"),
 *     and never reads again, so what it serves goes stale after a MIG reconfiguration;
 *   - it refuses to start without the arguments its image's ENTRYPOINT and CMD give it
 *     (-c MS, then -f FILE), so a wrapper that drops either half of the image's command shows.
 * It writes to stdout only: gpu-supervise's log in front of it is stderr alone.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct nvmlDevice_st *nvmlDevice_t;
typedef int (*init_fn)(void);
typedef int (*count_fn)(unsigned int *);
typedef int (*handle_fn)(unsigned int, nvmlDevice_t *);
typedef int (*string_fn)(nvmlDevice_t, char *, unsigned int);
typedef int (*mode_fn)(nvmlDevice_t, unsigned int *, unsigned int *);
typedef int (*uint_fn)(nvmlDevice_t, unsigned int *);
typedef int (*mig_fn)(nvmlDevice_t, unsigned int, nvmlDevice_t *);

static char body[1 << 16];
static size_t body_len;

static void *need(void *lib, const char *name) {
    void *fn = dlsym(lib, name);
    if (!fn) {
        printf("exporter: NVML has no %s\n", name);
        exit(1);
    }
    return fn;
}

static void add(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void add(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(body + body_len, sizeof body - body_len, fmt, ap);
    va_end(ap);
    if (n > 0 && (size_t)n < sizeof body - body_len) body_len += (size_t)n;
}

/* The devices NVML shows now, as metric lines: one per GPU and one per MIG device, each
 * labelled with its UUID (the node agent's record is made of these labels). */
static int read_devices(void) {
    void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!lib) {
        printf("exporter: cannot load NVML: %s\n", dlerror());
        return -1;
    }
    init_fn init = (init_fn)need(lib, "nvmlInit_v2");
    count_fn count = (count_fn)need(lib, "nvmlDeviceGetCount_v2");
    handle_fn by_index = (handle_fn)need(lib, "nvmlDeviceGetHandleByIndex_v2");
    string_fn uuid = (string_fn)need(lib, "nvmlDeviceGetUUID");
    mode_fn mig_mode = (mode_fn)need(lib, "nvmlDeviceGetMigMode");
    uint_fn max_mig = (uint_fn)need(lib, "nvmlDeviceGetMaxMigDeviceCount");
    mig_fn mig_by_index = (mig_fn)need(lib, "nvmlDeviceGetMigDeviceHandleByIndex");
    uint_fn gi_id = (uint_fn)need(lib, "nvmlDeviceGetGpuInstanceId");
    unsigned int n = 0;
    if (init() != 0 || count(&n) != 0) {
        printf("exporter: NVML failed\n");
        return -1;
    }
    add("# HELP DCGM_FI_DEV_COUNT Devices this exporter read at its start.\n");
    add("# TYPE DCGM_FI_DEV_COUNT gauge\n");
    int entities = 0;
    for (unsigned int i = 0; i < n; i++) {
        nvmlDevice_t gpu, mig;
        char id[96];
        unsigned int current = 0, pending = 0, max = 0, gi = 0;
        if (by_index(i, &gpu) != 0 || uuid(gpu, id, sizeof id) != 0) return -1;
        add("DCGM_FI_DEV_COUNT{gpu=\"%u\",UUID=\"%s\"} 1\n", i, id);
        entities++;
        if (mig_mode(gpu, &current, &pending) != 0 || current != 1) continue;
        if (max_mig(gpu, &max) != 0) return -1;
        for (unsigned int j = 0; j < max; j++) {
            if (mig_by_index(gpu, j, &mig) != 0) continue; /* MIG indices are sparse */
            if (uuid(mig, id, sizeof id) != 0 || gi_id(mig, &gi) != 0) return -1;
            add("DCGM_FI_DEV_COUNT{gpu=\"%u\",UUID=\"%s\",GPU_I_ID=\"%u\"} 1\n", i, id, gi);
            entities++;
        }
    }
    return entities; /* NVML stays initialised: never nvmlShutdown, as the real exporter */
}

/* SIGTERM ends it, also as PID 1 of its container (where no signal has a default action). */
static void on_term(int sig) { _exit(128 + sig); }

static int listen_on(const char *address) {
    const char *colon = strrchr(address, ':');
    int port = atoi(colon ? colon + 1 : address);
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 16) != 0) {
        printf("exporter: cannot listen on %s: %s\n", address, strerror(errno));
        exit(1);
    }
    return fd;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_term);
    if (argc != 5 || strcmp(argv[1], "-c") != 0 || strcmp(argv[3], "-f") != 0 ||
        access(argv[4], R_OK) != 0) {
        printf("usage: dcgm-exporter -c MS -f COLLECTORS.csv\n");
        return 64;
    }
    const char *address = getenv("DCGM_EXPORTER_LISTEN");
    int entities = read_devices();
    if (entities < 0) return 1;
    int server = listen_on(address && *address ? address : ":9400");
    printf("exporter %d: serving %d device(s) on %s\n", (int)getpid(), entities,
           address ? address : ":9400");
    for (;;) {
        int client = accept(server, NULL, NULL);
        if (client < 0) continue;
        char request[1024];
        if (recv(client, request, sizeof request, 0) > 0) {
            char head[128];
            int n = snprintf(head, sizeof head,
                             "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                             "Content-Length: %zu\r\n\r\n", body_len);
            if (send(client, head, (size_t)n, 0) == n) send(client, body, body_len, 0);
        }
        close(client);
    }
}
