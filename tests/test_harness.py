"""The tests' own harness: it stops everything it starts, orphans included, and the session
fails if anything a test started outlives it (see conftest.pytest_sessionfinish)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from conftest import AGENT, SESSION_MARK, Proc, clean_env, marked, pid_alive

Start = Callable[..., Proc]


def test_closing_a_proc_stops_its_whole_tree_even_orphaned(start: Start, tmp_path: Path):
    pidfile = tmp_path / "pids"
    agent = [*AGENT, "--no-nvml", "--ignore-term", "--grandchild", "--pidfile", str(pidfile)]
    proc = start(["--no-watch", "--", *agent], clean_env())
    proc.wait_for("ready")
    pids = [int(p) for p in pidfile.read_text().split()]
    os.kill(proc.pid, signal.SIGKILL)  # the tree is orphaned: no parent of ours reaches it
    proc.popen.wait()
    assert all(pid_alive(p) for p in pids)
    proc.close()
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids)


def test_every_process_a_test_starts_carries_the_session_mark(start: Start, tmp_path: Path):
    proc = start(["--no-watch", "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    assert proc.pid in marked(SESSION_MARK, os.environ[SESSION_MARK])
