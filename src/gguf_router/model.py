"""A model's runtime state: one explicit state machine, written only through `set_state`."""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Callable

from .catalog import ModelConfig
from .crashes import CrashHistory
from .discovery import ModelFile
from .launchers import Child
from .launchers.cgroup import MemoryUse

log = logging.getLogger("gguf_router.model")


class ModelState(enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


S = ModelState
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    S.UNLOADED: frozenset({S.LOADING}),
    S.LOADING: frozenset({S.LOADED, S.UNLOADING, S.UNLOADED}),  # UNLOADED: failed to start
    S.LOADED: frozenset({S.UNLOADING, S.UNLOADED}),  # UNLOADED: the child died on its own
    S.UNLOADING: frozenset({S.UNLOADED}),
}
# States that hold one of the --models-max slots: a stopping child still holds its memory.
HOLDS_SLOT = frozenset({S.LOADING, S.LOADED, S.UNLOADING})


class Plan(enum.Enum):
    """What the scheduler means to do with a model, beside the state its child is in; one at a time."""

    NONE = "none"
    QUEUED = "queued"  # waiting in the queue for a slot (requests, or an explicit load)
    BACKOFF = "backoff"  # crashed; started again once its delay is over, requests wait for that
    RESTART = "restart"  # its options or file changed while running: restarted once idle
    RETIRE = "retire"  # its file or preset is gone: stopped once idle, then forgotten
    FAILED = "failed"  # crashed too often: not started again until loaded explicitly (`failure`)


class InvalidTransition(RuntimeError):
    pass


@dataclass(frozen=True)
class Exit:
    """How the last child of a model ended."""

    code: int | None
    reason: str  # "unloaded", "evicted", "crashed", "killed: out of memory", "failed to start"
    failed: bool
    log_tail: tuple[str, ...] = ()


@dataclass
class Stats:
    """Counters since the router started, for /metrics."""

    loads: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    crashes: int = 0
    oom_kills: int = 0
    restarts: int = 0
    unresponsive: int = 0


class Model:
    def __init__(self, config: ModelConfig, on_change: Callable[["Model"], None] | None = None):
        self.config = config
        self.on_change = on_change  # told after every state change (live events)
        self.stats = Stats()
        self.state = S.UNLOADED
        self.plan = Plan.NONE
        self.child: Child | None = None
        self.last_exit: Exit | None = None
        self.loaded_info: dict | None = None  # the child's own /v1/models entry, sent when ready
        self.progress: float | None = None
        self.in_flight = 0  # requests being served: never evicted while > 0
        self.waiters = 0  # requests waiting for it to load: not evicted either
        self.last_used = 0.0
        # Resolved when the pending load ends, so every request waiting for it shares one load.
        self.pending: asyncio.Future | None = None
        self.held = False  # an explicit load: its queue entry stays with no one waiting
        self.generation = 0  # counts launches, so each child gets its own connection pool
        self.stop_reason: str | None = None
        self.runner: asyncio.Task | None = None
        self.crashes = CrashHistory()
        self.restart_at: float | None = None  # wall time of a restart after a crash, while waiting
        self.restart_timer: asyncio.TimerHandle | None = None
        self.failure: str | None = None  # why it is FAILED
        self.memory_use: MemoryUse | None = None  # the running child's, as last sampled
        self.peak = 0  # the most memory the running child has held, sampled or from the kernel
        # Liveness of the running child: when /health was last asked, since when it has not answered.
        self.probing = False
        self.probed_at = 0.0
        self.unanswered_since: float | None = None
        self.killed_for: str | None = None  # why the router killed its child, when it did
        self._changed: asyncio.Future | None = None

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def file(self) -> ModelFile:
        return self.config.file

    @property
    def argv(self) -> tuple[str, ...]:
        return self.config.argv

    @property
    def idle(self) -> bool:
        return self.state is S.LOADED and self.in_flight == 0 and self.waiters == 0

    @property
    def removed(self) -> bool:
        return self.plan is Plan.RETIRE

    @property
    def pinned(self) -> bool:
        return self.config.pinned

    @property
    def ttl(self) -> float:
        return self.config.ttl

    def sample_memory(self) -> MemoryUse | None:
        use = self.child.memory() if self.child is not None else None
        self.memory_use = use
        if use is not None:
            self.peak = max(self.peak, use.peak)
        return use

    def set_state(self, new: ModelState, detail: str = "") -> None:
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"model {self.id}: {self.state.value} -> {new.value}")
        log.info("model %s: %s -> %s%s", self.id, self.state.value, new.value, f" ({detail})" if detail else "")
        self.state = new
        if new is not S.LOADING:
            self.progress = None
        if self.on_change is not None:
            self.on_change(self)
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(new)
        self._changed = None

    async def changed(self) -> None:
        """Returns after the next state change."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)
