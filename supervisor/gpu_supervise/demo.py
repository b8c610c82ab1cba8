"""`gpu-supervise demo`: the whole story on any machine, no GPU and no compiler needed.

A SIMULATED node (one A100 in 1g.5gb x7) lives in a JSON file that gpu-supervise reads through
its file source. An example agent prints the UUIDs it sees. Part-way through, the demo
reconfigures the GPU to 3g.20gb x2: gpu-supervise logs the change line (old and new UUIDs),
stops the agent and exits 1, and the demo restarts it the way a restart policy would; the new
agent sees the new UUIDs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .args import Parser
from .child import child_environment
from .sources import FileSource
from .topology import Gpu, MigDevice, Topology

GPU_UUID = "GPU-5d1f8e3a-0c1e-4b7a-9a51-3f0b8f2c6e01"
A100 = "NVIDIA A100-SXM4-40GB"
# profile -> (slices, MiB, GPU-instance ids in placement order)
PROFILES = {"1g.5gb": (1, 4864, range(7, 15)), "3g.20gb": (3, 19968, (1, 2))}


def simulated_node(profile: str, count: int, generation: int) -> Topology:
    slices, mem, gis = PROFILES[profile]
    migs = tuple(
        MigDevice(
            index=i,
            uuid=f"MIG-{generation:08x}-0000-4000-8000-{gi:012x}",
            parent_uuid=GPU_UUID,
            gpu_instance_id=gi,
            compute_instance_id=0,
            slices=slices,
            memory_mb=mem,
            profile=profile,
            name=f"{A100} MIG {profile}",
        )
        for i, gi in zip(range(count), gis)
    )
    gpu = Gpu(0, GPU_UUID, A100, "00000000:07:00.0", True, True, migs)
    return Topology((gpu,), driver_version="550.54.15 (simulated)")


def write_node(path: Path, topo: Topology) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(topo.dumps())
    os.replace(tmp, path)


def self_command() -> list[str]:
    """How to run this gpu-supervise again: the frozen build's launcher (sys.executable is the
    program inside it, which needs the bundled C library), or this Python's module."""
    from .install import running_bundle

    bundle = running_bundle()
    if bundle is not None:
        return [str(bundle.executable)]
    return [sys.executable, "-m", "gpu_supervise"]


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def agent(node_file: Path) -> int:
    """The example agent: caches the UUIDs it sees at start, as real agents cache NVML handles."""
    uuids = FileSource(node_file).probe().uuids()
    print(f"[agent {os.getpid()}] started; monitoring {len(uuids)} devices: {' '.join(uuids)}")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    beat = 0
    while not stop:
        time.sleep(0.1)
        beat += 1
        if beat % 20 == 0:
            print(f"[agent {os.getpid()}] collected metrics for {len(uuids)} devices", flush=True)
    print(f"[agent {os.getpid()}] SIGTERM received, shutting down", flush=True)
    return 0


def _after_baseline(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 2.0 <= seconds <= 3600.0:
        raise argparse.ArgumentTypeError(f"must be from 2 to 3600 seconds, got {text!r}")
    return seconds


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The demo never hangs: a run that does not end in time is stopped, and says so."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"gpu-supervise did not exit within {timeout:g} s; stopping it")
        proc.kill()
        return proc.wait()


def main(argv: list[str]) -> int:
    parser = Parser(prog="gpu-supervise demo", description=__doc__)
    parser.add_argument("--agent", metavar="NODE_FILE", help=argparse.SUPPRESS)
    parser.add_argument(
        "--change-after",
        metavar="SECONDS",
        type=_after_baseline,
        default=4.0,
        help="seconds before the MIG change (at least 2: after the baseline and cool-down)",
    )
    args = parser.parse_args(argv)
    if args.agent:
        return agent(Path(args.agent))
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]

    with tempfile.TemporaryDirectory(prefix="gpu-supervise-demo-") as tmp:
        node = Path(tmp) / "node.json"
        write_node(node, simulated_node("1g.5gb", 7, generation=1))
        say("SIMULATED node: one NVIDIA A100-SXM4-40GB in MIG mode, 7x 1g.5gb (no GPU is used)")
        supervise = [
            *self_command(),
            "--source", f"file:{node}",
            "--interval", "1", "--cooldown", "1", "--settle", "1", "--stop-timeout", "5",
            "--termination-log", "",
            "--", *self_command(), "demo", "--agent", str(node),
        ]  # fmt: skip
        env = child_environment(os.environ)
        env = {k: v for k, v in env.items() if not k.startswith("GPU_SUPERVISE_")}
        env["PYTHONUNBUFFERED"] = "1"
        say("starting: gpu-supervise --interval 1 --cooldown 1 --settle 1 -- <example agent>")
        first = subprocess.Popen(supervise, env=env)
        time.sleep(args.change_after)
        say("operator reconfigures GPU 0: 1g.5gb x7 -> 3g.20gb x2 (as mig-parted would)")
        write_node(node, simulated_node("3g.20gb", 2, generation=2))
        code = _wait(first, 60)
        say(f"gpu-supervise exited with code {code}: the restart policy starts it again")
        if code != 1:
            say("unexpected exit code; a restart policy would still restart it")
        time.sleep(1)
        second = subprocess.Popen(supervise, env=env)
        time.sleep(3)
        say("the new agent sees the new UUIDs; stopping the demo (SIGTERM, as `kubectl delete`)")
        second.send_signal(signal.SIGTERM)
        final = _wait(second, 60)
        say(
            f"done: first run exited {code} on the MIG change, second run stopped cleanly ({final})"
        )
        return 0 if (code, final) == (1, 0) else 1
