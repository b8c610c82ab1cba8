"""The supervised process tree: start it, forward signals to it, reap it, stop all of it.

What tini and dumb-init taught, and what this module keeps:
- The child is exec'd directly (no shell) with our stdio and environment: its output never
  passes through us, so nothing of it can be buffered or lost.
- It runs in its own process group, so a stop can signal the group in one call; descendants
  that call setsid leave the group, so a stop also walks the tree.
- We reap every child ourselves with waitpid(-1) and keep the main child's status: as PID 1 or
  a child subreaper, orphans are re-parented to us and would otherwise stay zombies.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass

# Signals passed on to the child as they arrive (the set tini and dumb-init forward).
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
# Python starts with SIGPIPE and SIGXFSZ ignored; an ignored signal survives exec, so the child
# gets them back at their default, like a child of any shell would.
_RESET_TO_DEFAULT = (*FORWARDED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTTOU)

PR_SET_CHILD_SUBREAPER = 36


class SpawnError(Exception):
    """The command could not be executed; `code` is what tini/dumb-init would exit with."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def become_subreaper() -> bool:
    """As PID 1 orphans come to us anyway; elsewhere ask the kernel for the same, so that a
    grandchild whose parent died is still ours to stop and reap."""
    if os.getpid() == 1:
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def block_signals() -> None:
    """Hold every signal we handle until the handlers are in place: the child starts before the
    rest of gpu-supervise is loaded, and a SIGTERM in that window must not kill us (and orphan
    the child). Signals arriving meanwhile stay pending; spawn() gives the child a clean mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})


def unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*FORWARDED, signal.SIGCHLD})


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment the agent gets: the one we were started with.

    PyInstaller's bootloader (the shipped binary) prepends its own library folder to
    LD_LIBRARY_PATH and adds _PYI_* variables; an agent inheriting them could load our bundled
    libraries instead of its own, and a frozen child would take itself for a sub-process.
    """
    env = dict(environ)
    if getattr(sys, "frozen", False):
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is None:
            env.pop("LD_LIBRARY_PATH", None)
        else:
            env["LD_LIBRARY_PATH"] = original
        for name in [n for n in env if n.startswith("_PYI_") or n == "_MEIPASS2"]:
            del env[name]
    return env


def spawn(argv: list[str], env: dict[str, str]) -> int:
    """Start the command in a new process group with a clean signal mask and dispositions.

    A failed exec is known here, in the parent, before anything runs: 127 or 126 with the
    reason. With a terminal on stdin the child takes it over before its exec (below); otherwise
    posix_spawn, which stays safe whatever threads are running.
    """
    try:
        if _owns_terminal():
            return _spawn_in_foreground(argv, env)
        return os.posix_spawnp(
            argv[0],
            argv,
            env,
            setpgroup=0,
            setsigmask=(),
            setsigdef=_RESET_TO_DEFAULT,
        )
    except OSError as exc:
        raise _spawn_error(argv[0], exc) from None


def _spawn_error(command: str, exc: OSError) -> SpawnError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return SpawnError(127, f"{command}: command not found")
    if exc.errno == errno.EACCES:
        return SpawnError(126, f"{command}: permission denied (not executable?)")
    return SpawnError(126, f"{command}: cannot execute: {exc.strerror}")


def _owns_terminal() -> bool:
    """Whether stdin is a terminal whose foreground group is ours (`docker run -it`, a shell)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _spawn_in_foreground(argv: list[str], env: dict[str, str]) -> int:
    """Start the command as the terminal's foreground group, so it reads input and gets ^C
    itself, as tini does. The child takes the terminal *before* its exec: handed over from
    here afterwards, an agent that reads at once would find itself in a background group and be
    stopped by SIGTTIN for good. Called before any thread starts, so fork is safe; the exec's
    errno comes back through a close-on-exec pipe, so a failed exec is known here as well."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: only system calls from here to the exec
        try:
            os.close(rfd)
            os.setpgid(0, 0)
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may take it
            try:
                os.tcsetpgrp(0, os.getpgrp())
            except OSError:
                pass  # best effort: without it the agent still runs, in the background
            for sig in _RESET_TO_DEFAULT:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            os.write(wfd, str(exc.errno or errno.ENOEXEC).encode())
        finally:
            os._exit(127)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        reported = pipe.read()
    if reported:  # the exec failed: collect the child and say why
        os.waitpid(pid, 0)
        code = int(reported)
        raise OSError(code, os.strerror(code))
    return pid


def exit_code(status: int) -> int:
    """The shell's convention, as tini and dumb-init: the code, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {_signame(sig)} (exit code {128 + sig})"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


@dataclass
class Reaped:
    pid: int
    status: int


def reap() -> list[Reaped]:
    """Collect every child that has exited, without blocking."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append(Reaped(pid, status))


def has_children() -> bool:
    """Whether any child (the agent or an orphan re-parented to us) is still to be reaped."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def descendants() -> list[int]:
    """Every live process below us. Walking from ourselves (not from the child) also finds
    orphans that were re-parented to us after their parent died."""
    import psutil  # only needed to stop a tree: not on the way to starting the child

    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [p.pid for p in procs]


def signal_tree(pgid: int | None, sig: int) -> int:
    """Send `sig` once to every process of the tree: the child's process group in one call, then
    each descendant that left the group (setsid daemons, orphans re-parented to us). Returns
    how many processes the tree had below us, the group's included.

    Exactly once matters: many agents take a second SIGTERM or SIGINT as "quit now, skip the
    clean shutdown"."""
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    tree = descendants()
    for pid in tree:
        try:
            if pgid is not None and os.getpgid(pid) == pgid:
                continue  # already signalled through its group
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return len(tree)


def send(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True
