"""Who holds the GPU: the processes with an NVIDIA device file open, which block a GPU reset.

While gpu-supervise holds (the agent stopped so that a MIG mode change's reset can go ahead), the
driver still refuses the reset while any process keeps the GPU open: nvidia-smi, DCGM's
hostengine, an exporter in another container, persistenced. A process holding NVML has
/dev/nvidiactl and /dev/nvidia<N> open (and /dev/nvidia-caps/* for MIG), so the holders are
found the way fuser finds them: by reading the links in /proc/PID/fd.

Never an error: a process that exits mid-scan is skipped, one whose descriptors cannot be read
(another user's, or a non-dumpable one, without CAP_SYS_PTRACE) is counted, and the scan is
bounded. In a container only the container's own PID namespace is visible, and the result says
so. A scan reads every descriptor of the node (seconds with thousands of processes of thousands
of descriptors each), so the supervisor runs it in a thread of its own (Scanner).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable

from . import procs

MAX_PROCESSES = 100_000  # a scan never looks further: a bound, not a count of real nodes
MAX_FDS = 65_536  # descriptors read per process
CMDLINE_CHARS = 200

# A container's id in /proc/PID/cgroup, as the runtimes name its cgroup: docker-<id>.scope,
# cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope, or a plain /<id> (cgroup v1,
# Kubernetes' kubepods/.../<id>, docker/<id>).
_CONTAINER = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")
# What readlink adds to the path of a file unlinked since it was opened (a device node removed
# and made again, as nvidia-modprobe and container runtimes do): the process still holds it.
DELETED = " (deleted)"


class Holder:
    __slots__ = ("pid", "cmdline", "container", "devices", "started")

    def __init__(
        self, pid: int, cmdline: str, container: str, devices: tuple[str, ...], started: int = 0
    ) -> None:
        self.pid, self.cmdline, self.container, self.devices = pid, cmdline, container, devices
        self.started = started

    def describe(self) -> str:
        where = f" (container {self.container[:12]})" if self.container else ""
        return f"pid {self.pid}{where}: {self.cmdline}"

    def key(self) -> tuple[int, int]:
        """Who it is: the pid and its start time. Not the command line: it changes as a holder
        exits (the kernel drops it before it closes the files) or execs, and that is no news."""
        return (self.pid, self.started)


class Scan:
    """The holders found, how many processes could not be read, and whether the view is only
    this PID namespace's."""

    __slots__ = ("holders", "unreadable", "namespace_only")

    def __init__(self, holders: list[Holder], unreadable: int, namespace_only: bool) -> None:
        self.holders, self.unreadable, self.namespace_only = holders, unreadable, namespace_only

    def key(self) -> frozenset[tuple[int, int]]:
        """What makes two scans different enough to say so again."""
        return frozenset(h.key() for h in self.holders)


def is_device(path: str, device_dir: str) -> bool:
    """/dev/nvidiactl, /dev/nvidia<N>, /dev/nvidia-caps/<anything> (under `device_dir`)."""
    prefix = device_dir.rstrip("/") + "/"
    if not path.startswith(prefix):
        return False
    name = path[len(prefix) :]
    return (
        name == "nvidiactl"
        or (name.startswith("nvidia") and name[6:].isdigit())
        or (name.startswith("nvidia-caps/") and len(name) > len("nvidia-caps/"))
    )


def scan(device_dir: str = "/dev", proc: str = "/proc") -> Scan:
    """Every process but this one (whose probe thread may have NVML open at this moment)."""
    holders: list[Holder] = []
    unreadable = 0
    own = str(os.getpid())
    try:
        pids = [e for e in procs.pids(proc) if e != own][:MAX_PROCESSES]
    except OSError:
        return Scan([], 0, namespace_only=True)
    for pid in pids:
        devices = _devices(f"{proc}/{pid}/fd/", device_dir)
        if devices is None:
            unreadable += 1
        elif devices:
            n = int(pid)
            holder = Holder(n, _cmdline(proc, n), _container(proc, n), devices, _started(proc, n))
            holders.append(holder)
    return Scan(holders, unreadable, _namespace_only(proc))


def _devices(fd_dir: str, device_dir: str) -> tuple[str, ...] | None:
    """The NVIDIA device files among a process's descriptors; None if they cannot be read
    (a process that is gone has none). Two system calls a descriptor at most, and a cheap
    check of the link's start before any other: this runs over every process of the node."""
    prefix = device_dir.rstrip("/") + "/nvidia"
    found: set[str] = set()
    try:
        names = os.listdir(fd_dir)
    except PermissionError:
        return None
    except OSError:
        return ()  # exited (or a zombie, which holds nothing)
    for name in names[:MAX_FDS]:
        try:
            target = os.readlink(fd_dir + name)
        except PermissionError:  # the list is open to root, the links only with CAP_SYS_PTRACE
            return None
        except OSError:
            continue  # closed meanwhile
        if target.startswith(prefix):
            path = target.removesuffix(DELETED)
            if is_device(path, device_dir):
                found.add(path)
    return tuple(sorted(found))


def _started(proc: str, pid: int) -> int:
    """When the process started (clock ticks since boot, /proc/PID/stat's 22nd field): with the
    pid, who it is; a pid used again by a new process is another holder. 0 if unknown."""
    try:
        return int(procs.stat_fields(pid, proc)[19])
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(proc: str, pid: int) -> str:
    try:
        argv = procs.argv(pid, 4 * CMDLINE_CHARS, proc)
    except OSError:
        argv = []
    text = " ".join(a.decode(errors="backslashreplace") for a in argv)
    if not text:  # a kernel thread, or a process that cleared its command line
        try:
            comm = procs.read(pid, "comm", 64, proc).strip()
            text = f"[{comm.decode(errors='backslashreplace')}]"
        except OSError:
            text = "?"
    return text if len(text) <= CMDLINE_CHARS else text[: CMDLINE_CHARS - 3] + "..."


def _container(proc: str, pid: int) -> str:
    """The container id in the process's cgroup path, or ""."""
    try:
        text = procs.read(pid, "cgroup", 8192, proc).decode(errors="replace")
    except OSError:
        return ""
    return container_id(text)


def container_id(cgroup: str) -> str:
    """The container id of a /proc/PID/cgroup text: the innermost one, for a container in a
    container (kind's nodes, a runtime in a Docker container). That is the deepest in its path,
    and the deepest path of any line (the last line's of equal ones): under cgroup v1 an inner
    runtime may make cgroups in only some hierarchies, whose lines then stop at the outer one."""
    named = []
    for index, line in enumerate(cgroup.splitlines()):
        for depth, part in enumerate(line.split(":", 2)[-1].split("/")):
            match = _CONTAINER.search(part)
            if match:
                named.append((depth, index, match.group(1)))
    return max(named)[2] if named else ""


# The kernel's fixed inode number of the initial PID namespace (include/linux/proc_ns.h,
# PROC_PID_INIT_INO): any other means a PID namespace of its own, a container's.
INITIAL_PID_NAMESPACE = 0xEFFFFFFC


def _namespace_only(proc: str) -> bool:
    """Whether this process sees only a PID namespace of its own (a container without hostPID):
    other containers' processes, and the host's, are then out of sight."""
    try:
        return os.stat(f"{proc}/self/ns/pid").st_ino != INITIAL_PID_NAMESPACE
    except OSError:
        return False


class Scanner:
    """Scans in a thread of its own, so that the main loop never waits for one: a signal or a
    child's exit during a scan of seconds is acted on at once. `notify` is called from the
    thread when a scan is done; `take` hands it over once."""

    def __init__(self, device_dir: str, notify: Callable[[], None] = lambda: None) -> None:
        self._device_dir, self._notify = device_dir, notify
        self._lock = threading.Lock()
        self._generation = 0  # scans begun before the last forget() are dropped
        self._running: int | None = None  # the generation of the scan under way
        self._done: Scan | None = None

    def start(self) -> bool:
        """Begin a scan; False (and nothing begun) while one begun since forget() still runs."""
        with self._lock:
            if self._running == self._generation:
                return False
            self._running = generation = self._generation
        thread = threading.Thread(target=self._work, args=(generation,), name="gpu-holders",
                                  daemon=True)  # fmt: skip
        thread.start()
        return True

    def forget(self) -> None:
        """Drop the scan finished or under way: it began before now (a hold begins afresh)."""
        with self._lock:
            self._generation += 1
            self._done = None

    def take(self) -> Scan | None:
        """The scan finished since the last call, or None."""
        with self._lock:
            done, self._done = self._done, None
        return done

    def _work(self, generation: int) -> None:
        done = scan(self._device_dir)  # never raises: what cannot be read is counted
        with self._lock:
            if generation != self._generation:
                return
            self._done, self._running = done, None
        self._notify()
