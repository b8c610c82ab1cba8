"""WhaTap's GPU monitoring pod, where the GPU client is dcgm-exporter and the node agent only
scrapes it: the derived-image recipe (packaging/Containerfile.wrap), the examples in
examples/whatap/, and the pod itself in podman.

The pod: an exporter container that opens NVML at start, serves the MIG UUIDs it read then on
:9400 and keeps NVML open (tests/whatap/exporter.c, in an image with no shell), wrapped by
gpu-supervise either as WhaTap's operator would run it (the image built by the recipe) or as
the stand-alone DaemonSet does (an init container installs gpu-supervise into a volume, the
exporter image stays as it is); beside it a node agent, never wrapped, that scrapes the
exporter every second and records what it saw (tests/whatap/node_agent.c). What happened is
read from podman's restart counts and the node agent's record; no test code ever stops the
exporter.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jsonschema  # kubernetes-validate's own dependency
import kubernetes_validate
import pytest
import yaml
from test_deploy import _container, _drop_key, _env

from conftest import missing_capability
from containers import PODMAN_FLAGS, copy_with_libraries
from fakenvml import ResetRefused, dgx_a100, holders, reset_gpu
from gpu_supervise.config import load

ROOT = Path(__file__).parent.parent
HERE = Path(__file__).parent / "whatap"
RECIPE = ROOT / "packaging/Containerfile.wrap"
EXAMPLES = ROOT / "examples/whatap"
HOLDING = "stopping the agent so the reset can go ahead"
# test_binary's fixtures, instantiated again for this module, with a runroot of its own
# (podman_runroot below): the init image of packaging/Dockerfile.init comes from there.
# gpu-supervise in the exporter's container, as GPU_SUPERVISE_* settings (WhaTap's operator
# passes gpuMonitoring.envs to that container): quick, for a test.
SUPERVISE_ENV = {
    "GPU_SUPERVISE_WATCH_INTERVAL": "0.5",
    "GPU_SUPERVISE_WATCH_COOLDOWN": "0",
    "GPU_SUPERVISE_WATCH_SETTLE": "0.5",
    "GPU_SUPERVISE_CHILD_STOP_TIMEOUT": "2",
}


# -- the examples --------------------------------------------------------------------------------


def daemonset() -> dict:
    (doc,) = yaml.safe_load_all((EXAMPLES / "daemonset.yaml").read_text())
    return doc


def test_the_daemonset_is_valid_against_kubernetes_schemas():
    kubernetes_validate.validate(daemonset(), "1.30.0", strict=True)


POD = ("spec", "template", "spec")
EXPORTER = (*POD, lambda pod: _container(pod, "dcgm-exporter"))


def _in_pod(change: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda ds: change(ds["spec"]["template"]["spec"])


def _exporter(pod: dict) -> dict:
    return _container(pod, "dcgm-exporter")


def _runs_under_gpu_supervise(pod: dict) -> bool:
    exporter = _exporter(pod)
    return exporter["command"] == ["/supervise/gpu-supervise", "--"] and bool(exporter["args"])


def _mounts_gpu_supervise(pod: dict) -> bool:
    mount = {"name": "supervise-bin", "mountPath": "/supervise", "readOnly": True}
    volume = {"name": "supervise-bin", "emptyDir": {}}
    return mount in _exporter(pod)["volumeMounts"] and volume in pod["volumes"]


def _installs_with_no_shell(pod: dict) -> bool:
    (install,) = pod["initContainers"]
    return (
        install["name"] == "install-gpu-supervise"
        and "command" not in install
        and {"name": "supervise-bin", "mountPath": "/supervise"} in install["volumeMounts"]
    )


def _node_agent_untouched(pod: dict) -> bool:
    agent, helper = _container(pod, "whatap-node-agent"), _container(pod, "whatap-node-helper")
    return (
        agent["command"] == ["/bin/entrypoint.sh"]
        and helper["command"][0] == "/data/agent/node/cadvisor_helper"
        and not any(m["name"] == "supervise-bin"
                    for m in agent["volumeMounts"] + helper["volumeMounts"])
    )  # fmt: skip


def _sees_every_mig_device(pod: dict) -> bool:
    exporter = _exporter(pod)
    monitor = _env(exporter)["NVIDIA_MIG_MONITOR_DEVICES"]["value"]
    return monitor == "all" and exporter["securityContext"]["capabilities"] == {
        "add": ["SYS_ADMIN"]
    }


# What the pod needs, each a check and a way to lose it: the manifest passes every check, and
# each change fails its own.
SETTINGS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], None]]] = {
    "the exporter runs under gpu-supervise": (
        _runs_under_gpu_supervise,
        _drop_key(EXPORTER, "command"),
    ),
    "the exporter mounts gpu-supervise": (
        _mounts_gpu_supervise,
        _in_pod(lambda pod: _exporter(pod)["volumeMounts"].pop()),
    ),
    "an init container installs gpu-supervise, no shell": (
        _installs_with_no_shell,
        _in_pod(lambda pod: pod["initContainers"][0].update(
            command=["sh", "-c", "cp -a /opt/gpu-supervise/. /supervise/"])),
    ),
    "the node agent and its helper untouched": (
        _node_agent_untouched,
        _in_pod(lambda pod: _container(pod, "whatap-node-agent").update(
            command=["/supervise/gpu-supervise", "--", "/bin/entrypoint.sh"])),
    ),
    "MIG monitor devices, with SYS_ADMIN": (
        _sees_every_mig_device,
        _in_pod(lambda pod: _exporter(pod).update(env=[
            e for e in _exporter(pod)["env"] if e["name"] != "NVIDIA_MIG_MONITOR_DEVICES"])),
    ),
    "no mig-manager opt-in": (
        lambda pod: "nvidia.com/gpu.deploy.client" not in pod["nodeSelector"],
        _in_pod(lambda pod: pod["nodeSelector"].update({"nvidia.com/gpu.deploy.client": "true"})),
    ),
    "GPU nodes only": (
        lambda pod: pod["nodeSelector"]["nvidia.com/gpu.present"] == "true",
        _drop_key((*POD, "nodeSelector"), "nvidia.com/gpu.present"),
    ),
    "tolerates nvidia.com/gpu": (
        lambda pod: {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        in pod["tolerations"],
        _in_pod(lambda pod: pod["tolerations"].pop()),
    ),
    "scraped where WhaTap's PodMonitor looks": (
        lambda pod: {"name": "metrics", "containerPort": 9400} in _exporter(pod)["ports"],
        _in_pod(lambda pod: _exporter(pod).update(ports=[{"name": "metrics",
                                                          "containerPort": 9401}])),
    ),
    "the grace period outlasts gpu-supervise's stop": (
        lambda pod: pod["terminationGracePeriodSeconds"] > load({}, environ={}).stop_timeout,
        _in_pod(lambda pod: pod.update(terminationGracePeriodSeconds=10)),
    ),
    "the restart reason in the termination message": (
        lambda pod: _exporter(pod)["terminationMessagePolicy"] == "FallbackToLogsOnError",
        _drop_key(EXPORTER, "terminationMessagePolicy"),
    ),
}  # fmt: skip


def _failing(ds: dict) -> list[str]:
    """The settings whose check fails (or cannot find what it looks at) in this DaemonSet."""

    def holds(check: Callable[[dict], bool]) -> bool:
        try:
            return check(ds["spec"]["template"]["spec"])
        except (KeyError, IndexError, StopIteration, ValueError):
            return False

    return [name for name, (check, _) in SETTINGS.items() if not holds(check)]


def test_the_daemonset_has_what_the_whatap_pod_needs():
    ds = daemonset()
    assert _failing(ds) == []
    # WhaTap's open agent finds the exporter by the pod's `name` label: the selector's own
    assert ds["spec"]["template"]["metadata"]["labels"]["name"] == "whatap-node-agent-gpu"
    assert ds["spec"]["selector"]["matchLabels"] == {"name": "whatap-node-agent-gpu"}


@pytest.mark.parametrize("setting", SETTINGS)
def test_losing_a_setting_is_caught(setting: str):
    ds = daemonset()
    SETTINGS[setting][1](ds)
    assert setting in _failing(ds)


def _object(properties: dict, required: tuple[str, ...] = ()) -> dict:
    """A JSON schema object that takes these properties and no others."""
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}  # fmt: skip


ANY_OBJECT = {"type": "object"}
STRING = {"type": "string"}
ENABLED = {"type": "boolean"}
ARRAY = {"type": "array"}
# The part of WhatapAgent (monitoring.whatap.com/v2alpha1, cluster-scoped) the example uses, as
# whatap-operator's api/v2alpha1/whatapagent_types.go declares it: every field of the objects
# the example goes through, so that a misspelt one fails; the objects it does not use, as such.
HOST_ENGINE = _object(
    {"enabled": ENABLED, "customImageFullName": STRING, "port": {"type": "integer"},
     "resources": ANY_OBJECT},
    ("enabled",),
)  # fmt: skip
GPU_MONITORING = _object(
    {
        "enabled": ENABLED,
        "customImageFullName": STRING,
        "nodeSelector": {"type": "object", "additionalProperties": STRING},
        "envs": {"type": "array", "items": _object(
            {"name": STRING, "value": STRING, "valueFrom": ANY_OBJECT}, ("name",))},
        "devices": {"enum": ["f", "g", "i"]},
        "hostEngine": HOST_ENGINE,
        **dict.fromkeys(("clusterName", "groupLabel", "groupLabelAllowlistRegex", "interval",
                         "remoteHostEngineInfo"), STRING),
        **dict.fromkeys(("service", "resources", "affinity"), ANY_OBJECT),
        **dict.fromkeys(("relabelConfigs", "metricRelabelConfigs"), ARRAY),
    },
    ("enabled",),
)  # fmt: skip
K8S_AGENT = _object(
    {
        **dict.fromkeys(("namespace", "agentImageName", "agentImageVersion",
                         "customImageFullName", "customAgentImageFullName"), STRING),
        "imagePullSecrets": ARRAY,
        "masterAgent": _object({"enabled": ENABLED}, ("enabled",)),
        "nodeAgent": _object({"enabled": ENABLED}, ("enabled",)),
        "gpuMonitoring": GPU_MONITORING,
        **dict.fromkeys(("apiserverMonitoring", "etcdMonitoring", "schedulerMonitoring"),
                        ANY_OBJECT),
    },
    ("gpuMonitoring", "masterAgent", "nodeAgent"),
)  # fmt: skip
WHATAP_AGENT = _object(
    {
        "apiVersion": {"const": "monitoring.whatap.com/v2alpha1"},
        "kind": {"const": "WhatapAgent"},
        "metadata": _object({"name": STRING}, ("name",)),  # cluster-scoped: no namespace
        "spec": _object(
            {
                "license": STRING,
                "host": STRING,
                "port": STRING,
                "features": _object(
                    {"apm": ANY_OBJECT, "openAgent": ANY_OBJECT, "k8sAgent": K8S_AGENT}
                ),
            },
            ("features",),
        ),
    },
    ("apiVersion", "kind", "metadata", "spec"),
)


def whatap_agent() -> dict:
    (doc,) = yaml.safe_load_all((EXAMPLES / "whatapagent.yaml").read_text())
    return doc


def test_the_whatapagent_example_fits_the_operator_types():
    jsonschema.validate(whatap_agent(), WHATAP_AGENT)


@pytest.mark.parametrize(
    "where, field",
    [(("gpuMonitoring",), "customImage"), (("gpuMonitoring", "hostEngine"), "image"),
     ((), "gpuMonitor")],
)  # fmt: skip
def test_a_misspelt_whatapagent_field_is_rejected(where: tuple[str, ...], field: str):
    """The validation above can fail: a field the operator does not know is caught."""
    doc = whatap_agent()
    node = doc["spec"]["features"]["k8sAgent"]
    for step in where:
        node = node[step]
    node[field] = "registry.example.com/x:1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, WHATAP_AGENT)


def test_the_whatapagent_example_swaps_in_wrapped_images_and_valid_settings():
    gpu = whatap_agent()["spec"]["features"]["k8sAgent"]["gpuMonitoring"]
    assert gpu["enabled"] and gpu["hostEngine"]["enabled"]
    assert gpu["customImageFullName"].endswith("-supervised")
    assert gpu["hostEngine"]["customImageFullName"].endswith("-supervised")
    assert "nvidia.com/gpu.deploy.client" not in gpu["nodeSelector"]
    # the exporter sees every MIG device: the deployment sets it, the wrapped image does not
    env = {e["name"]: e["value"] for e in gpu["envs"]}
    assert env.pop("NVIDIA_MIG_MONITOR_DEVICES") == "all"
    # the gpu-supervise settings it shows are valid, and are the defaults it says they are
    assert all(name.startswith("GPU_SUPERVISE_") for name in env)
    assert load({}, environ=env) == load({}, environ={})


def test_the_recipe_changes_the_command_alone():
    """Containerfile.wrap adds gpu-supervise and sets the command, nothing else: no ENV above
    all, for NVIDIA_MIG_MONITOR_DEVICES=all in the image would make the NVIDIA container toolkit
    refuse every container of it that lacks CAP_SYS_ADMIN."""
    instructions = [line.split(None, 1)[0] for line in RECIPE.read_text().splitlines()
                    if line.strip() and not line.startswith("#")]  # fmt: skip
    assert set(instructions) == {"ARG", "FROM", "COPY", "ENTRYPOINT", "CMD"}, instructions


# -- images -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StandIns:
    context: Path  # the exporter image's build context: rootfs/ and no shell in it
    agent_rootfs: Path  # the node agent's root filesystem


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> StandIns:
    build = tmp_path_factory.mktemp("whatap")
    context, agent_rootfs = build / "context", build / "agent-rootfs"
    for name, root, path in [("exporter.c", context / "rootfs", "usr/bin/dcgm-exporter"),
                             ("node_agent.c", agent_rootfs, "usr/bin/node-agent")]:  # fmt: skip
        exe = build / Path(path).name
        cc = subprocess.run(
            ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(HERE / name)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert cc.returncode == 0, cc.stderr
        copy_with_libraries(root, [exe])  # the program and its C library, nothing else
        copied = Path(str(exe).lstrip("/"))
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root / copied, root / path)
        shutil.rmtree(root / copied.parts[0])  # the build folder's path, now empty
    (context / "rootfs/etc/dcgm-exporter").mkdir(parents=True)
    (context / "rootfs/etc/dcgm-exporter/default-counters.csv").write_text(
        "DCGM_FI_DEV_COUNT, gauge, devices this exporter read at its start\n"
    )
    assert not list(context.rglob("sh")) and not list(agent_rootfs.rglob("sh"))
    return StandIns(context, agent_rootfs)


def inspect_format() -> str:
    """The format string of the recipe's step 1, as its header gives it to users."""
    text = RECIPE.read_text()
    start = text.index("podman image inspect --format '") + len("podman image inspect --format '")
    return text[start : text.index("' IMAGE > command.lines", start)]


def image_config(podman: list[str], image: str) -> dict:
    out = subprocess.run([*podman, "image", "inspect", image], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    return json.loads(out.stdout)[0]["Config"]


def build_image(podman: list[str], tag: str, context: Path, recipe: str, *args: str) -> str:
    """`podman build -f -` with this recipe on stdin, as the recipe's header builds it."""
    out = subprocess.run(
        [*podman, "build", "-q", "-f", "-", *args, "-t", tag, str(context)],
        input=recipe, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, f"podman build -t {tag}:\n{recipe}\n{out.stderr}"
    return tag


def wrap(podman: list[str], image: str, gpu_supervise: str, context: Path, tag: str) -> str:
    """`image` built again by packaging/Containerfile.wrap, step by step as its header says."""
    step1 = subprocess.run(
        [*podman, "image", "inspect", "--format", inspect_format(), image],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    args = ["--build-arg", f"IMAGE={image}", "--build-arg", f"GPU_SUPERVISE_IMAGE={gpu_supervise}"]
    return build_image(podman, tag, context, RECIPE.read_text() + step1, *args)


@pytest.fixture(scope="session")
def exporter_images(
    podman: list[str], images: dict[str, str], stand_ins: StandIns, tmp_path_factory
) -> Iterator[dict[str, str]]:
    """The images: "stock", the stand-in exporter's, as WhaTap ships theirs; "wrapped", built
    from it by packaging/Containerfile.wrap; "recipe-alone", the recipe built without the two
    lines of its step 1."""
    tag = f"localhost/gpu-supervise-test-whatap-{os.getpid()}"
    empty = tmp_path_factory.mktemp("empty-context")  # the recipe reads no context
    built: dict[str, str] = {}
    try:
        recipe = (HERE / "Containerfile.exporter").read_text()
        built["stock"] = build_image(podman, f"{tag}-stock", stand_ins.context, recipe)
        built["wrapped"] = wrap(podman, built["stock"], images["init"], empty, f"{tag}-wrapped")
        built["recipe-alone"] = build_image(
            podman, f"{tag}-recipe-alone", empty, RECIPE.read_text(),
            "--build-arg", f"IMAGE={built['stock']}",
            "--build-arg", f"GPU_SUPERVISE_IMAGE={images['init']}",
        )  # fmt: skip
        yield built
    finally:
        for image in built.values():
            subprocess.run([*podman, "rmi", "-f", image], capture_output=True, timeout=120)


def test_the_recipe_puts_gpu_supervise_in_front_of_the_image_command(
    podman: list[str], exporter_images: dict[str, str]
):
    stock = image_config(podman, exporter_images["stock"])
    wrapped = image_config(podman, exporter_images["wrapped"])
    assert stock["Entrypoint"] == ["/usr/bin/dcgm-exporter", "-c", "1000"]  # both halves
    assert stock["Cmd"] == ["-f", "/etc/dcgm-exporter/default-counters.csv"]  # are used
    assert wrapped["Entrypoint"] == ["/opt/gpu-supervise/gpu-supervise", "--", *stock["Entrypoint"]]
    assert wrapped["Cmd"] == stock["Cmd"]
    assert wrapped["Env"] == stock["Env"]  # NVIDIA_MIG_MONITOR_DEVICES is the deployment's
    # and nothing in it needs a shell, for there is none
    sh = subprocess.run(
        [*podman, "run", "--rm", *PODMAN_FLAGS, "--entrypoint", "/bin/sh",
         exporter_images["wrapped"], "-c", "true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert sh.returncode == 127, sh.stderr


def test_the_recipe_alone_never_runs_the_image_command_unsupervised(
    podman: list[str], exporter_images: dict[str, str]
):
    out = subprocess.run(
        [*podman, "run", "--rm", *PODMAN_FLAGS, exporter_images["recipe-alone"]],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert out.stderr.startswith("gpu-supervise: no command to run")
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "entrypoint, cmd",
    [
        (["/usr/bin/dcgm-exporter-entrypoint.sh"], None),  # NVIDIA's distroless dcgm-exporter
        (None, ["/usr/bin/nv-hostengine", "-n"]),  # a CMD alone
        (["/bin/agent", "--label=a b", 'say "x" & <y>'], ["\\", "--"]),  # words to quote
    ],
)
def test_the_recipe_takes_any_split_of_an_image_command(
    podman: list[str],
    images: dict[str, str],
    tmp_path: Path,
    entrypoint: list[str] | None,
    cmd: list[str] | None,
):
    """However the image splits its command between ENTRYPOINT and CMD (an image holding
    nothing else: only its configuration matters here)."""
    base = "FROM scratch\n"
    base += f"ENTRYPOINT {json.dumps(entrypoint)}\n" if entrypoint else ""
    base += f"CMD {json.dumps(cmd)}\n" if cmd else ""
    tag = f"localhost/gpu-supervise-test-whatap-{os.getpid()}-split"
    built = []
    try:
        built.append(build_image(podman, f"{tag}-base", tmp_path, base))
        built.append(wrap(podman, built[0], images["init"], tmp_path, f"{tag}-wrapped"))
        wrapped = image_config(podman, built[1])
    finally:
        for image in built:
            subprocess.run([*podman, "rmi", "-f", image], capture_output=True, timeout=120)
    assert wrapped["Entrypoint"] == ["/opt/gpu-supervise/gpu-supervise", "--", *(entrypoint or [])]
    assert wrapped.get("Cmd") == cmd  # none stays none (inspect leaves it out)


# -- the pod ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pod_env(podman: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment podman needs for pods here: a containers.conf of the tests' own, whose
    default ulimits reach the pod's infra container too (raising them is refused on these
    machines, as for every container of the podman tests)."""
    if not (shutil.which("catatonit") or Path("/usr/libexec/podman/catatonit").exists()):
        missing_capability(
            "catatonit not installed: podman pods need it (Debian package catatonit; .ci/run "
            "installs it)"
        )
    conf = tmp_path_factory.mktemp("containers-conf") / "containers.conf"
    conf.write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n'
        'log_driver = "k8s-file"\n'
        "[engine]\n"
        'runtime = "runc"\n'  # crun fails on this hybrid cgroup setup, as for test_binary
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    name = f"gs-whatap-probe-{os.getpid()}"
    try:
        probe = subprocess.run(
            [*podman, "pod", "create", "--network", "none", "--name", name],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if probe.returncode == 0:
            probe = subprocess.run([*podman, "pod", "start", name], env=env,
                                   capture_output=True, text=True, timeout=120)  # fmt: skip
        if probe.returncode != 0:
            missing_capability(f"podman cannot run a pod here: {probe.stderr.strip()[-300:]}")
    finally:
        subprocess.run([*podman, "pod", "rm", "-f", name], env=env, capture_output=True,
                       timeout=120)  # fmt: skip
    return env


@dataclass
class Pod:
    podman: list[str]
    env: dict[str, str]
    name: str

    def __call__(self, *args: str) -> str:
        out = subprocess.run([*self.podman, *args], env=self.env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, f"podman {' '.join(args)}:\n{out.stderr}"
        return out.stdout

    def inspect(self, container: str, fmt: str) -> str:
        return self("inspect", "--format", fmt, f"{self.name}-{container}").strip()

    def restarts(self, container: str) -> int:
        return int(self.inspect(container, "{{.RestartCount}}"))

    def running(self, container: str) -> bool:
        return self.inspect(container, "{{.State.Status}}") == "running"

    def log(self, container: str) -> str:
        """What the container wrote to stderr: there, gpu-supervise's log alone."""
        out = subprocess.run([*self.podman, "logs", f"{self.name}-{container}"], env=self.env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        return out.stderr

    def wait_log(self, container: str, text: str, count: int = 1, timeout: float = 90) -> str:
        return wait_for(lambda: self.log(container).count(text) >= count, timeout,
                        lambda: f"{count}x {text!r} in:\n{self.log(container)}")  # fmt: skip


def wait_for(ready: Callable[[], object], timeout: float, what: Callable[[], str]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := ready():
            return found
        time.sleep(0.1)
    raise AssertionError(f"never within {timeout} s: {what()}")


def scrapes(record: Path) -> list[tuple[float, list[str]]]:
    """The node agent's record: (wall-clock time, the UUIDs it saw; none when it got no answer)."""
    out = []
    for line in record.read_text().splitlines() if record.exists() else []:
        stamp, *uuids = line.split()
        out.append((float(stamp), [] if uuids == ["-"] else uuids))
    return out


def wait_scrape(record: Path, uuids: list[str], after: float, timeout: float = 90) -> float:
    """When the node agent first saw exactly these UUIDs after `after` ([]: no answer)."""

    def last() -> str:
        return "\n".join(f"{t:.3f} {got}" for t, got in scrapes(record)[-10:])

    return wait_for(
        lambda: next((t for t, got in scrapes(record) if t > after and got == uuids), None),
        timeout,
        lambda: f"the node agent seeing {uuids}; its last scrapes:\n{last()}",
    )


def gpu_clients(node_path: Path) -> dict[int, str]:
    """The live processes holding NVML on the fake node, those in containers included: host
    pid -> command line."""
    found = {}
    for pid in holders(node_path):
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return {pid: cmd.strip() for pid, cmd in found.items()}


def exporter_pid(node_path: Path) -> int:
    """The exporter, holding NVML (gpu-supervise holds it only for the moment of a probe)."""

    def exporter() -> int | None:
        clients = gpu_clients(node_path).items()
        return next((p for p, cmd in clients if cmd.startswith("/usr/bin/dcgm-exporter")), None)

    return wait_for(exporter, 60, lambda: f"an exporter holding NVML: {gpu_clients(node_path)}")


def nvidiactl_holders() -> str:
    """What the examples' one line for finding the GPU clients prints, run as given."""
    line = next(
        ln.strip("# ")
        for ln in (EXAMPLES / "daemonset.yaml").read_text().splitlines()
        if ln.startswith("#   find /proc/")
    )
    return subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60).stdout


def _env_flags(env: dict[str, str]) -> list[str]:
    return [flag for name, value in env.items() for flag in ("-e", f"{name}={value}")]


def start_pod(
    pod: Pod, shape: str, images: dict[str, str], exporters: dict[str, str], stand_ins: StandIns,
    nvml: Path, record: Path,
) -> None:  # fmt: skip
    """The pod, started: the exporter's container as WhaTap's operator makes it from the
    wrapped image ("operator"), or as the stand-alone DaemonSet makes it ("standalone")."""
    pod("pod", "create", "--network", "none", "--name", pod.name)
    exporter = [
        "--pod", pod.name, "--name", f"{pod.name}-dcgm-exporter", "--restart", "on-failure",
        "--cap-add", "SYS_ADMIN", "-v", f"{nvml}:/nvml",
        *_env_flags({
            "LD_LIBRARY_PATH": "/nvml",
            "FAKE_NVML_NODE": "/nvml/node.txt",
            # the fake's device files where the driver's are: /dev/nvidiactl, /dev/nvidia<N>
            "FAKE_NVML_DEV_DIR": "/dev",
            "DCGM_EXPORTER_LISTEN": ":9400",
            **SUPERVISE_ENV,
        }),
    ]  # fmt: skip
    if shape == "operator":
        pod("create", *exporter, exporters["wrapped"])
    else:
        spec = daemonset()["spec"]["template"]["spec"]
        (install,) = spec["initContainers"]
        container = _container(spec, "dcgm-exporter")
        volume = f"{pod.name}-supervise-bin"
        pod("volume", "create", volume)
        pod("create", "--pod", pod.name, "--name", f"{pod.name}-install", "--init-ctr", "always",
            "-v", f"{volume}:{install['volumeMounts'][0]['mountPath']}",
            images["init"])  # fmt: skip
        # the manifest's command, and its args as the stand-in's own command instead of WhaTap's
        stock = image_config(pod.podman, exporters["stock"])
        manifest_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        pod("create", *_env_flags(manifest_env), *exporter, "-v", f"{volume}:/supervise:ro",
            "--entrypoint", json.dumps(container["command"]),
            exporters["stock"], *stock["Entrypoint"], *stock["Cmd"])  # fmt: skip
    pod("create", "--pod", pod.name, "--name", f"{pod.name}-node-agent", "--restart", "on-failure",
        "--read-only", "-v", f"{record.parent}:/record", "--rootfs", str(stand_ins.agent_rootfs),
        "/usr/bin/node-agent", f"/record/{record.name}")  # fmt: skip
    pod("pod", "start", pod.name)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["operator", "standalone"])
def test_whatap_pod_through_a_reconfiguration_and_a_mig_mode_change(
    shape: str,
    podman: list[str],
    pod_env: dict[str, str],
    images: dict[str, str],
    exporter_images: dict[str, str],
    stand_ins: StandIns,
    fake_lib_dir: Path,
    tmp_path: Path,
):
    nvml, record = tmp_path / "nvml", tmp_path / "record" / "scrapes.txt"
    nvml.mkdir()
    record.parent.mkdir()
    shutil.copy2(fake_lib_dir / "libnvidia-ml.so.1", nvml)
    path = nvml / "node.txt"
    node = dgx_a100(["1g.5gb"] * 7, count=2)
    node.write(path)
    pod = Pod(podman, pod_env, f"gs-whatap-{os.getpid()}-{shape}")
    try:
        start_pod(pod, shape, images, exporter_images, stand_ins, nvml, record)
        pod.wait_log("dcgm-exporter", "[GPU-Watcher] baseline")
        wait_scrape(record, node.uuids(), after=0)
        exporter = exporter_pid(path)
        # the one line the examples give to find the GPU clients finds it, on this host
        listed = nvidiactl_holders()
        assert f"{exporter} /usr/bin/dcgm-exporter -c 1000 -f " in listed, listed
        assert "node-agent" not in listed

        # 1. A100 reconfiguration, 7x 1g.5gb -> 2x 3g.20gb: the node agent sees the new UUIDs
        # once the exporter has been restarted with fresh NVML handles, and only it was.
        node.gpu(0).set_layout(["3g.20gb"] * 2)
        changed = time.time()
        node.write(path)
        fresh = wait_scrape(record, node.uuids(), after=changed)
        print(f"\n{shape}: change -> the node agent's first fresh scrape: {fresh - changed:.2f} s")
        assert (pod.restarts("dcgm-exporter"), pod.restarts("node-agent")) == (1, 0)

        # 2. MIG mode change pending a reset: the exporter holds NVML, so the reset is refused
        # until gpu-supervise stops it; then the node agent, still running, gets no answer.
        exporter = exporter_pid(path)
        with pytest.raises(ResetRefused):
            reset_gpu(path, node, 0, timeout=1)
        node.gpu(0).request_mig(False)
        asked = time.time()
        node.write(path)
        wait_for(lambda: exporter not in gpu_clients(path), 60,
                 lambda: f"the exporter stopped: {gpu_clients(path)}")  # fmt: skip
        wait_scrape(record, [], after=asked)  # the exporter is down ...
        assert pod.running("node-agent") and pod.running("dcgm-exporter")  # ... not its container
        assert (pod.restarts("dcgm-exporter"), pod.restarts("node-agent")) == (1, 0)
        assert HOLDING in pod.log("dcgm-exporter")
        reset_gpu(path, node, 0, timeout=60)
        reset = time.time()
        wait_scrape(record, node.uuids(), after=reset)  # back, with MIG off on GPU 0
        assert (pod.restarts("dcgm-exporter"), pod.restarts("node-agent")) == (2, 0)
        assert pod.running("node-agent")
        assert "MIG mode on -> off" in pod.log("dcgm-exporter")
    finally:
        subprocess.run([*podman, "pod", "rm", "-f", "-t", "2", pod.name], env=pod_env,
                       capture_output=True, timeout=120)  # fmt: skip
        subprocess.run([*podman, "volume", "rm", "-f", f"{pod.name}-supervise-bin"],
                       env=pod_env, capture_output=True, timeout=60)  # fmt: skip
