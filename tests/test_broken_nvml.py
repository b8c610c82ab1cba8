"""A restart only when a restart can help: NVML that fails from the start (a driver upgraded
without a reboot, a GPU off the bus, no permission, a hanging call) must not crash-loop the
agent, and NVML starting to work must give the agent one restart to pick it up."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable

from conftest import AGENT, FakeNode, Proc, gpu_supervise_cmd, pid_alive
from fakenvml import LIB_RM_VERSION_MISMATCH, dgx_a100

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0.2", "--log-level", "DEBUG"]
BROKEN = "NVML has failed every probe since start"


def error_lines(out: str, text: str) -> list[str]:
    return [line for line in out.splitlines() if " ERROR " in line and text in line]


def test_a_version_mismatch_from_the_start_never_restarts_until_nvml_works(
    start: Start, fake_node: FakeNode, tmp_path
):
    fake_node.write(dgx_a100().fail("nvmlInit", LIB_RM_VERSION_MISMATCH))
    pidfile = tmp_path / "pid"
    proc = start([*FAST, "--", *AGENT, "--no-nvml", "--pidfile", str(pidfile)], fake_node.env)
    proc.wait_for(BROKEN, count=10 * 3, timeout=60)  # 10x failure_threshold probes
    out = proc.output
    assert proc.popen.poll() is None and pid_alive(int(pidfile.read_text()))
    assert len(error_lines(out, BROKEN)) == 1  # loud once; the rest at DEBUG
    assert "RM has detected an NVML/RM version mismatch." in error_lines(out, BROKEN)[0]
    assert "Initiating self-restart" not in out
    node = dgx_a100(count=2)
    fake_node.write(node)  # the node rebooted into the new driver, say
    assert proc.wait(60) == 1
    out = proc.output
    assert out.count("Initiating self-restart.") == 1
    new = ", ".join(node.uuids())
    assert f"GPU topology change detected (Old UUIDs: [], New UUIDs: [{new}])" in out
    assert "NVML became usable" in out
    assert "got SIGTERM" in out


def test_a_hang_from_the_start_never_restarts(start: Start, fake_node: FakeNode):
    fake_node.write(dgx_a100().hang("nvmlDeviceGetCount"))
    proc = start([*FAST, "--probe-timeout", "0.3", "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("previous probe is still hanging in NVML", count=10, timeout=60)
    assert proc.popen.poll() is None
    assert len(error_lines(proc.output, BROKEN)) == 1  # at the third failure in a row
    assert "topology probe failed (1/3 consecutive): probe did not finish within 0.3 s" in proc.log
    assert "the first good probe is the baseline" in error_lines(proc.output, BROKEN)[0]


def test_a_slow_first_probe_is_no_topology_change(start: Start, fake_node: FakeNode):
    """A first nvmlInit is slow on a node without persistence mode: the baseline probe runs past
    probe_timeout. That is a failed probe, not "no NVML": the next good probe is the baseline,
    the agent is not restarted for NVML "starting to work", and a real change later is told
    against the GPUs the agent started with."""
    node = dgx_a100(count=2)
    fake_node.write(node.copy().delay(1500, fn="nvmlInit"))
    opts = ["--interval", "2", "--cooldown", "0", "--settle", "0.2", "--probe-timeout", "0.5"]
    proc = start([*opts, "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("topology probe failed (1/3 consecutive): probe did not finish within 0.5 s")
    fake_node.write(node)  # the driver is up: the next inits are fast
    proc.wait_for("[GPU-Watcher] baseline: 2 GPU(s)")
    old = ", ".join(node.uuids())
    node.gpu(0).set_layout(["1g.5gb"] * 7)
    fake_node.write(node)
    assert proc.wait(60) == 1
    assert f"(Old UUIDs: [{old}], New UUIDs: [{', '.join(node.uuids())}])" in proc.output
    assert "NVML became usable" not in proc.output and BROKEN not in proc.output


def test_the_json_event_says_it_is_not_restarting(start: Start, fake_node: FakeNode):
    fake_node.write(dgx_a100().fail("nvmlInit", LIB_RM_VERSION_MISMATCH))
    proc = start([*FAST, "--log-format", "json", "--", *AGENT, "--no-nvml"], fake_node.env)
    out = proc.wait_for('"restarting": false')
    assert '"event": "nvml_failing"' in out and '"level": "ERROR"' in out


def test_a_restart_loop_over_a_broken_nvml_restarts_once(fake_node: FakeNode, tmp_path):
    """What a restart policy does (Kubernetes, systemd, podman --restart on-failure): start again
    on every exit 1. NVML works at first, then breaks for good: the 3-failure rule restarts
    once, and the new gpu-supervise, whose NVML never worked, keeps its agent running."""
    node = dgx_a100(count=1)
    fake_node.write(node)
    loop = (
        'starts=0; while :; do starts=$((starts+1)); echo "start $starts"; '
        '"$@"; echo "exit $?"; sleep 0.2; done'
    )
    cmd = [*gpu_supervise_cmd(), "--interval", "0.2", "--cooldown", "0", "--settle", "0.2",
           "--", *AGENT, "--no-nvml"]  # fmt: skip
    log = tmp_path / "log"
    with open(log, "wb") as stderr:  # gpu-supervise's log apart from the policy's own lines
        policy = subprocess.Popen(
            ["sh", "-c", loop, "restart-policy", *cmd],
            env=fake_node.env, stdout=subprocess.PIPE, stderr=stderr, text=True,
            start_new_session=True,
        )  # fmt: skip
    try:
        time.sleep(3)  # a baseline, then steady probes
        fake_node.write(node.copy().fail("*", LIB_RM_VERSION_MISMATCH))  # broken for good
        time.sleep(15)  # 75 probe intervals: about 25 restarts a few minutes ago
    finally:
        subprocess.run(["pkill", "-TERM", "-s", str(policy.pid)])  # the policy's whole session
        out = policy.communicate(timeout=60)[0]
    exits = re.findall(r"^exit (\d+)$", out, flags=re.M)
    assert exits[:1] == ["1"] and len(re.findall(r"^start \d+$", out, flags=re.M)) == 2, out
    logged = log.read_text()
    assert "NVML failed 3 consecutive probes" in logged and BROKEN in logged
