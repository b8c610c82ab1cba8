"""Test builders for the fake libnvidia-ml.so.1: describe a node in Python, write it to the file
the library reads at every nvmlInit, and build the library itself from fake_nvml.c.

In the spirit of k8s-device-plugin's test builders: tests say `dgx_a100(["1g.5gb"] * 7)` and
never spell out NVML return codes or structs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_nvml.c")

# NVML return codes tests inject.
UNKNOWN = 999
GPU_IS_LOST = 15
TIMEOUT = 10
LIB_RM_VERSION_MISMATCH = 18
DRIVER_NOT_LOADED = 9
NOT_SUPPORTED = 3

# Profile name -> (GPU-instance slices, memory MiB, GPU-instance ids available in placement
# order). Memory sizes are close to what the drivers report; ids follow NVIDIA's placements.
A100_40GB = {
    "1g.5gb": (1, 4864, list(range(7, 15))),
    "2g.10gb": (2, 9856, [3, 4, 5, 6]),
    "3g.20gb": (3, 19968, [1, 2]),
    "4g.20gb": (4, 19968, [5]),
    "7g.40gb": (7, 40192, [0]),
}
H100_80GB = {
    "1g.10gb": (1, 9984, list(range(7, 15))),
    "1g.20gb": (1, 19968, [11, 12, 13, 14]),
    "2g.20gb": (2, 20096, [3, 4, 5, 6]),
    "3g.40gb": (3, 40320, [1, 2]),
    "4g.40gb": (4, 40320, [5]),
    "7g.80gb": (7, 80896, [0]),
}
H200 = {
    "1g.18gb": (1, 16384, list(range(7, 15))),
    "1g.35gb": (1, 32768, [11, 12, 13, 14]),
    "2g.35gb": (2, 32768, [3, 4, 5, 6]),
    "3g.71gb": (3, 71424, [1, 2]),
    "4g.71gb": (4, 71424, [5]),
    "7g.141gb": (7, 143360, [0]),
}
MODELS = {
    "NVIDIA A100-SXM4-40GB": A100_40GB,
    "NVIDIA H100 80GB HBM3": H100_80GB,
    "NVIDIA H200": H200,
}
# Hopper and later: a MIG mode change takes effect at once, with no GPU reset.
HOPPER = {"NVIDIA H100 80GB HBM3", "NVIDIA H200"}


def det_uuid(*parts: object) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, "/".join(map(str, parts))))


@dataclass
class Mig:
    index: int
    uuid: str
    gi: int
    ci: int
    slices: int
    mem: int
    name: str


@dataclass
class FakeGpu:
    """One GPU. The MIG mode rules follow its model (`name`): on an A100 (Ampere) a requested
    MIG mode stays pending until a GPU reset; on an H100 or H200 (Hopper) it takes effect at
    once, current = pending, as the driver does there with no reset. `mode_needs_reset` set
    to True or False overrides the model's rule."""

    index: int
    uuid: str
    name: str
    bus: str
    mig: int = 0  # -1: MIG not supported, 0 off, 1 on
    pending: int | None = None
    maxmig: int = 7
    temp: int = 35
    pstate: int = 0
    events: int = 0x100 | 0x8  # MIG config change, Xid critical error
    migs: list[Mig] = field(default_factory=list)
    mode_needs_reset: bool | None = None  # None: as the model does
    created: int = 0  # instances created by create_instance: each gets a fresh UUID

    @property
    def needs_reset(self) -> bool:
        """Whether a MIG mode change waits for a GPU reset on this GPU."""
        if self.mode_needs_reset is not None:
            return self.mode_needs_reset
        return self.name not in HOPPER

    @property
    def mig_uuids(self) -> list[str]:
        return [m.uuid for m in sorted(self.migs, key=lambda m: m.index)]

    def set_layout(self, profiles: list[str] | None, salt: str = "", sparse: bool = True) -> None:
        """MIG on with these profiles (None: MIG off). New instances get fresh UUIDs unless
        the same salt is given again (same-profile re-creation keeping the UUID)."""
        if profiles is None:
            self.mig, self.pending, self.migs = 0, None, []
            return
        table = MODELS[self.name]
        used: set[int] = set()
        migs = []
        n = len(profiles)
        step = max(1, self.maxmig // n) if sparse and n else 1
        for pos, profile in enumerate(profiles):
            slices, mem, gis = table[profile]
            gi = next(g for g in gis if g not in used)
            used.add(gi)
            migs.append(
                Mig(
                    index=pos * step if pos * step < self.maxmig else pos,
                    uuid="MIG-" + det_uuid(self.uuid, gi, 0, profile, salt),
                    gi=gi,
                    ci=0,
                    slices=slices,
                    mem=mem,
                    name=f"{self.name} MIG {profile}",
                )
            )
        self.mig, self.pending, self.migs = 1, None, migs

    def request_mig(self, on: bool) -> None:
        """`nvidia-smi -i N -mig 1|0`: on an Ampere GPU the new mode waits for a GPU reset; on
        Hopper it is current at once, with no instances (nothing is pending)."""
        if self.needs_reset:
            self.pending = int(on)
        elif self.mig != int(on):
            self.mig, self.pending, self.migs = int(on), None, []

    def create_instance(self, profile: str) -> Mig:
        """A GPU instance with one compute instance, as `nvidia-smi mig -cgi PROFILE -C` makes
        it: the lowest GI id of the profile's placements that no instance holds (ids are reused
        at once), the lowest free MIG device index, a fresh UUID. Raises ValueError when MIG is
        off or the GPU has no room left (slices are counted, placements are not overlapped)."""
        if self.mig != 1:
            raise ValueError(f"GPU {self.index}: MIG is off")
        slices, mem, gis = MODELS[self.name][profile]
        used = {m.gi for m in self.migs}
        free = [g for g in gis if g not in used]
        if not free or sum(m.slices for m in self.migs) + slices > self.maxmig:
            raise ValueError(f"GPU {self.index}: no room for {profile}")
        index = min(set(range(self.maxmig)) - {m.index for m in self.migs})
        self.created += 1
        mig = Mig(
            index=index,
            uuid="MIG-" + det_uuid(self.uuid, free[0], 0, profile, "created", self.created),
            gi=free[0],
            ci=0,
            slices=slices,
            mem=mem,
            name=f"{self.name} MIG {profile}",
        )
        self.migs.append(mig)
        return mig

    def destroy_instance(self, mig_uuid: str) -> None:
        """`nvidia-smi mig -dci -dgi` of the instance with this UUID (KeyError if none)."""
        mig = next((m for m in self.migs if m.uuid == mig_uuid), None)
        if mig is None:
            raise KeyError(mig_uuid)
        self.migs.remove(mig)

    def reset(self) -> None:
        """What a successful GPU reset does: the pending mode becomes current, with no MIG
        instances (an operator or mig-parted creates them next)."""
        if self.pending is not None:
            self.mig, self.pending, self.migs = self.pending, None, []


@dataclass
class Node:
    gpus: list[FakeGpu]
    driver: str = "550.54.15"
    rules: list[str] = field(default_factory=list)

    def gpu(self, index: int) -> FakeGpu:
        return next(g for g in self.gpus if g.index == index)

    def uuids(self) -> list[str]:
        out = []
        for g in sorted(self.gpus, key=lambda g: g.index):
            out.append(g.uuid)
            if g.mig == 1:
                out.extend(g.mig_uuids)
        return out

    # fault injection: each returns self so a test reads as one sentence
    def fail(self, fn: str = "*", code: int = UNKNOWN, count: int = -1) -> Node:
        self.rules.append(f"fail fn={fn} code={code} count={count}")
        return self

    def delay(self, ms: int, fn: str = "*") -> Node:
        self.rules.append(f"delay fn={fn} ms={ms}")
        return self

    def hang(self, fn: str) -> Node:
        self.rules.append(f"hang fn={fn}")
        return self

    def healthy(self) -> Node:
        self.rules = []
        return self

    def render(self) -> str:
        lines = [f"driver {_q(self.driver)}", f"nvml 12.{self.driver}"]
        for g in self.gpus:
            pending = g.mig if g.pending is None else g.pending
            lines.append(
                f"gpu index={g.index} uuid={_q(g.uuid)} name={_q(g.name)} bus={_q(g.bus)} "
                f"mig={g.mig} pending={pending} maxmig={g.maxmig} temp={g.temp} "
                f"pstate={g.pstate} events={g.events:#x}"
            )
            for m in g.migs:
                lines.append(
                    f"mig gpu={g.index} index={m.index} uuid={_q(m.uuid)} gi={m.gi} ci={m.ci} "
                    f"slices={m.slices} mem={m.mem} name={_q(m.name)}"
                )
        lines.extend(self.rules)
        return "\n".join(lines) + "\n"

    def write(self, path: Path) -> None:
        """Atomic rewrite, so a probe never reads half a file; then the driver's procfs tree
        beside it (procfs_root) is brought in step, as the driver does inside the very call that
        creates or destroys an instance. A destroy and re-create with the same ids (new UUIDs)
        leaves the tree as it was, as on a real driver: only the poll sees it."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.render())
        os.replace(tmp, path)
        sync_tree(procfs_root(path), self.procfs())

    def procfs(self) -> dict[str, str]:
        """The driver's tree for this node: relative path -> file content ("/" ends a folder).
        gpu<M>/mig/ for every GPU (M the device minor: here the index), gi<G>/access and
        gi<G>/ci<C>/access for every instance of a GPU in MIG mode, gpus/<bus id>/."""
        tree = {"capabilities/": "", "capabilities/mig/": "", "gpus/": ""}
        tree["capabilities/mig/config"] = _access(1)
        tree["capabilities/mig/monitor"] = _access(2)
        for g in self.gpus:
            mig = f"capabilities/gpu{g.index}/mig/"
            tree[f"capabilities/gpu{g.index}/"] = ""
            tree[mig] = ""
            bus = g.bus[4:].lower() if len(g.bus) > 12 else g.bus.lower()  # 0000:07:00.0
            tree[f"gpus/{bus}/"] = ""
            tree[f"gpus/{bus}/information"] = f"Model: \t\t {g.name}\nDevice Minor: \t {g.index}\n"
            if g.mig != 1:
                continue
            for m in g.migs:
                tree[f"{mig}gi{m.gi}/"] = ""
                tree[f"{mig}gi{m.gi}/access"] = _access(100 + m.gi)
                tree[f"{mig}gi{m.gi}/ci{m.ci}/"] = ""
                tree[f"{mig}gi{m.gi}/ci{m.ci}/access"] = _access(200 + m.gi * 8 + m.ci)
        return tree

    def dra_prepare(self, path: Path, index: int, profile: str) -> str:
        """What NVIDIA's DRA driver (DynamicMIG) does when a claim for a MIG device of GPU
        `index` is prepared: MIG on if it is off (at once on Hopper; on an A100 the mode would
        wait for a reset, so ValueError), then one instance of `profile`; the node file and its
        procfs tree are written in the same step. Returns the new instance's UUID."""
        gpu = self.gpu(index)
        if gpu.mig != 1:
            if gpu.needs_reset:
                raise ValueError(f"GPU {index}: MIG mode on needs a GPU reset on {gpu.name}")
            gpu.request_mig(True)
        mig = gpu.create_instance(profile)
        self.write(path)
        return mig.uuid

    def dra_release(self, path: Path, index: int, mig_uuid: str) -> None:
        """The claim released: its instance destroyed and, on Hopper, MIG off once the last
        instance is gone (an A100 stays in MIG mode: turning it off would need a reset)."""
        gpu = self.gpu(index)
        gpu.destroy_instance(mig_uuid)
        if not gpu.migs and not gpu.needs_reset:
            gpu.request_mig(False)
        self.write(path)

    def copy(self) -> Node:
        return Node(
            gpus=[replace(g, migs=list(g.migs)) for g in self.gpus],
            driver=self.driver,
            rules=list(self.rules),
        )


def procfs_root(node_path: Path) -> Path:
    """Where the fake keeps the driver's procfs tree for a node file (the tests point
    gpu-supervise's watch.procfs_root there)."""
    return Path(f"{node_path}.procfs")


def _access(minor: int) -> str:
    """An `access` file of the driver's capabilities tree: its content never changes."""
    return f"DeviceFileMinor: {minor}\nDeviceFileMode: 292\nDeviceFileModify: 1\n"


def sync_tree(root: Path, tree: dict[str, str]) -> None:
    """Make the folder `root` hold exactly `tree`, touching only what differs: a listing taken
    meanwhile sees entries come and go, never the whole tree rebuilt."""
    wanted = {root / rel.rstrip("/"): content for rel, content in tree.items()}
    folders = {root / rel.rstrip("/") for rel in tree if rel.endswith("/")}
    if root.is_dir():
        for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path not in wanted:
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    for path in sorted(folders, key=lambda p: len(p.parts)):
        path.mkdir(parents=True, exist_ok=True)
    for path, content in wanted.items():
        if path not in folders and not path.exists():
            path.write_bytes(content.encode("utf-8", "surrogateescape"))  # any byte in a name


def _q(text: str) -> str:
    """A quoted node-file value. Anything but printable ASCII goes as \\xHH bytes, so a test can
    give NVML a name that is not UTF-8 ("\\udcff" stands for the byte 0xff) or holds ESC."""
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        char = chr(byte)
        out.append(char if 0x20 <= byte < 0x7F and char not in '"\\' else f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def holders(node_path: Path) -> list[int]:
    """The live processes that hold NVML open on the fake node (the fake registers them on
    nvmlInit and forgets them on the balancing nvmlShutdown), as pids of this PID namespace.
    A process in a container registers its own namespace's pid: it is matched by the last pid
    of its NSpid line and its start time, which reads the same from every namespace. A pid
    that exited, or whose number was reused since, does not count; nor does a zombie, which
    closed its files."""
    folder = Path(f"{node_path}.holders")
    registered = set()
    for entry in folder.glob("*") if folder.is_dir() else []:
        try:
            registered.add((entry.name, entry.read_text().strip()))
        except FileNotFoundError:
            continue
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")) if registered else []:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspid = next((ln.split()[-1] for ln in status.splitlines() if ln.startswith("NSpid:")), pid)
        if stat[0] != "Z" and (nspid, stat[19]) in registered:
            found.append(int(pid))
    return sorted(found)


class ResetRefused(Exception):
    """The GPU is in use by another client."""


def reset_gpu(node_path: Path, node: Node, index: int, timeout: float = 60.0) -> float:
    """Play `nvidia-smi -r -i INDEX` the way an operator or mig-parted retries it: refused
    while any process other than this one holds NVML, as the driver refuses it. On success the
    pending MIG mode becomes current and the node file is rewritten. Returns the seconds it
    took; raises ResetRefused when the GPU stayed in use for `timeout`."""
    started = time.monotonic()
    while True:
        others = [pid for pid in holders(node_path) if pid != os.getpid()]
        if not others:
            node.gpu(index).reset()
            node.write(node_path)
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise ResetRefused(f"GPU {index} is in use by another client: pids {others}")
        time.sleep(0.1)


def _node(name: str, count: int, layouts: list[list[str] | None] | None, tag: str) -> Node:
    gpus = []
    layouts = layouts if layouts is not None else [None] * count
    for i in range(count):
        gpu = FakeGpu(
            index=i,
            uuid="GPU-" + det_uuid(tag, i),
            name=name,
            bus=f"00000000:{0x07 + i * 0x10:02X}:00.0",
        )
        gpu.set_layout(layouts[i] if i < len(layouts) else None)
        gpus.append(gpu)
    return Node(gpus)


def dgx_a100(*layouts: list[str] | None, count: int = 8) -> Node:
    """8x A100-SXM4-40GB; layouts[i] is GPU i's MIG profiles (None or missing: MIG off)."""
    return _node("NVIDIA A100-SXM4-40GB", count, list(layouts), "dgx-a100")


def h100_node(*layouts: list[str] | None, count: int = 8) -> Node:
    return _node("NVIDIA H100 80GB HBM3", count, list(layouts), "hgx-h100")


def h200_node(*layouts: list[str] | None, count: int = 1) -> Node:
    return _node("NVIDIA H200", count, list(layouts), "h200")


def build_library(out_dir: Path, nvml_include: Path | None = None, source: Path = SOURCE) -> Path:
    """Compile fake_nvml.c into out_dir/libnvidia-ml.so.1 (the loader's name for NVML).

    With `nvml_include` (a folder holding NVIDIA's nvml.h) the source is compiled against the
    header as well (-DFAKE_NVML_CHECK_HEADER): an entry point or a struct that differs from
    NVML's fails the build, and so does any warning, or an exported function nvml.h does not
    declare. Without it the fake needs nothing but a C compiler, as every other test builds it.
    A failed build raises RuntimeError with the compiler's messages; `source` lets a test build
    a copy with a planted mistake."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / "libnvidia-ml.so.1"
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc) to build the fake NVML; .ci/run installs it")
    flags = ["-shared", "-fPIC", "-O2", "-Wall", "-Wno-format-truncation", "-pthread"]
    if nvml_include is not None:
        flags += ["-DFAKE_NVML_CHECK_HEADER", "-I", str(nvml_include)]
        # -Wall of GCC 13 and later also tells an enum from the unsigned int C deems compatible
        # with it (-Wenum-int-mismatch); GCC 12 accepts that mismatch, which is ABI-identical.
        flags += ["-Werror", "-Wmissing-prototypes"]
    cmd = [cc, *flags, "-o", str(lib), str(source)]
    # LC_ALL=C: the compiler's messages in English, as tests read them
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}{out.stderr}")
    if out.stdout or out.stderr:  # warnings stay as visible as they were
        os.write(2, (out.stdout + out.stderr).encode())
    return lib
