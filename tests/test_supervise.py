"""The QA plan end to end: the installed gpu-supervise, a real agent child, the fake NVML
node file rewritten while it runs."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest

from conftest import AGENT, FakeNode, Proc, log_stamp, pid_alive
from fakenvml import GPU_IS_LOST, UNKNOWN, Node, dgx_a100

FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0.3", "--log-level", "DEBUG"]
_UUIDS = r"\(Old UUIDs: \[(?P<old>[^\]]*)\], New UUIDs: \[(?P<new>[^\]]*)\]\)"
PRD_MIG = re.compile(
    r"\[GPU-Watcher\] MIG configuration change detected " + _UUIDS + r"\. Initiating self-restart\."
)
PRD_GPU = re.compile(
    r"\[GPU-Watcher\] GPU topology change detected " + _UUIDS + r"\. Initiating self-restart\."
)

Start = Callable[..., Proc]


def supervise(start: Start, fake_node: FakeNode, *opts: str, agent: tuple[str, ...] = ()) -> Proc:
    proc = start([*FAST, *opts, "--", *AGENT, *agent], fake_node.env)
    proc.wait_for("agent ")
    proc.wait_for("[GPU-Watcher] baseline")
    return proc


def uuid_list(text: str) -> list[str]:
    return [u for u in text.split(", ") if u]


def probes_seen(proc: Proc) -> int:
    return proc.output.count("topology unchanged")


def wait_probes(proc: Proc, n: int, timeout: float = 60.0) -> None:
    target = probes_seen(proc) + n
    proc.wait_for("topology unchanged", timeout=timeout, count=target)


def assert_restarted(proc: Proc, old: Node, new: Node, pattern: re.Pattern[str] = PRD_MIG) -> None:
    code = proc.wait(60)
    out = proc.output
    assert code == 1, out
    match = pattern.search(out)
    assert match, out
    assert uuid_list(match["old"]) == old.uuids()
    assert uuid_list(match["new"]) == new.uuids()
    assert out.count("Initiating self-restart.") == 1
    assert "got SIGTERM" in out  # the agent was stopped before we exited


# -- QA 1-3: enable, reconfigure, disable ------------------------------------------------------


def test_mig_enable_on_a_non_mig_gpu(start: Start, fake_node: FakeNode):
    old = dgx_a100()
    fake_node.write(old)
    proc = supervise(start, fake_node)
    new = old.copy()
    new.gpu(2).set_layout(["1g.5gb"] * 7)
    fake_node.write(new)
    assert_restarted(proc, old, new)
    assert "MIG mode off -> on" in proc.output


def test_reconfiguration_1g5gb_to_3g20gb(start: Start, fake_node: FakeNode):
    old = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(old)
    proc = supervise(start, fake_node)
    new = old.copy()
    new.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(new)
    assert_restarted(proc, old, new)
    assert "MIG devices 7x1g.5gb -> 2x3g.20gb" in proc.output


def test_mig_disable(start: Start, fake_node: FakeNode):
    old = dgx_a100(["3g.20gb"] * 2, ["7g.40gb"])
    fake_node.write(old)
    proc = supervise(start, fake_node)
    new = old.copy()
    new.gpu(1).set_layout(None)
    fake_node.write(new)
    assert_restarted(proc, old, new)
    assert "MIG mode on -> off" in proc.output


def test_gpu_lost_is_a_topology_change(start: Start, fake_node: FakeNode):
    old = dgx_a100()
    fake_node.write(old)
    proc = supervise(start, fake_node)
    new = old.copy()
    new.gpus.pop()
    fake_node.write(new)
    assert_restarted(proc, old, new, PRD_GPU)
    assert ": lost" in proc.output


def test_nvml_appearing_after_start_is_a_change(start: Start, fake_node: FakeNode):
    fake_node.write(dgx_a100().fail("nvmlInit", 9))  # driver not loaded yet
    proc = supervise(start, fake_node)
    out = proc.output
    assert "WARNING [GPU-Watcher] baseline: no GPUs (NVML is not usable: Driver Not Loaded)" in out
    wait_probes(proc, 5)  # an absent NVML is steady, not a failure
    assert "probe failed" not in proc.output
    new = dgx_a100()
    fake_node.write(new)
    assert_restarted(proc, Node([]), new, PRD_GPU)
    assert "NVML became usable" in proc.output


def test_settle_folds_a_three_step_reconfiguration_into_one_exit(start: Start, fake_node: FakeNode):
    old = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(old)
    # A change is acted on at the latest interval + settle after its first sighting: a long
    # interval leaves room for a loaded machine's steps (the tripwire sees each one at once).
    proc = supervise(start, fake_node, "--settle", "1.5", "--interval", "20")
    steps = [[], ["3g.20gb"], ["3g.20gb"] * 2]
    for profiles in steps:
        node = old.copy()
        node.gpu(0).set_layout(profiles)
        fake_node.write(node)
        proc.wait_for("confirming in 1.5 s", count=steps.index(profiles) + 1)
    assert_restarted(proc, old, node)
    assert proc.output.count("topology differs from the baseline") >= 3


def test_cooldown_is_respected(start: Start, fake_node: FakeNode):
    old = dgx_a100(["1g.5gb"] * 7)
    new = old.copy()
    new.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(old)
    proc = start(
        ["--interval", "0.2", "--cooldown", "3", "--settle", "0", "--", *AGENT], fake_node.env
    )
    proc.wait_for("[GPU-Watcher] baseline")
    fake_node.write(new)  # changed right after the baseline, well inside the cool-down
    assert proc.wait(60) == 1
    lines = proc.log_lines()
    stamps = {
        key: log_stamp(lines, marker)
        # "started" is logged before the watcher's clock starts: a strict lower bound
        for key, marker in (("start", "INFO    started "), ("act", "Initiating self-restart"))
    }
    took = (stamps["act"] - stamps["start"]).total_seconds()
    assert took >= 3.0 - 0.002  # ms-rounded stamps
    assert took <= 3.0 + 2.0  # and the first comparison comes at its end, not much later


# -- QA 4: noise and failures --------------------------------------------------------------


def test_noise_never_restarts(start: Start, fake_node: FakeNode):
    node = dgx_a100(["1g.5gb"] * 7, ["3g.20gb"] * 2)
    fake_node.write(node)
    proc = supervise(start, fake_node)
    # Temperature and P-state move every round. gpu-supervise never reads them, so this part
    # cannot fail whatever the code does: it documents the PRD's "state changes are ignored".
    # The evidence is test_topology's identity tests and the errors and delays below.
    for round_ in range(6):
        for gpu in node.gpus:
            gpu.temp, gpu.pstate = 30 + round_ * 7 % 50, round_ % 12
        node.rules = []
        fake_node.write(node)
        wait_probes(proc, 3)
    for failures in (1, 2, 1, 2):  # isolated errors, each followed by good probes
        fake_node.write(node.copy().fail("nvmlDeviceGetCount", UNKNOWN, count=failures))
        proc.wait_for_new(f"({failures}/3 consecutive)")
        wait_probes(proc, 3)
    fake_node.write(node.copy().delay(20, fn="nvmlDeviceGetUUID"))  # slow, inside the deadline
    wait_probes(proc, 5)
    assert proc.popen.poll() is None, proc.output
    assert "Initiating self-restart" not in proc.output
    assert probes_seen(proc) >= 6 * 3 + 4 * 3 + 5


def test_three_consecutive_errors_restart(start: Start, fake_node: FakeNode):
    node = dgx_a100()
    fake_node.write(node)
    proc = supervise(start, fake_node)
    fake_node.write(node.copy().fail("nvmlDeviceGetUUID", GPU_IS_LOST, count=3))
    assert proc.wait(60) == 1
    out = proc.output
    assert "(1/3 consecutive): GPU is lost" in out and "(2/3 consecutive)" in out
    assert "NVML failed 3 consecutive probes (errors: GPU is lost" in out
    assert "Initiating self-restart." in out and "got SIGTERM" in out


def test_answers_too_slow_for_the_deadline_are_failures(start: Start, fake_node: FakeNode):
    node = dgx_a100()
    fake_node.write(node)
    proc = supervise(start, fake_node, "--probe-timeout", "0.5")
    fake_node.write(node.copy().delay(150, fn="nvmlDeviceGetUUID"))  # 8 GPUs x 150 ms > 0.5 s
    assert proc.wait(60) == 1
    assert "probe did not finish within 0.5 s" in proc.output


def test_hanging_call_counts_as_failures_and_the_child_is_gone(
    start: Start, fake_node: FakeNode, tmp_path
):
    node = dgx_a100()
    fake_node.write(node)
    pidfile = tmp_path / "pids"
    proc = supervise(start, fake_node, "--probe-timeout", "0.5", agent=("--pidfile", str(pidfile)))
    agent_pid = int(pidfile.read_text().split()[0])
    fake_node.write(node.copy().hang("nvmlDeviceGetCount"))
    assert proc.wait(60) == 1
    out = proc.output
    assert "probe did not finish within 0.5 s" in out
    assert "previous probe is still hanging in NVML" in out
    assert "NVML failed 3 consecutive probes" in out
    assert not pid_alive(agent_pid)


def test_exit_code_and_child_code_with_watching(start: Start, fake_node: FakeNode):
    fake_node.write(dgx_a100())
    proc = start([*FAST, "--", *AGENT, "--run", "0.5", "--exit", "7"], fake_node.env)
    assert proc.wait(60) == 7


# -- the PRD's success criterion -------------------------------------------------------------


def test_restart_loop_brings_the_new_uuids_and_steady_state_never_restarts(
    start: Start, fake_node: FakeNode
):
    """What Kubernetes, systemd and Docker do: start again whenever it exits 1."""
    old = dgx_a100(["1g.5gb"] * 7, ["2g.10gb"] * 3)
    fake_node.write(old)
    proc = supervise(start, fake_node)
    assert f"UUIDs {' '.join(old.uuids())}" in proc.output
    new = old.copy()
    new.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(new)
    assert proc.wait(60) == 1
    # the restart policy: a fresh gpu-supervise, a fresh agent, fresh NVML handles
    restarted = supervise(start, fake_node)
    assert f"UUIDs {' '.join(new.uuids())}" in restarted.output
    wait_probes(restarted, 30)
    assert restarted.popen.poll() is None
    assert "Initiating self-restart" not in restarted.output  # false positives: 0


@pytest.mark.parametrize("how", ["--no-watch", "environment", "watching (the control)"])
def test_no_watch_never_loads_nvml(start: Start, fake_node: FakeNode, tmp_path, how: str):
    """--no-watch is a plain supervisor: libnvidia-ml is never even loaded. The fake library
    records every process that loads it; the watching run shows that the record works."""
    loads = tmp_path / "loads"
    env = {**fake_node.env, "FAKE_NVML_LOADS": str(loads)}
    fake_node.write(dgx_a100())
    flags = ["--no-watch"] if how == "--no-watch" else []
    if how == "environment":
        env["GPU_SUPERVISE_WATCH_ENABLED"] = "false"
    proc = start([*FAST, *flags, "--", *AGENT, "--no-nvml", "--run", "1", "--exit", "3"], env)
    assert proc.wait(60) == 3
    loaded = loads.read_text().split() if loads.exists() else []
    if how.startswith("watching"):
        assert loaded == [str(proc.pid)] and "[GPU-Watcher] baseline" in proc.output
    else:
        assert loaded == [] and "GPU-Watcher" not in proc.output


def test_json_logs_carry_the_event_fields(start: Start, fake_node: FakeNode):
    old = dgx_a100(["1g.5gb"] * 7, count=2)
    fake_node.write(old)
    proc = start(
        [
            "--interval",
            "0.2",
            "--cooldown",
            "0",
            "--settle",
            "0",
            "--log-format",
            "json",
            "--",
            *AGENT,
            "--no-nvml",
        ],
        fake_node.env,
    )
    proc.wait_for('"event": "baseline"')
    new = old.copy()
    new.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(new)
    assert proc.wait() == 1
    events = [json.loads(line) for line in proc.log.splitlines() if line.startswith("{")]
    assert all({"time", "level", "message"} <= set(e) for e in events)
    (baseline,) = [e for e in events if e.get("event") == "baseline"]
    assert baseline["uuids"] == old.uuids()
    (changed,) = [e for e in events if e.get("event") == "topology_changed"]
    assert changed["level"] == "INFO" and changed["kind"] == "mig"
    assert PRD_MIG.search(changed["message"])
    assert (changed["old_layout"], changed["new_layout"]) == (
        "GPU 0: MIG 7x1g.5gb; GPU 1: MIG off",
        "GPU 0: MIG 2x3g.20gb; GPU 1: MIG off",
    )
    (gpu,) = [e for e in events if e.get("event") == "gpu_changed"]  # GPU 1 did not change
    assert gpu["gpu"] == old.gpu(0).uuid
    assert gpu["old_uuids"] == [old.gpu(0).uuid, *old.gpu(0).mig_uuids]
    assert gpu["new_uuids"] == [new.gpu(0).uuid, *new.gpu(0).mig_uuids]
    assert gpu["message"].startswith("[GPU-Watcher]   GPU 0 ")
    (last,) = events[-1:]
    assert last["message"] == "exiting 1: restart me (GPU topology changed)"
    assert (last["event"], last["code"], last["reason"]) == (
        "exit", 1, "restart me (GPU topology changed)"
    )  # fmt: skip
