"""Shared fixtures: the fake NVML library, node files, and running the installed binary."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import pytest

from containers import PODMAN_FLAGS, copy_with_libraries
from fakenvml import Node, build_library, procfs_root
from procfs import stat_fields

try:
    from hypothesis import settings
except ImportError:  # the GPU check runs where only pytest is installed
    pass
else:
    # Behaviour, not speed: a loaded CI machine must not turn a slow example into a failure.
    settings.register_profile("gpu-supervise", deadline=None, print_blob=True)
    settings.load_profile("gpu-supervise")

TESTS = Path(__file__).parent
ROOT = TESTS.parent
AGENT = [sys.executable, str(TESTS / "agents" / "agent.py")]

# Every process the tests start inherits this variable (children inherit the environment), so
# whatever outlives its test can be found, even an orphan far from any process tree. The name
# stays out of gpu-supervise's GPU_SUPERVISE_ namespace.
SESSION_MARK = "GS_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex


# CI sets GS_TEST_STRICT=1: there, every capability a test needs (root, podman, debootstrap, a
# PID namespace, a cgroup freezer...) is meant to be present, so a missing one is a failure, not
# a skip that only the -ra summary would show.
STRICT = os.environ.get("GS_TEST_STRICT") == "1"


def missing_capability(reason: str) -> NoReturn:
    """This machine cannot run the test: skipped with the reason, a failure in strict mode."""
    if STRICT:
        pytest.fail(f"strict mode (GS_TEST_STRICT=1), a capability is missing: {reason}")
    pytest.skip(reason)


def marked(name: str, value: str) -> list[int]:
    """The live processes whose environment holds name=value (zombies have none)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_marked(name: str, value: str, grace: float = 0.0) -> list[str]:
    """SIGKILL what carries the mark, after `grace` seconds to go by itself; the command
    lines of what had to be killed."""
    deadline = time.monotonic() + grace
    while (pids := marked(name, value)) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = []
    for pid in pids:
        try:
            killed.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    return killed


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The run fails if any process the tests started is still alive at its end."""
    leaked = kill_marked(SESSION_MARK, os.environ[SESSION_MARK], grace=5.0)
    if leaked:
        sys.stderr.write(
            f"\n{len(leaked)} process(es) started by the tests outlived them (now killed):\n"
            + "".join(f"  {cmd}\n" for cmd in leaked)
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def gpu_supervise_cmd() -> list[str]:
    """The installed console script: tests exercise what users run. The one beside the
    interpreter running the tests comes first (a venv's, perhaps not on PATH), never another
    gpu-supervise that PATH happens to find."""
    beside = Path(sys.executable).parent / "gpu-supervise"
    exe = (
        os.environ.get("GPU_SUPERVISE_BIN")
        or (str(beside) if beside.exists() else None)
        or shutil.which("gpu-supervise")
    )
    if exe is None:
        pytest.fail("gpu-supervise is not installed (pip install -e '.[test]', in the venv the "
                    "tests run with), and GPU_SUPERVISE_BIN names none")  # fmt: skip
    return [exe]


@pytest.fixture(scope="session")
def podman_runroot() -> Iterator[Path]:
    """podman's --runroot, short: podman refuses one longer than 50 characters, and pytest's
    temporary paths grow with every run (/tmp/pytest-of-root/pytest-1234/...)."""
    path = Path(tempfile.mkdtemp(prefix="gs-run-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def binary_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(the executable, what build-binary.sh printed)."""
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run(
        ["bash", str(TESTS.parent / "packaging/build-binary.sh"), str(dist)],
        env={**os.environ, "PYTHON": sys.executable},  # the interpreter running the tests
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode != 0:
        pytest.fail(f"build-binary.sh exited {out.returncode}:\n{out.stdout}\n{out.stderr[-3000:]}")
    exe = dist / "gpu-supervise" / "gpu-supervise"
    assert exe.is_file() and os.access(exe, os.X_OK)
    return exe, out.stdout


@pytest.fixture(scope="session")
def fake_lib_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_library(tmp_path_factory.mktemp("fakenvml")).parent


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_SUPERVISE_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class FakeNode:
    """A node file plus the environment that points NVML at it."""

    path: Path
    lib_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def write(self, node: Node) -> None:
        node.write(self.path)


@pytest.fixture
def node_path(tmp_path: Path, fake_lib_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node file for the fake library, loaded by the real nvidia-ml-py in this process (set
    before nvmlInit)."""
    import ctypes

    import pynvml

    path = tmp_path / "node.txt"
    monkeypatch.setenv("FAKE_NVML_NODE", str(path))
    monkeypatch.setattr(pynvml, "nvmlLib", ctypes.CDLL(str(fake_lib_dir / "libnvidia-ml.so.1")))
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    return path


@pytest.fixture
def fake_node(tmp_path: Path, fake_lib_dir: Path) -> FakeNode:
    path = tmp_path / "node.txt"
    path.write_text("")
    env = clean_env(
        LD_LIBRARY_PATH=str(fake_lib_dir),
        FAKE_NVML_NODE=str(path),
        GPU_SUPERVISE_REPORT_TERMINATION_LOG="",
        # the driver's procfs tree, kept in step with the node file (Node.write): the tripwire
        # is on, as on a GPU node
        GPU_SUPERVISE_WATCH_PROCFS_ROOT=str(procfs_root(path)),
        # the device files the fake opens while NVML is initialised (the holder scan)
        GPU_SUPERVISE_WATCH_DEVICE_DIR=f"{path}.dev",
    )
    return FakeNode(path, fake_lib_dir, env)


class Proc:
    """A running gpu-supervise (or any command) with its stdout and stderr collected apart.

    gpu-supervise logs to stderr and the agent writes to stdout: two writers on one stream can
    interleave within a line (an unbuffered Python agent writes a line and its newline in two
    calls), so timings and markers of gpu-supervise's log are read from `log` alone, and the
    agent's lines from `stdout`. `output` is both, for "does this appear anywhere". Everything
    it starts carries a mark of its own, so close() stops all of it, orphans included."""

    MARK = "GS_TEST_PROC"

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
        base = Path(os.environ.get("TMPDIR", "/tmp")) / f"gs-{os.getpid()}-{id(self)}"
        self.log_path = base.with_name(base.name + ".log")
        self.stdout_path = base.with_name(base.name + ".out")
        self._files = [open(p, "w+b") for p in (self.stdout_path, self.log_path)]  # noqa: SIM115
        self.mark = uuid.uuid4().hex
        self.popen = subprocess.Popen(
            args,
            env={**env, self.MARK: self.mark},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._files[0],
            stderr=self._files[1],
        )
        self.pid = self.popen.pid

    @property
    def log(self) -> str:
        """stderr: gpu-supervise's log (and whatever the agent writes to stderr)."""
        return self.log_path.read_bytes().decode(errors="replace")

    @property
    def stdout(self) -> str:
        """stdout: the agent's output (gpu-supervise writes nothing there)."""
        return self.stdout_path.read_bytes().decode(errors="replace")

    @property
    def output(self) -> str:
        return self.stdout + self.log

    def log_lines(self) -> list[str]:
        """gpu-supervise's own log lines: those that start with its timestamp (text format)."""
        return [line for line in self.log.splitlines() if LOG_LINE.match(line)]

    def wait_for(self, text: str, timeout: float = 30.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output
            if out.count(text) >= count:
                return out
            if self.popen.poll() is not None:
                out = self.output
                if out.count(text) >= count:
                    return out
                raise AssertionError(f"exited {self.popen.returncode} before {text!r}:\n{out}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output}")

    def wait_for_new(self, text: str, timeout: float = 30.0) -> str:
        """Wait for one more occurrence of `text` than the output holds now."""
        return self.wait_for(text, timeout, count=self.output.count(text) + 1)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.output}") from None

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def close(self) -> None:
        """Stop gpu-supervise and everything it started: the agent is in a process group of
        its own, and its daemons may be in sessions of their own."""
        kill_marked(self.MARK, self.mark)
        self.popen.kill()
        self.popen.wait()
        kill_marked(self.MARK, self.mark)  # anything forked meanwhile
        for fh in self._files:
            fh.close()
        self.log_path.unlink(missing_ok=True)
        self.stdout_path.unlink(missing_ok=True)


# A text log line: `2026-11-30T05:45:23.361+00:00 gpu-supervise[PID] LEVEL   message`.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d gpu-supervise\[\d+\] ")


def log_stamp(lines: list[str], marker: str) -> datetime:
    """The log's own timestamp of the first gpu-supervise line holding `marker`."""
    line = next(line for line in lines if marker in line and LOG_LINE.match(line))
    return datetime.fromisoformat(line.split()[0])


@pytest.fixture
def start_cmd() -> Iterator[Callable[..., Proc]]:
    """Start any command as a Proc; every one is closed (its whole tree stopped) at the end."""
    procs: list[Proc] = []

    def _start(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> Proc:
        proc = Proc(cmd, env, cwd)
        procs.append(proc)
        return proc

    yield _start
    for proc in procs:
        proc.close()


@pytest.fixture
def start(start_cmd: Callable[..., Proc]) -> Callable[..., Proc]:
    """Start the installed gpu-supervise with these arguments."""
    return lambda args, env, cwd=None: start_cmd(gpu_supervise_cmd() + args, env, cwd)


def run(
    args: list[str], env: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gpu_supervise_cmd() + args,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def pid_alive(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# -- the binary and containers, shared by the modules that run them -------------------------------


@pytest.fixture(scope="session")
def binary(binary_build: tuple[Path, str]) -> Path:
    """The executable of the shipped folder: DIST/gpu-supervise/gpu-supervise."""
    return binary_build[0]


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
    copy_with_libraries(rootfs, [Path("/bin/true")])
    probe = subprocess.run(
        [*cmd, "run", "--rm", *PODMAN_FLAGS, "--rootfs", str(rootfs), "/bin/true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if probe.returncode != 0:
        missing_capability(f"podman cannot run containers here: {probe.stderr.strip()[-300:]}")
    return cmd


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


def wait_until(condition: Callable[[], bool], failure: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.005)


STALLED_FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


def stalled_collector(fake_node: FakeNode, tmp_path: Path, stop_timeout: str):
    """gpu-supervise whose stderr pipe the agent fills (a chatty agent, a stalled collector):
    returns the process, once the pipe is full and nothing of gpu-supervise's can get out."""
    out = tmp_path / "out"
    agent = "echo up; head -c 300000 /dev/zero >&2; exec sleep 300"  # blocks on the full pipe
    cmd = [*gpu_supervise_cmd(), *STALLED_FAST, "--stop-timeout", stop_timeout,
           "--termination-log", str(tmp_path / "termination-log"),
           "--", "sh", "-c", agent]  # fmt: skip
    (tmp_path / "termination-log").write_text("")
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(cmd, env=fake_node.env, stdout=stdout, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while b"up" not in out.read_bytes():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(1)  # the baseline and a few probes queued behind the agent's 300 kB
    return proc
