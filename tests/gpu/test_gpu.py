"""The real-GPU check (check.py) as tests: against a real driver where GPU_CHECK_REAL=1,
else against the fake NVML and a fake nvidia-smi, so the check itself is tested in CI."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import check  # noqa: E402

from conftest import clean_env  # noqa: E402
from fakenvml import h200_node  # noqa: E402

pytestmark = pytest.mark.gpu
HERE = Path(__file__).parent


@dataclass
class Target:
    env: dict[str, str]
    real: bool


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Target:
    if os.environ.get("GPU_CHECK_REAL") == "1":
        env = dict(os.environ)
        probe = check._run([*check.gpu_supervise(), "snapshot"], env)
        if probe.returncode != 0:
            pytest.skip(f"no usable NVML on this machine: {probe.stderr.strip()}")
        return Target(env, real=True)
    fake_lib_dir = request.getfixturevalue("fake_lib_dir")  # no compiler needed on a real GPU
    tmp = tmp_path_factory.mktemp("gpu")
    (tmp / "bin").mkdir()
    (tmp / "bin" / "nvidia-smi").symlink_to(HERE / "fake-nvidia-smi")
    node = h200_node(["1g.18gb", "1g.18gb", "2g.35gb", "3g.71gb"], None, count=2)
    node.write(tmp / "node.txt")
    env = clean_env(
        LD_LIBRARY_PATH=str(fake_lib_dir),
        FAKE_NVML_NODE=str(tmp / "node.txt"),
        PATH=f"{tmp / 'bin'}:{os.environ['PATH']}",
        # the fake keeps the driver's procfs tree and opens its device files beside the node
        GPU_CHECK_PROCFS_ROOT=f"{tmp / 'node.txt'}.procfs",
        GPU_CHECK_DEVICE_DIR=f"{tmp / 'node.txt'}.dev",
    )
    return Target(env, real=False)


def test_parity_with_nvidia_smi(target: Target):
    result = check.parity(target.env)
    assert result["ok"], result.get("differences") or result.get("error")
    if not target.real:
        assert (result["gpus"], result["mig_devices"]) == (2, 4)


def test_parity_catches_a_difference(target: Target, tmp_path: Path):
    """The comparison can fail: a nvidia-smi that reports another UUID is caught."""
    if target.real:
        pytest.skip("needs the fake node")
    liar = tmp_path / "nvidia-smi"
    liar.write_text(f'#!/bin/sh\n{HERE / "fake-nvidia-smi"} "$@" | sed "s/GPU-/GPU-0/"\n')
    liar.chmod(0o755)
    env = {**target.env, "PATH": f"{tmp_path}:{target.env['PATH']}"}
    result = check.parity(env)
    assert not result["ok"] and result["differences"]


def test_no_false_positives_on_a_quiet_gpu(target: Target):
    seconds = float(os.environ.get("GPU_CHECK_SECONDS", 120)) if target.real else 6
    result = check.no_false_positives(target.env, seconds)
    assert result["ok"], result
    assert result["restarts"] == 0 and result["probes"] >= seconds / 2
    assert result["exit_code_after_sigterm"] == 143  # `sleep` killed by our SIGTERM


def test_probe_cost_and_driver_support_are_reported(target: Target):
    n = 200 if target.real else 20
    cost = check.inner("probe", target.env, n)
    assert cost["ok"], cost
    assert cost["n"] == n
    assert cost["probe_ms"]["min"] > 0  # a probe that took no time did not run
    assert cost["probe_ms"]["median"] < 1000  # and none is anywhere near probe_timeout
    driver = check.inner("driver", target.env)
    assert driver["ok"], driver
    assert driver["driver_version"] and driver["gpus"]
    if not target.real:
        assert all(g["mig_config_change_event"] for g in driver["gpus"])
        assert [g["mig_mode_current"] for g in driver["gpus"]] == [1, 0]


def test_report_says_each_rows_own_result(target: Target):
    results = {
        "date": "today", "machine": "test", "parity": check.parity(target.env),
        "driver": check.inner("driver", target.env),
        "probe": check.inner("probe", target.env, 5),
        "device_files": check.inner("files", target.env),
        "procfs": check.procfs_tree(target.env, 5),
        "watch": check.no_false_positives(target.env, 2),
    }  # fmt: skip
    assert results["parity"]["ok"] and results["watch"]["ok"]
    rows = _rows(check.report(results))
    assert rows["1. parity"].endswith("| PASS |")
    assert "| PASS: " in rows["2. no false positives"]
    assert f"(n={results['probe']['n']})" in rows["3. whole probe"]
    if not target.real:
        assert rows["4. GPU 0"].endswith("MIG config change event supported |")
    # the same report with each check failed in turn says FAIL in that row, and only there
    for key, row in (("parity", "1. parity"), ("watch", "2. no false positives")):
        failed = {**results, key: {**results[key], "ok": False}}
        rows = _rows(check.report(failed))
        assert "FAIL" in rows[row]
        assert [r for r, text in rows.items() if "FAIL" in text] == [row]


def test_the_drivers_tree_matches_what_nvml_shows(target: Target):
    result = check.procfs_tree(target.env)
    if target.real and "error" in result:
        pytest.skip(f"the driver's tree is not visible here: {result['error']}")
    assert result["ok"], result
    if not target.real:
        assert result["minors"] == {"0000:07:00.0": 0, "0000:17:00.0": 1}
        assert result["entries"] > 8 and result["listing_ms"]["max"] < 1000


def test_the_tree_check_catches_an_instance_without_its_entry(target: Target):
    """The comparison can fail: a compute instance whose access entry is gone is reported."""
    if target.real:
        pytest.skip("needs the fake node")
    root = Path(target.env["GPU_CHECK_PROCFS_ROOT"])
    access = root / "capabilities" / "gpu0" / "mig" / "gi1" / "ci0" / "access"
    saved = access.read_text()
    access.unlink()
    try:
        result = check.procfs_tree(target.env)
    finally:
        access.write_text(saved)
    assert not result["ok"] and result["missing"] == ["capabilities/gpu0/mig/gi1/ci0/access"]


def test_nvml_holds_its_device_files_only_while_initialised(target: Target):
    result = check.inner("files", target.env)
    assert result["ok"], result
    if not target.real:
        held = sorted(Path(x["path"]).name for x in result["while_initialised"])
        assert held == ["nvidia0", "nvidia1", "nvidiactl"]
        assert all(x["cloexec"] for x in result["while_initialised"])


def _rows(report: str) -> dict[str, str]:
    """Report rows by the start of their first cell ("1. parity", "4. GPU 0", ...)."""
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and line[2:3].isdigit():
            first = line[2:].split(" |")[0]
            key = " ".join(first.split()[:3]) if first.startswith("4. GPU") else first
            for prefix in ("1. parity", "2. no false positives", "3. whole probe"):
                if first.startswith(prefix):
                    key = prefix
            rows[key] = line
    return rows
