"""The GPU topology model: what a node's GPUs and MIG devices are, and when two readings differ.

A `Topology` is what one probe saw. Its `identity` is the part that matters to an agent
holding NVML handles: which GPUs exist, whether MIG is on for each, and which MIG devices exist
with which ids and profile. Everything else a probe may carry (names, bus ids, the pending MIG
mode, the driver version) is description, and mere state (temperature, clocks, P-state) is never
read at all, so it cannot make two readings differ.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

SCHEMA_VERSION = 1


class SourceUnavailable(Exception):
    """The node has no usable NVML (no driver, library missing): a state, not a failure."""


class ProbeError(Exception):
    """A probe that was attempted and failed: counts towards the failure threshold."""


class NvmlRefused(ProbeError):
    """NVML refused to start for any process, the agent included (no permission, a library that
    does not match the driver). Before any good reading: the agent started without NVML."""


@dataclass(frozen=True)
class MigDevice:
    """One MIG device (a compute instance inside a GPU instance) as NVML enumerates it."""

    index: int
    uuid: str
    parent_uuid: str
    gpu_instance_id: int
    compute_instance_id: int
    slices: int
    memory_mb: int
    profile: str
    name: str = ""

    def key(self) -> tuple[str, int, int, str, int, int]:
        """Identity of the device. GI ids are reused at once after a reconfiguration and a
        same-profile re-creation can keep the MIG UUID, so neither alone is enough."""
        return (
            self.parent_uuid,
            self.gpu_instance_id,
            self.compute_instance_id,
            self.uuid,
            self.slices,
            self.memory_mb,
        )

    def describe(self) -> str:
        return (
            f"{self.profile or '?'} GI {self.gpu_instance_id}/CI {self.compute_instance_id} "
            f"{self.uuid}"
        )


@dataclass(frozen=True)
class Gpu:
    """A physical GPU. `mig_current`/`mig_pending` are None where the GPU does not support MIG."""

    index: int
    uuid: str
    name: str = ""
    pci_bus_id: str = ""
    mig_current: bool | None = None
    mig_pending: bool | None = None
    mig_devices: tuple[MigDevice, ...] = ()

    @property
    def mig_enabled(self) -> bool:
        return bool(self.mig_current)

    @property
    def mig_change_pending(self) -> bool:
        """A mode change was requested and waits for a GPU reset: on its way, not yet real."""
        return self.mig_pending is not None and self.mig_pending != self.mig_current

    def describe(self) -> str:
        return f"GPU {self.index} {self.uuid}" + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True)
class Topology:
    """One reading of the node. `nvml` is False when the node had no usable NVML."""

    gpus: tuple[Gpu, ...] = ()
    driver_version: str = ""
    nvml: bool = True

    @classmethod
    def absent(cls) -> Topology:
        """No usable NVML: the same topology as a node with no GPUs."""
        return cls(nvml=False)

    @cached_property
    def identity(self) -> frozenset[tuple[Any, ...]]:
        """Computed once per reading: the baseline is compared against every probe."""
        ident: set[tuple[Any, ...]] = set()
        for gpu in self.gpus:
            ident.add(("gpu", gpu.uuid, gpu.mig_enabled))
            for mig in gpu.mig_devices:
                ident.add(("mig", *mig.key()))
        return frozenset(ident)

    def same_as(self, other: Topology) -> bool:
        return self.identity == other.identity

    def uuids(self) -> list[str]:
        """Every GPU UUID, each followed by its MIG devices' UUIDs, in a stable order."""
        out: list[str] = []
        for gpu in sorted(self.gpus, key=lambda g: (g.index, g.uuid)):
            out.append(gpu.uuid)
            out.extend(m.uuid for m in sorted(gpu.mig_devices, key=_mig_order))
        return out

    def summary(self) -> str:
        """A one-line layout, e.g. `GPU 0: MIG 7x1g.5gb; GPU 1: MIG off`."""
        if not self.gpus:
            return "no GPUs" + ("" if self.nvml else " (no usable NVML)")
        parts = []
        for gpu in sorted(self.gpus, key=lambda g: g.index):
            if gpu.mig_enabled:
                layout = _profile_counts(gpu.mig_devices) or "on, no devices"
                parts.append(f"GPU {gpu.index}: MIG {layout}")
            else:
                parts.append(f"GPU {gpu.index}: MIG off")
        return "; ".join(parts)

    def pending_mig_changes(self) -> list[Gpu]:
        return [g for g in self.gpus if g.mig_change_pending]

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "nvml": self.nvml,
            "driver_version": self.driver_version,
            "gpus": [
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "pci_bus_id": g.pci_bus_id,
                    "mig": {"current": g.mig_current, "pending": g.mig_pending},
                    "mig_devices": [
                        {
                            "index": m.index,
                            "uuid": m.uuid,
                            "gpu_instance_id": m.gpu_instance_id,
                            "compute_instance_id": m.compute_instance_id,
                            "slices": m.slices,
                            "memory_mb": m.memory_mb,
                            "profile": m.profile,
                            "name": m.name,
                        }
                        for m in sorted(g.mig_devices, key=_mig_order)
                    ],
                }
                for g in sorted(self.gpus, key=lambda g: g.index)
            ],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, doc: Any) -> Topology:
        """Read the document `snapshot --json` writes. Raises ValueError with the reason."""
        try:
            if not isinstance(doc, dict):
                raise ValueError("the document is not a JSON object")
            if doc.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
                raise ValueError(f"unsupported schema {doc.get('schema')!r}")
            gpus = []
            for g in doc.get("gpus", []):
                # A hand-written document that lists MIG devices means MIG on.
                mig = g.get("mig") or ({"current": True} if g.get("mig_devices") else {})
                gpus.append(
                    Gpu(
                        index=int(g["index"]),
                        uuid=str(g["uuid"]),
                        name=str(g.get("name", "")),
                        pci_bus_id=str(g.get("pci_bus_id", "")),
                        mig_current=_opt_bool(mig.get("current")),
                        mig_pending=_opt_bool(mig.get("pending", mig.get("current"))),
                        mig_devices=tuple(
                            MigDevice(
                                index=int(m.get("index", i)),
                                uuid=str(m["uuid"]),
                                parent_uuid=str(g["uuid"]),
                                gpu_instance_id=int(m["gpu_instance_id"]),
                                compute_instance_id=int(m["compute_instance_id"]),
                                slices=int(m.get("slices", 0)),
                                memory_mb=int(m.get("memory_mb", 0)),
                                profile=str(m.get("profile", "")),
                                name=str(m.get("name", "")),
                            )
                            for i, m in enumerate(g.get("mig_devices", []))
                        ),
                    )
                )
            return cls(
                gpus=tuple(gpus),
                driver_version=str(doc.get("driver_version", "")),
                nvml=bool(doc.get("nvml", True)),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed topology document ({type(exc).__name__}: {exc})") from None


def _opt_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _mig_order(m: MigDevice) -> tuple[int, int, int, str]:
    return (m.index, m.gpu_instance_id, m.compute_instance_id, m.uuid)


def _profile_counts(devices: tuple[MigDevice, ...] | list[MigDevice]) -> str:
    counts: dict[str, int] = {}
    for m in sorted(devices, key=_mig_order):
        counts[m.profile or "?"] = counts.get(m.profile or "?", 0) + 1
    return ", ".join(f"{n}x{p}" for p, n in counts.items())


_PROFILE_RE = re.compile(r"\bMIG\s+(\S+)")


def profile_from_name(name: str) -> str:
    """`NVIDIA A100-SXM4-40GB MIG 1g.5gb` → `1g.5gb` (also `1c.3g.20gb`, `1g.10gb+me`)."""
    match = _PROFILE_RE.search(name)
    return match.group(1) if match else ""


# -- diff -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """What differs between two topologies, per GPU, for a person reading a log."""

    old: Topology
    new: Topology
    gpu_lines: tuple[tuple[str, str], ...] = field(default=())  # (GPU UUID or "", line)

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(line for _, line in self.gpu_lines)

    @property
    def is_mig_change(self) -> bool:
        """Same physical GPUs: only MIG modes or MIG devices changed."""
        return {g.uuid for g in self.old.gpus} == {g.uuid for g in self.new.gpus}


def diff(old: Topology, new: Topology) -> Change:
    return Change(old=old, new=new, gpu_lines=tuple(_diff_lines(old, new)))


def _diff_lines(old: Topology, new: Topology) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    old_by_uuid = {g.uuid: g for g in old.gpus}
    new_by_uuid = {g.uuid: g for g in new.gpus}
    if old.nvml != new.nvml:
        lines.append(("", "NVML became usable" if new.nvml else "NVML is no longer usable"))
    for uuid in sorted(old_by_uuid.keys() - new_by_uuid.keys(), key=lambda u: old_by_uuid[u].index):
        gpu = old_by_uuid[uuid]
        lines.append((uuid, f"{gpu.describe()}: lost" + _mig_suffix(gpu)))
    for uuid in sorted(new_by_uuid.keys() - old_by_uuid.keys(), key=lambda u: new_by_uuid[u].index):
        gpu = new_by_uuid[uuid]
        lines.append((uuid, f"{gpu.describe()}: added" + _mig_suffix(gpu)))
    for uuid in sorted(old_by_uuid.keys() & new_by_uuid.keys(), key=lambda u: new_by_uuid[u].index):
        lines.extend((uuid, line) for line in _gpu_diff(old_by_uuid[uuid], new_by_uuid[uuid]))
    return lines


def _mig_suffix(gpu: Gpu) -> str:
    if not gpu.mig_enabled:
        return ""
    return f" (MIG {_profile_counts(gpu.mig_devices) or 'on, no devices'})"


def _gpu_diff(old: Gpu, new: Gpu) -> list[str]:
    """One line for a GPU whose MIG mode or devices changed; none when only state did."""
    parts: list[str] = []
    if old.mig_enabled != new.mig_enabled:
        parts.append(f"MIG mode {onoff(old.mig_enabled)} -> {onoff(new.mig_enabled)}")
    old_keys = {m.key(): m for m in old.mig_devices}
    new_keys = {m.key(): m for m in new.mig_devices}
    removed = sorted((old_keys[k] for k in old_keys.keys() - new_keys.keys()), key=_mig_order)
    added = sorted((new_keys[k] for k in new_keys.keys() - old_keys.keys()), key=_mig_order)
    # A removed and an added device on the same GI/CI ids read best as one "changed" device:
    # that is what a reconfiguration reusing GI ids looks like.
    changed = []
    for r in list(removed):
        twin = next((a for a in added if _slot(a) == _slot(r)), None)
        if twin is not None:
            changed.append(f"{r.describe()} -> {twin.describe()}")
            removed.remove(r)
            added.remove(twin)
    if removed or added or changed:
        before = _profile_counts(old.mig_devices) or "none"
        after = _profile_counts(new.mig_devices) or "none"
        parts.append(f"MIG devices {before} -> {after}")
    if removed:
        parts.append("removed " + ", ".join(m.describe() for m in removed))
    if changed:
        parts.append("changed " + ", ".join(changed))
    if added:
        parts.append("added " + ", ".join(m.describe() for m in added))
    return [f"{new.describe()}: " + "; ".join(parts)] if parts else []


def _slot(m: MigDevice) -> tuple[int, int]:
    return (m.gpu_instance_id, m.compute_instance_id)


def onoff(flag: bool | None) -> str:
    return "on" if flag else "off"


# -- rendering --------------------------------------------------------------------------------


def render_table(topo: Topology) -> str:
    """The compact table `gpu-supervise snapshot` prints for a person."""
    if not topo.gpus:
        return "No GPUs." + ("" if topo.nvml else " (no usable NVML)")
    rows = [("GPU", "NAME / PROFILE", "UUID", "BUS ID / GI:CI", "MIG")]
    for gpu in sorted(topo.gpus, key=lambda g: g.index):
        if gpu.mig_current is None:
            mig = "n/a"
        else:
            mig = onoff(gpu.mig_enabled)
            if gpu.mig_change_pending:
                mig += f" (pending {onoff(bool(gpu.mig_pending))}: needs GPU reset)"
        rows.append((str(gpu.index), gpu.name, gpu.uuid, gpu.pci_bus_id, mig))
        for m in sorted(gpu.mig_devices, key=_mig_order):
            rows.append(
                (
                    f"  {gpu.index}:{m.index}",
                    f"  {m.profile or '?'} ({m.slices} slice{'s' if m.slices != 1 else ''}, "
                    f"{m.memory_mb} MiB)",
                    m.uuid,
                    f"  {m.gpu_instance_id}:{m.compute_instance_id}",
                    "",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if topo.driver_version:
        lines.append(f"Driver {topo.driver_version}")
    return "\n".join(lines)
