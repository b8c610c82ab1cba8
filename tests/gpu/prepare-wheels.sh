#!/usr/bin/env bash
# Run here (where PyPI is reachable) before a device run: puts a wheel of gpu-supervise and the
# runtime dependencies the device's Python 3.12 lacks (loguru) into .whl/, which git ignores
# and the device run carries. nvidia-ml-py, psutil and pytest are already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
python3 -m pip wheel -q --no-deps -w .whl .
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform any -d .whl 'loguru>=0.7'
ls -l .whl
