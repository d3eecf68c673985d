"""INI files as llama.cpp reads its presets, keeping each value's line so errors can point at it.

Grammar (llama.cpp common/preset.cpp): `[section]` lines, `key = value` lines, comments after
`;` or `#`, keys `[A-Za-z_][A-Za-z0-9_.-]*`; keys before the first section belong to section "".
A later value for the same key in the same section replaces the earlier one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_SECTION = re.compile(r"^\[\s*([^\]]*?)\s*\]\s*(?:[;#].*)?$")
_KEY_VALUE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)\s*=\s*(.*?)\s*(?:[;#].*)?$")


class ConfigError(Exception):
    """A configuration file (or one line of it) that cannot be used."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


@dataclass(frozen=True)
class Value:
    text: str
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_ini(path: Path) -> dict[str, dict[str, Value]]:
    """Sections in file order, each {key: Value}. Raises ConfigError (unreadable file, bad line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot be read: {exc}") from None
    sections: dict[str, dict[str, Value]] = {"": {}}
    current = sections[""]
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if match := _SECTION.match(line):
            name = match.group(1)
            if not name:
                raise ConfigError(f"{path}:{number}", "empty section name []")
            current = sections.setdefault(name, {})
        elif match := _KEY_VALUE.match(line):
            current[match.group(1)] = Value(match.group(2), path, number)
        else:
            raise ConfigError(f"{path}:{number}", f"expected [section] or key = value, got {raw.strip()!r}")
    if not sections[""]:
        del sections[""]
    return sections


def expect_sections(sections: dict[str, dict[str, Value]], allowed: set[str], path: Path, hint: str) -> None:
    """A ConfigError at the first section (in file order) not in `allowed`, saying `hint`."""
    for section, entries in sections.items():
        if section not in allowed:
            first = next(iter(entries.values()), None)
            raise ConfigError(first.where if first else str(path), f"unknown section [{section}]: {hint}")


TRUE = frozenset({"true", "1", "on", "yes", "enabled"})
FALSE = frozenset({"false", "0", "off", "no", "disabled"})
BOOLEAN_HINT = "use true/false, 1/0 or on/off"


def boolean(text: str) -> bool | None:
    """The one reading of a boolean, wherever it is written (file, environment, query string);
    None when the text is neither."""
    word = text.strip().lower()
    return True if word in TRUE else False if word in FALSE else None


def parse_bool(value: Value, key: str) -> bool:
    if (parsed := boolean(value.text)) is None:
        raise ConfigError(value.where, f"{key} = {value.text!r} is not a boolean: {BOOLEAN_HINT}")
    return parsed
