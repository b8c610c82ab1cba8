"""How .ci/run ends: the verdict on the line before the last, and pytest's own count alone on
the last (`ci: N passed, N failed[, N skipped]`), which CI reads; the exit code the first
failure's. Its closing part is run with stand-ins for pytest and the mutation run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# pytest's stand-in writes $FAKE_JUNIT (if set) where --junitxml says and exits $FAKE_PYTEST;
# the mutation run's exits $FAKE_MUTATION; anything else is the real interpreter.
FAKE_PYTHON = """#!/bin/bash
if [ "$1 $2" = "-m pytest" ]; then
    for arg in "$@"; do case "$arg" in --junitxml=*) junit="${arg#--junitxml=}";; esac; done
    if [ -n "${FAKE_JUNIT:-}" ]; then printf '%s' "$FAKE_JUNIT" > "$junit"; else rm -f "$junit"; fi
    echo "pytest ran"; exit "$FAKE_PYTEST"
fi
if [ "$1" = tests/mutation/run.py ]; then echo "mutation ran"; exit "$FAKE_MUTATION"; fi
exec PYTHON "$@"
"""


def junit(tests: int, failures: int = 0, errors: int = 0, skipped: int = 0) -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" '
            f'errors="{errors}" failures="{failures}" skipped="{skipped}" tests="{tests}">'
            "</testsuite></testsuites>")  # fmt: skip


def closing(tmp_path: Path, pytest_rc: int, report: str | None, mutation_rc: int = 0):
    """The part of .ci/run after the setup, with the stand-ins: (exit code, output lines)."""
    text = (ROOT / ".ci/run").read_text()
    part = text[text.index("junit=$(mktemp") :]
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text(FAKE_PYTHON.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "FAKE_PYTEST": str(pytest_rc),
           "FAKE_MUTATION": str(mutation_rc), "TMPDIR": str(tmp_path)}  # fmt: skip
    if report is not None:
        env["FAKE_JUNIT"] = report
    out = subprocess.run(["bash", "-c", "set -euo pipefail\n" + part], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stderr == ""
    assert list(tmp_path.glob("gpu-supervise-junit.*")) == []  # its report file is removed
    return out.returncode, out.stdout.splitlines()


def test_a_passing_run_ends_with_the_verdict_then_pytest_s_count(tmp_path: Path):
    rc, lines = closing(tmp_path, 0, junit(tests=12, skipped=2))
    assert rc == 0 and "mutation ran" in lines
    assert lines[-1] == "ci: 10 passed, 0 failed, 2 skipped"
    assert lines[-2].startswith("ci: passed in 0m ") and "every mutation gate held" in lines[-2]
    rc, lines = closing(tmp_path, 0, junit(tests=7))
    assert (rc, lines[-1]) == (0, "ci: 7 passed, 0 failed")


@pytest.mark.parametrize(
    ("pytest_rc", "report", "verdict", "count"),
    [
        (1, junit(tests=12, failures=1, errors=2, skipped=1), "pytest exited 1",
         "ci: 8 passed, 3 failed, 1 skipped"),
        (5, junit(tests=0), "no test ran", "ci: 0 passed, 0 failed"),
        (2, junit(tests=3, failures=0), "pytest exited 2", "ci: 3 passed, 0 failed"),
    ],
)  # fmt: skip
def test_a_failed_suite_fails_the_run_and_says_so(
    tmp_path: Path, pytest_rc: int, report: str, verdict: str, count: str
):
    """Also pytest's exit 5 (no test collected, or all deselected): never a silent pass."""
    rc, lines = closing(tmp_path, pytest_rc, report)
    assert rc == pytest_rc and "mutation ran" not in lines
    assert lines[-1] == count
    assert lines[-2].startswith(f"ci: FAILED: {verdict}, after 0m ")


def test_pytest_without_a_report_fails_the_run_with_the_verdict_last(tmp_path: Path):
    rc, lines = closing(tmp_path, 4, None)
    assert rc == 4 and lines[-1].startswith("ci: FAILED: pytest exited 4")


def test_a_mutation_gate_that_does_not_hold_fails_the_run(tmp_path: Path):
    rc, lines = closing(tmp_path, 0, junit(tests=5), mutation_rc=1)
    assert rc == 1 and lines[-1] == "ci: 5 passed, 0 failed"
    assert lines[-2].startswith("ci: FAILED: the tests passed, but a mutation gate did not hold")
