"""Everything that can happen to the scheduler, as plain values `step` takes one at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..launchers.cgroup import MemoryUse
from ..policy import Limits
from .records import ModelSpec, Why


@dataclass(frozen=True)
class Configure:
    """A new model list (files or presets changed) and limits (a reload)."""

    specs: Mapping[str, ModelSpec]
    limits: Limits = Limits()
    queue_max: int = 256


@dataclass(frozen=True)
class Arrive:
    """A request for a model; `ticket` names it until it is admitted or refused."""

    ticket: int
    model: str
    autoload: bool = True


@dataclass(frozen=True)
class Leave:
    """A waiting request gives up: its queue timeout passed, or its client went away (why None)."""

    ticket: int
    model: str
    why: Why | None = None


@dataclass(frozen=True)
class Release:
    """A request that was served is done."""

    model: str


@dataclass(frozen=True)
class Load:
    model: str


@dataclass(frozen=True)
class Unload:
    model: str


@dataclass(frozen=True)
class Adopted:
    """A child an earlier router left running (a systemd unit) was found."""

    model: str
    pid: int


@dataclass(frozen=True)
class Progress:
    model: str
    generation: int
    value: float


@dataclass(frozen=True)
class Ready:
    model: str
    generation: int
    pid: int
    info: Mapping | None = None
    took: float | None = None  # seconds from launch to ready; None for an adopted child
    memory: MemoryUse | None = None


@dataclass(frozen=True)
class LaunchFailed:
    model: str
    generation: int
    message: str
    code: int | None = None
    oom: str | None = None  # how it went over its memory limit, if it was killed for that
    peak: int | None = None
    log_tail: tuple[str, ...] = ()
    reason: str = "failed to start"  # in short, for its status: why the start failed
    device_oom: bool = False  # its log says a device had no memory for it (devices.out_of_device_memory)


@dataclass(frozen=True)
class Exited:
    """A child that was ready (or was being stopped while loading) is gone."""

    model: str
    generation: int
    code: int | None
    oom: str | None = None
    peak: int | None = None
    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hung:
    """A loaded child has not answered /health for its health timeout."""

    model: str
    generation: int
    reason: str


@dataclass(frozen=True)
class BackoffOver:
    model: str


@dataclass(frozen=True)
class Tick:
    """Once a second: the memory each loaded child was seen using."""

    samples: Mapping[str, MemoryUse | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Shutdown:
    keep_children: bool = False  # they outlive the router (systemd units), the next one adopts them


Input = (Configure | Arrive | Leave | Release | Load | Unload | Adopted | Progress | Ready | LaunchFailed | Exited
         | Hung | BackoffOver | Tick | Shutdown)
