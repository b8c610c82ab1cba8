"""The README's first command: `gpu-supervise demo`, on a machine with no GPU or compiler."""

from __future__ import annotations

import re

from conftest import clean_env, run


def test_demo_tells_the_whole_story():
    env = clean_env()
    env.pop("LD_LIBRARY_PATH", None)
    out = run(["demo"], env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SIMULATED node" in out.stdout
    agents = re.findall(r"\[agent \d+\] started; monitoring \d+ devices: (.*)", out.stdout)
    assert len(agents) == 2
    old, new = (a.split() for a in agents)
    assert len(old) == 8 and len(new) == 3 and old[0] == new[0]  # same GPU, new MIG devices
    line = re.search(
        r"MIG configuration change detected \(Old UUIDs: \[(.*)\], New UUIDs: \[(.*)\]\)",
        out.stderr,
    )
    assert line and line[1].split(", ") == old and line[2].split(", ") == new
    assert "gpu-supervise exited with code 1" in out.stdout


def test_demo_refuses_a_change_before_the_baseline():
    for value in ("0", "-5", "1.9", "soon"):
        out = run(["demo", "--change-after", value], clean_env(), timeout=30)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "--change-after: must be from 2 to 3600 seconds" in out.stderr
