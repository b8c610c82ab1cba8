"""A real systemd as PID 1 of a podman (runc) container, and a unit's state as systemd reports it.

The container's root is a folder on the host: a copy of /etc (enabled units, fstab and crypttab
left out, so it boots in a second or two), the host's /usr bind-mounted read-only and the
usr-merge links. What the units need (the repository, its virtual environment, the Python that
made it, a shared folder) is bind-mounted at the path it has on the host, so paths need no
translating. CAP_SYS_ADMIN is added: without it systemd cannot build the mount namespaces that
ProtectSystem=, ProtectHome=, PrivateTmp= and friends need, and it skips them without a word.

Everything a test asserts comes from systemd itself, through `podman exec`: `systemctl show`
(Unit.show, Unit.wait) and `journalctl -o json` (Unit.journal, Unit.wait_journal). A test of a new
STATUS= text is one line: `unit.wait(StatusText=lambda s: "pending" in s)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# What every wait reports when it gives up, besides what it waited for.
STATE = ("ActiveState", "SubState", "Result", "NRestarts", "ExecMainStatus", "MainPID",
         "StatusText")  # fmt: skip


class CannotRun(Exception):
    """podman, or systemd inside it, cannot run here: the tests skip with this reason."""


@dataclass
class Entry:
    """One journal entry."""

    message: str
    realtime: float  # when journald received it, seconds since the epoch (the host's clock)
    fields: dict = field(repr=False)


Expect = str | int | Callable[[str], bool]
Match = str | re.Pattern[str]


def _matches(value: str, expected: Expect) -> bool:
    return bool(expected(value)) if callable(expected) else value == str(expected)


def _found(message: str, text: Match) -> bool:
    return text.search(message) is not None if isinstance(text, re.Pattern) else text in message


@dataclass
class Container:
    podman: list[str]
    name: str
    rootfs: Path

    def exec(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            [*self.podman, "exec", self.name, *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and out.returncode != 0:
            raise AssertionError(
                f"`{' '.join(args)}` in the container exited {out.returncode}:\n"
                f"{out.stdout}{out.stderr}"
            )
        return out

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file in the container (its root is a folder here)."""
        target = self.rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec("systemctl", *args, check=check)

    def cursor(self) -> str:
        """Where the journal ends now: pass it as `after` to see only what comes next."""
        out = self.exec("journalctl", "--no-pager", "-o", "json", "-n", "1")
        return json.loads(out.stdout.splitlines()[-1])["__CURSOR"]

    def journal(self, *matches: str, after: str | None = None) -> list[Entry]:
        args = ["journalctl", "--no-pager", "-o", "json", *matches]
        if after is not None:
            args += ["--after-cursor", after]
        entries = []
        for line in self.exec(*args).stdout.splitlines():
            fields = json.loads(line)
            message = fields.get("MESSAGE") or ""
            if isinstance(message, list):  # journald's form for a message that is not UTF-8
                message = bytes(message).decode(errors="replace")
            entries.append(Entry(message, int(fields["__REALTIME_TIMESTAMP"]) / 1e6, fields))
        return entries

    def unit(self, name: str) -> Unit:
        return Unit(self, name)

    def wait_booted(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        out = None
        while time.monotonic() < deadline:
            out = self.exec(
                "systemctl", "is-system-running", "--wait", check=False, timeout=timeout
            )
            state = out.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.2)
        logs = subprocess.run(
            [*self.podman, "logs", self.name], capture_output=True, text=True, timeout=60
        )
        detail = (out.stdout + out.stderr if out else "") + logs.stdout + logs.stderr
        raise CannotRun(f"systemd did not boot in a podman container here: {detail[-600:]}")


@dataclass
class Unit:
    box: Container
    name: str

    def show(self, *props: str) -> dict[str, str]:
        """`systemctl show -p ...`: the named properties and those in STATE."""
        wanted = ",".join(dict.fromkeys([*STATE, *props]))
        out = self.box.systemctl("show", "-p", wanted, self.name)
        return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

    def wait(
        self,
        timeout: float = 20.0,
        fail_if: Callable[[dict[str, str]], bool] | None = None,
        **expected: Expect,
    ) -> dict[str, str]:
        """Poll `systemctl show` until every property matches (a value, or a predicate on it).
        `fail_if`: a state that must not be passed through on the way (a restart loop)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.show(*expected)
            if all(_matches(state.get(k, ""), v) for k, v in expected.items()):
                return state
            if fail_if is not None and fail_if(state):
                raise AssertionError(f"{self.name} went through {state}\n{self.tail()}")
            if time.monotonic() > deadline:
                want = {k: v if not callable(v) else "<predicate>" for k, v in expected.items()}
                raise AssertionError(
                    f"{self.name}: no {want} within {timeout} s; last {state}\n{self.tail()}"
                )
            time.sleep(0.1)

    def journal(self, after: str | None = None) -> list[Entry]:
        """The unit's entries: systemd's about it and its processes' output."""
        return self.box.journal("-u", self.name, after=after)

    def wait_journal(
        self, text: Match, after: str | None, count: int = 1, timeout: float = 20.0
    ) -> list[Entry]:
        """The entries holding `text` (a substring or a compiled pattern), once there are
        `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.journal(after) if _found(e.message, text)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: {len(found)} of {count} journal entries with {text!r} "
                    f"within {timeout} s\n{self.tail()}"
                )
            time.sleep(0.1)

    def tail(self, lines: int = 40) -> str:
        out = self.box.exec(
            "journalctl", "--no-pager", "-o", "short-precise", "-n", str(lines), "-u", self.name,
            check=False,
        )  # fmt: skip
        return f"journalctl -u {self.name}:\n{out.stdout}{out.stderr}"


def make_rootfs(root: Path) -> tuple[Path, list[str]]:
    """A root folder for the container, and the extra `-v` binds it needs (a host that is not
    usr-merged keeps /bin, /lib ... as folders: those are bound read-only)."""
    root.mkdir(parents=True)
    subprocess.run(["cp", "-a", "/etc", str(root / "etc")], check=True)
    system = root / "etc/systemd/system"
    for wants in [*system.glob("*.wants"), *system.glob("*.requires")]:
        shutil.rmtree(wants)  # the host's enabled services: nothing of ours needs them
    (system / "default.target").unlink(missing_ok=True)
    (system / "default.target").symlink_to("/lib/systemd/system/multi-user.target")
    # The host's disks are not ours to mount (a missing device would hold the boot for 90 s).
    (root / "etc/fstab").write_text("")
    (root / "etc/crypttab").unlink(missing_ok=True)
    (root / "etc/machine-id").write_text("")  # systemd makes a transient one
    for d in ("usr", "proc", "sys", "dev", "run", "tmp", "var/tmp", "var/log", "var/lib",
              "root", "home", "srv", "opt", "mnt"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    binds = ["-v", "/usr:/usr:ro"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            (root / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            binds += ["-v", f"{host}:{host}:ro"]
    return root, binds


def _outermost(paths: list[Path]) -> list[Path]:
    """Drop paths inside another one, or inside /usr (bound anyway)."""
    out: list[Path] = []
    for path in sorted({p.resolve() for p in paths}):
        if path == Path("/usr") or Path("/usr") in path.parents:
            continue
        if not any(o == path or o in path.parents for o in out):
            out.append(path)
    return out


@contextmanager
def booted(
    workdir: Path,
    runroot: Path,
    flags: list[str],
    read_only: list[Path],
    binds: dict[Path, str],
    devices: dict[str, str],
    boot_timeout: float = 60.0,
) -> Iterator[Container]:
    """Boot /lib/systemd/systemd as PID 1 of a container; remove the container on the way out.

    runroot: podman's --runroot (at most 50 characters); read_only: host paths bound read-only
    at the same path; binds: host folder -> container path (read-write); devices: host device ->
    container path. Raises CannotRun where podman or systemd cannot run."""
    podman = shutil.which("podman")
    if podman is None or shutil.which("runc") is None:
        raise CannotRun(
            "podman/runc not installed (Debian packages podman runc; .ci/run installs them)"
        )
    if not Path("/lib/systemd/systemd").exists():
        raise CannotRun("no /lib/systemd/systemd on this host (Debian package systemd)")
    base = [podman, "--storage-driver", "vfs", "--root", str(workdir / "podman"),
            "--runroot", str(runroot)]  # fmt: skip
    rootfs, extra = make_rootfs(workdir / "rootfs")
    args = [*extra]
    for path in _outermost(read_only):
        args += ["-v", f"{path}:{path}:ro"]
    for host, inside in binds.items():
        args += ["-v", f"{host}:{inside}"]
    for host, inside in devices.items():
        args += ["--device", f"{host}:{inside}"]
    name = f"gpu-supervise-systemd-{os.getpid()}"
    subprocess.run([*base, "rm", "-f", name], capture_output=True, timeout=120)
    started = subprocess.run(
        [*base, "run", "-d", "--name", name, *flags, "--systemd=always",
         "--cap-add", "SYS_ADMIN", *args, "--rootfs", str(rootfs), "/lib/systemd/systemd"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        if started.returncode != 0:
            raise CannotRun(f"podman cannot run a container here: {started.stderr.strip()[-400:]}")
        box = Container(base, name, rootfs)
        box.wait_booted(boot_timeout)
        yield box
    finally:
        subprocess.run([*base, "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)
