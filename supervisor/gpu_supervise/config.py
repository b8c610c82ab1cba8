"""Configuration: defaults < TOML file < environment < flags, validated into frozen Settings.

Every key is declared once in SCHEMA with its type, default and rule; the file, the
environment (`GPU_SUPERVISE_<SECTION>_<KEY>`) and the flags all go through the same checks,
so a bad value reads the same wherever it came from. Any problem raises ConfigError with one
line naming where the value came from; the CLI turns it into exit 2 before anything starts.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .watch import WatchPolicy

DEFAULT_CONFIG = "/etc/gpu-supervise/config.toml"  # a plain str: pathlib costs start time
ENV_PREFIX = "GPU_SUPERVISE_"
ENV_CONFIG = "GPU_SUPERVISE_CONFIG"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """A user error in configuration: one line, exit 2, nothing started."""


# -- value rules ------------------------------------------------------------------------------


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"must be true or false, got {value!r}")


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"must be a number of seconds, got {value!r}")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"must be a number of seconds, got {value!r}") from None
    else:
        raise ValueError(f"must be a number of seconds, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number of seconds, got {value!r}")
    return number


def _positive(value: Any) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError(f"must be greater than 0, got {value!r}")
    return number


def _non_negative(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"must be 0 or more, got {value!r}")
    return number


def _threshold(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"must be a whole number of at least 1, got {value!r}")
    try:
        number = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"must be a whole number of at least 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"must be at least 1, got {value!r}")
    return number


def _choice(*choices: str, upper: bool = False) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, str):
            text = value.strip().upper() if upper else value.strip().lower()
            if text in choices:
                return text
        raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")

    return check


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    return value


def _source(value: Any) -> str:
    spec = _string(value).strip()
    if spec == "nvml" or (spec.startswith("file:") and len(spec) > len("file:")):
        return spec
    raise ValueError(f"unknown source {spec!r} (expected 'nvml' or 'file:PATH')")


@dataclass(frozen=True)
class Key:
    default: Any
    check: Callable[[Any], Any]
    help: str


SCHEMA: dict[str, dict[str, Key]] = {
    "watch": {
        "enabled": Key(True, _boolean, "watch the GPU topology at all"),
        "interval": Key(30.0, _positive, "seconds between probes"),
        "cooldown": Key(60.0, _non_negative, "seconds after start before the first comparison"),
        "settle": Key(5.0, _non_negative, "seconds to confirm a change before acting; 0 acts"),
        "failure_threshold": Key(3, _threshold, "consecutive failed probes that force a restart"),
        "probe_timeout": Key(10.0, _positive, "seconds a probe may take before it counts failed"),
        "source": Key("nvml", _source, "'nvml', or 'file:PATH' (a snapshot --json document)"),
    },
    "child": {
        "stop_timeout": Key(10.0, _non_negative, "seconds between SIGTERM and SIGKILL"),
    },
    "log": {
        "level": Key("INFO", _choice(*LOG_LEVELS, upper=True), "minimum level logged"),
        "format": Key("text", _choice("text", "json"), "'text', or 'json' (one object a line)"),
    },
    "report": {
        "termination_log": Key(
            "/dev/termination-log",
            _string,
            "file for the restart reason when it exists (Kubernetes); '' disables",
        ),
    },
}


@dataclass(frozen=True)
class Settings:
    watch_enabled: bool = True
    interval: float = 30.0
    cooldown: float = 60.0
    settle: float = 5.0
    failure_threshold: int = 3
    probe_timeout: float = 10.0
    source: str = "nvml"
    stop_timeout: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"
    termination_log: str = "/dev/termination-log"
    config_file: str | None = None

    @property
    def policy(self) -> WatchPolicy:
        from .watch import WatchPolicy  # the policy module is not needed to start the child

        return WatchPolicy(self.interval, self.cooldown, self.settle, self.failure_threshold)

    @classmethod
    def from_values(
        cls, values: Mapping[tuple[str, str], Any], config_file: str | None
    ) -> Settings:
        v = values
        return cls(
            watch_enabled=v["watch", "enabled"],
            interval=v["watch", "interval"],
            cooldown=v["watch", "cooldown"],
            settle=v["watch", "settle"],
            failure_threshold=v["watch", "failure_threshold"],
            probe_timeout=v["watch", "probe_timeout"],
            source=v["watch", "source"],
            stop_timeout=v["child", "stop_timeout"],
            log_level=v["log", "level"],
            log_format=v["log", "format"],
            termination_log=v["report", "termination_log"],
            config_file=config_file,
        )


def flag_name(section: str, key: str) -> str:
    """`--interval`, `--stop-timeout`; the [log] keys read better as `--log-level`."""
    name = f"{section}_{key}" if section == "log" else key
    return "--" + name.replace("_", "-")


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section}_{key}".upper()


def load(
    flags: Mapping[tuple[str, str], Any],
    config_flag: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge every layer. `flags` holds only the flags actually given, keyed (section, key)."""
    environ = os.environ if environ is None else environ
    values: dict[tuple[str, str], Any] = {
        (section, key): spec.default
        for section, keys in SCHEMA.items()
        for key, spec in keys.items()
    }
    path, explicit = _config_path(config_flag, environ)
    if path is not None:
        values.update(_from_file(path, explicit))
    values.update(_from_env(environ))
    for (section, key), raw in flags.items():
        values[section, key] = _check(section, key, raw, flag_name(section, key))
    return Settings.from_values(values, path)


def _check(section: str, key: str, raw: Any, where: str) -> Any:
    try:
        return SCHEMA[section][key].check(raw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _config_path(flag: str | None, environ: Mapping[str, str]) -> tuple[str | None, bool]:
    if flag is not None:
        return flag, True
    if environ.get(ENV_CONFIG):
        return environ[ENV_CONFIG], True
    if os.path.exists(DEFAULT_CONFIG):
        return DEFAULT_CONFIG, False
    return None, False


def _from_file(path: str, explicit: bool) -> dict[tuple[str, str], Any]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        if not explicit:
            return {}
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read ({exc.strerror})") from None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: TOML syntax error: {exc}") from None
    out: dict[tuple[str, str], Any] = {}
    for section, table in doc.items():
        if section not in SCHEMA:
            known = ", ".join(f"[{s}]" for s in SCHEMA)
            raise ConfigError(f"config file {path}: unknown section [{section}] (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: {section} must be a table [{section}]")
        for key, raw in table.items():
            if key not in SCHEMA[section]:
                known = ", ".join(SCHEMA[section])
                raise ConfigError(
                    f"config file {path}: unknown key '{key}' in [{section}] (known: {known})"
                )
            out[section, key] = _check(section, key, raw, f"config file {path}: [{section}] {key}")
    return out


def _from_env(environ: Mapping[str, str]) -> dict[tuple[str, str], Any]:
    names = {env_name(s, k): (s, k) for s, keys in SCHEMA.items() for k in keys}
    out: dict[tuple[str, str], Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        if name not in names:
            raise ConfigError(
                f"environment {name}: unknown setting (e.g. {env_name('watch', 'interval')})"
            )
        section, key = names[name]
        out[section, key] = _check(section, key, raw, f"environment {name}")
    return out
