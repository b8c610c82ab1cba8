"""The watch glue around the pure policy: the probe thread, the tripwire, the heartbeat's
counts, and while holding, the scan for who blocks the reset. The main loop asks each part
what is due; the policy (watch.py) decides, and the loop carries out its decisions."""

from __future__ import annotations

import time
from collections.abc import Callable

from loguru import logger

from . import events, holders, tripwire
from .config import Settings
from .probe import Prober, ProbeResult, failed
from .sources import open_source
from .tripwire import Tripwire
from .watch import Decision, PendingReset, Watcher, WatchPolicy

# A reading and the policy's decision on it (None: a late reading), or an overdue probe's.
Decided = tuple[ProbeResult | None, Decision | None]


class Heartbeat:
    """What the heartbeat line reports: the probes since the last one."""

    __slots__ = ("since", "probes", "failures", "last_seconds")

    def __init__(self, since: float) -> None:
        self.since, self.probes, self.failures, self.last_seconds = since, 0, 0, 0.0

    def count(self, result: ProbeResult) -> None:
        self.probes += 1
        self.failures += result.failed
        self.last_seconds = result.seconds


class Watching:
    """The policy fed with readings: probes started when due, their results and the overdue
    ones judged, the tripwire listed, proof of life logged every log.heartbeat."""

    def __init__(self, settings: Settings, wake: Callable[[], None], now: float) -> None:
        self.settings = settings
        self.blockers = Blockers(settings.device_dir, wake)
        self.heartbeat = Heartbeat(now)
        self.watcher: Watcher | None = None
        self.prober: Prober | None = None
        self.tripwire: Tripwire | None = None
        self.tripwire_at = 0.0  # the next listing
        if settings.watch_enabled:
            self.watcher = Watcher(WatchPolicy.from_settings(settings), now)
            self.prober = Prober(open_source(settings.source), notify=wake)

    def set_tripwire(self) -> None:
        """List the driver's MIG tree from now on (tripwire.py), or say once why not."""
        interval, root = self.settings.tripwire_every, self.settings.procfs_root
        if self.watcher is None or interval <= 0:
            return
        why = tripwire.absent_reason(root)
        if why is not None:
            logger.bind(event="tripwire", available=False, reason=why).info(
                f"{events.TAG} detection relies on the poll alone (every "
                f"{self.settings.interval:g} s): {why}"
            )
        self.tripwire = Tripwire(root)
        self.tripwire_at = time.monotonic() + interval

    def check_tripwire(self, now: float) -> None:
        if self.tripwire is None or self.watcher is None or now < self.tripwire_at:
            return
        self.tripwire_at = now + self.settings.tripwire_every
        if self.tripwire.changed():
            logger.debug(f"{events.TAG} the driver's MIG listing changed: probing now")
            self.watcher.trip(now)

    def results(self, now: float) -> list[Decided]:
        """Each finished probe with its decision (None for a late one), and the overdue one."""
        if self.prober is None or self.watcher is None:
            return []
        decided: list[Decided] = []
        for result in self.prober.results():
            self.heartbeat.count(result)
            decided.append((result, self.watcher.observe(now, result)))
        lost = self.watcher.overdue(now)
        if lost is not None:
            self.heartbeat.count(failed(-1, "overdue"))
            decided.append((None, lost))
        return decided

    def take_baseline(self, now: float) -> Decided | None:
        """The run's first probe, started while the agent starts: its reading is the baseline."""
        return self.probe(now)

    def probe(self, now: float) -> Decided | None:
        """Start the next probe if it is due; the decision on it if the last one still hangs."""
        if self.prober is None or self.watcher is None or not self.watcher.probe_due(now):
            return None
        seq = self.watcher.begin_probe(now)
        if self.prober.request(seq):
            return None
        stuck = failed(seq, "previous probe is still hanging in NVML")
        return stuck, self.watcher.observe(now, stuck)

    def wake_at(self, stopping: bool) -> list[float]:
        """When the loop must look again: the heartbeat's time and, unless `stopping`, the
        probe's and the tripwire's."""
        beat_at = self.beat_at()
        times = [] if beat_at is None else [beat_at]
        if self.watcher is None or stopping:
            return times
        times.append(self.watcher.wake_at())
        if self.tripwire is not None:
            times.append(self.tripwire_at)
        return times

    def hold(self) -> PendingReset | None:
        """The policy's hold, while there is one: what systemd's status says while holding."""
        return self.watcher.hold if self.watcher is not None else None

    def begin_hold(self) -> PendingReset | None:
        """The agent's tree is gone and a reset waits: look for who blocks it; the hold."""
        self.blockers.begin()
        return self.hold()

    def blockers_status(self, holding: bool) -> str | None:
        """A finished scan of who blocks the reset, as systemd's status while `holding`."""
        hold = self.hold()
        found = self.blockers.take(holding and hold is not None)
        if found is None or hold is None:
            return None
        return events.holding_status(hold, self.settings, found)

    def beat_at(self) -> float | None:
        every = self.settings.log_heartbeat
        return self.heartbeat.since + every if every > 0 else None

    def beat(self, now: float, state: str) -> None:
        """Proof of life at INFO every log.heartbeat: days without a change are otherwise
        silent, and silence looks like a dead watcher."""
        due = self.beat_at()
        if due is None or now < due:
            return
        baseline = self.watcher.baseline if self.watcher is not None else None
        events.log_heartbeat(self.heartbeat, now, state, baseline)
        self.heartbeat = Heartbeat(now)


class Blockers:
    """While holding: who still blocks the reset. The scan reads every process's descriptors
    (seconds on a busy node), so it runs in a thread of its own and the loop goes on."""

    def __init__(self, device_dir: str, wake: Callable[[], None]) -> None:
        self.scanner = holders.Scanner(device_dir, notify=wake)
        self.last: holders.Scan | None = None  # who held the GPU at the last look

    def begin(self) -> None:
        """A hold begins: a fresh look, logged whatever it finds."""
        self.last = None
        self.scanner.forget()
        self.scanner.start()

    def look(self) -> None:
        """After each probe while holding: look again (one scan at a time)."""
        self.scanner.start()

    def take(self, wanted: bool) -> holders.Scan | None:
        """A finished scan, logged when the hold begins and whenever the holders change; None
        if none finished, or it is no longer `wanted` (the hold ended)."""
        found = self.scanner.take()
        if found is None or not wanted:
            return None
        if self.last is None or found.key() != self.last.key():
            events.log_holders(found)
        self.last = found
        return found
