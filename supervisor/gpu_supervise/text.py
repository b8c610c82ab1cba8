"""Text from outside (NVML's strings, the agent's command line, user input) made safe to show:
no control character reaches a terminal, a log line or a protocol field, and no page of it
reaches an error message."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with every character that is not printable written as an escape (\\x1b)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def clip(text: str, limit: int = 60) -> str:
    """A piece of user input as an error message shows it: one line, never a page of it."""
    text = text.encode("unicode_escape").decode() if not text.isprintable() else text
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"
