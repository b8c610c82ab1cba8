"""Give a PyInstaller one-folder build the C library it was linked against (build-binary.sh).

    python packaging/bundle_glibc.py FOLDER    (FOLDER: the build; FOLDER/gpu-supervise its program)

1. Prints the glibc floor: the highest GLIBC_x.y symbol version that any ELF file of the build
   needs (its .gnu.version_r section, as `readelf -V` shows it), i.e. the oldest glibc the
   build could run on with the image's own C library.
2. Copies the build host's glibc (the dynamic loader, libc.so.6, libm.so.6 ...) into FOLDER,
   with FOLDER/ld/gpu-supervise, a symbolic link to the loader for the launcher to execute, and
   checks that this glibc meets the floor.
3. Checks that every DT_NEEDED library of every ELF file is now in FOLDER: nothing is taken
   from the image (NVML, loaded at run time, is the image's, as it must be).

Exit 1 with the reason on a problem. Needs readelf (binutils, as PyInstaller's --strip does)
and ldd (glibc).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The glibc libraries a bundled file or the driver's libnvidia-ml.so.1 may load. All must come
# from one glibc release: libc.so.6 from the bundle with libpthread.so.0 from the image fails.
GLIBC_LIBRARIES = (
    "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libutil.so.1",
    "libresolv.so.2", "libanl.so.1", "libnss_files.so.2", "libnss_dns.so.2",
)  # fmt: skip
REQUIRED = ("libc.so.6", "libm.so.6")
GLIBC_VERSION = re.compile(r"^GLIBC_(\d+)\.(\d+)(?:\.(\d+))?$")
Version = tuple[int, ...]


def _tool(*args: str) -> str:
    env = {**os.environ, "LC_ALL": "C"}
    return subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout


def elf_files(folder: Path) -> list[Path]:
    """Every regular ELF file under folder (symbolic links are not followed)."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(path)
    return found


def version_sections(path: Path) -> tuple[set[str], set[str]]:
    """(names path defines in .gnu.version_d, names it needs in .gnu.version_r)."""
    defined: set[str] = set()
    needed: set[str] = set()
    current: set[str] | None = None
    for line in _tool("readelf", "--wide", "-V", str(path)).splitlines():
        if line.startswith("Version definition section"):
            current = defined
        elif line.startswith("Version needs section"):
            current = needed
        elif line.startswith("Version "):
            current = None
        elif current is not None and "Name: " in line and "Flags: BASE" not in line:
            current.add(line.split("Name: ", 1)[1].split()[0])
    return defined, needed


def parse(name: str) -> Version | None:
    m = GLIBC_VERSION.match(name)
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def dotted(v: Version) -> str:
    return ".".join(map(str, v))


def glibc_floor(paths: list[Path]) -> tuple[Version, Path | None]:
    """The highest GLIBC_x.y that any of paths needs, and the first file needing it."""
    best: Version = (0,)
    culprit: Path | None = None
    for path in paths:
        for v in filter(None, map(parse, version_sections(path)[1])):
            if v > best:
                best, culprit = v, path
    return best, culprit


def host_glibc(executable: Path) -> tuple[Path, Path]:
    """(dynamic loader, libc.so.6) that executable runs with on this machine, by the names it
    asks for (ld-linux-x86-64.so.2, not the ld-2.31.so an older glibc links that to)."""
    interp = re.search(r"program interpreter: ([^\]]+)\]", _tool("readelf", "-l", str(executable)))
    libc = re.search(r"\blibc\.so\.6 => (\S+)", _tool("ldd", str(executable)))
    if not interp or not libc:
        raise SystemExit(f"{executable}: no program interpreter or libc.so.6: not a glibc build")
    return Path(interp[1]), Path(os.path.realpath(libc[1]))


def needed_libraries(path: Path) -> list[str]:
    dynamic = _tool("readelf", "-d", str(path))
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: bundle_glibc.py FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    executable = folder / "gpu-supervise"
    files = elf_files(folder)
    floor, culprit = glibc_floor(files)
    by = culprit.relative_to(folder) if culprit else "-"
    print(
        f"glibc floor: GLIBC_{dotted(floor)}, needed by {by} "
        f"(the highest GLIBC_x.y that any of the {len(files)} bundled ELF files needs; "
        f"without the bundled glibc the image would need glibc >= {dotted(floor)})"
    )

    loader, libc = host_glibc(executable)
    for name in GLIBC_LIBRARIES:
        source = libc.parent / name
        if source.exists():
            shutil.copy2(os.path.realpath(source), folder / name)
        elif name in REQUIRED:
            raise SystemExit(f"{source} is missing: cannot bundle glibc")
    shutil.copy2(os.path.realpath(loader), folder / loader.name)
    (folder / "ld").mkdir()
    (folder / "ld" / "gpu-supervise").symlink_to(Path("..") / loader.name)
    release = max(filter(None, map(parse, version_sections(folder / "libc.so.6")[0])))
    print(
        f"bundled glibc {dotted(release)} from {libc.parent} ({loader.name}): "
        f"the folder needs no C library from the image"
    )
    if release < floor:
        print(f"bundled glibc {dotted(release)} is older than the floor {dotted(floor)}")
        return 1

    present = {p.name for p in folder.iterdir()}
    missing = sorted(
        f"{path.relative_to(folder)} needs {lib}"
        for path in elf_files(folder)
        for lib in needed_libraries(path)
        if lib not in present
    )
    if missing:
        print("libraries missing from the folder:\n  " + "\n  ".join(missing))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
