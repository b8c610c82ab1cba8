"""Which signals gpu-supervise forwards, ignores or leaves alone, and holding them until its
handlers are in place. Imports nothing but `signal`: the entry point uses it first thing.
"""

from __future__ import annotations

import signal

# Every signal a process can catch is passed on to the child as it arrives, as tini does,
# except: faults our own code raises (the kernel aims them at the faulting thread), those our
# own I/O raises (SIGPIPE, SIGXFSZ: ignored, as CPython ignores them), SIGTTIN and SIGTTOU (a
# terminal's job control: ignored, so that gpu-supervise is never stopped by its terminal, as
# tini does), SIGCHLD (ours: reaping), and the two nobody can catch. SIGTSTP and SIGCONT go to
# the child: ^Z stops the agent, not its supervisor.
NOT_FORWARDED = frozenset(
    {
        signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP,
        signal.SIGSYS, signal.SIGABRT, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTTIN,
        signal.SIGTTOU, signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP,
    }
)  # fmt: skip
FORWARDED = tuple(sorted(signal.valid_signals() - NOT_FORWARDED))
IGNORED = (signal.SIGTTIN, signal.SIGTTOU)


def block_signals() -> None:
    """Hold every signal we handle until the handlers are in place: the child starts before the
    rest of gpu-supervise is loaded, and a SIGTERM in that window must not kill us (and orphan
    the child). Signals arriving meanwhile stay pending; spawn() gives the child a clean mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})
    for sig in IGNORED:  # from the start: a stop signal that arrives now must not stop us
        signal.signal(sig, signal.SIG_IGN)


def unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*FORWARDED, signal.SIGCHLD})
