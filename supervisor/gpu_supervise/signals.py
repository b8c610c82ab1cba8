"""Which signals gpu-supervise forwards, ignores or leaves alone, holding them until its handlers
are in place, and what the caller handed over (the dispositions the agent inherits, the parent
whose death may stop us). Imports nothing but `signal` and `os`, which the interpreter has
loaded before any of our code: the entry point uses it first thing.
"""

from __future__ import annotations

import os
import signal

# Faults. One our own code raises is aimed by the kernel at the faulting thread and delivered
# with its default action even while blocked; abort() unblocks SIGABRT before it raises it in
# its own thread. So blocked for good, they still kill us as they must, and what stays pending
# is only what another process sent (`kill -ABRT`, `docker kill --signal SEGV`): a thread takes
# those (take_fault) and they are forwarded like any other signal, as dumb-init does.
FAULTS = (
    signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS,
    signal.SIGABRT,
)  # fmt: skip

# Every signal a process can catch is passed on to the child as it arrives, as tini does,
# except: those our own I/O raises (SIGPIPE, SIGXFSZ: ignored, as CPython ignores them), SIGTTIN
# and SIGTTOU (a terminal's job control: ignored, so that gpu-supervise is never stopped by its
# terminal, as tini does), SIGCHLD (ours: reaping), and the two nobody can catch. SIGTSTP and
# SIGCONT go to the child: ^Z stops the agent, not its supervisor. FORWARDED are those that get
# a handler; FAULTS are forwarded too, from the thread that takes them.
NOT_FORWARDED = frozenset(
    {
        *FAULTS, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
        signal.SIGKILL, signal.SIGSTOP,
    }
)  # fmt: skip
FORWARDED = tuple(sorted(signal.valid_signals() - NOT_FORWARDED))
IGNORED = (signal.SIGTTIN, signal.SIGTTOU)
# CPython ignores these itself before any of our code runs: the caller's setting is lost.
UNKNOWABLE = (signal.SIGPIPE, signal.SIGXFSZ)


class Caller:
    """What the process that started gpu-supervise handed over, as recorded first thing (before
    block_signals changes any of it): the signals it ignored, its signal mask, its pid."""

    __slots__ = ("ignored", "mask", "parent")

    def __init__(self) -> None:
        self.ignored: frozenset[int] = frozenset()
        self.mask: frozenset[int] = frozenset()
        self.parent: int | None = None


caller = Caller()


def record_caller() -> None:
    """Note what the caller handed over, once: the agent gets the same (child.spawn), as it
    would have without gpu-supervise (tini does the same; `nohup` keeps working)."""
    if caller.parent is not None:
        return
    catchable = signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP, *UNKNOWABLE}
    caller.ignored = frozenset(s for s in catchable if signal.getsignal(s) is signal.SIG_IGN)
    caller.mask = frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, ()))
    caller.parent = os.getppid()


def block_signals() -> None:
    """Hold every signal we handle until the handlers are in place: the child starts before the
    rest of gpu-supervise is loaded, and a SIGTERM in that window must not kill us (and orphan
    the child). Signals arriving meanwhile stay pending; spawn() gives the child the caller's
    mask. SIGCHLD and the faults get their default action back whatever the caller set: an
    ignored SIGCHLD would reap the agent behind our back, an ignored fault would be discarded
    instead of forwarded."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, *FAULTS, signal.SIGCHLD})
    for sig in (*FAULTS, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in IGNORED:  # from the start: a stop signal that arrives now must not stop us
        signal.signal(sig, signal.SIG_IGN)


def unblock_signals(keep_faults: bool = False) -> None:
    """Give the held signals back: all of them (the commands other than supervising), or all but
    the faults, which supervising keeps blocked for good (take_fault)."""
    held = {*FORWARDED, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, held if keep_faults else {*held, *FAULTS})


def take_fault() -> int:
    """Wait for a fault signal another process sent; only a thread of its own calls this."""
    return signal.sigwaitinfo(FAULTS).si_signo


PR_SET_PDEATHSIG = 1


def follow_parent(sig: int) -> None:
    """Have the kernel send us `sig` when our parent dies, as tini's -p does: it is then handled
    as if anybody had sent it (SIGTERM stops the agent's tree). A parent that died before the
    request (we were re-parented since record_caller) triggers nothing: send it ourselves. The
    kernel clears the request on a setuid exec and follows the parent *thread* that forked us."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if caller.parent is not None and os.getppid() != caller.parent:
        os.kill(os.getpid(), sig)
