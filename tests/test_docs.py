"""The README and docs/ point at what exists: every relative link names a file of the
repository, every #anchor a heading of its target, and the README stays short (its depth is in
docs/)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import clean_env, gpu_supervise_cmd

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_anchor_exists(page: Path):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(where):
            broken.append(f"{target}: no heading #{anchor} in {where.name}")
    assert broken == []


def test_the_link_check_sees_a_broken_anchor(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [bad](#no-such-heading) [gone](missing.md)\n")
    assert anchors(page) == {"a-title"}
    found = [t for t in LINK.findall(page.read_text())]
    assert found == ["#a-title", "#no-such-heading", "missing.md"]


def test_the_readme_says_what_it_is_then_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_screen = text[: text.index("## ")]
    assert first_screen.index("is a small supervisor") < first_screen.index("bash examples/demo.sh")
    assert "bash examples/demo.sh" in first_screen and "bash .ci/run" in first_screen
    assert len(text.encode()) < 16 * 1024  # short, like tini's: the depth is in docs/


def test_no_page_names_where_the_requirements_came_from():
    for page in PAGES:
        assert "PRD" not in page.read_text(), page.name


def test_the_generated_tables_are_filled_in():
    """docs/performance.md and docs/testing.md carry tables the benchmark and the mutation run
    write between their markers: never an empty placeholder."""
    for page, marker in (("performance.md", "benchmarks"), ("testing.md", "mutation")):
        text = (ROOT / "docs" / page).read_text()
        table = text.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
        assert "| --- |" in table and "written by" not in table, page


def test_the_readme_dry_run_works_as_written(tmp_path: Path, start_cmd):
    """The Troubleshooting dry run, pasted into a shell in a clone where the Install section
    was followed (the command is .venv/bin/gpu-supervise, not on PATH): the change line, exit 1.
    Only its /tmp/node.json is moved into this test's own folder."""
    text = " ".join((ROOT / "README.md").read_text().split())
    command = re.search(r"\*\*Dry run without a GPU:\*\* `([^`]+)`", text)[1]
    node = tmp_path / "node.json"
    assert command.count("/tmp/node.json") == 2
    command = command.replace("/tmp/node.json", str(node)).replace("sleep 600", "sleep 300")
    clone = tmp_path / "clone"
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "gpu-supervise").symlink_to(gpu_supervise_cmd()[0])
    (clone / "examples").mkdir()
    shutil.copy2(ROOT / "examples" / "node.json", clone / "examples" / "node.json")
    path = ":".join(d for d in os.environ["PATH"].split(":")
                    if d and not (Path(d) / "gpu-supervise").exists())  # fmt: skip
    proc = start_cmd(["bash", "-c", command], clean_env(PATH=path), clone)
    proc.wait_for("baseline: ", timeout=120)
    doc = json.loads(node.read_text())
    gpu = next(g for g in doc["gpus"] if g["mig_devices"])
    gpu["mig_devices"].pop()
    node.write_text(json.dumps(doc))
    assert proc.wait(timeout=120) == 1, proc.output
    assert "MIG configuration change detected" in proc.log
