"""A model unit's memory as the kernel accounts it: its own memory cgroup, v2 or v1.

Under systemd each model unit gets a cgroup of its own when the memory controller is there
(always with the system manager; with a user manager only where memory is delegated to it, as
on a cgroup v2 Debian 12). Where the unit has none of its own, there is no enforced limit and
no per-unit counter, and the child's own process figures are what is left (`process_memory`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

UNLIMITED = 1 << 62  # cgroup v1 prints "no limit" as a number close to 2^63


@dataclass(frozen=True)
class MemoryUse:
    current: int
    peak: int
    limit: int | None  # what the kernel enforces on it, if anything


class UnitMemory:
    """The memory counters of a unit's cgroup; None from `find` when the unit has none of its own."""

    def __init__(self, folder: Path, v2: bool):
        self.folder = folder
        self.v2 = v2

    @classmethod
    def of(cls, pid: int | str) -> "tuple[UnitMemory, str] | None":
        """The memory cgroup a process is in, and its path; None without a memory controller."""
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            number, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return cls(Path(f"/sys/fs/cgroup/memory{path}"), v2=False), path
            if number == "0" and len(lines) == 1:
                return cls(Path(f"/sys/fs/cgroup{path}"), v2=True), path
        return None

    @classmethod
    def find(cls, pid: int | str, unit: str) -> "UnitMemory | None":
        found = cls.of(pid)
        # A shared cgroup (a v1 user manager's) counts other processes too: not this unit's.
        return found[0] if found and found[1].endswith("/" + unit) else None

    def _read(self, v2_name: str, v1_name: str) -> int | None:
        try:
            text = (self.folder / (v2_name if self.v2 else v1_name)).read_text().strip()
        except OSError:
            return None
        return None if text == "max" or not text.isdigit() or int(text) >= UNLIMITED else int(text)

    def use(self) -> MemoryUse | None:
        current = self._read("memory.current", "memory.usage_in_bytes")
        if current is None:
            return None
        peak = self._read("memory.peak", "memory.max_usage_in_bytes")  # memory.peak: kernel 5.19+
        return MemoryUse(current, max(peak or 0, current), self._read("memory.max", "memory.limit_in_bytes"))

    def oom_kills(self) -> int:
        try:
            entries = (self.folder / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        except OSError:
            return 0
        for entry in entries.splitlines():
            key, _, value = entry.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0


def process_memory(pid: int | None) -> MemoryUse | None:
    """Resident memory of one process, now and at its peak (the kernel's VmRSS and VmHWM)."""
    if not pid:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    if "VmRSS" not in fields:
        return None
    return MemoryUse(fields["VmRSS"], fields.get("VmHWM", fields["VmRSS"]), None)


def cpu_ticks(pid: int | None) -> int | None:
    """The CPU time a process has used, all its threads together, in clock ticks; None once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text() if pid else ""
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return int(fields[11]) + int(fields[12]) if len(fields) > 12 else None  # utime + stime


def host_memory() -> int:
    """The RAM of this host, or the memory limit of the router's own cgroup if that is lower."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    own = UnitMemory.of("self")
    limit = own[0]._read("memory.max", "memory.limit_in_bytes") if own else None
    return min(ram, limit) if limit else ram
