/* launcher.c - DIST/gpu-supervise/gpu-supervise, the file you run; built by build-binary.sh.
 *
 * The PyInstaller build next to it (_internal/gpu-supervise and the libraries it loads) was
 * linked against the build host's glibc, and _internal/ also holds that glibc. A program uses
 * the libc its dynamic loader picks, so this static launcher replaces itself (execv: same PID,
 * no extra process) with the bundled loader running the bundled program:
 *
 *     _internal/ld/gpu-supervise --library-path _internal[:$LD_LIBRARY_PATH]
 *         _internal/gpu-supervise ARGS...
 *
 * _internal/ld/gpu-supervise is a symbolic link to the loader (ld-linux-x86-64.so.2 or the
 * architecture's), so that the process is named gpu-supervise; without it (a copy that does not
 * keep links) the loader is run by its own name. The image's libc is never used: any glibc,
 * musl, or none at all. The search path is passed as an option, not through LD_LIBRARY_PATH.
 * The PyInstaller bootloader recognises that it was started through a loader and re-executes
 * itself through the same one.
 *
 * The folder is found through /proc/self/exe, which names the file with every symbolic link
 * resolved: started as DIR/gpu-supervise, a link that `gpu-supervise install` points into
 * DIR/gpu-supervise.versions/ID/, this process runs entirely from ID/ (its sys._MEIPASS too),
 * whatever the link points to later.
 *
 * The agent gpu-supervise starts must get the caller's environment exactly, but PyInstaller's
 * bootloader rewrites it before any Python runs (see record_caller_environment), so the caller's
 * state of what it touches is recorded here for child_environment (gpu_supervise/child.py).
 *
 * Nothing here but execv: no extraction, no temporary files, no child process. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef LOADER_NAME
#define LOADER_NAME "ld-linux-x86-64.so.2"
#endif

/* The record's name: outside GPU_SUPERVISE_*, which gpu-supervise reads as its settings. */
#define CALLER_ENV "_GPU_SUPERVISE_CALLER_ENV"
/* One environment string may hold at most MAX_ARG_STRLEN (32 pages) bytes. */
#define MAX_ENV_STRING (32 * 4096)

extern char **environ;

static int fail(const char *what, const char *path) {
    int err = errno;
    fprintf(stderr, "gpu-supervise: %s %s: %s (is the gpu-supervise folder complete?)\n", what,
            path, strerror(err));
    return err == ENOENT ? 127 : 126;
}

static int join(char *out, size_t size, const char *a, const char *b, const char *c) {
    return snprintf(out, size, "%s%s%s", a, b, c) < (int)size;
}

/* What the PyInstaller bootloader may set, change or remove before gpu-supervise reads its
 * environment (bootloader/src/pyi_main.c and pyi_utils_posix.c), besides every _PYI_* name:
 * - it prepends its folder to LD_LIBRARY_PATH and keeps the caller's value in
 *   LD_LIBRARY_PATH_ORIG, overwriting the caller's own; an empty LD_LIBRARY_PATH it takes for
 *   unset, so an empty one is lost;
 * - it reads and removes PYINSTALLER_RESET_ENVIRONMENT; older bootloaders set _MEIPASS2;
 * - the record itself: a caller's own value of it is handed down too. */
static const char *const TOUCHED[] = {
    "LD_LIBRARY_PATH", "LD_LIBRARY_PATH_ORIG", "PYINSTALLER_RESET_ENVIRONMENT", "_MEIPASS2",
    CALLER_ENV, NULL,
};

static int touched(const char *entry) {
    size_t n = strcspn(entry, "=");
    if (strncmp(entry, "_PYI_", 5) == 0) return 1; /* set, reset and unset by the bootloader */
    for (const char *const *t = TOUCHED; *t; t++) {
        if (strlen(*t) == n && strncmp(entry, *t, n) == 0) return 1;
    }
    return 0;
}

/* Append s to the record, with '%' and ' ' (the separator) written as %25 and %20. */
static char *escape(char *out, const char *s) {
    for (; *s; s++) {
        if (*s == '%' || *s == ' ') {
            out += sprintf(out, "%%%02X", (unsigned char)*s);
        } else {
            *out++ = *s;
        }
    }
    return out;
}

/* Record in CALLER_ENV the caller's state of every variable the bootloader may touch: the
 * entry `NAME=value` of each one set (an empty value included), and a bare `NAME` for each
 * name of TOUCHED that is unset; entries separated by spaces. child_environment removes all
 * these names and every _PYI_* (the bootloader's), then restores what is recorded: the agent
 * inherits exactly what gpu-supervise was given, whatever the bootloader did. */
static int record_caller_environment(void) {
    size_t size = 1;
    for (char **e = environ; *e; e++) {
        if (touched(*e)) size += 3 * strlen(*e) + 1;
    }
    for (const char *const *t = TOUCHED; *t; t++) size += 3 * strlen(*t) + 1;
    char *record = malloc(size), *out = record;
    if (record == NULL) return -1;
    for (const char *const *t = TOUCHED; *t; t++) {
        if (getenv(*t) != NULL) continue; /* set: its entry comes below */
        if (out != record) *out++ = ' ';
        out = escape(out, *t);
    }
    for (char **e = environ; *e; e++) {
        if (!touched(*e) || strchr(*e, '=') == NULL) continue;
        if (out != record) *out++ = ' ';
        out = escape(out, *e);
    }
    *out = '\0';
    int rc = -1;
    if (strlen(CALLER_ENV) + 1 + strlen(record) >= MAX_ENV_STRING) {
        errno = E2BIG;
    } else {
        rc = setenv(CALLER_ENV, record, 1);
    }
    free(record);
    return rc;
}

int main(int argc, char **argv) {
    char home[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", home, sizeof home - 1);
    if (n > 0) {
        home[n] = '\0';
    } else if (argc < 1 || !realpath(argv[0], home)) { /* no /proc: trust argv[0] */
        return fail("cannot find myself:", argc > 0 ? argv[0] : "(no argv[0])");
    }
    char *slash = strrchr(home, '/');
    if (slash == NULL) {
        errno = EINVAL;
        return fail("cannot find my folder from", home);
    }
    *slash = '\0';
    /* The library search path is a colon-separated list with no escape for ':': a folder whose
     * path holds one would be split, the bundled glibc not found, and the image's C library
     * loaded instead (a loader error, or exit 127, in an image without a matching one). */
    if (strchr(home, ':') != NULL) {
        fprintf(stderr,
                "gpu-supervise: cannot run from %s: the path holds ':', which the library search "
                "path cannot (install gpu-supervise into a folder without ':')\n",
                home);
        return 126;
    }

    char internal[PATH_MAX], loader[PATH_MAX], program[PATH_MAX];
    if (!join(internal, sizeof internal, home, "/_internal", "") ||
        !join(loader, sizeof loader, internal, "/ld/gpu-supervise", "") ||
        !join(program, sizeof program, internal, "/gpu-supervise", "")) {
        errno = ENAMETOOLONG;
        return fail("path too long:", home);
    }
    /* The bundled libraries first, then the caller's search path (where NVML may be). */
    const char *inherited = getenv("LD_LIBRARY_PATH");
    if (inherited == NULL) inherited = "";
    size_t size = strlen(internal) + 1 + strlen(inherited) + 1;
    char *path = malloc(size);
    if (path == NULL) return fail("out of memory for", "the library path");
    snprintf(path, size, "%s%s%s", internal, *inherited ? ":" : "", inherited);

    char **args = calloc((size_t)argc + 4, sizeof *args);
    if (args == NULL) return fail("out of memory for", "the arguments");
    int w = 0;
    args[w++] = loader;
    args[w++] = "--library-path";
    args[w++] = path;
    args[w++] = program;
    for (int i = 1; i < argc; i++) args[w++] = argv[i];
    args[w] = NULL;

    /* A copy that lost the symbolic link, or made it a file (which the bootloader would take
     * for itself): the loader by its own name, at the cost of the process's name. */
    struct stat link;
    if (lstat(loader, &link) != 0 || !S_ISLNK(link.st_mode)) {
        if (!join(loader, sizeof loader, internal, "/", LOADER_NAME)) {
            errno = ENAMETOOLONG;
            return fail("path too long:", home);
        }
    }
    if (record_caller_environment() != 0) {
        fprintf(stderr, "gpu-supervise: cannot record the caller's environment for the agent: %s\n",
                strerror(errno));
        return 126;
    }
    execv(loader, args);
    return fail("cannot execute", loader);
}
