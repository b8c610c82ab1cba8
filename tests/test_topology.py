"""Identity and diff rules of the topology model (pure: no NVML, no processes)."""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import assume, given
from hypothesis import strategies as st

from gpu_supervise.topology import Gpu, MigDevice, Topology, diff, profile_from_name, render_table


def mig(parent: str, gi: int, uuid: str, profile: str = "1g.5gb", slices: int = 1, mem: int = 4864):
    return MigDevice(
        index=gi,
        uuid=uuid,
        parent_uuid=parent,
        gpu_instance_id=gi,
        compute_instance_id=0,
        slices=slices,
        memory_mb=mem,
        profile=profile,
        name=f"NVIDIA A100-SXM4-40GB MIG {profile}",
    )


def gpu(index: int, uuid: str, migs: tuple[MigDevice, ...] = (), mig_on: bool | None = None):
    on = bool(migs) if mig_on is None else mig_on
    return Gpu(index, uuid, "NVIDIA A100-SXM4-40GB", f"00000000:{index:02X}:00.0", on, on, migs)


A = gpu(0, "GPU-a", (mig("GPU-a", 7, "MIG-1"), mig("GPU-a", 8, "MIG-2")))
B = gpu(1, "GPU-b")
BASE = Topology((A, B), "550.54.15")


def test_same_reading_is_same_topology():
    assert BASE.same_as(Topology((A, B), "550.54.15"))


def test_enumeration_order_never_matters():
    shuffled = Topology((replace(B, index=0), replace(A, mig_devices=A.mig_devices[::-1], index=1)))
    assert BASE.same_as(shuffled)


def test_description_and_pending_mode_and_driver_are_not_identity():
    noisy = Topology(
        (
            replace(A, name="renamed", pci_bus_id="x", mig_pending=False),
            replace(B, mig_pending=True),
        ),
        driver_version="999.0",
    )
    assert BASE.same_as(noisy)
    assert noisy.pending_mig_changes() == [noisy.gpus[0], noisy.gpus[1]]


def test_same_uuids_with_new_profile_is_a_change():
    # Reports exist of a same-profile re-creation keeping the MIG UUID; the reverse case, a
    # UUID kept across a profile change, must still count: slices and memory are identity.
    bigger = replace(
        A, mig_devices=(mig("GPU-a", 7, "MIG-1", "2g.10gb", 2, 9856), A.mig_devices[1])
    )
    new = Topology((bigger, B))
    assert not BASE.same_as(new)
    (line,) = diff(BASE, new).lines
    assert "changed 1g.5gb GI 7/CI 0 MIG-1 -> 2g.10gb GI 7/CI 0 MIG-1" in line


def test_reused_gi_id_with_new_uuid_is_a_change():
    new = Topology((replace(A, mig_devices=(mig("GPU-a", 7, "MIG-9"), A.mig_devices[1])), B))
    assert not BASE.same_as(new)


def test_mig_enable_disable_and_gpu_loss_are_changes():
    enabled = Topology((A, replace(B, mig_current=True, mig_pending=True)))
    assert not BASE.same_as(enabled)
    assert diff(BASE, enabled).lines == (f"{B.describe()}: MIG mode off -> on",)
    assert diff(BASE, enabled).is_mig_change

    lost = Topology((A,))
    change = diff(BASE, lost)
    assert not change.is_mig_change
    assert change.lines == (f"{B.describe()}: lost",)


def test_reconfiguration_reads_as_one_line_per_gpu():
    new_a = replace(
        A,
        mig_devices=(
            mig("GPU-a", 1, "MIG-x", "3g.20gb", 3, 19968),
            mig("GPU-a", 2, "MIG-y", "3g.20gb", 3, 19968),
        ),
    )
    change = diff(BASE, Topology((new_a, B)))
    (line,) = change.lines
    assert line.startswith("GPU 0 GPU-a (NVIDIA A100-SXM4-40GB): MIG devices 2x1g.5gb -> 2x3g.20gb")
    assert "removed 1g.5gb GI 7/CI 0 MIG-1, 1g.5gb GI 8/CI 0 MIG-2" in line
    assert "added 3g.20gb GI 1/CI 0 MIG-x, 3g.20gb GI 2/CI 0 MIG-y" in line


def test_nvml_absent_is_no_gpus():
    assert Topology.absent().same_as(Topology(()))
    change = diff(Topology.absent(), BASE)
    assert change.lines[0] == "NVML became usable"
    assert not change.is_mig_change


def test_uuids_list_gpus_each_followed_by_its_mig_devices():
    assert BASE.uuids() == ["GPU-a", "MIG-1", "MIG-2", "GPU-b"]


def test_json_round_trip():
    doc = json.loads(BASE.dumps())
    assert doc["schema"] == 1
    assert Topology.from_json(doc) == BASE


def test_profile_from_device_name():
    assert profile_from_name("NVIDIA A100-SXM4-40GB MIG 1g.5gb") == "1g.5gb"
    assert profile_from_name("NVIDIA H100 80GB HBM3 MIG 1c.3g.40gb") == "1c.3g.40gb"
    assert profile_from_name("NVIDIA H200 MIG 1g.18gb+me") == "1g.18gb+me"
    assert profile_from_name("NVIDIA A100-SXM4-40GB") == ""


def test_table_marks_pending_mode():
    pending = Topology((replace(B, mig_pending=True),))
    assert "off (pending on: needs GPU reset)" in render_table(pending)
    assert render_table(Topology.absent()) == "No GPUs. (no usable NVML)"


# -- properties -------------------------------------------------------------------------------

uuids = st.uuids().map(str)


@st.composite
def topologies(draw):
    n = draw(st.integers(0, 4))
    gpus = []
    for i, gu in enumerate(draw(st.lists(uuids, min_size=n, max_size=n, unique=True))):
        parent = "GPU-" + gu
        gis = draw(st.lists(st.integers(0, 14), max_size=7, unique=True))
        migs = tuple(
            mig(parent, g, "MIG-" + draw(uuids), slices=draw(st.integers(1, 7))) for g in gis
        )
        gpus.append(gpu(i, parent, migs, mig_on=bool(migs) or draw(st.booleans())))
    return Topology(tuple(gpus))


@given(topologies(), st.randoms())
def test_any_permutation_is_the_same_topology(topo, rnd):
    gpus = [
        replace(g, mig_devices=tuple(rnd.sample(g.mig_devices, len(g.mig_devices))))
        for g in topo.gpus
    ]
    rnd.shuffle(gpus)
    assert topo.same_as(Topology(tuple(gpus), driver_version="other"))
    assert diff(topo, Topology(tuple(gpus))).lines == ()


FIELDS = {
    "uuid": lambda m: replace(m, uuid=m.uuid + "x"),
    "gpu_instance_id": lambda m: replace(m, gpu_instance_id=m.gpu_instance_id + 100),
    "compute_instance_id": lambda m: replace(m, compute_instance_id=m.compute_instance_id + 1),
    "slices": lambda m: replace(m, slices=m.slices + 1),
    "memory_mb": lambda m: replace(m, memory_mb=m.memory_mb + 1),
}


@given(topologies(), st.sampled_from(sorted(FIELDS)), st.integers(0, 1000))
def test_any_change_of_a_mig_device_is_a_change(topo, field, pick):
    with_migs = [g for g in topo.gpus if g.mig_devices]
    assume(with_migs)
    target = with_migs[pick % len(with_migs)]
    devices = list(target.mig_devices)
    devices[pick % len(devices)] = FIELDS[field](devices[pick % len(devices)])
    changed = Topology(
        tuple(replace(g, mig_devices=tuple(devices)) if g is target else g for g in topo.gpus)
    )
    assert not topo.same_as(changed)
    assert diff(topo, changed).lines


@given(topologies())
def test_json_round_trip_any(topo):
    assert Topology.from_json(json.loads(topo.dumps())).same_as(topo)
