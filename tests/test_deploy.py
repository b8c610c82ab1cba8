"""Where gpu-supervise lands: Kubernetes manifests, the systemd unit and the shipped examples."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate  # a declared test dependency: missing, the suite fails
import pytest
import yaml

from conftest import gpu_supervise_cmd, missing_capability
from gpu_supervise.config import load

ROOT = Path(__file__).parent.parent


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


def test_daemonset_config_and_grace_period(tmp_path: Path):
    config_map = next(d for d in manifests() if d["kind"] == "ConfigMap")
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    assert agent["command"][0].startswith("/supervise/") and agent["command"][-1] == "--"
    # the ConfigMap's TOML is a valid configuration, and the grace period outlasts the stop
    path = tmp_path / "config.toml"
    path.write_text(config_map["data"]["config.toml"])
    settings = load({}, str(path), environ={})
    assert pod["terminationGracePeriodSeconds"] > settings.stop_timeout
    assert settings.termination_log == agent["terminationMessagePath"]


def test_the_readme_lists_what_the_daemonset_sets():
    """The README's short list of what the agent's container needs is what the example sets:
    each variable at its value, the capability, the RuntimeClass, the grace period (above the
    stop timeout) and a memory limit."""
    text = (ROOT / "README.md").read_text()
    block = text.split("What the agent's container needs")[1].split("\n\n")[1]
    items = [" ".join(item.split()) for item in block.split("\n- ")]
    assert len(items) == 5 and items[0].startswith("- ")
    spans = [re.findall(r"`([^`]+)`", item)[0] for item in items]
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    named = [s for item in items for s in re.findall(r"`([A-Z_]+)=([^`]+)`", item)]
    assert {n for n, _ in named} == {"NVIDIA_MIG_MONITOR_DEVICES", "NVIDIA_VISIBLE_DEVICES",
                                     "NVIDIA_DRIVER_CAPABILITIES"}  # fmt: skip
    assert all(env[name] == value for name, value in named), named
    assert "`CAP_SYS_ADMIN`" in items[0] and agent["securityContext"]["capabilities"] == {
        "add": ["SYS_ADMIN"]
    }
    assert spans[1] == f"runtimeClassName: {pod['runtimeClassName']}"
    grace = int(spans[3].removeprefix("terminationGracePeriodSeconds: "))
    assert grace == pod["terminationGracePeriodSeconds"] > load({}, environ={}).stop_timeout
    assert f"`stop_timeout` ({load({}, environ={}).stop_timeout:g} s)" in items[3]
    assert spans[4] == "limits.memory" and agent["resources"]["limits"]["memory"]


def _container(pod: dict, name: str) -> dict:
    return next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# What an SRE on a GPU Operator cluster needs in the DaemonSet, each a check and a way to drop
# it: the manifest passes every check, and each dropped setting fails its own.
def _drop_key(path: tuple, key: str):
    def drop(ds: dict) -> None:
        node = ds
        for step in path:
            node = node[step] if not callable(step) else step(node)
        node.pop(key)

    return drop


POD = ("spec", "template", "spec")
AGENT_CONTAINER = (*POD, lambda pod: _container(pod, "agent"))
SETTINGS = {
    "tolerates nvidia.com/gpu": (
        lambda pod: {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        in pod.get("tolerations", []),
        _drop_key(POD, "tolerations"),
    ),
    "runtimeClassName nvidia": (
        lambda pod: pod.get("runtimeClassName") == "nvidia",
        _drop_key(POD, "runtimeClassName"),
    ),
    "no service links": (
        lambda pod: pod.get("enableServiceLinks") is False,
        _drop_key(POD, "enableServiceLinks"),
    ),
    "priority system-node-critical": (
        lambda pod: pod.get("priorityClassName") == "system-node-critical",
        _drop_key(POD, "priorityClassName"),
    ),
    "mig-manager opt-in label": (
        lambda pod: pod.get("nodeSelector", {}).get("nvidia.com/gpu.deploy.client") == "true",
        _drop_key((*POD, "nodeSelector"), "nvidia.com/gpu.deploy.client"),
    ),
    "seccomp RuntimeDefault": (
        lambda pod: pod.get("securityContext", {}).get("seccompProfile")
        == {"type": "RuntimeDefault"},
        _drop_key((*POD, "securityContext"), "seccompProfile"),
    ),
    "waits for the container toolkit": (
        lambda pod: any(
            "/run/nvidia/validations/toolkit-ready" in " ".join(c.get("args", []))
            and {"mountPath": "/run/nvidia", "mountPropagation": "HostToContainer",
                 "name": "run-nvidia", "readOnly": True} in c["volumeMounts"]
            for c in pod.get("initContainers", [])
        )
        and pod["initContainers"][0]["name"] == "toolkit-validation",
        lambda ds: ds["spec"]["template"]["spec"]["initContainers"].pop(0),
    ),  # fmt: skip
    "installs gpu-supervise with no shell": (
        lambda pod: "command" not in _container(pod, "install-gpu-supervise")
        and {"name": "supervise-bin", "mountPath": "/supervise"}
        in _container(pod, "install-gpu-supervise")["volumeMounts"],
        lambda ds: _container(ds["spec"]["template"]["spec"], "install-gpu-supervise").update(
            command=["cp", "-a", "/opt/gpu-supervise/.", "/supervise/"]
        ),
    ),
    "init containers unprivileged": (
        lambda pod: all(
            c["securityContext"] == {
                "runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }
            for c in pod["initContainers"]
        ),
        lambda ds: ds["spec"]["template"]["spec"]["initContainers"][1].pop("securityContext"),
    ),  # fmt: skip
    "NVIDIA_VISIBLE_DEVICES all": (
        lambda pod: _env(_container(pod, "agent"))["NVIDIA_VISIBLE_DEVICES"]["value"] == "all",
        lambda ds: _container(ds["spec"]["template"]["spec"], "agent")["env"].pop(0),
    ),
    "NVIDIA_DRIVER_CAPABILITIES utility": (
        lambda pod: _env(_container(pod, "agent")).get("NVIDIA_DRIVER_CAPABILITIES", {}).get(
            "value") == "utility",
        lambda ds: _container(ds["spec"]["template"]["spec"], "agent")["env"].pop(1),
    ),  # fmt: skip
    "MIG monitor devices, with SYS_ADMIN": (
        lambda pod: _env(_container(pod, "agent")).get("NVIDIA_MIG_MONITOR_DEVICES", {}).get(
            "value") == "all"
        and _container(pod, "agent")["securityContext"]["capabilities"] == {"add": ["SYS_ADMIN"]},
        lambda ds: _container(ds["spec"]["template"]["spec"], "agent")["securityContext"].pop(
            "capabilities"),
    ),  # fmt: skip
    "no privilege escalation flag beside SYS_ADMIN": (
        lambda pod: "allowPrivilegeEscalation" not in _container(pod, "agent")["securityContext"],
        lambda ds: _container(ds["spec"]["template"]["spec"], "agent")["securityContext"].update(
            allowPrivilegeEscalation=False
        ),
    ),
    "agent's root filesystem read-only": (
        lambda pod: _container(pod, "agent")["securityContext"].get("readOnlyRootFilesystem")
        is True,
        _drop_key(AGENT_CONTAINER, "securityContext"),
    ),
    "node name from the downward API": (
        lambda pod: _env(_container(pod, "agent"))["NODE_NAME"]["valueFrom"]["fieldRef"][
            "fieldPath"] == "spec.nodeName",
        lambda ds: _container(ds["spec"]["template"]["spec"], "agent")["env"].pop(),
    ),  # fmt: skip
    "termination message": (
        lambda pod: _container(pod, "agent").get("terminationMessagePolicy")
        == "FallbackToLogsOnError",
        _drop_key(AGENT_CONTAINER, "terminationMessagePolicy"),
    ),
}


def _missing(ds: dict) -> list[str]:
    pod = ds["spec"]["template"]["spec"]
    out = []
    for name, (check, _) in SETTINGS.items():
        try:
            ok = check(pod)
        except (KeyError, StopIteration, IndexError):
            ok = False
        if not ok:
            out.append(name)
    return out


def test_daemonset_has_what_a_gpu_operator_cluster_needs():
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    assert _missing(ds) == []


@pytest.mark.parametrize("setting", SETTINGS)
def test_dropping_a_setting_is_caught(setting: str):
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    SETTINGS[setting][1](ds)
    assert setting in _missing(ds)


def test_the_older_gpu_operator_alternative_is_valid():
    """The commented affinity that replaces the opt-in label before GPU Operator v26.7.0."""
    text = (ROOT / "examples/kubernetes/daemonset.yaml").read_text()
    block = text.split("# BEGIN older-gpu-operator\n")[1].split("# END older-gpu-operator")[0]
    affinity = yaml.safe_load("\n".join(line.strip()[2:] for line in block.splitlines()))
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    del pod["nodeSelector"]["nvidia.com/gpu.deploy.client"]
    pod.update(affinity)
    kubernetes_validate.validate(ds, "1.30.0", strict=True)
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/mig.config.state", "operator": "NotIn",
         "values": ["pending", "rebooting"]}
    ]  # fmt: skip


def test_the_version_check_shows_the_labels_the_pods_select():
    """The command the manifest gives for checking the GPU Operator first shows the very labels
    the nodeSelector requires: a label renamed in one place and not the other would let the
    check pass on a cluster where the pods never schedule."""
    text = (ROOT / "examples/kubernetes/daemonset.yaml").read_text()
    (labels,) = re.findall(r"kubectl get nodes -L (\S+)", text)
    ds = next(d for d in manifests() if d["kind"] == "DaemonSet")
    assert set(labels.split(",")) == set(ds["spec"]["template"]["spec"]["nodeSelector"])


# -- systemd -------------------------------------------------------------------------------------

UNIT = ROOT / "packaging/systemd/gpu-agent.service"


def _unit_for_this_machine(tmp_path: Path, text: str) -> Path:
    """The template with its placeholders pointing at real executables, as verify requires."""
    exe = gpu_supervise_cmd()[0]
    unit = tmp_path / "gpu-agent.service"
    unit.write_text(
        text.replace("/opt/gpu-supervise/gpu-supervise", exe).replace(
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


# -- the shipped examples --------------------------------------------------------------------------


def test_example_files_parse():
    assert load({}, str(ROOT / "examples/config.toml"), environ={}).interval == 30
    dockerfile = (ROOT / "packaging/Dockerfile").read_text()
    assert 'ENTRYPOINT ["/opt/gpu-supervise/gpu-supervise", "--"]' in dockerfile
