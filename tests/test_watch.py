"""The watch policy with a fake clock and scripted probe results: no threads, no sleeps."""

from __future__ import annotations

from dataclasses import replace

from gpu_supervise.probe import ProbeResult
from gpu_supervise.topology import Gpu, MigDevice, Topology
from gpu_supervise.watch import Verdict, Watcher, WatchPolicy


def layout(*profiles: str, gpu_uuid: str = "GPU-0", salt: str = "") -> Topology:
    migs = tuple(
        MigDevice(i, f"MIG-{p}-{i}{salt}", gpu_uuid, 10 + i, 0, int(p[0]), 5000 * int(p[0]), p)
        for i, p in enumerate(profiles)
    )
    return Topology((Gpu(0, gpu_uuid, "A100", "bus", bool(migs), bool(migs), migs),))


def ok(topo: Topology) -> ProbeResult:
    return ProbeResult(0, topo)


def err(text: str = "Unknown Error") -> ProbeResult:
    return ProbeResult(0, None, error=text)


def absent() -> ProbeResult:
    return ProbeResult(0, Topology.absent(), unavailable="NVML is not usable: Driver Not Loaded")


SMALL = layout(*["1g.5gb"] * 7)
BIG = layout("3g.20gb", "3g.20gb")
POLICY = WatchPolicy(interval=30, cooldown=60, settle=5, failure_threshold=3)


def started(policy: WatchPolicy = POLICY, first: ProbeResult | None = None) -> Watcher:
    w = Watcher(policy, started_at=1000.0)
    assert w.next_probe_at == 1000.0  # the baseline is taken at once
    d = w.observe(1000.0, first or ok(SMALL))
    assert d.verdict is Verdict.BASELINE
    return w


def test_cooldown_delays_the_first_comparison_then_interval():
    w = started()
    assert w.next_probe_at == 1060.0
    assert w.observe(1060.0, ok(SMALL)).next_probe_at == 1090.0
    w2 = started(replace(POLICY, cooldown=0))
    assert w2.next_probe_at == 1030.0


def test_state_noise_is_steady():
    w = started()
    noisy = Topology(
        tuple(replace(g, name="x", pci_bus_id="y", mig_pending=False) for g in SMALL.gpus), "999"
    )
    for t in range(1060, 1060 + 30 * 100, 30):
        assert w.observe(float(t), ok(noisy)).verdict is Verdict.STEADY


def test_change_is_confirmed_after_settle_then_acts_once():
    w = started()
    d = w.observe(1060.0, ok(BIG))
    assert (d.verdict, d.next_probe_at, d.act) == (Verdict.SETTLING, 1065.0, False)
    d = w.observe(1065.0, ok(BIG))
    assert d.verdict is Verdict.CHANGED and d.act
    assert d.change.old is SMALL and d.change.new is BIG


def test_settle_zero_acts_at_first_sight():
    w = started(replace(POLICY, settle=0))
    assert w.observe(1060.0, ok(BIG)).verdict is Verdict.CHANGED


def test_multi_step_reconfiguration_folds_into_one_change():
    w = started()
    step1 = layout()  # instances destroyed
    step2 = layout("3g.20gb")  # first new instance
    assert w.observe(1060.0, ok(step1)).verdict is Verdict.SETTLING
    assert w.observe(1065.0, ok(step2)).verdict is Verdict.SETTLING
    assert w.observe(1070.0, ok(BIG)).verdict is Verdict.SETTLING
    d = w.observe(1075.0, ok(BIG))
    assert d.verdict is Verdict.CHANGED and d.change.new is BIG and d.change.old is SMALL


def test_flicker_back_to_baseline_is_no_restart():
    w = started()
    assert w.observe(1060.0, ok(BIG)).verdict is Verdict.SETTLING
    d = w.observe(1065.0, ok(SMALL))
    assert (d.verdict, d.act, d.next_probe_at) == (Verdict.REVERTED, False, 1095.0)


def test_one_or_two_failures_are_tolerated_and_a_success_resets():
    w = started()
    t = 1060.0
    for _ in range(10):
        assert w.observe(t, err()).verdict is Verdict.TOLERATED
        assert w.observe(t + 30, err()).verdict is Verdict.TOLERATED
        assert w.observe(t + 60, ok(SMALL)).verdict is Verdict.STEADY
        t += 90


def test_third_consecutive_failure_acts_with_all_errors():
    w = started()
    w.observe(1060.0, err("Unknown Error"))
    w.observe(1090.0, err("GPU is lost"))
    d = w.observe(1120.0, err("probe did not finish within 10 s"))
    assert d.verdict is Verdict.FAILING and d.act
    assert d.errors == ("Unknown Error", "GPU is lost", "probe did not finish within 10 s")


def test_failed_baseline_retries_every_interval_until_one_succeeds():
    w = Watcher(POLICY, started_at=0.0)
    assert w.observe(0.0, err()).next_probe_at == 30.0
    assert w.observe(30.0, err()).verdict is Verdict.TOLERATED
    d = w.observe(60.0, ok(BIG))
    assert d.verdict is Verdict.BASELINE and w.baseline is BIG


def test_failed_baseline_reaching_the_threshold_acts():
    w = Watcher(POLICY, started_at=0.0)
    w.observe(0.0, err())
    w.observe(30.0, err())
    assert w.observe(60.0, err()).verdict is Verdict.FAILING


def test_no_nvml_at_start_is_a_no_gpu_baseline_and_nvml_appearing_is_a_change():
    w = started(first=absent())
    assert w.baseline.gpus == ()
    for t in (1060.0, 1090.0, 1120.0):  # still absent: steady, never a failure
        assert w.observe(t, absent()).verdict is Verdict.STEADY
    assert w.observe(1150.0, ok(SMALL)).verdict is Verdict.SETTLING
    d = w.observe(1155.0, ok(SMALL))
    assert d.verdict is Verdict.CHANGED and not d.change.is_mig_change


def test_nvml_disappearing_under_a_gpu_baseline_is_a_change():
    w = started()
    w.observe(1060.0, absent())
    d = w.observe(1065.0, absent())
    assert d.verdict is Verdict.CHANGED and "NVML is no longer usable" in d.change.lines


def test_pending_mode_is_reported_once_and_is_not_a_change():
    w = started()
    pending = Topology((replace(SMALL.gpus[0], mig_pending=False),))
    d = w.observe(1060.0, ok(pending))
    assert d.verdict is Verdict.STEADY and [g.uuid for g in d.newly_pending] == ["GPU-0"]
    assert w.observe(1090.0, ok(pending)).newly_pending == ()


def test_failure_while_settling_keeps_the_candidate_and_retries_after_settle():
    w = started()
    w.observe(1060.0, ok(BIG))
    d = w.observe(1065.0, err())
    assert (d.verdict, d.next_probe_at) == (Verdict.TOLERATED, 1070.0)
    assert w.observe(1070.0, ok(BIG)).verdict is Verdict.CHANGED
