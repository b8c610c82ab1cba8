"""The stop of the agent's tree as the main loop runs it (a step at a time), and the ends of a
run: the last lines flushed, and the last resort when gpu-supervise itself fails."""

from __future__ import annotations

import os
import signal
import time

from loguru import logger

from . import child, logs, report
from .agent import Agent
from .args import PROG
from .config import Settings
from .exits import EXIT_INTERNAL, describe_failure
from .notifier import Notifier


class Stop:
    """A stop in progress: the tree's (child.TreeStop), begun at once, and what follows it."""

    def __init__(
        self, agent: Agent, settings: Settings, systemd: Notifier, now: float,
        exit_code: int | None, reason: str, sig: int = signal.SIGTERM, hold: bool = False,
    ) -> None:  # fmt: skip
        stopping = {} if hold else {"STOPPING": "1"}  # a hold is no stop for systemd
        systemd.notify(STATUS="stopping the agent: " + reason, **stopping)
        self.exit_code = exit_code  # None: exit with the child's own code
        self.reason = reason
        self.hold = hold  # once the tree is gone, hold instead of exiting
        self.timeout = settings.stop_timeout
        self.tree = agent.tree_stop(now, settings.stop_timeout)
        self.tree.signal(sig)

    def again(self, sig: int, name: str) -> None:
        """SIGTERM or SIGINT during the stop: the whole tree gets it too, and the stop ends by
        the rule for a signal from outside (never going on into a hold)."""
        logger.info(f"received {name} during the stop: sending it to the child's tree too")
        self.hold, self.exit_code = False, None
        self.reason = f"stopped by {name}"
        self.tree.signal(sig)

    def step(self, now: float) -> bool:
        """One step of the tree's stop, and its lines: whether the stop is over."""
        phase = self.tree.step(now)
        if phase == "killed":
            logger.warning(
                f"{self.tree.left} process(es) still running {self.timeout:g} s "
                "after SIGTERM: sent SIGKILL"
            )
        elif phase == "gave up":
            for survivor in child.survivors():
                logger.error(
                    f"pid {survivor.pid} survived SIGKILL (state {survivor.state}): "
                    f"{survivor.cmdline}"
                )
        return phase in ("done", "gave up")

    def outcome(self, agent: Agent) -> tuple[int, str]:
        """The exit code and why, once the tree is gone (and no hold follows)."""
        if self.exit_code is not None:
            return self.exit_code, self.reason
        if agent.status is None:
            return agent.code(), self.reason + "; the agent survived SIGKILL"
        return agent.code(), self.reason


def flush_log(settings: Settings, termination_text: str | None) -> None:
    """The last lines, before the exit: the decision lines (the change, the failure, the
    exit) get up to stop_timeout of their own while stderr is stalled. What still could not
    be written is said first in the termination message."""
    unwritten = logs.flush(2.0, settings.stop_timeout)
    if unwritten.decisions:
        note = f"gpu-supervise: {unwritten.note()}"
        text = note if termination_text is None else f"{note}\n{termination_text}"
        report.write_termination_message(settings.termination_log, text)


def _write_stderr(line: str) -> None:
    """One line straight to fd 2, for when the logger itself is what failed."""
    try:
        os.write(2, (line + "\n").encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def last_resort(
    exc: Exception, agent: Agent, settings: Settings, systemd: Notifier,
    termination_text: str | None,
) -> int:  # fmt: skip
    """Something failed that the loop does not expect: stop the agent's whole tree (TERM,
    then KILL after stop_timeout) with as little machinery as possible, say so in one line,
    and exit EXIT_INTERNAL so that the restart policy starts everything afresh."""
    line = (
        f"internal error ({describe_failure(exc)}); stopping the agent's tree and exiting "
        f"{EXIT_INTERNAL}"
    )
    try:
        logs.decision(event="exit", code=EXIT_INTERNAL, reason=line).critical(line)
    except Exception:
        _write_stderr(f"{PROG}: {line}")
    systemd.notify(STOPPING="1", STATUS=line)
    try:
        if agent.status is None or child.has_children():
            tree = agent.tree_stop(time.monotonic(), settings.stop_timeout)
            tree.signal(signal.SIGTERM)
            tree.wait(agent.reaped)  # a plain loop, not the loop that just failed
    except Exception:  # even the tree walk failed: the agent's group, with system calls only
        if agent.status is None:  # once reaped, its group's number may be somebody else's
            child.stop_group_now(agent.pid, settings.stop_timeout)
    try:
        flush_log(settings, termination_text)
    except Exception:
        pass  # the line above went to stderr already if the logger is what failed
    return EXIT_INTERNAL
