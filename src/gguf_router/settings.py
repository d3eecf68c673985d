"""The router's settings, parsed once by `load_settings` (and again on reload) and read everywhere else.

Precedence: command line > environment (GGUF_ROUTER_*) > config file ([router] section of
/etc/gguf-router/gguf-router.conf) > defaults. Each value is turned into its field's type and
checked here, in a few lines of our own rather than pydantic-settings: importing pydantic cost
about a third of the time a socket-activated router took to answer its first request.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .ini import BOOLEAN_HINT, ConfigError, Value, boolean, expect_sections, read_ini
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


_LAUNCHERS = Literal["auto", "process", "systemd"]


def _bounds(low: float, high: float | None = None, above: bool = False) -> dict:
    """A number field's range, checked by Settings.__post_init__ (`above`: low itself excluded)."""
    return {"low": low, "high": high, "above": above}


@dataclass(frozen=True)
class Settings:
    config: Path | None = None  # the file these came from, when there was one
    models_dir: Path | None = None
    models_preset: Path | None = None
    models_max: int = field(default=4, metadata=_bounds(0))
    models_autoload: bool = True
    models_ttl: float = field(default=0.0, metadata=_bounds(0))
    # What the models may hold together: `auto` = the host's memory (or the router's cgroup
    # limit) minus memory_reserve; a size (20G), a share of RAM (80%), or `off`.
    memory_budget: str = "auto"
    memory_reserve: str = "1G"
    queue_max: int = field(default=256, metadata=_bounds(1))
    queue_timeout: float = field(default=0.0, metadata=_bounds(0))
    host: str = "127.0.0.1"
    port: int = field(default=8080, metadata=_bounds(0, 65535))
    # Comma-separated in the environment, like llama-server's LLAMA_API_KEY.
    api_keys: tuple[str, ...] = ()
    api_key_file: Path | None = None  # one key per line; keeps keys out of a world-readable file
    # With admin keys set, managing models (load, unload, reload, logs) needs one of them; the
    # keys above then only run inference. An admin key is accepted everywhere.
    admin_api_keys: tuple[str, ...] = ()
    admin_api_key_file: Path | None = None
    # Origins a browser may call the API from (CORS); none by default.
    cors_origins: tuple[str, ...] = ()
    # Host names a router without API keys answers for, beside IP addresses, localhost and this
    # machine's name: a web page that rebinds its own name to the router's address gets 421.
    server_names: tuple[str, ...] = ()
    # TLS on every socket the router serves (its own or systemd's); both files in PEM, readable
    # by the router's user. A reload loads them again (renewed certificates).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_body: str = "64M"  # request bodies: long prompts with images fit
    # Seconds a request's headers and body may take to arrive.
    request_timeout: float = field(default=60.0, metadata=_bounds(0, above=True))
    max_connections: int = field(default=1024, metadata=_bounds(1))  # open client connections at most
    # Of those, what one client address or one API key may hold; 0: an eighth, at least 8.
    max_connections_per_client: int = field(default=0, metadata=_bounds(0))
    # On stop, seconds the requests in flight get to finish (gguf-router.service: TimeoutStopSec=30).
    drain_timeout: float = field(default=20.0, metadata=_bounds(0))
    llama_server: Path = field(default_factory=default_llama_server)
    child_args: tuple[str, ...] = ()
    # auto: a transient systemd unit per model when started by systemd, else a child process.
    launcher: _LAUNCHERS = "auto"
    stop_timeout: float = field(default=10.0, metadata=_bounds(0, above=True))
    # A loaded child that does not answer /health for this long is killed and restarted.
    health_timeout: float = field(default=30.0, metadata=_bounds(0, above=True))
    hf_cache: Path | None = field(default_factory=default_hf_cache)
    runtime_dir: Path | None = field(default_factory=systemd_runtime_dir)
    state_dir: Path = field(default_factory=default_state_dir)
    log_level: str = "INFO"
    # journald stamps every line itself; a terminal wants the time in the line.
    log_timestamps: bool = field(default_factory=lambda: "JOURNAL_STREAM" not in os.environ)

    def preset_files(self) -> tuple[Path, list[Path]]:
        """The presets file (given or the default) and its drop-ins, presets.d/*.ini in name order."""
        main = self.models_preset or DEFAULT_PRESETS
        dropins = main.with_suffix(".d")
        return main, sorted(p for p in dropins.glob("*.ini") if p.is_file()) if dropins.is_dir() else []

    def all_api_keys(self) -> tuple[str, ...]:
        return self.api_keys + keys_in(self.api_key_file, "api-key-file")

    def all_admin_keys(self) -> tuple[str, ...]:
        return self.admin_api_keys + keys_in(self.admin_api_key_file, "admin-api-key-file")

    def budget_bytes(self) -> int | None:
        """The memory budget in bytes; None when it is off."""
        if self.memory_budget == "off":
            return None
        if self.memory_budget == "auto":
            from .launchers.cgroup import host_memory
            return max(host_memory() - parse_size(self.memory_reserve), 0)
        return parse_size(self.memory_budget)

    def __post_init__(self) -> None:
        """Checks what the types alone do not; raises ValueError naming the field."""
        for item in dataclasses.fields(self):
            bounds, value = item.metadata, getattr(self, item.name)
            if bounds and (value < bounds["low"] or (bounds["above"] and value == bounds["low"])
                           or (bounds["high"] is not None and value > bounds["high"])):
                limit = (f"between {bounds['low']} and {bounds['high']}" if bounds["high"] is not None
                         else f"{'above' if bounds['above'] else 'at least'} {bounds['low']}")
                raise FieldError(item.name, f"{value} is out of range: give a number {limit}")
        for name in ("api_keys", "admin_api_keys"):
            if any(not key.strip() for key in getattr(self, name)):
                # `--api-key "$UNSET"` must not leave the router open without a word.
                raise FieldError(name, "a key is empty: give a key, or no such setting at all")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise FieldError("tls_key_file" if self.tls_cert_file else "tls_cert_file",
                             "tls-cert-file and tls-key-file go together: set both or neither")
        if self.launcher not in typing.get_args(_LAUNCHERS):
            raise FieldError("launcher", f"unknown launcher {self.launcher!r}: use auto, process or systemd")
        for name in ("max_body", "memory_reserve", "memory_budget"):
            value = getattr(self, name).strip().lower()
            if not (name == "memory_budget" and value in ("auto", "off")):
                try:
                    parse_size(value, total=1)
                except ValueError as exc:
                    raise FieldError(name, str(exc)) from None
            object.__setattr__(self, name, value)
        level = self.log_level.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise FieldError("log_level", f"unknown log level {self.log_level!r}: use debug, info, warning or error")
        object.__setattr__(self, "log_level", level)


class FieldError(ValueError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def keys_in(path: Path | None, what: str) -> tuple[str, ...]:
    """Keys from a file, one per line, `#` comments."""
    if path is None:
        return ()
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(str(path), f"{what} cannot be read: {exc.strerror}") from None
    return tuple(k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#"))


_FIELDS = {item.name: item for item in dataclasses.fields(Settings)}
_TYPES = typing.get_type_hints(Settings)
# Keys the config file may set: every setting but the file itself and the children's options,
# which belong in the presets' [*] section.
FILE_KEYS = frozenset(_FIELDS) - {"config", "child_args"}


def _convert(name: str, raw: Any) -> Any:
    """An environment or file value (text) as its field's type; ValueError says why it is not one.
    The command line's values come typed already (argparse), but for the comma-joined keys."""
    if not isinstance(raw, str):
        return raw
    hint = _TYPES[name]
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    optional = len(kinds) < len(typing.get_args(hint))
    kind = kinds[0] if optional else hint
    text = raw.strip()
    if optional and not text:
        return None
    if kind is bool:
        if (parsed := boolean(text)) is None:
            raise ValueError(f"{raw!r} is not a boolean: {BOOLEAN_HINT}")
        return parsed
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"{raw!r} is not a valid {'integer' if kind is int else 'number'}") from None
    if kind is Path:
        return Path(text)
    if typing.get_origin(kind) is tuple:
        # Options for the children as a shell would split them; keys and origins comma-separated.
        if name == "child_args":
            return tuple(shlex.split(text))
        if name in ("api_keys", "admin_api_keys"):
            return tuple(k.strip() for k in text.split(","))  # a blank one is an error, not no key
        return tuple(k.strip() for k in text.split(",") if k.strip())
    return text


def read_config_file(path: Path) -> dict[str, Value]:
    sections = read_ini(path)
    values: dict[str, Value] = {}
    expect_sections(sections, {"router"}, path, "the router's settings go in [router]")
    for key, value in sections.get("router", {}).items():
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
    chosen: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name in _FIELDS:
        env = f"GGUF_ROUTER_{name.upper()}"
        if name in cli:
            raw, where = cli[name], "command line" if name == "child_args" else f"--{name.replace('_', '-')}"
        elif env in os.environ:
            raw, where = os.environ[env], f"environment {env}"
        elif name in values:
            raw, where = values[name].text, f"{values[name].where}: {name.replace('_', '-')}"
        else:
            continue
        try:
            chosen[name], origin[name] = _convert(name, raw), where
        except ValueError as exc:
            raise ConfigError(where, str(exc)) from None
    chosen["config"] = path if path.is_file() else None
    try:
        return Settings(**chosen)
    except FieldError as exc:
        raise ConfigError(origin.get(exc.name, exc.name.replace("_", "-")), str(exc)) from None
