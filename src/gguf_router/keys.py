"""Named API keys: who calls, with which role, on which models, within which limits.

`/etc/gguf-router/keys.ini` (or `--keys-file`), then `keys.d/*.ini` beside it in name order, one
section per key:

    [alice]
    key-sha256 = 9f86d0...      ; only the hash is stored (`key =` in clear, or `key-file =`, also work)
    role = inference            ; read-only (lists, props, health), inference, admin
    models = qwen*, llama3      ; globs over ids and aliases; default: all
    concurrency = 4             ; requests in flight at once (0 or absent: no limit)
    requests-per-minute = 120
    tokens-per-minute = 200000  ; prompt + completion

The bare keys of --api-key(-file) are named key-1, key-2 ..., those of --admin-api-key(-file)
admin-1 ...; they keep the roles they had: an API key is admin unless admin keys exist.
Pure: reading and checking, no request and no clock.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .ini import ConfigError, Value, read_ini

DEFAULT_KEYS = Path("/etc/gguf-router/keys.ini")


class Level(enum.IntEnum):
    """What a route needs, and what a key's role grants."""

    PUBLIC = 0  # /health, the page: no key ever
    READ = 1  # the model list, props, metrics, events
    INFERENCE = 2  # what a model answers
    ADMIN = 3  # loading, unloading, reloading, logs, deleting, usage; a shared child's global settings


ROLES = {"read-only": Level.READ, "inference": Level.INFERENCE, "admin": Level.ADMIN}
ROLE_NAMES = {level: name for name, level in ROLES.items()}
LIMITS = ("concurrency", "requests-per-minute", "tokens-per-minute")
ANONYMOUS = "anonymous"  # who a request without a (needed) key is, in usage and metrics
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_BARE = re.compile(r"(key|admin)-\d+")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode(errors="surrogateescape")).digest()


def new_key() -> str:
    """A random key, in the `sk-` form OpenAI clients expect."""
    return "sk-" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Key:
    name: str
    digest: bytes = field(default=b"", repr=False)
    role: Level = Level.INFERENCE
    models: tuple[str, ...] = ()  # globs over ids and aliases; () = all
    concurrency: int = 0  # 0 = no limit, as for the two below
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    # The key itself, when the file holds it (the CLI's own commands use it). Neither it nor the
    # digest is ever shown: not in a log, not in an error, not in a repr.
    clear: str | None = field(default=None, repr=False)

    def may_use(self, names: tuple[str, ...]) -> bool:
        """Whether the key reaches a model known by these names (its id and aliases)."""
        return not self.models or any(fnmatch.fnmatchcase(n, g) for g in self.models for n in names)

    @property
    def limited(self) -> bool:
        return bool(self.concurrency or self.requests_per_minute or self.tokens_per_minute)


@dataclass(frozen=True)
class Keyring:
    keys: tuple[Key, ...] = ()
    files: tuple[Path, ...] = ()  # the files read, for the watcher
    # What a request without a valid key may do: everything with no keys; inference when the only
    # keys are --admin-api-key ones (they guard management alone, as they always did); else only
    # the public routes.
    keyless_level: Level = Level.ADMIN
    _by_digest: dict[bytes, Key] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_digest", {key.digest: key for key in self.keys})

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, given: str) -> Key | None:
        """The key given, looked up by its SHA-256: the time a lookup takes depends on the digest,
        which tells nothing of the key (no prefix of a key gets nearer), however many keys there are."""
        return self._by_digest.get(digest(given))

    @property
    def has_operators(self) -> bool:
        """Whether admin keys stand apart: some key, or the keyless, may run inference without them."""
        return (any(k.role is Level.ADMIN for k in self.keys)
                and (self.keyless_level is Level.INFERENCE or any(k.role is not Level.ADMIN for k in self.keys)))

    def clear_key(self, role: Level) -> str | None:
        """A key held in clear with at least this role, for the router's own CLI to call it with."""
        return next((k.clear for k in self.keys if k.clear and k.role >= role), None)


def keys_in(path: Path | None, what: str) -> tuple[str, ...]:
    """Keys from a file, one per line, `#` comments."""
    if path is None:
        return ()
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(str(path), f"{what} cannot be read: {exc.strerror}") from None
    return tuple(k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#"))


def _number(value: Value, key: str) -> int:
    if not value.text.isdigit():
        raise ConfigError(value.where, f"{key} = {value.text!r} must be a whole number (0 = no limit)")
    return int(value.text)


def _key_from(name: str, entries: dict[str, Value], path: Path) -> Key:
    where = next(iter(entries.values())).where if entries else str(path)
    if not _NAME.fullmatch(name):
        raise ConfigError(where, f"key name [{name}] must be letters, digits and . _ @ - (64 at most)")
    if _BARE.fullmatch(name):
        raise ConfigError(where, f"key name [{name}] is how the keys of --api-key and --admin-api-key are named: "
                                 "choose another")
    unknown = set(entries) - {"key", "key-sha256", "key-file", "role", "models", *LIMITS}
    if unknown:
        first = min((entries[k] for k in unknown), key=lambda v: v.line)
        raise ConfigError(first.where, f"unknown key setting {sorted(unknown)[0]!r} in [{name}]: use key-sha256, key, "
                                       f"key-file, role, models, {', '.join(LIMITS)}")
    given = [k for k in ("key", "key-sha256", "key-file") if k in entries]
    if len(given) != 1:
        raise ConfigError(where, f"[{name}] needs exactly one of key-sha256 = (the key's SHA-256 in hex), key = or "
                                 f"key-file =, not {len(given) or 'none'}")
    clear = None
    if "key-sha256" in entries:
        value = entries["key-sha256"]
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value.text):
            raise ConfigError(value.where, "key-sha256 must be 64 hex digits (printf %s KEY | sha256sum)")
        hashed = bytes.fromhex(value.text)
    else:
        if "key-file" in entries:
            value = entries["key-file"]
            try:
                held = keys_in(Path(value.text), f"key-file {value.text}")
            except ConfigError as exc:
                raise ConfigError(value.where, exc.message) from None
            if len(held) != 1:
                raise ConfigError(value.where, f"key-file {value.text} holds {len(held)} keys: it must hold one")
            clear = held[0]
        else:
            value = entries["key"]
            clear = value.text
        if not clear or any(c.isspace() for c in clear):
            raise ConfigError(value.where, f"the key of [{name}] is empty or holds whitespace")
        hashed = digest(clear)
    role = entries.get("role")
    if role is not None and role.text not in ROLES:
        raise ConfigError(role.where, f"role = {role.text!r}: use one of {', '.join(ROLES)}")
    models = tuple(g.strip() for g in entries["models"].text.split(",") if g.strip()) if "models" in entries else ()
    if "models" in entries and not models:
        raise ConfigError(entries["models"].where, "models = names no model: leave it out for all, or give globs")
    limits = {k.replace("-", "_"): _number(entries[k], k) for k in LIMITS if k in entries}
    return Key(name, hashed, ROLES[role.text] if role else Level.INFERENCE, models, clear=clear, **limits)


def key_files(main: Path) -> list[Path]:
    """The keys file and its drop-ins (keys.d/*.ini in name order), those that exist."""
    dropins = main.with_suffix(".d")
    extra = sorted(p for p in dropins.glob("*.ini") if p.is_file()) if dropins.is_dir() else []
    return ([main] if main.is_file() else []) + extra


def read_keys(main: Path, api_keys: tuple[str, ...], admin_keys: tuple[str, ...], named: bool = False) -> Keyring:
    """The named keys of the files, then the bare keys of the command line and config (a bare
    key that a file names too is that named key). Raises ConfigError, naming the file and line.
    `named`: the file was given by name, and must exist (a typo must not leave a router open)."""
    keys: dict[str, Key] = {}
    files = key_files(main)
    if named and not main.is_file():
        raise ConfigError(str(main), "the keys file does not exist (keys-file)")
    for path in files:
        try:
            sections = read_ini(path)
        except ConfigError as exc:  # said without the line, which may hold a key
            hidden = exc.message.startswith("expected")
            raise ConfigError(exc.where, "expected [section] or key = value (the line is not shown: it may hold "
                                         "a key)" if hidden else exc.message) from None
        for name, entries in sections.items():
            if name in keys:
                first = next(iter(entries.values()), None)
                raise ConfigError(first.where if first else str(path), f"key [{name}] is named twice")
            keys[name] = _key_from(name, entries, path)
    seen: dict[bytes, str] = {}
    for key in keys.values():
        if key.digest in seen:
            raise ConfigError(str(main), f"keys [{seen[key.digest]}] and [{key.name}] are the same key")
        seen[key.digest] = key.name
    files_keys = bool(keys)
    has_admin = bool(admin_keys) or any(k.role is Level.ADMIN for k in keys.values())
    for prefix, bare, role in (("admin", admin_keys, Level.ADMIN),
                               ("key", api_keys, Level.INFERENCE if has_admin else Level.ADMIN)):
        for number, clear in enumerate(bare, 1):
            hashed = digest(clear)
            if role is Level.ADMIN and prefix == "admin" and hashed in seen and keys[seen[hashed]].role < role:
                # The named key would win, and the admin key named for managing would not manage.
                named_key = keys[seen[hashed]]
                raise ConfigError(str(main), f"admin key {number} (admin-api-keys) is also key [{named_key.name}], "
                                             f"whose role is {ROLE_NAMES[named_key.role]}: a key has one role (give "
                                             f"[{named_key.name}] role = admin, or drop it from admin-api-keys)")
            if hashed not in seen:
                seen[hashed] = f"{prefix}-{number}"
                keys[f"{prefix}-{number}"] = Key(f"{prefix}-{number}", hashed, role, clear=clear)
    only_admin = bool(admin_keys) and not api_keys and not files_keys
    keyless = Level.ADMIN if not keys else Level.INFERENCE if only_admin else Level.PUBLIC
    return Keyring(tuple(keys.values()), tuple(files), keyless)


def section(name: str, key: str, role: str, models: str = "", limits: dict[str, int] | None = None) -> str:
    """The text of a new key's section, its hash only."""
    lines = [f"[{name}]", f"key-sha256 = {hashlib.sha256(key.encode()).hexdigest()}", f"role = {role}"]
    if models:
        lines.append(f"models = {models}")
    lines += [f"{k} = {v}" for k, v in (limits or {}).items() if v]
    return "\n".join(lines) + "\n"


def without_section(text: str, name: str) -> str | None:
    """The file's text less the section [name] (its lines, up to the next section); None when
    it has no such section. Comments and other sections stay as they are."""
    out, dropping, found = [], False, False
    for line in text.splitlines(keepends=True):
        header = re.match(r"\s*\[\s*([^\]]*?)\s*\]", line)
        if header:
            dropping = header.group(1) == name
            found |= dropping
        if not dropping:
            out.append(line)
    return "".join(out) if found else None
