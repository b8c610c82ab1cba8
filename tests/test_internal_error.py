"""gpu-supervise itself failing: the agent's tree is stopped, one line says why, exit 70."""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

from test_child import STOP_1S, tree_agent

from conftest import AGENT, Proc, clean_env, gpu_supervise_cmd, marked, pid_alive

Start = Callable[..., Proc]
PLAIN = ["--no-watch"]


def test_a_failure_right_after_the_spawn_stops_the_agent_in_one_line(tmp_path: Path):
    """With 5 file descriptors, the agent starts, then loading the rest of gpu-supervise fails
    (no descriptor to read a module with). The agent must not be left running unsupervised (as
    PID 1 nothing would ever stop it), and the reason is one line, not a traceback."""
    import resource

    mark = uuid.uuid4().hex
    out = subprocess.run(
        [*gpu_supervise_cmd(), *PLAIN, "--stop-timeout", "5", "--", "sleep", "60"],
        env=clean_env(GS_TEST_AGENT=mark), capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (5, 5)),
    )  # fmt: skip
    assert out.returncode == 70, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("gpu-supervise: internal error after starting the agent (OSError: ")
    assert "Too many open files" in line
    assert "exit code 143); exiting 70" in line  # the agent ran, and got SIGTERM
    assert marked("GS_TEST_AGENT", mark) == []


# Raises once, in gpu-supervise only, at its first os.kill after the file named by
# GS_TEST_BREAK appears: a bug inside the main loop, planted through the interpreter's own
# audit hooks rather than by editing the code.
BREAK_ONCE = """
import os, sys
_armed = [os.environ.get("GS_TEST_BREAK"), os.environ.get("GS_TEST_BREAK_PID")]
def _hook(event, args):
    if event == "os.kill" and _armed[0] and os.path.exists(_armed[0]):
        if str(os.getpid()) == open(_armed[1]).read().strip():
            _armed[0] = None
            raise RuntimeError("planted failure in the loop")
sys.addaudithook(_hook)
"""


def test_a_failure_inside_the_loop_stops_the_agents_tree(start: Start, tmp_path: Path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BREAK_ONCE)
    pidfile = tmp_path / "pids"
    env = clean_env(PYTHONPATH=str(tmp_path / "site"), GS_TEST_BREAK=str(tmp_path / "break"),
                    GS_TEST_BREAK_PID=str(tmp_path / "gs.pid"))  # fmt: skip
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml", "--grandchild", "--pidfile", str(pidfile)],
                 env)  # fmt: skip
    (tmp_path / "gs.pid").write_text(str(proc.pid))
    proc.wait_for("ready")
    agent, grandchild = map(int, pidfile.read_text().split())
    (tmp_path / "break").touch()
    proc.signal(signal.SIGHUP)  # forwarded with os.kill: the planted failure
    assert proc.wait(60) == 70, proc.output
    assert "CRITICAL internal error (RuntimeError: planted failure in the loop at " in proc.log
    assert "stopping the agent's tree and exiting 70" in proc.log
    assert "Traceback" not in proc.log
    assert "got SIGTERM" in proc.stdout  # stopped the usual way first
    assert not pid_alive(agent) and not pid_alive(grandchild)  # the whole tree


# -- after the agent exited ------------------------------------------------------------------------


# Raises once, in gpu-supervise only (its pid in the file GS_TEST_BREAK_PID names), at its first
# os.kill or os.killpg: with --no-watch and no signal to forward, the stop after the agent's
# exit. A bug in the loop, planted through the interpreter's audit hooks.
BREAK_AT_THE_FIRST_KILL = """
import os, sys
_armed = [os.environ.get("GS_TEST_BREAK_PID")]
def _hook(event, args):
    if event in ("os.kill", "os.killpg") and _armed[0] and os.path.exists(_armed[0]):
        if str(os.getpid()) == open(_armed[0]).read().strip():
            _armed[0] = None
            raise RuntimeError("planted failure in the stop")
sys.addaudithook(_hook)
"""


def test_a_failure_after_the_agent_exited_still_stops_what_it_left(start: Start, tmp_path: Path):
    """The agent has exited and left a daemon (setsid, ignoring SIGTERM); the stop of what it
    left fails inside gpu-supervise. The last resort must still stop the daemon: gone when
    gpu-supervise exits 70, not left running unsupervised."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BREAK_AT_THE_FIRST_KILL)
    gs_pid, pidfile = tmp_path / "gs.pid", tmp_path / "pids"
    env = clean_env(PYTHONPATH=str(tmp_path / "site"), GS_TEST_BREAK_PID=str(gs_pid))
    agent = tree_agent(pidfile, "--no-nvml", "--run", "1", "--exit", "5")
    proc = start([*PLAIN, *STOP_1S, "--", *agent], env)
    gs_pid.write_text(str(proc.pid))
    assert proc.wait() == 70, proc.output
    assert "CRITICAL internal error (RuntimeError: planted failure in the stop at " in proc.log
    assert "child " in proc.log and " exited with code 5" in proc.log  # the agent went first
    daemon = int(pidfile.read_text().split()[1])
    assert not pid_alive(daemon)


# Raises at gpu-supervise's first two os.kill/os.killpg (the stop after the agent's exit, then
# the last resort's own), and from then on writes each os.killpg it is asked for to a file.
BREAK_TWICE = """
import os, sys
_file, _log, _left = os.environ["GS_TEST_BREAK_PID"], os.environ["GS_TEST_KILLPG_LOG"], [2]
def _hook(event, args):
    if event not in ("os.kill", "os.killpg") or not os.path.exists(_file):
        return
    if str(os.getpid()) != open(_file).read().strip():
        return
    if _left[0]:
        _left[0] -= 1
        raise RuntimeError("planted failure in the stop")
    if event == "os.killpg":
        with open(_log, "a") as fh:
            fh.write(f"{args[0]} {args[1]}\\n")
sys.addaudithook(_hook)
"""


def test_the_last_resort_never_signals_the_group_of_an_agent_already_reaped(
    start: Start, tmp_path: Path
):
    """When even the tree walk fails, the last resort signals the agent's group with system
    calls only; once the agent is reaped its group's number is free, and may name somebody
    else's group: then it must not be signalled."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BREAK_TWICE)
    gs_pid, pidfile, killpg = tmp_path / "gs.pid", tmp_path / "pids", tmp_path / "killpg"
    env = clean_env(PYTHONPATH=str(tmp_path / "site"), GS_TEST_BREAK_PID=str(gs_pid),
                    GS_TEST_KILLPG_LOG=str(killpg))  # fmt: skip
    agent = tree_agent(pidfile, "--no-nvml", "--run", "1", "--exit", "5")
    proc = start([*PLAIN, *STOP_1S, "--", *agent], env)
    gs_pid.write_text(str(proc.pid))
    assert proc.wait() == 70, proc.output
    assert proc.log.count("RuntimeError: planted failure in the stop") == 1  # the CRITICAL line
    reaped = int(pidfile.read_text().split()[0])
    groups = (
        [line.split()[0] for line in killpg.read_text().splitlines()] if killpg.exists() else []
    )
    assert str(reaped) not in groups
