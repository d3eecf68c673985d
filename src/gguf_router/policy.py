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
- an idle model past its time to live is stopped; a pinned one never;
- a model that runs on a device needs room there too (its own budget, and one model at a time
  on an RPC server): it starts on the device with the most room left, or waits for the device
  that needs the fewest models stopped; only models on that device are stopped for it, unless
  slots or host memory lack as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence


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
    device: str | None = None  # the device it runs on, if any
    device_bytes: int = 0  # what it is counted at there


@dataclass(frozen=True)
class Waiting:
    """A queue entry: a model that requests (or an explicit load) wait for."""

    id: str
    bytes: int
    startable: bool = True  # False while its own previous child is still stopping
    # The devices it may run on, each with what it would take there; empty: it runs on the host alone.
    places: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceLimit:
    budget: int  # bytes the models on it may take together
    exclusive: bool = False  # one model at a time (an RPC server serves one client)


@dataclass(frozen=True)
class Limits:
    models_max: int = 0  # 0 = no limit
    budget: int | None = None  # bytes; None = memory is not counted
    devices: Mapping[str, DeviceLimit] = field(default_factory=dict)


@dataclass
class Decision:
    start: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)  # idle models stopped to make room
    drain: list[str] = field(default_factory=list)  # busy models that are to drain, already draining ones included
    placed: dict[str, str] = field(default_factory=dict)  # the device each started model goes to, if any


# A model stays loaded at least this long, or twice its load time if that is longer, before it
# is drained for another: under full contention a swap then costs at most a third of the time.
# Measured with `scripts/dev bench churn` (two real models, one slot): at 1 s they thrashed, at
# 5 s the other model's clients waited up to 5 s; 2.5 s served more than either.
MIN_RESIDENT = 2.5


def resident_for(r: Running) -> float:
    return max(MIN_RESIDENT, 2 * r.load_took)


@dataclass
class _Held:
    """What the models holding slots take: slots, host bytes, and per device (bytes, models)."""

    slots: int
    host: int
    on: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, running: Iterable[Running]) -> "_Held":
        held = cls(0, 0, {})
        for r in running:
            held.add(r.bytes, r.device, r.device_bytes)
        return held

    def copy(self) -> "_Held":
        return _Held(self.slots, self.host, dict(self.on))

    def add(self, host: int, device: str | None, device_bytes: int, sign: int = 1) -> None:
        self.slots += sign
        self.host += sign * host
        if device is not None:
            used, models = self.on.get(device, (0, 0))
            self.on[device] = (used + sign * device_bytes, models + sign)

    def remove(self, r: Running) -> None:
        self.add(r.bytes, r.device, r.device_bytes, -1)

    def lacks(self, host: int, device: str | None, device_bytes: int, limits: Limits) -> tuple[bool, bool]:
        """Whether one more model, of these needs, would overrun (the slots or host memory, its device)."""
        overall = ((limits.models_max != 0 and self.slots + 1 > limits.models_max)
                   or (limits.budget is not None and self.host + host > limits.budget))
        if device is None:
            return overall, False
        limit = limits.devices.get(device)
        used, models = self.on.get(device, (0, 0))
        on_device = limit is None or used + device_bytes > limit.budget or (limit.exclusive and models >= 1)
        return overall, on_device

    def fits(self, host: int, device: str | None, device_bytes: int, limits: Limits) -> bool:
        return not any(self.lacks(host, device, device_bytes, limits))

    def room_left(self, device: str | None, limits: Limits) -> int:
        if device is None or device not in limits.devices:
            return 0
        return limits.devices[device].budget - self.on.get(device, (0, 0))[0]


@dataclass
class _Plan:
    device: str | None
    device_bytes: int
    stop: list[Running]
    drain: list[Running]
    later: _Held
    fits: bool


def _plan(entry: Waiting, device: str | None, device_bytes: int, later: _Held, victims: list[Running],
          drainable: list[Running], limits: Limits) -> _Plan:
    """What to stop, then what to drain, for the entry to fit on `device` once those are gone: on
    its device first, least recently used (or longest loaded) first; elsewhere only while the
    slots or host memory lack."""
    room = later.copy()
    plan = _Plan(device, device_bytes, [], [], room, False)
    for pool, chosen in ((victims, plan.stop), (drainable, plan.drain)):
        # Not the entry's own model: one draining for an earlier entry waits for its next child.
        candidates = [r for r in pool if r.id != entry.id and r not in plan.stop]
        while True:
            overall, on_device = room.lacks(entry.bytes, device, device_bytes, limits)
            if not (overall or on_device):
                break
            victim = next((r for r in candidates if on_device and r.device == device), None)
            if victim is None and overall:
                victim = next(iter(candidates), None)
            if victim is None:
                break
            candidates.remove(victim)
            chosen.append(victim)
            room.remove(victim)
    plan.fits = room.fits(entry.bytes, device, device_bytes, limits)
    return plan


def admit(queue: Sequence[Waiting], running: Iterable[Running], limits: Limits, now: float = 0.0) -> Decision:
    """Which queue entries start now (and on which device), which idle models to stop and which
    busy ones to drain for the ones that must wait. An entry that may run on several devices
    starts on the one with the most room left; one that must wait plans for the device that needs
    the fewest models stopped (idle ones before busy ones). An entry behind a waiting one starts
    only if those ahead wait for their devices alone (not for slots or host memory), it runs on
    none of those devices, and it fits beside what they are promised: a model waiting for a busy
    GPU0 does not hold back one for an empty GPU1, and is not starved by it."""
    running = list(running)
    decision = Decision()
    held = _Held.of(running)
    # What will be held once the children already stopping have exited.
    later = _Held.of(r for r in running if not r.stopping)
    victims = sorted((r for r in running if r.idle and not r.pinned and not r.stopping), key=lambda r: r.last_used)
    # Those already draining first: they are on their way out, and a second drain would only add a wait.
    drainable = [r for r in running if r.draining] + sorted(
        (r for r in running if r.busy and not r.draining and not r.pinned and not r.stopping
         and now - r.loaded_at >= resident_for(r)), key=lambda r: r.loaded_at)
    pinned = [r for r in running if r.pinned]
    waiting_ahead = False
    waited_for: set[str] = set()  # devices an entry ahead may run on
    overall_wait = False  # an entry ahead waits for slots or host memory
    promised = 0  # host bytes of entries ahead not in `later` yet (their room is not free yet)
    promised_slots = 0
    for entry in queue:
        places = list(entry.places.items()) or [(None, 0)]
        passing = waiting_ahead and not overall_wait and bool(entry.places)
        if entry.startable and (not waiting_ahead or passing):
            fitting = [(d, b) for d, b in places if held.fits(entry.bytes, d, b, limits)]
            if passing:
                beside = later.copy()
                beside.slots, beside.host = beside.slots + promised_slots, beside.host + promised
                fitting = [(d, b) for d, b in fitting if d not in waited_for and beside.fits(entry.bytes, d, b, limits)]
            if fitting:
                device, device_bytes = max(fitting, key=lambda place: held.room_left(place[0], limits) - place[1])
                decision.start.append(entry.id)
                if device is not None:
                    decision.placed[entry.id] = device
                held.add(entry.bytes, device, device_bytes)
                later.add(entry.bytes, device, device_bytes)
                continue
        waiting_ahead = True
        waited_for.update(entry.places)
        overall_wait = overall_wait or all(held.lacks(entry.bytes, d, b, limits)[0] for d, b in places)
        # Not on a device that could never take it (pinned models there, or too small): it would
        # stop models there for nothing.
        possible = [(d, b) for d, b in places if d is None or device_short({d: b}, pinned, limits) is None]
        if not possible:
            continue
        plans = [_plan(entry, d, b, later, victims, drainable, limits) for d, b in possible]
        # Fewest models stopped, a drain already under way not counted again.
        plan = min(plans, key=lambda p: (not p.fits, len(p.stop) + sum(not r.draining for r in p.drain),
                                         sum(not r.draining for r in p.drain)))
        for r in plan.stop:
            victims.remove(r)
            decision.stop.append(r.id)
        for r in plan.drain:
            drainable.remove(r)
            decision.drain.append(r.id)
        later = plan.later
        if plan.fits:
            # Its place is kept for when those stops are done; the entries behind it plan around it.
            later.add(entry.bytes, plan.device, plan.device_bytes)
        else:
            promised, promised_slots = promised + entry.bytes, promised_slots + 1
    return decision


def never_fits(need: int, pinned_others: int, budget: int | None) -> bool:
    """Whether a model could not start even with every model that may be stopped stopped."""
    return budget is not None and need + pinned_others > budget


def device_short(places: Mapping[str, int], pinned: Iterable[Running], limits: Limits) -> tuple[str, int, int] | None:
    """None when the model runs on the host alone or one of its devices could take it with every
    model there that may be stopped stopped; else the device closest to taking it, with its need
    and what pinned models hold there."""
    if not places:
        return None
    pinned = list(pinned)
    closest = None
    for device, need in places.items():
        limit = limits.devices.get(device)
        there = [r for r in pinned if r.device == device]
        held = sum(r.device_bytes for r in there)
        if limit is not None and need + held <= limit.budget and not (limit.exclusive and there):
            return None
        short = need + held - (limit.budget if limit else 0)
        if closest is None or short < closest[0]:
            closest = (short, device, need, held)
    return closest[1:]


def expired(running: Iterable[Running], now: float) -> list[str]:
    """Idle models whose time to live has passed since their last use."""
    return [r.id for r in running
            if r.idle and not r.pinned and not r.stopping and r.ttl > 0 and now - r.last_used >= r.ttl]
