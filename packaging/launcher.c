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
 * musl, or none at all. The search path is passed as an option, not through
 * LD_LIBRARY_PATH, so that the agent gpu-supervise starts inherits the environment unchanged
 * and keeps loading its own libc. The PyInstaller bootloader recognises that it was started
 * through a loader and re-executes itself through the same one.
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

static int fail(const char *what, const char *path) {
    int err = errno;
    fprintf(stderr, "gpu-supervise: %s %s: %s (is the gpu-supervise folder complete?)\n", what,
            path, strerror(err));
    return err == ENOENT ? 127 : 126;
}

static int join(char *out, size_t size, const char *a, const char *b, const char *c) {
    return snprintf(out, size, "%s%s%s", a, b, c) < (int)size;
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
    execv(loader, args);
    return fail("cannot execute", loader);
}
