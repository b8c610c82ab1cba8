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
    missing_capability,
    pid_alive,
    run,
)
from fakenvml import dgx_a100

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
        (self.path / self.state_file).write_text(self.frozen)
        deadline = time.monotonic() + 30
        while self.frozen not in (self.path / self.state_file).read_text():
            assert time.monotonic() < deadline, "the cgroup never froze"
            time.sleep(0.05)

    def release(self) -> None:
        """Kill whatever is in the cgroup, frozen first so that nothing can fork away, then
        remove the cgroup."""
        (self.path / self.state_file).write_text(self.frozen)
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        (self.path / self.state_file).write_text(self.thawed)
        deadline = time.monotonic() + 30
        while (self.path / "cgroup.procs").read_text().split():
            assert time.monotonic() < deadline, "processes outlived SIGKILL in a thawed cgroup"
            time.sleep(0.05)
        self.path.rmdir()


@pytest.fixture
def freezer() -> Iterator[Freezer]:
    name = f"gpu-supervise-test-{os.getpid()}"
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
    """Everything runs in a cgroup of the test's, which it freezes at the end to kill all."""
    node = dgx_a100()
    fake_node.write(node)
    walker = tmp_path / "walker"
    source = tmp_path / "walker.c"
    source.write_text(WALKER)
    subprocess.run(["gcc", "-O2", "-o", str(walker), str(source)], check=True)
    watch = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]
    script = f"{walker}; exec sleep 300"
    cgroup = freezer.path / "cgroup.procs"
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*gpu_supervise_cmd(), *watch, *STOP_1S, "--", "sh", "-c", script],
            env=fake_node.env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: cgroup.write_text(str(os.getpid())),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "[GPU-Watcher] baseline" not in log.read_text() or "daemon up" not in log.read_text():
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
    """Under systemd's ProcSubset=pid psutil cannot read /proc/stat; the walk that replaces it
    finds the same processes."""
    from gpu_supervise import child

    tree = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 30
        while len(child.descendants()) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert sorted(child._children_from_proc()) == sorted(child.descendants())
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(tree.pid)])
        tree.kill()
        tree.wait()
