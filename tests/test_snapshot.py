"""`gpu-supervise snapshot`, run as the installed console script over the fake NVML."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import FakeNode, clean_env, run
from fakenvml import DRIVER_NOT_LOADED, dgx_a100, h100_node, h200_node

MIXED_DGX = dgx_a100(
    ["1g.5gb"] * 7,
    ["3g.20gb", "3g.20gb"],
    ["7g.40gb"],
    ["2g.10gb", "2g.10gb", "3g.20gb"],
    ["4g.20gb", "3g.20gb"],
    None,
    None,
    ["1g.5gb", "1g.5gb", "2g.10gb", "3g.20gb"],
)


def test_json_shows_a_mixed_dgx_a100(fake_node: FakeNode):
    node = MIXED_DGX.copy()
    node.gpu(6).pending = 1  # MIG enable requested, waiting for a reset
    fake_node.write(node)
    out = run(["snapshot", "--json"], fake_node.env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["schema"] == 1 and doc["nvml"] is True
    assert len(doc["gpus"]) == 8
    uuids = [u for g in doc["gpus"] for u in [g["uuid"]] + [m["uuid"] for m in g["mig_devices"]]]
    assert uuids == node.uuids()
    assert [m["profile"] for m in doc["gpus"][3]["mig_devices"]] == [
        "2g.10gb",
        "2g.10gb",
        "3g.20gb",
    ]
    assert doc["gpus"][6]["mig"] == {"current": False, "pending": True}
    first = doc["gpus"][0]["mig_devices"][0]
    assert set(first) == {
        "index",
        "uuid",
        "gpu_instance_id",
        "compute_instance_id",
        "slices",
        "memory_mb",
        "profile",
        "name",
    }


def test_table_for_a_person(fake_node: FakeNode):
    node = MIXED_DGX.copy()
    node.gpu(6).pending = 1
    fake_node.write(node)
    out = run(["snapshot"], fake_node.env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "GPU",
        "NAME",
        "/",
        "PROFILE",
        "UUID",
        "BUS",
        "ID",
        "/",
        "GI:CI",
        "MIG",
    ]
    assert sum("1g.5gb" in line for line in lines) == 9
    assert any(
        line.startswith("6 ") and "off (pending on: needs GPU reset)" in line for line in lines
    )
    assert all(u in out.stdout for u in node.uuids())


@pytest.mark.parametrize(
    ("node", "profiles"),
    [
        (
            h100_node(["1g.10gb"] * 7, ["3g.40gb", "4g.40gb"], count=2),
            {"1g.10gb", "3g.40gb", "4g.40gb"},
        ),
        (h200_node(["1g.18gb", "2g.35gb", "3g.71gb"]), {"1g.18gb", "2g.35gb", "3g.71gb"}),
    ],
)
def test_each_node_kind(fake_node: FakeNode, node, profiles):
    fake_node.write(node)
    out = run(["snapshot", "--json"], fake_node.env)
    doc = json.loads(out.stdout)
    assert {m["profile"] for g in doc["gpus"] for m in g["mig_devices"]} == profiles
    assert all(m["uuid"].startswith("MIG-") for g in doc["gpus"] for m in g["mig_devices"])
    assert doc["gpus"][0]["name"] == node.gpus[0].name


def test_no_nvml_library_is_one_line_and_exit_1(tmp_path):
    out = run(["snapshot"], clean_env(LD_LIBRARY_PATH=str(tmp_path)))
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.startswith(
        "gpu-supervise: NVML is not usable: NVML Shared Library Not Found (no NVIDIA driver here, "
        "or a container started without the NVIDIA runtime"
    )
    assert out.stderr.count("\n") == 1 and "NVIDIA_VISIBLE_DEVICES" in out.stderr


def test_driver_not_loaded_is_one_line_and_exit_1(fake_node: FakeNode):
    fake_node.write(dgx_a100().fail("nvmlInit", DRIVER_NOT_LOADED))
    out = run(["snapshot"], fake_node.env)
    assert out.returncode == 1
    assert out.stderr.startswith("gpu-supervise: NVML is not usable: Driver Not Loaded (no NVIDIA")
    assert out.stderr.count("\n") == 1


def test_failing_nvml_is_one_line_and_exit_1(fake_node: FakeNode):
    fake_node.write(dgx_a100().fail("nvmlDeviceGetUUID", 15))
    out = run(["snapshot"], fake_node.env)
    assert out.returncode == 1
    assert out.stderr.startswith("gpu-supervise: cannot read the GPU topology: GPU is lost")
    assert out.stderr.count("\n") == 1


def test_hanging_call_misses_the_deadline(fake_node: FakeNode):
    fake_node.write(dgx_a100().hang("nvmlDeviceGetName"))
    started = time.monotonic()
    out = run(["snapshot", "--probe-timeout", "1"], fake_node.env, timeout=60)
    assert out.returncode == 1
    assert "did not finish within 1 s" in out.stderr
    # the process exits although its probe thread is stuck in C for good
    assert time.monotonic() - started < 50


def test_snapshot_flags_are_validated(fake_node: FakeNode):
    out = run(["snapshot", "--probe-timeout", "0"], fake_node.env)
    assert (out.returncode, out.stderr) == (
        2,
        "gpu-supervise: --probe-timeout: must be at least 0.1 s, got '0'\n",
    )


# -- documents for the file source -------------------------------------------------------------

EXAMPLE = Path(__file__).parent.parent / "examples" / "node.json"


def test_the_example_node_is_what_snapshot_writes():
    """examples/node.json (an A100 in MIG mode, an H200 without) is a document the file source
    reads as written: the dry run of the README's troubleshooting works on it."""
    out = run(["snapshot", "--json", "--source", f"file:{EXAMPLE}"], clean_env())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(EXAMPLE.read_text())
    table = run(["snapshot", "--source", f"file:{EXAMPLE}"], clean_env()).stdout
    assert "NVIDIA A100-SXM4-40GB" in table and "NVIDIA H200" in table and "pending" not in table


def test_a_hand_written_document_shows_no_pending_change(tmp_path: Path):
    """A document that lists MIG devices and says nothing of the MIG mode is read as MIG on
    with no change pending: `pending` is the mode after the next reset, the current one here."""
    doc = tmp_path / "node.json"
    doc.write_text(json.dumps({"gpus": [{"index": 0, "uuid": "GPU-1", "mig_devices": [
        {"uuid": "MIG-1", "gpu_instance_id": 1, "compute_instance_id": 0}]}]}))  # fmt: skip
    out = run(["snapshot", "--json", "--source", f"file:{doc}"], clean_env())
    assert json.loads(out.stdout)["gpus"][0]["mig"] == {"current": True, "pending": True}
    table = run(["snapshot", "--source", f"file:{doc}"], clean_env()).stdout
    assert "pending" not in table and " on\n" in table
