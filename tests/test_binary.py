"""The shipped form: the executable folder of packaging/build-binary.sh (a static launcher, the
PyInstaller one-folder build and the build host's glibc), on its own and in real containers
(podman with runc): as PID 1 of a Debian 11 agent image (glibc 2.31, older than the build needs)
whose restart policy brings it back after a topology change, copied there by an init container
with `gpu-supervise install`, and in a root filesystem holding nothing but its own files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import pytest

from conftest import FakeNode, Proc, missing_capability, run
from fakenvml import dgx_a100

ROOT = Path(__file__).parent.parent
FAST = ["--interval", "0.3", "--cooldown", "0", "--settle", "0.3"]
GLIBC = re.compile(r"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?")
# glibc's own files, which build-binary.sh adds to _internal/: not counted in the floor
GLIBC_FILES = re.compile(
    r"^(ld-linux.*|lib(c|m|dl|pthread|rt|util|resolv|anl|nss_files|nss_dns)\.so\.\d+)$"
)


@pytest.fixture(scope="session")
def binary(binary_build: tuple[Path, str]) -> Path:
    """The executable of the shipped folder: DIST/gpu-supervise/gpu-supervise."""
    return binary_build[0]


def test_binary_snapshot_matches_the_package(binary: Path, fake_node: FakeNode):
    fake_node.write(dgx_a100(["1g.5gb"] * 7, ["3g.20gb"] * 2))
    frozen = subprocess.run(
        [str(binary), "snapshot", "--json"], env=fake_node.env, capture_output=True, text=True
    )
    assert frozen.returncode == 0, frozen.stderr
    assert json.loads(frozen.stdout) == json.loads(
        run(["snapshot", "--json"], fake_node.env).stdout
    )


def test_binary_supervises_through_a_topology_change(
    binary: Path, fake_node: FakeNode, tmp_path: Path, start_cmd: Callable[..., Proc]
):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    env_dump = tmp_path / "child-env"
    proc = start_cmd(
        [str(binary), *FAST, "--", "sh", "-c",
         f'env > {env_dump}; echo "parent $PPID"; echo "agent up"; exec sleep 60'],
        fake_node.env,
    )  # fmt: skip
    proc.wait_for("agent up")
    proc.wait_for("[GPU-Watcher] baseline")
    node.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(node)
    assert proc.wait(60) == 1, proc.output
    assert "MIG configuration change detected" in proc.log
    # one process: the launcher became gpu-supervise, the agent's parent is the PID we started
    assert f"parent {proc.pid}\n" in proc.stdout
    # the agent got the environment we were given, not the bootloader's nor the launcher's
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


# -- what the folder needs from the image: nothing --------------------------------------------


def _needed_glibc(path: Path) -> tuple[int, ...]:
    """The highest GLIBC_x.y among the undefined dynamic symbols objdump lists for path."""
    out = subprocess.run(
        ["objdump", "-T", str(path)], capture_output=True, text=True, check=True,
        env={**os.environ, "LC_ALL": "C"},
    ).stdout  # fmt: skip
    versions = [
        tuple(int(x) for x in m.groups() if x)
        for line in out.splitlines()
        if "*UND*" in line
        for m in [GLIBC.search(line)]
        if m
    ]
    return max(versions, default=(0,))


def test_build_prints_the_glibc_floor_and_bundles_a_glibc_that_meets_it(
    binary_build: tuple[Path, str],
):
    exe, printed = binary_build
    internal = exe.parent / "_internal"
    floor = re.search(r"^glibc floor: GLIBC_([\d.]+), needed by (\S+)", printed, re.M)
    bundled = re.search(r"^bundled glibc ([\d.]+) ", printed, re.M)
    assert floor and bundled, printed
    # the floor the script printed is the one objdump finds, read a different way
    elves = [
        p
        for p in internal.rglob("*")
        if p.is_file() and not p.is_symlink() and p.read_bytes()[:4] == b"\x7fELF"
        and not GLIBC_FILES.match(p.name)
    ]  # fmt: skip
    assert len(elves) > 10
    by_file = {p: _needed_glibc(p) for p in elves}
    highest = max(by_file.values())
    assert floor[1] == ".".join(map(str, highest)), printed
    assert by_file[internal / floor[2]] == highest
    assert tuple(map(int, bundled[1].split("."))) >= highest
    # the launcher is static: no program interpreter, no libc of the image
    headers = subprocess.run(["readelf", "-l", str(exe)], capture_output=True, text=True).stdout
    assert "Program Headers" in headers and "interpreter" not in headers
    assert (internal / "ld" / "gpu-supervise").is_symlink()


# -- gpu-supervise install DIR -------------------------------------------------------------------


def test_install_copies_the_running_folder(binary: Path, tmp_path: Path):
    target = tmp_path / "volume" / "supervise"
    for _ in range(2):  # the second time over the first copy, as a re-run init container does
        done = subprocess.run([str(binary), "install", str(target)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"installed {target}/gpu-supervise (from {binary.parent})\n"
    assert sorted(p.name for p in target.iterdir()) == ["_internal", "gpu-supervise"]
    assert (target / "_internal/ld/gpu-supervise").is_symlink()  # links stay links
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == sorted(
        p.relative_to(binary.parent) for p in binary.parent.rglob("*")
    )
    copy = subprocess.run([str(target / "gpu-supervise"), "--version"], capture_output=True)
    assert copy.returncode == 0 and copy.stdout.startswith(b"gpu-supervise ")


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], "required: DIR"),
        (["a", "b"], "unrecognized arguments: b"),
        (["--bogus", "a"], "unrecognized arguments: --bogus"),
        (["{self}"], "is where this gpu-supervise already is"),
        (["{self}/_internal/x"], "is where this gpu-supervise already is"),
    ],
)
def test_install_usage_errors(binary: Path, args: list[str], expected: str):
    args = [a.format(self=binary.parent) for a in args]
    before = sorted(binary.parent.rglob("*"))
    out = subprocess.run([str(binary), "install", *args], capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith("gpu-supervise: ") and out.stderr.count("\n") == 1, out.stderr
    assert expected in out.stderr
    assert sorted(binary.parent.rglob("*")) == before


def test_install_failure_is_one_line(binary: Path, tmp_path: Path):
    (tmp_path / "file").write_text("")
    out = subprocess.run(
        [str(binary), "install", str(tmp_path / "file")], capture_output=True, text=True
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"gpu-supervise: cannot install into {tmp_path / 'file'}: ")


def test_install_needs_the_self_contained_binary(tmp_path: Path):
    out = run(["install", str(tmp_path / "x")], {**os.environ})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "build one with packaging/build-binary.sh" in out.stderr
    assert not (tmp_path / "x").exists()


# -- a real container runtime --------------------------------------------------------------------

PODMAN_FLAGS = [
    "--runtime", "runc",  # crun fails on this hybrid cgroup setup; runc works
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096",  # raising rlimits is refused
    "--network", "none", "--log-driver", "k8s-file",
]  # fmt: skip
# The root filesystem is only read: no writable /tmp either (readOnlyRootFilesystem, no emptyDir)
READ_ONLY = ["--read-only", "--read-only-tmpfs=false"]


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
def podman(tmp_path_factory: pytest.TempPathFactory, podman_runroot: Path) -> list[str]:
    exe = shutil.which("podman")
    if exe is None or shutil.which("runc") is None:
        missing_capability(
            "podman/runc not installed (Debian packages podman runc; .ci/run installs them)"
        )
    store = tmp_path_factory.mktemp("podman")
    cmd = [exe, "--storage-driver", "vfs", "--root", str(store / "root"),
           "--runroot", str(podman_runroot / "binary")]  # fmt: skip
    rootfs = store / "probe-rootfs"
    _copy_with_libraries(rootfs, [Path("/bin/true")])
    probe = subprocess.run(
        [*cmd, "run", "--rm", *PODMAN_FLAGS, "--rootfs", str(rootfs), "/bin/true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if probe.returncode != 0:
        missing_capability(f"podman cannot run containers here: {probe.stderr.strip()[-300:]}")
    return cmd


BULLSEYE_MIRRORS = ("http://deb.debian.org/debian", "http://archive.debian.org/debian")


@pytest.fixture(scope="session")
def bullseye_rootfs() -> Path:
    """A Debian 11 minbase root filesystem (glibc 2.31), the agent image of the tests.

    debootstrap takes about 30 s, so the tree is kept outside the repository, one per ISO week
    ($XDG_CACHE_HOME/gpu-supervise-tests/bullseye-minbase-YEAR-Wnn, older weeks removed), and
    containers only ever see it through an overlay (`--rootfs DIR:O`): it is never written.
    """
    if shutil.which("debootstrap") is None:
        missing_capability("debootstrap not installed (Debian package debootstrap; .ci/run has it)")
    if os.geteuid() != 0:
        missing_capability("debootstrap needs root")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpu-supervise-tests"
    year, week, _ = date.today().isocalendar()
    rootfs = cache / f"bullseye-minbase-{year}-W{week:02d}"
    if (rootfs / "etc/debian_version").is_file():
        return rootfs
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob("bullseye-minbase-*"):
        shutil.rmtree(old, ignore_errors=True)
    work = cache / f".building-{os.getpid()}"
    failures = []
    mirrors = [m for m in (os.environ.get("BULLSEYE_MIRROR"), *BULLSEYE_MIRRORS) if m]
    for mirror in mirrors:
        shutil.rmtree(work, ignore_errors=True)
        out = subprocess.run(
            ["debootstrap", "--variant=minbase", "bullseye", str(work), mirror],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if out.returncode == 0:
            break
        failures.append(f"{mirror}: {(out.stdout + out.stderr).strip()[-300:]}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        missing_capability(f"debootstrap bullseye failed (Debian archive unreachable?): {failures}")
    work.rename(rootfs)
    return rootfs


@pytest.fixture(scope="session")
def images(binary: Path, podman: list[str], tmp_path_factory: pytest.TempPathFactory):
    """The recipes of packaging/, built by podman from the build: "init" (Dockerfile.init,
    FROM scratch) and "agent" (Dockerfile on a base image holding nothing at all, as a
    distroless agent image: `--from scratch` stands in for its FROM line)."""
    context = tmp_path_factory.mktemp("context")
    shutil.copytree(binary.parent, context / "dist/gpu-supervise", symlinks=True)
    (context / "examples").mkdir()
    shutil.copy2(ROOT / "examples/config.toml", context / "examples")
    shutil.copy2(ROOT / ".dockerignore", context)  # the recipes build with it in force
    tag = f"localhost/gpu-supervise-test-{os.getpid()}"
    built: dict[str, str] = {}
    try:
        for name, recipe, extra in [("init", "Dockerfile.init", []),
                                    ("agent", "Dockerfile", ["--from", "scratch"])]:  # fmt: skip
            out = subprocess.run(
                [*podman, "build", "-q", *extra, "-f", str(ROOT / "packaging" / recipe),
                 "-t", f"{tag}-{name}", str(context)],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert out.returncode == 0, f"podman build -f packaging/{recipe}:\n{out.stderr}"
            built[name] = f"{tag}-{name}"
        yield built
    finally:
        for image in built.values():
            subprocess.run([*podman, "rmi", "-f", image], capture_output=True, timeout=120)


def test_agent_image_recipe_runs_with_no_libc_at_all(
    images: dict[str, str], podman: list[str], fake_node: FakeNode, tmp_path: Path
):
    """packaging/Dockerfile on an empty base: no libc, no shell, a read-only root and no
    writable /tmp. Its ENTRYPOINT (PID 1) supervises the command given, here the binary's own
    snapshot, which loads the fake NVML (mounted in) with the bundled glibc; the default
    configuration path holds examples/config.toml, and it loads."""
    nvml = tmp_path / "nvml"
    nvml.mkdir()
    shutil.copy2(fake_node.lib_dir / "libnvidia-ml.so.1", nvml)
    dgx_a100(["1g.5gb"] * 7, ["3g.20gb"] * 2).write(nvml / "node.txt")
    out = subprocess.run(
        [*podman, "run", "--rm", *PODMAN_FLAGS, *READ_ONLY, "-v", f"{nvml}:/nvml:ro",
         "-e", "LD_LIBRARY_PATH=/nvml", "-e", "FAKE_NVML_NODE=/nvml/node.txt",
         images["agent"], "/opt/gpu-supervise/gpu-supervise", "snapshot", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "gpu-supervise[1] INFO    started /opt/gpu-supervise/gpu-supervise" in out.stderr
    env = {**fake_node.env, "FAKE_NVML_NODE": str(nvml / "node.txt")}
    assert json.loads(out.stdout) == json.loads(run(["snapshot", "--json"], env).stdout)


# The agent, from the Debian 11 image: prints what it runs on and the UUIDs it sees through the
# shipped binary (as a real agent caches NVML handles), then idles, logging SIGUSR1.
BULLSEYE_AGENT = """#!/bin/sh
trap 'echo "agent $$ got USR1"' USR1
echo "agent $$ begin"
echo "debian $(cat /etc/debian_version)"
ldd --version | head -n 1
echo "pid 1 is $(cat /proc/1/comm)"
/supervise/gpu-supervise snapshot
echo "agent $$ end"
while :; do sleep 1 & wait $!; done
"""


def test_init_container_installs_and_a_debian_11_agent_restarts_after_a_change(
    binary: Path,
    podman: list[str],
    bullseye_rootfs: Path,
    images: dict[str, str],
    fake_node: FakeNode,
    tmp_path: Path,
):
    """The Kubernetes init-container pattern with podman: the image of packaging/Dockerfile.init
    (`gpu-supervise install /supervise`, in an image holding nothing else) fills a volume; the
    agent container (Debian 11, glibc 2.31, read-only root) runs /supervise/gpu-supervise as
    PID 1 with --restart on-failure; a topology change exits 1, the runtime restarts it, and
    the new agent sees the new UUIDs."""
    agent = tmp_path / "agent"
    agent.mkdir()
    (agent / "agent.sh").write_text(BULLSEYE_AGENT)
    (agent / "agent.sh").chmod(0o755)
    nvml = tmp_path / "nvml"
    nvml.mkdir()
    shutil.copy2(fake_node.lib_dir / "libnvidia-ml.so.1", nvml)
    termination = tmp_path / "termination-log"
    termination.write_text("")
    old = dgx_a100(["1g.5gb"] * 7, count=2)
    old.write(nvml / "node.txt")

    tag = f"gpu-supervise-test-{os.getpid()}"
    volume, name = f"{tag}-supervise", f"{tag}-agent"
    subprocess.run([*podman, "rm", "-f", name], capture_output=True)
    subprocess.run([*podman, "volume", "rm", "-f", volume], capture_output=True)
    created = subprocess.run([*podman, "volume", "create", volume], capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    try:
        init = subprocess.run(
            [*podman, "run", "--rm", *PODMAN_FLAGS, *READ_ONLY, "-v", f"{volume}:/supervise",
             images["init"]],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        assert init.stdout == "installed /supervise/gpu-supervise (from /opt/gpu-supervise)\n"

        started = subprocess.run(
            [*podman, "run", "-d", "--name", name, "--restart", "on-failure", *PODMAN_FLAGS,
             *READ_ONLY, "-v", f"{volume}:/supervise:ro", "-v", f"{agent}:/agent:ro",
             "-v", f"{nvml}:/nvml", "-v", f"{termination}:/dev/termination-log",
             "-e", "LD_LIBRARY_PATH=/nvml", "-e", "FAKE_NVML_NODE=/nvml/node.txt",
             "--rootfs", f"{bullseye_rootfs}:O",
             "/supervise/gpu-supervise", *FAST, "--", "/agent/agent.sh"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        logs = _wait_logs(podman, name, "end", count=1)
        assert "gpu-supervise[1] INFO    started /agent/agent.sh" in logs  # PID 1
        first = _agent_views(logs)[0]
        assert "debian 11." in first and "GLIBC 2.31" in first, first  # the image's libc
        assert "pid 1 is gpu-supervise\n" in first  # named as itself, not as the loader
        assert all(u in first for u in old.uuids())

        new = old.copy()
        new.gpu(0).set_layout(["3g.20gb"] * 2)
        new.write(nvml / "node.txt")
        logs = _wait_logs(podman, name, "end", count=2)
        second = _agent_views(logs)[1]
        assert all(u in second for u in new.uuids())
        assert not any(u in second for u in set(old.uuids()) - set(new.uuids()))
        assert "MIG configuration change detected" in logs
        assert int(_inspect(podman, name, "{{.RestartCount}}")) >= 1
        assert termination.read_text().startswith("gpu-supervise: GPU topology changed")

        # signals reach the agent through PID 1 (a one-file bootloader in front would drop it)
        subprocess.run([*podman, "kill", "--signal", "USR1", name], check=True, timeout=60)
        _wait_logs(podman, name, "got USR1", count=1)
    finally:
        subprocess.run([*podman, "rm", "-f", "-t", "2", name], capture_output=True, timeout=120)
        subprocess.run([*podman, "volume", "rm", "-f", volume], capture_output=True, timeout=60)


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
