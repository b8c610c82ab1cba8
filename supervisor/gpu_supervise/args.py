"""Command-line parsing shared by every command: usage errors as one line, never a usage dump."""

from __future__ import annotations

import argparse

from .config import ConfigError
from .text import clip

TYPE_CHECKING = False  # typing costs the agent's start milliseconds: only for type checkers
if TYPE_CHECKING:
    from typing import Any, NoReturn

PROG = "gpu-supervise"
EXIT_USAGE = 2
EXIT_INTERNAL = 70  # sysexits' EX_SOFTWARE: gpu-supervise itself failed (the agent is stopped)


def describe_failure(exc: BaseException) -> str:
    """An unexpected exception as one line: its type, message and where it was raised (no
    traceback module: it may be what cannot be loaded)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
    return clip(f"{type(exc).__name__}: {exc}{where}", 500)


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2 in main), never a usage dump."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(clip(message, 300))
