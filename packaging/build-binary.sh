#!/usr/bin/env bash
# Build the self-contained gpu-supervise executable with PyInstaller, in one-folder form:
#   DIST/gpu-supervise/gpu-supervise  (+ DIST/gpu-supervise/_internal/)
# One-folder, not one-file: a one-file executable unpacks itself and runs the program as a
# second process under its bootloader, so the bootloader (not gpu-supervise) would be PID 1.
# The folder needs only glibc from the image: copy it whole into an agent image, or let an init
# container copy it into a shared emptyDir.
#
# usage: packaging/build-binary.sh [DIST]     (default DIST: dist)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dist=$(realpath -m "${1:-$root/dist}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$root"
python -m PyInstaller --noconfirm --clean --log-level WARN --onedir --name gpu-supervise \
    --distpath "$dist" --workpath "$work/build" --specpath "$work" \
    --paths "$root/supervisor" --collect-submodules gpu_supervise --hidden-import pynvml \
    --exclude-module tkinter --exclude-module numpy --exclude-module IPython \
    --exclude-module jedi --exclude-module yaml --exclude-module sqlite3 \
    --exclude-module setuptools --exclude-module pkg_resources --exclude-module pytest \
    --exclude-module hypothesis --exclude-module cffi --exclude-module pycparser \
    "$root/packaging/entry.py"
"$dist/gpu-supervise/gpu-supervise" --version
