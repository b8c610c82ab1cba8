"""The watch policy: given probe results and the time, keep going, confirm, hold, or act.

Pure by design: no threads, no clock of its own, no I/O. The main loop asks `probe_due`, starts
a probe with `begin_probe` when it is, sleeps until `wake_at`, and hands the result to `observe`
(or, past its deadline, asks `overdue`) together with the time. That makes every rule here
(cool-down, settle, failure threshold, hold) testable with a fake clock.

    baseline ──► steady ◄──────────────┐
       │            │ differs           │ back to baseline
       │            ▼                   │
       │         settling ──(same again after `settle`)──► CHANGED (restart)
       │           │ ▲ differs again: restart the settle     (and, however the layout moves,
       │           └─┘                 CHANGED `interval + settle` after the first sighting)
       └─ a MIG mode change pending a GPU reset (any reading) ──► holding: the agent stops
            holding ──(no GPU pending, same again after `settle`)──► RELEASED (restart)
            holding ──(every pending GPU past its `pending_timeout`)──► TIMED_OUT: the agent
                   starts again in place; but if a mode change took effect on another GPU
                   meanwhile, CHANGED (restart) once confirmed, like a release
            holding ──(a probe stuck in NVML: we hold the GPU ourselves)──► STUCK (restart)

The lowercase names are the watch's phases (Phase: baseline, steady, settling, holding); the
uppercase ones, events a decision reports (Event).

Each GPU that goes pending gets its own allowance of `pending_timeout` from the probe that first
saw it: the agent stays stopped while any pending GPU is within its allowance.

Failures: after a baseline, the `failure_threshold`-th consecutive failed probe restarts (the
specified rule). Before any successful reading a restart cannot give the agent a working NVML, so
failures never restart then. Only NVML refusing to start (no permission, a version mismatch)
means the agent started without it, so that NVML starting to work afterwards is a topology
change; a probe that timed out or failed later (a first nvmlInit is slow on a node without
persistence mode) is a failure like any other, and the first good reading is the baseline. While
holding, failures are expected (NVML fails while a GPU resets) and tolerated until the hold's
deadline; past it the failure rule decides first, so an agent is never started only to be
stopped by the next failures.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields, replace

from .config import Settings
from .probe import ProbeResult
from .topology import Change, Gpu, Topology, diff

# While NVML fails from the start, the failure is logged loudly once, then at this period.
REPORT_EVERY = 600.0

PendingKey = tuple[str, bool | None]  # (GPU UUID, the MIG mode waiting for a reset)


_DEFAULTS = Settings()  # the defaults are config.SCHEMA's, and only there


@dataclass(frozen=True)
class WatchPolicy:
    """The settings the policy reads: each field is the Settings attribute of its name."""

    interval: float = _DEFAULTS.interval
    cooldown: float = _DEFAULTS.cooldown
    settle: float = _DEFAULTS.settle
    failure_threshold: int = _DEFAULTS.failure_threshold
    on_pending: str = _DEFAULTS.on_pending  # "hold": stop the agent while a MIG change waits
    pending_timeout: float = _DEFAULTS.pending_timeout
    probe_timeout: float = _DEFAULTS.probe_timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> WatchPolicy:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


class Phase(enum.Enum):
    """Where the watch is, between two readings (Watcher.phase)."""

    BASELINE = "baseline"  # no good reading yet: the phase every run starts in
    STEADY = "steady"  # the readings are the baseline's topology
    SETTLING = "settling"  # a reading differs from the baseline: it is being confirmed
    HOLDING = "holding"  # the agent is stopped: a MIG mode change waits for a GPU reset


class Event(enum.Enum):
    """What a decision reports about the reading (or the failure) it was made on."""

    BASELINE = "baseline"  # the first usable reading: from now on compare against it
    UNCHANGED = "unchanged"  # the same topology as the baseline
    DIFFERS = "differs"  # differs from the baseline: look again after `settle`
    REVERTED = "reverted"  # was settling, and is back to the baseline
    TOLERATED = "tolerated"  # a failed probe below the threshold (or while holding)
    CHANGED = "changed"  # confirmed topology change
    FAILING = "failing"  # too many consecutive failures after a baseline
    BROKEN = "broken"  # every probe since start failed: no restart could help
    AWAITS_RESET = "awaits_reset"  # a MIG mode change waits for a GPU reset
    RELEASED = "released"  # no GPU waits for a reset any more (the reset happened, or not)
    TIMED_OUT = "timed_out"  # still pending after `pending_timeout`: give the agent back
    STUCK = "stuck"  # a probe hangs in NVML while holding: we hold the GPU ourselves


class Action(enum.Enum):
    NONE = "none"
    RESTART = "restart"  # stop the agent's tree and exit 1
    HOLD = "hold"  # stop the agent's tree and keep watching
    RESUME = "resume"  # start the agent again in this process


@dataclass(frozen=True)
class Decision:
    """What the policy decided, with what its log lines need: never the Watcher's own state."""

    event: Event
    next_probe_at: float
    change: Change | None = None
    errors: tuple[str, ...] = ()
    newly_pending: tuple[Gpu, ...] = ()  # GPUs whose pending mode change is news
    action: Action = Action.NONE
    loud: bool = True  # BROKEN: whether this one is worth an ERROR line (rate-limited)
    baseline: Topology | None = None  # what readings are compared against, after this one
    candidate: Topology | None = None  # the reading being confirmed (SETTLING)
    phase: Phase = Phase.STEADY  # the watch's phase after this decision
    refused: bool = False  # NVML refused to start before any good reading (BROKEN)

    @property
    def holding(self) -> bool:
        """The agent is held back after this decision."""
        return self.phase is Phase.HOLDING


@dataclass
class PendingReset:
    """The agent is stopped so that a GPU reset can go ahead (the supervisor's HOLDING). Each
    pending GPU has its own allowance, from the reading that first saw it pending; the hold
    lasts while any of those pending now is within its allowance."""

    allowances: dict[PendingKey, tuple[Gpu, float]]  # pending now: the GPU, its allowance's end

    @property
    def gpus(self) -> tuple[Gpu, ...]:
        """The GPUs pending now, as last seen."""
        return tuple(gpu for gpu, _ in self.allowances.values())

    @property
    def until(self) -> float:
        """When the last allowance ends: the agent starts again then, reset or not."""
        return max(end for _, end in self.allowances.values())

    def update(self, now: float, pending: tuple[Gpu, ...], allowance: float) -> None:
        """A reading while holding: a GPU newly pending gets its allowance from now, one no
        longer pending gives its up (and gets a new one if it goes pending again)."""
        self.allowances = {
            _key(g): (g, self.allowances.get(_key(g), (g, now + allowance))[1]) for g in pending
        }


class ProbeSchedule:
    """When to probe: the next probe's time, the probe running and its deadline, the cool-down
    from start, and a trip of the tripwire while a probe ran. It keeps time; the Watcher judges.
    """

    def __init__(self, policy: WatchPolicy, started_at: float) -> None:
        self.policy = policy
        self.started_at = started_at
        self.next_probe_at = started_at
        self._seq = 0
        self.in_flight: tuple[int, float] | None = None  # (seq, deadline) of the running probe
        self.tripped = False  # the tripwire fired while a probe was running

    def due(self, now: float) -> bool:
        return self.in_flight is None and now >= self.next_probe_at

    def begin(self, now: float) -> int:
        """A probe starts now: its number, to match its result against."""
        self._seq += 1
        self.in_flight = (self._seq, now + self.policy.probe_timeout)
        return self._seq

    def wake_at(self) -> float:
        """When the loop must look again: the running probe's deadline, or the next probe."""
        return self.in_flight[1] if self.in_flight is not None else self.next_probe_at

    def answered(self, seq: int) -> bool:
        """The running probe's result came (then none runs); False for any other's."""
        if self.in_flight is None or seq != self.in_flight[0]:
            return False
        self.in_flight = None
        return True

    def missed(self, now: float) -> bool:
        """The running probe is past its deadline: it is given up (then none runs)."""
        if self.in_flight is None or now < self.in_flight[1]:
            return False
        self.in_flight = None
        return True

    def after_interval(self, now: float) -> float:
        """Comparisons start only once the cool-down from start has passed."""
        return max(now + self.policy.interval, self.started_at + self.policy.cooldown)

    def trip(self, now: float, holding: bool) -> None:
        """The tripwire fired: the next probe at once, but not in the cool-down (unless
        holding); while a probe runs (it may have read before the change), one more after it."""
        if self.in_flight is not None:
            self.tripped = True
        else:
            self.next_probe_at = min(self.next_probe_at, self.trip_due(now, holding))

    def take_trip(self) -> bool:
        """Whether the tripwire fired while the probe that just ended ran; forgotten now."""
        tripped, self.tripped = self.tripped, False
        return tripped

    def trip_due(self, now: float, holding: bool) -> float:
        return now if holding else max(now, self.started_at + self.policy.cooldown)


class PendingGpus:
    """The GPUs with a MIG mode change waiting for a reset: each reported once, and those whose
    hold timed out never held again (until their pending change clears)."""

    def __init__(self) -> None:
        self._seen: frozenset[PendingKey] = frozenset()
        self._held_out: frozenset[PendingKey] = frozenset()  # timed out: never held again

    def of(self, topo: Topology) -> tuple[Gpu, ...]:
        """GPUs with a MIG mode change waiting for a reset, less those whose hold timed out (a
        GPU whose pending change cleared may hold again)."""
        gpus = topo.pending_mig_changes()
        keys = frozenset(_key(g) for g in gpus)
        self._held_out &= keys
        return tuple(g for g in gpus if _key(g) not in self._held_out)

    def newly(self, pending: tuple[Gpu, ...]) -> tuple[Gpu, ...]:
        """Those of `pending` not reported yet; each is reported once."""
        now_pending = frozenset(_key(g) for g in pending)
        fresh = tuple(g for g in pending if _key(g) not in self._seen)
        self._seen = now_pending
        return fresh

    def seen(self, pending: tuple[Gpu, ...]) -> None:
        """A hold begins: these are reported with it."""
        self._seen = frozenset(_key(g) for g in pending)

    def hold_out(self, topo: Topology) -> None:
        """The hold timed out: no GPU pending now is held again."""
        self._held_out = frozenset(_key(g) for g in topo.pending_mig_changes())


class Watcher:
    """The policy's judgement of readings, by the rules above; its ProbeSchedule says when."""

    def __init__(self, policy: WatchPolicy, started_at: float) -> None:
        self.policy = policy
        self.schedule = ProbeSchedule(policy, started_at)
        self.baseline: Topology | None = None
        self.candidate: Topology | None = None
        self.settled_at = 0.0  # when a reading the same as the candidate confirms it
        self.settle_by = 0.0  # when the candidate is acted on at the latest, moving or not
        self.errors: list[str] = []
        self.hold: PendingReset | None = None
        self._reported_at: float | None = None
        self.refused_at_start = False  # NVML refused to start before any good reading
        self.pending = PendingGpus()

    @property
    def phase(self) -> Phase:
        if self.hold is not None:
            return Phase.HOLDING
        if self.baseline is None:
            return Phase.BASELINE
        return Phase.SETTLING if self.candidate is not None else Phase.STEADY

    @property
    def next_probe_at(self) -> float:
        return self.schedule.next_probe_at

    @next_probe_at.setter
    def next_probe_at(self, at: float) -> None:
        self.schedule.next_probe_at = at

    @property
    def in_flight(self) -> tuple[int, float] | None:
        return self.schedule.in_flight

    # -- the probe's life: start it, take its result, or give up on it --------------------------

    def probe_due(self, now: float) -> bool:
        return self.schedule.due(now)

    def begin_probe(self, now: float) -> int:
        return self.schedule.begin(now)

    def wake_at(self) -> float:
        return self.schedule.wake_at()

    def observe(self, now: float, result: ProbeResult) -> Decision | None:
        """A probe's result. Only the running probe's counts: a late answer from one that
        already missed its deadline (and was counted failed) is ignored, and so None."""
        if not self.schedule.answered(result.seq):
            return None
        return self._after_trip(now, self.judge(now, result))

    def overdue(self, now: float) -> Decision | None:
        """The running probe missed its deadline: that is a failure (its answer, if it ever
        comes, will not count). While holding it is more: the probe's thread is stuck inside
        NVML with NVML open, so gpu-supervise itself is now the client that blocks the reset it
        waits for, and only its exit releases the handle."""
        if not self.schedule.missed(now):
            return None
        error = f"probe did not finish within {self.policy.probe_timeout:g} s"
        if self.hold is not None:
            self.errors.append(error)
            return self._decide(Event.STUCK, now, errors=tuple(self.errors),
                                action=Action.RESTART)  # fmt: skip
        return self._after_trip(now, self._failure(now, error))

    # -- the tripwire: the driver's listing changed --------------------------------------------

    def trip(self, now: float) -> None:
        """The driver's listing of GPUs and MIG instances changed (tripwire.py): probe at once,
        but never decide sooner. The tripwire only hurries the next probe; the readings decide.

        - While a change settles, the layout is still moving: the settle starts again now
          (never past the candidate's `settle_by`).
        - During the cool-down the probe waits for its end; while holding it is not held back.
        - While a probe runs (it may have read before the change), one more follows it."""
        if self.candidate is None:
            return self.schedule.trip(now, self.hold is not None)
        self.settled_at = min(now + self.policy.settle, self.settle_by)
        self.next_probe_at = max(self.next_probe_at, self.settled_at)
        return None

    def _after_trip(self, now: float, decision: Decision) -> Decision:
        """A probe ended that was running when the tripwire fired: the next one comes at once
        (unless this reading began a settle, or the decision acts)."""
        tripped = self.schedule.take_trip()
        if not tripped or self.candidate is not None or decision.action is not Action.NONE:
            return decision
        self.next_probe_at = min(
            self.next_probe_at, self.schedule.trip_due(now, self.hold is not None)
        )
        return replace(decision, next_probe_at=self.next_probe_at)

    # -- judging a reading -----------------------------------------------------------------------

    def judge(self, now: float, result: ProbeResult) -> Decision:
        if result.failed:
            return self._failure(now, result.error or "probe failed", result.refused)
        topo = result.topology
        assert topo is not None
        self.errors.clear()
        pending = self.pending.of(topo)
        if self.hold is not None:
            return self._holding(now, topo, pending)
        if self.phase is Phase.BASELINE:
            taken = self._take_baseline(now, topo, pending)
            if taken is not None:
                return taken
        if pending and self.policy.on_pending == "hold":
            return self._begin_hold(now, pending)
        newly = self.pending.newly(pending)
        if topo.same_as(self.baseline):
            event = Event.REVERTED if self.candidate is not None else Event.UNCHANGED
            self.candidate = None
            return self._decide(event, self._after_interval(now), newly_pending=newly)
        change = diff(self.baseline, topo)
        if self.policy.settle <= 0 or self._confirms(now, topo):
            return self._decide(Event.CHANGED, now, change=change, action=Action.RESTART)
        # A first sighting, or a reconfiguration still moving: look again after `settle`.
        self._settle(now, topo)
        return self._decide(Event.DIFFERS, self.settled_at, change=change, newly_pending=newly)

    def _take_baseline(
        self, now: float, topo: Topology, pending: tuple[Gpu, ...]
    ) -> Decision | None:
        """The first good reading is the baseline, the phase every run starts in. But NVML
        refused to start so far: the agent started without a working NVML, so a working one
        now is a change (the baseline is "no usable NVML"), judged as any other: None."""
        self.baseline = Topology.absent() if self.refused_at_start else topo
        if not topo.same_as(self.baseline):
            return None
        return self._maybe_hold(now, Event.BASELINE, self._after_interval(now), pending)

    def _confirms(self, now: float, topo: Topology) -> bool:
        """The candidate seen again, `settle` after it was first seen (or last moved); or, with
        a layout that never stops moving (instances of another GPU coming and going), whatever
        is seen at `settle_by`: a real change among them is acted on all the same."""
        if self.candidate is None:
            return False
        return now >= self.settle_by or (topo.same_as(self.candidate) and now >= self.settled_at)

    def _settle(self, now: float, topo: Topology) -> None:
        """A reading that does not confirm: a new candidate starts its settle; the same one
        seen too early (the tripwire hurried the probe) keeps its own. The first sighting sets
        the latest time to act: `interval + settle` on, and never past a hold's deadline (but
        for a settle of its own when the reading comes after it)."""
        if self.candidate is None:
            limit = now + self.policy.interval + self.policy.settle
            if self.hold is not None:
                limit = min(limit, max(self.hold.until, now + self.policy.settle))
            self.settle_by = limit
        if self.candidate is None or not topo.same_as(self.candidate):
            self.candidate = topo
            self.settled_at = min(now + self.policy.settle, self.settle_by)

    # -- failures --------------------------------------------------------------------------

    def _failure(self, now: float, error: str, refused: bool = False) -> Decision:
        self.errors.append(error)
        errors = tuple(self.errors)
        if self.hold is not None and now < self.hold.until:
            # No agent is running, and NVML fails while a GPU resets: wait for the hold to end.
            return self._decide(Event.TOLERATED, self._hold_next(now), errors=errors)
        if self.hold is not None:
            # Past the deadline and NVML fails: the failure rule decides before the agent is
            # started again (an agent started now would be stopped by the next failures).
            if len(self.errors) >= self.policy.failure_threshold:
                self.hold = None
                return self._decide(Event.FAILING, now, errors=errors, action=Action.RESTART)
            return self._decide(Event.TOLERATED, now + self.policy.interval, errors=errors)
        if self.baseline is None:
            return self._failing_from_start(now, errors, refused)
        if len(self.errors) >= self.policy.failure_threshold:
            return self._decide(Event.FAILING, now, errors=errors, action=Action.RESTART)
        retry = now + (self.policy.settle if self.candidate is not None else self.policy.interval)
        return self._decide(Event.TOLERATED, retry, errors=errors)

    def _failing_from_start(self, now: float, errors: tuple[str, ...], refused: bool) -> Decision:
        """No good reading yet: never a restart. NVML refusing to start is reported at once;
        other failures (a slow first probe) count as ever until the threshold."""
        self.refused_at_start = self.refused_at_start or refused
        if not self.refused_at_start and len(errors) < self.policy.failure_threshold:
            return self._decide(Event.TOLERATED, now + self.policy.interval, errors=errors)
        loud = self._reported_at is None or now - self._reported_at >= REPORT_EVERY
        if loud:
            self._reported_at = now
        return self._decide(Event.BROKEN, now + self.policy.interval, errors=errors, loud=loud)

    # -- holds -------------------------------------------------------------------------------

    def _maybe_hold(
        self, now: float, event: Event, next_probe_at: float, pending: tuple[Gpu, ...]
    ) -> Decision:
        if pending and self.policy.on_pending == "hold":
            return self._begin_hold(now, pending, event)
        return self._decide(event, next_probe_at, newly_pending=self.pending.newly(pending))

    def _begin_hold(
        self, now: float, pending: tuple[Gpu, ...], event: Event = Event.AWAITS_RESET
    ) -> Decision:
        self.hold = PendingReset({})
        self.hold.update(now, pending, self.policy.pending_timeout)
        self.candidate = None
        self.pending.seen(pending)
        return self._decide(event, self._hold_next(now), newly_pending=pending, action=Action.HOLD)

    def _holding(self, now: float, topo: Topology, pending: tuple[Gpu, ...]) -> Decision:
        assert self.hold is not None and self.baseline is not None
        if pending:
            self.hold.update(now, pending, self.policy.pending_timeout)
            if now < self.hold.until:
                self.candidate = None
                newly = self.pending.newly(pending)
                return self._decide(Event.AWAITS_RESET, self._hold_next(now), newly_pending=newly)
            if topo.same_as(self.baseline):
                return self._time_out(now, topo)
        # No GPU waits for a reset any more; or those still waiting are past their allowance
        # while a mode change took effect on another GPU: that is a topology change all the
        # same, never a new baseline for an agent started in place.
        change = None if topo.same_as(self.baseline) else diff(self.baseline, topo)
        if self.policy.settle > 0 and not self._confirms(now, topo):
            # A reset is often followed at once by instances being created: one restart for both.
            self._settle(now, topo)
            return self._decide(Event.DIFFERS, self.settled_at, change=change)
        self.hold = None
        self.candidate = None
        event = Event.CHANGED if pending else Event.RELEASED
        return self._decide(event, now, change=change, action=Action.RESTART)

    def _time_out(self, now: float, topo: Topology) -> Decision:
        """The reset did not happen within any pending GPU's allowance: give the agent back, and
        never hold for these pending changes again."""
        assert self.hold is not None
        gpus = self.hold.gpus  # every GPU pending now: each is past its allowance
        self.pending.hold_out(topo)
        self.baseline = topo  # the agent starting now gets handles on this topology
        self.hold = None
        self.candidate = None
        self.errors.clear()
        return self._decide(
            Event.TIMED_OUT, now + self.policy.interval, newly_pending=gpus, action=Action.RESUME
        )

    def _hold_next(self, now: float) -> float:
        """While pending: every `interval`, and at the deadline (never an interval past it)."""
        assert self.hold is not None
        return min(now + self.policy.interval, self.hold.until)

    # -- helpers -----------------------------------------------------------------------------

    def _after_interval(self, now: float) -> float:
        return self.schedule.after_interval(now)

    def _decide(
        self,
        event: Event,
        next_probe_at: float,
        change: Change | None = None,
        errors: tuple[str, ...] = (),
        newly_pending: tuple[Gpu, ...] = (),
        action: Action = Action.NONE,
        loud: bool = True,
    ) -> Decision:
        self.next_probe_at = next_probe_at
        return Decision(
            event, next_probe_at, change, errors, newly_pending, action, loud,
            self.baseline, self.candidate, self.phase, self.refused_at_start,
        )  # fmt: skip


def _key(gpu: Gpu) -> PendingKey:
    return (gpu.uuid, gpu.mig_pending)
