"""Identity and diff rules of the topology model (pure: no NVML, no processes)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
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


def test_diff_lines_word_for_word():
    """Every line a change can give, exactly, so the log and the termination message read the
    same from one release to the next."""
    unnamed = Gpu(2, "GPU-c", "", "bus", True, True, ())
    on_empty = replace(B, mig_current=True, mig_pending=True)
    gained = replace(on_empty, mig_devices=(mig("GPU-b", 9, "MIG-3"), mig("GPU-b", 10, "MIG-4")))
    two_changed = replace(
        A,
        mig_devices=(
            mig("GPU-a", 7, "MIG-5", "2g.10gb", 2, 9856),
            mig("GPU-a", 8, "MIG-6", "2g.10gb", 2, 9856),
        ),
    )
    no_profile = replace(A, mig_devices=(replace(A.mig_devices[0], profile=""),))
    unprofiled = replace(A, mig_devices=tuple(replace(m, profile="") for m in A.mig_devices))
    cases = [
        (BASE, Topology((A, on_empty)), [("GPU-b", f"{B.describe()}: MIG mode off -> on")]),
        (Topology((A, on_empty)), BASE, [("GPU-b", f"{B.describe()}: MIG mode on -> off")]),
        (
            Topology((A, on_empty)),
            Topology((A, gained)),
            [("GPU-b", f"{B.describe()}: MIG devices none -> 2x1g.5gb; added 1g.5gb GI 9/CI 0 "
                       "MIG-3, 1g.5gb GI 10/CI 0 MIG-4")],
        ),
        (
            BASE,
            Topology((two_changed, B)),
            [("GPU-a", f"{A.describe()}: MIG devices 2x1g.5gb -> 2x2g.10gb; changed "
                       "1g.5gb GI 7/CI 0 MIG-1 -> 2g.10gb GI 7/CI 0 MIG-5, "
                       "1g.5gb GI 8/CI 0 MIG-2 -> 2g.10gb GI 8/CI 0 MIG-6")],
        ),
        (  # the profile is description (read from the name): only MIG-2's loss is a change
            BASE,
            Topology((no_profile, B)),
            [("GPU-a", f"{A.describe()}: MIG devices 2x1g.5gb -> 1x?; removed 1g.5gb GI 8/CI 0 "
                       "MIG-2")],
        ),
        (
            Topology((A, B)),
            Topology((A, B, unnamed, replace(on_empty, index=3, uuid="GPU-0"))),
            [("GPU-c", "GPU 2 GPU-c: added (MIG on, no devices)"),
             ("GPU-0", "GPU 3 GPU-0 (NVIDIA A100-SXM4-40GB): added (MIG on, no devices)")],
        ),
        (
            Topology((A, B, unnamed, replace(gained, index=3, uuid="GPU-0"))),
            Topology(()),
            [("GPU-a", f"{A.describe()}: lost (MIG 2x1g.5gb)"), ("GPU-b", f"{B.describe()}: lost"),
             ("GPU-c", "GPU 2 GPU-c: lost (MIG on, no devices)"),
             ("GPU-0", "GPU 3 GPU-0 (NVIDIA A100-SXM4-40GB): lost (MIG 2x1g.5gb)")],
        ),
        (  # instances destroyed; two GPUs whose UUIDs sort the other way from their indices
            Topology((replace(A, uuid="GPU-z"), gained)),
            Topology((replace(A, uuid="GPU-z", mig_devices=()), on_empty)),
            [("GPU-z", "GPU 0 GPU-z (NVIDIA A100-SXM4-40GB): MIG devices 2x1g.5gb -> none; "
                       "removed 1g.5gb GI 7/CI 0 MIG-1, 1g.5gb GI 8/CI 0 MIG-2"),
             ("GPU-b", f"{B.describe()}: MIG devices 2x1g.5gb -> none; removed 1g.5gb GI 9/CI 0 "
                       "MIG-3, 1g.5gb GI 10/CI 0 MIG-4")],
        ),
        (  # two devices whose name gave no profile
            Topology((replace(A, mig_devices=()), B)),
            Topology((unprofiled, B)),
            [("GPU-a", f"{A.describe()}: MIG devices none -> 2x?; added ? GI 7/CI 0 MIG-1, "
                       "? GI 8/CI 0 MIG-2")],
        ),
        (Topology.absent(), Topology(()), [("", "NVML became usable")]),
        (Topology(()), Topology.absent(), [("", "NVML is no longer usable")]),
    ]  # fmt: skip
    for old, new, lines in cases:
        assert list(diff(old, new).gpu_lines) == lines


def test_the_profiles_of_a_layout_are_counted_in_order():
    mixed = replace(
        A,
        mig_devices=(
            mig("GPU-a", 1, "MIG-x", "3g.20gb", 3, 19968),
            mig("GPU-a", 7, "MIG-1"),
            mig("GPU-a", 8, "MIG-2"),
            replace(mig("GPU-a", 9, "MIG-3"), profile=""),
        ),
    )
    assert Topology((mixed, B)).summary() == "GPU 0: MIG 1x3g.20gb, 2x1g.5gb, 1x?; GPU 1: MIG off"


def test_no_usable_nvml_is_a_topology_of_its_own():
    absent = Topology.absent()
    assert (absent.gpus, absent.driver_version, absent.nvml) == ((), "", False)
    assert absent.summary() == "no GPUs (no usable NVML)" and Topology(()).summary() == "no GPUs"


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


def test_the_json_document_defaults_what_a_hand_written_one_leaves_out():
    """The file source reads documents operators edit by hand: only identity is required."""
    doc = {
        "gpus": [
            {"index": 1, "uuid": "GPU-b"},
            {
                "index": 0,
                "uuid": "GPU-a",
                "mig": {"current": True, "pending": 1},
                "mig_devices": [
                    {"uuid": "MIG-2", "gpu_instance_id": 8, "compute_instance_id": 0},
                    {"uuid": "MIG-1", "gpu_instance_id": 7, "compute_instance_id": 1, "index": 5},
                ],
            },
        ]
    }
    topo = Topology.from_json(doc)
    assert (topo.driver_version, topo.nvml) == ("", True)
    b, a = topo.gpus
    assert (b.name, b.pci_bus_id, b.mig_current, b.mig_pending) == ("", "", None, None)
    assert b.mig_devices == ()
    assert (a.mig_current, a.mig_pending) == (True, True)
    assert [(m.index, m.uuid, m.parent_uuid, m.gpu_instance_id, m.compute_instance_id, m.slices,
             m.memory_mb, m.profile, m.name) for m in a.mig_devices] == [
        (0, "MIG-2", "GPU-a", 8, 0, 0, 0, "", ""),
        (5, "MIG-1", "GPU-a", 7, 1, 0, 0, "", ""),
    ]  # fmt: skip
    assert Topology.from_json({"schema": 1, "nvml": False}) == Topology.absent()
    # MIG devices listed without a "mig" object: MIG is on, with nothing pending
    minimal = {
        "index": 0,
        "uuid": "GPU-a",
        "mig_devices": [{"uuid": "MIG-1", "gpu_instance_id": 7, "compute_instance_id": 0}],
    }
    (gpu,) = Topology.from_json({"gpus": [minimal]}).gpus
    assert (gpu.mig_current, gpu.mig_pending, gpu.mig_change_pending) == (True, True, False)
    assert Topology.from_json({"driver_version": 550}).driver_version == "550"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "the document is not a JSON object"),
        ({"schema": 2}, "unsupported schema 2"),
        ({"gpus": [{"index": 0}]}, "malformed topology document (KeyError: 'uuid')"),
        ({"gpus": [{"uuid": "GPU-a"}]}, "malformed topology document (KeyError: 'index')"),
        ({"gpus": [{"index": "x", "uuid": "u"}]}, "invalid literal for int()"),
        ({"gpus": 3}, "malformed topology document (TypeError: 'int' object is not iterable)"),
    ],
)
def test_a_document_that_is_not_a_topology_says_why(doc, message: str):
    with pytest.raises(ValueError) as caught:
        Topology.from_json(doc)
    assert message in str(caught.value)
    assert str(caught.value).startswith(message[:8])


def test_a_pending_mode_survives_the_document():
    waiting = Topology((replace(B, mig_current=False, mig_pending=True),))
    doc = waiting.to_json()
    assert doc["gpus"][0]["mig"] == {"current": False, "pending": True}
    assert Topology.from_json(doc) == waiting
    assert Topology.from_json(doc).pending_mig_changes() == list(waiting.gpus)


def test_the_document_is_indented_json_with_its_schema_first():
    text = BASE.dumps()
    assert text.startswith('{\n  "schema": 1,\n  "nvml": true,\n  "driver_version": "550.54.15",')
    assert Topology.absent().to_json()["nvml"] is False


def test_a_mig_gpu_without_instances_says_so():
    on_empty = Topology((replace(B, mig_current=True, mig_pending=True),))
    assert on_empty.summary() == "GPU 1: MIG on, no devices"


def test_the_table_word_for_word():
    topo = Topology(
        (
            replace(B, index=2, mig_current=None, mig_pending=None),
            replace(A, mig_devices=(replace(mig("GPU-a", 8, "MIG-2"), index=3),
                                    replace(mig("GPU-a", 7, "MIG-1", profile=""), index=1))),
            Gpu(1, "GPU-c", "NVIDIA A100-SXM4-40GB", "00000000:01:00.0", False, True),
        ),
        "550.54.15",
    )  # fmt: skip
    pending = "off (pending on: needs GPU reset)"
    assert render_table(topo).splitlines() == [
        "GPU    NAME / PROFILE                UUID   BUS ID / GI:CI    MIG",
        "0      NVIDIA A100-SXM4-40GB         GPU-a  00000000:00:00.0  on",
        "  0:1    ? (1 slice, 4864 MiB)       MIG-1    7:0",
        "  0:3    1g.5gb (1 slice, 4864 MiB)  MIG-2    8:0",
        f"1      NVIDIA A100-SXM4-40GB         GPU-c  00000000:01:00.0  {pending}",
        "2      NVIDIA A100-SXM4-40GB         GPU-b  00000000:01:00.0  n/a",
        "Driver 550.54.15",
    ]
    assert render_table(Topology(())) == "No GPUs."
    assert render_table(Topology.absent()) == "No GPUs. (no usable NVML)"


def test_the_table_counts_slices_in_words():
    big = replace(mig("GPU-a", 1, "MIG-9", profile="3g.20gb"), slices=3, memory_mb=19968)
    table = render_table(Topology((replace(A, mig_devices=(big,)),)))
    assert "3g.20gb (3 slices, 19968 MiB)" in table
