"""`gpu-supervise install DIR`: put the running self-contained gpu-supervise into DIR, so that
no failure and no crash at any moment leaves DIR without a working copy, and no running
gpu-supervise ever loses a file.

For init containers and images with no shell or cp (the init container runs
`/opt/gpu-supervise/gpu-supervise install /supervise` on a shared volume, the agent container
`/supervise/gpu-supervise ... -- AGENT`), and for upgrades on a host (run it again with a newer
build). What is copied is what runs now: the build of packaging/build-binary.sh (the launcher
and _internal/, symbolic links kept as links), a plain PyInstaller one-folder build (its
executable and _internal/), or a one-file build (the file). DIR then holds:

    DIR/gpu-supervise -> gpu-supervise.versions/0.1.0-1a2b3c4d/gpu-supervise   (a symbolic link)
    DIR/gpu-supervise.versions/0.1.0-1a2b3c4d/   this copy: gpu-supervise, _internal/
    DIR/gpu-supervise.versions/0.1.0-5e6f7a8b/   the copy the link named before, if any

Why a folder per copy and one link, and never a copy written over another:
- DIR/gpu-supervise (the launcher) and DIR/_internal/ (what it runs) would be two entries, and
  no rename switches two entries at once: a crash between two renames leaves a launcher with
  the other build's folder. One symbolic link switched by one rename(2) has no such moment.
- A running gpu-supervise keeps reading its files: PyInstaller opens its archive by path at
  every import, so a build written over it makes its next import read the new file at the old
  offsets (zlib.error) -- an upgrade under a running supervisor crashed it at its next stop.
  The launcher finds its folder through /proc/self/exe, which resolves the link: a supervisor
  started before an upgrade runs from its own version folder (its sys._MEIPASS is there), and
  the upgrade leaves that folder alone.
- Deleting files a running process maps frees no space, so replacing in place on a nearly full
  filesystem failed halfway (ENOSPC), leaving half a folder: nothing is deleted before the new
  copy is complete and switched to.

A version folder is named VERSION-TOKEN by the build's token (what --version prints), so the
same build installed again (a re-run init container) finds its folder there: complete (a
folder gets that name only once complete, and loses it before it is removed), and maybe
running, it is switched to again, not copied nor written over (steps 1 and 2 are skipped).
Anything else of that name is an error. A build without a token gets a fresh one each time.

The steps, and what a failure or a crash after each leaves:
1. Copy into gpu-supervise.versions/.new-RANDOM, each file and folder fsync'ed (so that a power
   loss after the switch cannot leave a link to files whose data never reached the disk).
   Before the switch, DIR/gpu-supervise still runs the copy it ran; a failure removes the
   partial folder, a crash leaves it for the next install to remove.
2. Rename it to VERSION-TOKEN: a folder has that name only once complete.
3. Make the link gpu-supervise.versions/.link-RANDOM -> gpu-supervise.versions/VERSION-TOKEN/
   gpu-supervise (relative: DIR may be mounted elsewhere in the agent's container), and rename
   it over DIR/gpu-supervise: the switch. Before it, the old copy starts; after it, the new.
4. Remove the copies nobody can be running: every other folder of gpu-supervise.versions/,
   except the copy DIR/gpu-supervise named before the switch (supervisors started until now
   run from it, possibly in other PID namespaces) and any folder that a process this install
   can see maps a file from (/proc/PID/maps, by path or by inode: another mount namespace sees
   it under another path; the command line of a process whose map it may not read). A version
   folder is renamed to .old-RANDOM first. A failure here is reported, and the install stands.

One install into DIR at a time (a lock on gpu-supervise.versions/): another one waits for it,
saying so on stderr, up to LOCK_WAIT seconds, then fails. Nothing of DIR but DIR/gpu-supervise
and DIR/gpu-supervise.versions/ is written, and nothing outside DIR: a DIR/gpu-supervise that
is a link (elsewhere, to a folder, or dangling) is replaced, never followed; a
DIR/gpu-supervise.versions that is a link is refused. A usage error (one line, exit 2): no
DIR; a DIR inside the running copy; a DIR/gpu-supervise that is a folder (the running copy
when DIR is its parent: it is never deleted); a DIR whose resolved path holds ':' (the library
search path is colon-separated: the copy would load the image's C library); gpu-supervise
installed from Python packages (pip), which has no such files. A failed copy: one line, exit
1, DIR as it was.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__, build_token, procs
from .args import PROG, Parser
from .config import ConfigError
from .exits import EXIT_USAGE
from .text import clip

EXIT_FAILED = 1
VERSIONS = ".versions"  # DIR/gpu-supervise.versions/: the suffix of the executable's name
NEW, LINK, OLD = ".new-", ".link-", ".old-"  # the temporary entries of gpu-supervise.versions/
LOCK_WAIT = 60.0  # seconds an install waits for another install into the same DIR to finish


@dataclass(frozen=True)
class Bundle:
    """The files of a running frozen gpu-supervise (root/entry for each entry), and the file
    that runs it again: the launcher for build-binary.sh's folder, not sys.executable, which
    is the program inside _internal/ and needs the build host's glibc. token: the build's
    (build-binary.sh's), or None for a build without one."""

    root: Path
    entries: tuple[str, ...]
    executable: Path
    token: str | None = None


class Refused(Exception):
    """Install cannot go ahead for what it was given: exit 2, DIR untouched."""


def running_bundle() -> Bundle | None:
    """The frozen build this process runs from, or None when it runs from a Python install."""
    if not getattr(sys, "frozen", False):
        return None
    exe = Path(sys.executable).resolve()
    contents = Path(getattr(sys, "_MEIPASS", exe.parent)).resolve()
    launcher = exe.parent.parent / exe.name
    if contents == exe.parent and exe.parent.name == "_internal" and launcher.is_file():
        # build-binary.sh: the launcher, and PyInstaller's folder as _internal/ beside it
        return Bundle(exe.parent.parent, (exe.name, "_internal"), launcher, build_token())
    if contents == exe.parent / "_internal":  # PyInstaller's own one-folder layout
        return Bundle(exe.parent, (exe.name, "_internal"), exe, build_token())
    if contents == exe.parent:  # one folder with no contents directory: all of it
        entries = tuple(sorted(p.name for p in exe.parent.iterdir()))
        return Bundle(exe.parent, entries, exe, build_token())
    return Bundle(exe.parent, (exe.name,), exe)  # one-file: unpacked elsewhere at each start


def _parse(argv: list[str]) -> Path:
    parser = Parser(
        prog=f"{PROG} install",
        description="Copy this self-contained gpu-supervise into DIR (created if missing), for "
        "an init container to share it with the agent's container, or to upgrade a host: "
        "DIR/gpu-supervise, switched atomically; a running gpu-supervise keeps its own copy.",
    )
    parser.add_argument("dir", metavar="DIR", help="where to install it, e.g. /supervise")
    return Path(parser.parse_args(argv).dir)


def _check(bundle: Bundle, target: Path) -> None:
    """Refuse what install must not do, before anything is written."""
    where = target.resolve()
    if where == bundle.root or bundle.root in where.parents:
        raise Refused(f"{clip(str(target), 200)} is where this gpu-supervise already is")
    if ":" in str(where):
        raise Refused(
            f"{clip(str(where), 200)}: a path with ':' cannot hold gpu-supervise (the library "
            "search path is colon-separated: it would load the image's C library)"
        )
    link = target / bundle.executable.name
    if link.is_dir() and not link.is_symlink():
        running = " (the running gpu-supervise)" if link.resolve() == bundle.root else ""
        raise Refused(
            f"{clip(str(link), 200)} is a folder{running}: install puts a link there and never "
            "removes a folder; choose another DIR"
        )
    versions = target / (bundle.executable.name + VERSIONS)
    if versions.is_symlink() or (versions.exists() and not versions.is_dir()):
        raise Refused(f"{clip(str(versions), 200)} is not a folder of gpu-supervise's")


def _fsync(path: Path) -> None:
    """Write path (a file's data, a folder's entries) through to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # a filesystem that cannot sync folders (some FUSE ones): not an error
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _copy(source: Path, target: Path) -> None:
    """Copy a file, link or folder, every file and folder fsync'ed; the first error stops it
    (one error to report, not a list of thousands)."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        os.mkdir(target, 0o700)
        for child in sorted(source.iterdir()):
            _copy(child, target / child.name)
        shutil.copystat(source, target, follow_symlinks=False)
        _fsync(target)
    else:
        shutil.copy2(source, target, follow_symlinks=False)
        _fsync(target)


def _remove(path: Path, versions: Path | None = None) -> None:
    """Remove a folder, file or link of gpu-supervise's: a link is removed, never followed. A
    version folder (of versions/) is first renamed to .old-TOKEN: a folder that a failure or a
    crash leaves half removed never keeps the name a later install of its build runs again."""
    if path.is_dir() and not path.is_symlink():
        if path.parent == versions and not path.name.startswith((NEW, LINK, OLD)):
            aside = path.with_name(f"{OLD}{os.urandom(4).hex()}")
            os.rename(path, aside)
            path = aside
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _version_folder(link: Path, versions: Path) -> Path | None:
    """The folder of versions/ that DIR/gpu-supervise names, if it names one."""
    try:
        named = Path(os.path.normpath(link.parent / os.readlink(link)))
    except OSError:  # not a link, or gone
        return None
    return named.parent if named.parent.parent == versions else None


def _mapped() -> tuple[set[bytes], set[tuple[int, int]]]:
    """The paths, and the (device, inode) pairs, of the files that the processes we can see
    map. A process whose map we may not read (another user's, or one with more capabilities,
    without CAP_SYS_PTRACE) gives the words of its command line instead, readable by all: a
    gpu-supervise is started as VERSION-FOLDER/_internal/ld/gpu-supervise by the launcher."""
    paths: set[bytes] = set()
    inodes: set[tuple[int, int]] = set()
    for pid in procs.pids():
        try:
            try:
                maps = procs.read(pid, "maps")
            except PermissionError:
                paths.update(procs.read(pid, "cmdline").split(b"\0"))
                continue
        except OSError:
            continue  # gone meanwhile
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != b"0":
                major, _, minor = fields[3].partition(b":")
                inodes.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
                paths.add(fields[5])
    return paths, inodes


def _in_use(folder: Path, mapped: tuple[set[bytes], set[tuple[int, int]]]) -> bool:
    """Whether a process maps a file of folder: by path, or by inode (a process of another
    mount namespace sees the same file under another path)."""
    paths, inodes = mapped
    prefix = os.fsencode(folder.resolve()) + b"/"
    if any(path.startswith(prefix) for path in paths):
        return True
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) in inodes:
                return True
    return False


def _lock(versions: Path, wait: float) -> int:
    """An exclusive lock on versions/ for this install (released when the process ends). Init
    containers of several pods on one volume start together: each waits its turn, up to wait
    seconds (saying so once on stderr), and then fails."""
    fd = os.open(versions, os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                busy = f"another gpu-supervise install into it still runs after {wait:g} s"
                raise OSError(errno.EBUSY, busy) from None
            if not told:
                print(f"{PROG}: waiting for another install into {clip(str(versions.parent), 200)}"
                      f" to finish (at most {wait:g} s)", file=sys.stderr, flush=True)  # fmt: skip
                told = True
            time.sleep(0.1)
        except OSError:
            return fd  # a filesystem without locks: go ahead unlocked


def _copy_folder(bundle: Bundle, new: Path) -> None:
    """Step 1: the bundle's entries into the folder new, readable by the agent's user whatever
    the umask (the agent's container often runs as another user than the init container)."""
    os.mkdir(new)
    for entry in bundle.entries:
        _copy(bundle.root / entry, new / entry)
    os.chmod(new, 0o755)
    _fsync(new)


def install(bundle: Bundle, target: Path) -> tuple[Path, list[str]]:
    """Install bundle into target (the steps are in the module's docstring): the version
    folder, and a line for each problem after the switch. Refused or OSError: target as it
    was, but for an empty gpu-supervise.versions/."""
    _check(bundle, target)
    name = bundle.executable.name
    link = target / name
    versions = target / (name + VERSIONS)
    if not target.is_dir():  # exist_ok: another install may make it meanwhile
        target.mkdir(parents=True, exist_ok=True)
    if not versions.is_dir():
        versions.mkdir(exist_ok=True)
        versions.chmod(0o755)
    lock = _lock(versions, LOCK_WAIT)
    try:
        previous = _version_folder(link, versions)
        scratch = os.urandom(4).hex()  # names this install's temporary entries
        version = "".join(c if c.isalnum() or c in "._+-" else "_" for c in __version__)
        new = versions / f"{NEW}{scratch}"
        done = versions / f"{version}-{bundle.token or scratch}"
        temporary_link = versions / f"{LINK}{scratch}"
        made: list[Path] = []  # what to remove if a step fails: only what this install made
        try:
            if not _copied_before(done, bundle):
                made.append(new)
                _copy_folder(bundle, new)  # 1
                os.rename(new, done)  # 2
                made[0] = done
                _fsync(versions)
            os.symlink(os.path.join(versions.name, done.name, name), temporary_link)  # 3
            made.append(temporary_link)
            os.rename(temporary_link, link)  # the switch
        except BaseException:
            for leftover in made:
                try:
                    _remove(leftover, versions)
                except OSError:
                    pass  # the next install removes it
            raise
        problems = []
        try:
            _fsync(target)
        except OSError as exc:
            problems.append(f"{clip(str(target), 200)} not synced to disk: {exc.strerror}")
        return done, problems + _remove_unused(target, name, keep={done, previous})  # 4
    finally:
        os.close(lock)


def _signature(root: Path, entries: list[str]) -> list[tuple[object, ...]]:
    """What a copy is made of: each entry under root with its kind, mode, and size or link
    target (links are read, never followed)."""
    found: list[tuple[object, ...]] = []
    todo = [Path(entry) for entry in entries]
    while todo:
        path = todo.pop()
        st = os.lstat(root / path)
        if stat.S_ISLNK(st.st_mode):
            found.append((str(path), "link", os.readlink(root / path)))
        elif stat.S_ISDIR(st.st_mode):
            found.append((str(path), "folder", st.st_mode))
            todo.extend(path / child for child in os.listdir(root / path))
        else:
            found.append((str(path), "file", st.st_mode, st.st_size))
    return sorted(found, key=str)


def _copied_before(done: Path, bundle: Bundle) -> bool:
    """Whether done, the folder of this build, is there already: an install of the same build
    ran before (a re-run init container). It is complete (a folder gets its name only once
    complete, and loses it before it is removed) and may be running: switched to again, never
    written over. Anything else of that name is an error."""
    if not os.path.lexists(done):
        return False
    if (
        done.is_symlink()
        or not done.is_dir()
        or _signature(done, os.listdir(done)) != _signature(bundle.root, list(bundle.entries))
    ):
        raise OSError(
            errno.EEXIST,
            f"{clip(str(done), 200)} is there and is not a copy of this build (remove it if "
            "nothing runs from it)",
        )
    return True


def _remove_unused(target: Path, name: str, keep: set[Path | None]) -> list[str]:
    """Step 4: remove what nothing runs from; a line for each that could not be removed."""
    versions = target / (name + VERSIONS)
    candidates = [p for p in sorted(versions.iterdir()) if p not in keep]
    try:
        mapped = _mapped() if candidates else (set(), set())
    except OSError as exc:  # no /proc: nothing can be known to be unused
        return [f"old copies kept: cannot list processes: {exc.strerror}"]
    problems = []
    for path in candidates:
        try:
            if not path.name.startswith((NEW, LINK, OLD)) and _in_use(path, mapped):
                continue  # maybe running: kept until an install finds it unused
            _remove(path, versions)
        except OSError as exc:
            problems.append(f"cannot remove {clip(str(path), 200)}: {clip(str(exc), 200)}")
    return problems


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
    try:
        done, problems = install(bundle, target)
    except Refused as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(
            f"{PROG}: cannot install into {clip(str(target), 200)}: {clip(str(exc), 300)}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    link = target / bundle.executable.name
    print(f"installed {link} -> {os.readlink(link)} (from {bundle.root})")
    for problem in problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    return 0
