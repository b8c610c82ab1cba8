"""What an operator reads in the log: the first line says what runs and how, the command in
full, a heartbeat through days of quiet, and an agent that daemonized said plainly."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import AGENT, FakeNode, Proc, clean_env, pid_alive
from fakenvml import dgx_a100
from gpu_supervise import __version__

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


def test_the_first_line_says_what_runs_with_which_settings_from_where(
    start: Start, fake_node: FakeNode, tmp_path: Path
):
    config = tmp_path / "config.toml"
    config.write_text("[watch]\ninterval = 7\nfailure_threshold = 4\n")
    fake_node.write(dgx_a100())
    proc = start(["--config", str(config), "--cooldown", "2", "--", "sh", "-c", "sleep 30",
                  "a b"], fake_node.env)  # fmt: skip
    proc.wait_for("[GPU-Watcher] baseline")
    first, second = proc.log_lines()[:2]
    assert first.endswith(
        f" INFO    gpu-supervise {__version__}: configuration {config}; watching NVML every 7 s "
        "after a 2 s cool-down, settle 5 s, 4 failed probes restart, MIG pending: hold up to "
        f"300 s, tripwire every 1 s on {fake_node.path}.procfs; a child subreaper"
    )
    # the whole command, quoted as a shell would
    assert re.search(r" INFO    started sh -c 'sleep 30' 'a b' as pid \d+$", second)


def test_without_a_configuration_file_or_watching_the_first_line_says_so(start: Start):
    proc = start(["--no-watch", "--", "sleep", "30"], clean_env())
    proc.wait_for("started ")
    assert re.search(r" INFO    gpu-supervise \S+: no configuration file; not watching the GPU "
                     r"topology; a child subreaper$", proc.log_lines()[0])  # fmt: skip


def test_a_long_command_is_clipped_in_the_log(start: Start):
    proc = start(["--no-watch", "--", "sh", "-c", "sleep 30", "x" * 5000], clean_env())
    proc.wait_for("started ")
    started = next(line for line in proc.log_lines() if " started " in line)
    assert len(started) < 500 and "(50" in started  # "... (5023 characters)"


def test_the_heartbeat_says_the_watcher_is_alive(start: Start, fake_node: FakeNode):
    fake_node.write(dgx_a100(["1g.5gb"] * 7, count=1))
    proc = start([*FAST, "--log-heartbeat", "1", "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("alive (running)", count=2)
    beat = [line for line in proc.log_lines() if "alive (running)" in line][-1]
    pattern = (
        r" INFO    \[GPU-Watcher\] alive \(running\): (\d+) probe\(s\) in 1 s, 0 failed, "
        r"the last one [\d.]+ ms; layout: GPU 0: MIG 7x1g.5gb$"
    )
    match = re.search(pattern, beat)
    assert match and 2 <= int(match[1]) <= 10  # about five probes a second


@pytest.mark.parametrize("watch", ["--no-watch", "between probes"])
def test_the_heartbeat_comes_on_time_when_nothing_else_wakes_the_loop(
    start: Start, fake_node: FakeNode, watch: str
):
    """Without watching, or with a probe every 30 s and no tripwire, only the heartbeat's own
    time wakes the loop: a line a second, not one per probe."""
    fake_node.write(dgx_a100(count=1))
    args = ["--no-watch"] if watch == "--no-watch" else [
        "--interval", "30", "--cooldown", "0", "--tripwire-interval", "0"]  # fmt: skip
    proc = start([*args, "--log-heartbeat", "1", "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("alive (running)", timeout=20, count=4)


def test_no_heartbeat_at_0(start: Start, fake_node: FakeNode):
    fake_node.write(dgx_a100(count=1))
    proc = start([*FAST, "--log-heartbeat", "0", "--", "sleep", "2"], fake_node.env)
    assert proc.wait(30) == 0
    assert "alive (" not in proc.log


def test_an_agent_that_daemonizes_is_said_to_have_left_processes(start: Start, tmp_path: Path):
    """Like tini and dumb-init, gpu-supervise needs the agent in the foreground: an agent
    that forks a daemon and exits ends the supervision, and its daemon is stopped, loudly."""
    pidfile = tmp_path / "daemon"
    proc = start(["--no-watch", "--", "sh", "-c", f"setsid sleep 777 & echo $! > {pidfile}"],
                 clean_env())  # fmt: skip
    assert proc.wait(30) == 0
    (line,) = [x for x in proc.log_lines() if "left 1 process(es) running" in x]
    assert " WARNING the agent exited and left 1 process(es) running; stopping them " in line
    assert line.endswith(f"pid {pidfile.read_text().strip()}: sleep 777")
    assert not pid_alive(int(pidfile.read_text()))


def test_a_forwarded_signal_reads_as_received_then_forwarded(start: Start):
    """systemd sends SIGCONT right after its SIGTERM: the DEBUG line says it arrived."""
    proc = start(["--no-watch", "--log-level", "DEBUG", "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    proc.signal(signal.SIGCONT)
    proc.wait_for("got SIGCONT")
    assert "DEBUG   received SIGCONT: forwarding it to pid " in proc.log
