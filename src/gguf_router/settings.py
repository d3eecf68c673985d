"""The router's settings, parsed once by `load_settings` (and again on reload) and read everywhere else.

Precedence: command line > environment (GGUF_ROUTER_*) > config file ([router] section of
/etc/gguf-router/gguf-router.conf) > defaults. The command line reaches pydantic-settings as init
arguments, which it ranks above the environment; the file is a settings source of ours below both.
"""

from __future__ import annotations

import contextvars
import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from .ini import ConfigError, Value, read_ini
from .sizes import parse_size

ETC_DIR = Path("/etc/gguf-router")
DEFAULT_CONFIG = ETC_DIR / "gguf-router.conf"
DEFAULT_PRESETS = ETC_DIR / "presets.ini"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gguf-router"
# Where the gguf-router-llama-server package installs its CPU build: off the PATH, so that an
# administrator's own (GPU) build on the PATH is preferred.
PACKAGED_LLAMA_SERVER = Path("/usr/lib/gguf-router/llama-server")
# Where scripts/build-llama-server puts its build (a checkout's `scripts/dev`).
BUILT_LLAMA_SERVER = CACHE_DIR / "llama-server-b11434" / "bin" / "llama-server"


def default_llama_server() -> Path:
    """When none is configured: `llama-server` on the PATH, the packaged one, the checkout's build."""
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    return PACKAGED_LLAMA_SERVER if PACKAGED_LLAMA_SERVER.exists() else BUILT_LLAMA_SERVER


def default_hf_cache() -> Path | None:
    """llama.cpp's own search order for the Hugging Face hub cache it downloads into."""
    env = os.environ
    for var, sub in (("LLAMA_CACHE", ""), ("HF_HUB_CACHE", ""), ("HUGGINGFACE_HUB_CACHE", ""),
                     ("HF_HOME", "hub"), ("XDG_CACHE_HOME", "huggingface/hub")):
        if env.get(var):
            return Path(env[var]) / sub
    return Path.home() / ".cache" / "huggingface" / "hub"


def systemd_runtime_dir() -> Path | None:
    # systemd's RuntimeDirectory= hands us a private folder; without it the router makes one.
    value = os.environ.get("RUNTIME_DIRECTORY")
    return Path(value.split(":")[0]) if value else None


def default_state_dir() -> Path:
    # systemd's StateDirectory= (/var/lib/gguf-router); without it, the user's XDG state folder.
    value = os.environ.get("STATE_DIRECTORY")
    if value:
        return Path(value.split(":")[0])
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "gguf-router"


# The config file's values for the Settings being built: pydantic-settings builds its sources
# inside Settings(), so `load_settings` hands them over here rather than through a global.
_file_values: contextvars.ContextVar[dict[str, Value]] = contextvars.ContextVar("file_values", default={})


class ConfigFileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        value = _file_values.get().get(field_name)
        return (value.text if value else None), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {name: value.text for name, value in _file_values.get().items()}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GGUF_ROUTER_", frozen=True, extra="forbid")

    config: Path | None = None  # the file these came from, when there was one
    models_dir: Path | None = None
    models_preset: Path | None = None
    models_max: int = Field(4, ge=0, description="models loaded at once; 0 = unlimited")
    models_autoload: bool = True
    models_ttl: float = Field(0.0, ge=0, description="seconds idle before a model is stopped; 0 = never")
    # What the models may hold together: `auto` = the host's memory (or the router's cgroup
    # limit) minus memory_reserve; a size (20G), a share of RAM (80%), or `off`.
    memory_budget: str = "auto"
    memory_reserve: str = "1G"
    queue_max: int = Field(256, ge=1, description="requests waiting for models to load, all together")
    queue_timeout: float = Field(0.0, ge=0, description="seconds a request waits for its model; 0 = no limit")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Comma-separated in the environment, like llama-server's LLAMA_API_KEY.
    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    api_key_file: Path | None = None  # one key per line; keeps keys out of a world-readable file
    # With admin keys set, managing models (load, unload, reload, logs) needs one of them; the
    # keys above then only run inference. An admin key is accepted everywhere.
    admin_api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    admin_api_key_file: Path | None = None
    # Origins a browser may call the API from (CORS); none by default.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    # TLS on every socket the router serves (its own or systemd's); both files in PEM, readable
    # by the router's user. A reload loads them again (renewed certificates).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_body: str = "64M"  # request bodies: long prompts with images fit
    request_timeout: float = Field(60.0, gt=0)  # seconds a request's headers and body may take to arrive
    max_connections: int = Field(1024, ge=1)  # open client connections at most
    # On stop, seconds the requests in flight get to finish (gguf-router.service: TimeoutStopSec=30).
    drain_timeout: float = Field(20.0, ge=0)
    llama_server: Path = Field(default_factory=default_llama_server)
    child_args: tuple[str, ...] = ()
    # auto: a transient systemd unit per model when started by systemd, else a child process.
    launcher: Literal["auto", "process", "systemd"] = "auto"
    stop_timeout: float = Field(10.0, gt=0)
    # A loaded child that does not answer /health for this long is killed and restarted.
    health_timeout: float = Field(30.0, gt=0)
    hf_cache: Path | None = Field(default_factory=default_hf_cache)
    runtime_dir: Path | None = Field(default_factory=systemd_runtime_dir)
    state_dir: Path = Field(default_factory=default_state_dir)
    log_level: str = "INFO"
    # journald stamps every line itself; a terminal wants the time in the line.
    log_timestamps: bool = Field(default_factory=lambda: "JOURNAL_STREAM" not in os.environ)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, env_settings, ConfigFileSource(settings_cls)

    def preset_files(self) -> tuple[Path, list[Path]]:
        """The presets file (given or the default) and its drop-ins, presets.d/*.ini in name order."""
        main = self.models_preset or DEFAULT_PRESETS
        dropins = main.with_suffix(".d")
        return main, sorted(p for p in dropins.glob("*.ini") if p.is_file()) if dropins.is_dir() else []

    def all_api_keys(self) -> tuple[str, ...]:
        return self.api_keys + keys_in(self.api_key_file, "api-key-file")

    def all_admin_keys(self) -> tuple[str, ...]:
        return self.admin_api_keys + keys_in(self.admin_api_key_file, "admin-api-key-file")

    @field_validator("api_keys", "admin_api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            value = value.split(",")
        return tuple(k.strip() for k in value if k and k.strip())

    def budget_bytes(self) -> int | None:
        """The memory budget in bytes; None when it is off."""
        if self.memory_budget == "off":
            return None
        if self.memory_budget == "auto":
            from .launchers.cgroup import host_memory
            return max(host_memory() - parse_size(self.memory_reserve), 0)
        return parse_size(self.memory_budget)

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls-cert-file and tls-key-file go together: set both or neither")
        return self

    @field_validator("max_body")
    @classmethod
    def _body_size(cls, value):
        parse_size(value, total=1)
        return value

    @field_validator("memory_budget", "memory_reserve")
    @classmethod
    def _size(cls, value, info):
        value = value.strip().lower()
        if info.field_name == "memory_budget" and value in ("auto", "off"):
            return value
        parse_size(value, total=1)  # raises ValueError with the reason
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value):
        value = value.upper()
        if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError(f"unknown log level {value!r}: use debug, info, warning or error")
        return value


def keys_in(path: Path | None, what: str) -> tuple[str, ...]:
    """Keys from a file, one per line, `#` comments."""
    if path is None:
        return ()
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(str(path), f"{what} cannot be read: {exc.strerror}") from None
    return tuple(k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#"))


# Keys the config file may set: every setting but the file itself and the children's options,
# which belong in the presets' [*] section.
FILE_KEYS = frozenset(Settings.model_fields) - {"config", "child_args"}


def read_config_file(path: Path) -> dict[str, Value]:
    sections = read_ini(path)
    values: dict[str, Value] = {}
    for section, entries in sections.items():
        if section != "router":
            first = next(iter(entries.values()), None)
            where = first.where if first else str(path)
            raise ConfigError(where, f"unknown section [{section}]: the router's settings go in [router]")
        for key, value in entries.items():
            name = key.replace("-", "_")
            if name not in FILE_KEYS:
                raise ConfigError(value.where, f"unknown key {key!r} in [router]; known keys: "
                                  + ", ".join(sorted(k.replace("_", "-") for k in FILE_KEYS)))
            values[name] = value
    return values


def load_settings(cli: dict[str, Any]) -> Settings:
    """Settings from the command line's values, the environment and the config file.

    The file is the one given (--config / GGUF_ROUTER_CONFIG; it must exist) or the default one
    (used when present). Raises ConfigError naming where the bad value came from."""
    given = cli.get("config") or os.environ.get("GGUF_ROUTER_CONFIG")
    path = Path(given) if given else DEFAULT_CONFIG
    if given and not path.is_file():
        raise ConfigError(str(path), "config file not found")
    values = read_config_file(path) if path.is_file() else {}
    token = _file_values.set(values)
    try:
        return Settings(**{**cli, "config": path if path.is_file() else None})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        env = f"GGUF_ROUTER_{field.upper()}"
        if field in cli:
            where = "command line" if field == "child_args" else f"--{field.replace('_', '-')}"
        elif env in os.environ:
            where = f"environment {env}"
        elif field in values:
            where = f"{values[field].where}: {field.replace('_', '-')}"
        else:
            where = field or "settings"
        raise ConfigError(where, error["msg"].removeprefix("Value error, ")) from None
    finally:
        _file_values.reset(token)
