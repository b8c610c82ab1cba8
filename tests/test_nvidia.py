"""Our fakes held to NVIDIA's own code, from Debian's non-free archive (tests/nvidia_debian.py):
the fake libnvidia-ml.so.1 to nvml.h and to the library's entry points and error texts,
gpu-supervise to NVIDIA's library on a machine without the driver, tests/gpu/fake-nvidia-smi to
NVIDIA's nvidia-smi there. And the fake's device files: real NVML holds /dev/nvidiactl and
/dev/nvidia<N> open while initialised, so the fake opens files of its own in their place."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import nvidia_debian
from conftest import AGENT, FakeNode, Proc, clean_env, gpu_supervise_cmd, missing_capability, run
from fakenvml import DRIVER_NOT_LOADED, SOURCE, build_library, dgx_a100

TESTS = Path(__file__).parent
FAKE_SMI = TESTS / "gpu" / "fake-nvidia-smi"
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0.2", "--log-level", "DEBUG"]
CAP_MKNOD = 27
NO_DRIVER_LINE = "gpu-supervise: NVML is not usable: Driver Not Loaded (no NVIDIA driver here"


@pytest.fixture(scope="session")
def nvidia() -> nvidia_debian.NvidiaParts:
    """NVIDIA's libnvidia-ml.so.1, nvidia-smi and nvml.h, unpacked (downloaded once a week)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpu-supervise-tests"
    try:
        return nvidia_debian.cached(cache)
    except nvidia_debian.Unavailable as exc:
        missing_capability(f"NVIDIA's packages from Debian's non-free archive: {exc}")


def _no_mknod() -> list[str]:
    """The prefix that runs NVIDIA's code without CAP_MKNOD. Run as root on a machine without
    the driver's device files, libnvidia-ml creates /dev/nvidiactl (mknod, mode 0666) before it
    finds no driver behind it: without the capability it cannot, and answers the same."""
    status = Path("/proc/self/status").read_text()
    effective = int(re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    if not effective >> CAP_MKNOD & 1:
        return []
    if shutil.which("setpriv") is None:
        missing_capability("setpriv (Debian package util-linux), to run NVIDIA's NVML as root")
    return ["setpriv", "--bounding-set=-mknod"]


@pytest.fixture
def no_driver(nvidia: nvidia_debian.NvidiaParts) -> Iterator[tuple[list[str], dict[str, str]]]:
    """(command prefix, environment) that run a command on NVIDIA's library, on a machine
    without NVIDIA's kernel module; and after the test, /dev as it was before."""
    if Path("/proc/driver/nvidia").exists():
        missing_capability("an NVIDIA driver is loaded here; these tests need a machine with none")
    devices = sorted(Path("/dev").glob("nvidia*"))
    env = clean_env(LD_LIBRARY_PATH=str(nvidia.lib_dir), GPU_SUPERVISE_REPORT_TERMINATION_LOG="")
    yield _no_mknod(), env
    assert sorted(Path("/dev").glob("nvidia*")) == devices, "NVIDIA's library changed /dev"


@pytest.fixture(params=["console script", "binary"])
def gpu_supervise(request: pytest.FixtureRequest) -> list[str]:
    """gpu-supervise as installed by pip, and as the self-contained binary."""
    if request.param == "binary":
        exe, _ = request.getfixturevalue("binary_build")
        return [str(exe)]
    return gpu_supervise_cmd()


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


# -- the header -------------------------------------------------------------------------------


def test_the_fake_builds_against_nvidias_header_and_answers_as_built_alone(
    nvidia: nvidia_debian.NvidiaParts, fake_node: FakeNode, tmp_path: Path
):
    checked = build_library(tmp_path / "checked", nvidia.include_dir).parent
    fake_node.write(dgx_a100(["1g.5gb"] * 7, ["3g.20gb", "3g.20gb"], None, ["7g.40gb"]))
    alone = run(["snapshot", "--json"], fake_node.env)
    header = run(["snapshot", "--json"], {**fake_node.env, "LD_LIBRARY_PATH": str(checked)})
    assert alone.returncode == 0 and len(json.loads(alone.stdout)["gpus"]) == 8
    assert (header.returncode, header.stdout, header.stderr) == (0, alone.stdout, alone.stderr)


# Mistakes a C compiler alone accepts and nvml.h must not: (text of fake_nvml.c, replacement,
# what the failed build says).
MISTAKES = {
    "int for the pstate enum": (
        "nvmlDeviceGetPerformanceState(nvmlDevice_t device, nvmlPstates_t *pstate)",
        "nvmlDeviceGetPerformanceState(nvmlDevice_t device, int *pstate)",
        ["conflicting types for", "nvmlDeviceGetPerformanceState"],
    ),
    "int for the sensor enum": (
        "nvmlDeviceGetTemperature(nvmlDevice_t device, nvmlTemperatureSensors_t sensor,",
        "nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor,",
        ["conflicting types for", "nvmlDeviceGetTemperature"],
    ),
    "two struct fields swapped": (
        "    unsigned int pciDeviceId;\n    unsigned int pciSubSystemId;\n",
        "    unsigned int pciSubSystemId;\n    unsigned int pciDeviceId;\n",
        ["nvmlPciInfo_t.pciDeviceId: offset, size or type differs from nvml.h"],
    ),
    "a struct field too small": (
        "    unsigned long long memorySizeMB;\n",
        "    unsigned int memorySizeMB;\n",
        ["nvmlDeviceAttributes_t: size or alignment differs from nvml.h"],
    ),
    "a return code of its own": (
        "OWN(NVML_ERROR_NOT_FOUND) = 6,",
        "OWN(NVML_ERROR_NOT_FOUND) = 5,",
        ["NVML_ERROR_NOT_FOUND: value differs from nvml.h"],
    ),
    "an entry point NVML does not have": (
        "nvmlReturn_t nvmlInit_v2(void)",
        "nvmlReturn_t nvmlDeviceGetBogus(void) { return NVML_SUCCESS; }\n"
        "nvmlReturn_t nvmlInit_v2(void)",
        ["nvmlDeviceGetBogus", "missing-prototypes"],
    ),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_header_build_fails_on_a_mistake_the_stand_alone_build_accepts(
    mistake: str, nvidia: nvidia_debian.NvidiaParts, tmp_path: Path
):
    old, new, says = MISTAKES[mistake]
    text = SOURCE.read_text()
    assert text.count(old) == 1, (
        f"fake_nvml.c changed: the planted mistake no longer applies:\n{old}"
    )
    source = tmp_path / "fake_nvml.c"
    source.write_text(text.replace(old, new))
    build_library(tmp_path / "alone", source=source)
    with pytest.raises(RuntimeError) as failed:
        build_library(tmp_path / "checked", nvidia.include_dir, source)
    for words in says:
        assert words in str(failed.value)


def _exports(lib: Path) -> set[str]:
    if shutil.which("nm") is None:
        missing_capability("nm (Debian package binutils, which gcc brings)")
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def test_the_fake_exports_only_entry_points_nvidias_library_has(
    nvidia: nvidia_debian.NvidiaParts, fake_lib_dir: Path
):
    ours = _exports(fake_lib_dir / "libnvidia-ml.so.1")
    theirs = _exports(nvidia.lib_dir / "libnvidia-ml.so.1")
    assert {"nvmlInit_v2", "nvmlShutdown", "nvmlDeviceGetMigMode"} <= ours
    assert ours <= theirs, f"not in NVIDIA's library: {sorted(ours - theirs)}"


ERROR_TEXTS = """
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
lib.nvmlErrorString.restype = ctypes.c_char_p
lib.nvmlErrorString.argtypes = [ctypes.c_int]
print(json.dumps({code: lib.nvmlErrorString(code).decode() for code in json.loads(sys.argv[2])}))
"""


def test_the_fakes_error_texts_are_nvidias(nvidia: nvidia_debian.NvidiaParts, fake_lib_dir: Path):
    """C and Go agents print nvmlErrorString's text (nvidia-ml-py has its own for most codes).
    Each library is loaded in a process of its own, and NVML is never initialised."""
    codes = json.dumps([*range(-1, 40), 998, 999, 1000])

    def texts(lib_dir: Path) -> dict[str, str]:
        cmd = [sys.executable, "-c", ERROR_TEXTS, str(lib_dir / "libnvidia-ml.so.1"), codes]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    theirs = texts(nvidia.lib_dir)
    assert theirs["9"] == "Driver Not Loaded"
    assert texts(fake_lib_dir) == theirs


# -- NVIDIA's library without a driver ----------------------------------------------------------


@pytest.mark.parametrize("args", [["snapshot"], ["snapshot", "--json"]])
def test_snapshot_on_nvidias_library_without_a_driver_says_so_and_exits_1(
    args: list[str], gpu_supervise: list[str], no_driver: tuple[list[str], dict[str, str]]
):
    prefix, env = no_driver
    out = _run([*prefix, *gpu_supervise, *args], env)
    assert out.returncode == 1
    assert out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(NO_DRIVER_LINE)


def test_the_fakes_driver_not_loaded_reads_as_nvidias_library_without_a_driver(
    fake_node: FakeNode, no_driver: tuple[list[str], dict[str, str]]
):
    prefix, env = no_driver
    fake_node.write(dgx_a100().fail("nvmlInit", DRIVER_NOT_LOADED))
    for args in (["snapshot"], ["snapshot", "--json"]):
        theirs = _run([*prefix, *gpu_supervise_cmd(), *args], env)
        ours = _run([*gpu_supervise_cmd(), *args], fake_node.env)
        assert theirs.stderr.startswith(NO_DRIVER_LINE)
        assert (ours.returncode, ours.stdout, ours.stderr) == (
            theirs.returncode, theirs.stdout, theirs.stderr
        )  # fmt: skip


def test_supervising_on_nvidias_library_without_a_driver_never_restarts_the_agent(
    gpu_supervise: list[str],
    no_driver: tuple[list[str], dict[str, str]],
    start_cmd: Callable[..., Proc],
    tmp_path: Path,
):
    prefix, env = no_driver
    pidfile = tmp_path / "agent.pid"
    agent = [*AGENT, "--pidfile", str(pidfile), "--exit-on-term", "7"]
    proc = start_cmd([*prefix, *gpu_supervise, *FAST, "--", *agent], env)
    proc.wait_for("probe 8: topology unchanged", timeout=120)  # the baseline and 7 probes
    assert "<no NVML: Driver Not Loaded>" in proc.stdout  # the agent on NVIDIA's library too
    os.kill(int(pidfile.read_text()), signal.SIGTERM)  # the agent stops by itself, with 7
    assert proc.wait(60) == 7
    log = proc.log_lines()
    baseline = [line for line in log if "baseline:" in line]
    assert len(baseline) == 1 and " WARNING " in baseline[0]
    assert "no GPUs (NVML is not usable: Driver Not Loaded)" in baseline[0]
    assert len([line for line in log if re.search(r" started .* as pid \d+$", line)]) == 1
    started = [line for line in log if ": no configuration file; watching NVML" in line]
    assert len(started) == 1  # the start line names the failure rule ("3 failed probes restart")
    decisions = [line for line in log if line not in started]
    assert not [line for line in decisions if " ERROR " in line or "restart" in line.lower()]
    assert log[-1].endswith("exiting 7: the agent exited with code 7")


# -- nvidia-smi without a driver ----------------------------------------------------------------

QUERY = "--query-gpu=uuid,name,pci.bus_id,mig.mode.current,mig.mode.pending"


@pytest.mark.parametrize(
    "args",
    [[], ["-L"], [QUERY, "--format=csv"], [QUERY, "--format=csv,noheader"], ["-q"]],
    ids=["no arguments", "-L", "query csv", "query csv noheader", "-q"],
)
def test_the_fake_nvidia_smi_without_a_driver_answers_as_nvidias(
    args: list[str],
    nvidia: nvidia_debian.NvidiaParts,
    fake_node: FakeNode,
    no_driver: tuple[list[str], dict[str, str]],
):
    prefix, env = no_driver
    fake_node.write(dgx_a100().fail("nvmlInit", DRIVER_NOT_LOADED))
    theirs = _run([*prefix, str(nvidia.nvidia_smi), *args], env)
    ours = _run([sys.executable, str(FAKE_SMI), *args], fake_node.env)
    assert theirs.returncode == DRIVER_NOT_LOADED and "NVIDIA driver" in theirs.stdout
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        theirs.returncode, theirs.stdout, theirs.stderr
    )  # fmt: skip


# -- the download -----------------------------------------------------------------------------


def _apt_state() -> dict[str, tuple[int, int]]:
    """What apt and dpkg keep on this machine: path -> (size, mtime)."""
    found = {}
    for top in ("/etc/apt", "/var/lib/apt", "/var/cache/apt", "/var/lib/dpkg/status"):
        paths = [Path(top), *Path(top).rglob("*")] if Path(top).is_dir() else [Path(top)]
        for path in paths:
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            found[str(path)] = (st.st_size, st.st_mtime_ns)
    return found


def test_fetching_nvidias_packages_leaves_the_machines_apt_state_alone(tmp_path: Path):
    before = _apt_state()
    try:
        parts = nvidia_debian.download(tmp_path / "fetch")
    except nvidia_debian.Unavailable as exc:
        missing_capability(f"NVIDIA's packages from Debian's non-free archive: {exc}")
    assert _apt_state() == before
    assert sorted(parts.versions) == sorted(nvidia_debian.PACKAGES)
    assert (parts.lib_dir / "libnvidia-ml.so.1").is_file()


# -- the fake's device files ------------------------------------------------------------------

HOLDER = """
import sys, pynvml
for line in sys.stdin:
    getattr(pynvml, line.strip())()
    print("done", flush=True)
"""


class Holder:
    """A process that calls nvmlInit and nvmlShutdown through nvidia-ml-py when told to."""

    def __init__(self, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-c", HOLDER], env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        self.pid = self.popen.pid

    def call(self, function: str) -> None:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(function + "\n")
        self.popen.stdin.flush()
        assert self.popen.stdout.readline() == "done\n", f"{function} failed"

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait()


@pytest.fixture
def holder(fake_node: FakeNode) -> Iterator[Callable[..., Holder]]:
    made: list[Holder] = []

    def _make(env: dict[str, str] | None = None) -> Holder:
        made.append(Holder(env or fake_node.env))
        return made[-1]

    yield _make
    for one in made:
        one.close()


def open_files(pid: int, folder: Path) -> dict[str, int]:
    """The files of `folder` that process `pid` has open: name -> fd."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = Path(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.parent == folder:
            found[target.name] = int(fd)
    return found


def test_a_process_holding_nvml_has_the_device_files_open_until_its_last_shutdown(
    fake_node: FakeNode, holder: Callable[..., Holder]
):
    fake_node.write(dgx_a100(count=2))
    folder = Path(f"{fake_node.path}.dev")
    proc = holder()
    assert open_files(proc.pid, folder) == {}
    proc.call("nvmlInit")
    opened = open_files(proc.pid, folder)
    assert sorted(opened) == ["nvidia0", "nvidia1", "nvidiactl"]
    proc.call("nvmlInit")  # NVML counts its inits: nothing more is opened
    assert open_files(proc.pid, folder) == opened
    proc.call("nvmlShutdown")
    assert open_files(proc.pid, folder) == opened
    proc.call("nvmlShutdown")
    assert open_files(proc.pid, folder) == {}


def test_the_device_files_are_opened_read_write_close_on_exec_in_their_folder(
    fake_node: FakeNode, holder: Callable[..., Holder], tmp_path: Path
):
    fake_node.write(dgx_a100(count=1))
    folder = tmp_path / "dev"  # $FAKE_NVML_DEV_DIR, missing: the library makes it
    proc = holder({**fake_node.env, "FAKE_NVML_DEV_DIR": str(folder)})
    proc.call("nvmlInit")
    opened = open_files(proc.pid, folder)
    assert sorted(opened) == ["nvidia0", "nvidiactl"]
    assert not Path(f"{fake_node.path}.dev").exists()
    for name, fd in opened.items():
        st = (folder / name).stat()
        assert (st.st_size, oct(st.st_mode)) == (0, oct(0o100666))  # any user's process opens it
        fdinfo = Path(f"/proc/{proc.pid}/fdinfo/{fd}").read_text()
        flags = int(re.search(r"^flags:\s*([0-7]+)$", fdinfo, re.M).group(1), 8)
        assert flags & os.O_ACCMODE == os.O_RDWR
        assert flags & 0o2000000, "not close-on-exec: an agent's children would hold the GPU"


def test_only_the_gpus_of_the_node_get_a_device_file(
    fake_node: FakeNode, holder: Callable[..., Holder]
):
    node = dgx_a100(count=3)
    node.gpus.pop(1)  # GPU 1 is gone; 0 and 2 remain at their indices
    fake_node.write(node)
    proc = holder()
    proc.call("nvmlInit")
    assert sorted(open_files(proc.pid, Path(f"{fake_node.path}.dev"))) == [
        "nvidia0", "nvidia2", "nvidiactl",
    ]  # fmt: skip


def test_gpu_supervise_holds_no_device_file_between_probes(
    fake_node: FakeNode, start: Callable[..., Proc]
):
    """Each probe holds NVML for about 150 ms (an injected delay), so the samples see it held;
    between probes, nothing may stay open: gpu-supervise would block a GPU reset."""
    fake_node.write(dgx_a100(count=2).delay(150, fn="nvmlDeviceGetCount"))
    folder = Path(f"{fake_node.path}.dev")
    proc = start(["--interval", "0.2", "--cooldown", "0", "--", *AGENT, "--no-nvml"], fake_node.env)
    held, releases, samples = False, 0, 0
    deadline = time.monotonic() + 120
    while releases < 3:  # three probes seen holding NVML, then releasing all of it
        assert time.monotonic() < deadline, (
            f"{releases} releases in {samples} samples (held now: {held}):\n{proc.log}"
        )
        assert proc.popen.poll() is None, proc.log
        files = open_files(proc.pid, folder)
        samples += 1
        if files:
            held = True
        elif held:
            held, releases = False, releases + 1
        time.sleep(0.005)
