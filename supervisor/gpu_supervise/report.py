"""Telling the world around us what happened: the Kubernetes termination message and the
systemd notify protocol. Both are best effort: they must never stop a restart from happening."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .files import open_regular_file
from .text import printable

TERMINATION_LOG_LIMIT = 4096  # kubelet reads at most this many bytes


def write_termination_message(path: str, text: str) -> bool:
    """Write the restart reason where `kubectl describe pod` shows it, only if it is a regular
    file that exists (the kubelet creates it; we never create files on a host). Never blocks:
    a FIFO with no reader, a device or a terminal there is left alone. Never follows a symlink
    (O_NOFOLLOW): a link there would have us truncate whatever file it names."""
    if not path:
        return False
    data = text.encode("utf-8", errors="replace")
    if len(data) > TERMINATION_LOG_LIMIT:
        marker = b"\n[truncated]"
        data = data[: TERMINATION_LOG_LIMIT - len(marker)]
        data = data.decode("utf-8", errors="ignore").encode() + marker
    try:
        fd = open_regular_file(path, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError:  # absent, not ours to write, a symlink, or not a regular file
        return False
    try:
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def take_notify_socket(environ: dict[str, str]) -> str | None:
    """Remove NOTIFY_SOCKET from the child's environment and return it: the unit's main process
    (us) speaks the protocol; an agent that also sent READY=1 would confuse systemd. So do
    WATCHDOG_USEC and WATCHDOG_PID when the watchdog is ours (watchdog_period): we send its
    WATCHDOG=1; those naming another process are not ours to touch."""
    if watchdog_period(environ) is not None:
        environ.pop("WATCHDOG_USEC", None)
        environ.pop("WATCHDOG_PID", None)
    return environ.pop("NOTIFY_SOCKET", None) or None


def watchdog_period(environ: Mapping[str, str]) -> float | None:
    """systemd's watchdog period in seconds, where it is meant for us: WATCHDOG_USEC set, and
    WATCHDOG_PID unset or our pid (sd_watchdog_enabled's rule). None otherwise."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        pid = int(environ.get("WATCHDOG_PID") or os.getpid())
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 and pid == os.getpid() else None


def sd_notify(address: str | None, **fields: str) -> bool:
    """Send one datagram per the sd_notify protocol (`@` = abstract socket); no libsystemd.
    Each field is `NAME=value` on a line of its own, every control character of the value
    escaped (printable): a newline in it (an argv[0] holding "\\nSTOPPING=1") would be read by
    systemd as a field of its own, and an ESC or a CR would reach `systemctl status` raw."""
    if not address:
        return False

    import socket  # only when systemd asked for it (and then loaded at start: Supervisor)

    target = "\0" + address[1:] if address.startswith("@") else address
    message = "\n".join(f"{name}={printable(value)}" for name, value in fields.items())
    data = message.encode("utf-8", "backslashreplace")  # an argv that is not UTF-8, say
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            # Never wait: a socket whose queue is full (systemd stalled) drops this message
            # rather than the main loop, which must go on handling signals and stops.
            sock.send(data, socket.MSG_DONTWAIT)
    except (OSError, ValueError):
        return False
    return True
