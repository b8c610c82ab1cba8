"""The Kubernetes termination message: what `kubectl describe pod` shows as the restart reason.

The kubelet keeps the file across restarts of the container (it is bind-mounted from the pod's
directory), so the file gpu-supervise writes often already holds the message of the container
before it: what it writes must replace that whole, never leave a tail of it."""

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
from gpu_supervise.report import (
    TERMINATION_LOG_LIMIT,
    sd_notify,
    take_notify_socket,
    watchdog_period,
    write_termination_message,
)
from procfs import stat_fields

FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]
# What a previous container left: longer than any message below, and easy to spot.
OLD = "gpu-supervise: an older message from the container before this one. " * 50

Start = Callable[..., Proc]


def test_a_longer_message_already_there_is_replaced_whole(tmp_path: Path):
    log = tmp_path / "termination-log"
    log.write_text(OLD)
    assert write_termination_message(str(log), "gpu-supervise: GPU topology changed.\nold: x")
    assert log.read_text() == "gpu-supervise: GPU topology changed.\nold: x"


def test_a_message_cut_to_the_limit_replaces_a_longer_file_whole(tmp_path: Path):
    """The cut message (4096 bytes) over a file that was longer still: nothing of it remains."""
    log = tmp_path / "termination-log"
    log.write_bytes(b"x" * (3 * TERMINATION_LOG_LIMIT))
    assert write_termination_message(str(log), "y" * (2 * TERMINATION_LOG_LIMIT))
    data = log.read_bytes()
    assert len(data) == TERMINATION_LOG_LIMIT and b"x" not in data
    assert data.endswith(b"\n[truncated]")


def test_a_symlink_is_never_followed(tmp_path: Path):
    """The termination log is a symlink to a regular file: nothing is written, the file it
    names keeps every byte (a link to a file elsewhere is not the kubelet's file)."""
    target = tmp_path / "elsewhere"
    target.write_text(OLD)
    log = tmp_path / "termination-log"
    log.symlink_to(target)
    assert not write_termination_message(str(log), "gpu-supervise: GPU topology changed.")
    assert target.read_text() == OLD
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "absent")
    assert not write_termination_message(str(dangling), "gpu-supervise: GPU topology changed.")
    assert not (tmp_path / "absent").exists()


def test_a_restart_replaces_the_previous_containers_message(
    start: Start, fake_node: FakeNode, tmp_path: Path
):
    """End to end: gpu-supervise exits 1 on a change with --termination-log naming a file that
    holds the previous container's longer message; the file then holds this restart's reason
    alone."""
    log = tmp_path / "termination-log"
    log.write_text(OLD)
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    proc = start([*FAST, "--termination-log", str(log), "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    node.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(node)
    assert proc.wait() == 1
    text = log.read_text()
    assert "older message" not in text
    assert len(text) < len(OLD)
    lines = text.split("\n")
    assert lines[:3] == [
        "gpu-supervise: GPU topology changed; restarting the agent.",
        "old: GPU 0: MIG 7x1g.5gb; " + "; ".join(f"GPU {i}: MIG off" for i in range(1, 8)),
        "new: GPU 0: MIG 2x3g.20gb; " + "; ".join(f"GPU {i}: MIG off" for i in range(1, 8)),
    ]
    assert lines[3].startswith("GPU 0 ") and "MIG devices 7x1g.5gb -> 2x3g.20gb" in lines[3]
    assert len(lines) == 4  # the message ends with its last line: no tail, no newline after it


# -- systemd's notify socket ---------------------------------------------------------------------

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


# -- systemd's watchdog ---------------------------------------------------------------------------

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
