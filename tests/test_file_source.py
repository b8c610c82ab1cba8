"""The file source (--source file:PATH): what it reads, and what it never reads."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from conftest import AGENT, Proc, clean_env, run

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
