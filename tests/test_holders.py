"""Naming whoever blocks a GPU reset: the processes with an NVIDIA device file open.

The fake NVML opens <node>.dev/nvidiactl and nvidia<N> while it is initialised, as NVIDIA's
library opens /dev/nvidiactl and /dev/nvidia<N>; the scan reads the links in /proc/PID/fd for
real. conftest's fake_node points gpu-supervise's watch.device_dir there. Tests that run
processes are marked slow: the mutation run (tests/mutation/run.py) leaves them out."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import AGENT, FakeNode, Proc, missing_capability
from fakenvml import dgx_a100, reset_gpu
from gpu_supervise import holders, procs
from gpu_supervise.events import holders_line
from gpu_supervise.holders import container_id, is_device, scan

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0.3", "--stop-timeout", "2"]
BLOCKED = "the GPU reset is blocked by"
FREE = "no process holds an NVIDIA device open: the GPU reset can go ahead"
# The line once no holder is left: FREE, or where some process cannot be read (a machine's init
# with capabilities root lacks) "the GPU reset may be blocked: ...; no other process holds ...".
NONE_LEFT = "process holds an NVIDIA device open"


def test_the_device_files_of_a_gpu_holder():
    for path in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia15", "/dev/nvidia-caps/nvidia-cap1"):
        assert is_device(path, "/dev"), path
    for path in ("/dev/nvidia-uvm", "/dev/nvidia", "/dev/nvidia-caps/", "/dev/null",
                 "/devx/nvidiactl", "/dev/nvidia0x", "socket:[1234]"):  # fmt: skip
        assert not is_device(path, "/dev"), path
    assert is_device("/tmp/n.dev/nvidia3", "/tmp/n.dev/")
    assert is_device("/tmp/devX/nvidia3", "/tmp/devX")


# What /proc/PID/cgroup reads in a container of each runtime.
CGROUPS = {
    "docker": "0::/system.slice/docker-{id}.scope\n",
    "containerd (Kubernetes, cgroup v2)": (
        "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b.slice/"
        "cri-containerd-{id}.scope\n"
    ),
    "cri-o": "0::/kubepods.slice/kubepods-pod1a2b.slice/crio-{id}.scope\n",
    "podman": "0::/machine.slice/libpod-{id}.scope/container\n",
    "cgroup v1": "12:pids:/kubepods/besteffort/pod1a2b/{id}\n11:cpuset:/kubepods/pod1a2b/{id}\n",
}


@pytest.mark.parametrize("runtime", CGROUPS)
def test_the_container_id_of_each_runtime(runtime: str):
    cid = "0123456789abcdef" * 4
    assert container_id(CGROUPS[runtime].format(id=cid)) == cid


OUTER, INNER = "a" * 64, "b" * 64
# A container in a container: kind's nodes (containerd in a Docker container), a runtime in a
# Docker container; under cgroup v1 the inner runtime may own only some hierarchies.
NESTED = {
    "kind": (
        f"0::/system.slice/docker-{OUTER}.scope/kubelet.slice/kubelet-kubepods.slice/"
        f"kubelet-kubepods-besteffort.slice/cri-containerd-{INNER}.scope\n"
    ),
    "podman in docker": f"0::/system.slice/docker-{OUTER}.scope/libpod-{INNER}.scope/container\n",
    "cgroup v1": f"12:pids:/docker/{OUTER}/docker/{INNER}\n11:cpuset:/docker/{OUTER}\n",
    "cgroup v1, the outer line last": f"12:pids:/docker/{OUTER}/{INNER}\n0::/docker/{OUTER}\n",
    # The path is all that follows the second colon, whatever it holds; of equal depths, the
    # last line's.
    "a path of any characters": f"1:pids:/a b:c/d/{INNER}\n2:cpu:/e/{OUTER}\n",
    "equal depths": f"12:pids:/docker/{OUTER}\n11:cpuset:/docker/{INNER}\n",
}


@pytest.mark.parametrize("nesting", NESTED)
def test_a_container_in_a_container_is_the_inner_one(nesting: str):
    assert container_id(NESTED[nesting]) == INNER


def test_a_holder_is_who_it_is_and_a_scan_the_set_of_them():
    """The pid with the start time: not the command line, nor the devices."""
    a = holders.Holder(7, "nvidia-smi", "", ("/dev/nvidiactl",), 1234)
    assert a.key() == (7, 1234)
    b = holders.Holder(7, "sleep 300", "c" * 64, ("/dev/nvidia0",), 1234)
    c = holders.Holder(8, "nvidia-smi", "", ("/dev/nvidiactl",), 1234)
    assert holders.Scan([a, c], 0, False).key() == frozenset({(7, 1234), (8, 1234)})
    assert holders.Scan([a], 0, False).key() == holders.Scan([b], 5, True).key()


def test_no_container_id_on_the_host():
    assert container_id("0::/user.slice/user-0.slice/session-1.scope\n") == ""
    assert container_id("0::/system.slice/nvidia-persistenced.service\n") == ""


@pytest.fixture
def holder(fake_node: FakeNode) -> Iterator[subprocess.Popen[bytes]]:
    """A process that keeps NVML open (the fake's device files with it), as DCGM would."""
    fake_node.write(dgx_a100(count=2))
    proc = subprocess.Popen([*AGENT, "--hold-nvml"], env=fake_node.env,
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    assert b"ready" in proc.stdout.readline() + proc.stdout.readline()
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_a_process_holding_nvml_is_found_with_its_devices(fake_node: FakeNode, holder):
    found = scan(f"{fake_node.path}.dev")
    (h,) = [h for h in found.holders if h.pid == holder.pid]
    assert h.devices == tuple(f"{fake_node.path}.dev/{n}" for n in ("nvidia0", "nvidia1",
                                                                    "nvidiactl"))  # fmt: skip
    assert "agent.py --hold-nvml" in h.cmdline
    assert os.getpid() not in [x.pid for x in found.holders]
    holder.kill()
    holder.wait()
    assert holder.pid not in [x.pid for x in scan(f"{fake_node.path}.dev").holders]


# Opens the fake's device files as NVML would, keeps them across an exec, and becomes `sleep`:
# the same process, the same files, another command line (as a dying process's, which the
# kernel empties before it closes the files).
EXECS = """
import os, sys
os.makedirs(sys.argv[1], exist_ok=True)  # the fake makes them on nvmlInit: made here alike
fds = [os.open(os.path.join(sys.argv[1], n), os.O_RDWR | os.O_CREAT, 0o666)
       for n in ("nvidiactl", "nvidia0")]
for fd in fds:
    os.set_inheritable(fd, True)
print("open", flush=True)
sys.stdin.readline()
os.execv("/bin/sleep", ["sleep", "300"])
"""


@pytest.mark.slow
def test_a_holder_whose_command_line_changes_is_the_same_holder(fake_node: FakeNode):
    """The hold says who blocks the reset again only when the set of holders changes; a new
    command line for the same process is not a change."""
    fake_node.write(dgx_a100(count=1))
    devices = f"{fake_node.path}.dev"
    proc = subprocess.Popen([sys.executable, "-c", EXECS, devices], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "open\n"
        before = scan(devices)
        proc.stdin.write("exec\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while "sleep 300" not in Path(f"/proc/{proc.pid}/cmdline").read_text().replace("\0", " "):
            assert time.monotonic() < deadline, "never became sleep"
            time.sleep(0.05)
        after = scan(devices)
        [was] = [h for h in before.holders if h.pid == proc.pid]
        [now] = [h for h in after.holders if h.pid == proc.pid]
        assert "sleep" not in was.cmdline and now.cmdline == "sleep 300"
        assert was.devices == now.devices
        assert before.key() == after.key()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_processes_that_come_and_go_mid_scan_are_never_an_error(fake_node: FakeNode, holder):
    churn = subprocess.Popen(["sh", "-c", "while :; do /bin/true & /bin/true & wait; done"])
    try:
        for _ in range(50):
            assert holder.pid in [h.pid for h in scan(f"{fake_node.path}.dev").holders]
    finally:
        churn.kill()
        churn.wait()


@pytest.mark.slow
def test_what_cannot_be_read_is_counted_not_guessed(fake_node: FakeNode, holder, tmp_path):
    """As nobody, root's processes' descriptors are closed: they are counted, never listed."""
    setpriv, python = shutil.which("setpriv"), Path("/usr/bin/python3")
    if os.geteuid() != 0 or setpriv is None or not python.exists():
        missing_capability("needs root, setpriv (util-linux) and /usr/bin/python3")
    folder = Path(tempfile.mkdtemp(prefix="gs-holders-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        package = folder / "gpu_supervise"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for module in (holders, procs):  # stdlib only
            shutil.copy(module.__file__, package)
        probe = ("from gpu_supervise import holders; "
                 f"s = holders.scan({str(fake_node.path) + '.dev'!r}); "
                 "print(len(s.holders), s.unreadable)")  # fmt: skip
        out = subprocess.run(
            [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(python), "-c",
             probe], cwd=folder, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        shutil.rmtree(folder)
    assert out.returncode == 0, out.stderr
    listed, unreadable = map(int, out.stdout.split())
    assert listed == 0 and unreadable >= 1  # the agent is root's: not readable, not guessed


# Holds the named files of a folder open (as NVML holds the device files) until stdin closes;
# with "undumpable", as a process that made itself non-dumpable (prctl PR_SET_DUMPABLE 0).
HOLDS = """
import ctypes, os, sys
if sys.argv[1] == "undumpable":
    assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0
fds = [os.open(os.path.join(sys.argv[2], n), os.O_RDONLY) for n in sys.argv[3:]]
print("open", flush=True)
sys.stdin.read()
"""
PYTHON = "/usr/bin/python3"  # another user can run it (the test's venv may be out of reach)


@pytest.fixture
def devices() -> Iterator[Path]:
    """A device folder with NVIDIA's device file names, open to every user."""
    folder = Path(tempfile.mkdtemp(prefix="gs-devices-", dir="/tmp"))
    folder.chmod(0o755)
    for name in ("nvidiactl", "nvidia0", "nvidia-uvm", "nvidia-modeset"):
        (folder / name).touch(0o666)
        (folder / name).chmod(0o666)
    yield folder
    shutil.rmtree(folder)


@contextmanager
def holding(folder: Path, *names: str, user: str = "", undumpable: bool = False) -> Iterator[int]:
    """A process (of `user`, if given) that holds `names` of `folder` open: its pid."""
    if not Path(PYTHON).exists():
        missing_capability(f"needs {PYTHON}")
    as_user = [] if not user else ["setpriv", f"--reuid={user}", "--regid=nogroup",
                                   "--clear-groups"]  # fmt: skip
    mode = "undumpable" if undumpable else "plain"
    proc = subprocess.Popen([*as_user, PYTHON, "-c", HOLDS, mode, str(folder), *names],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# Prints what a scan of the folder finds, and whether this holder's descriptors were read.
WITHOUT_PTRACE = """
import sys
from gpu_supervise import holders
status = open("/proc/self/status").read()
eff = int(status.split("CapEff:")[1].split()[0], 16)
assert not eff & (1 << 19 | 1 << 2), "CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH still there"
s = holders.scan(sys.argv[1])
print([h.pid for h in s.holders], s.unreadable, holders._devices(sys.argv[2], sys.argv[1]))
"""


def scan_without_ptrace(folder: Path, pid: int) -> tuple[list[int], int, object]:
    """A scan by root without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, as in a container of
    Docker, containerd or Kubernetes by default: the holders, the count of processes not read,
    and what the scan made of `pid`'s descriptors."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        missing_capability("needs root and setpriv (util-linux)")
    out = subprocess.run(
        [setpriv, "--bounding-set=-sys_ptrace,-dac_read_search", sys.executable, "-c",
         WITHOUT_PTRACE, str(folder), f"/proc/{pid}/fd/"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    listed, unreadable, seen = out.stdout.rsplit(" ", 2)
    return eval(listed), int(unreadable), eval(seen)


@pytest.mark.slow
def test_another_users_holder_is_not_readable_without_cap_sys_ptrace(devices: Path):
    """Root may list another user's descriptors, but reads their links only with
    CAP_SYS_PTRACE: such a holder is counted as not readable, never taken for no holder."""
    with holding(devices, "nvidiactl", "nvidia0", user="nobody") as pid:
        listed, unreadable, seen = scan_without_ptrace(devices, pid)
        assert (pid in listed, seen) == (False, None)
        assert unreadable >= 1
        assert [h.pid for h in scan(str(devices)).holders] == [pid]  # with it: found


@pytest.mark.slow
def test_a_non_dumpable_holder_is_not_readable_without_cap_sys_ptrace(devices: Path):
    """A process that made itself non-dumpable hides its links even from its own user."""
    with holding(devices, "nvidiactl", undumpable=True) as pid:
        listed, unreadable, seen = scan_without_ptrace(devices, pid)
        assert (pid in listed, seen) == (False, None)
        assert unreadable >= 1
        assert [h.pid for h in scan(str(devices)).holders] == [pid]


@pytest.mark.slow
def test_a_device_node_made_again_is_still_held(devices: Path):
    """The link of a file unlinked since it was opened reads "<path> (deleted)": the process
    still holds the device (a node removed and made again, as nvidia-modprobe does)."""
    with holding(devices, "nvidia0") as pid:
        (devices / "nvidia0").unlink()
        (devices / "nvidia0").touch(0o666)
        assert os.readlink(f"/proc/{pid}/fd/3") == f"{devices}/nvidia0 (deleted)"
        [found] = scan(str(devices)).holders
        assert (found.pid, found.devices) == (pid, (f"{devices}/nvidia0",))


@pytest.mark.slow
def test_the_scan_never_names_its_own_process(devices: Path):
    """gpu-supervise's probe thread opens NVML while a scan may run beside it: the scanning
    process is never a holder of its own reset."""
    fd = os.open(devices / "nvidiactl", os.O_RDONLY)
    try:
        with holding(devices, "nvidiactl") as pid:
            assert [h.pid for h in scan(str(devices)).holders] == [pid]
    finally:
        os.close(fd)


@pytest.mark.slow
def test_uvm_and_modeset_alone_do_not_hold_the_gpu(devices: Path):
    """nvidia-uvm and nvidia-modeset do not block a GPU reset: a process with only those open
    is no holder; with nvidiactl as well, it is one, and only the GPU's devices are named."""
    with holding(devices, "nvidia-uvm", "nvidia-modeset") as pid:
        assert pid not in [h.pid for h in scan(str(devices)).holders]
    with holding(devices, "nvidia-uvm", "nvidiactl") as pid:
        [found] = scan(str(devices)).holders
        assert (found.pid, found.devices) == (pid, (f"{devices}/nvidiactl",))


def _holder(pid: int) -> holders.Holder:
    return holders.Holder(pid, "nv-hostengine", "", ("/dev/nvidiactl",))


MAY = "[GPU-Watcher] the GPU reset may be blocked: "
UNSEEN = " (processes outside it cannot be seen)"
# (unreadable, namespace_only) -> the line when no holder is found
NO_HOLDER = {
    (0, False): ("INFO", f"[GPU-Watcher] {FREE}"),
    (2, False): ("WARNING", f"{MAY}2 process(es) not readable (their descriptors need "
                            "CAP_SYS_PTRACE); no other process holds an NVIDIA device open"),
    (0, True): ("INFO", "[GPU-Watcher] no process in this container holds an NVIDIA device "
                        f"open{UNSEEN}"),
    (1, True): ("WARNING", f"{MAY}1 process(es) not readable (their descriptors need "
                           "CAP_SYS_PTRACE); no other process in this container holds an NVIDIA "
                           f"device open{UNSEEN}"),
}  # fmt: skip


@pytest.mark.parametrize(("unreadable", "namespace_only"), NO_HOLDER)
def test_the_reset_can_go_ahead_only_when_every_process_was_read_and_seen(
    unreadable: int, namespace_only: bool
):
    """The line says the reset can go ahead only when no process could hide a holder: none
    unreadable, none out of sight (a PID namespace of its own shows only its container)."""
    line = holders_line(holders.Scan([], unreadable, namespace_only))
    assert line == NO_HOLDER[unreadable, namespace_only]


def test_the_blocked_line_names_holders_and_says_what_it_could_not_see():
    blocked = ("[GPU-Watcher] the GPU reset is blocked by 1 process(es) holding NVIDIA devices "
               "open: pid 7: nv-hostengine")  # fmt: skip
    one = [_holder(7)]
    assert holders_line(holders.Scan(one, 0, False)) == ("WARNING", blocked)
    both = " (and 3 process(es) not readable; processes outside this container cannot be seen)"
    assert holders_line(holders.Scan(one, 3, True)) == ("WARNING", blocked + both)
    unseen = " (processes outside this container cannot be seen)"
    assert holders_line(holders.Scan(one, 0, True)) == ("WARNING", blocked + unseen)
    two = holders_line(holders.Scan([_holder(7), _holder(8)], 0, False))[1]
    assert two.endswith("2 process(es) holding NVIDIA devices open: pid 7: nv-hostengine; pid 8: "
                        "nv-hostengine")  # fmt: skip
    level, many = holders_line(holders.Scan([_holder(p) for p in range(1, 23)], 0, False))
    assert (level, many.count("pid ")) == ("WARNING", 20)
    assert many.endswith("pid 20: nv-hostengine; and 2 more")
    one_more = holders_line(holders.Scan([_holder(p) for p in range(1, 22)], 0, False))[1]
    assert one_more.endswith("pid 20: nv-hostengine; and 1 more")
    exactly = holders_line(holders.Scan([_holder(p) for p in range(1, 21)], 0, False))[1]
    assert exactly.endswith("pid 20: nv-hostengine")


@pytest.mark.slow
def test_inside_a_pid_namespace_the_scan_says_it_sees_only_its_own(tmp_path: Path):
    unshare = shutil.which("unshare")
    cmd = [unshare or "unshare", "--pid", "--fork", "--mount-proc"]
    if unshare is None or subprocess.run([*cmd, "true"], capture_output=True).returncode != 0:
        missing_capability("cannot create a PID namespace here (needs root and util-linux)")
    probe = "from gpu_supervise.holders import scan; print(scan().namespace_only)"
    inside = subprocess.run([*cmd, sys.executable, "-c", probe], capture_output=True, text=True)
    outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert (inside.stdout.strip(), outside.stdout.strip()) == ("True", "False"), inside.stderr


@pytest.mark.slow
def test_thousands_of_processes_are_scanned_whole(fake_node: FakeNode, holder):
    """A busy node: every process is looked at (and the scan ends); its cost is in the
    benchmark's table."""
    sleepers = subprocess.Popen(
        ["sh", "-c", "for i in $(seq 1000); do sleep 300 & done; echo up; wait"],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert sleepers.stdout is not None and sleepers.stdout.readline() == b"up\n"
        assert len([p for p in os.listdir("/proc") if p.isdigit()]) > 1000
        found = scan(f"{fake_node.path}.dev")
        assert [h.pid for h in found.holders] == [holder.pid]
    finally:
        os.killpg(sleepers.pid, signal.SIGKILL)
        sleepers.wait()


@pytest.mark.slow
def test_the_scanner_scans_in_a_thread_and_hands_each_scan_over_once(fake_node: FakeNode, holder):
    done = threading.Event()
    scanner = holders.Scanner(f"{fake_node.path}.dev", notify=done.set)
    assert scanner.take() is None
    assert scanner.start()
    assert done.wait(60)
    found = scanner.take()
    assert found is not None and [h.pid for h in found.holders] == [holder.pid]
    assert scanner.take() is None
    done.clear()
    assert scanner.start()
    scanner.forget()  # a hold begins afresh: what began before is dropped...
    assert scanner.start()  # ...and does not keep the next scan from beginning
    assert done.wait(60)
    assert scanner.take() is not None


# -- end to end: the hold names who blocks the reset -----------------------------------------------


@pytest.mark.slow
def test_the_hold_names_whoever_still_blocks_the_reset(
    start: Start, fake_node: FakeNode, holder, tmp_path: Path
):
    """Another process (an nv-hostengine, a stray nvidia-smi) keeps NVML open: gpu-supervise
    stops its agent and then says who still blocks the reset, and when nobody does any more;
    systemd's status carries the count. gpu-supervise itself is never in the list."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    node = dgx_a100(count=2)
    node.gpu(0).request_mig(True)
    fake_node.write(node)
    env = {**fake_node.env, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    try:
        proc = start([*FAST, "--", *AGENT, "--hold-nvml"], env)
        proc.wait_for(BLOCKED)
        (line,) = [x for x in proc.log_lines() if BLOCKED in x]
        assert " WARNING [GPU-Watcher] the GPU reset is blocked by 1 process(es) holding NVIDIA " \
               f"devices open: pid {holder.pid}: " in line  # fmt: skip
        assert "agent.py --hold-nvml" in line and f"pid {proc.pid}" not in line
        statuses = _drain(sock)
        held = r"holding: .*; 1 process\(es\) hold the GPU( \(\d+ not readable\))?$"
        assert any(re.search(held, s) for s in statuses)
        holder.kill()  # the bystander goes: the reset can go ahead
        holder.wait()
        proc.wait_for(NONE_LEFT)
        (line,) = [x for x in proc.log_lines() if NONE_LEFT in x]
        assert FREE in line or "the GPU reset may be blocked: " in line, line
        reset_gpu(fake_node.path, node, 0, timeout=60)
        assert proc.wait(60) == 1
        assert proc.log.count(BLOCKED) == 1  # said again only when the set changes
    finally:
        sock.close()


# Raises its descriptor limit to the hard one, fills its table with copies of stdin, and forks
# children that keep that table: a node whose holder scan reads about a million links.
CROWD = """
import os, resource, signal, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
for _ in range(min(hard, 65536) - 64):
    os.dup(0)
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        signal.pause()
print("up", flush=True)
signal.pause()
"""


@pytest.fixture
def crowd() -> Iterator[int]:
    """Processes with as many descriptors as they may have, 1,000,000 in all at most: a scan
    of them takes seconds. Yields how many links there are to read."""
    limit = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536) - 64
    children = max(1, 1_000_000 // limit)
    proc = subprocess.Popen([sys.executable, "-c", CROWD, str(children)],
                            stdout=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
        yield limit * (children + 1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_a_sigterm_during_a_long_holder_scan_is_acted_on_at_once(
    start: Start, fake_node: FakeNode, crowd: int, tmp_path: Path
):
    """The scan reads every descriptor of the node (here about a million, seconds of work):
    it runs beside the loop, so a SIGTERM that arrives while it runs ends gpu-supervise before
    the scan is done, and no holder line is ever written. Were the loop to wait for the scan,
    the scan's line would come first. systemd's status says it holds before the scan ends."""
    assert crowd > 200_000, "too few descriptors for a long scan"
    node = dgx_a100(count=1)
    node.gpu(0).request_mig(True)
    fake_node.write(node)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    try:
        env = {**fake_node.env, "NOTIFY_SOCKET": str(tmp_path / "notify")}
        proc = start([*FAST, "--", *AGENT], env)
        proc.wait_for("pending a GPU reset")
        pid = re.search(r"as pid (\d+)", proc.log).group(1)  # type: ignore[union-attr]
        proc.wait_for(f"child {pid} was killed by SIGTERM", timeout=60)  # the hold, its scan
        statuses = _drain(sock, until="holding: ")  # said before the scan ends: no count yet
        assert any(s.startswith("holding: ") and "hold the GPU" not in s for s in statuses)
        proc.signal(signal.SIGTERM)
        assert proc.wait(120) == 143, proc.log
    finally:
        sock.close()
    assert "stopped by SIGTERM while holding" in proc.log
    assert NONE_LEFT not in proc.log and BLOCKED not in proc.log, proc.log


def spawn_at(pid: int, argv: list[str]) -> subprocess.Popen[str]:
    """Start `argv` as process `pid` (free again): the kernel's next pid set just below it,
    tried again while other processes of the machine take it first."""
    last = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(500):
        try:
            last.write_text(str(pid - 1))
        except OSError as exc:
            missing_capability(f"cannot choose the next pid ({exc}): needs root")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    raise AssertionError(f"pid {pid} was taken by others 500 times")


@pytest.mark.slow
def test_a_holder_gone_and_another_on_its_pid_between_two_checks_is_news(
    start: Start, fake_node: FakeNode, holder
):
    """Holders are told apart by who they are, the pid with its start time: one that leaves
    and another that arrives on the same pid between two scans is said again."""
    node = dgx_a100(count=2)
    node.gpu(0).request_mig(True)
    fake_node.write(node)
    slow = ["--interval", "10", "--cooldown", "0", "--settle", "0.3", "--stop-timeout", "2"]
    proc = start([*slow, "--", *AGENT], fake_node.env)
    proc.wait_for(f"{BLOCKED} 1 process(es) holding NVIDIA devices open: pid {holder.pid}: ")
    holder.kill()
    holder.wait()
    devices = f"{fake_node.path}.dev"
    other = spawn_at(holder.pid, [PYTHON, "-c", HOLDS, "plain", devices, "nvidiactl"])
    try:
        assert other.stdout is not None and other.stdout.readline() == "open\n"
        out = proc.wait_for(BLOCKED, timeout=60, count=2)
        assert NONE_LEFT not in out, "a scan came between the two: this tests nothing"
        (_, line) = [x for x in proc.log_lines() if BLOCKED in x]
        assert f"pid {holder.pid}: {PYTHON} -c" in line
    finally:
        other.kill()
        other.wait()


def _drain(sock: socket.socket, until: str = "hold the GPU") -> list[str]:
    """The STATUS= texts received so far, once one holds `until` (or 30 s have passed)."""
    out: list[str] = []
    deadline = time.monotonic() + 30
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            fields = dict(
                line.split("=", 1) for line in sock.recv(4096).decode().split("\n") if "=" in line
            )
        except TimeoutError:
            if any(until in s for s in out):
                return out
            continue
        if "STATUS" in fields:
            out.append(fields["STATUS"])
    return out
