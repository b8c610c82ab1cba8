"""Configuration: precedence, and every bad input as one line, exit 2, no child started."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import string
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import clean_env, gpu_supervise_cmd, missing_capability, run
from gpu_supervise import cli, config
from gpu_supervise.config import SCHEMA, ConfigError, env_name, flag_name, is_service_link, load
from gpu_supervise.text import clip
from gpu_supervise.watch import WatchPolicy

PLAIN = ["--no-watch"]

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
    p = WatchPolicy.from_settings(s)
    assert (p.interval, p.cooldown, p.settle, p.failure_threshold) == (30.0, 60.0, 5.0, 3)
    assert (s.watch_enabled, s.probe_timeout, s.stop_timeout) == (True, 10.0, 10.0)
    assert (s.log_level, s.log_format, s.source) == ("INFO", "text", "nvml")


def test_settings_declares_every_key_with_its_default():
    """Settings names each SCHEMA key's field and default itself: the two must agree, or
    Settings() and a key added to SCHEMA would disagree with what load() gives."""
    declared = {f.name: f.default for f in dataclasses.fields(config.Settings)}
    keys = {config.attr_name(section, key): spec.default
            for section, specs in SCHEMA.items() for key, spec in specs.items()}  # fmt: skip
    assert declared == {"config_file": None, **keys}


def test_file_then_environment_then_flags(tmp_path: Path):
    path = write(tmp_path, GOOD)
    s = load({}, str(path), environ={})
    assert (s.interval, s.cooldown, s.failure_threshold) == (15.0, 2.5, 5)
    assert (s.log_level, s.log_format, s.stop_timeout) == ("DEBUG", "json", 20.0)
    env = {"GPU_SUPERVISE_WATCH_INTERVAL": "7", "GPU_SUPERVISE_CHILD_STOP_TIMEOUT": "4"}
    s = load({}, str(path), environ=env)
    assert (s.interval, s.stop_timeout) == (7.0, 4.0)
    s = load({("watch", "interval"): "2"}, str(path), environ=env)
    assert (s.interval, s.stop_timeout, s.cooldown) == (2.0, 4.0, 2.5)


def test_config_path_from_environment(tmp_path: Path):
    path = write(tmp_path, "[watch]\ninterval = 9\n")
    assert load({}, environ={"GPU_SUPERVISE_CONFIG": str(path)}).interval == 9.0


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
    ("watch", "tripwire_interval"): ("0", "tripwire_interval", 0.0),
    ("watch", "device_dir"): ("/x/dev", "device_dir", "/x/dev"),
    ("watch", "procfs_root"): ("/x/nvidia", "procfs_root", "/x/nvidia"),
    ("child", "stop_timeout"): ("3", "stop_timeout", 3.0),
    ("child", "parent_death_signal"): ("term", "parent_death_signal", 15),
    ("log", "level"): ("debug", "log_level", "DEBUG"),
    ("log", "format"): ("JSON", "log_format", "json"),
    ("log", "heartbeat"): ("60", "log_heartbeat", 60.0),
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


# Every value rule, in process (where mutation testing sees it): environment value -> the
# setting, or the error's exact text.
EXAMPLE = str(Path(__file__).parent.parent / "examples" / "config.toml")
RULES = [
    *[("watch", "enabled", raw, True) for raw in ("1", "true", "yes", "on", " TRUE ", "On")],
    *[("watch", "enabled", raw, False) for raw in ("0", "false", "no", "off", "NO")],
    ("watch", "enabled", "maybe", "must be true or false, got 'maybe'"),
    ("watch", "interval", "0.1", 0.1),
    ("watch", "interval", " 2592000 ", 2592000.0),
    ("watch", "interval", "0.09", "must be at least 0.1 s, got '0.09'"),
    ("watch", "interval", "2592000.5", "must be a finite number of seconds up to 2592000, got "
                                       "'2592000.5'"),
    ("watch", "interval", "30s", "must be a number of seconds, got '30s'"),
    ("watch", "interval", "+2.5", 2.5),
    # only the decimal form the docs give: not every form Python's float() takes
    *[("watch", "interval", raw, f"must be a number of seconds, got {raw!r}")
      for raw in ("3_0", "\u0663\u0660", "\uff13\uff10", "1e1", "inf", "-inf", "nan", "0x1e",
                  ".5", "5.", "3.0_0", "--5", "+-5", "", "2.5.1")],
    ("watch", "cooldown", "0", 0.0),
    ("watch", "cooldown", "-1", "must be 0 or more, got '-1'"),
    ("watch", "settle", "0", 0.0),
    ("watch", "settle", "0.1", 0.1),
    ("watch", "settle", "0.05", "must be 0 (act at first sight) or at least 0.1 s, got '0.05'"),
    ("watch", "failure_threshold", " 1 ", 1),
    ("watch", "failure_threshold", "1000000", 1_000_000),
    ("watch", "failure_threshold", "0", "must be a whole number from 1 to 1000000, got '0'"),
    ("watch", "failure_threshold", "1000001", "must be a whole number from 1 to 1000000, got "
                                              "'1000001'"),
    ("watch", "failure_threshold", "2.5", "must be a whole number from 1 to 1000000, got '2.5'"),
    ("watch", "failure_threshold", "+4", 4),
    *[("watch", "failure_threshold", raw, f"must be a whole number from 1 to 1000000, got {raw!r}")
      for raw in ("1_0", "\u0663", "\uff13", "1e1", "0x3", "")],
    ("watch", "probe_timeout", "0.1", 0.1),
    ("watch", "probe_timeout", "0", "must be at least 0.1 s, got '0'"),
    ("watch", "source", " nvml ", "nvml"),
    ("watch", "source", f"file:{EXAMPLE}", f"file:{EXAMPLE}"),
    ("watch", "source", "file:", "unknown source 'file:' (expected 'nvml' or 'file:PATH')"),
    ("watch", "source", "dcgm", "unknown source 'dcgm' (expected 'nvml' or 'file:PATH')"),
    ("watch", "source", "file:/nonexistent/n.json", "'/nonexistent/n.json' is not a file (a "
                                                    "`snapshot --json` document)"),
    ("watch", "on_pending", " HOLD ", "hold"),
    ("watch", "on_pending", "Ignore", "ignore"),
    ("watch", "on_pending", "wait", "must be one of hold, ignore, got 'wait'"),
    ("watch", "pending_timeout", "0.1", 0.1),
    ("watch", "pending_timeout", "0", "must be at least 0.1 s, got '0'"),
    ("child", "stop_timeout", "0", 0.0),
    ("child", "stop_timeout", "-0.5", "must be 0 or more, got '-0.5'"),
    *[("child", "parent_death_signal", raw, 0) for raw in ("", "0", "none", " NONE ")],
    *[("child", "parent_death_signal", raw, 15) for raw in ("SIGTERM", "term", " sigterm ", "15")],
    ("child", "parent_death_signal", "9", 9),
    ("child", "parent_death_signal", "SIGFOO", "must be a signal name such as SIGTERM, got "
                                               "'SIGFOO'"),
    ("child", "parent_death_signal", "99", "must be a signal name such as SIGTERM, got '99'"),
    ("child", "parent_death_signal", "\u0669", "must be a signal name such as SIGTERM, got "
                                              "'\u0669'"),
    ("log", "level", "debug", "DEBUG"),
    ("log", "level", "loud", "must be one of TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, "
                             "CRITICAL, got 'loud'"),
    ("log", "format", " Json ", "json"),
    ("log", "format", "xml", "must be one of text, json, got 'xml'"),
    ("report", "termination_log", "", ""),
    ("report", "termination_log", "/var/log/x", "/var/log/x"),
]  # fmt: skip


@pytest.mark.parametrize(("section", "key", "raw", "expected"), RULES)
def test_every_rule(section: str, key: str, raw: str, expected):
    name = env_name(section, key)
    if isinstance(expected, str) and expected.startswith(("must", "unknown", "'")):
        with pytest.raises(ConfigError) as caught:
            load({}, environ={name: raw})
        assert str(caught.value) == f"environment {name}: {expected}"
    else:
        (field,) = [f for (s, k), (_, f, _) in EVERY_KEY.items() if (s, k) == (section, key)]
        assert getattr(load({}, environ={name: raw}), field) == expected


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[watch]\nenabled = 1", "[watch] enabled: must be true or false, got 1"),
        ("[watch]\ninterval = true", "[watch] interval: must be a number of seconds, got True"),
        ("[watch]\ninterval = [1]", "[watch] interval: must be a number of seconds, got [1]"),
        ("[watch]\nfailure_threshold = true", "failure_threshold: must be a whole number from 1"),
        ("[watch]\nfailure_threshold = 1.0", "failure_threshold: must be a whole number from 1"),
        ("[watch]\nsource = 1", "[watch] source: must be a string, got 1"),
        ("[log]\nlevel = 1", "[log] level: must be one of TRACE"),
        ("[child]\nparent_death_signal = true", "must be a signal name such as SIGTERM, got True"),
        ("[child]\nparent_death_signal = 2.0", "must be a signal name such as SIGTERM, got 2.0"),
        ("[report]\ntermination_log = 0", "[report] termination_log: must be a string, got 0"),
        ("[bogus]\nx = 1", "unknown section [bogus] (known: [watch], [child], [log], [report])"),
        ("[log]\ncolour = 1", "unknown key 'colour' in [log] (known: level, format, heartbeat)"),
        ("log = 1", "log must be a table [log]"),
        ("interval = 5", "interval belongs in its section: [watch]"),
    ],
)
def test_typed_values_from_a_file(tmp_path: Path, toml: str, message: str):
    path = write(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as caught:
        load({}, str(path), environ={})
    assert str(caught.value).startswith(f"config file {path}: ")
    assert message in str(caught.value)


def test_typed_values_a_file_may_hold(tmp_path: Path):
    path = write(tmp_path, "[watch]\ninterval = 2\nfailure_threshold = 4\n"
                           "[child]\nparent_death_signal = 15\n")  # fmt: skip
    s = load({}, str(path), environ={})
    assert (s.interval, s.failure_threshold, s.parent_death_signal) == (2.0, 4, 15)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [("3_0", 30.0), ("0x1e", 30.0), ("0o36", 30.0), ("3e1", 30.0), ("2_5.5", 25.5), ('"30"', 30.0),
     ('" 2.5 "', 2.5)],
)  # fmt: skip
def test_a_toml_number_is_any_number_toml_writes(tmp_path: Path, toml: str, expected: float):
    """In the file, a TOML number is what the TOML spec says it is (3_0 is the integer 30); a
    string holds a number as the environment writes it."""
    path = write(tmp_path, f"[watch]\ninterval = {toml}\nfailure_threshold = 1_0\n")
    s = load({}, str(path), environ={})
    assert (s.interval, s.failure_threshold) == (expected, 10)


@pytest.mark.parametrize(
    ("toml", "message"),
    [('"3_0"', "must be a number of seconds, got '3_0'"),
     ('"\u0663\u0660"', "must be a number of seconds, got '\u0663\u0660'"),
     ('"1e1"', "must be a number of seconds, got '1e1'"),
     ("inf", "must be a finite number of seconds up to 2592000, got inf"),
     ("nan", "must be a finite number of seconds up to 2592000, got nan")],
)  # fmt: skip
def test_a_toml_string_holds_only_a_plain_decimal(tmp_path: Path, toml: str, message: str):
    path = write(tmp_path, f"[watch]\ninterval = {toml}\n")
    with pytest.raises(ConfigError) as caught:
        load({}, str(path), environ={})
    assert str(caught.value) == f"config file {path}: [watch] interval: {message}"


def test_user_input_quoted_in_an_error_is_one_short_line():
    """An error message quotes a value, a key or a path as one line: escaped where it is not
    printable, whole up to the limit (60 characters, or the one given), else its start and its
    length."""
    assert clip("a" * 60) == "a" * 60
    assert clip("a" * 61) == "a" * 40 + "... (61 characters)"
    assert clip("c" * 200, 200) == "c" * 200
    assert clip("c" * 201, 200) == "c" * 180 + "... (201 characters)"
    assert clip("é ✓ 30s") == "é ✓ 30s"
    assert clip("x\ny\x1b") == "x\\ny\\x1b"
    assert clip("\n" * 40) == "\\n" * 20 + "... (80 characters)"  # measured escaped


def test_a_file_of_exactly_the_size_limit_is_read(tmp_path: Path):
    limit = 1024 * 1024
    path = write(tmp_path, "[watch]\ninterval = 7\n" + "#" * (limit - 22) + "\n")
    assert path.stat().st_size == limit and load({}, str(path), environ={}).interval == 7.0
    path.write_text(path.read_text() + "\n")
    with pytest.raises(ConfigError, match=f"larger than {limit} bytes; not a configuration"):
        load({}, str(path), environ={})


def test_where_the_configuration_file_is_looked_for(tmp_path: Path, monkeypatch):
    good = write(tmp_path, "[watch]\ninterval = 9\n")
    missing = str(tmp_path / "missing.toml")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", missing)
    assert load({}, environ={}).config_file is None  # no default file: defaults, quietly
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(good))
    assert (load({}, environ={}).config_file, load({}, environ={}).interval) == (str(good), 9.0)
    for flag, env in ((missing, {}), (None, {"GPU_SUPERVISE_CONFIG": missing})):
        with pytest.raises(ConfigError, match=f"config file {missing}: not found"):
            load({}, flag, environ=env)  # asked for by name: its absence is an error
    other = tmp_path / "other.toml"
    other.write_text("[watch]\ninterval = 8\n")
    assert load({}, str(other), environ={"GPU_SUPERVISE_CONFIG": missing}).interval == 8.0


def test_an_empty_config_variable_means_not_set(tmp_path: Path, monkeypatch):
    """GPU_SUPERVISE_CONFIG="" (a template that left it blank) names no file: the default path
    applies, as if it were unset; never "config file '' not found"."""
    missing = str(tmp_path / "missing.toml")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", missing)
    settings = load({}, environ={"GPU_SUPERVISE_CONFIG": ""})
    assert settings == load({}, environ={}) and settings.config_file is None
    default = write(tmp_path, "[watch]\ninterval = 9\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(default))
    settings = load({}, environ={"GPU_SUPERVISE_CONFIG": ""})
    assert (settings.config_file, settings.interval) == (str(default), 9.0)


def test_an_empty_config_variable_means_not_set_end_to_end():
    """The installed command, with no default file: it runs the agent."""
    assert not Path(config.DEFAULT_CONFIG).exists()
    out = run([*PLAIN, "--", "sh", "-c", "exit 3"], clean_env(GPU_SUPERVISE_CONFIG=""))
    assert out.returncode == 3, out.stderr
    assert "config file" not in out.stderr


def test_an_empty_config_variable_leaves_the_default_file_in_force(tmp_path: Path):
    """The installed command, with a default file: in a mount namespace of its own, where an
    overlay on /etc adds /etc/gpu-supervise/config.toml for this run alone."""
    if shutil.which("unshare") is None:
        missing_capability("no unshare (util-linux) to make a mount namespace")
    upper, work = tmp_path / "upper", tmp_path / "work"
    (upper / "gpu-supervise").mkdir(parents=True)
    work.mkdir()
    (upper / "gpu-supervise" / "config.toml").write_text('[log]\nformat = "json"\n')
    script = (
        'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc || exit 99\n'
        'shift 2; exec "$@"'
    )
    namespace = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    cmd = [*namespace, str(upper), str(work), *gpu_supervise_cmd(), *PLAIN, "--", "true"]
    out = subprocess.run(cmd, env=clean_env(GPU_SUPERVISE_CONFIG=""), capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
    if out.returncode == 99 or "unshare failed" in out.stderr:
        missing_capability(f"cannot overlay /etc in a mount namespace: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines and all(line.startswith("{") for line in lines), out.stderr
    assert all(json.loads(line)["program"] == "gpu-supervise" for line in lines)


def test_flag_names():
    names = [flag_name(s, k) for s, keys in SCHEMA.items() for k in keys]
    assert names == [
        "--enabled", "--interval", "--cooldown", "--settle", "--failure-threshold",
        "--probe-timeout", "--source", "--on-pending", "--pending-timeout",
        "--tripwire-interval", "--device-dir", "--procfs-root", "--stop-timeout",
        "--parent-death-signal", "--log-level", "--log-format", "--log-heartbeat",
        "--termination-log",
    ]  # fmt: skip


SERVICE_LINKS = {
    "GPU_SUPERVISE_SERVICE_HOST": "10.96.12.7",
    "GPU_SUPERVISE_SERVICE_PORT": "9400",
    "GPU_SUPERVISE_SERVICE_PORT_METRICS": "9400",
    "GPU_SUPERVISE_PORT": "tcp://10.96.12.7:9400",
    "GPU_SUPERVISE_PORT_9400_TCP": "tcp://10.96.12.7:9400",
    "GPU_SUPERVISE_PORT_9400_TCP_PROTO": "tcp",
    "GPU_SUPERVISE_PORT_9400_TCP_PORT": "9400",
    "GPU_SUPERVISE_PORT_9400_TCP_ADDR": "10.96.12.7",
    # a Service named gpu-supervise-metrics, over IPv6
    "GPU_SUPERVISE_METRICS_SERVICE_HOST": "fd00:10:96::7",
    "GPU_SUPERVISE_METRICS_PORT": "tcp://[fd00:10:96::7]:9400",
    "GPU_SUPERVISE_METRICS_PORT_9400_UDP_PROTO": "udp",
    "GPU_SUPERVISE_METRICS_PORT_53_SCTP_PORT": "65535",
    # a Service named gpu-supervise-sctp whose first port is SCTP
    "GPU_SUPERVISE_SCTP_PORT": "sctp://10.96.12.8:9400",
    "GPU_SUPERVISE_SCTP_PORT_9400_SCTP": "sctp://10.96.12.8:9400",
}
NOT_SERVICE_LINKS = [
    ("GPU_SUPERVISE_WATCH_INTERVALL", "5"),  # a typo of a real setting
    ("GPU_SUPERVISE_SERVICE_HOST", "gpu-node-1"),  # the name of a link, not its value
    ("GPU_SUPERVISE_SERVICE_HOST", "[fd00::7]"),
    ("GPU_SUPERVISE_PORT", "9400"),
    ("GPU_SUPERVISE_PORT", "tcp://10.96.12.7"),
    ("GPU_SUPERVISE_PORT", "tcp://10.96.12.7:99999"),
    ("GPU_SUPERVISE_PORT", "http://10.96.12.7:80"),
    ("GPU_SUPERVISE_PORT", "tcp://gpu-node:80"),
    ("GPU_SUPERVISE_PORT", "tcp://300.1.2.3:9400"),  # the shape of an address, not an address
    ("GPU_SUPERVISE_PORT_9400_TCP", "tcp://10.96.12.7.1:9400"),
    ("GPU_SUPERVISE_METRICS_PORT", "tcp://[fd00::10::7]:9400"),
    ("GPU_SUPERVISE_PORT_9400_TCP_PROTO", "http"),
    ("GPU_SUPERVISE_PORT_9400_TCP_PORT", "65536"),
    ("GPU_SUPERVISE_PORT_9400_TCP_PORT", "0"),
    ("GPU_SUPERVISE_PORT_9400_TCP_ADDR", "localhost"),
    ("GPU_SUPERVISE_SERVICE_PORT", "port"),
]


def test_service_links_are_recognised_by_name_and_value():
    assert load({}, environ=SERVICE_LINKS) == load({}, environ={})
    for name, value in NOT_SERVICE_LINKS:
        assert not is_service_link(name, value), (name, value)
        with pytest.raises(ConfigError, match=f"environment {name}: unknown setting"):
            load({}, environ={name: value})


@pytest.mark.parametrize(
    "name", ["GPU_SUPERVISE_PORT", "GPU_SUPERVISE_PORT_9400_SCTP", "GPU_SUPERVISE_SCTP_PORT"]
)
def test_an_sctp_service_link_is_a_service_link_not_a_setting(name: str):
    """A Service with an SCTP port makes the kubelet inject sctp:// URLs, as it does tcp:// and
    udp:// ones: ignored like them, or the agent's pod would never start."""
    for value in ("sctp://10.96.12.8:9400", "sctp://[fd00:10:96::8]:38412"):
        assert is_service_link(name, value), value
        assert load({}, environ={name: value}) == load({}, environ={})
    out = run([*PLAIN, "--", "sh", "-c", "exit 4"], clean_env(**{name: "sctp://10.96.12.8:9400"}))
    assert out.returncode == 4, out.stderr


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GPU_SUPERVISE_PORT", "tcp://300.1.2.3:9400"),
        ("GPU_SUPERVISE_PORT_9400_TCP", "tcp://10.96.12.7.1:9400"),
        ("GPU_SUPERVISE_PORT", "udp://1.2.3:53"),
        ("GPU_SUPERVISE_METRICS_PORT", "tcp://[fd00::10::7]:9400"),
    ],
)
def test_a_url_whose_address_is_not_an_ip_is_a_mistyped_setting(
    tmp_path: Path, name: str, value: str
):
    """The URL's shape alone (digits and dots, or hex and colons) does not make a service link:
    its address must be an IP, so a mistyped setting with such a value still stops the start."""
    assert not is_service_link(name, value)
    with pytest.raises(ConfigError, match=f"^environment {name}: unknown setting"):
        load({}, environ={name: value})
    marker = tmp_path / "started"
    out = run([*PLAIN, "--", "touch", str(marker)], clean_env(**{name: value}))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"gpu-supervise: environment {name}: unknown setting")
    assert not marker.exists()


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
        (["--interval", "nan"], {}, "--interval: must be a number of seconds, got 'nan'"),
        (["--interval", "3_0"], {}, "--interval: must be a number of seconds, got '3_0'"),
        (["--interval", "\u0663\u0660"], {}, "--interval: must be a number of seconds"),
        (["--interval", "0.01"], {}, "--interval: must be at least 0.1 s, got '0.01'"),
        (["--settle", "0.01"], {}, "--settle: must be 0 (act at first sight) or at least 0.1 s"),
        (["--probe-timeout", "0.05"], {}, "--probe-timeout: must be at least 0.1 s"),
        (["--stop-timeout", "1e400"], {}, "--stop-timeout: must be a number of seconds"),
        (["--stop-timeout", "1" + "0" * 400], {}, "--stop-timeout: must be a finite number of"),
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
    assert s.interval == 30.0
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


# -- `gpu-supervise config`: the settings in force, and the layer that set each -----------------


def _config_lines(stdout: str) -> dict[str, tuple[str, str, str, str]]:
    """`config`'s key lines: key -> (value, environment variable, flag, layer)."""
    out = {}
    for line in stdout.splitlines():
        if line and not line.startswith(("#", "[")):
            left, note = line.split("  # ", 1)
            key, value = (part.strip() for part in left.split(" = ", 1))
            env, flag, layer = note.split(None, 2)
            out[key] = (value, env, flag, layer)
    return out


def test_config_shows_every_layer_and_every_key_s_names(tmp_path: Path):
    path = write(tmp_path, "[watch]\ncooldown = 2.5\ninterval = 9\n[log]\nlevel = 'debug'\n")
    env = clean_env(GPU_SUPERVISE_WATCH_INTERVAL="7", GPU_SUPERVISE_CHILD_STOP_TIMEOUT="4")
    out = run(["config", "--config", str(path), "--no-watch", "--settle", "0", "--log-level",
               "error"], env)  # fmt: skip
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert f"# file: {path} (named by --config)" in out.stdout.splitlines()
    lines = _config_lines(out.stdout)
    assert list(lines) == [k for keys in SCHEMA.values() for k in keys]
    assert lines["enabled"] == ("false", "GPU_SUPERVISE_WATCH_ENABLED", "--no-watch", "flag")
    assert lines["settle"] == ("0", "GPU_SUPERVISE_WATCH_SETTLE", "--settle", "flag")
    assert lines["level"] == ('"ERROR"', "GPU_SUPERVISE_LOG_LEVEL", "--log-level", "flag")
    assert lines["interval"] == ("7", "GPU_SUPERVISE_WATCH_INTERVAL", "--interval", "environment")
    assert lines["stop_timeout"] == ("4", "GPU_SUPERVISE_CHILD_STOP_TIMEOUT", "--stop-timeout",
                                     "environment")  # fmt: skip
    assert lines["cooldown"] == ("2.5", "GPU_SUPERVISE_WATCH_COOLDOWN", "--cooldown",
                                 f"file {path}")  # fmt: skip
    assert lines["probe_timeout"] == ("10", "GPU_SUPERVISE_WATCH_PROBE_TIMEOUT", "--probe-timeout",
                                      "default")  # fmt: skip
    for section, keys in SCHEMA.items():
        for key in keys:
            _, env_var, flag, _ = lines[key]
            assert (env_var, flag) == (env_name(section, key), config.cli_flag(section, key))
            assert flag in cli.FLAGS or flag == "--no-watch"


def test_config_names_where_the_file_came_from(tmp_path: Path):
    path = write(tmp_path, "[watch]\ninterval = 9\n")
    out = run(["config"], clean_env(GPU_SUPERVISE_CONFIG=str(path)))
    assert f"# file: {path} (named by $GPU_SUPERVISE_CONFIG)" in out.stdout.splitlines()
    assert _config_lines(out.stdout)["interval"][3] == f"file {path}"
    assert not Path(config.DEFAULT_CONFIG).exists()
    out = run(["config"], clean_env())
    assert out.returncode == 0, out.stderr
    assert "# file: none (/etc/gpu-supervise/config.toml does not exist; --config or " \
        "$GPU_SUPERVISE_CONFIG names one)" in out.stdout.splitlines()  # fmt: skip
    assert {layer for *_, layer in _config_lines(out.stdout).values()} == {"default"}


def test_config_prints_a_file_that_loads_back_to_the_same_settings(tmp_path: Path):
    """What `config` prints is itself a configuration: every key at a value other than its
    default, strings that need escapes included, read back to the very same settings."""
    environ = {
        env_name(s, k): raw.format(example=EXAMPLE) for (s, k), (raw, *_) in EVERY_KEY.items()
    }
    environ["GPU_SUPERVISE_REPORT_TERMINATION_LOG"] = '/x/"q"\\b\n\x7f\x85é\U0001f600'
    environ["GPU_SUPERVISE_CHILD_PARENT_DEATH_SIGNAL"] = "40"  # a real-time signal: no name
    settings, origins = config.load_traced({}, None, environ)
    text = config.render(settings, origins)
    assert all(line.isprintable() for line in text.splitlines())
    assert load({}, str(write(tmp_path, text)), environ={}) == _with_file(
        settings, str(tmp_path / "config.toml")
    )
    assert load({}, environ={}) != settings
    defaults = config.render(*config.load_traced({}, None, {}))
    assert load({}, str(write(tmp_path, defaults)), environ={}) == _with_file(
        load({}, environ={}), str(tmp_path / "config.toml")
    )


def _with_file(settings: config.Settings, path: str) -> config.Settings:
    """The same settings, read from the file at `path`."""
    values = {name: getattr(settings, name) for name in settings.__slots__}
    values.pop("config_file")
    return config.Settings(path, **values)


@pytest.mark.parametrize(
    ("args", "env", "text", "message"),
    [
        (["--interval", "0"], {}, None, "gpu-supervise: --interval: must be at least 0.1 s"),
        (["--interval", "3_0"], {}, None, "gpu-supervise: --interval: must be a number of"),
        ([], {"GPU_SUPERVISE_CHILD_STOP_TIMEOUT": "-1"}, None,
         "gpu-supervise: environment GPU_SUPERVISE_CHILD_STOP_TIMEOUT: must be 0 or more"),
        ([], {"GPU_SUPERVISE_CHILD_STOP_TIMOUT": "5"}, None,
         "gpu-supervise: environment GPU_SUPERVISE_CHILD_STOP_TIMOUT: unknown setting"),
        (["--config"], {}, "[child]\nstop_timeout = 'soon'\n",
         "[child] stop_timeout: must be a number of seconds, got 'soon'"),
        (["--bogus"], {}, None, "gpu-supervise: unrecognized arguments: --bogus"),
        (["echo"], {}, None, "gpu-supervise: unrecognized arguments: echo"),
    ],
)  # fmt: skip
def test_invalid_settings_are_one_line_exit_2_and_nothing_runs(
    tmp_path: Path, args: list[str], env: dict, text: str | None, message: str
):
    if text is not None:
        args = [*args, str(write(tmp_path, text))]
    marker = tmp_path / "started"
    out = run(["config", *args, "--", "touch", str(marker)], clean_env(**env))
    assert out.returncode == 2 and out.stdout == "", out.stderr
    assert message in out.stderr and out.stderr.startswith("gpu-supervise: ")
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert not marker.exists()


def test_config_never_runs_the_command_after_the_double_dash(tmp_path: Path):
    marker = tmp_path / "started"
    out = run(["config", "--interval", "5", "--", "touch", str(marker)], clean_env())
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert _config_lines(out.stdout)["interval"] == ("5", "GPU_SUPERVISE_WATCH_INTERVAL",
                                                     "--interval", "flag")  # fmt: skip
    assert not marker.exists()


def test_config_into_a_closed_pipe_is_no_internal_error():
    """`gpu-supervise config | head -1`: the reader is gone before the end; not exit 70."""
    read, write_end = os.pipe()
    os.close(read)  # no reader at all: the first write fails with EPIPE
    try:
        out = subprocess.run([*gpu_supervise_cmd(), "config"], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, env=clean_env(), timeout=60,
                             stdin=subprocess.DEVNULL)  # fmt: skip
    finally:
        os.close(write_end)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_help_names_the_config_command():
    out = run(["--help"], clean_env())
    assert "gpu-supervise config [OPTIONS] prints the settings in force" in out.stdout
    assert "snapshot|demo|install|config --help" in out.stdout
    out = run(["config", "--help"], clean_env())
    assert out.returncode == 0 and "--stop-timeout" in out.stdout and "--no-watch" in out.stdout


RENDERED = """\
# The settings in force; precedence: flags > environment > file > defaults.
# file: {path} (named by --config)

# key = value                     # environment variable                     flag                   set by

[watch]
enabled = false                   # GPU_SUPERVISE_WATCH_ENABLED              --no-watch             flag
interval = 30                     # GPU_SUPERVISE_WATCH_INTERVAL             --interval             default
cooldown = 2.5                    # GPU_SUPERVISE_WATCH_COOLDOWN             --cooldown             file {path}
settle = 5                        # GPU_SUPERVISE_WATCH_SETTLE               --settle               default
failure_threshold = 3             # GPU_SUPERVISE_WATCH_FAILURE_THRESHOLD    --failure-threshold    default
probe_timeout = 10                # GPU_SUPERVISE_WATCH_PROBE_TIMEOUT        --probe-timeout        default
source = "nvml"                   # GPU_SUPERVISE_WATCH_SOURCE               --source               default
on_pending = "hold"               # GPU_SUPERVISE_WATCH_ON_PENDING           --on-pending           default
pending_timeout = 300             # GPU_SUPERVISE_WATCH_PENDING_TIMEOUT      --pending-timeout      default
tripwire_interval = 1             # GPU_SUPERVISE_WATCH_TRIPWIRE_INTERVAL    --tripwire-interval    default
device_dir = "/dev"               # GPU_SUPERVISE_WATCH_DEVICE_DIR           --device-dir           default
procfs_root = "/proc/driver/nvidia"  # GPU_SUPERVISE_WATCH_PROCFS_ROOT          --procfs-root          default

[child]
stop_timeout = 3                  # GPU_SUPERVISE_CHILD_STOP_TIMEOUT         --stop-timeout         flag
parent_death_signal = "SIGTERM"   # GPU_SUPERVISE_CHILD_PARENT_DEATH_SIGNAL  --parent-death-signal  environment

[log]
level = "INFO"                    # GPU_SUPERVISE_LOG_LEVEL                  --log-level            default
format = "text"                   # GPU_SUPERVISE_LOG_FORMAT                 --log-format           default
heartbeat = 3600                  # GPU_SUPERVISE_LOG_HEARTBEAT              --log-heartbeat        default

[report]
termination_log = "/dev/termination-log"  # GPU_SUPERVISE_REPORT_TERMINATION_LOG     --termination-log      default"""  # noqa: E501


def test_config_text_in_full(tmp_path: Path):
    """In process, where mutation testing sees it: the layers load_traced records, and the
    text render makes of them, to the character."""
    path = write(tmp_path, "[watch]\ncooldown = 2.5\n")
    flags = {("child", "stop_timeout"): "3", ("watch", "enabled"): False}
    env = {"GPU_SUPERVISE_CHILD_PARENT_DEATH_SIGNAL": "term"}
    settings, origins = config.load_traced(flags, str(path), env)
    layers = {(s, k): "default" for s, keys in SCHEMA.items() for k in keys}
    layers |= {("watch", "enabled"): "flag --no-watch", ("child", "stop_timeout"):
               "flag --stop-timeout", ("watch", "cooldown"): f"file {path}",
               ("child", "parent_death_signal"): "environment "
               "GPU_SUPERVISE_CHILD_PARENT_DEATH_SIGNAL", ("", ""): "--config"}  # fmt: skip
    assert origins == layers
    assert config.render(settings, origins) == RENDERED.format(path=path)


def test_config_text_names_the_default_file_or_its_absence(tmp_path: Path, monkeypatch):
    default = write(tmp_path, "[log]\nheartbeat = 0\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", str(default))
    text = config.render(*config.load_traced({}, None, {}))
    assert f"# file: {default} (the default path)" in text.splitlines()
    assert next(line for line in text.splitlines() if line.startswith("heartbeat")) == (
        "heartbeat = 0                     # GPU_SUPERVISE_LOG_HEARTBEAT              "
        f"--log-heartbeat        file {default}"
    )
    monkeypatch.setattr(config, "DEFAULT_CONFIG", "/nonexistent/config.toml")
    text = config.render(*config.load_traced({}, None, {"GPU_SUPERVISE_CONFIG": ""}))
    assert text.splitlines()[1] == ("# file: none (/nonexistent/config.toml does not exist; "
                                    "--config or $GPU_SUPERVISE_CONFIG names one)")  # fmt: skip
    assert '\nparent_death_signal = ""   ' in text


def test_a_bad_flag_names_the_flag_in_process():
    with pytest.raises(ConfigError, match=r"^--interval: must be at least 0\.1 s, got '0'$"):
        config.load_traced({("watch", "interval"): "0"}, None, {})
    with pytest.raises(ConfigError, match=r"^--log-level: must be one of TRACE"):
        load({("log", "level"): "loud"}, environ={})


# -- Kubernetes service links ----------------------------------------------------------------------


@pytest.mark.slow
def test_kubernetes_service_links_are_not_settings():
    out = run([*PLAIN, "--", "sh", "-c", "exit 4"], clean_env(**SERVICE_LINKS))
    assert out.returncode == 4, out.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("name", "value"), NOT_SERVICE_LINKS)
def test_a_variable_that_only_looks_like_a_service_link_is_an_error(name: str, value: str):
    out = run([*PLAIN, "--", "true"], clean_env(**{name: value}))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith(f"gpu-supervise: environment {name}: unknown setting")


# -- a config file that is not a file --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero"])
def test_a_config_file_that_is_not_a_file_is_one_line(tmp_path: Path, kind: str):
    path = tmp_path / "config.toml"
    if kind == "fifo":
        os.mkfifo(path)  # opened for reading, it would block until a writer came
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path(kind)
    out = run(["--config", str(path), "--", "true"], clean_env(), timeout=30)
    assert out.returncode == 2
    assert out.stderr == f"gpu-supervise: config file {path}: cannot read (not a regular file)\n"
