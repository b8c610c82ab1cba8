"""Closed stdio and a stderr nobody reads: the agent still gets valid descriptors 0-2, its
exit code comes back, and a full log pipe never stops a stop."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (
    AGENT,
    FakeNode,
    clean_env,
    gpu_supervise_cmd,
    pid_alive,
    stalled_collector,
)
from fakenvml import dgx_a100

FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


# -- closed stdio ----------------------------------------------------------------------------------


@pytest.mark.parametrize("closed", ["0<&-", "1>&-", "2>&-", "0<&- 1>&- 2>&-"])
def test_closed_stdio_changes_nothing(tmp_path: Path, closed: str):
    """The child gets valid descriptors 0-2 too, and its exit code comes back unchanged."""
    report = tmp_path / "fds"
    agent = f"ls -l /proc/$$/fd/0 /proc/$$/fd/1 /proc/$$/fd/2 > {report} 2>&1; exit 5"
    exe = " ".join(gpu_supervise_cmd())
    script = f"{exe} --no-watch -- sh -c '{agent}' {closed}"
    out = subprocess.run(["sh", "-c", script], env=clean_env(), capture_output=True, timeout=60)
    assert out.returncode == 5, out.stderr
    fds = report.read_text()
    assert "No such file" not in fds and fds.count("->") == 3, fds


def test_stderr_closed_under_a_topology_change_still_stops_the_agent(
    fake_node: FakeNode, tmp_path: Path
):
    node = dgx_a100()
    fake_node.write(node)
    pidfile = tmp_path / "pid"
    exe = " ".join(gpu_supervise_cmd())
    agent = " ".join([*AGENT, "--no-nvml", "--pidfile", str(pidfile)])
    proc = subprocess.Popen(["sh", "-c", f"exec {exe} {' '.join(FAST)} -- {agent} 2>&-"],
                            env=fake_node.env, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1)  # the baseline
        node.gpus.pop()
        fake_node.write(node)
        assert proc.wait(60) == 1
        assert not pid_alive(int(pidfile.read_text()))
    finally:
        proc.kill()
        proc.wait()


# -- a stderr nobody reads -------------------------------------------------------------------------


def test_a_stderr_nobody_reads_never_stops_a_stop(fake_node: FakeNode, tmp_path: Path):
    """The log pipe is full (a stalled collector): log lines wait in their own thread, and
    SIGTERM still stops the agent and ends gpu-supervise."""
    fake_node.write(dgx_a100())
    out = tmp_path / "out"
    # the agent fills the pipe itself (its own write given up after 2 s), then idles
    agent = "timeout 2 head -c 200000 /dev/zero >&2; echo up; exec sleep 300"
    cmd = [*gpu_supervise_cmd(), *FAST, "--log-level", "DEBUG", "--", "sh", "-c", agent]
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(cmd, env=fake_node.env, stdout=stdout, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while b"up" not in out.read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1)  # five probes of DEBUG lines: the log writer is blocked
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143  # never read: the exit line is given up after stop_timeout
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_the_decision_lines_survive_a_collector_stalled_across_the_exit(
    fake_node: FakeNode, tmp_path: Path
):
    """The collector stalls for a few seconds just as the topology changes: exit 1 comes on
    time, and once the collector reads again, the change line, its per-GPU line and the exit
    line are all there (they wait up to stop_timeout, not 2 s)."""
    node = dgx_a100(["1g.5gb"] * 7, count=2)
    fake_node.write(node)
    proc = stalled_collector(fake_node, tmp_path, stop_timeout="10")
    try:
        node.gpu(1).set_layout(["3g.20gb"] * 2)
        fake_node.write(node)
        message = tmp_path / "termination-log"
        deadline = time.monotonic() + 60
        while not message.read_text():  # the decision is taken: the exit is under way
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(4)  # the collector is still stalled, past the 2 s given to other lines
        assert proc.poll() is None  # still waiting for its decision lines to get out
        assert proc.stderr is not None
        log = proc.stderr.read().decode(errors="replace")  # the collector reads again
        assert proc.wait(30) == 1
    finally:
        proc.kill()
        proc.wait()
    assert "[GPU-Watcher] MIG configuration change detected (Old UUIDs: [" in log
    assert f"[GPU-Watcher]   GPU 1 {node.gpu(1).uuid}" in log
    assert "INFO    exiting 1: restart me (GPU topology changed)" in log
    assert "could not be written" not in message.read_text()
