"""The main loop: one thread owns signals, reaping, probe results, logging and the stop.

Everything that can block lives elsewhere: NVML in the probe thread (behind a deadline), the
agent in its own processes. The loop sleeps in select() on one pipe that signal handlers
(via set_wakeup_fd) and the probe thread write to, so a signal or a result wakes it at once
and a hung NVML call never delays a signal or a stop.

The supervisor's states, as supervisord names its processes' states:

    RUNNING ──(change, failures, the agent exits, SIGTERM)──► STOPPING ──► EXITING
       ▲  └──(a MIG mode change pending a GPU reset)──► STOPPING ──► HOLDING ──(reset)──► EXITING
       └──────────────────────(pending_timeout: the agent starts again)──────┘

The watch policy (watch.py) decides the transitions; this loop carries them out, each through
_change_state along EDGES. Its parts: the agent (agent.py), what wakes the loop (inbox.py),
systemd (notifier.py), the watch glue (watching.py); every stop of the tree is one
child.TreeStop.
"""

from __future__ import annotations

import enum
import os
import signal
import time

from loguru import logger

from . import child, events, logs, report, signals
from .agent import Agent
from .config import Settings
from .inbox import Inbox
from .notifier import Notifier
from .probe import ProbeResult
from .stopping import Stop, flush_log, last_resort
from .watch import Action, Decision
from .watching import Watching

EXIT_RESTART = 1


def load_what_a_stop_needs() -> None:
    """Import now everything that stopping, holding and starting the agent again will use.

    Imported lazily at the moment of a stop, a module would be read from disk long after start:
    after an in-place upgrade (a new package, a new binary folder over the running one) it is
    the new version's file, or in the binary a different archive at the old offsets (zlib
    errors), and the stop fails with the agent's tree still running.
    tests/test_no_late_imports.py audits that a whole run imports nothing after this."""
    import ctypes  # noqa: F401  (child: the parent-death signal of an agent started again)
    import socket  # noqa: F401  (report: systemd's notify socket)

    "".encode("unicode_escape")  # text.printable's codec, a module of its own


class State(enum.Enum):
    RUNNING = "running"  # the agent is up; the topology is watched
    STOPPING = "stopping"  # the agent's tree got SIGTERM (or SIGINT); SIGKILL follows
    HOLDING = "holding"  # the agent is stopped on purpose: a MIG mode change waits for a reset
    EXITING = "exiting"  # the loop ends: its code and reason are set


# Every transition there is; Supervisor._change_state refuses any other.
EDGES = frozenset(
    {
        (State.RUNNING, State.STOPPING),  # RUNNING -> STOPPING: a decision, a signal, the exit
        (State.STOPPING, State.HOLDING),  # STOPPING -> HOLDING: the tree is gone, a reset waits
        (State.STOPPING, State.EXITING),  # STOPPING -> EXITING: the tree is gone
        (State.HOLDING, State.RUNNING),  # HOLDING -> RUNNING: the hold timed out, agent again
        (State.HOLDING, State.EXITING),  # HOLDING -> EXITING: a decision, a signal, no agent
    }
)


class StateError(RuntimeError):
    """A transition the supervisor has no edge for: a bug (the last resort takes it)."""


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        argv: list[str],
        pid: int,
        env: dict[str, str],
        notify_socket: str | None = None,
        reaper: bool = True,
    ) -> None:
        self.settings = settings
        self.reaper = reaper  # PID 1 or a child subreaper: orphans of the agent's come to us
        self.agent = Agent(argv, env, pid, settings.parent_death_signal)
        self.state = State.RUNNING
        self.stop: Stop | None = None
        self.outcome: tuple[int, str] | None = None  # the exit code and why, once EXITING
        self.systemd = Notifier(notify_socket)
        self.inbox = Inbox()
        self.watching: Watching | None = None  # from the run's start
        self.termination_text: str | None = None  # what the termination log says, once written
        load_what_a_stop_needs()

    # -- the run's steps, in the order cli._supervise takes them --------------------------------

    def begin(self) -> None:
        """The agent runs: leave its workdir, handle the signals held since the spawn, log."""
        agent = self.agent
        agent.leave_workdir()  # hold only /: a volume can be unmounted under us
        self.inbox.install()  # signals are recorded, and wake the loop
        signals.unblock_signals(keep_faults=True)  # what arrived since the spawn is handled now
        events.log_start(self.settings, self.reaper)
        logger.info(f"started {events.command(agent.argv)} as pid {agent.pid}")
        self.watching = Watching(self.settings, self.inbox.wake, time.monotonic())

    def take_baseline(self) -> None:
        """Start the baseline probe while the agent starts; then the tripwire, and READY."""
        assert self.watching is not None
        stuck = self.watching.take_baseline(time.monotonic())
        if stuck is not None:
            self._decide(*stuck)
        self.watching.set_tripwire()
        status = events.running_status(self.agent.argv, self.agent.pid, self.settings)
        self.systemd.notify(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    @property
    def exiting(self) -> bool:
        return self.state is State.EXITING

    def turn(self) -> None:
        """One turn of the loop: signals, reaping, the watch and its decisions, the stop."""
        assert self.watching is not None
        self._handle_signals()
        self.agent.reap()
        now = time.monotonic()
        self.systemd.keep_alive(now)
        if self.state in (State.RUNNING, State.HOLDING):
            self.watching.check_tripwire(now)
            self._watch(now)
            self._report_blockers()
        if self.state is State.RUNNING and self.agent.status is not None:
            self._agent_exited(now)
        if self.state is not State.EXITING:
            self.watching.beat(now, self.state.value)
        if self.state is State.STOPPING:
            self._advance_stop(now)
        if self.state is not State.EXITING:
            self.inbox.sleep(self._next_wake(now) - time.monotonic())

    def finish(self) -> int:
        """EXITING: the exit logged, the log flushed; the code to exit with."""
        assert self.outcome is not None
        code, why = self.outcome
        self.systemd.keep_alive(self.systemd.watchdog_at)  # the flush gets a whole period
        logs.decision(event="exit", code=code, reason=why).info(f"exiting {code}: {why}")
        flush_log(self.settings, self.termination_text)
        return code

    def last_resort(self, exc: Exception) -> int:
        """A bug, or a resource gone: never leave the agent unsupervised."""
        return last_resort(exc, self.agent, self.settings, self.systemd, self.termination_text)

    # -- the loop ------------------------------------------------------------------------------

    def _change_state(self, new: State) -> None:
        """Every transition happens here, along EDGES; any other is a bug, raised."""
        if (self.state, new) not in EDGES:
            raise StateError(f"no transition from {self.state.value} to {new.value}")
        self.state = new

    def _exit(self, code: int, why: str) -> None:
        self._change_state(State.EXITING)
        self.outcome = (code, why)

    def _next_wake(self, now: float) -> float:
        assert self.watching is not None
        times = [now + 3600.0, *self.systemd.wake_at()]
        if self.stop is not None:
            times.append(self.stop.tree.next_look(now))
        return min(times + self.watching.wake_at(stopping=self.state is State.STOPPING))

    # -- signals and children -------------------------------------------------------------------

    def _handle_signals(self) -> None:
        for sig, name, stop in self.inbox.take_signals():
            if stop:
                self._stop_requested(sig, name)
            elif self.state is State.HOLDING or self.agent.status is not None:
                logger.debug(f"received {name}: no agent is running to forward it to")
            else:  # systemd, for one, sends SIGCONT right after its SIGTERM
                self.agent.forward(sig, name)

    def _stop_requested(self, sig: int, name: str) -> None:
        """SIGTERM or SIGINT from outside: a stop by the README's exit rules, whatever we
        were doing. A second one during a stop goes to the whole tree again. (One the caller
        ignored is only forwarded, as tini does: the agent inherited the ignore, and a
        background job's SIGINT from the terminal is not meant for it.)"""
        if self.state is State.HOLDING:
            self._exit(self.agent.code(), f"stopped by {name} while holding")
        elif self.state is State.RUNNING:
            logger.info(f"received {name}: stopping the child")
            self._begin_stop(time.monotonic(), None, f"stopped by {name}", sig=sig)
        else:
            assert self.stop is not None
            self.stop.again(sig, name)

    def _agent_exited(self, now: float) -> None:
        """The agent exited by itself: clear what it left behind, exit with its code."""
        events.log_left_behind(child.survivors())
        self._begin_stop(now, *self.agent.exited())

    # -- stopping, holding, resuming -------------------------------------------------------------

    def _begin_stop(
        self, now: float, exit_code: int | None, reason: str, sig: int = signal.SIGTERM,
        hold: bool = False,
    ) -> None:  # fmt: skip
        self._change_state(State.STOPPING)
        self.stop = Stop(self.agent, self.settings, self.systemd, now, exit_code, reason, sig, hold)

    def _advance_stop(self, now: float) -> None:
        stop = self.stop
        assert stop is not None
        if not stop.step(now):
            return
        self.stop = None
        if not stop.hold:
            return self._exit(*stop.outcome(self.agent))
        self._change_state(State.HOLDING)
        assert self.watching is not None
        hold = self.watching.begin_hold()
        if hold is not None:  # the count follows
            self.systemd.notify(STATUS=events.holding_status(hold, self.settings))
        return None

    def _resume(self) -> None:
        """The hold timed out: start the agent again, in this process."""
        agent = self.agent
        try:
            agent.start_again(self.inbox)
        except child.SpawnError as exc:
            logger.error(f"cannot start the agent again: {exc}")
            if not self.inbox.stop_asked():  # else the loop ends the hold by the SIGTERM rule
                self._exit(exc.code, str(exc))
            return
        self._change_state(State.RUNNING)
        self.systemd.notify(STATUS=events.running_status(agent.argv, agent.pid, self.settings))

    # -- watching ------------------------------------------------------------------------------

    def _report_blockers(self) -> None:
        """A finished scan of who blocks the reset: its count in systemd's status."""
        assert self.watching is not None
        status = self.watching.blockers_status(self.state is State.HOLDING)
        if status is not None:
            self.systemd.notify(STATUS=status)

    def _watch(self, now: float) -> None:
        """Hand results to the policy, give up on an overdue probe, start the next one."""
        assert self.watching is not None
        for result, decision in self.watching.results(now):
            self._decide(result, decision)
            if result is not None and self.state is State.HOLDING:
                self.watching.blockers.look()
        if self.state in (State.RUNNING, State.HOLDING):
            stuck = self.watching.probe(now)
            if stuck is not None:
                self._decide(*stuck)

    def _decide(self, result: ProbeResult | None, decision: Decision | None) -> None:
        """Log the policy's decision and carry it out."""
        if decision is None:
            return
        events.log_decision(decision, result, self.settings)
        now = time.monotonic()
        if decision.action is Action.RESTART:
            self.termination_text = events.termination_message(decision, self.settings)
            report.write_termination_message(self.settings.termination_log, self.termination_text)
            reason = events.restart_reason(decision, self.settings)
            if self.state is State.HOLDING:  # the agent is already stopped
                self._exit(EXIT_RESTART, reason)
            else:
                self._begin_stop(now, EXIT_RESTART, reason)
        elif decision.action is Action.HOLD:
            self._begin_stop(now, None, "a MIG mode change is pending a GPU reset", hold=True)
        elif decision.action is Action.RESUME:
            self._resume()
