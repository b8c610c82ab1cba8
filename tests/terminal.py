"""gpu-supervise on a pseudo-terminal, the test playing the terminal emulator."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import termios
import time
import uuid

from conftest import Proc, clean_env, gpu_supervise_cmd, kill_marked


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
