"""Read-only check of gpu-supervise against a real NVIDIA GPU, with a Markdown report.

    python tests/gpu/check.py [--seconds 120] [--probes 200] [--report PATH]

Strictly read-only: it calls NVML getters only, runs `nvidia-smi -L` and `nvidia-smi
--query-gpu=...` only, and lists /proc/driver/nvidia; it never creates, destroys or resets
anything and never changes modes, clocks or power. The GPU's layout is shared with others and is
left as found.

1. parity: `gpu-supervise snapshot --json` against `nvidia-smi -L` and `--query-gpu`
2. no false positives: gpu-supervise --interval 1 --cooldown 0 --settle 1 -- sleep, for
   --seconds, must not restart; the probes made are counted
3. probe cost: min / median / max over --probes probes, init+shutdown apart from enumeration
4. what the driver supports: the MIG config-change event, MIG modes, driver and NVML versions
5. gpu-supervise's own RSS and CPU while watching
6. the driver's procfs tree, which the tripwire lists: every MIG instance NVML shows has its
   capabilities/gpu<minor>/mig/gi<G>[/ci<C>]/access entry and no other; and one listing's cost
7. the device files NVML holds open while initialised (what the holder scan looks for): which,
   close-on-exec or not, none left after nvmlShutdown, and the scan finding the process

The same functions serve tests/gpu/test_gpu.py, which runs them in CI against the fake NVML
and a fake nvidia-smi.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from procfs import cpu_seconds, status_mib  # noqa: E402

MIG_CONFIG_CHANGE = 0x100  # nvmlEventMigConfigChange


def gpu_supervise() -> list[str]:
    exe = shutil.which("gpu-supervise")
    return [exe] if exe else [sys.executable, "-m", "gpu_supervise"]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# -- 1. parity ---------------------------------------------------------------------------------


def parity(env: dict[str, str]) -> dict:
    snap = _run([*gpu_supervise(), "snapshot", "--json"], env)
    if snap.returncode != 0:
        return {"ok": False, "error": snap.stderr.strip()}
    doc = json.loads(snap.stdout)
    listing = _run(["nvidia-smi", "-L"], env).stdout
    query = _run(
        ["nvidia-smi", "--query-gpu=uuid,name,pci.bus_id,mig.mode.current,mig.mode.pending",
         "--format=csv,noheader"], env,
    ).stdout  # fmt: skip
    ours = {
        g["uuid"]: {
            "name": g["name"],
            "pci_bus_id": g["pci_bus_id"].upper(),
            "mig_current": _mode(g["mig"]["current"]),
            "mig_pending": _mode(g["mig"]["pending"]),
            "mig_uuids": [m["uuid"] for m in g["mig_devices"]],
        }
        for g in doc["gpus"]
    }
    theirs: dict[str, dict] = {}
    for line in query.strip().splitlines():
        uuid, name, bus, current, pending = (f.strip() for f in line.split(","))
        theirs[uuid] = {
            "name": name, "pci_bus_id": _bus(bus), "mig_current": current,
            "mig_pending": pending, "mig_uuids": [],
        }  # fmt: skip
    current_gpu = None
    for line in listing.splitlines():
        found = re.search(r"\(UUID: ([^)]+)\)", line)
        if not found:
            continue
        if line.startswith("GPU "):
            current_gpu = found[1]
        elif current_gpu in theirs:
            theirs[current_gpu]["mig_uuids"].append(found[1])
    differences = [
        f"{uuid}: {key}: gpu-supervise {ours.get(uuid, {}).get(key)!r} "
        f"vs nvidia-smi {theirs.get(uuid, {}).get(key)!r}"
        for uuid in sorted(ours.keys() | theirs.keys())
        for key in ("name", "pci_bus_id", "mig_current", "mig_pending", "mig_uuids")
        if ours.get(uuid, {}).get(key) != theirs.get(uuid, {}).get(key)
    ]
    return {
        "ok": not differences and bool(ours),
        "gpus": len(ours),
        "mig_devices": sum(len(g["mig_uuids"]) for g in ours.values()),
        "differences": differences,
        "snapshot": doc,
        "nvidia_smi_L": listing,
    }


def _mode(value: bool | None) -> str:
    return "[N/A]" if value is None else ("Enabled" if value else "Disabled")


def _bus(bus: str) -> str:
    """nvidia-smi prints an 8-digit domain, as NVML's busId does; normalise case only."""
    return bus.strip().upper()


# -- 2 and 5. no false positives, own cost --------------------------------------------------------


def no_false_positives(env: dict[str, str], seconds: float) -> dict:
    cmd = [
        *gpu_supervise(), "--interval", "1", "--cooldown", "0", "--settle", "1",
        "--log-level", "DEBUG", "--termination-log", "", "--", "sleep", str(int(seconds) + 120),
    ]  # fmt: skip
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-{os.getpid()}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        time.sleep(min(3.0, seconds))
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        rss = []
        while time.monotonic() - t0 < seconds - min(3.0, seconds) and proc.poll() is None:
            rss.append(status_mib(proc.pid, "VmRSS"))
            time.sleep(1)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(proc.pid) - cpu0 if proc.poll() is None else float("nan")
        running = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    out = log.read_text()
    log.unlink(missing_ok=True)
    return {
        "ok": running and "Initiating self-restart" not in out and "probe failed" not in out,
        "seconds": round(elapsed + min(3.0, seconds), 1),
        "probes": out.count("topology unchanged") + out.count("baseline:"),
        "failed_probes": out.count("probe failed"),
        "restarts": out.count("Initiating self-restart"),
        "exit_code_after_sigterm": code,
        "rss_mib": {"max": max(rss, default=0.0), "median": statistics.median(rss or [0.0])},
        "cpu_seconds": round(cpu, 3),
        "cpu_percent": round(100 * cpu / elapsed, 3) if elapsed else None,
        "baseline": next((line for line in out.splitlines() if "baseline" in line), ""),
    }


# -- 3 and 4: in a child Python that loads NVML the way gpu-supervise does -------------------------


def inner(kind: str, env: dict[str, str], probes: int = 200) -> dict:
    out = _run([sys.executable, __file__, "--inner", kind, "--probes", str(probes)], env, 600)
    if out.returncode != 0:
        return {"ok": False, "error": out.stderr.strip()[-2000:]}
    return json.loads(out.stdout)


def _inner_probe_cost(n: int) -> dict:
    import pynvml

    from gpu_supervise.nvml import NvmlSource

    source = NvmlSource()
    source.probe()  # load the library once, as a long-running gpu-supervise has
    total, init = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        source.probe()
        total.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        init.append((time.perf_counter() - t0) * 1000)
    enum = [max(0.0, t - i) for t, i in zip(total, init)]

    def s(v: list[float]) -> dict:
        return {"min": min(v), "median": statistics.median(v), "max": max(v)}

    return {"ok": True, "n": n, "probe_ms": s(total), "init_shutdown_ms": s(init),
            "enumeration_ms": s(enum)}  # fmt: skip


def _inner_driver() -> dict:
    import pynvml

    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                events = pynvml.nvmlDeviceGetSupportedEventTypes(h)
            except pynvml.NVMLError as exc:
                events = f"error: {exc}"
            try:
                current, pending = pynvml.nvmlDeviceGetMigMode(h)
            except pynvml.NVMLError as exc:
                current = pending = f"error: {exc}"
            gpus.append({
                "index": i,
                "name": pynvml.nvmlDeviceGetName(h),
                "supported_events": hex(events) if isinstance(events, int) else events,
                "mig_config_change_event": isinstance(events, int)
                and bool(events & MIG_CONFIG_CHANGE),
                "mig_mode_current": current,
                "mig_mode_pending": pending,
            })  # fmt: skip
        return {
            "ok": True,
            "driver_version": pynvml.nvmlSystemGetDriverVersion(),
            "nvml_version": pynvml.nvmlSystemGetNVMLVersion(),
            "nvidia_ml_py": _version("nvidia-ml-py"),
            "gpus": gpus,
        }
    finally:
        pynvml.nvmlShutdown()


def _nvidia_fds(device_dir: str) -> list[dict]:
    """This process's descriptors on NVIDIA device files, with their close-on-exec flag."""
    out = []
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            flags = Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
        except (OSError, IndexError):
            continue
        if target.startswith(device_dir.rstrip("/") + "/nvidia"):
            out.append({"fd": int(fd), "path": target, "cloexec": bool(int(flags, 8) & 0o2000000)})
    return out


def _inner_device_files() -> dict:
    import pynvml

    from gpu_supervise import holders

    device_dir = os.environ.get("GPU_CHECK_DEVICE_DIR", "/dev")
    before = _nvidia_fds(device_dir)
    pynvml.nvmlInit()
    try:
        during = _nvidia_fds(device_dir)
        found = holders.scan(device_dir)  # every process but this one: its own are read below
        mine = holders._devices(f"/proc/{os.getpid()}/fd/", device_dir)
    finally:
        pynvml.nvmlShutdown()
    after = _nvidia_fds(device_dir)
    return {
        "ok": not before and bool(during) and not after and bool(mine),
        "before": before, "while_initialised": during, "after_shutdown": after,
        "scan_found_this_process": list(mine) if mine else None,
        "other_holders": [f"{h.pid} {h.cmdline}" for h in found.holders],
        "unreadable": found.unreadable,
    }  # fmt: skip


# -- 6. the driver's procfs tree -------------------------------------------------------------------


def procfs_tree(env: dict[str, str], listings: int = 50) -> dict:
    """The tree the tripwire lists, against what NVML shows (snapshot --json)."""
    from gpu_supervise.tripwire import absent_reason, list_tree

    root = env.get("GPU_CHECK_PROCFS_ROOT", "/proc/driver/nvidia")
    why = absent_reason(root)
    if why is not None:
        return {"ok": False, "error": why}
    listing = sorted(list_tree(root))
    minors = {}  # bus id as procfs names it (0000:07:00.0) -> device minor
    for entry in (e for e in listing if e.count("/") == 1 and e.startswith("gpus/")):
        try:
            info = Path(root, entry, "information").read_text(errors="replace")
        except OSError:
            continue
        found = re.search(r"Device Minor:\s*(\d+)", info)
        if found:
            minors[entry.split("/", 1)[1].lower()] = int(found[1])
    snap = _run([*gpu_supervise(), "snapshot", "--json"], env)
    if snap.returncode != 0:
        return {"ok": False, "error": snap.stderr.strip()}
    expected = set()
    for g in json.loads(snap.stdout)["gpus"]:
        minor = minors.get(g["pci_bus_id"][-12:].lower())
        for m in g["mig_devices"]:
            gi = f"capabilities/gpu{minor}/mig/gi{m['gpu_instance_id']}"
            expected |= {f"{gi}/access", f"{gi}/ci{m['compute_instance_id']}/access"}
    shape = re.compile(r"capabilities/gpu\d+/mig/gi\d+(/ci\d+)?/access")
    present = {e for e in listing if shape.fullmatch(e)}
    times = []
    for _ in range(listings):
        t0 = time.perf_counter()
        list_tree(root)
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "ok": present == expected,
        "entries": len(listing),
        "minors": minors,
        "missing": sorted(expected - present),
        "unexpected": sorted(present - expected),
        "listing_ms": {"min": min(times), "median": statistics.median(times), "max": max(times)},
        "listing": listing[:400],
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# -- report ----------------------------------------------------------------------------------------


def report(results: dict) -> str:
    p, f, c, d = results["parity"], results["watch"], results["probe"], results["driver"]
    lines = [
        f"# gpu-supervise on a real GPU — {results['date']}",
        "",
        f"Machine: {results['machine']}",
        "",
        "Read-only: NVML getters and `nvidia-smi -L` / `--query-gpu` only.",
        "",
        "| check | result |",
        "| --- | --- |",
        f"| 1. parity with nvidia-smi ({p.get('gpus', 0)} GPUs, {p.get('mig_devices', 0)} MIG "
        f"devices) | {'PASS' if p['ok'] else 'FAIL'} |",
        f"| 2. no false positives over {f['seconds']} s at interval 1 s | "
        f"{'PASS' if f['ok'] else 'FAIL'}: {f['probes']} probes, {f['restarts']} restarts, "
        f"{f['failed_probes']} failed probes |",
    ]
    if c.get("ok"):
        for key, label in (("probe_ms", "whole probe"), ("init_shutdown_ms", "nvmlInit+Shutdown"),
                           ("enumeration_ms", "enumeration")):  # fmt: skip
            v = c[key]
            lines.append(
                f"| 3. {label}, ms (n={c['n']}) | min {v['min']:.3f} / median {v['median']:.3f}"
                f" / max {v['max']:.3f} |"
            )
    else:
        lines.append(f"| 3. probe cost | error: {c.get('error')} |")
    if d.get("ok"):
        lines.append(
            f"| 4. driver / NVML / nvidia-ml-py | {d['driver_version']} / {d['nvml_version']} / "
            f"{d['nvidia_ml_py']} |"
        )
        for g in d["gpus"]:
            lines.append(
                f"| 4. GPU {g['index']} {g['name']} | MIG current {g['mig_mode_current']}, pending"
                f" {g['mig_mode_pending']}; events {g['supported_events']}; MIG config change "
                f"event {'supported' if g['mig_config_change_event'] else 'NOT supported'} |"
            )
    else:
        lines.append(f"| 4. driver support | error: {d.get('error')} |")
    lines.append(
        f"| 5. gpu-supervise while watching | RSS max {f['rss_mib']['max']:.1f} MiB, CPU "
        f"{f['cpu_seconds']} s ({f['cpu_percent']} %) |"
    )
    t, fd = results["procfs"], results["device_files"]
    if "error" in t:
        lines.append(f"| 6. the driver's procfs tree | {t['error']} |")
    else:
        lines.append(
            f"| 6. the driver's procfs tree ({t['entries']} entries) | "
            f"{'PASS' if t['ok'] else 'FAIL'}: missing {t['missing'] or 'none'}, unexpected "
            f"{t['unexpected'] or 'none'}; one listing median {t['listing_ms']['median']:.3f} ms |"
        )
    if "error" in fd:
        lines.append(f"| 7. NVML's device files | error: {fd['error']} |")
    else:
        held = ", ".join(f"{x['path']}{'' if x['cloexec'] else ' (not close-on-exec)'}"
                         for x in fd["while_initialised"])  # fmt: skip
        lines.append(
            f"| 7. NVML's device files | {'PASS' if fd['ok'] else 'FAIL'}: while initialised "
            f"{held or 'none'}; after nvmlShutdown {len(fd['after_shutdown'])}; the scan "
            f"{'found' if fd['scan_found_this_process'] else 'did NOT find'} this process |"
        )
    lines += ["", "## Details", "", "```", p.get("nvidia_smi_L", "").rstrip(), "```"]
    if p.get("differences"):
        lines += ["", "Differences:", *[f"- {x}" for x in p["differences"]]]
    lines += ["", f"Baseline line: `{f['baseline']}`", ""]
    if t.get("listing"):
        lines += ["The driver's tree (`/proc/driver/nvidia`, capabilities/ and gpus/):", "", "```",
                  *t["listing"], "```", ""]  # fmt: skip
    return "\n".join(lines)


def run_all(env: dict[str, str], seconds: float, probes: int) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node() or '?'}: {os.cpu_count()} CPUs, {platform.machine()}, "
        f"Python {platform.python_version()}",
        "parity": parity(env),
        "driver": inner("driver", env),
        "probe": inner("probe", env, probes),
        "device_files": inner("files", env),
        "procfs": procfs_tree(env),
        "watch": no_false_positives(env, seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--report", help="write the Markdown report here")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--inner", choices=["probe", "driver", "files"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        result = {"probe": lambda: _inner_probe_cost(args.probes), "driver": _inner_driver,
                  "files": _inner_device_files}[args.inner]()  # fmt: skip
        print(json.dumps(result))
        return 0
    results = run_all(dict(os.environ), args.seconds, args.probes)
    text = report(results)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0 if results["parity"]["ok"] and results["watch"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
