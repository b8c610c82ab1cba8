"""Benchmarks: what gpu-supervise costs next to tini, dumb-init and nothing at all.

    python tests/benchmarks/run.py [--quick] [--binary DIST/gpu-supervise/gpu-supervise]
    python tests/benchmarks/run.py --holders    (the holder scan's rows alone)
    python tests/benchmarks/run.py --start      (the start's figures alone, printed)

Writes tests/benchmarks/results.json and the Markdown table between the benchmark markers of
docs/performance.md. Measures; asserts nothing (the test suite asserts behaviour). Needs gcc,
tini and dumb-init (Debian packages) and an installed gpu-supervise. The package's bytecode is
compiled first (an editable install under PYTHONDONTWRITEBYTECODE would compile every module
at every start, which users of a wheel never pay).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

from fakenvml import build_library, dgx_a100, procfs_root  # noqa: E402
from procfs import cpu_seconds, status_mib  # noqa: E402

AGENT = [sys.executable, str(HERE.parent / "agents" / "agent.py")]
# Bare python, for the figure "over bare python": the same interpreter, straight to exec.
BARE_PYTHON = [sys.executable, "-c", "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"]

FAST = ["--cooldown", "0", "--termination-log", ""]


def stats(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p25": q[0],
        "p75": q[2],
        "min": values[0],
        "max": values[-1],
    }


class Bench:
    def __init__(self, quick: bool, binary: str | None) -> None:
        self.quick = quick
        self.tmp = Path(tempfile.mkdtemp(prefix="gs-bench-"))
        self.lib_dir = build_library(self.tmp / "nvml").parent
        self.stamp = self.tmp / "stamp"
        subprocess.run(["gcc", "-O2", "-o", str(self.stamp), str(HERE / "stamp.c")], check=True)
        self.node = self.tmp / "node.txt"
        dgx_a100(*[["1g.5gb"] * 7] * 8).write(self.node)  # 8 GPUs x 7 MIG devices
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GPU_SUPERVISE_")},
            "LD_LIBRARY_PATH": str(self.lib_dir),
            "FAKE_NVML_NODE": str(self.node),
        }
        gs = shutil.which("gpu-supervise")
        assert gs, "install gpu-supervise first: pip install -e ."
        self.wrappers: dict[str, list[str]] = {
            "bare": [],
            "bare python": BARE_PYTHON,
            "tini -s --": ["tini", "-s", "--"],
            "dumb-init": ["dumb-init"],
            "gpu-supervise --no-watch --": [gs, "--no-watch", *FAST, "--"],
            "gpu-supervise -- (8x7 MIG, NVML)": [gs, *FAST, "--"],
        }
        if binary:
            self.wrappers["binary --no-watch --"] = [binary, "--no-watch", *FAST, "--"]
            self.wrappers["binary -- (8x7 MIG, NVML)"] = [binary, *FAST, "--"]
        for name in ("tini", "dumb-init"):
            if shutil.which(name) is None:
                self.wrappers = {k: v for k, v in self.wrappers.items() if not k.startswith(name)}
        self.results: dict[str, object] = {}

    def reps(self, full: int) -> int:
        return max(5, full // 5) if self.quick else full

    # -- start ---------------------------------------------------------------------------------

    def start_overhead(self) -> None:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "supervisor")],
                       check=True)  # fmt: skip
        wall: dict[str, dict] = {}
        first: dict[str, dict] = {}
        for name, wrap in self.wrappers.items():
            times, firsts = [], []
            for _ in range(self.reps(40)):
                t0 = time.time_ns()
                out = subprocess.run(
                    [*wrap, str(self.stamp), "now"], env=self.env, capture_output=True, text=True
                )
                t1 = time.time_ns()
                assert out.returncode == 0, out.stderr
                times.append((t1 - t0) / 1e6)
                firsts.append((int(out.stdout.split()[0]) - t0) / 1e6)
            wall[name] = stats(times)
            first[name] = stats(firsts)
        self.results["start_wall_ms"] = wall
        self.results["start_to_child_ms"] = first

    # -- memory --------------------------------------------------------------------------------

    def memory(self) -> None:
        peak: dict[str, dict] = {}
        for name, wrap in self.wrappers.items():
            if name.startswith("bare"):
                continue
            extra = ["--interval", "0.2"] if "NVML" in name else []
            cmd = [*wrap[:1], *extra, *wrap[1:]] if extra else wrap
            values = []
            for _ in range(3):
                proc = subprocess.Popen(
                    [*cmd, "sleep", "3"], env=self.env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(2.5)  # a dozen probes at 0.2 s have run
                values.append(status_mib(proc.pid, "VmHWM"))
                proc.wait()
            peak[name] = stats(values)
        self.results["peak_rss_mib"] = peak

    # -- idle ------------------------------------------------------------------------------------

    def idle(self) -> None:
        window = 20.0 if self.quick else 60.0
        gs = self.wrappers["gpu-supervise -- (8x7 MIG, NVML)"][0]
        tree = ["--procfs-root", str(procfs_root(self.node))]
        runs = {  # the tripwire is off where the tree is missing (/proc/driver/nvidia here)
            "interval 1 s": ["--interval", "1", "--tripwire-interval", "0"],
            "interval 30 s": ["--interval", "30", "--tripwire-interval", "0"],
            "interval 30 s, tripwire every 1 s (8x7 tree)": ["--interval", "30", *tree],
        }
        procs = {
            name: subprocess.Popen(
                [gs, *args, *FAST, "--", "sleep", str(window + 30)],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            for name, args in runs.items()
        }
        time.sleep(3)
        before = {k: cpu_seconds(p.pid) for k, p in procs.items()}
        time.sleep(window)
        after = {k: cpu_seconds(p.pid) for k, p in procs.items()}
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
            p.wait()
        self.results["idle_cpu_s"] = {
            "window_s": window,
            **{k: round(after[k] - before[k], 3) for k in procs},
        }

    # -- probe -----------------------------------------------------------------------------------

    def probe_cost(self) -> None:
        os.environ["FAKE_NVML_NODE"] = str(self.node)
        import pynvml

        from gpu_supervise.nvml import NvmlSource

        pynvml.nvmlLib = ctypes.CDLL(str(self.lib_dir / "libnvidia-ml.so.1"))
        source = NvmlSource()
        n = self.reps(200)
        full = _timed(source.probe, n)
        init = _timed(lambda: (pynvml.nvmlInit(), pynvml.nvmlShutdown()), n)
        topo = source.probe()
        self.results["probe_ms"] = {
            "node": f"{len(topo.gpus)} GPUs, {sum(len(g.mig_devices) for g in topo.gpus)} MIG",
            "probe": stats(full),
            "init_shutdown": stats(init),
        }

    # -- the tripwire and the holder scan ---------------------------------------------------

    def listing_cost(self) -> None:
        from gpu_supervise.tripwire import list_tree

        root = str(procfs_root(self.node))
        self.results["listing_ms"] = {
            "entries": len(list_tree(root)),
            **stats(_timed(lambda: list_tree(root), self.reps(500))),
        }

    def holder_scan(self) -> None:
        """The scan that names who blocks a reset: on a node with 2,000 processes besides (a
        few descriptors each, as most have), and with 1,000 of 1,000 descriptors each."""
        count = 400 if self.quick else 2000
        env = {**self.env, "FAKE_NVML_DEV_DIR": str(self.tmp / "dev")}
        holder = subprocess.Popen([*AGENT, "--hold-nvml"], env=env, stdout=subprocess.PIPE)
        try:
            assert holder.stdout is not None
            while b"ready" not in holder.stdout.readline():
                pass
            dev = str(self.tmp / "dev")
            sleepers = ["sh", "-c", f"for i in $(seq {count}); do sleep 600 & done; echo up; wait"]
            self.results["holder_scan_ms"] = self._scan_among(sleepers, dev, holder.pid, 20)
            crowd = [sys.executable, "-c", CROWD, str(count // 2), str(1000)]
            self.results["holder_scan_fds_ms"] = self._scan_among(crowd, dev, holder.pid, 5)
        finally:
            holder.kill()
            holder.wait()
        self.results["holder_scan_measured"] = _measured()

    def _scan_among(self, command: list[str], dev: str, holder: int, reps: int) -> dict:
        """The scan's cost while `command`'s processes run (it prints a line once they do)."""
        from gpu_supervise.holders import scan

        others = subprocess.Popen(command, stdout=subprocess.PIPE, start_new_session=True)
        try:
            assert others.stdout is not None
            others.stdout.readline()
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
            fds = sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids if _listable(p))
            assert [h.pid for h in scan(dev).holders] == [holder]
            return {"processes": len(pids), "descriptors": fds,
                    **stats(_timed(lambda: scan(dev), self.reps(reps)))}  # fmt: skip
        finally:
            os.killpg(others.pid, signal.SIGKILL)
            others.wait()
            _gone(others.pid)

    def tripwire_detection(self) -> None:
        """Change -> exit 1 at the default interval (30 s) and settle (5 s), with the tripwire
        at its default 1 s and without: trials run ten at a time, each on a node of its own,
        the change landing anywhere in the 30 s poll cycle."""
        trials = self.reps(30)
        gs = self.wrappers["gpu-supervise -- (8x7 MIG, NVML)"][0]

        def trial(i: int, tripwire: bool) -> float:
            node_path = self.tmp / f"tripwire-{tripwire}-{i}.txt"
            node = dgx_a100(["1g.5gb"] * 7)
            node.write(node_path)
            env = {**self.env, "FAKE_NVML_NODE": str(node_path)}
            args = ["--procfs-root", str(procfs_root(node_path))] if tripwire else [
                "--tripwire-interval", "0"]  # fmt: skip
            proc = subprocess.Popen(
                [gs, *args, *FAST, "--", str(self.stamp), "term"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            assert proc.stdout is not None
            proc.stdout.readline()  # "ready"
            time.sleep(1.0 + (i * 30.0 / trials) % 30.0)  # spread over the poll cycle
            node.gpu(0).set_layout(["3g.20gb"] * 2)
            t0 = time.monotonic()
            node.write(node_path)
            code = proc.wait(120)
            assert code == 1, code
            return (time.monotonic() - t0) * 1000

        out = {}
        for tripwire in (True, False):
            with ThreadPoolExecutor(10) as pool:
                values = list(pool.map(lambda i, t=tripwire: trial(i, t), range(trials)))
            out["with" if tripwire else "without"] = stats(values)
        self.results["tripwire_detection_ms"] = {**out, "interval_s": 30.0, "settle_s": 5.0}

    # -- detection -------------------------------------------------------------------------------

    def detection(self) -> None:
        trials = self.reps(30)
        interval, settle = 1.0, 0.5

        def trial(i: int) -> float:
            node_path = self.tmp / f"detect-{i}.txt"
            node = dgx_a100(["1g.5gb"] * 7)
            node.write(node_path)
            env = {**self.env, "FAKE_NVML_NODE": str(node_path)}
            proc = subprocess.Popen(
                [self.wrappers["gpu-supervise -- (8x7 MIG, NVML)"][0], "--interval", str(interval),
                 "--settle", str(settle), "--tripwire-interval", "0", *FAST, "--",
                 str(self.stamp), "term"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            assert proc.stdout is not None
            proc.stdout.readline()  # "ready": the agent runs, the baseline is under way
            time.sleep(1.2 + (i % 10) / 10)  # land anywhere inside the probe cycle
            node.gpu(0).set_layout(["3g.20gb"] * 2)
            t0 = time.monotonic()
            node.write(node_path)
            code = proc.wait(60)
            elapsed = time.monotonic() - t0
            assert code == 1, code
            return elapsed * 1000

        with ThreadPoolExecutor(2) as pool:
            values = list(pool.map(trial, range(trials)))
        probe = self.results.get("probe_ms", {}).get("probe", {}).get("max", 0.0)  # type: ignore[union-attr]
        self.results["detection_ms"] = {
            **stats(values),
            "interval_s": interval,
            "settle_s": settle,
            "bound_ms": round(interval * 1000 + settle * 1000 + 2 * probe, 1),
        }

    # -- a permanently broken NVML under a restart policy --------------------------------------

    def broken_nvml(self) -> None:
        """A restart policy (a shell loop) around gpu-supervise while NVML breaks for good after
        the first baseline: how many restarts, over how many probe intervals."""
        window, interval = (15.0 if self.quick else 40.0), 0.2
        node_path = self.tmp / "broken.txt"
        node = dgx_a100(count=1)
        node.write(node_path)
        gs = self.wrappers["gpu-supervise -- (8x7 MIG, NVML)"][0]
        loop = 'while :; do echo start; "$@"; sleep 0.1; done'
        cmd = [gs, "--interval", str(interval), "--settle", "0.2", *FAST, "--", "sleep", "3600"]
        policy = subprocess.Popen(
            ["sh", "-c", loop, "restart-policy", *cmd],
            env={**self.env, "FAKE_NVML_NODE": str(node_path)},
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        time.sleep(2)  # a baseline, then steady probes
        node.fail("*", 18)  # RM has detected an NVML/RM version mismatch: a driver upgrade
        node.write(node_path)
        time.sleep(window)
        # SIGTERM to the policy's whole session: gpu-supervise stops its agent (which holds the
        # pipe too, in a process group of its own) and the loop ends
        subprocess.run(["pkill", "-TERM", "-s", str(policy.pid)], check=False)
        starts = policy.communicate(timeout=60)[0].split().count("start")
        intervals = window / interval
        self.results["broken_nvml"] = {
            "window_s": window,
            "interval_s": interval,
            "restarts": starts - 1,
            "probe_intervals": intervals,
            "default_minutes": round(intervals * 30 / 60),
        }

    # -- signals ---------------------------------------------------------------------------------

    def forwarding(self) -> None:
        out: dict[str, dict] = {}
        for name, wrap in self.wrappers.items():
            if name.startswith("bare"):
                continue
            values = []
            for _ in range(self.reps(20)):
                proc = subprocess.Popen(
                    [*wrap, str(self.stamp), "term"], env=self.env,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                )  # fmt: skip
                assert proc.stdout is not None
                proc.stdout.readline()
                time.sleep(0.5)  # steady state: gpu-supervise finished loading after the spawn
                t0 = time.time_ns()
                proc.send_signal(signal.SIGTERM)
                handled = int(proc.stdout.readline())
                proc.wait(30)
                values.append((handled - t0) / 1e6)
            out[name] = stats(values)
        self.results["sigterm_to_child_ms"] = out


# Forks argv[1] processes that each hold argv[2] descriptors (copies of stdin), then prints.
CROWD = """
import os, signal, sys
for _ in range(int(sys.argv[2]) - 3):
    os.dup(0)
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        signal.pause()
print("up", flush=True)
signal.pause()
"""


def _gone(group: int, timeout: float = 60.0) -> None:
    """Wait until the group's processes are reaped (by whoever inherited them): the next
    figure counts the processes of the node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _listable(pid: str) -> bool:
    try:
        os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    return True


def _measured() -> dict[str, str]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": (
            f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"
        ),
    }


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


# -- report ------------------------------------------------------------------------------------


def _fmt(s: dict) -> str:
    return f"{s['median']:.2f} ({s['p25']:.2f}–{s['p75']:.2f})"


def markdown(r: dict) -> str:
    names = list(r["start_wall_ms"])

    def row(label: str, key: str) -> str:
        cells = [_fmt(r[key][n]) if n in r[key] else "–" for n in names]
        return f"| {label} | " + " | ".join(cells) + " |"

    probe, idle, d = r["probe_ms"], r["idle_cpu_s"], r["detection_ms"]
    lines = [
        f"Measured {r['date']} on {r['machine']}; median (p25–p75) over repeated runs.",
        "",
        "| | " + " | ".join(f"`{n}`" for n in names) + " |",
        "| --- |" + " --- |" * len(names),
        row("start to exit of `true`, ms", "start_wall_ms"),
        row("start to child's first instruction, ms", "start_to_child_ms"),
        row("peak RSS while supervising, MiB", "peak_rss_mib"),
        row("SIGTERM to the child's handler, ms", "sigterm_to_child_ms"),
        "",
        "| gpu-supervise | figure |",
        "| --- | --- |",
        f"| one probe of {probe['node']} (fake NVML), ms | {_fmt(probe['probe'])} |",
        f"| … of which nvmlInit + nvmlShutdown, ms | {_fmt(probe['init_shutdown'])} |",
    ]
    first = r["start_to_child_ms"]
    for name in (n for n in names if n.startswith(("gpu-supervise", "binary"))):
        over = first[name]["median"] - first["bare python"]["median"]
        lines.append(f"| start to child's first instruction over bare python (the same run), "
                     f"`{name}`, ms | {over:.1f} |")  # fmt: skip
    for key in (k for k in idle if k != "window_s"):
        cpu = idle[key]
        share = 100 * cpu / idle["window_s"]
        lines.append(f"| CPU over {idle['window_s']:g} s idle, {key} | {cpu:.3f} s "
                     f"({share:.2f} % of a core) |")  # fmt: skip
    listing, scan = r["listing_ms"], r["holder_scan_ms"]
    lines.append(f"| one listing of the driver's MIG tree (8 GPUs x 7 instances, "
                 f"{listing['entries']} entries), ms | {_fmt(listing)} |")  # fmt: skip
    when = r.get("holder_scan_measured", {"date": r["date"], "machine": r["machine"]})
    note = "" if when["date"] == r["date"] else f" (measured {when['date']})"
    note = note if when["machine"] == r["machine"] else f" (measured {when['date']} on " \
        f"{when['machine']})"  # fmt: skip
    lines.append(f"| one scan for GPU holders, {scan['processes']} processes, "
                 f"{scan.get('descriptors', '?')} descriptors in all{note}, ms | "
                 f"{_fmt(scan)} |")  # fmt: skip
    if "holder_scan_fds_ms" in r:
        fds = r["holder_scan_fds_ms"]
        lines.append(f"| … with {fds['processes']} processes, {fds['descriptors']} descriptors "
                     f"in all{note}, ms | {_fmt(fds)} |")  # fmt: skip
    t = r["tripwire_detection_ms"]
    for key, label in (("with", "with the tripwire (1 s)"), ("without", "poll alone")):
        lines.append(
            f"| change → exit 1 at the default interval {t['interval_s']:g} s and settle "
            f"{t['settle_s']:g} s, {label}, ms ({t[key]['n']} trials) | median "
            f"{t[key]['median']:.0f}, max {t[key]['max']:.0f} |"
        )
    b = r["broken_nvml"]
    lines.append(
        f"| NVML broken for good after the baseline, under a restart loop: restarts in "
        f"{b['window_s']:g} s at interval {b['interval_s']:g} s ({b['probe_intervals']:.0f} "
        f"probe intervals, {b['default_minutes']} min at the default 30 s) | {b['restarts']} |"
    )
    lines.append(
        f"| detection: node file rewritten → exit 1, ms (interval {d['interval_s']:g} s, "
        f"settle {d['settle_s']:g} s, {d['n']} trials) | {_fmt(d)}, max {d['max']:.0f}; "
        f"bound {d['bound_ms']:.0f} + stop |"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--binary", help="also measure this PyInstaller build")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the table in "
                        "docs/performance.md")  # fmt: skip
    parser.add_argument("--holders", action="store_true", help="measure the holder scan alone; "
                        "the other figures stay those of results.json")  # fmt: skip
    parser.add_argument("--start", action="store_true", help="measure the start alone and "
                        "print it; results.json and the table stay as they are")  # fmt: skip
    args = parser.parse_args()
    bench = Bench(args.quick, args.binary)
    if args.start:
        bench.start_overhead()
        print(start_lines(bench.results))
        shutil.rmtree(bench.tmp, ignore_errors=True)
        return 0
    if args.holders:
        bench.holder_scan()
        results = {**json.loads((HERE / "results.json").read_text()), **bench.results}
        return report(results, args.no_docs, bench.tmp)
    steps = [bench.start_overhead, bench.memory, bench.probe_cost, bench.listing_cost,
             bench.holder_scan, bench.forwarding, bench.broken_nvml]  # fmt: skip
    for step in steps:
        print(f"... {step.__name__}", flush=True)
        step()
    print("... idle and detection (in parallel)", flush=True)
    idle = threading.Thread(target=bench.idle)
    idle.start()
    bench.detection()
    idle.join()
    print("... detection at the default interval, with and without the tripwire", flush=True)
    bench.tripwire_detection()
    return report({**_measured(), **bench.results}, args.no_docs, bench.tmp)


def start_lines(results: dict) -> str:
    """The start to the child's first instruction, each wrapper's and over bare python's."""
    first = results["start_to_child_ms"]
    base = first["bare python"]["median"]
    return "\n".join(f"{name}: {_fmt(s)} ms, {s['median'] - base:+.1f} ms over bare python"
                     for name, s in first.items())  # fmt: skip


def report(results: dict, no_docs: bool, tmp: Path) -> int:
    """results.json, and the table: printed, and between the markers of docs/performance.md."""
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    if not no_docs:
        doc = ROOT / "docs" / "performance.md"
        text = doc.read_text()
        start, end = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
        head, rest = text.split(start, 1)
        doc.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
