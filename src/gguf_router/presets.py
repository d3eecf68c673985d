"""Model presets in llama.cpp's INI format: how each model's llama-server is started.

`[*]` holds what every model inherits; `[model-id]` adds to (or overrides) it for one model, or
adds a model with `model = PATH`. Keys are llama-server options (long or short name, or the
LLAMA_ARG_* variable), resolved against the configured binary's own option list, plus the
router's own keys below. Later files (presets.d/*.ini in name order) override earlier ones.
Precedence for a child's options: router command line > [model] > [*].
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .ini import ConfigError, Value, parse_bool, read_ini
from .llama_options import Option, OptionTable

GLOBAL = "*"


def _positive_seconds(value: Value, key: str) -> float:
    try:
        seconds = float(value.text)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(value.where, f"{key} = {value.text!r} must be a number of seconds above 0")
    return seconds


def _seconds(value: Value, key: str) -> float:
    try:
        seconds = float(value.text)
    except ValueError:
        seconds = -1.0
    if seconds < 0:
        raise ConfigError(value.where, f"{key} = {value.text!r} must be a number of seconds (0 = never)")
    return seconds


def _names(value: Value, key: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.text.split(",") if n.strip())


def _matching(pattern: str, explain: str) -> Callable[[Value, str], str]:
    def check(value: Value, key: str) -> str:
        if not re.fullmatch(pattern, value.text, re.IGNORECASE):
            raise ConfigError(value.where, f"{key} = {value.text!r}: {explain}")
        return value.text
    return check


def _environment(value: Value, key: str) -> tuple[str, ...]:
    items = tuple(shlex.split(value.text))
    for item in items:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item):
            raise ConfigError(value.where, f"{key}: {item!r} is not VAR=value")
    return items


def _devices(value: Value, key: str) -> tuple[str, ...]:
    paths = tuple(value.text.split())
    for path in paths:
        if not path.startswith("/dev/"):
            raise ConfigError(value.where, f"{key}: {path!r} is not a device under /dev/")
    return paths


_MEMORY = _matching(r"\d+(\.\d+)?[KMGT]?|\d+(\.\d+)?%|infinity", "a size like 512M, 8G or 50% (of RAM), or infinity")


# Keys the router reads itself; they never reach llama-server's command line.
ROUTER_KEYS: dict[str, Callable[[Value, str], Any]] = {
    "load-on-startup": parse_bool,
    "stop-timeout": _positive_seconds,
    "health-timeout": _positive_seconds,  # unanswered /health this long: killed, restarted
    "ttl": _seconds,  # idle seconds before the model is stopped (0 = never)
    "pin": parse_bool,  # never stopped to make room; still counted in the memory budget
    "alias": _names,
    # Hide the Hugging Face cache entries this preset's hf-repo / spec-draft-hf use from /models
    # (they stay usable by name), as llama.cpp's router does.
    "dedup-cache-models": parse_bool,
    # systemd launcher: the model unit's resource limits; `environment` reaches either launcher.
    "memory-max": _MEMORY,
    "memory-high": _MEMORY,
    "cpu-quota": _matching(r"\d+%", "a percentage of one CPU, like 150%"),
    "allowed-cpus": _matching(r"\d+(-\d+)?([ ,]\d+(-\d+)?)*", "CPU numbers and ranges, like 0-3,6"),
    "environment": _environment,
    # The unit sees only /dev/null and the like (PrivateDevices) plus these: GPUs, for example.
    "devices": _devices,
}
# llama-server options the router sets for each child; in a preset they would break routing.
RESERVED = frozenset({"--host", "--port", "--alias", "--model", "--models-dir", "--models-max", "--models-preset",
                      "--models-autoload", "--api-key", "--api-key-file", "--path",
                      "--reuse-port", "--ssl-key-file", "--ssl-cert-file"})
MODEL_KEYS = frozenset({"model", "m", "LLAMA_ARG_MODEL"})
# Where a model comes from in the Hugging Face cache (by the options' variables, which name them
# whatever short or long form the preset uses): resolved by the router to files, never passed on.
HF_KEYS = {"LLAMA_ARG_HF_REPO": "hf-repo", "LLAMA_ARG_HF_FILE": "hf-file", "LLAMA_ARG_SPEC_DRAFT_HF_REPO": "spec-draft-hf"}


@dataclass
class Section:
    """One model's (or [*]'s) settings, merged over all files."""

    options: dict[str, tuple[Option, str, Value]] = field(default_factory=dict)  # by option.flag
    router: dict[str, tuple[Any, Value]] = field(default_factory=dict)
    model: Value | None = None
    hf: dict[str, Value] = field(default_factory=dict)  # by HF_KEYS' names: hf-repo, hf-file, spec-draft-hf

    def merged_over(self, base: "Section") -> "Section":
        return Section({**base.options, **self.options}, {**base.router, **self.router}, self.model or base.model,
                       {**base.hf, **self.hf})


@dataclass(frozen=True)
class Presets:
    files: tuple[Path, ...]
    global_: Section
    models: dict[str, Section]

    def for_model(self, model_id: str) -> Section:
        own = self.models.get(model_id)
        return own.merged_over(self.global_) if own else self.global_


def _option_value(option: Option, negated: bool, value: Value, key: str) -> str:
    if option.takes_value:
        if value.text == "":
            raise ConfigError(value.where, f"{key} needs a value")
        if option.hint == "N":
            try:
                float(value.text)
            except ValueError:
                raise ConfigError(value.where, f"{key} = {value.text!r} is not a number") from None
        return value.text
    on = parse_bool(value, key)
    return "false" if on == negated else "true"


def _read_section(section: Section, name: str, entries: dict[str, Value], table: OptionTable) -> None:
    for key, value in entries.items():
        if key in ROUTER_KEYS:
            section.router[key] = (ROUTER_KEYS[key](value, key), value)
            continue
        if key in MODEL_KEYS:
            if name == GLOBAL:
                raise ConfigError(value.where, "model = ... belongs in a model's own section, not [*]")
            section.model = value
            continue
        found = table.lookup(key)
        if found is None:
            raise ConfigError(value.where, f"unknown key {key!r} in [{name}]: not an option of this llama-server "
                              f"nor one of the router's ({', '.join(ROUTER_KEYS)})")
        option, negated = found
        if option.env in HF_KEYS:
            if name == GLOBAL:
                raise ConfigError(value.where, f"{key} = ... belongs in a model's own section, not [*]")
            section.hf[HF_KEYS[option.env]] = value
            continue
        if option.flag in RESERVED:
            raise ConfigError(value.where, f"{key} is set by the router for each model and cannot be preset")
        section.options[option.flag] = (option, _option_value(option, negated, value, key), value)


def load_presets(main: Path, dropins: list[Path], table: OptionTable, required: bool) -> Presets:
    """Reads and checks every file; raises ConfigError at the first bad line."""
    if not main.is_file():
        if required:
            raise ConfigError(str(main), "presets file not found")
        files = list(dropins)
    else:
        files = [main, *dropins]
    global_ = Section()
    models: dict[str, Section] = {}
    for path in files:
        for name, entries in read_ini(path).items():
            if name == "":
                entries = {k: v for k, v in entries.items() if k != "version"}  # llama.cpp reserves it
                if entries:
                    first = next(iter(entries.values()))
                    raise ConfigError(first.where, "put options under [*] (every model) or a [model-id] section")
                continue
            section = global_ if name == GLOBAL else models.setdefault(name, Section())
            _read_section(section, name, entries, table)
    return Presets(tuple(files), global_, models)


def parse_child_args(args: tuple[str, ...], table: OptionTable) -> Section:
    """The router's own command-line options for children, as a section that overrides presets."""
    section = Section()
    i = 0
    while i < len(args):
        arg = args[i]
        found = table.lookup(arg) if arg.startswith("-") else None
        if found is None:
            raise ConfigError("command line", f"{arg!r} is not an option of this llama-server")
        option, negated = found
        if option.flag in RESERVED or option.env in HF_KEYS:
            raise ConfigError("command line", f"{arg} is set by the router for each model and cannot be passed to children")
        if option.takes_value:
            if i + 1 >= len(args):
                raise ConfigError("command line", f"{arg} needs a value")
            value, i = args[i + 1], i + 2
        else:
            value, i = ("false" if negated else "true"), i + 1
        section.options[option.flag] = (option, value, Value(value, Path("command line"), 0))
    return section


def to_argv(section: Section) -> list[str]:
    """llama-server's command line for a section, as llama.cpp's common_preset::to_args builds it."""
    argv: list[str] = []
    for option, value, _ in section.options.values():
        if option.takes_value:
            argv += [option.flag, value]
        elif value == "true":
            argv.append(option.flag)
        elif option.negatives:
            argv.append(option.negatives[-1])
    return argv
