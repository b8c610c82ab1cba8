"""The process table as /proc shows it, read with os alone: the one way gpu-supervise reads it
(the agent's tree for a stop, the survivors of one, the GPU's holders, the copies install may
remove).

Not psutil: its recursive children() reads the same /proc/PID/stat files, measures no faster
(docs/performance.md), costs milliseconds to import, and fails outright where /proc/stat is
hidden (systemd's ProcSubset=pid), where these readers still work. Every reader raises OSError
for a process that is gone or not ours to read; callers decide what that means.
"""

from __future__ import annotations

import os

PROC = "/proc"


def pids(proc: str = PROC) -> list[str]:
    """The pids /proc lists now, as its entries name them (OSError: no /proc)."""
    return [entry for entry in os.listdir(proc) if entry.isdigit()]


def read(pid: int | str, name: str, limit: int = -1, proc: str = PROC) -> bytes:
    """/proc/PID/NAME (cmdline, maps, cgroup...), at most `limit` bytes."""
    with open(f"{proc}/{pid}/{name}", "rb") as fh:
        return fh.read(limit)


def argv(pid: int | str, limit: int = -1, proc: str = PROC) -> list[bytes]:
    """The command line's words ([b""] for a process that is exiting, or has none)."""
    return read(pid, "cmdline", limit, proc).rstrip(b"\0").split(b"\0")


def stat_fields(pid: int | str, proc: str = PROC) -> list[bytes]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses): [0] is
    the state letter, [1] the parent's pid, [19] the start time in clock ticks since boot."""
    return read(pid, "stat", 4096, proc).rsplit(b")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, from one pass over /proc/PID/stat."""
    parents: dict[int, list[int]] = {}
    for entry in pids():
        try:
            ppid = int(stat_fields(entry)[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for kid in parents.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def children_of(pid: int | str) -> list[int]:
    """`pid`'s children now, oldest first: one short read per thread of it ([] where the kernel
    has no /proc/PID/task/TID/children)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"{PROC}/{pid}/task"):
            out.extend(int(child) for child in read(pid, f"task/{task}/children").split())
    except (OSError, ValueError):
        pass
    return out
