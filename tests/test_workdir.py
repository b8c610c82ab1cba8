"""gpu-supervise holds no working directory but / once the agent runs, as dumb-init does (so a
volume can be unmounted under it), while the agent keeps the caller's; every relative path of
the settings is made absolute first, so nothing read later moves."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ROOT, FakeNode, Proc, clean_env
from fakenvml import dgx_a100
from gpu_supervise.config import load

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


def agent_pids(proc: Proc, count: int) -> list[int]:
    """The pids of the agents started so far (`started ... as pid N`), once there are `count`."""
    proc.wait_for(" as pid ", count=count)
    return [int(pid) for pid in re.findall(r"started .* as pid (\d+)", proc.log)]


def cwd(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/cwd")


def test_relative_paths_of_the_settings_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """gpu-supervise should read every path it was given relative to the caller's working
    directory, even after it has left it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "node.json").write_text("{}")
    flags = {
        ("watch", "source"): "file:node.json",
        ("watch", "device_dir"): "dev",
        ("watch", "procfs_root"): "proc/nvidia",
        ("report", "termination_log"): "t.log",
    }
    s = load(flags, environ={})
    assert s.source == f"file:{tmp_path}/node.json"
    assert (s.device_dir, s.procfs_root) == (f"{tmp_path}/dev", f"{tmp_path}/proc/nvidia")
    assert s.termination_log == f"{tmp_path}/t.log"
    assert load({("report", "termination_log"): ""}, environ={}).termination_log == ""


def test_gpu_supervise_leaves_its_working_directory_and_the_agent_keeps_it(
    start: Start, tmp_path: Path
):
    """gpu-supervise should be at / once the agent runs, the agent in the caller's directory, and
    a relative `file:` source and termination log should still be the caller's files."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(ROOT / "examples" / "node.json", work / "node.json")
    (work / "term.log").write_text("")  # written only where it exists
    args = [*FAST, "--source", "file:node.json", "--termination-log", "term.log"]
    proc = start([*args, "--", "sleep", "300"], clean_env(), cwd=work)
    (agent,) = agent_pids(proc, 1)
    proc.wait_for("[GPU-Watcher] baseline: 2 GPU(s)")
    assert (cwd(proc.pid), cwd(agent)) == ("/", str(work))
    doc = json.loads((work / "node.json").read_text())
    doc["gpus"].pop()
    (work / "node.json").write_text(json.dumps(doc))  # a GPU lost, read from the same file
    assert proc.wait() == 1, proc.log
    assert "GPU topology changed" in (work / "term.log").read_text()


def test_the_agent_started_again_starts_in_the_callers_directory(
    start: Start, fake_node: FakeNode, tmp_path: Path
):
    """gpu-supervise should start an agent again (a hold that timed out) where the first one
    started, and be back at / itself afterwards."""
    node = dgx_a100(["1g.5gb"] * 7, count=2)
    fake_node.write(node)
    work = tmp_path / "work"
    work.mkdir()
    proc = start([*FAST, "--pending-timeout", "1", "--", "sleep", "300"], fake_node.env, cwd=work)
    proc.wait_for("[GPU-Watcher] baseline")
    node.gpu(1).request_mig(True)  # pending a reset that never comes: hold, then start again
    fake_node.write(node)
    _, again = agent_pids(proc, 2)
    assert (cwd(again), cwd(proc.pid)) == (str(work), "/"), proc.log


def test_an_agent_started_again_after_its_directory_went_starts_at_root(
    start: Start, fake_node: FakeNode, tmp_path: Path
):
    """gpu-supervise should start the agent again at / when the caller's directory is gone, and
    say so: never fail the restart over it."""
    node = dgx_a100(["1g.5gb"] * 7, count=2)
    fake_node.write(node)
    work = tmp_path / "work"
    work.mkdir()
    proc = start([*FAST, "--pending-timeout", "1", "--", "sleep", "300"], fake_node.env, cwd=work)
    proc.wait_for("[GPU-Watcher] baseline")
    work.rmdir()
    node.gpu(1).request_mig(True)
    fake_node.write(node)
    _, again = agent_pids(proc, 2)
    assert cwd(again) == "/"
    assert f"cannot enter {work} (No such file or directory): the agent starts again at /" in (
        proc.log
    )
