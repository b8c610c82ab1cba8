"""`gpu-supervise install DIR`: copy the running self-contained gpu-supervise into DIR.

For init containers and images with no shell or cp: the init container runs
`/opt/gpu-supervise/gpu-supervise install /supervise` on a shared volume, and the agent
container runs `/supervise/gpu-supervise ... -- AGENT`. What is copied is what runs now:

- the build of packaging/build-binary.sh: the launcher DIR/gpu-supervise and DIR/_internal/
  (the program, its libraries and glibc, symbolic links kept as links);
- a plain PyInstaller one-folder build: its executable and _internal/;
- a one-file build: the file.

Only those entries of DIR are replaced (removed, then copied); anything else there is left
alone, so running it again over an earlier copy is fine. A gpu-supervise installed from Python
packages (pip) has no such files: a usage error. Usage errors: one line and exit 2; a failed copy:
one line and exit 1.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .args import EXIT_USAGE, PROG, Parser
from .config import ConfigError

EXIT_FAILED = 1


@dataclass(frozen=True)
class Bundle:
    """The files of a running frozen gpu-supervise (root/entry for each entry), and the file
    that runs it again: the launcher for build-binary.sh's folder, not sys.executable, which
    is the program inside _internal/ and needs the build host's glibc."""

    root: Path
    entries: tuple[str, ...]
    executable: Path


def running_bundle() -> Bundle | None:
    """The frozen build this process runs from, or None when it runs from a Python install."""
    if not getattr(sys, "frozen", False):
        return None
    exe = Path(sys.executable).resolve()
    contents = Path(getattr(sys, "_MEIPASS", exe.parent)).resolve()
    launcher = exe.parent.parent / exe.name
    if contents == exe.parent and exe.parent.name == "_internal" and launcher.is_file():
        # build-binary.sh: the launcher, and PyInstaller's folder as _internal/ beside it
        return Bundle(exe.parent.parent, (exe.name, "_internal"), launcher)
    if contents == exe.parent / "_internal":  # PyInstaller's own one-folder layout
        return Bundle(exe.parent, (exe.name, "_internal"), exe)
    if contents == exe.parent:  # one folder with no contents directory: all of it
        return Bundle(exe.parent, tuple(sorted(p.name for p in exe.parent.iterdir())), exe)
    return Bundle(exe.parent, (exe.name,), exe)  # one-file: unpacked elsewhere at each start


def _parse(argv: list[str]) -> Path:
    parser = Parser(
        prog=f"{PROG} install",
        description="Copy this self-contained gpu-supervise into DIR (created if missing), for "
        "an init container to share it with the agent's container: DIR/gpu-supervise.",
    )
    parser.add_argument("dir", metavar="DIR", help="where to copy it, e.g. /supervise")
    return Path(parser.parse_args(argv).dir)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _copy(source: Path, target: Path) -> None:
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True)
    else:
        shutil.copy2(source, target, follow_symlinks=False)


def main(argv: list[str]) -> int:
    try:
        target = _parse(argv)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    bundle = running_bundle()
    if bundle is None:
        print(
            f"{PROG}: install copies the self-contained binary, and this gpu-supervise runs "
            f"from Python ({sys.executable}); build one with packaging/build-binary.sh",
            file=sys.stderr,
        )
        return EXIT_USAGE
    where = target.resolve()
    if where == bundle.root or bundle.root in where.parents:
        print(f"{PROG}: {target} is where this gpu-supervise already is", file=sys.stderr)
        return EXIT_USAGE
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name in bundle.entries:
            _remove(target / name)
            _copy(bundle.root / name, target / name)
    except OSError as exc:
        print(f"{PROG}: cannot install into {target}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"installed {target / bundle.executable.name} (from {bundle.root})")
    return 0
