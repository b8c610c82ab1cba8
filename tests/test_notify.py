"""systemd's notify protocol: READY=1, STATUS and STOPPING=1 on a real socket, every field escaped
(an argv[0] that is not UTF-8 or holds a newline or a control character), a socket whose queue is
full never blocking the loop, and the watchdog pinged at half its period while the loop runs."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import AGENT, FakeNode, Proc, clean_env, gpu_supervise_cmd
from fakenvml import dgx_a100
from gpu_supervise.report import sd_notify, take_notify_socket, watchdog_period
from procfs import stat_fields

Start = Callable[..., Proc]
PLAIN = ["--no-watch"]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


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


# -- the protocol on a real socket -----------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_protocol_on_a_real_socket(start: Start, tmp_path: Path, abstract: bool):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@gpu-supervise-test-{id(sock)}" if abstract else str(tmp_path / "notify.sock")
    sock.bind("\0" + address[1:] if abstract else address)
    sock.settimeout(30)
    try:
        env = clean_env(NOTIFY_SOCKET=address)
        script = 'echo "child NOTIFY_SOCKET=[${NOTIFY_SOCKET-unset}]"; exec sleep 60'
        proc = start(["--no-watch", "--", "sh", "-c", script], env)
        ready = _notification(sock)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"].startswith("running sh as pid ")
        proc.wait_for("child NOTIFY_SOCKET=[unset]")  # the agent never sees the socket
        proc.signal(signal.SIGTERM)
        stopping = _notification(sock)
        assert stopping == {"STATUS": "stopping the agent: stopped by SIGTERM", "STOPPING": "1"}
        assert proc.wait() == 143
    finally:
        sock.close()


def _notification(sock: socket.socket) -> dict[str, str]:
    """One sd_notify datagram as systemd reads it: KEY=VALUE lines."""
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


# -- every field escaped ---------------------------------------------------------------------------


# Every kind of control character a command line can carry: ESC (a terminal sequence), BEL, CR,
# TAB, DEL, a newline (that would begin a field of its own) and a Unicode line separator.
CONTROL = "\x1b[2J\x07\r\t\x7f\nSTOPPING=1\u2028"


ESCAPED = "\\x1b[2J\\x07\\r\\t\\x7f\\nSTOPPING=1\\u2028"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A real AF_UNIX datagram socket standing in for systemd's."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    sock.bind(address)
    sock.settimeout(30)
    yield sock, address
    sock.close()


def test_every_control_character_in_a_notify_field_is_escaped(notify_socket):
    sock, address = notify_socket
    assert sd_notify(address, STATUS=f"running {CONTROL}\x00 as pid 7", READY="1")
    data = sock.recv(4096)
    assert data == f"STATUS=running {ESCAPED}\\x00 as pid 7\nREADY=1".encode()
    assert not any(byte < 0x20 and byte != 0x0A or byte == 0x7F for byte in data)


def test_an_agent_named_with_control_characters_reaches_systemd_escaped(
    start: Start, notify_socket, tmp_path: Path
):
    """End to end: the agent's argv[0], raw from the command line, is in READY=1's STATUS;
    systemd reads three fields, none with a control character, and no STOPPING=1."""
    sock, address = notify_socket
    agent = tmp_path / f"agent{CONTROL}"
    agent.symlink_to("/bin/sleep")
    proc = start(["--no-watch", "--", str(agent), "60"], clean_env(NOTIFY_SOCKET=address))
    try:
        ready, status, mainpid = sock.recv(4096).decode().split("\n")
        assert (ready, mainpid) == ("READY=1", f"MAINPID={proc.pid}")
        assert status.startswith(f"STATUS=running {tmp_path}/agent{ESCAPED} as pid ")
        assert status.endswith("; not watching the GPU topology")
    finally:
        proc.signal(signal.SIGTERM)
        proc.wait()


# -- systemd's watchdog ----------------------------------------------------------------------------


PERIOD = 6.0  # WATCHDOG_USEC, in seconds: WATCHDOG=1 is due every 3 s


WATCHDOG_AGENT = 'echo "agent sees [${WATCHDOG_USEC-unset} ${WATCHDOG_PID-unset}]"; exec sleep 300'


def test_the_watchdog_is_ours_when_its_pid_is_unset_or_ours():
    ours = str(os.getpid())
    assert watchdog_period({"WATCHDOG_USEC": "1500000"}) == 1.5
    assert watchdog_period({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": ours}) == 1.5
    assert watchdog_period({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": ""}) == 1.5
    for other in ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": "1"}, {"WATCHDOG_USEC": "0"},
                  {"WATCHDOG_USEC": "soon"}, {"WATCHDOG_PID": ours}, {}):  # fmt: skip
        assert watchdog_period(other) is None, other


def test_the_agent_gets_no_watchdog_meant_for_us():
    """Ours: removed with NOTIFY_SOCKET (the agent cannot ping; systemd would take its
    WATCHDOG_PID check for ours). Another process's: left as it is."""
    env = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1", "WATCHDOG_PID": str(os.getpid())}
    assert take_notify_socket(env) == "/run/n" and env == {}
    env = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}
    assert take_notify_socket(env) == "/run/n"
    assert env == {"WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}


def watchdog_pings(sock: socket.socket, count: int) -> list[float]:
    """When each of the next `count` WATCHDOG=1 datagrams arrived (other datagrams skipped)."""
    times = []
    while len(times) < count:
        if sock.recv(4096).split(b"\n") == [b"WATCHDOG=1"]:
            times.append(time.monotonic())
    return times


def stopped(pid: int) -> None:
    deadline = time.monotonic() + 30
    while stat_fields(pid)[0] != "T":
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("watching", [True, False])
def test_watchdog_pings_at_half_the_period_and_stop_when_the_loop_hangs(
    start_cmd: Callable[..., Proc], fake_node: FakeNode, notify_socket, watching: bool
):
    """WATCHDOG_USEC set and WATCHDOG_PID ours (set by the shell that execs gpu-supervise, as
    systemd does): WATCHDOG=1 every half period, whether probes wake the loop every 0.2 s or
    nothing else does (--no-watch), never a whole period apart; none while the loop cannot run
    (SIGSTOP), and again once it can. The agent sees neither variable."""
    sock, address = notify_socket
    fake_node.write(dgx_a100())
    env = {**fake_node.env, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(int(PERIOD * 1e6))}
    cmd = ["sh", "-c", 'export WATCHDOG_PID=$$; exec "$@"', "sh", *gpu_supervise_cmd(),
           *(FAST if watching else ["--no-watch"]), "--", "sh", "-c", WATCHDOG_AGENT]  # fmt: skip
    proc = start_cmd(cmd, env)
    proc.wait_for("agent sees [unset unset]")
    times = watchdog_pings(sock, 5)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(PERIOD / 4 < gap < PERIOD for gap in gaps), gaps
    proc.signal(signal.SIGSTOP)
    try:
        stopped(proc.pid)
        sock.setblocking(False)
        try:
            while sock.recv(4096):
                pass  # whatever was sent before it stopped
        except BlockingIOError:
            pass
        sock.settimeout(PERIOD)
        with pytest.raises(TimeoutError):
            sock.recv(4096)  # a whole period, and not one WATCHDOG=1
    finally:
        proc.signal(signal.SIGCONT)
    sock.settimeout(30)
    watchdog_pings(sock, 1)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143


def test_a_watchdog_meant_for_another_process_is_not_pinged(start: Start, notify_socket):
    """WATCHDOG_PID names another process: not ours to ping, nor to take from the agent."""
    sock, address = notify_socket
    env = clean_env(NOTIFY_SOCKET=address, WATCHDOG_USEC="500000", WATCHDOG_PID="1")
    proc = start(["--no-watch", "--", "sh", "-c", WATCHDOG_AGENT], env)
    assert b"READY=1" in sock.recv(4096)
    proc.wait_for("agent sees [500000 1]")
    sock.settimeout(2)  # four periods
    with pytest.raises(TimeoutError):
        sock.recv(4096)
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143
