#!/usr/bin/env bash
# The demo on a fresh Debian or Ubuntu machine, from a clone: installs python3 and its venv
# module when they are missing (Debian's pip refuses system-wide installs, PEP 668), installs
# gpu-supervise into a virtual environment of the clone's own (.venv), and runs
# `gpu-supervise demo`: a simulated MIG reconfiguration, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "gpu-supervise needs Python 3.10 or later, and python3 is $(python3 -V 2>&1):" \
        "use Debian 12 or Ubuntu 22.04 or later" >&2
    exit 1
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# A real install, as the README's: what users run, its bytecode compiled once (an editable
# install, as .ci/run makes to test the checkout itself, would point back into the clone).
.venv/bin/python -m pip install -q .
exec .venv/bin/gpu-supervise demo "$@"
