"""Strings from NVML as they come: bytes that are not UTF-8 and control characters never
reach a terminal or a log line raw, and a UUID that is not text fails the probe."""

from __future__ import annotations

import json
from collections.abc import Callable

from conftest import AGENT, FakeNode, Proc, run
from fakenvml import dgx_a100

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


def test_a_gpu_name_that_is_not_utf8_is_description_only(fake_node: FakeNode):
    node = dgx_a100(count=1)
    node.gpu(0).name = "NVIDIA A100\udcff"  # the byte 0xff
    fake_node.write(node)
    out = run(["snapshot", "--json"], fake_node.env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["gpus"][0]["name"] == "NVIDIA A100\\xff"


def test_a_uuid_that_is_not_text_fails_the_probe(fake_node: FakeNode):
    node = dgx_a100(count=1)
    node.gpu(0).uuid = "GPU-\udcff"
    fake_node.write(node)
    out = run(["snapshot"], fake_node.env)
    assert out.returncode == 1
    assert "GPU 0: NVML gave a UUID that is not text: b'GPU-\\xff'" in out.stderr


def test_control_characters_never_reach_the_terminal(start: Start, fake_node: FakeNode):
    node = dgx_a100(["1g.5gb"] * 7, count=1)
    node.gpu(0).name = "NVIDIA A100\x1b]0;pwned\x07\x1b[2J"
    fake_node.write(node)
    for fmt in ("text", "json"):
        proc = start([*FAST, "--log-format", fmt, "--", *AGENT, "--no-nvml"], fake_node.env)
        proc.wait_for("baseline")
        changed = node.copy()
        changed.gpu(0).set_layout(None)
        fake_node.write(changed)
        assert proc.wait(60) == 1
        raw = proc.log_path.read_bytes()
        assert b"\x1b" not in raw and b"\x07" not in raw
        assert ("\\x1b]0;pwned\\x07" if fmt == "text" else "\\u001b]0;pwned") in proc.output
        fake_node.write(node)
    out = run(["snapshot"], fake_node.env)
    assert "\x1b" not in out.stdout and "\\x1b[2J" in out.stdout
