"""Command line: parse, load settings, and hand over to the supervisor or a subcommand.

    gpu-supervise [OPTIONS] -- COMMAND [ARGS...]   supervise COMMAND (exit codes in the README)
    gpu-supervise snapshot [--json] [--source S]   print the node's topology
    gpu-supervise demo                             the whole story on a simulated node

Usage and configuration errors print one line and exit 2; nothing is started.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from . import __version__
from .config import SCHEMA, ConfigError, Settings, flag_name, load

EXIT_USAGE = 2
PROG = "gpu-supervise"

# Flags that set a configuration key (all but watch.enabled, which is --no-watch).
FLAGS: dict[str, tuple[str, str]] = {
    flag_name(section, key): (section, key)
    for section, keys in SCHEMA.items()
    for key in keys
    if (section, key) != ("watch", "enabled")
}
SNAPSHOT_FLAGS = ("--source", "--probe-timeout")


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2 in main), never a usage dump."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser(prog: str, flags: tuple[str, ...], description: str) -> Parser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file")
    for flag in flags:
        section, key = FLAGS[flag]
        spec = SCHEMA[section][key]
        parser.add_argument(
            flag,
            dest=f"{section}.{key}",
            metavar="VALUE",
            help=f"{spec.help} (default {spec.default!r})",
        )
    return parser


def supervise_parser() -> Parser:
    parser = _parser(
        f"{PROG} [OPTIONS] --",
        tuple(FLAGS),
        "Run COMMAND as a supervised child; stop it and exit 1 when the GPU topology changes.",
    )
    parser.usage = f"{PROG} [OPTIONS] -- COMMAND [ARGS...]\n       {PROG} snapshot|demo --help"
    parser.add_argument("--no-watch", action="store_true", help="plain supervisor: no NVML at all")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


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
    ns = supervise_parser().parse_args(options)
    if not command:
        raise ConfigError(f"no command to run: usage: {PROG} [OPTIONS] -- COMMAND [ARGS...]")
    return load(_flag_values(ns), ns.config), command


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "snapshot":
            return _snapshot(argv[1:])
        if argv and argv[0] == "demo":
            from .demo import main as demo_main

            return demo_main(argv[1:])
        settings, command = parse_supervise(argv)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _supervise(settings, command)


def _supervise(settings: Settings, command: list[str]) -> int:
    """Start the child first, then load the rest: the agent never waits for our imports.

    Signals are held from before the spawn until the supervisor's handlers are in place, and we
    are a subreaper before the child can fork anything.
    """
    from . import child, report

    env = child.child_environment(os.environ)
    notify_socket = report.take_notify_socket(env)
    child.block_signals()
    child.become_subreaper()
    try:
        pid = child.spawn(command, env)
    except child.SpawnError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    from . import logs
    from .supervise import Supervisor

    logs.setup(settings.log_level, settings.log_format)
    return Supervisor(settings, command, pid, notify_socket).run()


def _snapshot(argv: list[str]) -> int:
    parser = _parser(f"{PROG} snapshot", SNAPSHOT_FLAGS, "Print the node's GPU topology.")
    parser.add_argument("--json", action="store_true", help="the stable JSON document (README)")
    ns = parser.parse_args(argv)
    settings = load(_flag_values(ns), ns.config)

    from .probe import probe_once
    from .sources import open_source
    from .topology import render_table

    result = probe_once(open_source(settings.source), settings.probe_timeout)
    if result.failed:
        print(f"{PROG}: cannot read the GPU topology: {result.error}", file=sys.stderr)
        return 1
    if result.unavailable:
        print(f"{PROG}: {result.unavailable}", file=sys.stderr)
        return 1
    assert result.topology is not None
    print(result.topology.dumps() if ns.json else render_table(result.topology))
    return 0


def run() -> NoReturn:
    """Console-script entry point."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A probe thread stuck in a hung NVML call must not hold up the exit.
    os._exit(code)
