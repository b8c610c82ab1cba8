"""The watch policy: given probe results and the time, keep going, confirm, or act.

Pure by design: no threads, no clock of its own, no I/O. The main loop asks `next_probe_at`,
runs a probe when it is due, and hands the result to `observe` together with the time. That
makes every rule here (cool-down, settle, failure threshold) testable with a fake clock.

    baseline ──► steady ◄──────────────┐
       ▲   │        │ differs           │ back to baseline
  fail │   │        ▼                   │
       └───┘     settling ──(same again after `settle`)──► CHANGED (act)
                   │ ▲ differs again: restart the settle
                   └─┘
  any state: the `failure_threshold`-th consecutive failed probe ──► FAILING (act)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .probe import ProbeResult
from .topology import Change, Gpu, Topology, diff


@dataclass(frozen=True)
class WatchPolicy:
    interval: float = 30.0
    cooldown: float = 60.0
    settle: float = 5.0
    failure_threshold: int = 3


class Verdict(enum.Enum):
    BASELINE = "baseline"  # first usable reading: from now on compare against it
    STEADY = "steady"  # same topology as the baseline
    SETTLING = "settling"  # differs from the baseline: look again after `settle`
    REVERTED = "reverted"  # was settling, and is back to the baseline
    TOLERATED = "tolerated"  # a failed probe below the threshold
    CHANGED = "changed"  # confirmed topology change: act
    FAILING = "failing"  # too many consecutive failures: act


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    next_probe_at: float
    change: Change | None = None
    errors: tuple[str, ...] = ()
    newly_pending: tuple[Gpu, ...] = ()

    @property
    def act(self) -> bool:
        return self.verdict in (Verdict.CHANGED, Verdict.FAILING)


class Watcher:
    def __init__(self, policy: WatchPolicy, started_at: float) -> None:
        self.policy = policy
        self.started_at = started_at
        self.baseline: Topology | None = None
        self.candidate: Topology | None = None
        self.errors: list[str] = []
        self.next_probe_at = started_at
        self._pending_seen: frozenset[tuple[str, bool | None]] = frozenset()

    def observe(self, now: float, result: ProbeResult) -> Decision:
        if result.failed:
            return self._failure(now, result.error or "probe failed")
        self.errors.clear()
        topo = result.topology
        assert topo is not None
        pending = self._newly_pending(topo)
        if self.baseline is None:
            self.baseline = topo
            return self._decide(Verdict.BASELINE, self._after_interval(now), pending=pending)
        if topo.same_as(self.baseline):
            verdict = Verdict.REVERTED if self.candidate is not None else Verdict.STEADY
            self.candidate = None
            return self._decide(verdict, self._after_interval(now), pending=pending)
        if self.policy.settle <= 0 or (self.candidate is not None and topo.same_as(self.candidate)):
            return self._decide(Verdict.CHANGED, now, change=diff(self.baseline, topo))
        # A first sighting, or a reconfiguration still moving: look again after `settle`.
        self.candidate = topo
        return self._decide(
            Verdict.SETTLING,
            now + self.policy.settle,
            change=diff(self.baseline, topo),
            pending=pending,
        )

    def _failure(self, now: float, error: str) -> Decision:
        self.errors.append(error)
        errors = tuple(self.errors)
        if len(self.errors) >= self.policy.failure_threshold:
            return self._decide(Verdict.FAILING, now, errors=errors)
        retry = (
            now + self.policy.settle if self.candidate is not None else now + self.policy.interval
        )
        return self._decide(Verdict.TOLERATED, retry, errors=errors)

    def _after_interval(self, now: float) -> float:
        """Comparisons start only once the cool-down from start has passed."""
        return max(now + self.policy.interval, self.started_at + self.policy.cooldown)

    def _newly_pending(self, topo: Topology) -> tuple[Gpu, ...]:
        """GPUs with a MIG mode change waiting for a reset, each reported once."""
        gpus = topo.pending_mig_changes()
        now_pending = frozenset((g.uuid, g.mig_pending) for g in gpus)
        fresh = tuple(g for g in gpus if (g.uuid, g.mig_pending) not in self._pending_seen)
        self._pending_seen = now_pending
        return fresh

    def _decide(
        self,
        verdict: Verdict,
        next_probe_at: float,
        change: Change | None = None,
        errors: tuple[str, ...] = (),
        pending: tuple[Gpu, ...] = (),
    ) -> Decision:
        self.next_probe_at = next_probe_at
        return Decision(verdict, next_probe_at, change, errors, pending)
