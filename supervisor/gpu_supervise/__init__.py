"""gpu-supervise: run a GPU monitoring agent as a child and restart it when the GPU topology
(GPUs, MIG mode, MIG devices) changes, so the agent never keeps stale NVML handles.

The modules form layers; each uses only those below it (tests/test_layers.py keeps it so):

    entry, __main__    the console script: hold signals, then hand over to cli
    cli                parse the command line; the run on one screen (_supervise): config,
                       spawn, then the loop's steps: baseline, watch, decide, stop, exit
    demo, install      the other commands
    supervise          the loop's steps (begin, take_baseline, turn, finish), the states and
                       their edges, decisions carried out (stop, hold, start again)
    watching           the watch glue: probes when due, the tripwire, the heartbeat, who
                       blocks a reset while holding
    events             what decisions look like: log lines, status texts, termination message
    watch              the policy: pure, given readings and the time; when to probe
                       (ProbeSchedule), the watch's phases and a decision's events
    probe              readings in a thread of their own, each under a deadline
    sources, nvml      where readings come from: NVML, or a file
    tripwire           the driver's MIG tree in procfs: a change hurries the next probe
    kube               the node's GPU Operator labels, watched through the Kubernetes API
    holders            who holds the GPU's device files open (a scan off the loop)
    stopping           a stop in progress, the last lines, the last resort
    agent              the agent as the loop sees it: pid, status, start again, forward
    inbox, notifier    what wakes the loop (signals, a self-pipe); systemd's notify socket
    child, report      the agent's processes and the one stop of their tree; the termination
                       log, systemd's notify socket
    args, config       command-line parsing; settings from file, environment and flags
    exits              gpu-supervise's own exit codes; an unexpected failure in one line
    logs, topology     the log sink; the topology model and its diff
    files, signals     opening files safely; which signals are forwarded
    procs              the process table, read from /proc
"""

from __future__ import annotations

__version__ = "0.1.0"
BUILD_FILE = "gpu-supervise.build"  # the build token, in the self-contained binary's _internal/


def build_token() -> str | None:
    """The token of this self-contained build: 8 hex digits that packaging/build-binary.sh
    draws afresh for each build and writes beside the program. It tells two builds of one
    version apart, and `install` names the build's folder VERSION-TOKEN with it. None from
    Python packages, and from a frozen build made without build-binary.sh."""
    import os
    import sys

    if not getattr(sys, "frozen", False):
        return None
    try:
        with open(os.path.join(getattr(sys, "_MEIPASS", ""), BUILD_FILE), "rb") as fh:
            token = fh.read(64).decode("ascii", "replace").strip()
    except OSError:
        return None
    return token if len(token) == 8 and all(c in "0123456789abcdef" for c in token) else None


def version_text() -> str:
    """What --version prints after the program's name: VERSION-TOKEN for the self-contained
    binary (the name of its folder in gpu-supervise.versions/), and for the Python package,
    which has no build token, its version and the folder it is imported from."""
    token = build_token()
    if token is not None:
        return f"{__version__}-{token}"
    import os
    import sys

    if getattr(sys, "frozen", False):
        return f"{__version__} (a build without a token: not made by build-binary.sh)"
    return f"{__version__} (Python package, {os.path.dirname(os.path.abspath(__file__))})"
