"""The code stays ruff-clean: part of the test command, so CI runs exactly what the README says."""

from __future__ import annotations

import subprocess
import sys
import warnings
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_ruff_clean():
    """ruff from the interpreter running the tests, so that `.venv/bin/python -m pytest` finds
    it without the virtual environment on PATH."""
    assert find_spec("ruff"), "ruff is a test dependency: pip install -e '.[test]'"
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_not_importable_as_supervisor():
    """`supervisor` is supervisord's package on many DGX hosts: never shadow it."""
    probe = (
        "import importlib.util as u; s = u.find_spec('supervisor'); "
        "print(s and (s.origin, list(s.submodule_search_locations or [])))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert str(ROOT / "supervisor") not in out.stdout
    import gpu_supervise

    assert Path(gpu_supervise.__file__).parent == ROOT / "supervisor" / "gpu_supervise"


def test_project_metadata_has_no_deprecated_forms(monkeypatch):
    """setuptools deprecates `project.license` as a table (removal 2027-02-18): the metadata is
    applied, as a build applies it, without a single warning."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message) for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
