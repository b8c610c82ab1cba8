"""A MIG mode change on an A100 waits for a GPU reset that the driver refuses while any process
holds NVML, and the agent holds NVML the whole time, as real agents do. gpu-supervise must get
the agent out of the way (the hold) and bring it back with fresh handles once the reset is done.

The fake NVML knows who holds it; `reset_gpu` plays the operator's `nvidia-smi -r`, retried as
an operator or mig-parted would, refused while any other process holds NVML. No test code here
ever stops the agent: only gpu-supervise does.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import AGENT, FakeNode, Proc, log_stamp
from fakenvml import UNKNOWN, Node, dgx_a100, holders, reset_gpu

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0.3", "--stop-timeout", "2"]
HOLDING = "stopping the agent so the reset can go ahead"


def supervise(start: Start, fake_node: FakeNode, *opts: str, agent: tuple[str, ...] = ()) -> Proc:
    """gpu-supervise in front of an agent that keeps NVML open, as a restart policy starts it."""
    proc = start([*FAST, *opts, "--", *AGENT, "--hold-nvml", *agent], fake_node.env)
    proc.wait_for("agent ")
    proc.wait_for("[GPU-Watcher] baseline")
    return proc


def enable_requested(start: Start, fake_node: FakeNode, *opts: str, agent: tuple[str, ...] = ()):
    """An A100 with MIG off, supervised; the operator then asks for MIG on (pending a reset)."""
    node = dgx_a100(count=1)
    fake_node.write(node)
    proc = supervise(start, fake_node, *opts, agent=agent)
    request_mode_change(fake_node, node, 0, True, agent_pid(proc))
    return proc, node


def agent_pid(proc: Proc) -> int:
    return int(re.findall(r"agent (\d+): UUIDs", proc.output)[-1])


def agent_uuids(proc: Proc) -> list[str]:
    proc.wait_for(": UUIDs ")
    return re.findall(r"agent \d+: UUIDs (.*)", proc.output)[-1].split()


def request_mode_change(fake_node: FakeNode, node: Node, index: int, on: bool, agent: int) -> None:
    """`nvidia-smi -i INDEX -mig 1|0`: pending until a reset. The agent holds NVML when it is
    asked for (checked before the request: once it is written, gpu-supervise may stop the agent
    sooner than a loaded test gets to look)."""
    assert agent in holders(fake_node.path)
    node.gpu(index).request_mig(on)
    fake_node.write(node)


def operator_resets(fake_node: FakeNode, node: Node, index: int, agent: int) -> None:
    """The reset, retried until it goes through, after which the agent no longer holds NVML."""
    reset_gpu(fake_node.path, node, index, timeout=60)
    assert agent not in holders(fake_node.path)


def test_prd_qa_on_an_a100_whose_agent_holds_nvml(start: Start, fake_node: FakeNode):
    """The QA list as an operator runs it by hand on an A100 node, with a restart policy
    starting gpu-supervise again after each exit 1."""
    node = dgx_a100(count=2)
    fake_node.write(node)
    proc = supervise(start, fake_node)
    assert agent_uuids(proc) == node.uuids()
    first_agent = agent_pid(proc)

    # 1. MIG enable: pending until a reset, which the agent blocks until gpu-supervise holds
    request_mode_change(fake_node, node, 0, True, first_agent)
    operator_resets(fake_node, node, 0, first_agent)
    assert proc.wait(60) == 1
    out = proc.output
    assert f"GPU 0 {node.gpu(0).uuid} (NVIDIA A100-SXM4-40GB): MIG mode change to on" in out
    assert f"{HOLDING} (holding up to 300 s)" in out
    assert "got SIGTERM" in out and "MIG mode off -> on" in out
    assert "MIG configuration change detected" in out
    assert out.count("Initiating self-restart.") == 1
    assert "exiting 1: restart me (the MIG mode change took effect)" in out

    proc = supervise(start, fake_node)  # the restart policy
    assert agent_uuids(proc) == node.uuids()  # MIG on, no instances yet
    assert "GPU 0: MIG on, no devices" in proc.output

    # 2. instances created, 7x 1g.5gb: a config change, no reset needed
    old = node.copy()
    node.gpu(0).set_layout(["1g.5gb"] * 7)
    fake_node.write(node)
    assert proc.wait(60) == 1
    assert f"New UUIDs: [{', '.join(node.uuids())}]" in proc.output
    assert f"Old UUIDs: [{', '.join(old.uuids())}]" in proc.output
    proc = supervise(start, fake_node)
    assert agent_uuids(proc) == node.uuids()

    # 3. 7x 1g.5gb -> 2x 3g.20gb, config only
    node.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(node)
    assert proc.wait(60) == 1
    assert "MIG devices 7x1g.5gb -> 2x3g.20gb" in proc.output
    assert HOLDING not in proc.output
    proc = supervise(start, fake_node)
    assert agent_uuids(proc) == node.uuids()

    # 4. disable: pending again, the reset, exit 1
    request_mode_change(fake_node, node, 0, False, agent_pid(proc))
    operator_resets(fake_node, node, 0, agent_pid(proc))
    assert proc.wait(60) == 1
    assert "MIG mode change to off" in proc.output and "MIG mode on -> off" in proc.output
    proc = supervise(start, fake_node)
    assert agent_uuids(proc) == node.uuids() and node.gpu(0).mig == 0
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143


def test_a_change_pending_at_start_holds_at_once(start: Start, fake_node: FakeNode):
    node = dgx_a100(count=1)
    node.gpu(0).request_mig(True)  # asked for before this gpu-supervise started
    fake_node.write(node)
    proc = supervise(start, fake_node)
    reset_gpu(fake_node.path, node, 0, timeout=60)  # the hold may have begun already
    assert proc.wait(60) == 1
    out = proc.output
    assert proc.log.index("[GPU-Watcher] baseline") < proc.log.index(HOLDING)
    assert "got SIGTERM" in out and "MIG mode off -> on" in out


def test_a_withdrawn_pending_change_restarts_the_agent_it_stopped(
    start: Start, fake_node: FakeNode
):
    node = dgx_a100(["1g.5gb"] * 7, count=1)
    fake_node.write(node)
    proc = supervise(start, fake_node)
    node.gpu(0).request_mig(False)
    fake_node.write(node)
    proc.wait_for(HOLDING)
    proc.wait_for("got SIGTERM")
    node.gpu(0).request_mig(True)  # `nvidia-smi -mig 1` again: nothing waits for a reset
    fake_node.write(node)
    assert proc.wait(60) == 1
    out = proc.output
    assert "the pending MIG mode change was withdrawn" in out
    assert "MIG configuration change detected" not in out
    assert "exiting 1: restart me (the pending MIG mode change was withdrawn)" in out


def test_a_reset_that_never_comes_gives_the_agent_back_once(start: Start, fake_node: FakeNode):
    proc, node = enable_requested(start, fake_node, "--pending-timeout", "2")
    proc.wait_for(HOLDING)
    proc.wait_for("still pending after 2 s each: the GPU reset did not happen")
    proc.wait_for("again as pid")
    proc.wait_for(": UUIDs ", count=2)  # a new agent, holding NVML again
    again = agent_pid(proc)
    time.sleep(3)  # > pending_timeout: the same pending change is not held for again
    assert proc.popen.poll() is None and proc.output.count(HOLDING) == 1
    assert again in holders(fake_node.path)
    # the change withdrawn and asked for again: a new pending change, a new hold
    node.gpu(0).request_mig(False)
    fake_node.write(node)
    time.sleep(1)
    node.gpu(0).request_mig(True)
    fake_node.write(node)
    proc.wait_for(HOLDING, count=2)
    reset_gpu(fake_node.path, node, 0, timeout=60)
    assert proc.wait(60) == 1


def test_sigterm_while_holding_exits_at_once(start: Start, fake_node: FakeNode):
    proc, node = enable_requested(start, fake_node)
    proc.wait_for(HOLDING)
    proc.wait_for("was killed by SIGTERM")  # the agent is gone: gpu-supervise holds
    sent = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143  # the agent's own code: SIGTERM (from the hold) killed it
    assert time.monotonic() - sent < 2  # well inside stop_timeout: nothing to wait for
    assert "exiting 143: stopped by SIGTERM while holding" in proc.output


def test_an_agent_that_ignores_sigterm_is_killed_for_the_reset(start: Start, fake_node):
    proc, node = enable_requested(start, fake_node, "--stop-timeout", "1", agent=("--ignore-term",))
    operator_resets(fake_node, node, 0, agent_pid(proc))
    assert proc.wait(60) == 1
    assert "still running 1 s after SIGTERM: sent SIGKILL" in proc.output
    assert "MIG mode off -> on" in proc.output


def test_ignore_keeps_the_agent_and_so_the_reset_waits(start: Start, fake_node: FakeNode):
    proc, node = enable_requested(start, fake_node, "--on-pending", "ignore")
    proc.wait_for("MIG mode change to on is pending a GPU reset; it counts once it takes effect")
    time.sleep(1)
    assert agent_pid(proc) in holders(fake_node.path) and proc.popen.poll() is None


def test_the_agent_started_again_after_a_hold_gets_the_terminal(fake_node: FakeNode):
    """On a terminal (docker run -it), the agent started again after a timed-out hold is the
    foreground group again: it can read the terminal instead of being stopped by SIGTTIN."""
    from terminal import Terminal

    node = dgx_a100(count=1)
    node.gpu(0).request_mig(True)  # pending from the start: hold, then time out
    fake_node.write(node)
    agent = "echo agent-up; read line; echo got:$line; sleep 30"
    args = [*FAST, "--pending-timeout", "1", "--stop-timeout", "0.5", "--", "sh", "-c", agent]
    with Terminal(args, env=fake_node.env) as term:
        term.expect(b"still pending after 1 s")
        term.expect(b"agent-up", count=2)  # the agent started again
        term.type(b"hello\n")
        term.expect(b"got:hello")


# -- the hold, round 3: every GPU covered, never the holder ourselves, never an agent for nothing --


def test_a_second_gpu_pending_during_the_hold_gets_its_own_allowance(start: Start, fake_node):
    """GPU 0 is pending at start; GPU 1 goes pending 2 s into the hold. GPU 0's allowance ends
    first, but the agent stays stopped until GPU 1's ends too (it would block GPU 1's reset),
    and the warning names both."""
    node = dgx_a100(count=2)
    node.gpu(0).request_mig(True)
    fake_node.write(node)
    proc = supervise(start, fake_node, "--pending-timeout", "4")
    proc.wait_for(HOLDING)
    time.sleep(2)
    node.gpu(1).request_mig(True)
    fake_node.write(node)
    proc.wait_for("MIG mode change to on is pending a GPU reset; still holding")
    proc.wait_for("again as pid")
    lines = proc.log_lines()
    second = log_stamp(lines, "is pending a GPU reset; still holding")
    again = log_stamp(lines, "again as pid")
    assert (again - second).total_seconds() >= 4.0 - 0.002  # GPU 1's own 4 s
    (warning,) = [line for line in lines if "still pending after 4 s each" in line]
    assert f"GPU 0 ({node.gpu(0).uuid}: MIG on)" in warning
    assert f"GPU 1 ({node.gpu(1).uuid}: MIG on)" in warning


def test_a_probe_stuck_in_nvml_while_holding_exits_to_release_the_gpu(start: Start, fake_node):
    """gpu-supervise's own probe hangs inside NVML during the hold: it now holds the GPU and
    blocks the very reset it waits for. It says so and exits 1, which releases the handle."""
    proc, node = enable_requested(start, fake_node, "--probe-timeout", "1")
    proc.wait_for(HOLDING)
    proc.wait_for("was killed by SIGTERM")
    fake_node.write(node.copy().hang("nvmlDeviceGetMigMode"))
    assert proc.wait(60) == 1
    # once the restart is decided no probe follows: NVML is not opened again on the way out,
    # and no "probe failed" line comes after the stuck one
    assert "topology probe failed" not in proc.log
    hanging = Path(str(fake_node.path) + ".hanging").read_text().splitlines()
    assert len(hanging) == 1 and hanging[0].endswith(" nvmlDeviceGetMigMode")
    (error,) = [line for line in proc.log_lines() if " ERROR " in line]
    assert "probe did not finish within 1 s: a probe is stuck in NVML while holding" in error
    assert "gpu-supervise itself now holds the GPU and would block the reset" in error
    assert proc.log_lines()[-1].endswith("exiting 1: restart me (a probe is stuck in NVML while "
                                         "holding: it would block the reset)")  # fmt: skip
    fake_node.write(node)
    reset_gpu(fake_node.path, node, 0, timeout=30)  # nobody holds the GPU any more


def test_nvml_failing_at_the_end_of_a_hold_never_starts_an_agent_for_nothing(
    start: Start, fake_node: FakeNode
):
    proc, node = enable_requested(start, fake_node, "--pending-timeout", "2")
    proc.wait_for(HOLDING)
    proc.wait_for("was killed by SIGTERM")
    fake_node.write(node.copy().fail("*", UNKNOWN))  # NVML fails from here on
    assert proc.wait(60) == 1
    assert re.search(r"exiting 1: restart me \(NVML failed \d+ consecutive probes\)", proc.log)
    assert "again as pid" not in proc.log and proc.stdout.count(": ready") == 1


@pytest.mark.parametrize(("agent", "code"), [((), 143), (("--exit-on-term", "5"), 5)])
def test_after_a_timed_out_hold_the_agent_is_supervised_as_before(
    start: Start, fake_node: FakeNode, agent: tuple[str, ...], code: int
):
    """Back in RUNNING after the agent is started again: SIGTERM stops it, and its own exit
    code comes back."""
    proc, node = enable_requested(start, fake_node, "--pending-timeout", "1", agent=agent)
    proc.wait_for("again as pid")
    proc.wait_for(": UUIDs ", count=2)
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == code
    assert proc.stdout.count("got SIGTERM") == 2  # the hold's stop, then ours
    assert proc.log_lines()[-1].endswith(f"exiting {code}: stopped by SIGTERM")


def test_sigterm_during_the_stop_that_begins_a_hold_ends_it(start: Start, fake_node: FakeNode):
    """`docker stop` or a pod deletion landing while the hold's stop waits for an agent that
    ignores SIGTERM: gpu-supervise exits once the agent is gone, within stop_timeout, and never
    goes on into the hold (nor starts the agent again when pending_timeout ends)."""
    proc, node = enable_requested(start, fake_node, "--stop-timeout", "3", "--pending-timeout",
                                  "2", agent=("--ignore-term",))  # fmt: skip
    proc.wait_for(HOLDING)
    time.sleep(0.5)  # the hold's SIGTERM, ignored: the stop waits for stop_timeout
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 137  # SIGKILL ended the agent
    lines = proc.log_lines()
    # By the log's own clock, so that a loaded test runner's delays do not count: the exit
    # comes within stop_timeout (+ 1 s) of the hold's stop; our SIGTERM did not extend it.
    stopped = (log_stamp(lines, "exiting 137") - log_stamp(lines, HOLDING)).total_seconds()
    assert stopped <= 3 + 1
    time.sleep(2.5)  # past pending_timeout: nothing was started
    assert proc.stdout.count(": ready") == 1 and "again as pid" not in proc.log
    assert proc.log_lines()[-1].endswith("exiting 137: stopped by SIGTERM")


def test_a_change_amid_instances_coming_and_going_is_acted_on(start: Start, fake_node: FakeNode):
    """GPU 1's instances come and go every 0.3 s (a scheduler, dynamic MIG): the tripwire fires
    and every probe differs. GPU 0's reconfiguration in the middle is still acted on, within
    interval + settle of its first sighting, while the churn goes on."""
    node = dgx_a100(["1g.5gb"] * 7, ["2g.10gb"], count=2)
    fake_node.write(node)
    opts = ["--interval", "3", "--cooldown", "0", "--settle", "1", "--log-level", "DEBUG"]
    proc = start([*opts, "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    node.gpu(0).set_layout(["3g.20gb"] * 2)
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.wait(0.3):
            n += 1
            node.gpu(1).set_layout(["1g.5gb" if n % 2 else "2g.10gb"], salt=str(n))
            fake_node.write(node)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        assert proc.wait(60) == 1  # acted on while the churn goes on
    finally:
        stop.set()
        thread.join()
    assert "MIG devices 7x1g.5gb -> 2x3g.20gb" in proc.log


def test_a_reset_as_another_gpus_allowance_runs_out_is_a_topology_change(start: Start, fake_node):
    """Two A100s: GPU 0 pending at start, GPU 1 pending 5 s into the hold, pending_timeout 10 s;
    GPU 1's reset goes through after GPU 0's allowance ran out, within GPU 1's. GPU 1's mode
    change took effect: the change line and exit 1 (the container is made again for it), never
    the agent started again in place on the new layout."""
    node = dgx_a100(count=2)
    node.gpu(0).request_mig(True)
    fake_node.write(node)
    proc = supervise(start, fake_node, "--pending-timeout", "10")
    proc.wait_for(HOLDING)  # GPU 0's allowance began at or before this
    seen = time.monotonic()
    time.sleep(5)
    node.gpu(1).request_mig(True)  # GPU 1's allowance begins at or after this: 15 s on
    fake_node.write(node)
    proc.wait_for("MIG mode change to on is pending a GPU reset; still holding")
    time.sleep(max(0.0, seen + 11 - time.monotonic()))  # GPU 0's 10 s are over
    reset_gpu(fake_node.path, node, 1, timeout=3)
    assert proc.wait(60) == 1
    out = proc.output
    old, new = node.copy(), node
    old.gpu(1).mig = 0
    assert f"(Old UUIDs: [{', '.join(old.uuids())}], New UUIDs: [{', '.join(new.uuids())}])" in out
    assert f"GPU 1 {node.gpu(1).uuid} (NVIDIA A100-SXM4-40GB): MIG mode off -> on" in out
    assert "a MIG mode change took effect while a GPU still waits for a reset" in out
    assert "again as pid" not in out and "still pending after" not in out
    assert "exiting 1: restart me (GPU topology changed)" in out
