"""Reliability: PID 1 for real, faults, a signal storm, a start tried again, a soak, and security
basics. Real processes and signals; deadlines are generous and only guard against hangs."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from conftest import (
    AGENT,
    FakeNode,
    Proc,
    clean_env,
    gpu_supervise_cmd,
    missing_capability,
    run,
)
from fakenvml import UNKNOWN, dgx_a100, h100_node

Start = Callable[..., Proc]
PLAIN = ["--no-watch"]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0.2"]


# -- PID 1 of a new PID namespace ---------------------------------------------------------------


@pytest.fixture(scope="module")
def unshare() -> list[str]:
    exe = shutil.which("unshare")
    cmd = [exe or "unshare", "--pid", "--fork", "--mount-proc"]
    if exe is None:
        missing_capability("unshare (util-linux) is not installed")
    probe = subprocess.run([*cmd, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        missing_capability(f"cannot create a PID namespace here (needs root): {probe.stderr}")
    return cmd


def test_pid1_reaps_200_orphans_and_returns_the_exit_code(unshare: list[str]):
    script = (
        "for i in $(seq 200); do (sleep 0.3 &); done; sleep 2; "
        'echo "zombies=$(grep -l "^State:.*Z" /proc/[0-9]*/status 2>/dev/null | wc -l)"; exit 7'
    )
    out = subprocess.run(
        [*unshare, *gpu_supervise_cmd(), "--log-level", "DEBUG", *PLAIN, "--", "sh", "-c", script],
        capture_output=True, text=True, timeout=120, env=clean_env(),
    )  # fmt: skip
    assert out.returncode == 7, out.stderr
    assert "gpu-supervise[1] INFO    started sh" in out.stderr  # we really were PID 1
    assert "zombies=0" in out.stdout
    assert out.stderr.count("reaped orphan") == 200


@pytest.mark.parametrize(("agent_args", "code"), [(["--exit-on-term", "0"], 0), ([], 143)])
def test_sigterm_to_pid1_is_forwarded_and_handled(unshare: list[str], agent_args, code: int):
    proc = subprocess.Popen(
        [*unshare, *gpu_supervise_cmd(), *PLAIN, "--", *AGENT, "--no-nvml", *agent_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=clean_env(),
    )  # fmt: skip  (the agent's lines alone: gpu-supervise's log is not read here)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "ready" in line:
                break
        pid1 = psutil.Process(proc.pid).children()[0]  # gpu-supervise, PID 1 inside
        pid1.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert "got SIGTERM" in rest
    assert proc.returncode == code


# -- faults ------------------------------------------------------------------------------------


def test_hanging_nvml_never_delays_a_sigterm(start: Start, fake_node: FakeNode):
    fake_node.write(dgx_a100().hang("nvmlDeviceGetCount"))  # the baseline probe hangs for good
    proc = start(
        ["--probe-timeout", "60", "--stop-timeout", "3", "--", *AGENT, "--no-nvml",
         "--exit-on-term", "0"],
        fake_node.env,
    )  # fmt: skip
    proc.wait_for("ready")
    marker = Path(f"{fake_node.path}.hanging")  # the fake writes it as the call hangs
    deadline = time.monotonic() + 60
    while not marker.exists() or str(proc.pid) not in marker.read_text():
        assert time.monotonic() < deadline, "the baseline probe never reached the hang"
        time.sleep(0.02)
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    # the agent exits at once on SIGTERM: the stop takes well under stop_timeout (3 s), so
    # neither the hung probe nor a needless wait for stop_timeout can hide here
    assert time.monotonic() - sent < 2


def test_hanging_nvml_and_a_stubborn_child_still_stop_in_time(start: Start, fake_node: FakeNode):
    fake_node.write(dgx_a100().hang("nvmlInit"))
    proc = start(["--stop-timeout", "1", "--", *AGENT, "--no-nvml", "--ignore-term"], fake_node.env)
    proc.wait_for("ready")
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 137
    assert time.monotonic() - sent < 1 + 1


def test_nvml_disappearing_is_a_topology_change(start: Start, fake_node: FakeNode):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    proc = start([*FAST, "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    fake_node.write(node.copy().fail("nvmlInit", 9))  # the driver was unloaded
    assert proc.wait(60) == 1
    assert "GPU topology change detected" in proc.output
    assert "NVML is no longer usable" in proc.output


def test_child_exiting_while_the_change_is_handled_still_exits_1(start: Start, fake_node):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    proc = start([*FAST, "--", *AGENT, "--no-nvml", "--exit-on-term", "3"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    proc.wait_for("ready")
    node.gpu(0).set_layout(None)
    fake_node.write(node)
    assert proc.wait(60) == 1  # the restart is what matters, not the child's own 3
    assert "child" in proc.output and "exited with code 3" in proc.output


def test_signal_storm(start: Start):
    proc = start([*PLAIN, "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("ready")
    for i in range(600):
        proc.signal(signal.SIGHUP if i % 2 else signal.SIGUSR1)
    time.sleep(0.5)
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    out = proc.output
    assert "got SIGHUP" in out and "got SIGUSR1" in out and "got SIGTERM" in out
    assert "Traceback" not in out


# -- a start that fails for a cause that passes --------------------------------------------------

TRYING_AGAIN = "; trying again in 0.1 s"


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while text not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline and proc.poll() is None, path.read_text()
        time.sleep(0.02)


class Writer:
    """A file held open for writing until close() (by the test, or at its end)."""

    def __init__(self, path: Path) -> None:
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture
def busy_binary(tmp_path: Path) -> Iterator[tuple[Path, Writer]]:
    """A copy of /bin/sleep, still open for writing (as while an upgrade copies it in): exec
    fails with ETXTBSY until the writer closes it."""
    agent = tmp_path / "agent"
    shutil.copy2("/bin/sleep", agent)
    writer = Writer(agent)
    try:
        os.waitpid(os.posix_spawn(str(agent), [str(agent), "0"], {}), 0)
    except OSError as exc:
        if exc.errno != errno.ETXTBSY:
            raise
    else:
        writer.close()
        missing_capability("this kernel executes a file open for writing (no ETXTBSY)")
    try:
        yield agent, writer
    finally:
        writer.close()


def test_a_binary_open_for_writing_is_tried_again_until_it_is_closed(
    busy_binary: tuple[Path, Writer], tmp_path: Path
):
    """ETXTBSY passes once the writer is done: the start is tried again with back-off, one
    line each time, and the agent starts once the binary is closed."""
    agent, writer = busy_binary
    log = tmp_path / "log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [*gpu_supervise_cmd(), *PLAIN, "--", str(agent), "0"],
            stdin=subprocess.DEVNULL, stderr=err, env=clean_env(),
        )  # fmt: skip
    try:
        wait_for_text(
            log, f"gpu-supervise: {agent}: cannot execute: Text file busy{TRYING_AGAIN}\n", proc
        )
        writer.close()
        assert proc.wait(60) == 0, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    assert f"INFO    started {agent} 0 as pid " in log.read_text()


def test_a_start_that_keeps_failing_for_a_passing_cause_exits_75(busy_binary: tuple[Path, Writer]):
    """Not 126, which the shipped units (RestartPreventExitStatus) never restart: 75, after
    trying for 5 s, so the restart policy tries again later."""
    agent, _writer = busy_binary
    out = run([*PLAIN, "--", str(agent), "0"], clean_env())
    lines = out.stderr.splitlines()
    assert out.returncode == 75, out.stderr
    assert lines[0] == f"gpu-supervise: {agent}: cannot execute: Text file busy{TRYING_AGAIN}"
    assert len(lines) >= 5  # 0.1, 0.2, 0.4, 0.8, 1, ... s
    assert lines[-1].startswith(f"gpu-supervise: {agent}: cannot execute: Text file busy (still, "
                                "after trying again for ")  # fmt: skip
    spent = float(lines[-1].split(" for ")[1].split()[0])
    assert 5.0 <= spent < 60


def test_sigterm_ends_the_tries(busy_binary: tuple[Path, Writer], tmp_path: Path):
    """A stop asked for while the start is tried again: no more tries, and no agent."""
    agent, _writer = busy_binary
    log = tmp_path / "log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [*gpu_supervise_cmd(), *PLAIN, "--", str(agent), "300"],
            stdin=subprocess.DEVNULL, stderr=err, env=clean_env(),
        )  # fmt: skip
    try:
        wait_for_text(log, TRYING_AGAIN, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 75
    finally:
        proc.kill()
        proc.wait()
    last = log.read_text().splitlines()[-1]
    spent = float(last.split("(still, after trying again for ")[1].split()[0])
    assert spent < 5.0, last  # the tries stopped before their 5 s were up
    assert "started" not in log.read_text()


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A cgroup of the pids controller (v1 or v2), removed at the end with what is left in it."""
    name = f"gpu-supervise-test-{os.getpid()}-{time.monotonic_ns()}"
    v1, v2 = Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")
    control = v2 / "cgroup.subtree_control"
    if (v1 / "cgroup.procs").exists():
        path = v1 / name
    elif control.exists() and "pids" in control.read_text().split():
        path = v2 / name
    else:
        missing_capability("no pids cgroup controller (v1, or enabled in v2's root)")
    try:
        path.mkdir()
    except OSError as exc:
        missing_capability(f"cannot create a pids cgroup here: {exc}")
    try:
        yield path
    finally:
        deadline = time.monotonic() + 60
        while pids := (path / "cgroup.procs").read_text().split():
            assert time.monotonic() < deadline, f"cannot empty {path}"
            (path / "pids.max").write_text("max")
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        path.rmdir()


def test_the_pids_limit_reached_is_tried_again_until_it_is_raised(
    pids_cgroup: Path, tmp_path: Path
):
    """EAGAIN from the kernel's clone: the container's pids limit reached. gpu-supervise runs in
    a cgroup with room for 1 process, itself; the test raises the limit once a try has failed,
    as processes of the container that exit would make room."""
    (pids_cgroup / "pids.max").write_text("1")
    procs = pids_cgroup / "cgroup.procs"
    log = tmp_path / "log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [*gpu_supervise_cmd(), *PLAIN, "--", "sh", "-c", "exit 3"],
            stdin=subprocess.DEVNULL, stderr=err, env=clean_env(),
            preexec_fn=lambda: procs.write_text(str(os.getpid())),
        )  # fmt: skip
    try:
        again = f"sh: cannot execute: Resource temporarily unavailable{TRYING_AGAIN}"
        wait_for_text(log, again, proc)
        (pids_cgroup / "pids.max").write_text("max")
        assert proc.wait(60) == 3, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    assert "INFO    started sh -c 'exit 3' as pid " in log.read_text()


def _pipes(pid: int) -> int:
    """How many pipe ends the process has open."""
    fds = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("pipe:"))


def test_tries_that_fork_leave_no_descriptor_behind(pids_cgroup: Path, start_cmd, tmp_path: Path):
    """With a parent-death signal the agent is started by fork (and a pipe for exec's errno):
    a fork that fails for the pids limit must close that pipe, or each try leaks two
    descriptors (and EMFILE, tried again too, would only grow). gpu-supervise ends with as many
    pipes open as one whose start never failed."""
    args = [*gpu_supervise_cmd(), *PLAIN, "--parent-death-signal", "TERM", "--", "sleep", "300"]
    control = start_cmd(args, clean_env())
    control.wait_for(" as pid ")
    (pids_cgroup / "pids.max").write_text("1")
    procs = pids_cgroup / "cgroup.procs"
    log = tmp_path / "log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stderr=err, env=clean_env(),
            preexec_fn=lambda: procs.write_text(str(os.getpid())),
        )  # fmt: skip
    try:
        wait_for_text(log, "; trying again in 0.4 s", proc)  # three tries failed
        (pids_cgroup / "pids.max").write_text("max")
        wait_for_text(log, " as pid ", proc)
        time.sleep(0.5)  # both past their start-up
        assert _pipes(proc.pid) == _pipes(control.pid), log.read_text()
    finally:
        proc.kill()  # its agent gets the parent-death signal; the cgroup's end kills the rest
        proc.wait()


def test_the_start_again_after_a_hold_is_tried_again_too(
    start: Start, fake_node: FakeNode, busy_binary: tuple[Path, Writer]
):
    """A hold's timeout starts the agent again in the same process: a binary open for writing
    at that moment (an upgrade during the hold) is tried again as well, with a WARNING each."""
    agent, writer = busy_binary
    writer.close()  # the first start succeeds
    node = dgx_a100(count=1)
    node.gpu(0).request_mig(True)  # pending from the start: hold, then time out
    fake_node.write(node)
    proc = start([*FAST, "--pending-timeout", "4", "--", str(agent), "300"], fake_node.env)
    proc.wait_for("was killed by SIGTERM")  # held: the agent is gone
    writer = Writer(agent)
    try:
        proc.wait_for(f"WARNING cannot start the agent again: {agent}: cannot execute: Text file "
                      f"busy{TRYING_AGAIN}")  # fmt: skip
    finally:
        writer.close()
    proc.wait_for("again as pid")
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143


# -- soak ----------------------------------------------------------------------------------------


def test_soak_thousands_of_probes_of_a_noisy_stable_node_never_restart(
    start: Start, fake_node: FakeNode
):
    """State noise, isolated single errors and latency spikes, compressed into about a minute:
    four gpu-supervise at the shortest interval allowed (0.1 s), on one noisy node."""
    node = h100_node(["1g.10gb"] * 7, count=1)
    fake_node.write(node)
    procs = [
        start(
            [
                "--interval",
                "0.1",
                "--cooldown",
                "0",
                "--settle",
                "0.1",
                "--log-level",
                "DEBUG",
                "--",
                *AGENT,
                "--no-nvml",
            ],
            fake_node.env,
        )  # fmt: skip
        for _ in range(4)
    ]
    for proc in procs:
        proc.wait_for("[GPU-Watcher] baseline")
    stop = threading.Event()
    rnd = random.Random(7)

    def noise() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            noisy = node.copy()
            for gpu in noisy.gpus:
                gpu.temp, gpu.pstate = rnd.randint(30, 90), rnd.randint(0, 12)
            if n % 7 == 0:
                noisy.fail("nvmlDeviceGetCount", UNKNOWN, count=1)  # one isolated error
            if n % 11 == 0:
                noisy.delay(5, fn="nvmlDeviceGetUUID")  # a latency spike
            fake_node.write(noisy)
            stop.wait(0.05)

    thread = threading.Thread(target=noise, daemon=True)
    thread.start()
    try:
        for proc in procs:
            proc.wait_for("topology unchanged", timeout=300, count=500)
    finally:
        stop.set()
        thread.join()
    for proc in procs:
        out = proc.output
        assert proc.popen.poll() is None
        assert "Initiating self-restart" not in out
        assert "(1/3 consecutive)" in out  # the injected errors happened and were tolerated
        assert "(3/3" not in out
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 143


# -- security basics -------------------------------------------------------------------------------


def test_nothing_listens_on_a_network_port(start: Start, fake_node: FakeNode):
    fake_node.write(dgx_a100())
    proc = start([*FAST, "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    proc.wait_for("ready")
    supervisor = psutil.Process(proc.pid)
    assert supervisor.net_connections(kind="inet") == []
    assert supervisor.net_connections(kind="unix") == []


def test_sigterm_during_the_tries_after_a_hold_ends_it_as_a_hold(
    start: Start, fake_node: FakeNode, busy_binary: tuple[Path, Writer]
):
    """The tries to start the agent again belong to the hold: SIGTERM ends them, and
    gpu-supervise with the agent's code from the hold's stop, as SIGTERM during a hold does."""
    agent, writer = busy_binary
    writer.close()
    node = dgx_a100(count=1)
    node.gpu(0).request_mig(True)
    fake_node.write(node)
    proc = start([*FAST, "--pending-timeout", "4", "--", str(agent), "300"], fake_node.env)
    proc.wait_for("was killed by SIGTERM")
    writer = Writer(agent)
    try:
        proc.wait_for(f"WARNING cannot start the agent again: {agent}: cannot execute: Text file "
                      f"busy{TRYING_AGAIN}")  # fmt: skip
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 143
    finally:
        writer.close()
    assert proc.log_lines()[-1].endswith("INFO    exiting 143: stopped by SIGTERM while holding")
