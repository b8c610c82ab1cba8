"""Hostile environments: every signal, signals the kernel refuses, closed stdio, Kubernetes
service links, odd NVML strings, huge log lines, a termination log that would block, and the
death of gpu-supervise itself. Each of these once ended in a traceback, a wrong exit code, an
orphaned agent or a blocked loop."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_config import NOT_SERVICE_LINKS, SERVICE_LINKS

from conftest import (
    AGENT,
    SESSION_MARK,
    FakeNode,
    Proc,
    clean_env,
    gpu_supervise_cmd,
    marked,
    missing_capability,
    pid_alive,
    run,
)
from fakenvml import dgx_a100
from gpu_supervise.logs import LINE_LIMIT, _fit_json

Start = Callable[..., Proc]
PLAIN = ["--no-watch"]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]
ROOT = Path(__file__).parent.parent


# -- every signal a process can catch reaches the agent ------------------------------------------

OUTSIDE_THE_OLD_SET = [
    "SIGALRM", "SIGPWR", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGURG", "SIGXCPU", "SIGSTKFLT",
    "SIGCONT", "SIGTSTP",
]  # fmt: skip


def test_every_catchable_signal_is_forwarded(start: Start):
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    rt = [signal.SIGRTMIN, signal.SIGRTMIN + 5, signal.SIGRTMAX]
    for sig in [getattr(signal, name) for name in OUTSIDE_THE_OLD_SET] + rt:
        proc.signal(sig)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"SIGRTMIN+{sig - signal.SIGRTMIN}"
        proc.wait_for(f"got {name}")
    assert proc.popen.poll() is None  # none of them killed gpu-supervise
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143


def test_terminal_job_control_signals_never_stop_gpu_supervise(start: Start):
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    for sig in (signal.SIGTTIN, signal.SIGTTOU):
        proc.signal(sig)
    time.sleep(0.3)
    state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state != "T"  # ignored, as tini ignores them: not stopped
    assert "got SIGTTIN" not in proc.output  # and not forwarded: they concern our terminal
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143


# -- a signal the kernel refuses ---------------------------------------------------------------

SETUID_AGENT = r"""
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {
    if (setresuid(0, 0, 0) != 0) { perror("setresuid"); return 3; }  /* all ids root */
    signal(SIGTERM, SIG_IGN);
    printf("setuid agent %d ready\n", getpid());
    fflush(stdout);
    for (;;) pause();
}
"""


@pytest.fixture
def unprivileged() -> Iterator[tuple[list[str], Path]]:
    """gpu-supervise as user nobody (Debian's python3 with this package on its path: the
    interpreter tests run under may live where nobody cannot read), and a setuid-root agent."""
    python = Path("/usr/bin/python3")
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not python.exists():
        missing_capability("needs root, setpriv (util-linux) and /usr/bin/python3")
    version = "import sys; print('%d.%d' % sys.version_info[:2])"
    theirs = subprocess.run([str(python), "-c", version], capture_output=True, text=True).stdout
    if theirs.strip() != "%d.%d" % sys.version_info[:2]:  # noqa: UP031
        missing_capability("/usr/bin/python3 is another Python than the tests' (psutil)")
    folder = Path(tempfile.mkdtemp(prefix="gs-setuid-", dir="/tmp"))
    folder.chmod(0o755)
    source = folder / "agent.c"
    source.write_text(SETUID_AGENT)
    agent = folder / "agent"
    subprocess.run(["gcc", "-o", str(agent), str(source)], check=True)
    agent.chmod(0o4755)  # setuid root
    site = sysconfig.get_paths()["purelib"]
    boot = (
        f"import sys; sys.path[:0] = [{str(ROOT / 'supervisor')!r}, {site!r}]; "
        "sys.argv[0] = 'gpu-supervise'; from gpu_supervise.cli import run; run()"
    )
    cmd = [
        setpriv,
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        str(python),
        "-c",
        boot,
    ]
    try:
        yield cmd, agent
    finally:
        shutil.rmtree(folder)


def test_a_refused_signal_never_ends_supervision(start_cmd, unprivileged):
    cmd, agent = unprivileged
    proc = start_cmd([*cmd, *PLAIN, "--stop-timeout", "0.5", "--", str(agent)], clean_env())
    out = proc.wait_for("setuid agent")
    agent_pid = int(out.split("setuid agent ")[1].split()[0])
    proc.signal(signal.SIGHUP)
    proc.wait_for(f"could not forward SIGHUP to pid {agent_pid}: Operation not permitted")
    assert proc.popen.poll() is None and "Traceback" not in proc.output
    # nor can it stop the agent: the stop still ends, and says who is left
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 137
    assert f"pid {agent_pid} survived SIGKILL" in proc.output
    assert "exiting 137: stopped by SIGTERM; the agent survived SIGKILL" in proc.output
    os.kill(agent_pid, signal.SIGKILL)  # as root, the test can


# -- closed stdio ---------------------------------------------------------------------------------


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


# -- Kubernetes service links ---------------------------------------------------------------------


def test_kubernetes_service_links_are_not_settings():
    out = run([*PLAIN, "--", "sh", "-c", "exit 4"], clean_env(**SERVICE_LINKS))
    assert out.returncode == 4, out.stderr


@pytest.mark.parametrize(("name", "value"), NOT_SERVICE_LINKS)
def test_a_variable_that_only_looks_like_a_service_link_is_an_error(name: str, value: str):
    out = run([*PLAIN, "--", "true"], clean_env(**{name: value}))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"gpu-supervise: environment {name}: unknown setting")


# -- strings from NVML ----------------------------------------------------------------------------


def test_a_gpu_name_that_is_not_utf8_is_description_only(fake_node: FakeNode):
    node = dgx_a100(count=1)
    node.gpu(0).name = "NVIDIA A100\udcff"  # the byte 0xff
    fake_node.write(node)
    out = run(["snapshot", "--json"], fake_node.env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["gpus"][0]["name"] == "NVIDIA A100\\xff"


def test_a_uuid_that_is_not_text_fails_the_probe(fake_node: FakeNode):
    node = dgx_a100(count=1)
    node.gpu(0).uuid = "GPU-\udcff"
    fake_node.write(node)
    out = run(["snapshot"], fake_node.env)
    assert out.returncode == 1
    assert "GPU 0: NVML gave a UUID that is not text: b'GPU-\\xff'" in out.stderr


def test_control_characters_never_reach_the_terminal(start: Start, fake_node: FakeNode):
    node = dgx_a100(["1g.5gb"] * 7, count=1)
    node.gpu(0).name = "NVIDIA A100\x1b]0;pwned\x07\x1b[2J"
    fake_node.write(node)
    for fmt in ("text", "json"):
        proc = start([*FAST, "--log-format", fmt, "--", *AGENT, "--no-nvml"], fake_node.env)
        proc.wait_for("baseline")
        changed = node.copy()
        changed.gpu(0).set_layout(None)
        fake_node.write(changed)
        assert proc.wait(60) == 1
        raw = proc.log_path.read_bytes()
        assert b"\x1b" not in raw and b"\x07" not in raw
        assert ("\\x1b]0;pwned\\x07" if fmt == "text" else "\\u001b]0;pwned") in proc.output
        fake_node.write(node)
    out = run(["snapshot"], fake_node.env)
    assert "\x1b" not in out.stdout and "\\x1b[2J" in out.stdout


# -- no line over 16 KiB -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_line_fits_the_runtimes_16_kib_on_a_16x7_node(
    start: Start, fake_node: FakeNode, fmt: str
):
    node = dgx_a100(*[["1g.5gb"] * 7] * 16, count=16)
    fake_node.write(node)
    proc = start([*FAST, "--log-format", fmt, "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("baseline")
    new = node.copy()
    for gpu in new.gpus:
        gpu.set_layout(["1g.5gb"] * 7, salt="again")  # every MIG UUID new
    fake_node.write(new)
    assert proc.wait(60) == 1
    lines = proc.log_path.read_bytes().splitlines()
    assert max(len(line) + 1 for line in lines) <= LINE_LIMIT
    old_list, new_list = ", ".join(node.uuids()), ", ".join(new.uuids())
    prd = (
        f"[GPU-Watcher] MIG configuration change detected (Old UUIDs: [{old_list}], "
        f"New UUIDs: [{new_list}]). Initiating self-restart."
    )
    assert prd in proc.output
    if fmt == "json":
        docs = [json.loads(line) for line in lines if line.startswith(b"{")]
        assert not any("truncated" in doc for doc in docs)  # it fits by design, not by cutting
        per_gpu = [doc for doc in docs if doc.get("event") == "gpu_changed"]
        assert [doc["new_uuids"] for doc in per_gpu] == [
            [gpu.uuid, *gpu.mig_uuids] for gpu in new.gpus
        ]


# -- gpu-supervise itself killed ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "survives"), [([], True), (["--parent-death-signal", "TERM"], False)]
)
def test_the_parent_death_signal(start: Start, tmp_path: Path, option: list[str], survives: bool):
    pidfile = tmp_path / "pid"
    proc = start(
        [*PLAIN, *option, "--", *AGENT, "--no-nvml", "--pidfile", str(pidfile)], clean_env()
    )
    proc.wait_for("ready")
    agent_pid = int(pidfile.read_text())
    os.kill(proc.pid, signal.SIGKILL)  # gpu-supervise dies; nobody stops the agent for it
    proc.popen.wait()
    deadline = time.monotonic() + (2 if survives else 30)
    while pid_alive(agent_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_alive(agent_pid) is survives
    if not survives:
        assert "got SIGTERM" in proc.output


# -- systemd's notify socket, whatever it is ------------------------------------------------------


def test_a_command_name_that_is_not_utf8_reaches_systemd_escaped(start_cmd, tmp_path: Path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    agent = tmp_path / "agent\udcff"  # a file name with the byte 0xff
    agent.write_text("#!/bin/sh\necho agent-up\nexec sleep 60\n")
    agent.chmod(0o755)
    try:
        proc = start_cmd([*gpu_supervise_cmd(), *PLAIN, "--", str(agent)],
                         clean_env(NOTIFY_SOCKET=str(tmp_path / "notify")))  # fmt: skip
        ready = sock.recv(4096)
        assert ready.startswith(b"READY=1\nSTATUS=running ") and b"agent\\udcff" in ready
        proc.wait_for("agent-up")
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 143 and "Traceback" not in proc.output
    finally:
        sock.close()


def test_no_notify_field_can_be_injected_through_the_command(start_cmd, tmp_path: Path):
    """systemd reads one field a line: an argv[0] holding a newline must not add STOPPING=1
    (or anything else) to READY=1. Every field's value is escaped, as the log lines are."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(30)
    agent = tmp_path / "agent\nSTOPPING=1\nSTATUS=pwned"
    agent.write_text("#!/bin/sh\necho agent-up\nexec sleep 60\n")
    agent.chmod(0o755)
    try:
        proc = start_cmd([*gpu_supervise_cmd(), *PLAIN, "--", str(agent)],
                         clean_env(NOTIFY_SOCKET=str(tmp_path / "notify")))  # fmt: skip
        messages = [sock.recv(4096).decode()]
        proc.wait_for("agent-up")
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 143
        sock.setblocking(False)
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    finally:
        sock.close()
    fields = [[line.split("=", 1)[0] for line in m.split("\n")] for m in messages]
    assert fields[0] == ["READY", "STATUS", "MAINPID"]
    assert "\\nSTOPPING=1\\nSTATUS=pwned" in messages[0]
    assert fields[1:] == [["STATUS", "STOPPING"]]  # the stop's own message, once


def test_a_notify_socket_that_is_full_never_blocks_the_loop(start_cmd, tmp_path: Path):
    """systemd stalled: its socket's queue is full. The message is dropped, not waited for."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.connect(path)
    try:
        while True:
            filler.send(b"x" * 1024, socket.MSG_DONTWAIT)
    except BlockingIOError:
        pass
    try:
        proc = start_cmd([*gpu_supervise_cmd(), *PLAIN, "--", *AGENT, "--no-nvml"],
                         clean_env(NOTIFY_SOCKET=path))  # fmt: skip
        proc.wait_for("ready")
        proc.wait_for("started ")
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 143
    finally:
        filler.close()
        sock.close()


# -- odd inputs at start ---------------------------------------------------------------------------

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


@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero"])
def test_a_config_file_that_is_not_a_file_is_one_line(tmp_path: Path, kind: str):
    path = tmp_path / "config.toml"
    if kind == "fifo":
        os.mkfifo(path)  # opened for reading, it would block until a writer came
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path(kind)
    out = run(["--config", str(path), "--", "true"], clean_env(), timeout=30)
    assert out.returncode == 2
    assert out.stderr == f"gpu-supervise: config file {path}: cannot read (not a regular file)\n"


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


def test_a_file_source_replaced_by_a_device_is_a_failed_probe(start: Start, tmp_path: Path):
    """Never read without a limit: /dev/zero would fill memory."""
    saved = tmp_path / "node.json"
    saved.write_text(json.dumps({"schema": 1, "gpus": [{"index": 0, "uuid": "GPU-a"}]}))
    proc = start([*FAST, "--source", f"file:{saved}", "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("[GPU-Watcher] baseline")
    tmp = tmp_path / "swap"
    tmp.symlink_to("/dev/zero")
    os.replace(tmp, saved)
    assert proc.wait(60) == 1
    assert f"cannot read {saved}: not a regular file" in proc.output
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (4 * 1024 * 1024 + 1))
    out = run(["snapshot", "--source", f"file:{big}"], clean_env())
    assert out.returncode == 1 and "larger than 4194304 bytes" in out.stderr


# -- a stderr nobody reads ------------------------------------------------------------------


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


def _stalled_collector(fake_node: FakeNode, tmp_path: Path, stop_timeout: str):
    """gpu-supervise whose stderr pipe the agent fills (a chatty agent, a stalled collector):
    returns the process, once the pipe is full and nothing of gpu-supervise's can get out."""
    out = tmp_path / "out"
    agent = "echo up; head -c 300000 /dev/zero >&2; exec sleep 300"  # blocks on the full pipe
    cmd = [*gpu_supervise_cmd(), *FAST, "--stop-timeout", stop_timeout, "--termination-log",
           str(tmp_path / "termination-log"), "--", "sh", "-c", agent]  # fmt: skip
    (tmp_path / "termination-log").write_text("")
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(cmd, env=fake_node.env, stdout=stdout, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while b"up" not in out.read_bytes():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(1)  # the baseline and a few probes queued behind the agent's 300 kB
    return proc


def test_the_decision_lines_survive_a_collector_stalled_across_the_exit(
    fake_node: FakeNode, tmp_path: Path
):
    """The collector stalls for a few seconds just as the topology changes: exit 1 comes on
    time, and once the collector reads again, the change line, its per-GPU line and the exit
    line are all there (they wait up to stop_timeout, not 2 s)."""
    node = dgx_a100(["1g.5gb"] * 7, count=2)
    fake_node.write(node)
    proc = _stalled_collector(fake_node, tmp_path, stop_timeout="10")
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


def test_decision_lines_that_never_get_out_are_counted_in_the_termination_message(
    fake_node: FakeNode, tmp_path: Path
):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    proc = _stalled_collector(fake_node, tmp_path, stop_timeout="1")
    try:
        node.gpu(0).set_layout(["3g.20gb"] * 2)
        fake_node.write(node)
        assert proc.wait(60) == 1  # the collector never reads: given up after the wait
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    text = (tmp_path / "termination-log").read_text()
    first, *rest = text.splitlines()
    assert re.fullmatch(
        r"gpu-supervise: \d+ log line\(s\), [1-9]\d* of them decision lines \(the change, "
        r"failure or exit line\), could not be written: stderr was not being read",
        first,
    )
    assert rest[0] == "gpu-supervise: GPU topology changed; restarting the agent."


def test_a_json_line_of_wide_characters_still_fits():
    doc = {"time": "t", "level": "INFO", "message": "\u2603" * 20000, "program": "p", "pid": 1,
           "gpu": "GPU-a", "note": "\u2603" * 20000}  # fmt: skip
    line = _fit_json(doc)
    assert len(line.encode()) < LINE_LIMIT
    parsed = json.loads(line)
    assert parsed["truncated"] == ["note"] and parsed["message"].endswith(" [truncated]")


# -- signals before gpu-supervise is loaded -----------------------------------------------


def test_signals_are_held_from_the_entry_point_on(tmp_path: Path):
    """The entry point holds the signals gpu-supervise handles before it loads anything else: a
    SIGINT or SIGTSTP in the tens of milliseconds of loading neither kills it with a traceback
    nor stops it. Shown with the rest of the program replaced by a slow stand-in."""
    fake = tmp_path / "fake"
    (fake / "gpu_supervise").mkdir(parents=True)
    package = ROOT / "supervisor" / "gpu_supervise"
    for name in ("__init__.py", "entry.py", "signals.py"):
        shutil.copy2(package / name, fake / "gpu_supervise" / name)
    (fake / "gpu_supervise" / "cli.py").write_text(
        "import os, signal, sys, time\n"
        "def run():\n"
        "    print('loading', flush=True)\n"
        "    time.sleep(2)  # the imports, slowed down\n"
        "    pending = signal.sigpending()\n"
        "    print('pending', sorted(int(s) for s in pending), flush=True)\n"
        "    os._exit(0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", "from gpu_supervise.entry import run; run()"],
        env=clean_env(PYTHONPATH=str(fake)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "loading\n"
    for sig in (signal.SIGINT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTERM):
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err  # neither killed nor stopped
    held = [int(x) for x in out.split("[")[1].split("]")[0].split(",")]
    assert sorted(held) == sorted([signal.SIGINT, signal.SIGTERM, signal.SIGTSTP])


# -- an in-place upgrade under a running supervisor ---------------------------------------------

# Records every module import (the audit event fires only for a module not loaded yet) with the
# time it happened, on the system-wide monotonic clock the test reads too.
AUDIT_IMPORTS = """
import os, sys, time
_fd = os.open(os.environ["GS_TEST_IMPORTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def _hook(event, args, _fd=_fd, _write=os.write, _now=time.monotonic):
    if event == "import":
        _write(_fd, f"{os.getpid()} {_now():.6f} {args[0]}\\n".encode())
sys.addaudithook(_hook)
"""


def imports_after(log: Path, pid: int, since: float) -> list[str]:
    """What process `pid` imported after `since` (the agent, Python too, records its own)."""
    lines = [line.split() for line in log.read_text().splitlines()]
    return [name for who, stamp, name in lines if int(who) == pid and float(stamp) > since]


def test_stopping_holding_and_starting_again_import_nothing(
    start: Start, fake_node: FakeNode, tmp_path: Path
):
    """A module imported at the moment of a stop would be read from disk long after start:
    after an in-place upgrade, the new version's (or, in the binary, a different archive read at
    the old offsets: a zlib error, the stop failing, the agent left running). So a whole run
    - a hold for a pending MIG mode change (the agent's tree stopped), its timeout (the agent
    started again, with a parent-death signal), a topology change (stopped again, exit 1) -
    imports nothing once the first probes are done."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(AUDIT_IMPORTS)
    log = tmp_path / "imports"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    node = dgx_a100(["1g.5gb"] * 7, count=2)
    fake_node.write(node)
    env = {**fake_node.env, "PYTHONPATH": str(tmp_path / "site"), "GS_TEST_IMPORTS": str(log),
           "NOTIFY_SOCKET": str(tmp_path / "notify")}  # fmt: skip
    opts = ["--settle", "0.2", "--pending-timeout", "1", "--parent-death-signal", "TERM"]
    try:
        proc = start([*FAST, *opts, "--", *AGENT, "--no-nvml"], env)
        proc.wait_for("ready")
        proc.wait_for("[GPU-Watcher] baseline")
        time.sleep(1.0)  # a few probes
        since = time.monotonic()
        node.gpu(1).request_mig(True)  # pending a reset that never comes: hold, then resume
        fake_node.write(node)
        proc.wait_for("started ", count=2)  # ...again as pid N
        node.gpu(1).pending = None
        node.gpu(0).set_layout(["3g.20gb"] * 2)
        fake_node.write(node)
        assert proc.wait(60) == 1, proc.output
        assert "Traceback" not in proc.log
        assert proc.output.count("ready") == 2  # the agent ran twice
        assert imports_after(log, proc.pid, since) == []
        assert imports_after(log, proc.pid, 0)  # the audit works: start-up did import
    finally:
        sock.close()


# -- gpu-supervise itself failing: the agent is stopped, one line says why -----------------------


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
