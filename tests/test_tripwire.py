"""The tripwire: the driver's MIG tree in procfs, listed every second, makes the next NVML probe
come at once when it changes. The fake NVML keeps such a tree beside its node file, in step with
it (fakenvml.Node.write); the tests point watch.procfs_root there, as conftest's fake_node does."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import AGENT, FakeNode, Proc, clean_env, log_stamp
from fakenvml import dgx_a100, procfs_root, reset_gpu
from gpu_supervise import tripwire
from gpu_supervise.tripwire import MAX_ENTRIES, Tripwire, absent_reason, list_tree

Start = Callable[..., Proc]
# The default interval, so that only the tripwire can explain a quick detection.
SLOW_POLL = ["--interval", "30", "--cooldown", "0", "--settle", "0.5", "--log-level", "DEBUG",
             "--tripwire-interval", "0.2"]  # fmt: skip
TRIPPED = "the driver's MIG listing changed: probing now"


# -- the listing ---------------------------------------------------------------------------------


def test_the_listing_is_the_drivers_tree(tmp_path: Path):
    node = dgx_a100(["3g.20gb"] * 2, None, count=2)
    node.write(tmp_path / "node")
    listing = list_tree(str(procfs_root(tmp_path / "node")))
    assert {p for p in listing if "/mig/gi" in p} == {
        "capabilities/gpu0/mig/gi1", "capabilities/gpu0/mig/gi1/access",
        "capabilities/gpu0/mig/gi1/ci0", "capabilities/gpu0/mig/gi1/ci0/access",
        "capabilities/gpu0/mig/gi2", "capabilities/gpu0/mig/gi2/access",
        "capabilities/gpu0/mig/gi2/ci0", "capabilities/gpu0/mig/gi2/ci0/access",
    }  # fmt: skip
    assert "capabilities/gpu1/mig" in listing  # a GPU with MIG off has its folder too
    assert {"gpus/0000:07:00.0", "gpus/0000:17:00.0"} <= listing
    assert "gpus/0000:07:00.0/information" not in listing  # the GPUs, not their files


def test_a_change_of_instances_changes_the_listing_and_state_does_not(tmp_path: Path):
    node = dgx_a100(["1g.5gb"] * 7, count=1)
    node.write(tmp_path / "node")
    wire = Tripwire(str(procfs_root(tmp_path / "node")))
    assert not wire.changed()
    node.gpu(0).temp, node.gpu(0).pstate = 80, 2  # state: the tree stays
    node.write(tmp_path / "node")
    assert not wire.changed()
    node.gpu(0).set_layout(["3g.20gb"] * 2)
    node.write(tmp_path / "node")
    assert wire.changed() and not wire.changed()  # once


def test_a_destroy_and_re_create_with_the_same_ids_is_invisible_to_it(tmp_path: Path):
    """Same profiles in the same places, new UUIDs: the driver's tree is the same before and
    after, so only an NVML probe (the poll) can tell (test below)."""
    node = dgx_a100(["3g.20gb"] * 2, count=1)
    node.write(tmp_path / "node")
    wire = Tripwire(str(procfs_root(tmp_path / "node")))
    node.gpu(0).set_layout(["3g.20gb"] * 2, salt="re-created")
    node.write(tmp_path / "node")
    assert not wire.changed()


def test_an_instance_replaced_by_another_of_another_id_is_a_change(tmp_path: Path):
    """As many entries as before, not the same ones: the listing is compared, not its size."""
    node = dgx_a100(["3g.20gb"], count=1)
    node.write(tmp_path / "node")
    root = procfs_root(tmp_path / "node")
    wire = Tripwire(str(root))
    mig = root / "capabilities" / "gpu0" / "mig"
    os.rename(mig / "gi1", mig / "gi2")  # gi1 destroyed, gi2 created in its place
    assert len(wire.last) == len(list_tree(str(root)))
    assert wire.changed() and not wire.changed()


@pytest.mark.parametrize("gone", ["the driver's folder", "capabilities"])
def test_the_tree_vanishing_is_a_change(tmp_path: Path, gone: str):
    """The driver unloaded (the whole folder goes), or the container's tmpfs remounted without
    the tree (its folder stays, empty)."""
    dgx_a100(["3g.20gb"] * 2, count=1).write(tmp_path / "node")
    root = procfs_root(tmp_path / "node")
    wire = Tripwire(str(root))
    shutil.rmtree(root if gone == "the driver's folder" else root / "capabilities")
    assert wire.changed() and wire.last is None
    assert not wire.changed()


def test_an_absent_tree_is_a_state_and_its_arrival_a_change(tmp_path: Path):
    root = tmp_path / "nvidia"
    wire = Tripwire(str(root))
    assert wire.last is None and not wire.changed()
    dgx_a100(["3g.20gb"] * 2, count=1).write(tmp_path / "node")
    os.rename(procfs_root(tmp_path / "node"), root)  # the driver loaded after start
    assert wire.changed()


def test_why_the_tree_cannot_be_used_is_said_plainly(tmp_path: Path):
    none, tmpfs = tmp_path / "none", tmp_path / "tmpfs"
    assert absent_reason(str(none)) == (
        f"{none} does not exist (no NVIDIA driver loaded, or not visible here)"
    )
    tmpfs.mkdir()  # the toolkit's tmpfs in a container, without the tree
    assert absent_reason(str(tmpfs)) == (
        f"{tmpfs}/capabilities does not exist: in a container, the NVIDIA toolkit shows it only "
        "with NVIDIA_MIG_MONITOR_DEVICES=all (and CAP_SYS_ADMIN)"
    )
    (tmpfs / "capabilities").write_text("")  # not a folder
    assert absent_reason(str(tmpfs)) == f"{tmpfs}/capabilities cannot be listed: Not a directory"
    dgx_a100(count=1).write(tmp_path / "node")
    assert absent_reason(str(procfs_root(tmp_path / "node"))) is None


TOO_MANY = f"more than {MAX_ENTRIES} entries: not the NVIDIA driver's tree"


@pytest.mark.parametrize("where", ["capabilities", "capabilities/gpu0/mig", "gpus"])
def test_a_listing_stays_bounded_on_a_tree_that_is_not_the_drivers(tmp_path: Path, where: str):
    """20,000 entries are a listing; one more, at any depth, and in gpus/ too, is not the
    driver's tree: never accepted, and the one line says why."""
    root = tmp_path / "big"
    (root / "capabilities").mkdir(parents=True)
    (root / where).mkdir(parents=True, exist_ok=True)
    for i in range(20_000 - len(list_tree(str(root)))):
        (root / where / str(i)).touch()
    assert len(list_tree(str(root))) == 20_000 and Tripwire(str(root)).last is not None
    (root / where / "one more").touch()
    assert Tripwire(str(root)).last is None
    assert absent_reason(str(root)) == f"{root}/capabilities cannot be listed: {TOO_MANY}"


def test_an_unreadable_folder_deeper_down_makes_the_listing_unusable(tmp_path: Path, monkeypatch):
    """As at the top: a listing that misses a folder is no listing, and the line names it.
    (os.scandir is made to refuse it: the tests run as root, whom permissions do not stop.)"""
    dgx_a100(["3g.20gb"] * 2, count=1).write(tmp_path / "node")
    root = procfs_root(tmp_path / "node")
    refused = root / "capabilities" / "gpu0" / "mig" / "gi2"
    scandir = os.scandir

    def refusing(path):
        if Path(path) == refused:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(tripwire.os, "scandir", refusing)
    assert Tripwire(str(root)).last is None
    assert absent_reason(str(root)) == f"{refused} cannot be listed: Permission denied"


def test_the_listing_goes_as_deep_as_the_drivers_tree_and_no_deeper(tmp_path: Path):
    """gpu<M>/mig/gi<G>/ci<C>/access is five below capabilities/; MAX_DEPTH allows one more."""
    deep = tmp_path / "capabilities" / "a" / "b" / "c" / "d" / "e" / "f"
    (deep / "g").mkdir(parents=True)
    listing = list_tree(str(tmp_path))
    assert "capabilities/a/b/c/d/e/f" in listing and "capabilities/a/b/c/d/e/f/g" not in listing


def test_a_link_in_the_tree_is_listed_not_followed(tmp_path: Path):
    (tmp_path / "elsewhere" / "inside").mkdir(parents=True)
    (tmp_path / "capabilities").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "capabilities" / "link")
    assert list_tree(str(tmp_path)) == {"capabilities/link"}


# -- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_reconfiguration_is_seen_within_a_second_at_the_default_interval(
    start: Start, fake_node: FakeNode
):
    old = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(old)
    proc = start([*SLOW_POLL, "--", *AGENT], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    new = old.copy()
    new.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(new)
    assert proc.wait(25) == 1  # a poll every 30 s could not have seen it yet
    lines = proc.log_lines()
    took = log_stamp(lines, "exiting 1:") - log_stamp(lines, TRIPPED)
    assert took.total_seconds() < 10  # the settle (0.5 s) and the stop, not an interval
    assert "MIG devices 7x1g.5gb -> 2x3g.20gb" in proc.log


@pytest.mark.slow
def test_what_the_tripwire_cannot_see_the_poll_still_catches(start: Start, fake_node: FakeNode):
    old = dgx_a100(["3g.20gb"] * 2)
    fake_node.write(old)
    proc = start(["--interval", "2", *SLOW_POLL[2:], "--", *AGENT, "--no-nvml"], fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    new = old.copy()
    new.gpu(0).set_layout(["3g.20gb"] * 2, salt="re-created")  # same ids, new UUIDs
    fake_node.write(new)
    assert proc.wait(60) == 1
    assert TRIPPED not in proc.log
    assert "MIG configuration change detected" in proc.log


@pytest.mark.slow
def test_the_reset_then_the_instances_end_a_hold_within_a_second(start: Start, fake_node):
    """While holding, the tripwire sees the instances created right after the reset: the hold
    ends without waiting for the next poll."""
    node = dgx_a100(count=1)
    node.gpu(0).request_mig(True)
    fake_node.write(node)
    proc = start([*SLOW_POLL, "--", *AGENT, "--hold-nvml"], fake_node.env)
    proc.wait_for("stopping the agent so the reset can go ahead")
    reset_gpu(fake_node.path, node, 0, timeout=60)
    node.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(node)
    assert proc.wait(25) == 1
    assert TRIPPED in proc.log and "MIG mode off -> on" in proc.log


@pytest.mark.slow
@pytest.mark.parametrize("root", ["absent", "no capabilities"])
@pytest.mark.slow
def test_without_the_tree_one_line_says_the_poll_alone_detects(
    start: Start, fake_node: FakeNode, tmp_path: Path, root: str
):
    fake_node.write(dgx_a100())
    folder = tmp_path / "nvidia"
    if root == "no capabilities":
        folder.mkdir()
    env = {**fake_node.env, "GPU_SUPERVISE_WATCH_PROCFS_ROOT": str(folder)}
    proc = start(["--interval", "0.2", "--cooldown", "0", "--", *AGENT, "--no-nvml"], env)
    proc.wait_for("baseline")
    time.sleep(1)
    (line,) = [x for x in proc.log_lines() if "detection relies on the poll alone" in x]
    assert " INFO    [GPU-Watcher] detection relies on the poll alone (every 0.2 s): " in line
    why = "NVIDIA_MIG_MONITOR_DEVICES=all" if root == "no capabilities" else "does not exist"
    assert why in line


@pytest.mark.slow
def test_a_tree_absent_at_start_is_listed_until_it_appears(
    start: Start, fake_node: FakeNode, tmp_path: Path
):
    """The driver loaded (or the tree shown) after start: once it appears, the tripwire works
    as if it had been there all along."""
    old = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(old)
    folder = tmp_path / "nvidia"
    env = {**fake_node.env, "GPU_SUPERVISE_WATCH_PROCFS_ROOT": str(folder)}
    proc = start([*SLOW_POLL, "--", *AGENT], env)
    proc.wait_for("[GPU-Watcher] baseline")
    proc.wait_for("detection relies on the poll alone")
    folder.symlink_to(procfs_root(fake_node.path))  # the tree appears
    proc.wait_for(TRIPPED, timeout=20)  # its arrival is a change: the next probe comes at once
    new = old.copy()
    new.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(new)
    assert proc.wait(25) == 1  # a poll every 30 s could not have seen it yet
    assert proc.log.count(TRIPPED) >= 2 and "MIG devices 7x1g.5gb -> 2x3g.20gb" in proc.log


@pytest.mark.slow
def test_tripwire_interval_0_turns_it_off(start: Start, fake_node: FakeNode):
    old = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(old)
    args = ["--interval", "2", *SLOW_POLL[2:-1], "0", "--", *AGENT, "--no-nvml"]
    proc = start(args, fake_node.env)
    proc.wait_for("[GPU-Watcher] baseline")
    new = old.copy()
    new.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(new)
    assert proc.wait(60) == 1
    assert TRIPPED not in proc.log and "poll alone" not in proc.log


@pytest.mark.slow
def test_a_file_source_has_no_tripwire(start: Start, tmp_path: Path):
    """The driver's tree says nothing about a file: with --source file: the tripwire is off,
    and no line says detection relies on the poll."""
    doc = tmp_path / "node.json"
    doc.write_text((Path(__file__).parent.parent / "examples" / "node.json").read_text())
    proc = start(["--source", f"file:{doc}", "--interval", "0.2", "--cooldown", "0", "--",
                  "sleep", "30"], clean_env())  # fmt: skip
    proc.wait_for("[GPU-Watcher] baseline")
    time.sleep(1)
    assert "no tripwire" in proc.log_lines()[0] and "poll alone" not in proc.log


@pytest.mark.slow
@pytest.mark.parametrize("source", ["file", "nvml"])
@pytest.mark.slow
def test_the_json_start_line_gives_the_tripwire_interval_the_text_gives(
    start: Start, fake_node: FakeNode, tmp_path: Path, source: str
):
    """tripwire_interval is the interval in force: 0 for a file source, as "no tripwire" says."""
    fake_node.write(dgx_a100())
    doc = tmp_path / "node.json"
    doc.write_text((Path(__file__).parent.parent / "examples" / "node.json").read_text())
    args = ["--source", f"file:{doc}"] if source == "file" else []
    proc = start([*args, "--log-format", "json", "--tripwire-interval", "0.2", "--", "sleep",
                  "30"], fake_node.env)  # fmt: skip
    proc.wait_for('"event": "baseline"')
    first = json.loads(proc.log.splitlines()[0])
    assert first["event"] == "start"
    if source == "file":
        assert first["tripwire_interval"] == 0
        assert first["message"].endswith(", no tripwire; a child subreaper")
    else:
        assert first["tripwire_interval"] == 0.2 and "tripwire every 0.2 s on " in first["message"]
