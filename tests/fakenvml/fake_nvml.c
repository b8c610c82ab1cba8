/*
 * fake_nvml.c - a stand-in libnvidia-ml.so.1 for tests on machines without a GPU.
 *
 * The real nvidia-ml-py loads this library through the dynamic loader (LD_LIBRARY_PATH),
 * exactly as it loads the driver's. It implements the NVML entry points gpu-supervise and
 * its test agents call, with the real signatures and structs, and answers from a node
 * description in the text file named by $FAKE_NVML_NODE. The file is re-read at every
 * nvmlInit, so a test can rewrite it while a process runs (a MIG reconfiguration, a GPU lost).
 *
 * Node file, one directive a line ('#' starts a comment, values may be "quoted"):
 *   driver 550.54.15
 *   nvml 12.550.54.15
 *   gpu index=0 uuid=GPU-... name="NVIDIA A100-SXM4-40GB" bus=00000000:07:00.0
 *       mig=1 pending=1 maxmig=7 temp=33 pstate=0 events=0x...   (mig=-1: MIG not supported)
 *   mig gpu=0 index=3 uuid=MIG-... gi=7 ci=0 slices=1 mem=4864 name="... MIG 1g.5gb"
 *   fail fn=NAME code=N count=K     next K calls of NAME fail with N (K=-1: always; fn=*: any)
 *   delay fn=NAME ms=N              every call of NAME sleeps N ms first (fn=*: any)
 *   hang fn=NAME                    calls of NAME never return
 * Quoted values may hold any byte as \xHH (a name that is not UTF-8, an escape character).
 * Failure counters live in this process and restart whenever the file's content changes.
 *
 * Who holds the GPU: like the driver, which refuses a GPU reset while any process has NVML
 * open, the library registers the calling process in the folder $FAKE_NVML_NODE.holders/ on
 * its first nvmlInit (a file named after the pid, holding its start time) and removes it when
 * the last nvmlShutdown balances the inits. tests/fakenvml reads the folder to play a reset.
 *
 * Device files: real NVML, while initialised, holds /dev/nvidiactl and /dev/nvidia<N> open, and
 * that is how a process blocking a GPU reset can be found (its /proc/PID/fd). The library does
 * the same with plain files: on the first nvmlInit (the count of inits going from 0 to 1) it
 * opens <dev dir>/nvidiactl and <dev dir>/nvidia<index> for each GPU of the node, read-write and
 * close-on-exec, and closes them all on the nvmlShutdown that balances the inits. <dev dir> is
 * $FAKE_NVML_DEV_DIR when set, else <node file>.dev; the folder and the files (empty, mode 0666,
 * as the driver's are open to everyone) are created when missing. A file that cannot be opened
 * (a read-only mount) is left out; nvmlInit still succeeds.
 *
 * For tests that must prove a negative or wait for a fault:
 *   $FAKE_NVML_LOADS     a file the library appends its process's pid to when it is loaded:
 *                        a process that never wrote there never loaded NVML at all;
 *   <node file>.hanging  a line "pid function" is appended when a `hang` rule takes a call.
 *
 * NVIDIA's header is the contract: built with -DFAKE_NVML_CHECK_HEADER and nvml.h on the include
 * path (tests/test_nvidia.py does, with the header from Debian's libnvidia-ml-dev), every entry
 * point below is defined against nvml.h's own declaration, so a prototype of its own is a
 * "conflicting types" error, one nvml.h does not declare an error of -Wmissing-prototypes
 * (tests/fakenvml's build_library makes every warning an error there), and the types this file
 * declares for the stand-alone build are declared as fake_<name> and asserted to match nvml.h's:
 * sizes, field offsets, field types and constants. Built without it (every other test, and the
 * benchmarks), nvml.h is not needed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef FAKE_NVML_CHECK_HEADER
/* nvml.h would otherwise #define nvmlInit as nvmlInit_v2 (and nvmlDeviceGetCount, ...GetPciInfo,
 * ...GetAttributes as their versioned names): the legacy entry points defined below would then
 * be second definitions of the versioned ones. With it, nvml.h declares both, as the library
 * exports both. */
#define NVML_NO_UNVERSIONED_FUNC_DEFS
#include <nvml.h>
#define OWN(name) fake_##name /* this file's types, beside nvml.h's, to compare them */
#else
#define OWN(name) name
#endif

/* The part of nvml.h this library needs, as nvml.h declares it. Each name goes through OWN()
 * and is compared with nvml.h's below: a type declared here without OWN() clashes with nvml.h's
 * in the checked build, one declared with it but not compared is not checked. */

typedef enum OWN(nvmlReturn_enum) {
    OWN(NVML_SUCCESS) = 0,
    OWN(NVML_ERROR_UNINITIALIZED) = 1,
    OWN(NVML_ERROR_INVALID_ARGUMENT) = 2,
    OWN(NVML_ERROR_NOT_SUPPORTED) = 3,
    OWN(NVML_ERROR_NOT_FOUND) = 6,
    OWN(NVML_ERROR_INSUFFICIENT_SIZE) = 7,
    OWN(NVML_ERROR_DRIVER_NOT_LOADED) = 9,
    OWN(NVML_ERROR_UNKNOWN) = 999,
} OWN(nvmlReturn_t);

typedef struct nvmlDevice_st *OWN(nvmlDevice_t);

typedef enum OWN(nvmlTemperatureSensors_enum) {
    OWN(NVML_TEMPERATURE_GPU) = 0,
    OWN(NVML_TEMPERATURE_COUNT),
} OWN(nvmlTemperatureSensors_t);

typedef enum OWN(nvmlPStates_enum) {
    OWN(NVML_PSTATE_0) = 0,
    OWN(NVML_PSTATE_15) = 15,
    OWN(NVML_PSTATE_UNKNOWN) = 32,
} OWN(nvmlPstates_t);

/* nvmlPciInfo_t as filled by nvmlDeviceGetPciInfo_v3 */
typedef struct OWN(nvmlPciInfo_st) {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} OWN(nvmlPciInfo_t);

/* nvmlDeviceAttributes_t (nvmlDeviceGetAttributes_v2) */
typedef struct OWN(nvmlDeviceAttributes_st) {
    unsigned int multiprocessorCount;
    unsigned int sharedCopyEngineCount;
    unsigned int sharedDecoderCount;
    unsigned int sharedEncoderCount;
    unsigned int sharedJpegCount;
    unsigned int sharedOfaCount;
    unsigned int gpuInstanceSliceCount;
    unsigned int computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} OWN(nvmlDeviceAttributes_t);

#ifdef FAKE_NVML_CHECK_HEADER
/* Each declaration above against nvml.h's. A failure names what differs. */
#define FIELD(type, f) (((type *)0)->f)
#define SAME_TYPE(t) \
    _Static_assert(__builtin_types_compatible_p(fake_##t, t), #t ": not nvml.h's type")
#define SAME_SIZE(t) \
    _Static_assert(sizeof(fake_##t) == sizeof(t) && _Alignof(fake_##t) == _Alignof(t), \
                   #t ": size or alignment differs from nvml.h's")
#define SAME_ENUM(t)                                                                 \
    _Static_assert(sizeof(fake_##t) == sizeof(t) &&                                 \
                       __builtin_types_compatible_p(fake_##t, unsigned int) ==      \
                           __builtin_types_compatible_p(t, unsigned int),           \
                   #t ": size or signedness differs from nvml.h's")
#define SAME_FIELD(t, f)                                                                       \
    _Static_assert(offsetof(fake_##t, f) == offsetof(t, f) &&                                  \
                       sizeof(FIELD(fake_##t, f)) == sizeof(FIELD(t, f)) &&                    \
                       __builtin_types_compatible_p(__typeof__(FIELD(fake_##t, f)),            \
                                                    __typeof__(FIELD(t, f))),                  \
                   #t "." #f ": offset, size or type differs from nvml.h's")
#define SAME_VALUE(c) \
    _Static_assert((long long)fake_##c == (long long)c, #c ": value differs from nvml.h's")

SAME_ENUM(nvmlReturn_t);
SAME_VALUE(NVML_SUCCESS);
SAME_VALUE(NVML_ERROR_UNINITIALIZED);
SAME_VALUE(NVML_ERROR_INVALID_ARGUMENT);
SAME_VALUE(NVML_ERROR_NOT_SUPPORTED);
SAME_VALUE(NVML_ERROR_NOT_FOUND);
SAME_VALUE(NVML_ERROR_INSUFFICIENT_SIZE);
SAME_VALUE(NVML_ERROR_DRIVER_NOT_LOADED);
SAME_VALUE(NVML_ERROR_UNKNOWN);

SAME_TYPE(nvmlDevice_t);

SAME_ENUM(nvmlTemperatureSensors_t);
SAME_VALUE(NVML_TEMPERATURE_GPU);
SAME_VALUE(NVML_TEMPERATURE_COUNT);

SAME_ENUM(nvmlPstates_t);
SAME_VALUE(NVML_PSTATE_0);
SAME_VALUE(NVML_PSTATE_15);
SAME_VALUE(NVML_PSTATE_UNKNOWN);

SAME_SIZE(nvmlPciInfo_t);
SAME_FIELD(nvmlPciInfo_t, busIdLegacy);
SAME_FIELD(nvmlPciInfo_t, domain);
SAME_FIELD(nvmlPciInfo_t, bus);
SAME_FIELD(nvmlPciInfo_t, device);
SAME_FIELD(nvmlPciInfo_t, pciDeviceId);
SAME_FIELD(nvmlPciInfo_t, pciSubSystemId);
SAME_FIELD(nvmlPciInfo_t, busId);

SAME_SIZE(nvmlDeviceAttributes_t);
SAME_FIELD(nvmlDeviceAttributes_t, multiprocessorCount);
SAME_FIELD(nvmlDeviceAttributes_t, sharedCopyEngineCount);
SAME_FIELD(nvmlDeviceAttributes_t, sharedDecoderCount);
SAME_FIELD(nvmlDeviceAttributes_t, sharedEncoderCount);
SAME_FIELD(nvmlDeviceAttributes_t, sharedJpegCount);
SAME_FIELD(nvmlDeviceAttributes_t, sharedOfaCount);
SAME_FIELD(nvmlDeviceAttributes_t, gpuInstanceSliceCount);
SAME_FIELD(nvmlDeviceAttributes_t, computeInstanceSliceCount);
SAME_FIELD(nvmlDeviceAttributes_t, memorySizeMB);
#endif

#define MAX_GPUS 64
#define MAX_MIGS 16
#define MAX_RULES 64
#define TEXT 128

struct mig {
    int present, gi, ci, slices;
    unsigned long long mem;
    char uuid[TEXT], name[TEXT];
};

struct gpu {
    int present, mig, pending, maxmig, temp, pstate;
    unsigned long long events;
    char uuid[TEXT], name[TEXT], bus[TEXT];
    struct mig migs[MAX_MIGS];
};

enum rule_kind { RULE_FAIL, RULE_DELAY, RULE_HANG };
struct rule {
    enum rule_kind kind;
    char fn[TEXT];
    int code, count, ms;
};

static struct {
    char driver[TEXT], nvml[TEXT];
    struct gpu gpus[MAX_GPUS];
    int ngpus; /* highest index + 1 */
    struct rule rules[MAX_RULES];
    int nrules;
} node;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialized;     /* nvmlInit refcount */
static unsigned generation; /* bumped whenever the node file's content changes */
static char *last_content;

/* ---- node file parsing --------------------------------------------------------------- */

/* Next token of `*p` into `out`; handles "quoted values" after '='. Returns 0 at line end. */
static int next_token(char **p, char *out, size_t size) {
    char *s = *p;
    size_t n = 0;
    while (*s == ' ' || *s == '\t') s++;
    if (!*s || *s == '#') return 0;
    while (*s && *s != ' ' && *s != '\t') {
        if (*s == '"') {
            s++;
            while (*s && *s != '"') {
                unsigned hex;
                if (s[0] == '\\' && s[1] == 'x' && sscanf(s + 2, "%2x", &hex) == 1) {
                    if (n + 1 < size) out[n++] = (char)hex;
                    s += 4;
                    continue;
                }
                if (n + 1 < size) out[n++] = *s;
                s++;
            }
            if (*s == '"') s++;
            continue;
        }
        if (n + 1 < size) out[n++] = *s;
        s++;
    }
    out[n] = 0;
    *p = s;
    return 1;
}

static const char *value_of(const char *tok, const char *key) {
    size_t len = strlen(key);
    return strncmp(tok, key, len) == 0 && tok[len] == '=' ? tok + len + 1 : NULL;
}

static void copy(char *dst, const char *src) {
    snprintf(dst, TEXT, "%s", src);
}

static void parse_line(char *line) {
    char tok[TEXT * 2], kind[TEXT];
    const char *v;
    char *p = line;
    if (!next_token(&p, kind, sizeof kind)) return;
    if (!strcmp(kind, "driver") || !strcmp(kind, "nvml")) {
        if (next_token(&p, tok, sizeof tok)) copy(!strcmp(kind, "driver") ? node.driver : node.nvml, tok);
        return;
    }
    if (!strcmp(kind, "gpu")) {
        struct gpu g = {.present = 1, .mig = -1, .pending = -1, .maxmig = 7};
        int index = -1;
        while (next_token(&p, tok, sizeof tok)) {
            if ((v = value_of(tok, "index"))) index = atoi(v);
            else if ((v = value_of(tok, "uuid"))) copy(g.uuid, v);
            else if ((v = value_of(tok, "name"))) copy(g.name, v);
            else if ((v = value_of(tok, "bus"))) copy(g.bus, v);
            else if ((v = value_of(tok, "mig"))) g.mig = atoi(v);
            else if ((v = value_of(tok, "pending"))) g.pending = atoi(v);
            else if ((v = value_of(tok, "maxmig"))) g.maxmig = atoi(v);
            else if ((v = value_of(tok, "temp"))) g.temp = atoi(v);
            else if ((v = value_of(tok, "pstate"))) g.pstate = atoi(v);
            else if ((v = value_of(tok, "events"))) g.events = strtoull(v, NULL, 0);
        }
        if (g.pending < 0) g.pending = g.mig;
        if (index >= 0 && index < MAX_GPUS) {
            node.gpus[index] = g;
            if (index + 1 > node.ngpus) node.ngpus = index + 1;
        }
        return;
    }
    if (!strcmp(kind, "mig")) {
        struct mig m = {.present = 1};
        int gpu = -1, index = -1;
        while (next_token(&p, tok, sizeof tok)) {
            if ((v = value_of(tok, "gpu"))) gpu = atoi(v);
            else if ((v = value_of(tok, "index"))) index = atoi(v);
            else if ((v = value_of(tok, "uuid"))) copy(m.uuid, v);
            else if ((v = value_of(tok, "name"))) copy(m.name, v);
            else if ((v = value_of(tok, "gi"))) m.gi = atoi(v);
            else if ((v = value_of(tok, "ci"))) m.ci = atoi(v);
            else if ((v = value_of(tok, "slices"))) m.slices = atoi(v);
            else if ((v = value_of(tok, "mem"))) m.mem = strtoull(v, NULL, 10);
        }
        if (gpu >= 0 && gpu < MAX_GPUS && index >= 0 && index < MAX_MIGS) node.gpus[gpu].migs[index] = m;
        return;
    }
    if (!strcmp(kind, "fail") || !strcmp(kind, "delay") || !strcmp(kind, "hang")) {
        struct rule r = {.count = -1, .code = NVML_ERROR_UNKNOWN};
        r.kind = kind[0] == 'f' ? RULE_FAIL : kind[0] == 'd' ? RULE_DELAY : RULE_HANG;
        copy(r.fn, "*");
        while (next_token(&p, tok, sizeof tok)) {
            if ((v = value_of(tok, "fn"))) copy(r.fn, v);
            else if ((v = value_of(tok, "code"))) r.code = atoi(v);
            else if ((v = value_of(tok, "count"))) r.count = atoi(v);
            else if ((v = value_of(tok, "ms"))) r.ms = atoi(v);
        }
        if (node.nrules < MAX_RULES) node.rules[node.nrules++] = r;
    }
}

static char *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += n;
        if (len + 1 >= cap) buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    if (buf) buf[len] = 0;
    return buf;
}

/* Re-read the node file; keep state (failure counters, handle generation) when unchanged. */
static void load_node(void) {
    const char *path = getenv("FAKE_NVML_NODE");
    char *content = path ? read_file(path) : NULL;
    if (!content) content = strdup("");
    if (last_content && !strcmp(last_content, content)) {
        free(content);
        return;
    }
    free(last_content);
    last_content = content;
    generation++;
    memset(&node, 0, sizeof node);
    copy(node.driver, "550.54.15");
    copy(node.nvml, "12.550.54.15");
    char *copy_buf = strdup(content), *save = NULL;
    for (char *line = strtok_r(copy_buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        parse_line(line);
    free(copy_buf);
}

/* ---- injected faults ----------------------------------------------------------------- */

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static void append_line(const char *path, const char *fn) {
    FILE *f = path ? fopen(path, "a") : NULL;
    if (!f) return;
    fprintf(f, "%d%s%s\n", (int)getpid(), fn ? " " : "", fn ? fn : "");
    fclose(f);
}

__attribute__((constructor)) static void loaded(void) {
    append_line(getenv("FAKE_NVML_LOADS"), NULL);
}

static void hanging(const char *fn) {
    char path[4096];
    const char *node_path = getenv("FAKE_NVML_NODE");
    if (!node_path) return;
    snprintf(path, sizeof path, "%s.hanging", node_path);
    append_line(path, fn);
}

/* Apply the rules for `fn`: hang, delay, or return an injected error (0 when none). */
static nvmlReturn_t inject(const char *fn) {
    int delay = 0, hang = 0;
    nvmlReturn_t ret = NVML_SUCCESS;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < node.nrules; i++) {
        struct rule *r = &node.rules[i];
        if (strcmp(r->fn, "*") && strcmp(r->fn, fn)) continue;
        if (r->kind == RULE_HANG) hang = 1;
        else if (r->kind == RULE_DELAY) delay += r->ms;
        else if (ret == NVML_SUCCESS && r->count != 0) {
            ret = r->code;
            if (r->count > 0) r->count--;
        }
    }
    pthread_mutex_unlock(&lock);
    if (hang) {
        hanging(fn);
        for (;;) sleep(3600);
    }
    if (delay) sleep_ms(delay);
    return ret;
}

#define ENTER(fn)                                   \
    do {                                            \
        nvmlReturn_t injected_ = inject(fn);        \
        if (injected_) return injected_;            \
        if (!initialized) return NVML_ERROR_UNINITIALIZED; \
    } while (0)

/* ---- handles ------------------------------------------------------------------------- *
 * A handle is an opaque pointer-sized value: [generation:32][gpu:16][mig+1:16]. GPU handles
 * stay valid across reconfigurations; a MIG handle is valid only in the generation (node
 * file content) it came from, as real MIG handles die with their instance.               */

static nvmlDevice_t make_handle(int gpu, int mig) {
    uintptr_t gen = mig >= 0 ? generation : 0;
    return (nvmlDevice_t)(uintptr_t)((gen << 32) | ((uintptr_t)gpu << 16) | (uintptr_t)(mig + 1) | 0x1000000000000000ULL);
}

/* Resolve a handle; returns 0 and sets gpu/mig (mig = -1 for a physical GPU) when valid. */
static int resolve(nvmlDevice_t handle, struct gpu **gpu, struct mig **mig) {
    uintptr_t h = (uintptr_t)handle;
    if (!(h & 0x1000000000000000ULL)) return -1;
    h &= ~0x1000000000000000ULL;
    int g = (int)((h >> 16) & 0xffff), m = (int)(h & 0xffff) - 1;
    unsigned gen = (unsigned)(h >> 32);
    if (g >= node.ngpus || !node.gpus[g].present) return -1;
    *gpu = &node.gpus[g];
    *mig = NULL;
    if (m >= 0) {
        if (gen != generation || m >= MAX_MIGS || !node.gpus[g].migs[m].present) return -1;
        if (node.gpus[g].mig != 1) return -1;
        *mig = &node.gpus[g].migs[m];
    }
    return 0;
}

#define RESOLVE(handle, gpu, mig) \
    if (resolve(handle, &gpu, &mig)) return NVML_ERROR_INVALID_ARGUMENT

static nvmlReturn_t put_string(char *dst, unsigned int size, const char *src) {
    if (!dst) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > size) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

/* ---- who holds NVML ------------------------------------------------------------------ */

static void holder_path(char *out, size_t size) {
    const char *node_path = getenv("FAKE_NVML_NODE");
    snprintf(out, size, "%s.holders/%d", node_path ? node_path : "/tmp/fake-nvml", (int)getpid());
}

/* The process's start time (field 22 of /proc/self/stat): a pid alone can be reused. */
static unsigned long long start_time(void) {
    char buf[1024];
    unsigned long long ticks = 0;
    FILE *f = fopen("/proc/self/stat", "r");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    for (int field = 2; p && field < 22; field++) p = strchr(p + 1, ' ');
    if (p) ticks = strtoull(p + 1, NULL, 10);
    return ticks;
}

static void register_holder(void) {
    char path[4096], dir[4096];
    holder_path(path, sizeof path);
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    if (mkdir(dir, 0777) != 0 && errno != EEXIST) return;
    FILE *f = fopen(path, "w");
    if (!f) return;
    fprintf(f, "%llu\n", start_time());
    fclose(f);
}

static void unregister_holder(void) {
    char path[4096];
    holder_path(path, sizeof path);
    unlink(path);
}

/* ---- device files held while initialised --------------------------------------------- */

static int device_fds[MAX_GPUS + 1];
static int ndevice_fds;

static void device_dir(char *out, size_t size) {
    const char *dir = getenv("FAKE_NVML_DEV_DIR");
    const char *node_path = getenv("FAKE_NVML_NODE");
    if (dir && *dir) snprintf(out, size, "%s", dir);
    else snprintf(out, size, "%s.dev", node_path ? node_path : "/tmp/fake-nvml");
}

/* Open (creating it, open to every user, when missing) one device file; -1 when impossible. */
static int open_device(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CLOEXEC | O_CREAT | O_EXCL, 0666);
    if (fd >= 0) fchmod(fd, 0666); /* whatever the umask: processes of any user open it */
    else if (errno == EEXIST) fd = open(path, O_RDWR | O_CLOEXEC);
    return fd;
}

/* As the driver's files: /dev/nvidiactl, and /dev/nvidia<N> for each GPU of the node. */
static void open_devices(void) {
    char dir[4096], name[64];
    device_dir(dir, sizeof dir);
    if (mkdir(dir, 0777) == 0) chmod(dir, 0777);
    ndevice_fds = 0;
    int fd = open_device(dir, "nvidiactl");
    if (fd >= 0) device_fds[ndevice_fds++] = fd;
    for (int i = 0; i < node.ngpus; i++) {
        if (!node.gpus[i].present) continue;
        snprintf(name, sizeof name, "nvidia%d", i);
        if ((fd = open_device(dir, name)) >= 0) device_fds[ndevice_fds++] = fd;
    }
}

static void close_devices(void) {
    while (ndevice_fds > 0) close(device_fds[--ndevice_fds]);
}

/* ---- the API ------------------------------------------------------------------------- */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&lock);
    load_node();
    pthread_mutex_unlock(&lock);
    nvmlReturn_t ret = inject("nvmlInit"); /* after the re-read: a rule just written applies */
    if (ret) return ret;
    pthread_mutex_lock(&lock);
    if (initialized++ == 0) {
        register_holder();
        open_devices();
    }
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    if (!initialized) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    if (--initialized == 0) {
        unregister_holder();
        close_devices();
    }
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

/* NVIDIA's own texts (libnvidia-ml 535), which tests/test_nvidia.py compares with the library's:
 * nvidia-ml-py has a table of its own for most codes, but C and Go agents print these. */
static const char *const error_strings[] = {
    [0] = "Success",
    [1] = "Uninitialized",
    [2] = "Invalid Argument",
    [3] = "Not Supported",
    [4] = "Insufficient Permissions",
    [5] = "Already Initialized",
    [6] = "Not Found",
    [7] = "Insufficient Size",
    [8] = "Insufficient External Power",
    [9] = "Driver Not Loaded",
    [10] = "Timeout",
    [11] = "Interrupt Request Issue",
    [12] = "NVML Shared Library Not Found",
    [13] = "Function Not Found",
    [14] = "Corrupted infoROM",
    [15] = "GPU is lost",
    [16] = "GPU requires reset",
    [17] = "GPU access blocked by the operating system",
    [18] = "Driver/library version mismatch",
    [19] = "In use by another client",
    [20] = "Insufficient Memory",
    [21] = "No data",
    [22] = "vGPU ECC not supported",
    [23] = "Insufficient Resources",
    [24] = "Invalid Frequency",
    [25] = "Argument version mismatch",
    [26] = "Requested functionality has been deprecated",
    [27] = "System is not in ready state",
};

const char *nvmlErrorString(nvmlReturn_t result) {
    size_t code = (size_t)result;
    if (code < sizeof error_strings / sizeof *error_strings && error_strings[code])
        return error_strings[code];
    return "Unknown Error";
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER("nvmlSystemGetDriverVersion");
    return put_string(version, length, node.driver);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    ENTER("nvmlSystemGetNVMLVersion");
    return put_string(version, length, node.nvml);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    ENTER("nvmlDeviceGetCount");
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = (unsigned)node.ngpus;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    ENTER("nvmlDeviceGetHandleByIndex");
    if (!device || index >= (unsigned)node.ngpus || !node.gpus[index].present)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = make_handle((int)index, -1);
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetIndex");
    RESOLVE(device, g, m);
    if (m || !index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = (unsigned)(g - node.gpus);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetUUID");
    RESOLVE(device, g, m);
    return put_string(uuid, length, m ? m->uuid : g->uuid);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetName");
    RESOLVE(device, g, m);
    return put_string(name, length, m ? m->name : g->name);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    struct gpu *g;
    struct mig *m;
    unsigned domain = 0, bus = 0, dev = 0;
    ENTER("nvmlDeviceGetPciInfo");
    RESOLVE(device, g, m);
    if (!pci) return NVML_ERROR_INVALID_ARGUMENT;
    memset(pci, 0, sizeof *pci);
    sscanf(g->bus, "%x:%x:%x", &domain, &bus, &dev);
    pci->domain = domain;
    pci->bus = bus;
    pci->device = dev;
    pci->pciDeviceId = 0x20b010de;
    snprintf(pci->busId, sizeof pci->busId, "%s", g->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%s", g->bus + (strlen(g->bus) > 12 ? 4 : 0));
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetMigMode");
    RESOLVE(device, g, m);
    if (m || !current || !pending) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->mig < 0) return NVML_ERROR_NOT_SUPPORTED;
    *current = (unsigned)g->mig;
    *pending = (unsigned)g->pending;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetMaxMigDeviceCount");
    RESOLVE(device, g, m);
    if (m || !count) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->mig < 0) return NVML_ERROR_NOT_SUPPORTED;
    *count = g->mig == 1 ? (unsigned)g->maxmig : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetMigDeviceHandleByIndex");
    RESOLVE(device, g, m);
    if (m || !mig) return NVML_ERROR_INVALID_ARGUMENT;
    if (g->mig < 0) return NVML_ERROR_NOT_SUPPORTED;
    if (g->mig != 1 || index >= (unsigned)g->maxmig) return NVML_ERROR_INVALID_ARGUMENT;
    if (index >= MAX_MIGS || !g->migs[index].present) return NVML_ERROR_NOT_FOUND;
    *mig = make_handle((int)(g - node.gpus), (int)index);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMig) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceIsMigDeviceHandle");
    RESOLVE(device, g, m);
    if (!isMig) return NVML_ERROR_INVALID_ARGUMENT;
    *isMig = m != NULL;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice, nvmlDevice_t *device) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetDeviceHandleFromMigDeviceHandle");
    RESOLVE(migDevice, g, m);
    if (!m || !device) return NVML_ERROR_INVALID_ARGUMENT;
    *device = make_handle((int)(g - node.gpus), -1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetGpuInstanceId");
    RESOLVE(device, g, m);
    if (!m) return NVML_ERROR_NOT_SUPPORTED;
    if (!id) return NVML_ERROR_INVALID_ARGUMENT;
    *id = (unsigned)m->gi;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetComputeInstanceId");
    RESOLVE(device, g, m);
    if (!m) return NVML_ERROR_NOT_SUPPORTED;
    if (!id) return NVML_ERROR_INVALID_ARGUMENT;
    *id = (unsigned)m->ci;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetAttributes_v2(nvmlDevice_t device, nvmlDeviceAttributes_t *attrs) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetAttributes");
    RESOLVE(device, g, m);
    if (!m) return NVML_ERROR_NOT_SUPPORTED; /* as on real drivers for a full GPU in MIG mode */
    if (!attrs) return NVML_ERROR_INVALID_ARGUMENT;
    memset(attrs, 0, sizeof *attrs);
    attrs->gpuInstanceSliceCount = (unsigned)m->slices;
    attrs->computeInstanceSliceCount = (unsigned)m->slices;
    attrs->multiprocessorCount = (unsigned)m->slices * 14;
    attrs->memorySizeMB = m->mem;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensor,
                                      unsigned int *temp) {
    struct gpu *g;
    struct mig *m;
    (void)sensor;
    ENTER("nvmlDeviceGetTemperature");
    RESOLVE(device, g, m);
    if (m) return NVML_ERROR_NOT_SUPPORTED;
    if (!temp) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = (unsigned)g->temp;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPerformanceState(nvmlDevice_t device, nvmlPstates_t *pstate) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetPerformanceState");
    RESOLVE(device, g, m);
    if (m) return NVML_ERROR_NOT_SUPPORTED;
    if (!pstate) return NVML_ERROR_INVALID_ARGUMENT;
    *pstate = (nvmlPstates_t)g->pstate;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    struct gpu *g;
    struct mig *m;
    ENTER("nvmlDeviceGetSupportedEventTypes");
    RESOLVE(device, g, m);
    if (!types) return NVML_ERROR_INVALID_ARGUMENT;
    *types = g->events;
    return NVML_SUCCESS;
}
