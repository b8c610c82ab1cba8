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

import errno
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping

from . import procs
from .signals import FAULTS, FORWARDED, IGNORED, caller

# A disposition set to "ignore" survives exec; the child gets every signal at its default, but
# for those the caller ignored (signals.record_caller): what it would have had without us.
_RESET_TO_DEFAULT = (*FORWARDED, *FAULTS, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, *IGNORED)

PR_SET_CHILD_SUBREAPER = 36


class SpawnError(Exception):
    """The command could not be executed; `code` is what tini/dumb-init would exit with.
    `transient`: the cause may pass by itself (start_retrying tries again)."""

    def __init__(self, code: int, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.code, self.transient = code, transient


# Causes of a failed start that pass by themselves: the pids limit reached (EAGAIN, from fork or
# clone), memory or buffers short, no file descriptor left, the binary still open for writing
# (ETXTBSY: an upgrade of the agent in progress), a device or file system busy or hiccuping.
# Every other cause is the command's own (not found, not executable, a bad format): 126/127,
# which restart policies are told never to retry.
TRANSIENT = frozenset(
    {
        errno.EAGAIN, errno.ENOMEM, errno.ENOBUFS, errno.EMFILE, errno.ENFILE, errno.ETXTBSY,
        errno.EINTR, errno.EBUSY, errno.EIO,
    }
)  # fmt: skip
RETRY_SECONDS = 5.0
# sysexits' EX_TEMPFAIL: the start failed for a cause that passes (TRANSIENT), for RETRY_SECONDS.
# Not 126/127, which the shipped units and policies never restart; not 70, a fault of ours.
EXIT_TEMPFAIL = 75


def become_subreaper() -> bool:
    """As PID 1 orphans come to us anyway; elsewhere ask the kernel for the same, so that a
    grandchild whose parent died is still ours to stop and reap."""
    if os.getpid() == 1:
        return True
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment the agent gets: exactly the one gpu-supervise was started with, except
    NOTIFY_SOCKET and a watchdog meant for us (report.take_notify_socket).

    Two layers change what this process sees, and both are undone here:
    - The interpreter: started under the C locale, Python adds LC_CTYPE=C.UTF-8 to os.environ
      (PEP 538's locale coercion). What exec gave this process stays in /proc/self/environ byte
      for byte (setenv never writes there), so when `environ` is os.environ, that is the base.
      Any other mapping (a test's) is taken as it is.
    - The shipped binary: before any Python runs, PyInstaller's bootloader prepends its folder
      to LD_LIBRARY_PATH (dropping an empty one, overwriting the caller's LD_LIBRARY_PATH_ORIG
      with the old value), sets and unsets _PYI_* variables and removes
      PYINSTALLER_RESET_ENVIRONMENT; an agent inheriting that could load our bundled libraries,
      and a frozen agent would take itself for our sub-process. The launcher
      (packaging/launcher.c) records the caller's state of all of these names first, in
      _GPU_SUPERVISE_CALLER_ENV: `NAME=value`, or a bare `NAME` for one that was unset, separated
      by spaces, `%` and ` ` written %25 and %20. Every recorded name and every _PYI_* is removed
      and the record restored. A frozen build started without the launcher (a plain PyInstaller
      build) has no record: the bootloader's own LD_LIBRARY_PATH_ORIG is the best guess there.
    """
    if environ is os.environ:
        try:
            with open("/proc/self/environ", "rb") as fh:
                block = fh.read()
        except OSError:  # no /proc: os.environ is the best there is
            pass
        else:
            started: dict[str, str] = {}
            for entry in block.split(b"\0"):
                name, eq, value = entry.partition(b"=")
                if eq:  # the first of two equal names wins, as getenv and os.environ have it
                    started.setdefault(os.fsdecode(name), os.fsdecode(value))
            environ = started
    # A name with "=" (an envp entry "=x=y" that a C program can pass) or an empty one cannot be
    # handed to exec: drop it rather than fail to start the agent.
    env = {name: value for name, value in environ.items() if name and "=" not in name}
    if not getattr(sys, "frozen", False):
        return env
    record = env.pop("_GPU_SUPERVISE_CALLER_ENV", None)
    if record is None:
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is None:
            env.pop("LD_LIBRARY_PATH", None)
        else:
            env["LD_LIBRARY_PATH"] = original
        for name in ("_MEIPASS2", "_PYI_ARCHIVE_FILE", "_PYI_PARENT_PROCESS_LEVEL"):
            env.pop(name, None)  # what a one-folder bootloader sets
        return env
    caller: dict[str, str | None] = {}
    for item in os.fsencode(record).split(b" "):
        if item:
            raw = b"%".join(part.replace(b"%20", b" ") for part in item.split(b"%25"))
            name, eq, value = raw.partition(b"=")
            caller.setdefault(os.fsdecode(name), os.fsdecode(value) if eq else None)
    for name in [n for n in env if n.startswith("_PYI_")] + list(caller):
        env.pop(name, None)
    env.update({name: value for name, value in caller.items() if value is not None})
    return env


def spawn(argv: list[str], env: dict[str, str], death_signal: int = 0) -> int:
    """Start the command in a new process group with the caller's signal mask and ignored
    signals, every other signal at its default.

    A failed exec is known here, in the parent, before anything runs: 127 or 126 with the
    reason. posix_spawn, which stays safe whatever threads are running, does it unless the
    child must do something first that posix_spawn cannot: take over the terminal, ask for a
    parent-death signal, or ignore a signal we handle (posix_spawn can only leave an ignored
    one so: once our handlers are in place, an agent started again needs the fork).
    """
    try:
        foreground = owns_terminal()
        if foreground or death_signal or not _still_ignored(caller.ignored):
            return _spawn_forked(argv, env, foreground, death_signal)
        return os.posix_spawnp(
            argv[0],
            argv,
            env,
            setpgroup=0,
            setsigmask=caller.mask,
            setsigdef=[sig for sig in _RESET_TO_DEFAULT if sig not in caller.ignored],
        )
    except OSError as exc:
        raise _spawn_error(argv[0], exc, env) from None
    except ValueError as exc:  # what exec cannot take (the checks above should leave none)
        raise SpawnError(126, f"{argv[0]}: cannot execute: {exc}") from None


def start_retrying(
    argv: list[str],
    env: dict[str, str],
    death_signal: int,
    wait: Callable[[SpawnError, float], bool],
) -> int:
    """spawn, tried again with back-off while it fails for a TRANSIENT cause, for up to
    RETRY_SECONDS; then EXIT_TEMPFAIL, which restart policies retry. `wait(error, seconds)`
    reports the failure and waits; False: stop trying (a stop was asked for)."""
    began = time.monotonic()
    delay = 0.1
    while True:
        try:
            return spawn(argv, env, death_signal)
        except SpawnError as exc:
            if not exc.transient:
                raise
            left = began + RETRY_SECONDS - time.monotonic()
            if left <= 0 or not wait(exc, min(delay, left)):
                spent = time.monotonic() - began
                raise SpawnError(
                    EXIT_TEMPFAIL, f"{exc} (still, after trying again for {spent:.1f} s)"
                ) from None
            delay = min(2 * delay, 1.0)


def _still_ignored(sigs: frozenset[int]) -> bool:
    return all(signal.getsignal(sig) is signal.SIG_IGN for sig in sigs)


def _spawn_error(command: str, exc: OSError, env: Mapping[str, str]) -> SpawnError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return SpawnError(127, _not_found(command, env))
    if exc.errno == errno.EACCES:
        return SpawnError(126, f"{command}: permission denied (not executable?)")
    if exc.errno in TRANSIENT:
        return SpawnError(EXIT_TEMPFAIL, f"{command}: cannot execute: {exc.strerror}", True)
    return SpawnError(126, f"{command}: cannot execute: {exc.strerror}")


def _not_found(command: str, env: Mapping[str, str]) -> str:
    """Why exec found nothing. A file that exists gets ENOENT too when what it names is missing:
    a script's interpreter, most often a CRLF first line (`#!/bin/sh\r` names "/bin/sh\r").
    (Where the line is shown, its control characters are escaped: \r, not a carriage return.)"""
    found = _executable(command, env)
    if found is None:
        return f"{command}: command not found"
    interpreter = _interpreter(found)
    if interpreter is None or os.path.exists(interpreter):
        return f"{command}: cannot execute: a file it needs is missing (No such file or directory)"
    crlf = " (a CRLF line ending)" if interpreter.endswith("\r") else ""
    return f"{command}: its interpreter {interpreter} (first line) was not found{crlf}"


def _executable(command: str, env: Mapping[str, str]) -> str | None:
    """The file exec tried: `command` itself if it holds a slash, else the first executable
    regular file of that name on PATH; None if there is none."""
    if "/" in command:
        paths = [command]
    else:
        paths = [os.path.join(folder, command) for folder in os.get_exec_path(env)]
    for path in paths:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _interpreter(path: str) -> str | None:
    """What the first line `#!INTERPRETER [ARG]` names, as the kernel reads it (up to a space,
    a tab or the newline: a carriage return is part of the name); None for no such line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            head = os.read(fd, 256)  # the kernel reads no more of it either
        finally:
            os.close(fd)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].replace(b"\t", b" ").split(b" ")
    name = next((word for word in words if word), None)
    return None if name is None else os.fsdecode(name)


def owns_terminal() -> bool:
    """Whether stdin is a terminal whose foreground group is ours (`docker run -it`, a shell)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def take_terminal_back(agent_group: int) -> bool:
    """If the terminal's foreground group is still the agent's (gone now), make it ours again,
    so that the agent started next takes it over (spawn). SIGTTOU, ignored, does not stop us."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == agent_group:
            os.tcsetpgrp(0, os.getpgrp())
            return True
    except OSError:
        pass
    return False


PR_SET_PDEATHSIG = 1


def _spawn_forked(argv: list[str], env: dict[str, str], foreground: bool, death_signal: int) -> int:
    """fork, prepare, exec; the exec's errno comes back through a close-on-exec pipe, so a
    failed exec is known here as well. Between fork and exec the child makes system calls only.

    - foreground: the child takes the terminal *before* its exec, as tini does. Handed over
      from here afterwards, an agent that reads at once would find itself in a background
      group and be stopped by SIGTTIN for good.
    - death_signal: the kernel sends it to the agent when the thread that forked it exits; we
      fork from the main thread, which lives as long as gpu-supervise. If we died before the
      request took effect, the child sends it to itself."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl if death_signal else None
    parent = os.getpid()
    ignored, mask = caller.ignored, caller.mask
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError:  # the pids limit, memory: tried again, so nothing may be left open
        os.close(rfd)
        os.close(wfd)
        raise
    if pid == 0:  # the child: only system calls from here to the exec
        try:
            os.close(rfd)
            os.setpgid(0, 0)
            if foreground:
                signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may take it
                try:
                    os.tcsetpgrp(0, os.getpgrp())
                except OSError:
                    pass  # best effort: without it the agent still runs, in the background
            for sig in _RESET_TO_DEFAULT:
                signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
                if os.getppid() != parent:
                    os.kill(os.getpid(), death_signal)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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
        return f"was killed by {signame(sig)} (exit code {128 + sig})"
    return f"exited with code {os.WEXITSTATUS(status)}"


def signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


class Reaped:
    """A child collected by waitpid."""

    __slots__ = ("pid", "status")

    def __init__(self, pid: int, status: int) -> None:
        self.pid, self.status = pid, status


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
    return procs.descendants(os.getpid())


def signal_tree(pgid: int | None, sig: int, leader_ours: bool = False) -> int:
    """Send `sig` once to every process of the tree (the child's and everything below us),
    whole process groups in one call where that is safe, each other process on its own.
    Returns how many processes the tree had below us.

    A group is signalled whole (atomic against fork: a daemon forking as fast as it is killed
    still gets it) when it is the child's group, or when it belongs to a session one of our
    descendants made with setsid: everything in such a session descends from us. A group is
    signalled only while one of its members is ours: once empty, its number is free and could
    name somebody else's. `leader_ours` says the child itself is not reaped yet, so its group
    is ours for certain: it is signalled at once, before the walk of the tree (which reads
    every process's /proc/PID/stat: milliseconds). Exactly once matters: many agents take a
    second SIGTERM or SIGINT as "quit now, skip the clean shutdown".

    Any signal but SIGKILL is followed by SIGCONT, as systemd does it: a stopped process (^Z,
    a SIGTSTP forwarded) acts on nothing else, and would wait for SIGKILL."""
    sigs = (sig,) if sig in (signal.SIGKILL, signal.SIGCONT) else (sig, signal.SIGCONT)
    done: set[int | None] = set()
    if pgid is not None and leader_ours:
        for each in sigs:
            _killpg(pgid, each)
        done.add(pgid)
    tree = descendants()
    own_session = os.getsid(0)
    ids = {pid: _ids(pid) for pid in tree}
    whole = {
        group
        for group, session in ids.values()
        if group is not None
        and group not in done
        and (group == pgid or (session is not None and session != own_session))
    }
    for group in whole:
        for each in sigs:
            _killpg(group, each)
    done |= whole
    for pid in tree:
        if ids[pid][0] not in done:
            for each in sigs:
                send(pid, each)
    return len(tree)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def _ids(pid: int) -> tuple[int | None, int | None]:
    """(process group, session) of a process; None where it is gone."""
    try:
        return os.getpgid(pid), os.getsid(pid)
    except OSError:
        return None, None


def send(pid: int, sig: int) -> str | None:
    """kill(2) that never raises: a refused or a late signal is a fact to report (the reason is
    returned), never a reason to leave the main loop (and the agent unsupervised)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return "no such process"
    except OSError as exc:  # EPERM: a setuid agent, or gpu-supervise not root
        return exc.strerror or str(exc)
    return None


# After SIGKILL a process needs a moment to die and be reaped, even with a stop_timeout of 0.
KILL_WAIT = 1.0
# How often a blocking stop looks again (TreeStop.wait).
STOP_POLL = 0.02


class TreeStop:
    """The one stop of the agent's tree, for every path that stops it (a decision, a signal from
    outside, a hold beginning, the last resort): SIGTERM (or the signal given) to the tree, then
    SIGKILL after `timeout` to what is left and to whatever appears after that; what survives
    max(timeout, KILL_WAIT) more is given up on. The main loop runs it a step at a time
    (`step`); a last resort runs it as a plain loop (`wait`): the same code and constants.

    `leader_ours` says whether the agent is not reaped yet: once it is, its group's number may
    be somebody else's, and only the tree walk finds what is left. `group_only` signals the
    agent's group alone, with system calls only (no tree walk: psutil may be what failed)."""

    __slots__ = ("pid", "timeout", "kill_at", "give_up_at", "leader_ours", "group_only", "left")

    def __init__(
        self, pid: int, timeout: float, now: float, leader_ours: Callable[[], bool],
        group_only: bool = False,
    ) -> None:  # fmt: skip
        self.pid, self.timeout, self.leader_ours = pid, timeout, leader_ours
        self.group_only = group_only
        self.kill_at = now + timeout
        self.give_up_at: float | None = None  # set with the SIGKILL
        self.left = 0  # the processes the SIGKILL found

    def signal(self, sig: int) -> int:
        """`sig` (and SIGCONT after it) to the tree: how many processes it had below us."""
        if not self.group_only:
            return signal_tree(self.pid, sig, leader_ours=self.leader_ours())
        if self.leader_ours():
            for each in (sig,) if sig == signal.SIGKILL else (sig, signal.SIGCONT):
                _killpg(self.pid, each)
        return 0

    def step(self, now: float) -> str:
        """One look at the stop: "done" once the tree is gone (the agent alone, with
        group_only), "killed" when SIGKILL was sent now (`left` says to how many), "gave up"
        once what is left survived SIGKILL long enough, else "waiting"."""
        if not has_children() or (self.group_only and not self.leader_ours()):
            return "done"
        if self.give_up_at is None:
            if now < self.kill_at:
                return "waiting"
            self.left = self.signal(signal.SIGKILL)
            self.give_up_at = now + max(self.timeout, KILL_WAIT)
            return "killed"
        self.signal(signal.SIGKILL)  # newcomers forked since get it too
        return "gave up" if now >= self.give_up_at else "waiting"

    def next_look(self, now: float) -> float:
        """When the loop must look again: at the SIGKILL, then every STOP_POLL."""
        return self.kill_at if self.give_up_at is None else now + STOP_POLL

    def wait(self, reaped: Callable[[Reaped], None]) -> str:
        """The stop as a plain loop, reaping as it goes (`reaped` hears of each child
        collected): "done" or "gave up"."""
        while True:
            for each in reap():
                reaped(each)
            phase = self.step(time.monotonic())
            if phase in ("done", "gave up"):
                return phase
            time.sleep(STOP_POLL)


def stop_group_now(pid: int, timeout: float) -> int:
    """The last resort when gpu-supervise itself fails right after starting the agent: the
    TreeStop of the agent's group alone, with system calls only (whatever broke, a module that
    cannot be loaded, no file descriptor left, must not stop this); the agent's exit code (137
    if it could not be reaped). What the agent left in its group gets SIGKILL."""
    status: list[int] = []

    def reaped(each: Reaped) -> None:
        if each.pid == pid:
            status.append(each.status)

    stop = TreeStop(pid, timeout, time.monotonic(), lambda: not status, group_only=True)
    stop.signal(signal.SIGTERM)
    if stop.wait(reaped) == "gave up" or not status:
        return 128 + signal.SIGKILL
    _killpg(pid, signal.SIGKILL)  # what the agent left in its group, reaped just now
    return exit_code(status[0])


class Survivor:
    """A process still alive after SIGKILL; `state` is the state letter of /proc/PID/stat: D
    (uninterruptible), T (stopped)..."""

    __slots__ = ("pid", "state", "cmdline")

    def __init__(self, pid: int, state: str, cmdline: str) -> None:
        self.pid, self.state, self.cmdline = pid, state, cmdline


# How long survivors() looks again when the listing of the tree caught nothing alive, and at
# how many of a process's newest children: a daemon's trail of zombies grows by thousands a
# second, and the live one is at its end.
CATCH_SECONDS = 0.1
NEWEST = 4


def survivors() -> list[Survivor]:
    """What is still alive below us after SIGKILL (zombies are dead: not counted).

    A listing of the tree takes milliseconds, and a daemon that forks and exits in a loop (from
    session to session) lives tens of microseconds in each process: every process the listing
    names is a zombie, or exiting, by the time it is looked at, while the daemon lives on in a
    newer one. Unreported, it would outlive the stop with a log that says nothing survived. So
    when the listing finds nothing alive, the tree is looked at again and again for
    CATCH_SECONDS, the fast way: our newest children (as a subreaper we are the parent of each
    of the daemon's processes once the one before has exited), and below one that is exiting,
    its newest children, each in one read."""
    found = [s for s in map(_look_at, descendants()) if s is not None]
    if found:
        return found
    deadline = time.monotonic() + CATCH_SECONDS
    while time.monotonic() < deadline:
        todo = procs.children_of("self")[-NEWEST:]
        if not todo and not has_children():
            break
        while todo:
            seen = _look_at(pid := todo.pop())
            if seen is not None and seen.cmdline:
                return [seen]
            if seen is not None:  # exiting (no command line any more): its children live on
                todo.extend(procs.children_of(pid)[-NEWEST:])
    return []


def _look_at(pid: int) -> Survivor | None:
    """`pid` as /proc shows it now; None for a zombie, or a process gone. (The command line is
    empty for a process that is exiting, or was started with no arguments at all.)"""
    try:
        state = procs.stat_fields(pid)[0].decode()
        argv = procs.argv(pid)
    except (OSError, IndexError):
        return None
    if state == "Z":
        return None
    return Survivor(pid, state, " ".join(a.decode(errors="replace") for a in argv))
