"""Logging to stderr through loguru: plain text for people, one JSON object a line for machines.

Only the main thread logs (loguru is not re-entrant, so never from a signal handler). Structured
fields are passed with `logger.bind(...)`; text output shows the message alone so the PRD's
`[GPU-Watcher] …` line reads exactly as log alerts expect, JSON output adds the fields.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timezone
from typing import Any

from loguru import logger

PROGRAM = "gpu-supervise"


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
    sys.stderr.write(json.dumps(doc, default=str) + "\n")
    sys.stderr.flush()


TEXT_FORMAT = "{time:YYYY-MM-DDTHH:mm:ss.SSSZ} " + PROGRAM + "[{process}] {level: <7} {message}"


def setup(level: str = "INFO", fmt: str = "text") -> None:
    logger.remove()
    if fmt == "json":
        logger.add(_json_sink, level=level, format="{message}")
    else:
        logger.add(sys.stderr, level=level, format=TEXT_FORMAT, colorize=False, backtrace=False)
