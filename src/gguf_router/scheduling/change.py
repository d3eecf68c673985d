"""One step's work on the fleet: the copies it changes, the effects it collects, and the moves
every handler in step.py is made of (a checked change of phase, settling waiters, stopping,
draining, a crash and its backoff, the admission decision that ends every step)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TypeVar

from .. import crashes, policy
from ..memory import floor_after
from . import effects as fx
from .records import (HOLDS_SLOT, STATUS, TRANSITIONS, Cause, Exit, Fleet, InvalidTransition, ModelRecord, Phase,
                      Refusal, Why)

P = Phase


class Change:
    """One step's work on copies of the fleet's parts; `fleet()` freezes the result."""

    def __init__(self, fleet: Fleet, now: float):
        self.old, self.now = fleet, now
        self.models = fleet.models  # copied on the first write: most steps touch one model of many
        self._own = False
        self.queue = list(fleet.queue)
        self.holding = dict.fromkeys(fleet.holding)  # ordered, and quick to take one out of
        self.limits, self.queue_max, self.closing = fleet.limits, fleet.queue_max, fleet.closing
        self.waiting, self.waited, self.refused = fleet.waiting, fleet.waited, dict(fleet.refused)
        self.effects: list[fx.Effect] = []

    def fleet(self) -> Fleet:
        return Fleet(self.models, tuple(self.queue), tuple(self.holding), self.limits, self.queue_max, self.closing,
                     self.waiting, self.waited, self.refused)

    def log(self, level: int, text: str) -> None:
        self.effects.append(fx.Log(level, text))

    def put(self, rec: ModelRecord, **changes) -> ModelRecord:
        rec = evolved(rec, changes) if changes else rec
        self.writable()[rec.id] = rec
        return rec

    def writable(self) -> dict[str, ModelRecord]:
        if not self._own:
            self.models, self._own = dict(self.models), True
        return self.models

    def move(self, rec: ModelRecord, phase: Phase, detail: str = "", **changes) -> ModelRecord:
        """A change of phase, checked against the table, logged, and published when the status
        llama.cpp's clients see changes."""
        if phase not in TRANSITIONS[rec.phase]:
            raise InvalidTransition(f"model {rec.id}: {rec.phase.value} -> {phase.value}")
        self.log(logging.INFO, f"model {rec.id}: {rec.phase.value} -> {phase.value}{f' ({detail})' if detail else ''}")
        was = STATUS[rec.phase]
        if phase is not P.LOADING:
            changes.setdefault("progress", None)
        if phase not in (P.DRAINING, P.UNLOADING):
            changes.setdefault("cause", None)
        rec = self.put(rec, phase=phase, **changes)
        if phase in HOLDS_SLOT:
            self.holding[rec.id] = None
        else:
            self.holding.pop(rec.id, None)
        if STATUS[phase] != was:
            self.publish(rec)
        return rec

    def publish(self, rec: ModelRecord) -> None:
        """A `status_change` event, as llama.cpp's router sends it."""
        data: dict = {"status": STATUS[rec.phase]}
        if STATUS[rec.phase] == "unloaded" and rec.last_exit is not None:
            data["exit_code"] = rec.last_exit.code
            if rec.last_exit.failed:
                data["error"] = rec.last_exit.reason
        if rec.phase in (P.LOADED, P.DRAINING) and rec.info:
            data["info"] = dict(rec.info)
        if rec.phase is P.LOADING and rec.progress is not None:
            data["progress"] = {"value": rec.progress}
        self.effects.append(fx.Publish("status_change", rec.id, data))

    # -- requests and the queue -------------------------------------------------------------

    def refuse(self, ticket: int | None, refusal: Refusal) -> None:
        self.effects.append(fx.Refuse(ticket, refusal))

    def settle(self, rec: ModelRecord, why: Why | None, detail: str = "") -> ModelRecord:
        """Admits every request waiting for the model (why None) or refuses them all."""
        if not rec.tickets:
            return rec
        self.waiting -= len(rec.tickets)
        if why is None:
            count, seconds = self.waited
            self.waited = (count + len(rec.tickets), seconds + sum(self.now - since for _, since in rec.tickets))
            self.effects.extend(fx.Admit(ticket, rec.id) for ticket, _ in rec.tickets)
            return self.put(rec, tickets=(), in_flight=rec.in_flight + len(rec.tickets), last_used=self.now)
        refusal = Refusal(why, rec.id, detail)
        for ticket, _ in rec.tickets:
            self.refuse(ticket, refusal)
        return self.put(rec, tickets=())

    def enqueue(self, rec: ModelRecord) -> None:
        if rec.id not in self.queue:
            self.queue.append(rec.id)
            self.log(logging.INFO, f"model {rec.id}: queued for a slot ({len(self.queue)} in queue)")

    def dequeue(self, rec: ModelRecord, why: str) -> ModelRecord:
        """Out of the queue; a model that has no child goes back to unloaded, its waiters refused."""
        if rec.id in self.queue:
            self.queue.remove(rec.id)
            self.log(logging.INFO, f"model {rec.id}: left the queue: {why}")
        rec = self.put(rec, held=False)
        if rec.phase is P.QUEUED:
            rec = self.move(self.settle(rec, Why.LEFT_QUEUE, why), P.UNLOADED)
        return rec

    def never_fits(self, rec: ModelRecord) -> Refusal | None:
        """Refused at once: a model that could not start even with every other model stopped that may be."""
        budget = self.limits.budget
        pinned = [m for m in map(self.models.get, self.holding) if m is not rec and m.spec.pinned]
        held = sum(m.counted for m in pinned)
        if policy.never_fits(rec.counted, held, budget):
            self.refused["never_fits"] += 1
            return Refusal(Why.NEVER_FITS, rec.id, figures={"need": rec.counted, "pinned": held, "budget": budget})
        short = policy.device_short(rec.places, [r for r in self.running() if r.pinned and r.id != rec.id],
                                    self.limits)
        if short is None:
            return None
        device, need, held = short
        limit = self.limits.devices.get(device)
        self.refused["never_fits"] += 1
        return Refusal(Why.NEVER_FITS_DEVICE, rec.id, device, figures={
            "need": need, "pinned": held, "budget": limit.budget if limit else 0,
            "exclusive": int(bool(limit and limit.exclusive)), "choices": len(rec.spec.places)})

    # -- children ---------------------------------------------------------------------------

    def stop(self, rec: ModelRecord, cause: Cause) -> ModelRecord:
        if cause is Cause.EVICTED:
            rec = self.put(rec, stats=replace(rec.stats, evictions=rec.stats.evictions + 1))
        self.effects.append(fx.Stop(rec.id, rec.generation, cause))
        return self.move(rec, P.UNLOADING, stop_reason(rec, cause), cause=cause)

    def drain(self, rec: ModelRecord, cause: Cause) -> ModelRecord:
        """Takes no new requests; stopped as soon as it serves nothing."""
        if rec.phase is P.LOADED:
            rec = self.move(rec, P.DRAINING, cause.value, cause=cause)
        return self.stop(rec, cause) if rec.in_flight == 0 and rec.phase is P.DRAINING else rec

    def forget(self, rec: ModelRecord) -> None:
        """A removed model is dropped once nothing holds it: requests still in flight on its
        last child are released first, so that a model of the same name starts from zero."""
        if rec.in_flight:
            return
        del self.writable()[rec.id]
        if rec.id in self.queue:
            self.queue.remove(rec.id)
        self.effects.append(fx.Publish("model_remove", rec.id))

    def out_of_memory(self, rec: ModelRecord, peak: int | None) -> ModelRecord:
        """Its next start counts it at its peak plus a margin, which raises its unit's limit."""
        rec = self.put(rec, stats=replace(rec.stats, oom_kills=rec.stats.oom_kills + 1))
        peak = max(peak or 0, rec.peak)
        if not peak:
            return rec
        floor = floor_after(peak, rec.spec.floor)
        self.effects.append(fx.SaveFloor(rec.id, rec.spec.argv, floor))
        self.log(logging.WARNING, f"model {rec.id}: killed for memory at {peak} bytes; counted at {floor} bytes from now on")
        return self.put(rec, spec=replace(rec.spec, floor=floor))

    def out_of_device_memory(self, rec: ModelRecord) -> ModelRecord:
        """Its next start counts it on any device at what it was admitted at plus a margin."""
        floor = floor_after(rec.on_device, rec.spec.device_floor)
        self.log(logging.WARNING, f"model {rec.id}: out of device memory on {rec.device}; counted at {floor} bytes on "
                                  "a device from now on")
        return self.put(rec, spec=replace(rec.spec, device_floor=floor))

    def ended(self, rec: ModelRecord, exit: Exit) -> None:
        """A child is gone: its model is unloaded, queued again for its waiters, or forgotten."""
        rec = self.put(rec, last_exit=exit, info=None, memory=None)
        requeue = not self.closing and (rec.cause is Cause.RESTART or rec.held or bool(rec.tickets))
        if rec.removed:
            self.forget(self.move(self.settle(rec, Why.LEFT_QUEUE, Cause.RETIRED.value), P.UNLOADED))
        elif requeue:
            rec = self.move(rec, P.QUEUED, f"{exit.reason}, exit code {exit.code}; queued again",
                            held=rec.held or rec.cause is Cause.RESTART)
            self.enqueue(rec)
        else:  # nothing waits for it (or the router is stopping, and the waiters are told)
            if rec.id in self.queue:
                self.queue.remove(rec.id)
            rec = self.settle(self.put(rec, held=False), Why.LEFT_QUEUE, Cause.SHUTDOWN.value)
            self.move(rec, P.UNLOADED, f"{exit.reason}, exit code {exit.code}")

    def crashed(self, rec: ModelRecord, exit: Exit) -> None:
        """Brings a crashed model back after a growing delay; requests wait for that restart."""
        rec = self.put(rec, last_exit=exit, info=None, memory=None,
                       stats=replace(rec.stats, crashes=rec.stats.crashes + 1))
        self.log(logging.ERROR, f"model {rec.id}: llama-server {exit.reason} (exit code {exit.code})")
        if self.closing or rec.removed:
            rec = self.settle(self.dequeue(rec, "its child crashed"), Why.FAILED, exit.reason)
            rec = self.move(rec, P.UNLOADED, exit.reason)
            if rec.removed:
                self.forget(rec)
            return
        times, delay = crashes.record(rec.crashes, self.now)
        rec = self.dequeue(self.put(rec, crashes=times, stale=False), "its child crashed")
        if delay is None:
            failure = f"crashed {len(times)} times in {crashes.WINDOW:.0f} s; not restarted until loaded again"
            self.log(logging.ERROR, f"model {rec.id}: {failure}")
            rec = self.settle(self.put(rec, failure=failure), Why.FAILED, failure)
            self.move(rec, P.FAILED, exit.reason)
            return
        self.log(logging.WARNING, f"model {rec.id}: restarting in {delay:.0f} s (crash {len(times)} in {crashes.WINDOW:.0f} s)")
        self.move(rec, P.BACKOFF, exit.reason, restart_at=self.now + delay)
        self.effects.append(fx.Wake(rec.id, self.now + delay))

    def restart(self, rec: ModelRecord) -> ModelRecord:
        """A crashed model's backoff is over (or an explicit load cut it short): queued again."""
        rec = self.move(rec, P.QUEUED, "restarting after a crash", restart_at=None, held=True,
                        stats=replace(rec.stats, restarts=rec.stats.restarts + 1))
        self.enqueue(rec)
        return rec

    # -- decisions --------------------------------------------------------------------------

    def running(self) -> list[policy.Running]:
        return [policy.Running(r.id, r.phase is P.UNLOADING or (r.phase is P.DRAINING and r.cause is not Cause.EVICTED),
                               r.idle, r.last_used, r.counted, r.spec.pinned, r.spec.ttl,
                               busy=r.phase is P.LOADED and r.in_flight > 0,
                               draining=r.phase is P.DRAINING and r.cause is Cause.EVICTED,
                               loaded_at=r.loaded_at, load_took=r.load_took, device=r.device,
                               device_bytes=r.on_device)
                for r in map(self.models.get, self.holding)]

    def pump(self) -> None:
        """Asks policy.admit and carries out its answer: starts, stops and drains to make room."""
        # A model drains only for a queue entry, so with no queue before or after there is nothing to do.
        if self.closing or not (self.queue or self.old.queue):
            return
        running = self.running()
        entries = [policy.Waiting(m.id, m.counted, m.phase is P.QUEUED, m.places)
                   for m in map(self.models.get, self.queue)]
        decision = policy.admit(entries, running, self.limits, self.now)
        for model_id in decision.start:
            rec = self.models[model_id]
            self.queue.remove(model_id)
            device = decision.placed.get(model_id)
            self.move(rec, P.LOADING, f"on device {device}" if device else "", held=False, stale=False,
                      generation=rec.generation + 1, started_at=self.now, killed_for=None, device=device,
                      device_bytes=rec.places.get(device, 0) if device else 0)
            self.effects.append(fx.Start(model_id, rec.generation + 1, device))
        for model_id in decision.stop:
            self.stop(self.models[model_id], Cause.EVICTED)
        for r in running:
            if r.draining and r.id not in decision.drain:  # the entry it made room for is gone
                self.undrain(self.models[r.id])
        for model_id in decision.drain:
            self.drain(self.models[model_id], Cause.EVICTED)

    def undrain(self, rec: ModelRecord) -> None:
        rec = self.move(rec, P.LOADED, "no longer needed to make room")
        if rec.id in self.queue:
            self.queue.remove(rec.id)
        stale = rec.stale
        rec = self.settle(self.put(rec, held=False, stale=False), None)
        if stale:  # its options changed while it drained: it restarts with them
            self.drain(rec, Cause.RESTART)


R = TypeVar("R", ModelRecord, Fleet)
_FIELDS = {cls: frozenset(cls.__dataclass_fields__) for cls in (ModelRecord, Fleet)}


def evolved(rec: R, changes: dict) -> R:
    """dataclasses.replace without its per-field work (a tenth of the time, twice per request):
    records have no __post_init__ and no init-only fields, so a copy of their fields is one."""
    fields = _FIELDS[type(rec)]
    if not changes.keys() <= fields:
        raise TypeError(f"{type(rec).__name__} has no field {sorted(changes.keys() - fields)}")
    new = object.__new__(type(rec))
    new.__dict__.update(rec.__dict__, **changes)
    return new


def stop_reason(rec: ModelRecord, cause: Cause) -> str:
    """Why a child was stopped, in the words of logs and of its exit in /models."""
    return f"idle for {rec.spec.ttl:g} s (ttl)" if cause is Cause.TTL else cause.value


def last_line(tail: tuple[str, ...]) -> str:
    return f" (last log line: {tail[-1]})" if tail else ""
