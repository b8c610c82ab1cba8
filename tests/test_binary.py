"""The shipped form: the executable folder of packaging/build-binary.sh (a static launcher, the
PyInstaller one-folder build and the build host's glibc), on its own and in real containers
(podman with runc): as PID 1 of a Debian 11 agent image (glibc 2.31, older than the build needs)
whose restart policy brings it back after a topology change, copied there by an init container
with `gpu-supervise install`, and in a root filesystem holding nothing but its own files.

`gpu-supervise install` is tested for what must never happen to a node: real ENOSPC on a small
tmpfs (out of blocks, out of inodes), a failure and a crash at each step of an install, an
upgrade under a running supervisor (with a second build made from the first in a second), links
that lead elsewhere. The agent's environment is read from /proc/PID/environ, byte for byte,
under the binary and under the package, and its C library from /proc/PID/maps."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import pytest

from conftest import FakeNode, Proc, clean_env, missing_capability, pid_alive, run
from containers import PODMAN_FLAGS, READ_ONLY
from fakenvml import dgx_a100

ROOT = Path(__file__).parent.parent
FAST = ["--interval", "0.3", "--cooldown", "0", "--settle", "0.3"]
GLIBC = re.compile(r"GLIBC_(\d+)\.(\d+)(?:\.(\d+))?")
# glibc's own files, which build-binary.sh adds to _internal/: not counted in the floor
GLIBC_FILES = re.compile(
    r"^(ld-linux.*|lib(c|m|dl|pthread|rt|util|resolv|anl|nss_files|nss_dns)\.so\.\d+)$"
)


def test_binary_snapshot_matches_the_package(binary: Path, fake_node: FakeNode):
    fake_node.write(dgx_a100(["1g.5gb"] * 7, ["3g.20gb"] * 2))
    frozen = subprocess.run(
        [str(binary), "snapshot", "--json"], env=fake_node.env, capture_output=True, text=True
    )
    assert frozen.returncode == 0, frozen.stderr
    assert json.loads(frozen.stdout) == json.loads(
        run(["snapshot", "--json"], fake_node.env).stdout
    )


def test_binary_supervises_through_a_topology_change(
    binary: Path, fake_node: FakeNode, tmp_path: Path, start_cmd: Callable[..., Proc]
):
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    env_dump = tmp_path / "child-env"
    proc = start_cmd(
        [str(binary), *FAST, "--", "sh", "-c",
         f'env > {env_dump}; echo "parent $PPID"; echo "agent up"; exec sleep 60'],
        fake_node.env,
    )  # fmt: skip
    proc.wait_for("agent up")
    proc.wait_for("[GPU-Watcher] baseline")
    node.gpu(0).set_layout(["3g.20gb"] * 2)
    fake_node.write(node)
    assert proc.wait(60) == 1, proc.output
    assert "MIG configuration change detected" in proc.log
    # one process: the launcher became gpu-supervise, the agent's parent is the PID we started
    assert f"parent {proc.pid}\n" in proc.stdout
    # the agent got the environment we were given, not the bootloader's nor the launcher's
    child_env = dict(
        line.split("=", 1) for line in env_dump.read_text().splitlines() if "=" in line
    )
    assert child_env["LD_LIBRARY_PATH"] == fake_node.env["LD_LIBRARY_PATH"]
    assert not [k for k in child_env if k.startswith("_PYI") or k.endswith("_ORIG")]


def test_binary_exit_codes_and_usage_errors(binary: Path):
    assert subprocess.run([str(binary), "--no-watch", "--", "sh", "-c", "exit 9"]).returncode == 9
    bad = subprocess.run(
        [str(binary), "--interval", "0", "--", "true"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


# -- what the folder needs from the image: nothing --------------------------------------------


def _needed_glibc(path: Path) -> tuple[int, ...]:
    """The highest GLIBC_x.y among the undefined dynamic symbols objdump lists for path."""
    out = subprocess.run(
        ["objdump", "-T", str(path)], capture_output=True, text=True, check=True,
        env={**os.environ, "LC_ALL": "C"},
    ).stdout  # fmt: skip
    versions = [
        tuple(int(x) for x in m.groups() if x)
        for line in out.splitlines()
        if "*UND*" in line
        for m in [GLIBC.search(line)]
        if m
    ]
    return max(versions, default=(0,))


def test_build_prints_the_glibc_floor_and_bundles_a_glibc_that_meets_it(
    binary_build: tuple[Path, str],
):
    exe, printed = binary_build
    internal = exe.parent / "_internal"
    floor = re.search(r"^glibc floor: GLIBC_([\d.]+), needed by (\S+)", printed, re.M)
    bundled = re.search(r"^bundled glibc ([\d.]+) ", printed, re.M)
    assert floor and bundled, printed
    # the floor the script printed is the one objdump finds, read a different way
    elves = [
        p
        for p in internal.rglob("*")
        if p.is_file() and not p.is_symlink() and p.read_bytes()[:4] == b"\x7fELF"
        and not GLIBC_FILES.match(p.name)
    ]  # fmt: skip
    assert len(elves) > 10
    by_file = {p: _needed_glibc(p) for p in elves}
    highest = max(by_file.values())
    assert floor[1] == ".".join(map(str, highest)), printed
    assert by_file[internal / floor[2]] == highest
    assert tuple(map(int, bundled[1].split("."))) >= highest
    # the launcher is static: no program interpreter, no libc of the image
    headers = subprocess.run(["readelf", "-l", str(exe)], capture_output=True, text=True).stdout
    assert "Program Headers" in headers and "interpreter" not in headers
    assert (internal / "ld" / "gpu-supervise").is_symlink()


# -- gpu-supervise install DIR -------------------------------------------------------------------

INSTALLED = re.compile(
    r"installed (?P<link>\S+) -> (?P<versions>[^/\s]+)\.versions/(?P<folder>[\w.+-]+-[0-9a-f]{8})/"
    r"gpu-supervise \(from (?P<source>\S+)\)\n"
)


def _install(exe: Path, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(exe), "install", str(target)], capture_output=True, text=True, timeout=120
    )


def _installed(exe: Path, target: Path) -> Path:
    """Install with exe into target; the version folder the link names now."""
    done = _install(exe, target)
    assert done.returncode == 0, done.stderr
    assert INSTALLED.fullmatch(done.stdout), done.stdout
    return (target / "gpu-supervise").resolve().parent


def _versions(target: Path) -> list[str]:
    return sorted(p.name for p in (target / "gpu-supervise.versions").iterdir())


def _tree(root: Path, contents: bool = False) -> dict[str, tuple[object, ...]]:
    """Every entry under root: a link's target, a folder, a file's size and mode (and bytes)."""
    found: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_dir():
            found[key] = ("dir", path.stat().st_mode)
        else:
            st = path.stat()
            found[key] = ("file", st.st_size, st.st_mode, path.read_bytes() if contents else b"")
    return found


def _version_of(exe: Path) -> str:
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _token_of(folder: Path) -> str:
    """The build token of a build's folder (the launcher's, or a version folder)."""
    return (folder / "_internal" / "gpu-supervise.build").read_text()


def _another_build(binary: Path, where: Path) -> Path:
    """Another build of the same program, as a second run of build-binary.sh makes: the folder
    copied with a token of its own. Its launcher."""
    folder = where / "gpu-supervise"
    shutil.copytree(binary.parent, folder, symlinks=True)
    token = _token_of(folder)
    while token == _token_of(folder):
        token = os.urandom(4).hex()
    (folder / "_internal" / "gpu-supervise.build").write_text(token)
    return folder / "gpu-supervise"


def _mapped_files(pid: int) -> set[str]:
    """The files a process maps, as /proc/PID/maps names them."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {fields[5] for line in lines if len(fields := line.split(maxsplit=5)) == 6}


@pytest.fixture(scope="session")
def binary_b(binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different build B of the same folder, in a second instead of a second build:
    the module archive (PYZ) inside _internal/gpu-supervise is rewritten at the same size with
    every module recompressed and stored in reverse order, and gpu_supervise's __version__
    changed to VERSION+b. What differs is exactly what broke a running supervisor when B was
    written over A: A's process reads modules from that archive by path at A's offsets."""
    import marshal
    import struct
    import zlib

    from PyInstaller.archive.readers import CArchiveReader

    from gpu_supervise import __version__

    folder = tmp_path_factory.mktemp("dist-b") / "gpu-supervise"
    shutil.copytree(binary.parent, folder, symlinks=True)
    program = folder / "_internal" / "gpu-supervise"
    package = CArchiveReader(str(program))
    (pyz_name,) = [name for name, entry in package.toc.items() if entry[4] == "z"]
    pyz = package.extract(pyz_name)  # stored uncompressed in the executable
    data = program.read_bytes()
    at = data.find(pyz)
    assert pyz[:4] == b"PYZ\0" and at > 0 and data.find(pyz, at + 1) == -1
    (toc_offset,) = struct.unpack("!i", pyz[8:12])
    toc = marshal.loads(pyz[toc_offset:])
    blobs = {}
    for name, (_, offset, length) in toc:
        module = zlib.decompress(pyz[offset : offset + length]) if length else b""
        if name == "gpu_supervise":
            code = marshal.loads(module)
            assert __version__ in code.co_consts
            consts = tuple(f"{__version__}+b" if c == __version__ else c for c in code.co_consts)
            module = marshal.dumps(code.replace(co_consts=consts))
        blobs[name] = zlib.compress(module, 9) if length else b""
    first = min(offset for _, (_, offset, _) in toc)
    rebuilt = bytearray(pyz[:first])
    new_toc = []
    for name, (kind, _, _) in reversed(toc):
        new_toc.append((name, (kind, len(rebuilt), len(blobs[name]))))
        rebuilt += blobs[name]
    assert len(rebuilt) <= toc_offset  # level 9 against PyInstaller's 6 leaves room
    rebuilt += b"\0" * (toc_offset - len(rebuilt))  # zlib ignores what follows a stream
    index = marshal.dumps(new_toc[::-1])
    assert len(index) <= len(pyz) - toc_offset
    rebuilt += index + b"\0" * (len(pyz) - toc_offset - len(index))
    program.write_bytes(data[:at] + bytes(rebuilt) + data[at + len(pyz) :])
    token = f"{int(_token_of(folder), 16) ^ 0xFFFFFFFF:08x}"  # and a build token of its own
    (folder / "_internal" / "gpu-supervise.build").write_text(token)
    exe = folder / "gpu-supervise"
    assert _version_of(exe) == f"gpu-supervise {__version__}+b-{token}"
    return exe


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a tmpfs of the given options (size=, nr_inodes=) for real ENOSPC; unmounted after."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0:
            missing_capability("mounting a tmpfs needs root")
        where = tmp_path / f"tmpfs-{len(mounted)}"
        where.mkdir()
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "gs-test", str(where)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if out.returncode != 0:
            missing_capability(f"cannot mount a tmpfs: {out.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=60)


def test_install_copies_the_running_folder(binary: Path, tmp_path: Path):
    target = tmp_path / "volume" / "supervise"
    first = _installed(binary, target)
    other = _another_build(binary, tmp_path / "other")
    again = _install(other, target)  # over the first copy, as an upgrade does
    assert again.returncode == 0, again.stderr
    match = INSTALLED.fullmatch(again.stdout)
    assert match and match["link"] == f"{target}/gpu-supervise", again.stdout
    assert match["source"] == str(other.parent)
    assert sorted(p.name for p in target.iterdir()) == ["gpu-supervise", "gpu-supervise.versions"]
    # one link, relative (the volume is mounted elsewhere in the agent's container), switched
    link = os.readlink(target / "gpu-supervise")
    assert link == f"gpu-supervise.versions/{match['folder']}/gpu-supervise"
    assert _versions(target) == sorted([first.name, match["folder"]])  # the one before stays
    copy = target / "gpu-supervise.versions" / match["folder"]
    assert (copy / "_internal/ld/gpu-supervise").is_symlink()  # links stay links
    assert _tree(copy, contents=True) == _tree(other.parent, contents=True)
    # the folder is named by the build, as --version names it, here and in the copy
    named = f"gpu-supervise {match['folder']}"
    assert _version_of(other) == named == _version_of(target / "gpu-supervise")
    assert _version_of(binary) == f"gpu-supervise {first.name}"


def test_version_tells_builds_apart(binary: Path, tmp_path: Path):
    """--version: VERSION-TOKEN, the build's token, for the binary; for the Python package,
    which has none, its version and the folder it runs from."""
    import gpu_supervise
    from gpu_supervise import __version__

    package = gpu_supervise.__file__

    token = _token_of(binary.parent)
    assert re.fullmatch(r"[0-9a-f]{8}", token)
    assert _version_of(binary) == f"gpu-supervise {__version__}-{token}"
    other = _another_build(binary, tmp_path)
    assert _version_of(other) == f"gpu-supervise {__version__}-{_token_of(other.parent)}"
    assert _version_of(other) != _version_of(binary)
    out = run(["--version"], clean_env())
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == f"gpu-supervise {__version__} (Python package, {Path(package).parent})\n"


def test_install_of_the_same_build_again_switches_to_its_folder(binary: Path, tmp_path: Path):
    """A re-run init container installs the build that is there already: its folder (which may
    be running) is switched to again, not copied nor written over. A folder of that name that
    is not a copy of the build is an error: one line, exit 1, nothing changed."""
    first = _installed(binary, tmp_path)
    inode = first.stat().st_ino
    assert _installed(binary, tmp_path) == first and first.stat().st_ino == inode
    assert _versions(tmp_path) == [first.name]
    (first / "_internal" / "extra").write_text("not the build's\n")
    before = _tree(tmp_path, contents=True)
    out = _install(binary, tmp_path)
    assert (out.returncode, out.stdout) == (1, ""), out.stderr
    assert out.stderr.count("\n") == 1 and "is not a copy of this build" in out.stderr
    assert _tree(tmp_path, contents=True) == before


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], "required: DIR"),
        (["a", "b"], "unrecognized arguments: b"),
        (["--bogus", "a"], "unrecognized arguments: --bogus"),
        (["{self}"], "is where this gpu-supervise already is"),
        (["{self}/_internal/x"], "is where this gpu-supervise already is"),
        (["{self}/.."], "gpu-supervise is a folder (the running gpu-supervise)"),
        (["{tmp}/c:olon"], "a path with ':' cannot hold gpu-supervise"),
    ],
)
def test_install_usage_errors(binary: Path, tmp_path: Path, args: list[str], expected: str):
    args = [a.format(self=binary.parent, tmp=tmp_path) for a in args]
    before = _tree(binary.parent.parent)
    out = subprocess.run([str(binary), "install", *args], capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.startswith("gpu-supervise: ") and out.stderr.count("\n") == 1, out.stderr
    assert expected in out.stderr
    assert _tree(binary.parent.parent) == before
    assert list(tmp_path.iterdir()) == []


def test_install_into_the_parent_of_the_running_folder_deletes_nothing(
    binary: Path, tmp_path: Path
):
    """`dist/gpu-supervise/gpu-supervise install dist` (or `/opt/gpu-supervise/gpu-supervise
    install /opt`): DIR/gpu-supervise is the running folder itself. Refused, all of it kept."""
    dist = tmp_path / "dist"
    shutil.copytree(binary.parent, dist / "gpu-supervise", symlinks=True)
    before = _tree(dist, contents=True)
    out = _install(dist / "gpu-supervise" / "gpu-supervise", dist)
    assert (out.returncode, out.stdout) == (2, ""), out.stderr
    assert out.stderr == (
        f"gpu-supervise: {dist}/gpu-supervise is a folder (the running gpu-supervise): install "
        "puts a link there and never removes a folder; choose another DIR\n"
    )
    assert _tree(dist, contents=True) == before
    assert _version_of(dist / "gpu-supervise" / "gpu-supervise").startswith("gpu-supervise ")


def test_install_failure_is_one_line(binary: Path, tmp_path: Path):
    (tmp_path / "file").write_text("")
    out = subprocess.run(
        [str(binary), "install", str(tmp_path / "file")], capture_output=True, text=True
    )
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"gpu-supervise: cannot install into {tmp_path / 'file'}: ")


def test_install_needs_the_self_contained_binary(tmp_path: Path):
    out = run(["install", str(tmp_path / "x")], {**os.environ})
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "build one with packaging/build-binary.sh" in out.stderr
    assert not (tmp_path / "x").exists()


def test_install_waits_for_the_one_running(binary: Path, tmp_path: Path):
    """A second install into DIR while one runs (holds the lock) waits for it, says so on
    stderr, and goes ahead once it is done."""
    import fcntl

    first = _installed(binary, tmp_path)
    other = _another_build(binary, tmp_path / "other")
    fd = os.open(tmp_path / "gpu-supervise.versions", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the running install holds it
        proc = subprocess.Popen([str(other), "install", str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert proc.stderr is not None
            waiting = proc.stderr.readline()
        finally:
            os.close(fd)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert waiting == (
        f"gpu-supervise: waiting for another install into {tmp_path} to finish (at most 60 s)\n"
    )
    assert (proc.returncode, stderr) == (0, ""), stderr
    assert INSTALLED.fullmatch(stdout), stdout
    linked = (tmp_path / "gpu-supervise").resolve().parent
    assert linked.name.endswith(f"-{_token_of(other.parent)}")
    assert first.name in _versions(tmp_path)


# The package's install() with its lock wait shortened; with "race", DIR and then
# gpu-supervise.versions are made by another install between the check that they are missing
# and install's own mkdir of them.
RACED_INSTALL = r"""
import os, sys
from pathlib import Path
from gpu_supervise import install

race, source, target = sys.argv[1] == "race", Path(sys.argv[2]), Path(sys.argv[3])
install.LOCK_WAIT = 1.5
mkdir = os.mkdir

def raced(path, *args, **kwargs):
    if race and Path(path) in (target, target / "gpu-supervise.versions"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        mkdir(path)  # another install, meanwhile
    return mkdir(path, *args, **kwargs)

os.mkdir = raced
entries = ("gpu-supervise", "_internal")
bundle = install.Bundle(source, entries, source / "gpu-supervise", "abcdef12")
try:
    install.install(bundle, target)
except OSError as exc:
    sys.exit(f"failed: {exc}")
"""


def test_install_waits_for_the_lock_a_bounded_time(binary: Path, tmp_path: Path):
    """One that never finishes: after the wait (here shortened), one line, exit 1, DIR as it
    was. The package's install(), with the binary's folder as its bundle."""
    import fcntl

    first = _installed(binary, tmp_path)
    before = _tree(tmp_path)
    fd = os.open(tmp_path / "gpu-supervise.versions", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out = subprocess.run(
            [sys.executable, "-c", RACED_INSTALL, "no race", str(binary.parent), str(tmp_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(fd)
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines() == [
        f"gpu-supervise: waiting for another install into {tmp_path} to finish (at most 1.5 s)",
        "failed: [Errno 16] another gpu-supervise install into it still runs after 1.5 s",
    ]
    assert _tree(tmp_path) == before and _versions(tmp_path) == [first.name]


def test_install_into_a_dir_another_install_makes_meanwhile(binary: Path, tmp_path: Path):
    """Concurrent installs into a DIR not there yet: DIR or gpu-supervise.versions made by
    another between the check and the mkdir is no error."""
    from gpu_supervise import __version__

    target = tmp_path / "volume" / "supervise"
    out = subprocess.run(
        [sys.executable, "-c", RACED_INSTALL, "race", str(binary.parent), str(target)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (out.returncode, out.stderr) == (0, "")
    assert _versions(target) == [f"{__version__}-abcdef12"]


def test_concurrent_installs_all_succeed(binary: Path, tmp_path: Path):
    """Five init containers (pods of one node, one volume) install at once into a DIR that is
    not there yet: each takes its turn, all succeed, and one copy of the build is there."""
    target = tmp_path / "volume" / "supervise"
    procs = [
        subprocess.Popen(
            [str(binary), "install", str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(5)
    ]
    try:
        outs = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (stdout, stderr) in zip(procs, outs):
        assert proc.returncode == 0, stderr
        assert INSTALLED.fullmatch(stdout), stdout
        assert not [line for line in stderr.splitlines() if "waiting for" not in line], stderr
    (folder,) = _versions(target)
    assert (target / "gpu-supervise").resolve().parent.name == folder
    assert _version_of(target / "gpu-supervise") == f"gpu-supervise {folder}"


@pytest.mark.parametrize("kind", ["dangling", "another folder", "another install"])
def test_install_over_a_link_replaces_the_link_and_writes_nothing_outside(
    binary: Path, tmp_path: Path, kind: str
):
    """DIR/gpu-supervise (and DIR/_internal) may be links: dangling, into another folder, or
    into another install's version folder. The link is replaced, never followed."""
    target, outside = tmp_path / "dir", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    if kind == "dangling":
        (target / "gpu-supervise").symlink_to(outside / "missing")
    elif kind == "another folder":
        (outside / "gpu-supervise").write_text("someone else's\n")
        (outside / "_internal" / "ld").mkdir(parents=True)
        (outside / "_internal" / "gpu-supervise").write_text("someone else's\n")
        (outside / "_internal" / "ld" / "gpu-supervise").symlink_to("../gpu-supervise")
        (target / "gpu-supervise").symlink_to("../outside/gpu-supervise")
        (target / "_internal").symlink_to("../outside/_internal")
    else:
        other = _installed(binary, outside)
        (target / "gpu-supervise").symlink_to(other / "gpu-supervise")
    before = _tree(outside, contents=True)
    out = _install(binary, target)
    assert out.returncode == 0, out.stderr
    assert _tree(outside, contents=True) == before
    assert INSTALLED.fullmatch(out.stdout), out.stdout
    assert (target / "gpu-supervise").resolve().parent.parent == target / "gpu-supervise.versions"
    assert _version_of(target / "gpu-supervise").startswith("gpu-supervise ")
    if kind == "another folder":  # not a copy of ours: left alone
        assert os.readlink(target / "_internal") == "../outside/_internal"


@pytest.mark.parametrize("kind", ["another folder", "the running folder"])
def test_install_over_a_link_to_a_folder_replaces_the_link(binary: Path, tmp_path: Path, kind: str):
    """DIR/gpu-supervise a link to a folder (someone's, or the running copy itself) is not a
    folder: the link is replaced, what it led to is left as it was."""
    target, outside = tmp_path / "dir", tmp_path / "outside"
    target.mkdir()
    if kind == "another folder":
        (outside / "_internal").mkdir(parents=True)
        (outside / "gpu-supervise").write_text("someone else's\n")
    else:
        outside = binary.parent
    (target / "gpu-supervise").symlink_to(outside, target_is_directory=True)
    before = _tree(outside, contents=True)
    out = _install(binary, target)
    assert out.returncode == 0, out.stderr
    assert INSTALLED.fullmatch(out.stdout), out.stdout
    assert (target / "gpu-supervise").resolve().parent.parent == target / "gpu-supervise.versions"
    assert _tree(outside, contents=True) == before
    assert _version_of(target / "gpu-supervise") == _version_of(binary)


@pytest.mark.parametrize("linked", ["DIR", "its parent"])
def test_install_refuses_a_dir_whose_resolved_path_holds_a_colon(
    binary: Path, tmp_path: Path, linked: str
):
    """DIR -> /x/vol:1 (or DIR's parent such a link, DIR not there yet): the copy would be
    under a path with ':' all the same. Refused with the resolved path, nothing written."""
    colon = tmp_path / "x" / "vol:1"
    colon.mkdir(parents=True)
    if linked == "DIR":
        target = tmp_path / "supervise"
        target.symlink_to(colon, target_is_directory=True)
    else:
        (tmp_path / "volume").symlink_to(colon, target_is_directory=True)
        target = tmp_path / "volume" / "supervise"
    out = _install(binary, target)
    assert (out.returncode, out.stdout) == (2, ""), out.stderr
    where = colon if linked == "DIR" else colon / "supervise"
    assert out.stderr == (
        f"gpu-supervise: {where}: a path with ':' cannot hold gpu-supervise (the library search "
        "path is colon-separated: it would load the image's C library)\n"
    )
    assert list(colon.iterdir()) == []


@pytest.mark.parametrize("kind", ["a folder", "a dangling link"])
def test_install_refuses_a_versions_folder_that_is_a_link(binary: Path, tmp_path: Path, kind: str):
    """DIR/gpu-supervise.versions a link (to a folder elsewhere, or to nothing): following it
    would write outside DIR. Refused, one line, exit 2; nothing written anywhere."""
    target, outside = tmp_path / "dir", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()
    if kind == "a folder":
        (outside / "versions").mkdir()
    (target / "gpu-supervise.versions").symlink_to(outside / "versions")
    before = _tree(tmp_path, contents=True)
    out = _install(binary, target)
    assert (out.returncode, out.stdout) == (2, ""), out.stderr
    assert out.stderr == (
        f"gpu-supervise: {target}/gpu-supervise.versions is not a folder of gpu-supervise's\n"
    )
    assert _tree(tmp_path, contents=True) == before


def test_install_keeps_a_folder_mapped_through_a_bind_mount(
    binary: Path, tmp_path: Path, start_cmd: Callable[..., Proc]
):
    """The agent's container sees the volume at another path (a bind mount in its own mount
    namespace): its supervisor maps files under a path that is not DIR's here. The inode
    check keeps its folder all the same, and the next install after it stops removes it."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        missing_capability("a mount namespace of its own needs root and unshare")
    volume, view = tmp_path / "volume", tmp_path / "view"
    view.mkdir()
    builds = [_another_build(binary, tmp_path / f"build-{n}") for n in range(3)]
    first = _installed(binary, volume)
    proc = start_cmd(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount --bind "$1" "$2" && exec "$2/gpu-supervise" --no-watch -- sleep 300', "sh",
         str(volume), str(view)],
        clean_env(),
    )  # fmt: skip
    proc.wait_for("as pid")
    assert _started_from(proc.pid) == view / "gpu-supervise.versions" / first.name
    assert list(view.iterdir()) == []  # here, the view is an empty folder
    _installed(builds[0], volume)  # keeps first: the copy the link named before
    _installed(builds[1], volume)  # keeps first: mapped, as the inode says
    assert first.name in _versions(volume)
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143, proc.log
    last = _installed(builds[2], volume)
    assert first.name not in _versions(volume) and last.name in _versions(volume)


def test_install_on_a_full_filesystem_keeps_the_old_copy_running(
    binary: Path, binary_b: Path, tmpfs: Callable[[str], Path], start_cmd: Callable[..., Proc]
):
    """Room for one copy and a half: the second install fails with ENOSPC halfway through its
    copy, while a supervisor runs from the first. One short line, exit 1; the first copy still
    starts and the running supervisor is untouched; the space is given back."""
    size = sum(p.lstat().st_size for p in binary.parent.rglob("*"))
    fs = tmpfs(f"size={size * 3 // 2 // 1024}k")
    first = _installed(binary, fs / "opt")
    proc = start_cmd([str(fs / "opt" / "gpu-supervise"), "--no-watch", "--", "sleep", "300"],
                     clean_env())  # fmt: skip
    proc.wait_for("as pid")
    free = os.statvfs(fs).f_bfree
    out = _install(binary_b, fs / "opt")
    assert out.returncode == 1, out.stderr
    assert out.stderr.count("\n") == 1 and len(out.stderr) < 600, out.stderr[:2000]
    assert out.stderr.startswith(f"gpu-supervise: cannot install into {fs / 'opt'}: ")
    assert "No space left on device" in out.stderr
    assert _version_of(fs / "opt" / "gpu-supervise") == _version_of(binary)
    assert not [m for m in _mapped_files(proc.pid) if m.endswith("(deleted)")]
    assert (fs / "opt" / "gpu-supervise").resolve().parent == first
    assert _versions(fs / "opt") == [first.name]  # no half copy left behind
    assert os.statvfs(fs).f_bfree == free
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143, proc.log


def test_install_that_cannot_make_its_link_keeps_the_old_copy(
    binary: Path, binary_b: Path, tmpfs: Callable[[str], Path]
):
    """Inodes for exactly one more copy: the copy completes, the link before the switch
    cannot be made (ENOSPC). The new copy is removed; the old one stays linked."""
    size = sum(p.lstat().st_size for p in binary.parent.rglob("*"))
    fs = tmpfs(f"size={size * 3 // 1024}k")
    first = _installed(binary, fs / "opt")
    used = os.statvfs(fs).f_files - os.statvfs(fs).f_ffree
    entries = 1 + len(list(binary.parent.rglob("*")))  # the folder and what it holds
    remount = subprocess.run(
        ["mount", "-o", f"remount,nr_inodes={used + entries}", str(fs)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert remount.returncode == 0, remount.stderr
    out = _install(binary_b, fs / "opt")
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr[:2000]
    assert _version_of(fs / "opt" / "gpu-supervise") == _version_of(binary)
    assert "No space left on device" in out.stderr and ".link-" in out.stderr
    assert (fs / "opt" / "gpu-supervise").resolve().parent == first
    assert _versions(fs / "opt") == [first.name]


# Runs the package's install() with every filesystem change it makes (os.mkdir, symlink,
# rename, chmod, unlink, rmdir; shutil.copy2) journaled, and the Nth one made to fail (OSError)
# or to crash the process (os._exit, as a power cut or SIGKILL would, with no clean-up).
HOOKED_INSTALL = r"""
import errno, os, shutil, sys
from pathlib import Path
from gpu_supervise import install

mode, at, source, target, journal = sys.argv[1], int(sys.argv[2]), *map(Path, sys.argv[3:])
log = open(journal, "w")
calls = 0

def hooked(kind, function):
    def call(*args, **kwargs):
        global calls
        calls += 1
        print(kind, *args, file=log, flush=True)
        if calls == at:
            if mode == "crash":
                os._exit(70)
            raise OSError(errno.EIO, f"{kind} failed")
        return function(*args, **kwargs)
    return call

for name in ("mkdir", "symlink", "rename", "chmod", "unlink", "rmdir"):
    setattr(os, name, hooked(name, getattr(os, name)))
shutil.copy2 = hooked("copy2", shutil.copy2)
token = (source / "_internal" / "gpu-supervise.build").read_text()
bundle = install.Bundle(source, ("gpu-supervise", "_internal"), source / "gpu-supervise", token)
try:
    done, problems = install.install(bundle, target)
except OSError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
print(*problems, sep="\n", file=sys.stderr)
"""


@pytest.mark.slow
def test_install_failing_or_crashing_at_any_step_leaves_a_working_copy(
    binary: Path, binary_b: Path, tmpfs: Callable[[str], Path]
):
    """DIR holds build A (with a dead half copy and an old version beside it); B is installed
    with each step made to fail or to crash: before the switch, DIR/gpu-supervise is A, byte
    for byte; after it, B; never anything else (and each starts, either side of the switch).
    A failure before the switch leaves DIR exactly as it was; after a crash, the next install
    succeeds and clears what the crash left. A folder with a version's name is always whole
    (an install of that build again would run it): one being removed is renamed first."""
    fs = tmpfs("size=400m")
    base = fs / "base"
    _installed(binary, base)
    versions = base / "gpu-supervise.versions"
    (versions / ".new-0badc0de").mkdir()  # what a crash during a copy leaves
    (versions / ".new-0badc0de" / "gpu-supervise").write_text("half\n")
    (versions / "0.0.1-0badc0de").mkdir()  # an old version nothing runs
    (versions / "0.0.1-0badc0de" / "gpu-supervise").write_text("old\n")
    (versions / "0.0.1-0badc0de" / "_internal").write_text("old\n")
    builds = {False: _tree(binary.parent, contents=True), True: _tree(binary_b.parent, True)}
    whole = [*builds.values(), _tree(versions / "0.0.1-0badc0de", contents=True)]
    versions_of = {False: _version_of(binary), True: _version_of(binary_b)}
    journal = fs / "journal"

    def hooked(mode: str, at: int, target: Path) -> tuple[subprocess.CompletedProcess[str], list]:
        out = subprocess.run(
            [sys.executable, "-c", HOOKED_INSTALL, mode, str(at), str(binary_b.parent),
             str(target), str(journal)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return out, journal.read_text().splitlines()

    def switch(steps: list[str], target: Path) -> int:
        return 1 + next(i for i, s in enumerate(steps) if s.endswith(f" {target}/gpu-supervise"))

    dry = fs / "dry"
    shutil.copytree(base, dry, symlinks=True)
    out, steps = hooked("none", 0, dry)
    assert out.returncode == 0, out.stderr
    # every step from the rename of the complete copy on; of the copy, the first, a middle one
    # and the last
    renamed = 1 + next(i for i, step in enumerate(steps) if re.match(r"rename \S+/\.new-", step))
    points = sorted({1, renamed // 2, renamed - 1, *range(renamed, len(steps) + 1)})
    assert len(points) < 30, steps
    for mode in ("fail", "crash"):
        for at in points:
            work = fs / "work"
            shutil.copytree(base, work, symlinks=True)
            before = _tree(work)
            out, done = hooked(mode, at, work)
            switched = at > switch(steps, dry)
            where = f"{mode} at step {at}: {done[at - 1]}"
            for folder in (work / "gpu-supervise.versions").iterdir():
                if not folder.name.startswith("."):
                    assert _tree(folder, contents=True) in whole, f"{where}: {folder.name}"
            linked = (work / "gpu-supervise").resolve().parent
            assert _tree(linked, contents=True) == builds[switched], where
            if at in (switch(steps, dry), switch(steps, dry) + 1):  # the last A, the first B
                assert _version_of(work / "gpu-supervise") == versions_of[switched], where
            if mode == "fail" and not switched:
                assert out.returncode == 1 and out.stderr.count("\n") == 1, where
                assert _tree(work) == before, where
            elif mode == "fail":
                assert out.returncode == 0, where  # the install stands; the old copies wait
            else:
                again, _ = hooked("none", 0, work)
                assert again.returncode == 0, f"{where}: {again.stderr}"
                left = _versions(work)
                # B, and A while the link still names it (B's install again keeps the copy
                # the link names, and that is B once switched)
                assert len(left) == 2 - switched, where
                assert not [n for n in left if n.startswith(".")], where
                assert _tree((work / "gpu-supervise").resolve().parent, True) == builds[True]
            shutil.rmtree(work)


# -- an upgrade under a running supervisor ------------------------------------------------------

# An agent with a child of its own: the whole tree must go when gpu-supervise stops it.
TREE_AGENT = 'sleep 300 & echo "agent $$ child $!"; wait'


def _agent_tree(proc: Proc) -> tuple[int, int]:
    proc.wait_for(" child ")
    match = re.search(r"agent (\d+) child (\d+)", proc.stdout)
    assert match, proc.stdout
    return int(match[1]), int(match[2])


def _started_from(pid: int) -> Path:
    """The version folder a running gpu-supervise maps its program from."""
    (program,) = [m for m in _mapped_files(pid) if m.endswith("/_internal/gpu-supervise")]
    return Path(program).parent.parent


@pytest.mark.parametrize("stop, code", [("SIGTERM", 143), ("topology change", 1)])
def test_upgrade_under_a_running_supervisor_leaves_it_whole(
    binary: Path,
    binary_b: Path,
    fake_node: FakeNode,
    tmp_path: Path,
    start_cmd: Callable[..., Proc],
    stop: str,
    code: int,
):
    """The upgrade the systemd unit documents: build A installed in /opt/gpu-supervise runs
    the agent; build B is installed over it; then the supervisor is stopped (SIGTERM: the
    agent's 143) or sees a topology change (exit 1). It stops the agent's whole tree and exits
    with no traceback, because nothing it runs from was written over or removed; the restart
    that follows runs B."""
    node = dgx_a100(["1g.5gb"] * 7)
    fake_node.write(node)
    opt = tmp_path / "opt" / "gpu-supervise"
    a = _installed(binary, opt)
    proc = start_cmd([str(opt / "gpu-supervise"), *FAST, "--", "sh", "-c", TREE_AGENT],
                     fake_node.env)  # fmt: skip
    agent, child = _agent_tree(proc)
    proc.wait_for("[GPU-Watcher] baseline")
    assert _started_from(proc.pid) == a
    mapped = {m for m in _mapped_files(proc.pid) if m.startswith(str(a))}
    contents = {m: Path(m).read_bytes() for m in mapped}

    b = _installed(binary_b, opt)
    assert b != a and _version_of(opt / "gpu-supervise") == _version_of(binary_b)
    after = {m for m in _mapped_files(proc.pid) if m.startswith(str(a))}
    unchanged = {m for m in mapped if Path(m).is_file() and Path(m).read_bytes() == contents[m]}

    if stop == "SIGTERM":
        proc.signal(signal.SIGTERM)
    else:
        node.gpu(0).set_layout(["3g.20gb"] * 2)
        fake_node.write(node)
    assert proc.wait(60) == code, proc.log
    assert "Traceback" not in proc.output and "CRITICAL" not in proc.log, proc.log
    if stop != "SIGTERM":
        assert "MIG configuration change detected" in proc.log
    assert not pid_alive(agent) and not pid_alive(child)
    # the running supervisor's files stayed where they were, as they were
    assert after == mapped and unchanged == mapped

    # the restart policy starts it again: B
    again = start_cmd([str(opt / "gpu-supervise"), *FAST, "--", "sh", "-c", TREE_AGENT],
                      fake_node.env)  # fmt: skip
    _agent_tree(again)
    assert _started_from(again.pid) == b


def test_install_removes_old_copies_only_once_nothing_runs_from_them(
    binary: Path, tmp_path: Path, start_cmd: Callable[..., Proc]
):
    """Each install keeps the copy the link named before it (supervisors started until then,
    in any namespace, run from it) and every copy a process maps; the rest goes."""
    target = tmp_path / "dir"
    builds = [_another_build(binary, tmp_path / f"build-{n}") for n in range(4)]
    first = _installed(binary, target)
    proc = start_cmd([str(target / "gpu-supervise"), "--no-watch", "--", "sleep", "300"],
                     clean_env())  # fmt: skip
    proc.wait_for("as pid")
    second = _installed(builds[0], target)
    third = _installed(builds[1], target)
    fourth = _installed(builds[2], target)
    assert _versions(target) == sorted([first.name, third.name, fourth.name])
    assert second.name not in _versions(target)
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143
    fifth = _installed(builds[3], target)
    assert _versions(target) == sorted([fourth.name, fifth.name])


# -- where it may run from ------------------------------------------------------------------------


def test_binary_refuses_to_run_from_a_path_with_a_colon(binary: Path, tmp_path: Path):
    """The library search path is colon-separated: from /c:olon/ the bundled glibc would not be
    found and the image's loaded instead. One line, 126, before anything is loaded."""
    folder = tmp_path / "c:olon" / "gpu-supervise"
    shutil.copytree(binary.parent, folder, symlinks=True)
    out = subprocess.run([str(folder / "gpu-supervise"), "--version"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert (out.returncode, out.stdout) == (126, "")
    assert out.stderr == (
        f"gpu-supervise: cannot run from {folder}: the path holds ':', which the library search "
        "path cannot (install gpu-supervise into a folder without ':')\n"
    )


# -- the agent's environment ----------------------------------------------------------------------

CALLER_CASES = {
    "no LD_LIBRARY_PATH": {},
    "an empty LD_LIBRARY_PATH": {"LD_LIBRARY_PATH": ""},
    "LD_LIBRARY_PATH_ORIG alone": {"LD_LIBRARY_PATH_ORIG": "/caller/orig"},
    "both": {"LD_LIBRARY_PATH": "/caller/lib", "LD_LIBRARY_PATH_ORIG": "/caller/orig"},
}


def _environ(pid: int) -> list[bytes]:
    return sorted(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")[:-1])


@pytest.mark.parametrize("case", CALLER_CASES)
@pytest.mark.parametrize("form", ["binary", "package"])
def test_the_agent_gets_the_callers_environment_byte_for_byte(
    binary: Path, start_cmd: Callable[..., Proc], form: str, case: str
):
    """What the agent finds in /proc/PID/environ is what gpu-supervise was started with, less
    NOTIFY_SOCKET (gpu-supervise speaks to systemd itself). Not what PyInstaller's bootloader
    made of it (the binary), nor what the interpreter added (the package: LC_CTYPE=C.UTF-8 with
    no locale set), and the caller's own _PYI_*, PYINSTALLER_* and launcher-record names too."""
    from conftest import SESSION_MARK, gpu_supervise_cmd

    caller = {
        "PATH": "/usr/bin:/bin",
        SESSION_MARK: os.environ[SESSION_MARK],
        "_PYI_CALLERS_OWN": "kept",
        "_PYI_PARENT_PROCESS_LEVEL": "1",
        "PYINSTALLER_RESET_ENVIRONMENT": "1",
        "_GPU_SUPERVISE_CALLER_ENV": "LD_LIBRARY_PATH=/not/this%20one",
        "ODD": "a b%20c%25\nd=e \udcff",  # spaces, escapes, a newline, a byte that is not UTF-8
        "NOTIFY_SOCKET": "/nonexistent/notify",
        **CALLER_CASES[case],
    }
    command = [str(binary)] if form == "binary" else gpu_supervise_cmd()
    proc = start_cmd([*command, "--no-watch", "--", "/bin/sleep", "300"], caller)
    proc.wait_for(" as pid ")
    pid = int(re.search(r" as pid (\d+)", proc.log)[1])  # type: ignore[index]
    expected = {**caller, Proc.MARK: proc.mark}
    del expected["NOTIFY_SOCKET"]
    assert _environ(pid) == sorted(os.fsencode(f"{k}={v}") for k, v in expected.items())
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143


def test_binary_started_without_a_library_path_gives_the_agent_none_and_the_images_libc(
    binary: Path, start_cmd: Callable[..., Proc]
):
    """The usual case, which the other tests (all setting LD_LIBRARY_PATH for the fake NVML)
    never take: no LD_LIBRARY_PATH for the agent, and the image's libc in it, while
    gpu-supervise itself runs on the bundled one."""
    env = {k: v for k, v in clean_env().items() if k != "LD_LIBRARY_PATH"}
    proc = start_cmd([str(binary), "--no-watch", "--", "/bin/sleep", "300"], env)
    proc.wait_for(" as pid ")
    pid = int(re.search(r" as pid (\d+)", proc.log)[1])  # type: ignore[index]
    assert not [e for e in _environ(pid) if e.startswith(b"LD_LIBRARY_PATH")]
    bundle = str(binary.parent.resolve())

    def libc(p: int) -> set[str]:
        return {m for m in _mapped_files(p) if m.endswith("/libc.so.6")}

    assert libc(proc.pid) == {f"{bundle}/_internal/libc.so.6"}
    (image,) = libc(pid)
    assert not image.startswith(bundle + "/") and Path(image).is_file()
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 143


# -- a real container runtime --------------------------------------------------------------------

BULLSEYE_MIRRORS = ("http://deb.debian.org/debian", "http://archive.debian.org/debian")


@pytest.fixture(scope="session")
def bullseye_rootfs() -> Path:
    """A Debian 11 minbase root filesystem (glibc 2.31), the agent image of the tests.

    debootstrap takes about 30 s, so the tree is kept outside the repository, one per ISO week
    ($XDG_CACHE_HOME/gpu-supervise-tests/bullseye-minbase-YEAR-Wnn, older weeks removed), and
    containers only ever see it through an overlay (`--rootfs DIR:O`): it is never written.
    """
    if shutil.which("debootstrap") is None:
        missing_capability("debootstrap not installed (Debian package debootstrap; .ci/run has it)")
    if os.geteuid() != 0:
        missing_capability("debootstrap needs root")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpu-supervise-tests"
    year, week, _ = date.today().isocalendar()
    rootfs = cache / f"bullseye-minbase-{year}-W{week:02d}"
    if (rootfs / "etc/debian_version").is_file():
        return rootfs
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob("bullseye-minbase-*"):
        shutil.rmtree(old, ignore_errors=True)
    work = cache / f".building-{os.getpid()}"
    failures = []
    mirrors = [m for m in (os.environ.get("BULLSEYE_MIRROR"), *BULLSEYE_MIRRORS) if m]
    for mirror in mirrors:
        shutil.rmtree(work, ignore_errors=True)
        out = subprocess.run(
            ["debootstrap", "--variant=minbase", "bullseye", str(work), mirror],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if out.returncode == 0:
            break
        failures.append(f"{mirror}: {(out.stdout + out.stderr).strip()[-300:]}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        missing_capability(f"debootstrap bullseye failed (Debian archive unreachable?): {failures}")
    work.rename(rootfs)
    return rootfs


def test_agent_image_recipe_runs_with_no_libc_at_all(
    images: dict[str, str], podman: list[str], fake_node: FakeNode, tmp_path: Path
):
    """packaging/Dockerfile on an empty base: no libc, no shell, a read-only root and no
    writable /tmp. Its ENTRYPOINT (PID 1) supervises the command given, here the binary's own
    snapshot, which loads the fake NVML (mounted in) with the bundled glibc; the default
    configuration path holds examples/config.toml, and it loads."""
    nvml = tmp_path / "nvml"
    nvml.mkdir()
    shutil.copy2(fake_node.lib_dir / "libnvidia-ml.so.1", nvml)
    dgx_a100(["1g.5gb"] * 7, ["3g.20gb"] * 2).write(nvml / "node.txt")
    out = subprocess.run(
        [*podman, "run", "--rm", *PODMAN_FLAGS, *READ_ONLY, "-v", f"{nvml}:/nvml:ro",
         "-e", "LD_LIBRARY_PATH=/nvml", "-e", "FAKE_NVML_NODE=/nvml/node.txt",
         images["agent"], "/opt/gpu-supervise/gpu-supervise", "snapshot", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "gpu-supervise[1] INFO    started /opt/gpu-supervise/gpu-supervise" in out.stderr
    env = {**fake_node.env, "FAKE_NVML_NODE": str(nvml / "node.txt")}
    assert json.loads(out.stdout) == json.loads(run(["snapshot", "--json"], env).stdout)


# The agent, from the Debian 11 image: prints what it runs on and the UUIDs it sees through the
# shipped binary (as a real agent caches NVML handles), then idles, logging SIGUSR1.
BULLSEYE_AGENT = """#!/bin/sh
trap 'echo "agent $$ got USR1"' USR1
echo "agent $$ begin"
echo "debian $(cat /etc/debian_version)"
ldd --version | head -n 1
echo "pid 1 is $(cat /proc/1/comm)"
/supervise/gpu-supervise snapshot
echo "agent $$ end"
while :; do sleep 1 & wait $!; done
"""


def test_init_container_installs_and_a_debian_11_agent_restarts_after_a_change(
    binary: Path,
    podman: list[str],
    bullseye_rootfs: Path,
    images: dict[str, str],
    fake_node: FakeNode,
    tmp_path: Path,
):
    """The Kubernetes init-container pattern with podman: the image of packaging/Dockerfile.init
    (`gpu-supervise install /supervise`, in an image holding nothing else) fills a volume; the
    agent container (Debian 11, glibc 2.31, read-only root) runs /supervise/gpu-supervise as
    PID 1 with --restart on-failure; a topology change exits 1, the runtime restarts it, and
    the new agent sees the new UUIDs."""
    agent = tmp_path / "agent"
    agent.mkdir()
    (agent / "agent.sh").write_text(BULLSEYE_AGENT)
    (agent / "agent.sh").chmod(0o755)
    nvml = tmp_path / "nvml"
    nvml.mkdir()
    shutil.copy2(fake_node.lib_dir / "libnvidia-ml.so.1", nvml)
    termination = tmp_path / "termination-log"
    termination.write_text("")
    old = dgx_a100(["1g.5gb"] * 7, count=2)
    old.write(nvml / "node.txt")

    tag = f"gpu-supervise-test-{os.getpid()}"
    volume, name = f"{tag}-supervise", f"{tag}-agent"
    subprocess.run([*podman, "rm", "-f", name], capture_output=True)
    subprocess.run([*podman, "volume", "rm", "-f", volume], capture_output=True)
    created = subprocess.run([*podman, "volume", "create", volume], capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    try:
        init = subprocess.run(
            [*podman, "run", "--rm", *PODMAN_FLAGS, *READ_ONLY, "-v", f"{volume}:/supervise",
             images["init"]],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert init.returncode == 0, init.stderr
        match = INSTALLED.fullmatch(init.stdout)
        assert match and match["link"] == "/supervise/gpu-supervise", init.stdout
        assert match["source"] == "/opt/gpu-supervise"

        started = subprocess.run(
            [*podman, "run", "-d", "--name", name, "--restart", "on-failure", *PODMAN_FLAGS,
             *READ_ONLY, "-v", f"{volume}:/supervise:ro", "-v", f"{agent}:/agent:ro",
             "-v", f"{nvml}:/nvml", "-v", f"{termination}:/dev/termination-log",
             "-e", "LD_LIBRARY_PATH=/nvml", "-e", "FAKE_NVML_NODE=/nvml/node.txt",
             "--rootfs", f"{bullseye_rootfs}:O",
             "/supervise/gpu-supervise", *FAST, "--", "/agent/agent.sh"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        logs = _wait_logs(podman, name, "end", count=1)
        assert "gpu-supervise[1] INFO    started /agent/agent.sh" in logs  # PID 1
        first = _agent_views(logs)[0]
        assert "debian 11." in first and "GLIBC 2.31" in first, first  # the image's libc
        assert "pid 1 is gpu-supervise\n" in first  # named as itself, not as the loader
        assert all(u in first for u in old.uuids())
        # the change comes after gpu-supervise's baseline, never before (a loaded machine may
        # take it after the agent's end line)
        _wait_logs(podman, name, "[GPU-Watcher] baseline", count=1, stderr_only=True)

        new = old.copy()
        new.gpu(0).set_layout(["3g.20gb"] * 2)
        new.write(nvml / "node.txt")
        logs = _wait_logs(podman, name, "end", count=2)
        second = _agent_views(logs)[1]
        assert all(u in second for u in new.uuids())
        assert not any(u in second for u in set(old.uuids()) - set(new.uuids()))
        assert "MIG configuration change detected" in logs
        assert int(_inspect(podman, name, "{{.RestartCount}}")) >= 1
        assert termination.read_text().startswith("gpu-supervise: GPU topology changed")

        # signals reach the agent through PID 1 (a one-file bootloader in front would drop it)
        subprocess.run([*podman, "kill", "--signal", "USR1", name], check=True, timeout=60)
        _wait_logs(podman, name, "got USR1", count=1)
    finally:
        subprocess.run([*podman, "rm", "-f", "-t", "2", name], capture_output=True, timeout=120)
        subprocess.run([*podman, "volume", "rm", "-f", volume], capture_output=True, timeout=60)


def _agent_views(logs: str) -> list[str]:
    """What each agent printed between its begin and end markers."""
    return [m[1] for m in re.findall(r"agent (\d+) begin\n(.*?)agent \1 end", logs, flags=re.S)]


def _inspect(podman: list[str], name: str, fmt: str) -> str:
    return subprocess.run(
        [*podman, "inspect", name, "--format", fmt], capture_output=True, text=True, timeout=60
    ).stdout.strip()


def _wait_logs(
    podman: list[str], name: str, marker: str, count: int, timeout: float = 90, stderr_only=False
) -> str:
    """The container's output once it shows `marker` `count` times; with `stderr_only`, looked
    for in gpu-supervise's log alone (podman logs keeps the container's streams apart)."""
    deadline = time.monotonic() + timeout
    logs = ""
    while time.monotonic() < deadline:
        out = subprocess.run([*podman, "logs", name], capture_output=True, text=True, timeout=60)
        logs = out.stderr if stderr_only else out.stdout + out.stderr
        if logs.count(f" {marker}") >= count:
            return logs
        time.sleep(0.3)
    raise AssertionError(f"container logs never showed {count}x {marker!r}:\n{logs}")
