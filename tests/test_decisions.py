"""A decision carries what its log lines need (the baseline, the reading being confirmed,
whether the agent is held back): events.log_decision reads the decision, never the Watcher."""

from __future__ import annotations

from dataclasses import replace

from gpu_supervise.probe import ProbeResult
from gpu_supervise.topology import Gpu, MigDevice, Topology
from gpu_supervise.watch import Action, Decision, Event, Phase, Watcher, WatchPolicy

POLICY = WatchPolicy(interval=30, cooldown=60, settle=5, failure_threshold=3, pending_timeout=300)
OFF = Topology((Gpu(0, "GPU-0", "A100", "bus", False, False),))
ON_EMPTY = Topology((Gpu(0, "GPU-0", "A100", "bus", True, True),))
MIG = MigDevice(0, "MIG-0", "GPU-0", 10, 0, 3, 20000, "3g.20gb")
ON_ONE = Topology((Gpu(0, "GPU-0", "A100", "bus", True, True, (MIG,)),))
PENDING_ON = Topology((replace(OFF.gpus[0], mig_pending=True),))


def step(w: Watcher, now: float, topo: Topology | None, error: str = "") -> Decision:
    seq = w.begin_probe(now)
    decision = w.observe(now, ProbeResult(seq, topo, error=error or None))
    assert decision is not None
    return decision


def test_a_decision_carries_its_baseline_and_the_reading_it_confirms():
    w = Watcher(POLICY, started_at=1000.0)
    d = step(w, 1000.0, OFF)
    assert (d.event, d.baseline, d.candidate, d.holding) == (Event.BASELINE, OFF, None, False)
    d = step(w, 1060.0, ON_ONE)
    assert (d.event, d.baseline, d.candidate) == (Event.DIFFERS, OFF, ON_ONE)
    d = step(w, 1065.0, ON_ONE)
    assert (d.event, d.baseline, d.holding) == (Event.CHANGED, OFF, False)


def test_a_failing_decision_carries_the_baseline_it_lost():
    w = Watcher(POLICY, started_at=1000.0)
    step(w, 1000.0, OFF)
    for t in (1060.0, 1090.0):
        assert step(w, t, None, "GPU is lost").baseline is OFF
    d = step(w, 1120.0, None, "GPU is lost")
    assert (d.event, d.action, d.baseline) == (Event.FAILING, Action.RESTART, OFF)


def test_a_decision_says_whether_the_agent_is_held_back():
    w = Watcher(POLICY, started_at=1000.0)
    step(w, 1000.0, OFF)
    d = step(w, 1060.0, PENDING_ON)
    assert (d.event, d.action, d.holding) == (Event.AWAITS_RESET, Action.HOLD, True)
    d = step(w, 1090.0, None, "GPU is resetting")
    assert (d.event, d.holding) == (Event.TOLERATED, True)
    d = step(w, 1120.0, ON_EMPTY)
    assert (d.event, d.holding, d.candidate) == (Event.DIFFERS, True, ON_EMPTY)
    d = step(w, 1125.0, ON_EMPTY)
    assert (d.event, d.action, d.holding) == (Event.RELEASED, Action.RESTART, False)


def test_a_broken_decision_says_whether_nvml_refused_to_start():
    refusing = Watcher(POLICY, started_at=1000.0)
    seq = refusing.begin_probe(1000.0)
    d = refusing.observe(1000.0, ProbeResult(seq, None, error="version mismatch", refused=True))
    assert d is not None and (d.event, d.refused) == (Event.BROKEN, True)
    slow = Watcher(POLICY, started_at=1000.0)
    for t in (1000.0, 1030.0):
        assert step(slow, t, None, "timed out").refused is False
    d = step(slow, 1060.0, None, "timed out")
    assert (d.event, d.refused) == (Event.BROKEN, False)


def test_a_run_starts_in_the_baseline_phase_and_each_decision_says_the_phase_after_it():
    """Phases are where the watch is (Phase); what a decision reports is an Event."""
    w = Watcher(POLICY, started_at=1000.0)
    assert w.phase is Phase.BASELINE
    assert step(w, 1000.0, None, "slow first nvmlInit").phase is Phase.BASELINE
    phases = [(d.event, d.phase) for d in (
        step(w, 1030.0, OFF), step(w, 1060.0, ON_ONE), step(w, 1062.0, OFF),
        step(w, 1092.0, PENDING_ON), step(w, 1122.0, ON_EMPTY),
    )]  # fmt: skip
    assert phases == [
        (Event.BASELINE, Phase.STEADY), (Event.DIFFERS, Phase.SETTLING),
        (Event.REVERTED, Phase.STEADY), (Event.AWAITS_RESET, Phase.HOLDING),
        (Event.DIFFERS, Phase.HOLDING),
    ]  # fmt: skip
    assert w.phase is Phase.HOLDING


def test_a_trip_during_a_probe_while_holding_in_the_cool_down_probes_at_once():
    """Holding, the tripwire is never held back by the cool-down, also when it fired while a
    probe ran: the next probe follows that probe at once, not at the cool-down's end."""
    w = Watcher(POLICY, started_at=1000.0)
    assert step(w, 1000.0, PENDING_ON).action is Action.HOLD  # cool-down until 1060
    seq = w.begin_probe(1010.0)
    w.trip(1011.0)  # the probe runs: one more follows it
    d = w.observe(1012.0, ProbeResult(seq, PENDING_ON))
    assert d is not None and (d.event, d.next_probe_at) == (Event.AWAITS_RESET, 1012.0)
    assert w.next_probe_at == 1012.0
