"""Configuration: defaults < TOML file < environment < flags, validated into frozen Settings.

Every key is declared once in SCHEMA with its type, default and rule; the file, the
environment (`GPU_SUPERVISE_<SECTION>_<KEY>`) and the flags all go through the same checks,
so a bad value reads the same wherever it came from. Any problem raises ConfigError with one
line naming where the value came from; the CLI turns it into exit 2 before anything starts.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .files import read_regular_file
from .text import clip

DEFAULT_CONFIG = "/etc/gpu-supervise/config.toml"  # a plain str: pathlib costs start time
ENV_PREFIX = "GPU_SUPERVISE_"
ENV_CONFIG = "GPU_SUPERVISE_CONFIG"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """A user error in configuration: one line, exit 2, nothing started."""


# -- value rules ------------------------------------------------------------------------------


MIN_PERIOD = 0.1  # seconds: a shorter interval, settle or probe deadline only burns a core
MAX_SECONDS = 30 * 86400.0  # 30 days: longer is "never", and overflows select() and locks
MAX_THRESHOLD = 1_000_000


MAX_FILE_BYTES = 1024 * 1024


def _show(value: Any) -> str:
    """A value as an error message shows it: its repr, clipped."""
    return clip(repr(value))


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"must be true or false, got {_show(value)}")


def _is_decimal(text: str) -> bool:
    """`30`, `-1`, `2.5`: ASCII digits with an optional sign and fraction, the form the docs
    give. Not all that float() and int() take: `3_0`, `1e3`, `inf`, or Arabic-Indic and
    full-width digits would pass a typo off as a number. (A fraction where a whole number is
    wanted is int()'s to refuse.)"""
    digits = text[1:] if text[:1] in ("+", "-") else text
    whole, dot, part = digits.partition(".")
    return all(p.isascii() and p.isdigit() for p in ((whole, part) if dot else (whole,)))


def _number(value: Any) -> float:
    wrong = f"must be a number of seconds, got {_show(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(wrong)
    if isinstance(value, str) and not _is_decimal(value.strip()):
        raise ValueError(wrong)
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_SECONDS:
        raise ValueError(
            f"must be a finite number of seconds up to {MAX_SECONDS:.0f}, got {_show(value)}"
        )
    return number


def _period(value: Any) -> float:
    """Something done again and again (a probe, its deadline): at least MIN_PERIOD."""
    number = _number(value)
    if number < MIN_PERIOD:
        raise ValueError(f"must be at least {MIN_PERIOD:g} s, got {_show(value)}")
    return number


def _zero_or_period(zero_means: str) -> Callable[[Any], float]:
    """0 (which means `zero_means`) or a period (at least MIN_PERIOD)."""

    def check(value: Any) -> float:
        number = _number(value)
        if number != 0 and number < MIN_PERIOD:
            raise ValueError(f"must be 0 ({zero_means}) or at least {MIN_PERIOD:g} s, got "
                             f"{_show(value)}")  # fmt: skip
        return number

    return check


_settle = _zero_or_period("act at first sight")


def _non_negative(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, got {_show(value)}")
    return number


def _threshold(value: Any) -> int:
    wrong = f"must be a whole number from 1 to {MAX_THRESHOLD}, got {_show(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(wrong)
    if isinstance(value, str) and not _is_decimal(value.strip()):
        raise ValueError(wrong)
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:  # Python's limit on the digits of an int
        raise ValueError(wrong) from None
    if not 1 <= number <= MAX_THRESHOLD:
        raise ValueError(wrong)
    return number


def _choice(*choices: str, upper: bool = False) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, str):
            text = value.strip().upper() if upper else value.strip().lower()
            if text in choices:
                return text
        raise ValueError(f"must be one of {', '.join(choices)}, got {_show(value)}")

    return check


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_show(value)}")
    return value


def _path(value: Any) -> str:
    """A path, made absolute: gpu-supervise leaves its working directory once the agent runs
    (so that nothing holds it), and what it reads later must not move with it. '' stays ''."""
    path = _string(value)
    if not path or os.path.isabs(path):
        return path
    try:
        return os.path.join(os.getcwd(), path)
    except OSError:  # the working directory is gone: the path names nothing either way
        return path


def _source(value: Any) -> str:
    spec = _string(value).strip()
    if spec == "nvml":
        return spec
    if spec.startswith("file:") and len(spec) > len("file:"):
        path = _path(spec[len("file:") :])
        if not os.path.isfile(path):
            raise ValueError(f"{_show(path)} is not a file (a `snapshot --json` document)")
        return f"file:{path}"
    raise ValueError(f"unknown source {_show(spec)} (expected 'nvml' or 'file:PATH')")


def _signal(value: Any) -> int:
    """A signal by name (SIGTERM, term) or number; '' or 0 for none."""
    import signal

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be a signal name such as SIGTERM, got {_show(value)}")
    text = value.strip().upper() if isinstance(value, str) else str(value)
    if text in ("", "0", "NONE"):
        return 0
    try:
        number = (
            int(text)
            if text.isascii() and text.isdigit()
            else signal.Signals[text if text.startswith("SIG") else "SIG" + text].value
        )
    except (KeyError, ValueError):
        number = -1
    if number not in signal.valid_signals():
        raise ValueError(f"must be a signal name such as SIGTERM, got {_show(value)}")
    return int(number)


class Key:
    """One configuration key: its default, the check every layer's value goes through, and the
    help text and value's name (metavar) --help shows."""

    __slots__ = ("default", "check", "help", "metavar")

    def __init__(
        self, default: Any, check: Callable[[Any], Any], help: str, metavar: str = "SECONDS"
    ) -> None:
        self.default, self.check, self.help, self.metavar = default, check, help, metavar


SCHEMA: dict[str, dict[str, Key]] = {
    "watch": {
        "enabled": Key(True, _boolean, "watch the GPU topology at all", "true|false"),
        "interval": Key(30.0, _period, "seconds between probes"),
        "cooldown": Key(60.0, _non_negative, "seconds after start before the first comparison"),
        "settle": Key(
            5.0, _settle, "seconds to confirm a change before acting (0: act at first sight)"
        ),
        "failure_threshold": Key(
            3, _threshold, "consecutive failed probes that force a restart", "COUNT"
        ),
        "probe_timeout": Key(10.0, _period, "seconds a probe may take before it counts failed"),
        "source": Key(
            "nvml", _source, "'nvml', or 'file:PATH' (a snapshot --json document)", "nvml|file:PATH"
        ),
        "on_pending": Key(
            "hold",
            _choice("hold", "ignore"),
            "'hold': stop the agent while a MIG mode change waits for a GPU reset; 'ignore': log "
            "it once and keep the agent running",
            "hold|ignore",
        ),
        "pending_timeout": Key(
            300.0, _period, "seconds to hold for each pending GPU before starting the agent again"
        ),
        "tripwire_interval": Key(
            1.0,
            _zero_or_period("off"),
            "seconds between listings of the driver's MIG tree in procfs, which make a probe "
            "come at once when it changes (0: off, the poll alone)",
        ),
        "device_dir": Key(
            "/dev",
            _path,
            "where the NVIDIA device files are, for the scan that names who blocks a GPU reset "
            "while holding (for tests and debugging)",
            "PATH",
        ),
        "procfs_root": Key(
            "/proc/driver/nvidia",
            _path,
            "the NVIDIA driver's procfs folder the tripwire lists (for tests and debugging)",
            "PATH",
        ),
    },
    "child": {
        "stop_timeout": Key(10.0, _non_negative, "seconds between SIGTERM and SIGKILL"),
        "parent_death_signal": Key(
            "",
            _signal,
            "signal gpu-supervise gets when its parent dies, handled as if sent (SIGTERM stops "
            "the agent), and the agent gets if gpu-supervise dies (e.g. SIGTERM); '' none",
            "SIGNAL",
        ),
    },
    "log": {
        "level": Key(
            "INFO",
            _choice(*LOG_LEVELS, upper=True),
            f"minimum level logged: {', '.join(LOG_LEVELS)}",
            "LEVEL",
        ),
        "format": Key(
            "text", _choice("text", "json"), "'text', or 'json' (one object a line)", "text|json"
        ),
        "heartbeat": Key(
            3600.0,
            _zero_or_period("off"),
            "seconds between INFO lines that say the watcher is alive (probes, failures, the "
            "layout); 0: off",
        ),
    },
    "report": {
        "termination_log": Key(
            "/dev/termination-log",
            _path,
            "file for the restart reason when it exists (Kubernetes); '' disables",
            "PATH",
        ),
    },
}


def attr_name(section: str, key: str) -> str:
    """The Settings attribute of a key: the key's own name, but where it reads badly alone."""
    return f"{section}_{key}" if (section, key) in _PREFIXED else key


_PREFIXED = {("watch", "enabled"), ("log", "level"), ("log", "format"), ("log", "heartbeat")}


def _default(section: str, key: str) -> Any:
    return SCHEMA[section][key].default


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, validated and merged, frozen once loaded: one field per SCHEMA key
    (attr_name), with its default, and where the configuration file was read from."""

    config_file: str | None = None
    watch_enabled: bool = _default("watch", "enabled")
    interval: float = _default("watch", "interval")
    cooldown: float = _default("watch", "cooldown")
    settle: float = _default("watch", "settle")
    failure_threshold: int = _default("watch", "failure_threshold")
    probe_timeout: float = _default("watch", "probe_timeout")
    source: str = _default("watch", "source")
    on_pending: str = _default("watch", "on_pending")
    pending_timeout: float = _default("watch", "pending_timeout")
    tripwire_interval: float = _default("watch", "tripwire_interval")
    device_dir: str = _default("watch", "device_dir")
    procfs_root: str = _default("watch", "procfs_root")
    stop_timeout: float = _default("child", "stop_timeout")
    parent_death_signal: int = _default("child", "parent_death_signal")
    log_level: str = _default("log", "level")
    log_format: str = _default("log", "format")
    log_heartbeat: float = _default("log", "heartbeat")
    termination_log: str = _default("report", "termination_log")

    @property
    def tripwire_every(self) -> float:
        """The tripwire's interval in force: 0 when it is off, as it is for a file source (the
        driver's tree says nothing about one)."""
        return self.tripwire_interval if self.source == "nvml" else 0.0

    @classmethod
    def from_values(
        cls, values: Mapping[tuple[str, str], Any], config_file: str | None
    ) -> Settings:
        return cls(config_file, **{attr_name(s, k): v for (s, k), v in values.items()})


def flag_name(section: str, key: str) -> str:
    """`--interval`, `--stop-timeout`; the [log] keys read better as `--log-level`."""
    name = f"{section}_{key}" if section == "log" else key
    return "--" + name.replace("_", "-")


def cli_flag(section: str, key: str) -> str:
    """The flag that sets a key on the command line: flag_name, but --no-watch for watch.enabled,
    which a flag only turns off."""
    return "--no-watch" if (section, key) == ("watch", "enabled") else flag_name(section, key)


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def load(
    flags: Mapping[tuple[str, str], Any],
    config_flag: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge every layer. `flags` holds only the flags actually given, keyed (section, key)."""
    return load_traced(flags, config_flag, environ)[0]


def load_traced(
    flags: Mapping[tuple[str, str], Any],
    config_flag: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[tuple[str, str], str]]:
    """load, and for every key the layer that set it: `default`, `file PATH`, `environment
    NAME` or `flag --NAME` (what `gpu-supervise config` shows); under ("", "") what named the
    configuration file (--config, $GPU_SUPERVISE_CONFIG, or '' for the default path)."""
    environ = os.environ if environ is None else environ
    values: dict[tuple[str, str], Any] = {
        (section, key): spec.check(spec.default)
        for section, keys in SCHEMA.items()
        for key, spec in keys.items()
    }
    origins = dict.fromkeys(values, "default")
    path, origins["", ""] = _config_path(config_flag, environ)
    if path is not None:
        found = _from_file(path, explicit=bool(origins["", ""]))
        values.update(found)
        origins.update(dict.fromkeys(found, f"file {clip(path, 200)}"))
    found = _from_env(environ)
    values.update(found)
    origins.update({(s, k): f"environment {env_name(s, k)}" for s, k in found})
    for (section, key), raw in flags.items():
        values[section, key] = _check(section, key, raw, flag_name(section, key))
        origins[section, key] = f"flag {cli_flag(section, key)}"
    return Settings.from_values(values, path), origins


def render(settings: Settings, origins: Mapping[tuple[str, str], str]) -> str:
    """The settings in force as a TOML document that loads back to them, each key with its
    environment variable, its flag and the layer that set it: what `gpu-supervise config`
    prints, so that nobody has to work out what a file, an environment and flags add up to, or
    what a key's variable is called."""
    value = lambda s, k: _toml_value(s, k, getattr(settings, attr_name(s, k)))  # noqa: E731
    rows = [
        (section, f"{key} = {value(section, key)}", env_name(section, key),
         cli_flag(section, key), _layer(origins[section, key]))
        for section, keys in SCHEMA.items()
        for key in keys
    ]  # fmt: skip
    width = min(max(len(row[1]) for row in rows), 32)
    env_width = max(len(row[2]) for row in rows)
    flag_width = max(len(row[3]) for row in rows)
    lines = [
        "# The settings in force; precedence: flags > environment > file > defaults.",
        f"# file: {_file_note(settings.config_file, origins['', ''])}",
        "",
        f"# {'key = value'.ljust(width - 2)}  # {'environment variable'.ljust(env_width)}  "
        f"{'flag'.ljust(flag_width)}  set by",
    ]
    for section in SCHEMA:
        lines += ["", f"[{section}]"]
        lines += [
            f"{left.ljust(width)}  # {env.ljust(env_width)}  {flag.ljust(flag_width)}  {layer}"
            for s, left, env, flag, layer in rows
            if s == section
        ]
    return "\n".join(lines)


def _layer(origin: str) -> str:
    """`environment` and `flag` alone beside the variable's and the flag's names; `default`
    and `file PATH` whole."""
    return origin.split(" ", 1)[0] if origin.startswith(("environment ", "flag ")) else origin


def _file_note(path: str | None, named_by: str) -> str:
    if path is None:
        return (f"none ({DEFAULT_CONFIG} does not exist; --config or ${ENV_CONFIG} names "
                "one)")  # fmt: skip
    return f"{clip(path, 200)} ({f'named by {named_by}' if named_by else 'the default path'})"


def _toml_value(section: str, key: str, value: Any) -> str:
    """A validated value as TOML writes it, and as the file reads it back: 30, not 30.0;
    a signal by name."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if (section, key) == ("child", "parent_death_signal"):
        return _toml_string(_signal_name(value))
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value) if isinstance(value, int) else _toml_string(value)


def _signal_name(number: int) -> str:
    import signal

    if number == 0:
        return ""
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal, which has no name of its own
        return str(number)


def _toml_string(text: str) -> str:
    """A TOML basic string, printable: quotes and backslashes escaped, and every character
    that is not printable as a \\u escape."""
    escaped = (
        "\\" + ch if ch in '"\\'
        else ch if ch.isprintable()
        else f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF
        else f"\\U{ord(ch):08x}"
        for ch in text
    )  # fmt: skip
    return '"' + "".join(escaped) + '"'


def _check(section: str, key: str, raw: Any, where: str) -> Any:
    try:
        return SCHEMA[section][key].check(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _config_path(flag: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """The configuration file, and what named it: --config, $GPU_SUPERVISE_CONFIG, or '' for
    the default path (read only if it exists)."""
    if flag is not None:
        return flag, "--config"
    if environ.get(ENV_CONFIG):
        return environ[ENV_CONFIG], f"${ENV_CONFIG}"
    if os.path.exists(DEFAULT_CONFIG):
        return DEFAULT_CONFIG, ""
    return None, ""


def _from_file(path: str, explicit: bool) -> dict[tuple[str, str], Any]:
    where = f"config file {clip(path, 200)}"
    try:
        data = read_regular_file(path, MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        if not explicit:
            return {}
        raise ConfigError(f"{where}: not found") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_FILE_BYTES} bytes; not a configuration")
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: TOML syntax error: {clip(str(exc), 200)}") from None
    except RecursionError:  # arrays nested thousands deep
        raise ConfigError(f"{where}: TOML nested too deeply") from None
    out: dict[tuple[str, str], Any] = {}
    for section, table in doc.items():
        if section not in SCHEMA:
            homes = [f"[{s}]" for s, keys in SCHEMA.items() if section in keys]
            if homes and not isinstance(table, dict):
                raise ConfigError(f"{where}: {section} belongs in its section: {homes[0]}")
            known = ", ".join(f"[{s}]" for s in SCHEMA)
            raise ConfigError(f"{where}: unknown section [{clip(section)}] (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {section} must be a table [{section}]")
        for key, raw in table.items():
            if key not in SCHEMA[section]:
                known = ", ".join(SCHEMA[section])
                raise ConfigError(
                    f"{where}: unknown key '{clip(key)}' in [{section}] (known: {known})"
                )
            out[section, key] = _check(section, key, raw, f"{where}: [{section}] {key}")
    return out


def _from_env(environ: Mapping[str, str]) -> dict[tuple[str, str], Any]:
    names = {env_name(s, k): (s, k) for s, keys in SCHEMA.items() for k in keys}
    out: dict[tuple[str, str], Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        if name not in names:
            if is_service_link(name, raw):
                continue
            raise ConfigError(
                f"environment {clip(name)}: unknown setting (e.g. {env_name('watch', 'interval')})"
            )
        section, key = names[name]
        out[section, key] = _check(section, key, raw, f"environment {name}")
    return out


# Kubernetes service links: a Service named gpu-supervise (or gpu-supervise-*) in the pod's
# namespace makes the kubelet inject these, unless the pod sets enableServiceLinks: false.
# A name can have two readings (GPU_SUPERVISE_SERVICE_PORT: the port of Service gpu-supervise,
# or the URL of Service gpu-supervise-service), so each shape is tried with its value's shape.
_SVC = r"GPU_SUPERVISE(?:_[A-Z0-9_]+)?"
_PROTO_PORT = r"_[0-9]+_(?:TCP|UDP|SCTP)"  # _443_TCP
_PORT = r"[1-9][0-9]{0,4}"
_URL = (
    r"(?:tcp|udp|sctp)://(?:\[(?P<ip6>[0-9a-fA-F:.]+)\]|(?P<ip4>[0-9.]+)):(?P<port>" + _PORT + ")"
)


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_port(value: str) -> bool:
    return re.fullmatch(_PORT, value) is not None and int(value) <= 65535


def _is_url(value: str) -> bool:
    match = re.fullmatch(_URL, value)
    return match is not None and _is_ip(match["ip6"] or match["ip4"]) and _is_port(match["port"])


_SERVICE_LINKS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    (_SVC + r"_SERVICE_HOST", _is_ip),
    (_SVC + r"_SERVICE_PORT(?:_[A-Z0-9_]+)?", _is_port),
    (_SVC + rf"_PORT(?:{_PROTO_PORT})?", _is_url),
    (_SVC + rf"_PORT{_PROTO_PORT}_PROTO", lambda v: v in ("tcp", "udp", "sctp")),
    (_SVC + rf"_PORT{_PROTO_PORT}_PORT", _is_port),
    (_SVC + rf"_PORT{_PROTO_PORT}_ADDR", _is_ip),
)


def is_service_link(name: str, value: str) -> bool:
    """Exactly the variables Kubernetes' service links make, with values of their shape: one
    that only looks like one (a mistyped setting) stays an error."""
    return any(re.fullmatch(shape, name) and valid(value) for shape, valid in _SERVICE_LINKS)
