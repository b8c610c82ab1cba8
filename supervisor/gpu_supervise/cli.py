"""Command line: parse, load settings, and hand over to the supervisor or a subcommand.

    gpu-supervise [OPTIONS] -- COMMAND [ARGS...]   supervise COMMAND (exit codes in the README)
    gpu-supervise snapshot [--json] [--source S]   print the node's topology
    gpu-supervise demo                             the whole story on a simulated node
    gpu-supervise config [OPTIONS] [-- COMMAND]    the settings in force, and who set each
    gpu-supervise install DIR                      copy the self-contained binary into DIR

Usage and configuration errors print one line and exit 2; nothing is started.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from . import version_text
from .args import PROG, Parser
from .config import (
    DEFAULT_CONFIG,
    ENV_CONFIG,
    SCHEMA,
    ConfigError,
    Settings,
    flag_name,
    load,
    load_traced,
    render,
)
from .exits import EXIT_INTERNAL, EXIT_USAGE, describe_failure
from .text import clip

if TYPE_CHECKING:  # not before the spawn: the agent never waits for the loop's imports
    from .supervise import Supervisor

# Flags that set a configuration key (all but watch.enabled, which is --no-watch).
FLAGS: dict[str, tuple[str, str]] = {
    flag_name(section, key): (section, key)
    for section, keys in SCHEMA.items()
    for key in keys
    if (section, key) != ("watch", "enabled")
}
SNAPSHOT_FLAGS = ("--source", "--probe-timeout")
USAGE = f"{PROG} [OPTIONS] -- COMMAND [ARGS...]"
EPILOG = f"""\
exit codes:
  1        restart me: the GPU topology changed (NVML working again after failing since start
           is one), NVML failed failure_threshold probes in a row after a good one, or a hold
           for a pending MIG mode change ended (or its probe got stuck in NVML)
  child's  the agent exited by itself (128+N if signal N killed it); also after SIGTERM/SIGINT
  2        usage or configuration error (one line on stderr; nothing is started)
  70       gpu-supervise itself failed (one line says why; the agent's tree is stopped)
  75       the command could not be started for a cause that passes (pids limit, memory, the
           binary open for writing...), tried again for 5 s: a restart may succeed
  126/127  the command cannot be executed / was not found

configuration: --config PATH, else ${ENV_CONFIG}, else {DEFAULT_CONFIG} if it exists;
  environment GPU_SUPERVISE_<SECTION>_<KEY> overrides the file, flags override both.
  {PROG} config [OPTIONS] prints the settings in force: each key with its environment
  variable, its flag, and the layer that set it (nothing is started).
other commands: {PROG} snapshot [--json] (the node's topology), {PROG} demo (a simulated node),
  {PROG} install DIR (copy the self-contained binary into DIR, for init containers)
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help text wrapped at spaces only: a default such as /dev/termination-log stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _default(value: Any) -> str:
    """A default as the README and the TOML write it: 30, not 30.0; true; '' for none."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def _parser(prog: str, flags: tuple[str, ...], description: str, epilog: str = "") -> Parser:
    parser = Parser(
        prog=prog,
        description=description,
        epilog=epilog or None,
        formatter_class=_Formatter,
    )
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")
    for flag in flags:
        section, key = FLAGS[flag]
        spec = SCHEMA[section][key]
        parser.add_argument(
            flag,
            dest=f"{section}.{key}",
            metavar=spec.metavar,
            help=f"{spec.help}; default {_default(spec.default)}",
        )
    return parser


def supervise_parser() -> Parser:
    parser = _parser(
        f"{PROG} [OPTIONS] --",
        tuple(FLAGS),
        "Run COMMAND as a supervised child; stop it and exit 1 when the GPU topology changes.",
        EPILOG,
    )
    parser.usage = f"{USAGE}\n       {PROG} snapshot|demo|install|config --help"
    parser.add_argument("--no-watch", action="store_true", help="plain supervisor: no NVML at all")
    parser.add_argument("--version", action=_Version, help="show the version and build; exit")
    return parser


class _Version(argparse.Action):
    """--version: VERSION-TOKEN for the self-contained binary, read only when asked (the token
    is a file of the build's: no read on the way to the agent's start)."""

    def __init__(self, option_strings: list[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{PROG} {version_text()}")
        parser.exit()


def _flag_values(ns: argparse.Namespace) -> dict[tuple[str, str], Any]:
    values: dict[tuple[str, str], Any] = {}
    for dest, value in vars(ns).items():
        if "." in dest and value is not None:
            section, key = dest.split(".", 1)
            values[section, key] = value
    if getattr(ns, "no_watch", False):
        values["watch", "enabled"] = False
    return values


def parse_supervise(argv: list[str]) -> tuple[Settings, list[str]]:
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1 :]
    else:
        options, command = argv, []
    ns, extra = supervise_parser().parse_known_args(options)
    if extra:
        given = clip(shlex.join(extra), 200)
        if not extra[0].startswith("-"):
            raise ConfigError(f"put -- before the command: {PROG} [OPTIONS] -- {given}")
        raise ConfigError(f"unrecognized arguments: {given} (see {PROG} --help)")
    if not command:
        raise ConfigError(
            f"no command to run: usage: {USAGE} (see {PROG} --help; "
            f"{PROG} snapshot shows the GPUs, {PROG} demo the whole story)"
        )
    return load(_flag_values(ns), ns.config), command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("snapshot", "demo", "install", "config"):
        from .signals import unblock_signals

        unblock_signals()  # only supervising holds signals until its handlers are in place
    try:
        if argv and argv[0] == "snapshot":
            return _snapshot(argv[1:])
        if argv and argv[0] == "demo":
            from .demo import main as demo_main

            return demo_main(argv[1:])
        if argv and argv[0] == "install":
            from .install import main as install_main

            return install_main(argv[1:])
        if argv and argv[0] == "config":
            return _config(argv[1:])
        settings, command = parse_supervise(argv)
    except ConfigError as exc:
        print(f"{PROG}: {clip(str(exc), 1000)}", file=sys.stderr)  # one line, whatever came in
        return EXIT_USAGE
    return _supervise(settings, command)


def _supervise(settings: Settings, command: list[str]) -> int:
    """One run: config, spawn, baseline, then watch, decide and stop until the exit.

    The agent is started first and the rest loaded after: it never waits for our imports.
    Signals are held from before the spawn until the loop's handlers are in place, and we are a
    subreaper before the agent can fork anything. With a parent-death signal, our parent's
    death sends it to us too (before the spawn: the agent is never left alone).
    """
    from . import child, report, signals

    # config: the settings are in (main); the agent's environment is ours less our own
    env = child.child_environment(os.environ)
    notify_socket = report.take_notify_socket(env)
    signals.record_caller()  # done already by the entry point, unless started otherwise
    signals.block_signals()
    if settings.parent_death_signal:
        signals.follow_parent(settings.parent_death_signal)
    reaper = child.become_subreaper()
    # spawn: the agent, before anything heavy is imported
    try:
        pid = child.start_retrying(command, env, settings.parent_death_signal, _wait_to_retry)
    except child.SpawnError as exc:
        print(f"{PROG}: {clip(str(exc), 1000)}", file=sys.stderr)  # one line, no escapes
        return exc.code
    # load: the log, the loop, and all a stop needs, while the agent starts
    supervisor = _load(settings, command, pid, env, notify_socket, reaper)
    if supervisor is None:
        return EXIT_INTERNAL
    try:
        supervisor.begin()  # signals handled from here on; the start logged
        supervisor.take_baseline()  # baseline: the first probe runs while the agent starts
        while not supervisor.exiting:  # watch, decide, stop (or hold, start again)
            supervisor.turn()
        return supervisor.finish()  # exit: the agent's code, or 1 to be restarted
    except Exception as exc:  # a bug, or a resource gone: never leave the agent unsupervised
        return supervisor.last_resort(exc)


def _load(
    settings: Settings, command: list[str], pid: int, env: dict[str, str],
    notify_socket: str | None, reaper: bool,
) -> Supervisor | None:  # fmt: skip
    """The supervisor, its modules imported now; None if that failed (the agent is stopped)."""
    try:
        from . import logs
        from .supervise import Supervisor

        logs.setup(settings.log_level, settings.log_format)
        return Supervisor(settings, command, pid, env, notify_socket, reaper)
    except Exception as exc:  # the agent runs: it must not outlive a supervisor that failed
        from . import child

        code = child.stop_group_now(pid, settings.stop_timeout)
        print(f"{PROG}: internal error after starting the agent ({describe_failure(exc)}); "
              f"stopped the agent (pid {pid}, exit code {code}); exiting {EXIT_INTERNAL}",
              file=sys.stderr)  # fmt: skip
        return None


def _wait_to_retry(exc: Exception, seconds: float) -> bool:
    """Before the first start succeeds: one line per failure (the log is not set up yet), and
    no more tries once SIGTERM or SIGINT waits (held, so pending: the stop is for the loop)."""
    import signal
    import time

    print(f"{PROG}: {clip(str(exc), 1000)}; trying again in {seconds:.1f} s", file=sys.stderr)
    deadline = time.monotonic() + seconds
    stop = {signal.SIGTERM, signal.SIGINT}
    while time.monotonic() < deadline:
        if stop & signal.sigpending():
            return False
        time.sleep(0.02)
    return not stop & signal.sigpending()


def _config(argv: list[str]) -> int:
    """The settings a run with these options would have, and where each came from; a command
    after `--` is allowed (a whole command line, with `config` put in) and never run."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    parser = _parser(
        f"{PROG} config",
        tuple(FLAGS),
        "Print the settings in force, as TOML: each key with its environment variable, its "
        "flag, and the layer that set it (default, the file, the environment, a flag). Invalid "
        "settings: one line, exit 2. Nothing is started.",
    )
    parser.usage = f"{PROG} config [OPTIONS] [-- COMMAND [ARGS...]]"
    parser.add_argument("--no-watch", action="store_true", help="plain supervisor: no NVML at all")
    ns = parser.parse_args(options)
    text = render(*load_traced(_flag_values(ns), ns.config))
    try:
        print(text, flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        pass
    return 0


def _snapshot(argv: list[str]) -> int:
    parser = _parser(f"{PROG} snapshot", SNAPSHOT_FLAGS, "Print the node's GPU topology.")
    parser.add_argument("--json", action="store_true",
                        help="the stable JSON document (docs/snapshot.md)")  # fmt: skip
    ns = parser.parse_args(argv)
    settings = load(_flag_values(ns), ns.config)

    from .probe import probe_once
    from .sources import open_source
    from .text import printable
    from .topology import render_table

    result = probe_once(open_source(settings.source), settings.probe_timeout)
    if result.failed:
        print(f"{PROG}: cannot read the GPU topology: {clip(result.error or '', 1000)}",
              file=sys.stderr)  # fmt: skip
        return 1
    if result.unavailable:
        hint = (
            "no NVIDIA driver here, or a container started without the NVIDIA runtime "
            "(--gpus, runtimeClassName: nvidia) or without NVIDIA_VISIBLE_DEVICES"
        )
        print(f"{PROG}: {result.unavailable} ({hint})", file=sys.stderr)
        return 1
    assert result.topology is not None
    if ns.json:
        print(result.topology.dumps())
    else:  # NVML's strings go to a terminal: no control characters
        print("\n".join(printable(line) for line in render_table(result.topology).splitlines()))
    return 0


def safe_stdio() -> None:
    """Open /dev/null on any of fds 0-2 that is closed, before anything else: otherwise the
    first file we open takes its number (and our log lands in it), the child inherits the
    hole, and Python has no sys.stderr to report anything on."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            try:
                opened = os.open(os.devnull, os.O_RDWR)
            except OSError:
                continue  # no /dev/null: nothing better to do
            if opened != fd:  # only if a lower one was closed too, and that is handled first
                os.dup2(opened, fd)
                os.close(opened)
            os.set_inheritable(fd, True)  # os.open makes it close-on-exec: the child needs it
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False, errors="backslashreplace"))  # noqa: SIM115


def run() -> NoReturn:
    """Console-script entry point (through entry.run, which holds signals first)."""
    safe_stdio()
    try:
        code = main()
    except Exception as exc:  # a bug or a resource gone, before any agent was started
        print(f"{PROG}: internal error ({describe_failure(exc)})", file=sys.stderr)
        code = EXIT_INTERNAL
    logs = sys.modules.get(f"{__package__}.logs")
    if logs is not None:
        logs.flush(2.0)  # the last lines, if stderr is being read at all
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # our own output cannot change the exit code the agent gave
    # A probe thread stuck in a hung NVML call must not hold up the exit.
    os._exit(code)
