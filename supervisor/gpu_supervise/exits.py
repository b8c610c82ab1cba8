"""How gpu-supervise ends: its own exit codes, and an unexpected failure told in one line."""

from __future__ import annotations

from .text import clip

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
