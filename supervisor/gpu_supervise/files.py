"""Opening files that someone else controls (a configuration, a topology document, the
termination log) so that whatever is there cannot stall us: no FIFO that blocks until a writer
comes, no device, no directory, and never more than we asked for."""

from __future__ import annotations

import errno
import os
import stat


def open_regular_file(path: str, flags: int) -> int:
    """A descriptor on a regular file, opened without blocking and checked before any use: a
    FIFO (which would block until the other side comes), a device or a directory raises OSError
    (EINVAL), whatever the name says."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def read_regular_file(path: str, limit: int) -> bytes:
    """At most `limit` bytes of a regular file (open_regular_file)."""
    fd = open_regular_file(path, os.O_RDONLY)
    try:
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
