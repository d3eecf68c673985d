"""`gguf-router key add|list|remove`: the keys file, from a shell, with or without a running
router (it rereads the keys file when it changes).

The keys file is rewritten whole and renamed into place, keeping its owner, group and mode (a
new one is 0640, group gguf-router where that group exists): a router reading it never sees half.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import grp
import os
import sys
import tempfile
from pathlib import Path

from .ini import ConfigError
from .keys import DEFAULT_KEYS, LIMITS, ROLE_NAMES, ROLES, key_files, new_key, read_keys, section, without_section
from .settings import Settings


def _replace(path: Path, text: str) -> None:
    """Writes the file whole, on disk before it is renamed over the old one (a crash leaves one or
    the other, never an empty file); a symlink's target is what is replaced."""
    path = path.resolve()
    try:
        st = path.stat()
        mode, owner, group = st.st_mode & 0o7777, st.st_uid, st.st_gid
    except FileNotFoundError:
        mode, owner, group = 0o640, os.getuid(), os.getgid()
        with contextlib.suppress(KeyError):
            group = grp.getgrnam("gguf-router").gr_gid
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        with contextlib.suppress(PermissionError):  # (not root: the file stays the caller's)
            os.chown(tmp, owner, group)
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _keys_file(settings: Settings, given: Path | None) -> Path:
    return given or settings.keys_file or DEFAULT_KEYS


def key(argv: list[str], settings_for) -> None:
    p = argparse.ArgumentParser(prog="gguf-router key", allow_abbrev=False)
    p.add_argument("--config", help="the router's config file (where keys-file may be set)")
    p.add_argument("--keys-file", type=Path, help="the keys file (default: keys-file of the config, else "
                                                  "/etc/gguf-router/keys.ini)")
    commands = p.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="create a key; it is printed once, only its hash is kept")
    add.add_argument("name")
    add.add_argument("--role", choices=tuple(ROLES), default="inference")
    add.add_argument("--models", default="", help="comma-separated globs over model ids and aliases (default: all)")
    for limit in LIMITS:
        add.add_argument(f"--{limit}", type=int, default=0, metavar="N", help="0 = no limit (default)")
    commands.add_parser("list", help="the keys, their roles, models and limits (never the keys)")
    remove = commands.add_parser("remove", help="delete a key's section")
    remove.add_argument("name")
    args = p.parse_args(argv)
    settings: Settings = settings_for({"config": args.config} if args.config else {})
    path = _keys_file(settings, args.keys_file)
    with _locked(path.resolve().parent):  # two `key add` at once: each sees what the other wrote
        _edit(args, settings, path)


@contextlib.contextmanager
def _locked(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _edit(args, settings: Settings, path: Path) -> None:
    try:
        ring = read_keys(path, settings.all_api_keys(), settings.all_admin_keys())
    except ConfigError as exc:
        raise SystemExit(f"gguf-router: {exc}") from None
    if args.command == "list":
        print(f"{'NAME':<20} {'ROLE':<10} {'MODELS':<24} LIMITS")
        for k in ring.keys:
            limits = ", ".join(f"{name} {getattr(k, name.replace('-', '_'))}" for name in LIMITS
                               if getattr(k, name.replace("-", "_"))) or "none"
            print(f"{k.name:<20} {ROLE_NAMES[k.role]:<10} {', '.join(k.models) or 'all':<24} {limits}")
        return
    if args.command == "add":
        if any(k.name == args.name for k in ring.keys):
            raise SystemExit(f"gguf-router: a key named {args.name} exists already")
        clear = new_key()
        text = path.read_text() if path.exists() else ""
        text += ("\n" if text and not text.endswith("\n\n") else "") + section(
            args.name, clear, args.role, args.models, {limit: getattr(args, limit.replace("-", "_")) for limit in LIMITS})
        try:  # checked whole, as the router will read it
            read_keys_text(path, text)
        except ConfigError as exc:
            raise SystemExit(f"gguf-router: {exc.message}") from None
        _replace(path, text)
        print(clear)
        print(f"key {args.name} ({args.role}) added to {path}; it is shown only now", file=sys.stderr)
        return
    if [k.name for k in ring.keys] == [args.name]:
        raise SystemExit(f"gguf-router: {args.name} is the last key: without it anyone could use and manage the "
                         "router (the router would keep it until restarted); add another first")
    for candidate in key_files(path):
        text = without_section(candidate.read_text(), args.name)
        if text is not None:
            _replace(candidate, text)
            print(f"key {args.name} removed from {candidate}", file=sys.stderr)
            return
    raise SystemExit(f"gguf-router: no key [{args.name}] in {', '.join(map(str, key_files(path))) or path}")


def read_keys_text(path: Path, text: str) -> None:
    """Raises ConfigError if `text`, as the keys file at `path`, would not be read."""
    with tempfile.TemporaryDirectory() as folder:
        trial = Path(folder) / path.name
        trial.write_text(text)
        read_keys(trial, (), ())
