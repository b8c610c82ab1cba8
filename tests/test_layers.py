"""The package's modules form layers: each imports only modules below it, so there is no
import cycle and the order in which things load (before and after the agent starts) stays
readable. The order is the one gpu_supervise/__init__.py documents."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "supervisor" / "gpu_supervise"

# Top to bottom: a module may import only modules that come after it.
LAYERS = [
    "__main__", "entry", "cli", "demo", "install", "supervise", "watching", "events", "watch",
    "probe", "sources", "nvml", "tripwire", "kube", "holders", "stopping", "agent", "inbox",
    "notifier", "child", "report", "args", "exits", "config", "logs", "topology", "files",
    "signals", "procs", "text", "__init__",
]  # fmt: skip


def imports_of(module: str) -> set[str]:
    """Every module of the package that `module` imports, at the top or inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("gpu_supervise"):
                name = node.module.partition(".")[2] or "__init__"
            elif node.level == 1:
                name = node.module or ""
            else:
                continue
            if name:
                found.add(name.split(".")[0])
            else:  # from . import a, b: submodules, or names of __init__
                for alias in node.names:
                    sub = alias.name
                    found.add(sub if (PACKAGE / f"{sub}.py").exists() else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gpu_supervise."):
                    found.add(alias.name.split(".")[1])
    return found


def test_every_module_has_its_layer():
    assert sorted(LAYERS) == sorted(p.stem for p in PACKAGE.glob("*.py"))


@pytest.mark.parametrize("module", LAYERS)
def test_a_module_imports_only_modules_below_it(module: str):
    below = set(LAYERS[LAYERS.index(module) + 1 :])
    upward = imports_of(module) - below
    assert not upward, f"{module} imports {sorted(upward)}, which are not below it"


def test_the_layer_check_sees_a_lazy_import(tmp_path: Path):
    """The check reads imports inside functions too (they are where cycles hide)."""
    assert "cli" in imports_of("entry")  # entry imports cli inside run()
    assert "install" in imports_of("demo")  # inside self_command()


def test_no_import_cycle_at_run_time():
    """Importing every module, each in a fresh interpreter, works in any order."""
    for module in LAYERS:
        if module == "__main__":
            continue
        name = "gpu_supervise" if module == "__init__" else f"gpu_supervise.{module}"
        out = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                             text=True)  # fmt: skip
        assert out.returncode == 0, f"import {name}:\n{out.stderr}"


def test_the_path_to_the_agents_start_loads_little():
    """What runs before the agent is started (parse, load the settings, spawn) must not load
    the heavy modules: the logging library, psutil, the NVML bindings, threads, ctypes. The
    agent's start waits for exactly this path."""
    probe = (
        "import sys; from gpu_supervise import entry, signals; signals.block_signals(); "
        "from gpu_supervise import cli; cli.parse_supervise(['--', 'true']); "
        "from gpu_supervise import child, report; "
        "print(' '.join(sorted(m for m in ('loguru', 'psutil', 'pynvml', 'json', 'threading', "
        "'ctypes') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


def test_the_run_reads_in_its_order_on_one_screen():
    """cli._supervise is the whole run, in order: config, spawn, load, begin, the baseline,
    the loop's turns (watch, decide, stop), the exit. A newcomer reads it on one screen."""
    tree = ast.parse((PACKAGE / "cli.py").read_text())
    (flow,) = (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_supervise")
    assert flow.end_lineno is not None and flow.end_lineno - flow.lineno < 60
    used = [
        node
        for node in ast.walk(flow)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in ("child", "supervisor")
    ]  # fmt: skip
    steps = [node.attr for node in sorted(used, key=lambda n: (n.lineno, n.col_offset))]
    assert steps == [
        *("child_environment", "become_subreaper", "start_retrying", "SpawnError"),
        *("begin", "take_baseline", "exiting", "turn", "finish", "last_resort"),
    ]


def test_no_function_is_longer_than_a_screen():
    """A function of more than 60 lines hides its steps: split it into named ones."""
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.stem}.{node.name}")
    assert long == []


def test_the_package_never_imports_psutil():
    """The process table is read from /proc (procs.py): psutil is a test dependency only, and
    neither the Python package nor the binary needs it."""
    users = [path.stem for path in sorted(PACKAGE.glob("*.py"))
             if any(name.split(".")[0] == "psutil" for name in _imported_names(path))]  # fmt: skip
    assert users == []


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names
