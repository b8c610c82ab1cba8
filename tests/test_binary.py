"""The shipped form: the one-folder PyInstaller executable, on its own and as PID 1 of a real
container (podman with runc) whose restart policy brings it back after a topology change."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import FakeNode, run
from fakenvml import dgx_a100

ROOT = Path(__file__).parent.parent
FAST = ["--interval", "0.3", "--cooldown", "0", "--settle", "0.3"]


@pytest.fixture(scope="session")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        ["bash", str(ROOT / "packaging/build-binary.sh"), str(dist)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    exe = dist / "gpu-supervise" / "gpu-supervise"
    assert exe.is_file() and os.access(exe, os.X_OK)
    return exe


def test_binary_snapshot_matches_the_package(binary: Path, fake_node: FakeNode):
    fake_node.write(dgx_a100(["1g.5gb"] * 7, ["3g.20gb"] * 2))
    frozen = subprocess.run(
        [str(binary), "snapshot", "--json"], env=fake_node.env, capture_output=True, text=True
    )
    assert frozen.returncode == 0, frozen.stderr
    assert json.loads(frozen.stdout) == json.loads(
        run(["snapshot", "--json"], fake_node.env).stdout
    )


def test_binary_supervises_through_a_topology_change(binary: Path, fake_node: FakeNode, tmp_path):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    env_dump = tmp_path / "child-env"
    proc = subprocess.Popen(
        [str(binary), *FAST, "--", "sh", "-c", f'env > {env_dump}; echo "agent up"; exec sleep 60'],
        env=fake_node.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out = ""
        for line in proc.stdout:  # type: ignore[union-attr]
            out += line
            if "[GPU-Watcher] baseline" in out and "agent up" in out:
                break
        node.gpu(0).set_layout(["3g.20gb"] * 2)
        fake_node.write(node)
        out += proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 1, out
    assert "MIG configuration change detected" in out
    # the agent got the environment we were given, not the bootloader's
    child_env = dict(
        line.split("=", 1) for line in env_dump.read_text().splitlines() if "=" in line
    )
    assert child_env["LD_LIBRARY_PATH"] == fake_node.env["LD_LIBRARY_PATH"]
    assert not [k for k in child_env if k.startswith("_PYI") or k.endswith("_ORIG")]


def test_binary_exit_codes_and_usage_errors(binary: Path):
    assert subprocess.run([str(binary), "--no-watch", "--", "sh", "-c", "exit 9"]).returncode == 9
    bad = subprocess.run(
        [str(binary), "--interval", "0", "--", "true"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


# -- a real container runtime --------------------------------------------------------------------

PODMAN_FLAGS = [
    "--runtime", "runc",  # crun fails on this hybrid cgroup setup; runc works
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",  # raising rlimits is refused
    "--network", "none", "--log-driver", "k8s-file",
]  # fmt: skip


def _copy_with_libraries(root: Path, paths: list[Path]) -> None:
    """Copy executables and shared objects into root, with every library ldd says they need."""
    seen: set[str] = set()
    for path in paths:
        wanted = [str(path)]
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
        wanted += [tok for line in out.splitlines() for tok in line.split() if tok.startswith("/")]
        for src in wanted:
            if src in seen or str(ROOT) in src:
                continue
            seen.add(src)
            dst = root / src.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(src), dst)


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    exe = shutil.which("podman")
    if exe is None or shutil.which("runc") is None:
        pytest.skip(
            "podman/runc not installed (Debian packages podman runc; .ci/run installs them)"
        )
    store = tmp_path_factory.mktemp("podman")
    cmd = [exe, "--storage-driver", "vfs", "--root", str(store / "root"),
           "--runroot", str(store / "run")]  # fmt: skip
    rootfs = store / "probe-rootfs"
    _copy_with_libraries(rootfs, [Path("/bin/true")])
    probe = subprocess.run(
        [*cmd, "run", "--rm", *PODMAN_FLAGS, "--rootfs", str(rootfs), "/bin/true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-300:]}")
    return cmd


def test_container_restarts_after_a_topology_change(
    binary: Path, podman: list[str], fake_node: FakeNode, tmp_path: Path
):
    """gpu-supervise is PID 1 (ENTRYPOINT) of a container run with --restart on-failure."""
    rootfs = tmp_path / "rootfs"
    bundle = binary.parent
    shutil.copytree(bundle, rootfs / "opt/gpu-supervise")
    shared_objects = [p for p in bundle.rglob("*.so*") if p.is_file()]
    _copy_with_libraries(rootfs, [binary, Path("/bin/sh"), Path("/bin/sleep"), *shared_objects,
                                  fake_node.lib_dir / "libnvidia-ml.so.1"])  # fmt: skip
    for d in ("proc", "sys", "dev", "tmp", "etc", "nvml"):
        (rootfs / d).mkdir(exist_ok=True)
    (rootfs / "agent.sh").write_text(
        "#!/bin/sh\n"
        'echo "agent $$ begin"\n'
        "/opt/gpu-supervise/gpu-supervise snapshot\n"
        'echo "agent $$ end"\n'
        "exec sleep 3600\n"
    )
    (rootfs / "agent.sh").chmod(0o755)
    nvml = tmp_path / "nvml"
    nvml.mkdir()
    shutil.copy2(fake_node.lib_dir / "libnvidia-ml.so.1", nvml)
    termination = tmp_path / "termination-log"
    termination.write_text("")
    old = dgx_a100(["1g.5gb"] * 7, count=2)
    old.write(nvml / "node.txt")

    name = f"gpu-supervise-test-{os.getpid()}"
    subprocess.run([*podman, "rm", "-f", name], capture_output=True)
    started = subprocess.run(
        [*podman, "run", "-d", "--name", name, "--restart", "on-failure", *PODMAN_FLAGS,
         "-v", f"{nvml}:/nvml", "-v", f"{termination}:/dev/termination-log",
         "-e", "LD_LIBRARY_PATH=/nvml", "-e", "FAKE_NVML_NODE=/nvml/node.txt",
         "--rootfs", str(rootfs),
         "/opt/gpu-supervise/gpu-supervise", *FAST, "--", "/agent.sh"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        logs = _wait_logs(podman, name, "end", count=1)
        assert "gpu-supervise[1] INFO    started /agent.sh" in logs  # PID 1
        first = _agent_views(logs)[0]
        assert all(u in first for u in old.uuids())
        new = old.copy()
        new.gpu(0).set_layout(["3g.20gb"] * 2)
        new.write(nvml / "node.txt")
        logs = _wait_logs(podman, name, "end", count=2)
        second = _agent_views(logs)[1]
        assert all(u in second for u in new.uuids())
        assert not any(u in second for u in set(old.uuids()) - set(new.uuids()))
        assert "MIG configuration change detected" in logs
        restarts = _inspect(podman, name, "{{.RestartCount}}")
        assert int(restarts) >= 1
        assert termination.read_text().startswith("gpu-supervise: GPU topology changed")
    finally:
        subprocess.run([*podman, "rm", "-f", "-t", "2", name], capture_output=True, timeout=120)


def _agent_views(logs: str) -> list[str]:
    """What each agent printed between its begin and end markers."""
    return [m[1] for m in re.findall(r"agent (\d+) begin\n(.*?)agent \1 end", logs, flags=re.S)]


def _inspect(podman: list[str], name: str, fmt: str) -> str:
    return subprocess.run(
        [*podman, "inspect", name, "--format", fmt], capture_output=True, text=True, timeout=60
    ).stdout.strip()


def _wait_logs(podman: list[str], name: str, marker: str, count: int, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    logs = ""
    while time.monotonic() < deadline:
        out = subprocess.run([*podman, "logs", name], capture_output=True, text=True, timeout=60)
        logs = out.stdout + out.stderr
        if logs.count(f" {marker}") >= count:
            return logs
        time.sleep(0.3)
    raise AssertionError(f"container logs never showed {count}x {marker!r}:\n{logs}")
