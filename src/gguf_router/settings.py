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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .ini import BOOLEAN_HINT, ConfigError, Value, boolean, expect_sections, read_ini
from .keys import DEFAULT_KEYS, Keyring, keys_in, read_keys
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
# llama.cpp's web UI: where the package installs it, and where scripts/build-ui builds it.
PACKAGED_UI = Path("/usr/share/gguf-router/ui")
BUILT_UI = CACHE_DIR / "llama-ui-b11434"
# llama-server's options that make its CORS default `localhost` (common/arg.cpp).
SERVER_TOOL_FLAGS = frozenset({"--tools", "--ui-mcp-proxy", "--webui-mcp-proxy"})


def default_llama_server() -> Path:
    """When none is configured: `llama-server` on the PATH, the packaged one, the checkout's build."""
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    return PACKAGED_LLAMA_SERVER if PACKAGED_LLAMA_SERVER.exists() else BUILT_LLAMA_SERVER


def default_ui_path() -> Path:
    return PACKAGED_UI if PACKAGED_UI.is_dir() else BUILT_UI


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


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            flags: tuple[str, ...] | None = (), metavar: str | None = None, low: float | None = None,
            high: float | None = None, above: bool = False) -> Any:
    """One router setting, declared once: its field here gives the GGUF_ROUTER_<NAME> variable and
    the gguf-router.conf key (the name with dashes); `flags` the command line's spellings (() =
    --the-name; None = none), `help` their help (cli.py builds the parser from these), `low` /
    `high` the range Settings.__post_init__ checks (`above`: low itself excluded). The manual's
    tables, the man page and etc/gguf-router.conf are checked against them (tests/test_settings.py)."""
    metadata = {"help": help, "flags": flags, "metavar": metavar}
    if low is not None:
        metadata["bounds"] = {"low": low, "high": high, "above": above}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    # The file these came from, when there was one.
    config: Path | None = setting(None, "router settings file (default /etc/gguf-router/gguf-router.conf, if present)",
                                  metavar="FILE")
    models_dir: Path | None = setting(None, "folder of GGUF models (file x.gguf or folder x/ = model x)", metavar="DIR")
    models_preset: Path | None = setting(
        None, "model presets INI file, plus FILE.d/*.ini (default /etc/gguf-router/presets.ini, if present)",
        metavar="FILE")
    # llama.cpp's -hf on a repository holding a preset.ini: its presets, fetched into the cache.
    hf_repo: str | None = setting(
        None, "use the preset.ini of this Hugging Face repository as the presets (fetched at start, unless offline; "
              "it replaces --models-preset)", flags=("--hf-repo", "-hf", "-hfr"), metavar="ORG/REPO")
    models_max: int = setting(4, "models loaded at once, least recently used unloaded first; 0 = no limit (default 4)",
                              metavar="N", low=0)
    models_autoload: bool = setting(True, "load models only through POST /models/load (or ?autoload=true)",
                                    flags=("--no-models-autoload",))
    models_ttl: float = setting(0.0, "seconds a model may stay idle before it is stopped; 0 = never (default)",
                                metavar="S", low=0)
    # What the models may hold together: `auto` = the host's memory (or the router's cgroup
    # limit) minus memory_reserve; a size (20G), a share of RAM (80%), or `off`.
    memory_budget: str = setting("auto", "memory the models may hold together: auto (default: RAM minus "
                                 "--memory-reserve), a size (20G), a share of RAM (80%%), or off", metavar="SIZE")
    memory_reserve: str = setting("1G", "memory kept free for everything else with --memory-budget auto (default 1G)",
                                  metavar="SIZE")
    # Accelerators (devices.py): each device's memory is a budget of its own. ggml-rpc-server
    # endpoints are devices too; a child placed on one gets that endpoint alone.
    rpc: tuple[str, ...] = setting(
        (), "a ggml-rpc-server (HOST:PORT) whose device the models may run on, each model on one device at a time; "
            "repeatable or comma-separated (llama-server's --rpc)", flags=("--rpc",), metavar="HOST:PORT")
    device_reserve: str = setting("512M", "device memory kept free on each device beyond its models (default 512M)",
                                  metavar="SIZE")
    device_budget: tuple[str, ...] = setting(
        (), "what the models on a device may take together, instead of its memory less --device-reserve: ID:SIZE "
            "(ID: a device's name such as CUDA0, or an RPC endpoint); repeatable or comma-separated",
        metavar="ID:SIZE")
    queue_max: int = setting(256, "requests that may wait for models to load, all together (default 256)",
                             metavar="N", low=1)
    queue_timeout: float = setting(
        0.0, "seconds a request waits for its model to load; 0 = as long as the client (default)", metavar="S", low=0)
    host: str = setting("127.0.0.1", "address to listen on (default 127.0.0.1)", metavar="ADDR")
    port: int = setting(8080, "port to listen on (default 8080)", metavar="N", low=0, high=65535)
    # Comma-separated in the environment, like llama-server's LLAMA_API_KEY.
    api_keys: tuple[str, ...] = setting(
        (), "require this key (Bearer or X-Api-Key) on every endpoint but /health; repeatable or comma-separated",
        flags=("--api-key",), metavar="KEY")
    # One key per line; keeps keys out of a world-readable file.
    api_key_file: Path | None = setting(None, "file of API keys, one per line", metavar="FILE")
    # With admin keys set, managing models (load, unload, reload, logs) needs one of them; the
    # keys above then only run inference. An admin key is accepted everywhere.
    admin_api_keys: tuple[str, ...] = setting(
        (), "with it, managing models (load, unload, reload, logs) needs this key; the --api-key keys then only run "
            "inference; repeatable", flags=("--admin-api-key",), metavar="KEY")
    admin_api_key_file: Path | None = setting(None, "file of admin keys, one per line", metavar="FILE")
    # Named keys, each with a role, models and limits, and its own usage (keys.py).
    keys_file: Path | None = setting(
        None, "named keys INI file, plus FILE.d/*.ini (default /etc/gguf-router/keys.ini, if present)",
        metavar="FILE")
    # Origins a browser may call the API from (CORS); none by default. llama-server's own spelling
    # too (comma-separated there): passed on, it would reach no browser.
    cors_origins: tuple[str, ...] = setting(
        (), "an origin browsers may call the API from (https://app.example), * for any, localhost for any loopback "
            "origin on any port; repeatable or comma-separated; none by default",
        flags=("--cors-origin", "--cors-origins"), metavar="ORIGIN")
    # Host names a router without API keys answers for, beside IP addresses, localhost and this
    # machine's name: a web page that rebinds its own name to the router's address gets 421.
    server_names: tuple[str, ...] = setting(
        (), "a host name a router without API keys answers for, beside IP addresses, localhost and this machine's "
            "name (others get 421); repeatable; * for any", flags=("--server-name",), metavar="NAME")
    # TLS on every socket the router serves (its own or systemd's); both files in PEM, readable
    # by the router's user. A reload loads them again (renewed certificates). llama-server's own
    # names (--ssl-*) too: passed on to the children, they would break them.
    tls_cert_file: Path | None = setting(None, "serve HTTPS with this PEM certificate (chain); with --tls-key-file",
                                         flags=("--tls-cert-file", "--ssl-cert-file"), metavar="FILE")
    tls_key_file: Path | None = setting(None, "the certificate's PEM private key",
                                        flags=("--tls-key-file", "--ssl-key-file"), metavar="FILE")
    # Request bodies: long prompts with images fit.
    max_body: str = setting("64M", "largest request body (default 64M); larger ones get 413", metavar="SIZE")
    request_timeout: float = setting(60.0, "seconds a request's headers and body may take to arrive (default 60)",
                                     metavar="S", low=0, above=True)
    max_connections: int = setting(
        1024, "open client connections at most; past it a new one gets 503 and is closed (default 1024)",
        metavar="N", low=1)
    max_connections_per_client: int = setting(
        0, "of those, what one client address or one API key may hold (default 0: an eighth, at least 8)",
        metavar="N", low=0)
    # gguf-router.service has TimeoutStopSec=30.
    drain_timeout: float = setting(
        20.0, "on stop, seconds the requests in flight get to finish (default 20; keep it under the unit's "
              "TimeoutStopSec)", metavar="S", low=0)
    llama_server: Path = setting(help="the llama-server binary the models run in", factory=default_llama_server,
                                 metavar="PATH")
    # What the command line holds beyond the router's own flags: every child gets it.
    child_args: tuple[str, ...] = setting((), flags=None)
    launcher: _LAUNCHERS = setting(
        "auto", "how models run: systemd = a transient unit each (memory limits, own journal); process = child "
                "processes; auto (default) = systemd when started by systemd", metavar="L")
    stop_timeout: float = setting(10.0, "seconds a child gets to exit before it is killed (default 10)",
                                  metavar="S", low=0, above=True)
    # A loaded child that does not answer /health for this long is killed and restarted; a loading
    # one that uses no CPU for this long is killed and its load fails.
    health_timeout: float = setting(
        30.0, "seconds a loaded model may fail to answer /health before it is killed and restarted, or a loading "
              "one may use no CPU before its load is failed (default 30)",
        metavar="S", low=0, above=True)
    offline: bool = setting(False, "download nothing: POST /models and gguf-router pull are refused and models load "
                                   "from the cache alone (passed on to every model)")
    ui: bool = setting(True, "serve no web UI at / (the router's status page stays at /status)",
                       flags=("--no-ui", "--no-webui"))
    ui_path: Path = setting(help="folder of the web UI served at / (default: llama.cpp's UI as the package installs "
                                 "it, /usr/share/gguf-router/ui, or as scripts/build-ui builds it)",
                            factory=default_ui_path, flags=("--path", "--ui-path"), metavar="DIR")
    hf_cache: Path | None = setting(help="the Hugging Face cache (default as llama.cpp looks for it)",
                                    factory=default_hf_cache, flags=None)
    runtime_dir: Path | None = setting(factory=systemd_runtime_dir, flags=None)
    state_dir: Path = setting(
        help="where the router keeps what it learns (models' memory after an out-of-memory kill); default "
             "$STATE_DIRECTORY under systemd, else ~/.local/state/gguf-router", factory=default_state_dir,
        metavar="DIR")
    log_level: str = setting("INFO", "debug, info, warning or error (default info)", metavar="L")
    # journald stamps every line itself; a terminal wants the time in the line.
    log_timestamps: bool = setting(factory=lambda: "JOURNAL_STREAM" not in os.environ, flags=None)

    @property
    def cors_allowed(self) -> tuple[str, ...]:
        """The origins browsers may call from: --cors-origins; without it none, unless the children
        run server tools or the MCP proxy, where llama.cpp's default is its `localhost` keyword."""
        if not self.cors_origins and any(arg.split("=", 1)[0] in SERVER_TOOL_FLAGS for arg in self.child_args):
            return ("localhost",)
        return self.cors_origins

    def preset_files(self) -> tuple[Path, list[Path]]:
        """The presets file (hf-repo's in the cache, given or the default) and its drop-ins,
        presets.d/*.ini in name order (none for hf-repo's)."""
        if self.hf_repo:
            from .hfcache import preset_file
            return preset_file(self.hf_cache, self.hf_repo), []
        main = self.models_preset or DEFAULT_PRESETS
        dropins = main.with_suffix(".d")
        return main, sorted(p for p in dropins.glob("*.ini") if p.is_file()) if dropins.is_dir() else []

    def all_api_keys(self) -> tuple[str, ...]:
        return self.api_keys + keys_in(self.api_key_file, "api-key-file")

    def all_admin_keys(self) -> tuple[str, ...]:
        return self.admin_api_keys + keys_in(self.admin_api_key_file, "admin-api-key-file")

    def keyring(self) -> Keyring:
        """Every key, named and bare; raises ConfigError for a bad file or line."""
        return read_keys(self.keys_file or DEFAULT_KEYS, self.all_api_keys(), self.all_admin_keys(),
                         named=self.keys_file is not None)

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
            bounds, value = item.metadata.get("bounds"), getattr(self, item.name)
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
        for name in ("max_body", "memory_reserve", "memory_budget", "device_reserve"):
            value = getattr(self, name).strip().lower()
            if not (name == "memory_budget" and value in ("auto", "off")):
                try:
                    parse_size(value, total=1)
                except ValueError as exc:
                    raise FieldError(name, str(exc)) from None
            object.__setattr__(self, name, value)
        from .devices import parse_budgets
        try:
            parse_budgets(self.device_budget)
        except ValueError as exc:
            raise FieldError("device_budget", str(exc)) from None
        level = self.log_level.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise FieldError("log_level", f"unknown log level {self.log_level!r}: use debug, info, warning or error")
        object.__setattr__(self, "log_level", level)


class FieldError(ValueError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


_FIELDS = {item.name: item for item in dataclasses.fields(Settings)}
_TYPES = typing.get_type_hints(Settings)


def setting_type(name: str) -> Any:
    """A field's type without its `| None`."""
    hint = _TYPES[name]
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    return kinds[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(kinds) == 1 else hint


def flags() -> list[tuple[dataclasses.Field, tuple[str, ...]]]:
    """Each setting the command line sets, with its spellings (the first is the one shown)."""
    return [(item, item.metadata["flags"] or (f"--{item.name.replace('_', '-')}",))
            for item in _FIELDS.values() if item.metadata["flags"] is not None]
# Keys the config file may set: every setting but the file itself and the children's options,
# which belong in the presets' [*] section.
FILE_KEYS = frozenset(_FIELDS) - {"config", "child_args"}


def _convert(name: str, raw: Any) -> Any:
    """An environment or file value (text) as its field's type; ValueError says why it is not one.
    The command line's values come typed already (argparse), but for the comma-joined keys."""
    if not isinstance(raw, str):
        return raw
    kind = setting_type(name)
    optional = kind is not _TYPES[name]
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
