"""Where gpu-supervise lands: Kubernetes manifests, the systemd unit and its notify protocol, the
termination message, and the file topology source."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import kubernetes_validate  # a declared test dependency: missing, the suite fails
import pytest
import yaml

from conftest import AGENT, FakeNode, Proc, clean_env, gpu_supervise_cmd, missing_capability, run
from fakenvml import GPU_IS_LOST, dgx_a100
from gpu_supervise.config import load

ROOT = Path(__file__).parent.parent
Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


# -- Kubernetes ----------------------------------------------------------------------------------


def manifests() -> list[dict]:
    return [
        d for d in yaml.safe_load_all((ROOT / "examples/kubernetes/daemonset.yaml").read_text())
    ]


def test_manifests_are_valid_against_kubernetes_schemas():
    for doc in manifests():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_invalid_manifest_is_rejected():
    """The validation above can fail: a misspelt field is caught."""
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, "1.30.0", strict=True)


def test_daemonset_has_what_gpu_nodes_need(tmp_path: Path):
    config_map = next(d for d in manifests() if d["kind"] == "ConfigMap")
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    env = {e["name"]: e for e in agent["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"]["value"] == "utility"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert agent["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert agent["command"][0].startswith("/supervise/") and agent["command"][-1] == "--"
    # the ConfigMap's TOML is a valid configuration, and the grace period outlasts the stop
    path = tmp_path / "config.toml"
    path.write_text(config_map["data"]["config.toml"])
    settings = load({}, str(path), environ={})
    assert pod["terminationGracePeriodSeconds"] > settings.stop_timeout
    assert settings.termination_log == agent["terminationMessagePath"]


# -- systemd -------------------------------------------------------------------------------------

UNIT = ROOT / "packaging/systemd/gpu-agent.service"


def _unit_for_this_machine(tmp_path: Path, text: str) -> Path:
    """The template with its placeholders pointing at real executables, as verify requires."""
    exe = gpu_supervise_cmd()[0]
    unit = tmp_path / "gpu-agent.service"
    unit.write_text(
        text.replace("/usr/local/bin/gpu-supervise", exe).replace(
            "/usr/bin/gpu-agent", "/bin/sleep infinity"
        )
    )
    return unit


@pytest.fixture
def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        missing_capability("systemd-analyze not installed (Debian package systemd; .ci/run has it)")
    return exe


def test_systemd_unit_verifies(tmp_path: Path, systemd_analyze: str):
    unit = _unit_for_this_machine(tmp_path, UNIT.read_text())
    out = subprocess.run([systemd_analyze, "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    broken = _unit_for_this_machine(
        tmp_path, UNIT.read_text().replace("Type=notify", "Type=notifyy")
    )
    out = subprocess.run([systemd_analyze, "verify", str(broken)], capture_output=True, text=True)
    assert "Failed to parse service type" in out.stderr


def test_systemd_unit_settings():
    service = _ini_section(UNIT.read_text(), "Service")
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) > load({}, environ={}).stop_timeout
    assert int(service["RestartSec"]) <= 10


def _ini_section(text: str, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == name and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_protocol_on_a_real_socket(start: Start, tmp_path: Path, abstract: bool):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@gpu-supervise-test-{id(sock)}" if abstract else str(tmp_path / "notify.sock")
    sock.bind("\0" + address[1:] if abstract else address)
    sock.settimeout(30)
    try:
        env = clean_env(NOTIFY_SOCKET=address)
        script = 'echo "child NOTIFY_SOCKET=[${NOTIFY_SOCKET-unset}]"; exec sleep 60'
        proc = start(["--no-watch", "--", "sh", "-c", script], env)
        ready = _notification(sock)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"].startswith("running sh as pid ")
        proc.wait_for("child NOTIFY_SOCKET=[unset]")  # the agent never sees the socket
        proc.signal(signal.SIGTERM)
        stopping = _notification(sock)
        assert stopping == {"STATUS": "stopping the agent: stopped by SIGTERM", "STOPPING": "1"}
        assert proc.wait() == 143
    finally:
        sock.close()


def _notification(sock: socket.socket) -> dict[str, str]:
    """One sd_notify datagram as systemd reads it: KEY=VALUE lines."""
    return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())


# -- the Kubernetes termination message ---------------------------------------------------------


def test_termination_message_on_topology_change(start: Start, fake_node: FakeNode, tmp_path: Path):
    log = tmp_path / "termination-log"
    log.write_text("")
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    proc = start([*FAST, "--termination-log", str(log), "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    node.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(node)
    assert proc.wait() == 1
    text = log.read_text()
    assert text.splitlines()[:3] == [
        "gpu-supervise: GPU topology changed; restarting the agent.",
        "old: GPU 0: MIG 7x1g.5gb; " + "; ".join(f"GPU {i}: MIG off" for i in range(1, 8)),
        "new: GPU 0: MIG 2x3g.20gb; " + "; ".join(f"GPU {i}: MIG off" for i in range(1, 8)),
    ]


def test_termination_message_is_capped_at_4096_bytes(start: Start, fake_node: FakeNode, tmp_path):
    log = tmp_path / "termination-log"
    log.write_text("")
    node = dgx_a100(*[["1g.5gb"] * 7] * 8)
    fake_node.write(node)
    proc = start([*FAST, "--termination-log", str(log), "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    for gpu in node.gpus:
        gpu.set_layout(["3g.20gb"] * 2)
    fake_node.write(node)
    assert proc.wait() == 1
    data = log.read_bytes()
    assert len(data) <= 4096 and data.endswith(b"[truncated]")


def test_termination_message_on_nvml_failures(start: Start, fake_node: FakeNode, tmp_path: Path):
    log = tmp_path / "termination-log"
    log.write_text("")
    fake_node.write(dgx_a100())
    proc = start([*FAST, "--termination-log", str(log), "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    fake_node.write(dgx_a100().fail("nvmlDeviceGetUUID", GPU_IS_LOST))
    assert proc.wait() == 1
    lines = log.read_text().splitlines()
    assert lines[0] == "gpu-supervise: NVML failed 3 consecutive probes:"
    assert len(lines) == 4 and all("GPU is lost" in line for line in lines[1:])


def test_termination_message_file_is_never_created(start: Start, fake_node: FakeNode, tmp_path):
    log = tmp_path / "termination-log"  # does not exist: not on Kubernetes
    node = dgx_a100()
    fake_node.write(node)
    proc = start([*FAST, "--termination-log", str(log), "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    node.gpus.pop()
    fake_node.write(node)
    assert proc.wait() == 1
    assert not log.exists()


# -- the file source -------------------------------------------------------------------------------


def test_file_source_dry_run_from_a_real_snapshot(start: Start, fake_node: FakeNode, tmp_path):
    """An operator saves `snapshot --json` from a node and rehearses a change anywhere."""
    node = dgx_a100(["1g.5gb"] * 7, ["2g.10gb"] * 3)
    fake_node.write(node)
    snap = run(["snapshot", "--json"], fake_node.env)
    doc = json.loads(snap.stdout)
    saved = tmp_path / "node.json"
    saved.write_text(snap.stdout)
    env = clean_env()  # no NVML at all from here on
    assert run(["snapshot", "--json", "--source", f"file:{saved}"], env).stdout == snap.stdout
    proc = start([*FAST, "--source", f"file:{saved}", "--", *AGENT, "--no-nvml"], env)
    proc.wait_for("[GPU-Watcher] baseline: 8 GPU(s), 10 MIG device(s)")
    doc["gpus"][1]["mig_devices"].pop()
    saved.write_text(json.dumps(doc))
    assert proc.wait() == 1
    assert "MIG devices 3x2g.10gb -> 2x2g.10gb" in proc.output


def test_file_source_unreadable_document_is_a_failure(start: Start, tmp_path: Path):
    saved = tmp_path / "node.json"
    saved.write_text(json.dumps({"schema": 1, "gpus": []}))
    proc = start([*FAST, "--source", f"file:{saved}", "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("[GPU-Watcher] baseline: 0 GPU(s)")
    saved.write_text("{not json")
    assert proc.wait() == 1
    assert "topology probe failed (1/3 consecutive)" in proc.output


def test_a_file_source_that_vanishes_later_reads_as_no_source(start: Start, tmp_path: Path):
    """A missing file at start is exit 2 (test_config). Deleted after the baseline, it reads as
    a node whose NVML went away: a topology change, not a failed probe."""
    saved = tmp_path / "node.json"
    saved.write_text(json.dumps({"schema": 1, "gpus": [{"index": 0, "uuid": "GPU-a"}]}))
    proc = start([*FAST, "--source", f"file:{saved}", "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("[GPU-Watcher] baseline: 1 GPU(s)")
    saved.unlink()
    assert proc.wait() == 1
    out = proc.output
    assert "GPU topology change detected (Old UUIDs: [GPU-a], New UUIDs: [])" in out
    assert "NVML is no longer usable" in out and "probe failed" not in out


def test_example_files_parse():
    assert load({}, str(ROOT / "examples/config.toml"), environ={}).interval == 30
    dockerfile = (ROOT / "packaging/Dockerfile").read_text()
    assert 'ENTRYPOINT ["/opt/gpu-supervise/gpu-supervise", "--"]' in dockerfile
