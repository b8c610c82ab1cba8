"""Logging to stderr through loguru: plain text for people, one JSON object a line for machines.

Only the main thread logs (loguru is not re-entrant, so never from a signal handler). Structured
fields are passed with `logger.bind(...)`; text output shows the message alone so the PRD's
`[GPU-Watcher] …` line reads exactly as log alerts expect, JSON output adds the fields.

Two guarantees, whatever NVML or the agent's command line hold:
- text lines carry no control characters: an ESC in a GPU name must not reach the terminal of
  whoever runs `kubectl logs` (JSON escapes them by itself);
- no line is longer than LINE_LIMIT: containerd and Docker split longer lines into partial
  records, and many collectors then see broken JSON.
A log line that cannot be written (stderr closed, its reader gone) is dropped: logging must
never stop a supervisor.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timezone
from typing import Any

from loguru import logger

PROGRAM = "gpu-supervise"
LINE_LIMIT = 16 * 1024  # bytes, the newline included: the runtimes' split point


def printable(text: str) -> str:
    """`text` with every character that is not printable written as an escape (\\x1b)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _write(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _fit_text(line: str) -> str:
    data = line.encode("utf-8", "backslashreplace")
    if len(data) < LINE_LIMIT:
        return line
    marker = f" [line truncated: {len(data)} bytes]"
    keep = LINE_LIMIT - 1 - len(marker.encode())
    return data[:keep].decode("utf-8", "ignore") + marker


def _fit_json(doc: dict[str, Any]) -> str:
    """Drop the largest extra fields until the object fits; as a last resort cut the message."""
    line = json.dumps(doc, default=str)
    dropped: list[str] = []
    extras = sorted(
        (k for k in doc if k not in ("time", "level", "message", "program", "pid")),
        key=lambda k: len(json.dumps(doc[k], default=str)),
    )
    while len(line.encode()) >= LINE_LIMIT and extras:
        key = extras.pop()
        del doc[key]
        dropped.append(key)
        doc["truncated"] = dropped
        line = json.dumps(doc, default=str)
    if len(line.encode()) >= LINE_LIMIT:
        doc["message"] = _fit_text(doc["message"])[: LINE_LIMIT // 2]
        line = json.dumps(doc, default=str)
    return line


def _json_sink(message: Any) -> None:
    record = message.record
    doc = {
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
