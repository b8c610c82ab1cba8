"""Logging to stderr through loguru: plain text for people, one JSON object a line for machines.

Only the main thread logs (loguru is not re-entrant, so never from a signal handler). Structured
fields are passed with `logger.bind(...)`; text output shows the message alone so the PRD's
`[GPU-Watcher] …` line reads exactly as log alerts expect, JSON output adds the fields.

Two guarantees, whatever NVML or the agent's command line hold:
- text lines carry no control characters: an ESC in a GPU name must not reach the terminal of
  whoever runs `kubectl logs` (JSON escapes them by itself);
- no line is longer than LINE_LIMIT: containerd and Docker split longer lines into partial
  records, and many collectors then see broken JSON.
Logging must never stop a supervisor: lines are written by a thread of their own, so a stderr
that nobody reads (a stalled pipe) blocks that thread, never the main loop that handles signals
and stops. While it is blocked, up to QUEUE_LINES lines wait; more are dropped and counted. A
line that cannot be written at all (stderr closed, its reader gone) is dropped.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from datetime import timezone
from typing import Any

from loguru import logger

from .text import printable

PROGRAM = "gpu-supervise"
LINE_LIMIT = 16 * 1024  # bytes, the newline included: the runtimes' split point
CORE = ("time", "level", "message", "program", "pid")  # in every JSON line, never dropped
QUEUE_LINES = 1000


class _Writer:
    """Writes whole lines to fd 2 from a daemon thread; `put` never blocks."""

    def __init__(self) -> None:
        self._lines: queue.Queue[bytes] = queue.Queue(QUEUE_LINES)
        self._dropped = 0
        self._idle = threading.Event()
        self._idle.set()
        threading.Thread(target=self._run, name="log-writer", daemon=True).start()

    def put(self, line: str) -> None:
        data = line.encode("utf-8", "backslashreplace") + b"\n"
        self._idle.clear()
        try:
            self._lines.put_nowait(data)
        except queue.Full:
            self._dropped += 1

    def flush(self, timeout: float) -> None:
        """Wait, at most `timeout`, for what is queued to be written (at exit)."""
        deadline = time.monotonic() + timeout
        while not (self._lines.empty() and self._idle.is_set()):
            if time.monotonic() >= deadline:
                return
            time.sleep(0.005)

    def _run(self) -> None:
        while True:
            data = self._lines.get()
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                note = f"{PROGRAM}: {dropped} log line(s) dropped: stderr was not being read\n"
                self._write(note.encode())
            self._write(data)
            if self._lines.empty():
                self._idle.set()

    @staticmethod
    def _write(data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(2, view) :]
        except OSError:
            pass


_writer: _Writer | None = None


def _write(line: str) -> None:
    global _writer
    if _writer is None:
        _writer = _Writer()
    _writer.put(line)


def flush(timeout: float = 1.0) -> None:
    if _writer is not None:
        _writer.flush(timeout)


def _fit_text(line: str) -> str:
    data = line.encode("utf-8", "backslashreplace")
    if len(data) < LINE_LIMIT:
        return line
    marker = f" [line truncated: {len(data)} bytes]"
    keep = LINE_LIMIT - 1 - len(marker.encode())
    return data[:keep].decode("utf-8", "ignore") + marker


def _fit_json(doc: dict[str, Any]) -> str:
    """Make the object fit: first drop large extra fields (over 1 KiB, the largest first), then
    cut the message, measured in the bytes of its JSON form (an escaped character takes up to
    six). Small fields (the event, a GPU's UUID) stay."""
    line = json.dumps(doc, default=str)
    size = {k: len(json.dumps(v, default=str)) for k, v in doc.items()}
    large = sorted((k for k in doc if k not in CORE and size[k] > 1024), key=size.__getitem__)
    dropped: list[str] = []
    while len(line.encode()) >= LINE_LIMIT and large:
        key = large.pop()
        del doc[key]
        dropped.append(key)
        doc["truncated"] = dropped
        line = json.dumps(doc, default=str)
    message = str(doc["message"])
    while len(line.encode()) >= LINE_LIMIT:
        message = message[: len(message) // 2]
        doc["message"] = message + " [truncated]"
        line = json.dumps(doc, default=str)
    return line


def _json_sink(message: Any) -> None:
    record = message.record
    doc: dict[str, Any] = {
        "time": record["time"].astimezone(timezone.utc).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
        "program": PROGRAM,
        "pid": os.getpid(),
    }
    doc.update({k: v for k, v in record["extra"].items() if k not in doc})
    _write(_fit_json(doc))


def _text_sink(message: Any) -> None:
    record = message.record
    stamp = record["time"].isoformat(timespec="milliseconds")
    text = printable(record["message"])
    _write(_fit_text(f"{stamp} {PROGRAM}[{os.getpid()}] {record['level'].name: <7} {text}"))


def setup(level: str = "INFO", fmt: str = "text") -> None:
    logger.remove()
    logger.add(_json_sink if fmt == "json" else _text_sink, level=level, format="{message}")
