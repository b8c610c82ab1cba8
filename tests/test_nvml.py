"""The NVML source through the real nvidia-ml-py, loading the fake libnvidia-ml.so.1."""

from __future__ import annotations

from pathlib import Path

import pynvml
import pytest

import fakenvml
from fakenvml import dgx_a100, h100_node
from gpu_supervise.nvml import NvmlSource
from gpu_supervise.probe import probe_once, run_probe
from gpu_supervise.topology import ProbeError, SourceUnavailable


def test_reads_every_gpu_and_mig_device(node_path: Path):
    node = dgx_a100(["1g.5gb"] * 7, ["3g.20gb", "3g.20gb"], None, ["7g.40gb"])
    node.write(node_path)
    topo = NvmlSource().probe()
    assert topo.uuids() == node.uuids()
    assert [g.pci_bus_id for g in topo.gpus][:2] == ["00000000:07:00.0", "00000000:17:00.0"]
    gpu1 = topo.gpus[1]
    assert gpu1.mig_current is True
    assert [
        (m.index, m.gpu_instance_id, m.profile, m.slices, m.memory_mb) for m in gpu1.mig_devices
    ] == [
        (0, 1, "3g.20gb", 3, 19968),
        (3, 2, "3g.20gb", 3, 19968),  # sparse indices: 1 and 2 answer NOT_FOUND
    ]
    assert topo.gpus[2].mig_devices == ()
    assert topo.driver_version == "550.54.15"


def test_gpu_without_mig_support_is_not_an_error(node_path: Path):
    node = dgx_a100(count=2)
    node.gpu(1).mig = -1  # the driver answers NOT_SUPPORTED
    node.write(node_path)
    topo = NvmlSource().probe()
    assert (topo.gpus[1].mig_current, topo.gpus[1].mig_devices) == (None, ())


def test_pending_mode_is_read_but_current_decides(node_path: Path):
    node = h100_node(count=1)
    node.gpu(0).pending = 1
    node.write(node_path)
    topo = NvmlSource().probe()
    assert (topo.gpus[0].mig_current, topo.gpus[0].mig_pending) == (False, True)
    assert topo.gpus[0].mig_devices == ()


def test_nvml_is_shut_down_after_every_probe(node_path: Path):
    dgx_a100(count=1).write(node_path)
    NvmlSource().probe()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_mig_handles_die_with_a_reconfiguration(node_path: Path):
    # Why the source never keeps handles: the fake, like the driver, invalidates them.
    node = dgx_a100(["1g.5gb"] * 7, count=1)
    node.write(node_path)
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(pynvml.nvmlDeviceGetHandleByIndex(0), 0)
        assert pynvml.nvmlDeviceGetUUID(handle) == node.gpu(0).mig_uuids[0]
        node.gpu(0).set_layout(["3g.20gb"] * 2)
        node.write(node_path)
        pynvml.nvmlInit()  # the next probe's init re-reads the node
        pynvml.nvmlShutdown()
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            pynvml.nvmlDeviceGetUUID(handle)
    finally:
        pynvml.nvmlShutdown()


@pytest.mark.parametrize("code", [fakenvml.DRIVER_NOT_LOADED])
def test_driver_not_loaded_is_unavailable_not_failure(node_path: Path, code: int):
    dgx_a100().fail("nvmlInit", code).write(node_path)
    with pytest.raises(SourceUnavailable, match="Driver Not Loaded"):
        NvmlSource().probe()
    result = run_probe(NvmlSource())
    assert not result.failed and result.unavailable and result.topology.gpus == ()


@pytest.mark.parametrize(
    ("fn", "code", "text"),
    [
        ("nvmlInit", fakenvml.LIB_RM_VERSION_MISMATCH, "version mismatch"),
        ("nvmlDeviceGetCount", fakenvml.UNKNOWN, "Unknown Error"),
        ("nvmlDeviceGetUUID", fakenvml.GPU_IS_LOST, "GPU is lost"),
        ("nvmlDeviceGetMigDeviceHandleByIndex", fakenvml.TIMEOUT, "Timeout"),
        ("nvmlDeviceGetAttributes", fakenvml.UNKNOWN, "Unknown Error"),
    ],
)
def test_probe_errors_are_failures(node_path: Path, fn: str, code: int, text: str):
    dgx_a100(["1g.5gb"] * 7).fail(fn, code).write(node_path)
    with pytest.raises(ProbeError, match=text):
        NvmlSource().probe()
    result = run_probe(NvmlSource())
    assert result.failed and text in result.error
    assert result.refused is (fn == "nvmlInit")  # NVML refused to start: the agent's too


def test_next_n_calls_fail_then_recover(node_path: Path):
    dgx_a100().fail("nvmlDeviceGetCount", count=2).write(node_path)
    assert [run_probe(NvmlSource()).failed for _ in range(3)] == [True, True, False]


def test_library_missing_is_unavailable(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    monkeypatch.setattr(pynvml, "CDLL", _missing)
    with pytest.raises(SourceUnavailable, match="Library Not Found"):
        NvmlSource().probe()


def _missing(name: str) -> None:
    raise OSError(f"{name}: cannot open shared object file: No such file or directory")


def test_slow_answers_inside_the_deadline_succeed(node_path: Path):
    dgx_a100().delay(20, fn="nvmlDeviceGetUUID").write(node_path)
    result = probe_once(NvmlSource(), timeout=30)
    assert not result.failed and len(result.topology.gpus) == 8
    assert result.seconds >= 8 * 0.02
