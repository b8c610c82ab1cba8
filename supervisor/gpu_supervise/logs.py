"""Logging to stderr through loguru: plain text for people, one JSON object a line for machines.

Only the main thread logs (loguru is not re-entrant, so never from a signal handler). Structured
fields are passed with `logger.bind(...)`; text output shows the message alone so the change
line `[GPU-Watcher] …` reads exactly as log alerts expect, JSON output adds the fields.

Two guarantees, whatever NVML or the agent's command line hold:
- text lines carry no control characters: an ESC in a GPU name must not reach the terminal of
  whoever runs `kubectl logs` (JSON escapes them by itself);
- no line is longer than LINE_LIMIT: containerd and Docker split longer lines into partial
  records, and many collectors then see broken JSON.
Logging must never stop a supervisor: lines are written by a thread of their own, so a stderr
that nobody reads (a stalled pipe) blocks that thread, never the main loop that handles signals
and stops. While it is blocked, up to QUEUE_LINES lines wait; more are dropped and counted (one
note says how many, before the next line written). A line that cannot be written at all (stderr
closed, its reader gone) is dropped and counted as unwritten.

stderr is the agent's too: the same open file description, so its flags are shared, and an
agent that makes it non-blocking (libuv does, on a pipe) makes ours so. A write that would
block then waits in poll() for room, as a blocking write would, and a short write is finished
before the next line begins: a line is never lost to EAGAIN, cut short or glued to another.
(Reopening /proc/self/fd/2 would give us flags of our own for a pipe, but not for a socket,
and a file reopened so gets an offset of its own that overwrites the agent's lines.)

Decision lines (bound with `decision()`: the change line and its per-GPU lines, the failure
line, the exit line) are never dropped for want of room (up to DECISION_LINES of them), and at
exit they get a wait of their own (`flush`'s `decision_timeout`, stop_timeout at the
supervisor's exit): a log collector stalled for a few seconds across the exit still gets them.
What could not be written even so is counted, for the termination message: the lines still
waiting, those lost to an error, and those dropped that no note has told of yet.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
from collections import deque
from datetime import timezone
from typing import Any

from loguru import logger

from .text import printable

PROGRAM = "gpu-supervise"
LINE_LIMIT = 16 * 1024  # bytes, the newline included: the runtimes' split point
CORE = ("time", "level", "message", "program", "pid")  # in every JSON line, never dropped
QUEUE_LINES = 1000  # other lines waiting while stderr is stalled; more are dropped
DECISION_LINES = 1000  # decision lines waiting (a 64-GPU change is about 70): the same bound
DECISION = "_decision"  # the bound field that marks a decision line (never shown)


def decision(**fields: Any) -> Any:
    """loguru's logger for a decision line: `decision(event="exit", code=1).info(...)`."""
    return logger.bind(**{DECISION: True}, **fields)


class Unwritten:
    """What `flush` could not get written before its deadlines."""

    __slots__ = ("lines", "decisions")

    def __init__(self, lines: int = 0, decisions: int = 0) -> None:
        self.lines, self.decisions = lines, decisions

    def __bool__(self) -> bool:
        return self.lines > 0

    def note(self) -> str:
        """For the termination message."""
        return (
            f"{self.lines} log line(s), {self.decisions} of them decision lines (the change, "
            "failure or exit line), could not be written: stderr was not being read"
        )


class _Writer:
    """Writes whole lines to fd 2 from a daemon thread, in order; `put` never blocks."""

    def __init__(self) -> None:
        self._lines: deque[tuple[bytes, bool]] = deque()  # (line, is a decision line)
        self._waiting = [0, 0]  # lines queued: [others, decision lines]
        self._lost = [0, 0]  # lines a write error lost: [others, decision lines]
        self._dropped = 0  # dropped, and told of by no note yet
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="log-writer", daemon=True).start()

    def put(self, line: str, is_decision: bool = False) -> None:
        data = line.encode("utf-8", "backslashreplace") + b"\n"
        with self._cond:
            if is_decision and self._waiting[True] >= DECISION_LINES:
                is_decision = False  # beyond its own bound, a decision line waits as any other
            if not is_decision and self._waiting[False] >= QUEUE_LINES:
                self._dropped += 1
                return
            self._lines.append((data, is_decision))
            self._waiting[is_decision] += 1
            self._cond.notify()

    def flush(self, timeout: float, decision_timeout: float) -> Unwritten:
        """Wait, at most `timeout`, for what is queued to be written, and while decision lines
        are still queued, up to `decision_timeout` (at exit). Returns what is left."""
        start = time.monotonic()
        with self._cond:
            while self._lines:
                waited = time.monotonic() - start
                limit = decision_timeout if self._waiting[True] else timeout
                if waited >= limit:
                    break
                self._cond.wait(min(limit - waited, 0.05))
            lost, lost_decisions = self._lost
            lines = len(self._lines) + lost + lost_decisions + self._dropped
            return Unwritten(lines, self._waiting[True] + lost_decisions)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines:
                    self._cond.wait()
                data, is_decision = self._lines[0]  # stays queued until written: flush waits
                dropped = self._dropped
            if dropped and self._write(f"{PROGRAM}: {dropped} log line(s) dropped: stderr was "
                                       "not being read\n".encode()):  # fmt: skip
                with self._cond:
                    self._dropped -= dropped  # told of now; more may have come meanwhile
            written = self._write(data)
            with self._cond:
                self._lines.popleft()
                self._waiting[is_decision] -= 1
                self._lost[is_decision] += not written
                self._cond.notify_all()

    @staticmethod
    def _write(data: bytes) -> bool:
        """All of `data` to fd 2, waiting for room while it is non-blocking (the module's
        docstring says why); False if an error (EPIPE, EBADF) lost it."""
        view = memoryview(data)
        poller: select.poll | None = None
        try:
            while view:
                try:
                    view = view[os.write(2, view) :]
                except BlockingIOError:
                    if poller is None:
                        poller = select.poll()
                        poller.register(2, select.POLLOUT)
                    poller.poll()  # an error or a hang-up wakes it too: the write then says
        except OSError:
            return False
        return True


_writer: _Writer | None = None


def _write(line: str, is_decision: bool = False) -> None:
    global _writer
    if _writer is None:
        _writer = _Writer()
    _writer.put(line, is_decision)


def flush(timeout: float = 1.0, decision_timeout: float | None = None) -> Unwritten:
    """At exit: wait for the queued lines, decision lines up to `decision_timeout`."""
    if _writer is None:
        return Unwritten()
    return _writer.flush(timeout, max(timeout, decision_timeout or 0.0))


def _fit_text(line: str) -> str:
    data = line.encode("utf-8", "backslashreplace")
    if len(data) < LINE_LIMIT:
        return line
    marker = f" [line truncated: {len(data)} bytes]"
    keep = LINE_LIMIT - 1 - len(marker.encode())
    return data[:keep].decode("utf-8", "ignore") + marker


def _fits(line: str) -> bool:
    """A JSON line fits when it and its newline are within LINE_LIMIT bytes."""
    return len(line.encode()) < LINE_LIMIT


def _fit_json(doc: dict[str, Any]) -> str:
    """Make the object fit: first drop large extra fields (over 1 KiB, the largest first), then
    cut the message, measured in the bytes of its JSON form (an escaped character takes up to
    six). Small fields (the event, a GPU's UUID) stay; only if they alone are too many, the core
    fields are left with the names of the others (or their number)."""
    line = json.dumps(doc, default=str)
    size = {k: len(json.dumps(v, default=str)) for k, v in doc.items()}
    large = sorted((k for k in doc if k not in CORE and size[k] > 1024), key=size.__getitem__)
    dropped: list[str] = []
    while not _fits(line) and large:
        key = large.pop()
        del doc[key]
        dropped.append(key)
        doc["truncated"] = dropped
        line = json.dumps(doc, default=str)
    message = str(doc["message"])
    while not _fits(line) and message:
        message = message[: len(message) // 2]
        doc["message"] = message + " [truncated]"
        line = json.dumps(doc, default=str)
    if not _fits(line):  # many small fields
        rest = [k for k in doc if k not in CORE and k != "truncated"]
        core = {k: doc[k] for k in CORE}  # plain text and numbers: no `default` needed
        line = json.dumps({**core, "truncated": dropped + rest})
        if not _fits(line):  # thousands of names: their number
            line = json.dumps({**core, "truncated": len(dropped) + len(rest)})
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
    doc.update({k: v for k, v in record["extra"].items() if k not in doc and k != DECISION})
    _write(_fit_json(doc), DECISION in record["extra"])


def _text_sink(message: Any) -> None:
    record = message.record
    stamp = record["time"].isoformat(timespec="milliseconds")
    text = printable(record["message"])
    line = f"{stamp} {PROGRAM}[{os.getpid()}] {record['level'].name: <7} {text}"
    _write(_fit_text(line), DECISION in record["extra"])


def setup(level: str = "INFO", fmt: str = "text") -> None:
    logger.remove()
    logger.add(_json_sink if fmt == "json" else _text_sink, level=level, format="{message}")
