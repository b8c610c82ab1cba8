"""Configuration: precedence, and every bad input as one line, exit 2, no child started."""

from __future__ import annotations

import os
import string
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import clean_env, run
from gpu_supervise import cli
from gpu_supervise.config import SCHEMA, ConfigError, env_name, load

GOOD = """
[watch]
enabled = true
interval = 15
cooldown = 2.5
settle = 0
failure_threshold = 5
probe_timeout = 3
source = "nvml"

[child]
stop_timeout = 20

[log]
level = "debug"
format = "json"

[report]
termination_log = ""
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_prds():
    s = load({}, environ={})
    p = s.policy
    assert (p.interval, p.cooldown, p.settle, p.failure_threshold) == (30.0, 60.0, 5.0, 3)
    assert (s.watch_enabled, s.probe_timeout, s.stop_timeout) == (True, 10.0, 10.0)
    assert (s.log_level, s.log_format, s.source) == ("INFO", "text", "nvml")


def test_file_then_environment_then_flags(tmp_path: Path):
    path = write(tmp_path, GOOD)
    s = load({}, str(path), environ={})
    assert (s.policy.interval, s.policy.cooldown, s.policy.failure_threshold) == (15.0, 2.5, 5)
    assert (s.log_level, s.log_format, s.stop_timeout) == ("DEBUG", "json", 20.0)
    env = {"GPU_SUPERVISE_WATCH_INTERVAL": "7", "GPU_SUPERVISE_CHILD_STOP_TIMEOUT": "4"}
    s = load({}, str(path), environ=env)
    assert (s.policy.interval, s.stop_timeout) == (7.0, 4.0)
    s = load({("watch", "interval"): "2"}, str(path), environ=env)
    assert (s.policy.interval, s.stop_timeout, s.policy.cooldown) == (2.0, 4.0, 2.5)


def test_config_path_from_environment(tmp_path: Path):
    path = write(tmp_path, "[watch]\ninterval = 9\n")
    assert load({}, environ={"GPU_SUPERVISE_CONFIG": str(path)}).policy.interval == 9.0


# A valid value other than the default for every key, and the Settings field it lands in.
EVERY_KEY = {
    ("watch", "enabled"): ("off", "watch_enabled", False),
    ("watch", "interval"): ("7.5", "interval", 7.5),
    ("watch", "cooldown"): ("0", "cooldown", 0.0),
    ("watch", "settle"): ("0.5", "settle", 0.5),
    ("watch", "failure_threshold"): ("4", "failure_threshold", 4),
    ("watch", "probe_timeout"): ("2", "probe_timeout", 2.0),
    ("watch", "source"): ("file:{example}", "source", "file:{example}"),
    ("watch", "on_pending"): ("ignore", "on_pending", "ignore"),
    ("watch", "pending_timeout"): ("60", "pending_timeout", 60.0),
    ("child", "stop_timeout"): ("3", "stop_timeout", 3.0),
    ("child", "parent_death_signal"): ("term", "parent_death_signal", 15),
    ("log", "level"): ("debug", "log_level", "DEBUG"),
    ("log", "format"): ("JSON", "log_format", "json"),
    ("report", "termination_log"): ("", "termination_log", ""),
}


def test_every_key_is_read_from_its_environment_variable():
    example = str(Path(__file__).parent.parent / "examples" / "config.toml")
    assert set(EVERY_KEY) == {(s, k) for s, keys in SCHEMA.items() for k in keys}
    defaults = load({}, environ={})
    for (section, key), (raw, field, expected) in EVERY_KEY.items():
        name = f"GPU_SUPERVISE_{section.upper()}_{key.upper()}"
        assert env_name(section, key) == name
        raw, expected = (
            raw.format(example=example),
            (expected.format(example=example) if isinstance(expected, str) else expected),
        )
        settings = load({}, environ={name: raw})
        assert getattr(settings, field) == expected != getattr(defaults, field), name


BAD_FILES = [
    ("[watch]\ninterval = -1\n", "[watch] interval: must be at least 0.1 s, got -1"),
    ("[watch]\ninterval = 0\n", "[watch] interval: must be at least 0.1 s, got 0"),
    ('[watch]\ninterval = "30s"\n', "[watch] interval: must be a number of seconds, got '30s'"),
    ("[watch]\nfailure_threshold = 0\n", "failure_threshold: must be a whole number from 1 to"),
    ("[watch]\nfailure_threshold = 2.5\n", "failure_threshold: must be a whole number"),
    ('[watch]\nenabled = "maybe"\n', "[watch] enabled: must be true or false"),
    ("[watch]\nintervall = 3\n", "unknown key 'intervall' in [watch]"),
    ("[wacth]\ninterval = 3\n", "unknown section [wacth]"),
    ('[watch]\nsource = "dcgm"\n', "unknown source 'dcgm'"),
    ('[log]\nlevel = "loud"\n', "[log] level: must be one of TRACE"),
    ("[watch]\ninterval = 3\ninterval = 4\n", "TOML syntax error"),
    ("watch = 3\n", "watch must be a table"),
    ("[watch\n", "TOML syntax error"),
    ("[watch]\ninterval = " + "9" * 400 + "\n", "[watch] interval: must be a finite number"),
    ("[watch]\nfailure_threshold = " + "9" * 400 + "\n", "must be a whole number from 1 to"),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "TOML nested too deeply"),
    ("# padding\n" * 200_000, "larger than 1048576 bytes; not a configuration"),
    ('[watch]\nsource = "file:/nonexistent/node.json"\n', "is not a file"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_config_file_is_one_line_exit_2_and_no_child(tmp_path: Path, text: str, message: str):
    path = write(tmp_path, text)
    marker = tmp_path / "started"
    out = run(["--config", str(path), "--", "touch", str(marker)], clean_env())
    assert out.returncode == 2
    assert out.stderr.startswith(f"gpu-supervise: config file {path}: ")
    assert message in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--config", "/nonexistent/gs.toml"], {}, "config file /nonexistent/gs.toml: not found"),
        ([], {"GPU_SUPERVISE_CONFIG": "/nonexistent/x.toml"}, "config file /nonexistent/x.toml"),
        (["--interval", "0"], {}, "--interval: must be at least 0.1 s, got '0'"),
        (["--settle", "-2"], {}, "--settle: must be 0 (act at first sight) or at least 0.1 s"),
        (["--failure-threshold", "0"], {}, "--failure-threshold: must be a whole number from 1"),
        (["--cooldown", "soon"], {}, "--cooldown: must be a number of seconds, got 'soon'"),
        (["--log-format", "xml"], {}, "--log-format: must be one of text, json"),
        (["--interval", "nan"], {}, "--interval: must be a finite number"),
        (["--interval", "1e-9"], {}, "--interval: must be at least 0.1 s, got '1e-9'"),
        (["--settle", "0.01"], {}, "--settle: must be 0 (act at first sight) or at least 0.1 s"),
        (["--probe-timeout", "0.05"], {}, "--probe-timeout: must be at least 0.1 s"),
        (["--stop-timeout", "1e400"], {}, "--stop-timeout: must be a finite number of seconds"),
        (["--interval", "9" * 400], {}, "--interval: must be a finite number of seconds up to"),
        (["--source", "file:/nonexistent/node.json"], {}, "'/nonexistent/node.json' is not a file"),
        (["--on-pending", "wait"], {}, "--on-pending: must be one of hold, ignore"),
        (["--parent-death-signal", "SIGFOO"], {}, "--parent-death-signal: must be a signal name"),
        (["echo", "hi"], {}, "put -- before the command: gpu-supervise [OPTIONS] -- echo hi"),
        (["--interval", "5", "echo"], {}, "put -- before the command: gpu-supervise [OPTIONS] --"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        (["--interval"], {}, "argument --interval: expected one argument"),
        (
            [],
            {"GPU_SUPERVISE_WATCH_INTERVAL": "-5"},
            "environment GPU_SUPERVISE_WATCH_INTERVAL: must",
        ),
        (
            [],
            {"GPU_SUPERVISE_WATCH_INTERVALL": "5"},
            "environment GPU_SUPERVISE_WATCH_INTERVALL: unknown",
        ),
    ],
)
def test_bad_flags_and_environment(tmp_path: Path, args: list[str], env: dict, message: str):
    marker = tmp_path / "started"
    out = run([*args, "--", "touch", str(marker)], clean_env(**env))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert out.stderr.startswith("gpu-supervise: ") and out.stderr.count("\n") == 1
    assert not marker.exists()


@pytest.mark.parametrize("argv", [[], ["--"], ["--no-watch"], ["--no-watch", "--"]])
def test_no_command_is_exit_2(argv: list[str]):
    out = run(argv, clean_env())
    assert out.returncode == 2
    assert out.stderr.startswith(
        "gpu-supervise: no command to run: usage: gpu-supervise [OPTIONS] -- COMMAND [ARGS...]"
    )
    assert out.stderr.count("\n") == 1
    assert all(hint in out.stderr for hint in ("--help", "snapshot", "demo"))


def test_help_and_version():
    out = run(["--help"], clean_env())
    assert out.returncode == 0 and "--failure-threshold" in out.stdout
    text = " ".join(out.stdout.split())
    assert "seconds to confirm a change before acting (0: act at first sight)" in text
    assert "exit codes:" in out.stdout and "/etc/gpu-supervise/config.toml" in out.stdout
    assert "126/127" in out.stdout and "snapshot" in out.stdout
    out = run(["--version"], clean_env())
    assert out.returncode == 0 and out.stdout.startswith("gpu-supervise ")


def test_example_config_is_valid_and_holds_every_key():
    example = Path(__file__).parent.parent / "examples" / "config.toml"
    s = load({}, str(example), environ={})
    assert s.policy.interval == 30.0
    text = example.read_text()
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"\n{key} = " in text or f"\n# {key} = " in text, key


# -- fuzz: any document or value is a configuration or one ConfigError, never a traceback ------

toml_values = st.one_of(
    st.integers(-10, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
)
keys = st.sampled_from([k for keys in SCHEMA.values() for k in keys] + ["bogus"])
sections = st.sampled_from([*SCHEMA, "other"])


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(v), repr(v))
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=st.dictionaries(sections, st.dictionaries(keys, toml_values, max_size=4), max_size=3),
    junk=st.text(string.printable, max_size=20),
)
def test_fuzz_config_documents(tmp_path: Path, doc, junk: str):
    body = "".join(
        f"[{s}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())
        for s, table in doc.items()
    )
    for text in (body, body + junk):
        path = write(tmp_path, text)
        try:
            load({}, str(path), environ={})
        except ConfigError as exc:
            assert "\n" not in str(exc)


@settings(max_examples=300)
@given(
    name=st.sampled_from([env_name(s, k) for s, ks in SCHEMA.items() for k in ks]),
    value=st.text(max_size=20),
)
def test_fuzz_environment_values(name: str, value: str):
    try:
        load({}, environ={name: value})
    except ConfigError as exc:
        assert str(exc).startswith(f"environment {name}: ")


# -- fuzz the whole path: file, environment and flags together, as the command line reads them --

NAMES = [env_name(s, k) for s, keys in SCHEMA.items() for k in keys]
nasty_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["nan", "inf", "-inf", "1e-9", "1e400", "-0", "0x10", "1_0", " 5 ", ""]),
    st.integers(min_value=0, max_value=10**500).map(str),
    st.floats().map(repr),
)
PAIRS = [(s, k) for s, keys in SCHEMA.items() for k in keys]
toml_doc = st.one_of(
    st.builds(
        lambda pair, value: f"[{pair[0]}]\n{pair[1]} = {value}\n",
        st.one_of(st.sampled_from(PAIRS), st.tuples(sections, keys)),
        st.one_of(
            st.integers(min_value=-(10**6), max_value=10**6).map(str),
            st.integers(min_value=10**300, max_value=10**500).map(str),  # past a float's range
            st.floats(allow_nan=True).map(_toml_value),
            st.text(max_size=20).map(_toml_value),
            st.sampled_from(["1979-05-27T07:32:00Z", "[1, [2, [3]]]", "{ a = 1 }", "true"]),
        ),
    ),
    st.text(max_size=200),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    doc=toml_doc,
    env=st.dictionaries(st.sampled_from([*NAMES, "GPU_SUPERVISE_X", "GPU_SUPERVISE_PORT"]),
                        nasty_text.map(lambda v: v.replace("\x00", "")), max_size=3),
    flags=st.lists(st.tuples(st.sampled_from([*cli.FLAGS, "--bogus", "--no-watch", "x"]),
                             nasty_text), max_size=3),
)  # fmt: skip
def test_fuzz_the_whole_configuration_path(tmp_path: Path, doc: str, env, flags):
    """No input may give anything but settings or one ConfigError line (exit 2 in main)."""
    path = write(tmp_path, doc)
    argv = ["--config", str(path)]
    for flag, value in flags:
        argv += [flag] if flag == "--no-watch" else [flag, value]
    with mock.patch.dict(os.environ, env, clear=True):
        try:
            settings, command = cli.parse_supervise([*argv, "--", "agent"])
        except ConfigError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 1200
        else:
            assert command == ["agent"] and settings.interval >= 0.1
