"""The options the configured llama-server accepts, read from its own `--help`.

Presets name options by long or short name or LLAMA_ARG_* variable, as llama.cpp's do; asking
the binary itself (14 ms, cached per binary and mtime) keeps the router right for any build and
lets `check-config` tell that an option is unknown to *this* llama-server.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_ENV = re.compile(r"\(env: (LLAMA_ARG_[A-Z0-9_]+)\)")


@dataclass(frozen=True)
class Option:
    names: tuple[str, ...]  # positive forms, e.g. ("-c", "--ctx-size")
    negatives: tuple[str, ...]  # e.g. ("--no-mmap",)
    hint: str  # the value's placeholder ("N", "FNAME", "[on|off|auto]"); "" for a flag
    env: str | None

    @property
    def takes_value(self) -> bool:
        return bool(self.hint)

    @property
    def flag(self) -> str:
        """The name used on command lines we build: the last positive form, as llama.cpp does."""
        return self.names[-1]


class OptionTable:
    def __init__(self, options: list[Option]):
        self._by_key: dict[str, tuple[Option, bool]] = {}
        for opt in options:
            for name in opt.names:
                self._by_key.setdefault(name.lstrip("-"), (opt, False))
            for name in opt.negatives:
                self._by_key.setdefault(name.lstrip("-"), (opt, True))
            if opt.env:
                self._by_key.setdefault(opt.env, (opt, False))

    def lookup(self, key: str) -> tuple[Option, bool] | None:
        """(option, negated) for a preset key such as `ctx-size`, `c`, `no-mmap` or `LLAMA_ARG_CTX_SIZE`."""
        return self._by_key.get(key.lstrip("-") if key.startswith("-") else key)


def _split_names(names: list[str], takes_value: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """llama.cpp prints a flag's positive forms first, then its negative ones: `--no-x`, `-no-x`,
    or a short `-nx` followed by a `--no-` form (-nkvo, --no-kv-offload)."""
    if takes_value:
        return tuple(names), ()
    for i, name in enumerate(names[1:], 1):
        later_no = any(n.startswith("--no-") for n in names[i:])
        if name.startswith(("--no-", "-no-")) or (name.startswith("-n") and not name.startswith("--") and later_no):
            return tuple(names[:i]), tuple(names[i:])
    return tuple(names), ()


def parse_help(text: str) -> OptionTable:
    options: list[Option] = []
    current: list = []

    def flush():
        if current:
            names, hint, env = current
            positives, negatives = _split_names(names, bool(hint))
            options.append(Option(positives, negatives, hint, env))
            current.clear()

    for line in text.splitlines():
        if line.startswith("-"):
            flush()
            # "-c,    --ctx-size N      description": names, an optional value hint, the text.
            head = re.split(r" {2,}", re.sub(r", +", ", ", line.strip()), maxsplit=1)[0]
            names = head.split(", ")
            last, _, hint = names[-1].partition(" ")
            names[-1] = last
            current[:] = [names, hint, None]
        elif current and (env := _ENV.search(line)):
            current[2] = env.group(1)
    flush()
    return OptionTable(options)


class LlamaServerError(Exception):
    pass


_asked: dict[tuple[str, str], subprocess.Popen] = {}  # questions put to a llama-server, not read yet


def ask_early(llama_server: Path) -> None:
    """Starts `--help` and `--list-devices` now; their answers are read when first needed, so the
    two process starts overlap the router's imports instead of adding to its start-up."""
    for question in ("--help", "--list-devices"):
        try:
            _asked[(str(llama_server), question)] = subprocess.Popen(
                [str(llama_server), question], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError:
            return  # asked again, and reported, where the answer is needed


def _answer(path: str, question: str) -> str:
    """llama-server's output for `question` (both streams); raises OSError, TimeoutExpired."""
    proc = _asked.pop((path, question), None) or subprocess.Popen(
        [path, question], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        return proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


@functools.lru_cache(maxsize=4)
def _table(path: str, mtime_ns: int) -> OptionTable:
    try:
        text = _answer(path, "--help")
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LlamaServerError(f"cannot run {path} --help: {exc}") from None
    table = parse_help(text)
    if table.lookup("ctx-size") is None:
        raise LlamaServerError(f"{path} --help does not list llama-server's options (is it llama-server?)")
    return table


def options_of(llama_server: Path) -> OptionTable:
    try:
        mtime = llama_server.stat().st_mtime_ns
    except OSError as exc:
        raise LlamaServerError(f"no llama-server at {llama_server}: {exc.strerror}") from None
    return _table(str(llama_server), mtime)


@functools.lru_cache(maxsize=4)
def _devices(path: str, mtime_ns: int) -> str:
    try:
        return _answer(path, "--list-devices")
    except (OSError, subprocess.TimeoutExpired):
        return ""


def list_devices(llama_server: Path) -> str:
    """What `llama-server --list-devices` prints: its local devices (devices.py reads it)."""
    try:
        return _devices(str(llama_server), llama_server.stat().st_mtime_ns)
    except OSError:
        return ""


def has_gpu(llama_server: Path) -> bool:
    """Whether this llama-server sees a device to offload layers to (a CPU-only build lists none)."""
    _, _, listed = list_devices(llama_server).partition("Available devices:")
    return any(line.strip() and line.strip() != "(none)" for line in listed.splitlines())


@functools.lru_cache(maxsize=4)
def _build_info(path: str, mtime_ns: int) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    # "version: 0.6.0-dev (build 11434, commit unknown)"
    found = re.search(r"\(build (\d+), commit ([^)\s]+)\)", out.stdout + out.stderr)
    return f"b{found.group(1)}-{found.group(2)}" if found else "unknown"


def build_info(llama_server: Path) -> str:
    """llama.cpp's build_info of this llama-server (`b11434-unknown`), as its own /props shows it."""
    try:
        return _build_info(str(llama_server), llama_server.stat().st_mtime_ns)
    except OSError:
        return "unknown"
