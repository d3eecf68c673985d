"""The OPTIONS section of the man page (debian/gguf-router.1), made from the settings' own
declarations, so the page cannot drift from `gguf-router --help`. `python -m gguf_router.manpage
debian/gguf-router.1` rewrites the section in place; tests/test_settings.py checks it is current."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from .settings import flags, setting_type

START, END = ".SH OPTIONS\n", ".SH FILES\n"


def _roff(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("%%", "%")


def options() -> str:
    parts = [START]
    for item, names in flags():
        kind, meta = setting_type(item.name), item.metadata
        spelled = "\\fR, \\fB".join(_roff(n) for n in names)
        if typing.get_origin(kind) is typing.Literal:
            value = "|".join(typing.get_args(kind))
        else:
            value = None if kind is bool else meta["metavar"]
        head = f'.BI "{spelled}" " {value}"' if value else f".B {spelled}"
        parts.append(f".TP\n{head}\n{_roff(meta['help'])}\n")
    return "".join(parts)


def rewritten(page: str) -> str:
    return page[:page.index(START)] + options() + page[page.index(END):]


if __name__ == "__main__":
    path = Path(sys.argv[1])
    path.write_text(rewritten(path.read_text()))
