"""The tripwire: notice a MIG reconfiguration within a second, without touching the GPU.

NVIDIA's driver lists every MIG instance in procfs (open-gpu-kernel-modules: `nv-caps.c` creates
and removes the entries; `os.c` registers them inside the GPU- and compute-instance create and
destroy controls themselves, so the tree matches as soon as `nvidia-smi mig -cgi/-cci/-dgi/-dci`
returns):

    /proc/driver/nvidia/capabilities/gpu<M>/mig/gi<G>/access          a GPU instance
    /proc/driver/nvidia/capabilities/gpu<M>/mig/gi<G>/ci<C>/access     a compute instance
    /proc/driver/nvidia/gpus/<PCI bus id>/                             a GPU

`gpu<M>/mig/` exists for every GPU, MIG on or off; M is the device minor (/dev/nvidia<M>), not the
NVML index. An `access` file's content never changes: only whether it exists carries
information. procfs has no inotify, so the tree is listed every `tripwire_interval`: a
millisecond or two, no GPU touched, no NVML opened (NVML events would mean holding NVML open:
the very client that blocks a GPU reset).

A listing that differs from the last one only makes the next NVML probe come at once; the probe
decides, with the usual settle, and the regular poll stays: a destroy and re-create between two
listings (same ids, new UUIDs) is invisible here, and the poll still catches it.

In a container the NVIDIA toolkit mounts a tmpfs over /proc/driver/nvidia: the whole
`capabilities/` tree is there only with NVIDIA_MIG_MONITOR_DEVICES=all (which needs
CAP_SYS_ADMIN). Where it is absent or unreadable, detection relies on the poll alone.
"""

from __future__ import annotations

import os

# Bounds on one listing: a tree beyond them is not the driver's (a mistaken procfs_root).
MAX_ENTRIES = 20_000
MAX_DEPTH = 6

Listing = frozenset[str]


class TooLarge(OSError):
    """The listing passed MAX_ENTRIES: whatever folder this is, it is not the driver's."""


def list_tree(root: str) -> Listing:
    """Every entry of `root`/capabilities and the GPUs' folders in `root`/gpus, as paths
    relative to `root`. Raises OSError when a folder of `root`/capabilities cannot be listed
    (at any depth), and TooLarge past MAX_ENTRIES (gpus/ included)."""
    found: set[str] = set()
    _walk(os.path.join(root, "capabilities"), "capabilities", found, MAX_DEPTH)
    try:
        _walk(os.path.join(root, "gpus"), "gpus", found, 1)  # the bus ids, not their files
    except TooLarge:
        raise
    except OSError:
        pass  # the GPUs' own folder is a bonus; capabilities/ is what carries MIG
    return frozenset(found)


def _walk(path: str, name: str, found: set[str], levels: int) -> None:
    """Add the entries of `path` (named `name`) and, `levels` deep, of its folders."""
    with os.scandir(path) as entries:
        for entry in entries:
            if len(found) >= MAX_ENTRIES:
                raise TooLarge(f"more than {MAX_ENTRIES} entries: not the NVIDIA driver's tree")
            child = f"{name}/{entry.name}"
            found.add(child)
            if levels > 1 and entry.is_dir(follow_symlinks=False):
                try:
                    _walk(entry.path, child, found, levels - 1)
                except FileNotFoundError:
                    pass  # gone since the listing above: the next listing shows it


def absent_reason(root: str) -> str | None:
    """Why the tree cannot be used, or None when it can (for the one line at start)."""
    caps = os.path.join(root, "capabilities")
    try:
        list_tree(root)
    except FileNotFoundError:
        if os.path.isdir(root):
            return (
                f"{caps} does not exist: in a container, the NVIDIA toolkit shows it only with "
                "NVIDIA_MIG_MONITOR_DEVICES=all (and CAP_SYS_ADMIN)"
            )
        return f"{root} does not exist (no NVIDIA driver loaded, or not visible here)"
    except OSError as exc:  # the folder that failed, deeper down too
        return f"{exc.filename or caps} cannot be listed: {exc.strerror or exc}"
    return None


class Tripwire:
    """Lists the tree when asked; says whether it changed since the last listing."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.last = self._list()

    def _list(self) -> Listing | None:
        try:
            return list_tree(self.root)
        except OSError:
            return None  # absent or unreadable: a state like any other (the driver may come)

    def changed(self) -> bool:
        listing = self._list()
        changed, self.last = listing != self.last, listing
        return changed
