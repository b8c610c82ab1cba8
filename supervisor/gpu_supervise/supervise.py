"""The main loop: one thread owns signals, reaping, probe results, logging and the stop.

Everything that can block lives elsewhere: NVML in the probe thread (behind a deadline), the
agent in its own processes. The loop sleeps in select() on one pipe that signal handlers
(via set_wakeup_fd) and the probe thread write to, so a signal or a result wakes it at once
and a hung NVML call never delays a signal or a stop.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections import deque
from dataclasses import dataclass

from loguru import logger

from . import child, report
from .config import Settings
from .probe import Prober, ProbeResult, failed
from .sources import open_source
from .topology import Change
from .watch import Decision, Verdict, Watcher

TAG = "[GPU-Watcher]"
EXIT_RESTART = 1


@dataclass
class Stop:
    """A stop in progress: what we will exit with, and when SIGKILL follows SIGTERM."""

    exit_code: int | None  # None: exit with the child's own code
    kill_at: float
    killed: bool = False


class Supervisor:
    def __init__(
        self, settings: Settings, argv: list[str], pid: int, notify_socket: str | None = None
    ) -> None:
        self.settings = settings
        self.argv = argv
        self.signals: deque[int] = deque()
        self.pid = pid  # the child, already started (see cli): its status, once reaped, below
        self.status: int | None = None
        self.stop: Stop | None = None
        self.notify_socket = notify_socket
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.watcher: Watcher | None = None
        self.prober: Prober | None = None
        self.in_flight: tuple[int, float] | None = None  # (seq, deadline)
        self.seq = 0

    # -- setup ---------------------------------------------------------------------------------

    def _record(self, signum: int, _frame: object) -> None:
        """Signal handler: only record. All work happens in the loop (loguru is not
        re-entrant; a handler that logs can deadlock)."""
        self.signals.append(signum)

    def _install_signals(self) -> None:
        # PID 1 gets no default actions: every signal we forward needs a handler of its own.
        for sig in (*child.FORWARDED, signal.SIGCHLD):
            signal.signal(sig, self._record)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the loop is already due to wake

    def run(self) -> int:
        self._install_signals()
        child.unblock_signals()  # anything that arrived since the spawn is handled now
        logger.info(f"started {self.argv[0]} as pid {self.pid}")
        if self.settings.watch_enabled:
            self.watcher = Watcher(self.settings.policy, time.monotonic())
            self.prober = Prober(open_source(self.settings.source), notify=self._wake)
            self._start_probe(time.monotonic())  # the baseline, while the agent starts
        report.sd_notify(self.notify_socket, f"READY=1\nMAINPID={os.getpid()}")
        return self._loop()

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> int:
        while True:
            self._handle_signals()
            self._reap()
            now = time.monotonic()
            if self.stop is None:
                self._watch(now)
            if self.stop is not None:
                done = self._advance_stop(now)
                if done is not None:
                    return done
            elif self.status is not None:
                # The agent exited by itself: clear what it left behind, exit with its code.
                self._begin_stop(now, exit_code=child.exit_code(self.status))
                continue
            self._sleep(self._next_wake(now) - time.monotonic())

    def _next_wake(self, now: float) -> float:
        times = [now + 3600.0]
        if self.stop is not None:
            times.append(now + 0.05 if self.stop.killed else self.stop.kill_at)
        if self.in_flight is not None:
            times.append(self.in_flight[1])
        elif self.watcher is not None and self.stop is None:
            times.append(self.watcher.next_probe_at)
        return min(times)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            try:
                select.select([self._wake_r], [], [], seconds)
            except InterruptedError:
                pass
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- signals and children -------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.popleft()
            if sig == signal.SIGCHLD:
                continue  # reaping follows in the loop
            name = signal.Signals(sig).name
            if sig in (signal.SIGTERM, signal.SIGINT):
                if self.stop is None:
                    logger.info(f"received {name}: stopping the child")
                    self._begin_stop(time.monotonic(), exit_code=None, sig=sig)
                else:
                    child.signal_tree(self.pid, sig)
            elif self.status is None:
                logger.debug(f"forwarding {name} to pid {self.pid}")
                child.send(self.pid, sig)

    def _reap(self) -> None:
        for reaped in child.reap():
            if reaped.pid == self.pid:
                self.status = reaped.status
                logger.info(f"child {self.pid} {child.describe_status(reaped.status)}")
            else:
                logger.debug(f"reaped orphan {reaped.pid} ({child.describe_status(reaped.status)})")

    # -- stopping ------------------------------------------------------------------------------

    def _begin_stop(self, now: float, exit_code: int | None, sig: int = signal.SIGTERM) -> None:
        self.stop = Stop(exit_code, kill_at=now + self.settings.stop_timeout)
        report.sd_notify(self.notify_socket, "STOPPING=1")
        child.signal_tree(self.pid, sig)

    def _advance_stop(self, now: float) -> int | None:
        """Wait for the tree to go; SIGKILL what is left after stop_timeout. Returns the exit
        code once nothing is left to reap."""
        stop = self.stop
        assert stop is not None
        if not child.has_children():
            return self._exit_code(stop)
        if now >= stop.kill_at and not stop.killed:
            left = child.signal_tree(self.pid, signal.SIGKILL)
            stop.killed = True
            logger.warning(
                f"{left} process(es) still running {self.settings.stop_timeout:g} s after "
                "SIGTERM: sent SIGKILL"
            )
        return None

    def _exit_code(self, stop: Stop) -> int:
        if stop.exit_code is not None:
            return stop.exit_code
        if self.status is None:  # cannot happen once every child is reaped; be explicit anyway
            return EXIT_RESTART
        return child.exit_code(self.status)

    # -- watching ------------------------------------------------------------------------------

    def _start_probe(self, now: float) -> None:
        assert self.prober is not None and self.watcher is not None
        self.seq += 1
        if self.prober.request(self.seq):
            self.in_flight = (self.seq, now + self.settings.probe_timeout)
        else:
            self._decide(now, failed(self.seq, "previous probe is still hanging in NVML"))

    def _watch(self, now: float) -> None:
        if self.prober is None or self.watcher is None:
            return
        for result in self.prober.results():
            if self.in_flight is not None and result.seq == self.in_flight[0]:
                self.in_flight = None
                self._decide(now, result)
                if self.stop is not None:
                    return
        if self.in_flight is not None and now >= self.in_flight[1]:
            seq = self.in_flight[0]
            self.in_flight = None
            timeout = self.settings.probe_timeout
            self._decide(now, failed(seq, f"probe did not finish within {timeout:g} s"))
        if self.stop is None and self.in_flight is None and now >= self.watcher.next_probe_at:
            self._start_probe(now)

    def _decide(self, now: float, result: ProbeResult) -> None:
        assert self.watcher is not None
        decision = self.watcher.observe(now, result)
        log_decision(decision, result, self.watcher, self.settings)
        if decision.act:
            reason = termination_message(decision)
            report.write_termination_message(self.settings.termination_log, reason)
            self._begin_stop(now, exit_code=EXIT_RESTART)


# -- what the watcher's decisions look like in the log ---------------------------------------


def _uuid_list(uuids: list[str]) -> str:
    return "[" + ", ".join(uuids) + "]"


def change_line(change: Change) -> str:
    """The PRD's line, word for word, so existing log alerts keep matching."""
    kind = "MIG configuration change" if change.is_mig_change else "GPU topology change"
    return (
        f"{TAG} {kind} detected (Old UUIDs: {_uuid_list(change.old.uuids())}, "
        f"New UUIDs: {_uuid_list(change.new.uuids())}). Initiating self-restart."
    )


def termination_message(decision: Decision) -> str:
    if decision.change is not None:
        change = decision.change
        return "\n".join(
            [
                "gpu-supervise: GPU topology changed; restarting the agent.",
                f"old: {change.old.summary()}",
                f"new: {change.new.summary()}",
                *change.lines,
            ]
        )
    return "\n".join(
        [f"gpu-supervise: NVML failed {len(decision.errors)} consecutive probes:", *decision.errors]
    )


def log_decision(
    decision: Decision, result: ProbeResult, watcher: Watcher, settings: Settings
) -> None:
    v = decision.verdict
    for gpu in decision.newly_pending:
        logger.info(
            f"{TAG} {gpu.describe()}: MIG mode change to {'on' if gpu.mig_pending else 'off'} is "
            "pending a GPU reset; it counts once it takes effect"
        )
    if v is Verdict.BASELINE:
        topo = result.topology
        assert topo is not None
        if result.unavailable:
            logger.bind(event="baseline", reason=result.unavailable).warning(
                f"{TAG} baseline: no GPUs ({result.unavailable}); running the agent anyway, "
                "NVML appearing later counts as a topology change"
            )
        else:
            migs = sum(len(g.mig_devices) for g in topo.gpus)
            logger.bind(event="baseline", uuids=topo.uuids()).info(
                f"{TAG} baseline: {len(topo.gpus)} GPU(s), {migs} MIG device(s): {topo.summary()}"
            )
    elif v is Verdict.STEADY:
        logger.debug(f"{TAG} probe {result.seq}: topology unchanged ({result.seconds:.3f} s)")
    elif v is Verdict.SETTLING:
        assert decision.change is not None
        logger.bind(event="settling", diff=list(decision.change.lines)).info(
            f"{TAG} topology differs from the baseline; confirming in {settings.settle:g} s "
            f"(now: {decision.change.new.summary()})"
        )
    elif v is Verdict.REVERTED:
        logger.info(f"{TAG} topology is back to the baseline; no restart")
    elif v is Verdict.TOLERATED:
        n, limit = len(decision.errors), settings.failure_threshold
        logger.bind(event="probe_failed", error=decision.errors[-1], failures=n).warning(
            f"{TAG} topology probe failed ({n}/{limit} consecutive): {decision.errors[-1]}"
        )
    elif v is Verdict.CHANGED:
        change = decision.change
        assert change is not None
        logger.bind(
            event="topology_changed",
            old_uuids=change.old.uuids(),
            new_uuids=change.new.uuids(),
            diff=list(change.lines),
        ).info(change_line(change))
        for line in change.lines:
            logger.info(f"{TAG}   {line}")
    elif v is Verdict.FAILING:
        old = watcher.baseline.uuids() if watcher.baseline else []
        logger.bind(event="nvml_failing", errors=list(decision.errors), old_uuids=old).error(
            f"{TAG} NVML failed {len(decision.errors)} consecutive probes "
            f"(errors: {'; '.join(decision.errors)}). Initiating self-restart."
        )
