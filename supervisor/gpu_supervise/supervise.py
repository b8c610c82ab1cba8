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
_change_state along EDGES. Every stop of the tree is one child.TreeStop.
"""

from __future__ import annotations

import enum
import os
import select
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

from loguru import logger

from . import child, events, holders, logs, report, signals, tripwire
from .args import EXIT_INTERNAL, PROG, describe_failure
from .config import Settings
from .probe import Prober, ProbeResult, failed
from .sources import open_source
from .tripwire import Tripwire
from .watch import Action, Decision, Watcher, WatchPolicy

EXIT_RESTART = 1


def load_what_a_stop_needs() -> None:
    """Import now everything that stopping, holding and starting the agent again will use.

    Imported lazily at the moment of a stop, a module would be read from disk long after start:
    after an in-place upgrade (a new package, a new binary folder over the running one) it is
    the new version's file, or in the binary a different archive at the old offsets (zlib
    errors), and the stop fails with the agent's tree still running. tests/test_hostile.py
    audits that a whole run imports nothing after this."""
    import ctypes  # noqa: F401  (child: the parent-death signal of an agent started again)
    import socket  # noqa: F401  (report: systemd's notify socket)

    import psutil  # noqa: F401  (child: the tree walk of every stop)

    "".encode("unicode_escape")  # text.printable's codec, a module of its own


def _write_stderr(line: str) -> None:
    """One line straight to fd 2, for when the logger itself is what failed."""
    try:
        os.write(2, (line + "\n").encode("utf-8", "backslashreplace"))
    except OSError:
        pass


class Heartbeat:
    """What the heartbeat line reports: the probes since the last one."""

    __slots__ = ("since", "probes", "failures", "last_seconds")

    def __init__(self, since: float) -> None:
        self.since, self.probes, self.failures, self.last_seconds = since, 0, 0, 0.0

    def count(self, result: ProbeResult) -> None:
        self.probes += 1
        self.failures += result.failed
        self.last_seconds = result.seconds


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


@dataclass
class Stop:
    """A stop in progress: the tree's (child.TreeStop), and what follows it."""

    exit_code: int | None  # None: exit with the child's own code
    reason: str
    tree: child.TreeStop
    hold: bool = False  # once the tree is gone, hold instead of exiting


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
        self.argv = argv
        self.env = env
        self.signals: deque[int] = deque()
        self.pid = pid  # the child, already started (see cli): its status, once reaped, below
        self.status: int | None = None
        self.state = State.RUNNING
        self.stop: Stop | None = None
        self.outcome: tuple[int, str] | None = None  # the exit code and why, once EXITING
        self.notify_socket = notify_socket
        # systemd's watchdog: WATCHDOG=1 at half its period from the loop (_keep_alive)
        self.watchdog = report.watchdog_period(os.environ) if notify_socket else None
        self.watchdog_at = 0.0  # the next WATCHDOG=1
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.watcher: Watcher | None = None
        self.prober: Prober | None = None
        self.termination_text: str | None = None  # what the termination log says, once written
        self.tripwire: Tripwire | None = None
        self.holders: holders.Scan | None = None  # who held the GPU at the last look (holding)
        self.scanner = holders.Scanner(settings.device_dir, notify=self._wake)
        self.heartbeat: Heartbeat | None = None
        self.tripwire_at = 0.0  # the next listing
        self.workdir: str | None = None  # where the agent started; we are at / (_leave_workdir)
        load_what_a_stop_needs()

    # -- setup ---------------------------------------------------------------------------------

    def _record(self, signum: int, _frame: object) -> None:
        """Signal handler: only record. All work happens in the loop (loguru is not
        re-entrant; a handler that logs can deadlock)."""
        self.signals.append(signum)

    def _install_signals(self) -> None:
        # PID 1 gets no default actions: every signal we forward needs a handler of its own.
        for sig in (*signals.FORWARDED, signal.SIGCHLD):
            signal.signal(sig, self._record)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        # The faults stay blocked (a handler would make a real one of ours loop forever): those
        # sent from outside are taken by a thread of their own (signals.FAULTS).
        threading.Thread(target=self._take_faults, name="faults", daemon=True).start()

    def _take_faults(self) -> None:
        """Thread: hand each fault signal another process sent to the loop, as a handler
        would."""
        while True:
            self.signals.append(signals.take_fault())
            self._wake()

    def _leave_workdir(self) -> None:
        """Hold no directory but /, as dumb-init does once its child runs: a volume can be
        unmounted under us. The agent keeps its own; one started again gets it back
        (_spawn_again). Every path the settings hold is absolute (config._path)."""
        try:
            self.workdir = os.getcwd()
        except OSError:  # already gone: an agent started again starts at /
            self.workdir = None
        os.chdir("/")

    def _spawn_again(self) -> int:
        """The agent started again (tried again while the cause passes), from its first working
        directory (at / if it is gone now)."""
        try:
            if self.workdir is not None:
                os.chdir(self.workdir)
        except OSError as exc:
            why = exc.strerror or str(exc)
            logger.warning(f"cannot enter {self.workdir} ({why}): the agent starts again at /")
        try:
            return child.start_retrying(
                self.argv, self.env, self.settings.parent_death_signal, self._wait_to_retry
            )
        finally:
            os.chdir("/")

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the loop is already due to wake

    def run(self) -> int:
        try:
            return self._run()
        except Exception as exc:  # a bug, or a resource gone: never leave the agent unsupervised
            return self._last_resort(exc)

    def _run(self) -> int:
        self._leave_workdir()
        self._install_signals()
        signals.unblock_signals(keep_faults=True)  # what arrived since the spawn is handled now
        events.log_start(self.settings, self.reaper)
        logger.info(f"started {events.command(self.argv)} as pid {self.pid}")
        self.heartbeat = Heartbeat(time.monotonic())
        if self.settings.watch_enabled:
            self.watcher = Watcher(WatchPolicy.from_settings(self.settings), time.monotonic())
            self.prober = Prober(open_source(self.settings.source), notify=self._wake)
            self._watch(time.monotonic())  # the baseline probe starts while the agent does
            self._set_tripwire()
        status = events.running_status(self.argv, self.pid, self.settings)
        self._notify(READY="1", STATUS=status, MAINPID=str(os.getpid()))
        code, why = self._loop()
        self._keep_alive(self.watchdog_at)  # the exit's flush has a whole period from here
        logs.decision(event="exit", code=code, reason=why).info(f"exiting {code}: {why}")
        self._flush_log()
        return code

    def _last_resort(self, exc: Exception) -> int:
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
        self._notify(STOPPING="1", STATUS=line)
        try:
            if self.status is None or child.has_children():
                self._stop_now()
        except Exception:  # even the tree walk failed: the agent's group, with system calls only
            if self.status is None:  # once reaped, its group's number may be somebody else's
                child.stop_group_now(self.pid, self.settings.stop_timeout)
        try:
            self._flush_log()
        except Exception:
            pass  # the line above went to stderr already if the logger is what failed
        return EXIT_INTERNAL

    def _flush_log(self) -> None:
        """The last lines, before the exit: the decision lines (the change, the failure, the
        exit) get up to stop_timeout of their own while stderr is stalled. What still could not
        be written is said first in the termination message."""
        unwritten = logs.flush(2.0, self.settings.stop_timeout)
        if unwritten.decisions:
            note = f"gpu-supervise: {unwritten.note()}"
            text = note if self.termination_text is None else f"{note}\n{self.termination_text}"
            report.write_termination_message(self.settings.termination_log, text)

    def _stop_now(self) -> None:
        """The stop as a plain loop (child.TreeStop.wait), not the loop that just failed."""
        tree = self._tree_stop(time.monotonic())
        tree.signal(signal.SIGTERM)
        tree.wait(self._reaped_quietly)

    def _reaped_quietly(self, reaped: child.Reaped) -> None:
        if reaped.pid == self.pid:
            self.status = reaped.status

    def _tree_stop(self, now: float) -> child.TreeStop:
        return child.TreeStop(
            self.pid, self.settings.stop_timeout, now, lambda: self.status is None
        )

    # -- the loop ------------------------------------------------------------------------------

    def _change_state(self, new: State) -> None:
        """Every transition happens here, along EDGES; any other is a bug, raised."""
        if (self.state, new) not in EDGES:
            raise StateError(f"no transition from {self.state.value} to {new.value}")
        self.state = new

    def _exit(self, code: int, why: str) -> None:
        self._change_state(State.EXITING)
        self.outcome = (code, why)

    def _loop(self) -> tuple[int, str]:
        while self.state is not State.EXITING:
            self._handle_signals()
            self._reap()
            now = time.monotonic()
            self._keep_alive(now)
            if self.state in (State.RUNNING, State.HOLDING):
                self._check_tripwire(now)
                self._watch(now)
                self._report_holders()
            if self.state is State.RUNNING and self.status is not None:
                # The agent exited by itself: clear what it left behind, exit with its code.
                code = child.exit_code(self.status)
                events.log_left_behind(child.survivors())
                self._begin_stop(now, code, f"the agent {child.describe_status(self.status)}")
            if self.state is not State.EXITING:
                self._beat(now)
            if self.state is State.STOPPING:
                self._advance_stop(now)
            if self.state is not State.EXITING:
                self._sleep(self._next_wake(now) - time.monotonic())
        assert self.outcome is not None
        return self.outcome

    def _next_wake(self, now: float) -> float:
        times = [now + 3600.0]
        if self.watchdog is not None:
            times.append(self.watchdog_at)
        if self.stop is not None:
            times.append(self.stop.tree.next_look(now))
        if self.heartbeat is not None and self.settings.log_heartbeat > 0:
            times.append(self.heartbeat.since + self.settings.log_heartbeat)
        if self.watcher is not None and self.state is not State.STOPPING:
            times.append(self.watcher.wake_at())
            if self.tripwire is not None:
                times.append(self.tripwire_at)
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

    def _notify(self, **fields: str) -> None:
        report.sd_notify(self.notify_socket, **fields)

    def _keep_alive(self, now: float) -> None:
        """WATCHDOG=1 when due, every half period: a loop that hangs stops sending it, and
        systemd kills and restarts the unit (WatchdogSec=)."""
        if self.watchdog is None or now < self.watchdog_at:
            return
        self._notify(WATCHDOG="1")
        self.watchdog_at = now + self.watchdog / 2

    # -- signals and children -------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.popleft()
            if sig == signal.SIGCHLD:
                continue  # reaping follows in the loop
            name = child.signame(sig)
            if sig in (signal.SIGTERM, signal.SIGINT) and sig not in signals.caller.ignored:
                self._stop_requested(sig, name)
            elif self.state is State.HOLDING or self.status is not None:
                logger.debug(f"received {name}: no agent is running to forward it to")
            else:  # systemd, for one, sends SIGCONT right after its SIGTERM
                logger.debug(f"received {name}: forwarding it to pid {self.pid}")
                refused = child.send(self.pid, sig)
                if refused:
                    logger.warning(f"could not forward {name} to pid {self.pid}: {refused}")

    def _stop_requested(self, sig: int, name: str) -> None:
        """SIGTERM or SIGINT from outside: a stop by the README's exit rules, whatever we
        were doing. A second one during a stop goes to the whole tree again. (One the caller
        ignored is only forwarded, as tini does: the agent inherited the ignore, and a
        background job's SIGINT from the terminal is not meant for it.)"""
        if self.state is State.HOLDING:
            self._exit(self._agent_code(), f"stopped by {name} while holding")
        elif self.state is State.RUNNING:
            logger.info(f"received {name}: stopping the child")
            self._begin_stop(time.monotonic(), None, f"stopped by {name}", sig=sig)
        else:
            assert self.stop is not None
            logger.info(f"received {name} during the stop: sending it to the child's tree too")
            self.stop.hold, self.stop.exit_code = False, None
            self.stop.reason = f"stopped by {name}"
            self.stop.tree.signal(sig)

    def _reap(self) -> None:
        for reaped in child.reap():
            if reaped.pid == self.pid:
                self.status = reaped.status
                logger.info(f"child {self.pid} {child.describe_status(reaped.status)}")
            else:
                logger.debug(f"reaped orphan {reaped.pid} ({child.describe_status(reaped.status)})")

    # -- stopping, holding, resuming -------------------------------------------------------------

    def _begin_stop(
        self, now: float, exit_code: int | None, reason: str, sig: int = signal.SIGTERM,
        hold: bool = False,
    ) -> None:  # fmt: skip
        self._change_state(State.STOPPING)
        self.stop = Stop(exit_code, reason, self._tree_stop(now), hold=hold)
        status = "stopping the agent: " + reason
        if hold:
            self._notify(STATUS=status)
        else:
            self._notify(STATUS=status, STOPPING="1")
        self.stop.tree.signal(sig)

    def _advance_stop(self, now: float) -> None:
        """One step of the tree's stop (child.TreeStop), and its lines."""
        stop = self.stop
        assert stop is not None
        phase = stop.tree.step(now)
        if phase == "killed":
            logger.warning(
                f"{stop.tree.left} process(es) still running {self.settings.stop_timeout:g} s "
                "after SIGTERM: sent SIGKILL"
            )
        elif phase == "gave up":
            for survivor in child.survivors():
                logger.error(
                    f"pid {survivor.pid} survived SIGKILL (state {survivor.state}): "
                    f"{survivor.cmdline}"
                )
        if phase in ("done", "gave up"):
            self._stopped(stop)

    def _stopped(self, stop: Stop) -> None:
        self.stop = None
        if stop.hold:
            self._change_state(State.HOLDING)
            self.holders = None
            self.scanner.forget()
            self._check_holders()
            if self.watcher is not None and self.watcher.hold is not None:  # the count follows
                self._notify(STATUS=events.holding_status(self.watcher.hold, self.settings))
            return
        if stop.exit_code is not None:
            self._exit(stop.exit_code, stop.reason)
        elif self.status is not None:
            self._exit(self._agent_code(), stop.reason)
        else:
            self._exit(self._agent_code(), stop.reason + "; the agent survived SIGKILL")

    def _agent_code(self) -> int:
        """The agent's exit code; an agent that survived SIGKILL counts as killed by it."""
        return child.exit_code(self.status) if self.status is not None else 128 + signal.SIGKILL

    def _resume(self) -> None:
        """The hold timed out: start the agent again, in this process (with the terminal, if
        the first one had it)."""
        child.take_terminal_back(self.pid)
        try:
            self.pid = self._spawn_again()
        except child.SpawnError as exc:
            logger.error(f"cannot start the agent again: {exc}")
            if not self._stop_asked():  # else the loop ends the hold by the rule for SIGTERM
                self._exit(exc.code, str(exc))
            return
        self.status = None
        self._change_state(State.RUNNING)
        logger.info(f"started {self.argv[0]} again as pid {self.pid}")
        self._notify(STATUS=events.running_status(self.argv, self.pid, self.settings))

    def _wait_to_retry(self, exc: Exception, seconds: float) -> bool:
        """Between two tries to start the agent again; a SIGTERM or SIGINT ends the tries."""
        logger.warning(f"cannot start the agent again: {exc}; trying again in {seconds:.1f} s")
        deadline = time.monotonic() + seconds
        while not self._stop_asked() and (left := deadline - time.monotonic()) > 0:
            self._sleep(left)
        return not self._stop_asked()

    def _stop_asked(self) -> bool:
        return signal.SIGTERM in self.signals or signal.SIGINT in self.signals

    # -- watching ------------------------------------------------------------------------------

    def _set_tripwire(self) -> None:
        """List the driver's MIG tree from now on (tripwire.py), or say once why not."""
        interval, root = self.settings.tripwire_every, self.settings.procfs_root
        if interval <= 0:
            return
        why = tripwire.absent_reason(root)
        if why is not None:
            logger.bind(event="tripwire", available=False, reason=why).info(
                f"{events.TAG} detection relies on the poll alone (every "
                f"{self.settings.interval:g} s): {why}"
            )
        self.tripwire = Tripwire(root)
        self.tripwire_at = time.monotonic() + interval

    def _beat(self, now: float) -> None:
        """Proof of life at INFO every log.heartbeat: days without a change are otherwise
        silent, and silence looks like a dead watcher."""
        beat, every = self.heartbeat, self.settings.log_heartbeat
        if beat is None or every <= 0 or now < beat.since + every:
            return
        baseline = self.watcher.baseline if self.watcher is not None else None
        events.log_heartbeat(beat, now, self.state.value, baseline)
        self.heartbeat = Heartbeat(now)

    def _check_holders(self) -> None:
        """While holding, when the hold begins and after each probe: who still blocks the
        reset. The scan reads every process's descriptors (seconds on a busy node), so it runs
        in a thread of its own and the loop goes on; _report_holders takes its result."""
        if self.state is State.HOLDING:
            self.scanner.start()

    def _report_holders(self) -> None:
        """A finished scan: logged when the hold begins and whenever the holders change, its
        count in systemd's status."""
        found, watcher = self.scanner.take(), self.watcher
        if found is None or self.state is not State.HOLDING:
            return
        if watcher is None or watcher.hold is None:
            return
        if self.holders is None or found.key() != self.holders.key():
            events.log_holders(found)
        self.holders = found
        self._notify(STATUS=events.holding_status(watcher.hold, self.settings, found))

    def _check_tripwire(self, now: float) -> None:
        if self.tripwire is None or self.watcher is None or now < self.tripwire_at:
            return
        self.tripwire_at = now + self.settings.tripwire_every
        if self.tripwire.changed():
            logger.debug(f"{events.TAG} the driver's MIG listing changed: probing now")
            self.watcher.trip(now)

    def _watch(self, now: float) -> None:
        """Hand results to the policy, give up on an overdue probe, start the next one."""
        if self.prober is None or self.watcher is None:
            return
        for result in self.prober.results():
            if self.heartbeat is not None:
                self.heartbeat.count(result)
            self._decide(result, self.watcher.observe(now, result))
            self._check_holders()
        lost = self.watcher.overdue(now)
        if lost is not None and self.heartbeat is not None:
            self.heartbeat.count(failed(-1, "overdue"))
        self._decide(None, lost)
        if self.state in (State.RUNNING, State.HOLDING) and self.watcher.probe_due(now):
            seq = self.watcher.begin_probe(now)
            if not self.prober.request(seq):
                stuck = failed(seq, "previous probe is still hanging in NVML")
                self._decide(stuck, self.watcher.observe(now, stuck))

    def _decide(self, result: ProbeResult | None, decision: Decision | None) -> None:
        """Log the policy's decision and carry it out."""
        if decision is None:
            return
        assert self.watcher is not None
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
