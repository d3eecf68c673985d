"""The scheduler's state as frozen records: one per model, one for the fleet, and the reasons a
request or a command is refused. Only `step` makes new ones; everything else reads them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..launchers.cgroup import MemoryUse
from ..policy import Limits


class Phase(enum.Enum):
    """Where a model is: its child's life and what the scheduler means to do with it, in one."""

    UNLOADED = "unloaded"  # no child, nothing planned
    QUEUED = "queued"  # no child; in the queue for a slot (requests or an explicit load wait)
    LOADING = "loading"
    LOADED = "loaded"
    DRAINING = "draining"  # loaded, chosen to stop: finishes what it serves, takes nothing new
    UNLOADING = "unloading"  # told to stop; still holds its slot and memory until it exits
    BACKOFF = "backoff"  # crashed; queued again when its delay is over, requests wait for that
    FAILED = "failed"  # crashed too often: not started until loaded explicitly


P = Phase
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = MappingProxyType({
    P.UNLOADED: frozenset({P.QUEUED, P.LOADING}),  # LOADING: a child an earlier router left, adopted
    P.QUEUED: frozenset({P.LOADING, P.UNLOADED}),
    P.LOADING: frozenset({P.LOADED, P.UNLOADING, P.UNLOADED}),  # UNLOADED: it failed to start
    P.LOADED: frozenset({P.DRAINING, P.UNLOADING, P.BACKOFF, P.FAILED, P.UNLOADED}),  # the last three: it died
    P.DRAINING: frozenset({P.LOADED, P.UNLOADING, P.BACKOFF, P.FAILED, P.UNLOADED}),  # LOADED: no longer needed
    P.UNLOADING: frozenset({P.UNLOADED, P.QUEUED}),  # QUEUED: requests came for its next child
    P.BACKOFF: frozenset({P.QUEUED, P.UNLOADED}),
    P.FAILED: frozenset({P.QUEUED, P.UNLOADED}),  # UNLOADED: its options changed, a fresh start
})
# Phases that hold one of the --models-max slots and their memory: a stopping child still has it.
HOLDS_SLOT = frozenset({P.LOADING, P.LOADED, P.DRAINING, P.UNLOADING})
# What llama.cpp's router calls each phase, in /models and in `status_change` events.
STATUS: Mapping[Phase, str] = MappingProxyType({
    P.UNLOADED: "unloaded", P.QUEUED: "unloaded", P.BACKOFF: "unloaded", P.FAILED: "unloaded",
    P.LOADING: "loading", P.LOADED: "loaded", P.DRAINING: "loaded", P.UNLOADING: "unloading",
})


class InvalidTransition(RuntimeError):
    pass


class Cause(enum.Enum):
    """Why a child is told to stop."""

    UNLOADED = "unloaded"
    EVICTED = "evicted"
    TTL = "ttl"
    RESTART = "restarting with new options"
    RETIRED = "its file or preset was removed"
    SHUTDOWN = "the router is stopping"


@dataclass(frozen=True)
class Exit:
    """How the last child of a model ended."""

    code: int | None
    reason: str  # "unloaded", "evicted", "crashed", "killed: out of memory", "failed to start"
    failed: bool
    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stats:
    """Counters since the router started, for /metrics."""

    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    crashes: int = 0
    oom_kills: int = 0
    restarts: int = 0
    unresponsive: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """What the scheduler needs of a model's configuration."""

    id: str
    version: tuple = ()  # its command line and file stamp: a change restarts a running child
    argv: tuple[str, ...] = ()  # what a memory floor is recorded against
    estimate: int = 0  # bytes it is estimated to need once loaded
    floor: int = 0  # bytes an earlier out-of-memory kill showed it needs at least
    pinned: bool = False
    ttl: float = 0.0  # seconds idle before it is stopped; 0 = never
    unusable: str | None = None  # why its file cannot be loaded
    # The devices it may run on, with the bytes it takes on each; empty: it runs on the host alone.
    places: Mapping[str, int] = field(default_factory=dict)
    device_floor: int = 0  # bytes a load that ran out of device memory showed it needs on one at least


@dataclass(frozen=True)
class ModelRecord:
    spec: ModelSpec
    phase: Phase = P.UNLOADED
    cause: Cause | None = None  # why it is draining or unloading
    removed: bool = False  # its file or preset is gone: forgotten once stopped
    stale: bool = False  # its options changed while it was loading: restarted once it has served its waiters
    held: bool = False  # an explicit load: its queue entry stays with no request waiting
    tickets: tuple[tuple[int, float], ...] = ()  # requests waiting for it to load: (ticket, since)
    in_flight: int = 0  # requests being served
    last_used: float = 0.0
    started_at: float = 0.0  # when its child was launched
    loaded_at: float = 0.0  # when its child became ready
    load_took: float = 0.0  # seconds its last load took
    generation: int = 0  # counts launches: inputs about an earlier child are ignored
    device: str | None = None  # where its child runs (or last ran), when it runs on a device
    device_bytes: int = 0  # what it was admitted at there: a reload's new figures wait for its next child
    progress: float | None = None
    info: Mapping | None = None  # the child's own /v1/models entry, from when it became ready
    memory: MemoryUse | None = None  # the running child's, as the last tick sampled it
    peak: int = 0  # the most memory the running child has held
    crashes: tuple[float, ...] = ()  # when it crashed, within crashes.WINDOW
    restart_at: float | None = None  # when a crashed model is queued again
    failure: str | None = None  # why it is FAILED
    killed_for: str | None = None  # why the router killed its child, when it did
    last_exit: Exit | None = None
    stats: Stats = Stats()

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def counted(self) -> int:
        """The memory it is taken to need: its estimate, or more if it needed more before (a floor
        learned from an out-of-memory kill) or is seen using more now."""
        return max(self.spec.estimate, self.spec.floor, self.peak if self.phase in HOLDS_SLOT else 0)

    @property
    def places(self) -> dict[str, int]:
        """Where it may run, each device with what it is counted at there (at least its floor)."""
        return {d: max(b, self.spec.device_floor) for d, b in self.spec.places.items()}

    @property
    def on_device(self) -> int:
        """What it is counted at on its device."""
        return self.device_bytes if self.device is not None else 0

    @property
    def waiting(self) -> int:
        return len(self.tickets)

    @property
    def idle(self) -> bool:
        return self.phase is P.LOADED and self.in_flight == 0 and not self.tickets


@dataclass(frozen=True)
class Fleet:
    models: Mapping[str, ModelRecord] = field(default_factory=dict)
    queue: tuple[str, ...] = ()  # models requests or loads wait for, in arrival order
    holding: tuple[str, ...] = ()  # models whose phase holds a slot: what a decision looks at, of thousands
    limits: Limits = Limits()
    queue_max: int = 256  # requests waiting for a load, all models together
    closing: bool = False
    waiting: int = 0  # requests waiting for a load, all models together
    waited: tuple[int, float] = (0, 0.0)  # requests that waited for a load, and their seconds
    refused: Mapping[str, int] = field(default_factory=lambda: {"queue_full": 0, "queue_timeout": 0,
                                                                  "never_fits": 0})

    @property
    def reserved(self) -> int:
        """The memory the models holding slots are counted at."""
        return sum(self.models[m].counted for m in self.holding)

    def on_devices(self) -> dict[str, tuple[int, tuple[str, ...]]]:
        """Per device, what the models holding slots there are counted at, and those models."""
        held: dict[str, tuple[int, tuple[str, ...]]] = {}
        for rec in map(self.models.get, self.holding):
            if rec.device is not None:
                used, ids = held.get(rec.device, (0, ()))
                held[rec.device] = (used + rec.on_device, (*ids, rec.id))
        return held

    def position(self, model_id: str) -> int | None:
        """1 for the first queue entry, and so on; None when it is not queued."""
        return self.queue.index(model_id) + 1 if model_id in self.queue else None


class Why(enum.Enum):
    """Why a request or a command is refused; refusals.py says it to the client."""

    NOT_FOUND = "not_found"
    NOT_USABLE = "not_usable"
    NOT_LOADED = "not_loaded"  # autoload is off
    FAILED = "failed"
    NEVER_FITS = "never_fits"
    NEVER_FITS_DEVICE = "never_fits_device"
    QUEUE_FULL = "queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    LEFT_QUEUE = "left_queue"
    LOAD_FAILED = "load_failed"
    STOPPED_LOADING = "stopped_loading"
    NOT_RESTARTED = "not_restarted"
    ALREADY_RUNNING = "already_running"
    NOT_RUNNING = "not_running"


@dataclass(frozen=True)
class Refusal:
    why: Why
    model: str
    detail: str = ""  # what happened, in words: a failure, why it left the queue
    figures: Mapping[str, int] = field(default_factory=dict)  # bytes and counts the message names


class Refused(Exception):
    """Raised by the scheduler's façade with the core's reason; at the HTTP boundary (app.py)
    refusals.http_error says it to the client."""

    def __init__(self, refusal: Refusal, queue_timeout: float = 0.0):
        super().__init__(refusal.why.value)
        self.refusal, self.queue_timeout = refusal, queue_timeout
