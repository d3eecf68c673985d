"""The accelerators the models can run on: what the configured llama-server lists, and each one's budget.

llama-server lists its devices with `--list-devices` (CPU ones left out), one line each:
`  NAME: DESCRIPTION (TOTAL MiB, FREE MiB free)`. A local device (`CUDA0`) is known by its name.
An RPC device is asked for alone (`--rpc ENDPOINT --list-devices`) and known by its endpoint,
because llama.cpp numbers RPC devices per process in `--rpc` order (RPC0, RPC1 ...): the same
server is RPC1 in one child and RPC0 in another. A child placed on it gets that endpoint only,
as RPC0.

`ggml-rpc-server` serves one client at a time (the next waits in the handshake until the first
disconnects), so an RPC device holds one model at a time, and asking it while a child holds it
waits: it is asked with a timeout, and a device that does not answer keeps what was known of it.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from .llama_options import list_devices
from .memory import MiB
from .sizes import parse_size, size_text

_LINE = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$")
ASK_TIMEOUT = 5.0  # seconds: a free ggml-rpc-server answers in well under one


@dataclass(frozen=True)
class Device:
    id: str  # the endpoint of an RPC device, the name of a local one
    name: str  # as llama.cpp names it in a child's log and --fit-print: CUDA0, RPC0 (within one child)
    description: str
    total: int  # bytes
    free: int  # bytes, when it was asked
    budget: int  # bytes the models placed on it may take together
    rpc: bool = False
    answered: bool = True  # False: busy or gone when last asked; the figures are older

    @property
    def exclusive(self) -> bool:
        """Whether it serves one child at a time (ggml-rpc-server)."""
        return self.rpc

    def child_args(self) -> tuple[str, ...]:
        """What places a child on this device, and on no other."""
        return ("--rpc", self.id, "--device", "RPC0") if self.rpc else ("--device", self.name)

    def as_json(self) -> dict:
        return {"id": self.id, "name": self.name, "description": self.description, "total_bytes": self.total,
                "free_bytes": self.free, "budget_bytes": self.budget, "rpc": self.rpc,
                "exclusive": self.exclusive, "answered": self.answered}


def parse_list(text: str) -> list[tuple[str, str, int, int]]:
    """(name, description, total bytes, free bytes) of each line of `--list-devices`."""
    _, _, listed = text.partition("Available devices:")
    found = []
    for line in listed.splitlines():
        if match := _LINE.match(line):
            name, description, total, free = match.groups()
            found.append((name, description, int(total) * MiB, int(free) * MiB))
    return found


def parse_budgets(items: tuple[str, ...]) -> dict[str, int]:
    """`--device-budget ID:SIZE` (repeatable): ID is a device's name or RPC endpoint, which holds
    a colon itself, so the size is what follows the last one."""
    budgets = {}
    for item in items:
        device, colon, size = item.rpartition(":")
        if not colon or not device:
            raise ValueError(f"{item!r} is not ID:SIZE (a device's name or RPC endpoint, a colon, a size such as 6G)")
        budgets[device.strip()] = parse_size(size.strip(), total=1)
    return budgets


def _ask(llama_server: Path, rpc: str | None, timeout: float) -> str | None:
    if rpc is None:
        return list_devices(llama_server)  # asked early, while the router imports (llama_options.ask_early)
    try:
        return subprocess.run([str(llama_server), "--rpc", rpc, "--list-devices"], capture_output=True, text=True,
                              timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def discover(llama_server: Path, rpc: tuple[str, ...], reserve: int, budgets: Mapping[str, int],
             known: Mapping[str, Device] | None = None, held: frozenset[str] = frozenset(),
             timeout: float = ASK_TIMEOUT) -> dict[str, Device]:
    """Blocking. Every device by its id: the local ones, then each RPC endpoint asked alone (all at
    once), but those in `held` (a child holds them: the question would wait). `known`: the
    devices from before, whose figures stand for those not asked or not answering now."""
    known = known or {}
    asked = [endpoint for endpoint in rpc if endpoint not in held]
    with ThreadPoolExecutor(max_workers=1 + len(asked)) as pool:
        answers = dict(zip((None, *asked), pool.map(lambda endpoint: _ask(llama_server, endpoint, timeout),
                                                    (None, *asked))))
    devices: dict[str, Device] = {}
    for name, description, total, free in parse_list(answers[None] or ""):
        if not name.startswith("RPC"):
            devices[name] = _device(name, name, description, total, free, False, reserve, budgets)
    for endpoint in rpc:
        listed = [line for line in parse_list(answers.get(endpoint) or "") if line[1] == endpoint]
        if listed:
            name, description, total, free = listed[0]
            devices[endpoint] = _device(endpoint, "RPC0", description, total, free, True, reserve, budgets)
        elif endpoint in known:  # its budget as the settings say now
            was = known[endpoint]
            devices[endpoint] = replace(_device(endpoint, was.name, was.description, was.total, was.free, True,
                                                reserve, budgets), answered=endpoint in held and was.answered)
        else:  # never seen: no room on it until it answers
            devices[endpoint] = Device(endpoint, "RPC0", endpoint, 0, 0, budgets.get(endpoint, 0), True, False)
    return devices


def _device(device_id: str, name: str, description: str, total: int, free: int, rpc: bool, reserve: int,
            budgets: Mapping[str, int]) -> Device:
    budget = budgets.get(device_id, budgets.get(name, max(total - reserve, 0)))
    return Device(device_id, name, description, total, free, budget, rpc)


# What llama.cpp logs (at ERROR, so at any verbosity) when a device has no memory for a load.
OUT_OF_MEMORY = ("cudaMalloc failed", "unable to allocate", "failed to allocate buffer for kv cache",
                 "failed to allocate compute", "ErrorOutOfDeviceMemory", "out of device memory")


def out_of_device_memory(log_tail: tuple[str, ...]) -> bool:
    return any(marker.lower() in line.lower() for line in log_tail for marker in OUT_OF_MEMORY)


def device_line(device: Device) -> str:
    """One line for the log and check-config."""
    state = "" if device.answered else "; did not answer (busy or down), figures from before"
    return (f"device {device.id} ({device.description}): {size_text(device.total)} total, "
            f"{size_text(device.free)} free, budget {size_text(device.budget)}"
            f"{'; RPC, one model at a time' if device.rpc else ''}{state}")
