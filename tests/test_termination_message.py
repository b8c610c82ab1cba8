"""The Kubernetes termination message: what `kubectl describe pod` shows as the restart reason.

The kubelet keeps the file across restarts of the container (it is bind-mounted from the pod's
directory), so the file gpu-supervise writes often already holds the message of the container
before it: what it writes must replace that whole, never leave a tail of it. Its text is pure and
checked word for word (tests/mutation/run.py runs those tests); the rest runs gpu-supervise."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from test_events import GPU_LOST, MIG_CHANGE, NVML, decision

from conftest import AGENT, FakeNode, Proc, stalled_collector
from fakenvml import GPU_IS_LOST, dgx_a100
from gpu_supervise import events
from gpu_supervise.report import TERMINATION_LOG_LIMIT, write_termination_message
from gpu_supervise.watch import Event

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


# -- what it says, word for word -------------------------------------------------------------------


def test_the_termination_message_of_nvml_failures():
    failing = decision(Event.FAILING, errors=("GPU is lost", "Unknown Error", "GPU is lost"))
    assert events.termination_message(failing, NVML) == (
        "gpu-supervise: NVML failed 3 consecutive probes:\nGPU is lost\nUnknown Error\nGPU is lost"
    )


def test_the_termination_message_of_a_probe_stuck_while_holding():
    stuck = decision(Event.STUCK, errors=("probe 9 timed out",))
    assert events.termination_message(stuck, NVML) == (
        "gpu-supervise: a probe is stuck in NVML while holding for a GPU reset: gpu-supervise "
        "itself now holds the GPU and would block the reset it waits for. Exiting 1 to release "
        "the handle."
    )


def test_the_termination_message_of_a_change():
    assert events.termination_message(decision(Event.CHANGED, MIG_CHANGE), NVML) == (
        "gpu-supervise: GPU topology changed; restarting the agent.\n"
        "old: GPU 0: MIG 2x1g.5gb; GPU 1: MIG off\n"
        "new: GPU 0: MIG 1x1g.5gb; GPU 1: MIG off\n" + MIG_CHANGE.lines[0]
    )
    assert len(GPU_LOST.lines) == 1
    assert events.termination_message(decision(Event.CHANGED, GPU_LOST), NVML) == (
        "gpu-supervise: GPU topology changed; restarting the agent.\n"
        "old: GPU 0: MIG 2x1g.5gb; GPU 1: MIG off\n"
        "new: GPU 0: MIG 2x1g.5gb\n"
        "GPU 1 GPU-b (NVIDIA A100): lost"
    )


def test_the_termination_message_after_a_hold():
    stopped = (
        "gpu-supervise: the agent was stopped because a MIG mode change was pending a GPU reset; "
        "no GPU is pending any more."
    )
    assert events.termination_message(decision(Event.RELEASED), NVML) == (
        stopped + "\nThe pending change was withdrawn: the topology is as before."
    )
    took_effect = events.termination_message(decision(Event.RELEASED, GPU_LOST), NVML)
    assert took_effect == (
        stopped + "\ngpu-supervise: GPU topology changed; restarting the agent.\n"
        "old: GPU 0: MIG 2x1g.5gb; GPU 1: MIG off\n"
        "new: GPU 0: MIG 2x1g.5gb\n"
        "GPU 1 GPU-b (NVIDIA A100): lost"
    )


# -- the file: what a previous container left is replaced whole ------------------------------------


# What a previous container left: longer than any message below, and easy to spot.
OLD = "gpu-supervise: an older message from the container before this one. " * 50


def test_a_longer_message_already_there_is_replaced_whole(tmp_path: Path):
    log = tmp_path / "termination-log"
    log.write_text(OLD)
    assert write_termination_message(str(log), "gpu-supervise: GPU topology changed.\nold: x")
    assert log.read_text() == "gpu-supervise: GPU topology changed.\nold: x"


def test_a_message_cut_to_the_limit_replaces_a_longer_file_whole(tmp_path: Path):
    """The cut message (4096 bytes) over a file that was longer still: nothing of it remains."""
    log = tmp_path / "termination-log"
    log.write_bytes(b"x" * (3 * TERMINATION_LOG_LIMIT))
    assert write_termination_message(str(log), "y" * (2 * TERMINATION_LOG_LIMIT))
    data = log.read_bytes()
    assert len(data) == TERMINATION_LOG_LIMIT and b"x" not in data
    assert data.endswith(b"\n[truncated]")


def test_a_symlink_is_never_followed(tmp_path: Path):
    """The termination log is a symlink to a regular file: nothing is written, the file it
    names keeps every byte (a link to a file elsewhere is not the kubelet's file)."""
    target = tmp_path / "elsewhere"
    target.write_text(OLD)
    log = tmp_path / "termination-log"
    log.symlink_to(target)
    assert not write_termination_message(str(log), "gpu-supervise: GPU topology changed.")
    assert target.read_text() == OLD
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "absent")
    assert not write_termination_message(str(dangling), "gpu-supervise: GPU topology changed.")
    assert not (tmp_path / "absent").exists()


@pytest.mark.slow
def test_a_restart_replaces_the_previous_containers_message(
    start: Start, fake_node: FakeNode, tmp_path: Path
):
    """End to end: gpu-supervise exits 1 on a change with --termination-log naming a file that
    holds the previous container's longer message; the file then holds this restart's reason
    alone."""
    log = tmp_path / "termination-log"
    log.write_text(OLD)
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    proc = start([*FAST, "--termination-log", str(log), "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    node.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(node)
    assert proc.wait() == 1
    text = log.read_text()
    assert "older message" not in text
    assert len(text) < len(OLD)
    lines = text.split("\n")
    assert lines[:3] == [
        "gpu-supervise: GPU topology changed; restarting the agent.",
        "old: GPU 0: MIG 7x1g.5gb; " + "; ".join(f"GPU {i}: MIG off" for i in range(1, 8)),
        "new: GPU 0: MIG 2x3g.20gb; " + "; ".join(f"GPU {i}: MIG off" for i in range(1, 8)),
    ]
    assert lines[3].startswith("GPU 0 ") and "MIG devices 7x1g.5gb -> 2x3g.20gb" in lines[3]
    assert len(lines) == 4  # the message ends with its last line: no tail, no newline after it


# -- what it says, end to end ----------------------------------------------------------------------


@pytest.mark.slow
def test_termination_message_is_capped_at_4096_bytes(start: Start, fake_node: FakeNode, tmp_path):
    log = tmp_path / "termination-log"
    log.write_text("")
    node = dgx_a100(*[["1g.5gb"] * 7] * 8)
    fake_node.write(node)
    proc = start([*FAST, "--termination-log", str(log), "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    for gpu in node.gpus:
        gpu.set_layout(["3g.20gb"] * 2)
    fake_node.write(node)
    assert proc.wait() == 1
    data = log.read_bytes()
    assert len(data) <= 4096 and data.endswith(b"[truncated]")


@pytest.mark.slow
def test_termination_message_on_nvml_failures(start: Start, fake_node: FakeNode, tmp_path: Path):
    log = tmp_path / "termination-log"
    log.write_text("")
    fake_node.write(dgx_a100())
    proc = start([*FAST, "--termination-log", str(log), "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    fake_node.write(dgx_a100().fail("nvmlDeviceGetUUID", GPU_IS_LOST))
    assert proc.wait() == 1
    lines = log.read_text().splitlines()
    assert lines[0] == "gpu-supervise: NVML failed 3 consecutive probes:"
    assert len(lines) == 4 and all("GPU is lost" in line for line in lines[1:])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["absent", "fifo", "directory"])
def test_a_termination_log_that_is_not_a_regular_file_is_left_alone(
    start: Start, fake_node: FakeNode, tmp_path: Path, kind: str
):
    """Absent: not on Kubernetes, and never created on a host. A FIFO nobody reads would block
    a writer: it is never opened for a write that could wait."""
    log = tmp_path / "termination-log"
    if kind == "fifo":
        os.mkfifo(log)
    elif kind == "directory":
        log.mkdir()
    node = dgx_a100()
    fake_node.write(node)
    proc = start([*FAST, "--termination-log", str(log), "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    node.gpus.pop()
    fake_node.write(node)
    assert proc.wait(30) == 1
    assert "exiting 1: restart me (GPU topology changed)" in proc.output
    assert log.exists() is (kind != "absent")


@pytest.mark.slow
def test_decision_lines_that_never_get_out_are_counted_in_the_termination_message(
    fake_node: FakeNode, tmp_path: Path
):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    proc = stalled_collector(fake_node, tmp_path, stop_timeout="1")
    try:
        node.gpu(0).set_layout(["3g.20gb"] * 2)
        fake_node.write(node)
        assert proc.wait(60) == 1  # the collector never reads: given up after the wait
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    text = (tmp_path / "termination-log").read_text()
    first, *rest = text.splitlines()
    assert re.fullmatch(
        r"gpu-supervise: \d+ log line\(s\), [1-9]\d* of them decision lines \(the change, "
        r"failure or exit line\), could not be written: stderr was not being read",
        first,
    )
    assert rest[0] == "gpu-supervise: GPU topology changed; restarting the agent."
