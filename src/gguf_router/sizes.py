"""Memory sizes as people write them (512M, 20G, 80% of RAM) and read them (1.5 GiB)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?|(\d+(?:\.\d+)?)\s*%", re.IGNORECASE)


def parse_size(text: str, total: int | None = None) -> int:
    """Bytes for `512M`, `20G`, `1.5T`, `1048576` (1024-based, as systemd reads them), or `80%` of
    `total` (the host's memory by default). Raises ValueError for anything else."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size like 512M, 20G or 80%")
    if match.group(3) is not None:
        if total is None:
            from .launchers.cgroup import host_memory
            total = host_memory()
        return int(float(match.group(3)) / 100 * total)
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def size_text(value: float) -> str:
    """Bytes for people: 512 B, 98.4 MiB, 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return ""
