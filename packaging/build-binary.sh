#!/usr/bin/env bash
# Build the self-contained gpu-supervise executable folder, which runs on any x86-64 Linux image
# whatever its C library (an old glibc such as UBI 8's 2.28, musl, or none at all: distroless,
# scratch):
#
#   DIST/gpu-supervise/gpu-supervise    a small static launcher: the file you run
#   DIST/gpu-supervise/_internal/       PyInstaller's one-folder build, with the build host's
#                                       glibc and its dynamic loader
#
# The launcher (packaging/launcher.c) execs the bundled loader on the bundled program: one
# process, the same PID (gpu-supervise stays PID 1 of a container), nothing unpacked at start,
# nothing written anywhere (a read-only root filesystem is fine). The image's libc is never
# used, so the glibc the build needs (the "glibc floor", printed below) is met by the bundled
# copy. Not a PyInstaller one-file executable: that runs the program as a second process under
# its bootloader, which would be PID 1, and unpacks itself into TMPDIR at every start.
#
# Copy the folder whole (symbolic links included): `gpu-supervise install DIR` does it from a
# running copy, atomically and without touching a running one, for init containers, images
# with no shell or cp, and upgrades.
#
# usage: [PYTHON=.venv/bin/python] packaging/build-binary.sh [DIST]     (default DIST: dist)
# needs: a Python (>= 3.10) with gpu-supervise's dependencies and PyInstaller (`pip install .
# pyinstaller`, or the test extra), gcc with a static libc (Debian: gcc libc6-dev), binutils
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dist=$(realpath -m "${1:-$root/dist}")
if [[ $dist == *:* ]]; then  # the launcher refuses to run from there (packaging/launcher.c)
    echo "build-binary.sh: $dist holds ':', which a library search path cannot: choose another DIST" >&2
    exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$root"
python=${PYTHON:-python3}
if ! "$python" -c 'import PyInstaller, pynvml, loguru' 2>/dev/null; then
    echo "build-binary.sh: $python lacks PyInstaller or gpu-supervise's dependencies:" \
        "pip install . pyinstaller (in a venv), then PYTHON=.venv/bin/python $0" >&2
    exit 2
fi

# PyInstaller's folder with no contents subdirectory: it becomes _internal/ below, its own
# executable _internal/gpu-supervise next to its libraries.
"$python" -m PyInstaller --noconfirm --clean --log-level WARN --onedir --name gpu-supervise \
    --contents-directory . --strip \
    --distpath "$work/pyinstaller" --workpath "$work/build" --specpath "$work" \
    --paths "$root/supervisor" --collect-submodules gpu_supervise --hidden-import pynvml \
    --exclude-module tkinter --exclude-module numpy --exclude-module IPython \
    --exclude-module jedi --exclude-module yaml --exclude-module sqlite3 \
    --exclude-module setuptools --exclude-module pkg_resources --exclude-module pytest \
    --exclude-module hypothesis --exclude-module cffi --exclude-module pycparser \
    "$root/packaging/entry.py"
internal="$work/pyinstaller/gpu-supervise"

# Prints the glibc floor, bundles glibc, checks that every needed library is in the folder.
"$python" "$root/packaging/bundle_glibc.py" "$internal"

# The build token: drawn afresh for each build, so that two builds of one version are told
# apart (`--version` prints VERSION-TOKEN, and `install` names the build's folder so).
od -An -tx1 -N4 /dev/urandom | tr -d ' \n' > "$internal/gpu-supervise.build"

loader=$(basename "$(readlink "$internal/ld/gpu-supervise")")
"${CC:-gcc}" -static -Os -s -Wall -Werror -DLOADER_NAME="\"$loader\"" \
    -o "$work/gpu-supervise" "$root/packaging/launcher.c"
if readelf -l "$work/gpu-supervise" | grep -q "program interpreter"; then
    echo "the launcher is not static: install a static libc (Debian: libc6-dev)" >&2
    exit 1
fi

rm -rf "$dist/gpu-supervise"
mkdir -p "$dist/gpu-supervise"
mv "$internal" "$dist/gpu-supervise/_internal"
mv "$work/gpu-supervise" "$dist/gpu-supervise/gpu-supervise"
echo "built $dist/gpu-supervise/gpu-supervise ($(du -sh "$dist/gpu-supervise" | cut -f1))"
"$dist/gpu-supervise/gpu-supervise" --version
