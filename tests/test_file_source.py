"""The file source (--source file:PATH): a saved snapshot watched as a node would be, a document
that cannot be read a failure, a file that vanishes no source, and a device never read."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from conftest import AGENT, FakeNode, Proc, clean_env, run
from fakenvml import dgx_a100

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


def test_a_file_source_replaced_by_a_device_is_a_failed_probe(start: Start, tmp_path: Path):
    """Never read without a limit: /dev/zero would fill memory."""
    saved = tmp_path / "node.json"
    saved.write_text(json.dumps({"schema": 1, "gpus": [{"index": 0, "uuid": "GPU-a"}]}))
    proc = start([*FAST, "--source", f"file:{saved}", "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("[GPU-Watcher] baseline")
    tmp = tmp_path / "swap"
    tmp.symlink_to("/dev/zero")
    os.replace(tmp, saved)
    assert proc.wait(60) == 1
    assert f"cannot read {saved}: not a regular file" in proc.output
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (4 * 1024 * 1024 + 1))
    out = run(["snapshot", "--source", f"file:{big}"], clean_env())
    assert out.returncode == 1 and "larger than 4194304 bytes" in out.stderr


def test_file_source_dry_run_from_a_real_snapshot(start: Start, fake_node: FakeNode, tmp_path):
    """An operator saves `snapshot --json` from a node and rehearses a change anywhere."""
    node = dgx_a100(["1g.5gb"] * 7, ["2g.10gb"] * 3)
    fake_node.write(node)
    snap = run(["snapshot", "--json"], fake_node.env)
    doc = json.loads(snap.stdout)
    saved = tmp_path / "node.json"
    saved.write_text(snap.stdout)
    env = clean_env()  # no NVML at all from here on
    assert run(["snapshot", "--json", "--source", f"file:{saved}"], env).stdout == snap.stdout
    proc = start([*FAST, "--source", f"file:{saved}", "--", *AGENT, "--no-nvml"], env)
    proc.wait_for("[GPU-Watcher] baseline: 8 GPU(s), 10 MIG device(s)")
    doc["gpus"][1]["mig_devices"].pop()
    saved.write_text(json.dumps(doc))
    assert proc.wait() == 1
    assert "MIG devices 3x2g.10gb -> 2x2g.10gb" in proc.output


def test_file_source_unreadable_document_is_a_failure(start: Start, tmp_path: Path):
    saved = tmp_path / "node.json"
    saved.write_text(json.dumps({"schema": 1, "gpus": []}))
    proc = start([*FAST, "--source", f"file:{saved}", "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("[GPU-Watcher] baseline: 0 GPU(s)")
    saved.write_text("{not json")
    assert proc.wait() == 1
    out = proc.output
    assert "topology probe failed (1/3 consecutive)" in out
    assert f"the topology source (file:{saved}) failed 3 consecutive probes" in out
    assert "NVML failed" not in out


def test_a_file_source_that_vanishes_later_reads_as_no_source(start: Start, tmp_path: Path):
    """A missing file at start is exit 2 (test_config). Deleted after the baseline, it reads as
    a node whose NVML went away: a topology change, not a failed probe."""
    saved = tmp_path / "node.json"
    saved.write_text(json.dumps({"schema": 1, "gpus": [{"index": 0, "uuid": "GPU-a"}]}))
    proc = start([*FAST, "--source", f"file:{saved}", "--", *AGENT, "--no-nvml"], clean_env())
    proc.wait_for("[GPU-Watcher] baseline: 1 GPU(s)")
    saved.unlink()
    assert proc.wait() == 1
    out = proc.output
    assert "GPU topology change detected (Old UUIDs: [GPU-a], New UUIDs: [])" in out
    assert "NVML is no longer usable" in out and "probe failed" not in out
