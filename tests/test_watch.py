"""The watch policy with a fake clock and scripted probe results: no threads, no sleeps."""

from __future__ import annotations

from dataclasses import replace

from gpu_supervise.probe import ProbeResult
from gpu_supervise.topology import Gpu, MigDevice, Topology
from gpu_supervise.watch import REPORT_EVERY, Action, Decision, Event, Watcher, WatchPolicy


def layout(*profiles: str, gpu_uuid: str = "GPU-0", salt: str = "") -> Topology:
    migs = tuple(
        MigDevice(i, f"MIG-{p}-{i}{salt}", gpu_uuid, 10 + i, 0, int(p[0]), 5000 * int(p[0]), p)
        for i, p in enumerate(profiles)
    )
    return Topology((Gpu(0, gpu_uuid, "A100", "bus", bool(migs), bool(migs), migs),))


def pending(topo: Topology, mode: bool, index: int = 0) -> Topology:
    """GPU `index` with a MIG mode change to `mode` waiting for a reset."""
    gpus = tuple(replace(g, mig_pending=mode) if g.index == index else g for g in topo.gpus)
    return replace(topo, gpus=gpus)


def two_gpus(first: Topology, second: Topology) -> Topology:
    return Topology((first.gpus[0], replace(second.gpus[0], index=1, uuid="GPU-1")))


def ok(topo: Topology) -> ProbeResult:
    return ProbeResult(0, topo)


def err(text: str = "Unknown Error") -> ProbeResult:
    return ProbeResult(0, None, error=text)


def refused(text: str = "nvmlInit: RM has detected an NVML/RM version mismatch.") -> ProbeResult:
    """NVML refusing to start, as it refused the agent's own start."""
    return ProbeResult(0, None, error=text, refused=True)


def absent() -> ProbeResult:
    return ProbeResult(0, Topology.absent(), unavailable="NVML is not usable: Driver Not Loaded")


SMALL = layout(*["1g.5gb"] * 7)
BIG = layout("3g.20gb", "3g.20gb")
OFF = Topology((Gpu(0, "GPU-0", "A100", "bus", False, False),))
ON_EMPTY = Topology((Gpu(0, "GPU-0", "A100", "bus", True, True),))
POLICY = WatchPolicy(interval=30, cooldown=60, settle=5, failure_threshold=3, pending_timeout=300)


def step(w: Watcher, now: float, result: ProbeResult) -> Decision:
    """One probe as the main loop runs it: started now, its result handed over now. Checks what
    holds for every decision: a time for the next probe, no probe left running, tuples."""
    seq = w.begin_probe(now)
    assert w.in_flight == (seq, now + w.policy.probe_timeout)
    decision = w.observe(now, replace(result, seq=seq))
    assert decision is not None
    assert isinstance(decision.next_probe_at, float) and decision.next_probe_at >= now
    assert w.in_flight is None and w.wake_at() == decision.next_probe_at == w.next_probe_at
    assert isinstance(decision.errors, tuple) and isinstance(decision.newly_pending, tuple)
    assert w.probe_due(decision.next_probe_at) and (
        decision.next_probe_at == now or not w.probe_due(now)
    )
    return decision


def started(policy: WatchPolicy = POLICY, first: ProbeResult | None = None) -> Watcher:
    w = Watcher(policy, started_at=1000.0)
    assert w.next_probe_at == 1000.0 and w.probe_due(1000.0)  # the baseline is taken at once
    d = step(w, 1000.0, first or ok(SMALL))
    assert d.event is Event.BASELINE and d.action is Action.NONE
    return w


# -- the policy: its settings, the cool-down and the interval --------------------------------------


def test_the_policy_takes_every_setting():
    from gpu_supervise.config import load

    values = {("watch", "interval"): "7", ("watch", "cooldown"): "11", ("watch", "settle"): "3",
              ("watch", "failure_threshold"): "4", ("watch", "on_pending"): "ignore",
              ("watch", "pending_timeout"): "90", ("watch", "probe_timeout"): "2"}  # fmt: skip
    policy = WatchPolicy.from_settings(load(values, environ={}))
    assert policy == WatchPolicy(
        interval=7.0,
        cooldown=11.0,
        settle=3.0,
        failure_threshold=4,
        on_pending="ignore",
        pending_timeout=90.0,
        probe_timeout=2.0,
    )


def test_cooldown_delays_the_first_comparison_then_interval():
    w = started()
    assert w.next_probe_at == 1060.0 and not w.probe_due(1059.9)
    assert step(w, 1060.0, ok(SMALL)).next_probe_at == 1090.0
    w2 = started(replace(POLICY, cooldown=0))
    assert w2.next_probe_at == 1030.0


def test_description_noise_is_steady():
    """Names, bus ids and the driver version are description, not identity."""
    w = started()
    noisy = Topology(tuple(replace(g, name="x", pci_bus_id="y") for g in SMALL.gpus), "999")
    for t in range(1060, 1060 + 30 * 100, 30):
        assert step(w, float(t), ok(noisy)).event is Event.UNCHANGED


# -- the baseline: NVML failing, refused or absent at the start, a restart cannot help -------------


def test_failures_from_the_start_never_restart_and_are_reported_rarely():
    w = Watcher(POLICY, started_at=0.0)
    loud_at = []
    t = 0.0
    for n in range(10 * POLICY.failure_threshold):  # also well past REPORT_EVERY
        d = step(w, t, refused("RM has detected an NVML/RM version mismatch."))
        assert (d.event, d.action, d.next_probe_at) == (Event.BROKEN, Action.NONE, t + 30)
        assert len(d.errors) == n + 1
        if d.loud:
            loud_at.append(t)
        t += 30
    assert loud_at == [0.0, REPORT_EVERY]
    assert w.baseline is None


def test_nvml_working_after_failing_from_the_start_is_a_change():
    w = Watcher(POLICY, started_at=0.0)
    for t in (0.0, 30.0, 60.0, 90.0):
        step(w, t, refused())
    d = step(w, 120.0, ok(BIG))
    assert (d.event, d.next_probe_at) == (Event.DIFFERS, 125.0)
    d = step(w, 125.0, ok(BIG))
    assert d.event is Event.CHANGED and d.action is Action.RESTART
    assert d.change.old.gpus == () and d.change.new is BIG
    assert "NVML became usable" in d.change.lines and not d.change.is_mig_change


def test_even_one_refused_start_of_nvml_means_the_agent_started_without_it():
    w = Watcher(POLICY, started_at=0.0)
    assert step(w, 0.0, refused()).event is Event.BROKEN
    assert w.refused_at_start
    assert step(w, 30.0, ok(BIG)).event is Event.DIFFERS


def test_a_slow_first_probe_is_a_failure_and_the_next_good_one_is_the_baseline():
    """A first nvmlInit is slow on a node without persistence mode: the baseline probe runs past
    probe_timeout. The agent's NVML is fine, so the next good reading is the baseline, not a
    change from "no GPUs" (which would restart the agent on every start)."""
    w = Watcher(POLICY, started_at=1000.0)
    assert w.refused_at_start is False  # events.py says which promise the ERROR line makes
    w.begin_probe(1000.0)
    d = w.overdue(1010.0)
    assert (d.event, d.action, d.next_probe_at) == (Event.TOLERATED, Action.NONE, 1040.0)
    assert d.errors == ("probe did not finish within 10 s",) and not w.refused_at_start
    d = step(w, 1040.0, ok(SMALL))
    assert (d.event, d.action) == (Event.BASELINE, Action.NONE) and w.baseline is SMALL
    assert step(w, 1070.0, ok(SMALL)).event is Event.UNCHANGED


def test_failures_from_the_start_that_are_not_refusals_count_to_the_threshold_never_restart():
    w = Watcher(POLICY, started_at=0.0)
    assert step(w, 0.0, err()).event is Event.TOLERATED
    assert step(w, 30.0, err()).event is Event.TOLERATED
    for t in (60.0, 90.0):
        d = step(w, t, err())
        assert (d.event, d.action, d.next_probe_at) == (Event.BROKEN, Action.NONE, t + 30)
    assert not w.refused_at_start
    d = step(w, 120.0, ok(BIG))
    assert (d.event, d.action) == (Event.BASELINE, Action.NONE) and w.baseline is BIG


def test_a_refusal_after_other_failures_still_means_the_agent_has_no_nvml():
    w = Watcher(POLICY, started_at=0.0)
    assert step(w, 0.0, err()).event is Event.TOLERATED
    assert step(w, 30.0, refused()).event is Event.BROKEN
    assert step(w, 60.0, err()).event is Event.BROKEN  # still: the agent has none
    assert step(w, 90.0, ok(BIG)).event is Event.DIFFERS


def test_failing_then_unusable_nvml_is_a_quiet_baseline():
    """From failing to "no driver": the agent has no NVML either way; nothing to restart."""
    w = Watcher(POLICY, started_at=0.0)
    step(w, 0.0, refused())
    d = step(w, 30.0, absent())
    assert (d.event, d.action) == (Event.BASELINE, Action.NONE)
    assert step(w, 90.0, absent()).event is Event.UNCHANGED


def test_no_nvml_at_start_is_a_no_gpu_baseline_and_nvml_appearing_is_a_change():
    w = started(first=absent())
    assert w.baseline.gpus == ()
    for t in (1060.0, 1090.0, 1120.0):  # still absent: steady, never a failure
        assert step(w, t, absent()).event is Event.UNCHANGED
    assert step(w, 1150.0, ok(SMALL)).event is Event.DIFFERS
    d = step(w, 1155.0, ok(SMALL))
    assert d.event is Event.CHANGED and not d.change.is_mig_change


def test_nvml_disappearing_under_a_gpu_baseline_is_a_change():
    w = started()
    step(w, 1060.0, absent())
    d = step(w, 1065.0, absent())
    assert d.event is Event.CHANGED and "NVML is no longer usable" in d.change.lines


# -- the settle: a change is confirmed, then acted on once -----------------------------------------


def test_change_is_confirmed_after_settle_then_acts_once():
    w = started()
    d = step(w, 1060.0, ok(BIG))
    assert (d.event, d.next_probe_at, d.action) == (Event.DIFFERS, 1065.0, Action.NONE)
    d = step(w, 1065.0, ok(BIG))
    assert d.event is Event.CHANGED and d.action is Action.RESTART
    assert d.change.old is SMALL and d.change.new is BIG


def test_settle_zero_acts_at_first_sight():
    w = started(replace(POLICY, settle=0))
    assert step(w, 1060.0, ok(BIG)).event is Event.CHANGED


def test_a_settle_under_a_second_still_confirms():
    w = started(replace(POLICY, settle=0.5))
    d = step(w, 1060.0, ok(BIG))
    assert (d.event, d.next_probe_at, d.change.new) == (Event.DIFFERS, 1060.5, BIG)
    assert d.newly_pending == ()
    assert step(w, 1060.5, ok(BIG)).event is Event.CHANGED


def test_multi_step_reconfiguration_folds_into_one_change():
    w = started()
    step1 = layout()  # instances destroyed
    step2 = layout("3g.20gb")  # first new instance
    assert step(w, 1060.0, ok(step1)).event is Event.DIFFERS
    assert step(w, 1065.0, ok(step2)).event is Event.DIFFERS
    assert step(w, 1070.0, ok(BIG)).event is Event.DIFFERS
    d = step(w, 1075.0, ok(BIG))
    assert d.event is Event.CHANGED and d.change.new is BIG and d.change.old is SMALL


def test_flicker_back_to_baseline_is_no_restart_and_the_next_flicker_settles_again():
    w = started()
    assert step(w, 1060.0, ok(BIG)).event is Event.DIFFERS
    d = step(w, 1065.0, ok(SMALL))
    assert (d.event, d.action, d.next_probe_at) == (Event.REVERTED, Action.NONE, 1095.0)
    assert step(w, 1095.0, ok(SMALL)).event is Event.UNCHANGED
    # the candidate went with the revert: the same layout again is a new sighting
    d = step(w, 1125.0, ok(BIG))
    assert (d.event, d.action) == (Event.DIFFERS, Action.NONE)
    assert step(w, 1130.0, ok(BIG)).event is Event.CHANGED


# -- a layout that never stops moving: the settle has an end ---------------------------------------


def churn(n: int) -> Topology:
    """GPU 1 with instances that come and go (a scheduler, dynamic MIG): new ones every time."""
    return layout("1g.5gb", salt=f"-{n}") if n % 2 else OFF


def act_in_churn(w: Watcher, start: float, reading, until: float = 3e3) -> tuple[float, Decision]:
    """The tripwire fires every second and every probe sees `reading(t)`: when the policy acts."""
    t = start
    while t < until:
        w.trip(t)
        if w.probe_due(t):
            d = step(w, t, ok(reading(t)))
            if d.action is not Action.NONE:
                return t, d
        t += 1.0
    raise AssertionError("never acted")


def test_a_change_amid_instances_coming_and_going_is_acted_on_within_interval_plus_settle():
    base = two_gpus(SMALL, OFF)
    w = started(first=ok(base))
    assert step(w, 1060.0, ok(two_gpus(BIG, OFF))).event is Event.DIFFERS  # GPU 0 changed
    acted, d = act_in_churn(w, 1061.0, lambda t: two_gpus(BIG, churn(int(t))))
    assert acted <= 1060.0 + 30 + 5 and (d.event, d.action) == (Event.CHANGED, Action.RESTART)
    assert d.change.old is base and d.change.new.gpus[0] == BIG.gpus[0]


def test_a_tree_that_keeps_moving_under_a_steady_reading_still_confirms_by_the_limit():
    """The listing moves every second (instances created and destroyed between probes), the
    readings do not: each trip pushes the settle, but never past `settle_by`."""
    w = started(first=ok(two_gpus(SMALL, OFF)))
    step(w, 1060.0, ok(two_gpus(BIG, OFF)))
    assert w.settle_by == 1095.0
    w.trip(1093.0)
    assert w.settled_at == 1095.0 and w.next_probe_at == 1095.0  # not 1098
    acted, d = act_in_churn(w, 1061.0, lambda t: two_gpus(BIG, OFF))
    assert (acted, d.event) == (1095.0, Event.CHANGED)


def test_a_settle_that_confirms_early_is_not_held_to_the_limit():
    w = started()
    step(w, 1060.0, ok(BIG))
    assert (w.settled_at, w.settle_by) == (1065.0, 1095.0)
    assert step(w, 1065.0, ok(BIG)).event is Event.CHANGED


def test_a_withdrawn_change_amid_churn_ends_the_hold_at_its_deadline():
    """GPU 0's pending change is withdrawn 20 s before the hold's deadline while GPU 1's
    instances come and go: the agent is not kept stopped past pending_timeout."""
    base = two_gpus(OFF, OFF)
    w = started(first=ok(base))
    step(w, 1060.0, ok(pending(base, True, index=0)))  # until 1360
    for t in (1090.0, 1120.0, 1150.0, 1180.0, 1210.0, 1240.0, 1270.0, 1300.0, 1330.0):
        assert step(w, t, ok(pending(base, True, index=0))).event is Event.AWAITS_RESET
    acted, d = act_in_churn(w, 1340.0, lambda t: two_gpus(OFF, churn(int(t))))
    assert acted <= 1360.0 and (d.event, d.action) == (Event.RELEASED, Action.RESTART)


def test_a_reset_amid_churn_releases_within_interval_plus_settle():
    base = two_gpus(OFF, OFF)
    w = started(first=ok(base))
    step(w, 1060.0, ok(pending(base, True, index=0)))
    acted, d = act_in_churn(w, 1090.0, lambda t: two_gpus(ON_EMPTY, churn(int(t))))
    assert acted <= 1090.0 + 35 and (d.event, d.action) == (Event.RELEASED, Action.RESTART)
    assert d.change.new.gpus[0].mig_current


def test_a_release_first_seen_past_the_deadline_still_gets_its_settle():
    """NVML failed across the hold's deadline; the first good reading shows the reset done:
    it is confirmed `settle` later, as ever, not taken unconfirmed."""
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    step(w, 1330.0, err())
    assert step(w, 1360.0, err()).next_probe_at == 1390.0
    d = step(w, 1390.0, ok(ON_EMPTY))
    assert (d.event, d.next_probe_at) == (Event.DIFFERS, 1395.0)
    assert step(w, 1395.0, ok(ON_EMPTY)).event is Event.RELEASED


# -- failures: a few are tolerated, then the agent is restarted ------------------------------------


def test_one_or_two_failures_are_tolerated_and_a_success_resets():
    w = started()
    t = 1060.0
    for _ in range(10):
        d = step(w, t, err())
        assert (d.event, d.next_probe_at, d.errors) == (
            Event.TOLERATED,
            t + 30,
            ("Unknown Error",),
        )
        assert step(w, t + 30, err()).event is Event.TOLERATED
        assert step(w, t + 60, ok(SMALL)).event is Event.UNCHANGED
        t += 90


def test_a_failure_without_a_message_still_says_what_failed():
    w = started()
    assert step(w, 1060.0, err("")).errors == ("probe failed",)


def test_third_consecutive_failure_after_a_baseline_restarts_with_all_errors():
    w = started()
    step(w, 1060.0, err("Unknown Error"))
    step(w, 1090.0, err("GPU is lost"))
    d = step(w, 1120.0, err("probe did not finish within 10 s"))
    assert d.event is Event.FAILING and d.action is Action.RESTART
    assert d.errors == ("Unknown Error", "GPU is lost", "probe did not finish within 10 s")


def test_failure_while_settling_keeps_the_candidate_and_retries_after_settle():
    w = started()
    step(w, 1060.0, ok(BIG))
    d = step(w, 1065.0, err())
    assert (d.event, d.next_probe_at) == (Event.TOLERATED, 1070.0)
    assert step(w, 1070.0, ok(BIG)).event is Event.CHANGED


def test_a_probe_stuck_while_running_is_a_failure_like_any_other():
    w = started()
    w.begin_probe(1060.0)
    d = w.overdue(1070.0)
    assert (d.event, d.action) == (Event.TOLERATED, Action.NONE)


# -- only the running probe's answer counts --------------------------------------------------------


def test_a_late_answer_from_a_probe_that_missed_its_deadline_is_ignored():
    w = started()
    late = w.begin_probe(1060.0)
    assert w.overdue(1069.9) is None  # probe_timeout is 10 s
    d = w.overdue(1070.0)
    assert d.event is Event.TOLERATED and d.errors == ("probe did not finish within 10 s",)
    assert w.overdue(1080.0) is None  # counted once
    # its answer arrives after all, showing a change: it is not the current probe's
    assert w.observe(1071.0, ProbeResult(late, BIG)) is None
    current = w.begin_probe(1100.0)
    assert w.observe(1100.5, ProbeResult(late, BIG)) is None
    d = w.observe(1101.0, ProbeResult(current, SMALL))
    assert d.event is Event.UNCHANGED and w.errors == []


def test_the_next_probe_waits_for_the_running_one():
    w = started()
    w.begin_probe(1060.0)
    assert not w.probe_due(2000.0) and w.wake_at() == 1070.0


# -- the hold: a MIG mode change pending a GPU reset -----------------------------------------------


def test_ignore_mode_reports_a_change_pending_at_the_baseline():
    w = Watcher(replace(POLICY, on_pending="ignore"), started_at=1000.0)
    d = step(w, 1000.0, ok(pending(OFF, True)))
    assert (d.event, d.action) == (Event.BASELINE, Action.NONE)
    assert [g.uuid for g in d.newly_pending] == ["GPU-0"]
    assert step(w, 1060.0, ok(pending(OFF, True))).newly_pending == ()


def test_ignore_mode_reports_a_pending_change_that_comes_with_a_change():
    w = started(replace(POLICY, on_pending="ignore"))
    d = step(w, 1060.0, ok(pending(BIG, False)))
    assert d.event is Event.DIFFERS and [g.uuid for g in d.newly_pending] == ["GPU-0"]


def test_ignore_mode_reports_a_pending_change_once_and_keeps_going():
    w = started(replace(POLICY, on_pending="ignore"))
    d = step(w, 1060.0, ok(pending(SMALL, False)))
    assert d.event is Event.UNCHANGED and d.action is Action.NONE
    assert [g.uuid for g in d.newly_pending] == ["GPU-0"]
    assert step(w, 1090.0, ok(pending(SMALL, False))).newly_pending == ()


def test_a_pending_change_holds_and_the_reset_releases_with_one_restart():
    w = started(first=ok(OFF))
    d = step(w, 1060.0, ok(pending(OFF, True)))
    assert (d.event, d.action) == (Event.AWAITS_RESET, Action.HOLD)
    assert [(g.uuid, g.mig_pending) for g in d.newly_pending] == [("GPU-0", True)]
    assert w.hold.until == 1360.0
    for t in (1090.0, 1120.0):  # the reset has not happened yet
        d = step(w, t, ok(pending(OFF, True)))
        assert (d.event, d.action, d.newly_pending) == (Event.AWAITS_RESET, Action.NONE, ())
    # the reset: MIG is on, no instances yet; confirmed `settle` later
    d = step(w, 1150.0, ok(ON_EMPTY))
    assert (d.event, d.action, d.next_probe_at) == (Event.DIFFERS, Action.NONE, 1155.0)
    assert d.change.new is ON_EMPTY  # what the log shows while confirming
    d = step(w, 1155.0, ok(ON_EMPTY))
    assert (d.event, d.action) == (Event.RELEASED, Action.RESTART)
    assert d.change.old is OFF and d.change.new is ON_EMPTY
    assert w.hold is None and w.candidate is None


def test_with_settle_zero_the_release_needs_no_confirmation():
    w = started(replace(POLICY, settle=0), first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    assert step(w, 1090.0, ok(ON_EMPTY)).event is Event.RELEASED


def test_with_a_short_settle_the_release_is_still_confirmed():
    w = started(replace(POLICY, settle=0.5), first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    d = step(w, 1090.0, ok(ON_EMPTY))
    assert (d.event, d.next_probe_at) == (Event.DIFFERS, 1090.5)
    assert step(w, 1090.5, ok(ON_EMPTY)).event is Event.RELEASED


def test_another_gpu_pending_during_a_hold_is_reported():
    base = two_gpus(OFF, OFF)
    w = started(first=ok(base))
    step(w, 1060.0, ok(pending(base, True, index=0)))
    both = pending(pending(base, True, index=0), True, index=1)
    d = step(w, 1090.0, ok(both))
    assert (d.event, d.action) == (Event.AWAITS_RESET, Action.NONE)
    assert [g.uuid for g in d.newly_pending] == ["GPU-1"]


def test_the_release_waits_for_the_instances_created_right_after_the_reset():
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    assert step(w, 1090.0, ok(ON_EMPTY)).event is Event.DIFFERS
    assert step(w, 1095.0, ok(layout("3g.20gb"))).event is Event.DIFFERS
    assert step(w, 1100.0, ok(BIG)).event is Event.DIFFERS
    d = step(w, 1105.0, ok(BIG))
    assert d.event is Event.RELEASED and d.change.new is BIG


def test_a_pending_change_back_while_confirming_keeps_holding():
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    assert step(w, 1090.0, ok(OFF)).event is Event.DIFFERS
    d = step(w, 1095.0, ok(pending(OFF, True)))
    assert (d.event, d.action) == (Event.AWAITS_RESET, Action.NONE)
    assert step(w, 1125.0, ok(OFF)).event is Event.DIFFERS  # a new confirmation


def test_a_withdrawn_pending_change_releases_without_a_change():
    w = started()
    step(w, 1060.0, ok(pending(SMALL, False)))
    step(w, 1090.0, ok(SMALL))
    d = step(w, 1095.0, ok(SMALL))
    assert (d.event, d.action, d.change) == (Event.RELEASED, Action.RESTART, None)


def test_a_change_pending_at_the_baseline_holds_at_once():
    w = Watcher(POLICY, started_at=1000.0)
    d = step(w, 1000.0, ok(pending(OFF, True)))
    assert (d.event, d.action) == (Event.BASELINE, Action.HOLD)
    assert w.baseline is not None and w.next_probe_at == 1030.0


def test_a_change_seen_while_settling_gives_way_to_the_hold():
    w = started()
    assert step(w, 1060.0, ok(BIG)).event is Event.DIFFERS
    d = step(w, 1065.0, ok(pending(BIG, False)))
    assert (d.event, d.action) == (Event.AWAITS_RESET, Action.HOLD)
    assert w.candidate is None


def test_failures_while_holding_never_restart():
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    for n, t in enumerate((1090.0, 1120.0, 1150.0, 1180.0)):
        d = step(w, t, err("GPU is lost"))  # a reset makes NVML fail for a while
        assert (d.event, d.action) == (Event.TOLERATED, Action.NONE)
        assert d.errors == ("GPU is lost",) * (n + 1)
    assert step(w, 1210.0, ok(ON_EMPTY)).event is Event.DIFFERS


def test_failures_past_the_hold_deadline_carry_their_errors():
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    d = step(w, 1360.0, err("GPU is lost"))
    assert (d.event, d.errors) == (Event.TOLERATED, ("GPU is lost",))


# -- the hold's timeout and each GPU's allowance ---------------------------------------------------


def test_a_hold_times_out_and_gives_the_agent_back_without_holding_again():
    w = started(first=ok(OFF))
    stuck = pending(OFF, True)
    step(w, 1060.0, ok(stuck))
    d = step(w, 1330.0, ok(stuck))
    assert d.next_probe_at == 1360.0  # never past the deadline
    d = step(w, 1360.0, ok(stuck))
    assert (d.event, d.action) == (Event.TIMED_OUT, Action.RESUME)
    assert [g.uuid for g in d.newly_pending] == ["GPU-0"]
    assert w.hold is None and w.baseline is stuck
    for t in (1390.0, 1420.0):  # the same pending change: no second hold
        d = step(w, t, ok(stuck))
        assert (d.event, d.action) == (Event.UNCHANGED, Action.NONE)
    # once it cleared, the same GPU holds again
    assert step(w, 1450.0, ok(OFF)).action is Action.NONE
    assert step(w, 1480.0, ok(stuck)).action is Action.HOLD


def test_after_a_timeout_another_gpus_pending_change_holds():
    base = two_gpus(OFF, OFF)
    w = started(first=ok(base))
    step(w, 1060.0, ok(pending(base, True, index=0)))
    assert step(w, 1360.0, ok(pending(base, True, index=0))).action is Action.RESUME
    both = pending(pending(base, True, index=0), True, index=1)
    d = step(w, 1390.0, ok(both))
    assert d.action is Action.HOLD and [g.uuid for g in d.newly_pending] == ["GPU-1"]


def test_after_a_second_gpus_hold_times_out_neither_is_held_for_again():
    """GPU 0's hold timed out; GPU 1 went pending and its own hold timed out too: GPU 0, still
    pending, was held out before and stays so; the agent is not stopped again for either."""
    base = two_gpus(OFF, OFF)
    w = started(first=ok(base))
    first = pending(base, True, index=0)
    both = pending(first, True, index=1)
    step(w, 1060.0, ok(first))
    assert step(w, 1360.0, ok(first)).action is Action.RESUME
    assert step(w, 1390.0, ok(both)).action is Action.HOLD  # GPU 1 alone
    assert [g.uuid for g in w.hold.gpus] == ["GPU-1"] and w.hold.until == 1690.0
    d = step(w, 1690.0, ok(both))
    assert (d.event, d.action) == (Event.TIMED_OUT, Action.RESUME)
    assert [g.uuid for g in d.newly_pending] == ["GPU-1"]
    for t in (1720.0, 1750.0, 2050.0):
        d = step(w, t, ok(both))
        assert (d.event, d.action, d.newly_pending) == (Event.UNCHANGED, Action.NONE, ())
    # GPU 1's pending change cleared and came back: GPU 1 holds again, GPU 0 still does not
    assert step(w, 2080.0, ok(first)).action is Action.NONE
    d = step(w, 2110.0, ok(both))
    assert d.action is Action.HOLD and [g.uuid for g in d.newly_pending] == ["GPU-1"]


def test_nvml_failing_at_the_deadline_lets_the_failure_rule_decide_first():
    """Past the hold's deadline with NVML failing, starting the agent would only have it
    stopped by the next failures: the failure rule decides first."""
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    assert step(w, 1300.0, err()).event is Event.TOLERATED  # a reset under way
    d = step(w, 1330.0, err())
    assert (d.event, d.action, d.next_probe_at) == (Event.TOLERATED, Action.NONE, 1360.0)
    d = step(w, 1360.0, err())  # the deadline, and the third failure in a row
    assert (d.event, d.action) == (Event.FAILING, Action.RESTART)
    assert d.errors == ("Unknown Error",) * 3 and w.hold is None


def test_one_failure_at_the_deadline_waits_for_an_answer_before_starting_the_agent():
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    d = step(w, 1360.0, err())
    assert (d.event, d.action, d.next_probe_at) == (Event.TOLERATED, Action.NONE, 1390.0)
    d = step(w, 1390.0, ok(pending(OFF, True)))  # NVML answers: still pending, timed out
    assert (d.event, d.action) == (Event.TIMED_OUT, Action.RESUME)
    assert w.hold is None and w.errors == []
    d = step(w, 1420.0, ok(pending(OFF, True)))  # the same pending change: no second hold
    assert (d.event, d.action) == (Event.UNCHANGED, Action.NONE)


def test_a_failure_just_before_the_deadline_never_pushes_the_timeout_past_it():
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    d = step(w, 1350.0, err())
    assert d.next_probe_at == 1360.0  # the deadline, not an interval later
    assert step(w, 1360.0, ok(pending(OFF, True))).action is Action.RESUME


def test_each_gpu_that_goes_pending_gets_its_own_allowance():
    """GPU 1 goes pending 180 s into a hold for GPU 0: at GPU 0's deadline the agent stays
    stopped (GPU 1's reset would be blocked by it), and the timeout names both."""
    base = two_gpus(OFF, OFF)
    w = started(first=ok(base))
    first = pending(base, True, index=0)
    both = pending(first, True, index=1)
    step(w, 1060.0, ok(first))
    d = step(w, 1240.0, ok(both))
    assert [g.uuid for g in d.newly_pending] == ["GPU-1"] and d.next_probe_at == 1270.0
    assert w.hold.until == 1540.0
    d = step(w, 1360.0, ok(both))  # GPU 0's allowance is over, GPU 1's is not
    assert (d.event, d.action) == (Event.AWAITS_RESET, Action.NONE)
    d = step(w, 1510.0, ok(both))
    assert d.next_probe_at == 1540.0
    d = step(w, 1540.0, ok(both))
    assert (d.event, d.action) == (Event.TIMED_OUT, Action.RESUME)
    assert [g.uuid for g in d.newly_pending] == ["GPU-0", "GPU-1"]
    for t in (1570.0, 1600.0):  # neither is held for again
        assert step(w, t, ok(both)).action is Action.NONE


def test_a_gpu_whose_reset_came_gives_up_its_allowance():
    """GPU 0's reset goes through while GPU 1 still waits: the hold goes on for GPU 1 alone."""
    base = two_gpus(OFF, OFF)
    w = started(first=ok(base))
    step(w, 1060.0, ok(pending(base, True, index=0)))
    both = pending(pending(base, True, index=0), True, index=1)
    step(w, 1300.0, ok(both))
    reset0 = pending(two_gpus(ON_EMPTY, OFF), True, index=1)
    d = step(w, 1330.0, ok(reset0))
    assert (d.event, d.action) == (Event.AWAITS_RESET, Action.NONE)
    assert [g.uuid for g in w.hold.gpus] == ["GPU-1"] and w.hold.until == 1600.0
    # GPU 1's allowance ends, but GPU 0's mode change took effect: a topology change (the
    # container must be made again for it), never a new baseline for an agent in place
    d = step(w, 1600.0, ok(reset0))
    assert (d.event, d.action, d.next_probe_at) == (Event.DIFFERS, Action.NONE, 1605.0)
    d = step(w, 1605.0, ok(reset0))
    assert (d.event, d.action) == (Event.CHANGED, Action.RESTART)
    assert d.change.old is base and d.change.new is reset0 and w.hold is None
    assert d.change.lines == ("GPU 0 GPU-0 (A100): MIG mode off -> on",)


def test_a_reset_as_another_gpus_allowance_runs_out_is_a_change_not_a_new_baseline():
    """Two A100s: GPU 0 pending at start, GPU 1 pending 3 s later, pending_timeout 6 s; GPU 1's
    reset happens at 7 s, with GPU 0 still pending past its allowance. GPU 1's mode change took
    effect: the change line and exit 1, not the agent started again on the new layout."""
    base = two_gpus(OFF, OFF)
    w = Watcher(replace(POLICY, pending_timeout=6), started_at=1000.0)
    d = step(w, 1000.0, ok(pending(base, True, index=0)))
    assert (d.action, d.next_probe_at) == (Action.HOLD, 1006.0)
    w.trip(1003.0)
    both = pending(pending(base, True, index=0), True, index=1)
    assert step(w, 1003.0, ok(both)).event is Event.AWAITS_RESET
    assert w.hold.until == 1009.0
    w.trip(1007.0)  # GPU 1's reset
    reset1 = pending(two_gpus(OFF, ON_EMPTY), True, index=0)
    d = step(w, 1007.0, ok(reset1))
    assert (d.event, d.action, d.next_probe_at) == (Event.DIFFERS, Action.NONE, 1012.0)
    assert d.change.new is reset1
    d = step(w, 1012.0, ok(reset1))
    assert (d.event, d.action) == (Event.CHANGED, Action.RESTART)
    assert d.change.old is w.baseline and d.change.new is reset1
    assert d.change.lines == ("GPU 1 GPU-1 (A100): MIG mode off -> on",)


def test_a_reset_amid_a_timed_out_gpu_that_flips_back_is_a_timeout_after_all():
    """While confirming such a change the reading goes back to the baseline (the mode change
    reverted): only the timeout is left, the agent starts again in place."""
    base = two_gpus(OFF, OFF)
    w = Watcher(replace(POLICY, pending_timeout=6), started_at=1000.0)
    step(w, 1000.0, ok(pending(base, True, index=0)))
    step(w, 1006.0, ok(pending(two_gpus(OFF, ON_EMPTY), True, index=0)))
    d = step(w, 1011.0, ok(pending(base, True, index=0)))
    assert (d.event, d.action) == (Event.TIMED_OUT, Action.RESUME)


# -- a probe stuck while holding -------------------------------------------------------------------


def test_a_probe_stuck_in_nvml_while_holding_restarts():
    """A probe past its deadline while holding: its thread is inside NVML with NVML open, so
    gpu-supervise is now the client blocking the reset. Only an exit releases it."""
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    w.begin_probe(1090.0)
    assert w.overdue(1099.0) is None
    d = w.overdue(1100.0)
    assert (d.event, d.action) == (Event.STUCK, Action.RESTART)
    assert d.errors == ("probe did not finish within 10 s",)


def test_a_stuck_probe_decides_at_once_with_its_error():
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))
    w.begin_probe(1090.0)
    d = w.overdue(1100.0)
    assert d.next_probe_at == 1100.0 and w.next_probe_at == 1100.0


# -- the tripwire: the driver's listing changed ----------------------------------------------------


def ok_seq(topo: Topology, seq: int) -> ProbeResult:
    return ProbeResult(seq, topo)


def test_a_trip_makes_the_next_probe_come_at_once():
    w = started()
    step(w, 1060.0, ok(SMALL))  # steady: the next probe at 1090
    w.trip(1065.0)
    assert w.next_probe_at == 1065.0 and w.probe_due(1065.0)
    d = step(w, 1065.0, ok(BIG))
    assert (d.event, d.next_probe_at) == (Event.DIFFERS, 1070.0)  # the settle as ever
    assert step(w, 1070.0, ok(BIG)).event is Event.CHANGED


def test_a_trip_during_the_cooldown_waits_for_its_end():
    w = started()
    w.trip(1010.0)
    assert w.next_probe_at == 1060.0  # recorded: the probe comes when the cool-down ends


def test_a_trip_while_settling_starts_the_settle_again():
    """The listing moves while a change settles: the reconfiguration is still going on, so the
    confirmation waits `settle` from the latest movement, and an earlier reading of the same
    layout (the tripwire hurried it) confirms nothing."""
    w = started()
    assert step(w, 1060.0, ok(BIG)).next_probe_at == 1065.0
    w.trip(1063.0)
    assert w.next_probe_at == 1068.0
    d = step(w, 1066.0, ok(BIG))  # the same layout, too early
    assert (d.event, d.action, d.next_probe_at) == (Event.DIFFERS, Action.NONE, 1068.0)
    assert step(w, 1068.0, ok(BIG)).event is Event.CHANGED


def test_a_trip_during_a_probe_that_begins_a_settle_keeps_the_settle():
    w = started()
    seq = w.begin_probe(1060.0)
    w.trip(1060.5)
    d = w.observe(1061.0, ok_seq(BIG, seq))
    assert (d.event, d.next_probe_at) == (Event.DIFFERS, 1066.0)  # not at once


def test_a_trip_while_a_probe_runs_brings_one_more_probe_after_it():
    w = started()
    seq = w.begin_probe(1060.0)  # it may have read before the change
    w.trip(1060.5)
    d = w.observe(1061.0, ok_seq(SMALL, seq))
    assert (d.event, d.next_probe_at, w.next_probe_at) == (Event.UNCHANGED, 1061.0, 1061.0)
    d = step(w, 1061.0, ok(SMALL))
    assert d.next_probe_at == 1091.0  # and only one


def test_a_trip_during_a_probe_that_goes_overdue_brings_one_more_at_once():
    w = started()
    w.begin_probe(1060.0)
    w.trip(1061.0)
    d = w.overdue(1070.0)
    assert (d.event, d.next_probe_at) == (Event.TOLERATED, 1070.0)


def test_a_trip_while_holding_probes_at_once():
    w = started(first=ok(OFF))
    step(w, 1060.0, ok(pending(OFF, True)))  # next hold probe at 1090
    w.trip(1070.0)  # instances created right after the reset
    assert w.next_probe_at == 1070.0
    assert step(w, 1070.0, ok(BIG)).event is Event.DIFFERS


def test_a_trip_while_holding_in_the_cooldown_probes_at_once():
    w = Watcher(POLICY, started_at=1000.0)
    step(w, 1000.0, ok(pending(OFF, True)))  # held from the baseline, inside the cool-down
    w.trip(1010.0)
    assert w.next_probe_at == 1010.0


def test_a_trip_never_decides_by_itself():
    w = started()
    step(w, 1060.0, ok(SMALL))
    for t in (1061.0, 1062.0, 1063.0):
        w.trip(t)
        d = step(w, t, ok(SMALL))
        assert (d.event, d.action) == (Event.UNCHANGED, Action.NONE)
