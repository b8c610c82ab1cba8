"""Running containers in the tests: podman's flags on these machines, and root filesystems
made of host files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent

PODMAN_FLAGS = [
    "--runtime", "runc",  # crun fails on this hybrid cgroup setup; runc works
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",  # raising rlimits is refused
    "--network", "none", "--log-driver", "k8s-file",
]  # fmt: skip
# The root filesystem is only read: no writable /tmp either (readOnlyRootFilesystem, no emptyDir)
READ_ONLY = ["--read-only", "--read-only-tmpfs=false"]


def copy_with_libraries(root: Path, paths: list[Path]) -> None:
    """Copy executables and shared objects into root, with every library ldd says they need."""
    seen: set[str] = set()
    for path in paths:
        wanted = [str(path)]
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
        wanted += [tok for line in out.splitlines() for tok in line.split() if tok.startswith("/")]
        for src in wanted:
            if src in seen or str(ROOT) in src:
                continue
            seen.add(src)
            dst = root / src.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(src), dst)
