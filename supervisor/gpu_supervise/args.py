"""Command-line parsing shared by every command: usage errors as one line, never a usage dump."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from .config import ConfigError
from .text import clip

PROG = "gpu-supervise"


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2 in main), never a usage dump."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(clip(message, 300))
