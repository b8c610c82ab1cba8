"""The agent as the main loop sees it: its pid and, once reaped, its status; where it started;
starting it again; forwarding a signal to it; the stop of its tree."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from loguru import logger

from . import child
from .inbox import Inbox


class Agent:
    """The supervised command: started before the loop (cli), started again after a timed-out
    hold (`spawn_again`)."""

    def __init__(self, argv: list[str], env: dict[str, str], pid: int, death_signal: int) -> None:
        self.argv, self.env, self.death_signal = argv, env, death_signal
        self.pid = pid  # already started (see cli): its status, once reaped, below
        self.status: int | None = None
        self.workdir: str | None = None  # where the agent started; we are at / (leave_workdir)

    def leave_workdir(self) -> None:
        """Hold no directory but /, as dumb-init does once its child runs: a volume can be
        unmounted under us. The agent keeps its own; one started again gets it back
        (spawn_again). Every path the settings hold is absolute (config._path)."""
        try:
            self.workdir = os.getcwd()
        except OSError:  # already gone: an agent started again starts at /
            self.workdir = None
        os.chdir("/")

    def spawn_again(self, wait_to_retry: Callable[[Exception, float], bool]) -> None:
        """The agent started again (tried again while the cause passes), from its first working
        directory (at / if it is gone now), in this process (with the terminal, if the first
        one had it). child.SpawnError if it cannot be."""
        child.take_terminal_back(self.pid)
        try:
            if self.workdir is not None:
                os.chdir(self.workdir)
        except OSError as exc:
            why = exc.strerror or str(exc)
            logger.warning(f"cannot enter {self.workdir} ({why}): the agent starts again at /")
        try:
            self.pid = child.start_retrying(self.argv, self.env, self.death_signal, wait_to_retry)
        finally:
            os.chdir("/")
        self.status = None

    def start_again(self, inbox: Inbox) -> None:
        """After a timed-out hold: spawn_again, tried again while the cause passes until a
        SIGTERM or SIGINT waits in `inbox`. child.SpawnError if it cannot be."""

        def wait_to_retry(exc: Exception, seconds: float) -> bool:
            logger.warning(f"cannot start the agent again: {exc}; trying again in {seconds:.1f} s")
            deadline = time.monotonic() + seconds
            while not inbox.stop_asked() and (left := deadline - time.monotonic()) > 0:
                inbox.sleep(left)
            return not inbox.stop_asked()

        self.spawn_again(wait_to_retry)
        logger.info(f"started {self.argv[0]} again as pid {self.pid}")

    def exited(self) -> tuple[int, str]:
        """The agent exited by itself: its exit code, and why, for the stop that follows."""
        status = self.status
        assert status is not None
        return child.exit_code(status), f"the agent {child.describe_status(status)}"

    def reaped(self, reaped: child.Reaped) -> bool:
        """Take note of a child collected: whether it is the agent."""
        if reaped.pid != self.pid:
            return False
        self.status = reaped.status
        return True

    def reap(self) -> None:
        """Collect every child that exited, the agent's status among them, and say so."""
        for each in child.reap():
            if self.reaped(each):
                logger.info(f"child {self.pid} {child.describe_status(each.status)}")
            else:
                logger.debug(f"reaped orphan {each.pid} ({child.describe_status(each.status)})")

    def code(self) -> int:
        """The agent's exit code; an agent that survived SIGKILL counts as killed by it."""
        return child.exit_code(self.status) if self.status is not None else 128 + signal.SIGKILL

    def forward(self, sig: int, name: str) -> None:
        logger.debug(f"received {name}: forwarding it to pid {self.pid}")
        refused = child.send(self.pid, sig)
        if refused:
            logger.warning(f"could not forward {name} to pid {self.pid}: {refused}")

    def tree_stop(self, now: float, timeout: float) -> child.TreeStop:
        """The stop of the agent's tree (child.TreeStop): its group is signalled at once while
        the agent is not reaped."""
        return child.TreeStop(self.pid, timeout, now, lambda: self.status is None)
