"""How to read the process table: psutil's Process().children(recursive=True) against
gpu_supervise.procs.descendants (one pass over /proc/PID/stat), below a process with about 200
and about 2,000 processes on the machine; and what importing psutil costs.

    python tests/benchmarks/process_table.py

Prints the figures (median and p25-p75, ms); docs/performance.md quotes them.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

from gpu_supervise import procs


def _ms(fn, n: int) -> str:
    values = []
    for _ in range(n):
        began = time.perf_counter()
        fn()
        values.append((time.perf_counter() - began) * 1000)
    q = statistics.quantiles(values, n=4)
    return f"{statistics.median(values):.2f} ({q[0]:.2f}-{q[2]:.2f})"


def _import_ms(statement: str, n: int = 30) -> float:
    def once() -> float:
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        return (time.perf_counter() - began) * 1000

    return statistics.median(once() for _ in range(n))


def _on_machine() -> int:
    return len(procs.pids())


def main() -> int:
    import psutil

    bare = _import_ms("pass")
    print(f"import psutil: {_import_ms('import psutil') - bare:.1f} ms over bare python")
    for total in (200, 2000):
        extra = max(total - _on_machine(), 0)
        # half below us (what a stop walks), half elsewhere (what the walk reads past)
        loop = f"for i in $(seq {extra // 2}); do sleep 600 & done; wait"
        ours = subprocess.Popen(["sh", "-c", loop], start_new_session=True)
        loop = f"for i in $(seq {extra - extra // 2}); do sleep 600 & done; wait"
        # orphaned at once (not below us), still in the group killpg ends
        others = subprocess.Popen(["sh", "-c", f"({loop}) &"], start_new_session=True)
        try:
            while _on_machine() < total - 5:
                time.sleep(0.2)
            found = sorted(procs.descendants(os.getpid()))
            assert found == sorted(p.pid for p in psutil.Process().children(recursive=True))
            n = 50
            print(f"{_on_machine()} processes, {len(found)} below us:")
            print(f"  psutil children(recursive=True), ms: "
                  f"{_ms(lambda: psutil.Process().children(recursive=True), n)}")  # fmt: skip
            print(f"  procs.descendants, ms: {_ms(lambda: procs.descendants(os.getpid()), n)}")
        finally:
            for group in (ours, others):
                try:
                    os.killpg(group.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                group.wait()
            while _on_machine() > total - extra + 5:
                time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
