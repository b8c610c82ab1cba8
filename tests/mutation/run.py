"""Mutation testing of the pure code (watch, topology, config, text, the tripwire's listing; the
text builders of events and the line fitting of logs) with mutmut.

    python tests/mutation/run.py [--all] [--docs] [--keep DIR]

mutmut changes one thing at a time in the code (a `<` into `<=`, a `True` into `False`, a
string into another) and runs the tests that cover the changed function: a mutant the tests do
not notice "survives", and marks a rule nobody checks. This script

1. copies the package into a scratch folder as a top-level `gpu_supervise/` (mutmut imports
   mutants from its copy of `.` or `src/`, and our source root is `supervisor/`), with the fast
   in-process tests of those modules (tests marked slow, real processes, are left out: they
   cannot see a mutant, which lives in mutmut's process);
2. runs `mutmut run` there, on whole modules, and in events.py, logs.py and holders.py on the
   pure functions alone (ONLY): the rest of those is wiring that only end-to-end tests see;
3. prints a table per module and every survivor with its diff;
4. exits 1 if a mutant survives in the policy (watch.py), in the topology's identity and diff,
   in the text functions (text.py, and ONLY in events.py and logs.py: what log alerts,
   collectors and `kubectl describe pod` read) or in ONLY of holders.py, unless it is listed in
   EQUIVALENT below with the reason it changes nothing that can be observed. Survivors elsewhere
   (configuration error wording, the table for people) are reported, not failed; config.py,
   where nothing is gated, is mutated only with --all (or --docs).

It takes about two and a half minutes on two CPUs (five with --all); .ci/run runs it after the
test suite.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("watch", "topology", "config", "text", "tripwire", "events", "logs", "holders")
# Modules where a survivor is only reported, never failed: mutated with --all (and --docs) alone,
# so that CI spends its time on the modules it gates.
REPORTED = ("config",)
TESTS = (
    "test_watch.py", "test_topology.py", "test_config.py", "test_events.py", "test_logs.py",
    "test_tripwire.py", "test_holders.py", "test_termination_message.py", "test_decisions.py",
)  # fmt: skip
# What the tests import: the folders named here, and every module of tests/ that is not a test
# (conftest.py and the helpers it imports).
SUPPORT = ("fakenvml", "agents")

# Modules mutated only in these functions: the pure ones. events: the text of the change line,
# of the last line's reason, of the termination message and of systemd's status; logs: how a
# line is made to fit 16 KiB. (The rest is logging calls and the writer thread.) holders: which
# files hold a GPU, a container's id, who a holder is (the scan itself reads /proc).
ONLY = {
    "events": (
        "_uuid_list", "change_line", "_pending_gpus", "source_name", "_failed",
        "restart_reason", "termination_message", "holding_status", "running_status",
        "holders_line",
    ),
    "logs": ("_fit_text", "_fit_json"),
    "holders": ("is_device", "container_id", "Holder.key", "Scan.key"),
}  # fmt: skip

# Where no mutant may survive: the whole policy, the topology's identity and diff, and the text
# functions.
STRICT = re.compile(
    r"gpu_supervise\.watch\."
    r"|gpu_supervise\.topology\.x(ǁTopologyǁ(identity|same_as|absent|pending_mig_changes)"
    r"|ǁMigDeviceǁ(key|describe)|ǁGpuǁ(mig_enabled|mig_change_pending|describe)"
    r"|ǁChangeǁ|_diff|__diff_lines|__gpu_diff|__mig_suffix|__profile_counts|__slot|_onoff)"
    r"|gpu_supervise\.(text|tripwire|events|logs|holders)\."
)

# Survivors that change nothing observable: (function, a piece of the mutated line) -> why.
EQUIVALENT = {
    ("ProbeSchedule.__init__", "self._seq = 1"): "probe numbers only need to be distinct",
    ("ProbeSchedule.begin", "self._seq -= 1"): "probe numbers only need to be distinct",
    ("ProbeSchedule.begin", "self._seq += 2"): "probe numbers only need to be distinct",
    ("Watcher._holding", "assert self.hold is not None or self.baseline is not None"): (
        "an assertion of an invariant (a hold always has a baseline): never false"
    ),
    ("Watcher._decide", "loud: bool = False"): (
        "`loud` is read only for BROKEN decisions, which always pass it"
    ),
    ("ProbeSchedule.__init__", "self.tripped = None"): (
        "read once, as `not tripped`: None and False are the same there"
    ),
    ("Watcher.__init__", "self.settled_at = None"): (
        "read only while a candidate exists, and set together with it"
    ),
    ("Watcher.__init__", "self.settled_at = 1.0"): (
        "read only while a candidate exists, and set together with it"
    ),
    ("walk", "follow_symlinks=None"): "is_dir reads it as a truth value: None is False",
    ("Watcher.__init__", "self.settle_by = None"): (
        "read only while a candidate exists, and set when the candidate first is"
    ),
    ("Watcher.__init__", "self.settle_by = 1.0"): (
        "read only while a candidate exists, and set when the candidate first is"
    ),
    ("printable", '"UNICODE_ESCAPE"'): "codec names are case-insensitive",
    ("clip", '"UNICODE_ESCAPE"'): "codec names are case-insensitive",
    ("fit_text", '"UTF-8"'): "codec names are case-insensitive",
    ("container_id", 'line.split("XX:XX", 2)'): (
        "the fields before a cgroup line's path (hierarchy id, controllers) never hold a '/': "
        "the whole line splits into the same parts, the first one no container id"
    ),
}

# What counts as the tests noticing a mutant: they failed, or never finished (an endless loop),
# or the mutant crashed the interpreter.
CAUGHT = {"killed", "timeout", "segfault", "caught by type check"}

PYPROJECT = """\
[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "-p no:cacheprovider"
markers = ["slow: runs real processes for seconds"]

[tool.mutmut]
source_paths = ["gpu_supervise/"]
only_mutate = {only}
pytest_add_cli_args = ["-m", "not slow"]
pytest_add_cli_args_test_selection = {tests}
also_copy = ["examples/"]
"""


def selected(name: str) -> bool:
    """Whether a mutant (gpu_supervise.events.x__mode__mutmut_3) is one this run tests."""
    module = name.split(".")[1]
    return module not in ONLY or function_of(name) in {f.lstrip("_") for f in ONLY[module]}


def patterns(modules: tuple[str, ...]) -> list[str]:
    """`mutmut run`'s filter: whole modules, or the functions of ONLY (their mutants and the
    function itself, so that its tests also run in mutmut's clean run)."""
    out = []
    for module in modules:
        functions = ONLY.get(module)
        if functions is None:
            out.append(f"gpu_supervise.{module}.*")
        else:
            out += [f"gpu_supervise.{module}.{_mangled(f)}*" for f in functions]
    return out


def _mangled(function: str) -> str:
    """mutmut's name for a function (x_name) or a method (xǁClassǁname)."""
    cls, _, name = function.rpartition(".")
    return f"xǁ{cls}ǁ{name}" if cls else f"x_{name}"


def scratch_copy(where: Path, modules: tuple[str, ...]) -> None:
    shutil.copytree(ROOT / "supervisor" / "gpu_supervise", where / "gpu_supervise",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    shutil.copytree(ROOT / "examples", where / "examples")
    (where / "tests").mkdir()
    helpers = [p.name for p in (ROOT / "tests").glob("*.py") if not p.name.startswith("test_")]
    for name in (*TESTS, *SUPPORT, *helpers):
        source = ROOT / "tests" / name
        if source.is_dir():
            shutil.copytree(source, where / "tests" / name,
                            ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        else:
            shutil.copy2(source, where / "tests" / name)
    only = [f"gpu_supervise/{m}.py" for m in modules]
    tests = [f"tests/{t}" for t in TESTS]
    (where / "pyproject.toml").write_text(PYPROJECT.format(only=only, tests=tests))


def mutmut(where: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=where,
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"mutmut {' '.join(args)} failed:\n{out.stdout[-3000:]}{out.stderr}")
    return out.stdout


def function_of(name: str) -> str:
    """gpu_supervise.watch.xǁWatcherǁjudge__mutmut_6 -> Watcher.judge"""
    core = name.split(".", 2)[2].rsplit("__mutmut_", 1)[0].removeprefix("x")
    return ".".join(part for part in core.split("ǁ") if part).removeprefix("_").removeprefix("_")


def mutant_sources(where: Path, modules: tuple[str, ...]) -> dict[str, str]:
    """Every function mutmut wrote into its copy of the modules, by its mutant name: the lines
    after its `def` line. (Sliced from the file's lines: ast.get_source_segment splits the whole
    file again for each function, minutes for the thousands of mutants of a module.)"""
    sources = {}
    for module in modules:
        text = (where / "mutants" / "gpu_supervise" / f"{module}.py").read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and "__mutmut_" in node.name
            ):
                body = "\n".join(lines[node.lineno : node.end_lineno])
                sources[f"gpu_supervise.{module}.{node.name}"] = body
    return sources


def mutated_line(name: str, sources: dict[str, str]) -> str:
    """What the mutant changed: the lines that differ from the original function."""
    original = sources.get(name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", "")
    changed = difflib.ndiff(original.splitlines(), sources.get(name, "").splitlines())
    return " ".join(line[2:].strip() for line in changed if line.startswith("+ "))


def _write_docs(table: str) -> None:
    page = ROOT / "docs" / "testing.md"
    text = page.read_text()
    start, end = "<!-- mutation:start -->", "<!-- mutation:end -->"
    head, rest = text.split(start, 1)
    page.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it (mutmut browse there)")
    parser.add_argument("--all", action="store_true",
                        help=f"also mutate {', '.join(REPORTED)}, whose survivors are only "
                             "reported")  # fmt: skip
    parser.add_argument("--docs", action="store_true",
                        help="write the score into docs/testing.md (implies --all)")  # fmt: skip
    args = parser.parse_args()
    modules = MODULES if args.all or args.docs else tuple(m for m in MODULES if m not in REPORTED)
    where = args.keep or Path(tempfile.mkdtemp(prefix="gpu-supervise-mutation-"))
    if args.keep and where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True, exist_ok=True)
    try:
        scratch_copy(where, modules)
        mutmut(where, "run", *patterns(modules))
        results = mutmut(where, "results", "--all", "true")
        found = dict(re.findall(r"^\s*(\S+): (.+)$", results, flags=re.M))
        statuses = {name: status for name, status in found.items() if selected(name)}
        sources = mutant_sources(where, modules)
        table: dict[str, dict[str, int]] = {m: {} for m in modules}
        failures, survivors = [], []
        for name, status in sorted(statuses.items()):
            module = name.split(".")[1]
            table[module][status] = table[module].get(status, 0) + 1
            if status in CAUGHT:
                continue
            line = mutated_line(name, sources)
            function = function_of(name)
            why = next((r for (f, piece), r in EQUIVALENT.items()
                        if f == function and piece in line), None)  # fmt: skip
            strict = bool(STRICT.match(name))
            survivors.append((module, status, function, line, why, strict))
            if strict and why is None:
                failures.append(name)
        rows = ["| module | mutants | caught | survived | of which equivalent |",
                "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for module, counts in table.items():
            total = sum(counts.values())
            killed = sum(n for status, n in counts.items() if status in CAUGHT)
            survived = total - killed
            equivalent = sum(1 for m, *_, why, _ in survivors if why and m == module)
            rows.append(f"| `{module}.py` | {total} | {killed} ({100 * killed / max(total, 1):.0f} "
                        f"%) | {survived} | {equivalent} |")  # fmt: skip
        print("\n".join(rows) + "\n")
        if args.docs:
            _write_docs("\n".join(rows))
        # Every survivor with its diff while any is unexplained; else the equivalent ones as a
        # count (each has its reason in EQUIVALENT).
        unexplained = any(why is None for *_, why, _ in survivors)
        for _, status, function, line, why, strict in survivors:
            if why and not unexplained:
                continue
            tag = "EQUIVALENT" if why else ("FAIL" if strict else "report")
            print(f"[{tag}] {status}: {function}: {line}" + (f"  ({why})" if why else ""))
        equivalent = sum(1 for *_, why, _ in survivors if why)
        if equivalent and not unexplained:
            print(f"{equivalent} surviving mutant(s), each equivalent for the reason EQUIVALENT "
                  "gives.")  # fmt: skip
        if failures:
            print(f"\n{len(failures)} mutant(s) survive where none may: strengthen the tests, or "
                  "list a truly equivalent mutant in EQUIVALENT with the reason.")  # fmt: skip
            return 1
        print("\nNo unexplained survivor in the policy or in the topology's identity and diff.")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
