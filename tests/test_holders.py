"""Naming whoever blocks a GPU reset: the processes with an NVIDIA device file open.

The fake NVML opens <node>.dev/nvidiactl and nvidia<N> while it is initialised, as NVIDIA's
library opens /dev/nvidiactl and /dev/nvidia<N>; the scan reads the links in /proc/PID/fd for
real. conftest's fake_node points gpu-supervise's watch.device_dir there."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import AGENT, FakeNode, Proc, missing_capability
from fakenvml import dgx_a100, reset_gpu
from gpu_supervise import holders
from gpu_supervise.holders import container_id, is_device, scan

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0.3", "--stop-timeout", "2"]
BLOCKED = "the GPU reset is blocked by"
FREE = "no process holds an NVIDIA device open: the GPU reset can go ahead"


def test_the_device_files_of_a_gpu_holder():
    for path in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia15", "/dev/nvidia-caps/nvidia-cap1"):
        assert is_device(path, "/dev"), path
    for path in ("/dev/nvidia-uvm", "/dev/nvidia", "/dev/nvidia-caps/", "/dev/null",
                 "/devx/nvidiactl", "/dev/nvidia0x", "socket:[1234]"):  # fmt: skip
        assert not is_device(path, "/dev"), path
    assert is_device("/tmp/n.dev/nvidia3", "/tmp/n.dev/")


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


def test_a_process_holding_nvml_is_found_with_its_devices(fake_node: FakeNode, holder):
    found = scan(f"{fake_node.path}.dev")
    (h,) = [h for h in found.holders if h.pid == holder.pid]
    assert h.devices == tuple(f"{fake_node.path}.dev/{n}" for n in ("nvidia0", "nvidia1",
                                                                    "nvidiactl"))  # fmt: skip
    assert "agent.py --hold-nvml" in h.cmdline
    assert os.getpid() not in [x.pid for x in found.holders]
    assert found.unreadable == 0
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


def test_processes_that_come_and_go_mid_scan_are_never_an_error(fake_node: FakeNode, holder):
    churn = subprocess.Popen(["sh", "-c", "while :; do /bin/true & /bin/true & wait; done"])
    try:
        for _ in range(50):
            assert holder.pid in [h.pid for h in scan(f"{fake_node.path}.dev").holders]
    finally:
        churn.kill()
        churn.wait()


def test_what_cannot_be_read_is_counted_not_guessed(fake_node: FakeNode, holder, tmp_path):
    """As nobody, root's processes' descriptors are closed: they are counted, never listed."""
    setpriv, python = shutil.which("setpriv"), Path("/usr/bin/python3")
    if os.geteuid() != 0 or setpriv is None or not python.exists():
        missing_capability("needs root, setpriv (util-linux) and /usr/bin/python3")
    folder = Path(tempfile.mkdtemp(prefix="gs-holders-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        shutil.copy(holders.__file__, folder / "holders.py")  # the module needs only os and re
        probe = (f"import holders; s = holders.scan({str(fake_node.path) + '.dev'!r}); "
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


def test_inside_a_pid_namespace_the_scan_says_it_sees_only_its_own(tmp_path: Path):
    unshare = shutil.which("unshare")
    cmd = [unshare or "unshare", "--pid", "--fork", "--mount-proc"]
    if unshare is None or subprocess.run([*cmd, "true"], capture_output=True).returncode != 0:
        missing_capability("cannot create a PID namespace here (needs root and util-linux)")
    probe = "from gpu_supervise.holders import scan; print(scan().namespace_only)"
    inside = subprocess.run([*cmd, sys.executable, "-c", probe], capture_output=True, text=True)
    outside = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert (inside.stdout.strip(), outside.stdout.strip()) == ("True", "False"), inside.stderr


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


# -- end to end: the hold names who blocks the reset -----------------------------------------------


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
        assert any(re.search(r"holding: .*; 1 process\(es\) hold the GPU$", s) for s in statuses)
        holder.kill()  # the bystander goes: the reset can go ahead
        holder.wait()
        proc.wait_for(FREE)
        reset_gpu(fake_node.path, node, 0, timeout=60)
        assert proc.wait(60) == 1
        assert proc.log.count(BLOCKED) == 1  # said again only when the set changes
    finally:
        sock.close()


def _drain(sock: socket.socket) -> list[str]:
    """The STATUS= texts received so far."""
    out: list[str] = []
    deadline = time.monotonic() + 30
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            fields = dict(
                line.split("=", 1) for line in sock.recv(4096).decode().split("\n") if "=" in line
            )
        except TimeoutError:
            if any("hold the GPU" in s for s in out):
                return out
            continue
        if "STATUS" in fields:
            out.append(fields["STATUS"])
    return out
