"""Hopper (H100, H200) under NVIDIA's DRA driver with DynamicMIG: a claim's MIG instance is
created when the claim is prepared and destroyed when it is released, and MIG mode goes on and
off with them. On Hopper a MIG mode change takes effect at once, with no GPU reset, so nothing
is ever pending: gpu-supervise restarts the agent on the change and never holds. An A100's mode
change waits for a reset, and gpu-supervise holds (the contrast)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pynvml
import pytest

from conftest import AGENT, FakeNode, Proc
from fakenvml import dgx_a100, h100_node, h200_node, procfs_root, reset_gpu
from gpu_supervise.nvml import NvmlSource

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0.3", "--stop-timeout", "2"]
PENDING = "pending a GPU reset"
HOLDING = "stopping the agent so the reset can go ahead"


def mig_mode(index: int) -> tuple[int, int]:
    """(current, pending) as nvidia-ml-py reads them from the fake library."""
    pynvml.nvmlInit()
    try:
        return tuple(pynvml.nvmlDeviceGetMigMode(pynvml.nvmlDeviceGetHandleByIndex(index)))
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.parametrize("node", [h100_node(count=1), h200_node(count=1)], ids=["h100", "h200"])
def test_a_mig_mode_change_on_hopper_is_current_at_once(node_path: Path, node):
    node.gpu(0).request_mig(True)
    node.write(node_path)
    assert mig_mode(0) == (1, 1)
    node.gpu(0).request_mig(False)
    node.write(node_path)
    assert mig_mode(0) == (0, 0)


def test_a_mig_mode_change_on_an_a100_stays_pending_until_a_reset(node_path: Path):
    node = dgx_a100(count=1)
    node.gpu(0).request_mig(True)
    node.write(node_path)
    assert mig_mode(0) == (0, 1)
    node.gpu(0).reset()
    node.write(node_path)
    assert mig_mode(0) == (1, 1)


def test_a_hopper_gpu_can_be_told_to_wait_for_a_reset(node_path: Path):
    node = h100_node(count=1)
    node.gpu(0).mode_needs_reset = True
    node.gpu(0).request_mig(True)
    node.write(node_path)
    assert mig_mode(0) == (0, 1)


def test_dra_prepare_and_release_reuse_gpu_instance_ids_and_turn_mig_off(node_path: Path):
    node = h100_node(count=1)
    node.write(node_path)
    first = node.dra_prepare(node_path, 0, "1g.10gb")
    topo = NvmlSource().probe()
    assert (topo.gpus[0].mig_current, topo.gpus[0].mig_pending) == (True, True)
    assert [(m.uuid, m.gpu_instance_id) for m in topo.gpus[0].mig_devices] == [(first, 7)]
    second = node.dra_prepare(node_path, 0, "1g.10gb")
    node.dra_release(node_path, 0, first)
    third = node.dra_prepare(node_path, 0, "1g.10gb")  # GI 7 is free again: reused at once
    topo = NvmlSource().probe()
    assert {(m.uuid, m.gpu_instance_id) for m in topo.gpus[0].mig_devices} == {
        (second, 8),
        (third, 7),
    }
    assert len({first, second, third}) == 3  # a reused GI id comes with a fresh UUID
    node.dra_release(node_path, 0, second)
    topo = NvmlSource().probe()
    assert (topo.gpus[0].mig_current, len(topo.gpus[0].mig_devices)) == (True, 1)
    node.dra_release(node_path, 0, third)  # the last instance: MIG off, at once
    topo = NvmlSource().probe()
    assert (topo.gpus[0].mig_current, topo.gpus[0].mig_pending) == (False, False)
    assert topo.uuids() == [node.gpu(0).uuid]
    assert sorted(p.name for p in procfs_root(node_path).rglob("gi*")) == []


def test_dra_prepare_writes_the_instance_into_the_procfs_tree(node_path: Path):
    node = h200_node(count=1)
    node.write(node_path)
    node.dra_prepare(node_path, 0, "2g.35gb")
    mig = procfs_root(node_path) / "capabilities" / "gpu0" / "mig"
    assert sorted(p.relative_to(mig).as_posix() for p in mig.rglob("*")) == [
        "gi3",
        "gi3/access",
        "gi3/ci0",
        "gi3/ci0/access",
    ]


def test_dra_prepare_on_an_a100_with_mig_off_is_refused(node_path: Path):
    node = dgx_a100(count=1)
    node.write(node_path)
    with pytest.raises(ValueError, match="needs a GPU reset"):
        node.dra_prepare(node_path, 0, "1g.5gb")


# -- end to end: the real gpu-supervise --------------------------------------------------------


def supervise(start: Start, fake_node: FakeNode) -> Proc:
    """gpu-supervise in front of an agent that keeps NVML open, as a restart policy starts it."""
    proc = start([*FAST, "--", *AGENT, "--hold-nvml"], fake_node.env)
    proc.wait_for("agent ")
    proc.wait_for("[GPU-Watcher] baseline")
    return proc


def test_a_dra_claim_on_an_h100_restarts_the_agent_and_never_holds(
    start: Start, fake_node: FakeNode
):
    """Prepare: MIG off -> on with one instance, at once. Released: MIG on -> off. Each is a
    change line and exit 1; nothing is ever pending, so there is never a hold."""
    node = h100_node(count=1)
    fake_node.write(node)
    proc = supervise(start, fake_node)
    mig = node.dra_prepare(fake_node.path, 0, "1g.10gb")
    assert proc.wait(60) == 1
    out = proc.output
    assert "MIG mode off -> on" in out and "MIG configuration change detected" in out
    assert "exiting 1: restart me" in out
    assert PENDING not in out and HOLDING not in out

    proc = supervise(start, fake_node)  # the restart policy
    node.dra_release(fake_node.path, 0, mig)
    assert proc.wait(60) == 1
    out = proc.output
    assert "MIG mode on -> off" in out and "exiting 1: restart me" in out
    assert PENDING not in out and HOLDING not in out


def test_the_same_mode_change_on_an_a100_holds_for_a_reset(start: Start, fake_node: FakeNode):
    node = dgx_a100(count=1)
    fake_node.write(node)
    proc = supervise(start, fake_node)
    node.gpu(0).request_mig(True)
    fake_node.write(node)
    proc.wait_for(HOLDING)
    assert PENDING in proc.output
    reset_gpu(fake_node.path, node, 0, timeout=60)
    assert proc.wait(60) == 1
    assert "MIG mode off -> on" in proc.output
