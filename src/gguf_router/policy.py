"""The scheduler's decisions, as pure functions over plain records: no asyncio, no processes.

The scheduler describes its models as records, asks, and carries out the answer (starts, stops,
refusals); so every rule here is tested in milliseconds (tests/test_policy.py):
- a model holds a slot and its memory while loading, loaded or stopping (a stopping child has
  not given its memory back yet);
- a model starts when a slot is free (`models_max`, 0 = no limit) and what the running models
  count plus its own estimate fits the memory budget (None = no budget);
- queue entries are served first come, first served: one that must wait holds back those
  behind it, so a large model is never starved by small ones passing it;
- to make room, idle models are stopped, least recently used first; a model with requests
  waiting for it, still loading, or pinned is never chosen;
- when that is not enough, busy models are drained, the longest loaded first: a draining model
  takes no new requests (they queue behind, in arrival order), finishes what it serves, and
  is stopped as soon as it serves nothing. Only a model loaded for at least `resident_for` is
  drained, so that swaps cannot take turns faster than models load;
- an idle model past its time to live is stopped; a pinned one never.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Running:
    """A model holding a slot."""

    id: str
    stopping: bool  # its child was told to stop and has not exited yet
    idle: bool  # loaded, serving nothing, no request waiting for it
    last_used: float
    bytes: int  # what it is counted at: its estimate, or more if it was seen using more
    pinned: bool = False
    ttl: float = 0.0  # seconds idle before it is stopped; 0 = never
    busy: bool = False  # loaded and serving
    draining: bool = False  # already chosen to make room: serves what it has, takes nothing new
    loaded_at: float = 0.0
    load_took: float = 0.0  # seconds its load took


@dataclass(frozen=True)
class Waiting:
    """A queue entry: a model that requests (or an explicit load) wait for."""

    id: str
    bytes: int
    startable: bool = True  # False while its own previous child is still stopping


@dataclass(frozen=True)
class Limits:
    models_max: int = 0  # 0 = no limit
    budget: int | None = None  # bytes; None = memory is not counted


@dataclass
class Decision:
    start: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # idle models stopped to make room
    drain: list[str] = field(default_factory=list)  # busy models that are to drain, already draining ones included


# A model stays loaded at least this long, or twice its load time if that is longer, before it
# is drained for another: under full contention a swap then costs at most a third of the time.
# Measured with `scripts/dev bench churn` (two real models, one slot): at 1 s they thrashed, at
# 5 s the other model's clients waited up to 5 s; 2.5 s served more than either.
MIN_RESIDENT = 2.5


def resident_for(r: Running) -> float:
    return max(MIN_RESIDENT, 2 * r.load_took)


def _fits(slots: int, used: int, limits: Limits) -> bool:
    return (limits.models_max == 0 or slots <= limits.models_max) and (limits.budget is None or used <= limits.budget)


def admit(queue: Sequence[Waiting], running: Iterable[Running], limits: Limits, now: float = 0.0) -> Decision:
    """Which queue entries start now, which idle models to stop and which busy ones to drain for
    the ones that must wait."""
    running = list(running)
    decision = Decision()
    slots, used = len(running), sum(r.bytes for r in running)
    # What will be held once the children already stopping have exited.
    later_slots = slots - sum(r.stopping for r in running)
    later_used = used - sum(r.bytes for r in running if r.stopping)
    victims = sorted((r for r in running if r.idle and not r.pinned and not r.stopping), key=lambda r: r.last_used)
    # Those already draining first: they are on their way out, and a second drain would only add a wait.
    drainable = [r for r in running if r.draining] + sorted(
        (r for r in running if r.busy and not r.draining and not r.pinned and not r.stopping
         and now - r.loaded_at >= resident_for(r)), key=lambda r: r.loaded_at)
    waiting_ahead = False
    for entry in queue:
        if not waiting_ahead and entry.startable and _fits(slots + 1, used + entry.bytes, limits):
            decision.start.append(entry.id)
            slots, used = slots + 1, used + entry.bytes
            later_slots, later_used = later_slots + 1, later_used + entry.bytes
            continue
        waiting_ahead = True
        while victims and not _fits(later_slots + 1, later_used + entry.bytes, limits):
            victim = victims.pop(0)
            decision.stop.append(victim.id)
            later_slots, later_used = later_slots - 1, later_used - victim.bytes
        while not _fits(later_slots + 1, later_used + entry.bytes, limits):
            # Not the entry's own model: one draining for an earlier entry waits for its next child.
            victim = next((r for r in drainable if r.id != entry.id), None)
            if victim is None:
                break
            drainable.remove(victim)
            decision.drain.append(victim.id)
            later_slots, later_used = later_slots - 1, later_used - victim.bytes
        if _fits(later_slots + 1, later_used + entry.bytes, limits):
            # Its place is kept for when those stops are done; the entries behind it plan around it.
            later_slots, later_used = later_slots + 1, later_used + entry.bytes
    return decision


def never_fits(need: int, pinned_others: int, budget: int | None) -> bool:
    """Whether a model could not start even with every model that may be stopped stopped."""
    return budget is not None and need + pinned_others > budget


def expired(running: Iterable[Running], now: float) -> list[str]:
    """Idle models whose time to live has passed since their last use."""
    return [r.id for r in running
            if r.idle and not r.pinned and not r.stopping and r.ttl > 0 and now - r.last_used >= r.ttl]
