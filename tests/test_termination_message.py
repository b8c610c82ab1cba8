"""The Kubernetes termination message: what kubectl describe pod shows as the restart reason."""

from __future__ import annotations

import re
from pathlib import Path

from test_stdio import _stalled_collector

from conftest import FakeNode
from fakenvml import dgx_a100

# -- decision lines that never get out -------------------------------------------------------------


def test_decision_lines_that_never_get_out_are_counted_in_the_termination_message(
    fake_node: FakeNode, tmp_path: Path
):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    proc = _stalled_collector(fake_node, tmp_path, stop_timeout="1")
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
