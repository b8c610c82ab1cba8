"""The console script's entry point: hold the signals gpu-supervise handles before anything else
is loaded.

Loading the rest takes tens of milliseconds. A SIGINT in that window would end in a
KeyboardInterrupt traceback, a SIGTSTP would stop gpu-supervise itself instead of the agent it
is about to start, SIGTTIN or SIGTTOU from a terminal would stop it too. So from here they are
held (blocked: pending until the handlers are in place, then handled or forwarded) or ignored;
`snapshot`, `demo` and `install` get them back at once (cli.main). Before that, what the caller
handed over is noted (the signals it ignored, its mask, its pid): the agent inherits the first
two, and the third is the parent whose death --parent-death-signal follows. What comes before
this, the interpreter's own start-up, no Python code can shorten.
"""

from __future__ import annotations

TYPE_CHECKING = False  # nothing is loaded before the signals are held, not even `typing`
if TYPE_CHECKING:
    from typing import NoReturn


def run() -> NoReturn:
    from .signals import block_signals, record_caller  # imports nothing but `signal` and `os`

    record_caller()
    block_signals()
    try:
        from .cli import run as cli_run
    except Exception as exc:  # no file descriptor left to read a module, a damaged install
        import os

        os.write(2, f"gpu-supervise: cannot start: {type(exc).__name__}: {exc}\n".encode())
        os._exit(70)  # exits.EXIT_INTERNAL; nothing was started
    cli_run()
