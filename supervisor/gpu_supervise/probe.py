"""Running probes off the main thread, each under a deadline.

NVML calls can hang on a sick GPU, and a thread stuck in C cannot be cancelled. So one worker
thread runs probes; the main thread only hands out requests and reads results, and a probe
that misses its deadline is reported as failed by the caller. While the worker is still stuck,
further requests are refused at once (and count as failures) instead of piling up threads.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .sources import Source
from .topology import NvmlRefused, ProbeError, SourceUnavailable, Topology


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found: a topology, or the error that stopped it.

    `unavailable` is set (with the absent topology) when the node has no usable NVML: that is a
    reading of "no GPUs", not a failure. `refused` marks a failure of NVML's start itself, which
    the agent's own start met too (a timeout or an error later in the probe is not that).
    """

    seq: int
    topology: Topology | None
    error: str | None = None
    unavailable: str | None = None
    seconds: float = 0.0
    refused: bool = False

    @property
    def failed(self) -> bool:
        return self.error is not None


def run_probe(source: Source, seq: int = 0) -> ProbeResult:
    start = time.monotonic()
    try:
        topo = source.probe()
    except SourceUnavailable as exc:
        return ProbeResult(seq, Topology.absent(), unavailable=str(exc), seconds=_since(start))
    except NvmlRefused as exc:
        return ProbeResult(seq, None, error=str(exc), seconds=_since(start), refused=True)
    except ProbeError as exc:
        return ProbeResult(seq, None, error=str(exc), seconds=_since(start))
    except Exception as exc:  # a bug or an unexpected binding error is still only a failure
        err = f"{type(exc).__name__}: {exc}"
        return ProbeResult(seq, None, error=err, seconds=_since(start))
    return ProbeResult(seq, topo, seconds=_since(start))


def failed(seq: int, error: str) -> ProbeResult:
    return ProbeResult(seq, None, error=error)


def _since(start: float) -> float:
    return time.monotonic() - start


class Prober:
    """One worker thread; `notify` is called from it whenever a result is ready."""

    def __init__(self, source: Source, notify: Callable[[], None] = lambda: None) -> None:
        self._source = source
        self._notify = notify
        self._requests: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[ProbeResult] = queue.SimpleQueue()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._work, name="gpu-probe", daemon=True)
        self._thread.start()

    def request(self, seq: int) -> bool:
        """Start probe `seq`; False when the worker is still stuck in an earlier one."""
        if self._busy.is_set():
            return False
        self._busy.set()
        self._requests.put(seq)
        return True

    def results(self) -> list[ProbeResult]:
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def wait(self, timeout: float) -> ProbeResult | None:
        try:
            return self._results.get(timeout=timeout)
        except queue.Empty:
            return None

    def _work(self) -> None:
        while True:
            seq = self._requests.get()
            result = run_probe(self._source, seq)
            self._busy.clear()
            self._results.put(result)
            self._notify()


def probe_once(source: Source, timeout: float) -> ProbeResult:
    """One probe with a deadline, for `snapshot` and other one-shot readers."""
    prober = Prober(source)
    prober.request(0)
    result = prober.wait(timeout)
    return result or failed(0, f"probe did not finish within {timeout:g} s (NVML call hanging?)")
