"""Nothing imported after start: a module read from disk at the moment of a stop could be
another version's after an in-place upgrade."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

from conftest import AGENT, FakeNode, Proc
from fakenvml import dgx_a100

Start = Callable[..., Proc]
FAST = ["--interval", "0.2", "--cooldown", "0", "--settle", "0"]


# Records every module import (the audit event fires only for a module not loaded yet) with the
# time it happened, on the system-wide monotonic clock the test reads too.
AUDIT_IMPORTS = """
import os, sys, time
_fd = os.open(os.environ["GS_TEST_IMPORTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def _hook(event, args, _fd=_fd, _write=os.write, _now=time.monotonic):
    if event == "import":
        _write(_fd, f"{os.getpid()} {_now():.6f} {args[0]}\\n".encode())
sys.addaudithook(_hook)
"""


def imports_after(log: Path, pid: int, since: float) -> list[str]:
    """What process `pid` imported after `since` (the agent, Python too, records its own)."""
    lines = [line.split() for line in log.read_text().splitlines()]
    return [name for who, stamp, name in lines if int(who) == pid and float(stamp) > since]


def test_stopping_holding_and_starting_again_import_nothing(
    start: Start, fake_node: FakeNode, tmp_path: Path
):
    """A module imported at the moment of a stop would be read from disk long after start:
    after an in-place upgrade, the new version's (or, in the binary, a different archive read at
    the old offsets: a zlib error, the stop failing, the agent left running). So a whole run
    - a hold for a pending MIG mode change (the agent's tree stopped), its timeout (the agent
    started again, with a parent-death signal), a topology change (stopped again, exit 1) -
    imports nothing once the first probes are done."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(AUDIT_IMPORTS)
    log = tmp_path / "imports"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    node = dgx_a100(["1g.5gb"] * 7, count=2)
    fake_node.write(node)
    env = {**fake_node.env, "PYTHONPATH": str(tmp_path / "site"), "GS_TEST_IMPORTS": str(log),
           "NOTIFY_SOCKET": str(tmp_path / "notify")}  # fmt: skip
    opts = ["--settle", "0.2", "--pending-timeout", "1", "--parent-death-signal", "TERM"]
    try:
        proc = start([*FAST, *opts, "--", *AGENT, "--no-nvml"], env)
        proc.wait_for("ready")
        proc.wait_for("[GPU-Watcher] baseline")
        time.sleep(1.0)  # a few probes
        since = time.monotonic()
        node.gpu(1).request_mig(True)  # pending a reset that never comes: hold, then resume
        fake_node.write(node)
        proc.wait_for("started ", count=2)  # ...again as pid N
        node.gpu(1).pending = None
        node.gpu(0).set_layout(["3g.20gb"] * 2)
        fake_node.write(node)
        assert proc.wait(60) == 1, proc.output
        assert "Traceback" not in proc.log
        assert proc.output.count("ready") == 2  # the agent ran twice
        assert imports_after(log, proc.pid, since) == []
        assert imports_after(log, proc.pid, 0)  # the audit works: start-up did import
    finally:
        sock.close()
