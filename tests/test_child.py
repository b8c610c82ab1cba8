"""The child: exec, exit statuses, signal forwarding, stopping the whole tree, reaping.
Real processes and real signals, in the shape of dumb-init's own tests."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import (
    AGENT,
    FakeNode,
    Proc,
    clean_env,
    gpu_supervise_cmd,
    kill_marked,
    log_stamp,
    marked,
    missing_capability,
    pid_alive,
    run,
)
from fakenvml import dgx_a100
from procfs import cpu_seconds, stat_fields

Start = Callable[..., Proc]
PLAIN = ["--no-watch"]
STOP_1S = ["--stop-timeout", "1"]


def tree_agent(pidfile: Path, *args: str) -> list[str]:
    """The test agent leaving a grandchild in a session of its own; both pids in `pidfile`."""
    return [*AGENT, "--grandchild", "--pidfile", str(pidfile), *args]


@pytest.mark.parametrize(
    ("script", "code"),
    [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -TERM $$", 143),
        ("kill -KILL $$", 137),
        ("kill -SEGV $$", 139),
    ],
)
def test_child_exit_status_comes_back(script: str, code: int):
    out = run([*PLAIN, "--", "sh", "-c", script], clean_env())
    assert out.returncode == code, out.stderr
    last = out.stderr.splitlines()[-1]  # every run ends saying how and why
    how = f"exited with code {code}" if script.startswith("exit") else "was killed by SIG"
    assert last.split(" INFO    ")[1].startswith(f"exiting {code}: the agent {how}"), last


def not_executable(tmp_path: Path) -> Path:
    """A script without its execute bit."""
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    return script


def test_command_not_found_is_127_and_not_executable_is_126(tmp_path: Path):
    out = run([*PLAIN, "--", "no-such-agent-xyz"], clean_env())
    assert out.returncode == 127
    assert "no-such-agent-xyz: command not found" in out.stderr
    out = run([*PLAIN, "--", str(not_executable(tmp_path))], clean_env())
    assert out.returncode == 126
    assert "permission denied" in out.stderr
    out = run([*PLAIN, "--", str(tmp_path)], clean_env())
    assert out.returncode == 126


MISSING = "(first line) was not found"


@pytest.mark.parametrize(
    ("first_line", "shown"),
    [
        (b"#!/bin/sh\r\n", f"its interpreter /bin/sh\\r {MISSING} (a CRLF line ending)"),
        (b"#! /nonexistent/python3 -u\n", f"its interpreter /nonexistent/python3 {MISSING}"),
    ],
)
def test_a_script_whose_interpreter_is_missing_says_so(
    tmp_path: Path, first_line: bytes, shown: str
):
    """exec says ENOENT for a script that exists when the interpreter its first line names does
    not: the line names the interpreter (a carriage return shown as \\r), not the script, which
    is there. Found on PATH or named by a path, and on the terminal's way to start it too."""
    script = tmp_path / "agent.sh"
    script.write_bytes(first_line + b"echo hi\n")
    script.chmod(0o755)
    out = run([*PLAIN, "--", str(script)], clean_env())
    assert (out.returncode, out.stderr) == (127, f"gpu-supervise: {script}: {shown}\n")
    out = run([*PLAIN, "--", "agent.sh"], clean_env(PATH=f"/nonexistent:{tmp_path}:/usr/bin:/bin"))
    assert (out.returncode, out.stderr) == (127, f"gpu-supervise: agent.sh: {shown}\n")
    with Terminal([*PLAIN, "--", str(script)]) as term:
        assert term.proc.wait(60) == 127
        term.expect(f"{script}: {shown}".encode())


def test_a_file_that_exists_is_never_command_not_found(tmp_path: Path):
    """ENOENT for a file that exists whose first line names one that exists too: what is
    missing lies further on (here the interpreter of its interpreter). Not "command not
    found": the file is there, and the line says something it needs is missing."""
    inner, outer = tmp_path / "inner", tmp_path / "agent.sh"
    inner.write_text("#!/nonexistent/sh\n")
    outer.write_text(f"#!{inner}\necho hi\n")
    for script in (inner, outer):
        script.chmod(0o755)
    out = run([*PLAIN, "--", str(outer)], clean_env())
    assert out.returncode == 127
    assert out.stderr == (
        f"gpu-supervise: {outer}: cannot execute: a file it needs is missing (No such file or "
        "directory)\n"
    )


def test_output_passes_straight_through_and_arguments_arrive_verbatim(tmp_path: Path):
    """No shell, no pipe: the child writes to our own stdout file; odd arguments are data."""
    target = tmp_path / "out.txt"
    args = ["a b", "'q'", '"dq"', "$(touch pwned)", "; rm -rf x", "*", "$HOME"]
    with open(target, "wb") as fh:
        code = subprocess.run(
            gpu_supervise_cmd()
            + [
                *PLAIN,
                "--",
                sys.executable,
                "-c",
                "import os,sys; print(os.readlink('/proc/self/fd/1')); print(sys.argv[1:])",
                *args,
            ],
            stdout=fh,
            stderr=subprocess.DEVNULL,
            env=clean_env(),
            cwd=tmp_path,
            timeout=60,
        ).returncode
    assert code == 0
    fd_target, argv = target.read_text().splitlines()
    assert fd_target == str(target)
    assert argv == repr(args)
    assert not (tmp_path / "pwned").exists()


def test_environment_is_inherited_and_never_logged():
    env = clean_env(AGENT_SECRET="hunter2-token")
    out = run(["--log-level", "DEBUG", *PLAIN, "--", "sh", "-c", 'echo "seen=$AGENT_SECRET"'], env)
    assert "seen=hunter2-token" in out.stdout
    assert "hunter2" not in out.stderr


# exec with an environment that names DUP twice, as a C program can (a mapping cannot).
DUPLICATE_ENV = r"""
#include <unistd.h>
int main(int argc, char **argv) {
    (void)argc;
    char *env[] = {"DUP=first", "PATH=/usr/bin:/bin", "DUP=second", argv[1], 0};
    execve(argv[2], argv + 2, env);
    return 127;
}
"""


def test_of_a_name_given_twice_the_agent_gets_the_first_value(tmp_path: Path):
    """As getenv and os.environ have it: the agent's environment, as the kernel shows it, holds
    the name once, with its first value."""
    from conftest import SESSION_MARK

    source = tmp_path / "dupenv.c"
    source.write_text(DUPLICATE_ENV)
    subprocess.run(["gcc", "-o", str(tmp_path / "dupenv"), str(source)], check=True)
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}"
    out = subprocess.run(
        [str(tmp_path / "dupenv"), mark, *gpu_supervise_cmd(), *PLAIN, "--termination-log", "",
         "--", "cat", "/proc/self/environ"],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split(b"\0")[:-1]) == sorted(
        [b"DUP=first", b"PATH=/usr/bin:/bin", os.fsencode(mark)]
    )


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH"])
def test_signals_are_forwarded_to_the_child(start: Start, sig: str):
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    proc.signal(getattr(signal, sig))
    proc.wait_for(f"got {sig}")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143


def test_sigterm_to_us_stops_the_child_and_returns_its_code(start: Start):
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml", "--exit-on-term", "0"], clean_env())
    proc.wait_for("ready")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 0  # a clean stop whose child exited 0
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143
    assert proc.log_lines()[-1].endswith("INFO    exiting 143: stopped by SIGTERM")


def test_sigint_to_us_is_forwarded_and_escalates_after_stop_timeout(start: Start):
    proc = start([*PLAIN, "--stop-timeout", "0.5", "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    proc.signal(signal.SIGINT)
    proc.wait_for("got SIGINT")  # the agent handles SIGINT and carries on...
    assert proc.wait() == 137  # ...so SIGKILL follows after stop_timeout
    assert "sent SIGKILL" in proc.output


def test_each_process_gets_exactly_one_sigterm(start: Start):
    """Many agents take a second SIGTERM as "quit now": the stop sends one, to every process."""
    script = "trap 'echo TERM' TERM; echo up; while :; do sleep 0.1; done"
    proc = start([*PLAIN, "--stop-timeout", "1.5", "--", "sh", "-c", script], clean_env())
    proc.wait_for("up")
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 137
    assert proc.stdout.splitlines().count("TERM") == 1


def test_a_second_sigterm_during_the_stop_reaches_the_tree_again(start: Start):
    """The rule: every SIGTERM or SIGINT that reaches gpu-supervise reaches the agent's tree
    (the first starts the stop; a second, an operator's "hurry up", is sent on as well, as tini
    would), and SIGKILL still follows stop_timeout after the first."""
    script = "trap 'echo TERM' TERM; echo up; while :; do sleep 0.1; done"
    proc = start([*PLAIN, "--stop-timeout", "3", "--", "sh", "-c", script], clean_env())
    proc.wait_for("up")
    proc.signal(signal.SIGTERM)
    proc.wait_for("TERM\n")
    proc.signal(signal.SIGTERM)
    proc.wait_for("TERM\n", count=2)
    assert proc.wait() == 137
    assert proc.stdout.splitlines().count("TERM") == 2
    out = proc.log
    assert "received SIGTERM during the stop: sending it to the child's tree too" in out
    assert "still running 3 s after SIGTERM: sent SIGKILL" in out


def test_a_stopped_tree_is_continued_after_sigterm(start: Start, tmp_path: Path):
    """A stopped process acts on no signal but SIGKILL: an agent stopped by a forwarded ^Z
    (SIGTSTP), or a daemon of its stopped by SIGSTOP, would sit out stop_timeout and die of
    SIGKILL. Like systemd, the stop sends SIGCONT after SIGTERM, to the whole tree, and
    SIGTERM ends it: the agent's 143, no SIGKILL."""
    pidfile = tmp_path / "daemon"
    script = f"setsid sleep 300 & echo $! > {pidfile}; echo up; exec sleep 300"
    proc = start([*PLAIN, "--stop-timeout", "20", "--", "sh", "-c", script], clean_env())
    proc.wait_for("up")
    proc.wait_for(" as pid ")
    agent = int(proc.log.split(" as pid ")[1].split()[0])
    daemon = int(pidfile.read_text())
    wait_until(lambda: "sleep" in Path(f"/proc/{agent}/comm").read_text(), "no exec sleep")
    proc.signal(signal.SIGTSTP)  # forwarded: the agent stops
    os.kill(daemon, signal.SIGSTOP)
    for pid in (agent, daemon):
        wait_until(lambda pid=pid: stat_fields(pid)[0] == "T", f"pid {pid} never stopped")
    proc.signal(signal.SIGTERM)
    assert proc.wait(120) == 143, proc.log
    assert "sent SIGKILL" not in proc.log
    assert not pid_alive(daemon)


def test_the_last_resort_stop_continues_a_stopped_agent_too():
    """stop_group_now (gpu-supervise failing right after the spawn) sends SIGCONT as well."""
    from gpu_supervise import child

    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(300)
        os._exit(0)
    try:
        wait_until(lambda: stat_fields(pid)[0] == "T", "the child never stopped")
        assert child.stop_group_now(pid, 20) == 143  # SIGTERM's, not SIGKILL's 137
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_the_agent_leads_a_process_group_of_its_own(start: Start, tmp_path: Path):
    """So that a stop signals the whole group at once, and a ^C meant for gpu-supervise's own
    group (a shell's job) is not the agent's business: the agent's group is its own pid."""
    pidfile = tmp_path / "pid"
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml", "--pidfile", str(pidfile)], clean_env())
    proc.wait_for("ready")
    agent = int(pidfile.read_text())
    assert os.getpgid(agent) == agent != os.getpgid(proc.pid)


def test_checking_for_children_never_reaps_the_agent():
    """has_children() only peeks (WNOWAIT): the exit status stays for reap(), which is how
    gpu-supervise keeps the agent's exit code."""
    from gpu_supervise import child

    pid = os.fork()
    if pid == 0:
        os._exit(42)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert child.has_children()
    assert child.has_children()  # still: nothing was reaped
    reaped = child.reap()
    assert [(r.pid, child.exit_code(r.status)) for r in reaped] == [(pid, 42)]
    assert not child.has_children()


def test_stubborn_child_and_setsid_grandchild_are_killed(start: Start, tmp_path: Path):
    pidfile = tmp_path / "pids"
    agent = tree_agent(pidfile, "--no-nvml", "--ignore-term")
    proc = start([*PLAIN, *STOP_1S, "--", *agent], clean_env())
    proc.wait_for("ready")
    pids = [int(p) for p in pidfile.read_text().split()]
    assert os.getsid(pids[1]) != os.getsid(pids[0])  # the grandchild left the session
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 137
    assert "2 process(es) still running 1 s after SIGTERM: sent SIGKILL" in proc.output
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids)


def test_topology_change_kills_a_stubborn_tree(start: Start, fake_node: FakeNode, tmp_path: Path):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    pidfile = tmp_path / "pids"
    watch = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]
    proc = start([*watch, *STOP_1S, "--", *tree_agent(pidfile, "--ignore-term")], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    proc.wait_for("ready")
    pids = [int(p) for p in pidfile.read_text().split()]
    node.gpu(0).set_layout(["7g.40gb"])
    fake_node.write(node)
    assert proc.wait() == 1
    assert "sent SIGKILL" in proc.output
    assert not any(pid_alive(p) for p in pids)


def test_leftover_daemons_are_stopped_when_the_child_exits(start: Start, tmp_path: Path):
    pidfile = tmp_path / "pids"
    agent = tree_agent(pidfile, "--no-nvml", "--run", "0.5", "--exit", "5")
    proc = start([*PLAIN, *STOP_1S, "--", *agent], clean_env())
    assert proc.wait() == 5
    assert not any(pid_alive(int(p)) for p in pidfile.read_text().split())


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


def test_orphans_are_reaped_as_subreaper(start: Start, tmp_path: Path):
    """Grandchildren whose parent died come to us (PR_SET_CHILD_SUBREAPER); none stays a zombie."""
    script = "for i in $(seq 20); do (sleep 0.2 &) ; done; sleep 1; echo done"
    proc = start([*PLAIN, "--", "sh", "-c", script], clean_env())
    proc.wait_for("done")
    assert proc.wait() == 0
    assert "reaped orphan" not in proc.output  # INFO level: reaping is quiet
    proc = start(["--log-level", "DEBUG", *PLAIN, "--", "sh", "-c", script], clean_env())
    assert proc.wait() == 0
    assert proc.output.count("reaped orphan") == 20


class Terminal:
    """gpu-supervise on a pseudo-terminal as its controlling terminal: the test plays the
    terminal emulator (`docker run -it`, an operator's shell)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.master, slave = pty.openpty()
        self.mark = uuid.uuid4().hex

        def controlling_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [*gpu_supervise_cmd(), *args],
            stdin=slave, stdout=slave, stderr=slave,
            env={**(env or clean_env()), Proc.MARK: self.mark},
            start_new_session=True, preexec_fn=controlling_terminal,
        )  # fmt: skip
        os.close(slave)
        self.seen = b""

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *_: object) -> None:
        kill_marked(Proc.MARK, self.mark)  # the agents too, whatever their group or session
        self.proc.kill()
        self.proc.wait()
        os.close(self.master)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, marker: bytes, timeout: float = 30.0, count: int = 1) -> None:
        """Read what the terminal shows until `marker` has appeared `count` times."""
        deadline = time.monotonic() + timeout
        while self.seen.count(marker) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # every writer is gone and all was read
                    break
        assert self.seen.count(marker) >= count, self.seen.decode(errors="replace")


def test_child_owns_the_terminal_like_docker_run_it():
    """With a terminal on stdin, the child's group becomes the foreground one: it can read the
    terminal (a background group would be stopped by SIGTTIN) and gets ^C from it directly."""
    # The trap is set before the read, so ^C, sent once the line is echoed back, is caught.
    script = "trap 'echo trapped-sigint; exit 9' INT; read line; echo got:$line; sleep 30 & wait"
    with Terminal([*PLAIN, "--", "sh", "-c", script]) as term:
        term.type(b"hello\n")
        term.expect(b"got:hello")
        term.type(b"\x03")  # ^C: the terminal signals its foreground group, the child's
        term.expect(b"trapped-sigint")
        assert term.proc.wait(60) == 9


def test_the_terminal_is_the_childs_before_its_first_instruction():
    """A child that reads at once must never meet a terminal still held by us: handed over
    after the exec, it loses that race on a busy machine and stays stopped by SIGTTIN. The
    machine is made busy here on purpose; a handover after the exec failed half of these."""
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(4)]
    try:
        for attempt in range(10):
            with Terminal([*PLAIN, "--", "sh", "-c", "read line; echo got:$line"]) as term:
                term.type(f"line{attempt}\n".encode())
                term.expect(f"got:line{attempt}".encode(), timeout=15)
                assert term.proc.wait(60) == 0
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_exec_failures_on_a_terminal_are_127_and_126(tmp_path: Path):
    """The terminal path starts the child its own way; a failed exec still says why."""
    for command, code, reason in [
        ("no-such-agent-xyz", 127, b"no-such-agent-xyz: command not found"),
        (str(not_executable(tmp_path)), 126, b"permission denied"),
    ]:
        with Terminal([*PLAIN, "--", command]) as term:
            assert term.proc.wait(60) == code
            term.expect(reason)


# -- a stop always ends --------------------------------------------------------------------------


class Freezer:
    """A cgroup whose processes can be frozen: they then ignore every signal, SIGKILL included,
    as a process stuck in a GPU driver call (uninterruptible sleep) does."""

    def __init__(self, path: Path, state_file: str, frozen: str, thawed: str) -> None:
        self.path, self.state_file, self.frozen, self.thawed = path, state_file, frozen, thawed

    def freeze(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))
        self._freeze()

    def _freeze(self) -> None:
        """Freeze, and wait until every process is frozen: the v1 freezer reads FREEZING, and
        v2's cgroup.events says `frozen 0`, while some are still running (and forking)."""
        (self.path / self.state_file).write_text(self.frozen)
        wait_until(self._frozen, "the cgroup never froze")

    def _frozen(self) -> bool:
        if self.state_file == "freezer.state":
            return (self.path / self.state_file).read_text().strip() == self.frozen
        return "frozen 1" in (self.path / "cgroup.events").read_text().splitlines()

    def thaw(self) -> None:
        (self.path / self.state_file).write_text(self.thawed)

    def release(self) -> None:
        """Kill whatever is in the cgroup, frozen first so that nothing can fork away, then
        remove the cgroup."""
        deadline = time.monotonic() + 60
        while (self.path / "cgroup.procs").read_text().split():
            assert time.monotonic() < deadline, "processes outlived SIGKILL in a thawed cgroup"
            self._freeze()  # everything, a child forked a moment ago included
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.thaw()
            time.sleep(0.05)
        self.path.rmdir()


@pytest.fixture
def freezer() -> Iterator[Freezer]:
    name = f"gpu-supervise-test-{os.getpid()}-{time.monotonic_ns()}"  # never one left behind
    v1, v2 = Path("/sys/fs/cgroup/freezer"), Path("/sys/fs/cgroup/unified")
    if (v1 / "freezer.state").exists() or (v1 / "cgroup.procs").exists():
        made = Freezer(v1 / name, "freezer.state", "FROZEN", "THAWED")
    elif (Path("/sys/fs/cgroup") / "cgroup.subtree_control").exists():
        made = Freezer(Path("/sys/fs/cgroup") / name, "cgroup.freeze", "1", "0")
    elif (v2 / "cgroup.subtree_control").exists():
        made = Freezer(v2 / name, "cgroup.freeze", "1", "0")
    else:
        missing_capability("no cgroup freezer (neither the v1 freezer nor v2's cgroup.freeze)")
    try:
        made.path.mkdir()
    except OSError as exc:
        missing_capability(f"cannot create a freezer cgroup here: {exc}")
    try:
        yield made
    finally:
        made.release()


def _stamp(lines: list[str], marker: str) -> float:
    """The log's own timestamp of the first line of gpu-supervise's holding `marker`, in s."""
    return log_stamp(lines, marker).timestamp()


def test_a_child_that_survives_sigkill_is_logged_and_the_stop_still_ends(
    start: Start, fake_node: FakeNode, tmp_path: Path, freezer: Freezer
):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    pidfile = tmp_path / "pids"
    watch = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]
    agent = [*AGENT, "--no-nvml", "--pidfile", str(pidfile)]
    proc = start([*watch, *STOP_1S, "--", *agent], fake_node.env)
    proc.wait_for("ready")
    proc.wait_for("[GPU-Watcher] baseline")
    frozen = int(pidfile.read_text())
    freezer.freeze(frozen)
    node.gpu(0).set_layout(None)
    fake_node.write(node)
    assert proc.wait(60) == 1
    lines = proc.log_lines()
    survived = [line for line in lines if "ERROR   pid" in line]
    assert len(survived) == 1 and f"pid {frozen} survived SIGKILL (state " in survived[0]
    assert "agent.py --no-nvml --pidfile" in survived[0]
    took = _stamp(lines, "exiting 1:") - _stamp(lines, "Initiating self-restart")
    assert took <= 2 * 1 + 1  # within 2x stop_timeout + 1 s


# A daemon that ignores SIGTERM and moves on to a new process in a new session as fast as it can
# fork: by the time anyone has listed it and sent SIGKILL, the listed process is gone.
WALKER = r"""
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    signal(SIGTERM, SIG_IGN);
    if (fork()) return 0;
    puts("daemon up");
    fflush(stdout);
    for (;;) {
        setsid();
        if (fork()) _exit(0);
    }
}
"""


def test_a_daemon_that_keeps_forking_cannot_hold_up_the_stop(
    fake_node: FakeNode, tmp_path: Path, freezer: Freezer
):
    """Everything runs in a cgroup of the test's, which it freezes at the end to kill all. (Such
    a walker can outrun every SIGKILL; that it is then named as a survivor is checked below.)"""
    node = dgx_a100()
    fake_node.write(node)
    walker = tmp_path / "walker"
    source = tmp_path / "walker.c"
    source.write_text(WALKER)
    subprocess.run(["gcc", "-O2", "-o", str(walker), str(source)], check=True)
    watch = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]
    script = f"{walker}; exec sleep 300"
    cgroup = freezer.path / "cgroup.procs"
    log, stdout = tmp_path / "log", tmp_path / "stdout"
    with open(log, "wb") as err, open(stdout, "wb") as out:
        proc = subprocess.Popen(
            [*gpu_supervise_cmd(), *watch, *STOP_1S, "--", "sh", "-c", script],
            env=fake_node.env, stdout=out, stderr=err,
            preexec_fn=lambda: cgroup.write_text(str(os.getpid())),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (
            "[GPU-Watcher] baseline" not in log.read_text() or "daemon up" not in stdout.read_text()
        ):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        node.gpus.pop()
        fake_node.write(node)
        assert proc.wait(60) == 1
        lines = log.read_text().splitlines()
        took = _stamp(lines, "exiting 1:") - _stamp(lines, "Initiating self-restart")
        assert took <= 2 * 1 + 1
    finally:
        proc.kill()
        proc.wait()


def test_the_tree_is_found_from_proc_alone_too():
    """The walk of /proc/PID/stat alone (which works under systemd's ProcSubset=pid, where
    psutil cannot read /proc/stat) finds the processes psutil finds."""
    import psutil

    from gpu_supervise import child

    tree = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 30
        while len(child.descendants()) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        found = psutil.Process().children(recursive=True)
        assert sorted(child.descendants()) == sorted(p.pid for p in found)
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(tree.pid)])
        tree.kill()
        tree.wait()


# -- after SIGKILL: late deaths, newcomers, zombies, and no busy waiting --------------------------


def wait_until(condition: Callable[[], bool], failure: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.005)


def sigkill_pending(pid: int) -> bool:
    """Whether SIGKILL waits to be delivered to `pid` (a frozen process keeps it pending); True
    once the process is gone, too."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    pending = 0
    for line in status.splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending & (1 << (signal.SIGKILL - 1))) or not pid_alive(pid)


def frozen_agent(
    start: Start, freezer: Freezer, tmp_path: Path, stop_timeout: str
) -> tuple[Proc, int]:
    """gpu-supervise running the test agent, the agent frozen: it ignores SIGTERM and SIGKILL
    stays pending on it until it is thawed."""
    pidfile = tmp_path / "agent-pid"
    agent = [*AGENT, "--no-nvml", "--pidfile", str(pidfile)]
    proc = start([*PLAIN, "--stop-timeout", stop_timeout, "--", *agent], clean_env())
    proc.wait_for("ready")
    pid = int(pidfile.read_text())
    freezer.freeze(pid)
    return proc, pid


def test_an_agent_that_dies_late_after_sigkill_is_not_a_survivor(
    start: Start, tmp_path: Path, freezer: Freezer
):
    """stop_timeout = 0 is valid: SIGKILL follows SIGTERM at once. A process can take a few
    hundred milliseconds to die after SIGKILL (a CUDA process releasing its memory; here a
    frozen cgroup thawed 0.3 s later): the minimum wait after SIGKILL covers that, and the agent
    is reported killed, not "survived SIGKILL"."""
    proc, agent = frozen_agent(start, freezer, tmp_path, "0")
    proc.signal(signal.SIGTERM)
    wait_until(lambda: sigkill_pending(agent), "SIGKILL never reached the frozen agent")
    time.sleep(0.3)
    if not pid_alive(agent):
        missing_capability("this cgroup freezer lets SIGKILL through: nothing can die late")
    freezer.thaw()
    assert proc.wait() == 137
    assert "survived SIGKILL" not in proc.log
    assert proc.log_lines()[-1].endswith(" INFO    exiting 137: stopped by SIGTERM")


def test_waiting_for_survivors_after_sigkill_does_not_spin(
    start: Start, tmp_path: Path, freezer: Freezer
):
    """Between SIGKILL and giving up on what survives it (stop_timeout, 1 s here) the loop
    looks again every 50 ms and sleeps in between: a busy loop would burn a core all along.
    gpu-supervise's CPU time from the SIGKILL to its exit, its exit included, is bounded."""
    proc, agent = frozen_agent(start, freezer, tmp_path, "1")
    proc.signal(signal.SIGTERM)
    wait_until(lambda: sigkill_pending(agent), "SIGKILL never reached the frozen agent")
    before = cpu_seconds(proc.pid)
    # A zombie's /proc/PID/stat still holds its CPU time: read it there, before the reaping.
    wait_until(lambda: stat_fields(proc.pid)[0] == "Z", "gpu-supervise never exited")
    spent = cpu_seconds(proc.pid) - before
    assert proc.wait() == 137
    assert f"pid {agent} survived SIGKILL" in proc.log  # the whole window was waited out
    # About 0.1 s here (20 walks of the tree, the ERROR line, the exit), also on a loaded
    # machine; a busy loop takes what a core gives it, 0.45 to 1 s.
    assert spent < 0.3, f"{spent:.2f} s of CPU in a 1 s wait for survivors"


# A daemon that ignores SIGTERM and, once it gets it, forks helpers as fast as it can, each into a
# process group of its own (so that no group signal reaches it): helpers appear while the first
# SIGKILL is being sent, after the tree was listed. It counts them in the file argv[1].
FORKER = r"""
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
static volatile sig_atomic_t termed;
static void on_term(int sig) { (void)sig; termed = 1; }
int main(int argc, char **argv) {
    (void)argc;
    signal(SIGTERM, SIG_IGN);
    if (fork() == 0) {
        int count = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        setpgid(0, 0);
        signal(SIGTERM, on_term);
        printf("daemon %d up\n", getpid());
        fflush(stdout);
        while (!termed) pause();
        for (int i = 1; i <= 5000; i++) {
            if (fork() == 0) {
                setpgid(0, 0);
                for (;;) pause();
            }
            char text[16];
            pwrite(count, text, (size_t)snprintf(text, sizeof text, "%-8d", i), 0);
        }
        for (;;) pause();
    }
    for (;;) pause();
}
"""


def test_helpers_forked_after_the_first_sigkill_get_it_too(start: Start, tmp_path: Path):
    """Nothing of the tree outlives gpu-supervise's exit: what the daemon forked while the first
    SIGKILL went out is killed by the next ones, well before the stop gives up on survivors."""
    forker = tmp_path / "forker"
    source = tmp_path / "forker.c"
    source.write_text(FORKER)
    subprocess.run(["gcc", "-O2", "-o", str(forker), str(source)], check=True)
    for attempt in range(5):
        forked = tmp_path / f"forked-{attempt}"
        proc = start([*PLAIN, "--stop-timeout", "0", "--", str(forker), str(forked)], clean_env())
        proc.wait_for(" up\n")
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 137, proc.log
        left = marked(Proc.MARK, proc.mark)
        deadline = time.monotonic() + 10  # time to die, for what was killed last
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = marked(Proc.MARK, proc.mark)
        assert not left, f"{len(left)} process(es) of the tree outlived gpu-supervise"
        assert "survived SIGKILL" not in proc.log
        # The first SIGKILL went to what was listed: the agent, the daemon, and the helpers
        # forked before the listing. Helpers beyond those were forked after it; on a machine
        # so busy that the daemon forked none in time, the race is run again.
        listed = int(proc.log.split(" process(es) still running 0 s after SIGTERM")[0].split()[-1])
        if 2 + int(forked.read_text()) > listed:
            return
    pytest.fail("in 5 attempts the daemon never forked a helper after the first SIGKILL")


def test_a_zombie_is_not_a_survivor(start: Start, tmp_path: Path, freezer: Freezer):
    """A dead child of a frozen agent stays a zombie (its parent cannot reap it): dead, so not
    "survived SIGKILL (state Z)"; only the frozen agent is reported."""
    pidfile = tmp_path / "pids"
    script = (
        "import os, time\n"
        "dead = os.fork()\n"
        "if dead == 0:\n"
        "    os._exit(0)\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{dead}}')\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    time.sleep(1)\n"
    )
    proc = start([*PLAIN, "--stop-timeout", "0", "--", sys.executable, "-c", script], clean_env())
    proc.wait_for("ready")
    agent, zombie = map(int, pidfile.read_text().split())
    wait_until(lambda: stat_fields(zombie)[0] == "Z", "the agent's child never became a zombie")
    freezer.freeze(agent)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 137, proc.log
    survived = [line for line in proc.log_lines() if "ERROR   pid" in line]
    assert len(survived) == 1 and f"pid {agent} survived SIGKILL" in survived[0], survived
    assert "(state Z)" not in proc.log and f"pid {zombie} " not in proc.log


# Under gpu-supervise's own conditions (a subreaper that reaps every 50 ms, the daemon's process
# of the moment its child once the one before has exited), what survivors() reports.
SURVIVORS = r"""
import os, subprocess, sys, time
from gpu_supervise import child

try:  # ahead of whatever else loads the machine: each look lasts only child.CATCH_SECONDS
    os.nice(-10)
except OSError:
    pass

assert child.become_subreaper()
subprocess.run([sys.argv[1]], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL, check=True)
for _ in range(5):  # the daemon walks, as it would through a stop's give-up window
    child.reap()
    time.sleep(0.05)
for _ in range(3):
    found = child.survivors()
    if found:
        print(*(f"{s.pid} {s.state} {s.cmdline}" for s in found), sep="\n")
        break
    child.reap()
"""


def test_a_daemon_that_outruns_every_sigkill_is_reported_as_a_survivor(
    tmp_path: Path, freezer: Freezer
):
    """The walker above moves to a new process every few tens of microseconds: by the time a
    listing of the tree (milliseconds) is read, the processes it names are zombies, and the
    daemon lives on in a newer one. It can outrun every SIGKILL (only a cgroup, or a container's
    end, stops it for sure); then it must at least be reported, not leave a log that says
    nothing survived. Run in a cgroup of the test's, which kills it all at the end."""
    walker = tmp_path / "walker"
    source = tmp_path / "walker.c"
    source.write_text(WALKER)
    subprocess.run(["gcc", "-O2", "-o", str(walker), str(source)], check=True)
    script = tmp_path / "survivors.py"
    script.write_text(SURVIVORS)
    cgroup = freezer.path / "cgroup.procs"
    out = subprocess.run(
        [sys.executable, str(script), str(walker)], capture_output=True, text=True, timeout=60,
        env=clean_env(), preexec_fn=lambda: cgroup.write_text(str(os.getpid())),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip(), "survivors() found nothing alive while the walker walked"
    for line in out.stdout.splitlines():
        assert line.split()[1] in ("R", "S", "D") and line.split()[2] == str(walker), line
