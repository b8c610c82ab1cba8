"""NVIDIA's own NVML parts, from Debian's non-free archive, for tests that hold the fakes to them.

Debian 12 (bookworm) ships NVIDIA's libnvidia-ml.so.1 and nvidia-smi (libnvidia-ml1, nvidia-smi)
and nvml.h (libnvidia-ml-dev). They are fetched with apt-get through a configuration of their
own (a sources list naming the non-free component, package lists and a download cache in a
folder of their own) and unpacked with dpkg-deb -x: nothing is installed, and the machine's own
sources, package lists, cache and dpkg status are neither read nor written (its apt.conf.d
settings, a proxy say, still apply). About 1.2 MB; the unpacked tree is kept for the ISO week,
as the Debian 11 tree of test_binary.py is, so later runs need no network. $BOOKWORM_MIRROR
names another Debian mirror (as $BULLSEYE_MIRROR does there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import date
from pathlib import Path

PACKAGES = ("libnvidia-ml1", "nvidia-smi", "libnvidia-ml-dev")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class Unavailable(Exception):
    """NVIDIA's packages cannot be had here (no apt, no keyring, the archive unreachable)."""


@dataclass(frozen=True)
class NvidiaParts:
    """Where the unpacked packages put what the tests use."""

    root: Path

    @property
    def lib_dir(self) -> Path:
        """The folder holding libnvidia-ml.so.1: LD_LIBRARY_PATH for nvidia-ml-py."""
        return next(self.root.glob("usr/lib/*/nvidia/current/libnvidia-ml.so.1")).parent

    @property
    def nvidia_smi(self) -> Path:
        return self.root / "usr/lib/nvidia/current/nvidia-smi"

    @property
    def include_dir(self) -> Path:
        """The folder holding nvml.h."""
        return self.root / "usr/include"

    @property
    def versions(self) -> dict[str, str]:
        """Package name -> Debian version, as unpacked."""
        lines = (self.root / "VERSIONS").read_text().splitlines()
        return dict(line.split(" ", 1) for line in lines if line)


def apt_options(work: Path) -> list[str]:
    """apt-get options that make it read and write only under `work` (its own sources list,
    package lists and cache), with the archive's signatures checked against Debian's keyring."""
    return [
        "-o", f"Dir::Etc::SourceList={work / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", "Dir::Etc::Preferences=/dev/null",
        "-o", "Dir::Etc::PreferencesParts=/dev/null",
        "-o", f"Dir::State::Lists={work / 'lists'}",
        "-o", f"Dir::State::status={work / 'status'}",
        "-o", f"Dir::Cache={work / 'cache'}",
        "-o", "Acquire::Languages=none",
        # The folders are root's, private: apt's unprivileged download user could not write them.
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


def download(work: Path, mirror: str = MIRROR) -> NvidiaParts:
    """Fetch and unpack PACKAGES under `work` (a new folder): what NvidiaParts describes, at
    work/root. Raises Unavailable with apt's own words when that cannot be done."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} not found (NVIDIA's parts come from Debian's archive)")
    if not KEYRING.is_file():
        raise Unavailable(f"{KEYRING} missing: Debian package debian-archive-keyring")
    work.mkdir(parents=True)
    (work / "sources.list").write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} non-free\n")
    (work / "status").write_text("")
    for folder in ("lists/partial", "cache/archives/partial", "debs", "root"):
        (work / folder).mkdir(parents=True)
    _apt(work, ["update"], work)
    _apt(work, ["download", *PACKAGES], work / "debs")
    versions = []
    for deb in sorted((work / "debs").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        fields = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Package", "Version"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        package, version = (line.split(": ", 1)[1] for line in fields.splitlines())
        versions.append(f"{package} {version}\n")
    (work / "root" / "VERSIONS").write_text("".join(versions))
    parts = NvidiaParts(work / "root")
    missing = [str(p) for p in (parts.nvidia_smi, parts.include_dir / "nvml.h") if not p.is_file()]
    if missing or not list(parts.root.glob("usr/lib/*/nvidia/current/libnvidia-ml.so.1")):
        raise AssertionError(f"the packages did not hold what the tests use: {missing}")
    return parts


def _apt(work: Path, args: list[str], cwd: Path) -> None:
    """apt-get with the options of `work`; Unavailable with apt's own words when it fails."""
    out = subprocess.run(
        ["apt-get", *apt_options(work), *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    # apt-get update exits 0 even when a source could not be fetched; it says so with "W:"/"E:"
    problems = [ln for ln in out.stderr.splitlines() if ln.startswith(("E:", "W:", "Err:"))]
    if out.returncode != 0 or problems:
        text = "\n".join(problems) or out.stderr.strip()[-500:]
        raise Unavailable(f"apt-get {args[0]} exited {out.returncode}: {text}")


def cached(cache: Path) -> NvidiaParts:
    """NVIDIA's parts for this ISO week, unpacked under `cache` (downloaded on first use; older
    weeks' trees removed). Several test runs at once: each builds in a folder of its own and the
    first to finish wins."""
    year, week, _ = date.today().isocalendar()
    if shutil.which("dpkg") is None:
        raise Unavailable("dpkg not found (NVIDIA's parts come from Debian's archive)")
    dpkg = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True)
    final = cache / f"nvidia-{SUITE}-{dpkg.stdout.strip()}-{year}-W{week:02d}"
    if (final / "root" / "VERSIONS").is_file():
        return NvidiaParts(final / "root")
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"nvidia-{SUITE}-*"):
        if old != final:  # this week's may be another run's, finished meanwhile
            shutil.rmtree(old, ignore_errors=True)
    work = cache / f".nvidia-building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        download(work, os.environ.get("BOOKWORM_MIRROR") or MIRROR)
        for bulky in ("debs", "lists", "cache"):  # the unpacked tree is all that is used
            shutil.rmtree(work / bulky)
        try:
            work.rename(final)
        except OSError:  # another run finished first: use its tree
            if not (final / "root" / "VERSIONS").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return NvidiaParts(final / "root")
