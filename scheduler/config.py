"""Settings of the daemon and the CLI: flags beat the environment, which beats the TOML file.

Every setting has the environment variable ``PROGRAM_TIMER_<NAME>`` (SPEC 5) and the same name in
lower case as a key of the TOML file (``database_url = "…"``). Bad configuration stops the
start with :class:`ConfigError`, whose message names the setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "PROGRAM_TIMER_"


class ConfigError(Exception):
    """The configuration is unusable; the message names the setting."""


def _default_database_url() -> str:
    folder = Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0] or ".")
    return f"sqlite:///{(folder / 'program-timer.db').absolute()}"


def _default_socket() -> str:
    folder = Path(os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or ".")
    return str((folder / "program-timer.sock").absolute())


def _id_list(value: Any) -> list[int] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        items: list[Any] = [v for v in value.replace(",", " ").split() if v]
    else:
        items = list(value)
    out = []
    for item in items:
        if isinstance(item, bool) or not str(item).strip().isdigit():
            raise ValueError(f"expected numeric ids separated by commas, got {item!r}")
        out.append(int(str(item).strip()))
    return out


DAY = 86400.0
YEAR = 365 * DAY
SUN_PATH_MAX = 107  # bytes of an AF_UNIX path (sun_path is 108, with its terminating NUL)


def _seconds(default: float | None, low: float, high: float, *, open_low: bool = True) -> Any:
    """A finite number of seconds within (low, high] (or [low, high])."""
    if open_low:
        return Field(default=default, gt=low, le=high, allow_inf_nan=False)
    return Field(default=default, ge=low, le=high, allow_inf_nan=False)


class Settings(BaseSettings):
    """Every setting, with the range that makes sense for it: a value outside stops the start
    with a message naming the setting (``inf``, ``nan`` and absurd values included)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )

    config_file: Path | None = Field(default=None, exclude=True)

    database_url: str = Field(default_factory=_default_database_url)
    socket: str = Field(default_factory=_default_socket)
    socket_mode: str = "0660"
    allowed_uids: str | None = None
    allowed_gids: str | None = None
    timezone: str = "UTC"
    min_interval: float = _seconds(1.0, 0, DAY)
    max_timers_per_persona: int = Field(default=1000, ge=1, le=10_000_000)
    ack_timeout: float = _seconds(30.0, 0, DAY)
    retention: float = _seconds(604800.0, 0, 10 * YEAR)
    misfire_grace: float | None = _seconds(None, 0, 10 * YEAR, open_low=False)
    database_timeout: float = _seconds(5.0, 0, 600)
    # SPEC 7.3 / 7.4: Prometheus metrics, resend backoff, dead letters.
    metrics_address: str | None = None
    metrics_refresh: float = _seconds(5.0, 0, DAY)
    retry_max_delay: float = _seconds(3600.0, 0, 10 * YEAR)
    max_attempts: int | None = Field(default=None, ge=1, le=1_000_000)
    log_format: Literal["auto", "console", "json"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Beyond SPEC 5: limits and tuning, all with defaults an operator rarely changes.
    connectors: str | None = None
    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    backlog: int = Field(default=1024, ge=1, le=65535)
    max_arguments: int = Field(default=64, ge=1, le=10_000)
    max_argument_length: int = Field(default=65536, ge=1, le=16 * 1024 * 1024)
    max_arguments_size: int = Field(default=262144, ge=1, le=16 * 1024 * 1024)
    max_inflight: int = Field(default=4000, ge=1, le=100_000)
    max_pipeline: int = Field(default=1000, ge=1, le=100_000)
    fire_batch_size: int = Field(default=1000, ge=1, le=10000)
    command_batch_size: int = Field(default=512, ge=1, le=10000)
    poll_interval: float = _seconds(5.0, 0, 3600)
    shutdown_grace: float = _seconds(10.0, 0, 600)
    daemon_id: str | None = Field(default=None, min_length=1, max_length=64)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = os.environ.get("_PROGRAM_TIMER_CONFIG_FILE")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    @field_validator("socket_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        try:
            mode = int(str(value), 8)
        except ValueError:
            raise ValueError(f"expected an octal file mode like 0660, got {value!r}") from None
        if not 0 <= mode <= 0o777:
            raise ValueError(f"expected an octal file mode like 0660, got {value!r}")
        return str(value)

    @field_validator("allowed_uids", "allowed_gids", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> str | None:
        ids = _id_list(value)
        return None if ids is None else ",".join(map(str, ids))

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value

    @field_validator("database_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
            raise ValueError("expected sqlite:///path/to/file.db or postgresql://user@host/dbname")
        try:
            # The standard library's parser, not SQLAlchemy's: a CLI command reads these
            # settings too, and should not load SQLAlchemy (a third of a second) to do so.
            _ = urlsplit(value).port  # a port that is not a number fails here
        except ValueError as exc:
            raise ValueError(f"not a database URL: {exc}") from None
        return value

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        split_address(value)
        return value

    @field_validator("socket")
    @classmethod
    def _socket_path(cls, value: str) -> str:
        if not value or len(os.fsencode(value)) > SUN_PATH_MAX:
            raise ValueError(
                f"a Unix socket path is 1 to {SUN_PATH_MAX} bytes; this one has "
                f"{len(os.fsencode(value))}: choose a shorter folder"
            )
        return value

    @property
    def database_url_given(self) -> bool:
        """Whether the database URL was set (flag, environment or file) rather than the
        default: only the default location's folder may be created at start."""
        return "database_url" in self.model_fields_set

    @property
    def metrics_endpoint(self) -> tuple[str, int] | None:
        """(host, port) to serve ``/metrics`` on, or None: metrics are off."""
        return None if self.metrics_address is None else split_address(self.metrics_address)

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def uid_allow_list(self) -> frozenset[int] | None:
        ids = _id_list(self.allowed_uids)
        return None if ids is None else frozenset(ids)

    @property
    def gid_allow_list(self) -> frozenset[int] | None:
        ids = _id_list(self.allowed_gids)
        return None if ids is None else frozenset(ids)

    @property
    def connector_allow_list(self) -> frozenset[str] | None:
        if not self.connectors:
            return None
        return frozenset(c.strip() for c in self.connectors.split(",") if c.strip())


def split_address(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6; ``:9464``: every interface) as (host, port).
    Port 0 lets the system choose a free one (the daemon logs it)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port like 127.0.0.1:9464, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, like [::1]:9464; got {value!r}")
    return host or "0.0.0.0", int(port)


def load_settings(config_file: str | Path | None = None, **flags: Any) -> Settings:
    """Build the settings from flags (non-None values), the environment and the TOML file."""
    flags = {k: v for k, v in flags.items() if v is not None}
    path = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG")
    previous = os.environ.get("_PROGRAM_TIMER_CONFIG_FILE")
    try:
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"--config: no such file {path}")
            os.environ["_PROGRAM_TIMER_CONFIG_FILE"] = str(path)
        else:
            os.environ.pop("_PROGRAM_TIMER_CONFIG_FILE", None)
        try:
            return Settings(**flags)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None
        except ValueError as exc:  # TOML syntax errors
            raise ConfigError(f"--config {path}: {exc}") from None
    finally:
        if previous is None:
            os.environ.pop("_PROGRAM_TIMER_CONFIG_FILE", None)
        else:
            os.environ["_PROGRAM_TIMER_CONFIG_FILE"] = previous


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        name = str(err["loc"][0]) if err["loc"] else "?"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown setting {name!r} (in the TOML file or flags)")
        else:
            lines.append(
                f"setting {name} ({ENV_PREFIX}{name.upper()}): {msg} (given {err.get('input')!r})"
            )
    return "; ".join(lines)
