"""systemd's notify socket, whatever it holds: an argv[0] that is not UTF-8 or holds a newline
reaches systemd escaped, and a socket whose queue is full never blocks the loop."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from conftest import AGENT, clean_env, gpu_supervise_cmd

PLAIN = ["--no-watch"]


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
