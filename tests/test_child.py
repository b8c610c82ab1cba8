"""The child: exec, exit statuses, signal forwarding, stopping the whole tree, reaping.
Real processes and real signals, in the shape of dumb-init's own tests."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from conftest import (
    AGENT,
    SESSION_MARK,
    FakeNode,
    Proc,
    clean_env,
    gpu_supervise_cmd,
    pid_alive,
    run,
    wait_until,
)
from fakenvml import dgx_a100
from procfs import stat_fields
from terminal import Terminal

Start = Callable[..., Proc]
PLAIN = ["--no-watch"]
STOP_1S = ["--stop-timeout", "1"]


def tree_agent(pidfile: Path, *args: str) -> list[str]:
    """The test agent leaving a grandchild in a session of its own; both pids in `pidfile`."""
    return [*AGENT, "--grandchild", "--pidfile", str(pidfile), *args]


# -- exit statuses, the shape of dumb-init's tests -------------------------------------------------


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


def test_every_exit_code_comes_back():
    def code_of(n: int) -> int:
        return run([*PLAIN, "--", "sh", "-c", f"exit {n}"], clean_env()).returncode

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(code_of, range(256)))
    assert codes == list(range(256))


@pytest.mark.parametrize(
    "sig", ["SIGHUP", "SIGINT", "SIGQUIT", "SIGABRT", "SIGKILL", "SIGSEGV", "SIGPIPE", "SIGALRM",
            "SIGTERM", "SIGUSR1", "SIGUSR2"],
)  # fmt: skip
def test_death_by_signal_is_128_plus_n(sig: str):
    number = getattr(signal, sig)
    out = run([*PLAIN, "--", "sh", "-c", f"kill -{sig[3:]} $$"], clean_env())
    assert out.returncode == 128 + number


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


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("/nonexistent\nFAKE LOG LINE", "/nonexistent\\nFAKE LOG LINE: command not found"),
        ("/x\x1b[31mRED", "/x\\x1b[31mRED: command not found"),
        ("/" + "a" * 120_000, " characters)"),
    ],
)
def test_a_start_failure_is_one_clean_line(command: str, shown: str):
    out = run([*PLAIN, "--", command], clean_env())
    assert out.returncode in (126, 127)
    assert out.stderr.count("\n") == 1 and "\x1b" not in out.stderr
    assert shown in out.stderr and len(out.stderr) < 1100


# -- what the agent gets: its arguments, output and environment ------------------------------------


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


RAW_ENV = r"""
#include <unistd.h>
int main(int argc, char **argv) {
    char *env[] = {"=weird=x", "PATH=/usr/bin:/bin", argv[1], 0};
    execve(argv[2], argv + 2, env);
    return 127;
}
"""


def test_an_environment_entry_exec_cannot_take_is_dropped(tmp_path: Path):
    """A C program can pass an envp entry named "=weird": the agent still starts."""
    source = tmp_path / "rawenv.c"
    source.write_text(RAW_ENV)
    subprocess.run(["gcc", "-o", str(tmp_path / "rawenv"), str(source)], check=True)
    mark = f"{SESSION_MARK}={os.environ[SESSION_MARK]}"
    out = subprocess.run(
        [str(tmp_path / "rawenv"), mark, *gpu_supervise_cmd(), *PLAIN, "--termination-log", "",
         "--", "sh", "-c", 'echo "seen=${PATH}"; exit 4'],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 4, out.stderr
    assert "seen=/usr/bin:/bin" in out.stdout and "Traceback" not in out.stderr


# -- signals to the agent --------------------------------------------------------------------------


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


# -- the agent's whole tree ------------------------------------------------------------------------


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


def test_double_forked_setsid_daemons_are_stopped(start: Start, tmp_path: Path):
    token = f"gs-daemon-{random.getrandbits(32):x}"
    script = (
        f"(setsid sh -c \"trap '' TERM; exec -a {token} sleep 300\" &); "
        f"(setsid sh -c \"trap '' TERM; while :; do sleep 1; done; : {token}\" &); "
        "echo up; exec sleep 300"
    )
    proc = start([*PLAIN, "--stop-timeout", "1", "--", "sh", "-c", script], clean_env())
    proc.wait_for("up")
    time.sleep(0.3)
    assert _with_token(token)
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    assert not _with_token(token)


def _with_token(token: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(token in part for part in p.info["cmdline"] or []) and pid_alive(p.pid):
            found.append(p.pid)
    return found


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
